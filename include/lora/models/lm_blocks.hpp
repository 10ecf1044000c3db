// What the causal language models (llama.hpp, gpt2.hpp) are built from:
//
//   Checkpoint   model.safetensors or its shards (model.safetensors.index.json), each tensor
//                checked against the shape config.json implies; RandomWeights: a new model's
//   Projection   a linear layer: frozen W (and b), or a LoraLinear when a PeftConfig targets its
//                module path (registered in the model's ModuleMap under that path); W and b
//                train when asked (full fine-tuning, modules_to_save)
//                  y = x·Wᵀ + b, or y = x·W + b for GPT-2's Conv1D (W stored (in, out))
//   causal_attention   per sequence b and head h (kv head h / (heads / kv_heads)):
//                  P = softmax(Q_bh·K_bkvᵀ/√dh, later keys and padded keys hidden), O_bh = P·V_bkv
//                  q (batch·T, heads·dh), k, v (batch·S, kv_heads·dh) -> o (batch·T, heads·dh)
//                  A query whose keys are all hidden gets a zero output.
//   KvCache      the keys and values of tokens seen, for incremental decoding (S = past + T)
//   token_positions   positions that skip pads, as transformers' generate counts them
//   save_checkpoint   a Hugging Face folder with the LoRA layers' current (merged) weights
//   rms_norm     y = x / sqrt(mean(x²) + eps) ⊙ γ per row (Llama)
//   layer_norm   y = (x − μ) / sqrt(var + eps) ⊙ γ + β per row, biased variance (GPT-2)
#pragma once

#include <lora/detail/files.hpp>
#include <lora/detail/json.hpp>
#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/lora_model.hpp>
#include <lora/models/bf16_weights.hpp>
#include <lora/models/lm_trainable.hpp>
#include <lora/module_map.hpp>
#include <lora/parameter.hpp>
#include <lora/peft_config.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace lora {

// A checkpoint folder's tensors: dir/model.safetensors, or the shards that
// dir/model.safetensors.index.json's weight_map names (each tensor in the shard the map gives, every
// tensor of a shard in the map). Each tensor is checked against the shape config.json implies.
template <class Scalar>
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir) : dir_(dir) {
    namespace fs = std::filesystem;
    const fs::path single = fs::path(dir) / "model.safetensors", index = fs::path(dir) / "model.safetensors.index.json";
    if (fs::exists(single) || !fs::exists(index)) {
      shards_.push_back(SafeTensors::open(single.string()));
      files_.push_back("model.safetensors");
      return;
    }
    const std::string label = index.string();
    index_text_ = detail::read_text(label);
    nlohmann::json j;
    try {
      j = detail::parse_json<nlohmann::json>(index_text_.data(), index_text_.data() + index_text_.size());
    } catch (const nlohmann::json::exception& e) {
      detail::fail(label, ": not valid JSON: ", e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      detail::fail(label, ": expected an object with a weight_map object");
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) detail::fail(label, ": weight_map[\"", name, "\"] is ", file.dump(), ", expected a file name");
      const std::string f = file.template get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == "." || f == "..")
        detail::fail(label, ": weight_map[\"", name, "\"] is \"", f, "\", not a file name in the folder");
      std::size_t k = 0;
      while (k < files_.size() && files_[k] != f) ++k;
      if (k == files_.size()) {
        files_.push_back(f);
        shards_.push_back(SafeTensors::open((fs::path(dir) / f).string()));
      }
      if (!shards_[k].contains(name)) detail::fail(label, ": weight_map puts '", name, "' in ", f, ", which does not hold it");
      where_[name] = k;
    }
    if (shards_.empty()) detail::fail(label, ": weight_map is empty");
    for (std::size_t k = 0; k < shards_.size(); ++k)
      for (const auto& t : shards_[k].tensors()) {
        const auto w = where_.find(t.name);
        if (w == where_.end() || w->second != k)
          detail::fail(label, ": ", files_[k], " holds '", t.name, "', which weight_map ",
                       w == where_.end() ? std::string("does not list") : "puts in " + files_[w->second]);
      }
  }

  Mat<Scalar> matrix(const std::string& name, Index rows, Index cols) const {
    return find(name, {std::uint64_t(rows), std::uint64_t(cols)}).template matrix<Scalar>(name);
  }
  Vec<Scalar> vector(const std::string& name, Index n) const { return find(name, {std::uint64_t(n)}).template vector<Scalar>(name); }

  // The files (one, or the shards in weight_map's order), and the index's text ("" for one file).
  const std::vector<SafeTensors>& shards() const { return shards_; }
  const std::vector<std::string>& files() const { return files_; }
  const std::string& index_text() const { return index_text_; }

 private:
  const SafeTensors& find(const std::string& name, const std::vector<std::uint64_t>& shape) const {
    const SafeTensors* st = &shards_[0];
    if (!index_text_.empty()) {
      const auto w = where_.find(name);
      if (w == where_.end()) detail::fail(dir_, ": tensor '", name, "' is missing (model.safetensors.index.json does not list it)");
      st = &shards_[w->second];
    }
    if (!st->contains(name)) detail::fail(st->source(), ": tensor '", name, "' is missing");
    const TensorInfo& t = st->info(name);
    if (t.shape != shape)
      detail::fail(st->source(), ": tensor '", name, "' is ", shape_string(t.shape), ", config.json implies ", shape_string(shape));
    if (!detail::is_float_dtype(t.dtype)) detail::fail(st->source(), ": tensor '", name, "' has dtype ", dtype_name(t.dtype));
    return *st;
  }

  std::string dir_, index_text_;
  std::vector<SafeTensors> shards_;
  std::vector<std::string> files_;
  std::map<std::string, std::size_t> where_;
};

