// Runs every comparison a fixture file supports, in double and in float, against the values
// PEFT/torch recorded. Shared by the unit tests and by the fixture_check program, so both make
// exactly the same checks. The kind comes from the metadata "case" (see the fixtures README);
// shapes, r, alpha and flags are all read from the file, never assumed.
//
// Tolerances: double <= 1e-10 absolute; float <= 1e-5 relative to the largest |expected|.
#pragma once

#include <string>
#include <vector>

namespace fixture {

struct Comparison {
  std::string scalar;  // "double" or "float"
  std::string what;
  double error;  // absolute (double) or relative to max |expected| (float)
  double tolerance;
  bool ok() const { return error <= tolerance; }  // false for NaN too
};

struct Report {
  std::string kind;
  bool supported = false;
  std::string note;  // why a kind is not supported
  std::vector<Comparison> comparisons;
  bool ok() const {
    if (!supported || comparisons.empty()) return false;
    for (const auto& c : comparisons)
      if (!c.ok()) return false;
    return true;
  }
};

// Opens a fixture file and runs every comparison its kind supports, in double and in float.
// Compiled once (fixture_cases.cpp) and shared by the tests that use it and fixture_check.
Report check_file(const std::string& path);

}  // namespace fixture
