// The plain layers a model around LoRA layers needs, each with forward and backward side by
// side: Linear (trainable or frozen; heads and full fine-tuning), LayerNorm, GELU (exact, erf),
// ReLU, mean pooling over each sequence, and a patch embedding for images (ViT).
//
// Same conventions as LoraLinear: tokens are rows; forward is const; forward_train keeps what
// backward needs in a small cache; backward accumulates parameter gradients (only when the layer
// is trainable) and returns the input gradient.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace lora {

// y = x·Wᵀ + b          x (n, in) -> y (n, out); W (out, in), b (out)
// backward: dW += dyᵀ·x, db += Σ_rows dy (when trainable), dx = dy·W
template <class Scalar>
class Linear {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  Linear(Mat weight, Vec bias, bool trainable = true) : W_(std::move(weight)), b_(std::move(bias)), trainable_(trainable) {
    if (W_.size() == 0) detail::fail("Linear: weight is ", detail::shape(W_.rows(), W_.cols()), ", expected non-empty");
    if (b_.size() != 0 && b_.size() != W_.rows())
      detail::fail("Linear: bias is (", b_.size(), "), expected (", W_.rows(), ")");
    set_trainable(trainable);
  }

  Index in_features() const { return W_.cols(); }
  Index out_features() const { return W_.rows(); }
  const Mat& weight() const { return W_; }
  const Vec& bias() const { return b_; }
  const Mat& grad_weight() const { return gW_; }  // size 0 until the layer is trainable
  const Vec& grad_bias() const { return gb_; }
  bool trainable() const { return trainable_; }
  // A frozen layer keeps no gradient buffers (a frozen linear is only W and b in memory).
  void set_trainable(bool t) {
    trainable_ = t;
    valid_ = false;
    if (t && gW_.size() == 0) {
      gW_ = Mat::Zero(W_.rows(), W_.cols());
      gb_ = Vec::Zero(b_.size());
    }
  }

  Mat forward(const MatRef& x) const {
    Mat y;
    forward(x, y);
    return y;
  }
  // Writes into y, resized only when its shape differs.
  void forward(const MatRef& x, Mat& y) const {
    check("forward", x);
    y.resize(x.rows(), W_.rows());
    if (b_.size())
      y.rowwise() = b_.transpose();
    else
      y.setZero();
    y.noalias() += x * W_.transpose();
  }

  Mat forward_train(const MatRef& x) {
    Mat y;
    forward_train(x, y);
    return y;
  }
  void forward_train(const MatRef& x, Mat& y) {
    forward(x, y);
    if (trainable_) x_ = x;  // only the weight gradient needs x
    n_ = x.rows();
    valid_ = true;
  }

  Mat backward(const MatRef& dy) {
    Mat dx;
    backward(dy, dx);
    return dx;
  }
  // Writes into dx, resized only when its shape differs.
  void backward(const MatRef& dy, Mat& dx) {
    if (!valid_) detail::fail("Linear::backward: no forward_train to go back through (call forward_train first)");
    if (dy.cols() != W_.rows() || dy.rows() != n_)
      detail::fail("Linear::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ", detail::shape(n_, W_.rows()));
    if (trainable_) {
      gW_.noalias() += dy.transpose() * x_;
      if (b_.size()) gb_ += dy.colwise().sum().transpose();
    }
    dx.resize(dy.rows(), W_.cols());
    dx.noalias() = dy * W_;
    valid_ = false;
  }
  bool ready_for_backward() const { return valid_; }

  void zero_grad() {
    gW_.setZero();
    gb_.setZero();
  }

  // weight and bias with their gradients; empty when frozen.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> p;
    if (!trainable_) return p;
    p.push_back(make_parameter("weight", W_, gW_));
    if (b_.size()) p.push_back(make_parameter("bias", b_, gb_));
    return p;
  }

  Index parameter_count() const { return W_.size() + b_.size(); }

 private:
  void check(const char* fn, const MatRef& x) const {
    if (x.cols() != W_.cols())
      detail::fail("Linear::", fn, ": X is ", detail::shape(x.rows(), x.cols()), ", expected (n, ", W_.cols(), ")");
  }
  Mat W_, gW_, x_;
  Vec b_, gb_;
  Index n_ = 0;
  bool trainable_ = true, valid_ = false;
};

