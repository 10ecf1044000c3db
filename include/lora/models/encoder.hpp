// EncoderBlock<Scalar>: a pre-norm transformer encoder block whose linears are LoRA layers.
//
//   x (batch·T, d) -> y (batch·T, d)
//   x1 = x + Ba(attn(ln1(x)))                           attention: q, k, v, o_proj (d, d) + bias
//   x1 += drop(x1·U·V)          (residual adapter, when adapter_rank > 0: U (d, ra), V (ra, d))
//   y  = x1 + Bm(fc2(gelu(fc1(ln2(x1)))))               fc1 (d_ff, d), fc2 (d, d_ff)
// Ba, Bm: adapter-tuning's bottlenecks (bottleneck.hpp) where asked, else the identity.
//
// Five ways to train it, chosen per module:
//   - LoRA on any of q_proj, k_proj, v_proj, o_proj, fc1, fc2 (target_modules); the others run
//     their base weight alone (adapter disabled);
//   - the residual adapter of the LoRA seed article ("LoRATransformerLayer"): U random, V zero,
//     so a fresh adapter changes nothing; U and V train;
//   - adapter-tuning (Houlsby et al.): a bottleneck after the attention and/or after the MLP,
//     each output before its residual sum, as the article places them; the bottlenecks train;
//   - prefix-tuning: learned keys and values every query of the attention sees (prefix.hpp);
//   - full training (set_base_trainable(true)): every weight and both LayerNorms train as well,
//     for pre-training and for the full fine-tuning baseline.
// Base weights are initialised as nn.Linear does (uniform ±1/√in) from the seed.
//
// backward, dy (batch·T, d) -> dx:
//   dx1 = dy + ln2ᵀ(fc1ᵀ(gelu'(fc2ᵀ(Bmᵀ dy))))
//   adapter: e = mask ⊙ dx1;  dV += (x1·U)ᵀ·e;  dU += x1ᵀ·(e·Vᵀ);  dx1 += e·Vᵀ·Uᵀ
//   dx  = dx1 + ln1ᵀ(attnᵀ(Baᵀ dx1))     (attnᵀ sums dQuery + dKey + dValue)
#pragma once

#include <lora/attention.hpp>
#include <lora/bottleneck.hpp>
#include <lora/dropout.hpp>
#include <lora/error.hpp>
#include <lora/layers.hpp>
#include <lora/linear.hpp>
#include <lora/module_map.hpp>
#include <lora/types.hpp>

#include <memory>
#include <string>
#include <vector>

namespace lora {

struct EncoderConfig {
  int heads = 4;
  Index d_ff = 0;                           // 0: 4·d
  LoraConfig lora;                          // r, alpha, dropout, ... of every targeted module
  std::vector<std::string> target_modules;  // among q_proj, k_proj, v_proj, o_proj, fc1, fc2
  int adapter_rank = 0;                     // residual adapter rank; 0: none
  double adapter_dropout = 0;
  BottleneckConfig bottleneck;              // adapter-tuning: size 0 = none (its seed comes from seed)
  bool bottleneck_after_attention = true, bottleneck_after_mlp = true;  // where, when size > 0
  PrefixConfig prefix;                      // prefix-tuning: length 0 = none (its seed comes from seed)
  std::uint64_t seed = 0;                   // base weights, LoRA init, adapter init, dropout
};

template <class Scalar>
class EncoderBlock {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  using Attn = LoraAttention<Scalar>;

