// fashion_mnist: LoRA against full fine-tuning, the head alone and the residual adapter, on a
// small vision transformer and real images (Debian's dataset-fashion-mnist).
//
// 1. Pre-train: a ViT (7×7 patches -> 16 tokens, d 128, 2 blocks, 4 heads, MLP 256) learns
//    classes 0–4 (T-shirt, Trouser, Pullover, Dress, Coat) from the first 50,000 training images.
// 2. Shift the task to all ten classes. The head grows to ten outputs (rows 0–4 are the
//    pre-trained head, rows 5–9 start at zero) and five copies of the model adapt on the last
//    10,000 training images, each by one method: the head only; LoRA on q,v; LoRA on q,k,v,o and
//    the MLP; the residual adapter x += x·U·V after attention; full fine-tuning. The head trains
//    in every method.
// 3. A table: test accuracy before and after, trainable parameters, memory of parameters +
//    gradients + AdamW state, seconds per epoch.
// 4. The LoRA models are merged: the merged model must predict the same classes; unmerge must
//    give back the base weights bit for bit, as they were before training (which LoRA never changed).
// 5. OUT/results.csv (one row per method and epoch) and OUT/curves.svg (loss and accuracy curves).
// Also: the full fine-tune's updates of the twelve block linears, each compressed to rank 8 by a
// truncated SVD (compress_delta), and the accuracy that keeps.
//
//   fashion_mnist [--quick] [--epochs N] [--threads N] [--seed S] [--out DIR] [--data DIR]
//
// --quick uses small subsets (for tests); --epochs sets the adaptation epochs (pre-training takes
// as many). Results are deterministic for a given seed and thread count.
#include "idx.hpp"
#include "../common/report.hpp"
#include "vit.hpp"

#include <lora/lora.hpp>

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

struct Epoch {
  double train_loss, test_accuracy, seconds;
};

struct Training {
  std::vector<Epoch> epochs;
  std::vector<double> at, loss;  // the mean loss of every eighth of an epoch, at its end (in epochs)
};

struct Schedule {
  int epochs;
  lora::Index batch;
  double lr;
};

// AdamW (weight decay 0.01), warmup 5% + cosine, gradient norm clipped at 1, batches of a fresh
// permutation every epoch. Test accuracy after every epoch.
Training train(Model& m, const Data& data, const Data& test, const Schedule& s, const std::string& label,
                         lora::detail::Rng& rng) {
  lora::AdamWOptions o;
  o.lr = s.lr;
  o.weight_decay = 0.01;
  lora::AdamW<Scalar> opt(o);
  const auto params = m.parameters();
  opt.add(params);
  const long steps_per_epoch = long((data.size() + s.batch - 1) / s.batch), total = steps_per_epoch * s.epochs;
  std::vector<lora::Index> order(std::size_t(data.size()));
  std::iota(order.begin(), order.end(), 0);
  Training t;
  const long segment = std::max(1L, steps_per_epoch / 8);
  double segment_sum = 0;
  Mat x;
  std::vector<std::int64_t> y;
  long step = 0;
  for (int e = 0; e < s.epochs; ++e) {
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[std::size_t(rng.uniform() * double(i))]);
    Progress bar(label + " epoch " + std::to_string(e + 1) + "/" + std::to_string(s.epochs), steps_per_epoch);
    double sum = 0;
    for (long b = 0; b < steps_per_epoch; ++b, ++step) {
      const lora::Index begin = b * s.batch, n = std::min(s.batch, data.size() - begin);
      x.resize(n, data.images.cols());
      y.resize(std::size_t(n));
      for (lora::Index i = 0; i < n; ++i) {
        const lora::Index r = order[std::size_t(begin + i)];
        x.row(i) = data.images.row(r);
        y[std::size_t(i)] = data.labels[std::size_t(r)];
      }
      opt.set_lr(lora::warmup_cosine_lr(s.lr, step, total / 20, total));
      const auto loss = lora::cross_entropy<Scalar>(m.forward_train(x), y);
      m.zero_grad();
      m.backward(loss.grad);
      lora::clip_grad_norm(params, 1.0);
      opt.step();
      sum += double(loss.loss);
      segment_sum += double(loss.loss);
      if ((b + 1) % segment == 0) {
        t.at.push_back(e + double(b + 1) / double(steps_per_epoch));
        t.loss.push_back(segment_sum / double(segment));
        segment_sum = 0;
      }
      bar.update(b + 1, sum / double(b + 1));
    }
    segment_sum = 0;  // a segment does not straddle epochs
    const double seconds = bar.finish();
    const Score score = evaluate(m, test);
    t.epochs.push_back({sum / double(steps_per_epoch), score.accuracy, seconds});
    std::printf("  %-28s epoch %d/%d  loss %.4f  test accuracy %.4f  %.1fs\n", label.c_str(), e + 1, s.epochs,
                t.epochs.back().train_loss, score.accuracy, seconds);
    std::fflush(stdout);
  }
  return t;
}

struct Method {
  std::string name;
  std::vector<std::string> targets;  // LoRA target modules
  int adapter_rank;                  // residual adapter
  bool full;                         // every weight trains
  double lr;
};

