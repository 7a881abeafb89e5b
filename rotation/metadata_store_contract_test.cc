// The metadata store's contract (rotation/metadata_store.h), one suite run against both stores:
// the embedded SQLite file and PostgreSQL 15 (a throw-away cluster for the binary, a fresh
// database per test). What only one store does stays in its own test file
// (sqlite_metadata_store_test.cc: an older SQLite file, anchors read without writing;
// postgres_metadata_store_test.cc: generations, racing replicas, passwords, restarts).
#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "rotation/metadata_schema.h"
#include "rotation/postgres_metadata_store.h"
#include "rotation/record_tag.h"
#include "rotation/sqlite_metadata_store.h"
#include "rotation/testing/postgres_cluster.h"
#include "rotation/testing/postgres_store.h"
#include "rotation/testing/records.h"

namespace custody::rotation {
namespace {

using testing::Ring;
using testing::Version;

const ::testing::Environment* const environment = testing::PostgresClusterEnvironment::Register();

// Where a store keeps its database, and what a database writer can do to it behind the store.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual absl::StatusOr<std::unique_ptr<MetadataStore>> Open(const RecordTagger* tagger) = 0;
  // Runs SQL statements as a database writer would (psql, sqlite3), not through the store.
  virtual absl::Status Sql(const std::string& statements) = 0;
  // The table's column names, in the database's order.
  virtual absl::StatusOr<std::vector<std::string>> ColumnNames(const std::string& table) = 0;
  // Marks the database as made by a later schema (`version`).
  virtual absl::Status MarkSchema(int version) = 0;
  virtual schema::Dialect dialect() const = 0;
};

class SqliteBackend final : public Backend {
 public:
  SqliteBackend() {
    char tmpl[] = "/tmp/custody-contract-XXXXXX";
    if (mkdtemp(tmpl) != nullptr) dir_ = tmpl;
  }
  ~SqliteBackend() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  absl::StatusOr<std::unique_ptr<MetadataStore>> Open(const RecordTagger* tagger) override {
    return OpenSqliteMetadataStore(path(), tagger);
  }
  absl::Status Sql(const std::string& statements) override { return Query(statements, nullptr); }
  absl::StatusOr<std::vector<std::string>> ColumnNames(const std::string& table) override {
    std::vector<std::string> names;
    if (absl::Status s =
            Query(absl::StrCat("SELECT name FROM pragma_table_info('", table, "')"), &names);
        !s.ok()) {
      return s;
    }
    return names;
  }
  absl::Status MarkSchema(int version) override {
    return Sql(absl::StrCat("PRAGMA user_version=", version));
  }
  schema::Dialect dialect() const override { return schema::Dialect::kSqlite; }

 private:
  std::string path() const { return dir_ + "/metadata.db"; }
  absl::Status Query(const std::string& sql, std::vector<std::string>* first_column) {
    sqlite3* db = nullptr;
    if (sqlite3_open(path().c_str(), &db) != SQLITE_OK) {
      sqlite3_close(db);
      return absl::InternalError("sqlite3_open");
    }
    char* error = nullptr;
    const int rc = sqlite3_exec(
        db, sql.c_str(),
        [](void* out, int, char** values, char**) {
          if (out != nullptr) static_cast<std::vector<std::string>*>(out)->push_back(values[0]);
          return 0;
        },
        first_column, &error);
    std::string message = error == nullptr ? "" : error;
    sqlite3_free(error);
    sqlite3_close(db);
    return rc == SQLITE_OK ? absl::OkStatus() : absl::InternalError(message);
  }
  std::string dir_;
};

class PostgresBackend final : public Backend {
 public:
  PostgresBackend() {
    static int n = 0;
    db_ = absl::StrCat("contract", ++n);
    created_ = Cluster() != nullptr && Cluster()->CreateDatabase(db_).ok();
  }
  absl::StatusOr<std::unique_ptr<MetadataStore>> Open(const RecordTagger* tagger) override {
    if (!created_) return absl::UnavailableError("no PostgreSQL cluster");
    auto store = testing::OpenPostgresStore(*Cluster(), db_, tagger);
    if (!store.ok()) return store.status();
    return std::unique_ptr<MetadataStore>(*std::move(store));
  }
  absl::Status Sql(const std::string& statements) override {
    return Cluster()->Psql(db_, statements).status();
  }
  absl::StatusOr<std::vector<std::string>> ColumnNames(const std::string& table) override {
    auto out = Cluster()->Psql(
        db_, absl::StrCat("SELECT column_name FROM information_schema.columns WHERE table_name = '",
                          table, "' ORDER BY ordinal_position"));
    if (!out.ok()) return out.status();
    return std::vector<std::string>(absl::StrSplit(*out, '\n', absl::SkipEmpty()));
  }
  absl::Status MarkSchema(int version) override {
    return Sql(
        absl::StrCat("INSERT INTO custody_schema_migrations(version) VALUES (", version, ")"));
  }
  schema::Dialect dialect() const override { return schema::Dialect::kPostgres; }

