// text_lora's checkpoints (--checkpoint-every N, --max-steps N, --resume DIR), on the library's
// training checkpoints (lora/training_checkpoint.hpp).
//
//   OUT/run.json                    the settings that decide the results; --resume refuses others
//   OUT/checkpoints/<phase>/        phase: pretrain, then each method's key (methods.hpp)
//     checkpoint-N/                 the model's trainable state after N steps of the phase, the
//                                   optimizer's, and progress: the data stream, the curves so far
//     done.json                     the finished phase's results (Run), so a resume skips it
//
// --max-steps counts the optimizer steps of the whole run, all phases, before a resume too; when
// they are reached the current phase's checkpoint is written and the program stops. Training is
// deterministic for given settings and thread count, so a stopped and resumed run trains the
// same weights bit for bit and reports the same held-out bits per byte as one that was not.
#pragma once

#include <lora/detail/files.hpp>
#include <lora/error.hpp>

#include <nlohmann/json.hpp>

#include "../common/json_files.hpp"
#include "../common/report.hpp"

#include <filesystem>
#include <random>
#include <sstream>
#include <string>

namespace text_lora {

using demo::read_json;
using demo::write_json;

struct Run {
  std::string name, key;
  long trainable = 0;
  double seconds = 0, tokens_per_s = 0, before = 0, after = 0, english = 0;
  double heap_peak = 0, heap_mib = 0;  // the heap's peak in training (bytes), and above the heap before the method (MiB)
  double latency_ms = 0, latency_ratio = 0;                     // per example at batch 1; against the base model
  double unmerged_latency_ms = 0, unmerged_latency_ratio = 0;  // LoRA's before merging (latency_*: merged)
  Curve train{"", {}, {}}, held{"", {}, {}};
  std::string text;
  bool merge_ok = true;  // LoRA: merged and unmerged logits agree; prefix-tuning: folded and not
};

inline nlohmann::json to_json(const Run& r) {
  return {{"name", r.name}, {"key", r.key}, {"trainable", r.trainable}, {"seconds", r.seconds}, {"tokens_per_s", r.tokens_per_s},
          {"heap_mib", r.heap_mib}, {"latency_ms", r.latency_ms}, {"latency_ratio", r.latency_ratio},
          {"unmerged_latency_ms", r.unmerged_latency_ms}, {"unmerged_latency_ratio", r.unmerged_latency_ratio}, {"before", r.before}, {"after", r.after}, {"english", r.english}, {"train_x", r.train.x},
          {"train_y", r.train.y}, {"held_x", r.held.x}, {"held_y", r.held.y}, {"text", r.text}, {"merge_ok", r.merge_ok}};
}

inline Run run_from_json(const nlohmann::json& j, const std::string& label) {
  try {
    Run r;
    r.name = j.at("name");
    r.key = j.at("key");
    r.trainable = j.at("trainable");
    r.seconds = j.at("seconds");
    r.tokens_per_s = j.at("tokens_per_s");
    r.heap_mib = j.at("heap_mib");
    r.latency_ms = j.at("latency_ms");
    r.latency_ratio = j.at("latency_ratio");
    r.unmerged_latency_ms = j.at("unmerged_latency_ms");
    r.unmerged_latency_ratio = j.at("unmerged_latency_ratio");
    r.before = j.at("before");
    r.after = j.at("after");
    r.english = j.at("english");
    r.train.x = j.at("train_x").get<std::vector<double>>();
    r.train.y = j.at("train_y").get<std::vector<double>>();
    r.held.x = j.at("held_x").get<std::vector<double>>();
    r.held.y = j.at("held_y").get<std::vector<double>>();
    r.text = j.at("text");
    r.merge_ok = j.at("merge_ok");
    return r;
  } catch (const nlohmann::json::exception& e) {
    lora::detail::fail(label, ": not a text_lora run: ", e.what());
  }
}

// Where a run stands against --checkpoint-every and --max-steps.
struct Resumable {
  long every = 0, max_steps = 0;  // 0: never
  long taken = 0;                 // optimizer steps of the whole run so far, all phases
};

// Thrown when --max-steps is reached, after the checkpoint is written.
struct Stopped {};

inline std::string rng_text(const std::mt19937_64& rng) {
  std::ostringstream os;
  os << rng;
  return os.str();
}

inline void rng_from_text(std::mt19937_64& rng, const std::string& text, const std::string& label) {
  std::istringstream is(text);
  is >> rng;
  if (!is) lora::detail::fail(label, ": the data stream's state does not parse");
}

}  // namespace text_lora
