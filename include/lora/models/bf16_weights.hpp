// Frozen weights kept in bf16 in memory (half of f32; real checkpoints ship in bf16, so nothing
// is rounded), with every product computed in Scalar: W is widened a panel of rows at a time into
// a per-thread buffer of ~256 KiB, so no full-size float copy of W ever exists.
//
//   times_transposed:  y = x·Wᵀ   x (n, k), W (m, k) -> y (n, m)   y[:, panel] = x·panelᵀ
//   times:             y = x·W    x (n, m), W (m, k) -> y (n, k)   y += x[:, panel]·panel
//
// A linear layer's forward is times_transposed (times when stored (in, out), as GPT-2's Conv1D),
// its backward dx the other one; the gradient of a frozen W is never formed. Widening bf16 is
// exact (its bits are a float's top half), so a product differs from the one with the same bf16
// W widened on load only in the order of its sums (rounding).
#pragma once

#include <lora/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lora {

using Bf16Mat = Mat<Eigen::bfloat16>;

// How a model loaded from a checkpoint keeps its frozen weights: widened to Scalar, or in bf16
// (every linear that neither takes LoRA nor trains, and the embeddings; norms stay in Scalar).
enum class FrozenWeights { widened, bf16 };

namespace detail {

// Rows [r0, r0 + p) of w as Scalar: out (p, w.cols()).
template <class Scalar>
void widen_rows(const Bf16Mat& w, Index r0, Index p, Mat<Scalar>& out) {
  out.resize(p, w.cols());
  const Eigen::bfloat16* src = w.data() + r0 * w.cols();
  Scalar* dst = out.data();
  const Index n = p * w.cols();
  for (Index i = 0; i < n; ++i) {
    const std::uint32_t bits = std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(src[i])) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    dst[i] = Scalar(f);
  }
}

// Rows per panel: ~256 KiB of Scalar, at least 16.
template <class Scalar>
Index panel_rows(const Bf16Mat& w) {
  const Index bytes = Index(256) * 1024;
  return std::min<Index>(w.rows(), std::max<Index>(16, bytes / Index(sizeof(Scalar)) / std::max<Index>(1, w.cols())));
}

// f(r0, panel) for each panel of W's rows [r0, r0 + panel.rows()), widened into a per-thread buffer.
template <class Scalar, class F>
void for_each_panel(const Bf16Mat& w, F f) {
  thread_local Mat<Scalar> panel;
  const Index step = panel_rows<Scalar>(w);
  for (Index r0 = 0; r0 < w.rows(); r0 += step) {
    widen_rows(w, r0, std::min(step, w.rows() - r0), panel);
    f(r0, panel);
  }
}

}  // namespace detail

// y = x·Wᵀ: x (n, k), W (m, k) -> y (n, m).
template <class Scalar>
void times_transposed(const MatRef<Scalar>& x, const Bf16Mat& w, Mat<Scalar>& y) {
  y.resize(x.rows(), w.rows());
  detail::for_each_panel<Scalar>(w, [&](Index r0, const Mat<Scalar>& panel) {
    y.middleCols(r0, panel.rows()).noalias() = x * panel.transpose();
  });
}

// y = x·W: x (n, m), W (m, k) -> y (n, k).
template <class Scalar>
void times(const MatRef<Scalar>& x, const Bf16Mat& w, Mat<Scalar>& y) {
  y.setZero(x.rows(), w.cols());
  detail::for_each_panel<Scalar>(w, [&](Index r0, const Mat<Scalar>& panel) {
    y.noalias() += x.middleCols(r0, panel.rows()) * panel;
  });
}

// Row i of W as Scalar into dst (an embedding lookup).
template <class Scalar, class Row>
void widen_row(const Bf16Mat& w, Index i, Row&& dst) {
  for (Index j = 0; j < w.cols(); ++j) dst(j) = Scalar(static_cast<float>(w(i, j)));
}

}  // namespace lora
