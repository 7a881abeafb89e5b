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
#include "rotation/record_tag.h"

namespace custody::rotation {
namespace {

// Advisory-lock key of schema migrations ("custody" in ASCII).
constexpr int64_t kMigrationLockKey = 0x637573746f6479;
// Advisory-lock key held by the scheduler's leader ("custodyL").
constexpr int64_t kLeaderLockKey = 0x637573746f64794c;

// Schema migrations, applied in order; never edit one that has shipped, append a new one.
constexpr const char* kMigrations[] = {
    // 1: rings and versions, as in the SQLite store, plus the per-ring generation counter and
    // the one-ACTIVE-per-ring index.
    R"sql(
CREATE TABLE rings (
  name text PRIMARY KEY,
  purpose text NOT NULL,
  alg text NOT NULL,
  rsa_bits integer NOT NULL,
  allow_non_fapi boolean NOT NULL,
  create_time bigint NOT NULL,
  curve text NOT NULL DEFAULT '',
  zip_max_bytes bigint NOT NULL DEFAULT 0,
  prepublish_ms bigint NOT NULL DEFAULT 3600000,
  rotation_period_ms bigint NOT NULL DEFAULT 0,
  retain_ms bigint NOT NULL DEFAULT 86400000,
  destroy_delay_ms bigint NOT NULL DEFAULT 604800000,
  policy_explicit boolean NOT NULL DEFAULT false,
  generation bigint NOT NULL DEFAULT 0
);
CREATE TABLE versions (
  ring text NOT NULL REFERENCES rings(name),
  version bigint NOT NULL,
  object_id text NOT NULL UNIQUE,
  object_label text NOT NULL,
  kid text NOT NULL,
  public_jwk text NOT NULL,
  state text NOT NULL,
  create_time bigint NOT NULL,
  activate_time bigint NOT NULL,
  publish_time bigint NOT NULL DEFAULT 0,
  retire_time bigint NOT NULL DEFAULT 0,
  destroy_after bigint NOT NULL DEFAULT 0,
  destroy_time bigint NOT NULL DEFAULT 0,
  previous_state text NOT NULL DEFAULT 'CREATING',
  compromised boolean NOT NULL DEFAULT false,
  PRIMARY KEY (ring, version)
);
CREATE UNIQUE INDEX versions_one_active ON versions (ring) WHERE state = 'ACTIVE';
)sql",
    // 2: certificates (a ring that requires one before a manual rotation; a version's chain).
    R"sql(
ALTER TABLE rings ADD COLUMN require_certificate boolean NOT NULL DEFAULT false;
ALTER TABLE versions ADD COLUMN certificate_chain text NOT NULL DEFAULT '';
)sql",
    // 3: the audit chains' anchored heads, one row per replica (server/audit_anchor.h).
    R"sql(
CREATE TABLE audit_anchors (
  chain text PRIMARY KEY,
  seq bigint NOT NULL,
  hash text NOT NULL,
  file text NOT NULL,
  time_ms bigint NOT NULL
);
)sql",
    // 4: record tags (rotation/record_tag.h); rows from before them are adopted once by custodyd.
    R"sql(
ALTER TABLE rings ADD COLUMN tag text NOT NULL DEFAULT '';
ALTER TABLE versions ADD COLUMN tag text NOT NULL DEFAULT '';
)sql",
};

constexpr const char* kRingColumns =
    "name,purpose,alg,rsa_bits,allow_non_fapi,create_time,curve,zip_max_bytes,prepublish_ms,"
    "rotation_period_ms,retain_ms,destroy_delay_ms,policy_explicit,generation,require_certificate,"
    "tag";
constexpr const char* kVersionColumns =
    "ring,version,object_id,object_label,kid,public_jwk,state,create_time,activate_time,"
    "publish_time,retire_time,destroy_after,destroy_time,previous_state,compromised,"
    "certificate_chain,tag";

// A status that Commit retries in a fresh transaction (deadlock, serialization failure, a
// connection lost before COMMIT was sent).
constexpr absl::string_view kRetryPayload = "custody.dev/pg-retry";
// What a gRPC caller is told when PostgreSQL cannot be reached (the details go to the log).
constexpr absl::string_view kUnreachableForCallers = "metadata store unreachable";

struct ResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

std::string Bool(bool b) { return b ? "true" : "false"; }

