// custody-bench's measured rings: one per op (bench/ops.h), created in custodyd and read back
// (kid, token object, JWKS), with what every row of that op needs prepared once.
#ifndef CUSTODY_BENCH_RINGS_H_
#define CUSTODY_BENCH_RINGS_H_

#include <openssl/evp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "bench/load.h"
#include "bench/ops.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace custody::bench {

// Everything one measured op needs, prepared once and shared by the ceilings and both transports.
struct OpState {
  const OpSpec* spec = nullptr;
  std::string kid;  // the ACTIVE version's
  std::string token_object_id_hex;
  std::string decryption_mechanism;
  std::string jwks;                      // GetJwks of the ring
  std::shared_ptr<EVP_PKEY> verify_key;  // SignJws: the JWKS key with `kid`
  std::vector<std::string> jwes;         // DecryptJwe: JWEs to the ring, one per worker mod
  std::string signing_input;             // SignJws: what custodyd signs, for the ceilings
  Operation direct, openssl;             // prepared lazily
};

// A JSON payload of about `bytes` bytes (a JWT claims set).
std::string Payload(int bytes);

// "WHAT: CODE MESSAGE" of a failed call.
std::string GrpcError(const char* what, const grpc::Status& s);

// `seconds` from now, for a ClientContext.
std::chrono::system_clock::time_point Deadline(int seconds);

// Creates the ring of `spec` (its alg, purpose and RSA size).
absl::Status CreateRing(custody::v1::KeyAdmin::Stub& admin, const OpSpec& spec);

// Reads back the ring (ACTIVE version's kid and token object id) and its JWKS, and prepares the
// verification key, signing input or JWEs.
absl::Status DescribeRing(custody::v1::KeyAdmin::Stub& admin, custody::v1::Signer::Stub& signer,
                          const std::string& payload, OpState* op);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_RINGS_H_
