// custodyctl csr: PKCS#10 requests built and signed inside custodyd by a ring version's key in
// the token (also a PENDING one), checked with the OpenSSL CLI (req -verify, a test CA made with
// the CLI signs them) against the public key python3-jwcrypto derives from custody's JWKS.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

class CertificateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    const std::string self = std::to_string(getuid());
    const std::string policy = Path("policy.json");
    // Everything on every ring, except CSRs on locked/**.
    WriteFileOrDie(policy, R"({"version": 1, "grants": [
      {"identities": ["uid:)" + self +
                               R"("], "operations": ["sign", "jwks", "admin.read",
       "admin.create", "admin.rotate", "admin.destroy"], "rings": ["**"]},
      {"identities": ["uid:)" + self +
                               R"("], "operations": ["admin.certificate"],
       "rings": ["tls/**"]}]})");
    chmod(policy.c_str(), 0600);
    daemon_ = new Custodyd(Path("state"), WithLowPolicyFloors({"--policy_file=" + policy}));
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
    for (const auto& [ring, alg] :
         std::vector<std::pair<std::string, std::string>>{{"tls/es256", "--alg=ES256"},
                                                          {"tls/es384", "--alg=ES384"},
                                                          {"tls/ps256", "--alg=PS256"},
                                                          {"tls/rs256", "--alg=RS256"},
                                                          {"tls/eddsa", "--alg=EdDSA"},
                                                          {"tls/next", "--alg=ES256"},
                                                          {"locked/es256", "--alg=ES256"},
                                                          {"tls/mtls", "--alg=PS256"}}) {
      std::vector<std::string> args = {"ring", "create", ring, "--purpose=sign", alg};
      if (alg == "--alg=RS256") args.push_back("--allow_non_fapi");
      CommandResult r = Ctl(args);
      ASSERT_EQ(r.exit_code, 0) << ring << r.err;
    }
    // tls/next: an explicit policy keeps a pre-published PENDING version 2.
    CommandResult r = Ctl({"ring", "set-policy", "tls/next", "--prepublish=1h", "--retain=1h"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // tls/gated: rotation needs a certificate on the PENDING version (published long enough
    // at once: prepublish 0). tls/short: a 2-day prepublish window.
    r = Ctl({"ring", "create", "tls/gated", "--purpose=sign", "--alg=ES256",
             "--require_certificate", "--prepublish=0", "--retain=1h"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = Ctl({"ring", "create", "tls/short", "--purpose=sign", "--alg=ES256", "--prepublish=48h",
             "--retain=48h"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", Path("ca.key"), "-subj",
                    "/CN=custody test CA", "-days", "1", "-out", Path("ca.crt")});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }

  static std::string Path(const std::string& name) { return dir_->path() + "/" + name; }
  static CommandResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), "--addr=" + daemon_->address());
    args.insert(args.begin(), BinDir() + "/custodyctl");
    return RunCommand(args);
  }

  // DER SPKI of `jwk_json` (a public JWK), converted by jwcrypto then OpenSSL.
  static std::string SpkiOfJwk(const std::string& jwk_json) {
    WriteFileOrDie(Path("jwk.json"), jwk_json);
    CommandResult pem = RunCommand(
        {"/usr/bin/python3", "-c",
         "import sys\nfrom jwcrypto import jwk\n"
         "sys.stdout.write(jwk.JWK.from_json(open(sys.argv[1]).read()).export_to_pem().decode())",
         Path("jwk.json")});
    EXPECT_EQ(pem.exit_code, 0) << pem.err;
    CommandResult der = RunCommand({"openssl", "pkey", "-pubin", "-outform", "DER"}, pem.out);
    EXPECT_EQ(der.exit_code, 0) << der.err;
    return der.out;
  }
  static std::string VersionJwk(const std::string& ring, uint32_t version) {
    custody::v1::GetPublicKeyRequest req;
    req.set_ring(ring);
    req.set_version(version);
    custody::v1::PublicKey key;
    grpc::ClientContext ctx;
    grpc::Status s = daemon_->signer().GetPublicKey(&ctx, req, &key);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return key.public_jwk();
  }
  // The CSR verifies, names the SANs, and a CA-signed certificate from it carries the key.
  static void ExpectValidCsr(const std::string& pem, const std::string& san,
                             const std::string& expected_spki) {
    WriteFileOrDie(Path("req.csr"), pem);
    CommandResult v = RunCommand({"openssl", "req", "-verify", "-noout", "-in", Path("req.csr")});
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
    CommandResult text = RunCommand({"openssl", "req", "-noout", "-text", "-in", Path("req.csr")});
    EXPECT_NE(text.out.find(san), std::string::npos) << text.out;
    CommandResult crt =
        RunCommand({"openssl", "x509", "-req", "-in", Path("req.csr"), "-CA", Path("ca.crt"),
                    "-CAkey", Path("ca.key"), "-CAcreateserial", "-days", "1", "-copy_extensions",
                    "copy", "-out", Path("leaf.crt")});
    ASSERT_EQ(crt.exit_code, 0) << crt.err;
    CommandResult chain =
        RunCommand({"openssl", "verify", "-CAfile", Path("ca.crt"), Path("leaf.crt")});
    EXPECT_EQ(chain.exit_code, 0) << chain.out << chain.err;
    CommandResult spki = RunCommand({"sh", "-c",
                                     "openssl x509 -in '" + Path("leaf.crt") +
                                         "' -noout -pubkey | openssl pkey -pubin -outform DER"});
    EXPECT_EQ(spki.out, expected_spki);
  }

  static TempDir* dir_;
  static Custodyd* daemon_;
};