// A linear layer: frozen W (and b), or a LoraLinear when a PeftConfig targets its module path.
// Trained base (set_trainable, for full fine-tuning and PEFT's modules_to_save): W and b get
// gradients too, dW += dyᵀ·x (xᵀ·dy stored (in, out)), db += Σ_rows dy.
template <class Scalar>
struct Projection {
  std::unique_ptr<LoraLinear<Scalar>> lora;
  Mat<Scalar> w;  // (out, in), or (in, out) with fan_in_fan_out; empty when lora is set or w16 holds W
  Bf16Mat w16;    // W kept in bf16 (keep_bf16): products in Scalar (bf16_weights.hpp)
  Vec<Scalar> b;
  bool fan_in_fan_out = false;
  bool trainable = false;  // a plain layer's W and b train
  Mat<Scalar> grad_w, x;   // x: forward_train's input, kept while trainable
  Mat<Scalar> scratch;     // backward's dy·W when added to dx
  Vec<Scalar> grad_b;

  // rows: an adapter name per row (a mixed batch, LoraLinear::forward(x, names)); null = the
  // active adapters for every row. As in PEFT, a row whose adapter this layer lacks gets the base.
  void forward(const MatRef<Scalar>& in, Mat<Scalar>& y, const std::vector<std::string>* rows = nullptr) const {
    if (lora && rows) {
      if (std::all_of(rows->begin(), rows->end(), [&](const std::string& n) { return n == LoraLinear<Scalar>::kBase || lora->has_adapter(n); }))
        return lora->forward(in, *rows, y);
      std::vector<std::string> here = *rows;
      for (auto& n : here)
        if (!lora->has_adapter(n)) n = LoraLinear<Scalar>::kBase;
      return lora->forward(in, here, y);
    }
    if (lora) return lora->forward(in, y);
    if (fan_in_fan_out)
      times(in, w, w16, y);
    else
      times_transposed(in, w, w16, y);
    if (b.size()) y.rowwise() += b.transpose();
  }
  // Training: a LoraLinear keeps what its backward needs; a frozen W needs nothing.
  // Keep::borrow (LoraLinear's): `in` stays alive and unchanged until backward; a trained plain
  // layer copies it either way.
  void forward_train(const Mat<Scalar>& in, Mat<Scalar>& y, Keep keep = Keep::copy) {
    if (lora) return lora->forward_train(in, y, keep);
    if (trainable) x = in;
    forward(in, y);
  }
  void forward_train(Mat<Scalar>&&, Mat<Scalar>&, Keep = Keep::copy) = delete;
  // dx = dy·W (dy·Wᵀ when stored (in, out)), or dx += dy·W, or none (InputGrad); a LoraLinear
  // also accumulates its gradients.
  void backward(const MatRef<Scalar>& dy, Mat<Scalar>& dx, InputGrad mode = InputGrad::set) {
    if (lora) return lora->backward(dy, dx, mode);
    const Index in = fan_in_fan_out ? w.rows() + w16.rows() : w.cols() + w16.cols();  // w or w16 is empty
    if (mode == InputGrad::add && (dx.rows() != dy.rows() || dx.cols() != in))
      detail::fail("Projection::backward: dX to add to is ", detail::shape(dx.rows(), dx.cols()), ", expected ",
                   detail::shape(dy.rows(), in));
    if (trainable) {
      if (fan_in_fan_out)
        grad_w.noalias() += x.transpose() * dy;
      else
        grad_w.noalias() += dy.transpose() * x;
      if (b.size()) grad_b += dy.colwise().sum().transpose();
    }
    if (mode == InputGrad::none) return;
    Mat<Scalar>& out = mode == InputGrad::set ? dx : scratch;
    if (fan_in_fan_out)
      times_transposed(dy, w, w16, out);
    else
      times(dy, w, w16, out);
    if (mode == InputGrad::add) dx += scratch;
  }

