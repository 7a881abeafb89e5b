// The Python and Node.js clients (examples/python, examples/node) against real custodyd
// replicas on PostgreSQL (tests/testing/replica_set.h). The rings are made here with custodyctl, as
// an operator would; the language tests create nothing. Each case runs one test of
// examples/python/test_custody_client.py (checked with python3-jwcrypto) or
// examples/node/test/custody_client.test.mjs (checked with npm jose).
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"
#include "tests/testing/replica_set.h"

namespace custody::testing {
namespace {

const ::testing::Environment* const environment =
    rotation::testing::PostgresClusterEnvironment::Register();

constexpr char kSignRing[] = "lang/id-token";
constexpr char kEncRing[] = "lang/request-object";

class LanguageClientsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    replicas_ = ReplicaSet::OnTestCluster(3);
    ASSERT_NE(replicas_, nullptr);
    ASSERT_TRUE(replicas_->started()) << replicas_->logs();
    const std::string ctl = BinDir() + "/custodyctl";
    const std::string addr = "--addr=" + replicas_->at(0).address();
    CommandResult r =
        RunCommand({ctl, addr, "ring", "create", kSignRing, "--purpose=sign", "--alg=ES256"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand({ctl, addr, "ring", "create", kEncRing, "--purpose=decrypt",
                    "--alg=ECDH-ES+A128KW", "--curve=P-256"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_EQ(replicas_->WaitUntilEveryReplicaServes({kSignRing, kEncRing}), "");
  }

  std::vector<std::string> Environment(bool kill, bool rotate) {
    std::vector<std::string> env = {"CUSTODY_ADDRS=" + replicas_->addresses(),
                                    absl::StrCat("CUSTODY_SIGN_RING=", kSignRing),
                                    absl::StrCat("CUSTODY_ENC_RING=", kEncRing),
                                    "CUSTODY_PROTO_ROOT=" + SourceDir() + "/proto"};
    if (kill) env.push_back(absl::StrCat("CUSTODY_KILL_PID=", replicas_->at(0).pid()));
    if (rotate) env.push_back("CUSTODYCTL=" + BinDir() + "/custodyctl");
    return env;
  }

  // One unittest of examples/python/test_custody_client.py; fails the test with its output.
  void RunPython(const std::string& test, bool kill = false, bool rotate = false) {
    std::vector<std::string> env = Environment(kill, rotate);
    env.push_back("PYTHONPATH=" + SourceDir() + "/examples/python");
    env.push_back("PYTHONDONTWRITEBYTECODE=1");
    CommandResult r = RunCommand({"/usr/bin/python3", "-m", "unittest", "-v",
                                  "test_custody_client.CustodyClientTest." + test},
                                 "", env);
    EXPECT_EQ(r.exit_code, 0) << r.err << r.out;
    EXPECT_NE(r.err.find(" ok"), std::string::npos) << "not run: " << r.err;
  }

  // One test of examples/node/test/custody_client.test.mjs, by its exact name.
  void RunNode(const std::string& name, bool kill = false, bool rotate = false) {
    const std::string dir = SourceDir() + "/examples/node";
    ASSERT_TRUE(std::filesystem::exists(dir + "/node_modules/@grpc/grpc-js/package.json"))
        << "examples/node has no node_modules: run (cd examples/node && npm ci), as "
           "scripts/test.sh does";
    CommandResult r =
        RunCommand({"node", "--test", "--test-reporter=tap", "--test-name-pattern=^" + name + "$",
                    dir + "/test/custody_client.test.mjs"},
                   "", Environment(kill, rotate));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.out.find("# pass 1"), std::string::npos) << "not run: " << r.out << r.err;
  }

  std::unique_ptr<ReplicaSet> replicas_;
};

TEST_F(LanguageClientsTest, PythonSignsAnIdTokenThatJwcryptoVerifies) {
  RunPython("test_signs_an_id_token_that_jwcrypto_verifies");
}
TEST_F(LanguageClientsTest, PythonDecryptsAJweThatJwcryptoMade) {
  RunPython("test_decrypts_a_jwe_that_jwcrypto_made");
}
TEST_F(LanguageClientsTest, PythonFailsOverWhenAReplicaIsKilled) {
  RunPython("test_fails_over_when_a_replica_is_killed", /*kill=*/true);
}
TEST_F(LanguageClientsTest, PythonJwksCacheFollowsARotation) {
  RunPython("test_jwks_cache_follows_a_rotation", false, /*rotate=*/true);
}

TEST_F(LanguageClientsTest, NodeSignsAnIdTokenThatJoseVerifies) {
  RunNode("signs an ID token that jose verifies");
}
TEST_F(LanguageClientsTest, NodeDecryptsAJweThatJoseMade) {
  RunNode("decrypts a JWE that jose made");
}
TEST_F(LanguageClientsTest, NodeFailsOverWhenAReplicaIsKilled) {
  RunNode("fails over when a replica is killed", /*kill=*/true);
}
TEST_F(LanguageClientsTest, NodeJwksCacheFollowsARotation) {
  RunNode("the JWKS cache follows a rotation", false, /*rotate=*/true);
}

}  // namespace
}  // namespace custody::testing
