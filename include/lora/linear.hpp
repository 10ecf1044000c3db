// LoraLinear<Scalar>: a frozen linear layer W (out, in) + b with a trainable low-rank update.
//
//   y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        x (n, in) -> y (n, out)
//   A (r, in), B (out, r), s = alpha/r (alpha/sqrt(r) with rsLoRA)
//
// B·A is never formed in a forward pass: the LoRA branch is two thin GEMMs through (n, r).
// Only A and B (and, in BiasMode::trainable, b) are trainable; W's bytes never change except
// through merge/unmerge.
//
// Weight storage (detail/weight_storage.hpp). The layer owns W, or borrows it: a writable
// borrow (MatMap) is merged into in place; a read-only borrow (ConstMatMap, e.g. a mapped
// safetensors tensor) is never written: merge copies it first and unmerge goes back to the
// borrowed bytes. With fan_in_fan_out (GPT-2's Conv1D) W is stored (in, out); the math is the same.
//
// Named adapters (detail/adapter_registry.hpp). A layer holds any number of adapters by name
// (PEFT's lora_A[name]); the constructor makes the first ("default"), add_adapter/update_layer
// more, set_adapter picks the active ones (their updates sum), delete_adapter removes one.
// forward(x, adapter_names) serves a mixed batch, one adapter per row, without merging.
// The adapter calls, merging, the mixed batch and training are defined in
// detail/linear_adapters.hpp, detail/linear_merge.hpp, detail/linear_mixed_batch.hpp and
// detail/linear_train.hpp; this file holds the layer and its evaluation forward.
//
// Merge state. merge() adds s·B·A of the active adapters to W, after which forward is one GEMM;
// unmerge() subtracts them all. Merging a merged adapter and unmerging with nothing merged are
// no-ops (PEFT's behaviour), so W is never doubly merged. In floating point, W + Δ − Δ need not
// equal W; with exact_unmerge the layer keeps a copy of W while merged and unmerge restores it
// bit-for-bit. Training (forward_train/backward) is an error while merged, and so is setting A
// or B of a merged adapter: unmerge first.
//
// Training cache. forward_train fills one Cache; any call that changes what backward would
// compute with (merge, unmerge, the adapters, A, B, m, W, enabling, the base's trainability)
// discards it, and backward then refuses, naming that call.
#pragma once

#include <lora/config.hpp>
#include <lora/detail/adapter_registry.hpp>
#include <lora/detail/dora.hpp>
#include <lora/detail/few_rows.hpp>
#include <lora/detail/row_groups.hpp>
#include <lora/detail/thin_products.hpp>
#include <lora/detail/weight_storage.hpp>
#include <lora/dropout.hpp>
#include <lora/error.hpp>
#include <lora/init.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// forward_train's input: copied into the training cache, or borrowed (the caller keeps x alive
// and unchanged until backward; the models borrow the activations they keep anyway).
enum class Keep { copy, borrow };
// What backward does with dx: writes the input's gradient (set), adds it to dx, already (n, in)
// (add: a sum of branches, one GEMM with β = 1 instead of a product and a pass), or computes none
// (none: nothing upstream needs it, e.g. a first layer under frozen embeddings; the layer's own
// gradients still accumulate).
enum class InputGrad { set, add, none };

namespace detail {
template <class>
struct SharedInput;  // layers reading one x share its x·Aᵀ product (detail/linear_shared_input.hpp)
}

template <class Scalar>
class LoraLinear {
 public:
  using Mat = lora::Mat<Scalar>;
  using Vec = lora::Vec<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  using MatMap = lora::MatMap<Scalar>;
  using ConstMatMap = lora::ConstMatMap<Scalar>;

  // The name of the adapter a constructor creates (PEFT's default adapter name), and the name
  // that selects the base alone in a mixed batch.
  static constexpr const char* kDefault = "default";
  static constexpr const char* kBase = "__base__";

