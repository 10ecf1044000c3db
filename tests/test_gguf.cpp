// GGUF: the reader against a file written by gguf-py (llama.cpp's own writer,
// tests/data/gguf/make_reference.py), the writer against the same file byte for byte, round
// trips, and a table of broken files, each refused with its error. LoRA adapters for llama.cpp:
// the tiny Llama's against llama.cpp's converter (tests/data/gguf/make_adapters.sh), GPT-2's
// orientation, the one-alpha rule, refusals.
#include <lora/gguf.hpp>
#include <lora/models/gguf_adapter.hpp>
#include <lora/models/gguf_model.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/models/llama.hpp>

#include "test_util.hpp"

#include <cstdio>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

namespace {

using lora::Gguf;
using lora::GgufBuilder;
using lora::GgufType;
using lora::GgufValue;

std::vector<std::uint8_t> file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// A file in a directory of the running test's own (ctest runs the tests in parallel).
std::string temp_file(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("lora_test_gguf." + std::string(testing::UnitTest::GetInstance()->current_test_info()->name()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

// The reference file's content, written by GgufBuilder in gguf-py's order.
GgufBuilder reference_builder() {
  GgufBuilder b;
  b.metadata("general.architecture", GgufValue::string("llama"));
  auto scalar = [&](const char* key, GgufType t, double v) {
    GgufValue g;
    g.type = t;
    if (t == GgufType::f32 || t == GgufType::f64)
      g.floats = {v};
    else if (t == GgufType::i8 || t == GgufType::i16 || t == GgufType::i32 || t == GgufType::i64)
      g.ints = {std::int64_t(v)};
    else
      g.uints = {std::uint64_t(v)};
    b.metadata(key, g);
  };
  scalar("test.u8", GgufType::u8, 200);
  scalar("test.i8", GgufType::i8, -100);
  scalar("test.u16", GgufType::u16, 60000);
  scalar("test.i16", GgufType::i16, -30000);
  scalar("test.u32", GgufType::u32, 4000000000.0);
  scalar("test.i32", GgufType::i32, -2000000000.0);
  b.metadata("test.f32", GgufValue::f32(0.1f));
  b.metadata("test.bool", GgufValue::boolean(true));
  b.metadata("test.string", GgufValue::string("h\xc3\xa9llo, GGUF"));
  b.metadata("test.u64", GgufValue::u64((std::uint64_t(1) << 63) + 5));
  GgufValue i64;
  i64.type = GgufType::i64;
  i64.ints = {-(std::int64_t(1) << 62)};
  b.metadata("test.i64", i64);
  GgufValue f64;
  f64.type = GgufType::f64;
  f64.floats = {1.0 / 3.0};
  b.metadata("test.f64", f64);
  b.metadata("test.strings", GgufValue::strings_array({"a", "", "ccc"}));
  b.metadata("test.i32s", GgufValue::ints_array(GgufType::i32, {1, -2, 3}));
  b.metadata("test.f32s", GgufValue::floats_array(GgufType::f32, {0.5, -1.25}));
  GgufValue u8s;
  u8s.type = GgufType::u8;
  u8s.array = true;
  u8s.uints = {1, 2, 255};
  b.metadata("test.u8s", u8s);
  lora::Mat<float> x(2, 3);
  for (int i = 0; i < 6; ++i) x.data()[i] = (float(i) - 2.5f) / 3.0f;
  b.add("blk.0.attn_q.weight", x, lora::GgmlType::f32);
  lora::Mat<float> h(1, 4);
  h << 1.0f, -2.5f, 65504.0f, 1e-4f;
  b.add("f16", h, lora::GgmlType::f16, {4});
  lora::Mat<float> bf(1, 3);
  bf << 1.0f, -0.15625f, 3.0e38f;  // gguf-py truncated these to bf16; all three are exact in bf16 but 3e38
  b.add("bf16", bf, lora::GgmlType::bf16, {3});
  std::vector<std::uint8_t> q8(34);
  for (int i = 0; i < 34; ++i) q8[i] = std::uint8_t(i);
  b.add_raw("q8", 8, {32, 1}, q8);
  return b;
}

TEST(Gguf, ReadsWhatGgufPyWrote) {
  const Gguf g = Gguf::open(data_path("gguf/reference.gguf"));
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  ASSERT_EQ(g.metadata().size(), 17u);
  EXPECT_EQ(g.metadata()[0].first, "general.architecture");
  EXPECT_EQ(g.string("general.architecture"), "llama");
  EXPECT_EQ(g.uint("test.u8", GgufType::u8), 200u);
  EXPECT_EQ(g.integer("test.i8", GgufType::i8), -100);
  EXPECT_EQ(g.uint("test.u16", GgufType::u16), 60000u);
  EXPECT_EQ(g.integer("test.i16", GgufType::i16), -30000);
  EXPECT_EQ(g.uint("test.u32", GgufType::u32), 4000000000u);
  EXPECT_EQ(g.integer("test.i32", GgufType::i32), -2000000000);
  EXPECT_EQ(g.floating("test.f32", GgufType::f32), double(0.1f));
  EXPECT_EQ(g.uint("test.bool", GgufType::boolean), 1u);
  EXPECT_EQ(g.string("test.string"), "h\xc3\xa9llo, GGUF");
  EXPECT_EQ(g.uint("test.u64", GgufType::u64), (std::uint64_t(1) << 63) + 5);
  EXPECT_EQ(g.integer("test.i64", GgufType::i64), -(std::int64_t(1) << 62));
  EXPECT_EQ(g.floating("test.f64", GgufType::f64), 1.0 / 3.0);
  EXPECT_EQ(g.value("test.strings").strings, (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_TRUE(g.value("test.strings").array);
  EXPECT_EQ(g.value("test.i32s").ints, (std::vector<std::int64_t>{1, -2, 3}));
  EXPECT_EQ(g.value("test.f32s").floats, (std::vector<double>{0.5, -1.25}));
  EXPECT_EQ(g.value("test.u8s").uints, (std::vector<std::uint64_t>{1, 2, 255}));
  EXPECT_LORA_ERROR(g.string("test.u32"), "metadata 'test.u32' is u32, expected string");
  EXPECT_LORA_ERROR(g.uint("test.strings", GgufType::u32), "'test.strings' is an array of string, expected u32");
  EXPECT_LORA_ERROR(g.value("nope"), "no metadata key 'nope'");

  ASSERT_EQ(g.tensors().size(), 4u);
  const lora::GgufTensorInfo& q = g.info("blk.0.attn_q.weight");
  EXPECT_EQ(q.ne, (std::vector<std::uint64_t>{3, 2}));
  EXPECT_EQ(q.offset, 0u);
  EXPECT_EQ(g.info("f16").offset, 32u);  // 24 bytes padded to 32
  EXPECT_EQ(g.info("bf16").offset, 64u);
  EXPECT_EQ(g.info("q8").offset, 96u);
  EXPECT_EQ(g.info("q8").bytes, 34u);
  const lora::Mat<double> m = g.matrix<double>("blk.0.attn_q.weight");
  ASSERT_EQ(m.rows(), 2);
  ASSERT_EQ(m.cols(), 3);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(m.data()[i], double((float(i) - 2.5f) / 3.0f));
  const lora::Mat<double> h = g.matrix<double>("f16");
  EXPECT_EQ(h(0, 1), -2.5);
  EXPECT_EQ(h(0, 2), 65504.0);
  EXPECT_EQ(h(0, 3), double(float(Eigen::half(1e-4f))));
  const lora::Mat<double> bf = g.matrix<double>("bf16");
  EXPECT_EQ(bf(0, 1), -0.15625);
  EXPECT_EQ(g.bytes("q8")[33], 33);
  EXPECT_LORA_ERROR(g.matrix<float>("q8"), "tensor 'q8' has type Q8_0; only F32, F16, BF16 and F64 convert");
  EXPECT_LORA_ERROR(g.info("x"), "no tensor 'x'");
}

// gguf-py truncates float32 to bf16 (drops the low 16 bits); GgufBuilder rounds to nearest even.
// 3e38 is where the two differ, so the writer's bytes are compared with that element set apart.
TEST(Gguf, WriterReproducesGgufPyByteForByte) {
  std::vector<std::uint8_t> ours = reference_builder().serialize(), theirs = file_bytes(data_path("gguf/reference.gguf"));
  ASSERT_EQ(ours.size(), theirs.size());
  const Gguf g = Gguf::from_bytes(theirs);
  const std::size_t at = g.data_offset() + g.info("bf16").offset + 4;  // element 2 of bf16
  float v = 3.0e38f;
  std::uint32_t bits;
  std::memcpy(&bits, &v, 4);
  ASSERT_EQ(bits, 0x7f61b1e6u);  // truncated 0x7f61, rounded to nearest 0x7f62
  EXPECT_EQ(theirs[at] | theirs[at + 1] << 8, 0x7f61);
  EXPECT_EQ(ours[at] | ours[at + 1] << 8, 0x7f62);
  ours[at] = theirs[at];
  EXPECT_TRUE(ours == theirs);
}

TEST(Gguf, RoundTripsAndSavesAtomically) {
  const GgufBuilder b = reference_builder();
  const std::vector<std::uint8_t> bytes = b.serialize();
  EXPECT_EQ(bytes, reference_builder().serialize());  // deterministic
  const Gguf g = Gguf::from_bytes(bytes, "mine");
  GgufBuilder again;  // every key and tensor copied through the reader
  for (const auto& [k, v] : g.metadata()) again.metadata(k, v);
  for (const auto& t : g.tensors())
    again.add_raw(t.name, t.type, t.ne, std::vector<std::uint8_t>(g.bytes(t.name), g.bytes(t.name) + t.bytes));
  EXPECT_EQ(again.serialize(), bytes);

  const std::string path = temp_file("a.gguf");
  b.save(path);
  EXPECT_EQ(file_bytes(path), bytes);
  EXPECT_EQ(Gguf::open(path).metadata().size(), 17u);
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());

  GgufBuilder aligned;  // another alignment: every offset and the data start follow it
  aligned.metadata("general.alignment", GgufValue::u32(64));
  aligned.add("a", lora::Mat<float>::Ones(1, 3), lora::GgmlType::f32, {3});
  aligned.add("b", lora::Mat<float>::Ones(2, 2), lora::GgmlType::f16);
  const std::vector<std::uint8_t> ab = aligned.serialize();
  const Gguf ga = Gguf::from_bytes(ab);
  EXPECT_EQ(ga.alignment(), 64u);
  EXPECT_EQ(ga.info("b").offset, 64u);
  EXPECT_EQ(ab.size() % 64, 0u);
  EXPECT_EQ(ga.matrix<float>("b"), lora::Mat<float>::Ones(2, 2));
}

TEST(Gguf, BuilderRefusesBadInput) {
  GgufBuilder b;
  b.metadata("k", GgufValue::u32(1));
  EXPECT_LORA_ERROR(b.metadata("k", GgufValue::u32(2)), "metadata key 'k' set twice");
  EXPECT_LORA_ERROR(b.metadata("", GgufValue::u32(2)), "empty metadata key");
  GgufValue big;
  big.type = GgufType::u8;
  big.uints = {256};
  EXPECT_LORA_ERROR(b.metadata("big", big), "256 does not fit in u8");
  GgufValue wrong;
  wrong.type = GgufType::u32;
  wrong.ints = {1};
  EXPECT_LORA_ERROR(b.metadata("wrong", wrong), "not u32's");
  EXPECT_LORA_ERROR(b.metadata("general.alignment", GgufValue::u32(48)), "power of two");
  EXPECT_LORA_ERROR(b.add_raw(std::string(64, 'n'), 0, {1}, {0, 0, 0, 0}), "1 to 63 bytes");
  EXPECT_LORA_ERROR(b.add_raw("q", 8, {31}, std::vector<std::uint8_t>(34)), "not a multiple of Q8_0's block of 32");
  EXPECT_LORA_ERROR(b.add_raw("f", 0, {2}, {0, 0, 0, 0}), "4 bytes, expected 8 for F32");
  EXPECT_LORA_ERROR(b.add_raw("t", 99, {2}, {}), "tensor type 99 unknown");
  b.add_raw("t", 0, {1}, {0, 0, 0, 0});
  EXPECT_LORA_ERROR(b.add_raw("t", 0, {1}, {0, 0, 0, 0}), "tensor 't' added twice");
  EXPECT_LORA_ERROR(b.metadata("general.alignment", GgufValue::u32(64)), "before adding tensors");
  const std::size_t size = b.serialize().size();
  EXPECT_EQ(Gguf::from_bytes(b.serialize()).tensors().size(), 1u);  // the refusals left it as it was
  EXPECT_EQ(size, b.serialize().size());
}

// A little-endian byte writer for hand-made headers.
struct Bytes {
  std::vector<std::uint8_t> v;
  template <class T>
  Bytes& put(T x) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&x);
    v.insert(v.end(), p, p + sizeof(T));
    return *this;
  }
  Bytes& str(const std::string& s) {
    put(std::uint64_t(s.size()));
    v.insert(v.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& header(std::uint64_t tensors, std::uint64_t kv, std::uint32_t version = 3) {
    v.insert(v.end(), {'G', 'G', 'U', 'F'});
    return put(version).put(tensors).put(kv);
  }
  Bytes& tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name).put(std::uint32_t(ne.size()));
    for (auto d : ne) put(d);
    return put(type).put(offset);
  }
  Bytes& pad(std::size_t to = 32) {
    v.resize((v.size() + to - 1) / to * to, 0);
    return *this;
  }
  Bytes& zeros(std::size_t n) {
    v.resize(v.size() + n, 0);
    return *this;
  }
};

TEST(Gguf, BrokenFilesAreRefusedByName) {
  struct Case {
    const char* what;
    std::vector<std::uint8_t> bytes;
    const char* error;
  };
  const auto cut = [](std::vector<std::uint8_t> v, std::size_t n) {
    v.resize(v.size() - n);
    return v;
  };
  const auto f32_file = [](std::uint64_t offset, std::size_t data) {
    return Bytes().header(1, 0).tensor("w", {2}, 0, offset).pad().zeros(data).v;
  };
  const std::vector<Case> cases = {
      {"empty", {}, "not a GGUF file"},
      {"wrong magic", Bytes().put(std::uint32_t(0x46554746)).v, "not a GGUF file"},
      {"version 1", Bytes().header(0, 0, 1).v, "GGUF version 1 is not supported"},
      {"header cut", cut(Bytes().header(0, 0).v, 3), "file ends inside the header"},
      {"huge kv count", Bytes().header(0, std::uint64_t(1) << 60).v, "metadata count 1152921504606846976 cannot fit"},
      {"duplicate key", Bytes().header(0, 2).str("a").put(std::uint32_t(4)).put(std::uint32_t(1)).str("a").put(std::uint32_t(4)).put(std::uint32_t(1)).v, "metadata key 'a' appears twice"},
      {"empty key", Bytes().header(0, 1).str("").put(std::uint32_t(4)).put(std::uint32_t(1)).v, "metadata key 0 is empty"},
      {"unknown value type", Bytes().header(0, 1).str("a").put(std::uint32_t(13)).put(std::uint32_t(1)).v, "metadata 'a': value type 13 unknown"},
      {"nested array", Bytes().header(0, 1).str("a").put(std::uint32_t(9)).put(std::uint32_t(9)).put(std::uint64_t(0)).zeros(8).v, "nested arrays"},
      {"array too long", Bytes().header(0, 1).str("a").put(std::uint32_t(9)).put(std::uint32_t(4)).put(std::uint64_t(1000)).zeros(8).v, "array of 1000 elements runs past the end"},
      {"bool 2", Bytes().header(0, 1).str("a").put(std::uint32_t(7)).put(std::uint8_t(2)).v, "bool value 2, expected 0 or 1"},
      {"string past the end", Bytes().header(0, 1).str("a").put(std::uint32_t(8)).put(std::uint64_t(100)).zeros(4).v, "string of 100 bytes runs past the end"},
      {"value cut", Bytes().header(0, 1).str("a").put(std::uint32_t(10)).zeros(4).v, "file ends inside metadata 'a'"},
      {"alignment 48", Bytes().header(0, 1).str("general.alignment").put(std::uint32_t(4)).put(std::uint32_t(48)).v, "general.alignment 48 is not a power of two"},
      {"alignment as u64", Bytes().header(0, 1).str("general.alignment").put(std::uint32_t(10)).put(std::uint64_t(32)).v, "'general.alignment' is u64, expected u32"},
      {"huge tensor count", Bytes().header(std::uint64_t(1) << 40, 0).zeros(64).v, "tensor count 1099511627776 cannot fit"},
      {"name of 64 bytes", Bytes().header(1, 0).tensor(std::string(64, 'n'), {2}, 0, 0).pad().zeros(8).v, "name of 64 bytes, the limit is 63"},
      {"empty tensor name", Bytes().header(1, 0).tensor("", {2}, 0, 0).pad().zeros(8).v, "tensor info 0 has an empty name"},
      {"duplicate tensor", Bytes().header(2, 0).tensor("w", {2}, 0, 0).tensor("w", {2}, 0, 32).pad().zeros(40).v, "tensor 'w' appears twice"},
      {"no dimensions", Bytes().header(1, 0).tensor("w", {}, 0, 0).pad().v, "tensor 'w': 0 dimensions, expected 1 to 4"},
      {"5 dimensions", Bytes().header(1, 0).tensor("w", {1, 1, 1, 1, 1}, 0, 0).pad().zeros(4).v, "5 dimensions, expected 1 to 4"},
      {"dimensions overflow", Bytes().header(1, 0).tensor("w", {std::uint64_t(1) << 40, std::uint64_t(1) << 40}, 0, 0).pad().v, "tensor 'w': dimensions overflow"},
      {"unknown tensor type", Bytes().header(1, 0).tensor("w", {2}, 99, 0).pad().zeros(8).v, "tensor 'w': tensor type 99 unknown"},
      {"Q8_0 row of 31", Bytes().header(1, 0).tensor("w", {31}, 8, 0).pad().zeros(34).v, "ne[0] = 31 is not a multiple of Q8_0's block of 32"},
      {"offset not the running total", f32_file(32, 64), "tensor 'w': offset 32, expected 0"},
      {"overlapping tensors", Bytes().header(2, 0).tensor("a", {16}, 0, 0).tensor("b", {2}, 0, 32).pad().zeros(96).v, "tensor 'b': offset 32, expected 64"},
      {"data cut", f32_file(0, 4), "tensor 'w' ends at byte 72, past the end of the file (68 bytes)"},
      {"trailing bytes", f32_file(0, 33), "1 bytes after the last tensor"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_LORA_ERROR(Gguf::from_bytes(c.bytes, "broken.gguf"), "broken.gguf: ", c.error);
  }
  // The same layouts made valid are accepted: the table's errors come from the one broken field.
  EXPECT_NO_THROW(Gguf::from_bytes(f32_file(0, 8)));
  EXPECT_NO_THROW(Gguf::from_bytes(f32_file(0, 32)));  // padded to the alignment, as gguf-py writes
  EXPECT_NO_THROW(Gguf::from_bytes(Bytes().header(0, 1).str("a").put(std::uint32_t(7)).put(std::uint8_t(1)).v));
  EXPECT_NO_THROW(Gguf::from_bytes(Bytes().header(1, 0).tensor("w", {32}, 8, 0).pad().zeros(34).v));
  EXPECT_LORA_ERROR(Gguf::open("/nonexistent/x.gguf"), "/nonexistent/x.gguf: cannot open");
}


// The tensors of got are ref's: same names, ne, type and bytes (F32 `approx` within an ulp).
void same_tensors(const Gguf& got, const Gguf& ref, const std::string& approx = "") {
  ASSERT_EQ(got.tensors().size(), ref.tensors().size());
  for (const auto& t : ref.tensors()) {
    SCOPED_TRACE(t.name);
    ASSERT_TRUE(got.contains(t.name));
    const lora::GgufTensorInfo& u = got.info(t.name);
    EXPECT_EQ(u.ne, t.ne);
    EXPECT_EQ(u.type, t.type);
    if (t.name != approx) {
      EXPECT_EQ(std::memcmp(got.bytes(t.name), ref.bytes(t.name), t.bytes), 0);
      continue;
    }
    const lora::Mat<float> a = got.matrix<float>(t.name), b = ref.matrix<float>(t.name);
    for (lora::Index k = 0; k < a.size(); ++k) EXPECT_LE(std::abs(a(k) - b(k)), std::numeric_limits<float>::epsilon() * std::abs(b(k)));
  }
}

// Every tensor of ref in got, same ne, type and bytes; the adapter keys equal.
void same_adapter(const Gguf& got, const Gguf& ref) {
  for (const char* key : {"general.architecture", "general.type", "adapter.type"}) EXPECT_EQ(got.string(key), ref.string(key)) << key;
  EXPECT_EQ(got.floating("adapter.lora.alpha", GgufType::f32), ref.floating("adapter.lora.alpha", GgufType::f32));
  same_tensors(got, ref);
}

// The tiny Llama's PEFT adapter (r 4 on every linear) as llama.cpp's convert_lora_to_gguf.py
// writes it: names, shapes, q/k's lora_b rows in llama.cpp's rotary order, values bit for bit.
TEST(GgufAdapter, LlamaMatchesLlamaCppsConverter) {
  const std::string dir = data_path("models/tiny_llama");
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  lora::LlamaModel<float> model(dir, &config);
  model.load_adapter(dir + "/adapter");
  const std::string path = temp_file("llama.gguf");
  lora::save_gguf_adapter(path, model.config(), model.modules());
  const Gguf ours = Gguf::open(path), ref = Gguf::open(data_path("gguf/tiny_llama_adapter.gguf"));
  same_adapter(ours, ref);
  EXPECT_EQ(ours.floating("adapter.lora.alpha", GgufType::f32), 8.0);
  // q_proj's B rows moved (heads of 8 rows: 0 4 1 5 2 6 3 7), v_proj's not
  const lora::Mat<float> bq = model.modules().at("model.layers.0.self_attn.q_proj").lora_B(), bv = model.modules().at("model.layers.0.self_attn.v_proj").lora_B();
  const lora::Mat<float> gq = ours.matrix<float>("blk.0.attn_q.weight.lora_b"), gv = ours.matrix<float>("blk.0.attn_v.weight.lora_b");
  EXPECT_EQ(gq.row(1), bq.row(4));
  EXPECT_EQ(gq.row(8 + 6), bq.row(8 + 3));
  EXPECT_EQ(gv, bv);
  lora::save_gguf_adapter(path, model.config(), model.modules(), lora::GgmlType::bf16);
  const lora::Mat<float> a16 = Gguf::open(path).matrix<float>("blk.1.ffn_up.weight.lora_a");
  EXPECT_EQ(a16, model.modules().at("model.layers.1.mlp.up_proj").lora_A().cast<Eigen::bfloat16>().cast<float>());
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());
}

// GPT-2's Conv1D layers: lora_a ne = {in, r}, lora_b ne = {r, out} with A and B as PEFT holds
// them, as llama.cpp checks against its (transposed) weights: attn_qkv is ne {32, 96}.
TEST(GgufAdapter, Gpt2FactorsGoInAsPeftHoldsThem) {
  const std::string dir = data_path("models/tiny_gpt2");
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  lora::Gpt2Model<float> model(dir, &config);
  model.load_adapter(dir + "/adapter");
  const std::string path = temp_file("gpt2.gguf");
  lora::save_gguf_adapter(path, model.config(), model.modules());
  const Gguf g = Gguf::open(path);
  EXPECT_EQ(g.string("general.architecture"), "gpt2");
  EXPECT_EQ(g.tensors().size(), 16u);
  EXPECT_EQ(g.info("blk.0.attn_qkv.weight.lora_a").ne, (std::vector<std::uint64_t>{32, 4}));
  EXPECT_EQ(g.info("blk.0.attn_qkv.weight.lora_b").ne, (std::vector<std::uint64_t>{4, 96}));
  EXPECT_EQ(g.info("blk.1.ffn_down.weight.lora_a").ne, (std::vector<std::uint64_t>{128, 4}));
  const auto& attn = model.modules().at("transformer.h.0.attn.c_attn");
  EXPECT_EQ(g.matrix<float>("blk.0.attn_qkv.weight.lora_a"), attn.lora_A());
  EXPECT_EQ(g.matrix<float>("blk.0.attn_qkv.weight.lora_b"), attn.lora_B());
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());
}

// One alpha per file: a uniform rsLoRA adapter gets alpha·√r and unchanged factors; a layer whose
// alpha differs (alpha_pattern) has its B scaled so that llama.cpp's alpha / r gives its scale.
TEST(GgufAdapter, OneAlphaServesEveryLayer) {
  const std::string dir = data_path("models/tiny_llama");
  const auto rs = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true,
      "target_modules": ["q_proj", "v_proj"]})");
  lora::LlamaModel<double> a(dir, &rs);
  for (const auto& [path, layer] : a.modules()) layer->set_lora_B(random_mat(layer->out_features(), 4, 5));
  const std::string file = temp_file("rs.gguf");
  lora::save_gguf_adapter(file, a.config(), a.modules());
  const Gguf g = Gguf::open(file);
  EXPECT_EQ(g.floating("adapter.lora.alpha", GgufType::f32), double(float(8.0 * 2.0)));  // alpha·√4
  EXPECT_EQ(g.matrix<double>("blk.0.attn_v.weight.lora_b"), a.modules().at("model.layers.0.self_attn.v_proj").lora_B().cast<float>().cast<double>());

