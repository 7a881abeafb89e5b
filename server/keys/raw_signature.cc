#include "server/keys/raw_signature.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "jose/jws.h"
#include "openssl/evp.h"

namespace custody::server {
namespace {

struct DigestKind {
  const char* name;  // as in SignRequest.digest_alg
  const char* openssl_name;
  size_t size;
  // DER DigestInfo prefix (RFC 8017 §9.2 note 1) for RSASSA-PKCS1-v1_5.
  const unsigned char* digest_info_prefix;
  pkcs11::SignScheme pss;
};

constexpr unsigned char kSha256Prefix[] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                           0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                           0x01, 0x05, 0x00, 0x04, 0x20};
constexpr unsigned char kSha384Prefix[] = {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                           0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                           0x02, 0x05, 0x00, 0x04, 0x30};
constexpr unsigned char kSha512Prefix[] = {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                           0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                           0x03, 0x05, 0x00, 0x04, 0x40};
constexpr size_t kDigestInfoPrefixSize = sizeof(kSha256Prefix);

constexpr DigestKind kDigests[] = {
    {"SHA256", "SHA2-256", 32, kSha256Prefix, pkcs11::SignScheme::kRsaPssSha256},
    {"SHA384", "SHA2-384", 48, kSha384Prefix, pkcs11::SignScheme::kRsaPssSha384},
    {"SHA512", "SHA2-512", 64, kSha512Prefix, pkcs11::SignScheme::kRsaPssSha512},
};

const DigestKind* FindDigest(absl::string_view name) {
  for (const DigestKind& d : kDigests) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

// The ring's own hash when the request names none.
const DigestKind* RingDigest(const SigningProfile& profile) {
  for (const DigestKind& d : kDigests) {
    if (d.size == profile.digest_size) return &d;
  }
  return nullptr;
}

bool IsRsa(const SigningProfile& p) {
  return p.scheme == pkcs11::SignScheme::kRsaPkcs1v15 ||
         p.scheme == pkcs11::SignScheme::kRsaPssSha256 ||
         p.scheme == pkcs11::SignScheme::kRsaPssSha384 ||
         p.scheme == pkcs11::SignScheme::kRsaPssSha512;
}

}  // namespace

absl::StatusOr<RawSignPlan> PlanRawSign(const SigningProfile& profile,
                                        const v1::SignRequest& request, size_t max_data_bytes) {
  const std::string alg_name(jose::JwsAlgName(profile.alg));
  if (request.input_case() == v1::SignRequest::INPUT_NOT_SET) {
    return absl::InvalidArgumentError("one of 'digest' or 'data' is required");
  }
  if (request.input_case() == v1::SignRequest::kData && request.data().size() > max_data_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("data is ", request.data().size(), " bytes; the limit is ", max_data_bytes));
  }
  RawSignPlan plan;
  if (profile.scheme == pkcs11::SignScheme::kEddsa) {
    if (request.input_case() == v1::SignRequest::kDigest || !request.digest_alg().empty()) {
      return absl::InvalidArgumentError(
          "EdDSA signs the message itself, not a digest: send the message in 'data' and no "
          "digest_alg");
    }
    if (request.rsa_padding() != v1::RSA_PADDING_RING) {
      return absl::InvalidArgumentError("rsa_padding applies to RSA rings only, not EdDSA");
    }
    if (request.encoding() == v1::SIGNATURE_ENCODING_DER) {
      return absl::InvalidArgumentError("DER encoding applies to ECDSA rings only, not EdDSA");
    }
    plan.scheme = pkcs11::SignScheme::kEddsa;
    plan.token_input = request.data();
    return plan;
  }

