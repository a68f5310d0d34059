// transformax's native CPU flash attention: XLA FFI handlers for the forward and backward pass,
// with the kernel compiled for AVX2+FMA and for AVX-512 and picked per call (the ISA is an
// attribute chosen in Python, checked here against what the CPU supports).

#include <Python.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tfx {

// The attributes of both calls, set by transformax/attention/backends/cpu_flash.py.
struct Options {
  int64_t mask_kind, causal, causal_offset, bounds, segments;
  float scale;
  int64_t dropout_threshold;
  float inv_keep;
  int64_t block_q, block_k, isa, threads;
};

}  // namespace tfx

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    tfx::Options, ffi::StructMember<int64_t>("mask_kind"), ffi::StructMember<int64_t>("causal"),
    ffi::StructMember<int64_t>("causal_offset"), ffi::StructMember<int64_t>("bounds"),
    ffi::StructMember<int64_t>("segments"), ffi::StructMember<float>("scale"),
    ffi::StructMember<int64_t>("dropout_threshold"), ffi::StructMember<float>("inv_keep"),
    ffi::StructMember<int64_t>("block_q"), ffi::StructMember<int64_t>("block_k"),
    ffi::StructMember<int64_t>("isa"), ffi::StructMember<int64_t>("threads"));

namespace {

using tfx::Options;
using tfx::parallel_for;

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_FLOAT = 2 };

// What one query block can see, from the causal offset and the key intervals of its rows: the
// union [lo_min, hi_max) and the intersection [lo_max, hi_min) of the rows' intervals, and the
// range of their segment ids.
struct QueryBlock {
  long lo_min, hi_max, lo_max, hi_min;
  int32_t id_min, id_max;
};

// The range of one key block's segment ids.
struct KeyBlock {
  int32_t id_min, id_max;
};

// One attention call on canonical operands (see transformax/attention/problem.py): q (B, Hq, L,
// E), k (B, Hk, S, E), v (B, Hk, S, Ev), an optional mask (Bm, Hm, Lm, Sm) read through strides
// (0 on broadcast dims), optional key intervals lo, hi (Bm, L) and segment ids q_ids (Bm, L),
// kv_ids (Bm, S) (row stride 0 where Bm = 1), all contiguous.
struct Attention {
  long batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, block_q, block_k;
  float scale, inv_keep;
  bool causal, dropout, backward;
  long causal_offset;
  const float *q, *k, *v, *dout, *delta;
  float *out, *lse, *dq, *dk, *dv;
  const char* mask;
  int mask_kind;
  long mask_itemsize, mask_stride[4];
  const uint32_t* seed;
  uint32_t dropout_threshold;
  uint32_t bh_stride, bh_offset;  // dropout counter of (b, h): b * bh_stride + h + bh_offset
  bool bounds, segments;
  const int32_t *lo, *hi, *q_ids, *kv_ids;
  long bounds_stride, q_ids_stride, kv_ids_stride;
  const QueryBlock* query_blocks;  // (B, nq) for block_q
  const KeyBlock* key_blocks;      // (B, nk) for block_k, where there are segments
  long groups() const { return q_heads / kv_heads; }
  long n_query_blocks() const { return (q_len + block_q - 1) / block_q; }
  long n_key_blocks() const { return (kv_len + block_k - 1) / block_k; }
};

// Key j is visible from query `row` of batch b only inside [first, end) (and where the ids
// agree).
struct Interval {
  long first, end;
};

Interval row_interval(const Attention& a, long b, long row) {
  long first = 0, end = a.kv_len;
  if (a.bounds) {
    first = std::max<long>(first, a.lo[b * a.bounds_stride + row]);
    end = std::min<long>(end, a.hi[b * a.bounds_stride + row]);
  }
  if (a.causal) end = std::min(end, row + a.causal_offset + 1);
  return {first, std::max(first, end)};
}

