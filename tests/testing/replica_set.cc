#include "tests/testing/replica_set.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace custody::testing {

ReplicaSet::ReplicaSet(rotation::testing::PostgresCluster& cluster, const std::string& db, int n) {
  if (!cluster.CreateDatabase(db).ok()) return;
  const std::vector<std::string> metadata = {"--metadata=" + cluster.Uri(db),
                                             "--metadata_password_file=" + cluster.password_file()};
  for (int i = 0; i < n; ++i) {
    dirs_.push_back(std::make_unique<TempDir>());
    std::vector<std::string> flags = metadata;
    flags.push_back(absl::StrCat("--replica_id=r", i));
    std::vector<std::string> env;
    if (i > 0) {
      const std::string first = dirs_[0]->path();
      flags.insert(flags.end(), {"--pkcs11_module=/usr/lib/softhsm/libsofthsm2.so",
                                 "--token_label=custody", "--pin_file=" + first + "/pin"});
      env.push_back("SOFTHSM2_CONF=" + first + "/softhsm2.conf");
    }
    flags_.push_back(flags);
    envs_.push_back(env);
    replicas_.push_back(
        std::make_unique<Custodyd>(dirs_.back()->path(), flags, Custodyd::Environment{env}));
    if (!replicas_.back()->started()) return;
  }
}

std::unique_ptr<ReplicaSet> ReplicaSet::OnTestCluster(int n) {
  rotation::testing::PostgresCluster* cluster =
      rotation::testing::PostgresClusterEnvironment::Get();
  if (cluster == nullptr) return nullptr;
  static int databases = 0;
  return std::make_unique<ReplicaSet>(*cluster, absl::StrCat("rs", getpid(), "_", ++databases), n);
}

std::string ReplicaSet::WaitUntilEveryReplicaServes(const std::vector<std::string>& rings) {
  for (int i = 0; i < size(); ++i) {
    std::vector<std::string> argv = {BinDir() + "/custodyctl", "--addr=" + at(i).address(), "jwks"};
    argv.insert(argv.end(), rings.begin(), rings.end());
    for (int tries = 0;; ++tries) {
      CommandResult r = RunCommand(argv);
      if (r.exit_code == 0) break;
      if (tries == 200) return absl::StrCat("replica ", i, " never served the rings: ", r.err);
      usleep(50 * 1000);
    }
  }
  return "";
}

bool ReplicaSet::started() const {
  if (replicas_.empty()) return false;
  for (const auto& r : replicas_) {
    if (!r->started()) return false;
  }
  return true;
}

std::string ReplicaSet::addresses() const {
  std::string out;
  for (const auto& r : replicas_) absl::StrAppend(&out, out.empty() ? "" : ",", r->address());
  return out;
}

void ReplicaSet::Restart(int i) {
  const size_t k = static_cast<size_t>(i);
  replicas_[k].reset();
  replicas_[k] =
      std::make_unique<Custodyd>(dirs_[k]->path(), flags_[k], Custodyd::Environment{envs_[k]});
}

std::string ReplicaSet::logs() const {
  std::string out;
  for (size_t i = 0; i < replicas_.size(); ++i) {
    absl::StrAppend(&out, "--- replica ", i, " ---\n", replicas_[i]->log());
  }
  return out;
}

}  // namespace custody::testing
