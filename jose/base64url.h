// base64url without padding (RFC 7515 §2, RFC 4648 §5).
#ifndef CUSTODY_JOSE_BASE64URL_H_
#define CUSTODY_JOSE_BASE64URL_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace custody::jose {

std::string Base64UrlEncode(std::string_view data);

// Strict decoding: only [A-Za-z0-9_-], no '=' padding, no whitespace, length mod 4 != 1, and
// the unused low bits of the last character must be zero (one canonical encoding per value).
// INVALID_ARGUMENT otherwise.
absl::StatusOr<std::string> Base64UrlDecode(std::string_view encoded);

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_BASE64URL_H_
