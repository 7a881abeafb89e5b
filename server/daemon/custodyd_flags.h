// custodyd's command-line flags (defined in custodyd_flags.cc; README.md and docs/operating.md
// describe them), its --help, and the check that names a duration flag given without its unit.
#ifndef CUSTODY_SERVER_DAEMON_CUSTODYD_FLAGS_H_
#define CUSTODY_SERVER_DAEMON_CUSTODYD_FLAGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/time/time.h"

ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, state_dir);
ABSL_DECLARE_FLAG(std::string, pkcs11_module);
ABSL_DECLARE_FLAG(std::string, token_label);
ABSL_DECLARE_FLAG(std::string, pkcs11_init_args);
ABSL_DECLARE_FLAG(std::string, pin_file);
ABSL_DECLARE_FLAG(std::string, pin_env);
ABSL_DECLARE_FLAG(int, max_sessions);
ABSL_DECLARE_FLAG(int64_t, max_payload_bytes);
ABSL_DECLARE_FLAG(int64_t, batch_parallel_after_us);
ABSL_DECLARE_FLAG(int, max_batch_items);
ABSL_DECLARE_FLAG(std::string, tls_cert);
ABSL_DECLARE_FLAG(std::string, tls_key);
ABSL_DECLARE_FLAG(std::string, client_ca);
ABSL_DECLARE_FLAG(int, tls_reload_seconds);
ABSL_DECLARE_FLAG(std::string, policy_file);
ABSL_DECLARE_FLAG(std::string, audit_dir);
ABSL_DECLARE_FLAG(std::string, metadata);
ABSL_DECLARE_FLAG(std::string, metadata_password_file);
ABSL_DECLARE_FLAG(std::string, metadata_password_env);
ABSL_DECLARE_FLAG(absl::Duration, max_metadata_staleness);
ABSL_DECLARE_FLAG(absl::Duration, retired_sign_grace);
ABSL_DECLARE_FLAG(absl::Duration, min_destroy_delay);
ABSL_DECLARE_FLAG(absl::Duration, min_retain);
ABSL_DECLARE_FLAG(absl::Duration, min_rotation_period);
ABSL_DECLARE_FLAG(absl::Duration, drain_grace);
ABSL_DECLARE_FLAG(int64_t, audit_max_file_bytes);
ABSL_DECLARE_FLAG(int64_t, audit_anchor_lines);
ABSL_DECLARE_FLAG(absl::Duration, audit_anchor_interval);
ABSL_DECLARE_FLAG(bool, audit_new_chain);
ABSL_DECLARE_FLAG(bool, adopt_untagged_metadata);
ABSL_DECLARE_FLAG(std::string, replica_id);
ABSL_DECLARE_FLAG(bool, verbose);
ABSL_DECLARE_FLAG(int, grpc_cqs);
ABSL_DECLARE_FLAG(int, grpc_min_pollers);
ABSL_DECLARE_FLAG(int, grpc_max_pollers);
ABSL_DECLARE_FLAG(int, metrics_log_seconds);
ABSL_DECLARE_FLAG(std::string, metrics_listen);
ABSL_DECLARE_FLAG(std::string, metrics_client_ca);
ABSL_DECLARE_FLAG(std::string, jwks_listen);
ABSL_DECLARE_FLAG(std::vector<std::string>, jwks_publish);
ABSL_DECLARE_FLAG(std::string, jwks_tls_cert);
ABSL_DECLARE_FLAG(std::string, jwks_tls_key);
ABSL_DECLARE_FLAG(std::vector<std::string>, jwks_alias);
ABSL_DECLARE_FLAG(absl::Duration, http_request_deadline);
ABSL_DECLARE_FLAG(int, http_max_connections);
ABSL_DECLARE_FLAG(bool, metrics_ring_label);
ABSL_DECLARE_FLAG(int, metrics_max_rings);
ABSL_DECLARE_FLAG(int64_t, max_jwks_reply_bytes);
ABSL_DECLARE_FLAG(int, max_watch_streams);
ABSL_DECLARE_FLAG(int, max_watch_streams_per_caller);
ABSL_DECLARE_FLAG(int, max_threads);
ABSL_DECLARE_FLAG(int, unary_threads);
ABSL_DECLARE_FLAG(int, unary_queue);
ABSL_DECLARE_FLAG(int, max_concurrent_streams);
ABSL_DECLARE_FLAG(int, max_connections);
ABSL_DECLARE_FLAG(int, max_connections_per_uid);
ABSL_DECLARE_FLAG(absl::Duration, connection_idle_timeout);
ABSL_DECLARE_FLAG(absl::Duration, max_connection_age);
ABSL_DECLARE_FLAG(absl::Duration, keepalive_time);
ABSL_DECLARE_FLAG(absl::Duration, keepalive_timeout);

namespace custody::server {

// Prints custodyd's own flags (all but Abseil's --flagfile and friends), sorted, with their
// defaults, on stdout.
void PrintHelp();

// A duration flag given a bare number (`--http_request_deadline=5`): Abseil says only "Illegal
// value"; this says which unit to add. Empty when every duration flag has one.
std::string DurationWithoutUnit(int argc, char** argv);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_CUSTODYD_FLAGS_H_
