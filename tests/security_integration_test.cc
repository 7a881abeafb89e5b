// Who custodyd lets in, and what it records: real TLS on loopback with a test PKI made by
// python3-cryptography, the access policy, its reload, the hash-chained audit log (checked by
// custodyctl audit verify) and failing closed when the audit log cannot be written.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

constexpr char kPolicy[] = R"({"version": 1, "grants": [
  {"identities": ["unix"], "operations": ["sign", "decrypt", "jwks", "admin.read",
   "admin.rotate", "admin.create", "admin.destroy", "admin.import"], "rings": ["**"]},
  {"identities": ["spiffe://bank.example/as"], "operations": ["sign", "jwks", "admin.read"],
   "rings": ["op/*"]},
  {"identities": ["dns:as.bank.example"], "operations": ["admin.create"], "rings": ["op/*"]},
  {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
]})";

// kPolicy plus a sign grant for the RP: what the reload test switches to.
constexpr char kPolicyWithRp[] = R"({"version": 1, "grants": [
  {"identities": ["spiffe://bank.example/as", "spiffe://bank.example/rp"],
   "operations": ["sign", "jwks", "admin.read"], "rings": ["op/*"]},
  {"identities": ["dns:as.bank.example"], "operations": ["admin.create"], "rings": ["op/*"]},
  {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
]})";

struct Pki {
  TempDir dir;
  Pki() {
    CommandResult r =
        RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/make_certs.py", dir.path()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  std::string Path(const std::string& name) const { return dir.path() + "/" + name; }
};

client::ChannelOptions Client(const Pki& pki, const std::string& addr, const std::string& who) {
  client::ChannelOptions o;
  o.address = addr;
  o.ca_file = pki.Path("ca.pem");
  if (!who.empty()) {
    o.cert_file = pki.Path(who + ".pem");
    o.key_file = pki.Path(who + ".key");
  }
  return o;
}

grpc::Status SignAs(const client::ChannelOptions& options, const std::string& ring,
                    custody::v1::SignJwsResponse* out = nullptr) {
  auto channel = client::CreateChannel(options);
  if (!channel.ok()) return grpc::Status(grpc::StatusCode::INTERNAL, "channel");
  auto stub = custody::v1::Signer::NewStub(*channel);
  custody::v1::SignJwsRequest req;
  req.set_ring(ring);
  req.set_payload("{}");
  custody::v1::SignJwsResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Status s = stub->SignJws(&ctx, req, &resp);
  if (out != nullptr) *out = resp;
  return s;
}

// A custodyd on TCP+mTLS (for the remote callers) next to one on its Unix socket (the local
// operator): two processes on two state dirs would not share rings, so the test uses the Unix
// instance only where it needs the operator.
class MtlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    state_ = dir_.path() + "/state";
    std::filesystem::create_directories(state_);
    std::filesystem::permissions(state_, std::filesystem::perms::owner_all);
    WriteFileOrDie(state_ + "/policy.json", kPolicy);
    addr_ = "127.0.0.1:" + std::to_string(FreePort());
    std::filesystem::copy_file(pki_.Path("server.pem"), dir_.path() + "/server.pem");
    std::filesystem::copy_file(pki_.Path("server.key"), dir_.path() + "/server.key");
    daemon_ = std::make_unique<Custodyd>(
        state_,
        std::vector<std::string>{"--tls_cert=" + dir_.path() + "/server.pem",
                                 "--tls_key=" + dir_.path() + "/server.key",
                                 "--client_ca=" + pki_.Path("ca.pem"), "--tls_reload_seconds=1"},
        Client(pki_, addr_, "as"));
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
    // The ring is created by the identity granted admin.create (a DNS SAN identity).
    auto channel = client::CreateChannel(Client(pki_, addr_, "dns"));
    ASSERT_TRUE(channel.ok());
    auto admin = custody::v1::KeyAdmin::NewStub(*channel);
    grpc::Status s = CreateEs256Ring(*admin, "op/id-token");
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  Pki pki_;
  TempDir dir_;
  std::string state_;
  std::string addr_;
  std::unique_ptr<Custodyd> daemon_;
};

