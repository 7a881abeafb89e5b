// Public keys out of the token: Cryptoki attributes (CKA_MODULUS/CKA_PUBLIC_EXPONENT, or
// CKA_EC_POINT in either of its encodings) turned into an OpenSSL EVP_PKEY through OSSL_PARAM.
// The JWK is built from that EVP_PKEY in jose/, which knows nothing of Cryptoki.
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "openssl/core_names.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

using ParamBldPtr = OpensslPtr<OSSL_PARAM_BLD>;
using ParamPtr = OpensslPtr<OSSL_PARAM>;

// CKA_EC_POINT is an OCTET STRING holding the point per PKCS#11 (SoftHSM2 does that); some
// modules return the bare point. The expected point size tells the two apart unambiguously.
absl::StatusOr<std::string> UnwrapEcPoint(std::string_view value, size_t point_size) {
  if (value.size() == point_size) return std::string(value);
  if (value.size() >= 2 && static_cast<unsigned char>(value[0]) == 0x04) {
    size_t header = 2;
    size_t length = static_cast<unsigned char>(value[1]);
    if (length == 0x81 && value.size() >= 3) {
      header = 3;
      length = static_cast<unsigned char>(value[2]);
    } else if (length == 0x82 && value.size() >= 4) {
      header = 4;
      length = (static_cast<size_t>(static_cast<unsigned char>(value[2])) << 8) |
               static_cast<unsigned char>(value[3]);
    }
    if (length == point_size && header + length == value.size()) {
      return std::string(value.substr(header));
    }
  }
  return absl::InternalError(absl::StrCat("CKA_EC_POINT of ", value.size(), " bytes is neither a ",
                                          point_size,
                                          "-byte point nor a DER OCTET STRING holding one"));
}

absl::StatusOr<EvpPkeyPtr> PublicKeyFromParams(const char* type, const OSSL_PARAM* params) {
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* pkey = nullptr;
  if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, const_cast<OSSL_PARAM*>(params)) !=
          1) {
    return absl::InternalError(
        absl::StrCat("EVP_PKEY_fromdata(", type, ") rejected the token's public key"));
  }
  return EvpPkeyPtr(pkey);
}

absl::StatusOr<EvpPkeyPtr> EcPublicKey(KeyType type, std::string point) {
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                       const_cast<char*>(GeometryOf(type).group_name), 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()),
      OSSL_PARAM_construct_end(),
  };
  return PublicKeyFromParams("EC", params);
}

}  // namespace

absl::StatusOr<EvpPkeyPtr> RsaPublicKey(std::string_view modulus, std::string_view exponent) {
  BignumPtr n(
      BN_bin2bn(reinterpret_cast<const unsigned char*>(modulus.data()), modulus.size(), nullptr));
  BignumPtr e(
      BN_bin2bn(reinterpret_cast<const unsigned char*>(exponent.data()), exponent.size(), nullptr));
  ParamBldPtr builder(OSSL_PARAM_BLD_new());
  if (n == nullptr || e == nullptr || builder == nullptr ||
      OSSL_PARAM_BLD_push_BN(builder.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(builder.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
    return absl::InternalError("OSSL_PARAM_BLD: cannot build RSA parameters");
  }
  ParamPtr params(OSSL_PARAM_BLD_to_param(builder.get()));
  if (params == nullptr) return absl::InternalError("OSSL_PARAM_BLD_to_param failed");
  return PublicKeyFromParams("RSA", params.get());
}

absl::StatusOr<EvpPkeyPtr> PublicKey(TokenState& state, const KeyPair& key) {
  CK_FUNCTION_LIST* fn = state.fn;
  EvpPkeyPtr pkey;
  CUSTODY_RETURN_IF_ERROR(state.RunOnKey(
      key, CKO_PUBLIC_KEY, [&](SessionPool::Lease& lease, CK_OBJECT_HANDLE handle) -> absl::Status {
        if (key.spec.type == KeyType::kRsa) {
          CUSTODY_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, handle, CKA_MODULUS));
          CUSTODY_ASSIGN_OR_RETURN(std::string exponent,
                                   GetBytes(fn, lease, handle, CKA_PUBLIC_EXPONENT));
          CUSTODY_ASSIGN_OR_RETURN(pkey, RsaPublicKey(modulus, exponent));
          return absl::OkStatus();
        }
        CUSTODY_ASSIGN_OR_RETURN(std::string encoded, GetBytes(fn, lease, handle, CKA_EC_POINT));
        CUSTODY_ASSIGN_OR_RETURN(std::string point,
                                 UnwrapEcPoint(encoded, GeometryOf(key.spec.type).point_size));
        if (key.spec.type == KeyType::kEd25519) {
          pkey.reset(EVP_PKEY_new_raw_public_key_ex(
              nullptr, "ED25519", nullptr, reinterpret_cast<const unsigned char*>(point.data()),
              point.size()));
          if (pkey == nullptr) return absl::InternalError("EVP_PKEY_new_raw_public_key_ex failed");
          return absl::OkStatus();
        }
        CUSTODY_ASSIGN_OR_RETURN(pkey, EcPublicKey(key.spec.type, std::move(point)));
        return absl::OkStatus();
      }));
  return pkey;
}

}  // namespace custody::pkcs11::internal
