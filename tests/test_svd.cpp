#include "svd_once.hpp"  // first: the SVDs are instantiated once, in svd_once.cpp

#include <lora/svd.hpp>

#include "test_util.hpp"

#include <Eigen/QR>

using MatD = lora::Mat<double>;

namespace {

// n orthonormal columns of size rows.
MatD orthonormal(Eigen::Index rows, Eigen::Index n, std::uint64_t seed) {
  const MatD q = Eigen::HouseholderQR<MatD>(random_normal(rows, rows, seed)).householderQ();
  return q.leftCols(n);
}

double max_abs(const MatD& m) { return m.cwiseAbs().maxCoeff(); }

// A delta of known singular values (5, 3, 2, 1, 0.5) on a 12×9 base.
struct Tuned {
  MatD base = random_normal(12, 9, 1), U = orthonormal(12, 5, 2), V = orthonormal(9, 5, 3);
  Eigen::VectorXd sigma = (Eigen::VectorXd(5) << 5, 3, 2, 1, 0.5).finished();
  MatD delta() const { return U * sigma.asDiagonal() * V.transpose(); }
  MatD tuned() const { return base + delta(); }
  MatD truncated(int r) const { return U.leftCols(r) * sigma.head(r).asDiagonal() * V.leftCols(r).transpose(); }
};

lora::LoraConfig config(int r, double alpha, bool fan = false) {
  lora::LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.fan_in_fan_out = fan;
  c.seed = 9;
  return c;
}

}  // namespace

