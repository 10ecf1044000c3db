#include <lora/linear.hpp>
#include <lora/safetensors.hpp>

#include "fixture_cases.hpp"
#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <cstring>
#include <functional>
#include <thread>

using lora::BiasMode;
using lora::LoraConfig;
using lora::LoraLinear;
using MatD = lora::Mat<double>;
using MatF = lora::Mat<float>;
using VecD = lora::Vec<double>;

namespace {

LoraConfig config(int r, double alpha, double p = 0, BiasMode bias = BiasMode::frozen) {
  LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.dropout = p;
  c.bias = bias;
  c.seed = 42;
  return c;
}

// A layer with non-zero A and B, so every gradient is exercised.
template <class Scalar = double>
LoraLinear<Scalar> make_layer(Eigen::Index in, Eigen::Index out, const LoraConfig& cfg, bool bias = true) {
  using M = lora::Mat<Scalar>;
  std::optional<lora::Vec<Scalar>> b;
  if (bias) b = random_mat<M>(out, 1, 3).col(0);
  LoraLinear<Scalar> layer(random_mat<M>(out, in, 1), b, cfg);
  layer.set_lora_B(random_mat<M>(out, cfg.r, 2, 0.5));
  return layer;
}

template <class Scalar>
bool same_bytes(const lora::Mat<Scalar>& a, const lora::ConstMatMap<Scalar>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && std::memcmp(a.data(), b.data(), sizeof(Scalar) * a.size()) == 0;
}

double max_abs(const MatD& m) { return m.cwiseAbs().maxCoeff(); }

}  // namespace

// ---- parity with PEFT -------------------------------------------------------------------------

class LinearFixture : public ::testing::TestWithParam<const char*> {};

TEST_P(LinearFixture, MatchesPeft) {
  fixture::Report r = fixture::check_file(data_path(std::string("peft/") + GetParam() + ".safetensors"));
  ASSERT_TRUE(r.supported) << r.note;
  EXPECT_EQ(r.comparisons.size(), 2u * 9u);
  for (const auto& c : r.comparisons) EXPECT_TRUE(c.ok()) << c.scalar << " " << c.what << ": " << c.error;
}

INSTANTIATE_TEST_SUITE_P(Linear, LinearFixture,
                         ::testing::Values("linear_basic", "linear_nobias_rslora", "linear_fan_in_fan_out"));

TEST(Linear, DoraMatchesPeft) {
  fixture::Report r = fixture::check_file(data_path("peft/linear_dora.safetensors"));
  ASSERT_TRUE(r.supported) << r.note;
  EXPECT_EQ(r.comparisons.size(), 2u * 10u);
  for (const auto& c : r.comparisons) EXPECT_TRUE(c.ok()) << c.scalar << " " << c.what << ": " << c.error;
}

// ---- forward ------------------------------------------------------------------------------------

TEST(Linear, ForwardIsTheLoraFormula) {
  auto cfg = config(3, 6.0);
  cfg.use_rslora = true;
  auto layer = make_layer(7, 5, cfg);
  layer.set_lora_A(random_mat<MatD>(3, 7, 9));
  MatD x = random_mat<MatD>(4, 7, 10);
  const double s = 6.0 / std::sqrt(3.0);
  EXPECT_DOUBLE_EQ(layer.scaling(), s);
  MatD W = layer.weight();
  MatD expect = (x * W.transpose()).rowwise() + layer.bias().transpose();
  expect += s * x * layer.lora_A().transpose() * layer.lora_B().transpose();
  EXPECT_LT(max_abs(layer.forward(x) - expect), 1e-12);
  EXPECT_LT(max_abs(layer.delta_weight() - s * layer.lora_B() * layer.lora_A()), 1e-12);
}

TEST(Linear, FreshAdapterChangesNothing) {
  for (lora::Init init : {lora::Init::kaiming, lora::Init::gaussian, lora::Init::zero_a}) {
    SCOPED_TRACE(lora::init_name(init));
    auto cfg = config(4, 8);
    cfg.init = init;
    MatD W = random_mat<MatD>(6, 9, 1);
    VecD b = random_mat<MatD>(6, 1, 2).col(0);
    LoraLinear<double> layer(W, b, cfg);
    MatD x = random_mat<MatD>(3, 9, 3);
    const MatD y = layer.forward(x);
    EXPECT_LT(max_abs(y - MatD((x * W.transpose()).rowwise() + b.transpose())), 1e-14);
    layer.enable_adapters(false);
    EXPECT_EQ(y, layer.forward(x));  // the base alone, bit for bit
    EXPECT_TRUE(layer.delta_weight().isZero(0));
    // One of the factors is random, the other zero.
    EXPECT_NE(layer.lora_A().isZero(0), layer.lora_B().isZero(0));
  }
}

