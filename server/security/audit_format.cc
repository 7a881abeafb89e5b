#include "server/security/audit_format.h"

#include <algorithm>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "common/sha256.h"
#include "jose/json.h"

namespace custody::server::audit_format {

using ::custody::AppendJsonString;
using ::custody::Sha256Hex;
namespace {

// Length of the valid UTF-8 sequence starting at s[i] (RFC 3629: no overlongs, surrogates or
// code points above U+10FFFF), 0 when invalid.
size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  auto cont = [&](size_t k) { return k < s.size() && (byte(k) & 0xC0) == 0x80; };
  unsigned char c = byte(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (i + 1 >= s.size()) return 0;
    unsigned char c1 = byte(i + 1);
    if (c == 0xE0 && c1 < 0xA0) return 0;
    if (c == 0xED && c1 > 0x9F) return 0;
    return cont(i + 1) && cont(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (i + 1 >= s.size()) return 0;
    unsigned char c1 = byte(i + 1);
    if (c == 0xF0 && c1 < 0x90) return 0;
    if (c == 0xF4 && c1 > 0x8F) return 0;
    return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  }
  return 0;
}

}  // namespace

bool IsLowerHex(absl::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// Appends ,"name":"value" with value made valid UTF-8 (the verifier's strict JSON parser refuses
// anything else; identities come from peer certificates) and cut at max_bytes.
void AppendField(std::string& out, absl::string_view name, absl::string_view value,
                 size_t max_bytes) {
  out += ",\"";
  out.append(name.data(), name.size());
  out += "\":";
  // Fast path: short ASCII needs neither truncation nor UTF-8 repair.
  bool ascii = value.size() <= max_bytes;
  for (size_t i = 0; ascii && i < value.size(); ++i)
    ascii = static_cast<unsigned char>(value[i]) < 0x80;
  if (ascii) {
    AppendJsonString(out, value);
    return;
  }
  std::string clean;
  for (size_t i = 0; i < value.size();) {
    size_t len = Utf8SequenceLength(value, i);
    absl::string_view piece = len > 0 ? value.substr(i, len) : "\xEF\xBF\xBD";  // U+FFFD
    if (clean.size() + piece.size() > max_bytes) {
      clean += "[truncated]";
      break;
    }
    clean.append(piece.data(), piece.size());
    i += len > 0 ? len : 1;
  }
  AppendJsonString(out, clean);
}

std::string FormatEventFields(const AuditEvent& event) {
  std::string out;
  AppendField(out, "identity", event.identity, kMaxFieldBytes);
  AppendField(out, "operation", event.operation, kMaxFieldBytes);
  AppendField(out, "ring", event.ring, kMaxFieldBytes);
  absl::StrAppend(&out, ",\"version\":", event.version);
  AppendField(out, "kid", event.kid, kMaxFieldBytes);
  AppendField(out, "payload_sha256", event.payload_sha256, kMaxFieldBytes);
  AppendField(out, "result", event.result, kMaxFieldBytes);
  AppendField(out, "detail", event.detail, kMaxDetailBytes);
  return out;
}

std::string FormatLine(uint64_t seq, absl::Time time, absl::string_view fields,
                       absl::string_view prev) {
  std::string line = absl::StrCat("{\"seq\":", seq, ",\"time\":");
  AppendJsonString(line, absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", time, absl::UTCTimeZone()));
  absl::StrAppend(&line, fields, ",\"prev\":\"", prev, "\"");
  std::string hash = Sha256Hex(line);
  absl::StrAppend(&line, kHashKey, hash, "\"}");
  return line;
}

absl::StatusOr<ParsedLine> ParseAuditLine(absl::string_view line) {
  jose::JsonLimits limits;
  limits.max_bytes = kMaxLineBytes;
  limits.max_depth = 2;
  absl::StatusOr<jose::Json> json =
      jose::ParseJson(std::string_view(line.data(), line.size()), limits);
  if (!json.ok())
    return absl::InvalidArgumentError(absl::StrCat("not JSON (", json.status().message(), ")"));
  if (!json->is_object()) return absl::InvalidArgumentError("not a JSON object");
  const jose::Json* seq = json->Find("seq");
  const jose::Json* prev = json->Find("prev");
  const jose::Json* hash = json->Find("hash");
  if (seq == nullptr || !seq->as_int().has_value() || *seq->as_int() < 1) {
    return absl::InvalidArgumentError("missing or malformed 'seq'");
  }
  if (prev == nullptr || prev->as_string().size() != kHexHashBytes ||
      !IsLowerHex(prev->as_string())) {
    return absl::InvalidArgumentError("missing or malformed 'prev'");
  }
  if (hash == nullptr || json->as_object().back().first != "hash" ||
      hash->as_string().size() != kHexHashBytes || !IsLowerHex(hash->as_string())) {
    return absl::InvalidArgumentError("missing or malformed 'hash' (it must be the last member)");
  }
  // The hash covers the exact bytes before ,"hash":"; a line that is not byte-for-byte in our
  // canonical shape fails here too.
  if (line.size() < kHashSuffixBytes ||
      line.substr(line.size() - kHashSuffixBytes, kHashKey.size()) != kHashKey ||
      line.substr(line.size() - kHashSuffixBytes + kHashKey.size(), kHexHashBytes) !=
          hash->as_string() ||
      Sha256Hex(line.substr(0, line.size() - kHashSuffixBytes)) != hash->as_string()) {
    return absl::InvalidArgumentError("line hash does not match its content (line modified)");
  }
  const jose::Json* replica = json->Find("replica");
  return ParsedLine{static_cast<uint64_t>(*seq->as_int()), prev->as_string(),
                    replica == nullptr ? "" : replica->as_string()};
}

std::string FilePrefix(absl::string_view replica) {
  return replica.empty() ? "audit-" : absl::StrCat("audit-", replica, "-");
}

std::string FileName(uint64_t index, absl::string_view replica) {
  return absl::StrCat(FilePrefix(replica), absl::StrFormat("%06d.jsonl", index));
}

uint64_t FileIndex(absl::string_view name, absl::string_view replica) {
  const std::string prefix = FilePrefix(replica);
  const absl::string_view kPrefix = prefix, kSuffix = ".jsonl";
  if (name.size() < kPrefix.size() + 6 + kSuffix.size() ||
      name.substr(0, kPrefix.size()) != kPrefix ||
      name.substr(name.size() - kSuffix.size()) != kSuffix) {
    return 0;
  }
  absl::string_view digits =
      name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  uint64_t index = 0;
  if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(digits, &index)) {
    return 0;
  }
  return index;
}

}  // namespace custody::server::audit_format
