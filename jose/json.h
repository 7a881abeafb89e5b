// A small strict JSON (RFC 8259) value, parser and serializer for JOSE headers, claims and JWKs.
//
// Why our own: JOSE needs a parser that refuses duplicate member names (RFC 7515 §5.2 lets a
// producer's header be ambiguous otherwise), invalid UTF-8, lone surrogates, trailing data and
// unbounded nesting, and keeps member order for deterministic output. It is small enough to
// fuzz in full.
#ifndef CUSTODY_JOSE_JSON_H_
#define CUSTODY_JOSE_JSON_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"

namespace custody::jose {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  using Array = std::vector<Json>;
  using Object = std::vector<std::pair<std::string, Json>>;  // insertion order, unique keys

  Json() = default;  // null
  static Json Bool(bool b);
  // Numbers keep their exact source text; integers are also available as int64.
  static Json Int(int64_t v);
  static Json String(std::string s);
  static Json MakeArray(Array items = {});
  static Json MakeObject(Object members = {});

  Type type() const;
  bool is_null() const { return type() == Type::kNull; }
  bool is_bool() const { return type() == Type::kBool; }
  bool is_number() const { return type() == Type::kNumber; }
  bool is_string() const { return type() == Type::kString; }
  bool is_array() const { return type() == Type::kArray; }
  bool is_object() const { return type() == Type::kObject; }

  bool as_bool() const;                  // false unless kBool
  const std::string& as_string() const;  // empty unless kString
  // The integer value when this is a number with no fraction/exponent that fits int64.
  std::optional<int64_t> as_int() const;
  const std::string& number_text() const;  // source text of a number
  const Array& as_array() const;           // empty unless kArray
  const Object& as_object() const;         // empty unless kObject

  // Object access. Find returns nullptr when absent or when this is not an object.
  const Json* Find(std::string_view key) const;
  // Sets (replacing an existing member in place, else appending). No-op unless object.
  void Set(std::string key, Json value);
  // Array append. No-op unless array.
  void Append(Json value);

  // Compact serialization, members in stored order, strings escaped minimally (RFC 8259 §7,
  // non-ASCII kept as UTF-8). Numbers written from their text.
  std::string Serialize() const;

 private:
  struct Number {
    std::string text;
  };
  using Value = std::variant<std::monostate, bool, Number, std::string, Array, Object>;
  explicit Json(Value v) : value_(std::move(v)) {}
  friend class JsonParser;
  Value value_;
};

struct JsonLimits {
  size_t max_bytes = 64 * 1024;
  int max_depth = 16;
};

// Parses exactly one JSON value (surrounding whitespace allowed). INVALID_ARGUMENT with a short
// reason and byte offset on: syntax errors, duplicate object keys, invalid UTF-8, unpaired
// surrogate escapes, control characters in strings, depth or size over the limits, trailing data.
absl::StatusOr<Json> ParseJson(std::string_view text, const JsonLimits& limits = {});

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_JSON_H_
