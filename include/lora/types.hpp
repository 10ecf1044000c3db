// The matrix types every header shares, and the one place that sets the thread count.
//
// Matrices are row-major, as PyTorch and safetensors store them: tokens are rows, a weight is
// (out, in), and a buffer read from a file can be wrapped with Eigen::Map without a copy.
#pragma once

#include <Eigen/Core>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

// The GEMM library CMake linked (LORA_BLAS, cmake/lora_blas.cmake): Eigen hands it float and
// double products (EIGEN_USE_BLAS); its thread count follows set_num_threads below.
#if defined(LORA_BLAS_OPENBLAS)
#include <lora/detail/openblas_kernels.hpp>
extern "C" void openblas_set_num_threads(int);
#elif defined(LORA_BLAS_BLIS)
extern "C" void bli_thread_set_num_threads(long);
#endif

namespace lora {

using Index = Eigen::Index;

template <class Scalar>
using Mat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Scalar>
using Vec = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
template <class Scalar>
using MatRef = Eigen::Ref<const Mat<Scalar>>;
template <class Scalar>
using VecRef = Eigen::Ref<const Vec<Scalar>>;
template <class Scalar>
using MatMap = Eigen::Map<Mat<Scalar>>;
template <class Scalar>
using ConstMatMap = Eigen::Map<const Mat<Scalar>>;

// Threads used by the products (Eigen's or the BLAS's) and the library's parallel loops (OpenMP).
// n <= 0 restores the default (all cores).
inline void set_num_threads(int n) {
#ifdef _OPENMP
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n <= 0 ? 0 : n);
#if defined(LORA_BLAS_OPENBLAS)
  openblas_set_num_threads(Eigen::nbThreads());
#elif defined(LORA_BLAS_BLIS)
  bli_thread_set_num_threads(Eigen::nbThreads());
#endif
}

namespace detail {
#if defined(LORA_BLAS_OPENBLAS)
// OpenBLAS's kernels, moved off its Prescott fallback on a CPU it does not know
// (detail/openblas_kernels.hpp). Once per program, during its static initialisation.
inline const bool openblas_kernels_chosen = (openblas_choose_kernels(), true);
#elif defined(LORA_BLAS_BLIS)
// BLIS runs one thread unless told otherwise; start it at the library's default (all cores, or
// OMP_NUM_THREADS), as OpenBLAS's OpenMP build and Eigen do. Once per program.
inline const bool blis_threads_set = (bli_thread_set_num_threads(Eigen::nbThreads()), true);
#endif
}  // namespace detail

// The GEMM behind the products: "eigen", "blis", or "openblas, <name> kernels" (the kernels
// OpenBLAS runs now).
inline std::string gemm_library() {
#if defined(LORA_BLAS_OPENBLAS)
  return "openblas, " + detail::openblas_kernels() + " kernels";
#elif defined(LORA_BLAS_BLIS)
  return "blis";
#else
  return "eigen";
#endif
}

inline int num_threads() { return Eigen::nbThreads(); }

namespace detail {

// f(i) for i in [0, n): on all threads when parallel (and OpenMP is on), else on this one with no
// OpenMP region at all. Not `#pragma omp parallel for if (cond)`: with cond false that still
// opens a team of one, inside which each Eigen GEMM opens a nested team of its own (Eigen only
// stays serial inside a team of several), ~10× the cost of a small product. Inside the parallel
// loop Eigen's products run on one thread each. dynamic: schedule(dynamic) for uneven tasks.
template <class I, class F>
void parallel_for(I n, bool parallel, F f, bool dynamic = false) {
#ifdef _OPENMP
  if (parallel && n > 1 && omp_get_max_threads() > 1) {
    if (dynamic) {
#pragma omp parallel for schedule(dynamic)
      for (I i = 0; i < n; ++i) f(i);
    } else {
#pragma omp parallel for schedule(static)
      for (I i = 0; i < n; ++i) f(i);
    }
    return;
  }
#endif
  (void)parallel;
  (void)dynamic;
  for (I i = 0; i < n; ++i) f(i);
}

}  // namespace detail

}  // namespace lora
