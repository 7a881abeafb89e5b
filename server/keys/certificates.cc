#include "server/keys/certificates.h"

#include <ctime>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/openssl_ptr.h"
#include "custody/v1/custody.pb.h"
#include "jose/base64url.h"
#include "openssl/core_names.h"
#include "openssl/err.h"
#include "openssl/pem.h"
#include "openssl/rsa.h"
#include "openssl/x509.h"
#include "openssl/x509v3.h"

namespace custody::server {
namespace {

using NamePtr = OpensslPtr<X509_NAME>;
using ReqPtr = OpensslPtr<X509_REQ>;
using BioPtr = OpensslPtr<BIO>;

absl::StatusOr<NamePtr> ParseSubject(absl::string_view subject) {
  if (!absl::StartsWith(subject, "/") || subject.size() < 4) {
    return absl::InvalidArgumentError(
        "subject must have OpenSSL's form /CN=name[/O=organization/C=country...]");
  }
  NamePtr name(X509_NAME_new());
  for (absl::string_view rdn : absl::StrSplit(subject.substr(1), '/')) {
    const size_t eq = rdn.find('=');
    if (eq == absl::string_view::npos || eq == 0 || eq + 1 == rdn.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("subject component '", rdn, "' is not TYPE=value"));
    }
    const std::string type(rdn.substr(0, eq)), value(rdn.substr(eq + 1));
    if (X509_NAME_add_entry_by_txt(name.get(), type.c_str(), MBSTRING_UTF8,
                                   reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1,
                                   0) != 1) {
      ERR_clear_error();  // leave no stale error on this request thread's queue
      return absl::InvalidArgumentError(
          absl::StrCat("subject attribute '", type, "' is unknown or its value is invalid"));
    }
  }
  return name;
}

absl::Status AddSubjectAltNames(X509_REQ* req, const std::vector<std::string>& sans) {
  if (sans.empty()) return absl::OkStatus();
  std::vector<std::string> parts;
  for (const std::string& san : sans) {
    const size_t colon = san.find(':');
    const std::string kind = absl::AsciiStrToLower(san.substr(0, colon));
    const std::string value = colon == std::string::npos ? "" : san.substr(colon + 1);
    const char* conf_kind = kind == "dns"     ? "DNS"
                            : kind == "uri"   ? "URI"
                            : kind == "ip"    ? "IP"
                            : kind == "email" ? "email"
                                              : nullptr;
    if (conf_kind == nullptr || value.empty() || value.find(',') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "subjectAltName '", san, "' must be dns:NAME, uri:URI, ip:ADDRESS or email:ADDRESS"));
    }
    parts.push_back(absl::StrCat(conf_kind, ":", value));
  }
  const std::string conf = absl::StrJoin(parts, ",");
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, nullptr, NID_subject_alt_name, conf.c_str());
  if (ext == nullptr) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("invalid subjectAltName '", conf, "'"));
  }
  STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
  sk_X509_EXTENSION_push(exts, ext);
  const int ok = X509_REQ_add_extensions(req, exts);
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  if (ok != 1) return absl::InternalError("X509_REQ_add_extensions failed");
  return absl::OkStatus();
}

// The DER AlgorithmIdentifier of the ring's signature, as OpenSSL's default provider encodes it
// (a verify context on the public key with the same parameters: the PSS parameters included).
absl::StatusOr<std::string> SignatureAlgorithm(const EVP_PKEY* public_key,
                                               const SigningProfile& profile) {
  if (profile.scheme == pkcs11::SignScheme::kEddsa) {
    static const unsigned char kEd25519[] = {0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70};
    return std::string(reinterpret_cast<const char*>(kEd25519), sizeof(kEd25519));
  }
  OpensslPtr<EVP_PKEY_CTX> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, const_cast<EVP_PKEY*>(public_key), nullptr));
  if (ctx == nullptr || EVP_PKEY_verify_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_signature_md(ctx.get(), profile.digest) != 1) {
    return absl::InternalError("cannot set up the signature algorithm");
  }
  if (profile.scheme == pkcs11::SignScheme::kRsaPssSha256) {
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), profile.digest) != 1 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), RSA_PSS_SALTLEN_DIGEST) != 1) {
      return absl::InternalError("cannot set up the RSA-PSS parameters");
    }
  }
  unsigned char aid[256];
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, aid, sizeof(aid)),
      OSSL_PARAM_construct_end()};
  if (EVP_PKEY_CTX_get_params(ctx.get(), params) != 1 || params[0].return_size == 0 ||
      params[0].return_size > sizeof(aid)) {
    return absl::InternalError("no AlgorithmIdentifier for the ring's signature");
  }
  return std::string(reinterpret_cast<const char*>(aid), params[0].return_size);
}

}  // namespace

