// LlamaModel<Scalar>: a Hugging Face Llama checkpoint (model_type "llama": config.json +
// model.safetensors) whose linear layers take LoRA by their module paths, as PEFT names them.
//
//   h = embed_tokens[ids]                                          ids (batch, T) -> h (batch·T, d)
//   per layer i (model.layers.i):
//     a = rms(h)·γ₁;  q, k, v = q_proj(a), k_proj(a), v_proj(a)   q (·, heads·dh), k, v (·, kv·dh)
//     q, k ← rope(q, k) at the tokens' positions                   (rotate_half form)
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
// merge and named adapters work on the model as on any ModuleMap. The base weights train when
// asked (set_trainable, set_base_trainable: lm_trainable.hpp); a new model comes from a config and
// a seed; save_pretrained writes the model as a Hugging Face folder. add_bottlenecks, add_prefix and
// add_ladder attach adapter-tuning, prefix-tuning or ladder side-tuning (lm_methods.hpp).
#pragma once

#include <lora/detail/files.hpp>
#include <lora/error.hpp>
#include <lora/models/lm_blocks.hpp>
#include <lora/models/lm_config.hpp>
#include <lora/models/lm_methods.hpp>
#include <lora/models/lm_trainable.hpp>
#include <lora/module_map.hpp>
#include <lora/parameter.hpp>
#include <lora/safetensors.hpp>
#include <lora/peft_config.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <array>
#include <cstdint>
#include <random>
#include <utility>
#include <filesystem>
#include <string>
#include <type_traits>
#include <vector>

namespace lora {

template <class Scalar>
class LlamaModel : public TrainableModules<LlamaModel<Scalar>, Scalar> {
  using Base = TrainableModules<LlamaModel<Scalar>, Scalar>;

 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;

  // Reads dir/config.json and dir/model.safetensors (or its shards). With lora, every linear it
  // targets becomes a LoraLinear with lora's r and alpha for that path (base supplies the other
  // LoraConfig fields). FrozenWeights::bf16 keeps the frozen weights in bf16 (keep_frozen_bf16),
  // converted as each is read.
  explicit LlamaModel(const std::string& dir, const PeftConfig* lora = nullptr, LoraConfig base = {},
                      FrozenWeights frozen = FrozenWeights::widened)
      : config_(LmConfig::read(dir)) {
    if (config_.model_type != "llama")
      detail::fail("LlamaModel: ", dir, ": model_type is \"", config_.model_type, "\", expected \"llama\"");
    Checkpoint<Scalar> ckpt(dir);
    build(ckpt, lora, base, frozen);
  }

  // A new model of the given config, initialised as transformers does (normal(0, std) matrices,
  // unit norm gains, zero biases) from the seed: for pre-training.
  LlamaModel(const LmConfig& config, std::uint64_t seed, double std = 0.02) : config_(config) {
    if (config_.model_type != "llama") detail::fail("LlamaModel: model_type is \"", config_.model_type, "\", expected \"llama\"");
    RandomWeights<Scalar> random{std::mt19937_64(seed), std};
    build(random, nullptr, {});
  }

  const LmConfig& config() const { return config_; }
  const ModuleMap<Scalar>& modules() const { return modules_; }

  // ---- what trains: set_trainable, set_base_trainable, parameters, zero_grad (lm_trainable.hpp)
  // Every parameter of the base model (a tied head counted once).
  Index base_parameters() const {
    Index n = embed_.size() + norm_.gamma.size() + (config_.tie_word_embeddings ? 0 : head_.size());
    for (const Layer& L : layers_) {
      n += L.norm1.gamma.size() + L.norm2.gamma.size();
      for (const auto& [name, proj] : Layer::projections(L)) n += proj->size();
    }
    return n;
  }

