// A FAULT INJECTOR, USED ONLY BY TESTS. It is a PKCS#11 module (C ABI, C_GetFunctionList) that
// loads the real module named by $CUSTODY_FAULT_REAL_MODULE (default: Debian's SoftHSM2),
// forwards every call to it, and on demand makes calls fail the way a real HSM fails but a
// software token cannot be made to fail at will: CKR_DEVICE_ERROR from C_Sign, sessions closed
// behind the application's back, a device removed until the module is re-initialized, a slow
// token. An in-process test drives it through the C functions of fault_module.h; a test driving
// another process (custodyd) writes commands into the control file named by
// $CUSTODY_FAULT_CONTROL (see fault_module.h). Never install it or point a production custodyd at
// it.
#include "pkcs11/testing/fault_module.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "p11-kit/pkcs11.h"

#define CUSTODY_FAULT_EXPORT __attribute__((visibility("default")))

namespace {

struct Injection {
  CK_RV rv = CKR_OK;
  int remaining = 0;  // < 0: forever
  int skip = 0;       // calls still let through first
  bool lose_reply = false;
  bool leave_active = false;  // C_Sign/C_Decrypt: the real operation is not ended
};

// What Enter decided for one call.
struct Verdict {
  CK_RV rv = CKR_OK;          // CKR_OK: forward and answer what the real module answers
  bool lose_reply = false;    // forward anyway, then answer rv
  bool leave_active = false;  // a faulted C_Sign/C_Decrypt leaves the real operation active
};

struct Faults {
  std::mutex mu;
  std::map<std::string, Injection> injected;
  std::map<std::string, int> delays_ms;
  std::map<std::string, unsigned long> calls;
  std::map<std::string, unsigned long> total_calls;  // never reset: reported in the .ack file
  int removed_cycles = 0;  // > 0: re-initializations left; < 0: until reset
  std::set<CK_SLOT_ID> slots;
  std::set<CK_SESSION_HANDLE> open_sessions;  // opened through the module and not closed
  // Closed behind the application's back by the control file's close_all_sessions: each is
  // really closed by the first call made on it (see ReapIfClosed).
  std::set<CK_SESSION_HANDLE> closed_sessions;
};

Faults& State() {
  static auto* faults = new Faults();  // never destroyed: called until process exit
  return *faults;
}

CK_FUNCTION_LIST* real = nullptr;
CK_FUNCTION_LIST shim_list;

// Whether the function fails while the device is "removed". Library-level calls and closing
// sessions keep working, as they do on a real reader with the token pulled out.
enum class Scope { kLibrary, kToken };

void PollControlFile(const char* function);

// Counts the call, sleeps its delay, and says which fault is due.
Verdict Enter(const char* function, Scope scope) {
  PollControlFile(function);
  int delay_ms = 0;
  Verdict verdict;
  {
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    ++faults.calls[function];
    ++faults.total_calls[function];
    if (auto it = faults.delays_ms.find(function); it != faults.delays_ms.end()) {
      delay_ms = it->second;
    }
    auto it = faults.injected.find(function);
    if (it != faults.injected.end() && it->second.skip > 0) {
      --it->second.skip;
    } else if (it != faults.injected.end()) {
      verdict.rv = it->second.rv;
      verdict.lose_reply = it->second.lose_reply;
      verdict.leave_active = it->second.leave_active;
      if (it->second.remaining > 0 && --it->second.remaining == 0) faults.injected.erase(it);
    } else if (scope == Scope::kToken && faults.removed_cycles != 0) {
      verdict.rv = CKR_DEVICE_REMOVED;
    }
  }
  if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
  return verdict;
}

// A failed single-part C_Sign/C_Decrypt ends the active operation (PKCS#11 2.40 §5.2): run the
// real call into a scratch buffer so that the real session is left as a real failure leaves it.
template <typename Call>
void EndOperation(Call call, CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG in_len) {
  std::vector<CK_BYTE> scratch(16384);
  CK_ULONG length = scratch.size();
  call(session, in, in_len, scratch.data(), &length);
  explicit_bzero(scratch.data(), scratch.size());
}

// The fault `injection` for the next `count` calls of `function` (count 0: none).
void SetInjection(const char* function, int count, const Injection& injection) {
  Faults& faults = State();
  std::lock_guard<std::mutex> lock(faults.mu);
  if (count == 0) {
    faults.injected.erase(function);
  } else {
    faults.injected[function] = injection;
  }
}

// A session the control file's close_all_sessions closed: really closed now, by the thread that
// is calling on it (the application never shares a session between threads, so no call is in
// flight on it; SoftHSM2 does not survive a session closed under a call running on it). True
// when the caller must get CKR_SESSION_HANDLE_INVALID.
bool ReapIfClosed(CK_SESSION_HANDLE session) {
  {
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    if (faults.closed_sessions.erase(session) == 0) return false;
    faults.open_sessions.erase(session);
  }
  real->C_CloseSession(session);
  return true;
}

// Forwards a call on a session (the first parameter is `session`).
#define CUSTODY_FORWARD_SESSION(name, scope, params, args)              \
  CK_RV Shim_##name params {                                            \
    const Verdict verdict = Enter(#name, Scope::scope);                 \
    if (verdict.rv != CKR_OK && !verdict.lose_reply) return verdict.rv; \
    if (ReapIfClosed(session)) return CKR_SESSION_HANDLE_INVALID;       \
    const CK_RV rv = real->name args;                                   \
    return verdict.rv != CKR_OK ? verdict.rv : rv;                      \
  }

#define CUSTODY_FORWARD(name, scope, params, args)                      \
  CK_RV Shim_##name params {                                            \
    const Verdict verdict = Enter(#name, Scope::scope);                 \
    if (verdict.rv != CKR_OK && !verdict.lose_reply) return verdict.rv; \
    const CK_RV rv = real->name args;                                   \
    return verdict.rv != CKR_OK ? verdict.rv : rv;                      \
  }

CK_RV Shim_C_Initialize(CK_VOID_PTR args) {
  if (const Verdict verdict = Enter("C_Initialize", Scope::kLibrary); verdict.rv != CKR_OK) {
    return verdict.rv;
  }
  const CK_RV rv = real->C_Initialize(args);
  if (rv == CKR_OK) {
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    if (faults.removed_cycles > 0) --faults.removed_cycles;  // the token is "back"
  }
  return rv;
}

CK_RV Shim_C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application, CK_NOTIFY notify,
                         CK_SESSION_HANDLE_PTR session) {
  if (const Verdict verdict = Enter("C_OpenSession", Scope::kToken); verdict.rv != CKR_OK) {
    return verdict.rv;
  }
  const CK_RV rv = real->C_OpenSession(slot, flags, application, notify, session);
  if (rv == CKR_OK) {
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    faults.slots.insert(slot);
    faults.open_sessions.insert(*session);
    faults.closed_sessions.erase(*session);
  }
  return rv;
}

