// The only door to Cryptoki. Loads a PKCS#11 module, selects one token, logs in, keeps a pool
// of logged-in sessions and runs key operations on it. Nothing outside pkcs11/ sees a Cryptoki
// type: objects are named by their CKA_ID (the key version's id) and handles are opaque.
//
// Thread-safety: Token is thread-safe. Each operation borrows a session from the pool for the
// duration of one Cryptoki call sequence; a session is never used by two threads at once.
// Errors: absl::Status whose message names the Cryptoki function and the CKR code
// ("C_Sign: CKR_DEVICE_ERROR"). Codes: UNAVAILABLE for device/session/token errors,
// INVALID_ARGUMENT for bad input the token rejected, NOT_FOUND for missing objects,
// RESOURCE_EXHAUSTED when no session frees up within the pool wait (or at once when
// max_waiters callers already wait), INTERNAL otherwise.
//
// Recovery: when a call fails with CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
// CKR_USER_NOT_LOGGED_IN or CKR_DEVICE_ERROR, the session is dropped and a new one is opened
// and logged in; CKR_DEVICE_REMOVED or CKR_TOKEN_NOT_PRESENT first re-initialize the module
// (C_Finalize + C_Initialize), which voids every session and object handle; with
// CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID the KeyPair's cached handles are found
// again by CKA_ID. Reads, signatures, decryptions, derivations and destruction are then retried
// once; an operation that fails again is UNAVAILABLE naming the function and the CKR.
// Re-initializations back off while the device stays away: after one, the next is allowed only
// Options::reinit_backoff later, doubling up to reinit_backoff_max, back to the start once an
// operation succeeds; a recovery that would re-initialize sooner fails at once (UNAVAILABLE
// naming the CKR that called for it) instead of cycling the module on every request.
// Generation and import are never retried once the token may have created something: they
// reconcile instead (see GenerateKeyPair). Decryption failures ("decryption failed") are
// answers about the ciphertext, never retried.
#ifndef CUSTODY_PKCS11_TOKEN_H_
#define CUSTODY_PKCS11_TOKEN_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/openssl_ptr.h"
#include "common/secret.h"
#include "openssl/evp.h"
#include "pkcs11/key_operations.h"
#include "pkcs11/key_types.h"

namespace custody::pkcs11 {

// Selects a token: by label, or by the token attributes of an RFC 7512 PKCS#11 URI.
struct TokenSelector {
  std::string label;         // CKA token label (trailing blanks ignored); empty = any
  std::string serial;        // empty = any
  std::string manufacturer;  // empty = any
  std::string model;         // empty = any
  std::optional<uint64_t> slot_id;
};

// Parses "pkcs11:token=custody;serial=...;slot-id=3" (RFC 7512, path attributes token,
// manufacturer, serial, model, slot-id; percent-encoding honoured; pin-value refused because a
// PIN in a URI ends up in argv and logs). A string not starting with "pkcs11:" is a label.
absl::StatusOr<TokenSelector> ParseTokenSelector(std::string_view label_or_uri);

namespace internal {
class TokenState;  // pkcs11/token_internal.h
}  // namespace internal

// The KeyOperations of a real token (key_operations.h); the contracts are documented here.
class Token final : public KeyOperations {
 public:
  struct Options {
    std::string module_path;  // e.g. /usr/lib/softhsm/libsofthsm2.so
    // The module's initialization string, passed as C_Initialize's pReserved (see Module::Load
    // in cryptoki.h); empty for modules that take none. NSS softokn needs
    // "configdir='sql:DIR' certPrefix='' keyPrefix='' secmod='secmod.db' flags=".
    std::string init_args;
    TokenSelector selector;
    Secret pin;               // user PIN; read from a file or the environment by the caller
    size_t max_sessions = 8;  // logged-in sessions in the pool
    absl::Duration session_wait = absl::Seconds(2);  // how long a caller waits for a session
    // How many callers may wait for a session at once; beyond, RESOURCE_EXHAUSTED "HSM session
    // pool saturated" at once. Unset: 4 x max_sessions. 0: never wait.
    std::optional<size_t> max_waiters;
    // Spacing of module re-initializations while the device stays removed (see Recovery above).
    absl::Duration reinit_backoff = absl::Milliseconds(50);
    absl::Duration reinit_backoff_max = absl::Seconds(2);
  };

