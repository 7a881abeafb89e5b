// Internal to pkcs11/: what the files behind the Token facade share. The recovery state machine
// (TokenState: run, recover, retry), the Cryptoki template and object helpers, what custody knows
// of each KeyType, and one function per Token operation, each defined in the file of its concern
// (the file map is in docs/design.md). Nothing outside pkcs11/ includes this header.
#ifndef CUSTODY_PKCS11_TOKEN_INTERNAL_H_
#define CUSTODY_PKCS11_TOKEN_INTERNAL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/secret.h"
#include "openssl/bn.h"
#include "openssl/evp.h"
#include "pkcs11/cryptoki.h"
#include "pkcs11/session_pool.h"
#include "pkcs11/token.h"

namespace custody::pkcs11::internal {

// ---- Cryptoki templates and objects (token_objects.cc) ------------------------------------

inline constexpr CK_BBOOL kTrue = CK_TRUE;
inline constexpr CK_BBOOL kFalse = CK_FALSE;

inline CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, const void* value, size_t size) {
  // Cryptoki templates take non-const pointers even for input attributes; nothing writes them.
  return CK_ATTRIBUTE{type, const_cast<void*>(value), size};
}
inline CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, std::string_view bytes) {
  return Attr(type, bytes.data(), bytes.size());
}
inline CK_ATTRIBUTE BoolAttr(CK_ATTRIBUTE_TYPE type, bool value) {
  return Attr(type, value ? &kTrue : &kFalse, sizeof(CK_BBOOL));
}

// The id in hex (as KeyVersion.token_object_id shows it), for messages and logs.
std::string PrintableId(std::string_view id);

// Every object matching `match` (an empty template matches all).
absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(CK_FUNCTION_LIST* fn,
                                                          SessionPool::Lease& lease,
                                                          std::vector<CK_ATTRIBUTE> match);
// Every object of class `object_class` with CKA_ID=id.
absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindKeyObjects(CK_FUNCTION_LIST* fn,
                                                             SessionPool::Lease& lease,
                                                             CK_OBJECT_CLASS object_class,
                                                             std::string_view id);
// The one object of class `object_class` with CKA_ID=id: NOT_FOUND when none,
// FAILED_PRECONDITION when several.
absl::StatusOr<CK_OBJECT_HANDLE> FindOne(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                         CK_OBJECT_CLASS object_class, std::string_view id);
// Destroys `handles`; one already gone (a concurrent destroy) is what was wanted.
absl::Status DestroyObjects(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                            const std::vector<CK_OBJECT_HANDLE>& handles);

absl::StatusOr<std::string> GetBytes(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                     CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);
absl::StatusOr<CK_ULONG> GetUlong(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                  CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);
// The KeySpec of a private key, from CKA_KEY_TYPE and CKA_MODULUS or CKA_EC_PARAMS.
absl::StatusOr<KeySpec> ReadKeySpec(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                    CK_OBJECT_HANDLE private_key);

// A KeyPair with its handles, issued by module generation `generation`.
std::shared_ptr<KeyPair> MakeKeyPair(std::string_view id, std::string label, const KeySpec& spec,
                                     CK_OBJECT_HANDLE private_handle,
                                     CK_OBJECT_HANDLE public_handle, uint64_t generation);

// Destroys a session or token object when the scope ends, on every path (a derived secret, a
// probe key, a half-imported pair), unless released. The lease must outlive it.
class ScopedObject {
 public:
  ScopedObject(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease, CK_OBJECT_HANDLE handle)
      : fn_(fn), lease_(lease), handle_(handle) {}
  ~ScopedObject() {
    // Best effort: on a broken session this fails, and a session object goes with the session.
    if (handle_ != CK_INVALID_HANDLE) fn_->C_DestroyObject(lease_.get(), handle_);
  }
  ScopedObject(const ScopedObject&) = delete;
  ScopedObject& operator=(const ScopedObject&) = delete;
  CK_OBJECT_HANDLE get() const { return handle_; }
  CK_OBJECT_HANDLE release() { return std::exchange(handle_, CK_INVALID_HANDLE); }

 private:
  CK_FUNCTION_LIST* fn_;
  SessionPool::Lease& lease_;
  CK_OBJECT_HANDLE handle_;
};

// ---- Key types (key_geometry.cc) -----------------------------------------------------------

// The PKCS#11 3.0 PrintableString form of CKA_EC_PARAMS for Ed25519 ("edwards25519"), which
// some modules expect instead of the RFC 8410 OID.
extern const std::string_view kEd25519Name;

struct KeyGeometry {
  size_t point_size = 0;             // uncompressed EC point 04||X||Y or raw Ed25519 key; 0 for RSA
  size_t signature_size = 0;         // r||s or Ed25519; 0 for RSA (the modulus size)
  std::string_view ec_params;        // DER CKA_EC_PARAMS; empty for RSA
  const char* group_name = nullptr;  // OpenSSL group of the EC curves; nullptr otherwise
};
const KeyGeometry& GeometryOf(KeyType type);
bool IsEc(KeyType type);
// The bytes of a C_Sign output for `spec` (RSA of unknown size: 512, corrected by the token).
size_t SignatureSize(const KeySpec& spec);
// The spec of an RSA key from its modulus; of an EC or EdDSA key from its CKA_EC_PARAMS.
absl::StatusOr<KeySpec> RsaSpec(std::string_view modulus);
absl::StatusOr<KeySpec> EcSpec(std::string_view params);
// DER OCTET STRING around `content` (the CKA_EC_POINT encoding); contents up to 65535 bytes.
std::string DerOctetString(std::string_view content);

