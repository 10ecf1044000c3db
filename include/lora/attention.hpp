// LoraAttention<Scalar>: PyTorch-style multi-head attention whose projections q_proj, k_proj,
// v_proj, o_proj are frozen linear layers (with bias), LoRA on any subset (PEFT's
// target_modules; the LoRA paper's default is q and v).
//
//   query (batch·T, d), key and value (batch·S, d), d = heads·dh; rows of one sequence are
//   contiguous (row b·T + t is token t of sequence b).
//   Q = q_proj(query)   K = k_proj(key)   V = v_proj(value)
//   per sequence b and head h (columns h·dh .. h·dh+dh−1):
//     Z = Q_bh·K_bhᵀ/√dh + mask (T, S)     P = softmax(Z) by rows     O_bh = P·V_bh (T, dh)
//   y = o_proj(O)                                                      -> (batch·T, d)
//
// With a prefix (prefix-tuning, prefix.hpp: KV = [Pk | Pv], p rows), every sequence's keys and
// values are [Pk; K_b] and [Pv; V_b]: Z = [Q_bh·Pk_hᵀ | Q_bh·K_bhᵀ]/√dh (T, p + S), the masks
// acting on the S columns only (a prefix is seen by every query), O_bh = P·[Pv_h; V_bh].
//
// Masks (AttentionMask): causal (key j is hidden from query i when j > i, as
// torch.ones(T, S).triu(1)), key padding per sequence ((batch, S), nonzero = ignore that key),
// and an additive (T, S) mask added to every head's scores (−inf hides a key). A query whose
// keys are all hidden has no distribution to attend with: its P row is defined as zero, so its
// attention output is zero (then o_proj's bias) and no gradient flows through it. (PyTorch
// gives NaN there.)
//
// In evaluation, the LoRA projections that read the same matrix (q, k, v of self-attention; k, v
// of cross-attention) compute x·Aᵀ in one product (detail/linear_shared_input.hpp).
//
// Training keeps Q, K, V, O (4 × (batch·T or batch·S, d)) and P (batch·heads·T, S); backward's
// workspaces are dO, dQ, dK, dV of the same sizes as O, Q, K, V and one (T, S) matrix per
// thread, all reused from call to call; each LoRA projection also keeps its own input (see
// LoraLinear). The (sequence, head) pairs run in parallel. backward consumes the cache and returns
// dQuery, dKey, dValue; the self-attention form sums all three, the cross form sums dKey and
// dValue into dContext.
#pragma once

#include <lora/error.hpp>
#include <lora/layers.hpp>
#include <lora/linear.hpp>
#include <lora/module_map.hpp>
#include <lora/prefix.hpp>
#include <lora/types.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
struct AttentionMask {
  bool causal = false;
  Mat<std::uint8_t> key_padding;  // (batch, S), nonzero = padded key, ignored; empty = none
  Mat<Scalar> additive;           // (T, S), added to the scores of every head; empty = none
};

// Frozen weights (d, d) and biases (d) of the four projections, PyTorch layout.
template <class Scalar>
struct AttentionWeights {
  Mat<Scalar> q_proj, k_proj, v_proj, o_proj;
  Vec<Scalar> q_bias, k_bias, v_bias, o_bias;  // size 0: no bias
};

struct AttentionConfig {
  int heads = 1;
  LoraConfig lora;  // r, alpha, dropout, ... for every targeted projection
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
  PrefixConfig prefix;  // prefix-tuning: length 0 = none
};

template <class Scalar>
struct AttentionGrads {
  Mat<Scalar> d_query, d_key, d_value;
  Mat<Scalar> self() const { return d_query + d_key + d_value; }  // dX of forward(x, ...)
  Mat<Scalar> context() const { return d_key + d_value; }         // dContext of the cross form
};

template <class Scalar>
class LoraAttention {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  using Mask = AttentionMask<Scalar>;
  enum class Proj { q = 0, k = 1, v = 2, o = 3 };
  static constexpr const char* kNames[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};

