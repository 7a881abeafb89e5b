// A network HSM stand-in: `p11-kit server` exports one SoftHSM2 token over a Unix socket, and
// custodyd replicas load p11-kit's client module (`p11-kit-client.so`, P11_KIT_SERVER_ADDRESS):
// the token lives in another process and every Cryptoki call is an RPC, as with a vendor's
// network module. Two replicas on it share one PostgreSQL metadata store (a throw-away cluster)
// with a third replica that loads SoftHSM2 directly on the same token directory (the "better"
// token). Signatures are checked with the OpenSSL CLI and python3-jwcrypto, JWEs are made with
// python3-jwcrypto.
//
// Measured with Debian 12's p11-kit 0.24.1: its RPC client drops from C_GetMechanismList every
// mechanism whose parameters it cannot marshal (CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA,
// CKM_ECDH1_DERIVE among them) and refuses them with CKR_MECHANISM_INVALID before the server sees
// the call. custody reads that list: such rings are refused at creation, and GetKeyRing names the
// missing mechanisms of a ring another replica created.
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/secret.h"
#include "gtest/gtest.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "pkcs11/capabilities.h"
#include "pkcs11/token.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;

const ::testing::Environment* const environment =
    rotation::testing::PostgresClusterEnvironment::Register();
rotation::testing::PostgresCluster* Cluster() {
  return rotation::testing::PostgresClusterEnvironment::Get();
}

constexpr char kP11KitClient[] = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";
constexpr char kSoftHsm[] = "/usr/lib/softhsm/libsofthsm2.so";

// The deadline of this file's RPCs (rpc_helpers.h's are a hang guard only).
constexpr std::chrono::milliseconds kCallTimeout = 20s;

// `p11-kit server` in the foreground, exporting the token labelled "custody" of the SoftHSM2
// configuration `softhsm2_conf` on the Unix socket `socket_path`.
class P11KitServer {
 public:
  P11KitServer(const std::string& softhsm2_conf, std::string socket_path, std::string log_path)
      : socket_path_(std::move(socket_path)), log_path_(std::move(log_path)) {
    absl::StatusOr<ChildProcess> child =
        ChildProcess::Start({.argv = {"p11-kit", "server", "-f", "--provider", kSoftHsm, "-n",
                                      socket_path_, "pkcs11:token=custody"},
                             .env = {"SOFTHSM2_CONF=" + softhsm2_conf},
                             .stdout_path = log_path_,
                             .stderr_path = log_path_,
                             .append = true});
    if (!child.ok()) return;
    server_ = *std::move(child);
    for (int i = 0; i < 1000 && access(socket_path_.c_str(), F_OK) != 0; ++i) {
      std::this_thread::sleep_for(10ms);
    }
  }
  bool started() const { return access(socket_path_.c_str(), F_OK) == 0; }
  std::string address() const { return "unix:path=" + socket_path_; }
  std::string log() const { return ReadFileOrDie(log_path_); }

 private:
  std::string socket_path_;
  std::string log_path_;
  ChildProcess server_;  // SIGTERM when the test ends
};

// Encrypts `plaintext` to `kid` of `jwks` with python3-jwcrypto (A256GCM).
std::string JwcryptoEncrypt(const std::string& jwks, const std::string& kid, const std::string& alg,
                            const std::string& plaintext) {
  TempDir dir;
  WriteFileOrDie(dir.path() + "/jwks.json", jwks);
  WriteFileOrDie(dir.path() + "/plaintext", plaintext);
  CommandResult r =
      RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/jwcrypto_encrypt.py",
                  dir.path() + "/jwks.json", kid, alg, dir.path() + "/plaintext", "A256GCM"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::string jwe = r.out;
  while (!jwe.empty() && jwe.back() == '\n') jwe.pop_back();
  return jwe;
}

