// The causal language models (models/llama.hpp, models/gpt2.hpp) on the tiny transformers
// checkpoints: logits against transformers' (the full check of every adapter is lm_check, under
// ctest), padding, LoRA layers by module path, and bad checkpoints and inputs.
#include <lora/models/generate.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/loss.hpp>
#include <lora/optim.hpp>
#include <lora/models/llama.hpp>
#include <lora/peft.hpp>

#include "lm_test_util.hpp"
#include "test_util.hpp"

#include <filesystem>
#include <array>
#include <iostream>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using Ids = lora::Mat<std::int64_t>;

namespace {

const std::string kLlama = data_path("models/tiny_llama");
const std::string kGpt2 = data_path("models/tiny_gpt2");

double relative_error(const lora::Mat<double>& got, const lora::Mat<double>& want) {
  return (got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff();
}

// A copy of dir with config.json's text changed by edit (or model.safetensors replaced).
std::string variant(const std::string& dir, const std::string& name, const std::string& config_text) {
  const fs::path out = fs::temp_directory_path() / ("lora_test_models_" + name);
  fs::remove_all(out);
  fs::create_directories(out);
  fs::copy_file(fs::path(dir) / "model.safetensors", out / "model.safetensors");
  std::ofstream(out / "config.json") << config_text;
  return out.string();
}

template <class Model>
void check_base_logits(const std::string& dir) {
  const auto io = lora::SafeTensors::open(dir + "/io.safetensors");
  const Model model(dir);
  EXPECT_LE(relative_error(model.forward(io.integers("input_ids")), io.matrix<double>("logits_base")), 1e-6);
}

// Prefill 3 tokens, then one at a time, with left padding in the first sequence: every row equals
// the full forward's.
template <class Model>
void check_incremental(const std::string& dir) {
  const Model model(dir);
  auto cache = lm_test::expect_incremental_equals_full(model);
  EXPECT_EQ(cache.length, 7);
  EXPECT_LORA_ERROR(model.forward(Ids::Zero(2, 1), {}, &cache), "7 cached + 1 new tokens exceed the cache's capacity 7");
  EXPECT_EQ(cache.length, 7);
}

// Greedy generation: each token is the argmax of the full forward over prompt + tokens so far,
// and a prompt continues in a batch (left-padded) as it does alone.
template <class Model>
void check_greedy(const std::string& dir) {
  const Model model(dir);
  const std::vector<std::vector<std::int64_t>> prompts = {{5, 9, 2, 33}, {40, 7}};
  lora::GenerationConfig g;
  g.max_new_tokens = 6;
  const auto out = lora::generate(model, prompts, g);
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    ASSERT_EQ(out[b].size(), 6u);
    std::vector<std::int64_t> text = prompts[b];
    for (std::int64_t token : out[b]) {
      const Ids row = Eigen::Map<const Ids>(text.data(), 1, Eigen::Index(text.size()));
      const lora::Mat<double> logits = model.forward(row);
      Eigen::Index best;
      logits.row(logits.rows() - 1).maxCoeff(&best);
      EXPECT_EQ(token, best);
      text.push_back(token);
    }
    EXPECT_EQ(lora::generate(model, {prompts[b]}, g)[0], out[b]);
  }
}

}  // namespace

TEST(Models, LlamaIncrementalDecodeEqualsTheFullForward) { check_incremental<lora::LlamaModel<double>>(kLlama); }
TEST(Models, Gpt2IncrementalDecodeEqualsTheFullForward) { check_incremental<lora::Gpt2Model<double>>(kGpt2); }
TEST(Models, LlamaGreedyGenerationFollowsTheFullForward) { check_greedy<lora::LlamaModel<double>>(kLlama); }
TEST(Models, Gpt2GreedyGenerationFollowsTheFullForward) { check_greedy<lora::Gpt2Model<double>>(kGpt2); }

TEST(Models, SamplingIsSeededAndStopsAtStopTokens) {
  const lora::LlamaModel<double> model(kLlama);
  lora::GenerationConfig g;
  g.max_new_tokens = 12;
  g.temperature = 1.0;
  g.top_k = 20;
  g.top_p = 0.9;
  g.seed = 7;
  const auto a = lora::generate(model, {{1, 2, 3}, {4}}, g);
  EXPECT_EQ(lora::generate(model, {{1, 2, 3}, {4}}, g), a);
  g.seed = 8;
  EXPECT_NE(lora::generate(model, {{1, 2, 3}, {4}}, g), a);
  // top_k = 1 is greedy whatever the temperature.
  g.top_k = 1;
  lora::GenerationConfig greedy;
  greedy.max_new_tokens = 12;
  EXPECT_EQ(lora::generate(model, {{1, 2, 3}}, g), lora::generate(model, {{1, 2, 3}}, greedy));
  // A stop token ends its sequence (and is kept); the other goes on.
  const auto full = lora::generate(model, {{1, 2, 3}, {4}}, greedy);
  lora::GenerationConfig stop = greedy;
  stop.stop_tokens = {full[0][2]};
  const auto cut = lora::generate(model, {{1, 2, 3}, {4}}, stop);
  const auto first_stop = std::find(full[0].begin(), full[0].end(), full[0][2]) - full[0].begin();
  EXPECT_EQ(cut[0], std::vector<std::int64_t>(full[0].begin(), full[0].begin() + first_stop + 1));
  EXPECT_LORA_ERROR(lora::generate(model, {{1}}, [] { lora::GenerationConfig c; c.top_p = 0; return c; }()), "top_p is 0");
  EXPECT_LORA_ERROR(lora::generate(model, {std::vector<std::int64_t>(60, 1)}, greedy), "exceed max_position_embeddings 64");
}

