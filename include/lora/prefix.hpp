// Prefix<Scalar>: prefix-tuning (Li & Liang, 2021) for one attention layer: p learned key and
// value vectors that every query attends to besides the sequence's own keys (LoraAttention
// prepends them per sequence and head, after k_proj and v_proj, where masks do not reach them).
//
//   KV (p, 2d) = [Pk | Pv]: the prefix's keys (p, d) and values (p, d).
//   direct:           KV is the trained table.
//   reparameterised:  KV = tanh(E·W1ᵀ + b1)·W2ᵀ + b2     E (p, d), W1 (h, d), b1 (h), W2 (2d, h), b2 (2d)
//                     (the article's MLP, which steadies training); fold() computes KV once and
//                     keeps it as the table, so inference costs what the direct form costs.
// backward, dKV (p, 2d) -> the parameters' gradients:
//   direct:           dKV accumulates into the table's gradient
//   reparameterised:  dW2 += dKVᵀ·H, db2 += Σ_rows dKV, dA = (1 − H²) ⊙ (dKV·W2),
//                     dW1 += dAᵀ·E, db1 += Σ_rows dA, dE += dA·W1          (H = tanh(E·W1ᵀ + b1))
// Init as PEFT's PrefixEncoder: the table (or E) N(0, init_std²) (nn.Embedding's, std 1), the
// MLP's linears as nn.Linear's (uniform ±1/√fan_in), all from the seed.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/layers.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lora {

struct PrefixConfig {
  Index length = 0;      // p, the prefix's key/value vectors per layer (0: no prefix)
  Index projection = 0;  // h, the reparameterising MLP's hidden size (0: the table is trained directly)
  double init_std = 1.0;
  std::uint64_t seed = 0;
};

template <class Scalar>
class Prefix {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  Prefix(Index d, const PrefixConfig& config) : config_(config), d_(d) {
    if (d < 1) detail::fail("Prefix: d is ", d, ", expected >= 1");
    if (config.length < 1) detail::fail("Prefix: length is ", config.length, ", expected >= 1");
    if (config.projection < 0) detail::fail("Prefix: projection is ", config.projection, ", expected >= 0 (0: no MLP)");
    if (!(config.init_std > 0)) detail::fail("Prefix: init_std is ", config.init_std, ", expected > 0");
    detail::Rng rng(config.seed);
    Mat table(config.length, config.projection ? d : 2 * d);
    for (Index i = 0; i < table.size(); ++i) table.data()[i] = static_cast<Scalar>(config.init_std * rng.normal());
    if (config.projection) {
      E_ = std::move(table);
      gE_ = Mat::Zero(E_.rows(), E_.cols());
      w1_.emplace(torch_linear<Scalar>(config.projection, d, rng));
      w2_.emplace(torch_linear<Scalar>(2 * d, config.projection, rng));
    } else {
      kv_ = std::move(table);
      g_kv_ = Mat::Zero(kv_.rows(), kv_.cols());
    }
  }

  Index length() const { return config_.length; }
  Index d_model() const { return d_; }
  const PrefixConfig& config() const { return config_; }
  bool reparameterised() const { return w1_.has_value(); }

  // KV (p, 2d): the table, or the MLP's output computed into work.
  const Mat& values(Mat& work) const {
    if (!reparameterised()) return kv_;
    w2_->forward(tanh(w1_->forward(E_)), work);
    return work;
  }

  // KV for a training step; what backward needs is kept.
  const Mat& forward_train() {
    if (!reparameterised()) return kv_;
    H_ = tanh(w1_->forward_train(E_));
    w2_->forward_train(H_, kv_);
    return kv_;
  }

  void backward(const MatRef& dkv) {
    if (dkv.rows() != length() || dkv.cols() != 2 * d_)
      detail::fail("Prefix::backward: dKV is ", detail::shape(dkv.rows(), dkv.cols()), ", expected ", detail::shape(length(), 2 * d_));
    if (!reparameterised()) {
      g_kv_ += dkv;
      return;
    }
    const Mat da = (Scalar(1) - H_.array().square()) * w2_->backward(dkv).array();
    gE_.noalias() += w1_->backward(da);
  }

  // The reparameterised form becomes the direct one with the same KV (the MLP is dropped).
  void fold() {
    if (!reparameterised()) return;
    Mat work;
    kv_ = values(work);
    g_kv_ = Mat::Zero(kv_.rows(), kv_.cols());
    w1_.reset();
    w2_.reset();
    E_.resize(0, 0);
    gE_.resize(0, 0);
    H_.resize(0, 0);
  }

  void zero_grad() {
    if (!reparameterised()) {
      g_kv_.setZero();
      return;
    }
    gE_.setZero();
    w1_->zero_grad();
    w2_->zero_grad();
  }

  // "kv" (direct), or "embedding", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias".
  std::vector<Parameter<Scalar>> parameters() {
    if (!reparameterised()) return {make_parameter("kv", kv_, g_kv_)};
    std::vector<Parameter<Scalar>> all{make_parameter("embedding", E_, gE_)};
    for (auto& p : w1_->parameters()) all.push_back({"mlp.0." + p.name, p.value, p.grad});
    for (auto& p : w2_->parameters()) all.push_back({"mlp.2." + p.name, p.value, p.grad});
    return all;
  }
  Index parameter_count() const {
    return reparameterised() ? E_.size() + w1_->parameter_count() + w2_->parameter_count() : kv_.size();
  }

 private:
  static Mat tanh(const Mat& a) { return a.array().tanh().matrix(); }

  PrefixConfig config_;
  Index d_;
  Mat kv_, g_kv_;                     // direct: the table; reparameterised: the last forward_train's KV
  Mat E_, gE_, H_;                    // reparameterised only
  std::optional<Linear<Scalar>> w1_, w2_;
};

}  // namespace lora
