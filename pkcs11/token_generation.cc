// Creating key pairs in the token: the object templates (one usage per key, never extractable),
// generation with C_GenerateKeyPair, and import of existing key material (an EVP_PKEY's private
// components in self-wiping buffers) with C_CreateObject. Both are never retried once the token
// may have created something: TokenState::RunCreating reconciles instead.
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/objects.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

using EcGroupPtr = OpensslPtr<EC_GROUP>;
using EcPointPtr = OpensslPtr<EC_POINT>;

// The private key of a new pair: a token object, private, sensitive, never extractable, with
// every usage flag stated: a signing key only signs, a decryption key only decrypts (RSA) or
// derives (EC). Modules default the flags a template leaves out to TRUE (SoftHSM2 2.6.1 does
// for CKA_DECRYPT), which would let a signing key decrypt.
std::vector<CK_ATTRIBUTE> PrivateKeyTemplate(std::string_view id, std::string_view label, bool rsa,
                                             bool for_decryption) {
  return {
      BoolAttr(CKA_TOKEN, true),
      BoolAttr(CKA_PRIVATE, true),
      BoolAttr(CKA_SENSITIVE, true),
      BoolAttr(CKA_EXTRACTABLE, false),
      Attr(CKA_ID, id),
      Attr(CKA_LABEL, label),
      BoolAttr(CKA_SIGN, !for_decryption),
      BoolAttr(CKA_DECRYPT, for_decryption && rsa),
      BoolAttr(CKA_DERIVE, for_decryption && !rsa),
      BoolAttr(CKA_UNWRAP, false),
  };
}

// Its public key: only what custody needs of it (it is never used in the token: signatures are
// verified and encryptions made by the relying parties, from the JWKS), so no usage flag is
// asked for. CKA_WRAP is stated FALSE because some modules default it to TRUE (opencryptoki
// 3.8). CKA_VERIFY and CKA_ENCRYPT are left to the module rather than set FALSE: tpm2-pkcs11 1.9
// derives them from the private key's usages (the public CKA_VERIFY from the private CKA_DECRYPT,
// CKA_ENCRYPT from CKA_SIGN) and fails C_GenerateKeyPair with CKR_GENERAL_ERROR ("User specified
// and TPM specified attr mismatch: 0x10a") on any stated value that differs from its own.
std::vector<CK_ATTRIBUTE> PublicKeyTemplate(std::string_view id, std::string_view label) {
  return {
      BoolAttr(CKA_TOKEN, true), BoolAttr(CKA_PRIVATE, false), BoolAttr(CKA_WRAP, false),
      Attr(CKA_ID, id),          Attr(CKA_LABEL, label),
  };
}

// Runs `call` with the type's CKA_EC_PARAMS (empty for RSA) and returns its CK_RV. Modules differ
// on how Ed25519 is named there (RFC 8410 OID vs the PKCS#11 3.0 PrintableString): when the
// first form is refused, the call is made once more with the other. A refusal created nothing,
// so that is not a retry of a failed creation. `used` receives the form of the last call.
CK_RV WithEcParams(KeyType type, const std::function<CK_RV(std::string_view)>& call,
                   std::string_view* used) {
  *used = GeometryOf(type).ec_params;
  CK_RV rv = call(*used);
  if (type == KeyType::kEd25519 &&
      (rv == CKR_ATTRIBUTE_VALUE_INVALID || rv == CKR_CURVE_NOT_SUPPORTED ||
       rv == CKR_DOMAIN_PARAMS_INVALID || rv == CKR_TEMPLATE_INCONSISTENT)) {
    *used = kEd25519Name;
    rv = call(*used);
  }
  return rv;
}

// `base` with CKA_EC_PARAMS added when `ec_params` is not empty.
std::vector<CK_ATTRIBUTE> WithEcParamsAttribute(std::vector<CK_ATTRIBUTE> base,
                                                std::string_view ec_params) {
  if (!ec_params.empty()) base.push_back(Attr(CKA_EC_PARAMS, ec_params));
  return base;
}

// ALREADY_EXISTS when a private key with CKA_ID=id exists: two pairs with one CKA_ID would make
// FindKeyPair ambiguous forever after.
absl::Status RefuseExistingId(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                              std::string_view id) {
  CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> existing,
                           FindKeyObjects(fn, lease, CKO_PRIVATE_KEY, id));
  if (!existing.empty()) {
    return absl::AlreadyExistsError(
        absl::StrCat("a private key with CKA_ID ", PrintableId(id), " exists"));
  }
  return absl::OkStatus();
}

