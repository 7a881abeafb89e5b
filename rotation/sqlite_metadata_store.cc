#include "rotation/sqlite_metadata_store.h"

#include <sqlite3.h>

#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/caller_message.h"
#include "common/status_macros.h"
#include "rotation/metadata_schema.h"
#include "rotation/record_tag.h"
#include "rotation/row_store.h"

namespace custody::rotation {
namespace {

constexpr schema::Dialect kSqlite = schema::Dialect::kSqlite;

// The embedded store: one SQLite connection behind a mutex.
class SqliteMetadataStore final : public RowStore {
 public:
  SqliteMetadataStore(sqlite3* db, const RecordTagger* tagger)
      : RowStore(kSqlite, tagger), db_(db) {}
  ~SqliteMetadataStore() override;

  absl::Status Commit(const Mutation& mutation) override;
  absl::Status SaveAuditAnchor(const AuditAnchor& anchor) override;
  absl::StatusOr<AuditAnchor> LoadAuditAnchor(const std::string& chain) override;
  // Sets the connection's pragmas and brings the schema to the latest migration.
  absl::Status Init();

 private:
  absl::Status Exec(const std::string& sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Migrate(int version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<bool> HasColumn(const std::string& table, const std::string& column)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Apply(const Mutation& mutation, const MutationTags& tags)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<std::vector<schema::Value>>> ReadRows(
      const schema::Table& table) override;

  const schema::Statements statements_ = schema::StatementsFor(kSqlite);
  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

struct StmtDeleter {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtDeleter>;

absl::Status SqliteError(sqlite3* db, absl::string_view what) {
  // SQLite's text is for the log; a caller learns whether to retry.
  const int code = sqlite3_errcode(db) & 0xff;
  const bool transient = code == SQLITE_BUSY || code == SQLITE_LOCKED || code == SQLITE_IOERR ||
                         code == SQLITE_FULL || code == SQLITE_CANTOPEN;
  std::string detail = absl::StrCat("metadata store: ", what, ": ", sqlite3_errmsg(db));
  return transient ? WithCallerMessage(absl::UnavailableError(detail),
                                       "metadata store unavailable (the details are in custodyd's "
                                       "log)")
                   : WithCallerMessage(absl::InternalError(detail),
                                       "metadata store error (the details are in custodyd's log)");
}

absl::StatusOr<Stmt> Prepare(sqlite3* db, const std::string& sql) {
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
    return SqliteError(db, "prepare");
  }
  return Stmt(stmt);
}

void BindText(sqlite3_stmt* s, int i, const std::string& v) {
  sqlite3_bind_text(s, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
}

std::string ColumnText(sqlite3_stmt* s, int i) {
  const unsigned char* p = sqlite3_column_text(s, i);
  return p == nullptr ? std::string()
                      : std::string(reinterpret_cast<const char*>(p),
                                    static_cast<size_t>(sqlite3_column_bytes(s, i)));
}

// Prepares `statement` and binds the row's values it names.
absl::StatusOr<Stmt> PrepareBound(sqlite3* db, const schema::Table& table,
                                  const schema::Statement& statement,
                                  const std::vector<schema::Value>& row) {
  auto stmt = Prepare(db, statement.sql);
  if (!stmt.ok()) return stmt.status();
  const std::vector<const schema::ColumnSpec*> columns = schema::DialectColumns(kSqlite, table);
  for (size_t p = 0; p < statement.columns.size(); ++p) {
    const size_t i = statement.columns[p];
    const int position = static_cast<int>(p + 1);
    if (columns[i]->type == schema::Type::kText) {
      BindText(stmt->get(), position, row[i].text);
    } else {
      sqlite3_bind_int64(stmt->get(), position, row[i].integer);
    }
  }
  return stmt;
}

// The current row of a SELECT of the table's column list.
std::vector<schema::Value> ReadRow(sqlite3_stmt* s, const schema::Table& table) {
  std::vector<schema::Value> row;
  int i = 0;
  for (const schema::ColumnSpec* c : schema::DialectColumns(kSqlite, table)) {
    schema::Value& v = row.emplace_back();
    if (c->type == schema::Type::kText) {
      v.text = ColumnText(s, i);
    } else {
      v.integer = sqlite3_column_int64(s, i);
    }
    ++i;
  }
  return row;
}

// Runs the statement to completion; SQLITE_CONSTRAINT is reported as ALREADY_EXISTS.
absl::Status StepDone(sqlite3* db, sqlite3_stmt* s, absl::string_view what) {
  int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE) return absl::OkStatus();
  if ((rc & 0xff) == SQLITE_CONSTRAINT) {
    return absl::AlreadyExistsError(absl::StrCat("metadata store: ", what, ": already exists"));
  }
  return SqliteError(db, what);
}

// Runs `statement` with `record`'s row bound; the number of rows it changed.
template <typename Record>
absl::StatusOr<int> WriteRow(sqlite3* db, const schema::Statement& statement, const Record& record,
                             const std::string& tag, absl::string_view what) {
  auto stmt = PrepareBound(db, schema::TableOf(record), statement,
                           schema::Encode(kSqlite, schema::ColumnsOf(record), record, tag));
  if (!stmt.ok()) return stmt.status();
  CUSTODY_RETURN_IF_ERROR(StepDone(db, stmt->get(), what));
  return sqlite3_changes(db);
}

// Updates each record's row; NOT_FOUND when one has none.
template <typename Record>
absl::Status UpdateRows(sqlite3* db, const schema::Statement& statement,
                        const std::vector<Record>& records, const std::vector<std::string>& tags,
                        absl::string_view what) {
  for (size_t i = 0; i < records.size(); ++i) {
    CUSTODY_ASSIGN_OR_RETURN(int changed, WriteRow(db, statement, records[i], tags[i], what));
    if (changed != 1) return schema::RowNotFound(records[i]);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetadataStore>> OpenSqliteMetadataStore(const std::string& path,
                                                                       const RecordTagger* tagger) {
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open metadata database '", path, "': ", msg));
  }
  sqlite3_busy_timeout(db, 5000);
  auto store = std::make_unique<SqliteMetadataStore>(db, tagger);
  if (absl::Status s = store->Init(); !s.ok()) return s;
  return store;
}

absl::Status SqliteMetadataStore::Init() {
  absl::MutexLock lock(&mu_);
  // WAL + synchronous=FULL: every commit is fsynced before it returns.
  for (const char* pragma :
       {"PRAGMA journal_mode=WAL;", "PRAGMA synchronous=FULL;", "PRAGMA foreign_keys=ON;"}) {
    if (absl::Status s = Exec(pragma); !s.ok()) return s;
  }
  auto version = Prepare(db_, "PRAGMA user_version");
  if (!version.ok()) return version.status();
  if (sqlite3_step(version->get()) != SQLITE_ROW) return SqliteError(db_, "read schema version");
  const int current = sqlite3_column_int(version->get(), 0);
  version->reset();
  if (current > schema::LatestVersion()) {
    return absl::FailedPreconditionError(
        absl::StrCat("metadata schema version ", current, " is newer than this custodyd knows (",
                     schema::LatestVersion(), "): upgrade custodyd"));
  }
  for (int v = current + 1; v <= schema::LatestVersion(); ++v) {
    if (absl::Status s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
    absl::Status s = Migrate(v);
    if (s.ok()) s = Exec(absl::StrCat("PRAGMA user_version=", v, ";"));
    if (s.ok()) s = Exec("COMMIT;");
    if (!s.ok()) {
      Exec("ROLLBACK;").IgnoreError();
      return absl::Status(s.code(),
                          absl::StrCat("schema migration ", v, " (", schema::MigrationSummary(v),
                                       ") failed: ", s.message()));
    }
  }
  // A file that says it has the latest schema but lacks a column (edited by hand, or restored
  // from a copy whose version was set wrongly) is named here rather than failing every read.
  for (const schema::Table* table :
       {&schema::RingsTable(), &schema::VersionsTable(), &schema::AnchorsTable()}) {
    for (const schema::ColumnSpec* c : schema::DialectColumns(kSqlite, *table)) {
      auto has = HasColumn(table->name, c->name);
      if (!has.ok()) return has.status();
      if (!*has) {
        return absl::FailedPreconditionError(
            absl::StrCat("the metadata database says schema version ", schema::LatestVersion(),
                         " but its table '", table->name, "' has no column '", c->name,
                         "': restore metadata.db from a backup"));
      }
    }
  }
  return absl::OkStatus();
}

// A database made before numbered migrations (user_version 0) may already hold any of the
// tables and columns: each step is skipped when what it adds is there.
absl::Status SqliteMetadataStore::Migrate(int version) {
  for (const schema::MigrationStep& step : schema::MigrationSteps(kSqlite, version)) {
    if (step.kind == schema::MigrationStep::kAddColumn) {
      auto has = HasColumn(step.table, step.column);
      if (!has.ok()) return has.status();
      if (*has) continue;
    }
    if (absl::Status s = Exec(step.sql + ";"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> SqliteMetadataStore::HasColumn(const std::string& table,
                                                    const std::string& column) {
  auto info = Prepare(db_, absl::StrCat("SELECT 1 FROM pragma_table_info('", table,
                                        "') WHERE name='", column, "'"));
  if (!info.ok()) return info.status();
  return sqlite3_step(info->get()) == SQLITE_ROW;
}

SqliteMetadataStore::~SqliteMetadataStore() {
  absl::MutexLock lock(&mu_);
  sqlite3_close(db_);
}

absl::Status SqliteMetadataStore::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return SqliteError(db_, msg);
  }
  return absl::OkStatus();
}

absl::Status SqliteMetadataStore::Apply(const Mutation& m, const MutationTags& tags) {
  for (size_t i = 0; i < m.insert_rings.size(); ++i) {
    const RingRecord& r = m.insert_rings[i];
    auto written = WriteRow(db_, statements_.insert_ring, r, tags.insert_rings[i], "insert ring");
    if (absl::IsAlreadyExists(written.status())) {
      return absl::AlreadyExistsError(absl::StrCat("ring '", r.name, "' already exists"));
    }
    if (!written.ok()) return written.status();
  }
  CUSTODY_RETURN_IF_ERROR(
      UpdateRows(db_, statements_.update_ring, m.update_rings, tags.update_rings, "update ring"));
  for (size_t i = 0; i < m.insert_versions.size(); ++i) {
    const VersionRecord& v = m.insert_versions[i];
    auto written =
        WriteRow(db_, statements_.insert_version, v, tags.insert_versions[i], "insert version");
    if (absl::IsAlreadyExists(written.status())) {
      // The REFERENCES constraint fails the same way as a duplicate; tell them apart.
      auto ring = Prepare(db_, "SELECT 1 FROM rings WHERE name=?");
      if (!ring.ok()) return ring.status();
      BindText(ring->get(), 1, v.ring);
      if (sqlite3_step(ring->get()) != SQLITE_ROW) {
        return absl::NotFoundError(absl::StrCat("ring '", v.ring, "' not found"));
      }
    }
    if (!written.ok()) return written.status();
  }
  CUSTODY_RETURN_IF_ERROR(UpdateRows(db_, statements_.update_version, m.update_versions,
                                     tags.update_versions, "update version"));
  for (const auto& [ring, version] : m.delete_versions) {
    auto del = Prepare(db_, "DELETE FROM versions WHERE ring=? AND version=?");
    if (!del.ok()) return del.status();
    BindText(del->get(), 1, ring);
    sqlite3_bind_int64(del->get(), 2, version);
    if (absl::Status st = StepDone(db_, del->get(), "delete version"); !st.ok()) return st;
    auto del_ring = Prepare(
        db_, "DELETE FROM rings WHERE name=? AND NOT EXISTS (SELECT 1 FROM versions WHERE ring=?)");
    if (!del_ring.ok()) return del_ring.status();
    BindText(del_ring->get(), 1, ring);
    BindText(del_ring->get(), 2, ring);
    if (absl::Status st = StepDone(db_, del_ring->get(), "delete ring"); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status SqliteMetadataStore::Commit(const Mutation& mutation) {
  // Tagged before the lock: a tag may be a token call.
  auto tags = TagMutation(tagger(), mutation);
  if (!tags.ok()) return tags.status();
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  absl::Status s = Apply(mutation, *tags);
  if (s.ok()) s = Exec("COMMIT;");
  if (!s.ok()) Exec("ROLLBACK;").IgnoreError();
  return s;
}

absl::StatusOr<std::vector<std::vector<schema::Value>>> SqliteMetadataStore::ReadRows(
    const schema::Table& table) {
  absl::MutexLock lock(&mu_);
  auto stmt = Prepare(
      db_, absl::StrCat("SELECT ", schema::ColumnList(kSqlite, table), " FROM ", table.name));
  if (!stmt.ok()) return stmt.status();
  std::vector<std::vector<schema::Value>> rows;
  int rc;
  while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW)
    rows.push_back(ReadRow(stmt->get(), table));
  if (rc != SQLITE_DONE) return SqliteError(db_, absl::StrCat("load ", table.name));
  return rows;
}

namespace {

absl::StatusOr<MetadataStore::AuditAnchor> SelectAuditAnchor(sqlite3* db,
                                                             const std::string& chain) {
  const schema::Table& table = schema::AnchorsTable();
  auto stmt = Prepare(db, absl::StrCat("SELECT ", schema::ColumnList(kSqlite, table), " FROM ",
                                       table.name, " WHERE chain = ?"));
  if (!stmt.ok()) return stmt.status();
  BindText(stmt->get(), 1, chain);
  int rc = sqlite3_step(stmt->get());
  if (rc == SQLITE_DONE) {
    return absl::NotFoundError(absl::StrCat("no audit anchor for chain '", chain, "'"));
  }
  if (rc != SQLITE_ROW) return SqliteError(db, "load audit anchor");
  return schema::Decode(kSqlite, schema::AnchorColumns(), ReadRow(stmt->get(), table));
}

}  // namespace

absl::Status SqliteMetadataStore::SaveAuditAnchor(const AuditAnchor& a) {
  absl::MutexLock lock(&mu_);
  const schema::Table& table = schema::AnchorsTable();
  auto stmt = PrepareBound(db_, table, statements_.upsert_anchor,
                           schema::Encode(kSqlite, schema::AnchorColumns(), a));
  if (!stmt.ok()) return stmt.status();
  return StepDone(db_, stmt->get(), "save audit anchor");
}

absl::StatusOr<MetadataStore::AuditAnchor> SqliteMetadataStore::LoadAuditAnchor(
    const std::string& chain) {
  absl::MutexLock lock(&mu_);
  return SelectAuditAnchor(db_, chain);
}

absl::StatusOr<MetadataStore::AuditAnchor> ReadSqliteAuditAnchor(const std::string& path,
                                                                 const std::string& chain) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr);
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> owned(db, &sqlite3_close);
  if (rc != SQLITE_OK) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot open metadata database '", path, "': ", db ? sqlite3_errmsg(db) : "out of memory"));
  }
  sqlite3_busy_timeout(db, 5000);
  auto anchor = SelectAuditAnchor(db, chain);
  if (!anchor.ok() && !absl::IsNotFound(anchor.status()) &&
      absl::StrContains(anchor.status().message(), "no such table")) {
    return absl::NotFoundError("the metadata database has no audit anchors (custodyd too old)");
  }
  return anchor;
}

}  // namespace custody::rotation
