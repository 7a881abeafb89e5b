// Private keys brought into custody for import (bring your own key): from a private JWK
// (RFC 7517/7518/8037) or an unencrypted PKCS#8 / traditional PEM. The EVP_PKEY is handed to
// pkcs11/ for C_CreateObject and freed; callers wipe the source text.
#ifndef CUSTODY_JOSE_PRIVATE_KEY_H_
#define CUSTODY_JOSE_PRIVATE_KEY_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "custody/jose/json.h"
#include "custody/jose/jwk.h"

namespace custody::jose {

// RSA (n, e, d, p, q, dp, dq, qi all required: tokens need the CRT form; multi-prime "oth"
// refused), EC P-256/P-384/P-521 (crv, x, y, d) or OKP Ed25519 (crv, x, d). The key is checked
// for consistency (EVP_PKEY_pairwise_check; for Ed25519 the public x must match d).
// INVALID_ARGUMENT naming the member at fault; never echoes key material.
absl::StatusOr<PkeyPtr> PrivateKeyFromJwk(const Json& jwk);

// PEM "PRIVATE KEY" (PKCS#8) or "RSA/EC PRIVATE KEY". Encrypted PEM is refused (custody has no
// passphrase channel). INVALID_ARGUMENT when unparsable.
absl::StatusOr<PkeyPtr> PrivateKeyFromPem(absl::string_view pem);

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_PRIVATE_KEY_H_
