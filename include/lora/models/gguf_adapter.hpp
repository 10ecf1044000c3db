// A causal LM's LoRA adapter as a GGUF file that llama.cpp loads (`--lora FILE`): written from
// the model's LoRA layers (save_gguf_adapter) or from a PEFT adapter directory
// (peft_to_gguf_adapter), read back into the layers (load_gguf_adapter) or into a PEFT directory
// (gguf_to_peft_adapter). All four go through GgufLoras, the factors by module path.
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
// alpha_file / r by taking alpha_file = s·r (alpha, or alpha·√r) when every layer has the same
// s·r (a uniform adapter, rsLoRA included: its factors are written unchanged); otherwise
// alpha_file is the first layer's s·r and the others' B is multiplied by s·r / alpha_file.
// Refused, naming the module: DoRA, a trained bias (BiasMode::trainable), trained base tensors
// (modules_to_save), a layer without the adapter, modules llama.cpp has no tensor for (GPT-2's
// tied head, embeddings), other architectures, shapes that do not fit the base model's config.
// The config needs only model_type, and the head counts where q/k are adapted (their rows
// move); with hidden_size set, every module's shape is checked against it, as llama.cpp will.
#pragma once

#include <lora/gguf.hpp>
#include <lora/linear.hpp>
#include <lora/models/lm_config.hpp>
#include <lora/module_map.hpp>
#include <lora/peft.hpp>

#include <cmath>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// One module's LoRA pair as llama.cpp applies it: y += (alpha / r)·B·(A·x), r = A.rows().
template <class Scalar>
struct GgufLora {
  Mat<Scalar> A;  // (r, in), as PEFT stores lora_A
  Mat<Scalar> B;  // (out, r), in Hugging Face's row order
  double alpha = 0;
};
template <class Scalar>
using GgufLoras = std::map<std::string, GgufLora<Scalar>>;  // by module path

