// The one description of the metadata schema, read by both stores (SQLite and PostgreSQL): each
// table's columns (name, type, default, the migration that added it, whether an UPDATE sets it),
// how a record's field becomes a column value and back, the numbered migrations, and the SQL
// both dialects need (DDL, column lists, INSERT/UPDATE/upsert statements). Record tags
// (rotation/record_tag.h) are computed from the same columns.
//
// Adding a column: one entry in its table below (with `since` = the next migration number) and
// that migration's line in kMigrations; both stores, the tag and the migration code follow.
#ifndef CUSTODY_ROTATION_METADATA_SCHEMA_H_
#define CUSTODY_ROTATION_METADATA_SCHEMA_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "rotation/key_ring.h"
#include "rotation/metadata_store.h"

namespace custody::rotation::schema {

enum class Dialect { kSqlite, kPostgres };
enum class Type { kText, kInt32, kInt64, kBool };

// One cell as the stores exchange it with their drivers.
struct Value {
  int64_t integer = 0;  // kInt32, kInt64; kBool as 0 or 1
  std::string text;     // kText
};

// What a column holds besides an ordinary field of the record.
enum class Role {
  kField,       // a field of the record, covered by the record's tag
  kTag,         // the record's tag (rotation/record_tag.h)
  kGeneration,  // rings: the shared store's per-ring commit counter (0 on insert; not tagged)
};

// The DDL view of a column (what both dialects render).
struct ColumnSpec {
  const char* name;
  Type type;
  const char* default_sql;  // nullptr: none; a SQL literal ("0", "''", "false" for kBool)
  const char* constraint;   // "" or e.g. "PRIMARY KEY", "UNIQUE", "REFERENCES rings(name)"
  int since;                // the migration that added it
  bool key;                 // identifies the row in an UPDATE
  bool updated;             // set by an UPDATE of the record
  bool postgres_only;       // exists only in the shared store
  Role role;
};

// A column with its record's accessors.
template <typename Record>
struct Column {
  ColumnSpec spec;
  void (*encode)(const Record&, Value&);
  absl::Status (*decode)(const Value&, Record&);
};

struct Table {
  const char* name;
  int since;                     // the migration that created it
  const char* table_constraint;  // "" or e.g. "PRIMARY KEY (ring, version)"
  std::vector<ColumnSpec> columns;
};

std::span<const Column<RingRecord>> RingColumns();
std::span<const Column<VersionRecord>> VersionColumns();
std::span<const Column<MetadataStore::AuditAnchor>> AnchorColumns();
const Table& RingsTable();
const Table& VersionsTable();
const Table& AnchorsTable();

// A record's table and columns, and the NOT_FOUND an update of its missing row answers: for the
// stores' code written once for rings and versions.
inline const Table& TableOf(const RingRecord&) { return RingsTable(); }
inline const Table& TableOf(const VersionRecord&) { return VersionsTable(); }
inline std::span<const Column<RingRecord>> ColumnsOf(const RingRecord&) { return RingColumns(); }
inline std::span<const Column<VersionRecord>> ColumnsOf(const VersionRecord&) {
  return VersionColumns();
}
absl::Status RowNotFound(const RingRecord& ring);
absl::Status RowNotFound(const VersionRecord& version);

// The numbered migrations, applied in order by both stores; the latest is the schema version a
// database is brought to.
int LatestVersion();
// What migration `version` does (for the log and errors).
const char* MigrationSummary(int version);

// One step of a migration. kCreateTable and kAddColumn are idempotent where the store asks
// (SQLite checks the column first: a database made before numbered migrations converges).
struct MigrationStep {
  enum Kind { kCreateTable, kAddColumn, kStatement } kind;
  std::string table;
  std::string column;  // kAddColumn
  std::string sql;
};
std::vector<MigrationStep> MigrationSteps(Dialect dialect, int version);

// Whether the dialect's table has the column (the shared store's generation is PostgreSQL's).
inline bool InDialect(Dialect dialect, const ColumnSpec& c) {
  return !c.postgres_only || dialect == Dialect::kPostgres;
}
// The table's columns in the dialect, in column-list order: a row's values and a Statement's
// column indices follow it.
std::vector<const ColumnSpec*> DialectColumns(Dialect dialect, const Table& table);
// "name,purpose,..." in the table's column order for the dialect.
std::string ColumnList(Dialect dialect, const Table& table);

// A statement and the columns (indices into the dialect's column list) bound to its
// parameters, in parameter order.
struct Statement {
  std::string sql;
  std::vector<size_t> columns;
};
Statement InsertStatement(Dialect dialect, const Table& table);
// UPDATE ... SET every updated column WHERE every key column.
Statement UpdateStatement(Dialect dialect, const Table& table);
// INSERT ... ON CONFLICT (the key) DO UPDATE SET every other column.
Statement UpsertStatement(Dialect dialect, const Table& table);

// The statements a store writes with, built once per store.
struct Statements {
  Statement insert_ring, update_ring, insert_version, update_version, upsert_anchor;
};
Statements StatementsFor(Dialect dialect);

// A record as the dialect's row: one value per column of ColumnList, the tag in its column.
template <typename Record>
std::vector<Value> Encode(Dialect dialect, std::span<const Column<Record>> columns,
                          const Record& record, const std::string& tag = "") {
  std::vector<Value> row;
  for (const Column<Record>& c : columns) {
    if (!InDialect(dialect, c.spec)) continue;
    Value& v = row.emplace_back();
    if (c.spec.role == Role::kTag) {
      v.text = tag;
    } else if (c.spec.role == Role::kField) {
      c.encode(record, v);
    }  // kGeneration: 0 on insert, maintained by the store
  }
  return row;
}

// The record a dialect's row holds (one value per column of ColumnList); the tag, if the table
// has one, into `tag`. INVALID_ARGUMENT for a value the record cannot hold (an unknown state).
template <typename Record>
absl::StatusOr<Record> Decode(Dialect dialect, std::span<const Column<Record>> columns,
                              const std::vector<Value>& row, std::string* tag = nullptr) {
  Record record;
  size_t i = 0;
  for (const Column<Record>& c : columns) {
    if (!InDialect(dialect, c.spec)) continue;
    const Value& v = row.at(i++);
    if (c.spec.role == Role::kTag) {
      if (tag != nullptr) *tag = v.text;
    } else if (absl::Status s = c.decode(v, record); !s.ok()) {
      return s;
    }
  }
  return record;
}

// The tagged message of a record: every kField column, in order, as length-prefixed text
// (integers in decimal, booleans "1"/"0"), after a domain and `kind`. A column added after the
// tags (migration 4) enters only when its value differs from its default, as name then value:
// rows tagged before the column existed keep verifying, and any other value is covered.
template <typename Record>
std::string Canonical(std::span<const Column<Record>> columns, const char* kind,
                      const Record& record);

}  // namespace custody::rotation::schema

#endif  // CUSTODY_ROTATION_METADATA_SCHEMA_H_
