// How custodyd parses custody.v1 requests. gRPC's default protobuf parsing turns a request with
// invalid UTF-8 in a string field into INTERNAL with an empty message, never reaches the handler
// (so nothing is audited) and lets protobuf print a non-JSON "[libprotobuf ERROR]" line. Each
// request type of the custody.v1 services gets this parser instead (the generated
// custody.grpc.pb.h includes this header, protoc's additional_header_includes): a request that
// does not parse is INVALID_ARGUMENT naming the field ("field 'requests[2].typ' is not valid
// UTF-8"), and so is a caller-set string over its length limit (256 bytes for typ, cty, alg,
// curve, digest_alg, decryption_mechanism; 1024 for every other short string; a JWE, PEM, JWK or
// JSON field is bounded by its operation instead); the value is never echoed. The refusal is
// left for the serving thread to audit (TakeMalformedRequest).
#ifndef CUSTODY_PROTO_STRICT_REQUESTS_H_
#define CUSTODY_PROTO_STRICT_REQUESTS_H_

#include <optional>
#include <string>
#include <vector>

#include "custody/v1/custody.pb.h"
#include "grpcpp/impl/codegen/proto_utils.h"

namespace custody::v1 {

// Parses `buffer` into `message`; on failure INVALID_ARGUMENT naming the first string field that
// is not valid UTF-8 (or saying the bytes are not a `message` at all), and remembers the
// refusal for this thread.
grpc::Status ParseRequest(grpc::ByteBuffer* buffer, google::protobuf::Message* message);

// The refusal ParseRequest remembered on this thread (the message type and the status message),
// cleared by taking it. custodyd's server callbacks audit it after gRPC has answered.
struct MalformedRequest {
  std::string type;     // "custody.v1.SignJwsRequest"
  std::string message;  // as sent to the caller
};
std::optional<MalformedRequest> TakeMalformedRequest();

// True while ParseRequest runs protobuf's parser on this thread: protobuf's own log line about
// the failure is then redundant (the refusal is answered and audited) and custodyd drops it.
bool ParsingRequestOnThisThread();

// The request types this parser covers (for the test that every RPC's request type is one).
const std::vector<std::string>& StrictRequestTypes();

}  // namespace custody::v1

namespace grpc {

#define CUSTODY_STRICT_REQUEST(T)                                                          \
  template <>                                                                              \
  class SerializationTraits<::custody::v1::T, void> {                                      \
   public:                                                                                 \
    static Status Serialize(const protobuf::MessageLite& msg, ByteBuffer* bb, bool* own) { \
      return GenericSerialize<ProtoBufferWriter, ::custody::v1::T>(msg, bb, own);          \
    }                                                                                      \
    static Status Deserialize(ByteBuffer* buffer, protobuf::MessageLite* msg) {            \
      return ::custody::v1::ParseRequest(buffer, static_cast<::custody::v1::T*>(msg));     \
    }                                                                                      \
  };

CUSTODY_STRICT_REQUEST(CreateKeyRingRequest)
CUSTODY_STRICT_REQUEST(GetKeyRingRequest)
CUSTODY_STRICT_REQUEST(ListKeyRingsRequest)
CUSTODY_STRICT_REQUEST(ImportKeyVersionRequest)
CUSTODY_STRICT_REQUEST(UpdateRotationPolicyRequest)
CUSTODY_STRICT_REQUEST(RotateKeyRingRequest)
CUSTODY_STRICT_REQUEST(KeyVersionRequest)
CUSTODY_STRICT_REQUEST(CompromiseKeyVersionRequest)
CUSTODY_STRICT_REQUEST(CreateCertificateRequestRequest)
CUSTODY_STRICT_REQUEST(SetCertificateRequest)
CUSTODY_STRICT_REQUEST(SignJwsRequest)
CUSTODY_STRICT_REQUEST(SignJwsBatchRequest)
CUSTODY_STRICT_REQUEST(SignRequest)
CUSTODY_STRICT_REQUEST(GetJwksRequest)
CUSTODY_STRICT_REQUEST(GetPublicKeyRequest)
CUSTODY_STRICT_REQUEST(DecryptJweRequest)
CUSTODY_STRICT_REQUEST(DecryptJweBatchRequest)
CUSTODY_STRICT_REQUEST(WatchJwksRequest)

#undef CUSTODY_STRICT_REQUEST

}  // namespace grpc

#endif  // CUSTODY_PROTO_STRICT_REQUESTS_H_
