// Test-only: N custodyd replicas (the real binary) on one PostgreSQL database of a throw-away
// cluster (rotation/testing/postgres_cluster.h) and one SoftHSM2 token, as docs/replicas.md
// deploys them: replica 0 bootstraps the embedded token, the others load the same module on the
// same token directory (SOFTHSM2_CONF) with the same PIN file.
#ifndef CUSTODY_TESTS_TESTING_REPLICA_SET_H_
#define CUSTODY_TESTS_TESTING_REPLICA_SET_H_

#include <memory>
#include <string>
#include <vector>

#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"

namespace custody::testing {

class ReplicaSet {
 public:
  // Creates database `db` in `cluster` and starts `n` replicas on it; started() says whether
  // every one came up (their logs() say why not).
  ReplicaSet(rotation::testing::PostgresCluster& cluster, const std::string& db, int n);

  // n replicas on a fresh database of the test binary's cluster
  // (rotation::testing::PostgresClusterEnvironment, which the binary registers).
  static std::unique_ptr<ReplicaSet> OnTestCluster(int n);

  bool started() const;
  int size() const { return static_cast<int>(replicas_.size()); }
  Custodyd& at(int i) { return *replicas_[static_cast<size_t>(i)]; }
  // "unix:A,unix:B,...": every replica's address, as custodyctl --addr and the clients take it.
  std::string addresses() const;
  // Starts replica i again on its state directory with its flags (after Kill()).
  void Restart(int i);
  std::string logs() const;
  // Waits (up to 10 s) until custodyctl jwks of `rings` succeeds on every replica (a ring made
  // on one reaches the others by NOTIFY); "" or what failed.
  std::string WaitUntilEveryReplicaServes(const std::vector<std::string>& rings);

 private:
  std::vector<std::unique_ptr<TempDir>> dirs_;
  std::vector<std::vector<std::string>> flags_;
  std::vector<std::vector<std::string>> envs_;
  std::vector<std::unique_ptr<Custodyd>> replicas_;
};

}  // namespace custody::testing

#endif  // CUSTODY_TESTS_TESTING_REPLICA_SET_H_
