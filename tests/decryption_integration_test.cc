// JWE decryption end to end: the real custodyd on a real SoftHSM2 token over real gRPC. JWEs come
// from independent implementations (python3-jwcrypto, the npm `jose` package), from the client
// library, and from published vectors (RFC 7516 A.1, RFC 7520 5.2/5.4/5.5) whose keys are
// imported into the token.
#include <string>
#include <vector>

#include "client/jwe_encryption.h"
#include "gtest/gtest.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "tests/testing/harness.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

const std::vector<std::string> kAllEncs = {"A128GCM",       "A192GCM",       "A256GCM",
                                           "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512"};

struct RingCase {
  std::string ring;
  std::string alg;
  std::string curve;
};

const std::vector<RingCase>& DecryptRings() {
  static const auto* rings = new std::vector<RingCase>{
      {"enc/rsa-oaep-256", "RSA-OAEP-256", ""},
      {"enc/rsa-oaep", "RSA-OAEP", ""},
      {"enc/ecdh-es", "ECDH-ES", "P-256"},
      {"enc/ecdh-es-a128kw", "ECDH-ES+A128KW", "P-256"},
      {"enc/ecdh-es-a192kw", "ECDH-ES+A192KW", "P-384"},
      {"enc/ecdh-es-a256kw", "ECDH-ES+A256KW", "P-521"},
  };
  return *rings;
}

grpc::Status CreateDecryptRing(Custodyd& d, const std::string& name, const std::string& alg,
                               const std::string& curve = "", uint32_t zip_max = 0,
                               const std::string& import_jwk = "",
                               custody::v1::KeyRing* out = nullptr) {
  custody::v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(custody::v1::DECRYPT);
  req.set_alg(alg);
  req.set_curve(curve);
  req.set_zip_max_bytes(zip_max);
  if (!import_jwk.empty()) req.mutable_import_key()->set_private_jwk(import_jwk);
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  grpc::Status s = d.admin().CreateKeyRing(&ctx, req, &ring);
  if (out != nullptr) *out = ring;
  return s;
}

grpc::Status Decrypt(Custodyd& d, const std::string& ring, const std::string& jwe,
                     custody::v1::DecryptJweResponse* out) {
  custody::v1::DecryptJweRequest req;
  req.set_ring(ring);
  req.set_jwe(jwe);
  grpc::ClientContext ctx;
  return d.signer().DecryptJwe(&ctx, req, out);
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t nl; (nl = text.find('\n', start)) != std::string::npos; start = nl + 1) {
    if (nl > start) out.push_back(text.substr(start, nl - start));
  }
  return out;
}

// Encrypts with an independent implementation: "jwcrypto" or "npm-jose".
std::vector<std::string> ExternalEncrypt(const std::string& tool, const std::string& jwks,
                                         const std::string& kid, const std::string& alg,
                                         const std::string& plaintext,
                                         const std::vector<std::string>& encs,
                                         const std::vector<std::string>& env = {}) {
  TempDir dir;
  WriteFileOrDie(dir.path() + "/jwks.json", jwks);
  WriteFileOrDie(dir.path() + "/plaintext", plaintext);
  std::vector<std::string> argv =
      tool == "jwcrypto"
          ? std::vector<std::string>{"/usr/bin/python3",
                                     SourceDir() + "/tests/tools/jwcrypto_encrypt.py"}
          : std::vector<std::string>{"node", SourceDir() + "/tests/js/encrypt.mjs"};
  for (const std::string& a : {dir.path() + "/jwks.json", kid, alg, dir.path() + "/plaintext"}) {
    argv.push_back(a);
  }
  argv.insert(argv.end(), encs.begin(), encs.end());
  CommandResult r = RunCommand(argv, "", env);
  EXPECT_EQ(r.exit_code, 0) << tool << ": " << r.err;
  std::vector<std::string> jwes = Lines(r.out);
  if (jwes.size() != encs.size()) {
    // One (empty, undecryptable) JWE per asked enc all the same, so that a caller indexing the
    // result fails its checks instead of reading past the end.
    ADD_FAILURE() << tool << " made " << jwes.size() << " JWEs for " << encs.size()
                  << " encs: " << r.out << r.err;
    jwes.resize(encs.size());
  }
  return jwes;
}

