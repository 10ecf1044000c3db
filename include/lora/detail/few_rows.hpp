// Products with few rows, as in decoding (one row per sequence): C = β·C + α·X·Wᵀ with W read in
// place, each row of W once.
//
//   few_rows:  C (n, M) = β·C + α·X (n, K)·Wᵀ      W (M, K) row-major, n ≤ kFewRows
//
//   base       y = x·Wᵀ (+ b)         W (out, in)
//   LoRA       t = x·Aᵀ, y += s·t·Bᵀ   A (r, in), B (out, r)
//
// A GEMM packs W into panels before its kernel runs; with 8 rows that copy is most of the
// time (decoding a d 1024 Llama in OpenBLAS: 52 % in its packing of W, where W comes from
// memory). Here each C(i, o) is a dot product of X's row i and W's row o, both contiguous: a tile
// of WR rows of W and XR rows of X (WR·XR = 8 accumulators) keeps W's rows in registers or L1
// while X's (n·K, small) stay in L1; W's rows in blocks of 8, X's rows in groups of 4, 2, 1 inside
// a block, so W comes from memory once. A tile of 2 or 4 rows of W prefetches the next tile's
// rows as it goes: two rows read at a time are too few streams for the hardware's prefetchers
// (8 rows, 16384 x 1024 W from memory, one thread: 8.0-9.5 ms with the prefetch, 11.7-14.6
// without, OpenBLAS's sgemm 20.6; one row of X, 8 rows of W at a time: 4.2-4.7 ms, sgemm 6.6).
// The sums reduce horizontally at the end of each dot product. Dot products of at most 2
// packets (LoRA's y += s·t·Bᵀ, K = r) would be mostly horizontal sums: there a square block of W
// (Q rows by Q columns, Q the packet that divides K: 8 floats for r 8 on AVX-512) is loaded and
// transposed in registers, and C's packets accumulate X(i, k)·Wᵀ(k, ·) from it — no copy of W,
// so one row of X (a mixed batch: one row per adapter) costs what its products cost (one row,
// 8 → 344, r 8, AVX-512: 0.35 µs, against 1.43 µs copying Wᵀ first). Other K copy Wᵀ (K·M) and
// accumulate from the copy. Large products split W's rows over the threads when no parallel
// region is open.
#pragma once

#include <lora/detail/thin_products.hpp>
#include <lora/types.hpp>

#include <type_traits>
#include <vector>