  // A plain frozen W moves to bf16 (a LoRA layer's or a trained one's stays in Scalar).
  void keep_bf16() {
    if (!lora && !trainable && w.size()) to_bf16(w, w16);
  }
  // Training a W kept in bf16 widens it first.
  void set_trainable(bool on) {
    if (lora) return lora->set_base_trainable(on);
    if (on) widen_back(w16, w);
    trainable = on;
    grad_w = on ? Mat<Scalar>::Zero(w.rows(), w.cols()) : Mat<Scalar>();
    grad_b = on ? Vec<Scalar>::Zero(b.size()) : Vec<Scalar>();
    x.resize(0, 0);
  }
  // A plain trained layer's tensors (a LoraLinear's are in the model's ModuleMap).
  void parameters(const std::string& path, std::vector<Parameter<Scalar>>& out) {
    if (lora || !trainable) return;
    out.push_back(make_parameter(path + ".weight", w, grad_w));
    if (b.size()) out.push_back(make_parameter(path + ".bias", b, grad_b));
  }
  void zero_grad() {
    grad_w.setZero();
    grad_b.setZero();
  }
  Index size() const { return lora ? lora->base_parameters() : w.size() + w16.size() + b.size(); }
  Index trained() const { return !lora && trainable ? w.size() + b.size() : 0; }  // a LoraLinear's: in its ModuleMap
  // Adds path.weight (a LoRA layer's current weight; bf16 as it is held) and path.bias to a file.
  void save(SafeTensorsBuilder& out, const std::string& path) const {
    if (lora)
      out.add(path + ".weight", lora->weight());
    else if (w16.size())
      out.add(path + ".weight", w16);
    else
      out.add(path + ".weight", w);
    const Vec<Scalar>& bias = lora ? lora->bias() : b;
    if (bias.size()) out.add(path + ".bias", bias, {std::uint64_t(bias.size())});
  }
};

// A new model's weights, as transformers initialises them: matrices normal(0, std), norm gains
// one, biases zero; reproducible from the seed.
template <class Scalar>
struct RandomWeights {
  std::mt19937_64 gen;
  double std = 0.02;

  Mat<Scalar> matrix(const std::string&, Index rows, Index cols) {
    std::normal_distribution<double> normal(0.0, std);
    Mat<Scalar> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = Scalar(normal(gen));
    return m;
  }
  Vec<Scalar> vector(const std::string& name, Index n) {
    const bool bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    return bias ? Vec<Scalar>::Zero(n) : Vec<Scalar>::Ones(n);
  }
};

