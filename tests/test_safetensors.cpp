#include <lora/safetensors.hpp>

#include "test_util.hpp"

#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>

#include <sys/resource.h>

namespace fs = std::filesystem;
using lora::Dtype;
using lora::SafeTensors;
using lora::SafeTensorsBuilder;
using MatD = lora::Mat<double>;

namespace {

std::vector<std::uint8_t> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A file with the given header text and data size (zero bytes).
std::vector<std::uint8_t> make_file(const std::string& header, std::size_t data_size, std::uint64_t n_override = 0) {
  std::uint64_t n = n_override ? n_override : header.size();
  std::vector<std::uint8_t> out(8);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_size, 0);
  return out;
}

// Files under tests/data/{peft,models} were written by Python's safetensors (PEFT and
// transformers); tests/data/recorded holds files this project's own scripts wrote.
std::vector<std::string> fixture_files(bool reference_only = false) {
  std::vector<std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(LORA_TEST_DATA))
    if (e.path().extension() == ".safetensors" &&
        !(reference_only && e.path().string().find("/recorded/") != std::string::npos))
      files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("lora_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST(SafeTensors, ReadsEveryFixture) {
  auto files = fixture_files();
  ASSERT_GE(files.size(), 15u);
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    SafeTensors st = SafeTensors::open(path);
    ASSERT_FALSE(st.tensors().empty());
    std::uint64_t covered = 0;
    for (const auto& t : st.tensors()) {
      EXPECT_EQ(t.begin, covered);
      covered = t.end;
      EXPECT_EQ(t.end - t.begin, t.numel() * lora::dtype_size(t.dtype));
      if (lora::detail::is_float_dtype(t.dtype)) {
        MatD m = st.matrix<double>(t.name);
        EXPECT_EQ(static_cast<std::uint64_t>(m.size()), t.numel());
        EXPECT_TRUE(m.allFinite());
      } else {
        EXPECT_EQ(static_cast<std::uint64_t>(st.integers(t.name).size()), t.numel());
      }
    }
    // The bytes the library saw are the bytes on disk, whichever way they were read.
    SafeTensors again = SafeTensors::from_bytes(read_all(path), path);
    EXPECT_EQ(again.tensors().size(), st.tensors().size());
    EXPECT_EQ(again.metadata(), st.metadata());
  }
}

// Reading is right only if the numbers are: the fixture's y must be the LoRA forward of its
// own tensors, computed here from what was read.
TEST(SafeTensors, FixtureValuesAreConsistent) {
  SafeTensors st = SafeTensors::open(data_path("peft/linear_basic.safetensors"));
  auto c = nlohmann::json::parse(st.metadata().at("case"));
  EXPECT_EQ(c["kind"], "linear");
  MatD W = st.matrix<double>("weight"), A = st.matrix<double>("lora_A"), B = st.matrix<double>("lora_B");
  MatD x = st.matrix<double>("x"), y = st.matrix<double>("y");
  Eigen::RowVectorXd b = st.matrix<double>("bias");
  double s = c["scaling"].get<double>();
  ASSERT_EQ(W.rows(), c["k"].get<int>());
  ASSERT_EQ(W.cols(), c["d"].get<int>());
  MatD expect = (x * W.transpose()).rowwise() + b;
  expect += s * (x * A.transpose()) * B.transpose();
  EXPECT_LT((expect - y).cwiseAbs().maxCoeff(), 1e-12);
  // Rank-3 tensors flatten their leading dimensions into rows.
  SafeTensors att = SafeTensors::open(data_path("peft/attention_self_causal.safetensors"));
  const auto& xi = att.info("x");
  ASSERT_EQ(xi.shape.size(), 3u);
  MatD xa = att.matrix<double>("x");
  EXPECT_EQ(static_cast<std::uint64_t>(xa.rows()), xi.shape[0] * xi.shape[1]);
  EXPECT_EQ(static_cast<std::uint64_t>(xa.cols()), xi.shape[2]);
}

TEST(SafeTensors, DecodesBf16LikeF32RoundedToNearestEven) {
  SafeTensors f32 = SafeTensors::open(data_path("models/tiny_llama/adapter/adapter_model.safetensors"));
  SafeTensors bf16 = SafeTensors::open(data_path("models/tiny_llama/adapter_bf16/adapter_model.safetensors"));
  ASSERT_EQ(f32.tensors().size(), bf16.tensors().size());
  int checked = 0;
  for (const auto& t : f32.tensors()) {
    ASSERT_EQ(t.dtype, Dtype::F32);
    ASSERT_EQ(bf16.info(t.name).dtype, Dtype::BF16);
    lora::Mat<float> a = f32.matrix<float>(t.name), b = bf16.matrix<float>(t.name);
    ASSERT_EQ(a.rows(), b.rows());
    for (Eigen::Index i = 0; i < a.size(); ++i)
      ASSERT_EQ(b.data()[i], static_cast<float>(Eigen::bfloat16(a.data()[i]))) << t.name << " element " << i;
    ++checked;
  }
  EXPECT_GT(checked, 10);
}

