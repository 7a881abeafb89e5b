#include "tests/testing/independent_jws.h"

#include <cstdlib>

#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/params.h"
#include "openssl/rsa.h"

namespace custody::testing {
namespace {

constexpr std::string_view kAlphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

PkeyPtr PkeyFromParams(const char* type, OSSL_PARAM* params) {
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr), &EVP_PKEY_CTX_free);
  EVP_PKEY* raw = nullptr;
  if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
    return nullptr;
  }
  PkeyPtr key(raw, &EVP_PKEY_free);
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> check(
      EVP_PKEY_CTX_new_from_pkey(nullptr, raw, nullptr), &EVP_PKEY_CTX_free);
  if (check == nullptr || EVP_PKEY_public_check(check.get()) != 1) return nullptr;
  return key;
}

// A public JWK (EC P-256 or RSA ≥ 2048 bits) → EVP_PKEY; nullptr with *error otherwise.
PkeyPtr PkeyFromJwk(const jose::Json& jwk, std::string* error) {
  if (jwk.Find("d") != nullptr) {
    *error = "the JWKS carries a private key member \"d\"";
    return nullptr;
  }
  PkeyPtr key;
  if (JsonString(jwk, "kty") == "EC" && JsonString(jwk, "crv") == "P-256") {
    std::optional<std::string> x = B64UrlDecode(JsonString(jwk, "x"));
    std::optional<std::string> y = B64UrlDecode(JsonString(jwk, "y"));
    if (x && y && x->size() == 32 && y->size() == 32) {
      std::string point = std::string(1, '\x04') + *x + *y;
      char group[] = "prime256v1";
      OSSL_PARAM params[] = {
          OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
          OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()),
          OSSL_PARAM_construct_end()};
      key = PkeyFromParams("EC", params);
    }
  } else if (JsonString(jwk, "kty") == "RSA") {
    std::optional<std::string> n = B64UrlDecode(JsonString(jwk, "n"));
    std::optional<std::string> e = B64UrlDecode(JsonString(jwk, "e"));
    if (n && e && n->size() >= 256) {
      // OSSL_PARAM integers are native-endian: convert the big-endian JWK values.
      std::unique_ptr<BIGNUM, decltype(&BN_free)> bn_n(
          BN_bin2bn(reinterpret_cast<const unsigned char*>(n->data()), n->size(), nullptr),
          &BN_free);
      std::unique_ptr<BIGNUM, decltype(&BN_free)> bn_e(
          BN_bin2bn(reinterpret_cast<const unsigned char*>(e->data()), e->size(), nullptr),
          &BN_free);
      std::string n_native(n->size(), '\0'), e_native(e->size(), '\0');
      if (BN_bn2nativepad(bn_n.get(), reinterpret_cast<unsigned char*>(n_native.data()),
                          n_native.size()) >= 0 &&
          BN_bn2nativepad(bn_e.get(), reinterpret_cast<unsigned char*>(e_native.data()),
                          e_native.size()) >= 0) {
        OSSL_PARAM params[] = {
            OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_RSA_N,
                                    reinterpret_cast<unsigned char*>(n_native.data()),
                                    n_native.size()),
            OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_RSA_E,
                                    reinterpret_cast<unsigned char*>(e_native.data()),
                                    e_native.size()),
            OSSL_PARAM_construct_end()};
        key = PkeyFromParams("RSA", params);
      }
    }
  }
  if (key == nullptr) *error = "unusable public JWK: " + jwk.Serialize();
  return key;
}

bool VerifySignature(const VerifyKey& key, std::string_view input, std::string_view sig) {
  std::string der_or_raw(sig);
  if (key.alg == "ES256") {
    if (sig.size() != 64) return false;
    const auto* bytes = reinterpret_cast<const unsigned char*>(sig.data());
    ECDSA_SIG* ecdsa = ECDSA_SIG_new();
    BIGNUM* r = BN_bin2bn(bytes, 32, nullptr);
    BIGNUM* s = BN_bin2bn(bytes + 32, 32, nullptr);
    if (ecdsa == nullptr || r == nullptr || s == nullptr || ECDSA_SIG_set0(ecdsa, r, s) != 1) {
      std::abort();
    }
    unsigned char* der = nullptr;
    const int der_len = i2d_ECDSA_SIG(ecdsa, &der);
    ECDSA_SIG_free(ecdsa);
    if (der_len <= 0) return false;
    der_or_raw.assign(reinterpret_cast<const char*>(der), static_cast<size_t>(der_len));
    OPENSSL_free(der);
  }
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  EVP_PKEY_CTX* pctx = nullptr;
  if (EVP_DigestVerifyInit_ex(md.get(), &pctx, "SHA256", nullptr, nullptr, key.key.get(),
                              nullptr) != 1) {
    return false;
  }
  if (key.alg == "PS256" && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1 ||
                             EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, "SHA256", nullptr) != 1 ||
                             EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32) != 1)) {
    return false;
  }
  return EVP_DigestVerify(md.get(), reinterpret_cast<const unsigned char*>(der_or_raw.data()),
                          der_or_raw.size(), reinterpret_cast<const unsigned char*>(input.data()),
                          input.size()) == 1;
}

}  // namespace

