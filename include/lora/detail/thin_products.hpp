// The LoRA factors' thin products, where one side has rank r (8 to 64), in register-blocked
// kernels instead of a general GEMM.
//
//   rank_cols:   C (n, r) = α·L (n, K)·R (K, r)             t = x·Aᵀ (R = Aᵀ, copied), g = s·dy·B (R = B)
//   rank_update: C (n, N) += α·L (n, r)·M (r, N)            dx += g·A, y += s·t·Bᵀ (M = Bᵀ, copied)
//   rank_rows:   C (r, N) = β·C + α·Lᵀ (r, n)·R (n, N)      dBᵀ = s·tᵀ·dy, dA += gᵀ·x
//   rank_cols_stacked: C (n, R) = L·[A_1; …; A_m]ᵀ           t of layers reading the same x, one pass
//
// rank_cols keeps a row's r outputs in one, two or four SIMD registers (or one half-width
// register: r 8 with AVX-512's 16 floats) and runs several rows at once, as many as leave
// registers for R's row: per k, one load of R's row, a broadcast of each row's L(i, k), a fused
// multiply-add each. With 32 registers (AVX-512) that is 8 rows of 1 or 2 packets and 6 rows of 4
// (24 accumulators); with 16 (AVX2), 8, 4 and 2 rows. More rows than 8 read L through more
// streams than the caches keep (n 512, K 1024, r 16: 154 µs with 8 rows, 234 with 12, 373 with
// 16). Against OpenBLAS's sgemm, one thread, float, AVX-512 (n 2048, K 1024): r 8 (half packets)
// 421 µs against 736, r 16 640 / 1262, r 32 1347 / 1823, r 64 2766 / 3672 (with 2 rows of 4
// packets, the AVX2 blocking, r 64 ran at 3470: no faster than the GEMM).
// rank_update is rank_cols's kernel with K = r over blocks of C's columns 4 packets wide (then
// single packets, then single columns), 48 rows at a time, each block added into C: one pass over
// C. As the unmerged forward runs it (y = b + s·t·Bᵀ here, then y += x·Wᵀ in the GEMM), what it
// adds to the merged forward (y = b, y += x·Wᵀ), here / with y += s·t·Bᵀ in OpenBLAS's GEMM
// instead (n 512, float, AVX-512, OpenBLAS's SkylakeX kernels, paired medians, two runs): one
// thread d 512 r 8 0.008–0.009 / 0.028–0.031, d 1024 r 8 −0.001–0.004 / −0.003–0.018, r 64
// 0.059–0.063 / 0.071–0.078, d 4096 r 16 −0.001–0.005 / 0.003–0.012; two threads d 512 r 8
// 0.054–0.074 / 0.093–0.102, d 1024 r 8 0.009–0.025 / 0.030–0.057, d 4096 r 16 0.017 / 0.006–0.041,
// and r 64, the one shape slower here, 0.073–0.103 / 0.046–0.076.
// With K = r that small, how the accumulators are kept matters: held in registers from the first
// product to the store (cols_block), y = b + s·t·Bᵀ at n 512, d 1024, r 8 took 0.012 of the merged
// forward on one thread against 0.024 when GCC kept them on the stack between the loops (two
// threads 0.013 / 0.020; r 64 one thread 0.062 / 0.079).
// rank_rows keeps up to 8 rows of C, three packets of columns wide (one with 16 registers), in
// registers, its loops unrolled as in cols_block (dBᵀ = s·tᵀ·dy at n 512, d 1024, r 8, operands in
// cache, one thread: 0.62 of the time it took with the accumulators on the stack, dA += gᵀ·x 0.52;
// paired medians), and walks n in blocks of 16 rows, every packet of columns per block, prefetching
// the next block's lines meanwhile: R's rows are read across, a packet at a time, which the
// hardware's prefetchers do not follow (n 2048, N 344, r 8, R out of cache: 300-450 µs here against
// 730-1160 with blocks of 64 rows and no prefetch; in cache 185-260 either way). None packs an
// operand. A GEMM (Eigen's or OpenBLAS's) packs both into panels sized for wide products and blocks
// the result 3 packets wide; with r = 8 it ran these at a third to a half of the speed (n 2048, d
// 128, r 8, float, one thread, AVX2: x·Aᵀ 138 µs in OpenBLAS, 118 in Eigen, 58 here; s·dy·B 138 /
// 122 / 89; s·tᵀ·dy 142 / 101 / 86; gᵀ·x 143 / 99 / 82). Other shapes (r not a half packet or 1, 2
// or 4 packets; r > 16 in rank_rows; other scalars) go to the general product. All split their work
// over the threads when it is large and no parallel region is open. Results differ from the GEMM's
// only in summation order.
#pragma once