class P11KitTest : public ::testing::Test {
 protected:
  // One PostgreSQL database, the direct replica (which makes the token), the p11-kit server on
  // that token, and replicas A and B through the server: shared by the tests of this binary.
  static void SetUpTestSuite() {
    ASSERT_NE(Cluster(), nullptr);
    dir_ = new TempDir();
    const std::string db = absl::StrCat("p11kit", getpid());
    ASSERT_TRUE(Cluster()->CreateDatabase(db).ok());
    const std::vector<std::string> metadata = {
        "--metadata=" + Cluster()->Uri(db),
        "--metadata_password_file=" + Cluster()->password_file()};
    const std::string direct_dir = dir_->path() + "/direct";
    std::vector<std::string> flags = metadata;
    flags.push_back("--replica_id=direct");
    direct_ = new Custodyd(direct_dir, flags);
    ASSERT_TRUE(direct_->started()) << direct_->log();
    server_ = new P11KitServer(direct_dir + "/softhsm2.conf", dir_->path() + "/p11-kit.sock",
                               dir_->path() + "/p11-kit.log");
    ASSERT_TRUE(server_->started()) << server_->log();
    for (int i = 0; i < 2; ++i) {
      std::vector<std::string> remote = metadata;
      remote.push_back(absl::StrCat("--pkcs11_module=", kP11KitClient));
      remote.push_back("--token_label=custody");
      remote.push_back("--pin_file=" + direct_dir + "/pin");
      remote.push_back(i == 0 ? "--replica_id=a" : "--replica_id=b");
      remote_[i] = new Custodyd(dir_->path() + (i == 0 ? "/a" : "/b"), remote,
                                Custodyd::Environment{{"P11_KIT_SERVER_ADDRESS=" + Address()}});
      ASSERT_TRUE(remote_[i]->started()) << remote_[i]->log();
    }
  }
  static void TearDownTestSuite() {
    for (Custodyd*& d : remote_) {
      delete d;
      d = nullptr;
    }
    delete server_;
    server_ = nullptr;
    delete direct_;
    direct_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }
  static std::string Address() { return server_->address(); }
  static Custodyd& A() { return *remote_[0]; }
  static Custodyd& B() { return *remote_[1]; }
  static Custodyd& Direct() { return *direct_; }

