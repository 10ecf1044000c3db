// A causal LM's LoRA adapter as a GGUF file that llama.cpp loads (`--lora FILE`), written from
// the model's LoRA layers (save_gguf_adapter), and read back into them (load_gguf_adapter).
//
//   general.type = "adapter", general.architecture = "llama" | "gpt2", adapter.type = "lora",
//   adapter.lora.alpha (f32)
//   <base tensor>.lora_a   ne = {in, r}    A (r, in) as PEFT stores it
//   <base tensor>.lora_b   ne = {r, out}   B (out, r)
//
// llama.cpp adds scale·(alpha / r)·B·(A·x) to each adapted product, r = lora_a's ne[1] (scale is
// its --lora-scaled factor, 1 for --lora). Base tensor names, as convert_hf_to_gguf.py gives them:
//   Llama  model.layers.N.self_attn.{q,k,v,o}_proj   blk.N.attn_{q,k,v,output}.weight
//          model.layers.N.mlp.{gate,up,down}_proj    blk.N.ffn_{gate,up,down}.weight
//          lm_head (untied)                           output.weight
//   GPT-2  transformer.h.N.attn.c_attn / c_proj      blk.N.attn_qkv.weight / attn_output.weight
//          transformer.h.N.mlp.c_fc / c_proj         blk.N.ffn_up.weight / ffn_down.weight
// GPT-2's Conv1D weights are stored (in, out) and llama.cpp's transposed, (out, in) as PEFT's A
// and B already see them: the factors go in as they are. llama.cpp's Llama holds q_proj's and
// k_proj's rows reordered for its rotary embedding (convert_hf_to_gguf.py's permute: within
// each head, row s·dh/2 + j moves to 2j + s); B·A's rows are B's, so lora_b's rows move the same
// way and lora_a stays.
//
// One alpha serves the file: each layer's scale s (alpha/r, or alpha/√r with rsLoRA) becomes
// alpha_file / r by taking alpha_file = s·r when every layer has the same s·r (a uniform adapter,
// rsLoRA included: its factors are written unchanged); otherwise alpha_file is the first layer's
// s·r and the others' B is multiplied by s·r / alpha_file. Refused, naming the module: DoRA,
// a trained bias (BiasMode::trainable), a layer without the adapter, modules llama.cpp has no
// tensor for (GPT-2's tied head), other architectures.
#pragma once

#include <lora/gguf.hpp>
#include <lora/linear.hpp>
#include <lora/models/lm_config.hpp>
#include <lora/module_map.hpp>
#include <lora/peft.hpp>

#include <cmath>
#include <map>
#include <initializer_list>
#include <utility>
#include <string>
#include <vector>

