#include <lora/embedding.hpp>

#include "fixture_cases.hpp"
#include "test_util.hpp"

using MatD = lora::Mat<double>;
using Ids = std::vector<std::int64_t>;

namespace {

lora::LoraEmbedding<double> make(int r = 3, double alpha = 6) {
  lora::LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = alpha;
  cfg.seed = 4;
  lora::LoraEmbedding<double> e(random_normal(11, 5, 1), cfg);
  e.set_lora_A(random_normal(r, 11, 2));
  return e;
}

}  // namespace

TEST(Embedding, MatchesPeftFixture) {
  fixture::Report r = fixture::check_file(data_path("peft/embedding.safetensors"));
  ASSERT_TRUE(r.supported) << r.note;
  EXPECT_EQ(r.comparisons.size(), 2u * 7u);
  for (const auto& c : r.comparisons) EXPECT_TRUE(c.ok()) << c.scalar << " " << c.what << ": " << c.error;
}

TEST(Embedding, FreshAdapterChangesNothingAsInPeft) {
  lora::LoraConfig cfg;
  cfg.r = 4;
  const MatD W = random_normal(7, 3, 1);
  lora::LoraEmbedding<double> e(W, cfg);
  EXPECT_TRUE(e.lora_A().isZero(0));               // PEFT: A = 0 for embeddings
  EXPECT_GT(e.lora_B().cwiseAbs().maxCoeff(), 0.1);  // and B ~ N(0, 1)
  const Ids ids = {6, 0, 3};
  const MatD y = e.forward(ids);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(y.row(i), W.row(ids[std::size_t(i)]));
}

TEST(Embedding, ForwardIsTheFormulaAndRepeatedIdsAccumulateGradients) {
  auto e = make();
  const Ids ids = {3, 9, 3, 0};
  const MatD y = e.forward(ids);
  const double s = 2.0;  // alpha / r
  for (int i = 0; i < 4; ++i) {
    const auto id = ids[std::size_t(i)];
    const Eigen::RowVectorXd expect = e.weight().row(id) + s * (e.lora_B() * e.lora_A().col(id)).transpose();
    EXPECT_LT((y.row(i) - expect).cwiseAbs().maxCoeff(), 1e-14);
  }
  const MatD dy = random_normal(4, 5, 3);
  e.forward_train(ids);
  e.backward(dy);
  // Finite differences of Σ dy ⊙ y over every element of A and B (id 3 appears twice).
  const int checked = expect_parameter_gradients(e.parameters(), [&] { return (e.forward(ids).array() * dy.array()).sum(); }, 1e-8);
  EXPECT_EQ(checked, 3 * 11 + 5 * 3);
  // Columns of A for ids never looked up get no gradient.
  EXPECT_TRUE(e.grad_A().col(5).isZero(0));
  EXPECT_FALSE(e.grad_A().col(3).isZero(0));
}

TEST(Embedding, MergeAddsTheTransposedDeltaAndExactUnmergeRestoresW) {
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.alpha = 4;
  cfg.use_rslora = true;
  cfg.exact_unmerge = true;
  const MatD W = random_normal(9, 4, 1);
  lora::LoraEmbedding<double> e(W, cfg);
  e.set_lora_A(random_normal(2, 9, 2));
  const Ids ids = {8, 1, 1, 4};
  const MatD y = e.forward(ids);
  EXPECT_LT((e.delta_weight() - 4 / std::sqrt(2.0) * (e.lora_B() * e.lora_A()).transpose()).cwiseAbs().maxCoeff(), 1e-14);
  e.merge();
  EXPECT_TRUE(e.is_merged());
  EXPECT_LT((e.forward(ids) - y).cwiseAbs().maxCoeff(), 1e-13);
  EXPECT_LORA_ERROR(e.forward_train(ids), "LoraEmbedding::forward_train", "merged");
  EXPECT_LORA_ERROR(e.set_lora_B(MatD::Zero(4, 2)), "set_lora_B", "merged");
  e.unmerge();
  EXPECT_EQ(std::memcmp(e.weight().data(), W.data(), sizeof(double) * std::size_t(W.size())), 0);
}

TEST(Embedding, BadInputIsRefusedAndChangesNothing) {
  auto e = make();
  const Ids good = {1, 2};
  e.forward_train(good);
  const MatD A = e.lora_A();
  EXPECT_LORA_ERROR(e.forward(Ids{1, 11}), "LoraEmbedding::forward", "id 11 at position 1", "[0, 11)");
  EXPECT_LORA_ERROR(e.forward_train(Ids{-1}), "LoraEmbedding::forward_train", "id -1 at position 0");
  e.backward(MatD::Ones(2, 5));  // the cache of the good forward_train survived the refused one
  EXPECT_FALSE(e.grad_A().col(1).isZero(0));
  EXPECT_LORA_ERROR(e.backward(MatD::Ones(2, 5)), "LoraEmbedding::backward", "forward_train first");
  e.forward_train(good);
  EXPECT_LORA_ERROR(e.backward(MatD::Ones(3, 5)), "LoraEmbedding::backward: dY is (3, 5), expected (2, 5)");
  EXPECT_LORA_ERROR(e.set_lora_A(MatD::Zero(3, 10)), "set_lora_A: got (3, 10), expected (3, 11)");
  EXPECT_EQ(e.lora_A(), A);
  lora::LoraConfig bad;
  bad.r = 0;
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(random_normal(3, 2, 1), bad), "LoraEmbedding: r is 0");
  bad.r = 2;
  bad.alpha = -1;
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(random_normal(3, 2, 1), bad), "LoraEmbedding: alpha is -1");
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(MatD(0, 2), lora::LoraConfig{}), "LoraEmbedding: weight is (0, 2)");
  // LoraConfig fields that have no meaning for an embedding are refused, not ignored.
  const MatD W = random_normal(3, 2, 1);
  auto with = [](auto set) {
    lora::LoraConfig c;
    set(c);
    return c;
  };
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(W, with([](auto& c) { c.init = lora::Init::gaussian; })), "init gaussian does not apply");
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(W, with([](auto& c) { c.use_dora = true; })), "use_dora is not supported");
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(W, with([](auto& c) { c.fan_in_fan_out = true; })), "fan_in_fan_out does not apply");
  EXPECT_LORA_ERROR(lora::LoraEmbedding<double>(W, with([](auto& c) { c.bias = lora::BiasMode::trainable; })), "has no bias");
}
