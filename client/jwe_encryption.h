// JWE encryption for callers of custody: encrypt to a recipient's public JWK, or to the key a
// ring publishes in its JWKS (the first "enc" key, which custodyd lists ACTIVE-first). The other
// half of Signer.DecryptJwe.
#ifndef CUSTODY_CLIENT_JWE_ENCRYPTION_H_
#define CUSTODY_CLIENT_JWE_ENCRYPTION_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "custody/jose/jwe.h"

namespace custody::client {

struct EncryptOptions {
  jose::JweEnc enc = jose::JweEnc::kA256Gcm;
  std::string cty;  // e.g. "JWT" for a nested signed JWT; omitted when empty
};

// Encrypts to `jwk` (a public JWK with "alg" naming a supported JWE alg, and optionally "kid",
// which is copied into the header). INVALID_ARGUMENT when the JWK has no usable alg.
absl::StatusOr<std::string> EncryptToJwk(absl::string_view plaintext, absl::string_view jwk_json,
                                         const EncryptOptions& options = {});

// Encrypts to the first key of `jwks_json` with "use":"enc" (or no "use") and a JWE "alg".
// NOT_FOUND when the set has none.
absl::StatusOr<std::string> EncryptToJwks(absl::string_view plaintext, absl::string_view jwks_json,
                                          const EncryptOptions& options = {});

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_JWE_ENCRYPTION_H_
