#include "client/jwe_encryption.h"

#include "absl/strings/str_cat.h"
#include "jose/json.h"

namespace custody::client {
namespace {

absl::StatusOr<std::string> EncryptTo(absl::string_view plaintext, const jose::Json& jwk,
                                      const EncryptOptions& options) {
  const jose::Json* alg = jwk.Find("alg");
  if (alg == nullptr || !alg->is_string()) {
    return absl::InvalidArgumentError("recipient JWK has no \"alg\"");
  }
  auto jwe_alg = jose::ParseJweAlg(alg->as_string());
  if (!jwe_alg.ok()) return jwe_alg.status();
  const jose::Json* kid = jwk.Find("kid");
  jose::Json extra;
  if (!options.cty.empty()) {
    extra = jose::Json::MakeObject();
    extra.Set("cty", jose::Json::String(options.cty));
  }
  return jose::EncryptCompactJwe(plaintext, jwk, *jwe_alg, options.enc,
                                 kid != nullptr && kid->is_string() ? kid->as_string() : "", extra);
}

}  // namespace

absl::StatusOr<std::string> EncryptToJwk(absl::string_view plaintext, absl::string_view jwk_json,
                                         const EncryptOptions& options) {
  auto jwk = jose::ParseJson(std::string_view(jwk_json.data(), jwk_json.size()));
  if (!jwk.ok()) return jwk.status();
  if (!jwk->is_object()) return absl::InvalidArgumentError("recipient JWK must be an object");
  return EncryptTo(plaintext, *jwk, options);
}

absl::StatusOr<std::string> EncryptToJwks(absl::string_view plaintext, absl::string_view jwks_json,
                                          const EncryptOptions& options) {
  auto jwks = jose::ParseJson(std::string_view(jwks_json.data(), jwks_json.size()));
  if (!jwks.ok()) return jwks.status();
  const jose::Json* keys = jwks->Find("keys");
  if (keys == nullptr || !keys->is_array()) {
    return absl::InvalidArgumentError("JWKS has no \"keys\" array");
  }
  for (const jose::Json& key : keys->as_array()) {
    const jose::Json* use = key.Find("use");
    const jose::Json* alg = key.Find("alg");
    if (use != nullptr && (!use->is_string() || use->as_string() != "enc")) continue;
    if (alg == nullptr || !alg->is_string() || !jose::ParseJweAlg(alg->as_string()).ok()) continue;
    return EncryptTo(plaintext, key, options);
  }
  return absl::NotFoundError("JWKS has no encryption key with a supported alg");
}

}  // namespace custody::client
