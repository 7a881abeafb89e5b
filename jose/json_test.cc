#include "jose/json.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace custody::jose {
namespace {

void ExpectRejected(const std::string& text, const JsonLimits& limits = {}) {
  absl::StatusOr<Json> parsed = ParseJson(text, limits);
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << "'" << text << "'";
}

Json MustParse(const std::string& text) {
  absl::StatusOr<Json> parsed = ParseJson(text);
  EXPECT_TRUE(parsed.ok()) << text << ": " << parsed.status();
  return parsed.ok() ? *parsed : Json();
}

TEST(JsonTest, ParsesAndSerializesPreservingMemberOrder) {
  const std::string text = R"({"b":1,"a":[true,false,null],"c":"x","d":{}})";
  const Json json = MustParse(text);
  ASSERT_TRUE(json.is_object());
  ASSERT_EQ(json.as_object().size(), 4u);
  EXPECT_EQ(json.as_object()[0].first, "b");
  EXPECT_EQ(json.as_object()[1].first, "a");
  EXPECT_EQ(json.Serialize(), text);
}

TEST(JsonTest, AllowsSurroundingWhitespace) {
  const Json json = MustParse(" \t\r\n{ \"a\" : [ 1 , 2 ] }\n ");
  EXPECT_EQ(json.Serialize(), R"({"a":[1,2]})");
}

TEST(JsonTest, RejectsDuplicateKeys) {
  ExpectRejected(R"({"a":1,"a":2})");
  ExpectRejected(R"({"x":{"a":1,"b":2,"a":3}})");
  ExpectRejected(R"({"a":1,"\u0061":2})");  // same name after unescaping
}

TEST(JsonTest, RejectsInvalidUtf8) {
  ExpectRejected("\"\xc3\x28\"");          // bad continuation byte
  ExpectRejected("\"\xc0\xaf\"");          // overlong '/'
  ExpectRejected("\"\xe0\x80\xaf\"");      // overlong 3-byte
  ExpectRejected("\"\xed\xa0\x80\"");      // UTF-8 encoded surrogate U+D800
  ExpectRejected("\"\xf4\x90\x80\x80\"");  // above U+10FFFF
  ExpectRejected("\"\xe2\x82\"");          // truncated
  ExpectRejected("\"\xff\"");
  ExpectRejected("\"\x80\"");  // lone continuation byte
}

TEST(JsonTest, KeepsValidUtf8) {
  const Json json = MustParse("\"\xe2\x82\xac \xf0\x9f\x98\x80\"");
  EXPECT_EQ(json.as_string(), "\xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(json.Serialize(), "\"\xe2\x82\xac \xf0\x9f\x98\x80\"");
}

TEST(JsonTest, RejectsLoneSurrogateEscapes) {
  ExpectRejected(R"("\ud800")");
  ExpectRejected(R"("\udc00")");
  ExpectRejected(R"("\ud800\u0041")");
  ExpectRejected(R"("\ud800x")");
  ExpectRejected(R"("\udc00\ud800")");
}

TEST(JsonTest, DecodesSurrogatePairToUtf8) {
  // U+1F600 is F0 9F 98 80 in UTF-8.
  EXPECT_EQ(MustParse(R"("\ud83d\ude00")").as_string(), "\xf0\x9f\x98\x80");
  EXPECT_EQ(MustParse(R"("\u00e9\u20AC")").as_string(), "\xc3\xa9\xe2\x82\xac");
}

TEST(JsonTest, EnforcesDepthLimit) {
  const auto nested = [](int depth) { return std::string(depth, '[') + std::string(depth, ']'); };
  EXPECT_TRUE(ParseJson(nested(16)).ok());
  ExpectRejected(nested(17));
  ExpectRejected(nested(100000));
  ExpectRejected(R"({"a":{"b":{"c":1}}})", JsonLimits{.max_depth = 2});
  EXPECT_TRUE(ParseJson(R"({"a":{"b":1}})", JsonLimits{.max_depth = 2}).ok());
}

TEST(JsonTest, EnforcesSizeLimit) {
  ExpectRejected("\"" + std::string(100, 'a') + "\"", JsonLimits{.max_bytes = 50});
  EXPECT_TRUE(ParseJson("\"" + std::string(48, 'a') + "\"", JsonLimits{.max_bytes = 50}).ok());
}

TEST(JsonTest, RejectsTrailingData) {
  ExpectRejected("{} {}");
  ExpectRejected("1 x");
  ExpectRejected("[]]");
  ExpectRejected("{\"a\":1}}");
  ExpectRejected("null,");
}

TEST(JsonTest, RejectsSyntaxErrors) {
  ExpectRejected("");
  ExpectRejected("   ");
  ExpectRejected("{");
  ExpectRejected("[1,]");
  ExpectRejected("{\"a\":1,}");
  ExpectRejected("{a:1}");
  ExpectRejected("{'a':1}");
  ExpectRejected("tru");
  ExpectRejected("nul");
  ExpectRejected("True");
  ExpectRejected("\"abc");
  ExpectRejected(R"("\x41")");
  ExpectRejected(R"("\u12")");
  ExpectRejected(R"("\u12G4")");
  ExpectRejected("\"a\nb\"");  // raw control character
  ExpectRejected(std::string("\"a\0b\"", 5));
}

TEST(JsonTest, EscapesRoundTrip) {
  const Json json = MustParse(R"("q\" b\\ s\/ \b\f\n\r\t \u0001\u001F")");
  EXPECT_EQ(json.as_string(), "q\" b\\ s/ \b\f\n\r\t \x01\x1f");
  // RFC 8259 §7 minimal escaping: '/' is not escaped, other controls as lowercase \u00XX.
  EXPECT_EQ(json.Serialize(), R"("q\" b\\ s/ \b\f\n\r\t \u0001\u001f")");
  absl::StatusOr<Json> again = ParseJson(json.Serialize());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->as_string(), json.as_string());
  EXPECT_EQ(Json::String(std::string("\x7f\0", 2)).Serialize(), std::string("\"\x7f\\u0000\""));
}

