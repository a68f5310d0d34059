// transformax's native int8 matmul for few rows (decoding's GEMVs): XLA FFI handlers for
//   f32:  y (M, N) f32 = (x (M, K) f32 @ w (K, N) int8) * scale (N)   (weight-only)
//   s8:   y (M, N) s32 =  x (M, K) int8 @ w (K, N) int8               (int8 activations)
//   i4:   y (M, N) f32 = sum over groups G of x[:, G] @ w4[G] * scale[G]  (weight-only int4:
//         w (K / 2, N) int8, two rows per byte; scale (groups, N) f32, groups of K / groups rows)
// The weight is read once per group of rows, straight from its (K, N) row-major layout, in
// panels of 4 vectors of columns (64 with AVX-512, 32 with AVX2); threads take contiguous
// ranges of panels and sweep them in passes of CHUNK_K weight rows. Code paths, picked per call
// (the ISA is an attribute chosen in Python, checked here against the CPU):
//   f32: int8 widened to f32 in registers, FMA (AVX-512F or AVX2+FMA);
//   i4:  each byte widened to int32, its nibbles sign-extended by shifts, to f32, FMA; passes
//        never straddle a scale group, each scaled as it is added to y;
//   s8, AVX-512 VNNI: 4 weight rows interleaved per column, vpdpbusd on (x + 128) as u8, the
//       128 * column sum (vpdpbusd of ones) subtracted at the end;
//   s8, AVX2: the same interleave, vpmaddubsw on |x| and sign(x) * w (no int16 saturation:
//       |x| <= 128, |w| <= 127) then vpmaddwd into int32.
// Columns past the last full panel run a scalar loop.

#include <Python.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tfx::parallel_for;

enum Isa { ISA_AVX2 = 0, ISA_AVX512 = 1, ISA_AVX512_VNNI = 2 };

// Each ISA's struct sets CHUNK_K, the weight rows per pass over a thread's panels (a multiple of
// 4; int4 passes take 2 * CHUNK_K rows, CHUNK_K bytes): each row is then read left to right, one
// hardware prefetch stream per row (a panel-wide sweep down K touches a new page per row), the
// partial sums kept in y between passes; and PREFETCH_BYTES, how far ahead along a row the
// weight is prefetched. Measured at 1 row, Linear(1024 -> 4096): AVX-512 (one cache line per
// panel row) 0.23 -> 0.17 ms with 32 rows instead of 64; AVX2 (half a line) best at 64.

enum Kind { F32, S8, I4 };

// One call: x (m, k) of f32 or int8, w (k, n) int8 (int4: (k / 2, n) packed), the f32 column
// scales (f32: (n,), int4: (k / group, n)), y (m, n).
struct Gemv {
  long m, k, n;
  const void* x;
  const int8_t* w;
  const float* scale;
  void* y;
  long group = 0;  // int4: weight rows per scale group
};

// The x bytes k0..k0+3 of row `row` as one int32 (bytes past k are 0).
inline int32_t x_quad(const Gemv& g, long row, long k0) {
  const int8_t* x = static_cast<const int8_t*>(g.x) + row * g.k + k0;
  int32_t v = 0;
  std::memcpy(&v, x, k0 + 4 <= g.k ? 4 : g.k - k0);  // little-endian: the low bytes first
  return v;
}

// Weight row k of column c of a packed int4 weight, sign-extended.
inline int32_t nibble(const Gemv& g, long k, long c) {
  const int32_t byte = g.w[(k >> 1) * g.n + c];
  return k & 1 ? byte >> 4 : int32_t(uint32_t(byte) << 28) >> 28;
}

