// Token decryption (RSA-OAEP, raw RSA), ECDH and key import against a SoftHSM2 token. Expected
// values come from OpenSSL, never from the code under test.
#include <memory>
#include <string>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/rand.h"
#include "openssl/rsa.h"
#include "pkcs11/cryptoki.h"
#include "pkcs11/testing/softhsm_testing.h"
#include "pkcs11/token.h"

namespace custody::pkcs11 {
namespace {

constexpr char kLabel[] = "custody-decrypt";
constexpr char kUserPin[] = "user-pin-1234";
constexpr char kSoPin[] = "so-pin-5678";

// One SoftHSM2 configuration per process (SOFTHSM2_CONF is read at C_Initialize), hence this
// binary's own environment rather than a share of pkcs11_token_test's.
class SoftHsmEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> setup = TemporarySoftHsm::Create();
    ASSERT_TRUE(setup.ok()) << setup.status();
    softhsm_ = std::move(*setup);
    ASSERT_TRUE(Token::InitializeToken(TemporarySoftHsm::ModulePath(), kLabel, Secret(kSoPin),
                                       Secret(kUserPin))
                    .ok());
  }
  void TearDown() override { softhsm_.reset(); }

 private:
  std::unique_ptr<TemporarySoftHsm> softhsm_;
};

const ::testing::Environment* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new SoftHsmEnvironment);

// ---- OpenSSL, the independent implementation -----------------------------------------------

struct PkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter>;
struct EcdsaSigDeleter {
  void operator()(ECDSA_SIG* p) const { ECDSA_SIG_free(p); }
};
struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); }
};

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

std::string RandomBytes(size_t size) {
  std::string out(size, '\0');
  EXPECT_EQ(RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), size), 1);
  return out;
}

// RSA encryption with OpenSSL; `md` null for RSA_NO_PADDING, else OAEP with `md` and MGF1-`md`.
std::string RsaEncrypt(EVP_PKEY* pkey, const char* md, std::string_view message) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  EXPECT_EQ(EVP_PKEY_encrypt_init(ctx.get()), 1);
  if (md == nullptr) {
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_NO_PADDING), 1);
  } else {
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING), 1);
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx.get(), md, nullptr), 1);
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx.get(), md, nullptr), 1);
  }
  size_t size = 0;
  EXPECT_EQ(EVP_PKEY_encrypt(ctx.get(), nullptr, &size, Bytes(message), message.size()), 1);
  std::string out(size, '\0');
  EXPECT_EQ(EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size,
                             Bytes(message), message.size()),
            1);
  out.resize(size);
  return out;
}

// ECDH Z (the x-coordinate, field-size bytes) computed by OpenSSL.
std::string OpenSslEcdh(EVP_PKEY* private_key, EVP_PKEY* peer_public_key) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, private_key, nullptr));
  EXPECT_EQ(EVP_PKEY_derive_init(ctx.get()), 1);
  EXPECT_EQ(EVP_PKEY_derive_set_peer(ctx.get(), peer_public_key), 1);
  size_t size = 0;
  EXPECT_EQ(EVP_PKEY_derive(ctx.get(), nullptr, &size), 1);
  std::string out(size, '\0');
  EXPECT_EQ(EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size), 1);
  out.resize(size);
  return out;
}

std::string UncompressedPoint(EVP_PKEY* pkey) {
  unsigned char point[133];
  size_t size = 0;
  EXPECT_EQ(EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point,
                                            sizeof(point), &size),
            1);
  return std::string(reinterpret_cast<char*>(point), size);
}

const char* CurveName(KeyType type) {
  switch (type) {
    case KeyType::kEcP256:
      return "P-256";
    case KeyType::kEcP384:
      return "P-384";
    default:
      return "P-521";
  }
}

EvpPkeyPtr GenerateEcKey(KeyType type) {
  return EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", CurveName(type)));
}

