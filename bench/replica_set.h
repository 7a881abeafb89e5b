// custody-bench's replica row: N custodyd replicas on one throw-away PostgreSQL 15 cluster
// (rotation/testing/postgres_cluster.h: initdb in a temporary directory, Unix socket only) and
// the bench's SoftHSM2 token (every replica loads SoftHSM2 on it through the SOFTHSM2_CONF the
// bench process exports, with the token's PIN file), each on its own state directory and Unix
// socket. The client library reaches them through one channel over all addresses.
#ifndef CUSTODY_BENCH_REPLICA_SET_H_
#define CUSTODY_BENCH_REPLICA_SET_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/custodyd_process.h"

namespace custody::rotation::testing {
class PostgresCluster;
}

namespace custody::bench {

class ReplicaSet {
 public:
  struct Options {
    std::string binary;  // custodyd
    std::string dir;     // replicas' state directories and logs go under it
    int replicas = 3;
    // The SoftHSM2 module and the PIN file of the bench's embedded token "custody"; empty when
    // `flags` name the token (custody-bench --token_label).
    std::string module_path;
    std::string pin_file;
    std::vector<std::string> flags;  // common custodyd flags
  };
  // Starts the cluster, then the replicas one after the other (each until SERVING).
  static absl::StatusOr<std::unique_ptr<ReplicaSet>> Start(const Options& options);
  ~ReplicaSet();  // stops the replicas (SIGKILL if needed), then the cluster

  // "unix:A,unix:B,unix:C": every replica, for client::ChannelOptions::address.
  std::string addresses() const;
  std::vector<pid_t> pids() const;
  // SIGTERM each replica; the first failure.
  absl::Status Stop();

 private:
  ReplicaSet() = default;
  std::unique_ptr<rotation::testing::PostgresCluster> cluster_;
  std::vector<std::unique_ptr<CustodydProcess>> replicas_;
};

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_REPLICA_SET_H_
