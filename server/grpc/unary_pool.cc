#include "server/grpc/unary_pool.h"

#include <pthread.h>

#include <algorithm>
#include <utility>

namespace custody::server {

UnaryPool::UnaryPool(int max_threads, size_t max_queued)
    : max_threads_(static_cast<size_t>(std::max(1, max_threads))), max_queued_(max_queued) {}

UnaryPool::~UnaryPool() {
  std::vector<std::thread> threads;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    threads.swap(threads_);
  }
  for (std::thread& t : threads) t.join();
}

bool UnaryPool::TrySubmit(std::function<void()> work) {
  absl::MutexLock lock(&mu_);
  // Work already queued takes the idle threads first; a call that would wait starts a thread
  // while the cap allows, and is refused when max_queued_ already wait.
  const bool needs_thread = queue_.size() >= idle_;
  if (needs_thread && threads_.size() < max_threads_) {
    threads_.emplace_back([this] { Loop(); });
  } else if (needs_thread && queue_.size() - idle_ >= max_queued_) {
    return false;
  }
  queue_.push_back(std::move(work));
  return true;
}

void UnaryPool::Loop() {
  // Not the name of the gRPC thread that started it ("nexting_thread"), so that `top -H` and a
  // profile tell the two apart.
  pthread_setname_np(pthread_self(), "custody-unary");
  for (;;) {
    std::function<void()> work;
    {
      absl::MutexLock lock(&mu_);
      ++idle_;
      mu_.Await(absl::Condition(
          +[](UnaryPool* p)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) { return p->stopping_ || !p->queue_.empty(); },
          this));
      --idle_;
      if (queue_.empty()) return;  // stopping, nothing left
      work = std::move(queue_.front());
      queue_.pop_front();
    }
    work();
  }
}

}  // namespace custody::server
