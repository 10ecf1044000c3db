// Strict reading and deterministic, atomic writing of GGUF files (llama.cpp's format, versions 2
// and 3; the writer writes 3).
//
// Layout, little-endian: "GGUF", version (u32), tensor count (u64), metadata count (u64); the
// metadata, each a key (string: u64 length + bytes), a value type (u32) and a value (a scalar, a
// string, or an array: element type u32, count u64, elements); the tensor infos, each a name
// (string), n_dims (u32), ne[n_dims] (u64, ne[0] the fastest-varying: a (rows, cols) matrix is
// ne = {cols, rows}), a ggml type (u32) and an offset (u64) into the data section; padding to the
// alignment (general.alignment, u32, 32 when absent); the data section.
//
// Gguf checks everything ggml's reader checks, with the same rules: known value and tensor types,
// no nested arrays, unique keys and tensor names, names under 64 bytes, 1 to 4 dimensions,
// ne[0] a multiple of the type's block, sizes without overflow, general.alignment a power of two,
// and each tensor's offset the running total of the tensors before it, each padded to the
// alignment (so tensors neither overlap nor leave gaps); all inside the file. It is stricter in
// three places: bool values must be 0 or 1, counts are bounded by the bytes left (no huge
// allocation from a forged count), and bytes after the last tensor's padding are refused. Every
// failure throws lora::Error naming the file and the key or tensor; nothing is read outside the
// buffer.
#pragma once

#include <lora/detail/files.hpp>
#include <lora/detail/mapped_file.hpp>
#include <lora/error.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// Metadata value types, as numbered in the file.
enum class GgufType : std::uint32_t { u8, i8, u16, i16, u32, i32, f32, boolean, string, array, u64, i64, f64 };

// ggml tensor types the library converts (others are listed and readable as bytes).
enum class GgmlType : std::uint32_t { f32 = 0, f16 = 1, f64 = 28, bf16 = 30 };

namespace detail {

struct GgmlTypeInfo {
  std::uint32_t id;
  const char* name;
  std::uint64_t block, bytes;  // elements per block, bytes per block
};

// Every tensor type of ggml (gguf-py's GGML_QUANT_SIZES).
inline const GgmlTypeInfo* ggml_type_info(std::uint32_t id) {
  static const GgmlTypeInfo table[] = {
      {0, "F32", 1, 4},          {1, "F16", 1, 2},          {2, "Q4_0", 32, 18},      {3, "Q4_1", 32, 20},
      {6, "Q5_0", 32, 22},       {7, "Q5_1", 32, 24},       {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},
      {10, "Q2_K", 256, 84},     {11, "Q3_K", 256, 110},    {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
      {14, "Q6_K", 256, 210},    {15, "Q8_K", 256, 292},    {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
      {18, "IQ3_XXS", 256, 98},  {19, "IQ1_S", 256, 50},    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},
      {22, "IQ2_S", 256, 82},    {23, "IQ4_XS", 256, 136},  {24, "I8", 1, 1},         {25, "I16", 1, 2},
      {26, "I32", 1, 4},         {27, "I64", 1, 8},         {28, "F64", 1, 8},        {29, "IQ1_M", 256, 56},
      {30, "BF16", 1, 2},        {34, "TQ1_0", 256, 54},    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
  };
  for (const auto& t : table)
    if (t.id == id) return &t;
  return nullptr;
}

inline const char* gguf_type_name(GgufType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? names[i] : "unknown";
}

// Bytes of one scalar of type t (0 for string and array).
inline std::size_t gguf_scalar_size(GgufType t) {
  switch (t) {
    case GgufType::u8: case GgufType::i8: case GgufType::boolean: return 1;
    case GgufType::u16: case GgufType::i16: return 2;
    case GgufType::u32: case GgufType::i32: case GgufType::f32: return 4;
    case GgufType::u64: case GgufType::i64: case GgufType::f64: return 8;
    default: return 0;
  }
}

constexpr std::uint64_t kGgufMaxName = 63;  // ggml's GGML_MAX_NAME (64) with the terminating zero
constexpr std::uint32_t kGgufMaxDims = 4;

}  // namespace detail

// One metadata value: a scalar, a string, or an array of one type (type is the element type).
// Numbers are held widened: unsigned types and bool in uints, signed in ints, f32/f64 in floats
// (f32 exactly; a signalling NaN becomes quiet).
struct GgufValue {
  GgufType type = GgufType::u32;
  bool array = false;
  std::vector<std::uint64_t> uints;
  std::vector<std::int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;

