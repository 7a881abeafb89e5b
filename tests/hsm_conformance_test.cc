// The conformance matrix: the same scenario on every PKCS#11 implementation the machine has
// (tests/testing/hsm_modules.h: SoftHSM2, NSS softokn direct with its init string, tpm2-pkcs11 on
// swtpm + tpm2-abrmd, opencryptoki's software token, p11-kit's RPC client), custodyd pointed at
// each the way docs/hsm-compatibility.md says. Per module and algorithm: the ring is created, or
// refused FAILED_PRECONDITION with the precise reason (and nothing is left behind); a created
// ring's signature verifies with python3-jwcrypto, a JWE made by python3-jwcrypto decrypts; after a
// restart the same; a forced rotation makes a new key that works; 16 concurrent callers all
// succeed; every private key read back with the module itself is sensitive and never
// extractable. The module's known limits are asserted (tpm2-pkcs11 stops generating after a
// number of keys in one process), and the matrix as measured is printed at the end (it is the
// table of docs/hsm-compatibility.md).
//
// opencryptoki's token is one per machine: ctest runs this binary under RESOURCE_LOCK.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/secret.h"
#include "gtest/gtest.h"
#include "pkcs11/token.h"
#include "tests/testing/harness.h"
#include "tests/testing/hsm_modules.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kStderrCaptured = false;  // custodyd leaves stderr as it is under sanitizers
#else
constexpr bool kStderrCaptured = true;
#endif
using namespace std::chrono_literals;

// One cell's algorithm and what the module is expected to answer.
struct Cell {
  v1::Purpose purpose;
  std::string alg;
  uint32_t rsa_bits = 0;  // 0: the profile's default
  // Empty: the ring works. Otherwise CreateKeyRing is FAILED_PRECONDITION and its message holds
  // every one of these.
  std::vector<std::string> refusal;
};

std::string CellName(const Cell& c) {
  return c.rsa_bits == 0 ? c.alg : absl::StrCat(c.alg, "-", c.rsa_bits);
}

std::string RingName(const Cell& c) {
  return "hsm/" + absl::StrReplaceAll(absl::AsciiStrToLower(CellName(c)), {{"+", "-"}});
}

const std::vector<std::string> kNoEdwards = {"CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"};
const std::vector<std::string> kNoEcdh = {"CKM_ECDH1_DERIVE"};
const std::vector<std::string> kNoEc = {"CKM_EC_KEY_PAIR_GEN"};

// The matrix as measured (docs/hsm-compatibility.md). Every refusal is the module's limit,
// named as custody reports it.
std::vector<Cell> Cells(HsmKind kind) {
  const bool tpm2 = kind == HsmKind::kTpm2;
  const bool ock = kind == HsmKind::kOpencryptoki;
  const bool no_edwards = kind != HsmKind::kSoftHsm2;
  const bool no_ecdh = tpm2 || ock || kind == HsmKind::kP11KitClient;
  std::vector<Cell> cells = {
      {v1::SIGN, "ES256", 0, ock ? kNoEc : std::vector<std::string>{}},
      {v1::SIGN, "ES384", 0, ock ? kNoEc : std::vector<std::string>{}},
      {v1::SIGN, "ES512", 0,
       ock    ? kNoEc
       : tpm2 ? std::vector<std::string>{"cannot use it", "C_SignInit: CKR_HOST_MEMORY"}
              : std::vector<std::string>{}},
      {v1::SIGN, "PS256", 0, {}},
      {v1::SIGN, "PS256", 4096,
       tpm2 ? std::vector<std::string>{"CKM_RSA_PKCS_KEY_PAIR_GEN for 4096-bit keys",
                                       "generates 1024 to 3072"}
            : std::vector<std::string>{}},
      {v1::SIGN, "EdDSA", 0, no_edwards ? kNoEdwards : std::vector<std::string>{}},
      {v1::DECRYPT, "RSA-OAEP", 0, {}},
      {v1::DECRYPT, "RSA-OAEP-256", 0, {}},
      {v1::DECRYPT, "ECDH-ES+A256KW", 0,
       no_ecdh
           ? (ock ? std::vector<std::string>{"CKM_EC_KEY_PAIR_GEN", "CKM_ECDH1_DERIVE"} : kNoEcdh)
           : std::vector<std::string>{}},
  };
  return cells;
}

// Rows of the printed matrix: module, cell, result.
std::vector<std::vector<std::string>>& MatrixRows() {
  static auto* rows = new std::vector<std::vector<std::string>>();
  return *rows;
}

