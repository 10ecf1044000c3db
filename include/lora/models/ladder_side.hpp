// LadderSide<Scalar>: ladder side-tuning (Sung et al., 2022): a narrow side network, trained
// beside a frozen backbone that it never backpropagates through. The backbone runs its
// evaluation forward only (nothing kept for a backward); the side network reads its outputs.
//
//   taps h_0 .. h_L (n, d): the backbone's input to its first block and each block's output
//   s_0 = h_0·D_0ᵀ                                      D_i (d/k, d): learned down-projections
//   s_i = side_i(m_i),  m_i = μ_i·s_{i−1} + (1 − μ_i)·h_i·D_iᵀ       μ_i = σ(a_i / T), T = 0.1
//   y   = h_L + s_L·Uᵀ + c                              U (d, d/k), c (d): back to width d
// side_i: an EncoderBlock of width d/k (k: the reduction factor), every weight trained; a_i
// start at 0 (μ = ½), D_i as nn.Linear without bias, U and c at zero, so a new side network
// leaves the backbone's output as it is (this library's choice: y adds to the last tap).
//
// backward, dy (n, d) -> the side's gradients (none for the backbone, none returned):
//   dU += dyᵀ·s_L;  dc += Σ_rows dy;  g = dy·U                       (g: dL/ds_L)
//   for i = L .. 1:  dm = side_iᵀ(g);  t_i = h_i·D_iᵀ
//                    da_i += Σ dm ⊙ (s_{i−1} − t_i) · μ_i(1 − μ_i)/T
//                    dD_i += ((1 − μ_i)·dm)ᵀ·h_i;   g = μ_i·dm
//   dD_0 += gᵀ·h_0
#pragma once

#include <lora/error.hpp>
#include <lora/layers.hpp>
#include <lora/models/encoder.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace lora {

struct LadderConfig {
  int reduction = 8;  // k: the side network's width is d / k
  int heads = 2;      // of each side block (must divide d / k)
  std::uint64_t seed = 0;
};

template <class Scalar>
class LadderSide {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  static constexpr double kTemperature = 0.1;

  // Beside a backbone of `blocks` blocks of width d.
  LadderSide(Index d, int blocks, const LadderConfig& config) : config_(config), d_(d) {
    if (config.reduction < 1 || d % config.reduction != 0)
      detail::fail("LadderSide: the reduction factor ", config.reduction, " does not divide the width ", d);
    if (blocks < 1) detail::fail("LadderSide: blocks is ", blocks, ", expected >= 1");
    const Index w = d / config.reduction;
    detail::Rng rng(config.seed);
    for (int i = 0; i <= blocks; ++i) {
      down_.push_back(Linear<Scalar>(uniform_init<Scalar>(w, d, rng, d), Vec()));
      if (i == 0) continue;
      EncoderConfig ec;
      ec.heads = config.heads;
      ec.seed = config.seed + 1000 * std::uint64_t(i);
      side_.push_back(std::make_unique<EncoderBlock<Scalar>>(w, ec));
      side_.back()->set_base_trainable(true);
    }
    a_ = Vec::Zero(blocks);
    ga_ = Vec::Zero(blocks);
    up_ = std::make_unique<Linear<Scalar>>(Mat::Zero(d, w), Vec::Zero(d));
  }

  Index width() const { return d_ / config_.reduction; }
  int blocks() const { return static_cast<int>(side_.size()); }
  const LadderConfig& config() const { return config_; }
  // μ_i, the share of the side network's own path into block i (1-based, as the taps).
  Scalar gate(int i) const { return sigmoid(a_[i - 1]); }

  // taps: blocks() + 1 matrices (n, d) from the backbone; mask: the side blocks' attention mask
  // (causal beside a causal language model, its padding).
  Mat forward(const std::vector<Mat>& taps, Index batch, const AttentionMask<Scalar>& mask = {}) const {
    check("forward", taps);
    Mat s = down_[0].forward(taps[0]);
    for (int i = 1; i <= blocks(); ++i) {
      const Scalar mu = gate(i);
      s = side_[i - 1]->forward(mu * s + (1 - mu) * down_[i].forward(taps[i]), batch, mask);
    }
    Mat y = taps.back();
    y.noalias() += up_->forward(s);
    return y;
  }

