// The thread that carries out due key lifecycle transitions (KeyService::RunDueTransitions, its
// `step`): it runs the step, then sleeps until the next due time the step returned, at most a
// minute, or until poked (a commit moved a due time) or stopped. With a shared store one
// replica, elected through the store (MetadataStore::HoldLeadership), runs the step; the others
// ask again every half second (the takeover delay after a leader dies), and the leader re-reads
// every second. Even a replica that wrongly believed it led changes nothing twice: every
// transition is a conditional commit on the ring's generation.
//
// Thread-safety: thread-safe.
#ifndef CUSTODY_SERVER_KEYS_LIFECYCLE_SCHEDULER_H_
#define CUSTODY_SERVER_KEYS_LIFECYCLE_SCHEDULER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "rotation/metadata_store.h"

namespace custody::server {

class LifecycleScheduler {
 public:
  // `step` carries out every due transition once and returns the next due time (Unix ms, 0 =
  // none); it may call stopping() between transitions to end early. `store` must outlive this.
  LifecycleScheduler(rotation::MetadataStore* store, bool shared_store,
                     std::function<int64_t()> step);
  ~LifecycleScheduler();  // Stop()
  LifecycleScheduler(const LifecycleScheduler&) = delete;
  LifecycleScheduler& operator=(const LifecycleScheduler&) = delete;

  // Starts the thread (once).
  void Start();
  // No step starts after it; waits for a step in progress. Idempotent; fine without Start.
  void Stop();
  bool stopping() const;
  // Due times may have moved: plan again now instead of at the next due time.
  void Poke();
  // Whether this process ran, or may run, the step at the last check (always true for a store
  // only this process writes, once started).
  bool leader() const { return leader_.load(); }

 private:
  void Loop();

  rotation::MetadataStore* const store_;
  const bool shared_store_;
  const std::function<int64_t()> step_;
  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool poke_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<bool> leader_{false};
  std::thread thread_;
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_LIFECYCLE_SCHEDULER_H_
