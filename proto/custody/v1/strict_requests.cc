#include "custody/v1/strict_requests.h"

#include <map>
#include <string>
#include <utility>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/impl/codegen/proto_buffer_reader.h"

namespace custody::v1 {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::internal::WireFormatLite;

thread_local std::optional<MalformedRequest> t_malformed;

// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF (what protobuf
// enforces on proto3 string fields).
bool IsValidUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const unsigned char* end = p + s.size();
  while (p < end) {
    unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    int n;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (end - p <= n) return false;
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (n == 3 && (cp < 0x10000 || cp > 0x10FFFF))) {
      return false;
    }
    p += n + 1;
  }
  return true;
}

// The path of the first string field of `bytes` (a serialized `type`) that is not valid UTF-8,
// e.g. "requests[2].typ"; false when there is none or the bytes are not well-formed.
bool FindInvalidUtf8(const Descriptor* type, const std::string& bytes, const std::string& prefix,
                     int depth, std::string* path) {
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  std::map<int, int> occurrences;  // of each field number, for the index of repeated fields
  while (uint32_t tag = in.ReadTag()) {
    const FieldDescriptor* field = type->FindFieldByNumber(WireFormatLite::GetTagFieldNumber(tag));
    if (WireFormatLite::GetTagWireType(tag) != WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::SkipField(&in, tag)) return false;
      continue;
    }
    uint32_t length = 0;
    std::string value;
    if (!in.ReadVarint32(&length) || !in.ReadString(&value, static_cast<int>(length))) return false;
    if (field == nullptr) continue;
    std::string name = prefix + field->name();
    const int index = occurrences[field->number()]++;
    if (field->is_repeated()) name += "[" + std::to_string(index) + "]";
    if (field->type() == FieldDescriptor::TYPE_STRING && !IsValidUtf8(value)) {
      *path = std::move(name);
      return true;
    }
    if (field->type() == FieldDescriptor::TYPE_MESSAGE && depth < 32 &&
        FindInvalidUtf8(field->message_type(), value, name + ".", depth + 1, path)) {
      return true;
    }
  }
  return false;
}

thread_local bool t_parsing = false;

// Caller-set strings whose size is bounded by the operation itself (the 4 MiB receive limit and
// each operation's own limit, e.g. --max_extra_header_bytes): a JWE, PEM, a JWK, JSON.
bool IsBulkField(const std::string& name) {
  return name == "jwe" || name == "extra_header_json" || name == "chain_pem" ||
         name == "private_jwk" || name == "pkcs8_pem";
}

// Every other caller-set string is short: names, algorithms, header values, a reason.
size_t LengthLimit(const std::string& name) {
  if (name == "typ" || name == "cty" || name == "alg" || name == "curve" || name == "digest_alg" ||
      name == "decryption_mechanism") {
    return 256;
  }
  return 1024;
}

// The first string field over its limit: "field 'requests[0].typ' is N bytes long; the limit
// is 256" (the value itself is never echoed).
bool FindOverLongString(const google::protobuf::Message& message, const std::string& prefix,
                        int depth, std::string* error) {
  const google::protobuf::Reflection* reflection = message.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  reflection->ListFields(message, &fields);
  for (const FieldDescriptor* field : fields) {
    const int n = field->is_repeated() ? reflection->FieldSize(message, field) : 1;
    for (int i = 0; i < n; ++i) {
      const std::string name =
          prefix + field->name() + (field->is_repeated() ? "[" + std::to_string(i) + "]" : "");
      if (field->type() == FieldDescriptor::TYPE_STRING && !IsBulkField(field->name())) {
        std::string scratch;
        const std::string& value =
            field->is_repeated()
                ? reflection->GetRepeatedStringReference(message, field, i, &scratch)
                : reflection->GetStringReference(message, field, &scratch);
        if (value.size() > LengthLimit(field->name())) {
          *error = "field '" + name + "' is " + std::to_string(value.size()) +
                   " bytes long; the limit is " + std::to_string(LengthLimit(field->name()));
          return true;
        }
      } else if (field->type() == FieldDescriptor::TYPE_MESSAGE && depth < 32) {
        const google::protobuf::Message& sub =
            field->is_repeated() ? reflection->GetRepeatedMessage(message, field, i)
                                 : reflection->GetMessage(message, field);
        if (FindOverLongString(sub, name + ".", depth + 1, error)) return true;
      }
    }
  }
  return false;
}

}  // namespace

bool ParsingRequestOnThisThread() { return t_parsing; }

grpc::Status ParseRequest(grpc::ByteBuffer* buffer, google::protobuf::Message* message) {
  if (buffer == nullptr) return grpc::Status(grpc::StatusCode::INTERNAL, "No payload");
  bool parsed = false;
  {
    grpc::ProtoBufferReader reader(buffer);
    if (!reader.status().ok()) return reader.status();
    t_parsing = true;
    parsed = message->ParseFromZeroCopyStream(&reader);
    t_parsing = false;
  }
  const std::string& type = message->GetDescriptor()->full_name();
  if (parsed) {
    buffer->Clear();
    std::string error;
    if (!FindOverLongString(*message, "", 0, &error)) return grpc::Status::OK;
    t_malformed = MalformedRequest{type, error};
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, error);
  }
  // Only on failure: read the bytes again to say which field it was.
  std::string bytes;
  {
    grpc::ProtoBufferReader reader(buffer);
    const void* data = nullptr;
    int size = 0;
    while (reader.Next(&data, &size)) bytes.append(static_cast<const char*>(data), size);
  }
  buffer->Clear();
  std::string path;
  std::string text = FindInvalidUtf8(message->GetDescriptor(), bytes, "", 0, &path)
                         ? "field '" + path + "' is not valid UTF-8"
                         : "the request is not a valid " + type + " message";
  t_malformed = MalformedRequest{type, text};
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, text);
}

std::optional<MalformedRequest> TakeMalformedRequest() {
  std::optional<MalformedRequest> taken = std::move(t_malformed);
  t_malformed.reset();
  return taken;
}

const std::vector<std::string>& StrictRequestTypes() {
  static const auto* const kTypes = new std::vector<std::string>{
      "CreateKeyRingRequest",
      "GetKeyRingRequest",
      "ListKeyRingsRequest",
      "ImportKeyVersionRequest",
      "UpdateRotationPolicyRequest",
      "RotateKeyRingRequest",
      "KeyVersionRequest",
      "CompromiseKeyVersionRequest",
      "CreateCertificateRequestRequest",
      "SetCertificateRequest",
      "SignJwsRequest",
      "SignJwsBatchRequest",
      "SignRequest",
      "GetJwksRequest",
      "GetPublicKeyRequest",
      "DecryptJweRequest",
      "DecryptJweBatchRequest",
      "WatchJwksRequest",
  };
  return *kTypes;
}

}  // namespace custody::v1
