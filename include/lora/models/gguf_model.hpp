// A Hugging Face checkpoint folder (Llama or GPT-2) as a GGUF model file that llama.cpp loads,
// as convert_hf_to_gguf.py writes one: the architecture's hyperparameters, the weights under
// llama.cpp's names and, since the checkpoint carries no tokenizer, llama.cpp's "no_vocab"
// tokenizer (token ids in, logits out; <arch>.vocab_size gives the count).
//
//   llama: llama.block_count, context_length, embedding_length, feed_forward_length,
//          attention.head_count, attention.head_count_kv, attention.key_length,
//          attention.value_length, rope.dimension_count (u32); rope.freq_base,
//          attention.layer_norm_rms_epsilon (f32)
//          token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
//          ffn_up, ffn_down}, output_norm, output (untied only); with attention_bias the four
//          attention projections' .bias, with mlp_bias the three MLP projections'; q_proj's and
//          k_proj's rows (and biases) in llama.cpp's rotary order (gguf_adapter.hpp's rope_rows).
//          rope_type "llama3": rope_freqs.weight (head_dim / 2), the factor each rotary
//          frequency is divided by: 1 above the high-frequency wavelength limit, `factor`
//          below the low one, 1 / ((1 - smooth) / factor + smooth) between, smooth =
//          (original_max_position_embeddings / wavelength - low_freq_factor) /
//          (high_freq_factor - low_freq_factor), as transformers scales inv_freq.
//   gpt2:  gpt2.block_count, context_length (n_positions), embedding_length,
//          feed_forward_length (n_inner), attention.head_count (u32);
//          attention.layer_norm_epsilon (f32)
//          token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
//          ffn_down}.{weight, bias}, output_norm.{weight, bias}; Conv1D's (in, out) weights
//          transposed to (out, in) as llama.cpp holds every linear weight; the head is tied.
//
// Matrices in dtype (F32, F16 or BF16); norms, biases and rope_freqs in F32 (as the converter
// keeps 1-D tensors). general.file_type 0 (F32), 1 (F16) or 32 (BF16).
#pragma once

#include <lora/gguf.hpp>
#include <lora/models/gguf_adapter.hpp>
#include <lora/models/lm_blocks.hpp>
#include <lora/models/lm_config.hpp>

#include <cmath>
#include <string>

