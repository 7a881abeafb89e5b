#include "rotation/metadata_store.h"

#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <string>

#include "gtest/gtest.h"
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

  static RingRecord Ring(const std::string& name) {
    RingRecord r;
    r.name = name;
    r.alg = "ES256";
    r.create_time = 1700000000;
    return r;
  }
  static VersionRecord Version(const std::string& ring, uint32_t v, const std::string& id) {
    VersionRecord r;
    r.ring = ring;
    r.version = v;
    r.object_id = id;
    r.object_label = "custody/" + ring + "/v" + std::to_string(v);
    r.create_time = 1700000000;
    return r;
  }

  std::string dir_;
  std::string path_;
};

TEST_F(MetadataStoreTest, RingAndVersionSurviveReopen) {
  {
    auto store = MetadataStore::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    ASSERT_TRUE((*store)->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
    VersionRecord v = Version("op/id", 1, "aa");
    v.state = VersionState::kActive;
    v.kid = "kid-1";
    v.public_jwk = R"({"kty":"EC"})";
    v.activate_time = 1700000001;
    ASSERT_TRUE((*store)->UpdateVersion(v).ok());
  }
  auto store = MetadataStore::Open(path_);
  ASSERT_TRUE(store.ok());
  auto rings = (*store)->LoadRings();
  ASSERT_TRUE(rings.ok());
  ASSERT_EQ(rings->size(), 1u);
  EXPECT_EQ((*rings)[0].name, "op/id");
  EXPECT_EQ((*rings)[0].alg, "ES256");
  auto versions = (*store)->LoadVersions();
  ASSERT_TRUE(versions.ok());
  ASSERT_EQ(versions->size(), 1u);
  EXPECT_EQ((*versions)[0].state, VersionState::kActive);
  EXPECT_EQ((*versions)[0].kid, "kid-1");
  EXPECT_EQ((*versions)[0].public_jwk, R"({"kty":"EC"})");
  EXPECT_EQ((*versions)[0].activate_time, 1700000001);
}

TEST_F(MetadataStoreTest, DuplicateRingIsAlreadyExistsAndChangesNothing) {
  auto store = MetadataStore::Open(path_);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  absl::Status s = (*store)->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "bb"));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  auto versions = (*store)->LoadVersions();
  ASSERT_TRUE(versions.ok());
  ASSERT_EQ(versions->size(), 1u);
  EXPECT_EQ((*versions)[0].object_id, "aa");
}

TEST_F(MetadataStoreTest, DeleteLastVersionRemovesRing) {
  auto store = MetadataStore::Open(path_);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  ASSERT_TRUE((*store)->DeleteVersion("op/id", 1).ok());
  EXPECT_TRUE((*store)->LoadRings()->empty());
  EXPECT_TRUE((*store)->LoadVersions()->empty());
}