TEST(Linear, ForwardIntoBufferReusesIt) {
  auto layer = make_layer(16, 8, config(2, 4));
  MatD x = random_mat<MatD>(5, 16, 4), y;
  layer.forward(x, y);
  const double* p = y.data();
  layer.forward(x, y);
  EXPECT_EQ(y.data(), p);
  EXPECT_EQ(y, layer.forward(x));
}

TEST(Linear, EvalForwardIsConstAndThreadSafe) {
  auto layer = make_layer<float>(64, 48, config(8, 16, 0.5));
  const auto& cl = layer;
  std::vector<MatF> xs, expect;
  for (int t = 0; t < 4; ++t) {
    xs.push_back(random_mat<MatF>(20 + t, 64, 100 + t));
    expect.push_back(cl.forward(xs.back()));
  }
  std::vector<MatF> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int k = 0; k < 50; ++k) got[t] = cl.forward(xs[t]);
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(got[t], expect[t]);
}

// ---- dropout ------------------------------------------------------------------------------------

TEST(Linear, EvalUsesNoDropout) {
  auto layer = make_layer(10, 6, config(3, 3, 0.5));
  auto ref = make_layer(10, 6, config(3, 3, 0.0));
  ref.set_lora_A(layer.lora_A());
  MatD x = random_mat<MatD>(8, 10, 5);
  EXPECT_EQ(layer.forward(x), ref.forward(x));
  EXPECT_EQ(layer.forward(x), layer.forward(x));
}

TEST(Linear, SameSeedSameMaskAndTrainingDropsTheBranch) {
  auto a = make_layer(32, 6, config(3, 3, 0.5));
  auto b = make_layer(32, 6, config(3, 3, 0.5));
  MatD x = random_mat<MatD>(8, 32, 5);
  MatD ya = a.forward_train(x), yb = b.forward_train(x);
  EXPECT_EQ(ya, yb);
  MatD ya2 = a.forward_train(x);  // the next mask differs
  EXPECT_GT(max_abs(ya2 - ya), 1e-6);
  EXPECT_GT(max_abs(ya - a.forward(x)), 1e-6);  // training output is not the eval output
  a.reseed(42);
  EXPECT_EQ(a.forward_train(x), ya);  // reseed replays the first mask
  auto c = make_layer(32, 6, [] { auto k = config(3, 3, 0.5); k.seed = 43; return k; }());
  EXPECT_GT(max_abs(c.forward_train(x) - ya), 1e-6);
}

// ---- gradients ----------------------------------------------------------------------------------

// L = Σ dy ⊙ forward_train(x), the mask fixed by reseeding before every evaluation. Central
// differences for every parameter and for x, against backward().
void check_finite_differences(LoraLinear<double>& layer, MatD x) {
  const MatD dy = random_mat<MatD>(x.rows(), layer.out_features(), 77);
  auto loss = [&](const MatD& xin) {
    layer.reseed(7);
    return (layer.forward_train(xin).array() * dy.array()).sum();
  };
  layer.zero_grad();
  layer.reseed(7);
  layer.forward_train(x);
  const MatD dx = layer.backward(dy);
  int checked = expect_parameter_gradients(layer.parameters(), [&] { return loss(x); }, 1e-7);
  checked += expect_input_gradient(x, dx, loss, 1e-7);
  EXPECT_GT(checked, 50);
}

TEST(Linear, GradientsMatchFiniteDifferencesWithDropout) {
  auto layer = make_layer(9, 7, config(3, 5, 0.3, BiasMode::trainable));
  ASSERT_EQ(layer.parameters().size(), 3u);
  check_finite_differences(layer, random_mat<MatD>(6, 9, 11));
}

TEST(Linear, GradientsMatchFiniteDifferencesFanInFanOut) {
  auto cfg = config(2, 3, 0.2);
  cfg.fan_in_fan_out = true;
  LoraLinear<double> layer(random_mat<MatD>(9, 5, 1), std::nullopt, cfg);  // stored (in, out)
  EXPECT_EQ(layer.in_features(), 9);
  EXPECT_EQ(layer.out_features(), 5);
  layer.set_lora_B(random_mat<MatD>(5, 2, 2));
  check_finite_differences(layer, random_mat<MatD>(4, 9, 12));
}

TEST(Linear, FullFineTuningGradientsOfWAndBiasMatchFiniteDifferences) {
  for (bool fifo : {false, true}) {
    SCOPED_TRACE(fifo ? "fan_in_fan_out" : "(out, in)");
    auto cfg = config(2, 3, 0.25);
    cfg.fan_in_fan_out = fifo;
    LoraLinear<double> layer(random_mat<MatD>(fifo ? 7 : 5, fifo ? 5 : 7, 1), random_mat<MatD>(5, 1, 3).col(0), cfg);
    layer.set_lora_B(random_mat<MatD>(5, 2, 2));
    layer.set_base_trainable(true);
    const auto params = layer.parameters();
    ASSERT_EQ(params.size(), 4u);  // lora_A, lora_B, weight, bias
    EXPECT_EQ(params[2].name, "weight");
    EXPECT_EQ(layer.trainable_parameters(), 2 * 7 + 5 * 2 + 5 * 7 + 5);
    EXPECT_EQ(layer.frozen_parameters(), 0);
    check_finite_differences(layer, random_mat<MatD>(4, 7, 12));
  }
}

