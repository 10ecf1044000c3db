// peft_adapter MODEL.safetensors ADAPTER_DIR OUT_DIR
//
// Loads a Hugging Face style base model (its state dict) and a PEFT LoRA adapter, runs every
// adapted layer on a probe input, merges the adapter into the base weights and writes them as
// OUT_DIR/model.safetensors (with the model's config.json beside it, so transformers loads
// OUT_DIR as a plain model), and saves the adapter back to OUT_DIR/adapter in the dtype it was
// read in. The model's architecture is not needed: every weight that target_modules selects
// becomes a LoraLinear (lora::LoraModel).
#include <lora/lora.hpp>

#include <cstdio>
#include <filesystem>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: peft_adapter MODEL.safetensors ADAPTER_DIR OUT_DIR\n");
    return 2;
  }
  namespace fs = std::filesystem;
  const std::string model_path = argv[1], adapter = argv[2], out = argv[3];
  try {
    const lora::PeftConfig config = lora::PeftConfig::read(adapter + "/adapter_config.json");
    lora::LoraModel<float> model(model_path, config);
    lora::load_adapter(adapter, model.modules());
    const auto adapter_dtype =
        lora::SafeTensors::open(adapter + "/adapter_model.safetensors").tensors().front().dtype;

    // Each layer on a probe: the merged weight must give what the unmerged layer gives.
    std::printf("%-44s %10s %4s %8s %14s\n", "module", "(out, in)", "r", "scaling", "merge error");
    double worst = 0;
    for (const auto& [path, layer] : model.modules()) {
      const lora::Mat<float> x = lora::Mat<float>::Random(4, layer->in_features());
      const lora::Mat<float> y = layer->forward(x);
      layer->merge();
      const double err = (layer->forward(x) - y).cwiseAbs().maxCoeff() / std::max(1e-30f, y.cwiseAbs().maxCoeff());
      layer->unmerge();
      worst = std::max(worst, err);
      std::printf("%-44s %4ld, %4ld %4d %8.4f %14.2e\n", path.c_str(), static_cast<long>(layer->out_features()),
                  static_cast<long>(layer->in_features()), layer->rank(), static_cast<double>(layer->scaling()), err);
    }

    fs::create_directories(out);
    model.merge();
    model.save_weights(out + "/model.safetensors");
    model.unmerge();
    const fs::path model_config = fs::path(model_path).parent_path() / "config.json";
    if (fs::exists(model_config)) fs::copy_file(model_config, out + "/config.json", fs::copy_options::overwrite_existing);
    lora::save_adapter(out + "/adapter", model.modules(), config, adapter_dtype);

    std::printf("peft_adapter: %zu adapted layers; merged weights written to %s/model.safetensors; adapter saved "
                "to %s/adapter (%s); worst merge error %.2e relative\n",
                model.modules().size(), out.c_str(), out.c_str(), lora::dtype_name(adapter_dtype), worst);
    std::printf("peft_adapter: %s\n", worst < 1e-5 ? "ok" : "FAILED");
    return worst < 1e-5 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft_adapter: %s\n", e.what());
    return 2;
  }
}
