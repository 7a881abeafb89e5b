// The store loader for custody: URIs. One URI yields one object: the ring version's key (its
// public half from custodyd's GetPublicKey, bound to the ring for signing).
#include "openssl/store.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "openssl/core_names.h"
#include "openssl/core_object.h"
#include "openssl/params.h"
#include "provider/provider.h"
#include "provider/uri.h"

namespace custody::provider {
namespace {

struct StoreContext {
  ProviderContext* provider;
  CustodyUri uri;
  bool done = false;
};

void* OpenStore(void* provctx, const char* uri) {
  auto* provider = static_cast<ProviderContext*>(provctx);
  auto parsed = ParseCustodyUri(uri == nullptr ? "" : uri);
  if (!parsed.ok()) {
    provider->Raise(kReasonBadUri, "open",
                    absl::StrCat("custody: INVALID_ARGUMENT: ", parsed.status().message()));
    return nullptr;
  }
  return new StoreContext{provider, *std::move(parsed)};
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
  ctx->done = true;
  ProviderContext* provider = ctx->provider;
  auto client = provider->ClientFor(ctx->uri.address);
  if (!client.ok()) {
    provider->RaiseStatus(client.status(), "load");
    return 0;
  }
  auto key = (*client)->GetPublicKey(ctx->uri.ring, ctx->uri.version);
  if (!key.ok()) {
    provider->RaiseStatus(key.status(), "load");
    return 0;
  }
  if (key->purpose() != custody::v1::SIGN) {
    provider->RaiseStatus(
        absl::FailedPreconditionError(absl::StrCat(
            "ring '", ctx->uri.ring,
            "' is a DECRYPT ring: the custody provider signs only (TLS key exchange is ECDHE)")),
        "load");
    return 0;
  }
  auto pub = PublicKeyFromJwk(provider->libctx(), key->public_jwk());
  if (!pub.ok()) {
    provider->RaiseStatus(pub.status(), "load");
    return 0;
  }
  CustodyKey custody_key;
  custody_key.provider = provider;
  custody_key.type = KeyTypeOf(pub->get());
  custody_key.pub = *std::move(pub);
  custody_key.client = *client;
  custody_key.ring = ctx->uri.ring;
  custody_key.version = key->version();
  custody_key.alg = key->alg();

  const CustodyKey* reference = &custody_key;
  int object_type = OSSL_OBJECT_PKEY;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
      OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                       const_cast<char*>(custody_key.type.c_str()), 0),
      OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &reference, sizeof(reference)),
      OSSL_PARAM_construct_end()};
  return object_cb(params, object_cbarg);
}

int StoreEof(void* loaderctx) { return static_cast<StoreContext*>(loaderctx)->done ? 1 : 0; }

int CloseStore(void* loaderctx) {
  delete static_cast<StoreContext*>(loaderctx);
  return 1;
}

}  // namespace

const OSSL_DISPATCH kStoreFunctions[] = {
    {OSSL_FUNC_STORE_OPEN, reinterpret_cast<void (*)()>(OpenStore)},
    {OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, reinterpret_cast<void (*)()>(SettableStoreParams)},
    {OSSL_FUNC_STORE_SET_CTX_PARAMS, reinterpret_cast<void (*)()>(SetStoreParams)},
    {OSSL_FUNC_STORE_LOAD, reinterpret_cast<void (*)()>(LoadStore)},
    {OSSL_FUNC_STORE_EOF, reinterpret_cast<void (*)()>(StoreEof)},
    {OSSL_FUNC_STORE_CLOSE, reinterpret_cast<void (*)()>(CloseStore)},
    {0, nullptr}};

}  // namespace custody::provider
