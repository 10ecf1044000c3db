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
// Supported: LoRA and DoRA on linear layers (fan_in_fan_out too), rsLoRA, rank/alpha patterns,
// dropout, named adapters. The config file itself is peft_config.hpp; the map of a model's
// layers, module_map.hpp.
#pragma once

#include <lora/detail/files.hpp>
#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/module_map.hpp>
#include <lora/parameter.hpp>
#include <lora/peft_config.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lora {

struct LoadOptions {
  // Strict (the default): every module with weights in the file must be in the map, every mapped
  // module the config targets must have weights, and every mapped module must be targeted.
  // Not strict: such modules are skipped (and left as they are); shapes are still checked.
  bool strict = true;
  // The named adapter the file fills in each layer: replaced when the layer has it, added (not
  // active) otherwise, as PEFT's load_adapter(path, adapter_name).
  std::string adapter_name = "default";
  // Set by a causal LM's load_adapter, which loads the modules_to_save tensors itself: the LoRA
  // part is loaded here and those tensors are skipped. A ModuleMap alone refuses such adapters.
  bool skip_modules_to_save = false;
};

namespace detail {

inline const std::string kPeftPrefix = "base_model.model.";
// PEFT keys are module paths of a few dozen characters; a file's author controls them, so longer
// ones are refused before they reach the matcher or an error message.
constexpr std::size_t kMaxKeyLength = 1024;

// "base_model.model.<module>.lora_A.weight" -> module, 'A' ('B'; 'M' for DoRA's
// lora_magnitude_vector, with or without ".weight"; 'W' for ".base_layer.weight", the base
// weight PEFT saves beside the factors of an adapted lm_head or embedding, save_embedding_layers);
// errors for other keys.
inline std::pair<std::string, char> split_peft_key(const std::string& key, const std::string& file) {
  if (key.size() > kMaxKeyLength)
    fail(file, ": a tensor name is ", key.size(), " bytes long, more than ", kMaxKeyLength, ": '", key.substr(0, 60), "...'");
  for (auto [suffix, kind] : {std::pair{".lora_A.weight", 'A'}, std::pair{".lora_B.weight", 'B'},
                              std::pair{".lora_magnitude_vector", 'M'}, std::pair{".lora_magnitude_vector.weight", 'M'},
                              std::pair{".base_layer.weight", 'W'}}) {
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

// A LoRA factor's key (lora_A, lora_B, lora_magnitude_vector, lora_embedding_A/B, and an adapted
// layer's base_layer.weight), as opposed to a modules_to_save tensor.
inline bool is_lora_key(const std::string& key) {
  for (const char* part : {".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_", ".base_layer.weight"})
    if (key.find(part) != std::string::npos) return true;
  return false;
}

// The adapter of layer that save/describe: the named one, or the layer's one active adapter.
template <class Scalar>
std::string adapter_of(const LoraLinear<Scalar>& layer, const std::string& adapter) {
  return adapter.empty() ? layer.active_adapter() : adapter;
}

// adapter_of for a writer: empty, with the problem noted, when the layer lacks the named adapter.
template <class Scalar>
std::string adapter_to_save(const LoraLinear<Scalar>& layer, const std::string& module, const std::string& adapter,
                            std::vector<std::string>& problems) {
  if (!adapter.empty() && !layer.has_adapter(adapter)) {
    problems.push_back(module + " has no adapter '" + adapter + "'");
    return "";
  }
  return adapter_of(layer, adapter);
}

// DIR/adapter_model.safetensors (the builder's tensors) and DIR/adapter_config.json, written as a
// new directory that takes DIR's place in one rename (replace_directory: a crash leaves the old
// adapter or the new one, never new weights beside an old config); DIR's other files stay.
inline void write_peft_dir(const std::string& dir, SafeTensorsBuilder& b, const PeftConfig& config, const char* who) {
  namespace fs = std::filesystem;
  const char* names[] = {"adapter_model.safetensors", "adapter_config.json"};
  for (const char* n : names) {
    std::error_code ec;
    const auto st = fs::symlink_status(fs::path(dir) / n, ec);
    if (fs::exists(st) && !fs::is_regular_file(st))
      fail(who, ": ", (fs::path(dir) / n).string(), " exists and is not a regular file; nothing was written");
  }
  const std::string text = config.to_json();
  b.metadata("format", "pt");
  const FileBytes weights = b.serialize();
  replace_directory(
      dir,
      [&](const std::string& tmp) {
        write_file_atomic((fs::path(tmp) / names[0]).string(), weights);
        write_file_atomic((fs::path(tmp) / names[1]).string(), FileBytes(text.begin(), text.end()));
      },
      true);
}

// A config for modules with these LoRA configs: target_modules lists their paths, r and alpha
// are the most common values, and rank_pattern/alpha_pattern name (by full path) the modules
// that differ. All must agree on use_rslora and use_dora.
inline PeftConfig peft_config_of(const std::vector<std::pair<std::string, LoraConfig>>& modules, const char* who) {
  if (modules.empty()) fail(who, ": no modules");
  PeftConfig c;
  std::map<int, int> ranks;
  std::map<double, int> alphas;
  const auto& [first_path, first] = modules.front();
  for (const auto& [module, lc] : modules) {
    if (lc.use_rslora != first.use_rslora || lc.use_dora != first.use_dora)
      fail(who, ": ", module, " has use_rslora = ", lc.use_rslora, ", use_dora = ", lc.use_dora, "; ", first_path, " has ",
           first.use_rslora, ", ", first.use_dora, "; one adapter has one value");
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
  for (const auto& [module, lc] : modules) {
    // A full path as a pattern key matches only that module (and paths ending in it).
    std::string key;
    for (char ch : module) key += (ch == '.' ? std::string("\\.") : std::string(1, ch));
    if (lc.r != c.r) c.rank_pattern.emplace_back(key, lc.r);
    if (lc.alpha != c.lora_alpha) c.alpha_pattern.emplace_back(key, lc.alpha);
  }
  return c;
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
    const TensorInfo* w = nullptr;  // base_layer.weight: must equal the layer's W
  };
  std::map<std::string, Parts> in_file;
  if (!config.modules_to_save.empty() && !options.skip_modules_to_save)
    detail::fail("load_adapter: ", cfg_path, ": modules_to_save is ", detail::join(config.modules_to_save),
                 "; a ModuleMap holds only LoRA layers: load it with the model's load_adapter");
  for (const auto& t : st.tensors()) {
    if (options.skip_modules_to_save && !detail::is_lora_key(t.name)) continue;
    auto [module, kind] = detail::split_peft_key(t.name, st_path);
    Parts& p = in_file[module];
    const TensorInfo*& slot = kind == 'A' ? p.a : kind == 'B' ? p.b : kind == 'M' ? p.m : p.w;
    if (slot) detail::fail("load_adapter: ", st_path, ": ", module, " has two lora_magnitude_vector tensors");
    slot = &t;
  }

  std::vector<std::string> problems, unknown, missing, untargeted, not_in_config;
  if (name.empty() || name == LoraLinear<Scalar>::kBase) problems.push_back("adapter_name '" + name + "' is not a usable name");
  if (config.use_dora && config.lora_dropout > 0) problems.push_back("use_dora with lora_dropout > 0 is not supported");
  for (const auto& [module, parts] : in_file) {
    if (!parts.a && !parts.b)
      problems.push_back(module + " has only a " + (parts.m ? "lora_magnitude_vector" : "base_layer.weight") + ", no lora_A and lora_B");
    else if (!parts.a || !parts.b)
      problems.push_back(module + " has lora_" + (parts.a ? "A" : "B") + " but no lora_" + (parts.a ? "B" : "A"));
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
      if (!detail::is_float_dtype(t.dtype))
        problems.push_back(t.name + " has dtype " + dtype_name(t.dtype) + ", expected F32, F16, BF16 or F64");
      else if (t.shape != want)
        problems.push_back(t.name + " is " + shape_string(t.shape) + ", expected " + shape_string(want) +
                           " (r = " + std::to_string(r) + " from r/rank_pattern, layer (out, in) = (" +
                           std::to_string(out) + ", " + std::to_string(in) + "))");
    };
    check(*parts.a, {r, in});
    check(*parts.b, {out, r});
    if (parts.m) check(*parts.m, {out});
    if (parts.w) {  // PEFT would load it over the base weight; here the base stays: it must be the same
      const auto w = layer.weight();
      const std::vector<std::uint64_t> shape{std::uint64_t(w.rows()), std::uint64_t(w.cols())};
      check(*parts.w, shape);
      if (detail::is_float_dtype(parts.w->dtype) && parts.w->shape == shape && st.matrix<Scalar>(parts.w->name) != w)
        problems.push_back(parts.w->name + " differs from the model's weight of " + module +
                           " (PEFT would load it over the base; load the model from a checkpoint with that weight)");
    }
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
    LoraConfig c = config.lora_config(to_load[i], base);
    c.seed = base.seed;  // the layer's own seed already (lora_config would derive another)
    layer.update_layer(name, c);
    layer.set_lora_A(name, values[i].a);
    layer.set_lora_B(name, values[i].b);
    if (config.use_dora) layer.set_lora_magnitude(name, values[i].m);
  }
  return config;
}

// Writes DIR/adapter_model.safetensors (A and B of every mapped module, and DoRA's magnitude, as
// dtype) and DIR/adapter_config.json (config.to_json()), both or neither (detail/files.hpp); creates DIR if needed.
// The adapter saved is `adapter` in every layer, or each layer's one active adapter when empty.
// modules_to_save: trained base tensors (a causal LM's, with config.modules_to_save), written as
// base_model.model.<name> as PEFT does.
// Every module must be targeted by config, with the r, alpha, rsLoRA and DoRA flags the config
// gives it; otherwise nothing is written.
template <class Scalar>
void save_adapter(const std::string& dir, const ModuleMap<Scalar>& modules, const PeftConfig& config,
                  Dtype dtype = Dtype::F32, const std::string& adapter = "",
                  const std::vector<Parameter<Scalar>>& modules_to_save = {}) {
  namespace fs = std::filesystem;
  if (!detail::is_float_dtype(dtype))
    detail::fail("save_adapter: dtype ", dtype_name(dtype), " is not a float type (F32, F16, BF16 or F64)");
  if (modules.size() == 0) detail::fail("save_adapter: no modules to save");
  std::vector<std::string> problems;
  SafeTensorsBuilder b;
  for (const auto& [module, layer] : modules) {
    const std::string name = detail::adapter_to_save(*layer, module, adapter, problems);
    if (name.empty()) continue;
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
  if (!modules_to_save.empty() && config.modules_to_save.empty())
    problems.push_back("base tensors to save but the config's modules_to_save is empty");
  if (modules_to_save.empty() && !config.modules_to_save.empty())
    problems.push_back("the config names modules_to_save but no base tensors were given (save the model's adapter)");
  for (const auto& p : modules_to_save) {
    if (p.value.rows() == 1)  // vectors (norm gains, biases) are 1-D in PyTorch
      b.add(detail::kPeftPrefix + p.name, p.value, dtype, {static_cast<std::uint64_t>(p.value.cols())});
    else
      b.add(detail::kPeftPrefix + p.name, p.value, dtype);
  }
  if (!problems.empty()) detail::fail("save_adapter: ", dir, ": ", detail::join(problems));
  detail::write_peft_dir(dir, b, config, "save_adapter");
}

// A config that describes the mapped layers' adapter `adapter` (each layer's one active adapter
// when empty) as they are: target_modules lists their paths, r and alpha are the most common
// values, and rank_pattern/alpha_pattern name (by full path) the modules that differ. All layers
// must agree on use_rslora and use_dora.
template <class Scalar>
PeftConfig peft_config_for(const ModuleMap<Scalar>& modules, const std::string& adapter = "") {
  std::vector<std::pair<std::string, LoraConfig>> configs;
  for (const auto& [module, layer] : modules) configs.emplace_back(module, layer->config(detail::adapter_of(*layer, adapter)));
  return detail::peft_config_of(configs, "peft_config_for");
}

}  // namespace lora
