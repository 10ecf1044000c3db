#include <lora/models/encoder.hpp>
#include <lora/models/ladder_side.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>

using lora::EncoderBlock;
using lora::EncoderConfig;
using MatD = lora::Mat<double>;

namespace {

EncoderConfig make_config(std::vector<std::string> targets, int adapter_rank, double adapter_dropout = 0) {
  EncoderConfig c;
  c.heads = 2;
  c.d_ff = 12;
  c.lora.r = 3;
  c.lora.alpha = 6;
  c.target_modules = std::move(targets);
  c.adapter_rank = adapter_rank;
  c.adapter_dropout = adapter_dropout;
  c.seed = 11;
  return c;
}

// Gives every enabled B, the adapter's V and the bottlenecks' up projections values, so that every gradient is exercised.
void randomize_updates(EncoderBlock<double>& b) {
  std::uint64_t s = 100;
  for (auto& p : b.parameters())
    if (p.name.find("lora_B") != std::string::npos || p.name == "adapter.V" || p.name.find(".up.") != std::string::npos)
      p.value = random_uniform(p.value.rows(), p.value.cols(), ++s, 0.5);
}

// Central differences in double for every trainable tensor and for dX.
void check_gradients(EncoderBlock<double>& block, const MatD& x, lora::Index batch, const lora::AttentionMask<double>& mask) {
  const MatD dy = random_uniform(x.rows(), x.cols(), 77);
  auto loss = [&](const MatD& xin) {
    block.reseed(5);
    return (block.forward_train(xin, batch, mask).array() * dy.array()).sum();
  };
  block.zero_grad();
  block.reseed(5);
  block.forward_train(x, batch, mask);
  const MatD dx = block.backward(dy);
  int checked = expect_parameter_gradients(block.parameters(), [&] { return loss(x); }, 2e-7);
  checked += expect_input_gradient(x, dx, loss, 2e-7);
  EXPECT_GT(checked, 100);
}

}  // namespace

TEST(Encoder, LoraAndAdapterGradientsMatchFiniteDifferences) {
  EncoderBlock<double> block(8, make_config({"q_proj", "v_proj", "fc1"}, 2, 0.3));
  randomize_updates(block);
  std::vector<std::string> names;
  for (auto& p : block.parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"attn.q_proj.lora_A.default", "attn.q_proj.lora_B.default", "attn.v_proj.lora_A.default", "attn.v_proj.lora_B.default",
                                             "adapter.U", "adapter.V", "fc1.lora_A.default", "fc1.lora_B.default"}));
  lora::AttentionMask<double> causal;
  causal.causal = true;
  check_gradients(block, random_uniform(2 * 3, 8, 1), 2, causal);
}

// Adapter-tuning: bottlenecks after the attention and after the MLP, beside LoRA on q; then one
// after the MLP alone, with ReLU.
TEST(Encoder, AdapterTuningGradientsMatchFiniteDifferences) {
  auto c = make_config({"q_proj"}, 0);
  c.bottleneck.size = 3;
  EncoderBlock<double> block(8, c);
  randomize_updates(block);
  std::vector<std::string> names;
  for (auto& p : block.parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"attn.q_proj.lora_A.default", "attn.q_proj.lora_B.default", "bottleneck_attn.down.weight",
                                             "bottleneck_attn.down.bias", "bottleneck_attn.up.weight", "bottleneck_attn.up.bias",
                                             "bottleneck_mlp.down.weight", "bottleneck_mlp.down.bias", "bottleneck_mlp.up.weight",
                                             "bottleneck_mlp.up.bias"}));
  check_gradients(block, random_uniform(2 * 3, 8, 1), 2, {});

  c = make_config({}, 0);
  c.bottleneck = {4, lora::Activation::relu, 0};
  c.bottleneck_after_attention = false;
  EncoderBlock<double> mlp_only(8, c);
  randomize_updates(mlp_only);
  EXPECT_EQ(mlp_only.bottleneck_attention(), nullptr);
  EXPECT_EQ(mlp_only.parameters().size(), 4u);
  EXPECT_EQ(mlp_only.parameter_count(), block.parameter_count() - 2 * (3 * 8 + 3 + 8 * 3 + 8) - 2 * (8 * 3) + (4 * 8 + 4 + 8 * 4 + 8));
  check_gradients(mlp_only, random_uniform(2 * 4, 8, 2), 2, {});
}

