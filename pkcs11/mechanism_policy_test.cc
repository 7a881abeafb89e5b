// A token whose module forbids raw RSA (CKM_RSA_X_509), as a hardened HSM policy would: custody
// must still sign PS256 and RS256, because it never builds padding itself. SoftHSM2 reads
// slots.mechanisms at C_Initialize, hence this separate process.
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "openssl/evp.h"
#include "openssl/rsa.h"
#include "pkcs11/testing/softhsm_testing.h"
#include "pkcs11/token.h"

namespace custody::pkcs11 {
namespace {

struct PkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};

TEST(MechanismPolicyTest, SignsPs256AndRefusesRawDecryptionWithoutRawRsa) {
  absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> softhsm =
      // SoftHSM2 2.6.1 ignores the first entry of a "-" (deny) list, hence the repetition;
      // a module without that bug reads the same denial twice.
      TemporarySoftHsm::Create("slots.mechanisms = -CKM_RSA_X_509,CKM_RSA_X_509");
  ASSERT_TRUE(softhsm.ok()) << softhsm.status();
  ASSERT_TRUE(Token::InitializeToken(TemporarySoftHsm::ModulePath(), "no-raw-rsa",
                                     Secret("so-pin-1"), Secret("user-pin-1"))
                  .ok());
  Token::Options options;
  options.module_path = TemporarySoftHsm::ModulePath();
  options.selector.label = "no-raw-rsa";
  options.pin = Secret("user-pin-1");
  absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(std::move(options));
  ASSERT_TRUE(token.ok()) << token.status();

  EXPECT_FALSE((*token)->HasMechanism("CKM_RSA_X_509"));
  EXPECT_TRUE((*token)->HasMechanism("CKM_RSA_PKCS_PSS"));

  absl::StatusOr<std::shared_ptr<KeyPair>> key =
      (*token)->GenerateKeyPair(KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "ps256", "ps");
  ASSERT_TRUE(key.ok()) << key.status();
  unsigned char digest[32];
  unsigned int digest_size = 0;
  const std::string message = "eyJhbGciOiJQUzI1NiJ9.e30";
  ASSERT_EQ(EVP_Digest(message.data(), message.size(), digest, &digest_size, EVP_sha256(), nullptr),
            1);
  absl::StatusOr<std::string> signature = (*token)->Sign(
      **key, SignScheme::kRsaPssSha256, std::string_view(reinterpret_cast<char*>(digest), 32));
  ASSERT_TRUE(signature.ok()) << signature.status();

  absl::StatusOr<EvpPkeyPtr> public_key = (*token)->PublicKey(**key);
  ASSERT_TRUE(public_key.ok()) << public_key.status();
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, public_key->get(), nullptr));
  ASSERT_EQ(EVP_PKEY_verify_init(ctx.get()), 1);
  ASSERT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING), 1);
  ASSERT_EQ(EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()), 1);
  ASSERT_EQ(EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), EVP_sha256()), 1);
  ASSERT_EQ(EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), 32), 1);
  EXPECT_EQ(EVP_PKEY_verify(ctx.get(), reinterpret_cast<const unsigned char*>(signature->data()),
                            signature->size(), digest, 32),
            1);

  // Without CKM_RSA_X_509 there is no software-OAEP fallback: UNIMPLEMENTED, and OAEP with
  // SHA-1 in the token is still there.
  absl::StatusOr<std::shared_ptr<KeyPair>> decryption_key = (*token)->GenerateKeyPair(
      KeySpec{.type = KeyType::kRsa, .rsa_bits = 2048}, "rsa-dec", "d", /*for_decryption=*/true);
  ASSERT_TRUE(decryption_key.ok()) << decryption_key.status();
  EXPECT_EQ((*token)->DecryptRsaRaw(**decryption_key, std::string(256, '\x01')).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_TRUE((*token)->OaepSupported(OaepHash::kSha1));
  token->reset();  // before the SoftHSM2 directory goes away
}

}  // namespace
}  // namespace custody::pkcs11
