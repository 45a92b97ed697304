// Portable scalar variant: builds for any CPU and handles every valid group size.
#include "cpu_kernels.h"
#include "scalar_ranges.h"

namespace tkv::cpu {

Variant generic_variant() {
  return {"generic", &quantize_range_scalar, &dequantize_range_scalar};
}

}  // namespace tkv::cpu
