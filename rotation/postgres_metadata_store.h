// The metadata store on PostgreSQL (libpq), shared by every custodyd replica.
//
// Schema: versioned migrations (table custody_schema_migrations) applied at Open under a
// session-level advisory lock, so replicas starting together migrate once. A newer schema than
// this binary knows is refused.
//
// Concurrency between replicas: Commit locks the rows of the rings it touches (SELECT ... FOR
// UPDATE, in name order), checks Mutation::expect_generations against each ring's `generation`
// counter, applies the change and increments the counter of every ring it touched, all in one
// transaction. Inside that lock an inserted version must be the ring's next number (no gaps, no
// duplicates), and a partial unique index allows one ACTIVE version per ring. A writer that lost
// a race gets ABORTED with the reason; deadlocks and serialization failures are retried inside
// Commit. Each commit sends NOTIFY custody_metadata with the ring names it touched.
//
// Secrets: the password comes from Options::password (read by the caller from a mode-checked
// file or the environment), or libpq's own PGPASSFILE / ~/.pgpass. A connection string that
// carries a password is refused; the connection string is never logged.
//
// Thread-safe: one connection behind a mutex, re-established after a failure.
#ifndef CUSTODY_ROTATION_POSTGRES_METADATA_STORE_H_
#define CUSTODY_ROTATION_POSTGRES_METADATA_STORE_H_

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/secret.h"
#include "rotation/metadata_schema.h"
#include "rotation/metadata_store.h"
#include "rotation/row_store.h"

namespace custody::rotation {

class PostgresMetadataStore : public RowStore {
 public:
  struct Options {
    // libpq connection string: a postgresql:// URI or key=value pairs, without a password.
    std::string conninfo;
    Secret password;  // empty: libpq's PGPASSFILE / ~/.pgpass (or no password)
    std::string application_name = "custodyd";
    absl::Duration connect_timeout = absl::Seconds(5);
    // Bounds every statement and lock wait, so a stuck database fails a call instead of hanging.
    absl::Duration statement_timeout = absl::Seconds(10);
    // Tags every written record and checks every read one (MetadataStore::Open says how); must
    // outlive the store. Null: no tags.
    const RecordTagger* tagger = nullptr;
  };

  // Connects and applies pending migrations. INVALID_ARGUMENT for a connection string that
  // does not parse or carries a password; UNAVAILABLE when the server cannot be reached;
  // FAILED_PRECONDITION when the schema is newer than this binary.
  static absl::StatusOr<std::unique_ptr<PostgresMetadataStore>> Open(Options options);
  ~PostgresMetadataStore() override;

  absl::Status Commit(const Mutation& mutation) override;
  absl::Status SaveAuditAnchor(const AuditAnchor& anchor) override;
  absl::StatusOr<AuditAnchor> LoadAuditAnchor(const std::string& chain) override;
  // LISTEN custody_metadata on a second connection. True on a notification, and after
  // (re)connecting that connection (notifications may have been missed meanwhile).
  absl::StatusOr<bool> WaitForChange(absl::Duration timeout) override;
  // A session-level advisory lock on a third connection (pg_try_advisory_lock): PostgreSQL
  // releases it when that session ends, however the process died.
  absl::StatusOr<bool> HoldLeadership() override;

  // The schema version this binary migrates to.
  static int LatestSchemaVersion();
  // Where the store connects, for logs: host (or socket directory), port, database, user. Never
  // the password.
  std::string DescribeTarget() const;

  // The NOTIFY channel each commit signals (payload: the touched ring names, comma-separated).
  static constexpr absl::string_view kNotifyChannel = "custody_metadata";

 private:
  struct Connection;
  explicit PostgresMetadataStore(Options options);
  absl::StatusOr<std::vector<std::vector<schema::Value>>> ReadRows(
      const schema::Table& table) override;

  Options options_;
  const schema::Statements statements_ = schema::StatementsFor(schema::Dialect::kPostgres);
  std::unique_ptr<Connection> conn_;
  std::unique_ptr<Connection> listen_conn_;
  std::unique_ptr<Connection> leader_conn_;
  bool leading_ = false;  // guarded by leader_conn_->mu
};

// True when `spec` names a PostgreSQL store (postgresql:// or postgres:// URI).
bool IsPostgresUri(absl::string_view spec);

// Refuses a connection string that carries a password (INVALID_ARGUMENT saying where the
// password belongs) or does not parse.
absl::Status CheckConninfo(const std::string& conninfo);

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_POSTGRES_METADATA_STORE_H_
