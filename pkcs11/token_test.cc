#include "pkcs11/token.h"

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "openssl/bn.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/rsa.h"
#include "pkcs11/cryptoki.h"
#include "pkcs11/session_pool.h"
#include "pkcs11/testing/softhsm_testing.h"

namespace custody::pkcs11 {
namespace {

constexpr char kLabel[] = "custody-test";
constexpr char kUserPin[] = "user-pin-1234";
constexpr char kSoPin[] = "so-pin-5678";

// Owned here (not in a fixture) because SOFTHSM2_CONF must be set before the module loads and
// the directory must outlive every Token of the process.
TemporarySoftHsm* softhsm = nullptr;

class SoftHsmEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> setup = TemporarySoftHsm::Create();
    ASSERT_TRUE(setup.ok()) << setup.status();
    owned_ = std::move(*setup);
    softhsm = owned_.get();
    ASSERT_TRUE(Token::InitializeToken(TemporarySoftHsm::ModulePath(), kLabel, Secret(kSoPin),
                                       Secret(kUserPin))
                    .ok());
  }
  void TearDown() override {
    softhsm = nullptr;
    owned_.reset();
  }

 private:
  std::unique_ptr<TemporarySoftHsm> owned_;
};

const ::testing::Environment* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new SoftHsmEnvironment);

Token::Options OptionsFor(std::string_view label_or_uri, std::string_view pin = kUserPin) {
  Token::Options options;
  options.module_path = TemporarySoftHsm::ModulePath();
  absl::StatusOr<TokenSelector> selector = ParseTokenSelector(label_or_uri);
  EXPECT_TRUE(selector.ok()) << selector.status();
  if (selector.ok()) options.selector = *selector;
  options.pin = Secret(std::string(pin));
  return options;
}

// ---- Independent verification with OpenSSL ------------------------------------------------

std::string Sha256(std::string_view message) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EXPECT_EQ(EVP_Digest(message.data(), message.size(), digest, &size, EVP_sha256(), nullptr), 1);
  return std::string(reinterpret_cast<char*>(digest), size);
}

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); }
};
struct PkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
struct EcdsaSigDeleter {
  void operator()(ECDSA_SIG* p) const { ECDSA_SIG_free(p); }
};

// JWS r||s → the DER ECDSA-Sig-Value OpenSSL verifies.
std::string RawEcdsaToDer(std::string_view raw) {
  const size_t half = raw.size() / 2;
  std::unique_ptr<ECDSA_SIG, EcdsaSigDeleter> sig(ECDSA_SIG_new());
  BIGNUM* r = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()), half, nullptr);
  BIGNUM* s = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()) + half, half, nullptr);
  EXPECT_EQ(ECDSA_SIG_set0(sig.get(), r, s), 1);
  unsigned char* der = nullptr;
  int size = i2d_ECDSA_SIG(sig.get(), &der);
  EXPECT_GT(size, 0);
  std::string out(reinterpret_cast<char*>(der), size);
  OPENSSL_free(der);
  return out;
}

// EVP_DigestVerify over the whole message; `md` null for Ed25519.
bool DigestVerify(EVP_PKEY* pkey, const EVP_MD* md, std::string_view message,
                  std::string_view signature) {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (EVP_DigestVerifyInit(ctx.get(), nullptr, md, nullptr, pkey) != 1) return false;
  return EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                          signature.size(), reinterpret_cast<const unsigned char*>(message.data()),
                          message.size()) == 1;
}

// EVP_PKEY_verify over a SHA-256 digest with RSA padding `padding`.
bool RsaVerifyDigest(EVP_PKEY* pkey, int padding, std::string_view digest,
                     std::string_view signature) {
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  if (EVP_PKEY_verify_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), padding) != 1 ||
      EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) != 1) {
    return false;
  }
  if (padding == RSA_PKCS1_PSS_PADDING &&
      (EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), EVP_sha256()) != 1 ||
       EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), 32) != 1)) {
    return false;
  }
  return EVP_PKEY_verify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                         signature.size(), reinterpret_cast<const unsigned char*>(digest.data()),
                         digest.size()) == 1;
}

