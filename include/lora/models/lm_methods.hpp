// LmMethods<Scalar>: the methods the LoRA article weighs LoRA against, attached to a causal
// language model's layers (LlamaModel::add_bottlenecks, add_prefix, add_ladder). Shapes per layer
// l of a model of width d, kv width w = kv_heads·dh, batch sequences of T tokens:
//
//   adapter-tuning  (bottleneck.hpp, Houlsby et al.) bottlenecks on the attention's output (o_proj's)
//                   and on the MLP's (down_proj's), each before its residual sum:
//                     h += B_attn(o_proj(o));   h += B_mlp(down_proj(silu(gate) ⊙ up))
//                   backward: dh of the sum -> B.backward -> o_proj / down_proj's backward.
//   prefix-tuning   (prefix.hpp, Li & Liang) p keys and values, KV (p, 2w) = [Pk | Pv], that every
//                   query sees before its sequence's own keys; they are used as they are (no rope),
//                   and the sequence's positions start at p, as transformers counts them after
//                   PEFT's prefix cache (so p + T <= max_position_embeddings):
//                     K_b = [Pk; rope(k_b)],  V_b = [Pv; v_b]          (p + T rows per sequence b)
//                   backward: [dPk | dPv] = Σ_b the first p rows of dK_b, dV_b; the rest is dk, dv.
//                   A cache (make_cache) starts holding the prefix (length p).
//   ladder side-tuning  (ladder_side.hpp, Sung et al.) a side network with causal attention, fed by the
//                   taps h_0 (the embeddings) .. h_L (each layer's output), which the layers compute
//                   forward only; the final norm and head read y = LST(h_0 .. h_L) instead of h_L:
//                     logits = head(rms(y)·γ);  backward: dy = rms_backward(head_backward(dlogits)),
//                     then LadderSide::backward(dy); nothing goes back through the layers.
//                   Decoding with a cache keeps the taps there and runs the side network over every
//                   token so far at each step (it has no cache of its own).
//
// Their tensors ("model.layers.<l>.bottleneck_attn.down.weight", "model.layers.<l>.self_attn.prefix.kv",
// "ladder.side.1.attn.q_proj.weight", ...) train with the model's parameters() and save and load as
// safetensors files (save, load); PEFT has no file format for bottlenecks or side networks.
#pragma once

#include <lora/bottleneck.hpp>
#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/models/ladder_side.hpp>
#include <lora/parameter.hpp>
#include <lora/prefix.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
class LmMethods {
 public:
  using Mat = lora::Mat<Scalar>;

  struct Layer {
    std::unique_ptr<BottleneckAdapter<Scalar>> after_attention, after_mlp;
    std::unique_ptr<Prefix<Scalar>> prefix;
  };

  bool any() const { return has_bottlenecks() || prefix_length() > 0 || ladder_ != nullptr; }
  bool has_bottlenecks() const { return !layers_.empty() && (layers_[0].after_attention || layers_[0].after_mlp); }
  Index prefix_length() const { return !layers_.empty() && layers_[0].prefix ? layers_[0].prefix->length() : 0; }
  const Layer* layer(std::size_t l) const { return l < layers_.size() ? &layers_[l] : nullptr; }
  Layer* layer(std::size_t l) { return l < layers_.size() ? &layers_[l] : nullptr; }
  LadderSide<Scalar>* ladder() { return ladder_.get(); }
  const LadderSide<Scalar>* ladder() const { return ladder_.get(); }