using lm_test::Batch;
using lm_test::padded_batch;

// Gradients of the LoRA factors through a whole model (padding, -100 labels) against central
// differences of causal_lm_loss, in double, for the listed modules (3 entries of A and of B each).
template <class Model>
void check_gradients(const std::string& dir, const std::vector<std::string>& modules) {
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  Model model(dir, &config);
  lora::load_adapter(dir + "/adapter", model.modules());  // B != 0, so A gets gradients too
  const Batch batch = padded_batch();
  const Ids &ids = batch.ids, &mask = batch.mask, &labels = batch.labels;
  auto loss = [&] { return lora::causal_lm_loss<double>(model.forward(ids, mask), labels).loss; };
  model.modules().zero_grad();
  const auto r = lora::causal_lm_loss<double>(model.forward_train(ids, mask), labels);
  EXPECT_NEAR(r.loss, loss(), 1e-12);
  model.backward(r.grad);
  EXPECT_LORA_ERROR(model.backward(r.grad), "no forward_train");
  std::uint64_t seed = 1;
  double worst = 0;
  int nonzero = 0, checked = 0;
  for (const std::string& m : modules) {
    auto& layer = model.modules().at(m);
    for (int which = 0; which < 2; ++which) {
      lora::Mat<double> w = which ? layer.lora_B() : layer.lora_A();
      const lora::Mat<double>& grad = which ? layer.grad_B() : layer.grad_A();
      for (int k = 0; k < 3; ++k, ++checked) {
        const Eigen::Index i = Eigen::Index(seed * 7 % w.rows()), j = Eigen::Index(seed * 13 % w.cols());
        seed += 5;
        const double h = 1e-5, orig = w(i, j);
        auto set = [&](double v) {
          w(i, j) = v;
          which ? layer.set_lora_B(w) : layer.set_lora_A(w);
        };
        set(orig + h);
        const double up = loss();
        set(orig - h);
        const double down = loss();
        set(orig);
        const double fd = (up - down) / (2 * h);
        worst = std::max(worst, std::abs(fd - grad(i, j)) / std::max(1e-3, std::abs(fd)));
        nonzero += std::abs(fd) > 1e-4;
        EXPECT_NEAR(grad(i, j), fd, 1e-7 + 1e-6 * std::abs(fd)) << m << (which ? " B" : " A") << "(" << i << ", " << j << ")";
      }
    }
  }
  EXPECT_GE(nonzero, checked * 4 / 5);  // the check compares real gradients, not zeros
  ::testing::Test::RecordProperty("worst_relative_error", lora::detail::cat(worst));
  ::testing::Test::RecordProperty("nonzero", lora::detail::cat(nonzero, " of ", checked));
}

TEST(Models, LlamaLoraGradientsMatchFiniteDifferences) {
  check_gradients<lora::LlamaModel<double>>(
      kLlama, {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
               "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj",
               "model.layers.0.mlp.down_proj"});
}

TEST(Models, Gpt2LoraGradientsMatchFiniteDifferences) {
  check_gradients<lora::Gpt2Model<double>>(kGpt2, {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj",
                                                   "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"});
}

// The merged model saved as a checkpoint loads as a plain model (no adapter) whose logits are
// the adapter's (PEFT's, from io.safetensors), for both families.
template <class Model>
void check_save_merged(const std::string& dir, const std::string& name) {
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  Model model(dir, &config);
  lora::load_adapter(dir + "/adapter", model.modules());
  model.modules().merge();
  const std::string out = (fs::temp_directory_path() / ("lora_test_models_merged_" + name)).string();
  fs::remove_all(out);
  lora::save_checkpoint(dir, out, model.modules());
  const auto io = lora::SafeTensors::open(dir + "/io.safetensors");
  EXPECT_LE(relative_error(Model(out).forward(io.integers("input_ids")), io.matrix<double>("logits_adapter")), 1e-5);
  EXPECT_EQ(lora::detail::read_text(out + "/config.json"), lora::detail::read_text(dir + "/config.json"));
  EXPECT_LORA_ERROR(lora::save_checkpoint(dir, dir, model.modules()), "is the folder the model was read from");
}

TEST(Models, LlamaMergedCheckpointHasTheAdaptersLogits) { check_save_merged<lora::LlamaModel<double>>(kLlama, "llama"); }
TEST(Models, Gpt2MergedCheckpointHasTheAdaptersLogits) { check_save_merged<lora::Gpt2Model<double>>(kGpt2, "gpt2"); }

// Fine-tuning end to end: AdamW on the LoRA factors of every linear lowers the loss of a fixed
// batch, and nothing but the LoRA factors changes (the base logits with adapters disabled stay).
TEST(Models, AdamWStepsOnTheLoraFactorsLowerTheLoss) {
  lora::PeftConfig config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  lora::LlamaModel<double> model(kLlama, &config);
  Ids ids(2, 8);
  ids << 1, 5, 9, 13, 17, 21, 25, 29, 2, 4, 8, 16, 32, 63, 31, 15;
  const auto io = lora::SafeTensors::open(kLlama + "/io.safetensors");
  lora::AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0;
  lora::AdamW<double> opt(o);
  opt.add(model.modules().parameters());
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    model.modules().zero_grad();
    const auto r = lora::causal_lm_loss<double>(model.forward_train(ids), ids);
    model.backward(r.grad);
    opt.step();
    (step == 0 ? first : last) = r.loss;
  }
  EXPECT_LT(last, first - 0.5) << first << " -> " << last;
  RecordProperty("loss", lora::detail::cat(first, " -> ", last));
  model.modules().enable_adapters(false);
  EXPECT_LE(relative_error(model.forward(io.integers("input_ids")), io.matrix<double>("logits_base")), 1e-6);
}

