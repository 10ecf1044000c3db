#include "svd_once.hpp"  // first: the SVDs are instantiated once, in svd_once.cpp

#include "fixture_cases.hpp"

#include <lora/attention.hpp>
#include <lora/combine.hpp>
#include <lora/embedding.hpp>
#include <lora/linear.hpp>
#include <lora/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>
#include <utility>

namespace fixture {

namespace {

template <class Scalar>
struct Checker {
  const lora::SafeTensors& st;
  Report& report;
  const char* name = std::is_same_v<Scalar, double> ? "double" : "float";

  lora::Mat<Scalar> get(const std::string& t) const { return st.matrix<Scalar>(t); }

  template <class Got>
  void compare(const std::string& what, const Got& got, const std::string& expected_name) const {
    compare(what, got, st.matrix<double>(expected_name));
  }

  template <class Got>
  void compare(const std::string& what, const Got& got, const lora::Mat<double>& expected, double double_tol = 1e-10) const {
    double err;
    if (got.rows() != expected.rows() || got.cols() != expected.cols()) {
      err = INFINITY;
    } else {
      err = (got.template cast<double>() - expected).cwiseAbs().maxCoeff();
      if (std::is_same_v<Scalar, float>) err /= std::max(expected.cwiseAbs().maxCoeff(), 1e-30);
    }
    if (std::isnan(err)) err = INFINITY;
    report.comparisons.push_back({name, what, err, std::is_same_v<Scalar, double> ? double_tol : 1e-5});
  }

  // kinds "linear" and "linear_fan_in_fan_out"
  void linear(const nlohmann::json& c) const {
    const bool fan = c["kind"] == "linear_fan_in_fan_out";
    const std::string wname = fan ? "weight_in_out" : "weight";
    lora::LoraConfig cfg;
    cfg.r = c["r"].get<int>();
    cfg.alpha = c["alpha"].get<double>();
    cfg.use_rslora = c.value("use_rslora", false);
    cfg.fan_in_fan_out = fan;
    cfg.use_dora = c.value("use_dora", false);
    std::optional<lora::Vec<Scalar>> bias;
    if (st.contains("bias")) bias = st.vector<Scalar>("bias");
    lora::LoraLinear<Scalar> layer(get(wname), bias, cfg);
    layer.set_lora_A(get("lora_A"));
    layer.set_lora_B(get("lora_B"));
    if (cfg.use_dora) layer.set_lora_magnitude(st.vector<Scalar>("lora_magnitude"));
    report.comparisons.push_back({name, "scaling", std::abs(double(layer.scaling()) - c["scaling"].get<double>()),
                                  std::is_same_v<Scalar, double> ? 1e-12 : 1e-6});

    const lora::Mat<Scalar> x = get("x");
    compare("y (eval forward)", layer.forward(x), "y");
    compare("y (train forward)", layer.forward_train(x), "y");
    compare("grad_x", layer.backward(get("dy")), "grad_x");
    compare("grad_lora_A", layer.grad_A(), "grad_lora_A");
    compare("grad_lora_B", layer.grad_B(), "grad_lora_B");
    if (cfg.use_dora) compare("grad_lora_magnitude", lora::Mat<Scalar>(layer.grad_magnitude().transpose()), "grad_lora_magnitude");
    const std::string merged_name = fan ? "weight_in_out_merged" : "weight_merged";
    layer.safe_merge();
    compare(merged_name, layer.weight(), merged_name);
    // The merged forward must give y_merged where recorded, and the unmerged y in any case.
    compare("y (merged forward)", layer.forward(x), st.contains("y_merged") ? "y_merged" : "y");
    layer.unmerge();
    compare(fan ? "weight_in_out (unmerged)" : "weight_unmerged", layer.weight(), fan ? wname : "weight_unmerged");
  }