  static grpc::Status Create(Custodyd& d, const std::string& name, v1::Purpose purpose,
                             const std::string& alg, v1::KeyRing* out) {
    v1::CreateKeyRingRequest req;
    req.set_name(name);
    req.set_purpose(purpose);
    req.set_alg(alg);
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    return d.admin().CreateKeyRing(&ctx, req, out);
  }
  static grpc::Status Get(Custodyd& d, const std::string& name, v1::KeyRing* out) {
    v1::GetKeyRingRequest req;
    req.set_name(name);
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    return d.admin().GetKeyRing(&ctx, req, out);
  }
  // The ring as `d` sees it, once it does (another replica created it).
  static grpc::Status GetWhenKnown(Custodyd& d, const std::string& name, v1::KeyRing* out) {
    grpc::Status s;
    for (int i = 0; i < 500; ++i) {
      s = Get(d, name, out);
      if (s.error_code() != grpc::StatusCode::NOT_FOUND) return s;
      std::this_thread::sleep_for(10ms);
    }
    return s;
  }
  static std::string Jwks(Custodyd& d, const std::string& ring) {
    v1::GetJwksRequest req;
    req.add_rings(ring);
    v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = d.signer().GetJwks(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.jwks();
  }

  static TempDir* dir_;
  static Custodyd* direct_;
  static P11KitServer* server_;
  static Custodyd* remote_[2];
};

TempDir* P11KitTest::dir_ = nullptr;
Custodyd* P11KitTest::direct_ = nullptr;
P11KitServer* P11KitTest::server_ = nullptr;
Custodyd* P11KitTest::remote_[2] = {nullptr, nullptr};

TEST_F(P11KitTest, RingCreatedOnOneReplicaSignsOnTheOtherThroughTheServer) {
  for (const std::string alg : {"ES256", "PS256"}) {
    SCOPED_TRACE(alg);
    const std::string name = "p11/sign-" + absl::AsciiStrToLower(alg);
    v1::KeyRing ring;
    grpc::Status s = Create(A(), name, v1::SIGN, alg, &ring);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << A().log();
    EXPECT_EQ(ring.missing_mechanisms_size(), 0);
    v1::KeyRing seen;
    ASSERT_TRUE(GetWhenKnown(B(), name, &seen).ok());
    EXPECT_EQ(seen.missing_mechanisms_size(), 0);
    for (Custodyd* d : {&A(), &B()}) {
      v1::SignJwsRequest req;
      req.set_ring(name);
      req.set_payload("{\"sub\":\"alice\",\"via\":\"p11-kit\"}");
      v1::SignJwsResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kCallTimeout);
      s = d->signer().SignJws(&ctx, req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(resp.kid(), ring.versions(0).kid());
      const std::string jwks = Jwks(*d, name);
      EXPECT_EQ(VerifyWithOpenSsl(jwks, resp.jws()), "");
      std::string payload;
      EXPECT_EQ(VerifyWithJwcrypto(jwks, resp.jws(), alg, &payload), "");
      EXPECT_EQ(payload, req.payload());
    }
  }
}

TEST_F(P11KitTest, RsaOaepDecryptionRunsThroughTheServerOnEveryReplica) {
  for (const std::string alg : {"RSA-OAEP", "RSA-OAEP-256"}) {
    SCOPED_TRACE(alg);
    const std::string name = "p11/enc-" + absl::AsciiStrToLower(alg);
    v1::KeyRing ring;
    grpc::Status s = Create(A(), name, v1::DECRYPT, alg, &ring);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(ring.missing_mechanisms_size(), 0);
    v1::KeyRing seen;
    ASSERT_TRUE(GetWhenKnown(B(), name, &seen).ok());
    const std::string plaintext = "the CEK of " + alg + " unwrapped through p11-kit";
    const std::string jwe =
        JwcryptoEncrypt(Jwks(B(), name), ring.versions(0).kid(), alg, plaintext);
    ASSERT_FALSE(jwe.empty());
    for (Custodyd* d : {&A(), &B()}) {
      v1::DecryptJweRequest req;
      req.set_ring(name);
      req.set_jwe(jwe);
      v1::DecryptJweResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kCallTimeout);
      s = d->signer().DecryptJwe(&ctx, req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(resp.plaintext(), plaintext);
    }
  }
}

TEST_F(P11KitTest, RingsTheTokenCannotServeAreRefusedAtCreationNamingTheMechanism) {
  struct Case {
    v1::Purpose purpose;
    std::string alg;
    std::vector<std::string> named;
  };
  const std::vector<Case> cases = {
      {v1::SIGN, "EdDSA", {"CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"}},
      {v1::DECRYPT, "ECDH-ES", {"CKM_ECDH1_DERIVE"}},
      {v1::DECRYPT, "ECDH-ES+A256KW", {"CKM_ECDH1_DERIVE"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.alg);
    const std::string name =
        "p11/refused-" + absl::StrReplaceAll(absl::AsciiStrToLower(c.alg), {{"+", "-"}});
    v1::KeyRing ring;
    auto start = std::chrono::steady_clock::now();
    grpc::Status s = Create(A(), name, c.purpose, c.alg, &ring);
    auto took = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    for (const std::string& m : c.named) {
      EXPECT_NE(s.error_message().find(m), std::string::npos) << s.error_message();
    }
    EXPECT_NE(s.error_message().find(c.alg), std::string::npos) << s.error_message();
    // Refused before anything was written or generated: no token call, no metadata commit.
    EXPECT_LT(took, 2s);
    EXPECT_EQ(Get(A(), name, &ring).error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(Get(Direct(), name, &ring).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // Reported at startup too.
  const std::string log = A().log();
  EXPECT_NE(log.find("token.alg_unavailable"), std::string::npos) << log;
  EXPECT_NE(log.find("CKM_ECDH1_DERIVE"), std::string::npos) << log;
}

TEST_F(P11KitTest, GetKeyRingNamesTheMechanismsThisReplicasTokenLacks) {
  // The direct replica's token (SoftHSM2 without the RPC layer) has every mechanism.
  v1::KeyRing eddsa, ecdh;
  grpc::Status s = Create(Direct(), "p11/direct-eddsa", v1::SIGN, "EdDSA", &eddsa);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(eddsa.missing_mechanisms_size(), 0);
  s = Create(Direct(), "p11/direct-ecdh", v1::DECRYPT, "ECDH-ES", &ecdh);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(ecdh.missing_mechanisms_size(), 0);

  v1::KeyRing seen;
  ASSERT_TRUE(GetWhenKnown(A(), "p11/direct-eddsa", &seen).ok());
  EXPECT_EQ(
      std::vector<std::string>(seen.missing_mechanisms().begin(), seen.missing_mechanisms().end()),
      (std::vector<std::string>{"CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"}));
  ASSERT_TRUE(GetWhenKnown(B(), "p11/direct-ecdh", &seen).ok());
  EXPECT_EQ(
      std::vector<std::string>(seen.missing_mechanisms().begin(), seen.missing_mechanisms().end()),
      (std::vector<std::string>{"CKM_ECDH1_DERIVE"}));

  // custodyctl ring get shows it (the KeyRing as JSON).
  CommandResult r = RunCommand(
      {BinDir() + "/custodyctl", "--addr=" + A().address(), "ring", "get", "p11/direct-eddsa"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"missing_mechanisms\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("CKM_EDDSA"), std::string::npos) << r.out;

  // A rotation there is refused before it takes a version number.
  {
    v1::RotateKeyRingRequest rotate;
    rotate.set_ring("p11/direct-eddsa");
    rotate.set_force(true);
    v1::RotateKeyRingResponse rotated;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    s = A().admin().RotateKeyRing(&ctx, rotate, &rotated);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    EXPECT_NE(s.error_message().find("CKM_EDDSA"), std::string::npos) << s.error_message();
    v1::KeyRing after;
    ASSERT_TRUE(Get(Direct(), "p11/direct-eddsa", &after).ok());
    EXPECT_EQ(after.versions_size(), 1) << after.DebugString();
  }

  // What the lacking replica answers when asked to use such a ring anyway: the token's own
  // refusal, named (GetKeyRing above said why beforehand).
  v1::SignJwsRequest req;
  req.set_ring("p11/direct-eddsa");
  req.set_payload("{}");
  v1::SignJwsResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  s = A().signer().SignJws(&ctx, req, &resp);
  EXPECT_FALSE(s.ok());
  std::cout << "EdDSA SignJws on the p11-kit replica: code " << s.error_code() << ": "
            << s.error_message() << std::endl;
  EXPECT_NE(s.error_message().find("CKR_MECHANISM_INVALID"), std::string::npos)
      << s.error_message();
}

// The same token through p11-kit's client in this process, with custody's pkcs11/ alone: exactly
// which calls fail (the mechanism list and the marshalling agree).
TEST_F(P11KitTest, TokenThroughTheRpcClientLacksWhatItCannotMarshal) {
  setenv("P11_KIT_SERVER_ADDRESS", Address().c_str(), 1);
  pkcs11::Token::Options options;
  options.module_path = kP11KitClient;
  options.selector.label = "custody";
  std::string pin = ReadFileOrDie(dir_->path() + "/direct/pin");
  while (!pin.empty() && (pin.back() == '\n' || pin.back() == '\r')) pin.pop_back();
  options.pin = Secret(pin);
  options.max_sessions = 2;
  auto token = pkcs11::Token::Open(std::move(options));
  ASSERT_TRUE(token.ok()) << token.status();
  for (const char* present : {"CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA", "CKM_RSA_PKCS_KEY_PAIR_GEN",
                              "CKM_RSA_PKCS_PSS", "CKM_RSA_PKCS_OAEP", "CKM_RSA_X_509"}) {
    EXPECT_TRUE((*token)->HasMechanism(present)) << present;
  }
  for (const char* absent : {"CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA", "CKM_ECDH1_DERIVE"}) {
    EXPECT_FALSE((*token)->HasMechanism(absent)) << absent;
  }

  pkcs11::KeyUse eddsa;
  eddsa.spec = {pkcs11::KeyType::kEd25519, 0};
  eddsa.scheme = pkcs11::SignScheme::kEddsa;
  EXPECT_EQ(pkcs11::MissingMechanisms(**token, eddsa),
            (std::vector<std::string>{"CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"}));
  pkcs11::KeyUse ecdh;
  ecdh.spec = {pkcs11::KeyType::kEcP256, 0};
  ecdh.operation = pkcs11::KeyUse::Operation::kDeriveEcdh;
  EXPECT_EQ(pkcs11::MissingMechanisms(**token, ecdh),
            (std::vector<std::string>{"CKM_ECDH1_DERIVE"}));
  pkcs11::KeyUse oaep;
  oaep.spec = {pkcs11::KeyType::kRsa, 2048};
  oaep.operation = pkcs11::KeyUse::Operation::kDecryptRsaOaep;
  EXPECT_TRUE(pkcs11::MissingMechanisms(**token, oaep).empty());

  // Ed25519 generation: refused by the client (the server never sees it).
  auto ed = (*token)->GenerateKeyPair(eddsa.spec, "p11kit-ed", "p11kit-ed");
  ASSERT_FALSE(ed.ok());
  EXPECT_NE(ed.status().message().find("CKR_MECHANISM_INVALID"), std::string::npos) << ed.status();

  // An EC derivation key is generated fine; the ECDH derivation itself fails.
  auto ec = (*token)->GenerateKeyPair(ecdh.spec, "p11kit-ecdh", "p11kit-ecdh",
                                      /*for_decryption=*/true);
  ASSERT_TRUE(ec.ok()) << ec.status();
  EVP_PKEY* peer = EVP_EC_gen("P-256");
  ASSERT_NE(peer, nullptr);
  unsigned char point[65];
  size_t len = 0;
  ASSERT_EQ(EVP_PKEY_get_octet_string_param(peer, "encoded-pub-key", point, sizeof(point), &len),
            1);
  EVP_PKEY_free(peer);
  auto z = (*token)->DeriveEcdh(**ec, std::string(reinterpret_cast<char*>(point), len));
  ASSERT_FALSE(z.ok());
  std::cout << "ECDH through p11-kit: " << z.status() << std::endl;
  EXPECT_NE(z.status().message().find("C_DeriveKey"), std::string::npos) << z.status();
  EXPECT_NE(z.status().message().find("CKR_MECHANISM_INVALID"), std::string::npos) << z.status();
  EXPECT_TRUE((*token)->DestroyKeyPair("p11kit-ecdh").ok());
}

}  // namespace
}  // namespace custody::testing
