// The demos' small JSON files (settings, a finished phase's results): written atomically, read
// with an error that names the file.
#pragma once

#include <lora/detail/files.hpp>
#include <lora/error.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

namespace demo {

inline void write_json(const std::string& path, const nlohmann::json& j) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  const std::string text = j.dump(2) + "\n";
  lora::detail::write_file_atomic(path, lora::detail::FileBytes(text.begin(), text.end()));
}

inline nlohmann::json read_json(const std::string& path) {
  const nlohmann::json j = nlohmann::json::parse(lora::detail::read_text(path), nullptr, false);
  if (j.is_discarded()) lora::detail::fail(path, ": not JSON");
  return j;
}

}  // namespace demo