  // kind "embedding": nn.Embedding with lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
  void embedding(const nlohmann::json& c) const {
    lora::LoraConfig cfg;
    cfg.r = c["r"].get<int>();
    cfg.alpha = c["alpha"].get<double>();
    cfg.use_rslora = c.value("use_rslora", false);
    lora::LoraEmbedding<Scalar> layer(get("weight"), cfg);
    layer.set_lora_A(get("lora_embedding_A"));
    layer.set_lora_B(get("lora_embedding_B"));
    report.comparisons.push_back({name, "scaling", std::abs(double(layer.scaling()) - c["scaling"].get<double>()),
                                  std::is_same_v<Scalar, double> ? 1e-12 : 1e-6});
    const lora::Mat<std::int64_t> id_mat = st.integers("ids");
    const std::vector<std::int64_t> ids(id_mat.data(), id_mat.data() + id_mat.size());
    compare("y (eval forward)", layer.forward(ids), "y");
    compare("y (train forward)", layer.forward_train(ids), "y");
    layer.backward(get("dy"));
    compare("grad_lora_embedding_A", layer.grad_A(), "grad_lora_embedding_A");
    compare("grad_lora_embedding_B", layer.grad_B(), "grad_lora_embedding_B");
    layer.merge();
    compare("y (merged forward)", layer.forward(ids), "y");
    layer.unmerge();
    compare("weight (unmerged)", layer.weight(), "weight");
  }

  // kind "multi_adapter": one base, named adapters (r, alpha, rsLoRA each from the metadata), a
  // mixed batch with one adapter name per row, and PEFT's add_weighted_adapter of two of them.
  void multi_adapter(const nlohmann::json& c) const {
    std::optional<lora::Vec<Scalar>> bias;
    if (st.contains("bias")) bias = st.vector<Scalar>("bias");
    std::unique_ptr<lora::LoraLinear<Scalar>> layer;
    for (const auto& [n, a] : c["adapters"].items()) {
      lora::LoraConfig cfg;
      cfg.r = a["r"].template get<int>();
      cfg.alpha = a["alpha"].template get<double>();
      cfg.use_rslora = a.value("use_rslora", false);
      if (!layer)
        layer = std::make_unique<lora::LoraLinear<Scalar>>(get("weight"), bias, cfg, n);
      else
        layer->add_adapter(n, cfg);
      layer->set_lora_A(n, get(n + ".lora_A"));
      layer->set_lora_B(n, get(n + ".lora_B"));
      report.comparisons.push_back({name, "scaling " + n, std::abs(double(layer->scaling(n)) - c["scalings"][n].template get<double>()),
                                    std::is_same_v<Scalar, double> ? 1e-12 : 1e-6});
    }
    const auto rows = c["adapter_names_per_row"].get<std::vector<std::string>>();
    compare("y_mixed", layer->forward(get("x"), rows), "y_mixed");
    const auto& w = c["weighted"];
    const auto names = w["adapters"].get<std::vector<std::string>>();
    const auto weights = w["weights"].get<std::vector<double>>();
    for (auto [key, type] : {std::pair{"w_cat", lora::Combination::cat}, std::pair{"w_linear", lora::Combination::linear},
                             std::pair{"w_svd", lora::Combination::svd}}) {
      const bool svd = type == lora::Combination::svd;
      lora::add_weighted_adapter(*layer, names, weights, key, type, svd ? w["svd_rank"].get<int>() : 0);
      report.comparisons.push_back({name, std::string("scaling ") + key,
                                    std::abs(double(layer->scaling(key)) - c["scalings"][key].template get<double>()),
                                    std::is_same_v<Scalar, double> ? 1e-12 : 1e-6});
      // svd: singular vectors' signs are free, so the delta weights are compared (double 1e-8).
      compare(std::string(key) + ".delta", layer->delta_weight(key), st.matrix<double>(std::string(key) + ".delta"), svd ? 1e-8 : 1e-10);
    }
  }