// Creates pair `id` with `create` (which makes its objects on the lease and returns the KeyPair)
// after refusing an existing id, through TokenState::RunCreating: once `create` starts, the
// creation is never run again, a lost answer is reconciled.
using PairCreation = std::function<absl::StatusOr<std::shared_ptr<KeyPair>>(SessionPool::Lease&)>;
absl::StatusOr<std::shared_ptr<KeyPair>> CreatePair(TokenState& state, std::string_view id,
                                                    const PairCreation& create) {
  bool started = false;
  std::shared_ptr<KeyPair> pair;
  CUSTODY_RETURN_IF_ERROR(state.RunCreating(
      [&](SessionPool::Lease& lease) -> absl::Status {
        CUSTODY_RETURN_IF_ERROR(RefuseExistingId(state.fn, lease, id));
        started = true;
        CUSTODY_ASSIGN_OR_RETURN(pair, create(lease));
        return absl::OkStatus();
      },
      started, id, pair));
  return pair;
}

// A creation the token refused for what was asked (the template, the mechanism, the size or
// curve): retrying cannot change the answer, so it is FAILED_PRECONDITION, not the UNAVAILABLE
// of a device or session error. CKR_GENERAL_ERROR counts here because modules answer a template
// they do not accept with it (tpm2-pkcs11 1.9: "attr mismatch"); a failing device answers
// CKR_DEVICE_ERROR and stays retryable.
absl::Status AsRefusal(absl::Status status) {
  const std::optional<CK_RV> rv = CkrOf(status);
  if (!rv.has_value()) return status;
  switch (*rv) {
    case CKR_TEMPLATE_INCOMPLETE:
    case CKR_TEMPLATE_INCONSISTENT:
    case CKR_ATTRIBUTE_TYPE_INVALID:
    case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_ATTRIBUTE_READ_ONLY:
    case CKR_KEY_SIZE_RANGE:
    case CKR_MECHANISM_INVALID:
    case CKR_MECHANISM_PARAM_INVALID:
    case CKR_CURVE_NOT_SUPPORTED:
    case CKR_DOMAIN_PARAMS_INVALID:
    case CKR_GENERAL_ERROR:
      break;
    default:
      return status;
  }
  absl::Status refused = absl::FailedPreconditionError(absl::StrCat(
      status.message(),
      ": the token refuses to create this key (template, mechanism, size or curve); retrying "
      "will not change that (the module's own output in the log may say more)"));
  status.ForEachPayload(
      [&](absl::string_view type, const absl::Cord& value) { refused.SetPayload(type, value); });
  return refused;
}

// ---- Key material ----------------------------------------------------------------------------

// A key to import as Cryptoki attribute values. Private components live in Secrets, so they
// are wiped (OPENSSL_cleanse) when this goes, on every path.
struct KeyMaterial {
  KeySpec spec;
  CK_KEY_TYPE key_type = CKK_RSA;
  std::vector<std::pair<CK_ATTRIBUTE_TYPE, Secret>> private_values;
  std::vector<std::pair<CK_ATTRIBUTE_TYPE, std::string>> public_values;
};

// Integer parameter `name` of `pkey`, big-endian, left-padded to `size` bytes when size > 0.
// NOT_FOUND when the key lacks it.
absl::StatusOr<Secret> BnParam(const EVP_PKEY* pkey, const char* name, size_t size = 0) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &raw) != 1 || raw == nullptr) {
    return absl::NotFoundError(absl::StrCat("the key has no '", name, "' parameter"));
  }
  SecretBignumPtr bn(raw);
  const size_t needed = static_cast<size_t>(BN_num_bytes(bn.get()));
  if (size == 0) size = needed;
  if (needed > size) {
    return absl::InvalidArgumentError(absl::StrCat("key parameter '", name, "' is too long"));
  }
  Secret out(std::string(size, '\0'));
  if (BN_bn2binpad(bn.get(), reinterpret_cast<unsigned char*>(out.mutable_value().data()),
                   static_cast<int>(size)) != static_cast<int>(size)) {
    return absl::InternalError("BN_bn2binpad failed");
  }
  return out;
}

