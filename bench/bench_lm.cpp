// bench_lm: a Llama-shaped causal LM with LoRA on every linear (r 8), timed as a user runs it:
//   training   tokens/s of forward_train + causal_lm_loss + backward + an AdamW step
//   decode     tokens/s of generate (greedy, 8 sequences, 16-token prompts, 64 new tokens, KV
//              cache): adapters merged, unmerged (one adapter), and 8 adapters mixed (each
//              sequence its own, unmerged, one pass)
// on the text_lora demo's shape and a larger one (d 1024). Each figure is the median of 5 rounds;
// a round times merged, unmerged and mixed decoding back to back, so the ratios compare runs
// under the same machine load.
//
// --frozen compares the two ways of holding the frozen weights of a bf16 checkpoint (as real ones
// ship), with LoRA on q_proj and v_proj (r 8): widened to float on load, or kept in bf16
// (FrozenWeights::bf16, products in float): heap memory the loaded model holds (glibc's mallinfo2
// after load minus before), training and decode (unmerged, greedy, 8 sequences) tokens/s, and how far the
// logits of the two are apart.
//
// --methods times training alone for the text demo's three methods on one model: LoRA (r 8) on
// q_proj and v_proj, LoRA on all seven linears, and full fine-tuning (every base weight trains),
// in alternating rounds (median of 5).
//
//   bench_lm [--threads N] [--quick] [--only=demo|large] [--frozen] [--methods] [--no-train]
// (--no-train: decoding only, for profiling it)
#include <lora/loss.hpp>
#include <lora/models/generate.hpp>
#include <lora/models/llama.hpp>
#include <lora/optim.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <malloc.h>
#include <string>
#include <vector>

