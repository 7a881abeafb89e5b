#include "rotation/metadata_store.h"

#include <sqlite3.h>

#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/caller_message.h"
#include "rotation/record_tag.h"

namespace custody::rotation {
namespace {

// The embedded store: one SQLite connection behind a mutex.
class SqliteMetadataStore final : public MetadataStore {
 public:
  SqliteMetadataStore(sqlite3* db, const RecordTagger* tagger) : tagger_(tagger), db_(db) {}
  ~SqliteMetadataStore() override;

  absl::Status Commit(const Mutation& mutation) override;
  absl::StatusOr<std::vector<RingRecord>> LoadRings() override;
  absl::StatusOr<std::vector<VersionRecord>> LoadVersions() override;
  absl::Status SaveAuditAnchor(const AuditAnchor& anchor) override;
  absl::StatusOr<AuditAnchor> LoadAuditAnchor(const std::string& chain) override;
  // Sets the connection's pragmas and applies the schema.
  absl::Status Init();

 private:
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Apply(const Mutation& mutation, const MutationTags& tags)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RecordTagger* const tagger_;
  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS rings (
  name TEXT PRIMARY KEY,
  purpose TEXT NOT NULL,
  alg TEXT NOT NULL,
  rsa_bits INTEGER NOT NULL,
  allow_non_fapi INTEGER NOT NULL,
  create_time INTEGER NOT NULL,
  curve TEXT NOT NULL DEFAULT '',
  zip_max_bytes INTEGER NOT NULL DEFAULT 0,
  prepublish_ms INTEGER NOT NULL DEFAULT 3600000,
  rotation_period_ms INTEGER NOT NULL DEFAULT 0,
  retain_ms INTEGER NOT NULL DEFAULT 86400000,
  destroy_delay_ms INTEGER NOT NULL DEFAULT 604800000,
  policy_explicit INTEGER NOT NULL DEFAULT 0,
  require_certificate INTEGER NOT NULL DEFAULT 0,
  tag TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE TABLE IF NOT EXISTS versions (
  ring TEXT NOT NULL REFERENCES rings(name),
  version INTEGER NOT NULL,
  object_id TEXT NOT NULL UNIQUE,
  object_label TEXT NOT NULL,
  kid TEXT NOT NULL,
  public_jwk TEXT NOT NULL,
  state TEXT NOT NULL,
  create_time INTEGER NOT NULL,
  activate_time INTEGER NOT NULL,
  publish_time INTEGER NOT NULL DEFAULT 0,
  retire_time INTEGER NOT NULL DEFAULT 0,
  destroy_after INTEGER NOT NULL DEFAULT 0,
  destroy_time INTEGER NOT NULL DEFAULT 0,
  previous_state TEXT NOT NULL DEFAULT 'CREATING',
  compromised INTEGER NOT NULL DEFAULT 0,
  certificate_chain TEXT NOT NULL DEFAULT '',
  tag TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (ring, version)
) STRICT;
CREATE TABLE IF NOT EXISTS audit_anchors (
  chain TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  hash TEXT NOT NULL,
  file TEXT NOT NULL,
  time_ms INTEGER NOT NULL
) STRICT;
)sql";

constexpr const char* kRingColumns =
    "name,purpose,alg,rsa_bits,allow_non_fapi,create_time,curve,zip_max_bytes,prepublish_ms,"
    "rotation_period_ms,retain_ms,destroy_delay_ms,policy_explicit,require_certificate,tag";
constexpr const char* kVersionColumns =
    "ring,version,object_id,object_label,kid,public_jwk,state,create_time,activate_time,"
    "publish_time,retire_time,destroy_after,destroy_time,previous_state,compromised,"
    "certificate_chain,tag";

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

// Runs the statement to completion; SQLITE_CONSTRAINT is reported as ALREADY_EXISTS.
absl::Status StepDone(sqlite3* db, sqlite3_stmt* s, absl::string_view what) {
  int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE) return absl::OkStatus();
  if ((rc & 0xff) == SQLITE_CONSTRAINT) {
    return absl::AlreadyExistsError(absl::StrCat("metadata store: ", what, ": already exists"));
  }
  return SqliteError(db, what);
}

// Binds the ring's columns from index 1 in kRingColumns order.
void BindRing(sqlite3_stmt* s, const RingRecord& r) {
  BindText(s, 1, r.name);
  BindText(s, 2, std::string(PurposeName(r.purpose)));
  BindText(s, 3, r.alg);
  sqlite3_bind_int(s, 4, r.rsa_bits);
  sqlite3_bind_int(s, 5, r.allow_non_fapi ? 1 : 0);
  sqlite3_bind_int64(s, 6, r.create_time);
  BindText(s, 7, r.curve);
  sqlite3_bind_int64(s, 8, r.zip_max_bytes);
  sqlite3_bind_int64(s, 9, r.policy.prepublish_ms);
  sqlite3_bind_int64(s, 10, r.policy.rotation_period_ms);
  sqlite3_bind_int64(s, 11, r.policy.retain_ms);
  sqlite3_bind_int64(s, 12, r.policy.destroy_delay_ms);
  sqlite3_bind_int(s, 13, r.policy_explicit ? 1 : 0);
  sqlite3_bind_int(s, 14, r.require_certificate ? 1 : 0);
}

// Binds the version's columns from index 1 in kVersionColumns order.
void BindVersion(sqlite3_stmt* s, const VersionRecord& v) {
  BindText(s, 1, v.ring);
  sqlite3_bind_int64(s, 2, v.version);
  BindText(s, 3, v.object_id);
  BindText(s, 4, v.object_label);
  BindText(s, 5, v.kid);
  BindText(s, 6, v.public_jwk);
  BindText(s, 7, std::string(VersionStateName(v.state)));
  sqlite3_bind_int64(s, 8, v.create_time);
  sqlite3_bind_int64(s, 9, v.activate_time);
  sqlite3_bind_int64(s, 10, v.publish_time);
  sqlite3_bind_int64(s, 11, v.retire_time);
  sqlite3_bind_int64(s, 12, v.destroy_after);
  sqlite3_bind_int64(s, 13, v.destroy_time);
  BindText(s, 14, std::string(VersionStateName(v.previous_state)));
  sqlite3_bind_int(s, 15, v.compromised ? 1 : 0);
  BindText(s, 16, v.certificate_chain);
}

// Columns added after the first schema: databases made before them get them here (ALTER TABLE
// ADD COLUMN with the default; CREATE TABLE IF NOT EXISTS leaves an existing table as it was).
constexpr struct {
  const char* table;
  const char* column;
  const char* definition;
} kAddedColumns[] = {
    {"rings", "require_certificate", "INTEGER NOT NULL DEFAULT 0"},
    {"versions", "certificate_chain", "TEXT NOT NULL DEFAULT ''"},
    // Record tags (rotation/record_tag.h); rows from before them are adopted once by custodyd.
    {"rings", "tag", "TEXT NOT NULL DEFAULT ''"},
    {"versions", "tag", "TEXT NOT NULL DEFAULT ''"},
};

}  // namespace

absl::StatusOr<std::unique_ptr<MetadataStore>> MetadataStore::Open(const std::string& path,
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
  for (const char* pragma : {"PRAGMA journal_mode=WAL;", "PRAGMA synchronous=FULL;",
                             "PRAGMA foreign_keys=ON;", kSchema}) {
    if (absl::Status s = Exec(pragma); !s.ok()) return s;
  }
  for (const auto& added : kAddedColumns) {
    auto info = Prepare(db_, absl::StrCat("SELECT 1 FROM pragma_table_info('", added.table,
                                          "') WHERE name='", added.column, "'"));
    if (!info.ok()) return info.status();
    if (sqlite3_step(info->get()) == SQLITE_ROW) continue;
    const std::string alter = absl::StrCat("ALTER TABLE ", added.table, " ADD COLUMN ",
                                           added.column, " ", added.definition, ";");
    if (absl::Status s = Exec(alter.c_str()); !s.ok()) return s;
  }
  return absl::OkStatus();
}

SqliteMetadataStore::~SqliteMetadataStore() {
  absl::MutexLock lock(&mu_);
  sqlite3_close(db_);
}

absl::Status SqliteMetadataStore::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return SqliteError(db_, msg);
  }
  return absl::OkStatus();
}

