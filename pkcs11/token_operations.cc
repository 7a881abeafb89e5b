// The private-key operations: signing (the mechanism and parameters of each SignScheme), RSA
// decryption (OAEP in the token, the one-time probe of which OAEP hashes the token accepts, raw
// CKM_RSA_X_509 for software OAEP decoding; every failure of the ciphertext the same answer),
// and ECDH derivation of a session secret that is read once and destroyed.
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "openssl/rand.h"
#include "openssl/rsa.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

constexpr char kDecryptionFailed[] = "decryption failed";

const char* OaepHashName(OaepHash hash) { return hash == OaepHash::kSha1 ? "SHA-1" : "SHA-256"; }

CK_BYTE* InputBytes(std::string_view input) {
  // Single-part Cryptoki calls take non-const input pointers but do not write through them.
  return reinterpret_cast<CK_BYTE*>(const_cast<char*>(input.data()));
}

// A single-part C_Sign or C_Decrypt (given as `call(output, length)`) into `out`, sized to the
// expected length beforehand. On CKR_BUFFER_TOO_SMALL the operation stays active and `length`
// holds the size needed: `out` is resized and the call made once more. On CKR_OK, `length` is
// the output's length (the caller trims `out`).
CK_RV CallIntoBuffer(std::string& out, CK_ULONG& length,
                     const std::function<CK_RV(CK_BYTE*, CK_ULONG*)>& call) {
  length = out.size();
  CK_RV rv = call(reinterpret_cast<CK_BYTE*>(out.data()), &length);
  if (rv == CKR_BUFFER_TOO_SMALL) {
    out.assign(length, '\0');
    rv = call(reinterpret_cast<CK_BYTE*>(out.data()), &length);
  }
  return rv;
}

absl::Status RequireRsa(const KeyPair& key) {
  if (key.spec.type == KeyType::kRsa) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("key ", PrintableId(key.id), " is not an RSA key"));
}

// ---- Decryption ----------------------------------------------------------------------------

// k, the modulus size in bytes, from the KeySpec or (unknown there) from the key's CKA_MODULUS.
absl::StatusOr<size_t> ModulusBytes(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                    CK_OBJECT_HANDLE key, const KeySpec& spec) {
  if (spec.rsa_bits > 0) return static_cast<size_t>(spec.rsa_bits + 7) / 8;
  CUSTODY_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, key, CKA_MODULUS));
  const size_t first = modulus.find_first_not_of('\0');
  if (first == std::string::npos) return absl::InternalError("RSA key with a zero modulus");
  return modulus.size() - first;
}

// The status of a failed C_Decrypt. Failures of the token or the session keep their CkError
// status (and a broken session is discarded); every other code is about the ciphertext and
// becomes one and the same INVALID_ARGUMENT, so that no caller can tell bad padding from a bad
// length (a padding oracle). SoftHSM2 reports bad OAEP padding as CKR_GENERAL_ERROR, which
// elsewhere means an unavailable token: from C_Decrypt it counts as a decryption failure.
absl::Status DecryptFailure(SessionPool::Lease& lease, CK_RV rv) {
  const bool token_failure = rv != CKR_GENERAL_ERROR &&
                             (IsSessionBroken(rv) || rv == CKR_HOST_MEMORY ||
                              CkError("C_Decrypt", rv).code() == absl::StatusCode::kUnavailable);
  if (token_failure) return lease.Check("C_Decrypt", rv);
  return absl::InvalidArgumentError(kDecryptionFailed);
}