  // Owned weight (out, in) (or (in, out) with fan_in_fan_out), optional bias (out). The layer
  // starts with one adapter made from config, named adapter_name ("default"), and active.
  LoraLinear(Mat weight, std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name = kDefault)
      : w_(std::move(weight)) {
    setup(std::move(bias), config, adapter_name);
  }
  // Writable borrow: the caller keeps the memory alive; merge writes into it.
  LoraLinear(MatMap weight, std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name = kDefault)
      : w_(weight) {
    setup(std::move(bias), config, adapter_name);
  }
  // Read-only borrow: the caller keeps the memory alive; it is never written (merge copies).
  LoraLinear(ConstMatMap weight, std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name = kDefault)
      : w_(weight) {
    setup(std::move(bias), config, adapter_name);
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  bool fan_in_fan_out() const { return fan_in_fan_out_; }
  bool has_bias() const { return has_bias_; }
  // True while any adapter is merged into W.
  bool is_merged() const { return !reg_.merged().empty(); }
  // True while W is memory the layer does not own.
  bool is_borrowed() const { return w_.is_borrowed(); }

  // W as stored: (out, in), or (in, out) with fan_in_fan_out. Holds the merged adapters.
  ConstMatMap weight() const { return w_.view(); }
  const Vec& bias() const { return bias_; }  // size 0 when the layer has none

  // ---- named adapters (PEFT's ModuleDicts lora_A[name], lora_B[name]) ----------------------
  // Each adapter has its own r, alpha, rsLoRA flag, dropout, init, seed and DoRA flag. The
  // active ones (set_adapter) sum their updates in forward and are the ones trained; the others
  // are kept but unused. Adding, selecting and deleting never touch W, except that set_adapter
  // unmerges first when something is merged (as PEFT's LoraModel.set_adapter does).
  // fan_in_fan_out is the layer's (how W is stored); the bias mode and exact_unmerge must be
  // the same for every adapter of a layer. A DoRA adapter is active or merged only alone.
  //
  // The calls without a name (rank(), lora_A(), set_lora_A(), update_layer(config), ...) act
  // on the one active adapter and are refused when none or several are active.

  // Adapter names in the order they were added.
  std::vector<std::string> adapter_names() const { return reg_.names(); }
  bool has_adapter(const std::string& name) const { return reg_.find(name) >= 0; }
  const std::vector<std::string>& active_adapters() const { return reg_.active(); }
  // The name of the one active adapter (refused when none or several are active).
  const std::string& active_adapter() const { return reg_.current("active_adapter").name; }
  // Merged adapters, in merge order.
  const std::vector<std::string>& merged_adapters() const { return reg_.merged(); }
  bool is_merged(const std::string& name) const { return reg_.is_merged(reg_.at("is_merged", name).name); }

  // A new adapter `name` (not yet active) from config, with fresh A and B (config.init) and
  // zero gradients. Refused for a name the layer has, an empty name or "__base__".
  void add_adapter(const std::string& name, const LoraConfig& config);

  // PEFT's update_layer: adapter `name` gets a fresh A and B from config, replacing the one of
  // that name or adding it (not active) when the layer has none. W and b are untouched.
  // Refused for a merged adapter, a config that changes fan_in_fan_out (how W is stored) or
  // disagrees with the other adapters' bias mode or exact_unmerge, and a trainable bias the
  // layer does not have. A refusal changes nothing.
  void update_layer(const std::string& name, const LoraConfig& config);
  void update_layer(const LoraConfig& config) {
    const std::string name = reg_.current("update_layer").name;
    update_layer(name, config);
  }

  // PEFT's set_adapter: these adapters become the active ones (in this order). Unmerges first.
  // Unknown or repeated names are refused, changing nothing.
  void set_adapter(const std::vector<std::string>& names);
  void set_adapter(std::initializer_list<std::string> names) { set_adapter(std::vector<std::string>(names)); }
  void set_adapter(const std::string& name) { set_adapter(std::vector<std::string>{name}); }

  // Removes adapter `name`. Refused while it is merged (unmerge() first). An active adapter
  // leaves the active set; no other adapter is activated in its place.
  void delete_adapter(std::string name);

  // The one active adapter's settings and tensors (or a named adapter's).
  const LoraConfig& config() const { return reg_.current("config").config; }
  const LoraConfig& config(const std::string& name) const { return reg_.at("config", name).config; }
  int rank() const { return reg_.current("rank").config.r; }
  int rank(const std::string& name) const { return reg_.at("rank", name).config.r; }
  Scalar scaling() const { return reg_.current("scaling").s; }
  Scalar scaling(const std::string& name) const { return reg_.at("scaling", name).s; }
  const Mat& lora_A() const { return reg_.current("lora_A").A; }
  const Mat& lora_A(const std::string& name) const { return reg_.at("lora_A", name).A; }
  const Mat& lora_B() const { return reg_.current("lora_B").B; }
  const Mat& lora_B(const std::string& name) const { return reg_.at("lora_B", name).B; }
  const Mat& grad_A() const { return reg_.current("grad_A").grad_A; }
  const Mat& grad_A(const std::string& name) const { return reg_.at("grad_A", name).grad_A; }
  const Mat& grad_B() const { return reg_.current("grad_B").grad_B; }
  const Mat& grad_B(const std::string& name) const { return reg_.at("grad_B", name).grad_B; }
  const Vec& grad_bias() const { return grad_bias_; }  // size 0 unless BiasMode::trainable or base_trainable()

  // A (r, in) and B (out, r). Refused while that adapter is merged (W would no longer match).
  void set_lora_A(const MatRef& a) { set_factor("set_lora_A", "A", a, reg_.current("set_lora_A")); }
  void set_lora_A(const std::string& name, const MatRef& a) { set_factor("set_lora_A", "A", a, reg_.at("set_lora_A", name)); }
  void set_lora_B(const MatRef& b) { set_factor("set_lora_B", "B", b, reg_.current("set_lora_B")); }
  void set_lora_B(const std::string& name, const MatRef& b) { set_factor("set_lora_B", "B", b, reg_.at("set_lora_B", name)); }

  // ---- DoRA (config.use_dora) ------------------------------------------------------------
  // PEFT's DoRA: a magnitude m (out), initialised to the norms below, rescales every output:
  //   norm = ‖W + s·B·A‖ per output row (L2 over in), c = m / norm
  //   y = b + c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)          (PEFT: x·Wᵀ + b + (c − 1)⊙x·Wᵀ + c⊙s·(x·Aᵀ)·Bᵀ)
  // norm is a constant in backward (detached, DoRA paper §4.3): with z = x·Wᵀ + s·t·Bᵀ,
  //   dm += Σ_rows dy ⊙ z / norm, and A, B, x get the plain LoRA gradients of dy ⊙ c.
  // Merged, W' = c ⊙_rows (W + s·B·A). norm is computed as ‖w‖² + 2s·w·(Aᵀb) + s²·bᵀ(A·Aᵀ)b
  // per row, so no (out, in) matrix is formed. Not supported with dropout, a trainable base,
  // other active or merged adapters, or in a mixed batch (PEFT refuses that too).
  bool use_dora() const { return reg_.current("use_dora").config.use_dora; }
  const Vec& lora_magnitude() const { return reg_.current("lora_magnitude").m; }  // size 0 without DoRA
  const Vec& lora_magnitude(const std::string& name) const { return reg_.at("lora_magnitude", name).m; }
  const Vec& grad_magnitude() const { return reg_.current("grad_magnitude").grad_m; }
  const Vec& grad_magnitude(const std::string& name) const { return reg_.at("grad_magnitude", name).grad_m; }
  void set_lora_magnitude(const Vec& m) { set_magnitude(reg_.current("set_lora_magnitude"), m); }
  void set_lora_magnitude(const std::string& name, const Vec& m) { set_magnitude(reg_.at("set_lora_magnitude", name), m); }

  // ‖W + s·B·A‖ per output row (W without merged adapters).
  Vec weight_norm() const { return norm_of(reg_.current("weight_norm")); }
  Vec weight_norm(const std::string& name) const { return norm_of(reg_.at("weight_norm", name)); }

  // Replaces the base weight, as stored ((out, in), or (in, out) with fan_in_fan_out); for
  // initialisations that move part of W into A and B (PiSSA, OLoRA in svd.hpp). A writable
  // borrow is written in place. Refused while merged and for a read-only borrow.
  void set_weight(const MatRef& w) {
    if (is_merged()) detail::fail("LoraLinear::set_weight: the layer is merged; unmerge() before changing W");
    if (w_.is_read_only())
      detail::fail("LoraLinear::set_weight: W is a read-only borrow; construct the layer with an owned or writable W");
    if (w.rows() != w_.rows() || w.cols() != w_.cols())
      detail::fail("LoraLinear::set_weight: W is ", detail::shape(w.rows(), w.cols()), ", expected ", detail::shape(w_.rows(), w_.cols()));
    w_.writable() = w;
    discard_cache("set_weight");
  }

  // PEFT's enable_adapters / disable_adapters: a disabled layer computes the base alone,
  // y = x·Wᵀ + b, and trains nothing of A and B (parameters() leaves them out). Disabling a
  // merged layer unmerges it first (as PEFT does).
  void enable_adapters(bool enabled) {
    if (!enabled) unmerge();
    disabled_ = !enabled;
    discard_cache("enable_adapters");
  }
  bool disable_adapters() const { return disabled_; }

  // Full fine-tuning: W and b become trainable too (backward accumulates grad_weight and
  // grad_bias, parameters() lists them). Off by default: LoRA training never changes W. Refused
  // while merged, for a read-only borrowed W and with a DoRA adapter.
  void set_base_trainable(bool on) {
    const char* where = "LoraLinear::set_base_trainable: ";
    if (on && is_merged()) detail::fail(where, "the layer is merged; unmerge() first");
    if (on && w_.is_read_only()) detail::fail(where, "W is a read-only borrow; construct the layer with an owned or writable W");
    for (const auto& a : reg_.all())
      if (on && a.config.use_dora) detail::fail(where, "not supported with DoRA (adapter '", a.name, "' uses use_dora)");
    train_base_ = on;
    grad_W_ = on ? Mat::Zero(w_.rows(), w_.cols()) : Mat();
    reset_grad_bias();
    discard_cache("set_base_trainable");
  }
  bool base_trainable() const { return train_base_; }
  const Mat& grad_weight() const { return grad_W_; }  // W's layout; size 0 unless base_trainable()

  // ---- evaluation ------------------------------------------------------------------------
  // x (n, in) -> y (n, out). const and thread-safe; no dropout.
  //   y = b + x·Wᵀ + Σ_active s·(x·Aᵀ)·Bᵀ       (merged adapters are in W)
  Mat forward(const MatRef& x) const {
    Mat y;
    forward(x, y);
    return y;
  }

  // Writes into y, resized only when its shape differs: a reused y allocates nothing.
  void forward(const MatRef& x, Mat& y) const {
    check_input("forward", x);
    check_no_alias("forward", "Y", y, "X", x);
    y.resize(x.rows(), out_);
    const bool first = lora_first(x.rows(), reg_.active());
    if (!first) base(x, y);
    if (disabled_) return;
    thread_local Mat t;
    bool init = first;  // the next update writes y = b + s·t·Bᵀ
    for (const std::string& name : reg_.active()) {
      if (reg_.is_merged(name)) continue;
      const Adapter& a = adapter(name);
      if (detail::few_rows<Scalar>(t, Scalar(1), x, a.A, Scalar(0))) {
        detail::few_rows<Scalar>(y, a.s, t, a.B, Scalar(1));
      } else {
        detail::rank_cols_t<Scalar>(t, Scalar(1), x, a.A);
        detail::rank_update_t<Scalar>(y, a.s, t, a.B, !init, init && has_bias_ ? bias_.data() : nullptr);
        init = false;
      }
      if (a.config.use_dora) rescale(y, a.m.cwiseQuotient(norm_of(a)));
    }
    if (first) base(x, y, true);
  }

  // Mixed batch (PEFT's forward(x, adapter_names=...)): row i uses adapter names[i], or the base
  // alone for "__base__". The base GEMM runs once over all rows; then, per adapter, its rows are
  // gathered (used in place when contiguous), go through the two thin GEMMs, and are added back.
  // Nothing is merged. Disabled adapters give the base for every row, as in PEFT. Refused while
  // merged, for unknown names, a DoRA adapter, and names.size() != x.rows(). const, thread-safe.
  Mat forward(const MatRef& x, const std::vector<std::string>& names) const {
    Mat y;
    forward(x, names, y);
    return y;
  }

  void forward(const MatRef& x, const std::vector<std::string>& names, Mat& y) const;

  // ---- training (detail/linear_train.hpp, with the math) ----------------------------------
  // forward_train, x (n, in) -> y (n, out), as forward but with dropout, keeping what backward
  // needs (t = drop(x)·Aᵀ per adapter, x or drop(x)); backward, dy (n, out) -> dx (n, in),
  // consumes it and accumulates dA, dB (dm with DoRA, db and dW when trainable).
  Mat forward_train(const MatRef& x) {
    Mat y;
    forward_train(x, y);
    return y;
  }

  // Writes into y (not aliasing x), resized only when its shape differs.
  void forward_train(const MatRef& x, Mat& y) { train_forward(x, y, Keep::copy); }
  // With Keep::borrow the cache holds x's address: x stays alive and unchanged until backward
  // (a matrix, not a temporary: an expression would be evaluated into one).
  void forward_train(const Mat& x, Mat& y, Keep keep) { train_forward(x, y, keep); }
  void forward_train(Mat&&, Mat&, Keep) = delete;

 private:
  void train_forward(const MatRef& x, Mat& y, Keep keep);

 public:
  Mat backward(const MatRef& dy) {
    Mat dx;
    backward(dy, dx);
    return dx;
  }

  // Writes into dx (not aliasing dy) as mode says: set resizes it only when its shape differs,
  // add needs it (n, in), none leaves it alone.
  void backward(const MatRef& dy, Mat& dx, InputGrad mode = InputGrad::set);

  // True between a forward_train and the backward that consumes it (layers built from several
  // LoRA layers check all of them before any backward accumulates a gradient).
  bool ready_for_backward() const { return cache_.valid; }

  // Throws what backward(dy) would refuse for: no forward_train (or one discarded since), or dy
  // of the wrong shape.
  void check_backward(const MatRef& dy) const {
    const Cache& c = cache_;
    if (!c.valid && c.discarded_by)
      detail::fail("LoraLinear::backward: the forward_train cache was discarded by ", c.discarded_by,
                   "(), which changed the layer; call forward_train again");
    if (!c.valid)
      detail::fail("LoraLinear::backward: no forward_train to go back through (call forward_train first)");
    if (dy.rows() != c.n || dy.cols() != out_)
      detail::fail("LoraLinear::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ", detail::shape(c.n, out_));
  }

  // Restarts the sequences of dropout masks: after reseed(k), the first adapter draws the same
  // masks as the first adapter of a layer built with seed k; each adapter has its own stream.
  void reseed(std::uint64_t seed) {
    for (std::size_t i = 0; i < reg_.size(); ++i) reg_.all()[i].rng = dropout_rng(seed, i);
  }

  // An adapter's dropout stream, saved by checkpoints so that a resumed run draws the same masks.
  std::array<std::uint64_t, 4> dropout_state(const std::string& name) const { return reg_.at("dropout_state", name).rng.state(); }
  void set_dropout_state(const std::string& name, const std::array<std::uint64_t, 4>& state) {
    if (!reg_.at("set_dropout_state", name).rng.set_state(state)) detail::fail("LoraLinear::set_dropout_state: an all-zero state");
  }

  // Zeroes the gradients of every adapter (active or not) and of the base.
  void zero_grad() {
    for (auto& a : reg_.all()) {
      a.grad_A.setZero();
      a.grad_B.setZero();
      a.grad_m.setZero();
    }
    grad_bias_.setZero();
    grad_W_.setZero();
  }

  // The trainable tensors with their gradients, named as PEFT does: lora_A.<adapter> and
  // lora_B.<adapter> (lora_magnitude_vector.<adapter> with DoRA) of each active adapter (none
  // while disabled), bias in trainable mode, weight and bias when the base trains.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> p;
    for (const std::string& name : trained()) {
      Adapter& a = adapter(name);
      p.push_back(make_parameter("lora_A." + name, a.A, a.grad_A));
      p.push_back(make_parameter("lora_B." + name, a.B, a.grad_B));
      if (a.config.use_dora) p.push_back(make_parameter("lora_magnitude_vector." + name, a.m, a.grad_m));
    }
    if (train_base_) p.push_back({"weight", w_.writable(), MatMap(grad_W_.data(), w_.rows(), w_.cols())});
    if (grad_bias_.size()) p.push_back(make_parameter("bias", bias_, grad_bias_));
    return p;
  }

