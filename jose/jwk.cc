#include "jose/jwk.h"

#include <algorithm>
#include <array>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "jose/base64url.h"
#include "jose/curves.h"
#include "jose/openssl_handles.h"
#include "jose/openssl_internal.h"
#include "openssl/core_names.h"
#include "openssl/err.h"

namespace custody::jose {
namespace {

using internal::BnPtr;
using internal::MdPtr;
using internal::OpensslError;
using internal::ParamBldPtr;
using internal::ParamsPtr;
using internal::PkeyCtxPtr;

absl::StatusOr<std::string> GetBn(const EVP_PKEY* pkey, const char* name, size_t pad_to) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &raw) != 1) {
    return OpensslError(absl::StrCat("reading key parameter ", name));
  }
  BnPtr bn(raw);
  const size_t len = pad_to != 0 ? pad_to : static_cast<size_t>(BN_num_bytes(bn.get()));
  std::string out(len, '\0');
  if (BN_bn2binpad(bn.get(), reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(len)) <
      0) {
    return absl::InvalidArgumentError(absl::StrCat("key parameter ", name, " too large"));
  }
  return out;
}

absl::StatusOr<std::string> GetOctets(const EVP_PKEY* pkey, const char* name) {
  size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey, name, nullptr, 0, &len) != 1) {
    return OpensslError(absl::StrCat("reading key parameter ", name));
  }
  std::string out(len, '\0');
  if (EVP_PKEY_get_octet_string_param(pkey, name, reinterpret_cast<unsigned char*>(out.data()),
                                      out.size(), &len) != 1) {
    return OpensslError(absl::StrCat("reading key parameter ", name));
  }
  out.resize(len);
  return out;
}

absl::StatusOr<Json> EcJwk(const EVP_PKEY* pkey) {
  char group[64] = {0};
  size_t group_len = 0;
  if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                     &group_len) != 1) {
    return OpensslError("reading EC group name");
  }
  const EcCurve* curve = CurveByOpensslName(std::string_view(group, group_len));
  if (curve == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported EC curve '", group, "'"));
  }
  std::string x, y;
  absl::StatusOr<std::string> bx = GetBn(pkey, OSSL_PKEY_PARAM_EC_PUB_X, curve->field_bytes);
  absl::StatusOr<std::string> by = GetBn(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, curve->field_bytes);
  if (bx.ok() && by.ok()) {
    x = *std::move(bx);
    y = *std::move(by);
  } else {
    // Some providers only export the encoded point.
    absl::StatusOr<std::string> pub = GetOctets(pkey, OSSL_PKEY_PARAM_PUB_KEY);
    if (!pub.ok()) return pub.status();
    if (pub->size() != 1 + 2 * curve->field_bytes || (*pub)[0] != 0x04) {
      return absl::InvalidArgumentError("EC public key is not an uncompressed point");
    }
    x = pub->substr(1, curve->field_bytes);
    y = pub->substr(1 + curve->field_bytes);
  }
  return Json::MakeObject({{"kty", Json::String("EC")},
                           {"crv", Json::String(std::string(curve->jwk_name))},
                           {"x", Json::String(Base64UrlEncode(x))},
                           {"y", Json::String(Base64UrlEncode(y))}});
}

absl::StatusOr<Json> RsaJwk(const EVP_PKEY* pkey) {
  absl::StatusOr<std::string> n = GetBn(pkey, OSSL_PKEY_PARAM_RSA_N, 0);
  if (!n.ok()) return n.status();
  absl::StatusOr<std::string> e = GetBn(pkey, OSSL_PKEY_PARAM_RSA_E, 0);
  if (!e.ok()) return e.status();
  return Json::MakeObject({{"kty", Json::String("RSA")},
                           {"n", Json::String(Base64UrlEncode(*n))},
                           {"e", Json::String(Base64UrlEncode(*e))}});
}

absl::StatusOr<Json> Ed25519Jwk(const EVP_PKEY* pkey) {
  absl::StatusOr<std::string> pub = GetOctets(pkey, OSSL_PKEY_PARAM_PUB_KEY);
  if (!pub.ok()) return pub.status();
  if (pub->size() != 32) return absl::InvalidArgumentError("Ed25519 public key is not 32 bytes");
  return Json::MakeObject({{"kty", Json::String("OKP")},
                           {"crv", Json::String("Ed25519")},
                           {"x", Json::String(Base64UrlEncode(*pub))}});
}

absl::StatusOr<std::string> RequiredString(const Json& jwk, std::string_view name) {
  const Json* v = jwk.Find(name);
  if (v == nullptr || !v->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWK member \"", std::string(name), "\" missing or not a string"));
  }
  return v->as_string();
}

absl::StatusOr<std::string> RequiredBytes(const Json& jwk, std::string_view name) {
  absl::StatusOr<std::string> text = RequiredString(jwk, name);
  if (!text.ok()) return text.status();
  absl::StatusOr<std::string> bytes = Base64UrlDecode(*text);
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWK member \"", std::string(name), "\": ", bytes.status().message()));
  }
  return bytes;
}

