#include "pkcs11/token.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/objects.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
#include "openssl/rand.h"
#include "openssl/rsa.h"
#include "pkcs11/cryptoki.h"
#include "pkcs11/session_pool.h"

namespace custody::pkcs11 {
namespace {

constexpr CK_BBOOL kTrue = CK_TRUE;
constexpr CK_BBOOL kFalse = CK_FALSE;

// DER-encoded CKA_EC_PARAMS values (namedCurve OIDs; RFC 8410 id-Ed25519; and the PKCS#11 3.0
// PrintableString form "edwards25519" that some modules expect instead of the OID).
constexpr std::string_view kP256Oid("\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07", 10);
constexpr std::string_view kP384Oid("\x06\x05\x2b\x81\x04\x00\x22", 7);
constexpr std::string_view kP521Oid("\x06\x05\x2b\x81\x04\x00\x23", 7);
constexpr std::string_view kEd25519Oid("\x06\x03\x2b\x65\x70", 5);
constexpr std::string_view kEd25519Name(
    "\x13\x0c"
    "edwards25519",
    14);

constexpr size_t kLabelSize = 32;  // CK_TOKEN_INFO.label, blank-padded

CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, const void* value, size_t size) {
  // Cryptoki templates take non-const pointers even for input attributes; nothing writes them.
  return CK_ATTRIBUTE{type, const_cast<void*>(value), size};
}
CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, std::string_view bytes) {
  return Attr(type, bytes.data(), bytes.size());
}
CK_ATTRIBUTE BoolAttr(CK_ATTRIBUTE_TYPE type, bool value) {
  return Attr(type, value ? &kTrue : &kFalse, sizeof(CK_BBOOL));
}

// The usage flags of a private key, every one stated: a signing key only signs, a decryption
// key only decrypts (RSA) or derives (EC). Modules default the flags a template leaves out to
// TRUE (SoftHSM2 2.6.1 does for CKA_DECRYPT), which would let a signing key decrypt.
void AppendPrivateKeyUsage(std::vector<CK_ATTRIBUTE>& attributes, bool rsa, bool for_decryption) {
  attributes.push_back(BoolAttr(CKA_SIGN, !for_decryption));
  attributes.push_back(BoolAttr(CKA_DECRYPT, for_decryption && rsa));
  attributes.push_back(BoolAttr(CKA_DERIVE, for_decryption && !rsa));
  attributes.push_back(BoolAttr(CKA_UNWRAP, false));
}

std::string PrintableId(std::string_view id) {
  return absl::StrCat("'", absl::CHexEscape(AsAbsl(id)), "'");
}

// ---- Key geometry --------------------------------------------------------------------------

// Uncompressed EC point (04||X||Y) or raw Ed25519 public key length.
size_t PublicPointSize(KeyType type) {
  switch (type) {
    case KeyType::kEcP256:
      return 65;
    case KeyType::kEcP384:
      return 97;
    case KeyType::kEcP521:
      return 133;
    case KeyType::kEd25519:
      return 32;
    case KeyType::kRsa:
      return 0;
  }
  return 0;
}

size_t SignatureSize(const KeySpec& spec) {
  switch (spec.type) {
    case KeyType::kEcP256:
      return 64;
    case KeyType::kEcP384:
      return 96;
    case KeyType::kEcP521:
      return 132;
    case KeyType::kEd25519:
      return 64;
    case KeyType::kRsa:
      // An unknown size is corrected by CKR_BUFFER_TOO_SMALL below.
      return spec.rsa_bits > 0 ? static_cast<size_t>(spec.rsa_bits + 7) / 8 : 512;
  }
  return 0;
}

std::string_view EcParams(KeyType type) {
  switch (type) {
    case KeyType::kEcP256:
      return kP256Oid;
    case KeyType::kEcP384:
      return kP384Oid;
    case KeyType::kEcP521:
      return kP521Oid;
    case KeyType::kEd25519:
      return kEd25519Oid;
    case KeyType::kRsa:
      return {};
  }
  return {};
}

const char* GroupName(KeyType type) {
  switch (type) {
    case KeyType::kEcP256:
      return "prime256v1";
    case KeyType::kEcP384:
      return "secp384r1";
    case KeyType::kEcP521:
      return "secp521r1";
    default:
      return nullptr;
  }
}

bool IsEc(KeyType type) {
  return type == KeyType::kEcP256 || type == KeyType::kEcP384 || type == KeyType::kEcP521;
}

// ---- Slots ---------------------------------------------------------------------------------

struct SlotToken {
  CK_SLOT_ID slot = 0;
  std::string label;
  std::string manufacturer;
  std::string model;
  std::string serial;
  bool initialized = false;
};

absl::StatusOr<std::vector<SlotToken>> ListTokens(CK_FUNCTION_LIST* fn) {
  std::vector<CK_SLOT_ID> slots;
  CK_RV rv;
  // The slot count can change between the two calls (SoftHSM2 adds a free slot after each
  // C_InitToken), hence the loop on CKR_BUFFER_TOO_SMALL.
  do {
    CK_ULONG count = 0;
    rv = fn->C_GetSlotList(CK_TRUE, nullptr, &count);
    if (rv != CKR_OK) return CkError("C_GetSlotList", rv);
    slots.resize(count);
    rv = fn->C_GetSlotList(CK_TRUE, slots.data(), &count);
    if (rv == CKR_OK) slots.resize(count);
  } while (rv == CKR_BUFFER_TOO_SMALL);
  if (rv != CKR_OK) return CkError("C_GetSlotList", rv);

  std::vector<SlotToken> tokens;
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    rv = fn->C_GetTokenInfo(slot, &info);
    if (rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_TOKEN_NOT_RECOGNIZED) continue;
    if (rv != CKR_OK) return CkError("C_GetTokenInfo", rv);
    SlotToken token;
    token.slot = slot;
    token.label = TrimPadded(info.label, sizeof(info.label));
    token.manufacturer = TrimPadded(info.manufacturerID, sizeof(info.manufacturerID));
    token.model = TrimPadded(info.model, sizeof(info.model));
    token.serial = TrimPadded(info.serialNumber, sizeof(info.serialNumber));
    token.initialized = (info.flags & CKF_TOKEN_INITIALIZED) != 0;
    tokens.push_back(std::move(token));
  }
  return tokens;
}

std::string StripTrailingBlanks(std::string_view s) {
  return std::string(absl::StripTrailingAsciiWhitespace(AsAbsl(s)));
}

bool Matches(const TokenSelector& selector, const SlotToken& token) {
  if (!token.initialized) return false;
  if (!selector.label.empty() && StripTrailingBlanks(selector.label) != token.label) return false;
  if (!selector.serial.empty() && selector.serial != token.serial) return false;
  if (!selector.manufacturer.empty() && selector.manufacturer != token.manufacturer) return false;
  if (!selector.model.empty() && selector.model != token.model) return false;
  if (selector.slot_id.has_value() && *selector.slot_id != token.slot) return false;
  return true;
}

std::string DescribeSelector(const TokenSelector& selector) {
  std::vector<std::string> parts;
  if (!selector.label.empty()) parts.push_back(absl::StrCat("token='", selector.label, "'"));
  if (!selector.serial.empty()) parts.push_back(absl::StrCat("serial='", selector.serial, "'"));
  if (!selector.manufacturer.empty()) {
    parts.push_back(absl::StrCat("manufacturer='", selector.manufacturer, "'"));
  }
  if (!selector.model.empty()) parts.push_back(absl::StrCat("model='", selector.model, "'"));
  if (selector.slot_id.has_value()) parts.push_back(absl::StrCat("slot-id=", *selector.slot_id));
  return parts.empty() ? "any token" : absl::StrJoin(parts, ";");
}

// A session owned for one short sequence outside the pool (token initialization).
class ScopedSession {
 public:
  ScopedSession(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE session) : fn_(fn), session_(session) {}
  ~ScopedSession() { fn_->C_CloseSession(session_); }
  ScopedSession(const ScopedSession&) = delete;
  ScopedSession& operator=(const ScopedSession&) = delete;
  CK_SESSION_HANDLE get() const { return session_; }

 private:
  CK_FUNCTION_LIST* fn_;
  CK_SESSION_HANDLE session_;
};

// C_Login/C_InitPIN take non-const pointers but do not write through them.
CK_UTF8CHAR* PinPtr(const Secret& pin) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin.view().data()));
}

// ---- Objects -------------------------------------------------------------------------------

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(CK_FUNCTION_LIST* fn,
                                                          SessionPool::Lease& lease,
                                                          std::vector<CK_ATTRIBUTE> match) {
  P11_RETURN_IF_ERROR(lease.Check("C_FindObjectsInit",
                                  fn->C_FindObjectsInit(lease.get(), match.data(), match.size())));
  std::vector<CK_OBJECT_HANDLE> found;
  absl::Status status;
  for (;;) {
    CK_OBJECT_HANDLE batch[64];
    CK_ULONG count = 0;
    CK_RV rv = fn->C_FindObjects(lease.get(), batch, std::size(batch), &count);
    if (rv != CKR_OK) {
      status = lease.Check("C_FindObjects", rv);
      break;
    }
    if (count == 0) break;
    found.insert(found.end(), batch, batch + count);
  }
  // Always end the search, or the session would refuse the next operation.
  CK_RV rv = fn->C_FindObjectsFinal(lease.get());
  P11_RETURN_IF_ERROR(status);
  P11_RETURN_IF_ERROR(lease.Check("C_FindObjectsFinal", rv));
  return found;
}

absl::StatusOr<std::string> GetBytes(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                     CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attribute{type, nullptr, 0};
  P11_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                  fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  if (attribute.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return absl::InternalError("C_GetAttributeValue: attribute unavailable");
  }
  std::string value(attribute.ulValueLen, '\0');
  attribute.pValue = value.data();
  P11_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                  fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  value.resize(attribute.ulValueLen);
  return value;
}

absl::StatusOr<CK_ULONG> GetUlong(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                  CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ULONG value = 0;
  CK_ATTRIBUTE attribute{type, &value, sizeof(value)};
  P11_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                  fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  return value;
}

absl::StatusOr<CK_OBJECT_HANDLE> FindOne(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                         CK_OBJECT_CLASS object_class, std::string_view id) {
  P11_ASSIGN_OR_RETURN(
      std::vector<CK_OBJECT_HANDLE> found,
      FindObjects(fn, lease,
                  {Attr(CKA_CLASS, &object_class, sizeof(object_class)), Attr(CKA_ID, id)}));
  const char* what = object_class == CKO_PRIVATE_KEY ? "private" : "public";
  if (found.empty()) {
    return absl::NotFoundError(absl::StrCat("no ", what, " key with CKA_ID ", PrintableId(id)));
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError(absl::StrCat(found.size(), " ", what,
                                                      " keys share CKA_ID ", PrintableId(id),
                                                      "; resolve the duplicate in the token"));
  }
  return found.front();
}

