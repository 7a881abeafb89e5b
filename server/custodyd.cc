// custodyd: the custody gRPC service. See README.md for flags and the embedded default.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "common/secret.h"
#include "common/stderr_capture.h"
#include "common/version.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "metrics/http_server.h"
#include "pkcs11/token.h"
#include "rotation/metadata_store.h"
#include "server/audit_anchor.h"
#include "server/embedded_token.h"
#include "server/grpc_services.h"
#include "server/jwks_http.h"
#include "server/key_service.h"
#include "server/malformed_requests.h"
#include "server/metadata_backend.h"
#include "server/metadata_tag_key.h"
#include "server/request_guard.h"
#include "server/service_metrics.h"
#include "server/systemd_notify.h"
#include "server/unix_listener.h"

ABSL_FLAG(std::string, listen, "", "unix:PATH or HOST:PORT (default unix:STATE_DIR/custodyd.sock)");
ABSL_FLAG(std::string, state_dir, ".state", "state directory: metadata database, embedded token");
ABSL_FLAG(std::string, pkcs11_module, "",
          "PKCS#11 module of a real HSM; empty = the embedded SoftHSM2 token under --state_dir");
ABSL_FLAG(std::string, token_label, "", "token label or RFC 7512 PKCS#11 URI (pkcs11:token=...)");
ABSL_FLAG(std::string, pkcs11_init_args, "",
          "the module's initialization string, passed as C_Initialize pReserved (NSS softokn: "
          "\"configdir='sql:DIR' certPrefix='' keyPrefix='' secmod='secmod.db' flags=\"); "
          "see docs/hsm-compatibility.md");
ABSL_FLAG(std::string, pin_file, "", "file holding the user PIN (mode 0600 or 0400)");
ABSL_FLAG(std::string, pin_env, "CUSTODY_PIN",
          "environment variable holding the user PIN when --pin_file is not given");
ABSL_FLAG(int, max_sessions, 8, "logged-in PKCS#11 sessions in the pool");
ABSL_FLAG(int64_t, max_payload_bytes, 256 * 1024, "largest payload SignJws/Sign accept");
ABSL_FLAG(int64_t, batch_parallel_after_us, 2000,
          "a batch's remaining items are spread over helper threads when, at the first item's "
          "duration, they would take longer than this (microseconds)");
ABSL_FLAG(int, max_batch_items, custody::server::SignerService::kDefaultMaxBatchItems,
          "most requests one SignJwsBatch may carry (the client library sends at most 32)");
ABSL_FLAG(std::string, tls_cert, "", "server certificate chain (PEM); enables TLS");
ABSL_FLAG(std::string, tls_key, "", "server private key (PEM)");
ABSL_FLAG(std::string, client_ca, "", "CA bundle (PEM) that client certificates must chain to");
ABSL_FLAG(int, tls_reload_seconds, 60,
          "how often the TLS certificate, key and client CA files are re-read (rotation of "
          "custodyd's own credentials without a restart)");
ABSL_FLAG(std::string, policy_file, "",
          "access policy (JSON; see README); default STATE_DIR/policy.json, created on first start "
          "granting the Unix-socket caller everything and JWKS to every authenticated caller");
ABSL_FLAG(std::string, audit_dir, "", "audit log directory (default STATE_DIR/audit)");
ABSL_FLAG(std::string, metadata, "",
          "metadata store: empty = the embedded SQLite STATE_DIR/metadata.db; a postgresql:// URI "
          "or the path of a file holding a libpq connection string (replicas sharing one "
          "PostgreSQL; never a password)");
ABSL_FLAG(std::string, metadata_password_file, "",
          "file holding the PostgreSQL password (mode 0600 or 0400)");
ABSL_FLAG(std::string, metadata_password_env, "CUSTODY_METADATA_PASSWORD",
          "environment variable holding the PostgreSQL password when --metadata_password_file "
          "is not given (else libpq's PGPASSFILE / ~/.pgpass)");
ABSL_FLAG(absl::Duration, max_metadata_staleness, absl::Seconds(30),
          "with --metadata=postgresql: how long signing and decryption continue from memory "
          "while the database cannot be read; past it they are refused and health is "
          "NOT_SERVING, since a compromise could have been missed");
ABSL_FLAG(absl::Duration, retired_sign_grace, absl::Seconds(30),
          "how long after a rotation a key pinned to the version that was ACTIVE (a TLS key "
          "loaded through the custody provider) may still sign: handshakes in flight finish");
ABSL_FLAG(absl::Duration, min_destroy_delay, absl::Hours(24),
          "no ring policy may set destroy_delay below this (INVALID_ARGUMENT naming the bound)");
ABSL_FLAG(absl::Duration, min_retain, absl::Hours(1),
          "no ring policy may set retain below this: a retired key stays published at least "
          "this long after its last signature (cover the longest token lifetime + JWKS cache)");
ABSL_FLAG(absl::Duration, min_rotation_period, absl::Hours(1),
          "no ring policy may rotate automatically more often than this (0 = manual is allowed)");
ABSL_FLAG(absl::Duration, drain_grace, absl::Milliseconds(500),
          "after SIGTERM, how long new calls are answered UNAVAILABLE \"shutting down\" before the "
          "server stops taking them (in-flight calls then get 10 s to finish)");
