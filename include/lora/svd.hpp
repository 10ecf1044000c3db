// SVD tools for LoRA.
//
// compress_delta: a full fine-tune compressed into an adapter. ΔW = W_tuned − W_base (out, in)
// has the SVD U·diag(σ)·Vᵀ; its best rank-r approximation (Eckart–Young) is the top r triplets,
// split evenly between the factors so that s·B·A equals it:
//   B = U_r·diag(√σ_r)/√s (out, r),   A = diag(√σ_r)·V_rᵀ/√s (r, in)
// The error left, ‖ΔW − s·B·A‖_F, is the tail √(σ²_{r+1} + …). r is fixed, or the smallest rank
// whose triplets keep a fraction of the energy ‖ΔW‖²_F = Σσ².
//
// pissa_init / olora_init: PEFT's init_lora_weights="pissa" / "olora" for a LoraLinear, which
// move the principal part of W into A and B and leave the residual as the frozen base, so the
// layer's output is unchanged by the init:
//   PiSSA: W = U·diag(σ)·Vᵀ;  A = diag(√(σ_r/s))·V_rᵀ,  B = U_r·diag(√(σ_r/s)),  W ← W − s·B·A
//   OLoRA: W = Q·R (QR);      A = R[:r, :],  B = Q[:, :r],                    W ← W − s·B·A
// The SVD is Eigen's BDCSVD in double; the QR is Householder (column signs may differ from
// LAPACK's, which changes A and B but not the layer's output).
#pragma once

#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/types.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>