  LoraAttention(AttentionWeights<Scalar> w, const AttentionConfig& config) : config_(config) {
    const Index d = w.q_proj.rows();
    if (config.heads < 1) detail::fail("LoraAttention: heads is ", config.heads, ", expected >= 1");
    if (d < 1 || d % config.heads != 0)
      detail::fail("LoraAttention: d_model ", d, " is not divisible by heads ", config.heads);
    for (const auto& t : config.target_modules) {
      bool known = false;
      for (const char* n : kNames) known |= t == n;
      if (!known) detail::fail("LoraAttention: unknown target module '", t, "' (expected q_proj, k_proj, v_proj or o_proj)");
    }
    Mat* ws[4] = {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj};
    Vec* bs[4] = {&w.q_bias, &w.k_bias, &w.v_bias, &w.o_bias};
    for (int p = 0; p < 4; ++p) {
      if (ws[p]->rows() != d || ws[p]->cols() != d)
        detail::fail("LoraAttention: ", kNames[p], " weight is ", detail::shape(ws[p]->rows(), ws[p]->cols()),
                     ", expected ", detail::shape(d, d));
      if (bs[p]->size() != 0 && bs[p]->size() != d)
        detail::fail("LoraAttention: ", kNames[p], " bias is (", bs[p]->size(), "), expected (", d, ")");
    }
    for (int p = 0; p < 4; ++p) {
      if (targeted(p)) {
        std::optional<Vec> bias;
        if (bs[p]->size()) bias = std::move(*bs[p]);
        LoraConfig lc = config.lora;
        lc.seed = config.lora.seed + static_cast<std::uint64_t>(p);  // distinct inits per projection
        proj_[p].lora = std::make_unique<LoraLinear<Scalar>>(std::move(*ws[p]), std::move(bias), lc);
        modules_.add(kNames[p], *proj_[p].lora);
      } else {
        proj_[p].frozen = std::make_unique<Linear<Scalar>>(std::move(*ws[p]), std::move(*bs[p]), false);
      }
    }
    d_ = d;
    dh_ = d / config.heads;
    if (config.prefix.length < 0) detail::fail("LoraAttention: prefix length is ", config.prefix.length, ", expected >= 0");
    if (config.prefix.length > 0) prefix_ = std::make_unique<Prefix<Scalar>>(d, config.prefix);
  }

  Index d_model() const { return d_; }
  int heads() const { return config_.heads; }
  const AttentionConfig& config() const { return config_; }
  bool targeted(int p) const {
    for (const auto& t : config_.target_modules)
      if (t == kNames[p]) return true;
    return false;
  }
  // The LoRA layer of projection p, or nullptr when p is not targeted.
  LoraLinear<Scalar>* lora(Proj p) { return proj_[int(p)].lora.get(); }
  const LoraLinear<Scalar>* lora(Proj p) const { return proj_[int(p)].lora.get(); }
  LoraLinear<Scalar>* lora(const std::string& name) { return proj_[index_of(name)].lora.get(); }
  const LoraLinear<Scalar>* lora(const std::string& name) const { return proj_[index_of(name)].lora.get(); }
  // The prefix, or nullptr without one.
  Prefix<Scalar>* prefix() { return prefix_.get(); }
  const Prefix<Scalar>* prefix() const { return prefix_.get(); }
  // The LoRA projections by name ("q_proj", ...), for PEFT files and whole-layer calls.
  const ModuleMap<Scalar>& modules() const { return modules_; }

  // ---- evaluation (const, thread-safe) ---------------------------------------------------
  Mat forward(const MatRef& query, const MatRef& key, const MatRef& value, Index batch, const Mask& mask = {}) const {
    Mat y;
    forward(query, key, value, batch, mask, y);
    return y;
  }

