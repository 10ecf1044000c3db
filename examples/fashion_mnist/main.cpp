// fashion_mnist: LoRA against full fine-tuning, the head alone, a residual adapter, adapter-,
// prefix- and ladder side-tuning, on a small vision transformer and real images (Debian's
// dataset-fashion-mnist).
//
// 1. Pre-train: a ViT (7×7 patches -> 16 tokens, d 128, 2 blocks, 4 heads, MLP 256) learns
//    classes 0–4 (T-shirt, Trouser, Pullover, Dress, Coat) from the first 50,000 training images.
// 2. Shift the task to all ten classes. The head grows to ten outputs (rows 0–4 are the
//    pre-trained head, rows 5–9 start at zero) and eight copies of the model adapt on the last
//    10,000 training images, each by one method: the head only; LoRA on q,v; LoRA on q,k,v,o and
//    the MLP; the residual adapter x += x·U·V after attention; adapter-tuning (Houlsby
//    bottlenecks after the attention and the MLP); prefix-tuning (8 learned keys and values per
//    attention, trained through an MLP that is folded away afterwards); ladder side-tuning (a
//    side network of width d/8 reading each block's output; no backward through the
//    backbone); full fine-tuning. The head trains in every method.
// 3. A table: test accuracy before and after, trainable parameters, the peak heap while training
//    (measured: heap_count.hpp), seconds per epoch, and the inference latency at batch 1 after
//    training (LoRA merged and unmerged) against the base model's.
// 4. The LoRA models are merged: the merged model must predict the same classes; unmerge must
//    give back the base weights bit for bit, as they were before training (which LoRA never changed).
// 5. OUT/results.csv (one row per method and epoch) and OUT/curves.svg (loss and accuracy curves).
// Also: the full fine-tune's updates of the twelve block linears, each compressed to rank 8 by a
// truncated SVD (compress_delta), and the accuracy that keeps.
//
//   fashion_mnist [--quick] [--epochs N] [--threads N] [--seed S] [--out DIR] [--data DIR]
//                 [--checkpoint-every N] [--max-steps N] [--resume DIR]
//
// --quick uses small subsets (for tests); --epochs sets the adaptation epochs (pre-training takes
// as many). Results are deterministic for a given seed and thread count. --checkpoint-every N
// writes a checkpoint every N steps of each phase, --max-steps N stops after N optimizer steps in
// all (leaving a checkpoint), --resume DIR continues the run whose --out was DIR (resume.hpp).
// Under mpirun (a build with MPI) each process is a rank that trains on its share of every batch:
//   mpirun -np 2 fashion_mnist --threads 1
#include "idx.hpp"
#include "resume.hpp"
#include "../common/heap_count.hpp"
#include "../common/latency.hpp"
#include "../common/json_files.hpp"
#include "../common/ranks.hpp"
#include "../common/report.hpp"
#include "vit.hpp"

#include <lora/lora.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

using Scalar = float;
using Mat = lora::Mat<Scalar>;
using Model = Vit<Scalar>;
using namespace fashion;
using demo::read_json;
using demo::write_json;
namespace fs = std::filesystem;

