// OpenBLAS's kernels on a CPU it does not know.
//
// A DYNAMIC_ARCH OpenBLAS (Debian's) picks its kernels when it loads, by the CPU's family and
// model numbers, and on an x86-64 model newer than its release falls back to its SSE3 "Prescott"
// kernels: Debian 12's 0.3.21 on Sapphire Rapids runs sgemm 512 × 1024 × 1024 in 34 ms there,
// in 7.0 ms in its SkylakeX kernels (one thread). Later OpenBLAS releases choose by instruction
// set when the model is unknown; openblas_choose_kernels does the same, once, when a program
// linked with LORA_BLAS=openblas starts (types.hpp): from Prescott to SkylakeX where the CPU and
// the OS run AVX-512 F, CD, BW, DQ and VL, to Haswell where they run AVX2 and FMA. (Cooperlake's
// and SapphireRapids' sgemm/dgemm are SkylakeX's; they add bf16 kernels the library does not call.)
//
// It goes OpenBLAS's own way for OPENBLAS_CORETYPE: gotoblas_dynamic_quit forgets the kernels,
// gotoblas_dynamic_init picks them again and reads the variable. So a user's OPENBLAS_CORETYPE
// wins (nothing is done when it is set), and the environment is left as it was found. An OpenBLAS
// without those functions (a build for one CPU, not DYNAMIC_ARCH) is left alone. No BLAS call may
// be running meanwhile: it runs during the program's static initialisation.
//
// Needs no Eigen: configure's GEMM probe (cmake/lora_blas_probe.cpp) includes it, so that
// LORA_BLAS=auto measures the kernels the library will run.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

extern "C" {
char* openblas_get_corename() __attribute__((weak));
void gotoblas_dynamic_init() __attribute__((weak));
void gotoblas_dynamic_quit() __attribute__((weak));
}

namespace lora::detail {

// The kernels OpenBLAS should run on this CPU instead of Prescott; "" for none better.
inline const char* openblas_kernels_for_cpu() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // may run before the runtime's own constructor that fills its CPU table
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return "";
}

// Makes OpenBLAS run `core`'s kernels ("SkylakeX", "Haswell", "Prescott", ...), as
// OPENBLAS_CORETYPE=core does when it loads; the environment is left as it was found. Needs a
// DYNAMIC_ARCH OpenBLAS (gotoblas_dynamic_init/quit exported); returns false, changing nothing,
// without one.
inline bool openblas_set_kernels(const char* core) {
  if (!gotoblas_dynamic_quit || !gotoblas_dynamic_init) return false;
  const char* was = std::getenv("OPENBLAS_CORETYPE");
  const std::string saved = was ? was : "";
  setenv("OPENBLAS_CORETYPE", core, 1);
  gotoblas_dynamic_quit();
  gotoblas_dynamic_init();
  if (was)
    setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
  else
    unsetenv("OPENBLAS_CORETYPE");
  return true;
}

// The kernels OpenBLAS runs now ("" when no OpenBLAS is linked).
inline std::string openblas_kernels() { return openblas_get_corename ? openblas_get_corename() : ""; }

// Moves OpenBLAS off its Prescott fallback (see above). Returns the name of the kernels OpenBLAS
// runs afterwards, "" when no OpenBLAS is linked.
inline std::string openblas_choose_kernels() {
  const char* core = openblas_kernels_for_cpu();
  if (openblas_kernels() == "Prescott" && *core && !std::getenv("OPENBLAS_CORETYPE")) openblas_set_kernels(core);
  return openblas_kernels();
}

}  // namespace lora::detail
