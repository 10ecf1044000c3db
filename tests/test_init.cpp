#include <lora/dropout.hpp>
#include <lora/init.hpp>

#include <gtest/gtest.h>

#include <cmath>

using MatD = lora::Mat<double>;

TEST(Init, KaimingUniformHasPeftBoundAndMoments) {
  MatD A(16, 400), B = MatD::Ones(50, 16);
  lora::detail::Rng rng(1);
  lora::init_lora(lora::Init::kaiming, A, B, rng);
  const double bound = 1.0 / std::sqrt(400.0);
  EXPECT_LE(A.cwiseAbs().maxCoeff(), bound);
  EXPECT_GT(A.cwiseAbs().maxCoeff(), 0.99 * bound);
  // U(-b, b): mean 0, variance b²/3. 6400 samples: 5 standard errors.
  const double n = A.size(), var = bound * bound / 3;
  EXPECT_NEAR(A.mean(), 0.0, 5 * std::sqrt(var / n));
  EXPECT_NEAR(A.squaredNorm() / n, var, 5 * var * std::sqrt(0.8 / n));
  EXPECT_TRUE(B.isZero(0));
}

TEST(Init, GaussianUsesStdOneOverR) {
  MatD A(8, 2000), B = MatD::Ones(30, 8);
  lora::detail::Rng rng(2);
  lora::init_lora(lora::Init::gaussian, A, B, rng);
  const double n = A.size(), var = 1.0 / 64;
  EXPECT_NEAR(A.mean(), 0.0, 5 * std::sqrt(var / n));
  EXPECT_NEAR(A.squaredNorm() / n, var, 5 * var * std::sqrt(2.0 / n));
  EXPECT_TRUE(B.isZero(0));
}

TEST(Init, ZeroAMakesBRandom) {
  MatD A = MatD::Ones(4, 10), B(3000, 4);
  lora::detail::Rng rng(3);
  lora::init_lora(lora::Init::zero_a, A, B, rng);
  EXPECT_TRUE(A.isZero(0));
  EXPECT_NEAR(B.squaredNorm() / B.size(), 1.0 / 16, 5 * (1.0 / 16) * std::sqrt(2.0 / B.size()));
}

TEST(Init, SameSeedSameValues) {
  MatD A1(4, 10), B1(5, 4), A2(4, 10), B2(5, 4);
  lora::detail::Rng r1(9), r2(9);
  lora::init_lora(lora::Init::kaiming, A1, B1, r1);
  lora::init_lora(lora::Init::kaiming, A2, B2, r2);
  EXPECT_EQ(A1, A2);
}

TEST(Dropout, MaskRateIsWithinABinomialBound) {
  for (double p : {0.1, 0.5, 0.9}) {
    MatD mask;
    lora::detail::Rng rng(4);
    lora::dropout_mask(mask, 200, 300, p, rng);
    const double n = mask.size();
    const double dropped = (mask.array() == 0).count();
    EXPECT_NEAR(dropped, p * n, 5 * std::sqrt(n * p * (1 - p))) << "p = " << p;
    // Kept entries carry the inverted scale, so the mean stays 1.
    EXPECT_TRUE(((mask.array() == 0) || (mask.array() == 1.0 / (1 - p))).all());
  }
}

TEST(Dropout, SameSeedSameMask) {
  MatD m1, m2, m3;
  lora::detail::Rng a(5), b(5), c(6);
  lora::dropout_mask(m1, 20, 30, 0.3, a);
  lora::dropout_mask(m2, 20, 30, 0.3, b);
  lora::dropout_mask(m3, 20, 30, 0.3, c);
  EXPECT_EQ(m1, m2);
  EXPECT_NE(m1, m3);
}
