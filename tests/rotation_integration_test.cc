// Key rotation end to end: the real custodyd on a real SoftHSM2 token over real gRPC.
//
// What is checked against what:
// - Signatures are verified by tests/testing/independent_jws.h, written on OpenSSL's EVP API alone
//   (public JWK → EVP_PKEY via OSSL_PARAM, JOSE r||s → DER, EVP_DigestVerify, its own base64url
//   and RFC 7638 thumbprint), never by custody's jose/ code: the code under test does not judge
//   itself.
// - JWEs are made by the client library (EncryptToJwks), as a sender that encrypts to its cached
//   copy of the ring's JWKS would make them.
// - Expected values come from the API contract (proto/custody/v1/custody.proto) and from the
//   test's own clock and observations, not from custodyd's answers; timing facts are measured
//   with intervals (a request's send and receive times) so that a correct server cannot fail a
//   check because the machine is loaded.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "client/jwe_encryption.h"
#include "gtest/gtest.h"
#include "jose/json.h"
#include "openssl/bio.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/params.h"
#include "openssl/pem.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
using Ms = std::chrono::milliseconds;

int64_t UnixMs() {
  return std::chrono::duration_cast<Ms>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t MsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<Ms>(to - from).count();
}

// The deadline of this file's RPCs (rpc_helpers.h's are a hang guard only).
constexpr Ms kCallTimeout = 10s;

// ---------------------------------------------------------------------------------------------
// RPC helpers.

// SIGN rings are ES256; DECRYPT rings ECDH-ES+A128KW on P-256 (fast key generation).
grpc::Status CreateRing(Custodyd& d, const std::string& name, v1::Purpose purpose,
                        const v1::RotationPolicy* policy, v1::KeyRing* out = nullptr,
                        const std::string& import_pem = "") {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(purpose);
  req.set_alg(purpose == v1::SIGN ? "ES256" : "ECDH-ES+A128KW");
  if (purpose == v1::DECRYPT) req.set_curve("P-256");
  if (policy != nullptr) *req.mutable_policy() = *policy;
  if (!import_pem.empty()) req.mutable_import_key()->set_pkcs8_pem(import_pem);
  return custody::testing::CreateRing(d, req, out, kCallTimeout);
}

enum class VersionOp { kDisable, kEnable, kScheduleDestruction, kCancelDestruction };

grpc::Status ApplyVersionOp(Custodyd& d, VersionOp op, const std::string& ring, uint32_t version,
                            v1::KeyRing* out = nullptr, Ms timeout = 10s) {
  v1::KeyVersionRequest req;
  req.set_ring(ring);
  req.set_version(version);
  v1::KeyRing reply;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  grpc::Status s;
  switch (op) {
    case VersionOp::kDisable:
      s = d.admin().DisableKeyVersion(&ctx, req, &reply);
      break;
    case VersionOp::kEnable:
      s = d.admin().EnableKeyVersion(&ctx, req, &reply);
      break;
    case VersionOp::kScheduleDestruction:
      s = d.admin().ScheduleKeyVersionDestruction(&ctx, req, &reply);
      break;
    case VersionOp::kCancelDestruction:
      s = d.admin().CancelKeyVersionDestruction(&ctx, req, &reply);
      break;
  }
  if (out != nullptr) *out = reply;
  return s;
}

grpc::Status Compromise(Custodyd& d, const std::string& ring, uint32_t version,
                        const std::string& reason, v1::KeyRing* out = nullptr, Ms timeout = 10s) {
  v1::CompromiseKeyVersionRequest req;
  req.set_ring(ring);
  req.set_version(version);
  req.set_reason(reason);
  v1::KeyRing reply;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  grpc::Status s = d.admin().CompromiseKeyVersion(&ctx, req, &reply);
  if (out != nullptr) *out = reply;
  return s;
}

// The kids of a JWKS, in its order.
std::vector<std::string> KidsOf(const std::string& jwks) {
  std::vector<std::string> kids;
  auto parsed = jose::ParseJson(jwks, {.max_bytes = 4 << 20, .max_depth = 16});
  EXPECT_TRUE(parsed.ok()) << jwks;
  if (!parsed.ok() || parsed->Find("keys") == nullptr) return kids;
  for (const jose::Json& jwk : parsed->Find("keys")->as_array()) {
    kids.push_back(JsonString(jwk, "kid"));
  }
  return kids;
}

bool Publishes(const std::string& jwks, const std::string& kid) {
  std::vector<std::string> kids = KidsOf(jwks);
  return std::find(kids.begin(), kids.end(), kid) != kids.end();
}

// The JWK with `kid` in `jwks`, serialized; "" when absent.
std::string JwkOf(const std::string& jwks, const std::string& kid) {
  auto parsed = jose::ParseJson(jwks, {.max_bytes = 4 << 20, .max_depth = 16});
  if (!parsed.ok() || parsed->Find("keys") == nullptr) return "";
  for (const jose::Json& jwk : parsed->Find("keys")->as_array()) {
    if (JsonString(jwk, "kid") == kid) return jwk.Serialize();
  }
  return "";
}

const v1::KeyVersion* FindVersion(const v1::KeyRing& ring, uint32_t version) {
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.version() == version) return &v;
  }
  return nullptr;
}

// The version in `state`, when exactly one is; else nullptr.
const v1::KeyVersion* OnlyInState(const v1::KeyRing& ring, v1::KeyVersionState state) {
  const v1::KeyVersion* found = nullptr;
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.state() != state) continue;
    if (found != nullptr) return nullptr;
    found = &v;
  }
  return found;
}

int CountState(const v1::KeyRing& ring, v1::KeyVersionState state) {
  int n = 0;
  for (const v1::KeyVersion& v : ring.versions()) n += v.state() == state ? 1 : 0;
  return n;
}

v1::KeyVersionState StateOf(const v1::KeyRing& ring, uint32_t version) {
  const v1::KeyVersion* v = FindVersion(ring, version);
  return v == nullptr ? v1::KEY_VERSION_STATE_UNSPECIFIED : v->state();
}

std::string Describe(const v1::KeyRing& ring) {
  std::string out = ring.name() + " active=" + std::to_string(ring.active_version()) + ":";
  for (const v1::KeyVersion& v : ring.versions()) {
    out += " v" + std::to_string(v.version()) + "=" + v1::KeyVersionState_Name(v.state());
    if (v.object_missing()) out += "(object missing)";
  }
  return out;
}

// Signs on `ring` and verifies with the ring's JWKS fetched right after; "" or why not. *kid is
// the kid of the JWS header.
std::string SignAndVerify(Custodyd& d, const std::string& ring, std::string* kid = nullptr) {
  const std::string payload = R"({"iss":"https://op.example","sub":"rotation"})";
  v1::SignJwsResponse resp;
  grpc::Status s = SignJws(d, ring, payload, &resp);
  if (!s.ok()) return "SignJws " + ring + ": " + s.error_message();
  grpc::Status js;
  std::string jwks = GetJwks(d, {ring}, &js).jwks();
  if (!js.ok()) return "GetJwks " + ring + ": " + js.error_message();
  std::string error;
  auto keys = JwsKeysOf(jwks, &error);
  if (!error.empty()) return error;
  std::string header_kid, verified;
  std::string v = VerifyJws(keys, resp.jws(), &header_kid, &verified);
  if (!v.empty()) return ring + ": " + v;
  if (verified != payload) return ring + ": payload changed";
  if (header_kid != resp.kid()) return ring + ": header kid differs from SignJwsResponse.kid";
  if (kid != nullptr) *kid = header_kid;
  return "";
}

grpc::Status Decrypt(Custodyd& d, const std::string& ring, const std::string& jwe,
                     v1::DecryptJweResponse* out, Ms timeout = 10s) {
  v1::DecryptJweRequest req;
  req.set_ring(ring);
  req.set_jwe(jwe);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return d.signer().DecryptJwe(&ctx, req, out);
}

client::EncryptOptions A128Gcm() {
  client::EncryptOptions options;
  options.enc = jose::JweEnc::kA128Gcm;
  return options;
}