// The linear layer at module path `path` (tensors path.weight, path.bias): out × in, stored
// (in, out) when fan_in_fan_out. A LoraLinear when lora targets path (r, alpha, ... for path from
// lora; the rest from base), added to modules.
template <class Scalar, class Source>
Projection<Scalar> load_projection(Source& ckpt, const std::string& path, Index out, Index in, bool bias,
                                   bool fan_in_fan_out, const PeftConfig* lora, LoraConfig base, ModuleMap<Scalar>& modules) {
  Projection<Scalar> p;
  p.fan_in_fan_out = fan_in_fan_out;
  p.w = fan_in_fan_out ? ckpt.matrix(path + ".weight", in, out) : ckpt.matrix(path + ".weight", out, in);
  if (bias) p.b = ckpt.vector(path + ".bias", out);
  if (lora && lora->targets(path)) {
    base.fan_in_fan_out = fan_in_fan_out;
    std::optional<Vec<Scalar>> b;
    if (bias) b = std::move(p.b);
    p.lora = std::make_unique<LoraLinear<Scalar>>(std::move(p.w), std::move(b), lora->lora_config(path, base));
    p.w.resize(0, 0);
    p.b.resize(0);
    modules.add(path, *p.lora);
  }
  return p;
}

// Keys and values of the tokens a model has seen, per layer, for incremental decoding: a forward
// with a cache computes only its new tokens and attends to the cached ones too. Made by the
// model (make_cache); rows b·capacity + t hold token t of sequence b.
template <class Scalar>
struct KvCache {
  Index batch = 0, capacity = 0, length = 0;  // length: tokens per sequence so far (pads included)
  std::vector<Mat<Scalar>> k, v;              // per layer (batch·capacity, kv_heads·dh)
  Mat<std::int64_t> mask;                     // (batch, capacity): 1 = a real token
  std::vector<std::int64_t> real;             // real tokens per sequence so far
  Index prefix = 0;                           // prefix-tuning's keys and values in front (lm_methods.hpp)
  std::vector<Mat<Scalar>> taps;              // a ladder side network's inputs per tap (batch·capacity, d)

  KvCache(Index batch_, Index capacity_, int layers, Index width) : batch(batch_), capacity(capacity_) {
    if (batch < 1 || capacity < 1) detail::fail("KvCache: batch ", batch, " and capacity ", capacity, " must be >= 1");
    k.assign(layers, Mat<Scalar>::Zero(batch * capacity, width));
    v.assign(layers, Mat<Scalar>::Zero(batch * capacity, width));
    mask = Mat<std::int64_t>::Zero(batch, capacity);
    real.assign(batch, 0);
  }
};

// The positions of new tokens, as transformers' generate counts them: token t of sequence b is
// at the number of real tokens before it (cached ones included), so left padding does not shift
// a prompt; a pad takes the next real token's position (its output is never used). Without
// padding this is past, past + 1, ...
inline Mat<std::int64_t> token_positions(Index batch, Index T, const Mat<std::int64_t>& mask, const std::vector<std::int64_t>* seen) {
  Mat<std::int64_t> pos(batch, T);
  for (Index b = 0; b < batch; ++b) {
    std::int64_t n = seen ? (*seen)[b] : 0;
    for (Index t = 0; t < T; ++t) {
      pos(b, t) = n;
      if (!mask.size() || mask(b, t) != 0) ++n;
    }
  }
  return pos;
}

// The (sequence, head) pairs are independent: they run in parallel (OpenMP, lora's thread count)
// when there is enough work, each writing its own blocks, so results do not depend on the thread
// count; the products inside run on one thread each.
inline bool parallel_attention(int tasks, Index T, Index S, Index dh) { return tasks > 1 && Index(tasks) * T * S * dh >= (Index(1) << 18); }

