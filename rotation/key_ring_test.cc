#include "rotation/key_ring.h"

#include <string>

#include "gtest/gtest.h"

namespace custody::rotation {
namespace {

TEST(RingNameTest, AcceptsDocumentedExamples) {
  EXPECT_TRUE(ValidateRingName("op/id-token").ok());
  EXPECT_TRUE(ValidateRingName("clients/acme/private-key-jwt").ok());
  EXPECT_TRUE(ValidateRingName("a").ok());
  EXPECT_TRUE(ValidateRingName("op/v1.2_x").ok());
}

TEST(RingNameTest, RejectsMalformedNamesWithReason) {
  struct Case {
    std::string name;
    std::string reason;
  };
  for (const Case& c : std::vector<Case>{
           {"", "empty"},
           {"/op", "empty segment"},
           {"op/", "empty segment"},
           {"op//x", "empty segment"},
           {"op/../x", "'.' or '..'"},
           {"Op/x", "lowercase"},
           {"op/x y", "lowercase"},
           {"op/-x", "must start"},
           {std::string(201, 'a'), "limit is 200"},
           {"a/b/c/d/e/f/g/h/i", "limit is 8"},
           {std::string(65, 'a'), "longer than 64"},
       }) {
    absl::Status s = ValidateRingName(c.name);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(s.message().find(c.reason), std::string::npos) << c.name << ": " << s.message();
  }
}

TEST(VersionStateTest, NamesRoundTrip) {
  for (VersionState s : {VersionState::kCreating, VersionState::kPending, VersionState::kActive,
                         VersionState::kRetired, VersionState::kDisabled,
                         VersionState::kDestroyScheduled, VersionState::kDestroyed}) {
    auto parsed = ParseVersionState(VersionStateName(s));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, s);
  }
  EXPECT_FALSE(ParseVersionState("BOGUS").ok());
}

}  // namespace
}  // namespace custody::rotation
