// What the benchmark programs share: random inputs, a reporter that keeps each benchmark's
// fastest repetition, and a main that takes --threads=N and prints the program's ratio table.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/types.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <malloc.h>

namespace bench {

using Mat = lora::Mat<float>;
using Vec = lora::Vec<float>;
using Times = std::map<std::string, double>;  // name (without /real_time) -> seconds per iteration

inline Mat random(Eigen::Index r, Eigen::Index c, std::uint64_t seed, float scale = 1.0f) {
  lora::detail::Rng rng(seed);
  Mat m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = scale * static_cast<float>(rng.normal());
  return m;
}

inline void set_flops(benchmark::State& state, double flops) {
  state.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// The timing loop of an evaluation forward into a reused output: layer.forward(x, args..., y).
template <class Layer, class... Args>
void time_forward(benchmark::State& state, const Layer& layer, const Mat& x, const Args&... args) {
  Mat y;
  for (auto _ : state) {
    layer.forward(x, args..., y);
    benchmark::DoNotOptimize(y.data());
  }
}

inline double get(const Times& t, const std::string& key) {
  auto it = t.find(key);
  return it == t.end() ? NAN : it->second;
}

struct Case {
  std::string name;
  std::function<void()> run;
};

// Paired ratios, robust to the slow drifts of a shared machine: in each round every case runs
// back to back for about min_seconds (the same call count for all, fixed from the first case),
// and its time is divided by the first case's time of that round. Returns each case's median
// ratio over the rounds (the first case's is 1).
inline std::vector<double> paired_ratios(const std::vector<Case>& cases, int rounds = 21, double min_seconds = 0.05) {
  using clock = std::chrono::steady_clock;
  auto time_calls = [](const Case& c, long calls) {
    const auto t0 = clock::now();
    for (long i = 0; i < calls; ++i) c.run();
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  long calls = 1;
  time_calls(cases[0], 1);  // warm up
  while (time_calls(cases[0], calls) < min_seconds) calls *= 2;
  std::vector<std::vector<double>> ratios(cases.size());
  for (int r = 0; r < rounds; ++r) {
    const double base = time_calls(cases[0], calls);
    for (std::size_t k = 1; k < cases.size(); ++k) ratios[k].push_back(time_calls(cases[k], calls) / base);
  }
  std::vector<double> median(cases.size(), 1.0);
  for (std::size_t k = 1; k < cases.size(); ++k) {
    auto& v = ratios[k];
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    median[k] = v[v.size() / 2];
  }
  return median;
}

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  Times best;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      if (run.run_type != Run::RT_Iteration || run.error_occurred) continue;
      const double t = run.real_accumulated_time / static_cast<double>(run.iterations);
      std::string name = run.run_name.str();  // "BM_X/n:512/d:1024/r:8/real_time"
      if (auto cut = name.rfind("/real_time"); cut != std::string::npos) name.erase(cut);
      auto it = best.find(name);
      if (it == best.end() || t < it->second) best[name] = t;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

// Parses --threads=N (default 1), repeats each benchmark 5 times in random interleaved order
// unless --benchmark_repetitions is given, runs, then calls print(times, threads) unless
// --times-only is given (bench/compare_pytorch reads the times alone).
inline int main(int argc, char** argv, const char* program, const std::function<void()>& register_all,
                const std::function<void(const Times&, int)>& print) {
  int threads = 1;
  bool reps_given = false, times_only = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads = std::atoi(argv[i] + 10);
      continue;
    }
    if (std::strcmp(argv[i], "--times-only") == 0) {
      times_only = true;
      continue;
    }
    if (std::strncmp(argv[i], "--benchmark_repetitions", 23) == 0) reps_given = true;
    args.push_back(argv[i]);
  }
  std::string reps = "--benchmark_repetitions=5", interleave = "--benchmark_enable_random_interleaving=true";
  if (!reps_given) {
    args.push_back(reps.data());
    args.push_back(interleave.data());
  }
  int n = static_cast<int>(args.size());
  // Keep freed memory in the process: otherwise glibc returns large blocks (outputs, Eigen's GEMM
  // packing buffers) to the OS between calls and every call pays page faults again, a cost that
  // depends on what ran just before (milliseconds per call on this VM). Same for every case.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  lora::set_num_threads(threads);
  std::printf("%s: %d thread%s (Eigen reports %d), products in %s\n", program, threads, threads == 1 ? "" : "s",
              lora::num_threads(), lora::gemm_library().c_str());
  register_all();
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  if (!times_only) print(reporter.best, threads);
  benchmark::Shutdown();
  return 0;
}

}  // namespace bench
