// The libpq side of the PostgreSQL metadata store: a connection (connect with the store's
// options, run a statement, map PostgreSQL's errors to statuses callers can act on) and the
// conversion of rows between PGresult text and the schema's values (rotation/metadata_schema.h).
// Internal to rotation/postgres_metadata_store.cc.
#ifndef CUSTODY_ROTATION_POSTGRES_CONNECTION_H_
#define CUSTODY_ROTATION_POSTGRES_CONNECTION_H_

#include <libpq-fe.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "rotation/metadata_schema.h"
#include "rotation/postgres_metadata_store.h"

namespace custody::rotation {
namespace postgres {

// A status that Commit retries in a fresh transaction (deadlock, serialization failure, a
// connection lost before COMMIT was sent).
inline constexpr absl::string_view kRetryPayload = "custody.dev/pg-retry";
// What a gRPC caller is told when PostgreSQL cannot be reached (the details go to the log).
inline constexpr absl::string_view kUnreachableForCallers = "metadata store unreachable";

struct ResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

// libpq's message without its trailing newline.
std::string Trim(const char* message);

absl::StatusOr<int64_t> Int(const PGresult* r, int row, int col);
std::string Text(const PGresult* r, int row, int col);
bool Boolean(const PGresult* r, int row, int col);
// The text parameters of `statement` from a row of the table's values.
std::vector<std::string> Params(const schema::Table& table, const schema::Statement& statement,
                                const std::vector<schema::Value>& row);
// Row `i` of a SELECT of the table's column list.
absl::StatusOr<std::vector<schema::Value>> ReadRow(const PGresult* r, int i,
                                                   const schema::Table& table);

}  // namespace postgres

struct PostgresMetadataStore::Connection {
  using Result = postgres::Result;
  absl::Mutex mu;
  PGconn* conn ABSL_GUARDED_BY(mu) = nullptr;

  ~Connection();

  // UNAVAILABLE with the caller's message, marked for a retry.
  static absl::Status Unreachable(absl::string_view message);
  // Connects (or keeps a live connection) with the store's options and session settings.
  absl::Status Connect(const Options& options) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // A read-only query, on a fresh connection when needed. A connection that died since its last
  // use (a server restart) is only found out by using it; a read is idempotent, so it runs once
  // more on a new connection instead of failing the caller's refresh and waiting for the next.
  absl::StatusOr<Result> Read(const Options& options, const std::string& sql)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Runs one statement (several when `params` is empty) and maps its errors.
  absl::StatusOr<Result> Exec(const std::string& sql, const std::vector<std::string>& params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
};

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_POSTGRES_CONNECTION_H_