TEST(SafeTensors, ReadsIntegerIds) {
  SafeTensors st = SafeTensors::open(data_path("peft/embedding.safetensors"));
  EXPECT_EQ(st.info("ids").dtype, Dtype::I64);
  auto ids = st.integers("ids");
  auto c = nlohmann::json::parse(st.metadata().at("case"));
  EXPECT_GE(ids.minCoeff(), 0);
  EXPECT_LT(ids.maxCoeff(), c["vocab"].get<int>());
  EXPECT_LORA_ERROR(st.matrix<double>("ids"), "embedding.safetensors", "'ids'", "I64");
  EXPECT_LORA_ERROR(st.integers("weight"), "'weight'", "F64");
  EXPECT_LORA_ERROR(st.info("nope"), "no tensor 'nope'");
}

TEST(SafeTensors, RoundTripIsBitExactForEveryDtype) {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd;
  MatD d(3, 5);
  for (Eigen::Index i = 0; i < d.size(); ++i) d.data()[i] = nd(rng);
  d(0, 0) = 0.0;
  d(0, 1) = -0.0;
  d(0, 2) = std::numeric_limits<double>::infinity();
  d(0, 3) = std::numeric_limits<double>::denorm_min();
  lora::Mat<float> f = d.cast<float>();
  // Values exactly representable in the 16-bit formats, so the round trip must be exact.
  lora::Mat<float> h = f.unaryExpr([](float v) { return static_cast<float>(Eigen::half(v)); });
  lora::Mat<float> bf = f.unaryExpr([](float v) { return static_cast<float>(Eigen::bfloat16(v)); });
  lora::Mat<std::int64_t> i64(2, 3);
  i64 << std::numeric_limits<std::int64_t>::min(), -1, 0, 1, 1LL << 53, std::numeric_limits<std::int64_t>::max();
  lora::Mat<std::int32_t> i32(1, 3);
  i32 << -2147483647 - 1, 5, 2147483647;
  lora::Mat<std::uint8_t> u8(1, 3);
  u8 << 0, 128, 255;

  SafeTensorsBuilder b;
  b.add("f64", d).add("f32", f).add("f16", h, Dtype::F16).add("bf16", bf, Dtype::BF16);
  b.add("i64", i64).add("i32", i32).add("u8", u8).add("bias", f.row(1), {5});
  b.add("empty", MatD(0, 4)).metadata("format", "pt");
  auto bytes = b.serialize();
  SafeTensors st = SafeTensors::from_bytes(bytes);

  MatD d2 = st.matrix<double>("f64");
  EXPECT_EQ(std::memcmp(d2.data(), d.data(), sizeof(double) * d.size()), 0);
  EXPECT_EQ(std::memcmp(st.bytes("f32"), f.data(), sizeof(float) * f.size()), 0);
  EXPECT_EQ(st.matrix<float>("f16"), h);
  EXPECT_EQ(st.matrix<float>("bf16"), bf);
  EXPECT_EQ(st.info("f16").dtype, Dtype::F16);
  EXPECT_EQ(st.integers("i64"), i64);
  EXPECT_EQ(st.integers("i32"), i32.cast<std::int64_t>());
  EXPECT_EQ(st.integers("u8"), u8.cast<std::int64_t>());
  EXPECT_EQ(st.info("bias").shape, std::vector<std::uint64_t>{5});
  EXPECT_EQ(st.matrix<float>("bias"), f.row(1));
  EXPECT_EQ(st.info("empty").numel(), 0u);
  EXPECT_EQ(st.metadata().at("format"), "pt");
  // The header is padded to 8 bytes, so every tensor is aligned for its dtype.
  for (const auto& t : st.tensors()) EXPECT_EQ((8 + (st.bytes(t.name) - st.bytes(st.tensors()[0].name))) % lora::dtype_size(t.dtype), 0u);
  // The same tensors added in another order give the same bytes.
  SafeTensorsBuilder b2;
  b2.metadata("format", "pt").add("empty", MatD(0, 4)).add("bias", f.row(1), {5}).add("u8", u8).add("i32", i32);
  b2.add("i64", i64).add("bf16", bf, Dtype::BF16).add("f16", h, Dtype::F16).add("f32", f).add("f64", d);
  EXPECT_EQ(b2.serialize(), bytes);
}

