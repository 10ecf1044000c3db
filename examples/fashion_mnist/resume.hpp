// fashion_mnist's checkpoints (--checkpoint-every N, --max-steps N, --resume DIR), on the
// library's training checkpoints (lora/training_checkpoint.hpp).
//
//   OUT/run.json                   the settings that decide the results; --resume takes them
//   OUT/checkpoints/<phase>/       phase: pretrain, then each method's key
//     checkpoint-N/                after N optimizer steps of the phase: model.safetensors (the
//                                  trainable values, and the epoch's data order), the optimizer's
//                                  state, and progress (epoch, batch, the sums and curves so far,
//                                  the shuffle stream)
//     done.json                    the finished phase's results and the shuffle stream after it,
//                                  so a resume skips the phase (pretrain: base.safetensors too)
//
// --max-steps counts the optimizer steps of the whole run, all phases; when they are reached the
// current phase's checkpoint is written and the program stops. Training is deterministic for
// given settings and thread count, so a stopped and resumed run prints the same table and writes
// the same results.csv accuracies as one that was not stopped.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/training_checkpoint.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace fashion {

struct Epoch {
  double train_loss, test_accuracy, seconds;
};

struct Training {
  std::vector<Epoch> epochs;
  std::vector<double> at, loss;  // the mean loss of every eighth of an epoch, at its end (in epochs)
  long steps = 0;                // the phase's optimizer steps, once it is finished
  double peak_heap = 0;          // the most heap bytes live during its training steps (heap_count.hpp)
};

// Where the run stands against --checkpoint-every and --max-steps.
struct Stops {
  long every = 0, max_steps = 0;  // 0: never
  long taken = 0;                 // optimizer steps of the whole run so far, all phases
};

// Thrown when --max-steps is reached, after the checkpoint is written.
struct Stopped {};

inline nlohmann::json to_json(const Training& t) {
  nlohmann::json epochs = nlohmann::json::array();
  for (const Epoch& e : t.epochs) epochs.push_back({e.train_loss, e.test_accuracy, e.seconds});
  return {{"epochs", epochs}, {"at", t.at}, {"loss", t.loss}, {"steps", t.steps}, {"peak_heap", t.peak_heap}};
}

inline Training training_from_json(const nlohmann::json& j) {
  Training t;
  for (const auto& e : j.at("epochs")) t.epochs.push_back({e.at(0), e.at(1), e.at(2)});
  t.at = j.at("at").get<std::vector<double>>();
  t.loss = j.at("loss").get<std::vector<double>>();
  t.steps = j.at("steps");
  t.peak_heap = j.at("peak_heap");
  return t;
}

inline nlohmann::json to_json(const lora::detail::Rng& rng) { return lora::detail::stream_json(rng.state()); }

inline void rng_from_json(lora::detail::Rng& rng, const nlohmann::json& j, const std::string& label) {
  std::array<std::uint64_t, 4> s{};
  if (!lora::detail::parse_stream(j, s) || !rng.set_state(s)) lora::detail::fail(label, ": the shuffle stream's state is not 4 hex words");
}

}  // namespace fashion
