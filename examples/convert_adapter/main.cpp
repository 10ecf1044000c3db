// convert_adapter IN OUT [--base MODEL_DIR] [--dtype f32|f16|bf16]
//
// A PEFT adapter directory to a GGUF adapter file that llama.cpp loads (--lora), or back: the
// direction is OUT's extension (.gguf: to GGUF; otherwise OUT is a PEFT directory and IN a
// .gguf file). The base model's config.json gives the architecture, the head counts (Llama's
// q_proj/k_proj rows are reordered per head for llama.cpp) and the shapes every module must
// have; it comes from --base MODEL_DIR, else from the PEFT config's base_model_name_or_path when
// that is a local folder. Without one, only the architecture is known (from the module paths or
// general.architecture): shapes go unchecked and q_proj/k_proj adapters are refused. No base
// weights are read. --dtype: the factors' type in OUT (f32 by default).
#include <lora/models/gguf_adapter.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// model_type from the module paths of a PEFT adapter's tensors.
std::string guess_model_type(const std::string& dir) {
  const lora::SafeTensors st = lora::SafeTensors::open((std::filesystem::path(dir) / "adapter_model.safetensors").string());
  for (const auto& t : st.tensors()) {
    if (t.name.rfind("base_model.model.model.layers.", 0) == 0) return "llama";
    if (t.name.rfind("base_model.model.transformer.h.", 0) == 0) return "gpt2";
  }
  lora::detail::fail(dir, ": the module paths are neither a Llama's (model.layers.N) nor a GPT-2's (transformer.h.N); give --base MODEL_DIR");
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage = "usage: convert_adapter IN OUT [--base MODEL_DIR] [--dtype f32|f16|bf16]\n";
  std::string in, out, base, dtype = "f32";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--base" || a == "--dtype") && i + 1 < argc) {
      (a == "--base" ? base : dtype) = argv[++i];
    } else if (a.rfind("--", 0) != 0 && in.empty()) {
      in = a;
    } else if (a.rfind("--", 0) != 0 && out.empty()) {
      out = a;
    } else {
      std::fprintf(stderr, "convert_adapter: unexpected argument '%s'\n%s", a.c_str(), usage);
      return 2;
    }
  }
  if (in.empty() || out.empty()) {
    std::fprintf(stderr, "%s", usage);
    return 2;
  }
  try {
    namespace fs = std::filesystem;
    if (dtype != "f32" && dtype != "f16" && dtype != "bf16") lora::detail::fail("--dtype ", dtype, ": expected f32, f16 or bf16");
    const bool to_gguf = ends_with(out, ".gguf");
    if (to_gguf && !fs::is_directory(in)) lora::detail::fail(in, ": expected a PEFT adapter directory (OUT ends in .gguf)");
    if (!to_gguf && !ends_with(in, ".gguf"))
      lora::detail::fail("one of IN and OUT must be a .gguf file (", in, " -> ", out, ")");
    if (base.empty() && to_gguf) {
      const lora::PeftConfig pc = lora::PeftConfig::read((fs::path(in) / "adapter_config.json").string());
      const auto b = pc.raw.find("base_model_name_or_path");
      if (b != pc.raw.end() && b->is_string() && fs::is_regular_file(fs::path(b->get<std::string>()) / "config.json"))
        base = b->get<std::string>();
    }
    lora::LmConfig config;
    if (!base.empty()) {
      config = lora::LmConfig::read(base);
    } else {
      config.model_type = to_gguf ? guess_model_type(in) : lora::Gguf::open(in).string("general.architecture");
      std::printf("convert_adapter: no base model config (--base): shapes unchecked, q_proj/k_proj refused\n");
    }
    if (to_gguf) {
      if (fs::path(out).has_parent_path()) fs::create_directories(fs::path(out).parent_path());
      const lora::GgmlType t = dtype == "f32" ? lora::GgmlType::f32 : dtype == "f16" ? lora::GgmlType::f16 : lora::GgmlType::bf16;
      lora::peft_to_gguf_adapter(in, out, config, t);
    } else {
      const lora::Dtype t = dtype == "f32" ? lora::Dtype::F32 : dtype == "f16" ? lora::Dtype::F16 : lora::Dtype::BF16;
      lora::gguf_to_peft_adapter(in, out, config, t, base);
    }
    std::printf("convert_adapter: %s -> %s (%s, %s): ok\n", in.c_str(), out.c_str(), config.model_type.c_str(), dtype.c_str());
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "convert_adapter: %s\n", e.what());
    return 1;
  }
  return 0;
}