// Every fixture was written by Python's safetensors 0.8.0: the same tensors and metadata
// written by SafeTensorsBuilder must give the same bytes.
TEST(SafeTensors, WriterReproducesTheReferenceFilesByteForByte) {
  const auto files = fixture_files(true);
  ASSERT_GE(files.size(), 15u);
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    SafeTensors st = SafeTensors::open(path);
    SafeTensorsBuilder b;
    for (const auto& t : st.tensors()) {
      const std::uint8_t* p = st.bytes(t.name);
      b.add_raw(t.name, t.dtype, t.shape, std::vector<std::uint8_t>(p, p + (t.end - t.begin)));
    }
    for (const auto& [k, v] : st.metadata()) b.metadata(k, v);
    EXPECT_TRUE(b.serialize() == read_all(path));
  }
}

TEST(SafeTensors, MapIsZeroCopyWhenDtypeMatches) {
  SafeTensors st = SafeTensors::open(data_path("peft/linear_basic.safetensors"));
  ASSERT_TRUE(st.can_map<double>("weight"));
  auto m = st.map<double>("weight");
  EXPECT_EQ(static_cast<const void*>(m.data()), static_cast<const void*>(st.bytes("weight")));
  EXPECT_EQ(MatD(m), st.matrix<double>("weight"));
  EXPECT_FALSE(st.can_map<float>("weight"));
  EXPECT_LORA_ERROR(st.map<float>("weight"), "'weight'", "F64", "F32");
  // Copies share the bytes: the map stays valid after the original is gone.
  auto copy = std::make_unique<SafeTensors>(st);
  auto m2 = copy->map<double>("x");
  st = SafeTensors::open(data_path("peft/embedding.safetensors"));
  EXPECT_TRUE(m2.allFinite());
}

TEST(SafeTensors, BuilderRejectsBadInput) {
  SafeTensorsBuilder b;
  b.add("a", MatD::Zero(2, 2));
  EXPECT_LORA_ERROR(b.add("a", MatD::Zero(1, 1)), "duplicate tensor 'a'");
  EXPECT_LORA_ERROR(b.add("b", MatD::Zero(2, 3), {4}), "'b'", "[4]", "(2, 3)");
  EXPECT_LORA_ERROR(b.add("__metadata__", MatD::Zero(1, 1)), "reserved");
  EXPECT_LORA_ERROR(b.add("c", MatD::Zero(1, 1), Dtype::I32), "'c'", "I32");
  lora::Mat<std::int64_t> big(1, 1);
  big << 300;
  EXPECT_LORA_ERROR(b.add("d", big, Dtype::U8), "'d'", "300", "U8");
  // Shapes whose element count wraps around 2^64 (to 0 here) would be written and then refused
  // by SafeTensors::open.
  const std::vector<std::uint64_t> huge = {4294967296ULL, 4294967296ULL};
  EXPECT_LORA_ERROR(b.add("e", MatD::Zero(0, 3), huge), "'e'", "overflows");
  EXPECT_LORA_ERROR(b.add_raw("f", Dtype::F32, huge, {}), "'f'", "overflows");
  EXPECT_LORA_ERROR(b.add_raw("g", Dtype::F64, {4611686018427387904ULL}, {}), "'g'", "overflows");
  b.add_raw("empty", Dtype::F32, {0, 4294967296ULL}, {});  // no elements, whatever the other dimension
  EXPECT_EQ(SafeTensors::from_bytes(b.serialize()).tensors().size(), 2u);
}

TEST(SafeTensors, SaveIsAtomic) {
  fs::path dir = temp_dir("atomic");
  std::string path = (dir / "t.safetensors").string();
  SafeTensorsBuilder small;
  small.add("x", MatD::Constant(2, 2, 1.5));
  small.save(path);
  const auto before = read_all(path);
  EXPECT_EQ(SafeTensors::open(path).matrix<double>("x"), MatD::Constant(2, 2, 1.5));

  // A write that fails part-way (file size limit) leaves the old file and no temporary behind.
  SafeTensorsBuilder large;
  large.add("x", MatD::Zero(512, 512));
  with_file_size_limit(4096, [&] { EXPECT_LORA_ERROR(large.save(path), path, "write failed"); });
  EXPECT_EQ(read_all(path), before);

  // A directory in the file's place is refused before anything is written.
  fs::create_directories(dir / "sub" / "keep");
  EXPECT_LORA_ERROR(small.save((dir / "sub").string()), "not a regular file");
  EXPECT_TRUE(fs::is_directory(dir / "sub" / "keep"));
  EXPECT_LORA_ERROR(small.save((dir / "missing" / "t.safetensors").string()), "missing", "cannot create");
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
  fs::remove_all(dir);
}

