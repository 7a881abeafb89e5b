#include "rotation/postgres_metadata_store.h"

#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/caller_message.h"
#include "common/status_macros.h"
#include "rotation/metadata_schema.h"
#include "rotation/postgres_connection.h"
#include "rotation/record_tag.h"

namespace custody::rotation {
namespace {

// Advisory-lock key of schema migrations ("custody" in ASCII).
constexpr int64_t kMigrationLockKey = 0x637573746f6479;
// Advisory-lock key held by the scheduler's leader ("custodyL").
constexpr int64_t kLeaderLockKey = 0x637573746f64794c;

constexpr schema::Dialect kPostgres = schema::Dialect::kPostgres;
using postgres::Boolean;
using postgres::Int;
using postgres::kRetryPayload;
using postgres::kUnreachableForCallers;
using postgres::Params;
using postgres::ReadRow;
using postgres::Text;
using postgres::Trim;

// Runs `statement` with `record`'s row as its parameters, on the store's Connection (its lock
// held).
template <typename Connection, typename Record>
absl::StatusOr<postgres::Result> ExecRow(Connection& c, const schema::Statement& statement,
                                         const Record& record, const std::string& tag) {
  return c.Exec(statement.sql,
                Params(schema::TableOf(record), statement,
                       schema::Encode(kPostgres, schema::ColumnsOf(record), record, tag)));
}

// A text[] literal.
std::string ArrayLiteral(const std::vector<std::string>& items) {
  std::string out = "{";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ',';
    out += '"';
    for (char c : items[i]) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  out += '}';
  return out;
}

std::string RingsText(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) absl::StrAppend(&out, out.empty() ? "" : ", ", "'", n, "'");
  return out;
}

}  // namespace

bool IsPostgresUri(absl::string_view spec) {
  return absl::StartsWith(spec, "postgresql://") || absl::StartsWith(spec, "postgres://");
}

absl::Status CheckConninfo(const std::string& conninfo) {
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  // libpq's parse error may quote the string, which could hold a password: not repeated here.
  if (error != nullptr) PQfreemem(error);
  if (options == nullptr) {
    return absl::InvalidArgumentError("the PostgreSQL connection string does not parse");
  }
  bool has_password = false;
  for (PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (absl::string_view(o->keyword) == "password" && o->val != nullptr && o->val[0] != '\0') {
      has_password = true;
    }
  }
  PQconninfoFree(options);
  if (has_password) {
    return absl::InvalidArgumentError(
        "the PostgreSQL connection string carries a password: put it in a file "
        "(--metadata_password_file, mode 0600 or 0400), in PGPASSFILE or in the environment "
        "variable named by --metadata_password_env, never on the command line");
  }
  return absl::OkStatus();
}

PostgresMetadataStore::PostgresMetadataStore(Options options)
    : RowStore(kPostgres, options.tagger),
      options_(std::move(options)),
      conn_(std::make_unique<Connection>()),
      listen_conn_(std::make_unique<Connection>()),
      leader_conn_(std::make_unique<Connection>()) {}

PostgresMetadataStore::~PostgresMetadataStore() = default;

int PostgresMetadataStore::LatestSchemaVersion() { return schema::LatestVersion(); }

absl::StatusOr<std::unique_ptr<PostgresMetadataStore>> PostgresMetadataStore::Open(
    Options options) {
  if (absl::Status s = CheckConninfo(options.conninfo); !s.ok()) return s;
  auto store =
      std::unique_ptr<PostgresMetadataStore>(new PostgresMetadataStore(std::move(options)));
  Connection& c = *store->conn_;
  absl::MutexLock lock(&c.mu);
  if (absl::Status s = c.Connect(store->options_); !s.ok()) return s;
  // Replicas starting together: the first migrates, the others wait here and find it done.
  const std::string key = absl::StrCat(kMigrationLockKey);
  if (auto r = c.Exec("SELECT pg_advisory_lock($1::bigint)", {key}); !r.ok()) return r.status();
  auto migrate = [&]() -> absl::Status {
    auto r = c.Exec(
        "CREATE TABLE IF NOT EXISTS custody_schema_migrations (version integer PRIMARY KEY, "
        "applied_at timestamptz NOT NULL DEFAULT now())",
        {});
    if (!r.ok()) return r.status();
    r = c.Exec("SELECT coalesce(max(version), 0) FROM custody_schema_migrations", {});
    if (!r.ok()) return r.status();
    auto current = Int(r->get(), 0, 0);
    if (!current.ok()) return current.status();
    const int64_t latest = LatestSchemaVersion();
    if (*current > latest) {
      return absl::FailedPreconditionError(absl::StrCat("metadata schema version ", *current,
                                                        " is newer than this custodyd knows (",
                                                        latest, "): upgrade custodyd"));
    }
    for (int64_t v = *current + 1; v <= latest; ++v) {
      absl::Status s = c.Exec("BEGIN", {}).status();
      for (const schema::MigrationStep& step :
           schema::MigrationSteps(kPostgres, static_cast<int>(v))) {
        if (s.ok()) s = c.Exec(step.sql, {}).status();
      }
      if (s.ok()) {
        s = c.Exec("INSERT INTO custody_schema_migrations(version) VALUES ($1::integer)",
                   {absl::StrCat(v)})
                .status();
      }
      if (s.ok()) s = c.Exec("COMMIT", {}).status();
      if (!s.ok()) {
        c.Exec("ROLLBACK", {}).IgnoreError();
        return absl::Status(s.code(), absl::StrCat("schema migration ", v, " (",
                                                   schema::MigrationSummary(static_cast<int>(v)),
                                                   ") failed: ", s.message()));
      }
    }
    return absl::OkStatus();
  };
  absl::Status migrated = migrate();
  c.Exec("SELECT pg_advisory_unlock($1::bigint)", {key}).IgnoreError();
  if (!migrated.ok()) return migrated;
  return store;
}

