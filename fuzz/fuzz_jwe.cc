// libFuzzer target: compact JWE parsing (jose::ParseCompactJwe, zip allowed, small limits) and,
// when it parses, content decryption with a fixed CEK (bytes 0, 1, 2, ...; the seeds in
// fuzz/corpus/fuzz_jwe are encrypted with it, see fuzz/make_corpus.py, so they reach the end).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/secret.h"
#include "jose/jwe.h"

namespace {

std::string FixedCek(size_t size) {
  std::string cek(size, '\0');
  for (size_t i = 0; i < size; ++i) cek[i] = static_cast<char>(i);
  return cek;
}

bool IsUniformFailure(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument &&
         status.message() == "decryption failed";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  custody::jose::JweLimits limits;
  limits.max_compact_bytes = 64 * 1024;
  limits.max_protected_header_bytes = 4 * 1024;
  limits.max_encrypted_key_bytes = 1024;
  limits.max_ciphertext_bytes = 32 * 1024;
  limits.allow_zip = true;
  limits.max_decompressed_bytes = 64 * 1024;

  absl::StatusOr<custody::jose::ParsedJwe> jwe =
      custody::jose::ParseCompactJwe(absl::string_view(input.data(), input.size()), limits);
  if (!jwe.ok()) return 0;

  const size_t cek_bytes = custody::jose::CekBytes(jwe->enc);
  custody::Secret cek(FixedCek(cek_bytes));
  absl::StatusOr<custody::Secret> plaintext = custody::jose::DecryptContent(*jwe, cek, limits);
  if (plaintext.ok()) {
    if (plaintext->size() > limits.max_decompressed_bytes) std::abort();
  } else if (!IsUniformFailure(plaintext.status())) {
    std::abort();  // the documented uniform error, whatever went wrong
  }
  // A CEK of the wrong length never decrypts.
  custody::Secret short_cek(FixedCek(cek_bytes - 1));
  if (custody::jose::DecryptContent(*jwe, short_cek, limits).ok()) std::abort();

  if (custody::jose::IsEcdh(jwe->alg) && jwe->epk.has_value()) {
    (void)custody::jose::ValidateEpk(*jwe->epk, "P-256");
  }
  if (size_t kek_bytes = custody::jose::KeyWrapBytes(jwe->alg); kek_bytes > 0) {
    custody::Secret kek(FixedCek(kek_bytes));
    absl::StatusOr<custody::Secret> unwrapped =
        custody::jose::AesKeyUnwrap(kek, jwe->encrypted_key);
    if (!unwrapped.ok() && !IsUniformFailure(unwrapped.status())) std::abort();
  }
  return 0;
}