namespace {

struct Data {
  Mat images;  // (n, 784), normalised
  std::vector<std::int64_t> labels;
  lora::Index size() const { return images.rows(); }
};

Data load(const std::string& dir, const std::string& split) {
  Data d;
  d.images = lora::read_idx_images<Scalar>(dir + "/" + split + "-images-idx3-ubyte.gz");
  d.images = (d.images.array() - Scalar(0.2860)) / Scalar(0.3530);  // the training set's mean and std
  for (int label : lora::read_idx_labels(dir + "/" + split + "-labels-idx1-ubyte.gz")) d.labels.push_back(label);
  if (static_cast<lora::Index>(d.labels.size()) != d.images.rows())
    lora::detail::fail(dir, ": ", split, " has ", d.images.rows(), " images and ", d.labels.size(), " labels");
  return d;
}

// Rows [begin, end) of d whose label is below max_label, at most limit of them.
Data subset(const Data& d, lora::Index begin, lora::Index end, int max_label, lora::Index limit) {
  std::vector<lora::Index> rows;
  for (lora::Index i = begin; i < end && lora::Index(rows.size()) < limit; ++i)
    if (d.labels[std::size_t(i)] < max_label) rows.push_back(i);
  Data s;
  s.images.resize(lora::Index(rows.size()), d.images.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    s.images.row(lora::Index(i)) = d.images.row(rows[i]);
    s.labels.push_back(d.labels[std::size_t(rows[i])]);
  }
  return s;
}

struct Score {
  double loss = 0, accuracy = 0;
  std::vector<lora::Index> predicted;
};

// Batches of 256 images: the activations stay in cache.
Score evaluate(const Model& m, const Data& d) {
  Score s;
  const lora::Index batch = 256;
  for (lora::Index b = 0; b < d.size(); b += batch) {
    const lora::Index n = std::min(batch, d.size() - b);
    const Mat logits = m.forward(d.images.middleRows(b, n));
    const std::vector<std::int64_t> labels(d.labels.begin() + b, d.labels.begin() + b + n);
    s.loss += double(lora::cross_entropy<Scalar>(logits, labels).loss) * double(n);
    for (lora::Index i = 0; i < n; ++i) {
      lora::Index k;
      logits.row(i).maxCoeff(&k);
      s.predicted.push_back(k);
      s.accuracy += k == labels[std::size_t(i)];
    }
  }
  s.loss /= double(d.size());
  s.accuracy /= double(d.size());
  return s;
}

// Inference latency per image at batch 1, in µs, of m and of the base model, image by image in
// turn (paired_latency): each the best of `passes` passes over the first `count` images.
struct Latency {
  double us, base_us;
};
Latency latency(const Model& m, const Model& base, const Data& d, lora::Index count, int passes) {
  const demo::Latency l = demo::paired_latency(long(count), passes, [&](int which, long i) {
    return double((which == 0 ? m : base).forward(d.images.row(i))(0, 0));
  });
  return {1e6 * l.seconds, 1e6 * l.base_seconds};
}

std::string decimals(double v, int digits) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", digits, v);
  return text;
}
std::string signed_percent(double fraction) {
  char text[64];
  std::snprintf(text, sizeof text, "%+.1f %%", 100 * fraction);
  return text;
}

struct Schedule {
  int epochs;
  lora::Index batch;
  double lr;
};

