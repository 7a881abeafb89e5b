// custody: URIs naming a key in custodyd, as OpenSSL applications pass them to the store:
//
//   custody:ring=NAME[;version=N][;addr=ADDRESS]
//
// NAME is a custody ring name (custodyd checks its syntax), N a decimal version (1..2^32-1;
// absent: the ring's ACTIVE version at load time), ADDRESS a gRPC address ("unix:/run/..." or
// HOST:PORT; absent: the provider configuration's `addr`, else $CUSTODY_ADDR). Attributes are
// separated by ';', each at most once; values may not contain ';'. Pure, no I/O: fuzzed.
#ifndef CUSTODY_PROVIDER_URI_H_
#define CUSTODY_PROVIDER_URI_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custody::provider {

struct CustodyUri {
  std::string ring;
  uint32_t version = 0;  // 0: the ACTIVE version
  std::string address;   // empty: from the configuration or $CUSTODY_ADDR
};

inline constexpr absl::string_view kUriScheme = "custody";

// INVALID_ARGUMENT naming what is wrong: another scheme, no ring, an empty or repeated
// attribute, an unknown attribute, a version that is not a decimal in range.
absl::StatusOr<CustodyUri> ParseCustodyUri(absl::string_view uri);

}  // namespace custody::provider

#endif  // CUSTODY_PROVIDER_URI_H_
