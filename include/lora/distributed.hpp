// Data-parallel training over MPI (target lora::distributed; CMake option LORA_MPI).
//
//   Every rank holds the whole model and trains on its shard of each global batch: of a batch of
//   size·b examples, rank r takes rows [r·b, (r+1)·b). After backward, rank r holds g_r, the
//   gradient of its mean loss over its n_r counted tokens (or examples). all_reduce_gradients
//   sums, over the ranks, one flat buffer of the trainable parameters only
//       [ n_r·g_r (every parameter, in order) | n_r·loss_r | n_r ]     (one MPI_Allreduce, in pieces
//                                                                  of 2^30 scalars beyond that)
//   and every rank then holds the global batch's mean, not a mean of per-rank means:
//       g = Σ_r n_r·g_r / N,    loss = Σ_r n_r·loss_r / N,    N = Σ_r n_r
//   Each rank then takes the same optimizer step on the same numbers, so the parameters stay
//   equal on every rank; check_agreement compares a checksum of them.
//
//   A training loop (rank 0 alone writes checkpoints; every rank reads them to resume):
//     lora::DataParallel dp;                                 after MPI_Init
//     dp.broadcast(model.parameters());                      rank 0's initial values everywhere
//     dp.separate_dropout(model.modules());                  each rank its own dropout masks
//     for each step:  ids = global batch;  [begin, count) = dp.shard(ids.rows())
//       r = causal_lm_loss(model.forward_train(ids.middleRows(begin, count)), ...)
//       model.backward(r.grad);  dp.all_reduce_gradients(model.parameters(), r.loss, r.count)
//       clip, opt.step()
//
// Every rank must call the collective functions in the same order. A function that finds bad
// input fails on every rank alike (its checks see what every rank sees), so no rank is left
// waiting; a rank that dies ends the job (MPI's default error handler; mpirun stops the others).
#pragma once

#include <lora/detail/files.hpp>
#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/module_map.hpp>
#include <lora/parameter.hpp>
#include <lora/training_checkpoint.hpp>
#include <lora/types.hpp>

#include <mpi.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

