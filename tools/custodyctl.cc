// custodyctl: the operators' command line for custodyd. Output is JSON, except a compact JWS.
//
//   custodyctl [--addr=ADDR] ring create NAME --purpose=sign --alg=ES256|PS256|EdDSA|RS256
//              [--rsa_bits=N] [--allow_non_fapi]
//   custodyctl ring get NAME | ring list [--prefix=P]
//   custodyctl sign NAME [--typ=JWT] [--cty=C] [--header_json=JSON] [--payload_file=F]
//   custodyctl jwks [NAME...] [--watch]        (--watch: one line per change of the key set)
//   custodyctl ring set-policy NAME [--prepublish=D] [--rotation_period=D] [--retain=D]
//              [--destroy_delay=D]              (D: 90d, 12h, 30m, 10s, 500ms; 0 = off/none)
//   custodyctl ring rotate NAME [--force]
//   custodyctl version disable|enable|destroy|cancel-destroy NAME VERSION
//   custodyctl version compromise NAME VERSION [--reason=TEXT]
//   custodyctl decrypt NAME [--jwe_file=F]          (stdin when no file; raw plaintext out)
//   custodyctl import NAME --jwk_file=F | --pem_file=F
//   custodyctl csr NAME [--version=N] --subject=/CN=... [--san=dns:NAME,uri:URI,...]
//   custodyctl certificate set NAME VERSION --chain_file=F   (PEM, leaf first)
//   ring create also takes --require_certificate (rotate without --force needs a certificate).
//   custodyctl audit verify FILE...   (local: checks audit log files in order; no server)
//   ring create also takes --curve=P-256|P-384|P-521, --zip_max_bytes=N (DECRYPT rings) and
//   --import_jwk_file=F | --import_pem_file=F (the first version imported, not generated).
//
// Flags may appear anywhere. ADDR defaults to $CUSTODY_ADDR, else unix:.state/custodyd.sock.
// TLS: --ca=PEM [--cert=PEM --key=PEM] [--server_name=NAME]. Exit 0 ok, 1 call failed, 2 usage.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/channel.h"
#include "client/client.h"
#include "common/log.h"
#include "custody/v1/custody.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "openssl/crypto.h"
#include "server/audit_log.h"

namespace {

constexpr char kUsage[] =
    "usage: custodyctl [--addr=ADDR] COMMAND\n"
    "  ring create NAME --purpose=sign|decrypt --alg=ALG [--rsa_bits=N]\n"
    "      sign: ES256|ES384|ES512|PS256|EdDSA|RS256; decrypt: "
    "RSA-OAEP-256|RSA-OAEP|ECDH-ES[+A128KW|...]\n"
    "                   [--allow_non_fapi]\n"
    "  ring get NAME\n"
    "  ring list [--prefix=P]\n"
    "  sign NAME [--typ=JWT] [--cty=C] [--header_json=JSON] [--payload_file=F]  (stdin if no F)\n"
    "  jwks [NAME...] [--watch]\n"
    "  ring set-policy NAME [--prepublish=D] [--rotation_period=D] [--retain=D]\n"
    "                       [--destroy_delay=D]   (D: 90d 12h 30m 10s 500ms)\n"
    "  ring rotate NAME [--force]\n"
    "  version disable|enable|destroy|cancel-destroy NAME VERSION\n"
    "  version compromise NAME VERSION [--reason=TEXT]\n"
    "  decrypt NAME [--jwe_file=F]   (stdin if no F; prints the raw plaintext)\n"
    "  csr NAME [--version=N] --subject=/CN=... [--san=dns:NAME,uri:URI,...]   (PEM out)\n"
    "  certificate set NAME VERSION --chain_file=F   (PEM chain, leaf first)\n"
    "  import NAME --jwk_file=F | --pem_file=F   (a private key, as a new PENDING version)\n"
    "  audit verify FILE...   (audit log files, oldest first, one chain per replica; local)\n"
    "  health   (grpc.health.v1: prints SERVING and exits 0, else exits 1; for probes)\n"
    "  ring create also takes --curve=P-256|P-384|P-521 --zip_max_bytes=N and the\n"
    "                         set-policy flags\n"
    "                         --import_jwk_file=F | --import_pem_file=F\n"
    "flags: --addr=unix:PATH|HOST:PORT --ca=PEM --cert=PEM --key=PEM --server_name=N "
    "--timeout_ms=N\n";

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;

