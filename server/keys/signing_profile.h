// Maps a ring's JOSE algorithm to what the token must do: which key to generate, which
// Cryptoki scheme signs, which digest custodyd computes first. The one place where jose/ and
// pkcs11/ vocabularies meet.
#ifndef CUSTODY_SERVER_KEYS_SIGNING_PROFILE_H_
#define CUSTODY_SERVER_KEYS_SIGNING_PROFILE_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "jose/jws.h"
#include "openssl/evp.h"
#include "pkcs11/token.h"

namespace custody::server {

struct SigningProfile {
  jose::JwsAlg alg = jose::JwsAlg::kES256;
  pkcs11::KeySpec key;
  pkcs11::SignScheme scheme = pkcs11::SignScheme::kEcdsa;
  // Digest custodyd computes before the token call; nullptr for EdDSA (signs the message).
  const EVP_MD* digest = nullptr;
  size_t digest_size = 0;
};

// Resolves (alg, rsa_bits, allow_non_fapi) into a profile. INVALID_ARGUMENT with the reason for
// unknown algs, RS256 without the non-FAPI opt-in, RSA sizes other than 2048/3072/4096 and
// rsa_bits on a non-RSA alg. rsa_bits == 0 means 2048 for RSA algs.
absl::StatusOr<SigningProfile> ResolveSigningProfile(absl::string_view alg, int rsa_bits,
                                                     bool allow_non_fapi);

// The bytes handed to the token for `message` under `profile`: the digest (ECDSA, PSS), the
// DER DigestInfo (RSASSA-PKCS1-v1_5) or the message itself (EdDSA).
absl::StatusOr<std::string> TokenSignInput(const SigningProfile& profile,
                                           absl::string_view message);

// Same, for a caller-supplied digest (Signer.Sign). INVALID_ARGUMENT for EdDSA and for a digest
// of the wrong length.
absl::StatusOr<std::string> TokenSignInputFromDigest(const SigningProfile& profile,
                                                     absl::string_view digest);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_SIGNING_PROFILE_H_
