// CRC-32C of device memory, so a GPU-resident KV payload is checksummed where it lies instead
// of through a host copy. Same function as csrc/cpu/crc32c.cpp (reflected 0x82F63B78).
//
// Each thread takes a 512-byte chunk and runs the slicing-by-8 table update from state 0 (tables
// in shared memory); a block's 256 chunk states are joined in a log-step tree with
// crc(A || B) = crc(A) * x^(8|B|) + crc(B) (raw states, mod P); the host joins the per-block
// states the same way, starting from the seed. Raw states are linear in the data, which is what
// makes chunks independent.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "../crc32c_poly.h"
#include "crc32c_cuda.h"
#include "device_guard.h"

namespace tkv::cuda {
namespace {

// 512 bytes a thread: a block covers 128 KiB, so a few-MB request payload still spreads over
// the SMs (4 KiB chunks gave 16 blocks for 16 MiB on a 132-SM H100), and each thread's serial
// table walk is 64 steps of 8 bytes.
constexpr int kChunk = 512;
constexpr int kThreads = 256;

struct Tables {
  uint32_t slice[8][256];
  uint32_t x2n[32];  // x^(2^k) mod P
};

Tables make_tables() {
  Tables t{};
  crc32c_make_tables(t.slice, t.x2n);
  return t;
}

__host__ __device__ inline uint32_t multmodp(uint32_t a, uint32_t b) {
  return crc32c_multmodp(a, b);
}

// x^(8 * nbytes) mod P from the x^(2^k) table.
__host__ __device__ inline uint32_t shift_op(const uint32_t* x2n, uint64_t nbytes) {
  uint32_t p = 1u << 31;
  unsigned k = 3;
  for (uint64_t n = nbytes; n; n >>= 1, ++k)
    if (n & 1) p = multmodp(x2n[k % 31], p);  // CRC-32C: x^(2^31) == x mod P, period 31
  return p;
}

__global__ void crc_blocks_kernel(const uint8_t* __restrict__ data, uint64_t nbytes,
                                  const Tables* __restrict__ tables, uint32_t* __restrict__ out) {
  __shared__ uint32_t slice[8][256];
  __shared__ uint32_t x2n[32];
  __shared__ uint32_t states[kThreads];
  for (int i = threadIdx.x; i < 8 * 256; i += blockDim.x)
    slice[i / 256][i % 256] = tables->slice[i / 256][i % 256];
  if (threadIdx.x < 32) x2n[threadIdx.x] = tables->x2n[threadIdx.x];
  __syncthreads();
  const uint64_t base = static_cast<uint64_t>(blockIdx.x) * kThreads * kChunk;
  auto chunk_begin = [&](uint64_t t) {
    const uint64_t b = base + t * kChunk;
    return b < nbytes ? b : nbytes;
  };
  const uint64_t begin = chunk_begin(threadIdx.x), end = chunk_begin(threadIdx.x + 1);
  const uint8_t* p = data + begin;
  uint64_t n = end - begin;
  uint32_t crc = 0;  // raw state over this chunk alone
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = slice[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    --n;
  }
  for (; n >= 8; n -= 8, p += 8) {
    const uint64_t v = *reinterpret_cast<const uint64_t*>(p) ^ crc;
    crc = slice[7][v & 0xFF] ^ slice[6][(v >> 8) & 0xFF] ^ slice[5][(v >> 16) & 0xFF] ^
          slice[4][(v >> 24) & 0xFF] ^ slice[3][(v >> 32) & 0xFF] ^ slice[2][(v >> 40) & 0xFF] ^
          slice[1][(v >> 48) & 0xFF] ^ slice[0][v >> 56];
  }
  while (n--) crc = slice[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  states[threadIdx.x] = crc;
  __syncthreads();
  // join neighbours: after the step of stride s, thread t (t % 2s == 0) holds chunks t..t+2s-1
  for (int s = 1; s < kThreads; s <<= 1) {
    const int t = threadIdx.x;
    if (t % (2 * s) == 0 && t + s < kThreads) {
      const uint64_t right = chunk_begin(t + 2 * s < kThreads ? t + 2 * s : kThreads) -
                             chunk_begin(t + s);
      if (right) states[t] = multmodp(shift_op(x2n, right), states[t]) ^ states[t + s];
    }
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
    static const Tables host = make_tables();
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
  static const Tables host = make_tables();
  uint32_t state = ~seed;
  if (nbytes == 0) {
    *result = seed;
    return {};
  }
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  DeviceTables& tables = device_tables(device);
  if (!tables.ptr) return "CRC tables: " + tables.error;
  const uint64_t per_block = static_cast<uint64_t>(kThreads) * kChunk;
  const uint64_t blocks = (nbytes + per_block - 1) / per_block;
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
  const uint32_t full_shift = shift_op(host.x2n, per_block);  // every block but the last
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint32_t shift =
        (b + 1 < blocks) ? full_shift : shift_op(host.x2n, nbytes - b * per_block);
    state = multmodp(shift, state) ^ host_states[b];
  }
  *result = ~state;
  return {};
}

}  // namespace tkv::cuda
