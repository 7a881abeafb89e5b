// Compact JWE, the format: algorithm names and the ones refused on purpose, parsing with limits,
// the epk check, and encryption to a public JWK (the client side). Content encryption is in
// jwe_content.cc, key wrap / agreement / KDF / OAEP decoding in jwe_key_management.cc.
#include "jose/jwe.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "jose/base64url.h"
#include "jose/curves.h"
#include "jose/jwe_internal.h"
#include "jose/openssl_handles.h"
#include "jose/openssl_internal.h"
#include "openssl/core_names.h"
#include "openssl/err.h"
#include "openssl/rand.h"

namespace custody::jose {
namespace {

constexpr absl::string_view kDecryptionFailed = "decryption failed";

constexpr std::array<internal::EncInfo, 6> kEncs = {{
    {JweEnc::kA128Gcm, "A128GCM", 16, "AES-128-GCM", nullptr, 12, 16},
    {JweEnc::kA192Gcm, "A192GCM", 24, "AES-192-GCM", nullptr, 12, 16},
    {JweEnc::kA256Gcm, "A256GCM", 32, "AES-256-GCM", nullptr, 12, 16},
    {JweEnc::kA128CbcHs256, "A128CBC-HS256", 32, "AES-128-CBC", "SHA256", 16, 16},
    {JweEnc::kA192CbcHs384, "A192CBC-HS384", 48, "AES-192-CBC", "SHA384", 16, 24},
    {JweEnc::kA256CbcHs512, "A256CBC-HS512", 64, "AES-256-CBC", "SHA512", 16, 32},
}};

}  // namespace

namespace internal {

absl::Status DecryptionFailed() {
  ERR_clear_error();
  return absl::InvalidArgumentError(kDecryptionFailed);
}

void AppendBigEndian32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8)
    out.push_back(static_cast<char>((v >> shift) & 0xff));
}

void AppendBigEndian64(std::string& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8)
    out.push_back(static_cast<char>((v >> shift) & 0xff));
}

const EncInfo& EncInfoFor(JweEnc enc) {
  for (const EncInfo& info : kEncs) {
    if (info.enc == enc) return info;
  }
  return kEncs[0];  // unreachable: every enumerator is in kEncs
}

absl::StatusOr<Secret> RandomSecret(size_t n) {
  Secret out(std::string(n, '\0'));
  if (RAND_bytes(MutableBytes(out.mutable_value()), static_cast<int>(n)) != 1) {
    return OpensslError("RAND_bytes");
  }
  return out;
}

}  // namespace internal