  const DigestKind* digest =
      request.digest_alg().empty() ? RingDigest(profile) : FindDigest(request.digest_alg());
  if (digest == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported digest_alg '", request.digest_alg(),
                                                   "': use SHA256, SHA384 or SHA512"));
  }
  std::string hash;
  if (request.input_case() == v1::SignRequest::kDigest) {
    if (request.digest().size() != digest->size) {
      return absl::InvalidArgumentError(absl::StrCat("digest must be ", digest->size, " bytes for ",
                                                     digest->name, " on ", alg_name, ", got ",
                                                     request.digest().size()));
    }
    hash = request.digest();
  } else {
    std::unique_ptr<EVP_MD, decltype(&EVP_MD_free)> md(
        EVP_MD_fetch(nullptr, digest->openssl_name, nullptr), EVP_MD_free);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int out_len = 0;
    if (md == nullptr || EVP_Digest(request.data().data(), request.data().size(), out, &out_len,
                                    md.get(), nullptr) != 1) {
      return absl::InternalError(absl::StrCat("EVP_Digest ", digest->name, " failed"));
    }
    hash.assign(reinterpret_cast<const char*>(out), out_len);
  }

  if (!IsRsa(profile)) {  // ECDSA: any of the three hashes, truncated by the curve as usual
    if (request.rsa_padding() != v1::RSA_PADDING_RING) {
      return absl::InvalidArgumentError(
          absl::StrCat("rsa_padding applies to RSA rings only, not ", alg_name));
    }
    plan.scheme = pkcs11::SignScheme::kEcdsa;
    plan.token_input = std::move(hash);
    plan.der = request.encoding() == v1::SIGNATURE_ENCODING_DER;
    return plan;
  }
  if (request.encoding() == v1::SIGNATURE_ENCODING_DER) {
    return absl::InvalidArgumentError(
        absl::StrCat("DER encoding applies to ECDSA rings only, not ", alg_name));
  }
  const bool ring_pkcs1 = profile.scheme == pkcs11::SignScheme::kRsaPkcs1v15;
  v1::RsaPadding padding = request.rsa_padding();
  if (padding == v1::RSA_PADDING_RING)
    padding = ring_pkcs1 ? v1::RSA_PADDING_PKCS1 : v1::RSA_PADDING_PSS;
  if (padding == v1::RSA_PADDING_PKCS1) {
    if (!ring_pkcs1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RSASSA-PKCS1-v1_5 is refused on a ", alg_name,
          " ring: only rings created for it (RS256 with allow_non_fapi) sign with it"));
    }
    plan.scheme = pkcs11::SignScheme::kRsaPkcs1v15;
    plan.token_input.assign(reinterpret_cast<const char*>(digest->digest_info_prefix),
                            kDigestInfoPrefixSize);
    plan.token_input += hash;
    return plan;
  }
  if (padding != v1::RSA_PADDING_PSS) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown rsa_padding ", static_cast<int>(request.rsa_padding())));
  }
  plan.scheme = digest->pss;
  plan.token_input = std::move(hash);
  return plan;
}

absl::Status PinnedVersionMaySign(absl::string_view ring, uint32_t requested,
                                  const rotation::VersionRecord* pinned, uint32_t active_version,
                                  int64_t now_ms, absl::Duration grace) {
  if (pinned != nullptr && pinned->version == active_version) return absl::OkStatus();
  if (pinned != nullptr && pinned->state == rotation::VersionState::kRetired &&
      !pinned->compromised && pinned->retire_time > 0 &&
      now_ms - pinned->retire_time <= absl::ToInt64Milliseconds(grace)) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat("version ", requested, " of ring '", ring,
                   "' does not sign: only the ACTIVE version (", active_version, ") does",
                   pinned != nullptr && pinned->state == rotation::VersionState::kRetired
                       ? absl::StrCat(", and a RETIRED one only for ",
                                      absl::ToInt64Milliseconds(grace), " ms after its rotation")
                       : "",
                   "; reload the key (and its certificate)"));
}

absl::StatusOr<std::string> EcdsaJoseToDer(absl::string_view rs) {
  // One encoder (jose/); a signature the token returned that it cannot encode is the token's
  // fault, not the caller's: INTERNAL.
  absl::StatusOr<std::string> der = jose::EcdsaRawToDer(std::string_view(rs.data(), rs.size()));
  if (!der.ok()) {
    return absl::InternalError(absl::StrCat(
        "the token returned an ECDSA signature custody cannot encode: ", der.status().message()));
  }
  return der;
}

}  // namespace custody::server
