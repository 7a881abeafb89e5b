// Metadata the token vouches for (issue 28): every ring and version record carries a tag made by
// the token's metadata tag key (server/keys/metadata_tag_key.h). These tests edit metadata.db with
// sqlite3 as someone with write access to it (and not to the token) would, and check that the
// real custodyd refuses each edited record at load: nothing edited is published or signs, and
// the log, GetKeyRing/ListKeyRings and /metrics say so. The replica case (PostgreSQL, psql) is in
// replica_integration_test.cc.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/harness.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

grpc::Status CreateRing(Custodyd& d, const std::string& name, v1::KeyRing* ring) {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(v1::SIGN);
  req.set_alg("ES256");
  return custody::testing::CreateRing(d, req, ring);
}

grpc::Status Sign(Custodyd& d, const std::string& ring, v1::SignJwsResponse* out) {
  v1::SignJwsRequest req;
  req.set_ring(ring);
  req.set_payload("{\"sub\":\"alice\"}");
  return SignJws(d, req, out);
}

std::string Metrics(int port) {
  return RunCommand({"curl", "-s", absl::StrCat("http://127.0.0.1:", port, "/metrics")}).out;
}

void Sql(const std::string& state, const std::string& sql) {
  CommandResult r = RunCommand({"sqlite3", state + "/metadata.db", sql});
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

// An attacker's own P-256 key (RFC 7517 appendix A.1), with a kid of their choosing.
constexpr char kAttackerJwk[] =
    R"({"crv":"P-256","kty":"EC","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",)"
    R"("y":"4Etl6SRW2YilurN5n_3W5TTNg_yQCSN_bIEO4Ip4oDU"})";
constexpr char kAttackerX[] = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";

// With custodyd stopped, three rings' rows are edited in metadata.db: a compromised version set
// back to ACTIVE (and its successor RETIRED), a version's public_jwk and kid replaced with an
// attacker's, a ring's destroy_delay shortened to 0 (with its scheduled version due at once). A
// fourth ring is left alone. At the restart each edited record is refused.
TEST(MetadataTagTest, RowsEditedInMetadataDbAreRefusedAtLoad) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  const int metrics_port = FreePort();
  const std::vector<std::string> flags = {
      absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port)};
  std::string compromised_kid, swapped_kid, untouched_kid;
  {
    Custodyd d(state, flags);
    ASSERT_TRUE(d.started()) << d.log();
    EXPECT_NE(d.log().find("\"event\":\"metadata.tag_key\""), std::string::npos) << d.log();
    v1::KeyRing ring;
    for (const char* name : {"op/revived", "op/swapped", "op/policy", "op/untouched"}) {
      ASSERT_TRUE(CreateRing(d, name, &ring).ok()) << name;
    }
    ASSERT_TRUE(GetRing(d, "op/revived", &ring).ok());
    compromised_kid = ring.versions(0).kid();
    v1::CompromiseKeyVersionRequest compromise;
    compromise.set_ring("op/revived");
    compromise.set_version(1);
    v1::KeyRing after;
    grpc::ClientContext ctx;
    grpc::Status s = d.admin().CompromiseKeyVersion(&ctx, compromise, &after);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_TRUE(GetRing(d, "op/swapped", &ring).ok());
    swapped_kid = ring.versions(0).kid();
    ASSERT_TRUE(GetRing(d, "op/untouched", &ring).ok());
    untouched_kid = ring.versions(0).kid();
    EXPECT_EQ(Jwks(d).find(compromised_kid), std::string::npos);
    d.Stop();
  }
  Sql(state,
      "UPDATE versions SET state='ACTIVE', compromised=0 WHERE ring='op/revived' AND version=1;"
      "UPDATE versions SET state='RETIRED' WHERE ring='op/revived' AND version=2;"
      "UPDATE versions SET public_jwk='" +
          std::string(kAttackerJwk) +
          "', kid='attacker-kid' WHERE ring='op/swapped';"
          "UPDATE rings SET destroy_delay_ms=0 WHERE name='op/policy';");

  Custodyd d(state, flags);
  ASSERT_TRUE(d.started()) << d.log();
  const std::string jwks = Jwks(d);
  EXPECT_EQ(jwks.find(compromised_kid), std::string::npos) << jwks;
  EXPECT_EQ(jwks.find("attacker-kid"), std::string::npos) << jwks;
  EXPECT_EQ(jwks.find(kAttackerX), std::string::npos) << jwks;
  EXPECT_NE(jwks.find(untouched_kid), std::string::npos) << jwks;

  // The revived version neither signs nor is shown trusted; its ring signs with nothing.
  v1::SignJwsResponse signed_jws;
  grpc::Status s = Sign(d, "op/revived", &signed_jws);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("tag does not verify"), std::string::npos) << s.error_message();
  v1::KeyRing ring;
  ASSERT_TRUE(GetRing(d, "op/revived", &ring).ok());
  ASSERT_GE(ring.versions_size(), 2);
  EXPECT_TRUE(ring.versions(0).metadata_tag_mismatch());
  EXPECT_TRUE(ring.versions(1).metadata_tag_mismatch());
  // The attacker's key is neither published nor used.
  s = Sign(d, "op/swapped", &signed_jws);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  v1::GetPublicKeyRequest pub_req;
  pub_req.set_ring("op/swapped");
  pub_req.set_version(1);
  v1::PublicKey pub;
  grpc::ClientContext pub_ctx;
  EXPECT_EQ(d.signer().GetPublicKey(&pub_ctx, pub_req, &pub).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(GetRing(d, "op/swapped", &ring).ok());
  EXPECT_TRUE(ring.versions(0).metadata_tag_mismatch());
  // The ring with the shortened policy is not served at all.
  s = GetRing(d, "op/policy", &ring);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("tag does not verify"), std::string::npos) << s.error_message();
  s = Sign(d, "op/policy", &signed_jws);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  v1::ListKeyRingsResponse listed;
  grpc::ClientContext list_ctx;
  ASSERT_TRUE(d.admin().ListKeyRings(&list_ctx, v1::ListKeyRingsRequest(), &listed).ok());
  ASSERT_EQ(listed.untrusted_rings_size(), 1);
  EXPECT_EQ(listed.untrusted_rings(0), "op/policy");
  // The untouched ring signs as before.
  s = Sign(d, "op/untouched", &signed_jws);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(signed_jws.kid(), untouched_kid);

  const std::string log = d.log();
  EXPECT_NE(log.find("\"event\":\"metadata.tag_mismatch\""), std::string::npos) << log;
  EXPECT_NE(log.find("\"record\":\"ring\",\"ring\":\"op/policy\""), std::string::npos) << log;
  EXPECT_EQ(log.find("version.destroyed"), std::string::npos) << log;
  EXPECT_EQ(log.find(kAttackerX), std::string::npos);  // the record's contents are not logged
  const std::string metrics = Metrics(metrics_port);
  // op/revived v1 and v2, op/swapped v1; op/policy.
  EXPECT_NE(metrics.find("\ncustody_key_versions_untrusted 3\n"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\ncustody_rings_untrusted 1\n"), std::string::npos) << metrics;
}

// State written before tags existed (no tag columns, no tag key in the token) is adopted once at
// the first start with tags, with a log line; after that a record without a tag is refused until
// an operator checks it and starts once with --adopt_untagged_metadata.
TEST(MetadataTagTest, StateFromBeforeTagsIsAdoptedOnceThenUntaggedRowsAreRefused) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  std::string kid;
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    v1::KeyRing ring;
    ASSERT_TRUE(CreateRing(d, "op/old", &ring).ok());
    kid = ring.versions(0).kid();
    d.Stop();
  }
  // The schema and the token of the previous release: no tag columns, no tag key, and a file
  // from before numbered migrations (user_version 0).
  Sql(state,
      "ALTER TABLE rings DROP COLUMN tag; ALTER TABLE versions DROP COLUMN tag; "
      "PRAGMA user_version=0;");
  CommandResult deleted = RunCommand({"pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so",
                                      "--login", "--pin", "env:CUSTODY_TEST_PIN", "--delete-object",
                                      "--type", "secrkey", "--label", "custody-metadata-tag"},
                                     "",
                                     {"SOFTHSM2_CONF=" + state + "/softhsm2.conf",
                                      "CUSTODY_TEST_PIN=" + ReadFileOrDie(state + "/pin")});
  ASSERT_EQ(deleted.exit_code, 0) << deleted.out << deleted.err;

  size_t seen = 0;
  auto new_log = [&](Custodyd& d) {
    std::string all = d.log();
    std::string fresh = all.substr(seen);
    seen = all.size();
    return fresh;
  };
  auto signs_with_old_kid = [&](Custodyd& d) {
    v1::SignJwsResponse signed_jws;
    grpc::Status s = Sign(d, "op/old", &signed_jws);
    return s.ok() && signed_jws.kid() == kid;
  };
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    const std::string log = new_log(d);
    EXPECT_NE(log.find("\"event\":\"metadata.tags_adopted\""), std::string::npos) << log;
    EXPECT_NE(log.find("\"rings\":\"1\",\"versions\":\"1\""), std::string::npos) << log;
    EXPECT_TRUE(signs_with_old_kid(d));
    d.Stop();
  }
  {
    Custodyd d(state);  // adopted once: nothing to adopt now
    ASSERT_TRUE(d.started()) << d.log();
    const std::string log = new_log(d);
    EXPECT_EQ(log.find("metadata.tags_adopted"), std::string::npos) << log;
    EXPECT_EQ(log.find("metadata.tag_mismatch"), std::string::npos) << log;
    EXPECT_TRUE(signs_with_old_kid(d));
    d.Stop();
  }
  // Clearing a tag (as an attacker who hopes for another adoption would) is a refusal now.
  Sql(state, "UPDATE versions SET tag='';");
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    const std::string log = new_log(d);
    EXPECT_NE(log.find("\"problem\":\"no tag\""), std::string::npos) << log;
    EXPECT_EQ(log.find("metadata.tags_adopted"), std::string::npos) << log;
    EXPECT_FALSE(signs_with_old_kid(d));
    d.Stop();
  }
  // The operator's explicit adoption after checking the row.
  {
    Custodyd d(state, {"--adopt_untagged_metadata"});
    ASSERT_TRUE(d.started()) << d.log();
    const std::string log = new_log(d);
    EXPECT_NE(log.find("\"rings\":\"0\",\"versions\":\"1\""), std::string::npos) << log;
    EXPECT_TRUE(signs_with_old_kid(d));
    d.Stop();
  }
}

