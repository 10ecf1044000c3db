// libFuzzer target over adapter_config.json parsing and module matching. The input is the
// config's text, then optionally a NUL and NUL-separated module paths (any length, any bytes), as
// a hostile adapter file supplies them in its tensor names. Any text must either parse (and then
// matching every path against target_modules, exclude_modules and the patterns must return, in
// time linear in the path, and writing the config back must parse to the same text) or throw
// lora::Error.
#include <lora/peft.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string text = input.substr(0, nul);
  std::vector<std::string> modules = {"q_proj", "model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", ""};
  for (std::size_t at = nul; at != std::string::npos;) {
    const std::size_t next = input.find('\0', at + 1);
    modules.push_back(input.substr(at + 1, next == std::string::npos ? std::string::npos : next - at - 1));
    at = next;
  }
  // One long path built from the last one: matching must stay linear and within the stack.
  if (!modules.back().empty() && modules.back().size() < 64) {
    std::string long_path;
    while (long_path.size() < 50000) long_path += modules.back();
    modules.push_back(long_path);
  }

  lora::PeftConfig c;
  try {
    c = lora::PeftConfig::from_json(text, "fuzz");
  } catch (const lora::Error&) {
    return 0;
  }
  for (const auto& m : modules) {
    (void)c.targets(m);
    if (c.rank_for(m) < 1 || !(c.alpha_for(m) > 0)) std::abort();
  }
  const std::string out = c.to_json();
  if (lora::PeftConfig::from_json(out, "fuzz (written back)").to_json() != out) std::abort();
  return 0;
}