  Index trainable_parameters() const {
    Index n = (train_base_ ? out_ * in_ : 0) + grad_bias_.size();
    for (const std::string& name : trained()) {
      const Adapter& a = adapter(name);
      n += a.A.size() + a.B.size() + a.m.size();
    }
    return n;
  }
  Index frozen_parameters() const { return base_parameters() - (train_base_ ? out_ * in_ : 0) - grad_bias_.size(); }
  // What full fine-tuning of the base layer trains: W and b.
  Index base_parameters() const { return out_ * in_ + (has_bias_ ? out_ : 0); }

  // ---- merge -----------------------------------------------------------------------------
  // s·B·A (out, in), whatever the storage layout of W. (With DoRA, merge also rescales the rows.)
  Mat delta_weight() const { return delta_of(reg_.current("delta_weight")); }
  Mat delta_weight(const std::string& name) const { return delta_of(reg_.at("delta_weight", name)); }

  // W += s·B·A for each active adapter not merged yet (merge(names): those adapters, active or
  // not, as PEFT's merge(adapter_names)). No-op while adapters are disabled. With DoRA:
  // W ← c ⊙_rows (W + s·B·A). Unknown names are refused, changing nothing.
  void merge() { merge(reg_.active()); }
  void merge(const std::vector<std::string>& names);