  static GgufValue u32(std::uint32_t v) { return scalar_u(GgufType::u32, v); }
  static GgufValue u64(std::uint64_t v) { return scalar_u(GgufType::u64, v); }
  static GgufValue i32(std::int32_t v) { return scalar_i(GgufType::i32, v); }
  static GgufValue f32(float v) { return scalar_f(GgufType::f32, v); }
  static GgufValue boolean(bool v) { return scalar_u(GgufType::boolean, v ? 1 : 0); }
  static GgufValue string(std::string v) {
    GgufValue g;
    g.type = GgufType::string;
    g.strings.push_back(std::move(v));
    return g;
  }
  static GgufValue strings_array(std::vector<std::string> v) {
    GgufValue g = string("");
    g.array = true;
    g.strings = std::move(v);
    return g;
  }
  static GgufValue floats_array(GgufType t, std::vector<double> v) {
    GgufValue g = scalar_f(t, 0);
    g.array = true;
    g.floats = std::move(v);
    return g;
  }
  static GgufValue ints_array(GgufType t, std::vector<std::int64_t> v) {
    GgufValue g = scalar_i(t, 0);
    g.array = true;
    g.ints = std::move(v);
    return g;
  }

  std::size_t size() const {
    return uints.size() + ints.size() + floats.size() + strings.size();
  }
  // Floats compare by their bits: a NaN equals the same NaN.
  bool operator==(const GgufValue& o) const {
    return type == o.type && array == o.array && uints == o.uints && ints == o.ints && strings == o.strings &&
           floats.size() == o.floats.size() &&
           (floats.empty() || std::memcmp(floats.data(), o.floats.data(), floats.size() * sizeof(double)) == 0);
  }
  bool operator!=(const GgufValue& o) const { return !(*this == o); }

 private:
  static GgufValue scalar_u(GgufType t, std::uint64_t v) {
    GgufValue g;
    g.type = t;
    g.uints.push_back(v);
    return g;
  }
  static GgufValue scalar_i(GgufType t, std::int64_t v) {
    GgufValue g;
    g.type = t;
    g.ints.push_back(v);
    return g;
  }
  static GgufValue scalar_f(GgufType t, double v) {
    GgufValue g;
    g.type = t;
    g.floats.push_back(v);
    return g;
  }
};

struct GgufTensorInfo {
  std::string name;
  std::vector<std::uint64_t> ne;  // ne[0] fastest-varying
  std::uint32_t type = 0;         // ggml type id
  std::uint64_t offset = 0;       // in the data section
  std::uint64_t bytes = 0;
  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : ne) n *= d;
    return n;
  }
};

// A parsed, validated GGUF file or buffer. Copies share the bytes.
class Gguf {
 public:
  static Gguf open(const std::string& path) { return Gguf(detail::map_file(path), path); }
  static Gguf from_bytes(std::vector<std::uint8_t> bytes, const std::string& label = "<buffer>") {
    return Gguf(detail::own_bytes(std::move(bytes)), label);
  }

  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  // Where the data section starts in the file (tensor offsets count from here).
  std::uint64_t data_offset() const { return std::uint64_t(data_ - storage_->data); }
  // Keys in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  bool has(const std::string& key) const { return kv_index_.count(key) != 0; }
  const GgufValue& value(const std::string& key) const {
    auto it = kv_index_.find(key);
    if (it == kv_index_.end()) detail::fail(source_, ": no metadata key '", key, "'");
    return kv_[it->second].second;
  }
  // A scalar or string value of the expected type; errors name the key and both types.
  std::string string(const std::string& key) const { return expect(key, GgufType::string).strings[0]; }
  std::uint64_t uint(const std::string& key, GgufType t) const { return expect(key, t).uints[0]; }
  std::int64_t integer(const std::string& key, GgufType t) const { return expect(key, t).ints[0]; }
  double floating(const std::string& key, GgufType t) const { return expect(key, t).floats[0]; }

