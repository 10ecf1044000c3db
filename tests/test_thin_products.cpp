// The thin-product kernels (detail/thin_products.hpp) and few_rows (detail/few_rows.hpp) against
// a plain triple loop in long double, over ranks that take each kernel (half a packet; 1, 2, 4
// packets; up to 16 rows of C) and the fallback, row counts around the kernels' blocks, tiles and
// bands, widths of C that leave single packets and columns after the blocks of 4 packets,
// strided operands, β = 0 and 1, and work large enough to split over threads; the blocked
// transpose behind rank_cols_t and the gradient of B; and several A factors stacked into one
// product.
#include <lora/detail/few_rows.hpp>
#include <lora/detail/thin_products.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using lora::Index;

template <class S>
lora::Mat<S> filled(Index rows, Index cols, int seed) {
  lora::Mat<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = S(std::sin(0.37 * double(seed) + 0.61 * double(i) + 1.3 * double(j)));
  return m;
}

using Exact = Eigen::Matrix<long double, -1, -1>;

// α·X·Y summed in long double, an element at a time.
template <class X, class Y>
Exact exact_product(long double alpha, const X& x, const Y& y) {
  Exact out(x.rows(), y.cols());
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < y.cols(); ++j) {
      long double s = 0;
      for (Index k = 0; k < x.cols(); ++k) s += (long double)x(i, k) * (long double)y(k, j);
      out(i, j) = alpha * s;
    }
  return out;
}

// max |got - want| / (1 + max |want|)
template <class S>
double rel_err(const lora::Mat<S>& got, const Exact& want) {
  EXPECT_EQ(got.rows(), want.rows());
  EXPECT_EQ(got.cols(), want.cols());
  if (got.rows() != want.rows() || got.cols() != want.cols()) return 1e30;
  long double e = 0, m = 0;
  for (Index i = 0; i < want.rows(); ++i)
    for (Index j = 0; j < want.cols(); ++j) {
      e = std::max(e, std::fabs((long double)got(i, j) - want(i, j)));
      m = std::max(m, std::fabs(want(i, j)));
    }
  return double(e / (1 + m));
}

template <class S>
void check_all(double tol) {
  const S alpha = S(0.75);
  for (Index r : {1, 2, 3, 4, 8, 12, 16, 24, 32, 64})
    for (Index n : {0, 1, 7, 8, 9, 17, 40, 101})
      for (Index K : {1, 5, 131}) {
        SCOPED_TRACE(testing::Message() << "r " << r << " n " << n << " K " << K);
        // L is a column block of a wider matrix: rows at a stride of K + 3 (with no rows, the
        // first columns: an empty matrix has no data to offset into).
        const lora::Mat<S> wide = filled<S>(n, K + 3, 1);
        const lora::MatRef<S> L = wide.middleCols(n > 0 ? 2 : 0, K);
        const lora::Mat<S> R = filled<S>(K, r, 2), A = filled<S>(r, K, 3);
        const Exact want = exact_product(alpha, L, R), want_t = exact_product(alpha, L, A.transpose());
        lora::Mat<S> C(3, 3);  // the wrong shape: the products size it
        lora::detail::rank_cols<S>(C, alpha, L, R);
        EXPECT_LT(rel_err(C, want), tol);
        lora::detail::rank_cols_t<S>(C, alpha, L, A);
        EXPECT_LT(rel_err(C, want_t), tol);

        // rank_rows: C (r, N) = β·C + α·Lᵀ·R2 with L2 (n, r) strided, R2 (n, N).
        for (Index N : {1, 3, 8, 13, 130, 150}) {
          const lora::Mat<S> wide2 = filled<S>(n, r + 2, 4);
          const lora::MatRef<S> L2 = wide2.middleCols(n > 0 ? 1 : 0, r);
          const lora::Mat<S> R2 = filled<S>(n, N, 5), C0 = filled<S>(r, N, 6);
          const Exact w0 = exact_product(alpha, L2.transpose(), R2);
          const Exact w1 = C0.template cast<long double>() + w0;
          lora::Mat<S> D(1, 1);
          lora::detail::rank_rows<S>(D, alpha, L2, R2, S(0));
          EXPECT_LT(rel_err(D, w0), tol) << "N " << N << " beta 0";
          D = C0;
          lora::detail::rank_rows<S>(D, alpha, L2, R2, S(1));
          EXPECT_LT(rel_err(D, w1), tol) << "N " << N << " beta 1";

          // rank_update: C (n, N) += α·L2·M for M (r, N); rank_update_t the same with M = Bᵀ.
          const lora::Mat<S> M = filled<S>(r, N, 7), Bt = filled<S>(N, r, 8), Y0 = filled<S>(n, N, 9);
          const Exact u = exact_product(alpha, L2, M), ut = exact_product(alpha, L2, Bt.transpose());
          lora::Mat<S> Y = Y0;
          lora::detail::rank_update<S>(Y, alpha, L2, M);
          EXPECT_LT(rel_err(Y, Exact(Y0.template cast<long double>() + u)), tol) << "N " << N << " add";
          lora::detail::rank_update<S>(Y, alpha, L2, M, false);
          EXPECT_LT(rel_err(Y, u), tol) << "N " << N << " set";
          Y = Y0;
          lora::detail::rank_update_t<S>(Y, alpha, L2, Bt);
          EXPECT_LT(rel_err(Y, Exact(Y0.template cast<long double>() + ut)), tol) << "N " << N << " add, Bᵀ";
          lora::detail::rank_update_t<S>(Y, alpha, L2, Bt, false);
          EXPECT_LT(rel_err(Y, ut), tol) << "N " << N << " set, Bᵀ";
        }
      }
}

