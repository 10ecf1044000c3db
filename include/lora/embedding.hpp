// LoraEmbedding<Scalar>: a frozen embedding table with a trainable low-rank update (PEFT's
// lora.Embedding).
//
//   W (vocab, dim) frozen;  A = lora_embedding_A (r, vocab);  B = lora_embedding_B (dim, r)
//   y_i = W[id_i] + s·A[:, id_i]ᵀ·Bᵀ           ids (n) -> y (n, dim),  s = alpha/r (or alpha/√r)
//
// In matrices: G = Aᵀ[ids] (n, r), the gathered columns of A, and Y = W[ids] + s·G·Bᵀ.
// backward, dY (n, dim):
//   dB += s·dYᵀ·G                 (dim, r)
//   dA[:, id_i] += s·(dY·B)_iᵀ    scatter-add: a repeated id accumulates
// The ids get no gradient. Merged: W += s·(B·A)ᵀ, and the forward is the lookup alone.
//
// As in PEFT: A starts at zero and B ~ N(0, 1), so a fresh adapter changes nothing, and the LoRA
// dropout does not apply to embeddings (config.dropout is ignored, as PEFT ignores it). The
// LoraConfig fields that have no meaning here are refused: an init other than the default,
// use_dora, fan_in_fan_out and a trainable bias. An id outside [0, vocab) is an error that names
// it; nothing changes.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/config.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
class LoraEmbedding {
 public:
  using Mat = lora::Mat<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  using Ids = std::vector<std::int64_t>;

  LoraEmbedding(Mat weight, const LoraConfig& config) : W_(std::move(weight)) {
    if (W_.rows() < 1 || W_.cols() < 1)
      detail::fail("LoraEmbedding: weight is ", detail::shape(W_.rows(), W_.cols()), ", expected (vocab, dim) with both >= 1");
    if (config.r < 1) detail::fail("LoraEmbedding: r is ", config.r, ", expected r >= 1");
    if (!std::isfinite(config.alpha) || config.alpha <= 0)
      detail::fail("LoraEmbedding: alpha is ", config.alpha, ", expected a finite value > 0");
    if (config.init != Init::kaiming)
      detail::fail("LoraEmbedding: init ", init_name(config.init), " does not apply (embeddings start with A = 0, B ~ N(0, 1))");
    if (config.use_dora) detail::fail("LoraEmbedding: use_dora is not supported for embeddings");
    if (config.fan_in_fan_out) detail::fail("LoraEmbedding: fan_in_fan_out does not apply (W is (vocab, dim))");
    if (config.bias == BiasMode::trainable) detail::fail("LoraEmbedding: bias mode trainable, but an embedding has no bias");
    config_ = config;
    s_ = static_cast<Scalar>(config.scaling());
    A_ = Mat::Zero(config.r, vocab());
    B_.resize(dim(), config.r);
    detail::Rng rng(config.seed);
    for (Index i = 0; i < B_.size(); ++i) B_.data()[i] = static_cast<Scalar>(rng.normal());
    gA_ = Mat::Zero(config.r, vocab());
    gB_ = Mat::Zero(dim(), config.r);
  }

  Index vocab() const { return W_.rows(); }
  Index dim() const { return W_.cols(); }
  int rank() const { return config_.r; }
  Scalar scaling() const { return s_; }
  const LoraConfig& config() const { return config_; }
  bool is_merged() const { return merged_; }
  [[deprecated("use is_merged()")]] bool merged() const { return merged_; }
  const Mat& weight() const { return W_; }
  const Mat& lora_A() const { return A_; }
  const Mat& lora_B() const { return B_; }
  const Mat& grad_A() const { return gA_; }
  const Mat& grad_B() const { return gB_; }

  // Replace A (r, vocab) or B (dim, r), e.g. with loaded values; refused while merged.
  void set_lora_A(const MatRef& a) { set("set_lora_A", A_, a); }
  void set_lora_B(const MatRef& b) { set("set_lora_B", B_, b); }

  // ---- evaluation (const, thread-safe) ---------------------------------------------------
  Mat forward(const Ids& ids) const { return lookup("forward", ids); }

