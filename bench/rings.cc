// custody-bench's measured rings (rings.h).
#include "bench/rings.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/jwe_encryption.h"
#include "jose/json.h"
#include "jose/jwk.h"

namespace custody::bench {

std::string Payload(int bytes) {
  std::string p = R"({"iss":"https://as.bank.example","sub":"custody-bench","aud":"rp","pad":")";
  const std::string tail = "\"}";
  while (p.size() + tail.size() < static_cast<size_t>(bytes)) p += 'x';
  p += tail;
  return p;
}

std::string GrpcError(const char* what, const grpc::Status& s) {
  return absl::StrCat(what, ": ", static_cast<int>(s.error_code()), " ", s.error_message());
}

std::chrono::system_clock::time_point Deadline(int seconds) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

absl::Status CreateRing(custody::v1::KeyAdmin::Stub& admin, const OpSpec& spec) {
  custody::v1::CreateKeyRingRequest req;
  req.set_name(spec.ring);
  req.set_purpose(spec.rpc == Rpc::kSignJws ? custody::v1::SIGN : custody::v1::DECRYPT);
  req.set_alg(spec.alg);
  if (spec.rsa_bits > 0) req.set_rsa_bits(static_cast<uint32_t>(spec.rsa_bits));
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(300));
  grpc::Status s = admin.CreateKeyRing(&ctx, req, &ring);
  if (!s.ok()) return absl::InternalError(GrpcError(("CreateKeyRing " + spec.ring).c_str(), s));
  return absl::OkStatus();
}

absl::Status DescribeRing(custody::v1::KeyAdmin::Stub& admin, custody::v1::Signer::Stub& signer,
                          const std::string& payload, OpState* op) {
  const OpSpec& spec = *op->spec;
  custody::v1::KeyRing ring;
  {
    custody::v1::GetKeyRingRequest req;
    req.set_name(spec.ring);
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(30));
    grpc::Status s = admin.GetKeyRing(&ctx, req, &ring);
    if (!s.ok()) return absl::InternalError(GrpcError("GetKeyRing", s));
  }
  for (const auto& v : ring.versions()) {
    if (v.version() == ring.active_version()) {
      op->kid = v.kid();
      op->token_object_id_hex = v.token_object_id();
    }
  }
  if (op->token_object_id_hex.empty()) {
    return absl::InternalError(absl::StrCat("ring ", spec.ring, " has no ACTIVE version"));
  }
  op->decryption_mechanism = ring.decryption_mechanism();
  {
    custody::v1::GetJwksRequest req;
    req.add_rings(spec.ring);
    custody::v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(30));
    grpc::Status s = signer.GetJwks(&ctx, req, &resp);
    if (!s.ok()) return absl::InternalError(GrpcError("GetJwks", s));
    op->jwks = resp.jwks();
  }
  if (spec.rpc == Rpc::kSignJws) {
    auto jwks = jose::ParseJson(op->jwks);
    if (!jwks.ok()) return jwks.status();
    const jose::Json* keys = jwks->Find("keys");
    if (keys == nullptr) return absl::InternalError("JWKS without keys");
    for (const jose::Json& k : keys->as_array()) {
      const jose::Json* kid = k.Find("kid");
      if (kid == nullptr || kid->as_string() != op->kid) continue;
      auto pkey = jose::PkeyFromPublicJwk(k);
      if (!pkey.ok()) return pkey.status();
      op->verify_key = std::shared_ptr<EVP_PKEY>(pkey->release(), EVP_PKEY_free);
    }
    if (op->verify_key == nullptr) {
      return absl::InternalError(absl::StrCat("JWKS of ", spec.ring, " lacks kid ", op->kid));
    }
    // The ceilings sign exactly what custodyd signs: the signing input of one of its JWS.
    custody::v1::SignJwsRequest req;
    req.set_ring(spec.ring);
    req.set_payload(payload);
    req.set_typ("JWT");
    custody::v1::SignJwsResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(30));
    grpc::Status s = signer.SignJws(&ctx, req, &resp);
    if (!s.ok()) return absl::InternalError(GrpcError("SignJws", s));
    const size_t last_dot = resp.jws().rfind('.');
    if (last_dot == std::string::npos) return absl::InternalError("SignJws: not a compact JWS");
    op->signing_input = resp.jws().substr(0, last_dot);
    return absl::OkStatus();
  }
  client::EncryptOptions options;
  options.enc = jose::JweEnc::kA256Gcm;
  for (int i = 0; i < 16; ++i) {
    auto jwe = client::EncryptToJwks(payload, op->jwks, options);
    if (!jwe.ok()) return jwe.status();
    op->jwes.push_back(*std::move(jwe));
  }
  return absl::OkStatus();
}

}  // namespace custody::bench
