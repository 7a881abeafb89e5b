// Choosing and opening a token: the slots a module lists, the one token a TokenSelector (label
// or RFC 7512 URI, parsed in token_selector.cc) matches, its mechanism list, the session pool and
// the first login (Token::Open), and token initialization with PINs kept out of argv.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

constexpr size_t kLabelSize = 32;  // CK_TOKEN_INFO.label, blank-padded

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

}  // namespace

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

absl::StatusOr<std::unique_ptr<TokenState>> OpenToken(Token::Options options) {
  auto state = std::make_unique<TokenState>();
  CUSTODY_ASSIGN_OR_RETURN(state->module, Module::Load(options.module_path, options.init_args));
  CK_FUNCTION_LIST* fn = state->module->fn();
  state->fn = fn;
  // Another Token on the same module may re-initialize it meanwhile.
  absl::ReaderMutexLock gate(&state->module->gate());

  CK_INFO library{};
  CK_RV rv = fn->C_GetInfo(&library);
  if (rv != CKR_OK) return CkError("C_GetInfo", rv);

  CUSTODY_ASSIGN_OR_RETURN(std::vector<SlotToken> tokens, ListTokens(fn));
  std::vector<const SlotToken*> matches;
  std::vector<std::string> seen;
  std::vector<std::string> uninitialized;
  for (const SlotToken& token : tokens) {
    if (!token.initialized) {
      uninitialized.push_back(absl::StrCat("slot ", token.slot, " ('", token.label, "')"));
      continue;
    }
    seen.push_back(absl::StrCat("'", token.label, "' (slot ", token.slot, ")"));
    if (Matches(options.selector, token)) matches.push_back(&token);
  }
  if (matches.size() != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        matches.empty() ? "no" : absl::StrCat(matches.size()), " initialized token(s) in '",
        options.module_path, "' match ", DescribeSelector(options.selector),
        "; tokens seen: ", seen.empty() ? "none" : absl::StrJoin(seen, ", "),
        uninitialized.empty()
            ? ""
            : absl::StrCat("; not initialized yet: ", absl::StrJoin(uninitialized, ", "),
                           " (initialize the token with its module's tool, e.g. pkcsconf -I, "
                           "tpm2_ptool addtoken, or pkcs11-tool --init-token, then set the "
                           "user PIN)")));
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
  // One element of slack: p11-kit's RPC client (Debian 12, 0.24.1) purges the mechanisms it cannot
  // marshal from the list in place with a memmove one element too long, reading just past the
  // count it was given (found by ASan with p11-kit-client.so). The slack is never reported.
  std::vector<CK_MECHANISM_TYPE> mechanisms(count + 1);
  rv = fn->C_GetMechanismList(token.slot, mechanisms.data(), &count);
  if (rv != CKR_OK) return CkError("C_GetMechanismList", rv);
  mechanisms.resize(count);
  for (CK_MECHANISM_TYPE mechanism : mechanisms) {
    state->mechanisms.insert(CkmName(mechanism));
    if (mechanism != CKM_RSA_PKCS_KEY_PAIR_GEN && mechanism != CKM_EC_KEY_PAIR_GEN) continue;
    // The sizes it will generate, so that a ring it cannot hold is refused at creation. A token
    // that does not answer, or answers an empty range, is taken at its mechanism list's word.
    CK_MECHANISM_INFO mechanism_info{};
    if (fn->C_GetMechanismInfo(token.slot, mechanism, &mechanism_info) == CKR_OK &&
        mechanism_info.ulMaxKeySize > 0 &&
        mechanism_info.ulMinKeySize <= mechanism_info.ulMaxKeySize) {
      state->key_sizes[CkmName(mechanism)] = {mechanism_info.ulMinKeySize,
                                              mechanism_info.ulMaxKeySize};
    }
  }

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
    CUSTODY_ASSIGN_OR_RETURN(SessionPool::Lease lease, state->pool->Acquire());
  }
  return state;
}

absl::Status InitializeToken(const std::string& module_path, std::string_view label,
                             const Secret& so_pin, const Secret& user_pin,
                             const std::string& init_args) {
  if (label.empty() || label.size() > kLabelSize) {
    return absl::InvalidArgumentError("token label must be 1 to 32 bytes");
  }
  CUSTODY_ASSIGN_OR_RETURN(std::unique_ptr<Module> module, Module::Load(module_path, init_args));
  CK_FUNCTION_LIST* fn = module->fn();

  CUSTODY_ASSIGN_OR_RETURN(std::vector<SlotToken> tokens, ListTokens(fn));
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
  CUSTODY_ASSIGN_OR_RETURN(tokens, ListTokens(fn));
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

}  // namespace custody::pkcs11::internal
