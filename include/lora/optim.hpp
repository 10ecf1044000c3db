// Optimizers over parameters() (PyTorch semantics and defaults), gradient clipping, LoRA+ and a
// warmup + cosine learning-rate schedule.
//
//   SGD    g ← g + wd·p;  buf ← g (first step) or μ·buf + (1−dampening)·g;  g ← nesterov ? g + μ·buf : buf;
//          p ← p − lr·g                                            (torch.optim.SGD)
//   AdamW  p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//          p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)            (torch.optim.AdamW)
//
// Each parameter may carry its own learning-rate multiplier (LoRA+ gives B's lr × ratio). The
// optimizer keeps per-parameter state in the order the parameters were added; the views it
// holds must stay valid (the layers alive and not moved). save_state / load_state write and read
// that state (PyTorch's slot names, by parameter name) for checkpoints and an exact resume.
#pragma once

#include <lora/error.hpp>
#include <lora/parameter.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <cstdio>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace lora {

template <class Scalar>
struct ParamGroupEntry {
  Parameter<Scalar> param;
  double lr_scale = 1;
};

template <class Scalar>
class Optimizer {
 public:
  virtual ~Optimizer() = default;

  // Adds parameters whose learning rate is lr·lr_scale.
  void add(const std::vector<Parameter<Scalar>>& params, double lr_scale = 1) {
    if (!(lr_scale > 0) || !std::isfinite(lr_scale))
      detail::fail("Optimizer::add: lr_scale is ", lr_scale, ", expected a finite value > 0");
    for (const auto& p : params) {
      entries_.push_back({p, lr_scale});
      added(p);
    }
  }

  virtual void step() = 0;

  void zero_grad() {
    for (auto& e : entries_) e.param.grad.setZero();
  }

  double lr() const { return lr_; }
  void set_lr(double lr) {
    if (!(lr >= 0) || !std::isfinite(lr)) detail::fail("Optimizer::set_lr: lr is ", lr, ", expected a finite value >= 0");
    lr_ = lr;
  }
  std::size_t size() const { return entries_.size(); }
  long steps() const { return steps_; }  // step() calls so far

  // The state as tensors "<parameter name>.<slot>" (Scalar's dtype: a resumed run continues bit
  // for bit) with metadata optimizer (the type), steps and lr.
  void save_state(SafeTensorsBuilder& b) const {
    unique_names("Optimizer::save_state");
    for (const auto& [slot, mats] : slots())
      for (std::size_t i = 0; i < entries_.size(); ++i) b.add(entries_[i].param.name + "." + slot, (*mats)[i]);
    b.metadata("optimizer", type_name());
    b.metadata("steps", std::to_string(steps_));
    char lr[32];
    std::snprintf(lr, sizeof lr, "%.17g", lr_);  // every digit: the learning rate comes back exactly
    b.metadata("lr", lr);
  }

  // Checks that st holds what save_state wrote for these parameters (type, every name, shape and
  // dtype, nothing else); fails listing every difference.
  void check_state(const SafeTensors& st) const { read_counters(st); }

  // check_state, then the state from st; on error nothing changes.
  void load_state(const SafeTensors& st) {
    const auto [steps, lr] = read_counters(st);
    for (const auto& [slot, mats] : slots())
      for (std::size_t i = 0; i < entries_.size(); ++i)
        const_cast<std::vector<Mat<Scalar>>&>(*mats)[i] = st.matrix<Scalar>(entries_[i].param.name + "." + slot);
    steps_ = steps;
    lr_ = lr;
  }

