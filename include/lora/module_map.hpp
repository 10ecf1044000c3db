// ModuleMap<Scalar>: a model's LoRA layers by module path ("model.layers.0.self_attn.q_proj" ->
// LoraLinear&), the names PEFT's target_modules, adapter keys and rank_pattern use. The map refers
// to layers it does not own; they must outlive it.
//
// It is also what a model does to all its LoRA layers at once, so models do not write the loop:
// merge / safe_merge / unmerge, enable_adapters, set_adapter, zero_grad, parameters. The calls
// that can be refused check every layer before changing any: a refusal changes no layer.
#pragma once

#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/parameter.hpp>

#include <map>
#include <string>
#include <vector>

namespace lora {

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

  // ---- every layer at once ---------------------------------------------------------------
  // merge() each layer's active adapters (refusals, e.g. DoRA beside another adapter, are
  // checked in every layer first).
  void merge() const {
    each_checked("merge", [](const LoraLinear<Scalar>& l) { l.check_merge(); });
    for (const auto& [path, l] : layers_) l->merge();
  }
  // safe_merge() of every layer, all or nothing: every merged weight is computed and checked to
  // be finite before any layer changes (each is computed twice: once to check, once to merge,
  // so no model-sized copy is held).
  void safe_merge() const {
    each_checked("safe_merge", [](const LoraLinear<Scalar>& l) { l.check_safe_merge(); });
    for (const auto& [path, l] : layers_) l->safe_merge();
  }
  void unmerge() const {
    for (const auto& [path, l] : layers_) l->unmerge();
  }
  bool is_merged() const {
    for (const auto& [path, l] : layers_)
      if (l->is_merged()) return true;
    return false;
  }
  void enable_adapters(bool enabled) const {
    for (const auto& [path, l] : layers_) l->enable_adapters(enabled);
  }
  // Every layer must have every named adapter; checked before any layer changes.
  void set_adapter(const std::vector<std::string>& names) const {
    each_checked("set_adapter", [&](const LoraLinear<Scalar>& l) {
      for (const auto& n : names)
        if (!l.has_adapter(n)) detail::fail("no adapter '", n, "'");
    });
    for (const auto& [path, l] : layers_) l->set_adapter(names);
  }
  void zero_grad() const {
    for (const auto& [path, l] : layers_) l->zero_grad();
  }
  // Each layer's trainable tensors, named "<path>.lora_A.<adapter>", ...
  std::vector<Parameter<Scalar>> parameters() const {
    std::vector<Parameter<Scalar>> all;
    for (const auto& [path, l] : layers_)
      for (auto& p : l->parameters()) {
        p.name = path + "." + p.name;
        all.push_back(p);
      }
    return all;
  }
  Index trainable_parameters() const {
    Index n = 0;
    for (const auto& [path, l] : layers_) n += l->trainable_parameters();
    return n;
  }
  // True when every layer has a forward_train for backward to consume.
  bool ready_for_backward() const {
    for (const auto& [path, l] : layers_)
      if (!l->ready_for_backward()) return false;
    return true;
  }

 private:
  // check(layer) for every layer; the first refusal is rethrown naming the call and the module.
  template <class Check>
  void each_checked(const char* fn, Check check) const {
    for (const auto& [path, l] : layers_) {
      try {
        check(*l);
      } catch (const Error& e) {
        detail::fail("ModuleMap::", fn, ": ", path, ": ", e.what(), "; no layer was changed");
      }
    }
  }

  std::map<std::string, LoraLinear<Scalar>*> layers_;
};

}  // namespace lora
