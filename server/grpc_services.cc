#include "server/grpc_services.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "openssl/crypto.h"

namespace custody::server {
namespace {

// What a successful reply adds to its audit line: the key version and kid that were used.
template <typename T>
void Annotate(AuditEvent&, const T&) {}
template <>
void Annotate(AuditEvent& e, const v1::SignJwsResponse& r) {
  e.kid = r.kid();
  e.version = r.version();
}
template <>
void Annotate(AuditEvent& e, const v1::SignResponse& r) {
  e.kid = r.kid();
  e.version = r.version();
}
template <>
void Annotate(AuditEvent& e, const v1::DecryptJweResponse& r) {
  e.kid = r.kid();
  e.version = r.version();
}

// One RPC's authorization and audit: identify, authorize, run, record. The shape every
// handler below shares.
class Call {
 public:
  Call(RequestGuard* guard, const grpc::ServerContext& context, absl::string_view operation,
       absl::string_view ring)
      : guard_(guard) {
    event_.identity = CallerIdentity(context);
    event_.operation = std::string(operation);
    event_.ring = std::string(ring);
  }
  // One item of a batch RPC, whose caller is already identified.
  Call(RequestGuard* guard, const std::string& identity, absl::string_view operation,
       absl::string_view ring)
      : guard_(guard) {
    event_.identity = identity;
    event_.operation = std::string(operation);
    event_.ring = std::string(ring);
  }
  const std::string& identity() const { return event_.identity; }
  AuditEvent& event() { return event_; }
  absl::Status Authorize() const {
    return guard_->Authorize(event_.identity, event_.operation, event_.ring);
  }
  grpc::Status Finish(const grpc::Status& result) {
    return guard_->Record(event_, result, started_);
  }

  // Runs `operation` when authorized and stores its value in *response (only on success); the
  // call's status, not yet recorded.
  template <typename T, typename F>
  grpc::Status Execute(T* response, F&& operation) {
    if (absl::Status s = Authorize(); !s.ok()) return ToGrpcStatus(s);
    absl::StatusOr<T> result = operation();
    if (!result.ok()) return ToGrpcStatus(result.status());
    Annotate(event_, *result);
    *response = *std::move(result);
    return grpc::Status::OK;
  }
  // Executes and records: the reply of a unary RPC.
  template <typename T, typename F>
  grpc::Status Run(T* response, F&& operation) {
    return Finish(Execute(response, std::forward<F>(operation)));
  }

 private:
  RequestGuard* const guard_;
  AuditEvent event_;
  const absl::Time started_ = absl::Now();  // for the latency metric
};

// Wipes imported key material in the request once the call is done. The request belongs to this
// call alone (gRPC frees it afterwards), so writing through the const view is safe; what
// protobuf parsing or the transport copied on the way in is beyond our reach.
void WipeKeyMaterial(const v1::PrivateKeyMaterial& material) {
  for (const std::string* s : {&material.private_jwk(), &material.pkcs8_pem()}) {
    auto* text = const_cast<std::string*>(s);
    if (!text->empty()) OPENSSL_cleanse(text->data(), text->size());
  }
}

// Orphaned token objects concern no ring: they are shown to callers whose admin.read grant
// covers this name, which only the catch-all patterns ("**", "*") match.
constexpr char kOrphansResource[] = ".orphans";

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

template <typename Request, typename Result, typename ContentOf, typename Operation>
grpc::Status SignerService::RunBatch(const grpc::ServerContext& context, const char* operation,
                                     const google::protobuf::RepeatedPtrField<Request>& items,
                                     google::protobuf::RepeatedPtrField<Result>* results,
                                     ContentOf content_of, Operation run) {
  const int n = items.size();
  if (n > max_batch_items_) {
    Call call(guard_, context, operation, "");
    call.event().detail = absl::StrCat("batch of ", n);
    return call.Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("batch of ", n, " requests; at most ", max_batch_items_, " per batch")));
  }
  const absl::Time started = absl::Now();
  const std::string identity = CallerIdentity(context);
  std::vector<AuditEvent> events(static_cast<size_t>(n));
  std::vector<grpc::Status> statuses(static_cast<size_t>(n));
  results->Reserve(n);
  for (int i = 0; i < n; ++i) results->Add();
  // Each item is a Call of its own, as the unary RPC is, recorded below with the others. Item i
  // touches only events[i], statuses[i] and results[i], so items may run concurrently.
  auto run_item = [&](size_t i) {
    const Request& item = items.Get(static_cast<int>(i));
    Call call(guard_, identity, operation, item.ring());
    call.event().payload_sha256 = Sha256Hex(content_of(item));
    statuses[i] = call.Execute(results->Mutable(static_cast<int>(i))->mutable_response(),
                               [&] { return run(item); });
    events[i] = std::move(call.event());
  };
  if (runner_ != nullptr) {
    runner_->Run(static_cast<size_t>(n), run_item);
  } else {
    for (size_t i = 0; i < static_cast<size_t>(n); ++i) run_item(i);
  }
  // One group commit for the batch's lines; the reply waits for it like a single call's.
  guard_->RecordAll(events, statuses, started);
  for (int i = 0; i < n; ++i) {
    const grpc::Status& status = statuses[static_cast<size_t>(i)];
    if (status.ok()) continue;
    Result* result = results->Mutable(i);
    result->clear_response();  // mutable_response() made an empty one
    result->set_code(status.error_code());
    result->set_message(status.error_message());
  }
  return grpc::Status::OK;
}

