#include "jose/openssl_internal.h"

#include "absl/strings/str_cat.h"
#include "openssl/err.h"

namespace custody::jose::internal {

absl::Status OpensslError(absl::string_view what) {
  const unsigned long err = ERR_get_error();
  ERR_clear_error();
  char buf[256] = {0};
  if (err != 0) ERR_error_string_n(err, buf, sizeof(buf));
  return absl::InvalidArgumentError(absl::StrCat(what, err != 0 ? ": " : "", buf));
}

}  // namespace custody::jose::internal
