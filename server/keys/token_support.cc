#include "server/keys/token_support.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "jose/jwe.h"
#include "pkcs11/capabilities.h"
#include "server/keys/decryption_profile.h"
#include "server/keys/signing_profile.h"

namespace custody::server {

pkcs11::KeyUse KeyUseOf(const SigningProfile& profile) {
  pkcs11::KeyUse use;
  use.spec = profile.key;
  use.operation = pkcs11::KeyUse::Operation::kSign;
  use.scheme = profile.scheme;
  return use;
}

pkcs11::KeyUse KeyUseOf(const DecryptionProfile& profile) {
  pkcs11::KeyUse use;
  use.spec = profile.key;
  if (jose::IsEcdh(profile.alg)) {
    use.operation = pkcs11::KeyUse::Operation::kDeriveEcdh;
  } else {
    use.operation = pkcs11::KeyUse::Operation::kDecryptRsaOaep;
    use.oaep_hash =
        profile.alg == jose::JweAlg::kRsaOaep ? pkcs11::OaepHash::kSha1 : pkcs11::OaepHash::kSha256;
  }
  return use;
}

TokenSupport TokenSupport::Of(pkcs11::KeyOperations& token) {
  TokenSupport out;
  out.token_label_ = token.info().label;
  out.module_path_ = token.info().module_path;
  auto note = [&](const std::string& alg, const pkcs11::KeyUse& use) {
    std::vector<std::string> missing = pkcs11::MissingMechanisms(token, use);
    if (!missing.empty()) out.unserved_[alg] = std::move(missing);
  };
  for (const char* alg : {"PS256", "ES256", "ES384", "ES512", "EdDSA", "RS256"}) {
    auto profile = ResolveSigningProfile(alg, 0, /*allow_non_fapi=*/true);
    if (profile.ok()) note(alg, KeyUseOf(*profile));
  }
  for (const char* alg : {"RSA-OAEP-256", "RSA-OAEP", "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW",
                          "ECDH-ES+A256KW"}) {
    auto profile = ResolveDecryptionProfile(alg, 0, "");
    if (profile.ok()) note(alg, KeyUseOf(*profile));
  }
  return out;
}

const std::vector<std::string>& TokenSupport::Missing(const std::string& alg) const {
  static const std::vector<std::string> kNone;
  auto it = unserved_.find(alg);
  return it == unserved_.end() ? kNone : it->second;
}

absl::Status TokenSupport::CheckServes(const std::string& alg) const {
  const std::vector<std::string>& missing = Missing(alg);
  if (missing.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the token '", token_label_, "' (module ", module_path_, ") does not offer ",
      absl::StrJoin(missing, ", "), ", which ", alg,
      " needs: this token cannot hold the ring's keys (use another algorithm or token)"));
}

}  // namespace custody::server