std::string PostgresMetadataStore::DescribeTarget() const {
  absl::MutexLock lock(&conn_->mu);
  PGconn* c = conn_->conn;
  if (c == nullptr) return "(not connected)";
  auto s = [](const char* v) { return v == nullptr ? "" : v; };
  return absl::StrCat("host=", s(PQhost(c)), " port=", s(PQport(c)), " dbname=", s(PQdb(c)),
                      " user=", s(PQuser(c)));
}

absl::Status PostgresMetadataStore::Commit(const Mutation& m) {
  // Every ring the mutation touches, in name order (the lock order, so two writers cannot
  // deadlock on each other's rows).
  std::set<std::string> touched_set;
  for (const RingRecord& r : m.insert_rings) touched_set.insert(r.name);
  for (const RingRecord& r : m.update_rings) touched_set.insert(r.name);
  for (const VersionRecord& v : m.insert_versions) touched_set.insert(v.ring);
  for (const VersionRecord& v : m.update_versions) touched_set.insert(v.ring);
  for (const auto& [ring, version] : m.delete_versions) touched_set.insert(ring);
  for (const auto& [ring, generation] : m.expect_generations) touched_set.insert(ring);
  const std::vector<std::string> touched(touched_set.begin(), touched_set.end());
  const std::string touched_array = ArrayLiteral(touched);
  // Tagged before the connection's lock: a tag may be a token call.
  auto tags = TagMutation(options_.tagger, m);
  if (!tags.ok()) return tags.status();

  Connection& c = *conn_;
  absl::MutexLock lock(&c.mu);
  auto attempt = [&]() -> absl::Status {
    for (size_t i = 0; i < m.insert_rings.size(); ++i) {
      const RingRecord& r = m.insert_rings[i];
      auto res = ExecRow(c, statements_.insert_ring, r, tags->insert_rings[i]);
      if (absl::IsAlreadyExists(res.status())) {
        return absl::AlreadyExistsError(absl::StrCat("ring '", r.name, "' already exists"));
      }
      if (!res.ok()) return res.status();
    }
    auto locked = c.Exec(
        "SELECT name, generation FROM rings WHERE name = ANY($1::text[]) "
        "ORDER BY name COLLATE \"C\" FOR UPDATE",
        {touched_array});
    if (!locked.ok()) return locked.status();
    std::map<std::string, int64_t> generations;
    for (int i = 0; i < PQntuples(locked->get()); ++i) {
      auto g = Int(locked->get(), i, 1);
      if (!g.ok()) return g.status();
      generations[Text(locked->get(), i, 0)] = *g;
    }
    for (const auto& [ring, expected] : m.expect_generations) {
      auto it = generations.find(ring);
      if (it == generations.end()) {
        return absl::AbortedError(
            absl::StrCat("ring '", ring, "' no longer exists: another replica removed it"));
      }
      if (static_cast<uint64_t>(it->second) != expected) {
        return absl::AbortedError(absl::StrCat("ring '", ring,
                                               "' was changed by another replica (generation ",
                                               it->second, ", expected ", expected, "); retry"));
      }
    }
    // An UPDATE of one record's row (its key, object_id and create_time are not set).
    auto update = [&](const schema::Statement& statement, const auto& record,
                      const std::string& tag) -> absl::Status {
      CUSTODY_ASSIGN_OR_RETURN(postgres::Result res, ExecRow(c, statement, record, tag));
      if (std::string(PQcmdTuples(res.get())) != "1") return schema::RowNotFound(record);
      return absl::OkStatus();
    };
    for (size_t i = 0; i < m.update_rings.size(); ++i) {
      CUSTODY_RETURN_IF_ERROR(
          update(statements_.update_ring, m.update_rings[i], tags->update_rings[i]));
    }
    // Versions leaving ACTIVE are updated first, then versions are inserted, then versions
    // become ACTIVE: the one-ACTIVE index holds after each statement of a swap.
    auto update_versions = [&](bool active) -> absl::Status {
      for (size_t i = 0; i < m.update_versions.size(); ++i) {
        if ((m.update_versions[i].state == VersionState::kActive) != active) continue;
        CUSTODY_RETURN_IF_ERROR(
            update(statements_.update_version, m.update_versions[i], tags->update_versions[i]));
      }
      return absl::OkStatus();
    };
    CUSTODY_RETURN_IF_ERROR(update_versions(/*active=*/false));
    for (size_t i = 0; i < m.insert_versions.size(); ++i) {
      const VersionRecord& v = m.insert_versions[i];
      if (generations.count(v.ring) == 0) {
        return absl::NotFoundError(absl::StrCat("ring '", v.ring, "' not found"));
      }
      // Under the ring's row lock: the number must be free and the next one.
      auto res = c.Exec(
          "SELECT coalesce(max(version), 0), count(*) FILTER (WHERE version = $2::bigint) "
          "FROM versions WHERE ring = $1",
          {v.ring, absl::StrCat(v.version)});
      if (!res.ok()) return res.status();
      auto max = Int(res->get(), 0, 0);
      auto taken = Int(res->get(), 0, 1);
      if (!max.ok()) return max.status();
      if (!taken.ok()) return taken.status();
      if (*taken > 0) {
        return absl::AlreadyExistsError(absl::StrCat("metadata store: version ", v.version,
                                                     " of ring '", v.ring, "' already exists"));
      }
      if (static_cast<int64_t>(v.version) != *max + 1) {
        return absl::AbortedError(absl::StrCat("version ", v.version, " of ring '", v.ring,
                                               "' is not the next number (", *max + 1,
                                               "): another replica changed the ring; retry"));
      }
      res = ExecRow(c, statements_.insert_version, v, tags->insert_versions[i]);
      if (!res.ok()) return res.status();
    }
    CUSTODY_RETURN_IF_ERROR(update_versions(/*active=*/true));
    for (const auto& [ring, version] : m.delete_versions) {
      auto res = c.Exec("DELETE FROM versions WHERE ring=$1 AND version=$2::bigint",
                        {ring, absl::StrCat(version)});
      if (!res.ok()) return res.status();
      res = c.Exec(
          "DELETE FROM rings WHERE name=$1 AND NOT EXISTS (SELECT 1 FROM versions WHERE ring=$1)",
          {ring});
      if (!res.ok()) return res.status();
    }
    if (!touched.empty()) {
      auto res = c.Exec("UPDATE rings SET generation = generation + 1 WHERE name = ANY($1::text[])",
                        {touched_array});
      if (!res.ok()) return res.status();
      std::string payload = absl::StrJoin(touched, ",");
      if (payload.size() > 7000) payload = "*";  // NOTIFY payloads are limited to 8000 bytes
      res = c.Exec("SELECT pg_notify($1, $2)", {std::string(kNotifyChannel), payload});
      if (!res.ok()) return res.status();
    }
    return absl::OkStatus();
  };

  absl::Status result;
  for (int tries = 0; tries < 5; ++tries) {
    if (result = c.Connect(options_); !result.ok()) {
      if (tries == 0 && result.GetPayload(kRetryPayload).has_value()) continue;
      break;
    }
    result = c.Exec("BEGIN", {}).status();
    if (result.ok()) result = attempt();
    if (result.ok()) {
      result = c.Exec("COMMIT", {}).status();
      // A connection lost during COMMIT leaves the outcome unknown: never retried here.
      if (!result.ok()) {
        result = WithCallerMessage(
            absl::UnavailableError(absl::StrCat(
                "metadata store: the outcome of the commit is unknown (", result.message(), ")")),
            "metadata store unreachable: the outcome of the commit is unknown; read the ring "
            "before retrying");
      }
      break;
    }
    c.Exec("ROLLBACK", {}).IgnoreError();
    if (!result.GetPayload(kRetryPayload).has_value()) break;
  }
  result.ErasePayload(kRetryPayload);
  if (!result.ok() && absl::IsAborted(result) && !touched.empty() &&
      !absl::StrContains(result.message(), "'")) {
    result = absl::AbortedError(absl::StrCat(result.message(), " (", RingsText(touched), ")"));
  }
  return result;
}

