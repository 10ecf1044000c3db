// A small, fully specified random generator (xoshiro256** seeded by splitmix64), so that inits
// and dropout masks are the same on every platform and standard library for a given seed.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>

namespace lora::detail {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) {
    for (auto& s : s_) {
      seed += 0x9e3779b97f4a7c15ULL;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      s = z ^ (z >> 31);
    }
  }

  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  // The generator's whole state, to save and restore a stream exactly (checkpoints). An all-zero
  // state is xoshiro's one fixed point; set_state refuses it.
  std::array<std::uint64_t, 4> state() const { return {s_[0], s_[1], s_[2], s_[3]}; }
  bool set_state(const std::array<std::uint64_t, 4>& s) {
    if ((s[0] | s[1] | s[2] | s[3]) == 0) return false;
    for (int i = 0; i < 4; ++i) s_[i] = s[i];
    return true;
  }

  // Uniform in [0, 1), 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  // Standard normal (Box–Muller; one value per call, the second is discarded for simplicity).
  double normal() {
    double u1 = 1.0 - uniform();  // (0, 1]
    double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
};

// FNV-1a over n bytes, continuing from h (start from kFnvBasis): a fixed 64-bit checksum.
inline constexpr std::uint64_t kFnvBasis = 0xcbf29ce484222325ULL;
inline std::uint64_t fnv1a(std::uint64_t h, const void* data, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ULL;
  return h;
}

// The seed of the layer at a module path, from a model's seed: every layer draws its own init
// and dropout masks (PEFT draws them all from one global stream), the same on every run.
inline std::uint64_t module_seed(std::uint64_t seed, std::string_view module) {
  return fnv1a(fnv1a(kFnvBasis, &seed, sizeof seed), module.data(), module.size());
}

}  // namespace lora::detail