// The spec of an RSA key from its modulus (CKA_MODULUS_BITS lives on the public key only; the
// modulus is public on both).
absl::StatusOr<KeySpec> RsaSpec(std::string_view modulus) {
  size_t first = modulus.find_first_not_of('\0');
  if (first == std::string_view::npos) return absl::InternalError("RSA key with a zero modulus");
  int bits = static_cast<int>(modulus.size() - first) * 8;
  for (unsigned char top = modulus[first]; (top & 0x80) == 0; top <<= 1) --bits;
  return KeySpec{.type = KeyType::kRsa, .rsa_bits = bits};
}

// The spec of an EC or EdDSA key from its CKA_EC_PARAMS.
absl::StatusOr<KeySpec> EcSpec(std::string_view params) {
  KeySpec spec;
  if (params == kP256Oid) {
    spec.type = KeyType::kEcP256;
  } else if (params == kP384Oid) {
    spec.type = KeyType::kEcP384;
  } else if (params == kP521Oid) {
    spec.type = KeyType::kEcP521;
  } else if (params == kEd25519Oid || params == kEd25519Name) {
    spec.type = KeyType::kEd25519;
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat("unsupported CKA_EC_PARAMS ",
                     absl::BytesToHexString(absl::string_view(params.data(), params.size()))));
  }
  return spec;
}

absl::StatusOr<KeySpec> ReadKeySpec(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                    CK_OBJECT_HANDLE private_key) {
  P11_ASSIGN_OR_RETURN(CK_ULONG key_type, GetUlong(fn, lease, private_key, CKA_KEY_TYPE));
  if (key_type == CKK_RSA) {
    P11_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, private_key, CKA_MODULUS));
    return RsaSpec(modulus);
  }
  if (key_type != CKK_EC && key_type != CKK_EC_EDWARDS) {
    return absl::FailedPreconditionError(
        absl::StrCat("unsupported CKA_KEY_TYPE 0x", absl::Hex(key_type)));
  }
  P11_ASSIGN_OR_RETURN(std::string params, GetBytes(fn, lease, private_key, CKA_EC_PARAMS));
  return EcSpec(params);
}

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

// ---- OpenSSL owners ------------------------------------------------------------------------

struct EvpPkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
struct BignumDeleter {
  void operator()(BIGNUM* p) const { BN_free(p); }
};
struct ParamBldDeleter {
  void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); }
};
struct ParamDeleter {
  void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); }
};

absl::StatusOr<EvpPkeyPtr> PublicKeyFromParams(const char* type, const OSSL_PARAM* params) {
  std::unique_ptr<EVP_PKEY_CTX, EvpPkeyCtxDeleter> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* pkey = nullptr;
  if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, const_cast<OSSL_PARAM*>(params)) !=
          1) {
    return absl::InternalError(
        absl::StrCat("EVP_PKEY_fromdata(", type, ") rejected the token's public key"));
  }
  return EvpPkeyPtr(pkey);
}

absl::StatusOr<EvpPkeyPtr> RsaPublicKey(std::string_view modulus, std::string_view exponent) {
  std::unique_ptr<BIGNUM, BignumDeleter> n(
      BN_bin2bn(reinterpret_cast<const unsigned char*>(modulus.data()), modulus.size(), nullptr));
  std::unique_ptr<BIGNUM, BignumDeleter> e(
      BN_bin2bn(reinterpret_cast<const unsigned char*>(exponent.data()), exponent.size(), nullptr));
  std::unique_ptr<OSSL_PARAM_BLD, ParamBldDeleter> builder(OSSL_PARAM_BLD_new());
  if (n == nullptr || e == nullptr || builder == nullptr ||
      OSSL_PARAM_BLD_push_BN(builder.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(builder.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
    return absl::InternalError("OSSL_PARAM_BLD: cannot build RSA parameters");
  }
  std::unique_ptr<OSSL_PARAM, ParamDeleter> params(OSSL_PARAM_BLD_to_param(builder.get()));
  if (params == nullptr) return absl::InternalError("OSSL_PARAM_BLD_to_param failed");
  return PublicKeyFromParams("RSA", params.get());
}

absl::StatusOr<EvpPkeyPtr> EcPublicKey(KeyType type, std::string point) {
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                       const_cast<char*>(GroupName(type)), 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()),
      OSSL_PARAM_construct_end(),
  };
  return PublicKeyFromParams("EC", params);
}

// ---- Decryption ----------------------------------------------------------------------------

constexpr char kDecryptionFailed[] = "decryption failed";

const char* OaepHashName(OaepHash hash) { return hash == OaepHash::kSha1 ? "SHA-1" : "SHA-256"; }

// Destroys a session or token object when the scope ends, on every path (a derived secret, a
// probe key, a half-imported pair), unless released. The lease must outlive it.
class ScopedObject {
 public:
  ScopedObject(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease, CK_OBJECT_HANDLE handle)
      : fn_(fn), lease_(lease), handle_(handle) {}
  ~ScopedObject() {
    // Best effort: on a broken session this fails, and a session object goes with the session.
    if (handle_ != CK_INVALID_HANDLE) fn_->C_DestroyObject(lease_.get(), handle_);
  }
  ScopedObject(const ScopedObject&) = delete;
  ScopedObject& operator=(const ScopedObject&) = delete;
  CK_OBJECT_HANDLE get() const { return handle_; }
  CK_OBJECT_HANDLE release() { return std::exchange(handle_, CK_INVALID_HANDLE); }

 private:
  CK_FUNCTION_LIST* fn_;
  SessionPool::Lease& lease_;
  CK_OBJECT_HANDLE handle_;
};

// k, the modulus size in bytes, from the KeySpec or (unknown there) from the key's CKA_MODULUS.
absl::StatusOr<size_t> ModulusBytes(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                    CK_OBJECT_HANDLE key, const KeySpec& spec) {
  if (spec.rsa_bits > 0) return static_cast<size_t>(spec.rsa_bits + 7) / 8;
  P11_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, key, CKA_MODULUS));
  const size_t first = modulus.find_first_not_of('\0');
  if (first == std::string::npos) return absl::InternalError("RSA key with a zero modulus");
  return modulus.size() - first;
}

// The status of a failed C_Decrypt. Failures of the token or the session keep their CkError
// status (and a broken session is discarded); every other code is about the ciphertext and
// becomes one and the same INVALID_ARGUMENT, so that no caller can tell bad padding from a bad
// length (a padding oracle). SoftHSM2 reports bad OAEP padding as CKR_GENERAL_ERROR, which
// elsewhere means an unavailable token: from C_Decrypt it counts as a decryption failure.
absl::Status DecryptFailure(SessionPool::Lease& lease, CK_RV rv) {
  const bool token_failure = rv != CKR_GENERAL_ERROR &&
                             (IsSessionBroken(rv) || rv == CKR_HOST_MEMORY ||
                              CkError("C_Decrypt", rv).code() == absl::StatusCode::kUnavailable);
  if (token_failure) return lease.Check("C_Decrypt", rv);
  return absl::InvalidArgumentError(kDecryptionFailed);
}

// C_Decrypt after a successful C_DecryptInit (which it always ends): the plaintext, into a
// k-byte buffer.
absl::StatusOr<Secret> RunDecrypt(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                  size_t modulus_bytes, std::string_view ciphertext) {
  Secret plaintext(std::string(modulus_bytes, '\0'));
  std::string& out = plaintext.mutable_value();
  auto* data = reinterpret_cast<CK_BYTE*>(const_cast<char*>(ciphertext.data()));
  CK_ULONG length = out.size();
  CK_RV rv = fn->C_Decrypt(lease.get(), data, ciphertext.size(),
                           reinterpret_cast<CK_BYTE*>(out.data()), &length);
  if (rv == CKR_BUFFER_TOO_SMALL) {
    // Not expected with k bytes; the operation stays active and `length` is the size needed.
    out.assign(length, '\0');
    rv = fn->C_Decrypt(lease.get(), data, ciphertext.size(), reinterpret_cast<CK_BYTE*>(out.data()),
                       &length);
  }
  if (rv != CKR_OK) return DecryptFailure(lease, rv);
  if (length > out.size()) return absl::InternalError("C_Decrypt: length beyond the buffer");
  out.resize(length);
  return plaintext;
}

// CKM_RSA_PKCS_OAEP with `hash` for OAEP and MGF1 and an empty label, on a resolved handle.
absl::StatusOr<Secret> DecryptOaep(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                   CK_OBJECT_HANDLE key, OaepHash hash, size_t modulus_bytes,
                                   std::string_view ciphertext) {
  // Checked before C_DecryptInit: returning between Init and C_Decrypt would leave the
  // operation active in the session.
  if (ciphertext.size() != modulus_bytes) return absl::InvalidArgumentError(kDecryptionFailed);
  CK_RSA_PKCS_OAEP_PARAMS params{};
  params.hashAlg = hash == OaepHash::kSha1 ? CKM_SHA_1 : CKM_SHA256;
  params.mgf = hash == OaepHash::kSha1 ? CKG_MGF1_SHA1 : CKG_MGF1_SHA256;
  params.source = CKZ_DATA_SPECIFIED;
  params.pSourceData = nullptr;
  params.ulSourceDataLen = 0;
  CK_MECHANISM mechanism{CKM_RSA_PKCS_OAEP, &params, sizeof(params)};
  CK_RV rv = fn->C_DecryptInit(lease.get(), &mechanism, key);
  if (rv == CKR_ARGUMENTS_BAD || rv == CKR_MECHANISM_PARAM_INVALID || rv == CKR_MECHANISM_INVALID) {
    return absl::UnimplementedError(absl::StrCat("token refuses OAEP with ", OaepHashName(hash),
                                                 " (C_DecryptInit: ", CkrName(rv), ")"));
  }
  P11_RETURN_IF_ERROR(lease.Check("C_DecryptInit", rv));
  return RunDecrypt(fn, lease, modulus_bytes, ciphertext);
}