  // Upper bounds of the latency buckets, in microseconds: 100 µs .. 10 s (the bounds of
  // metrics::Histogram::LatencyBounds, so that the HSM's histogram and the request histogram can
  // be read side by side).
  static constexpr std::array<uint64_t, 16> kLatencyBoundsMicros = {
      100,   250,    500,    1000,   2500,    5000,    10000,   25000,
      50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000};
  struct Latency {
    uint64_t count = 0;
    uint64_t total_micros = 0;
    uint64_t max_micros = 0;
    // Calls per bucket (not cumulative): buckets[i] took at most kLatencyBoundsMicros[i] and more
    // than the bound before; the last counts those over 10 s.
    std::array<uint64_t, kLatencyBoundsMicros.size() + 1> buckets{};
  };

  // Counters since Open.
  struct Metrics {
    // Cryptoki failures that ended an attempt (or a recovery), by CKR name. Decryption
    // failures of the ciphertext ("decryption failed") are the caller's and not counted.
    std::map<std::string, uint64_t> errors;
    // The same failures by Cryptoki function and CKR name: {"C_Sign", "CKR_DEVICE_ERROR"} -> n.
    // `errors` is this summed over functions.
    std::map<std::pair<std::string, std::string>, uint64_t> errors_by_function;
    uint64_t retries = 0;                   // operations run a second time after a recovery
    uint64_t recoveries = 0;                // sessions re-opened and logged in by a recovery
    uint64_t module_reinitializations = 0;  // C_Finalize + C_Initialize cycles by this Token
    uint64_t reinit_backoffs = 0;           // recoveries failed at once: re-init backing off
    uint64_t pool_waits = 0;                // callers that had to wait for a session
    uint64_t pool_rejections = 0;           // callers refused at once: too many waiting
    uint64_t pool_timeouts = 0;             // callers that waited session_wait for nothing
    uint64_t pool_in_use = 0;               // now: sessions leased to callers
    uint64_t pool_waiting = 0;              // now: callers waiting for a session
    uint64_t pool_max_sessions = 0;
    // Whole calls as the caller sees them (pool wait and retry included), failed ones too.
    Latency sign;     // Sign
    Latency decrypt;  // DecryptRsaOaep, DecryptRsaRaw
    Latency derive;   // DeriveEcdh
  };

  // Loads the module (dlopen + C_GetFunctionList), C_Initialize with CKF_OS_LOCKING_OK, finds
  // exactly one token matching the selector (FAILED_PRECONDITION naming the candidates when
  // zero or several match, and the slots whose token is not initialized yet), opens one session and
  // logs in as CKU_USER. Further sessions are opened lazily up to max_sessions. A wrong PIN is
  // PERMISSION_DENIED. Note that PKCS#11 login is per application: while another Token in this
  // process holds a logged-in session on the same token, the module answers
  // CKR_USER_ALREADY_LOGGED_IN without checking the PIN.
  static absl::StatusOr<std::unique_ptr<Token>> Open(Options options);

  // Initializes a token with `label` in the module's first slot that has no initialized token
  // (SoftHSM2's free slot), sets the SO PIN and the user PIN through C_InitToken/C_InitPIN, so
  // PINs never pass through argv. ALREADY_EXISTS when a token with `label` already exists.
  static absl::Status InitializeToken(const std::string& module_path, std::string_view label,
                                      const Secret& so_pin, const Secret& user_pin,
                                      const std::string& init_args = "");

  // The key sizes the token reports for a key-pair generation mechanism
  // ("CKM_RSA_PKCS_KEY_PAIR_GEN": modulus bits; "CKM_EC_KEY_PAIR_GEN": field bits), read with
  // C_GetMechanismInfo at Open; nullopt when the token lists no such mechanism or reports no usable
  // range.
  std::optional<std::pair<uint64_t, uint64_t>> KeySizeRange(
      std::string_view mechanism_name) const override;

  ~Token() override;
  Token(const Token&) = delete;
  Token& operator=(const Token&) = delete;

  // The token as found by Open (slot_id is the slot at Open; a module re-initialization may
  // move the token to another slot, which Token follows internally).
  const TokenInfo& info() const override;

  // False from a failed recovery (the module cannot be re-initialized, no session can be
  // opened or logged in, or the operation failed again after recovering) until an operation
  // succeeds again. True after Open.
  bool Healthy() const;

