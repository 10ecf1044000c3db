// The library's version, as CMake's project() has it (CMakeLists.txt refuses to configure when
// the two disagree).
#pragma once

#define LORA_VERSION_MAJOR 0
#define LORA_VERSION_MINOR 1
#define LORA_VERSION_PATCH 0
#define LORA_VERSION_STRING "0.1.0"