TEST(Linear, DisabledAdapterTrainsOnlyTheBase) {
  LoraLinear<double> layer(random_mat<MatD>(5, 7, 1), random_mat<MatD>(5, 1, 3).col(0), config(2, 3, 0.5));
  layer.set_lora_B(random_mat<MatD>(5, 2, 2));
  layer.enable_adapters(false);
  const MatD x = random_mat<MatD>(4, 7, 4), dy = random_mat<MatD>(4, 5, 5);
  const MatD base = (x * layer.weight().transpose()).rowwise() + layer.bias().transpose();
  EXPECT_LT(max_abs(layer.forward_train(x) - base), 1e-14);  // no LoRA branch, no dropout
  EXPECT_LT(max_abs(layer.backward(dy) - dy * layer.weight()), 1e-14);
  EXPECT_TRUE(layer.grad_A().isZero(0));
  EXPECT_TRUE(layer.grad_B().isZero(0));
  EXPECT_TRUE(layer.parameters().empty());  // frozen base, disabled adapter: nothing trains
  EXPECT_EQ(layer.trainable_parameters(), 0);
  layer.set_base_trainable(true);  // full fine-tuning of a plain linear
  check_finite_differences(layer, x);
  EXPECT_EQ(layer.parameters().size(), 2u);
}

TEST(Linear, BaseTrainingIsRefusedWhenMergedOrReadOnly) {
  const MatD W = random_mat<MatD>(5, 7, 1);
  LoraLinear<double> ro(lora::ConstMatMap<double>(W.data(), 5, 7), std::nullopt, config(2, 3));
  EXPECT_LORA_ERROR(ro.set_base_trainable(true), "set_base_trainable", "read-only borrow");
  LoraLinear<double> merged(W, std::nullopt, config(2, 3));
  merged.merge();
  EXPECT_LORA_ERROR(merged.set_base_trainable(true), "set_base_trainable", "merged");
  EXPECT_FALSE(merged.base_trainable());
}

TEST(Linear, GradientsAccumulateUntilZeroGrad) {
  auto layer = make_layer(8, 4, config(2, 2));
  MatD x = random_mat<MatD>(3, 8, 1), dy = random_mat<MatD>(3, 4, 2);
  layer.forward_train(x);
  layer.backward(dy);
  MatD gA = layer.grad_A(), gB = layer.grad_B();
  layer.forward_train(x);
  layer.backward(dy);
  EXPECT_LT(max_abs(layer.grad_A() - 2 * gA), 1e-12);
  EXPECT_LT(max_abs(layer.grad_B() - 2 * gB), 1e-12);
  layer.zero_grad();
  EXPECT_TRUE(layer.grad_A().isZero(0));
  EXPECT_TRUE(layer.grad_B().isZero(0));
}

// Keep::borrow caches x's address instead of a copy; InputGrad::add gives dx + the gradient and
// InputGrad::none leaves dx alone; the layer's gradients are those of a plain step, with dropout
// (the same masks: same seed) and without.
TEST(Linear, BorrowedInputAndInputGradModes) {
  for (double p : {0.0, 0.25}) {
    LoraConfig cfg = config(2, 2, p, BiasMode::trainable);
    auto ref = make_layer(8, 4, cfg), layer = make_layer(8, 4, cfg);
    ref.set_base_trainable(true);
    layer.set_base_trainable(true);
    const MatD x = random_mat<MatD>(5, 8, 1), dy = random_mat<MatD>(5, 4, 2), d0 = random_mat<MatD>(5, 8, 3);
    const auto same_grads = [&] {
      EXPECT_LT(max_abs(layer.grad_A() - ref.grad_A()), 1e-14);
      EXPECT_LT(max_abs(layer.grad_B() - ref.grad_B()), 1e-14);
      EXPECT_LT(max_abs(layer.grad_weight() - ref.grad_weight()), 1e-14);
      EXPECT_LT(max_abs(layer.grad_bias() - ref.grad_bias()), 1e-14);
    };
    for (lora::InputGrad mode : {lora::InputGrad::add, lora::InputGrad::none}) {
      const MatD y = ref.forward_train(x), dx = ref.backward(dy);
      MatD y2, dx2 = d0;
      layer.forward_train(x, y2, lora::Keep::borrow);
      EXPECT_EQ(max_abs(y2 - y), 0);
      layer.backward(dy, dx2, mode);
      EXPECT_LT(max_abs(dx2 - (mode == lora::InputGrad::add ? MatD(d0 + dx) : d0)), 1e-14);
      same_grads();
    }
  }
  auto layer = make_layer(8, 4, config(2, 2));
  const MatD x = random_mat<MatD>(5, 8, 1), dy = random_mat<MatD>(5, 4, 2);
  MatD y, wrong = MatD::Ones(5, 7);
  layer.forward_train(x, y, lora::Keep::borrow);
  EXPECT_LORA_ERROR(layer.backward(dy, wrong, lora::InputGrad::add), "dX to add to is (5, 7), expected (5, 8)");
  EXPECT_TRUE(layer.grad_A().isZero(0));  // refused before any gradient accumulated
  EXPECT_EQ(wrong, MatD::Ones(5, 7));
  EXPECT_TRUE(layer.ready_for_backward());
}

