// Data-parallel training (distributed.hpp), run under mpirun -np 2 (ctest distributed.two_ranks).
// Every rank also trains the one-process reference itself (the whole global batch, no MPI), so
// each comparison is local: 2 ranks × half batches equal 1 rank × the full batch to 1e-12 over
// AdamW steps, in double, on the tiny Llama; a run checkpointed on 2 ranks and resumed on 1 (and
// the other way) equals the unstopped run; bad input fails on every rank alike.
#include <lora/distributed.hpp>
#include <lora/loss.hpp>
#include <lora/models/llama.hpp>
#include <lora/optim.hpp>
#include <lora/training_checkpoint.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <optional>

namespace fs = std::filesystem;
using Ids = lora::Mat<std::int64_t>;
using Model = lora::LlamaModel<double>;

namespace {

const std::string kLlama = data_path("models/tiny_llama");
constexpr lora::Index kBatch = 4, kT = 8;

const lora::PeftConfig& config(double dropout = 0) {
  static const lora::PeftConfig plain = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})");
  static const lora::PeftConfig with_dropout = [] {
    lora::PeftConfig c = plain;
    c.lora_dropout = 0.1;
    return c;
  }();
  return dropout > 0 ? with_dropout : plain;
}

// A global batch: token ids, an attention mask with padding at the end of the last row, and
// labels with the padding and a few more positions at -100, so the ranks count different numbers
// of tokens (rank 0: 14, rank 1: 9) and a mean of per-rank means would be wrong.
struct Batch {
  Ids ids, mask, labels;
};
Batch batch(long step) {
  lora::detail::Rng rng(100 + std::uint64_t(step));
  Batch b{Ids(kBatch, kT), Ids::Ones(kBatch, kT), Ids()};
  for (lora::Index i = 0; i < b.ids.size(); ++i) b.ids.data()[i] = std::int64_t(rng.next() % 64);
  b.labels = b.ids;
  for (lora::Index t = 5; t < kT; ++t) b.mask(3, t) = 0, b.labels(3, t) = -100;
  b.labels(2, 2) = b.labels(2, 3) = -100;
  return b;
}

struct Trainer {
  const lora::PeftConfig& peft;
  Model model;
  lora::AdamW<double> opt;
  explicit Trainer(double dropout = 0) : peft(config(dropout)), model(kLlama, &peft) { opt.add(model.parameters()); }

  // One optimizer step on global batch `step` (warmup + cosine, clipping); with dp, on this
  // rank's shard and the all-reduced gradients. Returns the global batch's loss.
  double step(lora::DataParallel* dp) {
    const Batch b = batch(opt.steps());
    const auto [begin, rows] = dp ? dp->shard(kBatch) : std::pair<lora::Index, lora::Index>(0, kBatch);
    opt.set_lr(lora::warmup_cosine_lr(2e-2, opt.steps(), 1, 6));
    model.zero_grad();
    const Ids mask = b.mask.middleRows(begin, rows), labels = b.labels.middleRows(begin, rows);
    const auto r = lora::causal_lm_loss<double>(model.forward_train(b.ids.middleRows(begin, rows), mask), labels);
    model.backward(r.grad);
    double loss = r.loss;
    if (dp) loss = dp->all_reduce_gradients(model.parameters(), r.loss, double(r.count)).loss;
    lora::clip_grad_norm(model.parameters(), 1.0);
    opt.step();
    return loss;
  }
  void train(long steps, lora::DataParallel* dp) {
    for (long k = 0; k < steps; ++k) step(dp);
  }
};

// max |a − b| / max |b| over every parameter
double relative_difference(Model& a, Model& b) {
  double diff = 0, scale = 0;
  const auto pa = a.parameters(), pb = b.parameters();
  EXPECT_EQ(pa.size(), pb.size());
  for (std::size_t i = 0; i < pa.size() && i < pb.size(); ++i) {
    diff = std::max(diff, (pa[i].value - pb[i].value).cwiseAbs().maxCoeff());
    scale = std::max(scale, pb[i].value.cwiseAbs().maxCoeff());
  }
  return diff / scale;
}

// The unstopped one-process run, trained once per process.
Trainer& reference() {
  static Trainer* run = [] {
    auto* r = new Trainer;
    r->train(6, nullptr);
    return r;
  }();
  return *run;
}

std::string shared_dir(const std::string& name) {
  return (fs::temp_directory_path() / ("lora_test_distributed." + name)).string();
}