// Replaces the protected header of a compact JWE (breaking its tag, which is the point for
// checks that must fire before decryption).
std::string WithHeader(const std::string& jwe, const std::string& header_json) {
  return jose::Base64UrlEncode(header_json) + jwe.substr(jwe.find('.'));
}

class DecryptionTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    daemon_ = new Custodyd(dir_->path() + "/state");
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
    for (const RingCase& c : DecryptRings()) {
      custody::v1::KeyRing ring;
      grpc::Status s = CreateDecryptRing(*daemon_, c.ring, c.alg, c.curve, 0, "", &ring);
      ASSERT_TRUE(s.ok()) << c.ring << ": " << s.error_message();
    }
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }
  static std::string Kid(const std::string& ring) {
    return GetRing(*daemon_, ring).versions(0).kid();
  }
  static TempDir* dir_;
  static Custodyd* daemon_;
};
TempDir* DecryptionTest::dir_ = nullptr;
Custodyd* DecryptionTest::daemon_ = nullptr;

TEST_F(DecryptionTest, JwcryptoJwesDecryptForEveryAlgAndEnc) {
  const std::string plaintext = R"({"iss":"client-1","response_type":"code","nonce":"n-0S6"})";
  for (const RingCase& c : DecryptRings()) {
    std::vector<std::string> jwes = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {c.ring}),
                                                    Kid(c.ring), c.alg, plaintext, kAllEncs);
    for (size_t i = 0; i < jwes.size(); ++i) {
      custody::v1::DecryptJweResponse resp;
      grpc::Status s = Decrypt(*daemon_, c.ring, jwes[i], &resp);
      ASSERT_TRUE(s.ok()) << c.alg << "/" << kAllEncs[i] << ": " << s.error_message();
      EXPECT_EQ(resp.plaintext(), plaintext) << c.alg << "/" << kAllEncs[i];
      EXPECT_EQ(resp.kid(), Kid(c.ring));
      EXPECT_EQ(resp.version(), 1u);
      EXPECT_NE(resp.protected_header().find("\"enc\""), std::string::npos);
    }
  }
}

TEST_F(DecryptionTest, NpmJoseJwesDecryptForEveryAlgAndEnc) {
  const std::string plaintext = "id_token for the relying party";
  for (const RingCase& c : DecryptRings()) {
    std::vector<std::string> jwes = ExternalEncrypt("npm-jose", Jwks(*daemon_, {c.ring}),
                                                    Kid(c.ring), c.alg, plaintext, kAllEncs);
    for (size_t i = 0; i < jwes.size(); ++i) {
      custody::v1::DecryptJweResponse resp;
      grpc::Status s = Decrypt(*daemon_, c.ring, jwes[i], &resp);
      ASSERT_TRUE(s.ok()) << c.alg << "/" << kAllEncs[i] << ": " << s.error_message();
      EXPECT_EQ(resp.plaintext(), plaintext) << c.alg << "/" << kAllEncs[i];
    }
  }
}

TEST_F(DecryptionTest, ClientLibraryJwesDecryptAndNestedJwtIsReturnedAsIs) {
  for (const RingCase& c : DecryptRings()) {
    for (const std::string& enc : kAllEncs) {
      client::EncryptOptions options;
      options.enc = *jose::ParseJweEnc(enc);
      options.cty = "JWT";
      const std::string nested = "eyJhbGciOiJQUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
      auto jwe = client::EncryptToJwks(nested, Jwks(*daemon_, {c.ring}), options);
      ASSERT_TRUE(jwe.ok()) << jwe.status();
      custody::v1::DecryptJweResponse resp;
      grpc::Status s = Decrypt(*daemon_, c.ring, *jwe, &resp);
      ASSERT_TRUE(s.ok()) << c.alg << "/" << enc << ": " << s.error_message();
      EXPECT_EQ(resp.plaintext(), nested);
      EXPECT_NE(resp.protected_header().find("\"cty\":\"JWT\""), std::string::npos)
          << resp.protected_header();
    }
  }
}

