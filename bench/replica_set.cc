#include "bench/replica_set.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "rotation/testing/postgres_cluster.h"

namespace custody::bench {

absl::StatusOr<std::unique_ptr<ReplicaSet>> ReplicaSet::Start(const Options& options) {
  auto set = std::unique_ptr<ReplicaSet>(new ReplicaSet());
  auto cluster = rotation::testing::PostgresCluster::Start();
  if (!cluster.ok()) return cluster.status();
  set->cluster_ = *std::move(cluster);
  if (absl::Status s = set->cluster_->CreateDatabase("bench"); !s.ok()) return s;
  for (int i = 0; i < options.replicas; ++i) {
    CustodydOptions o;
    o.binary = options.binary;
    o.state_dir = absl::StrCat(options.dir, "/replica", i);
    std::filesystem::create_directories(o.state_dir);
    std::filesystem::permissions(o.state_dir, std::filesystem::perms::owner_all);
    o.listen = "unix:" + o.state_dir + "/custodyd.sock";
    o.channel.address = o.listen;
    o.log_path = o.state_dir + "/custodyd.log";
    o.extra_flags = options.flags;
    for (const std::string& flag : {"--metadata=" + set->cluster_->Uri("bench"),
                                    "--metadata_password_file=" + set->cluster_->password_file(),
                                    absl::StrCat("--replica_id=r", i)}) {
      o.extra_flags.push_back(flag);
    }
    if (!options.module_path.empty()) {
      o.extra_flags.push_back("--pkcs11_module=" + options.module_path);
      o.extra_flags.push_back("--token_label=custody");
      o.extra_flags.push_back("--pin_file=" + options.pin_file);
    }
    auto replica = CustodydProcess::Start(o);
    if (!replica.ok()) return replica.status();
    set->replicas_.push_back(*std::move(replica));
  }
  return set;
}

ReplicaSet::~ReplicaSet() {
  replicas_.clear();  // SIGKILL whatever Stop did not stop
  cluster_.reset();
}

std::string ReplicaSet::addresses() const {
  std::string out;
  for (const auto& r : replicas_) {
    absl::StrAppend(&out, out.empty() ? "" : ",", r->options().channel.address);
  }
  return out;
}

std::vector<pid_t> ReplicaSet::pids() const {
  std::vector<pid_t> out;
  for (const auto& r : replicas_) out.push_back(r->pid());
  return out;
}

absl::Status ReplicaSet::Stop() {
  absl::Status first;
  for (auto& r : replicas_) {
    if (absl::Status s = r->Stop(); !s.ok() && first.ok()) first = s;
  }
  return first;
}

}  // namespace custody::bench