namespace {

using Model = lora::LlamaModel<float>;
using Ids = lora::Mat<std::int64_t>;
using Clock = std::chrono::steady_clock;

struct Shape {
  const char* name;
  int vocab, d, layers, heads, kv_heads, ff;
  Eigen::Index batch, T;  // training batch
};

std::string config_json(const Shape& s) {
  return lora::detail::cat(R"({"model_type": "llama", "vocab_size": )", s.vocab, R"(, "hidden_size": )", s.d,
                           R"(, "intermediate_size": )", s.ff, R"(, "num_hidden_layers": )", s.layers, R"(, "num_attention_heads": )",
                           s.heads, R"(, "num_key_value_heads": )", s.kv_heads, R"(, "max_position_embeddings": 256, "tie_word_embeddings": true})");
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
double seconds(F f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Ids random_ids(const Shape& s, lora::detail::Rng& rng) {
  Ids ids(s.batch, s.T);
  for (Eigen::Index i = 0; i < ids.size(); ++i) ids.data()[i] = std::int64_t(rng.uniform() * s.vocab) % s.vocab;
  return ids;
}

std::vector<std::vector<std::int64_t>> random_prompts(const Shape& s, lora::detail::Rng& rng, int batch) {
  std::vector<std::vector<std::int64_t>> prompts(batch);
  for (auto& p : prompts)
    for (int t = 0; t < 16; ++t) p.push_back(std::int64_t(rng.uniform() * s.vocab) % s.vocab);
  return prompts;
}

// forward_train + loss + backward + AdamW, steps of them per round; median tokens/s.
double train_tokens_per_second(Model& model, const Ids& ids, int rounds, int steps) {
  if (steps == 0) return 0;  // --no-train
  lora::AdamW<float> opt;
  opt.add(model.parameters());
  std::vector<double> t;
  for (int r = 0; r < rounds; ++r)
    t.push_back(seconds([&] {
      for (int i = 0; i < steps; ++i) {
        model.zero_grad();
        model.backward(lora::causal_lm_loss<float>(model.forward_train(ids), ids).grad);
        opt.step();
      }
    }));
  return double(steps) * double(ids.size()) / median(t);
}

// Heap bytes in use (mallinfo2: arena chunks in use plus mmapped ones): the delta across a
// constructor is what the object holds, whatever memory earlier frees left for reuse.
double heap_bytes() {
  const struct mallinfo2 m = mallinfo2();
  return double(m.uordblks) + double(m.hblkhd);
}

void run(const Shape& s, int rounds, int train_steps, int new_tokens) {
  const lora::LmConfig config = lora::LmConfig::from_json(config_json(s), s.name);
  lora::PeftConfig peft;
  peft.r = 8;
  peft.lora_alpha = 16;
  peft.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  // The random model saved and loaded back with LoRA layers: the constructor from a folder is
  // the one that targets modules.
  const std::string dir = "/tmp/bench_lm_" + std::string(s.name);
  Model(config, 1).save_pretrained(dir);
  Model model(dir, &peft);
  lora::detail::Rng rng(7);
  auto random_b = [&](const lora::LoraLinear<float>& layer) {
    lora::Mat<float> b(layer.out_features(), 8);
    for (Eigen::Index i = 0; i < b.size(); ++i) b.data()[i] = 0.02f * float(rng.normal());
    return b;
  };
  for (const auto& [path, layer] : model.modules()) {
    layer->set_lora_B(random_b(*layer));
    for (int k = 0; k < 8; ++k) {
      const std::string name = "t" + std::to_string(k);
      layer->add_adapter(name, layer->config("default"));
      layer->set_lora_B(name, random_b(*layer));
    }
  }

  // training
  const Ids ids = random_ids(s, rng);
  const double train_tps = train_tokens_per_second(model, ids, rounds, train_steps);

  // decode
  const int batch = 8;
  const auto prompts = random_prompts(s, rng, batch);
  lora::GenerationConfig g;
  g.max_new_tokens = new_tokens;
  lora::GenerationConfig mixed = g;
  for (int k = 0; k < batch; ++k) mixed.adapters.push_back("t" + std::to_string(k));
  std::vector<double> merged, unmerged, mix;
  for (int r = 0; r < rounds; ++r) {
    model.modules().merge();
    merged.push_back(seconds([&] { lora::generate(model, prompts, g); }));
    model.modules().unmerge();
    unmerged.push_back(seconds([&] { lora::generate(model, prompts, g); }));
    mix.push_back(seconds([&] { lora::generate(model, prompts, mixed); }));
  }
  const double tokens = double(batch) * new_tokens;
  const double m = tokens / median(merged), u = tokens / median(unmerged), x = tokens / median(mix);
  std::printf("%-6s %9lld params  train %8.0f tok/s | decode merged %7.0f  unmerged %7.0f (%.3f)  8 mixed %7.0f (%.3f) tok/s\n",
              s.name, static_cast<long long>(model.base_parameters()), train_tps, m, u, u / m, x, x / m);
}


// Widened vs bf16-held frozen weights of a bf16 checkpoint, LoRA on q_proj, v_proj.
void frozen(const Shape& s, int rounds, int train_steps, int new_tokens) {
  const lora::LmConfig config = lora::LmConfig::from_json(config_json(s), s.name);
  const std::string dir = "/tmp/bench_lm_bf16_" + std::string(s.name);
  {
    Model random(config, 1);
    random.keep_frozen_bf16();  // saved as held: a bf16 checkpoint
    random.save_pretrained(dir);
  }
  lora::PeftConfig peft;
  peft.r = 8;
  peft.lora_alpha = 16;
  peft.target_modules = {"q_proj", "v_proj"};
  lora::detail::Rng rng(7);
  const Ids ids = random_ids(s, rng);
  const auto prompts = random_prompts(s, rng, 8);
  lora::GenerationConfig g;
  g.max_new_tokens = new_tokens;
  lora::Mat<float> logits[2];
  double bytes[2], train[2], decode[2];
  for (int k = 0; k < 2; ++k) {
    const double before = heap_bytes();
    Model model(dir, &peft, {}, k ? lora::FrozenWeights::bf16 : lora::FrozenWeights::widened);
    bytes[k] = heap_bytes() - before;
    lora::detail::Rng init(3);
    for (const auto& [path, layer] : model.modules()) {
      lora::Mat<float> b(layer->out_features(), 8);
      for (Eigen::Index i = 0; i < b.size(); ++i) b.data()[i] = 0.02f * float(init.normal());
      layer->set_lora_B(b);
    }
    logits[k] = model.forward(ids);
    train[k] = train_tokens_per_second(model, ids, rounds, train_steps);
    std::vector<double> t;
    for (int r = 0; r < rounds; ++r) t.push_back(seconds([&] { lora::generate(model, prompts, g); }));
    decode[k] = double(prompts.size()) * new_tokens / median(t);
  }
  const double diff = (logits[1] - logits[0]).norm() / logits[0].norm();
  std::printf("%-6s frozen weights  widened: %7.1f MB  train %8.0f tok/s  decode %7.0f tok/s\n", s.name, bytes[0] / 1e6, train[0],
              decode[0]);
  std::printf("%-6s frozen weights  bf16:    %7.1f MB  train %8.0f tok/s  decode %7.0f tok/s  (memory %.3f, train %.3f, decode %.3f "
              "of widened; logits %.1e apart)\n",
              s.name, bytes[1] / 1e6, train[1], decode[1], bytes[1] / bytes[0], train[1] / train[0], decode[1] / decode[0], diff);
}

// Training tokens/s of LoRA q,v, LoRA on all linears and full fine-tuning, rounds alternating.
void methods(const Shape& s, int rounds, int train_steps) {
  const lora::LmConfig config = lora::LmConfig::from_json(config_json(s), s.name);
  const std::string dir = "/tmp/bench_lm_methods_" + std::string(s.name);
  Model(config, 1).save_pretrained(dir);
  const std::vector<std::vector<std::string>> targets = {
      {"q_proj", "v_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, {}};
  std::vector<Model> models;
  for (const auto& t : targets) {
    lora::PeftConfig peft;
    peft.r = 8;
    peft.lora_alpha = 16;
    peft.target_modules = t;
    models.emplace_back(dir, t.empty() ? nullptr : &peft);
    if (t.empty()) models.back().set_base_trainable(true);
  }
  lora::detail::Rng rng(7);
  const Ids ids = random_ids(s, rng);
  std::vector<std::vector<double>> tps(models.size());
  for (int r = 0; r < rounds; ++r)
    for (std::size_t m = 0; m < models.size(); ++m) tps[m].push_back(train_tokens_per_second(models[m], ids, 1, train_steps));
  std::printf("%-6s training tok/s  LoRA q,v %8.0f  LoRA all linears %8.0f  full fine-tuning %8.0f  (all / full %.3f)\n", s.name,
              median(tps[0]), median(tps[1]), median(tps[2]), median(tps[1]) / median(tps[2]));
}

}  // namespace

int main(int argc, char** argv) try {
  int threads = 1;
  bool quick = false, frozen_weights = false, train_methods = false, no_train = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--threads=", 0) == 0)
      threads = std::stoi(a.substr(10));
    else if (a == "--threads" && i + 1 < argc)
      threads = std::stoi(argv[++i]);
    else if (a == "--quick")
      quick = true;
    else if (a == "--no-train")
      no_train = true;
    else if (a == "--frozen")
      frozen_weights = true;
    else if (a == "--methods")
      train_methods = true;
    else if (a.rfind("--only=", 0) == 0)
      only = a.substr(7);
    else
      lora::detail::fail("unknown argument ", a, " (bench_lm [--threads N] [--quick] [--only=demo|large] [--frozen] [--methods] [--no-train])");
  }
  lora::set_num_threads(threads);
  const Shape demo{"demo", 258, 128, 4, 4, 2, 344, 16, 128}, large{"large", 4096, 1024, 2, 16, 4, 2816, 4, 128};
  if (train_methods) {
    std::printf("bench_lm --methods: %d thread(s); training only; median of %d alternating rounds\n", threads, quick ? 1 : 5);
    if (only.empty() || only == "demo") methods(demo, quick ? 1 : 5, quick ? 1 : 4);
    if (only.empty() || only == "large") methods(large, quick ? 1 : 5, quick ? 1 : 2);
    return 0;
  }
  if (frozen_weights)
    std::printf("bench_lm --frozen: %d thread(s); a bf16 checkpoint, LoRA r 8 on q_proj and v_proj; frozen weights widened to float "
                "or kept in bf16; median of %d rounds\n", threads, quick ? 1 : 5);
  else
    std::printf("bench_lm: %d thread(s); LoRA r 8 on every linear; median of %d rounds (ratios: unmerged or mixed / merged)\n",
                threads, quick ? 1 : 5);
  if (frozen_weights) {
    if (only.empty() || only == "demo") frozen(demo, quick ? 1 : 5, no_train ? 0 : quick ? 1 : 4, quick ? 8 : 64);
    if (only.empty() || only == "large") frozen(large, quick ? 1 : 5, no_train ? 0 : quick ? 1 : 2, quick ? 8 : 64);
    return 0;
  }
  if (only.empty() || only == "demo") run(demo, quick ? 1 : 5, no_train ? 0 : quick ? 1 : 4, quick ? 8 : 64);
  if (only.empty() || only == "large") run(large, quick ? 1 : 5, no_train ? 0 : quick ? 1 : 2, quick ? 8 : 64);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_lm: %s\n", e.what());
  return 2;
}
