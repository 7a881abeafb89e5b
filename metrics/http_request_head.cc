// The strict check of an HTTP/1.1 request head that libmicrohttpd 0.9.75 parses leniently
// (http_request_head.h).
#include "metrics/http_request_head.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <utility>

#include "absl/strings/string_view.h"

namespace custody::metrics {
namespace {

// What CheckRequestTarget makes a request's state say: its request target was clean or not.
char target_clean, target_malformed;

// libmicrohttpd 0.9.75 parses leniently where RFC 9112 lets a server refuse: a bare LF ends a
// line ("TODO: Add MHD option to disallow", connection.c get_next_header_line), a NUL in the
// request target, the method or a field value silently ends that string, several spaces may
// separate the request line's parts and a space may sit in the target. It has no option to
// refuse them (MHD_OPTION_STRICT_FOR_CLIENT checks only a space in the target, the Host header
// and, at -1, whitespace before a colon). So the head is checked here, from the bytes 0.9.75
// leaves in its read buffer, which the strings it hands over point into: it parses in place,
// overwriting each line's CR and LF with NULs, the space after the method and the one before
// the version with a NUL, and each field's colon with a NUL. In a well-formed head every line
// therefore ends in two NULs where its CRLF was; a bare LF leaves one. Another libmicrohttpd
// release may lay the buffer out otherwise: the check is made only on the release it was
// written for (docs/design.md).
bool StrictParsingApplies() {
  static const bool applies = std::strcmp(MHD_get_version(), "0.9.75") == 0;
  return applies;
}

bool IsTokenChar(unsigned char c) {
  return std::isalnum(c) || std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}
bool IsToken(absl::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return IsTokenChar(c); });
}

// The request head as 0.9.75 left it in place, [method, method + header_size): the request line,
// then each field line where its name points, then the empty line, every line ending in two
// NULs (see StrictParsingApplies).
class HeadCheck {
 public:
  HeadCheck(const char* head, size_t size) : head_(head), size_(size) {}
  bool RequestLine(const char* method, const char* target, const char* version) {
    const size_t method_length = std::strlen(method);
    if (!IsToken(absl::string_view(method, method_length)) || target != head_ + method_length + 1) {
      return false;
    }
    // libmicrohttpd accepted the version: "HTTP/1." and a digit.
    if (std::strlen(version) != 8 || version < target || version + 8 > head_ + size_) return false;
    return LineEndsAt(static_cast<size_t>(version + 8 - head_));
  }
  // One field line, in the order received.
  bool Field(const char* name, size_t name_size, const char* value, size_t value_size) {
    if (name != head_ + at_ || !IsToken(absl::string_view(name, name_size))) return false;
    const size_t colon = at_ + name_size;
    if (colon >= size_ || head_[colon] != '\0') return false;
    if (value < head_ + colon + 1 || value + value_size > head_ + size_) return false;
    for (const char* c = head_ + colon + 1; c < value; ++c) {
      if (*c != ' ' && *c != '\t') return false;
    }
    for (size_t i = 0; i < value_size; ++i) {
      const unsigned char c = static_cast<unsigned char>(value[i]);
      if ((c < 0x20 && c != '\t') || c == 0x7f) return false;  // a bare CR among them
    }
    return LineEndsAt(static_cast<size_t>(value + value_size - head_));
  }
  // The empty line that ends the head, and nothing after it.
  bool End() const { return at_ + 2 == size_ && head_[at_] == '\0' && head_[at_ + 1] == '\0'; }

 private:
  // The line's content ends at `end`: a CRLF (now two NULs) follows, and the next line begins.
  bool LineEndsAt(size_t end) {
    if (end + 2 > size_ || head_[end] != '\0' || head_[end + 1] != '\0') return false;
    at_ = end + 2;
    return true;
  }
  const char* head_;
  size_t size_;
  size_t at_ = 0;
};

MHD_Result CheckField(void* cls, MHD_ValueKind, const char* name, size_t name_size,
                      const char* value, size_t value_size) {
  auto* check = static_cast<std::pair<HeadCheck, bool>*>(cls);
  check->second = check->second && check->first.Field(name, name_size, value, value_size);
  return check->second ? MHD_YES : MHD_NO;
}

}  // namespace

void* CheckRequestTarget(void*, const char* target, MHD_Connection*) {
  if (target == nullptr) return &target_malformed;
  const size_t n = std::strlen(target);
  const bool visible =
      n > 0 && std::all_of(target, target + n, [](char c) { return c > 0x20 && c < 0x7f; });
  return visible && std::memcmp(target + n + 1, "HTTP/1.", 7) == 0 && target[n + 9] == '\0'
             ? &target_clean
             : &target_malformed;
}

bool HeadIsWellFormed(MHD_Connection* connection, const char* url, const char* method,
                      const char* version, void* target_check) {
  if (!StrictParsingApplies()) return true;
  if (target_check != &target_clean) return false;
  const MHD_ConnectionInfo* info =
      MHD_get_connection_info(connection, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
  if (info == nullptr) return false;
  std::pair<HeadCheck, bool> check{HeadCheck(method, info->header_size), true};
  if (!check.first.RequestLine(method, url, version)) return false;
  MHD_get_connection_values_n(connection, MHD_HEADER_KIND, &CheckField, &check);
  return check.second && check.first.End();
}

}  // namespace custody::metrics
