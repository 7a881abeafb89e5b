// Who is calling, may they, and the record of it: the caller's identity from its TLS
// certificate (or the transport), the access-policy decision, and the audit line every call
// leaves, allowed or denied. Used by the gRPC services for every RPC.
//
// Fail closed: when the audit line cannot be made durable, the call's reply is UNAVAILABLE
// whatever the operation returned, so no operation is acknowledged without its record.
// Thread-safe.
#ifndef CUSTODY_SERVER_GRPC_REQUEST_GUARD_H_
#define CUSTODY_SERVER_GRPC_REQUEST_GUARD_H_

#include <atomic>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/sha256.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc/request_metrics.h"
#include "server/security/access_policy.h"
#include "server/security/audit_log.h"

namespace custody::server {

// The caller's identity: the first URI SAN of its client certificate (e.g.
// "spiffe://bank.example/as"), else "dns:" + its first DNS SAN, else "uid:N" for a caller on
// custodyd's Unix socket (N: the uid that connected, from the kernel; see unix_listener.h), else
// "unix" for a Unix socket served by gRPC itself (TLS over a Unix socket), else "anonymous".
std::string CallerIdentity(const grpc::ServerContextBase& context);

class RequestGuard {
 public:
  // All must outlive the guard; `metrics` (may be null) counts every recorded call.
  RequestGuard(const PolicyStore* policy, AuditLog* audit, RequestMetrics* metrics = nullptr)
      : policy_(policy), audit_(audit), metrics_(metrics) {}

  // PERMISSION_DENIED unless the policy grants `operation` on `ring` to `identity`. The message
  // is the same whether the ring exists or not.
  absl::Status Authorize(const std::string& identity, absl::string_view operation,
                         absl::string_view ring) const;
  bool Allows(const std::string& identity, absl::string_view operation,
              absl::string_view ring) const;
  // For listings: PERMISSION_DENIED unless `operation` is granted to `identity` on some ring
  // (`what` names the listing in the message).
  absl::Status AuthorizeAnyRing(const std::string& identity, absl::string_view operation,
                                absl::string_view what) const;

  // Appends the audit line of a finished call and returns the status to send: `result`, or
  // UNAVAILABLE when the line could not be written. The call (begun at `started`) is counted
  // in the metrics with the status sent.
  grpc::Status Record(AuditEvent event, const grpc::Status& result, absl::Time started);
  // The same for the items of one batch RPC: events[i] finished with results[i]. All lines are
  // appended in one group commit; when that fails every result becomes UNAVAILABLE.
  void RecordAll(std::vector<AuditEvent>& events, std::vector<grpc::Status>& results,
                 absl::Time started);

  bool healthy() const { return audit_->healthy(); }

  // From now on every call is answered UNAVAILABLE "custodyd is shutting down" (audited), so
  // that clients fail over to another replica rather than see CANCELLED. custodyd calls it on
  // SIGTERM before it stops the server.
  void BeginShutdown() { shutting_down_.store(true); }
  static absl::Status ShuttingDown();

 private:
  std::atomic<bool> shutting_down_{false};
  const PolicyStore* const policy_;
  AuditLog* const audit_;
  RequestMetrics* const metrics_;
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_REQUEST_GUARD_H_
