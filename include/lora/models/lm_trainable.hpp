// What trains in a causal language model besides its LoRA factors (PEFT's modules_to_save, full
// fine-tuning, pre-training): the base modules' weights, each frozen or trained.
//
//   NormWeights        a norm's γ (and β):           dγ, dβ from the norm's backward
//   EmbeddingWeights   a table E (rows, d):           y = E[ids];  dE[id] += dy of each token
//   TrainableModules   what LlamaModel and Gpt2Model offer on top (CRTP): set_trainable(names),
//                      set_base_trainable, parameters(), zero_grad(), trainable_parameters().
//                      The model lists its base modules by path (each_base_module); a tied head is
//                      listed as "lm_head" beside the embedding it shares, and counted once.
//
// A Projection (lm_blocks.hpp) trains its W and b the same way; a LoRA-targeted projection trains
// its W through LoraLinear::set_base_trainable, and its tensors come with the ModuleMap's.
#pragma once

#include <lora/error.hpp>
#include <lora/module_map.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

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
};

// A token embedding table (vocab, d), frozen or trained: y = W[ids]; dW[id] += dy of each token.
template <class Scalar>
struct EmbeddingWeights {
  Mat<Scalar> w, grad_w;
  bool trainable = false;

  void set_trainable(bool on) {
    trainable = on;
    grad_w = on ? Mat<Scalar>::Zero(w.rows(), w.cols()) : Mat<Scalar>();
  }
  void parameters(const std::string& path, std::vector<Parameter<Scalar>>& out) {
    if (trainable) out.push_back(make_parameter(path + ".weight", w, grad_w));
  }
  void zero_grad() { grad_w.setZero(); }
  Index trained() const { return trainable ? w.size() : 0; }
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
    for (const auto& n : names) {
      bool found = false;
      Derived::each_base_module(self(), [&](const std::string& path, auto&) { found = found || matches(path, n); });
      if (!found) detail::fail("set_trainable: no module's path ends with '", n, "'");
    }
    Derived::each_base_module(self(), [&](const std::string& path, auto& m) {
      for (const auto& n : names)
        if (matches(path, n)) m.set_trainable(true);
    });
    self().discard_training();
  }
  // Every base weight trains (on) or none does: full fine-tuning and pre-training.
  void set_base_trainable(bool on) {
    Derived::each_base_module(self(), [&](const std::string&, auto& m) { m.set_trainable(on); });
    self().discard_training();
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
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

}  // namespace lora
