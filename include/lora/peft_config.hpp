// PeftConfig: adapter_config.json as PEFT writes and reads it, and PEFT's rules for which module
// an adapter targets and with which r and alpha.
//
//   {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], ...}
//
// target_modules / exclude_modules: a list (the path equals a name or ends with "." + name) or a
// string (a regex that must match the whole path; RE2, linear in the path, see make_regex). rank_pattern / alpha_pattern: the first key
// k, in file order, such that the path matches "(.*\.)?(k)" gives the module's r / alpha.
// modules_to_save: the names of base modules trained beside the LoRA factors (their tensors are in
// the adapter file); a causal LM's load_adapter and save_adapter handle them, a ModuleMap refuses
// them. Refused with an error naming the field: other peft_types, bias other than "none",
// layers_to_transform/layers_pattern, target_parameters and the other options that change what
// the file means. Fields this library does not know are kept and written back.
#pragma once

#include <lora/config.hpp>
#include <lora/detail/files.hpp>
#include <lora/detail/json.hpp>
#include <lora/detail/random.hpp>
#include <lora/error.hpp>

#include <nlohmann/json.hpp>
#include <re2/re2.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

namespace detail {

constexpr std::size_t kMaxPatternLength = 1 << 16;    // characters of one pattern
constexpr std::int64_t kMaxPatternMemory = 8 << 20;   // bytes RE2 may use for one pattern

// A pattern from a config, compiled by RE2: matching takes time linear in the module path and
// bounded stack, whatever the pattern (std::regex and Python's re backtrack: "(a+)+$" doubles
// its time per character, and a long path overflows std::regex's stack). RE2's syntax is
// Python's for what configs use (classes, groups, (?:...), (?P<name>...), alternation, lazy and
// counted repeats, (?i)); look-around and back-references have no linear-time match and are
// refused here with an error naming the field (what). \d and \w are ASCII-only in RE2.
inline std::unique_ptr<const re2::RE2> make_regex(const std::string& pattern, const std::string& what) {
  if (pattern.size() > kMaxPatternLength)
    fail(what, " is ", pattern.size(), " characters long, more than ", kMaxPatternLength);
  re2::RE2::Options options;
  options.set_log_errors(false);
  options.set_max_mem(kMaxPatternMemory);
  auto re = std::make_unique<const re2::RE2>(pattern, options);
  if (!re->ok())
    fail(what, " is not a regular expression this library can match (", re->error(),
         "; RE2 syntax: Python's without look-around or back-references): ", pattern.substr(0, 200));
  return re;
}

// Python's re.fullmatch(pattern, s) is not None.
inline bool full_match(const std::string& pattern, const std::string& s, const std::string& what) {
  return re2::RE2::FullMatch(s, *make_regex(pattern, what));
}

}  // namespace detail

// adapter_config.json. `raw` holds the whole file as read (key order kept); the typed fields are
// what this library uses, and to_json() writes them over raw.
struct PeftConfig {
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0;
  std::vector<std::string> target_modules;  // names, or
  std::optional<std::string> target_regex;  // one regex over the whole module path
  std::vector<std::string> exclude_modules;
  std::optional<std::string> exclude_regex;
  bool use_rslora = false;
  bool use_dora = false;  // files then hold lora_magnitude_vector per module
  bool fan_in_fan_out = false;
  std::vector<std::pair<std::string, int>> rank_pattern;       // in file order
  std::vector<std::pair<std::string, double>> alpha_pattern;   // in file order
  std::vector<std::string> modules_to_save;  // base modules trained too (a path ends with a name)
  nlohmann::ordered_json raw = nlohmann::ordered_json::object();

  // PEFT's check_target_module_exists for a module path.
  bool targets(const std::string& module) const {
    if (exclude_regex ? detail::full_match(*exclude_regex, module, "exclude_modules") : names_match(exclude_modules, module))
      return false;
    return target_regex ? detail::full_match(*target_regex, module, "target_modules") : names_match(target_modules, module);
  }
  int rank_for(const std::string& module) const { return pattern_value(rank_pattern, module, r); }
  double alpha_for(const std::string& module) const { return pattern_value(alpha_pattern, module, lora_alpha); }

  // The LoraConfig of module: base's init, bias mode, fan_in_fan_out and exact mode, with r,
  // alpha, dropout, rsLoRA and DoRA from this config, and a seed of its own drawn from base's seed
  // and the module path (so no two layers share an init or a dropout stream).
  LoraConfig lora_config(const std::string& module, LoraConfig base = {}) const {
    base.seed = detail::module_seed(base.seed, module);
    base.r = rank_for(module);
    base.alpha = alpha_for(module);
    base.dropout = lora_dropout;
    base.use_rslora = use_rslora;
    base.use_dora = use_dora;
    return base;
  }

