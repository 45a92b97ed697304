// pybind11 module thunderkv._C: raw-pointer entry points, no torch headers.
// thunderkv/backends/*.py validate arguments and pass data_ptr()s; nothing here allocates.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/crc32c.h"
#include "cpu/dispatch.h"
#include "cpu/kivi_attention.h"
#ifdef THUNDERKV_WITH_CUDA
#include "cuda/crc32c_cuda.h"
#include "cuda/quant_cuda.h"
#endif

namespace py = pybind11;
using tkv::DType;

namespace {

DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dtype code must be 0 (f16), 1 (bf16) or 2 (f32)");
  return static_cast<DType>(code);
}

void check_format(int64_t n_groups, int group_size, int bits) {
  if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("bits must be 2, 4 or 8");
  if (group_size <= 0 || (group_size * bits) % 8 != 0)
    throw std::invalid_argument("group_size * bits must be a positive multiple of 8");
  if (n_groups < 0) throw std::invalid_argument("n_groups must be >= 0");
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// tokens/channels > 0 select the per-channel layout (x [R, tokens, channels], groups along
// tokens); see csrc/cpu/cpu_kernels.h.
void check_cols(int64_t n_groups, int group_size, int64_t tokens, int64_t channels) {
  if (channels < 0 || tokens < 0) throw std::invalid_argument("tokens/channels must be >= 0");
  if (channels > 0 && tokens == 0 && n_groups != 0)
    throw std::invalid_argument("per-channel layout: no tokens but n_groups > 0");
  if (channels > 0 && tokens > 0 && (tokens % group_size != 0 || n_groups % channels != 0 ||
                                     (n_groups / channels) % (tokens / group_size) != 0))
    throw std::invalid_argument("per-channel layout: tokens must divide by group_size and "
                                "n_groups must be rows * tokens / group_size * channels");
}

void cpu_quantize(uintptr_t x, uintptr_t packed, uintptr_t scale, uintptr_t minimum,
                  int64_t n_groups, int group_size, int bits, int dtype, int threads,
                  int64_t tokens, int64_t channels) {
  check_format(n_groups, group_size, bits);
  check_cols(n_groups, group_size, tokens, channels);
  tkv::cpu::QuantArgs a{ptr<const void>(x), ptr<uint8_t>(packed), ptr<void>(scale),
                        ptr<void>(minimum), n_groups, group_size, bits, to_dtype(dtype),
                        tokens, channels};
  py::gil_scoped_release nogil;
  tkv::cpu::quantize(a, threads);
}

void cpu_dequantize(uintptr_t packed, uintptr_t scale, uintptr_t minimum, uintptr_t y,
                    int64_t n_groups, int group_size, int bits, int dtype, int threads,
                    int64_t tokens, int64_t channels) {
  check_format(n_groups, group_size, bits);
  check_cols(n_groups, group_size, tokens, channels);
  tkv::cpu::DequantArgs a{ptr<const uint8_t>(packed), ptr<const void>(scale),
                          ptr<const void>(minimum), ptr<void>(y), n_groups, group_size, bits,
                          to_dtype(dtype), tokens, channels};
  py::gil_scoped_release nogil;
  tkv::cpu::dequantize(a, threads);
}

// Paged cache rows (thunderkv/paged.py): `row_groups` per-token groups per row; `index` is an
// int64 array of n_rows entries, each in [lowest, capacity) (-1: skip that row; kZeroRow = -2,
// dequantize only: zero it). All indices are checked before anything is written.
void check_rows(const int64_t* index, int64_t n_rows, int64_t capacity, int64_t lowest) {
  for (int64_t t = 0; t < n_rows; ++t)
    if (index[t] >= capacity || index[t] < lowest)
      throw std::out_of_range("row index " + std::to_string(index[t]) + " at position " +
                              std::to_string(t) + " outside [" + std::to_string(lowest) + ", " +
                              std::to_string(capacity) + ")");
}

void cpu_quantize_rows(uintptr_t x, uintptr_t packed, uintptr_t scale, uintptr_t minimum,
                       int64_t row_groups, int group_size, int bits, int dtype, uintptr_t slots,
                       int64_t n_rows, int64_t capacity, int threads) {
  check_format(row_groups, group_size, bits);
  if (n_rows < 0 || capacity < 0) throw std::invalid_argument("negative row count");
  check_rows(ptr<const int64_t>(slots), n_rows, capacity, -1);
  tkv::cpu::QuantArgs a{ptr<const void>(x), ptr<uint8_t>(packed), ptr<void>(scale),
                        ptr<void>(minimum), row_groups, group_size, bits, to_dtype(dtype)};
  py::gil_scoped_release nogil;
  tkv::cpu::quantize_rows(a, ptr<const int64_t>(slots), n_rows, threads);
}

void cpu_dequantize_rows(uintptr_t packed, uintptr_t scale, uintptr_t minimum, uintptr_t y,
                         int64_t row_groups, int group_size, int bits, int dtype, uintptr_t rows,
                         int64_t n_rows, int64_t capacity, int threads) {
  check_format(row_groups, group_size, bits);
  if (n_rows < 0 || capacity < 0) throw std::invalid_argument("negative row count");
  check_rows(ptr<const int64_t>(rows), n_rows, capacity, tkv::cpu::kZeroRow);
  tkv::cpu::DequantArgs a{ptr<const uint8_t>(packed), ptr<const void>(scale),
                          ptr<const void>(minimum), ptr<void>(y), row_groups, group_size, bits,
                          to_dtype(dtype)};
  py::gil_scoped_release nogil;
  tkv::cpu::dequantize_rows(a, ptr<const int64_t>(rows), n_rows, threads);
}

// Decode attention over a KIVI cache (csrc/cpu/kivi_attention.h); thunderkv/attention.py checks
// shapes, dtypes and contiguity. The AVX2 build runs unless the generic CPU variant is forced.
void cpu_kivi_attention(uintptr_t query, uintptr_t out, uintptr_t key_packed, uintptr_t key_scale,
                        uintptr_t key_min, uintptr_t value_packed, uintptr_t value_scale,
                        uintptr_t value_min, uintptr_t key_residual, uintptr_t value_residual,
                        uintptr_t key_mask, int64_t batch, int64_t kv_heads, int64_t rep,
                        int64_t head_dim, int64_t tq, int64_t tr, int64_t tq_stride,
                        int group_size, int bits,
                        int dtype, float scaling, int threads) {
  check_format(0, group_size, bits);
  if (batch < 0 || kv_heads < 0 || rep <= 0 || head_dim <= 0 || tq < 0 || tr < 0)
    throw std::invalid_argument("kivi attention: negative or zero size");
  if (tq % group_size != 0 || tq_stride % group_size != 0 || head_dim % group_size != 0)
    throw std::invalid_argument(
        "kivi attention: tq, tq_stride and head_dim must divide by group_size");
  if (tq_stride < tq) throw std::invalid_argument("kivi attention: tq_stride < tq");
  tkv::cpu::KiviAttentionArgs a{
      ptr<const float>(query), ptr<float>(out), ptr<const uint8_t>(key_packed),
      ptr<const void>(key_scale), ptr<const void>(key_min), ptr<const uint8_t>(value_packed),
      ptr<const void>(value_scale), ptr<const void>(value_min), ptr<const float>(key_residual),
      ptr<const float>(value_residual), ptr<const uint8_t>(key_mask), batch, kv_heads, rep,
      head_dim, tq, tr, tq_stride, group_size, bits, to_dtype(dtype), scaling};
  tkv::cpu::KiviAttentionFn fn = &tkv::cpu::kivi_attention_generic;
#ifdef THUNDERKV_HAVE_AVX2
  if (std::string(tkv::cpu::active_variant().name) != "generic") {
    fn = &tkv::cpu::kivi_attention_avx2;
  }
#endif
  py::gil_scoped_release nogil;
  fn(a, threads);
}

py::list cpu_variants() {
  py::list out;
  for (const auto& v : tkv::cpu::usable_variants()) out.append(v.name);
  return out;
}

py::dict build_info() {
  py::dict d;
  d["version"] = THUNDERKV_VERSION;
  d["compiler"] = THUNDERKV_COMPILER;
  d["openmp"] = tkv::cpu::have_openmp();
  py::list compiled;
  compiled.append("generic");
#ifdef THUNDERKV_HAVE_AVX2
  compiled.append("avx2");
#endif
#ifdef THUNDERKV_HAVE_AVX512
  compiled.append("avx512");
#endif
  d["cpu_variants_compiled"] = compiled;
#ifdef THUNDERKV_WITH_CUDA
  d["cuda"] = true;
  d["cuda_architectures"] = THUNDERKV_CUDA_ARCHS;
  d["cuda_runtime_version"] = tkv::cuda::runtime_version();
#else
  d["cuda"] = false;
  d["cuda_why_not"] = THUNDERKV_CUDA_WHY_NOT;
#endif
  d["ucx_why_not"] = THUNDERKV_UCX_WHY_NOT;  // empty: thunderkv._ucx was built
  return d;
}

#ifdef THUNDERKV_WITH_CUDA
void raise_if(const std::string& err, const char* what) {
  if (!err.empty()) throw std::runtime_error(std::string(what) + ": " + err);
}

void check_row_layout(int64_t n_groups, uintptr_t row_index, int64_t row_groups,
                      int64_t channels, int64_t slot_rows) {
  if (!row_index) return;
  if (channels > 0) throw std::invalid_argument("row indices need the per-token layout");
  if (row_groups <= 0 || n_groups % row_groups != 0)
    throw std::invalid_argument("n_groups must be a positive multiple of row_groups");
  // the kernels skip rows outside [0, slot_rows): 0 would silently drop every row
  if (slot_rows <= 0)
    throw std::invalid_argument("row indices need slot_rows > 0 (the slotted side's row count)");
}

void cuda_quantize(uintptr_t x, uintptr_t packed, uintptr_t scale, uintptr_t minimum,
                   int64_t n_groups, int group_size, int bits, int dtype, int device,
                   uintptr_t stream, int64_t tokens, int64_t channels, uintptr_t row_index,
                   int64_t row_groups, int64_t slot_rows) {
  check_format(n_groups, group_size, bits);
  check_cols(n_groups, group_size, tokens, channels);
  check_row_layout(n_groups, row_index, row_groups, channels, slot_rows);
  to_dtype(dtype);
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = tkv::cuda::quantize(dtype, ptr<const void>(x), ptr<void>(packed), ptr<void>(scale),
                              ptr<void>(minimum), n_groups, group_size, bits, device, stream,
                              tokens, channels, ptr<const int64_t>(row_index), row_groups,
                              slot_rows);
  }
  raise_if(err, "thunderkv CUDA quantize failed");
}

