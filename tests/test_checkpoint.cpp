// Training checkpoints (training_checkpoint.hpp): a run stopped and resumed continues bit for bit
// as one that was not; a process killed while writing a checkpoint (or an adapter directory)
// leaves the previous one intact and loadable; bad checkpoints are refused by name and change
// nothing.
#include <lora/loss.hpp>
#include <lora/models/llama.hpp>
#include <lora/optim.hpp>
#include <lora/training_checkpoint.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>

#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
using Ids = lora::Mat<std::int64_t>;
using Model = lora::LlamaModel<double>;

namespace {

const std::string kLlama = data_path("models/tiny_llama");

// LoRA with dropout on every linear: the masks' streams must survive a resume too.
const lora::PeftConfig& config() {
  static const lora::PeftConfig c = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
      "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})");
  return c;
}

std::string scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("lora_test_checkpoint." + name);
  fs::remove_all(p);
  return p.string();
}

// Batches drawn from a stream whose state a checkpoint's progress carries.
struct Data {
  lora::detail::Rng rng{7};
  Ids next() {
    Ids ids(2, 8);
    for (lora::Index i = 0; i < ids.size(); ++i) ids.data()[i] = std::int64_t(rng.next() % 64);
    return ids;
  }
  nlohmann::json progress() const { return {{"data", lora::detail::stream_json(rng.state())}}; }
  void resume(const nlohmann::json& p) {
    std::array<std::uint64_t, 4> s{};
    ASSERT_TRUE(lora::detail::parse_stream(p["data"], s));
    rng.set_state(s);
  }
};

struct Training {
  Model model{kLlama, &config()};
  lora::AdamW<double> opt;
  Data data;
  Training() { opt.add(model.parameters()); }

  // Optimizer steps with warmup + cosine over 8 steps and clipping, from wherever the run is.
  void train(long steps) {
    for (long k = 0; k < steps; ++k) {
      opt.set_lr(lora::warmup_cosine_lr(1e-2, opt.steps(), 2, 8));
      model.zero_grad();
      const Ids ids = data.next();
      const auto r = lora::causal_lm_loss<double>(model.forward_train(ids), ids);
      model.backward(r.grad);
      lora::clip_grad_norm(model.parameters(), 1.0);
      opt.step();
    }
  }
  std::string checkpoint(const std::string& out, int keep = 2) {
    return lora::save_training_checkpoint<double>(
        out, [&](const std::string& d) { model.save_adapter(d, config(), lora::Dtype::F64); }, model.modules(), opt,
        data.progress(), keep);
  }
};

// A new process's view: a fresh model and optimizer, the checkpoint's adapter, state and data.
void resume(Training& run, const std::string& dir) {
  run.model.load_adapter(dir);
  run.opt = lora::AdamW<double>();
  run.opt.add(run.model.parameters());
  run.data.resume(lora::resume_training(dir, run.model.modules(), run.opt));
}

void expect_same_parameters(Model& a, Model& b) {
  const auto pa = a.parameters(), pb = b.parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) EXPECT_EQ(pa[i].value, pb[i].value) << pa[i].name;
}

TEST(Checkpoint, ResumedRunIsBitIdentical) {
  Training whole;
  whole.train(6);

  const std::string out = scratch("resume");
  {
    Training first;
    first.train(3);
    EXPECT_EQ(first.checkpoint(out), out + "/checkpoint-00000003");
  }
  Training second;
  resume(second, lora::latest_training_checkpoint(out));
  EXPECT_EQ(second.opt.steps(), 3);
  second.train(3);
  expect_same_parameters(whole.model, second.model);

  // Without the optimizer's state and the dropout streams the run goes elsewhere: the test sees it.
  Training adapter_only;
  adapter_only.model.load_adapter(out + "/checkpoint-00000003");
  adapter_only.data.resume(Data{}.progress());
  for (int k = 0; k < 3; ++k) adapter_only.data.next();
  adapter_only.train(3);
  EXPECT_NE(adapter_only.model.parameters()[0].value, whole.model.parameters()[0].value);
  fs::remove_all(out);
}

TEST(Checkpoint, KeepsTheNewestAndIsAUsableAdapter) {
  const std::string out = scratch("keep");
  Training run;
  for (int k = 0; k < 4; ++k) {
    run.train(1);
    run.checkpoint(out, 2);
  }
  const auto all = lora::training_checkpoints(out);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].first, 3);
  EXPECT_EQ(all[1].first, 4);
  Model plain(kLlama, &config());
  plain.load_adapter(all[1].second);  // a PEFT adapter directory like any other
  expect_same_parameters(plain, run.model);
  fs::remove_all(out);
}

// Runs f in a child process with LORA_FAULT_POINT=point; expects it to die of SIGKILL there.
void killed_at(const char* point, const std::function<void()>& f) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("LORA_FAULT_POINT", point, 1);
    try {
      f();
    } catch (...) {
    }
    ::_exit(3);  // not killed: the parent reports it
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << point << ": the child exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
}

std::map<std::string, std::string> files_of(const std::string& dir) {
  std::map<std::string, std::string> m;
  for (const auto& e : fs::directory_iterator(dir)) m[e.path().filename().string()] = lora::detail::read_text(e.path().string());
  return m;
}

