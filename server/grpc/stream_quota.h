// Bounds on long-lived server streams (WatchJwks): each holds a server thread for its lifetime,
// so their number is capped server-wide and per caller identity, and what is over a cap is
// refused at once (RESOURCE_EXHAUSTED naming the limit and its flag) rather than queued.
#ifndef CUSTODY_SERVER_GRPC_STREAM_QUOTA_H_
#define CUSTODY_SERVER_GRPC_STREAM_QUOTA_H_

#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace custody::server {

class StreamQuota {
 public:
  // A held slot, released on destruction. Movable, not copyable.
  class Slot {
   public:
    Slot(Slot&& other) noexcept : quota_(other.quota_), identity_(std::move(other.identity_)) {
      other.quota_ = nullptr;
    }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    Slot& operator=(Slot&&) = delete;
    ~Slot();

   private:
    friend class StreamQuota;
    Slot(StreamQuota* quota, std::string identity)
        : quota_(quota), identity_(std::move(identity)) {}
    StreamQuota* quota_;
    std::string identity_;
  };

  // `max_streams` server-wide and `max_per_caller` per identity (each at least 1); `what` names
  // the stream in messages ("WatchJwks"), the flags are named so an operator knows what to raise.
  StreamQuota(std::string what, int max_streams, int max_per_caller);

  // A slot for `identity`, or RESOURCE_EXHAUSTED naming the cap that is full.
  absl::StatusOr<Slot> Acquire(const std::string& identity);

  int active() const;

 private:
  void Release(const std::string& identity);

  const std::string what_;
  const int max_streams_;
  const int max_per_caller_;
  mutable absl::Mutex mu_;
  int active_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, int> per_caller_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_STREAM_QUOTA_H_
