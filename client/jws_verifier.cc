#include "client/jws_verifier.h"

#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "jose/base64url.h"
#include "jose/jwk.h"
#include "jose/jws.h"

namespace custody::client {
namespace {

absl::Status Unauthenticated(absl::string_view why) {
  return absl::UnauthenticatedError(absl::StrCat("JWT rejected: ", why));
}

// A NumericDate claim as seconds; absent → nullopt; present but not an integer → error.
absl::StatusOr<std::optional<int64_t>> NumericDate(const jose::Json& claims, const char* name) {
  const jose::Json* v = claims.Find(name);
  if (v == nullptr) return std::optional<int64_t>();
  if (!v->is_number()) return Unauthenticated(absl::StrCat(name, " is not a number"));
  std::optional<int64_t> i = v->as_int();
  if (!i.has_value()) {
    // Fractional NumericDates are legal; truncate.
    double d = std::strtod(v->number_text().c_str(), nullptr);
    i = static_cast<int64_t>(d);
  }
  return i;
}

}  // namespace

JwsVerifier::JwsVerifier(KeyLookup lookup, JwsVerifierOptions options)
    : lookup_(std::move(lookup)), options_(std::move(options)) {}

JwsVerifier::JwsVerifier(const JwksCache& cache, JwsVerifierOptions options)
    : JwsVerifier([&cache](std::string_view kid) { return cache.Key(kid); }, std::move(options)) {}

absl::StatusOr<JwsVerifier> JwsVerifier::FromJwks(absl::string_view jwks_json,
                                                  JwsVerifierOptions options) {
  auto set = jose::ParseJson(std::string_view(jwks_json.data(), jwks_json.size()),
                             jose::JsonLimits{.max_bytes = 4 * 1024 * 1024});
  if (!set.ok()) return set.status();
  const jose::Json* keys = set->Find("keys");
  if (keys == nullptr || !keys->is_array()) {
    return absl::InvalidArgumentError("not a JWK Set: no \"keys\" array");
  }
  auto by_kid = std::make_shared<std::map<std::string, jose::Json, std::less<>>>();
  for (const jose::Json& k : keys->as_array()) {
    const jose::Json* kid = k.Find("kid");
    if (kid != nullptr && kid->is_string()) by_kid->emplace(kid->as_string(), k);
  }
  return JwsVerifier(
      [by_kid](std::string_view kid) -> absl::StatusOr<jose::Json> {
        auto it = by_kid->find(kid);
        if (it == by_kid->end()) {
          return absl::NotFoundError(absl::StrCat("unknown kid ", std::string(kid)));
        }
        return it->second;
      },
      std::move(options));
}

absl::StatusOr<jose::Json> JwsVerifier::Verify(absl::string_view jws) const {
  auto v = VerifyJwt(jws);
  if (!v.ok()) return v.status();
  return std::move(v->claims);
}

absl::StatusOr<VerifiedJwt> JwsVerifier::VerifyJwt(absl::string_view jws_in) const {
  const std::string_view jws(jws_in.data(), jws_in.size());
  size_t dot = jws.find('.');
  if (dot == std::string_view::npos) return absl::InvalidArgumentError("not a compact JWS");
  auto header_raw = jose::Base64UrlDecode(jws.substr(0, dot));
  if (!header_raw.ok()) return header_raw.status();
  auto header = jose::ParseJson(*header_raw);
  if (!header.ok()) return header.status();
  if (!header->is_object()) return absl::InvalidArgumentError("JWS header is not an object");

  const jose::Json* kid = header->Find("kid");
  if (kid == nullptr || !kid->is_string() || kid->as_string().empty()) {
    return Unauthenticated("no kid in the header");
  }
  auto jwk = lookup_(kid->as_string());
  if (!jwk.ok()) {
    return Unauthenticated(absl::StrCat("kid ", kid->as_string(), ": ", jwk.status().message()));
  }
  const jose::Json* key_alg = jwk->Find("alg");
  if (key_alg == nullptr || !key_alg->is_string()) {
    return Unauthenticated("the key has no alg: refusing to guess");
  }
  const jose::Json* use = jwk->Find("use");
  if (use != nullptr && use->as_string() != "sig") return Unauthenticated("not a signing key");
  const jose::Json* alg = header->Find("alg");
  if (alg == nullptr || !alg->is_string()) return Unauthenticated("no alg in the header");
  if (alg->as_string() != key_alg->as_string()) {
    return Unauthenticated(absl::StrCat("alg ", alg->as_string(), " not allowed for key ",
                                        kid->as_string(), " (", key_alg->as_string(), ")"));
  }
  auto allowed = jose::ParseJwsAlg(key_alg->as_string());
  if (!allowed.ok()) return Unauthenticated(allowed.status().message());
  if (!options_.typ.empty()) {
    const jose::Json* typ = header->Find("typ");
    if (typ == nullptr || typ->as_string() != options_.typ) {
      return Unauthenticated(absl::StrCat("typ is not ", options_.typ));
    }
  }
  auto pkey = jose::PkeyFromPublicJwk(*jwk);
  if (!pkey.ok()) return Unauthenticated(pkey.status().message());
  auto verified = jose::VerifyCompactJws(jws, pkey->get(), {*allowed});
  if (!verified.ok()) return verified.status();

  auto claims = jose::ParseJson(verified->payload, jose::JsonLimits{.max_bytes = 1024 * 1024});
  if (!claims.ok()) return Unauthenticated("payload is not JSON");
  if (!claims->is_object()) return Unauthenticated("payload is not a JSON object");

  const int64_t now = absl::ToUnixSeconds(options_.clock());
  const int64_t skew = absl::ToInt64Seconds(options_.skew);
  auto exp = NumericDate(*claims, "exp");
  if (!exp.ok()) return exp.status();
  if (!exp->has_value()) {
    if (options_.require_exp) return Unauthenticated("no exp");
  } else if (now - skew >= **exp) {
    return Unauthenticated("expired");
  }
  auto nbf = NumericDate(*claims, "nbf");
  if (!nbf.ok()) return nbf.status();
  if (nbf->has_value() && **nbf > now + skew) return Unauthenticated("not yet valid (nbf)");
  auto iat = NumericDate(*claims, "iat");
  if (!iat.ok()) return iat.status();
  if (iat->has_value() && **iat > now + skew) return Unauthenticated("issued in the future");

  if (!options_.issuer.empty()) {
    const jose::Json* iss = claims->Find("iss");
    if (iss == nullptr || !iss->is_string() || iss->as_string() != options_.issuer) {
      return Unauthenticated("wrong iss");
    }
  }
  if (!options_.audience.empty()) {
    const jose::Json* aud = claims->Find("aud");
    bool found = false;
    if (aud != nullptr && aud->is_string()) {
      found = aud->as_string() == options_.audience;
    } else if (aud != nullptr && aud->is_array()) {
      for (const jose::Json& a : aud->as_array()) {
        if (a.is_string() && a.as_string() == options_.audience) found = true;
      }
    }
    if (!found) return Unauthenticated("wrong aud");
  }
  return VerifiedJwt{*std::move(header), *std::move(claims)};
}

}  // namespace custody::client
