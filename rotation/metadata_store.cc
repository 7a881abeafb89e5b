#include "rotation/metadata_store.h"

#include <sqlite3.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace custody::rotation {
namespace {

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS rings (
  name TEXT PRIMARY KEY,
  purpose TEXT NOT NULL,
  alg TEXT NOT NULL,
  rsa_bits INTEGER NOT NULL,
  allow_non_fapi INTEGER NOT NULL,
  create_time INTEGER NOT NULL,
  curve TEXT NOT NULL DEFAULT '',
  zip_max_bytes INTEGER NOT NULL DEFAULT 0
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
  PRIMARY KEY (ring, version)
) STRICT;
)sql";

struct StmtDeleter {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtDeleter>;

absl::Status SqliteError(sqlite3* db, absl::string_view what) {
  return absl::InternalError(absl::StrCat("metadata store: ", what, ": ", sqlite3_errmsg(db)));
}

absl::StatusOr<Stmt> Prepare(sqlite3* db, const char* sql) {
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr) != SQLITE_OK) {
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

}  // namespace

absl::StatusOr<std::unique_ptr<MetadataStore>> MetadataStore::Open(const std::string& path) {
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
  auto store = std::unique_ptr<MetadataStore>(new MetadataStore(db));
  absl::MutexLock lock(&store->mu_);
  // WAL + synchronous=FULL: every commit is fsynced before it returns.
  for (const char* pragma : {"PRAGMA journal_mode=WAL;", "PRAGMA synchronous=FULL;",
                             "PRAGMA foreign_keys=ON;", kSchema}) {
    if (absl::Status s = store->Exec(pragma); !s.ok()) return s;
  }
  // Databases created before decryption rings lack these columns; adding them is idempotent
  // (a "duplicate column" error means the column is there).
  for (const char* column : {"ALTER TABLE rings ADD COLUMN curve TEXT NOT NULL DEFAULT '';",
                             "ALTER TABLE rings ADD COLUMN zip_max_bytes INTEGER NOT NULL "
                             "DEFAULT 0;"}) {
    absl::Status s = store->Exec(column);
    if (!s.ok() && s.message().find("duplicate column") == absl::string_view::npos) return s;
  }
  return store;
}

MetadataStore::~MetadataStore() {
  absl::MutexLock lock(&mu_);
  sqlite3_close(db_);
}

absl::Status MetadataStore::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("metadata store: ", msg));
  }
  return absl::OkStatus();
}

absl::Status MetadataStore::InsertRingWithVersion(const RingRecord& ring,
                                                  const VersionRecord& version) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  auto fail = [this](absl::Status s) {
    Exec("ROLLBACK;").IgnoreError();
    return s;
  };
  {
    auto stmt = Prepare(db_,
                        "INSERT INTO rings(name,purpose,alg,rsa_bits,allow_non_fapi,create_time,"
                        "curve,zip_max_bytes) VALUES(?,?,?,?,?,?,?,?)");
    if (!stmt.ok()) return fail(stmt.status());
    sqlite3_stmt* s = stmt->get();
    BindText(s, 1, ring.name);
    BindText(s, 2, std::string(PurposeName(ring.purpose)));
    BindText(s, 3, ring.alg);
    sqlite3_bind_int(s, 4, ring.rsa_bits);
    sqlite3_bind_int(s, 5, ring.allow_non_fapi ? 1 : 0);
    sqlite3_bind_int64(s, 6, ring.create_time);
    BindText(s, 7, ring.curve);
    sqlite3_bind_int64(s, 8, ring.zip_max_bytes);
    if (absl::Status st = StepDone(db_, s, "insert ring"); !st.ok()) {
      if (absl::IsAlreadyExists(st)) {
        return fail(
            absl::AlreadyExistsError(absl::StrCat("ring '", ring.name, "' already exists")));
      }
      return fail(st);
    }
  }
  if (absl::Status st = InsertVersionLocked(version); !st.ok()) return fail(st);
  if (absl::Status s = Exec("COMMIT;"); !s.ok()) return fail(s);
  return absl::OkStatus();
}

