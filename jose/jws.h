// Compact JWS (RFC 7515): protected headers, signing input, signature encodings, verification.
// The private-key operation is not here: the caller signs the input (custodyd in the HSM).
#ifndef CUSTODY_JOSE_JWS_H_
#define CUSTODY_JOSE_JWS_H_

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "custody/jose/json.h"
#include "openssl/evp.h"

namespace custody::jose {

enum class JwsAlg { kES256, kES384, kES512, kPS256, kPS384, kPS512, kRS256, kEdDSA };

std::string_view JwsAlgName(JwsAlg alg);
// INVALID_ARGUMENT naming the value for unknown algs and for "none"/HS*.
absl::StatusOr<JwsAlg> ParseJwsAlg(std::string_view name);

struct JwsHeaderParams {
  JwsAlg alg = JwsAlg::kES256;
  std::string kid;
  std::string typ;  // omitted when empty
  std::string cty;  // omitted when empty
  // Extra protected header members chosen by the caller (an object or null). Refused when it
  // names alg, kid, jwk, jku, x5u, x5c, x5t, x5t#S256, crit, b64, zip, enc, typ or cty
  // (typ/cty have their own fields): the ring, not the caller, decides key and algorithm.
  Json extra;
  // When set, embedded as the "jwk" member (DPoP, RFC 9449). Must be a public JWK.
  std::optional<Json> jwk;
};

// The protected header JSON: {"alg","kid","typ"?,"cty"?,"jwk"?, extra...}. INVALID_ARGUMENT
// naming the forbidden member.
absl::StatusOr<std::string> BuildProtectedHeader(const JwsHeaderParams& params);

// BASE64URL(header) '.' BASE64URL(payload).
std::string JwsSigningInput(std::string_view header_json, std::string_view payload);

// signing_input '.' BASE64URL(signature).
std::string AssembleCompactJws(std::string_view signing_input, std::string_view signature);

// ECDSA signature conversions between DER (OpenSSL) and JWS r||s (RFC 7518 §3.4).
absl::StatusOr<std::string> EcdsaDerToRaw(std::string_view der, size_t field_bytes);
absl::StatusOr<std::string> EcdsaRawToDer(std::string_view raw);

struct VerifiedJws {
  Json header;
  std::string payload;
};

// Parses and verifies a compact JWS with `key`. The header's alg must be in `allowed` and
// match the key type; "none" is never accepted. Size cap 1 MiB. INVALID_ARGUMENT for malformed
// input, UNAUTHENTICATED for a bad signature.
absl::StatusOr<VerifiedJws> VerifyCompactJws(std::string_view jws, const EVP_PKEY* key,
                                             const std::vector<JwsAlg>& allowed);

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_JWS_H_