  Mat forward_train(std::vector<Mat> taps, Index batch, const AttentionMask<Scalar>& mask = {}) {
    check("forward_train", taps);
    c_.taps = std::move(taps);  // the backbone's outputs only: (blocks + 1) × (n, d)
    const std::vector<Mat>& h = c_.taps;
    c_.s.assign(1, down_[0].forward_train(h[0]));
    c_.t.assign(1, Mat());
    for (int i = 1; i <= blocks(); ++i) {
      const Scalar mu = gate(i);
      c_.t.push_back(down_[i].forward_train(h[i]));
      c_.s.push_back(side_[i - 1]->forward_train(mu * c_.s[i - 1] + (1 - mu) * c_.t[i], batch, mask));
    }
    c_.valid = true;
    Mat y = h.back();
    y.noalias() += up_->forward_train(c_.s.back());
    return y;
  }

  void backward(const MatRef& dy) {
    if (!c_.valid) detail::fail("LadderSide::backward: no forward_train to go back through (call forward_train first)");
    if (dy.rows() != c_.taps[0].rows() || dy.cols() != d_)
      detail::fail("LadderSide::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(c_.taps[0].rows(), d_));
    Mat g = up_->backward(dy);
    for (int i = blocks(); i >= 1; --i) {
      const Scalar mu = gate(i);
      const Mat dm = side_[i - 1]->backward(g);
      ga_[i - 1] += (dm.array() * (c_.s[i - 1] - c_.t[i]).array()).sum() * mu * (1 - mu) / Scalar(kTemperature);
      down_[i].backward((1 - mu) * dm);
      g = mu * dm;
    }
    down_[0].backward(g);
    c_.valid = false;
  }

  void zero_grad() {
    for (auto& l : down_) l.zero_grad();
    for (auto& b : side_) b->zero_grad();
    up_->zero_grad();
    ga_.setZero();
  }

  // "down.<i>.weight", "gate" (a_1 .. a_L), "side.<i>.<block's names>", "up.weight", "up.bias".
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> all;
    for (std::size_t i = 0; i < down_.size(); ++i)
      for (auto& p : down_[i].parameters()) all.push_back({"down." + std::to_string(i) + "." + p.name, p.value, p.grad});
    all.push_back(make_parameter("gate", a_, ga_));
    for (std::size_t i = 0; i < side_.size(); ++i)
      for (auto& p : side_[i]->parameters()) all.push_back({"side." + std::to_string(i + 1) + "." + p.name, p.value, p.grad});
    for (auto& p : up_->parameters()) all.push_back({"up." + p.name, p.value, p.grad});
    return all;
  }
  Index parameter_count() const {
    Index n = a_.size() + up_->parameter_count();
    for (const auto& l : down_) n += l.parameter_count();
    for (const auto& b : side_) n += b->parameter_count();
    return n;
  }

 private:
  struct Cache {
    std::vector<Mat> taps, s, t;
    bool valid = false;
  };
  static Scalar sigmoid(Scalar a) { return Scalar(1) / (Scalar(1) + std::exp(-a / Scalar(kTemperature))); }
  void check(const char* fn, const std::vector<Mat>& taps) const {
    if (taps.size() != down_.size())
      detail::fail("LadderSide::", fn, ": ", taps.size(), " taps, expected ", down_.size(), " (the first block's input and each block's output)");
    for (std::size_t i = 0; i < taps.size(); ++i)
      if (taps[i].cols() != d_ || taps[i].rows() != taps[0].rows())
        detail::fail("LadderSide::", fn, ": tap ", i, " is ", detail::shape(taps[i].rows(), taps[i].cols()), ", expected ",
                     detail::shape(taps[0].rows(), d_));
  }

  LadderConfig config_;
  Index d_;
  std::vector<Linear<Scalar>> down_;
  std::vector<std::unique_ptr<EncoderBlock<Scalar>>> side_;
  Vec a_, ga_;
  std::unique_ptr<Linear<Scalar>> up_;
  Cache c_;
};

}  // namespace lora