// Prefix-tuning inside the block, through the reparameterising MLP: gradients, and the block's
// count (the frozen base plus what trains).
TEST(Encoder, PrefixTuningGradientsMatchFiniteDifferences) {
  auto c = make_config({}, 0);
  c.prefix = {2, 4, 0.5, 0};
  EncoderBlock<double> block(8, c);
  lora::Index trainable = 0;
  std::vector<std::string> names;
  for (auto& p : block.parameters()) {
    names.push_back(p.name);
    trainable += p.value.size();
  }
  EXPECT_EQ(names, (std::vector<std::string>{"attn.prefix.embedding", "attn.prefix.mlp.0.weight", "attn.prefix.mlp.0.bias",
                                             "attn.prefix.mlp.2.weight", "attn.prefix.mlp.2.bias"}));
  EXPECT_EQ(block.parameter_count(), EncoderBlock<double>(8, make_config({}, 0)).parameter_count() + trainable);
  lora::AttentionMask<double> causal;
  causal.causal = true;
  check_gradients(block, random_uniform(2 * 3, 8, 1), 2, causal);
}

// The bottleneck alone: y = z + up(act(down(z))) against its definition, and its gradients.
TEST(Encoder, BottleneckAdapterIsTheHoulsbyBottleneck) {
  lora::BottleneckAdapter<double> a(6, {2, lora::Activation::gelu, 9});
  EXPECT_EQ(a.forward(random_uniform(5, 6, 1)), random_uniform(5, 6, 1));  // up = 0: the identity
  a.up() = lora::Linear<double>(random_uniform(6, 2, 2), random_uniform(6, 1, 3).col(0));
  const MatD z = random_uniform(5, 6, 4);
  const MatD a_pre = (z * a.down().weight().transpose()).rowwise() + a.down().bias().transpose();
  const MatD h = a_pre.unaryExpr([](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); });
  const MatD want = (z + h * a.up().weight().transpose()).rowwise() + a.up().bias().transpose();
  EXPECT_LE((a.forward(z) - want).cwiseAbs().maxCoeff(), 1e-14);
  const MatD dy = random_uniform(5, 6, 5);
  auto loss = [&](const MatD& zin) { return (a.forward(zin).array() * dy.array()).sum(); };
  a.zero_grad();
  EXPECT_EQ(a.forward_train(z), a.forward(z));
  const MatD dz = a.backward(dy);
  int checked = expect_parameter_gradients(a.parameters(), [&] { return loss(z); }, 2e-7);
  checked += expect_input_gradient(z, dz, loss, 2e-7);
  EXPECT_EQ(checked, 2 * 6 + 2 + 6 * 2 + 6 + 5 * 6);
  EXPECT_LORA_ERROR(lora::BottleneckAdapter<double>(6, {0}), "BottleneckAdapter: size is 0, expected >= 1");
  EXPECT_LORA_ERROR(a.forward(MatD::Zero(2, 5)), "BottleneckAdapter::forward: Z is (2, 5), expected (n, 6)");
  EXPECT_LORA_ERROR(a.backward(dy), "no forward_train");
}

TEST(Encoder, FullTrainingGradientsMatchFiniteDifferences) {
  EncoderBlock<double> block(8, make_config({"o_proj", "fc2"}, 0));
  randomize_updates(block);
  block.set_base_trainable(true);
  // LayerNorms: move γ and β off 1 and 0 so their gradients are not special.
  block.ln1().gamma() = random_uniform(8, 1, 3).col(0).array() + 1.0;
  block.ln2().beta() = random_uniform(8, 1, 4).col(0);
  lora::Index n = 0;
  for (auto& p : block.parameters()) n += p.value.size();
  EXPECT_EQ(n, block.parameter_count());  // everything trains
  check_gradients(block, random_uniform(2 * 4, 8, 2), 2, {});
}

