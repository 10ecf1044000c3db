// WeightStorage<Scalar>: where a LoRA layer's frozen W lives, and what merging may do to it.
//
//   owned           the layer's own matrix; merge writes into it
//   writable borrow a Map over the caller's memory; merge writes into it
//   read-only       a Map over memory that is never written (e.g. a mapped safetensors file):
//     borrow        merge copies W first (copy on write); restore() drops the copy, so W is the
//                   borrowed bytes again, exactly
//   exact mode      (owned or writable) the first merge saves W; restore() copies it back
//
// Shapes are W as stored: (out, in), or (in, out) for fan_in_fan_out layers.
#pragma once

#include <lora/types.hpp>

namespace lora::detail {

template <class Scalar>
class WeightStorage {
 public:
  using Mat = lora::Mat<Scalar>;
  using MatMap = lora::MatMap<Scalar>;
  using ConstMatMap = lora::ConstMatMap<Scalar>;

  WeightStorage() = default;
  explicit WeightStorage(Mat w) : own_(std::move(w)), use_own_(true), rows_(own_.rows()), cols_(own_.cols()) {}
  explicit WeightStorage(MatMap w) : borrow_(w.data()), rows_(w.rows()), cols_(w.cols()) {}
  explicit WeightStorage(ConstMatMap w) : borrow_ro_(w.data()), rows_(w.rows()), cols_(w.cols()) {}

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  bool is_borrowed() const { return !use_own_; }
  // A read-only borrow that has no private copy now (set() and trainable bases are refused).
  bool is_read_only() const { return borrow_ro_ && !use_own_; }

  ConstMatMap view() const { return ConstMatMap(data(), rows_, cols_); }
  // Writable memory: the owned matrix, the writable borrow, or a read-only borrow's copy (only
  // between begin_merge and restore).
  MatMap writable() { return MatMap(use_own_ ? own_.data() : borrow_, rows_, cols_); }

  // Before the first adapter merges: a read-only borrow gets its private copy; exact mode saves W.
  void begin_merge(bool exact) {
    if (borrow_ro_) {
      own_ = view();
      use_own_ = true;
    } else if (exact) {
      saved_ = view();
    }
  }
  // After everything merged is taken out: true when W was put back exactly (read-only borrow or
  // exact mode); false means the caller subtracts the merged updates itself.
  bool restore() {
    if (borrow_ro_) {
      use_own_ = false;  // back to the untouched borrowed bytes
      own_.resize(0, 0);
      return true;
    }
    if (saved_.size()) {
      writable() = saved_;
      saved_.resize(0, 0);
      return true;
    }
    return false;
  }

 private:
  const Scalar* data() const { return use_own_ ? own_.data() : (borrow_ ? borrow_ : borrow_ro_); }

  Mat own_;                         // owned W, or the private copy of a read-only borrow
  Scalar* borrow_ = nullptr;        // writable borrow
  const Scalar* borrow_ro_ = nullptr;
  bool use_own_ = false;            // W is own_
  Index rows_ = 0, cols_ = 0;
  Mat saved_;                       // W before the first merge, in exact mode
};

}  // namespace lora::detail