// few_rows: y (n, M) = β·y + α·x·Wᵀ for n ≤ 8 (every tile: groups of 8, 4, 2, 1 rows; W's rows in
// blocks of 8 and their remainders; K around a packet, and the short K that W's transposed
// squares take: 4, 8, 16, 24, 32), x, y and W strided; more rows are refused.
template <class S>
void check_few_rows(double tol) {
  const S alpha = S(0.75);
  for (Index n = 1; n <= lora::detail::kFewRows; ++n)
    for (Index M : {1, 3, 8, 13, 130})
      for (Index K : {1, 4, 5, 8, 9, 16, 24, 32, 131}) {
        SCOPED_TRACE(testing::Message() << "n " << n << " M " << M << " K " << K);
        const lora::Mat<S> wide = filled<S>(n, K + 3, 11), W = filled<S>(M, K, 12), y0 = filled<S>(n, M + 2, 13);
        const lora::Mat<S> Wwide = filled<S>(M, K + 5, 12);  // W's rows at a stride of K + 5
        const lora::MatRef<S> x = wide.middleCols(2, K);
        const Exact want = exact_product(alpha, x, W.transpose());
        lora::Mat<S> y(2, 2);
        ASSERT_TRUE(lora::detail::few_rows<S>(y, alpha, x, W, S(0)));
        EXPECT_LT(rel_err(y, want), tol);
        lora::Mat<S> yw = y0;  // into a column block of a wider y, β = 0.5
        ASSERT_TRUE(lora::detail::few_rows<S>(n, M, K, alpha, x.data(), x.outerStride(), W.data(), K, S(0.5), yw.data() + 1,
                                              yw.outerStride()));
        const Exact want_b = S(0.5) * y0.middleCols(1, M).template cast<long double>() + want;
        EXPECT_LT(rel_err(lora::Mat<S>(yw.middleCols(1, M)), want_b), tol);
        EXPECT_EQ(yw.col(0), y0.col(0));  // the columns around the block untouched
        EXPECT_EQ(yw.col(M + 1), y0.col(M + 1));
        lora::Mat<S> ys(n, M);  // W strided, β = 1
        ys.setConstant(S(2));
        ASSERT_TRUE(lora::detail::few_rows<S>(n, M, K, alpha, x.data(), x.outerStride(), Wwide.data() + 3, K + 5, S(1), ys.data(),
                                              ys.outerStride()));
        const Exact want_s = exact_product(alpha, x, Wwide.middleCols(3, K).transpose()).array() + 2.0L;
        EXPECT_LT(rel_err(ys, want_s), tol);
      }
  lora::Mat<S> y;
  const lora::Mat<S> x = filled<S>(lora::detail::kFewRows + 1, 4, 1), W = filled<S>(3, 4, 2);
  EXPECT_FALSE(lora::detail::few_rows<S>(y, alpha, x, W, S(0)));
  EXPECT_EQ(y.size(), 0);
}

TEST(ThinProducts, MatchTheProductInDouble) {
  check_all<double>(1e-14);
  check_few_rows<double>(1e-14);
}
TEST(ThinProducts, MatchTheProductInFloat) {
  check_all<float>(2e-6);
  check_few_rows<float>(2e-6);
}

// transpose_into copies (or adds) exactly, over 8 × 8 squares and the smaller blocks at the edges.
TEST(ThinProducts, TransposeIntoCopiesAndAddsExactly) {
  for (Index r : {1, 5, 16, 64})
    for (Index K : {1, 15, 16, 17, 131}) {
      SCOPED_TRACE(testing::Message() << "r " << r << " K " << K);
      const lora::Mat<float> A = filled<float>(r, K, 15), T0 = filled<float>(K, r, 16);
      lora::Mat<float> T(2, 3);  // the wrong shape: a copy sizes it
      lora::detail::transpose_into<float>(T, A);
      ASSERT_EQ(T.rows(), K);
      ASSERT_EQ(T.cols(), r);
      for (Index j = 0; j < r; ++j)
        for (Index k = 0; k < K; ++k) EXPECT_EQ(T(k, j), A(j, k));
      T = T0;
      lora::detail::transpose_into<float>(T, A, true);
      for (Index j = 0; j < r; ++j)
        for (Index k = 0; k < K; ++k) EXPECT_EQ(T(k, j), T0(k, j) + A(j, k));
    }
}