// The deadline of this file's RPCs (rpc_helpers.h's are a hang guard only).
constexpr std::chrono::milliseconds kCallTimeout = 60s;

std::string ActiveKid(const v1::KeyRing& ring) {
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.version() == ring.active_version()) return v.kid();
  }
  return "";
}

// A JWE to `kid` of the ring's JWKS, made by python3-jwcrypto (A256GCM).
std::string EncryptWithJwcrypto(const std::string& jwks, const std::string& kid,
                                const std::string& alg, const std::string& plaintext) {
  TempDir dir;
  WriteFileOrDie(dir.path() + "/jwks.json", jwks);
  WriteFileOrDie(dir.path() + "/plaintext", plaintext);
  CommandResult r =
      RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/jwcrypto_encrypt.py",
                  dir.path() + "/jwks.json", kid, alg, dir.path() + "/plaintext", "A256GCM"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return std::string(absl::StripTrailingAsciiWhitespace(r.out));
}

// The ring does its job for `kid` (its ACTIVE version): a signature python3-jwcrypto verifies,
// or a JWE python3-jwcrypto made that decrypts. "" or what failed.
std::string Exercise(Custodyd& d, const Cell& c, const std::string& kid) {
  const std::string name = RingName(c);
  const std::string jwks = Jwks(d, {name});
  if (c.purpose == v1::SIGN) {
    v1::SignJwsRequest req;
    req.set_ring(name);
    req.set_payload(absl::StrCat("{\"sub\":\"conformance\",\"alg\":\"", c.alg, "\"}"));
    v1::SignJwsResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = d.signer().SignJws(&ctx, req, &resp);
    if (!s.ok()) return "SignJws: " + s.error_message();
    if (resp.kid() != kid) return absl::StrCat("signed with kid ", resp.kid(), ", not ", kid);
    std::string payload;
    std::string why = VerifyWithJwcrypto(jwks, resp.jws(), c.alg, &payload);
    if (!why.empty()) return "jwcrypto: " + why;
    return payload == req.payload() ? "" : "jwcrypto read another payload";
  }
  const std::string plaintext = "a CEK for " + c.alg + " unwrapped in the token";
  const std::string jwe = EncryptWithJwcrypto(jwks, kid, c.alg, plaintext);
  if (jwe.empty()) return "jwcrypto made no JWE";
  v1::DecryptJweResponse resp;
  auto decrypt = [&](const std::string& compact) {
    v1::DecryptJweRequest req;
    req.set_ring(name);
    req.set_jwe(compact);
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    return d.signer().DecryptJwe(&ctx, req, &resp);
  };
  grpc::Status s = decrypt(jwe);
  if (!s.ok()) return "DecryptJwe: " + s.error_message();
  if (resp.kid() != kid) return absl::StrCat("decrypted with kid ", resp.kid(), ", not ", kid);
  if (resp.plaintext() != plaintext) return "another plaintext";
  if (!absl::StartsWith(c.alg, "RSA-OAEP")) return "";
  // A JWE whose encrypted key was altered: the token's C_Decrypt fails, custodyd answers the one
  // uniform refusal, and the ring decrypts again right after, on whichever session that was
  // (tpm2-pkcs11 1.9 leaves the failed C_Decrypt's operation active in the session).
  std::vector<std::string> parts = absl::StrSplit(jwe, '.');
  if (parts.size() != 5 || parts[1].size() < 8) return "jwcrypto made a malformed JWE";
  char& altered = parts[1][parts[1].size() / 2];
  altered = altered == 'A' ? 'B' : 'A';
  const std::string bad = absl::StrJoin(parts, ".");
  for (int i = 0; i < 3; ++i) {
    s = decrypt(bad);
    if (s.error_code() != grpc::StatusCode::INVALID_ARGUMENT ||
        s.error_message() != "decryption failed") {
      return absl::StrCat("altered encrypted key: code ", s.error_code(), ": ", s.error_message());
    }
    s = decrypt(jwe);
    if (!s.ok()) return "DecryptJwe after a refused JWE: " + s.error_message();
    if (resp.plaintext() != plaintext) return "another plaintext after a refused JWE";
  }
  return "";
}