namespace lora {

namespace detail {

// rope_freqs for rope_type "llama3": head_dim / 2 factors.
inline Mat<float> llama3_rope_factors(const LmConfig& c) {
  const Index half = c.head_dim / 2;
  const double pi = 3.14159265358979323846, low_wavelen = c.original_max_position_embeddings / c.low_freq_factor,
               high_wavelen = c.original_max_position_embeddings / c.high_freq_factor;
  Mat<float> f(1, half);
  for (Index i = 0; i < half; ++i) {
    const double wavelen = 2 * pi * std::pow(c.rope_theta, 2.0 * double(i) / double(c.head_dim));
    if (wavelen < high_wavelen) {
      f(0, i) = 1;
    } else if (wavelen > low_wavelen) {
      f(0, i) = static_cast<float>(c.rope_factor);
    } else {
      const double smooth = (c.original_max_position_embeddings / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
      f(0, i) = static_cast<float>(1 / ((1 - smooth) / c.rope_factor + smooth));
    }
  }
  return f;
}

}  // namespace detail

inline void save_gguf_model(const std::string& hf_dir, const std::string& path, GgmlType dtype = GgmlType::f32) {
  const char* where = "save_gguf_model: ";
  const LmConfig c = LmConfig::read(hf_dir);
  const std::string& arch = c.model_type;
  if (arch != "llama" && arch != "gpt2") detail::fail(where, hf_dir, ": model_type '", arch, "': only llama and gpt2 are written");
  if (c.rope_type != "default" && c.rope_type != "llama3")
    detail::fail(where, hf_dir, ": rope_type '", c.rope_type, "' is not written (default and llama3 are)");
  if (dtype != GgmlType::f32 && dtype != GgmlType::f16 && dtype != GgmlType::bf16) detail::fail(where, "dtype must be F32, F16 or BF16");
  const Checkpoint<float> ckpt(hf_dir);
  const Index d = c.hidden_size, ff = c.intermediate_size, q_out = Index(c.num_attention_heads) * c.head_dim,
              kv_out = Index(c.num_key_value_heads) * c.head_dim;
  const auto u32 = [](Index v) { return GgufValue::u32(static_cast<std::uint32_t>(v)); };
  GgufBuilder b;
  const auto key = [&](const std::string& k, GgufValue v) { b.metadata(arch + "." + k, std::move(v)); };
  b.metadata("general.architecture", GgufValue::string(arch));
  b.metadata("general.type", GgufValue::string("model"));
  key("block_count", u32(c.num_hidden_layers));
  key("context_length", u32(c.max_position_embeddings));
  key("embedding_length", u32(d));
  key("feed_forward_length", u32(ff));
  key("attention.head_count", u32(c.num_attention_heads));
  if (arch == "llama") {
    key("attention.head_count_kv", u32(c.num_key_value_heads));
    key("attention.key_length", u32(c.head_dim));
    key("attention.value_length", u32(c.head_dim));
    key("rope.dimension_count", u32(c.head_dim));
    key("rope.freq_base", GgufValue::f32(static_cast<float>(c.rope_theta)));
    key("attention.layer_norm_rms_epsilon", GgufValue::f32(static_cast<float>(c.rms_norm_eps)));
  } else {
    key("attention.layer_norm_epsilon", GgufValue::f32(static_cast<float>(c.rms_norm_eps)));
  }
  key("vocab_size", u32(c.vocab_size));
  b.metadata("general.file_type", GgufValue::u32(dtype == GgmlType::f32 ? 0 : dtype == GgmlType::f16 ? 1 : 32));
  b.metadata("tokenizer.ggml.model", GgufValue::string("no_vocab"));
  // 1-D tensors (norms, biases) in F32; a q/k bias in llama.cpp's rotary order.
  const auto vec = [&](const std::string& name, const std::string& hf, Index n, int rope_heads = 0) {
    Mat<float> v = ckpt.vector(hf, n);
    if (rope_heads) v = detail::rope_rows(v, rope_heads);
    b.add(name, v.transpose(), GgmlType::f32, {std::uint64_t(n)});
  };
  const auto mat = [&](const std::string& name, const Mat<float>& m) { b.add(name, m, dtype); };
  if (arch == "llama") {
    if (c.rope_type == "llama3") b.add("rope_freqs.weight", detail::llama3_rope_factors(c), GgmlType::f32, {std::uint64_t(c.head_dim / 2)});
    mat("token_embd.weight", ckpt.matrix("model.embed_tokens.weight", c.vocab_size, d));
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const std::string hf = "model.layers." + std::to_string(l) + ".", blk = "blk." + std::to_string(l) + ".";
      vec(blk + "attn_norm.weight", hf + "input_layernorm.weight", d);
      mat(blk + "attn_q.weight", detail::rope_rows(ckpt.matrix(hf + "self_attn.q_proj.weight", q_out, d), c.num_attention_heads));
      mat(blk + "attn_k.weight", detail::rope_rows(ckpt.matrix(hf + "self_attn.k_proj.weight", kv_out, d), c.num_key_value_heads));
      mat(blk + "attn_v.weight", ckpt.matrix(hf + "self_attn.v_proj.weight", kv_out, d));
      mat(blk + "attn_output.weight", ckpt.matrix(hf + "self_attn.o_proj.weight", d, q_out));
      if (c.attention_bias) {
        vec(blk + "attn_q.bias", hf + "self_attn.q_proj.bias", q_out, c.num_attention_heads);
        vec(blk + "attn_k.bias", hf + "self_attn.k_proj.bias", kv_out, c.num_key_value_heads);
        vec(blk + "attn_v.bias", hf + "self_attn.v_proj.bias", kv_out);
        vec(blk + "attn_output.bias", hf + "self_attn.o_proj.bias", d);
      }
      vec(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", d);
      mat(blk + "ffn_gate.weight", ckpt.matrix(hf + "mlp.gate_proj.weight", ff, d));
      mat(blk + "ffn_up.weight", ckpt.matrix(hf + "mlp.up_proj.weight", ff, d));
      mat(blk + "ffn_down.weight", ckpt.matrix(hf + "mlp.down_proj.weight", d, ff));
      if (c.mlp_bias) {
        vec(blk + "ffn_gate.bias", hf + "mlp.gate_proj.bias", ff);
        vec(blk + "ffn_up.bias", hf + "mlp.up_proj.bias", ff);
        vec(blk + "ffn_down.bias", hf + "mlp.down_proj.bias", d);
      }
    }
    vec("output_norm.weight", "model.norm.weight", d);
    if (!c.tie_word_embeddings) mat("output.weight", ckpt.matrix("lm_head.weight", c.vocab_size, d));
  } else {
    if (!c.tie_word_embeddings) detail::fail(where, hf_dir, ": an untied GPT-2 head is not written");
    mat("token_embd.weight", ckpt.matrix("transformer.wte.weight", c.vocab_size, d));
    mat("position_embd.weight", ckpt.matrix("transformer.wpe.weight", c.max_position_embeddings, d));
    const auto norm = [&](const std::string& name, const std::string& hf) {
      vec(name + ".weight", hf + ".weight", d);
      vec(name + ".bias", hf + ".bias", d);
    };
    // a Conv1D layer: weight (in, out) -> (out, in), bias (out)
    const auto conv = [&](const std::string& name, const std::string& hf, Index in, Index out) {
      mat(name + ".weight", ckpt.matrix(hf + ".weight", in, out).transpose());
      vec(name + ".bias", hf + ".bias", out);
    };
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const std::string hf = "transformer.h." + std::to_string(l) + ".", blk = "blk." + std::to_string(l) + ".";
      norm(blk + "attn_norm", hf + "ln_1");
      conv(blk + "attn_qkv", hf + "attn.c_attn", d, 3 * d);
      conv(blk + "attn_output", hf + "attn.c_proj", d, d);
      norm(blk + "ffn_norm", hf + "ln_2");
      conv(blk + "ffn_up", hf + "mlp.c_fc", d, ff);
      conv(blk + "ffn_down", hf + "mlp.c_proj", ff, d);
    }
    norm("output_norm", "transformer.ln_f");
  }
  b.save(path);
}

}  // namespace lora
