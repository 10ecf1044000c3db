// Inverted dropout masks, as torch.nn.Dropout: each element is kept with probability 1 - p and
// then scaled by 1/(1 - p), so the expected value is unchanged; evaluation uses no mask.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/types.hpp>

namespace lora {

// mask (rows, cols) <- 0 with probability p, else 1/(1 - p). 0 <= p < 1.
template <class Scalar>
void dropout_mask(Mat<Scalar>& mask, Index rows, Index cols, double p, detail::Rng& rng) {
  mask.resize(rows, cols);
  const Scalar keep = static_cast<Scalar>(1.0 / (1.0 - p));
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = rng.uniform() < p ? Scalar(0) : keep;
}

}  // namespace lora