// 16 callers at once, 2 calls each, on the ring: "" when all 32 succeed (and every ES256/PS256
// signature verifies with the test's own OpenSSL verifier; the others are checked once by
// Exercise with jwcrypto), else the first failure.
std::string Concurrently(Custodyd& d, const Cell& c, const std::string& kid) {
  constexpr int kCallers = 16;
  constexpr int kCalls = 2;
  const std::string name = RingName(c);
  const std::string jwks = Jwks(d, {name});
  std::string jwe;
  const std::string plaintext = "sixteen callers";
  if (c.purpose == v1::DECRYPT) jwe = EncryptWithJwcrypto(jwks, kid, c.alg, plaintext);
  std::string error;
  JwsKeys keys = JwsKeysOf(jwks, &error);
  std::vector<std::string> failures(kCallers);
  std::vector<std::vector<std::string>> signatures(kCallers);
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      for (int n = 0; n < kCalls && failures[i].empty(); ++n) {
        grpc::ClientContext ctx;
        SetDeadline(&ctx, kCallTimeout);
        grpc::Status s;
        if (c.purpose == v1::SIGN) {
          v1::SignJwsRequest req;
          req.set_ring(name);
          req.set_payload(absl::StrCat("{\"caller\":", i, ",\"n\":", n, "}"));
          v1::SignJwsResponse resp;
          s = d.signer().SignJws(&ctx, req, &resp);
          if (s.ok()) signatures[i].push_back(resp.jws());
        } else {
          v1::DecryptJweRequest req;
          req.set_ring(name);
          req.set_jwe(jwe);
          v1::DecryptJweResponse resp;
          s = d.signer().DecryptJwe(&ctx, req, &resp);
          if (s.ok() && resp.plaintext() != plaintext) failures[i] = "another plaintext";
        }
        if (!s.ok()) failures[i] = absl::StrCat("caller ", i, ": ", s.error_message());
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int i = 0; i < kCallers; ++i) {
    if (!failures[i].empty()) return failures[i];
    if (c.alg != "ES256" && c.alg != "PS256") continue;
    for (const std::string& jws : signatures[i]) {
      if (std::string why = VerifyJws(keys, jws); !why.empty()) return "verify: " + why;
    }
  }
  return "";
}

// custodyd's flags for the module, with a session per concurrent caller: the matrix asks whether
// the token serves 16 callers at once, not how the pool sheds load (the default pool of 8 makes
// callers wait, up to 2 s, and a loaded machine signing RSA-4096 in software exceeds that).
std::vector<std::string> Flags(const HsmModule& hsm) {
  std::vector<std::string> flags = hsm.CustodydFlags();
  flags.push_back("--max_sessions=16");
  return flags;
}

std::string Outcome(const grpc::Status& s) {
  if (s.ok()) return "ok";
  return absl::StrCat("refused code ", s.error_code(), ": ", s.error_message());
}

class HsmConformanceTest : public ::testing::TestWithParam<HsmKind> {
 protected:
  static void TearDownTestSuite() {
    std::cout << "\n| module | algorithm | result |\n|---|---|---|\n";
    for (const auto& row : MatrixRows()) {
      std::cout << "| " << row[0] << " | " << row[1] << " | " << row[2] << " |\n";
    }
    std::cout << std::endl;
  }
};

