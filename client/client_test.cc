// Client library tests against a real custodyd (tests/testing/harness.h), with npm jose as the
// independent verifier of what the FAPI builders make.
#include "client/client.h"

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/fapi.h"
#include "client/jwe_encryption.h"
#include "client/jwks_cache.h"
#include "client/jws_verifier.h"
#include "gtest/gtest.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "openssl/evp.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"

namespace custody::client {
namespace {

using ::custody::testing::BinDir;
using ::custody::testing::CommandResult;
using ::custody::testing::Custodyd;
using ::custody::testing::ReadFileOrDie;
using ::custody::testing::RunCommand;
using ::custody::testing::SourceDir;
using ::custody::testing::TempDir;

constexpr char kOpSign[] = "op/id-token";
constexpr char kRpSign[] = "clients/acme/private-key-jwt";
constexpr char kOpEnc[] = "op/request-object-enc";
constexpr char kRotSign[] = "rot/sign";
constexpr char kEdSign[] = "op/id-token-eddsa";

custody::v1::KeyRing CreateRing(Custodyd& d, const std::string& name, custody::v1::Purpose p,
                                const std::string& alg, const std::string& curve = "") {
  custody::v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(p);
  req.set_alg(alg);
  req.set_curve(curve);
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  grpc::Status s = d.admin().CreateKeyRing(&ctx, req, &ring);
  EXPECT_TRUE(s.ok()) << name << ": " << s.error_message();
  return ring;
}

std::string ActiveKid(Custodyd& d, const std::string& name) {
  custody::v1::GetKeyRingRequest req;
  req.set_name(name);
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  EXPECT_TRUE(d.admin().GetKeyRing(&ctx, req, &ring).ok());
  for (const auto& v : ring.versions()) {
    if (v.state() == custody::v1::ACTIVE) return v.kid();
  }
  return "";
}

// npm jose (client/testdata/verify.mjs); "" on success with *out = its JSON, else the reason.
std::string NodeVerify(const std::vector<std::string>& env, std::string* out = nullptr) {
  std::string script = ReadFileOrDie(std::string(CUSTODY_CLIENT_TESTDATA) + "/verify.mjs");
  auto r = RunCommand(
      {"/bin/sh", "-c", "cd \"$0\" && exec node --input-type=module -", SourceDir() + "/tests/js"},
      script, env);
  if (out != nullptr) *out = r.out;
  return r.exit_code == 0 ? "" : absl::StrCat("node exit ", r.exit_code, ": ", r.err, r.out);
}

ChannelOptions At(std::string address) {
  ChannelOptions o;
  o.address = std::move(address);
  return o;
}

jose::Json ParseOrDie(const std::string& s) {
  auto j = jose::ParseJson(s, jose::JsonLimits{.max_bytes = 1 << 20});
  EXPECT_TRUE(j.ok()) << j.status() << " in " << s;
  return j.ok() ? *j : jose::Json();
}

jose::Json Header(const std::string& jws) {
  auto raw = jose::Base64UrlDecode(jws.substr(0, jws.find('.')));
  EXPECT_TRUE(raw.ok());
  return ParseOrDie(raw.ok() ? *raw : "");
}

class ClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    daemon_ = new Custodyd(dir_->path() + "/state");
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
    CreateRing(*daemon_, kOpSign, custody::v1::SIGN, "ES256");
    CreateRing(*daemon_, kRpSign, custody::v1::SIGN, "ES256");
    CreateRing(*daemon_, kOpEnc, custody::v1::DECRYPT, "ECDH-ES", "P-256");
    CreateRing(*daemon_, kRotSign, custody::v1::SIGN, "ES256");
    CreateRing(*daemon_, kEdSign, custody::v1::SIGN, "EdDSA");
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }
  void SetUp() override {
    auto c = Client::Connect(At(daemon_->address()));
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }
  std::string Jwks(const std::string& ring) {
    auto j = client_->GetJwks({ring});
    EXPECT_TRUE(j.ok()) << j.status();
    return j.ok() ? j->jwks : "";
  }
  // Signs `claims` with kOpSign.
  std::string SignClaims(const std::string& claims) {
    SignJwsOptions o;
    o.typ = "JWT";
    auto s = client_->SignJws(kOpSign, claims, o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? s->jws : "";
  }

  static TempDir* dir_;
  static Custodyd* daemon_;
  std::unique_ptr<Client> client_;
};
TempDir* ClientTest::dir_ = nullptr;
Custodyd* ClientTest::daemon_ = nullptr;

TEST_F(ClientTest, HealthSignJwsSignGetJwks) {
  EXPECT_TRUE(client_->Health().ok());
  SignJwsOptions o;
  o.typ = "JWT";
  o.extra_header_json = R"({"x-test":"1"})";
  auto signed_jws = client_->SignJws(kOpSign, R"({"hello":"world"})", o);
  ASSERT_TRUE(signed_jws.ok()) << signed_jws.status();
  EXPECT_EQ(signed_jws->kid, ActiveKid(*daemon_, kOpSign));
  EXPECT_EQ(signed_jws->alg, "ES256");
  EXPECT_EQ(signed_jws->version, 1u);
  jose::Json header = Header(signed_jws->jws);
  EXPECT_EQ(header.Find("x-test")->as_string(), "1");
  EXPECT_EQ(header.Find("typ")->as_string(), "JWT");

  auto jwks = client_->GetJwks({kOpSign});
  ASSERT_TRUE(jwks.ok()) << jwks.status();
  EXPECT_NE(jwks->jwks.find(signed_jws->kid), std::string::npos);
  EXPECT_FALSE(jwks->etag.empty());
  EXPECT_GT(jwks->max_age_seconds, 0);

  JwsVerifierOptions vo;
  vo.require_exp = false;
  auto verifier = JwsVerifier::FromJwks(jwks->jwks, vo);
  ASSERT_TRUE(verifier.ok()) << verifier.status();
  auto claims = verifier->Verify(signed_jws->jws);
  ASSERT_TRUE(claims.ok()) << claims.status();
  EXPECT_EQ(claims->Find("hello")->as_string(), "world");

  std::string digest(32, '\x01');
  auto sig = client_->Sign(kOpSign, digest);
  ASSERT_TRUE(sig.ok()) << sig.status();
  EXPECT_EQ(sig->signature.size(), 64u);
  EXPECT_EQ(sig->kid, signed_jws->kid);

  auto all = client_->GetJwks();
  ASSERT_TRUE(all.ok());
  EXPECT_NE(all->jwks.find(ActiveKid(*daemon_, kRpSign)), std::string::npos);
  EXPECT_EQ(*client_->RingAlg(kOpSign), "ES256");
}

TEST_F(ClientTest, ServerErrorsAreMappedAndNotRetried) {
  absl::Time start = absl::Now();
  auto s = client_->SignJws("no/such-ring", "x");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
  EXPECT_NE(s.status().code(), absl::StatusCode::kUnknown) << s.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  auto d = client_->DecryptJwe(kOpEnc, "not.a.jwe.at.all");
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
}

TEST_F(ClientTest, DecryptJwe) {
  auto jwe = EncryptToJwks("secret request", Jwks(kOpEnc));
  ASSERT_TRUE(jwe.ok()) << jwe.status();
  auto d = client_->DecryptJwe(kOpEnc, *jwe);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->plaintext, "secret request");
  EXPECT_EQ(d->kid, ActiveKid(*daemon_, kOpEnc));
  EXPECT_EQ(d->version, 1u);
  EXPECT_EQ(ParseOrDie(d->protected_header).Find("alg")->as_string(), "ECDH-ES");
}

