// LoraLinear's training pass (declared in linear.hpp, which includes this file): forward_train
// fills the Cache and backward consumes it.
//
//   forward_train, x (n, in) -> y (n, out); for each active adapter, kept in the Cache:
//     xd = drop(x) (n, in) and its mask (p > 0 only)      t = xd·Aᵀ (n, r)
//     and x itself once when an adapter has p = 0 or the base trains (copied, or borrowed)
//     y = b + x·Wᵀ + Σ s·t·Bᵀ      (above 8 rows without DoRA: the LoRA terms first, then the
//                                    base GEMM adds x·Wᵀ into y, as in forward)
//   backward, dy (n, out) -> dx (n, in); with DoRA e = dy ⊙ c (else e = dy):
//     dB += s·eᵀ·t (r, out) transposed      g = s·e·B (n, r)      dA += gᵀ·xd (r, in)
//     dx  = e·W + Σ mask ⊙ (g·A)            db += Σ_rows dy (trainable bias or base)
//         (set: the LoRA terms first, then the base product adds e·W into dx)
//     dW += dyᵀ·x (base_trainable)           dm += Σ_rows dy ⊙ z / norm (DoRA, z = x·Wᵀ + s·t·Bᵀ)
//   (dx += ... with InputGrad::add; neither product of dx with InputGrad::none). With the
//   adapters disabled only the base terms remain.
//
// The thin products (n, r) go through detail/thin_products.hpp's kernels; the (n, in) × (in, out)
// products are Eigen's (the BLAS when one is linked).
#pragma once

#include <lora/linear.hpp>

#include <string>
#include <vector>

namespace lora {

template <class Scalar>
void LoraLinear<Scalar>::train_forward(const MatRef& x, Mat& y, Keep keep) {
  check_input("forward_train", x);
  check_no_alias("forward_train", "Y", y, "X", x);
  if (is_merged()) detail::fail("LoraLinear::forward_train: the layer is merged; call unmerge() before training");
  Cache& c = cache_;
  const std::vector<std::string>& active = trained();
  c.n = x.rows();
  bool keep_x = train_base_;
  for (const std::string& name : active) keep_x = keep_x || adapter(name).config.dropout == 0;
  c.x_borrowed = keep_x && keep == Keep::borrow;
  if (c.x_borrowed) {
    c.x.resize(0, 0);
    c.xb = x.data();
    c.xb_stride = x.outerStride();
  } else if (keep_x) {
    c.x = x;
  }
  y.resize(x.rows(), out_);
  const bool first = lora_first(x.rows(), active);
  if (!first) base(x, y);
  c.adapters.resize(active.size());
  for (std::size_t k = 0; k < active.size(); ++k) {
    Adapter& a = adapter(active[k]);
    AdapterCache& ac = c.adapters[k];
    if (a.config.dropout > 0) {
      dropout_mask(ac.mask, x.rows(), in_, a.config.dropout, a.rng);
      ac.xd = x.cwiseProduct(ac.mask);
    }
    detail::rank_cols_t<Scalar>(ac.t, Scalar(1), a.config.dropout > 0 ? MatRef(ac.xd) : x, a.A);
    const bool init = first && k == 0;  // y = b + s·t·Bᵀ
    detail::rank_update_t<Scalar>(y, a.s, ac.t, a.B, !init, init && has_bias_ ? bias_.data() : nullptr);
    if (a.config.use_dora) {  // the only active adapter
      ac.norm = norm_of(a);
      ac.c = a.m.cwiseQuotient(ac.norm);
      ac.z = y;
      if (has_bias_) ac.z.rowwise() -= bias_.transpose();
      rescale(y, ac.c);
    }
  }
  if (first) base(x, y, true);
  c.valid = true;
  c.discarded_by = nullptr;
}

template <class Scalar>
void LoraLinear<Scalar>::backward(const MatRef& dy, Mat& dx, InputGrad mode) {
  Cache& c = cache_;
  check_backward(dy);
  if (mode != InputGrad::none) check_no_alias("backward", "dX", dx, "dY", dy);
  if (mode == InputGrad::add && (dx.rows() != dy.rows() || dx.cols() != in_))
    detail::fail("LoraLinear::backward: dX to add to is ", detail::shape(dx.rows(), dx.cols()), ", expected ",
                 detail::shape(dy.rows(), in_));
  const MatRef x = cached_x();
  if (grad_bias_.size()) grad_bias_ += dy.colwise().sum().transpose();
  if (train_base_) {
    if (fan_in_fan_out_)
      grad_W_.noalias() += x.transpose() * dy;
    else
      grad_W_.noalias() += dy.transpose() * x;
  }
  const std::vector<std::string>& active = trained();
  const bool dora = active.size() == 1 && adapter(active[0]).config.use_dora;
  if (dora) {  // dm += Σ_rows dy ⊙ z / norm; the rest is LoRA's backward of dy ⊙ c
    AdapterCache& ac = c.adapters[0];
    adapter(active[0]).grad_m += (dy.array() * ac.z.array()).colwise().sum().matrix().transpose().cwiseQuotient(ac.norm);
    ac.d = dy.array().rowwise() * ac.c.transpose().array();
  }
  const MatRef e = dora ? MatRef(c.adapters[0].d) : dy;
  const auto base_grad = [&](bool add) {  // dx = e·W, or dx += e·W
    if (add && fan_in_fan_out_)
      dx.noalias() += e * weight().transpose();
    else if (add)
      dx.noalias() += e * weight();
    else if (fan_in_fan_out_)
      dx.noalias() = e * weight().transpose();
    else
      dx.noalias() = e * weight();
  };
  // Setting dx with adapters to train, their terms come first: the first writes dx, and the base
  // product adds e·W into it (β = 1), where dx = e·W would zero dx first and each update after it
  // would pass over dx once more.
  const bool lora_first = mode == InputGrad::set && !active.empty();
  if (mode == InputGrad::set) dx.resize(dy.rows(), in_);
  if (mode != InputGrad::none && !lora_first) base_grad(mode == InputGrad::add);
  c.valid = false;
  bool init = lora_first;  // the next term sets dx
  for (std::size_t k = 0; k < active.size(); ++k) {
    Adapter& a = adapter(active[k]);
    AdapterCache& ac = c.adapters[k];
    // dBᵀ (r, out) = s·tᵀ·dy, then added transposed; the thin products in
    // detail/thin_products.hpp's kernels.
    detail::rank_rows<Scalar>(ac.dbt, a.s, ac.t, e, Scalar(0));
    detail::transpose_into<Scalar>(a.grad_B, ac.dbt, true);
    detail::rank_cols<Scalar>(ac.g, a.s, e, a.B);
    if (a.config.dropout > 0) {
      detail::rank_rows<Scalar>(a.grad_A, Scalar(1), ac.g, ac.xd, Scalar(1));
      if (mode == InputGrad::none) continue;
      detail::rank_update<Scalar>(ac.xd, Scalar(1), ac.g, a.A, false);  // xd is no longer needed: reuse it for g·A
      if (init)
        dx = ac.mask.cwiseProduct(ac.xd);
      else
        dx += ac.mask.cwiseProduct(ac.xd);
    } else {
      detail::rank_rows<Scalar>(a.grad_A, Scalar(1), ac.g, x, Scalar(1));
      if (mode == InputGrad::none) continue;
      detail::rank_update<Scalar>(dx, Scalar(1), ac.g, a.A, !init);
    }
    init = false;
  }
  if (lora_first) base_grad(true);
}

}  // namespace lora
