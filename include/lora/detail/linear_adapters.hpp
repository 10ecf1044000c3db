// LoraLinear's named adapters (declared in linear.hpp, which includes this file): adding,
// replacing (PEFT's update_layer), selecting and deleting adapters, and the checks that keep the
// adapters of one layer consistent (storage layout, bias mode, exact_unmerge, DoRA alone).
// Every call checks first and changes nothing when it refuses; a change discards the training
// cache, so a backward after it refuses, naming the call.
#pragma once

#include <lora/linear.hpp>

#include <string>
#include <vector>

namespace lora {

template <class Scalar>
void LoraLinear<Scalar>::add_adapter(const std::string& name, const LoraConfig& config) {
  const char* where = "LoraLinear::add_adapter: ";
  reg_.check_new_name(where, name);
  check_adapter_config(where, name, config);
  Adapter a;
  a.name = name;
  init_adapter(a, config, reg_.size());
  reg_.add(std::move(a));
  after_config_change("add_adapter");
}

template <class Scalar>
void LoraLinear<Scalar>::update_layer(const std::string& name, const LoraConfig& config) {
  const int i = reg_.find(name);
  if (i < 0) return add_adapter(name, config);
  const char* where = "LoraLinear::update_layer: ";
  if (reg_.is_merged(name)) detail::fail(where, "adapter '", name, "' is merged; unmerge() first");
  check_adapter_config(where, name, config);
  if (config.use_dora && reg_.active().size() > 1 && reg_.is_active(name))
    detail::fail(where, "adapter '", name, "' is active with others; a DoRA adapter can only be active alone");
  init_adapter(reg_.all()[i], config, static_cast<std::size_t>(i));
  after_config_change("update_layer");
}

template <class Scalar>
void LoraLinear<Scalar>::set_adapter(const std::vector<std::string>& names) {
  reg_.check_active(names);
  unmerge();
  reg_.set_active(names);
  discard_cache("set_adapter");
}

template <class Scalar>
void LoraLinear<Scalar>::delete_adapter(std::string name) {
  reg_.at("delete_adapter", name);
  if (reg_.is_merged(name)) detail::fail("LoraLinear::delete_adapter: adapter '", name, "' is merged; unmerge() first");
  reg_.erase(name);
  discard_cache("delete_adapter");
}

template <class Scalar>
void LoraLinear<Scalar>::check_adapter_config(const char* where, const std::string& name, const LoraConfig& config) const {
  config.check(where);
  if (config.fan_in_fan_out != fan_in_fan_out_)
    detail::fail(where, "fan_in_fan_out is ", config.fan_in_fan_out, ", the layer's weight was given with ", fan_in_fan_out_);
  if (config.bias == BiasMode::trainable && !has_bias_)
    detail::fail(where, "bias mode is trainable but the layer has no bias");
  if (config.use_dora && train_base_) detail::fail(where, "use_dora is not supported while the base trains");
  if (config.use_dora && is_merged()) detail::fail(where, "use_dora while adapters are merged into W; unmerge() first");
  for (const auto& a : reg_.all()) {
    if (a.name == name) continue;
    if (a.config.bias != config.bias)
      detail::fail(where, "bias mode differs from adapter '", a.name, "''s; every adapter of a layer has the same");
    if (a.config.exact_unmerge != config.exact_unmerge)
      detail::fail(where, "exact_unmerge differs from adapter '", a.name, "''s; every adapter of a layer has the same");
  }
}

template <class Scalar>
void LoraLinear<Scalar>::init_adapter(Adapter& a, const LoraConfig& config, std::size_t index) {
  a.config = config;
  a.s = static_cast<Scalar>(config.scaling());
  a.A.resize(config.r, in_);
  a.B.resize(out_, config.r);
  detail::Rng init_rng(config.seed);
  init_lora(config.init, a.A, a.B, init_rng);
  a.rng = dropout_rng(config.seed, index);
  a.grad_A = Mat::Zero(config.r, in_);
  a.grad_B = Mat::Zero(out_, config.r);
  a.m = config.use_dora ? norm_of(a) : Vec();  // PEFT: m starts at ‖W + s·B·A‖, so y is unchanged
  a.grad_m = Vec::Zero(a.m.size());
  a.dora_c.resize(0);
}

template <class Scalar>
void LoraLinear<Scalar>::after_config_change(const char* fn) {
  const LoraConfig& c = reg_.all().front().config;
  exact_unmerge_ = c.exact_unmerge;
  bias_mode_ = c.bias;
  reset_grad_bias();
  discard_cache(fn);
}

template <class Scalar>
void LoraLinear<Scalar>::set_factor(const char* fn, const char* what, const MatRef& v, Adapter& a) {
  Mat& dst = what[0] == 'A' ? a.A : a.B;
  if (reg_.is_merged(a.name)) detail::fail("LoraLinear::", fn, ": adapter '", a.name, "' is merged; unmerge() before changing ", what);
  if (v.rows() != dst.rows() || v.cols() != dst.cols())
    detail::fail("LoraLinear::", fn, ": ", what, " is ", detail::shape(v.rows(), v.cols()), ", expected ",
                 detail::shape(dst.rows(), dst.cols()));
  dst = v;
  discard_cache(fn);
}

}  // namespace lora