absl::StatusOr<std::string> OpenSslOaepEncrypt(EVP_PKEY* pkey, OaepHash hash,
                                               std::string_view message) {
  std::unique_ptr<EVP_PKEY_CTX, EvpPkeyCtxDeleter> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  const char* md = hash == OaepHash::kSha1 ? "SHA1" : "SHA256";
  size_t size = 0;
  const auto* in = reinterpret_cast<const unsigned char*>(message.data());
  if (ctx == nullptr || EVP_PKEY_encrypt_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
      EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx.get(), md, nullptr) != 1 ||
      EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx.get(), md, nullptr) != 1 ||
      EVP_PKEY_encrypt(ctx.get(), nullptr, &size, in, message.size()) != 1) {
    return absl::InternalError("EVP_PKEY_encrypt (OAEP) setup failed");
  }
  std::string ciphertext(size, '\0');
  if (EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(ciphertext.data()), &size, in,
                       message.size()) != 1) {
    return absl::InternalError("EVP_PKEY_encrypt (OAEP) failed");
  }
  ciphertext.resize(size);
  return ciphertext;
}

// Whether the token decrypts, with CKM_RSA_PKCS_OAEP and `hash`, what OpenSSL encrypted under a
// throwaway session key pair. An error (not a "no") when the probe itself could not run.
absl::StatusOr<bool> ProbeOaep(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease, OaepHash hash) {
  static constexpr unsigned char kF4[] = {0x01, 0x00, 0x01};
  const CK_ULONG modulus_bits = 2048;
  CK_ATTRIBUTE public_template[] = {
      BoolAttr(CKA_TOKEN, false),
      BoolAttr(CKA_ENCRYPT, true),
      Attr(CKA_MODULUS_BITS, &modulus_bits, sizeof(modulus_bits)),
      Attr(CKA_PUBLIC_EXPONENT, kF4, sizeof(kF4)),
  };
  CK_ATTRIBUTE private_template[] = {
      BoolAttr(CKA_TOKEN, false),       BoolAttr(CKA_PRIVATE, true), BoolAttr(CKA_SENSITIVE, true),
      BoolAttr(CKA_EXTRACTABLE, false), BoolAttr(CKA_DECRYPT, true),
  };
  CK_MECHANISM mechanism{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE public_handle = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_handle = CK_INVALID_HANDLE;
  P11_RETURN_IF_ERROR(lease.Check(
      "C_GenerateKeyPair",
      fn->C_GenerateKeyPair(lease.get(), &mechanism, public_template, std::size(public_template),
                            private_template, std::size(private_template), &public_handle,
                            &private_handle)));
  ScopedObject public_key(fn, lease, public_handle);
  ScopedObject private_key(fn, lease, private_handle);

  P11_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, public_key.get(), CKA_MODULUS));
  P11_ASSIGN_OR_RETURN(std::string exponent,
                       GetBytes(fn, lease, public_key.get(), CKA_PUBLIC_EXPONENT));
  P11_ASSIGN_OR_RETURN(EvpPkeyPtr pkey, RsaPublicKey(modulus, exponent));
  unsigned char message[32];
  if (RAND_bytes(message, sizeof(message)) != 1) return absl::InternalError("RAND_bytes failed");
  const std::string_view message_view(reinterpret_cast<const char*>(message), sizeof(message));
  P11_ASSIGN_OR_RETURN(std::string ciphertext, OpenSslOaepEncrypt(pkey.get(), hash, message_view));

  absl::StatusOr<Secret> plaintext =
      DecryptOaep(fn, lease, private_key.get(), hash, ciphertext.size(), ciphertext);
  // UNIMPLEMENTED: the token refused the parameters. INVALID_ARGUMENT: it accepted them but
  // could not decrypt (e.g. it silently used another hash). Both are a definite "no".
  if (absl::IsUnimplemented(plaintext.status()) || absl::IsInvalidArgument(plaintext.status())) {
    return false;
  }
  if (!plaintext.ok()) return plaintext.status();
  return plaintext->view() == absl::string_view(message_view.data(), message_view.size());
}

// ---- ECDH ----------------------------------------------------------------------------------

// DER OCTET STRING around `content` (the CKA_EC_POINT encoding); contents up to 65535 bytes.
std::string DerOctetString(std::string_view content) {
  std::string out(1, '\x04');
  const size_t size = content.size();
  if (size < 0x80) {
    out.push_back(static_cast<char>(size));
  } else if (size <= 0xff) {
    out.push_back('\x81');
    out.push_back(static_cast<char>(size));
  } else {
    out.push_back('\x82');
    out.push_back(static_cast<char>(size >> 8));
    out.push_back(static_cast<char>(size & 0xff));
  }
  out.append(content);
  return out;
}

// CKA_VALUE of a derived secret of exactly `size` bytes, straight into a self-wiping buffer.
absl::StatusOr<Secret> GetSecretValue(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                      CK_OBJECT_HANDLE object, size_t size) {
  Secret value(std::string(size, '\0'));
  CK_ATTRIBUTE attribute{CKA_VALUE, value.mutable_value().data(), size};
  P11_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                  fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  if (attribute.ulValueLen != size) {
    return absl::InternalError(
        absl::StrCat("derived CKA_VALUE has ", attribute.ulValueLen, " bytes, expected ", size));
  }
  return value;
}

// CKM_ECDH1_DERIVE (CKD_NULL) on a resolved handle: Z, `field_size` bytes.
absl::StatusOr<Secret> DeriveEcdhWithHandle(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                            CK_OBJECT_HANDLE key, std::string_view peer_point,
                                            CK_ULONG field_size) {
  CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
  CK_KEY_TYPE generic_secret = CKK_GENERIC_SECRET;
  CK_ATTRIBUTE secret_template[] = {
      Attr(CKA_CLASS, &secret_class, sizeof(secret_class)),
      Attr(CKA_KEY_TYPE, &generic_secret, sizeof(generic_secret)),
      BoolAttr(CKA_TOKEN, false),
      BoolAttr(CKA_SENSITIVE, false),
      BoolAttr(CKA_EXTRACTABLE, true),
      Attr(CKA_VALUE_LEN, &field_size, sizeof(field_size)),
  };
  auto derive = [&](std::string_view public_data, CK_OBJECT_HANDLE* derived) {
    CK_ECDH1_DERIVE_PARAMS params{};
    params.kdf = CKD_NULL;
    params.ulSharedDataLen = 0;
    params.pSharedData = nullptr;
    params.ulPublicDataLen = public_data.size();
    params.pPublicData = reinterpret_cast<CK_BYTE*>(const_cast<char*>(public_data.data()));
    CK_MECHANISM mechanism{CKM_ECDH1_DERIVE, &params, sizeof(params)};
    return fn->C_DeriveKey(lease.get(), &mechanism, key, secret_template,
                           std::size(secret_template), derived);
  };
  CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
  CK_RV rv = derive(peer_point, &derived);
  if (rv == CKR_ARGUMENTS_BAD || rv == CKR_DOMAIN_PARAMS_INVALID ||
      rv == CKR_MECHANISM_PARAM_INVALID) {
    // PKCS#11 2.40 leaves open whether pPublicData is the bare point or, like CKA_EC_POINT, a DER
    // OCTET STRING holding it, and some modules take only the latter. (SoftHSM2 2.6.1 takes
    // both.) A refusal derived nothing, so asking with the other form is not a retry.
    rv = derive(DerOctetString(peer_point), &derived);
  }
  P11_RETURN_IF_ERROR(lease.Check("C_DeriveKey", rv));
  ScopedObject secret(fn, lease, derived);
  return GetSecretValue(fn, lease, secret.get(), field_size);
}

// ---- Import --------------------------------------------------------------------------------

struct BignumClearDeleter {
  void operator()(BIGNUM* p) const { BN_clear_free(p); }
};
struct EcGroupDeleter {
  void operator()(EC_GROUP* p) const { EC_GROUP_free(p); }
};
struct EcPointDeleter {
  void operator()(EC_POINT* p) const { EC_POINT_free(p); }
};

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
  std::unique_ptr<BIGNUM, BignumClearDeleter> bn(raw);
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
  const size_t point_size = PublicPointSize(key.spec.type);
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
  std::unique_ptr<EC_GROUP, EcGroupDeleter> group(EC_GROUP_new_by_curve_name(nid));
  std::unique_ptr<EC_POINT, EcPointDeleter> point(group ? EC_POINT_new(group.get()) : nullptr);
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

// ALREADY_EXISTS when a private key with CKA_ID=id exists: two pairs with one CKA_ID would make
// FindKeyPair ambiguous forever after.
absl::Status RefuseExistingId(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                              std::string_view id) {
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  P11_ASSIGN_OR_RETURN(
      std::vector<CK_OBJECT_HANDLE> existing,
      FindObjects(fn, lease,
                  {Attr(CKA_CLASS, &private_class, sizeof(private_class)), Attr(CKA_ID, id)}));
  if (!existing.empty()) {
    return absl::AlreadyExistsError(
        absl::StrCat("a private key with CKA_ID ", PrintableId(id), " exists"));
  }
  return absl::OkStatus();
}

// Which call a latency sample belongs to (Token::Metrics).
enum class Timed { kSign, kDecrypt, kDerive };

}  // namespace

class Token::State {
 public:
  // Declared first so that it is destroyed last: the pool closes sessions through it.
  std::unique_ptr<Module> module;
  CK_FUNCTION_LIST* fn = nullptr;
  TokenInfo info;
  std::set<std::string, std::less<>> mechanisms;
  std::unique_ptr<SessionPool> pool;

  // OaepSupported answers, indexed by OaepHash; empty until probed.
  absl::Mutex oaep_mu;
  std::optional<bool> oaep_supported[2] ABSL_GUARDED_BY(oaep_mu);

  std::atomic<bool> healthy{true};
  std::atomic<uint64_t> retries{0};
  std::atomic<uint64_t> recoveries{0};
  std::atomic<uint64_t> reinitializations{0};
  std::atomic<uint64_t> reinit_backoffs{0};

  // Re-initialization backoff (token.h, Recovery). `reinit_backoff_armed` lets the hot path
  // (Succeeded) skip the mutex while nothing is to reset.
  absl::Duration reinit_backoff_initial = absl::Milliseconds(50);
  absl::Duration reinit_backoff_max = absl::Seconds(2);
  std::atomic<bool> reinit_backoff_armed{false};
  absl::Mutex backoff_mu;  // never held across a token call
  absl::Time reinit_not_before ABSL_GUARDED_BY(backoff_mu) = absl::InfinitePast();
  absl::Duration reinit_backoff ABSL_GUARDED_BY(backoff_mu) = absl::Milliseconds(50);
  mutable absl::Mutex metrics_mu;  // never held across a token call
  // Failures by (Cryptoki function, CKR name); Token::Metrics::errors sums them per CKR.
  std::map<std::pair<std::string, std::string>, uint64_t> errors ABSL_GUARDED_BY(metrics_mu);
  Token::Latency latency[3] ABSL_GUARDED_BY(metrics_mu);  // indexed by Timed

