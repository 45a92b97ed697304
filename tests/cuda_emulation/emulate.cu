// Runs the CUDA kernels' thread bodies (csrc/cuda/quant_threads.cuh) on the CPU: every thread
// of a launch, one after the other, so tests/test_cuda_emulation.py can compare them with the
// reference bit for bit without a GPU. Built with nvcc as host code only (no kernel is
// launched, so it runs where no GPU or driver exists):
//
//   nvcc -std=c++17 -O1 -Xcompiler -ffp-contract=off -I csrc/cuda emulate.cu -o emulate
//
// (the tests add AddressSanitizer and UndefinedBehaviorSanitizer where the host compiler has
// them: every buffer ends where its allocation ends, so any access past it aborts the run)
//
//   emulate quantize   DTYPE BITS G R T D VARIANT X PACKED SCALE MIN [SLOTS ROWS_OUT]
//   emulate dequantize DTYPE BITS G R T D VARIANT PACKED SCALE MIN Y [SLOTS ROWS_IN]
//   emulate crc FILE NBYTES SEED       (the device CRC-32C: prints the checksum in decimal)
//
// DTYPE 0/1/2 = float16/bfloat16/float32. Arrays are raw little-endian files. VARIANT picks
// the kernel the way quant_cuda.cu's launch does: "cols" (per-channel, x [R, T, D]): the
// vectorized per-channel kernel where cols_vec_words allows, else the scalar one; "cols-scalar"
// forces the latter, "cols-regs" prefers the register-resident quantize (THUNDERKV_CUDA_COLS=regs)
// where cols_reg_words allows; "rows" (per-token, x [R*T, D] as one row of D per token, groups along D):
// the vectorized per-token kernel where vec_lanes_log2 allows, else the scalar one
// ("rows-scalar" forces it), with SLOTS (int64 per row; outside [0, ROWS_*) skips) addressing
// ROWS_* rows of the slotted side. The values and packed buffers sit VALUES_OFFSET and PACKED_OFFSET bytes (env,
// default 0) past a 64-byte boundary, so the tests can make the vectorized kernels decline.
// Prints the kernel that ran: "cols-regs4", "cols-regs1", "cols-vec4", "cols-vec1",
// "cols-scalar", "rows-vec" or "rows-scalar".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "crc32c_threads.cuh"
#include "quant_threads.cuh"

using namespace tkv::cuda;

namespace {

// n bytes starting `off` bytes past a 64-byte boundary and ending exactly where the
// allocation ends, so that an AddressSanitizer build catches any read or write past them.
struct Buffer {
  unsigned char* base = nullptr;
  size_t offset;
  Buffer(size_t n, size_t off) : offset(64 + off) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, offset + n) != 0) {
      std::fprintf(stderr, "out of memory\n");
      std::exit(2);
    }
    base = static_cast<unsigned char*>(p);
    std::memset(base, 0, offset + n);
  }
  ~Buffer() { std::free(base); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  unsigned char* data() { return base + offset; }
};

void read_file(const char* path, Buffer& b, size_t n) {
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(b.data(), 1, n, f) != n) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", n, path);
    std::exit(2);
  }
  std::fclose(f);
}

void write_file(const char* path, Buffer& b, size_t n) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(b.data(), 1, n, f) != n) {
    std::fprintf(stderr, "cannot write %s\n", path);
    std::exit(2);
  }
  std::fclose(f);
}

struct Args {
  bool quantize;
  int bits, G;
  int64_t R, T, D;
  std::string variant;
  const char *values, *packed, *scale, *minimum, *slots = nullptr;
  int64_t slot_rows = 0;
};

// The per-token vectorized kernels: per group, L lanes each fold their vectors, the lanes'
// MinMax merge (the GPU's xor shuffles, in lane order here: the result is order-free), every
// lane finishes the group, lane 0 writes scale/minimum, each lane stores its vectors' codes.
template <class T, int BITS>
void run_rows_vec(bool quantize, T* values, uint8_t* packed, T* scale, T* minimum,
                  int64_t n_groups, int G, int L, const Rows& rows) {
  const int vecs = G / kVecValues<T>;
  if (!quantize) {
    for (int64_t t = 0; t < n_groups * vecs; ++t)
      dequantize_vec_thread<T, BITS>(packed, scale, minimum, values, t, vecs, rows);
    return;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t go = slotted_group(g, rows);
    if (go < 0) continue;
    const T* xg = values + g * G;
    MinMax m;
    for (int lane = 0; lane < L; ++lane) m = merge(m, quantize_vec_lane_minmax(xg, lane, L, vecs));
    for (int lane = 0; lane < L; ++lane) {
      const GroupFinish<T> f = finish_group<T>(m.mn, m.mx, m.nonfinite, BITS);
      if (lane == 0) scale[go] = f.scale, minimum[go] = f.minimum;
      quantize_vec_lane_codes<T, BITS>(xg, f, packed + go * (static_cast<int64_t>(G) * BITS / 8),
                                       lane, L, vecs);
    }
  }
}

