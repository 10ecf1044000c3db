// Initialisation of the LoRA factors A (r, in) and B (out, r).
//
//   Init::kaiming   PEFT's default (init_lora_weights=True): A ~ U(-1/sqrt(in), 1/sqrt(in))
//                   (kaiming_uniform with a = sqrt(5)), B = 0.
//   Init::gaussian  PEFT's init_lora_weights="gaussian": A ~ N(0, std = 1/r), B = 0.
//   Init::zero_a    the reverse, as some LoRA write-ups do: A = 0, B ~ N(0, std = 1/r).
//
// Every choice makes B·A = 0, so a fresh adapter leaves the layer's output unchanged.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/types.hpp>

#include <cmath>

namespace lora {

enum class Init { kaiming, gaussian, zero_a };

inline const char* init_name(Init i) {
  switch (i) {
    case Init::kaiming: return "kaiming";
    case Init::gaussian: return "gaussian";
    case Init::zero_a: return "zero_a";
  }
  return "?";
}

// A (r, in), B (out, r), already sized.
template <class Scalar>
void init_lora(Init init, Mat<Scalar>& A, Mat<Scalar>& B, detail::Rng& rng) {
  const double r = static_cast<double>(A.rows());
  auto fill_normal = [&rng](Mat<Scalar>& m, double stddev) {
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(stddev * rng.normal());
  };
  switch (init) {
    case Init::kaiming: {
      const double bound = 1.0 / std::sqrt(static_cast<double>(A.cols()));
      for (Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<Scalar>(bound * (2.0 * rng.uniform() - 1.0));
      B.setZero();
      break;
    }
    case Init::gaussian:
      fill_normal(A, 1.0 / r);
      B.setZero();
      break;
    case Init::zero_a:
      A.setZero();
      fill_normal(B, 1.0 / r);
      break;
  }
}

}  // namespace lora
