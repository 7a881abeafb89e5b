#include "jose/curves.h"

#include <array>

namespace custody::jose {
namespace {

constexpr std::array<EcCurve, 3> kCurves = {{
    {"P-256", "prime256v1", 32},
    {"P-384", "secp384r1", 48},
    {"P-521", "secp521r1", 66},
}};

}  // namespace

absl::Span<const EcCurve> EcCurves() { return kCurves; }

const EcCurve* CurveByJwkName(std::string_view name) {
  for (const EcCurve& c : kCurves) {
    if (c.jwk_name == name) return &c;
  }
  return nullptr;
}

const EcCurve* CurveByOpensslName(std::string_view name) {
  for (const EcCurve& c : kCurves) {
    if (c.openssl_name == name) return &c;
  }
  return CurveByJwkName(name);
}

}  // namespace custody::jose