// nn.Linear's default init, drawn from rng in storage order: uniform(−1/√fan_in, 1/√fan_in).
template <class Scalar>
Mat<Scalar> uniform_init(Index rows, Index cols, detail::Rng& rng, Index fan_in) {
  Mat<Scalar> m(rows, cols);
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>((2 * rng.uniform() - 1) * bound);
  return m;
}

// A Linear (out, in) initialised as nn.Linear is: W, then b, uniform(−1/√in, 1/√in).
template <class Scalar>
Linear<Scalar> torch_linear(Index out, Index in, detail::Rng& rng, bool trainable = true) {
  Mat<Scalar> W = uniform_init<Scalar>(out, in, rng, in);
  Vec<Scalar> b = uniform_init<Scalar>(out, 1, rng, in).col(0);
  return Linear<Scalar>(std::move(W), std::move(b), trainable);
}

// LayerNorm over the last dimension (torch.nn.LayerNorm, biased variance, eps 1e-5):
//   xhat = (x − μ)/σ, σ = sqrt(var + eps);  y = xhat ⊙ γ + β          x (n, d) -> y (n, d)
// backward: dγ += Σ_rows dy ⊙ xhat, dβ += Σ_rows dy,
//           dx = (g − mean(g) − xhat ⊙ mean(g ⊙ xhat)) / σ  with g = dy ⊙ γ (means over d)
template <class Scalar>
class LayerNorm {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  explicit LayerNorm(Index d, double eps = 1e-5, bool trainable = true)
      : gamma_(Vec::Ones(d)), beta_(Vec::Zero(d)), g_gamma_(Vec::Zero(d)), g_beta_(Vec::Zero(d)), eps_(eps), trainable_(trainable) {
    if (d < 1) detail::fail("LayerNorm: d is ", d, ", expected >= 1");
    if (!(eps > 0)) detail::fail("LayerNorm: eps is ", eps, ", expected > 0");
  }

  Vec& gamma() { return gamma_; }
  const Vec& gamma() const { return gamma_; }
  Vec& beta() { return beta_; }
  const Vec& grad_gamma() const { return g_gamma_; }
  const Vec& grad_beta() const { return g_beta_; }
  void set_trainable(bool t) { trainable_ = t; }

  Mat forward(const MatRef& x) const {
    Mat xhat;
    Vec inv_std;
    normalize("forward", x, xhat, inv_std);
    return affine(xhat);
  }

  Mat forward_train(const MatRef& x) {
    normalize("forward_train", x, xhat_, inv_std_);
    valid_ = true;
    return affine(xhat_);
  }