ABSL_FLAG(int64_t, audit_max_file_bytes, 64 << 20,
          "an audit file is closed and the next begun past this size (older files can then be "
          "archived; see docs/access-control-and-audit.md)");
ABSL_FLAG(int64_t, audit_anchor_lines, 1000,
          "anchor the audit chain's head (seq, hash) in the metadata store and as an "
          "audit.anchor log line at least every this many lines");
ABSL_FLAG(absl::Duration, audit_anchor_interval, absl::Seconds(60),
          "... and at least this often while lines are written (and at shutdown)");
ABSL_FLAG(bool, audit_new_chain, false,
          "start even though the audit chain ends before (or differs from) the anchor in the "
          "metadata store: its files were truncated, deleted or replaced. Logged; only after "
          "checking what happened");
ABSL_FLAG(bool, adopt_untagged_metadata, false,
          "tag the metadata records that carry no tag (a start with tags interrupted before it "
          "tagged them, or a row an operator checked and cleared the tag of) instead of refusing "
          "them. Logged (metadata.tags_adopted); only after checking the database");
ABSL_FLAG(std::string, replica_id, "",
          "this replica's name in its audit chain (file names and lines); default with "
          "--metadata=postgresql: the host name (give replicas on one host distinct ids)");
ABSL_FLAG(bool, verbose, false, "debug logging");
ABSL_FLAG(int, grpc_cqs, 0, "completion queues of the sync gRPC server (0: gRPC's default)");
ABSL_FLAG(int, grpc_min_pollers, 0, "min polling threads per completion queue (0: default)");
ABSL_FLAG(int, grpc_max_pollers, 0, "max polling threads per completion queue (0: default)");
ABSL_FLAG(int, metrics_log_seconds, 60,
          "how often HSM metrics (errors by CKR code, retries, pool waits, latencies) are logged; "
          "0 = never");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT serving Prometheus metrics at /metrics (e.g. 127.0.0.1:9464); empty = off. "
          "Loopback only, unless --tls_cert/--tls_key are set: then served over TLS with them");
ABSL_FLAG(std::string, metrics_client_ca, "",
          "with TLS: CA bundle (PEM) the scraper's client certificate must chain to");
ABSL_FLAG(std::string, jwks_listen, "",
          "HOST:PORT serving the public JWKS of the --jwks_publish rings over HTTP "
          "(GET /rings/NAME/jwks.json and --jwks_alias paths); empty = off. Loopback only, "
          "unless served over TLS (--jwks_tls_cert/--jwks_tls_key, else --tls_cert/--tls_key)");
ABSL_FLAG(std::vector<std::string>, jwks_publish, {},
          "rings whose public JWKS --jwks_listen serves (comma-separated); no other ring is "
          "reachable there");
ABSL_FLAG(std::string, jwks_tls_cert, "",
          "PEM certificate chain for --jwks_listen (the name clients fetch the JWKS by); with "
          "--jwks_tls_key, TLS on any address. Default: --tls_cert/--tls_key when set");
ABSL_FLAG(std::string, jwks_tls_key, "", "PEM private key of --jwks_tls_cert");
ABSL_FLAG(std::vector<std::string>, jwks_alias, {},
          "PATH=RING[+RING...] entries (comma-separated) serving published rings' keys as one "
          "JWKS at another path, e.g. /.well-known/jwks.json=op/id-token or "
          "/clients/acme/jwks.json=clients/acme/sign+clients/acme/enc");
ABSL_FLAG(absl::Duration, http_request_deadline, absl::Seconds(5),
          "--metrics_listen and --jwks_listen: time a client has from opening a connection (or "
          "its previous reply) to its reply, headers and TLS handshake included; past it the "
          "connection is reset. 100ms to 5m");
ABSL_FLAG(int, http_max_connections, 512,
          "--metrics_listen and --jwks_listen: connections open at once per listener; the next "
          "is closed at once. 1 to the descriptor limit - 128");
ABSL_FLAG(
    bool, metrics_ring_label, true,
    "label per-call and per-ring metrics with the ring name (bounded by --metrics_max_rings)");
ABSL_FLAG(
    int, metrics_max_rings, 100,
    "rings that get a metrics label of their own; further rings are counted as ring=\"_other\"");

// Bounded work per caller (docs/operating.md "Limits"): every figure here was measured against
// the attacks of issue 28 (docs/performance.md).
ABSL_FLAG(int64_t, max_jwks_reply_bytes, 4 * 1024 * 1024,
          "largest GetJwks/WatchJwks reply; a larger key set is RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_watch_streams, 256, "concurrent WatchJwks streams, server-wide");
ABSL_FLAG(int, max_watch_streams_per_caller, 16,
          "concurrent WatchJwks streams per caller identity");
ABSL_FLAG(int, max_threads, 512,
          "gRPC server threads (grpc::ResourceQuota); must exceed --max_watch_streams");
ABSL_FLAG(int, unary_threads, 64,
          "most threads that run SignJws, Sign and DecryptJwe calls (gRPC's callback API hands "
          "each over; started on demand)");
ABSL_FLAG(int, unary_queue, 64,
          "SignJws, Sign and DecryptJwe calls that may wait for one of --unary_threads; beyond, "
          "RESOURCE_EXHAUSTED at once");
ABSL_FLAG(int, max_concurrent_streams, 128, "concurrent calls per connection (HTTP/2)");
ABSL_FLAG(int, max_connections, 1024,
          "Unix-socket connections open at once (at most the descriptor limit - 128)");
ABSL_FLAG(int, max_connections_per_uid, 128, "Unix-socket connections open at once per uid");
ABSL_FLAG(absl::Duration, connection_idle_timeout, absl::Minutes(5),
          "a connection with no call for this long is closed (also one that never sent the "
          "HTTP/2 preface)");
ABSL_FLAG(absl::Duration, max_connection_age, absl::Hours(1),
          "a connection is asked to reconnect (GOAWAY) after this long; 0: never");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Minutes(1),
          "custodyd pings each connection this often; one that does not answer within "
          "--keepalive_timeout is closed");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20), "see --keepalive_time");

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
// `jwks.tls_reload`, an error when the new files did not load and the previous pair is still
// served.
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