  // A Hugging Face checkpoint folder: out_dir/config.json (the text the config was read from) and
  // out_dir/model.safetensors with every weight as it is now, in Scalar's dtype (a LoRA layer's
  // current weight: merge() first to save the merged model). Both files or neither.
  void save_pretrained(const std::string& out_dir) const {
    namespace fs = std::filesystem;
    SafeTensorsBuilder b;
    embed_.save(b, "model.embed_tokens.weight");
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      add_vector(b, pre + "input_layernorm.weight", L.norm1.gamma);
      add_vector(b, pre + "post_attention_layernorm.weight", L.norm2.gamma);
      for (const auto& [name, proj] : Layer::projections(L)) {
        proj->save(b, pre + name);
      }
    }
    add_vector(b, "model.norm.weight", norm_.gamma);
    if (!config_.tie_word_embeddings) head_.save(b, "lm_head");
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
    std::vector<std::string> rows;
    Mat h = hidden(ids, attention_mask, cache, adapters, rows), a, logits;
    rms_norm(h, norm_.gamma, c.rms_norm_eps, a);
    if (c.tie_word_embeddings)
      embed_.head(a, logits);
    else
      head_.forward(a, logits, adapters ? &rows : nullptr);
    return logits;
  }

  // ---- adapter-tuning, prefix-tuning, ladder side-tuning (lm_methods.hpp) -----------------
  // Bottlenecks of config.size after every layer's attention and/or MLP; they train (parameters()).
  void add_bottlenecks(const BottleneckConfig& config, bool after_attention = true, bool after_mlp = true) {
    methods_.add_bottlenecks(int(layers_.size()), config_.hidden_size, config, after_attention, after_mlp);
    discard_training();
  }
  // config.length keys and values per layer, seen by every query; they train.
  void add_prefix(const PrefixConfig& config) {
    methods_.add_prefix(int(layers_.size()), Index(config_.num_key_value_heads) * config_.head_dim, config,
                        config_.max_position_embeddings);
    discard_training();
  }
  // A side network of width hidden_size / reduction beside the layers; it alone trains: refused
  // with LoRA layers, trained base weights or other methods.
  void add_ladder(const LadderConfig& config) {
    if (modules_.size() > 0 || Base::trainable_parameters() > 0)
      detail::fail("add_ladder: the model has LoRA layers or trained base weights; a ladder side network trains alone");
    methods_.add_ladder(int(layers_.size()), config_.hidden_size, config);
    discard_training();
  }
  const LmMethods<Scalar>& methods() const { return methods_; }
  LmMethods<Scalar>& methods() { return methods_; }
  // The trainable tensors: LoRA factors and trained base tensors (lm_trainable.hpp), then the
  // methods' (lm_methods.hpp).
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> p = Base::parameters();
    methods_.parameters(p);
    return p;
  }
  void zero_grad() {
    Base::zero_grad();
    methods_.zero_grad();
  }
  Index trainable_parameters() const { return Base::trainable_parameters() + methods_.parameter_count(); }

  // ---- training ---------------------------------------------------------------------------
  // forward_train: forward without a cache, keeping per layer what backward needs (the layer's
  // input h, a₁ and r₁ of its first norm, q and k after rope, v, P per (sequence, head), o, the
  // input of the MLP half, a₂, r₂, gate and up outputs). backward(dlogits (batch·T, vocab)) goes
  // through the head, the final norm and the layers in reverse:
  //   MLP:   dact = down.backward(dh); dgate = dact ⊙ up ⊙ silu'(gate); dup = dact ⊙ silu(gate)
  //          da₂ = gate.backward(dgate) + up.backward(dup); dh += rms_backward(da₂)
  //          silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
  //   attn:  do = o_proj.backward(dh); dq, dk, dv = causal_attention_backward;
  //          dq, dk ← rope⁻¹ (rotation by −angle); da₁ = q/k/v_proj.backward; dh += rms_backward(da₁)
  // LoRA layers accumulate their gradients (zero_grad()); frozen weights, norms and embeddings get
  // none unless they train (set_trainable): then
  //   dγ of each norm, dW, db of each plain projection, dE[id] += dh of each token, and a tied
  //   head's dE += dlogitsᵀ·a.
  Mat forward_train(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask = {}) {
    const LmConfig& c = config_;
    const Index batch = ids.rows(), T = ids.cols(), p = methods_.prefix_length(), w = Index(c.num_key_value_heads) * c.head_dim;
    check_prefix_fits("LlamaModel::forward_train", p, T);
    check_token_ids("LlamaModel::forward_train", ids, attention_mask, c.vocab_size, c.max_position_embeddings, p);
    Train& tr = train_;
    tr.valid = tr.ladder = false;
    tr.batch = batch;
    tr.T = T;
    tr.ids = ids;
    if (methods_.ladder()) return forward_train_ladder(ids, attention_mask);
    std::vector<std::int64_t> after_prefix;  // each sequence's first position, after the prefix
    if (p) after_prefix.assign(static_cast<std::size_t>(batch), static_cast<std::int64_t>(p));
    rope_tables(token_positions(batch, T, attention_mask, p ? &after_prefix : nullptr), tr.cos, tr.sin);
    const lora::Mat<std::int64_t> key_mask = p ? LmMethods<Scalar>::prefix_mask(p, attention_mask, batch, T) : attention_mask;
    // The linears borrow their inputs (a₁, o, a₂, act), which stay in the layer's cache until
    // backward. h flows through the layers' caches: lc.h in, lc.h_mid between the halves.
    tr.layers.resize(layers_.size());
    Mat& h0 = layers_.empty() ? tr.h : tr.layers[0].h;
    h0.resize(batch * T, c.hidden_size);
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < T; ++t) embed_.lookup(ids(b, t), h0.row(b * T + t));
    Mat& y = tr.y;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      Layer& L = layers_[l];
      LayerCache& lc = tr.layers[l];
      if (l > 0) lc.h.noalias() = tr.layers[l - 1].h_mid + y;  // the previous layer's output
      rms_norm_train(lc.h, L.norm1.gamma, c.rms_norm_eps, lc.a1, lc.r1);
      L.q.forward_train(lc.a1, lc.q, Keep::borrow);
      L.k.forward_train(lc.a1, lc.k, Keep::borrow);
      L.v.forward_train(lc.a1, lc.v, Keep::borrow);
      rope(lc.q, c.num_attention_heads, tr.cos, tr.sin);
      rope(lc.k, c.num_key_value_heads, tr.cos, tr.sin);
      auto* M = methods_.layer(l);
      if (p) {  // lc.k, lc.v become the keys and values with the prefix's in front (p + T per sequence)
        const Mat& KV = M->prefix->forward_train();
        LmMethods<Scalar>::prepend(KV.leftCols(w), lc.k, batch, T, tr.work);
        lc.k.swap(tr.work);
        LmMethods<Scalar>::prepend(KV.rightCols(w), lc.v, batch, T, tr.work);
        lc.v.swap(tr.work);
      }
      lc.p.resize(std::size_t(batch) * c.num_attention_heads);
      causal_attention(lc.q, lc.k, lc.v, batch, T, p, p + T, c.num_attention_heads, c.num_key_value_heads, c.head_dim, key_mask,
                       lc.o, &lc.p);
      L.o.forward_train(lc.o, y, Keep::borrow);
      if (M && M->after_attention) y = M->after_attention->forward_train(y);
      lc.h_mid.noalias() = lc.h + y;
      rms_norm_train(lc.h_mid, L.norm2.gamma, c.rms_norm_eps, lc.a2, lc.r2);
      L.gate.forward_train(lc.a2, lc.gate, Keep::borrow);
      L.up.forward_train(lc.a2, lc.up, Keep::borrow);
      lc.act = silu_times(lc.gate, lc.up);
      L.down.forward_train(lc.act, y, Keep::borrow);
      if (M && M->after_mlp) y = M->after_mlp->forward_train(y);
    }
    if (!layers_.empty()) tr.h.noalias() = tr.layers.back().h_mid + y;
    return train_head();
  }

  void backward(const MatRef& dlogits) {
    const LmConfig& c = config_;
    Train& tr = train_;
    if (!tr.valid) detail::fail("LlamaModel::backward: no forward_train to go back through (or it was used already)");
    if (dlogits.rows() != tr.batch * tr.T || dlogits.cols() != c.vocab_size)
      detail::fail("LlamaModel::backward: dlogits is ", detail::shape(dlogits.rows(), dlogits.cols()), ", expected ",
                   detail::shape(tr.batch * tr.T, c.vocab_size));
    if (!modules_.ready_for_backward())
      detail::fail("LlamaModel::backward: a LoRA layer changed after forward_train (merge, set_adapter, set_lora_A, ...); "
                   "run forward_train again");
    tr.valid = false;
    Grads& g = tr.grads;
    Mat &da = g.da, &dh = g.dh, &dx = g.dx, &dq = g.dq, &dk = g.dk, &dv = g.dv;
    dh.setZero(tr.h.rows(), tr.h.cols());
    if (c.tie_word_embeddings) {
      embed_.head_backward(dlogits, da);
      if (embed_.trainable) embed_.grad_w.noalias() += dlogits.transpose() * tr.a;
    } else {
      head_.backward(dlogits, da);
    }
    rms_norm_backward(tr.h, norm_, tr.r, da, dh);
    if (tr.ladder) return methods_.ladder()->backward(dh);  // the side network alone: nothing through the layers
    const Index p = methods_.prefix_length(), w = Index(c.num_key_value_heads) * c.head_dim;
    for (std::size_t l = layers_.size(); l-- > 0;) {
      Layer& L = layers_[l];
      const LayerCache& lc = tr.layers[l];
      auto* M = methods_.layer(l);
      // MLP half: h_out = h_mid + B_mlp(down(silu(gate) ⊙ up)); σ = sigmoid(gate), one exp per element
      if (M && M->after_mlp) g.dbn = M->after_mlp->backward(dh);
      L.down.backward(M && M->after_mlp ? MatRef(g.dbn) : MatRef(dh), g.dact);
      g.sig = (Scalar(1) + (-lc.gate.array()).exp()).inverse();
      g.dup = g.dact.array() * lc.gate.array() * g.sig.array();
      g.dgate = g.dact.array() * lc.up.array() * g.sig.array() * (Scalar(1) + lc.gate.array() * (Scalar(1) - g.sig.array()));
      L.gate.backward(g.dgate, da);
      L.up.backward(g.dup, da, InputGrad::add);
      rms_norm_backward(lc.h_mid, L.norm2, lc.r2, da, dh);
      // Attention half: h_mid = h + B_attn(o_proj(attention(rope(q), [Pk; rope(k)], [Pv; v])))
      if (M && M->after_attention) g.dbn = M->after_attention->backward(dh);
      L.o.backward(M && M->after_attention ? MatRef(g.dbn) : MatRef(dh), dx);
      causal_attention_backward(lc.q, lc.k, lc.v, lc.p, dx, tr.batch, tr.T, p, c.num_attention_heads, c.num_key_value_heads,
                                c.head_dim, dq, dk, dv);
      if (p) {  // the prefix's rows of dK, dV summed over the sequences; the rest go on to rope and k/v_proj
        g.dkv.resize(p, 2 * w);
        LmMethods<Scalar>::split(dk, tr.batch, tr.T, g.dkv.leftCols(w), g.work);
        dk.swap(g.work);
        LmMethods<Scalar>::split(dv, tr.batch, tr.T, g.dkv.rightCols(w), g.work);
        dv.swap(g.work);
        M->prefix->backward(g.dkv);
      }
      rope(dq, c.num_attention_heads, tr.cos, tr.sin, Scalar(-1));
      rope(dk, c.num_key_value_heads, tr.cos, tr.sin, Scalar(-1));
      // Below the first layer only frozen embeddings: unless they or its norm train, no dX.
      const bool below = l > 0 || embed_.trainable || L.norm1.trainable;
      L.q.backward(dq, da, below ? InputGrad::set : InputGrad::none);
      L.k.backward(dk, da, below ? InputGrad::add : InputGrad::none);
      L.v.backward(dv, da, below ? InputGrad::add : InputGrad::none);
      if (below) rms_norm_backward(lc.h, L.norm1, lc.r1, da, dh);
    }
    if (embed_.trainable)
      for (Index i = 0; i < tr.ids.size(); ++i) embed_.grad_w.row(tr.ids(i / tr.T, i % tr.T)) += dh.row(i);
  }

  // An empty cache for batch sequences of up to capacity tokens each.
  // With a prefix the cache starts holding it (capacity + p rows per sequence, length p, positions
  // from p); with a ladder it keeps the side network's taps as well.
  KvCache<Scalar> make_cache(Index batch, Index capacity) const {
    const Index p = methods_.prefix_length(), w = Index(config_.num_key_value_heads) * config_.head_dim;
    KvCache<Scalar> cache(batch, capacity + p, int(layers_.size()), w);
    if (p) {
      cache.prefix = cache.length = p;
      cache.mask.leftCols(p).setOnes();
      cache.real.assign(std::size_t(batch), std::int64_t(p));
      Mat work;
      for (std::size_t l = 0; l < layers_.size(); ++l) {
        const Mat& KV = methods_.layer(l)->prefix->values(work);
        for (Index b = 0; b < batch; ++b) {
          cache.k[l].middleRows(b * cache.capacity, p) = KV.leftCols(w);
          cache.v[l].middleRows(b * cache.capacity, p) = KV.rightCols(w);
        }
      }
    }
    if (methods_.ladder()) cache.taps.assign(layers_.size() + 1, Mat::Zero(batch * cache.capacity, config_.hidden_size));
    return cache;
  }

 private:
  struct Layer {
    NormWeights<Scalar> norm1, norm2;
    Projection<Scalar> q, k, v, o, gate, up, down;

    // The projections with their paths in the layer (const or not as L is).
    template <class L>
    static auto projections(L& l) {
      return std::array{std::pair{"self_attn.q_proj", &l.q}, std::pair{"self_attn.k_proj", &l.k}, std::pair{"self_attn.v_proj", &l.v},
                        std::pair{"self_attn.o_proj", &l.o}, std::pair{"mlp.gate_proj", &l.gate}, std::pair{"mlp.up_proj", &l.up},
                        std::pair{"mlp.down_proj", &l.down}};
    }
  };

  friend class TrainableModules<LlamaModel<Scalar>, Scalar>;
  void discard_training() { train_.valid = false; }

  // f(path, module) for every base module: embedding, norms, projections, head (the embedding
  // again, under "lm_head", when tied). Self is LlamaModel or const LlamaModel.
  template <class Self, class F>
  static void each_base_module(Self& self, F f) {
    f(std::string("model.embed_tokens"), self.embed_);
    for (std::size_t l = 0; l < self.layers_.size(); ++l) {
      auto& L = self.layers_[l];
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      f(pre + "input_layernorm", L.norm1);
      f(pre + "post_attention_layernorm", L.norm2);
      for (auto [name, proj] : Layer::projections(L)) f(pre + name, *proj);
    }
    f(std::string("model.norm"), self.norm_);
    if (self.config_.tie_word_embeddings)
      f(std::string("lm_head"), self.embed_);
    else
      f(std::string("lm_head"), self.head_);
  }

  // Reads every tensor from source (a Checkpoint or RandomWeights).
  template <class Source>
  void build(Source& src, const PeftConfig* lora, const LoraConfig& base, FrozenWeights frozen = FrozenWeights::widened) {
    const LmConfig& c = config_;
    const bool bf16 = frozen == FrozenWeights::bf16;
    auto projection = [&](const std::string& path, Index out, Index in, bool bias) {
      auto p = load_projection<Scalar>(src, path, out, in, bias, false, lora, base, modules_);
      if (bf16) p.keep_bf16();
      return p;
    };
    embed_.w = src.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
    if (bf16) embed_.keep_bf16();
    const Index d = c.hidden_size, q_out = Index(c.num_attention_heads) * c.head_dim, kv_out = Index(c.num_key_value_heads) * c.head_dim;
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      Layer L;
      L.norm1.gamma = src.vector(p + "input_layernorm.weight", d);
      L.norm2.gamma = src.vector(p + "post_attention_layernorm.weight", d);
      L.q = projection(p + "self_attn.q_proj", q_out, d, c.attention_bias);
      L.k = projection(p + "self_attn.k_proj", kv_out, d, c.attention_bias);
      L.v = projection(p + "self_attn.v_proj", kv_out, d, c.attention_bias);
      L.o = projection(p + "self_attn.o_proj", d, q_out, c.attention_bias);
      L.gate = projection(p + "mlp.gate_proj", c.intermediate_size, d, c.mlp_bias);
      L.up = projection(p + "mlp.up_proj", c.intermediate_size, d, c.mlp_bias);
      L.down = projection(p + "mlp.down_proj", d, c.intermediate_size, c.mlp_bias);
      layers_.push_back(std::move(L));
    }
    norm_.gamma = src.vector("model.norm.weight", d);
    if (c.tie_word_embeddings) {
      if (lora && lora->targets("lm_head"))
        detail::fail("LlamaModel: lm_head is tied to embed_tokens (tie_word_embeddings); it cannot take LoRA here");
    } else {
      head_ = projection("lm_head", c.vocab_size, d, false);
    }
    inv_freq_ = c.rope_inv_freq(!std::is_same_v<Scalar, double>);
  }
  // Training a ladder side network: the layers run their evaluation forward (nothing kept), the
  // side network and the final norm keep what backward needs.
  Mat forward_train_ladder(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask) {
    Train& tr = train_;
    if (modules_.size() > 0 || Base::trainable_parameters() > 0)
      detail::fail("LlamaModel::forward_train: with a ladder side network only the side trains; the model has LoRA layers or trained base weights");
    std::vector<std::string> rows;
    std::vector<Mat> taps;
    hidden(ids, attention_mask, nullptr, nullptr, rows, &taps);
    tr.h = methods_.ladder()->forward_train(std::move(taps), ids.rows(), side_mask(attention_mask));
    tr.ladder = true;
    return train_head();
  }

  // The final norm and the head on tr.h, keeping what backward needs.
  Mat train_head() {
    Train& tr = train_;
    rms_norm_train(tr.h, norm_.gamma, config_.rms_norm_eps, tr.a, tr.r);
    Mat logits;
    if (config_.tie_word_embeddings)
      embed_.head(tr.a, logits);
    else
      head_.forward_train(tr.a, logits, Keep::borrow);
    tr.valid = true;
    return logits;
  }

  // A prefix takes positions: with past keys (the prefix's among them) and T new tokens.
  void check_prefix_fits(const char* fn, Index past, Index T) const {
    const Index p = methods_.prefix_length();
    if (p && past + T > config_.max_position_embeddings)
      detail::fail(fn, ": a prefix of ", p, " positions and ", past - p + T, " tokens exceed max_position_embeddings ",
                   config_.max_position_embeddings);
  }

  // The side network's attention: causal, the padding's keys hidden (mask (batch, S), 1 = token).
  static AttentionMask<Scalar> side_mask(const lora::Mat<std::int64_t>& mask) {
    AttentionMask<Scalar> m;
    m.causal = true;
    if (mask.size()) m.key_padding = (mask.array() == 0).template cast<std::uint8_t>();
    return m;
  }

  // forward up to the final norm: h (batch·T, d) after the layers (and a ladder's side network).
  // row_names: the adapter of each row when adapters is given. taps (training a ladder): the
  // side network's inputs, returned instead of run.
  Mat hidden(const lora::Mat<std::int64_t>& ids, const lora::Mat<std::int64_t>& attention_mask, KvCache<Scalar>* cache,
             const std::vector<std::string>* adapters, std::vector<std::string>& row_names, std::vector<Mat>* taps = nullptr) const {
    const LmConfig& c = config_;
    const char* fn = "LlamaModel::forward";
    const Index batch = ids.rows(), T = ids.cols(), p = methods_.prefix_length(), w = Index(c.num_key_value_heads) * c.head_dim;
    const LadderSide<Scalar>* ladder = methods_.ladder();
    if (cache && (cache->prefix != p || cache->taps.size() != (ladder ? layers_.size() + 1 : 0)))
      detail::fail(fn, ": the cache was made for another set of methods (a prefix of ", cache->prefix, " positions, ",
                   cache->taps.size(), " ladder taps; the model has ", p, " and ", ladder ? layers_.size() + 1 : 0, "): make_cache again");
    const Index past = cache ? cache->length : p;  // keys before the new tokens': cached ones (the prefix among them) or the prefix
    check_prefix_fits(fn, past, T);
    check_token_ids(fn, ids, attention_mask, c.vocab_size, c.max_position_embeddings, past);
    row_names = adapter_rows(fn, adapters, ids.rows(), ids.cols(), modules_);
    const std::vector<std::string>* rows = adapters ? &row_names : nullptr;
    const lora::Mat<std::int64_t> key_mask =
        cache || !p ? begin_cached_forward(fn, cache, ids, attention_mask, int(layers_.size()))
                    : LmMethods<Scalar>::prefix_mask(p, attention_mask, batch, T);
    std::vector<std::int64_t> after_prefix;  // each sequence's first position, after the prefix
    if (p) after_prefix.assign(static_cast<std::size_t>(batch), static_cast<std::int64_t>(p));
    const lora::Mat<std::int64_t> pos = token_positions(batch, T, attention_mask, cache ? &cache->real : p ? &after_prefix : nullptr);
    Mat h(batch * T, c.hidden_size), a, q, k, v, o, g, u, y, cos, sin, K, V, work;
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < T; ++t) embed_.lookup(ids(b, t), h.row(b * T + t));
    std::vector<Mat> own_taps;
    std::vector<Mat>& tapped = taps ? *taps : own_taps;
    tapped.clear();
    if (ladder) tapped.push_back(h);
    rope_tables(pos, cos, sin);
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      const auto* M = methods_.layer(l);
      rms_norm(h, L.norm1.gamma, c.rms_norm_eps, a);
      L.q.forward(a, q, rows);
      L.k.forward(a, k, rows);
      L.v.forward(a, v, rows);
      rope(q, c.num_attention_heads, cos, sin);
      rope(k, c.num_key_value_heads, cos, sin);
      AttentionInputs<Scalar> kv = keys_and_values(k, v, batch, T, cache, int(l));
      if (!cache && p) {  // the prefix's keys and values in front of each sequence's
        const Mat& KV = M->prefix->values(work);
        LmMethods<Scalar>::prepend(KV.leftCols(w), k, batch, T, K);
        LmMethods<Scalar>::prepend(KV.rightCols(w), v, batch, T, V);
        kv = {&K, &V, p + T};
      }
      causal_attention(q, *kv.K, *kv.V, batch, T, past, kv.stride, c.num_attention_heads, c.num_key_value_heads, c.head_dim, key_mask, o);
      L.o.forward(o, y, rows);
      if (M && M->after_attention) y = M->after_attention->forward(y);
      h += y;
      rms_norm(h, L.norm2.gamma, c.rms_norm_eps, a);
      L.gate.forward(a, g, rows);
      L.up.forward(a, u, rows);
      g = silu_times(g, u);
      L.down.forward(g, y, rows);
      if (M && M->after_mlp) y = M->after_mlp->forward(y);
      h += y;
      if (ladder) tapped.push_back(h);
    }
    if (ladder && !taps) h = side_network(tapped, attention_mask, cache, batch, T);
    end_cached_forward(cache, ids, attention_mask);
    return h;
  }

  // The ladder's output for the new tokens (batch·T, d) from their taps. With a cache the taps
  // join the cached ones and the side network runs over every token so far (it keeps no cache).
  Mat side_network(const std::vector<Mat>& taps, const lora::Mat<std::int64_t>& attention_mask, KvCache<Scalar>* cache,
                   Index batch, Index T) const {
    if (!cache) return methods_.ladder()->forward(taps, batch, side_mask(attention_mask));
    const Index past = cache->length, S = past + T, cap = cache->capacity;
    std::vector<Mat> all(taps.size());
    for (std::size_t i = 0; i < taps.size(); ++i) {
      all[i].resize(batch * S, taps[i].cols());
      for (Index b = 0; b < batch; ++b) {
        cache->taps[i].middleRows(b * cap + past, T) = taps[i].middleRows(b * T, T);
        all[i].middleRows(b * S, S) = cache->taps[i].middleRows(b * cap, S);
      }
    }
    const Mat y = methods_.ladder()->forward(all, batch, side_mask(cache->mask.leftCols(S)));
    Mat out(batch * T, y.cols());
    for (Index b = 0; b < batch; ++b) out.middleRows(b * T, T) = y.middleRows(b * S + past, T);
    return out;
  }

  struct LayerCache {
    Mat h, a1, q, k, v, o, h_mid, a2, gate, up, act;
    Vec r1, r2;
    std::vector<Mat> p;  // (T, T) per (sequence, head)
  };
  // silu(g) ⊙ u, elementwise, as an expression (no temporary): g·σ(g)·u.
  static auto silu_times(const Mat& g, const Mat& u) { return g.array() / (Scalar(1) + (-g.array()).exp()) * u.array(); }

  struct Grads {  // backward's buffers, kept between steps
    Mat da, dh, dx, dq, dk, dv, dgate, dup, dact, sig, dbn, dkv, work;
  };
  struct Train {
    bool valid = false, ladder = false;  // ladder: the last forward_train ran the side network (forward_train_ladder)
    Index batch = 0, T = 0;
    lora::Mat<std::int64_t> ids;
    Mat cos, sin, h, a, y, work;
    Vec r;
    std::vector<LayerCache> layers;
    Grads grads;
  };

  // cos, sin (batch·T, dh/2) of each token's position and frequency i. A float model computes
  // them as transformers does, in float32 (angle = position · inv_freq in float); a double model in
  // double (transformers keeps float32 tables even in a float64 model: ~1e-7 apart).
  void rope_tables(const lora::Mat<std::int64_t>& pos, Mat& cos, Mat& sin) const {
    const Index half = inv_freq_.size(), T = pos.cols();
    cos.resize(pos.size(), half);
    sin.resize(pos.size(), half);
    for (Index r = 0; r < pos.size(); ++r)
      for (Index i = 0; i < half; ++i) {
        if constexpr (std::is_same_v<Scalar, double>) {
          const double angle = double(pos(r / T, r % T)) * inv_freq_[i];
          cos(r, i) = std::cos(angle);
          sin(r, i) = std::sin(angle);
        } else {
          const float angle = float(pos(r / T, r % T)) * float(inv_freq_[i]);
          cos(r, i) = Scalar(std::cos(angle));
          sin(r, i) = Scalar(std::sin(angle));
        }
      }
  }

  // x (batch·T, heads·dh): per head, (x₁, x₂) ← (x₁·cos − x₂·sin, x₂·cos + x₁·sin); with
  // sign −1 the inverse rotation, which is also the rotation's backward.
  void rope(Mat& x, int heads, const Mat& cos, const Mat& sin, Scalar sign = Scalar(1)) const {
    const Index dh = config_.head_dim, half = dh / 2;
    for (Index r = 0; r < x.rows(); ++r)
      for (int h = 0; h < heads; ++h) {
        Scalar* p = x.row(r).data() + h * dh;
        for (Index i = 0; i < half; ++i) {
          const Scalar x1 = p[i], x2 = p[i + half];
          const Scalar sn = sign * sin(r, i);
          p[i] = x1 * cos(r, i) - x2 * sn;
          p[i + half] = x2 * cos(r, i) + x1 * sn;
        }
      }
  }

  LmConfig config_;
  EmbeddingWeights<Scalar> embed_;
  std::vector<Layer> layers_;
  NormWeights<Scalar> norm_;
  Projection<Scalar> head_;  // unused when tied: the head is embed_
  lora::Vec<double> inv_freq_;  // rope_inv_freq: float values in a float model
  ModuleMap<Scalar> modules_;
  LmMethods<Scalar> methods_;
  Train train_;
};

}  // namespace lora
