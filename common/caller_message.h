// A status carries two texts when its message holds what only the operator may read (a driver's
// error text, a server's socket path, a file name): the message, for custodyd's log, and a
// shorter caller message, the only text a gRPC caller receives (server/grpc/grpc_services.cc
// ToGrpcStatus sends it and logs the full message).
#ifndef CUSTODY_COMMON_CALLER_MESSAGE_H_
#define CUSTODY_COMMON_CALLER_MESSAGE_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace custody {

// `status` with `caller_message` attached (a payload; the code and message are unchanged).
absl::Status WithCallerMessage(absl::Status status, absl::string_view caller_message);

// The caller message when one is attached, else status.message().
std::string CallerMessage(const absl::Status& status);

// True when a caller message is attached (the message itself is for the log only).
bool HasCallerMessage(const absl::Status& status);

}  // namespace custody

#endif  // CUSTODY_COMMON_CALLER_MESSAGE_H_
