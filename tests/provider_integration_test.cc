// The custody OpenSSL provider (build/lib/ossl-modules/custody.so) used by the stock `openssl`
// CLI against the real custodyd on SoftHSM2: keys loaded from custody: URIs, signatures checked
// by OpenSSL with the public key derived (by python3-jwcrypto) from custody's JWKS, X.509
// certificates and CSRs, errors on OpenSSL's error queue, and mutual TLS 1.3 / 1.2 handshakes
// between `openssl s_server` and `openssl s_client` with both ends' keys in custody.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

constexpr uid_t kNobody = 65534;

// A sanitized custody.so cannot be loaded into Debian's uninstrumented openssl binary (the ASan
// runtime must come first in the process): under CUSTODY_SANITIZE these tests are skipped.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

class ProviderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (kSanitized) return;
    dir_ = new TempDir();
    const std::string& d = dir_->path();
    // The caller's uid signs with tls/**, clients/** and gone/**; "locked/**" it may only read.
    // nobody may read every public key and sign nothing (the permission test of the TLS part).
    const std::string self = std::to_string(getuid());
    const std::string policy = d + "/policy.json";
    WriteFileOrDie(policy, R"({"version": 1, "grants": [
      {"identities": ["uid:)" + self +
                               R"("], "operations": ["sign"],
       "rings": ["tls/**", "clients/**", "gone/**", "nginx/**"]},
      {"identities": ["uid:)" + self +
                               R"("], "operations": ["jwks", "admin.read",
       "admin.create", "admin.rotate", "admin.destroy"], "rings": ["**"]},
      {"identities": ["uid:)" + std::to_string(kNobody) +
                               R"("], "operations": ["jwks"],
       "rings": ["**"]},
      {"identities": ["uid:)" + std::to_string(kNobody) +
                               R"("], "operations": ["sign"],
       "rings": ["nginx/**"]}]})");
    chmod(policy.c_str(), 0600);
    daemon_ = new Custodyd(d + "/state", {"--policy_file=" + policy});
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
    for (const auto& [ring, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
             {"tls/ec", {"--alg=ES256"}},
             {"tls/ec384", {"--alg=ES384"}},
             {"tls/ps", {"--alg=PS256"}},
             {"tls/rs", {"--alg=RS256", "--allow_non_fapi"}},
             {"tls/ed", {"--alg=EdDSA"}},
             {"clients/ec", {"--alg=ES256"}},
             {"clients/ps", {"--alg=PS256"}},
             {"clients/rs", {"--alg=RS256", "--allow_non_fapi"}},
             {"clients/ed", {"--alg=EdDSA"}},
             {"locked/ec", {"--alg=ES256"}},
             {"gone/ec", {"--alg=ES256"}},
             {"nginx/ec", {"--alg=ES256"}},
         }) {
      std::vector<std::string> argv = {"ring", "create", ring, "--purpose=sign"};
      argv.insert(argv.end(), args.begin(), args.end());
      CommandResult r = Ctl(argv);
      ASSERT_EQ(r.exit_code, 0) << ring << r.err;
    }
    CommandResult r = Ctl({"ring", "create", "enc/rsa", "--purpose=decrypt", "--alg=RSA-OAEP-256"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // gone/ec version 1: retired by a forced rotation, then scheduled for destruction.
    ASSERT_EQ(Ctl({"ring", "rotate", "gone/ec", "--force"}).exit_code, 0);
    r = Ctl({"version", "destroy", "gone/ec", "1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    data_ = d + "/data.bin";
    WriteFileOrDie(data_, "to be signed by a key that never leaves the token\n");
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
    daemon_ = nullptr;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (kSanitized) GTEST_SKIP() << "the openssl CLI cannot load an ASan-built provider";
  }

  static CommandResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), "--addr=" + daemon_->address());
    args.insert(args.begin(), BinDir() + "/custodyctl");
    return RunCommand(args);
  }
  static std::vector<std::string> Env() {
    return {"OPENSSL_MODULES=" + BinDir() + "/../lib/ossl-modules",
            "CUSTODY_ADDR=" + daemon_->address(), "CUSTODY_DEADLINE_MS=5000"};
  }
  // `openssl CMD -provider custody -provider default ARGS...`
  static CommandResult OpenSsl(const std::string& cmd, const std::vector<std::string>& args,
                               std::vector<std::string> env = {}) {
    // The property query makes OpenSSL prefer the default provider's implementations of
    // algorithms both providers name (EC, RSA key management): see docs/provider.md.
    std::vector<std::string> argv = {"openssl",   cmd,       "-provider",  "custody",
                                     "-provider", "default", "-propquery", "?provider=default"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<std::string> e = Env();
    e.insert(e.end(), env.begin(), env.end());
    return RunCommand(argv, "", e);
  }
  static std::string Path(const std::string& name) { return dir_->path() + "/" + name; }

  // The ring's ACTIVE public key as DER SPKI, from the JWKS through jwcrypto and OpenSSL.
  static std::string JwksSpki(const std::string& ring) {
    custody::v1::GetJwksRequest req;
    req.add_rings(ring);
    custody::v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(daemon_->signer().GetJwks(&ctx, req, &resp).ok());
    WriteFileOrDie(Path("jwks.json"), resp.jwks());
    CommandResult pem = RunCommand({"/usr/bin/python3", "-c",
                                    "import sys,json\nfrom jwcrypto import jwk\n"
                                    "k=json.load(open(sys.argv[1]))['keys'][0]\n"
                                    "sys.stdout.write(jwk.JWK(**k).export_to_pem().decode())",
                                    Path("jwks.json")});
    EXPECT_EQ(pem.exit_code, 0) << pem.err;
    CommandResult der = RunCommand({"openssl", "pkey", "-pubin", "-outform", "DER"}, pem.out);
    EXPECT_EQ(der.exit_code, 0) << der.err;
    return der.out;
  }
  // Writes the JWKS public key of `ring` to a PEM file and returns its path.
  static std::string JwksPublicPem(const std::string& ring) {
    const std::string der = JwksSpki(ring);
    const std::string path = Path(std::filesystem::path(ring).filename().string() + "." +
                                  std::filesystem::path(ring).parent_path().string() + ".pub");
    CommandResult pem = RunCommand({"openssl", "pkey", "-pubin", "-inform", "DER"}, der);
    WriteFileOrDie(path, pem.out);
    return path;
  }

  // Audit lines of successful signatures with `ring` so far.
  static size_t SignLines(const std::string& ring) {
    size_t n = 0;
    const std::string needle = "\"operation\":\"sign\",\"ring\":\"" + ring + "\"";
    for (const auto& e : std::filesystem::directory_iterator(dir_->path() + "/state/audit")) {
      const std::string log = ReadFileOrDie(e.path().string());
      for (size_t p = log.find(needle); p != std::string::npos; p = log.find(needle, p + 1)) {
        const size_t eol = log.find('\n', p);
        if (log.substr(p, eol - p).find("\"result\":\"OK\"") != std::string::npos) ++n;
      }
    }
    return n;
  }

  static TempDir* dir_;
  static Custodyd* daemon_;
  static std::string data_;
};

