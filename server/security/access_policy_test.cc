#include "server/security/access_policy.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace custody::server {
namespace {

constexpr char kDocumentedPolicy[] = R"({"version": 1,
 "grants": [
   {"identities": ["spiffe://bank.example/as", "dns:as.bank.example", "uid:1000"],
    "operations": ["sign", "decrypt", "jwks"], "rings": ["op/*", "clients/**"]},
   {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
 ]})";

AccessPolicy MustParse(const std::string& json) {
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(json);
  EXPECT_TRUE(policy.ok()) << policy.status();
  return policy.ok() ? *std::move(policy) : AccessPolicy();
}

// One grant to "uid:1" for "sign" on `pattern`.
AccessPolicy OnePattern(const std::string& pattern) {
  return MustParse(
      R"({"version":1,"grants":[{"identities":["uid:1"],"operations":["sign"],"rings":[")" +
      pattern + R"("]}]})");
}

TEST(AccessPolicyTest, DocumentedExampleGrantsWhatItSays) {
  AccessPolicy policy = MustParse(kDocumentedPolicy);
  EXPECT_EQ(policy.grant_count(), 2u);
  EXPECT_TRUE(policy.Allows("spiffe://bank.example/as", "sign", "op/id-token"));
  EXPECT_TRUE(policy.Allows("dns:as.bank.example", "decrypt", "clients/acme/enc"));
  EXPECT_TRUE(policy.Allows("uid:1000", "jwks", "op/id-token"));
  EXPECT_FALSE(policy.Allows("uid:1000", "admin.rotate", "op/id-token"));
  EXPECT_FALSE(policy.Allows("uid:1000", "sign", "other/key"));
  // Anyone authenticated may read any JWKS, nothing more.
  EXPECT_TRUE(policy.Allows("uid:4242", "jwks", "other/key"));
  EXPECT_FALSE(policy.Allows("uid:4242", "sign", "op/id-token"));
}

TEST(AccessPolicyTest, DeniesByDefault) {
  AccessPolicy empty;
  EXPECT_FALSE(empty.Allows("uid:0", "sign", "op/id"));
  EXPECT_FALSE(empty.AllowsAnyRing("uid:0", "admin.read"));
  AccessPolicy no_grants = MustParse(R"({"version":1,"grants":[]})");
  EXPECT_FALSE(no_grants.Allows("uid:0", "jwks", "op/id"));
}

TEST(AccessPolicyTest, SingleStarStaysWithinOneSegment) {
  AccessPolicy policy = OnePattern("op/*");
  EXPECT_TRUE(policy.Allows("uid:1", "sign", "op/id-token"));
  EXPECT_TRUE(policy.Allows("uid:1", "sign", "op/x"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "op/a/b"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "op"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "opx/a"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "x/op/a"));

  AccessPolicy infix = OnePattern("clients/*/jwt-*");
  EXPECT_TRUE(infix.Allows("uid:1", "sign", "clients/acme/jwt-1"));
  EXPECT_TRUE(infix.Allows("uid:1", "sign", "clients/acme/jwt-"));
  EXPECT_FALSE(infix.Allows("uid:1", "sign", "clients/a/b/jwt-1"));
  EXPECT_FALSE(infix.Allows("uid:1", "sign", "clients/acme/jwt-1/x"));
}

TEST(AccessPolicyTest, DoubleStarCrossesSegments) {
  AccessPolicy policy = OnePattern("clients/**");
  EXPECT_TRUE(policy.Allows("uid:1", "sign", "clients/acme"));
  EXPECT_TRUE(policy.Allows("uid:1", "sign", "clients/acme/private-key-jwt"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "clients"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "op/clients/acme"));

  AccessPolicy suffix = OnePattern("**/sig");
  EXPECT_TRUE(suffix.Allows("uid:1", "sign", "a/sig"));
  EXPECT_TRUE(suffix.Allows("uid:1", "sign", "a/b/c/sig"));
  EXPECT_FALSE(suffix.Allows("uid:1", "sign", "sig"));
  EXPECT_FALSE(suffix.Allows("uid:1", "sign", "a/sig2"));

  AccessPolicy all = OnePattern("**");
  EXPECT_TRUE(all.Allows("uid:1", "sign", "a"));
  EXPECT_TRUE(all.Allows("uid:1", "sign", "a/b/c/d/e/f/g/h"));
}

