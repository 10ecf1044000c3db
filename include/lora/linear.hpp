// LoraLinear<Scalar>: a frozen linear layer W (out, in) + b with a trainable low-rank update.
//
//   y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        x (n, in) -> y (n, out)
//   A (r, in), B (out, r), s = alpha/r (alpha/sqrt(r) with rsLoRA)
//
// B·A is never formed in a forward pass: the LoRA branch is two thin GEMMs through (n, r).
// Only A and B (and, in BiasMode::trainable, b) are trainable; W's bytes never change except
// through merge/unmerge.
//
// Weight storage. The layer owns W, or borrows it:
//   - a writable borrow (MatMap) is used in place; merge writes into the caller's memory;
//   - a read-only borrow (ConstMatMap, e.g. a mapped safetensors tensor) is never written:
//     merge copies W into the layer first (copy on write) and unmerge drops the copy, going back
//     to the borrowed bytes, which restores W exactly.
// With fan_in_fan_out (GPT-2's Conv1D) W is stored (in, out); the math is the same.
//
// Named adapters. A layer holds any number of adapters by name (PEFT's lora_A[name]); the
// constructor makes the first ("default"), add_adapter/update_layer more, set_adapter picks the
// active ones (their updates sum), delete_adapter removes one. forward(x, adapter_names) serves a
// mixed batch, one adapter per row, without merging.
//
// Merge state. merge() adds s·B·A of the active adapters to W, after which forward is one GEMM;
// unmerge() subtracts them all. Merging a merged adapter and unmerging with nothing merged are
// no-ops (PEFT's behaviour), so W is never doubly merged. In floating point, W + Δ − Δ need not
// equal W; with exact_unmerge the layer keeps a copy of W while merged and unmerge restores it
// bit-for-bit. Training (forward_train/backward) is an error while merged, and so is setting A
// or B of a merged adapter: unmerge first.
#pragma once

#include <lora/dropout.hpp>
#include <lora/error.hpp>
#include <lora/init.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

enum class BiasMode {
  frozen,     // PEFT bias="none": b is part of the frozen base
  trainable,  // PEFT bias="lora_only": b of this layer is trained with A and B
};

struct LoraConfig {
  int r = 8;
  double alpha = 8;
  double dropout = 0;  // p in [0, 1), on the LoRA branch's input only
  bool use_rslora = false;
  BiasMode bias = BiasMode::frozen;
  Init init = Init::kaiming;
  std::uint64_t seed = 0;       // for init and dropout masks
  bool fan_in_fan_out = false;  // W is given as (in, out), GPT-2 Conv1D style
  bool exact_unmerge = false;   // keep W while merged so unmerge restores it bit-for-bit
  bool use_dora = false;        // DoRA: a trainable magnitude per output (PEFT's use_dora)

  double scaling() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r; }
};