TEST_F(DecryptionTest, JwksPublishesEncKeysAndRingReportsTheRsaPath) {
  auto jwks = jose::ParseJson(Jwks(*daemon_, {"enc/ecdh-es-a192kw"}));
  ASSERT_TRUE(jwks.ok());
  const jose::Json& key = jwks->Find("keys")->as_array().at(0);
  EXPECT_EQ(key.Find("use")->as_string(), "enc");
  EXPECT_EQ(key.Find("alg")->as_string(), "ECDH-ES+A192KW");
  EXPECT_EQ(key.Find("crv")->as_string(), "P-384");
  EXPECT_EQ(key.Find("d"), nullptr);
  // Measured fact: SoftHSM2 2.6.1 refuses CKM_RSA_PKCS_OAEP with SHA-256, so RSA-OAEP-256 runs
  // on the raw-RSA fallback with constant-time decoding, and says so.
  EXPECT_NE(GetRing(*daemon_, "enc/rsa-oaep-256").decryption_mechanism().find("fallback"),
            std::string::npos);
  EXPECT_EQ(GetRing(*daemon_, "enc/rsa-oaep").decryption_mechanism(),
            "token: CKM_RSA_PKCS_OAEP (SHA-1)");
  EXPECT_NE(daemon_->log().find("\"event\":\"token.rsa_oaep_sha256\",\"path\":\"fallback"),
            std::string::npos);
}

TEST_F(DecryptionTest, RefusedAlgorithmsNameTheReason) {
  for (const std::string alg : {"RSA1_5", "dir", "PBES2-HS256+A128KW", "A128KW", "A256GCMKW"}) {
    grpc::Status s = CreateDecryptRing(*daemon_, "enc/refused", alg);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << alg;
    EXPECT_NE(s.error_message().find(alg), std::string::npos) << s.error_message();
    EXPECT_GT(s.error_message().size(), alg.size() + 20)
        << "no reason given: " << s.error_message();
  }
  grpc::Status s = CreateDecryptRing(*daemon_, "enc/bad-curve", "ECDH-ES", "secp256k1");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(DecryptionTest, EveryFailureAfterParsingIsTheSameDecryptionFailed) {
  const std::string plaintext = "secret request object";
  for (const RingCase& c : DecryptRings()) {
    std::string jwe = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {c.ring}), Kid(c.ring), c.alg,
                                      plaintext, {"A256GCM"})[0];
    std::vector<std::string> bad;
    // Flipped tag, ciphertext and (where present) encrypted key.
    size_t last = jwe.rfind('.');
    std::string tag_flip = jwe;
    tag_flip[last + 2] = tag_flip[last + 2] == 'A' ? 'B' : 'A';
    bad.push_back(tag_flip);
    size_t third = jwe.rfind('.', last - 1);
    std::string ct_flip = jwe;
    ct_flip[third + 2] = ct_flip[third + 2] == 'A' ? 'B' : 'A';
    bad.push_back(ct_flip);
    size_t first = jwe.find('.');
    if (jwe[first + 1] != '.') {
      std::string key_flip = jwe;
      key_flip[first + 5] = key_flip[first + 5] == 'A' ? 'B' : 'A';
      bad.push_back(key_flip);
    }
    for (const std::string& b : bad) {
      custody::v1::DecryptJweResponse resp;
      grpc::Status s = Decrypt(*daemon_, c.ring, b, &resp);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.alg;
      EXPECT_EQ(s.error_message(), "decryption failed") << c.alg;
    }
  }
  // A JWE for another key of the same alg, and an unknown kid: the same answer.
  grpc::Status s = CreateDecryptRing(*daemon_, "enc/other", "ECDH-ES", "P-256");
  ASSERT_TRUE(s.ok()) << s.error_message();
  std::string other_kid = GetRing(*daemon_, "enc/other").versions(0).kid();
  std::string foreign = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/other"}), other_kid,
                                        "ECDH-ES", "x", {"A128GCM"})[0];
  custody::v1::DecryptJweResponse resp;
  s = Decrypt(*daemon_, "enc/ecdh-es", foreign, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "decryption failed");
}

