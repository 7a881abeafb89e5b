// The replica part of custodyd's /metrics (KeyService::GetReplicaStatus): how old the snapshot
// is against the staleness bound, whether this process runs the scheduler, the re-reads of a
// shared metadata store and the published key set's generation. docs/metrics.md lists them.
#ifndef CUSTODY_SERVER_DAEMON_REPLICA_METRICS_H_
#define CUSTODY_SERVER_DAEMON_REPLICA_METRICS_H_

#include "absl/time/time.h"
#include "metrics/exposition.h"
#include "server/keys/key_service.h"

namespace custody::server {

// Appends the families to `out`. The metadata ones only with a shared store (PostgreSQL): the
// embedded SQLite store is never stale. Reads atomics and one snapshot counter; no I/O.
void WriteReplicaMetrics(metrics::ExpositionWriter& out, const KeyService& keys, absl::Time now);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_REPLICA_METRICS_H_
