// quickstart: fit a LoRA layer to a hidden low-rank change of a frozen weight.
//
// A frozen W (256, 256) and a hidden rank-4 update ΔW*; the LoRA layer (r = 8) sees pairs
// (x, x·(W + ΔW*)ᵀ + b) and learns s·B·A ≈ ΔW* while W stays untouched. Then it merges the
// adapter, checks that the merged layer (one GEMM) gives the same outputs, and unmerges exactly.
//
//   quickstart [--quick] [--steps N] [--seed S]
#include <lora/lora.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

using Mat = lora::Mat<float>;
using Vec = lora::Vec<float>;

static Mat normal(Eigen::Index rows, Eigen::Index cols, lora::detail::Rng& rng, float scale) {
  Mat m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = scale * static_cast<float>(rng.normal());
  return m;
}

int main(int argc, char** argv) {
  int steps = 400;
  std::uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) steps = 150;
    else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: quickstart [--quick] [--steps N] [--seed S]\n");
      return 2;
    }
  }
  const int d = 256, true_rank = 4, batch = 64;
  lora::detail::Rng rng(seed);
  const Mat W = normal(d, d, rng, 1.0f / 16);
  const Vec b = normal(d, 1, rng, 0.1f).col(0);
  const Mat target_delta = normal(d, true_rank, rng, 0.25f) * normal(true_rank, d, rng, 0.25f);

  lora::LoraConfig cfg;
  cfg.r = 8;
  cfg.alpha = 16;
  cfg.exact_unmerge = true;
  cfg.seed = seed;
  lora::LoraLinear<float> layer(W, b, cfg);
  std::printf("LoRA layer %d -> %d, r = %d, scaling %.2f: %lld trainable parameters (full fine-tuning: %lld)\n", d, d,
              cfg.r, double(layer.scaling()), (long long)layer.trainable_parameters(), (long long)layer.base_parameters());

  // Adam (PyTorch defaults but lr) over A and B, written out: the library's optimizers live
  // in their own header.
  auto params = layer.parameters();
  std::vector<Mat> m1, m2;
  for (auto& p : params) {
    m1.push_back(Mat::Zero(p.value.rows(), p.value.cols()));
    m2.push_back(Mat::Zero(p.value.rows(), p.value.cols()));
  }
  const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float first_loss = 0, loss = 0;
  for (int step = 1; step <= steps; ++step) {
    const Mat x = normal(batch, d, rng, 1.0f);
    const Mat target = (x * (W + target_delta).transpose()).rowwise() + b.transpose();
    const Mat err = layer.forward_train(x) - target;
    loss = err.squaredNorm() / float(err.size());
    if (step == 1) first_loss = loss;
    layer.zero_grad();
    layer.backward(err * (2.0f / float(err.size())));
    const float c1 = 1 - std::pow(beta1, float(step)), c2 = 1 - std::pow(beta2, float(step));
    for (std::size_t k = 0; k < params.size(); ++k) {
      m1[k] = beta1 * m1[k] + (1 - beta1) * params[k].grad;
      m2[k] = beta2 * m2[k] + (1 - beta2) * Mat(params[k].grad.cwiseAbs2());
      params[k].value.array() -= lr * (m1[k].array() / c1) / ((m2[k].array() / c2).sqrt() + eps);
    }
    if (step == 1 || step % 50 == 0 || step == steps) std::printf("step %4d  mse %.3e\n", step, double(loss));
  }
  const float rel = (layer.delta_weight() - target_delta).norm() / target_delta.norm();
  std::printf("learned s*B*A vs hidden update: relative error %.3e\n", double(rel));

  const Mat x = normal(batch, d, rng, 1.0f);
  const Mat y_unmerged = layer.forward(x);
  layer.merge();
  const float merged_diff = (layer.forward(x) - y_unmerged).cwiseAbs().maxCoeff() / y_unmerged.cwiseAbs().maxCoeff();
  layer.unmerge();
  const bool exact = Mat(layer.weight()) == W;
  std::printf("merged vs unmerged output: max relative difference %.3e\n", double(merged_diff));
  std::printf("unmerge restored W bit-for-bit: %s\n", exact ? "yes" : "no");

  const bool ok = loss < 1e-3f * first_loss && rel < 0.1f && merged_diff < 1e-5f && exact;
  std::printf("quickstart: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
