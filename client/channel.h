// Channels to custodyd: Unix socket or TCP, in clear (loopback only) or with TLS/mTLS.
#ifndef CUSTODY_CLIENT_CHANNEL_H_
#define CUSTODY_CLIENT_CHANNEL_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace custody::client {

struct ChannelOptions {
  // unix:PATH or HOST:PORT; several replicas as a comma-separated list of the same kind
  // ("unix:/a.sock,unix:/b.sock" or "10.0.0.1:7443,10.0.0.2:7443"), or one dns:///NAME:PORT
  // whose records name the replicas. Several replicas are load-balanced round robin over the
  // ones whose grpc.health.v1 status is SERVING; the Client retries an UNAVAILABLE call, which
  // then goes to another replica.
  std::string address;
  std::string ca_file;      // PEM roots that the server certificate chains to; enables TLS
  std::string cert_file;    // client certificate chain (PEM) for mTLS
  std::string key_file;     // client private key (PEM) for mTLS
  std::string server_name;  // overrides the TLS target name (SNI / SAN check)
  // Caps gRPC's reconnect backoff after a lost connection (its default grows to 120 s); 0 keeps
  // the default. Long-lived watchers (JwksCache) want a few seconds.
  int max_reconnect_backoff_ms = 0;
  // A connection of this channel's own instead of one shared through gRPC's process-wide
  // subchannel pool: a process that forked (the custody provider in nginx's workers) then
  // connects with its own credentials rather than reusing the parent's connection.
  bool own_connection = false;
  // The same as a list (joined to `address` when `address` is empty).
  std::vector<std::string> addresses;
};

// The gRPC target for `options`' address(es) and whether it names several replicas.
// INVALID_ARGUMENT for an empty address or a list mixing kinds or holding DNS names.
absl::StatusOr<std::pair<std::string, bool>> ChannelTarget(const ChannelOptions& options);

// FAILED_PRECONDITION when a PEM file cannot be read, INVALID_ARGUMENT for an empty address.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const ChannelOptions& options);

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_CHANNEL_H_