// A replay: the compromised version's row from before the compromise (with its tag, which still
// verifies) is put back. The ring's newer ACTIVE version shows it is an earlier row: it is out of
// service, and the ring signs with the newer version. (A replay of every row of the ring to an
// earlier consistent state is the limit design.md states.)
TEST(MetadataTagTest, EarlierActiveRowPutBackIsRefused) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  std::string kid1;
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    v1::KeyRing ring;
    ASSERT_TRUE(CreateRing(d, "op/replay", &ring).ok());
    kid1 = ring.versions(0).kid();
    d.Stop();
  }
  Sql(state, "CREATE TABLE saved AS SELECT * FROM versions WHERE ring='op/replay';");
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    v1::CompromiseKeyVersionRequest compromise;
    compromise.set_ring("op/replay");
    compromise.set_version(1);
    v1::KeyRing after;
    grpc::ClientContext ctx;
    grpc::Status s = d.admin().CompromiseKeyVersion(&ctx, compromise, &after);
    ASSERT_TRUE(s.ok()) << s.error_message();
    d.Stop();
  }
  Sql(state,
      "DELETE FROM versions WHERE ring='op/replay' AND version=1;"
      "INSERT INTO versions SELECT * FROM saved;");
  Custodyd d(state);
  ASSERT_TRUE(d.started()) << d.log();
  const std::string jwks = Jwks(d);
  EXPECT_EQ(jwks.find(kid1), std::string::npos) << jwks;
  v1::SignJwsResponse signed_jws;
  grpc::Status s = Sign(d, "op/replay", &signed_jws);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_NE(signed_jws.kid(), kid1);
  v1::KeyRing ring;
  ASSERT_TRUE(GetRing(d, "op/replay", &ring).ok());
  EXPECT_TRUE(ring.versions(0).metadata_tag_mismatch());
  EXPECT_FALSE(ring.versions(1).metadata_tag_mismatch());
  EXPECT_NE(d.log().find("\"event\":\"metadata.replayed_row\""), std::string::npos) << d.log();
  EXPECT_EQ(d.log().find("version.destroyed"), std::string::npos);
}

}  // namespace
}  // namespace custody::testing
