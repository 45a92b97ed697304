// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the transfer wire format's checksum.
//
// Hardware path (SSE 4.2 crc32 instruction, picked at run time): three interleaved streams per
// thread (the instruction has latency 3, throughput 1) joined with a precomputed shift, and the
// buffer split across OpenMP threads joined the same way. Software path: slicing-by-8 tables.
// Both compute the same function as thunderkv/transfer/checksum.py:crc32c_reference.
#include "crc32c.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define TKV_CRC_X86 1
#endif

namespace tkv {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;

struct Tables {
  uint32_t slice[8][256];
  uint32_t x2n[32];  // x^(2^k) mod P, for shifting a CRC past 2^k zero bits
  Tables() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      slice[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n)
      for (int s = 1; s < 8; ++s)
        slice[s][n] = (slice[s - 1][n] >> 8) ^ slice[0][slice[s - 1][n] & 0xFF];
    x2n[0] = 1u << 30;  // x^1 in the reflected representation
    for (int k = 1; k < 32; ++k) x2n[k] = multmodp(x2n[k - 1], x2n[k - 1]);
  }
  // a * b mod P in the reflected representation (zlib's multmodp).
  static uint32_t multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
      if (a & m) {
        p ^= b;
        if ((a & (m - 1)) == 0) break;
      }
      m >>= 1;
      b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
    }
    return p;
  }
  // x^(8 * nbytes) mod P: the operator that moves a CRC past nbytes bytes.
  uint32_t shift_op(size_t nbytes) const {
    uint32_t p = 1u << 31;  // x^0
    unsigned k = 3;
    for (size_t n = nbytes; n; n >>= 1, ++k)
      if (n & 1) p = multmodp(x2n[k & 31], p);
    return p;
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// Raw (unconditioned) CRC state update, software.
uint32_t update_sw(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = tables().slice;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    --n;
  }
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    v ^= crc;
    crc = t[7][v & 0xFF] ^ t[6][(v >> 8) & 0xFF] ^ t[5][(v >> 16) & 0xFF] ^
          t[4][(v >> 24) & 0xFF] ^ t[3][(v >> 32) & 0xFF] ^ t[2][(v >> 40) & 0xFF] ^
          t[1][(v >> 48) & 0xFF] ^ t[0][v >> 56];
  }
  while (n--) crc = t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return crc;
}

#ifdef TKV_CRC_X86
constexpr size_t kStream = 8192;  // bytes per stream in the 3-way interleave

__attribute__((target("sse4.2"))) uint32_t update_hw(uint32_t crc, const uint8_t* p, size_t n) {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = _mm_crc32_u8(crc, *p++);
    --n;
  }
  static const uint32_t shift = tables().shift_op(kStream);
  while (n >= 3 * kStream) {
    uint64_t c0 = crc, c1 = 0xFFFFFFFFu, c2 = 0xFFFFFFFFu;
    const uint8_t* q1 = p + kStream;
    const uint8_t* q2 = p + 2 * kStream;
    for (size_t i = 0; i < kStream; i += 8) {
      uint64_t a, b, c;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, q1 + i, 8);
      std::memcpy(&c, q2 + i, 8);
      c0 = _mm_crc32_u64(c0, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, c);
    }
    // Streams 1 and 2 started from an all-ones state, i.e. they are finalized CRCs of their
    // own bytes; join with crc(A||B) = shift(crc(A), |B|) ^ crc(B) on finalized values.
    uint32_t f = ~static_cast<uint32_t>(c0);
    f = Tables::multmodp(shift, f) ^ ~static_cast<uint32_t>(c1);
    f = Tables::multmodp(shift, f) ^ ~static_cast<uint32_t>(c2);
    crc = ~f;
    p += 3 * kStream;
    n -= 3 * kStream;
  }
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  crc = static_cast<uint32_t>(c);
  while (n--) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}

bool have_hw() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#else
bool have_hw() { return false; }
uint32_t update_hw(uint32_t crc, const uint8_t* p, size_t n) { return update_sw(crc, p, n); }
#endif

uint32_t crc_one_thread(const uint8_t* p, size_t n, uint32_t seed) {
  uint32_t state = ~seed;
  state = have_hw() ? update_hw(state, p, n) : update_sw(state, p, n);
  return ~state;
}

}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b) {
  return Tables::multmodp(tables().shift_op(len_b), crc_a) ^ crc_b;
}

uint32_t crc32c(const void* data, size_t nbytes, uint32_t seed, int threads) {
  const auto* p = static_cast<const uint8_t*>(data);
  constexpr size_t kMinPerThread = size_t(4) << 20;
  int parts = 1;
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
  while (parts < threads && nbytes / (parts + 1) >= kMinPerThread) ++parts;
#endif
  if (parts == 1) return crc_one_thread(p, nbytes, seed);
  const size_t chunk = (nbytes / parts + 63) & ~size_t(63);
  std::vector<uint32_t> crcs(parts);
  std::vector<size_t> lens(parts);
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1)
#endif
  for (int i = 0; i < parts; ++i) {
    const size_t begin = std::min(nbytes, chunk * i);
    const size_t end = (i == parts - 1) ? nbytes : std::min(nbytes, chunk * (i + 1));
    lens[i] = end - begin;
    crcs[i] = crc_one_thread(p + begin, lens[i], i == 0 ? seed : 0u);
  }
  uint32_t crc = crcs[0];
  for (int i = 1; i < parts; ++i) crc = crc32c_combine(crc, crcs[i], lens[i]);
  return crc;
}

bool crc32c_hardware() { return have_hw(); }

}  // namespace tkv
