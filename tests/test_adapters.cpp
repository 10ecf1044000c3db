#include "svd_once.hpp"  // first: the SVDs are instantiated once, in svd_once.cpp

// Named adapters in one LoraLinear: adding, selecting, summing, training only the active ones,
// hot-swapping with exact merges, mixed-batch serving, and the errors for bad names. PEFT's
// multi_adapter fixture (y_mixed, w_cat/w_linear/w_svd) is checked by fixture_check under ctest.
#include <lora/combine.hpp>
#include <lora/linear.hpp>

#include "test_util.hpp"

#include <cstring>
#include <thread>

using MatD = lora::Mat<double>;
using VecD = lora::Vec<double>;
using Layer = lora::LoraLinear<double>;

namespace {

double max_abs(const MatD& m) { return m.cwiseAbs().maxCoeff(); }

bool same_bytes(const lora::ConstMatMap<double>& a, const MatD& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && std::memcmp(a.data(), b.data(), sizeof(double) * b.size()) == 0;
}

lora::LoraConfig config(int r, double alpha, bool rslora = false, std::uint64_t seed = 0) {
  lora::LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.use_rslora = rslora;
  c.seed = seed;
  return c;
}

// A (6 -> 5) layer with adapters "default" (r 2), "b" (r 3, rsLoRA) and "c" (r 1), each with
// non-zero random A and B; only "default" is active.
Layer make_layer(const MatD& W, const VecD& bias, bool exact = false) {
  lora::LoraConfig d = config(2, 4);
  d.exact_unmerge = exact;
  Layer layer(W, bias, d);
  lora::LoraConfig b = config(3, 6, true, 7), c = config(1, 0.5, false, 9);
  b.exact_unmerge = c.exact_unmerge = exact;
  layer.add_adapter("b", b);
  layer.add_adapter("c", c);
  std::uint64_t seed = 20;
  for (const auto& n : layer.adapter_names()) {
    layer.set_lora_A(n, random_normal(layer.rank(n), 6, ++seed));
    layer.set_lora_B(n, random_normal(5, layer.rank(n), ++seed));
  }
  return layer;
}

// y = x·Wᵀ + b + Σ s·x·Aᵀ·Bᵀ over the given adapters, written out independently of the layer.
MatD reference(const MatD& W, const VecD& bias, const Layer& layer, const MatD& x, const std::vector<std::string>& names) {
  MatD y = x * W.transpose();
  y.rowwise() += bias.transpose();
  for (const auto& n : names) y += double(layer.scaling(n)) * x * layer.lora_A(n).transpose() * layer.lora_B(n).transpose();
  return y;
}

}  // namespace

TEST(Adapters, AddKeepsTheActiveSetAndSelectingSums) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(4, 6, 2);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias);
  EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"default", "b", "c"}));
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"default"});
  EXPECT_DOUBLE_EQ(layer.scaling("b"), 6 / std::sqrt(3.0));
  EXPECT_DOUBLE_EQ(layer.scaling("c"), 0.5);
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {"default"})), 1e-12);

  layer.set_adapter("b");
  EXPECT_EQ(layer.rank(), 3);  // the calls without a name act on the one active adapter
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {"b"})), 1e-12);
  layer.set_adapter({"c", "default"});
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {"c", "default"})), 1e-12);
  EXPECT_EQ(layer.trainable_parameters(), (1 * 6 + 5 * 1) + (2 * 6 + 5 * 2));
  std::vector<std::string> names;
  for (const auto& p : layer.parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"lora_A.c", "lora_B.c", "lora_A.default", "lora_B.default"}));
  layer.set_adapter(std::vector<std::string>{});
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {})), 1e-12);
  EXPECT_TRUE(same_bytes(layer.weight(), W));  // selecting never touches W
}

