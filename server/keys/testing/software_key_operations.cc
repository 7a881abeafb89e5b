#include "server/keys/testing/software_key_operations.h"

#include <iterator>

#include "absl/strings/str_cat.h"
#include "jose/curves.h"
#include "jose/jws.h"
#include "openssl/core_names.h"
#include "openssl/rsa.h"
#include "openssl/x509.h"

namespace custody::server::testing {
namespace {

using pkcs11::EvpPkeyPtr;
using pkcs11::KeySpec;
using pkcs11::KeyType;
using pkcs11::SignScheme;

absl::Status OpensslFailed(std::string_view what) {
  return absl::InternalError(
      absl::StrCat("software key operations: ", std::string(what), " failed"));
}

// The EC key types, in the order of jose's one table of curves (P-256, P-384, P-521).
constexpr KeyType kEcTypes[] = {KeyType::kEcP256, KeyType::kEcP384, KeyType::kEcP521};

// The curve of an EC key type; null for the others.
const jose::EcCurve* CurveOf(KeyType type) {
  for (size_t i = 0; i < std::size(kEcTypes); ++i) {
    if (kEcTypes[i] == type) return &jose::EcCurves()[i];
  }
  return nullptr;
}

absl::StatusOr<EvpPkeyPtr> GenerateKey(const KeySpec& spec) {
  EVP_PKEY* key = nullptr;
  if (const jose::EcCurve* curve = CurveOf(spec.type); curve != nullptr) {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", curve->openssl_name.data());
  } else if (spec.type == KeyType::kEd25519) {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  } else if (spec.rsa_bits == 2048 || spec.rsa_bits == 3072 || spec.rsa_bits == 4096) {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<size_t>(spec.rsa_bits));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("RSA-", spec.rsa_bits, " is not offered"));
  }
  if (key == nullptr) return OpensslFailed("key generation");
  return EvpPkeyPtr(key);
}

absl::StatusOr<KeySpec> SpecOf(const EVP_PKEY* key) {
  if (EVP_PKEY_is_a(key, "ED25519")) return KeySpec{.type = KeyType::kEd25519};
  if (EVP_PKEY_is_a(key, "RSA")) {
    return KeySpec{.type = KeyType::kRsa, .rsa_bits = EVP_PKEY_get_bits(key)};
  }
  char group[64] = {};
  if (EVP_PKEY_is_a(key, "EC") &&
      EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                     nullptr) == 1) {
    for (KeyType type : kEcTypes) {
      if (CurveOf(type) == jose::CurveByOpensslName(group)) return KeySpec{.type = type};
    }
  }
  return absl::InvalidArgumentError("unsupported key type");
}

const EVP_MD* PssDigest(SignScheme scheme) {
  switch (scheme) {
    case SignScheme::kRsaPssSha384:
      return EVP_sha384();
    case SignScheme::kRsaPssSha512:
      return EVP_sha512();
    default:
      return EVP_sha256();
  }
}

absl::StatusOr<std::string> SignDigest(EVP_PKEY* key, SignScheme scheme, std::string_view input) {
  OpensslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  if (ctx == nullptr || EVP_PKEY_sign_init(ctx.get()) <= 0) return OpensslFailed("sign init");
  if (scheme == SignScheme::kRsaPkcs1v15) {
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) <= 0) {
      return OpensslFailed("PKCS#1 v1.5 padding");
    }
  } else if (scheme != SignScheme::kEcdsa) {
    const EVP_MD* md = PssDigest(scheme);
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(ctx.get(), md) <= 0 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), md) <= 0 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), EVP_MD_get_size(md)) <= 0) {
      return OpensslFailed("PSS parameters");
    }
  }
  const auto* in = reinterpret_cast<const unsigned char*>(input.data());
  size_t size = 0;
  if (EVP_PKEY_sign(ctx.get(), nullptr, &size, in, input.size()) <= 0) return OpensslFailed("sign");
  std::string out(size, '\0');
  if (EVP_PKEY_sign(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size, in,
                    input.size()) <= 0) {
    return OpensslFailed("sign");
  }
  out.resize(size);
  return out;
}

