# cmake -DFILE=custody.grpc.pb.cc -P concrete_handlers.cmake: gRPC 1.51's generator instantiates
# the unary server handlers with MessageLite as the request and response type, so they would
# parse with gRPC's generic protobuf traits; with the concrete types (the handler's defaults)
# they parse with custody/v1/strict_requests.h's. Client stubs are left as generated.
file(READ ${FILE} text)
string(REPLACE
  ", ::grpc::protobuf::MessageLite, ::grpc::protobuf::MessageLite>(\n          [](" ">(\n          [](" text
  "${text}")
file(WRITE ${FILE} "${text}")