// ---- OpenSSL owners -------------------------------------------------------------------------

// common/openssl_ptr.h's owners, by the names pkcs11/'s files use.
using EvpPkeyCtxPtr = OpensslPtr<EVP_PKEY_CTX>;
using BignumPtr = OpensslPtr<BIGNUM>;
using custody::SecretBignumPtr;

// ---- Public keys (token_public_keys.cc) ----------------------------------------------------

absl::StatusOr<EvpPkeyPtr> RsaPublicKey(std::string_view modulus, std::string_view exponent);

// OpenSSL's RSA-OAEP encryption of `message` under `pkey` with `hash` for OAEP and MGF1
// (token_operations.cc): the probe's and the self-test's ciphertexts.
absl::StatusOr<std::string> OpenSslOaepEncrypt(EVP_PKEY* pkey, OaepHash hash,
                                               std::string_view message);

// ---- Slots (token_selection.cc) ------------------------------------------------------------

struct SlotToken {
  CK_SLOT_ID slot = 0;
  std::string label;
  std::string manufacturer;
  std::string model;
  std::string serial;
  bool initialized = false;
};
absl::StatusOr<std::vector<SlotToken>> ListTokens(CK_FUNCTION_LIST* fn);

// ---- The recovery state machine (token_recovery.cc) ----------------------------------------

// Which call a latency sample belongs to (Token::Metrics).
enum class Timed { kSign, kDecrypt, kDerive };

class TokenState {
 public:
  // Declared first so that it is destroyed last: the pool closes sessions through it.
  std::unique_ptr<Module> module;
  CK_FUNCTION_LIST* fn = nullptr;
  TokenInfo info;
  std::set<std::string, std::less<>> mechanisms;
  // Key-pair generation mechanism name -> (ulMinKeySize, ulMaxKeySize), see Token::KeySizeRange.
  std::map<std::string, std::pair<uint64_t, uint64_t>, std::less<>> key_sizes;
  std::unique_ptr<SessionPool> pool;

  // OaepSupported answers, indexed by OaepHash; empty until probed.
  absl::Mutex oaep_mu;
  std::optional<bool> oaep_supported[2] ABSL_GUARDED_BY(oaep_mu);

  std::atomic<bool> healthy{true};
  std::atomic<uint64_t> retries{0};
  std::atomic<uint64_t> recoveries{0};
  std::atomic<uint64_t> reinitializations{0};
  std::atomic<uint64_t> reinit_backoffs{0};

  // Re-initialization backoff (token.h, Recovery). `reinit_backoff_armed` lets the hot path
  // (Succeeded) skip the mutex while nothing is to reset.
  absl::Duration reinit_backoff_initial = absl::Milliseconds(50);
  absl::Duration reinit_backoff_max = absl::Seconds(2);
  std::atomic<bool> reinit_backoff_armed{false};
  absl::Mutex backoff_mu;  // never held across a token call
  absl::Time reinit_not_before ABSL_GUARDED_BY(backoff_mu) = absl::InfinitePast();
  absl::Duration reinit_backoff ABSL_GUARDED_BY(backoff_mu) = absl::Milliseconds(50);
  mutable absl::Mutex metrics_mu;  // never held across a token call
  // Failures by (Cryptoki function, CKR name); Token::Metrics::errors sums them per CKR.
  std::map<std::pair<std::string, std::string>, uint64_t> errors ABSL_GUARDED_BY(metrics_mu);
  Token::Latency latency[3] ABSL_GUARDED_BY(metrics_mu);  // indexed by Timed

  // One call sequence on one session: Cryptoki calls through the lease only.
  using Op = std::function<absl::Status(SessionPool::Lease&)>;
  // The same on the pair's resolved handle of one class.
  using KeyOp = std::function<absl::Status(SessionPool::Lease&, CK_OBJECT_HANDLE)>;

  // Runs `op` once, recovers from a session, device or stale-handle failure (see token.h) and
  // runs it once more; a second such failure is UNAVAILABLE. `key`, when given, is the pair
  // whose cached handles a CKR_OBJECT_HANDLE_INVALID refers to.
  absl::Status Run(const KeyPair* key, const Op& op);

  // Run, with `op` given the pair's handle of class `cls` (see WithHandle).
  absl::Status RunOnKey(const KeyPair& key, CK_OBJECT_CLASS cls, const KeyOp& op);

  // For operations that create token objects (generation, import): `op` sets `started` right
  // before the call that may create them. A failure before that is retried as in Run; after
  // it the operation is never run again: the session is recovered and the objects with CKA_ID
  // `id` decide (a complete pair goes to `pair`; a partial one is destroyed).
  absl::Status RunCreating(const Op& op, const bool& started, std::string_view id,
                           std::shared_ptr<KeyPair>& pair);