  // Writes into y (not aliasing the inputs), resized only when its shape differs. Q, K, V, O
  // and P live in per-thread workspaces, so repeated calls allocate nothing.
  void forward(const MatRef& query, const MatRef& key, const MatRef& value, Index batch, const Mask& mask, Mat& y) const {
    Shapes s = check("forward", query, key, value, batch, mask);
    thread_local Mat Q, K, V, O, KV;
    project_inputs(query, key, value, Q, K, V);
    O.resize(query.rows(), d_);
    attend(Q, K, V, prefix_ ? &prefix_->values(KV) : nullptr, s, mask, O, nullptr);
    project(Proj::o, O, y);
  }
  Mat forward(const MatRef& x, Index batch, const Mask& mask = {}) const { return forward(x, x, x, batch, mask); }
  Mat forward(const MatRef& x, const MatRef& context, Index batch, const Mask& mask = {}) const {
    return forward(x, context, context, batch, mask);
  }

  // ---- training ----------------------------------------------------------------------------
  // backward, dy (batch·T, d):
  //   dO = o_proj.backward(dy); per (b, h): dP = dO_bh·V_bhᵀ, dV_bh = Pᵀ·dO_bh,
  //   dZ = P ⊙ (dP − rowsum(P ⊙ dP)) / √dh, dQ_bh = dZ·K_bh, dK_bh = dZᵀ·Q_bh;
  //   dQuery = q_proj.backward(dQ), dKey = k_proj.backward(dK), dValue = v_proj.backward(dV).
  Mat forward_train(const MatRef& query, const MatRef& key, const MatRef& value, Index batch, const Mask& mask = {}) {
    Shapes s = check("forward_train", query, key, value, batch, mask);
    if (modules_.is_merged())
      detail::fail("LoraAttention::forward_train: the projections are merged; call unmerge() before training");
    Cache& c = cache_;
    c.valid = false;
    project_train(Proj::q, query, c.Q);
    project_train(Proj::k, key, c.K);
    project_train(Proj::v, value, c.V);
    c.KV = prefix_ ? &prefix_->forward_train() : nullptr;
    c.P.resize(batch * config_.heads * s.T, s.p + s.S);
    c.O.resize(query.rows(), d_);
    attend(c.Q, c.K, c.V, c.KV, s, mask, c.O, &c.P);
    Mat y;
    project_train(Proj::o, c.O, y);
    c.shapes = s;
    c.valid = true;
    return y;
  }
  Mat forward_train(const MatRef& x, Index batch, const Mask& mask = {}) { return forward_train(x, x, x, batch, mask); }
  Mat forward_train(const MatRef& x, const MatRef& context, Index batch, const Mask& mask = {}) {
    return forward_train(x, context, context, batch, mask);
  }

  AttentionGrads<Scalar> backward(const MatRef& dy) {
    AttentionGrads<Scalar> g;
    backward(dy, g);
    return g;
  }