TEST(Linear, TrainingLeavesBaseBytesUnchanged) {
  auto layer = make_layer<float>(32, 16, config(4, 8, 0.1));
  const MatF W0 = layer.weight();
  const auto b0 = layer.bias();
  const MatF A0 = layer.lora_A();
  const MatF target = random_mat<MatF>(16, 32, 5, 0.1);  // y* = x·(W + target)ᵀ + b
  double first = 0, last = 0;
  for (int step = 0; step < 100; ++step) {
    MatF x = random_mat<MatF>(8, 32, 1000 + step);
    MatF y = layer.forward_train(x);
    MatF err = y - ((x * (W0 + target).transpose()).rowwise() + b0.transpose());
    (step == 0 ? first : last) = err.squaredNorm();
    layer.zero_grad();
    layer.backward(2.0f / 8 * err);
    for (auto& p : layer.parameters()) p.value -= 0.01f * p.grad;  // plain SGD by hand
  }
  EXPECT_TRUE(same_bytes(W0, layer.weight()));
  EXPECT_EQ(std::memcmp(b0.data(), layer.bias().data(), sizeof(float) * b0.size()), 0);
  EXPECT_NE(layer.lora_A(), A0);
  EXPECT_LT(last, first);
}

TEST(Linear, ParameterCountsMatchTheLoraPaper) {
  LoraConfig cfg = config(4, 8, 0, BiasMode::trainable);
  LoraLinear<float> layer(MatF::Zero(1024, 1024), lora::Vec<float>::Zero(1024), cfg);
  EXPECT_EQ(layer.trainable_parameters(), 9216);
  EXPECT_EQ(layer.base_parameters(), 1049600);
  EXPECT_EQ(layer.frozen_parameters(), 1048576);
  Eigen::Index sum = 0;
  for (auto& p : layer.parameters()) sum += p.value.size();
  EXPECT_EQ(sum, 9216);
  LoraLinear<float> frozen_bias(MatF::Zero(1024, 1024), lora::Vec<float>::Zero(1024), config(4, 8));
  EXPECT_EQ(frozen_bias.trainable_parameters(), 8192);
  EXPECT_EQ(frozen_bias.frozen_parameters(), 1049600);
}

// ---- merge --------------------------------------------------------------------------------------

TEST(Linear, MergeGivesTheSameOutputAsOneGemm) {
  auto layer = make_layer(12, 10, config(4, 8));
  MatD x = random_mat<MatD>(5, 12, 3);
  const MatD y = layer.forward(x);
  const MatD W0 = layer.weight();
  layer.merge();
  EXPECT_TRUE(layer.is_merged());
  EXPECT_LT(max_abs(MatD(layer.weight()) - (W0 + layer.delta_weight())), 1e-13);
  EXPECT_LT(max_abs(layer.forward(x) - y), 1e-12);
  layer.unmerge();
  EXPECT_FALSE(layer.is_merged());
  EXPECT_LT(max_abs(MatD(layer.weight()) - W0), 1e-13);
}

TEST(Linear, MergeTwiceAndUnmergeTwiceDoNotCorruptW) {
  auto layer = make_layer(12, 10, config(4, 8));
  const MatD W0 = layer.weight();
  layer.unmerge();  // not merged: nothing to do
  EXPECT_TRUE(same_bytes(W0, layer.weight()));
  layer.merge();
  const MatD W1 = layer.weight();
  layer.merge();
  layer.safe_merge();
  EXPECT_TRUE(same_bytes(W1, layer.weight()));
  layer.unmerge();
  const MatD W2 = layer.weight();
  layer.unmerge();
  EXPECT_TRUE(same_bytes(W2, layer.weight()));
  EXPECT_LT(max_abs(W2 - W0), 1e-13);
}

