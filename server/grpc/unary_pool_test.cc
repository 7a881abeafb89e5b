#include "server/grpc/unary_pool.h"

#include <pthread.h>

#include <atomic>
#include <memory>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace custody::server {
namespace {

// Work that holds its thread until released, counting how many are held at once.
struct Gate {
  absl::Notification open;
  std::atomic<int> running{0}, ran{0};
  std::function<void()> Work() {
    return [this] {
      ++running;
      open.WaitForNotification();
      ++ran;
    };
  }
  // Waits (bounded) until `n` held works run.
  bool Running(int n) {
    for (int i = 0; i < 2000 && running.load() < n; ++i) absl::SleepFor(absl::Milliseconds(5));
    return running.load() >= n;
  }
};

TEST(UnaryPoolTest, ThreadsStartOnDemandUpToTheCap) {
  UnaryPool pool(/*max_threads=*/4, /*max_queued=*/8);
  EXPECT_EQ(pool.threads(), 0) << "no call yet, no thread";
  Gate gate;
  ASSERT_TRUE(pool.TrySubmit(gate.Work()));
  ASSERT_TRUE(gate.Running(1));
  EXPECT_EQ(pool.threads(), 1);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(pool.TrySubmit(gate.Work()));
  ASSERT_TRUE(gate.Running(4));
  EXPECT_EQ(pool.threads(), 4) << "the cap";
  EXPECT_EQ(gate.running.load(), 4) << "two wait in the queue";
  gate.open.Notify();
  for (int i = 0; i < 2000 && gate.ran.load() < 6; ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(gate.ran.load(), 6);
  EXPECT_EQ(pool.threads(), 4);
}

TEST(UnaryPoolTest, ThreadsAreNamedForTopAndProfiles) {
  UnaryPool pool(/*max_threads=*/1, /*max_queued=*/0);
  char name[16] = {};
  absl::Notification done;
  ASSERT_TRUE(pool.TrySubmit([&] {
    pthread_getname_np(pthread_self(), name, sizeof(name));
    done.Notify();
  }));
  done.WaitForNotification();
  EXPECT_STREQ(name, "custody-unary");
}

TEST(UnaryPoolTest, IdleThreadsAreReusedRatherThanStarted) {
  UnaryPool pool(/*max_threads=*/16, /*max_queued=*/0);
  for (int i = 0; i < 50; ++i) {
    absl::Notification done;
    ASSERT_TRUE(pool.TrySubmit([&] { done.Notify(); }));
    done.WaitForNotification();
    for (int j = 0; j < 2000 && pool.idle_threads() < 1; ++j) {
      absl::SleepFor(absl::Milliseconds(1));  // until the thread is back waiting
    }
  }
  EXPECT_EQ(pool.threads(), 1) << "one call at a time needs one thread";
}

TEST(UnaryPoolTest, BeyondTheThreadsAndTheQueueWorkIsRefusedAtOnce) {
  UnaryPool pool(/*max_threads=*/2, /*max_queued=*/3);
  Gate gate;
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(pool.TrySubmit(gate.Work()));
  ASSERT_TRUE(gate.Running(2));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(pool.TrySubmit(gate.Work())) << "queued " << i;
  bool ran_refused = false;
  EXPECT_FALSE(pool.TrySubmit([&] { ran_refused = true; })) << "2 running + 3 waiting";
  gate.open.Notify();
  for (int i = 0; i < 2000 && gate.ran.load() < 5; ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(gate.ran.load(), 5);
  EXPECT_FALSE(ran_refused);
  // With room again, work is accepted.
  absl::Notification done;
  EXPECT_TRUE(pool.TrySubmit([&] { done.Notify(); }));
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
}

TEST(UnaryPoolTest, DestructionRunsWhatWasAcceptedThenJoins) {
  std::atomic<int> ran{0};
  {
    UnaryPool pool(/*max_threads=*/1, /*max_queued=*/10);
    for (int i = 0; i < 10; ++i) {
      ASSERT_TRUE(pool.TrySubmit([&] {
        absl::SleepFor(absl::Milliseconds(2));
        ++ran;
      }));
    }
  }
  EXPECT_EQ(ran.load(), 10) << "an accepted call is always answered";
}

}  // namespace
}  // namespace custody::server