// q (batch·T, heads·dh) of the new tokens; K, V hold every sequence's keys and values at rows
// b·stride + j, j < past + T (the new tokens' at past .. past + T − 1). Query i of sequence b
// sees key j when j <= past + i and key_mask (batch, >= past + T; empty = all real) is nonzero.
template <class Scalar>
void causal_attention(const Mat<Scalar>& q, const Mat<Scalar>& K, const Mat<Scalar>& V, Index batch, Index T, Index past,
                      Index stride, int heads, int kv_heads, Index dh, const Mat<std::int64_t>& key_mask, Mat<Scalar>& o,
                      std::vector<Mat<Scalar>>* probs = nullptr) {
  const int group = heads / kv_heads;
  const Index S = past + T;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  const Scalar hidden = -std::numeric_limits<Scalar>::infinity();
  o.resize(q.rows(), q.cols());
  const int tasks = int(batch) * heads;
  detail::parallel_for(tasks, parallel_attention(tasks, T, S, dh), [&](int task) {
    const Index b = task / heads;
    const int h = task % heads;
    const Index kv = h / group;
    thread_local Mat<Scalar> work;
    Mat<Scalar>& s = probs ? (*probs)[std::size_t(task)] : work;
    s.resize(T, S);
    s.noalias() = q.block(b * T, h * dh, T, dh) * K.block(b * stride, kv * dh, S, dh).transpose() * scale;
    const bool padded = key_mask.size() && (key_mask.row(b).array() == 0).any();
    for (Index i = 0; i < T; ++i) {
      const Index seen = past + i + 1;  // query i sees keys 0 .. past + i; later ones get p = 0
      auto p = s.row(i).head(seen);
      s.row(i).tail(S - seen).setZero();
      if (padded)
        for (Index j = 0; j < seen; ++j)
          if (key_mask(b, j) == 0) p(j) = hidden;
      const Scalar mx = p.maxCoeff();
      if (mx == hidden) {
        p.setZero();
        continue;
      }
      p = (p.array() - mx).exp().matrix();
      p /= p.sum();
    }
    o.block(b * T, h * dh, T, dh).noalias() = s * V.block(b * stride, kv * dh, S, dh);
  });
}

// Backward of causal_attention without a cache, from the probabilities it kept; K, V hold
// past + T keys per sequence (rows b·(past + T) + j: a prefix's past ones, then the tokens'):
//   dP = dO·Vᵀ   dV += Pᵀ·dO   dS = P ⊙ (dP − rowsum(dP ⊙ P))   dQ = dS·K/√dh   dK += dSᵀ·Q/√dh
// (dK, dV of a kv head summed over the query heads that share it). A hidden key has P = 0 and
// gets nothing.
template <class Scalar>
void causal_attention_backward(const Mat<Scalar>& q, const Mat<Scalar>& K, const Mat<Scalar>& V,
                               const std::vector<Mat<Scalar>>& probs, const Mat<Scalar>& d_o, Index batch, Index T, Index past,
                               int heads, int kv_heads, Index dh, Mat<Scalar>& dq, Mat<Scalar>& dK, Mat<Scalar>& dV) {
  const int group = heads / kv_heads;
  const Index S = past + T;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  dq.resize(q.rows(), q.cols());
  dK = Mat<Scalar>::Zero(K.rows(), K.cols());
  dV = Mat<Scalar>::Zero(V.rows(), V.cols());
  // One task per (sequence, kv head): it alone writes that kv head's dK, dV blocks.
  const int tasks = int(batch) * kv_heads;
  detail::parallel_for(tasks, parallel_attention(int(batch) * heads, T, S, dh), [&](int task) {
    const Index b = task / kv_heads, kv = task % kv_heads;
    thread_local Mat<Scalar> dp;
    for (int h = int(kv) * group; h < int(kv + 1) * group; ++h) {
      const Mat<Scalar>& P = probs[std::size_t(b * heads + h)];
      const auto dO = d_o.block(b * T, h * dh, T, dh);
      dp.noalias() = dO * V.block(b * S, kv * dh, S, dh).transpose();
      dV.block(b * S, kv * dh, S, dh).noalias() += P.transpose() * dO;
      for (Index i = 0; i < T; ++i) dp.row(i) = P.row(i).cwiseProduct((dp.row(i).array() - dp.row(i).dot(P.row(i))).matrix());
      dq.block(b * T, h * dh, T, dh).noalias() = scale * dp * K.block(b * S, kv * dh, S, dh);
      dK.block(b * S, kv * dh, S, dh).noalias() += scale * dp.transpose() * q.block(b * T, h * dh, T, dh);
    }
  });
}

