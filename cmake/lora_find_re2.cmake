# RE2, which matches the regular expressions of adapter configs in linear time: its CMake package
# where the system ships one, else pkg-config's re2.pc (Debian 12's libre2-dev has only that).
# Either way the target is re2::re2. Used by the build and by the installed loraConfig.cmake.
if(NOT TARGET re2::re2)
  find_package(re2 CONFIG QUIET)
  if(NOT re2_FOUND)
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(LORA_RE2 REQUIRED IMPORTED_TARGET GLOBAL re2)
    add_library(re2::re2 ALIAS PkgConfig::LORA_RE2)
  endif()
endif()