// The labels of the objects in the token, as pkcs11-tool lists them.
std::multiset<std::string> TokenLabels(const std::string& state) {
  std::string pin = ReadFileOrDie(state + "/pin");
  while (!pin.empty() && (pin.back() == '\n' || pin.back() == '\r' || pin.back() == ' ')) {
    pin.pop_back();
  }
  CommandResult r =
      RunCommand({"pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label",
                  "custody", "--login", "--pin", pin, "--list-objects"},
                 "", {"SOFTHSM2_CONF=" + state + "/softhsm2.conf"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::multiset<std::string> labels;
  size_t start = 0;
  for (size_t nl; (nl = r.out.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string line = r.out.substr(start, nl - start);
    size_t at = line.find("label:");
    if (at == std::string::npos) continue;
    std::string label = line.substr(at + 6);
    label.erase(0, label.find_first_not_of(" \t"));
    while (!label.empty() && (label.back() == ' ' || label.back() == '\t')) label.pop_back();
    labels.insert(label);
  }
  return labels;
}

// The last `lines` lines of custodyd's log.
std::string LogTail(const Custodyd& d, int lines = 25) {
  std::string log = d.log();
  size_t at = log.size();
  for (int i = 0; i <= lines && at != std::string::npos && at > 0; ++i) {
    at = log.rfind('\n', at - 1);
  }
  return at == std::string::npos ? log : log.substr(at + 1);
}

// The label contract: "custody/<ring>/v<n>".
std::string LabelOf(const std::string& ring, uint32_t version) {
  return "custody/" + ring + "/v" + std::to_string(version);
}

// Polls GetKeyRing until `done` holds or `timeout` passes; returns the last ring read.
template <typename Pred>
v1::KeyRing WaitForRing(Custodyd& d, const std::string& name, Ms timeout, Pred done) {
  auto deadline = Clock::now() + timeout;
  v1::KeyRing ring;
  while (true) {
    ring = v1::KeyRing();
    grpc::Status s = GetRing(d, name, &ring);
    if (s.ok() && done(ring)) return ring;
    if (Clock::now() >= deadline) return ring;
    std::this_thread::sleep_for(20ms);
  }
}

// A fresh EC P-256 private key as unencrypted PKCS#8 PEM, made by OpenSSL in process.
std::string NewP256Pkcs8Pem() {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  if (key == nullptr) std::abort();
  BIO* bio = BIO_new(BIO_s_mem());
  if (PEM_write_bio_PrivateKey(bio, key, nullptr, nullptr, 0, nullptr, nullptr) != 1) std::abort();
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  EVP_PKEY_free(key);
  return pem;
}

// ---------------------------------------------------------------------------------------------
// 1 + 2. Soak: continuous signing and decryption while the rings rotate by themselves.

constexpr char kSoakSignRing[] = "clients/acme/private-key-jwt";
constexpr char kSoakDecryptRing[] = "op/request-object";
constexpr int64_t kSoakPrepublishMs = 400;
constexpr int64_t kSoakPeriodMs = 800;
constexpr int64_t kSoakRetainMs = 2000;
constexpr int64_t kSoakDestroyDelayMs = 500;
constexpr Ms kClientCacheTtl = 300ms;  // < prepublish, as a verifier's JWKS cache must be

// A relying party's verifier as OpenID Connect Core 10.1.1 describes it: it keeps the ring's
// JWKS for the TTL and fetches it again only when that copy has expired, and on a kid it does
// not know it fetches again at once, but at most once per TTL.
class CachingVerifier {
 public:
  CachingVerifier(Custodyd& d, std::string ring, Ms ttl)
      : daemon_(d), ring_(std::move(ring)), ttl_(ttl) {}

  // "" when `jws` verifies; otherwise why not.
  std::string Verify(const std::string& jws, std::string* kid, std::string* payload) {
    Clock::time_point now = Clock::now();
    if (!have_ || now - fetched_at_ >= ttl_) {
      std::string e = Fetch();
      if (!e.empty()) return e;
    }
    std::string error;
    std::optional<ParsedJws> parsed = ParseCompactJws(jws, &error);
    if (!parsed) return error;
    const std::string& header_kid = JsonString(parsed->header, "kid");
    if (keys_.count(header_kid) == 0 &&
        (!refetched_for_unknown_kid_ || Clock::now() - last_unknown_kid_fetch_ >= ttl_)) {
      refetched_for_unknown_kid_ = true;
      last_unknown_kid_fetch_ = Clock::now();
      ++unknown_kid_fetches_;
      std::string e = Fetch();
      if (!e.empty()) return e;
    }
    return VerifyJws(keys_, jws, kid, payload);
  }
  int fetches() const { return fetches_; }
  int unknown_kid_fetches() const { return unknown_kid_fetches_; }

 private:
  std::string Fetch() {
    // The copy's age counts from the request: it is at least as fresh as that.
    Clock::time_point start = Clock::now();
    grpc::Status s;
    std::string jwks = GetJwks(daemon_, {ring_}, &s).jwks();
    if (!s.ok()) return "GetJwks: " + s.error_message();
    std::string error;
    auto keys = JwsKeysOf(jwks, &error);
    if (!error.empty()) return error;
    keys_ = std::move(keys);
    fetched_at_ = start;
    have_ = true;
    ++fetches_;
    return "";
  }

  Custodyd& daemon_;
  const std::string ring_;
  const Ms ttl_;
  JwsKeys keys_;
  bool have_ = false;
  Clock::time_point fetched_at_;
  bool refetched_for_unknown_kid_ = false;
  Clock::time_point last_unknown_kid_fetch_;
  int fetches_ = 0;
  int unknown_kid_fetches_ = 0;
};

// A sender of encrypted request objects (OpenID Connect Core 10.2): it caches the ring's JWKS
// for the TTL and encrypts to the first "enc" key of its copy.
class CachingSender {
 public:
  CachingSender(Custodyd& d, std::string ring, Ms ttl)
      : daemon_(d), ring_(std::move(ring)), ttl_(ttl) {}

  // The compact JWE, or "" with *error set. *kid: the kid of the key it was encrypted to.
  std::string Encrypt(const std::string& plaintext, std::string* kid, std::string* error) {
    if (jwks_.empty() || Clock::now() - fetched_at_ >= ttl_) {
      Clock::time_point start = Clock::now();
      grpc::Status s;
      std::string jwks = GetJwks(daemon_, {ring_}, &s).jwks();
      if (!s.ok()) {
        *error = "GetJwks: " + s.error_message();
        return "";
      }
      jwks_ = jwks;
      fetched_at_ = start;
      ++fetches_;
      first_enc_kid_.clear();
      auto parsed = jose::ParseJson(jwks_, {.max_bytes = 4 << 20, .max_depth = 16});
      if (parsed.ok() && parsed->Find("keys") != nullptr) {
        for (const jose::Json& jwk : parsed->Find("keys")->as_array()) {
          if (JsonString(jwk, "use") == "enc") {
            first_enc_kid_ = JsonString(jwk, "kid");
            break;
          }
        }
      }
    }
    auto jwe = client::EncryptToJwks(plaintext, jwks_, A128Gcm());
    if (!jwe.ok()) {
      *error = "EncryptToJwks: " + jwe.status().ToString();
      return "";
    }
    *kid = first_enc_kid_;
    return *jwe;
  }
  int fetches() const { return fetches_; }

 private:
  Custodyd& daemon_;
  const std::string ring_;
  const Ms ttl_;
  std::string jwks_;
  std::string first_enc_kid_;
  Clock::time_point fetched_at_;
  int fetches_ = 0;
};

// What a fast JWKS poller learnt about one kid. Every time is bracketed by a request's send and
// receive times, so each fact about custodyd's clock is an interval.
struct KidSightings {
  Clock::time_point last_absent_send;          // send of the last poll before it appeared
  Clock::time_point first_seen_recv;           // receipt of the first poll that listed it
  Clock::time_point last_seen_send;            // send of the last poll that listed it
  std::optional<Clock::time_point> gone_recv;  // receipt of the first poll without it
};

struct KidUse {  // per kid, on the signing or encrypting side
  Clock::time_point first_send, first_recv, last_send, last_recv;
  int64_t count = 0;
};

// Records one successful use of `kid` (sent at `send`, answered at `recv`).
void RecordUse(std::map<std::string, KidUse>& uses, const std::string& kid, Clock::time_point send,
               Clock::time_point recv) {
  auto [it, inserted] = uses.try_emplace(kid);
  if (inserted) {
    it->second.first_send = send;
    it->second.first_recv = recv;
  }
  it->second.last_send = send;
  it->second.last_recv = recv;
  ++it->second.count;
}

TEST(RotationSoakTest, TokensVerifyAndJwesDecryptAcrossFiftyRotationsWithCachingClients) {
  TempDir dir;
  Custodyd d(dir.path() + "/state", WithLowPolicyFloors());
  ASSERT_TRUE(d.started()) << d.log();
  const v1::RotationPolicy policy =
      Policy(kSoakPrepublishMs, kSoakPeriodMs, kSoakRetainMs, kSoakDestroyDelayMs);
  Clock::time_point create_send = Clock::now();
  v1::KeyRing sign_ring, decrypt_ring;
  grpc::Status s = CreateRing(d, kSoakSignRing, v1::SIGN, &policy, &sign_ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  s = CreateRing(d, kSoakDecryptRing, v1::DECRYPT, &policy, &decrypt_ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_GE(sign_ring.versions_size(), 1);
  // The first version signs at once: the ring did not exist before, no verifier can have
  // cached it, so the prepublish rule does not apply to it.
  const std::string initial_sign_kid = sign_ring.versions(0).kid();

  std::atomic<bool> stop{false};
  std::mutex mu;  // guards everything below that threads share
  std::map<std::string, KidSightings> sightings;
  std::map<std::string, std::string> ring_of_kid;
  size_t max_sign_keys = 0, max_decrypt_keys = 0;
  int64_t polls = 0, poll_errors = 0;
  std::vector<std::string> poll_problems;

  std::map<std::string, KidUse> signed_by;
  int64_t tokens = 0, sign_errors = 0, verify_failures = 0;
  std::vector<std::string> sign_samples;
  CachingVerifier verifier(d, kSoakSignRing, kClientCacheTtl);

  std::map<std::string, KidUse> encrypted_to;
  int64_t jwes = 0, encrypt_errors = 0, decrypt_failures = 0;
  std::vector<std::string> decrypt_samples;
  CachingSender sender(d, kSoakDecryptRing, kClientCacheTtl);

  auto note = [](std::vector<std::string>& samples, std::string what) {
    if (samples.size() < 10) samples.push_back(std::move(what));
  };

  // The poller: GetJwks of both rings every 10 ms.
  std::thread poller([&] {
    Clock::time_point previous_send = create_send;
    std::set<std::string> listed;
    while (!stop.load()) {
      Clock::time_point send = Clock::now();
      grpc::Status ps;
      std::string jwks = GetJwks(d, {kSoakSignRing, kSoakDecryptRing}, &ps).jwks();
      Clock::time_point recv = Clock::now();
      std::lock_guard<std::mutex> lock(mu);
      ++polls;
      if (!ps.ok()) {
        ++poll_errors;
        note(poll_problems, "GetJwks: " + ps.error_message());
      } else {
        auto parsed = jose::ParseJson(jwks, {.max_bytes = 4 << 20, .max_depth = 16});
        std::set<std::string> now_listed;
        size_t sign_keys = 0, decrypt_keys = 0;
        if (parsed.ok() && parsed->Find("keys") != nullptr) {
          for (const jose::Json& jwk : parsed->Find("keys")->as_array()) {
            std::string kid = JsonString(jwk, "kid");
            bool is_sign = JsonString(jwk, "use") == "sig";
            (is_sign ? sign_keys : decrypt_keys)++;
            ring_of_kid[kid] = is_sign ? kSoakSignRing : kSoakDecryptRing;
            now_listed.insert(kid);
            auto [it, inserted] = sightings.try_emplace(kid);
            if (inserted) {
              it->second.last_absent_send = previous_send;
              it->second.first_seen_recv = recv;
            } else if (it->second.gone_recv) {
              note(poll_problems, "kid " + kid + " was published again after leaving the JWKS");
            }
            it->second.last_seen_send = send;
          }
        } else {
          note(poll_problems, "unparsable JWKS: " + jwks);
        }
        for (const std::string& kid : listed) {
          if (now_listed.count(kid) == 0 && !sightings[kid].gone_recv) {
            sightings[kid].gone_recv = recv;
          }
        }
        listed = std::move(now_listed);
        max_sign_keys = std::max(max_sign_keys, sign_keys);
        max_decrypt_keys = std::max(max_decrypt_keys, decrypt_keys);
        previous_send = send;
      }
      std::this_thread::sleep_for(10ms);
    }
  });

  std::thread signer([&] {
    for (int64_t n = 0; !stop.load(); ++n) {
      std::string payload =
          R"({"iss":"acme","aud":"https://op.example","jti":")" + std::to_string(n) + "\"}";
      Clock::time_point send = Clock::now();
      v1::SignJwsResponse resp;
      grpc::Status ss = SignJws(d, kSoakSignRing, payload, &resp, 5s);
      Clock::time_point recv = Clock::now();
      std::string kid, verified_payload, failure;
      if (ss.ok()) {
        failure = verifier.Verify(resp.jws(), &kid, &verified_payload);
        if (failure.empty() && verified_payload != payload) failure = "payload changed";
        if (failure.empty() && kid != resp.kid()) failure = "header kid != response kid";
      }
      std::lock_guard<std::mutex> lock(mu);
      ++tokens;
      if (!ss.ok()) {
        ++sign_errors;
        note(sign_samples, "SignJws #" + std::to_string(n) + ": " + ss.error_message());
      } else if (!failure.empty()) {
        ++verify_failures;
        note(sign_samples, "token #" + std::to_string(n) + " kid " + kid + ": " + failure);
      } else {
        RecordUse(signed_by, kid, send, recv);
      }
      std::this_thread::sleep_for(1ms);
    }
  });

  std::thread encryptor([&] {
    for (int64_t n = 0; !stop.load(); ++n) {
      std::string plaintext = "request object #" + std::to_string(n);
      std::string kid, error;
      Clock::time_point send = Clock::now();
      std::string jwe = sender.Encrypt(plaintext, &kid, &error);
      v1::DecryptJweResponse resp;
      grpc::Status ds;
      std::string failure;
      if (!jwe.empty()) {
        ds = Decrypt(d, kSoakDecryptRing, jwe, &resp, 5s);
        if (!ds.ok()) {
          failure = "DecryptJwe: " + ds.error_message();
        } else if (resp.plaintext() != plaintext) {
          failure = "plaintext changed";
        } else if (resp.kid() != kid) {
          failure = "decrypted by kid " + resp.kid() + ", encrypted to " + kid;
        }
      }
      Clock::time_point recv = Clock::now();
      std::lock_guard<std::mutex> lock(mu);
      ++jwes;
      if (jwe.empty()) {
        ++encrypt_errors;
        note(decrypt_samples, "JWE #" + std::to_string(n) + ": " + error);
      } else if (!failure.empty()) {
        ++decrypt_failures;
        note(decrypt_samples, "JWE #" + std::to_string(n) + " to " + kid + ": " + failure);
      } else {
        RecordUse(encrypted_to, kid, send, recv);
      }
      std::this_thread::sleep_for(1ms);
    }
  });

  // Run until 50 distinct kids have signed and the decryption ring's preferred key changed 50
  // times; give up early when rotation is visibly not happening.
  Clock::time_point soak_start = Clock::now();
  std::string stop_reason;
  while (true) {
    std::this_thread::sleep_for(200ms);
    size_t sign_kids, decrypt_kids;
    {
      std::lock_guard<std::mutex> lock(mu);
      sign_kids = signed_by.size();
      decrypt_kids = encrypted_to.size();
    }
    int64_t elapsed = MsBetween(soak_start, Clock::now());
    if (sign_kids >= 50 && decrypt_kids >= 51) break;
    if (elapsed > 5000 && (sign_kids < 2 || decrypt_kids < 2)) {
      stop_reason = "no automatic rotation within 5 s";
      break;
    }
    if (elapsed > 100000) {
      stop_reason = "did not reach 50 rotations within 100 s";
      break;
    }
  }
  stop.store(true);
  poller.join();
  signer.join();
  encryptor.join();
  Clock::time_point end = Clock::now();
  double seconds = MsBetween(soak_start, end) / 1000.0;

  std::printf(
      "[soak] %.1f s | signing: %lld tokens, %zu kids (%zu rotations), %lld sign errors, %lld "
      "verification failures, %d JWKS fetches (%d for unknown kids) | decryption: %lld JWEs, "
      "%zu kids (%zu rotations), %lld encrypt errors, %lld decrypt failures, %d JWKS fetches | "
      "poller: %lld polls, max published sign=%zu enc=%zu\n",
      seconds, static_cast<long long>(tokens), signed_by.size(),
      signed_by.empty() ? 0 : signed_by.size() - 1, static_cast<long long>(sign_errors),
      static_cast<long long>(verify_failures), verifier.fetches(), verifier.unknown_kid_fetches(),
      static_cast<long long>(jwes), encrypted_to.size(),
      encrypted_to.empty() ? 0 : encrypted_to.size() - 1, static_cast<long long>(encrypt_errors),
      static_cast<long long>(decrypt_failures), sender.fetches(), static_cast<long long>(polls),
      max_sign_keys, max_decrypt_keys);
  std::fflush(stdout);

  EXPECT_EQ(stop_reason, "");
  // Zero failures on either side.
  EXPECT_EQ(sign_errors, 0);
  EXPECT_EQ(verify_failures, 0);
  for (const std::string& sample : sign_samples) ADD_FAILURE() << sample;
  EXPECT_EQ(encrypt_errors, 0);
  EXPECT_EQ(decrypt_failures, 0);
  for (const std::string& sample : decrypt_samples) ADD_FAILURE() << sample;
  EXPECT_EQ(poll_errors, 0);
  for (const std::string& p : poll_problems) ADD_FAILURE() << p;
  EXPECT_GE(signed_by.size(), 50u) << "distinct signing kids";
  EXPECT_GE(encrypted_to.size(), 51u) << "distinct encryption kids (50 rotations)";

  // Pre-publication: every signing kid but the ring's first was listed in the JWKS at least
  // prepublish before its first signature. U is the largest the true gap can be (first
  // signature's receipt minus the last poll without the kid), L the smallest (first signature's
  // send minus the first poll that listed it). U < prepublish is a proven violation; L is the
  // issue's check (prepublish minus 50 ms), made where the bracketing is tight enough to mean
  // something (U - L <= 50 ms).
  int64_t min_lower = INT64_MAX, loose = 0;
  for (const auto& [kid, use] : signed_by) {
    if (kid == initial_sign_kid) continue;
    auto seen = sightings.find(kid);
    if (seen == sightings.end()) {
      ADD_FAILURE() << "kid " << kid << " signed but never appeared in the JWKS";
      continue;
    }
    EXPECT_LT(seen->second.first_seen_recv, use.first_send)
        << "kid " << kid << " signed before the JWKS listed it";
    int64_t upper = MsBetween(seen->second.last_absent_send, use.first_recv);
    int64_t lower = MsBetween(seen->second.first_seen_recv, use.first_send);
    EXPECT_GE(upper, kSoakPrepublishMs)
        << "kid " << kid << " signed at most " << upper << " ms after it was published";
    if (upper - lower <= 50) {
      EXPECT_GE(lower, kSoakPrepublishMs - 50) << "kid " << kid;
    } else {
      ++loose;
    }
    min_lower = std::min(min_lower, lower);
  }
  // Retention: a kid that left the JWKS did so at least retain after its last signature (the
  // largest the true gap can be is checked, so a correct server always passes).
  int64_t min_retained = INT64_MAX;
  for (const auto& [kid, use] : signed_by) {
    auto seen = sightings.find(kid);
    if (seen == sightings.end() || !seen->second.gone_recv) continue;
    int64_t retained = MsBetween(use.last_send, *seen->second.gone_recv);
    EXPECT_GE(retained, kSoakRetainMs)
        << "kid " << kid << " left the JWKS " << retained << " ms after its last signature";
    min_retained = std::min(min_retained, retained);
  }
  std::printf(
      "[soak] first-signature minus first-seen: min %lld ms (%lld loosely bracketed); last "
      "signature to unpublication: min %lld ms\n",
      static_cast<long long>(min_lower), static_cast<long long>(loose),
      static_cast<long long>(min_retained));

  // Old versions are destroyed and the published set stays small.
  EXPECT_LE(max_sign_keys, 6u);
  EXPECT_LE(max_decrypt_keys, 6u);
  v1::KeyRing final_sign = GetRing(d, kSoakSignRing);
  v1::KeyRing final_decrypt = GetRing(d, kSoakDecryptRing);
  int64_t final_unix = UnixMs();
  std::string final_jwks = GetJwks(d, {kSoakSignRing, kSoakDecryptRing}).jwks();
  Clock::time_point final_time = Clock::now();
  for (const v1::KeyRing* ring : {&final_sign, &final_decrypt}) {
    SCOPED_TRACE(ring->name());
    EXPECT_EQ(CountState(*ring, v1::ACTIVE), 1) << Describe(*ring);
    EXPECT_GE(CountState(*ring, v1::DESTROYED), 40) << Describe(*ring);
    int64_t must_be_destroyed = 0;
    for (const v1::KeyVersion& v : ring->versions()) {
      if (v.state() == v1::DESTROYED) {
        EXPECT_FALSE(Publishes(final_jwks, v.kid())) << "v" << v.version();
        EXPECT_LE(v.destroy_time_ms(), final_unix);
      }
      auto seen = sightings.find(v.kid());
      // Unpublished more than destroy_delay + 1.5 s ago (by the test's clock): destroyed by now.
      if (seen != sightings.end() && seen->second.gone_recv &&
          MsBetween(*seen->second.gone_recv, final_time) > kSoakDestroyDelayMs + 1500) {
        ++must_be_destroyed;
        EXPECT_EQ(v.state(), v1::DESTROYED)
            << "v" << v.version() << " left the JWKS "
            << MsBetween(*seen->second.gone_recv, final_time) << " ms ago";
      }
      // What custodyd itself recorded must agree: never active before prepublish had passed
      // (the first version excepted).
      if (v.version() > 1 && v.activate_time_ms() != 0) {
        EXPECT_GE(v.activate_time_ms() - v.publish_time_ms(), kSoakPrepublishMs)
            << "v" << v.version();
      }
    }
    EXPECT_GE(must_be_destroyed, 40);
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Operations, one custodyd per test.

class RotationOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<Custodyd>(state(), WithLowPolicyFloors());
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
  }
  std::string state() const { return dir_.path() + "/state"; }
  Custodyd& d() { return *daemon_; }

  // A ring created with `policy` (or none), checked to exist.
  v1::KeyRing Create(const std::string& name, v1::Purpose purpose,
                     const v1::RotationPolicy* policy) {
    v1::KeyRing ring;
    grpc::Status s = CreateRing(d(), name, purpose, policy, &ring);
    EXPECT_TRUE(s.ok()) << name << ": " << s.error_message();
    return ring;
  }

  TempDir dir_;
  std::unique_ptr<Custodyd> daemon_;
};

// A policy under which nothing happens by itself during a test.
const v1::RotationPolicy& SlowPolicy() {
  static const auto* policy = new v1::RotationPolicy(Policy(60000, 0, 120000, 60000));
  return *policy;
}

// The verifier the other tests rely on, checked once: it accepts what jwcrypto accepts and
// rejects a flipped signature bit, a changed payload and a key of another ring.
TEST_F(RotationOpsTest, TheTestsOwnVerifierAgreesWithJwcryptoAndRejectsTampering) {
  Create("op/verifier", v1::SIGN, nullptr);
  Create("op/other", v1::SIGN, nullptr);
  v1::SignJwsResponse resp;
  ASSERT_TRUE(SignJws(d(), "op/verifier", R"({"sub":"alice"})", &resp).ok());
  std::string jwks = Jwks(d(), {"op/verifier"});
  EXPECT_EQ(VerifyWithJwcrypto(jwks, resp.jws(), "ES256"), "");
  std::string error;
  auto keys = JwsKeysOf(jwks, &error);
  ASSERT_EQ(error, "");
  ASSERT_EQ(keys.size(), 1u);
  std::string payload;
  EXPECT_EQ(VerifyJws(keys, resp.jws(), nullptr, &payload), "");
  EXPECT_EQ(payload, R"({"sub":"alice"})");

  std::string flipped = resp.jws();
  char& c = flipped[flipped.size() - 5];
  c = c == 'A' ? 'B' : 'A';
  EXPECT_NE(VerifyJws(keys, flipped), "");
  std::string other_payload = resp.jws();
  size_t dot1 = other_payload.find('.'), dot2 = other_payload.rfind('.');
  other_payload.replace(dot1 + 1, dot2 - dot1 - 1, B64UrlEncode(R"({"sub":"mallory"})"));
  EXPECT_NE(VerifyJws(keys, other_payload), "");
  auto other_keys = JwsKeysOf(Jwks(d(), {"op/other"}), &error);
  EXPECT_NE(VerifyJws(other_keys, resp.jws()), "");
  // Same kid, another key: the signature check itself must fail.
  JwsKeys swapped = {{resp.kid(), other_keys.begin()->second}};
  EXPECT_EQ(VerifyJws(swapped, resp.jws()), "the ES256 signature does not verify");
}

TEST_F(RotationOpsTest, InvalidRotationPoliciesAreRefusedNamingTheRuleAndChangeNothing) {
  Create("op/policy", v1::SIGN, nullptr);
  v1::KeyRing before = GetRing(d(), "op/policy");

  grpc::Status s = UpdatePolicy(d(), "op/policy", Policy(1000, 0, 500, 0));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("retain"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("prepublish"), std::string::npos) << s.error_message();

  s = UpdatePolicy(d(), "op/policy", Policy(1000, 500, 2000, 0));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("rotation"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("prepublish"), std::string::npos) << s.error_message();

  s = UpdatePolicy(d(), "op/policy", Policy(-1, 0, 0, 0));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  s = UpdatePolicy(d(), "op/policy", Policy(0, 0, 0, -5));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  s = UpdatePolicy(d(), "op/nope", Policy(1000, 0, 1000, 0));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);

  v1::KeyRing after = GetRing(d(), "op/policy");
  EXPECT_EQ(after.SerializeAsString(), before.SerializeAsString()) << Describe(after);

  // The same rules at creation; the refused ring does not exist afterwards.
  v1::RotationPolicy bad = Policy(1000, 0, 999, 0);
  s = CreateRing(d(), "op/bad-policy", v1::SIGN, &bad);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::KeyRing none;
  EXPECT_EQ(GetRing(d(), "op/bad-policy", &none).error_code(), grpc::StatusCode::NOT_FOUND);

  // The boundaries are allowed: retain == prepublish, rotation_period == prepublish.
  v1::KeyRing ok;
  s = UpdatePolicy(d(), "op/policy", Policy(1000, 1000, 1000, 0), &ok);
  EXPECT_TRUE(s.ok()) << s.error_message();
}

TEST_F(RotationOpsTest, UpdateRotationPolicyPrepublishesAPendingVersion) {
  v1::KeyRing created = Create("op/prepublish", v1::SIGN, nullptr);
  ASSERT_EQ(created.versions_size(), 1);
  EXPECT_FALSE(created.policy_explicit());
  EXPECT_EQ(created.versions(0).state(), v1::ACTIVE);
  // The documented defaults: prepublish 1 h, manual, retain 24 h, destroy_delay 7 days.
  EXPECT_EQ(created.policy().prepublish_ms(), 3600000);
  EXPECT_EQ(created.policy().rotation_period_ms(), 0);
  EXPECT_EQ(created.policy().retain_ms(), 86400000);
  EXPECT_EQ(created.policy().destroy_delay_ms(), 7 * 86400000LL);
  EXPECT_EQ(created.next_rotation_ms(), 0);
  const std::string v1_kid = created.versions(0).kid();

  const v1::RotationPolicy policy = Policy(1000, 0, 3000, 500);
  int64_t before = UnixMs();
  v1::KeyRing updated;
  grpc::Status s = UpdatePolicy(d(), "op/prepublish", policy, &updated);
  int64_t after = UnixMs();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(updated.policy_explicit());
  EXPECT_EQ(updated.policy().SerializeAsString(), policy.SerializeAsString());
  ASSERT_EQ(CountState(updated, v1::PENDING), 1) << Describe(updated);
  const v1::KeyVersion pending = *OnlyInState(updated, v1::PENDING);
  EXPECT_EQ(pending.version(), 2u);
  EXPECT_GE(pending.publish_time_ms(), before);
  EXPECT_LE(pending.publish_time_ms(), after);
  EXPECT_EQ(pending.activate_time_ms(), 0);
  EXPECT_EQ(updated.active_version(), 1u);
  EXPECT_EQ(updated.next_rotation_ms(), 0) << "manual rotation";

  // Published, and not signing.
  std::string jwks = Jwks(d(), {"op/prepublish"});
  EXPECT_TRUE(Publishes(jwks, v1_kid));
  EXPECT_TRUE(Publishes(jwks, pending.kid()));
  std::string signing_kid;
  EXPECT_EQ(SignAndVerify(d(), "op/prepublish", &signing_kid), "");
  EXPECT_EQ(signing_kid, v1_kid);

  // Setting a policy again keeps the one PENDING version.
  ASSERT_TRUE(UpdatePolicy(d(), "op/prepublish", policy, &updated).ok());
  ASSERT_EQ(CountState(updated, v1::PENDING), 1) << Describe(updated);
  EXPECT_EQ(OnlyInState(updated, v1::PENDING)->kid(), pending.kid());

  // An automatic period schedules a rotation.
  before = UnixMs();
  ASSERT_TRUE(UpdatePolicy(d(), "op/prepublish", Policy(1000, 5000, 3000, 500), &updated).ok());
  EXPECT_GT(updated.next_rotation_ms(), before);
  EXPECT_LE(updated.next_rotation_ms(), UnixMs() + 5000);
}

TEST_F(RotationOpsTest, RotateWaitsUntilThePendingVersionWasPublishedForPrepublish) {
  const v1::RotationPolicy policy = Policy(1000, 0, 5000, 60000);
  v1::KeyRing ring = Create("op/rotate", v1::SIGN, &policy);
  ASSERT_EQ(ring.active_version(), 1u) << Describe(ring);
  ASSERT_NE(OnlyInState(ring, v1::PENDING), nullptr) << Describe(ring);
  const v1::KeyVersion v1_version = *FindVersion(ring, 1);
  const v1::KeyVersion pending = *OnlyInState(ring, v1::PENDING);

  // Too early: FAILED_PRECONDITION saying when it can be, and nothing changes.
  v1::RotateKeyRingResponse early;
  grpc::Status s = Rotate(d(), "op/rotate", false, &early);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  const int64_t eligible = NotRotatedUntilMs(s);
  EXPECT_NEAR(eligible, pending.publish_time_ms() + 1000, 5) << s.error_message();
  EXPECT_GT(eligible, UnixMs()) << "the test was too slow to see it ineligible";
  EXPECT_EQ(GetRing(d(), "op/rotate").active_version(), 1u);
  EXPECT_EQ(StateOf(GetRing(d(), "op/rotate"), pending.version()), v1::PENDING);

  // Past the eligible time, the same call rotates.
  int64_t wait = eligible + 100 - UnixMs();
  if (wait > 0) std::this_thread::sleep_for(Ms(wait));
  v1::RotateKeyRingResponse rotated;
  s = Rotate(d(), "op/rotate", false, &rotated);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(rotated.rotated()) << rotated.message();
  const v1::KeyRing& r = rotated.ring();
  EXPECT_EQ(r.active_version(), pending.version()) << Describe(r);
  EXPECT_EQ(StateOf(r, 1), v1::RETIRED) << Describe(r);
  EXPECT_EQ(StateOf(r, pending.version()), v1::ACTIVE) << Describe(r);
  ASSERT_EQ(CountState(r, v1::ACTIVE), 1) << Describe(r);
  ASSERT_EQ(CountState(r, v1::PENDING), 1) << Describe(r);
  const v1::KeyVersion next = *OnlyInState(r, v1::PENDING);
  EXPECT_GT(next.version(), pending.version());
  EXPECT_GT(FindVersion(r, 1)->retire_time_ms(), 0);
  EXPECT_GE(FindVersion(r, pending.version())->activate_time_ms(), eligible);
  EXPECT_EQ(rotated.active_version(), pending.version());
  EXPECT_EQ(rotated.pending_error(), "");

  // The new ACTIVE signs; all three are published.
  std::string signing_kid;
  EXPECT_EQ(SignAndVerify(d(), "op/rotate", &signing_kid), "");
  EXPECT_EQ(signing_kid, pending.kid());
  std::string jwks = Jwks(d(), {"op/rotate"});
  for (const std::string& kid : {v1_version.kid(), pending.kid(), next.kid()}) {
    EXPECT_TRUE(Publishes(jwks, kid)) << kid;
  }

  // The fresh PENDING is too young in turn.
  v1::RotateKeyRingResponse again;
  s = Rotate(d(), "op/rotate", false, &again);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NEAR(NotRotatedUntilMs(s), next.publish_time_ms() + 1000, 5) << s.error_message();
}

TEST_F(RotationOpsTest, ForcedRotationPromotesAtOnceOrMakesAFreshKeyActive) {
  // With a PENDING version one hour from eligible.
  v1::KeyRing ring = Create("op/force", v1::SIGN, &SlowPolicy());
  ASSERT_NE(OnlyInState(ring, v1::PENDING), nullptr) << Describe(ring);
  const v1::KeyVersion pending = *OnlyInState(ring, v1::PENDING);
  v1::RotateKeyRingResponse forced;
  grpc::Status s = Rotate(d(), "op/force", true, &forced);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(forced.rotated());
  EXPECT_EQ(forced.ring().active_version(), pending.version()) << Describe(forced.ring());
  EXPECT_EQ(StateOf(forced.ring(), 1), v1::RETIRED);
  EXPECT_EQ(CountState(forced.ring(), v1::PENDING), 1) << Describe(forced.ring());
  std::string kid;
  EXPECT_EQ(SignAndVerify(d(), "op/force", &kid), "");
  EXPECT_EQ(kid, pending.kid());

  // Without a PENDING version (no explicit policy): a fresh key becomes ACTIVE at once.
  v1::KeyRing bare = Create("op/force-bare", v1::SIGN, nullptr);
  ASSERT_EQ(bare.versions_size(), 1);
  s = Rotate(d(), "op/force-bare", true, &forced);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(forced.rotated());
  EXPECT_EQ(StateOf(forced.ring(), 1), v1::RETIRED) << Describe(forced.ring());
  ASSERT_EQ(CountState(forced.ring(), v1::ACTIVE), 1) << Describe(forced.ring());
  const v1::KeyVersion fresh = *OnlyInState(forced.ring(), v1::ACTIVE);
  EXPECT_NE(fresh.version(), 1u);
  EXPECT_EQ(SignAndVerify(d(), "op/force-bare", &kid), "");
  EXPECT_EQ(kid, fresh.kid());

  // And without force on a ring with no PENDING version: one is created, nothing promoted.
  Create("op/unforced-bare", v1::SIGN, nullptr);
  // The answer is FAILED_PRECONDITION naming the version it created and when it can be promoted.
  v1::RotateKeyRingResponse unforced;
  s = Rotate(d(), "op/unforced-bare", false, &unforced);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  const v1::KeyRing after = GetRing(d(), "op/unforced-bare");
  EXPECT_EQ(after.active_version(), 1u);
  ASSERT_EQ(CountState(after, v1::PENDING), 1) << Describe(after);
  const v1::KeyVersion& created = *OnlyInState(after, v1::PENDING);
  EXPECT_NE(s.error_message().find("version " + std::to_string(created.version()) + " was created"),
            std::string::npos)
      << s.error_message();
  EXPECT_NEAR(NotRotatedUntilMs(s), created.publish_time_ms() + 3600000, 5)
      << "default prepublish: 1 h; " << s.error_message();
}

TEST_F(RotationOpsTest, ActiveVersionCannotBeDisabledOrScheduledForDestruction) {
  Create("op/active", v1::SIGN, &SlowPolicy());
  v1::KeyRing before = GetRing(d(), "op/active");
  grpc::Status s = ApplyVersionOp(d(), VersionOp::kDisable, "op/active", 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  s = ApplyVersionOp(d(), VersionOp::kScheduleDestruction, "op/active", 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  s = ApplyVersionOp(d(), VersionOp::kDisable, "op/active", 99);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  v1::KeyRing after = GetRing(d(), "op/active");
  EXPECT_EQ(after.SerializeAsString(), before.SerializeAsString()) << Describe(after);
  EXPECT_EQ(SignAndVerify(d(), "op/active"), "");
}

TEST_F(RotationOpsTest, DisabledVersionIsUnpublishedUntilEnabled) {
  Create("op/disable", v1::SIGN, &SlowPolicy());
  v1::RotateKeyRingResponse rotated;
  ASSERT_TRUE(Rotate(d(), "op/disable", true, &rotated).ok());
  v1::KeyRing ring = rotated.ring();
  ASSERT_EQ(StateOf(ring, 1), v1::RETIRED) << Describe(ring);
  const std::string retired_kid = FindVersion(ring, 1)->kid();
  ASSERT_TRUE(Publishes(Jwks(d(), {"op/disable"}), retired_kid));

  // RETIRED → DISABLED → RETIRED.
  v1::KeyRing out;
  grpc::Status s = ApplyVersionOp(d(), VersionOp::kDisable, "op/disable", 1, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, 1), v1::DISABLED);
  EXPECT_EQ(FindVersion(out, 1)->previous_state(), v1::RETIRED);
  EXPECT_FALSE(Publishes(Jwks(d(), {"op/disable"}), retired_kid));
  EXPECT_EQ(SignAndVerify(d(), "op/disable"), "");
  s = ApplyVersionOp(d(), VersionOp::kEnable, "op/disable", 1, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, 1), v1::RETIRED);
  EXPECT_TRUE(Publishes(Jwks(d(), {"op/disable"}), retired_kid));

  // PENDING → DISABLED → PENDING (or RETIRED when the ring has made another PENDING meanwhile).
  ASSERT_NE(OnlyInState(out, v1::PENDING), nullptr) << Describe(out);
  const v1::KeyVersion pending = *OnlyInState(out, v1::PENDING);
  s = ApplyVersionOp(d(), VersionOp::kDisable, "op/disable", pending.version(), &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, pending.version()), v1::DISABLED);
  EXPECT_EQ(FindVersion(out, pending.version())->previous_state(), v1::PENDING);
  EXPECT_FALSE(Publishes(Jwks(d(), {"op/disable"}), pending.kid()));
  s = ApplyVersionOp(d(), VersionOp::kEnable, "op/disable", pending.version(), &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  bool another_pending = false;
  for (const v1::KeyVersion& v : out.versions()) {
    another_pending |= v.state() == v1::PENDING && v.version() != pending.version();
  }
  EXPECT_EQ(StateOf(out, pending.version()), another_pending ? v1::RETIRED : v1::PENDING)
      << Describe(out);
  EXPECT_EQ(CountState(out, v1::PENDING), 1) << Describe(out);
  EXPECT_TRUE(Publishes(Jwks(d(), {"op/disable"}), pending.kid()));
}

TEST_F(RotationOpsTest, DisabledDecryptionVersionStopsDecryptingUntilEnabled) {
  Create("op/enc-disable", v1::DECRYPT, &SlowPolicy());
  std::string old_jwk =
      JwkOf(Jwks(d(), {"op/enc-disable"}), GetRing(d(), "op/enc-disable").versions(0).kid());
  ASSERT_NE(old_jwk, "");
  v1::RotateKeyRingResponse rotated;
  ASSERT_TRUE(Rotate(d(), "op/enc-disable", true, &rotated).ok());
  ASSERT_EQ(StateOf(rotated.ring(), 1), v1::RETIRED) << Describe(rotated.ring());

  // To the retired key, as a sender with an old cached JWKS would encrypt.
  auto jwe = client::EncryptToJwk("to v1", old_jwk, A128Gcm());
  ASSERT_TRUE(jwe.ok()) << jwe.status();
  v1::DecryptJweResponse resp;
  grpc::Status s = Decrypt(d(), "op/enc-disable", *jwe, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.version(), 1u);
  EXPECT_EQ(resp.plaintext(), "to v1");
  // The first key of the JWKS is the new ACTIVE one.
  auto to_active = client::EncryptToJwks("to active", Jwks(d(), {"op/enc-disable"}), A128Gcm());
  ASSERT_TRUE(to_active.ok()) << to_active.status();
  s = Decrypt(d(), "op/enc-disable", *to_active, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.version(), rotated.ring().active_version());

  ASSERT_TRUE(ApplyVersionOp(d(), VersionOp::kDisable, "op/enc-disable", 1).ok());
  s = Decrypt(d(), "op/enc-disable", *jwe, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "decryption failed");

  ASSERT_TRUE(ApplyVersionOp(d(), VersionOp::kEnable, "op/enc-disable", 1).ok());
  s = Decrypt(d(), "op/enc-disable", *jwe, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.plaintext(), "to v1");
}

TEST_F(RotationOpsTest, ScheduledDestructionUnpublishesAndCancelLeavesItDisabled) {
  Create("op/schedule", v1::SIGN, &SlowPolicy());
  v1::RotateKeyRingResponse rotated;
  ASSERT_TRUE(Rotate(d(), "op/schedule", true, &rotated).ok());
  ASSERT_EQ(StateOf(rotated.ring(), 1), v1::RETIRED) << Describe(rotated.ring());
  const std::string kid = FindVersion(rotated.ring(), 1)->kid();

  int64_t before = UnixMs();
  v1::KeyRing out;
  grpc::Status s = ApplyVersionOp(d(), VersionOp::kScheduleDestruction, "op/schedule", 1, &out);
  int64_t after = UnixMs();
  ASSERT_TRUE(s.ok()) << s.error_message();
  const v1::KeyVersion* v = FindVersion(out, 1);
  EXPECT_EQ(v->state(), v1::DESTROY_SCHEDULED);
  EXPECT_EQ(v->previous_state(), v1::RETIRED);
  EXPECT_GE(v->destroy_after_ms(), before + 60000);
  EXPECT_LE(v->destroy_after_ms(), after + 60000);
  EXPECT_FALSE(Publishes(Jwks(d(), {"op/schedule"}), kid));

  s = ApplyVersionOp(d(), VersionOp::kCancelDestruction, "op/schedule", 1, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, 1), v1::DISABLED);
  EXPECT_FALSE(Publishes(Jwks(d(), {"op/schedule"}), kid)) << "cancelled is still unpublished";

  s = ApplyVersionOp(d(), VersionOp::kEnable, "op/schedule", 1, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, 1), v1::RETIRED);
  EXPECT_TRUE(Publishes(Jwks(d(), {"op/schedule"}), kid));

  // A PENDING and a DISABLED version can be scheduled too.
  ASSERT_NE(OnlyInState(out, v1::PENDING), nullptr) << Describe(out);
  uint32_t pending = OnlyInState(out, v1::PENDING)->version();
  s = ApplyVersionOp(d(), VersionOp::kScheduleDestruction, "op/schedule", pending, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, pending), v1::DESTROY_SCHEDULED);
  ASSERT_TRUE(ApplyVersionOp(d(), VersionOp::kDisable, "op/schedule", 1).ok());
  s = ApplyVersionOp(d(), VersionOp::kScheduleDestruction, "op/schedule", 1, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StateOf(out, 1), v1::DESTROY_SCHEDULED);
}

TEST_F(RotationOpsTest, DestructionAfterTheDelayRemovesTheTokenObject) {
  const v1::RotationPolicy policy = Policy(60000, 0, 120000, 500);
  Create("op/destroy", v1::SIGN, &policy);
  v1::RotateKeyRingResponse rotated;
  ASSERT_TRUE(Rotate(d(), "op/destroy", true, &rotated).ok());
  ASSERT_EQ(StateOf(rotated.ring(), 1), v1::RETIRED) << Describe(rotated.ring());
  EXPECT_EQ(FindVersion(rotated.ring(), 1)->token_object_label(), LabelOf("op/destroy", 1));
  std::multiset<std::string> labels = TokenLabels(state());
  ASSERT_GT(labels.count(LabelOf("op/destroy", 1)), 0u) << "positive control";

  int64_t before = UnixMs();
  v1::KeyRing out;
  ASSERT_TRUE(ApplyVersionOp(d(), VersionOp::kScheduleDestruction, "op/destroy", 1, &out).ok());
  // Still cancellable well inside the delay.
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(StateOf(GetRing(d(), "op/destroy"), 1), v1::DESTROY_SCHEDULED);
  v1::KeyRing ring = WaitForRing(d(), "op/destroy", 5000ms, [](const v1::KeyRing& r) {
    return StateOf(r, 1) == v1::DESTROYED;
  });
  ASSERT_EQ(StateOf(ring, 1), v1::DESTROYED) << Describe(ring);
  const v1::KeyVersion* v = FindVersion(ring, 1);
  EXPECT_GE(v->destroy_time_ms(), before + 500);
  EXPECT_GE(v->destroy_time_ms(), v->destroy_after_ms());
  EXPECT_FALSE(v->object_missing());

  labels = TokenLabels(state());
  EXPECT_EQ(labels.count(LabelOf("op/destroy", 1)), 0u) << "the token still has v1";
  for (const v1::KeyVersion& other : ring.versions()) {
    if (other.version() == 1) continue;
    EXPECT_GT(labels.count(LabelOf("op/destroy", other.version())), 0u)
        << "v" << other.version() << " must survive";
  }
  // A destroyed version cannot come back.
  grpc::Status s = ApplyVersionOp(d(), VersionOp::kCancelDestruction, "op/destroy", 1);
  EXPECT_FALSE(s.ok());
  s = ApplyVersionOp(d(), VersionOp::kEnable, "op/destroy", 1);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(StateOf(GetRing(d(), "op/destroy"), 1), v1::DESTROYED);
  EXPECT_EQ(SignAndVerify(d(), "op/destroy"), "");
}

TEST_F(RotationOpsTest, CompromisingTheActiveVersionUnpublishesItAndSwitchesSigning) {
  v1::KeyRing ring = Create("op/compromise", v1::SIGN, &SlowPolicy());
  ASSERT_NE(OnlyInState(ring, v1::PENDING), nullptr) << Describe(ring);
  const std::string old_kid = FindVersion(ring, 1)->kid();
  const v1::KeyVersion pending = *OnlyInState(ring, v1::PENDING);
  const std::string reason = "private key leaked in ticket SEC-4242";

  v1::KeyRing out;
  grpc::Status s = Compromise(d(), "op/compromise", 1, reason, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // Gone from the JWKS immediately, not after any cache period.
  EXPECT_FALSE(Publishes(Jwks(d(), {"op/compromise"}), old_kid));
  const v1::KeyVersion* old = FindVersion(out, 1);
  EXPECT_TRUE(old->compromised());
  EXPECT_EQ(old->state(), v1::DESTROY_SCHEDULED);
  EXPECT_NE(out.active_version(), 1u);
  EXPECT_EQ(out.active_version(), pending.version()) << "the PENDING version is promoted";
  ASSERT_EQ(CountState(out, v1::ACTIVE), 1) << Describe(out);
  std::string kid;
  EXPECT_EQ(SignAndVerify(d(), "op/compromise", &kid), "");
  EXPECT_EQ(kid, pending.kid());
  EXPECT_NE(kid, old_kid);
  // The explicit policy keeps a PENDING next version.
  v1::KeyRing later = WaitForRing(d(), "op/compromise", 2000ms, [](const v1::KeyRing& r) {
    return CountState(r, v1::PENDING) == 1;
  });
  EXPECT_EQ(CountState(later, v1::PENDING), 1) << Describe(later);
  EXPECT_NE(d().log().find(reason), std::string::npos) << "the reason is recorded in the log";

  // A ring with no PENDING version gets a fresh ACTIVE key at once.
  v1::KeyRing bare = Create("op/compromise-bare", v1::SIGN, nullptr);
  const std::string bare_kid = bare.versions(0).kid();
  s = Compromise(d(), "op/compromise-bare", 1, "test", &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(Publishes(Jwks(d(), {"op/compromise-bare"}), bare_kid));
  ASSERT_EQ(CountState(out, v1::ACTIVE), 1) << Describe(out);
  EXPECT_EQ(SignAndVerify(d(), "op/compromise-bare", &kid), "");
  EXPECT_NE(kid, bare_kid);
  EXPECT_EQ(kid, OnlyInState(out, v1::ACTIVE)->kid());
}

TEST_F(RotationOpsTest, WatchJwksSendsTheInitialSetThenANewSetAfterARotation) {
  v1::KeyRing ring = Create("op/watch", v1::SIGN, &SlowPolicy());
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 20s);
  v1::WatchJwksRequest req;
  req.add_rings("op/watch");
  std::unique_ptr<grpc::ClientReader<v1::GetJwksResponse>> reader =
      d().signer().WatchJwks(&ctx, req);
  v1::GetJwksResponse first;
  ASSERT_TRUE(reader->Read(&first)) << reader->Finish().error_message();
  EXPECT_EQ(first.jwks(), Jwks(d(), {"op/watch"}));
  EXPECT_EQ(first.etag(), GetJwks(d(), {"op/watch"}).etag());
  EXPECT_FALSE(first.etag().empty());
  for (const v1::KeyVersion& v : ring.versions()) EXPECT_TRUE(Publishes(first.jwks(), v.kid()));

  v1::RotateKeyRingResponse rotated;
  ASSERT_TRUE(Rotate(d(), "op/watch", true, &rotated).ok());
  ASSERT_NE(OnlyInState(rotated.ring(), v1::PENDING), nullptr) << Describe(rotated.ring());
  const std::string new_kid = OnlyInState(rotated.ring(), v1::PENDING)->kid();

  // Reads in a thread, so that a silent stream fails after 5 s rather than at the deadline.
  std::atomic<bool> got{false};
  std::vector<v1::GetJwksResponse> updates;
  Clock::time_point start = Clock::now();
  std::thread read([&] {
    v1::GetJwksResponse msg;
    while (reader->Read(&msg)) {
      updates.push_back(msg);
      if (Publishes(msg.jwks(), new_kid)) {
        got = true;
        return;
      }
    }
  });
  while (!got.load() && Clock::now() - start < 5s) std::this_thread::sleep_for(10ms);
  int64_t waited = MsBetween(start, Clock::now());
  ctx.TryCancel();
  read.join();
  reader->Finish();
  ASSERT_TRUE(got.load()) << "no JWKS with the new version within 5 s (" << updates.size()
                          << " messages)";
  std::printf("[watch] new JWKS after %lld ms, %zu message(s)\n", static_cast<long long>(waited),
              updates.size());
  const v1::GetJwksResponse& last = updates.back();
  EXPECT_NE(last.etag(), first.etag());
  v1::GetJwksResponse now = GetJwks(d(), {"op/watch"});
  EXPECT_EQ(last.jwks(), now.jwks());
  EXPECT_EQ(last.etag(), now.etag());
  for (const v1::GetJwksResponse& u : updates) EXPECT_NE(u.jwks(), first.jwks());
}

TEST_F(RotationOpsTest, JwksEtagChangesExactlyWhenTheJwksChanges) {
  Create("op/etag-a", v1::SIGN, &SlowPolicy());
  Create("op/etag-b", v1::DECRYPT, &SlowPolicy());
  std::vector<v1::GetJwksResponse> samples;
  auto sample = [&] {
    samples.push_back(GetJwks(d(), {"op/etag-a"}));
    samples.push_back(GetJwks(d(), {"op/etag-b"}));
    samples.push_back(GetJwks(d(), {"op/etag-a", "op/etag-b"}));
    samples.push_back(GetJwks(d(), {}));
  };
  sample();
  sample();  // nothing changed
  v1::RotateKeyRingResponse rotated;
  ASSERT_TRUE(Rotate(d(), "op/etag-a", true, &rotated).ok());
  sample();
  ASSERT_TRUE(ApplyVersionOp(d(), VersionOp::kDisable, "op/etag-a", 1).ok());
  sample();
  ASSERT_TRUE(ApplyVersionOp(d(), VersionOp::kEnable, "op/etag-a", 1).ok());
  sample();  // back to the set before disabling
  ASSERT_TRUE(Rotate(d(), "op/etag-b", true, &rotated).ok());
  sample();
  std::set<std::string> distinct;
  for (size_t i = 0; i < samples.size(); ++i) {
    distinct.insert(samples[i].jwks());
    // The contract: a truncated base64url SHA-256 of the JWKS string. Either reading of
    // "truncated" is accepted: the encoding of a prefix of the hash (at least 96 bits), or a
    // prefix (at least 16 characters) of the encoding of the whole hash.
    const std::string& etag = samples[i].etag();
    std::string hash = Sha256Digest(samples[i].jwks());
    std::optional<std::string> decoded = B64UrlDecode(etag);
    bool hash_prefix =
        decoded && decoded->size() >= 12 && hash.compare(0, decoded->size(), *decoded) == 0;
    std::string full = B64UrlEncode(hash);
    bool encoding_prefix = etag.size() >= 16 && full.compare(0, etag.size(), etag) == 0;
    EXPECT_TRUE(hash_prefix || encoding_prefix)
        << "etag " << etag << " is not a truncation of " << full;
    for (size_t j = 0; j < i; ++j) {
      EXPECT_EQ(samples[i].jwks() == samples[j].jwks(), samples[i].etag() == samples[j].etag())
          << "samples " << j << " and " << i;
    }
  }
  EXPECT_GE(distinct.size(), 8u) << "the operations changed the sets";
  EXPECT_EQ(samples[0].jwks(), samples[4].jwks()) << "no change, same JWKS";
}

TEST_F(RotationOpsTest, MaxAgeIsHalfTheSmallestPrepublishInWholeSeconds) {
  // Assumption from the contract ("half the smallest prepublish among the rings"): the value is
  // floor(min(prepublish_ms) / 2 / 1000) over the rings of the request (every ring when none
  // is named), rounded down to whole seconds.
  Create("op/default", v1::SIGN, nullptr);  // default prepublish: 1 h
  const v1::RotationPolicy seven_s = Policy(7000, 0, 7000, 0);
  const v1::RotationPolicy three_s = Policy(3000, 0, 3000, 0);
  Create("op/seven", v1::SIGN, &seven_s);
  EXPECT_EQ(GetJwks(d(), {"op/default"}).max_age_seconds(), 1800);
  EXPECT_EQ(GetJwks(d(), {"op/seven"}).max_age_seconds(), 3);  // 3.5 s rounded down
  EXPECT_EQ(GetJwks(d(), {"op/default", "op/seven"}).max_age_seconds(), 3);
  Create("op/three", v1::DECRYPT, &three_s);
  EXPECT_EQ(GetJwks(d(), {"op/three"}).max_age_seconds(), 1);  // 1.5 s rounded down
  EXPECT_EQ(GetJwks(d(), {}).max_age_seconds(), 1);
  EXPECT_EQ(GetJwks(d(), {"op/default", "op/seven"}).max_age_seconds(), 3);
  // Follows a policy change.
  ASSERT_TRUE(UpdatePolicy(d(), "op/default", Policy(10000, 0, 10000, 0)).ok());
  EXPECT_EQ(GetJwks(d(), {"op/default"}).max_age_seconds(), 5);
}

// ---------------------------------------------------------------------------------------------
// 4. Catch-up after downtime.

// The activations after `since_ms` (Unix ms).
int CountActivationsSince(const v1::KeyRing& ring, int64_t since_ms) {
  int n = 0;
  for (const v1::KeyVersion& v : ring.versions()) n += v.activate_time_ms() >= since_ms ? 1 : 0;
  return n;
}

TEST(RotationCatchUpTest, RestartAfterMissedPeriodsRotatesOnceAndLogsTheCatchUp) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  const v1::RotationPolicy policy = Policy(500, 1000, 5000, 60000);
  auto d = std::make_unique<Custodyd>(state, WithLowPolicyFloors());
  ASSERT_TRUE(d->started()) << d->log();
  v1::KeyRing ring;
  grpc::Status s = CreateRing(*d, "op/catch-up", v1::SIGN, &policy, &ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_NE(OnlyInState(ring, v1::PENDING), nullptr) << Describe(ring);
  std::this_thread::sleep_for(300ms);
  ring = GetRing(*d, "op/catch-up");
  ASSERT_EQ(ring.active_version(), 1u) << "rotated before the period: " << Describe(ring);
  ASSERT_GT(ring.next_rotation_ms(), 0);
  int64_t stopping = UnixMs();
  d->Stop();
  int64_t stopped = UnixMs();
  d.reset();
  std::printf("[catch-up] SIGTERM to exit: %lld ms\n", static_cast<long long>(stopped - stopping));

  std::this_thread::sleep_for(3500ms);  // three and a half periods missed

  int64_t spawned = UnixMs();
  d = std::make_unique<Custodyd>(state, WithLowPolicyFloors());
  ASSERT_TRUE(d->started()) << d->log();
  int64_t serving = UnixMs();
  // Observe for 400 ms: past the catch-up, before any next period could come due.
  ring = WaitForRing(*d, "op/catch-up", 400ms,
                     [&](const v1::KeyRing&) { return UnixMs() - serving >= 400; });
  std::printf("[catch-up] restart took %lld ms; ring after it: %s\n",
              static_cast<long long>(serving - spawned), Describe(ring).c_str());

  // A process told to stop does not go on rotating keys while it winds down.
  for (const v1::KeyVersion& v : ring.versions()) {
    EXPECT_FALSE(v.activate_time_ms() >= stopping && v.activate_time_ms() < stopped)
        << "v" << v.version() << " was activated " << v.activate_time_ms() - stopping
        << " ms after SIGTERM, before the exit (" << stopped - stopping
        << " ms after SIGTERM): " << Describe(ring);
  }
  // What the ring was when the process exited: the ACTIVE and PENDING versions as of then.
  const v1::KeyVersion* active_at_exit = nullptr;
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.activate_time_ms() != 0 && v.activate_time_ms() < stopped &&
        (active_at_exit == nullptr || v.activate_time_ms() > active_at_exit->activate_time_ms())) {
      active_at_exit = &v;
    }
  }
  ASSERT_NE(active_at_exit, nullptr) << Describe(ring);
  // Exactly one rotation since the exit, not one per missed period: the version pre-published
  // before the downtime became ACTIVE, the one ACTIVE at exit is RETIRED, one new PENDING.
  EXPECT_EQ(CountActivationsSince(ring, stopped), 1)
      << "exactly one rotation at startup: " << Describe(ring);
  ASSERT_EQ(CountState(ring, v1::ACTIVE), 1) << Describe(ring);
  const v1::KeyVersion promoted = *OnlyInState(ring, v1::ACTIVE);
  EXPECT_GE(promoted.activate_time_ms(), stopped);
  EXPECT_LT(promoted.create_time_ms(), stopped) << "promoted a key made after the downtime";
  EXPECT_LE(promoted.publish_time_ms() + policy.prepublish_ms(), promoted.activate_time_ms());
  EXPECT_EQ(StateOf(ring, active_at_exit->version()), v1::RETIRED) << Describe(ring);
  int created_since = 0;
  for (const v1::KeyVersion& v : ring.versions()) created_since += v.create_time_ms() >= stopped;
  EXPECT_EQ(created_since, 1) << "one new PENDING version: " << Describe(ring);
  EXPECT_EQ(CountState(ring, v1::PENDING), 1) << Describe(ring);
  std::string kid;
  EXPECT_EQ(SignAndVerify(*d, "op/catch-up", &kid), "");
  EXPECT_EQ(kid, promoted.kid());

  std::string log = d->log();
  size_t at = log.find("rotation.catch_up");
  ASSERT_NE(at, std::string::npos) << log;
  EXPECT_EQ(log.find("rotation.catch_up", at + 1), std::string::npos) << "logged twice: " << log;
  size_t line_start = log.rfind('\n', at) == std::string::npos ? 0 : log.rfind('\n', at) + 1;
  std::string line = log.substr(line_start, log.find('\n', at) - line_start);
  std::printf("[catch-up] %s\n", line.c_str());
  EXPECT_NE(line.find("op/catch-up"), std::string::npos) << line;
  size_t missed_at = line.find("\"missed_periods\":");
  ASSERT_NE(missed_at, std::string::npos) << line;
  std::string digits;
  for (size_t i = missed_at + 17; i < line.size(); ++i) {
    if (line[i] == '"') continue;
    if (line[i] < '0' || line[i] > '9') break;
    digits += line[i];
  }
  ASSERT_FALSE(digits.empty()) << line;
  // The periods that came due while custodyd was down, from the test's clock: at least
  // floor(downtime / period) and at most one more, with one either way for counting conventions
  // (whether the period being caught up counts as missed). Never per-period bookkeeping of 0.
  int missed = std::stoi(digits);
  int64_t fewest = (spawned - stopped) / policy.rotation_period_ms() - 1;
  int64_t most = (serving - stopping) / policy.rotation_period_ms() + 2;
  EXPECT_GE(missed, std::max<int64_t>(fewest, 2)) << line;
  EXPECT_LE(missed, most) << line;

  // The schedule resumes: the next period rotates again.
  ring = WaitForRing(*d, "op/catch-up", 3000ms, [&](const v1::KeyRing& r) {
    return r.active_version() != promoted.version();
  });
  EXPECT_NE(ring.active_version(), promoted.version()) << Describe(ring);
  EXPECT_EQ(CountState(ring, v1::ACTIVE), 1) << Describe(ring);
  d->Stop();
}

