#include "common/testing/status_matchers.h"

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace custody::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

absl::StatusOr<int> Half(int n) {
  if (n % 2 != 0) return absl::InvalidArgumentError("odd: " + std::to_string(n));
  return n / 2;
}

// Uses both macros: the first error returns at once, unchanged.
absl::StatusOr<int> Quarter(int n) {
  CUSTODY_ASSIGN_OR_RETURN(int half, Half(n));
  CUSTODY_ASSIGN_OR_RETURN(half, Half(half));
  return half;
}

absl::Status EvenOrError(int n) {
  CUSTODY_RETURN_IF_ERROR(Half(n).status());
  return absl::OkStatus();
}

TEST(StatusMatchersTest, MatchCodeAndMessageOfStatusAndStatusOr) {
  EXPECT_THAT(absl::OkStatus(), IsOk());
  EXPECT_THAT(Half(4), IsOk());
  EXPECT_THAT(Half(3), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Half(3), StatusIs(absl::StatusCode::kInvalidArgument, "odd: 3"));
  EXPECT_THAT(Half(3), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("odd")));
  EXPECT_THAT(Half(3), Not(IsOk()));
  EXPECT_THAT(Half(3), Not(StatusIs(absl::StatusCode::kNotFound)));
  EXPECT_THAT(Half(3), Not(StatusIs(absl::StatusCode::kInvalidArgument, "odd: 5")));
  EXPECT_THAT(absl::NotFoundError("x"), Not(IsOk()));
}

TEST(StatusMatchersTest, AFailureExplainsWithTheWholeStatus) {
  ::testing::StringMatchResultListener listener;
  EXPECT_FALSE(::testing::ExplainMatchResult(IsOk(), Half(3), &listener));
  EXPECT_THAT(listener.str(), HasSubstr("INVALID_ARGUMENT: odd: 3"));
}

TEST(StatusMacrosTest, ReturnTheFirstErrorAndAssignOtherwise) {
  EXPECT_THAT(Quarter(8), IsOk());
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_THAT(Quarter(7), StatusIs(absl::StatusCode::kInvalidArgument, "odd: 7"));
  EXPECT_THAT(Quarter(6), StatusIs(absl::StatusCode::kInvalidArgument, "odd: 3"));
  EXPECT_THAT(EvenOrError(2), IsOk());
  EXPECT_THAT(EvenOrError(1), StatusIs(absl::StatusCode::kInvalidArgument, "odd: 1"));
}

}  // namespace
}  // namespace custody::testing