 protected:
  explicit Optimizer(double lr) { set_lr(lr); }
  virtual void added(const Parameter<Scalar>&) {}
  virtual const char* type_name() const = 0;
  // Per-parameter state: a slot name and one matrix per parameter, in the order added.
  using Slot = std::pair<const char*, const std::vector<Mat<Scalar>>*>;
  virtual std::vector<Slot> slots() const = 0;
  // check_state's work: the steps and lr st holds.
  std::pair<long, double> read_counters(const SafeTensors& st) const {
    const char* who = "Optimizer::load_state";
    unique_names(who);
    const auto meta = [&](const char* key) -> std::string {
      const auto it = st.metadata().find(key);
      if (it == st.metadata().end()) detail::fail(who, ": ", st.source(), ": metadata '", key, "' is missing");
      return it->second;
    };
    if (meta("optimizer") != type_name())
      detail::fail(who, ": ", st.source(), " holds ", meta("optimizer"), " state; this optimizer is ", type_name());
    long steps = -1;
    double lr = -1;
    try {
      steps = std::stol(meta("steps"));
      lr = std::stod(meta("lr"));
    } catch (const std::logic_error&) {
    }
    std::vector<std::string> problems;
    if (steps < 0 || !(lr >= 0) || !std::isfinite(lr))
      problems.push_back("metadata steps '" + meta("steps") + "' or lr '" + meta("lr") + "' is not a count or rate");
    std::size_t used = 0;
    for (const auto& [slot, mats] : slots())
      for (const auto& e : entries_) {
        const std::string name = e.param.name + "." + slot;
        if (!st.contains(name)) {
          problems.push_back(name + " is missing");
          continue;
        }
        ++used;
        const TensorInfo& t = st.info(name);
        const std::vector<std::uint64_t> want{std::uint64_t(e.param.value.rows()), std::uint64_t(e.param.value.cols())};
        if (t.dtype != dtype_of<Scalar>() || t.shape != want)
          problems.push_back(name + " is " + dtype_name(t.dtype) + " " + shape_string(t.shape) + ", expected " +
                             dtype_name(dtype_of<Scalar>()) + " " + shape_string(want));
      }
    if (used != st.tensors().size())
      problems.push_back(std::to_string(st.tensors().size() - used) + " tensors are no parameter's state (another model or adapter?)");
    if (!problems.empty()) detail::fail(who, ": ", st.source(), ": ", detail::join(problems));
    return {steps, lr};
  }
  void unique_names(const char* who) const {
    std::set<std::string> seen;
    for (const auto& e : entries_)
      if (!seen.insert(e.param.name).second) detail::fail(who, ": two parameters are named '", e.param.name, "'");
  }
  std::vector<ParamGroupEntry<Scalar>> entries_;
  double lr_ = 0;
  long steps_ = 0;
};

struct SgdOptions {
  double lr = 1e-3;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
};

template <class Scalar>
class Sgd : public Optimizer<Scalar> {
 public:
  explicit Sgd(const SgdOptions& o = {}) : Optimizer<Scalar>(o.lr), o_(o) {
    if (o.momentum < 0 || o.weight_decay < 0 || o.dampening < 0)
      detail::fail("Sgd: momentum, dampening and weight_decay must be >= 0");
    if (o.nesterov && (o.momentum <= 0 || o.dampening != 0))
      detail::fail("Sgd: nesterov needs momentum > 0 and dampening 0");
  }

  void step() override {
    for (std::size_t i = 0; i < this->entries_.size(); ++i) {
      auto& e = this->entries_[i];
      auto p = e.param.value.array();
      Mat<Scalar> g = e.param.grad;
      if (o_.weight_decay != 0) g += Scalar(o_.weight_decay) * e.param.value;
      if (o_.momentum != 0) {
        if (this->steps_ == 0)
          buf_[i] = g;
        else
          buf_[i] = Scalar(o_.momentum) * buf_[i] + Scalar(1 - o_.dampening) * g;
        if (o_.nesterov)
          g += Scalar(o_.momentum) * buf_[i];
        else
          g = buf_[i];
      }
      p -= Scalar(this->lr_ * e.lr_scale) * g.array();
    }
    ++this->steps_;
  }

