#include "rotation/metadata_schema.h"

#include <openssl/sha.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "rotation/record_tag.h"

namespace custody::rotation::schema {
namespace {

std::string Sha256Hex(const std::string& bytes) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), digest);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

// The tagged message is the one every stored tag was made over (schema 4): the description's
// columns, in order, length-prefixed, produce exactly those bytes (the digests were computed
// from the hand-written encoder the description replaced).
TEST(MetadataSchemaTest, TaggedMessagesAreThoseOfSchemaFour) {
  RingRecord r;
  r.name = "op/id";
  r.purpose = Purpose::kDecrypt;
  r.alg = "ECDH-ES+A256KW";
  r.allow_non_fapi = true;
  r.create_time = 1700000000;
  r.curve = "P-384";
  r.zip_max_bytes = 4096;
  r.policy = {1, 2, 3, 4};
  r.policy_explicit = true;
  r.require_certificate = true;
  r.generation = 99;  // not tagged
  EXPECT_EQ(Sha256Hex(CanonicalRing(r)),
            "dcee3d2c215eb2763007c9abb5ce5e3967c44d609b1ebe35cc35c0f1e1b6c901");
  VersionRecord v;
  v.ring = "op/id";
  v.version = 7;
  v.object_id = "0a0b";
  v.object_label = "custody/op/id/v7";
  v.kid = "kid-7";
  v.public_jwk = R"({"kty":"EC"})";
  v.state = VersionState::kRetired;
  v.create_time = 11;
  v.activate_time = 12;
  v.publish_time = 13;
  v.retire_time = 14;
  v.destroy_after = 15;
  v.destroy_time = 16;
  v.previous_state = VersionState::kActive;
  v.compromised = true;
  v.certificate_chain = "PEM";
  EXPECT_EQ(Sha256Hex(CanonicalVersion(v)),
            "33b5aeb1104e35647ebbe05cf8f412ef87b6bfc40ab59645d3c2e69d6e7ce22c");
}

// A column added after the tags (since > 4) enters the message only when it differs from its
// default: a row tagged before it existed still verifies; any other value is covered, and
// named, so it cannot pass for another column's.
TEST(MetadataSchemaTest, ALaterColumnIsTaggedOnlyWhenItIsNotItsDefault) {
  const Column<RingRecord> old_columns[] = {RingColumns()[0]};
  Column<RingRecord> later = RingColumns()[6];  // curve, as if migration 5 had added it
  ASSERT_STREQ(later.spec.name, "curve");
  later.spec.since = 5;
  const Column<RingRecord> new_columns[] = {RingColumns()[0], later};
  RingRecord r;
  r.name = "op/id";
  EXPECT_EQ(Canonical<RingRecord>(new_columns, "ring", r),
            Canonical<RingRecord>(old_columns, "ring", r));
  r.curve = "P-256";
  const std::string changed = Canonical<RingRecord>(new_columns, "ring", r);
  EXPECT_NE(changed, Canonical<RingRecord>(old_columns, "ring", r));
  EXPECT_TRUE(absl::StrContains(changed, "curve"));
}

TEST(MetadataSchemaTest, RowsRoundTripThroughBothDialects) {
  VersionRecord v;
  v.ring = "op/id";
  v.version = 3;
  v.object_id = "ff";
  v.state = VersionState::kDestroyScheduled;
  v.previous_state = VersionState::kRetired;
  v.compromised = true;
  v.destroy_after = 1234;
  for (Dialect d : {Dialect::kSqlite, Dialect::kPostgres}) {
    std::string tag;
    auto back = Decode(d, VersionColumns(), Encode(d, VersionColumns(), v, "the-tag"), &tag);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(CanonicalVersion(*back), CanonicalVersion(v));
    EXPECT_EQ(tag, "the-tag");
  }
  std::vector<Value> row = Encode(Dialect::kSqlite, VersionColumns(), v);
  row[6].text = "NOT-A-STATE";
  EXPECT_EQ(Decode(Dialect::kSqlite, VersionColumns(), row).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The generation column is the shared store's alone; statements bind exactly their columns.
TEST(MetadataSchemaTest, StatementsFollowTheDescription) {
  EXPECT_FALSE(absl::StrContains(ColumnList(Dialect::kSqlite, RingsTable()), "generation"));
  EXPECT_TRUE(absl::StrContains(ColumnList(Dialect::kPostgres, RingsTable()), "generation"));
  const Statement update = UpdateStatement(Dialect::kPostgres, RingsTable());
  EXPECT_EQ(update.sql,
            "UPDATE rings SET prepublish_ms=$1, rotation_period_ms=$2, retain_ms=$3, "
            "destroy_delay_ms=$4, policy_explicit=$5, tag=$6 WHERE name=$7");
  EXPECT_EQ(update.columns.size(), 7u);
  const Statement upsert = UpsertStatement(Dialect::kSqlite, AnchorsTable());
  EXPECT_EQ(upsert.sql,
            "INSERT INTO audit_anchors(chain,seq,hash,file,time_ms) VALUES (?1,?2,?3,?4,?5) ON "
            "CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, file = "
            "excluded.file, time_ms = excluded.time_ms");
  // Migration 1 creates rings and versions; 2 and 4 add columns; 3 creates the anchors.
  std::vector<MigrationStep> first = MigrationSteps(Dialect::kPostgres, 1);
  ASSERT_EQ(first.size(), 3u);
  EXPECT_TRUE(absl::StrContains(first[0].sql, "generation bigint NOT NULL DEFAULT 0"));
  EXPECT_TRUE(absl::StrContains(first[2].sql, "versions_one_active"));
  std::vector<MigrationStep> fourth = MigrationSteps(Dialect::kSqlite, 4);
  ASSERT_EQ(fourth.size(), 2u);
  EXPECT_EQ(fourth[0].sql, "ALTER TABLE rings ADD COLUMN tag TEXT NOT NULL DEFAULT ''");
  EXPECT_EQ(MigrationSteps(Dialect::kSqlite, 3).front().kind, MigrationStep::kCreateTable);
  EXPECT_EQ(LatestVersion(), 4);
}

}  // namespace
}  // namespace custody::rotation::schema
