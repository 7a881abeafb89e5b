// Signer.Sign for TLS/X.509 users: digest algorithm, DER or JOSE encoding, RSA-PSS (salt =
// digest length, as TLS 1.3) or PKCS#1 v1.5 (RS256 rings only), pure Ed25519. The real custodyd
// on SoftHSM2; every signature is verified by the OpenSSL CLI against the public key that
// python3-jwcrypto derives from custody's JWKS (nothing of custody's own code on that side).
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/harness.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

using custody::v1::SignRequest;
using custody::v1::SignResponse;

grpc::Status CreateRing(Custodyd& d, const std::string& name, const std::string& alg,
                        bool non_fapi = false) {
  custody::v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(custody::v1::SIGN);
  req.set_alg(alg);
  req.set_allow_non_fapi(non_fapi);
  return custody::testing::CreateRing(d, req);
}

// The ring's single published key as a PEM SubjectPublicKeyInfo, converted by jwcrypto.
std::string PublicPem(Custodyd& d, const std::string& ring, const std::string& dir) {
  const std::string jwks_path = dir + "/jwks.json";
  WriteFileOrDie(jwks_path, Jwks(d, {ring}));
  CommandResult r = RunCommand({"/usr/bin/python3", "-c",
                                "import sys,json\nfrom jwcrypto import jwk\n"
                                "k=json.load(open(sys.argv[1]))['keys'][0]\n"
                                "sys.stdout.write(jwk.JWK(**k).export_to_pem().decode())",
                                jwks_path});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const std::string pem = dir + "/" + std::to_string(std::hash<std::string>()(ring)) + ".pem";
  WriteFileOrDie(pem, r.out);
  return pem;
}

std::string Sha(const std::string& bits, const std::string& data_file) {
  CommandResult r = RunCommand({"openssl", "dgst", "-sha" + bits, "-binary", data_file});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

class RawSignTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    daemon_ = new Custodyd(dir_->path() + "/state");
    ASSERT_TRUE(daemon_->started());
    ASSERT_TRUE(CreateRing(*daemon_, "tls/es256", "ES256").ok());
    ASSERT_TRUE(CreateRing(*daemon_, "tls/es384", "ES384").ok());
    ASSERT_TRUE(CreateRing(*daemon_, "tls/es512", "ES512").ok());
    ASSERT_TRUE(CreateRing(*daemon_, "tls/ps256", "PS256").ok());
    ASSERT_TRUE(CreateRing(*daemon_, "tls/rs256", "RS256", /*non_fapi=*/true).ok());
    ASSERT_TRUE(CreateRing(*daemon_, "tls/eddsa", "EdDSA").ok());
    data_ = dir_->path() + "/data.bin";
    WriteFileOrDie(data_, "TLS 1.3, server CertificateVerify\n" + std::string(64, ' '));
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }

  grpc::Status Sign(const SignRequest& req, SignResponse* out) {
    grpc::ClientContext ctx;
    return daemon_->signer().Sign(&ctx, req, out);
  }

  // Signs per `req` (digest filled in from data_ unless the request carries data), writes the
  // signature and verifies it with `openssl dgst` (or pkeyutl -rawin for Ed25519).
  void SignAndVerify(SignRequest req, const std::string& bits,
                     const std::vector<std::string>& sigopts) {
    SCOPED_TRACE(req.ring() + " " + req.digest_alg());
    if (req.input_case() != SignRequest::kData) req.set_digest(Sha(bits, data_));
    SignResponse resp;
    grpc::Status s = Sign(req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    const std::string sig = dir_->path() + "/sig.bin";
    WriteFileOrDie(sig, resp.signature());
    const std::string pem = PublicPem(*daemon_, req.ring(), dir_->path());
    std::vector<std::string> argv;
    if (bits.empty()) {
      argv = {"openssl", "pkeyutl", "-verify", "-pubin",   "-inkey", pem,
              "-rawin",  "-in",     data_,     "-sigfile", sig};
    } else {
      argv = {"openssl", "dgst", "-sha" + bits, "-verify", pem, "-signature", sig};
      for (const std::string& o : sigopts) {
        argv.push_back("-sigopt");
        argv.push_back(o);
      }
      argv.push_back(data_);
    }
    CommandResult v = RunCommand(argv);
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
    EXPECT_NE(v.out.find("Verified"), std::string::npos) << v.out;
  }

  static TempDir* dir_;
  static Custodyd* daemon_;
  static std::string data_;
};