CK_RV Shim_C_CloseSession(CK_SESSION_HANDLE session) {
  if (const Verdict verdict = Enter("C_CloseSession", Scope::kLibrary); verdict.rv != CKR_OK) {
    return verdict.rv;
  }
  if (ReapIfClosed(session)) return CKR_SESSION_HANDLE_INVALID;
  {
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    faults.open_sessions.erase(session);
  }
  return real->C_CloseSession(session);
}

// Every session is void after these: forget them.
void ForgetSessions() {
  Faults& faults = State();
  std::lock_guard<std::mutex> lock(faults.mu);
  faults.open_sessions.clear();
  faults.closed_sessions.clear();
}

CK_RV Shim_C_CloseAllSessions(CK_SLOT_ID slot) {
  if (const Verdict verdict = Enter("C_CloseAllSessions", Scope::kLibrary); verdict.rv != CKR_OK) {
    return verdict.rv;
  }
  ForgetSessions();  // (one slot only, in principle; custody never calls this)
  return real->C_CloseAllSessions(slot);
}

CK_RV Shim_C_Finalize(CK_VOID_PTR reserved) {
  if (const Verdict verdict = Enter("C_Finalize", Scope::kLibrary); verdict.rv != CKR_OK) {
    return verdict.rv;
  }
  ForgetSessions();
  return real->C_Finalize(reserved);
}