// A trainable tensor and its gradient, for optimizers. Views into the layer.
template <class Scalar>
struct Parameter {
  std::string name;
  MatMap<Scalar> value;
  MatMap<Scalar> grad;
};

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
      : w_own_(std::move(weight)), use_own_(true) {
    setup(w_own_.rows(), w_own_.cols(), std::move(bias), config, adapter_name);
  }
  // Writable borrow: the caller keeps the memory alive; merge writes into it.
  LoraLinear(MatMap weight, std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name = kDefault)
      : w_borrow_(weight.data()) {
    setup(weight.rows(), weight.cols(), std::move(bias), config, adapter_name);
  }
  // Read-only borrow: the caller keeps the memory alive; it is never written (merge copies).
  LoraLinear(ConstMatMap weight, std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name = kDefault)
      : w_borrow_ro_(weight.data()) {
    setup(weight.rows(), weight.cols(), std::move(bias), config, adapter_name);
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  bool fan_in_fan_out() const { return fan_in_fan_out_; }
  bool has_bias() const { return has_bias_; }
  // True while any adapter is merged into W.
  bool is_merged() const { return !merged_.empty(); }
  // True while W is memory the layer does not own.
  bool is_borrowed() const { return !use_own_; }

  // W as stored: (out, in), or (in, out) with fan_in_fan_out. Holds the merged adapters.
  ConstMatMap weight() const { return ConstMatMap(wdata(), w_rows_, w_cols_); }
  const Vec& bias() const { return bias_; }  // size 0 when the layer has none

  // ---- named adapters (PEFT's ModuleDicts lora_A[name], lora_B[name]) ----------------------
  // A layer holds any number of adapters by name, each with its own r, alpha, rsLoRA flag,
  // dropout, init, seed and DoRA flag. The active ones (set_adapter) sum their updates in
  // forward and are the ones trained; the others are kept but unused. Adding, selecting and
  // deleting never touch W, except that set_adapter unmerges first when something is merged
  // (as PEFT's LoraModel.set_adapter does).
  // fan_in_fan_out is the layer's (how W is stored); the bias mode and exact_unmerge must be
  // the same for every adapter of a layer. A DoRA adapter is active or merged only alone.
  //
  // The calls without a name (rank(), lora_A(), set_lora_A(), update_layer(config), ...) act
  // on the one active adapter and are refused when none or several are active.

  // Adapter names in the order they were added.
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> v;
    for (const auto& a : adapters_) v.push_back(a.name);
    return v;
  }
  bool has_adapter(const std::string& name) const { return find(name) >= 0; }
  const std::vector<std::string>& active_adapters() const { return active_; }
  // The name of the one active adapter (refused when none or several are active).
  const std::string& active_adapter() const { return current("active_adapter").name; }
  // Merged adapters, in merge order.
  const std::vector<std::string>& merged_adapters() const { return merged_; }
  bool is_merged(const std::string& name) const {
    return std::find(merged_.begin(), merged_.end(), at("is_merged", name).name) != merged_.end();
  }

  // A new adapter `name` (not yet active) from config, with fresh A and B (config.init) and
  // zero gradients. Refused for a name the layer has, an empty name or "__base__".
  void add_adapter(const std::string& name, const LoraConfig& config) {
    const char* where = "LoraLinear::add_adapter: ";
    check_name(where, name);
    if (find(name) >= 0) detail::fail(where, "adapter '", name, "' already exists; delete_adapter it first or call update_layer");
    check_adapter_config(where, name, config);
    Adapter a;
    a.name = name;
    init_adapter(a, config, adapters_.size());
    adapters_.push_back(std::move(a));
    after_config_change();
  }

  // PEFT's update_layer: adapter `name` gets a fresh A and B from config, replacing the one of
  // that name or adding it (not active) when the layer has none. W and b are untouched.
  // Refused for a merged adapter, a config that changes fan_in_fan_out (how W is stored) or
  // disagrees with the other adapters' bias mode or exact_unmerge, and a trainable bias the
  // layer does not have. A refusal changes nothing.
  void update_layer(const std::string& name, const LoraConfig& config) {
    const int i = find(name);
    if (i < 0) return add_adapter(name, config);
    const char* where = "LoraLinear::update_layer: ";
    if (is_merged(name)) detail::fail(where, "adapter '", name, "' is merged; unmerge() first");
    check_adapter_config(where, name, config);
    if (config.use_dora && active_.size() > 1 && is_active(name))
      detail::fail(where, "adapter '", name, "' is active with others; a DoRA adapter can only be active alone");
    init_adapter(adapters_[i], config, static_cast<std::size_t>(i));
    after_config_change();
  }
  void update_layer(const LoraConfig& config) {
    const std::string name = current("update_layer").name;
    update_layer(name, config);
  }

  // PEFT's set_adapter: these adapters become the active ones (in this order). Unmerges first.
  // Unknown or repeated names are refused, changing nothing.
  void set_adapter(const std::vector<std::string>& names) {
    const char* where = "LoraLinear::set_adapter: ";
    for (std::size_t k = 0; k < names.size(); ++k) {
      at("set_adapter", names[k]);
      if (std::find(names.begin(), names.begin() + k, names[k]) != names.begin() + k)
        detail::fail(where, "adapter '", names[k], "' is named twice");
    }
    check_dora_alone(where, names);
    unmerge();
    active_ = names;
    cache_.valid = false;
  }
  void set_adapter(std::initializer_list<std::string> names) { set_adapter(std::vector<std::string>(names)); }
  void set_adapter(const std::string& name) { set_adapter(std::vector<std::string>{name}); }

  // Removes adapter `name`. Refused while it is merged (unmerge() first). An active adapter
  // leaves the active set; no other adapter is activated in its place.
  void delete_adapter(std::string name) {
    const Adapter& a = at("delete_adapter", name);
    if (is_merged(name)) detail::fail("LoraLinear::delete_adapter: adapter '", name, "' is merged; unmerge() first");
    active_.erase(std::remove(active_.begin(), active_.end(), a.name), active_.end());
    adapters_.erase(adapters_.begin() + find(name));
    cache_.valid = false;
  }

  // The one active adapter's settings and tensors (or a named adapter's).
  const LoraConfig& config() const { return current("config").config; }
  const LoraConfig& config(const std::string& name) const { return at("config", name).config; }
  int rank() const { return current("rank").config.r; }
  int rank(const std::string& name) const { return at("rank", name).config.r; }
  Scalar scaling() const { return current("scaling").s; }
  Scalar scaling(const std::string& name) const { return at("scaling", name).s; }
  const Mat& lora_A() const { return current("lora_A").A; }
  const Mat& lora_A(const std::string& name) const { return at("lora_A", name).A; }
  const Mat& lora_B() const { return current("lora_B").B; }
  const Mat& lora_B(const std::string& name) const { return at("lora_B", name).B; }
  const Mat& grad_A() const { return current("grad_A").grad_A; }
  const Mat& grad_A(const std::string& name) const { return at("grad_A", name).grad_A; }
  const Mat& grad_B() const { return current("grad_B").grad_B; }
  const Mat& grad_B(const std::string& name) const { return at("grad_B", name).grad_B; }
  const Vec& grad_bias() const { return grad_bias_; }  // size 0 unless BiasMode::trainable or base_trainable()

  // A (r, in) and B (out, r). Refused while that adapter is merged (W would no longer match).
  void set_lora_A(const MatRef& a) { set_factor("set_lora_A", "A", a, current("set_lora_A")); }
  void set_lora_A(const std::string& name, const MatRef& a) { set_factor("set_lora_A", "A", a, at("set_lora_A", name)); }
  void set_lora_B(const MatRef& b) { set_factor("set_lora_B", "B", b, current("set_lora_B")); }
  void set_lora_B(const std::string& name, const MatRef& b) { set_factor("set_lora_B", "B", b, at("set_lora_B", name)); }

  // ---- DoRA (config.use_dora) ------------------------------------------------------------
  // PEFT's DoRA: a magnitude m (out), initialised to the norms below, rescales every output:
  //   norm = ‖W + s·B·A‖ per output row (L2 over in), c = m / norm
  //   y = b + c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)          (PEFT: x·Wᵀ + b + (c − 1)⊙x·Wᵀ + c⊙s·(x·Aᵀ)·Bᵀ)
  // norm is a constant in backward (detached, DoRA paper §4.3): with z = x·Wᵀ + s·t·Bᵀ,
  //   dm += Σ_rows dy ⊙ z / norm, and A, B, x get the plain LoRA gradients of dy ⊙ c.
  // Merged, W' = c ⊙_rows (W + s·B·A). norm is computed as ‖w‖² + 2s·w·(Aᵀb) + s²·bᵀ(A·Aᵀ)b
  // per row, so no (out, in) matrix is formed. Not supported with dropout, a trainable base,
  // other active or merged adapters, or in a mixed batch (PEFT refuses that too).
  bool use_dora() const { return current("use_dora").config.use_dora; }
  const Vec& lora_magnitude() const { return current("lora_magnitude").m; }  // size 0 without DoRA
  const Vec& lora_magnitude(const std::string& name) const { return at("lora_magnitude", name).m; }
  const Vec& grad_magnitude() const { return current("grad_magnitude").grad_m; }
  const Vec& grad_magnitude(const std::string& name) const { return at("grad_magnitude", name).grad_m; }
  void set_lora_magnitude(const Vec& m) { set_magnitude(current("set_lora_magnitude"), m); }
  void set_lora_magnitude(const std::string& name, const Vec& m) { set_magnitude(at("set_lora_magnitude", name), m); }

  // ‖W + s·B·A‖ per output row (W without merged adapters).
  Vec weight_norm() const { return norm_of(current("weight_norm")); }
  Vec weight_norm(const std::string& name) const { return norm_of(at("weight_norm", name)); }

  // Replaces the base weight, as stored ((out, in), or (in, out) with fan_in_fan_out); for
  // initialisations that move part of W into A and B (PiSSA, OLoRA in svd.hpp). A writable
  // borrow is written in place. Refused while merged and for a read-only borrow.
  void set_weight(const MatRef& w) {
    if (is_merged()) detail::fail("LoraLinear::set_weight: the layer is merged; unmerge() before changing W");
    if (w_borrow_ro_ && !use_own_)
      detail::fail("LoraLinear::set_weight: W is a read-only borrow; construct the layer with an owned or writable W");
    if (w.rows() != w_rows_ || w.cols() != w_cols_)
      detail::fail("LoraLinear::set_weight: W is ", detail::shape(w.rows(), w.cols()), ", expected ", detail::shape(w_rows_, w_cols_));
    writable_weight() = w;
    cache_.valid = false;
  }

  // PEFT's enable_adapters / disable_adapters: a disabled layer computes the base alone,
  // y = x·Wᵀ + b, and trains nothing of A and B (parameters() leaves them out). Disabling a
  // merged layer unmerges it first (as PEFT does).
  void enable_adapters(bool enabled) {
    if (!enabled) unmerge();
    disabled_ = !enabled;
    cache_.valid = false;
  }
  bool disable_adapters() const { return disabled_; }

  // Full fine-tuning: W and b become trainable too (backward accumulates grad_weight and
  // grad_bias, parameters() lists them). Off by default: LoRA training never changes W. Refused
  // while merged, for a read-only borrowed W and with a DoRA adapter.
  void set_base_trainable(bool on) {
    const char* where = "LoraLinear::set_base_trainable: ";
    if (on && is_merged()) detail::fail(where, "the layer is merged; unmerge() first");
    if (on && w_borrow_ro_ && !use_own_)
      detail::fail(where, "W is a read-only borrow; construct the layer with an owned or writable W");
    for (const auto& a : adapters_)
      if (on && a.config.use_dora) detail::fail(where, "not supported with DoRA (adapter '", a.name, "' uses use_dora)");
    train_base_ = on;
    grad_W_ = on ? Mat::Zero(w_rows_, w_cols_) : Mat();
    reset_grad_bias();
    cache_.valid = false;
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
    init_with_bias(y);
    add_base(x, y);
    if (disabled_) return;
    thread_local Mat t;
    for (const std::string& name : active_) {
      if (is_merged(name)) continue;
      const Adapter& a = adapters_[find(name)];
      t.noalias() = x * a.A.transpose();
      y.noalias() += a.s * t * a.B.transpose();
      if (a.config.use_dora) rescale(y, a.m.cwiseQuotient(norm_of(a)));
    }
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

  void forward(const MatRef& x, const std::vector<std::string>& names, Mat& y) const {
    const char* where = "LoraLinear::forward (mixed batch): ";
    check_input("forward", x);
    check_no_alias("forward", "Y", y, "X", x);
    if (static_cast<Index>(names.size()) != x.rows())
      detail::fail(where, names.size(), " adapter names for ", x.rows(), " rows of X; give one per row");
    if (is_merged()) detail::fail(where, "the layer is merged; unmerge() before serving a mixed batch");
    thread_local std::vector<int> which;  // adapter of each row, -1 for the base
    which.resize(names.size());
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (names[i] == kBase) {
        which[i] = -1;
        continue;
      }
      which[i] = find(names[i]);
      if (which[i] < 0) detail::fail(where, "row ", i, ": no adapter '", names[i], "' (the layer has ", list(adapter_names()), ")");
      if (adapters_[which[i]].config.use_dora)
        detail::fail(where, "row ", i, ": adapter '", names[i], "' uses DoRA, which a mixed batch does not support");
    }
    y.resize(x.rows(), out_);
    init_with_bias(y);
    add_base(x, y);
    if (disabled_) return;
    // Rows grouped by adapter (a counting sort keeps each group in row order).
    thread_local std::vector<Index> start, rows;
    start.assign(adapters_.size() + 1, 0);
    for (int w : which)
      if (w >= 0) ++start[w + 1];
    for (std::size_t k = 0; k < adapters_.size(); ++k) start[k + 1] += start[k];
    rows.resize(start.back());
    thread_local std::vector<Index> fill;
    fill.assign(start.begin(), start.end() - 1);
    for (std::size_t i = 0; i < which.size(); ++i)
      if (which[i] >= 0) rows[fill[which[i]]++] = static_cast<Index>(i);
    // Each group writes only its own rows of y, so groups run in parallel (one thread each, with
    // its own buffers); the base GEMM above used all threads.
    thread_local std::vector<int> groups;
    groups.clear();
    for (std::size_t k = 0; k < adapters_.size(); ++k)
      if (start[k + 1] > start[k]) groups.push_back(static_cast<int>(k));
    const int ng = static_cast<int>(groups.size());
    const std::vector<Index>& row = rows;  // thread_locals are per thread: pass the caller's by reference
    const std::vector<Index>& first = start;
    const std::vector<int>& group = groups;
#pragma omp parallel for schedule(dynamic) if (ng > 1 && row.size() * std::size_t(in_) >= (1u << 16))
    for (int g = 0; g < ng; ++g) add_group(x, adapters_[group[g]], row.data() + first[group[g]], first[group[g] + 1] - first[group[g]], y);
  }

  // ---- training --------------------------------------------------------------------------
  // forward_train, x (n, in) -> y (n, out), keeps for each active adapter:
  //   xd = drop(x) (n, in) and mask (n, in) (p > 0 only), t = xd·Aᵀ (n, r); and x itself once
  //   when an adapter has p = 0 or the base trains
  //   y  = b + x·Wᵀ + Σ s·t·Bᵀ
  // backward, dy (n, out) -> dx (n, in), consumes the cache; for each active adapter:
  //   dB += s·dyᵀ·t      g = s·dy·B (n, r)      dA += gᵀ·xd      db += Σ_rows dy (trainable bias)
  //   dx  = dy·W + Σ mask ⊙ (g·A)               dW += dyᵀ·x (base_trainable)
  // With adapters disabled only the base terms remain.
  Mat forward_train(const MatRef& x) {
    Mat y;
    forward_train(x, y);
    return y;
  }

  // Writes into y (not aliasing x), resized only when its shape differs.
  void forward_train(const MatRef& x, Mat& y) {
    check_input("forward_train", x);
    check_no_alias("forward_train", "Y", y, "X", x);
    if (is_merged()) detail::fail("LoraLinear::forward_train: the layer is merged; call unmerge() before training");
    Cache& c = cache_;
    c.n = x.rows();
    bool keep_x = train_base_;
    if (!disabled_)
      for (const std::string& name : active_) keep_x = keep_x || adapters_[find(name)].config.dropout == 0;
    if (keep_x) c.x = x;
    y.resize(x.rows(), out_);
    init_with_bias(y);
    add_base(x, y);
    c.valid = true;
    if (disabled_) return;
    for (const std::string& name : active_) {
      Adapter& a = adapters_[find(name)];
      if (a.config.dropout > 0) {
        dropout_mask(a.mask, x.rows(), in_, a.config.dropout, a.rng);
        a.xd = x.cwiseProduct(a.mask);
      }
      a.t.noalias() = (a.config.dropout > 0 ? MatRef(a.xd) : x) * a.A.transpose();
      y.noalias() += a.s * a.t * a.B.transpose();
      if (a.config.use_dora) {  // the only active adapter
        a.norm = norm_of(a);
        a.c = a.m.cwiseQuotient(a.norm);
        a.z = y;
        if (has_bias_) a.z.rowwise() -= bias_.transpose();
        rescale(y, a.c);
      }
    }
  }

  Mat backward(const MatRef& dy) {
    Mat dx;
    backward(dy, dx);
    return dx;
  }

  // Writes into dx (not aliasing dy), resized only when its shape differs.
  void backward(const MatRef& dy, Mat& dx) {
    Cache& c = cache_;
    if (!c.valid)
      detail::fail("LoraLinear::backward: no forward_train to go back through (call forward_train first; "
                   "changing the adapters in between discards it)");
    if (dy.rows() != c.n || dy.cols() != out_)
      detail::fail("LoraLinear::backward: dY is ", detail::shape(dy.rows(), dy.cols()), ", expected ",
                   detail::shape(c.n, out_));
    check_no_alias("backward", "dX", dx, "dY", dy);
    if (grad_bias_.size()) grad_bias_ += dy.colwise().sum().transpose();
    if (train_base_) {
      if (fan_in_fan_out_)
        grad_W_.noalias() += c.x.transpose() * dy;
      else
        grad_W_.noalias() += dy.transpose() * c.x;
    }
    Adapter* dora = nullptr;
    if (!disabled_ && active_.size() == 1 && adapters_[find(active_[0])].config.use_dora) dora = &adapters_[find(active_[0])];
    if (dora) {  // dm += Σ_rows dy ⊙ z / norm; the rest is LoRA's backward of dy ⊙ c
      dora->grad_m += (dy.array() * dora->z.array()).colwise().sum().matrix().transpose().cwiseQuotient(dora->norm);
      dora->d = dy.array().rowwise() * dora->c.transpose().array();
    }
    const MatRef e = dora ? MatRef(dora->d) : dy;
    dx.resize(dy.rows(), in_);
    if (fan_in_fan_out_)
      dx.noalias() = e * weight().transpose();
    else
      dx.noalias() = e * weight();
    c.valid = false;
    if (disabled_) return;
    for (const std::string& name : active_) {
      Adapter& a = adapters_[find(name)];
      a.grad_B.noalias() += a.s * e.transpose() * a.t;
      a.g.noalias() = a.s * e * a.B;
      if (a.config.dropout > 0) {
        a.grad_A.noalias() += a.g.transpose() * a.xd;
        a.xd.noalias() = a.g * a.A;  // xd is no longer needed: reuse it for g·A
        dx += a.mask.cwiseProduct(a.xd);
      } else {
        a.grad_A.noalias() += a.g.transpose() * c.x;
        dx.noalias() += a.g * a.A;
      }
    }
  }

  // Restarts the sequences of dropout masks: after reseed(k), the first adapter draws the same
  // masks as the first adapter of a layer built with seed k; each adapter has its own stream.
  void reseed(std::uint64_t seed) {
    for (std::size_t i = 0; i < adapters_.size(); ++i) adapters_[i].rng = dropout_rng(seed, i);
  }

  // Zeroes the gradients of every adapter (active or not) and of the base.
  void zero_grad() {
    for (auto& a : adapters_) {
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
    if (!disabled_)
      for (const std::string& name : active_) {
        Adapter& a = adapters_[find(name)];
        p.push_back({"lora_A." + name, MatMap(a.A.data(), a.A.rows(), a.A.cols()), MatMap(a.grad_A.data(), a.A.rows(), a.A.cols())});
        p.push_back({"lora_B." + name, MatMap(a.B.data(), a.B.rows(), a.B.cols()), MatMap(a.grad_B.data(), a.B.rows(), a.B.cols())});
        if (a.config.use_dora)
          p.push_back({"lora_magnitude_vector." + name, MatMap(a.m.data(), 1, out_), MatMap(a.grad_m.data(), 1, out_)});
      }
    if (train_base_) p.push_back({"weight", writable_weight(), MatMap(grad_W_.data(), w_rows_, w_cols_)});
    if (grad_bias_.size()) p.push_back({"bias", MatMap(bias_.data(), 1, out_), MatMap(grad_bias_.data(), 1, out_)});
    return p;
  }

  Index trainable_parameters() const {
    Index n = (train_base_ ? out_ * in_ : 0) + grad_bias_.size();
    if (!disabled_)
      for (const std::string& name : active_) {
        const Adapter& a = adapters_[find(name)];
        n += a.A.size() + a.B.size() + a.m.size();
      }
    return n;
  }
  Index frozen_parameters() const { return base_parameters() - (train_base_ ? out_ * in_ : 0) - grad_bias_.size(); }
  // What full fine-tuning of the base layer trains: W and b.
  Index base_parameters() const { return out_ * in_ + (has_bias_ ? out_ : 0); }

  // ---- merge -----------------------------------------------------------------------------
  // s·B·A (out, in), whatever the storage layout of W. (With DoRA, merge also rescales the rows.)
  Mat delta_weight() const { return delta_of(current("delta_weight")); }
  Mat delta_weight(const std::string& name) const { return delta_of(at("delta_weight", name)); }

  // W += s·B·A for each active adapter not merged yet (merge(names): those adapters, active or
  // not, as PEFT's merge(adapter_names)). No-op while adapters are disabled. With DoRA:
  // W ← c ⊙_rows (W + s·B·A). Unknown names are refused, changing nothing.
  void merge() { merge(active_); }
  void merge(const std::vector<std::string>& names) {
    const std::vector<std::size_t> todo = to_merge("merge", names);
    if (todo.empty()) return;
    begin_merge();
    for (std::size_t i : todo) merge_one(adapters_[i], writable_weight());
  }

  // As merge(), but computes the merged weight first and throws, changing nothing, if any value
  // is not finite.
  void safe_merge() { safe_merge(active_); }
  void safe_merge(const std::vector<std::string>& names) {
    const std::vector<std::size_t> todo = to_merge("safe_merge", names);
    if (todo.empty()) return;
    Mat merged = weight();
    std::vector<Vec> kept;
    for (std::size_t i : todo) kept.push_back(merge_delta(adapters_[i], MatMap(merged.data(), w_rows_, w_cols_)));
    if (!merged.allFinite())
      detail::fail("LoraLinear::safe_merge: the merged weight has non-finite values; W is unchanged");
    begin_merge();
    writable_weight() = merged;
    for (std::size_t k = 0; k < todo.size(); ++k) {
      adapters_[todo[k]].dora_c = std::move(kept[k]);
      merged_.push_back(adapters_[todo[k]].name);
    }
  }

  // Takes every merged adapter out of W (in reverse merge order; with exact_unmerge or a
  // read-only borrow W is restored exactly). No-op when nothing is merged.
  void unmerge() {
    if (merged_.empty()) return;
    if (w_borrow_ro_) {
      use_own_ = false;  // back to the untouched borrowed bytes
      w_own_.resize(0, 0);
    } else if (exact_unmerge_) {
      writable_weight() = w_saved_;
      w_saved_.resize(0, 0);
    } else {
      MatMap w = writable_weight();
      for (auto it = merged_.rbegin(); it != merged_.rend(); ++it) {
        const Adapter& a = adapters_[find(*it)];
        if (a.config.use_dora) scale_outputs(w, a.dora_c.cwiseInverse());  // W' / c, with c from merge time
        add_delta(w, a, Scalar(-1));
      }
    }
    merged_.clear();
  }

 private:
  struct Adapter {
    std::string name;
    LoraConfig config;
    Scalar s = 1;
    Mat A, B, grad_A, grad_B;
    Vec m, grad_m, dora_c;  // DoRA magnitude, its gradient, m / norm at merge time
    detail::Rng rng;        // dropout masks
    // Training cache, forward_train -> backward.
    Mat xd, mask, t, g;
    Mat z, d;     // DoRA: x·Wᵀ + s·t·Bᵀ, and dy ⊙ c
    Vec norm, c;  // DoRA: ‖W + s·B·A‖ per row, m / norm
  };

  struct Cache {
    Mat x;  // when an adapter has no dropout or the base trains
    Index n = 0;
    bool valid = false;
  };

  void setup(Index rows, Index cols, std::optional<Vec> bias, const LoraConfig& config, const std::string& adapter_name) {
    const char* where = "LoraLinear: ";
    check_config(where, config);
    if (rows < 1 || cols < 1) detail::fail(where, "weight is ", detail::shape(rows, cols), ", expected a non-empty matrix");
    w_rows_ = rows;
    w_cols_ = cols;
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
    active_ = {adapter_name};
  }

  static void check_config(const char* where, const LoraConfig& config) {
    if (config.r < 1) detail::fail(where, "r is ", config.r, ", expected r >= 1");
    if (!std::isfinite(config.alpha) || config.alpha <= 0)
      detail::fail(where, "alpha is ", config.alpha, ", expected a finite value > 0");
    if (!(config.dropout >= 0 && config.dropout < 1))
      detail::fail(where, "dropout is ", config.dropout, ", expected 0 <= p < 1");
    if (config.use_dora && config.dropout > 0)
      detail::fail(where, "use_dora with dropout ", config.dropout, " is not supported (DoRA needs dropout 0)");
  }

  static void check_name(const char* where, const std::string& name) {
    if (name.empty()) detail::fail(where, "the adapter name is empty");
    if (name == kBase) detail::fail(where, "'", kBase, "' is reserved for rows without an adapter");
  }

  // A config for adapter `name` (new or replaced): valid, the layer's storage layout, and the
  // bias mode and exact_unmerge of the layer's other adapters.
  void check_adapter_config(const char* where, const std::string& name, const LoraConfig& config) const {
    check_config(where, config);
    if (config.fan_in_fan_out != fan_in_fan_out_)
      detail::fail(where, "fan_in_fan_out is ", config.fan_in_fan_out, ", the layer's weight was given with ", fan_in_fan_out_);
    if (config.bias == BiasMode::trainable && !has_bias_)
      detail::fail(where, "bias mode is trainable but the layer has no bias");
    if (config.use_dora && train_base_) detail::fail(where, "use_dora is not supported while the base trains");
    if (config.use_dora && is_merged()) detail::fail(where, "use_dora while adapters are merged into W; unmerge() first");
    for (const auto& a : adapters_) {
      if (a.name == name) continue;
      if (a.config.bias != config.bias)
        detail::fail(where, "bias mode differs from adapter '", a.name, "''s; every adapter of a layer has the same");
      if (a.config.exact_unmerge != config.exact_unmerge)
        detail::fail(where, "exact_unmerge differs from adapter '", a.name, "''s; every adapter of a layer has the same");
    }
  }

  // Fresh A, B (initialised as config says), zero gradients, scaling, dropout stream.
  void init_adapter(Adapter& a, const LoraConfig& config, std::size_t index) {
    a.config = config;
    a.s = static_cast<Scalar>(config.scaling());
    a.A.resize(config.r, in_);
    a.B.resize(out_, config.r);
    detail::Rng init_rng(config.seed);
    init_lora(config.init, a.A, a.B, init_rng);
    a.rng = dropout_rng(config.seed, index);
    a.grad_A = Mat::Zero(config.r, in_);
    a.grad_B = Mat::Zero(out_, config.r);
    a.m = config.use_dora ? norm_of(a) : Vec();  // PEFT: m starts at ‖W + s·B·A‖, so y is unchanged
    a.grad_m = Vec::Zero(a.m.size());
    a.dora_c.resize(0);
  }

  // The layer-wide settings follow the adapters' (all equal, see check_adapter_config).
  void after_config_change() {
    const LoraConfig& c = adapters_.front().config;
    exact_unmerge_ = c.exact_unmerge;
    bias_mode_ = c.bias;
    reset_grad_bias();
    cache_.valid = false;
  }

  void reset_grad_bias() {
    const bool on = has_bias_ && (bias_mode_ == BiasMode::trainable || train_base_);
    if (grad_bias_.size() != (on ? out_ : 0)) grad_bias_ = Vec::Zero(on ? out_ : 0);
  }

  static detail::Rng dropout_rng(std::uint64_t seed, std::size_t index) {  // a stream apart from init's
    return detail::Rng(seed ^ 0xd1b54a32d192ed03ULL ^ (0x9e3779b97f4a7c15ULL * index));
  }

  int find(const std::string& name) const {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (adapters_[i].name == name) return static_cast<int>(i);
    return -1;
  }
  bool is_active(const std::string& name) const { return std::find(active_.begin(), active_.end(), name) != active_.end(); }

  static std::string list(const std::vector<std::string>& v) {
    if (v.empty()) return "none";
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "'" : ", '") + x + "'";
    return s;
  }

  const Adapter& at(const char* fn, const std::string& name) const {
    const int i = find(name);
    if (i < 0) detail::fail("LoraLinear::", fn, ": no adapter '", name, "' (the layer has ", list(adapter_names()), ")");
    return adapters_[i];
  }
  Adapter& at(const char* fn, const std::string& name) {
    return const_cast<Adapter&>(static_cast<const LoraLinear&>(*this).at(fn, name));
  }
  const Adapter& current(const char* fn) const {
    if (active_.size() != 1)
      detail::fail("LoraLinear::", fn, ": needs exactly one active adapter, the layer has ", active_.size(), " (",
                   list(active_), "); name the adapter or set_adapter one");
    return adapters_[find(active_[0])];
  }
  Adapter& current(const char* fn) { return const_cast<Adapter&>(static_cast<const LoraLinear&>(*this).current(fn)); }

  // A DoRA adapter cannot share the layer with another active or merged adapter.
  void check_dora_alone(const char* where, const std::vector<std::string>& names) const {
    if (names.size() < 2) return;
    for (const auto& n : names)
      if (adapters_[find(n)].config.use_dora)
        detail::fail(where, "adapter '", n, "' uses DoRA and can only be active or merged alone (with ", list(names), ")");
  }

  // The adapters of names that merge would merge (known, not merged yet), after the checks.
  std::vector<std::size_t> to_merge(const char* fn, const std::vector<std::string>& names) const {
    std::vector<std::size_t> todo;
    std::vector<std::string> all = merged_;
    for (const auto& n : names) {
      const int i = find(at(fn, n).name);
      if (is_merged(n) || std::find(todo.begin(), todo.end(), std::size_t(i)) != todo.end()) continue;
      todo.push_back(static_cast<std::size_t>(i));
      all.push_back(n);
    }
    if (disabled_) return {};
    for (const auto& n : active_)
      if (std::find(all.begin(), all.end(), n) == all.end()) all.push_back(n);
    check_dora_alone((std::string("LoraLinear::") + fn + ": ").c_str(), all);
    return todo;
  }

  const Scalar* wdata() const { return use_own_ ? w_own_.data() : (w_borrow_ ? w_borrow_ : w_borrow_ro_); }

  // W as writable memory; a read-only borrow is copied first (see begin_merge).
  MatMap writable_weight() { return MatMap(use_own_ ? w_own_.data() : w_borrow_, w_rows_, w_cols_); }

  // Before the first adapter merges: a read-only borrow gets its private copy; exact mode saves W.
  void begin_merge() {
    if (!merged_.empty()) return;
    if (w_borrow_ro_) {
      w_own_ = ConstMatMap(w_borrow_ro_, w_rows_, w_cols_);
      use_own_ = true;
    } else if (exact_unmerge_) {
      w_saved_ = weight();
    }
  }

  void merge_one(Adapter& a, MatMap w) {
    a.dora_c = merge_delta(a, w);
    merged_.push_back(a.name);
  }

  // w ← w + s·B·A, then with DoRA w ← c ⊙_rows w; returns c (empty without DoRA).
  Vec merge_delta(const Adapter& a, MatMap w) const {
    const Vec c = a.config.use_dora ? Vec(a.m.cwiseQuotient(norm_of(a))) : Vec();
    add_delta(w, a, Scalar(1));
    if (a.config.use_dora) scale_outputs(w, c);
    return c;
  }

  // ‖W + s·B·A‖ per output row of adapter a.
  Vec norm_of(const Adapter& a) const {
    const Mat wa = fan_in_fan_out_ ? Mat((a.A * weight()).transpose()) : Mat(weight() * a.A.transpose());  // (out, r)
    const Mat aat = a.A * a.A.transpose();
    const Vec w2 = fan_in_fan_out_ ? Vec(weight().colwise().squaredNorm().transpose()) : Vec(weight().rowwise().squaredNorm());
    const Vec cross = (wa.array() * a.B.array()).rowwise().sum();
    const Vec quad = ((a.B * aat).array() * a.B.array()).rowwise().sum();
    return (w2 + Scalar(2) * a.s * cross + a.s * a.s * quad).cwiseMax(Scalar(0)).cwiseSqrt();
  }

  Mat delta_of(const Adapter& a) const {
    Mat d(out_, in_);
    d.noalias() = a.s * a.B * a.A;
    return d;
  }

  void set_magnitude(Adapter& a, const Vec& m) {
    const char* where = "LoraLinear::set_lora_magnitude: ";
    if (!a.config.use_dora) detail::fail(where, "adapter '", a.name, "' does not use DoRA (config.use_dora)");
    if (is_merged(a.name)) detail::fail(where, "adapter '", a.name, "' is merged; unmerge() before changing m");
    if (m.size() != out_) detail::fail(where, "m is (", m.size(), "), expected (", out_, ")");
    a.m = m;
  }

  // Row j of the logical (out, in) W times f(j): rows of W, or columns when stored (in, out).
  void scale_outputs(MatMap w, const Vec& f) const {
    if (fan_in_fan_out_)
      w.array().rowwise() *= f.transpose().array();
    else
      w.array().colwise() *= f.array();
  }

  // y ← b + c ⊙ (y − b), column j of y scaled by c(j).
  void rescale(Mat& y, const Vec& c) const {
    if (has_bias_) y.rowwise() -= bias_.transpose();
    y.array().rowwise() *= c.transpose().array();
    if (has_bias_) y.rowwise() += bias_.transpose();
  }

  // w += sign·s·B·A in W's storage layout, as one GEMM, no (out, in) temporary.
  void add_delta(MatMap w, const Adapter& a, Scalar sign) const {
    if (fan_in_fan_out_)
      w.noalias() += (sign * a.s) * a.A.transpose() * a.B.transpose();
    else
      w.noalias() += (sign * a.s) * a.B * a.A;
  }

  // y[rows] += s·(x[rows]·Aᵀ)·Bᵀ for m rows of one adapter, gathered unless contiguous.
  void add_group(const MatRef& x, const Adapter& a, const Index* rows, Index m, Mat& y) const {
    thread_local Mat xg, t, u;
    if (rows[m - 1] - rows[0] == m - 1) {  // one contiguous run of rows
      t.noalias() = x.middleRows(rows[0], m) * a.A.transpose();
      y.middleRows(rows[0], m).noalias() += a.s * t * a.B.transpose();
      return;
    }
    xg.resize(m, in_);
    for (Index j = 0; j < m; ++j) xg.row(j) = x.row(rows[j]);
    t.noalias() = xg * a.A.transpose();
    u.noalias() = a.s * t * a.B.transpose();
    for (Index j = 0; j < m; ++j) y.row(rows[j]) += u.row(j);
  }

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

  // y <- b broadcast (or 0). Eigen's GEMM accumulates, so this costs what setZero would.
  void init_with_bias(Mat& y) const {
    if (has_bias_)
      y.rowwise() = bias_.transpose();
    else
      y.setZero();
  }

  void add_base(const MatRef& x, Mat& y) const {
    if (fan_in_fan_out_)
      y.noalias() += x * weight();
    else
      y.noalias() += x * weight().transpose();
  }

  void set_factor(const char* fn, const char* what, const MatRef& v, Adapter& a) {
    Mat& dst = what[0] == 'A' ? a.A : a.B;
    if (is_merged(a.name)) detail::fail("LoraLinear::", fn, ": adapter '", a.name, "' is merged; unmerge() before changing ", what);
    if (v.rows() != dst.rows() || v.cols() != dst.cols())
      detail::fail("LoraLinear::", fn, ": ", what, " is ", detail::shape(v.rows(), v.cols()), ", expected ",
                   detail::shape(dst.rows(), dst.cols()));
    dst = v;
    cache_.valid = false;
  }

  Index in_ = 0, out_ = 0, w_rows_ = 0, w_cols_ = 0;
  bool fan_in_fan_out_ = false;
  bool exact_unmerge_ = false;
  BiasMode bias_mode_ = BiasMode::frozen;

  Mat w_own_;                             // owned W, or the private copy of a read-only borrow
  Scalar* w_borrow_ = nullptr;            // writable borrow
  const Scalar* w_borrow_ro_ = nullptr;   // read-only borrow
  bool use_own_ = false;                  // W is w_own_
  Mat w_saved_;                           // W before the first merge, in exact_unmerge mode
  bool disabled_ = false;
  bool train_base_ = false;
  Mat grad_W_;

  Vec bias_;
  bool has_bias_ = false;
  Vec grad_bias_;
  std::vector<Adapter> adapters_;      // in the order added
  std::vector<std::string> active_;    // names, in set_adapter's order
  std::vector<std::string> merged_;    // names, in merge order
  Cache cache_;
};

}  // namespace lora
