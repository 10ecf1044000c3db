// LoraLinear<Scalar>: a frozen linear layer W (out, in) + b with a trainable low-rank update.
//
//   y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        x (n, in) -> y (n, out)
//   A (r, in), B (out, r), s = alpha/r (alpha/sqrt(r) with rsLoRA)
//
// B·A is never formed in a forward pass: the LoRA branch is two thin GEMMs through (n, r).
// Only A and B (and, in BiasMode::trainable, b) are trainable; W's bytes never change except
// through merge/unmerge.
//
// Weight storage. The layer owns W, or borrows it:
//   - a writable borrow (MatMap) is used in place; merge writes into the caller's memory;
//   - a read-only borrow (ConstMatMap, e.g. a mapped safetensors tensor) is never written:
//     merge copies W into the layer first (copy on write) and unmerge drops the copy, going back
//     to the borrowed bytes, which restores W exactly.
// With fan_in_fan_out (GPT-2's Conv1D) W is stored (in, out); the math is the same.
//
// Merge state. merge() adds s·B·A to W, after which forward is one GEMM; unmerge() subtracts it.
// Both are no-ops when already in that state (PEFT's behaviour), so W is never doubly merged.
// In floating point, W + Δ − Δ need not equal W; with exact_unmerge the layer keeps a copy of W
// while merged and unmerge restores it bit-for-bit. Training (forward_train/backward) and
// setting A or B are errors while merged: unmerge first.
#pragma once

#include <lora/dropout.hpp>
#include <lora/error.hpp>
#include <lora/init.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

enum class BiasMode {
  frozen,     // PEFT bias="none": b is part of the frozen base
  trainable,  // PEFT bias="lora_only": b of this layer is trained with A and B
};

struct LoraConfig {
  int r = 8;
  double alpha = 8;
  double dropout = 0;  // p in [0, 1), on the LoRA branch's input only
  bool use_rslora = false;
  BiasMode bias = BiasMode::frozen;
  Init init = Init::kaiming;
  std::uint64_t seed = 0;       // for init and dropout masks
  bool fan_in_fan_out = false;  // W is given as (in, out), GPT-2 Conv1D style
  bool exact_unmerge = false;   // keep W while merged so unmerge restores it bit-for-bit
  bool use_dora = false;        // DoRA: a trainable magnitude per output (PEFT's use_dora)

  double scaling() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r; }
};

// A trainable tensor and its gradient, for optimizers. Views into the layer.
template <class Scalar>
struct Parameter {
  std::string name;
  MatMap<Scalar> value;
  MatMap<Scalar> grad;
};

template <class Scalar>
class LoraLinear {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  using MatMap = lora::MatMap<Scalar>;
  using ConstMatMap = lora::ConstMatMap<Scalar>;

