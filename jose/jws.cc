#include "jose/jws.h"

#include <algorithm>
#include <array>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "jose/base64url.h"
#include "jose/jwk.h"
#include "jose/openssl_handles.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/err.h"
#include "openssl/params.h"

namespace custody::jose {
namespace {

using internal::BnPtr;
using internal::EcdsaSigPtr;
using internal::MdCtxPtr;

constexpr size_t kMaxCompactJwsBytes = 1 << 20;

struct AlgInfo {
  JwsAlg alg;
  const char* name;
  const char* digest;     // nullptr for EdDSA (the digest is part of the scheme)
  const char* ec_group;   // OpenSSL group name for ES*, else nullptr
  size_t ec_field_bytes;  // 0 unless ES*
  bool pss;
};

constexpr std::array<AlgInfo, 8> kAlgs = {{
    {JwsAlg::kES256, "ES256", "SHA256", "prime256v1", 32, false},
    {JwsAlg::kES384, "ES384", "SHA384", "secp384r1", 48, false},
    {JwsAlg::kES512, "ES512", "SHA512", "secp521r1", 66, false},
    {JwsAlg::kPS256, "PS256", "SHA256", nullptr, 0, true},
    {JwsAlg::kPS384, "PS384", "SHA384", nullptr, 0, true},
    {JwsAlg::kPS512, "PS512", "SHA512", nullptr, 0, true},
    {JwsAlg::kRS256, "RS256", "SHA256", nullptr, 0, false},
    {JwsAlg::kEdDSA, "EdDSA", nullptr, nullptr, 0, false},
}};

const AlgInfo& Info(JwsAlg alg) {
  for (const AlgInfo& info : kAlgs) {
    if (info.alg == alg) return info;
  }
  return kAlgs[0];  // unreachable: every enumerator is in kAlgs
}

bool IsRsa(JwsAlg alg) {
  return alg == JwsAlg::kPS256 || alg == JwsAlg::kPS384 || alg == JwsAlg::kPS512 ||
         alg == JwsAlg::kRS256;
}

// Names the ring (alg, kid, key) or the encoding (b64, zip, crit) decides, never the caller.
constexpr std::array<std::string_view, 14> kForbiddenExtraMembers = {
    "alg",      "kid",  "jwk", "jku", "x5u", "x5c", "x5t",
    "x5t#S256", "crit", "b64", "zip", "enc", "typ", "cty"};

absl::Status KeyMatchesAlg(const EVP_PKEY* key, const AlgInfo& info) {
  if (info.ec_group != nullptr) {
    if (!EVP_PKEY_is_a(key, "EC")) {
      return absl::InvalidArgumentError(absl::StrCat(info.name, " requires an EC key"));
    }
    char group[64] = {0};
    size_t len = 0;
    if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                       &len) != 1 ||
        std::string_view(group, len) != info.ec_group) {
      return absl::InvalidArgumentError(
          absl::StrCat(info.name, " requires curve ", info.ec_group, ", key is on '", group, "'"));
    }
    return absl::OkStatus();
  }
  if (IsRsa(info.alg)) {
    if (!EVP_PKEY_is_a(key, "RSA")) {
      return absl::InvalidArgumentError(absl::StrCat(info.name, " requires an RSA key"));
    }
    if (EVP_PKEY_get_bits(key) < 2048) {
      return absl::InvalidArgumentError(
          absl::StrCat("RSA key of ", EVP_PKEY_get_bits(key), " bits refused; 2048 minimum"));
    }
    return absl::OkStatus();
  }
  if (!EVP_PKEY_is_a(key, "ED25519")) {
    return absl::InvalidArgumentError("EdDSA requires an Ed25519 key");
  }
  return absl::OkStatus();
}