CK_RV Shim_C_Sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                  CK_BYTE_PTR signature, CK_ULONG_PTR signature_len) {
  if (const Verdict verdict = Enter("C_Sign", Scope::kToken); verdict.rv != CKR_OK) {
    if (!verdict.leave_active) EndOperation(real->C_Sign, session, data, data_len);
    return verdict.rv;
  }
  if (ReapIfClosed(session)) return CKR_SESSION_HANDLE_INVALID;
  return real->C_Sign(session, data, data_len, signature, signature_len);
}

CK_RV Shim_C_Decrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                     CK_BYTE_PTR plaintext, CK_ULONG_PTR plaintext_len) {
  if (const Verdict verdict = Enter("C_Decrypt", Scope::kToken); verdict.rv != CKR_OK) {
    if (!verdict.leave_active) EndOperation(real->C_Decrypt, session, data, data_len);
    return verdict.rv;
  }
  if (ReapIfClosed(session)) return CKR_SESSION_HANDLE_INVALID;
  return real->C_Decrypt(session, data, data_len, plaintext, plaintext_len);
}

CUSTODY_FORWARD(C_GetInfo, kLibrary, (CK_INFO_PTR info), (info))
CUSTODY_FORWARD(C_GetSlotList, kLibrary,
                (CK_BBOOL present, CK_SLOT_ID_PTR slots, CK_ULONG_PTR count),
                (present, slots, count))
CUSTODY_FORWARD(C_GetSlotInfo, kLibrary, (CK_SLOT_ID slot, CK_SLOT_INFO_PTR info), (slot, info))
CUSTODY_FORWARD(C_GetTokenInfo, kToken, (CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info), (slot, info))
CUSTODY_FORWARD(C_GetMechanismList, kToken,
                (CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count),
                (slot, list, count))
CUSTODY_FORWARD(C_InitToken, kToken,
                (CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len, CK_UTF8CHAR_PTR label),
                (slot, pin, pin_len, label))
CUSTODY_FORWARD_SESSION(C_InitPIN, kToken,
                        (CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len),
                        (session, pin, pin_len))
CUSTODY_FORWARD_SESSION(C_GetSessionInfo, kToken,
                        (CK_SESSION_HANDLE session, CK_SESSION_INFO_PTR info), (session, info))
CUSTODY_FORWARD_SESSION(C_Login, kToken,
                        (CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin,
                         CK_ULONG pin_len),
                        (session, user, pin, pin_len))
CUSTODY_FORWARD_SESSION(C_Logout, kToken, (CK_SESSION_HANDLE session), (session))
CUSTODY_FORWARD_SESSION(C_CreateObject, kToken,
                        (CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR attributes, CK_ULONG count,
                         CK_OBJECT_HANDLE_PTR object),
                        (session, attributes, count, object))
CUSTODY_FORWARD_SESSION(C_DestroyObject, kToken,
                        (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object), (session, object))
CUSTODY_FORWARD_SESSION(C_GetAttributeValue, kToken,
                        (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                         CK_ATTRIBUTE_PTR attributes, CK_ULONG count),
                        (session, object, attributes, count))
CUSTODY_FORWARD_SESSION(C_FindObjectsInit, kToken,
                        (CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR attributes, CK_ULONG count),
                        (session, attributes, count))
CUSTODY_FORWARD_SESSION(C_FindObjects, kToken,
                        (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE_PTR objects, CK_ULONG max,
                         CK_ULONG_PTR count),
                        (session, objects, max, count))
CUSTODY_FORWARD_SESSION(C_FindObjectsFinal, kToken, (CK_SESSION_HANDLE session), (session))
CUSTODY_FORWARD_SESSION(C_DecryptInit, kToken,
                        (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                         CK_OBJECT_HANDLE key),
                        (session, mechanism, key))
