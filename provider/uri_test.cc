#include "provider/uri.h"

#include "gtest/gtest.h"

namespace custody::provider {
namespace {

TEST(CustodyUriTest, ParsesRingVersionAndAddress) {
  auto u = ParseCustodyUri("custody:ring=clients/acme/mtls");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->ring, "clients/acme/mtls");
  EXPECT_EQ(u->version, 0u);
  EXPECT_EQ(u->address, "");
  u = ParseCustodyUri("custody:ring=op/tls;version=3;addr=unix:/run/custody/custodyd.sock");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->ring, "op/tls");
  EXPECT_EQ(u->version, 3u);
  EXPECT_EQ(u->address, "unix:/run/custody/custodyd.sock");
  u = ParseCustodyUri("custody:addr=127.0.0.1:8443;ring=x;version=4294967295");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->version, 4294967295u);
}

TEST(CustodyUriTest, RejectsMalformedUrisWithTheReason) {
  const std::pair<const char*, const char*> cases[] = {
      {"file:/etc/key.pem", "not a custody: URI"},
      {"custody:", "malformed attribute"},
      {"custody:version=1", "names no ring"},
      {"custody:ring=", "malformed attribute"},
      {"custody:ring=a;ring=b", "'ring' given twice"},
      {"custody:ring=a;version=0", "not a decimal from 1"},
      {"custody:ring=a;version=4294967296", "not a decimal from 1"},
      {"custody:ring=a;version=-1", "not a decimal from 1"},
      {"custody:ring=a;version=1x", "not a decimal from 1"},
      {"custody:ring=a;pin-value=1234", "unknown attribute 'pin-value'"},
      {"custody:ring=a;;version=1", "malformed attribute"},
      {"custody:ring=a;", "malformed attribute"},
  };
  for (const auto& [uri, reason] : cases) {
    auto u = ParseCustodyUri(uri);
    ASSERT_FALSE(u.ok()) << uri;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << uri;
    EXPECT_NE(u.status().message().find(reason), std::string::npos)
        << uri << ": " << u.status().message();
  }
  EXPECT_FALSE(ParseCustodyUri("custody:ring=" + std::string(2000, 'a')).ok());
}

}  // namespace
}  // namespace custody::provider