// Returns OK when the signature verifies, UNAUTHENTICATED otherwise.
absl::Status VerifySignature(const EVP_PKEY* key, const AlgInfo& info, std::string_view input,
                             std::string_view signature) {
  std::string sig(signature);
  if (info.ec_group != nullptr) {
    // RFC 7518 §3.4: exactly r||s, each the field size; anything else is not a JWS signature.
    if (signature.size() != 2 * info.ec_field_bytes) {
      return absl::UnauthenticatedError("ECDSA signature has the wrong length");
    }
    absl::StatusOr<std::string> der = EcdsaRawToDer(signature);
    if (!der.ok()) return absl::UnauthenticatedError("ECDSA signature is malformed");
    sig = *std::move(der);
  }
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (ctx == nullptr) return absl::InternalError("EVP_MD_CTX_new failed");
  OSSL_PARAM pss_params[4];
  const OSSL_PARAM* params = nullptr;
  if (info.pss) {
    // RFC 7518 §3.5: MGF1 with the same hash, salt as long as the digest.
    pss_params[0] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE,
                                                     const_cast<char*>("pss"), 0);
    pss_params[1] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST,
                                                     const_cast<char*>(info.digest), 0);
    pss_params[2] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN,
                                                     const_cast<char*>("digest"), 0);
    pss_params[3] = OSSL_PARAM_construct_end();
    params = pss_params;
  } else if (IsRsa(info.alg)) {
    pss_params[0] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE,
                                                     const_cast<char*>("pkcs1"), 0);
    pss_params[1] = OSSL_PARAM_construct_end();
    params = pss_params;
  }
  // EVP_DigestVerifyInit_ex takes a non-const key but only reads it (and up-refs it).
  EVP_PKEY* k = const_cast<EVP_PKEY*>(key);
  if (EVP_DigestVerifyInit_ex(ctx.get(), nullptr, info.digest, nullptr, nullptr, k, params) != 1) {
    ERR_clear_error();
    return absl::InternalError(absl::StrCat("EVP_DigestVerifyInit_ex failed for ", info.name));
  }
  const int rc =
      EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                       reinterpret_cast<const unsigned char*>(input.data()), input.size());
  ERR_clear_error();
  if (rc != 1) return absl::UnauthenticatedError("JWS signature does not verify");
  return absl::OkStatus();
}

}  // namespace

std::string_view JwsAlgName(JwsAlg alg) { return Info(alg).name; }

absl::StatusOr<JwsAlg> ParseJwsAlg(std::string_view name) {
  for (const AlgInfo& info : kAlgs) {
    if (info.name == name) return info.alg;
  }
  if (name == "none") {
    return absl::InvalidArgumentError("JWS alg \"none\" is never accepted");
  }
  if (name.substr(0, 2) == "HS") {
    return absl::InvalidArgumentError(absl::StrCat(
        "JWS alg \"", std::string(name), "\" refused: symmetric algorithms are not supported"));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown JWS alg \"", std::string(name), "\""));
}

absl::StatusOr<std::string> BuildProtectedHeader(const JwsHeaderParams& params) {
  if (!params.extra.is_null() && !params.extra.is_object()) {
    return absl::InvalidArgumentError("extra protected header members must be a JSON object");
  }
  Json header = Json::MakeObject({{"alg", Json::String(std::string(JwsAlgName(params.alg)))},
                                  {"kid", Json::String(params.kid)}});
  if (!params.typ.empty()) header.Set("typ", Json::String(params.typ));
  if (!params.cty.empty()) header.Set("cty", Json::String(params.cty));
  if (params.jwk.has_value()) {
    // Parsing it as a public key refuses private members and malformed keys.
    absl::StatusOr<PkeyPtr> pkey = PkeyFromPublicJwk(*params.jwk);
    if (!pkey.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("header \"jwk\" is not a valid public JWK: ", pkey.status().message()));
    }
    header.Set("jwk", *params.jwk);
  }
  std::unordered_set<std::string> seen;
  for (const auto& [name, value] : params.extra.as_object()) {
    if (std::find(kForbiddenExtraMembers.begin(), kForbiddenExtraMembers.end(), name) !=
        kForbiddenExtraMembers.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("protected header member \"", name, "\" may not be set by the caller"));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("protected header member \"", name, "\" given twice"));
    }
    header.Set(name, value);
  }
  return header.Serialize();
}

std::string JwsSigningInput(std::string_view header_json, std::string_view payload) {
  return absl::StrCat(Base64UrlEncode(header_json), ".", Base64UrlEncode(payload));
}

std::string AssembleCompactJws(std::string_view signing_input, std::string_view signature) {
  std::string out(signing_input);
  out.push_back('.');
  out += Base64UrlEncode(signature);
  return out;
}

absl::StatusOr<std::string> EcdsaDerToRaw(std::string_view der, size_t field_bytes) {
  if (field_bytes == 0 || field_bytes > 66) {
    return absl::InvalidArgumentError(absl::StrCat("invalid ECDSA field size ", field_bytes));
  }
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  EcdsaSigPtr sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size())));
  if (sig == nullptr || p != reinterpret_cast<const unsigned char*>(der.data()) + der.size()) {
    ERR_clear_error();
    return absl::InvalidArgumentError("ECDSA signature is not a DER SEQUENCE of two INTEGERs");
  }
  // Only the one DER encoding of (r, s) is accepted, so a signature has a single raw form.
  unsigned char* canonical = nullptr;
  const int canonical_len = i2d_ECDSA_SIG(sig.get(), &canonical);
  const bool is_canonical =
      canonical_len > 0 && static_cast<size_t>(canonical_len) == der.size() &&
      std::equal(der.begin(), der.end(), reinterpret_cast<const char*>(canonical));
  OPENSSL_free(canonical);
  if (!is_canonical) return absl::InvalidArgumentError("ECDSA signature is not canonical DER");
  const BIGNUM* r = nullptr;
  const BIGNUM* s = nullptr;
  ECDSA_SIG_get0(sig.get(), &r, &s);
  if (BN_is_negative(r) || BN_is_negative(s)) {
    return absl::InvalidArgumentError("ECDSA signature has a negative component");
  }
  std::string raw(2 * field_bytes, '\0');
  auto* out = reinterpret_cast<unsigned char*>(raw.data());
  if (BN_bn2binpad(r, out, static_cast<int>(field_bytes)) < 0 ||
      BN_bn2binpad(s, out + field_bytes, static_cast<int>(field_bytes)) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ECDSA signature component longer than ", field_bytes, " bytes"));
  }
  return raw;
}