// Columns [c0, n) of every row, one column at a time.
void scalar_columns(const Gemv& g, long c0, Kind kind) {
  const int8_t* w = g.w;
  for (long r = 0; r < g.m; ++r)
    for (long c = c0; c < g.n; ++c) {
      if (kind == I4) {
        const float* x = static_cast<const float*>(g.x) + r * g.k;
        float acc = 0.f;
        for (long k0 = 0; k0 < g.k; k0 += g.group) {
          float part = 0.f;
          for (long k = k0; k < k0 + g.group; ++k) part += x[k] * float(nibble(g, k, c));
          acc += part * g.scale[k0 / g.group * g.n + c];
        }
        static_cast<float*>(g.y)[r * g.n + c] = acc;
      } else if (kind == S8) {
        const int8_t* x = static_cast<const int8_t*>(g.x) + r * g.k;
        int32_t acc = 0;
        for (long k = 0; k < g.k; ++k) acc += int32_t(x[k]) * int32_t(w[k * g.n + c]);
        static_cast<int32_t*>(g.y)[r * g.n + c] = acc;
      } else {
        const float* x = static_cast<const float*>(g.x) + r * g.k;
        float acc = 0.f;
        for (long k = 0; k < g.k; ++k) acc += x[k] * float(w[k * g.n + c]);
        static_cast<float*>(g.y)[r * g.n + c] = acc * g.scale[c];
      }
    }
}