  // Tensors in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensor_index_.count(name) != 0; }
  const GgufTensorInfo& info(const std::string& name) const {
    auto it = tensor_index_.find(name);
    if (it == tensor_index_.end()) detail::fail(source_, ": no tensor '", name, "'");
    return tensors_[it->second];
  }
  const std::uint8_t* bytes(const std::string& name) const { return data_ + info(name).offset; }

  // An F32, F16, BF16 or F64 tensor as a (rows, cols) matrix: cols = ne[0], rows the product of
  // the others (ggml's rows are contiguous, as the library's row-major matrices).
  template <class Scalar>
  Mat<Scalar> matrix(const std::string& name) const {
    const GgufTensorInfo& t = info(name);
    const Dtype d = float_dtype(t);
    const std::uint64_t cols = t.ne[0], rows = cols ? t.numel() / cols : 0;
    Mat<Scalar> m(static_cast<Index>(rows), static_cast<Index>(cols));
    const std::uint8_t* base = data_ + t.offset;
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(detail::load_float(d, base, std::size_t(i)));
    return m;
  }

 private:
  Gguf(std::shared_ptr<const detail::Storage> storage, std::string source) : storage_(std::move(storage)), source_(std::move(source)) {
    parse();
  }

  [[noreturn]] void bad(const std::string& what) const { detail::fail(source_, ": ", what); }

  const GgufValue& expect(const std::string& key, GgufType t) const {
    const GgufValue& v = value(key);
    if (v.array || v.type != t)
      bad(detail::cat("metadata '", key, "' is ", v.array ? "an array of " : "", detail::gguf_type_name(v.type), ", expected ",
                      detail::gguf_type_name(t)));
    return v;
  }

  Dtype float_dtype(const GgufTensorInfo& t) const {
    switch (t.type) {
      case 0: return Dtype::F32;
      case 1: return Dtype::F16;
      case 28: return Dtype::F64;
      case 30: return Dtype::BF16;
      default:
        bad(detail::cat("tensor '", t.name, "' has type ", detail::ggml_type_info(t.type)->name,
                        "; only F32, F16, BF16 and F64 convert to a matrix"));
    }
  }

  // A cursor over the header: every read checks the bytes left.
  struct Cursor {
    const Gguf& g;
    const std::uint8_t* p;
    std::size_t left;
    template <class T>
    T get(const char* what) {
      if (left < sizeof(T)) g.bad(detail::cat("file ends inside ", what));
      T v;
      std::memcpy(&v, p, sizeof(T));
      p += sizeof(T);
      left -= sizeof(T);
      return v;
    }
    std::string str(const std::string& what) {
      const auto n = get<std::uint64_t>(what.c_str());
      if (n > left) g.bad(detail::cat(what, ": string of ", n, " bytes runs past the end of the file"));
      std::string s(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
      p += n;
      left -= n;
      return s;
    }
  };

  void read_scalar(Cursor& c, GgufType t, GgufValue& v, const std::string& key) const {
    const std::string what = "metadata '" + key + "'";
    switch (t) {
      case GgufType::u8: v.uints.push_back(c.get<std::uint8_t>(what.c_str())); break;
      case GgufType::i8: v.ints.push_back(c.get<std::int8_t>(what.c_str())); break;
      case GgufType::u16: v.uints.push_back(c.get<std::uint16_t>(what.c_str())); break;
      case GgufType::i16: v.ints.push_back(c.get<std::int16_t>(what.c_str())); break;
      case GgufType::u32: v.uints.push_back(c.get<std::uint32_t>(what.c_str())); break;
      case GgufType::i32: v.ints.push_back(c.get<std::int32_t>(what.c_str())); break;
      case GgufType::f32: v.floats.push_back(c.get<float>(what.c_str())); break;
      case GgufType::u64: v.uints.push_back(c.get<std::uint64_t>(what.c_str())); break;
      case GgufType::i64: v.ints.push_back(c.get<std::int64_t>(what.c_str())); break;
      case GgufType::f64: v.floats.push_back(c.get<double>(what.c_str())); break;
      case GgufType::boolean: {
        const auto b = c.get<std::uint8_t>(what.c_str());
        if (b > 1) bad(detail::cat(what, ": bool value ", int(b), ", expected 0 or 1"));
        v.uints.push_back(b);
        break;
      }
      case GgufType::string: v.strings.push_back(c.str(what)); break;
      default: bad(detail::cat(what, ": value type ", static_cast<std::uint32_t>(t), " unknown"));
    }
  }

