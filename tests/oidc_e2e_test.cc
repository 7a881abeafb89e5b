// End to end against oidc-provider (npm, the OpenID-certified Node.js authorization server):
// the client-side program examples/fapi_flow.cc, with all its keys in a real custodyd, completes
// a FAPI 2.0 flow (PAR with a signed request object, private_key_jwt, PKCE, DPoP with server
// nonces, an ID token encrypted RSA-OAEP-256 + A256GCM to a custody DECRYPT ring, userinfo with
// the DPoP-bound token); then the client's signing ring is rotated and the flow runs again with
// the new kid. OidcDpopRingTest: a DPoP-bound access token stays usable across a rotation of the
// signing ring when a dedicated DPoP ring signs the proofs, and dies with the rotation when the
// signing ring signs them.
//
// What is checked against what: the provider (tests/js/oidc_provider.mjs, oidc-provider 9.13.3
// pinned in tests/js/package-lock.json) is the judge of every custody-made artifact. It learns
// the client's keys only by fetching the client's jwks_uri (served from a file this test writes
// with custody's GetJwks), reports each accepted artifact's kid (client assertion, request
// object) and DPoP key thumbprint, and reports every error it answers with; any error other than
// its request for a DPoP nonce fails the test. The expected kids come from GetKeyRing.
//
// oidc-provider keeps a client's fetched JWKS at least 60 s and refetches only once that has
// passed; the test sends the provider SIGUSR2 to expire that copy instead of waiting, then
// checks that the provider refetched jwks_uri. The new key is in the provider's first fetch
// already (custody pre-publishes the PENDING key), which is what makes the rotation seamless.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "jose/json.h"
#include "tests/testing/harness.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr char kSigningRing[] = "clients/fapi/sign";
constexpr char kDecryptionRing[] = "clients/fapi/id-token-enc";
constexpr char kClientId[] = "custody-fapi-client";
constexpr char kRedirectUri[] = "https://client.example/cb";
constexpr int64_t kPrepublishMs = 2000;

// The deadline of this file's RPCs (rpc_helpers.h's are a hang guard only).
constexpr std::chrono::milliseconds kCallTimeout = 30s;

std::string Str(const jose::Json& json, const char* name) {
  const jose::Json* member = json.Find(name);
  return member != nullptr ? member->as_string() : "";
}

// Whether the "kids" array of a client_jwks.served event holds `kid`.
bool ServedKid(const jose::Json& event, const std::string& kid) {
  const jose::Json* kids = event.Find("kids");
  if (kids == nullptr) return false;
  for (const jose::Json& item : kids->as_array()) {
    if (item.as_string() == kid) return true;
  }
  return false;
}

// tests/js/oidc_provider.mjs in a child process; its stdout (one JSON event per line) goes to
// a file that Events() parses.
class OidcProvider {
 public:
  // With `client_jwks_uri`, the client's jwks_uri is that URL, its https certificate trusted
  // through `extra_ca` (NODE_EXTRA_CA_CERTS).
  OidcProvider(const std::string& dir, const std::string& client_jwks_file,
               const std::string& client_jwks_uri = "", const std::string& extra_ca = "")
      : out_path_(dir + "/provider.out"), err_path_(dir + "/provider.err") {
    std::vector<std::string> argv = {"node",
                                     SourceDir() + "/tests/js/oidc_provider.mjs",
                                     "--port=0",
                                     std::string("--client_id=") + kClientId,
                                     std::string("--redirect_uri=") + kRedirectUri,
                                     "--client_jwks_file=" + client_jwks_file};
    if (!client_jwks_uri.empty()) argv.push_back("--client_jwks_uri=" + client_jwks_uri);
    absl::StatusOr<ChildProcess> child =
        ChildProcess::Start({.argv = argv,
                             .env = {"NODE_EXTRA_CA_CERTS=" + extra_ca},
                             .stdout_path = out_path_,
                             .stderr_path = err_path_});
    if (child.ok()) process_ = *std::move(child);
  }

  void Signal(int sig) { process_.Signal(sig); }
  // True once the process has exited (reaped here; the destructor then has nothing to do).
  bool exited() const { return !process_.Running(); }