  std::string Flag(const std::string& name, const std::string& fallback = "") const {
    auto it = flags.find(name);
    return it == flags.end() ? fallback : it->second;
  }
  bool Has(const std::string& name) const { return flags.count(name) > 0; }
};

int Usage(const std::string& why) {
  std::cerr << "custodyctl: " << why << "\n" << kUsage;
  return 2;
}

int Failed(const grpc::Status& status) {
  // gRPC's code numbers are Abseil's (both follow google.rpc.Code), and so are the names.
  std::string code = absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()));
  std::cerr << "custodyctl: " << (code.empty() ? "UNKNOWN" : code) << ": " << status.error_message()
            << "\n";
  return 1;
}

// Checks the hash chain of audit log files: {"ok":true,"lines":N,"last_hash":H} (keep H elsewhere
// to detect a truncated tail later), or {"ok":false,"error":"FILE:LINE: reason"} and exit 1.
// Replicas' files (audit-REPLICA-NNNNNN.jsonl) are checked as one chain per replica:
// {"ok":true,"chains":[{"replica":R,"files":F,"lines":N,"last_hash":H},...]}.
int AuditVerify(const std::vector<std::string>& files) {
  auto chains = custody::server::VerifyAuditChains(files);
  std::string out;
  if (!chains.ok()) {
    out = "{\"ok\":false,\"error\":";
    custody::AppendJsonString(out, chains.status().message());
    out += "}";
  } else if (chains->size() == 1 && chains->front().replica.empty()) {
    out = absl::StrCat("{\"ok\":true,\"lines\":", chains->front().lines, ",\"last_hash\":\"",
                       chains->front().last_hash, "\"}");
  } else {
    out = "{\"ok\":true,\"chains\":[";
    for (size_t i = 0; i < chains->size(); ++i) {
      const auto& c = (*chains)[i];
      if (i > 0) out += ",";
      out += "{\"replica\":";
      custody::AppendJsonString(out, c.replica);
      absl::StrAppend(&out, ",\"files\":", c.files, ",\"lines\":", c.lines, ",\"last_hash\":\"",
                      c.last_hash, "\"}");
    }
    out += "]}";
  }
  std::cout << out << "\n";
  return chains.ok() ? 0 : 1;
}

int PrintJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) {
    std::cerr << "custodyctl: cannot render the reply as JSON\n";
    return 1;
  }
  std::cout << json;
  return 0;
}

bool ReadAll(const std::string& path, std::string* out) {
  std::FILE* f = path.empty() ? stdin : std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  char buf[8192];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out->append(buf, n);
  bool ok = !std::ferror(f);
  if (f != stdin) std::fclose(f);
  return ok;
}

class Ctl {
 public:
  Ctl(std::shared_ptr<grpc::Channel> channel, int timeout_ms)
      : admin_(custody::v1::KeyAdmin::NewStub(channel)),
        signer_(custody::v1::Signer::NewStub(channel)),
        health_(grpc::health::v1::Health::NewStub(channel)),
        client_(IdempotentCalls(channel, timeout_ms)),
        timeout_ms_(timeout_ms) {}