// A forward's keys and values at layer l: the new tokens' k, v (batch·T, width) alone, or the
// cache's with the new ones appended.
template <class Scalar>
struct AttentionInputs {
  const Mat<Scalar>* K;
  const Mat<Scalar>* V;
  Index stride;
};

template <class Scalar>
AttentionInputs<Scalar> keys_and_values(const Mat<Scalar>& k, const Mat<Scalar>& v, Index batch, Index T, KvCache<Scalar>* cache, int l) {
  if (!cache) return {&k, &v, T};
  for (Index b = 0; b < batch; ++b) {
    cache->k[l].middleRows(b * cache->capacity + cache->length, T) = k.middleRows(b * T, T);
    cache->v[l].middleRows(b * cache->capacity + cache->length, T) = v.middleRows(b * T, T);
  }
  return {&cache->k[l], &cache->v[l], cache->capacity};
}

// Checks a forward's cache against ids (batch, T) and, when valid, records the new tokens' mask;
// returns the key mask to attend with. Everything is checked before the cache changes.
template <class Scalar>
Mat<std::int64_t> begin_cached_forward(const char* fn, KvCache<Scalar>* cache, const Mat<std::int64_t>& ids,
                                       const Mat<std::int64_t>& mask, int layers) {
  if (!cache) return mask;
  if (cache->batch != ids.rows() || int(cache->k.size()) != layers)
    detail::fail(fn, ": the cache holds ", cache->batch, " sequences of ", cache->k.size(), " layers; ids has ", ids.rows(),
                 " sequences and the model ", layers, " layers");
  if (cache->length + ids.cols() > cache->capacity)
    detail::fail(fn, ": ", cache->length, " cached + ", ids.cols(), " new tokens exceed the cache's capacity ", cache->capacity);
  cache->mask.middleCols(cache->length, ids.cols()) = mask.size() ? mask : Mat<std::int64_t>::Ones(ids.rows(), ids.cols());
  return cache->mask;
}

// After the layers: the new tokens count as cached.
template <class Scalar>
void end_cached_forward(KvCache<Scalar>* cache, const Mat<std::int64_t>& ids, const Mat<std::int64_t>& mask) {
  if (!cache) return;
  for (Index b = 0; b < ids.rows(); ++b) cache->real[b] += mask.size() ? (mask.row(b).array() != 0).count() : ids.cols();
  cache->length += ids.cols();
}

template <class Scalar>
void rms_norm(const Mat<Scalar>& x, const Vec<Scalar>& gamma, double eps, Mat<Scalar>& y) {
  y.resize(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const Scalar inv = Scalar(1) / std::sqrt(x.row(i).squaredNorm() / Scalar(x.cols()) + Scalar(eps));
    y.row(i) = (x.row(i) * inv).cwiseProduct(gamma.transpose());
  }
}

// As rms_norm, keeping r = 1/sqrt(mean(x²) + eps) per row for the backward:
//   dx = r·(γ ⊙ dy) − (r³/d)·x·Σ_j (γ ⊙ dy ⊙ x)_j
template <class Scalar>
void rms_norm_train(const Mat<Scalar>& x, const Vec<Scalar>& gamma, double eps, Mat<Scalar>& y, Vec<Scalar>& r) {
  y.resize(x.rows(), x.cols());
  r.resize(x.rows());
  for (Index i = 0; i < x.rows(); ++i) {
    r[i] = Scalar(1) / std::sqrt(x.row(i).squaredNorm() / Scalar(x.cols()) + Scalar(eps));
    y.row(i) = (x.row(i) * r[i]).cwiseProduct(gamma.transpose());
  }
}

// dx += the input gradient of rms_norm; a trained γ gets dγ += Σ_rows dy ⊙ x·r.
template <class Scalar>
void rms_norm_backward(const Mat<Scalar>& x, NormWeights<Scalar>& norm, const Vec<Scalar>& r, const Mat<Scalar>& dy, Mat<Scalar>& dx) {
  const Vec<Scalar>& gamma = norm.gamma;
  const Scalar d = Scalar(x.cols());
  if (norm.trainable)
    for (Index i = 0; i < x.rows(); ++i) norm.grad_gamma += (dy.row(i).cwiseProduct(x.row(i)) * r[i]).transpose();
  for (Index i = 0; i < x.rows(); ++i) {
    const auto g = dy.row(i).cwiseProduct(gamma.transpose());
    const Scalar dot = g.dot(x.row(i));
    dx.row(i) += r[i] * g - (r[i] * r[i] * r[i] / d * dot) * x.row(i);
  }
}