TEST_F(MtlsTest, CallersWithoutAValidCertificateAreRefused) {
  for (const std::string who : {"", "other", "expired"}) {
    client::ChannelOptions options = Client(pki_, addr_, who);
    if (who == "other") options.cert_file = pki_.Path("other.pem");
    grpc::Status s = SignAs(options, "op/id-token");
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE)
        << (who.empty() ? "no certificate" : who) << ": " << s.error_message();
  }
}

TEST_F(MtlsTest, IdentityWithoutGrantIsDeniedAlikeForExistingAndMissingRings) {
  // The AS is granted sign on op/*: it signs.
  custody::v1::SignJwsResponse jws;
  grpc::Status s = SignAs(Client(pki_, addr_, "as"), "op/id-token", &jws);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(jws.jws().empty());
  // The RP has no sign grant: denied, and the answer for an existing ring equals the answer
  // for a missing one (apart from the name it was asked about).
  grpc::Status existing = SignAs(Client(pki_, addr_, "rp"), "op/id-token");
  grpc::Status missing = SignAs(Client(pki_, addr_, "rp"), "op/nope");
  EXPECT_EQ(existing.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  std::string a = existing.error_message(), b = missing.error_message();
  a.replace(a.find("op/id-token"), 11, "X");
  b.replace(b.find("op/nope"), 7, "X");
  EXPECT_EQ(a, b);
  // The AS may not sign outside op/*, nor create rings.
  EXPECT_EQ(SignAs(Client(pki_, addr_, "as"), "clients/x").error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // Everyone authenticated may read public keys.
  auto rp_channel = client::CreateChannel(Client(pki_, addr_, "rp"));
  auto signer = custody::v1::Signer::NewStub(*rp_channel);
  custody::v1::GetJwksRequest jwks_req;
  custody::v1::GetJwksResponse jwks;
  grpc::ClientContext ctx;
  ASSERT_TRUE(signer->GetJwks(&ctx, jwks_req, &jwks).ok());
  EXPECT_NE(jwks.jwks().find(jws.kid()), std::string::npos);
}

// A batch is answered item by item exactly as single calls would be: each item authorized for
// the caller's certificate identity, signed or refused with its own status, and audited on its
// own line; the OK items verify independently and carry the payload that was asked for.
TEST_F(MtlsTest, SignJwsBatchItemsAreAuthorizedSignedAndAuditedOneByOne) {
  auto channel = client::CreateChannel(Client(pki_, addr_, "as"));
  ASSERT_TRUE(channel.ok());
  auto signer = custody::v1::Signer::NewStub(*channel);
  custody::v1::SignJwsBatchRequest batch;
  auto add = [&](const std::string& ring, const std::string& payload,
                 const std::string& extra = "") {
    custody::v1::SignJwsRequest* r = batch.add_requests();
    r->set_ring(ring);
    r->set_payload(payload);
    r->set_typ("JWT");
    r->set_extra_header_json(extra);
  };
  add("op/id-token", R"({"item":0})");
  add("clients/x", R"({"item":1})");                         // the AS is granted sign on op/* only
  add("op/nope", R"({"item":2})");                           // granted, but no such ring
  add("op/id-token", R"({"item":3})", R"({"alg":"none"})");  // reserved member
  add("op/id-token", R"({"item":4})", R"({"x-fapi":"1"})");
  custody::v1::SignJwsBatchResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = signer->SignJwsBatch(&ctx, batch, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(resp.results_size(), 5);
  const std::vector<grpc::StatusCode> want = {
      grpc::StatusCode::OK, grpc::StatusCode::PERMISSION_DENIED, grpc::StatusCode::NOT_FOUND,
      grpc::StatusCode::INVALID_ARGUMENT, grpc::StatusCode::OK};
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(resp.results(i).code(), static_cast<int>(want[i]))
        << i << ": " << resp.results(i).message();
  }
  EXPECT_NE(resp.results(1).message().find("spiffe://bank.example/as"), std::string::npos)
      << resp.results(1).message();
  EXPECT_NE(resp.results(3).message().find("alg"), std::string::npos) << resp.results(3).message();
  EXPECT_FALSE(resp.results(1).has_response());

  custody::v1::GetJwksRequest jwks_req;
  custody::v1::GetJwksResponse jwks;
  grpc::ClientContext jwks_ctx;
  ASSERT_TRUE(signer->GetJwks(&jwks_ctx, jwks_req, &jwks).ok());
  std::string error;
  JwsKeys keys = JwsKeysOf(jwks.jwks(), &error);
  ASSERT_EQ(error, "");
  for (int i : {0, 4}) {
    std::string kid, payload;
    EXPECT_EQ(VerifyJws(keys, resp.results(i).response().jws(), &kid, &payload), "") << i;
    EXPECT_EQ(payload, absl::StrCat("{\"item\":", i, "}"));
    EXPECT_EQ(kid, resp.results(i).response().kid());
  }

  // One audit line per item, with the caller's identity and the item's own result.
  std::string log;
  for (const auto& e : std::filesystem::directory_iterator(state_ + "/audit")) {
    log += ReadFileOrDie(e.path().string());
  }
  for (const std::string result : {"PERMISSION_DENIED", "NOT_FOUND", "INVALID_ARGUMENT"}) {
    EXPECT_NE(log.find(absl::StrCat("\"result\":\"", result, "\"")), std::string::npos)
        << result << " missing in\n"
        << log;
  }
  size_t as_sign_ok = 0;
  for (size_t at = 0; (at = log.find("\"identity\":\"spiffe://bank.example/as\","
                                     "\"operation\":\"sign\",\"ring\":\"op/id-token\"",
                                     at)) != std::string::npos;
       ++at) {
    const size_t eol = log.find('\n', at);
    if (log.substr(at, eol - at).find("\"result\":\"OK\"") != std::string::npos) ++as_sign_ok;
  }
  EXPECT_EQ(as_sign_ok, 2u) << log;

  // More items than custodyd takes in one batch: refused as a whole, nothing signed.
  custody::v1::SignJwsBatchRequest big;
  for (int i = 0; i < 65; ++i) *big.add_requests() = batch.requests(0);
  custody::v1::SignJwsBatchResponse big_resp;
  grpc::ClientContext big_ctx;
  s = signer->SignJwsBatch(&big_ctx, big, &big_resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("at most 64"), std::string::npos) << s.error_message();
  EXPECT_EQ(big_resp.results_size(), 0);
}

TEST_F(MtlsTest, ReloadedPolicyTakesEffectWithoutRestart) {
  EXPECT_EQ(SignAs(Client(pki_, addr_, "rp"), "op/id-token").error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  WriteFileOrDie(state_ + "/policy.json", kPolicyWithRp);
  daemon_->Signal(SIGHUP);
  grpc::Status s;
  for (int i = 0; i < 50; ++i) {  // SIGHUP is handled asynchronously
    s = SignAs(Client(pki_, addr_, "rp"), "op/id-token");
    if (s.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(s.ok()) << s.error_message();
  // A broken policy file is refused on reload and the last good one stays in force.
  WriteFileOrDie(state_ + "/policy.json",
                 R"({"version": 1, "grants": [{"operations": ["sing"]}]})");
  daemon_->Signal(SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_TRUE(SignAs(Client(pki_, addr_, "rp"), "op/id-token").ok());
  EXPECT_NE(daemon_->log().find("policy.reloaded"), std::string::npos);
}

TEST_F(MtlsTest, ServerCertificateIsReloadedFromDiskWithoutRestart) {
  auto subject = [&] {
    CommandResult r = RunCommand(
        {"openssl", "s_client", "-connect", addr_, "-cert", pki_.Path("as.pem"), "-key",
         pki_.Path("as.key"), "-CAfile", pki_.Path("ca.pem"), "-servername", "localhost"},
        "Q\n");
    size_t at = r.out.find("subject=");
    return at == std::string::npos ? std::string() : r.out.substr(at, r.out.find('\n', at) - at);
  };
  EXPECT_NE(subject().find("CN = custodyd"), std::string::npos);
  std::filesystem::copy_file(pki_.Path("server-rotated.pem"), dir_.path() + "/server.pem",
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(pki_.Path("server-rotated.key"), dir_.path() + "/server.key",
                             std::filesystem::copy_options::overwrite_existing);
  std::string now;
  for (int i = 0; i < 40 && now.find("custodyd-rotated") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    now = subject();
  }
  EXPECT_NE(now.find("CN = custodyd-rotated"), std::string::npos) << now;
  EXPECT_TRUE(SignAs(Client(pki_, addr_, "as"), "op/none").error_code() ==
              grpc::StatusCode::NOT_FOUND)
      << "calls still work after the reload";
}

TEST_F(MtlsTest, OnlyTls12AndUpWithFapiCipherSuites) {
  std::vector<std::string> base = {"openssl", "s_client",          "-connect", addr_,
                                   "-cert",   pki_.Path("as.pem"), "-key",     pki_.Path("as.key"),
                                   "-CAfile", pki_.Path("ca.pem")};
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = base;
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, "Q\n");
  };
  CommandResult tls11 = run({"-tls1_1"});
  EXPECT_EQ(tls11.out.find("Cipher is ECDHE"), std::string::npos) << tls11.out;
  CommandResult fapi = run({"-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"});
  EXPECT_NE(fapi.out.find("ECDHE-RSA-AES128-GCM-SHA256"), std::string::npos) << fapi.out;
  CommandResult cbc = run({"-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"});
  EXPECT_EQ(cbc.out.find("Cipher is ECDHE-RSA-AES128-SHA256"), std::string::npos)
      << "a non-FAPI (CBC) suite was accepted: " << cbc.out;
  CommandResult tls13 = run({"-tls1_3"});
  EXPECT_NE(tls13.out.find("TLSv1.3"), std::string::npos) << tls13.out;
}

TEST(AuditTest, EveryCallIsChainedAndVerifiedAndTamperingIsNamed) {
  TempDir dir;
  std::string state = dir.path() + "/state";
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    ASSERT_TRUE(CreateEs256Ring(d.admin(), "op/audited").ok());
    for (int i = 0; i < 5; ++i) {
      custody::v1::SignJwsRequest sign;
      sign.set_ring("op/audited");
      sign.set_payload("secret payload " + std::to_string(i));
      custody::v1::SignJwsResponse resp;
      grpc::ClientContext c;
      ASSERT_TRUE(d.signer().SignJws(&c, sign, &resp).ok());
    }
    d.Stop();
  }
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(state + "/audit")) {
    files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  ASSERT_FALSE(files.empty());
  std::string log = ReadFileOrDie(files.back());
  EXPECT_EQ(log.find("secret payload"), std::string::npos) << "payloads must not be logged";
  EXPECT_NE(log.find("\"operation\":\"sign\""), std::string::npos) << log;
  EXPECT_NE(log.find("\"ring\":\"op/audited\""), std::string::npos) << log;
  std::vector<std::string> verify = {BinDir() + "/custodyctl", "audit", "verify"};
  verify.insert(verify.end(), files.begin(), files.end());
  CommandResult ok = RunCommand(verify);
  EXPECT_EQ(ok.exit_code, 0) << ok.out << ok.err;

  std::vector<std::string> lines;
  size_t start = 0;
  for (size_t nl; (nl = log.find('\n', start)) != std::string::npos; start = nl + 1) {
    lines.push_back(log.substr(start, nl - start));
  }
  ASSERT_GE(lines.size(), 4u);
  auto verify_lines = [&](const std::vector<std::string>& ls) {
    std::string text;
    for (const std::string& l : ls) text += l + "\n";
    std::string path = dir.path() + "/tampered.jsonl";
    WriteFileOrDie(path, text);
    return RunCommand({BinDir() + "/custodyctl", "audit", "verify", path});
  };
  std::vector<std::string> tampered = lines;
  tampered[2].replace(tampered[2].find("\"op/audited\""), 12, "\"op/other!!\"");
  CommandResult t = verify_lines(tampered);
  EXPECT_EQ(t.exit_code, 1);
  EXPECT_NE((t.out + t.err).find(":3"), std::string::npos) << t.out << t.err;
  std::vector<std::string> deleted = lines;
  deleted.erase(deleted.begin() + 2);
  CommandResult del = verify_lines(deleted);
  EXPECT_EQ(del.exit_code, 1);
  EXPECT_NE((del.out + del.err).find(":3"), std::string::npos) << del.out << del.err;
  std::vector<std::string> reordered = lines;
  std::swap(reordered[1], reordered[2]);
  CommandResult re = verify_lines(reordered);
  EXPECT_EQ(re.exit_code, 1);
  EXPECT_NE((re.out + re.err).find(":2"), std::string::npos) << re.out << re.err;
}

// A full disk is a real fault that root cannot bypass (unlike a read-only mode): the audit
// directory is a 256 KiB tmpfs that the test fills up and then empties.
TEST(AuditTest, FullAuditDiskFailsClosedAndRecovers) {
  TempDir dir;
  std::string state = dir.path() + "/state";
  std::string audit = dir.path() + "/audit";
  std::filesystem::create_directories(audit);
  if (mount("tmpfs", audit.c_str(), "tmpfs", 0, "size=256k,mode=0700") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (needs CAP_SYS_ADMIN): " << std::strerror(errno);
  }
  struct Unmount {
    std::string path;
    ~Unmount() { umount2(path.c_str(), MNT_DETACH); }
  } unmount{audit};
  Custodyd d(state, {"--audit_dir=" + audit});
  ASSERT_TRUE(d.started()) << d.log();
  ASSERT_TRUE(CreateEs256Ring(d.admin(), "op/full").ok());
  auto sign = [&] {
    custody::v1::SignJwsRequest r;
    r.set_ring("op/full");
    r.set_payload("{}");
    custody::v1::SignJwsResponse resp;
    grpc::ClientContext c;
    return d.signer().SignJws(&c, r, &resp);
  };
  auto health = [&] {
    auto stub = grpc::health::v1::Health::NewStub(d.channel());
    grpc::health::v1::HealthCheckRequest hr;
    grpc::health::v1::HealthCheckResponse resp;
    grpc::ClientContext c;
    stub->Check(&c, hr, &resp);
    return resp.status();
  };
  ASSERT_TRUE(sign().ok());
  // Fill the disk, to the last byte.
  {
    int fd = open((audit + "/filler").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    std::string block(4096, 'x');
    for (size_t chunk : {size_t{4096}, size_t{64}, size_t{1}}) {
      while (write(fd, block.data(), chunk) == static_cast<ssize_t>(chunk)) {
      }
    }
    close(fd);
  }
  // tmpfs allocates whole pages: the audit file's last page still has room for a few lines,
  // so the disk is "full" for the call that needs a new page. It must come within 50 calls.
  grpc::Status refused;
  int calls = 0;
  while (calls < 50 && (refused = sign()).ok()) ++calls;
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  EXPECT_NE(refused.error_message().find("audit"), std::string::npos) << refused.error_message();
  // Still refused while the disk stays full: failing closed is not a one-off. And health stays
  // NOT_SERVING past the audit probe's 1 s timer: a probe line would fit into the file's last page
  // (the slack a longer signing line did not), but the probe wants headroom first, so health does
  // not flap back to SERVING while calls are refused.
  EXPECT_EQ(sign().error_code(), grpc::StatusCode::UNAVAILABLE);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  grpc::health::v1::HealthCheckResponse::ServingStatus status = health();
  EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::NOT_SERVING)
      << "SERVING with no room for a signing call's audit line";
  EXPECT_EQ(sign().error_code(), grpc::StatusCode::UNAVAILABLE);
  status = health();
  for (int i = 0; i < 30 && status == grpc::health::v1::HealthCheckResponse::SERVING; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    status = health();
  }
  EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // Free the disk: the next call is recorded again and health comes back.
  std::filesystem::remove(audit + "/filler");
  grpc::Status again = sign();
  EXPECT_TRUE(again.ok()) << again.error_message();
  for (int i = 0; i < 30 && status != grpc::health::v1::HealthCheckResponse::SERVING; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    status = health();
  }
  EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::SERVING);
  d.Stop();
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(audit)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::vector<std::string> verify = {BinDir() + "/custodyctl", "audit", "verify"};
  verify.insert(verify.end(), files.begin(), files.end());
  CommandResult ok = RunCommand(verify);
  EXPECT_EQ(ok.exit_code, 0) << "the chain survives the outage: " << ok.out << ok.err;
}

// Unix-socket callers are told apart by the uid the kernel reports for their connection
// (SO_PEERCRED), so a policy can grant one local service account what another may not do. The
// part that connects as another user (setpriv to nobody) needs root; without root only the
// caller's own uid is checked.
TEST(UnixSocketTest, CallersAreIdentifiedByTheirUid) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  const uid_t self = getuid();
  const uid_t other = 65534;  // nobody
  const std::string policy = dir.path() + "/policy.json";
  WriteFileOrDie(policy, R"({"version": 1, "grants": [
    {"identities": ["uid:)" + std::to_string(self) +
                             R"("], "operations": ["sign", "jwks",
     "admin.read", "admin.create"], "rings": ["**"]},
    {"identities": ["uid:)" + std::to_string(other) +
                             R"("], "operations": ["sign"],
     "rings": ["op/shared"]}]})");
  chmod(policy.c_str(), 0600);
  Custodyd d(state, {"--policy_file=" + policy});
  ASSERT_TRUE(d.started()) << d.log();
  for (const char* name : {"op/shared", "op/private"}) {
    grpc::Status s = CreateEs256Ring(d.admin(), name);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  // Rotation is granted to nobody: the operator's own uid is refused it like anyone else.
  {
    custody::v1::RotateKeyRingRequest req;
    req.set_ring("op/private");
    custody::v1::RotateKeyRingResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = d.admin().RotateKeyRing(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_NE(s.error_message().find("'uid:" + std::to_string(self) + "'"), std::string::npos)
        << s.error_message();
  }

  const bool can_switch_user = self == 0 && access("/usr/bin/setpriv", X_OK) == 0;
  if (can_switch_user) {
    // Let nobody reach the socket: traverse the directories, connect to the socket. Policy,
    // not the file mode, is what is under test.
    ASSERT_EQ(chmod(dir.path().c_str(), 0711), 0);
    ASSERT_EQ(chmod(state.c_str(), 0711), 0);
    ASSERT_EQ(chmod((state + "/custodyd.sock").c_str(), 0666), 0);
    auto as_nobody = [&](std::vector<std::string> args) {
      std::vector<std::string> argv = {"/usr/bin/setpriv",       "--reuid=65534",
                                       "--regid=65534",          "--clear-groups",
                                       BinDir() + "/custodyctl", "--addr=" + d.address()};
      argv.insert(argv.end(), args.begin(), args.end());
      return RunCommand(argv, "{\"sub\":\"x\"}");
    };
    CommandResult shared = as_nobody({"sign", "op/shared"});
    EXPECT_EQ(shared.exit_code, 0) << shared.out << shared.err;
    EXPECT_EQ(std::count(shared.out.begin(), shared.out.end(), '.'), 2) << shared.out;
    CommandResult priv = as_nobody({"sign", "op/private"});
    EXPECT_EQ(priv.exit_code, 1) << priv.out << priv.err;
    EXPECT_NE(priv.err.find("PERMISSION_DENIED"), std::string::npos) << priv.err;
    EXPECT_NE(priv.err.find("'uid:65534'"), std::string::npos) << priv.err;
    CommandResult list = as_nobody({"ring", "list"});
    EXPECT_EQ(list.exit_code, 1) << list.out << list.err;
    EXPECT_NE(list.err.find("PERMISSION_DENIED"), std::string::npos) << list.err;
  }
  d.Stop();

  std::string audit;
  for (const auto& e : std::filesystem::directory_iterator(state + "/audit")) {
    audit += ReadFileOrDie(e.path().string());
  }
  const std::string self_id = "\"identity\":\"uid:" + std::to_string(self) + "\"";
  EXPECT_NE(audit.find(self_id + ",\"operation\":\"admin.create\",\"ring\":\"op/shared\""),
            std::string::npos)
      << audit;
  if (can_switch_user) {
    EXPECT_NE(
        audit.find("\"identity\":\"uid:65534\",\"operation\":\"sign\",\"ring\":\"op/shared\""),
        std::string::npos)
        << audit;
    EXPECT_NE(
        audit.find("\"identity\":\"uid:65534\",\"operation\":\"sign\",\"ring\":\"op/private\""),
        std::string::npos)
        << audit;
  } else {
    GTEST_SKIP() << "not root: the part connecting as another uid did not run";
  }
}

}  // namespace
}  // namespace custody::testing
