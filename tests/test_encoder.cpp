#include <lora/models/encoder.hpp>

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

// Gives every enabled B and the adapter's V values, so that every gradient is exercised.
void randomize_updates(EncoderBlock<double>& b) {
  std::uint64_t s = 100;
  for (auto& p : b.parameters())
    if (p.name.find("lora_B") != std::string::npos || p.name == "adapter.V") p.value = random_uniform(p.value.rows(), p.value.cols(), ++s, 0.5);
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
  const EncoderBlock<double> adapted(8, make_config({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, 4));
  EXPECT_EQ(plain.forward(x, 2), adapted.forward(x, 2));  // B = 0 and V = 0, same base weights
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
  EncoderBlock<double> block(8, make_config({}, 0));
  EXPECT_LORA_ERROR(block.forward(MatD::Zero(3, 7), 1), "EncoderBlock::forward: X is (3, 7), expected (n, 8)");
  EXPECT_LORA_ERROR(block.backward(MatD::Zero(3, 8)), "no forward_train");
}
