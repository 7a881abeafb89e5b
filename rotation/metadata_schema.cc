#include "rotation/metadata_schema.h"

#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace custody::rotation::schema {
namespace {

// Field accessors, one pair per column kind. A macro would hide the field; the lambdas are
// short enough to read in the tables.
#define CUSTODY_TEXT(R, field)                                               \
  [](const R& r, Value& v) { v.text = r.field; }, [](const Value& v, R& r) { \
    r.field = v.text;                                                        \
    return absl::OkStatus();                                                 \
  }
#define CUSTODY_INT(R, field, T)                                           \
  [](const R& r, Value& v) { v.integer = static_cast<int64_t>(r.field); }, \
      [](const Value& v, R& r) {                                           \
        r.field = static_cast<T>(v.integer);                               \
        return absl::OkStatus();                                           \
      }
#define CUSTODY_BOOL(R, field)                                                          \
  [](const R& r, Value& v) { v.integer = r.field ? 1 : 0; }, [](const Value& v, R& r) { \
    r.field = v.integer != 0;                                                           \
    return absl::OkStatus();                                                            \
  }

// Columns: name, type, default, constraint, since, key, updated, postgres_only, role.
const Column<RingRecord> kRingColumns[] = {
    {{"name", Type::kText, nullptr, "PRIMARY KEY", 1, true, false, false, Role::kField},
     CUSTODY_TEXT(RingRecord, name)},
    {{"purpose", Type::kText, nullptr, "", 1, false, false, false, Role::kField},
     [](const RingRecord& r, Value& v) { v.text = std::string(PurposeName(r.purpose)); },
     [](const Value& v, RingRecord& r) {
       auto purpose = ParsePurpose(v.text);
       if (!purpose.ok()) return purpose.status();
       r.purpose = *purpose;
       return absl::OkStatus();
     }},
    {{"alg", Type::kText, nullptr, "", 1, false, false, false, Role::kField},
     CUSTODY_TEXT(RingRecord, alg)},
    {{"rsa_bits", Type::kInt32, nullptr, "", 1, false, false, false, Role::kField},
     CUSTODY_INT(RingRecord, rsa_bits, int)},
    {{"allow_non_fapi", Type::kBool, nullptr, "", 1, false, false, false, Role::kField},
     CUSTODY_BOOL(RingRecord, allow_non_fapi)},
    {{"create_time", Type::kInt64, nullptr, "", 1, false, false, false, Role::kField},
     CUSTODY_INT(RingRecord, create_time, int64_t)},
    {{"curve", Type::kText, "''", "", 1, false, false, false, Role::kField},
     CUSTODY_TEXT(RingRecord, curve)},
    {{"zip_max_bytes", Type::kInt64, "0", "", 1, false, false, false, Role::kField},
     CUSTODY_INT(RingRecord, zip_max_bytes, int64_t)},
    {{"prepublish_ms", Type::kInt64, "3600000", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(RingRecord, policy.prepublish_ms, int64_t)},
    {{"rotation_period_ms", Type::kInt64, "0", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(RingRecord, policy.rotation_period_ms, int64_t)},
    {{"retain_ms", Type::kInt64, "86400000", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(RingRecord, policy.retain_ms, int64_t)},
    {{"destroy_delay_ms", Type::kInt64, "604800000", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(RingRecord, policy.destroy_delay_ms, int64_t)},
    {{"policy_explicit", Type::kBool, "false", "", 1, false, true, false, Role::kField},
     CUSTODY_BOOL(RingRecord, policy_explicit)},
    {{"generation", Type::kInt64, "0", "", 1, false, false, true, Role::kGeneration},
     CUSTODY_INT(RingRecord, generation, uint64_t)},
    {{"require_certificate", Type::kBool, "false", "", 2, false, false, false, Role::kField},
     CUSTODY_BOOL(RingRecord, require_certificate)},
    {{"tag", Type::kText, "''", "", 4, false, true, false, Role::kTag}, nullptr, nullptr},
};

const Column<VersionRecord> kVersionColumns[] = {
    {{"ring", Type::kText, nullptr, "REFERENCES rings(name)", 1, true, false, false, Role::kField},
     CUSTODY_TEXT(VersionRecord, ring)},
    {{"version", Type::kInt64, nullptr, "", 1, true, false, false, Role::kField},
     CUSTODY_INT(VersionRecord, version, uint32_t)},
    {{"object_id", Type::kText, nullptr, "UNIQUE", 1, false, false, false, Role::kField},
     CUSTODY_TEXT(VersionRecord, object_id)},
    {{"object_label", Type::kText, nullptr, "", 1, false, true, false, Role::kField},
     CUSTODY_TEXT(VersionRecord, object_label)},
    {{"kid", Type::kText, nullptr, "", 1, false, true, false, Role::kField},
     CUSTODY_TEXT(VersionRecord, kid)},
    {{"public_jwk", Type::kText, nullptr, "", 1, false, true, false, Role::kField},
     CUSTODY_TEXT(VersionRecord, public_jwk)},
    {{"state", Type::kText, nullptr, "", 1, false, true, false, Role::kField},
     [](const VersionRecord& r, Value& v) { v.text = std::string(VersionStateName(r.state)); },
     [](const Value& v, VersionRecord& r) {
       auto state = ParseVersionState(v.text);
       if (!state.ok()) return state.status();
       r.state = *state;
       return absl::OkStatus();
     }},
    {{"create_time", Type::kInt64, nullptr, "", 1, false, false, false, Role::kField},
     CUSTODY_INT(VersionRecord, create_time, int64_t)},
    {{"activate_time", Type::kInt64, nullptr, "", 1, false, true, false, Role::kField},
     CUSTODY_INT(VersionRecord, activate_time, int64_t)},
    {{"publish_time", Type::kInt64, "0", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(VersionRecord, publish_time, int64_t)},
    {{"retire_time", Type::kInt64, "0", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(VersionRecord, retire_time, int64_t)},
    {{"destroy_after", Type::kInt64, "0", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(VersionRecord, destroy_after, int64_t)},
    {{"destroy_time", Type::kInt64, "0", "", 1, false, true, false, Role::kField},
     CUSTODY_INT(VersionRecord, destroy_time, int64_t)},
    {{"previous_state", Type::kText, "'CREATING'", "", 1, false, true, false, Role::kField},
     [](const VersionRecord& r, Value& v) {
       v.text = std::string(VersionStateName(r.previous_state));
     },
     [](const Value& v, VersionRecord& r) {
       auto state = ParseVersionState(v.text);
       if (!state.ok()) return state.status();
       r.previous_state = *state;
       return absl::OkStatus();
     }},
    {{"compromised", Type::kBool, "false", "", 1, false, true, false, Role::kField},
     CUSTODY_BOOL(VersionRecord, compromised)},
    {{"certificate_chain", Type::kText, "''", "", 2, false, true, false, Role::kField},
     CUSTODY_TEXT(VersionRecord, certificate_chain)},
    {{"tag", Type::kText, "''", "", 4, false, true, false, Role::kTag}, nullptr, nullptr},
};

using Anchor = MetadataStore::AuditAnchor;
const Column<Anchor> kAnchorColumns[] = {
    {{"chain", Type::kText, nullptr, "PRIMARY KEY", 3, true, false, false, Role::kField},
     CUSTODY_TEXT(Anchor, chain)},
    {{"seq", Type::kInt64, nullptr, "", 3, false, true, false, Role::kField},
     CUSTODY_INT(Anchor, seq, uint64_t)},
    {{"hash", Type::kText, nullptr, "", 3, false, true, false, Role::kField},
     CUSTODY_TEXT(Anchor, hash)},
    {{"file", Type::kText, nullptr, "", 3, false, true, false, Role::kField},
     CUSTODY_TEXT(Anchor, file)},
    {{"time_ms", Type::kInt64, nullptr, "", 3, false, true, false, Role::kField},
     CUSTODY_INT(Anchor, time_ms, int64_t)},
};

#undef CUSTODY_TEXT
#undef CUSTODY_INT
#undef CUSTODY_BOOL

struct MigrationInfo {
  const char* summary;
  const char* postgres_sql;  // "" or what only the shared store adds
};
// Never edit a migration that has shipped; append one (and give new columns its number).
constexpr MigrationInfo kMigrations[] = {
    // 1
    {"rings and versions (PostgreSQL: the per-ring generation and the one-ACTIVE index)",
     "CREATE UNIQUE INDEX versions_one_active ON versions (ring) WHERE state = 'ACTIVE'"},
    // 2
    {"certificates (a ring that requires one before a manual rotation; a version's chain)", ""},
    // 3
    {"the audit chains' anchored heads, one row per chain (server/security/audit_anchor.h)", ""},
    // 4
    {"record tags (rotation/record_tag.h); rows from before them are adopted once by custodyd", ""},
};
// The migration that introduced record tags: columns added after it are tagged only when they
// differ from their default (schema.h, Canonical).
constexpr int kTagsSince = 4;

template <typename Record>
Table MakeTable(const char* name, int since, const char* table_constraint,
                std::span<const Column<Record>> columns) {
  Table t{name, since, table_constraint, {}};
  for (const Column<Record>& c : columns) t.columns.push_back(c.spec);
  return t;
}

std::string TypeName(Dialect d, Type type) {
  if (d == Dialect::kSqlite) return type == Type::kText ? "TEXT" : "INTEGER";
  switch (type) {
    case Type::kText:
      return "text";
    case Type::kInt32:
      return "integer";
    case Type::kInt64:
      return "bigint";
    case Type::kBool:
      return "boolean";
  }
  return "";
}

std::string DefaultSql(Dialect d, const ColumnSpec& c) {
  if (d == Dialect::kSqlite && c.type == Type::kBool) {
    return absl::string_view(c.default_sql) == "true" ? "1" : "0";
  }
  return c.default_sql;
}

std::string ColumnDefinition(Dialect d, const ColumnSpec& c) {
  std::string out = absl::StrCat(c.name, " ", TypeName(d, c.type), " NOT NULL");
  if (c.default_sql != nullptr) absl::StrAppend(&out, " DEFAULT ", DefaultSql(d, c));
  if (c.constraint[0] != '\0') absl::StrAppend(&out, " ", c.constraint);
  return out;
}

std::string Placeholder(Dialect d, size_t n) {
  return d == Dialect::kSqlite ? absl::StrCat("?", n) : absl::StrCat("$", n);
}

std::vector<const Table*> AllTables() { return {&RingsTable(), &VersionsTable(), &AnchorsTable()}; }

// The default of a column as the Value its field holds when it is the default.
Value DefaultValue(const ColumnSpec& c) {
  Value v;
  absl::string_view d = c.default_sql == nullptr ? "" : c.default_sql;
  if (c.type == Type::kText) {
    if (d.size() >= 2) v.text = std::string(d.substr(1, d.size() - 2));
  } else if (c.type == Type::kBool) {
    v.integer = d == "true" ? 1 : 0;
  } else if (!absl::SimpleAtoi(d, &v.integer)) {
    v.integer = 0;
  }
  return v;
}

void AddLengthPrefixed(std::string& out, absl::string_view field) {
  const uint32_t n = static_cast<uint32_t>(field.size());
  const char length[4] = {static_cast<char>(n >> 24), static_cast<char>(n >> 16),
                          static_cast<char>(n >> 8), static_cast<char>(n)};
  out.append(length, 4);
  out.append(field.data(), field.size());
}

std::string AsText(const ColumnSpec& c, const Value& v) {
  if (c.type == Type::kText) return v.text;
  if (c.type == Type::kBool) return v.integer != 0 ? "1" : "0";
  return absl::StrCat(v.integer);
}

}  // namespace

std::span<const Column<RingRecord>> RingColumns() { return kRingColumns; }
std::span<const Column<VersionRecord>> VersionColumns() { return kVersionColumns; }
std::span<const Column<MetadataStore::AuditAnchor>> AnchorColumns() { return kAnchorColumns; }

const Table& RingsTable() {
  static const Table* const t = new Table(MakeTable("rings", 1, "", RingColumns()));
  return *t;
}
const Table& VersionsTable() {
  static const Table* const t =
      new Table(MakeTable("versions", 1, "PRIMARY KEY (ring, version)", VersionColumns()));
  return *t;
}
const Table& AnchorsTable() {
  static const Table* const t = new Table(MakeTable("audit_anchors", 3, "", AnchorColumns()));
  return *t;
}

int LatestVersion() { return static_cast<int>(std::size(kMigrations)); }

const char* MigrationSummary(int version) {
  return version >= 1 && version <= LatestVersion() ? kMigrations[version - 1].summary : "";
}

std::vector<MigrationStep> MigrationSteps(Dialect d, int version) {
  std::vector<MigrationStep> steps;
  for (const Table* table : AllTables()) {
    if (table->since == version) {
      std::vector<std::string> definitions;
      for (const ColumnSpec& c : table->columns) {
        if (InDialect(d, c) && c.since == version) definitions.push_back(ColumnDefinition(d, c));
      }
      if (table->table_constraint[0] != '\0') definitions.push_back(table->table_constraint);
      steps.push_back({MigrationStep::kCreateTable, table->name, "",
                       absl::StrCat("CREATE TABLE IF NOT EXISTS ", table->name, " (\n  ",
                                    absl::StrJoin(definitions, ",\n  "), "\n)",
                                    d == Dialect::kSqlite ? " STRICT" : "")});
    } else if (table->since < version) {
      for (const ColumnSpec& c : table->columns) {
        if (!InDialect(d, c) || c.since != version) continue;
        steps.push_back(
            {MigrationStep::kAddColumn, table->name, c.name,
             absl::StrCat("ALTER TABLE ", table->name, " ADD COLUMN ", ColumnDefinition(d, c))});
      }
    }
  }
  if (d == Dialect::kPostgres && version >= 1 && version <= LatestVersion() &&
      kMigrations[version - 1].postgres_sql[0] != '\0') {
    steps.push_back({MigrationStep::kStatement, "", "", kMigrations[version - 1].postgres_sql});
  }
  return steps;
}

std::vector<const ColumnSpec*> DialectColumns(Dialect d, const Table& table) {
  std::vector<const ColumnSpec*> out;
  for (const ColumnSpec& c : table.columns) {
    if (InDialect(d, c)) out.push_back(&c);
  }
  return out;
}

std::string ColumnList(Dialect d, const Table& table) {
  std::vector<std::string> names;
  for (const ColumnSpec* c : DialectColumns(d, table)) names.push_back(c->name);
  return absl::StrJoin(names, ",");
}

Statement InsertStatement(Dialect d, const Table& table) {
  Statement st;
  std::vector<std::string> placeholders;
  const size_t n = DialectColumns(d, table).size();
  for (size_t i = 0; i < n; ++i) {
    st.columns.push_back(i);
    placeholders.push_back(Placeholder(d, st.columns.size()));
  }
  st.sql = absl::StrCat("INSERT INTO ", table.name, "(", ColumnList(d, table), ") VALUES (",
                        absl::StrJoin(placeholders, ","), ")");
  return st;
}

Statement UpdateStatement(Dialect d, const Table& table) {
  Statement st;
  std::vector<std::string> sets, keys;
  const std::vector<const ColumnSpec*> columns = DialectColumns(d, table);
  for (size_t i = 0; i < columns.size(); ++i) {
    if (!columns[i]->updated) continue;
    st.columns.push_back(i);
    sets.push_back(absl::StrCat(columns[i]->name, "=", Placeholder(d, st.columns.size())));
  }
  for (size_t i = 0; i < columns.size(); ++i) {
    if (!columns[i]->key) continue;
    st.columns.push_back(i);
    keys.push_back(absl::StrCat(columns[i]->name, "=", Placeholder(d, st.columns.size())));
  }
  st.sql = absl::StrCat("UPDATE ", table.name, " SET ", absl::StrJoin(sets, ", "), " WHERE ",
                        absl::StrJoin(keys, " AND "));
  return st;
}

Statement UpsertStatement(Dialect d, const Table& table) {
  Statement st = InsertStatement(d, table);
  std::vector<std::string> keys, sets;
  for (const ColumnSpec* c : DialectColumns(d, table)) {
    if (c->key) {
      keys.push_back(c->name);
    } else {
      sets.push_back(absl::StrCat(c->name, " = excluded.", c->name));
    }
  }
  absl::StrAppend(&st.sql, " ON CONFLICT (", absl::StrJoin(keys, ","), ") DO UPDATE SET ",
                  absl::StrJoin(sets, ", "));
  return st;
}

Statements StatementsFor(Dialect d) {
  return {InsertStatement(d, RingsTable()), UpdateStatement(d, RingsTable()),
          InsertStatement(d, VersionsTable()), UpdateStatement(d, VersionsTable()),
          UpsertStatement(d, AnchorsTable())};
}

template <typename Record>
std::string Canonical(std::span<const Column<Record>> columns, const char* kind,
                      const Record& record) {
  std::string out;
  AddLengthPrefixed(out, "custody-metadata/v1");
  AddLengthPrefixed(out, kind);
  for (const Column<Record>& c : columns) {
    if (c.spec.role != Role::kField) continue;
    Value v;
    c.encode(record, v);
    const std::string text = AsText(c.spec, v);
    if (c.spec.since > kTagsSince) {
      if (text == AsText(c.spec, DefaultValue(c.spec))) continue;
      AddLengthPrefixed(out, c.spec.name);
    }
    AddLengthPrefixed(out, text);
  }
  return out;
}

template std::string Canonical(std::span<const Column<RingRecord>>, const char*, const RingRecord&);
template std::string Canonical(std::span<const Column<VersionRecord>>, const char*,
                               const VersionRecord&);

absl::Status RowNotFound(const RingRecord& ring) {
  return absl::NotFoundError(absl::StrCat("ring '", ring.name, "' not found"));
}

absl::Status RowNotFound(const VersionRecord& version) {
  return absl::NotFoundError(absl::StrCat("metadata store: version ", version.version, " of '",
                                          version.ring, "' not found"));
}

}  // namespace custody::rotation::schema