#include <lora/types.hpp>

#include <algorithm>
#include <type_traits>

namespace lora::detail {

// Below this many rows the copies the thin products make (Aᵀ, Bᵀ) cost more than their kernels
// save, and the general product runs.
constexpr Index kThinRows = 16;

namespace thin {

namespace ei = Eigen::internal;

template <class S>
constexpr bool simd = std::is_same_v<S, float> || std::is_same_v<S, double>;

// A value of S's SIMD packet or of its half-width one; as a function, not a class template, so
// that the packet type's attributes are not dropped from a template argument (GCC's warning).
template <class S, bool Half>
auto packet() {
  if constexpr (Half) return typename ei::packet_traits<S>::half{};
  else return typename ei::packet_traits<S>::type{};
}

// Rows [i, i + ROWS) of C = C0 + α·L·R, where C0 is C (add), the row b repeated (b given) or 0;
// R (K, RP packets) row-major, rows ldr apart; half-width packets if Half. Every loop over the
// accumulators is unrolled before GCC's scalar replacement runs, so that they live in registers
// from their first write to the stores (otherwise they went through the stack at both ends:
// with K = r = 8, 72 memory operations against 192 fused multiply-adds).
template <class S, bool Half, int RP, int ROWS>
void cols_block(Index i, Index K, S alpha, const S* L, Index ldl, const S* R, Index ldr, bool add, const S* b, S* C,
                Index ldc) {
  using P = decltype(packet<S, Half>());
  constexpr int PS = int(sizeof(P) / sizeof(S));
  P acc[ROWS][RP];
#pragma GCC unroll 8
  for (int j = 0; j < ROWS; ++j)
#pragma GCC unroll 8
    for (int p = 0; p < RP; ++p) acc[j][p] = ei::pset1<P>(S(0));
  const S* l = L + i * ldl;
  for (Index k = 0; k < K; ++k) {
    P rv[RP];
#pragma GCC unroll 8
    for (int p = 0; p < RP; ++p) rv[p] = ei::ploadu<P>(R + k * ldr + p * PS);
#pragma GCC unroll 8
    for (int j = 0; j < ROWS; ++j) {
      const P v = ei::pset1<P>(l[j * ldl + k]);
#pragma GCC unroll 8
      for (int p = 0; p < RP; ++p) acc[j][p] = ei::pmadd(v, rv[p], acc[j][p]);
    }
  }
  const P a = ei::pset1<P>(alpha);
#pragma GCC unroll 8
  for (int j = 0; j < ROWS; ++j)
#pragma GCC unroll 8
    for (int p = 0; p < RP; ++p) {
      S* c = C + (i + j) * ldc + p * PS;
      const P c0 = add ? ei::ploadu<P>(c) : b ? ei::ploadu<P>(b + p * PS) : ei::pset1<P>(S(0));
      ei::pstoreu(c, ei::pmadd(a, acc[j][p], c0));
    }
}

// Rows [i0, i1) of C = C0 + α·L·R, in blocks of as many rows as leave registers for R's
// row, then one row at a time.
template <class S, bool Half, int RP>
void cols_kernel(Index i0, Index i1, Index K, S alpha, const S* L, Index ldl, const S* R, Index ldr, bool add, const S* b,
                 S* C, Index ldc) {
  constexpr bool many = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;
  constexpr int ROWS = RP == 1 ? 8 : RP == 2 ? (many ? 8 : 4) : (many ? 6 : 2);  // ROWS·RP accumulators
  Index i = i0;
  for (; i + ROWS <= i1; i += ROWS) cols_block<S, Half, RP, ROWS>(i, K, alpha, L, ldl, R, ldr, add, b, C, ldc);
  for (; i < i1; ++i) cols_block<S, Half, RP, 1>(i, K, alpha, L, ldl, R, ldr, add, b, C, ldc);
}

// Rows [k0, k0 + kb) of C, columns [c, c + NP packets), += α·Lᵀ·R over rows [i0, i1) of L and R:
// kb × NP packets of accumulators; per row of R, NP packet loads and kb broadcasts of L's row feed
// kb·NP fused multiply-adds. KB: kb known at compile time (8, the loops unrolled as in cols_block,
// so that the accumulators stay in registers), or 0 for a kb < 8 given at run time.
template <class S, int NP, int KB>
void rows_step(Index i0, Index i1, Index k0, int kb, S alpha, const S* L, Index ldl, const S* R, Index ldr, S* C,
               Index ldc, Index c) {
  using P = typename ei::packet_traits<S>::type;
  constexpr int PS = ei::packet_traits<S>::size;
  P acc[8][NP];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) acc[k][p] = ei::pset1<P>(S(0));
  const S* l = L + i0 * ldl + k0;
  const S* rr = R + i0 * ldr + c;
  for (Index i = i0; i < i1; ++i, l += ldl, rr += ldr) {
    P v[NP];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) v[p] = ei::ploadu<P>(rr + p * PS);
#pragma GCC unroll 8
    for (int k = 0; k < (KB > 0 ? KB : kb); ++k) {
      const P b = ei::pset1<P>(l[k]);
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p) acc[k][p] = ei::pmadd(b, v[p], acc[k][p]);
    }
  }
  const P a = ei::pset1<P>(alpha);