class DataParallel {
 public:
  // comm: the ranks that train together (MPI_COMM_WORLD, or e.g. MPI_COMM_SELF for one alone).
  explicit DataParallel(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int up = 0;
    MPI_Initialized(&up);
    if (!up) detail::fail("DataParallel: MPI is not initialised (call MPI_Init first)");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // This rank's rows of a global batch of `global` examples: (begin, count). Fails, alike on
  // every rank, when the ranks cannot take equal shares.
  std::pair<Index, Index> shard(Index global) const {
    if (global <= 0 || global % size_ != 0)
      detail::fail("DataParallel::shard: a global batch of ", global, " examples does not divide among ", size_,
                   " ranks; use a multiple of ", size_);
    const Index b = global / size_;
    return {rank_ * b, b};
  }

  // Every rank's parameters take rank 0's values. First checks that every rank has the same
  // parameters (names and shapes, in order); fails on every rank, naming the ranks that differ,
  // and changes nothing when not.
  template <class Scalar>
  void broadcast(const std::vector<Parameter<Scalar>>& params) {
    check_layout("DataParallel::broadcast", params);
    std::vector<Scalar>& buffer = buffer_of<Scalar>();
    fill(buffer, params, [](const Parameter<Scalar>& p) { return p.value; });
    in_pieces(buffer, [&](Scalar* at, int n) { MPI_Bcast(at, n, mpi_type<Scalar>(), 0, comm_); });
    scatter(buffer, params, false);
  }

  // The gradients of the global batch, on every rank (see the top): params' grads hold this
  // rank's g_r on entry and g on return. loss and count: this rank's mean loss and its counted
  // tokens or examples (count 0 with zero gradients for a shard with nothing to count). Returns
  // the global batch's loss and count.
  struct Reduced {
    double loss;
    double count;
  };
  template <class Scalar>
  Reduced all_reduce_gradients(const std::vector<Parameter<Scalar>>& params, double loss, double count) {
    if (layout_.empty()) detail::fail("DataParallel::all_reduce_gradients: call broadcast(params) first");
    if (layout_of(params) != layout_)
      detail::fail("DataParallel::all_reduce_gradients: the parameters are not the ones broadcast() saw");
    if (!(count >= 0)) detail::fail("DataParallel::all_reduce_gradients: count is ", count, ", expected >= 0");
    const Scalar n = Scalar(count);
    std::vector<Scalar>& buffer = buffer_of<Scalar>();
    fill(buffer, params, [&](const Parameter<Scalar>& p) { return p.grad * n; }, 2);
    const std::size_t m = buffer.size() - 2;
    buffer[m] = Scalar(loss * count);
    buffer[m + 1] = n;
    detail::fault_point("all_reduce_gradients");  // a rank dying here: tests that the job ends
    const auto t0 = std::chrono::steady_clock::now();
    in_pieces(buffer, [&](Scalar* at, int n) { MPI_Allreduce(MPI_IN_PLACE, at, n, mpi_type<Scalar>(), MPI_SUM, comm_); });
    reduce_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++reductions_;
    const Scalar loss_sum = buffer[m], total = buffer[m + 1];
    if (!(total > 0)) detail::fail("DataParallel::all_reduce_gradients: no rank counted anything in this global batch");
    for (std::size_t i = 0; i < m; ++i) buffer[i] /= total;
    scatter(buffer, params, true);
    return {double(loss_sum) / double(total), double(total)};
  }

  // Fails on every rank when some rank's parameter values differ from rank 0's (a 64-bit
  // checksum of their bytes), naming those ranks; `when` says where (e.g. "after step 40").
  template <class Scalar>
  void check_agreement(const std::vector<Parameter<Scalar>>& params, const std::string& when = "") const {
    std::uint64_t h = detail::kFnvBasis;
    for (const auto& p : params) h = detail::fnv1a(h, p.value.data(), sizeof(Scalar) * std::size_t(p.value.size()));
    std::vector<std::uint64_t> all(size_);
    MPI_Allgather(&h, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm_);
    std::string differ;
    for (int r = 1; r < size_; ++r)
      if (all[r] != all[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    if (!differ.empty())
      detail::fail("DataParallel::check_agreement: the parameters of rank(s) ", differ, " differ from rank 0's",
                   when.empty() ? "" : " ", when);
  }

  // Gives each rank its own dropout streams: rank r > 0 replaces every adapter's stream by one
  // drawn from it and r (the same on every run); rank 0 keeps its own, so that one rank trains as
  // a program without MPI does.
  template <class Scalar>
  void separate_dropout(const ModuleMap<Scalar>& modules) const {
    for (const auto& [module, layer] : modules)
      for (const std::string& name : layer->adapter_names()) layer->set_dropout_state(name, rank_stream(layer->dropout_state(name), rank_));
  }

  // Every rank's dropout streams, gathered for a checkpoint's progress (rank 0 writes it):
  // {"world_size": size, "dropout": [rank 0's words, rank 1's, ...]} (hex words, modules in
  // order). The same JSON on every rank.
  template <class Scalar>
  nlohmann::json gather_dropout(const ModuleMap<Scalar>& modules) const {
    const std::vector<std::uint64_t> mine = dropout_words(modules);
    std::vector<std::uint64_t> all(mine.size() * size_);
    MPI_Allgather(mine.data(), int(mine.size()), MPI_UINT64_T, all.data(), int(mine.size()), MPI_UINT64_T, comm_);
    nlohmann::json ranks = nlohmann::json::array();
    for (int r = 0; r < size_; ++r) {
      nlohmann::json words = nlohmann::json::array();
      for (std::size_t i = 0; i < mine.size(); ++i) words.push_back(detail::hex_word(all[r * mine.size() + i]));
      ranks.push_back(words);
    }
    return {{"world_size", size_}, {"dropout", ranks}};
  }

  // Restores what gather_dropout saved (after resume_training, which gives every rank rank 0's
  // streams). With as many ranks as saved, each rank takes its own streams back and the run
  // continues exactly; with another number of ranks, rank r separates rank 0's streams as
  // separate_dropout does (the masks then differ from an unstopped run, as they must: another
  // rank draws them). Checks the JSON first; on error nothing changes.
  template <class Scalar>
  void restore_dropout(const ModuleMap<Scalar>& modules, const nlohmann::json& saved) const {
    const std::vector<std::uint64_t> mine = dropout_words(modules);
    const auto bad = [](const std::string& what) { detail::fail("DataParallel::restore_dropout: ", what); };
    if (!saved.is_object() || !saved.contains("world_size") || !saved["world_size"].is_number_integer() ||
        !saved.contains("dropout") || !saved["dropout"].is_array() || saved["dropout"].size() != saved["world_size"].get<std::size_t>())
      bad("expected {\"world_size\": n, \"dropout\": [n arrays]}, got " + saved.dump().substr(0, 200));
    if (saved["world_size"].get<int>() != size_) return separate_dropout(modules);
    const nlohmann::json& words = saved["dropout"][rank_];
    const std::string who = "rank " + std::to_string(rank_) + "'s streams";
    if (!words.is_array() || words.size() != mine.size())
      bad(who + " do not fit this model's " + std::to_string(mine.size() / 4) + " adapters");
    std::vector<std::uint64_t> state(mine.size());
    for (std::size_t i = 0; i < state.size(); ++i)
      if (!detail::parse_hex_word(words[i], state[i])) bad(who + " are not 16-digit hex words");
    std::size_t i = 0;
    for (const auto& [module, layer] : modules)
      for (const std::string& name : layer->adapter_names()) {
        layer->set_dropout_state(name, {state[i], state[i + 1], state[i + 2], state[i + 3]});
        i += 4;
      }
  }

  // Waits for every rank (e.g. after rank 0 wrote a checkpoint, before the others read it).
  void barrier() const { MPI_Barrier(comm_); }
  // The value on rank 0, on every rank (a checkpoint's directory name, a flag).
  std::string broadcast_string(std::string s) const {
    int n = int(s.size());
    MPI_Bcast(&n, 1, MPI_INT, 0, comm_);
    s.resize(n);
    MPI_Bcast(s.data(), n, MPI_CHAR, 0, comm_);
    return s;
  }

  // What the all-reduce costs: seconds spent in it, how many, and the bytes each sends.
  double reduce_seconds() const { return reduce_seconds_; }
  long reductions() const { return reductions_; }
  std::size_t bytes_per_reduction() const { return (layout_.empty() ? 0 : layout_.back() + 2) * scalar_bytes_; }

 private:
  template <class Scalar>
  std::vector<Scalar>& buffer_of() {
    if constexpr (std::is_same_v<Scalar, float>) return buffer_f_;
    else return buffer_d_;
  }
  template <class Scalar>
  static MPI_Datatype mpi_type() {
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "DataParallel: float or double");
    return std::is_same_v<Scalar, float> ? MPI_FLOAT : MPI_DOUBLE;
  }

  // f(at, n) over the buffer in pieces of at most 2^30 elements (MPI counts are ints): one piece
  // below a billion parameters.
  template <class Scalar, class F>
  static void in_pieces(std::vector<Scalar>& buffer, F&& f) {
    constexpr std::size_t piece = std::size_t(1) << 30;
    for (std::size_t at = 0; at < buffer.size(); at += piece) f(buffer.data() + at, int(std::min(piece, buffer.size() - at)));
  }

  // The parameters' shapes (rows, cols per parameter) and running offset, and a hash of their
  // names: what every rank must agree on.
  template <class Scalar>
  static std::vector<std::size_t> layout_of(const std::vector<Parameter<Scalar>>& params) {
    std::vector<std::size_t> l;
    std::uint64_t names = detail::kFnvBasis;
    std::size_t offset = 0;
    for (const auto& p : params) {
      names = detail::fnv1a(names, p.name.data(), p.name.size() + 1);
      l.push_back(std::size_t(p.value.rows()));
      l.push_back(std::size_t(p.value.cols()));
      offset += std::size_t(p.value.size());
    }
    l.push_back(std::size_t(names));
    l.push_back(offset);  // last: the number of scalars
    return l;
  }

  template <class Scalar>
  void check_layout(const char* who, const std::vector<Parameter<Scalar>>& params) {
    const std::vector<std::size_t> mine = layout_of(params);
    std::uint64_t h = detail::kFnvBasis;
    h = detail::fnv1a(h, mine.data(), mine.size() * sizeof(std::size_t));
    std::array<std::uint64_t, 2> own{h, std::uint64_t(params.size())};
    std::vector<std::uint64_t> all(2 * size_);
    MPI_Allgather(own.data(), 2, MPI_UINT64_T, all.data(), 2, MPI_UINT64_T, comm_);
    std::string differ;
    for (int r = 1; r < size_; ++r)
      if (all[2 * r] != all[0])
        differ += (differ.empty() ? "" : ", ") + std::string("rank ") + std::to_string(r) + " (" +
                  std::to_string(all[2 * r + 1]) + " parameters)";
    if (!differ.empty())
      detail::fail(who, ": the trainable parameters (names and shapes) of ", differ, " differ from rank 0's (",
                   all[1], " parameters)");
    layout_ = mine;
    scalar_bytes_ = sizeof(Scalar);
  }

  // buffer = [f(p) flattened, for every p] + extra zeros
  template <class Scalar, class F>
  static void fill(std::vector<Scalar>& buffer, const std::vector<Parameter<Scalar>>& params, F&& f, std::size_t extra = 0) {
    std::size_t n = 0;
    for (const auto& p : params) n += std::size_t(p.value.size());
    buffer.resize(n + extra);
    Scalar* at = buffer.data();
    for (const auto& p : params) {
      MatMap<Scalar>(at, p.value.rows(), p.value.cols()) = f(p);
      at += p.value.size();
    }
  }
  template <class Scalar>
  static void scatter(const std::vector<Scalar>& buffer, const std::vector<Parameter<Scalar>>& params, bool to_grad) {
    const Scalar* at = buffer.data();
    for (auto p : params) {
      (to_grad ? p.grad : p.value) = ConstMatMap<Scalar>(at, p.value.rows(), p.value.cols());
      at += p.value.size();
    }
  }

  template <class Scalar>
  static std::vector<std::uint64_t> dropout_words(const ModuleMap<Scalar>& modules) {
    std::vector<std::uint64_t> w;
    for (const auto& [module, layer] : modules)
      for (const std::string& name : layer->adapter_names())
        for (std::uint64_t v : layer->dropout_state(name)) w.push_back(v);
    return w;
  }
  // A stream seeded (splitmix64, as every Rng) from the stream's state and the rank.
  static std::array<std::uint64_t, 4> rank_stream(const std::array<std::uint64_t, 4>& s, int rank) {
    if (rank == 0) return s;
    const std::uint64_t mixed = detail::fnv1a(detail::fnv1a(detail::kFnvBasis, s.data(), sizeof s), &rank, sizeof rank);
    return detail::Rng(mixed).state();
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::vector<std::size_t> layout_;
  std::size_t scalar_bytes_ = 0;
  double reduce_seconds_ = 0;
  long reductions_ = 0;
  std::vector<double> buffer_d_;  // the flat buffer, reused every step
  std::vector<float> buffer_f_;
};

}  // namespace lora
