// Merged vs unmerged LoRA inference, training steps and merging, for float, against a plain
// Eigen GEMM of the same shape (the ceiling). Ends with a table of ratios measured in this run.
//
//   bench_linear [--threads=N] [google benchmark flags]
//
// Each benchmark is repeated (5 times unless --benchmark_repetitions is given), in random
// interleaved order. Two ratio tables follow: one from the fastest repetitions, one paired
// (each case timed right after the merged forward, median of 21 rounds).
#include <lora/linear.hpp>

#include "bench_common.hpp"

namespace {

using bench::Mat;
using bench::random;
using bench::set_flops;
using bench::Vec;

lora::LoraLinear<float> make_layer(Eigen::Index d, int r) {
  lora::LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 2.0 * r;
  lora::LoraLinear<float> layer(random(d, d, 1) * (1.0f / std::sqrt(float(d))), Vec(random(d, 1, 2).col(0)), cfg);
  layer.set_lora_B(random(d, r, 3) * 0.01f);
  return layer;
}

void BM_LinearMerged(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1);
  auto layer = make_layer(d, int(state.range(2)));
  layer.merge();
  bench::time_forward(state, layer, random(n, d, 4));
  set_flops(state, 2.0 * n * d * d);
}

void BM_LinearUnmerged(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1), r = state.range(2);
  bench::time_forward(state, make_layer(d, int(r)), random(n, d, 4));
  set_flops(state, 2.0 * n * d * d + 4.0 * n * d * r);
}

// The forward of a LoRA layer that forms W + s·B·A on every call.
void naive_forward(const lora::LoraLinear<float>& layer, const Mat& W, const Mat& x, Mat& Weff, Mat& y) {
  Weff = W + layer.scaling() * layer.lora_B() * layer.lora_A();
  y.noalias() = x * Weff.transpose();
  y.rowwise() += layer.bias().transpose();
}

void BM_LinearNaiveBA(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1), r = state.range(2);
  auto layer = make_layer(d, int(r));
  const Mat W = layer.weight();
  Mat x = random(n, d, 4), y, Weff;
  for (auto _ : state) {
    naive_forward(layer, W, x, Weff, y);
    benchmark::DoNotOptimize(y.data());
  }
  set_flops(state, 2.0 * n * d * d + 2.0 * d * d * r);
}

