// LoraConfig: what one adapter of a LoRA layer is (PEFT's LoraConfig fields for one module).
//
//   scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA
//
// The names follow the C++ layers' math (alpha, dropout); PeftConfig (peft_config.hpp) keeps the
// file's names (lora_alpha, lora_dropout) and turns into a LoraConfig per module.
#pragma once

#include <lora/error.hpp>
#include <lora/init.hpp>

#include <cmath>
#include <cstdint>

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

  // Throws, naming where, unless r >= 1, alpha finite and > 0, 0 <= dropout < 1, and no
  // dropout with DoRA.
  void check(const char* where) const {
    if (r < 1) detail::fail(where, "r is ", r, ", expected r >= 1");
    if (!std::isfinite(alpha) || alpha <= 0) detail::fail(where, "alpha is ", alpha, ", expected a finite value > 0");
    if (!(dropout >= 0 && dropout < 1)) detail::fail(where, "dropout is ", dropout, ", expected 0 <= p < 1");
    if (use_dora && dropout > 0)
      detail::fail(where, "use_dora with dropout ", dropout, " is not supported (DoRA needs dropout 0)");
  }
};

}  // namespace lora
