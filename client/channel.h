// Channels to custodyd: Unix socket or TCP, in clear (loopback only) or with TLS/mTLS.
#ifndef CUSTODY_CLIENT_CHANNEL_H_
#define CUSTODY_CLIENT_CHANNEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace custody::client {

struct ChannelOptions {
  std::string address;      // unix:PATH or HOST:PORT
  std::string ca_file;      // PEM roots that the server certificate chains to; enables TLS
  std::string cert_file;    // client certificate chain (PEM) for mTLS
  std::string key_file;     // client private key (PEM) for mTLS
  std::string server_name;  // overrides the TLS target name (SNI / SAN check)
  // Caps gRPC's reconnect backoff after a lost connection (its default grows to 120 s); 0 keeps
  // the default. Long-lived watchers (JwksCache) want a few seconds.
  int max_reconnect_backoff_ms = 0;
};

// FAILED_PRECONDITION when a PEM file cannot be read, INVALID_ARGUMENT for an empty address.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const ChannelOptions& options);

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_CHANNEL_H_