// C_Decrypt after a successful C_DecryptInit (which it always ends): the plaintext, into a
// k-byte buffer.
absl::StatusOr<Secret> RunDecrypt(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                  size_t modulus_bytes, std::string_view ciphertext) {
  Secret plaintext(std::string(modulus_bytes, '\0'));
  std::string& out = plaintext.mutable_value();
  CK_ULONG length = 0;
  // Not expected with k bytes, but CKR_BUFFER_TOO_SMALL is answered as for C_Sign.
  CK_RV rv = CallIntoBuffer(out, length, [&](CK_BYTE* output, CK_ULONG* output_length) {
    return fn->C_Decrypt(lease.get(), InputBytes(ciphertext), ciphertext.size(), output,
                         output_length);
  });
  if (rv != CKR_OK) return DecryptFailure(lease, rv);
  if (length > out.size()) return absl::InternalError("C_Decrypt: length beyond the buffer");
  out.resize(length);
  return plaintext;
}

// CKM_RSA_PKCS_OAEP with `hash` for OAEP and MGF1 and an empty label, on a resolved handle.
absl::StatusOr<Secret> DecryptOaep(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                   CK_OBJECT_HANDLE key, OaepHash hash, size_t modulus_bytes,
                                   std::string_view ciphertext) {
  // Checked before C_DecryptInit: returning between Init and C_Decrypt would leave the
  // operation active in the session.
  if (ciphertext.size() != modulus_bytes) return absl::InvalidArgumentError(kDecryptionFailed);
  CK_RSA_PKCS_OAEP_PARAMS params{};
  params.hashAlg = hash == OaepHash::kSha1 ? CKM_SHA_1 : CKM_SHA256;
  params.mgf = hash == OaepHash::kSha1 ? CKG_MGF1_SHA1 : CKG_MGF1_SHA256;
  params.source = CKZ_DATA_SPECIFIED;
  params.pSourceData = nullptr;
  params.ulSourceDataLen = 0;
  CK_MECHANISM mechanism{CKM_RSA_PKCS_OAEP, &params, sizeof(params)};
  CK_RV rv = fn->C_DecryptInit(lease.get(), &mechanism, key);
  if (rv == CKR_ARGUMENTS_BAD || rv == CKR_MECHANISM_PARAM_INVALID || rv == CKR_MECHANISM_INVALID) {
    return absl::UnimplementedError(absl::StrCat("token refuses OAEP with ", OaepHashName(hash),
                                                 " (C_DecryptInit: ", CkrName(rv), ")"));
  }
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_DecryptInit", rv));
  return RunDecrypt(fn, lease, modulus_bytes, ciphertext);
}

}  // namespace

absl::StatusOr<std::string> OpenSslOaepEncrypt(EVP_PKEY* pkey, OaepHash hash,
                                               std::string_view message) {
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  const char* md = hash == OaepHash::kSha1 ? "SHA1" : "SHA256";
  size_t size = 0;
  const auto* in = reinterpret_cast<const unsigned char*>(message.data());
  if (ctx == nullptr || EVP_PKEY_encrypt_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
      EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx.get(), md, nullptr) != 1 ||
      EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx.get(), md, nullptr) != 1 ||
      EVP_PKEY_encrypt(ctx.get(), nullptr, &size, in, message.size()) != 1) {
    return absl::InternalError("EVP_PKEY_encrypt (OAEP) setup failed");
  }
  std::string ciphertext(size, '\0');
  if (EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(ciphertext.data()), &size, in,
                       message.size()) != 1) {
    return absl::InternalError("EVP_PKEY_encrypt (OAEP) failed");
  }
  ciphertext.resize(size);
  return ciphertext;
}