 private:
  static testing::PostgresCluster* Cluster() { return testing::PostgresClusterEnvironment::Get(); }
  std::string db_;
  bool created_ = false;
};

class MetadataStoreContractTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "sqlite") {
      backend_ = std::make_unique<SqliteBackend>();
    } else {
      backend_ = std::make_unique<PostgresBackend>();
    }
  }

  std::unique_ptr<MetadataStore> MustOpen(const RecordTagger* tagger = nullptr) {
    auto store = backend_->Open(tagger);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }
  void Sql(const std::string& statements) {
    absl::Status s = backend_->Sql(statements);
    EXPECT_TRUE(s.ok()) << s;
  }
  bool shared() const { return backend_->dialect() == schema::Dialect::kPostgres; }

  std::unique_ptr<Backend> backend_;
};

TEST_P(MetadataStoreContractTest, EveryFieldSurvivesReopen) {
  {
    auto store = MustOpen();
    ASSERT_NE(store, nullptr);
    RingRecord ring = Ring("op/id");
    ring.require_certificate = true;
    ring.rsa_bits = 3072;
    ring.allow_non_fapi = true;
    ASSERT_TRUE(store->InsertRingWithVersion(ring, Version("op/id", 1, "aa")).ok());
    VersionRecord v = Version("op/id", 1, "aa");
    v.certificate_chain = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    v.state = VersionState::kActive;
    v.kid = "kid-1";
    v.public_jwk = R"({"kty":"EC"})";
    v.activate_time = 1700000001;
    v.publish_time = 1700000002;
    v.retire_time = 1700000003;
    v.destroy_time = 1700000004;
    v.previous_state = VersionState::kPending;
    v.compromised = true;
    v.destroy_after = 1700009999;
    ASSERT_TRUE(store->UpdateVersion(v).ok());
  }
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  auto rings = store->LoadRings();
  ASSERT_TRUE(rings.ok()) << rings.status();
  ASSERT_EQ(rings->size(), 1u);
  const RingRecord& r = rings->front();
  EXPECT_EQ(r.name, "op/id");
  EXPECT_EQ(r.alg, "ES256");
  EXPECT_EQ(r.rsa_bits, 3072);
  EXPECT_TRUE(r.allow_non_fapi);
  EXPECT_EQ(r.create_time, 1700000000);
  EXPECT_TRUE(r.require_certificate);
  EXPECT_EQ(r.policy.prepublish_ms, RotationPolicy{}.prepublish_ms);
  // Two commits touched it; the embedded store keeps no generation.
  EXPECT_EQ(r.generation, shared() ? 2u : 0u);
  auto versions = store->LoadVersions();
  ASSERT_TRUE(versions.ok()) << versions.status();
  ASSERT_EQ(versions->size(), 1u);
  const VersionRecord& v = versions->front();
  EXPECT_EQ(v.state, VersionState::kActive);
  EXPECT_EQ(v.kid, "kid-1");
  EXPECT_EQ(v.public_jwk, R"({"kty":"EC"})");
  EXPECT_EQ(v.create_time, 1700000000);
  EXPECT_EQ(v.activate_time, 1700000001);
  EXPECT_EQ(v.publish_time, 1700000002);
  EXPECT_EQ(v.retire_time, 1700000003);
  EXPECT_EQ(v.destroy_time, 1700000004);
  EXPECT_EQ(v.previous_state, VersionState::kPending);
  EXPECT_TRUE(v.compromised);
  EXPECT_EQ(v.destroy_after, 1700009999);
  EXPECT_EQ(v.object_label, "custody/op/id/v1");
  EXPECT_EQ(v.certificate_chain, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
}

TEST_P(MetadataStoreContractTest, DuplicateRingIsAlreadyExistsAndChangesNothing) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  absl::Status s = store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "bb"));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_NE(s.message().find("'op/id' already exists"), absl::string_view::npos) << s;
  auto versions = store->LoadVersions();
  ASSERT_TRUE(versions.ok());
  ASSERT_EQ(versions->size(), 1u);
  EXPECT_EQ((*versions)[0].object_id, "aa");
}