// fromdata and the EC import below do not promise full validation; check the point/modulus
// explicitly. For EC the partial public-key validation of SP 800-56A rev. 3 §5.6.2.3.4
// (coordinates in range, point on the curve, not the point at infinity) is the whole check:
// every curve accepted here (P-256, P-384, P-521) has cofactor 1, so any other point on it has
// the group's prime order and the full check's extra n·Q = O scalar multiplication (~45 µs for
// P-256, most of an ECDH decryption's own CPU) proves nothing more. An off-curve point (the
// invalid-curve attack) fails either check.
absl::StatusOr<PkeyPtr> CheckedPublicKey(const char* type, PkeyPtr pkey) {
  PkeyCtxPtr check(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
  const bool valid = check != nullptr &&
                     (std::string_view(type) == "EC" ? EVP_PKEY_public_check_quick(check.get()) == 1
                                                     : EVP_PKEY_public_check(check.get()) == 1);
  if (!valid) {
    return OpensslError(absl::StrCat("invalid ", type, " public key"));
  }
  return pkey;
}

absl::StatusOr<PkeyPtr> PkeyFromParams(const char* type, OSSL_PARAM_BLD* bld) {
  ParamsPtr params(OSSL_PARAM_BLD_to_param(bld));
  if (params == nullptr) return OpensslError("building key parameters");
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  if (ctx == nullptr) return OpensslError(absl::StrCat("no ", type, " implementation"));
  EVP_PKEY* raw = nullptr;
  if (EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    return OpensslError(absl::StrCat("invalid ", type, " public key"));
  }
  return CheckedPublicKey(type, PkeyPtr(raw));
}

// Domain parameters of each curve as a key without key material, made once (read-only
// afterwards, so shared by every thread): an EC key copies them instead of building its group
// from the curve's name, which cost ~20 µs per key (an ECDH JWE's epk is one key per call).
// Null where OpenSSL cannot make them.
const EVP_PKEY* CurveParameters(const EcCurve& curve) {
  static const std::vector<EVP_PKEY*>* const params = [] {
    auto* made = new std::vector<EVP_PKEY*>(EcCurves().size(), nullptr);
    for (size_t i = 0; i < EcCurves().size(); ++i) {
      PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
      OSSL_PARAM p[] = {
          OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                           const_cast<char*>(EcCurves()[i].openssl_name.data()), 0),
          OSSL_PARAM_construct_end()};
      EVP_PKEY* key = nullptr;
      if (ctx != nullptr && EVP_PKEY_paramgen_init(ctx.get()) == 1 &&
          EVP_PKEY_CTX_set_params(ctx.get(), p) == 1 && EVP_PKEY_paramgen(ctx.get(), &key) == 1) {
        (*made)[i] = key;
      }
    }
    return made;
  }();
  return (*params)[static_cast<size_t>(&curve - EcCurves().data())];
}

absl::StatusOr<PkeyPtr> EcPkey(const Json& jwk) {
  absl::StatusOr<std::string> crv = RequiredString(jwk, "crv");
  if (!crv.ok()) return crv.status();
  const EcCurve* curve = CurveByJwkName(*crv);
  if (curve == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported EC curve \"", *crv, "\""));
  }
  absl::StatusOr<std::string> x = RequiredBytes(jwk, "x");
  if (!x.ok()) return x.status();
  absl::StatusOr<std::string> y = RequiredBytes(jwk, "y");
  if (!y.ok()) return y.status();
  // RFC 7518 §6.2.1.2: coordinates are exactly the field size.
  if (x->size() != curve->field_bytes || y->size() != curve->field_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("EC coordinates must be ", curve->field_bytes, " bytes for ", *crv));
  }
  const std::string point = absl::StrCat("\x04", *x, *y);
  const EVP_PKEY* params = CurveParameters(*curve);
  PkeyPtr pkey(EVP_PKEY_new());
  if (params == nullptr || pkey == nullptr || EVP_PKEY_copy_parameters(pkey.get(), params) != 1) {
    return OpensslError("building EC parameters");
  }
  // Refuses a point that is not on the curve; CheckedPublicKey checks the rest.
  if (EVP_PKEY_set1_encoded_public_key(
          pkey.get(), reinterpret_cast<const unsigned char*>(point.data()), point.size()) != 1) {
    return OpensslError("invalid EC public key");
  }
  return CheckedPublicKey("EC", std::move(pkey));
}

