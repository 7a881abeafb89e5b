// OSSL_provider_init and the provider-wide parts: configuration, the per-address Client,
// errors, JWK → public key.
#include "provider/provider.h"

#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/openssl_ptr.h"
#include "jose/base64url.h"
#include "jose/curves.h"
#include "jose/json.h"
#include "openssl/core_names.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
#include "openssl/provider.h"

namespace custody::provider {
namespace {

std::string ConfigValue(const OSSL_CORE_HANDLE* handle, OSSL_FUNC_core_get_params_fn* get_params,
                        const char* key) {
  if (get_params == nullptr) return "";
  const char* value = nullptr;
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_ptr(key, const_cast<char**>(&value), 0),
                         OSSL_PARAM_construct_end()};
  if (get_params(handle, params) != 1 || value == nullptr) return "";
  return value;
}

}  // namespace

ProviderContext::ProviderContext(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in)
    : handle_(handle) {
  OSSL_FUNC_core_get_params_fn* get_params = nullptr;
  for (const OSSL_DISPATCH* f = in; f != nullptr && f->function_id != 0; ++f) {
    switch (f->function_id) {
      case OSSL_FUNC_CORE_GET_PARAMS:
        get_params = OSSL_FUNC_core_get_params(f);
        break;
      case OSSL_FUNC_CORE_NEW_ERROR:
        new_error_ = OSSL_FUNC_core_new_error(f);
        break;
      case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
        set_error_debug_ = OSSL_FUNC_core_set_error_debug(f);
        break;
      case OSSL_FUNC_CORE_VSET_ERROR:
        vset_error_ = OSSL_FUNC_core_vset_error(f);
        break;
      case OSSL_FUNC_BIO_READ_EX:
        bio_read_ex_ = OSSL_FUNC_BIO_read_ex(f);
        break;
      default:
        break;
    }
  }
  config_.address = ConfigValue(handle, get_params, "addr");
  if (config_.address.empty()) {
    if (const char* env = std::getenv("CUSTODY_ADDR"); env != nullptr) config_.address = env;
  }
  config_.ca_file = ConfigValue(handle, get_params, "ca");
  config_.cert_file = ConfigValue(handle, get_params, "cert");
  config_.key_file = ConfigValue(handle, get_params, "key");
  config_.server_name = ConfigValue(handle, get_params, "server_name");
  std::string deadline = ConfigValue(handle, get_params, "deadline_ms");
  if (deadline.empty()) {
    if (const char* env = std::getenv("CUSTODY_DEADLINE_MS"); env != nullptr) deadline = env;
  }
  int64_t ms = 0;
  if (absl::SimpleAtoi(deadline, &ms) && ms > 0) config_.deadline = absl::Milliseconds(ms);

  libctx_ = OSSL_LIB_CTX_new();
  if (libctx_ != nullptr) default_provider_ = OSSL_PROVIDER_load(libctx_, "default");
}

ProviderContext::~ProviderContext() {
  {
    absl::MutexLock lock(&mu_);
    clients_.clear();
  }
  if (default_provider_ != nullptr) OSSL_PROVIDER_unload(default_provider_);
  OSSL_LIB_CTX_free(libctx_);
}

absl::StatusOr<std::shared_ptr<client::Client>> ProviderContext::ClientFor(
    const std::string& uri_address) {
  const std::string address = uri_address.empty() ? config_.address : uri_address;
  if (address.empty()) {
    return absl::InvalidArgumentError(
        "no custodyd address: give addr= in the URI, addr in the provider's configuration "
        "section, or CUSTODY_ADDR");
  }
  absl::MutexLock lock(&mu_);
  if (clients_pid_ != getpid()) {
    // A fork: the parent's clients (threads, sockets) are unusable here, and destroying them
    // could block on threads that do not exist in this process; they are abandoned.
    if (clients_pid_ != 0) {
      new std::map<std::string, std::shared_ptr<client::Client>>(std::move(clients_));
    }
    clients_.clear();
    clients_pid_ = getpid();
  }
  auto it = clients_.find(address);
  if (it != clients_.end()) return it->second;
  client::ChannelOptions channel;
  channel.address = address;
  channel.ca_file = config_.ca_file;
  channel.cert_file = config_.cert_file;
  channel.key_file = config_.key_file;
  channel.server_name = config_.server_name;
  channel.own_connection = true;  // after a fork: this process's identity, not the parent's
  client::ClientOptions options;
  options.deadline = config_.deadline;
  options.max_rpcs_in_flight = 0;  // Sign is not coalesced; no helper threads needed
  auto c = client::Client::Connect(channel, options);
  if (!c.ok()) return c.status();
  std::shared_ptr<client::Client> shared = *std::move(c);
  clients_.emplace(address, shared);
  return shared;
}