template <class Scalar>
void layer_norm(const Mat<Scalar>& x, const Vec<Scalar>& gamma, const Vec<Scalar>& beta, double eps, Mat<Scalar>& y) {
  y.resize(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const Scalar mean = x.row(i).mean();
    const Scalar var = (x.row(i).array() - mean).square().mean();
    y.row(i) = ((x.row(i).array() - mean) / std::sqrt(var + Scalar(eps))).matrix().cwiseProduct(gamma.transpose()) + beta.transpose();
  }
}

// As layer_norm, keeping xhat = (x − μ)/σ and 1/σ per row for the backward:
//   dx = (g − mean(g) − xhat ⊙ mean(g ⊙ xhat)) / σ,  g = γ ⊙ dy
template <class Scalar>
void layer_norm_train(const Mat<Scalar>& x, const Vec<Scalar>& gamma, const Vec<Scalar>& beta, double eps, Mat<Scalar>& y,
                      Mat<Scalar>& xhat, Vec<Scalar>& inv_sigma) {
  xhat.resize(x.rows(), x.cols());
  inv_sigma.resize(x.rows());
  for (Index i = 0; i < x.rows(); ++i) {
    const Scalar mean = x.row(i).mean();
    inv_sigma[i] = Scalar(1) / std::sqrt((x.row(i).array() - mean).square().mean() + Scalar(eps));
    xhat.row(i) = (x.row(i).array() - mean) * inv_sigma[i];
  }
  y = (xhat.array().rowwise() * gamma.transpose().array()).rowwise() + beta.transpose().array();
}

// dx += the input gradient of layer_norm; trained γ, β get dγ += Σ_rows dy ⊙ xhat, dβ += Σ_rows dy.
template <class Scalar>
void layer_norm_backward(const Mat<Scalar>& xhat, const Vec<Scalar>& inv_sigma, NormWeights<Scalar>& norm, const Mat<Scalar>& dy,
                         Mat<Scalar>& dx) {
  const Vec<Scalar>& gamma = norm.gamma;
  if (norm.trainable) {
    norm.grad_gamma += dy.cwiseProduct(xhat).colwise().sum().transpose();
    norm.grad_beta += dy.colwise().sum().transpose();
  }
  for (Index i = 0; i < xhat.rows(); ++i) {
    const auto g = dy.row(i).cwiseProduct(gamma.transpose());
    const Scalar mg = g.mean(), mgx = g.dot(xhat.row(i)) / Scalar(xhat.cols());
    dx.row(i) += inv_sigma[i] * ((g.array() - mg) - xhat.row(i).array() * mgx).matrix();
  }
}

// A Hugging Face checkpoint folder of a model loaded from dir: out_dir/config.json (dir's, byte
// for byte) and dir's safetensors files (model.safetensors, or the shards and
// model.safetensors.index.json) with their tensors in their dtypes, except that each LoRA layer's
// module.weight is the layer's current weight (merge() first to save the merged model, which
// transformers then loads without PEFT). Other tensors come from dir's files: a model whose base
// modules trained (set_trainable) is saved with its save_pretrained. All files or none are written.
template <class Scalar>
void save_checkpoint(const std::string& dir, const std::string& out_dir, const ModuleMap<Scalar>& modules) {
  namespace fs = std::filesystem;
  if (fs::weakly_canonical(dir) == fs::weakly_canonical(out_dir))
    detail::fail("save_checkpoint: ", out_dir, " is the folder the model was read from; write elsewhere");
  const Checkpoint<Scalar> ckpt(dir);
  const std::string config = detail::read_text((fs::path(dir) / "config.json").string());
  std::vector<std::pair<std::string, detail::FileBytes>> files;
  for (std::size_t k = 0; k < ckpt.shards().size(); ++k)
    files.emplace_back((fs::path(out_dir) / ckpt.files()[k]).string(), detail::with_layer_weights(ckpt.shards()[k], modules).serialize());
  const std::string& index = ckpt.index_text();
  if (!index.empty())
    files.emplace_back((fs::path(out_dir) / "model.safetensors.index.json").string(), detail::FileBytes(index.begin(), index.end()));
  files.emplace_back((fs::path(out_dir) / "config.json").string(), detail::FileBytes(config.begin(), config.end()));
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) detail::fail("save_checkpoint: cannot create ", out_dir, ": ", ec.message());
  detail::write_files_atomic(files);
}