// The register-resident per-channel quantize for (bits, G, words); false when none fits.
template <class T>
bool run_cols_reg(const T* x, uint8_t* packed, T* scale, T* minimum, int64_t n, int bits, int G,
                  int words, Cols c) {
  return with_cols_reg_variant(bits, G, words, [&](auto b, auto g, auto w) {
    for (int64_t id = 0; id < n; ++id)
      quantize_cols_reg_thread<T, decltype(b)::value, decltype(g)::value, decltype(w)::value>(
          x, packed, scale, minimum, id, c);
  });
}

template <class T, int BITS, int WORDS>
void run_cols_vec(bool quantize, const T* x, T* y, uint8_t* packed, T* scale, T* minimum,
                  int64_t n, int G, Cols c) {
  for (int64_t id = 0; id < n; ++id) {
    if (quantize)
      quantize_cols_vec_thread<T, BITS, WORDS>(x, packed, scale, minimum, id, G, c);
    else
      dequantize_cols_vec_thread<T, BITS, WORDS>(packed, scale, minimum, y, id, G, c);
  }
}

template <class T, int WORDS>
void run_cols_vec_bits(const Args& a, const T* x, T* y, uint8_t* packed, T* scale, T* minimum,
                       int64_t n, Cols c) {
  switch (a.bits) {
    case 2: run_cols_vec<T, 2, WORDS>(a.quantize, x, y, packed, scale, minimum, n, a.G, c); break;
    case 4: run_cols_vec<T, 4, WORDS>(a.quantize, x, y, packed, scale, minimum, n, a.G, c); break;
    default: run_cols_vec<T, 8, WORDS>(a.quantize, x, y, packed, scale, minimum, n, a.G, c);
  }
}

// Runs every thread of the launch quant_cuda.cu would make for `a` on these buffers, choosing
// the kernel by the same rules; returns the kernel's name.
template <class T>
const char* emulate_launch(const Args& a, T* x, uint8_t* p, T* sc, T* mn,
                           const std::vector<int64_t>& slots, int64_t n_groups) {
  if (a.variant.rfind("rows", 0) == 0) {
    const Rows r{a.slots ? slots.data() : nullptr, a.slots ? a.D / a.G : 1, a.slot_rows};
    const int lg = a.variant == "rows-scalar"
                       ? -1
                       : vec_lanes_log2(a.G, sizeof(T), reinterpret_cast<uintptr_t>(x),
                                        reinterpret_cast<uintptr_t>(p), a.bits);
    if (lg >= 0) {
      switch (a.bits) {
        case 2: run_rows_vec<T, 2>(a.quantize, x, p, sc, mn, n_groups, a.G, 1 << lg, r); break;
        case 4: run_rows_vec<T, 4>(a.quantize, x, p, sc, mn, n_groups, a.G, 1 << lg, r); break;
        default: run_rows_vec<T, 8>(a.quantize, x, p, sc, mn, n_groups, a.G, 1 << lg, r);
      }
      return "rows-vec";
    } else {
      for (int64_t g = 0; g < n_groups; ++g) {
        if (a.quantize) quantize_thread(x, p, sc, mn, g, a.G, a.bits, r);
        else dequantize_thread(p, sc, mn, x, g, a.G, a.bits, r);
      }
      return "rows-scalar";
    }
  } else {
    const Cols c{a.T, a.D};
    const int reg_words = a.quantize && a.variant == "cols-regs"
                              ? cols_reg_words(a.G, a.bits, sizeof(T), a.D,
                                               reinterpret_cast<uintptr_t>(x),
                                               reinterpret_cast<uintptr_t>(p))
                              : 0;
    if (reg_words &&
        run_cols_reg(x, p, sc, mn, n_groups / kRegValues<T>, a.bits, a.G, reg_words, c)) {
      return reg_words == 4 ? "cols-regs4" : "cols-regs1";
    }
    const int words = a.variant == "cols-scalar"
                          ? 0
                          : cols_vec_words(a.G, a.bits, sizeof(T), a.D,
                                           reinterpret_cast<uintptr_t>(x),
                                           reinterpret_cast<uintptr_t>(p));
    const int64_t n_vec = n_groups / kVecValues<T>;
    if (words == 4) {
      run_cols_vec_bits<T, 4>(a, x, x, p, sc, mn, n_vec, c);
      return "cols-vec4";
    } else if (words == 1) {
      run_cols_vec_bits<T, 1>(a, x, x, p, sc, mn, n_vec, c);
      return "cols-vec1";
    } else {
      for (int64_t id = 0; id < n_groups; ++id) {
        if (a.quantize) quantize_cols_thread(x, p, sc, mn, id, a.G, a.bits, c);
        else dequantize_cols_thread(p, sc, mn, x, id, a.G, a.bits, c);
      }
      return "cols-scalar";
    }
  }
}

