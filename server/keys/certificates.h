// X.509 for ring keys, built inside custodyd: PKCS#10 certificate requests signed by a version's
// key in the token. Pure OpenSSL 3 for the structures; the signature itself is a callback (the
// token), so nothing here touches PKCS#11 or gRPC.
#ifndef CUSTODY_SERVER_KEYS_CERTIFICATES_H_
#define CUSTODY_SERVER_KEYS_CERTIFICATES_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "custody/v1/custody.pb.h"
#include "jose/json.h"
#include "openssl/evp.h"
#include "rotation/key_ring.h"
#include "server/keys/raw_signature.h"
#include "server/keys/signing_profile.h"

namespace custody::server {

// Signs what PlanRawSign prepared (the token call).
using TokenSigner = std::function<absl::StatusOr<std::string>(const RawSignPlan& plan)>;

// A PEM CSR for `public_key` with `subject` ("/CN=x/O=y", OpenSSL's form, UTF-8) and optional
// subjectAltNames ("dns:NAME", "uri:URI", "ip:ADDRESS", "email:ADDRESS"), signed with the ring's
// algorithm: ECDSA with the ring's hash, RSASSA-PSS (SHA-256, salt 32) for PS256,
// sha256WithRSAEncryption for RS256, Ed25519. INVALID_ARGUMENT with the reason for a bad
// subject or SAN; the signer's status otherwise.
absl::StatusOr<std::string> BuildCertificateRequest(const EVP_PKEY* public_key,
                                                    const SigningProfile& profile,
                                                    absl::string_view subject,
                                                    const std::vector<std::string>& sans,
                                                    const TokenSigner& sign);

struct CertificateChain {
  std::vector<std::string> der;  // leaf first
  std::string subject;           // of the leaf, RFC 2253
  std::string issuer;
  int64_t not_after_ms = 0;
  std::string sha256_thumbprint;  // base64url SHA-256 of the leaf's DER
};

// Parses a PEM chain (leaf first, at most 10 certificates, 64 KiB). INVALID_ARGUMENT with the
// reason when it holds no certificate or garbage, when a certificate is not issued by the next,
// or, with `key` given, when the leaf's public key is not `key`.
absl::StatusOr<CertificateChain> ParseCertificateChain(absl::string_view pem,
                                                       const EVP_PKEY* key = nullptr);

// Fills `out` from a stored chain; `expiring` when notAfter is within `prepublish_ms` of now.
void DescribeCertificate(absl::string_view chain_pem, int64_t prepublish_ms,
                         v1::CertificateInfo* out);

// Sets "x5c" and "x5t#S256" (RFC 7517 §4.7, §4.9) on the JWK object `jwk`.
void SetJwkCertificateMembers(const CertificateChain& chain, jose::Json& jwk);

// FAILED_PRECONDITION when `ring` requires certificates and `pending` (the version a rotation
// would promote) has none: the reason, for `ring rotate` and for the scheduler alike.
absl::Status RotationCertificateGate(const rotation::RingRecord& ring,
                                     const rotation::VersionRecord& pending);

// GetKeyRing's rotation_waiting: why the automatic rotation due at `next_rotation_ms` (0: none)
// has not happened at `now_ms`, or "" (it is not due, or nothing blocks it).
std::string RotationWaiting(const rotation::RingRecord& ring, int64_t next_rotation_ms,
                            const rotation::VersionRecord* pending, int64_t now_ms);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_CERTIFICATES_H_
