// custodyd's listeners: the address and TLS checks, the HTTP listeners (metrics, JWKS) and the
// gRPC server with its connection bounds (custodyd_startup.h).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "common/version.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "server/daemon/custodyd_flags.h"
#include "server/daemon/custodyd_startup.h"
#include "server/daemon/jwks_http.h"
#include "server/daemon/service_metrics.h"
#include "server/daemon/systemd_notify.h"
#include "server/grpc/malformed_requests.h"

namespace custody::server {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return absl::FailedPreconditionError(absl::StrCat("cannot read '", path, "'"));
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  std::fclose(f);
  return out;
}

// An HTTP listener's certificate re-read (its files changed, or SIGHUP): `metrics.tls_reload` or

// 127.0.0.0/8, ::1 or "localhost"; a name such as "127.example.com" is not loopback.
bool IsLoopbackHost(absl::string_view host) {
  if (host == "localhost") return true;
  std::string literal(host);
  if (literal.size() >= 2 && literal.front() == '[' && literal.back() == ']') {
    literal = literal.substr(1, literal.size() - 2);
  }
  in_addr v4{};
  if (inet_pton(AF_INET, literal.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  return inet_pton(AF_INET6, literal.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

// Refuses a non-loopback TCP listener without TLS: keys must not be reachable in clear.
absl::Status CheckListenAddress(const std::string& addr, bool tls,
                                absl::string_view flag = "--listen") {
  if (absl::StartsWith(addr, "unix:")) {
    if (flag != "--listen") {
      return absl::InvalidArgumentError(absl::StrCat(flag, "='", addr, "': HOST:PORT only"));
    }
    if (addr.size() <= 5) return absl::InvalidArgumentError("--listen=unix: needs a path");
    return absl::OkStatus();
  }
  size_t colon = addr.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, "='", addr, "' is neither unix:PATH nor HOST:PORT"));
  }
  int port = 0;
  if (!absl::SimpleAtoi(addr.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(flag, "='", addr, "' has no valid port"));
  }
  if (!tls && !IsLoopbackHost(addr.substr(0, colon))) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": refusing to listen on '", addr,
        "' without TLS: only loopback or a Unix socket may be used in clear; pass --tls_cert, "
        "--tls_key and --client_ca"));
  }
  return absl::OkStatus();
}

// TLS through gRPC's file-watcher provider, so that the certificate, key and client CA are
// re-read from disk every --tls_reload_seconds: custodyd's own credentials rotate without a
// restart. With --client_ca every caller must present a certificate chaining to it.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials() {
  std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
  std::string ca = absl::GetFlag(FLAGS_client_ca);
  if (cert.empty() && key.empty() && ca.empty()) return grpc::InsecureServerCredentials();
  if (cert.empty() || key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  }
  for (const std::string& path : {cert, key, ca}) {
    if (!path.empty() && !ReadFile(path).ok()) {
      return absl::FailedPreconditionError(absl::StrCat("cannot read '", path, "'"));
    }
  }
  // FAPI's TLS 1.2 cipher suites (the DHE ones are not offered by gRPC's TLS stack); TLS 1.3
  // suites are unaffected. An operator's own GRPC_SSL_CIPHER_SUITES wins.
  setenv("GRPC_SSL_CIPHER_SUITES",
         "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
         "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384",
         0);
  unsigned int refresh =
      static_cast<unsigned int>(std::max(1, absl::GetFlag(FLAGS_tls_reload_seconds)));
  auto provider =
      std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(key, cert, ca, refresh);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!ca.empty()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

// Descriptors custodyd may still open (the limit less 128 for the token, the store, the audit
// log and the listeners), and the limit itself for the messages.
struct DescriptorRoom {
  int64_t room;
  rlim_t limit;
};
DescriptorRoom GetDescriptorRoom() {
  rlimit nofile{};
  getrlimit(RLIMIT_NOFILE, &nofile);
  return {nofile.rlim_cur == RLIM_INFINITY ? INT_MAX : static_cast<int64_t>(nofile.rlim_cur) - 128,
          nofile.rlim_cur};
}

