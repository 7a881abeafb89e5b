#include "pkcs11/token.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
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

absl::StatusOr<KeySpec> ReadKeySpec(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                    CK_OBJECT_HANDLE private_key) {
  P11_ASSIGN_OR_RETURN(CK_ULONG key_type, GetUlong(fn, lease, private_key, CKA_KEY_TYPE));
  KeySpec spec;
  if (key_type == CKK_RSA) {
    // CKA_MODULUS_BITS lives on the public key only; the modulus is public on both.
    P11_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, private_key, CKA_MODULUS));
    size_t first = modulus.find_first_not_of('\0');
    if (first == std::string::npos) return absl::InternalError("RSA key with a zero modulus");
    int bits = static_cast<int>(modulus.size() - first) * 8;
    for (unsigned char top = modulus[first]; (top & 0x80) == 0; top <<= 1) --bits;
    spec.type = KeyType::kRsa;
    spec.rsa_bits = bits;
    return spec;
  }
  if (key_type != CKK_EC && key_type != CKK_EC_EDWARDS) {
    return absl::FailedPreconditionError(
        absl::StrCat("unsupported CKA_KEY_TYPE 0x", absl::Hex(key_type)));
  }
  P11_ASSIGN_OR_RETURN(std::string params, GetBytes(fn, lease, private_key, CKA_EC_PARAMS));
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
        absl::StrCat("unsupported CKA_EC_PARAMS ", absl::BytesToHexString(params)));
  }
  return spec;
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

}  // namespace

class Token::State {
 public:
  // Declared first so that it is destroyed last: the pool closes sessions through it.
  std::unique_ptr<Module> module;
  CK_FUNCTION_LIST* fn = nullptr;
  TokenInfo info;
  std::set<std::string, std::less<>> mechanisms;
  std::unique_ptr<SessionPool> pool;

  // Runs `op` on the cached handle; if the token says the handle is stale (NOT_FOUND from
  // CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID, e.g. after a token reconnect), finds
  // the object again by CKA_ID, updates the cache and runs `op` once more.
  absl::Status WithHandle(SessionPool::Lease& lease, const KeyPair& key, CK_OBJECT_CLASS cls,
                          const std::function<absl::Status(CK_OBJECT_HANDLE)>& op) {
    std::atomic<uint64_t>& cached = cls == CKO_PRIVATE_KEY ? key.private_handle : key.public_handle;
    const uint64_t handle = cached.load(std::memory_order_acquire);
    if (handle != CK_INVALID_HANDLE) {
      absl::Status status = op(handle);
      if (!absl::IsNotFound(status)) return status;
    }
    P11_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE fresh, FindOne(fn, lease, cls, key.id));
    cached.store(fresh, std::memory_order_release);
    return op(fresh);
  }
};

Token::Token(std::unique_ptr<State> state) : state_(std::move(state)) {}
Token::~Token() = default;

const TokenInfo& Token::info() const { return state_->info; }

