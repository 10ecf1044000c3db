// LmConfig: the fields of a Hugging Face config.json that a causal language model here uses,
// with transformers' defaults for absent ones and an error naming the field for a bad one.
//
//   llama: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
//          num_key_value_heads (= heads), head_dim (= hidden/heads), max_position_embeddings,
//          rms_norm_eps, attention_bias, mlp_bias, tie_word_embeddings, and the rotary embedding:
//          rope_parameters {rope_theta, rope_type "default" | "llama3", factor, low_freq_factor,
//          high_freq_factor, original_max_position_embeddings} (transformers 5), or the older
//          rope_theta + rope_scaling {rope_type or type, ...}.
//   gpt2:  vocab_size, n_embd, n_head, n_layer, n_positions (1024), n_inner (4·n_embd),
//          layer_norm_epsilon, tie_word_embeddings (true), activation_function "gelu_new".
#pragma once

#include <lora/detail/files.hpp>
#include <lora/detail/json.hpp>
#include <lora/error.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <string>

namespace lora {

struct LmConfig {
  std::string model_type;
  int vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0;
  int num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0, max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;  // Llama's rms_norm_eps; GPT-2's layer_norm_epsilon
  bool attention_bias = false, mlp_bias = false, tie_word_embeddings = false;
  double rope_theta = 10000;
  std::string rope_type = "default";
  double rope_factor = 1, low_freq_factor = 1, high_freq_factor = 4;
  int original_max_position_embeddings = 8192;
  std::string json;  // the text read, written back by save_pretrained

  static LmConfig read(const std::string& dir) {
    const std::string path = (std::filesystem::path(dir) / "config.json").string();
    return from_json(detail::read_text(path), path);
  }

