// Host entry points of the CUDA format v1 kernels (no CUDA or torch headers needed to call).
#pragma once

#include <cstdint>
#include <string>

namespace tkv::cuda {

// Returns "" on success, else the CUDA error text. Pointers are device pointers; the kernels
// run on `stream` (a cudaStream_t as an integer) of device `device`. channels > 0 selects the
// per-channel layout: x/y [R, tokens, channels] read/written with stride `channels`, groups
// along tokens (as the CPU kernels).
// row_index (a device array, per-token layout only): the paged cache's slot of each row of
// `row_groups` groups; quantize writes row t's outputs to row row_index[t], dequantize reads
// row t's inputs from row row_index[t] of the `slot_rows` rows there. An index outside
// [0, slot_rows) skips its row (-1 marks padding; the Python caller checks the rest, except
// under CUDA-graph capture, where it cannot and the kernels drop them instead).
std::string quantize(int dtype, const void* x, void* packed, void* scale, void* minimum,
                     int64_t n_groups, int group_size, int bits, int device, uintptr_t stream,
                     int64_t tokens = 0, int64_t channels = 0, const int64_t* row_index = nullptr,
                     int64_t row_groups = 0, int64_t slot_rows = 0);
std::string dequantize(int dtype, const void* packed, const void* scale, const void* minimum,
                       void* y, int64_t n_groups, int group_size, int bits, int device,
                       uintptr_t stream, int64_t tokens = 0, int64_t channels = 0,
                       const int64_t* row_index = nullptr, int64_t row_groups = 0,
                       int64_t slot_rows = 0);

// Number of visible devices, or -1 with the reason in `why` (e.g. "no CUDA driver").
int device_count(std::string* why);
// CUDA runtime version this module was built with (e.g. 13000).
int runtime_version();

}  // namespace tkv::cuda
