// The two threads behind KeyService, alone: LifecycleScheduler runs its step only while the store
// says this process leads, at once when poked, and not after Stop; ReplicaFollower re-reads on
// each change notification (not otherwise, before its interval), counts failed re-reads and stops
// within one notification wait. A scripted store stands in for PostgreSQL's leadership and
// notifications; waits are bounded by conditions, not sleeps.
#include <atomic>
#include <chrono>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/keys/lifecycle_scheduler.h"
#include "server/keys/replica_follower.h"

namespace custody::server {
namespace {

// A store with no records whose leadership answer and change notifications the test sets.
class ScriptedStore final : public rotation::MetadataStore {
 public:
  std::atomic<bool> lead{false};
  std::atomic<int> notifications{0};  // WaitForChange reports a change while this is positive

  absl::Status Commit(const rotation::Mutation&) override { return absl::OkStatus(); }
  absl::StatusOr<std::vector<rotation::RingRecord>> LoadRings() override {
    return std::vector<rotation::RingRecord>();
  }
  absl::StatusOr<std::vector<rotation::VersionRecord>> LoadVersions() override {
    return std::vector<rotation::VersionRecord>();
  }
  absl::StatusOr<bool> HoldLeadership() override { return lead.load(); }
  absl::StatusOr<bool> WaitForChange(absl::Duration timeout) override {
    if (notifications.load() > 0) {
      --notifications;
      return true;
    }
    absl::SleepFor(std::min(timeout, absl::Milliseconds(5)));
    return false;
  }
};

// True once `done` holds, false after `limit`.
template <typename F>
bool Eventually(F done, absl::Duration limit = absl::Seconds(5)) {
  const absl::Time end = absl::Now() + limit;
  while (!done()) {
    if (absl::Now() > end) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

TEST(LifecycleSchedulerThreadTest, StepsOnlyWhileLeadingAndAtOnceWhenPoked) {
  ScriptedStore store;
  std::atomic<int> steps{0};
  LifecycleScheduler scheduler(&store, /*shared_store=*/true, [&] {
    ++steps;
    return int64_t{0};  // nothing due: the next step waits for a poke or the re-check
  });
  scheduler.Start();
  scheduler.Poke();
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(steps.load(), 0);  // another replica leads
  EXPECT_FALSE(scheduler.leader());

  store.lead = true;
  ASSERT_TRUE(Eventually([&] { return steps.load() >= 1; }));  // the half-second re-check
  EXPECT_TRUE(scheduler.leader());
  const int before = steps.load();
  scheduler.Poke();  // a commit moved a due time: planned again at once, not in a second
  EXPECT_TRUE(Eventually([&] { return steps.load() > before; }, absl::Milliseconds(500)));

  scheduler.Stop();
  EXPECT_TRUE(scheduler.stopping());
  const int at_stop = steps.load();
  scheduler.Poke();
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(steps.load(), at_stop);
}

TEST(LifecycleSchedulerThreadTest, StopWaitsForTheStepInProgress) {
  ScriptedStore store;
  store.lead = true;
  std::atomic<bool> in_step{false};
  std::atomic<bool> step_done{false};
  LifecycleScheduler scheduler(&store, /*shared_store=*/false, [&] {
    in_step = true;
    absl::SleepFor(absl::Milliseconds(100));
    step_done = true;
    return int64_t{0};
  });
  scheduler.Start();
  ASSERT_TRUE(Eventually([&] { return in_step.load(); }));
  scheduler.Stop();
  EXPECT_TRUE(step_done.load());
}

TEST(ReplicaFollowerThreadTest, ReReadsOnEachNotificationAndCountsFailures) {
  ScriptedStore store;
  std::atomic<int> reads{0};
  std::atomic<bool> fail{false};
  ReplicaFollower follower(&store, absl::Hours(1), [&] {
    ++reads;
    return fail ? absl::UnavailableError("store unreachable (test)") : absl::OkStatus();
  });
  follower.Start();
  absl::SleepFor(absl::Milliseconds(30));
  EXPECT_EQ(reads.load(), 0);  // no notification, interval far off: nothing to re-read

  store.notifications = 1;
  ASSERT_TRUE(Eventually([&] { return follower.refreshes() == 1; }));
  fail = true;
  store.notifications = 2;
  ASSERT_TRUE(Eventually([&] { return follower.refresh_failures() == 2; }));
  EXPECT_EQ(follower.refreshes(), 1u);
  EXPECT_EQ(reads.load(), 3);

  const absl::Time before = absl::Now();
  follower.Stop();
  EXPECT_LT(absl::Now() - before, absl::Seconds(1));  // 5 ms waits here: far less
}

TEST(ReplicaFollowerThreadTest, ReReadsAtTheIntervalWithoutNotifications) {
  ScriptedStore store;
  std::atomic<int> reads{0};
  ReplicaFollower follower(&store, absl::Milliseconds(20), [&] {
    ++reads;
    return absl::OkStatus();
  });
  follower.Start();
  EXPECT_TRUE(Eventually([&] { return reads.load() >= 3; }));
}

}  // namespace
}  // namespace custody::server
