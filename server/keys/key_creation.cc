// KeyService, creating keys: a new ring with its first version (CreateKeyRing) and an imported
// version of an existing ring (ImportKeyVersion), each as a durable CREATING intent, then the key
// in the token (generated, or imported from a JWK or PKCS#8 that must fit the ring), then the
// durable completion; on failure the token object and the intent are rolled back.
#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/log.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "jose/private_key.h"
#include "openssl/core_names.h"
#include "openssl/rand.h"
#include "pkcs11/capabilities.h"
#include "server/keys/key_service.h"
#include "server/keys/token_support.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

absl::StatusOr<std::string> NewObjectId() {
  unsigned char id[16];
  if (RAND_bytes(id, sizeof(id)) != 1) return absl::InternalError("RAND_bytes failed");
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(id), sizeof(id)));
}

std::string ObjectLabel(const std::string& ring, uint32_t version) {
  return absl::StrCat(rotation::kObjectLabelPrefix, ring, "/v", version);
}

std::string GroupName(const EVP_PKEY* pkey) {
  char name[64] = {0};
  size_t len = 0;
  if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name), &len) !=
      1) {
    return "";
  }
  return std::string(name, len);
}

// The JWK curve name of an EC key ("P-256"), or "" for other keys and curves.
std::string JwkCurve(const EVP_PKEY* pkey) {
  if (!EVP_PKEY_is_a(pkey, "EC")) return "";
  std::string group = GroupName(pkey);
  if (group == "prime256v1" || group == "P-256") return "P-256";
  if (group == "secp384r1" || group == "P-384") return "P-384";
  if (group == "secp521r1" || group == "P-521") return "P-521";
  return "";
}

struct ImportedKey {
  jose::PkeyPtr pkey;
  // The JWK's own "kid", kept so that senders and verifiers holding the key under its old kid
  // keep working after a migration into custody; empty means the RFC 7638 thumbprint.
  std::string kid;
};

absl::StatusOr<ImportedKey> ParseKeyMaterial(const v1::PrivateKeyMaterial& material) {
  ImportedKey out;
  switch (material.key_case()) {
    case v1::PrivateKeyMaterial::kPrivateJwk: {
      auto json = jose::ParseJson(material.private_jwk());
      if (!json.ok()) {
        return absl::InvalidArgumentError("private_jwk is not valid JSON");  // no key echo
      }
      auto pkey = jose::PrivateKeyFromJwk(*json);
      if (!pkey.ok()) return pkey.status();
      out.pkey = *std::move(pkey);
      if (const jose::Json* kid = json->Find("kid"); kid != nullptr) {
        if (!kid->is_string() || kid->as_string().empty() || kid->as_string().size() > 128) {
          return absl::InvalidArgumentError(
              "private_jwk: \"kid\" must be a 1..128 character string");
        }
        for (char c : kid->as_string()) {
          if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
            return absl::InvalidArgumentError("private_jwk: \"kid\" contains control characters");
          }
        }
        out.kid = kid->as_string();
      }
      return out;
    }
    case v1::PrivateKeyMaterial::kPkcs8Pem: {
      auto pkey = jose::PrivateKeyFromPem(material.pkcs8_pem());
      if (!pkey.ok()) return pkey.status();
      out.pkey = *std::move(pkey);
      return out;
    }
    default:
      return absl::InvalidArgumentError("key material is required: private_jwk or pkcs8_pem");
  }
}

