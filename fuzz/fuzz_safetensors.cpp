// libFuzzer target over the safetensors parser: any byte string must either parse (and then
// every tensor must convert without reading outside the buffer) or throw lora::Error.
#include <lora/safetensors.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    lora::SafeTensors st = lora::SafeTensors::from_bytes(data, size, "fuzz");
    for (const auto& t : st.tensors()) {
      if (t.numel() > (1u << 20)) continue;  // keep each input fast; sizes are validated anyway
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
  } catch (const lora::Error&) {
  }
  return 0;
}