  // A cheap liveness check for a health loop: C_GetSessionInfo (the session must be logged in)
  // and C_GetTokenInfo on a pooled session, recovering as any operation does. OK means the
  // token serves requests; UNAVAILABLE naming the CKR otherwise; RESOURCE_EXHAUSTED when the
  // pool is saturated (which says nothing about the token).
  absl::Status Probe();

  Metrics GetMetrics() const;

  // Generates a key pair in the token: private key CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE=TRUE,
  // CKA_EXTRACTABLE=FALSE and one usage: CKA_SIGN, or with `for_decryption` CKA_DECRYPT (RSA) /
  // CKA_DERIVE (EC); the other usage flags and CKA_UNWRAP are set FALSE. Public key CKA_TOKEN,
  // CKA_VERIFY (CKA_ENCRYPT for RSA decryption keys). Both carry CKA_ID=id and CKA_LABEL=label.
  // Never retried once C_GenerateKeyPair was called: when it (or anything after it) fails with a
  // session or device error, the session is recovered and the objects with CKA_ID=id are
  // looked at instead. A complete pair is returned (the generation happened, its answer was
  // lost); a partial one is destroyed and the call is UNAVAILABLE; with none it is UNAVAILABLE.
  // ALREADY_EXISTS when a private key with CKA_ID=id exists; INVALID_ARGUMENT for an empty id,
  // RSA sizes other than 2048/3072/4096, or an Ed25519 decryption key.
  absl::StatusOr<std::shared_ptr<KeyPair>> GenerateKeyPair(const KeySpec& spec, std::string_view id,
                                                           std::string_view label,
                                                           bool for_decryption = false) override;

  // Finds the private and public key objects with CKA_ID=id. NOT_FOUND if the private key is
  // missing. The KeySpec is read back from the token (CKA_KEY_TYPE, CKA_EC_PARAMS, modulus size).
  absl::StatusOr<std::shared_ptr<KeyPair>> FindKeyPair(std::string_view id) override;

  // Signs `input` (see SignScheme for what input means) with the pair's private key.
  // INVALID_ARGUMENT when the scheme does not fit the key type. A cached handle the token no
  // longer knows is re-found by CKA_ID once (and the KeyPair's cache updated).
  absl::StatusOr<std::string> Sign(const KeyPair& key, SignScheme scheme,
                                   std::string_view input) override;

  // Reads the public key (CKA_EC_POINT + curve, or CKA_MODULUS/CKA_PUBLIC_EXPONENT) as an
  // EVP_PKEY built through OSSL_PARAM (EVP_PKEY_fromdata).
  absl::StatusOr<EvpPkeyPtr> PublicKey(const KeyPair& key) override;

  absl::StatusOr<PrivateKeyAttributes> GetPrivateKeyAttributes(const KeyPair& key);

  // Every key pair in the token, by CKA_ID, resolved in one pass over the private and one over
  // the public key objects (startup: one search per pair costs a full scan each on SoftHSM2,
  // quadratic in the number of keys). An id carried by several private keys is left out (the
  // caller's FindKeyPair then reports the ambiguity). A pair without its public key is included
  // with public_handle 0, as FindKeyPair does.
  // With `objects`, also every private/public key object (id, label), from the same pass: one
  // search and one attribute read per object in all.
  absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> FindAllKeyPairs(
      std::vector<ObjectInfo>* objects = nullptr) override;

  // Every private/public key object in the token (id, label): FindAllKeyPairs' listing alone.
  absl::StatusOr<std::vector<ObjectInfo>> ListKeyObjects();

  // Destroys every object with CKA_ID=id. OK when none exists (idempotent).
  absl::Status DestroyKeyPair(std::string_view id) override;

  // Whether the token lists `mechanism_name` (e.g. "CKM_RSA_X_509") in C_GetMechanismList.
  bool HasMechanism(std::string_view mechanism_name) const override;

  // --- Decryption (JWE key management) ---

  // RSA-OAEP decryption in the token: CKM_RSA_PKCS_OAEP with `hash` for both the OAEP hash and
  // MGF1, empty label (CKZ_DATA_SPECIFIED with no data). UNIMPLEMENTED when the token refuses
  // these parameters (see OaepSupported). Every failure of the decryption itself (bad padding,
  // wrong key, wrong length) is INVALID_ARGUMENT "decryption failed", identical for all causes.
  absl::StatusOr<Secret> DecryptRsaOaep(const KeyPair& key, OaepHash hash,
                                        std::string_view ciphertext) override;