// ---------------------------------------------------------------------------------------------
// 5. Crash test: SIGKILL at random moments during rotation operations.

struct CrashOp {
  enum Kind {
    kCreateSign,
    kCreateDecrypt,
    kForceRotate,
    kRotate,
    kSchedule,
    kCancel,
    kDisable,
    kEnable,
    kCompromise,
    kUpdatePolicy,
    kImport,
    kNumKinds
  };
  Kind kind;
  std::string ring;
  uint32_t version = 0;
  v1::RotationPolicy policy;
  std::string pem;
};

const char* CrashOpName(CrashOp::Kind kind) {
  static const char* const kNames[] = {"create-sign", "create-decrypt", "force-rotate", "rotate",
                                       "schedule",    "cancel",         "disable",      "enable",
                                       "compromise",  "update-policy",  "import"};
  return kNames[kind];
}

v1::RotationPolicy ShortPolicy(std::mt19937& rng) {
  // prepublish 50 ms, automatic rotation every 300 ms on some rings, retain 400 ms, destruction
  // 100-300 ms after scheduling: every state transition happens within an iteration.
  return Policy(50, rng() % 2 == 0 ? 0 : 300, 400, rng() % 2 == 0 ? 100 : 300);
}

std::vector<CrashOp> PlanCrashOps(std::mt19937& rng, const v1::ListKeyRingsResponse& snapshot,
                                  const std::vector<std::string>& pems) {
  std::vector<const v1::KeyRing*> rings;
  int sign_rings = 0, decrypt_rings = 0;
  for (const v1::KeyRing& r : snapshot.rings()) {
    if (r.name().rfind("crash/", 0) != 0) continue;
    rings.push_back(&r);
    (r.purpose() == v1::SIGN ? sign_rings : decrypt_rings)++;
  }
  std::vector<CrashOp> ops;
  for (int i = 0; i < 12; ++i) {
    CrashOp op;
    op.kind = static_cast<CrashOp::Kind>(rng() % CrashOp::kNumKinds);
    if (rings.empty() && op.kind != CrashOp::kCreateDecrypt) op.kind = CrashOp::kCreateSign;
    if (op.kind == CrashOp::kCreateSign || op.kind == CrashOp::kCreateDecrypt) {
      bool sign = op.kind == CrashOp::kCreateSign;
      int& count = sign ? sign_rings : decrypt_rings;
      if (count >= 3) continue;
      op.ring = std::string(sign ? "crash/sign-" : "crash/dec-") + std::to_string(count++);
      op.policy = ShortPolicy(rng);
      ops.push_back(op);
      continue;
    }
    if (rings.empty()) continue;
    const v1::KeyRing& ring = *rings[rng() % rings.size()];
    op.ring = ring.name();
    auto pick = [&](std::initializer_list<v1::KeyVersionState> states) -> uint32_t {
      std::vector<uint32_t> candidates;
      for (const v1::KeyVersion& v : ring.versions()) {
        if (std::find(states.begin(), states.end(), v.state()) != states.end()) {
          candidates.push_back(v.version());
        }
      }
      return candidates.empty() ? 0 : candidates[rng() % candidates.size()];
    };
    switch (op.kind) {
      case CrashOp::kSchedule:
        op.version = pick({v1::PENDING, v1::RETIRED, v1::DISABLED});
        break;
      case CrashOp::kCancel:
        op.version = pick({v1::DESTROY_SCHEDULED});
        break;
      case CrashOp::kDisable:
        op.version = pick({v1::PENDING, v1::RETIRED});
        break;
      case CrashOp::kEnable:
        op.version = pick({v1::DISABLED});
        break;
      case CrashOp::kCompromise:
        op.version = ring.active_version();
        break;
      case CrashOp::kUpdatePolicy:
        op.policy = ShortPolicy(rng);
        break;
      case CrashOp::kImport:
        op.pem = pems[rng() % pems.size()];
        break;
      default:
        break;
    }
    bool needs_version = op.kind == CrashOp::kSchedule || op.kind == CrashOp::kCancel ||
                         op.kind == CrashOp::kDisable || op.kind == CrashOp::kEnable ||
                         op.kind == CrashOp::kCompromise;
    if (needs_version && op.version == 0) continue;
    ops.push_back(op);
  }
  return ops;
}