absl::StatusOr<std::unique_ptr<Token>> Token::Open(Options options) {
  auto state = std::make_unique<State>();
  P11_ASSIGN_OR_RETURN(state->module, Module::Load(options.module_path));
  CK_FUNCTION_LIST* fn = state->module->fn();
  state->fn = fn;

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

  state->pool = std::make_unique<SessionPool>(fn, token.slot, std::move(options.pin),
                                              options.max_sessions, options.session_wait);
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
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());

  // Two pairs with one CKA_ID would make FindKeyPair ambiguous forever after.
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  P11_ASSIGN_OR_RETURN(
      std::vector<CK_OBJECT_HANDLE> existing,
      FindObjects(fn, lease,
                  {Attr(CKA_CLASS, &private_class, sizeof(private_class)), Attr(CKA_ID, id)}));
  if (!existing.empty()) {
    return absl::AlreadyExistsError(
        absl::StrCat("a private key with CKA_ID ", PrintableId(id), " exists"));
  }

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
      BoolAttr(CKA_SIGN, !for_decryption),
      Attr(CKA_ID, id),
      Attr(CKA_LABEL, label),
  };
  if (for_decryption) {
    private_template.push_back(BoolAttr(rsa ? CKA_DECRYPT : CKA_DERIVE, true));
  }

  CK_MECHANISM mechanism{};
  mechanism.mechanism = rsa                              ? CKM_RSA_PKCS_KEY_PAIR_GEN
                        : spec.type == KeyType::kEd25519 ? CKM_EC_EDWARDS_KEY_PAIR_GEN
                                                         : CKM_EC_KEY_PAIR_GEN;
  auto generate = [&](std::string_view ec_params, CK_OBJECT_HANDLE* public_key,
                      CK_OBJECT_HANDLE* private_key) {
    std::vector<CK_ATTRIBUTE> public_attributes = public_template;
    if (!ec_params.empty()) public_attributes.push_back(Attr(CKA_EC_PARAMS, ec_params));
    return fn->C_GenerateKeyPair(lease.get(), &mechanism, public_attributes.data(),
                                 public_attributes.size(), private_template.data(),
                                 private_template.size(), public_key, private_key);
  };
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  CK_RV rv = generate(EcParams(spec.type), &public_key, &private_key);
  if (spec.type == KeyType::kEd25519 &&
      (rv == CKR_ATTRIBUTE_VALUE_INVALID || rv == CKR_CURVE_NOT_SUPPORTED ||
       rv == CKR_DOMAIN_PARAMS_INVALID || rv == CKR_TEMPLATE_INCONSISTENT)) {
    // Modules differ on how Ed25519 is named in CKA_EC_PARAMS (RFC 8410 OID vs the PKCS#11 3.0
    // PrintableString). A refusal created nothing, so asking again with the other form is not a
    // retry of a failed generation.
    rv = generate(kEd25519Name, &public_key, &private_key);
  }
  P11_RETURN_IF_ERROR(lease.Check("C_GenerateKeyPair", rv));

  auto pair = std::make_shared<KeyPair>();
  pair->id = std::string(id);
  pair->label = std::string(label);
  pair->spec = spec;
  if (!rsa) pair->spec.rsa_bits = 0;
  pair->private_handle.store(private_key);
  pair->public_handle.store(public_key);
  return pair;
}

absl::StatusOr<std::shared_ptr<KeyPair>> Token::FindKeyPair(std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("FindKeyPair: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state_->fn;
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());
  P11_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE private_key, FindOne(fn, lease, CKO_PRIVATE_KEY, id));
  // A missing public key is tolerated here (signing still works); PublicKey reports it.
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  if (absl::StatusOr<CK_OBJECT_HANDLE> found = FindOne(fn, lease, CKO_PUBLIC_KEY, id); found.ok()) {
    public_key = *found;
  } else if (!absl::IsNotFound(found.status())) {
    return found.status();
  }
  P11_ASSIGN_OR_RETURN(KeySpec spec, ReadKeySpec(fn, lease, private_key));
  P11_ASSIGN_OR_RETURN(std::string label, GetBytes(fn, lease, private_key, CKA_LABEL));

  auto pair = std::make_shared<KeyPair>();
  pair->id = std::string(id);
  pair->label = std::move(label);
  pair->spec = spec;
  pair->private_handle.store(private_key);
  pair->public_handle.store(public_key);
  return pair;
}

absl::StatusOr<std::string> Token::Sign(const KeyPair& key, SignScheme scheme,
                                        std::string_view input) {
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
      if (input.size() != 32) {
        return absl::InvalidArgumentError("PS256 input must be a 32-byte SHA-256 digest");
      }
      pss.hashAlg = CKM_SHA256;
      pss.mgf = CKG_MGF1_SHA256;
      pss.sLen = 32;
      mechanism.mechanism = CKM_RSA_PKCS_PSS;
      mechanism.pParameter = &pss;
      mechanism.ulParameterLen = sizeof(pss);
      scheme_fits = key.spec.type == KeyType::kRsa;
      break;
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
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());
  std::string signature;
  P11_RETURN_IF_ERROR(state_->WithHandle(lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) {
    P11_RETURN_IF_ERROR(lease.Check("C_SignInit", fn->C_SignInit(lease.get(), &mechanism, handle)));
    auto* data = reinterpret_cast<CK_BYTE*>(const_cast<char*>(input.data()));
    signature.assign(SignatureSize(key.spec), '\0');
    CK_ULONG length = signature.size();
    CK_RV rv = fn->C_Sign(lease.get(), data, input.size(),
                          reinterpret_cast<CK_BYTE*>(signature.data()), &length);
    if (rv == CKR_BUFFER_TOO_SMALL) {
      // The operation stays active and `length` now holds the size needed.
      signature.assign(length, '\0');
      rv = fn->C_Sign(lease.get(), data, input.size(), reinterpret_cast<CK_BYTE*>(signature.data()),
                      &length);
    }
    P11_RETURN_IF_ERROR(lease.Check("C_Sign", rv));
    signature.resize(length);
    return absl::OkStatus();
  }));
  return signature;
}

