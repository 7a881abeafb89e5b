// A throwaway PKI for the TCP+mTLS rows, made with the OpenSSL CLI (fork/exec, no shell).
#ifndef CUSTODY_BENCH_TLS_FILES_H_
#define CUSTODY_BENCH_TLS_FILES_H_

#include <string>

#include "absl/status/statusor.h"

namespace custody::bench {

struct TlsFiles {
  std::string ca_cert;      // self-signed CA (P-256)
  std::string server_cert;  // SAN IP:127.0.0.1, DNS:localhost; serverAuth
  std::string server_key;
  std::string client_cert;  // SAN URI:spiffe://custody-bench/client; clientAuth
  std::string client_key;
};

inline constexpr char kBenchClientIdentity[] = "spiffe://custody-bench/client";

// Writes the CA, server and client certificates and keys (P-256, valid two days) into `dir`.
absl::StatusOr<TlsFiles> MakeTlsFiles(const std::string& dir);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_TLS_FILES_H_
