// The gRPC floor (issue 26): custody-grpc-floor (bench/grpc_floor_server.cc), a server that
// answers SignJws with a fixed reply and does nothing else, driven by the same stub callers as a
// custodyd row. Its CPU per call is what gRPC 1.51 alone costs on this machine, measured in the
// same run as the custodyd rows it is the floor of.
#ifndef CUSTODY_BENCH_GRPC_FLOOR_H_
#define CUSTODY_BENCH_GRPC_FLOOR_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/report.h"

namespace custody::bench {

// Starts `binary` twice (answering on gRPC's callback thread, then through custodyd's UnaryPool)
// with its socket and log in `dir`, and at each concurrency runs `row` of stub SignJws
// calls over `channels(c)` connections. Each reply is checked (its JWS has `reply_bytes`).
absl::StatusOr<std::vector<FloorResult>> MeasureGrpcFloor(const std::string& binary,
                                                          const std::string& dir,
                                                          const std::vector<int>& concurrency,
                                                          int (*channels)(int), int reply_bytes,
                                                          absl::Duration row);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_GRPC_FLOOR_H_
