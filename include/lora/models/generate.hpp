// Text generation with a KV cache for LlamaModel and Gpt2Model (any model with forward(ids,
// mask, cache), make_cache and config()).
//
//   prompts, left-padded to one length L (mask 0 on the pads) -> one forward over all of them,
//   then one token per step: forward(next (batch, 1), cache) -> logits of the last position
//   next = argmax(logits)                                          temperature 0 (greedy), or
//   next ~ softmax(logits / temperature) over the top_k most likely tokens, cut to the smallest
//          set whose probability reaches top_p (then renormalised), drawn with a seeded Rng
//
// A sequence stops after producing a stop token (kept in its output) or max_new_tokens; the
// batch stops when all have. Token positions skip the pads, so a prompt continues in a batch as
// it does alone. Every step computes only the new token's row (the cache holds the keys and
// values of the others); the result equals running the full forward over the whole text.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace lora {

struct GenerationConfig {
  int max_new_tokens = 32;
  double temperature = 0;  // 0: greedy
  int top_k = 0;           // 0: every token
  double top_p = 1;        // 1: no nucleus cut
  std::uint64_t seed = 0;
  std::vector<std::int64_t> stop_tokens;
  // One adapter name per prompt ("__base__" for none): a batch in which each sequence uses its
  // own adapter, served unmerged in one pass (the model's forward with adapters). Empty: the
  // active adapters for all.
  std::vector<std::string> adapters;
};

namespace detail {

// The next token from one row of logits.
template <class Row>
std::int64_t next_token(const Row& logits, const GenerationConfig& g, Rng& rng) {
  const Index vocab = logits.size();
  if (g.temperature == 0) {
    Index best = 0;
    for (Index i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  std::vector<Index> order(vocab);
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return logits[a] > logits[b]; });
  const Index keep = g.top_k > 0 ? std::min<Index>(g.top_k, vocab) : vocab;
  std::vector<double> p(keep);
  const double top = double(logits[order[0]]);
  double sum = 0;
  for (Index i = 0; i < keep; ++i) sum += p[i] = std::exp((double(logits[order[i]]) - top) / g.temperature);
  Index n = keep;
  if (g.top_p < 1) {  // smallest prefix whose probability reaches top_p (at least one token)
    double acc = 0;
    for (n = 0; n < keep && (n == 0 || acc < g.top_p * sum); ++n) acc += p[n];
    sum = acc;
  }
  double u = rng.uniform() * sum;
  for (Index i = 0; i < n; ++i) {
    u -= p[i];
    if (u < 0) return order[i];
  }
  return order[n - 1];
}

}  // namespace detail

// The new tokens of each prompt (prompts of any lengths >= 1).
template <class Model>
std::vector<std::vector<std::int64_t>> generate(const Model& model, const std::vector<std::vector<std::int64_t>>& prompts,
                                                const GenerationConfig& g) {
  if (prompts.empty()) detail::fail("generate: no prompts");
  if (g.max_new_tokens < 0) detail::fail("generate: max_new_tokens is ", g.max_new_tokens, ", expected >= 0");
  if (!(g.temperature >= 0) || !std::isfinite(g.temperature)) detail::fail("generate: temperature is ", g.temperature, ", expected >= 0");
  if (g.top_k < 0) detail::fail("generate: top_k is ", g.top_k, ", expected >= 0");
  if (!(g.top_p > 0 && g.top_p <= 1)) detail::fail("generate: top_p is ", g.top_p, ", expected in (0, 1]");
  const Index batch = Index(prompts.size());
  if (!g.adapters.empty() && g.adapters.size() != prompts.size())
    detail::fail("generate: ", g.adapters.size(), " adapter names for ", prompts.size(), " prompts; give one per prompt");
  const std::vector<std::string>* adapters = g.adapters.empty() ? nullptr : &g.adapters;
  Index L = 0;
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    if (prompts[b].empty()) detail::fail("generate: prompt ", b, " is empty");
    L = std::max<Index>(L, Index(prompts[b].size()));
  }
  if (L + g.max_new_tokens > model.config().max_position_embeddings)
    detail::fail("generate: prompts of up to ", L, " tokens + max_new_tokens ", g.max_new_tokens,
                 " exceed max_position_embeddings ", model.config().max_position_embeddings);
  Mat<std::int64_t> ids = Mat<std::int64_t>::Zero(batch, L), mask = Mat<std::int64_t>::Zero(batch, L);
  for (Index b = 0; b < batch; ++b) {
    const Index pad = L - Index(prompts[b].size());
    for (Index t = pad; t < L; ++t) {
      ids(b, t) = prompts[b][t - pad];
      mask(b, t) = 1;
    }
  }
  auto cache = model.make_cache(batch, L + std::max(g.max_new_tokens, 1));
  std::vector<std::vector<std::int64_t>> out(batch);
  if (g.max_new_tokens == 0) return out;
  auto logits = model.forward(ids, mask, &cache, adapters);
  detail::Rng rng(g.seed);
  std::vector<bool> done(batch, false);
  Mat<std::int64_t> next(batch, 1);
  for (int step = 0; step < g.max_new_tokens; ++step) {
    const Index T = logits.rows() / batch;
    for (Index b = 0; b < batch; ++b) {
      next(b, 0) = done[b] ? out[b].back() : detail::next_token(logits.row(b * T + T - 1), g, rng);
      if (done[b]) continue;
      out[b].push_back(next(b, 0));
      done[b] = std::find(g.stop_tokens.begin(), g.stop_tokens.end(), next(b, 0)) != g.stop_tokens.end();
    }
    if (step + 1 == g.max_new_tokens || std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    logits = model.forward(next, {}, &cache, adapters);
  }
  return out;
}

}  // namespace lora