absl::Status SqliteMetadataStore::Apply(const Mutation& m, const MutationTags& tags) {
  size_t ir = 0, ur = 0, iv = 0, uv = 0;
  for (const RingRecord& r : m.insert_rings) {
    auto stmt = Prepare(db_, absl::StrCat("INSERT INTO rings(", kRingColumns,
                                          ") VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"));
    if (!stmt.ok()) return stmt.status();
    BindRing(stmt->get(), r);
    BindText(stmt->get(), 15, tags.insert_rings[ir++]);
    if (absl::Status s = StepDone(db_, stmt->get(), "insert ring"); !s.ok()) {
      return absl::IsAlreadyExists(s)
                 ? absl::AlreadyExistsError(absl::StrCat("ring '", r.name, "' already exists"))
                 : s;
    }
  }
  for (const RingRecord& r : m.update_rings) {
    auto stmt = Prepare(db_,
                        "UPDATE rings SET prepublish_ms=?, rotation_period_ms=?, retain_ms=?, "
                        "destroy_delay_ms=?, policy_explicit=?, tag=? WHERE name=?");
    if (!stmt.ok()) return stmt.status();
    sqlite3_stmt* s = stmt->get();
    sqlite3_bind_int64(s, 1, r.policy.prepublish_ms);
    sqlite3_bind_int64(s, 2, r.policy.rotation_period_ms);
    sqlite3_bind_int64(s, 3, r.policy.retain_ms);
    sqlite3_bind_int64(s, 4, r.policy.destroy_delay_ms);
    sqlite3_bind_int(s, 5, r.policy_explicit ? 1 : 0);
    BindText(s, 6, tags.update_rings[ur++]);
    BindText(s, 7, r.name);
    if (absl::Status st = StepDone(db_, s, "update ring"); !st.ok()) return st;
    if (sqlite3_changes(db_) != 1) {
      return absl::NotFoundError(absl::StrCat("ring '", r.name, "' not found"));
    }
  }
  for (const VersionRecord& v : m.insert_versions) {
    auto stmt = Prepare(db_, absl::StrCat("INSERT INTO versions(", kVersionColumns,
                                          ") VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"));
    if (!stmt.ok()) return stmt.status();
    BindVersion(stmt->get(), v);
    BindText(stmt->get(), 17, tags.insert_versions[iv++]);
    absl::Status s = StepDone(db_, stmt->get(), "insert version");
    if (absl::IsAlreadyExists(s)) {
      // The REFERENCES constraint fails the same way as a duplicate; tell them apart.
      auto ring = Prepare(db_, "SELECT 1 FROM rings WHERE name=?");
      if (!ring.ok()) return ring.status();
      BindText(ring->get(), 1, v.ring);
      if (sqlite3_step(ring->get()) != SQLITE_ROW) {
        return absl::NotFoundError(absl::StrCat("ring '", v.ring, "' not found"));
      }
    }
    if (!s.ok()) return s;
  }
  for (const VersionRecord& v : m.update_versions) {
    // Numbered parameters in kVersionColumns order, so BindVersion serves INSERT and UPDATE;
    // ring, version (the key), object_id and create_time (fixed at creation) are not set.
    auto stmt = Prepare(db_,
                        "UPDATE versions SET object_label=?4, kid=?5, public_jwk=?6, state=?7, "
                        "activate_time=?9, publish_time=?10, retire_time=?11, destroy_after=?12, "
                        "destroy_time=?13, previous_state=?14, compromised=?15, "
                        "certificate_chain=?16, tag=?17 "
                        "WHERE ring=?1 AND version=?2");
    if (!stmt.ok()) return stmt.status();
    sqlite3_stmt* s = stmt->get();
    BindVersion(s, v);
    BindText(s, 17, tags.update_versions[uv++]);
    if (absl::Status st = StepDone(db_, s, "update version"); !st.ok()) return st;
    if (sqlite3_changes(db_) != 1) {
      return absl::NotFoundError(
          absl::StrCat("metadata store: version ", v.version, " of '", v.ring, "' not found"));
    }
  }
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
  auto tags = TagMutation(tagger_, mutation);
  if (!tags.ok()) return tags.status();
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  absl::Status s = Apply(mutation, *tags);
  if (s.ok()) s = Exec("COMMIT;");
  if (!s.ok()) Exec("ROLLBACK;").IgnoreError();
  return s;
}

