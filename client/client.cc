#include "client/client.h"

#include <algorithm>
#include <random>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "jose/base64url.h"
#include "jose/json.h"

namespace custody::client {
namespace {

double Jitter() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.8, 1.2)(rng);
}

// Sets SignJwsRequest.embed_jwk through reflection, so that this file compiles against a proto
// with or without field 6. UNIMPLEMENTED when the field is absent.
absl::Status SetEmbedJwk(custody::v1::SignJwsRequest& req) {
  const google::protobuf::FieldDescriptor* field = req.GetDescriptor()->FindFieldByNumber(6);
  if (field == nullptr || field->name() != "embed_jwk" ||
      field->type() != google::protobuf::FieldDescriptor::TYPE_BOOL || field->is_repeated()) {
    return absl::UnimplementedError(
        "embed_jwk: this build's custody.proto has no SignJwsRequest.embed_jwk (field 6)");
  }
  req.GetReflection()->SetBool(&req, field, true);
  return absl::OkStatus();
}

absl::StatusOr<jose::Json> ProtectedHeader(std::string_view jws) {
  size_t dot = jws.find('.');
  if (dot == std::string_view::npos) return absl::InvalidArgumentError("not a compact JWS");
  auto raw = jose::Base64UrlDecode(jws.substr(0, dot));
  if (!raw.ok()) return raw.status();
  return jose::ParseJson(*raw);
}

template <typename C>
std::unique_ptr<C> MakeCoalescer(custody::v1::Signer::Stub* stub, const ClientOptions& options,
                                 typename C::Plain plain) {
  typename C::Options coalescing;
  coalescing.max_in_flight = options.max_rpcs_in_flight;
  coalescing.max_items = options.max_batch_items;
  return std::make_unique<C>(stub, coalescing, std::move(plain));
}

}  // namespace

absl::Status ToAbslStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

Client::Client(std::shared_ptr<grpc::Channel> channel, const Options& options)
    : channel_(std::move(channel)),
      options_(options),
      signer_(custody::v1::Signer::NewStub(channel_)) {
  if (options_.max_rpcs_in_flight > 0) {
    coalescer_ = MakeCoalescer<SignJwsCoalescer>(
        signer_.get(), options_,
        [this](const custody::v1::SignJwsRequest& request, absl::Time deadline) {
          return PlainSignJws(request, deadline);
        });
    decrypt_coalescer_ = MakeCoalescer<DecryptJweCoalescer>(
        signer_.get(), options_,
        [this](const custody::v1::DecryptJweRequest& request, absl::Time deadline) {
          return PlainDecryptJwe(request, deadline);
        });
  }
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ChannelOptions& channel_options,
                                                        const Options& options) {
  auto channel = CreateChannel(channel_options);
  if (!channel.ok()) return channel.status();
  return FromChannel(*std::move(channel), options);
}

absl::StatusOr<std::unique_ptr<Client>> Client::FromChannel(std::shared_ptr<grpc::Channel> channel,
                                                            const Options& options) {
  if (channel == nullptr) return absl::InvalidArgumentError("null channel");
  if (options.max_attempts < 0) {
    return absl::InvalidArgumentError("max_attempts must be >= 0 (0: until the deadline)");
  }
  if (options.deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("deadline must be positive");
  }
  if (options.max_rpcs_in_flight < 0 || options.max_batch_items < 1) {
    return absl::InvalidArgumentError("max_rpcs_in_flight must be >= 0, max_batch_items >= 1");
  }
  return std::unique_ptr<Client>(new Client(std::move(channel), options));
}

template <typename Rpc>
absl::Status Client::Retry(Rpc rpc, absl::Time deadline) const {
  absl::Duration backoff = options_.initial_backoff;
  absl::Status status;
  absl::Status unavailable;  // the last attempt that found no replica
  int attempt = 1;
  for (;; ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    status = ToAbslStatus(rpc(ctx));
    if (status.code() == absl::StatusCode::kUnavailable) unavailable = status;
    if (status.code() != absl::StatusCode::kUnavailable ||
        (options_.max_attempts > 0 && attempt >= options_.max_attempts)) {
      break;
    }
    // Until the deadline: the last backoff is shortened to leave the next attempt half of
    // what remains (an attempt that finds no replica ready fails at once; one that finds a
    // replica coming up waits for it until the deadline).
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::Milliseconds(1)) break;
    absl::SleepFor(std::min(std::min(backoff, options_.max_backoff) * Jitter(), left / 2));
    backoff *= 2;
  }
  // Retries that ran out of time while no replica answered: the cause is UNAVAILABLE (what the
  // caller must act on), not the deadline the last attempt happened to end at.
  if (status.code() == absl::StatusCode::kDeadlineExceeded && !unavailable.ok()) {
    return absl::UnavailableError(
        absl::StrCat(unavailable.message(), " (", attempt, " attempts until the deadline)"));
  }
  return status;
}

absl::Status Client::CallIdempotent(
    const std::function<grpc::Status(grpc::ClientContext&)>& rpc) const {
  return Retry(rpc);
}