  // Parses adapter_config.json text; label names it in errors.
  static PeftConfig from_json(const std::string& text, const std::string& label = "adapter_config.json");
  static PeftConfig read(const std::string& path) { return from_json(detail::read_text(path), path); }

  // The file's text: raw with this library's fields written over it, keys sorted, indent 2
  // (as PEFT writes it).
  std::string to_json() const;

 private:
  static bool names_match(const std::vector<std::string>& names, const std::string& m) {
    for (const auto& n : names)
      if (m == n || (m.size() > n.size() && m.compare(m.size() - n.size(), n.size(), n) == 0 &&
                     m[m.size() - n.size() - 1] == '.'))
        return true;
    return false;
  }
  template <class T>
  static T pattern_value(const std::vector<std::pair<std::string, T>>& pattern, const std::string& m, T dflt) {
    for (const auto& [key, value] : pattern)
      if (detail::full_match("(.*\\.)?(" + key + ")", m, "pattern key \"" + key + "\"")) return value;
    return dflt;
  }
};

namespace detail {

inline std::string json_text(const nlohmann::ordered_json& j) { return j.dump(); }

// A name or list of names, or one regex string; null or absent gives neither.
inline void read_names(const nlohmann::ordered_json& j, const char* field, const std::string& label,
                       std::vector<std::string>& names, std::optional<std::string>& regex) {
  if (!j.contains(field) || j[field].is_null()) return;
  const auto& v = j[field];
  if (v.is_string()) {
    regex = v.get<std::string>();
    make_regex(*regex, label + ": " + field);
    return;
  }
  if (!v.is_array()) fail(label, ": ", field, " is ", json_text(v), ", expected a list of names or a regex string");
  for (const auto& n : v) {
    if (!n.is_string()) fail(label, ": ", field, " holds ", json_text(n), ", expected names (strings)");
    names.push_back(n.get<std::string>());
  }
}

}  // namespace detail