  // Every complete event line written so far.
  std::vector<jose::Json> Events() const {
    std::vector<jose::Json> events;
    std::string out = ReadFileOrDie(out_path_);
    for (size_t start = 0, end; (end = out.find('\n', start)) != std::string::npos;
         start = end + 1) {
      auto event = jose::ParseJson(std::string_view(out).substr(start, end - start));
      if (event.ok()) events.push_back(*std::move(event));
    }
    return events;
  }

  // The first event from index `from` on named `name`, waiting up to `timeout`.
  std::optional<jose::Json> WaitFor(const std::string& name, size_t from,
                                    std::chrono::seconds timeout) const {
    for (const auto deadline = Clock::now() + timeout;; std::this_thread::sleep_for(20ms)) {
      std::vector<jose::Json> events = Events();
      for (size_t i = from; i < events.size(); ++i) {
        if (Str(events[i], "event") == name) return events[i];
      }
      if (Clock::now() >= deadline || exited()) return std::nullopt;
    }
  }

  std::string Log() const {
    return "provider stdout:\n" + ReadFileOrDie(out_path_) + "provider stderr:\n" +
           ReadFileOrDie(err_path_);
  }

 private:
  std::string out_path_, err_path_;
  mutable ChildProcess process_;  // SIGTERM, then SIGKILL after 5 s, when the test ends
};

const v1::KeyVersion* VersionIn(const v1::KeyRing& ring, v1::KeyVersionState state) {
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.state() == state) return &v;
  }
  return nullptr;
}

