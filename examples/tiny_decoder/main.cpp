// tiny_decoder DIR [--save-adapter OUT --dtype f32|bf16|f16|f64]
//
// Rebuilds the fixtures' two-block decoder in C++ from DIR/config.json and
// DIR/base_model.safetensors, loads the PEFT adapter DIR/adapter, runs DIR/io.safetensors' x
// through it and prints the max errors against PEFT's y (adapter on), y_base (adapter disabled)
// and y again after merging. Shapes come from the files, r and alpha (with rank_pattern and
// alpha_pattern) from adapter_config.json. Exits 1 when an error in double is over 1e-10 (or in
// float over 1e-5 of the largest |y|).
//
//   block:  x += o_proj(softmax(q·kᵀ/√dh + causal)·v)      x += down_proj(gelu(up_proj(x)))
#include <lora/lora.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

template <class Scalar>
struct Block {
  std::unique_ptr<lora::LoraAttention<Scalar>> attn;
  std::unique_ptr<lora::LoraLinear<Scalar>> up, down;
};

template <class Scalar>
class TinyDecoder {
 public:
  using Mat = lora::Mat<Scalar>;

  TinyDecoder(const std::string& dir, const lora::PeftConfig& peft) : base_(lora::SafeTensors::open(dir + "/base_model.safetensors")) {
    const auto cfg = nlohmann::json::parse(lora::detail::read_text(dir + "/config.json"));
    const int layers = cfg.at("n_layers").get<int>(), heads = cfg.at("n_heads").get<int>();
    for (int i = 0; i < layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      Block<Scalar> b;
      lora::AttentionWeights<Scalar> w;
      w.q_proj = base_.matrix<Scalar>(p + "self_attn.q_proj.weight");
      w.k_proj = base_.matrix<Scalar>(p + "self_attn.k_proj.weight");
      w.v_proj = base_.matrix<Scalar>(p + "self_attn.v_proj.weight");
      w.o_proj = base_.matrix<Scalar>(p + "self_attn.o_proj.weight");
      w.q_bias = base_.vector<Scalar>(p + "self_attn.q_proj.bias");
      w.k_bias = base_.vector<Scalar>(p + "self_attn.k_proj.bias");
      w.v_bias = base_.vector<Scalar>(p + "self_attn.v_proj.bias");
      w.o_bias = base_.vector<Scalar>(p + "self_attn.o_proj.bias");
      lora::AttentionConfig ac;
      ac.heads = heads;
      ac.target_modules.clear();
      for (const char* name : lora::LoraAttention<Scalar>::kNames)
        if (peft.targets(p + "self_attn." + name)) ac.target_modules.push_back(name);
      b.attn = std::make_unique<lora::LoraAttention<Scalar>>(std::move(w), ac);
      for (const auto& [name, layer] : b.attn->modules()) modules_.add(p + "self_attn." + name, *layer);
      b.up = linear(p + "mlp.up_proj", peft);
      b.down = linear(p + "mlp.down_proj", peft);
      blocks_.push_back(std::move(b));
    }
  }

  const lora::ModuleMap<Scalar>& modules() const { return modules_; }

  // x (batch·T, d) -> (batch·T, d)
  Mat forward(Mat x, lora::Index batch) const {
    lora::AttentionMask<Scalar> causal;
    causal.causal = true;
    for (const auto& b : blocks_) {
      x += b.attn->forward(x, batch, causal);
      x += b.down->forward(lora::gelu<Scalar>(b.up->forward(x)));
    }
    return x;
  }

  // PEFT's disable_adapter(): every LoRA layer computes its base alone.
  void enable_adapters(bool on) { modules_.enable_adapters(on); }
  void merge() { modules_.merge(); }
  void unmerge() { modules_.unmerge(); }

