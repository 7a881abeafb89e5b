// The custody OpenSSL 3 provider (custody.so): a store for custody: URIs, key management whose
// keys are a public half (from custody's JWK) plus the ring they live in, and signature
// operations that are custodyd Signer.Sign calls. Internal header shared by its files.
//
// Keys are built and public-key work is done in a private library context that holds only
// OpenSSL's default provider, so the provider never fetches its own algorithms by accident.
#ifndef CUSTODY_PROVIDER_PROVIDER_H_
#define CUSTODY_PROVIDER_PROVIDER_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "openssl/core.h"
#include "openssl/core_dispatch.h"
#include "openssl/evp.h"

namespace custody::provider {

// Reasons on the OpenSSL error queue (the text carries the details).
enum Reason : int {
  kReasonCustodyCall = 1,  // custodyd answered with an error or could not be reached
  kReasonBadUri = 2,
  kReasonUnsupported = 3,  // an operation or parameter custody keys do not do
  kReasonNotBound = 4,     // a public-only key object (imported for comparison) cannot sign
  kReasonInternal = 5,
};

// From the provider's openssl.cnf section (keys below) or the environment.
struct Config {
  std::string address;                         // addr (else $CUSTODY_ADDR)
  std::string ca_file;                         // ca: PEM roots for TLS to custodyd
  std::string cert_file;                       // cert: client certificate (mTLS)
  std::string key_file;                        // key: its private key (mTLS)
  std::string server_name;                     // server_name: TLS name override
  absl::Duration deadline = absl::Seconds(5);  // deadline_ms: per custodyd call, retries included
};

class ProviderContext {
 public:
  ProviderContext(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in);
  ~ProviderContext();

  const Config& config() const { return config_; }
  // The private library context (default provider only); null if it could not be made.
  OSSL_LIB_CTX* libctx() const { return libctx_; }
  // One Client per address (the URI's, else the configured one) and process, created on first
  // use. After a fork (nginx's master loads keys, its workers sign) the child makes its own:
  // gRPC channels do not survive fork, and the parent's are left alone (never destroyed there).
  absl::StatusOr<std::shared_ptr<client::Client>> ClientFor(const std::string& uri_address);
  // Reads up to `max` bytes of a core BIO (decoders' input); false if the core gave no reader.
  bool ReadAll(OSSL_CORE_BIO* bio, size_t max, std::string* out) const;

  // Puts "custody: CODE: message" on the application's OpenSSL error queue.
  void RaiseStatus(const absl::Status& status, const char* func) const;
  void Raise(int reason, const char* func, const std::string& message) const;

 private:
  const OSSL_CORE_HANDLE* handle_;
  OSSL_FUNC_core_new_error_fn* new_error_ = nullptr;
  OSSL_FUNC_core_set_error_debug_fn* set_error_debug_ = nullptr;
  OSSL_FUNC_core_vset_error_fn* vset_error_ = nullptr;
  OSSL_FUNC_BIO_read_ex_fn* bio_read_ex_ = nullptr;
  Config config_;
  OSSL_LIB_CTX* libctx_ = nullptr;
  OSSL_PROVIDER* default_provider_ = nullptr;
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<client::Client>> clients_ ABSL_GUARDED_BY(mu_);
  pid_t clients_pid_ ABSL_GUARDED_BY(mu_) = 0;  // the process clients_ belong to
};

using PkeyPtr = std::shared_ptr<EVP_PKEY>;

// Key management's key object. A bound key (from the store) signs through custodyd; an
// unbound one (imported public key, for EVP_PKEY_eq with a certificate's key) cannot.
struct CustodyKey {
  ProviderContext* provider = nullptr;
  std::string type;                        // "EC", "RSA" or "ED25519"
  PkeyPtr pub;                             // in provider->libctx()
  std::shared_ptr<client::Client> client;  // null when unbound
  pid_t client_pid = 0;                    // the process `client` belongs to
  std::string address;                     // the URI's addr= ("" = the configured one)
  std::string ring;
  uint32_t version = 0;  // the version loaded (the ACTIVE one when the URI named none)
  std::string alg;       // the ring's alg (ES256, PS256, RS256, EdDSA, ...)
};

// The public key of a custody JWK (EC P-256/384/521, RSA, OKP Ed25519) in `libctx`.
absl::StatusOr<PkeyPtr> PublicKeyFromJwk(OSSL_LIB_CTX* libctx, const std::string& jwk_json);
// "EC", "RSA" or "ED25519" for a key made by PublicKeyFromJwk.
std::string KeyTypeOf(const EVP_PKEY* pkey);

extern const OSSL_DISPATCH kEcKeyManagement[];
extern const OSSL_DISPATCH kRsaKeyManagement[];
extern const OSSL_DISPATCH kEd25519KeyManagement[];
extern const OSSL_DISPATCH kStoreFunctions[];
extern const OSSL_DISPATCH kEcDecoder[];
extern const OSSL_DISPATCH kRsaDecoder[];
extern const OSSL_DISPATCH kEd25519Decoder[];

// Loads the key of `uri` (custody:ring=...) as the store does: the public half from GetPublicKey,
// bound to the ring and that version. `func` names the caller in errors.
absl::StatusOr<CustodyKey> LoadCustodyKey(ProviderContext* provider, const std::string& uri,
                                          const char* func);
// The OSSL_PARAMs (object type PKEY, data type, reference to `key`) that hand a key to OpenSSL
// from a store or decoder callback; `key` must outlive the callback.
int PassKey(const CustodyKey& key, OSSL_CALLBACK* object_cb, void* object_cbarg);
// The Client a key signs through in this process (see ClientFor).
absl::StatusOr<std::shared_ptr<client::Client>> SigningClient(const CustodyKey& key);
extern const OSSL_DISPATCH kEcdsaSignature[];
extern const OSSL_DISPATCH kRsaSignature[];
extern const OSSL_DISPATCH kEd25519Signature[];

}  // namespace custody::provider

#endif  // CUSTODY_PROVIDER_PROVIDER_H_
