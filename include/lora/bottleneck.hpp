// BottleneckAdapter<Scalar>: adapter-tuning (Houlsby et al., 2019), the method the LoRA article
// weighs against for its inference latency: a small bottleneck with a skip connection, inserted
// after a sublayer of every block, trained while the model stays frozen.
//
//   z (n, d) -> y (n, d)
//   a = z·Dᵀ + c             down D (m, d), c (m)        m: the bottleneck size
//   h = act(a)               GELU (exact) or ReLU
//   y = z + h·Uᵀ + e         up U (d, m), e (d)
//
// U and e start at zero, so a new adapter is the identity; D and c start as nn.Linear's
// (uniform ±1/√d) from the seed. backward, dy (n, d) -> dz:
//   dU += dyᵀ·h;  de += Σ_rows dy;  dh = dy·U;  da = act'(a) ⊙ dh;  dD += daᵀ·z;  dc += Σ_rows da
//   dz = dy + da·D
//
// Unlike LoRA's update it cannot be folded into a weight (act sits between the two products), so
// it costs two thin products and act at inference too.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/layers.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace lora {

enum class Activation { gelu, relu };

struct BottleneckConfig {
  Index size = 0;                      // m, the bottleneck width (>= 1)
  Activation activation = Activation::gelu;
  std::uint64_t seed = 0;              // D and c
};

template <class Scalar>
class BottleneckAdapter {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  BottleneckAdapter(Index d, const BottleneckConfig& config)
      : config_(config), down_(init_down(d, config)), up_(Mat::Zero(d, config.size), Vec::Zero(d)) {}

  Index d_model() const { return up_.out_features(); }
  Index size() const { return down_.out_features(); }
  const BottleneckConfig& config() const { return config_; }
  Linear<Scalar>& down() { return down_; }
  Linear<Scalar>& up() { return up_; }
  const Linear<Scalar>& down() const { return down_; }
  const Linear<Scalar>& up() const { return up_; }

  Mat forward(const MatRef& z) const {
    check("forward", z);
    Mat y;
    up_.forward(act(down_.forward(z)), y);
    y += z;
    return y;
  }

  Mat forward_train(const MatRef& z) {
    check("forward_train", z);
    down_.forward_train(z, a_);
    Mat y;
    up_.forward_train(act(a_), y);
    y += z;
    return y;
  }

  Mat backward(const MatRef& dy) {
    if (!up_.ready_for_backward())
      detail::fail("BottleneckAdapter::backward: no forward_train to go back through (call forward_train first)");
    if (dy.rows() != a_.rows() || dy.cols() != d_model())
      detail::fail("BottleneckAdapter::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(a_.rows(), d_model()));
    const Mat dh = up_.backward(dy);
    const Mat da = config_.activation == Activation::gelu ? gelu_backward<Scalar>(a_, dh) : relu_backward<Scalar>(a_, dh);
    Mat dz;
    down_.backward(da, dz);
    dz += dy;
    return dz;
  }

  void zero_grad() {
    down_.zero_grad();
    up_.zero_grad();
  }

  // down.weight, down.bias, up.weight, up.bias with their gradients.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> all;
    for (auto& p : down_.parameters()) all.push_back({"down." + p.name, p.value, p.grad});
    for (auto& p : up_.parameters()) all.push_back({"up." + p.name, p.value, p.grad});
    return all;
  }
  Index parameter_count() const { return down_.parameter_count() + up_.parameter_count(); }

 private:
  static Linear<Scalar> init_down(Index d, const BottleneckConfig& config) {
    if (d < 1) detail::fail("BottleneckAdapter: d is ", d, ", expected >= 1");
    if (config.size < 1) detail::fail("BottleneckAdapter: size is ", config.size, ", expected >= 1 (the bottleneck width)");
    detail::Rng rng(config.seed);
    return torch_linear<Scalar>(config.size, d, rng);
  }
  Mat act(const Mat& a) const { return config_.activation == Activation::gelu ? gelu<Scalar>(a) : relu<Scalar>(a); }
  void check(const char* fn, const MatRef& z) const {
    if (z.cols() != d_model())
      detail::fail("BottleneckAdapter::", fn, ": Z is ", detail::shape(z.rows(), z.cols()), ", expected (n, ", d_model(), ")");
  }

  BottleneckConfig config_;
  Linear<Scalar> down_, up_;
  Mat a_;  // the pre-activation, for backward
};

}  // namespace lora
