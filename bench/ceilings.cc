#include "bench/ceilings.h"

#include <memory>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/openssl_ptr.h"
#include "jose/base64url.h"
#include "jose/jwe.h"
#include "openssl/evp.h"
#include "openssl/rand.h"
#include "openssl/rsa.h"

namespace custody::bench {
namespace {

Outcome FromStatus(const absl::Status& status, std::string* error) {
  return OutcomeOf("", status, error);
}

using MdCtxPtr = OpensslPtr<EVP_MD_CTX>;
using PkeyCtxPtr = OpensslPtr<EVP_PKEY_CTX>;
using PkeyPtr = std::shared_ptr<EVP_PKEY>;

PkeyPtr Share(EVP_PKEY* p) { return PkeyPtr(p, EVP_PKEY_free); }

absl::StatusOr<std::string> Sha256(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("EVP_Digest failed");
  }
  return std::string(reinterpret_cast<char*>(md), len);
}

absl::StatusOr<PkeyPtr> FreshKey(const OpSpec& spec) {
  EVP_PKEY* key = nullptr;
  if (spec.rsa_bits > 0) {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<size_t>(spec.rsa_bits));
  } else if (spec.alg == "EdDSA") {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  } else {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  }
  if (key == nullptr) return absl::InternalError(absl::StrCat("keygen for ", spec.id, " failed"));
  return Share(key);
}

bool SetRsaOaepSha256(EVP_PKEY_CTX* ctx) {
  return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) > 0 &&
         EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, "SHA256", nullptr) > 0 &&
         EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, "SHA256", nullptr) > 0;
}

// The uncompressed point 04||X||Y of an ECDH-ES JWE's epk.
absl::StatusOr<std::string> EpkPoint(const jose::ParsedJwe& jwe) {
  if (!jwe.epk.has_value()) return absl::InvalidArgumentError("JWE has no epk");
  if (auto valid = jose::ValidateEpk(*jwe.epk, "P-256"); !valid.ok()) return valid.status();
  const jose::Json* x = jwe.epk->Find("x");
  const jose::Json* y = jwe.epk->Find("y");
  if (x == nullptr || y == nullptr) return absl::InvalidArgumentError("epk without x/y");
  auto xb = jose::Base64UrlDecode(x->as_string());
  if (!xb.ok()) return xb.status();
  auto yb = jose::Base64UrlDecode(y->as_string());
  if (!yb.ok()) return yb.status();
  return absl::StrCat("\x04", *xb, *yb);
}

}  // namespace

absl::StatusOr<Operation> MakeDirectCryptokiOp(pkcs11::Token& token, const OpSpec& spec,
                                               const DirectKey& key) {
  const std::string& hex = key.token_object_id_hex;
  const bool valid_hex = !hex.empty() && hex.size() % 2 == 0 &&
                         hex.find_first_not_of("0123456789abcdefABCDEF") == std::string::npos;
  if (!valid_hex) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad token_object_id '", key.token_object_id_hex, "'"));
  }
  const std::string id = absl::HexStringToBytes(hex);
  auto found = token.FindKeyPair(id);
  if (!found.ok()) return found.status();
  std::shared_ptr<pkcs11::KeyPair> pair = *std::move(found);
  pkcs11::Token* t = &token;

  if (spec.rpc == Rpc::kSignJws) {
    pkcs11::SignScheme scheme = pkcs11::SignScheme::kEcdsa;
    auto input = std::make_shared<std::string>(key.signing_input);
    if (spec.alg == "EdDSA") {
      scheme = pkcs11::SignScheme::kEddsa;
    } else {
      if (spec.alg == "PS256") scheme = pkcs11::SignScheme::kRsaPssSha256;
      auto digest = Sha256(key.signing_input);
      if (!digest.ok()) return digest.status();
      *input = *digest;
    }
    if (auto sig = token.Sign(*pair, scheme, *input); !sig.ok()) return sig.status();
    return Operation([t, pair, scheme, input](int, std::string* error) {
      return FromStatus(t->Sign(*pair, scheme, *input).status(), error);
    });
  }

  auto jwe = jose::ParseCompactJwe(key.sample_jwe);
  if (!jwe.ok()) return jwe.status();
  if (spec.alg == "RSA-OAEP-256") {
    const bool native = key.decryption_mechanism.rfind("token: CKM_RSA_PKCS_OAEP", 0) == 0;
    auto ciphertext = std::make_shared<std::string>(jwe->encrypted_key);
    auto step = [t, pair, native, ciphertext]() -> absl::StatusOr<Secret> {
      if (native) return t->DecryptRsaOaep(*pair, pkcs11::OaepHash::kSha256, *ciphertext);
      return t->DecryptRsaRaw(*pair, *ciphertext);
    };
    auto first = step();
    if (!first.ok()) return first.status();
    if (!native) {
      auto cek = jose::OaepDecode(*first, EVP_sha256());
      if (!cek.ok() || cek->size() != 32) {
        return absl::InternalError("direct raw RSA result does not OAEP-decode to a 32-byte CEK");
      }
    } else if (first->size() != 32) {
      return absl::InternalError("direct RSA-OAEP result is not a 32-byte CEK");
    }
    return Operation(
        [step](int, std::string* error) { return FromStatus(step().status(), error); });
  }
  auto point = EpkPoint(*jwe);
  if (!point.ok()) return point.status();
  auto shared_point = std::make_shared<std::string>(*point);
  auto z = token.DeriveEcdh(*pair, *shared_point);
  if (!z.ok()) return z.status();
  if (z->size() != 32) return absl::InternalError("direct ECDH did not yield 32 bytes");
  return Operation([t, pair, shared_point](int, std::string* error) {
    return FromStatus(t->DeriveEcdh(*pair, *shared_point).status(), error);
  });
}