grpc::Status SignerService::SignJws(grpc::ServerContext* context, const v1::SignJwsRequest* request,
                                    v1::SignJwsResponse* response) {
  Call call(guard_, *context, kOpSign, request->ring());
  call.event().payload_sha256 = Sha256Hex(request->payload());
  return call.Run(response, [&] { return keys_->SignJws(*request); });
}

grpc::Status SignerService::SignJwsBatch(grpc::ServerContext* context,
                                         const v1::SignJwsBatchRequest* request,
                                         v1::SignJwsBatchResponse* response) {
  return RunBatch(
      *context, kOpSign, request->requests(), response->mutable_results(),
      [](const v1::SignJwsRequest& item) -> const std::string& { return item.payload(); },
      [&](const v1::SignJwsRequest& item) { return keys_->SignJws(item); });
}

grpc::Status SignerService::DecryptJweBatch(grpc::ServerContext* context,
                                            const v1::DecryptJweBatchRequest* request,
                                            v1::DecryptJweBatchResponse* response) {
  return RunBatch(
      *context, kOpDecrypt, request->requests(), response->mutable_results(),
      [](const v1::DecryptJweRequest& item) -> const std::string& { return item.jwe(); },
      [&](const v1::DecryptJweRequest& item) { return keys_->DecryptJwe(item); });
}

grpc::Status SignerService::Sign(grpc::ServerContext* context, const v1::SignRequest* request,
                                 v1::SignResponse* response) {
  Call call(guard_, *context, kOpSign, request->ring());
  call.event().payload_sha256 =
      Sha256Hex(request->has_digest() ? request->digest() : request->data());
  return call.Run(response, [&] { return keys_->Sign(*request); });
}

grpc::Status SignerService::GetPublicKey(grpc::ServerContext* context,
                                         const v1::GetPublicKeyRequest* request,
                                         v1::PublicKey* response) {
  Call call(guard_, *context, kOpJwks, request->ring());
  return call.Run(response, [&] { return keys_->GetPublicKey(*request); });
}

grpc::Status SignerService::DecryptJwe(grpc::ServerContext* context,
                                       const v1::DecryptJweRequest* request,
                                       v1::DecryptJweResponse* response) {
  Call call(guard_, *context, kOpDecrypt, request->ring());
  call.event().payload_sha256 = Sha256Hex(request->jwe());
  return call.Run(response, [&] { return keys_->DecryptJwe(*request); });
}

absl::StatusOr<std::vector<std::string>> SignerService::JwksRings(
    const std::string& identity, const google::protobuf::RepeatedPtrField<std::string>& asked) {
  std::vector<std::string> rings;
  if (asked.empty()) {
    for (const std::string& name : keys_->RingNames()) {
      if (guard_->Allows(identity, kOpJwks, name)) rings.push_back(name);
    }
    return rings;
  }
  for (const std::string& name : asked) {
    if (absl::Status s = guard_->Authorize(identity, kOpJwks, name); !s.ok()) return s;
    rings.push_back(name);
  }
  return rings;
}

