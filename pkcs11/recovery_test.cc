// Recovery from token failures, back-pressure, health and metrics. A real SoftHSM2 cannot be
// made to fail on demand, so the Token loads the fault-injecting module (testing/
// fault_module.cc) which forwards to SoftHSM2; the test drives its faults through the control
// functions found with dlopen(RTLD_NOLOAD) + dlsym. Signatures and plaintexts are checked with
// OpenSSL, never with the code under test.
#include <dlfcn.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "openssl/bn.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/rsa.h"
#include "pkcs11/cryptoki.h"
#include "pkcs11/testing/fault_module.h"
#include "pkcs11/testing/softhsm_testing.h"
#include "pkcs11/token.h"

namespace custody::pkcs11 {
namespace {

constexpr char kFaultModule[] = CUSTODY_FAULT_MODULE;
constexpr char kLabel[] = "custody-recovery";
constexpr char kUserPin[] = "user-pin-1234";
constexpr char kSoPin[] = "so-pin-5678";

// The fault module's control functions (fault_module.h), from the copy the Token loaded.
struct Faults {
  decltype(&custody_fault_inject) inject = nullptr;
  decltype(&custody_fault_inject_ex) inject_ex = nullptr;
  decltype(&custody_fault_inject_leaving_operation_active) leave_active = nullptr;
  decltype(&custody_fault_close_all_sessions) close_all_sessions = nullptr;
  decltype(&custody_fault_device_removed) device_removed = nullptr;
  decltype(&custody_fault_delay_ms) delay_ms = nullptr;
  decltype(&custody_fault_calls) calls = nullptr;
  decltype(&custody_fault_reset) reset = nullptr;
};

template <typename F>
void Bind(void* library, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(library, name));
  ASSERT_NE(out, nullptr) << name;
}

TemporarySoftHsm* softhsm = nullptr;

class FaultModuleEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> setup = TemporarySoftHsm::Create();
    ASSERT_TRUE(setup.ok()) << setup.status();
    owned_ = std::move(*setup);
    softhsm = owned_.get();
    ASSERT_EQ(setenv("CUSTODY_FAULT_REAL_MODULE", TemporarySoftHsm::ModulePath().c_str(), 1), 0);
    absl::Status initialized =
        Token::InitializeToken(kFaultModule, kLabel, Secret(kSoPin), Secret(kUserPin));
    ASSERT_TRUE(initialized.ok()) << initialized;
  }
  void TearDown() override {
    softhsm = nullptr;
    owned_.reset();
  }

 private:
  std::unique_ptr<TemporarySoftHsm> owned_;
};

const ::testing::Environment* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new FaultModuleEnvironment);

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

// ES256 r||s verified over `message` with OpenSSL.
bool VerifyEs256(EVP_PKEY* pkey, std::string_view message, std::string_view raw) {
  if (raw.size() != 64) return false;
  std::unique_ptr<ECDSA_SIG, EcdsaSigDeleter> sig(ECDSA_SIG_new());
  BIGNUM* r = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()), 32, nullptr);
  BIGNUM* s = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()) + 32, 32, nullptr);
  if (ECDSA_SIG_set0(sig.get(), r, s) != 1) return false;
  unsigned char* der = nullptr;
  const int der_size = i2d_ECDSA_SIG(sig.get(), &der);
  if (der_size <= 0) return false;
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  const bool ok =
      EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, pkey) == 1 &&
      EVP_DigestVerify(ctx.get(), der, der_size,
                       reinterpret_cast<const unsigned char*>(message.data()), message.size()) == 1;
  OPENSSL_free(der);
  return ok;
}

std::string OaepSha1Encrypt(EVP_PKEY* pkey, std::string_view message) {
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  size_t size = 0;
  const auto* in = reinterpret_cast<const unsigned char*>(message.data());
  EXPECT_EQ(EVP_PKEY_encrypt_init(ctx.get()), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx.get(), "SHA1", nullptr), 1);
  EXPECT_EQ(EVP_PKEY_encrypt(ctx.get(), nullptr, &size, in, message.size()), 1);
  std::string out(size, '\0');
  EXPECT_EQ(EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size, in,
                             message.size()),
            1);
  out.resize(size);
  return out;
}

uint64_t Count(const Token::Metrics& metrics, const std::string& ckr) {
  auto it = metrics.errors.find(ckr);
  return it == metrics.errors.end() ? 0 : it->second;
}