  const auto pat = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
      "target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"model.layers.1.self_attn.v_proj": 2}})");
  lora::LlamaModel<double> b(dir, &pat);
  for (const auto& [path, layer] : b.modules()) layer->set_lora_B(random_mat(layer->out_features(), 4, 6));
  lora::save_gguf_adapter(file, b.config(), b.modules());
  const Gguf h = Gguf::open(file);
  const double alpha = h.floating("adapter.lora.alpha", GgufType::f32);
  const lora::Mat<double> b1 = b.modules().at("model.layers.1.self_attn.v_proj").lora_B(), b0 = b.modules().at("model.layers.0.self_attn.v_proj").lora_B();
  // the file's scale for each layer, alpha / r, times its B: the layer's s·B (s = 2/4 and 8/4)
  const lora::Mat<double> g1 = h.matrix<double>("blk.1.attn_v.weight.lora_b"), g0 = h.matrix<double>("blk.0.attn_v.weight.lora_b");
  EXPECT_LT((alpha / 4 * g1 - 0.5 * b1).cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_LT((alpha / 4 * g0 - 2.0 * b0).cwiseAbs().maxCoeff(), 1e-6);
  std::filesystem::remove_all(std::filesystem::path(file).parent_path());
}

TEST(GgufAdapter, RefusesWhatLlamaCppCannotLoad) {
  const std::string dir = data_path("models/tiny_llama");
  const auto dora = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true,
      "target_modules": ["q_proj"]})");
  lora::LlamaModel<float> a(dir, &dora);
  const std::string file = temp_file("refused.gguf");
  EXPECT_LORA_ERROR(lora::save_gguf_adapter(file, a.config(), a.modules()), "model.layers.0.self_attn.q_proj is DoRA");
  EXPECT_FALSE(std::filesystem::exists(file));
  lora::LmConfig other = a.config();
  other.model_type = "mistral";
  EXPECT_LORA_ERROR(lora::save_gguf_adapter(file, other, a.modules()), "model_type 'mistral'");
  const auto cfg = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})");
  lora::LlamaModel<float> b(dir, &cfg);
  EXPECT_LORA_ERROR(lora::save_gguf_adapter(file, b.config(), b.modules(), lora::GgmlType::f64), "dtype must be F32, F16 or BF16");
  EXPECT_LORA_ERROR(lora::save_gguf_adapter(file, b.config(), b.modules(), lora::GgmlType::f32, "other"),
                    "model.layers.0.self_attn.q_proj has no adapter 'other'");
  EXPECT_FALSE(std::filesystem::exists(file));
  std::filesystem::remove_all(std::filesystem::path(file).parent_path());
}