TEST(Svd, CompressDeltaIsTheTruncatedSvdAndItsErrorIsTheTail) {
  const Tuned t;
  const MatD tuned = t.tuned();
  const auto low = lora::compress_delta<double>(tuned, t.base, {3, 0}, 2.0);
  ASSERT_EQ(low.rank, 3);
  EXPECT_EQ(low.A.rows(), 3);
  EXPECT_EQ(low.A.cols(), 9);
  EXPECT_EQ(low.B.rows(), 12);
  EXPECT_LT((low.singular_values.head(5) - t.sigma).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LT(low.singular_values.tail(4).cwiseAbs().maxCoeff(), 1e-12);  // the delta has rank 5
  EXPECT_LT(max_abs(2.0 * low.B * low.A - t.truncated(3)), 1e-12);
  EXPECT_NEAR(low.tail, std::sqrt(1.0 + 0.25), 1e-12);
  EXPECT_NEAR(low.error, low.tail, 1e-12);

  // In a LoRA layer of the same scaling (alpha/r = 6/3) over the base, it computes x·(W + ΔW_3)ᵀ.
  lora::LoraLinear<double> layer(t.base, std::nullopt, config(3, 6));
  layer.set_lora_A(low.A);
  layer.set_lora_B(low.B);
  const MatD x = random_normal(4, 9, 5);
  EXPECT_LT(max_abs(layer.forward(x) - x * (t.base + t.truncated(3)).transpose()), 1e-12);

  // r = 5 recovers the delta exactly; an energy of 0.99 needs 4 triplets (38 / 39.25 < 0.99 <= 39 / 39.25).
  EXPECT_LT(lora::compress_delta<double>(tuned, t.base, {5, 0}).error, 1e-12);
  const auto e99 = lora::compress_delta<double>(tuned, t.base, {0, 0.99});
  EXPECT_EQ(e99.rank, 4);
  EXPECT_NEAR(e99.error, 0.5, 1e-12);
  EXPECT_EQ(lora::compress_delta<double>(tuned, t.base, {0, 1.0}).rank, 5);
  EXPECT_EQ(lora::rank_for_energy(t.sigma, 25.0 / 39.25), 1);

  const lora::Mat<float> tf = tuned.cast<float>(), bf = t.base.cast<float>();
  const auto lf = lora::compress_delta<float>(tf, bf, {2, 0});
  EXPECT_LT(max_abs((lf.B * lf.A).cast<double>() - t.truncated(2)), 1e-5);
}

TEST(Svd, CompressDeltaRefusesBadInput) {
  const Tuned t;
  const MatD tuned = t.tuned();
  EXPECT_LORA_ERROR(lora::compress_delta<double>(tuned, MatD::Zero(12, 8), {2, 0}), "compress_delta", "(12, 9)", "(12, 8)");
  EXPECT_LORA_ERROR(lora::compress_delta<double>(tuned, t.base, {2, 0.5}), "compress_delta", "not both");
  EXPECT_LORA_ERROR(lora::compress_delta<double>(tuned, t.base, {0, 0}), "compress_delta", "not neither");
  EXPECT_LORA_ERROR(lora::compress_delta<double>(tuned, t.base, {10, 0}), "rank 10 exceeds min(out, in) = 9");
  EXPECT_LORA_ERROR(lora::compress_delta<double>(tuned, t.base, {2, 0}, 0.0), "scaling is 0");
  EXPECT_LORA_ERROR(lora::rank_for_energy(t.sigma, 1.5), "energy is 1.5");
  MatD bad = tuned;
  bad(3, 4) = NAN;
  EXPECT_LORA_ERROR(lora::compress_delta<double>(bad, t.base, {2, 0}), "non-finite");
}

class InitTest : public ::testing::TestWithParam<bool> {};  // fan_in_fan_out

TEST_P(InitTest, PissaKeepsTheOutputAndMovesTheTopSingularTripletsIntoTheAdapter) {
  const bool fan = GetParam();
  const MatD W = random_normal(10, 7, 1);  // (out, in)
  const MatD stored = fan ? MatD(W.transpose()) : W;
  lora::LoraLinear<double> layer(stored, random_normal(10, 1, 2).col(0), config(3, 6, fan));
  const MatD x = random_normal(5, 7, 3);
  const MatD y = layer.forward(x);
  lora::pissa_init(layer);
  EXPECT_LT(max_abs(layer.forward(x) - y), 1e-12);
  const Eigen::VectorXd sw = Eigen::JacobiSVD<MatD>(W).singularValues();
  // s·B·A holds σ1..σ3 of W, the residual base σ4..σ7.
  const Eigen::VectorXd sd = Eigen::JacobiSVD<MatD>(layer.delta_weight()).singularValues();
  EXPECT_LT((sd.head(3) - sw.head(3)).cwiseAbs().maxCoeff(), 1e-12);
  const MatD residual = fan ? MatD(MatD(layer.weight()).transpose()) : MatD(layer.weight());
  const Eigen::VectorXd sr = Eigen::JacobiSVD<MatD>(residual).singularValues();
  EXPECT_LT((sr.head(4) - sw.tail(4)).cwiseAbs().maxCoeff(), 1e-12);
  // PEFT's split: A = diag(√(σ/s))·Vᵀ, so A·Aᵀ = diag(σ/s).
  const MatD AAt = layer.lora_A() * layer.lora_A().transpose();
  EXPECT_LT(max_abs(AAt - MatD((sw.head(3) / 2.0).asDiagonal())), 1e-12);
}

TEST_P(InitTest, OloraKeepsTheOutputWithOrthonormalB) {
  const bool fan = GetParam();
  const MatD W = random_normal(10, 7, 4);
  lora::LoraLinear<double> layer(fan ? MatD(W.transpose()) : W, std::nullopt, config(4, 8, fan));
  const MatD x = random_normal(5, 7, 5);
  const MatD y = layer.forward(x);
  lora::olora_init(layer);
  EXPECT_LT(max_abs(layer.forward(x) - y), 1e-12);
  EXPECT_LT(max_abs(layer.lora_B().transpose() * layer.lora_B() - MatD::Identity(4, 4)), 1e-12);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < i; ++j) EXPECT_EQ(layer.lora_A()(i, j), 0.0);  // R is upper triangular
  // W = Q·R with R upper triangular, so Q_r·R_r reproduces W's first r columns.
  EXPECT_LT(max_abs((layer.lora_B() * layer.lora_A()).leftCols(4) - W.leftCols(4)), 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Svd, InitTest, ::testing::Values(false, true));

TEST(Svd, InitsRefuseWhatTheyCannotDoAndChangeNothing) {
  const MatD W = random_normal(6, 5, 1);
  lora::LoraLinear<double> merged(W, std::nullopt, config(2, 2));
  merged.set_lora_B(random_normal(6, 2, 2));
  merged.merge();
  const MatD wm = merged.weight();
  EXPECT_LORA_ERROR(lora::pissa_init(merged), "pissa_init", "merged");
  EXPECT_EQ(MatD(merged.weight()), wm);

  lora::LoraLinear<double> borrowed(lora::ConstMatMap<double>(W.data(), 6, 5), std::nullopt, config(2, 2));
  const MatD A = borrowed.lora_A();
  EXPECT_LORA_ERROR(lora::olora_init(borrowed), "set_weight", "read-only borrow");
  EXPECT_EQ(borrowed.lora_A(), A);
  EXPECT_EQ(MatD(borrowed.weight()), W);

  lora::LoraLinear<double> wide(W, std::nullopt, config(6, 6));
  EXPECT_LORA_ERROR(lora::pissa_init(wide), "pissa_init: r = 6 exceeds min(out, in) = 5");
  EXPECT_LORA_ERROR(wide.set_weight(MatD::Zero(5, 6)), "LoraLinear::set_weight: W is (5, 6), expected (6, 5)");
}
