// What the causal language models (llama.hpp, gpt2.hpp) are built from, forward only here:
//
//   Checkpoint   model.safetensors, each tensor checked against the shape config.json implies
//   Projection   a linear layer: frozen W (and b), or a LoraLinear when a PeftConfig targets its
//                module path (registered in the model's ModuleMap under that path)
//                  y = x·Wᵀ + b, or y = x·W + b for GPT-2's Conv1D (W stored (in, out))
//   causal_attention   per sequence b and head h (kv head h / (heads / kv_heads)):
//                  P = softmax(Q_bh·K_bkvᵀ/√dh, keys j > i and padded keys hidden), O_bh = P·V_bkv
//                  q (batch·T, heads·dh), k, v (batch·T, kv_heads·dh) -> o (batch·T, heads·dh)
//                  A query whose keys are all hidden gets a zero output.
//   rms_norm     y = x / sqrt(mean(x²) + eps) ⊙ γ per row (Llama)
//   layer_norm   y = (x − μ) / sqrt(var + eps) ⊙ γ + β per row, biased variance (GPT-2)
#pragma once

#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/module_map.hpp>
#include <lora/peft_config.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& path) : st_(SafeTensors::open(path)) {}

  Mat<Scalar> matrix(const std::string& name, Index rows, Index cols) const {
    check(name, {std::uint64_t(rows), std::uint64_t(cols)});
    return st_.matrix<Scalar>(name);
  }
  Vec<Scalar> vector(const std::string& name, Index n) const {
    check(name, {std::uint64_t(n)});
    return st_.vector<Scalar>(name);
  }
  const SafeTensors& file() const { return st_; }

 private:
  void check(const std::string& name, const std::vector<std::uint64_t>& shape) const {
    if (!st_.contains(name)) detail::fail(st_.source(), ": tensor '", name, "' is missing");
    const TensorInfo& t = st_.info(name);
    if (t.shape != shape)
      detail::fail(st_.source(), ": tensor '", name, "' is ", shape_string(t.shape), ", config.json implies ", shape_string(shape));
    if (!detail::is_float_dtype(t.dtype)) detail::fail(st_.source(), ": tensor '", name, "' has dtype ", dtype_name(t.dtype));
  }

  SafeTensors st_;
};

template <class Scalar>
struct Projection {
  std::unique_ptr<LoraLinear<Scalar>> lora;
  Mat<Scalar> w;  // (out, in), or (in, out) with fan_in_fan_out; empty when lora is set
  Vec<Scalar> b;
  bool fan_in_fan_out = false;

  void forward(const MatRef<Scalar>& x, Mat<Scalar>& y) const {
    if (lora) return lora->forward(x, y);
    y.resize(x.rows(), fan_in_fan_out ? w.cols() : w.rows());
    if (fan_in_fan_out)
      y.noalias() = x * w;
    else
      y.noalias() = x * w.transpose();
    if (b.size()) y.rowwise() += b.transpose();
  }
};

// The linear layer at module path `path` (tensors path.weight, path.bias): out × in, stored
// (in, out) when fan_in_fan_out. A LoraLinear when lora targets path (r, alpha, ... for path from
// lora; the rest from base), added to modules.
template <class Scalar>
Projection<Scalar> load_projection(const Checkpoint<Scalar>& ckpt, const std::string& path, Index out, Index in, bool bias,
                                   bool fan_in_fan_out, const PeftConfig* lora, LoraConfig base, ModuleMap<Scalar>& modules) {
  Projection<Scalar> p;
  p.fan_in_fan_out = fan_in_fan_out;
  p.w = fan_in_fan_out ? ckpt.matrix(path + ".weight", in, out) : ckpt.matrix(path + ".weight", out, in);
  if (bias) p.b = ckpt.vector(path + ".bias", out);
  if (lora && lora->targets(path)) {
    base.fan_in_fan_out = fan_in_fan_out;
    std::optional<Vec<Scalar>> b;
    if (bias) b = std::move(p.b);
    p.lora = std::make_unique<LoraLinear<Scalar>>(std::move(p.w), std::move(b), lora->lora_config(path, base));
    p.w.resize(0, 0);
    p.b.resize(0);
    modules.add(path, *p.lora);
  }
  return p;
}

