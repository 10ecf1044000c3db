# LORA_BLAS: the GEMM behind Eigen's float and double products (the ones a forward or backward
# spends its time in).
#   auto      the fastest on this CPU, measured now (cmake/lora_blas_probe.cpp, one thread) among
#             OpenBLAS, BLIS and Eigen's own kernels; Eigen when neither library is found
#   openblas  OpenBLAS, linked by name (Debian: libopenblas-openmp-dev)
#   blis      BLIS, linked by name (Debian: libblis-openmp-dev)
#   eigen     Eigen's own kernels
# A library is linked by its own file (the OpenMP build first, so that one OpenMP runtime holds
# every thread: lora::set_num_threads sets it and the library's parallel loops alike), never
# through libblas.so.3, which Debian's alternatives may point at the reference BLAS (40x slower).
# Eigen then calls sgemm_/dgemm_ (EIGEN_USE_BLAS); LORA_BLAS_OPENBLAS or LORA_BLAS_BLIS tells
# lora::set_num_threads whose thread count to set. Sets LORA_BLAS_SELECTED and
# LORA_BLAS_LIBRARY (empty for eigen).

set(LORA_BLAS auto CACHE STRING "GEMM behind the products: auto (fastest measured), openblas, blis or eigen")
set_property(CACHE LORA_BLAS PROPERTY STRINGS auto openblas blis eigen)
if(DEFINED LORA_USE_BLAS)
  message(WARNING "lora: LORA_USE_BLAS is gone; LORA_BLAS=auto|openblas|blis|eigen chooses the GEMM (default auto)")
endif()
if(NOT LORA_BLAS MATCHES "^(auto|openblas|blis|eigen)$")
  message(FATAL_ERROR "lora: LORA_BLAS='${LORA_BLAS}' is not one of auto, openblas, blis, eigen")
endif()

set(_lora_libdir /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE})
find_library(LORA_OPENBLAS_LIBRARY NAMES openblas
  HINTS ${_lora_libdir}/openblas-openmp ${_lora_libdir}/openblas-pthread ${_lora_libdir}/openblas-serial
  DOC "OpenBLAS, for LORA_BLAS=openblas or auto")
find_library(LORA_BLIS_LIBRARY NAMES blis
  HINTS ${_lora_libdir}/blis-openmp ${_lora_libdir}/blis-pthread ${_lora_libdir}/blis-serial
  DOC "BLIS, for LORA_BLAS=blis or auto")

# Runs the probe against one candidate ("eigen" or a library's path); its score (ns per million multiply-adds) goes to
# out_var (empty when it does not build or run), OpenBLAS's kernels' name to LORA_BLAS_PROBE_CORE_<name>. Cached per
# candidate, flags, OPENBLAS_CORETYPE (which OpenBLAS reads when it loads) and the probe's sources.
function(lora_blas_probe name lib out_var)
  set(flags -O2)
  if(LORA_NATIVE)
    set(flags -O3 -march=native)
  endif()
  file(SHA1 ${CMAKE_CURRENT_SOURCE_DIR}/cmake/lora_blas_probe.cpp probe_sha)
  file(SHA1 ${CMAKE_CURRENT_SOURCE_DIR}/include/lora/detail/openblas_kernels.hpp kernels_sha)
  set(key "${name}|${lib}|${flags}|$ENV{OPENBLAS_CORETYPE}|${probe_sha}|${kernels_sha}")
  if(DEFINED LORA_BLAS_PROBE_${name} AND LORA_BLAS_PROBE_KEY_${name} STREQUAL key)
    set(${out_var} "${LORA_BLAS_PROBE_${name}}" PARENT_SCOPE)
    return()
  endif()
  if(name STREQUAL "eigen")
    set(defs ${flags} -DLORA_PROBE_EIGEN)
    set(libs Eigen3::Eigen)
  else()
    set(defs ${flags})
    set(libs ${lib})
  endif()
  try_run(run_rc compile_ok ${CMAKE_CURRENT_BINARY_DIR}/lora_blas_probe/${name}
    ${CMAKE_CURRENT_SOURCE_DIR}/cmake/lora_blas_probe.cpp
    COMPILE_DEFINITIONS ${defs}
    LINK_LIBRARIES ${libs}
    CMAKE_FLAGS -DCMAKE_CXX_STANDARD=17 -DINCLUDE_DIRECTORIES=${CMAKE_CURRENT_SOURCE_DIR}/include
    COMPILE_OUTPUT_VARIABLE compile_log
    RUN_OUTPUT_VARIABLE run_out)
  set(us "")
  set(core "")
  if(compile_ok AND run_rc EQUAL 0 AND run_out MATCHES "^([0-9]+)")
    set(us ${CMAKE_MATCH_1})
    if(run_out MATCHES "\n([A-Za-z0-9_]+)")
      set(core ${CMAKE_MATCH_1})
    endif()
  else()
    message(STATUS "lora: the GEMM probe did not run with ${name}")
  endif()
  set(LORA_BLAS_PROBE_CORE_${name} "${core}" CACHE INTERNAL "")
  set(LORA_BLAS_PROBE_${name} "${us}" CACHE INTERNAL "")
  set(LORA_BLAS_PROBE_KEY_${name} "${key}" CACHE INTERNAL "")
  set(${out_var} "${us}" PARENT_SCOPE)