// The tiny Llama as a GGUF model: llama.cpp's keys and names, every weight as in the checkpoint
// but q/k's rows (llama.cpp's rotary order), no tokenizer ("no_vocab" with llama.vocab_size).
TEST(GgufModel, LlamaCheckpointAsLlamaCppNamesIt) {
  const std::string dir = data_path("models/tiny_llama"), file = temp_file("model.gguf");
  lora::save_gguf_model(dir, file);
  const Gguf g = Gguf::open(file);
  const lora::SafeTensors st = lora::SafeTensors::open(dir + "/model.safetensors");
  EXPECT_EQ(g.string("general.architecture"), "llama");
  EXPECT_EQ(g.string("tokenizer.ggml.model"), "no_vocab");
  EXPECT_EQ(g.uint("llama.vocab_size", GgufType::u32), 64u);
  EXPECT_EQ(g.uint("llama.block_count", GgufType::u32), 2u);
  EXPECT_EQ(g.uint("llama.attention.head_count_kv", GgufType::u32), 2u);
  EXPECT_EQ(g.floating("llama.attention.layer_norm_rms_epsilon", GgufType::f32), double(1e-5f));
  EXPECT_EQ(g.tensors().size(), 2u + 2 * 9 + 1);
  EXPECT_EQ(g.info("token_embd.weight").ne, (std::vector<std::uint64_t>{32, 64}));
  EXPECT_EQ(g.info("blk.1.attn_k.weight").ne, (std::vector<std::uint64_t>{32, 16}));
  EXPECT_EQ(g.info("blk.0.ffn_norm.weight").ne, (std::vector<std::uint64_t>{32}));
  EXPECT_EQ(g.matrix<float>("output.weight"), st.matrix<float>("lm_head.weight"));
  EXPECT_EQ(g.matrix<float>("blk.1.ffn_down.weight"), st.matrix<float>("model.layers.1.mlp.down_proj.weight"));
  const lora::Mat<float> k = st.matrix<float>("model.layers.0.self_attn.k_proj.weight"), gk = g.matrix<float>("blk.0.attn_k.weight");
  EXPECT_EQ(gk.row(2), k.row(1));  // head 0: rows 0 4 1 5 2 6 3 7
  EXPECT_EQ(gk.row(8 + 3), k.row(8 + 5));
  lora::save_gguf_model(dir, file, lora::GgmlType::f16);
  EXPECT_EQ(Gguf::open(file).info("blk.0.attn_v.weight").type, 1u);
  EXPECT_EQ(Gguf::open(file).info("blk.0.attn_norm.weight").type, 0u);  // norms stay F32
  EXPECT_LORA_ERROR(lora::save_gguf_model(data_path("models/tiny_llama"), file, lora::GgmlType::f64), "dtype must be F32, F16 or BF16");
  std::filesystem::remove_all(std::filesystem::path(file).parent_path());
}