  // Owned weight (out, in) (or (in, out) with fan_in_fan_out), optional bias (out).
  LoraLinear(Mat weight, std::optional<Vec> bias, const LoraConfig& config)
      : w_own_(std::move(weight)), use_own_(true) {
    setup(w_own_.rows(), w_own_.cols(), std::move(bias), config);
  }
  // Writable borrow: the caller keeps the memory alive; merge writes into it.
  LoraLinear(MatMap weight, std::optional<Vec> bias, const LoraConfig& config) : w_borrow_(weight.data()) {
    setup(weight.rows(), weight.cols(), std::move(bias), config);
  }
  // Read-only borrow: the caller keeps the memory alive; it is never written (merge copies).
  LoraLinear(ConstMatMap weight, std::optional<Vec> bias, const LoraConfig& config) : w_borrow_ro_(weight.data()) {
    setup(weight.rows(), weight.cols(), std::move(bias), config);
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  int rank() const { return config_.r; }
  Scalar scaling() const { return s_; }
  const LoraConfig& config() const { return config_; }
  bool has_bias() const { return has_bias_; }
  bool is_merged() const { return merged_; }
  // True while W is memory the layer does not own.
  bool is_borrowed() const { return !use_own_; }

  // W as stored: (out, in), or (in, out) with fan_in_fan_out. Merged while is_merged().
  ConstMatMap weight() const { return ConstMatMap(wdata(), w_rows_, w_cols_); }
  const Vec& bias() const { return bias_; }  // size 0 when the layer has none
  const Mat& lora_A() const { return A_; }
  const Mat& lora_B() const { return B_; }
  const Mat& grad_A() const { return grad_A_; }
  const Mat& grad_B() const { return grad_B_; }
  const Vec& grad_bias() const { return grad_bias_; }  // size 0 unless BiasMode::trainable or base_trainable()

  // ---- DoRA (config.use_dora) ------------------------------------------------------------
  // PEFT's DoRA: a magnitude m (out), initialised to the norms below, rescales every output:
  //   norm = ‖W + s·B·A‖ per output row (L2 over in), c = m / norm
  //   y = b + c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)          (PEFT: x·Wᵀ + b + (c − 1)⊙x·Wᵀ + c⊙s·(x·Aᵀ)·Bᵀ)
  // norm is a constant in backward (detached, DoRA paper §4.3): with z = x·Wᵀ + s·t·Bᵀ,
  //   dm += Σ_rows dy ⊙ z / norm, and A, B, x get the plain LoRA gradients of dy ⊙ c.
  // Merged, W' = c ⊙_rows (W + s·B·A). norm is computed as ‖w‖² + 2s·w·(Aᵀb) + s²·bᵀ(A·Aᵀ)b
  // per row, so no (out, in) matrix is formed. Not supported with dropout or a trainable base.
  bool use_dora() const { return config_.use_dora; }
  const Vec& lora_magnitude() const { return m_; }  // size 0 without DoRA
  const Vec& grad_magnitude() const { return grad_m_; }
  void set_lora_magnitude(const Vec& m) {
    if (!config_.use_dora) detail::fail("LoraLinear::set_lora_magnitude: the layer does not use DoRA (config.use_dora)");
    if (merged_) detail::fail("LoraLinear::set_lora_magnitude: the layer is merged; unmerge() before changing m");
    if (m.size() != out_) detail::fail("LoraLinear::set_lora_magnitude: m is (", m.size(), "), expected (", out_, ")");
    m_ = m;
  }

  // ‖W + s·B·A‖ per output row (W unmerged).
  Vec weight_norm() const {
    const Mat wa = config_.fan_in_fan_out ? Mat((A_ * weight()).transpose()) : Mat(weight() * A_.transpose());  // (out, r)
    const Mat aat = A_ * A_.transpose();
    const Vec w2 = config_.fan_in_fan_out ? Vec(weight().colwise().squaredNorm().transpose()) : Vec(weight().rowwise().squaredNorm());
    const Vec cross = (wa.array() * B_.array()).rowwise().sum();
    const Vec quad = ((B_ * aat).array() * B_.array()).rowwise().sum();
    return (w2 + Scalar(2) * s_ * cross + s_ * s_ * quad).cwiseMax(Scalar(0)).cwiseSqrt();
  }

  // A (r, in). Refused while merged (W would no longer match).
  void set_lora_A(const MatRef& a) { set_factor("set_lora_A", "A", a, A_); }
  // B (out, r). Refused while merged.
  void set_lora_B(const MatRef& b) { set_factor("set_lora_B", "B", b, B_); }

  // Replaces the base weight, as stored ((out, in), or (in, out) with fan_in_fan_out); for
  // initialisations that move part of W into A and B (PiSSA, OLoRA in svd.hpp). A writable
  // borrow is written in place. Refused while merged and for a read-only borrow.
  void set_weight(const MatRef& w) {
    if (merged_) detail::fail("LoraLinear::set_weight: the layer is merged; unmerge() before changing W");
    if (w_borrow_ro_ && !use_own_)
      detail::fail("LoraLinear::set_weight: W is a read-only borrow; construct the layer with an owned or writable W");
    if (w.rows() != w_rows_ || w.cols() != w_cols_)
      detail::fail("LoraLinear::set_weight: W is ", detail::shape(w.rows(), w.cols()), ", expected ", detail::shape(w_rows_, w_cols_));
    writable_weight() = w;
    cache_.valid = false;
  }

  // PEFT's update_layer: a new adapter of config.r, config.alpha, ... with fresh A and B
  // (initialised as config.init says) and zero gradients; W and b are untouched. Refused while
  // merged, and for a config that changes fan_in_fan_out (how W is stored) or asks for a
  // trainable bias the layer does not have. A refusal changes nothing.
  void update_layer(const LoraConfig& config) {
    const char* where = "LoraLinear::update_layer: ";
    check_config(where, config);
    if (merged_) detail::fail(where, "the layer is merged; unmerge() first");
    if (config.fan_in_fan_out != config_.fan_in_fan_out)
      detail::fail(where, "fan_in_fan_out is ", config.fan_in_fan_out, ", the layer's weight was given with ",
                   config_.fan_in_fan_out);
    if (config.bias == BiasMode::trainable && !has_bias_)
      detail::fail(where, "bias mode is trainable but the layer has no bias");
    if (config.use_dora && train_base_) detail::fail(where, "use_dora is not supported while the base trains");
    reset_adapter(config);
  }

  // PEFT's enable_adapters / disable_adapters: a disabled layer computes the base alone,
  // y = x·Wᵀ + b, and trains nothing of A and B (parameters() leaves them out). Disabling a
  // merged layer unmerges it first (as PEFT does).
  void enable_adapters(bool enabled) {
    if (!enabled) unmerge();
    disabled_ = !enabled;
  }
  bool disable_adapters() const { return disabled_; }

  // Full fine-tuning: W and b become trainable too (backward accumulates grad_weight and
  // grad_bias, parameters() lists them). Off by default: LoRA training never changes W. Refused
  // while merged and for a read-only borrowed W.
  void set_base_trainable(bool on) {
    if (on && merged_) detail::fail("LoraLinear::set_base_trainable: the layer is merged; unmerge() first");
    if (on && w_borrow_ro_ && !use_own_)
      detail::fail("LoraLinear::set_base_trainable: W is a read-only borrow; construct the layer with an owned or writable W");
    if (on && config_.use_dora) detail::fail("LoraLinear::set_base_trainable: not supported with DoRA (use_dora)");
    train_base_ = on;
    grad_W_ = on ? Mat::Zero(w_rows_, w_cols_) : Mat();
    grad_bias_ = on || config_.bias == BiasMode::trainable ? Vec::Zero(has_bias_ ? out_ : 0) : Vec();
    cache_.valid = false;
  }
  bool base_trainable() const { return train_base_; }
  const Mat& grad_weight() const { return grad_W_; }  // W's layout; size 0 unless base_trainable()

  // ---- evaluation ------------------------------------------------------------------------
  // x (n, in) -> y (n, out). const and thread-safe; no dropout.
  //   y = b + x·Wᵀ + s·(x·Aᵀ)·Bᵀ       (merged: y = b + x·Wᵀ)
  Mat forward(const MatRef& x) const {
    Mat y;
    forward(x, y);
    return y;
  }

  // Writes into y, resized only when its shape differs: a reused y allocates nothing.
  void forward(const MatRef& x, Mat& y) const {
    check_input("forward", x);
    check_no_alias("forward", "Y", y, "X", x);
    y.resize(x.rows(), out_);
    init_with_bias(y);
    add_base(x, y);
    if (!merged_ && !disabled_) {
      thread_local Mat t;
      t.noalias() = x * A_.transpose();
      y.noalias() += s_ * t * B_.transpose();
      if (config_.use_dora) {
        const Vec c = m_.cwiseQuotient(weight_norm());
        rescale(y, c);
      }
    }
  }

  // ---- training --------------------------------------------------------------------------
  // forward_train, x (n, in) -> y (n, out), keeps in cache_:
  //   xd = drop(x) (n, in), mask (n, in) (p > 0 only), t = xd·Aᵀ (n, r); x when the base trains
  //   y  = b + x·Wᵀ + s·t·Bᵀ
  // backward, dy (n, out) -> dx (n, in), consumes the cache:
  //   dB += s·dyᵀ·t      g = s·dy·B (n, r)      dA += gᵀ·xd      db += Σ_rows dy (trainable bias)
  //   dx  = dy·W + mask ⊙ (g·A)                 dW += dyᵀ·x (base_trainable)
  // With adapters disabled only the base terms remain.
  Mat forward_train(const MatRef& x) {
    Mat y;
    forward_train(x, y);
    return y;
  }

  // Writes into y (not aliasing x), resized only when its shape differs.
  void forward_train(const MatRef& x, Mat& y) {
    check_input("forward_train", x);
    check_no_alias("forward_train", "Y", y, "X", x);
    if (merged_) detail::fail("LoraLinear::forward_train: the layer is merged; call unmerge() before training");
    Cache& c = cache_;
    c.n = x.rows();
    if (train_base_) c.x = x;
    y.resize(x.rows(), out_);
    init_with_bias(y);
    add_base(x, y);
    c.valid = true;
    if (disabled_) return;
    if (config_.dropout > 0) {
      dropout_mask(c.mask, x.rows(), in_, config_.dropout, rng_);
      c.xd = x.cwiseProduct(c.mask);
    } else {
      c.xd = x;
    }
    c.t.noalias() = c.xd * A_.transpose();
    y.noalias() += s_ * c.t * B_.transpose();
    if (config_.use_dora) {
      c.norm = weight_norm();
      c.c = m_.cwiseQuotient(c.norm);
      c.z = y;
      if (has_bias_) c.z.rowwise() -= bias_.transpose();
      rescale(y, c.c);
    }
  }

  Mat backward(const MatRef& dy) {
    Mat dx;
    backward(dy, dx);
    return dx;
  }

  // Writes into dx (not aliasing dy), resized only when its shape differs.
  void backward(const MatRef& dy, Mat& dx) {
    Cache& c = cache_;
    if (!c.valid) detail::fail("LoraLinear::backward: no forward_train to go back through (call forward_train first)");
    if (dy.rows() != c.n || dy.cols() != out_)
      detail::fail("LoraLinear::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(c.n, out_));
    check_no_alias("backward", "dX", dx, "dY", dy);
    if (grad_bias_.size()) grad_bias_ += dy.colwise().sum().transpose();
    if (train_base_) {
      if (config_.fan_in_fan_out)
        grad_W_.noalias() += c.x.transpose() * dy;
      else
        grad_W_.noalias() += dy.transpose() * c.x;
    }
    const bool dora = config_.use_dora && !disabled_;
    if (dora) {  // dm += Σ_rows dy ⊙ z / norm; the rest is LoRA's backward of dy ⊙ c
      grad_m_ += (dy.array() * c.z.array()).colwise().sum().matrix().transpose().cwiseQuotient(c.norm);
      c.d = dy.array().rowwise() * c.c.transpose().array();
    }
    const MatRef e = dora ? MatRef(c.d) : dy;
    dx.resize(dy.rows(), in_);
    if (config_.fan_in_fan_out)
      dx.noalias() = e * weight().transpose();
    else
      dx.noalias() = e * weight();
    c.valid = false;
    if (disabled_) return;
    grad_B_.noalias() += s_ * e.transpose() * c.t;
    c.g.noalias() = s_ * e * B_;
    grad_A_.noalias() += c.g.transpose() * c.xd;
    if (config_.dropout > 0) {
      c.xd.noalias() = c.g * A_;  // xd is no longer needed: reuse it for g·A
      dx += c.mask.cwiseProduct(c.xd);
    } else {
      dx.noalias() += c.g * A_;
    }
  }

  // Restarts the sequence of dropout masks: the next forward_train after reseed(k) draws the
  // same mask as the first one of a layer built with seed k.
  void reseed(std::uint64_t seed) { rng_ = detail::Rng(seed ^ 0xd1b54a32d192ed03ULL); }  // its own stream, apart from init's

  void zero_grad() {
    grad_A_.setZero();
    grad_B_.setZero();
    grad_bias_.setZero();
    grad_W_.setZero();
    grad_m_.setZero();
  }

  // The trainable tensors with their gradients: lora_A and lora_B (unless adapters are
  // disabled), bias in trainable mode, weight and bias when the base trains.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> p;
    if (!disabled_) {
      p.push_back({"lora_A", MatMap(A_.data(), A_.rows(), A_.cols()), MatMap(grad_A_.data(), A_.rows(), A_.cols())});
      p.push_back({"lora_B", MatMap(B_.data(), B_.rows(), B_.cols()), MatMap(grad_B_.data(), B_.rows(), B_.cols())});
      if (config_.use_dora)
        p.push_back({"lora_magnitude_vector", MatMap(m_.data(), 1, out_), MatMap(grad_m_.data(), 1, out_)});
    }
    if (train_base_) p.push_back({"weight", writable_weight(), MatMap(grad_W_.data(), w_rows_, w_cols_)});
    if (grad_bias_.size()) p.push_back({"bias", MatMap(bias_.data(), 1, out_), MatMap(grad_bias_.data(), 1, out_)});
    return p;
  }

  Index trainable_parameters() const {
    return (disabled_ ? 0 : A_.size() + B_.size() + m_.size()) + (train_base_ ? out_ * in_ : 0) + grad_bias_.size();
  }
  Index frozen_parameters() const { return base_parameters() - (train_base_ ? out_ * in_ : 0) - grad_bias_.size(); }
  // What full fine-tuning of the base layer trains: W and b.
  Index base_parameters() const { return out_ * in_ + (has_bias_ ? out_ : 0); }

  // ---- merge -----------------------------------------------------------------------------
  // s·B·A (out, in), whatever the storage layout of W. (With DoRA, merge also rescales the rows.)
  Mat delta_weight() const {
    Mat d(out_, in_);
    d.noalias() = s_ * B_ * A_;
    return d;
  }

  // W += s·B·A. No-op when merged or when adapters are disabled (nothing active to merge).
  // With DoRA: W ← c ⊙_rows (W + s·B·A).
  void merge() {
    if (merged_ || disabled_) return;
    const Vec c = config_.use_dora ? Vec(m_.cwiseQuotient(weight_norm())) : Vec();
    begin_merge();
    merge_into(writable_weight(), c);
    merged_ = true;
  }

  // As merge(), but computes the merged weight first and throws, changing nothing, if any value
  // is not finite.
  void safe_merge() {
    if (merged_ || disabled_) return;
    Mat merged = weight();
    merge_into(MatMap(merged.data(), w_rows_, w_cols_), config_.use_dora ? Vec(m_.cwiseQuotient(weight_norm())) : Vec());
    if (!merged.allFinite())
      detail::fail("LoraLinear::safe_merge: the merged weight has non-finite values; W is unchanged");
    begin_merge();
    writable_weight() = merged;
    merged_ = true;
  }

  // W -= s·B·A (or W restored exactly, see above). No-op when not merged.
  void unmerge() {
    if (!merged_) return;
    if (w_borrow_ro_) {
      use_own_ = false;  // back to the untouched borrowed bytes
      w_own_.resize(0, 0);
    } else if (config_.exact_unmerge) {
      writable_weight() = w_saved_;
      w_saved_.resize(0, 0);
    } else {
      MatMap w = writable_weight();
      if (config_.use_dora) scale_outputs(w, dora_c_.cwiseInverse());  // W' / c, with c from merge time
      add_delta(w, Scalar(-1));
    }
    merged_ = false;
  }

 private:
  struct Cache {
    Mat x, xd, mask, t, g;
    Mat z, d;     // DoRA: x·Wᵀ + s·t·Bᵀ, and dy ⊙ c
    Vec norm, c;  // DoRA: ‖W + s·B·A‖ per row, m / norm
    Index n = 0;
    bool valid = false;
  };

  void setup(Index rows, Index cols, std::optional<Vec> bias, const LoraConfig& config) {
    const char* where = "LoraLinear: ";
    check_config(where, config);
    if (rows < 1 || cols < 1) detail::fail(where, "weight is ", detail::shape(rows, cols), ", expected a non-empty matrix");
    w_rows_ = rows;
    w_cols_ = cols;
    out_ = config.fan_in_fan_out ? cols : rows;
    in_ = config.fan_in_fan_out ? rows : cols;
    if (bias) {
      if (bias->size() != out_)
        detail::fail(where, "bias is (", bias->size(), "), expected (", out_, ") for a weight of ", detail::shape(rows, cols),
                     config.fan_in_fan_out ? " stored (in, out)" : "");
      bias_ = std::move(*bias);
      has_bias_ = true;
    } else if (config.bias == BiasMode::trainable) {
      detail::fail(where, "bias mode is trainable but the layer has no bias");
    }
    reset_adapter(config);
  }

  static void check_config(const char* where, const LoraConfig& config) {
    if (config.r < 1) detail::fail(where, "r is ", config.r, ", expected r >= 1");
    if (!std::isfinite(config.alpha) || config.alpha <= 0)
      detail::fail(where, "alpha is ", config.alpha, ", expected a finite value > 0");
    if (!(config.dropout >= 0 && config.dropout < 1))
      detail::fail(where, "dropout is ", config.dropout, ", expected 0 <= p < 1");
    if (config.use_dora && config.dropout > 0)
      detail::fail(where, "use_dora with dropout ", config.dropout, " is not supported (DoRA needs dropout 0)");
  }

  // New A, B (initialised as config says), zero gradients, scaling, dropout stream.
  void reset_adapter(const LoraConfig& config) {
    config_ = config;
    s_ = static_cast<Scalar>(config.scaling());
    A_.resize(config.r, in_);
    B_.resize(out_, config.r);
    detail::Rng init_rng(config.seed);
    init_lora(config.init, A_, B_, init_rng);
    reseed(config.seed);
    grad_A_ = Mat::Zero(config.r, in_);
    grad_B_ = Mat::Zero(out_, config.r);
    grad_bias_ = config.bias == BiasMode::trainable || train_base_ ? Vec::Zero(has_bias_ ? out_ : 0) : Vec();
    m_ = config.use_dora ? weight_norm() : Vec();  // PEFT: m starts at ‖W + s·B·A‖, so y is unchanged
    grad_m_ = Vec::Zero(m_.size());
    cache_.valid = false;
  }

  const Scalar* wdata() const { return use_own_ ? w_own_.data() : (w_borrow_ ? w_borrow_ : w_borrow_ro_); }

  // W as writable memory; a read-only borrow is copied first (see begin_merge).
  MatMap writable_weight() { return MatMap(use_own_ ? w_own_.data() : w_borrow_, w_rows_, w_cols_); }

  // Before W changes: a read-only borrow gets its private copy; exact mode saves W.
  void begin_merge() {
    if (w_borrow_ro_) {
      w_own_ = ConstMatMap(w_borrow_ro_, w_rows_, w_cols_);
      use_own_ = true;
    } else if (config_.exact_unmerge) {
      w_saved_ = weight();
    }
  }

  // w ← w + s·B·A, then with DoRA w ← c ⊙_rows w (c kept for unmerge).
  void merge_into(MatMap w, const Vec& c) {
    add_delta(w, Scalar(1));
    if (config_.use_dora) {
      scale_outputs(w, c);
      dora_c_ = c;
    }
  }

  // Row j of the logical (out, in) W times f(j): rows of W, or columns when stored (in, out).
  void scale_outputs(MatMap w, const Vec& f) const {
    if (config_.fan_in_fan_out)
      w.array().rowwise() *= f.transpose().array();
    else
      w.array().colwise() *= f.array();
  }

  // y ← b + c ⊙ (y − b), column j of y scaled by c(j).
  void rescale(Mat& y, const Vec& c) const {
    if (has_bias_) y.rowwise() -= bias_.transpose();
    y.array().rowwise() *= c.transpose().array();
    if (has_bias_) y.rowwise() += bias_.transpose();
  }

  // w += sign·s·B·A in W's storage layout, as one GEMM, no (out, in) temporary.
  void add_delta(MatMap w, Scalar sign) const {
    if (config_.fan_in_fan_out)
      w.noalias() += (sign * s_) * A_.transpose() * B_.transpose();
    else
      w.noalias() += (sign * s_) * B_ * A_;
  }

  void check_input(const char* fn, const MatRef& x) const {
    if (x.cols() != in_)
      detail::fail("LoraLinear::", fn, ": X is ", detail::shape(x.rows(), x.cols()), ", expected (n, ", in_, ")");
  }

  // An output buffer that overlaps the input would be overwritten while it is read.
  static void check_no_alias(const char* fn, const char* out_name, const Mat& out, const char* in_name, const MatRef& in) {
    const Scalar* in_end = in.data() + (in.rows() - 1) * in.outerStride() + in.cols();
    if (out.size() > 0 && in.size() > 0 && out.data() < in_end && in.data() < out.data() + out.size())
      detail::fail("LoraLinear::", fn, ": the output ", out_name, " shares memory with the input ", in_name,
                   "; pass a separate buffer");
  }

  // y <- b broadcast (or 0). Eigen's GEMM accumulates, so this costs what setZero would.
  void init_with_bias(Mat& y) const {
    if (has_bias_)
      y.rowwise() = bias_.transpose();
    else
      y.setZero();
  }

  void add_base(const MatRef& x, Mat& y) const {
    if (config_.fan_in_fan_out)
      y.noalias() += x * weight();
    else
      y.noalias() += x * weight().transpose();
  }

  void set_factor(const char* fn, const char* what, const MatRef& v, Mat& dst) {
    if (merged_) detail::fail("LoraLinear::", fn, ": the layer is merged; unmerge() before changing ", what);
    if (v.rows() != dst.rows() || v.cols() != dst.cols())
      detail::fail("LoraLinear::", fn, ": ", what, " is ", detail::shape(v.rows(), v.cols()), ", expected ",
                   detail::shape(dst.rows(), dst.cols()));
    dst = v;
  }

  LoraConfig config_;
  Index in_ = 0, out_ = 0, w_rows_ = 0, w_cols_ = 0;
  Scalar s_ = 1;

  Mat w_own_;                             // owned W, or the private copy of a read-only borrow
  Scalar* w_borrow_ = nullptr;            // writable borrow
  const Scalar* w_borrow_ro_ = nullptr;   // read-only borrow
  bool use_own_ = false;                  // W is w_own_
  Mat w_saved_;                           // W before merge, in exact_unmerge mode
  bool merged_ = false;
  bool disabled_ = false;
  bool train_base_ = false;
  Mat grad_W_;

  Vec bias_;
  bool has_bias_ = false;
  Mat A_, B_, grad_A_, grad_B_;
  Vec grad_bias_;
  Vec m_, grad_m_, dora_c_;  // DoRA magnitude, its gradient, m / norm at merge time
  detail::Rng rng_;
  Cache cache_;
};

}  // namespace lora