TEST(Linear, MergeUnmergeCyclesDriftIsBoundedAndExactModeHasNone) {
  auto cfg = config(8, 16);
  auto layer = make_layer<float>(256, 256, cfg);
  layer.set_lora_A(random_mat<MatF>(8, 256, 9));
  const MatF W0 = layer.weight();
  const double scale = W0.cwiseAbs().maxCoeff() + layer.delta_weight().cwiseAbs().maxCoeff();
  for (int i = 0; i < 1000; ++i) {
    layer.merge();
    layer.unmerge();
  }
  const double drift = (MatF(layer.weight()) - W0).cwiseAbs().maxCoeff();
  std::printf("float drift after 1000 merge/unmerge cycles: %.3e (max |W| + max |dW| = %.3f)\n", drift, scale);
  RecordProperty("float_drift_1000_cycles", std::to_string(drift));
  EXPECT_GT(drift, 0.0);  // rounding really happens: this is what exact mode is for
  // Each cycle rounds twice, by at most half an ulp of |W| + |ΔW|: a random walk far inside this.
  EXPECT_LT(drift, 1000 * 2 * 0.5 * std::numeric_limits<float>::epsilon() * scale);

  cfg.exact_unmerge = true;
  auto exact = make_layer<float>(256, 256, cfg);
  exact.set_lora_A(random_mat<MatF>(8, 256, 9));
  for (int i = 0; i < 1000; ++i) {
    exact.merge();
    exact.unmerge();
  }
  EXPECT_TRUE(same_bytes(W0, exact.weight()));
}

TEST(Linear, SafeMergeRefusesNonFiniteAndChangesNothing) {
  auto layer = make_layer(6, 4, config(2, 2));
  MatD B = layer.lora_B();
  B(1, 1) = std::numeric_limits<double>::infinity();
  layer.set_lora_B(B);
  const MatD W0 = layer.weight();
  EXPECT_LORA_ERROR(layer.safe_merge(), "LoraLinear::safe_merge", "non-finite");
  EXPECT_FALSE(layer.is_merged());
  EXPECT_TRUE(same_bytes(W0, layer.weight()));
}

TEST(Linear, ReadOnlyBorrowIsCopiedOnMergeAndRestoredExactly) {
  const MatD storage = random_mat<MatD>(10, 12, 1);
  const MatD snapshot = storage;
  lora::ConstMatMap<double> view(storage.data(), 10, 12);
  LoraLinear<double> layer(view, std::nullopt, config(3, 6));
  layer.set_lora_B(random_mat<MatD>(10, 3, 2));
  EXPECT_TRUE(layer.is_borrowed());
  EXPECT_EQ(layer.weight().data(), storage.data());
  MatD x = random_mat<MatD>(4, 12, 3);
  const MatD y = layer.forward(x);
  layer.merge();
  EXPECT_FALSE(layer.is_borrowed());
  EXPECT_NE(layer.weight().data(), storage.data());
  EXPECT_LT(max_abs(layer.forward(x) - y), 1e-12);
  EXPECT_TRUE(same_bytes(snapshot, lora::ConstMatMap<double>(storage.data(), 10, 12)));
  layer.unmerge();
  EXPECT_TRUE(layer.is_borrowed());
  EXPECT_EQ(layer.weight().data(), storage.data());
}

TEST(Linear, BorrowsAMappedSafetensorsTensor) {
  const auto st = lora::SafeTensors::open(data_path("peft/linear_basic.safetensors"));
  auto c = nlohmann::json::parse(st.metadata().at("case"));
  LoraLinear<double> layer(st.map<double>("weight"), st.vector<double>("bias"), config(c["r"].get<int>(), c["alpha"].get<double>()));
  EXPECT_EQ(static_cast<const void*>(layer.weight().data()), static_cast<const void*>(st.bytes("weight")));
  layer.set_lora_A(st.matrix<double>("lora_A"));
  layer.set_lora_B(st.matrix<double>("lora_B"));
  const MatD x = st.matrix<double>("x");
  EXPECT_LT(max_abs(layer.forward(x) - st.matrix<double>("y")), 1e-12);
  layer.merge();  // the mapping is read-only: merge works on a private copy
  EXPECT_LT(max_abs(MatD(layer.weight()) - st.matrix<double>("weight_merged")), 1e-12);
  layer.unmerge();
  EXPECT_EQ(static_cast<const void*>(layer.weight().data()), static_cast<const void*>(st.bytes("weight")));
}

TEST(Linear, WritableBorrowIsMergedInPlace) {
  MatD storage = random_mat<MatD>(10, 12, 1);
  const MatD W0 = storage;
  auto cfg = config(3, 6);
  cfg.exact_unmerge = true;
  LoraLinear<double> layer(lora::MatMap<double>(storage.data(), 10, 12), std::nullopt, cfg);
  layer.set_lora_B(random_mat<MatD>(10, 3, 2));
  layer.merge();
  EXPECT_EQ(layer.weight().data(), storage.data());
  EXPECT_LT(max_abs(storage - (W0 + layer.delta_weight())), 1e-13);
  layer.unmerge();
  EXPECT_EQ(storage, W0);
}