absl::Status MetadataStore::InsertRingWithVersion(const RingRecord& ring,
                                                  const VersionRecord& version) {
  Mutation m;
  m.insert_rings.push_back(ring);
  m.insert_versions.push_back(version);
  return Commit(m);
}

absl::Status MetadataStore::InsertVersion(const VersionRecord& version) {
  Mutation m;
  m.insert_versions.push_back(version);
  return Commit(m);
}

absl::Status MetadataStore::UpdateVersion(const VersionRecord& version) {
  Mutation m;
  m.update_versions.push_back(version);
  return Commit(m);
}

absl::Status MetadataStore::DeleteVersion(const std::string& ring, uint32_t version) {
  Mutation m;
  m.delete_versions.emplace_back(ring, version);
  return Commit(m);
}

absl::StatusOr<std::vector<RingRecord>> SqliteMetadataStore::LoadRings() {
  std::vector<RingRecord> rings;
  std::vector<std::string> tags;
  {
    absl::MutexLock lock(&mu_);
    auto stmt = Prepare(db_, absl::StrCat("SELECT ", kRingColumns, " FROM rings ORDER BY name"));
    if (!stmt.ok()) return stmt.status();
    int rc;
    while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW) {
      sqlite3_stmt* s = stmt->get();
      RingRecord r;
      r.name = ColumnText(s, 0);
      auto purpose = ParsePurpose(ColumnText(s, 1));
      if (!purpose.ok()) return purpose.status();
      r.purpose = *purpose;
      r.alg = ColumnText(s, 2);
      r.rsa_bits = sqlite3_column_int(s, 3);
      r.allow_non_fapi = sqlite3_column_int(s, 4) != 0;
      r.create_time = sqlite3_column_int64(s, 5);
      r.curve = ColumnText(s, 6);
      r.zip_max_bytes = sqlite3_column_int64(s, 7);
      r.policy.prepublish_ms = sqlite3_column_int64(s, 8);
      r.policy.rotation_period_ms = sqlite3_column_int64(s, 9);
      r.policy.retain_ms = sqlite3_column_int64(s, 10);
      r.policy.destroy_delay_ms = sqlite3_column_int64(s, 11);
      r.policy_explicit = sqlite3_column_int(s, 12) != 0;
      r.require_certificate = sqlite3_column_int(s, 13) != 0;
      tags.push_back(ColumnText(s, 14));
      rings.push_back(std::move(r));
    }
    if (rc != SQLITE_DONE) return SqliteError(db_, "load rings");
  }
  if (absl::Status s = CheckTags(tagger_, rings, tags); !s.ok()) return s;
  return rings;
}