// ---- Fixture: a Token on the fault module per test -----------------------------------------

class RecoveryTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(OpenToken(4, std::nullopt)); }

  void TearDown() override {
    if (faults_.reset != nullptr) faults_.reset();
    token_.reset();
  }

  void OpenToken(size_t max_sessions, std::optional<size_t> max_waiters,
                 absl::Duration reinit_backoff = absl::Milliseconds(50),
                 absl::Duration reinit_backoff_max = absl::Seconds(2)) {
    if (faults_.reset != nullptr) faults_.reset();
    token_.reset();
    Token::Options options;
    options.module_path = kFaultModule;
    options.selector.label = kLabel;
    options.pin = Secret(kUserPin);
    options.max_sessions = max_sessions;
    options.max_waiters = max_waiters;
    options.session_wait = absl::Seconds(5);
    options.reinit_backoff = reinit_backoff;
    options.reinit_backoff_max = reinit_backoff_max;
    absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(std::move(options));
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = std::move(*token);
    // Loaded by Token::Open: NOLOAD finds that copy, whose state the Token sees.
    void* library = dlopen(kFaultModule, RTLD_NOW | RTLD_NOLOAD);
    ASSERT_NE(library, nullptr) << dlerror();
    ASSERT_NO_FATAL_FAILURE(Bind(library, "custody_fault_inject", faults_.inject));
    ASSERT_NO_FATAL_FAILURE(Bind(library, "custody_fault_inject_ex", faults_.inject_ex));
    ASSERT_NO_FATAL_FAILURE(
        Bind(library, "custody_fault_inject_leaving_operation_active", faults_.leave_active));
    ASSERT_NO_FATAL_FAILURE(
        Bind(library, "custody_fault_close_all_sessions", faults_.close_all_sessions));
    ASSERT_NO_FATAL_FAILURE(Bind(library, "custody_fault_device_removed", faults_.device_removed));
    ASSERT_NO_FATAL_FAILURE(Bind(library, "custody_fault_delay_ms", faults_.delay_ms));
    ASSERT_NO_FATAL_FAILURE(Bind(library, "custody_fault_calls", faults_.calls));
    ASSERT_NO_FATAL_FAILURE(Bind(library, "custody_fault_reset", faults_.reset));
    faults_.reset();
  }

  // A key pair made in the token (by default an EC P-256 signing key) and its public key as
  // OpenSSL reads it.
  std::shared_ptr<KeyPair> Generate(const std::string& id, EvpPkeyPtr* public_key,
                                    const KeySpec& spec = KeySpec{.type = KeyType::kEcP256},
                                    bool for_decryption = false) {
    absl::StatusOr<std::shared_ptr<KeyPair>> key =
        token_->GenerateKeyPair(spec, id, id, for_decryption);
    EXPECT_TRUE(key.ok()) << key.status();
    if (!key.ok()) return nullptr;
    absl::StatusOr<EvpPkeyPtr> pkey = token_->PublicKey(**key);
    EXPECT_TRUE(pkey.ok()) << pkey.status();
    if (pkey.ok()) *public_key = std::move(*pkey);
    return *key;
  }

  // An RSA-2048 decryption key and its public key.
  std::shared_ptr<KeyPair> GenerateRsa(const std::string& id, EvpPkeyPtr* public_key) {
    return Generate(id, public_key, KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048},
                    /*for_decryption=*/true);
  }

  // Signs `message` (ES256) and checks the signature with OpenSSL.
  absl::Status SignAndVerify(const KeyPair& key, EVP_PKEY* public_key, std::string_view message) {
    absl::StatusOr<std::string> signature = token_->Sign(key, SignScheme::kEcdsa, Sha256(message));
    if (!signature.ok()) return signature.status();
    if (!VerifyEs256(public_key, message, *signature)) {
      return absl::InternalError("signature does not verify");
    }
    return absl::OkStatus();
  }

  bool HasObjectWithId(const std::string& id) {
    absl::StatusOr<std::vector<ObjectInfo>> objects = token_->ListKeyObjects();
    EXPECT_TRUE(objects.ok()) << objects.status();
    if (!objects.ok()) return true;
    for (const ObjectInfo& object : *objects) {
      if (object.id == id) return true;
    }
    return false;
  }

  std::unique_ptr<Token> token_;
  Faults faults_;
};

