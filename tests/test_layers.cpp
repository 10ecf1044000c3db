#include <lora/layers.hpp>

#include "test_util.hpp"

#include <functional>

using MatD = lora::Mat<double>;
using VecD = lora::Vec<double>;

namespace {

// Central differences of L = Σ dy ⊙ f() with respect to every element of v.
template <class Target>
void expect_gradient(const std::function<MatD()>& f, Target& v, const MatD& dy, const Eigen::Ref<const MatD>& grad,
                     const char* what) {
  const double eps = 1e-6;
  for (Eigen::Index i = 0; i < v.size(); ++i) {
    const double keep = v.data()[i];
    v.data()[i] = keep + eps;
    const double lp = (f().array() * dy.array()).sum();
    v.data()[i] = keep - eps;
    const double lm = (f().array() * dy.array()).sum();
    v.data()[i] = keep;
    EXPECT_NEAR(grad.data()[i], (lp - lm) / (2 * eps), 1e-7) << what << " element " << i;
  }
}

}  // namespace

TEST(Layers, LinearGradientsMatchFiniteDifferences) {
  lora::Linear<double> lin(random_mat(4, 6, 1), random_mat(4, 1, 2).col(0));
  MatD x = random_mat(5, 6, 3);
  const MatD dy = random_mat(5, 4, 4);
  EXPECT_LT((lin.forward(x) - ((x * lin.weight().transpose()).rowwise() + lin.bias().transpose())).cwiseAbs().maxCoeff(), 1e-14);
  lin.forward_train(x);
  const MatD dx = lin.backward(dy);
  auto f = [&] { return lin.forward(x); };
  expect_gradient(f, x, dy, dx, "x");
  auto params = lin.parameters();
  ASSERT_EQ(params.size(), 2u);
  for (auto& p : params) expect_gradient(f, p.value, dy, p.grad, p.name.c_str());
}

TEST(Layers, FrozenLinearHasNoParametersAndKeepsItsBytes) {
  lora::Linear<double> lin(random_mat(4, 6, 1), VecD::Zero(4), false);
  const MatD W = lin.weight();
  lin.forward_train(random_mat(3, 6, 2));
  const MatD dx = lin.backward(random_mat(3, 4, 3));
  EXPECT_EQ(dx.rows(), 3);
  EXPECT_TRUE(lin.parameters().empty());
  EXPECT_TRUE(lin.grad_weight().isZero(0));
  EXPECT_EQ(lin.weight(), W);
  EXPECT_LORA_ERROR(lin.forward(MatD::Zero(2, 5)), "Linear::forward: X is (2, 5), expected (n, 6)");
  EXPECT_LORA_ERROR(lin.backward(MatD::Zero(3, 4)), "Linear::backward", "forward_train first");
}

TEST(Layers, LayerNormNormalisesAndItsGradientsMatchFiniteDifferences) {
  lora::LayerNorm<double> ln(7);
  MatD x = random_mat(4, 7, 1, 3.0);
  const MatD y = ln.forward(x);
  for (Eigen::Index i = 0; i < y.rows(); ++i) {
    EXPECT_NEAR(y.row(i).mean(), 0.0, 1e-14);
    EXPECT_NEAR(y.row(i).squaredNorm() / 7, 1.0, 1e-5);  // eps = 1e-5 shrinks it slightly
  }
  ln.gamma() = random_mat(7, 1, 2).col(0);
  ln.beta() = random_mat(7, 1, 3).col(0);
  const MatD dy = random_mat(4, 7, 4);
  ln.forward_train(x);
  const MatD dx = ln.backward(dy);
  auto f = [&] { return ln.forward(x); };
  expect_gradient(f, x, dy, dx, "x");
  for (auto& p : ln.parameters()) expect_gradient(f, p.value, dy, p.grad, p.name.c_str());
}

