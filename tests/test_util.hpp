// Small helpers shared by the tests.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/error.hpp>
#include <lora/types.hpp>

#include <gtest/gtest.h>

#include <sys/resource.h>

#include <csignal>
#include <initializer_list>
#include <string>

// Every fragment must appear in the message.
inline ::testing::AssertionResult message_has(const std::string& msg, std::initializer_list<std::string> frags) {
  for (const auto& f : frags)
    if (msg.find(f) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << f << "\"";
  return ::testing::AssertionSuccess();
}

// stmt must throw lora::Error whose message contains every given fragment.
#define EXPECT_LORA_ERROR(stmt, ...)                                      \
  do {                                                                    \
    try {                                                                 \
      stmt;                                                               \
      ADD_FAILURE() << "no lora::Error from " #stmt;                      \
    } catch (const lora::Error& e) {                                      \
      EXPECT_TRUE(message_has(e.what(), {__VA_ARGS__}));                  \
    }                                                                     \
  } while (0)

// (r, c) of scale·N(0, 1) values from seed, as M (a double matrix unless named).
template <class M = lora::Mat<double>>
M random_mat(Eigen::Index r, Eigen::Index c, std::uint64_t seed, double scale = 1.0) {
  lora::detail::Rng rng(seed);
  M m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<typename M::Scalar>(scale * rng.normal());
  return m;
}
inline lora::Mat<double> random_normal(Eigen::Index r, Eigen::Index c, std::uint64_t seed) { return random_mat(r, c, seed); }

// (r, c) of scale·U(−1, 1) values from seed.
inline lora::Mat<double> random_uniform(Eigen::Index r, Eigen::Index c, std::uint64_t seed, double scale = 1.0) {
  lora::detail::Rng rng(seed);
  lora::Mat<double> m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = scale * (2 * rng.uniform() - 1);
  return m;
}

// Runs f() with the process's file-size limit at `bytes` (SIGXFSZ ignored, so a write past it
// fails with EFBIG), then restores both.
template <class F>
void with_file_size_limit(rlim_t bytes, F f) {
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit old_limit{};
  ::getrlimit(RLIMIT_FSIZE, &old_limit);
  rlimit lim = old_limit;
  lim.rlim_cur = bytes;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  f();
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
}

inline std::string data_path(const std::string& rel) { return std::string(LORA_TEST_DATA) + "/" + rel; }

// Central differences (step eps) of loss() over every element of every parameter (anything with
// name, value and grad), each expected within tol of its gradient. Returns how many were checked.
template <class Params, class Loss>
int expect_parameter_gradients(Params params, Loss loss, double tol, double eps = 1e-6) {
  int checked = 0;
  for (auto& p : params)
    for (Eigen::Index i = 0; i < p.value.size(); ++i) {
      double& v = p.value.data()[i];
      const double keep = v;
      v = keep + eps;
      const double lp = loss();
      v = keep - eps;
      const double lm = loss();
      v = keep;
      EXPECT_NEAR(p.grad.data()[i], (lp - lm) / (2 * eps), tol) << p.name << " element " << i;
      ++checked;
    }
  return checked;
}

// Central differences of loss(x') over every element of x, expected within tol of dx.
template <class Loss>
int expect_input_gradient(const lora::Mat<double>& x, const lora::Mat<double>& dx, Loss loss, double tol,
                          const char* name = "x", double eps = 1e-6) {
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    lora::Mat<double> xp = x, xm = x;
    xp.data()[i] += eps;
    xm.data()[i] -= eps;
    EXPECT_NEAR(dx.data()[i], (loss(xp) - loss(xm)) / (2 * eps), tol) << name << " element " << i;
  }
  return static_cast<int>(x.size());
}