  // Writes into g's matrices, resized only when their shapes differ.
  void backward(const MatRef& dy, AttentionGrads<Scalar>& g) {
    Cache& c = cache_;
    if (!c.valid) detail::fail("LoraAttention::backward: no forward_train to go back through (call forward_train first)");
    const Shapes& s = c.shapes;
    if (dy.rows() != s.batch * s.T || dy.cols() != d_)
      detail::fail("LoraAttention::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(s.batch * s.T, d_));
    for (int p = 0; p < 4; ++p) {  // every projection can go back before any gradient accumulates
      if (proj_[p].lora && !proj_[p].lora->ready_for_backward()) {
        try {
          proj_[p].lora->check_backward(dy);
        } catch (const Error& e) {
          detail::fail("LoraAttention::backward: ", kNames[p], ": ", e.what());
        }
      }
      if (proj_[p].frozen && !proj_[p].frozen->ready_for_backward())
        detail::fail("LoraAttention::backward: ", kNames[p], " has no forward_train to go back through");
    }
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(dh_));
    project_backward(Proj::o, dy, c.dO);
    c.dQ.resize(c.Q.rows(), d_);
    c.dK.resize(c.K.rows(), d_);
    c.dV.resize(c.V.rows(), d_);
    const int tasks = static_cast<int>(s.batch) * config_.heads;
    const Index p = s.p;
    if (p) c.dprefix.resize(tasks * p, 2 * dh_);  // each task's dPk_h | dPv_h, summed below
    detail::parallel_for(tasks, parallel_heads(s), [&](int task) {
      const Index b = task / config_.heads;
      const int h = task % config_.heads;
      thread_local Mat dP;  // per thread (T, p + S)
      thread_local Vec rows;
      const auto P = c.P.block(task * s.T, 0, s.T, p + s.S);
      const auto dOb = c.dO.block(b * s.T, h * dh_, s.T, dh_);
      const auto Qb = c.Q.block(b * s.T, h * dh_, s.T, dh_);
      dP.resize(s.T, p + s.S);
      dP.rightCols(s.S).noalias() = dOb * c.V.block(b * s.S, h * dh_, s.S, dh_).transpose();
      c.dV.block(b * s.S, h * dh_, s.S, dh_).noalias() = P.rightCols(s.S).transpose() * dOb;
      if (p) {
        dP.leftCols(p).noalias() = dOb * c.KV->block(0, d_ + h * dh_, p, dh_).transpose();
        c.dprefix.block(task * p, dh_, p, dh_).noalias() = P.leftCols(p).transpose() * dOb;
      }
      // softmax backward, then the 1/√dh of the scores; rows of P that are zero stay zero
      rows = (P.array() * dP.array()).rowwise().sum();
      dP = (P.array() * (dP.colwise() - rows).array()) * scale;
      auto dQb = c.dQ.block(b * s.T, h * dh_, s.T, dh_);
      dQb.noalias() = dP.rightCols(s.S) * c.K.block(b * s.S, h * dh_, s.S, dh_);
      c.dK.block(b * s.S, h * dh_, s.S, dh_).noalias() = dP.rightCols(s.S).transpose() * Qb;
      if (p) {
        dQb.noalias() += dP.leftCols(p) * c.KV->block(0, h * dh_, p, dh_);
        c.dprefix.block(task * p, 0, p, dh_).noalias() = dP.leftCols(p).transpose() * Qb;
      }
    });
    if (p) {  // in task order, so the sum does not depend on the thread count
      c.dKV.setZero(p, 2 * d_);
      for (int task = 0; task < tasks; ++task) {
        const int h = task % config_.heads;
        c.dKV.block(0, h * dh_, p, dh_) += c.dprefix.block(task * p, 0, p, dh_);
        c.dKV.block(0, d_ + h * dh_, p, dh_) += c.dprefix.block(task * p, dh_, p, dh_);
      }
      prefix_->backward(c.dKV);
    }
    project_backward(Proj::q, c.dQ, g.d_query);
    project_backward(Proj::k, c.dK, g.d_key);
    project_backward(Proj::v, c.dV, g.d_value);
    c.valid = false;
  }

  void zero_grad() {
    modules_.zero_grad();
    if (prefix_) prefix_->zero_grad();
  }

  // Restarts every projection's dropout masks (projection p uses seed + p, as at construction).
  void reseed(std::uint64_t seed) {
    for (int p = 0; p < 4; ++p)
      if (proj_[p].lora) proj_[p].lora->reseed(seed + static_cast<std::uint64_t>(p));
  }

