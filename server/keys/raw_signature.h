// Signer.Sign for non-JOSE callers (TLS, X.509, CMS through the custody OpenSSL provider):
// which digest, which padding and which encoding a request asks for, checked against what the
// ring allows, turned into the token scheme and input. The JWS path does not use this.
#ifndef CUSTODY_SERVER_KEYS_RAW_SIGNATURE_H_
#define CUSTODY_SERVER_KEYS_RAW_SIGNATURE_H_

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "custody/v1/custody.pb.h"
#include "pkcs11/token.h"
#include "rotation/key_ring.h"
#include "server/keys/signing_profile.h"

namespace custody::server {

struct RawSignPlan {
  pkcs11::SignScheme scheme = pkcs11::SignScheme::kEcdsa;
  std::string token_input;  // the digest, the DER DigestInfo, or (Ed25519) the message
  bool der = false;         // re-encode the token's r||s as a DER ECDSA-Sig-Value
};

// INVALID_ARGUMENT with the reason for: neither digest nor data, data over `max_data_bytes`, an
// unknown digest_alg, a digest of the wrong length, a digest (or digest_alg) for an EdDSA ring,
// rsa_padding on a non-RSA ring, PKCS#1 v1.5 on a ring not created for it (only RS256 rings,
// which need allow_non_fapi, sign with it), DER encoding for a non-ECDSA ring.
absl::StatusOr<RawSignPlan> PlanRawSign(const SigningProfile& profile,
                                        const v1::SignRequest& request, size_t max_data_bytes);

// Whether a Sign request pinned to `pinned` (null: the ring has no such version) may sign when
// the ring's ACTIVE version is `active_version`. The ACTIVE version always may; a RETIRED one
// may for `grace` after its retire_time (a TLS handshake that chose the key and certificate of
// the version ACTIVE before a rotation finishes with that key: its certificate names it, and
// it is still published). Anything else (no such version too): FAILED_PRECONDITION saying to
// reload key and certificate. A key never signs with a version other than the one it was loaded
// for.
absl::Status PinnedVersionMaySign(absl::string_view ring, uint32_t requested,
                                  const rotation::VersionRecord* pinned, uint32_t active_version,
                                  int64_t now_ms, absl::Duration grace);

// r||s (each half the same length) from the token → DER ECDSA-Sig-Value (SEC 1 / RFC 3279
// §2.2.3), through jose::EcdsaRawToDer; INTERNAL when the token's output cannot be encoded.
absl::StatusOr<std::string> EcdsaJoseToDer(absl::string_view rs);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_RAW_SIGNATURE_H_
