// Key objects in the token: searching by class and CKA_ID, reading attributes, resolving a key
// pair (FindKeyPair), the one-pass enumeration of every pair at startup (FindAllKeyPairs), the
// private-key attribute check and destruction by CKA_ID.
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {

std::string PrintableId(std::string_view id) {
  // Hex, as custody shows CKA_ID everywhere else (KeyVersion.token_object_id): an escaped byte
  // string is neither what pkcs11-tool prints nor safe to paste.
  return absl::BytesToHexString(AsAbsl(id));
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(CK_FUNCTION_LIST* fn,
                                                          SessionPool::Lease& lease,
                                                          std::vector<CK_ATTRIBUTE> match) {
  CUSTODY_RETURN_IF_ERROR(lease.Check(
      "C_FindObjectsInit", fn->C_FindObjectsInit(lease.get(), match.data(), match.size())));
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
  CUSTODY_RETURN_IF_ERROR(status);
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_FindObjectsFinal", rv));
  return found;
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindKeyObjects(CK_FUNCTION_LIST* fn,
                                                             SessionPool::Lease& lease,
                                                             CK_OBJECT_CLASS object_class,
                                                             std::string_view id) {
  return FindObjects(fn, lease,
                     {Attr(CKA_CLASS, &object_class, sizeof(object_class)), Attr(CKA_ID, id)});
}

absl::StatusOr<CK_OBJECT_HANDLE> FindOne(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                         CK_OBJECT_CLASS object_class, std::string_view id) {
  CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                           FindKeyObjects(fn, lease, object_class, id));
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

absl::Status DestroyObjects(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                            const std::vector<CK_OBJECT_HANDLE>& handles) {
  for (CK_OBJECT_HANDLE handle : handles) {
    CK_RV rv = fn->C_DestroyObject(lease.get(), handle);
    if (rv == CKR_OBJECT_HANDLE_INVALID) continue;
    CUSTODY_RETURN_IF_ERROR(lease.Check("C_DestroyObject", rv));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> GetBytes(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                     CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attribute{type, nullptr, 0};
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                      fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  if (attribute.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return absl::InternalError("C_GetAttributeValue: attribute unavailable");
  }
  std::string value(attribute.ulValueLen, '\0');
  attribute.pValue = value.data();
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                      fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  value.resize(attribute.ulValueLen);
  return value;
}

absl::StatusOr<CK_ULONG> GetUlong(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                  CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ULONG value = 0;
  CK_ATTRIBUTE attribute{type, &value, sizeof(value)};
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                      fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  return value;
}

absl::StatusOr<KeySpec> ReadKeySpec(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                    CK_OBJECT_HANDLE private_key) {
  CUSTODY_ASSIGN_OR_RETURN(CK_ULONG key_type, GetUlong(fn, lease, private_key, CKA_KEY_TYPE));
  if (key_type == CKK_RSA) {
    CUSTODY_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, private_key, CKA_MODULUS));
    return RsaSpec(modulus);
  }
  if (key_type != CKK_EC && key_type != CKK_EC_EDWARDS) {
    return absl::FailedPreconditionError(
        absl::StrCat("unsupported CKA_KEY_TYPE 0x", absl::Hex(key_type)));
  }
  CUSTODY_ASSIGN_OR_RETURN(std::string params, GetBytes(fn, lease, private_key, CKA_EC_PARAMS));
  return EcSpec(params);
}

std::shared_ptr<KeyPair> MakeKeyPair(std::string_view id, std::string label, const KeySpec& spec,
                                     CK_OBJECT_HANDLE private_handle,
                                     CK_OBJECT_HANDLE public_handle, uint64_t generation) {
  auto pair = std::make_shared<KeyPair>();
  pair->id = std::string(id);
  pair->label = std::move(label);
  pair->spec = spec;
  pair->private_handle.store(private_handle);
  pair->public_handle.store(public_handle);
  pair->handle_generation.store(generation);
  return pair;
}

absl::StatusOr<std::shared_ptr<KeyPair>> FindKeyPair(TokenState& state, std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("FindKeyPair: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state.fn;
  std::shared_ptr<KeyPair> pair;
  CUSTODY_RETURN_IF_ERROR(state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    CUSTODY_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE private_key, FindOne(fn, lease, CKO_PRIVATE_KEY, id));
    // A missing public key is tolerated here (signing still works); PublicKey reports it.
    CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
    if (absl::StatusOr<CK_OBJECT_HANDLE> found = FindOne(fn, lease, CKO_PUBLIC_KEY, id);
        found.ok()) {
      public_key = *found;
    } else if (!absl::IsNotFound(found.status()) || CkrOf(found.status()).has_value()) {
      return found.status();
    }
    CUSTODY_ASSIGN_OR_RETURN(KeySpec spec, ReadKeySpec(fn, lease, private_key));
    CUSTODY_ASSIGN_OR_RETURN(std::string label, GetBytes(fn, lease, private_key, CKA_LABEL));
    pair = MakeKeyPair(id, std::move(label), spec, private_key, public_key,
                       state.module->generation());
    return absl::OkStatus();
  }));
  return pair;
}

absl::StatusOr<PrivateKeyAttributes> GetPrivateKeyAttributes(TokenState& state,
                                                             const KeyPair& key) {
  CK_FUNCTION_LIST* fn = state.fn;
  PrivateKeyAttributes out;
  CUSTODY_RETURN_IF_ERROR(
      state.RunOnKey(key, CKO_PRIVATE_KEY, [&](SessionPool::Lease& lease, CK_OBJECT_HANDLE handle) {
        CK_BBOOL values[6] = {};
        CK_ATTRIBUTE attributes[] = {
            {CKA_TOKEN, &values[0], 1},
            {CKA_PRIVATE, &values[1], 1},
            {CKA_SENSITIVE, &values[2], 1},
            {CKA_EXTRACTABLE, &values[3], 1},
            {CKA_ALWAYS_SENSITIVE, &values[4], 1},
            {CKA_NEVER_EXTRACTABLE, &values[5], 1},
        };
        CUSTODY_RETURN_IF_ERROR(lease.Check(
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
    CUSTODY_ASSIGN_OR_RETURN(out.id, GetBytes(fn, lease, handle, CKA_ID));
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

absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> FindAllKeyPairs(
    TokenState& state, std::vector<ObjectInfo>* objects) {
  CK_FUNCTION_LIST* fn = state.fn;
  std::map<std::string, std::shared_ptr<KeyPair>> pairs;
  CUSTODY_RETURN_IF_ERROR(state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    pairs.clear();
    if (objects != nullptr) objects->clear();
    // One search over every object and one attribute read per key object.
    CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> handles, FindObjects(fn, lease, {}));
    std::vector<KeyObjectAttributes> private_keys, public_keys;
    for (CK_OBJECT_HANDLE handle : handles) {
      bool is_private = false;
      CUSTODY_ASSIGN_OR_RETURN(std::optional<KeyObjectAttributes> key,
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
      pairs.emplace(key.id, MakeKeyPair(key.id, std::move(key.label), *key.spec, key.handle,
                                        CK_INVALID_HANDLE, state.module->generation()));
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

absl::Status DestroyKeyPair(TokenState& state, std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("DestroyKeyPair: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state.fn;
  // Idempotent, so retried after a recovery like the reads.
  return state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> handles,
                             FindObjects(fn, lease, {Attr(CKA_ID, id)}));
    return DestroyObjects(fn, lease, handles);
  });
}

}  // namespace custody::pkcs11::internal