TEST(Layers, GeluIsExactAndItsDerivativeMatchesFiniteDifferences) {
  MatD x(1, 3);
  x << -1, 0, 1;
  const MatD y = lora::gelu<double>(x);
  // x·Φ(x) with Φ(1) = 0.841344746068542948585 (the normal distribution's CDF)
  EXPECT_NEAR(y(0, 2), 0.841344746068542948585, 4e-16);
  EXPECT_NEAR(y(0, 0), -(1 - 0.841344746068542948585), 4e-16);
  EXPECT_EQ(y(0, 1), 0.0);
  MatD z = random_mat(3, 5, 1, 2.0);
  const MatD dy = random_mat(3, 5, 2);
  expect_gradient([&] { return lora::gelu<double>(z); }, z, dy, lora::gelu_backward<double>(z, dy), "gelu");
}

TEST(Layers, ReluAndItsSubgradient) {
  MatD x(1, 4), dy = MatD::Ones(1, 4);
  x << -2, 0, 0.5, 3;
  EXPECT_EQ(lora::relu<double>(x), (MatD(1, 4) << 0, 0, 0.5, 3).finished());
  EXPECT_EQ(lora::relu_backward<double>(x, dy), (MatD(1, 4) << 0, 0, 1, 1).finished());
}

TEST(Layers, MeanPoolAndItsBackward) {
  MatD x = random_mat(6, 3, 1);  // batch 2, T 3
  const MatD y = lora::mean_pool<double>(x, 2);
  EXPECT_LT((y.row(1) - (x.row(3) + x.row(4) + x.row(5)) / 3).cwiseAbs().maxCoeff(), 1e-15);
  const MatD dy = random_mat(2, 3, 2);
  expect_gradient([&] { return lora::mean_pool<double>(x, 2); }, x, dy, lora::mean_pool_backward<double>(dy, 3), "x");
  EXPECT_LORA_ERROR(lora::mean_pool<double>(x, 4), "mean_pool", "batch 4");
}

TEST(Layers, PatchesAreTilesInReadingOrder) {
  MatD img(1, 16);
  for (int i = 0; i < 16; ++i) img(0, i) = i;  // 4×4: rows 0..3, 4..7, 8..11, 12..15
  const MatD p = lora::patches<double>(img, 4, 2);
  MatD expect(4, 4);
  expect << 0, 1, 4, 5,  //
      2, 3, 6, 7,        //
      8, 9, 12, 13,      //
      10, 11, 14, 15;
  EXPECT_EQ(p, expect);
  EXPECT_LORA_ERROR(lora::patches<double>(img, 4, 3), "side 4 divisible by patch 3");
}

TEST(Layers, PatchEmbeddingProjectsTilesAddsPositionsAndItsGradientsMatchFiniteDifferences) {
  lora::PatchEmbedding<double> emb(4, 2, 3, 5);  // 4×4 images, 2×2 patches -> 4 tokens of d 3
  ASSERT_EQ(emb.tiles(), 4);
  const MatD images = random_mat(2, 16, 6);
  const MatD y = emb.forward(images);
  ASSERT_EQ(y.rows(), 8);
  // Token 3 of image 1 (rows 2..3, cols 2..3 of the image) by hand.
  VecD tile(4);
  tile << images(1, 10), images(1, 11), images(1, 14), images(1, 15);
  const VecD expect = emb.proj().weight() * tile + emb.proj().bias() + emb.position().row(3).transpose();
  EXPECT_LT((y.row(7).transpose() - expect).cwiseAbs().maxCoeff(), 1e-15);

  const MatD dy = random_mat(8, 3, 7);
  emb.zero_grad();
  emb.forward_train(images);
  emb.backward(dy);
  const auto params = emb.parameters();
  ASSERT_EQ(params.size(), 3u);
  EXPECT_EQ(params[2].name, "position");
  const int checked = expect_parameter_gradients(params, [&] { return (emb.forward(images).array() * dy.array()).sum(); }, 1e-8);
  EXPECT_EQ(checked, 3 * 4 + 3 + 4 * 3);

  lora::PatchEmbedding<double> frozen(4, 2, 3, 5, false);
  EXPECT_TRUE(frozen.parameters().empty());
  EXPECT_LORA_ERROR(frozen.backward(dy), "PatchEmbedding::backward", "forward_train first");
  EXPECT_LORA_ERROR(lora::PatchEmbedding<double>(5, 2, 3, 1), "PatchEmbedding: side 5, patch 2", "divisible");
  EXPECT_LORA_ERROR(emb.forward(MatD::Zero(1, 15)), "patches: images are (1, 15)");
}
