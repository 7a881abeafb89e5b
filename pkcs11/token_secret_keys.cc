// Secret keys in the token: the one custody keeps is the metadata tag key (HMAC-SHA256), which
// server/keys/metadata_tag_key.h finds by label or generates at first start. Found by CKA_ID on
// each use: it tags metadata records when they are written and read, never on the signing path.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

constexpr CK_OBJECT_CLASS kSecretKey = CKO_SECRET_KEY;

bool IsGoneOrUnwritten(const absl::Status& status) {
  return absl::StrContains(status.message(), "CKR_OBJECT_HANDLE_INVALID") ||
         absl::StrContains(status.message(), "CKR_ATTRIBUTE_VALUE_INVALID");
}

}  // namespace

absl::StatusOr<std::vector<std::string>> FindSecretKeyIds(TokenState& state,
                                                          std::string_view label) {
  CK_FUNCTION_LIST* fn = state.fn;
  std::vector<std::string> ids;
  CUSTODY_RETURN_IF_ERROR(state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    ids.clear();
    CUSTODY_ASSIGN_OR_RETURN(
        std::vector<CK_OBJECT_HANDLE> found,
        FindObjects(fn, lease,
                    {Attr(CKA_CLASS, &kSecretKey, sizeof(kSecretKey)), Attr(CKA_LABEL, label)}));
    for (CK_OBJECT_HANDLE handle : found) {
      // Another process may destroy its key between the search and this read, or be writing it
      // (SoftHSM2 answers CKR_ATTRIBUTE_VALUE_INVALID then): neither is a key to use.
      CK_ATTRIBUTE size{CKA_ID, nullptr, 0};
      CK_RV rv = fn->C_GetAttributeValue(lease.get(), handle, &size, 1);
      if (rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_ATTRIBUTE_VALUE_INVALID) continue;
      CUSTODY_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue", rv));
      auto id = GetBytes(fn, lease, handle, CKA_ID);
      if (!id.ok() && IsGoneOrUnwritten(id.status())) continue;
      CUSTODY_RETURN_IF_ERROR(id.status());
      ids.push_back(*std::move(id));
    }
    return absl::OkStatus();
  }));
  std::sort(ids.begin(), ids.end());
  return ids;
}

absl::Status GenerateHmacKey(TokenState& state, std::string_view id, std::string_view label) {
  if (id.empty()) return absl::InvalidArgumentError("GenerateHmacKey: empty CKA_ID");
  CK_FUNCTION_LIST* fn = state.fn;
  const CK_KEY_TYPE key_type = CKK_GENERIC_SECRET;
  const CK_ULONG value_len = 32;
  // Retried after a recovery like the reads: a key the lost answer had created is found first.
  return state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> existing,
                             FindKeyObjects(fn, lease, CKO_SECRET_KEY, id));
    if (!existing.empty()) return absl::OkStatus();
    CK_MECHANISM mechanism{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
    std::vector<CK_ATTRIBUTE> tmpl = {
        Attr(CKA_CLASS, &kSecretKey, sizeof(kSecretKey)),
        Attr(CKA_KEY_TYPE, &key_type, sizeof(key_type)),
        Attr(CKA_VALUE_LEN, &value_len, sizeof(value_len)),
        BoolAttr(CKA_TOKEN, true),
        BoolAttr(CKA_PRIVATE, true),
        BoolAttr(CKA_SENSITIVE, true),
        BoolAttr(CKA_EXTRACTABLE, false),
        BoolAttr(CKA_SIGN, true),
        BoolAttr(CKA_VERIFY, true),
        Attr(CKA_ID, id),
        Attr(CKA_LABEL, label),
    };
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    return lease.Check("C_GenerateKey", fn->C_GenerateKey(lease.get(), &mechanism, tmpl.data(),
                                                          tmpl.size(), &handle));
  });
}

absl::StatusOr<std::string> HmacSha256(TokenState& state, std::string_view id,
                                       std::string_view message) {
  CK_FUNCTION_LIST* fn = state.fn;
  std::string mac;
  CUSTODY_RETURN_IF_ERROR(state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                             FindKeyObjects(fn, lease, CKO_SECRET_KEY, id));
    if (found.size() != 1) {
      return found.empty()
                 ? absl::NotFoundError(absl::StrCat("no secret key with CKA_ID ", PrintableId(id)))
                 : absl::FailedPreconditionError(
                       absl::StrCat(found.size(), " secret keys share CKA_ID ", PrintableId(id)));
    }
    CK_MECHANISM mechanism{CKM_SHA256_HMAC, nullptr, 0};
    CUSTODY_RETURN_IF_ERROR(
        lease.Check("C_SignInit", fn->C_SignInit(lease.get(), &mechanism, found.front())));
    mac.assign(32, '\0');
    CK_ULONG length = mac.size();
    // Cryptoki takes non-const input but does not write it.
    CK_BYTE* input = reinterpret_cast<CK_BYTE*>(const_cast<char*>(message.data()));
    CUSTODY_RETURN_IF_ERROR(
        lease.Check("C_Sign", fn->C_Sign(lease.get(), input, message.size(),
                                         reinterpret_cast<CK_BYTE*>(mac.data()), &length)));
    mac.resize(length);
    return absl::OkStatus();
  }));
  return mac;
}

}  // namespace custody::pkcs11::internal
