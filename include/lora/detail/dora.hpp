// The parts of DoRA's math (PEFT's use_dora) that act on a whole weight or output, for
// LoraLinear. W is as stored: (out, in), or (in, out) with fan_in_fan_out.
#pragma once

#include <lora/types.hpp>

namespace lora::detail {

// ‖W + s·B·A‖ per output row, as ‖w‖² + 2s·w·(Aᵀb) + s²·bᵀ(A·Aᵀ)b, so no (out, in) matrix is
// formed.   A (r, in), B (out, r) -> (out)
template <class Scalar>
Vec<Scalar> dora_norm(const ConstMatMap<Scalar>& W, bool fan_in_fan_out, const Mat<Scalar>& A, const Mat<Scalar>& B, Scalar s) {
  using M = Mat<Scalar>;
  using V = Vec<Scalar>;
  const M wa = fan_in_fan_out ? M((A * W).transpose()) : M(W * A.transpose());  // (out, r)
  const M aat = A * A.transpose();
  const V w2 = fan_in_fan_out ? V(W.colwise().squaredNorm().transpose()) : V(W.rowwise().squaredNorm());
  const V cross = (wa.array() * B.array()).rowwise().sum();
  const V quad = ((B * aat).array() * B.array()).rowwise().sum();
  return (w2 + Scalar(2) * s * cross + s * s * quad).cwiseMax(Scalar(0)).cwiseSqrt();
}

// Row j of the logical (out, in) W times f(j): rows of W, or columns when stored (in, out).
template <class Scalar>
void scale_outputs(MatMap<Scalar> w, bool fan_in_fan_out, const Vec<Scalar>& f) {
  if (fan_in_fan_out)
    w.array().rowwise() *= f.transpose().array();
  else
    w.array().colwise() *= f.array();
}

// y ← b + c ⊙ (y − b), column j of y (n, out) scaled by c(j); bias may be null.
template <class Scalar>
void rescale_outputs(Mat<Scalar>& y, const Vec<Scalar>* bias, const Vec<Scalar>& c) {
  if (bias) y.rowwise() -= bias->transpose();
  y.array().rowwise() *= c.transpose().array();
  if (bias) y.rowwise() += bias->transpose();
}

}  // namespace lora::detail
