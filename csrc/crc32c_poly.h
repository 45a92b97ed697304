// CRC-32C polynomial arithmetic shared by the host (csrc/cpu/crc32c.cpp) and the device
// (csrc/cuda/crc32c_cuda.cu) implementations: reflected representation, x^0 is 1 << 31.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TKV_CRC_HD __host__ __device__
#else
#define TKV_CRC_HD
#endif

namespace tkv {

constexpr uint32_t kCrc32cPoly = 0x82F63B78u;

// a * b mod P (zlib's multmodp).
TKV_CRC_HD inline uint32_t crc32c_multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kCrc32cPoly : b >> 1;
  }
  return p;
}

// The slicing-by-8 tables (slice[0] is the bytewise table) and x^(2^k) mod P for k < 32.
// Unlike zlib's CRC-32 (period 32), CRC-32C has x^(2^31) == x mod P: index x2n with k % 31.
inline void crc32c_make_tables(uint32_t (&slice)[8][256], uint32_t (&x2n)[32]) {
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kCrc32cPoly : c >> 1;
    slice[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; ++n)
    for (int s = 1; s < 8; ++s) slice[s][n] = (slice[s - 1][n] >> 8) ^ slice[0][slice[s - 1][n] & 0xFF];
  x2n[0] = 1u << 30;  // x^1
  for (int k = 1; k < 32; ++k) x2n[k] = crc32c_multmodp(x2n[k - 1], x2n[k - 1]);
}

}  // namespace tkv
