// FAPI mutual TLS end to end (issue 16, test 3; RFC 8705): oidc-provider (npm, the
// OpenID-certified authorization server) behind Node's TLS asking for a client certificate,
// a client registered with tls_client_auth and tls_client_certificate_bound_access_tokens, and
// the client's TLS key held in the real custodyd on SoftHSM2: tests/tools/mtls_flow drives
// libcurl with an SSL_CTX holding the custody key (CURLOPT_SSL_CTX_FUNCTION, the custody
// provider). Code flow → a token whose cnf.x5t#S256 is the client certificate's SHA-256
// thumbprint → userinfo with the same certificate succeeds, with another certificate (also a
// custody key, same CA and SAN) or none it fails; the client's handshake signatures are
// custody audit lines.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;  // mtls_flow loads custody.so: skipped like the provider tests
#else
constexpr bool kSanitized = false;
#endif

constexpr char kClientId[] = "custody-mtls-client";
constexpr char kRedirectUri[] = "https://client.example/cb";

// node oidc_mtls_provider.mjs with stdout/stderr to files; SIGTERM at the end.
class MtlsProvider {
 public:
  MtlsProvider(const std::string& dir, const std::vector<std::string>& args)
      : out_(dir + "/provider.out"), err_(dir + "/provider.err") {
    std::vector<std::string> argv = {"node", SourceDir() + "/tests/js/oidc_mtls_provider.mjs"};
    argv.insert(argv.end(), args.begin(), args.end());
    absl::StatusOr<ChildProcess> child =
        ChildProcess::Start({.argv = argv, .stdout_path = out_, .stderr_path = err_});
    if (child.ok()) process_ = *std::move(child);
  }
  // The issuer from the "ready" line, "" if it did not come within 30 s.
  std::string WaitReady() {
    const std::string key = "\"issuer\":\"";
    for (auto until = Clock::now() + 30s; Clock::now() < until;) {
      const std::string out = ReadFileOrDie(out_);
      const size_t p = out.find(key);
      if (p != std::string::npos) {
        const size_t start = p + key.size();
        return out.substr(start, out.find('"', start) - start);
      }
      if (!process_.Running()) return "";
      std::this_thread::sleep_for(50ms);
    }
    return "";
  }
  std::string Log() const { return ReadFileOrDie(out_) + ReadFileOrDie(err_); }

 private:
  std::string out_, err_;
  ChildProcess process_;  // SIGTERM, then SIGKILL after 5 s, when the test ends
};

