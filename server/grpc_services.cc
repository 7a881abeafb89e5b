#include "server/grpc_services.h"

#include <string>
#include <utility>
#include <vector>

#include "openssl/crypto.h"

namespace custody::server {
namespace {

// Writes the value or the error: the shape shared by every unary handler.
template <typename T>
grpc::Status Reply(absl::StatusOr<T> result, T* response) {
  if (!result.ok()) return ToGrpcStatus(result.status());
  *response = *std::move(result);
  return grpc::Status::OK;
}

// Wipes imported key material in the request once the call is done. The request belongs to this
// call alone (gRPC frees it afterwards), so writing through the const view is safe; what
// protobuf parsing or the transport copied on the way in is beyond our reach.
void WipeKeyMaterial(const v1::PrivateKeyMaterial& material) {
  for (const std::string* s : {&material.private_jwk(), &material.pkcs8_pem()}) {
    auto* text = const_cast<std::string*>(s);
    if (!text->empty()) OPENSSL_cleanse(text->data(), text->size());
  }
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status SignerService::SignJws(grpc::ServerContext*, const v1::SignJwsRequest* request,
                                    v1::SignJwsResponse* response) {
  return Reply(keys_->SignJws(*request), response);
}

grpc::Status SignerService::Sign(grpc::ServerContext*, const v1::SignRequest* request,
                                 v1::SignResponse* response) {
  return Reply(keys_->Sign(*request), response);
}

grpc::Status SignerService::GetJwks(grpc::ServerContext*, const v1::GetJwksRequest* request,
                                    v1::GetJwksResponse* response) {
  auto jwks = keys_->GetJwks({request->rings().begin(), request->rings().end()});
  if (!jwks.ok()) return ToGrpcStatus(jwks.status());
  response->set_jwks(std::move(jwks->json));
  response->set_etag(std::move(jwks->etag));
  response->set_max_age_seconds(jwks->max_age_seconds);
  return grpc::Status::OK;
}

grpc::Status SignerService::WatchJwks(grpc::ServerContext* context,
                                      const v1::WatchJwksRequest* request,
                                      grpc::ServerWriter<v1::GetJwksResponse>* writer) {
  const std::vector<std::string> rings(request->rings().begin(), request->rings().end());
  std::string last_sent;
  while (!context->IsCancelled()) {
    auto jwks = keys_->GetJwks(rings);
    if (!jwks.ok()) return ToGrpcStatus(jwks.status());
    // A change elsewhere wakes every watcher; only a change of these rings' keys is sent.
    if (jwks->json != last_sent) {
      v1::GetJwksResponse message;
      message.set_jwks(jwks->json);
      message.set_etag(jwks->etag);
      message.set_max_age_seconds(jwks->max_age_seconds);
      if (!writer->Write(message)) return grpc::Status::OK;  // the watcher went away
      last_sent = std::move(jwks->json);
    }
    // Bounded waits so that cancellation and shutdown are noticed within a second.
    keys_->WaitForJwksChange(jwks->generation, absl::Now() + absl::Seconds(1));
  }
  return grpc::Status::OK;
}

grpc::Status SignerService::DecryptJwe(grpc::ServerContext*, const v1::DecryptJweRequest* request,
                                       v1::DecryptJweResponse* response) {
  return Reply(keys_->DecryptJwe(*request), response);
}

grpc::Status KeyAdminService::CreateKeyRing(grpc::ServerContext*,
                                            const v1::CreateKeyRingRequest* request,
                                            v1::KeyRing* response) {
  grpc::Status status = Reply(keys_->CreateKeyRing(*request), response);
  WipeKeyMaterial(request->import_key());
  return status;
}

grpc::Status KeyAdminService::ImportKeyVersion(grpc::ServerContext*,
                                               const v1::ImportKeyVersionRequest* request,
                                               v1::KeyRing* response) {
  grpc::Status status = Reply(keys_->ImportKeyVersion(*request), response);
  WipeKeyMaterial(request->key());
  return status;
}

grpc::Status KeyAdminService::GetKeyRing(grpc::ServerContext*, const v1::GetKeyRingRequest* request,
                                         v1::KeyRing* response) {
  return Reply(keys_->GetKeyRing(request->name()), response);
}

grpc::Status KeyAdminService::ListKeyRings(grpc::ServerContext*,
                                           const v1::ListKeyRingsRequest* request,
                                           v1::ListKeyRingsResponse* response) {
  return Reply(keys_->ListKeyRings(request->prefix()), response);
}

grpc::Status KeyAdminService::UpdateRotationPolicy(grpc::ServerContext*,
                                                   const v1::UpdateRotationPolicyRequest* request,
                                                   v1::KeyRing* response) {
  return Reply(keys_->UpdateRotationPolicy(*request), response);
}

grpc::Status KeyAdminService::RotateKeyRing(grpc::ServerContext*,
                                            const v1::RotateKeyRingRequest* request,
                                            v1::RotateKeyRingResponse* response) {
  return Reply(keys_->RotateKeyRing(*request), response);
}

grpc::Status KeyAdminService::DisableKeyVersion(grpc::ServerContext*,
                                                const v1::KeyVersionRequest* request,
                                                v1::KeyRing* response) {
  return Reply(keys_->DisableKeyVersion(*request), response);
}

grpc::Status KeyAdminService::EnableKeyVersion(grpc::ServerContext*,
                                               const v1::KeyVersionRequest* request,
                                               v1::KeyRing* response) {
  return Reply(keys_->EnableKeyVersion(*request), response);
}

grpc::Status KeyAdminService::ScheduleKeyVersionDestruction(grpc::ServerContext*,
                                                            const v1::KeyVersionRequest* request,
                                                            v1::KeyRing* response) {
  return Reply(keys_->ScheduleKeyVersionDestruction(*request), response);
}

grpc::Status KeyAdminService::CancelKeyVersionDestruction(grpc::ServerContext*,
                                                          const v1::KeyVersionRequest* request,
                                                          v1::KeyRing* response) {
  return Reply(keys_->CancelKeyVersionDestruction(*request), response);
}

grpc::Status KeyAdminService::CompromiseKeyVersion(grpc::ServerContext*,
                                                   const v1::CompromiseKeyVersionRequest* request,
                                                   v1::KeyRing* response) {
  return Reply(keys_->CompromiseKeyVersion(*request), response);
}

}  // namespace custody::server