#pragma GCC unroll 8
  for (int k = 0; k < (KB > 0 ? KB : kb); ++k)
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      S* cp = C + (k0 + k) * ldc + c + p * PS;
      ei::pstoreu(cp, ei::pmadd(a, acc[k][p], ei::ploadu<P>(cp)));
    }
}

// Columns [c0, c1) of C = β·C + α·Lᵀ·R. Rows of C in blocks of up to 8, each 3 packets of columns
// wide in registers (one packet with 16 registers); n in blocks of 16 rows, so that L's and R's
// rows are read in order (the partial sums wait in C, which starts at β·C), and the next block's
// lines are prefetched a line per row while this block computes. The last packets one at a time,
// the last columns, fewer than a packet, one at a time.
template <class S>
void rows_kernel(Index c0, Index c1, Index n, Index r, S alpha, const S* L, Index ldl, const S* R, Index ldr, S beta, S* C,
                 Index ldc) {
  constexpr int PS = ei::packet_traits<S>::size;
  constexpr int NP = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 3 : 1;  // 8·NP accumulators
  constexpr Index NB = 16;
  const Index cv = c0 + (c1 - c0) / PS * PS;  // [c0, cv): whole packets
  for (Index k = 0; k < r; ++k)
    for (Index c = c0; c < c1; ++c) C[k * ldc + c] = beta == S(0) ? S(0) : beta * C[k * ldc + c];
  constexpr Index LINE = 64 / sizeof(S);  // a cache line's columns
  for (Index k0 = 0; k0 < r; k0 += 8) {
    const int kb = static_cast<int>(std::min<Index>(8, r - k0));
    for (Index i0 = 0; i0 < n; i0 += NB) {
      const Index i1 = std::min(n, i0 + NB), i2 = std::min(n, i1 + NB);
      const auto prefetch = [&](Index c, Index w) {  // the next block's lines starting in [c, c + w), row by row
        for (Index cc = c + (LINE - (c - c0) % LINE) % LINE; cc < c + w; cc += LINE)
          for (Index i = i1; i < i2; ++i) __builtin_prefetch(R + i * ldr + cc);
      };
      const auto step = [&](auto np, Index c) {  // np: packets of columns, as a type
        constexpr int W = decltype(np)::value;
        prefetch(c, W * PS);
        if (kb == 8)
          rows_step<S, W, 8>(i0, i1, k0, kb, alpha, L, ldl, R, ldr, C, ldc, c);
        else
          rows_step<S, W, 0>(i0, i1, k0, kb, alpha, L, ldl, R, ldr, C, ldc, c);
      };
      Index c = c0;
      for (; c + NP * PS <= cv; c += NP * PS) step(std::integral_constant<int, NP>{}, c);
      for (; c < cv; c += PS) step(std::integral_constant<int, 1>{}, c);
    }
    for (Index c = cv; c < c1; ++c)
      for (int k = 0; k < kb; ++k) {
        S v = 0;
        for (Index i = 0; i < n; ++i) v += L[i * ldl + k0 + k] * R[i * ldr + c];
        C[(k0 + k) * ldc + c] += alpha * v;
      }
  }
}

