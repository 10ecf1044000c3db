// Builds a layer, merges it, writes and reads it back, and runs a small Llama from the one
// header: exits 0 only if the numbers agree.
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
  const auto lm = lora::LmConfig::from_json(R"({"model_type": "llama", "vocab_size": 11, "hidden_size": 8,
      "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16})", "consumer");
  const lora::LlamaModel<float> llama(lm, 1);
  const lora::Mat<float> logits = llama.forward(lora::Mat<std::int64_t>::Constant(1, 3, 4));
  const bool lm_ok = logits.rows() == 3 && logits.cols() == 11 && logits.allFinite();
  std::printf("consumer: lora %s, merged vs unmerged %.2e, safetensors round trip %.2e, llama logits %s\n", LORA_VERSION_STRING,
              err, io, lm_ok ? "3 x 11" : "wrong");
  return err < 1e-12 && io == 0 && lm_ok ? 0 : 1;
}
