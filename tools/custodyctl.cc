// custodyctl: the operators' command line for custodyd. Output is JSON, except a compact JWS,
// a CSR and plaintexts. The commands and their flags are the table of tools/custodyctl_commands.cc
// (Commands()); anything
// else is refused with exit status 2 (tools/command_line.h). `custodyctl --help` lists the
// commands, `custodyctl COMMAND --help` the flags of one. Exit 0 ok, 1 the call failed, 2 usage.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/channel.h"
#include "client/client.h"
#include "common/log.h"
#include "common/version.h"
#include "custody/v1/custody.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "openssl/crypto.h"
#include "rotation/key_ring.h"
#include "rotation/sqlite_metadata_store.h"
#include "server/security/audit_verify.h"
#include "tools/command_line.h"
#include "tools/custodyctl_commands.h"
#include "tools/policy_commands.h"

namespace {

using custody::tools::Commands;
using custody::tools::CommandSpec;
using custody::tools::ConnectionFlags;
using custody::tools::FlagKind;
using custody::tools::FlagSpec;
using custody::tools::PolicyFlags;
using Args = custody::tools::ParsedCommand;

int Usage(const std::string& why) {
  std::cerr << "custodyctl: " << why << "\n";
  return 2;
}

bool ParseVersion(const std::string& number, uint32_t* version) {
  return absl::SimpleAtoi(number, version) && *version > 0;
}

int VersionUsage(const std::string& number) {
  return Usage(
      absl::StrCat("VERSION '", number, "': a version number such as 1 (ring get lists them)"));
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
// --anchor=SEQ:HASH (the latest "audit.anchor" log line) or --state_dir=DIR (the anchors in
// DIR/metadata.db) check that the files reach the anchor: "truncated: anchor at seq 812, file
// ends at 790". --start=SEQ:HASH verifies files whose earlier part was archived.
int AuditVerify(const std::vector<std::string>& files, const Args& args) {
  std::map<std::string, custody::server::AuditAnchors> anchors;
  std::set<std::string> chains_given;
  for (const std::string& f : files) chains_given.insert(custody::server::AuditFileReplica(f));
  for (const char* flag : {"anchor", "start"}) {
    if (!args.Has(flag)) continue;
    if (chains_given.size() != 1) {
      return Usage(absl::StrCat("--", flag, " applies to one chain; give one replica's files"));
    }
    auto point = custody::server::ParseAuditChainPoint(args.Flag(flag));
    if (!point.ok()) return Usage(absl::StrCat("--", flag, ": ", point.status().message()));
    auto& a = anchors[*chains_given.begin()];
    (std::string(flag) == "anchor" ? a.end : a.start) = *point;
  }
  if (args.Has("state_dir") && !args.Has("anchor")) {
    for (const std::string& chain : chains_given) {
      auto stored =
          custody::rotation::ReadSqliteAuditAnchor(args.Flag("state_dir") + "/metadata.db", chain);
      if (absl::IsNotFound(stored.status())) continue;
      if (!stored.ok()) {
        std::cerr << "custodyctl: " << stored.status().message() << "\n";
        return 1;
      }
      anchors[chain].end = custody::server::AuditChainPoint{stored->seq, stored->hash};
    }
  }
  auto chains = custody::server::VerifyAuditChains(files, anchors);
  std::string out;
  if (!chains.ok()) {
    out = "{\"ok\":false,\"error\":";
    custody::AppendJsonString(out, chains.status().message());
    out += "}";
  } else if (chains->size() == 1 && chains->front().replica.empty()) {
    out = absl::StrCat("{\"ok\":true,\"lines\":", chains->front().lines, ",\"last_hash\":\"",
                       chains->front().last_hash, "\",\"first_seq\":", chains->front().first_seq,
                       ",\"last_seq\":", chains->front().last_seq,
                       ",\"anchored\":", chains->front().end_anchored ? "true" : "false", "}");
  } else {
    out = "{\"ok\":true,\"chains\":[";
    for (size_t i = 0; i < chains->size(); ++i) {
      const auto& c = (*chains)[i];
      if (i > 0) out += ",";
      out += "{\"replica\":";
      custody::AppendJsonString(out, c.replica);
      absl::StrAppend(&out, ",\"files\":", c.files, ",\"lines\":", c.lines, ",\"last_hash\":\"",
                      c.last_hash, "\",\"last_seq\":", c.last_seq,
                      ",\"anchored\":", c.end_anchored ? "true" : "false", "}");
    }
    out += "]}";
  }
  std::cout << out << "\n";
  return chains.ok() ? 0 : 1;
}

int PrintLine(const std::string& text) {
  std::cout << text << "\n";
  return 0;
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
  // An operator who forgot the file or the pipe would otherwise wait on a silent terminal.
  if (path.empty() && isatty(STDIN_FILENO)) {
    std::cerr << "custodyctl: reading from the terminal; end with Ctrl-D (or give a file flag)\n";
  }
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
  // `replicas`: --addr names several replicas (a list, or a dns:/// name).
  Ctl(std::shared_ptr<grpc::Channel> channel, int timeout_ms, bool replicas)
      : admin_(custody::v1::KeyAdmin::NewStub(channel)),
        signer_(custody::v1::Signer::NewStub(channel)),
        health_(grpc::health::v1::Health::NewStub(channel)),
        client_(IdempotentCalls(channel, timeout_ms, replicas)),
        timeout_ms_(timeout_ms) {}

  int Run(const Args& args) {
    const std::string& command = args.command->name;
    const auto& p = args.operands;
    if (command == "ring create") return RingCreate(p[0], args);
    if (command == "ring get") return RingGet(p[0]);
    if (command == "ring list") return RingList(args.Flag("prefix"));
    if (command == "ring set-policy") return SetPolicy(p[0], args);
    if (command == "ring rotate") return Rotate(p[0], args.Bool("force"));
    if (absl::StartsWith(command, "version ")) {
      return VersionOp(command.substr(8), p[0], p[1], args);
    }
    if (command == "sign") return Sign(p[0], args);
    if (command == "jwks") return Jwks(p, args.Bool("watch"));
    if (command == "decrypt") return Decrypt(p[0], args);
    if (command == "import") return Import(p[0], args);
    if (command == "csr") return Csr(p[0], args);
    if (command == "certificate set") return CertificateSet(p[0], p[1], args);
    if (command == "health") return Health();
    return Usage(absl::StrCat("'", command, "' is not implemented"));
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

  // The client library's retry policy for idempotent calls (sign, decrypt, reads): with several
  // replicas, UNAVAILABLE is retried on another one until --timeout_ms; with one address the
  // call goes once, so that a custodyd that is down (or a mistyped --addr) is reported at once.
  // Lifecycle calls always go once (Context()).
  static std::unique_ptr<custody::client::Client> IdempotentCalls(
      std::shared_ptr<grpc::Channel> channel, int timeout_ms, bool replicas) {
    custody::client::ClientOptions options;
    options.deadline = absl::Milliseconds(timeout_ms > 0 ? timeout_ms : 1);
    options.max_attempts = replicas ? 0 : 1;
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
    if (!args.Has("alg"))
      return Usage("ring create needs --alg=ALG (custodyctl ring create --help)");
    req.set_alg(args.Flag("alg"));
    req.set_rsa_bits(args.Number("rsa_bits"));
    req.set_curve(args.Flag("curve"));
    req.set_require_certificate(args.Bool("require_certificate"));
    req.set_zip_max_bytes(args.Number("zip_max_bytes"));
    if (args.Has("import_jwk_file") || args.Has("import_pem_file")) {
      if (int rc = ReadKeyMaterial(args.Flag("import_jwk_file"), args.Flag("import_pem_file"),
                                   req.mutable_import_key());
          rc != 0) {
        return rc;
      }
    }
    // A policy flag overrides its own field of the documented default policy; without any the
    // request carries none and the ring keeps the server's defaults (not explicit).
    if (HasPolicyFlags(args)) PolicyFromFlags(args, DefaultPolicy(), req.mutable_policy());
    req.set_allow_non_fapi(args.Bool("allow_non_fapi"));
    custody::v1::KeyRing ring;
    auto ctx = Context();
    grpc::Status s = admin_->CreateKeyRing(ctx.get(), req, &ring);
    Wipe(req.mutable_import_key());
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
    return s.ok() ? PrintLine(resp.jws()) : Failed(s);
  }

  static bool HasPolicyFlags(const Args& args) {
    for (const FlagSpec& f : PolicyFlags()) {
      if (args.Has(f.name)) return true;
    }
    return false;
  }

  // The policy a ring gets without one (docs/lifecycle.md; rotation::RotationPolicy's defaults).
  static custody::v1::RotationPolicy DefaultPolicy() {
    const custody::rotation::RotationPolicy defaults;
    custody::v1::RotationPolicy policy;
    policy.set_prepublish_ms(defaults.prepublish_ms);
    policy.set_rotation_period_ms(defaults.rotation_period_ms);
    policy.set_retain_ms(defaults.retain_ms);
    policy.set_destroy_delay_ms(defaults.destroy_delay_ms);
    return policy;
  }

  // Fills `out` from `base` overridden by the flags given (already checked to be durations).
  static void PolicyFromFlags(const Args& args, const custody::v1::RotationPolicy& base,
                              custody::v1::RotationPolicy* out) {
    *out = base;
    if (args.Has("prepublish")) out->set_prepublish_ms(args.DurationMs("prepublish"));
    if (args.Has("rotation_period")) {
      out->set_rotation_period_ms(args.DurationMs("rotation_period"));
    }
    if (args.Has("retain")) out->set_retain_ms(args.DurationMs("retain"));
    if (args.Has("destroy_delay")) out->set_destroy_delay_ms(args.DurationMs("destroy_delay"));
  }

  // Reads the ring's policy and changes only the fields named by flags.
  int SetPolicy(const std::string& name, const Args& args) {
    if (!HasPolicyFlags(args)) {
      return Usage(
          "ring set-policy needs at least one of --prepublish, --rotation_period, --retain, "
          "--destroy_delay");
    }
    custody::v1::GetKeyRingRequest get;
    get.set_name(name);
    custody::v1::KeyRing ring;
    auto get_ctx = Context();
    grpc::Status s = admin_->GetKeyRing(get_ctx.get(), get, &ring);
    if (!s.ok()) return Failed(s);
    custody::v1::UpdateRotationPolicyRequest req;
    req.set_ring(name);
    PolicyFromFlags(args, ring.policy(), req.mutable_policy());
    auto ctx = Context();
    s = admin_->UpdateRotationPolicy(ctx.get(), req, &ring);
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  // PKCS#10 CSR built and signed inside custodyd (the version may still be PENDING); PEM out.
  int Csr(const std::string& name, const Args& args) {
    custody::v1::CreateCertificateRequestRequest req;
    req.set_ring(name);
    if (args.Has("version")) {
      if (args.Number("version") == 0) return Usage("--version: a version number from 1");
      req.set_version(args.Number("version"));
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
    if (!ParseVersion(number, &version)) return VersionUsage(number);
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
    // Not rotated yet is FAILED_PRECONDITION saying when it can be: exit 1 with that message.
    if (!s.ok()) return Failed(s);
    int rc = PrintJson(resp);
    if (!resp.rotated()) {  // a custodyd from before that answered OK without rotating
      std::cerr << "custodyctl: not rotated: " << resp.message() << "\n";
      return 1;
    }
    // The rotation is committed (do not repeat it); only the next PENDING version is missing.
    if (!resp.pending_error().empty())
      std::cerr << "custodyctl: rotated, but " << resp.pending_error() << "\n";
    return rc;
  }

  int VersionOp(const std::string& op, const std::string& name, const std::string& number,
                const Args& args) {
    uint32_t version = 0;
    if (!ParseVersion(number, &version)) return VersionUsage(number);
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
    return s.ok() ? PrintLine(resp.jwks()) : Failed(s);
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
    Wipe(req.mutable_key());
    return s.ok() ? PrintJson(ring) : Failed(s);
  }

  static void Wipe(std::string* s) {
    if (!s->empty()) OPENSSL_cleanse(s->data(), s->size());
  }

  static void Wipe(custody::v1::PrivateKeyMaterial* key) {
    Wipe(key->mutable_private_jwk());
    Wipe(key->mutable_pkcs8_pem());
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
  auto line = custody::tools::ParseCommandLine(Commands(), ConnectionFlags(),
                                               std::vector<std::string>(argv + 1, argv + argc));
  if (!line.ok()) return Usage(std::string(line.status().message()));
  if (line->action == custody::tools::CommandLine::Action::kVersion) {
    std::cout << custody::VersionLine("custodyctl") << "\n";
    return 0;
  }
  if (line->action == custody::tools::CommandLine::Action::kHelp) {
    const CommandSpec* command = line->parsed.command;
    std::cout << (command == nullptr ? custody::tools::GeneralHelp(Commands(), ConnectionFlags())
                                     : custody::tools::CommandHelp(*command, ConnectionFlags()));
    return 0;
  }
  const Args& args = line->parsed;
  const std::string& command = args.command->name;
  if (command == "audit verify") return AuditVerify(args.operands, args);
  if (command == "policy check") return custody::tools::PolicyCheck(args.operands[0]);
  if (command == "policy explain") {
    return custody::tools::PolicyExplain(args.Flag("policy_file", ".state/policy.json"),
                                         args.operands[0], args.operands[1], args.operands[2]);
  }
  custody::client::ChannelOptions options;
  const char* env_addr = std::getenv("CUSTODY_ADDR");
  options.address = args.Flag("addr", env_addr ? env_addr : "unix:.state/custodyd.sock");
  options.ca_file = args.Flag("ca");
  options.cert_file = args.Flag("cert");
  options.key_file = args.Flag("key");
  options.server_name = args.Flag("server_name");
  const int timeout_ms =
      static_cast<int>(std::min<uint32_t>(args.Number("timeout_ms", 30000), 24u * 3600 * 1000));
  auto channel = custody::client::CreateChannel(options);
  if (!channel.ok()) return Usage(std::string(channel.status().message()));
  auto target = custody::client::ChannelTarget(options);
  return Ctl(*channel, timeout_ms, target.ok() && target->second).Run(args);
}