absl::StatusOr<std::string> SignMessage(EVP_PKEY* key, std::string_view message) {
  OpensslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
  size_t size = 0;
  const auto* in = reinterpret_cast<const unsigned char*>(message.data());
  if (ctx == nullptr || EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, key) <= 0 ||
      EVP_DigestSign(ctx.get(), nullptr, &size, in, message.size()) <= 0) {
    return OpensslFailed("EdDSA sign");
  }
  std::string out(size, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size, in,
                     message.size()) <= 0) {
    return OpensslFailed("EdDSA sign");
  }
  out.resize(size);
  return out;
}

absl::Status NoDecryption() {
  return absl::UnimplementedError("software key operations offer no decryption");
}

}  // namespace

SoftwareKeyOperations::SoftwareKeyOperations() {
  info_.module_path = "(software key operations, unit tests only)";
  info_.label = "software";
  info_.manufacturer = "custody tests";
  info_.model = "software";
  info_.serial = "0";
}

void SoftwareKeyOperations::FailGeneration(absl::Status status, int count) {
  absl::MutexLock lock(&mu_);
  generation_failure_ = std::move(status);
  generation_failures_left_ = count;
}

void SoftwareKeyOperations::FailDestruction(absl::Status status, int count) {
  absl::MutexLock lock(&mu_);
  destruction_failure_ = std::move(status);
  destruction_failures_left_ = count;
}

std::vector<std::string> SoftwareKeyOperations::Ids() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, held] : keys_) ids.push_back(id);
  return ids;
}

bool SoftwareKeyOperations::Holds(std::string_view id) const {
  absl::MutexLock lock(&mu_);
  return Find(id) != nullptr;
}

bool SoftwareKeyOperations::HasMechanism(std::string_view mechanism_name) const {
  for (std::string_view offered :
       {"CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA", "CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA",
        "CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS_PSS", "CKM_RSA_PKCS"}) {
    if (mechanism_name == offered) return true;
  }
  return false;
}

