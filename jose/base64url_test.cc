#include "jose/base64url.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace custody::jose {
namespace {

struct Vector {
  std::string decoded;
  std::string encoded;
};

// RFC 4648 §10 test vectors with the padding removed (RFC 7515 §2).
const Vector kRfc4648Vectors[] = {
    {"", ""},           {"f", "Zg"},          {"fo", "Zm8"},          {"foo", "Zm9v"},
    {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"},
};

TEST(Base64UrlTest, EncodesRfc4648Vectors) {
  for (const Vector& v : kRfc4648Vectors) {
    EXPECT_EQ(Base64UrlEncode(v.decoded), v.encoded) << v.decoded;
  }
}

TEST(Base64UrlTest, DecodesRfc4648Vectors) {
  for (const Vector& v : kRfc4648Vectors) {
    absl::StatusOr<std::string> decoded = Base64UrlDecode(v.encoded);
    ASSERT_TRUE(decoded.ok()) << v.encoded << ": " << decoded.status();
    EXPECT_EQ(*decoded, v.decoded);
  }
}

// RFC 7515 Appendix C: octets [3, 236, 255, 224, 193] <-> "A-z_4ME".
TEST(Base64UrlTest, Rfc7515AppendixCUsesUrlSafeAlphabet) {
  const std::string octets("\x03\xec\xff\xe0\xc1", 5);
  EXPECT_EQ(Base64UrlEncode(octets), "A-z_4ME");
  absl::StatusOr<std::string> decoded = Base64UrlDecode("A-z_4ME");
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*decoded, octets);
}

TEST(Base64UrlTest, RoundTripsAllByteValues) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  for (size_t len = 0; len <= all.size(); len += 7) {
    const std::string data = all.substr(0, len);
    absl::StatusOr<std::string> decoded = Base64UrlDecode(Base64UrlEncode(data));
    ASSERT_TRUE(decoded.ok());
    EXPECT_EQ(*decoded, data);
  }
}

void ExpectRejected(const std::string& encoded) {
  absl::StatusOr<std::string> decoded = Base64UrlDecode(encoded);
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument) << "'" << encoded << "'";
}

TEST(Base64UrlTest, RejectsPadding) {
  ExpectRejected("Zg==");
  ExpectRejected("Zm8=");
  ExpectRejected("Zg=");
  ExpectRejected("====");
}

TEST(Base64UrlTest, RejectsCharactersOutsideUrlAlphabet) {
  ExpectRejected("Zm+v");  // standard alphabet
  ExpectRejected("Zm/v");
  ExpectRejected("Zm9v\n");
  ExpectRejected(" Zm9v");
  ExpectRejected("Zm 9v");
  ExpectRejected(std::string("Zm\0v", 4));
  ExpectRejected("Zm9\xc3\xa9");
}

TEST(Base64UrlTest, RejectsNonCanonicalTrailingBits) {
  ExpectRejected("Zh");   // 'h' leaves 4 non-zero bits after "f"
  ExpectRejected("Zm9");  // '9' leaves 2 non-zero bits after "fo"
  ExpectRejected("Zm9vYh");
  ExpectRejected("Zm9vYmF");
}

TEST(Base64UrlTest, RejectsLengthOneModFour) {
  ExpectRejected("Z");
  ExpectRejected("Zm9vY");
  ExpectRejected("Zm9vYmFyZ");
}

}  // namespace
}  // namespace custody::jose
