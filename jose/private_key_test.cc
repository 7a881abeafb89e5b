#include "jose/private_key.h"

#include <cstdio>
#include <string>

#include "gtest/gtest.h"
#include "jose/json.h"

namespace custody::jose {
namespace {

// Private keys made by python3-jwcrypto (an independent JOSE stack): the JWK and the same key as
// PKCS#8 PEM, separated by a line "--".
struct KeyPair {
  std::string jwk;
  std::string pem;
};

KeyPair JwcryptoKey(const std::string& generate_args) {
  std::string cmd = "/usr/bin/python3 -c \"from jwcrypto import jwk; k=jwk.JWK.generate(" +
                    generate_args +
                    "); print(k.export_private()); print('--'); "
                    "print(k.export_to_pem(private_key=True, password=None).decode())\"";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while (p != nullptr && (n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  if (p != nullptr) pclose(p);
  size_t sep = out.find("\n--\n");
  if (sep == std::string::npos) return {};
  return {out.substr(0, sep), out.substr(sep + 4)};
}

class PrivateKeyTest : public ::testing::TestWithParam<std::string> {};

TEST_P(PrivateKeyTest, JwkAndPemOfTheSameKeyGiveEqualKeys) {
  KeyPair key = JwcryptoKey(GetParam());
  ASSERT_FALSE(key.jwk.empty()) << "jwcrypto did not produce a key";
  auto json = ParseJson(key.jwk);
  ASSERT_TRUE(json.ok()) << json.status();
  auto from_jwk = PrivateKeyFromJwk(*json);
  ASSERT_TRUE(from_jwk.ok()) << from_jwk.status();
  auto from_pem = PrivateKeyFromPem(key.pem);
  ASSERT_TRUE(from_pem.ok()) << from_pem.status();
  EXPECT_EQ(EVP_PKEY_eq(from_jwk->get(), from_pem->get()), 1);
}

INSTANTIATE_TEST_SUITE_P(KeyTypes, PrivateKeyTest,
                         ::testing::Values("kty='RSA', size=2048", "kty='EC', crv='P-256'",
                                           "kty='EC', crv='P-384'", "kty='EC', crv='P-521'",
                                           "kty='OKP', crv='Ed25519'"));

TEST(PrivateKeyFromJwkTest, RefusesPrivatePartOfAnotherKey) {
  auto a = ParseJson(JwcryptoKey("kty='EC', crv='P-256'").jwk);
  auto b = ParseJson(JwcryptoKey("kty='EC', crv='P-256'").jwk);
  ASSERT_TRUE(a.ok() && b.ok());
  a->Set("d", *b->Find("d"));
  auto key = PrivateKeyFromJwk(*a);
  EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PrivateKeyFromJwkTest, RefusesEd25519WithForeignPublicKey) {
  auto a = ParseJson(JwcryptoKey("kty='OKP', crv='Ed25519'").jwk);
  auto b = ParseJson(JwcryptoKey("kty='OKP', crv='Ed25519'").jwk);
  ASSERT_TRUE(a.ok() && b.ok());
  a->Set("x", *b->Find("x"));
  EXPECT_EQ(PrivateKeyFromJwk(*a).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PrivateKeyFromJwkTest, RefusesPublicKeysAndMissingCrtMembersNamingThem) {
  auto rsa = ParseJson(JwcryptoKey("kty='RSA', size=2048").jwk);
  ASSERT_TRUE(rsa.ok());
  Json no_qi = Json::MakeObject();
  for (const auto& [k, v] : rsa->as_object()) {
    if (k != "qi") no_qi.Set(k, v);
  }
  auto s = PrivateKeyFromJwk(no_qi).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("\"qi\""), absl::string_view::npos) << s.message();
  Json pub = Json::MakeObject();
  for (const auto& [k, v] : rsa->as_object()) {
    if (k == "kty" || k == "n" || k == "e") pub.Set(k, v);
  }
  s = PrivateKeyFromJwk(pub).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("\"d\""), absl::string_view::npos) << s.message();
}

TEST(PrivateKeyFromPemTest, RefusesEncryptedAndGarbagePem) {
  EXPECT_EQ(PrivateKeyFromPem("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PrivateKeyFromPem("not a pem").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace custody::jose
