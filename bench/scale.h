// --scale: custodyd with many rings. Creates `rings` ES256 rings with an explicit rotation
// policy (so each has ACTIVE + PENDING) and rotates each once (RETIRED + ACTIVE + PENDING: three
// published versions), then measures custodyd's VmRSS, GetJwks of every key, and the time a
// restart with that state takes until health says SERVING.
#ifndef CUSTODY_BENCH_SCALE_H_
#define CUSTODY_BENCH_SCALE_H_

#include "absl/status/statusor.h"
#include "bench/custodyd_process.h"
#include "bench/report.h"

namespace custody::bench {

// Starts custodyd with `options` (stopping it again at the end), `threads` client threads.
absl::StatusOr<ScaleResult> RunScale(const CustodydOptions& options, int rings, int threads,
                                     int jwks_calls);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_SCALE_H_