template <class Scalar>
void causal_attention(const Mat<Scalar>& q, const Mat<Scalar>& k, const Mat<Scalar>& v, Index batch, Index T, int heads,
                      int kv_heads, Index dh, const Mat<std::int64_t>& mask, Mat<Scalar>& o) {
  const int group = heads / kv_heads;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  const Scalar hidden = -std::numeric_limits<Scalar>::infinity();
  o.resize(q.rows(), q.cols());
  Mat<Scalar> s(T, T);
  for (Index b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h) {
      const Index kv = h / group;
      s.noalias() = q.block(b * T, h * dh, T, dh) * k.block(b * T, kv * dh, T, dh).transpose() * scale;
      for (Index i = 0; i < T; ++i) {
        Scalar mx = hidden;
        for (Index j = 0; j < T; ++j) {
          if (j > i || (mask.size() && mask(b, j) == 0)) s(i, j) = hidden;
          mx = std::max(mx, s(i, j));
        }
        if (mx == hidden) {
          s.row(i).setZero();
          continue;
        }
        s.row(i) = (s.row(i).array() - mx).exp().matrix();
        s.row(i) /= s.row(i).sum();
      }
      o.block(b * T, h * dh, T, dh).noalias() = s * v.block(b * T, kv * dh, T, dh);
    }
}

template <class Scalar>
void rms_norm(const Mat<Scalar>& x, const Vec<Scalar>& gamma, double eps, Mat<Scalar>& y) {
  y.resize(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const Scalar inv = Scalar(1) / std::sqrt(x.row(i).squaredNorm() / Scalar(x.cols()) + Scalar(eps));
    y.row(i) = (x.row(i) * inv).cwiseProduct(gamma.transpose());
  }
}

template <class Scalar>
void layer_norm(const Mat<Scalar>& x, const Vec<Scalar>& gamma, const Vec<Scalar>& beta, double eps, Mat<Scalar>& y) {
  y.resize(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const Scalar mean = x.row(i).mean();
    const Scalar var = (x.row(i).array() - mean).square().mean();
    y.row(i) = ((x.row(i).array() - mean) / std::sqrt(var + Scalar(eps))).matrix().cwiseProduct(gamma.transpose()) + beta.transpose();
  }
}

// ids (batch, T) in [0, vocab), T <= max_positions; attention_mask empty or (batch, T).
inline void check_token_ids(const char* fn, const Mat<std::int64_t>& ids, const Mat<std::int64_t>& mask, int vocab, int max_positions) {
  if (ids.rows() < 1 || ids.cols() < 1)
    detail::fail(fn, ": ids is ", detail::shape(ids.rows(), ids.cols()), ", expected (batch, T) with both >= 1");
  if (ids.cols() > max_positions)
    detail::fail(fn, ": sequences of ", ids.cols(), " tokens, longer than max_position_embeddings ", max_positions);
  for (Index b = 0; b < ids.rows(); ++b)
    for (Index t = 0; t < ids.cols(); ++t)
      if (ids(b, t) < 0 || ids(b, t) >= vocab)
        detail::fail(fn, ": ids(", b, ", ", t, ") is ", ids(b, t), ", outside the vocabulary [0, ", vocab, ")");
  if (mask.size() && (mask.rows() != ids.rows() || mask.cols() != ids.cols()))
    detail::fail(fn, ": attention_mask is ", detail::shape(mask.rows(), mask.cols()), ", expected ", detail::shape(ids.rows(), ids.cols()));
}

}  // namespace lora
