// CRC-32C of device memory, so a GPU-resident KV payload is checksummed where it lies instead
// of through a host copy. Same function as csrc/cpu/crc32c.cpp (reflected 0x82F63B78). The
// per-thread steps and the joins are in crc32c_threads.cuh (also run on the CPU by
// tests/cuda_emulation); here: shared-memory tables, the launch and the barriers.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "crc32c_cuda.h"
#include "crc32c_threads.cuh"
#include "device_guard.h"

namespace tkv::cuda {
namespace {

using crc::kThreads;
using crc::Tables;

__global__ void crc_blocks_kernel(const uint8_t* __restrict__ data, uint64_t nbytes,
                                  const Tables* __restrict__ tables, uint32_t* __restrict__ out) {
  __shared__ uint32_t slice[8][256];
  __shared__ uint32_t x2n[32];
  __shared__ uint32_t states[kThreads];
  for (int i = threadIdx.x; i < 8 * 256; i += blockDim.x)
    slice[i / 256][i % 256] = tables->slice[i / 256][i % 256];
  if (threadIdx.x < 32) x2n[threadIdx.x] = tables->x2n[threadIdx.x];
  __syncthreads();
  const uint64_t begin = crc::chunk_begin(blockIdx.x, threadIdx.x, nbytes);
  const uint64_t end = crc::chunk_begin(blockIdx.x, threadIdx.x + 1, nbytes);
  states[threadIdx.x] = crc::chunk_state(slice, data + begin, end - begin);
  __syncthreads();
  for (int s = 1; s < kThreads; s <<= 1) {
    crc::join_step(states, x2n, threadIdx.x, s, blockIdx.x, nbytes);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = states[0];
}

struct DeviceTables {
  Tables* ptr = nullptr;
  std::string error;
};

// One copy of the tables per device, uploaded on first use.
DeviceTables& device_tables(int device) {
  static std::vector<DeviceTables> per_device(64);
  if (device < 0 || device >= 64) {
    static DeviceTables bad{nullptr, "device index out of range"};
    return bad;
  }
  static std::mutex mutex;  // senders and receivers checksum from several threads
  std::lock_guard<std::mutex> lock(mutex);
  DeviceTables& d = per_device[device];
  if (!d.ptr) {  // a failed upload (say, a transient out-of-memory) is retried next call
    static const Tables host = crc::make_tables();
    cudaError_t e = cudaMalloc(&d.ptr, sizeof(Tables));
    if (e == cudaSuccess) e = cudaMemcpy(d.ptr, &host, sizeof(Tables), cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
      if (d.ptr) cudaFree(d.ptr);
      d.error = cudaGetErrorString(e);
      d.ptr = nullptr;
    }
  }
  return d;
}

}  // namespace

std::string crc32c_device(const void* data, uint64_t nbytes, uint32_t seed, int device,
                          uintptr_t stream, uint32_t* result) {
  static const Tables host = crc::make_tables();
  if (nbytes == 0) {
    *result = seed;
    return {};
  }
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  DeviceTables& tables = device_tables(device);
  if (!tables.ptr) return "CRC tables: " + tables.error;
  const uint64_t blocks = (nbytes + crc::kPerBlock - 1) / crc::kPerBlock;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  uint32_t* states = nullptr;
  e = cudaMallocAsync(&states, blocks * sizeof(uint32_t), st);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  crc_blocks_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(
      static_cast<const uint8_t*>(data), nbytes, tables.ptr, states);
  std::vector<uint32_t> host_states(blocks);
  e = cudaGetLastError();
  if (e == cudaSuccess)
    e = cudaMemcpyAsync(host_states.data(), states, blocks * sizeof(uint32_t),
                        cudaMemcpyDeviceToHost, st);
  cudaFreeAsync(states, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  *result = crc::join_blocks(host_states, nbytes, seed, host.x2n);
  return {};
}

}  // namespace tkv::cuda