namespace lora {

// Exactly one of: a fixed rank, or the fraction of ‖ΔW‖²_F to keep, in (0, 1].
struct RankChoice {
  int rank = 0;
  double energy = 0;
};

template <class Scalar>
struct LowRank {
  Mat<Scalar> A;                    // (r, in)
  Mat<Scalar> B;                    // (out, r)
  int rank = 0;
  double scaling = 1;               // s·B·A is the approximation
  Eigen::VectorXd singular_values;  // every σ of ΔW, descending
  double error = 0;                 // ‖ΔW − s·B·A‖_F, computed
  double tail = 0;                  // √(Σ_{i>r} σ_i²), from the singular values
};

// The smallest r whose top singular values hold a fraction energy of Σσ² (at least 1).
inline int rank_for_energy(const Eigen::VectorXd& sigma, double energy) {
  if (!(energy > 0 && energy <= 1)) detail::fail("rank_for_energy: energy is ", energy, ", expected 0 < energy <= 1");
  const double total = sigma.squaredNorm();
  double kept = 0;
  for (Index i = 0; i < sigma.size(); ++i) {
    kept += sigma(i) * sigma(i);
    if (kept >= energy * total * (1 - 1e-12)) return static_cast<int>(i + 1);
  }
  return static_cast<int>(std::max<Index>(1, sigma.size()));
}

// ΔW = tuned − base (out, in) as an adapter of scaling s (alpha/r of the layer it will go into).
template <class Scalar>
LowRank<Scalar> compress_delta(const MatRef<Scalar>& tuned, const MatRef<Scalar>& base, const RankChoice& choice,
                               double scaling = 1) {
  if (tuned.rows() != base.rows() || tuned.cols() != base.cols())
    detail::fail("compress_delta: the tuned weight is ", detail::shape(tuned.rows(), tuned.cols()), " and the base ",
                 detail::shape(base.rows(), base.cols()), ", expected the same shape");
  if (tuned.size() == 0) detail::fail("compress_delta: the weights are empty");
  if ((choice.rank > 0) == (choice.energy > 0))
    detail::fail("compress_delta: give a rank >= 1 or an energy in (0, 1], not ", choice.rank > 0 ? "both" : "neither",
                 " (rank ", choice.rank, ", energy ", choice.energy, ")");
  if (!(std::isfinite(scaling) && scaling > 0)) detail::fail("compress_delta: scaling is ", scaling, ", expected > 0");
  const Index full = std::min(tuned.rows(), tuned.cols());
  if (choice.rank > full)
    detail::fail("compress_delta: rank ", choice.rank, " exceeds min(out, in) = ", full, " of a ", detail::shape(tuned.rows(), tuned.cols()),
                 " weight");
  const Eigen::MatrixXd delta = tuned.template cast<double>() - base.template cast<double>();
  if (!delta.allFinite()) detail::fail("compress_delta: the weights have non-finite values");
  Eigen::BDCSVD<Eigen::MatrixXd> svd(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
  LowRank<Scalar> out;
  out.singular_values = svd.singularValues();
  out.rank = choice.rank > 0 ? choice.rank : rank_for_energy(out.singular_values, choice.energy);
  out.scaling = scaling;
  const Index r = out.rank;
  const Eigen::VectorXd root = (out.singular_values.head(r) / scaling).cwiseSqrt();
  const Eigen::MatrixXd B = svd.matrixU().leftCols(r) * root.asDiagonal();
  const Eigen::MatrixXd A = root.asDiagonal() * svd.matrixV().leftCols(r).transpose();
  out.B = B.cast<Scalar>();
  out.A = A.cast<Scalar>();
  out.error = (delta - scaling * out.B.template cast<double>() * out.A.template cast<double>()).norm();
  out.tail = out.singular_values.tail(out.singular_values.size() - r).norm();
  return out;
}

namespace detail {

// W as (out, in) in double, whatever the layer's storage.
template <class Scalar>
Eigen::MatrixXd logical_weight(const LoraLinear<Scalar>& layer) {
  const Eigen::MatrixXd w = layer.weight().template cast<double>();
  return layer.fan_in_fan_out() ? Eigen::MatrixXd(w.transpose()) : w;
}

// Sets A, B and W − s·B·A in the layer's storage, after every check passed.
template <class Scalar>
void move_into_adapter(LoraLinear<Scalar>& layer, const char* fn, const Eigen::MatrixXd& W, const Eigen::MatrixXd& A,
                       const Eigen::MatrixXd& B) {
  const Mat<Scalar> a = A.cast<Scalar>(), b = B.cast<Scalar>();
  const Eigen::MatrixXd residual = W - double(layer.scaling()) * b.template cast<double>() * a.template cast<double>();
  const Mat<Scalar> stored = layer.fan_in_fan_out() ? Mat<Scalar>(residual.transpose().cast<Scalar>()) : Mat<Scalar>(residual.cast<Scalar>());
  if (!stored.allFinite() || !a.allFinite() || !b.allFinite()) detail::fail(fn, ": W has non-finite values; nothing changed");
  layer.set_weight(stored);  // refuses (changing nothing) when merged or read-only
  layer.set_lora_A(a);
  layer.set_lora_B(b);
}

template <class Scalar>
void check_init(const LoraLinear<Scalar>& layer, const char* fn) {
  if (layer.is_merged()) detail::fail(fn, ": the layer is merged; unmerge() first");
  if (layer.rank() > std::min(layer.in_features(), layer.out_features()))
    detail::fail(fn, ": r = ", layer.rank(), " exceeds min(out, in) = ", std::min(layer.in_features(), layer.out_features()));
}

}  // namespace detail

// PEFT's init_lora_weights="pissa" (exact SVD).
template <class Scalar>
void pissa_init(LoraLinear<Scalar>& layer) {
  detail::check_init(layer, "pissa_init");
  const Eigen::MatrixXd W = detail::logical_weight(layer);
  Eigen::BDCSVD<Eigen::MatrixXd> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Index r = layer.rank();
  const Eigen::VectorXd root = (svd.singularValues().head(r) / double(layer.scaling())).cwiseSqrt();
  detail::move_into_adapter(layer, "pissa_init", W, root.asDiagonal() * svd.matrixV().leftCols(r).transpose(),
                            svd.matrixU().leftCols(r) * root.asDiagonal());
}

// PEFT's init_lora_weights="olora".
template <class Scalar>
void olora_init(LoraLinear<Scalar>& layer) {
  detail::check_init(layer, "olora_init");
  const Eigen::MatrixXd W = detail::logical_weight(layer);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(W);
  const Index r = layer.rank(), k = std::min(W.rows(), W.cols());
  const Eigen::MatrixXd Q = qr.householderQ() * Eigen::MatrixXd::Identity(W.rows(), k);
  const Eigen::MatrixXd R = qr.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
  detail::move_into_adapter(layer, "olora_init", W, R.topRows(r), Q.leftCols(r));
}

}  // namespace lora
