// Small helpers shared by the tests.
#pragma once

#include <lora/error.hpp>

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

// Every fragment must appear in the message.
inline ::testing::AssertionResult message_has(const std::string& msg, std::initializer_list<std::string> frags) {
  for (const auto& f : frags)
    if (msg.find(f) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << f << "\"";
  return ::testing::AssertionSuccess();
}

// stmt must throw lora::Error whose message contains every given fragment.
#define EXPECT_LORA_ERROR(stmt, ...)                                      \
  do {                                                                    \
    try {                                                                 \
      stmt;                                                               \
      ADD_FAILURE() << "no lora::Error from " #stmt;                      \
    } catch (const lora::Error& e) {                                      \
      EXPECT_TRUE(message_has(e.what(), {__VA_ARGS__}));                  \
    }                                                                     \
  } while (0)

inline std::string data_path(const std::string& rel) { return std::string(LORA_TEST_DATA) + "/" + rel; }