absl::StatusOr<std::vector<VersionRecord>> SqliteMetadataStore::LoadVersions() {
  std::vector<VersionRecord> versions;
  std::vector<std::string> tags;
  {
    absl::MutexLock lock(&mu_);
    auto stmt = Prepare(
        db_, absl::StrCat("SELECT ", kVersionColumns, " FROM versions ORDER BY ring,version"));
    if (!stmt.ok()) return stmt.status();
    int rc;
    while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW) {
      sqlite3_stmt* s = stmt->get();
      VersionRecord v;
      v.ring = ColumnText(s, 0);
      v.version = static_cast<uint32_t>(sqlite3_column_int64(s, 1));
      v.object_id = ColumnText(s, 2);
      v.object_label = ColumnText(s, 3);
      v.kid = ColumnText(s, 4);
      v.public_jwk = ColumnText(s, 5);
      auto state = ParseVersionState(ColumnText(s, 6));
      if (!state.ok()) return state.status();
      v.state = *state;
      v.create_time = sqlite3_column_int64(s, 7);
      v.activate_time = sqlite3_column_int64(s, 8);
      v.publish_time = sqlite3_column_int64(s, 9);
      v.retire_time = sqlite3_column_int64(s, 10);
      v.destroy_after = sqlite3_column_int64(s, 11);
      v.destroy_time = sqlite3_column_int64(s, 12);
      auto previous = ParseVersionState(ColumnText(s, 13));
      if (!previous.ok()) return previous.status();
      v.previous_state = *previous;
      v.compromised = sqlite3_column_int(s, 14) != 0;
      v.certificate_chain = ColumnText(s, 15);
      tags.push_back(ColumnText(s, 16));
      versions.push_back(std::move(v));
    }
    if (rc != SQLITE_DONE) return SqliteError(db_, "load versions");
  }
  if (absl::Status s = CheckTags(tagger_, versions, tags); !s.ok()) return s;
  return versions;
}

