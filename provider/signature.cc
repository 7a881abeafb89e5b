// Signature operations on custody keys: every signature is one custodyd Signer.Sign call with
// the digest (ECDSA, RSA) or the message (Ed25519), authorized and audited by custodyd.
//
// Parameters (digest, RSA padding, PSS salt length, MGF1 digest) are kept by a shadow verify
// context on the public key from OpenSSL's default provider: it parses them exactly as OpenSSL
// would and produces the AlgorithmIdentifier that X.509 and CMS need; this file only reads them
// back when it signs.
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "openssl/core_names.h"
#include "openssl/params.h"
#include "openssl/rsa.h"
#include "provider/param_table.h"
#include "provider/provider.h"

namespace custody::provider {
namespace {

struct SignatureContext {
  ProviderContext* provider = nullptr;
  std::unique_ptr<CustodyKey> key;
  EVP_PKEY_CTX* shadow = nullptr;  // EC and RSA only
  EVP_MD_CTX* md_ctx = nullptr;    // between digest_sign_init and _final
  std::string message;             // Ed25519 (one-shot) input

  ~SignatureContext() {
    EVP_PKEY_CTX_free(shadow);
    EVP_MD_CTX_free(md_ctx);
  }
};

void* NewContext(void* provctx, const char*) {
  auto* ctx = new SignatureContext;
  ctx->provider = static_cast<ProviderContext*>(provctx);
  return ctx;
}

void FreeContext(void* vctx) { delete static_cast<SignatureContext*>(vctx); }

void* DupContext(void* vctx) {
  const auto* src = static_cast<SignatureContext*>(vctx);
  auto dst = std::make_unique<SignatureContext>();
  dst->provider = src->provider;
  if (src->key != nullptr) dst->key = std::make_unique<CustodyKey>(*src->key);
  if (src->shadow != nullptr && (dst->shadow = EVP_PKEY_CTX_dup(src->shadow)) == nullptr) {
    return nullptr;
  }
  if (src->md_ctx != nullptr) {
    dst->md_ctx = EVP_MD_CTX_new();
    if (dst->md_ctx == nullptr || EVP_MD_CTX_copy_ex(dst->md_ctx, src->md_ctx) != 1) {
      return nullptr;
    }
  }
  dst->message = src->message;
  return dst.release();
}

int SetContextParams(void* vctx, const OSSL_PARAM params[]) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  if (params == nullptr || params[0].key == nullptr) return 1;
  if (ctx->shadow == nullptr) return 1;  // Ed25519: nothing to set
  return EVP_PKEY_CTX_set_params(ctx->shadow, params);
}

int GetContextParams(void* vctx, OSSL_PARAM params[]) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  if (ctx->shadow != nullptr) return EVP_PKEY_CTX_get_params(ctx->shadow, params);
  // Ed25519: the AlgorithmIdentifier is the bare OID 1.3.101.112 (RFC 8410 §3).
  static const unsigned char kEd25519Aid[] = {0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70};
  OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID);
  if (p != nullptr && !OSSL_PARAM_set_octet_string(p, kEd25519Aid, sizeof(kEd25519Aid))) return 0;
  return 1;
}

// The signature parameters the tables below are made of.
constexpr ParamGroup<2> kDigest = {
    {Utf8(OSSL_SIGNATURE_PARAM_DIGEST), Utf8(OSSL_SIGNATURE_PARAM_PROPERTIES)}};
constexpr ParamGroup<3> kRsaPadding = {{Utf8(OSSL_SIGNATURE_PARAM_PAD_MODE),
                                        Utf8(OSSL_SIGNATURE_PARAM_MGF1_DIGEST),
                                        Utf8(OSSL_SIGNATURE_PARAM_PSS_SALTLEN)}};
constexpr ParamGroup<1> kMgf1Properties = {{Utf8(OSSL_SIGNATURE_PARAM_MGF1_PROPERTIES)}};
constexpr ParamGroup<2> kAlgorithmAndDigest = {
    {Octets(OSSL_SIGNATURE_PARAM_ALGORITHM_ID), Utf8(OSSL_SIGNATURE_PARAM_DIGEST)}};

const OSSL_PARAM* SettableEc(void*, void*) {
  static constexpr auto kParams = ParamTable(kDigest);
  return kParams.data();
}

