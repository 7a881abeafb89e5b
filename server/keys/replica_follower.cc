#include "server/keys/replica_follower.h"

#include <string>
#include <utility>

#include "absl/time/clock.h"
#include "common/log.h"

namespace custody::server {

ReplicaFollower::ReplicaFollower(rotation::MetadataStore* store, absl::Duration refresh_interval,
                                 std::function<absl::Status()> refresh)
    : store_(store), refresh_interval_(refresh_interval), refresh_(std::move(refresh)) {}

ReplicaFollower::~ReplicaFollower() { Stop(); }

void ReplicaFollower::Start() {
  if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
}

void ReplicaFollower::Stop() {
  stop_.store(true, std::memory_order_relaxed);
  if (thread_.joinable()) thread_.join();
}

void ReplicaFollower::Loop() {
  absl::Time last_refresh = absl::Now();
  bool healthy = true;
  while (!stopping()) {
    // Short waits, so that Stop is not kept waiting; shorter while the store is failing, so that
    // the first read after it is back does not wait out a whole notification wait (a listening
    // connection can come back before a read succeeds, e.g. during crash recovery).
    auto changed = store_->WaitForChange(absl::Milliseconds(healthy ? 250 : 50));
    const bool due = absl::Now() - last_refresh >= refresh_interval_;
    if (changed.ok() && !*changed && !due) continue;
    absl::Status s = changed.ok() ? refresh_() : changed.status();
    (s.ok() ? refreshes_ : refresh_failures_).fetch_add(1, std::memory_order_relaxed);
    if (s.ok()) last_refresh = absl::Now();
    if (s.ok() != healthy) {
      healthy = s.ok();
      Log(healthy ? LogLevel::kInfo : LogLevel::kError, "replica.follow",
          {{"state", healthy ? "following" : "failing"},
           {"error", healthy ? "" : std::string(s.message())}});
    }
  }
}

}  // namespace custody::server