// Verifies, with OpenSSL and `public_key`, a signature the token made over `message`.
bool VerifiesWithOpenSsl(EVP_PKEY* public_key, KeyType type, std::string_view message,
                         std::string_view token_signature) {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  EVP_PKEY_CTX* pctx = nullptr;
  const EVP_MD* md = type == KeyType::kEd25519 ? nullptr : EVP_sha256();
  if (EVP_DigestVerifyInit(ctx.get(), &pctx, md, nullptr, public_key) != 1) return false;
  std::string signature(token_signature);
  if (type == KeyType::kRsa) {
    if (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32) != 1) {
      return false;
    }
  } else if (type != KeyType::kEd25519) {
    // r||s → DER ECDSA-Sig-Value.
    const size_t half = signature.size() / 2;
    std::unique_ptr<ECDSA_SIG, EcdsaSigDeleter> sig(ECDSA_SIG_new());
    if (ECDSA_SIG_set0(sig.get(), BN_bin2bn(Bytes(signature), half, nullptr),
                       BN_bin2bn(Bytes(signature) + half, half, nullptr)) != 1) {
      return false;
    }
    unsigned char* der = nullptr;
    const int size = i2d_ECDSA_SIG(sig.get(), &der);
    if (size <= 0) return false;
    signature.assign(reinterpret_cast<char*>(der), size);
    OPENSSL_free(der);
  }
  return EVP_DigestVerify(ctx.get(), Bytes(signature), signature.size(), Bytes(message),
                          message.size()) == 1;
}

std::string Sha256(std::string_view message) {
  unsigned char digest[32];
  unsigned int size = 0;
  EXPECT_EQ(EVP_Digest(message.data(), message.size(), digest, &size, EVP_sha256(), nullptr), 1);
  return std::string(reinterpret_cast<char*>(digest), size);
}

// ---- AlignRight (no token) -----------------------------------------------------------------

TEST(AlignRightTest, MovesTheBytesToTheEndAndZeroFillsTheFront) {
  for (size_t size : {1u, 2u, 7u, 256u, 257u, 512u}) {
    for (size_t length = 0; length <= size; length += (size > 16 ? 37 : 1)) {
      std::string message = RandomBytes(size);
      std::string buffer = message.substr(size - length) + std::string(size - length, 'x');
      AlignRight(buffer, length);
      EXPECT_EQ(buffer, std::string(size - length, '\0') + message.substr(size - length))
          << size << " " << length;
    }
  }
}

// ---- Against a SoftHSM2 token --------------------------------------------------------------

class DecryptTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    Token::Options options;
    options.module_path = TemporarySoftHsm::ModulePath();
    options.selector.label = kLabel;
    options.pin = Secret(kUserPin);
    absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(std::move(options));
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = std::move(*token).release();
  }
  static void TearDownTestSuite() {
    delete token_;
    token_ = nullptr;
  }

  // A decryption key pair generated in the token, and its public key as OpenSSL reads it.
  std::shared_ptr<KeyPair> GenerateForDecryption(const KeySpec& spec, const std::string& id,
                                                 EvpPkeyPtr* public_key) {
    absl::StatusOr<std::shared_ptr<KeyPair>> key =
        token_->GenerateKeyPair(spec, id, id, /*for_decryption=*/true);
    EXPECT_TRUE(key.ok()) << key.status();
    if (!key.ok()) return nullptr;
    absl::StatusOr<EvpPkeyPtr> pkey = token_->PublicKey(**key);
    EXPECT_TRUE(pkey.ok()) << pkey.status();
    if (!pkey.ok()) return nullptr;
    *public_key = *std::move(pkey);
    return *key;
  }

  static Token* token_;
};

Token* DecryptTest::token_ = nullptr;

// Measured on SoftHSM2 2.6.1: it runs CKM_RSA_PKCS_OAEP only with SHA-1/MGF1-SHA1 and answers
// CKR_ARGUMENTS_BAD to SHA-256 parameters. A newer SoftHSM2 that accepts SHA-256 fails here on
// purpose, so that the fallback to raw RSA is looked at again.
TEST_F(DecryptTest, OaepSupportedIsSha1OnlyOnSoftHsm2) {
  EXPECT_TRUE(token_->HasMechanism("CKM_RSA_PKCS_OAEP"));
  EXPECT_TRUE(token_->OaepSupported(OaepHash::kSha1));
  EXPECT_FALSE(token_->OaepSupported(OaepHash::kSha256));
  // Cached: the same answers again.
  EXPECT_TRUE(token_->OaepSupported(OaepHash::kSha1));
  EXPECT_FALSE(token_->OaepSupported(OaepHash::kSha256));
}

