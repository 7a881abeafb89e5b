// gMock matchers for absl::Status and absl::StatusOr<T> (Abseil 20220623 ships none):
//   EXPECT_THAT(DoIt(), IsOk());
//   EXPECT_THAT(Parse(x), StatusIs(absl::StatusCode::kInvalidArgument));
//   EXPECT_THAT(Decrypt(y), StatusIs(absl::StatusCode::kInvalidArgument, "decryption failed"));
//   EXPECT_THAT(Read(z), StatusIs(absl::StatusCode::kNotFound, testing::HasSubstr("op/ring")));
// A failure prints the whole status (code and message), not "false". Header-only: a test that
// uses it links GTest::gmock.
#ifndef CUSTODY_COMMON_TESTING_STATUS_MATCHERS_H_
#define CUSTODY_COMMON_TESTING_STATUS_MATCHERS_H_

#include <ostream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace custody::testing {
namespace internal_status {

inline const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

class StatusIsMatcher {
 public:
  StatusIsMatcher(absl::StatusCode code, ::testing::Matcher<const std::string&> message)
      : code_(code), message_(std::move(message)) {}

  template <typename T>
  bool MatchAndExplain(const T& value, ::testing::MatchResultListener* listener) const {
    const absl::Status& status = StatusOf(value);
    *listener << "whose status is " << status;
    if (status.code() != code_) return false;
    return message_.Matches(std::string(status.message()));
  }
  void DescribeTo(std::ostream* os) const {
    *os << "has status code " << absl::StatusCodeToString(code_) << " and a message that ";
    message_.DescribeTo(os);
  }
  void DescribeNegationTo(std::ostream* os) const {
    *os << "does not have status code " << absl::StatusCodeToString(code_)
        << " or has a message that ";
    message_.DescribeNegationTo(os);
  }

 private:
  absl::StatusCode code_;
  ::testing::Matcher<const std::string&> message_;
};

}  // namespace internal_status

// Matches a Status or StatusOr whose code is `code` and whose message matches `message` (a string
// for equality, or any string matcher; by default anything).
inline ::testing::PolymorphicMatcher<internal_status::StatusIsMatcher> StatusIs(
    absl::StatusCode code,
    ::testing::Matcher<const std::string&> message = ::testing::A<const std::string&>()) {
  return ::testing::MakePolymorphicMatcher(
      internal_status::StatusIsMatcher(code, std::move(message)));
}

// Matches an OK Status, or a StatusOr holding a value.
inline ::testing::PolymorphicMatcher<internal_status::StatusIsMatcher> IsOk() {
  return StatusIs(absl::StatusCode::kOk);
}

}  // namespace custody::testing

#endif  // CUSTODY_COMMON_TESTING_STATUS_MATCHERS_H_