std::string Trim(const char* message) {
  std::string s = message == nullptr ? "" : message;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
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

struct PostgresMetadataStore::Connection {
  absl::Mutex mu;
  PGconn* conn ABSL_GUARDED_BY(mu) = nullptr;

  ~Connection() {
    absl::MutexLock lock(&mu);
    if (conn != nullptr) PQfinish(conn);
  }

  static absl::Status Unreachable(absl::string_view message) {
    // libpq's text (it may name the server's socket path or host) is for the log only.
    absl::Status s = WithCallerMessage(
        absl::UnavailableError(absl::StrCat("metadata store unreachable: ", message)),
        kUnreachableForCallers);
    s.SetPayload(kRetryPayload, absl::Cord("1"));
    return s;
  }

  absl::Status Connect(const Options& options) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (conn != nullptr && PQstatus(conn) == CONNECTION_OK) return absl::OkStatus();
    if (conn != nullptr) PQfinish(conn);
    const std::string timeout =
        absl::StrCat(std::max<int64_t>(2, absl::ToInt64Seconds(options.connect_timeout)));
    std::vector<const char*> keys = {"dbname", "application_name", "connect_timeout"};
    std::vector<const char*> values = {options.conninfo.c_str(), options.application_name.c_str(),
                                       timeout.c_str()};
    std::string password(options.password.view());
    if (!password.empty()) {
      keys.push_back("password");
      values.push_back(password.c_str());
    }
    keys.push_back(nullptr);
    values.push_back(nullptr);
    conn = PQconnectdbParams(keys.data(), values.data(), /*expand_dbname=*/1);
    std::fill(password.begin(), password.end(), '\0');
    if (conn == nullptr) return Unreachable("out of memory");
    if (PQstatus(conn) != CONNECTION_OK) {
      absl::Status s = Unreachable(Trim(PQerrorMessage(conn)));
      PQfinish(conn);
      conn = nullptr;
      return s;
    }
    // Server notices (NOTICE, WARNING) would go to stderr: the statuses say what matters.
    PQsetNoticeProcessor(
        conn, [](void*, const char*) {}, nullptr);
    const std::string ms = absl::StrCat(absl::ToInt64Milliseconds(options.statement_timeout));
    // Timeouts bound every statement and lock wait; UTC and "C" collation keep results the same
    // on every server configuration.
    return Exec(absl::StrCat("SET statement_timeout = ", ms, "; SET lock_timeout = ", ms,
                             "; SET idle_in_transaction_session_timeout = ", ms, "; "),
                {})
        .status();
  }

  // A read-only query, on a fresh connection when needed. A connection that died since its last
  // use (a server restart) is only found out by using it; a read is idempotent, so it runs once
  // more on a new connection instead of failing the caller's refresh and waiting for the next.
  absl::StatusOr<Result> Read(const Options& options, const std::string& sql)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    absl::StatusOr<Result> res = absl::UnavailableError("not run");
    for (int tries = 0; tries < 2; ++tries) {
      if (absl::Status s = Connect(options); !s.ok()) {
        s.ErasePayload(kRetryPayload);
        return s;
      }
      res = Exec(sql, {});
      if (res.ok() || !res.status().GetPayload(kRetryPayload).has_value()) break;
    }
    if (!res.ok()) {
      absl::Status s = res.status();
      s.ErasePayload(kRetryPayload);
      return s;
    }
    return res;
  }

  // Runs one statement (several when `params` is empty) and maps its errors.
  absl::StatusOr<Result> Exec(const std::string& sql, const std::vector<std::string>& params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (conn == nullptr) return Unreachable("not connected");
    std::vector<const char*> values;
    values.reserve(params.size());
    for (const std::string& p : params) values.push_back(p.c_str());
    Result r(params.empty() ? PQexec(conn, sql.c_str())
                            : PQexecParams(conn, sql.c_str(), static_cast<int>(params.size()),
                                           nullptr, values.data(), nullptr, nullptr, 0));
    ExecStatusType status = r == nullptr ? PGRES_FATAL_ERROR : PQresultStatus(r.get());
    if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) return r;
    if (PQstatus(conn) != CONNECTION_OK) return Unreachable(Trim(PQerrorMessage(conn)));
    const char* state = r ? PQresultErrorField(r.get(), PG_DIAG_SQLSTATE) : nullptr;
    const char* constraint = r ? PQresultErrorField(r.get(), PG_DIAG_CONSTRAINT_NAME) : nullptr;
    std::string code = state == nullptr ? "" : state;
    std::string message = Trim(r ? PQresultErrorMessage(r.get()) : PQerrorMessage(conn));
    if (code == "23505") {
      if (constraint != nullptr && absl::string_view(constraint) == "versions_one_active") {
        return absl::AbortedError(
            "a second ACTIVE version: another replica changed the ring; retry");
      }
      return absl::AlreadyExistsError(
          absl::StrCat("metadata store: already exists (", constraint ? constraint : "", ")"));
    }
    if (code == "23503") return absl::NotFoundError("metadata store: ring not found");
    if (code == "40001" || code == "40P01") {
      absl::Status s =
          WithCallerMessage(absl::AbortedError(absl::StrCat("metadata store: ", message)),
                            "metadata store: a concurrent change; retry");
      s.SetPayload(kRetryPayload, absl::Cord("1"));
      return s;
    }
    if (code == "55P03") {
      return absl::AbortedError("metadata store: the ring is locked by another writer; retry");
    }
    // No SQLSTATE: libpq's own error (the server closed the connection, ...).
    if (code.empty() || absl::StartsWith(code, "08") || absl::StartsWith(code, "57")) {
      if (code.empty() || absl::StartsWith(code, "08")) {
        // The connection is gone, though libpq may still call it CONNECTION_OK (a server
        // restarted since its last use): drop it, so that the next Connect makes a new one
        // instead of failing the same way again.
        PQfinish(conn);
        conn = nullptr;
      }
      return Unreachable(message);
    }
    return WithCallerMessage(absl::InternalError(absl::StrCat("metadata store: ", message)),
                             "metadata store error (the details are in custodyd's log)");
  }
};

