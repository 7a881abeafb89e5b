#include "rotation/sqlite_metadata_store.h"

#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "rotation/metadata_schema.h"
#include "rotation/record_tag.h"

namespace custody::rotation {
namespace {

class MetadataStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/custody-meta-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/metadata.db";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string dir_;
  std::string path_;
};

// A database written before the certificate columns (and before numbered migrations) gets them
// on open (ALTER TABLE), keeps its rows, and stores certificates from then on.
TEST_F(MetadataStoreTest, AddsCertificateColumnsToAnOlderDatabase) {
  const std::string& path = path_;
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, R"sql(
    CREATE TABLE rings (name TEXT PRIMARY KEY, purpose TEXT NOT NULL, alg TEXT NOT NULL,
      rsa_bits INTEGER NOT NULL, allow_non_fapi INTEGER NOT NULL, create_time INTEGER NOT NULL,
      curve TEXT NOT NULL DEFAULT '', zip_max_bytes INTEGER NOT NULL DEFAULT 0,
      prepublish_ms INTEGER NOT NULL DEFAULT 3600000,
      rotation_period_ms INTEGER NOT NULL DEFAULT 0, retain_ms INTEGER NOT NULL DEFAULT 86400000,
      destroy_delay_ms INTEGER NOT NULL DEFAULT 604800000,
      policy_explicit INTEGER NOT NULL DEFAULT 0) STRICT;
    CREATE TABLE versions (ring TEXT NOT NULL REFERENCES rings(name), version INTEGER NOT NULL,
      object_id TEXT NOT NULL UNIQUE, object_label TEXT NOT NULL, kid TEXT NOT NULL,
      public_jwk TEXT NOT NULL, state TEXT NOT NULL, create_time INTEGER NOT NULL,
      activate_time INTEGER NOT NULL, publish_time INTEGER NOT NULL DEFAULT 0,
      retire_time INTEGER NOT NULL DEFAULT 0, destroy_after INTEGER NOT NULL DEFAULT 0,
      destroy_time INTEGER NOT NULL DEFAULT 0,
      previous_state TEXT NOT NULL DEFAULT 'CREATING', compromised INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (ring, version)) STRICT;
    INSERT INTO rings(name,purpose,alg,rsa_bits,allow_non_fapi,create_time)
      VALUES('op/tls','SIGN','ES256',0,0,1);
    INSERT INTO versions(ring,version,object_id,object_label,kid,public_jwk,state,create_time,
      activate_time) VALUES('op/tls',1,'aa','custody/op/tls/v1','k','{}','ACTIVE',1,2);
  )sql",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  {
    auto store = OpenSqliteMetadataStore(path);
    ASSERT_TRUE(store.ok()) << store.status();
    auto rings = (*store)->LoadRings();
    ASSERT_TRUE(rings.ok()) << rings.status();
    ASSERT_EQ(rings->size(), 1u);
    EXPECT_FALSE(rings->front().require_certificate);
    auto versions = (*store)->LoadVersions();
    ASSERT_TRUE(versions.ok()) << versions.status();
    ASSERT_EQ(versions->size(), 1u);
    EXPECT_EQ(versions->front().kid, "k");
    EXPECT_EQ(versions->front().certificate_chain, "");
    VersionRecord v = versions->front();
    v.certificate_chain = "-----BEGIN CERTIFICATE-----\n...";
    ASSERT_TRUE((*store)->UpdateVersion(v).ok());
  }
  auto store = OpenSqliteMetadataStore(path);  // the migration runs once; reopening is a no-op
  ASSERT_TRUE(store.ok()) << store.status();
  // The file now says which schema it has (numbered migrations, as the PostgreSQL store).
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* version = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &version, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(version), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(version, 0), schema::LatestVersion());
  sqlite3_finalize(version);
  sqlite3_close(db);
  auto versions = (*store)->LoadVersions();
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ(versions->front().certificate_chain, "-----BEGIN CERTIFICATE-----\n...");
}

