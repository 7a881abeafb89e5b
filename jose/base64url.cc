#include "jose/base64url.h"

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace custody::jose {
namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// -1 for characters outside the URL-safe alphabet (including '=' and whitespace).
int DecodeChar(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

}  // namespace

std::string Base64UrlEncode(std::string_view data) {
  // Sized once and written through a pointer: the hot path of every JWS (payload and signature).
  std::string out((data.size() * 4 + 2) / 3, '\0');
  char* o = out.data();
  const auto* in = reinterpret_cast<const uint8_t*>(data.data());
  size_t i = 0;
  for (; i + 3 <= data.size(); i += 3) {
    const uint32_t v = (in[i] << 16) | (in[i + 1] << 8) | in[i + 2];
    *o++ = kAlphabet[(v >> 18) & 0x3f];
    *o++ = kAlphabet[(v >> 12) & 0x3f];
    *o++ = kAlphabet[(v >> 6) & 0x3f];
    *o++ = kAlphabet[v & 0x3f];
  }
  const size_t rest = data.size() - i;
  if (rest == 1) {
    const uint32_t v = in[i] << 16;
    *o++ = kAlphabet[(v >> 18) & 0x3f];
    *o++ = kAlphabet[(v >> 12) & 0x3f];
  } else if (rest == 2) {
    const uint32_t v = (in[i] << 16) | (in[i + 1] << 8);
    *o++ = kAlphabet[(v >> 18) & 0x3f];
    *o++ = kAlphabet[(v >> 12) & 0x3f];
    *o++ = kAlphabet[(v >> 6) & 0x3f];
  }
  return out;
}

absl::StatusOr<std::string> Base64UrlDecode(std::string_view encoded) {
  if (encoded.size() % 4 == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("base64url: invalid length ", encoded.size(), " (mod 4 == 1)"));
  }
  std::string out;
  out.reserve(encoded.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < encoded.size(); ++i) {
    const int v = DecodeChar(encoded[i]);
    if (v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("base64url: invalid character at offset ", i));
    }
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  // Leftover bits (2 or 4) must be zero; otherwise several strings would decode to one value.
  if (bits > 0 && (acc & ((1u << bits) - 1)) != 0) {
    return absl::InvalidArgumentError("base64url: non-zero trailing bits in last character");
  }
  return out;
}

}  // namespace custody::jose
