// Closed-loop load: N threads each run one operation after another for a fixed time.
#ifndef CUSTODY_BENCH_LOAD_H_
#define CUSTODY_BENCH_LOAD_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace custody::bench {

struct LoadResult {
  uint64_t ops = 0;     // successful operations inside the measured window
  uint64_t errors = 0;  // failed operations (warm-up included)
  // Operations refused by back-pressure (RESOURCE_EXHAUSTED: the session pool's waiting room was
  // full); the worker backs off 1 ms and goes on. Not errors: load shedding is by design.
  uint64_t shed = 0;
  double elapsed_s = 0;  // from the common start to the last thread's end
  double ops_per_s = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0;  // latency of successful operations
  // CPU the worker threads used while measuring (getrusage(RUSAGE_THREAD), summed).
  double worker_cpu_s = 0;
  std::string first_error;
};

enum class Outcome { kOk, kShed, kError };

// The outcome of a call that returned `status`: kOk, kShed for RESOURCE_EXHAUSTED (the session
// pool's back-pressure), else kError; *error gets `what` and the status when not OK.
Outcome OutcomeOf(absl::string_view what, const absl::Status& status, std::string* error);

// One operation on behalf of worker `thread` (0..threads-1). Sets *error unless kOk. Must be safe
// to call from all workers at once.
using Operation = std::function<Outcome(int thread, std::string* error)>;

// Starts `threads` workers; each runs `op` once untimed (warm-up: connections, sessions), then all
// start together and run `op` back to back until `duration` has passed. `at_start` runs just
// before the common start and `at_end` just after the last worker finished (for sampling another
// process's CPU). A worker gives up after 50 errors (shed operations do not count).
LoadResult RunLoad(int threads, absl::Duration duration, const Operation& op,
                   const std::function<void()>& at_start = nullptr,
                   const std::function<void()>& at_end = nullptr);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_LOAD_H_