grpc::Status SignerService::GetJwks(grpc::ServerContext* context, const v1::GetJwksRequest* request,
                                    v1::GetJwksResponse* response) {
  Call call(guard_, *context, kOpJwks, absl::StrJoin(request->rings(), ","));
  auto rings = JwksRings(call.identity(), request->rings());
  if (!rings.ok()) return call.Finish(ToGrpcStatus(rings.status()));
  // An empty selection after filtering is an empty set, not "every ring".
  if (rings->empty()) {
    response->set_jwks("{\"keys\":[]}");
    return call.Finish(grpc::Status::OK);
  }
  auto jwks = keys_->GetJwks(*rings);
  if (!jwks.ok()) return call.Finish(ToGrpcStatus(jwks.status()));
  response->set_jwks(std::move(jwks->json));
  response->set_etag(std::move(jwks->etag));
  response->set_max_age_seconds(jwks->max_age_seconds);
  return call.Finish(grpc::Status::OK);
}

grpc::Status SignerService::WatchJwks(grpc::ServerContext* context,
                                      const v1::WatchJwksRequest* request,
                                      grpc::ServerWriter<v1::GetJwksResponse>* writer) {
  Call call(guard_, *context, kOpJwks, absl::StrJoin(request->rings(), ","));
  call.event().detail = "watch";
  auto rings = JwksRings(call.identity(), request->rings());
  if (!rings.ok()) return call.Finish(ToGrpcStatus(rings.status()));
  // The subscription is what is audited; pushes are the same public keys, re-sent.
  if (grpc::Status s = call.Finish(grpc::Status::OK); !s.ok()) return s;
  std::string last_sent;
  while (!context->IsCancelled() && !keys_->draining()) {
    // "Every ring" means every ring now: one created after the watch began is followed too.
    // The generation is read before the ring names, so a ring created in between ends the wait
    // below at once.
    uint64_t listed_at = 0;
    if (request->rings().empty()) {
      listed_at = keys_->WaitForJwksChange(0, absl::InfinitePast());
      rings = JwksRings(call.identity(), request->rings());
      if (!rings.ok()) return ToGrpcStatus(rings.status());
    }
    auto jwks =
        rings->empty()
            ? absl::StatusOr<KeyService::Jwks>(KeyService::Jwks{"{\"keys\":[]}", "", 0, listed_at})
            : keys_->GetJwks(*rings);
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
    keys_->WaitForJwksChange(listed_at != 0 ? listed_at : jwks->generation,
                             absl::Now() + absl::Seconds(1));
  }
  return grpc::Status::OK;
}

grpc::Status KeyAdminService::CreateKeyRing(grpc::ServerContext* context,
                                            const v1::CreateKeyRingRequest* request,
                                            v1::KeyRing* response) {
  Call call(guard_, *context, request->has_import_key() ? kOpAdminImport : kOpAdminCreate,
            request->name());
  // Importing a key is also creating a ring: both grants are needed.
  grpc::Status status;
  if (request->has_import_key()) {
    if (absl::Status s = guard_->Authorize(call.identity(), kOpAdminCreate, request->name());
        !s.ok()) {
      status = call.Finish(ToGrpcStatus(s));
    }
  }
  if (status.ok()) {
    status = call.Run(response, [&] { return keys_->CreateKeyRing(*request); });
  }
  WipeKeyMaterial(request->import_key());
  return status;
}

grpc::Status KeyAdminService::ImportKeyVersion(grpc::ServerContext* context,
                                               const v1::ImportKeyVersionRequest* request,
                                               v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminImport, request->ring());
  grpc::Status status = call.Run(response, [&] { return keys_->ImportKeyVersion(*request); });
  WipeKeyMaterial(request->key());
  return status;
}

grpc::Status KeyAdminService::CreateCertificateRequest(
    grpc::ServerContext* context, const v1::CreateCertificateRequestRequest* request,
    v1::CertificateRequest* response) {
  Call call(guard_, *context, kOpAdminCertificate, request->ring());
  return call.Run(response, [&] { return keys_->CreateCertificateRequest(*request); });
}

