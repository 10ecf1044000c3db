// Multi-head self-attention with LoRA on q, k, v, o: merged vs unmerged inference and a
// training step, float, batch 4, T = 128, d_model 512, 8 heads, r = 8, causal mask.
//
//   bench_attention [--threads=N] [google benchmark flags]
#include <lora/attention.hpp>

#include "bench_common.hpp"

namespace {

using bench::Mat;
using bench::random;

constexpr int kBatch = 4, kT = 128, kD = 512, kHeads = 8, kR = 8;

lora::LoraAttention<float> make_attention() {
  lora::AttentionWeights<float> w;
  const float s = 1.0f / std::sqrt(float(kD));
  w.q_proj = random(kD, kD, 1, s);
  w.k_proj = random(kD, kD, 2, s);
  w.v_proj = random(kD, kD, 3, s);
  w.o_proj = random(kD, kD, 4, s);
  w.q_bias = w.k_bias = w.v_bias = w.o_bias = random(kD, 1, 5, 0.1f).col(0);
  lora::AttentionConfig cfg;
  cfg.heads = kHeads;
  cfg.lora.r = kR;
  cfg.lora.alpha = 16;
  cfg.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  lora::LoraAttention<float> att(std::move(w), cfg);
  for (int p = 0; p < 4; ++p) att.lora(att.kNames[p])->set_lora_B(random(kD, kR, 10 + p, 0.01f));
  return att;
}

double forward_flops() {
  const double n = kBatch * kT;
  return 4 * 2 * n * kD * kD + 4 * n * kT * kD;  // four projections + scores and P·V
}

void run_forward(benchmark::State& state, bool merged) {
  auto att = make_attention();
  if (merged) att.merge();
  const Mat x = random(kBatch * kT, kD, 6);
  lora::AttentionMask<float> mask;
  mask.causal = true;
  Mat y;
  for (auto _ : state) {
    att.forward(x, x, x, kBatch, mask, y);
    benchmark::DoNotOptimize(y.data());
  }
  bench::set_flops(state, forward_flops() + (merged ? 0 : 4 * 4.0 * kBatch * kT * kD * kR));
}

void BM_AttentionMerged(benchmark::State& state) { run_forward(state, true); }
void BM_AttentionUnmerged(benchmark::State& state) { run_forward(state, false); }

void BM_AttentionTrainStep(benchmark::State& state) {
  auto att = make_attention();
  const Mat x = random(kBatch * kT, kD, 6), dy = random(kBatch * kT, kD, 7);
  lora::AttentionMask<float> mask;
  mask.causal = true;
  lora::AttentionGrads<float> g;
  for (auto _ : state) {
    Mat y = att.forward_train(x, kBatch, mask);
    att.backward(dy, g);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(g.d_query.data());
  }
  bench::set_flops(state, 3 * forward_flops());
}

void register_all() {
  for (auto [name, fn] : {std::pair{"BM_AttentionMerged", &BM_AttentionMerged},
                          std::pair{"BM_AttentionUnmerged", &BM_AttentionUnmerged},
                          std::pair{"BM_AttentionTrainStep", &BM_AttentionTrainStep}})
    benchmark::RegisterBenchmark(name, fn)->UseRealTime()->Unit(benchmark::kMillisecond);
}

void print_ratios(const bench::Times& t, int threads) {
  const double merged = bench::get(t, "BM_AttentionMerged");
  std::printf("\nRatios (fastest of the repetitions, %d thread%s, float, batch %d, T %d, d_model %d, %d heads, r %d on q,k,v,o):\n",
              threads, threads == 1 ? "" : "s", kBatch, kT, kD, kHeads, kR);
  auto merged_att = make_attention(), att = make_attention();
  merged_att.merge();
  const Mat x = random(kBatch * kT, kD, 6), dy = random(kBatch * kT, kD, 7);
  lora::AttentionMask<float> mask;
  mask.causal = true;
  Mat y1, y2;
  lora::AttentionGrads<float> g;
  const auto m = bench::paired_ratios({{"merged", [&] { merged_att.forward(x, x, x, kBatch, mask, y1); }},
                                       {"unmerged", [&] { att.forward(x, x, x, kBatch, mask, y2); }},
                                       {"train", [&] { att.forward_train(x, kBatch, mask); att.backward(dy, g); }}});
  std::printf("                    fastest repetitions   paired (median of 21 rounds)\n");
  std::printf("  unmerged/merged   %8.3f %22.3f   (target <= 1.06)\n", bench::get(t, "BM_AttentionUnmerged") / merged, m[1]);
  std::printf("  train step/merged %8.3f %22.3f\n", bench::get(t, "BM_AttentionTrainStep") / merged, m[2]);
}

}  // namespace

int main(int argc, char** argv) { return bench::main(argc, argv, "bench_attention", register_all, print_ratios); }
