// The custody RPCs as integration tests call them (rpc_helpers.h).
#include "tests/testing/rpc_helpers.h"

#include "gtest/gtest.h"

namespace custody::testing {

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds timeout) {
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

grpc::Status CreateRing(Custodyd& d, const v1::CreateKeyRingRequest& req, v1::KeyRing* out,
                        std::chrono::milliseconds timeout) {
  v1::KeyRing ignored;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return d.admin().CreateKeyRing(&ctx, req, out != nullptr ? out : &ignored);
}

grpc::Status CreateEs256Ring(v1::KeyAdmin::Stub& admin, const std::string& name,
                             std::chrono::milliseconds timeout) {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(v1::SIGN);
  req.set_alg("ES256");
  v1::KeyRing ring;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return admin.CreateKeyRing(&ctx, req, &ring);
}

grpc::Status GetRing(Custodyd& d, const std::string& name, v1::KeyRing* out,
                     std::chrono::milliseconds timeout) {
  v1::GetKeyRingRequest req;
  req.set_name(name);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return d.admin().GetKeyRing(&ctx, req, out);
}

v1::KeyRing GetRing(Custodyd& d, const std::string& name) {
  v1::KeyRing ring;
  grpc::Status s = GetRing(d, name, &ring);
  EXPECT_TRUE(s.ok()) << "GetKeyRing " << name << ": " << s.error_message();
  return ring;
}

v1::RotationPolicy Policy(int64_t prepublish_ms, int64_t rotation_period_ms, int64_t retain_ms,
                          int64_t destroy_delay_ms) {
  v1::RotationPolicy p;
  p.set_prepublish_ms(prepublish_ms);
  p.set_rotation_period_ms(rotation_period_ms);
  p.set_retain_ms(retain_ms);
  p.set_destroy_delay_ms(destroy_delay_ms);
  return p;
}

grpc::Status UpdatePolicy(Custodyd& d, const std::string& ring, const v1::RotationPolicy& policy,
                          v1::KeyRing* out, std::chrono::milliseconds timeout) {
  v1::UpdateRotationPolicyRequest req;
  req.set_ring(ring);
  *req.mutable_policy() = policy;
  v1::KeyRing ignored;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return d.admin().UpdateRotationPolicy(&ctx, req, out != nullptr ? out : &ignored);
}

grpc::Status Rotate(Custodyd& d, const std::string& ring, bool force,
                    v1::RotateKeyRingResponse* out, std::chrono::milliseconds timeout) {
  v1::RotateKeyRingRequest req;
  req.set_ring(ring);
  req.set_force(force);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return d.admin().RotateKeyRing(&ctx, req, out);
}

grpc::Status SignJws(Custodyd& d, const v1::SignJwsRequest& req, v1::SignJwsResponse* out,
                     std::chrono::milliseconds timeout) {
  v1::SignJwsResponse ignored;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  return d.signer().SignJws(&ctx, req, out != nullptr ? out : &ignored);
}

grpc::Status SignJws(Custodyd& d, const std::string& ring, const std::string& payload,
                     v1::SignJwsResponse* out, std::chrono::milliseconds timeout) {
  v1::SignJwsRequest req;
  req.set_ring(ring);
  req.set_payload(payload);
  req.set_typ("JWT");
  return SignJws(d, req, out, timeout);
}

v1::GetJwksResponse GetJwks(Custodyd& d, const std::vector<std::string>& rings,
                            grpc::Status* status) {
  v1::GetJwksRequest req;
  for (const std::string& r : rings) req.add_rings(r);
  v1::GetJwksResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kRpcTimeout);
  grpc::Status s = d.signer().GetJwks(&ctx, req, &resp);
  if (status != nullptr) {
    *status = s;
  } else {
    EXPECT_TRUE(s.ok()) << "GetJwks: " << s.error_message();
  }
  return resp;
}

std::string Jwks(Custodyd& d, const std::vector<std::string>& rings) {
  return GetJwks(d, rings).jwks();
}

}  // namespace custody::testing
