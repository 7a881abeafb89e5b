#include "client/fapi.h"

#include <initializer_list>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "jose/base64url.h"
#include "openssl/evp.h"
#include "openssl/rand.h"

namespace custody::client {
namespace {

std::string_view Sv(absl::string_view s) { return std::string_view(s.data(), s.size()); }

SignJwsOptions WithTyp(std::string typ, bool embed_jwk = false) {
  SignJwsOptions options;
  options.typ = std::move(typ);
  options.embed_jwk = embed_jwk;
  return options;
}

int64_t NowSeconds(absl::Time now) {
  return absl::ToUnixSeconds(now == absl::InfinitePast() ? absl::Now() : now);
}

// INVALID_ARGUMENT "<what> needs <names>" when one of `required` is empty, or "<what> lifetime
// must be positive".
absl::Status CheckOptions(absl::string_view what,
                          std::initializer_list<const std::string*> required,
                          absl::string_view names, absl::Duration lifetime) {
  for (const std::string* field : required) {
    if (field->empty()) return absl::InvalidArgumentError(absl::StrCat(what, " needs ", names));
  }
  if (lifetime <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " lifetime must be positive"));
  }
  return absl::OkStatus();
}

// iss, aud, iat and exp (iat + lifetime): what every token built here starts with.
jose::Json IssuedClaims(const std::string& issuer, const std::string& audience, int64_t iat,
                        absl::Duration lifetime) {
  jose::Json claims = jose::Json::MakeObject();
  claims.Set("iss", jose::Json::String(issuer));
  claims.Set("aud", jose::Json::String(audience));
  claims.Set("iat", jose::Json::Int(iat));
  claims.Set("exp", jose::Json::Int(iat + absl::ToInt64Seconds(lifetime)));
  return claims;
}

std::string Digest(const EVP_MD* md, absl::string_view value) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(value.data(), value.size(), out, &len, md, nullptr) != 1) return "";
  return std::string(reinterpret_cast<const char*>(out), len);
}

absl::StatusOr<std::string> SignClaims(const Client& client, absl::string_view ring,
                                       const jose::Json& claims, SignJwsOptions options) {
  auto signed_jws = client.SignJws(ring, claims.Serialize(), options);
  if (!signed_jws.ok()) return signed_jws.status();
  return std::move(signed_jws->jws);
}

absl::StatusOr<std::string> MaybeEncrypt(absl::StatusOr<std::string> jws, const std::string& jwks,
                                         jose::JweEnc enc) {
  if (!jws.ok() || jwks.empty()) return jws;
  EncryptOptions options;
  options.enc = enc;
  options.cty = "JWT";
  return EncryptToJwks(*jws, jwks, options);
}

