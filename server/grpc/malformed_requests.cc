#include "server/grpc/malformed_requests.h"

#include <string>

#include "absl/time/clock.h"
#include "common/log.h"
#include "custody/v1/strict_requests.h"
#include "google/protobuf/stubs/logging.h"

namespace custody::server {
namespace {

class MalformedRequestAuditor final : public grpc::Server::GlobalCallbacks {
 public:
  explicit MalformedRequestAuditor(RequestGuard* guard) : guard_(guard) {}
  void PreSynchronousRequest(grpc::ServerContext*) override {}
  void PostSynchronousRequest(grpc::ServerContext* context) override {
    RecordMalformedRequest(guard_, *context);
  }

 private:
  RequestGuard* const guard_;
};

void ProtobufLog(google::protobuf::LogLevel level, const char* /*file*/, int /*line*/,
                 const std::string& message) {
  if (v1::ParsingRequestOnThisThread()) return;  // refused, answered and audited instead
  Log(level >= google::protobuf::LOGLEVEL_ERROR ? LogLevel::kError : LogLevel::kWarning,
      "protobuf.log", {{"message", message}});
}

}  // namespace

void RecordMalformedRequest(RequestGuard* guard, const grpc::ServerContextBase& context) {
  std::optional<v1::MalformedRequest> malformed = v1::TakeMalformedRequest();
  if (!malformed.has_value()) return;
  AuditEvent event;
  event.identity = CallerIdentity(context);
  event.operation = kOpMalformed;
  // The caller has (or is about to have) its INVALID_ARGUMENT; this is the record of it.
  (void)guard->Record(
      std::move(event),
      grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, malformed->type + ": " + malformed->message),
      absl::Now());
}

void AuditMalformedRequests(RequestGuard* guard) {
  grpc::Server::SetGlobalCallbacks(new MalformedRequestAuditor(guard));  // gRPC owns it
  google::protobuf::SetLogHandler(&ProtobufLog);
}

}  // namespace custody::server
