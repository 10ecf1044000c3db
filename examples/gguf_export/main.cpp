// gguf_export MODEL_DIR OUT_DIR [--dtype f32|f16|bf16] [--adapter DIR] [--ids FILE]
//
// A Llama or GPT-2 checkpoint folder (config.json, model.safetensors, adapter/ with a PEFT adapter)
// as llama.cpp's files: OUT_DIR/base.gguf (save_gguf_model) and OUT_DIR/adapter.gguf
// (save_gguf_adapter; the adapter from --adapter DIR, else MODEL_DIR/adapter). Given input_ids
// (--ids FILE, else MODEL_DIR/io.safetensors when it exists), OUT_DIR/logits.safetensors
// holds the library's logits for them: base, adapter (scale 1) and adapter_half (scale 0.5),
// with the input_ids, for tests/data/gguf/check_llama_cpp.py, which runs llama.cpp on the two
// GGUF files and compares.
#include <lora/models/gguf_model.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/models/llama.hpp>

#include <cstdio>
#include <filesystem>
#include <string>

namespace {

// The adapter, and the library's logits for io.safetensors' input_ids when MODEL_DIR has it.
template <class Model>
void export_adapter(const std::string& dir, const std::string& adapter, const std::string& ids_file, const std::string& out,
                    lora::GgmlType dtype) {
  const auto config = lora::PeftConfig::read(adapter + "/adapter_config.json");
  Model model(dir, &config);
  model.load_adapter(adapter);
  lora::save_gguf_adapter(out + "/adapter.gguf", model.config(), model.modules(), dtype);
  if (ids_file.empty()) return;
  const lora::Mat<std::int64_t> ids = lora::SafeTensors::open(ids_file).integers("input_ids");
  lora::SafeTensorsBuilder b;
  b.add("input_ids", ids);
  b.add("adapter", model.forward(ids).template cast<float>());
  for (const auto& [path, layer] : model.modules()) layer->set_lora_B(0.5 * layer->lora_B());
  b.add("adapter_half", model.forward(ids).template cast<float>());
  model.modules().enable_adapters(false);
  b.add("base", model.forward(ids).template cast<float>());
  b.save(out + "/logits.safetensors");
  std::printf("gguf_export: wrote %s/logits.safetensors (%ld x %ld ids)\n", out.c_str(), long(ids.rows()), long(ids.cols()));
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage = "usage: gguf_export MODEL_DIR OUT_DIR [--dtype f32|f16|bf16] [--adapter DIR] [--ids FILE]\n";
  std::string dir, out, d = "f32", adapter, ids;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--dtype" || a == "--adapter" || a == "--ids") && i + 1 < argc) {
      (a == "--dtype" ? d : a == "--adapter" ? adapter : ids) = argv[++i];
    } else if (a.rfind("--", 0) != 0 && (dir.empty() || out.empty())) {
      (dir.empty() ? dir : out) = a;
    } else {
      std::fprintf(stderr, "gguf_export: unexpected argument '%s'\n%s", a.c_str(), usage);
      return 2;
    }
  }
  if (out.empty()) {
    std::fprintf(stderr, "%s", usage);
    return 2;
  }
  try {
    if (d != "f32" && d != "f16" && d != "bf16") lora::detail::fail("--dtype ", d, ": expected f32, f16 or bf16");
    const lora::GgmlType dtype = d == "f32" ? lora::GgmlType::f32 : d == "f16" ? lora::GgmlType::f16 : lora::GgmlType::bf16;
    if (adapter.empty()) adapter = dir + "/adapter";
    if (ids.empty() && std::filesystem::exists(dir + "/io.safetensors")) ids = dir + "/io.safetensors";
    std::filesystem::create_directories(out);
    lora::save_gguf_model(dir, out + "/base.gguf", dtype);
    if (lora::LmConfig::read(dir).model_type == "gpt2")
      export_adapter<lora::Gpt2Model<double>>(dir, adapter, ids, out, dtype);
    else
      export_adapter<lora::LlamaModel<double>>(dir, adapter, ids, out, dtype);
    std::printf("gguf_export: wrote %s/base.gguf and %s/adapter.gguf (%s)\n", out.c_str(), out.c_str(), d.c_str());
    std::printf("gguf_export: ok\n");
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "gguf_export: %s\n", e.what());
    return 1;
  }
  return 0;
}
