// A Hugging Face Llama checkpoint folder as a GGUF model file that llama.cpp loads, as
// convert_hf_to_gguf.py writes one: the architecture's hyperparameters, the weights under
// llama.cpp's names, q_proj's and k_proj's rows in its rotary order (models/gguf_adapter.hpp's
// rope_rows), and, since the checkpoint carries no tokenizer, llama.cpp's "no_vocab" tokenizer
// (token ids in, logits out).
//
//   llama.block_count, context_length, embedding_length, feed_forward_length,
//   attention.head_count, attention.head_count_kv, attention.key_length, attention.value_length,
//   rope.dimension_count (u32); rope.freq_base, attention.layer_norm_rms_epsilon (f32);
//   vocab_size (u32); general.file_type (0 F32, 1 F16, 32 BF16)
//   token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
//   ffn_up, ffn_down}, output_norm, output (untied only)
//
// Matrices in dtype (F32, F16 or BF16), norms in F32 (as the converter keeps 1-D tensors).
// Refused: other model types, biases (llama.cpp's llama reads none by these names), rope scaling
// other than "default" (llama3's needs a rope_freqs tensor, not written yet).
#pragma once

#include <lora/gguf.hpp>
#include <lora/models/gguf_adapter.hpp>
#include <lora/models/lm_blocks.hpp>
#include <lora/models/lm_config.hpp>

#include <string>

namespace lora {

inline void save_gguf_model(const std::string& hf_dir, const std::string& path, GgmlType dtype = GgmlType::f32) {
  const char* where = "save_gguf_model: ";
  const LmConfig c = LmConfig::read(hf_dir);
  if (c.model_type != "llama") detail::fail(where, hf_dir, ": model_type '", c.model_type, "': only llama is written");
  if (c.attention_bias || c.mlp_bias) detail::fail(where, hf_dir, ": biases are not written");
  if (c.rope_type != "default") detail::fail(where, hf_dir, ": rope_type '", c.rope_type, "' is not written (only default)");
  if (dtype != GgmlType::f32 && dtype != GgmlType::f16 && dtype != GgmlType::bf16) detail::fail(where, "dtype must be F32, F16 or BF16");
  const Checkpoint<float> ckpt(hf_dir);
  const Index d = c.hidden_size, ff = c.intermediate_size, q_out = Index(c.num_attention_heads) * c.head_dim,
              kv_out = Index(c.num_key_value_heads) * c.head_dim;
  const auto u32 = [](Index v) { return GgufValue::u32(static_cast<std::uint32_t>(v)); };
  GgufBuilder b;
  b.metadata("general.architecture", GgufValue::string("llama"));
  b.metadata("general.type", GgufValue::string("model"));
  b.metadata("llama.block_count", u32(c.num_hidden_layers));
  b.metadata("llama.context_length", u32(c.max_position_embeddings));
  b.metadata("llama.embedding_length", u32(d));
  b.metadata("llama.feed_forward_length", u32(ff));
  b.metadata("llama.attention.head_count", u32(c.num_attention_heads));
  b.metadata("llama.attention.head_count_kv", u32(c.num_key_value_heads));
  b.metadata("llama.attention.key_length", u32(c.head_dim));
  b.metadata("llama.attention.value_length", u32(c.head_dim));
  b.metadata("llama.rope.dimension_count", u32(c.head_dim));
  b.metadata("llama.rope.freq_base", GgufValue::f32(static_cast<float>(c.rope_theta)));
  b.metadata("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(static_cast<float>(c.rms_norm_eps)));
  b.metadata("llama.vocab_size", u32(c.vocab_size));
  b.metadata("general.file_type", GgufValue::u32(dtype == GgmlType::f32 ? 0 : dtype == GgmlType::f16 ? 1 : 32));
  b.metadata("tokenizer.ggml.model", GgufValue::string("no_vocab"));
  const auto norm = [&](const std::string& name, const std::string& hf) {
    b.add(name, ckpt.vector(hf, d).transpose(), GgmlType::f32, {std::uint64_t(d)});
  };
  b.add("token_embd.weight", ckpt.matrix("model.embed_tokens.weight", c.vocab_size, d), dtype);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".", blk = "blk." + std::to_string(l) + ".";
    norm(blk + "attn_norm.weight", hf + "input_layernorm.weight");
    b.add(blk + "attn_q.weight", detail::rope_rows(ckpt.matrix(hf + "self_attn.q_proj.weight", q_out, d), c.num_attention_heads), dtype);
    b.add(blk + "attn_k.weight", detail::rope_rows(ckpt.matrix(hf + "self_attn.k_proj.weight", kv_out, d), c.num_key_value_heads), dtype);
    b.add(blk + "attn_v.weight", ckpt.matrix(hf + "self_attn.v_proj.weight", kv_out, d), dtype);
    b.add(blk + "attn_output.weight", ckpt.matrix(hf + "self_attn.o_proj.weight", d, q_out), dtype);
    norm(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight");
    b.add(blk + "ffn_gate.weight", ckpt.matrix(hf + "mlp.gate_proj.weight", ff, d), dtype);
    b.add(blk + "ffn_up.weight", ckpt.matrix(hf + "mlp.up_proj.weight", ff, d), dtype);
    b.add(blk + "ffn_down.weight", ckpt.matrix(hf + "mlp.down_proj.weight", d, ff), dtype);
  }
  norm("output_norm.weight", "model.norm.weight");
  if (!c.tie_word_embeddings) b.add("output.weight", ckpt.matrix("lm_head.weight", c.vocab_size, d), dtype);
  b.save(path);
}

}  // namespace lora