absl::StatusOr<KeyMaterial> RsaKeyMaterial(const EVP_PKEY* pkey) {
  const int bits = EVP_PKEY_get_bits(pkey);
  if (bits < 2048 || bits > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("RSA keys of 2048 to 4096 bits can be imported, not ", bits));
  }
  KeyMaterial key;
  key.spec = KeySpec{.type = KeyType::kRsa, .rsa_bits = bits};
  key.key_type = CKK_RSA;
  static constexpr std::pair<CK_ATTRIBUTE_TYPE, const char*> kComponents[] = {
      {CKA_MODULUS, OSSL_PKEY_PARAM_RSA_N},
      {CKA_PUBLIC_EXPONENT, OSSL_PKEY_PARAM_RSA_E},
      {CKA_PRIVATE_EXPONENT, OSSL_PKEY_PARAM_RSA_D},
      {CKA_PRIME_1, OSSL_PKEY_PARAM_RSA_FACTOR1},
      {CKA_PRIME_2, OSSL_PKEY_PARAM_RSA_FACTOR2},
      {CKA_EXPONENT_1, OSSL_PKEY_PARAM_RSA_EXPONENT1},
      {CKA_EXPONENT_2, OSSL_PKEY_PARAM_RSA_EXPONENT2},
      {CKA_COEFFICIENT, OSSL_PKEY_PARAM_RSA_COEFFICIENT1},
  };
  key.private_values.reserve(std::size(kComponents));
  for (const auto& [attribute, name] : kComponents) {
    absl::StatusOr<Secret> value = BnParam(pkey, name);
    if (absl::IsNotFound(value.status())) {
      // A public key, or a private key without its CRT parameters (which tokens need to sign
      // at a useful speed, and some need at all).
      return absl::InvalidArgumentError(
          absl::StrCat("the RSA key lacks '", name, "': import needs a full private key"));
    }
    if (!value.ok()) return value.status();
    if (attribute == CKA_MODULUS || attribute == CKA_PUBLIC_EXPONENT) {
      key.public_values.emplace_back(attribute, std::string(value->view()));
    }
    key.private_values.emplace_back(attribute, *std::move(value));
  }
  return key;
}

absl::StatusOr<KeyMaterial> EcKeyMaterial(const EVP_PKEY* pkey) {
  char group_name[64] = {};
  size_t group_name_size = 0;
  if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group_name,
                                     sizeof(group_name), &group_name_size) != 1) {
    return absl::InvalidArgumentError("the EC key has no named curve");
  }
  int nid = OBJ_txt2nid(group_name);
  if (nid == NID_undef) nid = EC_curve_nist2nid(group_name);
  KeyMaterial key;
  key.key_type = CKK_EC;
  switch (nid) {
    case NID_X9_62_prime256v1:
      key.spec.type = KeyType::kEcP256;
      break;
    case NID_secp384r1:
      key.spec.type = KeyType::kEcP384;
      break;
    case NID_secp521r1:
      key.spec.type = KeyType::kEcP521;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("EC keys on P-256, P-384 or P-521 can be imported, not ", group_name));
  }
  const size_t point_size = GeometryOf(key.spec.type).point_size;
  const size_t field_size = (point_size - 1) / 2;

  absl::StatusOr<Secret> scalar = BnParam(pkey, OSSL_PKEY_PARAM_PRIV_KEY, field_size);
  if (absl::IsNotFound(scalar.status())) {
    return absl::InvalidArgumentError("the EC key has no private scalar");
  }
  if (!scalar.ok()) return scalar.status();

  // The public point as the key holds it (possibly compressed), re-encoded uncompressed;
  // decoding also checks that it is on the curve.
  unsigned char encoded[133];
  size_t encoded_size = 0;
  if (EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_PUB_KEY, encoded, sizeof(encoded),
                                      &encoded_size) != 1) {
    return absl::InvalidArgumentError("the EC key has no public point");
  }
  EcGroupPtr group(EC_GROUP_new_by_curve_name(nid));
  EcPointPtr point(group ? EC_POINT_new(group.get()) : nullptr);
  std::string uncompressed(point_size, '\0');
  if (point == nullptr ||
      EC_POINT_oct2point(group.get(), point.get(), encoded, encoded_size, nullptr) != 1 ||
      EC_POINT_point2oct(group.get(), point.get(), POINT_CONVERSION_UNCOMPRESSED,
                         reinterpret_cast<unsigned char*>(uncompressed.data()), point_size,
                         nullptr) != point_size) {
    return absl::InvalidArgumentError("the EC key's public point does not decode");
  }
  key.private_values.emplace_back(CKA_VALUE, *std::move(scalar));
  key.public_values.emplace_back(CKA_EC_POINT, DerOctetString(uncompressed));
  return key;
}