  Mat backward(const MatRef& dy) {
    if (!valid_) detail::fail("LayerNorm::backward: no forward_train to go back through (call forward_train first)");
    if (dy.rows() != xhat_.rows() || dy.cols() != xhat_.cols())
      detail::fail("LayerNorm::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(xhat_.rows(), xhat_.cols()));
    if (trainable_) {
      g_gamma_ += (dy.array() * xhat_.array()).colwise().sum().matrix().transpose();
      g_beta_ += dy.colwise().sum().transpose();
    }
    const Mat g = dy.array().rowwise() * gamma_.transpose().array();
    const Vec mean_g = g.rowwise().mean();
    const Vec mean_gx = (g.array() * xhat_.array()).rowwise().mean();
    Mat dx = g;
    dx.colwise() -= mean_g;
    dx.array() -= xhat_.array().colwise() * mean_gx.array();
    dx.array().colwise() *= inv_std_.array();
    valid_ = false;
    return dx;
  }

  void zero_grad() {
    g_gamma_.setZero();
    g_beta_.setZero();
  }

  std::vector<Parameter<Scalar>> parameters() {
    if (!trainable_) return {};
    return {make_parameter("weight", gamma_, g_gamma_), make_parameter("bias", beta_, g_beta_)};
  }

  Index parameter_count() const { return 2 * gamma_.size(); }

 private:
  void normalize(const char* fn, const MatRef& x, Mat& xhat, Vec& inv_std) const {
    if (x.cols() != gamma_.size())
      detail::fail("LayerNorm::", fn, ": X is ", detail::shape(x.rows(), x.cols()), ", expected (n, ", gamma_.size(), ")");
    const Vec mean = x.rowwise().mean();
    xhat = x.colwise() - mean;
    inv_std = ((xhat.array().square().rowwise().mean() + Scalar(eps_)).sqrt().inverse()).matrix();
    xhat.array().colwise() *= inv_std.array();
  }

  Mat affine(const Mat& xhat) const {
    Mat y = xhat.array().rowwise() * gamma_.transpose().array();
    y.rowwise() += beta_.transpose();
    return y;
  }

  Vec gamma_, beta_, g_gamma_, g_beta_, inv_std_;
  Mat xhat_;
  double eps_;
  bool trainable_ = true, valid_ = false;
};

// GELU, exact (erf) form, as torch.nn.GELU(): y = x·Φ(x), dy/dx = Φ(x) + x·φ(x).
template <class Scalar>
Mat<Scalar> gelu(const MatRef<Scalar>& x) {
  return x.unaryExpr([](Scalar v) { return Scalar(0.5) * v * (Scalar(1) + std::erf(v * Scalar(0.70710678118654752440))); });
}

template <class Scalar>
Mat<Scalar> gelu_backward(const MatRef<Scalar>& x, const MatRef<Scalar>& dy) {
  const Scalar inv_sqrt_2pi = Scalar(0.3989422804014327);
  return x.binaryExpr(dy, [inv_sqrt_2pi](Scalar v, Scalar g) {
    const Scalar cdf = Scalar(0.5) * (Scalar(1) + std::erf(v * Scalar(0.70710678118654752440)));
    return g * (cdf + v * inv_sqrt_2pi * std::exp(Scalar(-0.5) * v * v));
  });
}

template <class Scalar>
Mat<Scalar> relu(const MatRef<Scalar>& x) {
  return x.cwiseMax(Scalar(0));
}

// dy where x > 0, else 0 (the subgradient 0 at x = 0, as PyTorch).
template <class Scalar>
Mat<Scalar> relu_backward(const MatRef<Scalar>& x, const MatRef<Scalar>& dy) {
  return (x.array() > Scalar(0)).select(dy, Scalar(0));
}

// Mean over each sequence: x (batch·T, d) -> (batch, d).
template <class Scalar>
Mat<Scalar> mean_pool(const MatRef<Scalar>& x, Index batch) {
  if (batch < 1 || x.rows() % batch != 0)
    detail::fail("mean_pool: X is ", detail::shape(x.rows(), x.cols()), ", not a whole number of sequences for batch ", batch);
  const Index T = x.rows() / batch;
  Mat<Scalar> y(batch, x.cols());
  for (Index b = 0; b < batch; ++b) y.row(b) = x.middleRows(b * T, T).colwise().mean();
  return y;
}

// dy (batch, d) -> dx (batch·T, d): each token gets dy/T.
template <class Scalar>
Mat<Scalar> mean_pool_backward(const MatRef<Scalar>& dy, Index T) {
  Mat<Scalar> dx(dy.rows() * T, dy.cols());
  for (Index b = 0; b < dy.rows(); ++b) dx.middleRows(b * T, T).rowwise() = dy.row(b) / Scalar(T);
  return dx;
}

// Square images (batch, side·side), row-major pixels, cut into non-overlapping patch×patch tiles
// in reading order: -> (batch·tiles, patch²), one token per tile. A patch embedding is then a
// Linear over these rows (plus a position table); pixels need no gradient.
template <class Scalar>
Mat<Scalar> patches(const MatRef<Scalar>& images, Index side, Index patch) {
  if (patch < 1 || side % patch != 0 || images.cols() != side * side)
    detail::fail("patches: images are ", detail::shape(images.rows(), images.cols()), ", expected (batch, ", side * side,
                 ") with side ", side, " divisible by patch ", patch);
  const Index per_side = side / patch, tiles = per_side * per_side;
  Mat<Scalar> out(images.rows() * tiles, patch * patch);
  for (Index b = 0; b < images.rows(); ++b)
    for (Index ty = 0; ty < per_side; ++ty)
      for (Index tx = 0; tx < per_side; ++tx)
        for (Index y = 0; y < patch; ++y)
          out.row(b * tiles + ty * per_side + tx).segment(y * patch, patch) =
              images.row(b).segment((ty * patch + y) * side + tx * patch, patch);
  return out;
}

// ViT patch embedding: cut square images into tiles (patches()), project each tile with a
// Linear (patch² -> d) and add a learned position row per tile.
//   images (batch, side²) -> (batch·tiles, d),  tokens of image b are rows b·tiles .. b·tiles+tiles−1
// backward: dW, db as Linear; dpos += Σ_images dy (pixels need no gradient, so none is returned).
// Initialisation from the seed: W, b as nn.Linear (uniform ±1/√patch²), position N(0, 0.02²).
template <class Scalar>
class PatchEmbedding {
 public:
  using Mat = lora::Mat<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  PatchEmbedding(Index side, Index patch, Index d, std::uint64_t seed, bool trainable = true)
      : side_(side), patch_(patch), proj_(init(side, patch, d, seed, trainable)) {
    detail::Rng rng(seed + 1);
    pos_.resize(tiles(), d);
    for (Index i = 0; i < pos_.size(); ++i) pos_.data()[i] = static_cast<Scalar>(0.02 * rng.normal());
    g_pos_ = Mat::Zero(tiles(), d);
    trainable_ = trainable;
  }