// Above few_rows' 8 rows the layer runs the LoRA products first (y = b + Σ s·t·Bᵀ) and the base
// product into y after them: with and without a bias, one or two adapters, one of them merged,
// below and above the 16 rows of the thin kernels, in forward and forward_train.
TEST(Adapters, ManyRowsWithTheLoraProductsFirstMatchTheReference) {
  const MatD W = random_normal(5, 6, 1);
  const VecD bias = random_normal(5, 1, 3).col(0);
  for (const bool with_bias : {true, false})
    for (const lora::Index n : {12, 40}) {
      SCOPED_TRACE(testing::Message() << "bias " << with_bias << " n " << n);
      const VecD b = with_bias ? bias : VecD::Zero(5);
      const MatD x = random_normal(n, 6, 2);
      const auto without_bias = [&] {
        Layer l(W, std::nullopt, config(2, 4));
        l.add_adapter("b", config(3, 2.0, false, 5));
        l.add_adapter("c", config(1, 2.0, false, 6));
        return l;
      };
      Layer layer = with_bias ? make_layer(W, b) : without_bias();
      std::uint64_t seed = 40;
      for (const auto& name : layer.adapter_names()) layer.set_lora_B(name, random_normal(5, layer.rank(name), ++seed));
      layer.set_adapter({"c", "default"});
      EXPECT_LT(max_abs(layer.forward(x) - reference(W, b, layer, x, {"c", "default"})), 1e-12);
      EXPECT_LT(max_abs(layer.forward_train(x) - reference(W, b, layer, x, {"c", "default"})), 1e-12);
      layer.set_adapter("b");
      EXPECT_LT(max_abs(layer.forward(x) - reference(W, b, layer, x, {"b"})), 1e-12);
      layer.set_adapter({"b", "c"});
      layer.merge({"b"});  // "c" unmerged on top of the merged "b"
      EXPECT_LT(max_abs(layer.forward(x) - reference(W, b, layer, x, {"b", "c"})), 1e-12);
      layer.merge({"c"});  // all merged: the base product alone
      EXPECT_LT(max_abs(layer.forward(x) - reference(W, b, layer, x, {"b", "c"})), 1e-12);
    }
}

TEST(Adapters, TrainingUpdatesOnlyTheActiveAdaptersAndGradientsMatchFiniteDifferences) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(4, 6, 2), dy = random_normal(4, 5, 4);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias);
  layer.set_adapter({"default", "c"});
  const MatD y = layer.forward_train(x);
  EXPECT_LT(max_abs(y - reference(W, bias, layer, x, {"default", "c"})), 1e-12);
  const MatD dx = layer.backward(dy);
  EXPECT_EQ(layer.grad_A("b").norm(), 0.0);
  EXPECT_EQ(layer.grad_B("b").norm(), 0.0);
  EXPECT_GT(layer.grad_A("c").norm(), 0.0);

  auto loss = [&](const MatD& xx) { return layer.forward(xx).cwiseProduct(dy).sum(); };
  EXPECT_EQ(expect_parameter_gradients(layer.parameters(), [&] { return loss(x); }, 1e-7), 2 * 6 + 5 * 2 + 1 * 6 + 5 * 1);
  expect_input_gradient(x, dx, loss, 1e-7);
}

// Setting dx, backward runs the adapters' terms first (the first writes dx) and the base product
// adds dy·W into dx after them. Against dx = dy·W + Σ s·dy·B·A written out (no dropout), and, with
// dropout on one adapter, first or second, against InputGrad::add into zeros (the base product
// first) under the same masks; below and above the 16 rows of the thin kernels.
TEST(Adapters, BackwardWithTheLoraTermsFirstMatchesTheReference) {
  const MatD W = random_normal(5, 6, 1);
  const VecD bias = random_normal(5, 1, 3).col(0);
  for (int n : {4, 40}) {
    SCOPED_TRACE(testing::Message() << "n " << n);
    const MatD x = random_normal(n, 6, 2), dy = random_normal(n, 5, 4);
    Layer layer = make_layer(W, bias);
    layer.set_adapter({"c", "default"});
    layer.forward_train(x);
    const MatD dx = layer.backward(dy);
    MatD expected = dy * W;
    for (const char* name : {"c", "default"})
      expected += double(layer.scaling(name)) * dy * layer.lora_B(name) * layer.lora_A(name);
    EXPECT_LT(max_abs(dx - expected), 1e-12);

    for (bool dropout_first : {true, false}) {
      SCOPED_TRACE(testing::Message() << "dropout first " << dropout_first);
      lora::LoraConfig d = config(2, 4, false, 11);
      d.dropout = 0.5;
      layer.add_adapter("d", d);
      layer.set_lora_B("d", random_normal(5, 2, 12));
      layer.set_adapter(dropout_first ? std::vector<std::string>{"d", "b"} : std::vector<std::string>{"b", "d"});
      layer.reseed(3);
      layer.forward_train(x);
      MatD set;
      layer.backward(dy, set);
      layer.reseed(3);  // the same masks again
      layer.forward_train(x);
      MatD add = MatD::Zero(n, 6);
      layer.backward(dy, add, lora::InputGrad::add);
      EXPECT_LT(max_abs(set - add), 1e-12);
      EXPECT_GT(max_abs(set - dy * W), 1e-3);  // the adapters' terms are in it
      layer.delete_adapter("d");
    }
  }
}