// Copies `from` (an object) into `to`, refusing the members in `reserved`.
absl::Status Merge(const jose::Json& from, std::initializer_list<const char*> reserved,
                   jose::Json& to) {
  if (!from.is_object()) return absl::InvalidArgumentError("claims must be a JSON object");
  for (const auto& [k, v] : from.as_object()) {
    for (const char* r : reserved) {
      if (k == r) return absl::InvalidArgumentError(absl::StrCat("claim \"", k, "\" is reserved"));
    }
    to.Set(k, v);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> RandomJti() {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return absl::InternalError("RAND_bytes failed");
  return jose::Base64UrlEncode(std::string_view(reinterpret_cast<const char*>(bytes), 16));
}

absl::StatusOr<std::string> ClientAssertion(const Client& client, absl::string_view ring,
                                            const ClientAssertionOptions& options) {
  CUSTODY_RETURN_IF_ERROR(CheckOptions("client assertion", {&options.client_id, &options.audience},
                                       "client_id and audience", options.lifetime));
  auto jti = RandomJti();
  if (!jti.ok()) return jti.status();
  jose::Json claims =
      IssuedClaims(options.client_id, options.audience, NowSeconds(options.now), options.lifetime);
  claims.Set("sub", jose::Json::String(options.client_id));
  claims.Set("jti", jose::Json::String(*jti));
  return SignClaims(client, ring, claims, WithTyp("JWT"));
}

absl::StatusOr<std::string> RequestObject(const Client& client, absl::string_view ring,
                                          const RequestObjectOptions& options) {
  CUSTODY_RETURN_IF_ERROR(CheckOptions("request object", {&options.client_id, &options.audience},
                                       "client_id and audience", options.lifetime));
  if (options.lifetime > absl::Minutes(60)) {
    return absl::InvalidArgumentError("request object lifetime (exp - nbf) must be at most 60 min");
  }
  auto jti = RandomJti();
  if (!jti.ok()) return jti.status();
  const int64_t iat = NowSeconds(options.now);
  jose::Json claims = IssuedClaims(options.client_id, options.audience, iat, options.lifetime);
  claims.Set("nbf", jose::Json::Int(iat));
  claims.Set("jti", jose::Json::String(*jti));
  if (absl::Status s = Merge(options.claims, {"iss", "aud", "iat", "nbf", "exp"}, claims);
      !s.ok()) {
    return s;
  }
  if (claims.Find("client_id") == nullptr) {
    claims.Set("client_id", jose::Json::String(options.client_id));
  }
  return MaybeEncrypt(SignClaims(client, ring, claims, WithTyp(options.typ)),
                      options.encrypt_to_jwks, options.enc);
}

std::string AccessTokenHash(absl::string_view access_token) {
  return jose::Base64UrlEncode(Digest(EVP_sha256(), access_token));
}

absl::StatusOr<std::string> DpopProof(const Client& client, absl::string_view ring,
                                      const DpopProofOptions& options) {
  if (options.htm.empty() || options.htu.empty()) {
    return absl::InvalidArgumentError("DPoP proof needs htm and htu");
  }
  std::string htu = options.htu;
  if (size_t cut = htu.find_first_of("?#"); cut != std::string::npos) htu.resize(cut);
  auto jti = RandomJti();
  if (!jti.ok()) return jti.status();
  jose::Json claims = jose::Json::MakeObject();
  claims.Set("jti", jose::Json::String(*jti));
  claims.Set("htm", jose::Json::String(options.htm));
  claims.Set("htu", jose::Json::String(htu));
  claims.Set("iat", jose::Json::Int(NowSeconds(options.now)));
  if (!options.access_token.empty()) {
    claims.Set("ath", jose::Json::String(AccessTokenHash(options.access_token)));
  }
  if (!options.nonce.empty()) claims.Set("nonce", jose::Json::String(options.nonce));
  return SignClaims(client, ring, claims, WithTyp("dpop+jwt", /*embed_jwk=*/true));
}

absl::StatusOr<std::string> HalfHash(absl::string_view alg, absl::string_view value) {
  const EVP_MD* md = nullptr;
  if (alg == "ES256" || alg == "PS256" || alg == "RS256") {
    md = EVP_sha256();
  } else if (alg == "ES384" || alg == "PS384") {
    md = EVP_sha384();
  } else if (alg == "ES512" || alg == "PS512" || alg == "EdDSA") {
    md = EVP_sha512();
  } else {
    return absl::InvalidArgumentError(absl::StrCat("no half hash defined for alg ", alg));
  }
  std::string digest = Digest(md, value);
  if (digest.empty()) return absl::InternalError("digest failed");
  return jose::Base64UrlEncode(Sv(absl::string_view(digest).substr(0, digest.size() / 2)));
}

absl::StatusOr<std::string> IdToken(const Client& client, absl::string_view ring,
                                    const IdTokenOptions& options) {
  CUSTODY_RETURN_IF_ERROR(CheckOptions("ID token",
                                       {&options.issuer, &options.subject, &options.audience},
                                       "issuer, subject and audience", options.lifetime));
  auto alg = client.RingAlg(ring);
  if (!alg.ok()) return alg.status();
  jose::Json claims =
      IssuedClaims(options.issuer, options.audience, NowSeconds(options.now), options.lifetime);
  claims.Set("sub", jose::Json::String(options.subject));
  if (options.auth_time != absl::InfinitePast()) {
    claims.Set("auth_time", jose::Json::Int(absl::ToUnixSeconds(options.auth_time)));
  }
  if (!options.nonce.empty()) claims.Set("nonce", jose::Json::String(options.nonce));
  const std::pair<const char*, const std::string*> hashes[] = {
      {"at_hash", &options.access_token}, {"c_hash", &options.code}, {"s_hash", &options.state}};
  for (const auto& [name, value] : hashes) {
    if (value->empty()) continue;
    auto h = HalfHash(*alg, *value);
    if (!h.ok()) return h.status();
    claims.Set(name, jose::Json::String(*h));
  }
  if (absl::Status s = Merge(
          options.extra_claims,
          {"iss", "sub", "aud", "iat", "exp", "auth_time", "nonce", "at_hash", "c_hash", "s_hash"},
          claims);
      !s.ok()) {
    return s;
  }
  auto signed_jws = client.SignJws(ring, claims.Serialize(), WithTyp("JWT"));
  if (!signed_jws.ok()) return signed_jws.status();
  if (signed_jws->alg != *alg) {
    return absl::AbortedError(absl::StrCat("ring alg changed during signing (", *alg, " -> ",
                                           signed_jws->alg, "): half hashes would be wrong"));
  }
  return std::move(signed_jws->jws);
}

absl::StatusOr<std::string> JarmResponse(const Client& client, absl::string_view ring,
                                         const JarmResponseOptions& options) {
  CUSTODY_RETURN_IF_ERROR(CheckOptions("JARM response", {&options.issuer, &options.audience},
                                       "issuer and audience", options.lifetime));
  const int64_t now = NowSeconds(options.now);
  jose::Json claims = jose::Json::MakeObject();
  claims.Set("iss", jose::Json::String(options.issuer));
  claims.Set("aud", jose::Json::String(options.audience));
  claims.Set("exp", jose::Json::Int(now + absl::ToInt64Seconds(options.lifetime)));
  if (absl::Status s = Merge(options.params, {"iss", "aud", "exp"}, claims); !s.ok()) return s;
  return MaybeEncrypt(SignClaims(client, ring, claims, SignJwsOptions{}), options.encrypt_to_jwks,
                      options.enc);
}

}  // namespace custody::client
