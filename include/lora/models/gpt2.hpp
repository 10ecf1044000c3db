// Gpt2Model<Scalar>: a Hugging Face GPT-2 checkpoint (model_type "gpt2": config.json +
// model.safetensors) whose linear layers take LoRA by their module paths, as PEFT names them.
//
//   h = wte[ids] + wpe[positions]                                ids (batch, T) -> h (batch·T, d)
//   per layer i (transformer.h.i):
//     q | k | v = attn.c_attn(ln_1(h))                           (·, 3d), split by columns
//     h += attn.c_proj(attention(q, k, v))                       causal, heads of d / n_head
//     h += mlp.c_proj(gelu_new(mlp.c_fc(ln_2(h))))               gelu_new(x) = x/2·(1 + tanh(√(2/π)(x + 0.044715x³)))
//   logits = ln_f(h)·wteᵀ                                       (batch·T, vocab); the head is tied to wte
//
// The linears are Conv1D: W stored (in, out), y = x·W + b (PEFT's fan_in_fan_out). Every one
// is a Projection (models/lm_blocks.hpp): frozen, or a LoraLinear registered in modules() when
// the PeftConfig given to the constructor targets its path (transformer.h.0.attn.c_attn, ...).
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
class Gpt2Model {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;

  // Reads dir/config.json and dir/model.safetensors. With lora, every linear it targets becomes a
  // LoraLinear with lora's r and alpha for that path (base supplies the other LoraConfig fields).
  explicit Gpt2Model(const std::string& dir, const PeftConfig* lora = nullptr, LoraConfig base = {})
      : config_(LmConfig::read(dir)) {
    const LmConfig& c = config_;
    if (c.model_type != "gpt2") detail::fail("Gpt2Model: ", dir, ": model_type is \"", c.model_type, "\", expected \"gpt2\"");
    if (!c.tie_word_embeddings) detail::fail("Gpt2Model: ", dir, ": tie_word_embeddings false is not supported");
    if (lora && lora->targets("lm_head"))
      detail::fail("Gpt2Model: ", dir, ": lm_head is tied to transformer.wte; it cannot take LoRA here");
    const Checkpoint<Scalar> ckpt((std::filesystem::path(dir) / "model.safetensors").string());
    const Index d = c.hidden_size, ff = c.intermediate_size;
    auto projection = [&](const std::string& path, Index out, Index in) {
      return load_projection(ckpt, path, out, in, true, true, lora, base, modules_);
    };
    wte_ = ckpt.matrix("transformer.wte.weight", c.vocab_size, d);
    wpe_ = ckpt.matrix("transformer.wpe.weight", c.max_position_embeddings, d);
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "transformer.h." + std::to_string(i) + ".";
      Layer L;
      L.ln1_w = ckpt.vector(p + "ln_1.weight", d);
      L.ln1_b = ckpt.vector(p + "ln_1.bias", d);
      L.ln2_w = ckpt.vector(p + "ln_2.weight", d);
      L.ln2_b = ckpt.vector(p + "ln_2.bias", d);
      L.c_attn = projection(p + "attn.c_attn", 3 * d, d);
      L.attn_proj = projection(p + "attn.c_proj", d, d);
      L.c_fc = projection(p + "mlp.c_fc", ff, d);
      L.mlp_proj = projection(p + "mlp.c_proj", d, ff);
      layers_.push_back(std::move(L));
    }
    lnf_w_ = ckpt.vector("transformer.ln_f.weight", d);
    lnf_b_ = ckpt.vector("transformer.ln_f.bias", d);
  }

  const LmConfig& config() const { return config_; }
  const ModuleMap<Scalar>& modules() const { return modules_; }

  // ids (batch, T) -> logits (batch·T, vocab), row b·T + t for token t of sequence b.
  // attention_mask (batch, T), 1 = token, 0 = padding (hidden as a key); empty = no padding.
  // Positions skip pads (token_positions). With a cache (make_cache), ids are the tokens after
  // the cached ones: only they are computed, attending to the cached ones too, and they are
  // added to the cache. const and thread-safe (a cache belongs to one caller).
  Mat forward(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask = {},
              KvCache<Scalar>* cache = nullptr) const {
    const LmConfig& c = config_;
    const Index batch = ids.rows(), T = ids.cols(), d = c.hidden_size, past = cache ? cache->length : 0;
    check_token_ids("Gpt2Model::forward", ids, attention_mask, c.vocab_size, c.max_position_embeddings, past);
    const lora::Mat<std::int64_t> key_mask = begin_cached_forward("Gpt2Model::forward", cache, ids, attention_mask, int(layers_.size()));
    const lora::Mat<std::int64_t> pos = token_positions(batch, T, attention_mask, cache ? &cache->real : nullptr);
    Mat h(batch * T, d), a, qkv, q, k, v, o, y, f;
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < T; ++t) h.row(b * T + t) = wte_.row(ids(b, t)) + wpe_.row(pos(b, t));
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      layer_norm(h, L.ln1_w, L.ln1_b, c.rms_norm_eps, a);
      L.c_attn.forward(a, qkv);
      q = qkv.leftCols(d);
      k = qkv.middleCols(d, d);
      v = qkv.rightCols(d);
      const AttentionInputs<Scalar> kv = keys_and_values(k, v, batch, T, cache, int(l));
      causal_attention(q, *kv.K, *kv.V, batch, T, past, kv.stride, c.num_attention_heads, c.num_attention_heads, c.head_dim, key_mask, o);
      L.attn_proj.forward(o, y);
      h += y;
      layer_norm(h, L.ln2_w, L.ln2_b, c.rms_norm_eps, a);
      L.c_fc.forward(a, f);
      const Scalar k0 = Scalar(std::sqrt(2.0 / 3.14159265358979323846));
      f = (Scalar(0.5) * f.array() * (Scalar(1) + (k0 * (f.array() + Scalar(0.044715) * f.array().cube())).tanh())).matrix();
      L.mlp_proj.forward(f, y);
      h += y;
    }
    end_cached_forward(cache, ids, attention_mask);
    layer_norm(h, lnf_w_, lnf_b_, c.rms_norm_eps, a);
    Mat logits(batch * T, c.vocab_size);
    logits.noalias() = a * wte_.transpose();
    return logits;
  }

  // An empty cache for batch sequences of up to capacity tokens each.
  KvCache<Scalar> make_cache(Index batch, Index capacity) const {
    return KvCache<Scalar>(batch, capacity, int(layers_.size()), config_.hidden_size);
  }

 private:
  struct Layer {
    Vec ln1_w, ln1_b, ln2_w, ln2_b;
    Projection<Scalar> c_attn, attn_proj, c_fc, mlp_proj;
  };

  LmConfig config_;
  Mat wte_, wpe_;
  std::vector<Layer> layers_;
  Vec lnf_w_, lnf_b_;
  ModuleMap<Scalar> modules_;
};

}  // namespace lora
