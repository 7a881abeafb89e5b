// A Clock (common/clock.h) that stands still until a test moves it. Thread-safe.
#ifndef CUSTODY_COMMON_TESTING_FAKE_CLOCK_H_
#define CUSTODY_COMMON_TESTING_FAKE_CLOCK_H_

#include <atomic>
#include <cstdint>

#include "absl/time/time.h"
#include "common/clock.h"

namespace custody::testing {

class FakeClock final : public Clock {
 public:
  // Starts at a fixed, realistic instant (2026-01-01T00:00:00Z) so that results do not depend
  // on the day the test runs.
  explicit FakeClock(int64_t start_ms = 1767225600000) : now_ms_(start_ms) {}
  int64_t NowMs() const override { return now_ms_.load(); }
  int64_t MonotonicMs() const override { return monotonic_ms_.load(); }
  // Time passes: both clocks move.
  void Advance(absl::Duration d) {
    now_ms_ += absl::ToInt64Milliseconds(d);
    monotonic_ms_ += absl::ToInt64Milliseconds(d);
  }
  // The wall clock is stepped (by an operator, NTP, a resumed VM); no time passes.
  void StepWall(absl::Duration d) { now_ms_ += absl::ToInt64Milliseconds(d); }

 private:
  std::atomic<int64_t> now_ms_;
  std::atomic<int64_t> monotonic_ms_{1000};
};

}  // namespace custody::testing

#endif  // CUSTODY_COMMON_TESTING_FAKE_CLOCK_H_
