// What the device CRC-32C's threads and its host join compute (crc32c_cuda.cu), as
// __host__ __device__ code so tests/cuda_emulation runs the same steps on the CPU.
//
// Each thread takes a kChunk-byte chunk and runs the slicing-by-8 table update from state 0; a
// block's kThreads chunk states are joined in a log-step tree with
// crc(A || B) = crc(A) * x^(8|B|) + crc(B) (raw states, mod P); the host joins the per-block
// states the same way, starting from the seed. Raw states are linear in the data, which is what
// makes chunks independent.
#pragma once

#include <cstdint>
#include <vector>

#include "../crc32c_poly.h"

namespace tkv::cuda::crc {

// 512 bytes a thread: a block covers 128 KiB, so a few-MB request payload still spreads over
// the SMs (4 KiB chunks gave 16 blocks for 16 MiB on a 132-SM H100), and each thread's serial
// table walk is 64 steps of 8 bytes.
constexpr int kChunk = 512;
constexpr int kThreads = 256;
constexpr uint64_t kPerBlock = static_cast<uint64_t>(kThreads) * kChunk;

struct Tables {
  uint32_t slice[8][256];
  uint32_t x2n[32];  // x^(2^k) mod P
};

inline Tables make_tables() {
  Tables t{};
  crc32c_make_tables(t.slice, t.x2n);
  return t;
}

// x^(8 * nbytes) mod P from the x^(2^k) table.
__host__ __device__ inline uint32_t shift_op(const uint32_t* x2n, uint64_t nbytes) {
  uint32_t p = 1u << 31;
  unsigned k = 3;
  for (uint64_t n = nbytes; n; n >>= 1, ++k)
    if (n & 1) p = crc32c_multmodp(x2n[k % 31], p);  // CRC-32C: x^(2^31) == x mod P, period 31
  return p;
}

// Byte offset where thread t's chunk of block `block` begins (clamped to nbytes).
__host__ __device__ inline uint64_t chunk_begin(uint64_t block, uint64_t t, uint64_t nbytes) {
  const uint64_t b = block * kPerBlock + t * kChunk;
  return b < nbytes ? b : nbytes;
}

// Raw state of one chunk from state 0: bytes up to 8-byte alignment, 8 at a time, the tail.
__host__ __device__ inline uint32_t chunk_state(const uint32_t (*slice)[256], const uint8_t* p,
                                                uint64_t n) {
  uint32_t crc = 0;
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
  return crc;
}

// One step of the in-block tree join, for thread t at stride s: after it, thread t
// (t % 2s == 0) holds the raw state of chunks t .. t+2s-1. Threads of one step touch disjoint
// entries, so a step may run its threads in any order (the GPU: all at once, then a barrier).
__host__ __device__ inline void join_step(uint32_t* states, const uint32_t* x2n, int t, int s,
                                          uint64_t block, uint64_t nbytes) {
  if (t % (2 * s) != 0 || t + s >= kThreads) return;
  const uint64_t right = chunk_begin(block, t + 2 * s < kThreads ? t + 2 * s : kThreads, nbytes) -
                         chunk_begin(block, t + s, nbytes);
  if (right) states[t] = crc32c_multmodp(shift_op(x2n, right), states[t]) ^ states[t + s];
}

// The host's join of the per-block raw states into the finished CRC, continuing from `seed`.
inline uint32_t join_blocks(const std::vector<uint32_t>& block_states, uint64_t nbytes,
                            uint32_t seed, const uint32_t* x2n) {
  uint32_t state = ~seed;
  const uint64_t blocks = block_states.size();
  const uint32_t full_shift = shift_op(x2n, kPerBlock);  // every block but the last
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint32_t shift = (b + 1 < blocks) ? full_shift : shift_op(x2n, nbytes - b * kPerBlock);
    state = crc32c_multmodp(shift, state) ^ block_states[b];
  }
  return ~state;
}

}  // namespace tkv::cuda::crc