namespace {

// Whether the token decrypts, with CKM_RSA_PKCS_OAEP and `hash`, what OpenSSL encrypted under a
// throwaway key pair: session objects, or with `token_objects` token objects (for modules that
// refuse session keys, such as tpm2-pkcs11), destroyed after either way. No usage is asked of
// the public key (OpenSSL encrypts): tpm2-pkcs11 refuses public usages that differ from the
// ones it derives. An error (not a "no") when the probe itself could not run.
absl::StatusOr<bool> ProbeOaep(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease, OaepHash hash,
                               bool token_objects) {
  static constexpr unsigned char kF4[] = {0x01, 0x00, 0x01};
  static constexpr char kProbeLabel[] = "custody-oaep-probe";
  const CK_ULONG modulus_bits = 2048;
  CK_ATTRIBUTE public_template[] = {
      BoolAttr(CKA_TOKEN, token_objects),
      BoolAttr(CKA_PRIVATE, false),
      Attr(CKA_LABEL, kProbeLabel),
      Attr(CKA_MODULUS_BITS, &modulus_bits, sizeof(modulus_bits)),
      Attr(CKA_PUBLIC_EXPONENT, kF4, sizeof(kF4)),
  };
  CK_ATTRIBUTE private_template[] = {
      BoolAttr(CKA_TOKEN, token_objects), BoolAttr(CKA_PRIVATE, true),
      BoolAttr(CKA_SENSITIVE, true),      BoolAttr(CKA_EXTRACTABLE, false),
      BoolAttr(CKA_DECRYPT, true),        Attr(CKA_LABEL, kProbeLabel),
  };
  CK_MECHANISM mechanism{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE public_handle = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_handle = CK_INVALID_HANDLE;
  CUSTODY_RETURN_IF_ERROR(lease.Check(
      "C_GenerateKeyPair",
      fn->C_GenerateKeyPair(lease.get(), &mechanism, public_template, std::size(public_template),
                            private_template, std::size(private_template), &public_handle,
                            &private_handle)));
  ScopedObject public_key(fn, lease, public_handle);
  ScopedObject private_key(fn, lease, private_handle);

  CUSTODY_ASSIGN_OR_RETURN(std::string modulus, GetBytes(fn, lease, public_key.get(), CKA_MODULUS));
  CUSTODY_ASSIGN_OR_RETURN(std::string exponent,
                           GetBytes(fn, lease, public_key.get(), CKA_PUBLIC_EXPONENT));
  CUSTODY_ASSIGN_OR_RETURN(EvpPkeyPtr pkey, RsaPublicKey(modulus, exponent));
  unsigned char message[32];
  if (RAND_bytes(message, sizeof(message)) != 1) return absl::InternalError("RAND_bytes failed");
  const std::string_view message_view(reinterpret_cast<const char*>(message), sizeof(message));
  CUSTODY_ASSIGN_OR_RETURN(std::string ciphertext,
                           OpenSslOaepEncrypt(pkey.get(), hash, message_view));

  absl::StatusOr<Secret> plaintext =
      DecryptOaep(fn, lease, private_key.get(), hash, ciphertext.size(), ciphertext);
  // UNIMPLEMENTED: the token refused the parameters. INVALID_ARGUMENT: it accepted them but
  // could not decrypt (e.g. it silently used another hash). Both are a definite "no".
  if (absl::IsUnimplemented(plaintext.status()) || absl::IsInvalidArgument(plaintext.status())) {
    return false;
  }
  if (!plaintext.ok()) return plaintext.status();
  return plaintext->view() == absl::string_view(message_view.data(), message_view.size());
}

// ---- ECDH ----------------------------------------------------------------------------------

// CKA_VALUE of a derived secret of exactly `size` bytes, straight into a self-wiping buffer.
absl::StatusOr<Secret> GetSecretValue(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                      CK_OBJECT_HANDLE object, size_t size) {
  Secret value(std::string(size, '\0'));
  CK_ATTRIBUTE attribute{CKA_VALUE, value.mutable_value().data(), size};
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_GetAttributeValue",
                                      fn->C_GetAttributeValue(lease.get(), object, &attribute, 1)));
  if (attribute.ulValueLen != size) {
    return absl::InternalError(
        absl::StrCat("derived CKA_VALUE has ", attribute.ulValueLen, " bytes, expected ", size));
  }
  return value;
}

