// What jose/'s files share about OpenSSL's error queue. Not installed (*_internal.h).
#ifndef CUSTODY_JOSE_OPENSSL_INTERNAL_H_
#define CUSTODY_JOSE_OPENSSL_INTERNAL_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace custody::jose::internal {

// INVALID_ARGUMENT "`what`: <OpenSSL's first queued error>", the queue cleared. Not for
// decryption failures, which are uniform (jwe_internal.h: DecryptionFailed).
absl::Status OpensslError(absl::string_view what);

}  // namespace custody::jose::internal

#endif  // CUSTODY_JOSE_OPENSSL_INTERNAL_H_
