#include "server/grpc/grpc_services.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/caller_message.h"
#include "common/log.h"
#include "custody/v1/strict_requests.h"
#include "openssl/crypto.h"
#include "server/grpc/malformed_requests.h"

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

// rotation::ValidateRingName's limit. A longer caller-set name is refused before anything else
// looks at it, and never echoed whole (BoundedForMessage).
constexpr size_t kMaxRingNameBytes = 200;

// Names a jwks call may list after duplicates are removed.
constexpr size_t kMaxJwksRings = 256;

// A caller-set name as it may appear in an audit line or an error message: whole within the ring
// name limit, else its first 64 bytes (cut on a UTF-8 boundary) and its length, so that a long
// name can swell neither a reply's metadata nor the audit log.
std::string BoundedForMessage(absl::string_view s) {
  if (s.size() <= kMaxRingNameBytes) return std::string(s);
  size_t cut = 64;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  return absl::StrCat(s.substr(0, cut), "...(", s.size(), " bytes)");
}

// One RPC's authorization and audit: identify, authorize, run, record. The shape every
// handler below shares.
class Call {
 public:
  Call(RequestGuard* guard, const grpc::ServerContextBase& context, absl::string_view operation,
       absl::string_view ring)
      : guard_(guard) {
    event_.identity = CallerIdentity(context);
    event_.operation = std::string(operation);
    SetRing(ring);
  }
  // One item of a batch RPC, whose caller is already identified.
  Call(RequestGuard* guard, const std::string& identity, absl::string_view operation,
       absl::string_view ring)
      : guard_(guard) {
    event_.identity = identity;
    event_.operation = std::string(operation);
    SetRing(ring);
  }
  const std::string& identity() const { return event_.identity; }
  AuditEvent& event() { return event_; }
  absl::Status Authorize() const {
    if (!ring_error_.ok()) return ring_error_;
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
  void SetRing(absl::string_view ring) {
    event_.ring = BoundedForMessage(ring);
    if (ring.size() > kMaxRingNameBytes) {
      ring_error_ = absl::InvalidArgumentError(absl::StrCat(
          "ring name is ", ring.size(), " bytes long; the limit is ", kMaxRingNameBytes));
    }
  }

  RequestGuard* const guard_;
  AuditEvent event_;
  absl::Status ring_error_;                 // a ring name too long to look at
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

// A lifecycle call on one version: audited with the version, run by `method` when authorized.
grpc::Status VersionCall(
    RequestGuard* guard, const grpc::ServerContext& context, absl::string_view operation,
    const v1::KeyVersionRequest& request, v1::KeyRing* response, KeyService* keys,
    absl::StatusOr<v1::KeyRing> (KeyService::*method)(const v1::KeyVersionRequest&)) {
  Call call(guard, context, operation, request.ring());
  call.event().version = request.version();
  return call.Run(response, [&] { return (keys->*method)(request); });
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  if (HasCallerMessage(status)) {
    // Driver text, server paths: the log has them, the caller gets the short message.
    Log(LogLevel::kWarning, "call.failed",
        {{"code", absl::StatusCodeToString(status.code())},
         {"error", std::string(status.message())}});
  }
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), CallerMessage(status));
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

template <typename Request, typename Response>
grpc::ServerUnaryReactor* SignerService::ServeUnary(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request_bytes,
    grpc::ByteBuffer* response_bytes, const char* operation,
    grpc::Status (SignerService::*serve)(const grpc::ServerContextBase&, const Request&,
                                         Response*)) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto request = std::make_shared<Request>();
  grpc::ByteBuffer bytes(*request_bytes);  // shares the slices; the parser consumes its buffer
  if (grpc::Status parsed = v1::ParseRequest(&bytes, request.get()); !parsed.ok()) {
    RecordMalformedRequest(guard_, *context);
    reactor->Finish(parsed);
    return reactor;
  }
  auto run = [this, context, request, response_bytes, reactor, serve] {
    Response response;
    grpc::Status status = (this->*serve)(*context, *request, &response);
    if (status.ok()) {
      bool own_buffer;
      status =
          grpc::SerializationTraits<Response>::Serialize(response, response_bytes, &own_buffer);
    }
    reactor->Finish(status);
  };
  if (unary_pool_ == nullptr) {
    run();
  } else if (!unary_pool_->TrySubmit(run)) {
    Call call(guard_, *context, operation, request->ring());
    reactor->Finish(call.Finish(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("custodyd is busy: ", unary_pool_->max_queued(),
                     " calls are already waiting for a thread (--unary_queue); retry with "
                     "backoff"))));
  }
  return reactor;
}

grpc::ServerUnaryReactor* SignerService::SignJws(grpc::CallbackServerContext* context,
                                                 const grpc::ByteBuffer* request,
                                                 grpc::ByteBuffer* response) {
  return ServeUnary(context, request, response, kOpSign, &SignerService::SignJwsCall);
}

