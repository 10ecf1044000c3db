// The process's heap, counted: live bytes now and the peak since reset_peak(), so a demo reports
// each method's training memory as measured (parameters, gradients, optimizer state, activations
// and every temporary), not from a formula. heap_count.cpp wraps malloc and free (glibc) to count;
// in a sanitizer build, whose runtime owns malloc, counting is off and available() is false.
#pragma once

#include <cstddef>

namespace demo::heap {

bool available();
std::size_t live();  // bytes allocated and not yet freed (malloc_usable_size of each block)
std::size_t peak();  // the most live() has been since the last reset_peak()
void reset_peak();   // peak() = live()

}  // namespace demo::heap
