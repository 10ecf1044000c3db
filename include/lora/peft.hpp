// PEFT adapter directories: read and write what PEFT's save_pretrained / from_pretrained use.
//
//   DIR/adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
//                                      "target_modules": ["q_proj", "v_proj"], ...}
//   DIR/adapter_model.safetensors    base_model.model.<module path>.lora_A.weight (r, in)
//                                    base_model.model.<module path>.lora_B.weight (out, r)
//
// A C++ model names its LoRA layers by module path in a ModuleMap ("layers.0.self_attn.q_proj"
// -> LoraLinear&). load_adapter matches the config's target_modules against those paths as PEFT
// does (a list: the path equals a name or ends with "." + name; a string: a regex that must match
// the whole path; exclude_modules likewise), takes r and alpha per module from rank_pattern and
// alpha_pattern (the first key k, in file order, such that the path matches "(.*\.)?(k)"),
// checks every shape, and only then fills A and B: a failed load changes no layer.
// save_adapter writes both files so that PeftModel.from_pretrained loads them.
//
// Supported: LoRA on linear layers (fan_in_fan_out too), rsLoRA, rank/alpha patterns, dropout.
// Refused with an error naming the field: other peft_types, use_dora, bias other than "none",
// modules_to_save, layers_to_transform/layers_pattern, target_parameters and the other options
// that change what the file means. Fields this library does not know are kept and written back.
#pragma once

#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace lora {

namespace detail {

// std::regex (ECMAScript, close to Python's re for the patterns PEFT configs use) of a pattern
// from a config. Patterns longer than 1000 characters or with a number of more than 6 digits
// (a repeat count or a back-reference; libstdc++ overflows on huge ones) are refused before
// they reach std::regex. what names the field in the error.
inline std::regex make_regex(const std::string& pattern, const std::string& what) {
  std::size_t digits = 0;
  for (char ch : pattern) {
    digits = (ch >= '0' && ch <= '9') ? digits + 1 : 0;
    if (digits > 6) fail(what, " has a number of more than 6 digits: refused as a regular expression");
  }
  if (pattern.size() > 1000) fail(what, " is ", pattern.size(), " characters long, more than 1000");
  // A quantifier right after a quantifier ("a**", "a+*", "a{2}+"; the lazy "a*?" is fine) is
  // Python's "multiple repeat" error; std::regex accepts some and then backtracks without end.
  bool after_quantifier = false, after_lazy = false, in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char ch = pattern[i];
    if (ch == '\\') {
      ++i;
      after_quantifier = after_lazy = false;
      continue;
    }
    if (in_class) {
      in_class = ch != ']';
      continue;
    }
    const bool quantifier = ch == '*' || ch == '+' || ch == '?' || ch == '{';
    if (quantifier && (after_lazy || (after_quantifier && ch != '?')))
      fail(what, " repeats a repetition at position ", i, " (multiple repeat): ", pattern);
    after_lazy = after_quantifier && ch == '?';
    if (ch == '{') {
      const std::size_t close = pattern.find('}', i);
      if (close != std::string::npos) i = close;
    }
    after_quantifier = quantifier && !after_lazy;
    in_class = ch == '[';
  }
  try {
    return std::regex(pattern);
  } catch (const std::regex_error& e) {
    fail(what, " is not a valid regular expression: ", pattern, " (", e.what(), ")");
  }
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
  nlohmann::ordered_json raw = nlohmann::ordered_json::object();

  // PEFT's check_target_module_exists for a module path.
  bool targets(const std::string& module) const {
    if (exclude_regex ? full_match(*exclude_regex, module) : names_match(exclude_modules, module)) return false;
    return target_regex ? full_match(*target_regex, module) : names_match(target_modules, module);
  }
  int rank_for(const std::string& module) const { return pattern_value(rank_pattern, module, r); }
  double alpha_for(const std::string& module) const { return pattern_value(alpha_pattern, module, lora_alpha); }