  // As merge(), but computes the merged weight first and throws, changing nothing, if any value
  // is not finite.
  void safe_merge() { safe_merge(reg_.active()); }
  void safe_merge(const std::vector<std::string>& names);

  // Throws what merge() would refuse for, changing nothing.
  void check_merge() const { reg_.to_merge("merge", reg_.active(), disabled_); }

  // Throws what safe_merge() (safe_merge(names)) would refuse for, changing nothing; for merges
  // of several layers that must all succeed or none happen.
  void check_safe_merge() const { check_safe_merge(reg_.active()); }
  void check_safe_merge(const std::vector<std::string>& names) const;

  // Takes every merged adapter out of W (in reverse merge order; with exact_unmerge or a
  // read-only borrow W is restored exactly). No-op when nothing is merged.
  void unmerge();

 private:
  template <class>
  friend struct detail::SharedInput;

  // An adapter's settings, factors and gradients (PEFT's lora_A[name], lora_B[name], ...).
  struct Adapter {
    std::string name;
    LoraConfig config;
    Scalar s = 1;
    Mat A, B, grad_A, grad_B;
    Vec m, grad_m, dora_c;  // DoRA magnitude, its gradient, m / norm at merge time
    detail::Rng rng;        // dropout masks
  };

  // What backward needs from forward_train. adapters[k] belongs to the k-th trained adapter.
  struct AdapterCache {
    Mat xd, mask, t, g;  // drop(x) (n, in), its mask (p > 0), t = xd·Aᵀ (n, r); g = s·dy·B (backward's)
    Mat dbt;             // backward's dBᵀ (r, out)
    Mat z, d;            // DoRA: x·Wᵀ + s·t·Bᵀ, and dy ⊙ c
    Vec norm, c;         // DoRA: ‖W + s·B·A‖ per row, m / norm
  };
  struct Cache {
    Mat x;  // when an adapter has no dropout or the base trains, unless borrowed:
    bool x_borrowed = false;
    const Scalar* xb = nullptr;  // the borrowed x (n, in), its row stride
    Index xb_stride = 0;
    std::vector<AdapterCache> adapters;
    Index n = 0;
    bool valid = false;
    const char* discarded_by = nullptr;  // the call that discarded a valid cache
  };

