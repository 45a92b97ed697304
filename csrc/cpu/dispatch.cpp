// Picks the best compiled CPU variant for this machine at load time and runs it over threads.
#include "dispatch.h"

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tkv::cpu {
namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  const std::string f(feature);
  if (f == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
  if (f == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  }
#else
  (void)feature;
#endif
  return false;
}

std::vector<Variant> build_usable() {
  std::vector<Variant> v{generic_variant()};
#ifdef THUNDERKV_HAVE_AVX2
  if (cpu_has("avx2")) v.push_back(avx2_variant());
#endif
#ifdef THUNDERKV_HAVE_AVX512
  if (cpu_has("avx512")) v.push_back(avx512_variant());
#endif
  return v;
}

// Work below this many elements runs on one thread: thread start-up would dominate.
constexpr int64_t kMinElementsPerThread = 1 << 15;

int threads_for(int64_t n_elements, int requested) {
  int t = requested > 0 ? requested : max_threads();
  const int64_t by_size = std::max<int64_t>(1, n_elements / kMinElementsPerThread);
  return static_cast<int>(std::min<int64_t>(t, by_size));
}

template <class Args, class Fn>
void run_parallel(const Args& a, Fn fn, int threads) {
  const int64_t units = work_units(a);
  const int nt = threads_for(a.n_groups * a.group_size, threads);
  if (nt <= 1 || units < 2) {
    fn(a, 0, units);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int n = omp_get_num_threads();
    const int64_t begin = units * tid / n;
    const int64_t end = units * (tid + 1) / n;
    fn(a, begin, end);
  }
#else
  fn(a, 0, units);
#endif
}

}  // namespace

const std::vector<Variant>& usable_variants() {
  static const std::vector<Variant> v = build_usable();
  return v;
}

static const Variant* g_active = nullptr;

const Variant& active_variant() {
  if (g_active == nullptr) {
    const auto& v = usable_variants();
    g_active = &v.back();
    if (const char* want = std::getenv("THUNDERKV_CPU_ISA")) {
      set_active_variant(want);
    }
  }
  return *g_active;
}

void set_active_variant(const std::string& name) {
  for (const auto& v : usable_variants()) {
    if (name == v.name) {
      g_active = &v;
      return;
    }
  }
  std::string have;
  for (const auto& v : usable_variants()) have += std::string(have.empty() ? "" : ", ") + v.name;
  throw std::invalid_argument("CPU variant '" + name + "' is not usable here (usable: " + have +
                              ")");
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool have_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

void quantize(const QuantArgs& a, int threads) {
  run_parallel(a, active_variant().quantize, threads);
}

void dequantize(const DequantArgs& a, int threads) {
  run_parallel(a, active_variant().dequantize, threads);
}

namespace {
int64_t elem_bytes(DType d) { return d == DType::F32 ? 4 : 2; }

template <class Body>
void for_rows(int64_t n_rows, int threads, Body body) {
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n_rows > 1)
#endif
  for (int64_t t = 0; t < n_rows; ++t) body(t);
}
}  // namespace

void quantize_rows(const QuantArgs& a, const int64_t* slots, int64_t n_rows, int threads) {
  const QuantRangeFn fn = active_variant().quantize;
  const int64_t eb = elem_bytes(a.dtype);
  const int64_t row_in = a.n_groups * a.group_size * eb;
  const int64_t row_packed = a.n_groups * a.group_size * a.bits / 8;
  const int64_t row_params = a.n_groups * eb;
  for_rows(n_rows, threads, [&](int64_t t) {
    if (slots[t] < 0) return;
    QuantArgs r = a;
    r.x = static_cast<const char*>(a.x) + t * row_in;
    r.packed = a.packed + slots[t] * row_packed;
    r.scale = static_cast<char*>(a.scale) + slots[t] * row_params;
    r.minimum = static_cast<char*>(a.minimum) + slots[t] * row_params;
    fn(r, 0, r.n_groups);
  });
}

void dequantize_rows(const DequantArgs& a, const int64_t* rows, int64_t n_rows, int threads) {
  const DequantRangeFn fn = active_variant().dequantize;
  const int64_t eb = elem_bytes(a.dtype);
  const int64_t row_out = a.n_groups * a.group_size * eb;
  const int64_t row_packed = a.n_groups * a.group_size * a.bits / 8;
  const int64_t row_params = a.n_groups * eb;
  // The gather's rows are tokens, a block's tokens consecutive slots: each chunk of rows hands
  // runs of consecutive slots (and of ZERO_ROWs) to one kernel call / memset, not one per row.
  const int64_t workers = threads > 0 ? threads : max_threads();
  const int64_t chunk = std::clamp<int64_t>(n_rows / (4 * workers), 1, 64);
  for_rows((n_rows + chunk - 1) / chunk, threads, [&](int64_t c) {
    const int64_t end = std::min(n_rows, (c + 1) * chunk);
    for (int64_t t = c * chunk, run = 1; t < end; t += run) {
      const int64_t src = rows[t];
      run = 1;
      if (src >= 0 || src == kZeroRow)
        while (t + run < end && rows[t + run] == (src == kZeroRow ? kZeroRow : src + run)) ++run;
      if (src == kZeroRow) std::memset(static_cast<char*>(a.y) + t * row_out, 0, run * row_out);
      if (src < 0) continue;
      DequantArgs r = a;
      r.packed = a.packed + src * row_packed;
      r.scale = static_cast<const char*>(a.scale) + src * row_params;
      r.minimum = static_cast<const char*>(a.minimum) + src * row_params;
      r.y = static_cast<char*>(a.y) + t * row_out;
      r.n_groups = run * a.n_groups;
      fn(r, 0, r.n_groups);
    }
  });
}

}  // namespace tkv::cpu
