// Internal to pkcs11/: a loaded Cryptoki module and the mapping of CK_RV codes to absl::Status.
// Nothing outside pkcs11/ includes this header (it exposes Cryptoki types).
#ifndef CUSTODY_PKCS11_CRYPTOKI_H_
#define CUSTODY_PKCS11_CRYPTOKI_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "p11-kit/pkcs11.h"

// Status propagation inside pkcs11/ (Abseil 20220623 has no public macros for it).
#define P11_RETURN_IF_ERROR(expr)      \
  do {                                 \
    absl::Status status_ = (expr);     \
    if (!status_.ok()) return status_; \
  } while (0)

#define P11_CONCAT_INNER(a, b) a##b
#define P11_CONCAT(a, b) P11_CONCAT_INNER(a, b)
#define P11_ASSIGN_OR_RETURN(lhs, expr) \
  P11_ASSIGN_OR_RETURN_IMPL(P11_CONCAT(statusor_, __LINE__), lhs, expr)
#define P11_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(*tmp)

namespace custody::pkcs11 {

// A process-wide reference to a loaded and C_Initialize'd module. Modules are tracked per path
// with a reference count: the first Load initializes the module, the last destroyed Module
// finalizes it, so several Tokens (and InitializeToken) can share one module in one process.
// If someone else in the process already initialized the module (CKR_CRYPTOKI_ALREADY_INITIALIZED
// on our first C_Initialize), we use it but never finalize it.
//
// Thread-safety: Load and destruction are thread-safe. fn() is immutable.
class Module {
 public:
  // dlopen(RTLD_NOW | RTLD_LOCAL) + C_GetFunctionList + C_Initialize(CKF_OS_LOCKING_OK).
  // FAILED_PRECONDITION when the library cannot be loaded or has no C_GetFunctionList.
  static absl::StatusOr<std::unique_ptr<Module>> Load(const std::string& path);

  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  CK_FUNCTION_LIST* fn() const { return fn_; }
  const std::string& path() const { return path_; }

 private:
  Module(std::string path, CK_FUNCTION_LIST* fn) : path_(std::move(path)), fn_(fn) {}
  std::string path_;
  CK_FUNCTION_LIST* fn_;
};

// absl::Status for a failed Cryptoki call: message "<function>: <CKR name>", code per token.h.
// Must not be called with CKR_OK.
absl::Status CkError(std::string_view function, CK_RV rv);

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