// The three tiny checkpoints as llama.cpp's own convert_hf_to_gguf.py writes them
// (tests/data/gguf/make_models.py): every tensor with the same name, ne, type and bytes
// (rope_freqs within 1 ulp: the converter computes it in float32), every key of the reference
// with the same type and value, except general.name / size_label / quantization_version
// (descriptive) and the tokenizer model ("none" there, its synonym "no_vocab" here).
TEST(GgufModel, MatchesLlamaCppsConverter) {
  for (const char* name : {"tiny_llama", "tiny_llama_gqa1", "tiny_gpt2"}) {
    SCOPED_TRACE(name);
    const std::string file = temp_file(std::string(name) + ".gguf");
    lora::save_gguf_model(data_path(std::string("models/") + name), file);
    const Gguf ours = Gguf::open(file), ref = Gguf::open(data_path(std::string("gguf/") + name + "_model.gguf"));
    same_tensors(ours, ref, "rope_freqs.weight");
    for (const auto& [key, value] : ref.metadata()) {
      if (key == "general.name" || key == "general.size_label" || key == "general.quantization_version") continue;
      SCOPED_TRACE(key);
      ASSERT_TRUE(ours.has(key));
      if (key == "tokenizer.ggml.model")
        EXPECT_EQ(ours.value(key).strings[0], "no_vocab");
      else
        EXPECT_TRUE(ours.value(key) == value);
    }
  }
}

