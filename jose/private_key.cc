#include "jose/private_key.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/openssl_ptr.h"
#include "common/secret.h"
#include "jose/base64url.h"
#include "jose/curves.h"
#include "openssl/bio.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/crypto.h"
#include "openssl/evp.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
#include "openssl/pem.h"

namespace custody::jose {
namespace {

using SecretBnPtr = SecretBignumPtr;
// OSSL_PARAM_clear_free arrived in OpenSSL 3.2; on 3.0 the private values are wiped by hand.
struct ParamsDeleter {
  void operator()(OSSL_PARAM* params) const {
    for (OSSL_PARAM* p = params; p != nullptr && p->key != nullptr; ++p) {
      if (p->data != nullptr) OPENSSL_cleanse(p->data, p->data_size);
    }
    OSSL_PARAM_free(params);
  }
};

absl::StatusOr<Secret> Member(const Json& jwk, const char* name) {
  const Json* v = jwk.Find(name);
  if (v == nullptr || !v->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat("private JWK: member \"", name, "\" missing"));
  }
  auto bytes = Base64UrlDecode(v->as_string());
  if (!bytes.ok() || bytes->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("private JWK: member \"", name, "\" is not base64url"));
  }
  return Secret(*std::move(bytes));
}

absl::StatusOr<SecretBnPtr> MemberBn(const Json& jwk, const char* name) {
  auto bytes = Member(jwk, name);
  if (!bytes.ok()) return bytes.status();
  SecretBnPtr bn(BN_bin2bn(reinterpret_cast<const unsigned char*>(bytes->view().data()),
                           static_cast<int>(bytes->size()), nullptr));
  if (bn == nullptr) return absl::InternalError("BN_bin2bn failed");
  return bn;
}

absl::StatusOr<PkeyPtr> FromData(const char* type, OSSL_PARAM_BLD* bld) {
  std::unique_ptr<OSSL_PARAM, ParamsDeleter> params(OSSL_PARAM_BLD_to_param(bld));
  OpensslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* raw = nullptr;
  if (params == nullptr || ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_KEYPAIR, params.get()) != 1) {
    return absl::InvalidArgumentError("private JWK: the key parameters are not a valid key");
  }
  PkeyPtr pkey(raw);
  OpensslPtr<EVP_PKEY_CTX> check(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
  if (check == nullptr || EVP_PKEY_pairwise_check(check.get()) != 1) {
    return absl::InvalidArgumentError(
        "private JWK: the private and public parts do not belong together");
  }
  return pkey;
}

absl::StatusOr<PkeyPtr> RsaFromJwk(const Json& jwk) {
  if (jwk.Find("oth") != nullptr) {
    return absl::InvalidArgumentError("private JWK: multi-prime RSA (\"oth\") is not supported");
  }
  OpensslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
  static constexpr std::pair<const char*, const char*> kMembers[] = {
      {"n", OSSL_PKEY_PARAM_RSA_N},          {"e", OSSL_PKEY_PARAM_RSA_E},
      {"d", OSSL_PKEY_PARAM_RSA_D},          {"p", OSSL_PKEY_PARAM_RSA_FACTOR1},
      {"q", OSSL_PKEY_PARAM_RSA_FACTOR2},    {"dp", OSSL_PKEY_PARAM_RSA_EXPONENT1},
      {"dq", OSSL_PKEY_PARAM_RSA_EXPONENT2}, {"qi", OSSL_PKEY_PARAM_RSA_COEFFICIENT1},
  };
  std::vector<SecretBnPtr> bns;  // must outlive OSSL_PARAM_BLD_to_param
  for (const auto& [member, param] : kMembers) {
    auto bn = MemberBn(jwk, member);
    if (!bn.ok()) return bn.status();
    if (OSSL_PARAM_BLD_push_BN(bld.get(), param, bn->get()) != 1) {
      return absl::InternalError("OSSL_PARAM_BLD_push_BN failed");
    }
    bns.push_back(*std::move(bn));
  }
  return FromData("RSA", bld.get());
}