// CKM_ECDH1_DERIVE (CKD_NULL) on a resolved handle: Z, `field_size` bytes.
absl::StatusOr<Secret> DeriveEcdhWithHandle(CK_FUNCTION_LIST* fn, SessionPool::Lease& lease,
                                            CK_OBJECT_HANDLE key, std::string_view peer_point,
                                            CK_ULONG field_size) {
  CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
  CK_KEY_TYPE generic_secret = CKK_GENERIC_SECRET;
  CK_ATTRIBUTE secret_template[] = {
      Attr(CKA_CLASS, &secret_class, sizeof(secret_class)),
      Attr(CKA_KEY_TYPE, &generic_secret, sizeof(generic_secret)),
      BoolAttr(CKA_TOKEN, false),
      BoolAttr(CKA_SENSITIVE, false),
      BoolAttr(CKA_EXTRACTABLE, true),
      Attr(CKA_VALUE_LEN, &field_size, sizeof(field_size)),
  };
  auto derive = [&](std::string_view public_data, CK_OBJECT_HANDLE* derived) {
    CK_ECDH1_DERIVE_PARAMS params{};
    params.kdf = CKD_NULL;
    params.ulSharedDataLen = 0;
    params.pSharedData = nullptr;
    params.ulPublicDataLen = public_data.size();
    params.pPublicData = InputBytes(public_data);
    CK_MECHANISM mechanism{CKM_ECDH1_DERIVE, &params, sizeof(params)};
    return fn->C_DeriveKey(lease.get(), &mechanism, key, secret_template,
                           std::size(secret_template), derived);
  };
  CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
  CK_RV rv = derive(peer_point, &derived);
  if (rv == CKR_ARGUMENTS_BAD || rv == CKR_DOMAIN_PARAMS_INVALID ||
      rv == CKR_MECHANISM_PARAM_INVALID) {
    // PKCS#11 2.40 leaves open whether pPublicData is the bare point or, like CKA_EC_POINT, a DER
    // OCTET STRING holding it, and some modules take only the latter. (SoftHSM2 2.6.1 takes
    // both.) A refusal derived nothing, so asking with the other form is not a retry.
    rv = derive(DerOctetString(peer_point), &derived);
  }
  CUSTODY_RETURN_IF_ERROR(lease.Check("C_DeriveKey", rv));
  ScopedObject secret(fn, lease, derived);
  return GetSecretValue(fn, lease, secret.get(), field_size);
}

}  // namespace

// ---- The operations ------------------------------------------------------------------------

