// The gRPC floor: custody-grpc-floor started, driven and stopped (bench/grpc_floor.h).
#include "bench/grpc_floor.h"

#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/load.h"
#include "bench/proc_util.h"
#include "bench/rings.h"
#include "client/client.h"
#include "common/testing/child_process.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace custody::bench {
namespace {

// custody-grpc-floor listening on `socket`; the ChildProcess stops it (SIGTERM, then SIGKILL)
// when it goes.
absl::StatusOr<testing::ChildProcess> StartFloorServer(const std::string& binary,
                                                       const std::string& socket,
                                                       int handoff_threads, int reply_bytes,
                                                       const std::string& log) {
  auto child = testing::ChildProcess::Start(
      {.argv = {binary, "--socket=" + socket, absl::StrCat("--reply_bytes=", reply_bytes),
                absl::StrCat("--handoff_threads=", handoff_threads)},
       .stdout_path = log,
       .stderr_path = log});
  if (!child.ok()) return child.status();
  for (int i = 0; i < 500 && access(socket.c_str(), F_OK) != 0; ++i) {
    if (!child->Running()) {
      return absl::InternalError(absl::StrCat(binary, " exited at start; see ", log));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (access(socket.c_str(), F_OK) != 0) {
    return absl::DeadlineExceededError(absl::StrCat(binary, " did not listen within 5 s"));
  }
  return child;
}

}  // namespace

absl::StatusOr<std::vector<FloorResult>> MeasureGrpcFloor(const std::string& binary,
                                                          const std::string& dir,
                                                          const std::vector<int>& concurrency,
                                                          int (*channels)(int), int reply_bytes,
                                                          absl::Duration row) {
  std::vector<FloorResult> out;
  for (const auto& [mode, threads] : {std::pair<std::string, int>{"inline", 0}, {"handoff", 64}}) {
    const std::string socket = absl::StrCat(dir, "/floor-", mode, ".sock");
    auto server = StartFloorServer(binary, socket, threads, reply_bytes,
                                   absl::StrCat(dir, "/floor-", mode, ".log"));
    if (!server.ok()) return server.status();
    const pid_t pid = server->pid();
    for (int c : concurrency) {
      std::vector<std::unique_ptr<custody::v1::Signer::Stub>> stubs;
      const int connections = channels(c);
      for (int i = 0; i < connections; ++i) {
        grpc::ChannelArguments args;
        args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection per channel
        stubs.push_back(custody::v1::Signer::NewStub(
            grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args)));
      }
      custody::v1::SignJwsRequest request;
      request.set_ring("floor");
      request.set_payload(std::string(1024, 'p'));
      request.set_typ("JWT");
      FloorResult r;
      r.mode = mode;
      r.concurrency = c;
      double cpu0 = -1, cpu1 = -1;
      int64_t sw0 = -1, sw1 = -1;
      Operation call = [&](int t, std::string* error) {
        custody::v1::SignJwsResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(Deadline(60));
        grpc::Status s =
            stubs[static_cast<size_t>(t) % stubs.size()]->SignJws(&ctx, request, &resp);
        if (!s.ok()) return OutcomeOf("SignJws (floor)", client::ToAbslStatus(s), error);
        if (resp.jws().size() != static_cast<size_t>(reply_bytes)) {
          *error = absl::StrCat("floor reply of ", resp.jws().size(), " bytes");
          return Outcome::kError;
        }
        return Outcome::kOk;
      };
      r.load = RunLoad(
          c, row, call,
          [&] {
            sw0 = ProcessContextSwitches(pid);
            cpu0 = ProcessCpuSeconds(pid);
          },
          [&] {
            cpu1 = ProcessCpuSeconds(pid);
            sw1 = ProcessContextSwitches(pid);
          });
      if (r.load.ops == 0 || r.load.errors > 0) {
        return absl::InternalError(absl::StrCat("gRPC floor ", mode, " c=", c, ": ", r.load.ops,
                                                " calls, ", r.load.errors, " errors (",
                                                r.load.first_error, ")"));
      }
      if (cpu0 >= 0 && cpu1 >= 0) r.server_cpu_s = cpu1 - cpu0;
      if (sw0 >= 0 && sw1 >= sw0) r.server_switches = sw1 - sw0;
      std::fprintf(stderr,
                   "[grpc floor] %-7s c=%-3d %8.0f ops/s  p50 %7.0f us  p99 %7.0f us  svc %.1f "
                   "us/op  sw/op %.1f\n",
                   mode.c_str(), c, r.load.ops_per_s, r.load.p50_us, r.load.p99_us, r.CpuUsPerOp(),
                   r.SwitchesPerOp());
      out.push_back(std::move(r));
    }
  }
  return out;
}

}  // namespace custody::bench
