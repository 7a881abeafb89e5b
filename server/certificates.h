// X.509 for ring keys, built inside custodyd: PKCS#10 certificate requests signed by a version's
// key in the token. Pure OpenSSL 3 for the structures; the signature itself is a callback (the
// token), so nothing here touches PKCS#11 or gRPC.
#ifndef CUSTODY_SERVER_CERTIFICATES_H_
#define CUSTODY_SERVER_CERTIFICATES_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "openssl/evp.h"
#include "server/raw_signature.h"
#include "server/signing_profile.h"

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

}  // namespace custody::server

#endif  // CUSTODY_SERVER_CERTIFICATES_H_