  // The LoraConfig of module: base's init, seed, bias mode, fan_in_fan_out and exact mode, with
  // r, alpha, dropout, rsLoRA and DoRA from this config.
  LoraConfig lora_config(const std::string& module, LoraConfig base = {}) const {
    base.r = rank_for(module);
    base.alpha = alpha_for(module);
    base.dropout = lora_dropout;
    base.use_rslora = use_rslora;
    base.use_dora = use_dora;
    return base;
  }

  // Parses adapter_config.json text; label names it in errors.
  static PeftConfig from_json(const std::string& text, const std::string& label = "adapter_config.json");
  static PeftConfig read(const std::string& path) { return from_json(read_text(path), path); }

  // The file's text: raw with this library's fields written over it, keys sorted, indent 2
  // (as PEFT writes it).
  std::string to_json() const;

  static std::string read_text(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) detail::fail(path, ": cannot open");
    std::ostringstream s;
    s << f.rdbuf();
    return s.str();
  }

 private:
  static bool full_match(const std::string& re, const std::string& s) {
    return std::regex_match(s, detail::make_regex(re, "a module regex"));
  }
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
      if (std::regex_match(m, detail::make_regex("(.*\\.)?(" + key + ")", "pattern key \"" + key + "\""))) return value;
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
    c.raw = nlohmann::ordered_json::parse(text);
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
  for (const char* name : {"lora_bias", "modules_to_save", "layers_to_transform", "layers_pattern",
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

// Module path -> LoRA layer, filled by the user's model code. The map refers to layers it does
// not own; they must outlive it.
template <class Scalar>
class ModuleMap {
 public:
  void add(const std::string& path, LoraLinear<Scalar>& layer) {
    if (path.empty()) detail::fail("ModuleMap::add: empty module path");
    if (!layers_.emplace(path, &layer).second) detail::fail("ModuleMap::add: module '", path, "' is already registered");
  }
  bool contains(const std::string& path) const { return layers_.count(path) != 0; }
  LoraLinear<Scalar>& at(const std::string& path) const {
    auto it = layers_.find(path);
    if (it == layers_.end()) detail::fail("ModuleMap: no module '", path, "'");
    return *it->second;
  }
  std::size_t size() const { return layers_.size(); }
  // Sorted by path.
  auto begin() const { return layers_.begin(); }
  auto end() const { return layers_.end(); }

 private:
  std::map<std::string, LoraLinear<Scalar>*> layers_;
};

struct LoadOptions {
  // Strict (the default): every module with weights in the file must be in the map, every mapped
  // module the config targets must have weights, and every mapped module must be targeted.
  // Not strict: such modules are skipped (and left as they are); shapes are still checked.
  bool strict = true;
  // The named adapter the file fills in each layer: replaced when the layer has it, added (not
  // active) otherwise, as PEFT's load_adapter(path, adapter_name).
  std::string adapter_name = "default";
};

namespace detail {

inline const std::string kPeftPrefix = "base_model.model.";

// "base_model.model.<module>.lora_A.weight" -> module, 'A' ('B'; 'M' for DoRA's
// lora_magnitude_vector, with or without ".weight"); errors for other keys.
inline std::pair<std::string, char> split_peft_key(const std::string& key, const std::string& file) {
  for (auto [suffix, kind] : {std::pair{".lora_A.weight", 'A'}, std::pair{".lora_B.weight", 'B'},
                              std::pair{".lora_magnitude_vector", 'M'}, std::pair{".lora_magnitude_vector.weight", 'M'}}) {
    const std::size_t n = std::strlen(suffix);
    if (key.size() > kPeftPrefix.size() + n && key.compare(0, kPeftPrefix.size(), kPeftPrefix) == 0 &&
        key.compare(key.size() - n, n, suffix) == 0)
      return {key.substr(kPeftPrefix.size(), key.size() - kPeftPrefix.size() - n), kind};
  }
  for (const char* kind : {"lora_embedding_A", "lora_embedding_B"})
    if (key.find(kind) != std::string::npos)
      fail(file, ": tensor '", key, "': ", kind, " (embedding adapters) is not supported by load_adapter");
  fail(file, ": tensor '", key, "' is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight / .lora_B.weight / "
       ".lora_magnitude_vector)");
}

inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// The adapter of layer that save/describe: the named one, or the layer's one active adapter.
template <class Scalar>
std::string adapter_of(const LoraLinear<Scalar>& layer, const std::string& adapter) {
  return adapter.empty() ? layer.active_adapter() : adapter;
}

}  // namespace detail

// Reads DIR/adapter_config.json and DIR/adapter_model.safetensors into the mapped layers: in each
// targeted layer, adapter options.adapter_name gets update_layer(config's r, alpha, dropout,
// rsLoRA, DoRA for it) and the file's A and B (and DoRA magnitude), converted from
// F64/F32/F16/BF16 to Scalar. Everything is checked before any layer changes; on error nothing has
// changed. Returns the config.
template <class Scalar>
PeftConfig load_adapter(const std::string& dir, const ModuleMap<Scalar>& modules, const LoadOptions& options = {}) {
  namespace fs = std::filesystem;
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  for (const auto& p : {cfg_path, st_path})
    if (!fs::is_regular_file(p)) detail::fail("load_adapter: ", p, " does not exist");
  const PeftConfig config = PeftConfig::read(cfg_path);
  const SafeTensors st = SafeTensors::open(st_path);
  const std::string& name = options.adapter_name;

  struct Parts {
    const TensorInfo* a = nullptr;
    const TensorInfo* b = nullptr;
    const TensorInfo* m = nullptr;
  };
  std::map<std::string, Parts> in_file;
  for (const auto& t : st.tensors()) {
    auto [module, kind] = detail::split_peft_key(t.name, st_path);
    const TensorInfo*& slot = kind == 'A' ? in_file[module].a : kind == 'B' ? in_file[module].b : in_file[module].m;
    if (slot) detail::fail("load_adapter: ", st_path, ": ", module, " has two lora_magnitude_vector tensors");
    slot = &t;
  }

  std::vector<std::string> problems, unknown, missing, untargeted, not_in_config;
  if (name.empty() || name == LoraLinear<Scalar>::kBase) problems.push_back("adapter_name '" + name + "' is not a usable name");
  if (config.use_dora && config.lora_dropout > 0) problems.push_back("use_dora with lora_dropout > 0 is not supported");
  for (const auto& [module, parts] : in_file) {
    if (!parts.a || !parts.b) problems.push_back(module + " has lora_" + (parts.a ? "A" : "B") + " but no lora_" + (parts.a ? "B" : "A"));
    if (config.use_dora && !parts.m) problems.push_back(module + " has no lora_magnitude_vector but use_dora is true");
    if (!config.use_dora && parts.m) problems.push_back(module + " has a lora_magnitude_vector but use_dora is false");
    if (!config.targets(module)) not_in_config.push_back(module);
    if (!modules.contains(module)) unknown.push_back(module);
  }
  for (const auto& [module, layer] : modules) {
    if (!config.targets(module))
      untargeted.push_back(module);
    else if (!in_file.count(module))
      missing.push_back(module);
  }
  if (!not_in_config.empty())
    problems.push_back("modules with weights that target_modules does not select: " + detail::join(not_in_config));
  if (options.strict) {
    if (!unknown.empty()) problems.push_back("modules in the file but not in the model: " + detail::join(unknown));
    if (!missing.empty()) problems.push_back("targeted modules with no weights in the file: " + detail::join(missing));
    if (!untargeted.empty()) problems.push_back("model modules that target_modules does not select: " + detail::join(untargeted));
  }

  // Shapes, dtypes and layer state for every module that will be loaded.
  std::vector<std::string> to_load;
  for (const auto& [module, parts] : in_file) {
    if (!parts.a || !parts.b || !modules.contains(module) || !config.targets(module)) continue;
    const LoraLinear<Scalar>& layer = modules.at(module);
    const auto r = static_cast<std::uint64_t>(config.rank_for(module));
    const auto in = static_cast<std::uint64_t>(layer.in_features()), out = static_cast<std::uint64_t>(layer.out_features());
    auto check = [&](const TensorInfo& t, std::vector<std::uint64_t> want) {
      if (t.dtype != Dtype::F32 && t.dtype != Dtype::F16 && t.dtype != Dtype::BF16 && t.dtype != Dtype::F64)
        problems.push_back(t.name + " has dtype " + dtype_name(t.dtype) + ", expected F32, F16, BF16 or F64");
      else if (t.shape != want)
        problems.push_back(t.name + " is " + shape_string(t.shape) + ", expected " + shape_string(want) +
                           " (r = " + std::to_string(r) + " from r/rank_pattern, layer (out, in) = (" +
                           std::to_string(out) + ", " + std::to_string(in) + "))");
    };
    check(*parts.a, {r, in});
    check(*parts.b, {out, r});
    if (parts.m) check(*parts.m, {out});
    const bool has = layer.has_adapter(name);
    if (has && layer.is_merged(name)) problems.push_back(module + ": adapter '" + name + "' is merged; unmerge() before loading");
    if (config.use_dora && layer.is_merged()) problems.push_back(module + " is merged; unmerge() before loading a DoRA adapter");
    if (config.use_dora && layer.base_trainable()) problems.push_back(module + " trains its base, which DoRA does not support");
    if (config.use_dora && has && layer.active_adapters().size() > 1)
      for (const auto& a : layer.active_adapters())
        if (a == name) problems.push_back(module + ": DoRA adapter '" + name + "' would be active with others");
    to_load.push_back(module);
  }
  if (!problems.empty()) detail::fail("load_adapter: ", dir, ": ", detail::join(problems));

  // Convert everything first, then change the layers (nothing below can fail on valid input).
  struct Values {
    Mat<Scalar> a, b;
    Vec<Scalar> m;
  };
  std::vector<Values> values;
  for (const auto& module : to_load) {
    const Parts& p = in_file[module];
    values.push_back({st.matrix<Scalar>(p.a->name), st.matrix<Scalar>(p.b->name), p.m ? st.vector<Scalar>(p.m->name) : Vec<Scalar>()});
  }
  for (std::size_t i = 0; i < to_load.size(); ++i) {
    LoraLinear<Scalar>& layer = modules.at(to_load[i]);
    // Settings this library keeps beside PEFT's (init, seed, bias mode, exact mode) come from the
    // adapter being replaced, or else from the layer's first adapter.
    LoraConfig base;
    base.fan_in_fan_out = layer.fan_in_fan_out();
    const auto names = layer.adapter_names();
    if (layer.has_adapter(name))
      base = layer.config(name);
    else if (!names.empty())
      base = layer.config(names.front());
    layer.update_layer(name, config.lora_config(to_load[i], base));
    layer.set_lora_A(name, values[i].a);
    layer.set_lora_B(name, values[i].b);
    if (config.use_dora) layer.set_lora_magnitude(name, values[i].m);
  }
  return config;
}

// Writes DIR/adapter_model.safetensors (A and B of every mapped module, and DoRA's magnitude, as
// dtype) and DIR/adapter_config.json (config.to_json()), each atomically; creates DIR if needed.
// The adapter saved is `adapter` in every layer, or each layer's one active adapter when empty.
// Every module must be targeted by config, with the r, alpha, rsLoRA and DoRA flags the config
// gives it; otherwise nothing is written.
template <class Scalar>
void save_adapter(const std::string& dir, const ModuleMap<Scalar>& modules, const PeftConfig& config,
                  Dtype dtype = Dtype::F32, const std::string& adapter = "") {
  namespace fs = std::filesystem;
  if (dtype != Dtype::F32 && dtype != Dtype::F16 && dtype != Dtype::BF16 && dtype != Dtype::F64)
    detail::fail("save_adapter: dtype ", dtype_name(dtype), " is not a float type (F32, F16, BF16 or F64)");
  if (modules.size() == 0) detail::fail("save_adapter: no modules to save");
  std::vector<std::string> problems;
  SafeTensorsBuilder b;
  for (const auto& [module, layer] : modules) {
    if (!adapter.empty() && !layer->has_adapter(adapter)) {
      problems.push_back(module + " has no adapter '" + adapter + "'");
      continue;
    }
    const std::string name = detail::adapter_of(*layer, adapter);
    const LoraConfig& lc = layer->config(name);
    if (!config.targets(module)) {
      problems.push_back(module + " is not selected by target_modules");
      continue;
    }
    if (lc.r != config.rank_for(module))
      problems.push_back(module + " has r = " + std::to_string(lc.r) + ", the config gives " + std::to_string(config.rank_for(module)));
    if (lc.alpha != config.alpha_for(module))
      problems.push_back(module + " has alpha = " + detail::cat(lc.alpha) + ", the config gives " + detail::cat(config.alpha_for(module)));
    if (lc.use_rslora != config.use_rslora)
      problems.push_back(module + " has use_rslora = " + (lc.use_rslora ? "true" : "false") + ", the config differs");
    if (lc.use_dora != config.use_dora)
      problems.push_back(module + " has use_dora = " + (lc.use_dora ? "true" : "false") + ", the config differs");
    b.add(detail::kPeftPrefix + module + ".lora_A.weight", layer->lora_A(name), dtype);
    b.add(detail::kPeftPrefix + module + ".lora_B.weight", layer->lora_B(name), dtype);
    if (lc.use_dora)  // PEFT's key: the magnitude's ".weight" is dropped when saving
      b.add(detail::kPeftPrefix + module + ".lora_magnitude_vector", layer->lora_magnitude(name), dtype,
            {static_cast<std::uint64_t>(layer->out_features())});
  }
  if (!problems.empty()) detail::fail("save_adapter: ", dir, ": ", detail::join(problems));
  const std::string text = config.to_json();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) detail::fail("save_adapter: cannot create ", dir, ": ", ec.message());
  b.metadata("format", "pt");
  b.save((fs::path(dir) / "adapter_model.safetensors").string());
  SafeTensorsBuilder::write_file_atomic((fs::path(dir) / "adapter_config.json").string(),
                                        std::vector<std::uint8_t>(text.begin(), text.end()));
}

// A config that describes the mapped layers' adapter `adapter` (each layer's one active adapter
// when empty) as they are: target_modules lists their paths, r and alpha are the most common
// values, and rank_pattern/alpha_pattern name (by full path) the modules that differ. All layers
// must agree on use_rslora and use_dora.
template <class Scalar>
PeftConfig peft_config_for(const ModuleMap<Scalar>& modules, const std::string& adapter = "") {
  if (modules.size() == 0) detail::fail("peft_config_for: no modules");
  PeftConfig c;
  std::map<int, int> ranks;
  std::map<double, int> alphas;
  auto config_of = [&](const LoraLinear<Scalar>& layer) -> const LoraConfig& { return layer.config(detail::adapter_of(layer, adapter)); };
  const LoraConfig& first = config_of(*modules.begin()->second);
  for (const auto& [module, layer] : modules) {
    const LoraConfig& lc = config_of(*layer);
    if (lc.use_rslora != first.use_rslora || lc.use_dora != first.use_dora)
      detail::fail("peft_config_for: ", module, " has use_rslora = ", lc.use_rslora, ", use_dora = ", lc.use_dora, "; ",
                   modules.begin()->first, " has ", first.use_rslora, ", ", first.use_dora, "; one adapter has one value");
    ++ranks[lc.r];
    ++alphas[lc.alpha];
    c.target_modules.push_back(module);
  }
  auto most = [](const auto& counts) {
    auto best = counts.begin();
    for (auto it = counts.begin(); it != counts.end(); ++it)
      if (it->second > best->second) best = it;
    return best->first;
  };
  c.r = most(ranks);
  c.lora_alpha = most(alphas);
  c.lora_dropout = first.dropout;
  c.use_rslora = first.use_rslora;
  c.use_dora = first.use_dora;
  c.fan_in_fan_out = first.fan_in_fan_out;
  for (const auto& [module, layer] : modules) {
    // A full path as a pattern key matches only that module (and paths ending in it).
    std::string key;
    for (char ch : module) key += (ch == '.' ? std::string("\\.") : std::string(1, ch));
    const LoraConfig& lc = config_of(*layer);
    if (lc.r != c.r) c.rank_pattern.emplace_back(key, lc.r);
    if (lc.alpha != c.lora_alpha) c.alpha_pattern.emplace_back(key, lc.alpha);
  }
  return c;
}

// PEFT's LoraModel over a Hugging Face style state dict (model.safetensors): every 2-D float
// tensor "<path>.weight" whose <path> the config targets becomes a LoraLinear (with
// "<path>.bias" when present), so an adapter can be loaded, merged and exported without the
// model's architecture in C++ (what llama.cpp's export-lora does). Weights whose dtype is Scalar
// are borrowed from the mapped file without a copy (merge then copies the layer's weight, see
// LoraLinear); others are converted. With config.fan_in_fan_out, weights are stored (in, out).
template <class Scalar>
class LoraModel {
 public:
  LoraModel(const std::string& model_path, const PeftConfig& config, LoraConfig base = {})
      : st_(SafeTensors::open(model_path)), config_(config) {
    base.fan_in_fan_out = config.fan_in_fan_out;
    const std::string suffix = ".weight";
    for (const auto& t : st_.tensors()) {
      if (t.name.size() <= suffix.size() || t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) != 0)
        continue;
      const std::string module = t.name.substr(0, t.name.size() - suffix.size());
      if (t.shape.size() != 2 || !config.targets(module)) continue;
      if (t.dtype != Dtype::F64 && t.dtype != Dtype::F32 && t.dtype != Dtype::F16 && t.dtype != Dtype::BF16)
        detail::fail("LoraModel: ", model_path, ": targeted weight '", t.name, "' has dtype ", dtype_name(t.dtype));
      std::optional<Vec<Scalar>> bias;
      if (st_.contains(module + ".bias")) bias = st_.vector<Scalar>(module + ".bias");
      const LoraConfig lc = config.lora_config(module, base);
      std::unique_ptr<LoraLinear<Scalar>> layer;
      if (st_.can_map<Scalar>(t.name))
        layer = std::make_unique<LoraLinear<Scalar>>(st_.map<Scalar>(t.name), std::move(bias), lc);
      else
        layer = std::make_unique<LoraLinear<Scalar>>(st_.matrix<Scalar>(t.name), std::move(bias), lc);
      modules_.add(module, *layer);
      layers_.push_back(std::move(layer));
    }
    if (layers_.empty()) detail::fail("LoraModel: ", model_path, ": no 2-D weight matches target_modules");
  }

  const ModuleMap<Scalar>& modules() const { return modules_; }
  const PeftConfig& config() const { return config_; }
  const SafeTensors& state_dict() const { return st_; }

  void merge() {
    for (auto& l : layers_) l->merge();
  }
  void unmerge() {
    for (auto& l : layers_) l->unmerge();
  }

  // Writes the state dict with each LoRA layer's current weight (merged or not) in place of the
  // file's, in the file's dtype; every other tensor is copied byte for byte.
  void save_weights(const std::string& path) const {
    SafeTensorsBuilder b;
    for (const auto& t : st_.tensors()) {
      const std::string module = t.name.size() > 7 ? t.name.substr(0, t.name.size() - 7) : "";
      if (modules_.contains(module) && t.name == module + ".weight") {
        b.add(t.name, modules_.at(module).weight(), t.dtype);
      } else {
        const std::uint8_t* p = st_.bytes(t.name);
        b.add_raw(t.name, t.dtype, t.shape, std::vector<std::uint8_t>(p, p + (t.end - t.begin)));
      }
    }
    for (const auto& [k, v] : st_.metadata()) b.metadata(k, v);
    b.save(path);
  }

 private:
  SafeTensors st_;
  PeftConfig config_;
  std::vector<std::unique_ptr<LoraLinear<Scalar>>> layers_;
  ModuleMap<Scalar> modules_;
};

}  // namespace lora