// Column `e` of interleaved vector `v` (4 rows x one 128-bit lane of 16 columns per lane): the
// byte unpacks (int8_kernel.h's interleave) leave lane L's element 4L + j of vector v at column
// 16L + 4v + j.
inline long column_of(int v, int e) { return 16 * (e >> 2) + 4 * v + (e & 3); }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")
// vpdpbusd multiplies u8 by s8: the activations go in as x + 128, and 128 times the column sums
// (vpdpbusd of ones) come off at the end of a pass. (Its f32 tile uses no VNNI instruction.)
struct Avx512 {
  static constexpr int VW = 16, MR = 4;
  static constexpr long CHUNK_K = 32, PREFETCH_BYTES = 128;
  typedef float vf __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  static vi sext(const int8_t* p) {
    return vi(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static vf to_float(vi v) { return vf(_mm512_cvtepi32_ps(__m512i(v))); }
  typedef __m512i Bytes;
  static Bytes load_bytes(const int8_t* p) { return _mm512_loadu_si512(p); }
  static Bytes unpack8(Bytes a, Bytes b, bool hi) {
    return hi ? _mm512_unpackhi_epi8(a, b) : _mm512_unpacklo_epi8(a, b);
  }
  static vi unpack16(Bytes a, Bytes b, bool hi) {
    return vi(hi ? _mm512_unpackhi_epi16(a, b) : _mm512_unpacklo_epi16(a, b));
  }
  static vi dot(vi acc, int32_t x4, vi q) {
    const __m512i xu = _mm512_xor_si512(_mm512_set1_epi32(x4), _mm512_set1_epi8(-128));
    return vi(_mm512_dpbusd_epi32(__m512i(acc), xu, __m512i(q)));
  }
  struct Colsum {
    vi sum[4] = {};
    void add(const vi q[4]) {
      for (int v = 0; v < 4; ++v)
        sum[v] = vi(_mm512_dpbusd_epi32(__m512i(sum[v]), _mm512_set1_epi8(1), __m512i(q[v])));
    }
    vi finish(vi acc, int v) const { return acc - (sum[v] << 7); }
  };
#include "int8_kernel.h"
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// vpmaddubsw multiplies u8 by s8: |x| by sign(x) * w (|x| <= 128 and |w| <= 127, so its int16
// pair sums cannot saturate), and vpmaddwd adds the pairs into int32.
struct Avx2 {
  static constexpr int VW = 8, MR = 2;
  static constexpr long CHUNK_K = 64, PREFETCH_BYTES = 256;
  typedef float vf __attribute__((vector_size(32)));
  typedef int32_t vi __attribute__((vector_size(32)));
  static vi sext(const int8_t* p) {
    return vi(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static vf to_float(vi v) { return vf(_mm256_cvtepi32_ps(__m256i(v))); }
  typedef __m256i Bytes;
  static Bytes load_bytes(const int8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static Bytes unpack8(Bytes a, Bytes b, bool hi) {
    return hi ? _mm256_unpackhi_epi8(a, b) : _mm256_unpacklo_epi8(a, b);
  }
  static vi unpack16(Bytes a, Bytes b, bool hi) {
    return vi(hi ? _mm256_unpackhi_epi16(a, b) : _mm256_unpacklo_epi16(a, b));
  }
  static vi dot(vi acc, int32_t x4, vi q) {
    const __m256i xb = _mm256_set1_epi32(x4);
    const __m256i pairs =
        _mm256_maddubs_epi16(_mm256_abs_epi8(xb), _mm256_sign_epi8(__m256i(q), xb));
    return acc + vi(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  struct Colsum {
    void add(const vi*) {}
    vi finish(vi acc, int) const { return acc; }
  };
#include "int8_kernel.h"
};
#pragma GCC pop_options

// Rows [r, r + rows) of the panel at column c, with the widest row tile that fits.
template <class Isa, Kind KIND, int MR = Isa::MR>
void row_group(const Gemv& g, long rows, long r, long c, long k0, long k1) {
  if constexpr (MR > 1)
    if (rows < MR) return row_group<Isa, KIND, MR - 1>(g, rows, r, c, k0, k1);
  if constexpr (KIND == S8)
    Isa::template s8_tile<MR>(g, r, c, k0, k1);
  else if constexpr (KIND == F32)
    Isa::template f32_tile<MR>(g, r, c, k0, k1);
  else
    Isa::template int4_tile<MR>(g, r, c, k0, k1, g.scale + k0 / g.group * g.n);
}

// Every row group of the panels [p0, p1), CHUNK_K weight rows per pass (int4: 2 * CHUNK_K,
// and none across a scale group).
template <class Isa, Kind KIND>
void run_panels(const Gemv& g, long p0, long p1) {
  const long group = KIND == I4 ? g.group : g.k;
  const long chunk = KIND == I4 ? 2 * Isa::CHUNK_K : Isa::CHUNK_K;
  for (long g0 = 0; g0 < g.k; g0 += group)
    for (long k0 = g0; k0 < g0 + group; k0 += chunk)
      for (long p = p0; p < p1; ++p)
        for (long r = 0; r < g.m; r += Isa::MR)
          row_group<Isa, KIND>(g, std::min<long>(Isa::MR, g.m - r), r, p * Isa::PANEL, k0,
                               std::min(g0 + group, k0 + chunk));
}

// Panels [p0, p1) on the ISA's code path (AVX-512 without VNNI: f32 and int4 only).
void run(const Gemv& g, int64_t isa, Kind kind, long p0, long p1) {
  if (kind == S8)
    (isa == ISA_AVX512_VNNI ? run_panels<Avx512, S8> : run_panels<Avx2, S8>)(g, p0, p1);
  else if (kind == F32)
    (isa == ISA_AVX2 ? run_panels<Avx2, F32> : run_panels<Avx512, F32>)(g, p0, p1);
  else
    (isa == ISA_AVX2 ? run_panels<Avx2, I4> : run_panels<Avx512, I4>)(g, p0, p1);
}

// The panel width of the code path `run` takes.
long panel_width(int64_t isa, Kind kind) {
  return (kind == S8 ? isa == ISA_AVX512_VNNI : isa != ISA_AVX2) ? Avx512::PANEL : Avx2::PANEL;
}

bool isa_supported(int64_t isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (isa == ISA_AVX2) return avx2;
  if (isa == ISA_AVX512) return avx512;
  if (isa == ISA_AVX512_VNNI) return avx512 && __builtin_cpu_supports("avx512vnni");
  return false;
}

// Splits the panels into up to `threads` contiguous ranges, run with the scalar columns (one
// more item) by parallel_for.
void parallel_panels(ffi::ThreadPool& pool, const Gemv& g, int64_t isa, Kind kind,
                     long threads) {
  const long panel = panel_width(isa, kind);
  const long panels = g.n / panel;
  const long parts = std::max(1L, std::min(threads, panels));
  auto item = [&](long t) {
    if (t < parts)
      run(g, isa, kind, panels * t / parts, panels * (t + 1) / parts);
    else
      scalar_columns(g, panels * panel, kind);
  };
  parallel_for(pool, parts + 1, threads, [&] { return item; });
}

ffi::Error matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale,
                  ffi::Result<ffi::AnyBuffer> y, int64_t isa, int64_t threads, Kind kind) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const long rows_per_byte = kind == I4 ? 2 : 1;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] * rows_per_byte)
    return ffi::Error::InvalidArgument(
        kind == I4 ? "tfx int4 matmul: x must be (M, K) and w (K / 2, N)"
                   : "tfx int8 matmul: x must be (M, K) and w (K, N)");
  if (w.element_type() != ffi::S8 || x.element_type() != (kind == S8 ? ffi::S8 : ffi::F32))
    return ffi::Error::InvalidArgument("tfx int8 matmul: w must be int8 and x " +
                                       std::string(kind == S8 ? "int8" : "float32"));
  auto sd = scale.dimensions();
  const long groups = kind == I4 && sd.size() == 2 ? sd[0] : 1;
  if (kind != S8 && (scale.element_type() != ffi::F32 || sd.size() != (kind == I4 ? 2u : 1u) ||
                     sd[sd.size() - 1] != wd[1] || groups < 1 || xd[1] % groups))
    return ffi::Error::InvalidArgument(kind == I4 ? "tfx int4 matmul: scale must be float32 "
                                                    "(groups, N), groups dividing K"
                                                  : "tfx int8 matmul: scale must be float32 (N,)");
  if (!isa_supported(isa) || threads < 1)
    return ffi::Error::InvalidArgument("tfx int8 matmul: this CPU lacks the requested ISA, "
                                       "or threads < 1");
  Gemv g{xd[0], xd[1], wd[1], x.untyped_data(), w.typed_data<int8_t>(),
         kind == S8 ? nullptr : scale.typed_data<float>(), y->untyped_data(),
         xd[1] / groups};
  if (g.k == 0)
    std::memset(g.y, 0, g.m * g.n * 4);
  else if (g.m > 0 && g.n > 0)
    parallel_panels(pool, g, isa, kind, threads);
  return ffi::Error::Success();
}

ffi::Error matmul_f32(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y, int64_t isa,
                      int64_t threads) {
  return matmul(pool, x, w, scale, y, isa, threads, F32);
}

ffi::Error matmul_s8(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> y, int64_t isa, int64_t threads) {
  return matmul(pool, x, w, w, y, isa, threads, S8);
}

ffi::Error matmul_i4(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                     ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y, int64_t isa,
                     int64_t threads) {
  return matmul(pool, x, w, scale, y, isa, threads, I4);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfxInt8MatmulF32, matmul_f32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K) f32
                                  .Arg<ffi::AnyBuffer>()  // w (K, N) int8
                                  .Arg<ffi::AnyBuffer>()  // scale (N,) f32
                                  .Ret<ffi::AnyBuffer>()  // y (M, N) f32
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfxInt8MatmulS8, matmul_s8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K) int8
                                  .Arg<ffi::AnyBuffer>()  // w (K, N) int8
                                  .Ret<ffi::AnyBuffer>()  // y (M, N) int32
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfxInt4MatmulF32, matmul_i4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K) f32
                                  .Arg<ffi::AnyBuffer>()  // w (K / 2, N) int8, packed int4
                                  .Arg<ffi::AnyBuffer>()  // scale (groups, N) f32
                                  .Ret<ffi::AnyBuffer>()  // y (M, N) f32
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

// The Python module: capsules for jax.ffi.register_ffi_target.
static PyObject* capsule(void* handler) { return PyCapsule_New(handler, nullptr, nullptr); }

static PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8_cpu",
                             "Native CPU int8 / int4 matmul for few rows (XLA FFI handlers).", -1,
                             methods};

PyMODINIT_FUNC PyInit__int8_cpu() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyModule_AddObject(m, "matmul_f32", capsule(reinterpret_cast<void*>(TfxInt8MatmulF32)));
  PyModule_AddObject(m, "matmul_s8", capsule(reinterpret_cast<void*>(TfxInt8MatmulS8)));
  PyModule_AddObject(m, "matmul_i4", capsule(reinterpret_cast<void*>(TfxInt4MatmulF32)));
  return m;
}
