#include "server/grpc/stream_quota.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace custody::server {

StreamQuota::StreamQuota(std::string what, int max_streams, int max_per_caller)
    : what_(std::move(what)),
      max_streams_(std::max(1, max_streams)),
      max_per_caller_(std::max(1, max_per_caller)) {}

absl::StatusOr<StreamQuota::Slot> StreamQuota::Acquire(const std::string& identity) {
  absl::MutexLock lock(&mu_);
  if (active_ >= max_streams_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what_, ": ", active_, " streams open, the server's limit is ", max_streams_,
                     " (--max_watch_streams); retry later"));
  }
  int& mine = per_caller_[identity];
  if (mine >= max_per_caller_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what_, ": this caller has ", mine, " streams open, the limit per caller is ",
                     max_per_caller_, " (--max_watch_streams_per_caller); close one first"));
  }
  ++mine;
  ++active_;
  return Slot(this, identity);
}

void StreamQuota::Release(const std::string& identity) {
  absl::MutexLock lock(&mu_);
  --active_;
  auto it = per_caller_.find(identity);
  if (it != per_caller_.end() && --it->second <= 0) per_caller_.erase(it);
}

int StreamQuota::active() const {
  absl::MutexLock lock(&mu_);
  return active_;
}

StreamQuota::Slot::~Slot() {
  if (quota_ != nullptr) quota_->Release(identity_);
}

}  // namespace custody::server