std::optional<std::string> B64UrlDecode(std::string_view in) {
  std::string out;
  uint32_t buffer = 0;
  int bits = 0;
  for (char c : in) {
    size_t value = kAlphabet.find(c);
    if (value == std::string_view::npos) return std::nullopt;
    buffer = ((buffer << 6) | static_cast<uint32_t>(value)) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buffer >> bits) & 0xff));
    }
  }
  if (bits >= 6) return std::nullopt;                           // a length of 4k+1 is not base64url
  if ((buffer & ((1u << bits) - 1)) != 0) return std::nullopt;  // non-canonical trailing bits
  return out;
}

std::string B64UrlEncode(std::string_view in) {
  std::string out;
  uint32_t buffer = 0;
  int bits = 0;
  for (unsigned char c : in) {
    buffer = ((buffer << 8) | c) & 0xffff;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(kAlphabet[(buffer >> bits) & 0x3f]);
    }
  }
  if (bits > 0) out.push_back(kAlphabet[(buffer << (6 - bits)) & 0x3f]);
  return out;
}

std::string Sha256Digest(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) std::abort();
  return std::string(reinterpret_cast<const char*>(md), len);
}

const std::string& JsonString(const jose::Json& object, std::string_view name) {
  static const std::string* empty = new std::string();
  const jose::Json* value = object.Find(name);
  return value != nullptr && value->is_string() ? value->as_string() : *empty;
}

std::string Thumbprint(const jose::Json& jwk) {
  // The required members, lexicographic order, no whitespace (RFC 7638 §3.2).
  if (JsonString(jwk, "kty") == "RSA") {
    return B64UrlEncode(Sha256Digest("{\"e\":\"" + JsonString(jwk, "e") +
                                     "\",\"kty\":\"RSA\",\"n\":\"" + JsonString(jwk, "n") + "\"}"));
  }
  return B64UrlEncode(Sha256Digest("{\"crv\":\"" + JsonString(jwk, "crv") +
                                   "\",\"kty\":\"EC\",\"x\":\"" + JsonString(jwk, "x") +
                                   "\",\"y\":\"" + JsonString(jwk, "y") + "\"}"));
}

std::optional<ParsedJws> ParseCompactJws(const std::string& jws, std::string* error) {
  size_t dot1 = jws.find('.');
  size_t dot2 = dot1 == std::string::npos ? dot1 : jws.find('.', dot1 + 1);
  if (dot2 == std::string::npos || jws.find('.', dot2 + 1) != std::string::npos) {
    *error = "not a compact JWS: " + jws;
    return std::nullopt;
  }
  ParsedJws out;
  out.signing_input = jws.substr(0, dot2);
  std::optional<std::string> header = B64UrlDecode(std::string_view(jws).substr(0, dot1));
  std::optional<std::string> payload =
      B64UrlDecode(std::string_view(jws).substr(dot1 + 1, dot2 - dot1 - 1));
  std::optional<std::string> signature = B64UrlDecode(std::string_view(jws).substr(dot2 + 1));
  if (!header || !payload || !signature) {
    *error = "bad base64url in " + jws;
    return std::nullopt;
  }
  auto parsed = jose::ParseJson(*header);
  if (!parsed.ok() || !parsed->is_object()) {
    *error = "bad protected header " + *header;
    return std::nullopt;
  }
  out.header = *std::move(parsed);
  out.payload = *std::move(payload);
  out.signature = *std::move(signature);
  return out;
}

std::string AddJwks(const std::string& jwks, JwsKeys& keys) {
  auto parsed = jose::ParseJson(jwks, {.max_bytes = 4 << 20, .max_depth = 16});
  if (!parsed.ok() || parsed->Find("keys") == nullptr || !parsed->Find("keys")->is_array()) {
    return "bad JWKS: " + jwks;
  }
  for (const jose::Json& jwk : parsed->Find("keys")->as_array()) {
    const std::string& alg = JsonString(jwk, "alg");
    if (alg != "ES256" && alg != "PS256") continue;
    if (JsonString(jwk, "use") != "sig")
      return alg + " key without \"use\":\"sig\": " + jwk.Serialize();
    const std::string& kid = JsonString(jwk, "kid");
    if (kid != Thumbprint(jwk)) {
      return "kid " + kid + " is not the RFC 7638 thumbprint " + Thumbprint(jwk);
    }
    std::string error;
    PkeyPtr key = PkeyFromJwk(jwk, &error);
    if (key == nullptr) return error;
    keys[kid] = VerifyKey{alg, key};
  }
  return "";
}

JwsKeys JwsKeysOf(const std::string& jwks, std::string* error) {
  JwsKeys keys;
  *error = AddJwks(jwks, keys);
  return keys;
}

std::string VerifyJws(const JwsKeys& keys, const std::string& jws, std::string* kid,
                      std::string* payload) {
  std::string error;
  std::optional<ParsedJws> parsed = ParseCompactJws(jws, &error);
  if (!parsed) return error;
  const std::string& header_kid = JsonString(parsed->header, "kid");
  if (kid != nullptr) *kid = header_kid;
  if (payload != nullptr) *payload = parsed->payload;
  auto key = keys.find(header_kid);
  if (key == keys.end()) return "kid " + header_kid + " is not in the JWKS";
  const std::string& alg = JsonString(parsed->header, "alg");
  if (alg != key->second.alg) {
    return "header alg " + alg + " is not the key's " + key->second.alg;
  }
  if (!VerifySignature(key->second, parsed->signing_input, parsed->signature)) {
    return "the " + alg + " signature does not verify";
  }
  return "";
}

}  // namespace custody::testing
