#include <lora/loss.hpp>
#include <lora/safetensors.hpp>

#include "test_util.hpp"

using MatD = lora::Mat<double>;

TEST(Loss, CrossEntropyMatchesTorchWithAndWithoutLabelSmoothing) {
  const auto st = lora::SafeTensors::open(data_path("recorded/training.safetensors"));
  const MatD logits = st.matrix<double>("ce.logits");
  const auto ids = st.integers("ce.labels");
  const std::vector<std::int64_t> labels(ids.data(), ids.data() + ids.size());
  for (const char* eps : {"0.0", "0.1"}) {
    SCOPED_TRACE(eps);
    const auto r = lora::cross_entropy<double>(logits, labels, std::stod(eps));
    EXPECT_NEAR(r.loss, st.matrix<double>(std::string("ce") + eps + ".loss")(0, 0), 1e-14);
    EXPECT_LT((r.grad - st.matrix<double>(std::string("ce") + eps + ".grad")).cwiseAbs().maxCoeff(), 1e-15);
  }
}

TEST(Loss, CrossEntropyIsStableForHugeLogits) {
  MatD logits(1, 3);
  logits << 1000, 0, -1000;
  const auto r = lora::cross_entropy<double>(logits, {0});
  EXPECT_NEAR(r.loss, 0.0, 1e-300);
  EXPECT_TRUE(r.grad.allFinite());
  const auto wrong = lora::cross_entropy<double>(logits, {2});
  EXPECT_DOUBLE_EQ(wrong.loss, 2000.0);
}

TEST(Loss, MseMatchesTorch) {
  const auto st = lora::SafeTensors::open(data_path("recorded/training.safetensors"));
  const auto r = lora::mse<double>(st.matrix<double>("mse.y"), st.matrix<double>("mse.target"));
  EXPECT_NEAR(r.loss, st.matrix<double>("mse.loss")(0, 0), 1e-15);
  EXPECT_LT((r.grad - st.matrix<double>("mse.grad")).cwiseAbs().maxCoeff(), 1e-16);
}

TEST(Loss, BadInputsThrow) {
  EXPECT_LORA_ERROR(lora::cross_entropy<double>(MatD::Zero(2, 3), {0}), "logits are (2, 3) but there are 1 labels");
  EXPECT_LORA_ERROR(lora::cross_entropy<double>(MatD::Zero(1, 3), {3}), "label 3 of row 0 is outside [0, 3)");
  EXPECT_LORA_ERROR(lora::cross_entropy<double>(MatD::Zero(1, 3), {0}, 1.5), "label_smoothing is 1.5");
  EXPECT_LORA_ERROR(lora::mse<double>(MatD::Zero(2, 3), MatD::Zero(3, 2)), "mse: y is (2, 3) but target is (3, 2)");
}
