// One registration of custody's protobuf types: custody.so (the OpenSSL provider) carries no
// copy of them but uses the shared libcustody_proto, the copy custodyd and the client library
// use. So custodyd starts with an openssl.cnf that loads the provider (it aborted with "File
// already exists in database: custody/v1/custody.proto"), and this program, which links the
// client library, loads the provider into its own process and signs through both.
#include <memory>
#include <string>

#include "client/client.h"
#include "gtest/gtest.h"
#include "openssl/core_names.h"
#include "openssl/err.h"
#include "openssl/evp.h"
#include "openssl/provider.h"
#include "openssl/store.h"
#include "openssl/x509.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;

std::string OpenSslErrors() {
  std::string out;
  for (unsigned long e = ERR_get_error(); e != 0; e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    out += std::string(buf) + "\n";
  }
  return out;
}

grpc::Status CreateEs256(Custodyd& d, const std::string& name) {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(v1::SIGN);
  req.set_alg("ES256");
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::KeyRing ring;
  return d.admin().CreateKeyRing(&ctx, req, &ring);
}

// Signs and checks the JWS against the JWKS with tests/independent_jws (OpenSSL EVP).
void SignAndVerify(const client::Client& client, const std::string& ring) {
  auto jws = client.SignJws(ring, "through the client library");
  ASSERT_TRUE(jws.ok()) << jws.status();
  auto jwks = client.GetJwks({ring});
  ASSERT_TRUE(jwks.ok()) << jwks.status();
  std::string error;
  JwsKeys keys = JwsKeysOf(jwks->jwks, &error);
  ASSERT_EQ(error, "");
  std::string payload;
  EXPECT_EQ(VerifyJws(keys, jws->jws, nullptr, &payload), "");
  EXPECT_EQ(payload, "through the client library");
}

std::unique_ptr<client::Client> ClientOf(Custodyd& d) {
  client::ChannelOptions channel;
  channel.address = d.address();
  auto c = client::Client::Connect(channel);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

TEST(ProviderInProcessTest, CustodydStartsWithTheProviderInOpensslCnf) {
  TempDir dir;
  const std::string cnf = dir.path() + "/openssl.cnf";
  // docs/provider.md's snippet "for every application", default listed first.
  WriteFileOrDie(cnf, std::string("openssl_conf = openssl_init\n"
                                  "[openssl_init]\nproviders = provider_sect\n"
                                  "[provider_sect]\ndefault = default_sect\n"
                                  "custody = custody_sect\n"
                                  "[default_sect]\nactivate = 1\n"
                                  "[custody_sect]\nmodule = ") +
                          CUSTODY_PROVIDER_MODULE + "\naddr = unix:" + dir.path() +
                          "/custodyd.sock\nactivate = 1\n");
  TempDir state;
  Custodyd d(state.path(), {}, Custodyd::Environment{{"OPENSSL_CONF=" + cnf}});
  ASSERT_TRUE(d.started()) << d.log();
  ASSERT_TRUE(CreateEs256(d, "op/id-token").ok());
  auto client = ClientOf(d);
  ASSERT_NE(client, nullptr);
  SignAndVerify(*client, "op/id-token");
}

TEST(ProviderInProcessTest, ClientLibraryAndProviderShareOneProcess) {
  TempDir state;
  Custodyd d(state.path());
  ASSERT_TRUE(d.started()) << d.log();
  ASSERT_TRUE(CreateEs256(d, "tls/key").ok());
  auto client = ClientOf(d);
  ASSERT_NE(client, nullptr);
  SignAndVerify(*client, "tls/key");

  // custody.so into this process (which holds the client library and custody's messages).
  std::unique_ptr<OSSL_LIB_CTX, decltype(&OSSL_LIB_CTX_free)> libctx(OSSL_LIB_CTX_new(),
                                                                     &OSSL_LIB_CTX_free);
  const std::string module = CUSTODY_PROVIDER_MODULE;
  ASSERT_EQ(OSSL_PROVIDER_set_default_search_path(libctx.get(),
                                                  module.substr(0, module.rfind('/')).c_str()),
            1);
  OSSL_PROVIDER* custody = OSSL_PROVIDER_load(libctx.get(), "custody");
  ASSERT_NE(custody, nullptr) << OpenSslErrors();
  OSSL_PROVIDER* defaults = OSSL_PROVIDER_load(libctx.get(), "default");
  ASSERT_NE(defaults, nullptr) << OpenSslErrors();
  ASSERT_EQ(EVP_set_default_properties(libctx.get(), "?provider=default"), 1);

  const std::string uri = "custody:ring=tls/key;addr=" + d.address();
  OSSL_STORE_CTX* store = OSSL_STORE_open_ex(uri.c_str(), libctx.get(), nullptr, nullptr, nullptr,
                                             nullptr, nullptr, nullptr);
  ASSERT_NE(store, nullptr) << OpenSslErrors();
  EVP_PKEY* key = nullptr;
  while (key == nullptr && !OSSL_STORE_eof(store)) {
    OSSL_STORE_INFO* info = OSSL_STORE_load(store);
    if (info == nullptr) break;
    if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) {
      key = OSSL_STORE_INFO_get1_PKEY(info);
    }
    OSSL_STORE_INFO_free(info);
  }
  OSSL_STORE_close(store);
  ASSERT_NE(key, nullptr) << OpenSslErrors();
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> owned_key(key, &EVP_PKEY_free);

  // A signature made by custodyd through the provider...
  const std::string message = "through the provider";
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> sign(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  ASSERT_EQ(
      EVP_DigestSignInit_ex(sign.get(), nullptr, "SHA256", libctx.get(), nullptr, key, nullptr), 1)
      << OpenSslErrors();
  size_t length = 0;
  const auto* data = reinterpret_cast<const unsigned char*>(message.data());
  ASSERT_EQ(EVP_DigestSign(sign.get(), nullptr, &length, data, message.size()), 1)
      << OpenSslErrors();
  std::string signature(length, '\0');
  ASSERT_EQ(EVP_DigestSign(sign.get(), reinterpret_cast<unsigned char*>(signature.data()), &length,
                           data, message.size()),
            1)
      << OpenSslErrors();
  signature.resize(length);

  // ...verifies with the public key in OpenSSL's default provider.
  unsigned char* der = nullptr;
  const int der_length = i2d_PUBKEY(key, &der);
  ASSERT_GT(der_length, 0) << OpenSslErrors();
  const unsigned char* p = der;
  EVP_PKEY* verify_key = d2i_PUBKEY(nullptr, &p, der_length);
  OPENSSL_free(der);
  ASSERT_NE(verify_key, nullptr) << OpenSslErrors();
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> owned_verify(verify_key, &EVP_PKEY_free);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> verify(EVP_MD_CTX_new(),
                                                                 &EVP_MD_CTX_free);
  ASSERT_EQ(EVP_DigestVerifyInit(verify.get(), nullptr, EVP_sha256(), nullptr, verify_key), 1);
  EXPECT_EQ(EVP_DigestVerify(verify.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                             signature.size(), data, message.size()),
            1)
      << OpenSslErrors();

  // And the client library still works beside it.
  SignAndVerify(*client, "tls/key");
  owned_key.reset();
  OSSL_PROVIDER_unload(custody);
  OSSL_PROVIDER_unload(defaults);
}

}  // namespace
}  // namespace custody::testing
