// The embedded default: a SoftHSM2 token and its PINs under custodyd's state directory, created
// on first start, so that `custodyd --state_dir=DIR` works with no HSM at hand.
//
// Layout: DIR/softhsm2.conf, DIR/tokens/ (the token), DIR/pin and DIR/so-pin (mode 0600, random),
// DIR/metadata.db. An operator can inspect the token with
// `SOFTHSM2_CONF=DIR/softhsm2.conf pkcs11-tool --module MODULE --login --list-objects`.
#ifndef CUSTODY_SERVER_DAEMON_EMBEDDED_TOKEN_H_
#define CUSTODY_SERVER_DAEMON_EMBEDDED_TOKEN_H_

#include <string>

#include "absl/status/status.h"

namespace custody::server {

inline constexpr char kDefaultSoftHsmModule[] = "/usr/lib/softhsm/libsofthsm2.so";
inline constexpr char kEmbeddedTokenLabel[] = "custody";

// Creates what is missing of the layout above (an existing softhsm2.conf is kept, so a test or
// an operator may pre-write one, e.g. with slots.mechanisms), points SOFTHSM2_CONF at it and
// initializes the token when no token labelled "custody" exists yet. Idempotent.
absl::Status PrepareEmbeddedToken(const std::string& state_dir, const std::string& module_path);

// Creates `dir` (and parents) with mode 0700 when missing; FAILED_PRECONDITION when it exists
// with group/other permissions, since it holds PINs and keys.
absl::Status EnsurePrivateDirectory(const std::string& dir);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_EMBEDDED_TOKEN_H_
