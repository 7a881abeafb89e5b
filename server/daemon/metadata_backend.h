// Chooses and opens custodyd's metadata store from its flags: the embedded SQLite file under the
// state directory (the default), or PostgreSQL shared by replicas.
#ifndef CUSTODY_SERVER_DAEMON_METADATA_BACKEND_H_
#define CUSTODY_SERVER_DAEMON_METADATA_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "rotation/metadata_store.h"

namespace custody::server {

struct MetadataBackendOptions {
  // Empty: SQLite at STATE_DIR/metadata.db. A postgresql:// (or postgres://) URI, or the path of
  // a file holding a libpq connection string (URI or key=value). Neither may carry a password.
  std::string spec;
  std::string state_dir;
  // The PostgreSQL password: this file (mode 0600/0400, owned by custodyd's user), else the
  // environment variable `password_env` (unset after reading), else libpq's PGPASSFILE/.pgpass.
  std::string password_file;
  std::string password_env;
  // Tags and checks every metadata record (rotation/record_tag.h); custodyd's key is in the token
  // (server/keys/metadata_tag_key.h). Must outlive the store.
  const rotation::RecordTagger* tagger = nullptr;
};

struct MetadataBackend {
  std::unique_ptr<rotation::MetadataStore> store;
  bool shared = false;   // PostgreSQL: other replicas may write too
  std::string describe;  // for the log: "sqlite:PATH" or "postgresql host=... dbname=..."
};

absl::StatusOr<MetadataBackend> OpenMetadataBackend(const MetadataBackendOptions& options);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_METADATA_BACKEND_H_