// The HTTP listeners (metrics, JWKS): like the gRPC port, in clear only on loopback; with
// --tls_cert/--tls_key, TLS with custodyd's certificate.
// `Handler` is metrics::HttpServer::Handler or ::Render.
template <typename Handler>
absl::StatusOr<std::unique_ptr<metrics::HttpServer>> StartHttp(
    const Daemon& d, absl::string_view flag, const std::string& addr, std::string cert,
    std::string key, const std::string& client_ca, Handler handler) {
  if (cert.empty() && key.empty() && d.tls) {
    cert = absl::GetFlag(FLAGS_tls_cert);
    key = absl::GetFlag(FLAGS_tls_key);
  }
  const bool https = !cert.empty() || !key.empty();
  if (absl::Status s = CheckListenAddress(addr, https, flag); !s.ok()) return s;
  metrics::HttpServer::Options options = d.http_bounds;
  options.address = addr;
  if (https) {
    options.tls_cert = cert;
    options.tls_key = key;
    options.client_ca = client_ca;
    options.on_tls_reload = [flag = std::string(flag), cert, key](const absl::Status& s) {
      LogTlsReload(flag, cert, key, "files changed", s);
    };
  }
  auto started = metrics::HttpServer::Start(options, std::move(handler));
  if (!started.ok()) {
    return absl::Status(started.status().code(),
                        absl::StrCat(flag, ": ", started.status().message()));
  }
  Log(LogLevel::kInfo, absl::StrCat(flag.substr(2, flag.find('_') - 2), ".listening"),
      {{"address", addr},
       {"port", absl::StrCat((*started)->port())},
       {"tls", https ? "true" : "false"},
       {"request_deadline", absl::FormatDuration(options.request_deadline)},
       {"max_connections", absl::StrCat(options.max_connections)}});
  return started;
}

}  // namespace

void LogTlsReload(absl::string_view flag, const std::string& cert, const std::string& key,
                  absl::string_view trigger, const absl::Status& s) {
  const absl::string_view listener = flag.substr(2, flag.find('_') - 2);
  if (s.ok()) {
    Log(LogLevel::kInfo, absl::StrCat(listener, ".tls_reload"),
        {{"cert", cert}, {"key", key}, {"trigger", std::string(trigger)}, {"result", "ok"}});
    return;
  }
  Log(LogLevel::kError, absl::StrCat(listener, ".tls_reload"),
      {{"cert", cert},
       {"key", key},
       {"trigger", std::string(trigger)},
       {"result", std::string(s.message())},
       {"hint", absl::StrCat("the previous certificate is still served on ", flag,
                             "; fix the files (write both, then rename them into place), then "
                             "send SIGHUP or let the next connection re-read them")}});
}

bool CheckHttpBounds(Daemon* d) {
  // The HTTP listeners' bounds, checked before anything is opened (a listener's connections are
  // descriptors: the same room as the Unix-socket cap).
  {
    d->http_bounds.request_deadline = absl::GetFlag(FLAGS_http_request_deadline);
    d->http_bounds.max_connections = absl::GetFlag(FLAGS_http_max_connections);
    const auto [room, limit] = GetDescriptorRoom();
    if (d->http_bounds.request_deadline < absl::Milliseconds(100) ||
        d->http_bounds.request_deadline > absl::Minutes(5)) {
      return StartupFailed(
          "startup.flags",
          absl::InvalidArgumentError(absl::StrCat(
              "--http_request_deadline=", absl::FormatDuration(d->http_bounds.request_deadline),
              ": give 100ms to 5m (how long a client may take to send a request, TLS "
              "handshake included; default 5s). Shorter cuts off honest clients on a slow "
              "link, longer lets slow ones hold connections")));
    }
    if (d->http_bounds.max_connections < 1 || d->http_bounds.max_connections > room) {
      return StartupFailed(
          "startup.flags",
          absl::InvalidArgumentError(
              absl::StrCat("--http_max_connections=", d->http_bounds.max_connections,
                           ": give 1 to ", std::max<int64_t>(room, 0),
                           " (connections open at once per HTTP listener; default 512; at most the "
                           "descriptor limit ",
                           limit, " - 128: raise LimitNOFILE / ulimit -n for more)")));
    }
  }
  return true;
}

