// JSON read from files a user may have downloaded (adapter_config.json, safetensors headers).
// nlohmann's parser is iterative, but dump(), comparison and the error messages built from a
// value recurse once per level, so a value nested 100,000 deep would overflow the stack there.
// parse_json refuses nesting deeper than kMaxJsonDepth while parsing, before any such value
// exists; on_event (called for every parse event, as nlohmann's callback) adds checks of its own.
#pragma once

#include <lora/error.hpp>

#include <nlohmann/json.hpp>

namespace lora::detail {

constexpr int kMaxJsonDepth = 128;

// Throws lora::Error for nesting deeper than kMaxJsonDepth and nlohmann::json::exception for
// text that is not JSON; on_event may throw too.
template <class Json, class OnEvent>
Json parse_json(const char* first, const char* last, OnEvent on_event) {
  return Json::parse(first, last, [&](int depth, nlohmann::json::parse_event_t event, Json& value) {
    if (depth > kMaxJsonDepth) fail("nesting deeper than ", kMaxJsonDepth, " levels");
    on_event(event, value);
    return true;
  });
}

template <class Json>
Json parse_json(const char* first, const char* last) {
  return parse_json<Json>(first, last, [](nlohmann::json::parse_event_t, Json&) {});
}

}  // namespace lora::detail