  // ---- training --------------------------------------------------------------------------
  Mat forward_train(const Ids& ids) {
    if (merged_) detail::fail("LoraEmbedding::forward_train: the layer is merged; unmerge() first");
    Mat y = lookup("forward_train", ids, &g_);  // checks the ids before anything is kept
    ids_ = ids;
    valid_ = true;
    return y;
  }

  // Accumulates the gradients of A and B; the ids have none.
  void backward(const MatRef& dy) {
    if (!valid_)
      detail::fail("LoraEmbedding::backward: no forward_train to go back through (call forward_train first; merge, unmerge "
                   "and set_lora_A/B discard it)");
    if (dy.rows() != Index(ids_.size()) || dy.cols() != dim())
      detail::fail("LoraEmbedding::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(Index(ids_.size()), dim()));
    gB_.noalias() += s_ * (dy.transpose() * g_);
    const Mat dg = s_ * (dy * B_);  // (n, r)
    for (std::size_t i = 0; i < ids_.size(); ++i) gA_.col(Index(ids_[i])) += dg.row(Index(i)).transpose();
    valid_ = false;
  }

  void zero_grad() {
    gA_.setZero();
    gB_.setZero();
  }

  // "lora_embedding_A", "lora_embedding_B" with their gradients.
  std::vector<Parameter<Scalar>> parameters() {
    return {make_parameter("lora_embedding_A", A_, gA_), make_parameter("lora_embedding_B", B_, gB_)};
  }
  Index trainable_parameters() const { return A_.size() + B_.size(); }

  // s·(B·A)ᵀ (vocab, dim): what merge adds to W.
  Mat delta_weight() const { return s_ * (A_.transpose() * B_.transpose()); }

  // W += s·(B·A)ᵀ; no-op when merged. With config.exact_unmerge, W is kept and restored exactly.
  void merge() {
    if (merged_) return;
    if (config_.exact_unmerge) w_saved_ = W_;
    W_.noalias() += delta_weight();
    merged_ = true;
    valid_ = false;
  }

  void unmerge() {
    if (!merged_) return;
    if (config_.exact_unmerge) {
      W_ = w_saved_;
      w_saved_.resize(0, 0);
    } else {
      W_.noalias() -= delta_weight();
    }
    merged_ = false;
    valid_ = false;
  }

 private:
  // W[ids] + s·Aᵀ[ids]·Bᵀ (the lookup alone when merged); every id checked first. keep_g, when
  // given, receives Aᵀ[ids] for backward.
  Mat lookup(const char* fn, const Ids& ids, Mat* keep_g = nullptr) const {
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= vocab())
        detail::fail("LoraEmbedding::", fn, ": id ", ids[i], " at position ", i, " is outside the vocabulary [0, ", vocab(), ")");
    Mat y(static_cast<Index>(ids.size()), dim());
    for (std::size_t i = 0; i < ids.size(); ++i) y.row(Index(i)) = W_.row(Index(ids[i]));
    if (!merged_) {
      Mat g(Index(ids.size()), A_.rows());
      for (std::size_t i = 0; i < ids.size(); ++i) g.row(Index(i)) = A_.col(Index(ids[i])).transpose();
      y.noalias() += s_ * (g * B_.transpose());
      if (keep_g) *keep_g = std::move(g);
    }
    return y;
  }

  void set(const char* fn, Mat& m, const MatRef& v) {
    if (merged_) detail::fail("LoraEmbedding::", fn, ": the layer is merged; unmerge() first");
    if (v.rows() != m.rows() || v.cols() != m.cols())
      detail::fail("LoraEmbedding::", fn, ": got ", detail::shape(v.rows(), v.cols()), ", expected ", detail::shape(m.rows(), m.cols()));
    m = v;
    valid_ = false;
  }

  Mat W_, A_, B_, gA_, gB_, g_, w_saved_;
  LoraConfig config_;
  Scalar s_ = 1;
  Ids ids_;
  bool merged_ = false, valid_ = false;
};

}  // namespace lora