// AdamW (weight decay 0.01), warmup 5% + cosine, gradient norm clipped at 1, batches of a fresh
// permutation every epoch. Test accuracy after every epoch. Checkpoints go to phase_dir (every
// stops.every steps, and when stops.max_steps is reached), and a checkpoint there is resumed.
// Under mpirun each rank takes its share of every batch and the gradients are all-reduced.
Training train(Model& m, const Data& data, const Data& test, const Schedule& s, const std::string& label,
               lora::detail::Rng& rng, const std::string& phase_dir, Stops& stops, demo::Ranks& ranks) {
  lora::AdamWOptions o;
  o.lr = s.lr;
  o.weight_decay = 0.01;
  lora::AdamW<Scalar> opt(o);
  const auto params = m.parameters();
  opt.add(params);
  ranks.broadcast(params);
  const long steps_per_epoch = long((data.size() + s.batch - 1) / s.batch), total = steps_per_epoch * s.epochs;
  std::vector<lora::Index> order(std::size_t(data.size()));
  std::iota(order.begin(), order.end(), 0);
  Training t;
  const long segment = std::max(1L, steps_per_epoch / 8);
  double segment_sum = 0, sum = 0, seconds_before = 0;  // seconds_before: of the epoch, before a resume
  int first_epoch = 0;
  long first_batch = 0;
  const lora::ModuleMap<Scalar> no_dropout;  // the ViT's layers draw no dropout masks
  const std::string resumed = lora::latest_training_checkpoint(phase_dir);
  if (!resumed.empty()) {  // everything read and checked before anything changes
    const lora::SafeTensors st = lora::SafeTensors::open(resumed + "/model.safetensors");
    std::vector<Mat> values;
    for (const auto& p : params) {
      values.push_back(st.matrix<Scalar>(p.name));
      if (values.back().rows() != p.value.rows() || values.back().cols() != p.value.cols())
        lora::detail::fail(resumed, ": ", p.name, " is ", lora::detail::shape(values.back().rows(), values.back().cols()),
                           ", the model's ", lora::detail::shape(p.value.rows(), p.value.cols()));
    }
    const lora::Mat<std::int64_t> saved_order = st.integers("order");
    if (saved_order.size() != data.size()) lora::detail::fail(resumed, ": the data order has ", saved_order.size(), " entries, not ", data.size());
    const nlohmann::json p = lora::resume_training(resumed, no_dropout, opt);
    try {
      first_epoch = p.at("epoch");
      first_batch = p.at("batch");
      sum = p.at("sum");
      segment_sum = p.at("segment_sum");
      seconds_before = p.at("seconds");
      t = training_from_json(p.at("training"));
      rng_from_json(rng, p.at("rng"), resumed);
    } catch (const nlohmann::json::exception& e) {
      lora::detail::fail(resumed, ": progress: ", e.what());
    }
    for (std::size_t i = 0; i < params.size(); ++i) lora::MatMap<Scalar>(params[i].value) = values[i];
    std::copy(saved_order.data(), saved_order.data() + saved_order.size(), order.begin());
    stops.taken += opt.steps();
    std::printf("  %s: resumed at step %ld from %s\n", label.c_str(), opt.steps(), resumed.c_str());
  }
  // The state before batch b of epoch e (that epoch's order already drawn).
  const auto checkpoint = [&](int e, long b, double seconds) {
    const nlohmann::json p = {{"epoch", e}, {"batch", b}, {"sum", sum}, {"segment_sum", segment_sum}, {"seconds", seconds},
                              {"training", to_json(t)}, {"rng", to_json(rng)}};
    const auto write = [&](const std::string& dir) {
      lora::SafeTensorsBuilder tensors;
      for (const auto& q : params) tensors.add(q.name, q.value);
      tensors.add("order", Eigen::Map<const lora::Mat<std::int64_t>>(order.data(), 1, lora::Index(order.size())));
      tensors.save(dir + "/model.safetensors");
    };
    ranks.check_agreement(params, "at step " + std::to_string(opt.steps()) + " of " + label);
    if (ranks.writer()) lora::save_training_checkpoint<Scalar>(phase_dir, write, no_dropout, opt, p);
    ranks.barrier();
  };
  Mat x;
  std::vector<std::int64_t> y;
  long step = opt.steps();
  for (int e = first_epoch; e < s.epochs; ++e) {
    const bool continuing = !resumed.empty() && e == first_epoch;
    if (!continuing) {
      for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[std::size_t(rng.uniform() * double(i))]);
      sum = 0;
      seconds_before = 0;
    }
    Progress bar(label + " epoch " + std::to_string(e + 1) + "/" + std::to_string(s.epochs), steps_per_epoch);
    for (long b = continuing ? first_batch : 0; b < steps_per_epoch; ++b, ++step) {
      if (stops.max_steps && stops.taken >= stops.max_steps) {
        checkpoint(e, b, seconds_before + bar.finish());
        throw Stopped{};
      }
      const lora::Index begin = b * s.batch, n = std::min(s.batch, data.size() - begin);
      const auto [first, rows] = ranks.shard(n);  // this rank's rows of the batch
      x.resize(rows, data.images.cols());
      y.resize(std::size_t(rows));
      for (lora::Index i = 0; i < rows; ++i) {
        const lora::Index r = order[std::size_t(begin + first + i)];
        x.row(i) = data.images.row(r);
        y[std::size_t(i)] = data.labels[std::size_t(r)];
      }
      opt.set_lr(lora::warmup_cosine_lr(s.lr, step, total / 20, total));
      const auto loss = lora::cross_entropy<Scalar>(m.forward_train(x), y);
      m.zero_grad();
      m.backward(loss.grad);
      const double batch_loss = ranks.all_reduce(params, loss.loss, double(loss.count));  // the whole batch's
      lora::clip_grad_norm(params, 1.0);
      opt.step();
      ++stops.taken;
      sum += batch_loss;
      segment_sum += batch_loss;
      if ((b + 1) % segment == 0) {
        t.at.push_back(e + double(b + 1) / double(steps_per_epoch));
        t.loss.push_back(segment_sum / double(segment));
        segment_sum = 0;
      }
      bar.update(b + 1, sum / double(b + 1));
      if (stops.every && (step + 1) % stops.every == 0) checkpoint(e, b + 1, seconds_before + bar.seconds());
    }
    segment_sum = 0;  // a segment does not straddle epochs
    const double seconds = seconds_before + bar.finish();
    t.peak_heap = std::max(t.peak_heap, double(demo::heap::peak()));  // the training steps' peak, not evaluation's
    const Score score = evaluate(m, test);
    demo::heap::reset_peak();
    t.epochs.push_back({sum / double(steps_per_epoch), score.accuracy, seconds});
    std::printf("  %-28s epoch %d/%d  loss %.4f  test accuracy %.4f  %.1fs\n", label.c_str(), e + 1, s.epochs,
                t.epochs.back().train_loss, score.accuracy, seconds);
    std::fflush(stdout);
  }
  ranks.check_agreement(params, "after " + label);
  t.steps = total;
  return t;
}