TEST_F(DecryptTest, OaepSha1DecryptsWhatOpenSslEncrypted) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = GenerateForDecryption(
      KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "oaep-1", &public_key);
  ASSERT_NE(key, nullptr);
  // 214 = 256 - 2*20 - 2, the longest OAEP-SHA-1 message under a 2048-bit key.
  for (size_t size : {0u, 1u, 16u, 32u, 214u}) {
    const std::string message = RandomBytes(size);
    const std::string ciphertext = RsaEncrypt(public_key.get(), "SHA1", message);
    ASSERT_EQ(ciphertext.size(), 256u);
    absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(*key, OaepHash::kSha1, ciphertext);
    ASSERT_TRUE(plaintext.ok()) << plaintext.status();
    EXPECT_EQ(std::string(plaintext->view()), message) << size;
  }
  EXPECT_TRUE(token_->DestroyKeyPair("oaep-1").ok());
}

TEST_F(DecryptTest, EveryOaepFailureIsTheSameDecryptionFailed) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = GenerateForDecryption(
      KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "oaep-2", &public_key);
  ASSERT_NE(key, nullptr);
  const std::string ciphertext = RsaEncrypt(public_key.get(), "SHA1", "a content encryption key");

  std::string flipped = ciphertext;
  flipped[100] ^= 0x01;
  // A well-formed OAEP ciphertext under another key: the padding check fails.
  EvpPkeyPtr other(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048}));
  ASSERT_NE(other, nullptr);
  const std::string other_key = RsaEncrypt(other.get(), "SHA1", "a content encryption key");
  const std::string above_modulus(256, '\xff');

  for (const std::string& bad :
       {flipped, other_key, above_modulus, ciphertext.substr(1), ciphertext + "x", std::string()}) {
    absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(*key, OaepHash::kSha1, bad);
    ASSERT_FALSE(plaintext.ok());
    EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(plaintext.status().message(), "decryption failed");
  }
  // The session pool is still healthy afterwards.
  absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(*key, OaepHash::kSha1, ciphertext);
  ASSERT_TRUE(plaintext.ok()) << plaintext.status();
  EXPECT_EQ(plaintext->view(), "a content encryption key");
  EXPECT_TRUE(token_->DestroyKeyPair("oaep-2").ok());
}

// SoftHSM2 2.6.1 refuses OAEP with SHA-256 (CKR_ARGUMENTS_BAD at C_DecryptInit).
TEST_F(DecryptTest, OaepSha256IsUnimplementedOnSoftHsm2) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = GenerateForDecryption(
      KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "oaep-3", &public_key);
  ASSERT_NE(key, nullptr);
  const std::string ciphertext = RsaEncrypt(public_key.get(), "SHA256", "cek");
  absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(*key, OaepHash::kSha256, ciphertext);
  ASSERT_FALSE(plaintext.ok());
  EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kUnimplemented) << plaintext.status();
  EXPECT_TRUE(absl::StrContains(plaintext.status().message(), "token refuses OAEP with SHA-256"))
      << plaintext.status();
  EXPECT_TRUE(token_->DestroyKeyPair("oaep-3").ok());
}

TEST_F(DecryptTest, RawRsaReturnsKBytesThatReencryptToTheCiphertext) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key =
      GenerateForDecryption(KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "raw-1", &public_key);
  ASSERT_NE(key, nullptr);
  // An OAEP-SHA-256 ciphertext (what the raw path exists for): the token returns EM, and
  // EM^e mod n, computed by OpenSSL without padding, is the ciphertext again.
  const std::string ciphertext = RsaEncrypt(public_key.get(), "SHA256", "a content key");
  absl::StatusOr<Secret> encoded = token_->DecryptRsaRaw(*key, ciphertext);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  ASSERT_EQ(encoded->size(), 256u);
  EXPECT_EQ(encoded->view()[0], '\0') << "an OAEP encoded message starts with 0x00";
  EXPECT_EQ(RsaEncrypt(public_key.get(), nullptr, std::string(encoded->view())), ciphertext);

  // A message with leading zero bytes comes back with them, still k bytes.
  const std::string message = std::string(3, '\0') + "\x01" + RandomBytes(252);
  absl::StatusOr<Secret> raw =
      token_->DecryptRsaRaw(*key, RsaEncrypt(public_key.get(), nullptr, message));
  ASSERT_TRUE(raw.ok()) << raw.status();
  EXPECT_EQ(std::string(raw->view()), message);

  for (const std::string& bad :
       {ciphertext.substr(1), ciphertext + "x", std::string(256, '\xff')}) {
    absl::StatusOr<Secret> failed = token_->DecryptRsaRaw(*key, bad);
    ASSERT_FALSE(failed.ok());
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(failed.status().message(), "decryption failed");
  }
  EXPECT_TRUE(token_->DestroyKeyPair("raw-1").ok());
}

