#include "tools/custodyctl_commands.h"

#include <vector>

namespace custody::tools {

std::vector<FlagSpec> PolicyFlags() {
  return {{"prepublish", FlagKind::kDuration, "D",
           "publish a new version this long before it signs (default 1h)"},
          {"rotation_period", FlagKind::kDuration, "D",
           "rotate automatically this often (default 0: manual only)"},
          {"retain", FlagKind::kDuration, "D",
           "keep a retired version published this long after its last signature (default 24h)"},
          {"destroy_delay", FlagKind::kDuration, "D",
           "waiting period before a scheduled destruction, cancellable (default 7d)"}};
}

std::vector<FlagSpec> ConnectionFlags() {
  return {{"addr", FlagKind::kString, "ADDR[,ADDR...]",
           "unix:PATH or HOST:PORT; several replicas as a comma-separated list (default "
           "$CUSTODY_ADDR, else unix:.state/custodyd.sock)"},
          {"ca", FlagKind::kString, "PEM", "CA bundle the server certificate chains to (TLS)"},
          {"cert", FlagKind::kString, "PEM", "client certificate chain (mTLS)"},
          {"key", FlagKind::kString, "PEM", "client private key (mTLS)"},
          {"server_name", FlagKind::kString, "NAME", "TLS name expected in the server certificate"},
          {"timeout_ms", FlagKind::kNumber, "N", "deadline of each call (default 30000)"}};
}

const std::vector<CommandSpec>& Commands() {
  static const std::vector<CommandSpec>* commands = [] {
    auto* c = new std::vector<CommandSpec>;
    std::vector<FlagSpec> create = {
        {"purpose", FlagKind::kString, "sign|decrypt", "what the ring's keys do (default sign)"},
        {"alg", FlagKind::kString, "ALG",
         "sign: ES256|ES384|ES512|PS256|EdDSA|RS256; decrypt: RSA-OAEP-256|RSA-OAEP|ECDH-ES"
         "[+A128KW|+A192KW|+A256KW] (required)"},
        {"rsa_bits", FlagKind::kNumber, "N", "RSA modulus: 2048 (default), 3072 or 4096"},
        {"curve", FlagKind::kString, "P-256|P-384|P-521", "ECDH-ES* rings (default P-256)"},
        {"zip_max_bytes", FlagKind::kNumber, "N",
         "decrypt rings: accept JWE \"zip\":\"DEF\" up to N decompressed bytes"},
        {"allow_non_fapi", FlagKind::kBool, "", "allow RS256 (outside FAPI)"},
        {"require_certificate", FlagKind::kBool, "",
         "rotate without --force only to a version that has a certificate"},
        {"import_jwk_file", FlagKind::kString, "FILE", "the first version's key, a private JWK"},
        {"import_pem_file", FlagKind::kString, "FILE", "the first version's key, PKCS#8 PEM"}};
    for (FlagSpec& f : PolicyFlags()) create.push_back(f);
    c->push_back({"ring create",
                  {"NAME"},
                  create,
                  true,
                  "create a key ring; its policy starts from the defaults and each policy flag "
                  "overrides its own field"});
    c->push_back({"ring get", {"NAME"}, {}, true, "show a ring, its versions and policy (JSON)"});
    c->push_back({"ring list",
                  {},
                  {{"prefix", FlagKind::kString, "P", "only rings whose name starts with P"}},
                  true,
                  "list the rings the caller may read"});
    c->push_back({"ring set-policy",
                  {"NAME"},
                  PolicyFlags(),
                  true,
                  "change the named policy fields only (at least one); the others keep their "
                  "values"});
    c->push_back({"ring rotate",
                  {"NAME"},
                  {{"force", FlagKind::kBool, "",
                    "promote at once, even before the PENDING version's prepublish"}},
                  true,
                  "promote the PENDING version when it has been published long enough"});
    for (const char* op : {"disable", "enable", "destroy", "cancel-destroy"}) {
      c->push_back({absl::StrCat("version ", op),
                    {"NAME", "VERSION"},
                    {},
                    true,
                    absl::StrCat(op, " a key version")});
    }
    c->push_back({"version compromise",
                  {"NAME", "VERSION"},
                  {{"reason", FlagKind::kString, "TEXT", "why (audited)"}},
                  true,
                  "unpublish a version at once, schedule its destruction and rotate"});
    c->push_back({"sign",
                  {"NAME"},
                  {{"typ", FlagKind::kString, "TYP", "JWS header typ, e.g. JWT"},
                   {"cty", FlagKind::kString, "CTY", "JWS header cty"},
                   {"header_json", FlagKind::kString, "JSON", "further protected header members"},
                   {"payload_file", FlagKind::kString, "FILE", "the payload (default stdin)"}},
                  true,
                  "sign a payload; prints the compact JWS"});
    c->push_back({"jwks",
                  {"[NAME...]"},
                  {{"watch", FlagKind::kBool, "", "print one line per change of the key set"}},
                  true,
                  "print the published JWKS of the rings (all readable rings when none named)"});
    c->push_back({"decrypt",
                  {"NAME"},
                  {{"jwe_file", FlagKind::kString, "FILE", "the compact JWE (default stdin)"}},
                  true,
                  "decrypt a JWE; prints the raw plaintext"});
    c->push_back({"import",
                  {"NAME"},
                  {{"jwk_file", FlagKind::kString, "FILE", "a private JWK"},
                   {"pem_file", FlagKind::kString, "FILE", "a PKCS#8 PEM private key"}},
                  true,
                  "import your own key as a new PENDING version (exactly one key file)"});
    c->push_back({"csr",
                  {"NAME"},
                  {{"version", FlagKind::kNumber, "N", "the version (default the ACTIVE one)"},
                   {"subject", FlagKind::kString, "/CN=...", "the subject (required)"},
                   {"san", FlagKind::kString, "dns:NAME,uri:URI,...", "subject alternative names"}},
                  true,
                  "a PKCS#10 request signed in custodyd by the version's key (PEM)"});
    c->push_back({"certificate set",
                  {"NAME", "VERSION"},
                  {{"chain_file", FlagKind::kString, "FILE", "PEM chain, leaf first (required)"}},
                  true,
                  "attach an X.509 chain to a published version"});
    c->push_back({"health", {}, {}, true, "grpc.health.v1: prints SERVING and exits 0, else 1"});
    c->push_back({"audit verify",
                  {"FILE..."},
                  {{"state_dir", FlagKind::kString, "DIR",
                    "check against the chain's latest anchor in DIR/metadata.db"},
                   {"anchor", FlagKind::kString, "SEQ:HASH",
                    "check against this anchor (an audit.anchor log line's \"anchor\")"},
                   {"start", FlagKind::kString, "SEQ:HASH",
                    "the files' earlier part was archived: its last line (or an anchor)"}},
                  false,
                  "check the hash chain of audit log files, oldest first, one chain per "
                  "replica"});
    c->push_back({"policy check",
                  {"FILE"},
                  {},
                  false,
                  "validate an access policy file as custodyd would load it; exit 1 with the "
                  "reasons"});
    c->push_back({"policy explain",
                  {"IDENTITY", "OPERATION", "RING"},
                  {{"policy_file", FlagKind::kString, "FILE",
                    "the policy to ask (default .state/policy.json)"}},
                  false,
                  "which grant of a policy file allows IDENTITY to run OPERATION on RING, or why "
                  "none does; exit 0 allowed, 1 denied"});
    return c;
  }();
  return *commands;
}

}  // namespace custody::tools