TempDir* RawSignTest::dir_ = nullptr;
Custodyd* RawSignTest::daemon_ = nullptr;
std::string RawSignTest::data_;

SignRequest Request(const std::string& ring, const std::string& digest_alg,
                    custody::v1::SignatureEncoding encoding = custody::v1::SIGNATURE_ENCODING_JOSE,
                    custody::v1::RsaPadding padding = custody::v1::RSA_PADDING_RING) {
  SignRequest r;
  r.set_ring(ring);
  r.set_digest_alg(digest_alg);
  r.set_encoding(encoding);
  r.set_rsa_padding(padding);
  return r;
}

TEST_F(RawSignTest, EcdsaDerOverEveryDigestOnEveryCurveVerifiesWithOpenSsl) {
  for (const char* ring : {"tls/es256", "tls/es384", "tls/es512"}) {
    for (const char* bits : {"256", "384", "512"}) {
      SignAndVerify(Request(ring, std::string("SHA") + bits, custody::v1::SIGNATURE_ENCODING_DER),
                    bits, {});
    }
  }
}

TEST_F(RawSignTest, EcdsaDerOverDataIsHashedByCustodyd) {
  SignRequest req = Request("tls/es384", "", custody::v1::SIGNATURE_ENCODING_DER);
  req.set_data(ReadFileOrDie(data_));
  SignAndVerify(req, "384", {});  // the ring's own hash: SHA-384
}

TEST_F(RawSignTest, RsaPssSaltIsTheDigestLengthAsTls13Needs) {
  for (const char* bits : {"256", "384", "512"}) {
    SignAndVerify(
        Request("tls/ps256", std::string("SHA") + bits, custody::v1::SIGNATURE_ENCODING_JOSE,
                custody::v1::RSA_PADDING_PSS),
        bits,
        {"rsa_padding_mode:pss", "rsa_pss_saltlen:digest", "rsa_mgf1_md:sha" + std::string(bits)});
  }
  // An RS256 ring may sign PSS too (TLS 1.3 with an RSA key always does).
  SignAndVerify(Request("tls/rs256", "SHA256", custody::v1::SIGNATURE_ENCODING_JOSE,
                        custody::v1::RSA_PADDING_PSS),
                "256", {"rsa_padding_mode:pss", "rsa_pss_saltlen:digest"});
}

TEST_F(RawSignTest, RsaPkcs1OnAnRs256RingVerifiesWithOpenSsl) {
  for (const char* bits : {"256", "384", "512"}) {
    SignAndVerify(Request("tls/rs256", std::string("SHA") + bits), bits, {});
  }
}

TEST_F(RawSignTest, Ed25519SignsTheMessageItself) {
  SignRequest req = Request("tls/eddsa", "");
  req.set_data(ReadFileOrDie(data_));
  SignAndVerify(req, "", {});
}

