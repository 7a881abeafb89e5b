// An ES256/PS256 JWS verifier written directly on OpenSSL's EVP API for the integration tests:
// independent of jose/ (the code under test) except for its JSON parser. Kids must be the keys'
// RFC 7638 thumbprints, the contract for keys custody generates.
#ifndef CUSTODY_TESTS_TESTING_INDEPENDENT_JWS_H_
#define CUSTODY_TESTS_TESTING_INDEPENDENT_JWS_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "jose/json.h"
#include "openssl/evp.h"

namespace custody::testing {

using PkeyPtr = std::shared_ptr<EVP_PKEY>;

// Strict base64url (RFC 4648 §5, no padding, canonical trailing bits).
std::optional<std::string> B64UrlDecode(std::string_view in);
std::string B64UrlEncode(std::string_view in);
std::string Sha256Digest(std::string_view data);  // raw 32 bytes
// A string member of a JSON object, "" when absent or not a string.
const std::string& JsonString(const jose::Json& object, std::string_view name);
// RFC 7638 §3.2 thumbprint (SHA-256, base64url) of an EC or RSA public JWK.
std::string Thumbprint(const jose::Json& jwk);

struct ParsedJws {
  std::string signing_input;
  jose::Json header;
  std::string payload;
  std::string signature;
};
std::optional<ParsedJws> ParseCompactJws(const std::string& jws, std::string* error);

struct VerifyKey {
  std::string alg;  // "ES256" or "PS256"
  PkeyPtr key;
};
using JwsKeys = std::map<std::string, VerifyKey>;  // by kid

// Adds the ES256 and PS256 keys of a JWKS to `keys` (other algs are skipped). Each must have
// "use":"sig", no private member, valid key material (OpenSSL's public-key check) and a kid that
// is its thumbprint. "" or the first problem.
std::string AddJwks(const std::string& jwks, JwsKeys& keys);
// The same into a fresh map; *error gets the problem ("" when none).
JwsKeys JwsKeysOf(const std::string& jwks, std::string* error);

// "" when `jws` is a compact JWS whose header names a kid of `keys` with that key's alg and
// whose signature verifies; else why not. *kid and *payload are filled from the JWS.
std::string VerifyJws(const JwsKeys& keys, const std::string& jws, std::string* kid = nullptr,
                      std::string* payload = nullptr);

}  // namespace custody::testing

#endif  // CUSTODY_TESTS_TESTING_INDEPENDENT_JWS_H_