TEST_F(MetadataStoreTest, AuditAnchorsAreKeptPerChainAndReadWithoutWriting) {
  {
    auto store = OpenSqliteMetadataStore(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ((*store)->LoadAuditAnchor("").status().code(), absl::StatusCode::kNotFound);
    MetadataStore::AuditAnchor a{"", 12, std::string(64, 'a'), "audit-000001.jsonl", 1};
    ASSERT_TRUE((*store)->SaveAuditAnchor(a).ok());
    a.seq = 40;  // replaced, not added
    a.hash = std::string(64, 'b');
    ASSERT_TRUE((*store)->SaveAuditAnchor(a).ok());
    ASSERT_TRUE((*store)->SaveAuditAnchor({"r1", 3, std::string(64, 'c'), "f", 2}).ok());
  }
  auto lone = ReadSqliteAuditAnchor(path_, "");
  ASSERT_TRUE(lone.ok()) << lone.status();
  EXPECT_EQ(lone->seq, 40u);
  EXPECT_EQ(lone->hash, std::string(64, 'b'));
  EXPECT_EQ(lone->file, "audit-000001.jsonl");
  auto r1 = ReadSqliteAuditAnchor(path_, "r1");
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->seq, 3u);
  EXPECT_EQ(ReadSqliteAuditAnchor(path_, "r2").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(ReadSqliteAuditAnchor(path_ + ".missing", "").ok());
}

TEST(RecordTagTest, CanonicalEncodingCoversEveryFieldAndTellsFieldsApart) {
  VersionRecord v;
  v.ring = "op/a";
  v.version = 1;
  const std::string base = CanonicalVersion(v);
  // Moving bytes from one field to the next changes the encoding (length prefixes).
  VersionRecord moved = v;
  moved.ring = "op/";
  moved.object_id = "a";
  EXPECT_NE(CanonicalVersion(moved), base);
  for (auto edit : std::vector<void (*)(VersionRecord&)>{
           [](VersionRecord& r) { r.version = 2; },
           [](VersionRecord& r) { r.object_id = "x"; },
           [](VersionRecord& r) { r.object_label = "x"; },
           [](VersionRecord& r) { r.kid = "x"; },
           [](VersionRecord& r) { r.public_jwk = "x"; },
           [](VersionRecord& r) { r.state = VersionState::kActive; },
           [](VersionRecord& r) { r.create_time = 1; },
           [](VersionRecord& r) { r.activate_time = 1; },
           [](VersionRecord& r) { r.publish_time = 1; },
           [](VersionRecord& r) { r.retire_time = 1; },
           [](VersionRecord& r) { r.destroy_after = 1; },
           [](VersionRecord& r) { r.destroy_time = 1; },
           [](VersionRecord& r) { r.previous_state = VersionState::kRetired; },
           [](VersionRecord& r) { r.compromised = true; },
           [](VersionRecord& r) { r.certificate_chain = "x"; },
       }) {
    VersionRecord edited = v;
    edit(edited);
    EXPECT_NE(CanonicalVersion(edited), base);
  }
  RingRecord r;
  r.name = "op/a";
  const std::string ring = CanonicalRing(r);
  RingRecord generation = r;
  generation.generation = 7;  // a concurrency counter, not trust
  EXPECT_EQ(CanonicalRing(generation), ring);
  for (auto edit : std::vector<void (*)(RingRecord&)>{
           [](RingRecord& x) { x.purpose = Purpose::kDecrypt; },
           [](RingRecord& x) { x.alg = "PS256"; },
           [](RingRecord& x) { x.rsa_bits = 2048; },
           [](RingRecord& x) { x.allow_non_fapi = true; },
           [](RingRecord& x) { x.create_time = 1; },
           [](RingRecord& x) { x.curve = "P-256"; },
           [](RingRecord& x) { x.zip_max_bytes = 1; },
           [](RingRecord& x) { x.policy.prepublish_ms = 1; },
           [](RingRecord& x) { x.policy.rotation_period_ms = 1; },
           [](RingRecord& x) { x.policy.retain_ms = 1; },
           [](RingRecord& x) { x.policy.destroy_delay_ms = 1; },
           [](RingRecord& x) { x.policy_explicit = true; },
           [](RingRecord& x) { x.require_certificate = true; },
       }) {
    RingRecord edited = r;
    edit(edited);
    EXPECT_NE(CanonicalRing(edited), ring);
  }
}

// A file that claims the latest schema but lacks one of its columns is refused at open, naming
// the column, instead of failing every read with SQLite's "no such column".
TEST_F(MetadataStoreTest, AFileClaimingTheLatestSchemaWithoutItsColumnsIsNamed) {
  const std::string& path = path_;
  ASSERT_TRUE(OpenSqliteMetadataStore(path).ok());
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "ALTER TABLE versions DROP COLUMN tag;", nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = OpenSqliteMetadataStore(path);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_NE(store.status().message().find("'versions' has no column 'tag'"), std::string::npos)
      << store.status();
}

}  // namespace
}  // namespace custody::rotation