// The key types each profile accepts for import.
absl::Status CheckKeyFitsRing(const EVP_PKEY* pkey, const rotation::RingRecord& ring,
                              const pkcs11::KeySpec& spec) {
  bool fits = false;
  switch (spec.type) {
    case pkcs11::KeyType::kRsa: {
      int bits = EVP_PKEY_get_bits(pkey);
      fits = EVP_PKEY_is_a(pkey, "RSA") && (bits == 2048 || bits == 3072 || bits == 4096);
      break;
    }
    case pkcs11::KeyType::kEd25519:
      fits = EVP_PKEY_is_a(pkey, "ED25519");
      break;
    case pkcs11::KeyType::kEcP256:
      fits = JwkCurve(pkey) == "P-256";
      break;
    case pkcs11::KeyType::kEcP384:
      fits = JwkCurve(pkey) == "P-384";
      break;
    case pkcs11::KeyType::kEcP521:
      fits = JwkCurve(pkey) == "P-521";
      break;
  }
  if (!fits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the imported key does not fit ring '", ring.name, "' (alg ", ring.alg,
        ring.curve.empty() ? "" : ", curve " + ring.curve,
        "): RSA 2048/3072/4096 for RSA algs, the ring's curve for EC, Ed25519 for EdDSA"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<VersionRecord> KeyService::CompleteVersion(VersionRecord record,
                                                          const pkcs11::KeyPair& key) const {
  auto pkey = token_->PublicKey(key);
  if (!pkey.ok()) return pkey.status();
  auto jwk = jose::PublicJwkFromPkey(pkey->get());
  if (!jwk.ok()) return jwk.status();
  if (record.kid.empty()) {  // a kid kept from an imported JWK stays
    auto kid = jose::Rfc7638Thumbprint(*jwk);
    if (!kid.ok()) return kid.status();
    record.kid = *kid;
  }
  record.public_jwk = jwk->Serialize();
  return record;
}

absl::Status KeyService::VerifyAgainstToken(const VersionRecord& record,
                                            const pkcs11::KeyPair& key) const {
  VersionRecord from_token = record;
  from_token.kid.clear();  // recomputed from the token's key
  auto completed = CompleteVersion(std::move(from_token), key);
  if (!completed.ok()) {
    if (absl::IsUnavailable(completed.status())) return completed.status();
    return absl::FailedPreconditionError(absl::StrCat(
        "the token object's public key cannot be read: ", completed.status().message()));
  }
  if (completed->public_jwk != record.public_jwk) {
    return absl::FailedPreconditionError(
        "the stored public_jwk is not the public key of the token object it names");
  }
  // The kid is not checked: an imported JWK keeps its own kid, which the token cannot confirm,
  // and a changed kid publishes no other key (the JWK beside it is the token's).
  return absl::OkStatus();
}

absl::Status KeyService::VouchForVersion(Version& version, const char* event) const {
  if (version.key == nullptr) return absl::OkStatus();
  absl::Status vouched = VerifyAgainstToken(version.record, *version.key);
  if (vouched.ok() || absl::IsUnavailable(vouched)) return vouched;
  version.key = nullptr;
  version.key_mismatch = true;
  Log(LogLevel::kError, event,
      {{"ring", version.record.ring},
       {"version", absl::StrCat(version.record.version)},
       {"kid", version.record.kid},
       {"object_id", version.record.object_id},
       {"error", std::string(vouched.message())},
       {"action",
        "out of service (not published, not used): the metadata was changed outside custody"}});
  return absl::OkStatus();
}

absl::StatusOr<KeyService::Version> KeyService::MaterializeVersion(const Ring& ring,
                                                                   VersionRecord record,
                                                                   const EVP_PKEY* import) {
  const bool decrypt = ring.record.purpose == rotation::Purpose::kDecrypt;
  const pkcs11::KeySpec& spec = decrypt ? ring.decryption.key : ring.profile.key;
  std::string id = absl::HexStringToBytes(record.object_id);
  auto key = import != nullptr ? token_->ImportKeyPair(import, id, record.object_label, decrypt)
                               : token_->GenerateKeyPair(spec, id, record.object_label, decrypt);
  if (!key.ok()) return key.status();
  // A key the token created but cannot use (tpm2-pkcs11 1.9 makes P-521 keys it cannot sign
  // with) is never published: the caller rolls the version back.
  if (absl::Status tested = pkcs11::SelfTest(
          *token_, **key, decrypt ? KeyUseOf(ring.decryption) : KeyUseOf(ring.profile));
      !tested.ok()) {
    Log(LogLevel::kError, "version.self_test_failed",
        {{"ring", record.ring},
         {"version", absl::StrCat(record.version)},
         {"error", std::string(tested.message())}});
    return tested;
  }
  auto completed = CompleteVersion(std::move(record), **key);
  if (!completed.ok()) return completed.status();
  return Version{*std::move(completed), *std::move(key), false};
}

void KeyService::RollBackVersion(const VersionRecord& record) {
  absl::Status destroyed = token_->DestroyKeyPair(absl::HexStringToBytes(record.object_id));
  absl::Status deleted = destroyed;
  if (destroyed.ok() && options_.shared_store) {
    // Another replica may have numbered a version after this one meanwhile: the number stays,
    // as a version DESTROYED before it was ever used, so that numbers remain contiguous.
    VersionRecord abandoned = record;
    abandoned.state = VersionState::kDestroyed;
    abandoned.destroy_time = NowMs();
    deleted = store_->UpdateVersion(abandoned);
  } else if (destroyed.ok()) {
    deleted = store_->DeleteVersion(record.ring, record.version);
  }
  Log(LogLevel::kWarning, "version.creation_abandoned",
      {{"ring", record.ring}, {"version", absl::StrCat(record.version)}});
  if (!deleted.ok()) {
    Log(LogLevel::kError, "version.rollback_failed",
        {{"ring", record.ring},
         {"version", absl::StrCat(record.version)},
         {"error", std::string(deleted.message())},
         {"action", "left CREATING; the next start reconciles it"}});
  }
}

absl::StatusOr<v1::KeyRing> KeyService::CreateKeyRing(const v1::CreateKeyRingRequest& request) {
  if (absl::Status s = rotation::ValidateRingName(request.name()); !s.ok()) return s;
  Ring ring;
  ring.record.name = request.name();
  switch (request.purpose()) {
    case v1::SIGN:
      ring.record.purpose = rotation::Purpose::kSign;
      break;
    case v1::DECRYPT:
      ring.record.purpose = rotation::Purpose::kDecrypt;
      break;
    default:
      return absl::InvalidArgumentError("purpose is required: SIGN or DECRYPT");
  }
  ring.record.alg = request.alg();
  ring.record.rsa_bits = static_cast<int>(request.rsa_bits());
  ring.record.allow_non_fapi = request.allow_non_fapi();
  ring.record.curve = request.curve();
  ring.record.zip_max_bytes = request.zip_max_bytes();
  if (request.require_certificate() && ring.record.purpose != rotation::Purpose::kSign) {
    return absl::InvalidArgumentError("require_certificate applies to SIGN rings only");
  }
  ring.record.require_certificate = request.require_certificate();
  if (request.has_policy()) {
    ring.record.policy = {request.policy().prepublish_ms(), request.policy().rotation_period_ms(),
                          request.policy().retain_ms(), request.policy().destroy_delay_ms()};
    if (absl::Status s = rotation::ValidatePolicy(ring.record.policy); !s.ok()) return s;
    ring.record.policy_explicit = true;
  }
  if (absl::Status s = rotation::CheckPolicyFloors(ring.record.policy, options_.floors); !s.ok()) {
    return s;
  }
  if (absl::Status s = ResolveProfile(ring); !s.ok()) return s;
  if (absl::Status s = token_support_.CheckServes(ring.record.alg); !s.ok()) return s;
  const pkcs11::KeySpec& spec =
      ring.record.purpose == rotation::Purpose::kSign ? ring.profile.key : ring.decryption.key;
  if (std::string size = pkcs11::UnservedKeySize(*token_, spec);
      !size.empty() && !request.has_import_key()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the token '", token_->info().label, "' does not offer ", size, ", which ",
                     ring.record.alg, " with these keys needs (use another key size or token)"));
  }
  // Normalized: the defaults chosen by the profile are what the metadata records.
  ring.record.rsa_bits = spec.type == pkcs11::KeyType::kRsa ? spec.rsa_bits : 0;
  if (ring.record.purpose == rotation::Purpose::kDecrypt) ring.record.curve = ring.decryption.curve;

  ImportedKey import;
  if (request.has_import_key()) {
    auto parsed = ParseKeyMaterial(request.import_key());
    if (!parsed.ok()) return parsed.status();
    import = *std::move(parsed);
    if (absl::Status s = CheckKeyFitsRing(import.pkey.get(), ring.record, spec); !s.ok()) return s;
    if (spec.type == pkcs11::KeyType::kRsa) {
      ring.record.rsa_bits = EVP_PKEY_get_bits(import.pkey.get());
    }
  }

  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (rings_.count(request.name()) > 0) {
      return absl::AlreadyExistsError(absl::StrCat("ring '", request.name(), "' already exists"));
    }
  }
  ring.record.create_time = NowMs();
  auto object_id = NewObjectId();
  if (!object_id.ok()) return object_id.status();
  VersionRecord version;
  version.ring = request.name();
  version.version = 1;
  version.object_id = *object_id;
  version.object_label = ObjectLabel(request.name(), 1);
  version.state = VersionState::kCreating;
  version.create_time = ring.record.create_time;
  version.kid = import.kid;  // recorded with the intent so that a crash does not lose it

  // 1. Durable intent: the ring and a CREATING version. A crash after this point is completed
  //    or rolled back at the next start; the store's primary key settles concurrent creates.
  if (absl::Status s = store_->InsertRingWithVersion(ring.record, version); !s.ok()) return s;
  // 2. The key in the token (generated, or imported), sensitive and non-extractable.
  auto created = MaterializeVersion(ring, version, import.pkey.get());
  if (!created.ok()) {
    RollBackVersion(version);
    return created.status();
  }
  // 3. Durable activation, then publication in memory.
  created->record.state = VersionState::kActive;
  created->record.activate_time = NowMs();
  created->record.publish_time = created->record.activate_time;
  if (absl::Status s = store_->UpdateVersion(created->record); !s.ok()) {
    RollBackVersion(version);
    return s;
  }
  ring.versions.push_back(*std::move(created));
  ring.active = 0;
  if (options_.shared_store) ring.record.generation = 2;  // the intent and the activation
  auto snapshot = std::make_shared<const Ring>(std::move(ring));
  Publish(snapshot);
  Log(LogLevel::kInfo, "ring.created",
      {{"ring", request.name()},
       {"purpose", std::string(rotation::PurposeName(snapshot->record.purpose))},
       {"alg", request.alg()},
       {"kid", snapshot->versions[0].record.kid},
       {"key", import.pkey ? "imported" : "generated in the token"}});
  // An explicit policy pre-publishes the next key from the start.
  if (snapshot->record.policy_explicit) {
    if (auto added = AddVersion(request.name(), Activation::kPending); !added.ok()) {
      Log(LogLevel::kError, "ring.pending_failed",
          {{"ring", request.name()},
           {"error", std::string(added.status().message())},
           {"action", "the scheduler retries"}});
    }
    auto latest = FindRing(request.name());
    if (latest.ok()) return ToProto(**latest);
  }
  return ToProto(*snapshot);
}

