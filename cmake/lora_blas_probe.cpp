// Configure-time probe for LORA_BLAS=auto (cmake/lora_blas.cmake): times one thread of single-
// precision GEMM on the shapes the library spends its time in, and prints a score (lower is
// faster). Built once against each candidate BLAS (calling sgemm_, as Eigen does under
// EIGEN_USE_BLAS) and once with LORA_PROBE_EIGEN (Eigen's own kernels, the flags the library's
// programs use). Against OpenBLAS, a second line names the kernels it runs, chosen as the
// library chooses them (lora/detail/openblas_kernels.hpp: not Prescott on a CPU it does not know).
//
//   C (m, n) = A (m, k) · B (k, n), column-major; best of 7 runs per shape.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#ifdef LORA_PROBE_EIGEN
#include <Eigen/Core>
#else
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
extern "C" void bli_thread_set_num_threads(long) __attribute__((weak));
#include <lora/detail/openblas_kernels.hpp>
#endif

namespace {

double best_us(int m, int n, int k) {
  std::vector<float> a(std::size_t(m) * k), b(std::size_t(k) * n), c(std::size_t(m) * n);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(i % 17) / 17.0f - 0.5f;
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(i % 13) / 13.0f - 0.5f;
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
#ifdef LORA_PROBE_EIGEN
    Eigen::Map<Eigen::MatrixXf> A(a.data(), m, k), B(b.data(), k, n), C(c.data(), m, n);
    C.noalias() = A * B;
#else
    const float one = 1.0f, zero = 0.0f;
    sgemm_("N", "N", &m, &n, &k, &one, a.data(), &m, b.data(), &k, &zero, c.data(), &m);
#endif
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  return best;
}

}  // namespace

int main() {
#ifdef LORA_PROBE_EIGEN
  Eigen::setNbThreads(1);
#else
  const std::string core = lora::detail::openblas_choose_kernels();
  if (openblas_set_num_threads) openblas_set_num_threads(1);
  if (bli_thread_set_num_threads) bli_thread_set_num_threads(1);
#endif
  // A training step's projections (2048 tokens, d 128 -> 128 and -> 344, 344 -> 128), a larger
  // layer (512 tokens, 1024 -> 1024), decoding 8 rows (1024 -> 1024, 128 -> 344). Each shape
  // weighs the same: the score is the mean time per million multiply-adds, in nanoseconds.
  const int shapes[][3] = {{2048, 128, 128}, {2048, 344, 128}, {2048, 128, 344}, {512, 1024, 1024}, {8, 1024, 1024}, {8, 344, 128}};
  double score = 0;
  for (const auto& s : shapes) score += best_us(s[0], s[1], s[2]) * 1e9 / (double(s[0]) * s[1] * s[2]);
  std::printf("%.0f\n", score / (sizeof shapes / sizeof shapes[0]));
#ifndef LORA_PROBE_EIGEN
  if (!core.empty()) std::printf("%s\n", core.c_str());
#endif
  return 0;
}