template <class T>
int run(const Args& a) {
  auto offset = [](const char* name) -> size_t {
    const char* v = std::getenv(name);
    return v ? std::strtoul(v, nullptr, 10) : 0;
  };
  const bool rows = a.variant.rfind("rows", 0) == 0;
  const int64_t n_values = a.R * a.T * a.D;
  const int64_t n_groups = n_values / a.G;
  // the packed side of "rows" with slots has slot_rows rows of D values
  const int64_t packed_groups = rows && a.slots ? a.slot_rows * a.D / a.G : n_groups;
  const size_t group_bytes = static_cast<size_t>(a.G) * a.bits / 8;
  Buffer values(n_values * sizeof(T), offset("VALUES_OFFSET"));
  Buffer packed(packed_groups * group_bytes, offset("PACKED_OFFSET"));
  Buffer scale(packed_groups * sizeof(T), 0), minimum(packed_groups * sizeof(T), 0);
  std::vector<int64_t> slots;
  if (a.slots) {
    slots.resize(a.R * a.T);
    Buffer s(slots.size() * 8, 0);
    read_file(a.slots, s, slots.size() * 8);
    std::memcpy(slots.data(), s.data(), slots.size() * 8);
  }
  if (a.quantize) {
    read_file(a.values, values, n_values * sizeof(T));
    if (a.slots) {  // rows the launch does not write keep what the files say
      read_file(a.packed, packed, packed_groups * group_bytes);
      read_file(a.scale, scale, packed_groups * sizeof(T));
      read_file(a.minimum, minimum, packed_groups * sizeof(T));
    }
  } else {
    read_file(a.packed, packed, packed_groups * group_bytes);
    read_file(a.scale, scale, packed_groups * sizeof(T));
    read_file(a.minimum, minimum, packed_groups * sizeof(T));
    if (a.slots) read_file(a.values, values, n_values * sizeof(T));
  }
  T* x = reinterpret_cast<T*>(values.data());
  uint8_t* p = packed.data();
  T* sc = reinterpret_cast<T*>(scale.data());
  T* mn = reinterpret_cast<T*>(minimum.data());
  const char* ran = emulate_launch(a, x, p, sc, mn, slots, n_groups);
  if (a.quantize) {
    write_file(a.packed, packed, packed_groups * group_bytes);
    write_file(a.scale, scale, packed_groups * sizeof(T));
    write_file(a.minimum, minimum, packed_groups * sizeof(T));
  } else {
    write_file(a.values, values, n_values * sizeof(T));
  }
  std::printf("%s\n", ran);
  return 0;
}

// crc32c_device's kernel and host join: per block, every thread's chunk, then the tree join
// one stride at a time (a step's threads touch disjoint states, so their order is free).
int run_crc(const char* path, uint64_t nbytes, uint32_t seed) {
  static const crc::Tables tables = crc::make_tables();
  const char* off = std::getenv("VALUES_OFFSET");
  Buffer data(nbytes, off ? std::strtoul(off, nullptr, 10) : 0);
  read_file(path, data, nbytes);
  uint32_t result = seed;
  if (nbytes) {
    const uint64_t blocks = (nbytes + crc::kPerBlock - 1) / crc::kPerBlock;
    std::vector<uint32_t> block_states(blocks);
    for (uint64_t b = 0; b < blocks; ++b) {
      uint32_t states[crc::kThreads];
      for (int t = 0; t < crc::kThreads; ++t) {
        const uint64_t begin = crc::chunk_begin(b, t, nbytes), end = crc::chunk_begin(b, t + 1, nbytes);
        states[t] = crc::chunk_state(tables.slice, data.data() + begin, end - begin);
      }
      for (int s = 1; s < crc::kThreads; s <<= 1)
        for (int t = 0; t < crc::kThreads; ++t) crc::join_step(states, tables.x2n, t, s, b, nbytes);
      block_states[b] = states[0];
    }
    result = crc::join_blocks(block_states, nbytes, seed, tables.x2n);
  }
  std::printf("%u\n", result);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "crc")
    return run_crc(argv[2], std::strtoull(argv[3], nullptr, 10),
                   static_cast<uint32_t>(std::strtoul(argv[4], nullptr, 10)));
  if (argc != 13 && argc != 15) {
    std::fprintf(stderr, "usage: see the comment at the top of emulate.cu\n");
    return 2;
  }
  Args a;
  a.quantize = std::string(argv[1]) == "quantize";
  const int dtype = std::atoi(argv[2]);
  a.bits = std::atoi(argv[3]);
  a.G = std::atoi(argv[4]);
  a.R = std::atoll(argv[5]);
  a.T = std::atoll(argv[6]);
  a.D = std::atoll(argv[7]);
  a.variant = argv[8];
  if (a.quantize) {
    a.values = argv[9], a.packed = argv[10], a.scale = argv[11], a.minimum = argv[12];
  } else {
    a.packed = argv[9], a.scale = argv[10], a.minimum = argv[11], a.values = argv[12];
  }
  if (argc == 15) a.slots = argv[13], a.slot_rows = std::atoll(argv[14]);
  switch (dtype) {
    case 0: return run<__half>(a);
    case 1: return run<__nv_bfloat16>(a);
    case 2: return run<float>(a);
  }
  std::fprintf(stderr, "unknown dtype code %d\n", dtype);
  return 2;
}
