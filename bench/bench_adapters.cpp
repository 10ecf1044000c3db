// Mixed-batch serving: one frozen base, several adapters, each row of the batch asking for its
// own adapter (round-robin over the rows, the worst case for grouping). Against the merged
// forward of one adapter (the cost of serving a single task), and against merging per request
// (for each adapter: merge, forward its rows, unmerge), what serving without a mixed batch does.
// Ends with a table of ratios measured in this run. Float.
//
//   bench_adapters [--threads=N] [google benchmark flags]
#include <lora/linear.hpp>

#include "bench_common.hpp"

namespace {

using bench::Mat;
using bench::random;
using bench::set_flops;
using bench::Vec;

// A (d, d) layer with adapters "t0".."t{k-1}", each of rank r with non-zero A and B.
lora::LoraLinear<float> make_layer(Eigen::Index d, int r, int adapters) {
  lora::LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 2.0 * r;
  cfg.exact_unmerge = true;
  lora::LoraLinear<float> layer(random(d, d, 1) * (1.0f / std::sqrt(float(d))), Vec(random(d, 1, 2).col(0)), cfg, "t0");
  for (int k = 0; k < adapters; ++k) {
    const std::string name = "t" + std::to_string(k);
    cfg.seed = std::uint64_t(k);
    if (k > 0) layer.add_adapter(name, cfg);
    layer.set_lora_B(name, random(d, r, 3 + std::uint64_t(k)) * 0.01f);
  }
  return layer;
}

std::vector<std::string> round_robin(Eigen::Index n, int adapters) {
  std::vector<std::string> names;
  for (Eigen::Index i = 0; i < n; ++i) names.push_back("t" + std::to_string(i % adapters));
  return names;
}

void BM_MixedBatch(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1), r = state.range(2);
  const int k = int(state.range(3));
  bench::time_forward(state, make_layer(d, int(r), k), random(n, d, 4), round_robin(n, k));
  set_flops(state, 2.0 * n * d * d + 4.0 * n * d * r);
}

// One adapter merged: the cost of a batch that all asks for the same task.
void BM_LinearMerged(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1), r = state.range(2);
  auto layer = make_layer(d, int(r), 1);
  layer.merge();
  bench::time_forward(state, layer, random(n, d, 4));
  set_flops(state, 2.0 * n * d * d);
}

// Without mixed batches: per adapter, merge it, run its rows, unmerge (exact).
struct PerRequest {
  lora::LoraLinear<float> layer;
  std::vector<Mat> xs, ys;  // each adapter's rows
  PerRequest(Eigen::Index n, Eigen::Index d, int r, int k) : layer(make_layer(d, r, k)) {
    const Mat x = random(n, d, 4);
    for (int a = 0; a < k; ++a) {
      Mat rows((n - a + k - 1) / k, d);
      for (Eigen::Index i = a, j = 0; i < n; i += k, ++j) rows.row(j) = x.row(i);
      xs.push_back(rows);
    }
    ys.resize(std::size_t(k));
  }
  void run() {
    for (std::size_t a = 0; a < xs.size(); ++a) {
      layer.set_adapter("t" + std::to_string(a));
      layer.merge();
      layer.forward(xs[a], ys[a]);
    }
    layer.unmerge();
  }
};

void BM_MergePerRequest(benchmark::State& state) {
  const auto n = state.range(0), d = state.range(1), r = state.range(2);
  PerRequest p(n, d, int(r), int(state.range(3)));
  for (auto _ : state) {
    p.run();
    benchmark::DoNotOptimize(p.ys.back().data());
  }
  set_flops(state, 2.0 * n * d * d);
}

const std::vector<std::vector<std::int64_t>> kShapes = {{512, 1024, 8, 8}, {512, 4096, 16, 8}, {64, 1024, 8, 8}};

void register_all() {
  auto* mixed = benchmark::RegisterBenchmark("BM_MixedBatch", &BM_MixedBatch)->ArgNames({"n", "d", "r", "adapters"});
  auto* per = benchmark::RegisterBenchmark("BM_MergePerRequest", &BM_MergePerRequest)->ArgNames({"n", "d", "r", "adapters"});
  auto* merged = benchmark::RegisterBenchmark("BM_LinearMerged", &BM_LinearMerged)->ArgNames({"n", "d", "r"});
  for (auto* b : {mixed, per, merged}) b->UseRealTime()->Unit(benchmark::kMicrosecond);
  for (const auto& s : kShapes) {
    mixed->Args(s);
    per->Args(s);
    merged->Args({s[0], s[1], s[2]});
  }
}

void print_header(const char* title, int threads) {
  std::printf("\n%s (%d thread%s, float, adapters round-robin over the rows):\n", title, threads, threads == 1 ? "" : "s");
  std::printf("%-20s %16s %16s %10s\n", "n/d/r/adapters", "mixed/merged", "per-request", "target");
  std::printf("%-20s %16s %16s %10s\n", "", "(one adapter)", "merge/merged", "(n=512)");
}

void print_row(const std::vector<std::int64_t>& s, double mixed, double per) {
  char label[48];
  std::snprintf(label, sizeof label, "%lld/%lld/%lld/%lld", (long long)s[0], (long long)s[1], (long long)s[2], (long long)s[3]);
  std::printf("%-20s %16.3f %16.3f %10s\n", label, mixed, per, s[0] == 512 ? "<= 1.10" : "-");
}

void print_ratios(const bench::Times& t, int threads) {
  auto key = [](const std::vector<std::int64_t>& s, bool with_k) {
    std::string k = "n:" + std::to_string(s[0]) + "/d:" + std::to_string(s[1]) + "/r:" + std::to_string(s[2]);
    return with_k ? k + "/adapters:" + std::to_string(s[3]) : k;
  };
  print_header("Ratios of the fastest repetitions", threads);
  for (const auto& s : kShapes) {
    const double merged = bench::get(t, "BM_LinearMerged/" + key(s, false));
    print_row(s, bench::get(t, "BM_MixedBatch/" + key(s, true)) / merged, bench::get(t, "BM_MergePerRequest/" + key(s, true)) / merged);
  }
  print_header("Ratios, paired (median of 21 rounds)", threads);
  for (const auto& s : kShapes) {
    const auto n = s[0], d = s[1];
    const int r = int(s[2]), k = int(s[3]);
    auto merged = make_layer(d, r, 1);
    merged.merge();
    const auto mixed = make_layer(d, r, k);
    const auto names = round_robin(n, k);
    PerRequest per(n, d, r, k);
    const Mat x = random(n, d, 4);
    Mat y1, y2;
    const auto m = bench::paired_ratios({{"merged", [&] { merged.forward(x, y1); }},
                                         {"mixed", [&] { mixed.forward(x, names, y2); }},
                                         {"per-request", [&] { per.run(); }}});
    print_row(s, m[1], m[2]);
  }
}

}  // namespace

int main(int argc, char** argv) { return bench::main(argc, argv, "bench_adapters", register_all, print_ratios); }