// The GQA Llama (one KV head, attention and MLP biases, tied head, llama3 rotary scaling): the
// biases under llama.cpp's names (q/k's in its rotary order), no output.weight, and rope_freqs,
// the factor llama.cpp divides each frequency by: transformers' inv_freq / scaled inv_freq.
TEST(GgufModel, LlamaBiasesAndLlama3Rope) {
  const std::string dir = data_path("models/tiny_llama_gqa1"), file = temp_file("model.gguf");
  lora::save_gguf_model(dir, file);
  const Gguf g = Gguf::open(file);
  const lora::SafeTensors st = lora::SafeTensors::open(dir + "/model.safetensors");
  EXPECT_EQ(g.tensors().size(), 1u + 1 + 2 * 16 + 1);  // rope_freqs, token_embd, 16 per block, output_norm
  EXPECT_FALSE(g.contains("output.weight"));
  EXPECT_EQ(g.info("blk.0.attn_k.bias").ne, (std::vector<std::uint64_t>{8}));
  EXPECT_EQ(g.info("blk.0.attn_k.bias").type, 0u);
  const lora::Mat<float> kb = st.matrix<float>("model.layers.1.self_attn.k_proj.bias"), gkb = g.matrix<float>("blk.1.attn_k.bias");
  EXPECT_EQ(gkb(0, 1), kb(0, 4));  // one head of 8: 0 4 1 5 2 6 3 7
  EXPECT_EQ(gkb(0, 6), kb(0, 3));
  EXPECT_EQ(g.matrix<float>("blk.0.ffn_down.bias"), st.matrix<float>("model.layers.0.mlp.down_proj.bias"));
  EXPECT_EQ(g.matrix<float>("blk.1.attn_output.bias"), st.matrix<float>("model.layers.1.self_attn.o_proj.bias"));
  // theta 500000, head_dim 8, factor 8, low/high 1/4, original context 16
  const lora::Mat<double> f = g.matrix<double>("rope_freqs.weight");
  ASSERT_EQ(f.cols(), 4);
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < 4; ++i) {
    const double inv = std::pow(500000.0, -2.0 * i / 8), wavelen = 2 * pi / inv;
    double scaled = wavelen > 16 ? inv / 8 : inv;
    if (wavelen >= 4 && wavelen <= 16) {
      const double smooth = (16 / wavelen - 1) / (4 - 1);
      scaled = (1 - smooth) * scaled / 8 + smooth * scaled;
    }
    EXPECT_NEAR(f(0, i), inv / scaled, 1e-6) << i;
  }
  EXPECT_NEAR(f(0, 0), 1.73594, 1e-5);  // 1 / ((1 - s) / 8 + s), s = (16 / 2π - 1) / 3: the one between the limits
  EXPECT_EQ(f(0, 3), 8.0);
  std::filesystem::remove_all(std::filesystem::path(file).parent_path());
}