namespace detail {

// Module paths and llama.cpp's tensors: "<prefix>N.<part>" <-> "blk.N.<name>.weight", and the
// untied head.
struct GgufNaming {
  const char* prefix;
  std::vector<std::pair<const char*, const char*>> parts;
  const char* head;  // the head's module path, "" where llama.cpp has no adapter for it
};

inline const GgufNaming* gguf_naming(const std::string& arch) {
  static const GgufNaming llama{"model.layers.",
                                {{"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
                                 {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
                                 {"mlp.down_proj", "ffn_down"}},
                                "lm_head"};
  static const GgufNaming gpt2{"transformer.h.",
                               {{"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"}, {"mlp.c_fc", "ffn_up"}, {"mlp.c_proj", "ffn_down"}},
                               ""};
  return arch == "llama" ? &llama : arch == "gpt2" ? &gpt2 : nullptr;
}

// "<prefix>N.<rest>" -> {N, rest}; N decimal without leading zeros; {"", ""} otherwise.
inline std::pair<std::string, std::string> split_layer(const std::string& s, const std::string& prefix) {
  if (s.compare(0, prefix.size(), prefix) != 0) return {};
  std::size_t i = prefix.size();
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
  const std::size_t digits = i - prefix.size();
  if (digits == 0 || digits > 9 || i == s.size() || s[i] != '.' || (digits > 1 && s[prefix.size()] == '0')) return {};
  return {s.substr(prefix.size(), digits), s.substr(i + 1)};
}

// The llama.cpp tensor of a module path; empty when it has none.
inline std::string gguf_tensor_of(const std::string& arch, const std::string& module) {
  const GgufNaming* n = gguf_naming(arch);
  if (!n) return "";
  if (*n->head && module == n->head) return "output.weight";  // an untied head (a tied one is the embedding)
  const auto [layer, part] = split_layer(module, n->prefix);
  for (const auto& [hf, gg] : n->parts)
    if (!layer.empty() && part == hf) return "blk." + layer + "." + gg + ".weight";
  return "";
}

// The module path of a llama.cpp tensor; empty when none.
inline std::string module_of_gguf_tensor(const std::string& arch, const std::string& tensor) {
  const GgufNaming* n = gguf_naming(arch);
  if (!n) return "";
  if (*n->head && tensor == "output.weight") return n->head;
  const auto [layer, part] = split_layer(tensor, "blk.");
  for (const auto& [hf, gg] : n->parts)
    if (!layer.empty() && part == std::string(gg) + ".weight") return n->prefix + layer + "." + hf;
  return "";
}

// Every module path of the model config describes that llama.cpp can adapt.
inline std::vector<std::string> gguf_modules(const LmConfig& c) {
  std::vector<std::string> all;
  const GgufNaming* n = gguf_naming(c.model_type);
  if (!n) return all;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (const auto& [hf, gg] : n->parts) all.push_back(n->prefix + std::to_string(l) + "." + hf);
  if (*n->head && !c.tie_word_embeddings) all.push_back(n->head);
  return all;
}

// {in, out} of a module of the model config describes; {0, 0} when the config has no sizes or
// the model has no such layer (noted in problems).
inline std::pair<Index, Index> gguf_module_shape(const LmConfig& c, const std::string& module, std::vector<std::string>& problems) {
  if (c.hidden_size == 0) return {0, 0};
  const std::string& arch = c.model_type;
  const Index d = c.hidden_size, ff = c.intermediate_size, q = Index(c.num_attention_heads) * c.head_dim,
              kv = Index(c.num_key_value_heads) * c.head_dim;
  const std::string tensor = gguf_tensor_of(arch, module);
  if (tensor == "output.weight") return {d, c.vocab_size};
  const auto [layer, part] = split_layer(tensor, "blk.");
  if (std::stoll(layer) >= c.num_hidden_layers) {
    problems.push_back(cat(module, ": the model has ", c.num_hidden_layers, " layers (num_hidden_layers)"));
    return {0, 0};
  }
  if (arch == "gpt2") {
    if (part == "attn_qkv.weight") return {d, 3 * d};
    if (part == "attn_output.weight") return {d, d};
    return part == "ffn_up.weight" ? std::pair<Index, Index>{d, ff} : std::pair<Index, Index>{ff, d};
  }
  if (part == "attn_q.weight") return {d, q};
  if (part == "attn_k.weight" || part == "attn_v.weight") return {d, kv};
  if (part == "attn_output.weight") return {q, d};
  return part == "ffn_down.weight" ? std::pair<Index, Index>{ff, d} : std::pair<Index, Index>{d, ff};
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

// The head count whose rotary order B's rows take in llama.cpp (q/k of a Llama), 0 for none.
inline int gguf_rope_heads(const LmConfig& c, const std::string& tensor) {
  if (c.model_type != "llama") return 0;
  if (tensor.find(".attn_q.") != std::string::npos) return c.num_attention_heads ? c.num_attention_heads : -1;
  if (tensor.find(".attn_k.") != std::string::npos) return c.num_key_value_heads ? c.num_key_value_heads : -1;
  return 0;
}

// Why B's rows cannot be reordered for tensor ("" when they can, or need not be).
inline std::string gguf_rows_problem(const LmConfig& c, const std::string& tensor, Index rows) {
  const int heads = gguf_rope_heads(c, tensor);
  if (heads < 0)
    return tensor + ": its rows are reordered per head; that needs the base model's config.json (num_attention_heads, num_key_value_heads)";
  if (heads > 0 && rows % (2 * heads) != 0)
    return tensor + ": " + std::to_string(rows) + " rows do not split into " + std::to_string(heads) + " heads of even size";
  return "";
}

// B with its rows in llama.cpp's order (back: in Hugging Face's); gguf_rows_problem was empty.
template <class Scalar>
Mat<Scalar> gguf_rows(const LmConfig& c, const std::string& tensor, Mat<Scalar> B, bool back) {
  const int heads = gguf_rope_heads(c, tensor);
  return heads > 0 ? rope_rows(B, heads, back) : B;
}

inline void check_gguf_adapter_target(const LmConfig& config, GgmlType dtype, const char* who) {
  if (!gguf_naming(config.model_type)) fail(who, ": model_type '", config.model_type, "': only llama and gpt2 adapters are written");
  if (dtype != GgmlType::f32 && dtype != GgmlType::f16 && dtype != GgmlType::bf16) fail(who, ": dtype must be F32, F16 or BF16");
}

// Checks loras against config (names llama.cpp has, shapes, one r per pair) and writes them.
template <class Scalar>
void write_gguf_adapter(const std::string& path, const LmConfig& config, const GgufLoras<Scalar>& loras, GgmlType dtype,
                        const char* who) {
  const std::string& arch = config.model_type;
  check_gguf_adapter_target(config, dtype, who);
  if (loras.empty()) fail(who, ": ", path, ": no LoRA modules");
  std::vector<std::string> problems;
  for (const auto& [module, l] : loras) {
    const std::string tensor = gguf_tensor_of(arch, module);
    if (tensor.empty()) {
      problems.push_back(module + ": llama.cpp's " + arch + " has no tensor for it");
      continue;
    }
    const auto [in, out] = gguf_module_shape(config, module, problems);
    if (l.A.rows() == 0 || l.A.rows() != l.B.cols() || (in && (l.A.cols() != in || l.B.rows() != out)))
      problems.push_back(module + ": A " + std::to_string(l.A.rows()) + "x" + std::to_string(l.A.cols()) + " and B " +
                         std::to_string(l.B.rows()) + "x" + std::to_string(l.B.cols()) + " do not make a LoRA pair" +
                         (in ? " of a " + std::to_string(in) + " -> " + std::to_string(out) + " layer" : std::string()));
    const std::string rows = gguf_rows_problem(config, tensor, l.B.rows());
    if (!rows.empty()) problems.push_back(rows);
    if (!(l.alpha > 0) || !std::isfinite(l.alpha)) problems.push_back(module + ": alpha " + cat(l.alpha) + " is not > 0");
  }
  if (!problems.empty()) fail(who, ": ", path, ": ", join(problems));
  const double alpha = loras.begin()->second.alpha;
  GgufBuilder b;
  b.metadata("general.architecture", GgufValue::string(arch));
  b.metadata("general.type", GgufValue::string("adapter"));
  b.metadata("adapter.type", GgufValue::string("lora"));
  b.metadata("adapter.lora.alpha", GgufValue::f32(static_cast<float>(alpha)));
  for (const auto& [module, l] : loras) {
    const std::string tensor = gguf_tensor_of(arch, module);
    Mat<Scalar> B = l.alpha == alpha ? l.B : Mat<Scalar>(l.B * static_cast<Scalar>(l.alpha / alpha));
    b.add(tensor + ".lora_a", l.A, dtype);
    b.add(tensor + ".lora_b", gguf_rows(config, tensor, std::move(B), false), dtype);
  }
  b.save(path);
}

// A GGUF LoRA adapter of config.model_type as GgufLoras (F32, F16 or BF16 tensors; q/k's B rows
// back in Hugging Face's order); every tensor must pair up and fit config.
template <class Scalar>
GgufLoras<Scalar> read_gguf_adapter(const std::string& path, const LmConfig& config, const char* who) {
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
  if (!problems.empty()) fail(who, ": ", path, ": ", join(problems));
  const double alpha = g.floating("adapter.lora.alpha", GgufType::f32);
  if (!(alpha > 0) || !std::isfinite(alpha)) fail(who, ": ", path, ": adapter.lora.alpha is ", alpha, ", expected > 0");
  std::map<std::string, std::pair<const GgufTensorInfo*, const GgufTensorInfo*>> pairs;  // module -> (a, b)
  for (const auto& t : g.tensors()) {
    const bool is_a = t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".lora_a") == 0;
    const bool is_b = t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".lora_b") == 0;
    const std::string module = is_a || is_b ? module_of_gguf_tensor(arch, t.name.substr(0, t.name.size() - 7)) : "";
    if (module.empty()) {
      problems.push_back(t.name + " is not the lora_a/lora_b of a " + arch + " tensor llama.cpp adapts");
      continue;
    }
    (is_a ? pairs[module].first : pairs[module].second) = &t;
  }
  for (const auto& [module, ab] : pairs) {
    const auto [a, b] = ab;
    if (!a || !b) {
      problems.push_back(module + " has " + (a ? "lora_a" : "lora_b") + " but no " + (a ? "lora_b" : "lora_a"));
      continue;
    }
    for (const GgufTensorInfo* t : {a, b})
      if (t->type != 0 && t->type != 1 && t->type != 30) problems.push_back(t->name + " is not F32, F16 or BF16");
    const auto [in, out] = gguf_module_shape(config, module, problems);
    const std::string rows = gguf_rows_problem(config, b->name, Index(b->ne.size() == 2 ? b->ne[1] : 0));
    if (!rows.empty()) problems.push_back(rows);
    if (a->ne.size() != 2 || b->ne.size() != 2 || a->ne[1] != b->ne[0] || a->ne[1] == 0 ||
        (in && (a->ne[0] != std::uint64_t(in) || b->ne[1] != std::uint64_t(out))))
      problems.push_back(module + ": lora_a ne " + shape_string(a->ne) + ", lora_b ne " + shape_string(b->ne) + ", expected {" +
                         (in ? std::to_string(in) : std::string("in")) + ", r} and {r, " +
                         (in ? std::to_string(out) : std::string("out")) + "}");
  }
  if (!problems.empty()) fail(who, ": ", path, ": ", join(problems));
  GgufLoras<Scalar> loras;
  for (const auto& [module, ab] : pairs)
    loras[module] = {g.matrix<Scalar>(ab.first->name), gguf_rows(config, ab.second->name, g.matrix<Scalar>(ab.second->name), true), alpha};
  return loras;
}

}  // namespace detail

// Writes the adapter `adapter` (each layer's one active adapter when empty) of a model's LoRA
// layers to path, atomically. config is the model's (model_type, heads); dtype F32, F16 or BF16.
template <class Scalar>
void save_gguf_adapter(const std::string& path, const LmConfig& config, const ModuleMap<Scalar>& modules,
                       GgmlType dtype = GgmlType::f32, const std::string& adapter = "") {
  detail::check_gguf_adapter_target(config, dtype, "save_gguf_adapter");
  std::vector<std::string> problems;
  GgufLoras<Scalar> loras;
  for (const auto& [module, layer] : modules) {
    const std::string name = detail::adapter_to_save(*layer, module, adapter, problems);
    if (name.empty()) continue;
    const LoraConfig& lc = layer->config(name);
    if (lc.use_dora) problems.push_back(module + " is DoRA, which llama.cpp does not load");
    if (lc.bias == BiasMode::trainable) problems.push_back(module + " trains its bias, which a GGUF adapter cannot carry");
    loras[module] = {layer->lora_A(name), layer->lora_B(name), lc.use_rslora ? lc.alpha * std::sqrt(double(lc.r)) : lc.alpha};
  }
  if (!problems.empty()) detail::fail("save_gguf_adapter: ", path, ": ", detail::join(problems));
  detail::write_gguf_adapter(path, config, loras, dtype, "save_gguf_adapter");
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
  const GgufLoras<Scalar> loras = detail::read_gguf_adapter<Scalar>(path, config, "load_gguf_adapter");
  std::vector<std::string> problems;
  for (const auto& [module, l] : loras)
    if (!modules.contains(module)) problems.push_back(module + " is in the file but is not one of the model's LoRA layers");
  for (const auto& [module, layer] : modules) {
    const auto it = loras.find(module);
    if (it == loras.end()) {
      problems.push_back(module + " has no lora_a and lora_b pair in the file");
      continue;
    }
    if (it->second.A.cols() != layer->in_features() || it->second.B.rows() != layer->out_features())
      problems.push_back(module + ": the file's pair is " + std::to_string(it->second.A.cols()) + " -> " +
                         std::to_string(it->second.B.rows()) + ", the layer " + std::to_string(layer->in_features()) + " -> " +
                         std::to_string(layer->out_features()));
    if (layer->has_adapter(adapter_name) && layer->is_merged(adapter_name))
      problems.push_back(module + ": adapter '" + adapter_name + "' is merged; unmerge() before loading");
  }
  if (!problems.empty()) detail::fail("load_gguf_adapter: ", path, ": ", detail::join(problems));
  for (const auto& [module, layer] : modules) {
    const GgufLora<Scalar>& l = loras.at(module);
    LoraConfig c = layer->has_adapter(adapter_name) ? layer->config(adapter_name) : layer->config(layer->adapter_names().front());
    c.r = static_cast<int>(l.A.rows());
    c.alpha = l.alpha;
    c.use_rslora = false;
    c.use_dora = false;
    layer->update_layer(adapter_name, c);
    layer->set_lora_A(adapter_name, l.A);
    layer->set_lora_B(adapter_name, l.B);
  }
}

// A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) as a GGUF adapter
// file, without the base model's weights: config is the base model's (LmConfig::read), or one
// with only model_type set where no shapes are checked and q/k are not adapted. Each module's
// r, alpha and rsLoRA come from the PEFT config (rank_pattern, alpha_pattern). Refused: DoRA,
// modules_to_save, embedding adapters, modules not in target_modules. The base weight PEFT saves
// beside an adapted lm_head (base_layer.weight) is taken to be the base model's and not carried.
template <class Scalar = float>
void peft_to_gguf_adapter(const std::string& dir, const std::string& path, const LmConfig& config,
                          GgmlType dtype = GgmlType::f32) {
  namespace fs = std::filesystem;
  const char* who = "peft_to_gguf_adapter";
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string(),
                    st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  for (const auto& p : {cfg_path, st_path})
    if (!fs::is_regular_file(p)) detail::fail(who, ": ", p, " does not exist");
  detail::check_gguf_adapter_target(config, dtype, who);
  const PeftConfig pc = PeftConfig::read(cfg_path);
  const SafeTensors st = SafeTensors::open(st_path);
  std::vector<std::string> problems;
  if (pc.use_dora) problems.push_back("use_dora is true; llama.cpp does not load DoRA");
  if (!pc.modules_to_save.empty()) problems.push_back("modules_to_save is set; a GGUF adapter cannot carry trained base tensors");
  std::map<std::string, std::pair<const TensorInfo*, const TensorInfo*>> pairs;
  for (const auto& t : st.tensors()) {
    if (!detail::is_lora_key(t.name)) {
      problems.push_back(t.name + " is a trained base tensor, which a GGUF adapter cannot carry");
      continue;
    }
    const auto [module, kind] = detail::split_peft_key(t.name, st_path);
    if (kind == 'W') continue;  // PEFT's copy of an adapted head's base weight: the base model's own
    if (kind == 'M') {
      problems.push_back(t.name + " is DoRA's magnitude; llama.cpp does not load DoRA");
      continue;
    }
    (kind == 'A' ? pairs[module].first : pairs[module].second) = &t;
  }
  GgufLoras<Scalar> loras;
  for (const auto& [module, ab] : pairs) {
    const auto [a, b] = ab;
    if (!a || !b) {
      problems.push_back(module + " has " + (a ? "lora_A" : "lora_B") + " but no " + (a ? "lora_B" : "lora_A"));
      continue;
    }
    if (!pc.targets(module)) problems.push_back(module + " is not selected by target_modules");
    const int r = pc.rank_for(module);
    if (a->shape.size() != 2 || b->shape.size() != 2 || a->shape[0] != std::uint64_t(r) || b->shape[1] != std::uint64_t(r)) {
      problems.push_back(module + ": lora_A " + shape_string(a->shape) + " and lora_B " + shape_string(b->shape) +
                         " are not (r, in) and (out, r) with the config's r = " + std::to_string(r));
      continue;
    }
    const double alpha = pc.alpha_for(module);
    loras[module] = {st.matrix<Scalar>(a->name), st.matrix<Scalar>(b->name), pc.use_rslora ? alpha * std::sqrt(double(r)) : alpha};
  }
  if (!problems.empty()) detail::fail(who, ": ", dir, ": ", detail::join(problems));
  detail::write_gguf_adapter(path, config, loras, dtype, who);
}

// A GGUF LoRA adapter as a PEFT adapter directory (both files or neither) that
// PeftModel.from_pretrained loads: target_modules the module paths, r and lora_alpha the file's
// (rank_pattern for layers of another r), fan_in_fan_out for GPT-2, task_type CAUSAL_LM,
// base_model_name_or_path base_model (null when empty). config as for peft_to_gguf_adapter.
template <class Scalar = float>
void gguf_to_peft_adapter(const std::string& path, const std::string& dir, const LmConfig& config, Dtype dtype = Dtype::F32,
                          const std::string& base_model = "") {
  const char* who = "gguf_to_peft_adapter";
  if (!detail::is_float_dtype(dtype)) detail::fail(who, ": dtype ", dtype_name(dtype), " is not a float type");
  const GgufLoras<Scalar> loras = detail::read_gguf_adapter<Scalar>(path, config, who);
  if (loras.empty()) detail::fail(who, ": ", path, ": no LoRA tensors");
  std::vector<std::pair<std::string, LoraConfig>> configs;
  SafeTensorsBuilder b;
  for (const auto& [module, l] : loras) {
    LoraConfig lc;
    lc.r = static_cast<int>(l.A.rows());
    lc.alpha = l.alpha;
    lc.fan_in_fan_out = config.model_type == "gpt2";
    configs.emplace_back(module, lc);
    b.add(detail::kPeftPrefix + module + ".lora_A.weight", l.A, dtype);
    b.add(detail::kPeftPrefix + module + ".lora_B.weight", l.B, dtype);
  }
  PeftConfig pc = detail::peft_config_of(configs, who);
  // The modules' last names (q_proj), as PEFT's users target them, when those select exactly
  // these modules of the model config describes; the full paths otherwise.
  std::set<std::string> names, chosen, selected;
  const auto last = [](const std::string& m) { return m.substr(m.rfind('.') + 1); };
  for (const auto& [module, l] : loras) names.insert(last(module)), chosen.insert(module);
  for (const std::string& m : detail::gguf_modules(config))
    if (names.count(last(m))) selected.insert(m);
  if (selected == chosen) pc.target_modules.assign(names.begin(), names.end());
  pc.raw["task_type"] = "CAUSAL_LM";
  if (!base_model.empty()) pc.raw["base_model_name_or_path"] = base_model;
  detail::write_peft_dir(dir, b, pc, who);
}

}  // namespace lora
