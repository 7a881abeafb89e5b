// libFuzzer target: the strict JSON parser, then public and private JWK import
// (jose::PkeyFromPublicJwk, jose::PrivateKeyFromJwk), thumbprints and PEM private keys.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "jose/json.h"
#include "jose/jwk.h"
#include "jose/private_key.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  (void)custody::jose::PrivateKeyFromPem(absl::string_view(input.data(), input.size()));

  absl::StatusOr<custody::jose::Json> json = custody::jose::ParseJson(input);
  if (!json.ok()) return 0;
  // Whatever parses serializes to text that parses back to the same serialization.
  const std::string text = json->Serialize();
  absl::StatusOr<custody::jose::Json> again = custody::jose::ParseJson(text);
  if (!again.ok() || again->Serialize() != text) std::abort();

  (void)custody::jose::Rfc7638Thumbprint(*json);
  absl::StatusOr<custody::jose::PkeyPtr> pub = custody::jose::PkeyFromPublicJwk(*json);
  if (pub.ok()) {
    // An accepted public JWK exports again and has a thumbprint.
    absl::StatusOr<custody::jose::Json> exported = custody::jose::PublicJwkFromPkey(pub->get());
    if (!exported.ok() || !custody::jose::Rfc7638Thumbprint(*exported).ok()) std::abort();
  }
  absl::StatusOr<custody::jose::PkeyPtr> priv = custody::jose::PrivateKeyFromJwk(*json);
  if (priv.ok()) {
    if (pub.ok()) std::abort();  // private members are refused by the public import
    if (!custody::jose::PublicJwkFromPkey(priv->get()).ok()) std::abort();
  }
  return 0;
}