  Index side() const { return side_; }
  Index patch() const { return patch_; }
  Index tiles() const { return (side_ / patch_) * (side_ / patch_); }
  Index d_model() const { return proj_.out_features(); }
  Linear<Scalar>& proj() { return proj_; }
  Mat& position() { return pos_; }
  void set_trainable(bool t) {
    proj_.set_trainable(t);
    trainable_ = t;
  }

  Mat forward(const MatRef& images) const { return add_position(proj_.forward(patches<Scalar>(images, side_, patch_))); }

  Mat forward_train(const MatRef& images) {
    Mat y = add_position(proj_.forward_train(patches<Scalar>(images, side_, patch_)));
    valid_ = true;
    return y;
  }

  void backward(const MatRef& dy) {
    if (!valid_) detail::fail("PatchEmbedding::backward: no forward_train to go back through (call forward_train first)");
    if (dy.cols() != d_model() || dy.rows() % tiles() != 0)
      detail::fail("PatchEmbedding::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected (batch·", tiles(),
                   ", ", d_model(), ")");
    proj_.backward(dy);  // fills dW, db; its dx (pixels) is not needed
    if (trainable_)
      for (Index b = 0; b < dy.rows() / tiles(); ++b) g_pos_ += dy.middleRows(b * tiles(), tiles());
    valid_ = false;
  }

  void zero_grad() {
    proj_.zero_grad();
    g_pos_.setZero();
  }

  // "proj.weight", "proj.bias", "position"; empty when frozen.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> ps;
    if (!trainable_) return ps;
    for (auto& p : proj_.parameters()) ps.push_back({"proj." + p.name, p.value, p.grad});
    ps.push_back(make_parameter("position", pos_, g_pos_));
    return ps;
  }

  Index parameter_count() const { return proj_.parameter_count() + pos_.size(); }

 private:
  static Linear<Scalar> init(Index side, Index patch, Index d, std::uint64_t seed, bool trainable) {
    if (patch < 1 || side < 1 || side % patch != 0 || d < 1)
      detail::fail("PatchEmbedding: side ", side, ", patch ", patch, ", d ", d, ": expected side divisible by patch and d >= 1");
    detail::Rng rng(seed);
    return torch_linear<Scalar>(d, patch * patch, rng, trainable);
  }

  Mat add_position(Mat y) const {
    for (Index b = 0; b < y.rows() / tiles(); ++b) y.middleRows(b * tiles(), tiles()) += pos_;
    return y;
  }

  Index side_, patch_;
  Linear<Scalar> proj_;
  Mat pos_, g_pos_;
  bool trainable_ = true, valid_ = false;
};

}  // namespace lora