// rank_cols_stacked: C = L·[A_1; …; A_m]ᵀ, each A_i's columns against its own exact product, the
// padding exactly zero; its width the narrowest that rank_cols' kernels take (half a packet
// narrower than a packet, one or two packets) or 0 past two packets.
template <class S>
void check_stacked(double tol) {
  constexpr Index PS = Eigen::internal::packet_traits<S>::size;
  constexpr Index HS = sizeof(typename Eigen::internal::packet_traits<S>::half) / sizeof(S);
  for (Index rows = 1; rows <= 2 * PS + 1; ++rows) {
    const Index want = rows <= HS && HS < PS ? HS : rows <= PS ? PS : rows <= 2 * PS ? 2 * PS : 0;
    EXPECT_EQ(lora::detail::stacked_width<S>(rows), want) << rows << " rows";
  }
  const std::vector<std::vector<Index>> shapes = {{8, 8, 8}, {2, 2, 2}, {1, 3, 4}, {1, 1}, {PS, PS}, {PS - 1, 1}, {1, HS}};
  int stacked = 0;  // shapes within two packets
  for (const auto& rs : shapes) {
    Index rows = 0;
    for (Index r : rs) rows += r;
    if (lora::detail::stacked_width<S>(rows) == 0) continue;
    ++stacked;
    for (Index n : {16, 17, 40, 101})
      for (Index K : {1, 17, 64}) {
        SCOPED_TRACE(testing::Message() << "n " << n << " K " << K << " A's " << rs.size() << ", first r " << rs[0]);
        std::vector<lora::Mat<S>> A;
        std::vector<const lora::Mat<S>*> ptr;
        for (std::size_t i = 0; i < rs.size(); ++i) A.push_back(filled<S>(rs[i], K, 30 + int(i)));
        for (const auto& a : A) ptr.push_back(&a);
        const Index width = lora::detail::stacked_width<S>(rows);
        const lora::Mat<S> L = filled<S>(n, K, 29);
        lora::Mat<S> C(1, 1);
        lora::detail::rank_cols_stacked<S>(C, L, ptr.data(), int(ptr.size()));
        ASSERT_EQ(C.rows(), n);
        ASSERT_EQ(C.cols(), width);
        Index o = 0;
        for (const auto& a : A) {
          const lora::Mat<S> part = C.middleCols(o, a.rows());
          EXPECT_LT(rel_err<S>(part, exact_product(1.0L, L, a.transpose())), tol);
          o += a.rows();
        }
        EXPECT_TRUE((C.rightCols(width - rows).array() == S(0)).all());
      }
  }
  EXPECT_GE(stacked, 4);
}

TEST(ThinProducts, StackedFactorsMatchEachProductInDouble) { check_stacked<double>(1e-14); }
TEST(ThinProducts, StackedFactorsMatchEachProductInFloat) { check_stacked<float>(2e-6); }

// Work above the split threshold, so that the kernels run on several threads where there are.
TEST(ThinProducts, LargeProductsSplitOverThreadsGiveTheSameResult) {
  const Index n = 4099, K = 130, r = 8, N = 133;
  const lora::Mat<double> x = filled<double>(n, K, 7), A = filled<double>(r, K, 8), g = filled<double>(n, r, 9),
                          e = filled<double>(n, N, 10);
  lora::Mat<double> t, d;
  lora::detail::rank_cols_t<double>(t, 1.0, x, A);
  EXPECT_LT((t - x * A.transpose()).cwiseAbs().maxCoeff(), 1e-11);
  lora::detail::rank_rows<double>(d, 0.5, g, e, 0.0);
  EXPECT_LT((d - 0.5 * g.transpose() * e).cwiseAbs().maxCoeff(), 1e-11);
  lora::Mat<double> u = e;  // e (n, N) += 0.5·g·Bᵀ for B (N, r)
  const lora::Mat<double> Bn = filled<double>(N, r, 15);
  lora::detail::rank_update_t<double>(u, 0.5, g, Bn);
  EXPECT_LT((u - e - 0.5 * g * Bn.transpose()).cwiseAbs().maxCoeff(), 1e-11);
  const lora::Mat<double> x8 = filled<double>(8, 1030, 11), W = filled<double>(1029, 1030, 12);
  lora::Mat<double> y;
  ASSERT_TRUE(lora::detail::few_rows<double>(y, 1.0, x8, W, 0.0));
  EXPECT_LT((y - x8 * W.transpose()).cwiseAbs().maxCoeff(), 1e-10);
  const lora::Mat<double> t8 = filled<double>(8, 8, 13), B = filled<double>(40999, 8, 14);  // short dot products
  ASSERT_TRUE(lora::detail::few_rows<double>(y, 1.0, t8, B, 0.0));
  EXPECT_LT((y - t8 * B.transpose()).cwiseAbs().maxCoeff(), 1e-12);
}

}  // namespace
