// LoraLinear's mixed-batch forward (declared in linear.hpp, which includes this file): row i of
// x uses adapter names[i], or the base alone for "__base__".
//
//   y = b + x·Wᵀ                     one GEMM over all rows
//   y[rows of a] += s_a·(x[rows of a]·A_aᵀ)·B_aᵀ   per adapter a: up to 8 rows one by one through
//                                                 few_rows, read in place; more rows gathered (in
//                                                 place when contiguous, detail/row_groups.hpp)
//                                                 through two thin products
//
// Groups write disjoint rows of y, so they run in parallel (OpenMP, above a work threshold).
#pragma once

#include <lora/linear.hpp>

#include <string>
#include <vector>

namespace lora {

template <class Scalar>
void LoraLinear<Scalar>::forward(const MatRef& x, const std::vector<std::string>& names, Mat& y) const {
  const char* where = "LoraLinear::forward (mixed batch): ";
  check_input("forward", x);
  check_no_alias("forward", "Y", y, "X", x);
  if (static_cast<Index>(names.size()) != x.rows())
    detail::fail(where, names.size(), " adapter names for ", x.rows(), " rows of X; give one per row");
  if (is_merged()) detail::fail(where, "the layer is merged; unmerge() before serving a mixed batch");
  thread_local std::vector<int> which;  // adapter of each row, -1 for the base
  which.resize(names.size());
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (names[i] == kBase) {
      which[i] = -1;
      continue;
    }
    which[i] = reg_.find(names[i]);
    if (which[i] < 0)
      detail::fail(where, "row ", i, ": no adapter '", names[i], "' (the layer has ", detail::quoted_list(adapter_names()), ")");
    if (reg_.all()[which[i]].config.use_dora)
      detail::fail(where, "row ", i, ": adapter '", names[i], "' uses DoRA, which a mixed batch does not support");
  }
  y.resize(x.rows(), out_);
  base(x, y);
  if (disabled_) return;
  thread_local detail::RowGroups groups;
  groups.build(which, reg_.size());
  // Each group writes only its own rows of y, so groups run in parallel (one thread each, with
  // its own buffers); the base GEMM above used all threads.
  const detail::RowGroups& g = groups;  // thread_locals are per thread: pass the caller's by reference
  const int ng = static_cast<int>(g.nonempty.size());
  detail::parallel_for(ng, ng > 1 && g.rows.size() * std::size_t(in_) >= (1u << 16), [&](int k) {
    const Adapter& a = reg_.all()[g.nonempty[k]];
    detail::add_lora_rows<Scalar>(x, a.A, a.B, a.s, g.rows_of(g.nonempty[k]), g.count(g.nonempty[k]), y);
  }, true);
}

}  // namespace lora