grpc::Status RunCrashOp(Custodyd& d, const CrashOp& op) {
  constexpr Ms kTimeout = 3s;
  switch (op.kind) {
    case CrashOp::kCreateSign:
    case CrashOp::kCreateDecrypt:
      return CreateRing(d, op.ring, op.kind == CrashOp::kCreateSign ? v1::SIGN : v1::DECRYPT,
                        &op.policy);
    case CrashOp::kForceRotate:
    case CrashOp::kRotate: {
      v1::RotateKeyRingResponse resp;
      return Rotate(d, op.ring, op.kind == CrashOp::kForceRotate, &resp);
    }
    case CrashOp::kSchedule:
      return ApplyVersionOp(d, VersionOp::kScheduleDestruction, op.ring, op.version, nullptr,
                            kTimeout);
    case CrashOp::kCancel:
      return ApplyVersionOp(d, VersionOp::kCancelDestruction, op.ring, op.version, nullptr,
                            kTimeout);
    case CrashOp::kDisable:
      return ApplyVersionOp(d, VersionOp::kDisable, op.ring, op.version, nullptr, kTimeout);
    case CrashOp::kEnable:
      return ApplyVersionOp(d, VersionOp::kEnable, op.ring, op.version, nullptr, kTimeout);
    case CrashOp::kCompromise:
      return Compromise(d, op.ring, op.version, "crash test", nullptr, kTimeout);
    case CrashOp::kUpdatePolicy:
      return UpdatePolicy(d, op.ring, op.policy);
    case CrashOp::kImport: {
      v1::ImportKeyVersionRequest req;
      req.set_ring(op.ring);
      req.mutable_key()->set_pkcs8_pem(op.pem);
      v1::KeyRing out;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kTimeout);
      return d.admin().ImportKeyVersion(&ctx, req, &out);
    }
    case CrashOp::kNumKinds:
      break;
  }
  return grpc::Status::OK;
}