absl::StatusOr<std::string> EcdsaRawToDer(std::string_view raw) {
  if (raw.empty() || raw.size() % 2 != 0 || raw.size() > 2 * 66) {
    return absl::InvalidArgumentError(
        absl::StrCat("raw ECDSA signature of ", raw.size(), " bytes; expected r||s"));
  }
  const size_t half = raw.size() / 2;
  const auto* data = reinterpret_cast<const unsigned char*>(raw.data());
  BnPtr r(BN_bin2bn(data, static_cast<int>(half), nullptr));
  BnPtr s(BN_bin2bn(data + half, static_cast<int>(half), nullptr));
  EcdsaSigPtr sig(ECDSA_SIG_new());
  if (r == nullptr || s == nullptr || sig == nullptr) {
    return absl::InternalError("out of memory converting ECDSA signature");
  }
  if (ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) {
    return absl::InternalError("ECDSA_SIG_set0 failed");
  }
  // sig owns r and s now.
  (void)r.release();
  (void)s.release();
  const int len = i2d_ECDSA_SIG(sig.get(), nullptr);
  if (len <= 0) return absl::InternalError("i2d_ECDSA_SIG failed");
  std::string der(static_cast<size_t>(len), '\0');
  auto* p = reinterpret_cast<unsigned char*>(der.data());
  if (i2d_ECDSA_SIG(sig.get(), &p) != len) return absl::InternalError("i2d_ECDSA_SIG failed");
  return der;
}

absl::StatusOr<VerifiedJws> VerifyCompactJws(std::string_view jws, const EVP_PKEY* key,
                                             const std::vector<JwsAlg>& allowed) {
  if (key == nullptr) return absl::InvalidArgumentError("no verification key");
  if (jws.size() > kMaxCompactJwsBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS of ", jws.size(), " bytes exceeds the 1 MiB limit"));
  }
  const size_t dot1 = jws.find('.');
  const size_t dot2 = dot1 == std::string_view::npos ? dot1 : jws.find('.', dot1 + 1);
  if (dot2 == std::string_view::npos || jws.find('.', dot2 + 1) != std::string_view::npos) {
    return absl::InvalidArgumentError("compact JWS must have exactly three parts");
  }
  const std::string_view header_b64 = jws.substr(0, dot1);
  const std::string_view payload_b64 = jws.substr(dot1 + 1, dot2 - dot1 - 1);
  const std::string_view signature_b64 = jws.substr(dot2 + 1);

  absl::StatusOr<std::string> header_json = Base64UrlDecode(header_b64);
  if (!header_json.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWS header: ", header_json.status().message()));
  }
  absl::StatusOr<Json> header = ParseJson(*header_json);
  if (!header.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWS header: ", header.status().message()));
  }
  if (!header->is_object()) return absl::InvalidArgumentError("JWS header is not an object");
  const Json* alg_member = header->Find("alg");
  if (alg_member == nullptr || !alg_member->is_string()) {
    return absl::InvalidArgumentError("JWS header has no string \"alg\"");
  }
  absl::StatusOr<JwsAlg> alg = ParseJwsAlg(alg_member->as_string());
  if (!alg.ok()) return alg.status();
  if (std::find(allowed.begin(), allowed.end(), *alg) == allowed.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS alg \"", std::string(JwsAlgName(*alg)), "\" is not allowed here"));
  }
  // RFC 7515 §4.1.11: we implement no extensions, so any "crit" must be refused.
  if (header->Find("crit") != nullptr) {
    return absl::InvalidArgumentError("JWS header \"crit\" names unsupported extensions");
  }
  const AlgInfo& info = Info(*alg);
  absl::Status key_ok = KeyMatchesAlg(key, info);
  if (!key_ok.ok()) return key_ok;

  absl::StatusOr<std::string> payload = Base64UrlDecode(payload_b64);
  if (!payload.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWS payload: ", payload.status().message()));
  }
  absl::StatusOr<std::string> signature = Base64UrlDecode(signature_b64);
  if (!signature.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS signature: ", signature.status().message()));
  }
  absl::Status verified = VerifySignature(key, info, jws.substr(0, dot2), *signature);
  if (!verified.ok()) return verified;
  return VerifiedJws{*std::move(header), *std::move(payload)};
}

}  // namespace custody::jose
