// Frozen weights in bf16: products with W widened to float (the library's FrozenWeights::bf16,
// models/bf16_weights.hpp) against a bf16 GEMM (oneDNN's matmul, which runs on AVX512-BF16's
// dot-product instructions where the CPU has them), and against W held in float.
//
//   bench_bf16 [--threads N] [--quick]
//
// A bf16 GEMM multiplies bf16 by bf16: x must be rounded to bf16 too, which costs accuracy that
// widening W does not (bf16 keeps 8 bits of mantissa: x·Wᵀ comes out ~1e-3 relative from the
// float product, where the library's parity with transformers asks 1e-5). The table also times
// x split into two bf16 terms (x ≈ hi + lo, two GEMMs summed), the cheapest way to get accuracy
// back. Errors are relative (Frobenius) to the product in double of the same bf16 W and float x.
// Shapes: the text demo's linears (2048 rows of 128 -> 128 / 344), the d 1024 model's (512 rows,
// 1024 -> 1024 / 2816), and decoding's 8 rows. Median of 15 rounds, each case back to back.
// Built when oneDNN is found (Debian's libdnnl-dev); Debian's OpenBLAS has no bf16 GEMM
// (cblas_sbgemm is declared but not built).
#include <lora/models/bf16_weights.hpp>
#include <lora/types.hpp>

#include "plain_bench.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using Mat = lora::Mat<float>;
using lora::Index;

double rel(const Mat& got, const Eigen::MatrixXd& want) { return (got.cast<double>() - want).norm() / want.norm(); }

// y (n, out) = [β·y +] xb (n, in, bf16)·Wᵀ with W (out, in) bf16 row-major: oneDNN's matmul of
// src (n, in) by weights (in, out) stored transposed ("ba").
struct Bf16Gemm {
  dnnl::matmul mm;
  dnnl::memory src, wei, dst;
  std::string impl;  // the kernel oneDNN chose, e.g. brg:avx512_core_bf16
  Bf16Gemm(dnnl::engine& eng, Index n, Index in, Index out, bool accumulate, void* x, const void* w, float* y) {
    using tag = dnnl::memory::format_tag;
    using dt = dnnl::memory::data_type;
    const dnnl::memory::desc sd({n, in}, dt::bf16, tag::ab), wd({in, out}, dt::bf16, tag::ba), dd({n, out}, dt::f32, tag::ab);
    dnnl::primitive_attr attr;
    if (accumulate) {
      dnnl::post_ops po;
      po.append_sum(1.0f);
      attr.set_post_ops(po);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(sd, wd, dd), attr, eng);
    mm = dnnl::matmul(pd);
    src = dnnl::memory(sd, eng, x);
    wei = dnnl::memory(wd, eng, const_cast<void*>(w));
    dst = dnnl::memory(dd, eng, y);
    impl = pd.impl_info_str();
  }
  void run(dnnl::stream& s) {
    mm.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    s.wait();
  }
};

}  // namespace

int main(int argc, char** argv) {
  const bench::PlainArgs args = bench::plain_args(argc, argv, "bench_bf16");
  const int threads = args.threads;
  const bool quick = args.quick;
  lora::set_num_threads(threads);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  const int rounds = quick ? 1 : 15;
  std::printf("bench_bf16: %d thread(s), median of %d rounds; time / W in float's, error relative to double\n", threads, rounds);
  std::printf("%-20s %10s | %-22s | %-22s | %-22s\n", "n x in -> out", "float W us", "bf16 W widened", "bf16 GEMM, x rounded", "bf16 GEMM, x = hi + lo");
  struct Shape {
    Index n, in, out;
  };
  const std::vector<Shape> shapes = quick ? std::vector<Shape>{{64, 128, 96}, {8, 128, 96}}
                                          : std::vector<Shape>{{2048, 128, 128}, {2048, 128, 344}, {512, 1024, 1024}, {512, 1024, 2816},
                                                               {8, 128, 344}, {8, 1024, 1024}, {8, 1024, 2816}};
  for (const Shape& sh : shapes) {
    const Index n = sh.n, in = sh.in, out = sh.out;
    const Mat x = Mat::Random(n, in);
    const lora::Bf16Mat wb = (Mat::Random(out, in) * 0.05f).cast<Eigen::bfloat16>();  // a bf16 checkpoint's weights
    const Mat wf = wb.cast<float>();
    const Eigen::MatrixXd want = x.cast<double>() * wf.cast<double>().transpose();
    Mat y_float(n, out), y_widened(n, out), y_rounded(n, out), y_split(n, out);
    lora::Bf16Mat xhi(n, in), xlo(n, in);
    Bf16Gemm rounded(eng, n, in, out, false, xhi.data(), wb.data(), y_rounded.data());
    Bf16Gemm hi(eng, n, in, out, false, xhi.data(), wb.data(), y_split.data());
    Bf16Gemm lo(eng, n, in, out, true, xlo.data(), wb.data(), y_split.data());
    std::vector<double> t_float, t_widened, t_rounded, t_split;
    for (int r = 0; r < rounds; ++r) {
      t_float.push_back(bench::micros([&] { y_float.noalias() = x * wf.transpose(); }));
      t_widened.push_back(bench::micros([&] { lora::times_transposed<float>(x, wb, y_widened); }));
      t_rounded.push_back(bench::micros([&] {
        xhi = x.cast<Eigen::bfloat16>();
        rounded.run(strm);
      }));
      t_split.push_back(bench::micros([&] {
        for (Index i = 0; i < x.size(); ++i) {
          xhi.data()[i] = Eigen::bfloat16(x.data()[i]);
          xlo.data()[i] = Eigen::bfloat16(x.data()[i] - static_cast<float>(xhi.data()[i]));
        }
        hi.run(strm);
        lo.run(strm);
      }));
    }
    // Widening is exact, so only the order of the sums differs; hi + lo keeps ~16 bits of x.
    if (rel(y_widened, want) > 1e-6 || rel(y_split, want) > 1e-5) {
      std::fprintf(stderr, "bench_bf16: a product is further from the reference than its rounding allows\n");
      return 1;
    }
    const double f = bench::median(t_float);
    char label[64];
    std::snprintf(label, sizeof label, "%ld x %ld -> %ld", long(n), long(in), long(out));
    std::printf("%-20s %10.1f | %5.2f  err %.1e       | %5.2f  err %.1e       | %5.2f  err %.1e   (%s)\n", label, f,
                bench::median(t_widened) / f, rel(y_widened, want), bench::median(t_rounded) / f, rel(y_rounded, want), bench::median(t_split) / f,
                rel(y_split, want), rounded.impl.c_str());
  }
  return 0;
}
