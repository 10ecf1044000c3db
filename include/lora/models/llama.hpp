// LlamaModel<Scalar>: a Hugging Face Llama checkpoint (model_type "llama": config.json +
// model.safetensors) whose linear layers take LoRA by their module paths, as PEFT names them.
//
//   h = embed_tokens[ids]                                          ids (batch, T) -> h (batch·T, d)
//   per layer i (model.layers.i):
//     a = rms(h)·γ₁;  q, k, v = q_proj(a), k_proj(a), v_proj(a)   q (·, heads·dh), k, v (·, kv·dh)
//     q, k ← rope(q, k) at positions 0..T−1                         (rotate_half form)
//     per sequence and head j (kv head j / (heads / kv)):
//       P = softmax(q_j·k_jᵀ/√dh, causal, padded keys hidden);  o_j = P·v_j
//     h += o_proj(o)
//     a = rms(h)·γ₂;  h += down_proj(silu(gate_proj(a)) ⊙ up_proj(a))
//   logits = lm_head(rms(h)·γ)                        (batch·T, vocab); lm_head = embed_tokens when tied
//
// rms(x) = x / sqrt(mean(x²) + eps) per row. rope: inv_freq_i = θ^(−2i/dh), i < dh/2 (llama3
// rope_type rescales it as transformers does); x·cos + rotate_half(x)·sin, rotate_half(x) =
// (−x₂, x₁) of the two halves. A query whose keys are all hidden gets a zero output.
//
// Every linear is a Projection: frozen W (and b) unless the PeftConfig given to the constructor
// targets its path (model.layers.0.self_attn.q_proj, model.layers.0.mlp.down_proj, lm_head), which
// makes it a LoraLinear registered in modules() under that path, so load_adapter, save_adapter,
// merge and named adapters work on the model as on any ModuleMap.
#pragma once