TEST_F(DecryptionTest, InvalidCurveEpksAreRejectedBeforeTheToken) {
  std::string jwe = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/ecdh-es"}), Kid("enc/ecdh-es"),
                                    "ECDH-ES", "x", {"A128GCM"})[0];
  auto header = jose::ParseJson(*jose::Base64UrlDecode(jwe.substr(0, jwe.find('.'))));
  ASSERT_TRUE(header.ok());
  // 1. Off the curve: y changed, x kept.
  jose::Json off = *header;
  jose::Json epk = *off.Find("epk");
  std::string y = *jose::Base64UrlDecode(epk.Find("y")->as_string());
  y[31] ^= 1;
  epk.Set("y", jose::Json::String(jose::Base64UrlEncode(y)));
  off.Set("epk", epk);
  custody::v1::DecryptJweResponse resp;
  grpc::Status s = Decrypt(*daemon_, "enc/ecdh-es", WithHeader(jwe, off.Serialize()), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("epk"), std::string::npos) << s.error_message();
  // 2. A valid P-384 point sent to the P-256 ring.
  std::string p384_jwe =
      ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/ecdh-es-a192kw"}), Kid("enc/ecdh-es-a192kw"),
                      "ECDH-ES+A192KW", "x", {"A128GCM"})[0];
  auto p384_header =
      jose::ParseJson(*jose::Base64UrlDecode(p384_jwe.substr(0, p384_jwe.find('.'))));
  jose::Json wrong_curve = *header;
  wrong_curve.Set("epk", *p384_header->Find("epk"));
  s = Decrypt(*daemon_, "enc/ecdh-es", WithHeader(jwe, wrong_curve.Serialize()), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("epk: curve \"P-384\" does not match"), std::string::npos)
      << s.error_message();
  // 3. Neither check lets the log carry secrets: the log has no plaintext.
  EXPECT_EQ(daemon_->log().find("secret request object"), std::string::npos);
}

TEST_F(DecryptionTest, MalformedInputNamesThePart) {
  custody::v1::DecryptJweResponse resp;
  grpc::Status s = Decrypt(*daemon_, "enc/rsa-oaep", "a.b.c", &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  std::string jwe = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/rsa-oaep"}),
                                    Kid("enc/rsa-oaep"), "RSA-OAEP", "x", {"A128GCM"})[0];
  size_t iv_start = jwe.find('.', jwe.find('.') + 1) + 1;
  std::string bad_iv = jwe;
  bad_iv.replace(iv_start, 2, "!!");
  s = Decrypt(*daemon_, "enc/rsa-oaep", bad_iv, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("iv"), std::string::npos) << s.error_message();
  s = Decrypt(*daemon_, "enc/rsa-oaep", "!!" + jwe.substr(2), &resp);
  EXPECT_NE(s.error_message().find("protected header"), std::string::npos) << s.error_message();
  s = Decrypt(*daemon_, "enc/rsa-oaep",
              WithHeader(jwe, R"({"alg":"RSA-OAEP","enc":"A128GCM","crit":["exp"],"exp":1})"),
              &resp);
  EXPECT_NE(s.error_message().find("crit"), std::string::npos) << s.error_message();
  s = Decrypt(*daemon_, "enc/rsa-oaep",
              WithHeader(jwe, R"({"alg":"RSA-OAEP-256","enc":"A128GCM"})"), &resp);
  EXPECT_NE(s.error_message().find("is not the alg of ring"), std::string::npos)
      << s.error_message();
  s = Decrypt(*daemon_, "enc/rsa-oaep", std::string(2 * 1024 * 1024, 'a'), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(DecryptionTest, ZipIsRefusedUnlessTheRingEnablesIt) {
  const std::string big(10000, 'z');
  std::vector<std::string> env = {R"(JWE_EXTRA_HEADER={"zip":"DEF"})"};
  std::string jwe = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/ecdh-es"}), Kid("enc/ecdh-es"),
                                    "ECDH-ES", big, {"A256GCM"}, env)[0];
  custody::v1::DecryptJweResponse resp;
  grpc::Status s = Decrypt(*daemon_, "enc/ecdh-es", jwe, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("zip"), std::string::npos) << s.error_message();

  ASSERT_TRUE(CreateDecryptRing(*daemon_, "enc/zip", "ECDH-ES", "P-256", 20000).ok());
  std::string kid = GetRing(*daemon_, "enc/zip").versions(0).kid();
  jwe = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/zip"}), kid, "ECDH-ES", big, {"A256GCM"},
                        env)[0];
  s = Decrypt(*daemon_, "enc/zip", jwe, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.plaintext(), big);
  ASSERT_TRUE(CreateDecryptRing(*daemon_, "enc/zip-small", "ECDH-ES", "P-256", 5000).ok());
  kid = GetRing(*daemon_, "enc/zip-small").versions(0).kid();
  jwe = ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/zip-small"}), kid, "ECDH-ES", big,
                        {"A256GCM"}, env)[0];
  s = Decrypt(*daemon_, "enc/zip-small", jwe, &resp);
  EXPECT_EQ(s.error_message(), "decryption failed") << "over the decompressed-size limit";
}

