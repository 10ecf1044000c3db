// What the causal language model tests share: the padded batch of the finite-difference checks,
// and the check that decoding with a cache equals the full forward.
#pragma once

#include <lora/types.hpp>

#include <gtest/gtest.h>

#include <cstdint>

namespace lm_test {

using Ids = lora::Mat<std::int64_t>;

// Two sequences of 6 tokens, the first left-padded by one, with -100 labels (the pad's, one more in
// each sequence).
struct Batch {
  Ids ids, mask, labels;
};
inline Batch padded_batch() {
  Batch b{Ids(2, 6), Ids::Ones(2, 6), Ids()};
  b.ids << 0, 7, 3, 9, 17, 4, 5, 6, 7, 8, 9, 10;
  b.mask(0, 0) = 0;
  b.labels = b.ids;
  b.labels(0, 0) = b.labels(0, 1) = b.labels(1, 3) = -100;
  return b;
}

// Prefill 3 tokens, then one at a time, the first of 2 sequences left-padded by 2: every real
// row (a pad's row is never used) equals the full forward's within 1e-12. Returns the cache.
template <class Model>
auto expect_incremental_equals_full(const Model& model) {
  Ids ids(2, 7), mask = Ids::Ones(2, 7);
  ids << 0, 0, 11, 12, 13, 14, 15, 21, 22, 23, 24, 25, 26, 27;
  mask(0, 0) = mask(0, 1) = 0;
  const lora::Mat<double> full = model.forward(ids, mask);
  auto cache = model.make_cache(2, 7);
  lora::Mat<double> got(14, full.cols());
  const lora::Mat<double> first = model.forward(Ids(ids.leftCols(3)), Ids(mask.leftCols(3)), &cache);
  for (Eigen::Index b = 0; b < 2; ++b) got.middleRows(b * 7, 3) = first.middleRows(b * 3, 3);
  for (Eigen::Index t = 3; t < 7; ++t) {
    const lora::Mat<double> step = model.forward(Ids(ids.col(t)), Ids(mask.col(t)), &cache);
    for (Eigen::Index b = 0; b < 2; ++b) got.row(b * 7 + t) = step.row(b);
  }
  for (Eigen::Index r : {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}) EXPECT_LE((got.row(r) - full.row(r)).cwiseAbs().maxCoeff(), 1e-12) << r;
  return cache;
}

}  // namespace lm_test