void cuda_dequantize(uintptr_t packed, uintptr_t scale, uintptr_t minimum, uintptr_t y,
                     int64_t n_groups, int group_size, int bits, int dtype, int device,
                     uintptr_t stream, int64_t tokens, int64_t channels, uintptr_t row_index,
                     int64_t row_groups, int64_t slot_rows) {
  check_format(n_groups, group_size, bits);
  check_cols(n_groups, group_size, tokens, channels);
  check_row_layout(n_groups, row_index, row_groups, channels, slot_rows);
  to_dtype(dtype);
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = tkv::cuda::dequantize(dtype, ptr<const void>(packed), ptr<const void>(scale),
                                ptr<const void>(minimum), ptr<void>(y), n_groups, group_size,
                                bits, device, stream, tokens, channels,
                                ptr<const int64_t>(row_index), row_groups, slot_rows);
  }
  raise_if(err, "thunderkv CUDA dequantize failed");
}

py::tuple cuda_device_count() {
  std::string why;
  const int n = tkv::cuda::device_count(&why);
  return py::make_tuple(n, why);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ThunderKV compiled kernels (format v1). Raw pointers in, nothing allocated.";
  m.def("cpu_quantize", &cpu_quantize, py::arg("x"), py::arg("packed"), py::arg("scale"),
        py::arg("minimum"), py::arg("n_groups"), py::arg("group_size"), py::arg("bits"),
        py::arg("dtype"), py::arg("threads") = 0, py::arg("tokens") = 0,
        py::arg("channels") = 0);
  m.def("cpu_dequantize", &cpu_dequantize, py::arg("packed"), py::arg("scale"),
        py::arg("minimum"), py::arg("y"), py::arg("n_groups"), py::arg("group_size"),
        py::arg("bits"), py::arg("dtype"), py::arg("threads") = 0, py::arg("tokens") = 0,
        py::arg("channels") = 0);
  m.def("cpu_kivi_attention", &cpu_kivi_attention, py::arg("query"), py::arg("out"),
        py::arg("key_packed"), py::arg("key_scale"), py::arg("key_min"), py::arg("value_packed"),
        py::arg("value_scale"), py::arg("value_min"), py::arg("key_residual"),
        py::arg("value_residual"), py::arg("key_mask"), py::arg("batch"), py::arg("kv_heads"),
        py::arg("rep"), py::arg("head_dim"), py::arg("tq"), py::arg("tr"),
        py::arg("tq_stride"), py::arg("group_size"),
        py::arg("bits"), py::arg("dtype"), py::arg("scaling"), py::arg("threads") = 0,
        "Decode attention over a KIVI-layout format v1 cache (raw pointers; float32 query/out/"
        "residual)");
  m.def("cpu_quantize_rows", &cpu_quantize_rows, py::arg("x"), py::arg("packed"),
        py::arg("scale"), py::arg("minimum"), py::arg("row_groups"), py::arg("group_size"),
        py::arg("bits"), py::arg("dtype"), py::arg("slots"), py::arg("n_rows"),
        py::arg("capacity"), py::arg("threads") = 0,
        "Quantize contiguous rows of x into output rows slots[t] (-1: skip): the paged write");
  m.def("cpu_dequantize_rows", &cpu_dequantize_rows, py::arg("packed"), py::arg("scale"),
        py::arg("minimum"), py::arg("y"), py::arg("row_groups"), py::arg("group_size"),
        py::arg("bits"), py::arg("dtype"), py::arg("rows"), py::arg("n_rows"),
        py::arg("capacity"), py::arg("threads") = 0,
        "Dequantize input rows rows[t] (-1: skip, -2: zeros) into contiguous rows of y: the "
        "paged gather");
  m.def("cpu_variants", &cpu_variants, "CPU variants compiled in and usable on this CPU");
  m.def("cpu_variant", [] { return std::string(tkv::cpu::active_variant().name); });
  m.def("set_cpu_variant", &tkv::cpu::set_active_variant, py::arg("name"));
  m.def("cpu_max_threads", &tkv::cpu::max_threads);
  m.def("build_info", &build_info);
  m.def(
      "crc32c",
      [](uintptr_t address, size_t nbytes, uint32_t seed, int threads) {
        if (nbytes && !address) throw std::invalid_argument("crc32c: null address");
        py::gil_scoped_release release;
        return tkv::crc32c(reinterpret_cast<const void*>(address), nbytes, seed, threads);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("seed") = 0, py::arg("threads") = 0,
      "CRC-32C of nbytes of host memory at address, continuing from seed");
  m.def(
      "crc32c_running",
      [](uintptr_t address, size_t block_nbytes, size_t count, uint32_t seed, int threads) {
        if (count && block_nbytes && !address)
          throw std::invalid_argument("crc32c_running: null address");
        std::vector<uint32_t> out(count);
        {
          py::gil_scoped_release release;
          tkv::crc32c_running(reinterpret_cast<const void*>(address), block_nbytes, count, seed,
                              threads, out.data());
        }
        return out;
      },
      py::arg("address"), py::arg("block_nbytes"), py::arg("count"), py::arg("seed") = 0,
      py::arg("threads") = 0,
      "Running CRC-32C at the end of each of count blocks (blocks checksummed in parallel)");
  m.def("crc32c_combine", &tkv::crc32c_combine, py::arg("crc_a"), py::arg("crc_b"),
        py::arg("len_b"));
  m.def("crc32c_hardware", &tkv::crc32c_hardware);
  m.def("crc32c_implementation", [] { return std::string(tkv::crc32c_implementation()); });
#ifdef THUNDERKV_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("cuda_quantize", &cuda_quantize, py::arg("x"), py::arg("packed"), py::arg("scale"),
        py::arg("minimum"), py::arg("n_groups"), py::arg("group_size"), py::arg("bits"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("tokens") = 0,
        py::arg("channels") = 0, py::arg("row_index") = 0, py::arg("row_groups") = 0,
        py::arg("slot_rows") = 0);
  m.def("cuda_dequantize", &cuda_dequantize, py::arg("packed"), py::arg("scale"),
        py::arg("minimum"), py::arg("y"), py::arg("n_groups"), py::arg("group_size"),
        py::arg("bits"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::arg("tokens") = 0, py::arg("channels") = 0, py::arg("row_index") = 0,
        py::arg("row_groups") = 0, py::arg("slot_rows") = 0);
  m.def(
      "cuda_crc32c",
      [](uintptr_t address, uint64_t nbytes, uint32_t seed, int device, uintptr_t stream) {
        if (nbytes && !address) throw std::invalid_argument("cuda_crc32c: null address");
        uint32_t crc = 0;
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = tkv::cuda::crc32c_device(ptr<const void>(address), nbytes, seed, device, stream,
                                         &crc);
        }
        raise_if(err, "thunderkv CUDA crc32c failed");
        return crc;
      },
      py::arg("address"), py::arg("nbytes"), py::arg("seed"), py::arg("device"),
      py::arg("stream"), "CRC-32C of device memory, continuing from seed (waits for stream)");
  m.def("cuda_device_count", &cuda_device_count,
        "(count, reason): count is -1 when no usable driver/device, with the reason");
#else
  m.attr("has_cuda") = false;
#endif
}