TEST(ClientRetryTest, UnavailableIsRetriedWithBackoff) {
  TempDir dir;
  ClientOptions o;
  o.max_attempts = 3;
  o.initial_backoff = absl::Milliseconds(100);
  auto c = Client::Connect(At("unix:" + dir.path() + "/nothing.sock"), o);
  ASSERT_TRUE(c.ok()) << c.status();
  // The first call on a fresh channel pays gRPC's resolver/connect start-up; warm it up so that
  // what is timed below is the backoff.
  EXPECT_EQ((*c)->Health().code(), absl::StatusCode::kUnavailable);
  absl::Time start = absl::Now();
  auto s = (*c)->SignJws("op/x", "payload");
  absl::Duration took = absl::Now() - start;
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
  // Backoffs 100 ms + 200 ms, each jittered by ±20 %.
  EXPECT_GE(took, absl::Milliseconds(240));
  EXPECT_LT(took, absl::Seconds(1)) << "backoffs should dominate";

  o.max_attempts = 1;
  auto once = Client::Connect(At("unix:" + dir.path() + "/nothing.sock"), o);
  ASSERT_TRUE(once.ok());
  EXPECT_EQ((*once)->Health().code(), absl::StatusCode::kUnavailable);
  start = absl::Now();
  EXPECT_EQ((*once)->GetJwks().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(80));

  o.max_attempts = -1;
  EXPECT_EQ(Client::Connect(At("unix:/x"), o).status().code(), absl::StatusCode::kInvalidArgument);
}