  // Runs `op` on the pair's handle of class `cls`, resolving both handles by CKA_ID first when
  // they are not from the module's current initialization (or were marked stale by Run).
  // The caller holds the module gate (it runs inside an Op), so the generation is stable.
  absl::Status WithHandle(SessionPool::Lease& lease, const KeyPair& key, CK_OBJECT_CLASS cls,
                          const std::function<absl::Status(CK_OBJECT_HANDLE)>& op);

  // Records the duration of one Token call, however it ends.
  class Timer {
   public:
    Timer(TokenState& state, Timed what) : state_(state), what_(what) {}
    ~Timer() { state_.RecordLatency(what_, absl::Now() - start_); }
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;

   private:
    TokenState& state_;
    const Timed what_;
    const absl::Time start_ = absl::Now();
  };

  void RecordLatency(Timed what, absl::Duration elapsed);

 private:
  // A KeyPair generation no module ever has: forces ResolveHandles.
  static constexpr uint64_t kStaleHandles = ~uint64_t{0};

  struct Attempt {
    absl::Status status;
    bool acquired = false;    // a session was leased (so a fresh one was opened and logged in)
    uint64_t generation = 0;  // of the module during the attempt
  };

  static Damage DamageOfStatus(const absl::Status& status);
  // One lease, one run of `op`, under the module gate (so that no re-initialization finalizes
  // the module under it). The lease is gone before the gate is released.
  Attempt Try(const Op& op, bool fresh);
  // What to repair before the retry. For sessions, the retry leases a fresh one: opening and
  // logging it in is the recovery.
  absl::Status Recover(Damage damage, uint64_t generation, const KeyPair* key);
  // After a re-initialization the token may sit in another slot: find it again by serial.
  absl::Status FollowToken();
  absl::Status Succeeded();
  absl::Status Unhealthy(absl::Status status);
  absl::Status RecoveryFailed(const absl::Status& failure, const absl::Status& recovery);
  // The outcome of the retry after a recovery.
  absl::Status Finish(const Attempt& retry);
  // Looks, on a fresh session, at what a failed generation or import left behind.
  absl::Status Reconcile(const absl::Status& cause, std::string_view id,
                         std::shared_ptr<KeyPair>& pair);
  absl::Status ResolveHandles(SessionPool::Lease& lease, const KeyPair& key, CK_OBJECT_CLASS needed,
                              uint64_t generation);
  void CountError(const absl::Status& status);
};

// ---- The operations behind Token's methods, one file per concern ---------------------------

// token_selection.cc
absl::StatusOr<std::unique_ptr<TokenState>> OpenToken(Token::Options options);
absl::Status InitializeToken(const std::string& module_path, std::string_view label,
                             const Secret& so_pin, const Secret& user_pin,
                             const std::string& init_args);

// token_objects.cc
absl::StatusOr<std::shared_ptr<KeyPair>> FindKeyPair(TokenState& state, std::string_view id);
absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> FindAllKeyPairs(
    TokenState& state, std::vector<ObjectInfo>* objects);
absl::Status DestroyKeyPair(TokenState& state, std::string_view id);
absl::StatusOr<PrivateKeyAttributes> GetPrivateKeyAttributes(TokenState& state, const KeyPair& key);

// token_public_keys.cc
absl::StatusOr<EvpPkeyPtr> PublicKey(TokenState& state, const KeyPair& key);

// token_generation.cc
absl::StatusOr<std::shared_ptr<KeyPair>> GenerateKeyPair(TokenState& state, const KeySpec& spec,
                                                         std::string_view id,
                                                         std::string_view label,
                                                         bool for_decryption);
absl::StatusOr<std::shared_ptr<KeyPair>> ImportKeyPair(TokenState& state,
                                                       const EVP_PKEY* private_key,
                                                       std::string_view id, std::string_view label,
                                                       bool for_decryption);

// token_operations.cc
absl::StatusOr<std::string> Sign(TokenState& state, const KeyPair& key, SignScheme scheme,
                                 std::string_view input);
absl::StatusOr<Secret> DecryptRsaOaep(TokenState& state, const KeyPair& key, OaepHash hash,
                                      std::string_view ciphertext);
absl::StatusOr<Secret> DecryptRsaRaw(TokenState& state, const KeyPair& key,
                                     std::string_view ciphertext);
bool OaepSupported(TokenState& state, OaepHash hash);
absl::StatusOr<Secret> DeriveEcdh(TokenState& state, const KeyPair& key,
                                  std::string_view peer_point);

// token_secret_keys.cc
absl::StatusOr<std::vector<std::string>> FindSecretKeyIds(TokenState& state,
                                                          std::string_view label);
absl::Status GenerateHmacKey(TokenState& state, std::string_view id, std::string_view label);
absl::StatusOr<std::string> HmacSha256(TokenState& state, std::string_view id,
                                       std::string_view message);

}  // namespace custody::pkcs11::internal

#endif  // CUSTODY_PKCS11_TOKEN_INTERNAL_H_
