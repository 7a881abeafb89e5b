// Internal to pkcs11/: a loaded Cryptoki module and the mapping of CK_RV codes to absl::Status.
// Nothing outside pkcs11/ includes this header (it exposes Cryptoki types).
#ifndef CUSTODY_PKCS11_CRYPTOKI_H_
#define CUSTODY_PKCS11_CRYPTOKI_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "p11-kit/pkcs11.h"

namespace custody::pkcs11 {

// A process-wide reference to a loaded and C_Initialize'd module. Modules are tracked per path
// with a reference count: the first Load initializes the module, the last destroyed Module
// finalizes it, so several Tokens (and InitializeToken) can share one module in one process.
// If someone else in the process already initialized the module (CKR_CRYPTOKI_ALREADY_INITIALIZED
// on our first C_Initialize), we use it but never finalize it (nor re-initialize it).
//
// Re-initialization (C_Finalize + C_Initialize on the same function list, after the device was
// removed) invalidates every session and object handle the module ever issued, for every user
// of the module in the process; generation() counts these cycles so that handles can be tagged
// with the generation that issued them. The gate() keeps C_Finalize away from calls in flight:
// every call sequence into the module holds it shared, Reinitialize holds it exclusively. It is
// the one lock held across Cryptoki calls, and only ever contended by a re-initialization.
//
// Thread-safety: Load, Reinitialize and destruction are thread-safe. fn() is immutable.
class Module {
 public:
  // dlopen(RTLD_NOW | RTLD_LOCAL) + C_GetFunctionList + C_Initialize(CKF_OS_LOCKING_OK), with
  // `init_args` (when not empty) as CK_C_INITIALIZE_ARGS.pReserved, NUL-terminated: the
  // module-specific initialization string some modules need (NSS softokn:
  // "configdir='sql:DIR' certPrefix='' keyPrefix='' secmod='secmod.db' flags="). The first
  // Load of a path decides its arguments; a re-initialization uses them again.
  // FAILED_PRECONDITION when the library cannot be loaded or has no C_GetFunctionList; a failed
  // C_Initialize names the CKR with a hint at the usual cause (missing init arguments, a
  // module daemon or device that is not running).
  static absl::StatusOr<std::unique_ptr<Module>> Load(const std::string& path,
                                                      const std::string& init_args = "");

  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  CK_FUNCTION_LIST* fn() const;
  const std::string& path() const { return path_; }

  // Held shared (ReaderMutexLock) around every call sequence into the module. Never acquire it
  // twice in one thread: a waiting Reinitialize blocks new readers.
  absl::Mutex& gate() const;
  // Starts at 1; +1 per re-initialization.
  uint64_t generation() const;

  // C_Finalize + C_Initialize, unless the module is already past generation `seen` (another
  // thread or Token re-initialized it first): true when this call re-initialized it.
  // FAILED_PRECONDITION when the module is not ours to finalize; the C_Initialize error
  // otherwise (the module is then left finalized, and the next Reinitialize tries again).
  // The caller must not hold gate().
  absl::StatusOr<bool> Reinitialize(uint64_t seen);

  struct Shared;  // per-path state, shared by every Module of that path

 private:
  Module(std::string path, std::shared_ptr<Shared> shared)
      : path_(std::move(path)), shared_(std::move(shared)) {}
  std::string path_;
  std::shared_ptr<Shared> shared_;
};

// absl::Status for a failed Cryptoki call: message "<function>: <CKR name>", code per token.h,
// and the CK_RV itself as a payload (see CkrOf). Must not be called with CKR_OK.
absl::Status CkError(std::string_view function, CK_RV rv);

// The CK_RV a CkError status carries (it survives copies and re-coding through WithCode);
// nullopt for statuses that did not come from a Cryptoki return code.
std::optional<CK_RV> CkrOf(const absl::Status& status);

// The Cryptoki function a CkError status names ("C_Sign"); empty for other statuses.
std::string CkFunctionOf(const absl::Status& status);

// `status` with its message and payloads but code `code`.
absl::Status WithCode(const absl::Status& status, absl::StatusCode code);

// `status` with its code and payloads but message `message`.
absl::Status WithMessage(const absl::Status& status, std::string_view message);

// What a failed call says about the state behind it, and so how to recover before the one
// retry: see TokenState::Run (token_recovery.cc).
enum class Damage {
  kNone,     // the request or the object was wrong; nothing to recover
  kHandles,  // CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID: cached object handles are stale
  kSession,  // CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED, CKR_USER_NOT_LOGGED_IN,
             // CKR_DEVICE_ERROR: open a new session and log in again
  kModule,   // CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED:
             // re-initialize the module, then a new session
};
Damage DamageOf(CK_RV rv);

// Whether the session handle itself is gone (closed behind our back, device removed, module
// finalized): it must be forgotten rather than closed, because the module may already have
// issued the same handle value to a new session.
bool IsSessionGone(CK_RV rv);

// Whether `rv` means the session itself is unusable (closed, logged out, device gone), so the
// pool must close it rather than hand it out again.
bool IsSessionBroken(CK_RV rv);

// "CKM_RSA_PKCS_PSS" for the mechanisms custody cares about, "CKM_0x..." for the others.
std::string CkmName(CK_MECHANISM_TYPE mechanism);

// Debian's Abseil has its own absl::string_view (ABSL_OPTION_USE_STD_STRING_VIEW 0), which
// std::string_view does not convert to implicitly.
inline absl::string_view AsAbsl(std::string_view s) { return {s.data(), s.size()}; }

// Moves the first `length` bytes of `buffer` to its end and zero-fills the front, in time that
// depends on buffer.size() only and not on `length`: C_Decrypt with CKM_RSA_X_509 may return the
// k-byte encoded message with its leading zeros stripped, and how many were stripped says
// something about the plaintext. Requires length <= buffer.size().
void AlignRight(std::string& buffer, size_t length);

// Blank- (or NUL-) padded fixed-width Cryptoki string → std::string without the padding.
std::string TrimPadded(const unsigned char* data, size_t size);

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_CRYPTOKI_H_
