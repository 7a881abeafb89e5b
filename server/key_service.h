// The operations custodyd offers, independent of gRPC: ring creation and inspection, JWS and
// raw signing, JWKS publication, and startup reconciliation of metadata against the token.
//
// Request path (SignJws): ring snapshot lookup under a reader lock (no I/O) → protected header
// → digest → token Sign on a pooled session with the cached handle → compact JWS. No
// C_FindObjects, no login and no database access on that path.
//
// Thread-safety: thread-safe. Ring state is held in immutable snapshots
// (std::shared_ptr<const Ring>) swapped under a mutex; no lock is held across a token call.
#ifndef CUSTODY_SERVER_KEY_SERVICE_H_
#define CUSTODY_SERVER_KEY_SERVICE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "custody/v1/custody.pb.h"
#include "pkcs11/token.h"
#include "rotation/metadata_store.h"
#include "server/decryption_profile.h"
#include "server/signing_profile.h"

namespace custody::server {

class KeyService {
 public:
  struct Options {
    size_t max_payload_bytes = 256 * 1024;
    size_t max_extra_header_bytes = 4 * 1024;
  };

  // Loads rings from `store`, resolves every version's token object once, and reconciles:
  // CREATING versions are completed (object present) or rolled back (object absent); versions
  // whose object is missing are flagged and logged; custody-labelled objects with no metadata
  // are reported as orphans. Both pointers must outlive the service.
  static absl::StatusOr<std::unique_ptr<KeyService>> Create(pkcs11::Token* token,
                                                            rotation::MetadataStore* store,
                                                            Options options);

  // ALREADY_EXISTS for an existing name (nothing changes); INVALID_ARGUMENT for bad names or
  // algorithms; the version's key is generated in the token.
  absl::StatusOr<v1::KeyRing> CreateKeyRing(const v1::CreateKeyRingRequest& request);
  absl::StatusOr<v1::KeyRing> GetKeyRing(const std::string& name) const;
  absl::StatusOr<v1::ListKeyRingsResponse> ListKeyRings(const std::string& prefix) const;
  // Imports a private key as a new PENDING version of an existing ring. The key must fit the
  // ring's alg (curve, key type, RSA size); INVALID_ARGUMENT otherwise.
  absl::StatusOr<v1::KeyRing> ImportKeyVersion(const v1::ImportKeyVersionRequest& request);

  absl::StatusOr<v1::SignJwsResponse> SignJws(const v1::SignJwsRequest& request) const;
  absl::StatusOr<v1::SignResponse> Sign(const v1::SignRequest& request) const;
  // The JWKS of `rings` (every ring when empty). NOT_FOUND names the first unknown ring.
  absl::StatusOr<std::string> GetJwks(const std::vector<std::string>& rings) const;
  // Decrypts a compact JWE with a decrypting version of the ring (by kid, else each in turn,
  // ACTIVE first). Parse errors name the part; every later failure is INVALID_ARGUMENT
  // "decryption failed".
  absl::StatusOr<v1::DecryptJweResponse> DecryptJwe(const v1::DecryptJweRequest& request) const;

 private:
  struct Version {
    rotation::VersionRecord record;
    std::shared_ptr<pkcs11::KeyPair> key;  // null when the object is missing
    bool object_missing = false;
  };
  struct Ring {
    rotation::RingRecord record;
    SigningProfile profile;        // SIGN rings
    DecryptionProfile decryption;  // DECRYPT rings
    std::vector<Version> versions;
    int active = -1;  // index into versions, -1 when none
  };

  KeyService(pkcs11::Token* token, rotation::MetadataStore* store, Options options)
      : token_(token), store_(store), options_(options) {}
  absl::Status Load();
  // Fills the ring's profile from its record (alg, rsa_bits, curve). INVALID_ARGUMENT with the
  // reason when they do not form a supported combination.
  static absl::Status ResolveProfile(Ring& ring);
  // Puts the key of `record` (CREATING, durable already) into the token: generated, or imported
  // from `import` when not null. Reads the public key back and fills kid and public_jwk.
  absl::StatusOr<Version> MaterializeVersion(const Ring& ring, rotation::VersionRecord record,
                                             const EVP_PKEY* import);
  // Destroys the token object of a version whose creation failed and deletes its intent; when
  // that fails too, the CREATING row stays for the next start to reconcile.
  void RollBackVersion(const rotation::VersionRecord& record);
  absl::StatusOr<rotation::VersionRecord> CompleteVersion(rotation::VersionRecord record,
                                                          const pkcs11::KeyPair& key) const;
  absl::StatusOr<std::shared_ptr<const Ring>> FindRing(const std::string& name) const;
  absl::StatusOr<const Version*> ActiveVersion(const Ring& ring) const;
  v1::KeyRing ToProto(const Ring& ring) const;

  pkcs11::Token* const token_;
  rotation::MetadataStore* const store_;
  const Options options_;

  RsaOaepPath oaep_path_;  // probed once at startup

  // Serializes ring mutations (create, import) so that version numbers are assigned once. Held
  // across token calls on purpose: admin operations are rare and must not interleave; the
  // request path never takes it.
  absl::Mutex admin_mu_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<const Ring>> rings_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::OrphanedObject> orphans_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEY_SERVICE_H_
