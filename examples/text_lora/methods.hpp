// text_lora's methods: the head alone, LoRA (q,v; every linear), full fine-tuning, and the three
// the LoRA article weighs LoRA against (lora/models/lm_methods.hpp), each made from the pre-trained checkpoint with
// what it trains, saved and restored by one writer (checkpoints and the final output alike).
//
//   head alone               the tied embedding (the head)              Hugging Face checkpoint
//   LoRA q,v / all linears   r 8, alpha 16 on the named linears         PEFT adapter directory
//   full fine-tuning         every weight                               Hugging Face checkpoint
//   adapter-tuning           bottlenecks of 8 after the attention and the MLP of every layer
//   prefix-tuning            16 keys and values per layer, through a 64-wide MLP while training;
//                            at 1e-3: at LoRA's 4e-3, one process and 2 ranks (the same sums in
//                            another order) part by 2e-3 bits per byte within 6 steps of --quick;
//                            at 1e-3 they agree within 1e-5
//   ladder side-tuning       a side network of width d / 8 (2 heads) beside the frozen layers
//                            the last three: methods.safetensors (LmMethods::save)
//
// And the inference latency per example (one window of T bytes at batch 1) against the base model's.
#pragma once

#include <lora/models/llama.hpp>
#include <lora/peft.hpp>

#include "../common/latency.hpp"
#include "corpus.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace text_lora {

using Model = lora::LlamaModel<float>;

enum class Kind { head, lora, full, adapter, prefix, ladder };

struct Method {
  std::string name, key;
  Kind kind;
  std::vector<std::string> targets;  // LoRA's
  double lr;
};

inline std::vector<Method> all_methods() {
  return {
      {"head alone (tied embedding)", "head_only", Kind::head, {}, 4e-3},
      {"LoRA q,v (r 8)", "lora_qv", Kind::lora, {"q_proj", "v_proj"}, 4e-3},
      {"LoRA all linears (r 8)", "lora_all", Kind::lora, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 4e-3},
      {"full fine-tuning", "full", Kind::full, {}, 1e-3},
      {"adapter-tuning (m 8)", "adapter_tuning", Kind::adapter, {}, 4e-3},
      {"prefix-tuning (p 16)", "prefix_tuning", Kind::prefix, {}, 1e-3},
      {"ladder side-tuning (k 8)", "ladder", Kind::ladder, {}, 4e-3},
  };
}

// The method's model, from the pre-trained one or, with `resumed`, from a checkpoint its writer
// wrote; peft: LoRA's settings (its adapter's config).
class MethodModel {
 public:
  MethodModel(const Method& m, const std::string& pretrained, std::uint64_t seed, const std::string& resumed)
      : method_(m), model_(make(m, pretrained, seed, resumed, peft_)) {}

  Model& model() { return model_; }
  const lora::PeftConfig& peft() const { return peft_; }

  // The trainable state into dir (a checkpoint's or the output's).
  void write(const std::string& dir) {
    switch (method_.kind) {
      case Kind::lora: return model_.save_adapter(dir, peft_);
      case Kind::head:
      case Kind::full: return model_.save_pretrained(dir);
      default:
        std::filesystem::create_directories(dir);
        return model_.methods().save(dir + "/methods.safetensors");
    }
  }

 private:
  static Model make(const Method& m, const std::string& pretrained, std::uint64_t seed, const std::string& resumed,
                    lora::PeftConfig& peft) {
    if (m.kind == Kind::full || m.kind == Kind::head) {
      Model model(resumed.empty() ? pretrained : resumed);
      if (m.kind == Kind::full)
        model.set_base_trainable(true);
      else
        model.set_trainable({"embed_tokens"});  // tied: the head is the embedding
      return model;
    }
    if (m.kind == Kind::lora) {
      peft.r = 8;
      peft.lora_alpha = 16;
      peft.target_modules = m.targets;
      peft.raw["task_type"] = "CAUSAL_LM";
      peft.raw["base_model_name_or_path"] = std::filesystem::absolute(pretrained).string();
      lora::LoraConfig base;
      base.seed = seed;
      Model model(pretrained, &peft, base);
      if (!resumed.empty()) model.load_adapter(resumed);
      return model;
    }
    Model model(pretrained);
    if (m.kind == Kind::adapter) {
      lora::BottleneckConfig c;
      c.size = 8;
      c.seed = seed;
      model.add_bottlenecks(c);
    } else if (m.kind == Kind::prefix) {
      lora::PrefixConfig c;
      c.length = 16;
      c.projection = 64;
      c.seed = seed;
      model.add_prefix(c);
    } else {
      lora::LadderConfig c;
      c.reduction = 8;
      c.heads = 2;
      c.seed = seed;
      model.add_ladder(c);
    }
    if (!resumed.empty()) model.methods().load(resumed + "/methods.safetensors");
    return model;
  }

  Method method_;
  lora::PeftConfig peft_;
  Model model_;
};

// Inference latency per example, in ms: one window (1, T) at a time, m and base in turn
// (paired_latency), over the first `count` windows.
struct Latency {
  double ms, base_ms;
};
inline Latency latency(const Model& m, const Model& base, const Ids& windows, Eigen::Index count, int passes) {
  const demo::Latency l = demo::paired_latency(long(std::min(count, windows.rows())), passes, [&](int which, long i) {
    return double((which == 0 ? m : base).forward(Ids(windows.row(i)))(0, 0));
  });
  return {1e3 * l.seconds, 1e3 * l.base_seconds};
}

}  // namespace text_lora
