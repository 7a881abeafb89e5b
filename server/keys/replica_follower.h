// The thread that keeps a replica's view of a shared metadata store current: it waits for the
// store's change notifications (PostgreSQL LISTEN/NOTIFY: MetadataStore::WaitForChange) and
// calls `refresh` (KeyService::Refresh) on each, and at least every `refresh_interval`. It
// counts good and failed re-reads for /metrics and logs each change between following and
// failing. What a re-read does, and the staleness bound it resets, are KeyService's
// (server/keys/replica_sync.cc).
//
// Thread-safety: thread-safe.
#ifndef CUSTODY_SERVER_KEYS_REPLICA_FOLLOWER_H_
#define CUSTODY_SERVER_KEYS_REPLICA_FOLLOWER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "rotation/metadata_store.h"

namespace custody::server {

class ReplicaFollower {
 public:
  // `store` must outlive this.
  ReplicaFollower(rotation::MetadataStore* store, absl::Duration refresh_interval,
                  std::function<absl::Status()> refresh);
  ~ReplicaFollower();  // Stop()
  ReplicaFollower(const ReplicaFollower&) = delete;
  ReplicaFollower& operator=(const ReplicaFollower&) = delete;

  void Start();  // once
  // Ends the thread within one notification wait (250 ms at most). Idempotent; fine without
  // Start.
  void Stop();

  uint64_t refreshes() const { return refreshes_.load(); }                // good re-reads
  uint64_t refresh_failures() const { return refresh_failures_.load(); }  // failed ones

 private:
  void Loop();
  bool stopping() const { return stop_.load(std::memory_order_relaxed); }

  rotation::MetadataStore* const store_;
  const absl::Duration refresh_interval_;
  const std::function<absl::Status()> refresh_;
  // Set by Stop; the loop, which polls the store in short waits, checks it between waits.
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> refreshes_{0};
  std::atomic<uint64_t> refresh_failures_{0};
  std::thread thread_;
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_REPLICA_FOLLOWER_H_