  EncoderBlock(Index d, const EncoderConfig& config) : config_(config), ln1_(d), ln2_(d) {
    const Index dff = config.d_ff ? config.d_ff : 4 * d;
    if (d < 1 || dff < 1) detail::fail("EncoderBlock: d is ", d, " and d_ff ", dff, ", expected >= 1");
    if (config.adapter_rank < 0) detail::fail("EncoderBlock: adapter_rank is ", config.adapter_rank, ", expected >= 0");
    if (!(config.adapter_dropout >= 0 && config.adapter_dropout < 1))
      detail::fail("EncoderBlock: adapter_dropout is ", config.adapter_dropout, ", expected 0 <= p < 1");
    for (const auto& t : config.target_modules)
      if (t != "q_proj" && t != "k_proj" && t != "v_proj" && t != "o_proj" && t != "fc1" && t != "fc2")
        detail::fail("EncoderBlock: unknown target module '", t, "' (expected q_proj, k_proj, v_proj, o_proj, fc1 or fc2)");
    detail::Rng rng(config.seed);
    AttentionWeights<Scalar> w;
    for (auto* m : {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj}) *m = uniform(d, d, rng);
    for (auto* b : {&w.q_bias, &w.k_bias, &w.v_bias, &w.o_bias}) *b = uniform(d, 1, rng, d).col(0);
    AttentionConfig ac;
    ac.heads = config.heads;
    ac.lora = config.lora;
    ac.lora.seed = config.seed + 1;
    ac.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};  // all LoRA layers; untargeted ones disabled
    ac.prefix = config.prefix;
    ac.prefix.seed = config.seed + 10;
    attn_ = std::make_unique<Attn>(std::move(w), ac);
    LoraConfig lc = config.lora;
    lc.seed = config.seed + 5;
    Mat w1 = uniform(dff, d, rng), b1 = uniform(dff, 1, rng, d);  // drawn in this order (not as call arguments)
    fc1_ = std::make_unique<LoraLinear<Scalar>>(std::move(w1), Vec(b1.col(0)), lc);
    lc.seed = config.seed + 6;
    Mat w2 = uniform(d, dff, rng), b2 = uniform(d, 1, rng, dff);
    fc2_ = std::make_unique<LoraLinear<Scalar>>(std::move(w2), Vec(b2.col(0)), lc);
    for (const auto& [name, layer] : attn_->modules()) modules_.add("attn." + name, *layer);
    modules_.add("fc1", *fc1_);
    modules_.add("fc2", *fc2_);
    for (const auto& [path, layer] : modules_) layer->enable_adapters(targeted(path.substr(path.find('.') + 1)));
    if (config.adapter_rank > 0) {
      U_ = uniform(d, config.adapter_rank, rng, d);
      V_ = Mat::Zero(config.adapter_rank, d);
      gU_ = Mat::Zero(d, config.adapter_rank);
      gV_ = Mat::Zero(config.adapter_rank, d);
    }
    adapter_rng_ = detail::Rng(config.seed + 7);
    if (config.bottleneck.size != 0) {
      if (!config.bottleneck_after_attention && !config.bottleneck_after_mlp)
        detail::fail("EncoderBlock: bottleneck size is ", config.bottleneck.size, " but neither after the attention nor after the MLP");
      BottleneckConfig bc = config.bottleneck;
      bc.seed = config.seed + 8;
      if (config.bottleneck_after_attention) bottleneck_attn_ = std::make_unique<BottleneckAdapter<Scalar>>(d, bc);
      bc.seed = config.seed + 9;
      if (config.bottleneck_after_mlp) bottleneck_mlp_ = std::make_unique<BottleneckAdapter<Scalar>>(d, bc);
    }
    set_base_trainable(false);
  }

  Index d_model() const { return ln1_.gamma().size(); }
  const EncoderConfig& config() const { return config_; }
  bool base_trainable() const { return base_trainable_; }
  Attn& attention() { return *attn_; }
  LoraLinear<Scalar>& fc1() { return *fc1_; }
  LoraLinear<Scalar>& fc2() { return *fc2_; }
  LayerNorm<Scalar>& ln1() { return ln1_; }
  LayerNorm<Scalar>& ln2() { return ln2_; }
  Mat& adapter_U() { return U_; }
  Mat& adapter_V() { return V_; }
  BottleneckAdapter<Scalar>* bottleneck_attention() { return bottleneck_attn_.get(); }  // null when none
  BottleneckAdapter<Scalar>* bottleneck_mlp() { return bottleneck_mlp_.get(); }