  // kind "attention": self or cross, causal and/or key padding, LoRA on any of q, k, v, o
  void attention(const nlohmann::json& c) const {
    lora::AttentionWeights<Scalar> w;
    w.q_proj = get("q_proj.weight");
    w.k_proj = get("k_proj.weight");
    w.v_proj = get("v_proj.weight");
    w.o_proj = get("o_proj.weight");
    w.q_bias = st.vector<Scalar>("q_proj.bias");
    w.k_bias = st.vector<Scalar>("k_proj.bias");
    w.v_bias = st.vector<Scalar>("v_proj.bias");
    w.o_bias = st.vector<Scalar>("o_proj.bias");
    lora::AttentionConfig cfg;
    cfg.heads = c["heads"].get<int>();
    cfg.lora.r = c["r"].get<int>();
    cfg.lora.alpha = c["alpha"].get<double>();
    cfg.target_modules = c["targets"].get<std::vector<std::string>>();
    lora::LoraAttention<Scalar> att(std::move(w), cfg);
    for (const auto& t : cfg.target_modules) {
      auto* l = att.lora(t);
      l->set_lora_A(get(t + ".lora_A"));
      l->set_lora_B(get(t + ".lora_B"));
    }
    const lora::Index batch = c["batch"].get<lora::Index>();
    lora::AttentionMask<Scalar> mask;
    mask.causal = c.value("causal", false);
    if (c.value("key_padding_mask", false)) mask.key_padding = st.integers("key_padding_mask").template cast<std::uint8_t>();
    const bool cross = c.value("cross", false);
    const lora::Mat<Scalar> x = get("x");
    const lora::Mat<Scalar> ctx = cross ? get("context") : x;

    compare("y (eval forward)", att.forward(x, ctx, ctx, batch, mask), "y");
    compare("y (train forward)", att.forward_train(x, ctx, ctx, batch, mask), "y");
    const auto g = att.backward(get("dy"));
    compare("grad_x", cross ? g.d_query : g.self(), "grad_x");
    if (cross) compare("grad_context", g.context(), "grad_context");
    for (const auto& t : cfg.target_modules) {
      const auto* l = att.lora(t);
      compare(t + ".grad_lora_A", l->grad_A(), t + ".grad_lora_A");
      compare(t + ".grad_lora_B", l->grad_B(), t + ".grad_lora_B");
    }
    att.safe_merge();
    compare("y (merged forward)", att.forward(x, ctx, ctx, batch, mask), "y_merged");
    att.unmerge();
  }
};

template <void (Checker<double>::*D)(const nlohmann::json&) const, void (Checker<float>::*F)(const nlohmann::json&) const>
void both(const lora::SafeTensors& st, Report& report, const nlohmann::json& c) {
  (Checker<double>{st, report}.*D)(c);
  (Checker<float>{st, report}.*F)(c);
}

}  // namespace

Report check_file(const std::string& path) {
  Report report;
  lora::SafeTensors st = lora::SafeTensors::open(path);
  auto meta = st.metadata().find("case");
  if (meta == st.metadata().end()) {
    report.kind = "?";
    report.note = "no 'case' in the metadata";
    return report;
  }
  const auto c = nlohmann::json::parse(meta->second);
  report.kind = c.value("kind", "?");
  // Each kind's check, run in double and then in float.
  using Case = void (*)(const lora::SafeTensors&, Report&, const nlohmann::json&);
  const std::pair<const char*, Case> kinds[] = {
      {"linear", both<&Checker<double>::linear, &Checker<float>::linear>},
      {"linear_fan_in_fan_out", both<&Checker<double>::linear, &Checker<float>::linear>},
      {"attention", both<&Checker<double>::attention, &Checker<float>::attention>},
      {"embedding", both<&Checker<double>::embedding, &Checker<float>::embedding>},
      {"multi_adapter", both<&Checker<double>::multi_adapter, &Checker<float>::multi_adapter>},
  };
  for (const auto& [kind, check] : kinds) {
    if (report.kind != kind) continue;
    report.supported = true;
    check(st, report, c);
    return report;
  }
  report.note = "kind '" + report.kind + "' is not supported yet";
  return report;
}

}  // namespace fixture