grpc::Status KeyAdminService::SetCertificate(grpc::ServerContext* context,
                                             const v1::SetCertificateRequest* request,
                                             v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminCertificate, request->ring());
  return call.Run(response, [&] { return keys_->SetCertificate(*request); });
}

grpc::Status KeyAdminService::GetKeyRing(grpc::ServerContext* context,
                                         const v1::GetKeyRingRequest* request,
                                         v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminRead, request->name());
  return call.Run(response, [&] { return keys_->GetKeyRing(request->name()); });
}

grpc::Status KeyAdminService::ListKeyRings(grpc::ServerContext* context,
                                           const v1::ListKeyRingsRequest* request,
                                           v1::ListKeyRingsResponse* response) {
  Call call(guard_, *context, kOpAdminRead, request->prefix() + "*");
  // A caller with no admin.read grant at all is refused; one with some sees what it may read.
  if (absl::Status s = guard_->AuthorizeAnyRing(call.identity(), kOpAdminRead, call.event().ring);
      !s.ok()) {
    return call.Finish(ToGrpcStatus(s));
  }
  auto all = keys_->ListKeyRings(request->prefix());
  if (!all.ok()) return call.Finish(ToGrpcStatus(all.status()));
  // Only the rings the caller may read; orphans only for a caller who may read every ring.
  for (v1::KeyRing& ring : *all->mutable_rings()) {
    if (guard_->Allows(call.identity(), kOpAdminRead, ring.name())) {
      *response->add_rings() = std::move(ring);
    }
  }
  if (guard_->Allows(call.identity(), kOpAdminRead, kOrphansResource)) {
    *response->mutable_orphaned_objects() = all->orphaned_objects();
  }
  return call.Finish(grpc::Status::OK);
}

grpc::Status KeyAdminService::UpdateRotationPolicy(grpc::ServerContext* context,
                                                   const v1::UpdateRotationPolicyRequest* request,
                                                   v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminRotate, request->ring());
  return call.Run(response, [&] { return keys_->UpdateRotationPolicy(*request); });
}

grpc::Status KeyAdminService::RotateKeyRing(grpc::ServerContext* context,
                                            const v1::RotateKeyRingRequest* request,
                                            v1::RotateKeyRingResponse* response) {
  Call call(guard_, *context, kOpAdminRotate, request->ring());
  if (request->force()) call.event().detail = "force";
  return call.Run(response, [&] { return keys_->RotateKeyRing(*request); });
}

grpc::Status KeyAdminService::DisableKeyVersion(grpc::ServerContext* context,
                                                const v1::KeyVersionRequest* request,
                                                v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminRotate, request->ring());
  call.event().version = request->version();
  return call.Run(response, [&] { return keys_->DisableKeyVersion(*request); });
}

grpc::Status KeyAdminService::EnableKeyVersion(grpc::ServerContext* context,
                                               const v1::KeyVersionRequest* request,
                                               v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminRotate, request->ring());
  call.event().version = request->version();
  return call.Run(response, [&] { return keys_->EnableKeyVersion(*request); });
}

grpc::Status KeyAdminService::ScheduleKeyVersionDestruction(grpc::ServerContext* context,
                                                            const v1::KeyVersionRequest* request,
                                                            v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminDestroy, request->ring());
  call.event().version = request->version();
  return call.Run(response, [&] { return keys_->ScheduleKeyVersionDestruction(*request); });
}

grpc::Status KeyAdminService::CancelKeyVersionDestruction(grpc::ServerContext* context,
                                                          const v1::KeyVersionRequest* request,
                                                          v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminDestroy, request->ring());
  call.event().version = request->version();
  return call.Run(response, [&] { return keys_->CancelKeyVersionDestruction(*request); });
}

grpc::Status KeyAdminService::CompromiseKeyVersion(grpc::ServerContext* context,
                                                   const v1::CompromiseKeyVersionRequest* request,
                                                   v1::KeyRing* response) {
  Call call(guard_, *context, kOpAdminDestroy, request->ring());
  call.event().version = request->version();
  call.event().detail = "compromise: " + request->reason();
  return call.Run(response, [&] { return keys_->CompromiseKeyVersion(*request); });
}

}  // namespace custody::server