TEST(Encoder, FreshAdaptersChangeNothing) {
  const MatD x = random_uniform(6, 8, 1);
  const EncoderBlock<double> plain(8, make_config({}, 0));
  auto c = make_config({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, 4);
  c.bottleneck.size = 3;
  const EncoderBlock<double> adapted(8, c);
  EXPECT_EQ(plain.forward(x, 2), adapted.forward(x, 2));  // B = 0, V = 0 and up = 0, same base weights
}

TEST(Encoder, LoraTrainingLeavesBaseWeightsUnchangedAndMergeAgrees) {
  EncoderBlock<double> block(16, [] {
    auto c = make_config({"q_proj", "v_proj", "fc1", "fc2"}, 0);
    c.heads = 4;
    c.lora.dropout = 0.1;
    return c;
  }());
  const MatD W0 = block.fc1().weight(), Q0 = block.attention().lora("q_proj")->weight();
  const MatD x = random_uniform(8, 16, 1), target = random_uniform(8, 16, 2);
  double first = 0, last = 0;
  for (int step = 0; step < 50; ++step) {
    const MatD err = block.forward_train(x, 2) - target;
    (step == 0 ? first : last) = err.squaredNorm() / err.size();
    block.zero_grad();
    block.backward(2.0 / err.size() * err);  // mean squared error
    for (auto& p : block.parameters()) p.value -= 0.2 * p.grad;
  }
  EXPECT_LT(last, 0.9 * first);  // LoRA alone fits part of the target
  EXPECT_EQ(block.fc1().weight(), W0);
  EXPECT_EQ(block.attention().lora("q_proj")->weight(), Q0);
  const MatD y = block.forward(x, 2);
  block.merge();
  EXPECT_LE((block.forward(x, 2) - y).cwiseAbs().maxCoeff(), 1e-12 * y.cwiseAbs().maxCoeff());
  block.unmerge();
}

TEST(Encoder, InvalidInputsThrow) {
  EXPECT_LORA_ERROR(EncoderBlock<double>(8, make_config({"up_proj"}, 0)), "unknown target module 'up_proj'");
  EXPECT_LORA_ERROR(EncoderBlock<double>(8, make_config({}, 0, 1.0)), "adapter_dropout is 1");
  auto c = make_config({}, 0);
  c.bottleneck.size = -2;
  EXPECT_LORA_ERROR(EncoderBlock<double>(8, c), "BottleneckAdapter: size is -2, expected >= 1");
  c.bottleneck.size = 2;
  c.bottleneck_after_attention = c.bottleneck_after_mlp = false;
  EXPECT_LORA_ERROR(EncoderBlock<double>(8, c), "bottleneck size is 2 but neither after the attention nor after the MLP");
  EncoderBlock<double> block(8, make_config({}, 0));
  EXPECT_LORA_ERROR(block.forward(MatD::Zero(3, 7), 1), "EncoderBlock::forward: X is (3, 7), expected (n, 8)");
  EXPECT_LORA_ERROR(block.backward(MatD::Zero(3, 8)), "no forward_train");
}

// Ladder side-tuning: a new side network leaves the last tap as it is; gradients of every side
// parameter (down-projections, gates, side blocks, up) by finite differences; bad shapes refused.
TEST(Encoder, LadderSideGradientsMatchFiniteDifferences) {
  const lora::Index d = 8, n = 6;
  lora::LadderSide<double> side(d, 2, {4, 1, 3});
  EXPECT_EQ(side.width(), 2);
  const std::vector<MatD> taps = {random_uniform(n, d, 1), random_uniform(n, d, 2), random_uniform(n, d, 3)};
  EXPECT_EQ(side.forward(taps, 2), taps.back());  // U = 0, c = 0
  EXPECT_EQ(side.gate(1), 0.5);
  std::uint64_t seed = 40;
  for (auto& p : side.parameters())
    if (p.name == "up.weight" || p.name == "up.bias" || p.name == "gate") p.value = random_uniform(p.value.rows(), p.value.cols(), ++seed, 0.5);
  EXPECT_NE(side.gate(1), 0.5);
  const MatD dy = random_uniform(n, d, 9);
  auto loss = [&] { return (side.forward_train(taps, 2).array() * dy.array()).sum(); };
  side.zero_grad();
  EXPECT_LE((side.forward_train(taps, 2) - side.forward(taps, 2)).cwiseAbs().maxCoeff(), 1e-14);
  side.backward(dy);
  EXPECT_LORA_ERROR(side.backward(dy), "no forward_train");  // backward consumed it
  lora::Index count = 0;
  for (auto& p : side.parameters()) count += p.value.size();
  EXPECT_EQ(count, side.parameter_count());
  EXPECT_EQ(expect_parameter_gradients(side.parameters(), loss, 2e-7), count);
  EXPECT_LORA_ERROR(lora::LadderSide<double>(128, 2, {3, 2, 0}), "LadderSide: the reduction factor 3 does not divide the width 128");
  EXPECT_LORA_ERROR(side.forward({taps[0], taps[1]}, 2), "LadderSide::forward: 2 taps, expected 3");
  EXPECT_LORA_ERROR(side.forward({taps[0], taps[1], MatD::Zero(n, 5)}, 2), "tap 2 is (6, 5), expected (6, 8)");
}