const OSSL_PARAM* SettableRsa(void*, void*) {
  static constexpr auto kParams = ParamTable(kDigest, kRsaPadding, kMgf1Properties);
  return kParams.data();
}

const OSSL_PARAM* SettableNone(void*, void*) {
  static constexpr auto kParams = ParamTable();
  return kParams.data();
}

const OSSL_PARAM* Gettable(void*, void*) {
  static constexpr auto kParams = ParamTable(kAlgorithmAndDigest);
  return kParams.data();
}

const OSSL_PARAM* GettableRsa(void*, void*) {
  static constexpr auto kParams = ParamTable(kAlgorithmAndDigest, kRsaPadding);
  return kParams.data();
}

// Shared by sign_init and digest_sign_init: binds the key and sets up the shadow context.
int Init(SignatureContext* ctx, void* keydata, const OSSL_PARAM params[], const char* func) {
  auto* key = static_cast<CustodyKey*>(keydata);
  if (key == nullptr || key->pub == nullptr) return 0;
  if (key->client == nullptr) {
    ctx->provider->Raise(kReasonNotBound, func,
                         "custody: this key object holds only a public key (load it from a "
                         "custody: URI to sign)");
    return 0;
  }
  ctx->key = std::make_unique<CustodyKey>(*key);
  EVP_PKEY_CTX_free(ctx->shadow);
  ctx->shadow = nullptr;
  EVP_MD_CTX_free(ctx->md_ctx);
  ctx->md_ctx = nullptr;
  ctx->message.clear();
  if (key->type != "ED25519") {
    ctx->shadow = EVP_PKEY_CTX_new_from_pkey(ctx->provider->libctx(), key->pub.get(), nullptr);
    if (ctx->shadow == nullptr || EVP_PKEY_verify_init(ctx->shadow) != 1) {
      ctx->provider->Raise(kReasonInternal, func, "custody: cannot set up the parameter context");
      return 0;
    }
  }
  return SetContextParams(ctx, params);
}

int SignInit(void* vctx, void* keydata, const OSSL_PARAM params[]) {
  return Init(static_cast<SignatureContext*>(vctx), keydata, params, "sign_init");
}

// "SHA256"/"SHA384"/"SHA512" as custodyd names them, or "" for anything else.
std::string CustodyDigestName(OSSL_LIB_CTX* libctx, const std::string& name) {
  std::unique_ptr<EVP_MD, decltype(&EVP_MD_free)> md(EVP_MD_fetch(libctx, name.c_str(), nullptr),
                                                     EVP_MD_free);
  if (md == nullptr) return "";
  if (EVP_MD_is_a(md.get(), "SHA2-256")) return "SHA256";
  if (EVP_MD_is_a(md.get(), "SHA2-384")) return "SHA384";
  if (EVP_MD_is_a(md.get(), "SHA2-512")) return "SHA512";
  return "";
}

std::string ShadowString(EVP_PKEY_CTX* shadow, const char* key) {
  char value[80] = "";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(key, value, sizeof(value)),
                         OSSL_PARAM_construct_end()};
  if (EVP_PKEY_CTX_get_params(shadow, params) != 1) return "";
  return value;
}

int ShadowInt(EVP_PKEY_CTX* shadow, const char* key, int fallback) {
  int value = fallback;
  OSSL_PARAM params[] = {OSSL_PARAM_construct_int(key, &value), OSSL_PARAM_construct_end()};
  if (EVP_PKEY_CTX_get_params(shadow, params) != 1) return fallback;
  return value;
}