TEST(Linear, TrainingOrChangingFactorsWhileMergedIsAnError) {
  auto layer = make_layer(6, 4, config(2, 2));
  layer.merge();
  const MatD W1 = layer.weight();
  EXPECT_LORA_ERROR(layer.forward_train(MatD::Zero(2, 6)), "LoraLinear::forward_train", "merged", "unmerge");
  EXPECT_LORA_ERROR(layer.set_lora_A(MatD::Zero(2, 6)), "set_lora_A", "merged");
  EXPECT_TRUE(same_bytes(W1, layer.weight()));
}

// ---- bad input ----------------------------------------------------------------------------------

TEST(Linear, InvalidConfigThrows) {
  MatD W = MatD::Zero(4, 6);
  auto make = [&](LoraConfig c, std::optional<VecD> b = std::nullopt) { LoraLinear<double> l(W, b, c); };
  EXPECT_LORA_ERROR(make(config(0, 8)), "r is 0", "r >= 1");
  EXPECT_LORA_ERROR(make(config(-3, 8)), "r is -3");
  EXPECT_LORA_ERROR(make(config(2, 0)), "alpha is 0");
  EXPECT_LORA_ERROR(make(config(2, -1)), "alpha is -1");
  EXPECT_LORA_ERROR(make(config(2, std::nan(""))), "alpha is nan");
  EXPECT_LORA_ERROR(make(config(2, INFINITY)), "alpha is inf");
  EXPECT_LORA_ERROR(make(config(2, 2, 1.0)), "dropout is 1", "0 <= p < 1");
  EXPECT_LORA_ERROR(make(config(2, 2, -0.1)), "dropout is -0.1");
  EXPECT_LORA_ERROR(make(config(2, 2, std::nan(""))), "dropout is nan");
  EXPECT_LORA_ERROR(make(config(2, 2), VecD::Zero(6)), "bias is (6), expected (4)");
  EXPECT_LORA_ERROR(make(config(2, 2, 0, BiasMode::trainable)), "trainable", "no bias");
  EXPECT_LORA_ERROR((LoraLinear<double>(MatD(0, 3), std::nullopt, config(2, 2))), "weight is (0, 3)");
}

TEST(Linear, InvalidInputsThrowAndChangeNothing) {
  auto layer = make_layer(16, 8, config(2, 4));
  EXPECT_LORA_ERROR(layer.backward(MatD::Zero(5, 8)), "LoraLinear::backward", "forward_train first");
  EXPECT_LORA_ERROR(layer.forward(MatD::Zero(5, 17)), "LoraLinear::forward: X is (5, 17), expected (n, 16)");
  MatD x = random_mat<MatD>(5, 16, 1), dy = random_mat<MatD>(5, 8, 2);
  auto ref = layer;
  const MatD y = layer.forward_train(x);
  // A failed forward_train keeps the cache of the good one; a failed backward keeps it too.
  EXPECT_LORA_ERROR(layer.forward_train(MatD::Zero(5, 17)), "LoraLinear::forward_train: X is (5, 17), expected (n, 16)");
  EXPECT_LORA_ERROR(layer.backward(MatD::Zero(4, 8)), "LoraLinear::backward: dY is (4, 8), expected (5, 8)");
  EXPECT_LORA_ERROR(layer.backward(MatD::Zero(5, 9)), "dY is (5, 9), expected (5, 8)");
  EXPECT_TRUE(layer.grad_A().isZero(0));
  const MatD dx = layer.backward(dy);
  ref.forward_train(x);
  EXPECT_EQ(dx, ref.backward(dy));
  EXPECT_EQ(layer.grad_A(), ref.grad_A());
  EXPECT_LORA_ERROR(layer.backward(dy), "forward_train first");  // the cache was consumed
  const MatD A = layer.lora_A();
  EXPECT_LORA_ERROR(layer.set_lora_A(MatD::Zero(3, 16)), "set_lora_A: A is (3, 16), expected (2, 16)");
  EXPECT_LORA_ERROR(layer.set_lora_B(MatD::Zero(8, 3)), "set_lora_B: B is (8, 3), expected (8, 2)");
  EXPECT_EQ(layer.lora_A(), A);
}

TEST(Linear, OutputBufferMustNotAliasTheInput) {
  auto layer = make_layer(8, 8, config(2, 4));
  MatD x = random_mat<MatD>(3, 8, 1);
  const MatD x0 = x;
  EXPECT_LORA_ERROR(layer.forward(x, x), "LoraLinear::forward", "Y shares memory with the input X");
  EXPECT_LORA_ERROR(layer.forward_train(x, x), "forward_train", "shares memory");
  EXPECT_EQ(x, x0);
  MatD y;
  layer.forward_train(x, y);
  EXPECT_LORA_ERROR(layer.backward(y, y), "LoraLinear::backward", "dX shares memory with the input dY");
  MatD dx;
  layer.backward(y, dx);  // the cache survived the refused call
  EXPECT_EQ(dx.rows(), 3);
}

// ---- DoRA -------------------------------------------------------------------------------------