// S's values in one SIMD packet (half: in the half-width one); 1 without SIMD.
template <class S>
constexpr Index width(bool half) {
  if constexpr (simd<S>) return Index(half ? sizeof(packet<S, true>()) : sizeof(packet<S, false>())) / Index(sizeof(S));
  else return 1;
}

// Whether rank_cols runs r columns in its own kernel: one, two or four packets, or a half packet
// narrower than a packet.
template <class S>
bool kernel_width(Index r) {
  constexpr Index PS = width<S>(false), HS = width<S>(true);
  return simd<S> && (r == PS || r == 2 * PS || r == 4 * PS || (HS < PS && r == HS));
}

// [0, n) cut into `parts` ranges whose starts are multiples of `align`; f(begin, end) on each, in
// parallel when the work is large and no parallel region is open.
template <class F>
void split(Index n, Index align, double work, F f) {
  int parts = 1;
#ifdef _OPENMP
  if (work >= double(1 << 18) && !omp_in_parallel()) parts = std::max(1, Eigen::nbThreads());
#endif
  (void)work;
  const Index step = ((n + parts - 1) / parts + align - 1) / align * align;
  parallel_for(parts, parts > 1, [&](int p) {
    const Index b = std::min(n, p * step), e = std::min(n, b + step);
    if (b < e) f(b, e);
  });
}

}  // namespace thin

// C (n, r) = α·L (n, K)·R (K, r), R row-major (K, r).
template <class S>
void rank_cols(Mat<S>& C, S alpha, const MatRef<S>& L, const Mat<S>& R) {
  const Index n = L.rows(), K = L.cols(), r = R.cols();
  if constexpr (thin::simd<S>) {
    constexpr Index PS = thin::width<S>(false);
    const Index rp = r % PS == 0 ? r / PS : 0;
    if (thin::kernel_width<S>(r)) {
      C.resize(n, r);
      const auto run = [&](auto kernel) {
        thin::split(n, 8, double(n) * K * r, [&](Index b, Index e) {
          kernel(b, e, K, alpha, L.data(), L.outerStride(), R.data(), r, false, nullptr, C.data(), r);
        });
      };
      if (rp == 1) run(thin::cols_kernel<S, false, 1>);
      else if (rp == 2) run(thin::cols_kernel<S, false, 2>);
      else if (rp == 4) run(thin::cols_kernel<S, false, 4>);
      else run(thin::cols_kernel<S, true, 1>);
      return;
    }
  }
  C.noalias() = alpha * L * R;
}