TEST(Adapters, EachAdapterDrawsItsOwnDropoutMasks) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(8, 6, 2), dy = random_normal(8, 5, 4);
  lora::LoraConfig c = config(2, 4, false, 3);
  c.dropout = 0.5;
  Layer layer(W, std::nullopt, c, "a");
  layer.add_adapter("b", c);  // the same config and seed: the same A
  layer.set_lora_B("a", random_normal(5, 2, 5));
  layer.set_lora_B("b", layer.lora_B("a"));
  ASSERT_EQ(max_abs(layer.lora_A("a") - layer.lora_A("b")), 0.0);
  layer.set_adapter({"a", "b"});
  layer.forward_train(x);
  layer.backward(dy);
  // Identical adapters differ in their gradients only through their dropout masks.
  EXPECT_GT(max_abs(layer.grad_B("a") - layer.grad_B("b")), 1e-3);
  EXPECT_GT(max_abs(layer.grad_A("a") - layer.grad_A("b")), 1e-3);
}

TEST(Adapters, HotSwapWithExactUnmergeRestoresWBitForBit) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(4, 6, 2);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias, /*exact=*/true);
  const MatD y_default = layer.forward(x);
  layer.merge();
  EXPECT_EQ(layer.merged_adapters(), std::vector<std::string>{"default"});
  EXPECT_FALSE(same_bytes(layer.weight(), W));
  EXPECT_LT(max_abs(layer.forward(x) - y_default), 1e-12);

  layer.set_adapter("b");  // unmerges "default" first
  EXPECT_FALSE(layer.is_merged());
  EXPECT_TRUE(same_bytes(layer.weight(), W));
  const MatD y_b = layer.forward(x);
  layer.merge();
  EXPECT_TRUE(layer.is_merged("b"));
  EXPECT_LT(max_abs(layer.forward(x) - y_b), 1e-12);
  EXPECT_LT(max_abs(y_b - reference(W, bias, layer, x, {"b"})), 1e-12);
  layer.unmerge();
  EXPECT_TRUE(same_bytes(layer.weight(), W));

  // Several at once, and a merge of an inactive adapter by name.
  layer.set_adapter({"default", "c"});
  layer.merge({"default", "c", "b"});
  EXPECT_EQ(layer.merged_adapters(), (std::vector<std::string>{"default", "c", "b"}));
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {"default", "c", "b"})), 1e-12);
  layer.unmerge();
  EXPECT_TRUE(same_bytes(layer.weight(), W));
}

TEST(Adapters, UnmergeWithoutExactModeUndoesEveryMergedAdapter) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(4, 6, 2);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias);
  layer.set_adapter({"b", "c"});
  const MatD y = layer.forward(x);
  layer.safe_merge();
  EXPECT_LT(max_abs(layer.forward(x) - y), 1e-12);
  layer.unmerge();
  EXPECT_LT(max_abs(MatD(layer.weight()) - W), 1e-14);
}

TEST(Adapters, MixedBatchEqualsEachAdapterAlone) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(9, 6, 2);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias);
  // Scattered rows, a contiguous run ("c" in rows 6-7), base rows.
  const std::vector<std::string> rows = {"b", "__base__", "default", "b", "default", "__base__", "c", "c", "b"};
  const MatD y = layer.forward(x, rows);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::vector<std::string> one = rows[i] == "__base__" ? std::vector<std::string>{} : std::vector<std::string>{rows[i]};
    const MatD expected = reference(W, bias, layer, x.row(Eigen::Index(i)), one);
    EXPECT_LT(max_abs(y.row(Eigen::Index(i)) - expected), 1e-12) << "row " << i;
  }
  // All rows one adapter: the same as the plain forward with that adapter active.
  layer.set_adapter("b");
  EXPECT_LT(max_abs(layer.forward(x, std::vector<std::string>(9, "b")) - layer.forward(x)), 1e-13);
  // Disabled adapters: the base for every row, as in PEFT.
  layer.enable_adapters(false);
  EXPECT_LT(max_abs(layer.forward(x, rows) - reference(W, bias, layer, x, {})), 1e-12);
}