TEST_P(MetadataStoreContractTest, DeleteLastVersionRemovesRing) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  ASSERT_TRUE(store->InsertVersion(Version("op/id", 2, "bb")).ok());
  ASSERT_TRUE(store->DeleteVersion("op/id", 1).ok());
  EXPECT_EQ(store->LoadRings()->size(), 1u);  // one version left
  ASSERT_TRUE(store->DeleteVersion("op/id", 2).ok());
  EXPECT_TRUE(store->LoadRings()->empty());
  EXPECT_TRUE(store->LoadVersions()->empty());
}

TEST_P(MetadataStoreContractTest, FurtherVersionsNeedAnExistingRingAndFreeNumbers) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  RingRecord ring = Ring("enc/x");
  ring.purpose = Purpose::kDecrypt;
  ring.alg = "ECDH-ES";
  ring.curve = "P-384";
  ring.zip_max_bytes = 4096;
  ring.policy.rotation_period_ms = 123456;
  ring.policy_explicit = true;
  ASSERT_TRUE(store->InsertRingWithVersion(ring, Version("enc/x", 1, "aa")).ok());
  EXPECT_TRUE(store->InsertVersion(Version("enc/x", 2, "bb")).ok());
  EXPECT_EQ(store->InsertVersion(Version("enc/x", 2, "cc")).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store->InsertVersion(Version("enc/x", 3, "aa")).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store->InsertVersion(Version("nope", 1, "dd")).code(), absl::StatusCode::kNotFound);
  auto rings = store->LoadRings();
  ASSERT_TRUE(rings.ok());
  EXPECT_EQ((*rings)[0].purpose, Purpose::kDecrypt);
  EXPECT_EQ((*rings)[0].curve, "P-384");
  EXPECT_EQ((*rings)[0].zip_max_bytes, 4096);
  EXPECT_EQ((*rings)[0].policy.rotation_period_ms, 123456);
  EXPECT_TRUE((*rings)[0].policy_explicit);
  EXPECT_EQ(store->LoadVersions()->size(), 2u);
}

TEST_P(MetadataStoreContractTest, UpdatesOfMissingRowsAreNotFound) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->UpdateVersion(Version("nope", 1, "aa")).code(), absl::StatusCode::kNotFound);
  Mutation m;
  m.update_rings.push_back(Ring("nope"));
  EXPECT_EQ(store->Commit(m).code(), absl::StatusCode::kNotFound);
}

// A ring update changes its policy only; what was fixed at creation stays.
TEST_P(MetadataStoreContractTest, RingUpdateChangesThePolicyOnly) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  RingRecord changed = Ring("op/id");
  changed.alg = "PS256";  // not an updatable field
  changed.policy = {1, 2, 3, 4};
  changed.policy_explicit = true;
  Mutation m;
  m.update_rings.push_back(changed);
  ASSERT_TRUE(store->Commit(m).ok());
  auto rings = store->LoadRings();
  ASSERT_TRUE(rings.ok());
  EXPECT_EQ(rings->front().alg, "ES256");
  EXPECT_EQ(rings->front().policy.prepublish_ms, 1);
  EXPECT_EQ(rings->front().policy.rotation_period_ms, 2);
  EXPECT_EQ(rings->front().policy.retain_ms, 3);
  EXPECT_EQ(rings->front().policy.destroy_delay_ms, 4);
  EXPECT_TRUE(rings->front().policy_explicit);
}

TEST_P(MetadataStoreContractTest, AuditAnchorsAreKeptPerChain) {
  {
    auto store = MustOpen();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->LoadAuditAnchor("").status().code(), absl::StatusCode::kNotFound);
    MetadataStore::AuditAnchor a{"", 12, std::string(64, 'a'), "audit-000001.jsonl", 1};
    ASSERT_TRUE(store->SaveAuditAnchor(a).ok());
    a.seq = 40;  // replaced, not added
    a.hash = std::string(64, 'b');
    a.time_ms = 5;
    ASSERT_TRUE(store->SaveAuditAnchor(a).ok());
    ASSERT_TRUE(store->SaveAuditAnchor({"r1", 3, std::string(64, 'c'), "f", 2}).ok());
  }
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  auto lone = store->LoadAuditAnchor("");
  ASSERT_TRUE(lone.ok()) << lone.status();
  EXPECT_EQ(lone->seq, 40u);
  EXPECT_EQ(lone->hash, std::string(64, 'b'));
  EXPECT_EQ(lone->file, "audit-000001.jsonl");
  EXPECT_EQ(lone->time_ms, 5);
  auto r1 = store->LoadAuditAnchor("r1");
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->seq, 3u);
  EXPECT_EQ(r1->chain, "r1");
  EXPECT_EQ(store->LoadAuditAnchor("r2").status().code(), absl::StatusCode::kNotFound);
}