absl::StatusOr<SignedJws> Client::SignJws(absl::string_view ring, absl::string_view payload,
                                          const SignJwsOptions& options) const {
  custody::v1::SignJwsRequest req;
  req.set_ring(std::string(ring));
  req.set_payload(std::string(payload));
  req.set_typ(options.typ);
  req.set_cty(options.cty);
  req.set_extra_header_json(options.extra_header_json);
  if (options.embed_jwk) {
    if (absl::Status s = SetEmbedJwk(req); !s.ok()) return s;
  }
  const absl::Time deadline = absl::Now() + options_.deadline;
  absl::StatusOr<custody::v1::SignJwsResponse> signed_jws =
      coalescer_ != nullptr ? coalescer_->Call(req, deadline) : PlainSignJws(req, deadline);
  if (!signed_jws.ok()) return signed_jws.status();
  const custody::v1::SignJwsResponse& resp = *signed_jws;
  if (options.embed_jwk) {
    auto header = ProtectedHeader(resp.jws());
    if (!header.ok()) return header.status();
    if (header->Find("jwk") == nullptr) {
      return absl::UnimplementedError("embed_jwk: custodyd did not embed the jwk (too old?)");
    }
  }
  return SignedJws{resp.jws(), resp.kid(), resp.version(), resp.alg()};
}

absl::StatusOr<custody::v1::SignJwsResponse> Client::PlainSignJws(
    const custody::v1::SignJwsRequest& request, absl::Time deadline) const {
  custody::v1::SignJwsResponse resp;
  absl::Status s = Retry(
      [&](grpc::ClientContext& ctx) { return signer_->SignJws(&ctx, request, &resp); }, deadline);
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<custody::v1::DecryptJweResponse> Client::PlainDecryptJwe(
    const custody::v1::DecryptJweRequest& request, absl::Time deadline) const {
  custody::v1::DecryptJweResponse resp;
  absl::Status s =
      Retry([&](grpc::ClientContext& ctx) { return signer_->DecryptJwe(&ctx, request, &resp); },
            deadline);
  if (!s.ok()) return s;
  return resp;
}

CoalescingStats Client::coalescing_stats() const {
  return coalescer_ != nullptr ? coalescer_->stats() : CoalescingStats{};
}

CoalescingStats Client::decrypt_coalescing_stats() const {
  return decrypt_coalescer_ != nullptr ? decrypt_coalescer_->stats() : CoalescingStats{};
}

absl::StatusOr<Signature> Client::Sign(absl::string_view ring, absl::string_view digest) const {
  custody::v1::SignRequest req;
  req.set_ring(std::string(ring));
  req.set_digest(std::string(digest));
  return Sign(req);
}

absl::StatusOr<Signature> Client::Sign(const custody::v1::SignRequest& request) const {
  custody::v1::SignResponse resp;
  absl::Status s =
      Retry([&](grpc::ClientContext& ctx) { return signer_->Sign(&ctx, request, &resp); });
  if (!s.ok()) return s;
  return Signature{resp.signature(), resp.kid(), resp.version(), resp.alg()};
}

absl::StatusOr<custody::v1::PublicKey> Client::GetPublicKey(absl::string_view ring,
                                                            uint32_t version) const {
  custody::v1::GetPublicKeyRequest req;
  req.set_ring(std::string(ring));
  req.set_version(version);
  custody::v1::PublicKey resp;
  absl::Status s =
      Retry([&](grpc::ClientContext& ctx) { return signer_->GetPublicKey(&ctx, req, &resp); });
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<Signature> Client::SignData(absl::string_view ring, absl::string_view data) const {
  custody::v1::SignRequest req;
  req.set_ring(std::string(ring));
  req.set_data(std::string(data));
  return Sign(req);
}

absl::StatusOr<DecryptedJwe> Client::DecryptJwe(absl::string_view ring,
                                                absl::string_view jwe) const {
  custody::v1::DecryptJweRequest req;
  req.set_ring(std::string(ring));
  req.set_jwe(std::string(jwe));
  const absl::Time deadline = absl::Now() + options_.deadline;
  absl::StatusOr<custody::v1::DecryptJweResponse> resp =
      decrypt_coalescer_ != nullptr ? decrypt_coalescer_->Call(req, deadline)
                                    : PlainDecryptJwe(req, deadline);
  if (!resp.ok()) return resp.status();
  return DecryptedJwe{std::move(*resp->mutable_plaintext()), resp->protected_header(), resp->kid(),
                      resp->version()};
}

absl::StatusOr<Jwks> Client::GetJwks(const std::vector<std::string>& rings) const {
  custody::v1::GetJwksRequest req;
  for (const std::string& r : rings) req.add_rings(r);
  custody::v1::GetJwksResponse resp;
  absl::Status s =
      Retry([&](grpc::ClientContext& ctx) { return signer_->GetJwks(&ctx, req, &resp); });
  if (!s.ok()) return s;
  return Jwks{resp.jwks(), resp.etag(), resp.max_age_seconds()};
}

absl::StatusOr<std::string> Client::RingAlg(absl::string_view ring) const {
  auto jwks = GetJwks({std::string(ring)});
  if (!jwks.ok()) return jwks.status();
  auto set = jose::ParseJson(jwks->jwks);
  if (!set.ok()) return set.status();
  const jose::Json* keys = set->Find("keys");
  if (keys != nullptr) {
    for (const jose::Json& k : keys->as_array()) {
      const jose::Json* alg = k.Find("alg");
      if (alg != nullptr && alg->is_string()) return alg->as_string();
    }
  }
  return absl::NotFoundError(absl::StrCat("ring ", ring, " publishes no key with an alg"));
}

absl::Status Client::Health() const {
  auto stub = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  absl::Status s = ToAbslStatus(stub->Check(&ctx, req, &resp));
  if (!s.ok()) return s;
  if (resp.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError(
        absl::StrCat("custodyd health: ",
                     grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status())));
  }
  return absl::OkStatus();
}

}  // namespace custody::client