 private:
  void added(const Parameter<Scalar>& p) override { buf_.push_back(Mat<Scalar>::Zero(p.value.rows(), p.value.cols())); }
  const char* type_name() const override { return "SGD"; }
  std::vector<typename Optimizer<Scalar>::Slot> slots() const override { return {{"momentum_buffer", &buf_}}; }
  SgdOptions o_;
  std::vector<Mat<Scalar>> buf_;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

template <class Scalar>
class AdamW : public Optimizer<Scalar> {
 public:
  explicit AdamW(const AdamWOptions& o = {}) : Optimizer<Scalar>(o.lr), o_(o) {
    if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1))
      detail::fail("AdamW: betas are (", o.beta1, ", ", o.beta2, "), expected each in [0, 1)");
    if (!(o.eps >= 0) || !(o.weight_decay >= 0)) detail::fail("AdamW: eps and weight_decay must be >= 0");
  }

  void step() override {
    const long t = ++this->steps_;
    const double bc1 = 1 - std::pow(o_.beta1, double(t));
    const double bc2_sqrt = std::sqrt(1 - std::pow(o_.beta2, double(t)));
    for (std::size_t i = 0; i < this->entries_.size(); ++i) {
      auto& e = this->entries_[i];
      const double lr = this->lr_ * e.lr_scale;
      auto p = e.param.value.array();
      const auto g = e.param.grad.array();
      p *= Scalar(1 - lr * o_.weight_decay);
      m_[i].array() = Scalar(o_.beta1) * m_[i].array() + Scalar(1 - o_.beta1) * g;
      v_[i].array() = Scalar(o_.beta2) * v_[i].array() + Scalar(1 - o_.beta2) * g.square();
      p -= Scalar(lr / bc1) * m_[i].array() / (v_[i].array().sqrt() / Scalar(bc2_sqrt) + Scalar(o_.eps));
    }
  }

 private:
  void added(const Parameter<Scalar>& p) override {
    m_.push_back(Mat<Scalar>::Zero(p.value.rows(), p.value.cols()));
    v_.push_back(Mat<Scalar>::Zero(p.value.rows(), p.value.cols()));
  }
  const char* type_name() const override { return "AdamW"; }
  std::vector<typename Optimizer<Scalar>::Slot> slots() const override { return {{"exp_avg", &m_}, {"exp_avg_sq", &v_}}; }
  AdamWOptions o_;
  std::vector<Mat<Scalar>> m_, v_;
};

// Scales all gradients together so that their global L2 norm is at most max_norm
// (torch.nn.utils.clip_grad_norm_). Returns the norm before clipping.
template <class Scalar>
double clip_grad_norm(const std::vector<Parameter<Scalar>>& params, double max_norm) {
  double sq = 0;
  for (const auto& p : params) sq += static_cast<double>(p.grad.squaredNorm());
  const double norm = std::sqrt(sq);
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1)
    for (auto p : params) p.grad *= Scalar(coef);
  return norm;
}

// LoRA+ (Hayou et al. 2024): B learns ratio times faster than A. Adds params to opt, the
// lora_B ones (a dotted name with the part "lora_B", e.g. "fc1.lora_B.default") with lr × ratio.
template <class Scalar>
void add_loraplus(Optimizer<Scalar>& opt, const std::vector<Parameter<Scalar>>& params, double ratio = 16) {
  std::vector<Parameter<Scalar>> a, b;
  for (const auto& p : params) {
    const std::string dotted = "." + p.name + ".";
    (dotted.find(".lora_B.") != std::string::npos ? b : a).push_back(p);
  }
  opt.add(a);
  opt.add(b, ratio);
}

// Linear warmup from 0 to base_lr over warmup steps, then cosine decay to 0 at total steps
// (transformers' get_cosine_schedule_with_warmup). step counts from 0.
inline double warmup_cosine_lr(double base_lr, long step, long warmup, long total) {
  if (step < warmup) return base_lr * double(step) / double(std::max(1L, warmup));
  const double progress = double(step - warmup) / double(std::max(1L, total - warmup));
  return base_lr * std::max(0.0, 0.5 * (1 + std::cos(3.14159265358979323846 * progress)));
}

}  // namespace lora