  static bool known(std::uint32_t t) { return t <= static_cast<std::uint32_t>(GgufType::f64); }

  void parse() {
    Cursor c{*this, storage_->data, storage_->size};
    if (c.left < 4 || std::memcmp(c.p, "GGUF", 4) != 0) bad("not a GGUF file (no 'GGUF' magic)");
    c.p += 4;
    c.left -= 4;
    version_ = c.get<std::uint32_t>("the header");
    if (version_ != 2 && version_ != 3) bad(detail::cat("GGUF version ", version_, " is not supported (2 and 3 are)"));
    const auto n_tensors = c.get<std::uint64_t>("the header"), n_kv = c.get<std::uint64_t>("the header");
    // Each metadata entry takes at least 8 + 4 + 1 bytes, each tensor info 8 + 4 + 8 + 4 + 8.
    if (n_kv > c.left / 13) bad(detail::cat("metadata count ", n_kv, " cannot fit in the file's ", storage_->size, " bytes"));
    for (std::uint64_t k = 0; k < n_kv; ++k) {
      std::string key = c.str(detail::cat("metadata key ", k));
      if (key.empty()) bad(detail::cat("metadata key ", k, " is empty"));
      if (kv_index_.count(key)) bad(detail::cat("metadata key '", key, "' appears twice"));
      const auto t = c.get<std::uint32_t>(("metadata '" + key + "'").c_str());
      if (!known(t)) bad(detail::cat("metadata '", key, "': value type ", t, " unknown"));
      GgufValue v;
      v.type = static_cast<GgufType>(t);
      if (v.type == GgufType::array) {
        const auto et = c.get<std::uint32_t>(("metadata '" + key + "'").c_str());
        if (!known(et)) bad(detail::cat("metadata '", key, "': array element type ", et, " unknown"));
        if (static_cast<GgufType>(et) == GgufType::array) bad(detail::cat("metadata '", key, "': nested arrays are not supported"));
        const auto n = c.get<std::uint64_t>(("metadata '" + key + "'").c_str());
        const std::size_t min = static_cast<GgufType>(et) == GgufType::string ? 8 : detail::gguf_scalar_size(static_cast<GgufType>(et));
        if (n > c.left / min) bad(detail::cat("metadata '", key, "': array of ", n, " elements runs past the end of the file"));
        v.type = static_cast<GgufType>(et);
        v.array = true;
        for (std::uint64_t i = 0; i < n; ++i) read_scalar(c, v.type, v, key);
      } else {
        read_scalar(c, v.type, v, key);
      }
      kv_index_[key] = kv_.size();
      kv_.emplace_back(std::move(key), std::move(v));
    }
    if (has("general.alignment")) {
      const std::uint64_t a = uint("general.alignment", GgufType::u32);
      if (a == 0 || (a & (a - 1)) != 0) bad(detail::cat("general.alignment ", a, " is not a power of two"));
      alignment_ = a;
    }
    if (n_tensors > c.left / 32) bad(detail::cat("tensor count ", n_tensors, " cannot fit in the file's ", storage_->size, " bytes"));
    std::uint64_t expected = 0;  // the running offset each tensor must have
    for (std::uint64_t k = 0; k < n_tensors; ++k) {
      GgufTensorInfo t;
      t.name = c.str(detail::cat("tensor info ", k));
      const std::string what = "tensor '" + t.name + "'";
      if (t.name.empty()) bad(detail::cat("tensor info ", k, " has an empty name"));
      if (t.name.size() > detail::kGgufMaxName)
        bad(detail::cat(what, ": name of ", t.name.size(), " bytes, the limit is ", detail::kGgufMaxName));
      if (tensor_index_.count(t.name)) bad(detail::cat(what, " appears twice"));
      const auto dims = c.get<std::uint32_t>(what.c_str());
      if (dims < 1 || dims > detail::kGgufMaxDims) bad(detail::cat(what, ": ", dims, " dimensions, expected 1 to 4"));
      std::uint64_t numel = 1;
      for (std::uint32_t d = 0; d < dims; ++d) {
        const auto n = c.get<std::uint64_t>(what.c_str());
        if (n > std::uint64_t(INT64_MAX) || (n != 0 && numel > std::uint64_t(INT64_MAX) / n))
          bad(detail::cat(what, ": dimensions overflow"));
        numel *= n;
        t.ne.push_back(n);
      }
      t.type = c.get<std::uint32_t>(what.c_str());
      const detail::GgmlTypeInfo* ti = detail::ggml_type_info(t.type);
      if (!ti) bad(detail::cat(what, ": tensor type ", t.type, " unknown"));
      if (t.ne[0] % ti->block != 0)
        bad(detail::cat(what, ": ne[0] = ", t.ne[0], " is not a multiple of ", ti->name, "'s block of ", ti->block));
      if (numel / ti->block > std::uint64_t(INT64_MAX) / ti->bytes) bad(detail::cat(what, ": byte size overflows"));
      t.bytes = numel / ti->block * ti->bytes;
      t.offset = c.get<std::uint64_t>(what.c_str());
      if (t.offset != expected)
        bad(detail::cat(what, ": offset ", t.offset, ", expected ", expected, " (tensors follow each other, each padded to ",
                        alignment_, " bytes)"));
      const std::uint64_t padded = (t.bytes + alignment_ - 1) / alignment_ * alignment_;
      if (padded < t.bytes || expected > UINT64_MAX - padded) bad(detail::cat(what, ": byte size overflows"));
      expected += padded;
      tensor_index_[t.name] = tensors_.size();
      tensors_.push_back(std::move(t));
    }
    const std::size_t header = storage_->size - c.left;
    const std::uint64_t start = (header + alignment_ - 1) / alignment_ * alignment_;
    const std::uint64_t end = tensors_.empty() ? header : start + tensors_.back().offset + tensors_.back().bytes;
    if (storage_->size < end)
      bad(detail::cat("tensor '", tensors_.back().name, "' ends at byte ", end, ", past the end of the file (", storage_->size,
                      " bytes)"));
    if (storage_->size > std::max<std::uint64_t>(end, start + expected))
      bad(detail::cat(storage_->size - std::max<std::uint64_t>(end, start + expected), " bytes after the last tensor"));
    data_ = storage_->data + std::min<std::uint64_t>(start, storage_->size);
  }