// One custodyd call for a digest of `digest` (ECDSA, RSA), with the shadow's parameters.
int SignDigest(SignatureContext* ctx, unsigned char* sig, size_t* siglen, size_t sigsize,
               const unsigned char* digest, size_t digest_len, const char* func) {
  ProviderContext* provider = ctx->provider;
  const CustodyKey& key = *ctx->key;
  std::string md = ShadowString(ctx->shadow, OSSL_SIGNATURE_PARAM_DIGEST);
  std::string digest_alg;
  if (md.empty()) {  // sign() without a digest set: known from the length
    digest_alg = digest_len == 32   ? "SHA256"
                 : digest_len == 48 ? "SHA384"
                 : digest_len == 64 ? "SHA512"
                                    : "";
  } else {
    digest_alg = CustodyDigestName(provider->libctx(), md);
  }
  if (digest_alg.empty()) {
    provider->Raise(kReasonUnsupported, func,
                    absl::StrCat("custody: INVALID_ARGUMENT: custody keys sign SHA-256, SHA-384 "
                                 "or SHA-512 digests only, not ",
                                 md.empty() ? absl::StrCat(digest_len, "-byte input") : md));
    return 0;
  }
  custody::v1::SignRequest request;
  request.set_ring(key.ring);
  request.set_version(key.version);
  request.set_digest(std::string(reinterpret_cast<const char*>(digest), digest_len));
  request.set_digest_alg(digest_alg);
  if (key.type == "EC") {
    request.set_encoding(custody::v1::SIGNATURE_ENCODING_DER);
  } else {
    const int pad = ShadowInt(ctx->shadow, OSSL_SIGNATURE_PARAM_PAD_MODE, RSA_PKCS1_PADDING);
    if (pad == RSA_PKCS1_PSS_PADDING) {
      const int salt = ShadowInt(ctx->shadow, OSSL_SIGNATURE_PARAM_PSS_SALTLEN, -2);
      const int digest_size = static_cast<int>(digest_len);
      // custodyd's PSS salt is the digest length (TLS 1.3, JOSE): "digest", "auto" (any salt
      // verifies) and that exact length are fine; "max" or another length is not what it makes.
      if (salt != RSA_PSS_SALTLEN_DIGEST && salt != RSA_PSS_SALTLEN_AUTO && salt != digest_size) {
        provider->Raise(kReasonUnsupported, func,
                        absl::StrCat("custody: INVALID_ARGUMENT: RSA-PSS salt length must be the "
                                     "digest length (",
                                     digest_size, "), not ", salt));
        return 0;
      }
      const std::string mgf1 = ShadowString(ctx->shadow, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
      if (!mgf1.empty() && CustodyDigestName(provider->libctx(), mgf1) != digest_alg) {
        provider->Raise(kReasonUnsupported, func,
                        absl::StrCat("custody: INVALID_ARGUMENT: MGF1 digest must be the "
                                     "signature digest (",
                                     digest_alg, "), not ", mgf1));
        return 0;
      }
      request.set_rsa_padding(custody::v1::RSA_PADDING_PSS);
    } else if (pad == RSA_PKCS1_PADDING) {
      request.set_rsa_padding(custody::v1::RSA_PADDING_PKCS1);
    } else {
      provider->Raise(kReasonUnsupported, func,
                      absl::StrCat("custody: INVALID_ARGUMENT: RSA padding mode ", pad,
                                   " is not supported (PSS or PKCS#1 v1.5)"));
      return 0;
    }
  }
  auto client = SigningClient(key);
  if (!client.ok()) {
    provider->RaiseStatus(client.status(), func);
    return 0;
  }
  auto signature = (*client)->Sign(request);
  if (!signature.ok()) {
    provider->RaiseStatus(signature.status(), func);
    return 0;
  }
  if (signature->signature.size() > sigsize) {
    provider->Raise(kReasonInternal, func, "custody: signature buffer too small");
    return 0;
  }
  std::memcpy(sig, signature->signature.data(), signature->signature.size());
  *siglen = signature->signature.size();
  return 1;
}

int Sign(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize, const unsigned char* tbs,
         size_t tbslen) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  if (ctx->key == nullptr) return 0;
  if (sig == nullptr) {
    *siglen = static_cast<size_t>(EVP_PKEY_get_size(ctx->key->pub.get()));
    return 1;
  }
  return SignDigest(ctx, sig, siglen, sigsize, tbs, tbslen, "sign");
}

