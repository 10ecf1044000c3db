// IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed, read with zlib.
//
//   magic: 0x00 0x00 type ndim (type 0x08 = unsigned byte), then ndim big-endian uint32 sizes,
//   then the data, row-major.
//
// read_idx_images: (count, rows, cols) bytes -> (count, rows·cols) in [0, 1] (value / 255).
// read_idx_labels: (count) bytes -> count labels.
// Every failure (missing file, bad magic, a dimension of 0 or too large, data shorter or longer
// than the header says) throws lora::Error naming the file.
#pragma once

#include <lora/error.hpp>
#include <lora/types.hpp>

#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace lora {

struct IdxArray {
  std::vector<std::uint32_t> shape;
  std::vector<std::uint8_t> data;  // row-major, product(shape) bytes
};

namespace detail {

// gzread reads gzip and, transparently, uncompressed files.
class GzFile {
 public:
  explicit GzFile(const std::string& path) : path_(path), f_(gzopen(path.c_str(), "rb")) {
    if (!f_) fail(path, ": cannot open");
  }
  ~GzFile() { gzclose(f_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  // Reads exactly n bytes; what names them in the error.
  void read(void* out, std::size_t n, const char* what) {
    auto* p = static_cast<std::uint8_t*>(out);
    while (n > 0) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n, 1u << 30));
      const int got = gzread(f_, p, chunk);
      if (got < 0) {
        int err = 0;
        fail(path_, ": cannot read the ", what, ": ", gzerror(f_, &err));
      }
      if (got == 0) fail(path_, ": the file ends inside the ", what);
      p += got;
      n -= static_cast<std::size_t>(got);
    }
  }
  bool at_end() {
    std::uint8_t b;
    return gzread(f_, &b, 1) == 0;
  }

 private:
  std::string path_;
  gzFile f_;
};

}  // namespace detail

// Any unsigned-byte IDX file. max_bytes bounds the data a header may announce (1 GiB default).
inline IdxArray read_idx(const std::string& path, std::uint64_t max_bytes = 1ull << 30) {
  detail::GzFile f(path);
  std::uint8_t magic[4];
  f.read(magic, 4, "magic number");
  if (magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] < 1 || magic[3] > 4)
    detail::fail(path, ": not an unsigned-byte IDX file (magic ", int(magic[0]), " ", int(magic[1]), " ", int(magic[2]),
                 " ", int(magic[3]), ", expected 0 0 8 and 1 to 4 dimensions)");
  IdxArray a;
  std::uint64_t total = 1;
  for (int d = 0; d < magic[3]; ++d) {
    std::uint8_t b[4];
    f.read(b, 4, "dimensions");
    const std::uint32_t n = (std::uint32_t(b[0]) << 24) | (std::uint32_t(b[1]) << 16) | (std::uint32_t(b[2]) << 8) | b[3];
    if (n == 0) detail::fail(path, ": dimension ", d, " is 0");
    total *= n;
    if (total > max_bytes) detail::fail(path, ": the header announces more than ", max_bytes, " bytes of data");
    a.shape.push_back(n);
  }
  a.data.resize(static_cast<std::size_t>(total));
  f.read(a.data.data(), a.data.size(), "data");
  if (!f.at_end()) detail::fail(path, ": more data than the header's ", total, " bytes");
  return a;
}

// (count, rows, cols) images -> (count, rows·cols), pixel / 255.
template <class Scalar = float>
Mat<Scalar> read_idx_images(const std::string& path) {
  const IdxArray a = read_idx(path);
  if (a.shape.size() != 3) detail::fail(path, ": images need 3 dimensions (count, rows, cols), the file has ", a.shape.size());
  const Index count = a.shape[0], pixels = Index(a.shape[1]) * a.shape[2];
  Mat<Scalar> m(count, pixels);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = Scalar(a.data[static_cast<std::size_t>(i)]) / Scalar(255);
  return m;
}

inline std::vector<int> read_idx_labels(const std::string& path) {
  const IdxArray a = read_idx(path);
  if (a.shape.size() != 1) detail::fail(path, ": labels need 1 dimension, the file has ", a.shape.size());
  return std::vector<int>(a.data.begin(), a.data.end());
}

}  // namespace lora
