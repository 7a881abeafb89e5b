#include "server/daemon/replica_metrics.h"

#include <algorithm>

namespace custody::server {

using metrics::MetricType;

void WriteReplicaMetrics(metrics::ExpositionWriter& out, const KeyService& keys, absl::Time now) {
  const KeyService::ReplicaStatus s = keys.GetReplicaStatus();
  auto scalar = [&](const char* name, const char* help, MetricType type, double value) {
    out.Family(name, help, type);
    out.Sample(name, {}, value);
  };
  scalar("custody_scheduler_leader",
         "1 while this process runs the scheduler (with PostgreSQL: holds the leader's advisory "
         "lock), else 0. Across replicas the sum is 1.",
         MetricType::kGauge, s.scheduler_leader ? 1 : 0);
  scalar("custody_jwks_generation",
         "Generation of the published key set; moves with every change of any ring's JWKS "
         "(replicas reach the same set, not the same number).",
         MetricType::kGauge, static_cast<double>(s.jwks_generation));
  if (!s.shared_store) return;
  const double age =
      std::max(0.0, static_cast<double>(absl::ToUnixMillis(now) - s.last_good_read_ms) / 1000);
  scalar("custody_metadata_last_good_read_age_seconds",
         "Seconds since the start of this replica's last successful read of the shared metadata "
         "store. Past custody_metadata_max_staleness_seconds it refuses signing and decryption "
         "and reports NOT_SERVING.",
         MetricType::kGauge, age);
  scalar("custody_metadata_max_staleness_seconds", "--max_metadata_staleness, in seconds.",
         MetricType::kGauge, absl::ToDoubleSeconds(s.max_staleness));
  scalar("custody_metadata_refreshes_total",
         "Successful re-reads of the shared metadata store (on a change notification or the "
         "periodic safety net).",
         MetricType::kCounter, static_cast<double>(s.refreshes));
  scalar("custody_metadata_refresh_failures_total",
         "Re-reads (or waits for a change notification) that failed: the store was unreachable.",
         MetricType::kCounter, static_cast<double>(s.refresh_failures));
  scalar("custody_metadata_rings_refreshed_total",
         "Ring snapshots replaced by a re-read: changes made by other replicas (or the first "
         "sight of a ring).",
         MetricType::kCounter, static_cast<double>(s.rings_refreshed));
}

}  // namespace custody::server
