// What the plain measuring programs (bench_fusion, bench_bf16: no Google Benchmark) share: a
// timer, the median of rounds, and the arguments --threads N and --quick.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace bench {

// Microseconds that f() takes.
template <class F>
double micros(F f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct PlainArgs {
  int threads = 1;
  bool quick = false;
};

// --threads N (or --threads=N) and --quick; anything else: a usage line and exit status 2.
inline PlainArgs plain_args(int argc, char** argv, const char* program) {
  PlainArgs a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--threads" && i + 1 < argc) a.threads = std::atoi(argv[++i]);
    else if (s.rfind("--threads=", 0) == 0) a.threads = std::atoi(s.c_str() + 10);
    else if (s == "--quick") a.quick = true;
    else {
      std::fprintf(stderr, "%s: unknown argument %s (%s [--threads N] [--quick])\n", program, s.c_str(), program);
      std::exit(2);
    }
  }
  if (a.threads < 1) {
    std::fprintf(stderr, "%s: --threads must be at least 1\n", program);
    std::exit(2);
  }
  return a;
}

}  // namespace bench
