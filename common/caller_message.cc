#include "common/caller_message.h"

#include "absl/strings/cord.h"

namespace custody {
namespace {

constexpr absl::string_view kCallerMessageUrl = "custody.dev/caller-message";

}  // namespace

absl::Status WithCallerMessage(absl::Status status, absl::string_view caller_message) {
  if (!status.ok()) status.SetPayload(kCallerMessageUrl, absl::Cord(caller_message));
  return status;
}

std::string CallerMessage(const absl::Status& status) {
  if (auto payload = status.GetPayload(kCallerMessageUrl); payload.has_value()) {
    return std::string(*payload);
  }
  return std::string(status.message());
}

bool HasCallerMessage(const absl::Status& status) {
  return status.GetPayload(kCallerMessageUrl).has_value();
}

}  // namespace custody