absl::StatusOr<std::string> BuildCertificateRequest(const EVP_PKEY* public_key,
                                                    const SigningProfile& profile,
                                                    absl::string_view subject,
                                                    const std::vector<std::string>& sans,
                                                    const TokenSigner& sign) {
  auto name = ParseSubject(subject);
  if (!name.ok()) return name.status();
  ReqPtr req(X509_REQ_new());
  if (req == nullptr || X509_REQ_set_version(req.get(), X509_REQ_VERSION_1) != 1 ||
      X509_REQ_set_subject_name(req.get(), name->get()) != 1 ||
      X509_REQ_set_pubkey(req.get(), const_cast<EVP_PKEY*>(public_key)) != 1) {
    return absl::InternalError("cannot build the certificate request");
  }
  if (absl::Status s = AddSubjectAltNames(req.get(), sans); !s.ok()) return s;

  auto aid_der = SignatureAlgorithm(public_key, profile);
  if (!aid_der.ok()) return aid_der.status();
  const auto* p = reinterpret_cast<const unsigned char*>(aid_der->data());
  X509_ALGOR* aid = d2i_X509_ALGOR(nullptr, &p, static_cast<long>(aid_der->size()));
  if (aid == nullptr) return absl::InternalError("bad AlgorithmIdentifier");
  const int set = X509_REQ_set1_signature_algo(req.get(), aid);
  X509_ALGOR_free(aid);
  if (set != 1) return absl::InternalError("X509_REQ_set1_signature_algo failed");

  unsigned char* tbs = nullptr;
  const int tbs_len = i2d_re_X509_REQ_tbs(req.get(), &tbs);
  if (tbs_len <= 0) return absl::InternalError("cannot encode the certification request info");
  v1::SignRequest request;
  request.set_data(std::string(reinterpret_cast<const char*>(tbs), tbs_len));
  OPENSSL_free(tbs);
  if (profile.scheme == pkcs11::SignScheme::kEcdsa) {
    request.set_encoding(v1::SIGNATURE_ENCODING_DER);
  }
  auto plan = PlanRawSign(profile, request, request.data().size());
  if (!plan.ok()) return plan.status();
  auto signature = sign(*plan);
  if (!signature.ok()) return signature.status();
  if (plan->der) {
    signature = EcdsaJoseToDer(*signature);
    if (!signature.ok()) return signature.status();
  }
  ASN1_BIT_STRING* bits = ASN1_BIT_STRING_new();
  if (bits == nullptr ||
      ASN1_BIT_STRING_set(bits, reinterpret_cast<unsigned char*>(signature->data()),
                          static_cast<int>(signature->size())) != 1) {
    ASN1_BIT_STRING_free(bits);
    return absl::InternalError("cannot store the signature");
  }
  // Whole bytes: no unused bits (otherwise trailing zero bytes would be dropped on encoding).
  bits->flags &= ~0x07;
  bits->flags |= ASN1_STRING_FLAG_BITS_LEFT;
  X509_REQ_set0_signature(req.get(), bits);

  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509_REQ(bio.get(), req.get()) != 1) {
    return absl::InternalError("cannot write the certificate request");
  }
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

