#include "client/channel.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/regular_file.h"

namespace custody::client {
namespace {

bool IsIpv4HostPort(absl::string_view a) {
  size_t colon = a.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  for (char c : a.substr(0, colon)) {
    if (!(c == '.' || (c >= '0' && c <= '9'))) return false;
  }
  return true;
}

// Round robin over the replicas that report SERVING (client-side health checking of service "").
constexpr char kReplicaServiceConfig[] =
    R"({"loadBalancingConfig":[{"round_robin":{}}],"healthCheckConfig":{"serviceName":""}})";

// The minimum time a connection attempt is given (gRPC's own default as well).
constexpr int kConnectTimeoutMs = 20000;

}  // namespace

absl::StatusOr<std::pair<std::string, bool>> ChannelTarget(const ChannelOptions& options) {
  std::vector<std::string> list = options.addresses;
  if (!options.address.empty()) {
    list.clear();
    for (absl::string_view a : absl::StrSplit(options.address, ',', absl::SkipWhitespace())) {
      list.emplace_back(absl::StripAsciiWhitespace(a));
    }
  }
  if (list.empty()) return absl::InvalidArgumentError("address is empty");
  if (list.size() == 1) {
    return std::make_pair(list[0], absl::StartsWith(list[0], "dns:"));
  }
  // gRPC's unix: and ipv4: resolvers take a comma-separated list of one kind.
  std::vector<std::string> parts;
  if (std::all_of(list.begin(), list.end(),
                  [](const std::string& a) { return absl::StartsWith(a, "unix:"); })) {
    for (const std::string& a : list) parts.push_back(a.substr(5));
    return std::make_pair("unix:" + absl::StrJoin(parts, ","), true);
  }
  if (std::all_of(list.begin(), list.end(), [](const std::string& a) {
        return IsIpv4HostPort(absl::StripPrefix(a, "ipv4:"));
      })) {
    for (const std::string& a : list) parts.emplace_back(absl::StripPrefix(a, "ipv4:"));
    return std::make_pair("ipv4:" + absl::StrJoin(parts, ","), true);
  }
  return absl::InvalidArgumentError(
      "several addresses must all be unix:PATH or all IPv4 HOST:PORT; for host names use one "
      "dns:///NAME:PORT whose records name the replicas");
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const ChannelOptions& options) {
  auto target = ChannelTarget(options);
  if (!target.ok()) return target.status();
  grpc::ChannelArguments args;
  if (options.own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetMaxReceiveMessageSize(16 * 1024 * 1024);
  if (options.max_reconnect_backoff_ms > 0) {
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, options.max_reconnect_backoff_ms);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
                std::min(options.max_reconnect_backoff_ms, 1000));
  }
  if (target->second) {
    args.SetServiceConfigJSON(kReplicaServiceConfig);
    // A replica that comes back is used again within a second, not after gRPC's default
    // backoff (up to 120 s).
    if (options.max_reconnect_backoff_ms <= 0) {
      args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
      args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    }
  }
  // GRPC_ARG_MIN_RECONNECT_BACKOFF_MS is also gRPC's minimum connect timeout: a connection
  // attempt is given max(next backoff, now + this) before it counts as failed. Set low (it was
  // 100 ms), a replica that is slow to send its HTTP/2 SETTINGS (paused, or starved of CPU) is
  // put in TRANSIENT_FAILURE while it is coming up, and a call fails UNAVAILABLE long before
  // its deadline. At kConnectTimeoutMs, longer than any call's deadline here, the call's own
  // deadline is what ends a wait for a connection.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, kConnectTimeoutMs);
  if (options.ca_file.empty()) {
    return grpc::CreateCustomChannel(target->first, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  auto roots = ReadWholeFile(options.ca_file);
  if (!roots.ok()) return roots.status();
  ssl.pem_root_certs = *roots;
  if (!options.cert_file.empty()) {
    auto cert = ReadWholeFile(options.cert_file);
    if (!cert.ok()) return cert.status();
    auto key = ReadWholeFile(options.key_file);
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
  }
  if (!options.server_name.empty()) {
    args.SetSslTargetNameOverride(options.server_name);
  }
  return grpc::CreateCustomChannel(target->first, grpc::SslCredentials(ssl), args);
}

}  // namespace custody::client
