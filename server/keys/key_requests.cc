// KeyService, the request path: JWS and raw signing with a ring's ACTIVE version, JWE
// decryption with its published versions, public keys and certificate requests. Each reads one
// immutable ring snapshot (no lock held, no store access) and makes one token call.
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "jose/jwe.h"
#include "jose/jwk.h"
#include "openssl/core_names.h"
#include "server/keys/certificates.h"
#include "server/keys/key_service.h"
#include "server/keys/raw_signature.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

// The uncompressed point (04||X||Y) of a validated ephemeral key, as the token's ECDH takes it.
absl::StatusOr<std::string> EncodedPoint(const EVP_PKEY* pkey) {
  unsigned char buf[256];
  size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, buf, sizeof(buf),
                                      &len) != 1) {
    return absl::InternalError("cannot encode the epk point");
  }
  return std::string(reinterpret_cast<char*>(buf), len);
}

}  // namespace

absl::StatusOr<KeyService::Signer> KeyService::ActiveSigner(const std::string& name) const {
  auto ring = FindRing(name);
  if (!ring.ok()) return ring.status();
  if ((*ring)->record.purpose != rotation::Purpose::kSign) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", name, "' is a DECRYPT ring; it does not sign"));
  }
  auto version = ActiveVersion(**ring);
  if (!version.ok()) return version.status();
  return Signer{*std::move(ring), *version};
}

absl::StatusOr<v1::SignJwsResponse> KeyService::SignJws(const v1::SignJwsRequest& request) const {
  if (absl::Status s = CheckMetadataFresh(); !s.ok()) return s;
  if (request.payload().size() > options_.max_payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("payload is ", request.payload().size(),
                                                   " bytes; the limit is ",
                                                   options_.max_payload_bytes));
  }
  auto signer = ActiveSigner(request.ring());
  if (!signer.ok()) return signer.status();
  const Ring& ring = *signer->ring;
  const Version* version = signer->version;

  jose::JwsHeaderParams params;
  params.alg = ring.profile.alg;
  params.kid = version->record.kid;
  params.typ = request.typ();
  params.cty = request.cty();
  if (request.embed_jwk()) {
    auto jwk = jose::ParseJson(version->record.public_jwk);
    if (!jwk.ok() || !jwk->is_object()) {
      return absl::DataLossError(
          absl::StrCat("stored public JWK of ring '", request.ring(), "' is invalid"));
    }
    params.jwk = *std::move(jwk);
  }
  if (!request.extra_header_json().empty()) {
    if (request.extra_header_json().size() > options_.max_extra_header_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("extra_header_json is larger than ",
                                                     options_.max_extra_header_bytes, " bytes"));
    }
    auto extra = jose::ParseJson(request.extra_header_json());
    if (!extra.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("extra_header_json: ", extra.status().message()));
    }
    if (!extra->is_object()) {
      return absl::InvalidArgumentError("extra_header_json must be a JSON object");
    }
    params.extra = *std::move(extra);
  }
  auto header = jose::BuildProtectedHeader(params);
  if (!header.ok()) return header.status();
  std::string signing_input = jose::JwsSigningInput(*header, request.payload());
  auto input = TokenSignInput(ring.profile, signing_input);
  if (!input.ok()) return input.status();
  auto signature = token_->Sign(*version->key, ring.profile.scheme, *input);
  if (!signature.ok()) return signature.status();
  version->NoteSignature(*options_.clock);

  v1::SignJwsResponse out;
  out.set_jws(jose::AssembleCompactJws(signing_input, *signature));
  out.set_kid(version->record.kid);
  out.set_version(version->record.version);
  out.set_alg(std::string(jose::JwsAlgName(ring.profile.alg)));
  return out;
}

absl::StatusOr<v1::SignResponse> KeyService::Sign(const v1::SignRequest& request) const {
  if (absl::Status s = CheckMetadataFresh(); !s.ok()) return s;
  auto signer = ActiveSigner(request.ring());
  if (!signer.ok()) return signer.status();
  const Ring& ring = *signer->ring;
  const Version* version = signer->version;
  if (request.version() != 0 && request.version() != version->record.version) {
    // A key loaded for the version ACTIVE before a rotation (raw_signature.h).
    const Version* pinned = ring.Find(request.version());
    if (absl::Status s = PinnedVersionMaySign(
            request.ring(), request.version(), pinned == nullptr ? nullptr : &pinned->record,
            version->record.version, NowMs(), options_.retired_sign_grace);
        !s.ok()) {
      return s;
    }
    if (pinned->key == nullptr) {
      return absl::UnavailableError(absl::StrCat("the token object of ring '", request.ring(),
                                                 "' version ", request.version(),
                                                 " is missing from the token"));
    }
    version = pinned;
  }
  auto plan = PlanRawSign(ring.profile, request, options_.max_payload_bytes);
  if (!plan.ok()) return plan.status();
  auto signature = token_->Sign(*version->key, plan->scheme, plan->token_input);
  if (!signature.ok()) return signature.status();
  version->NoteSignature(*options_.clock);
  if (plan->der) {
    signature = EcdsaJoseToDer(*signature);
    if (!signature.ok()) return signature.status();
  }
  v1::SignResponse out;
  out.set_signature(*signature);
  out.set_kid(version->record.kid);
  out.set_version(version->record.version);
  out.set_alg(std::string(jose::JwsAlgName(ring.profile.alg)));
  return out;
}