bool ProviderContext::ReadAll(OSSL_CORE_BIO* bio, size_t max, std::string* out) const {
  if (bio_read_ex_ == nullptr) return false;
  out->clear();
  char buf[512];
  while (out->size() < max) {
    size_t n = 0;
    if (bio_read_ex_(bio, buf, std::min(sizeof(buf), max - out->size()), &n) != 1 || n == 0) {
      break;
    }
    out->append(buf, n);
  }
  return true;
}

absl::StatusOr<std::shared_ptr<client::Client>> SigningClient(const CustodyKey& key) {
  if (key.client != nullptr && key.client_pid == getpid()) return key.client;
  return key.provider->ClientFor(key.address);
}

void ProviderContext::Raise(int reason, const char* func, const std::string& message) const {
  if (new_error_ == nullptr || vset_error_ == nullptr) return;
  new_error_(handle_);
  // The file's name only: OpenSSL prints it in every error line, and __FILE__ would carry the
  // build machine's source path.
  if (set_error_debug_ != nullptr) set_error_debug_(handle_, __FILE_NAME__, __LINE__, func);
  // vset_error takes a va_list; build one through a variadic helper.
  struct Va {
    static void Set(OSSL_FUNC_core_vset_error_fn* fn, const OSSL_CORE_HANDLE* h, int r,
                    const char* fmt, ...) {
      va_list args;
      va_start(args, fmt);
      fn(h, r, fmt, args);
      va_end(args);
    }
  };
  Va::Set(vset_error_, handle_, reason, "%s", message.c_str());
}

void ProviderContext::RaiseStatus(const absl::Status& status, const char* func) const {
  Raise(kReasonCustodyCall, func,
        absl::StrCat("custody: ", absl::StatusCodeToString(status.code()), ": ", status.message()));
}

absl::StatusOr<PkeyPtr> PublicKeyFromJwk(OSSL_LIB_CTX* libctx, const std::string& jwk_json) {
  auto jwk = jose::ParseJson(jwk_json);
  if (!jwk.ok() || !jwk->is_object()) return absl::DataLossError("custody returned a bad JWK");
  auto member = [&](const char* name) -> std::string {
    const jose::Json* m = jwk->Find(name);
    return m != nullptr && m->is_string() ? m->as_string() : std::string();
  };
  auto decoded = [&](const char* name) -> absl::StatusOr<std::string> {
    auto d = jose::Base64UrlDecode(member(name));
    if (!d.ok() || d->empty()) {
      return absl::DataLossError(absl::StrCat("JWK member '", name, "' is missing or bad"));
    }
    return d;
  };
  const std::string kty = member("kty");
  OpensslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
  std::string type, group, point;
  OpensslPtr<BIGNUM> n, e;
  if (kty == "EC") {
    const std::string crv = member("crv");
    const jose::EcCurve* curve = jose::CurveByJwkName(crv);
    if (curve == nullptr) return absl::DataLossError(absl::StrCat("unsupported curve '", crv, "'"));
    group = std::string(curve->openssl_name);
    auto x = decoded("x");
    auto y = decoded("y");
    if (!x.ok()) return x.status();
    if (!y.ok()) return y.status();
    point = "\x04" + *x + *y;
    type = "EC";
    OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group.c_str(), 0);
    OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                     point.size());
  } else if (kty == "RSA") {
    auto nb = decoded("n");
    auto eb = decoded("e");
    if (!nb.ok()) return nb.status();
    if (!eb.ok()) return eb.status();
    n.reset(BN_bin2bn(reinterpret_cast<const unsigned char*>(nb->data()), nb->size(), nullptr));
    e.reset(BN_bin2bn(reinterpret_cast<const unsigned char*>(eb->data()), eb->size(), nullptr));
    type = "RSA";
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get());
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get());
  } else if (kty == "OKP" && member("crv") == "Ed25519") {
    auto x = decoded("x");
    if (!x.ok()) return x.status();
    point = *x;
    type = "ED25519";
    OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                     point.size());
  } else {
    return absl::DataLossError(absl::StrCat("unsupported JWK kty '", kty, "'"));
  }
  OpensslPtr<OSSL_PARAM> params(OSSL_PARAM_BLD_to_param(bld.get()));
  OpensslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_name(libctx, type.c_str(), nullptr));
  EVP_PKEY* pkey = nullptr;
  if (params == nullptr || ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    return absl::DataLossError(absl::StrCat("could not build the ", type, " public key"));
  }
  return PkeyPtr(pkey, EVP_PKEY_free);
}