namespace lora {

namespace detail {

// The llama.cpp tensor of a module path; empty when it has none.
inline std::string gguf_tensor_of(const std::string& arch, const std::string& module) {
  // prefix + layer number + "." + part -> "blk.N." + the part's llama.cpp name
  const auto layer = [&](const std::string& prefix, std::initializer_list<std::pair<const char*, const char*>> parts) {
    if (module.compare(0, prefix.size(), prefix) != 0) return std::string();
    std::size_t i = prefix.size();
    const std::size_t digits = i;
    while (i < module.size() && module[i] >= '0' && module[i] <= '9') ++i;
    if (i == digits || i - digits > 9 || i == module.size() || module[i] != '.') return std::string();
    const std::string n = module.substr(digits, i - digits), part = module.substr(i + 1);
    if (n.size() > 1 && n[0] == '0') return std::string();
    for (const auto& [hf, gg] : parts)
      if (part == hf) return "blk." + n + "." + gg + ".weight";
    return std::string();
  };
  if (arch == "llama") {
    if (module == "lm_head") return "output.weight";  // an untied head (a tied one is the embedding)
    return layer("model.layers.", {{"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
                                   {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
                                   {"mlp.down_proj", "ffn_down"}});
  }
  if (arch == "gpt2")
    return layer("transformer.h.", {{"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"}, {"mlp.c_fc", "ffn_up"},
                                    {"mlp.c_proj", "ffn_down"}});
  return "";
}

// convert_hf_to_gguf.py's rotary reordering of a q/k projection's rows: per head of dh rows, row
// s·dh/2 + j goes to 2j + s (back: the other way).
template <class Scalar>
Mat<Scalar> rope_rows(const Mat<Scalar>& m, Index heads, bool back = false) {
  const Index dh = m.rows() / heads, half = dh / 2;
  Mat<Scalar> out(m.rows(), m.cols());
  for (Index h = 0; h < heads; ++h)
    for (Index s = 0; s < 2; ++s)
      for (Index j = 0; j < half; ++j) {
        const Index hf = h * dh + s * half + j, gg = h * dh + 2 * j + s;
        out.row(back ? hf : gg) = m.row(back ? gg : hf);
      }
  return out;
}

}  // namespace detail

// Writes the adapter `adapter` (each layer's one active adapter when empty) of a model's LoRA
// layers to path, atomically. config is the model's (model_type, heads); dtype F32, F16 or BF16.
template <class Scalar>
void save_gguf_adapter(const std::string& path, const LmConfig& config, const ModuleMap<Scalar>& modules,
                       GgmlType dtype = GgmlType::f32, const std::string& adapter = "") {
  const std::string& arch = config.model_type;
  const char* where = "save_gguf_adapter: ";
  if (arch != "llama" && arch != "gpt2") detail::fail(where, "model_type '", arch, "': only llama and gpt2 adapters are written");
  if (dtype != GgmlType::f32 && dtype != GgmlType::f16 && dtype != GgmlType::bf16)
    detail::fail(where, "dtype must be F32, F16 or BF16");
  if (modules.size() == 0) detail::fail(where, "the model has no LoRA layers");
  struct Pair {
    std::string tensor;
    const LoraLinear<Scalar>* layer;
    std::string name;
    double sr;  // s·r: what alpha_file must be for llama.cpp's alpha_file / r to give s
  };
  std::vector<Pair> pairs;
  std::vector<std::string> problems;
  for (const auto& [module, layer] : modules) {
    const std::string name = detail::adapter_to_save(*layer, module, adapter, problems);
    if (name.empty()) continue;
    const LoraConfig& lc = layer->config(name);
    const std::string tensor = detail::gguf_tensor_of(arch, module);
    if (tensor.empty()) problems.push_back(module + ": llama.cpp's " + arch + " has no tensor for it");
    if (lc.use_dora) problems.push_back(module + " is DoRA, which llama.cpp does not load");
    if (lc.bias == BiasMode::trainable) problems.push_back(module + " trains its bias, which a GGUF adapter cannot carry");
    pairs.push_back({tensor, layer, name, lc.scaling() * lc.r});
  }
  if (!problems.empty()) detail::fail(where, path, ": ", detail::join(problems));
  const double alpha = pairs.front().sr;
  GgufBuilder b;
  b.metadata("general.architecture", GgufValue::string(arch));
  b.metadata("general.type", GgufValue::string("adapter"));
  b.metadata("adapter.type", GgufValue::string("lora"));
  b.metadata("adapter.lora.alpha", GgufValue::f32(static_cast<float>(alpha)));
  for (const Pair& p : pairs) {
    Mat<Scalar> B = p.layer->lora_B(p.name);
    if (p.sr != alpha) B *= static_cast<Scalar>(p.sr / alpha);
    if (arch == "llama" && p.tensor.find(".attn_q.") != std::string::npos) B = detail::rope_rows(B, config.num_attention_heads);
    if (arch == "llama" && p.tensor.find(".attn_k.") != std::string::npos) B = detail::rope_rows(B, config.num_key_value_heads);
    b.add(p.tensor + ".lora_a", p.layer->lora_A(p.name), dtype);
    b.add(p.tensor + ".lora_b", B, dtype);
  }
  b.save(path);
}

// Reads a GGUF LoRA adapter (llama.cpp's, or one save_gguf_adapter wrote) into the model's LoRA
// layers as adapter `adapter_name`: each layer gets update_layer(r from lora_a, alpha from
// adapter.lora.alpha, no rsLoRA: llama.cpp's scale alpha / r) and the file's A and B (F32, F16,
// BF16; q/k's lora_b rows back in Hugging Face's order). Strict: the file must be a LoRA adapter
// of config.model_type, every pair must belong to a LoRA layer of the model, every layer must have
// its pair, shapes must fit; everything is checked before any layer changes.
template <class Scalar>
void load_gguf_adapter(const std::string& path, const LmConfig& config, const ModuleMap<Scalar>& modules,
                       const std::string& adapter_name = "default") {
  const Gguf g = Gguf::open(path);
  const std::string& arch = config.model_type;
  std::vector<std::string> problems;
  const auto key = [&](const char* k, const std::string& want) {
    if (!g.has(k)) return problems.push_back(std::string(k) + " is missing");
    const GgufValue& v = g.value(k);
    if (v.array || v.type != GgufType::string || v.strings[0] != want)
      problems.push_back(std::string(k) + " is not \"" + want + "\"");
  };
  key("general.type", "adapter");
  key("adapter.type", "lora");
  key("general.architecture", arch);
  if (!g.has("adapter.lora.alpha")) problems.push_back("adapter.lora.alpha is missing");
  if (!problems.empty()) detail::fail("load_gguf_adapter: ", path, ": ", detail::join(problems));
  const double alpha = g.floating("adapter.lora.alpha", GgufType::f32);
  std::map<std::string, std::string> module_of;  // llama.cpp tensor -> module path
  for (const auto& [module, layer] : modules) module_of[detail::gguf_tensor_of(arch, module)] = module;
  struct Pair {
    const GgufTensorInfo* a = nullptr;
    const GgufTensorInfo* b = nullptr;
  };
  std::map<std::string, Pair> pairs;  // by module
  for (const auto& t : g.tensors()) {
    const bool is_a = t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".lora_a") == 0;
    const bool is_b = t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".lora_b") == 0;
    const std::string base = t.name.substr(0, t.name.size() - 7);
    if ((!is_a && !is_b) || !module_of.count(base)) {
      problems.push_back(t.name + " is not a lora_a/lora_b of one of the model's LoRA layers");
      continue;
    }
    (is_a ? pairs[module_of[base]].a : pairs[module_of[base]].b) = &t;
  }
  for (const auto& [module, layer] : modules) {
    const auto it = pairs.find(module);
    if (it == pairs.end() || !it->second.a || !it->second.b) {
      problems.push_back(module + " has no lora_a and lora_b pair in the file");
      continue;
    }
    const GgufTensorInfo &a = *it->second.a, &b = *it->second.b;
    for (const GgufTensorInfo* t : {&a, &b})
      if (t->type != 0 && t->type != 1 && t->type != 30) problems.push_back(t->name + " is not F32, F16 or BF16");
    const std::uint64_t in = std::uint64_t(layer->in_features()), out = std::uint64_t(layer->out_features());
    if (a.ne.size() != 2 || b.ne.size() != 2 || a.ne[0] != in || b.ne[1] != out || a.ne[1] != b.ne[0] || a.ne[1] == 0)
      problems.push_back(module + ": lora_a ne " + shape_string(a.ne) + ", lora_b ne " + shape_string(b.ne) +
                         ", expected {" + std::to_string(in) + ", r} and {r, " + std::to_string(out) + "}");
    if (layer->has_adapter(adapter_name) && layer->is_merged(adapter_name))
      problems.push_back(module + ": adapter '" + adapter_name + "' is merged; unmerge() before loading");
  }
  if (!problems.empty()) detail::fail("load_gguf_adapter: ", path, ": ", detail::join(problems));
  struct Values {
    Mat<Scalar> a, b;
  };
  std::map<std::string, Values> values;
  for (const auto& [module, pair] : pairs) {
    Mat<Scalar> b = g.matrix<Scalar>(pair.b->name);
    const std::string& t = pair.b->name;
    if (arch == "llama" && t.find(".attn_q.") != std::string::npos) b = detail::rope_rows(b, config.num_attention_heads, true);
    if (arch == "llama" && t.find(".attn_k.") != std::string::npos) b = detail::rope_rows(b, config.num_key_value_heads, true);
    values[module] = {g.matrix<Scalar>(pair.a->name), std::move(b)};
  }
  for (const auto& [module, layer] : modules) {
    const Values& v = values[module];
    LoraConfig c = layer->has_adapter(adapter_name) ? layer->config(adapter_name) : layer->config(layer->adapter_names().front());
    c.r = static_cast<int>(v.a.rows());
    c.alpha = alpha;
    c.use_rslora = false;
    c.use_dora = false;
    layer->update_layer(adapter_name, c);
    layer->set_lora_A(adapter_name, v.a);
    layer->set_lora_B(adapter_name, v.b);
  }
}

}  // namespace lora
