// Turns what libraries write to stderr (fd 2) into lines of the JSON log. A PKCS#11 module
// writes its diagnostics there as plain text ("ERROR: ... attr mismatch" from tpm2-pkcs11,
// opencryptoki's and NSS's messages); left alone they break the one-JSON-object-per-line log.
//
// CaptureStderr keeps a duplicate of the original stderr for Log (common/log.h), points fd 2 at
// a pipe, and logs every line read from it as {"event":"module.stderr","module":SOURCE,
// "line":...} at warning level, from a thread of its own. Whatever else in the process writes
// raw text to fd 2 (gRPC's own log lines) is captured the same way, under the same source.
// std::terminate restores the original fd 2 first, so that a dying process's last words are
// not lost in the pipe. Not done in sanitizer builds (their reports go to fd 2 as the process
// dies, before a reader thread could pass them on): there fd 2 stays as it is.
#ifndef CUSTODY_COMMON_STDERR_CAPTURE_H_
#define CUSTODY_COMMON_STDERR_CAPTURE_H_

#include <string>

#include "absl/status/status.h"

namespace custody {

// Once per process, before the module is loaded. FAILED_PRECONDITION when called twice;
// INTERNAL when a pipe or descriptor cannot be made (fd 2 is then left as it was).
absl::Status CaptureStderr(std::string source);

}  // namespace custody

#endif  // CUSTODY_COMMON_STDERR_CAPTURE_H_
