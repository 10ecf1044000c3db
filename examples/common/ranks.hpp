// The demos' data parallelism: under mpirun (built with LORA_MPI) each process is a rank that
// trains on its shard of every batch through lora::DataParallel (lora/distributed.hpp); started
// alone, a demo is one process that never touches MPI. Rank 0 prints and writes every file; the
// other ranks read what it wrote (checkpoints, the pre-trained model) after a barrier.
//
//   demo::Ranks ranks(argc, argv);                  MPI_Init under mpirun
//   [begin, rows] = ranks.shard(batch)              this rank's rows of a global batch
//   loss = ranks.all_reduce(params, r.loss, r.count)   after backward: the global batch's gradient
#pragma once

#ifdef LORA_EXAMPLES_MPI
#include <lora/distributed.hpp>
#endif
#include <lora/error.hpp>
#include <lora/parameter.hpp>
#include <lora/types.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace demo {

// Whether mpirun (Open MPI, MPICH or a PMI launcher) started this process.
inline bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

#ifdef LORA_EXAMPLES_MPI
using Parallel = lora::DataParallel;
#else
// Never made: a build without MPI always runs alone.
struct Parallel {
  int rank() const { return 0; }
  int size() const { return 1; }
  std::pair<Eigen::Index, Eigen::Index> shard(Eigen::Index n) const { return {0, n}; }
  template <class P>
  void broadcast(const P&) {}
  struct Reduced {
    double loss;
  };
  template <class P>
  Reduced all_reduce_gradients(const P&, double loss, double) { return {loss}; }
  template <class P>
  void check_agreement(const P&, const std::string&) const {}
  void barrier() const {}
  double reduce_seconds() const { return 0; }
  std::size_t bytes_per_reduction() const { return 0; }
};
#endif

class Ranks {
 public:
  Ranks(int& argc, char**& argv) {
#ifdef LORA_EXAMPLES_MPI
    if (launched_by_mpirun()) {
      MPI_Init(&argc, &argv);
      dp_ = std::make_unique<lora::DataParallel>();
      if (rank() != 0 && !std::freopen("/dev/null", "w", stdout)) lora::detail::fail("cannot silence rank ", rank(), "'s output");
    }
#else
    (void)argc, (void)argv;
    if (launched_by_mpirun())
      lora::detail::fail("started by mpirun, but this program was built without MPI (configure with MPI installed, LORA_MPI=ON)");
#endif
  }
  Ranks(const Ranks&) = delete;
  Ranks& operator=(const Ranks&) = delete;
  // Left by an exception (the demo failed on this rank), MPI is not finalised: the process exits
  // with an error and mpirun stops the other ranks (waiting in MPI_Finalize, they would hang).
  ~Ranks() {
#ifdef LORA_EXAMPLES_MPI
    if (dp_ && std::uncaught_exceptions() == 0) {
      dp_.reset();
      MPI_Finalize();
    }
#endif
  }

  int rank() const { return dp_ ? dp_->rank() : 0; }
  int size() const { return dp_ ? dp_->size() : 1; }
  bool writer() const { return rank() == 0; }  // rank 0 writes the files
  // This rank's (begin, rows) of a global batch of n examples; fails when the ranks cannot share it equally.
  std::pair<Eigen::Index, Eigen::Index> shard(Eigen::Index n) const { return dp_ ? dp_->shard(n) : std::pair<Eigen::Index, Eigen::Index>(0, n); }
  // Rank 0's values everywhere (and a check that every rank trains the same parameters).
  template <class Scalar>
  void broadcast(const std::vector<lora::Parameter<Scalar>>& params) {
    if (dp_) dp_->broadcast(params);
  }
  // The global batch's gradients in params and its mean loss (distributed.hpp).
  template <class Scalar>
  double all_reduce(const std::vector<lora::Parameter<Scalar>>& params, double loss, double count) {
    return dp_ ? dp_->all_reduce_gradients(params, loss, count).loss : loss;
  }
  template <class Scalar>
  void check_agreement(const std::vector<lora::Parameter<Scalar>>& params, const std::string& when) const {
    if (dp_) dp_->check_agreement(params, when);
  }
  void barrier() const {
    if (dp_) dp_->barrier();
  }
  // Seconds spent in the all-reduce so far, and the bytes of each.
  double reduce_seconds() const { return dp_ ? dp_->reduce_seconds() : 0; }
  std::size_t reduce_bytes() const { return dp_ ? dp_->bytes_per_reduction() : 0; }

 private:
  std::unique_ptr<Parallel> dp_;
};

}  // namespace demo
