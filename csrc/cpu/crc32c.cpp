// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the transfer wire format's checksum.
//
// Hardware paths, picked at run time:
// - AVX-512 + VPCLMULQDQ (Ice Lake and later, Zen 4): carry-less-multiply folding of four
//   512-bit accumulators (256 bytes per step), then the crc32 instruction on the folded
//   16 bytes and the tail. The fold constants are x^n mod P computed at start-up by the same
//   multmodp as the shift tables, not copied magic numbers (derivation at fold_constant).
// - SSE 4.2 crc32 instruction: three interleaved streams per thread (latency 3, throughput 1)
//   joined with a precomputed shift.
// Large buffers are split across OpenMP threads joined the same way. Software path:
// slicing-by-8 tables. All compute the same function as
// thunderkv/transfer/checksum.py:crc32c_reference.
#include "crc32c.h"

#include "../crc32c_poly.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <nmmintrin.h>
#define TKV_CRC_X86 1
#endif

namespace tkv {
namespace {

constexpr size_t kFoldBlock = 256;  // the folding path's step: four 512-bit accumulators

struct Tables {
  uint32_t slice[8][256];
  uint32_t x2n[32];  // x^(2^k) mod P, for shifting a CRC past 2^k zero bits
  Tables() { crc32c_make_tables(slice, x2n); }
  static uint32_t multmodp(uint32_t a, uint32_t b) { return crc32c_multmodp(a, b); }
  // x^(8 * nbytes) mod P: the operator that moves a CRC past nbytes bytes.
  uint32_t shift_op(size_t nbytes) const { return xpow(static_cast<uint64_t>(nbytes) << 3); }
  // x^n mod P (reflected: x^0 is 1 << 31).
  uint32_t xpow(uint64_t n) const {
    uint32_t p = 1u << 31;
    for (unsigned k = 0; n; n >>= 1, ++k)
      if (n & 1) p = multmodp(x2n[k % 31], p);  // CRC-32C: x^(2^31) == x mod P, period 31
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

// ---- VPCLMULQDQ folding.
// A 64-bit lane a loaded little-endian from the message reflects A(x) = sum a_i x^(63-i);
// a 32-bit constant k reflects K(x) = sum k_j x^(31-j). clmul(a, k) puts a_i k_j at bit
// i + j, which read as a 128-bit message block (bit t <-> x^(127-t)) is A * K * x^33. To move
// a 16-byte block X = lo * x^64 + hi forward by F bits (X * x^F mod P, still < 128 bits) it is
// clmul(lo, x^(F+31)) ^ clmul(hi, x^(F-33)). The folded block B then stands for all bytes
// before it, and the crc32 instruction from state 0 over B and on through the tail gives
// (B * x^(8 tail) + tail) * x^32 mod P, the raw CRC state of the whole buffer.

struct FoldConstants {
  alignas(64) uint64_t step[8];      // fold each 128-bit lane forward by 256 bytes
  alignas(64) uint64_t finish[4][8];  // fold lane i of the last 256 bytes onto lane 15
  FoldConstants() {
    const Tables& t = tables();
    auto pair = [&](uint64_t* out, uint64_t bits) {
      out[0] = t.xpow(bits + 31);
      out[1] = t.xpow(bits - 33);
    };
    for (int l = 0; l < 4; ++l) pair(step + 2 * l, kFoldBlock * 8);
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 4; ++l) {
        const int lane = 4 * j + l;
        if (lane < 15) pair(finish[j] + 2 * l, static_cast<uint64_t>(15 - lane) * 128);
        else finish[j][2 * l] = finish[j][2 * l + 1] = 0;  // lane 15 stays as it is
      }
  }
};

const FoldConstants& fold_constants() {
  static const FoldConstants c;
  return c;
}

__attribute__((target("avx512f,vpclmulqdq,sse4.2"))) inline __m512i fold(__m512i acc, __m512i k,
                                                                          __m512i data) {
  const __m512i lo = _mm512_clmulepi64_epi128(acc, k, 0x00);
  const __m512i hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
  return _mm512_ternarylogic_epi64(lo, hi, data, 0x96);  // lo ^ hi ^ data
}

// Raw CRC state update over n >= 2 * kFoldBlock bytes.
__attribute__((target("avx512f,vpclmulqdq,sse4.2"))) uint32_t update_fold(uint32_t crc,
                                                                           const uint8_t* p,
                                                                           size_t n) {
  const FoldConstants& c = fold_constants();
  __m512i a0 = _mm512_loadu_si512(p), a1 = _mm512_loadu_si512(p + 64);
  __m512i a2 = _mm512_loadu_si512(p + 128), a3 = _mm512_loadu_si512(p + 192);
  a0 = _mm512_xor_si512(a0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  p += kFoldBlock;
  n -= kFoldBlock;
  const __m512i k = _mm512_load_si512(c.step);
  for (; n >= kFoldBlock; n -= kFoldBlock, p += kFoldBlock) {
    a0 = fold(a0, k, _mm512_loadu_si512(p));
    a1 = fold(a1, k, _mm512_loadu_si512(p + 64));
    a2 = fold(a2, k, _mm512_loadu_si512(p + 128));
    a3 = fold(a3, k, _mm512_loadu_si512(p + 192));
  }
  const __m512i zero = _mm512_setzero_si512();
  __m512i w = fold(a0, _mm512_load_si512(c.finish[0]), zero);
  w = fold(a1, _mm512_load_si512(c.finish[1]), w);
  w = fold(a2, _mm512_load_si512(c.finish[2]), w);
  // lanes 12..14 of a3 fold onto lane 15; lane 15 (qwords 6, 7) joins unchanged
  const __m512i a3f = fold(a3, _mm512_load_si512(c.finish[3]), zero);
  w = _mm512_xor_si512(w, _mm512_mask_blend_epi64(0xC0, a3f, a3));
  const __m128i b = _mm_xor_si128(
      _mm_xor_si128(_mm512_extracti32x4_epi32(w, 0), _mm512_extracti32x4_epi32(w, 1)),
      _mm_xor_si128(_mm512_extracti32x4_epi32(w, 2), _mm512_extracti32x4_epi32(w, 3)));
  uint64_t s = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(b)));
  s = _mm_crc32_u64(s, static_cast<uint64_t>(_mm_extract_epi64(b, 1)));
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    s = _mm_crc32_u64(s, v);
  }
  uint32_t out = static_cast<uint32_t>(s);
  while (n--) out = _mm_crc32_u8(out, *p++);
  return out;
}

bool have_fold() {
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("vpclmulqdq") &&
                          __builtin_cpu_supports("sse4.2") && !std::getenv("THUNDERKV_CRC_NO_FOLD");
  return yes;
}

bool have_hw() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#else
bool have_hw() { return false; }
bool have_fold() { return false; }
uint32_t update_hw(uint32_t crc, const uint8_t* p, size_t n) { return update_sw(crc, p, n); }
uint32_t update_fold(uint32_t crc, const uint8_t* p, size_t n) { return update_sw(crc, p, n); }
#endif

uint32_t crc_one_thread(const uint8_t* p, size_t n, uint32_t seed) {
  uint32_t state = ~seed;
  if (n >= 2 * kFoldBlock && have_fold()) return ~update_fold(state, p, n);
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

void crc32c_running(const void* data, size_t block_nbytes, size_t count, uint32_t seed,
                    int threads, uint32_t* out) {
  const auto* p = static_cast<const uint8_t*>(data);
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && count > 1)
#endif
  for (long long i = 0; i < static_cast<long long>(count); ++i)
    out[i] = crc_one_thread(p + static_cast<size_t>(i) * block_nbytes, block_nbytes, 0);
  const uint32_t shift = tables().shift_op(block_nbytes);
  uint32_t crc = seed;
  for (size_t i = 0; i < count; ++i) out[i] = crc = Tables::multmodp(shift, crc) ^ out[i];
}

bool crc32c_hardware() { return have_hw(); }

const char* crc32c_implementation() {
  return have_fold() ? "vpclmulqdq" : have_hw() ? "sse4.2" : "software";
}

}  // namespace tkv
