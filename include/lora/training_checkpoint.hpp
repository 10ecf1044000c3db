// Training checkpoints and an exact resume.
//
//   OUT/checkpoint-<step>/          step: the optimizer's step count, 8 digits (checkpoint-00000120)
//     adapter_config.json,          what write_adapter writes there: a PEFT adapter directory, so
//     adapter_model.safetensors     every checkpoint is also a usable adapter
//     optimizer.safetensors         Optimizer::save_state: AdamW's moments or SGD's momentum by
//                                   parameter name, the step count, the learning rate
//     trainer_state.json            {"format": "lora-training-checkpoint", "version": 1,
//                                    "step": N, "dropout": {module: {adapter: [4 hex words]}},
//                                    "progress": the caller's JSON (data order and position, its
//                                    own random streams, whatever its schedule needs)}
//
// save_training_checkpoint writes the directory as a whole (detail::replace_directory: a crash
// while writing leaves the earlier checkpoints as they were, at worst a stray .tmp directory,
// removed by the next save) and keeps the newest keep_last. A resume restores, in the order the
// objects need:
//   model.load_adapter(dir)                 the factors (and trained base tensors)
//   opt.add(model.parameters())             a fresh optimizer over them
//   resume_training(dir, modules, opt)      its state and the dropout streams; returns progress
// resume_training checks everything (the state file, every module and adapter, the optimizer's
// names and shapes) before it changes anything. A run stopped and resumed this way continues bit
// for bit as one that was not stopped (tests/test_checkpoint.cpp).
#pragma once

#include <lora/detail/files.hpp>
#include <lora/detail/json.hpp>
#include <lora/error.hpp>
#include <lora/module_map.hpp>
#include <lora/optim.hpp>
#include <lora/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lora {

inline std::string training_checkpoint_name(long step) {
  char s[32];
  std::snprintf(s, sizeof s, "checkpoint-%08ld", step);
  return s;
}

// The complete checkpoints in out (checkpoint-N directories with a trainer_state.json), oldest
// first, as (step, directory).
inline std::vector<std::pair<long, std::string>> training_checkpoints(const std::string& out) {
  namespace fs = std::filesystem;
  std::vector<std::pair<long, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(out, ec)) return found;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() != 19 || name.compare(0, 11, "checkpoint-") != 0 || !e.is_directory()) continue;
    if (!std::all_of(name.begin() + 11, name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    if (!fs::is_regular_file(e.path() / "trainer_state.json")) continue;
    found.emplace_back(std::stol(name.substr(11)), e.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}

// The newest complete checkpoint in out; "" when there is none.
inline std::string latest_training_checkpoint(const std::string& out) {
  const auto all = training_checkpoints(out);
  return all.empty() ? std::string() : all.back().second;
}

namespace detail {

inline std::string hex_word(std::uint64_t v) {
  char s[24];
  std::snprintf(s, sizeof s, "%016llx", static_cast<unsigned long long>(v));
  return s;
}

inline bool parse_hex_word(const nlohmann::json& j, std::uint64_t& v) {
  if (!j.is_string() || j.get<std::string>().size() != 16) return false;
  v = 0;
  for (char c : j.get<std::string>()) {
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return false;
    v = v << 4 | std::uint64_t(d);
  }
  return true;
}

// A random stream's state (Rng::state()) as 4 hex words, and back: false when j is not 4 hex
// words or is the all-zero state no stream has.
inline nlohmann::json stream_json(const std::array<std::uint64_t, 4>& s) {
  nlohmann::json words = nlohmann::json::array();
  for (std::uint64_t w : s) words.push_back(hex_word(w));
  return words;
}
inline bool parse_stream(const nlohmann::json& j, std::array<std::uint64_t, 4>& s) {
  bool ok = j.is_array() && j.size() == 4;
  for (std::size_t i = 0; ok && i < 4; ++i) ok = parse_hex_word(j[i], s[i]);
  return ok && (s[0] | s[1] | s[2] | s[3]) != 0;
}

}  // namespace detail

// Writes out/checkpoint-<opt.steps()>: write_adapter(dir) writes the adapter (e.g.
// model.save_adapter(dir, config)), then the optimizer's state and trainer_state.json with every
// layer's dropout streams and progress. Returns the checkpoint's directory. Older checkpoints
// beyond the newest keep_last are removed, after the new one is complete.
template <class Scalar>
std::string save_training_checkpoint(const std::string& out, const std::function<void(const std::string&)>& write_adapter,
                                     const ModuleMap<Scalar>& modules, const Optimizer<Scalar>& opt,
                                     const nlohmann::json& progress = nlohmann::json::object(), int keep_last = 2) {
  namespace fs = std::filesystem;
  if (keep_last < 1) detail::fail("save_training_checkpoint: keep_last is ", keep_last, ", expected >= 1");
  nlohmann::json dropout = nlohmann::json::object();
  for (const auto& [module, layer] : modules)
    for (const std::string& name : layer->adapter_names()) dropout[module][name] = detail::stream_json(layer->dropout_state(name));
  const nlohmann::json state = {{"format", "lora-training-checkpoint"}, {"version", 1}, {"step", opt.steps()},
                                {"dropout", dropout}, {"progress", progress}};
  SafeTensorsBuilder optimizer;
  opt.save_state(optimizer);
  const std::string text = state.dump(2), dir = (fs::path(out) / training_checkpoint_name(opt.steps())).string();
  detail::replace_directory(dir, [&](const std::string& tmp) {
    write_adapter(tmp);
    detail::fault_point("save_training_checkpoint");
    optimizer.save((fs::path(tmp) / "optimizer.safetensors").string());
    detail::write_file_atomic((fs::path(tmp) / "trainer_state.json").string(), detail::FileBytes(text.begin(), text.end()));
    detail::fault_point("save_training_checkpoint.written");
  });
  const auto all = training_checkpoints(out);
  for (std::size_t k = 0; k + keep_last < all.size(); ++k) fs::remove_all(all[k].second);
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out, ec)) {  // what crashed writes left (.checkpoint-N.tmp.X, nested ones)
    const std::string name = e.path().filename().string();
    if (name[0] == '.' && name.find("checkpoint-") != std::string::npos &&
        (name.find(".tmp.") != std::string::npos || name.find(".old.") != std::string::npos))
      fs::remove_all(e.path(), ec);
  }
  return dir;
}