  // Each layer's bottleneck seeds are module_seed(config.seed, its path): one stream per adapter.
  void add_bottlenecks(int layers, Index d, const BottleneckConfig& config, bool after_attention, bool after_mlp) {
    if (config.size < 1) detail::fail("add_bottlenecks: size is ", config.size, ", expected >= 1 (the bottleneck width)");
    if (!after_attention && !after_mlp) detail::fail("add_bottlenecks: neither after the attention nor after the MLP");
    if (has_bottlenecks()) detail::fail("add_bottlenecks: the model has bottlenecks already");
    refuse_beside_ladder("add_bottlenecks");
    std::vector<std::unique_ptr<BottleneckAdapter<Scalar>>> attn(layers), mlp(layers);  // made first: a throw changes nothing
    for (int l = 0; l < layers; ++l) {
      BottleneckConfig c = config;
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      c.seed = detail::module_seed(config.seed, pre + "bottleneck_attn");
      if (after_attention) attn[l] = std::make_unique<BottleneckAdapter<Scalar>>(d, c);
      c.seed = detail::module_seed(config.seed, pre + "bottleneck_mlp");
      if (after_mlp) mlp[l] = std::make_unique<BottleneckAdapter<Scalar>>(d, c);
    }
    layers_.resize(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; ++l) {
      layers_[l].after_attention = std::move(attn[l]);
      layers_[l].after_mlp = std::move(mlp[l]);
    }
  }

  void add_prefix(int layers, Index kv_width, const PrefixConfig& config, int max_positions) {
    if (config.length < 1) detail::fail("add_prefix: length is ", config.length, ", expected >= 1");
    if (config.length >= max_positions)
      detail::fail("add_prefix: a prefix of ", config.length, " positions leaves none of max_position_embeddings ", max_positions,
                   " for the sequence");
    if (prefix_length()) detail::fail("add_prefix: the model has a prefix already");
    refuse_beside_ladder("add_prefix");
    std::vector<std::unique_ptr<Prefix<Scalar>>> made(layers);
    for (int l = 0; l < layers; ++l) {
      PrefixConfig c = config;
      c.seed = detail::module_seed(config.seed, "model.layers." + std::to_string(l) + ".self_attn.prefix");
      made[l] = std::make_unique<Prefix<Scalar>>(kv_width, c);
    }
    layers_.resize(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; ++l) layers_[l].prefix = std::move(made[l]);
  }

  void add_ladder(int layers, Index d, const LadderConfig& config) {
    if (any()) detail::fail("add_ladder: the model has bottlenecks, a prefix or a ladder already; a side network trains alone");
    if (config.heads < 1 || config.reduction < 1 || d % config.reduction != 0 || (d / config.reduction) % config.heads != 0)
      detail::fail("add_ladder: the reduction factor ", config.reduction, " and ", config.heads, " heads do not divide the width ", d,
                   " (d / reduction must be a multiple of heads)");
    ladder_ = std::make_unique<LadderSide<Scalar>>(d, layers, config);
  }

  // Prefix-tuning's keys (or values): per sequence b, P's rows then x's rows b·T .. b·T + T − 1.
  // P is the left (keys) or right (values) half of KV.
  template <class Half>
  static void prepend(const Half& P, const Mat& x, Index batch, Index T, Mat& out) {
    const Index p = P.rows(), S = p + T;
    out.resize(batch * S, x.cols());
    for (Index b = 0; b < batch; ++b) {
      out.middleRows(b * S, p) = P;
      out.middleRows(b * S + p, T) = x.middleRows(b * T, T);
    }
  }
  // prepend's backward: dP = Σ_b the first p rows of each sequence's dX_full (into dP, set), and
  // dx the rest (batch·T rows).
  template <class Half>
  static void split(const Mat& d_full, Index batch, Index T, Half&& dP, Mat& dx) {
    const Index p = dP.rows(), S = p + T;
    dP.setZero();
    dx.resize(batch * T, d_full.cols());
    for (Index b = 0; b < batch; ++b) {
      dP += d_full.middleRows(b * S, p);
      dx.middleRows(b * T, T) = d_full.middleRows(b * S + p, T);
    }
  }
  // The key mask of p + T keys per sequence: the prefix's always seen, then mask (empty: all).
  static lora::Mat<std::int64_t> prefix_mask(Index p, const lora::Mat<std::int64_t>& mask, Index batch, Index T) {
    lora::Mat<std::int64_t> m = lora::Mat<std::int64_t>::Ones(batch, p + T);
    if (mask.size()) m.rightCols(T) = mask;
    return m;
  }

