// lora::Error: every failure a user can cause throws this, with a message that names the call,
// the argument and, for shape problems, both shapes:
//   "LoraLinear::forward: X is (5, 17), expected (n, 16)"
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Concatenates its arguments with operator<< into one string.
template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(cat(std::forward<Args>(args)...));
}

// "a, b, c": a list of problems in one message.
inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// "(rows, cols)"
inline std::string shape(long long rows, long long cols) { return cat('(', rows, ", ", cols, ')'); }

}  // namespace detail
}  // namespace lora
