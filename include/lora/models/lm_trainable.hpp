// What trains in a causal language model besides its LoRA factors (PEFT's modules_to_save, full
// fine-tuning, pre-training): the base modules' weights, each frozen or trained.
//
//   NormWeights        a norm's γ (and β):           dγ, dβ from the norm's backward
//   EmbeddingWeights   a table E (rows, d):           y = E[ids];  dE[id] += dy of each token
//                      (frozen, E may be kept in bf16: bf16_weights.hpp)
//   TrainableModules   what LlamaModel and Gpt2Model offer on top (CRTP): set_trainable(names),
//                      set_base_trainable, parameters(), zero_grad(), trainable_parameters(), and
//                      PEFT adapter directories with modules_to_save (save_adapter, load_adapter).
//                      The model lists its base modules by path (each_base_module); a tied head is
//                      listed as "lm_head" beside the embedding it shares, and counted once.
//
// A Projection (lm_blocks.hpp) trains its W and b the same way; a LoRA-targeted projection trains
// its W through LoraLinear::set_base_trainable, and its tensors come with the ModuleMap's.
#pragma once

#include <lora/error.hpp>
#include <lora/models/bf16_weights.hpp>
#include <lora/module_map.hpp>
#include <lora/parameter.hpp>
#include <lora/peft.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace lora {

// A norm's gain γ (and shift β), frozen or trained.
template <class Scalar>
struct NormWeights {
  Vec<Scalar> gamma, beta, grad_gamma, grad_beta;
  bool trainable = false;

  void set_trainable(bool on) {
    trainable = on;
    grad_gamma = on ? Vec<Scalar>::Zero(gamma.size()) : Vec<Scalar>();
    grad_beta = on ? Vec<Scalar>::Zero(beta.size()) : Vec<Scalar>();
  }
  void parameters(const std::string& path, std::vector<Parameter<Scalar>>& out) {
    if (!trainable) return;
    out.push_back(make_parameter(path + ".weight", gamma, grad_gamma));
    if (beta.size()) out.push_back(make_parameter(path + ".bias", beta, grad_beta));
  }
  void zero_grad() {
    grad_gamma.setZero();
    grad_beta.setZero();
  }
  Index trained() const { return trainable ? gamma.size() + beta.size() : 0; }
  void keep_bf16() {}  // norms stay in Scalar: d values each
};

// A token embedding table (vocab, d), frozen or trained: y = W[ids]; dW[id] += dy of each token.
// Frozen, it may be kept in bf16 (w16; keep_bf16): rows and products are computed in Scalar.
template <class Scalar>
struct EmbeddingWeights {
  Mat<Scalar> w, grad_w;
  Bf16Mat w16;  // the table in bf16, w empty then
  bool trainable = false;

  // dst = W[id] (a row of d values).
  template <class Row>
  void lookup(Index id, Row&& dst) const {
    if (w16.size())
      widen_row<Scalar>(w16, id, dst);
    else
      dst = w.row(id);
  }
  // dst += W[id].
  template <class Row>
  void add_to(Index id, Row&& dst) const {
    if (w16.size())
      for (Index j = 0; j < w16.cols(); ++j) dst(j) += detail::widen<Scalar>(w16(id, j));
    else
      dst += w.row(id);
  }
  // As a tied head: logits = a·Wᵀ (n, vocab), and its backward da = dlogits·W.
  void head(const MatRef<Scalar>& a, Mat<Scalar>& logits) const { times_transposed(a, w, w16, logits); }
  void head_backward(const MatRef<Scalar>& dlogits, Mat<Scalar>& da) const { times(dlogits, w, w16, da); }
  void keep_bf16() {
    if (!trainable && w.size()) to_bf16(w, w16);
  }
  void set_trainable(bool on) {
    if (on) widen_back(w16, w);
    trainable = on;
    grad_w = on ? Mat<Scalar>::Zero(w.rows(), w.cols()) : Mat<Scalar>();
  }
  void parameters(const std::string& path, std::vector<Parameter<Scalar>>& out) {
    if (trainable) out.push_back(make_parameter(path + ".weight", w, grad_w));
  }
  void zero_grad() { grad_w.setZero(); }
  Index size() const { return w.size() + w16.size(); }
  Index trained() const { return trainable ? w.size() : 0; }
  void save(SafeTensorsBuilder& out, const std::string& name) const {
    if (w16.size())
      out.add(name, w16);
    else
      out.add(name, w);
  }
};