class OidcMtlsE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kSanitized) GTEST_SKIP() << "mtls_flow loads custody.so; provider tests skip under ASan";
    if (RunCommand({"sh", "-c", "command -v node"}).exit_code != 0) {
      GTEST_SKIP() << "node is not installed (scripts/deps.sh installs nodejs and npm)";
    }
    ASSERT_TRUE(
        std::filesystem::exists(SourceDir() + "/tests/js/node_modules/oidc-provider/package.json"))
        << "oidc-provider is not installed: run `npm ci` in tests/js (scripts/test.sh does)";
    daemon_ = std::make_unique<Custodyd>(Path("state"));
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
  }

  std::string Path(const std::string& name) const { return dir_.path() + "/" + name; }
  CommandResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), "--addr=" + daemon_->address());
    args.insert(args.begin(), BinDir() + "/custodyctl");
    return RunCommand(args);
  }
  void Openssl(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"openssl"};
    argv.insert(argv.end(), args.begin(), args.end());
    CommandResult r = RunCommand(argv);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // A custody ring whose ACTIVE key gets a certificate from the test CA (SAN dns:client.example).
  void CustodyClient(const std::string& ring, const std::string& cn) {
    ASSERT_EQ(Ctl({"ring", "create", ring, "--purpose=sign", "--alg=ES256"}).exit_code, 0);
    CommandResult r = Ctl({"csr", ring, "--subject=/CN=" + cn, "--san=dns:client.example"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const std::string base = Path(cn);
    WriteFileOrDie(base + ".csr", r.out);
    Openssl({"x509", "-req", "-in", base + ".csr", "-CA", Path("ca.crt"), "-CAkey", Path("ca.key"),
             "-CAcreateserial", "-copy_extensions", "copy", "-days", "1", "-out", base + ".crt"});
    r = Ctl({"certificate", "set", ring, "1", "--chain_file=" + base + ".crt"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // The x5t#S256 of a PEM certificate file, computed with the OpenSSL CLI.
  std::string X5tS256(const std::string& pem) {
    CommandResult der = RunCommand({"openssl", "x509", "-in", pem, "-outform", "DER"});
    EXPECT_EQ(der.exit_code, 0) << der.err;
    CommandResult b64 = RunCommand({"sh", "-c",
                                    "openssl dgst -sha256 -binary | openssl base64 -A | tr '+/' "
                                    "'-_' | tr -d '='"},
                                   der.out);
    EXPECT_EQ(b64.exit_code, 0) << b64.err;
    return b64.out;
  }
  size_t SignLines(const std::string& ring) {
    size_t n = 0;
    const std::string needle = "\"operation\":\"sign\",\"ring\":\"" + ring + "\"";
    for (const auto& e : std::filesystem::directory_iterator(Path("state/audit"))) {
      const std::string log = ReadFileOrDie(e.path().string());
      for (size_t p = log.find(needle); p != std::string::npos; p = log.find(needle, p + 1)) {
        const std::string line = log.substr(p, log.find('\n', p) - p);
        if (line.find("\"result\":\"OK\"") != std::string::npos) ++n;
      }
    }
    return n;
  }

  TempDir dir_;
  std::unique_ptr<Custodyd> daemon_;
};

// Line `name ...` of mtls_flow's output, without the name.
std::string Line(const std::string& out, const std::string& name) {
  const std::string key = name + " ";
  for (size_t start = 0, end; (end = out.find('\n', start)) != std::string::npos; start = end + 1) {
    if (out.compare(start, key.size(), key) == 0) {
      return out.substr(start + key.size(), end - start - key.size());
    }
  }
  return "";
}

TEST_F(OidcMtlsE2eTest, CertificateBoundTokenWithTheClientKeyInCustody) {
  // Test CA; the authorization server's own TLS key is a PEM file (it is not the subject here).
  Openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", Path("ca.key"), "-subj", "/CN=custody mTLS test CA", "-days", "1", "-out",
           Path("ca.crt")});
  Openssl({"req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", Path("as.key"), "-subj", "/CN=127.0.0.1", "-addext",
           "subjectAltName=IP:127.0.0.1", "-out", Path("as.csr")});
  Openssl({"x509", "-req", "-in", Path("as.csr"), "-CA", Path("ca.crt"), "-CAkey", Path("ca.key"),
           "-CAcreateserial", "-copy_extensions", "copy", "-days", "1", "-out", Path("as.crt")});
  CustodyClient("clients/acme/mtls", "acme");
  CustodyClient("clients/other/mtls", "other");

  MtlsProvider provider(
      dir_.path(),
      {"--tls_key=" + Path("as.key"), "--tls_cert=" + Path("as.crt"), "--ca=" + Path("ca.crt"),
       std::string("--client_id=") + kClientId, std::string("--redirect_uri=") + kRedirectUri});
  const std::string issuer = provider.WaitReady();
  ASSERT_FALSE(issuer.empty()) << provider.Log();

  const size_t signs_before = SignLines("clients/acme/mtls");
  CommandResult flow = RunCommand({"timeout", "60", BinDir() + "/mtls_flow", issuer, Path("ca.crt"),
                                   "custody:ring=clients/acme/mtls",
                                   "custody:ring=clients/other/mtls", kClientId, kRedirectUri},
                                  "",
                                  {"OPENSSL_MODULES=" + BinDir() + "/../lib/ossl-modules",
                                   "CUSTODY_ADDR=" + daemon_->address()});
  ASSERT_EQ(flow.exit_code, 0) << flow.out << flow.err << provider.Log();

  // The token is bound to the custody-held client certificate.
  const std::string thumbprint = X5tS256(Path("acme.crt"));
  ASSERT_FALSE(thumbprint.empty());
  const std::string token = Line(flow.out, "token");
  EXPECT_NE(token.find("\"token_type\":\"Bearer\""), std::string::npos) << token;
  const std::string introspection = Line(flow.out, "introspection");
  EXPECT_NE(introspection.find("\"active\":true"), std::string::npos) << introspection;
  EXPECT_NE(introspection.find("\"cnf\":{\"x5t#S256\":\"" + thumbprint + "\"}"), std::string::npos)
      << introspection << " expected " << thumbprint;
  EXPECT_NE(introspection.find("\"client_id\":\"custody-mtls-client\""), std::string::npos);
  EXPECT_NE(thumbprint, X5tS256(Path("other.crt")));

  // Userinfo: the same certificate → 200; another custody-held certificate of the same CA and
  // SAN → 401 invalid_token (x5t#S256 mismatch); no certificate → 401.
  const std::string me = Line(flow.out, "userinfo");
  EXPECT_EQ(me.rfind("200 ", 0), 0u) << me;
  EXPECT_NE(me.find("\"sub\":\"alice\""), std::string::npos) << me;
  const std::string other = Line(flow.out, "userinfo_other");
  EXPECT_EQ(other.rfind("401 ", 0), 0u) << other;
  EXPECT_NE(other.find("invalid_token"), std::string::npos) << other;
  const std::string none = Line(flow.out, "userinfo_none");
  EXPECT_EQ(none.rfind("401 ", 0), 0u) << none;
  const std::string log = provider.Log();
  // The provider's reason for the other certificate: the binding, not the token itself.
  EXPECT_NE(log.find("\"detail\":\"failed x5t#S256 verification\""), std::string::npos) << log;

  // Each TLS connection with the client's key signed in custody (one audit line per handshake):
  // authorization, token, introspection and userinfo share connections, so at least one.
  EXPECT_GT(SignLines("clients/acme/mtls"), signs_before);
  EXPECT_GT(SignLines("clients/other/mtls"), 0u);
}

}  // namespace
}  // namespace custody::testing
