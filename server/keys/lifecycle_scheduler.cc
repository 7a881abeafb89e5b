#include "server/keys/lifecycle_scheduler.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/time/clock.h"
#include "common/log.h"

namespace custody::server {

LifecycleScheduler::LifecycleScheduler(rotation::MetadataStore* store, bool shared_store,
                                       std::function<int64_t()> step)
    : store_(store), shared_store_(shared_store), step_(std::move(step)) {}

LifecycleScheduler::~LifecycleScheduler() { Stop(); }

void LifecycleScheduler::Start() {
  if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
}

void LifecycleScheduler::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    wake_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
}

bool LifecycleScheduler::stopping() const {
  absl::MutexLock lock(&mu_);
  return stop_;
}

void LifecycleScheduler::Poke() {
  absl::MutexLock lock(&mu_);
  poke_ = true;
  wake_.SignalAll();
}

void LifecycleScheduler::Loop() {
  bool leading = false;
  for (;;) {
    auto leader = store_->HoldLeadership();
    const bool now_leading = leader.ok() && *leader;
    leader_.store(now_leading);
    if (now_leading != leading) {
      leading = now_leading;
      if (shared_store_) {
        Log(leading ? LogLevel::kInfo : LogLevel::kWarning, "scheduler.leader",
            {{"state", leading ? "acquired" : "lost"},
             {"error", leader.ok() ? "" : std::string(leader.status().message())}});
      }
    }
    const int64_t next_due = leading ? step_() : 0;
    absl::MutexLock lock(&mu_);
    if (stop_) return;
    absl::Time deadline = absl::Now() + absl::Seconds(leading ? 60 : 0.5);
    if (shared_store_ && leading) deadline = absl::Now() + absl::Seconds(1);
    if (next_due != 0) deadline = std::min(deadline, absl::FromUnixMillis(next_due));
    while (!stop_ && !poke_) {
      if (wake_.WaitWithDeadline(&mu_, deadline)) break;
    }
    poke_ = false;
    if (stop_) return;
  }
}

}  // namespace custody::server
