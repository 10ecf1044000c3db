// libFuzzer target over the safetensors parser: any byte string must either parse (and then
// every tensor must convert without reading outside the buffer) or throw lora::Error. A file
// that parses is written again by SafeTensorsBuilder; the reader must accept what the writer
// wrote and find the same tensors, bytes and metadata.
#include <lora/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace {

void convert(const lora::SafeTensors& st, const lora::TensorInfo& t) {
  if (t.numel() > (1u << 20)) return;  // keep each input fast; sizes are validated anyway
  try {
    if (lora::detail::is_float_dtype(t.dtype)) {
      volatile double s = st.matrix<double>(t.name).sum();
      (void)s;
      if (st.can_map<float>(t.name)) (void)st.map<float>(t.name).sum();
    } else {
      volatile double s = st.integers(t.name).cast<double>().sum();  // int64 sums may overflow
      (void)s;
    }
  } catch (const lora::Error&) {
  }
}

void write_and_read_back(const lora::SafeTensors& st) {
  lora::SafeTensorsBuilder b;
  for (const auto& t : st.tensors()) {
    const std::uint8_t* p = st.bytes(t.name);
    b.add_raw(t.name, t.dtype, t.shape, std::vector<std::uint8_t>(p, p + (t.end - t.begin)));
  }
  for (const auto& [k, v] : st.metadata()) b.metadata(k, v);
  const lora::SafeTensors back = lora::SafeTensors::from_bytes(b.serialize(), "fuzz (written back)");
  if (back.tensors().size() != st.tensors().size() || back.metadata() != st.metadata()) std::abort();
  for (const auto& t : st.tensors()) {
    const lora::TensorInfo& u = back.info(t.name);
    if (u.dtype != t.dtype || u.shape != t.shape || u.end - u.begin != t.end - t.begin ||
        std::memcmp(back.bytes(t.name), st.bytes(t.name), t.end - t.begin) != 0)
      std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<lora::SafeTensors> st;
  try {
    st.emplace(lora::SafeTensors::from_bytes(data, size, "fuzz"));
  } catch (const lora::Error&) {
    return 0;
  }
  for (const auto& t : st->tensors()) convert(*st, t);
  try {
    write_and_read_back(*st);
  } catch (const lora::Error&) {
    std::abort();  // the writer wrote what the reader refuses, or refused what the reader accepted
  }
  return 0;
}