// GPT-2 as llama.cpp's gpt2: Conv1D weights transposed to (out, in), every bias and norm in F32,
// the position embedding, n_inner as feed_forward_length, the head tied (no output.weight).
TEST(GgufModel, Gpt2CheckpointAsLlamaCppNamesIt) {
  const std::string dir = data_path("models/tiny_gpt2"), file = temp_file("gpt2.gguf");
  lora::save_gguf_model(dir, file, lora::GgmlType::bf16);
  const Gguf g = Gguf::open(file);
  const lora::SafeTensors st = lora::SafeTensors::open(dir + "/model.safetensors");
  EXPECT_EQ(g.string("general.architecture"), "gpt2");
  EXPECT_EQ(g.uint("gpt2.context_length", GgufType::u32), 32u);
  EXPECT_EQ(g.uint("gpt2.feed_forward_length", GgufType::u32), 128u);
  EXPECT_EQ(g.uint("gpt2.vocab_size", GgufType::u32), 64u);
  EXPECT_EQ(g.uint("general.file_type", GgufType::u32), 32u);
  EXPECT_EQ(g.floating("gpt2.attention.layer_norm_epsilon", GgufType::f32), double(1e-5f));
  EXPECT_EQ(g.tensors().size(), 2u + 2 * 12 + 2);
  EXPECT_FALSE(g.contains("output.weight"));
  EXPECT_EQ(g.info("blk.0.attn_qkv.weight").ne, (std::vector<std::uint64_t>{32, 96}));
  EXPECT_EQ(g.info("blk.0.attn_qkv.weight").type, 30u);
  EXPECT_EQ(g.info("blk.1.ffn_down.weight").ne, (std::vector<std::uint64_t>{128, 32}));
  EXPECT_EQ(g.info("position_embd.weight").ne, (std::vector<std::uint64_t>{32, 32}));
  const lora::Mat<float> w = st.matrix<float>("transformer.h.1.mlp.c_fc.weight");  // (in 32, out 128)
  EXPECT_EQ(g.matrix<float>("blk.1.ffn_up.weight"), lora::Mat<float>(w.transpose()).cast<Eigen::bfloat16>().cast<float>());
  EXPECT_EQ(g.info("blk.1.ffn_up.bias").type, 0u);
  EXPECT_EQ(g.matrix<float>("blk.1.ffn_up.bias"), st.matrix<float>("transformer.h.1.mlp.c_fc.bias"));
  EXPECT_EQ(g.matrix<float>("output_norm.bias"), st.matrix<float>("transformer.ln_f.bias"));
  std::filesystem::remove_all(std::filesystem::path(file).parent_path());
}