namespace lora::detail {

constexpr Index kFewRows = 8;  // products with at most this many rows go to few_rows

namespace few {

namespace ei = Eigen::internal;

// C rows [0, XR), columns [o, o + WR): the dot products of XR rows of X with WR rows of W.
template <class S, int WR, int XR>
void tile(Index K, S alpha, const S* X, Index ldx, const S* W, Index ldw, S beta, S* C, Index ldc) {
  using P = typename ei::packet_traits<S>::type;
  constexpr int PS = ei::packet_traits<S>::size;
  P acc[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) acc[i][j] = ei::pset1<P>(S(0));
  Index k = 0;
  for (; k + PS <= K; k += PS) {
    if constexpr (XR == 1) {  // each W packet used once: loaded into the multiply-add
      const P x = ei::ploadu<P>(X + k);
      for (int j = 0; j < WR; ++j) acc[0][j] = ei::pmadd(x, ei::ploadu<P>(W + j * ldw + k), acc[0][j]);
    } else {  // W's rows come from memory while X's are in L1: prefetch the next tile's rows
      for (int j = 0; j < WR; ++j) __builtin_prefetch(W + (j + WR) * ldw + k);
      P w[WR];
      for (int j = 0; j < WR; ++j) w[j] = ei::ploadu<P>(W + j * ldw + k);
      for (int i = 0; i < XR; ++i) {
        const P x = ei::ploadu<P>(X + i * ldx + k);
        for (int j = 0; j < WR; ++j) acc[i][j] = ei::pmadd(x, w[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) {
      S v = ei::predux(acc[i][j]);
      for (Index kk = k; kk < K; ++kk) v += X[i * ldx + kk] * W[j * ldw + kk];
      S& c = C[i * ldc + j];
      c = beta == S(0) ? alpha * v : beta * c + alpha * v;
    }
}

// Columns [o0, o1) of C for all n rows.
template <class S>
void columns(Index o0, Index o1, Index n, Index K, S alpha, const S* X, Index ldx, const S* W, Index ldw, S beta, S* C, Index ldc) {
  for (Index o = o0; o < o1; o += 8) {
    const Index ob = std::min<Index>(8, o1 - o);
    const S* w = W + o * ldw;
    Index i = 0;
    const auto rows = [&](auto wr, auto xr) {  // rows [i, i + xr) against W's rows [o, o + ob)
      constexpr int WR = decltype(wr)::value, XR = decltype(xr)::value;
      Index j = 0;
      for (; j + WR <= ob; j += WR) tile<S, WR, XR>(K, alpha, X + i * ldx, ldx, w + j * ldw, ldw, beta, C + i * ldc + o + j, ldc);
      for (; j < ob; ++j) tile<S, 1, XR>(K, alpha, X + i * ldx, ldx, w + j * ldw, ldw, beta, C + i * ldc + o + j, ldc);
      i += XR;
    };
    using std::integral_constant;
    while (i + 4 <= n) rows(integral_constant<int, 2>(), integral_constant<int, 4>());
    if (i + 2 <= n) rows(integral_constant<int, 4>(), integral_constant<int, 2>());
    if (i < n) rows(integral_constant<int, 8>(), integral_constant<int, 1>());
  }
}

// One column of C, one scalar at a time (the columns after the last whole packet): C(i, 0) =
// β·C(i, 0) + α·Σ_k X(i, k)·w[k·wk] for n rows.
template <class S>
void column(Index n, Index K, S alpha, const S* X, Index ldx, const S* w, Index wk, S beta, S* C, Index ldc) {
  for (Index i = 0; i < n; ++i) {
    S v = 0;
    for (Index k = 0; k < K; ++k) v += X[i * ldx + k] * w[k * wk];
    S& c = C[i * ldc];
    c = beta == S(0) ? alpha * v : beta * c + alpha * v;
  }
}

// Short dot products (K ≤ 2 packets, as LoRA's y += s·t·Bᵀ with K = r): with Wᵀ (K, M) row-major
// at wt, C's packets of columns accumulate α·X(i, k)·Wᵀ(k, ·) over k, XR rows at a time, without
// horizontal sums. Columns [o0, o1).
template <class S, int XR>
void axpy_rows(Index o0, Index o1, Index K, S alpha, const S* X, Index ldx, const S* wt, Index M, S beta, S* C, Index ldc) {
  using P = typename ei::packet_traits<S>::type;
  constexpr int PS = ei::packet_traits<S>::size;
  Index o = o0;
  for (; o + PS <= o1; o += PS) {
    P acc[XR];
    for (int i = 0; i < XR; ++i) acc[i] = ei::pset1<P>(S(0));
    for (Index k = 0; k < K; ++k) {
      const P w = ei::ploadu<P>(wt + k * M + o);
      for (int i = 0; i < XR; ++i) acc[i] = ei::pmadd(ei::pset1<P>(X[i * ldx + k]), w, acc[i]);
    }
    const P a = ei::pset1<P>(alpha), b = ei::pset1<P>(beta);
    for (int i = 0; i < XR; ++i) {
      S* c = C + i * ldc + o;
      ei::pstoreu(c, beta == S(0) ? ei::pmul(a, acc[i]) : ei::pmadd(b, ei::ploadu<P>(c), ei::pmul(a, acc[i])));
    }
  }
  for (; o < o1; ++o) column(XR, K, alpha, X, ldx, wt + o, M, beta, C + o, ldc);
}

// The packet for short_rows: of P and its half, the wider one of at most 32 bytes (8 floats,
// 4 doubles) whose size divides K; 0 when neither does (then Wᵀ is copied). Wider squares cost
// more shuffles than they save (16 x 16 floats: K 16, one row, 0.67 µs against 0.63 as two
// 8 x 8) and GCC warns inside Eigen's 512-bit transposes.
template <class S>
Index square_packet(Index K) {
  using P = typename ei::packet_traits<S>::type;
  using H = typename ei::packet_traits<S>::half;
  constexpr Index PS = ei::packet_traits<S>::size, HS = Index(sizeof(H) / sizeof(S));
  if (sizeof(P) <= 32 && K % PS == 0) return PS;
  if (HS < PS && sizeof(H) <= 32 && K % HS == 0) return HS;
  return 0;
}

// Short dot products read in place: C rows [0, n) (n ≤ kFewRows), columns [o0, o1), with
// K % Q == 0 (Q the packet's size). For each Q columns: W's Q rows, a Q-square block of them at a
// time, are loaded and transposed in registers (ptranspose), so that packet k of the block is
// Wᵀ(k, o..o+Q); XR rows of C at once accumulate X(i, k)·Wᵀ(k, ·) (groups of 8, 4, 2, 1 rows).
// The last columns, fewer than Q, one at a time.
template <class S, class Q, int XR>
void short_tile(Index o, Index K, S alpha, const S* X, Index ldx, const S* W, Index ldw, S beta, S* C, Index ldc) {
  constexpr int QS = ei::unpacket_traits<Q>::size;
  Q acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = ei::pset1<Q>(S(0));
  for (Index c = 0; c < K; c += QS) {
    ei::PacketBlock<Q, QS> wt;
    for (int j = 0; j < QS; ++j) wt.packet[j] = ei::ploadu<Q>(W + (o + j) * ldw + c);
    ei::ptranspose(wt);
    for (int k = 0; k < QS; ++k)
      for (int i = 0; i < XR; ++i) acc[i] = ei::pmadd(ei::pset1<Q>(X[i * ldx + c + k]), wt.packet[k], acc[i]);
  }
  const Q a = ei::pset1<Q>(alpha), b = ei::pset1<Q>(beta);
  for (int i = 0; i < XR; ++i) {
    S* p = C + i * ldc + o;
    ei::pstoreu(p, beta == S(0) ? ei::pmul(a, acc[i]) : ei::pmadd(b, ei::ploadu<Q>(p), ei::pmul(a, acc[i])));
  }
}

template <class S, class Q>
void short_rows(Index o0, Index o1, Index n, Index K, S alpha, const S* X, Index ldx, const S* W, Index ldw, S beta, S* C,
                Index ldc) {
  constexpr int QS = ei::unpacket_traits<Q>::size;
  Index o = o0;
  for (; o + QS <= o1; o += QS) {
    Index i = 0;
    const auto rows = [&](auto xr) {
      constexpr int XR = decltype(xr)::value;
      for (; i + XR <= n; i += XR) short_tile<S, Q, XR>(o, K, alpha, X + i * ldx, ldx, W, ldw, beta, C + i * ldc, ldc);
    };
    rows(std::integral_constant<int, 8>());
    rows(std::integral_constant<int, 4>());
    rows(std::integral_constant<int, 2>());
    rows(std::integral_constant<int, 1>());
  }
  for (; o < o1; ++o) column(n, K, alpha, X, ldx, W + o * ldw, 1, beta, C + o, ldc);
}

}  // namespace few

// C (n, M) = β·C + α·X·Wᵀ, X (n, K) and W (M, K) with rows contiguous, C (n, M) row-major at
// c (row stride ldc); β = 0 ignores C's values. False (nothing done) where the kernel does not
// apply: more than kFewRows rows, or a scalar without SIMD packets here.
template <class S>
bool few_rows(Index n, Index M, Index K, S alpha, const S* X, Index ldx, const S* W, Index ldw, S beta, S* C, Index ldc) {
  if constexpr (!thin::simd<S>) {
    return false;
  } else {
    if (n > kFewRows) return false;
    constexpr Index PS = Eigen::internal::packet_traits<S>::size;
    const Index q = K <= 2 * PS ? few::square_packet<S>(K) : 0;
    if (q) {  // short dot products, W transposed in registers in squares of q
      using P = typename Eigen::internal::packet_traits<S>::type;
      using H = typename Eigen::internal::packet_traits<S>::half;
      thin::split(M, PS, double(n) * M * K, [&](Index b, Index e) {
        if (q == PS) {  // square_packet gives PS only where P is at most 32 bytes
          if constexpr (sizeof(P) <= 32) few::short_rows<S, P>(b, e, n, K, alpha, X, ldx, W, ldw, beta, C, ldc);
        } else if constexpr (sizeof(H) < sizeof(P) && sizeof(H) <= 32) {
          few::short_rows<S, H>(b, e, n, K, alpha, X, ldx, W, ldw, beta, C, ldc);
        }
      });
      return true;
    }
    if (K <= 2 * PS) {  // other short dot products: Wᵀ (small, K·M) copied, then axpy_rows
      thread_local std::vector<S> wt;
      wt.resize(std::size_t(K * M));
      for (Index o = 0; o < M; ++o)
        for (Index k = 0; k < K; ++k) wt[std::size_t(k * M + o)] = W[o * ldw + k];
      const S* w = wt.data();  // this thread's buffer, for the threads of the split
      thin::split(M, PS, double(n) * M * K, [&](Index b, Index e) {
        for (Index i = 0; i < n;) {
          const S* x = X + i * ldx;
          S* c = C + i * ldc;
          if (i + 4 <= n) {
            few::axpy_rows<S, 4>(b, e, K, alpha, x, ldx, w, M, beta, c, ldc);
            i += 4;
          } else {
            few::axpy_rows<S, 1>(b, e, K, alpha, x, ldx, w, M, beta, c, ldc);
            i += 1;
          }
        }
      });
      return true;
    }
    thin::split(M, 8, double(n) * M * K, [&](Index b, Index e) { few::columns<S>(b, e, n, K, alpha, X, ldx, W, ldw, beta, C, ldc); });
    return true;
  }
}

// The same on matrices: y (n, M) = β·y + α·x·Wᵀ, W a row-major Mat or map; y must be (n, M)
// unless β = 0 (then resized).
template <class S, class WM>
bool few_rows(Mat<S>& y, S alpha, const MatRef<S>& x, const WM& W, S beta) {
  if (!thin::simd<S> || x.rows() > kFewRows) return false;
  if (beta == S(0)) y.resize(x.rows(), W.rows());
  return few_rows<S>(x.rows(), W.rows(), W.cols(), alpha, x.data(), x.outerStride(), W.data(), W.outerStride(), beta, y.data(),
                     y.outerStride());
}

}  // namespace lora::detail