// Rank 0 writes a checkpoint of run (with every rank's dropout streams in its progress); every
// rank returns its directory once it is complete.
std::string checkpoint(lora::DataParallel& dp, Trainer& run, const std::string& out) {
  const nlohmann::json progress = {{"ranks", dp.gather_dropout(run.model.modules())}};
  std::string dir;
  if (dp.rank() == 0)
    dir = lora::save_training_checkpoint<double>(
        out, [&](const std::string& d) { run.model.save_adapter(d, run.peft, lora::Dtype::F64); }, run.model.modules(), run.opt,
        progress);
  dir = dp.broadcast_string(dir);
  return dir;
}

void resume(lora::DataParallel& dp, Trainer& run, const std::string& dir) {
  run.model.load_adapter(dir);
  run.opt = lora::AdamW<double>();
  run.opt.add(run.model.parameters());
  const nlohmann::json progress = lora::resume_training(dir, run.model.modules(), run.opt);
  dp.restore_dropout(run.model.modules(), progress.at("ranks"));
  dp.broadcast(run.model.parameters());
}

TEST(Distributed, TwoRanksEqualOneRankWithTheWholeBatch) {
  lora::DataParallel dp;
  ASSERT_EQ(dp.size(), 2) << "run under mpirun -np 2";
  Trainer run;
  // rank 1 starts elsewhere: broadcast gives it rank 0's values
  if (dp.rank() == 1)
    for (auto p : run.model.parameters()) p.value.array() += 0.5;
  dp.broadcast(run.model.parameters());
  EXPECT_EQ(dp.bytes_per_reduction(), (run.model.trainable_parameters() + 2) * sizeof(double));

  Trainer one;  // this rank alone with the whole batch, step by step beside it
  for (int k = 0; k < 6; ++k) {
    const double global = run.step(&dp), whole = one.step(nullptr);
    EXPECT_NEAR(global, whole, 1e-12 * whole) << "step " << k;
  }
  dp.check_agreement(run.model.parameters(), "after 6 steps");
  const double d = relative_difference(run.model, reference().model);
  EXPECT_LT(d, 1e-12);
  Trainer untrained;
  EXPECT_GT(relative_difference(run.model, untrained.model), 1e-3);  // it trained
  if (dp.rank() == 0) std::printf("2 ranks vs 1, 6 AdamW steps: max relative parameter difference %.3g\n", d);
  EXPECT_EQ(dp.reductions(), 6);
}