absl::StatusOr<v1::KeyRing> KeyService::ImportKeyVersion(
    const v1::ImportKeyVersionRequest& request) {
  auto found = FindRing(request.ring());
  if (!found.ok()) return found.status();
  auto imported = ParseKeyMaterial(request.key());
  if (!imported.ok()) return imported.status();

  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  // Re-read under the admin lock: the snapshot we extend must be the latest.
  auto current = FindRing(request.ring());
  if (!current.ok()) return current.status();
  const Ring& base = **current;
  const pkcs11::KeySpec& spec =
      base.record.purpose == rotation::Purpose::kSign ? base.profile.key : base.decryption.key;
  if (absl::Status s = CheckKeyFitsRing(imported->pkey.get(), base.record, spec); !s.ok()) {
    return s;
  }
  // The key's own thumbprint too: importing a compromised version's key again (under its
  // thumbprint or any kid) would put it back into the JWKS.
  auto public_jwk = jose::PublicJwkFromPkey(imported->pkey.get());
  if (!public_jwk.ok()) return public_jwk.status();
  auto thumbprint = jose::Rfc7638Thumbprint(*public_jwk);
  if (!thumbprint.ok()) return thumbprint.status();
  const std::string public_json = public_jwk->Serialize();
  uint32_t next = 1;
  for (const Version& v : base.versions) {
    next = std::max(next, v.record.version + 1);
    const bool same_key = v.record.kid == *thumbprint || v.record.public_jwk == public_json;
    if (same_key && v.record.compromised) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the imported key is version ", v.record.version, " of ring '", base.record.name,
          "', which is compromised; a compromised key never returns"));
    }
    if (!imported->kid.empty() && v.record.kid == imported->kid) {
      return absl::AlreadyExistsError(absl::StrCat(
          "ring '", base.record.name, "' already has a version with kid '", imported->kid, "'"));
    }
  }
  auto object_id = NewObjectId();
  if (!object_id.ok()) return object_id.status();
  VersionRecord version;
  version.ring = base.record.name;
  version.version = next;
  version.object_id = *object_id;
  version.object_label = ObjectLabel(base.record.name, next);
  version.state = VersionState::kCreating;
  version.create_time = NowMs();
  version.kid = imported->kid;
  if (absl::Status s = store_->InsertVersion(version); !s.ok()) return s;
  auto created = MaterializeVersion(base, version, imported->pkey.get());
  if (!created.ok()) {
    RollBackVersion(version);
    return created.status();
  }
  created->record.state = VersionState::kPending;
  created->record.publish_time = NowMs();
  if (absl::Status s = store_->UpdateVersion(created->record); !s.ok()) {
    RollBackVersion(version);
    return s;
  }
  Ring ring = base;
  ring.versions.push_back(*std::move(created));
  if (options_.shared_store) ring.record.generation += 2;  // the intent and the completion
  auto snapshot = std::make_shared<const Ring>(std::move(ring));
  Publish(snapshot);
  Log(LogLevel::kInfo, "version.imported",
      {{"ring", base.record.name},
       {"version", absl::StrCat(next)},
       {"kid", snapshot->versions.back().record.kid}});
  return ToProto(*snapshot);
}
}  // namespace custody::server