const SoftwareKeyOperations::Held* SoftwareKeyOperations::Find(std::string_view id) const {
  auto it = keys_.find(id);
  return it == keys_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> SoftwareKeyOperations::Add(
    EvpPkeyPtr key, const KeySpec& spec, std::string_view id, std::string_view label) {
  if (id.empty()) return absl::InvalidArgumentError("empty CKA_ID");
  if (Find(id) != nullptr) {
    return absl::AlreadyExistsError("a key pair with this CKA_ID exists");
  }
  if (generation_failures_left_ > 0) {
    --generation_failures_left_;
    return generation_failure_;
  }
  keys_[std::string(id)] = Held{std::move(key), spec, std::string(label)};
  auto pair = std::make_shared<pkcs11::KeyPair>();
  pair->id = std::string(id);
  pair->label = std::string(label);
  pair->spec = spec;
  return pair;
}

absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> SoftwareKeyOperations::GenerateKeyPair(
    const KeySpec& spec, std::string_view id, std::string_view label, bool for_decryption) {
  if (for_decryption) return NoDecryption();
  absl::StatusOr<EvpPkeyPtr> key = GenerateKey(spec);
  if (!key.ok()) return key.status();
  absl::MutexLock lock(&mu_);
  return Add(std::move(*key), spec, id, label);
}

absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> SoftwareKeyOperations::ImportKeyPair(
    const EVP_PKEY* private_key, std::string_view id, std::string_view label, bool for_decryption) {
  if (for_decryption) return NoDecryption();
  absl::StatusOr<KeySpec> spec = SpecOf(private_key);
  if (!spec.ok()) return spec.status();
  EvpPkeyPtr copy(EVP_PKEY_dup(const_cast<EVP_PKEY*>(private_key)));
  if (copy == nullptr) return OpensslFailed("key copy");
  absl::MutexLock lock(&mu_);
  return Add(std::move(copy), *spec, id, label);
}

absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> SoftwareKeyOperations::FindKeyPair(
    std::string_view id) {
  absl::MutexLock lock(&mu_);
  const Held* held = Find(id);
  if (held == nullptr) return absl::NotFoundError("no private key with this CKA_ID");
  auto pair = std::make_shared<pkcs11::KeyPair>();
  pair->id = std::string(id);
  pair->label = held->label;
  pair->spec = held->spec;
  return pair;
}

absl::StatusOr<std::map<std::string, std::shared_ptr<pkcs11::KeyPair>>>
SoftwareKeyOperations::FindAllKeyPairs(std::vector<pkcs11::ObjectInfo>* objects) {
  absl::MutexLock lock(&mu_);
  std::map<std::string, std::shared_ptr<pkcs11::KeyPair>> all;
  for (const auto& [id, held] : keys_) {
    auto pair = std::make_shared<pkcs11::KeyPair>();
    pair->id = id;
    pair->label = held.label;
    pair->spec = held.spec;
    all[id] = std::move(pair);
    if (objects != nullptr) {
      objects->push_back({id, held.label, true});
      objects->push_back({id, held.label, false});
    }
  }
  return all;
}

absl::Status SoftwareKeyOperations::DestroyKeyPair(std::string_view id) {
  absl::MutexLock lock(&mu_);
  if (destruction_failures_left_ > 0) {
    --destruction_failures_left_;
    return destruction_failure_;
  }
  if (auto it = keys_.find(id); it != keys_.end()) keys_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<EvpPkeyPtr> SoftwareKeyOperations::PublicKey(const pkcs11::KeyPair& key) {
  absl::MutexLock lock(&mu_);
  const Held* held = Find(key.id);
  if (held == nullptr) return absl::NotFoundError("no public key with this CKA_ID");
  unsigned char* der = nullptr;
  const int size = i2d_PUBKEY(held->key.get(), &der);
  if (size <= 0) return OpensslFailed("public key encoding");
  const unsigned char* p = der;
  EvpPkeyPtr out(d2i_PUBKEY(nullptr, &p, size));
  OPENSSL_free(der);
  if (out == nullptr) return OpensslFailed("public key decoding");
  return out;
}

absl::StatusOr<std::string> SoftwareKeyOperations::Sign(const pkcs11::KeyPair& key,
                                                        SignScheme scheme, std::string_view input) {
  absl::MutexLock lock(&mu_);
  const Held* held = Find(key.id);
  if (held == nullptr) return absl::UnavailableError("the key's object is gone");
  const bool ec = CurveOf(held->spec.type) != nullptr;
  if ((scheme == SignScheme::kEddsa) != (held->spec.type == KeyType::kEd25519) ||
      (scheme == SignScheme::kEcdsa) != ec) {
    return absl::InvalidArgumentError("the scheme does not fit the key type");
  }
  if (scheme == SignScheme::kEddsa) return SignMessage(held->key.get(), input);
  absl::StatusOr<std::string> signature = SignDigest(held->key.get(), scheme, input);
  if (!signature.ok() || scheme != SignScheme::kEcdsa) return signature;
  return jose::EcdsaDerToRaw(*signature, CurveOf(held->spec.type)->field_bytes);
}

absl::StatusOr<Secret> SoftwareKeyOperations::DecryptRsaOaep(const pkcs11::KeyPair&,
                                                             pkcs11::OaepHash, std::string_view) {
  return NoDecryption();
}

absl::StatusOr<Secret> SoftwareKeyOperations::DecryptRsaRaw(const pkcs11::KeyPair&,
                                                            std::string_view) {
  return NoDecryption();
}

absl::StatusOr<Secret> SoftwareKeyOperations::DeriveEcdh(const pkcs11::KeyPair&, std::string_view) {
  return NoDecryption();
}

}  // namespace custody::server::testing