absl::StatusOr<Operation> MakeOpenSslOp(const OpSpec& spec, const std::string& signing_input) {
  auto key = FreshKey(spec);
  if (!key.ok()) return key.status();
  PkeyPtr pkey = *key;

  if (spec.rpc == Rpc::kSignJws) {
    const bool eddsa = spec.alg == "EdDSA";
    const bool pss = spec.alg == "PS256";
    auto input = std::make_shared<std::string>(signing_input);
    Operation op = [pkey, eddsa, pss, input](int, std::string* error) {
      MdCtxPtr ctx(EVP_MD_CTX_new());
      EVP_PKEY_CTX* pctx = nullptr;
      if (ctx == nullptr || EVP_DigestSignInit_ex(ctx.get(), &pctx, eddsa ? nullptr : "SHA256",
                                                  nullptr, nullptr, pkey.get(), nullptr) != 1) {
        *error = "EVP_DigestSignInit_ex failed";
        return Outcome::kError;
      }
      if (pss && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
                  EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32) <= 0 ||
                  EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, "SHA256", nullptr) <= 0)) {
        *error = "PSS parameters refused";
        return Outcome::kError;
      }
      unsigned char sig[1024];
      size_t len = sizeof(sig);
      if (EVP_DigestSign(ctx.get(), sig, &len,
                         reinterpret_cast<const unsigned char*>(input->data()),
                         input->size()) != 1) {
        *error = "EVP_DigestSign failed";
        return Outcome::kError;
      }
      return Outcome::kOk;
    };
    std::string error;
    if (op(0, &error) != Outcome::kOk) return absl::InternalError(error);
    return op;
  }

  if (spec.alg == "RSA-OAEP-256") {
    // One ciphertext of a 32-byte CEK under the fresh key, decrypted again and again.
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
    unsigned char cek[32];
    if (ctx == nullptr || RAND_bytes(cek, sizeof(cek)) != 1 ||
        EVP_PKEY_encrypt_init(ctx.get()) != 1 || !SetRsaOaepSha256(ctx.get())) {
      return absl::InternalError("OpenSSL RSA-OAEP encryption setup failed");
    }
    std::vector<unsigned char> ct(static_cast<size_t>(EVP_PKEY_get_size(pkey.get())));
    size_t ct_len = ct.size();
    if (EVP_PKEY_encrypt(ctx.get(), ct.data(), &ct_len, cek, sizeof(cek)) != 1) {
      return absl::InternalError("EVP_PKEY_encrypt failed");
    }
    ct.resize(ct_len);
    auto ciphertext = std::make_shared<std::vector<unsigned char>>(std::move(ct));
    Operation op = [pkey, ciphertext](int, std::string* error) {
      PkeyCtxPtr c(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
      unsigned char out[512];
      size_t out_len = sizeof(out);
      if (c == nullptr || EVP_PKEY_decrypt_init(c.get()) != 1 || !SetRsaOaepSha256(c.get()) ||
          EVP_PKEY_decrypt(c.get(), out, &out_len, ciphertext->data(), ciphertext->size()) != 1 ||
          out_len != 32) {
        *error = "EVP_PKEY_decrypt (OAEP SHA-256) failed";
        return Outcome::kError;
      }
      return Outcome::kOk;
    };
    std::string error;
    if (op(0, &error) != Outcome::kOk) return absl::InternalError(error);
    return op;
  }

  // ECDH P-256 with a fresh peer key, as the token's CKM_ECDH1_DERIVE.
  auto peer = FreshKey(spec);
  if (!peer.ok()) return peer.status();
  PkeyPtr peer_key = *peer;
  Operation op = [pkey, peer_key](int, std::string* error) {
    PkeyCtxPtr c(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
    unsigned char z[66];
    size_t z_len = sizeof(z);
    if (c == nullptr || EVP_PKEY_derive_init(c.get()) != 1 ||
        EVP_PKEY_derive_set_peer(c.get(), peer_key.get()) != 1 ||
        EVP_PKEY_derive(c.get(), z, &z_len) != 1 || z_len != 32) {
      *error = "EVP_PKEY_derive failed";
      return Outcome::kError;
    }
    return Outcome::kOk;
  };
  std::string error;
  if (op(0, &error) != Outcome::kOk) return absl::InternalError(error);
  return op;
}

}  // namespace custody::bench