TempDir* ProviderTest::dir_ = nullptr;
Custodyd* ProviderTest::daemon_ = nullptr;
std::string ProviderTest::data_;

TEST_F(ProviderTest, PublicKeyFromTheStoreIsTheJwksKey) {
  for (const char* ring : {"tls/ec", "tls/ec384", "tls/ps", "tls/rs", "tls/ed"}) {
    CommandResult r =
        OpenSsl("pkey", {"-in", std::string("custody:ring=") + ring, "-pubout", "-outform", "DER"});
    ASSERT_EQ(r.exit_code, 0) << ring << r.err;
    EXPECT_EQ(r.out, JwksSpki(ring)) << ring;
  }
  // A pinned version is that version's key.
  CommandResult pinned =
      OpenSsl("pkey", {"-in", "custody:ring=tls/ec;version=1", "-pubout", "-outform", "DER"});
  ASSERT_EQ(pinned.exit_code, 0) << pinned.err;
  EXPECT_EQ(pinned.out, JwksSpki("tls/ec"));
}

TEST_F(ProviderTest, DigestSignaturesVerifyWithTheJwksPublicKey) {
  struct Case {
    std::string ring;
    std::string md;
    std::vector<std::string> sigopts;
  };
  const std::vector<Case> cases = {
      {"tls/ec", "-sha256", {}},
      {"tls/ec", "-sha384", {}},
      {"tls/ec384", "-sha384", {}},
      {"tls/ps", "-sha256", {"rsa_padding_mode:pss", "rsa_pss_saltlen:digest"}},
      {"tls/ps", "-sha512", {"rsa_padding_mode:pss", "rsa_pss_saltlen:digest"}},
      {"tls/rs", "-sha256", {}},
      {"tls/rs", "-sha384", {"rsa_padding_mode:pss", "rsa_pss_saltlen:digest"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.ring + " " + c.md);
    const size_t before = SignLines(c.ring);
    std::vector<std::string> args = {c.md, "-sign", "custody:ring=" + c.ring, "-out", Path("sig")};
    std::vector<std::string> verify = {
        "openssl", "dgst", c.md, "-verify", JwksPublicPem(c.ring), "-signature", Path("sig")};
    for (const std::string& o : c.sigopts) {
      args.insert(args.end(), {"-sigopt", o});
      verify.insert(verify.end(), {"-sigopt", o});
    }
    args.push_back(data_);
    verify.push_back(data_);
    CommandResult s = OpenSsl("dgst", args);
    ASSERT_EQ(s.exit_code, 0) << s.err;
    CommandResult v = RunCommand(verify);
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
    EXPECT_EQ(SignLines(c.ring), before + 1) << "one audit line per signature";
  }
}

TEST_F(ProviderTest, PkeyutlSignsADigestAndEd25519SignsTheMessage) {
  CommandResult digest = RunCommand({"openssl", "dgst", "-sha256", "-binary", data_});
  WriteFileOrDie(Path("digest"), digest.out);
  CommandResult s = OpenSsl("pkeyutl", {"-sign", "-inkey", "custody:ring=tls/ec", "-in",
                                        Path("digest"), "-out", Path("ec.sig")});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  CommandResult v =
      RunCommand({"openssl", "pkeyutl", "-verify", "-pubin", "-inkey", JwksPublicPem("tls/ec"),
                  "-in", Path("digest"), "-sigfile", Path("ec.sig")});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;

  s = OpenSsl("pkeyutl", {"-sign", "-inkey", "custody:ring=tls/ps", "-pkeyopt", "digest:sha256",
                          "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest",
                          "-in", Path("digest"), "-out", Path("ps.sig")});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  v = RunCommand({"openssl", "pkeyutl", "-verify", "-pubin", "-inkey", JwksPublicPem("tls/ps"),
                  "-pkeyopt", "digest:sha256", "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt",
                  "rsa_pss_saltlen:digest", "-in", Path("digest"), "-sigfile", Path("ps.sig")});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;

  s = OpenSsl("pkeyutl", {"-sign", "-inkey", "custody:ring=tls/ed", "-rawin", "-in", data_, "-out",
                          Path("ed.sig")});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  v = RunCommand({"openssl", "pkeyutl", "-verify", "-pubin", "-inkey", JwksPublicPem("tls/ed"),
                  "-rawin", "-in", data_, "-sigfile", Path("ed.sig")});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

TEST_F(ProviderTest, CertificatesAndCsrsAreSignedThroughTheProvider) {
  for (const char* ring : {"tls/ec", "tls/rs", "tls/ed"}) {
    SCOPED_TRACE(ring);
    const std::string crt = Path("self.crt"), csr = Path("req.csr");
    CommandResult r = OpenSsl("req", {"-new", "-x509", "-key", std::string("custody:ring=") + ring,
                                      "-subj", "/CN=self.test", "-days", "1", "-out", crt});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    CommandResult v = RunCommand({"openssl", "verify", "-CAfile", crt, crt});
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
    r = OpenSsl("req", {"-new", "-key", std::string("custody:ring=") + ring, "-subj",
                        "/CN=csr.test", "-out", csr});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    v = RunCommand({"openssl", "req", "-verify", "-noout", "-in", csr});
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  }
  // RSA-PSS certificate (PS256 rings sign PSS only).
  CommandResult r =
      OpenSsl("req", {"-new", "-x509", "-key", "custody:ring=tls/ps", "-sigopt",
                      "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest", "-subj",
                      "/CN=pss.test", "-days", "1", "-out", Path("pss.crt")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CommandResult v = RunCommand({"openssl", "verify", "-CAfile", Path("pss.crt"), Path("pss.crt")});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

TEST_F(ProviderTest, FailuresAreClearErrorsOnTheOpenSslErrorQueue) {
  struct Case {
    std::string uri;
    std::string reason;
  };
  const std::vector<Case> load_cases = {
      {"custody:ring=enc/rsa", "custody: FAILED_PRECONDITION: ring 'enc/rsa' is a DECRYPT ring"},
      {"custody:ring=tls/ec;version=99", "custody: NOT_FOUND: ring 'tls/ec' has no version 99"},
      {"custody:ring=gone/ec;version=1", "is DESTROY"},
      {"custody:ring=nope/none", "custody: NOT_FOUND"},
      {"custody:ring=tls/ec;version=x", "custody: INVALID_ARGUMENT: version 'x'"},
      {"custody:ring=tls/ec;pin=1", "unknown attribute 'pin'"},
  };
  for (const Case& c : load_cases) {
    CommandResult r = OpenSsl("pkey", {"-in", c.uri, "-pubout"});
    EXPECT_NE(r.exit_code, 0) << c.uri;
    EXPECT_NE(r.err.find(c.reason), std::string::npos) << c.uri << ": " << r.err;
    // The error line names the provider's source file, never a path of the build machine.
    EXPECT_NE(r.err.find(":provider.cc:"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("/provider.cc"), std::string::npos) << r.err;
  }
  // Signing refused by policy or by the ring, with custodyd's reason.
  CommandResult r = OpenSsl("dgst", {"-sha256", "-sign", "custody:ring=locked/ec", data_});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("custody: PERMISSION_DENIED: "), std::string::npos) << r.err;
  r = OpenSsl("dgst", {"-sha256", "-sign", "custody:ring=tls/ps", data_});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("RSASSA-PKCS1-v1_5 is refused on a PS256 ring"), std::string::npos) << r.err;
  r = OpenSsl("dgst", {"-sha1", "-sign", "custody:ring=tls/ec", data_});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("SHA-256, SHA-384 or SHA-512 digests only"), std::string::npos) << r.err;
  // custodyd unreachable: fails within the configured deadline, does not hang.
  const auto start = std::chrono::steady_clock::now();
  r = OpenSsl("pkey", {"-in", "custody:ring=tls/ec;addr=unix:" + Path("nothing.sock"), "-pubout"},
              {"CUSTODY_DEADLINE_MS=1000"});
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("custody: UNAVAILABLE: "), std::string::npos) << r.err;
  EXPECT_LT(elapsed, std::chrono::seconds(15));
}

// ---- TLS: openssl s_server and s_client, both ends' keys in custody ----

class ProviderTlsTest : public ProviderTest {
 protected:
  static void SetUpTestSuite() {
    ProviderTest::SetUpTestSuite();
    if (kSanitized || HasFatalFailure()) return;
    // A test CA made with the OpenSSL CLI (its key is a plain PEM file: it is the relying side).
    CommandResult r =
        RunCommand({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", Path("ca.key"), "-subj",
                    "/CN=custody test CA", "-days", "1", "-out", Path("ca.crt")});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (const char* ring : {"tls/ec", "tls/ps", "tls/rs", "clients/ec", "clients/ps", "clients/rs",
                             "clients/ed", "locked/ec"}) {
      ASSERT_NO_FATAL_FAILURE(Issue(ring));
    }
  }

  static std::string CertPath(const std::string& ring) {
    std::string name = ring;
    std::replace(name.begin(), name.end(), '/', '_');
    return Path(name + ".crt");
  }

  // CSR from the custody key (through the provider), signed by the test CA.
  static void Issue(const std::string& ring) {
    const std::string csr = Path("issue.csr");
    std::string cn = ring;
    std::replace(cn.begin(), cn.end(), '/', '.');
    std::vector<std::string> args = {
        "-new", "-key", "custody:ring=" + ring, "-subj", "/CN=" + cn + ".test", "-out", csr};
    if (ring == "tls/ps" || ring == "clients/ps") {
      args.insert(args.end(),
                  {"-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"});
    }
    std::vector<std::string> x509 = {"openssl",
                                     "x509",
                                     "-req",
                                     "-in",
                                     csr,
                                     "-CA",
                                     Path("ca.crt"),
                                     "-CAkey",
                                     Path("ca.key"),
                                     "-CAcreateserial",
                                     "-days",
                                     "1",
                                     "-out",
                                     CertPath(ring)};
    if (ring == "locked/ec") {
      // Its key may not sign, not even its own CSR: the CA certifies its public key from the
      // JWKS, with a CSR made by a throwaway key.
      args = {"-new",
              "-newkey",
              "ec",
              "-pkeyopt",
              "ec_paramgen_curve:P-256",
              "-nodes",
              "-keyout",
              Path("throwaway.key"),
              "-subj",
              "/CN=" + cn + ".test",
              "-out",
              csr};
      x509.insert(x509.end(), {"-force_pubkey", JwksPublicPem(ring)});
    }
    CommandResult r = OpenSsl("req", args);
    ASSERT_EQ(r.exit_code, 0) << ring << r.err;
    r = RunCommand(x509);
    ASSERT_EQ(r.exit_code, 0) << ring << r.err;
    chmod(CertPath(ring).c_str(), 0644);
  }

  struct Handshake {
    int exit_code = -1;
    std::string server;
    std::string client;
  };
  static Handshake Run(const std::string& server_ring, const std::string& client_ring,
                       const std::vector<std::string>& server_extra,
                       const std::vector<std::string>& client_extra,
                       const std::string& client_prefix = "",
                       const std::vector<std::string>& extra_env = {}) {
    std::vector<std::string> argv = {SourceDir() + "/tests/tools/tls_handshake.sh",
                                     dir_->path(),
                                     std::to_string(FreePort()),
                                     "--",
                                     "-key",
                                     "custody:ring=" + server_ring,
                                     "-cert",
                                     CertPath(server_ring),
                                     "-CAfile",
                                     Path("ca.crt"),
                                     "-Verify",
                                     "1",
                                     "-verify_return_error"};
    argv.insert(argv.end(), server_extra.begin(), server_extra.end());
    argv.insert(argv.end(),
                {"--", "-key", "custody:ring=" + client_ring, "-cert", CertPath(client_ring),
                 "-CAfile", Path("ca.crt"), "-verify_return_error"});
    argv.insert(argv.end(), client_extra.begin(), client_extra.end());
    std::vector<std::string> env = Env();
    if (!client_prefix.empty()) env.push_back("CLIENT_PREFIX=" + client_prefix);
    env.insert(env.end(), extra_env.begin(), extra_env.end());
    CommandResult r = RunCommand(argv, "", env);
    Handshake h;
    h.exit_code = r.exit_code;
    h.server = ReadFileOrDie(Path("server.log"));
    h.client = ReadFileOrDie(Path("client.log"));
    return h;
  }

  // A completed mutual handshake: both signed through custody (one audit line each), the
  // client saw `protocol` and the server's `peer_sig` signature, the server got the client's
  // certificate and verified it.
  static void ExpectMutualHandshake(const std::string& server_ring, const std::string& client_ring,
                                    const std::vector<std::string>& server_extra,
                                    const std::vector<std::string>& client_extra,
                                    const std::string& protocol, const std::string& peer_sig,
                                    const std::vector<std::string>& extra_env = {}) {
    SCOPED_TRACE(server_ring + " <-> " + client_ring + " " + protocol + " " + peer_sig);
    const size_t server_before = SignLines(server_ring);
    const size_t client_before = SignLines(client_ring);
    Handshake h = Run(server_ring, client_ring, server_extra, client_extra, "", extra_env);
    ASSERT_EQ(h.exit_code, 0) << "client:\n" << h.client << "\nserver:\n" << h.server;
    EXPECT_NE(h.client.find("Protocol  : " + protocol), std::string::npos) << h.client;
    EXPECT_NE(h.client.find("Verify return code: 0 (ok)"), std::string::npos) << h.client;
    EXPECT_NE(h.client.find("Peer signature type: " + peer_sig), std::string::npos) << h.client;
    std::string client_cn = client_ring;
    std::replace(client_cn.begin(), client_cn.end(), '/', '.');
    EXPECT_NE(h.server.find("CN = " + client_cn + ".test"), std::string::npos)
        << "the server got the client certificate:\n"
        << h.server;
    EXPECT_EQ(SignLines(server_ring), server_before + 1) << "server's CertificateVerify/SKE";
    EXPECT_EQ(SignLines(client_ring), client_before + 1) << "client's CertificateVerify";
  }
};

TEST_F(ProviderTlsTest, MutualTls13WithEcdsaKeysOnBothEnds) {
  ExpectMutualHandshake("tls/ec", "clients/ec", {"-tls1_3"}, {"-tls1_3"}, "TLSv1.3", "ECDSA");
}

// OpenSSL 3.0 takes the first loaded provider's implementation of a name: with `default` listed
// before `custody` in openssl.cnf, key generation (req -newkey, ECDHE on P-256) lands on the
// default provider's EC key management and no property query is needed; custody keys still
// sign through custody (their key management is custody's, chosen by the store).
TEST_F(ProviderTlsTest, DefaultListedFirstInOpensslCnfNeedsNoPropertyQuery) {
  const std::string conf = Path("default-first.cnf");
  WriteFileOrDie(conf,
                 "openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n"
                 "[provider_sect]\ndefault = default_sect\ncustody = custody_sect\n"
                 "[default_sect]\nactivate = 1\n[custody_sect]\nmodule = " +
                     BinDir() + "/../lib/ossl-modules/custody.so\naddr = " + daemon_->address() +
                     "\nactivate = 1\n");
  CommandResult r = RunCommand(
      {"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", Path("gen.key"), "-subj", "/CN=generated", "-days", "1", "-out", Path("gen.crt")},
      "", {"OPENSSL_CONF=" + conf});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  ExpectMutualHandshake("tls/ec", "clients/ec", {"-groups", "P-256"},
                        {"-tls1_3", "-groups", "P-256"}, "TLSv1.3", "ECDSA",
                        {"OPENSSL_CONF=" + conf, "TLS_PROVIDERS_FROM_CONF=1"});
  EXPECT_NE(ReadFileOrDie(Path("client.log")).find("Server Temp Key: ECDH, prime256v1"),
            std::string::npos);
  // The other order without the property: key generation lands on custody and fails.
  const std::string custody_first = Path("custody-first.cnf");
  std::string text = ReadFileOrDie(conf);
  text.replace(text.find("default = default_sect\ncustody = custody_sect"),
               std::string("default = default_sect\ncustody = custody_sect").size(),
               "custody = custody_sect\ndefault = default_sect");
  WriteFileOrDie(custody_first, text);
  r = RunCommand({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-keyout", Path("gen2.key"), "-subj", "/CN=generated", "-days", "1",
                  "-out", Path("gen2.crt")},
                 "", {"OPENSSL_CONF=" + custody_first});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("operation not supported for this keytype"), std::string::npos) << r.err;
}

TEST_F(ProviderTlsTest, MutualTls13WithRsaPssServerAndEd25519Client) {
  ExpectMutualHandshake("tls/ps", "clients/ed", {"-tls1_3"}, {"-tls1_3"}, "TLSv1.3", "RSA-PSS");
}

TEST_F(ProviderTlsTest, MutualTls12EcdheEcdsa) {
  ExpectMutualHandshake("tls/ec", "clients/ec", {"-tls1_2"},
                        {"-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"}, "TLSv1.2",
                        "ECDSA");
}

TEST_F(ProviderTlsTest, MutualTls12EcdheRsaWithRsaPss) {
  ExpectMutualHandshake("tls/ps", "clients/ps", {"-tls1_2", "-sigalgs", "rsa_pss_rsae_sha256"},
                        {"-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-sigalgs",
                         "rsa_pss_rsae_sha256", "-client_sigalgs", "rsa_pss_rsae_sha256"},
                        "TLSv1.2", "RSA-PSS");
}

TEST_F(ProviderTlsTest, MutualTls12EcdheRsaWithPkcs1OnRs256Rings) {
  ExpectMutualHandshake("tls/rs", "clients/rs",
                        {"-tls1_2", "-sigalgs", "RSA+SHA256", "-client_sigalgs", "RSA+SHA256"},
                        {"-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-sigalgs",
                         "RSA+SHA256", "-client_sigalgs", "RSA+SHA256"},
                        "TLSv1.2", "RSA");
}

TEST_F(ProviderTlsTest, ClientWithoutTheSignGrantFailsWithThePermissionReason) {
  // The caller's own uid may not sign with locked/**.
  Handshake h = Run("tls/ec", "locked/ec", {"-tls1_3"}, {"-tls1_3"});
  EXPECT_NE(h.exit_code, 0) << h.client;
  EXPECT_NE(h.client.find("custody: PERMISSION_DENIED: "), std::string::npos) << h.client;

  // Another local user (nobody: jwks only) presenting a client key held in custody.
  if (getuid() != 0 || access("/usr/bin/setpriv", X_OK) != 0) {
    GTEST_SKIP() << "switching to uid nobody needs root and setpriv";
  }
  const std::string state = dir_->path() + "/state";
  ASSERT_EQ(chmod(dir_->path().c_str(), 0711), 0);
  ASSERT_EQ(chmod(state.c_str(), 0711), 0);
  ASSERT_EQ(chmod((state + "/custodyd.sock").c_str(), 0666), 0);
  chmod(Path("ca.crt").c_str(), 0644);
  h = Run("tls/ec", "clients/ec", {"-tls1_3"}, {"-tls1_3"},
          "/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups");
  EXPECT_NE(h.exit_code, 0) << h.client;
  EXPECT_NE(h.client.find("custody: PERMISSION_DENIED: "), std::string::npos) << h.client;
  EXPECT_NE(h.client.find("uid:65534"), std::string::npos) << h.client;
}

// nginx 1.22 (Debian's, linked with OpenSSL 3) knows no OSSL_STORE URIs, but reads its key with
// PEM_read_bio_PrivateKey, which runs the providers' decoders: a key file holding
// "custody:ring=nginx/ec" loads the custody key (provider/decoder.cc). nginx runs unprivileged
// (as nobody when the test is root), its master loads the key and its worker signs every
// handshake over its own connection, as its own uid, which custodyd's policy authorizes.
TEST_F(ProviderTest, NginxServesTlsWithAKeyFileNamingACustodyRing) {
  if (access("/usr/sbin/nginx", X_OK) != 0) GTEST_SKIP() << "nginx is not installed";
  const bool root = getuid() == 0;
  if (root && access("/usr/bin/setpriv", X_OK) != 0) GTEST_SKIP() << "setpriv is missing";
  const std::string dir = Path("nginx");
  std::filesystem::create_directories(dir + "/tmp");
  const std::string cert = dir + "/cert.pem";
  CommandResult r =
      OpenSsl("req", {"-x509", "-key", "custody:ring=nginx/ec", "-subj", "/CN=localhost", "-addext",
                      "subjectAltName=DNS:localhost", "-days", "1", "-out", cert});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteFileOrDie(dir + "/key.custody", "custody:ring=nginx/ec\n");
  WriteFileOrDie(dir + "/openssl.cnf",
                 "openssl_conf = openssl_init\n"
                 "[openssl_init]\n"
                 "providers = provider_sect\n"
                 "alg_section = algorithm_sect\n"
                 "[provider_sect]\n"
                 "default = default_sect\n"
                 "custody = custody_sect\n"
                 "[default_sect]\n"
                 "activate = 1\n"
                 "[custody_sect]\n"
                 "module = " +
                     BinDir() + "/../lib/ossl-modules/custody.so\n" +
                     "addr = " + daemon_->address() +
                     "\n"
                     "activate = 1\n"
                     "[algorithm_sect]\n"
                     "default_properties = ?provider=default\n");
  const int port = FreePort();
  WriteFileOrDie(dir + "/nginx.conf",
                 "daemon off;\nmaster_process on;\nworker_processes 1;\npid " + dir +
                     "/nginx.pid;\nerror_log " + dir + "/error.log info;\nenv OPENSSL_CONF;\n" +
                     "events { worker_connections 64; }\nhttp {\n  access_log " + dir +
                     "/access.log;\n  client_body_temp_path " + dir + "/tmp/body;\n" +
                     "  proxy_temp_path " + dir + "/tmp/proxy;\n  fastcgi_temp_path " + dir +
                     "/tmp/fastcgi;\n  uwsgi_temp_path " + dir + "/tmp/uwsgi;\n" +
                     "  scgi_temp_path " + dir +
                     "/tmp/scgi;\n  server {\n    listen 127.0.0.1:" + std::to_string(port) +
                     " ssl;\n    ssl_certificate " + cert + ";\n    ssl_certificate_key " + dir +
                     "/key.custody;\n" + "    ssl_protocols TLSv1.2 TLSv1.3;\n" +
                     "    location / { return 200 \"served with a custody key\\n\"; }\n  }\n}\n");
  std::vector<std::string> argv = {"timeout", "60"};
  if (root) {
    // Unprivileged: nobody reaches the socket (as in the permission test) and owns nginx's files.
    ASSERT_EQ(chmod(dir_->path().c_str(), 0711), 0);
    ASSERT_EQ(chmod((dir_->path() + "/state").c_str(), 0711), 0);
    ASSERT_EQ(chmod((dir_->path() + "/state/custodyd.sock").c_str(), 0666), 0);
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
      ASSERT_EQ(chown(e.path().c_str(), kNobody, kNobody), 0);
    }
    ASSERT_EQ(chown(dir.c_str(), kNobody, kNobody), 0);
    argv.insert(argv.end(),
                {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"});
  }
  argv.insert(argv.end(),
              {"/usr/sbin/nginx", "-p", dir, "-c", dir + "/nginx.conf", "-e", dir + "/error.log"});
  CommandResult nginx;
  std::thread server(
      [&] { nginx = RunCommand(argv, "", {"OPENSSL_CONF=" + dir + "/openssl.cnf"}); });
  const size_t before = SignLines("nginx/ec");
  std::string body;
  for (int i = 0; i < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CommandResult c =
        RunCommand({"openssl", "s_client", "-connect", "127.0.0.1:" + std::to_string(port),
                    "-servername", "localhost", "-CAfile", cert, "-verify_return_error", "-quiet"},
                   "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n");
    if (c.out.find("served with a custody key") != std::string::npos) {
      body = c.out;
      break;
    }
  }
  // A second handshake on a new connection.
  CommandResult again = RunCommand(
      {"openssl", "s_client", "-connect", "127.0.0.1:" + std::to_string(port), "-servername",
       "localhost", "-CAfile", cert, "-verify_return_error", "-quiet", "-tls1_2"},
      "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n");
  if (std::filesystem::exists(dir + "/nginx.pid")) {
    kill(std::stoi(ReadFileOrDie(dir + "/nginx.pid")), SIGQUIT);
  }
  server.join();
  const std::string error_log = ReadFileOrDie(dir + "/error.log");
  EXPECT_NE(body.find("HTTP/1.1 200 OK"), std::string::npos) << body << error_log << nginx.err;
  EXPECT_NE(again.out.find("served with a custody key"), std::string::npos)
      << again.out << again.err << error_log;
  // Both handshakes were custody signatures, by nginx's worker's uid.
  EXPECT_EQ(SignLines("nginx/ec"), before + 2);
  std::string audit;
  for (const auto& e : std::filesystem::directory_iterator(dir_->path() + "/state/audit")) {
    audit += ReadFileOrDie(e.path().string());
  }
  const std::string identity = "\"identity\":\"uid:" + std::to_string(root ? kNobody : getuid()) +
                               "\",\"operation\":\"sign\",\"ring\":\"nginx/ec\"";
  EXPECT_NE(audit.find(identity), std::string::npos) << audit;
}

}  // namespace
}  // namespace custody::testing