namespace {

using internal::AesKeyWrap;
using internal::AppendBigEndian32;
using internal::Bytes;
using internal::CipherCtxPtr;
using internal::CipherPtr;
using internal::DecryptionFailed;
using internal::EcdhDerive;
using internal::EncInfo;
using internal::EncInfoFor;
using internal::EncryptContent;
using internal::GenerateEphemeral;
using internal::GroupName;
using internal::KdfCtxPtr;
using internal::KdfPtr;
using internal::MacCtxPtr;
using internal::MacPtr;
using internal::MdCtxPtr;
using internal::MutableBytes;
using internal::OpensslError;
using internal::PkeyCtxPtr;
using internal::RandomSecret;
using internal::RsaOaepEncrypt;
using internal::Sealed;

// Decoding bound for iv and tag, above every valid length so that the exact-length check can
// report the expected size.
constexpr size_t kMaxIvOrTagBytes = 64;

std::string_view StdView(absl::string_view s) { return std::string_view(s.data(), s.size()); }

struct AlgInfo {
  JweAlg alg;
  absl::string_view name;
  size_t key_wrap_bytes;
};

constexpr std::array<AlgInfo, 6> kAlgs = {{
    {JweAlg::kRsaOaep, "RSA-OAEP", 0},
    {JweAlg::kRsaOaep256, "RSA-OAEP-256", 0},
    {JweAlg::kEcdhEs, "ECDH-ES", 0},
    {JweAlg::kEcdhEsA128Kw, "ECDH-ES+A128KW", 16},
    {JweAlg::kEcdhEsA192Kw, "ECDH-ES+A192KW", 24},
    {JweAlg::kEcdhEsA256Kw, "ECDH-ES+A256KW", 32},
}};

const AlgInfo& AlgInfoFor(JweAlg alg) {
  for (const AlgInfo& info : kAlgs) {
    if (info.alg == alg) return info;
  }
  return kAlgs[0];  // unreachable: every enumerator is in kAlgs
}

struct RefusedAlg {
  absl::string_view name;
  absl::string_view reason;
};

constexpr absl::string_view kSymmetricWrapReason =
    "symmetric key wrap needs a shared secret key, and custody's decryption keys are asymmetric "
    "keys held in the HSM";
constexpr absl::string_view kPasswordReason =
    "password-based key encryption is not supported (custody's keys are not derived from "
    "passwords)";

constexpr std::array<RefusedAlg, 12> kRefusedAlgs = {{
    {"RSA1_5",
     "RSAES-PKCS1-v1_5 key transport is open to Bleichenbacher padding-oracle attacks and is "
     "forbidden by FAPI; use RSA-OAEP-256"},
    {"dir",
     "direct use of a shared symmetric key is not custody's model (decryption keys are asymmetric "
     "keys held in the HSM)"},
    {"PBES2-HS256+A128KW", kPasswordReason},
    {"PBES2-HS384+A192KW", kPasswordReason},
    {"PBES2-HS512+A256KW", kPasswordReason},
    {"A128KW", kSymmetricWrapReason},
    {"A192KW", kSymmetricWrapReason},
    {"A256KW", kSymmetricWrapReason},
    {"A128GCMKW", kSymmetricWrapReason},
    {"A192GCMKW", kSymmetricWrapReason},
    {"A256GCMKW", kSymmetricWrapReason},
    {"none", "a JWE must be encrypted to a key"},
}};

absl::StatusOr<std::string> DecodePart(absl::string_view b64, absl::string_view part,
                                       size_t max_bytes) {
  // A cheap bound before decoding: 4 characters carry 3 bytes.
  if (b64.size() / 4 * 3 > max_bytes + 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE ", part, ": larger than ", max_bytes, " bytes"));
  }
  absl::StatusOr<std::string> bytes = Base64UrlDecode(StdView(b64));
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWE ", part, ": ", bytes.status().message()));
  }
  if (bytes->size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE ", part, ": larger than ", max_bytes, " bytes"));
  }
  return bytes;
}

// The iv or the tag: exactly `bytes` long for the content encryption `enc`.
absl::Status DecodeFixedPart(absl::string_view b64, absl::string_view part, size_t bytes,
                             const EncInfo& enc, std::string* out) {
  absl::StatusOr<std::string> decoded = DecodePart(b64, part, kMaxIvOrTagBytes);
  if (!decoded.ok()) return decoded.status();
  if (decoded->size() != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("JWE ", part, ": ", decoded->size(), " bytes, ",
                                                   bytes, " expected for ", enc.name));
  }
  *out = *std::move(decoded);
  return absl::OkStatus();
}

absl::Status HeaderError(absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("JWE protected header: ", message));
}

// An optional string member; error when present but not a string.
absl::StatusOr<std::optional<std::string>> OptionalString(const Json& obj, absl::string_view name) {
  const Json* v = obj.Find(StdView(name));
  if (v == nullptr) return std::optional<std::string>();
  if (!v->is_string()) return HeaderError(absl::StrCat("\"", name, "\" is not a string"));
  return std::optional<std::string>(v->as_string());
}

// apu/apv: base64url strings, decoded; empty when absent.
absl::StatusOr<std::string> PartyInfo(const Json& obj, absl::string_view name) {
  absl::StatusOr<std::optional<std::string>> text = OptionalString(obj, name);
  if (!text.ok()) return text.status();
  if (!text->has_value()) return std::string();
  absl::StatusOr<std::string> bytes = Base64UrlDecode(**text);
  if (!bytes.ok()) return HeaderError(absl::StrCat("\"", name, "\": ", bytes.status().message()));
  return bytes;
}

}  // namespace

absl::string_view JweAlgName(JweAlg alg) { return AlgInfoFor(alg).name; }

absl::StatusOr<JweAlg> ParseJweAlg(absl::string_view name) {
  for (const AlgInfo& info : kAlgs) {
    if (info.name == name) return info.alg;
  }
  for (const RefusedAlg& refused : kRefusedAlgs) {
    if (refused.name == name) {
      return absl::InvalidArgumentError(
          absl::StrCat("JWE alg \"", name, "\" refused: ", refused.reason));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown JWE alg \"", name, "\""));
}

absl::string_view JweEncName(JweEnc enc) { return EncInfoFor(enc).name; }