  std::shared_ptr<const detail::Storage> storage_;
  std::string source_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, std::size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
  const std::uint8_t* data_ = nullptr;
};

// Builds a GGUF v3 file: metadata in the order given, tensors in the order added, each padded to
// the alignment (general.alignment when set, else 32), the file's last padding included, as
// gguf-py's writer does. The same calls give the same bytes.
class GgufBuilder {
 public:
  GgufBuilder& metadata(const std::string& key, GgufValue v) {
    if (key.empty()) detail::fail("GgufBuilder: empty metadata key");
    for (const auto& kv : kv_)
      if (kv.first == key) detail::fail("GgufBuilder: metadata key '", key, "' set twice");
    check_value(key, v);
    if (key == "general.alignment") {
      if (v.array || v.type != GgufType::u32 || v.uints[0] == 0 || (v.uints[0] & (v.uints[0] - 1)) != 0)
        detail::fail("GgufBuilder: general.alignment must be a u32 power of two");
      if (!tensors_.empty()) detail::fail("GgufBuilder: set general.alignment before adding tensors");
      alignment_ = v.uints[0];
    }
    kv_.emplace_back(key, std::move(v));
    return *this;
  }

  // A matrix (rows, cols) as ne = {cols, rows}, or as the given ne with as many elements (a
  // vector: one row, ne = {n}), converted to F32, F16 or BF16 (round to nearest even) or F64.
  template <class Derived>
  GgufBuilder& add(const std::string& name, const Eigen::DenseBase<Derived>& m, GgmlType type, std::vector<std::uint64_t> ne = {}) {
    const Index rows = m.rows(), cols = m.cols();
    const auto* ti = detail::ggml_type_info(static_cast<std::uint32_t>(type));
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(rows * cols) * ti->bytes);
    std::size_t k = 0;
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j, ++k) {
        const double v = static_cast<double>(m.derived()(i, j));
        switch (type) {
          case GgmlType::f32: put(bytes, k, static_cast<float>(v)); break;
          case GgmlType::f64: put(bytes, k, v); break;
          case GgmlType::f16: put(bytes, k, Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(static_cast<float>(v)))); break;
          case GgmlType::bf16: put(bytes, k, Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(static_cast<float>(v)))); break;
        }
      }
    if (ne.empty()) ne = {std::uint64_t(cols), std::uint64_t(rows)};
    return add_raw(name, static_cast<std::uint32_t>(type), std::move(ne), std::move(bytes));
  }

  // Already-encoded bytes of any ggml type; their count must be the type's size of ne.
  GgufBuilder& add_raw(const std::string& name, std::uint32_t type, std::vector<std::uint64_t> ne, std::vector<std::uint8_t> bytes) {
    const std::string what = "GgufBuilder: tensor '" + name + "'";
    if (name.empty() || name.size() > detail::kGgufMaxName)
      detail::fail(what, ": a name must have 1 to ", detail::kGgufMaxName, " bytes");
    for (const auto& t : tensors_)
      if (t.info.name == name) detail::fail(what, " added twice");
    const auto* ti = detail::ggml_type_info(type);
    if (!ti) detail::fail(what, ": tensor type ", type, " unknown");
    if (ne.empty() || ne.size() > detail::kGgufMaxDims) detail::fail(what, ": ", ne.size(), " dimensions, expected 1 to 4");
    std::uint64_t numel = 1;
    for (auto d : ne) {
      if (d > std::uint64_t(INT64_MAX) || (d != 0 && numel > std::uint64_t(INT64_MAX) / d)) detail::fail(what, ": dimensions overflow");
      numel *= d;
    }
    if (ne[0] % ti->block != 0) detail::fail(what, ": ne[0] = ", ne[0], " is not a multiple of ", ti->name, "'s block of ", ti->block);
    if (numel / ti->block * ti->bytes != bytes.size())
      detail::fail(what, ": ", bytes.size(), " bytes, expected ", numel / ti->block * ti->bytes, " for ", ti->name);
    Pending p;
    p.info.name = name;
    p.info.ne = std::move(ne);
    p.info.type = type;
    p.info.bytes = bytes.size();
    p.data = std::move(bytes);
    tensors_.push_back(std::move(p));
    return *this;
  }

  std::vector<std::uint8_t> serialize() const {
    std::vector<std::uint8_t> out;
    out.insert(out.end(), {'G', 'G', 'U', 'F'});
    put_raw(out, std::uint32_t(3));
    put_raw(out, std::uint64_t(tensors_.size()));
    put_raw(out, std::uint64_t(kv_.size()));
    for (const auto& [key, v] : kv_) {
      put_string(out, key);
      if (v.array) {
        put_raw(out, static_cast<std::uint32_t>(GgufType::array));
        put_raw(out, static_cast<std::uint32_t>(v.type));
        put_raw(out, std::uint64_t(v.size()));
      } else {
        put_raw(out, static_cast<std::uint32_t>(v.type));
      }
      for (std::size_t i = 0; i < v.size(); ++i) put_element(out, v, i);
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      put_string(out, t.info.name);
      put_raw(out, std::uint32_t(t.info.ne.size()));
      for (auto d : t.info.ne) put_raw(out, d);
      put_raw(out, t.info.type);
      put_raw(out, offset);
      offset += padded(t.info.bytes);
    }
    out.resize(padded(out.size()), 0);
    for (const auto& t : tensors_) {
      out.insert(out.end(), t.data.begin(), t.data.end());
      out.resize(padded(out.size()), 0);
    }
    return out;
  }

  // Writes atomically (a temporary beside path, fsynced, renamed); a failure leaves path as it was.
  void save(const std::string& path) const { detail::write_file_atomic(path, serialize()); }

 private:
  struct Pending {
    GgufTensorInfo info;
    std::vector<std::uint8_t> data;
  };

  std::uint64_t padded(std::uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  // The value's numbers sit in the list its type reads from, in the type's range.
  static void check_value(const std::string& key, const GgufValue& v) {
    const std::string what = "GgufBuilder: metadata '" + key + "'";
    if (v.type == GgufType::array || !(static_cast<std::uint32_t>(v.type) <= static_cast<std::uint32_t>(GgufType::f64)))
      detail::fail(what, ": type must be an element type (array marks an array)");
    if (!v.array && v.size() != 1) detail::fail(what, ": a scalar holds ", v.size(), " values");
    std::uint64_t umax = 0;
    std::int64_t imin = 0, imax = 0;
    std::size_t in_place = 0;  // values in the list the type uses
    switch (v.type) {
      case GgufType::u8: umax = UINT8_MAX; break;
      case GgufType::u16: umax = UINT16_MAX; break;
      case GgufType::u32: umax = UINT32_MAX; break;
      case GgufType::u64: umax = UINT64_MAX; break;
      case GgufType::boolean: umax = 1; break;
      case GgufType::i8: imin = INT8_MIN, imax = INT8_MAX; break;
      case GgufType::i16: imin = INT16_MIN, imax = INT16_MAX; break;
      case GgufType::i32: imin = INT32_MIN, imax = INT32_MAX; break;
      case GgufType::i64: imin = INT64_MIN, imax = INT64_MAX; break;
      default: break;
    }
    switch (v.type) {
      case GgufType::u8: case GgufType::u16: case GgufType::u32: case GgufType::u64: case GgufType::boolean:
        for (auto u : v.uints)
          if (u > umax) detail::fail(what, ": ", u, " does not fit in ", detail::gguf_type_name(v.type));
        in_place = v.uints.size();
        break;
      case GgufType::i8: case GgufType::i16: case GgufType::i32: case GgufType::i64:
        for (auto i : v.ints)
          if (i < imin || i > imax) detail::fail(what, ": ", i, " does not fit in ", detail::gguf_type_name(v.type));
        in_place = v.ints.size();
        break;
      case GgufType::f32: case GgufType::f64: in_place = v.floats.size(); break;
      case GgufType::string: in_place = v.strings.size(); break;
      default: break;
    }
    if (in_place != v.size()) detail::fail(what, ": values held in a list that is not ", detail::gguf_type_name(v.type), "'s");
  }

  template <class T>
  static void put(std::vector<std::uint8_t>& out, std::size_t k, T v) {
    std::memcpy(out.data() + k * sizeof(T), &v, sizeof(T));
  }
  template <class T>
  static void put_raw(std::vector<std::uint8_t>& out, T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  static void put_string(std::vector<std::uint8_t>& out, const std::string& s) {
    put_raw(out, std::uint64_t(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
  static void put_element(std::vector<std::uint8_t>& out, const GgufValue& v, std::size_t i) {
    switch (v.type) {
      case GgufType::u8: put_raw(out, std::uint8_t(v.uints[i])); break;
      case GgufType::i8: put_raw(out, std::int8_t(v.ints[i])); break;
      case GgufType::u16: put_raw(out, std::uint16_t(v.uints[i])); break;
      case GgufType::i16: put_raw(out, std::int16_t(v.ints[i])); break;
      case GgufType::u32: put_raw(out, std::uint32_t(v.uints[i])); break;
      case GgufType::i32: put_raw(out, std::int32_t(v.ints[i])); break;
      case GgufType::f32: put_raw(out, float(v.floats[i])); break;
      case GgufType::boolean: put_raw(out, std::uint8_t(v.uints[i] ? 1 : 0)); break;
      case GgufType::string: put_string(out, v.strings[i]); break;
      case GgufType::u64: put_raw(out, std::uint64_t(v.uints[i])); break;
      case GgufType::i64: put_raw(out, std::int64_t(v.ints[i])); break;
      case GgufType::f64: put_raw(out, double(v.floats[i])); break;
      case GgufType::array: break;  // refused by metadata()
    }
  }

  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Pending> tensors_;
  std::uint64_t alignment_ = 32;
};

}  // namespace lora
