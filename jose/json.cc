#include "jose/json.h"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace custody::jose {
namespace {

const std::string& EmptyString() {
  static const std::string* const kEmpty = new std::string();
  return *kEmpty;
}

void AppendUtf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out.push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// RFC 8259 escaping, shared with the structured log and the audit log.
void SerializeString(const std::string& s, std::string& out) { AppendJsonString(out, s); }

}  // namespace

Json Json::Bool(bool b) { return Json(Value(b)); }
Json Json::Int(int64_t v) { return Json(Value(Number{std::to_string(v)})); }
Json Json::String(std::string s) { return Json(Value(std::move(s))); }
Json Json::MakeArray(Array items) { return Json(Value(std::move(items))); }
Json Json::MakeObject(Object members) { return Json(Value(std::move(members))); }

Json::Type Json::type() const {
  switch (value_.index()) {
    case 1:
      return Type::kBool;
    case 2:
      return Type::kNumber;
    case 3:
      return Type::kString;
    case 4:
      return Type::kArray;
    case 5:
      return Type::kObject;
    default:
      return Type::kNull;
  }
}

bool Json::as_bool() const {
  const bool* b = std::get_if<bool>(&value_);
  return b != nullptr && *b;
}

const std::string& Json::as_string() const {
  const std::string* s = std::get_if<std::string>(&value_);
  return s != nullptr ? *s : EmptyString();
}

std::optional<int64_t> Json::as_int() const {
  const Number* n = std::get_if<Number>(&value_);
  if (n == nullptr || n->text.find_first_of(".eE") != std::string::npos) return std::nullopt;
  int64_t v = 0;
  if (!absl::SimpleAtoi(n->text, &v)) return std::nullopt;
  return v;
}

const std::string& Json::number_text() const {
  const Number* n = std::get_if<Number>(&value_);
  return n != nullptr ? n->text : EmptyString();
}

const Json::Array& Json::as_array() const {
  static const Array* const kEmpty = new Array();
  const Array* a = std::get_if<Array>(&value_);
  return a != nullptr ? *a : *kEmpty;
}

const Json::Object& Json::as_object() const {
  static const Object* const kEmpty = new Object();
  const Object* o = std::get_if<Object>(&value_);
  return o != nullptr ? *o : *kEmpty;
}

const Json* Json::Find(std::string_view key) const {
  const Object* o = std::get_if<Object>(&value_);
  if (o == nullptr) return nullptr;
  for (const auto& [k, v] : *o) {
    if (k == key) return &v;
  }
  return nullptr;
}

void Json::Set(std::string key, Json value) {
  Object* o = std::get_if<Object>(&value_);
  if (o == nullptr) return;
  for (auto& [k, v] : *o) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  o->emplace_back(std::move(key), std::move(value));
}

void Json::Append(Json value) {
  Array* a = std::get_if<Array>(&value_);
  if (a != nullptr) a->push_back(std::move(value));
}

std::string Json::Serialize() const {
  std::string out;
  switch (type()) {
    case Type::kNull:
      out = "null";
      break;
    case Type::kBool:
      out = as_bool() ? "true" : "false";
      break;
    case Type::kNumber:
      out = number_text();
      break;
    case Type::kString:
      SerializeString(as_string(), out);
      break;
    case Type::kArray: {
      out.push_back('[');
      bool first = true;
      for (const Json& item : as_array()) {
        if (!first) out.push_back(',');
        first = false;
        out += item.Serialize();
      }
      out.push_back(']');
      break;
    }
    case Type::kObject: {
      out.push_back('{');
      bool first = true;
      for (const auto& [k, v] : as_object()) {
        if (!first) out.push_back(',');
        first = false;
        SerializeString(k, out);
        out.push_back(':');
        out += v.Serialize();
      }
      out.push_back('}');
      break;
    }
  }
  return out;
}

// Recursive descent over the RFC 8259 grammar; recursion depth is bounded by limits.max_depth.
class JsonParser {
 public:
  JsonParser(std::string_view text, const JsonLimits& limits) : text_(text), limits_(limits) {}