// Tags are made by a software HMAC key here (the stores' logic); custodyd's key is in the token.
TEST_P(MetadataStoreContractTest, TagsVerifyAndAnEditedRowDoesNot) {
  SoftwareRecordTagger tagger("k1");
  {
    auto store = MustOpen(&tagger);
    ASSERT_NE(store, nullptr);
    RingRecord ring = Ring("op/id");
    ASSERT_TRUE(store->InsertRingWithVersion(ring, Version("op/id", 1, "aa")).ok());
    ASSERT_TRUE(store->InsertVersion(Version("op/id", 2, "bb")).ok());
    VersionRecord v = Version("op/id", 1, "aa");
    v.state = VersionState::kRetired;
    v.compromised = true;
    ASSERT_TRUE(store->UpdateVersion(v).ok());
    ring.policy.destroy_delay_ms = 9 * 24 * 3600 * 1000LL;
    Mutation m;
    m.update_rings.push_back(ring);
    ASSERT_TRUE(store->Commit(m).ok());
    auto rings = store->LoadRings();
    auto versions = store->LoadVersions();
    ASSERT_TRUE(rings.ok() && versions.ok());
    EXPECT_EQ(rings->front().tag_check, TagCheck::kValid);
    for (const VersionRecord& r : *versions) EXPECT_EQ(r.tag_check, TagCheck::kValid);
  }
  // What a database writer can do: revive the compromised version, shorten the ring's waiting
  // period, clear a tag.
  Sql(absl::StrCat("UPDATE versions SET state='ACTIVE', compromised=", shared() ? "false" : "0",
                   " WHERE version=1; UPDATE versions SET tag='' WHERE version=2; "
                   "UPDATE rings SET destroy_delay_ms=0;"));
  auto store = MustOpen(&tagger);
  ASSERT_NE(store, nullptr);
  auto rings = store->LoadRings();
  auto versions = store->LoadVersions();
  ASSERT_TRUE(rings.ok() && versions.ok());
  EXPECT_EQ(rings->front().tag_check, TagCheck::kMismatch);
  ASSERT_EQ(versions->size(), 2u);
  EXPECT_EQ((*versions)[0].tag_check, TagCheck::kMismatch);
  EXPECT_EQ((*versions)[1].tag_check, TagCheck::kMissing);
  // Another key does not vouch for them either; a store without a tagger checks nothing.
  SoftwareRecordTagger other("k2");
  auto elsewhere = MustOpen(&other);
  ASSERT_NE(elsewhere, nullptr);
  EXPECT_EQ(elsewhere->LoadVersions()->front().tag_check, TagCheck::kMismatch);
  store.reset();
  elsewhere.reset();
  auto untagged = MustOpen();
  ASSERT_NE(untagged, nullptr);
  EXPECT_EQ(untagged->LoadVersions()->front().tag_check, TagCheck::kUnchecked);
}

// Both stores' tables are exactly what the one description says, in its order.
TEST_P(MetadataStoreContractTest, TablesHaveTheDescribedColumns) {
  ASSERT_NE(MustOpen(), nullptr);
  for (const schema::Table* table :
       {&schema::RingsTable(), &schema::VersionsTable(), &schema::AnchorsTable()}) {
    auto names = backend_->ColumnNames(table->name);
    ASSERT_TRUE(names.ok()) << names.status();
    EXPECT_EQ(absl::StrJoin(*names, ","), schema::ColumnList(backend_->dialect(), *table))
        << table->name;
  }
}

TEST_P(MetadataStoreContractTest, NewerSchemaIsRefused) {
  ASSERT_NE(MustOpen(), nullptr);
  ASSERT_TRUE(backend_->MarkSchema(999).ok());
  auto store = backend_->Open(nullptr);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_NE(store.status().message().find("999"), absl::string_view::npos);
  EXPECT_NE(store.status().message().find("upgrade custodyd"), absl::string_view::npos);
}

INSTANTIATE_TEST_SUITE_P(Stores, MetadataStoreContractTest, ::testing::Values("sqlite", "postgres"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace custody::rotation