// Back from GGUF: llama.cpp's converter's file and ours load into the layers with the PEFT
// adapter's factors, bit for bit (f32), and the same logits; bad files change nothing.
TEST(GgufAdapter, LoadsBackIntoTheLayers) {
  const std::string dir = data_path("models/tiny_llama");
  const auto config = lora::PeftConfig::read(dir + "/adapter/adapter_config.json");
  lora::LlamaModel<float> peft(dir, &config), back(dir, &config);
  peft.load_adapter(dir + "/adapter");
  lora::load_gguf_adapter(data_path("gguf/tiny_llama_adapter.gguf"), back.config(), back.modules());
  for (const auto& [path, layer] : peft.modules()) {
    SCOPED_TRACE(path);
    EXPECT_EQ(back.modules().at(path).lora_A(), layer->lora_A());
    EXPECT_EQ(back.modules().at(path).lora_B(), layer->lora_B());
    EXPECT_EQ(back.modules().at(path).scaling(), layer->scaling());
  }
  const lora::Mat<std::int64_t> ids = lora::SafeTensors::open(dir + "/io.safetensors").integers("input_ids");
  EXPECT_EQ(back.forward(ids), peft.forward(ids));

  const std::string file = temp_file("back.gguf");
  lora::save_gguf_adapter(file, peft.config(), peft.modules());
  lora::LlamaModel<float> again(dir, &config);
  lora::load_gguf_adapter(file, again.config(), again.modules());
  EXPECT_EQ(again.forward(ids), peft.forward(ids));

  // a file for another architecture, a layer the file lacks: refused, the layers unchanged
  const auto wider = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]})");
  lora::LlamaModel<float> more(dir, &wider);
  const lora::Mat<float> b0 = more.modules().at("model.layers.0.self_attn.q_proj").lora_B();
  EXPECT_LORA_ERROR(lora::load_gguf_adapter(file, more.config(), more.modules()), "lm_head has no lora_a and lora_b pair in the file");
  EXPECT_EQ(more.modules().at("model.layers.0.self_attn.q_proj").lora_B(), b0);
  lora::LmConfig gpt = again.config();
  gpt.model_type = "gpt2";
  EXPECT_LORA_ERROR(lora::load_gguf_adapter(file, gpt, again.modules()), "general.architecture is not \"gpt2\"");
  EXPECT_LORA_ERROR(lora::load_gguf_adapter(data_path("gguf/reference.gguf"), again.config(), again.modules()),
                    "general.type is missing", "adapter.type is missing");
  std::filesystem::remove_all(std::filesystem::path(file).parent_path());
}

