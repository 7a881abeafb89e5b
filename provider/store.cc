// The store loader for custody: URIs. One URI yields the ring version's key (its public half from
// custodyd's GetPublicKey, bound to the ring and that version for signing), then the version's
// certificate chain (leaf first) when one was set: both from the same GetPublicKey answer, so a
// key and a certificate loaded together always belong to the same version.
#include "openssl/store.h"

#include <unistd.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/openssl_ptr.h"
#include "openssl/core_names.h"
#include "openssl/core_object.h"
#include "openssl/err.h"
#include "openssl/params.h"
#include "openssl/pem.h"
#include "openssl/x509.h"
#include "provider/provider.h"
#include "provider/uri.h"

namespace custody::provider {
namespace {

// The key of a parsed URI and the version's PEM certificate chain; errors raised.
absl::StatusOr<std::pair<CustodyKey, std::string>> LoadCustodyKey(ProviderContext* provider,
                                                                  const CustodyUri& uri,
                                                                  const char* func) {
  auto fail = [&](const absl::Status& s) {
    provider->RaiseStatus(s, func);
    return s;
  };
  auto client = provider->ClientFor(uri.address);
  if (!client.ok()) return fail(client.status());
  auto key = (*client)->GetPublicKey(uri.ring, uri.version);
  if (!key.ok()) return fail(key.status());
  if (key->purpose() != custody::v1::SIGN) {
    return fail(absl::FailedPreconditionError(absl::StrCat(
        "ring '", uri.ring,
        "' is a DECRYPT ring: the custody provider signs only (TLS key exchange is ECDHE)")));
  }
  auto pub = PublicKeyFromJwk(provider->libctx(), key->public_jwk());
  if (!pub.ok()) return fail(pub.status());
  CustodyKey custody_key;
  custody_key.provider = provider;
  custody_key.type = KeyTypeOf(pub->get());
  custody_key.pub = *std::move(pub);
  custody_key.client = *client;
  custody_key.client_pid = getpid();
  custody_key.address = uri.address;
  custody_key.ring = uri.ring;
  custody_key.version = key->version();
  custody_key.alg = key->alg();
  return std::make_pair(std::move(custody_key), key->certificate_chain());
}

struct StoreContext {
  ProviderContext* provider = nullptr;
  CustodyUri uri;
  bool key_loaded = false;
  std::vector<std::string> certificates;  // DER, leaf first; handed out after the key
  size_t next_certificate = 0;
  bool done = false;
};

// PEM chain → DER certificates (custodyd checked the chain when it was set).
std::vector<std::string> DerCertificates(const std::string& pem) {
  std::vector<std::string> out;
  if (pem.empty()) return out;
  OpensslPtr<BIO> bio(BIO_new_mem_buf(pem.data(), pem.size()));
  while (bio != nullptr) {
    OpensslPtr<X509> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (cert == nullptr) break;
    unsigned char* der = nullptr;
    const int len = i2d_X509(cert.get(), &der);
    if (len <= 0) break;
    out.emplace_back(reinterpret_cast<const char*>(der), static_cast<size_t>(len));
    OPENSSL_free(der);
  }
  ERR_clear_error();  // the end of the PEM data
  return out;
}

int LoadCertificate(StoreContext* ctx, OSSL_CALLBACK* object_cb, void* object_cbarg) {
  std::string& der = ctx->certificates[ctx->next_certificate++];
  ctx->done = ctx->next_certificate >= ctx->certificates.size();
  int object_type = OSSL_OBJECT_CERT;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
      OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                       const_cast<char*>("CERTIFICATE"), 0),
      OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, der.data(), der.size()),
      OSSL_PARAM_construct_end()};
  return object_cb(params, object_cbarg);
}

void* OpenStore(void* provctx, const char* uri) {
  auto* provider = static_cast<ProviderContext*>(provctx);
  auto parsed = ParseCustodyUri(uri == nullptr ? "" : uri);
  if (!parsed.ok()) {
    provider->Raise(kReasonBadUri, "open",
                    absl::StrCat("custody: INVALID_ARGUMENT: ", parsed.status().message()));
    return nullptr;
  }
  auto* ctx = new StoreContext;
  ctx->provider = provider;
  ctx->uri = *std::move(parsed);
  return ctx;
}

const OSSL_PARAM* SettableStoreParams(void*) {
  static const OSSL_PARAM kParams[] = {OSSL_PARAM_int(OSSL_STORE_PARAM_EXPECT, nullptr),
                                       OSSL_PARAM_END};
  return kParams;
}

// Only keys live behind a custody: URI; what the caller expects is checked by OSSL_STORE.
int SetStoreParams(void*, const OSSL_PARAM[]) { return 1; }

int LoadStore(void* loaderctx, OSSL_CALLBACK* object_cb, void* object_cbarg,
              OSSL_PASSPHRASE_CALLBACK*, void*) {
  auto* ctx = static_cast<StoreContext*>(loaderctx);
  if (ctx->key_loaded) {
    if (ctx->next_certificate >= ctx->certificates.size()) return 0;
    return LoadCertificate(ctx, object_cb, object_cbarg);
  }
  ctx->key_loaded = true;
  ctx->done = true;  // unless certificates follow
  auto key = LoadCustodyKey(ctx->provider, ctx->uri, "load");
  if (!key.ok()) return 0;  // the reason is on the error queue
  ctx->certificates = DerCertificates(key->second);
  ctx->done = ctx->certificates.empty();
  return PassKey(key->first, object_cb, object_cbarg);
}

int StoreEof(void* loaderctx) { return static_cast<StoreContext*>(loaderctx)->done ? 1 : 0; }

int CloseStore(void* loaderctx) {
  delete static_cast<StoreContext*>(loaderctx);
  return 1;
}

}  // namespace

absl::StatusOr<CustodyKey> LoadCustodyKey(ProviderContext* provider, const std::string& uri,
                                          const char* func) {
  auto parsed = ParseCustodyUri(uri);
  if (!parsed.ok()) {
    provider->Raise(kReasonBadUri, func,
                    absl::StrCat("custody: INVALID_ARGUMENT: ", parsed.status().message()));
    return parsed.status();
  }
  auto key = LoadCustodyKey(provider, *parsed, func);
  if (!key.ok()) return key.status();
  return std::move(key->first);
}

int PassKey(const CustodyKey& key, OSSL_CALLBACK* object_cb, void* object_cbarg) {
  const CustodyKey* reference = &key;
  int object_type = OSSL_OBJECT_PKEY;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
      OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                       const_cast<char*>(key.type.c_str()), 0),
      OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &reference, sizeof(reference)),
      OSSL_PARAM_construct_end()};
  return object_cb(params, object_cbarg);
}

const OSSL_DISPATCH kStoreFunctions[] = {
    {OSSL_FUNC_STORE_OPEN, reinterpret_cast<void (*)()>(OpenStore)},
    {OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, reinterpret_cast<void (*)()>(SettableStoreParams)},
    {OSSL_FUNC_STORE_SET_CTX_PARAMS, reinterpret_cast<void (*)()>(SetStoreParams)},
    {OSSL_FUNC_STORE_LOAD, reinterpret_cast<void (*)()>(LoadStore)},
    {OSSL_FUNC_STORE_EOF, reinterpret_cast<void (*)()>(StoreEof)},
    {OSSL_FUNC_STORE_CLOSE, reinterpret_cast<void (*)()>(CloseStore)},
    {0, nullptr}};

}  // namespace custody::provider