TEST_F(DecryptionTest, PublishedVectorsDecryptWithImportedKeysKeepingTheirKid) {
  auto doc = jose::ParseJson(ReadFileOrDie(SourceDir() + "/tests/data/jwe_vectors.json"),
                             {.max_bytes = 1 << 20, .max_depth = 16});
  ASSERT_TRUE(doc.ok()) << doc.status();
  int i = 0;
  for (const jose::Json& v : doc->Find("vectors")->as_array()) {
    std::string name = "vectors/v" + std::to_string(i++);
    const jose::Json* curve = v.Find("curve");
    custody::v1::KeyRing ring;
    grpc::Status s =
        CreateDecryptRing(*daemon_, name, v.Find("alg")->as_string(),
                          curve ? curve->as_string() : "", 0, v.Find("key")->Serialize(), &ring);
    ASSERT_TRUE(s.ok()) << v.Find("name")->as_string() << ": " << s.error_message();
    const jose::Json* kid = v.Find("key")->Find("kid");
    if (kid != nullptr) {
      EXPECT_EQ(ring.versions(0).kid(), kid->as_string());
    }
    custody::v1::DecryptJweResponse resp;
    s = Decrypt(*daemon_, name, v.Find("compact")->as_string(), &resp);
    ASSERT_TRUE(s.ok()) << v.Find("name")->as_string() << ": " << s.error_message();
    EXPECT_EQ(resp.plaintext(), v.Find("plaintext")->as_string()) << v.Find("name")->as_string();
  }
}

