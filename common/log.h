// Structured operational log: one JSON object per line on stderr.
//
// Callers pass an event name and key/value fields. Never pass PINs, payloads, plaintexts or
// key material: the log is meant to be shipped to ordinary log storage. Thread-safe.
#ifndef CUSTODY_COMMON_LOG_H_
#define CUSTODY_COMMON_LOG_H_

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace custody {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

using LogField = std::pair<absl::string_view, std::string>;

// One JSON line: time, level, event, then `fields` in order (Log(kInfo, "x", {{"k", v}}) works).
void Log(LogLevel level, absl::string_view event, absl::Span<const LogField> fields = {});

// Messages below `level` are dropped. Default kInfo.
void SetLogLevel(LogLevel level);

// Where Log writes its lines: file descriptor 2 (stderr) by default; CaptureStderr
// (common/stderr_capture.h) moves it to a duplicate of the original stderr.
void SetLogFd(int fd);

// Appends `s` to `out` as a JSON string literal (with quotes), escaping per RFC 8259.
void AppendJsonString(std::string& out, absl::string_view s);

}  // namespace custody

#endif  // CUSTODY_COMMON_LOG_H_