struct Method {
  std::string name, key;
  std::vector<std::string> targets;  // LoRA target modules
  int adapter_rank;                  // residual adapter
  lora::Index bottleneck;            // adapter-tuning's bottleneck size
  lora::Index prefix;                // prefix-tuning's length (trained through an MLP of 32, then folded)
  int ladder;                        // ladder side-tuning's reduction factor (0: none)
  bool full;                         // every weight trains
  double lr;
};

struct Result {
  std::string name;
  lora::Index trainable, total;
  double accuracy, seconds_per_epoch;
  Training training;
  double heap_mib = 0;  // peak training heap above what was live before the model was built
  // Batch 1 after training (merged, for LoRA; unmerged: LoRA only), each over the base model's
  // latency measured beside it.
  double latency_us = 0, latency_ratio = 0, unmerged_latency_us = 0, unmerged_latency_ratio = 0;
};

bool same_state(const std::map<std::string, Mat>& a, const std::map<std::string, Mat>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, m] : a) {
    const auto it = b.find(name);
    if (it == b.end() || it->second.rows() != m.rows() || it->second.cols() != m.cols() ||
        std::memcmp(it->second.data(), m.data(), sizeof(Scalar) * std::size_t(m.size())) != 0)
      return false;
  }
  return true;
}

// A whole non-negative number, or -1.
long number(const char* s) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  return *s && *end == 0 && v >= 0 ? v : -1;
}

int usage() {
  std::fprintf(stderr,
               "usage: fashion_mnist [--quick] [--epochs N] [--threads N] [--seed S] [--out DIR] [--data DIR]\n"
               "                     [--checkpoint-every N] [--max-steps N] [--resume DIR]\n"
               "  --quick      small subsets, for tests (seconds)\n"
               "  --epochs N   adaptation epochs (default 4, 2 with --quick; pre-training takes as many)\n"
               "  --threads N  threads for Eigen (default: all cores)\n"
               "  --seed S     seed of every initialisation and shuffle (default 1)\n"
               "  --out DIR    where results.csv and curves.svg go (default fashion_mnist_out)\n"
               "  --data DIR   Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)\n"
               "  --checkpoint-every N  a checkpoint every N steps of each phase, in OUT/checkpoints\n"
               "  --max-steps N         stop after N optimizer steps in all, leaving a checkpoint\n"
               "  --resume DIR          continue the run whose --out was DIR, with its settings\n");
  return 2;
}

// What decides the results (a resumed run takes them from OUT/run.json).
struct Settings {
  bool quick = false;
  int epochs = 0, threads = 0;
  std::uint64_t seed = 1;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  nlohmann::json to_json() const {
    return {{"quick", quick}, {"epochs", epochs}, {"threads", threads}, {"seed", seed}, {"data", data_dir}};
  }
  void from_json(const nlohmann::json& j) {
    quick = j.at("quick"), epochs = j.at("epochs"), threads = j.at("threads"), seed = j.at("seed"), data_dir = j.at("data");
  }
};

}  // namespace

