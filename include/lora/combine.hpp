// Weighted combinations of adapters over one base layer (PEFT's add_weighted_adapter), on the
// factors alone: every input is (A (r_i, in), B (out, r_i), s_i), the result is one adapter
// whose s·B·A is the combination.
//
//   cat     exact: A = [w_1·s_1·A_1; w_2·s_2·A_2; …], B = [B_1, B_2, …]  (rank Σ r_i)
//           s·B·A = Σ w_i·s_i·B_i·A_i
//   linear  A = Σ sign(w_i)·√|w_i·s_i|·A_i,  B = Σ √|w_i·s_i|·B_i  (all ranks equal; not the
//           weighted sum of the deltas: cross terms B_i·A_j remain, as in PEFT)
//   svd     Δ = Σ w_i·s_i·B_i·A_i, truncated to svd_rank (default: the largest r_i):
//           U·diag(σ)·Vᵀ -> B = U_k·diag(σ_k), A = V_kᵀ (PEFT's split)
//
// As in PEFT the result has alpha = its rank, so s = 1, or √rank when use_rslora (PEFT copies
// the first adapter's config, rsLoRA included, without rescaling the factors).
#pragma once

#include <lora/error.hpp>
#include <lora/linear.hpp>
#include <lora/types.hpp>

#include <Eigen/SVD>

#include <cmath>
#include <vector>

namespace lora {

template <class Scalar>
struct AdapterFactors {
  Mat<Scalar> A;  // (r, in)
  Mat<Scalar> B;  // (out, r)
  double scaling = 1;
};

// The factors of the layer's one active adapter, or of a named one.
template <class Scalar>
AdapterFactors<Scalar> factors_of(const LoraLinear<Scalar>& layer) {
  return {layer.lora_A(), layer.lora_B(), double(layer.scaling())};
}
template <class Scalar>
AdapterFactors<Scalar> factors_of(const LoraLinear<Scalar>& layer, const std::string& name) {
  return {layer.lora_A(name), layer.lora_B(name), double(layer.scaling(name))};
}

enum class Combination { cat, linear, svd };

template <class Scalar>
AdapterFactors<Scalar> add_weighted_adapter(const std::vector<AdapterFactors<Scalar>>& adapters, const std::vector<double>& weights,
                                            Combination type, int svd_rank = 0, bool use_rslora = false) {
  const char* where = "add_weighted_adapter: ";
  if (adapters.empty()) detail::fail(where, "no adapters to combine");
  if (weights.size() != adapters.size())
    detail::fail(where, adapters.size(), " adapters but ", weights.size(), " weights, expected one weight per adapter");
  const Index in = adapters[0].A.cols(), out = adapters[0].B.rows();
  Index total_rank = 0, max_rank = 0;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const auto& a = adapters[i];
    if (a.A.rows() < 1 || a.A.cols() != in || a.B.rows() != out || a.B.cols() != a.A.rows())
      detail::fail(where, "adapter ", i, " has A ", detail::shape(a.A.rows(), a.A.cols()), " and B ", detail::shape(a.B.rows(), a.B.cols()),
                   ", expected A (r, ", in, ") and B (", out, ", r) like adapter 0");
    if (!std::isfinite(weights[i]) || !std::isfinite(a.scaling)) detail::fail(where, "weight ", i, " or its scaling is not finite");
    if (type == Combination::linear && a.A.rows() != adapters[0].A.rows())
      detail::fail(where, "linear needs equal ranks, adapter ", i, " has r = ", a.A.rows(), " and adapter 0 r = ", adapters[0].A.rows(),
                   " (use cat or svd)");
    total_rank += a.A.rows();
    max_rank = std::max(max_rank, a.A.rows());
  }
  if (type != Combination::svd && svd_rank != 0) detail::fail(where, "svd_rank is only for the svd combination");
  if (type == Combination::svd && (svd_rank < 0 || svd_rank > std::min(in, out)))
    detail::fail(where, "svd_rank is ", svd_rank, ", expected 1 to min(out, in) = ", std::min(in, out), " (0: the largest rank)");

  AdapterFactors<Scalar> r;
  switch (type) {
    case Combination::cat: {
      r.A.resize(total_rank, in);
      r.B.resize(out, total_rank);
      Index at = 0;
      for (std::size_t i = 0; i < adapters.size(); ++i) {
        const Index k = adapters[i].A.rows();
        r.A.middleRows(at, k) = Scalar(weights[i] * adapters[i].scaling) * adapters[i].A;
        r.B.middleCols(at, k) = adapters[i].B;
        at += k;
      }
      break;
    }
    case Combination::linear: {
      r.A = Mat<Scalar>::Zero(adapters[0].A.rows(), in);
      r.B = Mat<Scalar>::Zero(out, adapters[0].A.rows());
      for (std::size_t i = 0; i < adapters.size(); ++i) {
        const double ws = weights[i] * adapters[i].scaling, root = std::sqrt(std::abs(ws));
        r.A += Scalar(ws >= 0 ? root : -root) * adapters[i].A;
        r.B += Scalar(root) * adapters[i].B;
      }
      break;
    }
    case Combination::svd: {
      Eigen::MatrixXd delta = Eigen::MatrixXd::Zero(out, in);
      for (std::size_t i = 0; i < adapters.size(); ++i)
        delta.noalias() += (weights[i] * adapters[i].scaling) * adapters[i].B.template cast<double>() * adapters[i].A.template cast<double>();
      const Index k = svd_rank ? svd_rank : std::min(max_rank, std::min(in, out));
      Eigen::BDCSVD<Eigen::MatrixXd> svd(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
      r.B = (svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal()).template cast<Scalar>();
      r.A = svd.matrixV().leftCols(k).transpose().template cast<Scalar>();
      break;
    }
  }
  r.scaling = use_rslora ? std::sqrt(double(r.A.rows())) : 1.0;
  return r;
}

// PEFT's LoraModel.add_weighted_adapter(adapters, weights, adapter_name, combination_type) on one
// layer: adds adapter new_name (not active) holding the combination of the named adapters. Its
// config is the first adapter's with r = the result's rank and alpha = r (as PEFT), so its
// scaling is the one computed above. DoRA adapters, unknown names and a name the layer already
// has are refused, changing nothing.
template <class Scalar>
void add_weighted_adapter(LoraLinear<Scalar>& layer, const std::vector<std::string>& names, const std::vector<double>& weights,
                          const std::string& new_name, Combination type, int svd_rank = 0) {
  const char* where = "add_weighted_adapter: ";
  if (layer.has_adapter(new_name)) detail::fail(where, "the layer already has an adapter '", new_name, "'");
  if (names.empty()) detail::fail(where, "no adapters to combine");
  std::vector<AdapterFactors<Scalar>> in;
  for (const auto& n : names) {
    if (!layer.has_adapter(n)) detail::fail(where, "no adapter '", n, "' in the layer");
    if (layer.config(n).use_dora) detail::fail(where, "adapter '", n, "' uses DoRA, which cannot be combined");
    in.push_back(factors_of(layer, n));
  }
  LoraConfig config = layer.config(names[0]);
  const AdapterFactors<Scalar> r = add_weighted_adapter<Scalar>(in, weights, type, svd_rank, config.use_rslora);
  config.r = static_cast<int>(r.A.rows());
  config.alpha = config.r;
  layer.add_adapter(new_name, config);
  layer.set_lora_A(new_name, r.A);
  layer.set_lora_B(new_name, r.B);
}

}  // namespace lora