CUSTODY_FORWARD_SESSION(C_SignInit, kToken,
                        (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                         CK_OBJECT_HANDLE key),
                        (session, mechanism, key))
CUSTODY_FORWARD_SESSION(C_GenerateKeyPair, kToken,
                        (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                         CK_ATTRIBUTE_PTR public_template, CK_ULONG public_count,
                         CK_ATTRIBUTE_PTR private_template, CK_ULONG private_count,
                         CK_OBJECT_HANDLE_PTR public_key, CK_OBJECT_HANDLE_PTR private_key),
                        (session, mechanism, public_template, public_count, private_template,
                         private_count, public_key, private_key))
CUSTODY_FORWARD_SESSION(C_DeriveKey, kToken,
                        (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                         CK_OBJECT_HANDLE base, CK_ATTRIBUTE_PTR attributes, CK_ULONG count,
                         CK_OBJECT_HANDLE_PTR key),
                        (session, mechanism, base, attributes, count, key))

#undef CUSTODY_FORWARD
#undef CUSTODY_FORWARD_SESSION

// The real module's list with the functions custody calls replaced by the wrappers above.
CK_RV BuildList() {
  const char* path = getenv("CUSTODY_FAULT_REAL_MODULE");
  if (path == nullptr || *path == '\0') path = "/usr/lib/softhsm/libsofthsm2.so";
  // Kept mapped for the life of the process, like custody's own Module does.
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) return CKR_GENERAL_ERROR;
  auto get_function_list =
      reinterpret_cast<CK_C_GetFunctionList>(dlsym(library, "C_GetFunctionList"));
  if (get_function_list == nullptr) return CKR_GENERAL_ERROR;
  if (CK_RV rv = get_function_list(&real); rv != CKR_OK) return rv;
  shim_list = *real;  // everything not wrapped is forwarded as is
  shim_list.C_GetFunctionList = &C_GetFunctionList;
#define CUSTODY_WRAP(name) shim_list.name = &Shim_##name
  CUSTODY_WRAP(C_Initialize);
  CUSTODY_WRAP(C_Finalize);
  CUSTODY_WRAP(C_GetInfo);
  CUSTODY_WRAP(C_GetSlotList);
  CUSTODY_WRAP(C_GetSlotInfo);
  CUSTODY_WRAP(C_GetTokenInfo);
  CUSTODY_WRAP(C_GetMechanismList);
  CUSTODY_WRAP(C_InitToken);
  CUSTODY_WRAP(C_InitPIN);
  CUSTODY_WRAP(C_OpenSession);
  CUSTODY_WRAP(C_CloseSession);
  CUSTODY_WRAP(C_CloseAllSessions);
  CUSTODY_WRAP(C_GetSessionInfo);
  CUSTODY_WRAP(C_Login);
  CUSTODY_WRAP(C_Logout);
  CUSTODY_WRAP(C_CreateObject);
  CUSTODY_WRAP(C_DestroyObject);
  CUSTODY_WRAP(C_GetAttributeValue);
  CUSTODY_WRAP(C_FindObjectsInit);
  CUSTODY_WRAP(C_FindObjects);
  CUSTODY_WRAP(C_FindObjectsFinal);
  CUSTODY_WRAP(C_DecryptInit);
  CUSTODY_WRAP(C_Decrypt);
  CUSTODY_WRAP(C_SignInit);
  CUSTODY_WRAP(C_Sign);
  CUSTODY_WRAP(C_GenerateKeyPair);
  CUSTODY_WRAP(C_DeriveKey);
#undef CUSTODY_WRAP
  return CKR_OK;
}

}  // namespace

extern "C" {

CUSTODY_FAULT_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  static const CK_RV built = BuildList();
  if (list == nullptr) return CKR_ARGUMENTS_BAD;
  if (built != CKR_OK) return built;
  *list = &shim_list;
  return CKR_OK;
}

CUSTODY_FAULT_EXPORT void custody_fault_inject(const char* function, unsigned long ckr, int count) {
  SetInjection(function, count, Injection{ckr, count, 0, false, false});
}

