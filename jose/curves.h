// The elliptic curves custody's JOSE keys use, one table for every layer: their JWK names
// ("P-256"), OpenSSL's group names ("prime256v1") and field sizes (the bytes of x, y, and of
// each half of a JWS r||s signature).
#ifndef CUSTODY_JOSE_CURVES_H_
#define CUSTODY_JOSE_CURVES_H_

#include <cstddef>
#include <string_view>

#include "absl/types/span.h"

namespace custody::jose {

struct EcCurve {
  std::string_view jwk_name;      // "P-256", "P-384", "P-521"
  std::string_view openssl_name;  // "prime256v1", "secp384r1", "secp521r1" (NUL-terminated)
  size_t field_bytes;             // 32, 48, 66
};

// P-256, P-384, P-521, in that order.
absl::Span<const EcCurve> EcCurves();
// Null for any other name.
const EcCurve* CurveByJwkName(std::string_view name);
// OpenSSL's group name, or the NIST alias some providers report ("P-256"); null otherwise.
const EcCurve* CurveByOpensslName(std::string_view name);

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_CURVES_H_