// A mean of per-rank means (what averaging the ranks' gradients gives) is not the global mean:
// the ranks count different numbers of tokens. The test that the weighting is needed.
TEST(Distributed, PerRankMeansWouldDiffer) {
  lora::DataParallel dp;
  Trainer run;
  dp.broadcast(run.model.parameters());
  const Batch b = batch(0);
  const auto [begin, rows] = dp.shard(kBatch);
  const Ids mask = b.mask.middleRows(begin, rows), labels = b.labels.middleRows(begin, rows);
  const auto r = lora::causal_lm_loss<double>(run.model.forward_train(b.ids.middleRows(begin, rows), mask), labels);
  EXPECT_EQ(r.count, dp.rank() == 0 ? 14 : 9);
  double mean_of_means = r.loss / 2, other = 0;
  MPI_Allreduce(&mean_of_means, &other, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  run.model.backward(r.grad);
  const double global = dp.all_reduce_gradients(run.model.parameters(), r.loss, double(r.count)).loss;
  Trainer one;
  const double whole = lora::causal_lm_loss<double>(one.model.forward_train(b.ids, b.mask), b.labels).loss;
  EXPECT_NEAR(global, whole, 1e-13 * whole);
  EXPECT_GT(std::abs(other - whole), 1e-6);
}

TEST(Distributed, ResumeOnAnotherNumberOfRanks) {
  lora::DataParallel world;
  lora::DataParallel alone(MPI_COMM_SELF);

  // 2 ranks train 3 steps and checkpoint; each rank alone resumes and trains 3 more
  const std::string out = shared_dir("two_to_one");
  if (world.rank() == 0) fs::remove_all(out);
  Trainer first;
  world.broadcast(first.model.parameters());
  first.train(3, &world);
  const std::string dir = checkpoint(world, first, out);
  {
    Trainer second;
    resume(alone, second, dir);
    EXPECT_EQ(second.opt.steps(), 3);
    second.train(3, &alone);
    EXPECT_LT(relative_difference(second.model, reference().model), 1e-12);
  }
  world.barrier();  // every rank has read it

  // rank 0 alone trains 3 steps and checkpoints; 2 ranks resume and train 3 more
  const std::string out1 = shared_dir("one_to_two");
  std::string dir1;
  if (world.rank() == 0) {
    fs::remove_all(out1);
    Trainer solo;
    alone.broadcast(solo.model.parameters());
    solo.train(3, &alone);
    dir1 = checkpoint(alone, solo, out1);
  }
  dir1 = world.broadcast_string(dir1);
  Trainer second;
  resume(world, second, dir1);
  second.train(3, &world);
  world.check_agreement(second.model.parameters());
  EXPECT_LT(relative_difference(second.model, reference().model), 1e-12);
  world.barrier();
  if (world.rank() == 0) fs::remove_all(out), fs::remove_all(out1);
}

// Dropout: each rank draws its own masks, the same on every run, and a resume on as many ranks
// gives each rank its own streams back (the run continues bit for bit).
TEST(Distributed, DropoutStreamsPerRankSurviveAResume) {
  lora::DataParallel dp;
  const auto train = [&](Trainer& run, long steps) {
    for (long k = 0; k < steps; ++k) run.step(&dp);
  };
  const auto start = [&](Trainer& run) {
    dp.broadcast(run.model.parameters());
    dp.separate_dropout(run.model.modules());
  };
  Trainer whole(0.1);
  start(whole);
  const auto words = dp.gather_dropout(whole.model.modules());
  EXPECT_NE(words["dropout"][0], words["dropout"][1]);  // the ranks' streams differ
  Trainer again(0.1);
  start(again);
  EXPECT_EQ(dp.gather_dropout(again.model.modules()), words);  // and are the same every run
  train(whole, 4);

  const std::string out = shared_dir("dropout");
  if (dp.rank() == 0) fs::remove_all(out);
  Trainer first(0.1);
  start(first);
  train(first, 2);
  const std::string dir = checkpoint(dp, first, out);
  Trainer second(0.1);
  resume(dp, second, dir);
  EXPECT_EQ(dp.gather_dropout(second.model.modules()), dp.gather_dropout(first.model.modules()));
  train(second, 2);
  const auto pa = whole.model.parameters(), pb = second.model.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) EXPECT_EQ(pa[i].value, pb[i].value) << pa[i].name;
  dp.check_agreement(second.model.parameters());
  dp.barrier();
  if (dp.rank() == 0) fs::remove_all(out);
}

TEST(Distributed, BadInputFailsOnEveryRankAndChangesNothing) {
  lora::DataParallel dp;
  // a global batch the ranks cannot share equally
  EXPECT_LORA_ERROR(dp.shard(3), "a global batch of 3 examples does not divide among 2 ranks");
  Trainer run;
  // all_reduce before broadcast
  EXPECT_LORA_ERROR(dp.all_reduce_gradients(run.model.parameters(), 1.0, 1.0), "call broadcast(params) first");
  // ranks with different trainable parameters: rank 1 trains the norms too
  if (dp.rank() == 1) run.model.set_trainable(std::vector<std::string>{"model.norm"});
  const auto before = run.model.parameters()[0].value.eval();
  EXPECT_LORA_ERROR(dp.broadcast(run.model.parameters()), "(names and shapes) of rank 1");
  EXPECT_EQ(run.model.parameters()[0].value, before);
  // parameters that drift apart are found
  Trainer same;
  dp.broadcast(same.model.parameters());
  dp.check_agreement(same.model.parameters());
  if (dp.rank() == 1) same.model.parameters()[3].value(0, 0) += 1e-15;
  EXPECT_LORA_ERROR(dp.check_agreement(same.model.parameters(), "after step 7"),
                    "the parameters of rank(s) 1 differ from rank 0's after step 7");
  // a saved set of streams that does not fit
  const nlohmann::json misfit = {{"world_size", 2}, {"dropout", {{"00"}, {"00"}}}};
  EXPECT_LORA_ERROR(dp.restore_dropout(same.model.modules(), misfit), "rank " + std::to_string(dp.rank()) + "'s streams do not fit");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed) std::fprintf(stderr, "rank %d: tests failed\n", rank);
  MPI_Finalize();
  return any;
}
