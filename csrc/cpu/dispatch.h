// Runtime selection of the CPU variant and the threaded entry points.
#pragma once

#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace tkv::cpu {

// Variants compiled into this build that this CPU can run, slowest first.
const std::vector<Variant>& usable_variants();
// The variant in use: the fastest usable one, or THUNDERKV_CPU_ISA if set.
const Variant& active_variant();
// Force a variant by name ("generic", "avx2", "avx512"); throws std::invalid_argument.
void set_active_variant(const std::string& name);

int max_threads();
bool have_openmp();

// threads <= 0: use the OpenMP default.
void quantize(const QuantArgs& a, int threads);
void dequantize(const DequantArgs& a, int threads);

}  // namespace tkv::cpu
