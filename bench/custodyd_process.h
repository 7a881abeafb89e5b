// One custodyd child process of custody-bench: started on a state directory, awaited until the
// gRPC health service says SERVING, stopped with SIGTERM.
#ifndef CUSTODY_BENCH_CUSTODYD_PROCESS_H_
#define CUSTODY_BENCH_CUSTODYD_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/channel.h"

namespace custody::bench {

struct CustodydOptions {
  std::string binary;     // path of custodyd
  std::string state_dir;  // --state_dir
  std::string listen;     // --listen (unix:PATH or HOST:PORT)
  std::vector<std::string> extra_flags;
  std::string log_path;  // stdout and stderr are appended here
  // How the readiness probe connects (address plus TLS files for a TLS listener).
  client::ChannelOptions channel;
  absl::Duration startup_timeout = absl::Seconds(120);
};

class CustodydProcess {
 public:
  // Forks and execs custodyd, then probes grpc.health.v1.Health/Check with a fresh channel every
  // few milliseconds (a channel that failed to connect would wait out gRPC's reconnect backoff)
  // until SERVING. FAILED_PRECONDITION with the log's tail when it exits or times out.
  static absl::StatusOr<std::unique_ptr<CustodydProcess>> Start(const CustodydOptions& options);

  ~CustodydProcess();  // SIGKILL if still running
  CustodydProcess(const CustodydProcess&) = delete;
  CustodydProcess& operator=(const CustodydProcess&) = delete;

  pid_t pid() const { return pid_; }
  // From fork to the first SERVING answer.
  absl::Duration startup_time() const { return startup_time_; }
  const CustodydOptions& options() const { return options_; }

  // SIGTERM and wait (SIGKILL after 20 s); INTERNAL unless it exits 0.
  absl::Status Stop();

 private:
  explicit CustodydProcess(CustodydOptions options) : options_(std::move(options)) {}
  CustodydOptions options_;
  pid_t pid_ = -1;
  absl::Duration startup_time_;
};

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_CUSTODYD_PROCESS_H_