TEST(Dora, FreshLayerKeepsTheOutputAndTheNormNeedsNoDenseDelta) {
  auto cfg = config(3, 6);
  cfg.use_dora = true;
  LoraLinear<double> fresh(random_mat<MatD>(5, 7, 1), random_mat<MatD>(5, 1, 3).col(0), cfg);
  LoraConfig plain = config(3, 6);
  LoraLinear<double> base(random_mat<MatD>(5, 7, 1), random_mat<MatD>(5, 1, 3).col(0), plain);
  const MatD x = random_mat<MatD>(4, 7, 4);
  EXPECT_LT(max_abs(fresh.forward(x) - base.forward(x)), 1e-14);  // m = ‖W‖ per row, B = 0
  fresh.set_lora_B(random_mat<MatD>(5, 3, 2));
  const MatD dense = MatD(fresh.weight()) + fresh.delta_weight();
  EXPECT_LT((fresh.weight_norm() - dense.rowwise().norm()).cwiseAbs().maxCoeff(), 1e-13);
}

// Gradients of A, B, m and x by central differences of Σ dy ⊙ y, with the norm held at its
// value (detached, as PEFT and the DoRA paper do): y = b + (m / norm0) ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ).
TEST(Dora, GradientsMatchFiniteDifferencesWithTheNormDetached) {
  for (bool fan : {false, true}) {
    auto cfg = config(3, 6);
    cfg.use_dora = true;
    cfg.fan_in_fan_out = fan;
    const MatD W = random_mat<MatD>(5, 7, 1);
    LoraLinear<double> layer(fan ? MatD(W.transpose()) : W, random_mat<MatD>(5, 1, 3).col(0), cfg);
    layer.set_lora_A(random_mat<MatD>(3, 7, 5));
    layer.set_lora_B(random_mat<MatD>(5, 3, 2, 0.5));
    layer.set_lora_magnitude(random_mat<MatD>(5, 1, 6).col(0).cwiseAbs());
    const VecD norm0 = layer.weight_norm();
    const MatD x = random_mat<MatD>(4, 7, 7), dy = random_mat<MatD>(4, 5, 8);
    auto formula = [&](const MatD& xx) {
      MatD z = xx * W.transpose() + layer.scaling() * (xx * layer.lora_A().transpose()) * layer.lora_B().transpose();
      z.array().rowwise() *= layer.lora_magnitude().cwiseQuotient(norm0).transpose().array();
      return MatD(z.rowwise() + layer.bias().transpose());
    };
    EXPECT_LT(max_abs(formula(x) - layer.forward(x)), 1e-13);
    layer.zero_grad();
    layer.forward_train(x);
    const MatD dx = layer.backward(dy);
    auto params = layer.parameters();
    ASSERT_EQ(params.size(), 3u);
    EXPECT_EQ(params[2].name, "lora_magnitude_vector.default");
    const int n = expect_parameter_gradients(params, [&] { return (formula(x).array() * dy.array()).sum(); }, 1e-8);
    EXPECT_EQ(n, 3 * 7 + 5 * 3 + 5);
    expect_input_gradient(x, dx, [&](const MatD& xx) { return (formula(xx).array() * dy.array()).sum(); }, 1e-8);
  }
}

TEST(Dora, MergeAndUnmergeInBothLayoutsAndRefusals) {
  for (bool fan : {false, true})
    for (bool exact : {false, true}) {
      auto cfg = config(2, 4);
      cfg.use_dora = true;
      cfg.fan_in_fan_out = fan;
      cfg.exact_unmerge = exact;
      const MatD W = random_mat<MatD>(6, 5, 1);
      const MatD stored = fan ? MatD(W.transpose()) : W;
      LoraLinear<double> layer(stored, std::nullopt, cfg);
      layer.set_lora_A(random_mat<MatD>(2, 5, 2));
      layer.set_lora_B(random_mat<MatD>(6, 2, 3));
      layer.set_lora_magnitude(random_mat<MatD>(6, 1, 4).col(0).cwiseAbs());
      const MatD x = random_mat<MatD>(3, 5, 5);
      const MatD y = layer.forward(x);
      layer.merge();
      EXPECT_LT(max_abs(layer.forward(x) - y), 1e-13);
      EXPECT_LORA_ERROR(layer.set_lora_magnitude(VecD::Ones(6)), "set_lora_magnitude", "merged");
      layer.unmerge();
      if (exact)
        EXPECT_TRUE(same_bytes(stored, layer.weight()));
      else
        EXPECT_LT(max_abs(MatD(layer.weight()) - stored), 1e-13);
      EXPECT_LT(max_abs(layer.forward(x) - y), 1e-13);
    }
  auto cfg = config(2, 4, 0.1);
  cfg.use_dora = true;
  EXPECT_LORA_ERROR(make_layer(5, 6, cfg), "use_dora with dropout 0.1 is not supported");
  cfg.dropout = 0;
  auto layer = make_layer(5, 6, cfg);
  EXPECT_LORA_ERROR(layer.set_lora_magnitude(VecD::Ones(5)), "set_lora_magnitude: m is (5), expected (6)");
  EXPECT_LORA_ERROR(layer.set_base_trainable(true), "set_base_trainable", "DoRA");
  auto plain = make_layer(5, 6, config(2, 4));
  EXPECT_LORA_ERROR(plain.set_lora_magnitude(VecD::Ones(6)), "does not use DoRA");
  plain.set_base_trainable(true);
  EXPECT_LORA_ERROR(plain.update_layer(cfg), "update_layer", "use_dora", "base trains");
  EXPECT_TRUE(plain.lora_magnitude().size() == 0);
}