// Signs from `threads` threads at once, `calls` each, through one Client. Every call's JWS must
// verify independently (tests/testing/independent_jws.h) and carry that call's own payload and typ;
// a thread with `bad_ring` set signs on a missing ring and must get NOT_FOUND every time.
void SignConcurrently(Client& client, const std::string& ring, const std::string& jwks, int threads,
                      int calls) {
  std::string error;
  ::custody::testing::JwsKeys keys = ::custody::testing::JwsKeysOf(jwks, &error);
  ASSERT_EQ(error, "");
  std::vector<std::vector<std::string>> failures(static_cast<size_t>(threads));
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::vector<std::string>& mine = failures[static_cast<size_t>(t)];
      const bool bad_ring = t % 5 == 4;
      for (int i = 0; i < calls; ++i) {
        const std::string payload = absl::StrCat(R"({"thread":)", t, R"(,"call":)", i, "}");
        SignJwsOptions o;
        o.typ = absl::StrCat("t", t, "+jwt");
        auto jws = client.SignJws(bad_ring ? "no/such-ring" : ring, payload, o);
        if (bad_ring) {
          if (jws.status().code() != absl::StatusCode::kNotFound) {
            mine.push_back(absl::StrCat("missing ring: ", jws.status().ToString()));
          }
          continue;
        }
        if (!jws.ok()) {
          mine.push_back(jws.status().ToString());
          continue;
        }
        std::string kid, signed_payload;
        std::string why = ::custody::testing::VerifyJws(keys, jws->jws, &kid, &signed_payload);
        if (!why.empty()) mine.push_back(why);
        if (signed_payload != payload)
          mine.push_back("payload " + signed_payload + " for " + payload);
        if (kid != jws->kid) mine.push_back("kid " + kid);
        const jose::Json header = Header(jws->jws);
        const jose::Json* typ = header.Find("typ");
        if (typ == nullptr || !typ->is_string() || typ->as_string() != o.typ) {
          mine.push_back("typ of another call");
        }
      }
    });
  }
  for (std::thread& w : workers) w.join();
  for (int t = 0; t < threads; ++t) {
    EXPECT_TRUE(failures[static_cast<size_t>(t)].empty())
        << "thread " << t << ": " << failures[static_cast<size_t>(t)].size() << " failures, first "
        << failures[static_cast<size_t>(t)].front();
  }
}

TEST_F(ClientTest, ConcurrentSignJwsCallsShareBatchesAndEachGetsItsOwnResult) {
  ClientOptions o;
  o.max_rpcs_in_flight = 1;  // every call that overlaps another one waits for a batch
  o.max_batch_items = 8;
  auto c = Client::Connect(At(daemon_->address()), o);
  ASSERT_TRUE(c.ok()) << c.status();
  SignConcurrently(**c, kOpSign, Jwks(kOpSign), 15, 40);
  CoalescingStats stats = (*c)->coalescing_stats();
  EXPECT_EQ(stats.plain_calls + stats.batched_items, 15u * 40u);
  EXPECT_GT(stats.batches, 0u);
  EXPECT_GE(stats.batched_items, 2 * stats.batches);
  EXPECT_LE(stats.batched_items, 8 * stats.batches);
  EXPECT_EQ(stats.fallbacks, 0u);

  // Off: every call is its own SignJws RPC.
  o.max_rpcs_in_flight = 0;
  auto plain = Client::Connect(At(daemon_->address()), o);
  ASSERT_TRUE(plain.ok());
  SignConcurrently(**plain, kOpSign, Jwks(kOpSign), 4, 10);
  EXPECT_EQ((*plain)->coalescing_stats().batches, 0u);
}