  // Every trainable tensor, named "q_proj.lora_A", ..., "prefix.kv"
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> all;
    for (int p = 0; p < 4; ++p)
      if (proj_[p].lora)
        for (auto& prm : proj_[p].lora->parameters()) {
          prm.name = std::string(kNames[p]) + "." + prm.name;
          all.push_back(prm);
        }
    if (prefix_)
      for (auto& prm : prefix_->parameters()) all.push_back({"prefix." + prm.name, prm.value, prm.grad});
    return all;
  }

  Index trainable_parameters() const { return modules_.trainable_parameters() + (prefix_ ? prefix_->parameter_count() : 0); }

  // ---- merge (all LoRA projections at once; refusals change no projection) --------------
  void merge() { modules_.merge(); }
  // Every merged weight is checked to be finite before any projection changes.
  void safe_merge() { modules_.safe_merge(); }
  void unmerge() { modules_.unmerge(); }
  bool is_merged() const { return modules_.is_merged(); }

 private:
  struct Projection {
    std::unique_ptr<LoraLinear<Scalar>> lora;  // targeted
    std::unique_ptr<Linear<Scalar>> frozen;    // not targeted
  };
  struct Shapes {
    Index batch = 0, T = 0, S = 0, p = 0;  // p: the prefix's length
  };
  struct Cache {
    Mat Q, K, V, P, O;                 // kept for backward
    const Mat* KV = nullptr;           // the prefix's keys and values (the Prefix keeps them)
    Mat dO, dQ, dK, dV, dprefix, dKV;  // backward's workspaces, reused
    Shapes shapes;
    bool valid = false;
  };

  Shapes check(const char* fn, const MatRef& query, const MatRef& key, const MatRef& value, Index batch,
               const Mask& mask) const {
    const std::string where = std::string("LoraAttention::") + fn + ": ";
    if (batch < 1) detail::fail(where, "batch is ", batch, ", expected >= 1");
    auto check_input = [&](const char* name, const MatRef& m) {
      if (m.cols() != d_ || m.rows() % batch != 0 || m.rows() == 0)
        detail::fail(where, name, " is ", detail::shape(m.rows(), m.cols()), ", expected (batch·len, ", d_,
                     ") with batch ", batch);
    };
    check_input("query", query);
    check_input("key", key);
    check_input("value", value);
    if (key.rows() != value.rows())
      detail::fail(where, "key is ", detail::shape(key.rows(), key.cols()), " but value is ",
                   detail::shape(value.rows(), value.cols()), "; they must have the same length");
    Shapes s{batch, query.rows() / batch, key.rows() / batch, prefix_ ? prefix_->length() : 0};
    if (mask.key_padding.size() && (mask.key_padding.rows() != batch || mask.key_padding.cols() != s.S))
      detail::fail(where, "key_padding mask is ", detail::shape(mask.key_padding.rows(), mask.key_padding.cols()),
                   ", expected ", detail::shape(batch, s.S));
    if (mask.additive.size() && (mask.additive.rows() != s.T || mask.additive.cols() != s.S))
      detail::fail(where, "additive mask is ", detail::shape(mask.additive.rows(), mask.additive.cols()),
                   ", expected ", detail::shape(s.T, s.S));
    return s;
  }

  static int index_of(const std::string& name) {
    for (int p = 0; p < 4; ++p)
      if (name == kNames[p]) return p;
    detail::fail("LoraAttention: no projection '", name, "' (expected q_proj, k_proj, v_proj or o_proj)");
  }

  // The (sequence, head) pairs are independent: they run in parallel (OpenMP, lora's thread
  // count) when there is enough work. Each writes its own blocks, so results do not depend on
  // the thread count; the GEMMs inside run on one thread each.
  bool parallel_heads(const Shapes& s) const {
    return s.batch * config_.heads > 1 && s.batch * config_.heads * s.T * (s.p + s.S) * dh_ >= (Index(1) << 18);
  }

  // O_bh = softmax(Q_bh·K_bhᵀ/√dh + mask)·V_bh for every sequence b and head h (with the
  // prefix's columns first when KV is given). P_keep, when given, receives every P_bh (row block
  // b·heads + h, as backward reads them); otherwise each thread uses a (T, p + S) workspace.
  void attend(const Mat& Q, const Mat& K, const Mat& V, const Mat* KV, const Shapes& s, const Mask& mask, Mat& O,
              Mat* P_keep) const {
    const int tasks = static_cast<int>(s.batch) * config_.heads;
    detail::parallel_for(tasks, parallel_heads(s), [&](int task) {
      const Index b = task / config_.heads;
      const int h = task % config_.heads;
      thread_local Mat P_work;
      if (!P_keep) P_work.resize(s.T, s.p + s.S);
      Eigen::Ref<Mat> P = P_keep ? Eigen::Ref<Mat>(P_keep->middleRows(task * s.T, s.T)) : Eigen::Ref<Mat>(P_work);
      attend_probs(Q, K, KV, b, h, s, mask, P);
      auto Ob = O.block(b * s.T, h * dh_, s.T, dh_);
      Ob.noalias() = P.rightCols(s.S) * V.block(b * s.S, h * dh_, s.S, dh_);
      if (s.p) Ob.noalias() += P.leftCols(s.p) * KV->block(0, d_ + h * dh_, s.p, dh_);
    });
  }

  // P <- softmax(Q_bh·[Pk_h; K_bh]ᵀ/√dh + mask) by rows, max-subtracted; fully hidden rows are zero.
  void attend_probs(const Mat& Q, const Mat& K, const Mat* KV, Index b, int h, const Shapes& s, const Mask& mask,
                    Eigen::Ref<Mat> P) const {
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(dh_));
    const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
    const auto Qb = Q.block(b * s.T, h * dh_, s.T, dh_);
    P.rightCols(s.S).noalias() = scale * Qb * K.block(b * s.S, h * dh_, s.S, dh_).transpose();
    if (s.p) P.leftCols(s.p).noalias() = scale * Qb * KV->block(0, h * dh_, s.p, dh_).transpose();
    if (mask.additive.size()) P.rightCols(s.S) += mask.additive;
    for (Index i = 0; i < s.T; ++i) {
      auto row = P.row(i);
      auto keys = row.tail(s.S);  // the masks act on the sequence's own keys
      if (mask.causal)
        for (Index j = i + 1; j < s.S; ++j) keys(j) = neg_inf;
      if (mask.key_padding.size())
        for (Index j = 0; j < s.S; ++j)
          if (mask.key_padding(b, j)) keys(j) = neg_inf;
      const Scalar m = row.maxCoeff();
      if (m == neg_inf || std::isnan(m)) {  // nothing to attend to
        row.setZero();
        continue;
      }
      row = (row.array() - m).exp();
      row /= row.sum();
    }
  }

  // Q, K, V: the LoRA projections that read the same matrix (all three in self-attention, k and v
  // in cross-attention) share one x·Aᵀ product (detail/linear_shared_input.hpp).
  void project_inputs(const MatRef& query, const MatRef& key, const MatRef& value, Mat& Q, Mat& K, Mat& V) const {
    const MatRef* in[3] = {&query, &key, &value};
    Mat* out[3] = {&Q, &K, &V};
    const auto same = [](const MatRef& a, const MatRef& b) {
      return a.data() == b.data() && a.rows() == b.rows() && a.cols() == b.cols() && a.outerStride() == b.outerStride();
    };
    bool done[3] = {};
    for (int p = 0; p < 3; ++p) {
      if (done[p]) continue;
      done[p] = true;
      const LoraLinear<Scalar>* layers[3] = {proj_[p].lora.get()};
      Mat* ys[3] = {out[p]};
      int m = 1;
      for (int q = p + 1; q < 3 && layers[0]; ++q)
        if (!done[q] && proj_[q].lora && same(*in[p], *in[q])) {
          layers[m] = proj_[q].lora.get();
          ys[m++] = out[q];
          done[q] = true;
        }
      if (m > 1)
        detail::SharedInput<Scalar>::forward(*in[p], layers, ys, m);
      else
        project(Proj(p), *in[p], *out[p]);
    }
  }

  void project(Proj p, const MatRef& x, Mat& y) const {
    const Projection& pr = proj_[int(p)];
    if (pr.lora) return pr.lora->forward(x, y);
    pr.frozen->forward(x, y);
  }

  void project_train(Proj p, const MatRef& x, Mat& y) {
    Projection& pr = proj_[int(p)];
    if (pr.lora) return pr.lora->forward_train(x, y);
    pr.frozen->forward_train(x, y);
  }

  void project_backward(Proj p, const MatRef& dy, Mat& dx) {
    Projection& pr = proj_[int(p)];
    if (pr.lora) return pr.lora->backward(dy, dx);
    pr.frozen->backward(dy, dx);
  }

  AttentionConfig config_;
  Index d_ = 0, dh_ = 0;
  std::array<Projection, 4> proj_;
  ModuleMap<Scalar> modules_;
  std::unique_ptr<Prefix<Scalar>> prefix_;
  Cache cache_;
};

}  // namespace lora