TEST_F(DecryptTest, SigningAndDecryptionKeysAreKeptApart) {
  absl::StatusOr<std::shared_ptr<KeyPair>> ec =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "not-rsa", "x", true);
  ASSERT_TRUE(ec.ok()) << ec.status();
  EXPECT_EQ(token_->DecryptRsaOaep(**ec, OaepHash::kSha1, std::string(256, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(token_->DecryptRsaRaw(**ec, std::string(256, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);

  // A signing key (no CKA_DECRYPT): the token says CKR_KEY_FUNCTION_NOT_PERMITTED at Init.
  absl::StatusOr<std::shared_ptr<KeyPair>> signing = token_->GenerateKeyPair(
      KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "sign-only", "x", false);
  ASSERT_TRUE(signing.ok()) << signing.status();
  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(**signing);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(
      **signing, OaepHash::kSha1, RsaEncrypt(public_key->get(), "SHA1", "cek"));
  EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kInvalidArgument) << plaintext.status();
  EXPECT_TRUE(absl::StrContains(plaintext.status().message(), "C_DecryptInit"))
      << plaintext.status();
  // And the other way round: a decryption key does not sign.
  absl::StatusOr<std::string> signature =
      token_->Sign(**ec, SignScheme::kEcdsa, Sha256("not for signing"));
  EXPECT_EQ(signature.status().code(), absl::StatusCode::kInvalidArgument) << signature.status();
  EXPECT_TRUE(token_->DestroyKeyPair("not-rsa").ok());
  EXPECT_TRUE(token_->DestroyKeyPair("sign-only").ok());
}

TEST_F(DecryptTest, StaleHandleIsFoundAgainForDecryption) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = GenerateForDecryption(
      KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "stale-d", &public_key);
  ASSERT_NE(key, nullptr);
  const uint64_t real_handle = key->private_handle.load();
  key->private_handle.store(0x7fff0002);
  absl::StatusOr<Secret> plaintext =
      token_->DecryptRsaOaep(*key, OaepHash::kSha1, RsaEncrypt(public_key.get(), "SHA1", "cek"));
  ASSERT_TRUE(plaintext.ok()) << plaintext.status();
  EXPECT_EQ(plaintext->view(), "cek");
  EXPECT_EQ(key->private_handle.load(), real_handle);
  EXPECT_TRUE(token_->DestroyKeyPair("stale-d").ok());
}

class EcdhTest : public DecryptTest, public ::testing::WithParamInterface<KeyType> {};

TEST_P(EcdhTest, SharedSecretEqualsOpenSslEcdh) {
  const KeyType type = GetParam();
  EvpPkeyPtr token_public;
  const std::string id = absl::StrCat("ecdh-", CurveName(type));
  std::shared_ptr<KeyPair> key = GenerateForDecryption(KeySpec{.type = type}, id, &token_public);
  ASSERT_NE(key, nullptr);
  EvpPkeyPtr peer = GenerateEcKey(type);
  ASSERT_NE(peer, nullptr);

  absl::StatusOr<Secret> z = token_->DeriveEcdh(*key, UncompressedPoint(peer.get()));
  ASSERT_TRUE(z.ok()) << z.status();
  const std::string expected = OpenSslEcdh(peer.get(), token_public.get());
  EXPECT_EQ(expected.size(), type == KeyType::kEcP256 ? 32u : type == KeyType::kEcP384 ? 48u : 66u);
  EXPECT_EQ(std::string(z->view()), expected);

  // Not an uncompressed point of this curve: refused before the token sees it.
  std::string compressed = UncompressedPoint(peer.get()).substr(0, expected.size() + 1);
  compressed[0] = '\x02';
  EXPECT_EQ(token_->DeriveEcdh(*key, compressed).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(token_->DestroyKeyPair(id).ok());
}

INSTANTIATE_TEST_SUITE_P(Curves, EcdhTest,
                         ::testing::Values(KeyType::kEcP256, KeyType::kEcP384, KeyType::kEcP521),
                         [](const auto& info) {
                           std::string name = CurveName(info.param);
                           name.erase(1, 1);  // "P256": test names are alphanumeric
                           return name;
                         });

TEST_F(DecryptTest, EcdhRefusesKeysWithoutDerive) {
  absl::StatusOr<std::shared_ptr<KeyPair>> signing =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "ecdh-sign-only", "x", false);
  ASSERT_TRUE(signing.ok()) << signing.status();
  EvpPkeyPtr peer = GenerateEcKey(KeyType::kEcP256);
  absl::StatusOr<Secret> z = token_->DeriveEcdh(**signing, UncompressedPoint(peer.get()));
  EXPECT_EQ(z.status().code(), absl::StatusCode::kInvalidArgument) << z.status();
  EXPECT_TRUE(token_->DestroyKeyPair("ecdh-sign-only").ok());

  absl::StatusOr<std::shared_ptr<KeyPair>> ed =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEd25519}, "ecdh-ed", "x", false);
  ASSERT_TRUE(ed.ok()) << ed.status();
  EXPECT_EQ(token_->DeriveEcdh(**ed, UncompressedPoint(peer.get())).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(token_->DestroyKeyPair("ecdh-ed").ok());
}

// ---- ImportKeyPair -------------------------------------------------------------------------

EvpPkeyPtr GenerateOpenSslKey(KeyType type) {
  switch (type) {
    case KeyType::kRsa:
      return EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048}));
    case KeyType::kEd25519:
      return EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
    default:
      return GenerateEcKey(type);
  }
}

