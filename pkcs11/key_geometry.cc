// What custody knows of each KeyType: its CKA_EC_PARAMS encodings, point and signature sizes and
// OpenSSL group name, and how a KeySpec is read back from a key's attributes (modulus, curve).
// The one table to extend when a curve is added.
#include <string>
#include <string_view>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

// DER-encoded CKA_EC_PARAMS values (namedCurve OIDs; RFC 8410 id-Ed25519).
constexpr std::string_view kP256Oid("\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07", 10);
constexpr std::string_view kP384Oid("\x06\x05\x2b\x81\x04\x00\x22", 7);
constexpr std::string_view kP521Oid("\x06\x05\x2b\x81\x04\x00\x23", 7);
constexpr std::string_view kEd25519Oid("\x06\x03\x2b\x65\x70", 5);

}  // namespace

const std::string_view kEd25519Name(
    "\x13\x0c"
    "edwards25519",
    14);

const KeyGeometry& GeometryOf(KeyType type) {
  static const KeyGeometry kP256{65, 64, kP256Oid, "prime256v1"};
  static const KeyGeometry kP384{97, 96, kP384Oid, "secp384r1"};
  static const KeyGeometry kP521{133, 132, kP521Oid, "secp521r1"};
  static const KeyGeometry kEd25519{32, 64, kEd25519Oid, nullptr};
  static const KeyGeometry kRsa{};
  switch (type) {
    case KeyType::kEcP256:
      return kP256;
    case KeyType::kEcP384:
      return kP384;
    case KeyType::kEcP521:
      return kP521;
    case KeyType::kEd25519:
      return kEd25519;
    case KeyType::kRsa:
      return kRsa;
  }
  return kRsa;
}

bool IsEc(KeyType type) {
  return type == KeyType::kEcP256 || type == KeyType::kEcP384 || type == KeyType::kEcP521;
}

size_t SignatureSize(const KeySpec& spec) {
  if (spec.type != KeyType::kRsa) return GeometryOf(spec.type).signature_size;
  // An unknown size is corrected by CKR_BUFFER_TOO_SMALL (see Sign).
  return spec.rsa_bits > 0 ? static_cast<size_t>(spec.rsa_bits + 7) / 8 : 512;
}

// CKA_MODULUS_BITS lives on the public key only; the modulus is public on both.
absl::StatusOr<KeySpec> RsaSpec(std::string_view modulus) {
  size_t first = modulus.find_first_not_of('\0');
  if (first == std::string_view::npos) return absl::InternalError("RSA key with a zero modulus");
  int bits = static_cast<int>(modulus.size() - first) * 8;
  for (unsigned char top = modulus[first]; (top & 0x80) == 0; top <<= 1) --bits;
  return KeySpec{.type = KeyType::kRsa, .rsa_bits = bits};
}

absl::StatusOr<KeySpec> EcSpec(std::string_view params) {
  KeySpec spec;
  if (params == kP256Oid) {
    spec.type = KeyType::kEcP256;
  } else if (params == kP384Oid) {
    spec.type = KeyType::kEcP384;
  } else if (params == kP521Oid) {
    spec.type = KeyType::kEcP521;
  } else if (params == kEd25519Oid || params == kEd25519Name) {
    spec.type = KeyType::kEd25519;
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat("unsupported CKA_EC_PARAMS ",
                     absl::BytesToHexString(absl::string_view(params.data(), params.size()))));
  }
  return spec;
}

std::string DerOctetString(std::string_view content) {
  std::string out(1, '\x04');
  const size_t size = content.size();
  if (size < 0x80) {
    out.push_back(static_cast<char>(size));
  } else if (size <= 0xff) {
    out.push_back('\x81');
    out.push_back(static_cast<char>(size));
  } else {
    out.push_back('\x82');
    out.push_back(static_cast<char>(size >> 8));
    out.push_back(static_cast<char>(size & 0xff));
  }
  out.append(content);
  return out;
}

}  // namespace custody::pkcs11::internal
