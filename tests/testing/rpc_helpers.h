// The custody RPCs as integration tests call them on a running custodyd (tests/testing/harness.h):
// one function a call, each with a deadline, so that a call that hangs fails its test instead of
// hanging it. The forms that return the reply instead of a status also record a test failure
// (naming the call) when the call fails.
#ifndef CUSTODY_TESTS_TESTING_RPC_HELPERS_H_
#define CUSTODY_TESTS_TESTING_RPC_HELPERS_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "tests/testing/harness.h"

namespace custody::testing {

// Long enough for any key generation on a loaded machine: a guard against a hang, not a bound a
// test measures. A test that bounds a call passes its own timeout.
inline constexpr std::chrono::milliseconds kRpcTimeout = std::chrono::minutes(5);

// `ctx` expires `timeout` from now.
void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds timeout);

// KeyAdmin.CreateKeyRing; `out` (when set) receives the ring.
grpc::Status CreateRing(Custodyd& d, const v1::CreateKeyRingRequest& req,
                        v1::KeyRing* out = nullptr,
                        std::chrono::milliseconds timeout = kRpcTimeout);

// ... of an ES256 SIGN ring named `name` with the default policy, through `admin` (a caller's
// own stub: its channel's credentials name the caller).
grpc::Status CreateEs256Ring(v1::KeyAdmin::Stub& admin, const std::string& name,
                             std::chrono::milliseconds timeout = kRpcTimeout);

// KeyAdmin.GetKeyRing of `name`.
grpc::Status GetRing(Custodyd& d, const std::string& name, v1::KeyRing* out,
                     std::chrono::milliseconds timeout = kRpcTimeout);
// ... expected to succeed.
v1::KeyRing GetRing(Custodyd& d, const std::string& name);

// A rotation policy of these durations (milliseconds; 0 where the policy leaves it unset).
v1::RotationPolicy Policy(int64_t prepublish_ms, int64_t rotation_period_ms, int64_t retain_ms,
                          int64_t destroy_delay_ms);

// KeyAdmin.UpdateRotationPolicy of `ring`; `out` (when set) receives the ring.
grpc::Status UpdatePolicy(Custodyd& d, const std::string& ring, const v1::RotationPolicy& policy,
                          v1::KeyRing* out = nullptr,
                          std::chrono::milliseconds timeout = kRpcTimeout);

// KeyAdmin.RotateKeyRing of `ring`; `force` promotes before the pending version's publication
// time.
grpc::Status Rotate(Custodyd& d, const std::string& ring, bool force,
                    v1::RotateKeyRingResponse* out,
                    std::chrono::milliseconds timeout = kRpcTimeout);

// Signer.SignJws; `out` may be null.
grpc::Status SignJws(Custodyd& d, const v1::SignJwsRequest& req, v1::SignJwsResponse* out,
                     std::chrono::milliseconds timeout = kRpcTimeout);
// ... of `payload` by `ring`, typ JWT.
grpc::Status SignJws(Custodyd& d, const std::string& ring, const std::string& payload,
                     v1::SignJwsResponse* out, std::chrono::milliseconds timeout = kRpcTimeout);

// Signer.GetJwks of `rings` (empty: every ring). With `status` null, the call is expected to
// succeed; else its status is stored there.
v1::GetJwksResponse GetJwks(Custodyd& d, const std::vector<std::string>& rings,
                            grpc::Status* status = nullptr);
// ... expected to succeed: the JWKS text.
std::string Jwks(Custodyd& d, const std::vector<std::string>& rings = {});

}  // namespace custody::testing

#endif  // CUSTODY_TESTS_TESTING_RPC_HELPERS_H_
