// Wall-clock time as an interface, so that logic which acts on time (the key lifecycle
// scheduler, metadata staleness, rotation eligibility) can be driven in tests by a clock they
// move by hand (common/testing/fake_clock.h) instead of by sleeping.
#ifndef CUSTODY_COMMON_CLOCK_H_
#define CUSTODY_COMMON_CLOCK_H_

#include <cstdint>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace custody {

class Clock {
 public:
  virtual ~Clock() = default;
  // Milliseconds since the Unix epoch.
  virtual int64_t NowMs() const = 0;

  // The process's wall clock (absl::Now). Thread-safe; lives for the whole process.
  static const Clock& System();
};

inline const Clock& Clock::System() {
  class SystemClock final : public Clock {
   public:
    int64_t NowMs() const override { return absl::ToUnixMillis(absl::Now()); }
  };
  static const SystemClock* const kClock = new SystemClock();
  return *kClock;
}

}  // namespace custody

#endif  // CUSTODY_COMMON_CLOCK_H_