// ---- ParseTokenSelector and CkrName (no token needed) --------------------------------------

TEST(ParseTokenSelectorTest, PlainStringIsALabel) {
  absl::StatusOr<TokenSelector> selector = ParseTokenSelector("custody prod");
  ASSERT_TRUE(selector.ok()) << selector.status();
  EXPECT_EQ(selector->label, "custody prod");
  EXPECT_TRUE(selector->serial.empty());
  EXPECT_FALSE(selector->slot_id.has_value());
}

TEST(ParseTokenSelectorTest, ReadsTokenAttributesAndPercentDecodes) {
  absl::StatusOr<TokenSelector> selector = ParseTokenSelector(
      "pkcs11:token=My%20Token%2fA;serial=0123abcd;manufacturer=SoftHSM%20project;"
      "model=SoftHSM%20v2;slot-id=42");
  ASSERT_TRUE(selector.ok()) << selector.status();
  EXPECT_EQ(selector->label, "My Token/A");
  EXPECT_EQ(selector->serial, "0123abcd");
  EXPECT_EQ(selector->manufacturer, "SoftHSM project");
  EXPECT_EQ(selector->model, "SoftHSM v2");
  ASSERT_TRUE(selector->slot_id.has_value());
  EXPECT_EQ(*selector->slot_id, 42u);
}

TEST(ParseTokenSelectorTest, IgnoresObjectAndLibraryAttributesAndQuery) {
  absl::StatusOr<TokenSelector> selector = ParseTokenSelector(
      "pkcs11:token=a;object=key;id=%01%02;type=private;library-description=x"
      "?module-path=/usr/lib/softhsm/libsofthsm2.so");
  ASSERT_TRUE(selector.ok()) << selector.status();
  EXPECT_EQ(selector->label, "a");
}

TEST(ParseTokenSelectorTest, RefusesPinValueWithoutEchoingIt) {
  for (const char* uri : {"pkcs11:token=a;pin-value=s3cr3t", "pkcs11:token=a?pin-value=s3cr3t",
                          "pkcs11:token=a?module-name=softhsm2&pin-value=s3cr3t"}) {
    absl::StatusOr<TokenSelector> selector = ParseTokenSelector(uri);
    ASSERT_FALSE(selector.ok()) << uri;
    EXPECT_EQ(selector.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_FALSE(absl::StrContains(selector.status().message(), "s3cr3t"));
  }
}

TEST(ParseTokenSelectorTest, RejectsMalformedUris) {
  for (const char* uri :
       {"pkcs11:token=%4", "pkcs11:token=%zz", "pkcs11:token=a;token=b", "pkcs11:slot-id=three",
        "pkcs11:token", "pkcs11:colour=blue", "pkcs11:token=a#frag"}) {
    absl::StatusOr<TokenSelector> selector = ParseTokenSelector(uri);
    EXPECT_EQ(selector.status().code(), absl::StatusCode::kInvalidArgument) << uri;
  }
}

TEST(CkrNameTest, NamesKnownCodesAndHexesUnknownOnes) {
  EXPECT_EQ(CkrName(0x30), "CKR_DEVICE_ERROR");
  EXPECT_EQ(CkrName(0xa0), "CKR_PIN_INCORRECT");
  EXPECT_EQ(CkrName(0x7654321), "CKR_0x7654321");
}

TEST(CkErrorTest, MapsCodesAndNamesTheFunction) {
  absl::Status status = CkError("C_Sign", CKR_DEVICE_ERROR);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(status.message(), "C_Sign: CKR_DEVICE_ERROR");
  EXPECT_EQ(CkError("C_Sign", CKR_DATA_LEN_RANGE).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CkError("C_Sign", CKR_KEY_HANDLE_INVALID).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(CkError("C_Login", CKR_PIN_INCORRECT).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(CkError("C_Sign", CKR_FUNCTION_FAILED).code(), absl::StatusCode::kInternal);
}

// ---- Against a SoftHSM2 token --------------------------------------------------------------

class TokenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(OptionsFor(kLabel));
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = std::move(*token).release();
  }
  static void TearDownTestSuite() {
    delete token_;
    token_ = nullptr;
  }

  std::shared_ptr<KeyPair> Generate(const KeySpec& spec, const std::string& id) {
    absl::StatusOr<std::shared_ptr<KeyPair>> key =
        token_->GenerateKeyPair(spec, id, absl::StrCat("label-", id));
    EXPECT_TRUE(key.ok()) << key.status();
    return key.ok() ? *key : nullptr;
  }

  static Token* token_;
};

Token* TokenTest::token_ = nullptr;

TEST_F(TokenTest, OpensByLabelAndReportsTheToken) {
  const TokenInfo& info = token_->info();
  EXPECT_EQ(info.label, kLabel);
  EXPECT_EQ(info.manufacturer, "SoftHSM project");
  EXPECT_FALSE(info.serial.empty());
  EXPECT_EQ(info.module_path, TemporarySoftHsm::ModulePath());
  EXPECT_FALSE(info.library_description.empty());  // SoftHSM2: "Implementation of PKCS11"
}

TEST_F(TokenTest, OpensByPkcs11UriWithPercentEncoding) {
  const TokenInfo& info = token_->info();
  absl::StatusOr<std::unique_ptr<Token>> second = Token::Open(
      OptionsFor(absl::StrCat("pkcs11:token=custody%2Dtest;serial=", info.serial,
                              ";manufacturer=SoftHSM%20project;slot-id=", info.slot_id)));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->info().slot_id, info.slot_id);
  EXPECT_EQ((*second)->info().serial, info.serial);
}

