// lm_check DIR: a Hugging Face causal LM folder checked against the logits transformers and PEFT
// computed for it. DIR holds config.json, model.safetensors, adapter/ and adapter_bf16/ (PEFT
// adapter directories) and io.safetensors with input_ids (batch, T), logits_base, logits_adapter
// and logits_adapter_bf16 (batch, T, vocab). Prints the relative error max|ours − theirs| /
// max|theirs| of the base, adapter, bf16 adapter and merged-adapter logits, and exits 1 when one
// is above 1e-4. Shapes come from the files.
#include <lora/models/gpt2.hpp>
#include <lora/models/llama.hpp>
#include <lora/peft.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>

namespace {

double relative_error(const lora::Mat<double>& got, const lora::Mat<double>& want) {
  if (got.rows() != want.rows() || got.cols() != want.cols())
    lora::detail::fail("logits are ", lora::detail::shape(got.rows(), got.cols()), ", the reference ",
                       lora::detail::shape(want.rows(), want.cols()));
  return (got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff();
}

// Model: LlamaModel<double> or Gpt2Model<double>.
template <class Model>
int check(const std::string& dir) {
  namespace fs = std::filesystem;
  const lora::SafeTensors io = lora::SafeTensors::open((fs::path(dir) / "io.safetensors").string());
  const lora::Mat<std::int64_t> ids = io.integers("input_ids");
  bool ok = true;
  auto report = [&](const char* what, double err) {
    std::printf("%-14s max relative error %.3e\n", what, err);
    ok = ok && err <= 1e-4;
  };
  report("base", relative_error(Model(dir).forward(ids), io.matrix<double>("logits_base")));
  for (const char* name : {"adapter", "adapter_bf16"}) {
    const std::string adapter = (fs::path(dir) / name).string();
    const lora::PeftConfig config = lora::PeftConfig::read(adapter + "/adapter_config.json");
    Model model(dir, &config);
    model.load_adapter(adapter);  // modules_to_save too
    const lora::Mat<double> want = io.matrix<double>(std::string("logits_") + name);
    report(name, relative_error(model.forward(ids), want));
    model.modules().merge();
    report((std::string(name) + " merged").c_str(), relative_error(model.forward(ids), want));
  }
  std::printf("%s\n", ok ? "ok (all <= 1e-4)" : "FAILED (above 1e-4)");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: lm_check DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const std::string type = lora::LmConfig::read(dir).model_type;
    if (type == "llama") return check<lora::LlamaModel<double>>(dir);
    if (type == "gpt2") return check<lora::Gpt2Model<double>>(dir);
    lora::detail::fail(dir, "/config.json: model_type \"", type, "\" is not supported (llama, gpt2)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lm_check: %s\n", e.what());
    return 1;
  }
}