class ImportTest : public DecryptTest,
                   public ::testing::WithParamInterface<std::tuple<KeyType, bool>> {};

TEST_P(ImportTest, ImportedKeyWorksAndMatchesTheOriginal) {
  const auto [type, for_decryption] = GetParam();
  const std::string id =
      absl::StrCat("import-", static_cast<int>(type), for_decryption ? "-dec" : "-sig");
  EvpPkeyPtr original = GenerateOpenSslKey(type);
  ASSERT_NE(original, nullptr);

  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      token_->ImportKeyPair(original.get(), id, "imported", for_decryption);
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ((*key)->spec.type, type);
  EXPECT_EQ((*key)->spec.rsa_bits, type == KeyType::kRsa ? 2048 : 0);

  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(**key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  EXPECT_EQ(EVP_PKEY_eq(public_key->get(), original.get()), 1);

  absl::StatusOr<PrivateKeyAttributes> attributes = token_->GetPrivateKeyAttributes(**key);
  ASSERT_TRUE(attributes.ok()) << attributes.status();
  EXPECT_TRUE(attributes->token);
  EXPECT_TRUE(attributes->is_private);
  EXPECT_TRUE(attributes->sensitive);
  EXPECT_FALSE(attributes->extractable);

  if (!for_decryption) {
    const std::string message = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJpbXBvcnQifQ";
    const SignScheme scheme = type == KeyType::kRsa       ? SignScheme::kRsaPssSha256
                              : type == KeyType::kEd25519 ? SignScheme::kEddsa
                                                          : SignScheme::kEcdsa;
    absl::StatusOr<std::string> signature =
        token_->Sign(**key, scheme, type == KeyType::kEd25519 ? message : Sha256(message));
    ASSERT_TRUE(signature.ok()) << signature.status();
    EXPECT_TRUE(VerifiesWithOpenSsl(original.get(), type, message, *signature));
  } else if (type == KeyType::kRsa) {
    absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(
        **key, OaepHash::kSha1, RsaEncrypt(original.get(), "SHA1", "imported cek"));
    ASSERT_TRUE(plaintext.ok()) << plaintext.status();
    EXPECT_EQ(plaintext->view(), "imported cek");
  } else {
    EvpPkeyPtr peer = GenerateEcKey(type);
    absl::StatusOr<Secret> z = token_->DeriveEcdh(**key, UncompressedPoint(peer.get()));
    ASSERT_TRUE(z.ok()) << z.status();
    EXPECT_EQ(std::string(z->view()), OpenSslEcdh(original.get(), peer.get()));
  }

  // Found again by id, with the same spec.
  absl::StatusOr<std::shared_ptr<KeyPair>> found = token_->FindKeyPair(id);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ((*found)->spec.type, type);

  absl::StatusOr<std::shared_ptr<KeyPair>> again =
      token_->ImportKeyPair(original.get(), id, "imported", for_decryption);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
  EXPECT_TRUE(token_->DestroyKeyPair(id).ok());
}

INSTANTIATE_TEST_SUITE_P(Keys, ImportTest,
                         ::testing::Values(std::make_tuple(KeyType::kRsa, false),
                                           std::make_tuple(KeyType::kRsa, true),
                                           std::make_tuple(KeyType::kEcP256, false),
                                           std::make_tuple(KeyType::kEcP256, true),
                                           std::make_tuple(KeyType::kEcP384, false),
                                           std::make_tuple(KeyType::kEcP384, true),
                                           std::make_tuple(KeyType::kEcP521, true),
                                           std::make_tuple(KeyType::kEd25519, false)),
                         [](const auto& info) {
                           const KeyType type = std::get<0>(info.param);
                           std::string name = type == KeyType::kRsa       ? "Rsa2048"
                                              : type == KeyType::kEd25519 ? "Ed25519"
                                                                          : CurveName(type);
                           if (name[1] == '-') name.erase(1, 1);
                           return absl::StrCat(name,
                                               std::get<1>(info.param) ? "Decryption" : "Signing");
                         });

TEST_F(DecryptTest, ImportRefusesWhatItCannotImport) {
  EvpPkeyPtr ed = GenerateOpenSslKey(KeyType::kEd25519);
  EXPECT_EQ(token_->ImportKeyPair(ed.get(), "bad-1", "x", true).status().code(),
            absl::StatusCode::kInvalidArgument);

  EvpPkeyPtr small(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{1024}));
  EXPECT_EQ(token_->ImportKeyPair(small.get(), "bad-2", "x", false).status().code(),
            absl::StatusCode::kInvalidArgument);

  EvpPkeyPtr x25519(EVP_PKEY_Q_keygen(nullptr, nullptr, "X25519"));
  EXPECT_EQ(token_->ImportKeyPair(x25519.get(), "bad-3", "x", true).status().code(),
            absl::StatusCode::kInvalidArgument);

  EvpPkeyPtr k256(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "secp256k1"));
  EXPECT_EQ(token_->ImportKeyPair(k256.get(), "bad-4", "x", false).status().code(),
            absl::StatusCode::kInvalidArgument);

  // A public key only (what the token itself hands out).
  absl::StatusOr<std::shared_ptr<KeyPair>> generated =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "public-source", "x");
  ASSERT_TRUE(generated.ok()) << generated.status();
  absl::StatusOr<EvpPkeyPtr> public_only = token_->PublicKey(**generated);
  ASSERT_TRUE(public_only.ok()) << public_only.status();
  EXPECT_EQ(token_->ImportKeyPair(public_only->get(), "bad-5", "x", false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(token_->ImportKeyPair(ed.get(), "", "x", false).status().code(),
            absl::StatusCode::kInvalidArgument);

  // Nothing was left behind by the refusals.
  absl::StatusOr<std::vector<ObjectInfo>> objects = token_->ListKeyObjects();
  ASSERT_TRUE(objects.ok()) << objects.status();
  for (const ObjectInfo& object : *objects)
    EXPECT_FALSE(absl::StartsWith(object.id, "bad-")) << object.id;
  EXPECT_TRUE(token_->DestroyKeyPair("public-source").ok());
}

}  // namespace
}  // namespace custody::pkcs11
