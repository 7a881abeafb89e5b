// custodyd's flags, --help and the duration-unit check (custodyd_flags.h).
#include "server/daemon/custodyd_flags.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "server/grpc/grpc_services.h"

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

}  // namespace custody::server