TEST(AccessPolicyTest, LiteralPatternMatchesExactly) {
  AccessPolicy policy = OnePattern("op/id.v1_x-y");
  EXPECT_TRUE(policy.Allows("uid:1", "sign", "op/id.v1_x-y"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "op/id.v1_x-yz"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", "op/id.v1_x-"));
  EXPECT_FALSE(policy.Allows("uid:1", "sign", ""));
}

TEST(AccessPolicyTest, ManyStarsDoNotBlowUp) {
  // Backtracking matchers take exponential time here; the answer is still false.
  AccessPolicy policy = OnePattern("**a**a**a**a**a**a**a**a**a**a**b");
  std::string ring(200, 'a');
  EXPECT_FALSE(policy.Allows("uid:1", "sign", ring));
  ring.back() = 'b';
  EXPECT_TRUE(policy.Allows("uid:1", "sign", ring));
}

TEST(AccessPolicyTest, WildcardIdentityIsAnyAuthenticatedCaller) {
  AccessPolicy policy =
      MustParse(R"({"version":1,"grants":[{"identities":["*"],"operations":["jwks"],)"
                R"("rings":["**"]}]})");
  EXPECT_TRUE(policy.Allows("uid:1", "jwks", "op/id"));
  EXPECT_TRUE(policy.Allows("spiffe://x/y", "jwks", "op/id"));
  EXPECT_FALSE(policy.Allows("", "jwks", "op/id"));
  EXPECT_FALSE(policy.AllowsAnyRing("", "jwks"));
}

TEST(AccessPolicyTest, NamesEveryWrongGrant) {
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(
      R"({"version":1,"grants":[{"identities":["root"],"operations":["sign"],"rings":["**"]},)"
      R"({"identities":["uid:1"],"operations":["sign"],"rings":["**"]},)"
      R"({"identities":["uid:1"],"operations":["sing"],"rings":["**"]}]})");
  ASSERT_FALSE(policy.ok());
  EXPECT_EQ(policy.status().message(),
            "grants[0].identities[0]: identity 'root' can never match a caller: use uid:N (a "
            "Unix-socket caller), a certificate's URI SAN (spiffe://...), dns:NAME (its DNS SAN), "
            "unix, * (every authenticated caller) or anonymous; grants[2].operations[0]: unknown "
            "operation 'sing'");
}

TEST(AccessPolicyTest, WildcardNeverMatchesAnonymousWhichMustBeNamed) {
  AccessPolicy star =
      MustParse(R"({"version":1,"grants":[{"identities":["*"],"operations":["jwks"],)"
                R"("rings":["**"]}]})");
  EXPECT_FALSE(star.Allows("anonymous", "jwks", "op/id"));
  EXPECT_FALSE(star.AllowsAnyRing("anonymous", "jwks"));
  EXPECT_TRUE(star.Allows("unix", "jwks", "op/id"));
  AccessPolicy named =
      MustParse(R"({"version":1,"grants":[{"identities":["anonymous"],"operations":["jwks"],)"
                R"("rings":["**"]}]})");
  EXPECT_TRUE(named.Allows("anonymous", "jwks", "op/id"));
  EXPECT_FALSE(named.Allows("uid:1", "jwks", "op/id"));
  EXPECT_EQ(named.Warnings().size(), 1u);
}

TEST(AccessPolicyTest, AcceptsEveryIdentityFormACallerCanHave) {
  EXPECT_TRUE(AccessPolicy::Parse(R"({"version":1,"grants":[{"identities":["uid:0","unix","*",)"
                                  R"("anonymous","dns:as.bank.example","spiffe://bank/as",)"
                                  R"("urn:example:as","https://as.example/"],)"
                                  R"("operations":["jwks"],"rings":["**"]}]})")
                  .ok());
}

TEST(AccessPolicyTest, ExplainNamesTheGrantOrWhatTheNearestGrantsLack) {
  AccessPolicy policy = MustParse(kDocumentedPolicy);
  AccessPolicy::Explanation yes = policy.Explain("uid:1000", "sign", "op/id-token");
  EXPECT_TRUE(yes.allowed);
  EXPECT_EQ(yes.grant, "grants[0]");
  ASSERT_FALSE(yes.notes.empty());
  EXPECT_NE(yes.notes[0].find("grants[0].identities[2] 'uid:1000'"), std::string::npos)
      << yes.notes[0];
  EXPECT_NE(yes.notes[0].find("grants[0].rings[0] 'op/*'"), std::string::npos) << yes.notes[0];

  AccessPolicy::Explanation no = policy.Explain("uid:1000", "sign", "op/a/b");
  EXPECT_FALSE(no.allowed);
  // The verdict, then grants[0] (right caller and operation) and grants[1] ('*' on every ring,
  // but only jwks).
  ASSERT_EQ(no.notes.size(), 3u);
  EXPECT_NE(no.notes[2].find("grants[1] names grants[1].identities[0] '*'"), std::string::npos)
      << no.notes[2];
  EXPECT_NE(no.notes[2].find("but not the operation 'sign'"), std::string::npos) << no.notes[2];
  EXPECT_NE(no.notes[0].find("denied"), std::string::npos);
  EXPECT_NE(no.notes[1].find("none of its ring patterns matches 'op/a/b'"), std::string::npos)
      << no.notes[1];

  AccessPolicy::Explanation anon = policy.Explain("anonymous", "jwks", "op/x");
  EXPECT_FALSE(anon.allowed);
  ASSERT_EQ(anon.notes.size(), 3u);
  EXPECT_NE(anon.notes[2].find("name \"anonymous\""), std::string::npos) << anon.notes[2];
}

TEST(AccessPolicyTest, IdentitiesMatchExactly) {
  AccessPolicy policy =
      MustParse(R"({"version":1,"grants":[{"identities":["uid:1000"],"operations":["sign"],)"
                R"("rings":["**"]}]})");
  EXPECT_TRUE(policy.Allows("uid:1000", "sign", "op/id"));
  EXPECT_FALSE(policy.Allows("uid:10000", "sign", "op/id"));
  EXPECT_FALSE(policy.Allows("uid:100", "sign", "op/id"));
  EXPECT_FALSE(policy.Allows("UID:1000", "sign", "op/id"));
}

TEST(AccessPolicyTest, UnixIdentityIsAnyUidOnTheSocketOnly) {
  AccessPolicy policy =
      MustParse(R"({"version":1,"grants":[{"identities":["unix"],"operations":["sign"],)"
                R"("rings":["**"]}]})");
  EXPECT_TRUE(policy.Allows("uid:0", "sign", "op/id"));
  EXPECT_TRUE(policy.Allows("uid:65534", "sign", "op/id"));
  EXPECT_TRUE(policy.Allows("unix", "sign", "op/id"));
  EXPECT_FALSE(policy.Allows("spiffe://bank.example/uid:1", "sign", "op/id"));
  EXPECT_FALSE(policy.Allows("dns:uid", "sign", "op/id"));
  EXPECT_FALSE(policy.Allows("anonymous", "sign", "op/id"));
}

TEST(AccessPolicyTest, UnknownOperationIsDenied) {
  AccessPolicy policy = MustParse(kDocumentedPolicy);
  EXPECT_FALSE(policy.Allows("uid:1000", "sing", "op/id"));
  EXPECT_FALSE(policy.Allows("uid:1000", "", "op/id"));
  EXPECT_FALSE(policy.AllowsAnyRing("uid:1000", "admin"));
}

TEST(AccessPolicyTest, AllowsAnyRingGatesListOperations) {
  AccessPolicy policy =
      MustParse(R"({"version":1,"grants":[{"identities":["uid:7"],"operations":["admin.read"],)"
                R"("rings":["team-a/**"]}]})");
  EXPECT_TRUE(policy.AllowsAnyRing("uid:7", "admin.read"));
  EXPECT_FALSE(policy.AllowsAnyRing("uid:7", "admin.rotate"));
  EXPECT_FALSE(policy.AllowsAnyRing("uid:8", "admin.read"));
}

TEST(AccessPolicyTest, AcceptsEveryDocumentedOperation) {
  AccessPolicy policy = MustParse(
      R"({"version":1,"grants":[{"identities":["uid:1"],"operations":["sign","decrypt","jwks",)"
      R"("admin.read","admin.rotate","admin.create","admin.destroy","admin.import"],)"
      R"("rings":["r"]}]})");
  for (const char* op : {"sign", "decrypt", "jwks", "admin.read", "admin.rotate", "admin.create",
                         "admin.destroy", "admin.import"}) {
    EXPECT_TRUE(policy.Allows("uid:1", op, "r")) << op;
  }
}

TEST(AccessPolicyTest, RejectsInvalidPoliciesNamingThePath) {
  struct Case {
    std::string json;
    std::string message;  // expected prefix of the error message
  };
  const std::string ok_grant = R"({"identities":["uid:1"],"operations":["sign"],"rings":["r"]})";
  auto with_grant = [&](const std::string& grant) {
    return R"({"version":1,"grants":[)" + ok_grant + "," + grant + "]}";
  };
  const std::vector<Case> cases = {
      {with_grant(R"({"identities":["uid:1"],"operations":["sing"],"rings":["r"]})"),
       "grants[1].operations[0]: unknown operation 'sing'"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign","Admin.read"],"rings":["r"]})"),
       "grants[1].operations[1]: unknown operation 'Admin.read'"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"ring":["r"]})"),
       "grants[1].ring: unknown member"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"]})"), "grants[1].rings: missing"},
      {with_grant(R"({"identities":[],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities: must not be empty"},
      {with_grant(R"({"identities":"uid:1","operations":["sign"],"rings":["r"]})"),
       "grants[1].identities: must be an array of strings"},
      {with_grant(R"({"identities":["uid:1",7],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[1]: must be a string"},
      {with_grant(R"({"identities":[""],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity is empty"},
      {with_grant(R"({"identities":["spiffe://bank.example/*"],"operations":["sign"],)"
                  R"("rings":["r"]})"),
       "grants[1].identities[0]: identity 'spiffe://bank.example/*': '*' is only valid alone"},
      {with_grant(R"({"identities":["uid:alice"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'uid:alice': uid:N needs a decimal uid"},
      {with_grant(R"({"identities":["uid:"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'uid:': uid:N needs a decimal uid"},
      {with_grant(R"({"identities":["uid:+1"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'uid:+1': uid:N needs a decimal uid"},
      {with_grant(R"({"identities":["root"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'root' can never match a caller: use uid:N"},
      {with_grant(R"({"identities":["uid:1","alice"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[1]: identity 'alice' can never match a caller"},
      {with_grant(R"({"identities":["UID:1000"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'UID:1000': write uid:1000 (lower case)"},
      {with_grant(R"({"identities":["dns:"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'dns:': dns:NAME needs a DNS name"},
      {with_grant(R"({"identities":["dns:a b"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'dns:a b' contains a space"},
      {with_grant(R"({"identities":["spiffe:"],"operations":["sign"],"rings":["r"]})"),
       "grants[1].identities[0]: identity 'spiffe:' can never match a caller"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"rings":["r",""]})"),
       "grants[1].rings[1]: ring pattern is empty"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"rings":["Op/*"]})"),
       "grants[1].rings[0]: ring pattern 'Op/*' may contain only"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"rings":["op/ x"]})"),
       "grants[1].rings[0]: ring pattern 'op/ x' may contain only"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"rings":["op/***"]})"),
       "grants[1].rings[0]: ring pattern 'op/***' contains '***'"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"rings":["op//x"]})"),
       "grants[1].rings[0]: ring pattern 'op//x' has an empty segment"},
      {with_grant(R"({"identities":["uid:1"],"operations":["sign"],"rings":["/op"]})"),
       "grants[1].rings[0]: ring pattern '/op' has an empty segment"},
      {with_grant("[]"), "grants[1]: must be an object"},
      {R"({"version":1,"grants":[],"extra":true})", "extra: unknown member"},
      {R"({"version":2,"grants":[]})", "version: must be 1"},
      {R"({"version":"1","grants":[]})", "version: must be 1"},
      {R"({"grants":[]})", "version: missing"},
      {R"({"version":1})", "grants: missing"},
      {R"({"version":1,"grants":{}})", "grants: must be an array"},
      {R"([])", "policy: must be a JSON object"},
      {R"({"version":1,"grants":[],})", "policy is not valid JSON"},
      {R"({"version":1,"version":1,"grants":[]})", "policy is not valid JSON"},
      {"", "policy is not valid JSON"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(c.json);
    ASSERT_FALSE(policy.ok()) << c.json;
    EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_EQ(policy.status().message().substr(0, c.message.size()), c.message)
        << c.json << "\n  got: " << policy.status().message();
  }
}

TEST(AccessPolicyTest, RejectsPolicyOverOneMebibyte) {
  std::string big = R"({"version":1,"grants":[],"pad":")" + std::string(1024 * 1024, 'x') + "\"}";
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(big);
  ASSERT_FALSE(policy.ok());
  EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(policy.status().message().find("larger than"), std::string::npos) << policy.status();
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "policy-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& content, mode_t mode = 0600) {
  std::ofstream(path, std::ios::trunc) << content;
  ::chmod(path.c_str(), mode);
}

TEST(AccessPolicyTest, LoadNamesTheFileAndTheProblem) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  WriteFile(
      path,
      R"({"version":1,"grants":[{"identities":["uid:1"],"operations":["x"],"rings":["r"]}]})");
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Load(path);
  ASSERT_FALSE(policy.ok());
  EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(policy.status().message(), path + ": grants[0].operations[0]: unknown operation 'x'");

  absl::StatusOr<AccessPolicy> missing = AccessPolicy::Load(dir.File("absent.json"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(AccessPolicyTest, LoadRefusesGroupWritableFile) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  WriteFile(path, kDocumentedPolicy, 0664);
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Load(path);
  ASSERT_FALSE(policy.ok());
  EXPECT_EQ(policy.status().code(), absl::StatusCode::kFailedPrecondition);
  ::chmod(path.c_str(), 0644);
  EXPECT_TRUE(AccessPolicy::Load(path).ok());
}

TEST(AccessPolicyTest, LoadRefusesSymlinkFifoAndDeviceAtOnce) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  WriteFile(path, kDocumentedPolicy, 0600);
  const std::string link = dir.File("link.json");
  ASSERT_EQ(::symlink(path.c_str(), link.c_str()), 0);
  absl::StatusOr<AccessPolicy> linked = AccessPolicy::Load(link);
  ASSERT_FALSE(linked.ok());
  EXPECT_EQ(linked.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(linked.status().message().find("is a symbolic link"), std::string::npos)
      << linked.status();

  // Without O_NONBLOCK, opening a FIFO nobody writes to blocks forever.
  const std::string fifo = dir.File("fifo.json");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  absl::StatusOr<AccessPolicy> piped = AccessPolicy::Load(fifo);
  ASSERT_FALSE(piped.ok());
  EXPECT_NE(piped.status().message().find("is a FIFO, not a regular file"), std::string::npos)
      << piped.status();

  absl::StatusOr<AccessPolicy> device = AccessPolicy::Load("/dev/zero");
  ASSERT_FALSE(device.ok());
  EXPECT_NE(device.status().message().find("is a device"), std::string::npos) << device.status();
}

TEST(AccessPolicyTest, LoadRefusesAForeignOwnerThatCheckReports) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  WriteFile(path, kDocumentedPolicy, 0600);
  // Only root can give a file away; elsewhere the case cannot be set up.
  if (::chown(path.c_str(), 65534, 65534) != 0) GTEST_SKIP() << "chown needs root";
  absl::StatusOr<AccessPolicy> loaded = AccessPolicy::Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(loaded.status().message().find("is owned by uid 65534, neither the user custodyd runs"),
            std::string::npos)
      << loaded.status();
  std::vector<std::string> warnings;
  EXPECT_TRUE(AccessPolicy::Check(path, &warnings).ok());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("owned by uid 65534"), std::string::npos) << warnings[0];
}

TEST(PolicyStoreTest, DeniesEverythingBeforeTheFirstLoad) {
  PolicyStore store;
  ASSERT_NE(store.Get(), nullptr);
  EXPECT_FALSE(store.Get()->Allows("uid:0", "jwks", "a"));
  EXPECT_EQ(store.ReloadIfChanged().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PolicyStoreTest, FailedReloadKeepsThePolicyInForce) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  WriteFile(path, kDocumentedPolicy);
  PolicyStore store;
  ASSERT_TRUE(store.LoadFrom(path).ok());
  std::shared_ptr<const AccessPolicy> first = store.Get();
  EXPECT_TRUE(first->Allows("uid:1000", "sign", "op/id"));
  EXPECT_EQ(store.generation(), 1u);

  // Unchanged file: nothing happens.
  EXPECT_TRUE(store.ReloadIfChanged().ok());
  EXPECT_EQ(store.Get(), first);

  // A typo: the error is reported (every time), the old policy stays.
  WriteFile(path, R"({"version":1,"grants":[{"identities":["uid:1000"],"operations":["sing"],)"
                  R"("rings":["**"]}]})");
  absl::Status s = store.ReloadIfChanged();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grants[0].operations[0]: unknown operation 'sing'"),
            std::string::npos)
      << s;
  EXPECT_EQ(store.ReloadIfChanged().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Get(), first);
  EXPECT_TRUE(store.Get()->Allows("uid:1000", "sign", "op/id"));

  // The file disappears: same.
  std::filesystem::remove(path);
  EXPECT_EQ(store.ReloadIfChanged().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Get(), first);

  // Fixed: swapped in; a snapshot held by a request stays valid and unchanged.
  WriteFile(path, R"({"version":1,"grants":[{"identities":["uid:1000"],"operations":["sign"],)"
                  R"("rings":["other/*"]}]})");
  ASSERT_TRUE(store.ReloadIfChanged().ok());
  EXPECT_EQ(store.generation(), 2u);
  EXPECT_FALSE(store.Get()->Allows("uid:1000", "sign", "op/id"));
  EXPECT_TRUE(store.Get()->Allows("uid:1000", "sign", "other/x"));
  EXPECT_TRUE(first->Allows("uid:1000", "sign", "op/id"));
}

TEST(PolicyStoreTest, FailedInitialLoadDeniesAndLaterReloadPicksTheFileUp) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  WriteFile(path, "{");
  PolicyStore store;
  EXPECT_EQ(store.LoadFrom(path).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(store.Get()->Allows("uid:1000", "jwks", "op/id"));
  WriteFile(path, kDocumentedPolicy);
  ASSERT_TRUE(store.ReloadIfChanged().ok());
  EXPECT_TRUE(store.Get()->Allows("uid:1000", "jwks", "op/id"));
}

TEST(PolicyStoreTest, ReadersSeeWholePoliciesDuringReloads) {
  TempDir dir;
  const std::string path = dir.File("policy.json");
  const std::string a = R"({"version":1,"grants":[{"identities":["uid:1"],"operations":["sign"],)"
                        R"("rings":["a/*"]}]})";
  const std::string b = R"({"version":1,"grants":[{"identities":["uid:1"],"operations":["sign"],)"
                        R"("rings":["b/*"]}]})";
  WriteFile(path, a);
  PolicyStore store;
  ASSERT_TRUE(store.LoadFrom(path).ok());
  std::atomic<bool> stop{false};
  std::atomic<int> torn{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        std::shared_ptr<const AccessPolicy> p = store.Get();
        // Exactly one of the two policies is in force at any time.
        if (p->Allows("uid:1", "sign", "a/x") == p->Allows("uid:1", "sign", "b/x")) ++torn;
      }
    });
  }
  for (int i = 0; i < 50; ++i) {
    WriteFile(path, i % 2 == 0 ? b : a);
    EXPECT_TRUE(store.ReloadIfChanged().ok());
  }
  stop = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(torn.load(), 0);
}

}  // namespace
}  // namespace custody::server