// A vector as a 1-D tensor.
template <class Scalar>
void add_vector(SafeTensorsBuilder& b, const std::string& name, const Vec<Scalar>& v) {
  b.add(name, v, {std::uint64_t(v.size())});
}

// save_pretrained's files: out_dir/model.safetensors (tensors, metadata format "pt") and
// out_dir/config.json (config's text), both or neither.
inline void save_pretrained_files(const std::string& out_dir, const std::string& config, SafeTensorsBuilder& tensors) {
  namespace fs = std::filesystem;
  tensors.metadata("format", "pt");
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) detail::fail("save_pretrained: cannot create ", out_dir, ": ", ec.message());
  detail::write_files_atomic({{(fs::path(out_dir) / "model.safetensors").string(), tensors.serialize()},
                              {(fs::path(out_dir) / "config.json").string(), detail::FileBytes(config.begin(), config.end())}});
}

// A forward's adapter per row (batch·T rows) from one adapter name per sequence; empty when
// adapters is null. Checked: one name per sequence, each "__base__" or an adapter of some layer.
template <class Scalar>
std::vector<std::string> adapter_rows(const char* fn, const std::vector<std::string>* adapters, Index batch, Index T,
                                      const ModuleMap<Scalar>& modules) {
  std::vector<std::string> rows;
  if (!adapters) return rows;
  if (Index(adapters->size()) != batch)
    detail::fail(fn, ": ", adapters->size(), " adapter names for ", batch, " sequences; give one per sequence");
  for (const auto& name : *adapters) {
    bool known = name == LoraLinear<Scalar>::kBase;
    for (const auto& [path, layer] : modules) known = known || layer->has_adapter(name);
    if (!known) detail::fail(fn, ": no LoRA layer has an adapter '", name, "'");
  }
  for (const auto& name : *adapters) rows.insert(rows.end(), std::size_t(T), name);
  return rows;
}

// ids (batch, T) in [0, vocab), past + T <= max_positions; attention_mask empty or (batch, T) of 0 and 1.
inline void check_token_ids(const char* fn, const Mat<std::int64_t>& ids, const Mat<std::int64_t>& mask, int vocab,
                            int max_positions, Index past = 0) {
  if (ids.rows() < 1 || ids.cols() < 1)
    detail::fail(fn, ": ids is ", detail::shape(ids.rows(), ids.cols()), ", expected (batch, T) with both >= 1");
  if (past + ids.cols() > max_positions)
    detail::fail(fn, ": sequences of ", past + ids.cols(), " tokens, longer than max_position_embeddings ", max_positions);
  for (Index b = 0; b < ids.rows(); ++b)
    for (Index t = 0; t < ids.cols(); ++t)
      if (ids(b, t) < 0 || ids(b, t) >= vocab)
        detail::fail(fn, ": ids(", b, ", ", t, ") is ", ids(b, t), ", outside the vocabulary [0, ", vocab, ")");
  if (mask.size() && (mask.rows() != ids.rows() || mask.cols() != ids.cols()))
    detail::fail(fn, ": attention_mask is ", detail::shape(mask.rows(), mask.cols()), ", expected ", detail::shape(ids.rows(), ids.cols()));
  if (mask.size() && !((mask.array() == 0) || (mask.array() == 1)).all())
    detail::fail(fn, ": attention_mask holds values other than 0 and 1");
}

}  // namespace lora