struct Result {
  std::string name;
  lora::Index trainable, total;
  double accuracy, seconds_per_epoch;
  Training training;
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
               "  --quick      small subsets, for tests (seconds)\n"
               "  --epochs N   adaptation epochs (default 4, 2 with --quick; pre-training takes as many)\n"
               "  --threads N  threads for Eigen (default: all cores)\n"
               "  --seed S     seed of every initialisation and shuffle (default 1)\n"
               "  --out DIR    where results.csv and curves.svg go (default fashion_mnist_out)\n"
               "  --data DIR   Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) try {
  bool quick = false;
  int epochs = 0, threads = 0;
  std::uint64_t seed = 1;
  std::string out = "fashion_mnist_out", data_dir = "/usr/share/datasets/fashion-mnist";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--quick") quick = true;
    else if (a == "--epochs" && has_value && number(argv[i + 1]) >= 1) epochs = int(number(argv[++i]));
    else if (a == "--threads" && has_value) threads = int(number(argv[++i]));
    else if (a == "--seed" && has_value && number(argv[i + 1]) >= 0) seed = std::uint64_t(number(argv[++i]));
    else if (a == "--out" && has_value) out = argv[++i];
    else if (a == "--data" && has_value) data_dir = argv[++i];
    else return usage();
  }
  if (threads < 0) return usage();  // not a number
  if (epochs == 0) epochs = quick ? 2 : 4;
  lora::set_num_threads(threads);

  if (!std::filesystem::exists(data_dir + "/train-images-idx3-ubyte.gz"))
    lora::detail::fail("no Fashion-MNIST in ", data_dir, " (install it with: apt-get install dataset-fashion-mnist, or pass --data DIR)");
  std::filesystem::create_directories(out);  // fail before training, not after it
  const Data train_set = load(data_dir, "train"), test_set = load(data_dir, "t10k");
  const lora::Index pool = 50000, limit = quick ? 2000 : pool, adapt_n = quick ? 1500 : 10000, test_n = quick ? 1000 : 10000;
  const Data pretrain = subset(train_set, 0, pool, 5, limit);
  const Data adapt = subset(train_set, train_set.size() - adapt_n, train_set.size(), 10, adapt_n);
  const Data test = subset(test_set, 0, test_n, 10, test_n), test_base = subset(test_set, 0, test_n, 5, test_n);
  std::printf("Fashion-MNIST: pre-train on %ld images of classes 0-4, adapt on %ld images of all 10 classes, test on %ld\n",
              long(pretrain.size()), long(adapt.size()), long(test.size()));
  std::printf("threads %d, seed %llu%s\n\n", lora::num_threads(), (unsigned long long)seed, quick ? ", --quick" : "");

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

  // ---- 1. pre-training -------------------------------------------------------------------
  Model base(d, blocks, 5, base_config);
  base.set_base_trainable(true);
  std::printf("1. pre-training on classes 0-4 (%ld parameters)\n", long(base.parameter_count()));
  const auto pre = train(base, pretrain, test_base, {epochs, 128, 2e-3}, "pre-training", rng);
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
      {"head only", {}, 0, false, 3e-3},
      {"LoRA q,v (r=8)", {"q_proj", "v_proj"}, 0, false, 3e-3},
      {"LoRA q,k,v,o,MLP (r=8)", {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, 0, false, 3e-3},
      {"residual adapter (r=8)", {}, 8, false, 3e-3},
      {"full fine-tuning", {}, 0, true, 1e-3},
  };
  std::vector<Result> results;
  double compressed_accuracy = 0;
  bool ok = true;
  for (const Method& method : methods) {
    lora::EncoderConfig c = base_config;
    c.target_modules = method.targets;
    c.adapter_rank = method.adapter_rank;
    Model m(d, blocks, 10, c);
    m.load_state(base_state);
    m.head() = head10;
    m.set_base_trainable(method.full);
    lora::Index trainable = 0;
    for (const auto& p : m.parameters()) trainable += p.value.size();
    Result r{method.name, trainable, m.parameter_count(), 0, 0, {}};
    r.training = train(m, adapt, test, {epochs, 64, method.lr}, method.name, rng);
    const auto& es = r.training.epochs;
    r.accuracy = es.back().test_accuracy;
    for (const Epoch& e : es) r.seconds_per_epoch += e.seconds / double(es.size());
    if (!method.full && !same_state(m.state(), base_state)) {
      std::printf("  FAILED: %s changed the frozen base weights\n", method.name.c_str());
      ok = false;
    }
    if (!method.targets.empty()) {  // ---- 4. merge, compare, unmerge
      const auto unmerged = evaluate(m, test).predicted;
      m.merge();
      const auto merged = evaluate(m, test).predicted;
      m.unmerge();
      long same = 0;
      for (std::size_t i = 0; i < merged.size(); ++i) same += merged[i] == unmerged[i];
      const bool restored = same_state(m.state(), base_state);
      std::printf("  merged: %ld of %zu test predictions unchanged; unmerged: base weights %s\n", same, merged.size(),
                  restored ? "restored bit for bit" : "NOT restored");
      ok &= same == long(merged.size()) && restored;
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
    ok &= r.accuracy > before.accuracy;
    results.push_back(r);
  }

  // ---- 3. the table ----------------------------------------------------------------------
  const double full_acc = results.back().accuracy;
  std::printf("\n3. results (test accuracy before adaptation: %.4f; full fine-tuning with its weight updates compressed\n"
              "   to rank 8: %.4f)\n\n", before.accuracy, compressed_accuracy);
  std::printf("| method | test accuracy | vs full FT | trainable params | %% of model | memory (KiB) | s/epoch |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    // parameters (all) + gradients and AdamW's two moments (trainable only)
    const double kib = double(r.total + 3 * r.trainable) * sizeof(Scalar) / 1024.0;
    std::printf("| %s | %.4f | %+.4f | %ld | %.1f%% | %.0f | %.2f |\n", r.name.c_str(), r.accuracy, r.accuracy - full_acc,
                long(r.trainable), 100.0 * double(r.trainable) / double(r.total), kib, r.seconds_per_epoch);
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