// ---- One fault: the operation succeeds transparently ----------------------------------------

class RecoverableErrorTest : public RecoveryTest, public ::testing::WithParamInterface<CK_RV> {};

TEST_P(RecoverableErrorTest, SignFailingOnceIsRetriedAndCounted) {
  const CK_RV rv = GetParam();
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate(absl::StrCat("once-", rv), &public_key);
  ASSERT_NE(key, nullptr);
  const Token::Metrics before = token_->GetMetrics();

  faults_.inject("C_Sign", rv, 1);
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "retried once");
  ASSERT_TRUE(signed_ok.ok()) << signed_ok;

  const Token::Metrics after = token_->GetMetrics();
  EXPECT_EQ(after.retries - before.retries, 1u);
  EXPECT_EQ(Count(after, CkrName(rv)) - Count(before, CkrName(rv)), 1u);
  EXPECT_EQ(faults_.calls("C_Sign"), 2u);
  const bool module_level = rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT;
  const bool handle_level = rv == CKR_OBJECT_HANDLE_INVALID;
  EXPECT_EQ(after.module_reinitializations - before.module_reinitializations,
            module_level ? 1u : 0u);
  EXPECT_EQ(after.recoveries - before.recoveries, handle_level ? 0u : 1u);
  EXPECT_EQ(after.sign.count - before.sign.count, 1u);
  EXPECT_TRUE(token_->Healthy());
  EXPECT_TRUE(token_->DestroyKeyPair(key->id).ok());
}

TEST_P(RecoverableErrorTest, SignFailingTwiceIsUnavailableNamingTheCkr) {
  const CK_RV rv = GetParam();
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate(absl::StrCat("twice-", rv), &public_key);
  ASSERT_NE(key, nullptr);

  faults_.inject("C_Sign", rv, 2);
  absl::StatusOr<std::string> signature =
      token_->Sign(*key, SignScheme::kEcdsa, Sha256("fails twice"));
  ASSERT_FALSE(signature.ok());
  EXPECT_EQ(signature.status().code(), absl::StatusCode::kUnavailable) << signature.status();
  EXPECT_EQ(signature.status().message(), absl::StrCat("C_Sign: ", CkrName(rv)));
  EXPECT_EQ(faults_.calls("C_Sign"), 2u) << "retried once, not more";
  EXPECT_FALSE(token_->Healthy());

  // The fault is spent: the next request works and the token is healthy again.
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "after the fault");
  EXPECT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_TRUE(token_->Healthy());
  EXPECT_TRUE(token_->DestroyKeyPair(key->id).ok());
}

INSTANTIATE_TEST_SUITE_P(Ckr, RecoverableErrorTest,
                         ::testing::Values(CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
                                           CKR_USER_NOT_LOGGED_IN, CKR_DEVICE_REMOVED,
                                           CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_ERROR,
                                           CKR_OBJECT_HANDLE_INVALID),
                         [](const ::testing::TestParamInfo<CK_RV>& info) {
                           return CkrName(info.param);
                         });

TEST_F(RecoveryTest, OtherTokenErrorsAreNotRetried) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("not-retried", &public_key);
  ASSERT_NE(key, nullptr);
  faults_.inject("C_Sign", CKR_KEY_FUNCTION_NOT_PERMITTED, 1);
  absl::StatusOr<std::string> signature = token_->Sign(*key, SignScheme::kEcdsa, Sha256("m"));
  EXPECT_EQ(signature.status().code(), absl::StatusCode::kInvalidArgument) << signature.status();
  EXPECT_EQ(faults_.calls("C_Sign"), 1u);
  EXPECT_EQ(token_->GetMetrics().retries, 0u);
  EXPECT_EQ(Count(token_->GetMetrics(), "CKR_KEY_FUNCTION_NOT_PERMITTED"), 1u);
  // The same failure by Cryptoki function (what custody_hsm_errors_total exports).
  const auto by_function = token_->GetMetrics().errors_by_function;
  ASSERT_EQ(by_function.size(), 1u);
  EXPECT_EQ(by_function.begin()->first,
            std::make_pair(std::string("C_Sign"), std::string("CKR_KEY_FUNCTION_NOT_PERMITTED")));
  EXPECT_EQ(by_function.begin()->second, 1u);
  EXPECT_TRUE(token_->DestroyKeyPair("not-retried").ok());
}

