// CRC-32C of host memory (see crc32c.cpp). `seed` continues a running checksum:
// crc32c(b, crc32c(a)) == crc32c(a || b). threads <= 0: OpenMP's default.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tkv {

uint32_t crc32c(const void* data, size_t nbytes, uint32_t seed, int threads);
// Running CRC-32C at the end of each of `count` consecutive blocks of `block_nbytes` (out has
// count entries; out[i] = crc32c(blocks 0..i, seed)). Blocks are checksummed in parallel
// (threads <= 0: OpenMP's default) and chained with crc32c_combine.
void crc32c_running(const void* data, size_t block_nbytes, size_t count, uint32_t seed,
                    int threads, uint32_t* out);
// crc32c(a || b) from crc32c(a), crc32c(b) and |b|.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b);
bool crc32c_hardware();
// Which path large buffers take here: "vpclmulqdq", "sse4.2" or "software".
const char* crc32c_implementation();

}  // namespace tkv
