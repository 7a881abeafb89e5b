#include "server/grpc/batch_runner.h"

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/time/clock.h"

namespace custody::server {

struct BatchRunner::Job {
  Job(size_t n, const std::function<void(size_t)>* item) : n(n), item(item) {}
  const size_t n;
  const std::function<void(size_t)>* const item;  // owned by Run's caller, alive until done
  std::atomic<size_t> next{0};
  absl::Mutex mu;
  size_t finished ABSL_GUARDED_BY(mu) = 0;
  bool AllFinished() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return finished == n; }
};

BatchRunner::BatchRunner(const Options& options) : options_(options) {
  const int threads = std::max(options_.threads, 0);
  helpers_.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) helpers_.emplace_back([this] { HelperLoop(); });
}

BatchRunner::~BatchRunner() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : helpers_) t.join();
}

size_t BatchRunner::Drain(Job& job) {
  size_t done_here = 0;
  for (size_t i; (i = job.next.fetch_add(1)) < job.n;) {
    (*job.item)(i);
    ++done_here;
  }
  if (done_here > 0) {
    absl::MutexLock lock(&job.mu);
    job.finished += done_here;
  }
  return done_here;
}

void BatchRunner::HelperLoop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &BatchRunner::HasWorkOrStopping));
      if (jobs_.empty()) return;  // stopping
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    helper_items_.fetch_add(Drain(*job), std::memory_order_relaxed);
  }
}

void BatchRunner::Run(size_t n, const std::function<void(size_t)>& item) {
  batches_.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) return;
  auto job = std::make_shared<Job>(n, &item);
  // The first item on this thread measures how slow the items are.
  const absl::Time start = absl::Now();
  job->next.store(1);
  item(0);
  {
    absl::MutexLock lock(&job->mu);
    job->finished = 1;
  }
  const size_t left = n - 1;
  const absl::Duration first = absl::Now() - start;
  if (left > 0 && !helpers_.empty() &&
      first * static_cast<int64_t>(left) > options_.parallel_after) {
    // One helper per remaining item beyond the one this thread takes next, bounded by the pool.
    const size_t wanted = std::min(left - 1, helpers_.size());
    if (wanted > 0) {
      parallel_batches_.fetch_add(1, std::memory_order_relaxed);
      absl::MutexLock lock(&mu_);
      for (size_t i = 0; i < wanted; ++i) jobs_.push_back(job);
    }
  }
  Drain(*job);
  // Wait for the helpers' items (a helper that finds nothing left returns at once).
  absl::MutexLock lock(&job->mu);
  job->mu.Await(absl::Condition(job.get(), &Job::AllFinished));
}

BatchRunner::Stats BatchRunner::stats() const {
  Stats s;
  s.batches = batches_.load();
  s.parallel_batches = parallel_batches_.load();
  s.helper_items = helper_items_.load();
  return s;
}

}  // namespace custody::server