// Several threads serving mixed batches from one const layer (each call keeps its row groups in
// thread-local buffers, and its adapter groups run in parallel inside): every result equals the
// one computed alone. CI runs this under ThreadSanitizer.
TEST(Adapters, MixedBatchesFromSeveralThreadsOnOneLayerAreThreadSafe) {
  const Eigen::Index in = 128, out = 40;
  lora::LoraConfig c = config(4, 8);
  Layer layer(random_normal(out, in, 1), random_normal(out, 1, 2).col(0), c, "t0");
  for (int k = 1; k < 4; ++k) layer.add_adapter("t" + std::to_string(k), c);
  for (int k = 0; k < 4; ++k) layer.set_lora_B("t" + std::to_string(k), random_normal(out, 4, 20 + k));
  const Layer& cl = layer;
  std::vector<MatD> xs, expect;
  std::vector<std::vector<std::string>> rows(4);
  for (int t = 0; t < 4; ++t) {
    xs.push_back(random_normal(600 + 10 * t, in, 30 + t));
    for (Eigen::Index i = 0; i < xs[t].rows(); ++i) rows[t].push_back(i % 5 == 4 ? "__base__" : "t" + std::to_string((i + t) % 4));
    expect.push_back(cl.forward(xs[t], rows[t]));
  }
  std::vector<MatD> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int k = 0; k < 10; ++k) got[t] = cl.forward(xs[t], rows[t]);
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(got[t], expect[t]);
}

TEST(Adapters, LargeMixedBatchRunsAdapterGroupsInParallelWithTheSameResult) {
  // Enough rows × features that the adapter groups run in parallel (when OpenMP is on).
  const Eigen::Index n = 700, in = 128, out = 40;
  lora::LoraConfig c = config(4, 8);
  Layer layer(random_normal(out, in, 1), random_normal(out, 1, 2).col(0), c, "t0");
  std::vector<std::string> rows;
  for (int k = 0; k < 6; ++k) {
    const std::string name = "t" + std::to_string(k);
    if (k) layer.add_adapter(name, c);
    layer.set_lora_A(name, random_normal(4, in, 10 + k));
    layer.set_lora_B(name, random_normal(out, 4, 20 + k));
  }
  for (Eigen::Index i = 0; i < n; ++i) rows.push_back(i % 7 == 6 ? "__base__" : "t" + std::to_string(i % 7));
  const MatD x = random_normal(n, in, 3);
  const MatD y = layer.forward(x, rows);
  double err = 0;
  for (Eigen::Index i = 0; i < n; ++i) {
    MatD expected = x.row(i) * layer.weight().transpose() + layer.bias().transpose();
    if (rows[i] != "__base__") expected += double(layer.scaling(rows[i])) * x.row(i) * layer.lora_A(rows[i]).transpose() * layer.lora_B(rows[i]).transpose();
    err = std::max(err, max_abs(y.row(i) - expected));
  }
  EXPECT_LT(err, 1e-11);
}

TEST(Adapters, WeightedAdapterOnTheLayerIsANewInactiveAdapter) {
  const MatD W = random_normal(5, 6, 1);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias);
  lora::add_weighted_adapter(layer, {"default", "b"}, {0.5, 2}, "mix", lora::Combination::cat);
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"default"});
  EXPECT_EQ(layer.rank("mix"), 5);
  EXPECT_LT(max_abs(layer.delta_weight("mix") - 0.5 * layer.delta_weight("default") - 2 * layer.delta_weight("b")), 1e-13);
  EXPECT_LORA_ERROR(lora::add_weighted_adapter(layer, {"default", "b"}, {1, 1}, "mix", lora::Combination::cat), "already has",
                    "'mix'");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter(layer, {"default", "zz"}, {1, 1}, "m2", lora::Combination::cat), "no adapter 'zz'");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter(layer, {"default", "b"}, {1, 1}, "m2", lora::Combination::linear),
                    "linear needs equal ranks");
  EXPECT_FALSE(layer.has_adapter("m2"));
}

