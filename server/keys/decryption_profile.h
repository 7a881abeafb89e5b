// Maps a decryption ring's JWE "alg" to the token key it needs, and runs the key-management
// step of a JWE (RSA-OAEP in the token, or ECDH in the token + Concat KDF + AES key unwrap) to
// recover the CEK.
#ifndef CUSTODY_SERVER_KEYS_DECRYPTION_PROFILE_H_
#define CUSTODY_SERVER_KEYS_DECRYPTION_PROFILE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/secret.h"
#include "jose/jwe.h"
#include "pkcs11/key_operations.h"

namespace custody::server {

struct DecryptionProfile {
  jose::JweAlg alg = jose::JweAlg::kRsaOaep256;
  pkcs11::KeySpec key;
  std::string curve;  // JWK crv for ECDH algs ("P-256", ...); empty for RSA
};

// INVALID_ARGUMENT with the reason for refused algs (RSA1_5, dir, PBES2-*, AxxxKW, ...), curves
// other than P-256/P-384/P-521, RSA sizes other than 2048/3072/4096, rsa_bits on ECDH algs and
// curve on RSA algs. Defaults: rsa_bits 2048, curve P-256.
absl::StatusOr<DecryptionProfile> ResolveDecryptionProfile(absl::string_view alg, int rsa_bits,
                                                           absl::string_view curve);

// How RSA-OAEP-256 runs on a token: natively, or through the raw-RSA fallback.
struct RsaOaepPath {
  bool sha256_native = false;  // token accepts CKM_RSA_PKCS_OAEP with SHA-256
};

// Describes the RSA private-key step for GetKeyRing ("token: CKM_RSA_PKCS_OAEP (SHA-256)", or the
// fallback); empty for ECDH profiles.
std::string DecryptionMechanismDescription(const DecryptionProfile& profile, RsaOaepPath path);

// Recovers the CEK of `jwe` with `key`. The epk of ECDH JWEs must have been validated against
// the ring's curve already. For RSA, a failed private-key step yields a random CEK of the right
// length instead of an error (RFC 7516 §11.5), so that the failure surfaces only at the content
// tag check, on the same path as every other failure. Errors: "decryption failed"
// (INVALID_ARGUMENT) for ECDH key-unwrap failures; UNAVAILABLE/INTERNAL for token trouble.
absl::StatusOr<Secret> RecoverCek(pkcs11::KeyOperations& token, const pkcs11::KeyPair& key,
                                  const DecryptionProfile& profile, RsaOaepPath path,
                                  const jose::ParsedJwe& jwe, absl::string_view epk_point);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_DECRYPTION_PROFILE_H_