void BM_LinearTrainStep(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1), r = state.range(2);
  auto layer = make_layer(d, int(r));
  Mat x = random(n, d, 4), dy = random(n, d, 5), y, dx;
  for (auto _ : state) {
    layer.forward_train(x, y);
    layer.backward(dy, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  set_flops(state, 4.0 * n * d * d + 12.0 * n * d * r);
}

void BM_LinearMerge(benchmark::State& state) {
  const auto d = state.range(0), r = state.range(1);
  auto layer = make_layer(d, int(r));
  for (auto _ : state) {
    layer.merge();
    layer.unmerge();
  }
  set_flops(state, 4.0 * d * d * r);
}

void BM_Gemm(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1);
  Mat x = random(n, d, 4), W = random(d, d, 1), y(n, d);
  for (auto _ : state) {
    y.noalias() = x * W.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  set_flops(state, 2.0 * n * d * d);
}

const std::vector<std::vector<std::int64_t>> kShapes = {
    {1, 1024, 8}, {64, 1024, 8}, {512, 1024, 8}, {512, 4096, 16}, {512, 1024, 64}};

void register_all() {
  for (auto* fn : {&BM_LinearMerged, &BM_LinearUnmerged, &BM_LinearNaiveBA, &BM_LinearTrainStep}) {
    const char* name = fn == &BM_LinearMerged     ? "BM_LinearMerged"
                       : fn == &BM_LinearUnmerged ? "BM_LinearUnmerged"
                       : fn == &BM_LinearNaiveBA  ? "BM_LinearNaiveBA"
                                                  : "BM_LinearTrainStep";
    auto* b = benchmark::RegisterBenchmark(name, fn)->ArgNames({"n", "d", "r"})->UseRealTime()->Unit(benchmark::kMicrosecond);
    for (const auto& s : kShapes) b->Args(s);
  }
  auto* m = benchmark::RegisterBenchmark("BM_LinearMerge", &BM_LinearMerge)->ArgNames({"d", "r"})->UseRealTime()->Unit(benchmark::kMicrosecond);
  auto* g = benchmark::RegisterBenchmark("BM_Gemm", &BM_Gemm)->ArgNames({"n", "d"})->UseRealTime()->Unit(benchmark::kMicrosecond);
  for (const auto& s : kShapes) {
    m->Args({s[1], s[2]});
    g->Args({s[0], s[1]});
  }
}

void print_header(const char* title, int threads) {
  std::printf("\n%s (%d thread%s, float):\n", title, threads, threads == 1 ? "" : "s");
  std::printf("%-16s %12s %12s %12s %14s %16s\n", "n/d/r", "unmerged/", "naive BA/", "train step/", "merged GFLOP/s", "unmerged target");
  std::printf("%-16s %12s %12s %12s %14s %16s\n", "", "merged", "merged", "merged", "/ GEMM GFLOP/s", "(n=512)");
}

void print_row(const std::vector<std::int64_t>& s, double unmerged, double naive, double train, double gemm) {
  const double d = double(s[1]), r = double(s[2]);
  const double target = std::max(1.05, 1.03 * (1 + r * 2 * d / (d * d)));
  char label[32], tgt[32];
  std::snprintf(label, sizeof label, "%lld/%lld/%lld", (long long)s[0], (long long)s[1], (long long)s[2]);
  std::snprintf(tgt, sizeof tgt, s[0] == 512 ? "<= %.3f" : "-", target);
  std::printf("%-16s %12.3f %12.3f %12.3f %14.3f %16s\n", label, unmerged, naive, train, gemm, tgt);
}

// Two tables from this run: ratios of the fastest Google Benchmark repetitions, and paired
// ratios (each case timed right after the merged forward, median of 21 rounds), which drifts of
// a shared machine disturb far less.
void print_ratios(const bench::Times& t, int threads) {
  print_header("Ratios of the fastest repetitions", threads);
  for (const auto& s : kShapes) {
    const std::string nd = "n:" + std::to_string(s[0]) + "/d:" + std::to_string(s[1]);
    const std::string ndr = nd + "/r:" + std::to_string(s[2]);
    const double merged = bench::get(t, "BM_LinearMerged/" + ndr);
    print_row(s, bench::get(t, "BM_LinearUnmerged/" + ndr) / merged, bench::get(t, "BM_LinearNaiveBA/" + ndr) / merged,
              bench::get(t, "BM_LinearTrainStep/" + ndr) / merged, bench::get(t, "BM_Gemm/" + nd) / merged);
  }
  print_header("Ratios, paired (median of 21 rounds)", threads);
  for (const auto& s : kShapes) {
    const auto n = s[0], d = s[1];
    auto merged = make_layer(d, int(s[2]));
    merged.merge();
    auto unmerged = make_layer(d, int(s[2]));
    const Mat W = unmerged.weight(), x = random(n, d, 4), dy = random(n, d, 5);
    Mat y1, y2, y3, y4, dx, Weff, yg(n, d);
    const auto m = bench::paired_ratios({{"merged", [&] { merged.forward(x, y1); }},
                                         {"unmerged", [&] { unmerged.forward(x, y2); }},
                                         {"naive", [&] { naive_forward(unmerged, W, x, Weff, y3); }},
                                         {"train", [&] { unmerged.forward_train(x, y4); unmerged.backward(dy, dx); }},
                                         {"gemm", [&] { yg.noalias() = x * W.transpose(); }}});
    print_row(s, m[1], m[2], m[3], m[4]);
  }
  std::printf("Targets at n=512: unmerged/merged as above, train step/merged <= 2.3, merged/GEMM >= 0.9.\n");
}

}  // namespace

int main(int argc, char** argv) { return bench::main(argc, argv, "bench_linear", register_all, print_ratios); }
