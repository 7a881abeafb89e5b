// Key management for custody keys: a public half (EVP_PKEY in the private library context) plus
// the ring it lives in. The private key is never here: export of private parts and private
// imports are refused, which is also what makes OpenSSL use this provider's signature
// operations for these keys (an export to another provider's key management fails).
#include <cstring>
#include <memory>

#include "common/openssl_ptr.h"
#include "openssl/core_names.h"
#include "openssl/core_object.h"
#include "openssl/params.h"
#include "provider/param_table.h"
#include "provider/provider.h"

namespace custody::provider {
namespace {

template <const char* kType>
void* NewKey(void* provctx) {
  auto* key = new CustodyKey;
  key->provider = static_cast<ProviderContext*>(provctx);
  key->type = kType;
  return key;
}

void FreeKey(void* keydata) { delete static_cast<CustodyKey*>(keydata); }

// `reference` is a CustodyKey* made by the store for the duration of its object callback.
void* LoadKey(const void* reference, size_t reference_size) {
  if (reference == nullptr || reference_size != sizeof(CustodyKey*)) return nullptr;
  const CustodyKey* source = nullptr;
  std::memcpy(&source, reference, sizeof(source));
  return new CustodyKey(*source);
}

int HasKey(const void* keydata, int selection) {
  const auto* key = static_cast<const CustodyKey*>(keydata);
  if (key == nullptr) return 0;
  if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0 && key->pub == nullptr) return 0;
  // "Has a private key": the key is bound to a custody ring, whose private key custodyd uses.
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 && key->client == nullptr) return 0;
  return 1;
}

int MatchKeys(const void* a, const void* b, int selection) {
  const auto* ka = static_cast<const CustodyKey*>(a);
  const auto* kb = static_cast<const CustodyKey*>(b);
  if (ka->pub == nullptr || kb->pub == nullptr) return 0;
  if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0) {
    return EVP_PKEY_eq(ka->pub.get(), kb->pub.get()) == 1 ? 1 : 0;
  }
  return EVP_PKEY_parameters_eq(ka->pub.get(), kb->pub.get()) == 1 ? 1 : 0;
}

// Public keys only (a certificate's key, for comparisons): anything carrying a private
// component is refused, custody keys are never made from key material in the application.
int ImportKey(void* keydata, int selection, const OSSL_PARAM params[]) {
  auto* key = static_cast<CustodyKey*>(keydata);
  for (const char* secret : {OSSL_PKEY_PARAM_PRIV_KEY, OSSL_PKEY_PARAM_RSA_D}) {
    if (OSSL_PARAM_locate_const(params, secret) != nullptr) {
      key->provider->Raise(kReasonUnsupported, "import",
                           "custody: private keys cannot be imported into the custody "
                           "provider; import them into custodyd (custodyctl import)");
      return 0;
    }
  }
  if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0) return 0;
  OpensslPtr<EVP_PKEY_CTX> ctx(
      EVP_PKEY_CTX_new_from_name(key->provider->libctx(), key->type.c_str(), nullptr));
  EVP_PKEY* pkey = nullptr;
  if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, const_cast<OSSL_PARAM*>(params)) !=
          1) {
    return 0;
  }
  key->pub = PkeyPtr(pkey, EVP_PKEY_free);
  return 1;
}

int ExportKey(void* keydata, int selection, OSSL_CALLBACK* callback, void* cbarg) {
  auto* key = static_cast<CustodyKey*>(keydata);
  if (key->pub == nullptr || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0) return 0;
  return EVP_PKEY_export(key->pub.get(), selection, callback, cbarg);
}

// The key parameters the tables below are made of.
constexpr ParamGroup<3> kKeySizes = {
    {Int(OSSL_PKEY_PARAM_BITS), Int(OSSL_PKEY_PARAM_SECURITY_BITS), Int(OSSL_PKEY_PARAM_MAX_SIZE)}};
constexpr ParamGroup<1> kDefaultDigest = {{Utf8(OSSL_PKEY_PARAM_DEFAULT_DIGEST)}};
constexpr ParamGroup<1> kMandatoryDigest = {{Utf8(OSSL_PKEY_PARAM_MANDATORY_DIGEST)}};
constexpr ParamGroup<3> kEcGroup = {{Utf8(OSSL_PKEY_PARAM_GROUP_NAME),
                                     Utf8(OSSL_PKEY_PARAM_EC_ENCODING),
                                     Utf8(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT)}};