// custodyd started with `flags` must fail at once; what it said (stderr), or "" when it started.
std::string FailedStart(const std::string& state_dir, const std::vector<std::string>& flags,
                        const std::vector<std::string>& env) {
  std::vector<std::string> argv = {BinDir() + "/custodyd", "--state_dir=" + state_dir,
                                   "--listen=unix:" + state_dir + "/custodyd.sock"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  CommandResult r = RunCommand(argv, "", env);
  return r.exit_code == 0 ? "" : r.err;
}

// The ordinary mistakes of an operator setting the module up, each answered with what to do.
void ExpectStartupHints(const HsmModule& hsm, const std::string& dir) {
  std::vector<std::string> flags = hsm.CustodydFlags();
  // A label typo: the labels seen.
  std::vector<std::string> typo = flags;
  typo.push_back("--token_label=custodi");
  std::string said = FailedStart(dir + "/typo", typo, hsm.env());
  EXPECT_NE(said.find("match token='custodi'"), std::string::npos) << said;
  EXPECT_NE(said.find("tokens seen: "), std::string::npos) << said;
  EXPECT_NE(said.find("'" + hsm.token_label() + "' (slot "), std::string::npos) << said;
  if (hsm.kind() == HsmKind::kSoftHsm2) {
    // SoftHSM2 always offers a free slot: an uninitialized token, named with how to set it up.
    EXPECT_NE(said.find("not initialized yet: slot "), std::string::npos) << said;
    EXPECT_NE(said.find("initialize the token with its module's tool"), std::string::npos) << said;
  }
  if (!hsm.init_args().empty()) {
    // The init string forgotten: the module refuses C_Initialize, and the error says how.
    std::vector<std::string> bare;
    for (const std::string& f : flags) {
      if (f.rfind("--pkcs11_init_args", 0) != 0) bare.push_back(f);
    }
    said = FailedStart(dir + "/no-init-args", bare, hsm.env());
    EXPECT_NE(said.find("C_Initialize: CKR_ARGUMENTS_BAD"), std::string::npos) << said;
    EXPECT_NE(said.find("--pkcs11_init_args"), std::string::npos) << said;
  }
}

TEST_P(HsmConformanceTest, EveryAlgorithmWorksOrIsRefusedWithTheModulesReason) {
  const HsmKind kind = GetParam();
  const std::string module_name = HsmName(kind);
  const auto started = std::chrono::steady_clock::now();
  TempDir dir;
  if (kind == HsmKind::kOpencryptoki &&
      RunCommand({"/usr/bin/pgrep", "-x", "pkcsslotd"}).exit_code == 1) {
    // Before its daemon runs: opencryptoki answers CKR_HOST_MEMORY (CKR_FUNCTION_FAILED while
    // its API lock file, made by the first pkcsslotd since boot, is missing), and custodyd says
    // what to start.
    const std::string pin = dir.path() + "/early-pin";
    WriteFileOrDie(pin, "custody1");
    chmod(pin.c_str(), 0600);
    const std::string said =
        FailedStart(dir.path() + "/no-daemon",
                    {"--pkcs11_module=/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so",
                     "--token_label=custody", "--pin_file=" + pin},
                    {});
    EXPECT_TRUE(absl::StrContains(said, "C_Initialize: CKR_HOST_MEMORY") ||
                absl::StrContains(said, "C_Initialize: CKR_FUNCTION_FAILED"))
        << said;
    EXPECT_NE(said.find("pkcsslotd"), std::string::npos) << said;
  }
  std::unique_ptr<HsmModule> hsm = HsmModule::Start(kind, dir.path());
  if (hsm->unavailable()) GTEST_SKIP() << module_name << ": " << hsm->error();
  ASSERT_TRUE(hsm->error().empty()) << hsm->error() << "\n" << hsm->Logs();
  const auto set_up = std::chrono::steady_clock::now() - started;
  ExpectStartupHints(*hsm, dir.path());
  const std::string state = dir.path() + "/state";
  auto custodyd = std::make_unique<Custodyd>(state, Flags(*hsm), Custodyd::Environment{hsm->env()});
  ASSERT_TRUE(custodyd->started()) << custodyd->log() << "\n" << hsm->Logs();

  // 1. Creation: each cell works or is refused with the module's reason, leaving nothing.
  std::vector<Cell> working;
  std::map<std::string, std::string> kids;  // ring -> ACTIVE kid
  for (const Cell& c : Cells(kind)) {
    SCOPED_TRACE(module_name + " " + CellName(c));
    v1::CreateKeyRingRequest req;
    req.set_name(RingName(c));
    req.set_purpose(c.purpose);
    req.set_alg(c.alg);
    req.set_rsa_bits(c.rsa_bits);
    v1::KeyRing ring;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, 120s);
    grpc::Status s = custodyd->admin().CreateKeyRing(&ctx, req, &ring);
    std::string result = Outcome(s);
    if (c.refusal.empty()) {
      EXPECT_TRUE(s.ok()) << s.error_message() << "\n" << custodyd->log();
      if (s.ok()) {
        std::string why = Exercise(*custodyd, c, ActiveKid(ring));
        EXPECT_EQ(why, "");
        if (why.empty()) {
          working.push_back(c);
          kids[RingName(c)] = ActiveKid(ring);
        } else {
          result = "created, but: " + why;
        }
        if (c.purpose == v1::DECRYPT && c.alg.rfind("RSA", 0) == 0) {
          absl::StrAppend(&result, " (", ring.decryption_mechanism(), ")");
        }
      }
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
      for (const std::string& part : c.refusal) {
        EXPECT_NE(s.error_message().find(part), std::string::npos)
            << "expected '" << part << "' in: " << s.error_message();
      }
      // Refused before anything was published: no ring, no key in JWKS.
      v1::KeyRing none;
      EXPECT_EQ(GetRing(*custodyd, RingName(c), &none).error_code(), grpc::StatusCode::NOT_FOUND);
    }
    MatrixRows().push_back({module_name, CellName(c), result});
  }
  // The module's own diagnostics, if it wrote any, are JSON lines naming it (tpm2-pkcs11 writes
  // "ERROR: ..." lines when it fails the P-521 signature). Sanitizer builds leave stderr as it is
  // (common/stderr_capture.h: a crash report must never be lost in the pipe).
  if (kStderrCaptured) {
    for (absl::string_view line : absl::StrSplit(custodyd->log(), '\n')) {
      if (line.empty()) continue;
      EXPECT_EQ(line.front(), '{') << "not a JSON log line: " << line;
    }
  }
  if (kind == HsmKind::kTpm2) {
    // It refuses session keys (CKA_TOKEN=FALSE): the OAEP probe ran with token objects, and the
    // RSA-OAEP-256 ring decrypts with OAEP in the token (its row above says so).
    EXPECT_NE(custodyd->log().find("pkcs11.oaep_probe_with_token_objects"), std::string::npos);
    EXPECT_NE(custodyd->log().find("\"event\":\"token.rsa_oaep_sha256\",\"path\":\"native"),
              std::string::npos);
    if (kStderrCaptured) {
      EXPECT_NE(custodyd->log().find(absl::StrCat("\"event\":\"module.stderr\",\"module\":\"",
                                                  hsm->module_path(), "\",\"line\":\"ERROR:")),
                std::string::npos)
          << custodyd->log();
    }
  }

  // 2. Restart: every working ring serves again with the same key.
  custodyd->Stop();
  custodyd = std::make_unique<Custodyd>(state, Flags(*hsm), Custodyd::Environment{hsm->env()});
  ASSERT_TRUE(custodyd->started()) << custodyd->log();
  for (const Cell& c : working) {
    SCOPED_TRACE(module_name + " after restart: " + CellName(c));
    EXPECT_EQ(Exercise(*custodyd, c, kids[RingName(c)]), "");
  }

  // 3. Rotation: a new key, made in the token now, signs or decrypts; the old one stays
  //    published.
  for (const Cell& c : working) {
    SCOPED_TRACE(module_name + " rotation: " + CellName(c));
    v1::RotateKeyRingRequest req;
    req.set_ring(RingName(c));
    req.set_force(true);
    v1::RotateKeyRingResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, 120s);
    grpc::Status s = custodyd->admin().RotateKeyRing(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << custodyd->log();
    ASSERT_TRUE(resp.rotated()) << resp.message();
    const std::string kid = ActiveKid(resp.ring());
    EXPECT_NE(kid, kids[RingName(c)]);
    EXPECT_NE(Jwks(*custodyd, {RingName(c)}).find(kids[RingName(c)]), std::string::npos);
    kids[RingName(c)] = kid;
    EXPECT_EQ(Exercise(*custodyd, c, kid), "");
  }

  // 4. 16 concurrent callers on every working ring.
  size_t versions = 0;  // in the token, by the rings' own account
  for (const Cell& c : working) {
    SCOPED_TRACE(module_name + " 16 callers: " + CellName(c));
    EXPECT_EQ(Concurrently(*custodyd, c, kids[RingName(c)]), "");
    v1::KeyRing ring;
    ASSERT_TRUE(GetRing(*custodyd, RingName(c), &ring).ok());
    versions += static_cast<size_t>(ring.versions_size());
  }
  custodyd->Stop();
  custodyd.reset();

  // 5. The keys, read back with the module itself: one per version of the working rings (none
  //    left by a refused one), each private key sensitive and never extractable.
  // Public keys: no usage custody did not ask for that could let the token wrap with them
  // (opencryptoki defaults CKA_WRAP to TRUE unless told otherwise).
  std::map<std::string, std::string> usages;
  ASSERT_EQ(PublicKeyUsages(*hsm, &usages), "");
  EXPECT_EQ(usages.size(), versions);
  std::set<std::string> usage_sets;
  for (const auto& [label, flags] : usages) {
    EXPECT_EQ(flags.find("wrap"), std::string::npos) << label << ": " << flags;
    usage_sets.insert(flags.empty() ? "none" : flags);
  }
  MatrixRows().push_back(
      {module_name, "public key usages (as the module set them)", absl::StrJoin(usage_sets, "; ")});

  pkcs11::Token::Options options;
  options.module_path = hsm->module_path();
  options.init_args = hsm->init_args();
  options.selector.label = hsm->token_label();
  options.pin = Secret(hsm->pin());
  options.max_sessions = 2;
  auto token = pkcs11::Token::Open(std::move(options));
  ASSERT_TRUE(token.ok()) << token.status();
  auto pairs = (*token)->FindAllKeyPairs();
  ASSERT_TRUE(pairs.ok()) << pairs.status();
  size_t custody_pairs = 0;
  bool ecdsa_tag_key = false;  // where the token has no HMAC, the metadata tag key is an EC pair
  for (const auto& [id, pair] : *pairs) {
    if (pair->label.rfind("custody", 0) != 0) continue;
    if (pair->label == "custody-metadata-tag") {
      ecdsa_tag_key = true;
    } else {
      ++custody_pairs;
    }
    auto attributes = (*token)->GetPrivateKeyAttributes(*pair);
    ASSERT_TRUE(attributes.ok()) << attributes.status();
    EXPECT_TRUE(attributes->token) << pair->label;
    EXPECT_TRUE(attributes->is_private) << pair->label;
    EXPECT_TRUE(attributes->sensitive) << pair->label;
    EXPECT_FALSE(attributes->extractable) << pair->label;
    EXPECT_TRUE(attributes->always_sensitive) << pair->label;
    EXPECT_TRUE(attributes->never_extractable) << pair->label;
  }
  EXPECT_EQ(custody_pairs, versions);
  // The key that vouches for the metadata (server/keys/metadata_tag_key.h), made by custodyd's
  // first start: an HMAC key, else an EC pair (checked above with the version keys).
  auto hmac_keys = (*token)->FindSecretKeyIds("custody-metadata-tag");
  ASSERT_TRUE(hmac_keys.ok()) << hmac_keys.status();
  EXPECT_EQ(hmac_keys->size() + (ecdsa_tag_key ? 1 : 0), 1u);
  MatrixRows().push_back(
      {module_name, "metadata tag key",
       ecdsa_tag_key ? "ECDSA P-256 key pair (no CKM_GENERIC_SECRET_KEY_GEN with CKM_SHA256_HMAC)"
                     : "HMAC-SHA256 secret key"});
  MatrixRows().push_back({module_name, "keys read back",
                          absl::StrCat(custody_pairs,
                                       " private keys, all sensitive and never "
                                       "extractable")});

  // 6. Known limits, asserted: tpm2-pkcs11 1.9 stops generating keys after a number of them in
  //    one process (measured below with P-256 keys; the count is what docs/ reports).
  if (kind == HsmKind::kTpm2) {
    int generated = 0;
    absl::Status stopped;
    for (; generated < 40; ++generated) {
      auto key = (*token)->GenerateKeyPair({pkcs11::KeyType::kEcP256, 0},
                                           absl::StrCat("limit-", generated),
                                           absl::StrCat("limit-", generated));
      if (!key.ok()) {
        stopped = key.status();
        break;
      }
    }
    std::cout << "tpm2-pkcs11: " << generated
              << " P-256 keys generated in this process, then: " << stopped << std::endl;
    EXPECT_FALSE(stopped.ok()) << "tpm2-pkcs11 generated 40 keys in one process";
    EXPECT_GE(generated, 8);
    // A refusal, not a retryable device error: retrying in this process cannot help.
    EXPECT_EQ(stopped.code(), absl::StatusCode::kFailedPrecondition) << stopped;
    MatrixRows().push_back({module_name, "keys per process",
                            absl::StrCat(generated, " generated, then ", stopped.ToString())});
    for (int i = 0; i < generated; ++i) {
      EXPECT_TRUE((*token)->DestroyKeyPair(absl::StrCat("limit-", i)).ok());
    }
  }
  std::cout << module_name << ": set up in "
            << std::chrono::duration_cast<std::chrono::milliseconds>(set_up).count()
            << " ms, whole matrix in "
            << std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - started)
                   .count()
            << " ms" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Modules, HsmConformanceTest,
                         ::testing::Values(HsmKind::kSoftHsm2, HsmKind::kNssSoftokn, HsmKind::kTpm2,
                                           HsmKind::kOpencryptoki, HsmKind::kP11KitClient),
                         [](const ::testing::TestParamInfo<HsmKind>& info) {
                           std::string name = HsmName(info.param);
                           absl::StrReplaceAll({{"-", "_"}}, &name);
                           return name;
                         });

}  // namespace
}  // namespace custody::testing