absl::StatusOr<JweEnc> ParseJweEnc(absl::string_view name) {
  for (const EncInfo& info : kEncs) {
    if (info.name == name) return info.enc;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown JWE enc \"", name, "\""));
}

size_t CekBytes(JweEnc enc) { return EncInfoFor(enc).cek_bytes; }

bool IsEcdh(JweAlg alg) {
  return alg == JweAlg::kEcdhEs || alg == JweAlg::kEcdhEsA128Kw || alg == JweAlg::kEcdhEsA192Kw ||
         alg == JweAlg::kEcdhEsA256Kw;
}

size_t KeyWrapBytes(JweAlg alg) { return AlgInfoFor(alg).key_wrap_bytes; }

absl::StatusOr<ParsedJwe> ParseCompactJwe(absl::string_view compact, const JweLimits& limits) {
  if (compact.size() > limits.max_compact_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE: larger than ", limits.max_compact_bytes, " bytes"));
  }
  const std::vector<absl::string_view> parts = absl::StrSplit(compact, '.');
  if (parts.size() != 5) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE: compact serialization has ", parts.size(), " parts, 5 expected"));
  }
  ParsedJwe out;
  out.protected_b64 = std::string(parts[0]);
  absl::StatusOr<std::string> header_json =
      DecodePart(parts[0], "protected header", limits.max_protected_header_bytes);
  if (!header_json.ok()) return header_json.status();
  JsonLimits json_limits;
  json_limits.max_bytes = limits.max_protected_header_bytes;
  absl::StatusOr<Json> header = ParseJson(*header_json, json_limits);
  if (!header.ok()) return HeaderError(header.status().message());
  if (!header->is_object()) return HeaderError("not a JSON object");
  out.header = *std::move(header);
  const Json& h = out.header;

  const Json* alg = h.Find("alg");
  if (alg == nullptr || !alg->is_string()) return HeaderError("\"alg\" missing or not a string");
  absl::StatusOr<JweAlg> parsed_alg = ParseJweAlg(alg->as_string());
  if (!parsed_alg.ok()) return HeaderError(parsed_alg.status().message());
  out.alg = *parsed_alg;
  const Json* enc = h.Find("enc");
  if (enc == nullptr || !enc->is_string()) return HeaderError("\"enc\" missing or not a string");
  absl::StatusOr<JweEnc> parsed_enc = ParseJweEnc(enc->as_string());
  if (!parsed_enc.ok()) return HeaderError(parsed_enc.status().message());
  out.enc = *parsed_enc;
  const EncInfo& enc_info = EncInfoFor(out.enc);

  // RFC 7516 §4.1.13: a recipient must reject a JWE whose "crit" names an extension it does not
  // understand, and custody understands none.
  if (h.Find("crit") != nullptr) {
    return HeaderError("\"crit\" is present and no critical extension is supported");
  }
  absl::StatusOr<std::optional<std::string>> zip = OptionalString(h, "zip");
  if (!zip.ok()) return zip.status();
  if (zip->has_value()) {
    if (**zip != "DEF") {
      return HeaderError(absl::StrCat("\"zip\" value \"", **zip, "\" is not supported"));
    }
    if (!limits.allow_zip) return HeaderError("\"zip\" (compressed plaintext) is not enabled");
    out.zip = true;
  }
  absl::StatusOr<std::optional<std::string>> kid = OptionalString(h, "kid");
  if (!kid.ok()) return kid.status();
  if (kid->has_value()) out.kid = **kid;

  if (IsEcdh(out.alg)) {
    const Json* epk = h.Find("epk");
    if (epk == nullptr) return HeaderError("\"epk\" is required for ECDH-ES");
    if (!epk->is_object()) return HeaderError("\"epk\" is not a JSON object");
    for (std::string_view member : {"kty", "crv", "x", "y"}) {
      const Json* v = epk->Find(member);
      if (v == nullptr || !v->is_string()) {
        return HeaderError(
            absl::StrCat("\"epk\" member \"", std::string(member), "\" missing or not a string"));
      }
    }
    if (epk->Find("d") != nullptr) return HeaderError("\"epk\" contains a private key");
    out.epk = *epk;
    absl::StatusOr<std::string> apu = PartyInfo(h, "apu");
    if (!apu.ok()) return apu.status();
    absl::StatusOr<std::string> apv = PartyInfo(h, "apv");
    if (!apv.ok()) return apv.status();
    out.apu = *std::move(apu);
    out.apv = *std::move(apv);
  }

  absl::StatusOr<std::string> encrypted_key =
      DecodePart(parts[1], "encrypted key", limits.max_encrypted_key_bytes);
  if (!encrypted_key.ok()) return encrypted_key.status();
  out.encrypted_key = *std::move(encrypted_key);
  if (out.alg == JweAlg::kEcdhEs) {
    if (!out.encrypted_key.empty()) {
      return absl::InvalidArgumentError(
          "JWE encrypted key: must be empty for ECDH-ES (direct key agreement)");
    }
  } else if (out.encrypted_key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE encrypted key: required for ", JweAlgName(out.alg)));
  } else if (KeyWrapBytes(out.alg) != 0 && out.encrypted_key.size() != enc_info.cek_bytes + 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE encrypted key: ", out.encrypted_key.size(), " bytes, ",
                     enc_info.cek_bytes + 8, " expected for a wrapped ", enc_info.name, " key"));
  }

  CUSTODY_RETURN_IF_ERROR(DecodeFixedPart(parts[2], "iv", enc_info.iv_bytes, enc_info, &out.iv));
  absl::StatusOr<std::string> ciphertext =
      DecodePart(parts[3], "ciphertext", limits.max_ciphertext_bytes);
  if (!ciphertext.ok()) return ciphertext.status();
  out.ciphertext = *std::move(ciphertext);
  CUSTODY_RETURN_IF_ERROR(DecodeFixedPart(parts[4], "tag", enc_info.tag_bytes, enc_info, &out.tag));
  return out;
}

