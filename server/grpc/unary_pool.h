// UnaryPool: the threads that run custody's hot unary RPCs (served with gRPC's callback API)
// once gRPC has handed them over, so that a call blocked on the token or on the audit log's
// flush holds one of these threads and never one of gRPC's few callback threads.
//
// Threads are started on demand (when a call arrives and none is idle) up to `max_threads`, and
// then kept: a process that never sees more than a few concurrent calls has a few threads.
// Back-pressure is explicit: at most `max_threads` calls run and at most `max_queued` wait; a
// call beyond that is refused at once (TrySubmit false → RESOURCE_EXHAUSTED), which is what the
// sync server's thread cap (--max_threads) did for these RPCs. Thread-safe.
#ifndef CUSTODY_SERVER_GRPC_UNARY_POOL_H_
#define CUSTODY_SERVER_GRPC_UNARY_POOL_H_

#include <cstddef>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace custody::server {

class UnaryPool {
 public:
  UnaryPool(int max_threads, size_t max_queued);
  ~UnaryPool();  // runs what is queued, then joins
  UnaryPool(const UnaryPool&) = delete;
  UnaryPool& operator=(const UnaryPool&) = delete;

  // Queues `work` for a pool thread; false (and `work` dropped) when max_queued calls wait.
  bool TrySubmit(std::function<void()> work);

  int threads() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(threads_.size());
  }
  int idle_threads() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(idle_);
  }
  size_t max_queued() const { return max_queued_; }

 private:
  void Loop();

  const size_t max_threads_;
  const size_t max_queued_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  size_t idle_ ABSL_GUARDED_BY(mu_) = 0;  // threads waiting for work
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_UNARY_POOL_H_