TEST_F(MetadataStoreTest, FurtherVersionsNeedAnExistingRingAndFreeNumbers) {
  auto store = MetadataStore::Open(path_);
  ASSERT_TRUE(store.ok());
  RingRecord ring = Ring("enc/x");
  ring.purpose = Purpose::kDecrypt;
  ring.alg = "ECDH-ES";
  ring.curve = "P-384";
  ring.zip_max_bytes = 4096;
  ASSERT_TRUE((*store)->InsertRingWithVersion(ring, Version("enc/x", 1, "aa")).ok());
  EXPECT_TRUE((*store)->InsertVersion(Version("enc/x", 2, "bb")).ok());
  EXPECT_EQ((*store)->InsertVersion(Version("enc/x", 2, "cc")).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ((*store)->InsertVersion(Version("enc/x", 3, "aa")).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ((*store)->InsertVersion(Version("nope", 1, "dd")).code(), absl::StatusCode::kNotFound);
  auto rings = (*store)->LoadRings();
  ASSERT_TRUE(rings.ok());
  EXPECT_EQ((*rings)[0].curve, "P-384");
  EXPECT_EQ((*rings)[0].zip_max_bytes, 4096);
  EXPECT_EQ((*store)->LoadVersions()->size(), 2u);
}

TEST_F(MetadataStoreTest, UpdateOfMissingVersionIsNotFound) {
  auto store = MetadataStore::Open(path_);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->UpdateVersion(Version("nope", 1, "aa")).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace custody::rotation

namespace custody::rotation {
namespace {

// A database written before the certificate columns existed gets them on open (ALTER TABLE),
// keeps its rows, and stores certificates from then on.
TEST(MetadataStoreMigrationTest, AddsCertificateColumnsToAnOlderDatabase) {
  char tmpl[] = "/tmp/custody-meta-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl, path = dir + "/metadata.db";
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
    auto store = MetadataStore::Open(path);
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
  auto store = MetadataStore::Open(path);  // the migration runs once; reopening is a no-op
  ASSERT_TRUE(store.ok()) << store.status();
  auto versions = (*store)->LoadVersions();
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ(versions->front().certificate_chain, "-----BEGIN CERTIFICATE-----\n...");
  std::filesystem::remove_all(dir);
}

TEST_F(MetadataStoreTest, AuditAnchorsAreKeptPerChainAndReadWithoutWriting) {
  {
    auto store = MetadataStore::Open(path_);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ((*store)->LoadAuditAnchor("").status().code(), absl::StatusCode::kNotFound);
    MetadataStore::AuditAnchor a{"", 12, std::string(64, 'a'), "audit-000001.jsonl", 1};
    ASSERT_TRUE((*store)->SaveAuditAnchor(a).ok());
    a.seq = 40;  // replaced, not added
    a.hash = std::string(64, 'b');
    ASSERT_TRUE((*store)->SaveAuditAnchor(a).ok());
    ASSERT_TRUE((*store)->SaveAuditAnchor({"r1", 3, std::string(64, 'c'), "f", 2}).ok());
  }
  auto lone = MetadataStore::ReadAuditAnchor(path_, "");
  ASSERT_TRUE(lone.ok()) << lone.status();
  EXPECT_EQ(lone->seq, 40u);
  EXPECT_EQ(lone->hash, std::string(64, 'b'));
  EXPECT_EQ(lone->file, "audit-000001.jsonl");
  auto r1 = MetadataStore::ReadAuditAnchor(path_, "r1");
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->seq, 3u);
  EXPECT_EQ(MetadataStore::ReadAuditAnchor(path_, "r2").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(MetadataStore::ReadAuditAnchor(path_ + ".missing", "").ok());
}

// Tags are made by a software HMAC key here (the stores' logic); custodyd's key is in the token.
TEST_F(MetadataStoreTest, TagsVerifyAndAnEditedRowDoesNot) {
  SoftwareRecordTagger tagger("k1");
  {
    auto store = MetadataStore::Open(path_, &tagger);
    ASSERT_TRUE(store.ok()) << store.status();
    RingRecord ring = Ring("op/id");
    ASSERT_TRUE((*store)->InsertRingWithVersion(ring, Version("op/id", 1, "aa")).ok());
    ASSERT_TRUE((*store)->InsertVersion(Version("op/id", 2, "bb")).ok());
    VersionRecord v = Version("op/id", 1, "aa");
    v.state = VersionState::kRetired;
    v.compromised = true;
    ASSERT_TRUE((*store)->UpdateVersion(v).ok());
    ring.policy.destroy_delay_ms = 9 * 24 * 3600 * 1000LL;
    Mutation m;
    m.update_rings.push_back(ring);
    ASSERT_TRUE((*store)->Commit(m).ok());
    auto rings = (*store)->LoadRings();
    auto versions = (*store)->LoadVersions();
    ASSERT_TRUE(rings.ok() && versions.ok());
    EXPECT_EQ(rings->front().tag_check, TagCheck::kValid);
    for (const VersionRecord& r : *versions) EXPECT_EQ(r.tag_check, TagCheck::kValid);
  }
  // What a database writer can do: revive the compromised version, shorten the ring's waiting
  // period, clear a tag.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "UPDATE versions SET state='ACTIVE', compromised=0 WHERE version=1;"
                         "UPDATE versions SET tag='' WHERE version=2;"
                         "UPDATE rings SET destroy_delay_ms=0;",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = MetadataStore::Open(path_, &tagger);
  ASSERT_TRUE(store.ok());
  auto rings = (*store)->LoadRings();
  auto versions = (*store)->LoadVersions();
  ASSERT_TRUE(rings.ok() && versions.ok());
  EXPECT_EQ(rings->front().tag_check, TagCheck::kMismatch);
  ASSERT_EQ(versions->size(), 2u);
  EXPECT_EQ((*versions)[0].tag_check, TagCheck::kMismatch);
  EXPECT_EQ((*versions)[1].tag_check, TagCheck::kMissing);
  // Another key does not vouch for them either; a store without a tagger checks nothing.
  SoftwareRecordTagger other("k2");
  auto elsewhere = MetadataStore::Open(path_, &other);
  ASSERT_TRUE(elsewhere.ok());
  versions = (*elsewhere)->LoadVersions();
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ((*versions)[0].tag_check, TagCheck::kMismatch);
  auto untagged = MetadataStore::Open(path_);
  ASSERT_TRUE(untagged.ok());
  versions = (*untagged)->LoadVersions();
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ((*versions)[0].tag_check, TagCheck::kUnchecked);
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

}  // namespace
}  // namespace custody::rotation
