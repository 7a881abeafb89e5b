// custodyd's start, as the named steps custodyd.cc's Run() calls in order, and what they build.
//
// Each step reads its flags (custodyd_flags.h), fills its part of a Daemon, and on failure logs
// one error line (`startup.*` event, the reason in "error") and returns false: custodyd then
// exits 1. A step uses only what the steps before it built. Not thread-safe: the main thread
// runs them one after the other.
#ifndef CUSTODY_SERVER_DAEMON_CUSTODYD_STARTUP_H_
#define CUSTODY_SERVER_DAEMON_CUSTODYD_STARTUP_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/server_credentials.h"
#include "metrics/http_server.h"
#include "pkcs11/token.h"
#include "server/daemon/metadata_backend.h"
#include "server/grpc/batch_runner.h"
#include "server/grpc/grpc_services.h"
#include "server/grpc/request_guard.h"
#include "server/grpc/request_metrics.h"
#include "server/grpc/unary_pool.h"
#include "server/grpc/unix_listener.h"
#include "server/keys/key_service.h"
#include "server/keys/metadata_tag_key.h"
#include "server/security/access_policy.h"
#include "server/security/audit_anchor.h"
#include "server/security/audit_log.h"

namespace custody::server {

// Everything a running custodyd owns, in the order startup builds it: members are destroyed in
// reverse, so the gRPC server goes before the services, the key service before the store and
// the token last.
struct Daemon {
  // Listen address and transport security (CheckHttpBounds, PrepareListenAddress).
  std::string state_dir;
  std::string listen;
  bool tls = false;
  metrics::HttpServer::Options http_bounds;
  std::shared_ptr<grpc::ServerCredentials> creds;
  // The token and the metadata store it vouches for (OpenToken, OpenMetadataStore).
  std::unique_ptr<pkcs11::Token> token;
  std::unique_ptr<MetadataTagKey> tag_key;
  MetadataBackend metadata;
  // Who may do what, and the record of what was done (OpenPolicyAndAudit).
  std::string policy_path;
  PolicyStore policy;
  std::string audit_dir;
  std::string replica_id;
  std::unique_ptr<AuditLog> audit;
  std::unique_ptr<AuditAnchoring> anchoring;
  std::unique_ptr<RequestMetrics> request_metrics;
  std::unique_ptr<RequestGuard> guard;
  // The keys and the gRPC services over them (CreateKeyService, CreateGrpcServices).
  std::unique_ptr<KeyService> keys;
  std::unique_ptr<BatchRunner> batch_runner;
  int max_threads = 0;
  std::unique_ptr<UnaryPool> unary_pool;  // runs SignJws, Sign and DecryptJwe
  std::unique_ptr<SignerService> signer;
  std::unique_ptr<KeyAdminService> admin;
  // What the gRPC health service reports, for the metrics listener.
  std::atomic<bool> serving_now{true};
  // The listeners (StartHttpListeners, StartGrpcServer).
  std::unique_ptr<metrics::HttpServer> metrics_server;
  std::unique_ptr<metrics::HttpServer> jwks_server;
  UnixListener::Limits unix_limits;
  std::unique_ptr<UnixListener> unix_listener;
  std::unique_ptr<grpc::ResourceQuota> quota;
  std::unique_ptr<grpc::Server> server;
};

// Logs `event` at error level with the status's message; returns false (a step's failure).
bool StartupFailed(absl::string_view event, const absl::Status& s);

// The first line, before anything that can block, and no core dumps (they would carry PINs and
// plaintexts).
void BeginStartup();

// custodyd_listeners.cc: the listeners' flags first (nothing is opened before they are checked).
// --http_request_deadline and --http_max_connections within their bounds.
bool CheckHttpBounds(Daemon* d);
// --listen (default unix:STATE_DIR/custodyd.sock), TLS credentials, and no live server already
// on that Unix socket.
bool PrepareListenAddress(Daemon* d);

// custodyd_startup.cc: the gRPC services' flags (checked before anything is opened, as the
// listeners' are): --max_batch_items, --max_watch_streams(_per_caller) against --max_threads,
// --unary_threads and --unary_queue.
bool CheckServiceBounds();
// The token, the store, policy and audit, the key service.
// The embedded SoftHSM2 token or --pkcs11_module's, logged in with the PIN.
bool OpenToken(Daemon* d);
// The metadata tag key in the token, then the store it vouches for (SQLite or PostgreSQL).
bool OpenMetadataStore(Daemon* d);
// The access policy (the default one written on first start), the audit log and its anchoring,
// and the request guard that checks and records every call.
bool OpenPolicyAndAudit(Daemon* d);
// KeyService over the token and the store (reconciled at creation), with the ring-policy floors.
bool CreateKeyService(Daemon* d);
// SignerService and KeyAdminService with their bounds (batch items, JWKS replies and watchers).
bool CreateGrpcServices(Daemon* d);

// custodyd_listeners.cc: the HTTP listeners (--metrics_listen, --jwks_listen), then the gRPC
// server on --listen, with its connection bounds.
bool StartHttpListeners(Daemon* d);
bool StartGrpcServer(Daemon* d);
// An HTTP listener's certificate re-read (its files changed, or SIGHUP): `metrics.tls_reload` or
// `jwks.tls_reload` (from `flag`), an error when the new files did not load and the previous
// pair is still served.
void LogTlsReload(absl::string_view flag, const std::string& cert, const std::string& key,
                  absl::string_view trigger, const absl::Status& s);
// systemd's READY=1 and the custodyd.ready line.
void AnnounceReady(const Daemon& d);

// custodyd_serve.cc: serves until SIGTERM/SIGINT (SIGHUP reloads the policy and the HTTP
// listeners' TLS files), keeping health current; then drains and stops the listeners.
void ServeUntilShutdown(Daemon* d);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_CUSTODYD_STARTUP_H_
