// gRPC front of KeyService: translation only (proto in, proto out, absl::Status → grpc::Status
// in one place), with every call authorized and audited through the RequestGuard.
#ifndef CUSTODY_SERVER_GRPC_GRPC_SERVICES_H_
#define CUSTODY_SERVER_GRPC_GRPC_SERVICES_H_

#include "absl/status/status.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc/batch_runner.h"
#include "server/grpc/request_guard.h"
#include "server/grpc/stream_quota.h"
#include "server/grpc/unary_pool.h"
#include "server/keys/key_service.h"

namespace custody::server {

// The one mapping from library status to wire status. Codes carry over one to one; DATA_LOSS
// and INTERNAL keep their message (it names the CKR code or the store error, never secrets).
grpc::Status ToGrpcStatus(const absl::Status& status);

// Operations as the access policy names them.
inline constexpr char kOpSign[] = "sign";
inline constexpr char kOpDecrypt[] = "decrypt";
inline constexpr char kOpJwks[] = "jwks";
inline constexpr char kOpAdminRead[] = "admin.read";
inline constexpr char kOpAdminCreate[] = "admin.create";
inline constexpr char kOpAdminImport[] = "admin.import";
inline constexpr char kOpAdminRotate[] = "admin.rotate";
inline constexpr char kOpAdminDestroy[] = "admin.destroy";
inline constexpr char kOpAdminCertificate[] = "admin.certificate";

// What one caller can make GetJwks and WatchJwks cost (docs/api.md "Limits").
struct JwksLimits {
  // A reply larger than this is RESOURCE_EXHAUSTED (the client's default receive limit).
  size_t max_reply_bytes = 4 * 1024 * 1024;
  // Concurrent WatchJwks streams, server-wide and per caller identity; each holds a thread.
  int max_watch_streams = 256;
  int max_watch_streams_per_caller = 16;
};

// The hot unary RPCs (SignJws, Sign, DecryptJwe) are served with gRPC's callback API, raw:
// custodyd parses the request itself, so that a malformed one is INVALID_ARGUMENT and audited as
// on the sync methods, and runs the call on a UnaryPool thread. The other methods use the sync
// server's thread pool.
using SignerBase = v1::Signer::WithRawCallbackMethod_SignJws<v1::Signer::WithRawCallbackMethod_Sign<
    v1::Signer::WithRawCallbackMethod_DecryptJwe<v1::Signer::Service>>>;

class SignerService final : public SignerBase {
 public:
  // Batch RPCs with more than this many items are refused (INVALID_ARGUMENT).
  static constexpr int kDefaultMaxBatchItems = 64;

  using JwksLimits = server::JwksLimits;

