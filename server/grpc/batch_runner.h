// BatchRunner: runs the items of one batch RPC on the handler's thread, and recruits helper
// threads only when the items are slow enough to pay for the hand-off.
//
// A batch from the client library is a handful of calls that arrived together. Against a fast
// token (SoftHSM2: ES256 in ~60 µs) waking another thread costs about as much as an item, so the
// handler signs them in order itself (with ~100 µs items and batches of ~5, splitting cost
// throughput in the benchmark). Against a slow one (a network HSM at milliseconds per
// operation, RSA-3072, a token under load) running them one after another would hold all but one
// of the token's sessions idle and multiply the batch's latency, so once the first item shows
// that the rest would take longer than `parallel_after`, up to `threads` pool threads join
// and the items spread over the session pool as separate calls would.
// Thread-safe; Run may be called from many handler threads at once.
#ifndef CUSTODY_SERVER_GRPC_BATCH_RUNNER_H_
#define CUSTODY_SERVER_GRPC_BATCH_RUNNER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace custody::server {

class BatchRunner {
 public:
  struct Options {
    int threads = 8;  // helper threads (at most the token's session pool is useful)
    // Helpers join when the remaining items, at the first item's duration, would take longer.
    absl::Duration parallel_after = absl::Milliseconds(2);
  };
  struct Stats {
    uint64_t batches = 0;
    uint64_t parallel_batches = 0;  // batches that recruited helpers
    uint64_t helper_items = 0;      // items run by helpers
  };

  explicit BatchRunner(const Options& options);
  ~BatchRunner();  // joins the helpers; no Run may be in progress
  BatchRunner(const BatchRunner&) = delete;
  BatchRunner& operator=(const BatchRunner&) = delete;

  // Calls item(0) .. item(n-1), each exactly once, possibly on several threads at once, and
  // returns when all have returned. `item` must be safe to call concurrently for different i.
  void Run(size_t n, const std::function<void(size_t)>& item);

  Stats stats() const;

 private:
  struct Job;
  void HelperLoop();
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || !jobs_.empty();
  }
  // Runs items of `job` until none is left; how many this thread ran.
  static size_t Drain(Job& job);

  const Options options_;
  absl::Mutex mu_;
  std::deque<std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);  // one entry per helper wanted
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> helpers_;
  std::atomic<uint64_t> batches_{0}, parallel_batches_{0}, helper_items_{0};
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_BATCH_RUNNER_H_
