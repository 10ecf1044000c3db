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
// The base weights train when asked (set_trainable, set_base_trainable: lm_trainable.hpp); a new
// model comes from a config and a seed; save_pretrained writes the model as a Hugging Face folder.
#pragma once

#include <lora/error.hpp>
#include <lora/models/lm_blocks.hpp>
#include <lora/models/lm_config.hpp>
#include <lora/models/lm_trainable.hpp>
#include <lora/module_map.hpp>
#include <lora/peft_config.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <array>
#include <cstdint>
#include <random>
#include <utility>
#include <filesystem>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
class Gpt2Model : public TrainableModules<Gpt2Model<Scalar>, Scalar> {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;

  // Reads dir/config.json and dir/model.safetensors (or its shards). With lora, every linear it
  // targets becomes a LoraLinear with lora's r and alpha for that path (base supplies the other
  // LoraConfig fields). FrozenWeights::bf16 keeps the frozen weights in bf16 (keep_frozen_bf16),
  // converted as each is read.
  explicit Gpt2Model(const std::string& dir, const PeftConfig* lora = nullptr, LoraConfig base = {},
                     FrozenWeights frozen = FrozenWeights::widened)
      : config_(LmConfig::read(dir)) {
    Checkpoint<Scalar> ckpt(dir);
    build(ckpt, lora, base, dir, frozen);
  }

  // A new model of the given config, initialised as transformers does (normal(0, std) matrices,
  // unit LayerNorm gains, zero biases) from the seed: for pre-training.
  Gpt2Model(const LmConfig& config, std::uint64_t seed, double std = 0.02) : config_(config) {
    RandomWeights<Scalar> random{std::mt19937_64(seed), std};
    build(random, nullptr, {}, "config");
  }

  const LmConfig& config() const { return config_; }
  const ModuleMap<Scalar>& modules() const { return modules_; }

  // ---- what trains: set_trainable, set_base_trainable, parameters, zero_grad (lm_trainable.hpp)
  // Every parameter of the base model (the tied head counted once).
  Index base_parameters() const {
    Index n = wte_.size() + wpe_.size() + 2 * lnf_.gamma.size();
    for (const Layer& L : layers_) {
      n += 2 * (L.ln1.gamma.size() + L.ln2.gamma.size());
      for (const auto& [name, proj] : Layer::projections(L)) n += proj->size();
    }
    return n;
  }