absl::StatusOr<PkeyPtr> ValidateEpk(const Json& epk, absl::string_view expected_crv) {
  const EcCurve* curve = CurveByJwkName(std::string_view(expected_crv.data(), expected_crv.size()));
  if (curve == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("epk: the key's curve \"", expected_crv, "\" is not supported"));
  }
  if (!epk.is_object()) return absl::InvalidArgumentError("epk: not a JSON object");
  const Json* kty = epk.Find("kty");
  if (kty == nullptr || !kty->is_string() || kty->as_string() != "EC") {
    return absl::InvalidArgumentError("epk: \"kty\" must be \"EC\"");
  }
  const Json* crv = epk.Find("crv");
  if (crv == nullptr || !crv->is_string()) {
    return absl::InvalidArgumentError("epk: \"crv\" missing or not a string");
  }
  if (crv->as_string() != expected_crv) {
    return absl::InvalidArgumentError(absl::StrCat("epk: curve \"", crv->as_string(),
                                                   "\" does not match the key's curve \"",
                                                   expected_crv, "\""));
  }
  for (std::string_view member : {"x", "y"}) {
    const Json* v = epk.Find(member);
    absl::StatusOr<std::string> bytes =
        v != nullptr && v->is_string()
            ? Base64UrlDecode(v->as_string())
            : absl::StatusOr<std::string>(absl::InvalidArgumentError("missing or not a string"));
    if (!bytes.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("epk: \"", std::string(member), "\": ", bytes.status().message()));
    }
    if (bytes->size() != curve->field_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("epk: \"", std::string(member), "\" is ",
                                                     bytes->size(), " bytes, ", curve->field_bytes,
                                                     " expected for ", expected_crv));
    }
  }
  // PkeyFromPublicJwk imports the uncompressed point (which cannot encode the point at infinity)
  // and refuses points off the curve (jwk.cc): the invalid-curve attack.
  absl::StatusOr<PkeyPtr> key = PkeyFromPublicJwk(epk);
  if (!key.ok()) return absl::InvalidArgumentError(absl::StrCat("epk: ", key.status().message()));
  absl::StatusOr<std::string> group = GroupName(key->get());
  if (!group.ok()) return group.status();
  if (*group != curve->openssl_name && *group != curve->jwk_name) {
    return absl::InvalidArgumentError(absl::StrCat("epk: on group ", *group));
  }
  return key;
}

