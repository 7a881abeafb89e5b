// libFuzzer target: the custody: URI parser of the OpenSSL provider (provider/uri.h), which takes
// whatever string an application passes as a key name.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "provider/uri.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  auto uri = custody::provider::ParseCustodyUri(input);
  if (!uri.ok()) return 0;
  // An accepted URI names a ring, and writing it back parses to the same fields.
  if (uri->ring.empty()) std::abort();
  std::string again = absl::StrCat("custody:ring=", uri->ring);
  if (uri->version != 0) absl::StrAppend(&again, ";version=", uri->version);
  if (!uri->address.empty()) absl::StrAppend(&again, ";addr=", uri->address);
  auto reparsed = custody::provider::ParseCustodyUri(again);
  if (!reparsed.ok() || reparsed->ring != uri->ring || reparsed->version != uri->version ||
      reparsed->address != uri->address) {
    std::abort();
  }
  return 0;
}