  int Run(const Args& args) {
    const auto& p = args.positional;
    if (p.empty()) return Usage("no command");
    if (p[0] == "audit") {
      if (p.size() >= 3 && p[1] == "verify") return AuditVerify({p.begin() + 2, p.end()});
      return Usage("audit verify needs one or more files, oldest first");
    }
    if (p[0] == "ring" && p.size() >= 2) {
      if (p[1] == "create" && p.size() == 3) return RingCreate(p[2], args);
      if (p[1] == "get" && p.size() == 3) return RingGet(p[2]);
      if (p[1] == "list" && p.size() == 2) return RingList(args.Flag("prefix"));
      if (p[1] == "set-policy" && p.size() == 3) return SetPolicy(p[2], args);
      if (p[1] == "rotate" && p.size() == 3) return Rotate(p[2], args.Has("force"));
    }
    if (p[0] == "version" && p.size() == 4) return VersionOp(p[1], p[2], p[3], args);
    if (p[0] == "sign" && p.size() == 2) return Sign(p[1], args);
    if (p[0] == "jwks") return Jwks({p.begin() + 1, p.end()}, args.Has("watch"));
    if (p[0] == "decrypt" && p.size() == 2) return Decrypt(p[1], args);
    if (p[0] == "import" && p.size() == 2) return Import(p[1], args);
    if (p[0] == "csr" && p.size() == 2) return Csr(p[1], args);
    if (p[0] == "certificate" && p.size() == 4 && p[1] == "set") {
      return CertificateSet(p[2], p[3], args);
    }
    if (p[0] == "health" && p.size() == 1) return Health();
    return Usage(absl::StrCat("unknown command '", p[0], p.size() > 1 ? " " + p[1] : "", "'"));
  }

 private:
  int Health() {
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    auto ctx = Context();
    grpc::Status status = health_->Check(ctx.get(), req, &resp);
    if (!status.ok()) return Failed(status);
    std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
    return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  }

