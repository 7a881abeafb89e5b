#include "pkcs11/capabilities.h"

#include "absl/strings/str_join.h"

namespace custody::pkcs11 {

std::vector<std::vector<std::string>> RequiredMechanisms(const KeyUse& use) {
  std::vector<std::vector<std::string>> needs;
  switch (use.spec.type) {
    case KeyType::kRsa:
      needs.push_back({"CKM_RSA_PKCS_KEY_PAIR_GEN"});
      break;
    case KeyType::kEd25519:
      needs.push_back({"CKM_EC_EDWARDS_KEY_PAIR_GEN"});
      break;
    case KeyType::kEcP256:
    case KeyType::kEcP384:
    case KeyType::kEcP521:
      needs.push_back({"CKM_EC_KEY_PAIR_GEN"});
      break;
  }
  switch (use.operation) {
    case KeyUse::Operation::kSign:
      switch (use.scheme) {
        case SignScheme::kEcdsa:
          needs.push_back({"CKM_ECDSA"});
          break;
        case SignScheme::kEddsa:
          needs.push_back({"CKM_EDDSA"});
          break;
        case SignScheme::kRsaPssSha256:
        case SignScheme::kRsaPssSha384:
        case SignScheme::kRsaPssSha512:
          needs.push_back({"CKM_RSA_PKCS_PSS"});
          break;
        case SignScheme::kRsaPkcs1v15:
          needs.push_back({"CKM_RSA_PKCS"});
          break;
      }
      break;
    case KeyUse::Operation::kDecryptRsaOaep:
      if (use.oaep_hash == OaepHash::kSha256) {
        needs.push_back({"CKM_RSA_PKCS_OAEP", "CKM_RSA_X_509"});
      } else {
        needs.push_back({"CKM_RSA_PKCS_OAEP"});
      }
      break;
    case KeyUse::Operation::kDeriveEcdh:
      needs.push_back({"CKM_ECDH1_DERIVE"});
      break;
  }
  return needs;
}

std::vector<std::string> MissingMechanisms(Token& token, const KeyUse& use) {
  std::vector<std::string> missing;
  for (const std::vector<std::string>& need : RequiredMechanisms(use)) {
    bool met = false;
    for (const std::string& name : need) {
      if (name == "CKM_RSA_PKCS_OAEP" && use.operation == KeyUse::Operation::kDecryptRsaOaep &&
          use.oaep_hash == OaepHash::kSha256) {
        // Listed is not enough: some tokens take OAEP with SHA-1 only.
        met = met || token.OaepSupported(OaepHash::kSha256);
      } else {
        met = met || token.HasMechanism(name);
      }
    }
    if (!met) missing.push_back(absl::StrJoin(need, " or "));
  }
  return missing;
}

}  // namespace custody::pkcs11