// Loss and LoRA gradients against the real stack's (tests/data/models/gen_grad_fixtures.py:
// transformers 5.17 + PEFT 0.21 in float64, right padding, -100 labels). GPT-2 is float64
// throughout and matches to rounding. transformers' Llama computes RMSNorm, the attention softmax
// and the rotary tables in float32 even in a float64 model: grads.safetensors is that (agreement
// bounded by float32), grads_f64.safetensors has all three in float64 and matches to rounding.
template <class Model>
void check_reference_gradients(const std::string& dir, const std::string& file, double loss_tol, double grad_tol) {
  SCOPED_TRACE(dir + "/" + file);
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  Model model(dir, &config);
  lora::load_adapter(dir + "/adapter", model.modules());
  const auto ref = lora::SafeTensors::open(dir + "/" + file);
  model.modules().zero_grad();
  const auto r = lora::causal_lm_loss<double>(model.forward_train(ref.integers("input_ids"), ref.integers("attention_mask")),
                                              ref.integers("labels"));
  model.backward(r.grad);
  EXPECT_NEAR(r.loss, ref.matrix<double>("loss")(0, 0), loss_tol);
  std::size_t n = 0;
  double worst = 0;
  for (const auto& [path, layer] : model.modules())
    for (const bool b : {false, true}) {
      const lora::Mat<double> want = ref.matrix<double>(path + (b ? ".lora_B" : ".lora_A"));
      const double e = relative_error(b ? layer->grad_B() : layer->grad_A(), want);
      EXPECT_LE(e, grad_tol) << path << (b ? " B" : " A");
      worst = std::max(worst, e);
      ++n;
    }
  EXPECT_EQ(n + 5, ref.tensors().size());  // every recorded gradient was compared
  std::cout << dir << "/" << file << ": loss error " << std::abs(r.loss - ref.matrix<double>("loss")(0, 0))
            << ", worst gradient relative error " << worst << "\n";
}

TEST(Models, Gpt2LoraGradientsMatchTransformersAndPeft) {
  check_reference_gradients<lora::Gpt2Model<double>>(kGpt2, "grads.safetensors", 1e-13, 1e-12);
}

TEST(Models, LlamaLoraGradientsMatchTransformersAndPeft) {
  const std::string gqa1 = data_path("models/tiny_llama_gqa1");  // 1 KV head, llama3 rope, tied, biases
  check_reference_gradients<lora::LlamaModel<double>>(kLlama, "grads.safetensors", 1e-8, 5e-6);
  check_reference_gradients<lora::LlamaModel<double>>(gqa1, "grads.safetensors", 1e-8, 5e-6);
  check_reference_gradients<lora::LlamaModel<double>>(kLlama, "grads_f64.safetensors", 1e-13, 1e-10);
  check_reference_gradients<lora::LlamaModel<double>>(gqa1, "grads_f64.safetensors", 1e-13, 1e-10);
}

// Left padding with the padded keys hidden: rotary embeddings see only relative positions, so
// the real tokens' logits are those of the sequence alone (up to the float angles of the rotary
// tables, computed as transformers does). Without the mask they would attend to the pads.
TEST(Models, LlamaPaddedKeysAreHidden) {
  const lora::LlamaModel<double> model(kLlama);
  Ids ids(2, 6), mask = Ids::Ones(2, 6);
  ids << 0, 0, 3, 9, 17, 4, 5, 6, 7, 8, 9, 10;
  mask(0, 0) = mask(0, 1) = 0;
  const lora::Mat<double> padded = model.forward(ids, mask);
  const lora::Mat<double> alone = model.forward(Ids(ids.block(0, 2, 1, 4)));
  EXPECT_LE(relative_error(padded.middleRows(2, 4), alone), 1e-5);
  EXPECT_GT(relative_error(model.forward(ids).middleRows(2, 4), alone), 1e-3);  // the mask matters
  EXPECT_LE(relative_error(padded.bottomRows(6), model.forward(Ids(ids.row(1)))), 1e-12);
}

TEST(Models, LlamaBaseLogitsMatchTransformers) { check_base_logits<lora::LlamaModel<double>>(kLlama); }
TEST(Models, Gpt2BaseLogitsMatchTransformers) { check_base_logits<lora::Gpt2Model<double>>(kGpt2); }

TEST(Models, TargetedLinearsAreLoraLayersByModulePath) {
  const auto config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  const lora::LlamaModel<double> llama(kLlama, &config);
  EXPECT_EQ(llama.modules().size(), 2u * 7u);  // q, k, v, o, gate, up, down in each of 2 layers
  EXPECT_EQ(llama.modules().at("model.layers.1.self_attn.k_proj").out_features(), 16);  // 2 kv heads × 8
  const auto g_config = lora::PeftConfig::read(kGpt2 + "/adapter/adapter_config.json");
  const lora::Gpt2Model<double> gpt2(kGpt2, &g_config);
  EXPECT_EQ(gpt2.modules().size(), 2u * 4u);
  EXPECT_TRUE(gpt2.modules().at("transformer.h.0.attn.c_attn").fan_in_fan_out());
  EXPECT_EQ(gpt2.modules().at("transformer.h.0.attn.c_attn").out_features(), 96);
  // A fresh adapter (B = 0) leaves the logits as the base's.
  const auto io = lora::SafeTensors::open(kGpt2 + "/io.safetensors");
  EXPECT_LE(relative_error(gpt2.forward(io.integers("input_ids")), io.matrix<double>("logits_base")), 1e-6);
}