// ---- Sessions, module and handles ----------------------------------------------------------

TEST_F(RecoveryTest, SessionsClosedBehindOurBackAreReopenedAndLoggedIn) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("closed-1", &public_key);
  ASSERT_NE(key, nullptr);
  const Token::Metrics before = token_->GetMetrics();
  faults_.reset();  // call counts from here

  faults_.close_all_sessions();  // also logs the application out
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "after close-all");
  ASSERT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_GE(faults_.calls("C_OpenSession"), 1u);
  EXPECT_GE(faults_.calls("C_Login"), 1u);

  const Token::Metrics after = token_->GetMetrics();
  EXPECT_EQ(
      Count(after, "CKR_SESSION_HANDLE_INVALID") - Count(before, "CKR_SESSION_HANDLE_INVALID"), 1u);
  EXPECT_EQ(after.retries - before.retries, 1u);
  EXPECT_EQ(after.recoveries - before.recoveries, 1u);
  EXPECT_TRUE(token_->Healthy());
  // And the pool keeps working with what it re-opened.
  for (int i = 0; i < 3; ++i) {
    signed_ok = SignAndVerify(*key, public_key.get(), absl::StrCat("again ", i));
    EXPECT_TRUE(signed_ok.ok()) << signed_ok;
  }
  EXPECT_TRUE(token_->DestroyKeyPair("closed-1").ok());
}

TEST_F(RecoveryTest, DeviceRemovedReinitializesTheModuleAndFindsHandlesAgain) {
  EvpPkeyPtr public_a;
  EvpPkeyPtr public_b;
  std::shared_ptr<KeyPair> a = Generate("removed-a", &public_a);
  std::shared_ptr<KeyPair> b = Generate("removed-b", &public_b);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const uint64_t generation = a->handle_generation.load();

  faults_.device_removed(1);  // until the next C_Finalize/C_Initialize
  absl::Status signed_ok = SignAndVerify(*b, public_b.get(), "after re-initialization");
  ASSERT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_EQ(faults_.calls("C_Finalize"), 1u);
  EXPECT_EQ(faults_.calls("C_Initialize"), 1u);
  EXPECT_EQ(token_->GetMetrics().module_reinitializations, 1u);
  EXPECT_EQ(Count(token_->GetMetrics(), "CKR_DEVICE_REMOVED"), 1u);
  EXPECT_GT(b->handle_generation.load(), generation);

  // The module numbers objects afresh after C_Initialize, so a's old handle values may now
  // name b's objects: a must be found again by CKA_ID, which the signature proves.
  EXPECT_EQ(a->handle_generation.load(), generation);
  signed_ok = SignAndVerify(*a, public_a.get(), "a, after re-initialization");
  ASSERT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_GT(a->handle_generation.load(), generation);
  absl::StatusOr<EvpPkeyPtr> again = token_->PublicKey(*a);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(EVP_PKEY_eq(again->get(), public_a.get()), 1);
  EXPECT_TRUE(token_->Healthy());
  EXPECT_TRUE(token_->DestroyKeyPair("removed-a").ok());
  EXPECT_TRUE(token_->DestroyKeyPair("removed-b").ok());
}

TEST_F(RecoveryTest, ObjectHandleInvalidFindsTheHandlesAgainByCkaId) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("handles-1", &public_key);
  ASSERT_NE(key, nullptr);
  faults_.inject("C_SignInit", CKR_OBJECT_HANDLE_INVALID, 1);
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "re-resolved");
  ASSERT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_GE(faults_.calls("C_FindObjectsInit"), 1u) << "the key was looked up by CKA_ID";
  EXPECT_EQ(token_->GetMetrics().retries, 1u);

  faults_.inject("C_GetAttributeValue", CKR_OBJECT_HANDLE_INVALID, 1);
  absl::StatusOr<EvpPkeyPtr> again = token_->PublicKey(*key);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(EVP_PKEY_eq(again->get(), public_key.get()), 1);
  EXPECT_EQ(token_->GetMetrics().retries, 2u);
  EXPECT_TRUE(token_->DestroyKeyPair("handles-1").ok());
}