  // Full training: every base weight and both LayerNorms train (or none, the default).
  void set_base_trainable(bool on) {
    for (const auto& [path, layer] : modules_) layer->set_base_trainable(on);
    ln1_.set_trainable(on);
    ln2_.set_trainable(on);
    base_trainable_ = on;
  }

  // ---- evaluation (const) ----------------------------------------------------------------
  Mat forward(const MatRef& x, Index batch, const AttentionMask<Scalar>& mask = {}) const {
    check("forward", x);
    const Mat h = ln1_.forward(x);
    Mat x1 = attn_->forward(h, batch, mask);
    if (bottleneck_attn_) x1 = bottleneck_attn_->forward(x1);
    x1 += x;
    if (U_.size()) {
      const Mat u = x1 * U_;
      x1.noalias() += u * V_;
    }
    Mat y = fc2_->forward(gelu<Scalar>(fc1_->forward(ln2_.forward(x1))));
    if (bottleneck_mlp_) y = bottleneck_mlp_->forward(y);
    y += x1;
    return y;
  }

  // ---- training --------------------------------------------------------------------------
  Mat forward_train(const MatRef& x, Index batch, const AttentionMask<Scalar>& mask = {}) {
    check("forward_train", x);
    Cache& c = cache_;
    const Mat h = ln1_.forward_train(x);
    c.x1 = attn_->forward_train(h, batch, mask);
    if (bottleneck_attn_) c.x1 = bottleneck_attn_->forward_train(c.x1);
    c.x1 += x;
    if (U_.size()) {
      c.x1a = c.x1;
      c.u.noalias() = c.x1a * U_;
      Mat v = c.u * V_;
      if (config_.adapter_dropout > 0) {
        dropout_mask(c.mask, v.rows(), v.cols(), config_.adapter_dropout, adapter_rng_);
        v.array() *= c.mask.array();
      }
      c.x1 += v;
    }
    c.f = fc1_->forward_train(ln2_.forward_train(c.x1));
    c.valid = true;
    Mat y = fc2_->forward_train(gelu<Scalar>(c.f));
    if (bottleneck_mlp_) y = bottleneck_mlp_->forward_train(y);
    y += c.x1;
    return y;
  }

  Mat backward(const MatRef& dy) {
    Cache& c = cache_;
    if (!c.valid) detail::fail("EncoderBlock::backward: no forward_train to go back through (call forward_train first)");
    if (dy.rows() != c.x1.rows() || dy.cols() != c.x1.cols())
      detail::fail("EncoderBlock::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(c.x1.rows(), c.x1.cols()));
    if (!modules_.ready_for_backward())  // checked before any gradient accumulates
      detail::fail("EncoderBlock::backward: a linear changed since forward_train (merge, unmerge, set_adapter, ...), "
                   "which discarded what backward needs; call forward_train again");
    Mat dm, da;  // through the bottlenecks, where there are some
    if (bottleneck_mlp_) dm = bottleneck_mlp_->backward(dy);
    Mat dx1 = dy + ln2_.backward(fc1_->backward(gelu_backward<Scalar>(c.f, fc2_->backward(bottleneck_mlp_ ? MatRef(dm) : dy))));
    if (U_.size()) {
      Mat e = dx1;
      if (config_.adapter_dropout > 0) e.array() *= c.mask.array();
      gV_.noalias() += c.u.transpose() * e;
      const Mat ev = e * V_.transpose();  // (n, ra)
      gU_.noalias() += c.x1a.transpose() * ev;
      dx1.noalias() += ev * U_.transpose();
    }
    if (bottleneck_attn_) da = bottleneck_attn_->backward(dx1);
    Mat dx = dx1 + ln1_.backward(attn_->backward(bottleneck_attn_ ? da : dx1).self());
    c.valid = false;
    return dx;
  }

  void zero_grad() {
    attn_->zero_grad();
    fc1_->zero_grad();
    fc2_->zero_grad();
    ln1_.zero_grad();
    ln2_.zero_grad();
    gU_.setZero();
    gV_.setZero();
    if (bottleneck_attn_) bottleneck_attn_->zero_grad();
    if (bottleneck_mlp_) bottleneck_mlp_->zero_grad();
  }

  // Restarts every dropout mask sequence (LoRA branches and the adapter).
  void reseed(std::uint64_t seed) {
    attn_->reseed(seed + 1);
    fc1_->reseed(seed + 5);
    fc2_->reseed(seed + 6);
    adapter_rng_ = detail::Rng(seed + 7);
  }

  // Every trainable tensor with its gradient: "attn.q_proj.lora_A", "fc1.weight", "adapter.U", ...
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> all;
    auto add = [&](const std::string& prefix, std::vector<Parameter<Scalar>> ps) {
      for (auto& p : ps) {
        p.name = prefix + p.name;
        all.push_back(p);
      }
    };
    add("ln1.", ln1_.parameters());
    add("attn.", attn_->parameters());
    if (bottleneck_attn_) add("bottleneck_attn.", bottleneck_attn_->parameters());
    if (U_.size()) {
      all.push_back({"adapter.U", MatMap<Scalar>(U_.data(), U_.rows(), U_.cols()), MatMap<Scalar>(gU_.data(), U_.rows(), U_.cols())});
      all.push_back({"adapter.V", MatMap<Scalar>(V_.data(), V_.rows(), V_.cols()), MatMap<Scalar>(gV_.data(), V_.rows(), V_.cols())});
    }
    add("ln2.", ln2_.parameters());
    add("fc1.", fc1_->parameters());
    add("fc2.", fc2_->parameters());
    if (bottleneck_mlp_) add("bottleneck_mlp.", bottleneck_mlp_->parameters());
    return all;
  }