absl::StatusOr<std::string> Sign(TokenState& state, const KeyPair& key, SignScheme scheme,
                                 std::string_view input) {
  TokenState::Timer timer(state, Timed::kSign);
  CK_MECHANISM mechanism{};
  CK_RSA_PKCS_PSS_PARAMS pss{};
  bool scheme_fits = false;
  switch (scheme) {
    case SignScheme::kEcdsa:
      mechanism.mechanism = CKM_ECDSA;
      scheme_fits = IsEc(key.spec.type);
      break;
    case SignScheme::kEddsa:
      mechanism.mechanism = CKM_EDDSA;
      scheme_fits = key.spec.type == KeyType::kEd25519;
      break;
    case SignScheme::kRsaPssSha256:
    case SignScheme::kRsaPssSha384:
    case SignScheme::kRsaPssSha512: {
      // Salt as long as the digest: RFC 7518 PS256 and TLS 1.3 (RFC 8446 §4.2.3) both fix it.
      const size_t digest_size = scheme == SignScheme::kRsaPssSha256   ? 32
                                 : scheme == SignScheme::kRsaPssSha384 ? 48
                                                                       : 64;
      if (input.size() != digest_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("RSA-PSS input must be a ", digest_size, "-byte digest"));
      }
      pss.hashAlg = digest_size == 32 ? CKM_SHA256 : digest_size == 48 ? CKM_SHA384 : CKM_SHA512;
      pss.mgf = digest_size == 32   ? CKG_MGF1_SHA256
                : digest_size == 48 ? CKG_MGF1_SHA384
                                    : CKG_MGF1_SHA512;
      pss.sLen = digest_size;
      mechanism.mechanism = CKM_RSA_PKCS_PSS;
      mechanism.pParameter = &pss;
      mechanism.ulParameterLen = sizeof(pss);
      scheme_fits = key.spec.type == KeyType::kRsa;
      break;
    }
    case SignScheme::kRsaPkcs1v15:
      mechanism.mechanism = CKM_RSA_PKCS;
      scheme_fits = key.spec.type == KeyType::kRsa;
      break;
  }
  if (!scheme_fits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key ", PrintableId(key.id), " cannot sign with ", CkmName(mechanism.mechanism)));
  }
  if (input.empty()) return absl::InvalidArgumentError("nothing to sign");

  CK_FUNCTION_LIST* fn = state.fn;
  std::string signature;
  CUSTODY_RETURN_IF_ERROR(
      state.RunOnKey(key, CKO_PRIVATE_KEY, [&](SessionPool::Lease& lease, CK_OBJECT_HANDLE handle) {
        CUSTODY_RETURN_IF_ERROR(
            lease.Check("C_SignInit", fn->C_SignInit(lease.get(), &mechanism, handle)));
        signature.assign(SignatureSize(key.spec), '\0');
        CK_ULONG length = 0;
        CK_RV rv = CallIntoBuffer(signature, length, [&](CK_BYTE* output, CK_ULONG* out_length) {
          return fn->C_Sign(lease.get(), InputBytes(input), input.size(), output, out_length);
        });
        CUSTODY_RETURN_IF_ERROR(lease.Check("C_Sign", rv));
        signature.resize(length);
        return absl::OkStatus();
      }));
  return signature;
}

absl::StatusOr<Secret> DecryptRsaOaep(TokenState& state, const KeyPair& key, OaepHash hash,
                                      std::string_view ciphertext) {
  TokenState::Timer timer(state, Timed::kDecrypt);
  CUSTODY_RETURN_IF_ERROR(RequireRsa(key));
  CK_FUNCTION_LIST* fn = state.fn;
  Secret plaintext;
  CUSTODY_RETURN_IF_ERROR(state.RunOnKey(
      key, CKO_PRIVATE_KEY,
      [&](SessionPool::Lease& lease, CK_OBJECT_HANDLE handle) -> absl::Status {
        CUSTODY_ASSIGN_OR_RETURN(size_t modulus_bytes, ModulusBytes(fn, lease, handle, key.spec));
        CUSTODY_ASSIGN_OR_RETURN(plaintext,
                                 DecryptOaep(fn, lease, handle, hash, modulus_bytes, ciphertext));
        return absl::OkStatus();
      }));
  return plaintext;
}

absl::StatusOr<Secret> DecryptRsaRaw(TokenState& state, const KeyPair& key,
                                     std::string_view ciphertext) {
  TokenState::Timer timer(state, Timed::kDecrypt);
  CUSTODY_RETURN_IF_ERROR(RequireRsa(key));
  if (!state.mechanisms.contains("CKM_RSA_X_509")) {
    return absl::UnimplementedError("the token does not offer CKM_RSA_X_509");
  }
  CK_FUNCTION_LIST* fn = state.fn;
  Secret message;
  size_t modulus_bytes = 0;
  CUSTODY_RETURN_IF_ERROR(state.RunOnKey(
      key, CKO_PRIVATE_KEY,
      [&](SessionPool::Lease& lease, CK_OBJECT_HANDLE handle) -> absl::Status {
        CUSTODY_ASSIGN_OR_RETURN(modulus_bytes, ModulusBytes(fn, lease, handle, key.spec));
        // Before C_DecryptInit, so that no operation is left active.
        if (ciphertext.size() != modulus_bytes) {
          return absl::InvalidArgumentError(kDecryptionFailed);
        }
        CK_MECHANISM mechanism{CKM_RSA_X_509, nullptr, 0};
        CK_RV rv = fn->C_DecryptInit(lease.get(), &mechanism, handle);
        if (rv == CKR_MECHANISM_INVALID) {
          return absl::UnimplementedError("C_DecryptInit: CKR_MECHANISM_INVALID for CKM_RSA_X_509");
        }
        CUSTODY_RETURN_IF_ERROR(lease.Check("C_DecryptInit", rv));
        CUSTODY_ASSIGN_OR_RETURN(message, RunDecrypt(fn, lease, modulus_bytes, ciphertext));
        return absl::OkStatus();
      }));
  // The k-byte encoded message: a token may have stripped its leading zeros.
  const size_t length = message.size();
  if (length > modulus_bytes) return absl::InvalidArgumentError(kDecryptionFailed);
  message.mutable_value().resize(modulus_bytes);  // within capacity: no unwiped copy
  AlignRight(message.mutable_value(), length);
  return message;
}