// Writes what the client's jwks_uri serves: custody's JWKS of both client rings.
jose::Json PublishClientJwks(Custodyd& d, const std::string& path) {
  v1::GetJwksRequest req;
  req.add_rings(kSigningRing);
  req.add_rings(kDecryptionRing);
  v1::GetJwksResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  grpc::Status s = d.signer().GetJwks(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  WriteFileOrDie(path, resp.jwks());
  auto jwks = jose::ParseJson(resp.jwks());
  EXPECT_TRUE(jwks.ok()) << resp.jwks();
  return jwks.ok() ? *jwks : jose::Json::MakeObject();
}

CommandResult RunFlow(Custodyd& d, const std::string& issuer,
                      const std::string& signing_ring = kSigningRing,
                      const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {BinDir() + "/fapi_flow",
                                   "--addr=" + d.address(),
                                   "--issuer=" + issuer,
                                   std::string("--client_id=") + kClientId,
                                   std::string("--redirect_uri=") + kRedirectUri,
                                   "--signing_ring=" + signing_ring,
                                   std::string("--decryption_ring=") + kDecryptionRing};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return RunCommand(argv);
}

// What the provider reported from event index `from` on: each artifact it accepted was made
// with `kid` (the client assertion and request object by kid, the DPoP proofs by the RFC 7638
// thumbprint of the embedded key, which custody's kids are), the flow reached userinfo, and it
// rejected nothing and failed at nothing (asking for a DPoP nonce is not a rejection).
void ExpectProviderAccepted(const OidcProvider& op, size_t from, const std::string& kid) {
  // The provider logs its success events asynchronously (after hashing the DPoP key).
  for (const char* last : {"grant.success", "userinfo.success"}) op.WaitFor(last, from, 10s);
  std::vector<jose::Json> events = op.Events();
  int par = 0, grant = 0, userinfo = 0;
  for (size_t i = from; i < events.size(); ++i) {
    const jose::Json& e = events[i];
    const std::string name = Str(e, "event");
    if (name == "pushed_authorization_request.success") {
      ++par;
      EXPECT_EQ(Str(e, "request_object_kid"), kid) << e.Serialize();
    }
    if (name == "grant.success") ++grant;
    if (name == "userinfo.success") ++userinfo;
    if (name == "pushed_authorization_request.success" || name == "grant.success") {
      EXPECT_EQ(Str(e, "client_assertion_kid"), kid) << e.Serialize();
      EXPECT_EQ(Str(e, "dpop_jkt"), kid) << e.Serialize();
    }
    if (name.find("error") != std::string::npos || name.ends_with(".failed")) {
      EXPECT_EQ(Str(e, "error"), "use_dpop_nonce") << "provider rejected: " << e.Serialize();
    }
  }
  EXPECT_EQ(par, 1);
  EXPECT_EQ(grant, 1);
  EXPECT_EQ(userinfo, 1);
}

// custodyd with the client's rings, and the provider with the client registered; the client's
// jwks_uri serves custody's JWKS of both rings.
class OidcE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (RunCommand({"sh", "-c", "command -v node"}).exit_code != 0) {
      GTEST_SKIP() << "node is not installed (scripts/deps.sh installs nodejs and npm)";
    }
    // oidc-provider 9 uses crypto.hash and URL.parse (Node.js 20.18+; 22 LTS is its supported
    // runtime). Debian 12's own nodejs package is 18.
    CommandResult node = RunCommand({"node", "-e",
                                     "const [a,b]=process.versions.node.split('.').map(Number);"
                                     "process.exit(a>20||(a===20&&b>=18)?0:1)"});
    ASSERT_EQ(node.exit_code, 0) << "oidc-provider 9 needs Node.js >= 20.18; this node is "
                                 << RunCommand({"node", "--version"}).out;
    ASSERT_TRUE(
        std::filesystem::exists(SourceDir() + "/tests/js/node_modules/oidc-provider/package.json"))
        << "oidc-provider is not installed: run `npm ci` in tests/js (scripts/test.sh does)";
    std::vector<std::string> flags;
    if (jwks_from_custody_) {
      // custodyd serves the client's jwks_uri itself, over TLS with a certificate for 127.0.0.1.
      CommandResult cert = RunCommand(
          {"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", dir_.path() + "/jwks.key", "-out", jwks_ca_, "-days", "1", "-subj",
           "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"});
      ASSERT_EQ(cert.exit_code, 0) << cert.err;
      const int port = FreePort();
      jwks_uri_ = "https://127.0.0.1:" + std::to_string(port) + "/clients/fapi/jwks.json";
      flags = {"--jwks_listen=127.0.0.1:" + std::to_string(port),
               std::string("--jwks_publish=") + kSigningRing + "," + kDecryptionRing,
               std::string("--jwks_alias=/clients/fapi/jwks.json=") + kSigningRing + "+" +
                   kDecryptionRing,
               "--jwks_tls_cert=" + jwks_ca_, "--jwks_tls_key=" + dir_.path() + "/jwks.key"};
    }
    custodyd_ = std::make_unique<Custodyd>(dir_.path() + "/state", WithLowPolicyFloors(flags));
    ASSERT_TRUE(custodyd_->started()) << custodyd_->log();

    // The client's keys: one ES256 signing ring (client assertions, request objects, DPoP) with
    // a short pre-publication, and an RSA-OAEP-256 ring the ID tokens are encrypted to.
    v1::CreateKeyRingRequest sign;
    sign.set_name(kSigningRing);
    sign.set_purpose(v1::SIGN);
    sign.set_alg("ES256");
    sign.mutable_policy()->set_prepublish_ms(kPrepublishMs);
    sign.mutable_policy()->set_retain_ms(3600 * 1000);
    sign.mutable_policy()->set_destroy_delay_ms(3600 * 1000);
    ASSERT_TRUE(CreateRing(*custodyd_, sign).ok());
    v1::CreateKeyRingRequest decrypt;
    decrypt.set_name(kDecryptionRing);
    decrypt.set_purpose(v1::DECRYPT);
    decrypt.set_alg("RSA-OAEP-256");
    decrypt.set_rsa_bits(2048);
    ASSERT_TRUE(CreateRing(*custodyd_, decrypt).ok());

    PublishClientJwks(*custodyd_, jwks_path_);
    provider_ = std::make_unique<OidcProvider>(dir_.path(), jwks_path_, jwks_uri_, jwks_ca_);
    std::optional<jose::Json> ready = provider_->WaitFor("ready", 0, 30s);
    ASSERT_TRUE(ready.has_value()) << provider_->Log();
    issuer_ = Str(*ready, "issuer");
  }

  // Flows 1 and 2: the client's keys before and after its signing ring rotates.
  void FlowsAcrossSigningKeyRotation();

  TempDir dir_;
  const std::string jwks_path_ = dir_.path() + "/client-jwks.json";
  bool jwks_from_custody_ = false;  // the client's jwks_uri is custodyd's --jwks_listen
  const std::string jwks_ca_ = dir_.path() + "/jwks.pem";
  std::string jwks_uri_;
  std::unique_ptr<Custodyd> custodyd_;
  std::unique_ptr<OidcProvider> provider_;
  std::string issuer_;
};

TEST_F(OidcE2eTest, FapiFlowWithCustodyKeysCompletesBeforeAndAfterSigningKeyRotation) {
  FlowsAcrossSigningKeyRotation();
}