  // One call sequence on one session: Cryptoki calls through the lease only.
  using Op = std::function<absl::Status(SessionPool::Lease&)>;

  // Runs `op` once, recovers from a session, device or stale-handle failure (see token.h) and
  // runs it once more; a second such failure is UNAVAILABLE. `key`, when given, is the pair
  // whose cached handles a CKR_OBJECT_HANDLE_INVALID refers to.
  absl::Status Run(const KeyPair* key, const Op& op) {
    Attempt first = Try(op, /*fresh=*/false);
    if (first.status.ok()) return Succeeded();
    const Damage damage = DamageOfStatus(first.status);
    if (damage == Damage::kNone) return first.status;
    if (absl::Status recovered = Recover(damage, first.generation, key); !recovered.ok()) {
      return RecoveryFailed(first.status, recovered);
    }
    retries.fetch_add(1, std::memory_order_relaxed);
    const bool fresh = damage != Damage::kHandles;
    Attempt retry = Try(op, fresh);
    if (fresh && retry.acquired) recoveries.fetch_add(1, std::memory_order_relaxed);
    return Finish(retry);
  }

  // For operations that create token objects (generation, import): `op` sets `started` right
  // before the call that may create them. A failure before that is retried as in Run; after
  // it the operation is never run again: the session is recovered and the objects with CKA_ID
  // `id` decide (a complete pair goes to `pair`; a partial one is destroyed).
  absl::Status RunCreating(const Op& op, const bool& started, std::string_view id,
                           std::shared_ptr<KeyPair>& pair) {
    for (int round = 0;; ++round) {
      Attempt attempt = Try(op, /*fresh=*/round > 0);
      if (round > 0 && attempt.acquired) recoveries.fetch_add(1, std::memory_order_relaxed);
      if (attempt.status.ok()) return Succeeded();
      const Damage damage = DamageOfStatus(attempt.status);
      if (damage == Damage::kNone) return round > 0 ? Finish(attempt) : attempt.status;
      if (round > 0 && !started) return Finish(attempt);  // failed twice: give up
      if (absl::Status recovered = Recover(damage, attempt.generation, nullptr); !recovered.ok()) {
        return RecoveryFailed(attempt.status, recovered);
      }
      if (started) return Reconcile(attempt.status, id, pair);
      retries.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Runs `op` on the pair's handle of class `cls`, resolving both handles by CKA_ID first when
  // they are not from the module's current initialization (or were marked stale by Run).
  // The caller holds the module gate (it runs inside an Op), so the generation is stable.
  absl::Status WithHandle(SessionPool::Lease& lease, const KeyPair& key, CK_OBJECT_CLASS cls,
                          const std::function<absl::Status(CK_OBJECT_HANDLE)>& op) {
    std::atomic<uint64_t>& cached = cls == CKO_PRIVATE_KEY ? key.private_handle : key.public_handle;
    const uint64_t generation = module->generation();
    if (key.handle_generation.load(std::memory_order_acquire) != generation) {
      P11_RETURN_IF_ERROR(ResolveHandles(lease, key, cls, generation));
    } else if (cached.load(std::memory_order_acquire) == CK_INVALID_HANDLE) {
      P11_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE found, FindOne(fn, lease, cls, key.id));
      cached.store(found, std::memory_order_release);
    }
    return op(cached.load(std::memory_order_acquire));
  }

  // Records the duration of one Token call, however it ends.
  class Timer {
   public:
    Timer(State& state, Timed what) : state_(state), what_(what) {}
    ~Timer() { state_.RecordLatency(what_, absl::Now() - start_); }
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;

   private:
    State& state_;
    const Timed what_;
    const absl::Time start_ = absl::Now();
  };

  void RecordLatency(Timed what, absl::Duration elapsed) {
    const auto micros = static_cast<uint64_t>(absl::ToInt64Microseconds(elapsed));
    absl::MutexLock lock(&metrics_mu);
    Token::Latency& latency_of = latency[static_cast<int>(what)];
    ++latency_of.count;
    latency_of.total_micros += micros;
    latency_of.max_micros = std::max(latency_of.max_micros, micros);
  }

 private:
  // A KeyPair generation no module ever has: forces ResolveHandles.
  static constexpr uint64_t kStaleHandles = ~uint64_t{0};

  struct Attempt {
    absl::Status status;
    bool acquired = false;    // a session was leased (so a fresh one was opened and logged in)
    uint64_t generation = 0;  // of the module during the attempt
  };

  static Damage DamageOfStatus(const absl::Status& status) {
    std::optional<CK_RV> rv = CkrOf(status);
    return rv.has_value() ? DamageOf(*rv) : Damage::kNone;
  }

  // One lease, one run of `op`, under the module gate (so that no re-initialization finalizes
  // the module under it). The lease is gone before the gate is released.
  Attempt Try(const Op& op, bool fresh) {
    absl::ReaderMutexLock gate(&module->gate());
    Attempt attempt;
    attempt.generation = module->generation();
    absl::StatusOr<SessionPool::Lease> lease = pool->Acquire(fresh);
    if (!lease.ok()) {
      attempt.status = lease.status();
    } else {
      attempt.acquired = true;
      attempt.status = op(*lease);
      // Whatever failed in a session-damaging way, the session does not go back to the pool
      // (Lease::Check already decided between closing and forgetting it for most calls).
      if (const Damage damage = DamageOfStatus(attempt.status);
          damage == Damage::kSession || damage == Damage::kModule) {
        lease->Discard();
      }
    }
    CountError(attempt.status);
    return attempt;
  }

  // What to repair before the retry. For sessions, the retry leases a fresh one: opening and
  // logging it in is the recovery.
  absl::Status Recover(Damage damage, uint64_t generation, const KeyPair* key) {
    switch (damage) {
      case Damage::kNone:
        return absl::OkStatus();
      case Damage::kSession:
      case Damage::kHandles:
        // Session damage too: modules may void object handles when the application's last
        // session closes (SoftHSM2 does), and dropping the broken session may have been that.
        if (key != nullptr) key->handle_generation.store(kStaleHandles, std::memory_order_release);
        return absl::OkStatus();
      case Damage::kModule:
        break;
    }
    // When the module is still the one the attempt failed on, this recovery would cycle it:
    // only once the backoff allows. (Past that generation, someone else already did, and
    // Reinitialize only follows the token.)
    if (module->generation() == generation) {
      absl::MutexLock lock(&backoff_mu);
      const absl::Time now = absl::Now();
      if (now < reinit_not_before) {
        reinit_backoffs.fetch_add(1, std::memory_order_relaxed);
        return absl::UnavailableError(absl::StrCat(
            "module re-initialization backing off for another ",
            absl::FormatDuration(absl::Ceil(reinit_not_before - now, absl::Milliseconds(1)))));
      }
      reinit_not_before = now + reinit_backoff;
      reinit_backoff = std::min(reinit_backoff * 2, reinit_backoff_max);
      reinit_backoff_armed.store(true, std::memory_order_relaxed);
    }
    absl::StatusOr<bool> reinitialized = module->Reinitialize(generation);
    if (absl::IsFailedPrecondition(reinitialized.status())) {
      // Someone else's module: not ours to finalize. A new session is all we can try.
      Log(LogLevel::kWarning, "pkcs11.reinitialize_skipped",
          {{"status", reinitialized.status().ToString()}});
      return absl::OkStatus();
    }
    if (!reinitialized.ok()) {
      CountError(reinitialized.status());
      return reinitialized.status();
    }
    if (*reinitialized) {
      reinitializations.fetch_add(1, std::memory_order_relaxed);
      Log(LogLevel::kWarning, "pkcs11.module_reinitialized", {{"module", info.module_path}});
    }
    return FollowToken();
  }

  // After a re-initialization the token may sit in another slot: find it again by serial.
  absl::Status FollowToken() {
    absl::ReaderMutexLock gate(&module->gate());
    absl::StatusOr<std::vector<SlotToken>> tokens = ListTokens(fn);
    if (!tokens.ok()) {
      CountError(tokens.status());
      return tokens.status();
    }
    for (const SlotToken& token : *tokens) {
      if (token.initialized && token.serial == info.serial && token.label == info.label) {
        pool->SetSlot(token.slot);
        return absl::OkStatus();
      }
    }
    return absl::UnavailableError(absl::StrCat("token '", info.label, "' (serial ", info.serial,
                                               ") is not present after re-initializing '",
                                               info.module_path, "'"));
  }

  absl::Status Succeeded() {
    healthy.store(true, std::memory_order_relaxed);
    if (reinit_backoff_armed.load(std::memory_order_relaxed)) {
      absl::MutexLock lock(&backoff_mu);
      reinit_not_before = absl::InfinitePast();
      reinit_backoff = reinit_backoff_initial;
      reinit_backoff_armed.store(false, std::memory_order_relaxed);
    }
    return absl::OkStatus();
  }

  absl::Status Unhealthy(absl::Status status) {
    healthy.store(false, std::memory_order_relaxed);
    return WithCode(status, absl::StatusCode::kUnavailable);
  }

  absl::Status RecoveryFailed(const absl::Status& failure, const absl::Status& recovery) {
    Log(LogLevel::kError, "pkcs11.recovery_failed",
        {{"failure", failure.ToString()}, {"recovery", recovery.ToString()}});
    absl::Status status(absl::StatusCode::kUnavailable,
                        absl::StrCat(failure.message(), "; recovery failed: ", recovery.message()));
    failure.ForEachPayload(
        [&](absl::string_view type, const absl::Cord& value) { status.SetPayload(type, value); });
    return Unhealthy(status);
  }

  // The outcome of the retry after a recovery.
  absl::Status Finish(const Attempt& retry) {
    if (retry.status.ok()) return Succeeded();
    const bool token_failure = CkrOf(retry.status).has_value();
    // No session could be opened or logged in (re-login impossible), or the operation failed
    // again in a way a recovery was meant to repair.
    if ((token_failure && !retry.acquired) || DamageOfStatus(retry.status) != Damage::kNone) {
      Log(LogLevel::kError, "pkcs11.retry_failed", {{"status", retry.status.ToString()}});
      return Unhealthy(retry.status);
    }
    return retry.status;
  }

  // Looks, on a fresh session, at what a failed generation or import left behind.
  absl::Status Reconcile(const absl::Status& cause, std::string_view id,
                         std::shared_ptr<KeyPair>& pair) {
    absl::Status verdict;
    Attempt attempt = Try(
        [&](SessionPool::Lease& lease) -> absl::Status {
          CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
          CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
          P11_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> private_keys,
                               FindObjects(fn, lease,
                                           {Attr(CKA_CLASS, &private_class, sizeof(private_class)),
                                            Attr(CKA_ID, id)}));
          P11_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> public_keys,
                               FindObjects(fn, lease,
                                           {Attr(CKA_CLASS, &public_class, sizeof(public_class)),
                                            Attr(CKA_ID, id)}));
          if (private_keys.size() == 1 && public_keys.size() == 1) {
            // The token did the work; only its answer was lost.
            P11_ASSIGN_OR_RETURN(KeySpec spec, ReadKeySpec(fn, lease, private_keys.front()));
            P11_ASSIGN_OR_RETURN(std::string label,
                                 GetBytes(fn, lease, private_keys.front(), CKA_LABEL));
            pair = std::make_shared<KeyPair>();
            pair->id = std::string(id);
            pair->label = std::move(label);
            pair->spec = spec;
            pair->private_handle.store(private_keys.front());
            pair->public_handle.store(public_keys.front());
            pair->handle_generation.store(module->generation());
            Log(LogLevel::kWarning, "pkcs11.reconciled_complete_pair",
                {{"id", PrintableId(id)}, {"cause", cause.ToString()}});
            verdict = absl::OkStatus();
            return absl::OkStatus();
          }
          P11_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> leftovers,
                               FindObjects(fn, lease, {Attr(CKA_ID, id)}));
          for (CK_OBJECT_HANDLE handle : leftovers) {
            CK_RV rv = fn->C_DestroyObject(lease.get(), handle);
            if (rv == CKR_OBJECT_HANDLE_INVALID) continue;
            P11_RETURN_IF_ERROR(lease.Check("C_DestroyObject", rv));
          }
          verdict = absl::Status(
              absl::StatusCode::kUnavailable,
              absl::StrCat(cause.message(), "; ",
                           leftovers.empty() ? absl::StrCat("no object with CKA_ID ",
                                                            PrintableId(id), " was created")
                                             : absl::StrCat("the partial key pair with CKA_ID ",
                                                            PrintableId(id), " was destroyed")));
          cause.ForEachPayload([&](absl::string_view type, const absl::Cord& value) {
            verdict.SetPayload(type, value);
          });
          Log(LogLevel::kWarning, "pkcs11.reconciled", {{"status", verdict.ToString()}});
          return absl::OkStatus();
        },
        /*fresh=*/true);
    if (attempt.acquired) recoveries.fetch_add(1, std::memory_order_relaxed);
    if (!attempt.status.ok()) {
      // Could not even look: the caller's metadata intent and startup reconciliation decide.
      return RecoveryFailed(cause, attempt.status);
    }
    healthy.store(true, std::memory_order_relaxed);  // the token answered every question
    return verdict;
  }

  absl::Status ResolveHandles(SessionPool::Lease& lease, const KeyPair& key, CK_OBJECT_CLASS needed,
                              uint64_t generation) {
    for (CK_OBJECT_CLASS cls : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
      std::atomic<uint64_t>& cached =
          cls == CKO_PRIVATE_KEY ? key.private_handle : key.public_handle;
      absl::StatusOr<CK_OBJECT_HANDLE> found = FindOne(fn, lease, cls, key.id);
      if (found.ok()) {
        cached.store(*found, std::memory_order_release);
      } else if (cls != needed && absl::IsNotFound(found.status()) &&
                 !CkrOf(found.status()).has_value()) {
        cached.store(CK_INVALID_HANDLE, std::memory_order_release);  // PublicKey reports it
      } else {
        return found.status();
      }
    }
    key.handle_generation.store(generation, std::memory_order_release);
    return absl::OkStatus();
  }

  void CountError(const absl::Status& status) {
    std::optional<CK_RV> rv = CkrOf(status);
    if (!rv.has_value()) return;
    std::string function = CkFunctionOf(status);
    std::pair<std::string, std::string> key(function.empty() ? "unknown" : std::move(function),
                                            CkrName(*rv));
    absl::MutexLock lock(&metrics_mu);
    ++errors[std::move(key)];
  }
};