  void parameters(std::vector<Parameter<Scalar>>& out) {
    auto add = [&](const std::string& pre, std::vector<Parameter<Scalar>> ps) {
      for (auto& p : ps) out.push_back({pre + p.name, p.value, p.grad});
    };
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      Layer& L = layers_[l];
      if (L.after_attention) add(pre + "bottleneck_attn.", L.after_attention->parameters());
      if (L.prefix) add(pre + "self_attn.prefix.", L.prefix->parameters());
      if (L.after_mlp) add(pre + "bottleneck_mlp.", L.after_mlp->parameters());
    }
    if (ladder_) add("ladder.", ladder_->parameters());
  }
  void zero_grad() {
    for (Layer& L : layers_) {
      for (auto* b : {L.after_attention.get(), L.after_mlp.get()})
        if (b) b->zero_grad();
      if (L.prefix) L.prefix->zero_grad();
    }
    if (ladder_) ladder_->zero_grad();
  }
  Index parameter_count() const {
    Index n = ladder_ ? ladder_->parameter_count() : 0;
    for (const Layer& L : layers_) {
      for (const auto* b : {L.after_attention.get(), L.after_mlp.get()})
        if (b) n += b->parameter_count();
      if (L.prefix) n += L.prefix->parameter_count();
    }
    return n;
  }
  // Every tensor of the methods into one safetensors file, under the names parameters() gives.
  void save(const std::string& file) {
    std::vector<Parameter<Scalar>> ps;
    parameters(ps);
    if (ps.empty()) detail::fail("save: the model has no bottlenecks, prefix or ladder to save");
    SafeTensorsBuilder b;
    for (const auto& p : ps) b.add(p.name, p.value);
    b.save(file);
  }
  // save's file back: the same names and shapes, every one checked before any value changes.
  void load(const std::string& file) {
    std::vector<Parameter<Scalar>> ps;
    parameters(ps);
    if (ps.empty()) detail::fail("load: ", file, ": the model has no bottlenecks, prefix or ladder to load into (add them first)");
    const SafeTensors st = SafeTensors::open(file);
    std::vector<std::string> problems;
    std::vector<Mat> values;
    for (const auto& p : ps) {
      if (!st.contains(p.name)) {
        problems.push_back(p.name + " is not in the file");
        continue;
      }
      values.push_back(st.matrix<Scalar>(p.name));
      if (values.back().rows() != p.value.rows() || values.back().cols() != p.value.cols())
        problems.push_back(p.name + " is " + detail::shape(values.back().rows(), values.back().cols()) + ", the model's " +
                           detail::shape(p.value.rows(), p.value.cols()));
    }
    if (st.tensors().size() != ps.size()) {
      for (const auto& t : st.tensors())
        if (std::none_of(ps.begin(), ps.end(), [&](const Parameter<Scalar>& p) { return p.name == t.name; }))
          problems.push_back("'" + t.name.substr(0, 100) + "' is not a tensor of the model's methods");
    }
    if (!problems.empty()) detail::fail("load: ", file, ": ", detail::join(problems));
    for (std::size_t i = 0; i < ps.size(); ++i) ps[i].value = values[i];
  }

  // After training: a reparameterised prefix keeps its keys and values as the table (prefix.hpp).
  void fold_prefix() {
    for (Layer& L : layers_)
      if (L.prefix) L.prefix->fold();
  }

 private:
  void refuse_beside_ladder(const char* fn) const {
    if (ladder_) detail::fail(fn, ": the model has a ladder side network, which trains alone");
  }

  std::vector<Layer> layers_;
  std::unique_ptr<LadderSide<Scalar>> ladder_;
};

}  // namespace lora
