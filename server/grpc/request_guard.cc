#include "server/grpc/request_guard.h"

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/caller_message.h"
#include "server/grpc/unix_listener.h"

namespace custody::server {
namespace {

// gRPC's code numbers are Abseil's (both follow google.rpc.Code), and so are the names.
std::string CodeName(grpc::StatusCode code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

}  // namespace

std::string CallerIdentity(const grpc::ServerContextBase& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    for (const char* property : {GRPC_PEER_URI_PROPERTY_NAME, GRPC_PEER_SPIFFE_ID_PROPERTY_NAME}) {
      auto values = auth->FindPropertyValues(property);
      if (!values.empty()) return std::string(values[0].data(), values[0].size());
    }
    for (const char* property : {GRPC_PEER_DNS_PROPERTY_NAME, GRPC_X509_SAN_PROPERTY_NAME}) {
      auto values = auth->FindPropertyValues(property);
      if (!values.empty())
        return absl::StrCat("dns:", std::string(values[0].data(), values[0].size()));
    }
  }
  const std::string peer = context.peer();
  if (std::optional<uid_t> uid = UnixPeerUid(peer)) return absl::StrCat("uid:", *uid);
  // gRPC's own Unix listener (only with TLS on a Unix socket) names no peer.
  if (absl::StartsWith(peer, "unix:")) return "unix";
  return "anonymous";
}

bool RequestGuard::Allows(const std::string& identity, absl::string_view operation,
                          absl::string_view ring) const {
  std::shared_ptr<const AccessPolicy> policy = policy_->Get();
  return policy != nullptr && policy->Allows(identity, operation, ring);
}

absl::Status RequestGuard::ShuttingDown() {
  return absl::UnavailableError("custodyd is shutting down; retry on another replica");
}

absl::Status RequestGuard::Authorize(const std::string& identity, absl::string_view operation,
                                     absl::string_view ring) const {
  if (shutting_down_.load()) return ShuttingDown();
  if (Allows(identity, operation, ring)) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("permission denied: '", identity, "' may not ", operation, " on '", ring, "'"));
}

absl::Status RequestGuard::AuthorizeAnyRing(const std::string& identity,
                                            absl::string_view operation,
                                            absl::string_view what) const {
  if (shutting_down_.load()) return ShuttingDown();
  std::shared_ptr<const AccessPolicy> policy = policy_->Get();
  if (policy != nullptr && policy->AllowsAnyRing(identity, operation)) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("permission denied: '", identity, "' may not ", operation, " on '", what, "'"));
}

namespace {

void SetResult(AuditEvent& event, const grpc::Status& result) {
  event.result = CodeName(result.error_code());
  if (!result.ok()) event.detail = result.error_message();
}

grpc::Status AuditFailure(const absl::Status& written) {
  return grpc::Status(
      grpc::StatusCode::UNAVAILABLE,
      absl::StrCat("refused: the audit log cannot record it (", CallerMessage(written), ")"));
}

}  // namespace

grpc::Status RequestGuard::Record(AuditEvent event, const grpc::Status& result,
                                  absl::Time started) {
  SetResult(event, result);
  absl::Status written = audit_->Append(event);
  grpc::Status sent = written.ok() ? result : AuditFailure(written);
  if (metrics_ != nullptr) {
    metrics_->ObserveCall(event.operation, event.ring, sent.error_code(), absl::Now() - started);
  }
  return sent;
}

void RequestGuard::RecordAll(std::vector<AuditEvent>& events, std::vector<grpc::Status>& results,
                             absl::Time started) {
  for (size_t i = 0; i < events.size(); ++i) SetResult(events[i], results[i]);
  absl::Status written = audit_->AppendAll(events);
  if (!written.ok()) {
    for (grpc::Status& result : results) result = AuditFailure(written);
  }
  if (metrics_ == nullptr) return;
  const absl::Duration elapsed = absl::Now() - started;
  for (size_t i = 0; i < events.size(); ++i) {
    metrics_->ObserveCall(events[i].operation, events[i].ring, results[i].error_code(), elapsed);
  }
}

}  // namespace custody::server
