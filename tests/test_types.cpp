// types.hpp: the thread count, and the GEMM library behind the products with the kernels it runs
// (detail/openblas_kernels.hpp).
#include <lora/types.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

namespace {

// C = A·B in float through Eigen (under LORA_BLAS, the library's sgemm), against a double loop.
double product_error(int n) {
  lora::Mat<float> a(n, n), b(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      a(i, j) = float((i * 7 + j * 3) % 11) / 11.0f - 0.5f;
      b(i, j) = float((i * 5 + j * 2) % 13) / 13.0f - 0.5f;
    }
  lora::Mat<float> c(n, n);
  c.noalias() = a * b;
  double worst = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0;
      for (int k = 0; k < n; ++k) ref += double(a(i, k)) * double(b(k, j));
      worst = std::max(worst, std::abs(double(c(i, j)) - ref));
    }
  return worst;
}

}  // namespace

TEST(Types, SetNumThreadsSetsTheCountAndZeroRestoresTheDefault) {
  lora::set_num_threads(1);
  EXPECT_EQ(lora::num_threads(), 1);
  lora::set_num_threads(0);
#ifdef _OPENMP
  EXPECT_EQ(lora::num_threads(), omp_get_num_procs());
#endif
}

#if defined(LORA_BLAS_OPENBLAS)
namespace {
void force_openblas_kernels(const char* core) {
  ASSERT_TRUE(lora::detail::openblas_set_kernels(core));
  ASSERT_EQ(lora::detail::openblas_kernels(), core);
}
}  // namespace

TEST(Types, OpenBlasLeavesItsPrescottFallbackForThisCpusKernels) {
  ASSERT_TRUE(gotoblas_dynamic_init && gotoblas_dynamic_quit) << "Debian's OpenBLAS is DYNAMIC_ARCH";
  const std::string linked = lora::gemm_library();
  ASSERT_EQ(linked.rfind("openblas, ", 0), 0u) << linked;
  const std::string want = lora::detail::openblas_kernels_for_cpu();
  if (want.empty()) GTEST_SKIP() << "a CPU without AVX2: Prescott is OpenBLAS's best";
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    EXPECT_EQ(linked.find("Prescott"), std::string::npos) << linked;
  }
  const std::string loaded = lora::detail::openblas_kernels();
  const char* user = std::getenv("OPENBLAS_CORETYPE");
  const std::string user_coretype = user ? user : "";
  unsetenv("OPENBLAS_CORETYPE");

  // Back on the fallback, as OpenBLAS loads on a CPU it does not know: moved to `want`, the
  // environment left without OPENBLAS_CORETYPE, and the products still right.
  force_openblas_kernels("Prescott");
  EXPECT_EQ(lora::gemm_library(), "openblas, Prescott kernels");
  EXPECT_EQ(lora::detail::openblas_choose_kernels(), want);
  EXPECT_EQ(lora::gemm_library(), "openblas, " + want + " kernels");
  EXPECT_EQ(std::getenv("OPENBLAS_CORETYPE"), nullptr);
  EXPECT_LT(product_error(96), 1e-4);

  // Setting kernels leaves a variable the user set as it was.
  setenv("OPENBLAS_CORETYPE", "Haswell", 1);
  force_openblas_kernels("Prescott");
  EXPECT_STREQ(std::getenv("OPENBLAS_CORETYPE"), "Haswell");

  // A user's OPENBLAS_CORETYPE wins: Prescott pinned stays Prescott.
  setenv("OPENBLAS_CORETYPE", "Prescott", 1);
  EXPECT_EQ(lora::detail::openblas_choose_kernels(), "Prescott");
  EXPECT_STREQ(std::getenv("OPENBLAS_CORETYPE"), "Prescott");
  unsetenv("OPENBLAS_CORETYPE");
  EXPECT_LT(product_error(96), 1e-4);

  force_openblas_kernels(loaded.c_str());
  EXPECT_EQ(lora::detail::openblas_kernels(), loaded);
  if (user) setenv("OPENBLAS_CORETYPE", user_coretype.c_str(), 1);
}
#else
TEST(Types, GemmLibraryNamesEigenOrBlis) {
  const std::string linked = lora::gemm_library();
#if defined(LORA_BLAS_BLIS)
  EXPECT_EQ(linked, "blis");
#else
  EXPECT_EQ(linked, "eigen");
#endif
  EXPECT_LT(product_error(96), 1e-4);
}
#endif
