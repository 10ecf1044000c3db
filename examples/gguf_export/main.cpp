// gguf_export MODEL_DIR OUT_DIR [--dtype f32|f16|bf16]
//
// A Llama checkpoint folder (config.json, model.safetensors, adapter/ with a PEFT adapter) as
// llama.cpp's files: OUT_DIR/base.gguf (save_gguf_model) and OUT_DIR/adapter.gguf
// (save_gguf_adapter). Where MODEL_DIR has io.safetensors (input_ids), OUT_DIR/logits.safetensors
// holds the library's logits for them: base, adapter (scale 1) and adapter_half (scale 0.5),
// with the input_ids, for tests/data/gguf/check_llama_cpp.py, which runs llama.cpp on the two
// GGUF files and compares.
#include <lora/models/gguf_model.hpp>
#include <lora/models/llama.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 5 && std::strcmp(argv[3], "--dtype") == 0)) {
    std::fprintf(stderr, "usage: gguf_export MODEL_DIR OUT_DIR [--dtype f32|f16|bf16]\n");
    return 2;
  }
  try {
    const std::string dir = argv[1], out = argv[2], d = argc == 5 ? argv[4] : "f32";
    if (d != "f32" && d != "f16" && d != "bf16") lora::detail::fail("--dtype ", d, ": expected f32, f16 or bf16");
    const lora::GgmlType dtype = d == "f32" ? lora::GgmlType::f32 : d == "f16" ? lora::GgmlType::f16 : lora::GgmlType::bf16;
    namespace fs = std::filesystem;
    fs::create_directories(out);
    lora::save_gguf_model(dir, out + "/base.gguf", dtype);
    const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
    lora::LlamaModel<double> model(dir, &config);
    model.load_adapter(dir + "/adapter");
    lora::save_gguf_adapter(out + "/adapter.gguf", model.config(), model.modules(), dtype);
    std::printf("gguf_export: wrote %s/base.gguf and %s/adapter.gguf (%s)\n", out.c_str(), out.c_str(), d.c_str());
    if (fs::exists(dir + "/io.safetensors")) {
      const lora::Mat<std::int64_t> ids = lora::SafeTensors::open(dir + "/io.safetensors").integers("input_ids");
      lora::SafeTensorsBuilder b;
      b.add("input_ids", ids);
      b.add("adapter", model.forward(ids).cast<float>());
      for (const auto& [path, layer] : model.modules()) layer->set_lora_B(0.5 * layer->lora_B());
      b.add("adapter_half", model.forward(ids).cast<float>());
      model.modules().enable_adapters(false);
      b.add("base", model.forward(ids).cast<float>());
      b.save(out + "/logits.safetensors");
      std::printf("gguf_export: wrote %s/logits.safetensors (%ld x %ld ids)\n", out.c_str(), long(ids.rows()), long(ids.cols()));
    }
    std::printf("gguf_export: ok\n");
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "gguf_export: %s\n", e.what());
    return 1;
  }
  return 0;
}