// What earlier iterations saw; later ones must agree with it.
struct CrashHistory {
  std::set<std::string> rings;
  std::map<std::pair<std::string, uint32_t>, std::string> kids;
  std::set<std::pair<std::string, uint32_t>> destroyed;
};

// Checks the invariants on a freshly restarted custodyd; returns the violations. *snapshot
// receives ListKeyRings.
std::vector<std::string> CheckCrashInvariants(Custodyd& d, CrashHistory& history,
                                              v1::ListKeyRingsResponse* snapshot) {
  std::vector<std::string> errors;
  grpc::Status s;
  v1::GetJwksResponse all = GetJwks(d, {}, &s);
  if (!s.ok()) errors.push_back("GetJwks: " + s.error_message());
  {
    v1::ListKeyRingsRequest req;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    s = d.admin().ListKeyRings(&ctx, req, snapshot);
    if (!s.ok()) {
      errors.push_back("ListKeyRings: " + s.error_message());
      return errors;
    }
  }
  // (c) No orphaned token objects.
  for (const v1::OrphanedObject& o : snapshot->orphaned_objects()) {
    errors.push_back("orphaned token object " + o.token_object_label() + " id " +
                     o.token_object_id());
  }
  std::map<std::string, const v1::KeyVersion*> by_kid;
  std::set<std::string> rings_now;
  std::vector<std::pair<std::string, uint32_t>> destroying;
  for (const v1::KeyRing& ring : snapshot->rings()) {
    rings_now.insert(ring.name());
    int active = 0;
    for (const v1::KeyVersion& v : ring.versions()) {
      by_kid[v.kid()] = &v;
      std::string where = ring.name() + " v" + std::to_string(v.version());
      // (d) No intermediate state survives startup. CREATING is never shown to callers;
      // DESTROYING is also what a destruction the scheduler is running right now looks like
      // (destroy_delay is 100 ms here), so it is only a violation when it does not finish.
      if (v.state() == v1::CREATING) errors.push_back(where + " is CREATING after startup");
      if (v.state() == v1::DESTROYING) destroying.emplace_back(ring.name(), v.version());
      active += v.state() == v1::ACTIVE ? 1 : 0;
      // Across iterations: a version keeps its kid, and DESTROYED is final.
      auto key = std::make_pair(ring.name(), v.version());
      auto known = history.kids.find(key);
      if (known != history.kids.end() && known->second != v.kid()) {
        errors.push_back(where + " changed kid from " + known->second + " to " + v.kid());
      }
      if (!v.kid().empty()) history.kids[key] = v.kid();
      if (history.destroyed.count(key) != 0 && v.state() != v1::DESTROYED) {
        errors.push_back(where + " was DESTROYED and is now " +
                         v1::KeyVersionState_Name(v.state()));
      }
      if (v.state() == v1::DESTROYED) history.destroyed.insert(key);
    }
    // Versions seen before are still listed.
    for (const auto& [key, kid] : history.kids) {
      if (key.first == ring.name() && FindVersion(ring, key.second) == nullptr) {
        errors.push_back(ring.name() + " v" + std::to_string(key.second) + " (" + kid +
                         ") disappeared from the metadata");
      }
    }
    if (ring.purpose() == v1::SIGN) {
      // (a) Exactly one ACTIVE version, and it signs verifiably.
      if (active != 1) {
        errors.push_back(ring.name() + " has " + std::to_string(active) +
                         " ACTIVE versions: " + Describe(ring));
      }
      std::string e = SignAndVerify(d, ring.name());
      if (!e.empty()) errors.push_back(e);
    } else {
      // (e) Decrypts a JWE to the first key of its JWKS.
      std::string jwks = GetJwks(d, {ring.name()}, &s).jwks();
      auto jwe = client::EncryptToJwks("crash check " + ring.name(), jwks, A128Gcm());
      if (!jwe.ok()) {
        errors.push_back(ring.name() + ": cannot encrypt to its JWKS: " + jwe.status().ToString() +
                         " " + Describe(ring));
      } else {
        v1::DecryptJweResponse resp;
        s = Decrypt(d, ring.name(), *jwe, &resp);
        if (!s.ok() || resp.plaintext() != "crash check " + ring.name()) {
          errors.push_back(ring.name() + ": JWE to its first JWKS key: " + s.error_message() + " " +
                           Describe(ring));
        }
      }
    }
  }
  for (const auto& [name, version] : destroying) {
    v1::KeyRing ring = WaitForRing(d, name, 3000ms, [&, version = version](const v1::KeyRing& r) {
      return StateOf(r, version) != v1::DESTROYING;
    });
    if (StateOf(ring, version) == v1::DESTROYING) {
      errors.push_back(name + " v" + std::to_string(version) +
                       " is still DESTROYING 3 s after startup: " + Describe(ring));
    }
  }
  for (const std::string& name : history.rings) {
    if (rings_now.count(name) == 0) errors.push_back("ring " + name + " disappeared");
  }
  history.rings.insert(rings_now.begin(), rings_now.end());
  // (b) Every published kid is a version whose token object exists.
  for (const std::string& kid : KidsOf(all.jwks())) {
    auto v = by_kid.find(kid);
    if (v == by_kid.end()) {
      errors.push_back("published kid " + kid + " belongs to no version");
    } else if (v->second->object_missing()) {
      errors.push_back("published kid " + kid + " has no token object");
    }
  }
  return errors;
}

