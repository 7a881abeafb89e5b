// custodyd on PostgreSQL: the real custodyd binary with --metadata=postgresql://... on a
// throw-away PostgreSQL 15 cluster (rotation/testing/postgres_cluster.h), a real SoftHSM2
// token, real gRPC. Signatures are checked with tests/independent_jws.h (OpenSSL EVP, not
// custody's jose/).
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/harness.h"
#include "tests/independent_jws.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;

rotation::testing::PostgresCluster* cluster = nullptr;

class ClusterEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    auto started = rotation::testing::PostgresCluster::Start();
    ASSERT_TRUE(started.ok()) << started.status();
    cluster_ = *std::move(started);
    cluster = cluster_.get();
  }
  void TearDown() override {
    cluster = nullptr;
    cluster_.reset();
  }

 private:
  std::unique_ptr<rotation::testing::PostgresCluster> cluster_;
};

::testing::Environment* const environment =
    ::testing::AddGlobalTestEnvironment(new ClusterEnvironment);

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds timeout = 10s) {
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

class ReplicaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(cluster, nullptr);
    static int n = 0;
    db_ = absl::StrCat("r", getpid(), "_", ++n);
    ASSERT_TRUE(cluster->CreateDatabase(db_).ok());
  }
  std::vector<std::string> MetadataFlags() const {
    return {"--metadata=" + cluster->Uri(db_),
            "--metadata_password_file=" + cluster->password_file()};
  }

  static grpc::Status CreateEs256(Custodyd& d, const std::string& name, v1::KeyRing* out) {
    v1::CreateKeyRingRequest req;
    req.set_name(name);
    req.set_purpose(v1::SIGN);
    req.set_alg("ES256");
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    return d.admin().CreateKeyRing(&ctx, req, out);
  }
  static grpc::Status Sign(Custodyd& d, const std::string& ring, const std::string& payload,
                           v1::SignJwsResponse* out) {
    v1::SignJwsRequest req;
    req.set_ring(ring);
    req.set_payload(payload);
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    return d.signer().SignJws(&ctx, req, out);
  }
  static std::string Jwks(Custodyd& d) {
    v1::GetJwksRequest req;
    v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Status s = d.signer().GetJwks(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.jwks();
  }

  std::string db_;
};

TEST_F(ReplicaTest, CustodydOnPostgresKeepsRingsAcrossRestart) {
  TempDir dir;
  std::string kid;
  {
    Custodyd d(dir.path(), MetadataFlags());
    ASSERT_TRUE(d.started()) << d.log();
    EXPECT_NE(d.log().find("\"store\":\"postgresql host="), std::string::npos) << d.log();
    v1::KeyRing ring;
    grpc::Status s = CreateEs256(d, "op/id-token", &ring);
    ASSERT_TRUE(s.ok()) << s.error_message();
    kid = ring.versions(0).kid();
    v1::SignJwsResponse signed_jws;
    s = Sign(d, "op/id-token", "hello", &signed_jws);
    ASSERT_TRUE(s.ok()) << s.error_message();
    std::string error;
    JwsKeys keys = JwsKeysOf(Jwks(d), &error);
    ASSERT_EQ(error, "");
    std::string signed_kid;
    EXPECT_EQ(VerifyJws(keys, signed_jws.jws(), &signed_kid), "");
    EXPECT_EQ(signed_kid, kid);
    d.Stop();
    EXPECT_EQ(d.log().find(cluster->password()), std::string::npos);
  }
  // The rows are in PostgreSQL, not in a file under the state directory.
  EXPECT_EQ(access((dir.path() + "/metadata.db").c_str(), F_OK), -1);
  auto rows = cluster->Psql(db_, "SELECT name, state, kid FROM rings JOIN versions ON ring = name");
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_EQ(*rows, "op/id-token|ACTIVE|" + kid + "\n");
  Custodyd again(dir.path(), MetadataFlags());
  ASSERT_TRUE(again.started()) << again.log();
  v1::SignJwsResponse signed_jws;
  grpc::Status s = Sign(again, "op/id-token", "again", &signed_jws);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(signed_jws.kid(), kid);
}

TEST_F(ReplicaTest, PasswordOnTheCommandLineIsRefusedWithoutEchoingIt) {
  TempDir dir;
  std::string uri = cluster->Uri(db_);
  uri.insert(uri.find('@'), ":" + cluster->password());
  CommandResult r = RunCommand({BinDir() + "/custodyd", "--state_dir=" + dir.path(),
                                "--listen=unix:" + dir.path() + "/s.sock", "--metadata=" + uri});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("carries a password"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find(cluster->password()), std::string::npos) << r.err;
}

TEST_F(ReplicaTest, ConninfoFileAndPasswordFromEnvironment) {
  TempDir dir;
  const std::string conninfo = dir.path() + "/metadata.conninfo";
  WriteFileOrDie(conninfo, cluster->Conninfo(db_) + "\n");
  Custodyd::Environment env{{"CUSTODY_METADATA_PASSWORD=" + cluster->password()}};
  Custodyd d(dir.path(), {"--metadata=" + conninfo}, env);
  ASSERT_TRUE(d.started()) << d.log();
  v1::KeyRing ring;
  grpc::Status s = CreateEs256(d, "a/b", &ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(d.log().find(cluster->password()), std::string::npos);
}

}  // namespace
}  // namespace custody::testing
