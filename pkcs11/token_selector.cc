// ParseTokenSelector (declared in token.h): RFC 7512 PKCS#11 URI token attributes.
#include <functional>
#include <set>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "pkcs11/cryptoki.h"
#include "pkcs11/token.h"

namespace custody::pkcs11 {
namespace {

absl::StatusOr<std::string> PercentDecode(absl::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out.push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) {
      return absl::InvalidArgumentError("pkcs11 URI: truncated percent-encoding");
    }
    if (!absl::ascii_isxdigit(in[i + 1]) || !absl::ascii_isxdigit(in[i + 2])) {
      return absl::InvalidArgumentError("pkcs11 URI: invalid percent-encoding");
    }
    auto digit = [](char c) {
      return absl::ascii_isdigit(c) ? c - '0' : absl::ascii_tolower(c) - 'a' + 10;
    };
    out.push_back(static_cast<char>(digit(in[i + 1]) * 16 + digit(in[i + 2])));
    i += 2;
  }
  return out;
}

absl::Status RefusePinValue(absl::string_view name) {
  if (name == "pin-value") {
    // Never echo the value: it is the PIN.
    return absl::InvalidArgumentError(
        "pkcs11 URI: pin-value is refused (a PIN in a URI leaks through argv and logs); "
        "provide the PIN from a file or the environment");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TokenSelector> ParseTokenSelector(std::string_view label_or_uri) {
  TokenSelector selector;
  constexpr absl::string_view kScheme = "pkcs11:";
  const absl::string_view input = AsAbsl(label_or_uri);
  if (!absl::StartsWithIgnoreCase(input, kScheme)) {
    selector.label = std::string(input);
    return selector;
  }
  absl::string_view rest = input.substr(kScheme.size());
  if (rest.find('#') != absl::string_view::npos) {
    return absl::InvalidArgumentError("pkcs11 URI: a fragment ('#') is not allowed");
  }
  absl::string_view path = rest;
  absl::string_view query;
  if (size_t q = rest.find('?'); q != absl::string_view::npos) {
    path = rest.substr(0, q);
    query = rest.substr(q + 1);
  }
  // Query attributes (pin-source, module-name, module-path) do not select a token: the module
  // comes from Options::module_path and the PIN from Options::pin. Only pin-value is refused.
  for (absl::string_view attribute : absl::StrSplit(query, '&', absl::SkipEmpty())) {
    CUSTODY_RETURN_IF_ERROR(RefusePinValue(attribute.substr(0, attribute.find('='))));
  }
  std::set<std::string, std::less<>> seen;
  for (absl::string_view attribute : absl::StrSplit(path, ';', absl::SkipEmpty())) {
    size_t eq = attribute.find('=');
    if (eq == absl::string_view::npos) {
      // Not echoed: a malformed attribute could still carry a secret.
      return absl::InvalidArgumentError("pkcs11 URI: path attribute without '='");
    }
    absl::string_view name = attribute.substr(0, eq);
    CUSTODY_RETURN_IF_ERROR(RefusePinValue(name));
    if (!seen.insert(std::string(name)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("pkcs11 URI: attribute '", name, "' appears twice"));
    }
    CUSTODY_ASSIGN_OR_RETURN(std::string value, PercentDecode(attribute.substr(eq + 1)));
    if (name == "token") {
      selector.label = std::move(value);
    } else if (name == "serial") {
      selector.serial = std::move(value);
    } else if (name == "manufacturer") {
      selector.manufacturer = std::move(value);
    } else if (name == "model") {
      selector.model = std::move(value);
    } else if (name == "slot-id") {
      uint64_t slot_id = 0;
      if (!absl::SimpleAtoi(value, &slot_id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("pkcs11 URI: slot-id '", value, "' is not a decimal number"));
      }
      selector.slot_id = slot_id;
    } else if (name == "object" || name == "id" || name == "type" ||
               name == "library-manufacturer" || name == "library-description" ||
               name == "library-version" || name == "slot-description" ||
               name == "slot-manufacturer" || absl::StartsWith(name, "x-")) {
      // RFC 7512 attributes that do not select a token; objects are chosen by CKA_ID elsewhere.
    } else {
      return absl::InvalidArgumentError(absl::StrCat("pkcs11 URI: unknown attribute '", name, "'"));
    }
  }
  return selector;
}

}  // namespace custody::pkcs11