  // Raw RSA decryption (CKM_RSA_X_509): the k-byte encoded message for software OAEP decoding
  // where the token refuses OAEP with SHA-256. Never used for signing. UNIMPLEMENTED when the
  // token lacks the mechanism; INVALID_ARGUMENT "decryption failed" for any decryption failure.
  absl::StatusOr<Secret> DecryptRsaRaw(const KeyPair& key, std::string_view ciphertext) override;

  // Whether the token accepts CKM_RSA_PKCS_OAEP with `hash`. Probed once per hash (the first
  // call; custodyd calls it at startup) by decrypting, in the token, a ciphertext made by OpenSSL
  // under a throwaway session RSA key (CKA_TOKEN=FALSE, destroyed after). Cached afterwards.
  // False without probing when the token lacks CKM_RSA_PKCS_OAEP. A probe that cannot run
  // (no session free, device error) answers false, is logged and is not cached.
  bool OaepSupported(OaepHash hash) override;

  // ECDH (CKM_ECDH1_DERIVE, CKD_NULL) of the pair's EC private key with `peer_point` (the
  // uncompressed point 04||X||Y; callers validate it is on the curve first). The shared secret Z
  // is derived as a session object (CKA_TOKEN=FALSE, CKK_GENERIC_SECRET, extractable so its
  // CKA_VALUE can be read — it never leaves this process), read, and destroyed at once. Z is the
  // field size (32/48/66 bytes). INVALID_ARGUMENT for a non-EC key, a key without CKA_DERIVE,
  // or a peer point that is not an uncompressed point of the key's size.
  absl::StatusOr<Secret> DeriveEcdh(const KeyPair& key, std::string_view peer_point) override;

  // --- Import (bring your own key) ---

  // Imports an existing private key (RSA 2048..4096 bits with its CRT parameters, EC
  // P-256/P-384/P-521, Ed25519), given as an OpenSSL EVP_PKEY holding private components, into
  // the token with C_CreateObject: the private key as CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE=TRUE,
  // CKA_EXTRACTABLE=FALSE, and its public key, both with CKA_ID=id and CKA_LABEL=label and the
  // usage flags of GenerateKeyPair. Private components are copied into buffers that are wiped
  // (OPENSSL_cleanse) before returning. When
  // the public key cannot be created, the private key just created is destroyed again. A
  // session or device error after the first C_CreateObject is reconciled as in GenerateKeyPair.
  // ALREADY_EXISTS for a duplicate id; INVALID_ARGUMENT for other key types or sizes, a key
  // without private components, an empty id, or an Ed25519 key `for_decryption`.
  absl::StatusOr<std::shared_ptr<KeyPair>> ImportKeyPair(const EVP_PKEY* private_key,
                                                         std::string_view id,
                                                         std::string_view label,
                                                         bool for_decryption) override;

  // --- Secret keys (the metadata tag key, server/keys/metadata_tag_key.h) ---

  // The CKA_IDs of the secret keys labelled `label`, sorted.
  absl::StatusOr<std::vector<std::string>> FindSecretKeyIds(std::string_view label);
  // Generates a 32-byte CKK_GENERIC_SECRET key (CKM_GENERIC_SECRET_KEY_GEN) with CKA_TOKEN,
  // CKA_PRIVATE, CKA_SENSITIVE=TRUE, CKA_EXTRACTABLE=FALSE, CKA_SIGN and CKA_VERIFY, and CKA_ID=id,
  // CKA_LABEL=label. OK at once when a secret key with CKA_ID=id exists (so a retry after a lost
  // answer creates no second one). Destroy it with DestroyKeyPair(id).
  absl::Status GenerateHmacKey(std::string_view id, std::string_view label);
  // HMAC-SHA256 (CKM_SHA256_HMAC) of `message` with the secret key CKA_ID=id: 32 bytes.
  // NOT_FOUND when there is none.
  absl::StatusOr<std::string> HmacSha256(std::string_view id, std::string_view message);

 private:
  using State = internal::TokenState;
  explicit Token(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// "CKR_DEVICE_ERROR" for 0x30, "CKR_0x..." for unknown codes.
std::string CkrName(unsigned long rv);

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_TOKEN_H_