TEST_F(RecoveryTest, ImpossibleReloginMakesTheTokenUnhealthyUntilASuccess) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("relogin-1", &public_key);
  ASSERT_NE(key, nullptr);
  faults_.close_all_sessions();
  faults_.inject("C_Login", CKR_PIN_LOCKED, -1);
  absl::StatusOr<std::string> signature = token_->Sign(*key, SignScheme::kEcdsa, Sha256("m"));
  ASSERT_FALSE(signature.ok());
  EXPECT_EQ(signature.status().code(), absl::StatusCode::kUnavailable) << signature.status();
  EXPECT_EQ(signature.status().message(), "C_Login: CKR_PIN_LOCKED");
  EXPECT_FALSE(token_->Healthy());

  faults_.inject("C_Login", CKR_PIN_LOCKED, 0);
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "logged in again");
  EXPECT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_TRUE(token_->Healthy());
  EXPECT_TRUE(token_->DestroyKeyPair("relogin-1").ok());
}

// ---- Generation and import: reconciled, never retried ---------------------------------------

TEST_F(RecoveryTest, FailedGenerationIsNotRetriedAndLeavesNothing) {
  faults_.inject("C_GenerateKeyPair", CKR_DEVICE_ERROR, 1);
  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "gen-fail", "gen-fail");
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().code(), absl::StatusCode::kUnavailable) << key.status();
  EXPECT_TRUE(absl::StartsWith(key.status().message(), "C_GenerateKeyPair: CKR_DEVICE_ERROR"))
      << key.status();
  EXPECT_EQ(faults_.calls("C_GenerateKeyPair"), 1u) << "generation must never be retried";
  EXPECT_FALSE(HasObjectWithId("gen-fail"));
  EXPECT_EQ(token_->GetMetrics().retries, 0u);

  // Nothing half-made blocks the id.
  EvpPkeyPtr public_key;
  EXPECT_NE(Generate("gen-fail", &public_key), nullptr);
  EXPECT_TRUE(token_->DestroyKeyPair("gen-fail").ok());
}

TEST_F(RecoveryTest, GenerationFailingBeforeCreatingAnythingIsRetried) {
  // The duplicate-id search fails: nothing can have been created yet, so a retry is safe.
  faults_.inject("C_FindObjectsInit", CKR_SESSION_HANDLE_INVALID, 1);
  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "gen-early", "gen-early");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(faults_.calls("C_GenerateKeyPair"), 1u);
  EXPECT_EQ(token_->GetMetrics().retries, 1u);
  EXPECT_EQ(token_->GetMetrics().recoveries, 1u);
  EXPECT_TRUE(token_->DestroyKeyPair("gen-early").ok());
}

TEST_F(RecoveryTest, GenerationWhoseAnswerWasLostReturnsThePairItMade) {
  faults_.inject_ex("C_GenerateKeyPair", CKR_DEVICE_ERROR, 1, /*skip=*/0, /*lose_reply=*/1);
  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      token_->GenerateKeyPair(KeySpec{.type = KeyType::kEcP256}, "gen-lost", "gen-lost");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(faults_.calls("C_GenerateKeyPair"), 1u);
  EXPECT_EQ((*key)->spec.type, KeyType::kEcP256);
  EXPECT_EQ((*key)->label, "gen-lost");
  absl::StatusOr<EvpPkeyPtr> public_key = token_->PublicKey(**key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  absl::Status signed_ok = SignAndVerify(**key, public_key->get(), "reconciled");
  EXPECT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_TRUE(token_->DestroyKeyPair("gen-lost").ok());
}

TEST_F(RecoveryTest, ImportLeavingAPartialPairDestroysIt) {
  EVP_PKEY* raw = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  ASSERT_NE(raw, nullptr);
  EvpPkeyPtr private_key(raw);
  // The private key is created, the public key fails, and cleaning up in the broken session
  // fails too: the private key is left behind for reconciliation to find.
  faults_.inject_ex("C_CreateObject", CKR_DEVICE_ERROR, 1, /*skip=*/1, /*lose_reply=*/0);
  faults_.inject("C_DestroyObject", CKR_DEVICE_ERROR, 1);
  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      token_->ImportKeyPair(private_key.get(), "import-partial", "import-partial", false);
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().code(), absl::StatusCode::kUnavailable) << key.status();
  EXPECT_TRUE(absl::StrContains(key.status().message(), "C_CreateObject(public key)"))
      << key.status();
  EXPECT_TRUE(absl::StrContains(key.status().message(), "partial")) << key.status();
  EXPECT_EQ(faults_.calls("C_CreateObject"), 2u) << "import must never be retried";
  EXPECT_FALSE(HasObjectWithId("import-partial"));
}