// PEFT directory -> GGUF -> PEFT directory without the base weights: the GGUF file is llama.cpp's
// converter's (tensors bit for bit) and byte-stable, the directory comes back byte for byte (F32
// and BF16, Llama and GPT-2) with target_modules as PEFT's users write them.
TEST(GgufAdapter, PeftDirectoryToGgufAndBack) {
  const std::string llama = data_path("models/tiny_llama"), gpt2 = data_path("models/tiny_gpt2");
  const std::string g1 = temp_file("a.gguf"), g2 = temp_file("b.gguf"), back = temp_file("back");
  const lora::LmConfig lc = lora::LmConfig::read(llama), gc = lora::LmConfig::read(gpt2);
  lora::peft_to_gguf_adapter(llama + "/adapter", g1, lc);
  same_adapter(Gguf::open(g1), Gguf::open(data_path("gguf/tiny_llama_adapter.gguf")));
  lora::gguf_to_peft_adapter(g1, back, lc, lora::Dtype::F32, llama);
  EXPECT_EQ(file_bytes(back + "/adapter_model.safetensors"), file_bytes(llama + "/adapter/adapter_model.safetensors"));
  const lora::PeftConfig pc = lora::PeftConfig::read(back + "/adapter_config.json");
  EXPECT_EQ(pc.r, 4);
  EXPECT_EQ(pc.lora_alpha, 8);
  EXPECT_EQ(pc.target_modules, (std::vector<std::string>{"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}));
  EXPECT_EQ(pc.raw["task_type"], "CAUSAL_LM");
  EXPECT_EQ(pc.raw["base_model_name_or_path"], llama);
  lora::peft_to_gguf_adapter(back, g2, lc);
  EXPECT_EQ(file_bytes(g2), file_bytes(g1));

  // PEFT's copy of an adapted head's base weight stays behind; the head's pair goes to output.weight
  lora::peft_to_gguf_adapter(llama + "/adapter_head", g1, lc);
  const Gguf head = Gguf::open(g1);
  EXPECT_EQ(head.tensors().size(), 2u * (2 * 2 + 1));
  EXPECT_EQ(head.info("output.weight.lora_b").ne, (std::vector<std::uint64_t>{4, 64}));

  lora::peft_to_gguf_adapter(gpt2 + "/adapter_bf16", g1, gc, lora::GgmlType::bf16);
  EXPECT_EQ(Gguf::open(g1).info("blk.1.attn_qkv.weight.lora_b").type, 30u);
  lora::gguf_to_peft_adapter(g1, back, gc, lora::Dtype::BF16);
  EXPECT_EQ(file_bytes(back + "/adapter_model.safetensors"), file_bytes(gpt2 + "/adapter_bf16/adapter_model.safetensors"));
  const lora::PeftConfig pg = lora::PeftConfig::read(back + "/adapter_config.json");
  EXPECT_TRUE(pg.fan_in_fan_out);
  EXPECT_EQ(pg.target_modules, (std::vector<std::string>{"c_attn", "c_fc", "c_proj"}));
  EXPECT_TRUE(pg.raw["base_model_name_or_path"].is_null());

  // only some layers' q_proj: full paths, as the short name would select the others too
  const auto one = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 6, "lora_alpha": 4,
      "target_modules": ["model.layers.1.self_attn.q_proj"]})");
  lora::LlamaModel<float> m(llama, &one);
  m.modules().at("model.layers.1.self_attn.q_proj").set_lora_B(random_mat(32, 6, 3).cast<float>());
  lora::save_gguf_adapter(g1, m.config(), m.modules());
  lora::gguf_to_peft_adapter(g1, back, lc);
  const lora::PeftConfig po = lora::PeftConfig::read(back + "/adapter_config.json");
  EXPECT_EQ(po.target_modules, (std::vector<std::string>{"model.layers.1.self_attn.q_proj"}));
  EXPECT_EQ(po.r, 6);
  lora::LlamaModel<float> again(llama, &po);
  again.load_adapter(back);
  EXPECT_EQ(again.modules().at("model.layers.1.self_attn.q_proj").lora_B(), m.modules().at("model.layers.1.self_attn.q_proj").lora_B());
  std::filesystem::remove_all(std::filesystem::path(g1).parent_path());
}

// What a GGUF adapter cannot hold or llama.cpp would not load is refused by name, and nothing is
// written: DoRA, trained base tensors, q/k without head counts, another model's shapes, layers
// the model lacks.
TEST(GgufAdapter, ConversionRefusesBadInput) {
  const std::string llama = data_path("models/tiny_llama");
  const lora::LmConfig lc = lora::LmConfig::read(llama);
  const std::string out = temp_file("out.gguf"), dora = temp_file("dora"), back = temp_file("back");
  const auto dc = lora::PeftConfig::from_json(R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true, "target_modules": ["v_proj"]})");
  lora::LlamaModel<float> d(llama, &dc);
  d.save_adapter(dora, dc);
  EXPECT_LORA_ERROR(lora::peft_to_gguf_adapter(dora, out, lc), "use_dora is true", "is DoRA's magnitude");
  EXPECT_LORA_ERROR(lora::peft_to_gguf_adapter(temp_file("none"), out, lc), "adapter_config.json does not exist");
  lora::LmConfig bare;
  bare.model_type = "llama";
  EXPECT_LORA_ERROR(lora::peft_to_gguf_adapter(llama + "/adapter", out, bare), "blk.0.attn_q.weight: its rows are reordered per head");
  EXPECT_LORA_ERROR(lora::peft_to_gguf_adapter(llama + "/adapter", out, lora::LmConfig::read(data_path("models/tiny_llama_gqa1"))),
                    "model.layers.0.self_attn.k_proj: A 4x32 and B 16x4 do not make a LoRA pair of a 24 -> 8 layer");
  lora::LmConfig one_layer = lc;
  one_layer.num_hidden_layers = 1;
  EXPECT_LORA_ERROR(lora::peft_to_gguf_adapter(llama + "/adapter", out, one_layer), "model.layers.1.mlp.down_proj: the model has 1 layers");
  EXPECT_LORA_ERROR(lora::peft_to_gguf_adapter(llama + "/adapter", out, lora::LmConfig::read(data_path("models/tiny_gpt2"))),
                    "model.layers.0.mlp.down_proj: llama.cpp's gpt2 has no tensor for it");
  EXPECT_FALSE(std::filesystem::exists(out));

  // back to PEFT: an existing directory stays as it was
  lora::peft_to_gguf_adapter(llama + "/adapter", out, lc);
  lora::gguf_to_peft_adapter(out, back, lc);
  const auto before = file_bytes(back + "/adapter_model.safetensors");
  EXPECT_LORA_ERROR(lora::gguf_to_peft_adapter(out, back, lora::LmConfig::read(data_path("models/tiny_gpt2"))),
                    "general.architecture is not \"gpt2\"");
  EXPECT_LORA_ERROR(lora::gguf_to_peft_adapter(out, back, one_layer), "model.layers.1.self_attn.v_proj: the model has 1 layers");
  EXPECT_LORA_ERROR(lora::gguf_to_peft_adapter(out, back, lc, lora::Dtype::I64), "dtype I64 is not a float type");
  EXPECT_EQ(file_bytes(back + "/adapter_model.safetensors"), before);
  std::filesystem::remove_all(std::filesystem::path(out).parent_path());
}

}  // namespace
