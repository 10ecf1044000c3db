// The causal language models (models/llama.hpp, models/gpt2.hpp) on the tiny transformers
// checkpoints: logits against transformers' (the full check of every adapter is lm_check, under
// ctest), padding, LoRA layers by module path, and bad checkpoints and inputs.
#include <lora/models/gpt2.hpp>
#include <lora/models/llama.hpp>
#include <lora/peft.hpp>

#include "test_util.hpp"

#include <filesystem>
#include <fstream>

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

}  // namespace

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

TEST(Models, BadInputsAndCheckpointsAreRefusedByName) {
  const lora::LlamaModel<double> llama(kLlama);
  Ids ids = Ids::Constant(1, 4, 3);
  ids(0, 2) = 64;
  EXPECT_LORA_ERROR(llama.forward(ids), "ids(0, 2) is 64", "outside the vocabulary [0, 64)");
  EXPECT_LORA_ERROR(llama.forward(Ids::Zero(1, 65)), "65 tokens", "max_position_embeddings 64");
  EXPECT_LORA_ERROR(llama.forward(Ids::Zero(2, 4), Ids::Ones(2, 3)), "attention_mask is (2, 3), expected (2, 4)");

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
    EXPECT_NEAR(f[i], want, 1e-6 * want) << i;
  }
}