inline PeftConfig PeftConfig::from_json(const std::string& text, const std::string& label) {
  PeftConfig c;
  try {
    c.raw = detail::parse_json<nlohmann::ordered_json>(text.data(), text.data() + text.size());
  } catch (const Error& e) {
    detail::fail(label, ": ", e.what());
  } catch (const nlohmann::json::exception& e) {
    detail::fail(label, ": not valid JSON: ", e.what());
  }
  const auto& j = c.raw;
  if (!j.is_object()) detail::fail(label, ": expected a JSON object, got ", detail::json_text(j).substr(0, 40));
  auto field = [&](const char* name) -> const nlohmann::ordered_json* {
    return j.contains(name) && !j[name].is_null() ? &j[name] : nullptr;
  };
  auto bad = [&](const char* name, const char* expected) {
    detail::fail(label, ": ", name, " is ", detail::json_text(j[name]), ", expected ", expected);
  };
  auto get_bool = [&](const char* name, bool& out) {
    if (auto* v = field(name)) {
      if (!v->is_boolean()) bad(name, "true or false");
      out = v->get<bool>();
    }
  };
  auto positive = [](const nlohmann::ordered_json& v) { return v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() > 0; };
  auto rank = [](const nlohmann::ordered_json& v) { return v.is_number_integer() && v.get<long long>() >= 1 && v.get<long long>() <= (1 << 30); };

  const auto* type = field("peft_type");
  if (!type || !type->is_string()) detail::fail(label, ": peft_type is missing, expected \"LORA\"");
  if (type->get<std::string>() != "LORA")
    detail::fail(label, ": peft_type is ", detail::json_text(*type), "; only \"LORA\" adapters are supported");
  if (auto* v = field("r")) {
    if (!rank(*v)) bad("r", "an integer >= 1");
    c.r = v->get<int>();
  }
  if (auto* v = field("lora_alpha")) {
    if (!positive(*v)) bad("lora_alpha", "a finite number > 0");
    c.lora_alpha = v->get<double>();
  }
  if (auto* v = field("lora_dropout")) {
    if (!v->is_number() || !(v->get<double>() >= 0 && v->get<double>() < 1)) bad("lora_dropout", "a number in [0, 1)");
    c.lora_dropout = v->get<double>();
  }
  if (!field("target_modules"))
    detail::fail(label, ": target_modules is missing or null; name the modules (PEFT infers them only for known "
                        "Python model types)");
  detail::read_names(j, "target_modules", label, c.target_modules, c.target_regex);
  detail::read_names(j, "exclude_modules", label, c.exclude_modules, c.exclude_regex);
  get_bool("use_rslora", c.use_rslora);
  get_bool("use_dora", c.use_dora);
  get_bool("fan_in_fan_out", c.fan_in_fan_out);
  if (auto* v = field("rank_pattern")) {
    if (!v->is_object()) bad("rank_pattern", "an object {module pattern: r}");
    for (const auto& [k, r] : v->items()) {
      if (!rank(r)) detail::fail(label, ": rank_pattern[\"", k, "\"] is ", detail::json_text(r), ", expected an integer >= 1");
      c.rank_pattern.emplace_back(k, r.get<int>());
    }
  }
  if (auto* v = field("alpha_pattern")) {
    if (!v->is_object()) bad("alpha_pattern", "an object {module pattern: alpha}");
    for (const auto& [k, a] : v->items()) {
      if (!positive(a)) detail::fail(label, ": alpha_pattern[\"", k, "\"] is ", detail::json_text(a), ", expected a number > 0");
      c.alpha_pattern.emplace_back(k, a.get<double>());
    }
  }
  auto check_keys = [&](const auto& pattern, const char* name) {
    for (const auto& kv : pattern) {
      detail::make_regex("(.*\\.)?(" + kv.first + ")", label + ": " + name + " key \"" + kv.first + "\"");
    }
  };
  check_keys(c.rank_pattern, "rank_pattern");
  check_keys(c.alpha_pattern, "alpha_pattern");

  // Options that change what the weights mean, which this library does not implement.
  if (auto* v = field("bias"); v && *v != "none")
    detail::fail(label, ": bias is ", detail::json_text(*v), "; only \"none\" is supported");
  if (auto* v = field("modules_to_save")) {
    if (!v->is_array()) bad("modules_to_save", "a list of module names");
    for (const auto& n : *v) {
      if (!n.is_string() || n.get<std::string>().empty())
        detail::fail(label, ": modules_to_save holds ", detail::json_text(n), ", expected module names");
      c.modules_to_save.push_back(n.get<std::string>());
    }
  }
  for (const char* name : {"lora_bias", "layers_to_transform", "layers_pattern",
                           "target_parameters", "layer_replication", "trainable_token_indices",
                           "alora_invocation_tokens", "use_qalora", "use_bdlora", "megatron_config"}) {
    const auto* v = field(name);
    if (v && !(*v == false || (v->is_array() && v->empty()) || (v->is_object() && v->empty())))
      detail::fail(label, ": ", name, " is ", detail::json_text(*v), "; this library does not support it");
  }
  return c;
}

inline std::string PeftConfig::to_json() const {
  nlohmann::json j = raw.is_object() ? nlohmann::json::parse(raw.dump()) : nlohmann::json::object();
  auto names = [](const std::vector<std::string>& n, const std::optional<std::string>& re) -> nlohmann::json {
    if (re) return *re;
    return n;
  };
  auto number = [](double v) -> nlohmann::json {
    if (v == std::floor(v) && std::abs(v) < 1e15) return static_cast<long long>(v);
    return v;
  };
  j["peft_type"] = "LORA";
  j["r"] = r;
  j["lora_alpha"] = number(lora_alpha);
  j["lora_dropout"] = lora_dropout;
  j["target_modules"] = names(target_modules, target_regex);
  j["exclude_modules"] = exclude_regex || !exclude_modules.empty() ? names(exclude_modules, exclude_regex) : nlohmann::json();
  j["use_rslora"] = use_rslora;
  j["use_dora"] = use_dora;
  j["fan_in_fan_out"] = fan_in_fan_out;
  j["modules_to_save"] = modules_to_save.empty() ? nlohmann::json() : nlohmann::json(modules_to_save);
  j["rank_pattern"] = nlohmann::json::object();
  for (const auto& [k, v] : rank_pattern) j["rank_pattern"][k] = v;
  j["alpha_pattern"] = nlohmann::json::object();
  for (const auto& [k, v] : alpha_pattern) j["alpha_pattern"][k] = number(v);
  // PEFT's defaults for the fields a fresh config must have.
  const nlohmann::json defaults = {{"bias", "none"}, {"init_lora_weights", true},
                                   {"inference_mode", true}, {"modules_to_save", nullptr},
                                   {"base_model_name_or_path", nullptr}, {"task_type", nullptr}, {"revision", nullptr},
                                   {"layers_to_transform", nullptr}, {"layers_pattern", nullptr}};
  for (const auto& [key, value] : defaults.items())
    if (!j.contains(key)) j[key] = value;
  return j.dump(2);
}

}  // namespace lora