TempDir* CertificateTest::dir_ = nullptr;
Custodyd* CertificateTest::daemon_ = nullptr;

TEST_F(CertificateTest, CsrOfEveryRingKindVerifiesAndATestCaCertifiesTheKey) {
  for (const char* ring : {"tls/es256", "tls/es384", "tls/ps256", "tls/rs256", "tls/eddsa"}) {
    SCOPED_TRACE(ring);
    CommandResult r = Ctl({"csr", ring, "--subject=/CN=op.example/O=Example Bank/C=GB",
                           "--san=dns:op.example,uri:spiffe://bank.example/op"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out.rfind("-----BEGIN CERTIFICATE REQUEST-----", 0), 0u) << r.out;
    ExpectValidCsr(r.out, "DNS:op.example, URI:spiffe://bank.example/op",
                   SpkiOfJwk(VersionJwk(ring, 0)));
  }
}

TEST_F(CertificateTest, PendingVersionGetsItsCertificateBeforeItSigns) {
  CommandResult r = Ctl({"csr", "tls/next", "--version=2", "--subject=/CN=next.example"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectValidCsr(r.out, "CN = next.example", SpkiOfJwk(VersionJwk("tls/next", 2)));
  EXPECT_NE(SpkiOfJwk(VersionJwk("tls/next", 2)), SpkiOfJwk(VersionJwk("tls/next", 1)));
  // The PENDING key signs the CSR custodyd built, and nothing a caller sends.
  custody::v1::SignRequest sign;
  sign.set_ring("tls/next");
  sign.set_version(2);
  sign.set_digest(std::string(32, 'x'));
  custody::v1::SignResponse resp;
  grpc::ClientContext ctx;
  EXPECT_EQ(daemon_->signer().Sign(&ctx, sign, &resp).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(CertificateTest, RefusesBadRequestsWithTheReason) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"csr", "tls/es256", "--subject=CN=x"}, "INVALID_ARGUMENT: subject must have"},
      {{"csr", "tls/es256", "--subject=/XY=x"}, "subject attribute 'XY' is unknown"},
      {{"csr", "tls/es256", "--subject=/CN=x", "--san=ftp:x"}, "subjectAltName 'ftp:x'"},
      {{"csr", "tls/es256", "--version=9", "--subject=/CN=x"}, "NOT_FOUND"},
      {{"csr", "locked/es256", "--subject=/CN=x"}, "PERMISSION_DENIED"},
  };
  for (const auto& [args, reason] : cases) {
    CommandResult r = Ctl(args);
    EXPECT_EQ(r.exit_code, 1) << args[1];
    EXPECT_NE(r.err.find(reason), std::string::npos) << r.err;
  }
  // A RETIRED version gets no new certificate.
  ASSERT_EQ(Ctl({"ring", "rotate", "tls/es384", "--force"}).exit_code, 0);
  CommandResult r = Ctl({"csr", "tls/es384", "--version=1", "--subject=/CN=x"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("FAILED_PRECONDITION: version 1 of ring 'tls/es384' is RETIRED"),
            std::string::npos)
      << r.err;
}

TEST_F(CertificateTest, CertificateSetAcceptsTheChainAndTheJwksCarriesX5c) {
  CommandResult r = Ctl({"csr", "tls/mtls", "--subject=/CN=acme client/O=Acme",
                         "--san=uri:https://acme.example/client"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("mtls.csr"), r.out);
  r = RunCommand({"openssl", "x509", "-req", "-in", Path("mtls.csr"), "-CA", Path("ca.crt"),
                  "-CAkey", Path("ca.key"), "-CAcreateserial", "-days", "30", "-out",
                  Path("mtls.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("chain.pem"),
                 ReadFileOrDie(Path("mtls.crt")) + ReadFileOrDie(Path("ca.crt")));
  r = Ctl({"certificate", "set", "tls/mtls", "1", "--chain_file=" + Path("chain.pem")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"subject\": \"O=Acme,CN=acme client\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"issuer\": \"CN=custody test CA\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"expiring\": false"), std::string::npos) << r.out;

  // jwcrypto reads the JWKS; x5c[0] is the leaf's DER, x5t#S256 its SHA-256, both checked in
  // Python against `openssl x509 -outform DER`; the thumbprint also against GetKeyRing's.
  CommandResult leaf = RunCommand(
      {"openssl", "x509", "-in", Path("mtls.crt"), "-outform", "DER", "-out", Path("leaf.der")});
  ASSERT_EQ(leaf.exit_code, 0) << leaf.err;
  r = Ctl({"jwks", "tls/mtls"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("jwks.json"), r.out);
  CommandResult check = RunCommand(
      {"/usr/bin/python3", "-c",
       "import sys,json,base64,hashlib\nfrom jwcrypto import jwk\n"
       "ks=jwk.JWKSet.from_json(open(sys.argv[1]).read())\n"
       "k=json.loads(list(ks['keys'])[0].export_public())\n"
       "raw=json.load(open(sys.argv[1]))['keys'][0]\n"
       "leaf=open(sys.argv[2],'rb').read()\n"
       "assert base64.b64decode(raw['x5c'][0])==leaf, 'x5c[0] is not the leaf'\n"
       "assert len(raw['x5c'])==2\n"
       "t=base64.urlsafe_b64encode(hashlib.sha256(leaf).digest()).rstrip(b'=').decode()\n"
       "assert raw['x5t#S256']==t, 'x5t#S256'\n"
       "print(t)",
       Path("jwks.json"), Path("leaf.der")});
  ASSERT_EQ(check.exit_code, 0) << check.out << check.err;
  const std::string thumbprint = check.out.substr(0, check.out.find('\n'));
  r = Ctl({"ring", "get", "tls/mtls"});
  EXPECT_NE(r.out.find("\"sha256_thumbprint\": \"" + thumbprint + "\""), std::string::npos)
      << r.out;

  // Durable: still there after a restart.
  delete daemon_;
  daemon_ =
      new Custodyd(Path("state"), WithLowPolicyFloors({"--policy_file=" + Path("policy.json")}));
  ASSERT_TRUE(daemon_->started()) << daemon_->log();
  r = Ctl({"jwks", "tls/mtls"});
  EXPECT_NE(r.out.find("\"x5t#S256\":\"" + thumbprint + "\""), std::string::npos) << r.out;
}

TEST_F(CertificateTest, CertificateSetRefusesAChainForAnotherKeyWithTheReason) {
  CommandResult r = Ctl({"csr", "tls/es256", "--subject=/CN=es256"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("other.csr"), r.out);
  r = RunCommand({"openssl", "x509", "-req", "-in", Path("other.csr"), "-CA", Path("ca.crt"),
                  "-CAkey", Path("ca.key"), "-CAcreateserial", "-days", "30", "-out",
                  Path("other.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Ctl({"certificate", "set", "tls/eddsa", "1", "--chain_file=" + Path("other.crt")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("INVALID_ARGUMENT: version 1 of ring 'tls/eddsa': the leaf certificate's "
                       "public key is not this version's key"),
            std::string::npos)
      << r.err;
  // Issuer before leaf.
  WriteFileOrDie(Path("reversed.pem"),
                 ReadFileOrDie(Path("ca.crt")) + ReadFileOrDie(Path("other.crt")));
  r = Ctl({"certificate", "set", "tls/es256", "1", "--chain_file=" + Path("reversed.pem")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("did not issue certificate 1"), std::string::npos) << r.err;
  WriteFileOrDie(Path("garbage.pem"), "not a certificate");
  r = Ctl({"certificate", "set", "tls/es256", "1", "--chain_file=" + Path("garbage.pem")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("no PEM certificate"), std::string::npos) << r.err;
  // Nothing was attached.
  r = Ctl({"ring", "get", "tls/eddsa"});
  EXPECT_EQ(r.out.find("\"certificate\""), std::string::npos) << r.out;
}

TEST_F(CertificateTest, RotationOfARingThatRequiresCertificatesWaitsForOne) {
  CommandResult r = Ctl({"ring", "rotate", "tls/gated"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("FAILED_PRECONDITION: ring 'tls/gated' requires a certificate and PENDING "
                       "version 2 has none"),
            std::string::npos)
      << r.err;
  // The PENDING version gets its certificate before it signs; then rotation goes through.
  r = Ctl({"csr", "tls/gated", "--version=2", "--subject=/CN=gated"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("gated.csr"), r.out);
  r = RunCommand({"openssl", "x509", "-req", "-in", Path("gated.csr"), "-CA", Path("ca.crt"),
                  "-CAkey", Path("ca.key"), "-CAcreateserial", "-days", "30", "-out",
                  Path("gated.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Ctl({"certificate", "set", "tls/gated", "2", "--chain_file=" + Path("gated.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Ctl({"ring", "rotate", "tls/gated"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"rotated\": true"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"require_certificate\": true"), std::string::npos) << r.out;
}

// The scheduler's automatic rotation honours --require_certificate like `ring rotate`: a due
// rotation whose PENDING version has no certificate waits (logged once, GetKeyRing says why),
// and happens as soon as the certificate is set.
TEST_F(CertificateTest, ScheduledRotationWaitsForTheCertificateOnARingThatRequiresOne) {
  CommandResult r =
      Ctl({"ring", "create", "tls/auto", "--purpose=sign", "--alg=ES256", "--require_certificate",
           "--prepublish=0", "--rotation_period=2s", "--retain=1h"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto ring = [&] {
    CommandResult g = Ctl({"ring", "get", "tls/auto"});
    EXPECT_EQ(g.exit_code, 0) << g.err;
    return g.out;
  };
  auto waiting_for = [](int version) {
    return "waits: ring 'tls/auto' requires a certificate and PENDING version " +
           std::to_string(version) + " has none";
  };
  // Past the due time (2 s), version 1 is still ACTIVE and the reason is reported.
  std::string out;
  for (int i = 0; i < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    out = ring();
    if (out.find(waiting_for(2)) != std::string::npos) break;
  }
  EXPECT_NE(out.find(waiting_for(2)), std::string::npos) << out;
  EXPECT_NE(out.find("\"rotation_waiting\": \"automatic rotation due since "), std::string::npos)
      << out;
  EXPECT_NE(out.find("\"active_version\": 1"), std::string::npos) << out;
  std::this_thread::sleep_for(std::chrono::seconds(2));  // no promotion, no busy retries
  out = ring();
  EXPECT_NE(out.find("\"active_version\": 1"), std::string::npos) << out;
  const std::string log = daemon_->log();
  size_t logged = 0;
  for (size_t p = log.find("rotation.awaiting_certificate"); p != std::string::npos;
       p = log.find("rotation.awaiting_certificate", p + 1)) {
    if (log.find("tls/auto", p) < log.find('\n', p)) ++logged;
  }
  EXPECT_EQ(logged, 1u) << log;

  // The certificate arrives: the scheduler (woken by the change) promotes version 2.
  r = Ctl({"csr", "tls/auto", "--version=2", "--subject=/CN=auto"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("auto.csr"), r.out);
  r = RunCommand({"openssl", "x509", "-req", "-in", Path("auto.csr"), "-CA", Path("ca.crt"),
                  "-CAkey", Path("ca.key"), "-CAcreateserial", "-days", "30", "-out",
                  Path("auto.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Ctl({"certificate", "set", "tls/auto", "2", "--chain_file=" + Path("auto.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (int i = 0; i < 50; ++i) {
    out = ring();
    if (out.find("\"active_version\": 2") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(out.find("\"active_version\": 2"), std::string::npos) << out;
}

TEST_F(CertificateTest, GetKeyRingReportsCertificatesExpiringWithinPrepublish) {
  CommandResult r = Ctl({"csr", "tls/short", "--subject=/CN=short"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(Path("short.csr"), r.out);
  r = RunCommand({"openssl", "x509", "-req", "-in", Path("short.csr"), "-CA", Path("ca.crt"),
                  "-CAkey", Path("ca.key"), "-CAcreateserial", "-days", "1", "-out",
                  Path("short.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Ctl({"certificate", "set", "tls/short", "1", "--chain_file=" + Path("short.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"expiring\": true"), std::string::npos) << r.out;
}

TEST_F(CertificateTest, EveryCsrIsAuditedAsAnAdminCertificateOperation) {
  ASSERT_EQ(Ctl({"csr", "tls/eddsa", "--subject=/CN=audited"}).exit_code, 0);
  std::string log;
  for (const auto& e : std::filesystem::directory_iterator(Path("state/audit"))) {
    log += ReadFileOrDie(e.path().string());
  }
  EXPECT_NE(log.find("\"operation\":\"admin.certificate\",\"ring\":\"tls/eddsa\""),
            std::string::npos)
      << log;
}

}  // namespace
}  // namespace custody::testing