  void setup(std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name) {
    const char* where = "LoraLinear: ";
    const Index rows = w_.rows(), cols = w_.cols();
    config.check(where);
    if (rows < 1 || cols < 1) detail::fail(where, "weight is ", detail::shape(rows, cols), ", expected a non-empty matrix");
    fan_in_fan_out_ = config.fan_in_fan_out;
    out_ = config.fan_in_fan_out ? cols : rows;
    in_ = config.fan_in_fan_out ? rows : cols;
    if (bias) {
      if (bias->size() != out_)
        detail::fail(where, "bias is (", bias->size(), "), expected (", out_, ") for a weight of ", detail::shape(rows, cols),
                     config.fan_in_fan_out ? " stored (in, out)" : "");
      bias_ = std::move(*bias);
      has_bias_ = true;
    } else if (config.bias == BiasMode::trainable) {
      detail::fail(where, "bias mode is trainable but the layer has no bias");
    }
    add_adapter(adapter_name, config);
    reg_.set_active({adapter_name});
  }

  // A config for adapter `name` (new or replaced): valid, the layer's storage layout, and the
  // bias mode and exact_unmerge of the layer's other adapters.
  void check_adapter_config(const char* where, const std::string& name, const LoraConfig& config) const;

  // Fresh A, B (initialised as config says), zero gradients, scaling, dropout stream.
  void init_adapter(Adapter& a, const LoraConfig& config, std::size_t index);

