// Inference latency of a model against the base model's, measured example by example in turn (so
// both see the same machine; which goes first alternates): each the best of `passes` passes over
// `count` examples, in seconds per example. run(which, i) runs example i through the model
// (which 0) or the base (which 1) and returns a value of its output, summed so that no forward
// is optimised away (and checked to be finite).
#pragma once

#include <lora/error.hpp>

#include <algorithm>
#include <chrono>

namespace demo {

struct Latency {
  double seconds, base_seconds;  // per example
};

template <class Run>
Latency paired_latency(long count, int passes, Run run) {
  using clock = std::chrono::steady_clock;
  double best[2] = {1e300, 1e300}, sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    double total[2] = {0, 0};
    for (long i = 0; i < count; ++i)
      for (int k = 0; k < 2; ++k) {
        const int which = int((i + pass + k) % 2);
        const auto start = clock::now();
        sink += run(which, i);
        total[which] += std::chrono::duration<double>(clock::now() - start).count();
      }
    for (int w = 0; w < 2; ++w) best[w] = std::min(best[w], total[w]);
  }
  if (!(sink == sink)) lora::detail::fail("latency: the outputs are not finite");
  return {best[0] / double(count), best[1] / double(count)};
}

}  // namespace demo