// Every LoRA layer draws its own lora_A and dropout stream (as PEFT's one global stream gives
// each its own), from the seed and its module path: the same on every load, different per layer.
TEST(Models, EachLoraLayerHasItsOwnInitAndDropoutStream) {
  auto config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  config.lora_dropout = 0.1;
  const lora::LlamaModel<double> a(kLlama, &config), b(kLlama, &config);
  std::set<std::array<std::uint64_t, 4>> streams;
  for (const auto& [path, layer] : a.modules()) {
    EXPECT_EQ(layer->lora_A(), b.modules().at(path).lora_A()) << path;
    EXPECT_EQ(layer->dropout_state("default"), b.modules().at(path).dropout_state("default")) << path;
    streams.insert(layer->dropout_state("default"));
  }
  EXPECT_EQ(streams.size(), a.modules().size());
  int same_shape = 0;  // pairs of layers whose A has the same shape: q with q, k with v, ...
  for (const auto& [p, x] : a.modules())
    for (const auto& [q, y] : a.modules())
      if (p < q && x->lora_A().rows() == y->lora_A().rows() && x->lora_A().cols() == y->lora_A().cols()) {
        ++same_shape;
        EXPECT_GT((x->lora_A() - y->lora_A()).cwiseAbs().maxCoeff(), 1e-3) << p << " and " << q;
      }
  EXPECT_GE(same_shape, 7);
}

TEST(Models, BadInputsAndCheckpointsAreRefusedByName) {
  const lora::LlamaModel<double> llama(kLlama);
  Ids ids = Ids::Constant(1, 4, 3);
  ids(0, 2) = 64;
  EXPECT_LORA_ERROR(llama.forward(ids), "ids(0, 2) is 64", "outside the vocabulary [0, 64)");
  EXPECT_LORA_ERROR(llama.forward(Ids::Zero(1, 65)), "65 tokens", "max_position_embeddings 64");
  EXPECT_LORA_ERROR(llama.forward(Ids::Zero(2, 4), Ids::Ones(2, 3)), "attention_mask is (2, 3), expected (2, 4)");
  EXPECT_LORA_ERROR(llama.forward(Ids::Zero(2, 4), Ids::Constant(2, 4, 2)), "attention_mask holds values other than 0 and 1");

  const std::string text = lora::detail::read_text(kLlama + "/config.json");
  auto with = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    const auto at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  using Llama = lora::LlamaModel<double>;
  EXPECT_LORA_ERROR(Llama(variant(kLlama, "wide", with("\"hidden_size\": 32", "\"hidden_size\": 48"))),
                    "model.embed_tokens.weight' is [64, 32], config.json implies [64, 48]");
  EXPECT_LORA_ERROR(Llama(variant(kLlama, "deep", with("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"))),
                    "tensor 'model.layers.2.input_layernorm.weight' is missing");
  EXPECT_LORA_ERROR(Llama(variant(kLlama, "kv", with("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"))),
                    "num_attention_heads 4 is not a multiple of num_key_value_heads 3");
  EXPECT_LORA_ERROR(Llama(variant(kLlama, "rope", with("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\""))),
                    "rope_type \"yarn\"", "supported");
  EXPECT_LORA_ERROR(Llama(variant(kLlama, "type", with("\"model_type\": \"llama\"", "\"model_type\": \"mistral\""))),
                    "model_type is \"mistral\"", "supported");
  EXPECT_LORA_ERROR(Llama(variant(kLlama, "vocab", with("\"vocab_size\": 64", "\"vocab_size\": -1"))), "vocab_size is -1");
  EXPECT_LORA_ERROR(lora::Gpt2Model<double>{kLlama}, "model_type is \"llama\", expected \"gpt2\"");
}

TEST(Models, Llama3RopeScalingFollowsTransformers) {
  // transformers' _compute_llama3_parameters for θ = 500000, dh = 8, factor 8, low 1, high 4,
  // original 8192: frequencies with wavelength < 2048 keep θ^(−2i/dh), those > 8192 are divided
  // by 8, and between them blend smoothly (values from the formula, in double).
  lora::LmConfig c;
  c.head_dim = 8;
  c.rope_theta = 500000;
  c.rope_type = "llama3";
  c.rope_factor = 8;
  c.low_freq_factor = 1;
  c.high_freq_factor = 4;
  c.original_max_position_embeddings = 8192;
  const lora::Vec<double> f = c.rope_inv_freq();
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < 4; ++i) {
    const double base = std::pow(500000.0, -2.0 * i / 8), wavelen = 2 * pi / base;
    double want = base;
    if (wavelen > 8192) want = base / 8;
    else if (wavelen >= 2048) {
      const double s = (8192 / wavelen - 1) / 3;
      want = (1 - s) * base / 8 + s * base;
    }
    EXPECT_NEAR(f[i], want, 1e-6 * want) << i;              // float, as transformers computes them
    EXPECT_NEAR(c.rope_inv_freq(false)[i], want, 1e-15 * want) << i;  // a double model's: exact
  }
}

