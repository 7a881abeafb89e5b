// Public JWKs (RFC 7517/7518/8037) from and to OpenSSL EVP_PKEYs, and RFC 7638 thumbprints.
#ifndef CUSTODY_JOSE_JWK_H_
#define CUSTODY_JOSE_JWK_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "custody/common/openssl_ptr.h"
#include "custody/jose/json.h"
#include "openssl/evp.h"

namespace custody::jose {

using PkeyPtr = OpensslPtr<EVP_PKEY>;  // the same owner as pkcs11::EvpPkeyPtr

// The public JWK of `pkey`: {"kty":"EC","crv":"P-256|P-384|P-521","x","y"} (coordinates padded
// to the field size), {"kty":"RSA","n","e"} (no leading zero bytes) or
// {"kty":"OKP","crv":"Ed25519","x"}. Private parts are never emitted. Uses EVP_PKEY_get_*_param
// only. INVALID_ARGUMENT for other key types.
absl::StatusOr<Json> PublicJwkFromPkey(const EVP_PKEY* pkey);

// RFC 7638 SHA-256 thumbprint, base64url: SHA-256 over the required members in lexicographic
// order with no whitespace (EC: crv,kty,x,y; RSA: e,kty,n; OKP: crv,kty,x).
absl::StatusOr<std::string> Rfc7638Thumbprint(const Json& jwk);

// Builds an EVP_PKEY from a public JWK (EC P-256/384/521, RSA, OKP Ed25519) through
// EVP_PKEY_fromdata. Validates that EC points are on the curve and RSA moduli are 2048..8192
// bits. Private members ("d", "p", ...) are refused: a private JWK must not reach this code.
absl::StatusOr<PkeyPtr> PkeyFromPublicJwk(const Json& jwk);

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_JWK_H_