Token::Token(std::unique_ptr<State> state) : state_(std::move(state)) {}

Token::~Token() {
  if (state_->pool != nullptr) {
    absl::ReaderMutexLock gate(&state_->module->gate());
    state_->pool.reset();
  }
}

const TokenInfo& Token::info() const { return state_->info; }

bool Token::Healthy() const { return state_->healthy.load(std::memory_order_relaxed); }

Token::Metrics Token::GetMetrics() const {
  Metrics metrics;
  metrics.retries = state_->retries.load(std::memory_order_relaxed);
  metrics.recoveries = state_->recoveries.load(std::memory_order_relaxed);
  metrics.module_reinitializations = state_->reinitializations.load(std::memory_order_relaxed);
  metrics.reinit_backoffs = state_->reinit_backoffs.load(std::memory_order_relaxed);
  const SessionPool::Stats pool = state_->pool->stats();
  metrics.pool_waits = pool.waits;
  metrics.pool_rejections = pool.rejections;
  metrics.pool_timeouts = pool.timeouts;
  metrics.pool_in_use = pool.in_use;
  metrics.pool_waiting = pool.waiting;
  metrics.pool_max_sessions = pool.max_sessions;
  absl::MutexLock lock(&state_->metrics_mu);
  metrics.errors_by_function = state_->errors;
  for (const auto& [key, n] : state_->errors) metrics.errors[key.second] += n;
  metrics.sign = state_->latency[static_cast<int>(Timed::kSign)];
  metrics.decrypt = state_->latency[static_cast<int>(Timed::kDecrypt)];
  metrics.derive = state_->latency[static_cast<int>(Timed::kDerive)];
  return metrics;
}

absl::Status Token::Probe() {
  CK_FUNCTION_LIST* fn = state_->fn;
  return state_->Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    CK_SESSION_INFO session{};
    P11_RETURN_IF_ERROR(
        lease.Check("C_GetSessionInfo", fn->C_GetSessionInfo(lease.get(), &session)));
    if (session.state != CKS_RW_USER_FUNCTIONS && session.state != CKS_RO_USER_FUNCTIONS) {
      // Logged out behind our back: recovered like a CKR_USER_NOT_LOGGED_IN from any call.
      return lease.Check("C_GetSessionInfo", CKR_USER_NOT_LOGGED_IN);
    }
    CK_TOKEN_INFO token{};
    return lease.Check("C_GetTokenInfo", fn->C_GetTokenInfo(lease.slot(), &token));
  });
}

absl::StatusOr<std::unique_ptr<Token>> Token::Open(Options options) {
  auto state = std::make_unique<State>();
  P11_ASSIGN_OR_RETURN(state->module, Module::Load(options.module_path));
  CK_FUNCTION_LIST* fn = state->module->fn();
  state->fn = fn;
  // Another Token on the same module may re-initialize it meanwhile.
  absl::ReaderMutexLock gate(&state->module->gate());

  CK_INFO library{};
  CK_RV rv = fn->C_GetInfo(&library);
  if (rv != CKR_OK) return CkError("C_GetInfo", rv);

  P11_ASSIGN_OR_RETURN(std::vector<SlotToken> tokens, ListTokens(fn));
  std::vector<const SlotToken*> matches;
  std::vector<std::string> seen;
  for (const SlotToken& token : tokens) {
    if (!token.initialized) continue;
    seen.push_back(absl::StrCat("'", token.label, "' (slot ", token.slot, ")"));
    if (Matches(options.selector, token)) matches.push_back(&token);
  }
  if (matches.size() != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        matches.empty() ? "no" : absl::StrCat(matches.size()), " initialized token(s) in '",
        options.module_path, "' match ", DescribeSelector(options.selector),
        "; tokens seen: ", seen.empty() ? "none" : absl::StrJoin(seen, ", ")));
  }
  const SlotToken& token = *matches.front();
  state->info = TokenInfo{
      .module_path = options.module_path,
      .library_description =
          TrimPadded(library.libraryDescription, sizeof(library.libraryDescription)),
      .label = token.label,
      .manufacturer = token.manufacturer,
      .model = token.model,
      .serial = token.serial,
      .slot_id = token.slot,
  };

  CK_ULONG count = 0;
  rv = fn->C_GetMechanismList(token.slot, nullptr, &count);
  if (rv != CKR_OK) return CkError("C_GetMechanismList", rv);
  std::vector<CK_MECHANISM_TYPE> mechanisms(count);
  rv = fn->C_GetMechanismList(token.slot, mechanisms.data(), &count);
  if (rv != CKR_OK) return CkError("C_GetMechanismList", rv);
  mechanisms.resize(count);
  for (CK_MECHANISM_TYPE mechanism : mechanisms) state->mechanisms.insert(CkmName(mechanism));

  state->reinit_backoff_initial = std::max(options.reinit_backoff, absl::ZeroDuration());
  state->reinit_backoff_max = std::max(options.reinit_backoff_max, state->reinit_backoff_initial);
  {
    absl::MutexLock lock(&state->backoff_mu);
    state->reinit_backoff = state->reinit_backoff_initial;
  }
  state->pool =
      std::make_unique<SessionPool>(fn, token.slot, std::move(options.pin), options.max_sessions,
                                    options.session_wait, options.max_waiters, state->module.get());
  {
    // Log in now, so that a wrong PIN fails Open (PERMISSION_DENIED) rather than the first
    // request. The session stays in the pool.
    P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state->pool->Acquire());
  }
  return std::unique_ptr<Token>(new Token(std::move(state)));
}