namespace {

// Central differences of causal_lm_loss against the gradient of every parameter the model lists
// (padding, -100 labels, double): per tensor its largest-gradient entry and one other.
template <class Model>
void check_parameter_gradients(Model& model) {
  const Batch batch = padded_batch();
  const Ids &ids = batch.ids, &mask = batch.mask, &labels = batch.labels;
  auto loss = [&] { return lora::causal_lm_loss<double>(model.forward(ids, mask), labels).loss; };
  model.zero_grad();
  model.backward(lora::causal_lm_loss<double>(model.forward_train(ids, mask), labels).grad);
  std::uint64_t seed = 3;
  for (auto& p : model.parameters()) {
    Eigen::Index bi = 0, bj = 0;
    p.grad.cwiseAbs().maxCoeff(&bi, &bj);
    EXPECT_GT(std::abs(p.grad(bi, bj)), 1e-6) << p.name << " has no gradient";
    const Eigen::Index ri = Eigen::Index(seed * 7 % p.value.rows()), rj = Eigen::Index(seed * 13 % p.value.cols());
    seed += 5;
    for (const auto& [i, j] : {std::pair{bi, bj}, std::pair{ri, rj}}) {
      const double h = 1e-5, orig = p.value(i, j);
      p.value(i, j) = orig + h;
      const double up = loss();
      p.value(i, j) = orig - h;
      const double down = loss();
      p.value(i, j) = orig;
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(p.grad(i, j), fd, 1e-7 + 1e-6 * std::abs(fd)) << p.name << "(" << i << ", " << j << ")";
    }
  }
}

std::set<std::string> parameter_names(std::vector<lora::Parameter<double>> params) {
  std::set<std::string> names;
  for (const auto& p : params) names.insert(p.name);
  return names;
}

// Full fine-tuning trains exactly the checkpoint's tensors, each with the right gradient.
template <class Model>
void check_full_training(const std::string& dir) {
  Model model(dir);
  EXPECT_EQ(model.trainable_parameters(), 0);
  model.set_base_trainable(true);
  EXPECT_EQ(model.trainable_parameters(), model.base_parameters());
  std::set<std::string> tensors;
  const auto st = lora::SafeTensors::open(dir + "/model.safetensors");
  for (const auto& t : st.tensors())
    if (t.name != "lm_head.weight" || !model.config().tie_word_embeddings) tensors.insert(t.name);
  EXPECT_EQ(parameter_names(model.parameters()), tensors);
  check_parameter_gradients(model);
}

}  // namespace

TEST(Models, LlamaFullTrainingGradientsMatchFiniteDifferences) { check_full_training<lora::LlamaModel<double>>(kLlama); }
TEST(Models, Gpt2FullTrainingGradientsMatchFiniteDifferences) { check_full_training<lora::Gpt2Model<double>>(kGpt2); }

// PEFT's modules_to_save beside LoRA: the named base modules train with the LoRA factors (a tied
// head is the embedding), and a name that matches nothing is refused.
TEST(Models, ModulesToSaveTrainBesideTheLoraFactors) {
  const auto config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  lora::LlamaModel<double> llama(kLlama, &config);
  lora::load_adapter(kLlama + "/adapter", llama.modules());
  llama.set_trainable({"lm_head", "model.norm", "layers.1.input_layernorm"});
  std::set<std::string> want = parameter_names(llama.modules().parameters());
  EXPECT_EQ(want.size(), 28u);
  want.insert({"lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"});
  EXPECT_EQ(parameter_names(llama.parameters()), want);
  check_parameter_gradients(llama);
  EXPECT_LORA_ERROR(llama.set_trainable({"norm", "wte"}), "no module's path ends with 'wte'");
  EXPECT_EQ(parameter_names(llama.parameters()), want);  // unchanged
  llama.set_trainable({"norm"});  // PEFT's plain suffix: every norm
  want.insert({"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
               "model.layers.1.post_attention_layernorm.weight"});
  EXPECT_EQ(parameter_names(llama.parameters()), want);

  const auto g_config = lora::PeftConfig::read(kGpt2 + "/adapter/adapter_config.json");
  lora::Gpt2Model<double> gpt2(kGpt2, &g_config);
  lora::load_adapter(kGpt2 + "/adapter", gpt2.modules());
  gpt2.set_trainable({"lm_head", "ln_f"});
  want = parameter_names(gpt2.modules().parameters());
  want.insert({"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"});
  EXPECT_EQ(parameter_names(gpt2.parameters()), want);
  check_parameter_gradients(gpt2);
}

// PEFT saves an adapted lm_head's base weight beside its factors (save_embedding_layers): it
// loads when it is the model's own weight (logits as PEFT's), and is refused by name when not.
TEST(Models, PeftHeadAdapterCarriesTheBaseWeight) {
  const std::string dir = kLlama + "/adapter_head";
  const auto config = lora::PeftConfig::read(dir + "/adapter_config.json");
  const Ids ids = lora::SafeTensors::open(kLlama + "/io.safetensors").integers("input_ids");
  lora::LlamaModel<double> m(kLlama, &config);
  m.load_adapter(dir);
  const auto want = lora::SafeTensors::open(kLlama + "/adapter_head_logits.safetensors").matrix<double>("logits");
  EXPECT_LE(relative_error(m.forward(ids), want), 1e-5);

  const lora::SafeTensors st = lora::SafeTensors::open(dir + "/adapter_model.safetensors");
  lora::SafeTensorsBuilder b;
  for (const auto& t : st.tensors()) {
    lora::Mat<float> v = st.matrix<float>(t.name);
    if (t.name == "base_model.model.lm_head.base_layer.weight") v(3, 5) += 1;
    b.add(t.name, v);
  }
  const fs::path other = fs::temp_directory_path() / "lora_test_models_head_adapter";
  fs::create_directories(other);
  b.save((other / "adapter_model.safetensors").string());
  fs::copy_file(dir + "/adapter_config.json", other / "adapter_config.json", fs::copy_options::overwrite_existing);
  lora::LlamaModel<double> fresh(kLlama, &config);
  EXPECT_LORA_ERROR(fresh.load_adapter(other.string()), "base_model.model.lm_head.base_layer.weight differs from the model's weight of lm_head");
  EXPECT_TRUE(fresh.modules().at("lm_head").lora_B().isZero());
  fs::remove_all(other);
}

