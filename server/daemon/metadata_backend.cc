#include "server/daemon/metadata_backend.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/secret.h"
#include "rotation/postgres_metadata_store.h"
#include "rotation/sqlite_metadata_store.h"

namespace custody::server {

absl::StatusOr<MetadataBackend> OpenMetadataBackend(const MetadataBackendOptions& options) {
  MetadataBackend backend;
  if (options.spec.empty() || options.spec == "sqlite") {
    const std::string path = options.state_dir + "/metadata.db";
    auto store = rotation::OpenSqliteMetadataStore(path, options.tagger);
    if (!store.ok()) return store.status();
    backend.store = *std::move(store);
    backend.describe = "sqlite:" + path;
    return backend;
  }
  rotation::PostgresMetadataStore::Options pg;
  pg.tagger = options.tagger;
  if (rotation::IsPostgresUri(options.spec)) {
    pg.conninfo = options.spec;
  } else {
    // A file holding the connection string.
    std::FILE* f = std::fopen(options.spec.c_str(), "rb");
    if (f == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--metadata='", options.spec,
          "' is neither a postgresql:// URI nor a readable file holding a connection string"));
    }
    char buf[4096];
    size_t n = std::fread(buf, 1, sizeof(buf), f);
    std::fclose(f);
    pg.conninfo = std::string(absl::StripAsciiWhitespace(absl::string_view(buf, n)));
  }
  // Checked before any password is read, so the error cannot involve one.
  if (absl::Status s = rotation::CheckConninfo(pg.conninfo); !s.ok()) return s;
  if (!options.password_file.empty()) {
    auto password = ReadSecretFile(options.password_file);
    if (!password.ok()) return password.status();
    pg.password = *std::move(password);
  } else if (!options.password_env.empty()) {
    auto password = ReadSecretEnv(options.password_env.c_str());
    if (password.ok()) pg.password = *std::move(password);
  }
  auto store = rotation::PostgresMetadataStore::Open(std::move(pg));
  if (!store.ok()) return store.status();
  backend.describe = "postgresql " + (*store)->DescribeTarget();
  backend.shared = true;
  backend.store = *std::move(store);
  return backend;
}

}  // namespace custody::server
