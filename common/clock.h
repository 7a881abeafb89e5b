// Wall-clock and monotonic time as an interface, so that logic which acts on time (the key
// lifecycle scheduler, metadata staleness, rotation eligibility) can be driven in tests by a
// clock they move by hand (common/testing/fake_clock.h) instead of by sleeping.
#ifndef CUSTODY_COMMON_CLOCK_H_
#define CUSTODY_COMMON_CLOCK_H_

#include <chrono>
#include <cstdint>

namespace custody {

class Clock {
 public:
  virtual ~Clock() = default;
  // Milliseconds since the Unix epoch: what is stored and compared across processes. It can be
  // stepped (an operator, NTP, a VM resumed), so it does not measure intervals inside one
  // process reliably.
  virtual int64_t NowMs() const = 0;
  // Milliseconds on a clock that only moves forward at the rate of real time, from an arbitrary
  // origin: intervals inside one process (the key lifecycle's retention after a signature).
  virtual int64_t MonotonicMs() const = 0;

  // The kernel's CLOCK_REALTIME and CLOCK_MONOTONIC, read directly (not absl::Now, which
  // extrapolates from the CPU's cycle counter between kernel samples). Thread-safe; lives for
  // the whole process.
  static const Clock& System();
};

inline const Clock& Clock::System() {
  class SystemClock final : public Clock {
   public:
    int64_t NowMs() const override {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
          .count();
    }
    int64_t MonotonicMs() const override {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::steady_clock::now().time_since_epoch())
          .count();
    }
  };
  static const SystemClock* const kClock = new SystemClock();
  return *kClock;
}

}  // namespace custody

#endif  // CUSTODY_COMMON_CLOCK_H_
