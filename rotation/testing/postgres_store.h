// Opens the PostgreSQL metadata store on a database of the test binary's cluster, with the
// cluster's password, as the store tests need it.
#ifndef CUSTODY_ROTATION_TESTING_POSTGRES_STORE_H_
#define CUSTODY_ROTATION_TESTING_POSTGRES_STORE_H_

#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "common/secret.h"
#include "rotation/postgres_metadata_store.h"
#include "rotation/testing/postgres_cluster.h"

namespace custody::rotation::testing {

inline absl::StatusOr<std::unique_ptr<PostgresMetadataStore>> OpenPostgresStore(
    PostgresCluster& cluster, const std::string& db, const RecordTagger* tagger = nullptr) {
  PostgresMetadataStore::Options options;
  options.tagger = tagger;
  options.conninfo = cluster.Conninfo(db);
  auto password = ReadSecretFile(cluster.password_file());
  if (!password.ok()) return password.status();
  options.password = *std::move(password);
  return PostgresMetadataStore::Open(std::move(options));
}

}  // namespace custody::rotation::testing

#endif  // CUSTODY_ROTATION_TESTING_POSTGRES_STORE_H_
