// The metadata tag key on a real SoftHSM2 token: generated once and found again, tags that verify
// only for the message they were made for, the ECDSA path, and processes starting at once ending
// with one key.
#include "server/keys/metadata_tag_key.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "pkcs11/testing/softhsm_testing.h"

namespace custody::server {
namespace {

constexpr char kSoPin[] = "so-pin-1234";
constexpr char kUserPin[] = "user-pin-1234";

class MetadataTagKeyTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto setup = pkcs11::TemporarySoftHsm::Create();
    ASSERT_TRUE(setup.ok()) << setup.status();
    softhsm_ = setup->release();
  }
  static void TearDownTestSuite() { delete softhsm_; }

  // A fresh token per test.
  void SetUp() override {
    static int n = 0;
    label_ = "tags" + std::to_string(++n);
    ASSERT_TRUE(pkcs11::Token::InitializeToken(pkcs11::TemporarySoftHsm::ModulePath(), label_,
                                               Secret(kSoPin), Secret(kUserPin))
                    .ok());
  }
  std::unique_ptr<pkcs11::Token> OpenToken() {
    pkcs11::Token::Options options;
    options.module_path = pkcs11::TemporarySoftHsm::ModulePath();
    options.selector.label = label_;
    options.pin = Secret(kUserPin);
    auto token = pkcs11::Token::Open(std::move(options));
    EXPECT_TRUE(token.ok()) << token.status();
    return token.ok() ? *std::move(token) : nullptr;
  }

  static pkcs11::TemporarySoftHsm* softhsm_;
  std::string label_;
};
pkcs11::TemporarySoftHsm* MetadataTagKeyTest::softhsm_ = nullptr;

void ExpectTagsVerifyOnlyTheirMessage(const MetadataTagKey& key) {
  auto tag = key.Tag("record one");
  ASSERT_TRUE(tag.ok()) << tag.status();
  EXPECT_EQ(key.Verify("record one", *tag).value_or(false), true);
  EXPECT_EQ(key.Verify("record one", *tag).value_or(false), true);  // remembered
  EXPECT_EQ(key.Verify("record two", *tag).value_or(true), false);
  EXPECT_EQ(key.Verify("record one", "").value_or(true), false);
  EXPECT_EQ(key.Verify("record one", "h1:AAAA").value_or(true), false);
  EXPECT_EQ(key.Verify("record one", "e1:not base64!").value_or(true), false);
  std::string flipped = *tag;
  flipped[5] = flipped[5] == 'A' ? 'B' : 'A';
  EXPECT_EQ(key.Verify("record one", flipped).value_or(true), false);
}

TEST_F(MetadataTagKeyTest, HmacKeyIsGeneratedOnceThenFoundAndVouchesOnlyForItsMessage) {
  auto token = OpenToken();
  ASSERT_NE(token, nullptr);
  auto first = MetadataTagKey::Open(token.get());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE((*first)->generated());
  EXPECT_EQ((*first)->algorithm(), "HMAC-SHA256");
  ExpectTagsVerifyOnlyTheirMessage(**first);
  auto again = MetadataTagKey::Open(token.get());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE((*again)->generated());
  EXPECT_EQ((*again)->id(), (*first)->id());
  auto tag = (*first)->Tag("m");
  ASSERT_TRUE(tag.ok());
  EXPECT_TRUE((*again)->Verify("m", *tag).value_or(false));
  // Sensitive and never extractable: the token does not hand out its value.
  auto ids = token->FindSecretKeyIds(MetadataTagKey::kLabel);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), 1u);
}

TEST_F(MetadataTagKeyTest, EcdsaKeyWhereHmacIsNotUsed) {
  auto token = OpenToken();
  ASSERT_NE(token, nullptr);
  auto key = MetadataTagKey::Open(token.get(), /*allow_hmac=*/false);
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_TRUE((*key)->generated());
  EXPECT_EQ((*key)->algorithm(), "ECDSA P-256");
  ExpectTagsVerifyOnlyTheirMessage(**key);
  // Found again by its label, by a process that could use HMAC: the existing key is kept.
  auto again = MetadataTagKey::Open(token.get());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE((*again)->generated());
  EXPECT_EQ((*again)->algorithm(), "ECDSA P-256");
  auto tag = (*key)->Tag("m");
  ASSERT_TRUE(tag.ok());
  EXPECT_TRUE((*again)->Verify("m", *tag).value_or(false));
}

// Four processes' worth of Token sessions start at once on a token without a tag key: all end
// with the same key, and one key is left in the token.
TEST_F(MetadataTagKeyTest, ProcessesStartingAtOnceEndWithOneKey) {
  constexpr int kStarters = 4;
  std::vector<std::unique_ptr<pkcs11::Token>> tokens;
  for (int i = 0; i < kStarters; ++i) tokens.push_back(OpenToken());
  std::vector<std::string> ids(kStarters);
  std::atomic<int> generated{0};
  std::atomic<int> go{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kStarters; ++i) {
    threads.emplace_back([&, i] {
      go.fetch_add(1);
      while (go.load() < kStarters) std::this_thread::yield();
      auto key = MetadataTagKey::Open(tokens[static_cast<size_t>(i)].get());
      ASSERT_TRUE(key.ok()) << key.status();
      ids[static_cast<size_t>(i)] = (*key)->id();
      if ((*key)->generated()) generated.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 1; i < kStarters; ++i) EXPECT_EQ(ids[static_cast<size_t>(i)], ids[0]);
  EXPECT_LE(generated.load(), 1);
  auto left = tokens[0]->FindSecretKeyIds(MetadataTagKey::kLabel);
  ASSERT_TRUE(left.ok());
  ASSERT_EQ(left->size(), 1u);
  EXPECT_EQ(left->front(), ids[0]);
}

// The cost a record pays (figures for docs/design.md): a tag is one token call when the record is
// written; a check is one when the record is first read, none when it is read again unchanged.
TEST_F(MetadataTagKeyTest, CostPerRecordIsOneTokenCallAndNoneForARecordReadAgain) {
  auto token = OpenToken();
  ASSERT_NE(token, nullptr);
  for (bool hmac : {true, false}) {
    auto key = MetadataTagKey::Open(token.get(), hmac);
    ASSERT_TRUE(key.ok()) << key.status();
    constexpr int kRecords = 500;
    std::vector<std::string> tags;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kRecords; ++i) {
      auto tag = (*key)->Tag("record " + std::to_string(i));
      ASSERT_TRUE(tag.ok());
      tags.push_back(*tag);
    }
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < kRecords; ++i) {
      ASSERT_TRUE((*key)->Verify("record " + std::to_string(i), tags[i]).value_or(false));
    }
    auto t2 = std::chrono::steady_clock::now();
    for (int i = 0; i < kRecords; ++i) {
      ASSERT_TRUE((*key)->Verify("record " + std::to_string(i), tags[i]).value_or(false));
    }
    auto t3 = std::chrono::steady_clock::now();
    auto us = [](auto d) {
      return std::chrono::duration<double, std::micro>(d).count() / kRecords;
    };
    std::printf("%s: tag %.1f us, first check %.1f us, check again %.1f us per record\n",
                std::string((*key)->algorithm()).c_str(), us(t1 - t0), us(t2 - t1), us(t3 - t2));
    EXPECT_LT(us(t3 - t2), us(t2 - t1));  // remembered: no token call
  }
}

}  // namespace
}  // namespace custody::server