  absl::StatusOr<Json> ParseDocument() {
    if (text_.size() > limits_.max_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "json: input of ", text_.size(), " bytes exceeds limit of ", limits_.max_bytes));
    }
    SkipWhitespace();
    absl::StatusOr<Json> value = ParseValue(0);
    if (!value.ok()) return value;
    SkipWhitespace();
    if (pos_ != text_.size()) return Error("trailing data");
    return value;
  }

 private:
  absl::Status Error(absl::string_view reason) const {
    return absl::InvalidArgumentError(absl::StrCat("json: ", reason, " at offset ", pos_));
  }

  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return text_[pos_]; }

  void SkipWhitespace() {
    while (!AtEnd() && (Peek() == ' ' || Peek() == '\t' || Peek() == '\n' || Peek() == '\r')) {
      ++pos_;
    }
  }

  bool ConsumeLiteral(std::string_view lit) {
    if (text_.substr(pos_, lit.size()) != lit) return false;
    pos_ += lit.size();
    return true;
  }

  absl::StatusOr<Json> ParseValue(int depth) {
    if (AtEnd()) return Error("unexpected end of input");
    switch (Peek()) {
      case '{':
        return ParseObject(depth + 1);
      case '[':
        return ParseArray(depth + 1);
      case '"': {
        absl::StatusOr<std::string> s = ParseString();
        if (!s.ok()) return s.status();
        return Json::String(*std::move(s));
      }
      case 't':
        if (ConsumeLiteral("true")) return Json::Bool(true);
        return Error("invalid literal");
      case 'f':
        if (ConsumeLiteral("false")) return Json::Bool(false);
        return Error("invalid literal");
      case 'n':
        if (ConsumeLiteral("null")) return Json();
        return Error("invalid literal");
      default:
        if (Peek() == '-' || (Peek() >= '0' && Peek() <= '9')) return ParseNumber();
        return Error("unexpected character");
    }
  }

  bool IsDigit() const { return !AtEnd() && Peek() >= '0' && Peek() <= '9'; }

  absl::StatusOr<Json> ParseNumber() {
    const size_t start = pos_;
    if (Peek() == '-') ++pos_;
    if (!IsDigit()) return Error("invalid number");
    if (Peek() == '0') {
      ++pos_;
      if (IsDigit()) return Error("leading zero in number");
    } else {
      while (IsDigit()) ++pos_;
    }
    if (!AtEnd() && Peek() == '.') {
      ++pos_;
      if (!IsDigit()) return Error("invalid number fraction");
      while (IsDigit()) ++pos_;
    }
    if (!AtEnd() && (Peek() == 'e' || Peek() == 'E')) {
      ++pos_;
      if (!AtEnd() && (Peek() == '+' || Peek() == '-')) ++pos_;
      if (!IsDigit()) return Error("invalid number exponent");
      while (IsDigit()) ++pos_;
    }
    return Json(Json::Value(Json::Number{std::string(text_.substr(start, pos_ - start))}));
  }

  absl::StatusOr<uint32_t> ParseHex4() {
    if (text_.size() - pos_ < 4) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_ + i];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= c - '0';
      } else if (c >= 'a' && c <= 'f') {
        v |= c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        v |= c - 'A' + 10;
      } else {
        return Error("invalid \\u escape");
      }
    }
    pos_ += 4;
    return v;
  }

  // Validates one UTF-8 sequence starting at pos_ (Unicode Table 3-7: no overlongs, no
  // surrogates, nothing above U+10FFFF) and copies it to `out`.
  absl::Status CopyUtf8Sequence(std::string& out) {
    const auto b0 = static_cast<unsigned char>(text_[pos_]);
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (b0 >= 0xc2 && b0 <= 0xdf) {
      len = 2;
    } else if (b0 >= 0xe0 && b0 <= 0xef) {
      len = 3;
      if (b0 == 0xe0) lo = 0xa0;
      if (b0 == 0xed) hi = 0x9f;
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
      len = 4;
      if (b0 == 0xf0) lo = 0x90;
      if (b0 == 0xf4) hi = 0x8f;
    } else {
      return Error("invalid UTF-8");
    }
    if (text_.size() - pos_ < len) return Error("truncated UTF-8");
    for (size_t i = 1; i < len; ++i) {
      const auto b = static_cast<unsigned char>(text_[pos_ + i]);
      const unsigned char min = i == 1 ? lo : 0x80;
      const unsigned char max = i == 1 ? hi : 0xbf;
      if (b < min || b > max) return Error("invalid UTF-8");
    }
    out.append(text_.substr(pos_, len));
    pos_ += len;
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ParseString() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (AtEnd()) return Error("unterminated string");
      const auto c = static_cast<unsigned char>(Peek());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) return Error("control character in string");
      if (c >= 0x80) {
        absl::Status s = CopyUtf8Sequence(out);
        if (!s.ok()) return s;
        continue;
      }
      if (c != '\\') {
        out.push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      ++pos_;
      if (AtEnd()) return Error("unterminated string");
      const char e = Peek();
      ++pos_;
      // The one-character escapes of RFC 8259 §7 and what each stands for.
      static constexpr absl::string_view kEscaped = "\"\\/bfnrt";
      static constexpr absl::string_view kMeaning = "\"\\/\b\f\n\r\t";
      if (size_t i = kEscaped.find(e); i != absl::string_view::npos) {
        out.push_back(kMeaning[i]);
        continue;
      }
      if (e != 'u') {
        --pos_;
        return Error("invalid escape");
      }
      absl::StatusOr<uint32_t> cp = ParseHex4();
      if (!cp.ok()) return cp.status();
      uint32_t code = *cp;
      if (code >= 0xdc00 && code <= 0xdfff) return Error("unpaired low surrogate");
      if (code >= 0xd800 && code <= 0xdbff) {
        if (!ConsumeLiteral("\\u")) return Error("unpaired high surrogate");
        absl::StatusOr<uint32_t> low = ParseHex4();
        if (!low.ok()) return low.status();
        if (*low < 0xdc00 || *low > 0xdfff) return Error("unpaired high surrogate");
        code = 0x10000 + ((code - 0xd800) << 10) + (*low - 0xdc00);
      }
      AppendUtf8(code, out);
    }
  }

  // Past an array's or object's opening bracket (at depth `depth`): true, and past `close` too,
  // when the container is empty.
  absl::StatusOr<bool> Open(int depth, char close) {
    if (depth > limits_.max_depth) return Error("nesting too deep");
    ++pos_;  // '[' or '{'
    SkipWhitespace();
    if (AtEnd() || Peek() != close) return false;
    ++pos_;
    return true;
  }

  // After an array element or an object member: true past the closing `close`, false past a
  // ','; an error otherwise.
  absl::StatusOr<bool> AfterItem(char close, absl::string_view container) {
    SkipWhitespace();
    if (AtEnd()) return Error(absl::StrCat("unterminated ", container));
    if (Peek() == ',') {
      ++pos_;
      return false;
    }
    if (Peek() == close) {
      ++pos_;
      return true;
    }
    return Error(absl::StrCat("expected ',' or '", absl::string_view(&close, 1), "'"));
  }

  absl::StatusOr<Json> ParseArray(int depth) {
    absl::StatusOr<bool> empty = Open(depth, ']');
    if (!empty.ok()) return empty.status();
    Json::Array items;
    if (*empty) return Json::MakeArray(std::move(items));
    while (true) {
      SkipWhitespace();
      absl::StatusOr<Json> item = ParseValue(depth);
      if (!item.ok()) return item;
      items.push_back(*std::move(item));
      absl::StatusOr<bool> closed = AfterItem(']', "array");
      if (!closed.ok()) return closed.status();
      if (*closed) return Json::MakeArray(std::move(items));
    }
  }

  absl::StatusOr<Json> ParseObject(int depth) {
    absl::StatusOr<bool> empty = Open(depth, '}');
    if (!empty.ok()) return empty.status();
    Json::Object members;
    if (*empty) return Json::MakeObject(std::move(members));
    std::unordered_set<std::string> seen;  // keeps duplicate detection linear in member count
    while (true) {
      SkipWhitespace();
      if (AtEnd() || Peek() != '"') return Error("expected member name");
      const size_t key_pos = pos_;
      absl::StatusOr<std::string> key = ParseString();
      if (!key.ok()) return key.status();
      if (!seen.insert(*key).second) {
        pos_ = key_pos;
        return Error(absl::StrCat("duplicate member name \"", *key, "\""));
      }
      SkipWhitespace();
      if (AtEnd() || Peek() != ':') return Error("expected ':'");
      ++pos_;
      SkipWhitespace();
      absl::StatusOr<Json> value = ParseValue(depth);
      if (!value.ok()) return value;
      members.emplace_back(*std::move(key), *std::move(value));
      absl::StatusOr<bool> closed = AfterItem('}', "object");
      if (!closed.ok()) return closed.status();
      if (*closed) return Json::MakeObject(std::move(members));
    }
  }

  std::string_view text_;
  const JsonLimits& limits_;
  size_t pos_ = 0;
};

absl::StatusOr<Json> ParseJson(std::string_view text, const JsonLimits& limits) {
  return JsonParser(text, limits).ParseDocument();
}

}  // namespace custody::jose