absl::StatusOr<EvpPkeyPtr> Token::PublicKey(const KeyPair& key) {
  CK_FUNCTION_LIST* fn = state_->fn;
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());
  EvpPkeyPtr pkey;
  P11_RETURN_IF_ERROR(
      state_->WithHandle(lease, key, CKO_PUBLIC_KEY, [&](CK_OBJECT_HANDLE handle) -> absl::Status {
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
          if (pkey == nullptr) return absl::InternalError("EVP_PKEY_new_raw_public_key_ex failed");
          return absl::OkStatus();
        }
        P11_ASSIGN_OR_RETURN(pkey, EcPublicKey(key.spec.type, std::move(point)));
        return absl::OkStatus();
      }));
  return pkey;
}

absl::StatusOr<PrivateKeyAttributes> Token::GetPrivateKeyAttributes(const KeyPair& key) {
  CK_FUNCTION_LIST* fn = state_->fn;
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());
  PrivateKeyAttributes out;
  P11_RETURN_IF_ERROR(state_->WithHandle(lease, key, CKO_PRIVATE_KEY, [&](CK_OBJECT_HANDLE handle) {
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
  }));
  return out;
}

absl::StatusOr<std::vector<ObjectInfo>> Token::ListKeyObjects() {
  CK_FUNCTION_LIST* fn = state_->fn;
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());
  std::vector<ObjectInfo> objects;
  for (CK_OBJECT_CLASS object_class : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
    P11_ASSIGN_OR_RETURN(
        std::vector<CK_OBJECT_HANDLE> handles,
        FindObjects(fn, lease, {Attr(CKA_CLASS, &object_class, sizeof(object_class))}));
    for (CK_OBJECT_HANDLE handle : handles) {
      absl::StatusOr<std::string> id = GetBytes(fn, lease, handle, CKA_ID);
      // Destroyed by another thread since the search: not an error for a listing.
      if (absl::IsNotFound(id.status())) continue;
      if (!id.ok()) return id.status();
      absl::StatusOr<std::string> label = GetBytes(fn, lease, handle, CKA_LABEL);
      if (absl::IsNotFound(label.status())) continue;
      if (!label.ok()) return label.status();
      objects.push_back(ObjectInfo{.id = std::move(*id),
                                   .label = std::move(*label),
                                   .is_private_key = object_class == CKO_PRIVATE_KEY});
    }
  }
  return objects;
}

absl::Status Token::DestroyKeyPair(std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("DestroyKeyPair: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state_->fn;
  P11_ASSIGN_OR_RETURN(SessionPool::Lease lease, state_->pool->Acquire());
  P11_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> handles,
                       FindObjects(fn, lease, {Attr(CKA_ID, id)}));
  for (CK_OBJECT_HANDLE handle : handles) {
    CK_RV rv = fn->C_DestroyObject(lease.get(), handle);
    // Already gone (a concurrent destroy) is what we wanted.
    if (rv == CKR_OBJECT_HANDLE_INVALID) continue;
    P11_RETURN_IF_ERROR(lease.Check("C_DestroyObject", rv));
  }
  return absl::OkStatus();
}

bool Token::HasMechanism(std::string_view mechanism_name) const {
  return state_->mechanisms.contains(mechanism_name);
}

}  // namespace custody::pkcs11