int main(int argc, char** argv) try {
  demo::Ranks ranks(argc, argv);
  Settings set;
  std::string out = "fashion_mnist_out", resume, fixed;
  Stops stops;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a != "--checkpoint-every" && a != "--max-steps" && a != "--resume") fixed = a;
    if (a == "--quick") set.quick = true;
    else if (a == "--epochs" && has_value && number(argv[i + 1]) >= 1) set.epochs = int(number(argv[++i]));
    else if (a == "--threads" && has_value) set.threads = int(number(argv[++i]));
    else if (a == "--seed" && has_value && number(argv[i + 1]) >= 0) set.seed = std::uint64_t(number(argv[++i]));
    else if (a == "--out" && has_value) out = argv[++i];
    else if (a == "--data" && has_value) set.data_dir = argv[++i];
    else if (a == "--checkpoint-every" && has_value && number(argv[i + 1]) >= 0) stops.every = number(argv[++i]);
    else if (a == "--max-steps" && has_value && number(argv[i + 1]) >= 0) stops.max_steps = number(argv[++i]);
    else if (a == "--resume" && has_value) resume = argv[++i];
    else return usage();
  }
  if (set.threads < 0) return usage();  // not a number
  if (!resume.empty()) {
    if (!fixed.empty())
      lora::detail::fail(fixed, " with --resume: the run continues with its own settings (", resume,
                         "/run.json); only --max-steps and --checkpoint-every may be given");
    out = resume;
    try {
      set.from_json(read_json(resume + "/run.json"));
    } catch (const nlohmann::json::exception& e) {
      lora::detail::fail(resume, "/run.json: not a fashion_mnist run's settings: ", e.what());
    }
  }
  if (set.epochs == 0) set.epochs = set.quick ? 2 : 4;
  lora::set_num_threads(set.threads);
  set.threads = lora::num_threads();
  const bool quick = set.quick;
  const int epochs = set.epochs;
  const std::uint64_t seed = set.seed;
  const std::string& data_dir = set.data_dir;

  if (!fs::exists(data_dir + "/train-images-idx3-ubyte.gz"))
    lora::detail::fail("no Fashion-MNIST in ", data_dir, " (install it with: apt-get install dataset-fashion-mnist, or pass --data DIR)");
  fs::create_directories(out);  // fail before training, not after it
  const Data train_set = load(data_dir, "train"), test_set = load(data_dir, "t10k");
  const lora::Index pool = 50000, limit = quick ? 2000 : pool, adapt_n = quick ? 1500 : 10000, test_n = quick ? 1000 : 10000;
  const lora::Index latency_images = quick ? 200 : 500;
  const int latency_passes = quick ? 4 : 8;
  const Data pretrain = subset(train_set, 0, pool, 5, limit);
  const Data adapt = subset(train_set, train_set.size() - adapt_n, train_set.size(), 10, adapt_n);
  const Data test = subset(test_set, 0, test_n, 10, test_n), test_base = subset(test_set, 0, test_n, 5, test_n);
  // Batches of 128 (pre-training) and 64 (adaptation), and each epoch's last one, must divide among
  // the ranks: checked before anything is written.
  for (const auto& [n, batch] : {std::pair<lora::Index, lora::Index>{pretrain.size(), 128}, {adapt.size(), 64}}) {
    ranks.shard(batch);
    if (n % batch) ranks.shard(n % batch);
  }
  const std::string checkpoints = out + "/checkpoints";
  if (resume.empty() && ranks.writer()) {  // a new run: earlier runs' checkpoints go
    fs::remove_all(checkpoints);
    write_json(out + "/run.json", set.to_json());
  }
  ranks.barrier();
  std::printf("Fashion-MNIST: pre-train on %ld images of classes 0-4, adapt on %ld images of all 10 classes, test on %ld\n",
              long(pretrain.size()), long(adapt.size()), long(test.size()));
  std::printf("threads %d%s, seed %llu%s\n\n", lora::num_threads(),
              ranks.size() > 1 ? lora::detail::cat(" on each of ", ranks.size(), " ranks").c_str() : "", (unsigned long long)seed,
              quick ? ", --quick" : "");

  const lora::Index d = 128;
  const int blocks = 2;
  lora::EncoderConfig base_config;
  base_config.heads = 4;
  base_config.d_ff = 256;
  base_config.seed = seed;
  base_config.lora.r = 8;
  base_config.lora.alpha = 16;
  base_config.lora.exact_unmerge = true;
  lora::detail::Rng rng(seed + 12345);

  const auto stopped = [&] {
    std::printf("fashion_mnist: stopped after %ld optimizer steps (--max-steps); continue with --resume %s\n", stops.taken, out.c_str());
    return 0;
  };

  // ---- 1. pre-training -------------------------------------------------------------------
  // A finished phase leaves done.json (its results and the shuffle stream after it); a resume
  // reads it instead of training again.
  Model base(d, blocks, 5, base_config);
  std::printf("1. pre-training on classes 0-4 (%ld parameters)\n", long(base.parameter_count()));
  Training pre;
  const std::string pre_dir = checkpoints + "/pretrain";
  try {
    if (fs::exists(pre_dir + "/done.json")) {
      const nlohmann::json j = read_json(pre_dir + "/done.json");
      pre = training_from_json(j.at("training"));
      rng_from_json(rng, j.at("rng"), pre_dir + "/done.json");
      const lora::SafeTensors st = lora::SafeTensors::open(pre_dir + "/base.safetensors");
      std::map<std::string, Mat> state;
      for (const lora::TensorInfo& t : st.tensors()) state.emplace(t.name, st.matrix<Scalar>(t.name));
      base.load_state(state);  // everything below the head, then the head
      base.head() = lora::Linear<Scalar>(state.at("head.weight"), lora::Vec<Scalar>(state.at("head.bias").transpose()));
      stops.taken += pre.steps;
      std::printf("  pre-trained before the resume: test accuracy %.4f\n", pre.epochs.back().test_accuracy);
    } else {
      base.set_base_trainable(true);
      pre = train(base, pretrain, test_base, {epochs, 128, 2e-3}, "pre-training", rng, pre_dir, stops, ranks);
      if (ranks.writer()) {
        lora::SafeTensorsBuilder st;
        for (const auto& [name, w] : base.state()) st.add(name, w);
        st.add("head.weight", base.head().weight()).add("head.bias", base.head().bias().transpose());
        fs::create_directories(pre_dir);
        st.save(pre_dir + "/base.safetensors");
        write_json(pre_dir + "/done.json", {{"training", to_json(pre)}, {"rng", to_json(rng)}});
        for (const auto& [step, ck] : lora::training_checkpoints(pre_dir)) fs::remove_all(ck);
      }
      ranks.barrier();
    }
  } catch (const nlohmann::json::exception& e) {
    lora::detail::fail(pre_dir, "/done.json: ", e.what());
  } catch (const Stopped&) {
    return stopped();
  }
  const auto base_state = base.state();

  // The ten-class head: the pre-trained rows for classes 0-4, zeros for the new ones.
  Mat head_W = Mat::Zero(10, d);
  lora::Vec<Scalar> head_b = lora::Vec<Scalar>::Zero(10);
  head_W.topRows(5) = base.head().weight();
  head_b.head(5) = base.head().bias();
  const lora::Linear<Scalar> head10(head_W, head_b);

  Model start(d, blocks, 10, base_config);
  start.load_state(base_state);
  start.head() = head10;
  const Score before = evaluate(start, test);
  std::printf("\n2. the task shifts to all 10 classes: before adaptation the model scores %.4f on the test set\n", before.accuracy);

  // ---- 2. adaptation, five ways ----------------------------------------------------------
  const std::vector<Method> methods = {
      {"head only", "head", {}, 0, 0, 0, 0, false, 3e-3},
      {"LoRA q,v (r=8)", "lora_qv", {"q_proj", "v_proj"}, 0, 0, 0, 0, false, 3e-3},
      {"LoRA q,k,v,o,MLP (r=8)", "lora_all", {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, 0, 0, 0, 0, false, 3e-3},
      {"residual adapter (r=8)", "adapter", {}, 8, 0, 0, 0, false, 3e-3},
      {"adapter-tuning (m=32)", "adapter_tuning", {}, 0, 32, 0, 0, false, 3e-3},
      {"prefix-tuning (p=8)", "prefix", {}, 0, 0, 8, 0, false, 3e-3},
      {"ladder side-tuning (k=8)", "ladder", {}, 0, 0, 0, 8, false, 3e-3},
      {"full fine-tuning", "full", {}, 0, 0, 0, 0, true, 1e-3},
  };
  std::vector<Result> results;
  double compressed_accuracy = 0;
  bool ok = true;
  try {
    for (const Method& method : methods) {
      const std::string phase = checkpoints + "/" + method.key;
      if (fs::exists(phase + "/done.json")) {
        const nlohmann::json j = read_json(phase + "/done.json");
        results.push_back({method.name, j.at("trainable"), j.at("total"), j.at("accuracy"), j.at("seconds_per_epoch"),
                           training_from_json(j.at("training")), j.at("heap_mib"), j.at("latency_us"), j.at("latency_ratio"),
                           j.at("unmerged_latency_us"), j.at("unmerged_latency_ratio")});
        rng_from_json(rng, j.at("rng"), phase + "/done.json");
        ok &= j.at("ok").get<bool>();
        if (method.full) compressed_accuracy = j.at("compressed_accuracy");
        stops.taken += results.back().training.steps;
        std::printf("  %-28s trained before the resume: test accuracy %.4f\n", method.name.c_str(), results.back().accuracy);
        continue;
      }
      bool method_ok = true;
      lora::EncoderConfig c = base_config;
      c.target_modules = method.targets;
      c.adapter_rank = method.adapter_rank;
      c.bottleneck.size = method.bottleneck;
      c.prefix = {method.prefix, 32, 1.0, 0};
      // The attention's inference buffers (per thread, reused) are sized by the last forward: one
      // at batch 1 first, so every method starts from the same heap.
      (void)start.forward(test.images.topRows(1));
      const double heap_before = double(demo::heap::live());
      demo::heap::reset_peak();
      Model m(d, blocks, 10, c);
      if (method.ladder) m.add_ladder({method.ladder, 2, seed + 77});
      m.load_state(base_state);
      m.head() = head10;
      m.set_base_trainable(method.full);
      lora::Index trainable = 0;
      for (const auto& p : m.parameters()) trainable += p.value.size();
      Result r{method.name, trainable, m.parameter_count(), 0, 0, {}};
      r.training = train(m, adapt, test, {epochs, 64, method.lr}, method.name, rng, phase, stops, ranks);
      const auto& es = r.training.epochs;
      r.accuracy = es.back().test_accuracy;
      for (const Epoch& e : es) r.seconds_per_epoch += e.seconds / double(es.size());
      r.heap_mib = (r.training.peak_heap - heap_before) / (1024.0 * 1024.0);
      if (method.prefix) {  // the MLP folded away: the same predictions from the keys and values alone
        const auto trained = evaluate(m, test).predicted;
        m.fold_prefixes();
        const auto folded = evaluate(m, test).predicted;
        long same = 0;
        for (std::size_t i = 0; i < folded.size(); ++i) same += folded[i] == trained[i];
        std::printf("  prefix MLP folded away: %ld of %zu test predictions unchanged\n", same, folded.size());
        method_ok &= same == long(folded.size());
      }
      const Latency plain = latency(m, start, test, latency_images, latency_passes);
      r.latency_us = plain.us;
      r.latency_ratio = plain.us / plain.base_us;
      if (!method.full && !same_state(m.state(), base_state)) {
        std::printf("  FAILED: %s changed the frozen base weights\n", method.name.c_str());
        method_ok = false;
      }
      if (!method.targets.empty()) {  // ---- 4. merge, compare, unmerge
        const auto unmerged = evaluate(m, test).predicted;
        m.merge();
        r.unmerged_latency_us = r.latency_us;
        r.unmerged_latency_ratio = r.latency_ratio;
        const Latency merged_latency = latency(m, start, test, latency_images, latency_passes);
        r.latency_us = merged_latency.us;
        r.latency_ratio = merged_latency.us / merged_latency.base_us;
        const auto merged = evaluate(m, test).predicted;
        m.unmerge();
        long same = 0;
        for (std::size_t i = 0; i < merged.size(); ++i) same += merged[i] == unmerged[i];
        const bool restored = same_state(m.state(), base_state);
        std::printf("  merged: %ld of %zu test predictions unchanged; unmerged: base weights %s\n", same, merged.size(),
                    restored ? "restored bit for bit" : "NOT restored");
        method_ok &= same == long(merged.size()) && restored;
      }
      if (method.full) {  // ---- the full fine-tune's weight updates, compressed to rank 8 (svd.hpp)
        auto state = m.state();
        double rel = 0;
        int count = 0;
        for (auto& [name, w] : state)
          if (name.rfind("blocks.", 0) == 0 && name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 && w.rows() > 1) {
            const Mat& b = base_state.at(name);
            const auto low = lora::compress_delta<Scalar>(w, b, {8, 0});
            rel += low.error / low.singular_values.norm();
            ++count;
            w = b + low.B * low.A;
          }
        Model compressed(d, blocks, 10, base_config);
        compressed.load_state(state);
        compressed.head() = m.head();
        compressed_accuracy = evaluate(compressed, test).accuracy;
        std::printf("  the %d fine-tuned linear weights' updates at rank 8 (truncated SVD, mean relative error %.3f): "
                    "test accuracy %.4f\n", count, rel / count, compressed_accuracy);
      }
      method_ok &= r.accuracy > before.accuracy;
      ok &= method_ok;
      results.push_back(r);
      if (ranks.writer()) {
        write_json(phase + "/done.json", {{"trainable", r.trainable}, {"total", r.total}, {"accuracy", r.accuracy},
                                          {"seconds_per_epoch", r.seconds_per_epoch}, {"training", to_json(r.training)},
                                          {"heap_mib", r.heap_mib}, {"latency_us", r.latency_us}, {"latency_ratio", r.latency_ratio},
                                          {"unmerged_latency_us", r.unmerged_latency_us},
                                          {"unmerged_latency_ratio", r.unmerged_latency_ratio},
                                          {"rng", to_json(rng)}, {"ok", method_ok}, {"compressed_accuracy", compressed_accuracy}});
        for (const auto& [step, ck] : lora::training_checkpoints(phase)) fs::remove_all(ck);
      }
      ranks.barrier();
    }
  } catch (const Stopped&) {
    return stopped();
  } catch (const nlohmann::json::exception& e) {
    lora::detail::fail(checkpoints, ": a phase's done.json: ", e.what());
  }
  if (!ranks.writer()) return 0;  // rank 0 prints and writes the results

  // ---- 3. the table ----------------------------------------------------------------------
  const double full_acc = results.back().accuracy;
  std::printf("\n3. results (test accuracy before adaptation: %.4f; full fine-tuning with its weight updates compressed\n"
              "   to rank 8: %.4f)\n\n", before.accuracy, compressed_accuracy);
  const std::string heap_note = demo::heap::available() ? "" : " (not counted in this build)";
  std::printf("| method | test accuracy | vs full FT | trainable params | %% of model | peak training heap (MiB)%s | s/epoch "
              "| latency, batch 1 (us) | vs base |\n", heap_note.c_str());
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    std::string us = decimals(r.latency_us, 1), vs = signed_percent(r.latency_ratio - 1);
    if (r.unmerged_latency_us > 0) {
      us += " merged, " + decimals(r.unmerged_latency_us, 1) + " unmerged";
      vs += ", " + signed_percent(r.unmerged_latency_ratio - 1);
    }
    std::printf("| %s | %.4f | %+.4f | %ld | %.1f%% | %.2f | %.2f | %s | %s |\n", r.name.c_str(), r.accuracy, r.accuracy - full_acc,
                long(r.trainable), 100.0 * double(r.trainable) / double(r.total), r.heap_mib, r.seconds_per_epoch, us.c_str(),
                vs.c_str());
  }

  // ---- 5. results.csv and curves.svg -----------------------------------------------------
  std::ofstream csv(out + "/results.csv");
  csv << "method,epoch,train_loss,test_accuracy,seconds,trainable_params\n";
  auto rows = [&](const std::string& name, const std::vector<Epoch>& es, lora::Index trainable) {
    for (std::size_t e = 0; e < es.size(); ++e)
      csv << '"' << name << "\"," << e + 1 << ',' << es[e].train_loss << ',' << es[e].test_accuracy << ',' << es[e].seconds << ','
          << trainable << '\n';
  };
  rows("pre-training (classes 0-4)", pre.epochs, base.parameter_count());
  for (const Result& r : results) rows(r.name, r.training.epochs, r.trainable);
  if (!csv) lora::detail::fail("cannot write ", out, "/results.csv");
  Panel loss{"training loss (10 classes)", "mean over 1/8 epoch", {}}, acc{"test accuracy (10 classes)", "accuracy", {}};
  for (const Result& r : results) {
    Curve l{r.name, r.training.at, r.training.loss}, a{r.name, {0}, {before.accuracy}};
    for (std::size_t e = 0; e < r.training.epochs.size(); ++e)
      a.x.push_back(double(e + 1)), a.y.push_back(r.training.epochs[e].test_accuracy);
    loss.curves.push_back(l);
    acc.curves.push_back(a);
  }
  write_svg(out + "/curves.svg", {loss, acc}, "epoch");
  std::printf("\nwrote %s/results.csv and %s/curves.svg\n", out.c_str(), out.c_str());
  std::printf("fashion_mnist: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
  return 1;
}
