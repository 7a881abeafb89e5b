// TLS servers and clients that stay up across key rotations: the key and certificate of a custody
// ring's ACTIVE version, chosen afresh for every new handshake by an OpenSSL certificate
// callback, so that a rotation needs no restart or reload (docs/provider.md, "Rotation").
//
// Every pair comes from one OSSL_STORE load of the ring's custody: URI (the custody provider
// hands out the version's key and then its certificate chain from the same GetPublicKey answer),
// so the key is always the one the certificate names: each key object is pinned to its version.
// A handshake keeps the pair it started with; custodyd lets the version that was ACTIVE before
// a rotation finish signing for --retired_sign_grace (30 s by default), which must exceed
// `refresh` plus the longest handshake.
//
// Needs libssl and the custody provider loaded in `libctx` (with the default provider);
// independent of the rest of custody.
#ifndef CUSTODY_PROVIDER_TLS_CREDENTIALS_H_
#define CUSTODY_PROVIDER_TLS_CREDENTIALS_H_

#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "openssl/ssl.h"
#include "openssl/x509.h"

namespace custody::tls {

// A key and its certificate chain, from one store load.
struct KeyAndCertificate {
  EVP_PKEY* key = nullptr;
  X509* certificate = nullptr;       // the leaf
  STACK_OF(X509) * chain = nullptr;  // the rest, may be empty
  std::chrono::steady_clock::time_point loaded;

  KeyAndCertificate() = default;
  KeyAndCertificate(const KeyAndCertificate&) = delete;
  KeyAndCertificate& operator=(const KeyAndCertificate&) = delete;
  ~KeyAndCertificate();
};

// Loads `uri` (custody:ring=NAME[;version=N][;addr=...]) through OSSL_STORE in `libctx` (null:
// the default one) with `properties` (e.g. "?provider=default"). Null with the reason in
// `*error` (and on OpenSSL's error queue) when the store has no key, no certificate, or a
// certificate for another key.
std::shared_ptr<const KeyAndCertificate> LoadKeyAndCertificate(OSSL_LIB_CTX* libctx,
                                                               const char* properties,
                                                               const std::string& uri,
                                                               std::string* error);

class RotatingCredentials {
 public:
  // `uri` names the ring without a version. Loads the first pair now (null + `*error` if that
  // fails). After that, a pair older than `refresh` is reloaded by the first handshake that
  // notices (the others keep using the current one meanwhile; a failed reload keeps it too).
  static std::unique_ptr<RotatingCredentials> Create(OSSL_LIB_CTX* libctx, std::string properties,
                                                     std::string uri,
                                                     std::chrono::milliseconds refresh,
                                                     std::string* error);

  // SSL_CTX_set_cert_cb(ctx, ...): each server handshake (and each client handshake asked for
  // a certificate) gets the current pair. `this` must outlive `ctx` and its connections.
  void Install(SSL_CTX* ctx);
  // The pair new handshakes get (reloaded first if it is older than `refresh`).
  std::shared_ptr<const KeyAndCertificate> Current();
  // The reason of the last failed reload ("" when the last one succeeded).
  std::string last_error();

  // The certificate callback itself (arg: the RotatingCredentials), for callers that wrap it.
  static int CertificateCallback(SSL* ssl, void* arg);

 private:
  RotatingCredentials(OSSL_LIB_CTX* libctx, std::string properties, std::string uri,
                      std::chrono::milliseconds refresh)
      : libctx_(libctx),
        properties_(std::move(properties)),
        uri_(std::move(uri)),
        refresh_(refresh) {}

  OSSL_LIB_CTX* const libctx_;
  const std::string properties_;
  const std::string uri_;
  const std::chrono::milliseconds refresh_;
  std::mutex mu_;
  std::shared_ptr<const KeyAndCertificate> current_;  // guarded by mu_
  bool reloading_ = false;                            // guarded by mu_
  std::string last_error_;                            // guarded by mu_
};

}  // namespace custody::tls

#endif  // CUSTODY_PROVIDER_TLS_CREDENTIALS_H_