// Every call that changes what backward computes with, made between forward_train and backward,
// discards the cache: backward refuses, naming the call, and no gradient changes. (Before, a
// merge in between gave a dX off by the merged update.)
TEST(Linear, BackwardAfterAStateChangeIsRefusedNamingTheCall) {
  const MatD x = random_mat(4, 6, 1), dy = random_mat(4, 5, 2);
  auto make = [] {
    LoraConfig c = config(2, 4);
    c.exact_unmerge = true;
    LoraLinear<double> l(random_mat(5, 6, 3), random_mat(5, 1, 4).col(0), c);
    l.set_lora_B(random_mat(5, 2, 5));
    l.add_adapter("other", c);
    return l;
  };
  const std::vector<std::pair<std::string, std::function<void(LoraLinear<double>&)>>> changes = {
      {"merge", [](LoraLinear<double>& l) { l.merge(); }},
      {"safe_merge", [](LoraLinear<double>& l) { l.safe_merge(); }},
      {"merge", [](LoraLinear<double>& l) { l.merge({"other"}); }},
      {"set_adapter", [](LoraLinear<double>& l) { l.set_adapter({"default", "other"}); }},
      {"delete_adapter", [](LoraLinear<double>& l) { l.delete_adapter("other"); }},
      {"add_adapter", [](LoraLinear<double>& l) { l.add_adapter("third", l.config()); }},
      {"update_layer", [](LoraLinear<double>& l) { l.update_layer("other", l.config()); }},
      {"set_weight", [](LoraLinear<double>& l) { l.set_weight(MatD::Zero(5, 6)); }},
      {"set_lora_A", [](LoraLinear<double>& l) { l.set_lora_A(MatD::Zero(2, 6)); }},
      {"set_lora_B", [](LoraLinear<double>& l) { l.set_lora_B(MatD::Zero(5, 2)); }},
      {"enable_adapters", [](LoraLinear<double>& l) { l.enable_adapters(false); }},
      {"set_base_trainable", [](LoraLinear<double>& l) { l.set_base_trainable(true); }},
  };
  for (const auto& [name, change] : changes) {
    SCOPED_TRACE(name);
    LoraLinear<double> l = make();
    l.forward_train(x);
    change(l);
    EXPECT_FALSE(l.ready_for_backward());
    EXPECT_LORA_ERROR(l.backward(dy), "LoraLinear::backward", "discarded by " + name + "()", "forward_train again");
    EXPECT_EQ(l.grad_A("default").cwiseAbs().maxCoeff(), 0.0);
    EXPECT_EQ(l.grad_B("default").cwiseAbs().maxCoeff(), 0.0);
  }
  // A merge and unmerge in between (W exactly restored) still discard the cache, naming the first
  // call; forward_train itself is refused while merged.
  LoraLinear<double> l = make();
  l.merge();
  EXPECT_LORA_ERROR(l.forward_train(x), "merged");
  l.unmerge();
  l.forward_train(x);
  l.merge();
  l.unmerge();
  EXPECT_LORA_ERROR(l.backward(dy), "discarded by merge()");
  // After a fresh forward_train, backward works and equals a layer that never changed.
  l.forward_train(x);
  const MatD dx = l.backward(dy);
  LoraLinear<double> same = make();
  same.forward_train(x);
  EXPECT_EQ(dx, same.backward(dy));
  EXPECT_EQ(l.grad_A(), same.grad_A());
  // Calls that change nothing backward uses keep the cache.
  l.forward_train(x);
  l.zero_grad();
  (void)l.forward(x);
  l.merge({});
  EXPECT_TRUE(l.ready_for_backward());
  EXPECT_NO_THROW(l.backward(dy));
}

TEST(Linear, DoraMagnitudeChangeDiscardsTheCache) {
  LoraConfig c = config(2, 4);
  c.use_dora = true;
  LoraLinear<double> l(random_mat(5, 6, 3), std::nullopt, c);
  l.forward_train(random_mat(3, 6, 1));
  l.set_lora_magnitude(lora::Vec<double>::Ones(5));
  EXPECT_LORA_ERROR(l.backward(random_mat(3, 5, 2)), "discarded by set_lora_magnitude()");
}