absl::Status Token::InitializeToken(const std::string& module_path, std::string_view label,
                                    const Secret& so_pin, const Secret& user_pin) {
  if (label.empty() || label.size() > kLabelSize) {
    return absl::InvalidArgumentError("token label must be 1 to 32 bytes");
  }
  P11_ASSIGN_OR_RETURN(std::unique_ptr<Module> module, Module::Load(module_path));
  CK_FUNCTION_LIST* fn = module->fn();

  P11_ASSIGN_OR_RETURN(std::vector<SlotToken> tokens, ListTokens(fn));
  const SlotToken* free_slot = nullptr;
  for (const SlotToken& token : tokens) {
    if (token.initialized && token.label == label) {
      return absl::AlreadyExistsError(
          absl::StrCat("a token labelled '", AsAbsl(label), "' exists"));
    }
    if (!token.initialized && free_slot == nullptr) free_slot = &token;
  }
  if (free_slot == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("no slot with an uninitialized token in '", module_path, "'"));
  }
  unsigned char padded[kLabelSize];
  std::memset(padded, ' ', sizeof(padded));
  std::memcpy(padded, label.data(), label.size());
  CK_RV rv = fn->C_InitToken(free_slot->slot, PinPtr(so_pin), so_pin.size(), padded);
  if (rv != CKR_OK) return CkError("C_InitToken", rv);

  // SoftHSM2 moves an initialized token to a slot id derived from its serial: list again.
  P11_ASSIGN_OR_RETURN(tokens, ListTokens(fn));
  auto it = std::find_if(tokens.begin(), tokens.end(), [&](const SlotToken& token) {
    return token.initialized && token.label == label;
  });
  if (it == tokens.end()) {
    return absl::InternalError(
        absl::StrCat("token '", AsAbsl(label), "' not found after C_InitToken"));
  }
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
  rv = fn->C_OpenSession(it->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &handle);
  if (rv != CKR_OK) return CkError("C_OpenSession", rv);
  ScopedSession session(fn, handle);
  rv = fn->C_Login(session.get(), CKU_SO, PinPtr(so_pin), so_pin.size());
  if (rv != CKR_OK) return CkError("C_Login(SO)", rv);
  rv = fn->C_InitPIN(session.get(), PinPtr(user_pin), user_pin.size());
  absl::Status status = rv == CKR_OK ? absl::OkStatus() : CkError("C_InitPIN", rv);
  fn->C_Logout(session.get());
  return status;
}

absl::StatusOr<std::shared_ptr<KeyPair>> Token::GenerateKeyPair(const KeySpec& spec,
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
  CK_FUNCTION_LIST* fn = state_->fn;
  const bool rsa = spec.type == KeyType::kRsa;
  const CK_ULONG modulus_bits = static_cast<CK_ULONG>(spec.rsa_bits);
  static constexpr unsigned char kF4[] = {0x01, 0x00, 0x01};

  std::vector<CK_ATTRIBUTE> public_template = {
      BoolAttr(CKA_TOKEN, true),
      BoolAttr(CKA_PRIVATE, false),
      BoolAttr(CKA_VERIFY, !for_decryption),
      Attr(CKA_ID, id),
      Attr(CKA_LABEL, label),
  };
  if (rsa) {
    public_template.push_back(BoolAttr(CKA_ENCRYPT, for_decryption));
    public_template.push_back(Attr(CKA_MODULUS_BITS, &modulus_bits, sizeof(modulus_bits)));
    public_template.push_back(Attr(CKA_PUBLIC_EXPONENT, kF4, sizeof(kF4)));
  }
  std::vector<CK_ATTRIBUTE> private_template = {
      BoolAttr(CKA_TOKEN, true),
      BoolAttr(CKA_PRIVATE, true),
      BoolAttr(CKA_SENSITIVE, true),
      BoolAttr(CKA_EXTRACTABLE, false),
      Attr(CKA_ID, id),
      Attr(CKA_LABEL, label),
  };
  AppendPrivateKeyUsage(private_template, rsa, for_decryption);

  CK_MECHANISM mechanism{};
  mechanism.mechanism = rsa                              ? CKM_RSA_PKCS_KEY_PAIR_GEN
                        : spec.type == KeyType::kEd25519 ? CKM_EC_EDWARDS_KEY_PAIR_GEN
                                                         : CKM_EC_KEY_PAIR_GEN;
  auto generate = [&](SessionPool::Lease& lease, std::string_view ec_params,
                      CK_OBJECT_HANDLE* public_key, CK_OBJECT_HANDLE* private_key) {
    std::vector<CK_ATTRIBUTE> public_attributes = public_template;
    if (!ec_params.empty()) public_attributes.push_back(Attr(CKA_EC_PARAMS, ec_params));
    return fn->C_GenerateKeyPair(lease.get(), &mechanism, public_attributes.data(),
                                 public_attributes.size(), private_template.data(),
                                 private_template.size(), public_key, private_key);
  };
  bool started = false;
  std::shared_ptr<KeyPair> pair;
  P11_RETURN_IF_ERROR(state_->RunCreating(
      [&](SessionPool::Lease& lease) -> absl::Status {
        P11_RETURN_IF_ERROR(RefuseExistingId(fn, lease, id));
        started = true;
        CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
        CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
        CK_RV rv = generate(lease, EcParams(spec.type), &public_key, &private_key);
        if (spec.type == KeyType::kEd25519 &&
            (rv == CKR_ATTRIBUTE_VALUE_INVALID || rv == CKR_CURVE_NOT_SUPPORTED ||
             rv == CKR_DOMAIN_PARAMS_INVALID || rv == CKR_TEMPLATE_INCONSISTENT)) {
          // Modules differ on how Ed25519 is named in CKA_EC_PARAMS (RFC 8410 OID vs the
          // PKCS#11 3.0 PrintableString). A refusal created nothing, so asking again with the
          // other form is not a retry of a failed generation.
          rv = generate(lease, kEd25519Name, &public_key, &private_key);
        }
        P11_RETURN_IF_ERROR(lease.Check("C_GenerateKeyPair", rv));
        pair = std::make_shared<KeyPair>();
        pair->id = std::string(id);
        pair->label = std::string(label);
        pair->spec = spec;
        if (!rsa) pair->spec.rsa_bits = 0;
        pair->private_handle.store(private_key);
        pair->public_handle.store(public_key);
        pair->handle_generation.store(state_->module->generation());
        return absl::OkStatus();
      },
      started, id, pair));
  return pair;
}

absl::StatusOr<std::shared_ptr<KeyPair>> Token::FindKeyPair(std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("FindKeyPair: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state_->fn;
  std::shared_ptr<KeyPair> pair;
  P11_RETURN_IF_ERROR(state_->Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    P11_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE private_key, FindOne(fn, lease, CKO_PRIVATE_KEY, id));
    // A missing public key is tolerated here (signing still works); PublicKey reports it.
    CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
    if (absl::StatusOr<CK_OBJECT_HANDLE> found = FindOne(fn, lease, CKO_PUBLIC_KEY, id);
        found.ok()) {
      public_key = *found;
    } else if (!absl::IsNotFound(found.status()) || CkrOf(found.status()).has_value()) {
      return found.status();
    }
    P11_ASSIGN_OR_RETURN(KeySpec spec, ReadKeySpec(fn, lease, private_key));
    P11_ASSIGN_OR_RETURN(std::string label, GetBytes(fn, lease, private_key, CKA_LABEL));
    pair = std::make_shared<KeyPair>();
    pair->id = std::string(id);
    pair->label = std::move(label);
    pair->spec = spec;
    pair->private_handle.store(private_key);
    pair->public_handle.store(public_key);
    pair->handle_generation.store(state_->module->generation());
    return absl::OkStatus();
  }));
  return pair;
}

absl::StatusOr<std::string> Token::Sign(const KeyPair& key, SignScheme scheme,
                                        std::string_view input) {
  State::Timer timer(*state_, Timed::kSign);
  CK_MECHANISM mechanism{};
  CK_RSA_PKCS_PSS_PARAMS pss{};
  bool scheme_fits = false;
  switch (scheme) {
    case SignScheme::kEcdsa:
      mechanism.mechanism = CKM_ECDSA;
      scheme_fits = IsEc(key.spec.type);
      break;
    case SignScheme::kEddsa:
      mechanism.mechanism = CKM_EDDSA;
      scheme_fits = key.spec.type == KeyType::kEd25519;
      break;
    case SignScheme::kRsaPssSha256:
    case SignScheme::kRsaPssSha384:
    case SignScheme::kRsaPssSha512: {
      // Salt as long as the digest: RFC 7518 PS256 and TLS 1.3 (RFC 8446 §4.2.3) both fix it.
      const size_t digest_size = scheme == SignScheme::kRsaPssSha256   ? 32
                                 : scheme == SignScheme::kRsaPssSha384 ? 48
                                                                       : 64;
      if (input.size() != digest_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("RSA-PSS input must be a ", digest_size, "-byte digest"));
      }
      pss.hashAlg = digest_size == 32 ? CKM_SHA256 : digest_size == 48 ? CKM_SHA384 : CKM_SHA512;
      pss.mgf = digest_size == 32   ? CKG_MGF1_SHA256
                : digest_size == 48 ? CKG_MGF1_SHA384
                                    : CKG_MGF1_SHA512;
      pss.sLen = digest_size;
      mechanism.mechanism = CKM_RSA_PKCS_PSS;
      mechanism.pParameter = &pss;
      mechanism.ulParameterLen = sizeof(pss);
      scheme_fits = key.spec.type == KeyType::kRsa;
      break;
    }
    case SignScheme::kRsaPkcs1v15:
      mechanism.mechanism = CKM_RSA_PKCS;
      scheme_fits = key.spec.type == KeyType::kRsa;
      break;
  }
  if (!scheme_fits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key ", PrintableId(key.id), " cannot sign with ", CkmName(mechanism.mechanism)));
  }
  if (input.empty()) return absl::InvalidArgumentError("nothing to sign");

  CK_FUNCTION_LIST* fn = state_->fn;
  std::string signature;
  P11_RETURN_IF_ERROR(state_->Run(&key, [&](SessionPool::Lease& lease) {
    return state_->WithHandle(lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) {
      P11_RETURN_IF_ERROR(
          lease.Check("C_SignInit", fn->C_SignInit(lease.get(), &mechanism, handle)));
      auto* data = reinterpret_cast<CK_BYTE*>(const_cast<char*>(input.data()));
      signature.assign(SignatureSize(key.spec), '\0');
      CK_ULONG length = signature.size();
      CK_RV rv = fn->C_Sign(lease.get(), data, input.size(),
                            reinterpret_cast<CK_BYTE*>(signature.data()), &length);
      if (rv == CKR_BUFFER_TOO_SMALL) {
        // The operation stays active and `length` now holds the size needed.
        signature.assign(length, '\0');
        rv = fn->C_Sign(lease.get(), data, input.size(),
                        reinterpret_cast<CK_BYTE*>(signature.data()), &length);
      }
      P11_RETURN_IF_ERROR(lease.Check("C_Sign", rv));
      signature.resize(length);
      return absl::OkStatus();
    });
  }));
  return signature;
}