constexpr ParamGroup<1> kEncodedPublicKey = {{Octets(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY)}};
constexpr ParamGroup<1> kPublicKey = {{Octets(OSSL_PKEY_PARAM_PUB_KEY)}};
constexpr ParamGroup<2> kEcPoint = {
    {BigNum(OSSL_PKEY_PARAM_EC_PUB_X), BigNum(OSSL_PKEY_PARAM_EC_PUB_Y)}};
constexpr ParamGroup<2> kRsaPublic = {
    {BigNum(OSSL_PKEY_PARAM_RSA_N), BigNum(OSSL_PKEY_PARAM_RSA_E)}};

// The table for the key type kType ("EC", "RSA" or Ed25519's).
template <const char* kType>
const OSSL_PARAM* ForKeyType(const OSSL_PARAM* ec, const OSSL_PARAM* rsa, const OSSL_PARAM* ed) {
  const std::string type = kType;
  return type == "EC" ? ec : type == "RSA" ? rsa : ed;
}

template <const char* kType>
const OSSL_PARAM* KeyTypes(int) {
  static constexpr auto kEc = ParamTable(kEcGroup, kPublicKey);
  static constexpr auto kRsa = ParamTable(kRsaPublic);
  static constexpr auto kEd = ParamTable(kPublicKey);
  return ForKeyType<kType>(kEc.data(), kRsa.data(), kEd.data());
}

int GetKeyParams(void* keydata, OSSL_PARAM params[]) {
  auto* key = static_cast<CustodyKey*>(keydata);
  if (key->pub == nullptr) return 0;
  return EVP_PKEY_get_params(key->pub.get(), params);
}

template <const char* kType>
const OSSL_PARAM* GettableKeyParams(void*) {
  static constexpr auto kEc =
      ParamTable(kKeySizes, kDefaultDigest, kEcGroup, kEncodedPublicKey, kPublicKey, kEcPoint);
  static constexpr auto kRsa = ParamTable(kKeySizes, kDefaultDigest, kRsaPublic);
  static constexpr auto kEd =
      ParamTable(kKeySizes, kMandatoryDigest, kEncodedPublicKey, kPublicKey);
  return ForKeyType<kType>(kEc.data(), kRsa.data(), kEd.data());
}

template <const char* kOperation>
const char* QueryOperationName(int) {
  return kOperation;
}

void* DupKey(const void* keydata, int) {
  return new CustodyKey(*static_cast<const CustodyKey*>(keydata));
}

constexpr char kEc[] = "EC";
constexpr char kRsa[] = "RSA";
constexpr char kEd25519[] = "ED25519";
constexpr char kEcdsa[] = "ECDSA";

#define CUSTODY_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }

}  // namespace

#define CUSTODY_KEYMGMT(kType, kOp)                                                                \
  {                                                                                                \
    CUSTODY_FN(OSSL_FUNC_KEYMGMT_NEW, NewKey<kType>), CUSTODY_FN(OSSL_FUNC_KEYMGMT_FREE, FreeKey), \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_LOAD, LoadKey), CUSTODY_FN(OSSL_FUNC_KEYMGMT_HAS, HasKey),    \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_MATCH, MatchKeys),                                            \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_IMPORT, ImportKey),                                           \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_IMPORT_TYPES, KeyTypes<kType>),                               \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_EXPORT, ExportKey),                                           \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_EXPORT_TYPES, KeyTypes<kType>),                               \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_GET_PARAMS, GetKeyParams),                                    \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, GettableKeyParams<kType>),                   \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, QueryOperationName<kOp>),               \
        CUSTODY_FN(OSSL_FUNC_KEYMGMT_DUP, DupKey), {                                               \
      0, nullptr                                                                                   \
    }                                                                                              \
  }

const OSSL_DISPATCH kEcKeyManagement[] = CUSTODY_KEYMGMT(kEc, kEcdsa);
const OSSL_DISPATCH kRsaKeyManagement[] = CUSTODY_KEYMGMT(kRsa, kRsa);
const OSSL_DISPATCH kEd25519KeyManagement[] = CUSTODY_KEYMGMT(kEd25519, kEd25519);

}  // namespace custody::provider
