// Internal to server/: small helpers that the files implementing KeyService share
// (key_service.cc, key_creation.cc, key_requests.cc, key_snapshots.cc, key_lifecycle.cc,
// key_ring_snapshot.cc, key_scheduler.cc).
#ifndef CUSTODY_SERVER_KEYS_KEY_SERVICE_INTERNAL_H_
#define CUSTODY_SERVER_KEYS_KEY_SERVICE_INTERNAL_H_

#include <cstdint>

#include "custody/v1/custody.pb.h"
#include "rotation/metadata_store.h"

namespace custody::server::internal {

v1::KeyVersionState ToProtoState(rotation::VersionState s);

}  // namespace custody::server::internal

#endif  // CUSTODY_SERVER_KEYS_KEY_SERVICE_INTERNAL_H_
