// Frozen weights kept in bf16 in memory (half of f32; real checkpoints ship in bf16, so nothing
// is rounded), with every product computed in Scalar: W is widened a panel at a time into a
// per-thread buffer, so no full-size float copy of W ever exists.
//
//   times_transposed:  y = x·Wᵀ   x (n, k), W (m, k) -> y (n, m)   y[:, P] = x·W[P, :]ᵀ   (P: rows of W)
//   times:             y = x·W    x (n, m), W (m, k) -> y (n, k)   y[:, P] = x·W[:, P]    (P: columns of W)
//
// Each panel fills its own columns of y, so panels run in parallel (OpenMP, each GEMM on one
// thread, the widening too). A panel holds ~256 KiB of Scalar for a few rows of x (decoding: the
// product is memory-bound and reads half the bytes), ~1 MiB for many (training: larger GEMMs).
// A linear layer's forward is times_transposed (times when stored (in, out), as GPT-2's Conv1D),
// its backward dx the other one; the gradient of a frozen W is never formed. Widening bf16 is
// exact (its bits are a float's top half), so a product differs from the one with the same bf16
// W widened on load only in the order of its sums (rounding).
#pragma once

#include <lora/detail/few_rows.hpp>
#include <lora/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lora {

using Bf16Mat = Mat<Eigen::bfloat16>;

// How a model loaded from a checkpoint keeps its frozen weights: widened to Scalar, or in bf16
// (every linear that neither takes LoRA nor trains, and the embeddings; norms stay in Scalar).
enum class FrozenWeights { widened, bf16 };

namespace detail {

template <class Scalar>
Scalar widen(Eigen::bfloat16 v) {
  const std::uint32_t bits = std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(v)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return Scalar(f);
}

// W[r0 : r0 + rows, c0 : c0 + cols] as Scalar into out (rows·cols values, row-major).
template <class Scalar>
void widen_block(const Bf16Mat& w, Index r0, Index c0, Index rows, Index cols, Scalar* out) {
  for (Index i = 0; i < rows; ++i) {
    const Eigen::bfloat16* src = w.data() + (r0 + i) * w.cols() + c0;
    Scalar* dst = out + i * cols;
    for (Index j = 0; j < cols; ++j) dst[j] = widen<Scalar>(src[j]);
  }
}

// f(p0, panel) for panels of W's rows (by_rows) or columns, each [p0, p0 + p) widened into a
// per-thread buffer that only grows (no allocation per call); in parallel when the product is
// large enough.
template <class Scalar, class F>
void for_each_panel(const Bf16Mat& w, bool by_rows, Index n, F f) {
  const Index length = by_rows ? w.rows() : w.cols(), across = by_rows ? w.cols() : w.rows();
  const Index bytes = n < 32 ? Index(256) << 10 : Index(1) << 20;
  const Index step = std::min<Index>(length, std::max<Index>(16, bytes / Index(sizeof(Scalar)) / std::max<Index>(1, across)));
  const Index panels = (length + step - 1) / step;
  detail::parallel_for(panels, panels > 1 && double(n) * double(w.size()) >= double(1 << 18), [&](Index k) {
    thread_local std::vector<Scalar> buffer;
    const Index p0 = k * step, p = std::min(step, length - p0);
    if (buffer.size() < std::size_t(p * across)) buffer.resize(std::size_t(p * across));
    const Index rows = by_rows ? p : w.rows(), cols = by_rows ? w.cols() : p;
    widen_block(w, by_rows ? p0 : 0, by_rows ? 0 : p0, rows, cols, buffer.data());
    f(p0, ConstMatMap<Scalar>(buffer.data(), rows, cols));
  });
}

}  // namespace detail

// y = x·Wᵀ: x (n, k), W (m, k) -> y (n, m).
template <class Scalar>
void times_transposed(const MatRef<Scalar>& x, const Bf16Mat& w, Mat<Scalar>& y) {
  y.resize(x.rows(), w.rows());
  detail::for_each_panel<Scalar>(w, true, x.rows(), [&](Index p0, const ConstMatMap<Scalar>& panel) {
    y.middleCols(p0, panel.rows()).noalias() = x * panel.transpose();
  });
}

// y = x·W: x (n, m), W (m, k) -> y (n, k).
template <class Scalar>
void times(const MatRef<Scalar>& x, const Bf16Mat& w, Mat<Scalar>& y) {
  y.resize(x.rows(), w.cols());
  detail::for_each_panel<Scalar>(w, false, x.rows(), [&](Index p0, const ConstMatMap<Scalar>& panel) {
    y.middleCols(p0, panel.cols()).noalias() = x * panel;
  });
}

// A frozen W held in Scalar (w) or in bf16 (w16, the other empty): the products above from
// whichever holds it, and the moves between the two (Projection and EmbeddingWeights use these).
template <class Scalar>
void to_bf16(Mat<Scalar>& w, Bf16Mat& w16) {
  w16 = w.template cast<Eigen::bfloat16>();
  w.resize(0, 0);
}
template <class Scalar>
void widen_back(Bf16Mat& w16, Mat<Scalar>& w) {
  if (!w16.size()) return;
  w = w16.template cast<Scalar>();
  w16.resize(0, 0);
}
// y = x·Wᵀ.
template <class Scalar>
void times_transposed(const MatRef<Scalar>& x, const Mat<Scalar>& w, const Bf16Mat& w16, Mat<Scalar>& y) {
  if (w16.size()) return times_transposed(x, w16, y);
  if (detail::few_rows<Scalar>(y, Scalar(1), x, w, Scalar(0))) return;  // decoding: W read in place
  y.resize(x.rows(), w.rows());
  y.noalias() = x * w.transpose();
}
// y = x·W.
template <class Scalar>
void times(const MatRef<Scalar>& x, const Mat<Scalar>& w, const Bf16Mat& w16, Mat<Scalar>& y) {
  if (w16.size()) return times(x, w16, y);
  y.resize(x.rows(), w.cols());
  y.noalias() = x * w;
}

// Row i of W as Scalar into dst (an embedding lookup).
template <class Scalar, class Row>
void widen_row(const Bf16Mat& w, Index i, Row&& dst) {
  for (Index j = 0; j < w.cols(); ++j) dst(j) = detail::widen<Scalar>(w(i, j));
}

}  // namespace lora