TEST(JsonTest, ParsesNumbersKeepingText) {
  EXPECT_EQ(MustParse("0").as_int(), 0);
  EXPECT_EQ(MustParse("-0").as_int(), 0);
  EXPECT_EQ(MustParse("1300819380").as_int(), 1300819380);
  EXPECT_EQ(MustParse("-9223372036854775808").as_int(), INT64_MIN);
  EXPECT_EQ(MustParse("9223372036854775807").as_int(), INT64_MAX);

  const Json big = MustParse("9223372036854775808");
  EXPECT_TRUE(big.is_number());
  EXPECT_FALSE(big.as_int().has_value());
  EXPECT_EQ(big.number_text(), "9223372036854775808");
  EXPECT_EQ(big.Serialize(), "9223372036854775808");

  for (const char* text : {"1.5", "-0.0", "1e3", "1E+3", "2.5e-10"}) {
    const Json n = MustParse(text);
    EXPECT_TRUE(n.is_number()) << text;
    EXPECT_FALSE(n.as_int().has_value()) << text;
    EXPECT_EQ(n.Serialize(), text);
  }
}

TEST(JsonTest, RejectsMalformedNumbers) {
  for (const char* text : {"01", "-", "-01", "1.", ".5", "+1", "1e", "1e+", "0x10", "NaN",
                           "Infinity", "-Infinity", "1.e5", "--1"}) {
    ExpectRejected(text);
  }
}

TEST(JsonTest, BuildsValuesAndAccessesMembers) {
  Json obj = Json::MakeObject();
  obj.Set("a", Json::Int(-42));
  obj.Set("b", Json::Bool(true));
  obj.Set("a", Json::String("x"));  // replaces in place
  Json arr = Json::MakeArray();
  arr.Append(Json());
  arr.Append(Json::Int(7));
  obj.Set("c", arr);
  EXPECT_EQ(obj.Serialize(), R"({"a":"x","b":true,"c":[null,7]})");
  ASSERT_NE(obj.Find("b"), nullptr);
  EXPECT_TRUE(obj.Find("b")->as_bool());
  EXPECT_EQ(obj.Find("missing"), nullptr);
  EXPECT_EQ(Json::Int(-42).Serialize(), "-42");
  EXPECT_EQ(Json::Int(-42).as_int(), -42);
}

TEST(JsonTest, WrongTypeAccessorsReturnEmptyValues) {
  Json s = Json::String("x");
  EXPECT_FALSE(s.as_bool());
  EXPECT_FALSE(s.as_int().has_value());
  EXPECT_TRUE(s.as_array().empty());
  EXPECT_TRUE(s.as_object().empty());
  EXPECT_EQ(s.Find("x"), nullptr);
  s.Set("k", Json());
  s.Append(Json());
  EXPECT_EQ(s.Serialize(), "\"x\"");
  EXPECT_EQ(Json::Int(1).as_string(), "");
  EXPECT_EQ(Json().Serialize(), "null");
  EXPECT_TRUE(Json().is_null());
}

}  // namespace
}  // namespace custody::jose
