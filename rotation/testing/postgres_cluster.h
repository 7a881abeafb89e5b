// A throw-away PostgreSQL 15 cluster for tests: initdb in a temporary directory, password
// (SCRAM) authentication, listening only on a Unix socket in that directory; stopped and
// removed by the destructor. When the test runs as root the cluster runs as `nobody` (setpriv),
// since PostgreSQL refuses to run as root. fsync is off: the tests kill and restart the server
// process, never the machine.
//
// The binaries come from /usr/lib/postgresql/15/bin (Debian's postgresql-15) or
// $CUSTODY_PG_BINDIR. Not thread-safe.
#ifndef CUSTODY_ROTATION_TESTING_POSTGRES_CLUSTER_H_
#define CUSTODY_ROTATION_TESTING_POSTGRES_CLUSTER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace custody::rotation::testing {

class PostgresCluster {
 public:
  static absl::StatusOr<std::unique_ptr<PostgresCluster>> Start();
  ~PostgresCluster();
  PostgresCluster(const PostgresCluster&) = delete;
  PostgresCluster& operator=(const PostgresCluster&) = delete;

  // A libpq connection string (key=value, no password) for database `dbname`.
  std::string Conninfo(const std::string& dbname) const;
  // The same as a postgresql:// URI.
  std::string Uri(const std::string& dbname) const;
  // The password of the superuser `custody`: a file owned by the caller, mode 0600.
  const std::string& password_file() const { return password_file_; }
  std::string password() const { return password_; }
  // A pgpass file (PGPASSFILE format) for the same password, mode 0600.
  const std::string& pgpass_file() const { return pgpass_file_; }
  const std::string& dir() const { return dir_; }

  absl::Status CreateDatabase(const std::string& name);
  // Runs SQL through psql in `dbname`; returns its unaligned, tuples-only output.
  absl::StatusOr<std::string> Psql(const std::string& dbname, const std::string& sql);

  // pg_ctl stop/start/restart; `mode` is smart, fast or immediate.
  absl::Status Stop(const std::string& mode);
  absl::Status StartServer();
  absl::Status Restart(const std::string& mode);

 private:
  PostgresCluster() = default;
  // Runs a shell command line as the cluster's owner; the exit status.
  int RunAsOwner(const std::string& command) const;

  std::string bindir_;
  std::string dir_;
  std::string password_;
  std::string password_file_;
  std::string pgpass_file_;
  std::string run_as_;  // "setpriv ... " when root, else empty
  bool running_ = false;
};

// One cluster for a whole test binary: Register() at namespace scope starts it before the first
// test and removes it after the last (a failed start fails every test); Get() is null outside.
class PostgresClusterEnvironment : public ::testing::Environment {
 public:
  static ::testing::Environment* Register() {
    return ::testing::AddGlobalTestEnvironment(new PostgresClusterEnvironment);
  }
  static PostgresCluster* Get() { return cluster_.get(); }
  void SetUp() override {
    auto started = PostgresCluster::Start();
    ASSERT_TRUE(started.ok()) << started.status();
    cluster_ = *std::move(started);
  }
  void TearDown() override { cluster_.reset(); }

 private:
  static inline std::unique_ptr<PostgresCluster> cluster_;
};

}  // namespace custody::rotation::testing

#endif  // CUSTODY_ROTATION_TESTING_POSTGRES_CLUSTER_H_
