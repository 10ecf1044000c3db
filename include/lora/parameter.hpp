// Parameter<Scalar>: a trainable tensor and its gradient, as views into the layer that owns
// them, for optimizers (optim.hpp) and clipping. Vectors are seen as (1, n) rows.
#pragma once

#include <lora/types.hpp>

#include <string>
#include <utility>

namespace lora {

template <class Scalar>
struct Parameter {
  std::string name;
  MatMap<Scalar> value;
  MatMap<Scalar> grad;
};

// A Parameter over a matrix or vector and its gradient of the same shape (vectors as (1, n)).
template <class Scalar, int R, int C, int O>
Parameter<Scalar> make_parameter(std::string name, Eigen::Matrix<Scalar, R, C, O>& value,
                                 Eigen::Matrix<Scalar, R, C, O>& grad) {
  const bool vec = value.cols() == 1 && C == 1;
  const Index rows = vec ? 1 : value.rows(), cols = vec ? value.rows() : value.cols();
  return {std::move(name), MatMap<Scalar>(value.data(), rows, cols), MatMap<Scalar>(grad.data(), rows, cols)};
}

}  // namespace lora
