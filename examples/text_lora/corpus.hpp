// The demo's text: fortune cookies from Debian's fortunes packages, as bytes.
//
// A fortune file holds texts separated by lines of "%". Each text becomes BOS, its UTF-8 bytes,
// EOS; a corpus is the texts of every file of a folder (ascii-art files left out), shuffled with
// a seed, the last tenth held out. Training windows are T tokens cut from the stream at random
// starts; held-out windows tile the held-out stream. Labels at BOS are -100 (a BOS always follows
// an EOS), so the loss counts the bytes and EOS: bits per byte, EOS counted as one.
#pragma once

#include <lora/error.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace text_lora {

constexpr std::int64_t kBos = 256, kEos = 257, kVocab = 258;  // 256 bytes and two specials
using Ids = lora::Mat<std::int64_t>;

inline std::vector<std::int64_t> encode(const std::string& text) {
  std::vector<std::int64_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

inline std::string decode(const std::vector<std::int64_t>& ids) {
  std::string s;
  for (auto id : ids)
    if (id < 256) s.push_back(char(id));
  return s;
}

struct Corpus {
  std::vector<std::int64_t> train, held_out;
  std::size_t texts = 0;
};

// The fortunes of every regular file in dir (not .dat indexes, not symlinks, not ascii art).
inline std::vector<std::string> read_fortunes(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir))
    lora::detail::fail(dir.string(), " is not a folder; install Debian's fortunes packages (fortunes, fortunes-de, ...)");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_symlink() || !e.is_regular_file() || e.path().extension() == ".dat" || name.find("art") != std::string::npos) continue;
    files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());  // directory order is not stable
  std::vector<std::string> texts;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string line, text;
    while (std::getline(in, line)) {
      if (line == "%") {
        if (!text.empty()) texts.push_back(text);
        text.clear();
      } else {
        text += line + "\n";
      }
    }
    if (!text.empty()) texts.push_back(text);
  }
  if (texts.empty()) lora::detail::fail(dir.string(), " holds no fortunes");
  return texts;
}

// max_bytes > 0 keeps the first texts (after shuffling) up to about that many bytes.
inline Corpus make_corpus(const std::filesystem::path& dir, std::uint64_t seed, std::size_t max_bytes) {
  std::vector<std::string> texts = read_fortunes(dir);
  std::mt19937_64 rng(seed);
  std::shuffle(texts.begin(), texts.end(), rng);
  if (max_bytes > 0) {
    std::size_t n = 0, bytes = 0;
    while (n < texts.size() && bytes < max_bytes) bytes += texts[n++].size();
    texts.resize(n);
  }
  Corpus c;
  c.texts = texts.size();
  const std::size_t held = std::max<std::size_t>(1, texts.size() / 10);
  for (std::size_t i = 0; i < texts.size(); ++i) {
    auto& out = i + held < texts.size() ? c.train : c.held_out;
    out.push_back(kBos);
    for (auto id : encode(texts[i])) out.push_back(id);
    out.push_back(kEos);
  }
  return c;
}

inline Ids labels_for(const Ids& ids) {
  Ids labels = ids;
  for (Eigen::Index i = 0; i < labels.size(); ++i)
    if (labels.data()[i] == kBos) labels.data()[i] = -100;
  return labels;
}

// batch windows of T tokens at random starts.
inline Ids random_windows(const std::vector<std::int64_t>& stream, Eigen::Index batch, Eigen::Index T, std::mt19937_64& rng) {
  if (stream.size() < std::size_t(T) + 1) lora::detail::fail("the corpus is shorter than one window of ", T, " tokens");
  std::uniform_int_distribution<std::size_t> start(0, stream.size() - std::size_t(T));
  Ids ids(batch, T);
  for (Eigen::Index b = 0; b < batch; ++b) {
    const std::size_t s = start(rng);
    for (Eigen::Index t = 0; t < T; ++t) ids(b, t) = stream[s + std::size_t(t)];
  }
  return ids;
}

// Consecutive windows of T tokens covering the stream (at most max_windows), as rows.
inline Ids tiled_windows(const std::vector<std::int64_t>& stream, Eigen::Index T, Eigen::Index max_windows) {
  const Eigen::Index n = std::min<Eigen::Index>(max_windows, Eigen::Index(stream.size()) / T);
  if (n < 1) lora::detail::fail("the held-out text is shorter than one window of ", T, " tokens");
  Ids ids(n, T);
  for (Eigen::Index i = 0; i < ids.size(); ++i) ids.data()[i] = stream[std::size_t(i)];
  return ids;
}

}  // namespace text_lora