bool PrepareListenAddress(Daemon* d) {
  d->state_dir = absl::GetFlag(FLAGS_state_dir);
  d->listen = absl::GetFlag(FLAGS_listen);
  if (d->listen.empty()) {
    d->listen =
        absl::StrCat("unix:", std::filesystem::absolute(d->state_dir).string(), "/custodyd.sock");
  }
  auto creds = MakeCredentials();
  if (!creds.ok()) return StartupFailed("startup.tls", creds.status());
  d->creds = *std::move(creds);
  d->tls = !absl::GetFlag(FLAGS_tls_cert).empty();
  if (absl::Status s = CheckListenAddress(d->listen, d->tls); !s.ok())
    return StartupFailed("startup.listen", s);
  // Before anything else is opened: a live server on our Unix socket means this start is a
  // mistake (a second custodyd, another state dir); say so rather than take its socket over.
  if (absl::StartsWith(d->listen, "unix:") && d->listen.size() > 5) {
    if (absl::Status s = ReplaceStaleSocket(d->listen.substr(5)); !s.ok()) {
      return StartupFailed("startup.listen", s);
    }
  }
  return true;
}

bool StartHttpListeners(Daemon* d) {
  if (const std::string addr = absl::GetFlag(FLAGS_metrics_listen); !addr.empty()) {
    MetricsSources sources;
    sources.requests = d->request_metrics.get();
    sources.token = d->token.get();
    sources.audit = d->audit.get();
    sources.keys = d->keys.get();
    sources.serving = [d] { return d->serving_now.load(); };
    sources.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
    auto started = StartHttp(
        *d, "--metrics_listen", addr, "", "", absl::GetFlag(FLAGS_metrics_client_ca),
        metrics::HttpServer::Render([sources] { return RenderMetrics(sources, absl::Now()); }));
    if (!started.ok()) return StartupFailed("startup.metrics", started.status());
    d->metrics_server = *std::move(started);
  }
  {
    auto publication =
        ParseJwksPublication(absl::GetFlag(FLAGS_jwks_publish), absl::GetFlag(FLAGS_jwks_alias));
    if (!publication.ok()) return StartupFailed("startup.jwks", publication.status());
    const std::string addr = absl::GetFlag(FLAGS_jwks_listen);
    if (addr.empty() && !(absl::GetFlag(FLAGS_jwks_tls_cert).empty() &&
                          absl::GetFlag(FLAGS_jwks_tls_key).empty())) {
      return StartupFailed("startup.jwks",
                           absl::InvalidArgumentError(
                               "--jwks_tls_cert/--jwks_tls_key without --jwks_listen: say "
                               "where to serve the key sets (e.g. --jwks_listen=0.0.0.0:8444)"));
    }
    if (addr.empty() && !publication->rings.empty()) {
      return StartupFailed(
          "startup.jwks",
          absl::InvalidArgumentError("--jwks_publish without --jwks_listen: say where to serve "
                                     "the key sets (e.g. --jwks_listen=127.0.0.1:8080)"));
    }
    if (!addr.empty()) {
      if (publication->rings.empty()) {
        Log(LogLevel::kWarning, "jwks.nothing_published",
            {{"hint",
              "--jwks_listen serves only the rings --jwks_publish lists; every path is "
              "404 until one is listed"}});
      }
      const std::vector<std::string> existing = d->keys->RingNames();
      for (const std::string& ring : publication->rings) {
        if (std::find(existing.begin(), existing.end(), ring) == existing.end()) {
          // Not an error: the ring may be created later (it is served from then on).
          Log(LogLevel::kWarning, "jwks.unknown_ring",
              {{"ring", ring}, {"hint", "404 until a ring of this name is created"}});
        }
      }
      auto started = StartHttp(*d, "--jwks_listen", addr, absl::GetFlag(FLAGS_jwks_tls_cert),
                               absl::GetFlag(FLAGS_jwks_tls_key), "",
                               JwksHandler(d->keys.get(), *std::move(publication)));
      if (!started.ok()) return StartupFailed("startup.jwks", started.status());
      d->jwks_server = *std::move(started);
    }
  }
  return true;
}