int DigestSignInit(void* vctx, const char* mdname, void* keydata, const OSSL_PARAM params[]) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  if (!Init(ctx, keydata, params, "digest_sign_init")) return 0;
  if (ctx->key->type == "ED25519") {
    if (mdname != nullptr && mdname[0] != '\0') {
      ctx->provider->Raise(kReasonUnsupported, "digest_sign_init",
                           "custody: Ed25519 signs the message itself; no digest may be set");
      return 0;
    }
    return 1;
  }
  const std::string md_name = mdname != nullptr && mdname[0] != '\0' ? mdname : "SHA256";
  std::unique_ptr<EVP_MD, decltype(&EVP_MD_free)> md(
      EVP_MD_fetch(ctx->provider->libctx(), md_name.c_str(), nullptr), EVP_MD_free);
  OSSL_PARAM digest[] = {OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST,
                                                          const_cast<char*>(md_name.c_str()), 0),
                         OSSL_PARAM_construct_end()};
  ctx->md_ctx = EVP_MD_CTX_new();
  if (md == nullptr || ctx->md_ctx == nullptr ||
      EVP_DigestInit_ex2(ctx->md_ctx, md.get(), nullptr) != 1 ||
      EVP_PKEY_CTX_set_params(ctx->shadow, digest) != 1) {
    ctx->provider->Raise(kReasonUnsupported, "digest_sign_init",
                         absl::StrCat("custody: digest '", md_name, "' is not available"));
    return 0;
  }
  return 1;
}

int DigestSignUpdate(void* vctx, const unsigned char* data, size_t len) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  return ctx->md_ctx != nullptr && EVP_DigestUpdate(ctx->md_ctx, data, len) == 1 ? 1 : 0;
}

int DigestSignFinal(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  if (ctx->key == nullptr || ctx->md_ctx == nullptr) return 0;
  if (sig == nullptr) {
    *siglen = static_cast<size_t>(EVP_PKEY_get_size(ctx->key->pub.get()));
    return 1;
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_DigestFinal_ex(ctx->md_ctx, digest, &digest_len) != 1) return 0;
  return SignDigest(ctx, sig, siglen, sigsize, digest, digest_len, "digest_sign_final");
}

// Ed25519 is one-shot (pure EdDSA hashes the message twice, so it cannot stream).
int DigestSignEd25519(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize,
                      const unsigned char* tbs, size_t tbslen) {
  auto* ctx = static_cast<SignatureContext*>(vctx);
  if (ctx->key == nullptr) return 0;
  if (sig == nullptr) {
    *siglen = 64;
    return 1;
  }
  custody::v1::SignRequest request;
  request.set_ring(ctx->key->ring);
  request.set_version(ctx->key->version);
  request.set_data(std::string(reinterpret_cast<const char*>(tbs), tbslen));
  auto client = SigningClient(*ctx->key);
  if (!client.ok()) {
    ctx->provider->RaiseStatus(client.status(), "digest_sign");
    return 0;
  }
  auto signature = (*client)->Sign(request);
  if (!signature.ok()) {
    ctx->provider->RaiseStatus(signature.status(), "digest_sign");
    return 0;
  }
  if (signature->signature.size() > sigsize) return 0;
  std::memcpy(sig, signature->signature.data(), signature->signature.size());
  *siglen = signature->signature.size();
  return 1;
}

#define CUSTODY_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }

}  // namespace

// What ECDSA and RSA share: the context, sign and digest-sign, and the context parameters.
#define CUSTODY_DIGEST_SIGNER_FNS                                           \
  CUSTODY_FN(OSSL_FUNC_SIGNATURE_NEWCTX, NewContext),                       \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_FREECTX, FreeContext),                 \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_DUPCTX, DupContext),                   \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_SIGN_INIT, SignInit),                  \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_SIGN, Sign),                           \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, DigestSignInit),     \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, DigestSignUpdate), \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, DigestSignFinal),   \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, GetContextParams),     \
      CUSTODY_FN(OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, SetContextParams)

const OSSL_DISPATCH kEcdsaSignature[] = {
    CUSTODY_DIGEST_SIGNER_FNS,
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, Gettable),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, SettableEc),
    {0, nullptr}};

const OSSL_DISPATCH kRsaSignature[] = {
    CUSTODY_DIGEST_SIGNER_FNS,
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, GettableRsa),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, SettableRsa),
    {0, nullptr}};

#undef CUSTODY_DIGEST_SIGNER_FNS

const OSSL_DISPATCH kEd25519Signature[] = {
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_NEWCTX, NewContext),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_FREECTX, FreeContext),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_DUPCTX, DupContext),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, DigestSignInit),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN, DigestSignEd25519),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, GetContextParams),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, Gettable),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, SetContextParams),
    CUSTODY_FN(OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, SettableNone),
    {0, nullptr}};

}  // namespace custody::provider