namespace {

absl::StatusOr<int64_t> Int(const PGresult* r, int row, int col) {
  int64_t v = 0;
  if (PQgetisnull(r, row, col) || !absl::SimpleAtoi(PQgetvalue(r, row, col), &v)) {
    return absl::InternalError(
        absl::StrCat("metadata store: column ", PQfname(r, col), " is not an integer"));
  }
  return v;
}

std::string Text(const PGresult* r, int row, int col) {
  return std::string(PQgetvalue(r, row, col), static_cast<size_t>(PQgetlength(r, row, col)));
}

bool Boolean(const PGresult* r, int row, int col) { return PQgetvalue(r, row, col)[0] == 't'; }

std::vector<std::string> RingParams(const RingRecord& r) {
  return {r.name,
          std::string(PurposeName(r.purpose)),
          r.alg,
          absl::StrCat(r.rsa_bits),
          Bool(r.allow_non_fapi),
          absl::StrCat(r.create_time),
          r.curve,
          absl::StrCat(r.zip_max_bytes),
          absl::StrCat(r.policy.prepublish_ms),
          absl::StrCat(r.policy.rotation_period_ms),
          absl::StrCat(r.policy.retain_ms),
          absl::StrCat(r.policy.destroy_delay_ms),
          Bool(r.policy_explicit),
          Bool(r.require_certificate)};
}

std::vector<std::string> VersionParams(const VersionRecord& v) {
  return {v.ring,
          absl::StrCat(v.version),
          v.object_id,
          v.object_label,
          v.kid,
          v.public_jwk,
          std::string(VersionStateName(v.state)),
          absl::StrCat(v.create_time),
          absl::StrCat(v.activate_time),
          absl::StrCat(v.publish_time),
          absl::StrCat(v.retire_time),
          absl::StrCat(v.destroy_after),
          absl::StrCat(v.destroy_time),
          std::string(VersionStateName(v.previous_state)),
          Bool(v.compromised),
          v.certificate_chain};
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
    : options_(std::move(options)),
      conn_(std::make_unique<Connection>()),
      listen_conn_(std::make_unique<Connection>()),
      leader_conn_(std::make_unique<Connection>()) {}

PostgresMetadataStore::~PostgresMetadataStore() = default;

int PostgresMetadataStore::LatestSchemaVersion() {
  return static_cast<int>(std::size(kMigrations));
}

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
      if (s.ok()) s = c.Exec(kMigrations[v - 1], {}).status();
      if (s.ok()) {
        s = c.Exec("INSERT INTO custody_schema_migrations(version) VALUES ($1::integer)",
                   {absl::StrCat(v)})
                .status();
      }
      if (s.ok()) s = c.Exec("COMMIT", {}).status();
      if (!s.ok()) {
        c.Exec("ROLLBACK", {}).IgnoreError();
        return absl::Status(s.code(),
                            absl::StrCat("schema migration ", v, " failed: ", s.message()));
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
      std::vector<std::string> params = RingParams(r);
      params.push_back(tags->insert_rings[i]);
      auto res =
          c.Exec(absl::StrCat("INSERT INTO rings(", kRingColumns,
                              ") VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,0,$14,$15)"),
                 params);
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
    for (size_t i = 0; i < m.update_rings.size(); ++i) {
      const RingRecord& r = m.update_rings[i];
      auto res = c.Exec(
          "UPDATE rings SET prepublish_ms=$1, rotation_period_ms=$2, retain_ms=$3, "
          "destroy_delay_ms=$4, policy_explicit=$5, tag=$7 WHERE name=$6",
          {absl::StrCat(r.policy.prepublish_ms), absl::StrCat(r.policy.rotation_period_ms),
           absl::StrCat(r.policy.retain_ms), absl::StrCat(r.policy.destroy_delay_ms),
           Bool(r.policy_explicit), r.name, tags->update_rings[i]});
      if (!res.ok()) return res.status();
      if (std::string(PQcmdTuples(res->get())) != "1") {
        return absl::NotFoundError(absl::StrCat("ring '", r.name, "' not found"));
      }
    }
    // Versions leaving ACTIVE are updated first, then versions are inserted, then versions
    // become ACTIVE: the one-ACTIVE index holds after each statement of a swap.
    auto update = [&](size_t index) -> absl::Status {
      const VersionRecord* v = &m.update_versions[index];
      // ring, version (the key), object_id and create_time (fixed at creation) are not set.
      auto res = c.Exec(
          "UPDATE versions SET object_label=$3, kid=$4, public_jwk=$5, state=$6, "
          "activate_time=$7, publish_time=$8, retire_time=$9, destroy_after=$10, "
          "destroy_time=$11, previous_state=$12, compromised=$13, certificate_chain=$14, "
          "tag=$15 WHERE ring=$1 AND version=$2::bigint",
          {v->ring, absl::StrCat(v->version), v->object_label, v->kid, v->public_jwk,
           std::string(VersionStateName(v->state)), absl::StrCat(v->activate_time),
           absl::StrCat(v->publish_time), absl::StrCat(v->retire_time),
           absl::StrCat(v->destroy_after), absl::StrCat(v->destroy_time),
           std::string(VersionStateName(v->previous_state)), Bool(v->compromised),
           v->certificate_chain, tags->update_versions[index]});
      if (!res.ok()) return res.status();
      if (std::string(PQcmdTuples(res->get())) != "1") {
        return absl::NotFoundError(
            absl::StrCat("metadata store: version ", v->version, " of '", v->ring, "' not found"));
      }
      return absl::OkStatus();
    };
    for (size_t i = 0; i < m.update_versions.size(); ++i) {
      if (m.update_versions[i].state == VersionState::kActive) continue;
      if (absl::Status s = update(i); !s.ok()) return s;
    }
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
      std::vector<std::string> params = VersionParams(v);
      params.push_back(tags->insert_versions[i]);
      res = c.Exec(
          absl::StrCat("INSERT INTO versions(", kVersionColumns,
                       ") VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"),
          params);
      if (!res.ok()) return res.status();
    }
    for (size_t i = 0; i < m.update_versions.size(); ++i) {
      if (m.update_versions[i].state != VersionState::kActive) continue;
      if (absl::Status s = update(i); !s.ok()) return s;
    }
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

absl::StatusOr<std::vector<RingRecord>> PostgresMetadataStore::LoadRings() {
  std::vector<RingRecord> rings;
  std::vector<std::string> tags;
  {
    Connection& c = *conn_;
    absl::MutexLock lock(&c.mu);
    auto res = c.Read(
        options_, absl::StrCat("SELECT ", kRingColumns, " FROM rings ORDER BY name COLLATE \"C\""));
    if (!res.ok()) return res.status();
    const PGresult* r = res->get();
    for (int i = 0; i < PQntuples(r); ++i) {
      RingRecord ring;
      ring.name = Text(r, i, 0);
      auto purpose = ParsePurpose(Text(r, i, 1));
      if (!purpose.ok()) return purpose.status();
      ring.purpose = *purpose;
      ring.alg = Text(r, i, 2);
      int64_t ints[14] = {};
      for (int col : {3, 5, 7, 8, 9, 10, 11, 13}) {
        auto v = Int(r, i, col);
        if (!v.ok()) return v.status();
        ints[col] = *v;
      }
      ring.rsa_bits = static_cast<int>(ints[3]);
      ring.allow_non_fapi = Boolean(r, i, 4);
      ring.create_time = ints[5];
      ring.curve = Text(r, i, 6);
      ring.zip_max_bytes = ints[7];
      ring.policy.prepublish_ms = ints[8];
      ring.policy.rotation_period_ms = ints[9];
      ring.policy.retain_ms = ints[10];
      ring.policy.destroy_delay_ms = ints[11];
      ring.policy_explicit = Boolean(r, i, 12);
      ring.generation = static_cast<uint64_t>(ints[13]);
      ring.require_certificate = Boolean(r, i, 14);
      tags.push_back(Text(r, i, 15));
      rings.push_back(std::move(ring));
    }
  }
  // Checked after the connection's lock is released: a check may be a token call.
  if (absl::Status s = CheckTags(options_.tagger, rings, tags); !s.ok()) return s;
  return rings;
}

absl::StatusOr<std::vector<VersionRecord>> PostgresMetadataStore::LoadVersions() {
  std::vector<VersionRecord> versions;
  std::vector<std::string> tags;
  {
    Connection& c = *conn_;
    absl::MutexLock lock(&c.mu);
    auto res =
        c.Read(options_, absl::StrCat("SELECT ", kVersionColumns,
                                      " FROM versions ORDER BY ring COLLATE \"C\", version"));
    if (!res.ok()) return res.status();
    const PGresult* r = res->get();
    for (int i = 0; i < PQntuples(r); ++i) {
      VersionRecord v;
      v.ring = Text(r, i, 0);
      auto number = Int(r, i, 1);
      if (!number.ok()) return number.status();
      v.version = static_cast<uint32_t>(*number);
      v.object_id = Text(r, i, 2);
      v.object_label = Text(r, i, 3);
      v.kid = Text(r, i, 4);
      v.public_jwk = Text(r, i, 5);
      auto state = ParseVersionState(Text(r, i, 6));
      if (!state.ok()) return state.status();
      v.state = *state;
      int64_t* times[] = {&v.create_time, &v.activate_time, &v.publish_time,
                          &v.retire_time, &v.destroy_after, &v.destroy_time};
      for (int k = 0; k < 6; ++k) {
        auto t = Int(r, i, 7 + k);
        if (!t.ok()) return t.status();
        *times[k] = *t;
      }
      auto previous = ParseVersionState(Text(r, i, 13));
      if (!previous.ok()) return previous.status();
      v.previous_state = *previous;
      v.compromised = Boolean(r, i, 14);
      v.certificate_chain = Text(r, i, 15);
      tags.push_back(Text(r, i, 16));
      versions.push_back(std::move(v));
    }
  }
  if (absl::Status s = CheckTags(options_.tagger, versions, tags); !s.ok()) return s;
  return versions;
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
  return c
      .Exec(
          "INSERT INTO audit_anchors (chain, seq, hash, file, time_ms) VALUES ($1, $2::bigint, "
          "$3, $4, $5::bigint) ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = "
          "excluded.hash, file = excluded.file, time_ms = excluded.time_ms",
          {a.chain, absl::StrCat(a.seq), a.hash, a.file, absl::StrCat(a.time_ms)})
      .status();
}

absl::StatusOr<MetadataStore::AuditAnchor> PostgresMetadataStore::LoadAuditAnchor(
    const std::string& chain) {
  Connection& c = *conn_;
  absl::MutexLock lock(&c.mu);
  if (absl::Status s = c.Connect(options_); !s.ok()) return s;
  auto r = c.Exec("SELECT seq, hash, file, time_ms FROM audit_anchors WHERE chain = $1", {chain});
  if (!r.ok()) return r.status();
  if (PQntuples(r->get()) == 0) {
    return absl::NotFoundError(absl::StrCat("no audit anchor for chain '", chain, "'"));
  }
  AuditAnchor a;
  a.chain = chain;
  auto seq = Int(r->get(), 0, 0);
  auto time_ms = Int(r->get(), 0, 3);
  if (!seq.ok()) return seq.status();
  if (!time_ms.ok()) return time_ms.status();
  a.seq = static_cast<uint64_t>(*seq);
  a.hash = Text(r->get(), 0, 1);
  a.file = Text(r->get(), 0, 2);
  a.time_ms = *time_ms;
  return a;
}

}  // namespace custody::rotation