absl::StatusOr<v1::PublicKey> KeyService::GetPublicKey(
    const v1::GetPublicKeyRequest& request) const {
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  auto found = VersionOrActive(**ring, request.version());
  if (!found.ok()) return found.status();
  const Version* v = *found;
  const VersionState st = v->record.state;
  if (st != VersionState::kPending && st != VersionState::kActive && st != VersionState::kRetired) {
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", request.version(), " of ring '", request.ring(), "' is ",
        rotation::VersionStateName(st), ": only PENDING, ACTIVE and RETIRED keys are published"));
  }
  if (v->key_mismatch || v->tag_mismatch) {
    return absl::FailedPreconditionError(
        absl::StrCat("version ", v->record.version, " of ring '", request.ring(),
                     "' is out of service: its metadata does not match its token object"));
  }
  v1::PublicKey out;
  out.set_ring(request.ring());
  out.set_version(v->record.version);
  out.set_kid(v->record.kid);
  out.set_alg((*ring)->record.alg);
  out.set_state(ToProtoState(v->record.state));
  out.set_public_jwk(v->record.public_jwk);
  out.set_purpose((*ring)->record.purpose == rotation::Purpose::kSign ? v1::SIGN : v1::DECRYPT);
  out.set_certificate_chain(v->record.certificate_chain);
  return out;
}

absl::StatusOr<v1::CertificateRequest> KeyService::CreateCertificateRequest(
    const v1::CreateCertificateRequestRequest& request) const {
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  if ((*ring)->record.purpose != rotation::Purpose::kSign) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ring '", request.ring(), "' is a DECRYPT ring; certificates are for signing keys"));
  }
  auto found = VersionOrActive(**ring, request.version());
  if (!found.ok()) return found.status();
  const Version* v = *found;
  if (v->record.state != VersionState::kPending && v->record.state != VersionState::kActive) {
    return absl::FailedPreconditionError(
        absl::StrCat("version ", request.version(), " of ring '", request.ring(), "' is ",
                     rotation::VersionStateName(v->record.state),
                     ": certificate requests are made for PENDING or ACTIVE versions"));
  }
  if (v->key == nullptr) {
    return absl::UnavailableError(absl::StrCat("the token object of ring '", request.ring(),
                                               "' version ", v->record.version, " is missing"));
  }
  auto jwk = jose::ParseJson(v->record.public_jwk);
  if (!jwk.ok()) return absl::DataLossError("stored public JWK is invalid");
  auto pub = jose::PkeyFromPublicJwk(*jwk);
  if (!pub.ok()) return pub.status();
  const std::vector<std::string> sans(request.sans().begin(), request.sans().end());
  auto pem = BuildCertificateRequest(pub->get(), (*ring)->profile, request.subject(), sans,
                                     [&](const RawSignPlan& plan) {
                                       return token_->Sign(*v->key, plan.scheme, plan.token_input);
                                     });
  if (!pem.ok()) return pem.status();
  v1::CertificateRequest out;
  out.set_pem(*std::move(pem));
  out.set_version(v->record.version);
  out.set_kid(v->record.kid);
  return out;
}

absl::StatusOr<v1::DecryptJweResponse> KeyService::DecryptJwe(
    const v1::DecryptJweRequest& request) const {
  if (absl::Status s = CheckMetadataFresh(); !s.ok()) return s;
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  const Ring& r = **ring;
  if (r.record.purpose != rotation::Purpose::kDecrypt) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", request.ring(), "' is a SIGN ring; it does not decrypt"));
  }
  jose::JweLimits limits;
  limits.allow_zip = r.record.zip_max_bytes > 0;
  if (limits.allow_zip) limits.max_decompressed_bytes = static_cast<size_t>(r.record.zip_max_bytes);
  auto jwe = jose::ParseCompactJwe(request.jwe(), limits);
  if (!jwe.ok()) return jwe.status();
  if (jwe->alg != r.decryption.alg) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE alg '", std::string(jose::JweAlgName(jwe->alg)),
                     "' is not the alg of ring '", r.record.name, "' (", r.record.alg, ")"));
  }
  // Invalid-curve defence: the ephemeral key is checked before the token sees it.
  std::string epk_point;
  if (jose::IsEcdh(jwe->alg)) {
    auto epk = jose::ValidateEpk(*jwe->epk, r.decryption.curve);
    if (!epk.ok()) return epk.status();
    auto point = EncodedPoint(epk->get());
    if (!point.ok()) return point.status();
    epk_point = *std::move(point);
  }

  // The decrypting versions are exactly the published ones (PENDING, ACTIVE, RETIRED).
  for (const Version* v : r.Published()) {
    if (!jwe->kid.empty() && jwe->kid != v->record.kid) continue;
    auto cek = RecoverCek(*token_, *v->key, r.decryption, oaep_path_, *jwe, epk_point);
    if (!cek.ok()) {
      if (absl::IsInvalidArgument(cek.status())) continue;  // this key does not open it
      return cek.status();                                  // token trouble, no secret in it
    }
    auto plaintext = jose::DecryptContent(*jwe, *cek, limits);
    if (!plaintext.ok()) continue;
    v1::DecryptJweResponse out;
    out.set_plaintext(std::string(plaintext->view()));
    auto header = jose::Base64UrlDecode(jwe->protected_b64);
    if (header.ok()) out.set_protected_header(*std::move(header));
    out.set_kid(v->record.kid);
    out.set_version(v->record.version);
    return out;
  }
  return absl::InvalidArgumentError("decryption failed");
}
}  // namespace custody::server
