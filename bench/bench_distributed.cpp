// bench_distributed: data-parallel training over MPI (lora/distributed.hpp), under mpirun:
//
//   mpirun -np 2 bench_distributed [--threads N] [--steps N]
//
//   training    tokens/s on the text_lora demo's shape (Llama d 128, 4 layers, LoRA r 8 on every
//               linear, global batch 16 × 128, N threads per rank): rank 0 alone (the others
//               wait), then every rank on its share of each batch; the ratio, and the share of a
//               step spent in the all-reduce
//   all-reduce  on a 1B Llama shape (Llama 3.2 1B: d 2048, 16 layers, 32 heads of 64, 8 KV heads,
//               ff 8192): the trainable parameters and the bytes each step sends for LoRA r = 8 …
//               64 on q,v and on every linear, and the time of one all-reduce of that buffer
//               (median of 5)
#include <lora/distributed.hpp>
#include <lora/loss.hpp>
#include <lora/models/llama.hpp>
#include <lora/optim.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using Model = lora::LlamaModel<float>;
using Ids = lora::Mat<std::int64_t>;
using Clock = std::chrono::steady_clock;

constexpr Eigen::Index kBatch = 16, kT = 128;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Training tokens/s of the global batch with the ranks of dp (warm-up steps first), and the
// seconds spent in the all-reduce.
struct Timing {
  double tokens_per_s, reduce_share;
};
Timing train(lora::DataParallel& dp, const std::string& dir, long steps) {
  lora::PeftConfig peft;
  peft.r = 8;
  peft.lora_alpha = 16;
  peft.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  Model model(dir, &peft);
  lora::AdamW<float> opt;
  const auto params = model.parameters();
  opt.add(params);
  dp.broadcast(params);
  lora::detail::Rng rng(5);
  const auto [begin, rows] = dp.shard(kBatch);
  double seconds = 0, reduce = 0;
  for (long k = -2; k < steps; ++k) {  // two warm-up steps
    Ids batch(kBatch, kT);
    for (Eigen::Index i = 0; i < batch.size(); ++i) batch.data()[i] = std::int64_t(rng.next() % 256);
    const double reduced_before = dp.reduce_seconds();
    const auto t0 = Clock::now();
    const Ids ids = batch.middleRows(begin, rows);
    model.zero_grad();
    const auto r = lora::causal_lm_loss<float>(model.forward_train(ids), ids);
    model.backward(r.grad);
    dp.all_reduce_gradients(params, r.loss, double(r.count));
    lora::clip_grad_norm(params, 1.0);
    opt.step();
    if (k >= 0) seconds += since(t0), reduce += dp.reduce_seconds() - reduced_before;
  }
  dp.check_agreement(params, "after the timed steps");
  return {double(steps * kBatch * kT) / seconds, reduce / seconds};
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int threads = 1;
  long steps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::stoi(argv[i + 1]);
    else if (a == "--steps") steps = std::stol(argv[i + 1]);
  }
  lora::set_num_threads(threads);
  lora::DataParallel world;
  const bool root = world.rank() == 0;
  // a random model of the shape, saved by rank 0 and read by every rank with LoRA layers (the
  // constructor from a folder is the one that targets modules)
  const std::string dir = "/tmp/bench_distributed_model";
  if (root) {
    const std::string config = R"({"model_type": "llama", "vocab_size": 260, "hidden_size": 128, "intermediate_size": 344,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": true})";
    Model(lora::LmConfig::from_json(config, "bench config"), 1).save_pretrained(dir);
  }
  world.barrier();

  Timing alone{0, 0};
  if (root) {
    lora::DataParallel self(MPI_COMM_SELF);
    alone = train(self, dir, steps);
  }
  world.barrier();
  const Timing all = train(world, dir, steps);
  if (root) {
    std::printf("training, text_lora demo shape, LoRA r 8 on every linear, batch %ld x %ld, %d thread(s) per rank, %ld steps:\n",
                long(kBatch), long(kT), threads, steps);
    std::printf("  1 rank:   %8.0f tokens/s\n", alone.tokens_per_s);
    std::printf("  %d ranks: %8.0f tokens/s  (%.2fx; all-reduce %.1f %% of a step)\n", world.size(), all.tokens_per_s,
                all.tokens_per_s / alone.tokens_per_s, 100 * all.reduce_share);
  }

  // The 1B shape: what LoRA trains there, and one all-reduce of it.
  const long d = 2048, layers = 16, q_out = 32 * 64, kv_out = 8 * 64, ff = 8192;
  const long qv = (d + q_out) + (d + kv_out), all_linears = qv + (d + kv_out) + (q_out + d) + 2 * (d + ff) + (ff + d);
  if (root)
    std::printf("all-reduce on a 1B Llama shape (d 2048, 16 layers, 32/8 heads, ff 8192), float gradients, %d ranks:\n"
                "  %-12s %4s %14s %14s %12s\n",
                world.size(), "LoRA on", "r", "parameters", "bytes/step", "ms/step");
  for (const auto& [name, per_rank] : {std::pair<const char*, long>{"q,v", qv}, {"all linears", all_linears}})
    for (long r : {8L, 16L, 32L, 64L}) {
      const long n = r * per_rank * layers;
      lora::Mat<float> value = lora::Mat<float>::Zero(1, n), grad = lora::Mat<float>::Constant(1, n, 1e-3f);
      const std::vector<lora::Parameter<float>> p = {lora::make_parameter("lora", value, grad)};
      world.broadcast(p);
      std::vector<double> ms;
      for (int k = 0; k < 5; ++k) {
        world.barrier();
        const double before = world.reduce_seconds();
        world.all_reduce_gradients(p, 1.0, 1.0);
        ms.push_back(1e3 * (world.reduce_seconds() - before));
      }
      std::sort(ms.begin(), ms.end());
      if (root)
        std::printf("  %-12s %4ld %14ld %14zu %12.2f\n", name, r, n, world.bytes_per_reduction(), ms[ms.size() / 2]);
    }
  MPI_Finalize();
  return 0;
}