TEST_F(TokenTest, UnknownLabelIsFailedPreconditionListingTheTokens) {
  absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(OptionsFor("no-such-token"));
  ASSERT_FALSE(token.ok());
  EXPECT_EQ(token.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(token.status().message(), kLabel)) << token.status();
}

TEST_F(TokenTest, InitializeTokenRefusesAnExistingLabel) {
  absl::Status status = Token::InitializeToken(TemporarySoftHsm::ModulePath(), kLabel,
                                               Secret(kSoPin), Secret(kUserPin));
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists) << status;
}

// A token of its own: PKCS#11 login is per application, so a token already logged in through
// token_ would answer CKR_USER_ALREADY_LOGGED_IN without looking at the PIN.
TEST_F(TokenTest, WrongPinIsPermissionDeniedAndNotEchoed) {
  constexpr char kPinLabel[] = "custody-pin";
  absl::Status init = Token::InitializeToken(TemporarySoftHsm::ModulePath(), kPinLabel,
                                             Secret(kSoPin), Secret(kUserPin));
  ASSERT_TRUE(init.ok() || absl::IsAlreadyExists(init)) << init;

  absl::StatusOr<std::unique_ptr<Token>> wrong =
      Token::Open(OptionsFor(kPinLabel, "wrong-pin-0000"));
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kPermissionDenied) << wrong.status();
  EXPECT_TRUE(absl::StrContains(wrong.status().message(), "CKR_PIN_INCORRECT"));
  EXPECT_FALSE(absl::StrContains(wrong.status().message(), "wrong-pin-0000"));

  absl::StatusOr<std::unique_ptr<Token>> right = Token::Open(OptionsFor(kPinLabel));
  EXPECT_TRUE(right.ok()) << right.status();
}

TEST_F(TokenTest, ListsTheMechanismsTheTokenOffers) {
  EXPECT_TRUE(token_->HasMechanism("CKM_ECDSA"));
  EXPECT_TRUE(token_->HasMechanism("CKM_RSA_PKCS_PSS"));
  EXPECT_TRUE(token_->HasMechanism("CKM_EC_KEY_PAIR_GEN"));
  EXPECT_TRUE(token_->HasMechanism("CKM_RSA_X_509"));  // default SoftHSM2 configuration
  EXPECT_FALSE(token_->HasMechanism("CKM_NOT_A_MECHANISM"));
}

class EcdsaTest : public TokenTest,
                  public ::testing::WithParamInterface<std::tuple<KeyType, const EVP_MD*, int>> {};