// T (K, r) = Aᵀ (add: T += Aᵀ, T sized) for A (r, K), both row-major, in 8 × 8 squares (the
// edges in smaller blocks): each square reads and writes 8 short runs of a row. Eigen's
// assignment of the whole transpose walks T by rows and reads A's columns, K apart, a stride
// that keeps few of them in the first-level cache (one thread: A 64 × 1024 192 µs against 27
// here; 1024 × 64 41 against 29).
template <class S, class Dst>
void transpose_to(Dst&& T, const Mat<S>& A, bool add) {  // T sized (K, r): a matrix or a block
  constexpr Index B = 8;
  const Index r = A.rows(), K = A.cols();
  const auto put = [add](auto&& to, const auto& from) {
    if (add)
      to += from.transpose();
    else
      to = from.transpose();
  };
  for (Index j = 0; j < r; j += B)
    for (Index k = 0; k < K; k += B) {
      if (j + B <= r && k + B <= K)  // fixed-size squares: Eigen transposes them in registers
        put(T.template block<B, B>(k, j), A.template block<B, B>(j, k));
      else
        put(T.block(k, j, std::min(B, K - k), std::min(B, r - j)), A.block(j, k, std::min(B, r - j), std::min(B, K - k)));
    }
}

template <class S>
void transpose_into(Mat<S>& T, const Mat<S>& A, bool add = false) {
  if (!add) T.resize(A.cols(), A.rows());
  transpose_to<S>(T, A, add);
}

// C (n, r) = α·L (n, K)·Aᵀ for A (r, K): rank_cols on Aᵀ copied row-major (a thread's buffer);
// below 16 rows the copy would cost more than the kernel saves, and the general product runs.
template <class S>
void rank_cols_t(Mat<S>& C, S alpha, const MatRef<S>& L, const Mat<S>& A) {
  if (L.rows() < kThinRows) {
    C.noalias() = alpha * L * A.transpose();
    return;
  }
  thread_local Mat<S> at;
  transpose_into<S>(at, A);
  rank_cols<S>(C, alpha, L, at);
}

// C (n, N) = C0 + α·L (n, r)·M for M (r, N), C sized, where C0 is C (add), the row b repeated (b
// given) or 0: dx += g·A, and with M = Bᵀ (rank_update_t) y += s·t·Bᵀ or y = b + s·t·Bᵀ.
// cols_kernel with K = r over blocks of C's columns 4 packets wide, then single packets, then one
// column at a time. Below 16 rows, the general product.
template <class S>
void rank_update(Eigen::Ref<Mat<S>> C, S alpha, const MatRef<S>& L, const MatRef<S>& M, bool add = true,
                 const S* b = nullptr) {
  const Index n = L.rows(), r = L.cols(), N = M.cols();
  if constexpr (thin::simd<S>) {
    if (n >= kThinRows) {
      constexpr Index PS = thin::width<S>(false);
      constexpr Index band = 48;  // rows that pass through every block of columns before the next
      const S* l = L.data();
      const S* m = M.data();
      S* y = C.data();
      const Index ldl = L.outerStride(), ldm = M.outerStride(), ldc = C.outerStride();
      thin::split(n, 8, double(n) * N * r, [&](Index b0, Index e0) {
        for (Index i0 = b0; i0 < e0; i0 += band) {
          const Index i1 = std::min(e0, i0 + band);
          Index c = 0;
          for (; c + 4 * PS <= N; c += 4 * PS)
            thin::cols_kernel<S, false, 4>(i0, i1, r, alpha, l, ldl, m + c, ldm, add, b ? b + c : b, y + c, ldc);
          for (; c + PS <= N; c += PS)
            thin::cols_kernel<S, false, 1>(i0, i1, r, alpha, l, ldl, m + c, ldm, add, b ? b + c : b, y + c, ldc);
          for (; c < N; ++c)
            for (Index i = i0; i < i1; ++i) {
              S v = 0;
              for (Index k = 0; k < r; ++k) v += l[i * ldl + k] * m[k * ldm + c];
              y[i * ldc + c] = (add ? y[i * ldc + c] : b ? b[c] : S(0)) + alpha * v;
            }
        }
      });
      return;
    }
  }
  if (!add) {
    if (b)
      C.rowwise() = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(b, N);
    else
      C.setZero();
  }
  C.noalias() += alpha * L * M;
}

