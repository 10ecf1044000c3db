// Builds a layer, merges it, writes and reads it back: exits 0 only if the numbers agree.
#include <lora/lora.hpp>

#include <cstdio>

int main() {
  using Mat = lora::Mat<double>;
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.alpha = 4;
  lora::LoraLinear<double> layer(Mat::Identity(3, 4), std::nullopt, cfg);
  layer.set_lora_B(Mat::Ones(3, 2));
  Mat x = Mat::Ones(2, 4);
  Mat y = layer.forward(x);
  layer.merge();
  double err = (layer.forward(x) - y).cwiseAbs().maxCoeff();
  auto bytes = lora::SafeTensorsBuilder().add("y", y).serialize();
  double io = (lora::SafeTensors::from_bytes(bytes).matrix<double>("y") - y).cwiseAbs().maxCoeff();
  std::printf("consumer: merged vs unmerged %.2e, safetensors round trip %.2e\n", err, io);
  return err < 1e-12 && io == 0 ? 0 : 1;
}