endfunction()

if(LORA_BLAS STREQUAL "auto")
  set(LORA_BLAS_SELECTED eigen)
  if(CMAKE_CROSSCOMPILING)
    # Nothing to measure on: the first library found.
    if(LORA_OPENBLAS_LIBRARY)
      set(LORA_BLAS_SELECTED openblas)
    elseif(LORA_BLIS_LIBRARY)
      set(LORA_BLAS_SELECTED blis)
    endif()
  else()
    lora_blas_probe(eigen "" best)
    set(report "eigen ${best}")
    foreach(cand openblas blis)
      string(TOUPPER ${cand} up)
      if(LORA_${up}_LIBRARY)
        lora_blas_probe(${cand} ${LORA_${up}_LIBRARY} us)
        string(APPEND report ", ${cand} ${us}")
        if(NOT LORA_BLAS_PROBE_CORE_${cand} STREQUAL "")
          string(APPEND report " with ${LORA_BLAS_PROBE_CORE_${cand}} kernels")
        endif()
        if(NOT us STREQUAL "" AND (best STREQUAL "" OR us LESS best))
          set(best ${us})
          set(LORA_BLAS_SELECTED ${cand})
        endif()
      endif()
    endforeach()
    message(STATUS "lora: GEMM probe, one thread, ns per 1e6 multiply-adds (${report}): ${LORA_BLAS_SELECTED}")
    if(LORA_BLAS_PROBE_CORE_openblas STREQUAL "Prescott")
      # Left on its SSE3 fallback: a CPU without AVX2, or OPENBLAS_CORETYPE=Prescott set (openblas_kernels.hpp).
      message(STATUS "lora: OpenBLAS runs its generic Prescott (SSE3) kernels on this CPU")
    endif()
  endif()
else()
  set(LORA_BLAS_SELECTED ${LORA_BLAS})
  string(TOUPPER ${LORA_BLAS} up)
  if(NOT LORA_BLAS STREQUAL "eigen" AND NOT LORA_${up}_LIBRARY)
    message(FATAL_ERROR "lora: LORA_BLAS=${LORA_BLAS} but no lib${LORA_BLAS} was found "
      "(Debian: apt-get install lib${LORA_BLAS}-openmp-dev; or set LORA_${up}_LIBRARY to its file)")
  endif()
endif()

set(LORA_BLAS_LIBRARY "")
if(NOT LORA_BLAS_SELECTED STREQUAL "eigen")
  string(TOUPPER ${LORA_BLAS_SELECTED} up)
  set(LORA_BLAS_LIBRARY ${LORA_${up}_LIBRARY})
endif()
message(STATUS "lora: products run in ${LORA_BLAS_SELECTED} ${LORA_BLAS_LIBRARY}")
