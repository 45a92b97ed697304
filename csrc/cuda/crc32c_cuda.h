// CRC-32C of device memory (see crc32c_cuda.cu); no CUDA headers needed to call it.
#pragma once

#include <cstdint>
#include <string>

namespace tkv::cuda {

// CRC-32C of nbytes at device pointer `data` on `device`, continuing from `seed` (as
// tkv::crc32c on the host). Runs on `stream` and waits for it. Returns "" or the CUDA error.
std::string crc32c_device(const void* data, uint64_t nbytes, uint32_t seed, int device,
                          uintptr_t stream, uint32_t* result);

}  // namespace tkv::cuda
