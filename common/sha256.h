// SHA-256 through OpenSSL's EVP interface: the one helper for the audit chain, the audit
// log's payload fingerprints, policy fingerprints and JWKS etags.
#ifndef CUSTODY_COMMON_SHA256_H_
#define CUSTODY_COMMON_SHA256_H_

#include <string>

#include "absl/strings/string_view.h"

namespace custody {

// The 32-byte digest. SHA-256 cannot fail on a working OpenSSL; if EVP_Digest ever did, the
// result is empty, which no caller accepts as a digest.
std::string Sha256(absl::string_view data);
// The digest in lowercase hex (64 characters), or empty as above.
std::string Sha256Hex(absl::string_view data);

}  // namespace custody

#endif  // CUSTODY_COMMON_SHA256_H_
