// Strict reading and atomic writing of safetensors files.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data section.
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data section) and may hold "__metadata__": {string: string}.
//
// SafeTensors validates like the reference implementation: N <= 100,000,000 and inside the
// file, the header starts with '{' and is a JSON object, every entry has a known dtype, an
// unsigned integer shape and two offsets; sorted by offset, the entries are contiguous from 0,
// each holds exactly numel·dtype_size bytes (computed with overflow checks), and together they
// cover the data section exactly. It is stricter in two places: duplicate keys anywhere in the
// header are rejected, and nesting is limited to 128 levels. Every failure throws lora::Error
// naming the file and the tensor or field; nothing is read outside the buffer.
//
// This is little-endian only (as are all hosts PyTorch ships for).
#pragma once

#include <lora/detail/files.hpp>
#include <lora/detail/json.hpp>
#include <lora/detail/mapped_file.hpp>
#include <lora/error.hpp>
#include <lora/types.hpp>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

// Every byte-sized dtype of the format, declared in the reference implementation's order
// (increasing alignment), which the writer's tensor order follows. Conversions exist for F64/F32/F16/BF16 (to float or
// double) and for the integer types (to int64); the others can be listed and read as bytes.
enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64 };

namespace detail {

struct DtypeEntry {
  Dtype dtype;
  const char* name;
  std::size_t size;
};

inline const std::vector<DtypeEntry>& dtype_table() {
  static const std::vector<DtypeEntry> table = {
      {Dtype::BOOL, "BOOL", 1},       {Dtype::U8, "U8", 1},     {Dtype::I8, "I8", 1},
      {Dtype::F8_E5M2, "F8_E5M2", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::F8_E8M0, "F8_E8M0", 1},
      {Dtype::I16, "I16", 2},         {Dtype::U16, "U16", 2},   {Dtype::F16, "F16", 2},
      {Dtype::BF16, "BF16", 2},       {Dtype::I32, "I32", 4},   {Dtype::U32, "U32", 4},
      {Dtype::F32, "F32", 4},         {Dtype::F64, "F64", 8},   {Dtype::I64, "I64", 8},
      {Dtype::U64, "U64", 8},         {Dtype::C64, "C64", 8}};
  return table;
}

inline const DtypeEntry& dtype_entry(Dtype d) { return dtype_table()[static_cast<std::size_t>(d)]; }

}  // namespace detail

inline const char* dtype_name(Dtype d) { return detail::dtype_entry(d).name; }
inline std::size_t dtype_size(Dtype d) { return detail::dtype_entry(d).size; }

// The dtype whose name is s ("F32", ...); throws for an unknown name.
inline Dtype dtype_from_name(const std::string& s) {
  for (const auto& e : detail::dtype_table())
    if (s == e.name) return e.dtype;
  detail::fail("unknown dtype '", s, "'");
}

// The dtype that stores a C++ type unchanged.
template <class T>
constexpr Dtype dtype_of() {
  if constexpr (std::is_same_v<T, double>) return Dtype::F64;
  else if constexpr (std::is_same_v<T, float>) return Dtype::F32;
  else if constexpr (std::is_same_v<T, Eigen::half>) return Dtype::F16;
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>) return Dtype::BF16;
  else if constexpr (std::is_same_v<T, std::int64_t>) return Dtype::I64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return Dtype::I32;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return Dtype::U8;
  else static_assert(sizeof(T) == 0, "no safetensors dtype for this type");
}

struct TensorInfo {
  std::string name;
  Dtype dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte offsets into the data section

  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;  // validated not to overflow
    return n;
  }
};

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail {

constexpr std::uint64_t kMaxHeaderSize = 100000000;

inline bool is_float_dtype(Dtype d) {
  return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16;
}

inline bool is_int_dtype(Dtype d) {
  switch (d) {
    case Dtype::BOOL: case Dtype::U8: case Dtype::I8: case Dtype::I16: case Dtype::U16:
    case Dtype::I32: case Dtype::U32: case Dtype::I64: case Dtype::U64:
      return true;
    default:
      return false;
  }
}

template <class T>
T load(const std::uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Element i of a float tensor, widened to double (exact for every source dtype).
inline double load_float(Dtype d, const std::uint8_t* base, std::size_t i) {
  switch (d) {
    case Dtype::F64: return load<double>(base + 8 * i);
    case Dtype::F32: return load<float>(base + 4 * i);
    case Dtype::F16: return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(load<std::uint16_t>(base + 2 * i)));
    case Dtype::BF16: return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(load<std::uint16_t>(base + 2 * i)));
    default: return 0;  // callers check is_float_dtype first
  }
}

