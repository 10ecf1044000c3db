// LoraLinear's merge and unmerge (declared in linear.hpp, which includes this file).
//
//   merge:    W ← W + s·B·A                 (DoRA: W ← c ⊙_rows (W + s·B·A), c = m / ‖W + s·B·A‖)
//   unmerge:  W ← W − s·B·A, in reverse merge order (DoRA: W ← W / c first), or W restored
//             bit-for-bit from the copy kept by exact_unmerge or a read-only borrow
//
// s·B·A is added by one GEMM into W's storage ((out, in), or (in, out) with fan_in_fan_out); no
// (out, in) temporary. safe_merge computes the merged W aside and refuses non-finite values,
// leaving W as it was; check_safe_merge does the same without merging, so that a model can check
// every layer before any layer merges.
#pragma once

#include <lora/linear.hpp>

#include <string>
#include <vector>

namespace lora {

template <class Scalar>
void LoraLinear<Scalar>::merge(const std::vector<std::string>& names) {
  const std::vector<std::size_t> todo = reg_.to_merge("merge", names, disabled_);
  if (todo.empty()) return;
  begin_merge();
  for (std::size_t i : todo) {
    Adapter& a = reg_.all()[i];
    a.dora_c = merge_delta(a, w_.writable());
    reg_.mark_merged(a.name);
  }
  discard_cache("merge");
}

template <class Scalar>
void LoraLinear<Scalar>::safe_merge(const std::vector<std::string>& names) {
  const std::vector<std::size_t> todo = reg_.to_merge("safe_merge", names, disabled_);
  if (todo.empty()) return;
  std::vector<Vec> kept;
  const Mat merged = merged_weight("safe_merge", todo, &kept);
  begin_merge();
  w_.writable() = merged;
  for (std::size_t k = 0; k < todo.size(); ++k) {
    reg_.all()[todo[k]].dora_c = std::move(kept[k]);
    reg_.mark_merged(reg_.all()[todo[k]].name);
  }
  discard_cache("safe_merge");
}

template <class Scalar>
void LoraLinear<Scalar>::check_safe_merge(const std::vector<std::string>& names) const {
  const std::vector<std::size_t> todo = reg_.to_merge("safe_merge", names, disabled_);
  if (!todo.empty()) merged_weight("safe_merge", todo, nullptr);
}

template <class Scalar>
void LoraLinear<Scalar>::unmerge() {
  if (!is_merged()) return;
  if (!w_.restore()) {
    MatMap w = w_.writable();
    for (auto it = reg_.merged().rbegin(); it != reg_.merged().rend(); ++it) {
      const Adapter& a = adapter(*it);
      if (a.config.use_dora) scale_outputs(w, a.dora_c.cwiseInverse());  // W' / c, with c from merge time
      add_delta(w, a, Scalar(-1));
    }
  }
  reg_.clear_merged();
  discard_cache("unmerge");
}

template <class Scalar>
typename LoraLinear<Scalar>::Mat LoraLinear<Scalar>::merged_weight(const char* fn, const std::vector<std::size_t>& todo, std::vector<Vec>* kept) const {
  Mat merged = weight();
  for (std::size_t i : todo) {
    Vec c = merge_delta(reg_.all()[i], MatMap(merged.data(), merged.rows(), merged.cols()));
    if (kept) kept->push_back(std::move(c));
  }
  if (!merged.allFinite()) detail::fail("LoraLinear::", fn, ": the merged weight has non-finite values; W is unchanged");
  return merged;
}

template <class Scalar>
typename LoraLinear<Scalar>::Vec LoraLinear<Scalar>::merge_delta(const Adapter& a, MatMap w) const {
  const Vec c = a.config.use_dora ? Vec(a.m.cwiseQuotient(norm_of(a))) : Vec();
  add_delta(w, a, Scalar(1));
  if (a.config.use_dora) scale_outputs(w, c);
  return c;
}

template <class Scalar>
void LoraLinear<Scalar>::add_delta(MatMap w, const Adapter& a, Scalar sign) const {
  if (fan_in_fan_out_)
    w.noalias() += (sign * a.s) * a.A.transpose() * a.B.transpose();
  else
    w.noalias() += (sign * a.s) * a.B * a.A;
}

}  // namespace lora