absl::StatusOr<EvpPkeyPtr> Token::PublicKey(const KeyPair& key) {
  CK_FUNCTION_LIST* fn = state_->fn;
  EvpPkeyPtr pkey;
  P11_RETURN_IF_ERROR(state_->Run(&key, [&](SessionPool::Lease& lease) {
    return state_->WithHandle(
        lease, key, CKO_PUBLIC_KEY, [&](CK_OBJECT_HANDLE handle) -> absl::Status {
          if (key.spec.type == KeyType::kRsa) {
            P11_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, handle, CKA_MODULUS));
            P11_ASSIGN_OR_RETURN(std::string exponent,
                                 GetBytes(fn, lease, handle, CKA_PUBLIC_EXPONENT));
            P11_ASSIGN_OR_RETURN(pkey, RsaPublicKey(modulus, exponent));
            return absl::OkStatus();
          }
          P11_ASSIGN_OR_RETURN(std::string encoded, GetBytes(fn, lease, handle, CKA_EC_POINT));
          P11_ASSIGN_OR_RETURN(std::string point,
                               UnwrapEcPoint(encoded, PublicPointSize(key.spec.type)));
          if (key.spec.type == KeyType::kEd25519) {
            pkey.reset(EVP_PKEY_new_raw_public_key_ex(
                nullptr, "ED25519", nullptr, reinterpret_cast<const unsigned char*>(point.data()),
                point.size()));
            if (pkey == nullptr)
              return absl::InternalError("EVP_PKEY_new_raw_public_key_ex failed");
            return absl::OkStatus();
          }
          P11_ASSIGN_OR_RETURN(pkey, EcPublicKey(key.spec.type, std::move(point)));
          return absl::OkStatus();
        });
  }));
  return pkey;
}

absl::StatusOr<PrivateKeyAttributes> Token::GetPrivateKeyAttributes(const KeyPair& key) {
  CK_FUNCTION_LIST* fn = state_->fn;
  PrivateKeyAttributes out;
  P11_RETURN_IF_ERROR(state_->Run(&key, [&](SessionPool::Lease& lease) {
    return state_->WithHandle(lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) {
      CK_BBOOL values[6] = {};
      CK_ATTRIBUTE attributes[] = {
          {CKA_TOKEN, &values[0], 1},
          {CKA_PRIVATE, &values[1], 1},
          {CKA_SENSITIVE, &values[2], 1},
          {CKA_EXTRACTABLE, &values[3], 1},
          {CKA_ALWAYS_SENSITIVE, &values[4], 1},
          {CKA_NEVER_EXTRACTABLE, &values[5], 1},
      };
      P11_RETURN_IF_ERROR(lease.Check(
          "C_GetAttributeValue",
          fn->C_GetAttributeValue(lease.get(), handle, attributes, std::size(attributes))));
      out.token = values[0] == CK_TRUE;
      out.is_private = values[1] == CK_TRUE;
      out.sensitive = values[2] == CK_TRUE;
      out.extractable = values[3] == CK_TRUE;
      out.always_sensitive = values[4] == CK_TRUE;
      out.never_extractable = values[5] == CK_TRUE;
      return absl::OkStatus();
    });
  }));
  return out;
}

namespace {

// What startup needs of one key object, read in one C_GetAttributeValue: SoftHSM2 re-reads an
// object's file (open, lock, read) on every call, so the number of calls is what a start with
// thousands of keys pays. Attributes an object lacks (CKA_EC_PARAMS of an RSA key) come back
// unavailable, which the standard allows in the same call.
struct KeyObjectAttributes {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  std::string id;
  std::string label;
  std::optional<KeySpec> spec;  // private keys whose type custody can use
};

// One attribute per call: for objects whose combined read failed.
absl::StatusOr<std::optional<KeyObjectAttributes>> ReadKeyObjectSlowly(CK_FUNCTION_LIST* fn,
                                                                       SessionPool::Lease& lease,
                                                                       CK_OBJECT_HANDLE handle,
                                                                       bool* is_private) {
  absl::StatusOr<CK_ULONG> object_class = GetUlong(fn, lease, handle, CKA_CLASS);
  if (absl::IsUnavailable(object_class.status())) return object_class.status();
  if (!object_class.ok() || (*object_class != CKO_PRIVATE_KEY && *object_class != CKO_PUBLIC_KEY)) {
    return std::nullopt;
  }
  *is_private = *object_class == CKO_PRIVATE_KEY;
  KeyObjectAttributes out;
  out.handle = handle;
  absl::StatusOr<std::string> id = GetBytes(fn, lease, handle, CKA_ID);
  if (absl::IsUnavailable(id.status())) return id.status();
  // Destroyed since the search, or too broken to name: not a key custody can match to a
  // version. Startup must not stop on it (the version then reports its object missing, and
  // the scan of orphans cannot list it either).
  if (!id.ok()) return std::nullopt;
  out.id = *std::move(id);
  absl::StatusOr<std::string> label = GetBytes(fn, lease, handle, CKA_LABEL);
  if (absl::IsUnavailable(label.status())) return label.status();
  if (label.ok()) out.label = *std::move(label);
  if (*is_private) {
    absl::StatusOr<KeySpec> spec = ReadKeySpec(fn, lease, handle);
    if (absl::IsUnavailable(spec.status())) return spec.status();
    if (spec.ok()) out.spec = *spec;
  }
  return out;
}

// nullopt: the object is gone or not a key. UNAVAILABLE: token trouble.
absl::StatusOr<std::optional<KeyObjectAttributes>> ReadKeyObject(CK_FUNCTION_LIST* fn,
                                                                 SessionPool::Lease& lease,
                                                                 CK_OBJECT_HANDLE handle,
                                                                 bool* is_private) {
  CK_OBJECT_CLASS object_class = 0;
  CK_KEY_TYPE key_type = 0;
  char id[256], label[256], params[64], modulus[1024];
  CK_ATTRIBUTE t[] = {{CKA_CLASS, &object_class, sizeof(object_class)},
                      {CKA_ID, id, sizeof(id)},
                      {CKA_LABEL, label, sizeof(label)},
                      {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
                      {CKA_EC_PARAMS, params, sizeof(params)},
                      {CKA_MODULUS, modulus, sizeof(modulus)}};
  CK_RV rv = fn->C_GetAttributeValue(lease.get(), handle, t, std::size(t));
  if (rv == CKR_OBJECT_HANDLE_INVALID) return std::nullopt;  // destroyed since the search
  if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_ATTRIBUTE_SENSITIVE &&
      rv != CKR_BUFFER_TOO_SMALL) {
    absl::Status s = lease.Check("C_GetAttributeValue", rv);
    if (absl::IsUnavailable(s)) return s;  // token trouble: recover and retry the whole pass
    // Anything else (SoftHSM2 fails the whole call with CKR_ATTRIBUTE_VALUE_INVALID for an
    // object a kill left half-written): read it attribute by attribute, as for any object.
    return ReadKeyObjectSlowly(fn, lease, handle, is_private);
  }
  auto available = [&](const CK_ATTRIBUTE& a) {
    return a.ulValueLen != CK_UNAVAILABLE_INFORMATION;
  };
  if (!available(t[0]) || (object_class != CKO_PRIVATE_KEY && object_class != CKO_PUBLIC_KEY)) {
    return std::nullopt;
  }
  *is_private = object_class == CKO_PRIVATE_KEY;
  KeyObjectAttributes out;
  out.handle = handle;
  // An id or label over 256 bytes: read it alone, as any other object's.
  if (available(t[1])) {
    out.id.assign(id, t[1].ulValueLen);
  } else {
    P11_ASSIGN_OR_RETURN(out.id, GetBytes(fn, lease, handle, CKA_ID));
  }
  if (available(t[2])) {
    out.label.assign(label, t[2].ulValueLen);
  } else {
    absl::StatusOr<std::string> l = GetBytes(fn, lease, handle, CKA_LABEL);
    if (absl::IsUnavailable(l.status())) return l.status();
    if (l.ok()) out.label = *std::move(l);
  }
  if (!*is_private || !available(t[3])) return out;
  absl::StatusOr<KeySpec> spec = absl::NotFoundError("no usable key type");
  if (key_type == CKK_RSA && available(t[5])) {
    spec = RsaSpec(std::string_view(modulus, t[5].ulValueLen));
  } else if ((key_type == CKK_EC || key_type == CKK_EC_EDWARDS) && available(t[4])) {
    spec = EcSpec(std::string_view(params, t[4].ulValueLen));
  }
  if (spec.ok()) out.spec = *spec;
  return out;
}

}  // namespace

absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> Token::FindAllKeyPairs(
    std::vector<ObjectInfo>* objects) {
  CK_FUNCTION_LIST* fn = state_->fn;
  std::map<std::string, std::shared_ptr<KeyPair>> pairs;
  P11_RETURN_IF_ERROR(state_->Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    pairs.clear();
    if (objects != nullptr) objects->clear();
    // One search over every object and one attribute read per key object.
    P11_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> handles, FindObjects(fn, lease, {}));
    std::vector<KeyObjectAttributes> private_keys, public_keys;
    for (CK_OBJECT_HANDLE handle : handles) {
      bool is_private = false;
      P11_ASSIGN_OR_RETURN(std::optional<KeyObjectAttributes> key,
                           ReadKeyObject(fn, lease, handle, &is_private));
      if (!key.has_value()) continue;
      if (objects != nullptr) {
        objects->push_back(
            ObjectInfo{.id = key->id, .label = key->label, .is_private_key = is_private});
      }
      (is_private ? private_keys : public_keys).push_back(*std::move(key));
    }
    std::set<std::string> ambiguous;
    for (KeyObjectAttributes& key : private_keys) {
      if (key.id.empty() || ambiguous.count(key.id) > 0) continue;
      if (pairs.count(key.id) > 0) {
        pairs.erase(key.id);
        ambiguous.insert(key.id);
        continue;
      }
      // A key custody cannot use (another type, half-written attributes) is simply not a pair
      // here; FindKeyPair on its id says why.
      if (!key.spec.has_value()) continue;
      auto pair = std::make_shared<KeyPair>();
      pair->id = key.id;
      pair->label = std::move(key.label);
      pair->spec = *key.spec;
      pair->private_handle.store(key.handle);
      pair->handle_generation.store(state_->module->generation());
      pairs.emplace(key.id, std::move(pair));
    }
    std::set<std::string> seen_public;
    for (const KeyObjectAttributes& key : public_keys) {
      auto it = pairs.find(key.id);
      if (it == pairs.end()) continue;
      if (!seen_public.insert(key.id).second) {  // two public keys: ambiguous as well
        pairs.erase(it);
        continue;
      }
      it->second->public_handle.store(key.handle);
    }
    return absl::OkStatus();
  }));
  return pairs;
}

absl::StatusOr<std::vector<ObjectInfo>> Token::ListKeyObjects() {
  std::vector<ObjectInfo> objects;
  absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> pairs = FindAllKeyPairs(&objects);
  if (!pairs.ok()) return pairs.status();
  return objects;
}