// The client's jwks_uri is custodyd's own JWKS listener (--jwks_listen over TLS, an alias serving
// both client rings as one set): no file, no server of the client's; the provider fetches it over
// https before the rotation and again after, and verifies the private_key_jwt assertions (and
// request objects, DPoP proofs) with what it fetched.
class OidcCustodyJwksUriTest : public OidcE2eTest {
 protected:
  OidcCustodyJwksUriTest() { jwks_from_custody_ = true; }
};

TEST_F(OidcCustodyJwksUriTest, ProviderVerifiesClientAssertionsWithKeysFromCustodysJwksListener) {
  FlowsAcrossSigningKeyRotation();
  if (HasFatalFailure()) return;
  std::vector<jose::Json> events = provider_->Events();
  int fetched = 0;
  for (const jose::Json& e : events) {
    if (Str(e, "event") == "client_jwks.fetch") {
      EXPECT_EQ(Str(e, "url"), jwks_uri_);
      ++fetched;
    }
    if (Str(e, "event") == "client_jwks.served") {
      EXPECT_EQ(e.Find("status")->Serialize(), "200") << e.Serialize();
    }
  }
  EXPECT_GE(fetched, 2) << provider_->Log();
}

void OidcE2eTest::FlowsAcrossSigningKeyRotation() {
  const auto started = Clock::now();
  Custodyd& d = *custodyd_;
  OidcProvider& op = *provider_;
  v1::KeyRing ring = GetRing(d, kSigningRing);
  ASSERT_NE(VersionIn(ring, v1::ACTIVE), nullptr);
  ASSERT_NE(VersionIn(ring, v1::PENDING), nullptr) << "an explicit policy keeps a next key";
  const std::string kid_a = VersionIn(ring, v1::ACTIVE)->kid();
  const std::string kid_b = VersionIn(ring, v1::PENDING)->kid();
  const v1::KeyRing enc_ring = GetRing(d, kDecryptionRing);
  ASSERT_NE(VersionIn(enc_ring, v1::ACTIVE), nullptr);
  const std::string enc_kid = VersionIn(enc_ring, v1::ACTIVE)->kid();

  // Flow 1, with the first key.
  CommandResult flow = RunFlow(d, issuer_);
  ASSERT_EQ(flow.exit_code, 0) << flow.out << flow.err << op.Log();
  EXPECT_NE(flow.out.find("flow ok signing_kid=" + kid_a + " decryption_kid=" + enc_kid + " "),
            std::string::npos)
      << flow.out;
  EXPECT_NE(flow.out.find(R"("alg":"RSA-OAEP-256")"), std::string::npos) << flow.out;
  EXPECT_NE(flow.out.find(R"("enc":"A256GCM")"), std::string::npos) << flow.out;
  std::printf("flow 1:\n%s", flow.out.c_str());
  ExpectProviderAccepted(op, 0, kid_a);
  std::optional<jose::Json> first_fetch = op.WaitFor("client_jwks.served", 0, 0s);
  ASSERT_TRUE(first_fetch.has_value()) << "the provider never fetched jwks_uri\n" << op.Log();
  EXPECT_TRUE(ServedKid(*first_fetch, kid_a) && ServedKid(*first_fetch, kid_b))
      << "the next key was not pre-published: " << first_fetch->Serialize();

  // Rotation once the PENDING key has been published for the prepublish period (custodyd says
  // when it is eligible; the test does not force it).
  v1::RotateKeyRingResponse rotated;
  for (auto deadline = Clock::now() + 20s; !rotated.rotated() && Clock::now() < deadline;) {
    v1::RotateKeyRingRequest req;
    req.set_ring(kSigningRing);
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = d.admin().RotateKeyRing(&ctx, req, &rotated);
    // Not yet eligible: FAILED_PRECONDITION saying when.
    ASSERT_TRUE(s.ok() || NotRotatedUntilMs(s) > 0) << s.error_message();
    if (!s.ok()) rotated.Clear();
    if (!rotated.rotated()) std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(rotated.rotated()) << rotated.message();
  ring = GetRing(d, kSigningRing);
  ASSERT_NE(VersionIn(ring, v1::ACTIVE), nullptr);
  ASSERT_EQ(VersionIn(ring, v1::ACTIVE)->kid(), kid_b);
  const jose::Json served = PublishClientJwks(d, jwks_path_);
  ASSERT_NE(served.Find("keys"), nullptr);

  // The provider refetches the client's jwks_uri (its cached copy expired), then flow 2 runs
  // with the new key.
  const size_t mark = op.Events().size();
  op.Signal(SIGUSR2);
  ASSERT_TRUE(op.WaitFor("client_jwks.cache_expired", mark, 10s).has_value()) << op.Log();
  flow = RunFlow(d, issuer_);
  ASSERT_EQ(flow.exit_code, 0) << flow.out << flow.err << op.Log();
  EXPECT_NE(flow.out.find("flow ok signing_kid=" + kid_b + " decryption_kid=" + enc_kid + " "),
            std::string::npos)
      << flow.out;
  std::printf("flow 2:\n%s", flow.out.c_str());
  ExpectProviderAccepted(op, mark, kid_b);
  std::optional<jose::Json> refetch = op.WaitFor("client_jwks.served", mark, 0s);
  ASSERT_TRUE(refetch.has_value()) << "the provider did not refetch jwks_uri\n" << op.Log();
  for (const jose::Json& key : served.Find("keys")->as_array()) {
    EXPECT_TRUE(ServedKid(*refetch, Str(key, "kid"))) << refetch->Serialize();
  }

  const auto seconds = std::chrono::duration<double>(Clock::now() - started).count();
  std::printf("oidc e2e: kid %s -> %s, %.1f s\n", kid_a.c_str(), kid_b.c_str(), seconds);
}

// The judge is awake: a key custody holds but the client's jwks_uri does not publish is refused
// at the first artifact it signs (the PAR's client assertion), once the provider has fetched
// jwks_uri and found no such key.
TEST_F(OidcE2eTest, ProviderRefusesKeyNotPublishedAtJwksUri) {
  ASSERT_TRUE(CreateEs256Ring(custodyd_->admin(), "clients/fapi/unpublished").ok());
  CommandResult flow = RunFlow(*custodyd_, issuer_, "clients/fapi/unpublished");
  EXPECT_EQ(flow.exit_code, 1) << flow.out << flow.err;
  EXPECT_NE(flow.err.find("invalid_client"), std::string::npos) << flow.err;
  std::optional<jose::Json> refused =
      provider_->WaitFor("pushed_authorization_request.error", 0, 10s);
  ASSERT_TRUE(refused.has_value()) << provider_->Log();
  EXPECT_EQ(Str(*refused, "error"), "invalid_client") << refused->Serialize();
  EXPECT_EQ(provider_->WaitFor("pushed_authorization_request.success", 0, 0s), std::nullopt);
  EXPECT_TRUE(provider_->WaitFor("client_jwks.served", 0, 0s).has_value()) << provider_->Log();
}

// A DPoP-bound access token is bound to the key of the proofs of its token request (cnf.jkt). The
// flow obtains one, the signing ring is force-rotated while the flow waits, and the flow calls
// userinfo again with the same token: with DPoP proofs from a dedicated DPoP ring the provider
// accepts it; with proofs from the (rotated) signing ring it refuses it. The second half is why
// the option exists.
class OidcDpopRingTest : public OidcE2eTest {
 protected:
  // Runs the flow with `extra` flags and --reuse_token_after; once the provider reported the
  // first userinfo, force-rotates the signing ring and lets the flow reuse its token.
  CommandResult FlowAcrossSigningRotation(const std::vector<std::string>& extra) {
    const std::string go = dir_.path() + "/reuse-now";
    std::vector<std::string> flags = extra;
    flags.push_back("--reuse_token_after=" + go);
    CommandResult flow;
    std::thread runner([&] { flow = RunFlow(*custodyd_, issuer_, kSigningRing, flags); });
    const bool first_done = provider_->WaitFor("userinfo.success", 0, 60s).has_value();
    EXPECT_TRUE(first_done) << provider_->Log();
    if (first_done) {
      v1::RotateKeyRingRequest req;
      req.set_ring(kSigningRing);
      req.set_force(true);
      v1::RotateKeyRingResponse rotated;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kCallTimeout);
      grpc::Status s = custodyd_->admin().RotateKeyRing(&ctx, req, &rotated);
      EXPECT_TRUE(s.ok() && rotated.rotated()) << s.error_message() << rotated.message();
      const v1::KeyRing ring = GetRing(*custodyd_, kSigningRing);
      const v1::KeyVersion* active = VersionIn(ring, v1::ACTIVE);
      EXPECT_TRUE(active != nullptr && active->kid() != signing_kid_) << "no new signing key";
    }
    WriteFileOrDie(go, "");  // the flow waits for it either way
    runner.join();
    return flow;
  }

  void SetUp() override {
    OidcE2eTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    const v1::KeyRing ring = GetRing(*custodyd_, kSigningRing);
    const v1::KeyVersion* active = VersionIn(ring, v1::ACTIVE);
    ASSERT_NE(active, nullptr);
    signing_kid_ = active->kid();
  }

  std::string signing_kid_;
};