// The metadata store a crash run uses: custodyd's extra flags, and a way to ask the store, once
// custodyd has stopped, whether a token object's label has a version row.
struct CrashStore {
  std::string name;  // "sqlite", "postgresql"
  std::vector<std::string> flags;
  std::function<std::string(const std::string& state, const std::string& label)> version_state;
  // Two rings created before the first kill. With a shared store a ring whose first creation was
  // killed stays hidden for the 10-minute in-flight window (its name answers ALREADY_EXISTS), so
  // without them a slow build (ASan) may never get a ring created and test only startups.
  bool seed_rings = false;
};

void RunRotationCrashTest(const CrashStore& store, int default_iterations) {
  uint32_t seed = std::random_device()();
  if (const char* env = std::getenv("CUSTODY_CRASH_SEED")) seed = std::stoul(env);
  int iterations = default_iterations;
  if (const char* env = std::getenv("CUSTODY_CRASH_ITERATIONS")) iterations = std::stoi(env);
  std::printf("[crash] %s store: seed %u (rerun with CUSTODY_CRASH_SEED=%u), %d iterations\n",
              store.name.c_str(), seed, seed, iterations);
  std::fflush(stdout);
  std::mt19937 rng(seed);
  std::vector<std::string> pems;
  for (int i = 0; i < 8; ++i) pems.push_back(NewP256Pkcs8Pem());

  TempDir dir;
  const std::string state = dir.path() + "/state";
  CrashHistory history;
  std::map<std::string, int> op_counts;
  std::map<int, int> status_counts;
  std::vector<std::string> unexpected;
  int64_t kill_delay_total = 0;
  int kills = 0;
  // By default the test stops at the first iteration that breaks an invariant (later ones
  // would mostly repeat it); CUSTODY_CRASH_CONTINUE=1 goes on, reporting each distinct problem.
  const bool keep_going = std::getenv("CUSTODY_CRASH_CONTINUE") != nullptr;
  std::set<std::string> reported;
  Clock::time_point start = Clock::now();
  if (store.seed_rings) {
    Custodyd seed(state, WithLowPolicyFloors(store.flags));
    ASSERT_TRUE(seed.started()) << LogTail(seed);
    for (const auto& [name, purpose] :
         {std::pair{"crash/seed-sign", v1::SIGN}, {"crash/seed-dec", v1::DECRYPT}}) {
      v1::RotationPolicy policy = ShortPolicy(rng);
      grpc::Status s = CreateRing(seed, name, purpose, &policy);
      ASSERT_TRUE(s.ok()) << name << ": " << s.error_message();
    }
    seed.Stop();
  }
  v1::ListKeyRingsResponse snapshot;
  for (int it = 0; it <= iterations; ++it) {
    auto d = std::make_unique<Custodyd>(state, WithLowPolicyFloors(store.flags));
    ASSERT_TRUE(d->started()) << "custodyd did not start after kill " << it << " (seed " << seed
                              << "); its log ends:\n"
                              << LogTail(*d);
    if (it > 0) {
      std::vector<std::string> errors = CheckCrashInvariants(*d, history, &snapshot);
      for (const std::string& e : errors) {
        if (reported.insert(e).second) {
          ADD_FAILURE() << "after kill " << it << " (seed " << seed << "): " << e;
        }
      }
      if (!errors.empty() && !keep_going) break;
    }
    if (it == iterations) {
      // The last start: besides the invariants, the token and the metadata agree object by
      // object, as pkcs11-tool sees the token.
      // Listed after custodyd stopped: SoftHSM2's file store read by a second process while
      // custodyd writes it can miss objects.
      d->Stop();
      std::multiset<std::string> labels = TokenLabels(state);
      std::vector<std::string> unknown;
      for (const v1::KeyRing& ring : snapshot.rings()) {
        for (const v1::KeyVersion& v : ring.versions()) {
          std::string label = LabelOf(ring.name(), v.version());
          if (v.state() == v1::DESTROYED) {
            EXPECT_EQ(labels.count(label), 0u) << label << " is DESTROYED but in the token";
          } else if (v.state() == v1::DESTROYING || v.state() == v1::DESTROY_SCHEDULED) {
            // The scheduler may have carried out a due destruction between the snapshot and
            // the stop: either is consistent.
          } else {
            EXPECT_GT(labels.count(label), 0u) << label << " is " << Describe(ring);
          }
        }
      }
      for (const std::string& label : labels) {
        if (label.rfind("custody/", 0) != 0) continue;  // not one of custody's key objects
        bool known = false;
        for (const v1::KeyRing& ring : snapshot.rings()) {
          for (const v1::KeyVersion& v : ring.versions()) {
            known |= label == LabelOf(ring.name(), v.version());
          }
        }
        if (!known) unknown.push_back(label);
      }
      // An object the snapshot does not list may be a version the scheduler was creating when
      // the snapshot was taken: its durable CREATING intent (or later state) must be in the
      // metadata, read now that custodyd has stopped.
      for (const std::string& label : unknown) {
        EXPECT_FALSE(store.version_state(state, label).empty())
            << "token object " << label << " has no version";
      }
      break;
    }
    if (it == 0) {
      v1::ListKeyRingsRequest req;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kCallTimeout);
      ASSERT_TRUE(d->admin().ListKeyRings(&ctx, req, &snapshot).ok());
    }
    std::vector<CrashOp> ops = PlanCrashOps(rng, snapshot, pems);
    int delay_ms = static_cast<int>(rng() % 81);
    kill_delay_total += delay_ms;
    ++kills;
    std::vector<std::pair<CrashOp::Kind, grpc::Status>> results;
    std::thread worker([&] {
      for (const CrashOp& op : ops) results.emplace_back(op.kind, RunCrashOp(*d, op));
    });
    std::this_thread::sleep_for(Ms(delay_ms));
    d->Kill();
    worker.join();
    for (const auto& [kind, status] : results) {
      ++op_counts[CrashOpName(kind)];
      ++status_counts[status.error_code()];
      if (status.error_code() == grpc::StatusCode::INTERNAL ||
          status.error_code() == grpc::StatusCode::DATA_LOSS ||
          status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
        if (unexpected.size() < 10) {
          unexpected.push_back(std::string(CrashOpName(kind)) + " (iteration " +
                               std::to_string(it) + "): " + std::to_string(status.error_code()) +
                               " " + status.error_message());
        }
      }
    }
  }
  double seconds = MsBetween(start, Clock::now()) / 1000.0;
  size_t versions = 0;
  std::map<std::string, int> states;
  for (const v1::KeyRing& ring : snapshot.rings()) {
    versions += ring.versions_size();
    for (const v1::KeyVersion& v : ring.versions()) ++states[v1::KeyVersionState_Name(v.state())];
  }
  std::string op_summary, status_summary, state_summary;
  for (const auto& [name, n] : op_counts) op_summary += " " + name + "=" + std::to_string(n);
  for (const auto& [code, n] : status_counts) {
    status_summary += " " + std::to_string(code) + ":" + std::to_string(n);
  }
  for (const auto& [name, n] : states) state_summary += " " + name + "=" + std::to_string(n);
  std::printf(
      "[crash] seed %u: %d kills in %.1f s (mean kill delay %.1f ms); %zu rings, %zu "
      "versions;%s\n[crash] operations sent:%s\n[crash] status codes (0=OK, 14=UNAVAILABLE):%s\n",
      seed, kills, seconds, kills ? kill_delay_total / double(kills) : 0.0,
      static_cast<size_t>(snapshot.rings_size()), versions, state_summary.c_str(),
      op_summary.c_str(), status_summary.c_str());
  for (const std::string& u : unexpected) ADD_FAILURE() << "unexpected status: " << u;
}