  static LmConfig from_json(const std::string& text, const std::string& label) {
    nlohmann::json j;
    try {
      j = detail::parse_json<nlohmann::json>(text.data(), text.data() + text.size());
    } catch (const Error& e) {
      detail::fail(label, ": ", e.what());
    } catch (const nlohmann::json::exception& e) {
      detail::fail(label, ": not valid JSON: ", e.what());
    }
    if (!j.is_object()) detail::fail(label, ": expected a JSON object");
    LmConfig c;
    c.json = text;
    auto present = [&](const nlohmann::json& o, const char* f) { return o.contains(f) && !o[f].is_null(); };
    auto integer = [&](const char* f, int& out, bool required) {
      if (!present(j, f)) {
        if (required) detail::fail(label, ": ", f, " is missing");
        return;
      }
      if (!j[f].is_number_integer() || j[f].get<long long>() < 1 || j[f].get<long long>() > (1 << 30))
        detail::fail(label, ": ", f, " is ", j[f].dump(), ", expected an integer >= 1");
      out = j[f].get<int>();
    };
    auto number = [&](const nlohmann::json& o, const char* f, double& out) {
      if (!present(o, f)) return;
      if (!o[f].is_number() || !std::isfinite(o[f].get<double>()) || o[f].get<double>() <= 0)
        detail::fail(label, ": ", f, " is ", o[f].dump(), ", expected a number > 0");
      out = o[f].get<double>();
    };
    auto boolean = [&](const char* f, bool& out) {
      if (!present(j, f)) return;
      if (!j[f].is_boolean()) detail::fail(label, ": ", f, " is ", j[f].dump(), ", expected true or false");
      out = j[f].get<bool>();
    };
    if (!present(j, "model_type") || !j["model_type"].is_string()) detail::fail(label, ": model_type is missing");
    c.model_type = j["model_type"].get<std::string>();
    if (c.model_type == "gpt2") {
      c.tie_word_embeddings = true;
      c.max_position_embeddings = 1024;
      c.rms_norm_eps = 1e-5;  // GPT-2's layer_norm_epsilon
      integer("vocab_size", c.vocab_size, true);
      integer("n_embd", c.hidden_size, true);
      integer("n_head", c.num_attention_heads, true);
      integer("n_layer", c.num_hidden_layers, true);
      integer("n_positions", c.max_position_embeddings, false);
      c.intermediate_size = 4 * c.hidden_size;
      integer("n_inner", c.intermediate_size, false);
      number(j, "layer_norm_epsilon", c.rms_norm_eps);
      boolean("tie_word_embeddings", c.tie_word_embeddings);
      if (c.hidden_size % c.num_attention_heads != 0)
        detail::fail(label, ": n_embd ", c.hidden_size, " is not a multiple of n_head ", c.num_attention_heads);
      c.num_key_value_heads = c.num_attention_heads;
      c.head_dim = c.hidden_size / c.num_attention_heads;
      const std::string act = present(j, "activation_function") && j["activation_function"].is_string()
                                  ? j["activation_function"].get<std::string>() : "gelu_new";
      if (act != "gelu_new" && act != "gelu_pytorch_tanh")
        detail::fail(label, ": activation_function is \"", act, "\"; supported: \"gelu_new\" (tanh GELU)");
      bool scale_weights = true, by_layer = false;
      boolean("scale_attn_weights", scale_weights);
      boolean("scale_attn_by_inverse_layer_idx", by_layer);
      if (!scale_weights || by_layer)
        detail::fail(label, ": scale_attn_weights false or scale_attn_by_inverse_layer_idx true is not supported");
      return c;
    }
    if (c.model_type != "llama")
      detail::fail(label, ": model_type is \"", c.model_type, "\"; supported: \"llama\", \"gpt2\"");
    integer("vocab_size", c.vocab_size, true);
    integer("hidden_size", c.hidden_size, true);
    integer("intermediate_size", c.intermediate_size, true);
    integer("num_hidden_layers", c.num_hidden_layers, true);
    integer("num_attention_heads", c.num_attention_heads, true);
    c.num_key_value_heads = c.num_attention_heads;
    integer("num_key_value_heads", c.num_key_value_heads, false);
    c.head_dim = c.hidden_size / c.num_attention_heads;
    integer("head_dim", c.head_dim, false);
    integer("max_position_embeddings", c.max_position_embeddings, false);
    number(j, "rms_norm_eps", c.rms_norm_eps);
    boolean("attention_bias", c.attention_bias);
    boolean("mlp_bias", c.mlp_bias);
    boolean("tie_word_embeddings", c.tie_word_embeddings);
    if (c.num_attention_heads % c.num_key_value_heads != 0)
      detail::fail(label, ": num_attention_heads ", c.num_attention_heads, " is not a multiple of num_key_value_heads ", c.num_key_value_heads);
    if (c.head_dim % 2 != 0) detail::fail(label, ": head_dim is ", c.head_dim, ", expected an even number (rotary embedding)");

    number(j, "rope_theta", c.rope_theta);
    const char* rope_field = present(j, "rope_parameters") ? "rope_parameters" : present(j, "rope_scaling") ? "rope_scaling" : nullptr;
    if (rope_field) {
      const nlohmann::json& r = j[rope_field];
      if (!r.is_object()) detail::fail(label, ": ", rope_field, " is ", r.dump(), ", expected an object");
      number(r, "rope_theta", c.rope_theta);
      const char* type_field = present(r, "rope_type") ? "rope_type" : present(r, "type") ? "type" : nullptr;
      if (type_field) {
        if (!r[type_field].is_string()) detail::fail(label, ": ", rope_field, ".", type_field, " is ", r[type_field].dump());
        c.rope_type = r[type_field].get<std::string>();
      }
      if (c.rope_type != "default" && c.rope_type != "llama3")
        detail::fail(label, ": ", rope_field, " has rope_type \"", c.rope_type, "\"; supported: \"default\", \"llama3\"");
      if (c.rope_type == "llama3") {
        for (const char* f : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
          if (!present(r, f)) detail::fail(label, ": ", rope_field, " of rope_type \"llama3\" lacks ", f);
        number(r, "factor", c.rope_factor);
        number(r, "low_freq_factor", c.low_freq_factor);
        number(r, "high_freq_factor", c.high_freq_factor);
        double original = 0;
        number(r, "original_max_position_embeddings", original);
        c.original_max_position_embeddings = static_cast<int>(original);
        if (c.high_freq_factor == c.low_freq_factor)
          detail::fail(label, ": ", rope_field, ": high_freq_factor equals low_freq_factor");
      }
    }
    return c;
  }

  // The rotary embedding's inverse frequencies (head_dim / 2): θ^(−2i/dh), rescaled for rope_type
  // "llama3" (long wavelengths divided by factor, a smooth blend between low_freq_factor and
  // high_freq_factor). With as_float (a float model) rounded to float where transformers computes
  // in float32; otherwise exact in double (a double model's rotary tables are double throughout).
  Vec<double> rope_inv_freq(bool as_float = true) const {
    const int half = head_dim / 2;
    const auto round = [as_float](double x) { return as_float ? double(float(x)) : x; };
    Vec<double> f(half);
    for (int i = 0; i < half; ++i)
      f[i] = as_float ? double(1.0f / std::pow(float(rope_theta), float(2 * i) / float(head_dim)))
                      : 1.0 / std::pow(rope_theta, double(2 * i) / double(head_dim));
    if (rope_type == "llama3") {
      const double pi = 3.14159265358979323846;
      const double low_wavelen = original_max_position_embeddings / low_freq_factor;
      const double high_wavelen = original_max_position_embeddings / high_freq_factor;
      for (int i = 0; i < half; ++i) {
        const double wavelen = 2 * pi / f[i];
        const double scaled = wavelen > low_wavelen ? f[i] / rope_factor : f[i];
        const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        if (medium) {
          const double smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
          f[i] = round((1 - smooth) * scaled / rope_factor + smooth * scaled);
        } else {
          f[i] = round(scaled);
        }
      }
    }
    return f;
  }
};

}  // namespace lora