// The default policy written on first start: the uid custodyd runs as (the operator's service
// account), connecting over the Unix socket, may do everything; every authenticated caller may
// read public keys. Other local users and remote callers need a grant.
std::string DefaultPolicy() {
  return absl::StrCat(R"({
  "version": 1,
  "grants": [
    {"identities": ["uid:)",
                      getuid(), R"("],
     "operations": ["sign", "decrypt", "jwks", "admin.read", "admin.rotate", "admin.create",
                    "admin.destroy", "admin.import", "admin.certificate"],
     "rings": ["**"]},
    {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
  ]
}
)");
}

absl::Status EnsureDefaultPolicy(const std::string& path) {
  if (access(path.c_str(), F_OK) == 0) return absl::OkStatus();
  const std::string policy = DefaultPolicy();
  std::FILE* f = std::fopen(path.c_str(), "wx");
  if (f == nullptr)
    return absl::FailedPreconditionError(absl::StrCat("cannot create '", path, "'"));
  bool ok = std::fputs(policy.c_str(), f) >= 0;
  ok = std::fflush(f) == 0 && fsync(fileno(f)) == 0 && ok;
  std::fclose(f);
  if (!ok) return absl::FailedPreconditionError(absl::StrCat("cannot write '", path, "'"));
  chmod(path.c_str(), 0600);
  return absl::OkStatus();
}

absl::StatusOr<Secret> ReadPin(const std::string& state_dir, bool embedded) {
  std::string pin_file = absl::GetFlag(FLAGS_pin_file);
  if (pin_file.empty() && embedded) pin_file = state_dir + "/pin";
  if (!pin_file.empty()) return ReadSecretFile(pin_file);
  auto pin = ReadSecretEnv(absl::GetFlag(FLAGS_pin_env).c_str());
  if (!pin.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("no PIN: pass --pin_file=FILE or set ", absl::GetFlag(FLAGS_pin_env),
                     " (PINs are never taken from the command line)"));
  }
  return pin;
}

// A duration flag given a bare number (`--http_request_deadline=5`): Abseil says only "Illegal
// value"; this says which unit to add. Empty when every duration flag has one.
std::string DurationWithoutUnit(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (!absl::ConsumePrefix(&arg, "--") && !absl::ConsumePrefix(&arg, "-")) continue;
    const size_t eq = arg.find('=');
    const absl::string_view name = arg.substr(0, eq);
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr || !flag->IsOfType<absl::Duration>()) continue;
    std::string value;
    if (eq != absl::string_view::npos) {
      value = std::string(arg.substr(eq + 1));
    } else if (i + 1 < argc) {
      value = argv[i + 1];
    }
    double number = 0;
    if (absl::SimpleAtod(value, &number) && value != "0" && value != "inf" && value != "-inf") {
      return absl::StrCat("--", name, "=", value, ": a duration needs its unit, e.g. --", name, "=",
                          value, "s (or ms, m, h); the default is ", flag->DefaultValue());
    }
  }
  return "";
}

// custodyd's own flags (all but Abseil's --flagfile and friends), sorted, with their defaults.
void PrintHelp() {
  std::vector<absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!absl::StrContains(flag->Filename(), "absl/")) flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(),
            [](const absl::CommandLineFlag* a, const absl::CommandLineFlag* b) {
              return a->Name() < b->Name();
            });
  std::string out = absl::StrCat(
      "usage: custodyd --state_dir=DIR [--listen=unix:PATH|HOST:PORT] [--flag=value ...]\n"
      "  the custody service; docs/operating.md. custodyd --version prints the build.\n"
      "flags:\n");
  for (const absl::CommandLineFlag* flag : flags) {
    absl::StrAppend(&out, "  --", flag->Name(), "  ", flag->Help(),
                    " (default: ", flag->DefaultValue().empty() ? "\"\"" : flag->DefaultValue(),
                    ")\n");
  }
  std::fputs(out.c_str(), stdout);
}

