#include "rotation/postgres_connection.h"

#include <algorithm>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/caller_message.h"

namespace custody::rotation {
namespace postgres {

std::string Trim(const char* message) {
  std::string s = message == nullptr ? "" : message;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

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

// The text parameters of `statement` from a row of the table's values.
std::vector<std::string> Params(const schema::Table& table, const schema::Statement& statement,
                                const std::vector<schema::Value>& row) {
  const std::vector<const schema::ColumnSpec*> columns =
      schema::DialectColumns(schema::Dialect::kPostgres, table);
  std::vector<std::string> params;
  for (size_t i : statement.columns) {
    switch (columns[i]->type) {
      case schema::Type::kText:
        params.push_back(row[i].text);
        break;
      case schema::Type::kBool:
        params.push_back(row[i].integer != 0 ? "true" : "false");
        break;
      default:
        params.push_back(absl::StrCat(row[i].integer));
    }
  }
  return params;
}

// Row `i` of a SELECT of the table's column list.
absl::StatusOr<std::vector<schema::Value>> ReadRow(const PGresult* r, int i,
                                                   const schema::Table& table) {
  std::vector<schema::Value> row;
  int col = 0;
  for (const schema::ColumnSpec* c : schema::DialectColumns(schema::Dialect::kPostgres, table)) {
    schema::Value& v = row.emplace_back();
    if (c->type == schema::Type::kText) {
      v.text = Text(r, i, col);
    } else if (c->type == schema::Type::kBool) {
      v.integer = Boolean(r, i, col) ? 1 : 0;
    } else {
      auto n = Int(r, i, col);
      if (!n.ok()) return n.status();
      v.integer = *n;
    }
    ++col;
  }
  return row;
}

}  // namespace postgres

using postgres::kRetryPayload;
using postgres::kUnreachableForCallers;
using postgres::Result;
using postgres::Trim;

PostgresMetadataStore::Connection::~Connection() {
  absl::MutexLock lock(&mu);
  if (conn != nullptr) PQfinish(conn);
}

absl::Status PostgresMetadataStore::Connection::Unreachable(absl::string_view message) {
  // libpq's text (it may name the server's socket path or host) is for the log only.
  absl::Status s = WithCallerMessage(
      absl::UnavailableError(absl::StrCat("metadata store unreachable: ", message)),
      kUnreachableForCallers);
  s.SetPayload(kRetryPayload, absl::Cord("1"));
  return s;
}

absl::Status PostgresMetadataStore::Connection::Connect(const Options& options) {
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

absl::StatusOr<postgres::Result> PostgresMetadataStore::Connection::Read(const Options& options,
                                                                         const std::string& sql) {
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

absl::StatusOr<postgres::Result> PostgresMetadataStore::Connection::Exec(
    const std::string& sql, const std::vector<std::string>& params) {
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
      return absl::AbortedError("a second ACTIVE version: another replica changed the ring; retry");
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

}  // namespace custody::rotation