CUSTODY_FAULT_EXPORT void custody_fault_inject_leaving_operation_active(const char* function,
                                                                        unsigned long ckr,
                                                                        int count) {
  SetInjection(function, count, Injection{ckr, count, 0, false, true});
}

CUSTODY_FAULT_EXPORT void custody_fault_inject_ex(const char* function, unsigned long ckr,
                                                  int count, int skip, int lose_reply) {
  SetInjection(function, count, Injection{ckr, count, skip, lose_reply != 0, false});
}

CUSTODY_FAULT_EXPORT void custody_fault_close_all_sessions(void) {
  std::set<CK_SLOT_ID> slots;
  {
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    slots = faults.slots;
  }
  if (real == nullptr) return;
  ForgetSessions();
  for (CK_SLOT_ID slot : slots) real->C_CloseAllSessions(slot);
}

CUSTODY_FAULT_EXPORT void custody_fault_device_removed(int cycles) {
  Faults& faults = State();
  std::lock_guard<std::mutex> lock(faults.mu);
  faults.removed_cycles = cycles;
}

CUSTODY_FAULT_EXPORT void custody_fault_delay_ms(const char* function, int ms) {
  Faults& faults = State();
  std::lock_guard<std::mutex> lock(faults.mu);
  if (ms <= 0) {
    faults.delays_ms.erase(function);
  } else {
    faults.delays_ms[function] = ms;
  }
}

CUSTODY_FAULT_EXPORT unsigned long custody_fault_calls(const char* function) {
  Faults& faults = State();
  std::lock_guard<std::mutex> lock(faults.mu);
  auto it = faults.calls.find(function);
  return it == faults.calls.end() ? 0 : it->second;
}

CUSTODY_FAULT_EXPORT void custody_fault_reset(void) {
  Faults& faults = State();
  std::lock_guard<std::mutex> lock(faults.mu);
  faults.injected.clear();
  faults.delays_ms.clear();
  faults.calls.clear();
  faults.removed_cycles = 0;
}

}  // extern "C"

// ---- The control file ($CUSTODY_FAULT_CONTROL) ------------------------------------------------