bool StartGrpcServer(Daemon* d) {
  // Each connection is a descriptor: the cap stays below the descriptor limit, with 128 left for
  // the token, the store, the audit log and the metrics server.
  {
    const auto [room, limit] = GetDescriptorRoom();
    d->unix_limits.max_connections =
        static_cast<int>(std::min<int64_t>(absl::GetFlag(FLAGS_max_connections), room));
    d->unix_limits.max_connections_per_uid =
        std::min(d->unix_limits.max_connections, absl::GetFlag(FLAGS_max_connections_per_uid));
    if (d->unix_limits.max_connections < 16 || d->unix_limits.max_connections_per_uid < 1) {
      return StartupFailed(
          "startup.flags",
          absl::InvalidArgumentError(absl::StrCat(
              "room for ", d->unix_limits.max_connections,
              " connections: --max_connections and --max_connections_per_uid must be >= 1 "
              "and the descriptor limit (",
              limit, ") at least 144; raise LimitNOFILE / ulimit -n")));
    }
  }
  grpc::EnableDefaultHealthCheckService(true);
  AuditMalformedRequests(d->guard.get());
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // A Unix socket without TLS is custodyd's own listener, so that a handler learns the caller's
  // uid (unix_listener.h); with TLS, gRPC listens and the certificate names the caller.
  if (absl::StartsWith(d->listen, "unix:") && !d->tls) {
    auto listener = UnixListener::Listen(d->listen.substr(5), 0660);
    if (!listener.ok()) return StartupFailed("startup.listen", listener.status());
    d->unix_listener = *std::move(listener);
  } else {
    if (absl::StartsWith(d->listen, "unix:")) {  // only a stale socket from a killed run goes
      if (absl::Status s = ReplaceStaleSocket(d->listen.substr(5)); !s.ok()) {
        return StartupFailed("startup.listen", s);
      }
    }
    builder.AddListeningPort(d->listen, d->creds);
  }
  builder.RegisterService(d->signer.get());
  builder.RegisterService(d->admin.get());
  builder.SetMaxReceiveMessageSize(4 * 1024 * 1024);
  // Threads are bounded (a call beyond is RESOURCE_EXHAUSTED at once, never a thread more), and
  // so are one connection's concurrent calls.
  d->quota = std::make_unique<grpc::ResourceQuota>("custodyd");
  d->quota->SetMaxThreads(d->max_threads);
  builder.SetResourceQuota(*d->quota);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             std::max(1, absl::GetFlag(FLAGS_max_concurrent_streams)));
  // Connections end: idle ones (no call; gRPC starts counting when the connection is set up, so
  // a peer that never sends the HTTP/2 preface is closed too), old ones (GOAWAY, then a grace for
  // the calls in flight), and ones whose peer stops answering pings.
  auto millis = [](absl::Duration t) {
    return static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(t), 1, INT_MAX));
  };
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             millis(absl::GetFlag(FLAGS_connection_idle_timeout)));
  if (absl::Duration age = absl::GetFlag(FLAGS_max_connection_age); age > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, millis(age));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, millis(absl::Minutes(1)));
  }
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             millis(absl::GetFlag(FLAGS_keepalive_time)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             millis(absl::GetFlag(FLAGS_keepalive_timeout)));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  if (int n = absl::GetFlag(FLAGS_grpc_cqs); n > 0) {
    builder.SetSyncServerOption(grpc::ServerBuilder::NUM_CQS, n);
  }
  if (int n = absl::GetFlag(FLAGS_grpc_min_pollers); n > 0) {
    builder.SetSyncServerOption(grpc::ServerBuilder::MIN_POLLERS, n);
  }
  if (int n = absl::GetFlag(FLAGS_grpc_max_pollers); n > 0) {
    builder.SetSyncServerOption(grpc::ServerBuilder::MAX_POLLERS, n);
  }
  d->server = builder.BuildAndStart();
  if (d->server == nullptr) {
    return StartupFailed("startup.listen", absl::UnavailableError(
                                               absl::StrCat("cannot listen on '", d->listen, "'")));
  }
  if (d->unix_listener != nullptr) d->unix_listener->Serve(d->server.get(), d->unix_limits);
  return true;
}

void AnnounceReady(const Daemon& d) {
  const pkcs11::TokenInfo& info = d.token->info();
  NotifySystemd(absl::StrCat("READY=1\nMAINPID=", getpid()));  // Type=notify units
  Log(LogLevel::kInfo, "custodyd.ready",
      {{"listen", d.listen},
       {"build", VersionLine("custodyd")},
       {"tls", d.tls ? "true" : "false"},
       {"module", info.module_path},
       {"token", info.label},
       {"token_serial", info.serial},
       {"rsa_x509_mechanism", d.token->HasMechanism("CKM_RSA_X_509") ? "present" : "absent"},
       {"replica_id", d.replica_id},
       {"max_connections", absl::StrCat(d.unix_limits.max_connections)},
       {"max_threads", absl::StrCat(d.max_threads)},
       {"policy", d.policy_path},
       {"audit_dir", d.audit_dir}});
}

}  // namespace custody::server