// Derived provides modules() (its ModuleMap), discard_training() (forget a forward_train) and
// each_base_module(self, f): f(path, module) for every base module, modules having
// set_trainable, parameters, zero_grad and trained() as above.
template <class Derived, class Scalar>
class TrainableModules {
 public:
  // PEFT's modules_to_save: the modules whose path ends with one of the names train beside the
  // LoRA factors ("lm_head", "embed_tokens", "model.norm"; as in PEFT, a plain suffix: "norm" is
  // every norm, input_layernorm and post_attention_layernorm too). A name that matches nothing is
  // refused, changing nothing.
  void set_trainable(const std::vector<std::string>& names) {
    check_names("set_trainable", names);
    Derived::each_base_module(self(), [&](const std::string& path, auto& m) {
      if (matches_any(path, names)) m.set_trainable(true);
    });
    for (const auto& n : names)
      if (std::find(to_save_.begin(), to_save_.end(), n) == to_save_.end()) to_save_.push_back(n);
    self().discard_training();
  }
  // Every frozen plain weight (the linears without LoRA, the embeddings, an untied head) moves to
  // bf16: half the memory, products still computed in Scalar (bf16_weights.hpp). What trains
  // stays in Scalar, and a module set to train later is widened back. A model read from a
  // checkpoint with FrozenWeights::bf16 is this, converted tensor by tensor as it loads.
  void keep_frozen_bf16() {
    Derived::each_base_module(self(), [&](const std::string&, auto& m) { m.keep_bf16(); });
  }
  // Every base weight trains (on) or none does: full fine-tuning and pre-training.
  void set_base_trainable(bool on) {
    Derived::each_base_module(self(), [&](const std::string&, auto& m) { m.set_trainable(on); });
    all_base_ = on;
    to_save_.clear();
    self().discard_training();
  }