// A new model from a config is reproducible from its seed, and save_pretrained writes a folder
// that loads back to the same logits.
template <class Model>
void check_new_model(const std::string& dir, const std::string& name) {
  const lora::LmConfig c = lora::LmConfig::from_json(lora::detail::read_text(dir + "/config.json"), name);
  const Model a(c, 5), b(c, 5), other(c, 6);
  Ids ids(1, 5);
  ids << 1, 2, 3, 4, 5;
  const lora::Mat<double> logits = a.forward(ids);
  EXPECT_EQ(b.forward(ids), logits);
  EXPECT_GT(relative_error(other.forward(ids), logits), 1e-3);
  const std::string out = (fs::temp_directory_path() / ("lora_test_models_new_" + name)).string();
  fs::remove_all(out);
  a.save_pretrained(out);
  EXPECT_EQ(Model(out).forward(ids), logits);
  EXPECT_EQ(lora::detail::read_text(out + "/config.json"), lora::detail::read_text(dir + "/config.json"));
}

TEST(Models, LlamaNewModelSavesAndReloads) { check_new_model<lora::LlamaModel<double>>(kLlama, "llama"); }
TEST(Models, Gpt2NewModelSavesAndReloads) { check_new_model<lora::Gpt2Model<double>>(kGpt2, "gpt2"); }

// A checkpoint in two shards (model.safetensors.index.json) loads as the single file does, and
// save_checkpoint keeps its shards; an index that disagrees with its shards is refused by name.
TEST(Models, ShardedCheckpointsLoadAndSave) {
  const auto st = lora::SafeTensors::open(kLlama + "/model.safetensors");
  const fs::path dir = fs::temp_directory_path() / "lora_test_models_sharded";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(kLlama + "/config.json", dir / "config.json");
  lora::SafeTensorsBuilder shard[2];
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  int k = 0;
  for (const auto& t : st.tensors()) {
    const int s = k++ % 2;
    const std::uint8_t* p = st.bytes(t.name);
    shard[s].add_raw(t.name, t.dtype, t.shape, std::vector<std::uint8_t>(p, p + (t.end - t.begin)));
    index["weight_map"][t.name] = "model-0000" + std::to_string(s + 1) + "-of-00002.safetensors";
  }
  shard[0].save((dir / "model-00001-of-00002.safetensors").string());
  shard[1].save((dir / "model-00002-of-00002.safetensors").string());
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
  Ids ids(1, 6);
  ids << 3, 1, 4, 1, 5, 9;
  const lora::Mat<double> want = lora::LlamaModel<double>(kLlama).forward(ids);
  EXPECT_EQ(lora::LlamaModel<double>(dir.string()).forward(ids), want);

  const auto config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  lora::LlamaModel<double> tuned(dir.string(), &config);
  lora::load_adapter(kLlama + "/adapter", tuned.modules());
  const lora::Mat<double> adapted = tuned.forward(ids);
  tuned.modules().merge();
  const fs::path out = fs::temp_directory_path() / "lora_test_models_sharded_out";
  fs::remove_all(out);
  lora::save_checkpoint(dir.string(), out.string(), tuned.modules());
  EXPECT_TRUE(fs::exists(out / "model-00002-of-00002.safetensors"));
  EXPECT_FALSE(fs::exists(out / "model.safetensors"));
  EXPECT_LE(relative_error(lora::LlamaModel<double>(out.string()).forward(ids), adapted), 1e-6);  // merged weights stored in F32

  auto bad_index = [&](const std::string& tensor, const std::string& file) {
    nlohmann::json j = index;
    j["weight_map"][tensor] = file;
    std::ofstream(dir / "model.safetensors.index.json") << j.dump(2);
    return dir.string();
  };
  using Llama = lora::LlamaModel<double>;
  EXPECT_LORA_ERROR(Llama(bad_index("model.norm.weight", index["weight_map"]["lm_head.weight"] == "model-00001-of-00002.safetensors"
                                                              ? "model-00002-of-00002.safetensors"
                                                              : "model-00001-of-00002.safetensors")),
                    "weight_map puts 'model.norm.weight' in", "which does not hold it");
  EXPECT_LORA_ERROR(Llama(bad_index("model.norm.weight", "../model.safetensors")), "not a file name in the folder");
  EXPECT_LORA_ERROR(Llama(bad_index("model.norm.weight", "model-00003-of-00002.safetensors")), "model-00003-of-00002.safetensors");
  nlohmann::json missing = index;
  missing["weight_map"].erase("model.norm.weight");
  std::ofstream(dir / "model.safetensors.index.json") << missing.dump(2);
  EXPECT_LORA_ERROR(Llama(dir.string()), "holds 'model.norm.weight', which weight_map does not list");
}