absl::Status Token::DestroyKeyPair(std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("DestroyKeyPair: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state_->fn;
  // Idempotent, so retried after a recovery like the reads.
  return state_->Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    P11_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> handles,
                         FindObjects(fn, lease, {Attr(CKA_ID, id)}));
    for (CK_OBJECT_HANDLE handle : handles) {
      CK_RV rv = fn->C_DestroyObject(lease.get(), handle);
      // Already gone (a concurrent destroy) is what we wanted.
      if (rv == CKR_OBJECT_HANDLE_INVALID) continue;
      P11_RETURN_IF_ERROR(lease.Check("C_DestroyObject", rv));
    }
    return absl::OkStatus();
  });
}

bool Token::HasMechanism(std::string_view mechanism_name) const {
  return state_->mechanisms.contains(mechanism_name);
}

absl::StatusOr<Secret> Token::DecryptRsaOaep(const KeyPair& key, OaepHash hash,
                                             std::string_view ciphertext) {
  State::Timer timer(*state_, Timed::kDecrypt);
  if (key.spec.type != KeyType::kRsa) {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", PrintableId(key.id), " is not an RSA key"));
  }
  CK_FUNCTION_LIST* fn = state_->fn;
  Secret plaintext;
  P11_RETURN_IF_ERROR(state_->Run(&key, [&](SessionPool::Lease& lease) {
    return state_->WithHandle(
        lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) -> absl::Status {
          P11_ASSIGN_OR_RETURN(size_t modulus_bytes, ModulusBytes(fn, lease, handle, key.spec));
          P11_ASSIGN_OR_RETURN(plaintext,
                               DecryptOaep(fn, lease, handle, hash, modulus_bytes, ciphertext));
          return absl::OkStatus();
        });
  }));
  return plaintext;
}

absl::StatusOr<Secret> Token::DecryptRsaRaw(const KeyPair& key, std::string_view ciphertext) {
  State::Timer timer(*state_, Timed::kDecrypt);
  if (key.spec.type != KeyType::kRsa) {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", PrintableId(key.id), " is not an RSA key"));
  }
  if (!HasMechanism("CKM_RSA_X_509")) {
    return absl::UnimplementedError("the token does not offer CKM_RSA_X_509");
  }
  CK_FUNCTION_LIST* fn = state_->fn;
  Secret message;
  size_t modulus_bytes = 0;
  P11_RETURN_IF_ERROR(state_->Run(&key, [&](SessionPool::Lease& lease) {
    return state_->WithHandle(
        lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) -> absl::Status {
          P11_ASSIGN_OR_RETURN(modulus_bytes, ModulusBytes(fn, lease, handle, key.spec));
          // Before C_DecryptInit, so that no operation is left active.
          if (ciphertext.size() != modulus_bytes) {
            return absl::InvalidArgumentError(kDecryptionFailed);
          }
          CK_MECHANISM mechanism{CKM_RSA_X_509, nullptr, 0};
          CK_RV rv = fn->C_DecryptInit(lease.get(), &mechanism, handle);
          if (rv == CKR_MECHANISM_INVALID) {
            return absl::UnimplementedError(
                "C_DecryptInit: CKR_MECHANISM_INVALID for CKM_RSA_X_509");
          }
          P11_RETURN_IF_ERROR(lease.Check("C_DecryptInit", rv));
          P11_ASSIGN_OR_RETURN(message, RunDecrypt(fn, lease, modulus_bytes, ciphertext));
          return absl::OkStatus();
        });
  }));
  // The k-byte encoded message: a token may have stripped its leading zeros.
  const size_t length = message.size();
  if (length > modulus_bytes) return absl::InvalidArgumentError(kDecryptionFailed);
  message.mutable_value().resize(modulus_bytes);  // within capacity: no unwiped copy
  AlignRight(message.mutable_value(), length);
  return message;
}

bool Token::OaepSupported(OaepHash hash) {
  const size_t index = hash == OaepHash::kSha1 ? 0 : 1;
  {
    absl::MutexLock lock(&state_->oaep_mu);
    if (state_->oaep_supported[index].has_value()) return *state_->oaep_supported[index];
  }
  // Probed without the lock (no lock is held across token calls): two first callers may both
  // probe, and then agree.
  absl::StatusOr<bool> supported = false;
  if (HasMechanism("CKM_RSA_PKCS_OAEP")) {
    bool answer = false;
    absl::Status probed = state_->Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
      P11_ASSIGN_OR_RETURN(answer, ProbeOaep(state_->fn, lease, hash));
      return absl::OkStatus();
    });
    if (probed.ok()) {
      supported = answer;
    } else {
      supported = probed;
    }
  }
  if (!supported.ok()) {
    Log(LogLevel::kWarning, "pkcs11.oaep_probe_failed",
        {{"hash", OaepHashName(hash)}, {"status", supported.status().ToString()}});
    return false;  // not cached: the next call probes again
  }
  absl::MutexLock lock(&state_->oaep_mu);
  state_->oaep_supported[index] = *supported;
  return *supported;
}

absl::StatusOr<Secret> Token::DeriveEcdh(const KeyPair& key, std::string_view peer_point) {
  State::Timer timer(*state_, Timed::kDerive);
  if (!IsEc(key.spec.type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", PrintableId(key.id), " is not an EC key: no ECDH"));
  }
  const size_t point_size = PublicPointSize(key.spec.type);
  if (peer_point.size() != point_size || peer_point.front() != '\x04') {
    return absl::InvalidArgumentError(
        absl::StrCat("the peer point must be an uncompressed ", point_size, "-byte point"));
  }
  const CK_ULONG field_size = (point_size - 1) / 2;
  CK_FUNCTION_LIST* fn = state_->fn;
  Secret shared;
  P11_RETURN_IF_ERROR(state_->Run(&key, [&](SessionPool::Lease& lease) {
    return state_->WithHandle(
        lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) -> absl::Status {
          P11_ASSIGN_OR_RETURN(shared,
                               DeriveEcdhWithHandle(fn, lease, handle, peer_point, field_size));
          return absl::OkStatus();
        });
  }));
  return shared;
}

absl::StatusOr<std::shared_ptr<KeyPair>> Token::ImportKeyPair(const EVP_PKEY* private_key,
                                                              std::string_view id,
                                                              std::string_view label,
                                                              bool for_decryption) {
  if (private_key == nullptr) return absl::InvalidArgumentError("ImportKeyPair: no key");
  if (id.empty()) return absl::InvalidArgumentError("ImportKeyPair: empty CKA_ID");
  P11_ASSIGN_OR_RETURN(KeyMaterial material, ImportableKeyMaterial(private_key));
  const KeyType type = material.spec.type;
  if (type == KeyType::kEd25519 && for_decryption) {
    return absl::InvalidArgumentError("Ed25519 keys cannot decrypt");
  }
  CK_FUNCTION_LIST* fn = state_->fn;
  const bool rsa = type == KeyType::kRsa;
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  // The usage flags of GenerateKeyPair.
  std::vector<CK_ATTRIBUTE> private_template = {
      Attr(CKA_CLASS, &private_class, sizeof(private_class)),
      Attr(CKA_KEY_TYPE, &material.key_type, sizeof(material.key_type)),
      BoolAttr(CKA_TOKEN, true),
      BoolAttr(CKA_PRIVATE, true),
      BoolAttr(CKA_SENSITIVE, true),
      BoolAttr(CKA_EXTRACTABLE, false),
      Attr(CKA_ID, id),
      Attr(CKA_LABEL, label),
  };
  AppendPrivateKeyUsage(private_template, rsa, for_decryption);
  for (const auto& [attribute, value] : material.private_values) {
    private_template.push_back(Attr(attribute, value.view().data(), value.size()));
  }
  std::vector<CK_ATTRIBUTE> public_template = {
      Attr(CKA_CLASS, &public_class, sizeof(public_class)),
      Attr(CKA_KEY_TYPE, &material.key_type, sizeof(material.key_type)),
      BoolAttr(CKA_TOKEN, true),
      BoolAttr(CKA_PRIVATE, false),
      BoolAttr(CKA_VERIFY, !for_decryption),
      Attr(CKA_ID, id),
      Attr(CKA_LABEL, label),
  };
  if (rsa) public_template.push_back(BoolAttr(CKA_ENCRYPT, for_decryption));
  for (const auto& [attribute, value] : material.public_values) {
    public_template.push_back(Attr(attribute, value));
  }

  bool started = false;
  std::shared_ptr<KeyPair> pair;
  P11_RETURN_IF_ERROR(state_->RunCreating(
      [&](SessionPool::Lease& lease) -> absl::Status {
        P11_RETURN_IF_ERROR(RefuseExistingId(fn, lease, id));
        auto create = [&](const std::vector<CK_ATTRIBUTE>& base, std::string_view ec_params,
                          CK_OBJECT_HANDLE* handle) {
          std::vector<CK_ATTRIBUTE> attributes = base;
          if (!ec_params.empty()) attributes.push_back(Attr(CKA_EC_PARAMS, ec_params));
          return fn->C_CreateObject(lease.get(), attributes.data(), attributes.size(), handle);
        };
        started = true;
        std::string_view ec_params = EcParams(type);
        CK_OBJECT_HANDLE private_handle = CK_INVALID_HANDLE;
        CK_RV rv = create(private_template, ec_params, &private_handle);
        if (type == KeyType::kEd25519 &&
            (rv == CKR_ATTRIBUTE_VALUE_INVALID || rv == CKR_CURVE_NOT_SUPPORTED ||
             rv == CKR_DOMAIN_PARAMS_INVALID || rv == CKR_TEMPLATE_INCONSISTENT)) {
          // As in GenerateKeyPair: the other name of Ed25519 in CKA_EC_PARAMS. Nothing was
          // created.
          ec_params = kEd25519Name;
          rv = create(private_template, ec_params, &private_handle);
        }
        P11_RETURN_IF_ERROR(lease.Check("C_CreateObject(private key)", rv));
        // No half-imported pair: the private key goes again unless the public key follows it.
        ScopedObject private_object(fn, lease, private_handle);
        CK_OBJECT_HANDLE public_handle = CK_INVALID_HANDLE;
        P11_RETURN_IF_ERROR(lease.Check("C_CreateObject(public key)",
                                        create(public_template, ec_params, &public_handle)));
        pair = std::make_shared<KeyPair>();
        pair->id = std::string(id);
        pair->label = std::string(label);
        pair->spec = material.spec;
        pair->private_handle.store(private_object.release());
        pair->public_handle.store(public_handle);
        pair->handle_generation.store(state_->module->generation());
        return absl::OkStatus();
      },
      started, id, pair));
  return pair;
}

}  // namespace custody::pkcs11