TEST(Adapters, DeleteAndReplace) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(4, 6, 2);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias);
  layer.set_adapter({"default", "b"});
  layer.delete_adapter("default");
  EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"b"});
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {"b"})), 1e-12);
  layer.delete_adapter("b");
  EXPECT_TRUE(layer.active_adapters().empty());  // nothing else is activated
  EXPECT_LT(max_abs(layer.forward(x) - reference(W, bias, layer, x, {})), 1e-12);
  // update_layer replaces "c" (fresh B = 0) and adds "d".
  layer.update_layer("c", config(4, 4));
  EXPECT_EQ(layer.rank("c"), 4);
  EXPECT_EQ(layer.lora_B("c").norm(), 0.0);
  layer.update_layer("d", config(2, 2));
  EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"c", "d"}));
}

TEST(Adapters, BadNamesAndStatesAreRefusedChangingNothing) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(3, 6, 2);
  const VecD bias = random_normal(5, 1, 3).col(0);
  Layer layer = make_layer(W, bias, /*exact=*/true);
  const auto names = layer.adapter_names();
  EXPECT_LORA_ERROR(layer.add_adapter("b", config(2, 2)), "add_adapter", "'b' already exists");
  EXPECT_LORA_ERROR(layer.add_adapter("", config(2, 2)), "add_adapter", "empty");
  EXPECT_LORA_ERROR(layer.add_adapter("__base__", config(2, 2)), "'__base__' is reserved");
  EXPECT_LORA_ERROR(layer.add_adapter("e", config(2, 2)), "exact_unmerge differs from adapter 'default'");
  EXPECT_LORA_ERROR(layer.set_adapter({"b", "zz"}), "set_adapter", "no adapter 'zz'", "'default', 'b', 'c'");
  EXPECT_LORA_ERROR(layer.set_adapter({"b", "b"}), "set_adapter", "'b' is named twice");
  EXPECT_LORA_ERROR(layer.delete_adapter("zz"), "delete_adapter", "no adapter 'zz'");
  EXPECT_LORA_ERROR(layer.lora_A("zz"), "lora_A", "no adapter 'zz'");
  EXPECT_EQ(layer.adapter_names(), names);
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"default"});

  // Mixed batch: wrong length, unknown name.
  EXPECT_LORA_ERROR(layer.forward(x, {"b", "c"}), "mixed batch", "2 adapter names for 3 rows");
  EXPECT_LORA_ERROR(layer.forward(x, {"b", "zz", "c"}), "mixed batch", "row 1", "no adapter 'zz'");

  // Without a name, exactly one adapter must be active.
  layer.set_adapter({"b", "c"});
  EXPECT_LORA_ERROR(layer.lora_A(), "lora_A", "exactly one active adapter", "2 ('b', 'c')");
  EXPECT_LORA_ERROR(layer.set_lora_B(MatD::Zero(5, 3)), "set_lora_B", "exactly one active adapter");

  // Merged: deleting it, replacing it, a mixed batch and merging an unknown name are refused.
  layer.merge();
  const MatD merged = layer.weight();
  EXPECT_LORA_ERROR(layer.delete_adapter("b"), "delete_adapter", "'b' is merged");
  EXPECT_LORA_ERROR(layer.update_layer("c", config(2, 2)), "update_layer", "'c' is merged");
  EXPECT_LORA_ERROR(layer.forward(x, {"b", "c", "b"}), "mixed batch", "merged");
  EXPECT_LORA_ERROR(layer.merge({"zz"}), "merge", "no adapter 'zz'");
  EXPECT_TRUE(same_bytes(layer.weight(), merged));
  EXPECT_EQ(layer.merged_adapters(), (std::vector<std::string>{"b", "c"}));
  layer.unmerge();
  EXPECT_TRUE(same_bytes(layer.weight(), W));
}

TEST(Adapters, DoraAdaptersStayAlone) {
  const MatD W = random_normal(5, 6, 1), x = random_normal(3, 6, 2);
  Layer layer(W, std::nullopt, config(2, 4));
  lora::LoraConfig d = config(2, 4);
  d.use_dora = true;
  layer.add_adapter("dora", d);
  EXPECT_LORA_ERROR(layer.set_adapter({"default", "dora"}), "set_adapter", "'dora' uses DoRA", "alone");
  EXPECT_LORA_ERROR(layer.merge({"dora"}), "merge", "'dora' uses DoRA");  // "default" is active
  EXPECT_LORA_ERROR(layer.forward(x, {"dora", "default", "__base__"}), "row 0", "DoRA");
  EXPECT_FALSE(layer.is_merged());
  layer.set_adapter("dora");
  EXPECT_LT(max_abs(layer.forward(x) - x * W.transpose()), 1e-12);  // a fresh DoRA adapter changes nothing
}