absl::StatusOr<PkeyPtr> EcFromJwk(const Json& jwk) {
  const Json* crv = jwk.Find("crv");
  std::string crv_name = crv != nullptr && crv->is_string() ? crv->as_string() : "";
  const EcCurve* curve = CurveByJwkName(crv_name);
  if (curve == nullptr) {
    return absl::InvalidArgumentError("private JWK: crv must be P-256, P-384 or P-521");
  }
  const char* group = curve->openssl_name.data();
  const size_t field = curve->field_bytes;
  auto x = Member(jwk, "x");
  if (!x.ok()) return x.status();
  auto y = Member(jwk, "y");
  if (!y.ok()) return y.status();
  if (x->size() != field || y->size() != field) {
    return absl::InvalidArgumentError("private JWK: x and y must be the curve's field size");
  }
  auto d = MemberBn(jwk, "d");
  if (!d.ok()) return d.status();
  std::string point = absl::StrCat("\x04", x->view(), y->view());
  OpensslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
  if (OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                       point.size()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, d->get()) != 1) {
    return absl::InternalError("OSSL_PARAM_BLD push failed");
  }
  return FromData("EC", bld.get());
}

absl::StatusOr<PkeyPtr> OkpFromJwk(const Json& jwk) {
  const Json* crv = jwk.Find("crv");
  if (crv == nullptr || !crv->is_string() || crv->as_string() != "Ed25519") {
    return absl::InvalidArgumentError("private JWK: OKP keys must have crv Ed25519");
  }
  auto d = Member(jwk, "d");
  if (!d.ok()) return d.status();
  auto x = Member(jwk, "x");
  if (!x.ok()) return x.status();
  if (d->size() != 32 || x->size() != 32) {
    return absl::InvalidArgumentError("private JWK: Ed25519 d and x must be 32 bytes");
  }
  PkeyPtr pkey(EVP_PKEY_new_raw_private_key_ex(
      nullptr, "ED25519", nullptr, reinterpret_cast<const unsigned char*>(d->view().data()), 32));
  if (pkey == nullptr) return absl::InvalidArgumentError("private JWK: invalid Ed25519 key");
  unsigned char pub[32];
  size_t pub_len = sizeof(pub);
  if (EVP_PKEY_get_raw_public_key(pkey.get(), pub, &pub_len) != 1 || pub_len != 32 ||
      CRYPTO_memcmp(pub, x->view().data(), 32) != 0) {
    return absl::InvalidArgumentError("private JWK: x is not the public key of d");
  }
  return pkey;
}

}  // namespace

absl::StatusOr<PkeyPtr> PrivateKeyFromJwk(const Json& jwk) {
  if (!jwk.is_object()) return absl::InvalidArgumentError("private JWK must be a JSON object");
  const Json* kty = jwk.Find("kty");
  if (kty == nullptr || !kty->is_string()) {
    return absl::InvalidArgumentError("private JWK: member \"kty\" missing");
  }
  if (jwk.Find("d") == nullptr) {
    return absl::InvalidArgumentError("private JWK: member \"d\" missing (a public key?)");
  }
  if (kty->as_string() == "RSA") return RsaFromJwk(jwk);
  if (kty->as_string() == "EC") return EcFromJwk(jwk);
  if (kty->as_string() == "OKP") return OkpFromJwk(jwk);
  return absl::InvalidArgumentError("private JWK: kty must be RSA, EC or OKP");
}

absl::StatusOr<PkeyPtr> PrivateKeyFromPem(absl::string_view pem) {
  if (pem.find("ENCRYPTED") != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        "encrypted PEM is not accepted: decrypt it first (custody has no passphrase channel)");
  }
  OpensslPtr<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return absl::InternalError("BIO_new_mem_buf failed");
  // A callback that refuses passphrases: an encrypted key must not prompt on a terminal.
  auto no_passphrase = [](char*, int, int, void*) -> int { return -1; };
  EVP_PKEY* raw =
      PEM_read_bio_PrivateKey_ex(bio.get(), nullptr, no_passphrase, nullptr, nullptr, nullptr);
  if (raw == nullptr) return absl::InvalidArgumentError("PEM: not an unencrypted private key");
  return PkeyPtr(raw);
}

}  // namespace custody::jose
