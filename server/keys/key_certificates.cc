// KeyService operations on the certificates of ring versions (server/keys/certificates.h does the
// X.509 work).
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "server/keys/certificates.h"
#include "server/keys/key_service.h"

namespace custody::server {

absl::StatusOr<v1::KeyRing> KeyService::SetCertificate(const v1::SetCertificateRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  std::string thumbprint;
  auto ring = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) -> absl::Status {
    if (r.record.purpose != rotation::Purpose::kSign) {
      return absl::FailedPreconditionError(absl::StrCat(
          "ring '", request.ring(), "' is a DECRYPT ring; certificates are for signing keys"));
    }
    Version* v = r.Find(request.version());
    if (v == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("ring '", request.ring(), "' has no version ", request.version()));
    }
    if (!rotation::IsPublishedState(v->record.state)) {
      return absl::FailedPreconditionError(
          absl::StrCat("version ", request.version(), " of ring '", request.ring(), "' is ",
                       rotation::VersionStateName(v->record.state),
                       ": certificates are attached to PENDING, ACTIVE or RETIRED versions"));
    }
    auto jwk = jose::ParseJson(v->record.public_jwk);
    if (!jwk.ok()) return absl::DataLossError("stored public JWK is invalid");
    auto key = jose::PkeyFromPublicJwk(*jwk);
    if (!key.ok()) return key.status();
    auto chain = ParseCertificateChain(request.chain_pem(), key->get());
    if (!chain.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("version ", request.version(), " of ring '",
                                                     request.ring(),
                                                     "': ", chain.status().message()));
    }
    thumbprint = chain->sha256_thumbprint;
    v->record.certificate_chain = request.chain_pem();
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!ring.ok()) return ring.status();
  Log(LogLevel::kInfo, "version.certificate_set",
      {{"ring", request.ring()},
       {"version", absl::StrCat(request.version())},
       {"x5t#S256", thumbprint}});
  return ToProto(**ring);
}

}  // namespace custody::server
