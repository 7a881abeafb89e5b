// JwsVerifier: verifies compact JWS/JWTs signed by custody rings (or any JWKS) and checks the
// registered claims.
//
// Key selection is strict: the header must carry a "kid" naming a key of the set, that key must
// carry an "alg" (its allow-list of one), and the header's "alg" must equal it. Keys with
// "use":"enc" never verify. Every verification failure is UNAUTHENTICATED with the reason;
// malformed input is INVALID_ARGUMENT.
#ifndef CUSTODY_CLIENT_JWS_VERIFIER_H_
#define CUSTODY_CLIENT_JWS_VERIFIER_H_

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "custody/client/jwks_cache.h"
#include "custody/jose/json.h"

namespace custody::client {

struct JwsVerifierOptions {
  std::string issuer;       // when non-empty, "iss" must equal it
  std::string audience;     // when non-empty, "aud" (string or array) must contain it
  std::string typ;          // when non-empty, the header "typ" must equal it
  bool require_exp = true;  // "exp" must be present
  // Tolerance for exp/nbf/iat comparisons.
  absl::Duration skew = absl::Seconds(60);
  std::function<absl::Time()> clock = [] { return absl::Now(); };
};

struct VerifiedJwt {
  jose::Json header;
  jose::Json claims;
};

class JwsVerifier {
 public:
  // Looks keys up in `cache` (which must outlive the verifier) at each verification.
  JwsVerifier(const JwksCache& cache, JwsVerifierOptions options);
  // Over a fixed JWK Set. INVALID_ARGUMENT when it is not a JWK Set.
  static absl::StatusOr<JwsVerifier> FromJwks(absl::string_view jwks_json,
                                              JwsVerifierOptions options);

  // Verifies the signature and the claims (exp: now - skew < exp; nbf: nbf <= now + skew;
  // iat: iat <= now + skew; iss; aud). The payload must be a JSON object. Returns the claims.
  absl::StatusOr<jose::Json> Verify(absl::string_view jws) const;
  // The same, also returning the protected header.
  absl::StatusOr<VerifiedJwt> VerifyJwt(absl::string_view jws) const;

 private:
  using KeyLookup = std::function<absl::StatusOr<jose::Json>(std::string_view kid)>;
  JwsVerifier(KeyLookup lookup, JwsVerifierOptions options);

  KeyLookup lookup_;
  JwsVerifierOptions options_;
};

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_JWS_VERIFIER_H_
