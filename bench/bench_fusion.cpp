// Fusing LoRA's products into the base product, measured: is one GEMM over stacked operands
// faster than the base GEMM and the thin products apart (what LoraLinear does)?
//
//   forward   apart:    y = x·Wᵀ;  t = x·Aᵀ (thin kernel);  y += s·t·Bᵀ (GEMM, β = 1)
//             stacked:  [y | t] = x·[W; A]ᵀ in one GEMM (x read and packed once), into a buffer
//                       (n, out + r): then y is copied out (y must be (n, out) contiguous), or
//                       left strided in the buffer (no copy: what a layer could do only if its
//                       output were a view of a wider buffer)
//   dX        apart:    dx = dy·W;  g = s·dy·B (thin kernel);  dx += g·A (GEMM, β = 1)
//             stacked:  dx = [dy | g]·[W; A] in one GEMM, dy copied into the wider buffer
//
// Times are divided by the base product alone (merged forward: x·Wᵀ; dX: dy·W). The stacked
// operands [W; A] are built once, outside the timing (a layer would hold them: a second copy of
// W, or W allocated with r spare rows). Median of 21 rounds, each round every case back to back.
//
//   bench_fusion [--threads N] [--quick]
#include <lora/detail/thin_products.hpp>
#include <lora/types.hpp>

#include "plain_bench.hpp"

#include <cstdio>
#include <string>
#include <vector>

using Mat = lora::Mat<float>;
using lora::Index;

int main(int argc, char** argv) {
  const bench::PlainArgs args = bench::plain_args(argc, argv, "bench_fusion");
  const int threads = args.threads;
  const bool quick = args.quick;
  lora::set_num_threads(threads);
  const int rounds = quick ? 1 : 21;
  std::printf("bench_fusion: %d thread(s), float, median of %d rounds; time / the base product's\n", threads, rounds);
  std::printf("%-16s | %12s %7s %14s %15s | %12s %7s %8s\n", "n / d / r", "x.W^T us", "apart", "stacked+copy", "stacked strided",
              "dy.W us", "apart", "stacked");
  struct Shape {
    Index n, d, r;
  };
  const std::vector<Shape> shapes = quick ? std::vector<Shape>{{64, 128, 8}}
                                          : std::vector<Shape>{{512, 1024, 8}, {512, 1024, 16}, {512, 1024, 64}, {2048, 128, 8}, {512, 4096, 16}};
  for (const Shape& sh : shapes) {
    const Index n = sh.n, d = sh.d, r = sh.r;
    const float s = 2.0f;
    const Mat x = Mat::Random(n, d), W = Mat::Random(d, d), A = Mat::Random(r, d), B = Mat::Random(d, r), dy = Mat::Random(n, d);
    Mat WA(d + r, d);
    WA.topRows(d) = W;
    WA.bottomRows(r) = A;
    Mat y(n, d), t(n, r), dx(n, d), g(n, r), Z(n, d + r), DG(n, d + r);
    std::vector<double> base, apart, stacked, strided, dbase, dapart, dstacked;
    for (int k = 0; k < rounds; ++k) {
      base.push_back(bench::micros([&] { y.noalias() = x * W.transpose(); }));
      apart.push_back(bench::micros([&] {
        y.noalias() = x * W.transpose();
        lora::detail::rank_cols_t<float>(t, 1.0f, x, A);
        y.noalias() += s * t * B.transpose();
      }));
      stacked.push_back(bench::micros([&] {
        Z.noalias() = x * WA.transpose();
        y = Z.leftCols(d);
        y.noalias() += s * Z.rightCols(r) * B.transpose();
      }));
      strided.push_back(bench::micros([&] {
        Z.noalias() = x * WA.transpose();
        Z.leftCols(d).noalias() += s * Z.rightCols(r) * B.transpose();
      }));
      dbase.push_back(bench::micros([&] { dx.noalias() = dy * W; }));
      dapart.push_back(bench::micros([&] {
        dx.noalias() = dy * W;
        lora::detail::rank_cols<float>(g, s, dy, B);
        dx.noalias() += g * A;
      }));
      dstacked.push_back(bench::micros([&] {
        DG.leftCols(d) = dy;
        lora::detail::rank_cols<float>(g, s, dy, B);
        DG.rightCols(r) = g;
        dx.noalias() = DG * WA;
      }));
    }
    // The products agree (the stacked ones add the same terms in another order).
    const Mat want = x * W.transpose() + s * (x * A.transpose()) * B.transpose();
    if ((Z.leftCols(d) - want).norm() > 1e-4f * want.norm() || (y - want).norm() > 1e-4f * want.norm()) {
      std::fprintf(stderr, "bench_fusion: the stacked forward differs from the product apart\n");
      return 1;
    }
    char label[48];
    std::snprintf(label, sizeof label, "%ld / %ld / %ld", long(n), long(d), long(r));
    const double b = bench::median(base), db = bench::median(dbase);
    std::printf("%-16s | %12.1f %7.3f %14.3f %15.3f | %12.1f %7.3f %8.3f\n", label, b, bench::median(apart) / b, bench::median(stacked) / b,
                bench::median(strided) / b, db, bench::median(dapart) / db, bench::median(dstacked) / db);
  }
  return 0;
}