absl::StatusOr<KeyMaterial> Ed25519KeyMaterial(const EVP_PKEY* pkey) {
  KeyMaterial key;
  key.spec.type = KeyType::kEd25519;
  key.key_type = CKK_EC_EDWARDS;
  Secret seed(std::string(32, '\0'));
  size_t seed_size = seed.size();
  if (EVP_PKEY_get_raw_private_key(
          pkey, reinterpret_cast<unsigned char*>(seed.mutable_value().data()), &seed_size) != 1 ||
      seed_size != 32) {
    return absl::InvalidArgumentError("the Ed25519 key has no private key");
  }
  std::string public_key(32, '\0');
  size_t public_size = public_key.size();
  if (EVP_PKEY_get_raw_public_key(pkey, reinterpret_cast<unsigned char*>(public_key.data()),
                                  &public_size) != 1 ||
      public_size != 32) {
    return absl::InvalidArgumentError("the Ed25519 key has no public key");
  }
  key.private_values.emplace_back(CKA_VALUE, std::move(seed));
  key.public_values.emplace_back(CKA_EC_POINT, DerOctetString(public_key));
  return key;
}

absl::StatusOr<KeyMaterial> ImportableKeyMaterial(const EVP_PKEY* pkey) {
  if (EVP_PKEY_is_a(pkey, "RSA")) return RsaKeyMaterial(pkey);
  if (EVP_PKEY_is_a(pkey, "EC")) return EcKeyMaterial(pkey);
  if (EVP_PKEY_is_a(pkey, "ED25519")) return Ed25519KeyMaterial(pkey);
  return absl::InvalidArgumentError(absl::StrCat("keys of type '", EVP_PKEY_get0_type_name(pkey),
                                                 "' cannot be imported (RSA, EC, Ed25519)"));
}

}  // namespace

absl::StatusOr<std::shared_ptr<KeyPair>> GenerateKeyPair(TokenState& state, const KeySpec& spec,
                                                         std::string_view id,
                                                         std::string_view label,
                                                         bool for_decryption) {
  if (id.empty()) return absl::InvalidArgumentError("GenerateKeyPair: empty CKA_ID");
  if (spec.type == KeyType::kRsa && spec.rsa_bits != 2048 && spec.rsa_bits != 3072 &&
      spec.rsa_bits != 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("RSA keys are 2048, 3072 or 4096 bits, not ", spec.rsa_bits));
  }
  if (spec.type == KeyType::kEd25519 && for_decryption) {
    return absl::InvalidArgumentError("Ed25519 keys cannot decrypt");
  }
  CK_FUNCTION_LIST* fn = state.fn;
  const bool rsa = spec.type == KeyType::kRsa;
  const CK_ULONG modulus_bits = static_cast<CK_ULONG>(spec.rsa_bits);
  static constexpr unsigned char kF4[] = {0x01, 0x00, 0x01};

  std::vector<CK_ATTRIBUTE> public_template = PublicKeyTemplate(id, label);
  if (rsa) {
    public_template.push_back(Attr(CKA_MODULUS_BITS, &modulus_bits, sizeof(modulus_bits)));
    public_template.push_back(Attr(CKA_PUBLIC_EXPONENT, kF4, sizeof(kF4)));
  }
  std::vector<CK_ATTRIBUTE> private_template = PrivateKeyTemplate(id, label, rsa, for_decryption);

  CK_MECHANISM mechanism{};
  mechanism.mechanism = rsa                              ? CKM_RSA_PKCS_KEY_PAIR_GEN
                        : spec.type == KeyType::kEd25519 ? CKM_EC_EDWARDS_KEY_PAIR_GEN
                                                         : CKM_EC_KEY_PAIR_GEN;
  absl::StatusOr<std::shared_ptr<KeyPair>> pair = CreatePair(
      state, id, [&](SessionPool::Lease& lease) -> absl::StatusOr<std::shared_ptr<KeyPair>> {
        CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
        CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
        std::string_view ec_params;
        CK_RV rv = WithEcParams(
            spec.type,
            [&](std::string_view params) {
              std::vector<CK_ATTRIBUTE> public_attributes =
                  WithEcParamsAttribute(public_template, params);
              return fn->C_GenerateKeyPair(lease.get(), &mechanism, public_attributes.data(),
                                           public_attributes.size(), private_template.data(),
                                           private_template.size(), &public_key, &private_key);
            },
            &ec_params);
        CUSTODY_RETURN_IF_ERROR(lease.Check("C_GenerateKeyPair", rv));
        KeySpec generated = spec;
        if (!rsa) generated.rsa_bits = 0;
        return MakeKeyPair(id, std::string(label), generated, private_key, public_key,
                           state.module->generation());
      });
  if (!pair.ok()) return AsRefusal(pair.status());
  return pair;
}