// Element i of an integer tensor; false when it does not fit in int64 (U64 only).
inline bool load_int(Dtype d, const std::uint8_t* base, std::size_t i, std::int64_t& out) {
  switch (d) {
    case Dtype::BOOL: case Dtype::U8: out = base[i]; return true;
    case Dtype::I8: out = load<std::int8_t>(base + i); return true;
    case Dtype::I16: out = load<std::int16_t>(base + 2 * i); return true;
    case Dtype::U16: out = load<std::uint16_t>(base + 2 * i); return true;
    case Dtype::I32: out = load<std::int32_t>(base + 4 * i); return true;
    case Dtype::U32: out = load<std::uint32_t>(base + 4 * i); return true;
    case Dtype::I64: out = load<std::int64_t>(base + 8 * i); return true;
    case Dtype::U64: {
      auto v = load<std::uint64_t>(base + 8 * i);
      out = static_cast<std::int64_t>(v);
      return v <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    }
    default: return false;
  }
}

}  // namespace detail

// A parsed, validated safetensors file or buffer. Copies share the bytes; the bytes (and every
// Map handed out by map()) live as long as any copy does.
class SafeTensors {
 public:
  // Maps the file read-only.
  static SafeTensors open(const std::string& path) { return SafeTensors(detail::map_file(path), path); }

  // Parses a copy of the buffer; label names it in error messages.
  static SafeTensors from_bytes(const void* data, std::size_t size, const std::string& label = "<buffer>") {
    const auto* p = static_cast<const std::uint8_t*>(data);
    return from_bytes(std::vector<std::uint8_t>(p, p + size), label);
  }

  static SafeTensors from_bytes(std::vector<std::uint8_t> bytes, const std::string& label = "<buffer>") {
    return SafeTensors(detail::own_bytes(std::move(bytes)), label);
  }