TEST(RotationCrashTest, SigkillAtRandomMomentsLeavesEveryRingConsistent) {
  CrashStore sqlite{
      "sqlite", {}, [](const std::string& state, const std::string& label) {
        return RunCommand({"sqlite3", state + "/metadata.db",
                           "SELECT state FROM versions WHERE object_label='" + label + "'"})
            .out;
      }};
  // Under ASan, 40 kills (100 took 87 s there): the sanitizers look for memory errors on the
  // restart and reconciliation paths, which 40 walk as well; the normal pass covers the kill
  // points.
  RunRotationCrashTest(sqlite, kSanitized ? 40 : 100);
}

// The same on the PostgreSQL store (one replica; a throw-away cluster for this test alone).
// Fewer kills: each start also connects and takes the scheduler's advisory lock, and the
// SQLite run above covers the kill points in the token; this one covers the store's.
TEST(RotationCrashTest, SigkillAtRandomMomentsOnPostgresLeavesEveryRingConsistent) {
  auto cluster = rotation::testing::PostgresCluster::Start();
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ASSERT_TRUE((*cluster)->CreateDatabase("crash").ok());
  rotation::testing::PostgresCluster* pg = cluster->get();
  CrashStore postgres{
      "postgresql",
      {"--metadata=" + pg->Uri("crash"), "--metadata_password_file=" + pg->password_file()},
      [pg](const std::string&, const std::string& label) {
        auto rows =
            pg->Psql("crash", "SELECT state FROM versions WHERE object_label='" + label + "'");
        return rows.ok() ? *rows : std::string();
      },
      /*seed_rings=*/true};
  RunRotationCrashTest(postgres, kSanitized ? 12 : 40);
}

}  // namespace
}  // namespace custody::testing
