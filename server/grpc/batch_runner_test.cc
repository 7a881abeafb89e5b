#include "server/grpc/batch_runner.h"

#include <atomic>
#include <chrono>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace custody::server {
namespace {

// Runs a batch of `n` items that each take `item_time`, recording which thread ran each index.
struct Observed {
  std::vector<int> runs;  // times each index ran
  std::set<std::thread::id> threads;
  absl::Duration elapsed;
};

Observed RunBatch(BatchRunner& runner, size_t n, absl::Duration item_time) {
  Observed o;
  o.runs.assign(n, 0);
  absl::Mutex mu;
  const absl::Time start = absl::Now();
  runner.Run(n, [&](size_t i) {
    absl::SleepFor(item_time);
    absl::MutexLock lock(&mu);
    ++o.runs[i];
    o.threads.insert(std::this_thread::get_id());
  });
  o.elapsed = absl::Now() - start;
  return o;
}

TEST(BatchRunnerTest, FastItemsStayOnTheCallersThread) {
  // Items that do nothing, and a threshold far above them: the runner moves the rest of a batch
  // only when the first item times the rest above it. At 5 ms, a first item preempted for 0.33 ms
  // on a loaded machine (CI running the suite two at a time) made the batch look slow.
  BatchRunner runner(BatchRunner::Options{.threads = 4, .parallel_after = absl::Seconds(5)});
  Observed o = RunBatch(runner, 16, absl::ZeroDuration());
  EXPECT_EQ(o.runs, std::vector<int>(16, 1));
  EXPECT_EQ(o.threads, std::set<std::thread::id>{std::this_thread::get_id()});
  EXPECT_EQ(runner.stats().parallel_batches, 0u);
  EXPECT_EQ(runner.stats().helper_items, 0u);
}

TEST(BatchRunnerTest, SlowItemsSpreadOverHelpersAndEachRunsOnce) {
  BatchRunner runner(BatchRunner::Options{.threads = 7, .parallel_after = absl::Milliseconds(1)});
  // 8 items of 40 ms: 320 ms one after another; 40 ms for the first, then the other 7 at once.
  Observed o = RunBatch(runner, 8, absl::Milliseconds(40));
  EXPECT_EQ(o.runs, std::vector<int>(8, 1));
  EXPECT_GT(o.threads.size(), 2u);
  EXPECT_LT(o.elapsed, absl::Milliseconds(240)) << "the items did not run in parallel";
  EXPECT_EQ(runner.stats().parallel_batches, 1u);
  EXPECT_GT(runner.stats().helper_items, 0u);
}

TEST(BatchRunnerTest, ConcurrentBatchesShareTheHelpersAndAllFinish) {
  BatchRunner runner(BatchRunner::Options{.threads = 3, .parallel_after = absl::Microseconds(100)});
  std::vector<Observed> observed(6);
  std::vector<std::thread> callers;
  for (size_t b = 0; b < observed.size(); ++b) {
    callers.emplace_back([&, b] { observed[b] = RunBatch(runner, 5 + b, absl::Milliseconds(2)); });
  }
  for (std::thread& t : callers) t.join();
  for (size_t b = 0; b < observed.size(); ++b) {
    EXPECT_EQ(observed[b].runs, std::vector<int>(5 + b, 1)) << "batch " << b;
  }
  EXPECT_EQ(runner.stats().batches, 6u);
  RunBatch(runner, 0, absl::ZeroDuration());  // an empty batch returns at once
  EXPECT_EQ(runner.stats().batches, 7u);
}

}  // namespace
}  // namespace custody::server