struct Malformed {
  const char* what;
  std::vector<std::uint8_t> bytes;
  std::vector<std::string> message;
};

TEST(SafeTensors, RejectsMalformedFiles) {
  auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape, int b, int e) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
           std::to_string(b) + "," + std::to_string(e) + "]}";
  };
  const std::string good = "{" + entry("a", "F32", "[2,2]", 0, 16) + "," + entry("b", "F64", "[1]", 16, 24) + "}";
  ASSERT_NO_THROW(SafeTensors::from_bytes(make_file(good, 24)));
  auto good_bytes = make_file(good, 24);
  std::vector<std::uint8_t> truncated(good_bytes.begin(), good_bytes.end() - 1);

  std::vector<Malformed> cases = {
      {"shorter than the length prefix", {1, 2, 3}, {"3 bytes, too small"}},
      {"truncated data", truncated, {"tensors cover 24 bytes but the data section holds 23"}},
      {"trailing bytes", make_file(good, 25), {"tensors cover 24 bytes but the data section holds 25"}},
      {"header too long", make_file(good, 24, 100000001), {"header length 100000001 exceeds the limit"}},
      {"header past the end", make_file(good, 24, good.size() + 30), {"runs past the end of the file"}},
      {"header not an object", make_file("[1,2]   ", 0), {"does not start with '{'"}},
      {"NUL inside the header", make_file(std::string("{}\0junk", 7), 0), {"NUL byte at offset 2"}},
      {"bad JSON", make_file("{\"a\":{\"dtype\":", 0), {"not valid JSON"}},
      {"not UTF-8", make_file("{\"\xff\":1}", 0), {"not valid JSON"}},
      {"overlapping offsets", make_file("{" + entry("a", "F32", "[4]", 0, 16) + "," + entry("b", "F32", "[2]", 8, 16) + "}", 16),
       {"tensor 'b'", "overlap"}},
      {"gap between tensors", make_file("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 12, 20) + "}", 20),
       {"tensor 'b'", "gap after offset 8"}},
      {"shape/size mismatch", make_file("{" + entry("a", "F32", "[2,3]", 0, 16) + "}", 16),
       {"tensor 'a'", "needs 24 bytes", "hold 16"}},
      {"shape overflows", make_file("{" + entry("a", "F32", "[4294967296,4294967296]", 0, 16) + "}", 16),
       {"tensor 'a'", "overflows"}},
      {"byte size overflows", make_file("{" + entry("a", "F64", "[4611686018427387904]", 0, 16) + "}", 16),
       {"tensor 'a'", "overflows the byte size"}},
      {"end before begin", make_file("{" + entry("a", "F32", "[0]", 8, 4) + "}", 8), {"tensor 'a'", "end before they begin"}},
      {"duplicate names", make_file("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("a", "F32", "[1]", 4, 8) + "}", 8),
       {"duplicate key \"a\""}},
      {"unknown dtype", make_file("{" + entry("a", "F128", "[1]", 0, 16) + "}", 16), {"tensor 'a'", "unknown dtype 'F128'"}},
      {"negative dim", make_file("{" + entry("a", "F32", "[-1]", 0, 4) + "}", 4), {"tensor 'a'", "non-negative integer"}},
      {"fractional dim", make_file("{" + entry("a", "F32", "[1.0]", 0, 4) + "}", 4), {"tensor 'a'", "non-negative integer"}},
      {"missing field", make_file("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), {"tensor 'a'", "has no 'shape'"}},
      {"one offset", make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4),
       {"tensor 'a'", "data_offsets is not an array of two"}},
      {"entry not an object", make_file("{\"a\":3}", 0), {"tensor 'a' is not an object"}},
      {"metadata not strings", make_file("{\"__metadata__\":{\"k\":1}}", 0), {"__metadata__", "'k'", "not a string"}},
      {"deep nesting", make_file("{\"a\":" + std::string(200, '[') + std::string(200, ']') + "}", 0), {"nesting deeper than 128"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<std::string> frags = c.message;
    frags.push_back("bad.safetensors");
    try {
      SafeTensors::from_bytes(c.bytes, "bad.safetensors");
      ADD_FAILURE() << "accepted";
    } catch (const lora::Error& e) {
      for (const auto& f : frags) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  }
}

TEST(SafeTensors, OpenReportsMissingFile) {
  EXPECT_LORA_ERROR(SafeTensors::open("/nonexistent/x.safetensors"), "/nonexistent/x.safetensors", "cannot open");
  EXPECT_LORA_ERROR(SafeTensors::open(LORA_TEST_DATA), "not a regular file");
}
