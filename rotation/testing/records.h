// Records the metadata store tests write: a ring, a version of it, an ACTIVE version.
#ifndef CUSTODY_ROTATION_TESTING_RECORDS_H_
#define CUSTODY_ROTATION_TESTING_RECORDS_H_

#include <cstdint>
#include <string>

#include "rotation/key_ring.h"

namespace custody::rotation::testing {

inline RingRecord Ring(const std::string& name) {
  RingRecord r;
  r.name = name;
  r.alg = "ES256";
  r.create_time = 1700000000;
  return r;
}

// A CREATING version labelled as custodyd labels its objects.
inline VersionRecord Version(const std::string& ring, uint32_t v, const std::string& id) {
  VersionRecord r;
  r.ring = ring;
  r.version = v;
  r.object_id = id;
  r.object_label = "custody/" + ring + "/v" + std::to_string(v);
  r.create_time = 1700000000;
  return r;
}

inline VersionRecord Active(VersionRecord v) {
  v.state = VersionState::kActive;
  v.kid = "kid-" + std::to_string(v.version);
  v.public_jwk = R"({"kty":"EC"})";
  return v;
}

}  // namespace custody::rotation::testing

#endif  // CUSTODY_ROTATION_TESTING_RECORDS_H_