// Concurrent DecryptJwe calls are coalesced the same way: each caller gets its own plaintext,
// and a tampered JWE in the same batch gets the uniform "decryption failed" alone.
TEST_F(ClientTest, ConcurrentDecryptJweCallsShareBatchesAndEachGetsItsOwnPlaintext) {
  ClientOptions o;
  o.max_rpcs_in_flight = 1;
  auto c = Client::Connect(At(daemon_->address()), o);
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string jwks = Jwks(kOpEnc);
  constexpr int kThreads = 8, kCalls = 25;
  std::vector<std::vector<std::string>> failures(kThreads);
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        const std::string secret = absl::StrCat("request object ", t, "/", i);
        auto jwe = EncryptToJwks(secret, jwks);
        if (!jwe.ok()) {
          failures[t].push_back(jwe.status().ToString());
          continue;
        }
        std::string sent = *jwe;
        const bool tamper = t == 3;
        if (tamper) sent[sent.size() - 3] = sent[sent.size() - 3] == 'A' ? 'B' : 'A';  // the tag
        auto plain = (*c)->DecryptJwe(kOpEnc, sent);
        if (tamper) {
          if (plain.status().code() != absl::StatusCode::kInvalidArgument ||
              plain.status().message() != "decryption failed") {
            failures[t].push_back("tampered: " + plain.status().ToString());
          }
        } else if (!plain.ok()) {
          failures[t].push_back(plain.status().ToString());
        } else if (plain->plaintext != secret) {
          failures[t].push_back("plaintext of another call: " + plain->plaintext);
        }
      }
    });
  }
  for (std::thread& w : workers) w.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_TRUE(failures[t].empty()) << "thread " << t << ": " << failures[t].size()
                                     << " failures, first " << failures[t].front();
  }
  CoalescingStats stats = (*c)->decrypt_coalescing_stats();
  EXPECT_EQ(stats.plain_calls + stats.batched_items, static_cast<uint64_t>(kThreads * kCalls));
  EXPECT_GT(stats.batches, 0u);
  EXPECT_EQ(stats.fallbacks, 0u);
  EXPECT_EQ((*c)->coalescing_stats().batches, 0u);
}