// ---- Decryption ------------------------------------------------------------------------------

TEST_F(RecoveryTest, DecryptionFailureIsNeverRetriedButDeviceErrorsAre) {
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = GenerateRsa("decrypt-1", &public_key);
  ASSERT_NE(key, nullptr);
  ASSERT_NE(public_key, nullptr);
  std::string ciphertext = OaepSha1Encrypt(public_key.get(), "content key");
  faults_.reset();

  std::string tampered = ciphertext;
  tampered[tampered.size() / 2] ^= 0x01;
  absl::StatusOr<Secret> failed = token_->DecryptRsaOaep(*key, OaepHash::kSha1, tampered);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(failed.status().message(), "decryption failed");
  EXPECT_EQ(faults_.calls("C_Decrypt"), 1u);
  EXPECT_EQ(token_->GetMetrics().retries, 0u);

  faults_.reset();
  faults_.inject("C_Decrypt", CKR_DEVICE_ERROR, 1);
  absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(*key, OaepHash::kSha1, ciphertext);
  ASSERT_TRUE(plaintext.ok()) << plaintext.status();
  EXPECT_EQ(plaintext->view(), "content key");
  EXPECT_EQ(faults_.calls("C_Decrypt"), 2u);
  const Token::Metrics metrics = token_->GetMetrics();
  EXPECT_EQ(metrics.retries, 1u);
  EXPECT_EQ(metrics.decrypt.count, 2u);
  EXPECT_GE(metrics.decrypt.max_micros, 1u);
  EXPECT_GE(metrics.decrypt.total_micros, metrics.decrypt.max_micros);
  EXPECT_TRUE(token_->DestroyKeyPair("decrypt-1").ok());
}

// tpm2-pkcs11 1.9 leaves C_Decrypt's operation active in the session when the TPM refuses the
// ciphertext. The fault module does the same to SoftHSM2's real session: a bad JWE, then the next
// calls on that session (the pool hands the last returned session out first) must not fail with
// CKR_OPERATION_ACTIVE.
TEST_F(RecoveryTest, ASessionLeftWithAnActiveOperationIsReplacedNotReused) {
  EvpPkeyPtr rsa_public;
  std::shared_ptr<KeyPair> rsa = GenerateRsa("active-rsa", &rsa_public);
  ASSERT_NE(rsa, nullptr);
  ASSERT_NE(rsa_public, nullptr);
  const std::string ciphertext = OaepSha1Encrypt(rsa_public.get(), "content key");
  EvpPkeyPtr ec_public;
  std::shared_ptr<KeyPair> ec = Generate("active-ec", &ec_public);
  ASSERT_NE(ec, nullptr);
  faults_.reset();

  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "then a signature" : "then a decryption");
    faults_.leave_active("C_Decrypt", CKR_ENCRYPTED_DATA_INVALID, 1);
    absl::StatusOr<Secret> refused = token_->DecryptRsaOaep(*rsa, OaepHash::kSha1, ciphertext);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(refused.status().message(), "decryption failed");
    const uint64_t retries = token_->GetMetrics().retries;
    if (round == 0) {
      EXPECT_TRUE(SignAndVerify(*ec, ec_public.get(), "after a refused JWE").ok());
    } else {
      absl::StatusOr<Secret> plaintext = token_->DecryptRsaOaep(*rsa, OaepHash::kSha1, ciphertext);
      ASSERT_TRUE(plaintext.ok()) << plaintext.status();
      EXPECT_EQ(plaintext->view(), "content key");
    }
    // Retried on a fresh session (and, as the closed session was the only one, SoftHSM2 voided
    // the handles: the next call may find them again once).
    EXPECT_GE(token_->GetMetrics().retries, retries + 1);
    absl::Status again = SignAndVerify(*ec, ec_public.get(), "and again");
    EXPECT_TRUE(again.ok()) << again;
  }
  EXPECT_GE(faults_.calls("C_CloseSession"), 2u) << "each poisoned session was closed";
  EXPECT_TRUE(token_->DestroyKeyPair("active-rsa").ok());
  EXPECT_TRUE(token_->DestroyKeyPair("active-ec").ok());
}

// ---- Back-pressure ---------------------------------------------------------------------------