absl::StatusOr<std::vector<std::vector<schema::Value>>> PostgresMetadataStore::ReadRows(
    const schema::Table& table) {
  Connection& c = *conn_;
  absl::MutexLock lock(&c.mu);
  auto res = c.Read(options_, absl::StrCat("SELECT ", schema::ColumnList(kPostgres, table),
                                           " FROM ", table.name));
  if (!res.ok()) return res.status();
  std::vector<std::vector<schema::Value>> rows;
  for (int i = 0; i < PQntuples(res->get()); ++i) {
    CUSTODY_ASSIGN_OR_RETURN(rows.emplace_back(), ReadRow(res->get(), i, table));
  }
  return rows;
}

absl::StatusOr<bool> PostgresMetadataStore::WaitForChange(absl::Duration timeout) {
  Connection& c = *listen_conn_;
  absl::MutexLock lock(&c.mu);
  if (c.conn == nullptr || PQstatus(c.conn) != CONNECTION_OK) {
    if (absl::Status s = c.Connect(options_); !s.ok()) {
      absl::SleepFor(std::min(timeout, absl::Milliseconds(100)));
      s.ErasePayload(kRetryPayload);
      return s;
    }
    auto listened = c.Exec(absl::StrCat("LISTEN ", kNotifyChannel), {});
    if (!listened.ok()) {
      absl::Status s = listened.status();
      s.ErasePayload(kRetryPayload);
      return s;
    }
    return true;  // anything committed while not listening is unknown: re-read
  }
  auto drain = [&]() {
    bool any = false;
    while (PGnotify* n = PQnotifies(c.conn)) {
      any = true;
      PQfreemem(n);
    }
    return any;
  };
  auto broken = [&]() {
    absl::Status s =
        WithCallerMessage(absl::UnavailableError(absl::StrCat("metadata store unreachable: ",
                                                              Trim(PQerrorMessage(c.conn)))),
                          kUnreachableForCallers);
    PQfinish(c.conn);
    c.conn = nullptr;
    return s;
  };
  if (PQconsumeInput(c.conn) == 0) return broken();
  if (drain()) return true;
  pollfd fd{PQsocket(c.conn), POLLIN, 0};
  int ready = poll(&fd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  if (ready <= 0) return false;
  if (PQconsumeInput(c.conn) == 0) return broken();
  return drain();
}

absl::StatusOr<bool> PostgresMetadataStore::HoldLeadership() {
  Connection& c = *leader_conn_;
  absl::MutexLock lock(&c.mu);
  if (leading_) {
    // Still the holder only while the session that took the lock is alive.
    auto alive = c.Exec("SELECT 1", {});
    if (alive.ok()) return true;
    leading_ = false;
    if (c.conn != nullptr) PQfinish(c.conn);
    c.conn = nullptr;
    absl::Status s = alive.status();
    s.ErasePayload(kRetryPayload);
    return s;
  }
  if (absl::Status s = c.Connect(options_); !s.ok()) {
    s.ErasePayload(kRetryPayload);
    return s;
  }
  auto r = c.Exec("SELECT pg_try_advisory_lock($1::bigint)", {absl::StrCat(kLeaderLockKey)});
  if (!r.ok()) {
    absl::Status s = r.status();
    s.ErasePayload(kRetryPayload);
    return s;
  }
  leading_ = Boolean(r->get(), 0, 0);
  return leading_;
}

absl::Status PostgresMetadataStore::SaveAuditAnchor(const AuditAnchor& a) {
  Connection& c = *conn_;
  absl::MutexLock lock(&c.mu);
  if (absl::Status s = c.Connect(options_); !s.ok()) return s;
  const schema::Table& table = schema::AnchorsTable();
  const schema::Statement& upsert = statements_.upsert_anchor;
  return c
      .Exec(upsert.sql,
            Params(table, upsert, schema::Encode(kPostgres, schema::AnchorColumns(), a)))
      .status();
}

absl::StatusOr<MetadataStore::AuditAnchor> PostgresMetadataStore::LoadAuditAnchor(
    const std::string& chain) {
  Connection& c = *conn_;
  absl::MutexLock lock(&c.mu);
  if (absl::Status s = c.Connect(options_); !s.ok()) return s;
  const schema::Table& table = schema::AnchorsTable();
  auto r = c.Exec(absl::StrCat("SELECT ", schema::ColumnList(kPostgres, table), " FROM ",
                               table.name, " WHERE chain = $1"),
                  {chain});
  if (!r.ok()) return r.status();
  if (PQntuples(r->get()) == 0) {
    return absl::NotFoundError(absl::StrCat("no audit anchor for chain '", chain, "'"));
  }
  auto row = ReadRow(r->get(), 0, table);
  if (!row.ok()) return row.status();
  return schema::Decode(kPostgres, schema::AnchorColumns(), *row);
}

}  // namespace custody::rotation