// Summaries of every (batch, query block) and, with segments, every (batch, key block).
void summarise(const Attention& a, std::vector<QueryBlock>& queries, std::vector<KeyBlock>& keys) {
  const long nq = a.n_query_blocks(), nk = a.n_key_blocks();
  queries.resize(a.batch * nq);
  for (long b = 0; b < a.batch; ++b)
    for (long i = 0; i < nq; ++i) {
      QueryBlock x{a.kv_len, 0, 0, a.kv_len, INT32_MAX, INT32_MIN};
      for (long r = i * a.block_q; r < std::min(a.q_len, (i + 1) * a.block_q); ++r) {
        Interval iv = row_interval(a, b, r);
        if (iv.first < iv.end) {
          x.lo_min = std::min(x.lo_min, iv.first);
          x.hi_max = std::max(x.hi_max, iv.end);
        }
        x.lo_max = std::max(x.lo_max, iv.first);
        x.hi_min = std::min(x.hi_min, iv.end);
        if (a.segments) {
          int32_t id = a.q_ids[b * a.q_ids_stride + r];
          x.id_min = std::min(x.id_min, id);
          x.id_max = std::max(x.id_max, id);
        }
      }
      x.lo_min = std::min(x.lo_min, x.hi_max);
      queries[b * nq + i] = x;
    }
  if (!a.segments) return;
  keys.resize(a.batch * nk);
  for (long b = 0; b < a.batch; ++b)
    for (long j = 0; j < nk; ++j) {
      KeyBlock x{INT32_MAX, INT32_MIN};
      for (long c = j * a.block_k; c < std::min(a.kv_len, (j + 1) * a.block_k); ++c) {
        int32_t id = a.kv_ids[b * a.kv_ids_stride + c];
        x.id_min = std::min(x.id_min, id);
        x.id_max = std::max(x.id_max, id);
      }
      keys[b * nk + j] = x;
    }
}

// n floats aligned to a cache line (so vector loads never straddle two lines).
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Floats = std::unique_ptr<float[], FreeDeleter>;