absl::StatusOr<std::shared_ptr<KeyPair>> ImportKeyPair(TokenState& state,
                                                       const EVP_PKEY* private_key,
                                                       std::string_view id, std::string_view label,
                                                       bool for_decryption) {
  if (private_key == nullptr) return absl::InvalidArgumentError("ImportKeyPair: no key");
  if (id.empty()) return absl::InvalidArgumentError("ImportKeyPair: empty CKA_ID");
  CUSTODY_ASSIGN_OR_RETURN(KeyMaterial material, ImportableKeyMaterial(private_key));
  const KeyType type = material.spec.type;
  if (type == KeyType::kEd25519 && for_decryption) {
    return absl::InvalidArgumentError("Ed25519 keys cannot decrypt");
  }
  CK_FUNCTION_LIST* fn = state.fn;
  const bool rsa = type == KeyType::kRsa;
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  // The templates of GenerateKeyPair, with the class, the key type and the values.
  std::vector<CK_ATTRIBUTE> private_template = PrivateKeyTemplate(id, label, rsa, for_decryption);
  private_template.push_back(Attr(CKA_CLASS, &private_class, sizeof(private_class)));
  private_template.push_back(Attr(CKA_KEY_TYPE, &material.key_type, sizeof(material.key_type)));
  for (const auto& [attribute, value] : material.private_values) {
    private_template.push_back(Attr(attribute, value.view().data(), value.size()));
  }
  std::vector<CK_ATTRIBUTE> public_template = PublicKeyTemplate(id, label);
  public_template.push_back(Attr(CKA_CLASS, &public_class, sizeof(public_class)));
  public_template.push_back(Attr(CKA_KEY_TYPE, &material.key_type, sizeof(material.key_type)));
  for (const auto& [attribute, value] : material.public_values) {
    public_template.push_back(Attr(attribute, value));
  }

  absl::StatusOr<std::shared_ptr<KeyPair>> pair = CreatePair(
      state, id, [&](SessionPool::Lease& lease) -> absl::StatusOr<std::shared_ptr<KeyPair>> {
        auto create = [&](const std::vector<CK_ATTRIBUTE>& base, std::string_view ec_params,
                          CK_OBJECT_HANDLE* handle) {
          std::vector<CK_ATTRIBUTE> attributes = WithEcParamsAttribute(base, ec_params);
          return fn->C_CreateObject(lease.get(), attributes.data(), attributes.size(), handle);
        };
        std::string_view ec_params;
        CK_OBJECT_HANDLE private_handle = CK_INVALID_HANDLE;
        CK_RV rv = WithEcParams(
            type,
            [&](std::string_view params) {
              return create(private_template, params, &private_handle);
            },
            &ec_params);
        CUSTODY_RETURN_IF_ERROR(lease.Check("C_CreateObject(private key)", rv));
        // No half-imported pair: the private key goes again unless the public key follows it.
        ScopedObject private_object(fn, lease, private_handle);
        CK_OBJECT_HANDLE public_handle = CK_INVALID_HANDLE;
        CUSTODY_RETURN_IF_ERROR(lease.Check("C_CreateObject(public key)",
                                            create(public_template, ec_params, &public_handle)));
        return MakeKeyPair(id, std::string(label), material.spec, private_object.release(),
                           public_handle, state.module->generation());
      });
  if (!pair.ok()) return AsRefusal(pair.status());
  return pair;
}

}  // namespace custody::pkcs11::internal
