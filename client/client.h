// Client: the C++ entry point to custodyd's Signer service, with per-call deadlines, retries of
// UNAVAILABLE failures (jittered exponential backoff) and grpc.health.v1 health checks.
//
// Thread-safe: one Client may be shared by many threads (gRPC stubs are thread-safe).
#ifndef CUSTODY_CLIENT_CLIENT_H_
#define CUSTODY_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "custody/client/channel.h"
#include "custody/client/coalescer.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace custody::client {

struct ClientOptions {
  // Overall deadline of one call, covering every attempt and the backoff between them.
  absl::Duration deadline = absl::Seconds(5);
  // Attempts per call: 0 (the default) retries until the deadline; n >= 1 makes at most n.
  // Only UNAVAILABLE is retried, and only by the calls of this class, which are all idempotent
  // (signing, decryption, reads): a retry goes to another replica when the channel has several
  // (round robin over the SERVING ones). Lifecycle calls (KeyAdmin) are never retried.
  int max_attempts = 0;
  // Backoff before attempt n+1 is initial_backoff * 2^(n-1), capped at max_backoff, each
  // multiplied by a random factor in [0.8, 1.2]; the last one is cut short so that one more
  // attempt fits before the deadline.
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(1);
  // SignJws (and DecryptJwe) calls made concurrently on one Client share RPCs
  // (client/coalescer.h): at most `max_rpcs_in_flight` SignJws/SignJwsBatch RPCs are
  // outstanding (as many again for decryption), and calls that arrive while they are all busy go
  // together in the next batch RPC (at most `max_batch_items`). No timer, so a lone caller sends
  // a plain call at once. 0 turns coalescing off: every call is its own RPC.
  int max_rpcs_in_flight = 2;
  int max_batch_items = 32;
};

struct SignJwsOptions {
  std::string typ;                // protected "typ", omitted when empty (e.g. "JWT", "dpop+jwt")
  std::string cty;                // protected "cty", omitted when empty
  std::string extra_header_json;  // extra protected members, a JSON object; "" for none
  // Embed the ring's own public JWK as "jwk" (DPoP). Needs SignJwsRequest field 6
  // (embed_jwk) in the compiled proto and a custodyd that honours it: UNIMPLEMENTED otherwise
  // (checked on the returned header, so an older custodyd that ignores the field is detected).
  bool embed_jwk = false;
};

struct SignedJws {
  std::string jws;  // compact serialization
  std::string kid;
  uint32_t version = 0;
  std::string alg;
};

struct Signature {
  std::string signature;  // JOSE encoding (r||s for ECDSA) unless the request asked for DER
  std::string kid;
  uint32_t version = 0;
  std::string alg;
};

struct DecryptedJwe {
  std::string plaintext;
  std::string protected_header;  // JSON
  std::string kid;
  uint32_t version = 0;
};

struct Jwks {
  std::string jwks;  // RFC 7517 JWK Set JSON
  std::string etag;
  int64_t max_age_seconds = 0;
};

// grpc::Status → absl::Status (the code spaces coincide numerically).
absl::Status ToAbslStatus(const grpc::Status& status);

class Client {
 public:
  using Options = ClientOptions;

  // Creates the channel (lazily connected: an unreachable server shows up as UNAVAILABLE on the
  // first call, not here). INVALID_ARGUMENT for bad options (empty address, max_attempts < 0),
  // FAILED_PRECONDITION for unreadable PEM files.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ChannelOptions& channel_options,
                                                         const Options& options = {});
  // Over an existing channel (tests, shared channels).
  static absl::StatusOr<std::unique_ptr<Client>> FromChannel(std::shared_ptr<grpc::Channel> channel,
                                                             const Options& options = {});

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Signer.SignJws with the ring's ACTIVE key.
  absl::StatusOr<SignedJws> SignJws(absl::string_view ring, absl::string_view payload,
                                    const SignJwsOptions& options = {}) const;
  // Signer.Sign over a digest computed with the ring's hash (not for EdDSA rings).
  absl::StatusOr<Signature> Sign(absl::string_view ring, absl::string_view digest) const;
  // Signer.Sign over a message (custodyd hashes it; EdDSA signs it directly).
  absl::StatusOr<Signature> SignData(absl::string_view ring, absl::string_view data) const;
  // Signer.Sign with every field of the request (digest_alg, DER encoding, RSA padding: what
  // TLS and X.509 need; the custody OpenSSL provider calls this).
  absl::StatusOr<Signature> Sign(const custody::v1::SignRequest& request) const;
  // Signer.GetPublicKey: a published version of a ring (0: the ACTIVE one).
  absl::StatusOr<custody::v1::PublicKey> GetPublicKey(absl::string_view ring,
                                                      uint32_t version = 0) const;
  // Signer.DecryptJwe of a compact JWE.
  absl::StatusOr<DecryptedJwe> DecryptJwe(absl::string_view ring, absl::string_view jwe) const;
  // Signer.GetJwks of `rings` (empty: every ring).
  absl::StatusOr<Jwks> GetJwks(const std::vector<std::string>& rings = {}) const;
  // The JWS alg of a SIGN ring, read from its published JWKS. NOT_FOUND when it has no key.
  absl::StatusOr<std::string> RingAlg(absl::string_view ring) const;

  // grpc.health.v1 Check of the whole server (service ""): OK when SERVING, UNAVAILABLE when
  // NOT_SERVING or unreachable. Not retried.
  absl::Status Health() const;

  const Options& options() const { return options_; }
  // How SignJws / DecryptJwe calls were sent (all zero when coalescing is off).
  CoalescingStats coalescing_stats() const;
  CoalescingStats decrypt_coalescing_stats() const;
  // For streaming calls (JwksCache) and callers that need another RPC.
  custody::v1::Signer::Stub& signer() const { return *signer_; }

  // Runs an idempotent RPC of the caller's own (e.g. KeyAdmin.GetKeyRing) with this client's
  // deadline and retry policy: `rpc(ctx)` is called with a fresh context per attempt. Never for
  // a lifecycle call: its first attempt may have committed.
  absl::Status CallIdempotent(const std::function<grpc::Status(grpc::ClientContext&)>& rpc) const;
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  Client(std::shared_ptr<grpc::Channel> channel, const Options& options);

  // Runs `rpc(ctx)` until it returns anything but UNAVAILABLE, max_attempts is reached or the
  // overall deadline has passed.
  template <typename Rpc>
  absl::Status Retry(Rpc rpc) const {
    return Retry(rpc, absl::Now() + options_.deadline);
  }
  template <typename Rpc>
  absl::Status Retry(Rpc rpc, absl::Time deadline) const;
  // One SignJws / DecryptJwe RPC with retries, bounded by `deadline`.
  absl::StatusOr<custody::v1::SignJwsResponse> PlainSignJws(
      const custody::v1::SignJwsRequest& request, absl::Time deadline) const;
  absl::StatusOr<custody::v1::DecryptJweResponse> PlainDecryptJwe(
      const custody::v1::DecryptJweRequest& request, absl::Time deadline) const;

  std::shared_ptr<grpc::Channel> channel_;
  Options options_;
  std::unique_ptr<custody::v1::Signer::Stub> signer_;
  std::unique_ptr<SignJwsCoalescer> coalescer_;  // null when coalescing is off
  std::unique_ptr<DecryptJweCoalescer> decrypt_coalescer_;
};

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_CLIENT_H_