 private:
  // The MLP's linears borrow their weights from the mapped file when the dtype matches; an
  // untargeted one is a LoRA layer with its adapter disabled, i.e. the plain base linear.
  std::unique_ptr<lora::LoraLinear<Scalar>> linear(const std::string& path, const lora::PeftConfig& peft) {
    std::unique_ptr<lora::LoraLinear<Scalar>> l;
    lora::Vec<Scalar> bias = base_.vector<Scalar>(path + ".bias");
    if (base_.can_map<Scalar>(path + ".weight"))
      l = std::make_unique<lora::LoraLinear<Scalar>>(base_.map<Scalar>(path + ".weight"), bias, lora::LoraConfig{});
    else
      l = std::make_unique<lora::LoraLinear<Scalar>>(base_.matrix<Scalar>(path + ".weight"), bias, lora::LoraConfig{});
    if (peft.targets(path))
      modules_.add(path, *l);
    else
      l->enable_adapters(false);
    return l;
  }

  lora::SafeTensors base_;
  std::vector<Block<Scalar>> blocks_;
  lora::ModuleMap<Scalar> modules_;
};

double max_abs(const lora::Mat<double>& a, const lora::Mat<double>& b) { return (a - b).cwiseAbs().maxCoeff(); }

// Runs the checks in Scalar; returns false when one is over tolerance.
template <class Scalar>
bool check(const std::string& dir, const char* name, double tolerance, bool relative) {
  const lora::PeftConfig peft = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  TinyDecoder<Scalar> model(dir, peft);
  lora::load_adapter(dir + "/adapter", model.modules());
  const auto io = lora::SafeTensors::open(dir + "/io.safetensors");
  const lora::Index batch = static_cast<lora::Index>(io.info("x").shape.at(0));
  const lora::Mat<Scalar> x = io.matrix<Scalar>("x");
  const lora::Mat<double> y = io.matrix<double>("y"), y_base = io.matrix<double>("y_base");
  const double scale = relative ? y.cwiseAbs().maxCoeff() : 1.0;

  bool ok = true;
  auto report = [&](const char* what, const lora::Mat<Scalar>& got, const lora::Mat<double>& want) {
    const double err = max_abs(got.template cast<double>(), want) / scale;
    const bool pass = err <= tolerance;
    ok &= pass;
    std::printf("tiny_decoder %-6s %-28s max %s error %.3e (tolerance %.0e) %s\n", name, what,
                relative ? "relative" : "absolute", err, tolerance, pass ? "ok" : "FAIL");
  };
  report("y (adapter on)", model.forward(x, batch), y);
  model.enable_adapters(false);
  report("y_base (adapter disabled)", model.forward(x, batch), y_base);
  model.enable_adapters(true);
  model.merge();
  report("y (adapter merged)", model.forward(x, batch), y);
  model.unmerge();
  report("y (unmerged again)", model.forward(x, batch), y);
  return ok;
}

lora::Dtype parse_dtype(const std::string& s) {
  if (s == "f32") return lora::Dtype::F32;
  if (s == "bf16") return lora::Dtype::BF16;
  if (s == "f16") return lora::Dtype::F16;
  if (s == "f64") return lora::Dtype::F64;
  throw lora::Error("tiny_decoder: --dtype is '" + s + "', expected f32, bf16, f16 or f64");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: tiny_decoder DIR [--save-adapter OUT --dtype f32|bf16|f16|f64]\n");
    return 2;
  }
  try {
    const std::string dir = argv[1];
    std::string save_dir;
    lora::Dtype dtype = lora::Dtype::F32;
    for (int i = 2; i + 1 < argc; i += 2) {
      if (!std::strcmp(argv[i], "--save-adapter"))
        save_dir = argv[i + 1];
      else if (!std::strcmp(argv[i], "--dtype"))
        dtype = parse_dtype(argv[i + 1]);
      else
        throw lora::Error(std::string("tiny_decoder: unknown option ") + argv[i]);
    }
    const bool ok_double = check<double>(dir, "double", 1e-10, false);
    const bool ok_float = check<float>(dir, "float", 1e-5, true);
    if (!save_dir.empty()) {
      const lora::PeftConfig peft = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
      TinyDecoder<double> model(dir, peft);
      lora::load_adapter(dir + "/adapter", model.modules());
      lora::save_adapter(save_dir, model.modules(), peft, dtype);
      std::printf("tiny_decoder: adapter saved to %s as %s\n", save_dir.c_str(), lora::dtype_name(dtype));
    }
    std::printf("tiny_decoder: %s\n", ok_double && ok_float ? "ok" : "FAILED");
    return ok_double && ok_float ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tiny_decoder: %s\n", e.what());
    return 2;
  }
}