TEST_F(RawSignTest, RefusesWhatTheRingDoesNotAllowWithTheReason) {
  struct Bad {
    SignRequest req;
    std::string reason;
  };
  const std::string d32(32, 'x');
  std::vector<Bad> cases;
  cases.push_back({Request("tls/ps256", "SHA256", custody::v1::SIGNATURE_ENCODING_JOSE,
                           custody::v1::RSA_PADDING_PKCS1),
                   "only rings created for it"});
  cases.push_back({Request("tls/ps256", "SHA256", custody::v1::SIGNATURE_ENCODING_DER),
                   "DER encoding applies to ECDSA rings only"});
  cases.push_back({Request("tls/es256", "MD5"), "unsupported digest_alg 'MD5'"});
  cases.push_back({Request("tls/es256", "SHA384"), "digest must be 48 bytes"});
  cases.push_back({Request("tls/es256", "SHA256", custody::v1::SIGNATURE_ENCODING_JOSE,
                           custody::v1::RSA_PADDING_PSS),
                   "rsa_padding applies to RSA rings only"});
  cases.push_back({Request("tls/eddsa", "SHA256"), "EdDSA signs the message itself"});
  for (Bad& b : cases) {
    b.req.set_digest(d32);
    SignResponse resp;
    grpc::Status s = Sign(b.req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << b.reason;
    EXPECT_NE(s.error_message().find(b.reason), std::string::npos) << s.error_message();
  }
}

TEST_F(RawSignTest, JwsAndPlainSignKeepTheirJoseBehaviour) {
  SignRequest req;
  req.set_ring("tls/es256");
  req.set_digest(std::string(32, 'a'));
  SignResponse resp;
  ASSERT_TRUE(Sign(req, &resp).ok());
  EXPECT_EQ(resp.signature().size(), 64u);  // r||s
  EXPECT_EQ(resp.alg(), "ES256");
  custody::v1::SignJwsRequest jws;
  jws.set_ring("tls/es384");
  jws.set_payload("{}");
  custody::v1::SignJwsResponse jws_resp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(daemon_->signer().SignJws(&ctx, jws, &jws_resp).ok());
  custody::v1::GetJwksRequest jr;
  jr.add_rings("tls/es384");
  custody::v1::GetJwksResponse jwks;
  grpc::ClientContext ctx2;
  ASSERT_TRUE(daemon_->signer().GetJwks(&ctx2, jr, &jwks).ok());
  EXPECT_EQ(VerifyWithJwcrypto(jwks.jwks(), jws_resp.jws(), "ES384"), "");
}

TEST_F(RawSignTest, GetPublicKeyAndAPinnedVersionThatIsNotActiveDoesNotSign) {
  custody::v1::GetPublicKeyRequest req;
  req.set_ring("tls/es384");
  custody::v1::PublicKey key;
  grpc::ClientContext c1;
  ASSERT_TRUE(daemon_->signer().GetPublicKey(&c1, req, &key).ok());
  EXPECT_EQ(key.version(), 1u);
  EXPECT_EQ(key.state(), custody::v1::ACTIVE);
  EXPECT_EQ(key.alg(), "ES384");
  EXPECT_EQ(key.purpose(), custody::v1::SIGN);
  EXPECT_NE(key.public_jwk().find("\"P-384\""), std::string::npos) << key.public_jwk();
  req.set_version(7);
  grpc::ClientContext c2;
  EXPECT_EQ(daemon_->signer().GetPublicKey(&c2, req, &key).error_code(),
            grpc::StatusCode::NOT_FOUND);

  SignRequest sign = Request("tls/es384", "SHA384");
  sign.set_digest(std::string(48, 'p'));
  sign.set_version(1);
  SignResponse resp;
  ASSERT_TRUE(Sign(sign, &resp).ok());
  EXPECT_EQ(resp.version(), 1u);
  sign.set_version(2);
  grpc::Status s = Sign(sign, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("only the ACTIVE version (1)"), std::string::npos)
      << s.error_message();
}

// Every raw signature is one audit line, like a JWS.
TEST_F(RawSignTest, EverySignatureIsOneAuditLine) {
  auto count = [&] {
    size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir_->path() + "/state/audit")) {
      const std::string log = ReadFileOrDie(e.path().string());
      for (size_t p = log.find("\"ring\":\"tls/ps256\""); p != std::string::npos;
           p = log.find("\"ring\":\"tls/ps256\"", p + 1)) {
        ++n;
      }
    }
    return n;
  };
  const size_t before = count();
  for (int i = 0; i < 3; ++i) {
    SignRequest req = Request("tls/ps256", "SHA384");
    req.set_digest(std::string(48, 'd'));
    SignResponse resp;
    ASSERT_TRUE(Sign(req, &resp).ok());
  }
  EXPECT_EQ(count(), before + 3);
}

}  // namespace
}  // namespace custody::testing