// A batch in which each prompt uses its own adapter (or none) generates, unmerged and in one pass,
// what each prompt generates alone with its adapter active; the logits agree to rounding.
TEST(Models, MixedAdapterBatchGeneratesAsEachAdapterAlone) {
  const auto config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  lora::LlamaModel<double> model(kLlama, &config);
  lora::load_adapter(kLlama + "/adapter", model.modules());
  for (const auto& [path, layer] : model.modules()) {  // a second adapter: the first's B, negated and doubled
    layer->add_adapter("b", layer->config("default"));
    layer->set_lora_A("b", layer->lora_A("default"));
    layer->set_lora_B("b", -2.0 * layer->lora_B("default"));
  }
  const std::vector<std::vector<std::int64_t>> prompts = {{1, 2, 3}, {4, 5}, {6}};
  const std::vector<std::string> names = {"default", "b", "__base__"};
  lora::GenerationConfig g;
  g.max_new_tokens = 10;
  g.adapters = names;
  const auto mixed = lora::generate(model, prompts, g);
  g.adapters.clear();
  std::vector<std::vector<std::int64_t>> alone;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    model.modules().enable_adapters(names[i] != "__base__");
    if (names[i] != "__base__") model.modules().set_adapter({names[i]});
    alone.push_back(lora::generate(model, {prompts[i]}, g)[0]);
  }
  EXPECT_EQ(mixed, alone);
  EXPECT_NE(alone[0], alone[1]);  // the adapters differ, so each row used its own
  EXPECT_NE(alone[1], alone[2]);
  model.modules().enable_adapters(true);
  model.modules().set_adapter({"default"});
  Ids ids(3, 4);
  ids << 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12;
  const lora::Mat<double> got = model.forward(ids, {}, nullptr, &names);
  EXPECT_LE(relative_error(got.topRows(4), model.forward(Ids(ids.row(0)))), 1e-12);
  model.modules().set_adapter({"b"});
  EXPECT_LE(relative_error(got.middleRows(4, 4), model.forward(Ids(ids.row(1)))), 1e-12);
  model.modules().enable_adapters(false);
  EXPECT_LE(relative_error(got.bottomRows(4), model.forward(Ids(ids.row(2)))), 1e-12);
  // An adapter that only some layers have: the others give its rows the base, as in PEFT. Here
  // "q" is the default adapter's q_proj factors alone, which a model with LoRA on q_proj only
  // computes.
  model.modules().enable_adapters(true);
  for (const auto& [path, layer] : model.modules())
    if (path.find("q_proj") != std::string::npos) {
      layer->add_adapter("q", layer->config("default"));
      layer->set_lora_A("q", layer->lora_A("default"));
      layer->set_lora_B("q", layer->lora_B("default"));
    }
  lora::PeftConfig q_only = config;
  q_only.target_modules = {"q_proj"};
  lora::LlamaModel<double> q_model(kLlama, &q_only);
  lora::LoadOptions loose;
  loose.strict = false;
  lora::load_adapter(kLlama + "/adapter", q_model.modules(), loose);
  const std::vector<std::string> with_q = {"q", "__base__", "b"};
  EXPECT_LE(relative_error(model.forward(ids, {}, nullptr, &with_q).topRows(4), q_model.forward(Ids(ids.row(0)))), 1e-12);
  g.adapters = {"default"};
  EXPECT_LORA_ERROR(lora::generate(model, prompts, g), "1 adapter names for 3 prompts");
  const std::vector<std::string> unknown = {"default", "c", "b"};
  EXPECT_LORA_ERROR(model.forward(ids, {}, nullptr, &unknown), "no LoRA layer has an adapter 'c'");
}

// Attention's (sequence, head) pairs run in parallel above a work threshold (this shape is above
// it): logits and every gradient are the same, bit for bit, on one thread and on two.
TEST(Models, LlamaAttentionHeadsRunInParallelWithTheSameResults) {
  const lora::LmConfig c = lora::LmConfig::from_json(lora::detail::read_text(kLlama + "/config.json"), "tiny_llama");
  lora::LlamaModel<double> model(c, 3);
  model.set_base_trainable(true);
  Ids ids(4, 64);
  for (Eigen::Index i = 0; i < ids.size(); ++i) ids.data()[i] = (i * 7 + 3) % 64;
  Ids mask = Ids::Ones(4, 64);
  mask.block(1, 0, 1, 5).setZero();
  auto run = [&](int threads) {
    lora::set_num_threads(threads);
    model.zero_grad();
    const lora::Mat<double> logits = model.forward_train(ids, mask);
    model.backward(lora::causal_lm_loss<double>(logits, ids).grad);
    std::vector<lora::Mat<double>> out = {logits, model.forward(ids, mask)};
    for (const auto& p : model.parameters()) out.push_back(p.grad);
    return out;
  };
  const auto one = run(1), two = run(2);
  lora::set_num_threads(0);
  ASSERT_EQ(one.size(), two.size());
  for (std::size_t i = 0; i < one.size(); ++i) EXPECT_EQ(one[i], two[i]) << i;
}