  // The layer-wide settings follow the adapters' (all equal, see check_adapter_config).
  void after_config_change(const char* fn);

  void reset_grad_bias() {
    const bool on = has_bias_ && (bias_mode_ == BiasMode::trainable || train_base_);
    if (grad_bias_.size() != (on ? out_ : 0)) grad_bias_ = Vec::Zero(on ? out_ : 0);
  }

  // forward_train's x, copied or borrowed.
  MatRef cached_x() const {
    const Cache& c = cache_;
    if (!c.x_borrowed) return MatRef(c.x);
    return MatRef(Eigen::Map<const Mat, 0, Eigen::OuterStride<>>(c.xb, c.n, in_, Eigen::OuterStride<>(c.xb_stride)));
  }

  void discard_cache(const char* fn) {
    if (cache_.valid) cache_.discarded_by = fn;
    cache_.valid = false;
  }

  static detail::Rng dropout_rng(std::uint64_t seed, std::size_t index) {  // a stream apart from init's
    return detail::Rng(seed ^ 0xd1b54a32d192ed03ULL ^ (0x9e3779b97f4a7c15ULL * index));
  }

  // The adapters forward_train and backward train: the active ones, none while disabled.
  const std::vector<std::string>& trained() const {
    static const std::vector<std::string> none;
    return disabled_ ? none : reg_.active();
  }
  // A known adapter (names from the registry's own lists).
  const Adapter& adapter(const std::string& name) const { return reg_.all()[reg_.find(name)]; }
  Adapter& adapter(const std::string& name) { return reg_.all()[reg_.find(name)]; }