absl::StatusOr<std::string> EncryptCompactJwe(absl::string_view plaintext, const Json& recipient,
                                              JweAlg alg, JweEnc enc, absl::string_view kid,
                                              const Json& extra) {
  const EncInfo& enc_info = EncInfoFor(enc);
  if (!extra.is_null() && !extra.is_object()) {
    return absl::InvalidArgumentError("extra JWE header members must be a JSON object");
  }
  for (std::string_view name : {"alg", "enc", "epk", "kid", "zip", "crit"}) {
    if (extra.Find(name) != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("extra JWE header member \"", std::string(name), "\" is not allowed"));
    }
  }
  // apu/apv may come from the caller (RFC 7518 §4.6.1.2-3); they enter the key derivation.
  absl::StatusOr<std::string> apu = PartyInfo(extra, "apu");
  if (!apu.ok()) return apu.status();
  absl::StatusOr<std::string> apv = PartyInfo(extra, "apv");
  if (!apv.ok()) return apv.status();

  absl::StatusOr<PkeyPtr> key = PkeyFromPublicJwk(recipient);
  if (!key.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("recipient JWK: ", key.status().message()));
  }
  const bool ecdh = IsEcdh(alg);
  if (ecdh != static_cast<bool>(EVP_PKEY_is_a(key->get(), "EC")) ||
      (!ecdh && !EVP_PKEY_is_a(key->get(), "RSA"))) {
    return absl::InvalidArgumentError(
        absl::StrCat(JweAlgName(alg), " requires ", ecdh ? "an EC" : "an RSA", " recipient key"));
  }

  Secret cek;
  std::string encrypted_key;
  std::optional<Json> epk;
  if (ecdh) {
    absl::StatusOr<std::string> group = GroupName(key->get());
    if (!group.ok()) return group.status();
    absl::StatusOr<PkeyPtr> ephemeral = GenerateEphemeral(*group);
    if (!ephemeral.ok()) return ephemeral.status();
    absl::StatusOr<Secret> z = EcdhDerive(ephemeral->get(), key->get());
    if (!z.ok()) return z.status();
    absl::StatusOr<Json> epk_jwk = PublicJwkFromPkey(ephemeral->get());
    if (!epk_jwk.ok()) return epk_jwk.status();
    epk = *std::move(epk_jwk);
    if (alg == JweAlg::kEcdhEs) {
      absl::StatusOr<Secret> derived = ConcatKdf(*z, enc_info.name, *apu, *apv, enc_info.cek_bytes);
      if (!derived.ok()) return derived.status();
      cek = *std::move(derived);
    } else {
      absl::StatusOr<Secret> kek = ConcatKdf(*z, JweAlgName(alg), *apu, *apv, KeyWrapBytes(alg));
      if (!kek.ok()) return kek.status();
      absl::StatusOr<Secret> random = RandomSecret(enc_info.cek_bytes);
      if (!random.ok()) return random.status();
      cek = *std::move(random);
      absl::StatusOr<std::string> wrapped = AesKeyWrap(*kek, cek);
      if (!wrapped.ok()) return wrapped.status();
      encrypted_key = *std::move(wrapped);
    }
  } else {
    absl::StatusOr<Secret> random = RandomSecret(enc_info.cek_bytes);
    if (!random.ok()) return random.status();
    cek = *std::move(random);
    absl::StatusOr<std::string> wrapped =
        RsaOaepEncrypt(key->get(), alg == JweAlg::kRsaOaep ? "SHA1" : "SHA256", cek);
    if (!wrapped.ok()) return wrapped.status();
    encrypted_key = *std::move(wrapped);
  }

  Json header = Json::MakeObject({{"alg", Json::String(std::string(JweAlgName(alg)))},
                                  {"enc", Json::String(std::string(enc_info.name))}});
  if (!kid.empty()) header.Set("kid", Json::String(std::string(kid)));
  if (epk.has_value()) header.Set("epk", *std::move(epk));
  for (const auto& [name, value] : extra.as_object()) header.Set(name, value);
  const std::string protected_b64 = Base64UrlEncode(header.Serialize());

  std::string iv(enc_info.iv_bytes, '\0');
  if (RAND_bytes(MutableBytes(iv), static_cast<int>(iv.size())) != 1) {
    return OpensslError("RAND_bytes");
  }
  absl::StatusOr<Sealed> sealed = EncryptContent(enc_info, cek, iv, protected_b64, plaintext);
  if (!sealed.ok()) return sealed.status();
  return absl::StrCat(protected_b64, ".", Base64UrlEncode(encrypted_key), ".", Base64UrlEncode(iv),
                      ".", Base64UrlEncode(sealed->ciphertext), ".", Base64UrlEncode(sealed->tag));
}

}  // namespace custody::jose
