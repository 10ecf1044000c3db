// A small vision transformer for 28×28 images, built from the library's layers:
//
//   images (batch, 784) -> patch embedding (7×7 tiles -> 16 tokens of d, plus positions)
//                       -> blocks × EncoderBlock (pre-norm, LoRA / residual adapter /
//                          adapter-tuning / prefix-tuning / full)
//                       -> LayerNorm -> mean over tokens -> head Linear (d -> classes)
//
// What trains is chosen per model: the head always; LoRA factors of the targeted modules and the
// residual adapters, bottlenecks or prefixes when the block config asks for them; every weight when base_trainable.
// state() / load_state() copy the base weights by name, so a pre-trained model can be the frozen
// base of several differently adapted copies.
#pragma once

#include <lora/lora.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

template <class Scalar>
class Vit {
 public:
  using Mat = lora::Mat<Scalar>;
  using MatRef = lora::MatRef<Scalar>;
  using Index = lora::Index;
  static constexpr Index kSide = 28, kPatch = 7, kTokens = 16;

  Vit(Index d, int blocks, Index classes, const lora::EncoderConfig& block_config)
      : embed_(kSide, kPatch, d, block_config.seed), norm_(d), head_(init_head(d, classes, block_config.seed + 100)) {
    for (int b = 0; b < blocks; ++b) {
      lora::EncoderConfig c = block_config;
      c.seed = block_config.seed + 1000 * (b + 1);
      blocks_.push_back(std::make_unique<lora::EncoderBlock<Scalar>>(d, c));
    }
    adapted_ = !block_config.target_modules.empty() || block_config.adapter_rank > 0 || block_config.bottleneck.size > 0 ||
               block_config.prefix.length > 0;
    set_base_trainable(false);
  }

  Index classes() const { return head_.out_features(); }
  lora::Linear<Scalar>& head() { return head_; }

  // Every weight below the head trains (pre-training, full fine-tuning), or none of them.
  void set_base_trainable(bool on) {
    embed_.set_trainable(on);
    norm_.set_trainable(on);
    for (auto& b : blocks_) b->set_base_trainable(on);
    base_trainable_ = on;
  }

  // Ladder side-tuning: a side network (lora/models/ladder_side.hpp) reads the blocks' outputs,
  // which then run their evaluation forward only, and its output goes to the final norm.
  void add_ladder(const lora::LadderConfig& config) {
    ladder_ = std::make_unique<lora::LadderSide<Scalar>>(norm_.gamma().size(), int(blocks_.size()), config);
    adapted_ = true;
  }

  Mat forward(const MatRef& images) const {
    Mat x;
    if (ladder_) {
      x = ladder_->forward(taps(images), images.rows());
    } else {
      x = embed_.forward(images);
      for (const auto& b : blocks_) x = b->forward(x, images.rows());
    }
    return head_.forward(lora::mean_pool<Scalar>(norm_.forward(x), images.rows()));
  }

  Mat forward_train(const MatRef& images) {
    Mat x;
    if (ladder_) {
      x = ladder_->forward_train(taps(images), images.rows());
    } else {
      x = embed_.forward_train(images);
      for (auto& b : blocks_) x = b->forward_train(x, images.rows());
    }
    return head_.forward_train(lora::mean_pool<Scalar>(norm_.forward_train(x), images.rows()));
  }

  // Back from dlogits; stops at the head when nothing below it trains (the head-only method), at
  // the side network with a ladder.
  void backward(const MatRef& dlogits) {
    Mat dx = head_.backward(dlogits);
    if (!base_trainable_ && !adapted_) return;
    dx = norm_.backward(lora::mean_pool_backward<Scalar>(dx, kTokens));
    if (ladder_) return ladder_->backward(dx);
    for (auto b = blocks_.rbegin(); b != blocks_.rend(); ++b) dx = (*b)->backward(dx);
    if (base_trainable_) embed_.backward(dx);
  }