int Run() {
  // The first line, before anything that can block (reading files a FIFO could stand in for,
  // C_Initialize, the metadata store): a custodyd that never gets further is never silent.
  Log(LogLevel::kInfo, "custodyd.starting", {{"pid", absl::StrCat(getpid())}});
  // Core dumps would carry PINs and plaintexts: off unless an operator re-enables them.
  struct rlimit no_core {
    0, 0
  };
  setrlimit(RLIMIT_CORE, &no_core);

  const std::string state_dir = absl::GetFlag(FLAGS_state_dir);
  std::string listen = absl::GetFlag(FLAGS_listen);
  if (listen.empty()) {
    listen = absl::StrCat("unix:", std::filesystem::absolute(state_dir).string(), "/custodyd.sock");
  }
  auto fail = [](absl::string_view event, const absl::Status& s) {
    Log(LogLevel::kError, event, {{"error", std::string(s.message())}});
    return 1;
  };
  // The HTTP listeners' bounds, checked before anything is opened (a listener's connections are
  // descriptors: the same room as the Unix-socket cap).
  metrics::HttpServer::Options http_bounds;
  {
    http_bounds.request_deadline = absl::GetFlag(FLAGS_http_request_deadline);
    http_bounds.max_connections = absl::GetFlag(FLAGS_http_max_connections);
    rlimit nofile{};
    getrlimit(RLIMIT_NOFILE, &nofile);
    const int64_t room =
        nofile.rlim_cur == RLIM_INFINITY ? INT_MAX : static_cast<int64_t>(nofile.rlim_cur) - 128;
    if (http_bounds.request_deadline < absl::Milliseconds(100) ||
        http_bounds.request_deadline > absl::Minutes(5)) {
      return fail(
          "startup.flags",
          absl::InvalidArgumentError(absl::StrCat(
              "--http_request_deadline=", absl::FormatDuration(http_bounds.request_deadline),
              ": give 100ms to 5m (how long a client may take to send a request, TLS "
              "handshake included; default 5s). Shorter cuts off honest clients on a slow "
              "link, longer lets slow ones hold connections")));
    }
    if (http_bounds.max_connections < 1 || http_bounds.max_connections > room) {
      return fail("startup.flags",
                  absl::InvalidArgumentError(absl::StrCat(
                      "--http_max_connections=", http_bounds.max_connections, ": give 1 to ",
                      std::max<int64_t>(room, 0),
                      " (connections open at once per HTTP listener; default 512; at most the "
                      "descriptor limit ",
                      nofile.rlim_cur, " - 128: raise LimitNOFILE / ulimit -n for more)")));
    }
  }
  auto creds = MakeCredentials();
  if (!creds.ok()) return fail("startup.tls", creds.status());
  bool tls = !absl::GetFlag(FLAGS_tls_cert).empty();
  if (absl::Status s = CheckListenAddress(listen, tls); !s.ok()) return fail("startup.listen", s);
  // Before anything else is opened: a live server on our Unix socket means this start is a
  // mistake (a second custodyd, another state dir); say so rather than take its socket over.
  if (absl::StartsWith(listen, "unix:") && listen.size() > 5) {
    if (absl::Status s = ReplaceStaleSocket(listen.substr(5)); !s.ok()) {
      return fail("startup.listen", s);
    }
  }

  const bool embedded = absl::GetFlag(FLAGS_pkcs11_module).empty();
  std::string module = embedded ? kDefaultSoftHsmModule : absl::GetFlag(FLAGS_pkcs11_module);
  std::string label = absl::GetFlag(FLAGS_token_label);
  if (embedded) {
    if (absl::Status s = PrepareEmbeddedToken(state_dir, module); !s.ok()) {
      return fail("startup.embedded_token", s);
    }
    if (label.empty()) label = kEmbeddedTokenLabel;
  } else {
    if (absl::Status s = EnsurePrivateDirectory(state_dir); !s.ok()) return fail("startup", s);
    if (label.empty()) {
      return fail("startup",
                  absl::InvalidArgumentError("--token_label is required with --pkcs11_module"));
    }
  }
  auto selector = pkcs11::ParseTokenSelector(label);
  if (!selector.ok()) return fail("startup.token_label", selector.status());
  auto pin = ReadPin(state_dir, embedded);
  if (!pin.ok()) return fail("startup.pin", pin.status());

  // The module's own diagnostics become JSON lines naming it (before it is loaded: modules
  // write during C_Initialize).
  if (absl::Status s = CaptureStderr(module); !s.ok()) {
    Log(LogLevel::kWarning, "startup.stderr_capture", {{"error", std::string(s.message())}});
  }
  pkcs11::Token::Options token_options;
  token_options.module_path = module;
  token_options.init_args = absl::GetFlag(FLAGS_pkcs11_init_args);
  token_options.selector = *selector;
  token_options.pin = *std::move(pin);
  token_options.max_sessions = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_sessions)));
  auto token = pkcs11::Token::Open(std::move(token_options));
  if (!token.ok()) return fail("startup.token", token.status());

  // The key in the token that vouches for every metadata record (found, or made at first start).
  auto tag_key = MetadataTagKey::Open(token->get());
  if (!tag_key.ok()) return fail("startup.metadata_tag_key", tag_key.status());
  Log(LogLevel::kInfo, "metadata.tag_key",
      {{"key", (*tag_key)->Describe()}, {"generated", (*tag_key)->generated() ? "true" : "false"}});
  MetadataBackendOptions metadata_options;
  metadata_options.tagger = tag_key->get();
  metadata_options.spec = absl::GetFlag(FLAGS_metadata);
  metadata_options.state_dir = state_dir;
  metadata_options.password_file = absl::GetFlag(FLAGS_metadata_password_file);
  metadata_options.password_env = absl::GetFlag(FLAGS_metadata_password_env);
  auto metadata = OpenMetadataBackend(metadata_options);
  if (!metadata.ok()) return fail("startup.metadata", metadata.status());
  Log(LogLevel::kInfo, "metadata.opened", {{"store", metadata->describe}});
  rotation::MetadataStore* store = metadata->store.get();

  std::string policy_path = absl::GetFlag(FLAGS_policy_file);
  if (policy_path.empty()) {
    policy_path = state_dir + "/policy.json";
    if (absl::Status s = EnsureDefaultPolicy(policy_path); !s.ok())
      return fail("startup.policy", s);
  }
  PolicyStore policy;
  if (absl::Status s = policy.LoadFrom(policy_path); !s.ok()) return fail("startup.policy", s);
  std::string audit_dir = absl::GetFlag(FLAGS_audit_dir);
  if (audit_dir.empty()) audit_dir = state_dir + "/audit";
  AuditLog::Options audit_options;
  audit_options.dir = audit_dir;
  std::string replica_id = absl::GetFlag(FLAGS_replica_id);
  if (replica_id.empty() && metadata->shared) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) == 0) replica_id = host;
  }
  if (replica_id.size() > 64 ||
      replica_id.find_first_not_of(
          "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
          std::string::npos) {
    return fail("startup.flags", absl::InvalidArgumentError(
                                     "--replica_id: at most 64 characters of [A-Za-z0-9._-]"));
  }
  audit_options.replica_id = replica_id;
  audit_options.max_file_bytes =
      static_cast<uint64_t>(std::max<int64_t>(4096, absl::GetFlag(FLAGS_audit_max_file_bytes)));
  auto audit = AuditLog::Open(audit_options);
  if (!audit.ok()) return fail("startup.audit", audit.status());
  AuditAnchoring::Options anchor_options;
  anchor_options.chain = replica_id;
  anchor_options.every_lines =
      static_cast<uint64_t>(std::max<int64_t>(1, absl::GetFlag(FLAGS_audit_anchor_lines)));
  anchor_options.every = absl::GetFlag(FLAGS_audit_anchor_interval);
  AuditAnchoring anchoring(audit->get(), store, anchor_options);
  if (absl::Status s = anchoring.CheckAtStartup(absl::GetFlag(FLAGS_audit_new_chain)); !s.ok()) {
    return fail("startup.audit", s);
  }
  anchoring.Tick(/*force=*/true);
  RequestMetrics::Options request_metrics_options;
  request_metrics_options.ring_label = absl::GetFlag(FLAGS_metrics_ring_label);
  request_metrics_options.max_rings =
      static_cast<size_t>(std::max(0, absl::GetFlag(FLAGS_metrics_max_rings)));
  RequestMetrics request_metrics(request_metrics_options);
  RequestGuard guard(&policy, audit->get(), &request_metrics);

  KeyService::Options key_options;
  key_options.max_payload_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_max_payload_bytes));
  key_options.shared_store = metadata->shared;
  key_options.adopt_untagged_metadata =
      (*tag_key)->generated() || absl::GetFlag(FLAGS_adopt_untagged_metadata);
  key_options.max_staleness = absl::GetFlag(FLAGS_max_metadata_staleness);
  key_options.retired_sign_grace = absl::GetFlag(FLAGS_retired_sign_grace);
  for (auto [flag, value, out] :
       {std::tuple{"--min_destroy_delay", absl::GetFlag(FLAGS_min_destroy_delay),
                   &key_options.floors.min_destroy_delay_ms},
        std::tuple{"--min_retain", absl::GetFlag(FLAGS_min_retain),
                   &key_options.floors.min_retain_ms},
        std::tuple{"--min_rotation_period", absl::GetFlag(FLAGS_min_rotation_period),
                   &key_options.floors.min_rotation_period_ms}}) {
    if (value < absl::ZeroDuration()) {
      return fail("startup.flags",
                  absl::InvalidArgumentError(absl::StrCat(flag, " must not be negative")));
    }
    *out = absl::ToInt64Milliseconds(value);
  }
  // A few re-reads per staleness period, so that one slow read does not fail the replica.
  key_options.refresh_interval =
      std::clamp(key_options.max_staleness / 4, absl::Milliseconds(200), absl::Seconds(5));
  auto keys = KeyService::Create(token->get(), store, key_options);
  if (!keys.ok()) return fail("startup.reconcile", keys.status());

  const int max_batch_items = absl::GetFlag(FLAGS_max_batch_items);
  if (max_batch_items < 1) {
    return fail("startup.flags", absl::InvalidArgumentError("--max_batch_items must be >= 1"));
  }
  BatchRunner::Options runner_options;
  runner_options.threads = std::max(1, absl::GetFlag(FLAGS_max_sessions)) - 1;
  runner_options.parallel_after =
      absl::Microseconds(std::max<int64_t>(0, absl::GetFlag(FLAGS_batch_parallel_after_us)));
  BatchRunner batch_runner(runner_options);
  SignerService::JwksLimits jwks_limits;
  jwks_limits.max_reply_bytes =
      static_cast<size_t>(std::max<int64_t>(1024, absl::GetFlag(FLAGS_max_jwks_reply_bytes)));
  jwks_limits.max_watch_streams = absl::GetFlag(FLAGS_max_watch_streams);
  jwks_limits.max_watch_streams_per_caller = absl::GetFlag(FLAGS_max_watch_streams_per_caller);
  const int max_threads = absl::GetFlag(FLAGS_max_threads);
  // Watchers hold a thread each: the rest of the quota is what every other call has.
  if (jwks_limits.max_watch_streams < 1 || jwks_limits.max_watch_streams_per_caller < 1 ||
      max_threads < jwks_limits.max_watch_streams + 32) {
    return fail("startup.flags",
                absl::InvalidArgumentError(absl::StrCat(
                    "--max_watch_streams and --max_watch_streams_per_caller must be >= 1 and "
                    "--max_threads (",
                    max_threads, ") at least --max_watch_streams + 32 (",
                    jwks_limits.max_watch_streams + 32, ")")));
  }
  const int unary_threads = absl::GetFlag(FLAGS_unary_threads);
  const int unary_queue = absl::GetFlag(FLAGS_unary_queue);
  if (unary_threads < 1 || unary_queue < 0) {
    return fail("startup.flags", absl::InvalidArgumentError(absl::StrCat(
                                     "--unary_threads (", unary_threads, ") must be >= 1 and ",
                                     "--unary_queue (", unary_queue, ") >= 0")));
  }
  auto unary_pool = std::make_unique<UnaryPool>(unary_threads, static_cast<size_t>(unary_queue));
  SignerService signer(keys->get(), &guard, max_batch_items, &batch_runner, jwks_limits,
                       unary_pool.get());
  KeyAdminService admin(keys->get(), &guard);
  std::atomic<bool> serving_now{true};
  // The HTTP listeners (metrics, JWKS): like the gRPC port, in clear only on loopback; with
  // --tls_cert/--tls_key, TLS with custodyd's certificate.
  auto start_http = [&](absl::string_view flag, const std::string& addr, std::string cert,
                        std::string key, const std::string& client_ca,
                        auto handler) -> absl::StatusOr<std::unique_ptr<metrics::HttpServer>> {
    if (cert.empty() && key.empty() && tls) {
      cert = absl::GetFlag(FLAGS_tls_cert);
      key = absl::GetFlag(FLAGS_tls_key);
    }
    const bool https = !cert.empty() || !key.empty();
    if (absl::Status s = CheckListenAddress(addr, https, flag); !s.ok()) return s;
    metrics::HttpServer::Options options = http_bounds;
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
  };
  std::unique_ptr<metrics::HttpServer> metrics_server;
  if (const std::string addr = absl::GetFlag(FLAGS_metrics_listen); !addr.empty()) {
    MetricsSources sources;
    sources.requests = &request_metrics;
    sources.token = token->get();
    sources.audit = audit->get();
    sources.keys = keys->get();
    sources.serving = [&serving_now] { return serving_now.load(); };
    sources.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
    auto started = start_http(
        "--metrics_listen", addr, "", "", absl::GetFlag(FLAGS_metrics_client_ca),
        metrics::HttpServer::Render([sources] { return RenderMetrics(sources, absl::Now()); }));
    if (!started.ok()) return fail("startup.metrics", started.status());
    metrics_server = *std::move(started);
  }
  std::unique_ptr<metrics::HttpServer> jwks_server;
  {
    auto publication =
        ParseJwksPublication(absl::GetFlag(FLAGS_jwks_publish), absl::GetFlag(FLAGS_jwks_alias));
    if (!publication.ok()) return fail("startup.jwks", publication.status());
    const std::string addr = absl::GetFlag(FLAGS_jwks_listen);
    if (addr.empty() && !(absl::GetFlag(FLAGS_jwks_tls_cert).empty() &&
                          absl::GetFlag(FLAGS_jwks_tls_key).empty())) {
      return fail("startup.jwks",
                  absl::InvalidArgumentError(
                      "--jwks_tls_cert/--jwks_tls_key without --jwks_listen: say "
                      "where to serve the key sets (e.g. --jwks_listen=0.0.0.0:8444)"));
    }
    if (addr.empty() && !publication->rings.empty()) {
      return fail("startup.jwks", absl::InvalidArgumentError(
                                      "--jwks_publish without --jwks_listen: say where to serve "
                                      "the key sets (e.g. --jwks_listen=127.0.0.1:8080)"));
    }
    if (!addr.empty()) {
      if (publication->rings.empty()) {
        Log(LogLevel::kWarning, "jwks.nothing_published",
            {{"hint",
              "--jwks_listen serves only the rings --jwks_publish lists; every path is "
              "404 until one is listed"}});
      }
      const std::vector<std::string> existing = (*keys)->RingNames();
      for (const std::string& ring : publication->rings) {
        if (std::find(existing.begin(), existing.end(), ring) == existing.end()) {
          // Not an error: the ring may be created later (it is served from then on).
          Log(LogLevel::kWarning, "jwks.unknown_ring",
              {{"ring", ring}, {"hint", "404 until a ring of this name is created"}});
        }
      }
      auto started = start_http("--jwks_listen", addr, absl::GetFlag(FLAGS_jwks_tls_cert),
                                absl::GetFlag(FLAGS_jwks_tls_key), "",
                                JwksHandler(keys->get(), *std::move(publication)));
      if (!started.ok()) return fail("startup.jwks", started.status());
      jwks_server = *std::move(started);
    }
  }
  // Each connection is a descriptor: the cap stays below the descriptor limit, with 128 left for
  // the token, the store, the audit log and the metrics server.
  UnixListener::Limits unix_limits;
  {
    rlimit nofile{};
    getrlimit(RLIMIT_NOFILE, &nofile);
    const int64_t room =
        nofile.rlim_cur == RLIM_INFINITY ? INT_MAX : static_cast<int64_t>(nofile.rlim_cur) - 128;
    unix_limits.max_connections =
        static_cast<int>(std::min<int64_t>(absl::GetFlag(FLAGS_max_connections), room));
    unix_limits.max_connections_per_uid =
        std::min(unix_limits.max_connections, absl::GetFlag(FLAGS_max_connections_per_uid));
    if (unix_limits.max_connections < 16 || unix_limits.max_connections_per_uid < 1) {
      return fail("startup.flags",
                  absl::InvalidArgumentError(absl::StrCat(
                      "room for ", unix_limits.max_connections,
                      " connections: --max_connections and --max_connections_per_uid must be >= 1 "
                      "and the descriptor limit (",
                      nofile.rlim_cur, ") at least 144; raise LimitNOFILE / ulimit -n")));
    }
  }
  grpc::EnableDefaultHealthCheckService(true);
  AuditMalformedRequests(&guard);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // A Unix socket without TLS is custodyd's own listener, so that a handler learns the caller's
  // uid (unix_listener.h); with TLS, gRPC listens and the certificate names the caller.
  std::unique_ptr<UnixListener> unix_listener;
  if (absl::StartsWith(listen, "unix:") && !tls) {
    auto listener = UnixListener::Listen(listen.substr(5), 0660);
    if (!listener.ok()) return fail("startup.listen", listener.status());
    unix_listener = *std::move(listener);
  } else {
    if (absl::StartsWith(listen, "unix:")) {  // only a stale socket from a killed run goes
      if (absl::Status s = ReplaceStaleSocket(listen.substr(5)); !s.ok()) {
        return fail("startup.listen", s);
      }
    }
    builder.AddListeningPort(listen, *creds);
  }
  builder.RegisterService(&signer);
  builder.RegisterService(&admin);
  builder.SetMaxReceiveMessageSize(4 * 1024 * 1024);
  // Threads are bounded (a call beyond is RESOURCE_EXHAUSTED at once, never a thread more), and
  // so are one connection's concurrent calls.
  grpc::ResourceQuota quota("custodyd");
  quota.SetMaxThreads(max_threads);
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             std::max(1, absl::GetFlag(FLAGS_max_concurrent_streams)));
  // Connections end: idle ones (no call; gRPC starts counting when the connection is set up, so
  // a peer that never sends the HTTP/2 preface is closed too), old ones (GOAWAY, then a grace for
  // the calls in flight), and ones whose peer stops answering pings.
  auto millis = [](absl::Duration d) {
    return static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(d), 1, INT_MAX));
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
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    return fail("startup.listen",
                absl::UnavailableError(absl::StrCat("cannot listen on '", listen, "'")));
  }
  if (unix_listener != nullptr) unix_listener->Serve(server.get(), unix_limits);
  const pkcs11::TokenInfo& info = (*token)->info();
  NotifySystemd(absl::StrCat("READY=1\nMAINPID=", getpid()));  // Type=notify units
  Log(LogLevel::kInfo, "custodyd.ready",
      {{"listen", listen},
       {"build", VersionLine("custodyd")},
       {"tls", tls ? "true" : "false"},
       {"module", info.module_path},
       {"token", info.label},
       {"token_serial", info.serial},
       {"rsa_x509_mechanism", (*token)->HasMechanism("CKM_RSA_X_509") ? "present" : "absent"},
       {"replica_id", replica_id},
       {"max_connections", absl::StrCat(unix_limits.max_connections)},
       {"max_threads", absl::StrCat(max_threads)},
       {"policy", policy_path},
       {"audit_dir", audit_dir}});

  std::atomic<bool> stopping{false};
  // Health follows the audit log and the token: while either cannot do its job every call
  // would fail, and load balancers should send traffic elsewhere until it recovers. The token is
  // probed (a cheap C_GetSessionInfo, recovering sessions if needed) every second; HSM metrics
  // are logged every --metrics_log_seconds.
  std::thread health([&] {
    bool serving = true;
    std::string cause;
    auto last_probe = absl::Now(), last_metrics = absl::Now(), last_audit_probe = absl::Now();
    const absl::Duration metrics_every = absl::Seconds(absl::GetFlag(FLAGS_metrics_log_seconds));
    while (!stopping.load()) {
      bool token_ok = (*token)->Healthy();
      if (!token_ok || absl::Now() - last_probe > absl::Seconds(1)) {
        token_ok = (*token)->Probe().ok();
        last_probe = absl::Now();
      }
      bool audit_ok = guard.healthy();
      // After a failure the audit log is re-tested on its own, once a second, so that service
      // returns when the disk does (not only when a caller's line happens to succeed).
      if (!audit_ok && absl::Now() - last_audit_probe > absl::Seconds(1)) {
        last_audit_probe = absl::Now();
        audit_ok = (*audit)->Probe().ok();
      }
      anchoring.Tick(/*force=*/false);
      bool metadata_ok = (*keys)->CheckMetadataFresh().ok();
      bool healthy = token_ok && audit_ok && metadata_ok;
      if (healthy != serving) {
        serving = healthy;
        cause = !audit_ok      ? "audit log"
                : !token_ok    ? "token unreachable"
                : !metadata_ok ? "metadata unreachable past --max_metadata_staleness"
                               : "recovered";
        server->GetHealthCheckService()->SetServingStatus(serving);
        serving_now = serving;
        Log(serving ? LogLevel::kInfo : LogLevel::kError, "health.changed",
            {{"serving", serving ? "true" : "false"}, {"cause", cause}});
      }
      if (metrics_every > absl::ZeroDuration() && absl::Now() - last_metrics > metrics_every) {
        last_metrics = absl::Now();
        pkcs11::Token::Metrics m = (*token)->GetMetrics();
        std::string errors;
        for (const auto& [ckr, n] : m.errors) absl::StrAppend(&errors, ckr, "=", n, " ");
        auto mean = [](const pkcs11::Token::Latency& l) {
          return absl::StrCat(l.count == 0 ? 0 : l.total_micros / l.count);
        };
        Log(LogLevel::kInfo, "metrics.hsm",
            {{"errors", errors},
             {"retries", absl::StrCat(m.retries)},
             {"recoveries", absl::StrCat(m.recoveries)},
             {"module_reinitializations", absl::StrCat(m.module_reinitializations)},
             {"reinit_backoffs", absl::StrCat(m.reinit_backoffs)},
             {"pool_waits", absl::StrCat(m.pool_waits)},
             {"pool_rejections", absl::StrCat(m.pool_rejections)},
             {"pool_timeouts", absl::StrCat(m.pool_timeouts)},
             {"sign_count", absl::StrCat(m.sign.count)},
             {"sign_mean_us", mean(m.sign)},
             {"sign_max_us", absl::StrCat(m.sign.max_micros)},
             {"decrypt_count", absl::StrCat(m.decrypt.count)},
             {"decrypt_mean_us", mean(m.decrypt)},
             {"derive_count", absl::StrCat(m.derive.count)},
             {"derive_mean_us", mean(m.derive)}});
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  // SIGTERM/SIGINT: stop accepting, let in-flight calls finish (bounded), then exit.
  // SIGHUP: reload the access policy and the HTTP listeners' TLS files (a bad file keeps the old
  // one in use, and says why).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  std::thread waiter([&] {
    for (;;) {
      int sig = 0;
      sigwait(&signals, &sig);
      if (sig == SIGHUP) {
        NotifySystemd("RELOADING=1");
        absl::Status s = policy.LoadFrom(policy_path);
        for (auto [flag, http] : {std::pair{"--metrics_listen", metrics_server.get()},
                                  std::pair{"--jwks_listen", jwks_server.get()}}) {
          if (http != nullptr && http->serves_tls()) {
            LogTlsReload(flag, http->tls_cert(), http->tls_key(), "SIGHUP", http->ReloadTls());
          }
        }
        NotifySystemd("READY=1");
        Log(s.ok() ? LogLevel::kInfo : LogLevel::kError, "policy.reloaded",
            {{"path", policy_path}, {"result", s.ok() ? "ok" : std::string(s.message())}});
        continue;
      }
      Log(LogLevel::kInfo, "custodyd.shutdown", {{"signal", absl::StrCat(sig)}});
      NotifySystemd("STOPPING=1");
      guard.BeginShutdown();  // new calls: UNAVAILABLE "shutting down", so clients fail over
      server->GetHealthCheckService()->SetServingStatus(false);
      (*keys)->StopScheduler();
      // For a moment every new call is answered at once (UNAVAILABLE) while the server still
      // takes them: the handler threads stay free, so no call waits unserved when the server
      // stops (gRPC cancels those: CANCELLED, which clients do not fail over on).
      absl::SleepFor(absl::GetFlag(FLAGS_drain_grace));
      if (unix_listener != nullptr) unix_listener->Stop();
      server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
      return;
    }
  });
  server->Wait();
  waiter.join();
  stopping = true;
  health.join();
  anchoring.Tick(/*force=*/true);  // the head at shutdown
  if (metrics_server != nullptr) metrics_server->Stop();
  if (jwks_server != nullptr) jwks_server->Stop();
  return 0;
}

}  // namespace
}  // namespace custody::server

int main(int argc, char** argv) {
  // Block the shutdown signals in every thread (gRPC's included) before any is created, so
  // only the waiter thread receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
#ifdef NDEBUG
  // Debian's Abseil keeps Mutex deadlock detection on, which records every lock acquisition in
  // a global graph (about 2% of custodyd's CPU per signature). Debug builds (the sanitizer CI
  // job) keep it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  absl::SetProgramUsageMessage("custodyd --state_dir=DIR [--listen=unix:PATH|HOST:PORT] ...");
  // --help and --version answer on stdout and exit 0 (Abseil's own --help exits 1 and lists
  // every library's flags under the source file that defines them).
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-help" || arg == "-h" || arg == "--helpfull") {
      custody::server::PrintHelp();
      return 0;
    }
    if (arg == "--version" || arg == "-version") {
      std::printf("%s\n", custody::VersionLine("custodyd").c_str());
      return 0;
    }
  }
  if (const std::string error = custody::server::DurationWithoutUnit(argc, argv); !error.empty()) {
    custody::Log(custody::LogLevel::kError, "startup.flags", {{"error", error}});
    return 1;
  }
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_verbose)) custody::SetLogLevel(custody::LogLevel::kDebug);
  return custody::server::Run();
}