// Restores the optimizer's state and every layer's dropout streams from checkpoint dir (after
// model.load_adapter(dir) and opt.add(...)); returns the progress JSON saved with it. Everything
// is checked first; on error nothing changes.
template <class Scalar>
nlohmann::json resume_training(const std::string& dir, const ModuleMap<Scalar>& modules, Optimizer<Scalar>& opt) {
  namespace fs = std::filesystem;
  const std::string label = (fs::path(dir) / "trainer_state.json").string();
  const std::string text = detail::read_text(label);
  nlohmann::json state;
  try {
    state = detail::parse_json<nlohmann::json>(text.data(), text.data() + text.size());
  } catch (const nlohmann::json::exception& e) {
    detail::fail("resume_training: ", label, ": not valid JSON: ", e.what());
  }
  std::vector<std::string> problems;
  if (!state.is_object() || state.value("format", "") != "lora-training-checkpoint" || state.value("version", 0) != 1)
    detail::fail("resume_training: ", label, ": not a version 1 lora-training-checkpoint state");
  if (!state.contains("step") || !state["step"].is_number_integer() || state["step"].get<long long>() < 0)
    problems.push_back("step is missing or not a count");
  const SafeTensors st = SafeTensors::open((fs::path(dir) / "optimizer.safetensors").string());
  try {
    opt.check_state(st);
  } catch (const Error& e) {
    problems.push_back(e.what());
  }
  if (problems.empty() && st.metadata().at("steps") != std::to_string(state["step"].get<long long>()))
    problems.push_back("step " + state["step"].dump() + " but the optimizer's state is at step " + st.metadata().at("steps"));
  const nlohmann::json& dropout = state.contains("dropout") && state["dropout"].is_object() ? state["dropout"] : nlohmann::json();
  if (!dropout.is_object()) problems.push_back("dropout is missing");
  std::map<std::pair<std::string, std::string>, std::array<std::uint64_t, 4>> streams;
  for (const auto& [module, layer] : modules)
    for (const std::string& name : layer->adapter_names()) {
      const nlohmann::json* words = dropout.is_object() && dropout.contains(module) && dropout[module].is_object() &&
                                            dropout[module].contains(name)
                                        ? &dropout[module][name]
                                        : nullptr;
      std::array<std::uint64_t, 4> s{};
      if (!words || !detail::parse_stream(*words, s))
        problems.push_back("dropout[\"" + module + "\"][\"" + name + "\"] is missing or not 4 hex words");
      else
        streams[{module, name}] = s;
    }
  if (dropout.is_object())
    for (const auto& [module, adapters] : dropout.items()) {
      if (!modules.contains(module)) {
        problems.push_back("dropout names module " + module + ", which the model does not have");
        continue;
      }
      if (adapters.is_object())
        for (const auto& [name, words] : adapters.items())
          if (!modules.at(module).has_adapter(name)) problems.push_back(module + " has no adapter '" + name + "' (the checkpoint's)");
    }
  if (!problems.empty()) detail::fail("resume_training: ", dir, ": ", detail::join(problems));
  opt.load_state(st);
  for (const auto& [key, s] : streams) modules.at(key.first).set_dropout_state(key.second, s);
  return state.contains("progress") ? state["progress"] : nlohmann::json::object();
}

}  // namespace lora