#include <lora/error.hpp>
#include <lora/models/lm_blocks.hpp>
#include <lora/models/lm_config.hpp>
#include <lora/module_map.hpp>
#include <lora/peft_config.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
class LlamaModel {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  // Reads dir/config.json and dir/model.safetensors. With lora, every linear it targets becomes a
  // LoraLinear with lora's r and alpha for that path (base supplies the other LoraConfig fields).
  explicit LlamaModel(const std::string& dir, const PeftConfig* lora = nullptr, LoraConfig base = {})
      : config_(LmConfig::read(dir)) {
    const LmConfig& c = config_;
    if (c.model_type != "llama") detail::fail("LlamaModel: ", dir, ": model_type is \"", c.model_type, "\", expected \"llama\"");
    const Checkpoint<Scalar> ckpt((std::filesystem::path(dir) / "model.safetensors").string());
    auto projection = [&](const std::string& path, Index out, Index in, bool bias) {
      return load_projection(ckpt, path, out, in, bias, false, lora, base, modules_);
    };
    embed_ = ckpt.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      Layer L;
      L.norm1 = ckpt.vector(p + "input_layernorm.weight", c.hidden_size);
      L.norm2 = ckpt.vector(p + "post_attention_layernorm.weight", c.hidden_size);
      const Index d = c.hidden_size, q_out = Index(c.num_attention_heads) * c.head_dim, kv_out = Index(c.num_key_value_heads) * c.head_dim;
      L.q = projection(p + "self_attn.q_proj", q_out, d, c.attention_bias);
      L.k = projection(p + "self_attn.k_proj", kv_out, d, c.attention_bias);
      L.v = projection(p + "self_attn.v_proj", kv_out, d, c.attention_bias);
      L.o = projection(p + "self_attn.o_proj", d, q_out, c.attention_bias);
      L.gate = projection(p + "mlp.gate_proj", c.intermediate_size, d, c.mlp_bias);
      L.up = projection(p + "mlp.up_proj", c.intermediate_size, d, c.mlp_bias);
      L.down = projection(p + "mlp.down_proj", d, c.intermediate_size, c.mlp_bias);
      layers_.push_back(std::move(L));
    }
    norm_ = ckpt.vector("model.norm.weight", c.hidden_size);
    if (c.tie_word_embeddings) {
      if (lora && lora->targets("lm_head"))
        detail::fail("LlamaModel: ", dir, ": lm_head is tied to embed_tokens (tie_word_embeddings); it cannot take LoRA here");
      head_.w = embed_;
    } else {
      head_ = projection("lm_head", c.vocab_size, c.hidden_size, false);
    }
    inv_freq_ = c.rope_inv_freq();
  }

  const LmConfig& config() const { return config_; }
  const ModuleMap<Scalar>& modules() const { return modules_; }

  // ids (batch, T) -> logits (batch·T, vocab), row b·T + t for token t of sequence b.
  // attention_mask (batch, T), 1 = token, 0 = padding (hidden as a key); empty = no padding.
  // const and thread-safe (no caches).
  Mat forward(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask = {}) const {
    const LmConfig& c = config_;
    const Index batch = ids.rows(), T = ids.cols();
    check_token_ids("LlamaModel::forward", ids, attention_mask, c.vocab_size, c.max_position_embeddings);
    Mat h(batch * T, c.hidden_size), a, q, k, v, o, g, u, y;
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < T; ++t) h.row(b * T + t) = embed_.row(ids(b, t));
    Mat cos, sin;
    rope_tables(T, cos, sin);
    for (const Layer& L : layers_) {
      rms_norm(h, L.norm1, c.rms_norm_eps, a);
      L.q.forward(a, q);
      L.k.forward(a, k);
      L.v.forward(a, v);
      rope(q, c.num_attention_heads, cos, sin, T);
      rope(k, c.num_key_value_heads, cos, sin, T);
      causal_attention(q, k, v, batch, T, c.num_attention_heads, c.num_key_value_heads, c.head_dim, attention_mask, o);
      L.o.forward(o, y);
      h += y;
      rms_norm(h, L.norm2, c.rms_norm_eps, a);
      L.gate.forward(a, g);
      L.up.forward(a, u);
      g = (g.array() / (Scalar(1) + (-g.array()).exp()) * u.array()).matrix();  // silu(gate) ⊙ up
      L.down.forward(g, y);
      h += y;
    }
    rms_norm(h, norm_, c.rms_norm_eps, a);
    Mat logits;
    head_.forward(a, logits);
    return logits;
  }

 private:
  struct Layer {
    Vec norm1, norm2;
    Projection<Scalar> q, k, v, o, gate, up, down;
  };

  // cos, sin (T, dh/2) of position t and frequency i.
  void rope_tables(Index T, Mat& cos, Mat& sin) const {
    const Index half = inv_freq_.size();
    cos.resize(T, half);
    sin.resize(T, half);
    for (Index t = 0; t < T; ++t)
      for (Index i = 0; i < half; ++i) {
        // transformers computes the angle in float32: position · inv_freq.
        const float angle = float(t) * float(inv_freq_[i]);
        cos(t, i) = Scalar(std::cos(angle));
        sin(t, i) = Scalar(std::sin(angle));
      }
  }

  // x (batch·T, heads·dh): per head, (x₁, x₂) ← (x₁·cos − x₂·sin, x₂·cos + x₁·sin).
  void rope(Mat& x, int heads, const Mat& cos, const Mat& sin, Index T) const {
    const Index dh = config_.head_dim, half = dh / 2;
    for (Index r = 0; r < x.rows(); ++r) {
      const Index t = r % T;
      for (int h = 0; h < heads; ++h) {
        Scalar* p = x.row(r).data() + h * dh;
        for (Index i = 0; i < half; ++i) {
          const Scalar x1 = p[i], x2 = p[i + half];
          p[i] = x1 * cos(t, i) - x2 * sin(t, i);
          p[i + half] = x2 * cos(t, i) + x1 * sin(t, i);
        }
      }
    }
  }

  LmConfig config_;
  Mat embed_;
  std::vector<Layer> layers_;
  Vec norm_;
  Projection<Scalar> head_;
  Vec inv_freq_;
  ModuleMap<Scalar> modules_;
};

}  // namespace lora