  // Before the first adapter merges: a read-only borrow gets its private copy; exact mode saves W.
  void begin_merge() {
    if (!is_merged()) w_.begin_merge(exact_unmerge_);
  }

  // W with adapters todo merged, computed aside; throws (naming fn) if a value is not finite.
  // kept, when given, receives each adapter's DoRA scale.
  Mat merged_weight(const char* fn, const std::vector<std::size_t>& todo, std::vector<Vec>* kept) const;

  // w ← w + s·B·A, then with DoRA w ← c ⊙_rows w; returns c (empty without DoRA).
  Vec merge_delta(const Adapter& a, MatMap w) const;

  // ‖W + s·B·A‖ per output row of adapter a.
  Vec norm_of(const Adapter& a) const { return detail::dora_norm<Scalar>(weight(), fan_in_fan_out_, a.A, a.B, a.s); }

  Mat delta_of(const Adapter& a) const {
    Mat d(out_, in_);
    d.noalias() = a.s * a.B * a.A;
    return d;
  }

  void set_magnitude(Adapter& a, const Vec& m) {
    const char* where = "LoraLinear::set_lora_magnitude: ";
    if (!a.config.use_dora) detail::fail(where, "adapter '", a.name, "' does not use DoRA (config.use_dora)");
    if (reg_.is_merged(a.name)) detail::fail(where, "adapter '", a.name, "' is merged; unmerge() before changing m");
    if (m.size() != out_) detail::fail(where, "m is (", m.size(), "), expected (", out_, ")");
    a.m = m;
    discard_cache("set_lora_magnitude");
  }