TEST_F(RecoveryTest, SaturatedPoolRejectsAtOnceInsteadOfQueueing) {
  ASSERT_NO_FATAL_FAILURE(OpenToken(/*max_sessions=*/2, /*max_waiters=*/2));
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("pressure-1", &public_key);
  ASSERT_NE(key, nullptr);
  faults_.delay_ms("C_Sign", 200);

  constexpr int kSigners = 10;
  std::vector<absl::Status> results(kSigners);
  std::vector<absl::Duration> elapsed(kSigners);
  std::latch start(kSigners);
  std::vector<std::thread> threads;
  const absl::Time begin = absl::Now();
  for (int i = 0; i < kSigners; ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      const absl::Time t0 = absl::Now();
      results[i] = SignAndVerify(*key, public_key.get(), absl::StrCat("signer ", i));
      elapsed[i] = absl::Now() - t0;
    });
  }
  for (std::thread& thread : threads) thread.join();
  const absl::Duration total = absl::Now() - begin;

  int signed_count = 0;
  int rejected = 0;
  for (int i = 0; i < kSigners; ++i) {
    if (results[i].ok()) {
      ++signed_count;
      continue;
    }
    EXPECT_EQ(results[i].code(), absl::StatusCode::kResourceExhausted) << results[i];
    EXPECT_EQ(results[i].message(), "HSM session pool saturated");
    // Well under session_wait (5s): refused, not queued behind 200 ms signatures.
    EXPECT_LT(elapsed[i], absl::Seconds(1)) << "signer " << i;
    ++rejected;
  }
  EXPECT_GE(rejected, 1);
  EXPECT_GE(signed_count, 2);
  EXPECT_LT(total, absl::Seconds(5)) << "nobody hangs";
  const Token::Metrics metrics = token_->GetMetrics();
  EXPECT_EQ(metrics.pool_rejections, static_cast<uint64_t>(rejected));
  EXPECT_GE(metrics.pool_waits, 1u);
  EXPECT_EQ(metrics.pool_timeouts, 0u);
  EXPECT_GE(metrics.sign.max_micros, 200000u);
  // The histogram: every signature in one bucket, the 200 ms ones in (100 ms, 250 ms] or above.
  uint64_t in_buckets = 0, slow = 0;
  for (size_t i = 0; i < metrics.sign.buckets.size(); ++i) {
    in_buckets += metrics.sign.buckets[i];
    if (i == metrics.sign.buckets.size() - 1 || Token::kLatencyBoundsMicros[i] > 200000) {
      slow += metrics.sign.buckets[i];
    }
  }
  EXPECT_EQ(in_buckets, metrics.sign.count);
  EXPECT_GE(slow, static_cast<uint64_t>(signed_count));
  faults_.delay_ms("C_Sign", 0);
  EXPECT_TRUE(token_->DestroyKeyPair("pressure-1").ok());
}

// ---- Health ----------------------------------------------------------------------------------

TEST_F(RecoveryTest, HealthFollowsARemovedDeviceAndItsReturn) {
  EXPECT_TRUE(token_->Healthy());
  absl::Status probe = token_->Probe();
  ASSERT_TRUE(probe.ok()) << probe;

  faults_.device_removed(-1);  // stays removed across re-initializations
  for (int i = 0; i < 2; ++i) {
    probe = token_->Probe();
    EXPECT_EQ(probe.code(), absl::StatusCode::kUnavailable) << probe;
    EXPECT_TRUE(absl::StrContains(probe.message(), "CKR_DEVICE_REMOVED")) << probe;
    EXPECT_FALSE(token_->Healthy());
  }
  EXPECT_TRUE(absl::IsUnavailable(token_->ListKeyObjects().status()));
  EXPECT_FALSE(token_->Healthy());
  // At least the first probe re-initialized; the next ones may have met the backoff.
  EXPECT_GE(token_->GetMetrics().module_reinitializations, 1u);

  faults_.device_removed(0);  // the token is back
  probe = token_->Probe();
  EXPECT_TRUE(probe.ok()) << probe;
  EXPECT_TRUE(token_->Healthy());
  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("health-1", &public_key);
  ASSERT_NE(key, nullptr);
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "back");
  EXPECT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_TRUE(token_->DestroyKeyPair("health-1").ok());
}

// ---- Re-initialization backoff --------------------------------------------------------------