absl::Status MetadataStore::InsertVersionLocked(const VersionRecord& version) {
  auto stmt = Prepare(db_,
                      "INSERT INTO versions(ring,version,object_id,object_label,kid,public_jwk,"
                      "state,create_time,activate_time) VALUES(?,?,?,?,?,?,?,?,?)");
  if (!stmt.ok()) return stmt.status();
  sqlite3_stmt* s = stmt->get();
  BindText(s, 1, version.ring);
  sqlite3_bind_int64(s, 2, version.version);
  BindText(s, 3, version.object_id);
  BindText(s, 4, version.object_label);
  BindText(s, 5, version.kid);
  BindText(s, 6, version.public_jwk);
  BindText(s, 7, std::string(VersionStateName(version.state)));
  sqlite3_bind_int64(s, 8, version.create_time);
  sqlite3_bind_int64(s, 9, version.activate_time);
  return StepDone(db_, s, "insert version");
}

absl::Status MetadataStore::InsertVersion(const VersionRecord& version) {
  absl::MutexLock lock(&mu_);
  absl::Status s = InsertVersionLocked(version);
  // The REFERENCES constraint fails the same way as a duplicate; tell them apart.
  if (absl::IsAlreadyExists(s)) {
    auto ring = Prepare(db_, "SELECT 1 FROM rings WHERE name=?");
    if (!ring.ok()) return ring.status();
    BindText(ring->get(), 1, version.ring);
    if (sqlite3_step(ring->get()) != SQLITE_ROW) {
      return absl::NotFoundError(absl::StrCat("ring '", version.ring, "' not found"));
    }
  }
  return s;
}

absl::Status MetadataStore::UpdateVersion(const VersionRecord& version) {
  absl::MutexLock lock(&mu_);
  auto stmt = Prepare(db_,
                      "UPDATE versions SET object_label=?, kid=?, public_jwk=?, state=?, "
                      "activate_time=? WHERE ring=? AND version=?");
  if (!stmt.ok()) return stmt.status();
  sqlite3_stmt* s = stmt->get();
  BindText(s, 1, version.object_label);
  BindText(s, 2, version.kid);
  BindText(s, 3, version.public_jwk);
  BindText(s, 4, std::string(VersionStateName(version.state)));
  sqlite3_bind_int64(s, 5, version.activate_time);
  BindText(s, 6, version.ring);
  sqlite3_bind_int64(s, 7, version.version);
  if (absl::Status st = StepDone(db_, s, "update version"); !st.ok()) return st;
  if (sqlite3_changes(db_) != 1) {
    return absl::NotFoundError(absl::StrCat("metadata store: version ", version.version, " of '",
                                            version.ring, "' not found"));
  }
  return absl::OkStatus();
}

absl::Status MetadataStore::DeleteVersion(const std::string& ring, uint32_t version) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  auto fail = [this](absl::Status s) {
    Exec("ROLLBACK;").IgnoreError();
    return s;
  };
  auto del = Prepare(db_, "DELETE FROM versions WHERE ring=? AND version=?");
  if (!del.ok()) return fail(del.status());
  BindText(del->get(), 1, ring);
  sqlite3_bind_int64(del->get(), 2, version);
  if (absl::Status st = StepDone(db_, del->get(), "delete version"); !st.ok()) return fail(st);
  auto del_ring = Prepare(
      db_, "DELETE FROM rings WHERE name=? AND NOT EXISTS (SELECT 1 FROM versions WHERE ring=?)");
  if (!del_ring.ok()) return fail(del_ring.status());
  BindText(del_ring->get(), 1, ring);
  BindText(del_ring->get(), 2, ring);
  if (absl::Status st = StepDone(db_, del_ring->get(), "delete ring"); !st.ok()) return fail(st);
  if (absl::Status s = Exec("COMMIT;"); !s.ok()) return fail(s);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RingRecord>> MetadataStore::LoadRings() {
  absl::MutexLock lock(&mu_);
  auto stmt = Prepare(
      db_,
      "SELECT name,purpose,alg,rsa_bits,allow_non_fapi,create_time,curve,zip_max_bytes FROM "
      "rings ORDER BY name");
  if (!stmt.ok()) return stmt.status();
  std::vector<RingRecord> rings;
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
    rings.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "load rings");
  return rings;
}

absl::StatusOr<std::vector<VersionRecord>> MetadataStore::LoadVersions() {
  absl::MutexLock lock(&mu_);
  auto stmt = Prepare(db_,
                      "SELECT ring,version,object_id,object_label,kid,public_jwk,state,"
                      "create_time,activate_time FROM versions ORDER BY ring,version");
  if (!stmt.ok()) return stmt.status();
  std::vector<VersionRecord> versions;
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
    versions.push_back(std::move(v));
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "load versions");
  return versions;
}

}  // namespace custody::rotation