  void scale_outputs(MatMap w, const Vec& f) const { detail::scale_outputs<Scalar>(w, fan_in_fan_out_, f); }
  void rescale(Mat& y, const Vec& c) const { detail::rescale_outputs<Scalar>(y, has_bias_ ? &bias_ : nullptr, c); }

  // w += sign·s·B·A in W's storage layout, as one GEMM, no (out, in) temporary.
  void add_delta(MatMap w, const Adapter& a, Scalar sign) const;

  void check_input(const char* fn, const MatRef& x) const {
    if (x.cols() != in_)
      detail::fail("LoraLinear::", fn, ": X is ", detail::shape(x.rows(), x.cols()), ", expected (n, ", in_, ")");
  }

  // An output buffer that overlaps the input would be overwritten while it is read.
  static void check_no_alias(const char* fn, const char* out_name, const Mat& out, const char* in_name, const MatRef& in) {
    const Scalar* in_end = in.data() + (in.rows() - 1) * in.outerStride() + in.cols();
    if (out.size() > 0 && in.size() > 0 && out.data() < in_end && in.data() < out.data() + out.size())
      detail::fail("LoraLinear::", fn, ": the output ", out_name, " shares memory with the input ", in_name,
                   "; pass a separate buffer");
  }

  // The LoRA products before the base one, y = b + Σ s·(x·Aᵀ)·Bᵀ and then y += x·Wᵀ, when some of
  // the adapters are unmerged, none is DoRA (which rescales b + x·Wᵀ + LoRA) and the rows are more
  // than few_rows takes: the base GEMM reads y as it writes it (β = 1), where an update of its
  // own after it passes over y once more (n 512, d 512, r 8, two threads, no bias: the unmerged
  // forward 1.026-1.033 of the merged one against 1.046-1.051).
  bool lora_first(Index n, const std::vector<std::string>& names) const {
    if (disabled_ || n <= detail::kFewRows) return false;
    bool any = false;
    for (const std::string& name : names) {
      if (reg_.is_merged(name)) continue;
      if (adapter(name).config.use_dora) return false;
      any = true;
    }
    return any;
  }

  // y = x·Wᵀ + b (add: y += x·Wᵀ); without a bias the product writes y directly (no pass that
  // zeroes it first).
  void base(const MatRef& x, Mat& y, bool add = false) const {
    if (!fan_in_fan_out_ && x.rows() <= detail::kFewRows) {  // decoding: W read in place
      if (has_bias_ && !add) y.rowwise() = bias_.transpose();
      if (detail::few_rows<Scalar>(y, Scalar(1), x, weight(), Scalar(has_bias_ || add ? 1 : 0))) return;
    }
    if (has_bias_ || add) {
      if (!add) y.rowwise() = bias_.transpose();
      if (fan_in_fan_out_)
        y.noalias() += x * weight();
      else
        y.noalias() += x * weight().transpose();
    } else if (fan_in_fan_out_) {
      y.noalias() = x * weight();
    } else {
      y.noalias() = x * weight().transpose();
    }
  }

  void set_factor(const char* fn, const char* what, const MatRef& v, Adapter& a);

  Index in_ = 0, out_ = 0;
  bool fan_in_fan_out_ = false;
  bool exact_unmerge_ = false;
  BiasMode bias_mode_ = BiasMode::frozen;
  detail::WeightStorage<Scalar> w_;
  bool disabled_ = false;
  bool train_base_ = false;
  Mat grad_W_;
  Vec bias_;
  bool has_bias_ = false;
  Vec grad_bias_;
  detail::AdapterRegistry<Adapter> reg_{"LoraLinear"};
  Cache cache_;
};

}  // namespace lora

// Out-of-class definitions: the named adapters, merging, the mixed-batch forward and training.
#include <lora/detail/linear_adapters.hpp>
#include <lora/detail/linear_merge.hpp>
#include <lora/detail/linear_mixed_batch.hpp>
#include <lora/detail/linear_shared_input.hpp>
#include <lora/detail/linear_train.hpp>
