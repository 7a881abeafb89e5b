// custodyd's /metrics page: the per-call metrics (request_metrics.h) and, read at scrape time,
// the token's counters (pkcs11::Token::Metrics: errors by Cryptoki function and CKR, retries,
// recoveries, module re-initializations, the session pool), the audit log's (lines, group
// commits, fsync latency, failures), the rings' (versions by state, time to the next scheduled
// rotation, age of the ACTIVE version), health and the TLS certificate's expiry. Every metric
// and label is listed in docs/metrics.md.
//
// Rendering reads snapshots only (Token::GetMetrics, AuditLog::stats, KeyService::ListKeyRings
// from memory); it makes no token call and holds no lock across one. Thread-safe.
#ifndef CUSTODY_SERVER_DAEMON_SERVICE_METRICS_H_
#define CUSTODY_SERVER_DAEMON_SERVICE_METRICS_H_

#include <functional>
#include <string>

#include "absl/time/time.h"
#include "pkcs11/token.h"
#include "server/grpc/request_metrics.h"
#include "server/keys/key_service.h"
#include "server/security/audit_log.h"

namespace custody::server {

struct MetricsSources {
  RequestMetrics* requests = nullptr;
  const pkcs11::Token* token = nullptr;
  const AuditLog* audit = nullptr;
  const KeyService* keys = nullptr;
  // Whether custodyd's gRPC health service reports SERVING.
  std::function<bool()> serving;
  // The server certificate chain (PEM) whose leaf's expiry is exported; empty: none.
  std::string tls_cert_file;
  absl::Time start_time = absl::Now();
};

// The exposition text (format 0.0.4) of every source that is set, at time `now`.
std::string RenderMetrics(const MetricsSources& sources, absl::Time now);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_SERVICE_METRICS_H_