namespace {

absl::StatusOr<MetadataStore::AuditAnchor> SelectAuditAnchor(sqlite3* db,
                                                             const std::string& chain) {
  auto stmt = Prepare(db, "SELECT seq, hash, file, time_ms FROM audit_anchors WHERE chain = ?");
  if (!stmt.ok()) return stmt.status();
  BindText(stmt->get(), 1, chain);
  int rc = sqlite3_step(stmt->get());
  if (rc == SQLITE_DONE) {
    return absl::NotFoundError(absl::StrCat("no audit anchor for chain '", chain, "'"));
  }
  if (rc != SQLITE_ROW) return SqliteError(db, "load audit anchor");
  MetadataStore::AuditAnchor a;
  a.chain = chain;
  a.seq = static_cast<uint64_t>(sqlite3_column_int64(stmt->get(), 0));
  a.hash = ColumnText(stmt->get(), 1);
  a.file = ColumnText(stmt->get(), 2);
  a.time_ms = sqlite3_column_int64(stmt->get(), 3);
  return a;
}

}  // namespace

absl::Status SqliteMetadataStore::SaveAuditAnchor(const AuditAnchor& a) {
  absl::MutexLock lock(&mu_);
  auto stmt = Prepare(db_,
                      "INSERT INTO audit_anchors (chain, seq, hash, file, time_ms) VALUES "
                      "(?, ?, ?, ?, ?) ON CONFLICT(chain) DO UPDATE SET seq = excluded.seq, "
                      "hash = excluded.hash, file = excluded.file, time_ms = excluded.time_ms");
  if (!stmt.ok()) return stmt.status();
  BindText(stmt->get(), 1, a.chain);
  sqlite3_bind_int64(stmt->get(), 2, static_cast<int64_t>(a.seq));
  BindText(stmt->get(), 3, a.hash);
  BindText(stmt->get(), 4, a.file);
  sqlite3_bind_int64(stmt->get(), 5, a.time_ms);
  return StepDone(db_, stmt->get(), "save audit anchor");
}

absl::StatusOr<MetadataStore::AuditAnchor> SqliteMetadataStore::LoadAuditAnchor(
    const std::string& chain) {
  absl::MutexLock lock(&mu_);
  return SelectAuditAnchor(db_, chain);
}

absl::StatusOr<MetadataStore::AuditAnchor> MetadataStore::ReadAuditAnchor(
    const std::string& path, const std::string& chain) {
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
