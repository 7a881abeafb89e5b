// custody-bench's run (issue #8): the Bench class, whose setup, transports and replicas row are
// in custody_bench.cc and whose rows (the ceilings, then custodyd under load) are in row.cc.
#ifndef CUSTODY_BENCH_BENCH_H_
#define CUSTODY_BENCH_BENCH_H_

#include <sys/types.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/ceilings.h"
#include "bench/proc_util.h"
#include "bench/report.h"
#include "bench/rings.h"
#include "bench/tls_files.h"
#include "client/channel.h"
#include "client/client.h"
#include "custody/v1/custody.grpc.pb.h"
#include "pkcs11/token.h"

namespace custody::bench {

class Bench {
 public:
  Bench(Report* report, absl::Duration row, std::vector<int> concurrency)
      : report_(report), row_(row), concurrency_(std::move(concurrency)) {}

  int Run();

 private:
  absl::Status Setup();
  absl::Status RunTransport(const std::string& transport);
  CeilingResult* EnsureCeiling(OpState& op, int concurrency);
  // The connections of one concurrency level: each channel with its stub and Client.
  struct Connections {
    std::vector<std::unique_ptr<custody::v1::Signer::Stub>> stubs;
    std::vector<std::unique_ptr<client::Client>> clients;
    // One more connection over `channel`: its stub, and with --client=library its Client.
    absl::Status Add(const std::shared_ptr<grpc::Channel>& channel);
  };
  RowResult RunRow(const std::string& transport, const Connections& connections, OpState& op,
                   int concurrency, const std::vector<pid_t>& daemon_pids);
  // The replicas row: ReplicaSet behind one client-library channel, rings of their own (created
  // through the replicas), the ceilings of the single-process run (same token, same key types).
  absl::Status RunReplicas();
  // Creates every op's ring through `channel`, waits for `ready` (when set), and describes each
  // ring into `ops`.
  absl::Status CreateRings(const std::shared_ptr<grpc::Channel>& channel, std::vector<OpState>& ops,
                           const std::function<absl::Status()>& ready = nullptr);
  void Fail(std::string what) {
    std::fprintf(stderr, "custody-bench: FAIL: %s\n", what.c_str());
    report_->failures.push_back(std::move(what));
  }

  Report* report_;
  absl::Duration row_;
  std::vector<int> concurrency_;
  std::unique_ptr<TempDir> tmp_;
  std::string state_dir_, log_path_, payload_;
  std::vector<std::string> common_flags_;
  TlsFiles tls_;
  std::vector<OpState> ops_;
  std::unique_ptr<pkcs11::Token> token_;
};

// Channel `index` of a row. Channel 0 is exactly what callers get from client::CreateChannel;
// further channels carry the same credentials but a subchannel pool of their own, so that each
// is a separate connection (channels with equal arguments share one connection otherwise).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const client::ChannelOptions& options,
                                                           int index);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_BENCH_H_
