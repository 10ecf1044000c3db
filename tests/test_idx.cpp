#include "idx.hpp"

#include "test_util.hpp"

#include <filesystem>
#include <fstream>
#include <gtest/gtest.h>

namespace fs = std::filesystem;

namespace {

// An IDX file: header (magic 0 0 8 ndim, big-endian sizes) then the bytes, gzip-compressed
// unless plain.
std::string write_idx(const std::string& name, const std::vector<std::uint32_t>& shape, const std::vector<std::uint8_t>& data,
                      bool plain = false, std::uint8_t type = 0x08) {
  std::vector<std::uint8_t> bytes = {0, 0, type, static_cast<std::uint8_t>(shape.size())};
  for (auto n : shape)
    for (int s = 24; s >= 0; s -= 8) bytes.push_back(static_cast<std::uint8_t>(n >> s));
  bytes.insert(bytes.end(), data.begin(), data.end());
  const std::string path = (fs::temp_directory_path() / ("lora_test_idx_" + name)).string();
  if (plain) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  } else {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  }
  return path;
}

std::vector<std::uint8_t> iota_bytes(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>(i * 7);
  return v;
}

}  // namespace

TEST(Idx, ReadsGzipAndPlainImagesAndLabels) {
  for (bool plain : {false, true}) {
    const auto px = iota_bytes(3 * 2 * 4);
    const auto imgs = lora::read_idx_images<double>(write_idx(plain ? "img_plain" : "img.gz", {3, 2, 4}, px, plain));
    ASSERT_EQ(imgs.rows(), 3);
    ASSERT_EQ(imgs.cols(), 8);
    for (int i = 0; i < 24; ++i) EXPECT_EQ(imgs(i / 8, i % 8), px[i] / 255.0);
    const auto labels = lora::read_idx_labels(write_idx("lab.gz", {5}, {9, 0, 3, 3, 7}, plain));
    EXPECT_EQ(labels, (std::vector<int>{9, 0, 3, 3, 7}));
  }
}

TEST(Idx, MalformedFilesAreRefusedByName) {
  EXPECT_LORA_ERROR(lora::read_idx("/nonexistent/x.gz"), "/nonexistent/x.gz", "cannot open");
  EXPECT_LORA_ERROR(lora::read_idx(write_idx("type.gz", {2}, {1, 2}, false, 0x0D)), "type.gz", "not an unsigned-byte IDX file");
  EXPECT_LORA_ERROR(lora::read_idx(write_idx("short.gz", {3, 2, 2}, iota_bytes(11))), "short.gz", "ends inside the data");
  EXPECT_LORA_ERROR(lora::read_idx(write_idx("long.gz", {2}, {1, 2, 3})), "long.gz", "more data than the header's 2 bytes");
  EXPECT_LORA_ERROR(lora::read_idx(write_idx("zero.gz", {2, 0}, {})), "zero.gz", "dimension 1 is 0");
  EXPECT_LORA_ERROR(lora::read_idx(write_idx("huge.gz", {65536, 65536, 2}, {})), "huge.gz", "more than 1073741824 bytes");
  EXPECT_LORA_ERROR(lora::read_idx_images(write_idx("labels_as_images.gz", {2}, {1, 2})), "images need 3 dimensions");
  EXPECT_LORA_ERROR(lora::read_idx_labels(write_idx("images_as_labels.gz", {1, 1, 2}, {1, 2})), "labels need 1 dimension");
}

// Debian's dataset-fashion-mnist, when installed (CI installs it).
TEST(Idx, ReadsFashionMnistTestSet) {
  const std::string dir = "/usr/share/datasets/fashion-mnist/";
  if (!fs::exists(dir + "t10k-labels-idx1-ubyte.gz")) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  const auto images = lora::read_idx_images<float>(dir + "t10k-images-idx3-ubyte.gz");
  const auto labels = lora::read_idx_labels(dir + "t10k-labels-idx1-ubyte.gz");
  EXPECT_EQ(images.rows(), 10000);
  EXPECT_EQ(images.cols(), 784);
  ASSERT_EQ(labels.size(), 10000u);
  std::vector<int> per_class(10, 0);
  for (int l : labels) ++per_class.at(static_cast<std::size_t>(l));
  for (int c : per_class) EXPECT_EQ(c, 1000);  // the test set is balanced
  EXPECT_GE(images.minCoeff(), 0.0f);
  EXPECT_EQ(images.maxCoeff(), 1.0f);
}