TEST_P(EcdsaTest, RawSignatureVerifiesWithOpenSsl) {
  const auto [type, md, size] = GetParam();
  const std::string id = absl::StrCat("ecdsa-", static_cast<int>(type));
  std::shared_ptr<KeyPair> key = Generate(KeySpec{.type = type}, id);
  ASSERT_NE(key, nullptr);

  const std::string message = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9";
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_size = 0;
  ASSERT_EQ(EVP_Digest(message.data(), message.size(), digest, &digest_size, md, nullptr), 1);
  absl::StatusOr<std::string> signature = token_->Sign(
      *key, SignScheme::kEcdsa, std::string_view(reinterpret_cast<char*>(digest), digest_size));
  ASSERT_TRUE(signature.ok()) << signature.status();
  EXPECT_EQ(signature->size(), static_cast<size_t>(size));

  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(*key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  EXPECT_TRUE(DigestVerify(public_key->get(), md, message, RawEcdsaToDer(*signature)));
  EXPECT_FALSE(DigestVerify(public_key->get(), md, message + "x", RawEcdsaToDer(*signature)));
  EXPECT_TRUE(token_->DestroyKeyPair(id).ok());
}

INSTANTIATE_TEST_SUITE_P(Curves, EcdsaTest,
                         ::testing::Values(std::make_tuple(KeyType::kEcP256, EVP_sha256(), 64),
                                           std::make_tuple(KeyType::kEcP384, EVP_sha384(), 96),
                                           std::make_tuple(KeyType::kEcP521, EVP_sha512(), 132)),
                         [](const auto& info) {
                           return absl::StrCat("SignatureBytes", std::get<2>(info.param));
                         });

TEST_F(TokenTest, Ed25519SignatureVerifiesWithOpenSsl) {
  std::shared_ptr<KeyPair> key = Generate(KeySpec{.type = KeyType::kEd25519}, "ed25519-1");
  ASSERT_NE(key, nullptr);
  const std::string message = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJib2IifQ";
  absl::StatusOr<std::string> signature = token_->Sign(*key, SignScheme::kEddsa, message);
  ASSERT_TRUE(signature.ok()) << signature.status();
  EXPECT_EQ(signature->size(), 64u);

  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(*key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  EXPECT_EQ(EVP_PKEY_get_id(public_key->get()), EVP_PKEY_ED25519);
  EXPECT_TRUE(DigestVerify(public_key->get(), nullptr, message, *signature));
  EXPECT_FALSE(DigestVerify(public_key->get(), nullptr, message + "x", *signature));

  absl::StatusOr<std::shared_ptr<KeyPair>> found = token_->FindKeyPair("ed25519-1");
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ((*found)->spec.type, KeyType::kEd25519);
  EXPECT_TRUE(token_->DestroyKeyPair("ed25519-1").ok());
}

TEST_F(TokenTest, RsaPssAndPkcs1SignaturesVerifyWithOpenSsl) {
  std::shared_ptr<KeyPair> key =
      Generate(KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "rsa-2048");
  ASSERT_NE(key, nullptr);
  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(*key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  EXPECT_EQ(EVP_PKEY_get_bits(public_key->get()), 2048);

  const std::string digest = Sha256("eyJhbGciOiJQUzI1NiJ9.eyJzdWIiOiJjYXJvbCJ9");
  absl::StatusOr<std::string> pss = token_->Sign(*key, SignScheme::kRsaPssSha256, digest);
  ASSERT_TRUE(pss.ok()) << pss.status();
  EXPECT_EQ(pss->size(), 256u);
  EXPECT_TRUE(RsaVerifyDigest(public_key->get(), RSA_PKCS1_PSS_PADDING, digest, *pss));

  // DigestInfo for SHA-256 (RFC 8017 §9.2 note 1), built here rather than by the code under test.
  const std::string digest_info =
      absl::HexStringToBytes("3031300d060960864801650304020105000420") + digest;
  absl::StatusOr<std::string> pkcs1 = token_->Sign(*key, SignScheme::kRsaPkcs1v15, digest_info);
  ASSERT_TRUE(pkcs1.ok()) << pkcs1.status();
  EXPECT_TRUE(RsaVerifyDigest(public_key->get(), RSA_PKCS1_PADDING, digest, *pkcs1));
  EXPECT_FALSE(RsaVerifyDigest(public_key->get(), RSA_PKCS1_PADDING, Sha256("other"), *pkcs1));

  absl::StatusOr<std::string> short_digest =
      token_->Sign(*key, SignScheme::kRsaPssSha256, digest.substr(1));
  EXPECT_EQ(short_digest.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(token_->DestroyKeyPair("rsa-2048").ok());
}

TEST_F(TokenTest, GeneratedPrivateKeyIsSensitiveAndNeverExtractable) {
  std::shared_ptr<KeyPair> key = Generate(KeySpec{.type = KeyType::kEcP256}, "attrs-1");
  ASSERT_NE(key, nullptr);
  absl::StatusOr<PrivateKeyAttributes> attributes = token_->GetPrivateKeyAttributes(*key);
  ASSERT_TRUE(attributes.ok()) << attributes.status();
  EXPECT_TRUE(attributes->token);
  EXPECT_TRUE(attributes->is_private);
  EXPECT_TRUE(attributes->sensitive);
  EXPECT_FALSE(attributes->extractable);
  EXPECT_TRUE(attributes->always_sensitive);
  EXPECT_TRUE(attributes->never_extractable);
  EXPECT_TRUE(token_->DestroyKeyPair("attrs-1").ok());
}

TEST_F(TokenTest, SecondTokenObjectFindsTheSameKeyPair) {
  std::shared_ptr<KeyPair> key =
      Generate(KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "find-rsa");
  ASSERT_NE(key, nullptr);
  absl::StatusOr<EvpPkeyPtr> original = token_->PublicKey(*key);
  ASSERT_TRUE(original.ok()) << original.status();

  absl::StatusOr<std::unique_ptr<Token>> second = Token::Open(OptionsFor(kLabel));
  ASSERT_TRUE(second.ok()) << second.status();
  absl::StatusOr<std::shared_ptr<KeyPair>> found = (*second)->FindKeyPair("find-rsa");
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ((*found)->spec.type, KeyType::kRsa);
  EXPECT_EQ((*found)->spec.rsa_bits, 2048);
  EXPECT_EQ((*found)->label, "label-find-rsa");
  absl::StatusOr<EvpPkeyPtr> reread = (*second)->PublicKey(**found);
  ASSERT_TRUE(reread.ok()) << reread.status();
  EXPECT_EQ(EVP_PKEY_eq(original->get(), reread->get()), 1);

  const std::string digest = Sha256("signed through the second Token");
  absl::StatusOr<std::string> signature =
      (*second)->Sign(**found, SignScheme::kRsaPssSha256, digest);
  ASSERT_TRUE(signature.ok()) << signature.status();
  EXPECT_TRUE(RsaVerifyDigest(original->get(), RSA_PKCS1_PSS_PADDING, digest, *signature));
  EXPECT_TRUE(token_->DestroyKeyPair("find-rsa").ok());
}

TEST_F(TokenTest, FindAllKeyPairsResolvesEveryPairInOnePass) {
  std::shared_ptr<KeyPair> ec = Generate(KeySpec{.type = KeyType::kEcP256}, "all-ec");
  std::shared_ptr<KeyPair> ed = Generate(KeySpec{.type = KeyType::kEd25519}, "all-ed");
  ASSERT_NE(ec, nullptr);
  ASSERT_NE(ed, nullptr);
  absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> all = token_->FindAllKeyPairs();
  ASSERT_TRUE(all.ok()) << all.status();
  for (const auto& [id, original] : {std::pair{std::string("all-ec"), ec}, {"all-ed", ed}}) {
    auto it = all->find(id);
    ASSERT_NE(it, all->end()) << id;
    EXPECT_EQ(it->second->spec.type, original->spec.type) << id;
    EXPECT_EQ(it->second->label, "label-" + id);
    EXPECT_NE(it->second->public_handle.load(), 0u) << id;
    absl::StatusOr<EvpPkeyPtr> a = token_->PublicKey(*original);
    absl::StatusOr<EvpPkeyPtr> b = token_->PublicKey(*it->second);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(EVP_PKEY_eq(a->get(), b->get()), 1) << id;
  }
  EXPECT_TRUE(token_->DestroyKeyPair("all-ec").ok());
  EXPECT_TRUE(token_->DestroyKeyPair("all-ed").ok());
}

TEST_F(TokenTest, FindKeyPairReadsTheCurve) {
  std::shared_ptr<KeyPair> key = Generate(KeySpec{.type = KeyType::kEcP384}, "find-p384");
  ASSERT_NE(key, nullptr);
  absl::StatusOr<std::shared_ptr<KeyPair>> found = token_->FindKeyPair("find-p384");
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ((*found)->spec.type, KeyType::kEcP384);
  EXPECT_EQ((*found)->private_handle.load(), key->private_handle.load());
  EXPECT_TRUE(token_->DestroyKeyPair("find-p384").ok());
}

TEST_F(TokenTest, ListDestroyAndFindAgreeOnObjects) {
  ASSERT_NE(Generate(KeySpec{.type = KeyType::kEcP256}, "list-a"), nullptr);
  ASSERT_NE(Generate(KeySpec{.type = KeyType::kEd25519}, "list-b"), nullptr);

  absl::StatusOr<std::vector<ObjectInfo>> objects = token_->ListKeyObjects();
  ASSERT_TRUE(objects.ok()) << objects.status();
  int private_a = 0, public_a = 0, private_b = 0, public_b = 0;
  for (const ObjectInfo& object : *objects) {
    if (object.id == "list-a") {
      EXPECT_EQ(object.label, "label-list-a");
      ++(object.is_private_key ? private_a : public_a);
    }
    if (object.id == "list-b") ++(object.is_private_key ? private_b : public_b);
  }
  EXPECT_EQ(private_a, 1);
  EXPECT_EQ(public_a, 1);
  EXPECT_EQ(private_b, 1);
  EXPECT_EQ(public_b, 1);

  ASSERT_TRUE(token_->DestroyKeyPair("list-a").ok());
  EXPECT_TRUE(token_->DestroyKeyPair("list-a").ok()) << "destroy is idempotent";
  EXPECT_EQ(token_->FindKeyPair("list-a").status().code(), absl::StatusCode::kNotFound);
  objects = token_->ListKeyObjects();
  ASSERT_TRUE(objects.ok()) << objects.status();
  for (const ObjectInfo& object : *objects) EXPECT_NE(object.id, "list-a");
  EXPECT_TRUE(token_->DestroyKeyPair("list-b").ok());
}

TEST_F(TokenTest, GenerateRefusesAnIdInUse) {
  ASSERT_NE(Generate(KeySpec{.type = KeyType::kEcP256}, "dup-1"), nullptr);
  absl::StatusOr<std::shared_ptr<KeyPair>> again =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "dup-1", "x");
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(token_->DestroyKeyPair("dup-1").ok());
}

TEST_F(TokenTest, GenerateRejectsUnsupportedRsaSize) {
  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kRsa, .rsa_bits = 1024}, "rsa-1024", "x");
  EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TokenTest, SignRejectsASchemeThatDoesNotFitTheKey) {
  std::shared_ptr<KeyPair> key = Generate(KeySpec{.type = KeyType::kEcP256}, "misfit-1");
  ASSERT_NE(key, nullptr);
  EXPECT_EQ(token_->Sign(*key, SignScheme::kEddsa, "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(token_->Sign(*key, SignScheme::kRsaPkcs1v15, "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(token_->DestroyKeyPair("misfit-1").ok());
}

TEST_F(TokenTest, StaleHandleIsFoundAgainByIdAndCached) {
  std::shared_ptr<KeyPair> key = Generate(KeySpec{.type = KeyType::kEcP256}, "stale-1");
  ASSERT_NE(key, nullptr);
  const uint64_t real_handle = key->private_handle.load();
  key->private_handle.store(0x7fff0001);  // a handle the token never issued

  const std::string digest = Sha256("after a reconnect");
  absl::StatusOr<std::string> signature = token_->Sign(*key, SignScheme::kEcdsa, digest);
  ASSERT_TRUE(signature.ok()) << signature.status();
  EXPECT_EQ(key->private_handle.load(), real_handle);
  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(*key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  EXPECT_TRUE(DigestVerify(public_key->get(), EVP_sha256(), "after a reconnect",
                           RawEcdsaToDer(*signature)));

  ASSERT_TRUE(token_->DestroyKeyPair("stale-1").ok());
  EXPECT_EQ(token_->Sign(*key, SignScheme::kEcdsa, digest).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(TokenTest, EightThreadsSignConcurrentlyOnFourSessions) {
  Token::Options options = OptionsFor(kLabel);
  options.max_sessions = 4;
  options.session_wait = absl::Seconds(30);  // generous: this test is about correctness
  absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(std::move(options));
  ASSERT_TRUE(token.ok()) << token.status();
  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      (*token)->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "concurrent-1", "c");
  ASSERT_TRUE(key.ok()) << key.status();
  absl::StatusOr<EvpPkeyPtr> public_key = (*token)->PublicKey(**key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();

  constexpr int kThreads = 8;
  constexpr int kSignaturesPerThread = 25;
  std::vector<std::vector<std::string>> signatures(kThreads);
  std::vector<absl::Status> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kSignaturesPerThread; ++i) {
        absl::StatusOr<std::string> signature =
            (*token)->Sign(**key, SignScheme::kEcdsa, Sha256(absl::StrCat("message ", t, " ", i)));
        if (!signature.ok()) {
          failures[t] = signature.status();
          return;
        }
        signatures[t].push_back(*std::move(signature));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(failures[t].ok()) << failures[t];
    ASSERT_EQ(signatures[t].size(), static_cast<size_t>(kSignaturesPerThread));
    for (int i = 0; i < kSignaturesPerThread; ++i) {
      EXPECT_TRUE(DigestVerify(public_key->get(), EVP_sha256(), absl::StrCat("message ", t, " ", i),
                               RawEcdsaToDer(signatures[t][i])));
    }
  }
  EXPECT_TRUE((*token)->DestroyKeyPair("concurrent-1").ok());
}

// The pool itself, on the test token: a held lease exhausts a one-session pool.
TEST_F(TokenTest, SessionPoolReportsExhaustionAfterTheWait) {
  absl::StatusOr<std::unique_ptr<Module>> module = Module::Load(TemporarySoftHsm::ModulePath());
  ASSERT_TRUE(module.ok()) << module.status();
  SessionPool pool((*module)->fn(), token_->info().slot_id, Secret(kUserPin), 1,
                   absl::Milliseconds(50));
  absl::StatusOr<SessionPool::Lease> held = pool.Acquire();
  ASSERT_TRUE(held.ok()) << held.status();

  absl::StatusOr<SessionPool::Lease> starved = pool.Acquire();
  ASSERT_FALSE(starved.ok());
  EXPECT_EQ(starved.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(starved.status().message(), "no HSM session free within 50ms");

  const CK_SESSION_HANDLE session = held->get();
  held = absl::CancelledError("returned");  // destroys the lease: the session goes back
  absl::StatusOr<SessionPool::Lease> again = pool.Acquire();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->get(), session) << "the returned session is reused, not a new one opened";
}

TEST_F(TokenTest, SessionPoolHandsAReturnedSessionToAWaiter) {
  absl::StatusOr<std::unique_ptr<Module>> module = Module::Load(TemporarySoftHsm::ModulePath());
  ASSERT_TRUE(module.ok()) << module.status();
  SessionPool pool((*module)->fn(), token_->info().slot_id, Secret(kUserPin), 1, absl::Seconds(60));
  absl::StatusOr<SessionPool::Lease> held = pool.Acquire();
  ASSERT_TRUE(held.ok()) << held.status();

  absl::Notification acquired;
  absl::Status waiter_status;
  std::thread waiter([&] {
    absl::StatusOr<SessionPool::Lease> lease = pool.Acquire();
    waiter_status = lease.status();
    acquired.Notify();
  });
  EXPECT_FALSE(acquired.HasBeenNotified());  // cannot have a session while `held` lives
  held = absl::CancelledError("returned");
  waiter.join();
  EXPECT_TRUE(waiter_status.ok()) << waiter_status;
}

}  // namespace
}  // namespace custody::pkcs11