// A custodyd that takes fewer items per batch than the client sends refuses the batch as a
// whole; its calls go again one by one and the client stops batching.
TEST(ClientCoalescingTest, BatchesRefusedAsAWholeAreResentAsPlainCalls) {
  TempDir dir;
  Custodyd d(dir.path() + "/state", {"--max_batch_items=1"});
  ASSERT_TRUE(d.started()) << d.log();
  CreateRing(d, kOpSign, custody::v1::SIGN, "ES256");
  ClientOptions o;
  o.max_rpcs_in_flight = 1;
  auto c = Client::Connect(At(d.address()), o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto jwks = (*c)->GetJwks({kOpSign});
  ASSERT_TRUE(jwks.ok()) << jwks.status();
  SignConcurrently(**c, kOpSign, jwks->jwks, 8, 30);
  CoalescingStats stats = (*c)->coalescing_stats();
  EXPECT_GE(stats.batches, 1u);
  EXPECT_EQ(stats.fallbacks, stats.batched_items);
  EXPECT_EQ(stats.plain_calls + stats.batched_items, 8u * 30u);
}

// During an outage a coalescing slot is held for one attempt, not for the caller's whole
// deadline: every caller, the ones queued behind the first included, is told UNAVAILABLE (the
// cause to act on) within about its deadline. Before, the first plain call retried in the slot
// until its deadline, the queued callers' deadlines passed while they waited, and they got
// DEADLINE_EXCEEDED.
TEST(ClientCoalescingTest, AnOutageDoesNotHoldTheSlotPastTheQueuedCallersDeadlines) {
  TempDir dir;
  Custodyd d(dir.path() + "/state");
  ASSERT_TRUE(d.started()) << d.log();
  CreateRing(d, kOpSign, custody::v1::SIGN, "ES256");
  ClientOptions o;
  o.max_rpcs_in_flight = 1;
  o.deadline = absl::Seconds(1);
  auto c = Client::Connect(At(d.address()), o);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE((*c)->SignJws(kOpSign, "{}").ok());
  d.Stop();
  std::vector<absl::Status> results(8);
  std::vector<absl::Duration> took(8);
  std::vector<std::thread> callers;
  for (int t = 0; t < 8; ++t) {
    callers.emplace_back([&, t] {
      const absl::Time start = absl::Now();
      results[t] = (*c)->SignJws(kOpSign, "{}").status();
      took[t] = absl::Now() - start;
    });
  }
  for (std::thread& t : callers) t.join();
  for (int t = 0; t < 8; ++t) {
    EXPECT_EQ(results[t].code(), absl::StatusCode::kUnavailable) << t << ": " << results[t];
    EXPECT_LT(took[t], absl::Seconds(3)) << t;
  }
}

TEST_F(ClientTest, VerifierChecksKeysAndClaims) {
  const absl::Time now = absl::FromUnixSeconds(1'800'000'000);
  JwsVerifierOptions o;
  o.issuer = "https://op.example";
  o.audience = "client-1";
  o.clock = [now] { return now; };
  const std::string jwks = Jwks(kOpSign);
  auto v = JwsVerifier::FromJwks(jwks, o);
  ASSERT_TRUE(v.ok()) << v.status();
  auto claims = [](int64_t iat, int64_t exp, const std::string& iss, const std::string& aud,
                   const std::string& more = "") {
    return absl::StrCat(R"({"iss":")", iss, R"(","aud":)", aud, R"(,"iat":)", iat, R"(,"exp":)",
                        exp, more, "}");
  };
  const int64_t t = absl::ToUnixSeconds(now);
  const std::string good = SignClaims(claims(t, t + 300, "https://op.example", "\"client-1\""));
  auto ok = v->Verify(good);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->Find("iss")->as_string(), "https://op.example");
  // aud as an array containing the audience.
  EXPECT_TRUE(
      v->Verify(SignClaims(claims(t, t + 300, "https://op.example", R"(["x","client-1"])"))).ok());
  // Within the skew.
  EXPECT_TRUE(
      v->Verify(SignClaims(claims(t - 400, t - 30, "https://op.example", "\"client-1\""))).ok());

  auto rejected = [&](const std::string& jws, const std::string& why) {
    auto r = v->Verify(jws);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnauthenticated) << why << ": " << r.status();
    EXPECT_NE(r.status().message().find(why), std::string::npos) << r.status();
  };
  rejected(SignClaims(claims(t - 400, t - 61, "https://op.example", "\"client-1\"")), "expired");
  rejected(SignClaims(claims(t, t + 300, "https://op.example", "\"client-1\"",
                             absl::StrCat(R"(,"nbf":)", t + 120))),
           "not yet valid");
  rejected(SignClaims(claims(t + 120, t + 300, "https://op.example", "\"client-1\"")),
           "issued in the future");
  rejected(SignClaims(claims(t, t + 300, "https://op.example", "\"client-2\"")), "wrong aud");
  rejected(SignClaims(claims(t, t + 300, "https://evil.example", "\"client-1\"")), "wrong iss");
  rejected(SignClaims(R"({"iss":"https://op.example","aud":"client-1"})"), "no exp");

  // Unknown kid: a verifier over another ring's keys.
  auto other = JwsVerifier::FromJwks(Jwks(kRpSign), o);
  ASSERT_TRUE(other.ok());
  auto unknown = other->Verify(good);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(unknown.status().message().find("unknown kid"), std::string::npos) << unknown.status();

  // The key's alg is its allow-list: a JWKS claiming PS256 for the key refuses the ES256 token,
  // and a key without alg verifies nothing.
  jose::Json set = ParseOrDie(jwks);
  jose::Json key = set.Find("keys")->as_array()[0];
  jose::Json ps = key;
  ps.Set("alg", jose::Json::String("PS256"));
  auto mismatch = JwsVerifier::FromJwks(
      jose::Json::MakeObject({{"keys", jose::Json::MakeArray({ps})}}).Serialize(), o);
  ASSERT_TRUE(mismatch.ok());
  auto r = mismatch->Verify(good);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(r.status().message().find("not allowed"), std::string::npos) << r.status();
  jose::Json no_alg = jose::Json::MakeObject();
  for (const auto& [k, val] : key.as_object()) {
    if (k != "alg") no_alg.Set(k, val);
  }
  auto without = JwsVerifier::FromJwks(
      jose::Json::MakeObject({{"keys", jose::Json::MakeArray({no_alg})}}).Serialize(), o);
  ASSERT_TRUE(without.ok());
  EXPECT_EQ(without->Verify(good).status().code(), absl::StatusCode::kUnauthenticated);

  // A tampered payload.
  std::string tampered = good;
  tampered[tampered.find('.') + 3] ^= 1;
  EXPECT_FALSE(v->Verify(tampered).ok());
}

TEST_F(ClientTest, JwksCacheSeesForcedRotation) {
  JwksCacheOptions co;
  co.rings = {kRotSign};
  JwksCache cache(*client_, co);
  ASSERT_TRUE(cache.WaitReady(absl::Seconds(5)).ok());
  const std::string old_kid = ActiveKid(*daemon_, kRotSign);
  ASSERT_TRUE(cache.Key(old_kid).ok());
  EXPECT_TRUE(cache.PublicKey(old_kid).ok());
  EXPECT_EQ(cache.Key("nope").status().code(), absl::StatusCode::kNotFound);

  custody::v1::RotateKeyRingRequest req;
  req.set_ring(kRotSign);
  req.set_force(true);
  custody::v1::RotateKeyRingResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = daemon_->admin().RotateKeyRing(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const std::string new_kid = ActiveKid(*daemon_, kRotSign);
  ASSERT_NE(new_kid, old_kid);
  absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (!cache.Key(new_kid).ok() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(20));
  ASSERT_TRUE(cache.Key(new_kid).ok()) << cache.jwks();

  JwsVerifierOptions vo;
  vo.require_exp = false;
  JwsVerifier verifier(cache, vo);
  auto signed_jws = client_->SignJws(kRotSign, R"({"after":"rotation"})");
  ASSERT_TRUE(signed_jws.ok()) << signed_jws.status();
  EXPECT_EQ(signed_jws->kid, new_kid);
  EXPECT_TRUE(verifier.Verify(signed_jws->jws).ok());
}

TEST(JwksCacheTest, StopsPromptlyWhenTheServerIsUnreachable) {
  TempDir dir;
  auto c = Client::Connect(At("unix:" + dir.path() + "/nothing.sock"));
  ASSERT_TRUE(c.ok());
  absl::Time start = absl::Now();
  {
    JwksCache cache(**c);
    EXPECT_EQ(cache.WaitReady(absl::Milliseconds(300)).code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_EQ(cache.Key("x").status().code(), absl::StatusCode::kUnavailable);
  }
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST(JwksCacheTest, ReconnectsAfterCustodydRestarts) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  auto daemon = std::make_unique<Custodyd>(state);
  ASSERT_TRUE(daemon->started()) << daemon->log();
  CreateRing(*daemon, "restart/sign", custody::v1::SIGN, "ES256");
  ChannelOptions channel = At(daemon->address());
  channel.max_reconnect_backoff_ms = 500;
  auto c = Client::Connect(channel);
  ASSERT_TRUE(c.ok());
  JwksCacheOptions co;
  co.rings = {"restart/sign"};
  co.max_backoff = absl::Milliseconds(500);
  JwksCache cache(**c, co);
  ASSERT_TRUE(cache.WaitReady(absl::Seconds(5)).ok());
  const std::string old_kid = ActiveKid(*daemon, "restart/sign");
  EXPECT_TRUE(cache.Key(old_kid).ok());

  daemon->Stop();
  daemon.reset();
  daemon = std::make_unique<Custodyd>(state);
  ASSERT_TRUE(daemon->started()) << daemon->log();
  custody::v1::RotateKeyRingRequest req;
  req.set_ring("restart/sign");
  req.set_force(true);
  custody::v1::RotateKeyRingResponse resp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(daemon->admin().RotateKeyRing(&ctx, req, &resp).ok());
  const std::string new_kid = ActiveKid(*daemon, "restart/sign");
  ASSERT_NE(new_kid, old_kid);
  // custodyd's SIGTERM waits up to 10 s for the open watch stream; afterwards, reconnection is
  // bounded by the two backoffs (ours and gRPC's), both capped at 500 ms here.
  absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (!cache.Key(new_kid).ok() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_TRUE(cache.Key(new_kid).ok()) << cache.jwks();
}

TEST(FapiTest, AthMatchesRfc9449Example) {
  EXPECT_EQ(AccessTokenHash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
}

TEST(FapiTest, HalfHashUsesTheAlgsHash) {
  auto expect = [](const EVP_MD* md, const std::string& v) {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_Digest(v.data(), v.size(), out, &len, md, nullptr);
    return jose::Base64UrlEncode(std::string(reinterpret_cast<char*>(out), len / 2));
  };
  EXPECT_EQ(*HalfHash("ES256", "code-1"), expect(EVP_sha256(), "code-1"));
  EXPECT_EQ(*HalfHash("PS256", "code-1"), expect(EVP_sha256(), "code-1"));
  EXPECT_EQ(*HalfHash("EdDSA", "code-1"), expect(EVP_sha512(), "code-1"));
  EXPECT_EQ(HalfHash("EdDSA", "x")->size(), 43u);  // 32 bytes
  EXPECT_EQ(HalfHash("HS256", "x").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ClientTest, ClientAssertionVerifiesWithNodeJose) {
  ClientAssertionOptions o;
  o.client_id = "acme";
  o.audience = "https://op.example";
  auto jwt = ClientAssertion(*client_, kRpSign, o);
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  std::string out;
  EXPECT_EQ(NodeVerify({"JWT=" + *jwt, "JWKS=" + Jwks(kRpSign), "ISS=acme",
                        "AUD=https://op.example", "TYP=JWT"},
                       &out),
            "");
  jose::Json payload = *ParseOrDie(out).Find("payload");
  EXPECT_EQ(payload.Find("sub")->as_string(), "acme");
  EXPECT_EQ(payload.Find("jti")->as_string().size(), 22u);
  EXPECT_EQ(*payload.Find("exp")->as_int() - *payload.Find("iat")->as_int(), 60);
  // Two assertions never share a jti.
  auto again = ClientAssertion(*client_, kRpSign, o);
  ASSERT_TRUE(again.ok());
  JwsVerifierOptions vo;
  vo.audience = "https://op.example";
  auto v = JwsVerifier::FromJwks(Jwks(kRpSign), vo);
  ASSERT_TRUE(v.ok());
  EXPECT_NE(v->Verify(*again)->Find("jti")->as_string(), payload.Find("jti")->as_string());
}

TEST_F(ClientTest, RequestObjectSignedAndEncrypted) {
  RequestObjectOptions o;
  o.client_id = "acme";
  o.audience = "https://op.example";
  o.claims = ParseOrDie(
      R"({"response_type":"code","redirect_uri":"https://acme.example/cb","scope":"openid",)"
      R"("state":"s1","nonce":"n1","code_challenge":"abc","code_challenge_method":"S256"})");
  auto jwt = RequestObject(*client_, kRpSign, o);
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  std::string out;
  ASSERT_EQ(NodeVerify({"JWT=" + *jwt, "JWKS=" + Jwks(kRpSign), "ISS=acme",
                        "AUD=https://op.example", "TYP=oauth-authz-req+jwt"},
                       &out),
            "");
  jose::Json payload = *ParseOrDie(out).Find("payload");
  EXPECT_EQ(payload.Find("client_id")->as_string(), "acme");
  EXPECT_EQ(payload.Find("redirect_uri")->as_string(), "https://acme.example/cb");
  EXPECT_EQ(*payload.Find("exp")->as_int() - *payload.Find("nbf")->as_int(), 300);

  o.lifetime = absl::Minutes(61);
  EXPECT_EQ(RequestObject(*client_, kRpSign, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.lifetime = absl::Minutes(60);
  EXPECT_TRUE(RequestObject(*client_, kRpSign, o).ok());
  RequestObjectOptions bad = o;
  bad.claims.Set("exp", jose::Json::Int(1));
  EXPECT_EQ(RequestObject(*client_, kRpSign, bad).status().code(),
            absl::StatusCode::kInvalidArgument);

  // Encrypted to the OP's ring; the OP decrypts through custody, then verifies the nested JWT.
  o.encrypt_to_jwks = Jwks(kOpEnc);
  auto jwe = RequestObject(*client_, kRpSign, o);
  ASSERT_TRUE(jwe.ok()) << jwe.status();
  EXPECT_EQ(std::count(jwe->begin(), jwe->end(), '.'), 4);
  auto d = client_->DecryptJwe(kOpEnc, *jwe);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(ParseOrDie(d->protected_header).Find("cty")->as_string(), "JWT");
  EXPECT_EQ(NodeVerify({"JWT=" + d->plaintext, "JWKS=" + Jwks(kRpSign), "ISS=acme",
                        "AUD=https://op.example"}),
            "");
}

TEST_F(ClientTest, DpopProofVerifiesWithNodeJose) {
  DpopProofOptions o;
  o.htm = "POST";
  o.htu = "https://rs.example/resource?x=1#frag";
  o.access_token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
  o.nonce = "server-nonce";
  auto proof = DpopProof(*client_, kRpSign, o);
  if (proof.status().code() == absl::StatusCode::kUnimplemented) {
    GTEST_SKIP() << "embed_jwk not available: " << proof.status();
  }
  ASSERT_TRUE(proof.ok()) << proof.status();
  std::string out;
  ASSERT_EQ(NodeVerify({"JWT=" + *proof, "JWKS=" + Jwks(kRpSign), "TYP=dpop+jwt", "MODE=dpop",
                        "KID=" + ActiveKid(*daemon_, kRpSign)},
                       &out),
            "");
  jose::Json r = ParseOrDie(out);
  jose::Json payload = *r.Find("payload");
  EXPECT_EQ(payload.Find("htm")->as_string(), "POST");
  EXPECT_EQ(payload.Find("htu")->as_string(), "https://rs.example/resource");
  EXPECT_EQ(payload.Find("ath")->as_string(), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
  EXPECT_EQ(payload.Find("nonce")->as_string(), "server-nonce");
  EXPECT_EQ(r.Find("header")->Find("jwk")->Find("d"), nullptr);
}

TEST_F(ClientTest, IdTokenAndJarm) {
  IdTokenOptions o;
  o.issuer = "https://op.example";
  o.subject = "user-1";
  o.audience = "acme";
  o.nonce = "n1";
  o.access_token = "at-123";
  o.code = "code-456";
  o.state = "s1";
  o.extra_claims = ParseOrDie(R"({"acr":"urn:mace:incommon:iap:silver"})");
  auto id_token = IdToken(*client_, kOpSign, o);
  ASSERT_TRUE(id_token.ok()) << id_token.status();
  std::string out;
  ASSERT_EQ(NodeVerify(
                {"JWT=" + *id_token, "JWKS=" + Jwks(kOpSign), "ISS=https://op.example", "AUD=acme"},
                &out),
            "");
  jose::Json payload = *ParseOrDie(out).Find("payload");
  EXPECT_EQ(payload.Find("at_hash")->as_string(), *HalfHash("ES256", "at-123"));
  EXPECT_EQ(payload.Find("c_hash")->as_string(), *HalfHash("ES256", "code-456"));
  EXPECT_EQ(payload.Find("s_hash")->as_string(), *HalfHash("ES256", "s1"));
  EXPECT_EQ(payload.Find("acr")->as_string(), "urn:mace:incommon:iap:silver");

  // EdDSA: the half hashes use SHA-512 (see HalfHash).
  auto ed_token = IdToken(*client_, kEdSign, o);
  ASSERT_TRUE(ed_token.ok()) << ed_token.status();
  ASSERT_EQ(NodeVerify(
                {"JWT=" + *ed_token, "JWKS=" + Jwks(kEdSign), "ISS=https://op.example", "AUD=acme"},
                &out),
            "");
  payload = *ParseOrDie(out).Find("payload");
  EXPECT_EQ(ParseOrDie(out).Find("header")->Find("alg")->as_string(), "EdDSA");
  EXPECT_EQ(payload.Find("at_hash")->as_string(), *HalfHash("EdDSA", "at-123"));
  EXPECT_EQ(payload.Find("at_hash")->as_string().size(), 43u);

  JarmResponseOptions j;
  j.issuer = "https://op.example";
  j.audience = "acme";
  j.params = ParseOrDie(R"({"code":"code-456","state":"s1"})");
  auto jarm = JarmResponse(*client_, kOpSign, j);
  ASSERT_TRUE(jarm.ok()) << jarm.status();
  ASSERT_EQ(
      NodeVerify({"JWT=" + *jarm, "JWKS=" + Jwks(kOpSign), "ISS=https://op.example", "AUD=acme"},
                 &out),
      "");
  EXPECT_EQ(ParseOrDie(out).Find("payload")->Find("code")->as_string(), "code-456");
}

// The README's examples, built by default, run against the fixture's rings (their defaults) and
// produce what they say: the AS side verifies the request object it decrypted; the client side
// prints three compact JWSs.
TEST_F(ClientTest, ExamplesRunAgainstCustodyd) {
  const std::string addr = "--addr=" + daemon_->address();
  CommandResult as = RunCommand({BinDir() + "/as_example", addr});
  EXPECT_EQ(as.exit_code, 0) << as.out << as.err;
  EXPECT_NE(as.out.find("Verified request object claims:"), std::string::npos) << as.out;
  CommandResult client = RunCommand({BinDir() + "/client_example", addr});
  EXPECT_EQ(client.exit_code, 0) << client.out << client.err;
  for (const char* what : {"client_assertion", "request object:", "DPoP proof:"}) {
    EXPECT_NE(client.out.find(what), std::string::npos) << what << "\n" << client.out;
  }
  CommandResult usage = RunCommand({BinDir() + "/client_example"});
  EXPECT_EQ(usage.exit_code, 2) << usage.err;
}

}  // namespace
}  // namespace custody::client