  const std::string& source() const { return source_; }
  // Tensors in the order of their data.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) detail::fail(source_, ": no tensor '", name, "'");
    return tensors_[it->second];
  }

  // The tensor's raw bytes (dtype_size·numel of them).
  const std::uint8_t* bytes(const std::string& name) const { return data_ + info(name).begin; }

  // A float tensor as a (rows, cols) matrix: the last dimension is the columns and all leading
  // dimensions are flattened into rows (a 1-D tensor of n is (1, n), a scalar is (1, 1)).
  // Converts from F64, F32, F16 and BF16.
  template <class Scalar>
  Mat<Scalar> matrix(const std::string& name) const {
    static_assert(std::is_floating_point_v<Scalar>, "matrix<Scalar>: Scalar is float or double");
    const TensorInfo& t = info(name);
    if (!detail::is_float_dtype(t.dtype))
      detail::fail(source_, ": tensor '", name, "' has dtype ", dtype_name(t.dtype),
                   "; expected F64, F32, F16 or BF16");
    auto [rows, cols] = matrix_shape(t);
    Mat<Scalar> m(rows, cols);
    const std::uint8_t* base = data_ + t.begin;
    for (Index i = 0; i < m.size(); ++i)
      m.data()[i] = static_cast<Scalar>(detail::load_float(t.dtype, base, static_cast<std::size_t>(i)));
    return m;
  }

  // A float tensor's elements as a column vector (any rank).
  template <class Scalar>
  Vec<Scalar> vector(const std::string& name) const {
    Mat<Scalar> m = matrix<Scalar>(name);
    return Eigen::Map<const Vec<Scalar>>(m.data(), m.size());
  }

  // An integer tensor (BOOL, U8, I8, I16, U16, I32, U32, I64, U64) as int64, shaped as matrix().
  Mat<std::int64_t> integers(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (!detail::is_int_dtype(t.dtype))
      detail::fail(source_, ": tensor '", name, "' has dtype ", dtype_name(t.dtype), "; expected an integer dtype");
    auto [rows, cols] = matrix_shape(t);
    Mat<std::int64_t> m(rows, cols);
    const std::uint8_t* base = data_ + t.begin;
    for (Index i = 0; i < m.size(); ++i)
      if (!detail::load_int(t.dtype, base, static_cast<std::size_t>(i), m.data()[i]))
        detail::fail(source_, ": tensor '", name, "' element ", i, " does not fit in int64");
    return m;
  }

  // True when map<Scalar>(name) works: the stored dtype is Scalar's and the data is aligned.
  template <class Scalar>
  bool can_map(const std::string& name) const {
    const TensorInfo& t = info(name);
    auto addr = reinterpret_cast<std::uintptr_t>(data_ + t.begin);
    return t.dtype == dtype_of<Scalar>() && addr % alignof(Scalar) == 0;
  }

  // A zero-copy view, shaped as matrix(). Valid while this object (or a copy) lives.
  template <class Scalar>
  ConstMatMap<Scalar> map(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (t.dtype != dtype_of<Scalar>())
      detail::fail(source_, ": tensor '", name, "' has dtype ", dtype_name(t.dtype), ", cannot map it as ",
                   dtype_name(dtype_of<Scalar>()), " without conversion (use matrix())");
    if (!can_map<Scalar>(name))
      detail::fail(source_, ": tensor '", name, "' is not aligned to ", alignof(Scalar), " bytes (use matrix())");
    auto [rows, cols] = matrix_shape(t);
    return ConstMatMap<Scalar>(reinterpret_cast<const Scalar*>(data_ + t.begin), rows, cols);
  }

 private:
  SafeTensors(std::shared_ptr<const detail::Storage> storage, std::string source)
      : storage_(std::move(storage)), source_(std::move(source)) {
    parse();
  }

  std::pair<Index, Index> matrix_shape(const TensorInfo& t) const {
    // Validation bounds numel·size by the file size, but a zero-sized tensor may still name
    // dimensions that do not fit in an Index.
    const auto max = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    std::uint64_t rows = 1, cols = t.shape.empty() ? 1 : t.shape.back();
    for (std::size_t i = 0; i + 1 < t.shape.size(); ++i) {
      if (t.shape[i] != 0 && rows > max / t.shape[i])
        detail::fail(source_, ": tensor '", t.name, "' shape ", shape_string(t.shape), " is too large for a matrix");
      rows *= t.shape[i];
    }
    if (rows > max || cols > max)
      detail::fail(source_, ": tensor '", t.name, "' shape ", shape_string(t.shape), " is too large for a matrix");
    return {static_cast<Index>(rows), static_cast<Index>(cols)};
  }

  [[noreturn]] void bad(const std::string& what) const { detail::fail(source_, ": ", what); }

  static std::uint64_t unsigned_field(const nlohmann::json& v, bool& ok) {
    ok = v.is_number_unsigned();
    return ok ? v.get<std::uint64_t>() : 0;
  }

  void parse() {
    const std::uint8_t* p = storage_->data;
    const std::size_t size = storage_->size;
    if (size < 8) bad(detail::cat("file is ", size, " bytes, too small for the 8-byte header length"));
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | p[i];
    if (n > detail::kMaxHeaderSize)
      bad(detail::cat("header length ", n, " exceeds the limit of ", detail::kMaxHeaderSize, " bytes"));
    if (n > size - 8) bad(detail::cat("header length ", n, " runs past the end of the file (", size, " bytes)"));
    const char* h = reinterpret_cast<const char*>(p + 8);
    if (n == 0 || h[0] != '{') bad("header does not start with '{'");
    if (const void* nul = std::memchr(h, 0, n))  // JSON has no NUL; the parser would stop there
      bad(detail::cat("header has a NUL byte at offset ", static_cast<const char*>(nul) - h, " of ", n));

    nlohmann::json header;
    try {
      // Reject duplicate keys at any depth (and, in parse_json, nesting deeper than kMaxJsonDepth).
      std::vector<std::set<std::string>> keys;
      header = detail::parse_json<nlohmann::json>(h, h + n, [&keys](nlohmann::json::parse_event_t ev, nlohmann::json& v) {
        using E = nlohmann::json::parse_event_t;
        if (ev == E::object_start) keys.emplace_back();
        else if (ev == E::object_end) keys.pop_back();
        else if (ev == E::key && !keys.back().insert(v.get<std::string>()).second)
          detail::fail("duplicate key \"", v.get<std::string>(), "\"");
      });
    } catch (const Error& e) {
      bad(detail::cat("header is invalid: ", e.what()));
    } catch (const nlohmann::json::exception& e) {
      bad(detail::cat("header is not valid JSON: ", e.what()));
    }
    if (!header.is_object()) bad("header is not a JSON object");

    for (auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) bad("__metadata__ is not an object");
        for (auto& [k, v] : entry.items()) {
          if (!v.is_string()) bad(detail::cat("__metadata__ value for '", k, "' is not a string"));
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(name, entry));
    }

    // Sorted by offset, the tensors must tile the data section: no overlap, no gap.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
    });
    const std::uint64_t data_size = size - 8 - n;
    std::uint64_t expected = 0;
    for (const TensorInfo& t : tensors_) {
      if (t.begin < expected)
        bad(detail::cat("tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end, "] overlap the previous tensor, which ends at ", expected));
      if (t.begin > expected)
        bad(detail::cat("tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end, "] leave a gap after offset ", expected));
      expected = t.end;
    }
    if (expected != data_size)
      bad(detail::cat("tensors cover ", expected, " bytes but the data section holds ", data_size));
    data_ = p + 8 + n;
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& entry) const {
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object()) bad(where + " is not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) bad(detail::cat(where, " has no '", field, "'"));
    TensorInfo t;
    t.name = name;
    const auto& dt = entry["dtype"];
    if (!dt.is_string()) bad(where + " dtype is not a string");
    try {
      t.dtype = dtype_from_name(dt.get<std::string>());
    } catch (const Error& e) {
      bad(detail::cat(where, ": ", e.what()));
    }
    const auto& shape = entry["shape"];
    if (!shape.is_array()) bad(where + " shape is not an array");
    std::uint64_t numel = 1;
    bool overflow = false, has_zero = false;
    for (const auto& d : shape) {
      bool ok = false;
      std::uint64_t v = unsigned_field(d, ok);
      if (!ok) bad(where + " shape has an entry that is not a non-negative integer");
      t.shape.push_back(v);
      has_zero |= v == 0;
      if (v != 0 && numel > std::numeric_limits<std::uint64_t>::max() / v) overflow = true;
      numel *= v;
    }
    const auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2) bad(where + " data_offsets is not an array of two integers");
    bool ok0 = false, ok1 = false;
    t.begin = unsigned_field(off[0], ok0);
    t.end = unsigned_field(off[1], ok1);
    if (!ok0 || !ok1) bad(where + " data_offsets has an entry that is not a non-negative integer");
    if (t.end < t.begin) bad(detail::cat(where, " data_offsets [", t.begin, ", ", t.end, "] end before they begin"));
    // A zero-sized tensor never overflows whatever its other dimensions (numel is 0).
    if (overflow && !has_zero) bad(detail::cat(where, " shape ", shape_string(t.shape), " overflows the element count"));
    const std::uint64_t sz = dtype_size(t.dtype);
    if (numel > std::numeric_limits<std::uint64_t>::max() / sz)
      bad(detail::cat(where, " shape ", shape_string(t.shape), " overflows the byte size"));
    if (numel * sz != t.end - t.begin)
      bad(detail::cat(where, " shape ", shape_string(t.shape), " of ", dtype_name(t.dtype), " needs ", numel * sz,
                      " bytes but data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin));
    return t;
  }

  std::shared_ptr<const detail::Storage> storage_;
  std::string source_;
  const std::uint8_t* data_ = nullptr;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors, then writes a deterministic safetensors file laid out as the reference
// implementation lays it out (byte-identical for the same tensors): tensors ordered by dtype,
// most aligned first (so each offset is a multiple of its dtype's size), then by name; compact
// JSON with "__metadata__" first; header padded with spaces to a multiple of 8 bytes.
class SafeTensorsBuilder {
 public:
  // Adds m as dtype, in row-major order. shape defaults to {rows, cols}; any shape with the same
  // number of elements may be given (a bias as {out}, a batch as {batch, T, d}).
  // Floating matrices (float, double, Eigen::half, Eigen::bfloat16) convert to F64, F32, F16 or
  // BF16 (rounding to nearest even); integer
  // matrices to any integer dtype whose range holds every value.
  template <class Derived>
  SafeTensorsBuilder& add(const std::string& name, const Eigen::DenseBase<Derived>& m, Dtype dtype,
                          std::vector<std::uint64_t> shape = {}) {
    using T = typename Derived::Scalar;
    if (shape.empty())
      shape = {static_cast<std::uint64_t>(m.rows()), static_cast<std::uint64_t>(m.cols())};
    const std::uint64_t numel = checked_numel(name, dtype, shape);
    if (numel != static_cast<std::uint64_t>(m.size()))
      detail::fail("SafeTensorsBuilder::add: tensor '", name, "' shape ", shape_string(shape), " holds ", numel,
                   " elements but the matrix is ", detail::shape(m.rows(), m.cols()));
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(m.size()) * dtype_size(dtype));
    std::size_t k = 0;
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j, ++k) {
        if constexpr (std::is_floating_point_v<T>) {
          store_float(name, dtype, static_cast<double>(m.derived().coeff(i, j)), bytes.data(), k);
        } else if constexpr (std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>) {
          store_float(name, dtype, static_cast<double>(static_cast<float>(m.derived().coeff(i, j))), bytes.data(), k);
        } else {
          static_assert(std::is_integral_v<T>, "SafeTensorsBuilder::add: float or integer matrices");
          store_int(name, dtype, static_cast<long double>(m.derived().coeff(i, j)), bytes.data(), k);
        }
      }
    return add_raw(name, dtype, std::move(shape), std::move(bytes));
  }

  // Adds m in the dtype that stores its scalar type unchanged.
  template <class Derived>
  SafeTensorsBuilder& add(const std::string& name, const Eigen::DenseBase<Derived>& m, std::vector<std::uint64_t> shape = {}) {
    return add(name, m, dtype_of<typename Derived::Scalar>(), std::move(shape));
  }

  // Adds already-encoded little-endian bytes.
  SafeTensorsBuilder& add_raw(const std::string& name, Dtype dtype, std::vector<std::uint64_t> shape,
                              std::vector<std::uint8_t> bytes) {
    if (name == "__metadata__") detail::fail("SafeTensorsBuilder::add: '__metadata__' is reserved");
    for (const auto& t : tensors_)
      if (t.name == name) detail::fail("SafeTensorsBuilder::add: duplicate tensor '", name, "'");
    const std::uint64_t numel = checked_numel(name, dtype, shape);
    if (numel * dtype_size(dtype) != bytes.size())
      detail::fail("SafeTensorsBuilder::add_raw: tensor '", name, "' shape ", shape_string(shape), " of ",
                   dtype_name(dtype), " needs ", numel * dtype_size(dtype), " bytes, got ", bytes.size());
    tensors_.push_back({name, dtype, std::move(shape), std::move(bytes)});
    return *this;
  }

  SafeTensorsBuilder& metadata(const std::string& key, const std::string& value) {
    metadata_[key] = value;
    return *this;
  }

  std::vector<std::uint8_t> serialize() const {
    std::vector<const Entry*> order;
    for (const auto& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      return a->dtype != b->dtype ? a->dtype > b->dtype : a->name < b->name;
    });
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const Entry* t : order) {
      header[t->name] = {{"dtype", dtype_name(t->dtype)},
                         {"shape", t->shape},
                         {"data_offsets", {offset, offset + t->bytes.size()}}};
      offset += t->bytes.size();
    }
    std::string h = header.dump();
    h.append((8 - h.size() % 8) % 8, ' ');
    std::vector<std::uint8_t> out(8 + h.size() + offset);
    std::uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
    std::memcpy(out.data() + 8, h.data(), h.size());
    std::size_t pos = 8 + h.size();
    for (const Entry* t : order) {
      if (!t->bytes.empty()) std::memcpy(out.data() + pos, t->bytes.data(), t->bytes.size());
      pos += t->bytes.size();
    }
    return out;
  }

  // Writes atomically: a temporary file in the same directory, flushed to disk, then renamed over
  // path. A failed save leaves any existing file at path untouched.
  void save(const std::string& path) const { detail::write_file_atomic(path, serialize()); }

 private:
  // The element count of shape, refused (as SafeTensors::open would refuse the file) when it or
  // the byte size overflows 64 bits.
  static std::uint64_t checked_numel(const std::string& name, Dtype dtype, const std::vector<std::uint64_t>& shape) {
    std::uint64_t numel = 1;
    bool overflow = false;
    for (auto d : shape) {
      if (d != 0 && numel > std::numeric_limits<std::uint64_t>::max() / d) overflow = true;
      numel *= d;
    }
    const bool empty = std::find(shape.begin(), shape.end(), std::uint64_t(0)) != shape.end();
    if (!empty && (overflow || numel > std::numeric_limits<std::uint64_t>::max() / dtype_size(dtype)))
      detail::fail("SafeTensorsBuilder::add: tensor '", name, "' shape ", shape_string(shape), " of ", dtype_name(dtype),
                   " overflows the element count or byte size");
    return empty ? 0 : numel;
  }

  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::uint64_t> shape;
    std::vector<std::uint8_t> bytes;
  };

  template <class T>
  static void put(std::uint8_t* out, std::size_t k, T v) {
    std::memcpy(out + k * sizeof(T), &v, sizeof(T));
  }

  static void store_float(const std::string& name, Dtype dtype, double v, std::uint8_t* out, std::size_t k) {
    switch (dtype) {
      case Dtype::F64: put(out, k, v); break;
      case Dtype::F32: put(out, k, static_cast<float>(v)); break;
      case Dtype::F16: put(out, k, Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(static_cast<float>(v)))); break;
      case Dtype::BF16: put(out, k, Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(static_cast<float>(v)))); break;
      default:
        detail::fail("SafeTensorsBuilder::add: tensor '", name, "': cannot store a floating matrix as ", dtype_name(dtype));
    }
  }

  static void store_int(const std::string& name, Dtype dtype, long double v, std::uint8_t* out, std::size_t k) {
    auto fits = [&](long double lo, long double hi) {
      if (v < lo || v > hi)
        detail::fail("SafeTensorsBuilder::add: tensor '", name, "': value ", static_cast<long long>(v),
                     " does not fit in ", dtype_name(dtype));
    };
    switch (dtype) {
      case Dtype::BOOL: fits(0, 1); put(out, k, static_cast<std::uint8_t>(v)); break;
      case Dtype::U8: fits(0, 255); put(out, k, static_cast<std::uint8_t>(v)); break;
      case Dtype::I8: fits(-128, 127); put(out, k, static_cast<std::int8_t>(v)); break;
      case Dtype::I16: fits(-32768, 32767); put(out, k, static_cast<std::int16_t>(v)); break;
      case Dtype::U16: fits(0, 65535); put(out, k, static_cast<std::uint16_t>(v)); break;
      case Dtype::I32: fits(-2147483648.0L, 2147483647.0L); put(out, k, static_cast<std::int32_t>(v)); break;
      case Dtype::U32: fits(0, 4294967295.0L); put(out, k, static_cast<std::uint32_t>(v)); break;
      case Dtype::I64: fits(-9223372036854775808.0L, 9223372036854775807.0L); put(out, k, static_cast<std::int64_t>(v)); break;
      case Dtype::U64: fits(0, 18446744073709551615.0L); put(out, k, static_cast<std::uint64_t>(v)); break;
      default:
        detail::fail("SafeTensorsBuilder::add: tensor '", name, "': cannot store an integer matrix as ", dtype_name(dtype));
    }
  }

  std::vector<Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace lora