// PEFT's modules_to_save in adapter directories: the model's save_adapter writes the trained base
// tensors beside the LoRA factors, its load_adapter gives a fresh model the same logits; a
// ModuleMap alone refuses the directory, and a directory that lacks a named module's tensor is
// refused without changing the model.
TEST(Models, ModulesToSaveRoundTripThroughAdapterDirectories) {
  const auto config = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  lora::LlamaModel<double> trained(kLlama, &config);
  lora::load_adapter(kLlama + "/adapter", trained.modules());
  trained.set_trainable({"lm_head", "model.norm"});
  lora::AdamWOptions o;
  o.lr = 1e-2;
  lora::AdamW<double> opt(o);
  opt.add(trained.parameters());
  Ids ids(1, 8);
  ids << 1, 5, 9, 13, 17, 21, 25, 29;
  for (int step = 0; step < 3; ++step) {
    trained.zero_grad();
    trained.backward(lora::causal_lm_loss<double>(trained.forward_train(ids), ids).grad);
    opt.step();
  }
  const fs::path dir = fs::temp_directory_path() / "lora_test_models_modules_to_save";
  fs::remove_all(dir);
  trained.save_adapter(dir.string(), config, lora::Dtype::F64);
  const auto st = lora::SafeTensors::open((dir / "adapter_model.safetensors").string());
  EXPECT_TRUE(st.contains("base_model.model.lm_head.weight"));
  EXPECT_EQ(st.info("base_model.model.model.norm.weight").shape, std::vector<std::uint64_t>{32});
  EXPECT_EQ(lora::PeftConfig::read((dir / "adapter_config.json").string()).modules_to_save,
            (std::vector<std::string>{"lm_head", "model.norm"}));

  lora::LlamaModel<double> fresh(kLlama, &config);
  const lora::Mat<double> before = fresh.forward(ids);
  EXPECT_LORA_ERROR(lora::load_adapter(dir.string(), fresh.modules()), "modules_to_save is lm_head, model.norm",
                    "load it with the model's load_adapter");
  fresh.load_adapter(dir.string());
  EXPECT_EQ(fresh.forward(ids), trained.forward(ids));
  EXPECT_EQ(fresh.trainable_parameters(), trained.trainable_parameters());

  // The config names embed_tokens too, which the file lacks: refused, nothing changes.
  lora::PeftConfig wider = lora::PeftConfig::read((dir / "adapter_config.json").string());
  wider.modules_to_save.push_back("embed_tokens");
  std::ofstream(dir / "adapter_config.json") << wider.to_json();
  lora::LlamaModel<double> other(kLlama, &config);
  const auto trainable = other.trainable_parameters();
  EXPECT_LORA_ERROR(other.load_adapter(dir.string()), "model.embed_tokens.weight of modules_to_save is not in the file");
  EXPECT_EQ(other.trainable_parameters(), trainable);
  EXPECT_EQ(other.forward(ids), before);

  lora::Gpt2Model<double> gpt2(kGpt2, nullptr);
  gpt2.set_trainable({"lm_head"});
  EXPECT_LORA_ERROR(gpt2.save_adapter(dir.string() + "_gpt2", lora::PeftConfig{}), "lm_head is tied to the embedding");
}

// Frozen weights kept in bf16 (FrozenWeights::bf16) are the model whose checkpoint was rounded to
// bf16 and widened on load: save_pretrained writes the held tensors as BF16 (the LoRA layers' W
// and what trains stay F64), and that folder, read widened, gives the same logits, and the same
// gradients of the LoRA factors (with the adapter) and of modules trained beside them (widened
// back when set to train), to rounding.
template <class Model>
void check_frozen_bf16(const std::string& dir, const std::string& name, bool adapter, const std::string& frozen_tensor,
                       const std::string& f64_tensor, const std::vector<std::string>& train) {
  SCOPED_TRACE(name);
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  const lora::PeftConfig* lora = adapter ? &config : nullptr;
  Model held(dir, lora, {}, lora::FrozenWeights::bf16);
  if (adapter) held.load_adapter(dir + "/adapter");
  const std::string out = (fs::temp_directory_path() / ("lora_test_models_bf16_" + name)).string();
  fs::remove_all(out);
  held.save_pretrained(out);
  const auto st = lora::SafeTensors::open(out + "/model.safetensors");
  EXPECT_EQ(st.info(frozen_tensor).dtype, lora::Dtype::BF16);
  EXPECT_EQ(st.info(f64_tensor).dtype, lora::Dtype::F64);  // a norm, or a LoRA layer's W
  Model widened(out, lora);
  if (adapter) widened.load_adapter(dir + "/adapter");
  EXPECT_EQ(held.base_parameters(), widened.base_parameters());
  const Ids probe = Ids::Constant(1, 4, 3);
  EXPECT_GT(relative_error(widened.forward(probe), Model(dir, lora).forward(probe)), 1e-6);  // bf16 rounding shows

  Ids ids(2, 6), mask = Ids::Ones(2, 6);
  ids << 0, 7, 3, 9, 17, 4, 5, 6, 7, 8, 9, 10;
  mask(0, 0) = 0;
  EXPECT_LE(relative_error(held.forward(ids, mask), widened.forward(ids, mask)), 1e-13);
  for (Model* m : {&held, &widened}) {
    m->set_trainable(train);
    m->zero_grad();
    m->backward(lora::causal_lm_loss<double>(m->forward_train(ids, mask), ids).grad);
  }
  const auto a = held.parameters(), b = widened.parameters();
  ASSERT_EQ(a.size(), b.size());
  ASSERT_GT(a.size(), adapter ? config.target_modules.size() : 1);
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].value, b[i].value) << a[i].name;
    EXPECT_GT(a[i].grad.norm(), 0) << a[i].name;
    EXPECT_LE(relative_error(a[i].grad, b[i].grad), 1e-12) << a[i].name;
  }
}

TEST(Models, FrozenWeightsKeptInBf16AreTheRoundedCheckpoint) {
  // LoRA on every linear but the head; the head and (until it trains) the embedding in bf16.
  check_frozen_bf16<lora::LlamaModel<double>>(kLlama, "llama", true, "lm_head.weight",
                                              "model.layers.0.self_attn.q_proj.weight", {"embed_tokens"});
  // No LoRA: every linear in bf16, the norms' gradients reach through all of them.
  check_frozen_bf16<lora::LlamaModel<double>>(kLlama, "llama_plain", false, "model.layers.1.mlp.down_proj.weight",
                                              "model.norm.weight", {"input_layernorm"});
  check_frozen_bf16<lora::Gpt2Model<double>>(kGpt2, "gpt2", true, "transformer.wte.weight",
                                             "transformer.h.0.attn.c_attn.weight", {"ln_f"});
  check_frozen_bf16<lora::Gpt2Model<double>>(kGpt2, "gpt2_plain", false, "transformer.h.1.mlp.c_fc.weight",
                                             "transformer.ln_f.weight", {"ln_1"});
}
