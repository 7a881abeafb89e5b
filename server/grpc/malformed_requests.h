// Requests that do not parse (invalid UTF-8 in a string field, or not a custody.v1 message at
// all): custody.v1's request parser (custody/v1/strict_requests.h) answers them
// INVALID_ARGUMENT naming the field before any handler runs; this audits them. gRPC calls the
// server's global callbacks on the thread that parsed the request, after the refusal was sent,
// so each refusal leaves an audit line ("operation":"malformed", the request type and the field
// in "detail") like every other call. And protobuf's own log lines go to custodyd's JSON log,
// except the one about the refused request (it would say the same, unstructured, per request).
#ifndef CUSTODY_SERVER_GRPC_MALFORMED_REQUESTS_H_
#define CUSTODY_SERVER_GRPC_MALFORMED_REQUESTS_H_

#include "server/grpc/request_guard.h"

namespace custody::server {

inline constexpr char kOpMalformed[] = "malformed";

// Installs both, once per process, before the gRPC server is built. `guard` must outlive every
// gRPC server of the process.
void AuditMalformedRequests(RequestGuard* guard);

// The same record for a method served with gRPC's callback API, which parses its request itself
// (custody.v1's parser) on the calling thread: audits the refusal that parse left on this thread,
// if any.
void RecordMalformedRequest(RequestGuard* guard, const grpc::ServerContextBase& context);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_MALFORMED_REQUESTS_H_