  // Every parameter of the block, trainable or not.
  Index parameter_count() const {
    Index n = ln1_.parameter_count() + ln2_.parameter_count() + U_.size() + V_.size();
    for (const auto* b : {bottleneck_attn_.get(), bottleneck_mlp_.get()})
      if (b) n += b->parameter_count();
    if (attn_->prefix()) n += attn_->prefix()->parameter_count();
    for (const auto& [path, l] : modules_) {
      n += l->base_parameters();
      if (!l->disable_adapters()) n += l->lora_A().size() + l->lora_B().size();
    }
    return n;
  }

  // merge()/unmerge() every LoRA layer whose adapter is enabled (the residual adapter and the
  // bottlenecks are not weight updates and stay as they are).
  void merge() { modules_.merge(); }
  void unmerge() { modules_.unmerge(); }
  // The six linears by module path: attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, fc1, fc2.
  const ModuleMap<Scalar>& modules() const { return modules_; }

 private:
  struct Cache {
    Mat x1, x1a, u, mask, f;
    bool valid = false;
  };

  bool targeted(const std::string& name) const {
    for (const auto& t : config_.target_modules)
      if (t == name) return true;
    return false;
  }

  // nn.Linear's default: uniform(−1/√fan_in, 1/√fan_in), fan_in = cols for a weight.
  static Mat uniform(Index rows, Index cols, detail::Rng& rng, Index fan_in = 0) {
    return uniform_init<Scalar>(rows, cols, rng, fan_in ? fan_in : cols);
  }

  void check(const char* fn, const MatRef& x) const {
    if (x.cols() != d_model())
      detail::fail("EncoderBlock::", fn, ": X is ", detail::shape(x.rows(), x.cols()), ", expected (n, ", d_model(), ")");
  }

  EncoderConfig config_;
  LayerNorm<Scalar> ln1_, ln2_;
  std::unique_ptr<Attn> attn_;
  std::unique_ptr<LoraLinear<Scalar>> fc1_, fc2_;
  ModuleMap<Scalar> modules_;
  Mat U_, V_, gU_, gV_;
  std::unique_ptr<BottleneckAdapter<Scalar>> bottleneck_attn_, bottleneck_mlp_;
  detail::Rng adapter_rng_;
  bool base_trainable_ = false;
  Cache cache_;
};

}  // namespace lora