grpc::Status SignerService::SignJwsCall(const grpc::ServerContextBase& context,
                                        const v1::SignJwsRequest& request,
                                        v1::SignJwsResponse* response) {
  Call call(guard_, context, kOpSign, request.ring());
  call.event().payload_sha256 = Sha256Hex(request.payload());
  return call.Run(response, [&] { return keys_->SignJws(request); });
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

grpc::ServerUnaryReactor* SignerService::Sign(grpc::CallbackServerContext* context,
                                              const grpc::ByteBuffer* request,
                                              grpc::ByteBuffer* response) {
  return ServeUnary(context, request, response, kOpSign, &SignerService::SignCall);
}

grpc::Status SignerService::SignCall(const grpc::ServerContextBase& context,
                                     const v1::SignRequest& request, v1::SignResponse* response) {
  Call call(guard_, context, kOpSign, request.ring());
  call.event().payload_sha256 = Sha256Hex(request.has_digest() ? request.digest() : request.data());
  return call.Run(response, [&] { return keys_->Sign(request); });
}

grpc::Status SignerService::GetPublicKey(grpc::ServerContext* context,
                                         const v1::GetPublicKeyRequest* request,
                                         v1::PublicKey* response) {
  Call call(guard_, *context, kOpJwks, request->ring());
  return call.Run(response, [&] { return keys_->GetPublicKey(*request); });
}

grpc::ServerUnaryReactor* SignerService::DecryptJwe(grpc::CallbackServerContext* context,
                                                    const grpc::ByteBuffer* request,
                                                    grpc::ByteBuffer* response) {
  return ServeUnary(context, request, response, kOpDecrypt, &SignerService::DecryptJweCall);
}

grpc::Status SignerService::DecryptJweCall(const grpc::ServerContextBase& context,
                                           const v1::DecryptJweRequest& request,
                                           v1::DecryptJweResponse* response) {
  Call call(guard_, context, kOpDecrypt, request.ring());
  call.event().payload_sha256 = Sha256Hex(request.jwe());
  return call.Run(response, [&] { return keys_->DecryptJwe(request); });
}

absl::StatusOr<std::vector<std::string>> SignerService::JwksSelection(
    const google::protobuf::RepeatedPtrField<std::string>& asked) {
  std::vector<std::string> names;
  absl::flat_hash_set<absl::string_view> seen;
  for (const std::string& name : asked) {
    if (name.size() > kMaxRingNameBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("ring name '", BoundedForMessage(name), "' is ", name.size(),
                       " bytes long; the limit is ", kMaxRingNameBytes));
    }
    if (!seen.insert(name).second) continue;
    if (names.size() == kMaxJwksRings) {
      return absl::InvalidArgumentError(absl::StrCat(
          "more than ", kMaxJwksRings, " distinct ring names in one request (", asked.size(),
          " given); ask for at most ", kMaxJwksRings, " per call, or none for every ring"));
    }
    names.push_back(name);
  }
  return names;
}

absl::StatusOr<std::vector<std::string>> SignerService::JwksRings(
    const std::string& identity, const std::vector<std::string>& asked) {
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

absl::StatusOr<KeyService::Jwks> SignerService::BoundedJwks(
    const std::vector<std::string>& rings) const {
  // An empty selection after filtering is an empty set, not "every ring".
  if (rings.empty()) {
    static const auto* const kEmpty = new std::shared_ptr<const std::string>(
        std::make_shared<const std::string>("{\"keys\":[]}"));
    return KeyService::Jwks{*kEmpty, "", 0, keys_->JwksGeneration()};
  }
  absl::StatusOr<KeyService::Jwks> jwks = keys_->GetJwks(rings);
  if (jwks.ok() && jwks->json->size() > max_jwks_reply_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the JWKS of these ", rings.size(), " rings is ", jwks->json->size(),
                     " bytes; the reply limit is ", max_jwks_reply_bytes_,
                     " (--max_jwks_reply_bytes): ask for fewer rings per call"));
  }
  return jwks;
}

// The ring field of a jwks call's audit line: the names asked (bounded).
std::string SignerService::JwksAuditRings(
    const google::protobuf::RepeatedPtrField<std::string>& asked) {
  if (asked.size() <= 8) {
    std::vector<std::string> shown;
    for (const std::string& name : asked) shown.push_back(BoundedForMessage(name));
    return absl::StrJoin(shown, ",");
  }
  return absl::StrCat(BoundedForMessage(asked.Get(0)), ",...(", asked.size(), " names)");
}

