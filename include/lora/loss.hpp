// Losses with their gradients, mean reduction (PyTorch's defaults).
//
//   cross_entropy  logits (n, classes), labels (n) in [0, classes):
//     p = softmax(logits) by rows (max-subtracted), q = (1−ε)·onehot(label) + ε/classes
//     loss = −(1/n) Σ_i Σ_c q_ic·log p_ic        d logits = (p − q)/n
//   causal_lm_loss logits (batch·T, vocab), labels (batch, T): position t predicts labels(b, t+1)
//     (shifted inside, as transformers' ForCausalLM), labels −100 are ignored, mean over the N
//     counted positions: loss = −(1/N) Σ log p_{label}    d logits = (p − onehot)/N there, 0 elsewhere
//   mse            y, target (n, m):   loss = mean((y − target)²)   d y = 2·(y − target)/(n·m)
#pragma once

#include <lora/error.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace lora {

template <class Scalar>
struct LossResult {
  Scalar loss;
  Mat<Scalar> grad;  // d loss / d input, the input's shape
  Index count = 0;   // what the mean is over: rows, counted positions, or elements
};

// Softmax cross-entropy (torch.nn.functional.cross_entropy with label_smoothing).
template <class Scalar>
LossResult<Scalar> cross_entropy(const MatRef<Scalar>& logits, const std::vector<std::int64_t>& labels,
                                 double label_smoothing = 0) {
  const Index n = logits.rows(), k = logits.cols();
  if (static_cast<Index>(labels.size()) != n)
    detail::fail("cross_entropy: logits are ", detail::shape(n, k), " but there are ", labels.size(), " labels");
  if (!(label_smoothing >= 0 && label_smoothing <= 1))
    detail::fail("cross_entropy: label_smoothing is ", label_smoothing, ", expected 0 <= ε <= 1");
  if (n == 0 || k == 0) detail::fail("cross_entropy: logits are ", detail::shape(n, k), ", expected at least one row and class");
  for (Index i = 0; i < n; ++i)
    if (labels[i] < 0 || labels[i] >= k)
      detail::fail("cross_entropy: label ", labels[i], " of row ", i, " is outside [0, ", k, ")");
  LossResult<Scalar> r{0, Mat<Scalar>(n, k), n};
  const Scalar eps = static_cast<Scalar>(label_smoothing);
  double total = 0;
  for (Index i = 0; i < n; ++i) {
    const Scalar m = logits.row(i).maxCoeff();
    auto p = r.grad.row(i);
    p = (logits.row(i).array() - m).exp();
    const Scalar z = p.sum();
    const Scalar log_z = std::log(z) + m;  // log Σ exp(logits)
    p /= z;
    // −Σ_c q_c·log p_c with log p_c = logits_c − log_z
    const Scalar nll = log_z - logits(i, labels[i]);
    const Scalar smooth = log_z - logits.row(i).mean();
    total += static_cast<double>((1 - eps) * nll + eps * smooth);
    p.array() -= eps / Scalar(k);
    p(labels[i]) -= 1 - eps;
  }
  r.grad /= Scalar(n);
  r.loss = static_cast<Scalar>(total / double(n));
  return r;
}

template <class Scalar>
LossResult<Scalar> causal_lm_loss(const MatRef<Scalar>& logits, const Mat<std::int64_t>& labels) {
  const Index batch = labels.rows(), T = labels.cols(), vocab = logits.cols();
  if (logits.rows() != batch * T)
    detail::fail("causal_lm_loss: logits have ", logits.rows(), " rows, labels ", detail::shape(batch, T), " need ", batch * T);
  Index counted = 0;
  for (Index b = 0; b < batch; ++b)
    for (Index t = 1; t < T; ++t) {
      const std::int64_t y = labels(b, t);
      if (y == -100) continue;
      if (y < 0 || y >= vocab) detail::fail("causal_lm_loss: labels(", b, ", ", t, ") is ", y, ", outside [0, ", vocab, ") and not -100");
      ++counted;
    }
  if (counted == 0) detail::fail("causal_lm_loss: every label after the first position is -100; nothing to predict");
  LossResult<Scalar> r{0, Mat<Scalar>::Zero(logits.rows(), vocab), counted};
  double total = 0;
  for (Index b = 0; b < batch; ++b)
    for (Index t = 0; t + 1 < T; ++t) {
      const std::int64_t y = labels(b, t + 1);
      if (y == -100) continue;
      const Index i = b * T + t;
      const Scalar m = logits.row(i).maxCoeff();
      auto p = r.grad.row(i);
      p = (logits.row(i).array() - m).exp();
      const Scalar z = p.sum();
      total += double(std::log(z) + m - logits(i, y));
      p /= z * Scalar(counted);
      p(y) -= Scalar(1) / Scalar(counted);
    }
  r.loss = static_cast<Scalar>(total / double(counted));
  return r;
}

template <class Scalar>
LossResult<Scalar> mse(const MatRef<Scalar>& y, const MatRef<Scalar>& target) {
  if (y.rows() != target.rows() || y.cols() != target.cols())
    detail::fail("mse: y is ", detail::shape(y.rows(), y.cols()), " but target is ",
                 detail::shape(target.rows(), target.cols()));
  if (y.size() == 0) detail::fail("mse: y is empty");
  LossResult<Scalar> r{0, y - target, y.size()};
  r.loss = r.grad.squaredNorm() / Scalar(y.size());
  r.grad *= Scalar(2) / Scalar(y.size());
  return r;
}

}  // namespace lora
