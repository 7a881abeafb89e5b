// FAPI building blocks signed by custody rings through Client::SignJws:
//   client side: ClientAssertion (RFC 7523 private_key_jwt), RequestObject (RFC 9101 JAR,
//                optionally encrypted), DpopProof (RFC 9449);
//   OP side:     HalfHash (at_hash/c_hash/s_hash), IdToken (OpenID Connect Core), JarmResponse.
//
// Times: every builder takes `now` (absl::InfinitePast() = absl::Now()), in whole seconds.
// jti values are 16 random bytes (OpenSSL RAND_bytes), base64url.
#ifndef CUSTODY_CLIENT_FAPI_H_
#define CUSTODY_CLIENT_FAPI_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "custody/client/client.h"
#include "custody/client/jwe_encryption.h"
#include "custody/jose/json.h"

namespace custody::client {

// 16 random bytes, base64url (22 characters).
absl::StatusOr<std::string> RandomJti();

struct ClientAssertionOptions {
  std::string client_id;  // iss and sub
  std::string audience;   // the OP's issuer identifier (FAPI 2.0), or its token endpoint
  absl::Duration lifetime = absl::Seconds(60);
  absl::Time now = absl::InfinitePast();
};

// RFC 7523 §3 client assertion: {"iss","sub","aud","jti","iat","exp"}, typ "JWT".
// INVALID_ARGUMENT for an empty client_id/audience or a lifetime <= 0.
absl::StatusOr<std::string> ClientAssertion(const Client& client, absl::string_view ring,
                                            const ClientAssertionOptions& options);

struct RequestObjectOptions {
  std::string client_id;  // iss (and client_id when `claims` has none)
  std::string audience;   // the OP's issuer identifier
  // The authorization request parameters (response_type, redirect_uri, scope, state, nonce,
  // code_challenge, ...), a JSON object. iss, aud, iat, nbf and exp are set by the builder and
  // refused here (INVALID_ARGUMENT).
  jose::Json claims = jose::Json::MakeObject();
  // exp - nbf; FAPI 1.0 Advanced §5.2.2 (13) caps it at 60 minutes: INVALID_ARGUMENT beyond.
  absl::Duration lifetime = absl::Minutes(5);
  absl::Time now = absl::InfinitePast();
  std::string typ = "oauth-authz-req+jwt";  // RFC 9101 §10.8; "" to omit
  // When non-empty: the signed request object is encrypted to the first encryption key of
  // this JWKS (the OP's), with cty "JWT" (nested JWT).
  std::string encrypt_to_jwks;
  jose::JweEnc enc = jose::JweEnc::kA256Gcm;
};

// RFC 9101 request object: claims + iss, aud, iat, nbf = iat, exp = iat + lifetime, jti.
absl::StatusOr<std::string> RequestObject(const Client& client, absl::string_view ring,
                                          const RequestObjectOptions& options);

struct DpopProofOptions {
  std::string htm;           // HTTP method, e.g. "POST"
  std::string htu;           // target URI; its query and fragment are removed (RFC 9449 §4.2)
  std::string access_token;  // when non-empty: ath = base64url(SHA-256(access_token))
  std::string nonce;         // server-provided DPoP-Nonce, when non-empty
  absl::Time now = absl::InfinitePast();
};

// RFC 9449 DPoP proof: typ "dpop+jwt", the ring's public JWK embedded as "jwk" (needs
// SignJwsRequest.embed_jwk; UNIMPLEMENTED without it), claims jti, htm, htu, iat, ath?, nonce?.
// An access token is bound to the key of its token request's proof (cnf.jkt) and is usable only
// while that key signs: sign proofs with a ring of their own, rotated less often than the
// access-token lifetime, rather than with the ring of the client's assertions and request
// objects, whose rotation would otherwise kill every outstanding token.
absl::StatusOr<std::string> DpopProof(const Client& client, absl::string_view ring,
                                      const DpopProofOptions& options);

// base64url(SHA-256(access_token)), the DPoP "ath" claim.
std::string AccessTokenHash(absl::string_view access_token);

// The left half of the hash of `value` (ASCII), base64url: at_hash, c_hash, s_hash.
// Hash by JWS alg: SHA-256 for ES256/PS256/RS256, SHA-384 for ES384/PS384, SHA-512 for
// ES512/PS512. For EdDSA, OpenID Connect Core's rule ("the hash algorithm used in the alg") has
// no direct answer; we use SHA-512, the hash Ed25519 itself is defined with, which is the
// convention OpenID Connect deployments and libraries use for Ed25519 (a verifier that assumed
// SHA-256 would disagree; custody rings only do Ed25519, never Ed448). INVALID_ARGUMENT for
// other algs.
absl::StatusOr<std::string> HalfHash(absl::string_view alg, absl::string_view value);

struct IdTokenOptions {
  std::string issuer;
  std::string subject;
  std::string audience;                                // the client_id (a single audience; no azp)
  std::string nonce;                                   // omitted when empty
  absl::Time auth_time = absl::InfinitePast();         // omitted when InfinitePast
  std::string access_token;                            // at_hash, when non-empty
  std::string code;                                    // c_hash, when non-empty
  std::string state;                                   // s_hash (FAPI 1.0 Advanced), when non-empty
  jose::Json extra_claims = jose::Json::MakeObject();  // e.g. acr, amr; may not override the above
  absl::Duration lifetime = absl::Minutes(5);
  absl::Time now = absl::InfinitePast();
};

// An OpenID Connect ID token signed by `ring` (typ "JWT"); the half hashes use the ring's alg
// (read from its JWKS, and checked against the alg custodyd signed with).
absl::StatusOr<std::string> IdToken(const Client& client, absl::string_view ring,
                                    const IdTokenOptions& options);

struct JarmResponseOptions {
  std::string issuer;
  std::string audience;  // the client_id
  // Authorization response parameters (code, state, or error, error_description).
  jose::Json params = jose::Json::MakeObject();
  absl::Duration lifetime = absl::Minutes(10);
  absl::Time now = absl::InfinitePast();
  std::string encrypt_to_jwks;  // the client's JWKS: encrypt (cty "JWT") when non-empty
  jose::JweEnc enc = jose::JweEnc::kA256Gcm;
};

// A JARM (FAPI JWT Secured Authorization Response Mode) response: params + iss, aud, exp.
absl::StatusOr<std::string> JarmResponse(const Client& client, absl::string_view ring,
                                         const JarmResponseOptions& options);

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_FAPI_H_