namespace {

struct ControlFile {
  std::atomic<int64_t> next_poll_ns{0};
  std::mutex mu;             // one reader at a time; never held across a real module call
  std::string last_applied;  // the content applied last
};

ControlFile& Control() {
  static auto* control = new ControlFile();  // never destroyed: polled until process exit
  return *control;
}

const char* ControlPath() {
  static const char* const path = [] {
    const char* value = getenv("CUSTODY_FAULT_CONTROL");
    return value != nullptr && *value != '\0' ? strdup(value) : nullptr;
  }();
  return path;
}

bool ParseCkr(const std::string& text, unsigned long* ckr) {
  static const std::map<std::string, CK_RV> kNames = {
      {"CKR_GENERAL_ERROR", CKR_GENERAL_ERROR},
      {"CKR_ENCRYPTED_DATA_INVALID", CKR_ENCRYPTED_DATA_INVALID},
      {"CKR_DEVICE_ERROR", CKR_DEVICE_ERROR},
      {"CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY},
      {"CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED},
      {"CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID},
      {"CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID},
      {"CKR_PIN_LOCKED", CKR_PIN_LOCKED},
      {"CKR_SESSION_CLOSED", CKR_SESSION_CLOSED},
      {"CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID},
      {"CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT},
      {"CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN},
      {"CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED},
  };
  if (auto it = kNames.find(text); it != kNames.end()) {
    *ckr = it->second;
    return true;
  }
  char* end = nullptr;
  *ckr = strtoul(text.c_str(), &end, 0);
  return !text.empty() && end != nullptr && *end == '\0';
}

bool ParseInt(const std::string& text, int* value) {
  char* end = nullptr;
  const long parsed = strtol(text.c_str(), &end, 10);
  *value = static_cast<int>(parsed);
  return !text.empty() && end != nullptr && *end == '\0';
}

// Applies one command line; false when it is not understood.
bool ApplyCommand(const std::vector<std::string>& words) {
  const std::string& command = words[0];
  unsigned long ckr = 0;
  int a = 0, b = 0, c = 0;
  if (command == "seq" && words.size() == 2) return true;  // names the write; nothing to do
  if (command == "reset" && words.size() == 1) {
    custody_fault_reset();
  } else if (command == "inject" && words.size() == 4 && ParseCkr(words[2], &ckr) &&
             ParseInt(words[3], &a)) {
    custody_fault_inject(words[1].c_str(), ckr, a);
  } else if (command == "inject_ex" && words.size() == 6 && ParseCkr(words[2], &ckr) &&
             ParseInt(words[3], &a) && ParseInt(words[4], &b) && ParseInt(words[5], &c)) {
    custody_fault_inject_ex(words[1].c_str(), ckr, a, b, c);
  } else if (command == "leave_active" && words.size() == 4 && ParseCkr(words[2], &ckr) &&
             ParseInt(words[3], &a)) {
    custody_fault_inject_leaving_operation_active(words[1].c_str(), ckr, a);
  } else if (command == "close_all_sessions" && words.size() == 1) {
    // Lazily (ReapIfClosed): custodyd is calling on its sessions right now.
    Faults& faults = State();
    std::lock_guard<std::mutex> lock(faults.mu);
    faults.closed_sessions = faults.open_sessions;
  } else if (command == "device_removed" && words.size() == 2 && ParseInt(words[1], &a)) {
    custody_fault_device_removed(a);
  } else if (command == "delay" && words.size() == 3 && ParseInt(words[2], &a)) {
    custody_fault_delay_ms(words[1].c_str(), a);
  } else {
    return false;
  }
  return true;
}

// Replaces `path` atomically with `content`.
void WriteAtomically(const std::string& path, const std::string& content) {
  const std::string temporary = path + ".tmp";
  FILE* file = fopen(temporary.c_str(), "w");
  if (file == nullptr) return;
  const bool written = fwrite(content.data(), 1, content.size(), file) == content.size();
  if (fclose(file) == 0 && written) rename(temporary.c_str(), path.c_str());
}

// Reads the control file at most every 10 ms (from whichever call comes first) and applies its
// commands when its content changed since the last application; then reports in PATH.ack.
// Skipped inside C_Initialize/C_Finalize: close_all_sessions must not race a finalization, and
// every other call runs while the application keeps the module initialized.
void PollControlFile(const char* function) {
  const char* path = ControlPath();
  if (path == nullptr || strcmp(function, "C_Initialize") == 0 ||
      strcmp(function, "C_Finalize") == 0) {
    return;
  }
  ControlFile& control = Control();
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  int64_t due = control.next_poll_ns.load(std::memory_order_relaxed);
  if (now < due || !control.next_poll_ns.compare_exchange_strong(due, now + 10'000'000,
                                                                 std::memory_order_relaxed)) {
    return;
  }
  std::unique_lock<std::mutex> lock(control.mu, std::try_to_lock);
  if (!lock.owns_lock()) return;
  std::ifstream in(path, std::ios::binary);
  if (!in) return;
  std::ostringstream read;
  read << in.rdbuf();
  const std::string content = read.str();
  if (content == control.last_applied) return;
  control.last_applied = content;

  std::string seq = "-";
  std::string errors;
  std::istringstream lines(content);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream split(line);
    std::vector<std::string> words;
    for (std::string word; split >> word;) words.push_back(word);
    if (words.empty() || words[0][0] == '#') continue;
    if (words[0] == "seq" && words.size() == 2) seq = words[1];
    if (!ApplyCommand(words)) errors += "error " + line + "\n";
  }
  std::string report = "seq " + seq + "\n" + errors;
  {
    Faults& faults = State();
    std::lock_guard<std::mutex> faults_lock(faults.mu);
    for (const auto& [name, count] : faults.calls) {
      report += "calls " + name + " " + std::to_string(count) + "\n";
    }
    for (const auto& [name, count] : faults.total_calls) {
      report += "total " + name + " " + std::to_string(count) + "\n";
    }
  }
  WriteAtomically(std::string(path) + ".ack", report);
}

}  // namespace
