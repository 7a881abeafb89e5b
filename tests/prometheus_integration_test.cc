// custodyd's /metrics scraped by a real Prometheus (Debian's prometheus 2.42, started by the
// test on loopback): custodyd runs on the fault-injecting PKCS#11 module (forwarding to
// SoftHSM2, driven through its control file as in fault_integration_test), the test makes a
// known number of signing and decryption calls and one call during an injected CKR_DEVICE_ERROR,
// and then asks Prometheus, over its HTTP query API, PromQL questions whose answers it knows:
// how many sign and decrypt calls were made, that the failed one is counted UNAVAILABLE, that
// the token errors are counted by Cryptoki function and CKR, and that the target is up and
// serving. custodyd's page is also checked by Prometheus's own parser (`promtool check metrics`).
// The alert rules in deploy/prometheus/alerts.yml are loaded into the same Prometheus, and the
// HSM error alert (no `for`) must fire.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/jwe_encryption.h"
#include "common/secret.h"
#include "gtest/gtest.h"
#include "jose/json.h"
#include "pkcs11/testing/softhsm_testing.h"
#include "pkcs11/token.h"
#include "tests/testing/harness.h"
#include "tests/testing/prometheus_testing.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;

constexpr char kFaultModule[] = CUSTODY_FAULT_MODULE;
constexpr char kUserPin[] = "prom-user-pin-1234";
constexpr char kSoPin[] = "prom-so-pin-5678";
constexpr int kSignCalls = 25;
constexpr int kDecryptCalls = 7;

class PrometheusIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/usr/bin/prometheus", X_OK) != 0) {
      GTEST_SKIP() << "Debian's prometheus is not installed (scripts/deps.sh installs it)";
    }
    auto hsm = pkcs11::TemporarySoftHsm::Create();
    ASSERT_TRUE(hsm.ok()) << hsm.status();
    softhsm_ = std::move(*hsm);
    ASSERT_TRUE(pkcs11::Token::InitializeToken(pkcs11::TemporarySoftHsm::ModulePath(), "prom",
                                               Secret(kSoPin), Secret(kUserPin))
                    .ok());
  }

  // Writes the control file (under a new seq) and waits for custodyd's module to ack it.
  bool Control(const std::string& commands) {
    const std::string content = absl::StrCat("seq ", ++seq_, "\n", commands, "\n");
    WriteFileOrDie(control_ + ".new", content);
    std::filesystem::rename(control_ + ".new", control_);
    for (int i = 0; i < 500; ++i) {
      if (ReadFileOrDie(control_ + ".ack").rfind(absl::StrCat("seq ", seq_, "\n"), 0) == 0) {
        return true;
      }
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  TempDir dir_;
  std::unique_ptr<pkcs11::TemporarySoftHsm> softhsm_;
  std::string control_ = dir_.path() + "/fault.ctl";
  int seq_ = 0;
};

TEST_F(PrometheusIntegrationTest, PromQlCountsTheCallsAndHsmErrorsCustodydServed) {
  const std::string pin_file = dir_.path() + "/pin";
  WriteFileOrDie(pin_file, kUserPin);
  std::filesystem::permissions(pin_file, std::filesystem::perms::owner_read);
  WriteFileOrDie(control_, "");
  const int metrics_port = FreePort();
  Custodyd d(
      dir_.path() + "/state",
      {std::string("--pkcs11_module=") + kFaultModule, "--token_label=prom",
       "--pin_file=" + pin_file, absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port)},
      Custodyd::Environment{{"SOFTHSM2_CONF=" + softhsm_->dir() + "/softhsm2.conf",
                             "CUSTODY_FAULT_REAL_MODULE=" + pkcs11::TemporarySoftHsm::ModulePath(),
                             "CUSTODY_FAULT_CONTROL=" + control_}});
  ASSERT_TRUE(d.started()) << d.log();

  // Prometheus, scraping custodyd every second and evaluating the example alert rules.
  Prometheus prometheus(dir_.path(), {metrics_port});

  // Known traffic: signatures, decryptions, then one signature during a device error.
  for (const auto& [name, purpose, alg] :
       {std::tuple{"prom/sign", v1::SIGN, "ES256"}, {"prom/dec", v1::DECRYPT, "ECDH-ES+A256KW"}}) {
    v1::CreateKeyRingRequest req;
    req.set_name(name);
    req.set_purpose(purpose);
    req.set_alg(alg);
    v1::KeyRing ring;
    grpc::ClientContext ctx;
    ASSERT_TRUE(d.admin().CreateKeyRing(&ctx, req, &ring).ok()) << name;
  }
  ASSERT_TRUE(Control("reset"));
  for (int i = 0; i < kSignCalls; ++i) {
    v1::SignJwsRequest req;
    req.set_ring("prom/sign");
    req.set_payload(absl::StrCat("{\"n\":", i, "}"));
    v1::SignJwsResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(d.signer().SignJws(&ctx, req, &resp).ok());
  }
  std::string jwks;
  {
    v1::GetJwksRequest req;
    req.add_rings("prom/dec");
    v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(d.signer().GetJwks(&ctx, req, &resp).ok());
    jwks = resp.jwks();
  }
  for (int i = 0; i < kDecryptCalls; ++i) {
    auto jwe = client::EncryptToJwks(absl::StrCat("secret ", i), jwks);
    ASSERT_TRUE(jwe.ok()) << jwe.status();
    v1::DecryptJweRequest req;
    req.set_ring("prom/dec");
    req.set_jwe(*jwe);
    v1::DecryptJweResponse resp;
    grpc::ClientContext ctx;
    grpc::Status status = d.signer().DecryptJwe(&ctx, req, &resp);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(resp.plaintext(), absl::StrCat("secret ", i));
  }
  // The attempt and its retry after the recovery both fail: UNAVAILABLE naming the CKR.
  ASSERT_TRUE(Control("inject C_Sign CKR_DEVICE_ERROR 2"));
  {
    v1::SignJwsRequest req;
    req.set_ring("prom/sign");
    req.set_payload("{}");
    v1::SignJwsResponse resp;
    grpc::ClientContext ctx;
    grpc::Status status = d.signer().SignJws(&ctx, req, &resp);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
    EXPECT_NE(status.error_message().find("CKR_DEVICE_ERROR"), std::string::npos);
  }
  ASSERT_TRUE(Control("reset"));

  // The probe command of deploy/kubernetes (grpc.health.v1 through custodyctl).
  CommandResult health = RunCommand({BinDir() + "/custodyctl", "--addr=" + d.address(), "health"});
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_EQ(health.out, "SERVING\n");

  // custodyd's page, as Prometheus's own linter reads it.
  long http = 0;
  const std::string page =
      HttpGet(absl::StrCat("http://127.0.0.1:", metrics_port, "/metrics"), &http);
  ASSERT_EQ(http, 200);
  CommandResult lint = RunCommand({"/usr/bin/promtool", "check", "metrics"}, page);
  EXPECT_EQ(lint.exit_code, 0) << lint.out << lint.err;

  ASSERT_TRUE(prometheus.running()) << prometheus.log();
  // What Prometheus scraped.
  EXPECT_EQ(prometheus.QueryUntil("up{job=\"custody\"}", "1"), "1") << prometheus.log();
  EXPECT_EQ(prometheus.QueryUntil("sum(custody_requests_total{operation=\"sign\"})",
                                  absl::StrCat(kSignCalls + 1)),
            absl::StrCat(kSignCalls + 1));
  EXPECT_EQ(
      prometheus.QueryUntil("sum(custody_requests_total{operation=\"sign\",ring=\"prom/sign\","
                            "code=\"OK\"})",
                            absl::StrCat(kSignCalls)),
      absl::StrCat(kSignCalls));
  EXPECT_EQ(prometheus.QueryUntil("sum(custody_requests_total{code=\"UNAVAILABLE\"})", "1"), "1");
  EXPECT_EQ(prometheus.QueryUntil("sum(custody_requests_total{operation=\"decrypt\",code=\"OK\"})",
                                  absl::StrCat(kDecryptCalls)),
            absl::StrCat(kDecryptCalls));
  EXPECT_EQ(prometheus.QueryUntil(
                "custody_hsm_errors_total{function=\"C_Sign\",ckr=\"CKR_DEVICE_ERROR\"}", "2"),
            "2");
  EXPECT_EQ(prometheus.QueryUntil("custody_hsm_retries_total", "1"), "1");
  // The HSM's operation durations are a histogram: every sign call is in the +Inf bucket, none
  // took over 10 s, and a quantile can be asked of it.
  const std::string hsm_signs =
      prometheus.QueryUntil("custody_hsm_operations_total{operation=\"sign\"}", "", 0);
  EXPECT_FALSE(hsm_signs.empty());
  EXPECT_EQ(prometheus.QueryUntil(
                "custody_hsm_operation_duration_seconds_bucket{operation=\"sign\",le=\"+Inf\"}",
                hsm_signs),
            hsm_signs);
  EXPECT_EQ(
      prometheus.QueryUntil(
          "custody_hsm_operation_duration_seconds_bucket{operation=\"sign\",le=\"10\"}", hsm_signs),
      hsm_signs);
  const std::string p99 = prometheus.QueryUntil(
      "histogram_quantile(0.99, custody_hsm_operation_duration_seconds_bucket{operation=\"sign\"})",
      "", 0);
  double p99_seconds = 0;
  EXPECT_TRUE(absl::SimpleAtod(p99, &p99_seconds) && p99_seconds > 0 && p99_seconds <= 10) << p99;
  EXPECT_EQ(prometheus.QueryUntil("custody_request_duration_seconds_count{operation=\"decrypt\"}",
                                  absl::StrCat(kDecryptCalls)),
            absl::StrCat(kDecryptCalls));
  EXPECT_EQ(
      prometheus.QueryUntil("custody_ring_versions{ring=\"prom/sign\",state=\"ACTIVE\"}", "1"),
      "1");
  EXPECT_EQ(prometheus.QueryUntil("custody_health_serving", "1"), "1");
  // Every call left one audit line (two ring creations, one JWKS read, the calls above).
  const int lines = 2 + 1 + kSignCalls + kDecryptCalls + 1;
  EXPECT_EQ(prometheus.QueryUntil("custody_audit_lines_total", absl::StrCat(lines)),
            absl::StrCat(lines));
  // The example alert on token errors (deploy/prometheus/alerts.yml) fires from these series.
  EXPECT_EQ(prometheus.QueryUntil(
                "count(ALERTS{alertname=\"CustodyHsmErrors\",alertstate=\"firing\"})", "1"),
            "1");
  d.Stop();
}

// Like the gRPC port: metrics in clear only on loopback.
TEST(MetricsListenTest, NonLoopbackWithoutTlsIsRefusedAtStartup) {
  TempDir dir;
  CommandResult r = RunCommand({BinDir() + "/custodyd", "--state_dir=" + dir.path() + "/state",
                                "--metrics_listen=0.0.0.0:9464"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("startup.metrics"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("without TLS"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace custody::testing