absl::StatusOr<BnPtr> MinimalUnsigned(const Json& jwk, std::string_view name) {
  absl::StatusOr<std::string> bytes = RequiredBytes(jwk, name);
  if (!bytes.ok()) return bytes.status();
  // RFC 7518 §2 Base64urlUInt: minimal octets. A non-minimal encoding would give the same key a
  // second RFC 7638 thumbprint.
  if (bytes->empty() || (*bytes)[0] == '\0') {
    return absl::InvalidArgumentError(
        absl::StrCat("JWK member \"", std::string(name), "\" is empty or has leading zero octets"));
  }
  BnPtr bn(BN_bin2bn(reinterpret_cast<const unsigned char*>(bytes->data()),
                     static_cast<int>(bytes->size()), nullptr));
  if (bn == nullptr) return OpensslError("BN_bin2bn");
  return bn;
}

absl::StatusOr<PkeyPtr> RsaPkey(const Json& jwk) {
  absl::StatusOr<BnPtr> n = MinimalUnsigned(jwk, "n");
  if (!n.ok()) return n.status();
  absl::StatusOr<BnPtr> e = MinimalUnsigned(jwk, "e");
  if (!e.ok()) return e.status();
  const int bits = BN_num_bits(n->get());
  if (bits < 2048 || bits > 8192) {
    return absl::InvalidArgumentError(
        absl::StrCat("RSA modulus of ", bits, " bits; 2048..8192 required"));
  }
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  if (bld == nullptr || OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n->get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e->get()) != 1) {
    return OpensslError("building RSA parameters");
  }
  return PkeyFromParams("RSA", bld.get());
}

absl::StatusOr<PkeyPtr> OkpPkey(const Json& jwk) {
  absl::StatusOr<std::string> crv = RequiredString(jwk, "crv");
  if (!crv.ok()) return crv.status();
  if (*crv != "Ed25519") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported OKP curve \"", *crv, "\""));
  }
  absl::StatusOr<std::string> x = RequiredBytes(jwk, "x");
  if (!x.ok()) return x.status();
  if (x->size() != 32) return absl::InvalidArgumentError("Ed25519 \"x\" must be 32 bytes");
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  if (bld == nullptr || OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                                         x->data(), x->size()) != 1) {
    return OpensslError("building Ed25519 parameters");
  }
  return PkeyFromParams("ED25519", bld.get());
}

}  // namespace

absl::StatusOr<Json> PublicJwkFromPkey(const EVP_PKEY* pkey) {
  if (pkey == nullptr) return absl::InvalidArgumentError("no key");
  if (EVP_PKEY_is_a(pkey, "EC")) return EcJwk(pkey);
  if (EVP_PKEY_is_a(pkey, "RSA")) return RsaJwk(pkey);
  if (EVP_PKEY_is_a(pkey, "ED25519")) return Ed25519Jwk(pkey);
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported key type '", EVP_PKEY_get0_type_name(pkey), "'"));
}

absl::StatusOr<std::string> Rfc7638Thumbprint(const Json& jwk) {
  absl::StatusOr<std::string> kty = RequiredString(jwk, "kty");
  if (!kty.ok()) return kty.status();
  std::array<std::string_view, 3> names;
  if (*kty == "EC") {
    names = {"crv", "x", "y"};
  } else if (*kty == "RSA") {
    names = {"e", "n", ""};
  } else if (*kty == "OKP") {
    names = {"crv", "x", ""};
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported kty \"", *kty, "\""));
  }
  // Required members in lexicographic order (kty sorts between them as listed).
  Json::Object members;
  for (std::string_view name : names) {
    if (name.empty()) continue;
    absl::StatusOr<std::string> v = RequiredString(jwk, name);
    if (!v.ok()) return v.status();
    members.emplace_back(std::string(name), Json::String(*std::move(v)));
  }
  members.emplace_back("kty", Json::String(*kty));
  std::sort(members.begin(), members.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  const std::string canonical = Json::MakeObject(std::move(members)).Serialize();

  MdPtr md(EVP_MD_fetch(nullptr, "SHA256", nullptr));
  if (md == nullptr) return OpensslError("fetching SHA256");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_Digest(canonical.data(), canonical.size(), digest, &digest_len, md.get(), nullptr) != 1) {
    return OpensslError("SHA256");
  }
  return Base64UrlEncode(std::string_view(reinterpret_cast<const char*>(digest), digest_len));
}

absl::StatusOr<PkeyPtr> PkeyFromPublicJwk(const Json& jwk) {
  if (!jwk.is_object()) return absl::InvalidArgumentError("JWK is not a JSON object");
  // Private and symmetric members: a private JWK reaching this code is a caller bug that would
  // otherwise leak key material into logs or headers.
  for (std::string_view name : {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}) {
    if (jwk.Find(name) != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "JWK contains private member \"", std::string(name), "\"; a public JWK is required"));
    }
  }
  absl::StatusOr<std::string> kty = RequiredString(jwk, "kty");
  if (!kty.ok()) return kty.status();
  if (*kty == "EC") return EcPkey(jwk);
  if (*kty == "RSA") return RsaPkey(jwk);
  if (*kty == "OKP") return OkpPkey(jwk);
  return absl::InvalidArgumentError(absl::StrCat("unsupported kty \"", *kty, "\""));
}

}  // namespace custody::jose
