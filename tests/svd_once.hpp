// Eigen's SVDs over double are the costliest templates in the tests to compile: BDCSVD (svd.hpp,
// combine.hpp) takes about a minute per file at -O2 and two under the sanitizers. The files that
// use them include this header first; svd_once.cpp, in lora_fixture_cases, instantiates both
// once for all of them.
#pragma once

#include <Eigen/SVD>

extern template class Eigen::BDCSVD<Eigen::MatrixXd>;
extern template class Eigen::JacobiSVD<Eigen::MatrixXd>;
