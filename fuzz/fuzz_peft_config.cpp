// libFuzzer target over adapter_config.json parsing: any text must either parse (and then module
// matching, the patterns and writing the config back must work, and what is written must parse
// to the same text) or throw lora::Error.
#include <lora/peft.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  lora::PeftConfig c;
  try {
    c = lora::PeftConfig::from_json(text, "fuzz");
  } catch (const lora::Error&) {
    return 0;
  }
  // A repeated group ("(a*)*") can backtrack exponentially in std::regex, as in Python's re:
  // such configs are accepted, as PEFT accepts them, and not matched here.
  if (text.find(")*") != std::string::npos || text.find(")+") != std::string::npos || text.find("){") != std::string::npos)
    return 0;
  for (const char* m : {"q_proj", "model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", ""}) {
    (void)c.targets(m);
    if (c.rank_for(m) < 1 || !(c.alpha_for(m) > 0)) std::abort();
  }
  const std::string out = c.to_json();
  if (lora::PeftConfig::from_json(out, "fuzz (written back)").to_json() != out) std::abort();
  return 0;
}
