// fixture_check FILE...: runs every comparison the unit tests make for each fixture file (its
// kind read from the metadata "case"), in double and in float, and prints one line each.
// Exits 1 when a comparison is over tolerance or a kind is not supported yet, 2 on a bad file.
#include "fixture_cases.hpp"

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: fixture_check FILE.safetensors...\n");
    return 2;
  }
  int status = 0;
  for (int i = 1; i < argc; ++i) {
    try {
      fixture::Report r = fixture::check_file(argv[i]);
      if (!r.supported) {
        std::printf("%s: %s: UNSUPPORTED (%s)\n", argv[i], r.kind.c_str(), r.note.c_str());
        status = std::max(status, 1);
        continue;
      }
      for (const auto& c : r.comparisons)
        std::printf("%s: %s %-6s %-26s max error %.3e (tolerance %.0e) %s\n", argv[i], r.kind.c_str(),
                    c.scalar.c_str(), c.what.c_str(), c.error, c.tolerance, c.ok() ? "ok" : "FAIL");
      if (!r.ok()) status = std::max(status, 1);
    } catch (const std::exception& e) {
      std::printf("%s: ERROR %s\n", argv[i], e.what());
      status = 2;
    }
  }
  return status;
}
