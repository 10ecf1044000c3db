// RowGroups: the rows of a mixed batch grouped by the adapter each row uses, for
// LoraLinear::forward(x, adapter_names). A counting sort keeps every group in row order, so a
// group whose rows are one contiguous run can be used in place, without a gather.
#pragma once

#include <lora/detail/few_rows.hpp>
#include <lora/detail/thin_products.hpp>
#include <lora/types.hpp>

#include <vector>

namespace lora::detail {

struct RowGroups {
  std::vector<Index> start;  // group k's rows are rows[start[k] .. start[k+1])
  std::vector<Index> rows;
  std::vector<int> nonempty; // the groups that have rows

  // which[i]: the group of row i, in [0, groups), or -1 for none.
  void build(const std::vector<int>& which, std::size_t groups) {
    start.assign(groups + 1, 0);
    for (int w : which)
      if (w >= 0) ++start[w + 1];
    for (std::size_t k = 0; k < groups; ++k) start[k + 1] += start[k];
    rows.resize(start.back());
    fill_.assign(start.begin(), start.end() - 1);
    for (std::size_t i = 0; i < which.size(); ++i)
      if (which[i] >= 0) rows[fill_[which[i]]++] = static_cast<Index>(i);
    nonempty.clear();
    for (std::size_t k = 0; k < groups; ++k)
      if (start[k + 1] > start[k]) nonempty.push_back(static_cast<int>(k));
  }

  const Index* rows_of(int k) const { return rows.data() + start[k]; }
  Index count(int k) const { return start[k + 1] - start[k]; }

 private:
  std::vector<Index> fill_;
};

// y[rows] += s·(x[rows]·Aᵀ)·Bᵀ for the m rows of one group, gathered unless contiguous.
//   x (n, in), A (r, in), B (out, r), y (n, out)
// A group of at most kFewRows rows (decoding: often one row per adapter) goes row by row through
// few_rows, reading x's and y's rows, A and B in place: no gather, no copy, no GEMM call.
template <class Scalar>
void add_lora_rows(const MatRef<Scalar>& x, const Mat<Scalar>& A, const Mat<Scalar>& B, Scalar s, const Index* rows, Index m,
                   Mat<Scalar>& y) {
  thread_local Mat<Scalar> xg, t, u;
  if (m <= kFewRows && thin::simd<Scalar>) {
    const Index r = A.rows();
    t.resize(1, r);
    for (Index j = 0; j < m; ++j) {
      few_rows<Scalar>(1, r, x.cols(), Scalar(1), x.data() + rows[j] * x.outerStride(), x.outerStride(), A.data(), A.outerStride(), Scalar(0), t.data(), r);
      few_rows<Scalar>(1, y.cols(), r, s, t.data(), r, B.data(), B.outerStride(), Scalar(1), y.data() + rows[j] * y.outerStride(), y.outerStride());
    }
    return;
  }
  if (rows[m - 1] - rows[0] == m - 1) {  // one contiguous run of rows
    rank_cols_t<Scalar>(t, Scalar(1), x.middleRows(rows[0], m), A);
    rank_update_t<Scalar>(y.middleRows(rows[0], m), s, t, B);
    return;
  }
  xg.resize(m, x.cols());
  for (Index j = 0; j < m; ++j) xg.row(j) = x.row(rows[j]);
  rank_cols_t<Scalar>(t, Scalar(1), xg, A);
  u.resize(m, y.cols());
  rank_update_t<Scalar>(u, s, t, B, false);
  for (Index j = 0; j < m; ++j) y.row(rows[j]) += u.row(j);
}

}  // namespace lora::detail