TEST_F(DecryptionTest, RingsKeepToTheirPurpose) {
  custody::v1::SignJwsRequest req;
  req.set_ring("enc/ecdh-es");
  req.set_payload("x");
  custody::v1::SignJwsResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = daemon_->signer().SignJws(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(DecryptionTest, ImportedVersionIsPublishedPendingAndDecryptsWithoutKid) {
  // A key generated by jwcrypto, imported as version 2 of an existing ring.
  CommandResult key = RunCommand({"/usr/bin/python3", "-c",
                                  "from jwcrypto import jwk; print(jwk.JWK.generate(kty='EC', "
                                  "crv='P-256').export_private())"});
  ASSERT_EQ(key.exit_code, 0) << key.err;
  ASSERT_TRUE(CreateDecryptRing(*daemon_, "enc/imported", "ECDH-ES+A128KW", "P-256").ok());
  custody::v1::ImportKeyVersionRequest req;
  req.set_ring("enc/imported");
  req.mutable_key()->set_private_jwk(key.out);
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  grpc::Status s = daemon_->admin().ImportKeyVersion(&ctx, req, &ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(ring.versions_size(), 2);
  EXPECT_EQ(ring.versions(1).state(), custody::v1::PENDING);
  EXPECT_EQ(ring.active_version(), 1u);
  auto jwks = jose::ParseJson(Jwks(*daemon_, {"enc/imported"}));
  ASSERT_EQ(jwks->Find("keys")->as_array().size(), 2u);
  EXPECT_EQ(jwks->Find("keys")->as_array()[0].Find("kid")->as_string(), ring.versions(0).kid())
      << "the ACTIVE key must be listed first";
  // Encrypted by jwcrypto to the imported key, kid removed: custodyd tries each key.
  std::string jwe =
      ExternalEncrypt("jwcrypto", Jwks(*daemon_, {"enc/imported"}), ring.versions(1).kid(),
                      "ECDH-ES+A128KW", "to v2", {"A128GCM"})[0];
  // And one made by the client library to the v2 JWK with its kid removed.
  client::EncryptOptions options;
  options.enc = jose::JweEnc::kA128Gcm;
  jose::Json v2 = jwks->Find("keys")->as_array()[1];
  jose::Json v2_no_kid = jose::Json::MakeObject();
  for (const auto& [k, v] : v2.as_object()) {
    if (k != "kid") v2_no_kid.Set(k, v);
  }
  auto to_v2 = client::EncryptToJwk("to v2", v2_no_kid.Serialize(), options);
  ASSERT_TRUE(to_v2.ok()) << to_v2.status();
  custody::v1::DecryptJweResponse resp;
  s = Decrypt(*daemon_, "enc/imported", *to_v2, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.plaintext(), "to v2");
  EXPECT_EQ(resp.version(), 2u);
  s = Decrypt(*daemon_, "enc/imported", jwe, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.version(), 2u);
  // A key that does not fit the ring (P-384 into a P-256 ring) is refused.
  CommandResult p384 = RunCommand({"/usr/bin/python3", "-c",
                                   "from jwcrypto import jwk; print(jwk.JWK.generate(kty='EC', "
                                   "crv='P-384').export_private())"});
  req.mutable_key()->set_private_jwk(p384.out);
  grpc::ClientContext ctx2;
  s = daemon_->admin().ImportKeyVersion(&ctx2, req, &ring);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("does not fit"), std::string::npos) << s.error_message();
}

TEST_F(DecryptionTest, ImportedSigningKeySignsAndStaysInsideTheToken) {
  CommandResult key = RunCommand(
      {"/usr/bin/python3", "-c",
       "from jwcrypto import jwk; k=jwk.JWK.generate(kty='RSA', size=2048, kid='legacy-op-1');"
       "print(k.export_private()); print(k.export_public())"});
  ASSERT_EQ(key.exit_code, 0) << key.err;
  std::vector<std::string> lines = Lines(key.out);
  ASSERT_EQ(lines.size(), 2u);
  custody::v1::CreateKeyRingRequest req;
  req.set_name("op/migrated");
  req.set_purpose(custody::v1::SIGN);
  req.set_alg("PS256");
  req.mutable_import_key()->set_private_jwk(lines[0]);
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  grpc::Status s = daemon_->admin().CreateKeyRing(&ctx, req, &ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(ring.versions(0).kid(), "legacy-op-1");
  custody::v1::SignJwsRequest sign;
  sign.set_ring("op/migrated");
  sign.set_payload("{\"sub\":\"migrated\"}");
  custody::v1::SignJwsResponse jws;
  grpc::ClientContext ctx2;
  ASSERT_TRUE(daemon_->signer().SignJws(&ctx2, sign, &jws).ok());
  // Verified against the ORIGINAL public key, as a relying party holding the old JWKS would.
  std::string original_jwks = "{\"keys\":[" + lines[1] + "]}";
  TempDir d;
  WriteFileOrDie(d.path() + "/jwks.json", original_jwks);
  WriteFileOrDie(d.path() + "/jws", jws.jws());
  CommandResult v = RunCommand(
      {"/usr/bin/python3", "-c",
       "import sys\nfrom jwcrypto import jwk, jws\n"
       "ks=jwk.JWKSet.from_json(open(sys.argv[1]).read()); t=jws.JWS(); "
       "t.deserialize(open(sys.argv[2]).read()); t.verify(ks.get_key('legacy-op-1'), alg='PS256');"
       "print(t.payload.decode())",
       d.path() + "/jwks.json", d.path() + "/jws"});
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_EQ(v.out, "{\"sub\":\"migrated\"}\n");
  // The imported private key is sensitive and not extractable, as pkcs11-tool reads it.
  std::string state = dir_->path() + "/state";
  CommandResult objects =
      RunCommand({"pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label",
                  "custody", "--login", "--pin", ReadFileOrDie(state + "/pin"), "--list-objects",
                  "--type", "privkey", "--label", "custody/op/migrated/v1"},
                 "", {"SOFTHSM2_CONF=" + state + "/softhsm2.conf"});
  ASSERT_EQ(objects.exit_code, 0) << objects.err;
  size_t access = objects.out.find("Access:");
  ASSERT_NE(access, std::string::npos) << objects.out;
  std::string line = objects.out.substr(access, objects.out.find('\n', access) - access);
  EXPECT_NE(line.find("sensitive"), std::string::npos) << line;
  EXPECT_TRUE(line.find("extractable") == std::string::npos ||
              line.find("never extractable") != std::string::npos)
      << line;
}

TEST_F(DecryptionTest, CustodyctlImportsAndDecryptsFromStdin) {
  std::string ctl = BinDir() + "/custodyctl";
  std::string addr = "--addr=" + daemon_->address();
  TempDir d;
  CommandResult key = RunCommand(
      {"/usr/bin/python3", "-c",
       "from jwcrypto import jwk; print(jwk.JWK.generate(kty='RSA', size=2048).export_private())"});
  WriteFileOrDie(d.path() + "/key.jwk", key.out);
  CommandResult create =
      RunCommand({ctl, addr, "ring", "create", "ctl/enc", "--purpose=decrypt", "--alg=RSA-OAEP-256",
                  "--import_jwk_file=" + d.path() + "/key.jwk"});
  ASSERT_EQ(create.exit_code, 0) << create.err;
  EXPECT_NE(create.out.find("fallback"), std::string::npos) << create.out;
  CommandResult jwks = RunCommand({ctl, addr, "jwks", "ctl/enc"});
  auto parsed = jose::ParseJson(jwks.out);
  ASSERT_TRUE(parsed.ok()) << jwks.out;
  std::string kid = parsed->Find("keys")->as_array()[0].Find("kid")->as_string();
  std::string jwe = ExternalEncrypt("jwcrypto", jwks.out, kid, "RSA-OAEP-256", "plain\nbytes\x01",
                                    {"A256CBC-HS512"})[0];
  CommandResult dec = RunCommand({ctl, addr, "decrypt", "ctl/enc"}, jwe + "\n");
  ASSERT_EQ(dec.exit_code, 0) << dec.err;
  EXPECT_EQ(dec.out, "plain\nbytes\x01");
  CommandResult bad = RunCommand({ctl, addr, "decrypt", "ctl/enc"}, jwe.substr(0, jwe.size() - 3));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("INVALID_ARGUMENT"), std::string::npos) << bad.err;
}

TEST(DecryptionLifecycleTest, DecryptionRingsSurviveRestart) {
  TempDir dir;
  std::string state = dir.path() + "/state";
  std::string jwe;
  {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << d.log();
    ASSERT_TRUE(CreateDecryptRing(d, "enc/keep", "ECDH-ES+A256KW", "P-521").ok());
    std::string kid = GetRing(d, "enc/keep").versions(0).kid();
    jwe = ExternalEncrypt("npm-jose", Jwks(d, {"enc/keep"}), kid, "ECDH-ES+A256KW", "kept",
                          {"A256GCM"})[0];
    d.Stop();
  }
  Custodyd d(state);
  ASSERT_TRUE(d.started()) << d.log();
  custody::v1::DecryptJweResponse resp;
  grpc::Status s = Decrypt(d, "enc/keep", jwe, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.plaintext(), "kept");
}

}  // namespace
}  // namespace custody::testing