  // The client library's retry policy for idempotent calls (sign, decrypt, reads): UNAVAILABLE
  // is retried, on another replica when --addr lists several, until --timeout_ms. Lifecycle
  // calls go once (Context()).
  static std::unique_ptr<custody::client::Client> IdempotentCalls(
      std::shared_ptr<grpc::Channel> channel, int timeout_ms) {
    custody::client::ClientOptions options;
    options.deadline = absl::Milliseconds(timeout_ms > 0 ? timeout_ms : 1);
    options.max_rpcs_in_flight = 0;
    return *custody::client::Client::FromChannel(std::move(channel), options);
  }
  template <typename Rpc>
  grpc::Status Idempotent(Rpc rpc) const {
    absl::Status s = client_->CallIdempotent(rpc);
    return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
  }

  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms_));
    return ctx;
  }

  int RingCreate(const std::string& name, const Args& args) {
    custody::v1::CreateKeyRingRequest req;
    req.set_name(name);
    std::string purpose = absl::AsciiStrToLower(args.Flag("purpose", "sign"));
    if (purpose == "sign") {
      req.set_purpose(custody::v1::SIGN);
    } else if (purpose == "decrypt") {
      req.set_purpose(custody::v1::DECRYPT);
    } else {
      return Usage("--purpose must be sign or decrypt");
    }
    if (!args.Has("alg")) return Usage("--alg is required");
    req.set_alg(args.Flag("alg"));
    if (args.Has("rsa_bits")) {
      uint32_t bits = 0;
      if (!absl::SimpleAtoi(args.Flag("rsa_bits"), &bits)) return Usage("--rsa_bits: a number");
      req.set_rsa_bits(bits);
    }
    req.set_curve(args.Flag("curve"));
    req.set_require_certificate(args.Has("require_certificate"));
    if (args.Has("zip_max_bytes")) {
      uint32_t zip = 0;
      if (!absl::SimpleAtoi(args.Flag("zip_max_bytes"), &zip)) {
        return Usage("--zip_max_bytes: a number");
      }
      req.set_zip_max_bytes(zip);
    }
    if (args.Has("import_jwk_file") || args.Has("import_pem_file")) {
      if (int rc = ReadKeyMaterial(args.Flag("import_jwk_file"), args.Flag("import_pem_file"),
                                   req.mutable_import_key());
          rc != 0) {
        return rc;
      }
    }
    if (HasPolicyFlags(args)) {
      if (int rc = PolicyFromFlags(args, custody::v1::RotationPolicy(), req.mutable_policy());
          rc != 0) {
        return rc;
      }
    }
    std::string non_fapi = args.Flag("allow_non_fapi", "false");
    req.set_allow_non_fapi(args.Has("allow_non_fapi") && non_fapi != "false" && non_fapi != "0");
    custody::v1::KeyRing ring;
    auto ctx = Context();
    grpc::Status s = admin_->CreateKeyRing(ctx.get(), req, &ring);
    Wipe(req.mutable_import_key()->mutable_private_jwk());
    Wipe(req.mutable_import_key()->mutable_pkcs8_pem());
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  int RingGet(const std::string& name) {
    custody::v1::GetKeyRingRequest req;
    req.set_name(name);
    custody::v1::KeyRing ring;
    grpc::Status s =
        Idempotent([&](grpc::ClientContext& ctx) { return admin_->GetKeyRing(&ctx, req, &ring); });
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  int RingList(const std::string& prefix) {
    custody::v1::ListKeyRingsRequest req;
    req.set_prefix(prefix);
    custody::v1::ListKeyRingsResponse resp;
    grpc::Status s = Idempotent(
        [&](grpc::ClientContext& ctx) { return admin_->ListKeyRings(&ctx, req, &resp); });
    return s.ok() ? PrintJson(resp) : Failed(s);
  }

  int Sign(const std::string& name, const Args& args) {
    custody::v1::SignJwsRequest req;
    req.set_ring(name);
    req.set_typ(args.Flag("typ"));
    req.set_cty(args.Flag("cty"));
    req.set_extra_header_json(args.Flag("header_json"));
    if (!ReadAll(args.Flag("payload_file"), req.mutable_payload())) {
      std::cerr << "custodyctl: cannot read the payload\n";
      return 2;
    }
    custody::v1::SignJwsResponse resp;
    grpc::Status s =
        Idempotent([&](grpc::ClientContext& ctx) { return signer_->SignJws(&ctx, req, &resp); });
    if (!s.ok()) return Failed(s);
    std::cout << resp.jws() << "\n";
    return 0;
  }

  static bool HasPolicyFlags(const Args& args) {
    return args.Has("prepublish") || args.Has("rotation_period") || args.Has("retain") ||
           args.Has("destroy_delay");
  }

  // "90d", "12h", "30m", "10s", "500ms", "0" → milliseconds; -1 when unparsable.
  static int64_t ParseDurationMs(const std::string& text) {
    if (text == "0") return 0;
    if (text.size() > 1 && text.back() == 'd') {
      int64_t days = 0;
      return absl::SimpleAtoi(text.substr(0, text.size() - 1), &days) && days >= 0
                 ? days * 24 * 3600 * 1000
                 : -1;
    }
    absl::Duration d;
    if (!absl::ParseDuration(text, &d) || d < absl::ZeroDuration()) return -1;
    return absl::ToInt64Milliseconds(d);
  }

  // Fills `out` from `base` overridden by the flags given.
  static int PolicyFromFlags(const Args& args, const custody::v1::RotationPolicy& base,
                             custody::v1::RotationPolicy* out) {
    *out = base;
    struct Field {
      const char* flag;
      void (custody::v1::RotationPolicy::*set)(int64_t);
    };
    for (const Field& f :
         {Field{"prepublish", &custody::v1::RotationPolicy::set_prepublish_ms},
          Field{"rotation_period", &custody::v1::RotationPolicy::set_rotation_period_ms},
          Field{"retain", &custody::v1::RotationPolicy::set_retain_ms},
          Field{"destroy_delay", &custody::v1::RotationPolicy::set_destroy_delay_ms}}) {
      if (!args.Has(f.flag)) continue;
      int64_t ms = ParseDurationMs(args.Flag(f.flag));
      if (ms < 0) return Usage(absl::StrCat("--", f.flag, ": a duration such as 90d, 12h, 500ms"));
      (out->*f.set)(ms);
    }
    return 0;
  }

  int SetPolicy(const std::string& name, const Args& args) {
    custody::v1::GetKeyRingRequest get;
    get.set_name(name);
    custody::v1::KeyRing ring;
    auto get_ctx = Context();
    grpc::Status s = admin_->GetKeyRing(get_ctx.get(), get, &ring);
    if (!s.ok()) return Failed(s);
    custody::v1::UpdateRotationPolicyRequest req;
    req.set_ring(name);
    if (int rc = PolicyFromFlags(args, ring.policy(), req.mutable_policy()); rc != 0) return rc;
    auto ctx = Context();
    s = admin_->UpdateRotationPolicy(ctx.get(), req, &ring);
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  // PKCS#10 CSR built and signed inside custodyd (the version may still be PENDING); PEM out.
  int Csr(const std::string& name, const Args& args) {
    custody::v1::CreateCertificateRequestRequest req;
    req.set_ring(name);
    if (args.Has("version")) {
      uint32_t version = 0;
      if (!absl::SimpleAtoi(args.Flag("version"), &version) || version == 0) {
        return Usage("--version: a number");
      }
      req.set_version(version);
    }
    if (!args.Has("subject")) return Usage("csr needs --subject=/CN=...");
    req.set_subject(args.Flag("subject"));
    if (args.Has("san")) {
      for (absl::string_view san : absl::StrSplit(args.Flag("san"), ',')) {
        req.add_sans(std::string(san));
      }
    }
    custody::v1::CertificateRequest resp;
    auto ctx = Context();
    grpc::Status s = admin_->CreateCertificateRequest(ctx.get(), req, &resp);
    if (!s.ok()) return Failed(s);
    std::cout << resp.pem();
    return 0;
  }

  int CertificateSet(const std::string& name, const std::string& number, const Args& args) {
    custody::v1::SetCertificateRequest req;
    req.set_ring(name);
    uint32_t version = 0;
    if (!absl::SimpleAtoi(number, &version) || version == 0) return Usage("VERSION: a number");
    req.set_version(version);
    if (!args.Has("chain_file")) return Usage("certificate set needs --chain_file=PEM");
    if (!ReadAll(args.Flag("chain_file"), req.mutable_chain_pem()) || req.chain_pem().empty()) {
      std::cerr << "custodyctl: cannot read " << args.Flag("chain_file") << "\n";
      return 1;
    }
    custody::v1::KeyRing ring;
    auto ctx = Context();
    grpc::Status s = admin_->SetCertificate(ctx.get(), req, &ring);
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  int Rotate(const std::string& name, bool force) {
    custody::v1::RotateKeyRingRequest req;
    req.set_ring(name);
    req.set_force(force);
    custody::v1::RotateKeyRingResponse resp;
    auto ctx = Context();
    grpc::Status s = admin_->RotateKeyRing(ctx.get(), req, &resp);
    return s.ok() ? PrintJson(resp) : Failed(s);
  }

  int VersionOp(const std::string& op, const std::string& name, const std::string& number,
                const Args& args) {
    uint32_t version = 0;
    if (!absl::SimpleAtoi(number, &version) || version == 0) return Usage("VERSION: a number");
    custody::v1::KeyRing ring;
    auto ctx = Context();
    grpc::Status s;
    if (op == "compromise") {
      custody::v1::CompromiseKeyVersionRequest req;
      req.set_ring(name);
      req.set_version(version);
      req.set_reason(args.Flag("reason"));
      s = admin_->CompromiseKeyVersion(ctx.get(), req, &ring);
    } else {
      custody::v1::KeyVersionRequest req;
      req.set_ring(name);
      req.set_version(version);
      if (op == "disable") {
        s = admin_->DisableKeyVersion(ctx.get(), req, &ring);
      } else if (op == "enable") {
        s = admin_->EnableKeyVersion(ctx.get(), req, &ring);
      } else if (op == "destroy") {
        s = admin_->ScheduleKeyVersionDestruction(ctx.get(), req, &ring);
      } else if (op == "cancel-destroy") {
        s = admin_->CancelKeyVersionDestruction(ctx.get(), req, &ring);
      } else {
        return Usage(absl::StrCat("unknown version operation '", op, "'"));
      }
    }
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  int Jwks(const std::vector<std::string>& rings, bool watch) {
    if (watch) {
      custody::v1::WatchJwksRequest req;
      for (const auto& r : rings) req.add_rings(r);
      grpc::ClientContext ctx;  // no deadline: runs until interrupted
      auto reader = signer_->WatchJwks(&ctx, req);
      custody::v1::GetJwksResponse message;
      while (reader->Read(&message)) std::cout << message.jwks() << std::endl;
      grpc::Status s = reader->Finish();
      return s.ok() ? 0 : Failed(s);
    }
    custody::v1::GetJwksRequest req;
    for (const auto& r : rings) req.add_rings(r);
    custody::v1::GetJwksResponse resp;
    grpc::Status s =
        Idempotent([&](grpc::ClientContext& ctx) { return signer_->GetJwks(&ctx, req, &resp); });
    if (!s.ok()) return Failed(s);
    std::cout << resp.jwks() << "\n";
    return 0;
  }

  // Reads a private key file into `out` (one of the two paths must be set).
  static int ReadKeyMaterial(const std::string& jwk_file, const std::string& pem_file,
                             custody::v1::PrivateKeyMaterial* out) {
    if (jwk_file.empty() == pem_file.empty()) return Usage("give exactly one key file");
    std::string* target = jwk_file.empty() ? out->mutable_pkcs8_pem() : out->mutable_private_jwk();
    if (!ReadAll(jwk_file.empty() ? pem_file : jwk_file, target) || target->empty()) {
      std::cerr << "custodyctl: cannot read the key file\n";
      return 2;
    }
    return 0;
  }

  int Import(const std::string& name, const Args& args) {
    custody::v1::ImportKeyVersionRequest req;
    req.set_ring(name);
    if (int rc = ReadKeyMaterial(args.Flag("jwk_file"), args.Flag("pem_file"), req.mutable_key());
        rc != 0) {
      return rc;
    }
    custody::v1::KeyRing ring;
    auto ctx = Context();
    grpc::Status s = admin_->ImportKeyVersion(ctx.get(), req, &ring);
    Wipe(req.mutable_key()->mutable_private_jwk());
    Wipe(req.mutable_key()->mutable_pkcs8_pem());
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  static void Wipe(std::string* s) {
    if (!s->empty()) OPENSSL_cleanse(s->data(), s->size());
  }

  int Decrypt(const std::string& name, const Args& args) {
    custody::v1::DecryptJweRequest req;
    req.set_ring(name);
    std::string jwe;
    if (!ReadAll(args.Flag("jwe_file"), &jwe)) {
      std::cerr << "custodyctl: cannot read the JWE\n";
      return 2;
    }
    // Compact JWEs have no whitespace; a trailing newline from a file or echo is not part of it.
    while (!jwe.empty() && (jwe.back() == '\n' || jwe.back() == '\r' || jwe.back() == ' ')) {
      jwe.pop_back();
    }
    req.set_jwe(jwe);
    custody::v1::DecryptJweResponse resp;
    grpc::Status s =
        Idempotent([&](grpc::ClientContext& ctx) { return signer_->DecryptJwe(&ctx, req, &resp); });
    if (!s.ok()) return Failed(s);
    std::cout.write(resp.plaintext().data(), static_cast<std::streamsize>(resp.plaintext().size()));
    std::cout.flush();
    Wipe(resp.mutable_plaintext());
    return 0;
  }

  std::unique_ptr<custody::v1::KeyAdmin::Stub> admin_;
  std::unique_ptr<custody::v1::Signer::Stub> signer_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::unique_ptr<custody::client::Client> client_;
  int timeout_ms_;
};

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (a.rfind("--", 0) == 0) {
      size_t eq = a.find('=');
      args.flags[a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2)] =
          eq == std::string::npos ? "true" : a.substr(eq + 1);
    } else {
      args.positional.push_back(a);
    }
  }
  custody::client::ChannelOptions options;
  const char* env_addr = std::getenv("CUSTODY_ADDR");
  options.address = args.Flag("addr", env_addr ? env_addr : "unix:.state/custodyd.sock");
  options.ca_file = args.Flag("ca");
  options.cert_file = args.Flag("cert");
  options.key_file = args.Flag("key");
  options.server_name = args.Flag("server_name");
  int timeout_ms = 30000;
  if (args.Has("timeout_ms") && !absl::SimpleAtoi(args.Flag("timeout_ms"), &timeout_ms)) {
    return Usage("--timeout_ms: a number");
  }
  auto channel = custody::client::CreateChannel(options);
  if (!channel.ok()) return Usage(std::string(channel.status().message()));
  return Ctl(*channel, timeout_ms).Run(args);
}