std::string KeyTypeOf(const EVP_PKEY* pkey) {
  if (EVP_PKEY_is_a(pkey, "EC")) return "EC";
  if (EVP_PKEY_is_a(pkey, "RSA")) return "RSA";
  if (EVP_PKEY_is_a(pkey, "ED25519")) return "ED25519";
  return "";
}

namespace {

const OSSL_ALGORITHM kStores[] = {{"custody", "provider=custody", kStoreFunctions,
                                   "custody: URIs (custody:ring=NAME[;version=N][;addr=...])"},
                                  {nullptr, nullptr, nullptr, nullptr}};
const OSSL_ALGORITHM kKeyManagement[] = {
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", "provider=custody", kEcKeyManagement,
     "custody-held EC keys"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", "provider=custody", kRsaKeyManagement,
     "custody-held RSA keys"},
    {"ED25519:1.3.101.112", "provider=custody", kEd25519KeyManagement, "custody-held Ed25519 keys"},
    {nullptr, nullptr, nullptr, nullptr}};
const OSSL_ALGORITHM kSignatures[] = {
    {"ECDSA", "provider=custody", kEcdsaSignature, "ECDSA through custodyd"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", "provider=custody", kRsaSignature,
     "RSA-PSS / PKCS#1 v1.5 through custodyd"},
    {"ED25519:1.3.101.112", "provider=custody", kEd25519Signature, "Ed25519 through custodyd"},
    {nullptr, nullptr, nullptr, nullptr}};

// Key files that hold a custody: URI instead of key material, for applications that read keys
// with PEM_read_bio_PrivateKey and know no OSSL_STORE (nginx 1.22's ssl_certificate_key).
const OSSL_ALGORITHM kDecoders[] = {
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", "provider=custody,input=pem", kEcDecoder,
     "a custody: URI in a key file"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", "provider=custody,input=pem", kRsaDecoder,
     "a custody: URI in a key file"},
    {"ED25519:1.3.101.112", "provider=custody,input=pem", kEd25519Decoder,
     "a custody: URI in a key file"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM* QueryOperation(void*, int operation_id, int* no_cache) {
  *no_cache = 0;
  switch (operation_id) {
    case OSSL_OP_STORE:
      return kStores;
    case OSSL_OP_KEYMGMT:
      return kKeyManagement;
    case OSSL_OP_SIGNATURE:
      return kSignatures;
    case OSSL_OP_DECODER:
      return kDecoders;
    default:
      return nullptr;
  }
}

const OSSL_PARAM* GettableParams(void*) {
  static const OSSL_PARAM kParams[] = {OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, nullptr, 0),
                                       OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_VERSION, nullptr, 0),
                                       OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_BUILDINFO, nullptr, 0),
                                       OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, nullptr),
                                       OSSL_PARAM_END};
  return kParams;
}

int GetParams(void*, OSSL_PARAM params[]) {
  OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "custody")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "0.1.0")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "custody provider: keys held by custodyd")) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
  if (p != nullptr && !OSSL_PARAM_set_int(p, 1)) return 0;
  return 1;
}

const OSSL_ITEM* ReasonStrings(void*) {
  static const OSSL_ITEM kReasons[] = {
      {kReasonCustodyCall, const_cast<char*>("custody call failed")},
      {kReasonBadUri, const_cast<char*>("bad custody URI")},
      {kReasonUnsupported, const_cast<char*>("not supported for custody keys")},
      {kReasonNotBound, const_cast<char*>("key is not held in custody")},
      {kReasonInternal, const_cast<char*>("internal error")},
      {0, nullptr}};
  return kReasons;
}

void Teardown(void* provctx) { delete static_cast<ProviderContext*>(provctx); }

const OSSL_DISPATCH kProviderFunctions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, reinterpret_cast<void (*)()>(Teardown)},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, reinterpret_cast<void (*)()>(GettableParams)},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, reinterpret_cast<void (*)()>(GetParams)},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, reinterpret_cast<void (*)()>(QueryOperation)},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, reinterpret_cast<void (*)()>(ReasonStrings)},
    {0, nullptr}};

}  // namespace
}  // namespace custody::provider

extern "C" __attribute__((visibility("default"))) int OSSL_provider_init(
    const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in, const OSSL_DISPATCH** out,
    void** provctx) {
  auto* ctx = new custody::provider::ProviderContext(handle, in);
  if (ctx->libctx() == nullptr) {
    delete ctx;
    return 0;
  }
  *provctx = ctx;
  *out = custody::provider::kProviderFunctions;
  return 1;
}