bool OaepSupported(TokenState& state, OaepHash hash) {
  const size_t index = hash == OaepHash::kSha1 ? 0 : 1;
  {
    absl::MutexLock lock(&state.oaep_mu);
    if (state.oaep_supported[index].has_value()) return *state.oaep_supported[index];
  }
  // Probed without the lock (no lock is held across token calls): two first callers may both
  // probe, and then agree.
  absl::StatusOr<bool> supported = false;
  if (state.mechanisms.contains("CKM_RSA_PKCS_OAEP")) {
    bool answer = false;
    auto probe = [&](bool token_objects) {
      return state.Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
        CUSTODY_ASSIGN_OR_RETURN(answer, ProbeOaep(state.fn, lease, hash, token_objects));
        return absl::OkStatus();
      });
    };
    absl::Status probed = probe(/*token_objects=*/false);
    if (!probed.ok() && CkFunctionOf(probed) == "C_GenerateKeyPair") {
      Log(LogLevel::kInfo, "pkcs11.oaep_probe_with_token_objects",
          {{"hash", OaepHashName(hash)}, {"session_keys", std::string(probed.message())}});
      probed = probe(/*token_objects=*/true);
    }
    if (probed.ok()) {
      supported = answer;
    } else {
      supported = probed;
    }
  }
  if (!supported.ok()) {
    Log(LogLevel::kWarning, "pkcs11.oaep_probe_failed",
        {{"hash", OaepHashName(hash)}, {"status", supported.status().ToString()}});
    return false;  // not cached: the next call probes again
  }
  absl::MutexLock lock(&state.oaep_mu);
  state.oaep_supported[index] = *supported;
  return *supported;
}

absl::StatusOr<Secret> DeriveEcdh(TokenState& state, const KeyPair& key,
                                  std::string_view peer_point) {
  TokenState::Timer timer(state, Timed::kDerive);
  if (!IsEc(key.spec.type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", PrintableId(key.id), " is not an EC key: no ECDH"));
  }
  const size_t point_size = GeometryOf(key.spec.type).point_size;
  if (peer_point.size() != point_size || peer_point.front() != '\x04') {
    return absl::InvalidArgumentError(
        absl::StrCat("the peer point must be an uncompressed ", point_size, "-byte point"));
  }
  const CK_ULONG field_size = (point_size - 1) / 2;
  CK_FUNCTION_LIST* fn = state.fn;
  Secret shared;
  CUSTODY_RETURN_IF_ERROR(
      state.RunOnKey(key, CKO_PRIVATE_KEY,
                     [&](SessionPool::Lease& lease, CK_OBJECT_HANDLE handle) -> absl::Status {
                       CUSTODY_ASSIGN_OR_RETURN(
                           shared, DeriveEcdhWithHandle(fn, lease, handle, peer_point, field_size));
                       return absl::OkStatus();
                     }));
  return shared;
}

}  // namespace custody::pkcs11::internal