TEST_F(RecoveryTest, ReinitializationsBackOffWhileTheDeviceStaysRemoved) {
  faults_.device_removed(-1);
  const absl::Time start = absl::Now();
  int probes = 0;
  absl::Duration slowest;
  while (absl::Now() - start < absl::Milliseconds(400)) {
    const absl::Time before = absl::Now();
    const absl::Status probe = token_->Probe();
    slowest = std::max(slowest, absl::Now() - before);
    EXPECT_EQ(probe.code(), absl::StatusCode::kUnavailable) << probe;
    EXPECT_TRUE(absl::StrContains(probe.message(), "CKR_DEVICE_REMOVED")) << probe;
    ++probes;
    absl::SleepFor(absl::Milliseconds(5));
  }
  // Backoff 50, 100, 200 ms: re-initializations at about 0, 50, 150 and 350 ms at most, against
  // one per probe without it.
  const unsigned long initializations = faults_.calls("C_Initialize");
  const Token::Metrics metrics = token_->GetMetrics();
  std::printf("[backoff] %d probes in 400 ms: %lu C_Initialize, %lu refused by the backoff\n",
              probes, initializations, static_cast<unsigned long>(metrics.reinit_backoffs));
  EXPECT_GE(probes, 20);
  EXPECT_GE(initializations, 2u);
  EXPECT_LE(initializations, 4u);
  EXPECT_EQ(metrics.module_reinitializations, initializations);
  EXPECT_EQ(metrics.module_reinitializations + metrics.reinit_backoffs,
            static_cast<uint64_t>(probes))
      << "every probe either re-initialized or failed fast";
  EXPECT_LT(slowest, absl::Seconds(1)) << "probes in the backoff fail at once";
  EXPECT_FALSE(token_->Healthy());

  // The device is back: the next operation succeeds (the module was initialized by the last
  // attempt) and resets the backoff, so a new removal re-initializes at once.
  faults_.device_removed(0);
  absl::Status probe = token_->Probe();
  ASSERT_TRUE(probe.ok()) << probe;
  EXPECT_TRUE(token_->Healthy());
  faults_.device_removed(-1);
  probe = token_->Probe();
  EXPECT_EQ(probe.code(), absl::StatusCode::kUnavailable) << probe;
  EXPECT_EQ(faults_.calls("C_Initialize"), initializations + 1) << "no backoff after a success";
  faults_.device_removed(0);
  probe = token_->Probe();
  EXPECT_TRUE(probe.ok()) << probe;

  EvpPkeyPtr public_key;
  std::shared_ptr<KeyPair> key = Generate("backoff-1", &public_key);
  ASSERT_NE(key, nullptr);
  absl::Status signed_ok = SignAndVerify(*key, public_key.get(), "after the backoff");
  EXPECT_TRUE(signed_ok.ok()) << signed_ok;
  EXPECT_TRUE(token_->DestroyKeyPair("backoff-1").ok());
}

TEST_F(RecoveryTest, ReinitializationBackoffStopsDoublingAtItsMaximum) {
  ASSERT_NO_FATAL_FAILURE(OpenToken(4, std::nullopt, absl::Milliseconds(10),
                                    /*reinit_backoff_max=*/absl::Milliseconds(40)));
  faults_.device_removed(-1);
  const absl::Time start = absl::Now();
  while (absl::Now() - start < absl::Milliseconds(600)) {
    EXPECT_TRUE(absl::IsUnavailable(token_->Probe()));
    absl::SleepFor(absl::Milliseconds(2));
  }
  // 10, 20, 40, 40, ...: at most 17 re-initializations in 600 ms; doubling without a cap would
  // allow 6 (0, 10, 30, 70, 150, 310).
  const unsigned long initializations = faults_.calls("C_Initialize");
  std::printf("[backoff] capped at 40 ms: %lu C_Initialize in 600 ms\n", initializations);
  EXPECT_GE(initializations, 9u);
  EXPECT_LE(initializations, 17u);
  faults_.device_removed(0);
  EXPECT_TRUE(token_->Probe().ok());
}

TEST_F(RecoveryTest, ProbeRecoversALoggedOutToken) {
  faults_.close_all_sessions();
  absl::Status probe = token_->Probe();
  EXPECT_TRUE(probe.ok()) << probe;
  EXPECT_TRUE(token_->Healthy());
  EXPECT_EQ(token_->GetMetrics().recoveries, 1u);
}

}  // namespace
}  // namespace custody::pkcs11
