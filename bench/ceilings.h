// The two ceilings a custodyd row is compared with, run in the bench process with the same
// number of threads: the token operation alone through custody's own pkcs11::Token on the SAME
// key object custodyd uses (direct Cryptoki, no gRPC), and OpenSSL's in-process software
// operation with a fresh key of the same type (the CPU's limit).
#ifndef CUSTODY_BENCH_CEILINGS_H_
#define CUSTODY_BENCH_CEILINGS_H_

#include <string>

#include "absl/status/statusor.h"
#include "bench/load.h"
#include "bench/ops.h"
#include "pkcs11/token.h"

namespace custody::bench {

struct DirectKey {
  std::string token_object_id_hex;  // KeyVersion.token_object_id of the ring's ACTIVE version
  // KeyRing.decryption_mechanism: whether RSA-OAEP-256 runs natively in the token.
  std::string decryption_mechanism;
  std::string signing_input;  // SignJws: a signing input of the size custodyd signs
  std::string sample_jwe;     // DecryptJwe: a JWE to the ring's key
};

// The token step of one request: C_Sign (ES256/PS256 over the SHA-256 digest, EdDSA over the
// signing input); for DecryptJwe only the private-key step: raw RSA (CKM_RSA_X_509, the path
// custodyd takes where the token refuses OAEP with SHA-256) or native OAEP, or ECDH derive.
// Checked once before returning (the RSA result OAEP-decodes to a CEK; ECDH yields 32 bytes).
absl::StatusOr<Operation> MakeDirectCryptokiOp(pkcs11::Token& token, const OpSpec& spec,
                                               const DirectKey& key);

// EVP_DigestSign (hash included) with a fresh key of the same type; EVP_PKEY_decrypt
// (OAEP SHA-256) or EVP_PKEY_derive (ECDH P-256) for the decryption families.
absl::StatusOr<Operation> MakeOpenSslOp(const OpSpec& spec, const std::string& signing_input);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_CEILINGS_H_