absl::StatusOr<CertificateChain> ParseCertificateChain(absl::string_view pem, const EVP_PKEY* key) {
  constexpr size_t kMaxPem = 64 * 1024;
  constexpr size_t kMaxCertificates = 10;
  if (pem.size() > kMaxPem) {
    return absl::InvalidArgumentError(absl::StrCat("certificate chain over ", kMaxPem, " bytes"));
  }
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::vector<OpensslPtr<X509>> certs;
  while (true) {
    X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (cert == nullptr) break;
    certs.emplace_back(cert);
    if (certs.size() > kMaxCertificates) {
      return absl::InvalidArgumentError(
          absl::StrCat("certificate chain longer than ", kMaxCertificates));
    }
  }
  ERR_clear_error();  // the end of the PEM data
  if (certs.empty()) {
    return absl::InvalidArgumentError("no PEM certificate (-----BEGIN CERTIFICATE-----) found");
  }
  for (size_t i = 0; i + 1 < certs.size(); ++i) {
    if (X509_check_issued(certs[i + 1].get(), certs[i].get()) != X509_V_OK) {
      return absl::InvalidArgumentError(
          absl::StrCat("certificate ", i + 2, " of the chain did not issue certificate ", i + 1,
                       " (give the leaf first, then its issuers in order)"));
    }
  }
  X509* leaf = certs.front().get();
  if (key != nullptr && EVP_PKEY_eq(X509_get0_pubkey(leaf), key) != 1) {
    return absl::InvalidArgumentError(
        "the leaf certificate's public key is not this version's key (certificate for another "
        "key?)");
  }
  CertificateChain out;
  for (const auto& c : certs) {
    unsigned char* der = nullptr;
    const int len = i2d_X509(c.get(), &der);
    if (len <= 0) return absl::InternalError("i2d_X509 failed");
    out.der.emplace_back(reinterpret_cast<const char*>(der), len);
    OPENSSL_free(der);
  }
  auto name = [](const X509_NAME* n) {
    BioPtr b(BIO_new(BIO_s_mem()));
    X509_NAME_print_ex(b.get(), n, 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    const long len = BIO_get_mem_data(b.get(), &data);
    return std::string(data, static_cast<size_t>(len));
  };
  out.subject = name(X509_get_subject_name(leaf));
  out.issuer = name(X509_get_issuer_name(leaf));
  struct tm tm {};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(leaf), &tm) != 1) {
    return absl::InvalidArgumentError("the leaf certificate's notAfter is invalid");
  }
  out.not_after_ms = static_cast<int64_t>(timegm(&tm)) * 1000;
  unsigned char digest[32];
  if (EVP_Digest(out.der.front().data(), out.der.front().size(), digest, nullptr, EVP_sha256(),
                 nullptr) != 1) {
    return absl::InternalError("SHA-256 failed");
  }
  out.sha256_thumbprint =
      jose::Base64UrlEncode(std::string_view(reinterpret_cast<char*>(digest), sizeof(digest)));
  return out;
}

void DescribeCertificate(absl::string_view chain_pem, int64_t prepublish_ms,
                         v1::CertificateInfo* out) {
  auto chain = ParseCertificateChain(chain_pem);
  if (!chain.ok()) {
    out->set_subject(absl::StrCat("(stored chain unreadable: ", chain.status().message(), ")"));
    return;
  }
  out->set_subject(chain->subject);
  out->set_issuer(chain->issuer);
  out->set_not_after_ms(chain->not_after_ms);
  out->set_sha256_thumbprint(chain->sha256_thumbprint);
  out->set_chain_length(static_cast<int>(chain->der.size()));
  out->set_expiring(chain->not_after_ms - absl::ToUnixMillis(absl::Now()) <= prepublish_ms);
}

void SetJwkCertificateMembers(const CertificateChain& chain, jose::Json& jwk) {
  jose::Json x5c = jose::Json::MakeArray();
  for (const std::string& der : chain.der) x5c.Append(jose::Json::String(absl::Base64Escape(der)));
  jwk.Set("x5c", std::move(x5c));
  jwk.Set("x5t#S256", jose::Json::String(chain.sha256_thumbprint));
}

absl::Status RotationCertificateGate(const rotation::RingRecord& ring,
                                     const rotation::VersionRecord& pending) {
  if (!ring.require_certificate || !pending.certificate_chain.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "ring '", ring.name, "' requires a certificate and PENDING version ", pending.version,
      " has none: custodyctl csr / certificate set first (or rotate with force)"));
}

std::string RotationWaiting(const rotation::RingRecord& ring, int64_t next_rotation_ms,
                            const rotation::VersionRecord* pending, int64_t now_ms) {
  if (next_rotation_ms == 0 || now_ms < next_rotation_ms || pending == nullptr) return "";
  absl::Status gate = RotationCertificateGate(ring, *pending);
  if (gate.ok()) return "";
  return absl::StrCat("automatic rotation due since ",
                      absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixMillis(next_rotation_ms),
                                       absl::UTCTimeZone()),
                      " waits: ", gate.message());
}

}  // namespace custody::server