Floats aligned_floats(long n) {
  const size_t bytes = (size_t(std::max(n, 1L)) * sizeof(float) + 63) / 64 * 64;
  return Floats(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// At least n floats owned by this thread and kept for its next calls (slot 0: a worker's tiles;
// 1: a call's packed keys or dQ partial sums), so that calls in a loop touch no fresh pages
// (fresh ones cost a page fault each, 3-5% of a 10 ms call). Above 128 MiB a call gets a buffer
// of its own, in `own`, freed when the call ends.
float* thread_buffer(int slot, long n, Floats& own) {
  constexpr long kKeptFloats = 32L << 20;
  if (n > kKeptFloats) {
    own = aligned_floats(n);
    return own.get();
  }
  thread_local Floats kept[2];
  thread_local long size[2] = {0, 0};
  if (size[slot] < n) {
    kept[slot].reset();
    kept[slot] = aligned_floats(n);
    size[slot] = n;
  }
  return kept[slot].get();
}

// A parallel_for worker maker whose items all get the thread's scratch of `floats`.
template <class Item>
auto with_scratch(long floats, const Item& item) {
  return [floats, &item] {
    Floats own;
    float* scratch = thread_buffer(0, floats, own);
    return [own = std::move(own), scratch, &item](long i) { item(i, scratch); };
  };
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int VW = 8;
constexpr int MR = 6;
constexpr int NR = 2;
constexpr long KC = 256;
#define VMAX(a, b) vf(_mm256_max_ps(__m256(a), __m256(b)))
#include "flash_kernel.h"
#undef VMAX
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
namespace avx512 {
constexpr int VW = 16;
constexpr int MR = 6;
constexpr int NR = 4;
constexpr long KC = 128;
#define VMAX(a, b) vf(_mm512_max_ps(__m512(a), __m512(b)))
#include "flash_kernel.h"
#undef VMAX
}  // namespace avx512
#pragma GCC pop_options

enum Isa { ISA_AVX2 = 0, ISA_AVX512 = 1 };

bool isa_supported(int64_t isa) {
  __builtin_cpu_init();
  if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == ISA_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return false;
}

// Reads an int32 (1 | B, length) operand: its data and row stride (0 where broadcast).
bool read_rows(ffi::AnyBuffer x, long batch, long length, const int32_t*& data, long& stride) {
  auto d = x.dimensions();
  if (x.element_type() != ffi::S32 || d.size() != 2 || (d[0] != 1 && d[0] != batch) ||
      d[1] != length)
    return false;
  data = x.typed_data<int32_t>();
  stride = d[0] == 1 ? 0 : length;
  return true;
}

// The structured mask's operands: key intervals lo, hi and segment ids q_ids, kv_ids.
struct Structure {
  ffi::AnyBuffer lo, hi, q_ids, kv_ids;
};

ffi::Error read_common(Attention& a, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer mask, ffi::AnyBuffer seed, const Structure& st,
                       const Options& o) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("tfx native attention: q, k, v must have rank 4");
  if (q.element_type() != ffi::F32 || k.element_type() != ffi::F32 ||
      v.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("tfx native attention: q, k, v must be float32");
  if (o.block_q < 1 || o.block_q > 512 || o.block_k < 1 || o.block_k > 4096 || o.threads < 1)
    return ffi::Error::InvalidArgument("tfx native attention: block_q must be in [1, 512] and "
                                       "block_k in [1, 4096], threads >= 1");
  if (!isa_supported(o.isa))
    return ffi::Error::InvalidArgument("tfx native attention: this CPU lacks the requested ISA");
  a.batch = qd[0]; a.q_heads = qd[1]; a.q_len = qd[2]; a.head_dim = qd[3];
  a.kv_heads = kd[1]; a.kv_len = kd[2]; a.v_head_dim = vd[3];
  if (a.kv_heads == 0 || a.q_heads % a.kv_heads != 0 || kd[0] != a.batch || vd[0] != a.batch ||
      kd[3] != a.head_dim || vd[1] != a.kv_heads || vd[2] != a.kv_len)
    return ffi::Error::InvalidArgument("tfx native attention: inconsistent q/k/v shapes");
  a.q = q.typed_data<float>(); a.k = k.typed_data<float>(); a.v = v.typed_data<float>();
  a.block_q = o.block_q; a.block_k = o.block_k;
  a.scale = o.scale; a.inv_keep = o.inv_keep;
  a.causal = o.causal != 0; a.causal_offset = o.causal_offset;
  a.mask_kind = int(o.mask_kind);
  a.mask = static_cast<const char*>(mask.untyped_data());
  if (o.mask_kind != MASK_NONE) {
    auto md = mask.dimensions();
    bool ok = md.size() == 4 && (o.mask_kind == MASK_BOOL ? mask.element_type() == ffi::PRED
                                                          : mask.element_type() == ffi::F32);
    const long full[4] = {a.batch, a.q_heads, a.q_len, a.kv_len};
    for (int d = 0; ok && d < 4; ++d) ok = md[d] == 1 || md[d] == full[d];
    if (!ok)
      return ffi::Error::InvalidArgument("tfx native attention: the mask must be bool or f32 of "
                                         "shape (1|B, 1|Hq, 1|L, 1|S)");
    a.mask_itemsize = o.mask_kind == MASK_BOOL ? 1 : 4;
    long stride = 1;
    for (int d = 3; d >= 0; --d) {
      a.mask_stride[d] = md[d] == 1 ? 0 : stride;
      stride *= md[d];
    }
  }
  a.dropout = o.dropout_threshold > 0;
  a.dropout_threshold = uint32_t(o.dropout_threshold);
  a.seed = static_cast<const uint32_t*>(seed.untyped_data());
  const bool shard_seed = seed.element_count() == 4;  // a shard's: (b, h) in the whole problem
  if (a.dropout && (seed.element_type() != ffi::U32 || !(shard_seed || seed.element_count() == 2)))
    return ffi::Error::InvalidArgument(
        "tfx native attention: the dropout seed must be uint32[2] or uint32[4]");
  a.bh_stride = a.dropout && shard_seed ? a.seed[3] : uint32_t(a.q_heads);
  a.bh_offset = a.dropout && shard_seed ? a.seed[2] : 0u;
  a.bounds = o.bounds != 0;
  if (a.bounds && !(read_rows(st.lo, a.batch, a.q_len, a.lo, a.bounds_stride) &&
                    read_rows(st.hi, a.batch, a.q_len, a.hi, a.bounds_stride) &&
                    st.lo.dimensions()[0] == st.hi.dimensions()[0]))
    return ffi::Error::InvalidArgument("tfx native attention: the key intervals lo, hi must be "
                                       "int32 of one shape (1|B, L)");
  a.segments = o.segments != 0;
  if (a.segments && !(read_rows(st.q_ids, a.batch, a.q_len, a.q_ids, a.q_ids_stride) &&
                      read_rows(st.kv_ids, a.batch, a.kv_len, a.kv_ids, a.kv_ids_stride)))
    return ffi::Error::InvalidArgument("tfx native attention: the segment ids must be int32 "
                                       "q_ids (1|B, L) and kv_ids (1|B, S)");
  return ffi::Error::Success();
}

// The query blocks head by head (consecutive items share their keys and values in cache), each
// head's widest visible key range first (dynamic scheduling then ends with cheap ones).
std::vector<long> forward_order(const Attention& a) {
  const long nq = a.n_query_blocks();
  std::vector<long> order(a.batch * a.q_heads * nq), width(order.size());
  for (long x = 0; x < long(order.size()); ++x) {
    const QueryBlock& qb = a.query_blocks[x / (a.q_heads * nq) * nq + x % nq];
    order[x] = x;
    width[x] = qb.hi_max - qb.lo_min;
  }
  std::stable_sort(order.begin(), order.end(), [&](long x, long y) {
    return x / nq != y / nq ? x / nq < y / nq : width[x] > width[y];
  });
  return order;
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer mask, ffi::AnyBuffer seed,
                        ffi::AnyBuffer lo, ffi::AnyBuffer hi, ffi::AnyBuffer q_ids,
                        ffi::AnyBuffer kv_ids, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, Options o) {
  Attention a{};
  ffi::Error err = read_common(a, q, k, v, mask, seed, {lo, hi, q_ids, kv_ids}, o);
  if (err.failure()) return err;
  a.out = out->typed_data<float>();
  a.lse = lse->typed_data<float>();
  std::vector<QueryBlock> queries;
  std::vector<KeyBlock> keys;
  summarise(a, queries, keys);
  a.query_blocks = queries.data();
  a.key_blocks = keys.data();
  const std::vector<long> order = forward_order(a);
  if (o.isa == ISA_AVX512)
    avx512::run_forward(pool, a, o.threads, order);
  else
    avx2::run_forward(pool, a, o.threads, order);
  return ffi::Error::Success();
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer mask, ffi::AnyBuffer seed,
                         ffi::AnyBuffer lo, ffi::AnyBuffer hi, ffi::AnyBuffer q_ids,
                         ffi::AnyBuffer kv_ids, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                         ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                         ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                         Options o) {
  Attention a{};
  ffi::Error err = read_common(a, q, k, v, mask, seed, {lo, hi, q_ids, kv_ids}, o);
  if (err.failure()) return err;
  a.backward = true;
  a.lse = const_cast<float*>(lse.typed_data<float>());
  a.delta = delta.typed_data<float>();
  a.dout = dout.typed_data<float>();
  a.dq = dq->typed_data<float>();
  a.dk = dk->typed_data<float>();
  a.dv = dv->typed_data<float>();
  std::vector<QueryBlock> queries;
  std::vector<KeyBlock> keys;
  summarise(a, queries, keys);
  a.query_blocks = queries.data();
  a.key_blocks = keys.data();
  // Key chunks per (batch, key/value head): enough items for two per thread.
  const long heads = a.batch * a.kv_heads;
  const long chunks = std::max(1L, std::min(a.n_key_blocks(), (2 * o.threads + heads - 1) / heads));
  if (o.isa == ISA_AVX512)
    avx512::run_backward(pool, a, o.threads, chunks);
  else
    avx2::run_backward(pool, a, o.threads, chunks);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfxFlashForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // seed
                                  .Arg<ffi::AnyBuffer>()  // lo
                                  .Arg<ffi::AnyBuffer>()  // hi
                                  .Arg<ffi::AnyBuffer>()  // q_ids
                                  .Arg<ffi::AnyBuffer>()  // kv_ids
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attrs<Options>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfxFlashBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // seed
                                  .Arg<ffi::AnyBuffer>()  // lo
                                  .Arg<ffi::AnyBuffer>()  // hi
                                  .Arg<ffi::AnyBuffer>()  // q_ids
                                  .Arg<ffi::AnyBuffer>()  // kv_ids
                                  .Arg<ffi::AnyBuffer>()  // lse (finite: 0 for hidden rows)
                                  .Arg<ffi::AnyBuffer>()  // delta
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Attrs<Options>());

// The Python module: capsules for jax.ffi.register_ffi_target.
static PyObject* capsule(void* handler) { return PyCapsule_New(handler, nullptr, nullptr); }

static PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flash_cpu",
                             "Native CPU flash attention (XLA FFI handlers).", -1, methods};

PyMODINIT_FUNC PyInit__flash_cpu() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyModule_AddObject(m, "forward", capsule(reinterpret_cast<void*>(TfxFlashForward)));
  PyModule_AddObject(m, "backward", capsule(reinterpret_cast<void*>(TfxFlashBackward)));
  return m;
}
