// LoraModel<Scalar>: PEFT's LoraModel over a bare Hugging Face state dict, for merging and
// exporting an adapter without the model's architecture in C++.
#pragma once

#include <lora/linear.hpp>
#include <lora/module_map.hpp>
#include <lora/peft_config.hpp>
#include <lora/safetensors.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lora {

namespace detail {

// st's tensors (and metadata) byte for byte, except module.weight of each layer in modules: that
// layer's current weight (merged or not), in the file's dtype.
template <class Scalar>
SafeTensorsBuilder with_layer_weights(const SafeTensors& st, const ModuleMap<Scalar>& modules) {
  SafeTensorsBuilder b;
  for (const auto& t : st.tensors()) {
    const std::string module = t.name.size() > 7 ? t.name.substr(0, t.name.size() - 7) : "";
    if (modules.contains(module) && t.name == module + ".weight") {
      b.add(t.name, modules.at(module).weight(), t.dtype);
    } else {
      const std::uint8_t* p = st.bytes(t.name);
      b.add_raw(t.name, t.dtype, t.shape, std::vector<std::uint8_t>(p, p + (t.end - t.begin)));
    }
  }
  for (const auto& [k, v] : st.metadata()) b.metadata(k, v);
  return b;
}

}  // namespace detail

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
    if (!config.modules_to_save.empty())
      detail::fail("LoraModel: modules_to_save (", config.modules_to_save.front(), ", ...) is not supported here");
    base.fan_in_fan_out = config.fan_in_fan_out;
    const std::string suffix = ".weight";
    for (const auto& t : st_.tensors()) {
      if (t.name.size() <= suffix.size() || t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) != 0)
        continue;
      const std::string module = t.name.substr(0, t.name.size() - suffix.size());
      if (t.shape.size() != 2 || !config.targets(module)) continue;
      if (!detail::is_float_dtype(t.dtype))
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

  // Every layer at once, all or nothing (ModuleMap).
  void merge() { modules_.merge(); }
  void safe_merge() { modules_.safe_merge(); }
  void unmerge() { modules_.unmerge(); }

  // Writes the state dict with each LoRA layer's current weight (merged or not) in place of the
  // file's, in the file's dtype; every other tensor is copied byte for byte.
  void save_weights(const std::string& path) const { detail::with_layer_weights(st_, modules_).save(path); }

 private:
  SafeTensors st_;
  PeftConfig config_;
  std::vector<std::unique_ptr<LoraLinear<Scalar>>> layers_;
  ModuleMap<Scalar> modules_;
};

}  // namespace lora