  // PEFT adapter directories with modules_to_save. save_adapter writes the LoRA factors (as
  // lora::save_adapter) and the tensors of the modules set_trainable named, as
  // base_model.model.<tensor name>, with config.modules_to_save = those names. load_adapter reads
  // such a directory (or a plain one): the named modules become trainable and take the file's
  // tensors, the LoRA factors load as lora::load_adapter does; every tensor and shape is checked
  // first, and a refused adapter changes nothing. Refused: a model whose every weight trains
  // (save it with save_pretrained), a LoRA layer that also trains its base, "lm_head" when the
  // head is tied (name embed_tokens).
  void save_adapter(const std::string& dir, PeftConfig config, Dtype dtype = Dtype::F32) {
    if (all_base_) detail::fail("save_adapter: every base weight trains (set_base_trainable); save the model with save_pretrained");
    check_peft_names("save_adapter", to_save_);
    config.modules_to_save = to_save_;
    std::vector<Parameter<Scalar>> base;
    for (auto& p : parameters())
      if (p.name.find(".lora_") == std::string::npos) base.push_back(p);
    lora::save_adapter(dir, self().modules(), config, dtype, "", base);
  }
  PeftConfig load_adapter(const std::string& dir, LoadOptions options = {}) {
    namespace fs = std::filesystem;
    const PeftConfig config = PeftConfig::read((fs::path(dir) / "adapter_config.json").string());
    if (config.modules_to_save.empty()) return lora::load_adapter(dir, self().modules(), options);
    const std::vector<std::string>& names = config.modules_to_save;
    const std::string where = "load_adapter: " + dir;
    check_names(where.c_str(), names);
    check_peft_names(where.c_str(), names);
    std::vector<std::string> newly;  // made trainable here; back to frozen if the adapter is refused
    Derived::each_base_module(self(), [&](const std::string& path, auto& m) {
      if (matches_any(path, names) && m.trained() == 0) {
        m.set_trainable(true);
        newly.push_back(path);
      }
    });
    try {
      const std::string file = (fs::path(dir) / "adapter_model.safetensors").string();
      const SafeTensors st = SafeTensors::open(file);
      std::map<std::string, Parameter<Scalar>> want;  // tensor name -> the model's tensor
      for (auto& p : parameters()) {
        const std::size_t dot = p.name.rfind('.');
        if (p.name.find(".lora_") == std::string::npos && matches_any(p.name.substr(0, dot), names)) want.emplace(p.name, p);
      }
      std::vector<std::string> problems;
      std::vector<std::pair<Parameter<Scalar>, Mat<Scalar>>> values;
      for (const auto& t : st.tensors()) {
        if (detail::is_lora_key(t.name)) continue;
        const std::string& pre = detail::kPeftPrefix;
        const std::string name = t.name.compare(0, pre.size(), pre) == 0 ? t.name.substr(pre.size()) : t.name;
        const auto w = want.find(name);
        if (w == want.end()) {
          problems.push_back("'" + t.name.substr(0, 100) + "' is neither a LoRA factor nor a tensor of modules_to_save");
          continue;
        }
        const MatMap<Scalar>& v = w->second.value;
        const bool vector = v.rows() == 1 && t.shape.size() == 1;
        const std::vector<std::uint64_t> shape =
            vector ? std::vector<std::uint64_t>{std::uint64_t(v.cols())} : std::vector<std::uint64_t>{std::uint64_t(v.rows()), std::uint64_t(v.cols())};
        if (!detail::is_float_dtype(t.dtype) || t.shape != shape) {
          problems.push_back(t.name + " is " + shape_string(t.shape) + " " + dtype_name(t.dtype) + ", the model's is " + shape_string(shape));
          continue;
        }
        values.emplace_back(w->second, vector ? Mat<Scalar>(st.vector<Scalar>(t.name).transpose()) : st.matrix<Scalar>(t.name));
        want.erase(w);
      }
      for (const auto& [name, p] : want) problems.push_back(name + " of modules_to_save is not in the file");
      if (!problems.empty()) detail::fail(where, ": ", detail::join(problems));
      options.skip_modules_to_save = true;
      const PeftConfig loaded = lora::load_adapter(dir, self().modules(), options);  // all or nothing itself
      for (auto& [p, v] : values) p.value = v;
      for (const auto& n : names)
        if (std::find(to_save_.begin(), to_save_.end(), n) == to_save_.end()) to_save_.push_back(n);
      self().discard_training();
      return loaded;
    } catch (...) {
      Derived::each_base_module(self(), [&](const std::string& path, auto& m) {
        if (std::find(newly.begin(), newly.end(), path) != newly.end()) m.set_trainable(false);
      });
      throw;
    }
  }
  // The trainable tensors with their gradients: the LoRA factors (modules(); a LoRA layer's W and
  // b when its base trains), then the trained base tensors under their checkpoint names.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> p = self().modules().parameters();
    std::set<const void*> seen;
    Derived::each_base_module(self(), [&](const std::string& path, auto& m) {
      if (seen.insert(&m).second) m.parameters(path, p);
    });
    return p;
  }
  void zero_grad() {
    self().modules().zero_grad();
    Derived::each_base_module(self(), [&](const std::string&, auto& m) { m.zero_grad(); });
  }
  Index trainable_parameters() const {
    Index n = self().modules().trainable_parameters();
    std::set<const void*> seen;
    Derived::each_base_module(self(), [&](const std::string&, const auto& m) {
      if (seen.insert(&m).second) n += m.trained();
    });
    return n;
  }

 private:
  static bool matches(const std::string& path, const std::string& n) {
    return path.size() >= n.size() && path.compare(path.size() - n.size(), n.size(), n) == 0;
  }
  static bool matches_any(const std::string& path, const std::vector<std::string>& names) {
    return std::any_of(names.begin(), names.end(), [&](const std::string& n) { return matches(path, n); });
  }
  void check_names(const char* fn, const std::vector<std::string>& names) {
    for (const auto& n : names) {
      bool found = false;
      Derived::each_base_module(self(), [&](const std::string& path, auto&) { found = found || matches(path, n); });
      if (!found) detail::fail(fn, ": no module's path ends with '", n, "'");
    }
  }
  // What PEFT's files can say: no tied head by the name lm_head, no LoRA layer training its base.
  void check_peft_names(const char* fn, const std::vector<std::string>& names) {
    if (self().config().tie_word_embeddings && matches_any("lm_head", names))
      detail::fail(fn, ": lm_head is tied to the embedding; name the embedding (embed_tokens, wte) in modules_to_save");
    for (const auto& [path, layer] : self().modules())
      if (layer->base_trainable() || matches_any(path, names))
        detail::fail(fn, ": ", path, " is a LoRA layer; it cannot also be in modules_to_save");
  }
  std::vector<std::string> to_save_;  // the names set_trainable was given (modules_to_save)
  bool all_base_ = false;             // set_base_trainable(true)
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

}  // namespace lora