// rank_update on M = Bᵀ for B (N, r), copied row-major (a thread's buffer).
template <class S>
void rank_update_t(Eigen::Ref<Mat<S>> C, S alpha, const MatRef<S>& L, const Mat<S>& B, bool add = true,
                   const S* b = nullptr) {
  thread_local Mat<S> bt;
  transpose_into<S>(bt, B);
  rank_update<S>(C, alpha, L, bt, add, b);
}

// The width of C in rank_cols_stacked for factors of r_1 + … + r_m rows: the narrowest kernel width
// that holds them (zero columns pad the rest), up to two packets; else 0. (Four packets hold fewer
// rows at a time: q, k, v at r 16, 48 columns padded to 64, were 0.1 % faster stacked on two
// threads and 0.8 % slower on one.)
template <class S>
Index stacked_width(Index rows) {
  for (Index w = 1; w <= 2 * thin::width<S>(false); ++w)
    if (w >= rows && thin::kernel_width<S>(w)) return w;
  return 0;
}

// C (n, R) = L (n, K)·[A_1; …; A_m]ᵀ for A_i (r_i, K), R = stacked_width(Σ r_i) (not 0): one pass of
// rank_cols's kernel over L where m separate t = x·Aᵀ would make m. C.middleCols(o_i, r_i) =
// L·A_iᵀ, o_i = r_1 + … + r_(i−1); the columns after Σ r_i are zero. Self-attention's q, k, v at r 8
// (float, AVX-512): 24 columns padded to 32 in one pass, against three passes of 8.
template <class S>
void rank_cols_stacked(Mat<S>& C, const MatRef<S>& L, const Mat<S>* const* A, int m) {
  Index rows = 0;
  for (int i = 0; i < m; ++i) rows += A[i]->rows();
  thread_local Mat<S> at;
  at.resize(L.cols(), stacked_width<S>(rows));
  for (Index i = 0, o = 0; i < m; o += A[i]->rows(), ++i) transpose_to<S>(at.middleCols(o, A[i]->rows()), *A[i], false);
  at.rightCols(at.cols() - rows).setZero();
  rank_cols<S>(C, S(1), L, at);
}

// C (r, N) = β·C + α·Lᵀ·R for L (n, r), R (n, N); β = 0 sizes C, β ≠ 0 needs C (r, N).
template <class S>
void rank_rows(Mat<S>& C, S alpha, const MatRef<S>& L, const MatRef<S>& R, S beta) {
  const Index n = L.rows(), r = L.cols(), N = R.cols();
  if (beta == S(0)) C.resize(r, N);
  if constexpr (thin::simd<S>) {
    if (r <= 16) {
      constexpr Index PS = Eigen::internal::packet_traits<S>::size;
      thin::split(N, PS, double(n) * N * r, [&](Index b, Index e) {
        thin::rows_kernel<S>(b, e, n, r, alpha, L.data(), L.outerStride(), R.data(), R.outerStride(), beta, C.data(), N);
      });
      return;
    }
  }
  if (beta == S(0))
    C.noalias() = alpha * L.transpose() * R;
  else {
    C *= beta;
    C.noalias() += alpha * L.transpose() * R;
  }
}

}  // namespace lora::detail