  // `runner` (may be null: items run in order on the handler thread) must outlive the service.
  SignerService(const KeyService* keys, RequestGuard* guard,
                int max_batch_items = kDefaultMaxBatchItems, BatchRunner* runner = nullptr,
                JwksLimits jwks_limits = JwksLimits{}, UnaryPool* unary_pool = nullptr)
      : keys_(keys),
        guard_(guard),
        max_batch_items_(max_batch_items),
        runner_(runner),
        max_jwks_reply_bytes_(jwks_limits.max_reply_bytes),
        watch_quota_("WatchJwks", jwks_limits.max_watch_streams,
                     jwks_limits.max_watch_streams_per_caller),
        unary_pool_(unary_pool) {}
  // SignJws, Sign and DecryptJwe: parsed on gRPC's callback thread, then authorized, run and
  // audited on a UnaryPool thread (on gRPC's callback thread when there is no pool);
  // RESOURCE_EXHAUSTED, audited, when the pool's queue is full.
  grpc::ServerUnaryReactor* SignJws(grpc::CallbackServerContext* context,
                                    const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  // Each item as a SignJws of its own (authorized, signed, one audit line), on this thread or,
  // when the items are slow, spread over the BatchRunner's helpers; the reply waits for one
  // group commit of all the lines.
  grpc::Status SignJwsBatch(grpc::ServerContext* context, const v1::SignJwsBatchRequest* request,
                            v1::SignJwsBatchResponse* response) override;
  grpc::ServerUnaryReactor* Sign(grpc::CallbackServerContext* context,
                                 const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;
  grpc::Status GetJwks(grpc::ServerContext* context, const v1::GetJwksRequest* request,
                       v1::GetJwksResponse* response) override;
  grpc::Status GetPublicKey(grpc::ServerContext* context, const v1::GetPublicKeyRequest* request,
                            v1::PublicKey* response) override;
  grpc::ServerUnaryReactor* DecryptJwe(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  // As SignJwsBatch, for DecryptJwe items (each failure the same "decryption failed").
  grpc::Status DecryptJweBatch(grpc::ServerContext* context,
                               const v1::DecryptJweBatchRequest* request,
                               v1::DecryptJweBatchResponse* response) override;
  // Holds one server thread per watcher (bounded by JwksLimits); the JWKS is re-sent when the
  // published set changes.
  grpc::Status WatchJwks(grpc::ServerContext* context, const v1::WatchJwksRequest* request,
                         grpc::ServerWriter<v1::GetJwksResponse>* writer) override;

 private:
  // A batch RPC: each item authorized for the caller, run with `run`, audited on its own line
  // (payload_sha256 of `content_of(item)`), all lines in one group commit; INVALID_ARGUMENT for
  // more than max_batch_items_ items.
  template <typename Request, typename Result, typename ContentOf, typename Operation>
  grpc::Status RunBatch(const grpc::ServerContext& context, const char* operation,
                        const google::protobuf::RepeatedPtrField<Request>& items,
                        google::protobuf::RepeatedPtrField<Result>* results, ContentOf content_of,
                        Operation run);
  // The names a jwks call asks for, duplicates removed; INVALID_ARGUMENT for a name longer than
  // a ring name can be or more than 256 distinct names.
  static absl::StatusOr<std::vector<std::string>> JwksSelection(
      const google::protobuf::RepeatedPtrField<std::string>& asked);
  // The bounded ring field of a jwks call's audit line.
  static std::string JwksAuditRings(const google::protobuf::RepeatedPtrField<std::string>& asked);
  // The rings a jwks call covers: the asked ones (each must be granted), or every ring the
  // caller may read when none is asked.
  absl::StatusOr<std::vector<std::string>> JwksRings(const std::string& identity,
                                                     const std::vector<std::string>& asked);
  // The (shared) JWKS of `rings`; RESOURCE_EXHAUSTED when larger than max_jwks_reply_bytes_.
  absl::StatusOr<KeyService::Jwks> BoundedJwks(const std::vector<std::string>& rings) const;

  // A callback-API unary RPC: `request` parsed with custody's strict parser (a malformed one
  // refused and audited), `(this->*serve)(context, request, &response)` run on the pool, the
  // reply serialized into `response_bytes`.
  template <typename Request, typename Response>
  grpc::ServerUnaryReactor* ServeUnary(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* request_bytes,
      grpc::ByteBuffer* response_bytes, const char* operation,
      grpc::Status (SignerService::*serve)(const grpc::ServerContextBase&, const Request&,
                                           Response*));
  // The calls themselves, as the sync handlers ran them.
  grpc::Status SignJwsCall(const grpc::ServerContextBase& context,
                           const v1::SignJwsRequest& request, v1::SignJwsResponse* response);
  grpc::Status SignCall(const grpc::ServerContextBase& context, const v1::SignRequest& request,
                        v1::SignResponse* response);
  grpc::Status DecryptJweCall(const grpc::ServerContextBase& context,
                              const v1::DecryptJweRequest& request,
                              v1::DecryptJweResponse* response);

  const KeyService* const keys_;
  RequestGuard* const guard_;
  const int max_batch_items_;
  BatchRunner* const runner_;
  const size_t max_jwks_reply_bytes_;
  StreamQuota watch_quota_;
  UnaryPool* const unary_pool_;
};

class KeyAdminService final : public v1::KeyAdmin::Service {
 public:
  KeyAdminService(KeyService* keys, RequestGuard* guard) : keys_(keys), guard_(guard) {}
  grpc::Status CreateKeyRing(grpc::ServerContext* context, const v1::CreateKeyRingRequest* request,
                             v1::KeyRing* response) override;
  grpc::Status GetKeyRing(grpc::ServerContext* context, const v1::GetKeyRingRequest* request,
                          v1::KeyRing* response) override;
  grpc::Status ListKeyRings(grpc::ServerContext* context, const v1::ListKeyRingsRequest* request,
                            v1::ListKeyRingsResponse* response) override;
  grpc::Status ImportKeyVersion(grpc::ServerContext* context,
                                const v1::ImportKeyVersionRequest* request,
                                v1::KeyRing* response) override;
  grpc::Status UpdateRotationPolicy(grpc::ServerContext* context,
                                    const v1::UpdateRotationPolicyRequest* request,
                                    v1::KeyRing* response) override;
  grpc::Status RotateKeyRing(grpc::ServerContext* context, const v1::RotateKeyRingRequest* request,
                             v1::RotateKeyRingResponse* response) override;
  grpc::Status DisableKeyVersion(grpc::ServerContext* context, const v1::KeyVersionRequest* request,
                                 v1::KeyRing* response) override;
  grpc::Status EnableKeyVersion(grpc::ServerContext* context, const v1::KeyVersionRequest* request,
                                v1::KeyRing* response) override;
  grpc::Status ScheduleKeyVersionDestruction(grpc::ServerContext* context,
                                             const v1::KeyVersionRequest* request,
                                             v1::KeyRing* response) override;
  grpc::Status CancelKeyVersionDestruction(grpc::ServerContext* context,
                                           const v1::KeyVersionRequest* request,
                                           v1::KeyRing* response) override;
  grpc::Status CreateCertificateRequest(grpc::ServerContext* context,
                                        const v1::CreateCertificateRequestRequest* request,
                                        v1::CertificateRequest* response) override;
  grpc::Status SetCertificate(grpc::ServerContext* context,
                              const v1::SetCertificateRequest* request,
                              v1::KeyRing* response) override;
  grpc::Status CompromiseKeyVersion(grpc::ServerContext* context,
                                    const v1::CompromiseKeyVersionRequest* request,
                                    v1::KeyRing* response) override;

 private:
  KeyService* const keys_;
  RequestGuard* const guard_;
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_GRPC_SERVICES_H_
