// LoraLinear layers that read the same input x (self-attention's q, k, v; cross-attention's k
// and v): their t = x·Aᵀ in one thin product over x instead of one per layer, then each layer's
// own rest of forward(x, y):
//
//   T = x·[A_1; …; A_m]ᵀ  (n, R)         R = Σ r_i, padded to a width the thin kernel holds
//                                        (thin_products.hpp's rank_cols_stacked)
//   y_i = b_i + s_i·T_i·B_iᵀ + x·W_iᵀ     T_i = T's r_i columns of layer i: forward(x, y_i)'s sums
//
// A layer takes part when its forward would compute exactly that: enabled, one active adapter,
// unmerged, not DoRA, and x of at least kThinRows rows. The others run their own forward, and so
// do all of them when fewer than two take part or Σ r_i is wider than stacked_width allows (two
// packets: 32 floats with AVX-512). Evaluation only: training keeps each layer's t for backward,
// and dropout gives each its own drop(x).
// Measured on bench_attention's layer (4 × 128 tokens, d 512, q, k, v, o targeted, float,
// AVX-512, OpenBLAS SkylakeX) against the layers apart, both built into one process and called in
// alternation; (apart − shared) / merged forward, paired medians of 31 to 101 rounds, per run:
// r 8 (24 columns in the 32-wide kernel) one thread 0.005, 0.010, 0.016, 0.001; two threads 0.003,
// −0.007, −0.012, 0.006, which is this measure's noise (r 16, the same code on both sides: −0.006,
// 0.004); two threads with OMP_WAIT_POLICY=passive 0.024, 0.034 (one parallel region where there
// were three); r 4 (12 columns in the 16-wide kernel; 4 alone goes to the general product) 0.018
// on one thread, 0.027 on two. Outputs: equal bit for bit at r 8; at r 4, 7e-7 apart (|y| ≤ 3.7).
#pragma once

#include <lora/linear.hpp>

namespace lora::detail {

template <class Scalar>
struct SharedInput {
  using Layer = LoraLinear<Scalar>;
  using Adapter = typename Layer::Adapter;
  static constexpr int kMaxLayers = 4;

  // The adapter layer l's forward applies alone, through the thin kernels, to n rows (its one
  // active adapter, on forward's LoRA-first path); or nullptr.
  static const Adapter* plain(const Layer& l, Index n) {
    const auto& active = l.reg_.active();
    if (n < kThinRows || active.size() != 1 || !l.lora_first(n, active)) return nullptr;
    return &l.adapter(active[0]);
  }

  // *ys[i] = layers[i]->forward(x) for i < m, y's resized only when their shapes differ.
  static void forward(const MatRef<Scalar>& x, const Layer* const* layers, Mat<Scalar>* const* ys, int m) {
    if (m > kMaxLayers) fail("SharedInput::forward: ", m, " layers, at most ", kMaxLayers);
    const Adapter* a[kMaxLayers] = {};
    const Mat<Scalar>* A[kMaxLayers];
    int k = 0;
    Index rows = 0;
    for (int i = 0; i < m; ++i) {
      layers[i]->check_input("forward", x);
      Layer::check_no_alias("forward", "Y", *ys[i], "X", x);
      if ((a[i] = plain(*layers[i], x.rows()))) {
        A[k++] = &a[i]->A;
        rows += a[i]->A.rows();
      }
    }
    if (k < 2 || stacked_width<Scalar>(rows) == 0) {
      for (int i = 0; i < m; ++i) layers[i]->forward(x, *ys[i]);
      return;
    }
    thread_local Mat<Scalar> t;
    rank_cols_stacked<Scalar>(t, x, A, k);
    for (Index i = 0, o = 0; i < m; ++i) {
      const Layer& l = *layers[i];
      Mat<Scalar>& y = *ys[i];
      if (!a[i]) {
        l.forward(x, y);
        continue;
      }
      const Index r = a[i]->A.rows();
      y.resize(x.rows(), l.out_);
      rank_update_t<Scalar>(y, a[i]->s, t.middleCols(o, r), a[i]->B, false, l.has_bias_ ? l.bias_.data() : nullptr);
      l.base(x, y, true);
      o += r;
    }
  }
};

}  // namespace lora::detail
