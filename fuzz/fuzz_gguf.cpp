// libFuzzer target over the GGUF reader: any byte string must either parse (and then every
// float tensor must convert without reading outside the buffer) or throw lora::Error. A file that
// parses is written again by GgufBuilder (same alignment, metadata and tensors); the reader must
// accept what the writer wrote and find the same values and bytes.
#include <lora/gguf.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace {

void convert(const lora::Gguf& g, const lora::GgufTensorInfo& t) {
  if (t.numel() > (1u << 20)) return;  // keep each input fast; sizes are validated anyway
  if (t.type != 0 && t.type != 1 && t.type != 28 && t.type != 30) return;
  volatile double s = g.matrix<double>(t.name).sum();
  (void)s;
}

void write_and_read_back(const lora::Gguf& g) {
  lora::GgufBuilder b;
  for (const auto& [k, v] : g.metadata()) b.metadata(k, v);
  for (const auto& t : g.tensors()) b.add_raw(t.name, t.type, t.ne, std::vector<std::uint8_t>(g.bytes(t.name), g.bytes(t.name) + t.bytes));
  const lora::Gguf back = lora::Gguf::from_bytes(b.serialize(), "fuzz (written back)");
  if (back.metadata() != g.metadata() || back.tensors().size() != g.tensors().size() || back.alignment() != g.alignment()) std::abort();
  for (const auto& t : g.tensors()) {
    const lora::GgufTensorInfo& u = back.info(t.name);
    if (u.type != t.type || u.ne != t.ne || u.offset != t.offset || u.bytes != t.bytes ||
        std::memcmp(back.bytes(t.name), g.bytes(t.name), t.bytes) != 0)
      std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<lora::Gguf> g;
  try {
    g.emplace(lora::Gguf::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz"));
  } catch (const lora::Error&) {
    return 0;
  }
  for (const auto& t : g->tensors()) convert(*g, t);
  try {
    write_and_read_back(*g);
  } catch (const lora::Error&) {
    std::abort();  // the writer refused what the reader accepted, or wrote what it refuses
  }
  return 0;
}