  // A Hugging Face checkpoint folder: out_dir/config.json (the text the config was read from) and
  // out_dir/model.safetensors with every weight as it is now, in Scalar's dtype, Conv1D weights
  // (in, out) (a LoRA layer's current weight: merge() first to save the merged model).
  void save_pretrained(const std::string& out_dir) const {
    SafeTensorsBuilder b;
    wte_.save(b, "transformer.wte.weight");
    wpe_.save(b, "transformer.wpe.weight");
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      const std::string pre = "transformer.h." + std::to_string(l) + ".";
      add_norm(b, pre + "ln_1", L.ln1);
      add_norm(b, pre + "ln_2", L.ln2);
      for (const auto& [name, proj] : Layer::projections(L)) {
        proj->save(b, pre + name);
      }
    }
    add_norm(b, "transformer.ln_f", lnf_);
    save_pretrained_files(out_dir, config_.json, b);
  }

  // ids (batch, T) -> logits (batch·T, vocab), row b·T + t for token t of sequence b.
  // attention_mask (batch, T), 1 = token, 0 = padding (hidden as a key); empty = no padding.
  // Positions skip pads (token_positions). With a cache (make_cache), ids are the tokens after
  // the cached ones: only they are computed, attending to the cached ones too, and they are
  // added to the cache. const and thread-safe (a cache belongs to one caller).
  // adapters: one adapter name per sequence ("__base__" for none), a mixed batch served without
  // merging (LoraLinear::forward(x, names)); a layer without that adapter gives those rows the
  // base, as PEFT does; null = the active adapters for all.
  Mat forward(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask = {},
              KvCache<Scalar>* cache = nullptr, const std::vector<std::string>* adapters = nullptr) const {
    const LmConfig& c = config_;
    const Index batch = ids.rows(), T = ids.cols(), d = c.hidden_size, past = cache ? cache->length : 0;
    check_token_ids("Gpt2Model::forward", ids, attention_mask, c.vocab_size, c.max_position_embeddings, past);
    const std::vector<std::string> row_names = adapter_rows("Gpt2Model::forward", adapters, ids.rows(), ids.cols(), modules_);
    const std::vector<std::string>* rows = adapters ? &row_names : nullptr;
    const lora::Mat<std::int64_t> key_mask = begin_cached_forward("Gpt2Model::forward", cache, ids, attention_mask, int(layers_.size()));
    const lora::Mat<std::int64_t> pos = token_positions(batch, T, attention_mask, cache ? &cache->real : nullptr);
    Mat h(batch * T, d), a, qkv, q, k, v, o, y, f, g;
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < T; ++t) {
        wte_.lookup(ids(b, t), h.row(b * T + t));
        wpe_.add_to(pos(b, t), h.row(b * T + t));
      }
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      layer_norm(h, L.ln1.gamma, L.ln1.beta, c.rms_norm_eps, a);
      L.c_attn.forward(a, qkv, rows);
      q = qkv.leftCols(d);
      k = qkv.middleCols(d, d);
      v = qkv.rightCols(d);
      const AttentionInputs<Scalar> kv = keys_and_values(k, v, batch, T, cache, int(l));
      causal_attention(q, *kv.K, *kv.V, batch, T, past, kv.stride, c.num_attention_heads, c.num_attention_heads, c.head_dim, key_mask, o);
      L.attn_proj.forward(o, y, rows);
      h += y;
      layer_norm(h, L.ln2.gamma, L.ln2.beta, c.rms_norm_eps, a);
      L.c_fc.forward(a, f, rows);
      gelu_new(f, g);
      L.mlp_proj.forward(g, y, rows);
      h += y;
    }
    end_cached_forward(cache, ids, attention_mask);
    layer_norm(h, lnf_.gamma, lnf_.beta, c.rms_norm_eps, a);
    Mat logits;
    wte_.head(a, logits);
    return logits;
  }

  // ---- training ---------------------------------------------------------------------------
  // forward_train keeps per layer the norms' xhat and 1/σ, q, k, v, P per (sequence, head), o and
  // c_fc's output; backward(dlogits) goes through the tied head (da = dlogits·wte), ln_f and the
  // layers in reverse:
  //   MLP:   df = mlp.c_proj.backward(dh) ⊙ gelu_new'(f); da₂ = c_fc.backward(df); dh += ln₂⁻¹(da₂)
  //          gelu_new'(x) = (1 + tanh u)/2 + x/2·(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)
  //   attn:  do = attn.c_proj.backward(dh); dq, dk, dv = causal_attention_backward;
  //          da₁ = c_attn.backward([dq dk dv]); dh += ln₁⁻¹(da₁)
  // LoRA layers accumulate their gradients; frozen weights, norms and embeddings get none unless
  // they train (set_trainable): dγ, dβ of each LayerNorm, dW, db of each plain Conv1D,
  // dwte += dlogitsᵀ·a (the tied head) and dh of each token at its id, dwpe the same at its position.
  Mat forward_train(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask = {}) {
    const LmConfig& c = config_;
    const Index batch = ids.rows(), T = ids.cols(), d = c.hidden_size;
    check_token_ids("Gpt2Model::forward_train", ids, attention_mask, c.vocab_size, c.max_position_embeddings);
    Train& tr = train_;
    tr.valid = false;
    tr.batch = batch;
    tr.T = T;
    tr.ids = ids;
    tr.pos = token_positions(batch, T, attention_mask, nullptr);
    const lora::Mat<std::int64_t>& pos = tr.pos;
    // The linears borrow their inputs (a₁, o, a₂, g), which stay in the layer's cache until backward.
    Mat h(batch * T, d), qkv, y;
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < T; ++t) {
        wte_.lookup(ids(b, t), h.row(b * T + t));
        wpe_.add_to(pos(b, t), h.row(b * T + t));
      }
    tr.layers.resize(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      Layer& L = layers_[l];
      LayerCache& lc = tr.layers[l];
      layer_norm_train(h, L.ln1.gamma, L.ln1.beta, c.rms_norm_eps, lc.a1, lc.xhat1, lc.inv1);
      L.c_attn.forward_train(lc.a1, qkv, Keep::borrow);
      lc.q = qkv.leftCols(d);
      lc.k = qkv.middleCols(d, d);
      lc.v = qkv.rightCols(d);
      lc.p.resize(std::size_t(batch) * c.num_attention_heads);
      causal_attention(lc.q, lc.k, lc.v, batch, T, 0, T, c.num_attention_heads, c.num_attention_heads, c.head_dim,
                       attention_mask, lc.o, &lc.p);
      L.attn_proj.forward_train(lc.o, y, Keep::borrow);
      h += y;
      layer_norm_train(h, L.ln2.gamma, L.ln2.beta, c.rms_norm_eps, lc.a2, lc.xhat2, lc.inv2);
      L.c_fc.forward_train(lc.a2, lc.f, Keep::borrow);
      gelu_new(lc.f, lc.g);
      L.mlp_proj.forward_train(lc.g, y, Keep::borrow);
      h += y;
    }
    layer_norm_train(h, lnf_.gamma, lnf_.beta, c.rms_norm_eps, tr.a, tr.xhat, tr.inv);
    Mat logits;
    wte_.head(tr.a, logits);
    tr.valid = true;
    return logits;
  }

  void backward(const lora::MatRef<Scalar>& dlogits) {
    const LmConfig& c = config_;
    Train& tr = train_;
    const Index d = c.hidden_size;
    if (!tr.valid) detail::fail("Gpt2Model::backward: no forward_train to go back through (or it was used already)");
    if (dlogits.rows() != tr.batch * tr.T || dlogits.cols() != c.vocab_size)
      detail::fail("Gpt2Model::backward: dlogits is ", detail::shape(dlogits.rows(), dlogits.cols()), ", expected ",
                   detail::shape(tr.batch * tr.T, c.vocab_size));
    if (!modules_.ready_for_backward())
      detail::fail("Gpt2Model::backward: a LoRA layer changed after forward_train (merge, set_adapter, set_lora_A, ...); "
                   "run forward_train again");
    tr.valid = false;
    if (wte_.trainable) wte_.grad_w.noalias() += dlogits.transpose() * tr.a;
    Grads& gr = tr.grads;
    Mat &da = gr.da, &dh = gr.dh, &dx = gr.dx, &df = gr.df, &dq = gr.dq, &dk = gr.dk, &dv = gr.dv, &dqkv = gr.dqkv;
    wte_.head_backward(dlogits, da);
    dh.setZero(da.rows(), d);
    dqkv.resize(da.rows(), 3 * d);
    layer_norm_backward(tr.xhat, tr.inv, lnf_, da, dh);
    const Scalar k0 = Scalar(std::sqrt(2.0 / 3.14159265358979323846)), k1 = Scalar(0.044715);
    for (std::size_t l = layers_.size(); l-- > 0;) {
      Layer& L = layers_[l];
      const LayerCache& lc = tr.layers[l];
      L.mlp_proj.backward(dh, df);
      const auto x = lc.f.array();
      const auto th = (k0 * (x + k1 * x.cube())).tanh();
      df = (df.array() * (Scalar(0.5) * (Scalar(1) + th) + Scalar(0.5) * x * (Scalar(1) - th.square()) * k0 * (Scalar(1) + Scalar(3) * k1 * x.square())))
               .matrix();
      L.c_fc.backward(df, da);
      layer_norm_backward(lc.xhat2, lc.inv2, L.ln2, da, dh);
      L.attn_proj.backward(dh, dx);
      causal_attention_backward(lc.q, lc.k, lc.v, lc.p, dx, tr.batch, tr.T, 0, c.num_attention_heads, c.num_attention_heads,
                                c.head_dim, dq, dk, dv);
      dqkv << dq, dk, dv;
      // Below the first layer only frozen embeddings: unless they or its norm train, no dX.
      const bool below = l > 0 || wte_.trainable || wpe_.trainable || L.ln1.trainable;
      L.c_attn.backward(dqkv, da, below ? InputGrad::set : InputGrad::none);
      if (below) layer_norm_backward(lc.xhat1, lc.inv1, L.ln1, da, dh);
    }
    for (Index i = 0; i < dh.rows(); ++i) {
      if (wte_.trainable) wte_.grad_w.row(tr.ids(i / tr.T, i % tr.T)) += dh.row(i);
      if (wpe_.trainable) wpe_.grad_w.row(tr.pos(i / tr.T, i % tr.T)) += dh.row(i);
    }
  }

  // An empty cache for batch sequences of up to capacity tokens each.
  KvCache<Scalar> make_cache(Index batch, Index capacity) const {
    return KvCache<Scalar>(batch, capacity, int(layers_.size()), config_.hidden_size);
  }

 private:
  struct Layer {
    NormWeights<Scalar> ln1, ln2;
    Projection<Scalar> c_attn, attn_proj, c_fc, mlp_proj;

    // The projections with their paths in the layer (const or not as L is).
    template <class L>
    static auto projections(L& l) {
      return std::array{std::pair{"attn.c_attn", &l.c_attn}, std::pair{"attn.c_proj", &l.attn_proj}, std::pair{"mlp.c_fc", &l.c_fc},
                        std::pair{"mlp.c_proj", &l.mlp_proj}};
    }
  };

  friend class TrainableModules<Gpt2Model<Scalar>, Scalar>;
  void discard_training() { train_.valid = false; }

  // f(path, module) for every base module; the tied head is wte again, under "lm_head".
  template <class Self, class F>
  static void each_base_module(Self& self, F f) {
    f(std::string("transformer.wte"), self.wte_);
    f(std::string("transformer.wpe"), self.wpe_);
    for (std::size_t l = 0; l < self.layers_.size(); ++l) {
      auto& L = self.layers_[l];
      const std::string pre = "transformer.h." + std::to_string(l) + ".";
      f(pre + "ln_1", L.ln1);
      f(pre + "ln_2", L.ln2);
      for (auto [name, proj] : Layer::projections(L)) f(pre + name, *proj);
    }
    f(std::string("transformer.ln_f"), self.lnf_);
    f(std::string("lm_head"), self.wte_);
  }

  static void add_norm(SafeTensorsBuilder& b, const std::string& path, const NormWeights<Scalar>& n) {
    add_vector(b, path + ".weight", n.gamma);
    add_vector(b, path + ".bias", n.beta);
  }

  // Reads every tensor from source (a Checkpoint or RandomWeights).
  template <class Source>
  void build(Source& src, const PeftConfig* lora, const LoraConfig& base, const std::string& label,
             FrozenWeights frozen = FrozenWeights::widened) {
    const bool bf16 = frozen == FrozenWeights::bf16;
    const LmConfig& c = config_;
    if (c.model_type != "gpt2") detail::fail("Gpt2Model: ", label, ": model_type is \"", c.model_type, "\", expected \"gpt2\"");
    if (!c.tie_word_embeddings) detail::fail("Gpt2Model: ", label, ": tie_word_embeddings false is not supported");
    if (lora && lora->targets("lm_head"))
      detail::fail("Gpt2Model: ", label, ": lm_head is tied to transformer.wte; it cannot take LoRA here");
    const Index d = c.hidden_size, ff = c.intermediate_size;
    auto projection = [&](const std::string& path, Index out, Index in) {
      auto p = load_projection<Scalar>(src, path, out, in, true, true, lora, base, modules_);
      if (bf16) p.keep_bf16();
      return p;
    };
    wte_.w = src.matrix("transformer.wte.weight", c.vocab_size, d);
    wpe_.w = src.matrix("transformer.wpe.weight", c.max_position_embeddings, d);
    if (bf16) {
      wte_.keep_bf16();
      wpe_.keep_bf16();
    }
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "transformer.h." + std::to_string(i) + ".";
      Layer L;
      L.ln1.gamma = src.vector(p + "ln_1.weight", d);
      L.ln1.beta = src.vector(p + "ln_1.bias", d);
      L.ln2.gamma = src.vector(p + "ln_2.weight", d);
      L.ln2.beta = src.vector(p + "ln_2.bias", d);
      L.c_attn = projection(p + "attn.c_attn", 3 * d, d);
      L.attn_proj = projection(p + "attn.c_proj", d, d);
      L.c_fc = projection(p + "mlp.c_fc", ff, d);
      L.mlp_proj = projection(p + "mlp.c_proj", d, ff);
      layers_.push_back(std::move(L));
    }
    lnf_.gamma = src.vector("transformer.ln_f.weight", d);
    lnf_.beta = src.vector("transformer.ln_f.bias", d);
  }
  struct LayerCache {
    Mat xhat1, xhat2, a1, a2, q, k, v, o, f, g;  // a₁, a₂ the norms' outputs, g = gelu_new(f)
    Vec inv1, inv2;
    std::vector<Mat> p;  // (T, T) per (sequence, head)
  };
  struct Grads {  // backward's buffers, kept between steps
    Mat da, dh, dx, df, dq, dk, dv, dqkv;
  };
  struct Train {
    bool valid = false;
    Index batch = 0, T = 0;
    lora::Mat<std::int64_t> ids, pos;
    Mat xhat, a;
    Vec inv;
    std::vector<LayerCache> layers;
    Grads grads;
  };

  // gelu_new(x) = x/2·(1 + tanh(√(2/π)(x + 0.044715x³)))
  static void gelu_new(const Mat& x, Mat& y) {
    const Scalar k0 = Scalar(std::sqrt(2.0 / 3.14159265358979323846));
    y = (Scalar(0.5) * x.array() * (Scalar(1) + (k0 * (x.array() + Scalar(0.044715) * x.array().cube())).tanh())).matrix();
  }

  LmConfig config_;
  EmbeddingWeights<Scalar> wte_, wpe_;
  std::vector<Layer> layers_;
  NormWeights<Scalar> lnf_;
  ModuleMap<Scalar> modules_;
  Train train_;
};

}  // namespace lora