TEST(Checkpoint, KilledWhileWritingLeavesThePreviousOne) {
  const std::string out = scratch("killed");
  Training run;
  run.train(2);
  const std::string previous = run.checkpoint(out);
  const auto before = files_of(previous);
  run.train(1);
  // while writing the adapter, in the middle (the adapter written, the optimizer's state not), and
  // after every file, before the rename
  for (const char* point : {"replace_directory", "save_training_checkpoint", "save_training_checkpoint.written"}) {
    SCOPED_TRACE(point);
    killed_at(point, [&] { run.checkpoint(out); });
    EXPECT_EQ(lora::latest_training_checkpoint(out), previous);
    EXPECT_EQ(files_of(previous), before);
  }
  Training again;
  resume(again, previous);
  EXPECT_EQ(again.opt.steps(), 2);
  run.checkpoint(out);  // the next save completes and clears what the killed ones left
  EXPECT_EQ(std::distance(fs::directory_iterator(out), fs::directory_iterator()), 2);  // two checkpoints, nothing else
  EXPECT_EQ(lora::latest_training_checkpoint(out), out + "/checkpoint-00000003");

  // save_adapter replaces a directory the same way: killed before the rename, the old adapter stays
  const std::string adapter = scratch("adapter");
  run.model.save_adapter(adapter, config());
  const auto saved = files_of(adapter);
  run.train(1);
  killed_at("replace_directory", [&] { run.model.save_adapter(adapter, config()); });
  EXPECT_EQ(files_of(adapter), saved);
  run.model.save_adapter(adapter, config());
  EXPECT_NE(files_of(adapter), saved);
  fs::remove_all(out);
  fs::remove_all(adapter);
}

// save_adapter replaces its directory as a whole but keeps what else the directory holds (a file,
// a subdirectory), through a trailing slash or a symbolic link to it too.
TEST(Checkpoint, SaveAdapterKeepsTheDirectorysOtherFiles) {
  const std::string dir = scratch("keep_files"), link = scratch("keep_files_link");
  Training run;
  run.model.save_adapter(dir, config(), lora::Dtype::F64);
  std::ofstream(dir + "/README.md") << "notes";
  fs::create_directories(dir + "/eval");
  std::ofstream(dir + "/eval/scores.txt") << "0.5";
  fs::create_directory_symlink(dir, link);
  const std::string before = lora::detail::read_text(dir + "/adapter_model.safetensors");
  run.train(2);  // (the first step's learning rate is 0: warmup)
  run.model.save_adapter(dir + "/", config(), lora::Dtype::F64);
  EXPECT_TRUE(lora::detail::read_text(dir + "/adapter_model.safetensors") != before);
  EXPECT_EQ(lora::detail::read_text(dir + "/README.md"), "notes");
  EXPECT_EQ(lora::detail::read_text(dir + "/eval/scores.txt"), "0.5");
  run.train(1);
  run.model.save_adapter(link, config(), lora::Dtype::F64);
  EXPECT_TRUE(fs::is_symlink(link));
  EXPECT_EQ(lora::detail::read_text(link + "/README.md"), "notes");
  Model back(kLlama, &config());
  back.load_adapter(link);
  expect_same_parameters(back, run.model);
  for (const auto& e : fs::directory_iterator(fs::path(dir).parent_path()))  // no temporary left beside it
    EXPECT_NE(e.path().filename().string().rfind(".lora_test_checkpoint.keep_files", 0), 0u) << e.path();
  fs::remove(link);
  fs::remove_all(dir);
}

TEST(Checkpoint, BadCheckpointsAreRefusedByName) {
  const std::string out = scratch("bad");
  Training run;
  run.train(2);
  const std::string dir = run.checkpoint(out);

  // another adapter shape: the optimizer's state does not fit this run's parameters
  const auto narrow = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj"]})");
  Model other(kLlama, &narrow);
  lora::AdamW<double> opt;
  opt.add(other.parameters());
  EXPECT_LORA_ERROR(lora::resume_training(dir, other.modules(), opt), "model.layers.0.self_attn.q_proj.lora_A.default.exp_avg is F64 [4, 32], expected F64 [2, 32]",
                    "tensors are no parameter's state", "dropout names module model.layers.0.mlp.down_proj");
  EXPECT_EQ(opt.steps(), 0);
  lora::Sgd<double> sgd;
  Training fresh;
  sgd.add(fresh.model.parameters());
  EXPECT_LORA_ERROR(lora::resume_training(dir, fresh.model.modules(), sgd), "holds AdamW state; this optimizer is SGD");

  // a truncated optimizer state, a state file without a layer's dropout stream
  const std::string cut = scratch("bad_cut");
  fs::copy(dir, cut);
  fs::resize_file(cut + "/optimizer.safetensors", fs::file_size(cut + "/optimizer.safetensors") - 9);
  EXPECT_LORA_ERROR(lora::resume_training(cut, fresh.model.modules(), fresh.opt), "optimizer.safetensors");
  fs::copy_file(dir + "/optimizer.safetensors", cut + "/optimizer.safetensors", fs::copy_options::overwrite_existing);
  nlohmann::json state = nlohmann::json::parse(lora::detail::read_text(cut + "/trainer_state.json"));
  state["dropout"].erase("model.layers.1.mlp.up_proj");
  std::ofstream(cut + "/trainer_state.json") << state.dump();
  const auto dropout_before = fresh.model.modules().at("model.layers.0.mlp.up_proj").dropout_state("default");
  EXPECT_LORA_ERROR(lora::resume_training(cut, fresh.model.modules(), fresh.opt),
                    "dropout[\"model.layers.1.mlp.up_proj\"][\"default\"] is missing");
  EXPECT_EQ(fresh.opt.steps(), 0);
  EXPECT_EQ(fresh.model.modules().at("model.layers.0.mlp.up_proj").dropout_state("default"), dropout_before);
  EXPECT_LORA_ERROR(lora::save_training_checkpoint<double>(out, [](const std::string&) {}, run.model.modules(), run.opt, {}, 0),
                    "keep_last is 0");
  fs::remove_all(out);
  fs::remove_all(cut);
}

}  // namespace
