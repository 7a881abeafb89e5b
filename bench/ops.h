// What custody-bench measures: one entry per (RPC, algorithm) row family.
#ifndef CUSTODY_BENCH_OPS_H_
#define CUSTODY_BENCH_OPS_H_

#include <string>
#include <vector>

namespace custody::bench {

enum class Rpc { kSignJws, kDecryptJwe };

struct OpSpec {
  std::string id;     // short name for --ops and JSON: "ES256", "PS256-3072", "RSA-OAEP-256", ...
  std::string label;  // table label
  Rpc rpc = Rpc::kSignJws;
  std::string ring;  // the ring custody-bench creates for it
  std::string alg;   // the ring's alg
  int rsa_bits = 0;  // 0 = not RSA
};

inline const std::vector<OpSpec>& AllOps() {
  static const std::vector<OpSpec>* ops = new std::vector<OpSpec>{
      {"ES256", "SignJws ES256", Rpc::kSignJws, "bench/es256", "ES256", 0},
      {"PS256-2048", "SignJws PS256/RSA-2048", Rpc::kSignJws, "bench/ps256-2048", "PS256", 2048},
      {"PS256-3072", "SignJws PS256/RSA-3072", Rpc::kSignJws, "bench/ps256-3072", "PS256", 3072},
      {"EdDSA", "SignJws EdDSA", Rpc::kSignJws, "bench/eddsa", "EdDSA", 0},
      {"RSA-OAEP-256", "DecryptJwe RSA-OAEP-256+A256GCM", Rpc::kDecryptJwe, "bench/rsa-oaep-256",
       "RSA-OAEP-256", 2048},
      {"ECDH-ES+A256KW", "DecryptJwe ECDH-ES+A256KW+A256GCM", Rpc::kDecryptJwe,
       "bench/ecdh-es-a256kw", "ECDH-ES+A256KW", 0},
  };
  return *ops;
}

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_OPS_H_
