// transformax's native CPU flash attention: XLA FFI handlers for the forward and backward pass,
// with the kernel compiled for AVX2+FMA and for AVX-512 and picked per call (the ISA is an
// attribute chosen in Python, checked here against what the CPU supports).

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tfx {

// The attributes of both calls, set by transformax/attention/backends/cpu_flash.py.
struct Options {
  int64_t mask_kind, causal, causal_offset;
  float scale;
  int64_t dropout_threshold;
  float inv_keep;
  int64_t block_q, block_k, isa, threads;
};

}  // namespace tfx

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    tfx::Options, ffi::StructMember<int64_t>("mask_kind"), ffi::StructMember<int64_t>("causal"),
    ffi::StructMember<int64_t>("causal_offset"), ffi::StructMember<float>("scale"),
    ffi::StructMember<int64_t>("dropout_threshold"), ffi::StructMember<float>("inv_keep"),
    ffi::StructMember<int64_t>("block_q"), ffi::StructMember<int64_t>("block_k"),
    ffi::StructMember<int64_t>("isa"), ffi::StructMember<int64_t>("threads"));

namespace {

using tfx::Options;

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_FLOAT = 2 };

// One attention call on canonical operands (see transformax/attention/problem.py): q (B, Hq, L,
// E), k (B, Hk, S, E), v (B, Hk, S, Ev), an optional mask (Bm, Hm, Lm, Sm) read through strides
// (0 on broadcast dims), all f32 and contiguous.
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
  long groups() const { return q_heads / kv_heads; }
};

// Runs item(i, scratch) for i in [0, n) on the calling thread and up to threads - 1 pool
// threads, items claimed in order from a shared counter. Pool tasks that start after every item
// is claimed touch only the shared counters, which they keep alive.
template <class Item>
void parallel_for(ffi::ThreadPool& pool, long n, long threads, long scratch_floats, Item item) {
  struct Shared {
    std::atomic<long> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, scratch_floats, &item]() {
    std::vector<float> scratch;
    for (long i; (i = shared->next.fetch_add(1)) < n;) {
      if (scratch.empty()) scratch.resize(scratch_floats);
      item(i, scratch.data());
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  long helpers = std::min(threads, n) - 1;
  for (long t = 0; t < helpers; ++t) pool.Schedule([shared, n, work]() {
    if (shared->next.load() < n) work();
  });
  work();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int VW = 8;
constexpr int MR = 6;
constexpr int NR = 2;
#include "flash_kernel.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
namespace avx512 {
constexpr int VW = 16;
constexpr int MR = 6;
constexpr int NR = 4;
#include "flash_kernel.h"
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

ffi::Error read_common(Attention& a, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer mask, ffi::AnyBuffer seed, const Options& o) {
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
  if (a.dropout && (seed.element_type() != ffi::U32 || seed.element_count() != 2))
    return ffi::Error::InvalidArgument("tfx native attention: the dropout seed must be uint32[2]");
  return ffi::Error::Success();
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer mask, ffi::AnyBuffer seed,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                        Options o) {
  Attention a{};
  ffi::Error err = read_common(a, q, k, v, mask, seed, o);
  if (err.failure()) return err;
  a.out = out->typed_data<float>();
  a.lse = lse->typed_data<float>();
  const long nq = (a.q_len + a.block_q - 1) / a.block_q;
  const long items = a.batch * a.q_heads * nq;
  // Causal query blocks cost more the later they are: hand those out first.
  auto order = [&](long i) { return a.causal ? i / nq * nq + (nq - 1 - i % nq) : i; };
  if (o.isa == ISA_AVX512)
    avx512::run_forward(pool, a, o.threads, items, order);
  else
    avx2::run_forward(pool, a, o.threads, items, order);
  return ffi::Error::Success();
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer mask, ffi::AnyBuffer seed,
                         ffi::AnyBuffer lse, ffi::AnyBuffer delta, ffi::AnyBuffer dout,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, Options o) {
  Attention a{};
  ffi::Error err = read_common(a, q, k, v, mask, seed, o);
  if (err.failure()) return err;
  a.backward = true;
  a.lse = const_cast<float*>(lse.typed_data<float>());
  a.delta = delta.typed_data<float>();
  a.dout = dout.typed_data<float>();
  a.dq = dq->typed_data<float>();
  a.dk = dk->typed_data<float>();
  a.dv = dv->typed_data<float>();
  const long items = a.batch * a.kv_heads;
  if (o.isa == ISA_AVX512)
    avx512::run_backward(pool, a, o.threads, items);
  else
    avx2::run_backward(pool, a, o.threads, items);
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