grpc::Status SignerService::GetJwks(grpc::ServerContext* context, const v1::GetJwksRequest* request,
                                    v1::GetJwksResponse* response) {
  Call call(guard_, *context, kOpJwks, "");
  call.event().ring = JwksAuditRings(request->rings());
  auto asked = JwksSelection(request->rings());
  if (!asked.ok()) return call.Finish(ToGrpcStatus(asked.status()));
  auto rings = JwksRings(call.identity(), *asked);
  if (!rings.ok()) return call.Finish(ToGrpcStatus(rings.status()));
  auto jwks = BoundedJwks(*rings);
  if (!jwks.ok()) return call.Finish(ToGrpcStatus(jwks.status()));
  response->set_jwks(*jwks->json);
  response->set_etag(std::move(jwks->etag));
  response->set_max_age_seconds(jwks->max_age_seconds);
  return call.Finish(grpc::Status::OK);
}

grpc::Status SignerService::WatchJwks(grpc::ServerContext* context,
                                      const v1::WatchJwksRequest* request,
                                      grpc::ServerWriter<v1::GetJwksResponse>* writer) {
  Call call(guard_, *context, kOpJwks, "");
  call.event().ring = JwksAuditRings(request->rings());
  call.event().detail = "watch";
  auto asked = JwksSelection(request->rings());
  if (!asked.ok()) return call.Finish(ToGrpcStatus(asked.status()));
  auto rings = JwksRings(call.identity(), *asked);
  if (!rings.ok()) return call.Finish(ToGrpcStatus(rings.status()));
  // Each watcher holds a server thread for as long as it watches: bounded server-wide and per
  // caller, refused at once beyond (and the refusal audited like any other).
  absl::StatusOr<StreamQuota::Slot> slot = watch_quota_.Acquire(call.identity());
  if (!slot.ok()) return call.Finish(ToGrpcStatus(slot.status()));
  auto first = BoundedJwks(*rings);
  if (!first.ok()) return call.Finish(ToGrpcStatus(first.status()));
  // The subscription is what is audited; pushes are the same public keys, re-sent.
  if (grpc::Status s = call.Finish(grpc::Status::OK); !s.ok()) return s;
  // The key set is built once per generation and shared by every watcher of the same rings
  // (KeyService's cache); a watcher only holds a reference to the last one it sent.
  std::shared_ptr<const std::string> last_sent;
  absl::StatusOr<KeyService::Jwks> jwks = std::move(first);
  // "Every ring" (no names) means every ring now: the list is read again after each change, so a
  // ring created after the watch began is followed too. listed_at is the generation read before
  // the list (0 for the first list, whose generation is unknown: it is read again at once).
  uint64_t listed_at = request->rings().empty() ? 0 : std::numeric_limits<uint64_t>::max();
  for (;;) {
    if (!jwks.ok()) return ToGrpcStatus(jwks.status());
    // A change elsewhere wakes every watcher; only a change of these rings' keys is sent.
    if (last_sent == nullptr || *jwks->json != *last_sent) {
      v1::GetJwksResponse message;
      message.set_jwks(*jwks->json);
      message.set_etag(jwks->etag);
      message.set_max_age_seconds(jwks->max_age_seconds);
      if (!writer->Write(message)) return grpc::Status::OK;  // the watcher went away
      last_sent = jwks->json;
    }
    // Bounded waits so that cancellation and shutdown are noticed within a second; the set is
    // looked at again only when the generation moved.
    const uint64_t seen = std::min(listed_at, jwks->generation);
    uint64_t generation = seen;
    while (generation == seen) {
      if (context->IsCancelled() || keys_->draining()) return grpc::Status::OK;
      generation = keys_->WaitForJwksChange(seen, absl::Now() + absl::Seconds(1));
    }
    if (request->rings().empty()) {
      listed_at = keys_->JwksGeneration();
      rings = JwksRings(call.identity(), *asked);
      if (!rings.ok()) return ToGrpcStatus(rings.status());
    }
    jwks = BoundedJwks(*rings);
  }
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
  for (const std::string& name : all->untrusted_rings()) {
    if (guard_->Allows(call.identity(), kOpAdminRead, name)) response->add_untrusted_rings(name);
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
  return VersionCall(guard_, *context, kOpAdminRotate, *request, response, keys_,
                     &KeyService::DisableKeyVersion);
}

grpc::Status KeyAdminService::EnableKeyVersion(grpc::ServerContext* context,
                                               const v1::KeyVersionRequest* request,
                                               v1::KeyRing* response) {
  return VersionCall(guard_, *context, kOpAdminRotate, *request, response, keys_,
                     &KeyService::EnableKeyVersion);
}

grpc::Status KeyAdminService::ScheduleKeyVersionDestruction(grpc::ServerContext* context,
                                                            const v1::KeyVersionRequest* request,
                                                            v1::KeyRing* response) {
  return VersionCall(guard_, *context, kOpAdminDestroy, *request, response, keys_,
                     &KeyService::ScheduleKeyVersionDestruction);
}

grpc::Status KeyAdminService::CancelKeyVersionDestruction(grpc::ServerContext* context,
                                                          const v1::KeyVersionRequest* request,
                                                          v1::KeyRing* response) {
  return VersionCall(guard_, *context, kOpAdminDestroy, *request, response, keys_,
                     &KeyService::CancelKeyVersionDestruction);
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