  void zero_grad() {
    embed_.zero_grad();
    for (auto& b : blocks_) b->zero_grad();
    norm_.zero_grad();
    head_.zero_grad();
    if (ladder_) ladder_->zero_grad();
  }

  std::vector<lora::Parameter<Scalar>> parameters() {
    std::vector<lora::Parameter<Scalar>> all;
    auto add = [&](const std::string& prefix, std::vector<lora::Parameter<Scalar>> ps) {
      for (auto& p : ps) all.push_back({prefix + p.name, p.value, p.grad});
    };
    add("embed.", embed_.parameters());
    for (std::size_t b = 0; b < blocks_.size(); ++b) add("blocks." + std::to_string(b) + ".", blocks_[b]->parameters());
    add("norm.", norm_.parameters());
    add("head.", head_.parameters());
    if (ladder_) add("ladder.", ladder_->parameters());
    return all;
  }

  // Every parameter, trainable or not (the frozen base included).
  Index parameter_count() const {
    Index n = embed_.parameter_count() + norm_.parameter_count() + head_.parameter_count();
    for (const auto& b : blocks_) n += b->parameter_count();
    return n + (ladder_ ? ladder_->parameter_count() : 0);
  }

  void merge() {
    for (auto& b : blocks_) b->merge();
  }
  void unmerge() {
    for (auto& b : blocks_) b->unmerge();
  }
  // Prefixes trained through their MLP keep only the keys and values it gives (prefix.hpp).
  void fold_prefixes() {
    for (auto& b : blocks_)
      if (auto* p = b->attention().prefix()) p->fold();
  }

  // The base weights (everything below the head), by name.
  std::map<std::string, Mat> state() {
    std::map<std::string, Mat> s;
    with_base_parameters([&](lora::Parameter<Scalar>& p) { s.emplace(p.name, p.value); });
    return s;
  }

  void load_state(const std::map<std::string, Mat>& s) {
    with_base_parameters([&](lora::Parameter<Scalar>& p) {
      const auto it = s.find(p.name);
      if (it == s.end() || it->second.rows() != p.value.rows() || it->second.cols() != p.value.cols())
        lora::detail::fail("Vit::load_state: no tensor of shape ", lora::detail::shape(p.value.rows(), p.value.cols()),
                           " named '", p.name, "'");
      p.value = it->second;
    });
  }

 private:
  // Calls f on every base parameter (LoRA factors, adapters and the head excluded).
  template <class F>
  void with_base_parameters(F f) {
    const bool was = base_trainable_;
    set_base_trainable(true);
    for (auto& p : parameters())
      if (p.name.rfind("head.", 0) != 0 && p.name.find("lora_") == std::string::npos && p.name.find("adapter.") == std::string::npos &&
          p.name.find("bottleneck_") == std::string::npos && p.name.find("prefix.") == std::string::npos &&
          p.name.rfind("ladder.", 0) != 0)
        f(p);
    set_base_trainable(was);
  }

  // The backbone's outputs for a side network: the first block's input and each block's output,
  // from the evaluation forward (nothing kept for a backward).
  std::vector<Mat> taps(const MatRef& images) const {
    std::vector<Mat> t{embed_.forward(images)};
    for (const auto& b : blocks_) t.push_back(b->forward(t.back(), images.rows()));
    return t;
  }

  static lora::Linear<Scalar> init_head(Index d, Index classes, std::uint64_t seed) {
    lora::detail::Rng rng(seed);
    return lora::torch_linear<Scalar>(classes, d, rng);
  }

  lora::PatchEmbedding<Scalar> embed_;
  std::vector<std::unique_ptr<lora::EncoderBlock<Scalar>>> blocks_;
  lora::LayerNorm<Scalar> norm_;
  lora::Linear<Scalar> head_;
  std::unique_ptr<lora::LadderSide<Scalar>> ladder_;
  bool base_trainable_ = false, adapted_ = false;
};