TEST_F(OidcDpopRingTest, DpopBoundTokenStaysUsableAcrossSigningRotationWithADedicatedDpopRing) {
  ASSERT_TRUE(CreateEs256Ring(custodyd_->admin(), "clients/fapi/dpop").ok());
  const v1::KeyRing dpop_ring = GetRing(*custodyd_, "clients/fapi/dpop");
  const v1::KeyVersion* dpop_active = VersionIn(dpop_ring, v1::ACTIVE);
  ASSERT_NE(dpop_active, nullptr);
  const std::string dpop_kid = dpop_active->kid();

  CommandResult flow = FlowAcrossSigningRotation({"--dpop_ring=clients/fapi/dpop"});
  ASSERT_EQ(flow.exit_code, 0) << flow.out << flow.err << provider_->Log();
  EXPECT_NE(flow.out.find("flow ok signing_kid=" + signing_kid_ + " "), std::string::npos)
      << flow.out;
  EXPECT_NE(flow.out.find("reuse ok dpop_kid=" + dpop_kid + " sub="), std::string::npos)
      << flow.out;
  std::printf("dpop ring flow:\n%s", flow.out.c_str());

  // The provider's view: the client assertions by the signing key, every DPoP proof (token
  // request, both userinfo calls) by the DPoP ring's key, two userinfo successes, no error. The
  // success events are logged asynchronously: wait for the second userinfo's.
  auto count = [&](const std::string& event) {
    int n = 0;
    for (const jose::Json& e : provider_->Events()) n += Str(e, "event") == event;
    return n;
  };
  for (auto deadline = Clock::now() + 10s;
       count("userinfo.success") < 2 && Clock::now() < deadline;) {
    std::this_thread::sleep_for(20ms);
  }
  int userinfo = 0;
  for (const jose::Json& e : provider_->Events()) {
    const std::string name = Str(e, "event");
    if (name == "grant.success") {
      EXPECT_EQ(Str(e, "client_assertion_kid"), signing_kid_) << e.Serialize();
      EXPECT_EQ(Str(e, "dpop_jkt"), dpop_kid) << e.Serialize();
    }
    if (name == "userinfo.success") {
      ++userinfo;
      EXPECT_EQ(Str(e, "dpop_jkt"), dpop_kid) << e.Serialize();
    }
    if (name.find("error") != std::string::npos) {
      EXPECT_EQ(Str(e, "error"), "use_dpop_nonce") << "provider rejected: " << e.Serialize();
    }
  }
  EXPECT_EQ(userinfo, 2) << provider_->Log();
}

TEST_F(OidcDpopRingTest, DpopBoundTokenDiesWithTheSigningKeyWhenTheSigningRingSignsProofs) {
  CommandResult flow = FlowAcrossSigningRotation({});
  EXPECT_EQ(flow.exit_code, 1) << flow.out << flow.err;
  EXPECT_NE(flow.out.find("flow ok signing_kid=" + signing_kid_ + " "), std::string::npos)
      << flow.out;
  EXPECT_EQ(flow.out.find("reuse ok"), std::string::npos) << flow.out;
  std::optional<jose::Json> refused = provider_->WaitFor("userinfo.error", 0, 10s);
  ASSERT_TRUE(refused.has_value()) << provider_->Log();
  EXPECT_EQ(Str(*refused, "error"), "invalid_token") << refused->Serialize();
  EXPECT_EQ(Str(*refused, "detail"), "failed jkt verification") << refused->Serialize();
  std::printf("signing-ring DPoP after rotation: %s\n", refused->Serialize().c_str());
}

}  // namespace
}  // namespace custody::testing
