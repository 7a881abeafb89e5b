// The public JWKS over HTTP(S) (custodyd --jwks_listen): `GET /rings/NAME/jwks.json` for each
// ring the operator published, and configured alias paths (`/.well-known/jwks.json` → a ring),
// so that a FAPI client's registered jwks_uri, or an authorization server's, can point at
// custody instead of at a small server each deployment writes around GetJwks.
//
// Each answer is the key set and etag GetJwks returns for that ring, from KeyService's in-memory
// snapshot (no I/O per request; a rotation, or a change another replica made, is served from the
// next request on, as WatchJwks pushes it): `ETag`, `Cache-Control: public, max-age` from the
// ring, `Access-Control-Allow-Origin: *` (public keys); `If-None-Match` with the current etag →
// 304. Publishing is opt-in per ring: any other path, including the ring path of a ring that is
// not published, is 404, and so is a published ring that does not exist (yet). No identity is
// asked and nothing is audited: these are the keys a JWKS is for everyone to read.
#ifndef CUSTODY_SERVER_DAEMON_JWKS_HTTP_H_
#define CUSTODY_SERVER_DAEMON_JWKS_HTTP_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "metrics/http_server.h"
#include "server/keys/key_service.h"

namespace custody::server {

struct JwksPublication {
  std::set<std::string> rings;  // served at /rings/NAME/jwks.json
  // path → published rings whose keys it serves as one set (a client's signing and encryption
  // rings at its jwks_uri), with GetJwks's etag of that selection
  std::map<std::string, std::vector<std::string>> aliases;
};

// From --jwks_publish (ring names) and --jwks_alias (PATH=RING[+RING...] entries).
// INVALID_ARGUMENT, naming the entry and what to do, for a malformed ring name or alias, an alias
// path that does not start with '/' or that shadows a /rings/ path, the same path twice, or an
// alias to a ring that is not published (each named).
absl::StatusOr<JwksPublication> ParseJwksPublication(const std::vector<std::string>& publish,
                                                     const std::vector<std::string>& aliases);

// True when an If-None-Match header value names `etag` (strong or weak, or "*").
bool IfNoneMatchHits(absl::string_view if_none_match, absl::string_view etag);

// The request handler for metrics::HttpServer. `keys` must outlive it.
metrics::HttpServer::Handler JwksHandler(const KeyService* keys, JwksPublication publication);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_JWKS_HTTP_H_
