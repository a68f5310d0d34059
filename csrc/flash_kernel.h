// Flash attention on the CPU for one instruction set. This file is included once per ISA by
// flash_attention.cc, inside a namespace that defines `VW` (floats per vector), `MR` (rows) and
// `NR` (vectors of columns) of the GEMM micro-kernel, `KC` (rows of a B panel per pass) and
// `VMAX` (the ISA's max instruction) under a matching `#pragma GCC target`; it includes nothing
// itself.
//
// Everything is f32. A forward work item is one (batch, query head, query block); a backward
// item is one (batch, key/value head, key chunk: every chunks-th key block): it owns dK/dV of
// its key blocks and a private slab of dQ partial sums, which a last pass adds up, so no two
// items write the same memory.

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned access
typedef int vi __attribute__((vector_size(VW * 4)));
typedef unsigned vu __attribute__((vector_size(VW * 4)));

static inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
static inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
static inline vf splat(float x) { return x - vf{}; }  // x - (+0) == x for every x
static inline vf vmax(vf a, vf b) { return VMAX(a, b); }  // b where either is NaN
static inline long round_up(long n) { return (n + VW - 1) / VW * VW; }

static inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < VW; ++i) m = m > x[i] ? m : x[i];
  return m;
}

static inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += x[i];
  return s;
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^x for f32 lanes where x <= ~0 (scores less their row's maximum, in log2 units): 2^n * p(f)
// with n = round(x), f = x - n in [-1/2, 1/2] and p a degree-5 fit of 2^f (relative error
// < 2e-7). Exactly 0 at and below -126.5 (so 2^-inf = 0); NaN in, NaN out.
static inline vf exp2_neg(vf x) {
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  x = vmax(splat(-127.f), x);
  const vf shifted = x + magic;
  const vf f = x - (shifted - magic);
  vf p = splat(1.3264727e-3f);
  p = p * f + splat(9.6715130e-3f);
  p = p * f + splat(5.5507336e-2f);
  p = p * f + splat(2.4022242e-1f);
  p = p * f + splat(6.9314700e-1f);
  p = p * f + splat(1.f);
  // The low bits of `shifted` hold n; its exponent field n + 127 is 0 (the float 0) at n = -127.
  const vi exponent = ((vi)shifted - (0x4B400000 - 127)) << 23;
  return p * (vf)exponent;
}

// The largest of n floats (n a multiple of VW), in four independent chains.
static inline float max_of(const float* s, long n) {
  const vf lowest = splat(-__builtin_inff());
  vf m[4] = {lowest, lowest, lowest, lowest};
  long c = 0;
  for (; c + 4 * VW <= n; c += 4 * VW)
    for (int u = 0; u < 4; ++u) m[u] = vmax(m[u], load(s + c + u * VW));
  for (; c < n; c += VW) m[0] = vmax(m[0], load(s + c));
  return hmax(vmax(vmax(m[0], m[1]), vmax(m[2], m[3])));
}

// C[m, n] (+)= sum_k A[m*a_rs + k*a_cs] * B[k*ldb + n] for R rows and NV vectors of columns,
// accumulated in registers.
template <int R, int NV>
static inline void micro(long K, const float* A, long a_rs, long a_cs, const float* B, long ldb,
                         float* C, long ldc, bool accumulate) {
  vf acc[R][NV];
  const float* a[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    a[i] = A + i * a_rs;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? load(C + i * ldc + v * VW) : splat(0.f);
  }
#pragma GCC unroll 4
  for (long k = 0, off = 0; k < K; ++k, off += a_cs, B += ldb) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + v * VW);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const vf x = splat(a[i][off]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += x * b[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * VW, acc[i][v]);
}

template <int NV>
static void micro_rows(long rows, long K, const float* A, long a_rs, long a_cs, const float* B,
                       long ldb, float* C, long ldc, bool accumulate) {
  switch (rows) {
#define TFX_ROWS(r) \
  case r: micro<r, NV>(K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate); break;
    TFX_ROWS(1) TFX_ROWS(2) TFX_ROWS(3) TFX_ROWS(4) TFX_ROWS(5) TFX_ROWS(6)
#undef TFX_ROWS
  }
}

// C[:, 0 : NV * VW] (+)= A (M x K) * B (K x NV * VW, row stride ldb), MR rows at a time.
template <int NV>
static void micro_column(long M, long K, const float* A, long a_rs, long a_cs, const float* B,
                         long ldb, float* C, long ldc, bool accumulate) {
  for (long m0 = 0; m0 < M; m0 += MR)
    micro_rows<NV>(M - m0 < MR ? M - m0 : MR, K, A + m0 * a_rs, a_rs, a_cs, B, ldb,
                   C + m0 * ldc, ldc, accumulate);
}

template <int NV>
static void gemm_panels(long M, long n0, long n1, long K, const float* A, long a_rs, long a_cs,
                        const float* B, long ldb, float* C, long ldc, bool accumulate) {
  for (; n0 + NV * VW <= n1; n0 += NV * VW)
    micro_column<NV>(M, K, A, a_rs, a_cs, B + n0, ldb, C + n0, ldc, accumulate);
}

// C (M x N) (+)= A (M x K, strides a_rs/a_cs) * B (K x N, row stride ldb); N is a multiple of VW.
// Panels of NR columns of B stay in L1 while every row of A passes them.
static void gemm(long M, long N, long K, const float* A, long a_rs, long a_cs, const float* B,
                 long ldb, float* C, long ldc, bool accumulate) {
  const long wide = N / (NR * VW) * (NR * VW);
  const long depth = 8192 / (NR * VW);  // rows of a 32 KiB panel of B, which stays in L1
  for (long k0 = 0; k0 < K; k0 += depth, accumulate = true) {
    const long kc = K - k0 < depth ? K - k0 : depth;
    const float* a = A + k0 * a_cs;
    const float* b = B + k0 * ldb;
    gemm_panels<NR>(M, 0, wide, kc, a, a_rs, a_cs, b, ldb, C, ldc, accumulate);
    gemm_panels<1>(M, wide, N, kc, a, a_rs, a_cs, b, ldb, C, ldc, accumulate);
  }
}

// Panel-major storage of a (K x N) matrix, N a multiple of VW: panels of PW = NR * VW columns
// (the last one may be narrower), each holding its K rows contiguously, so that the
// micro-kernel reads B in address order.
constexpr long PW = NR * VW;

// Writes B = src^T in panels, zero-padded to (K x N): B[d, c] = src[c * lds + d] for the
// first `depth` d and `cols` c.
static void pack_transposed_panels(const float* src, long lds, long cols, long depth, long K,
                                   long N, float* dst) {
  for (long p0 = 0; p0 < N; p0 += PW) {
    const long w = N - p0 < PW ? N - p0 : PW;
    const long wc = cols - p0 < 0 ? 0 : cols - p0 < w ? cols - p0 : w;  // columns with data
    float* panel = dst + p0 * K;
    const float* in = src + p0 * lds;
    for (long d = 0; d < K; ++d) {
      float* row = panel + d * w;
      long c = 0;
      if (d < depth)
        for (; c < wc; ++c) row[c] = in[c * lds + d];
      for (; c < w; ++c) row[c] = 0.f;
    }
  }
}

// C (M x (n1 - n0)) (+)= A (M x K) * B[k0 : k0 + K, n0 : n1] for B (Kp x N) in panels; n0 and
// n1 are multiples of VW. Rows of B pass in groups of KC, whose panel stays in L1.
static void gemm_packed(long M, long n0, long n1, long K, const float* A, long a_rs, long a_cs,
                        const float* B, long Kp, long N, long k0, float* C, long ldc,
                        bool accumulate) {
  for (long kk = 0; kk < K; kk += KC, accumulate = true) {
    const long kc = K - kk < KC ? K - kk : KC;
    const float* a = A + kk * a_cs;
    for (long p0 = n0 / PW * PW; p0 < n1; p0 += PW) {
      const long w = N - p0 < PW ? N - p0 : PW;
      const long lo = n0 > p0 ? n0 : p0, hi = n1 < p0 + w ? n1 : p0 + w;
      const float* b = B + p0 * Kp + (k0 + kk) * w + (lo - p0);
      float* c = C + (lo - n0);
      switch ((hi - lo) / VW) {
#define TFX_COLUMN(nv) \
  case nv: micro_column<nv>(M, kc, a, a_rs, a_cs, b, w, c, ldc, accumulate); break;
        TFX_COLUMN(1) TFX_COLUMN(2) TFX_COLUMN(3) TFX_COLUMN(4)
#undef TFX_COLUMN
      }
    }
  }
}

// Copies rows x cols of src (row stride lds) into dst (row stride ldd), scaled, zero-padded to
// ldd columns.
static void pack_rows(const float* src, long lds, long rows, long cols, float scale, float* dst,
                      long ldd) {
  for (long r = 0; r < rows; ++r) {
    for (long c = 0; c < cols; ++c) dst[r * ldd + c] = src[r * lds + c] * scale;
    for (long c = cols; c < ldd; ++c) dst[r * ldd + c] = 0.f;
  }
}

// MurmurHash3's 32-bit finaliser on a uint32 or a vector of them.
template <class T>
static inline T fmix32(T x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

struct Tile {
  long row0, rows, col0, cols, ldt;  // ldt: cols rounded up to the vector width
};

// Sets the scores of one tile row (query `row`, keys t.col0 .. t.col0 + t.ldt) to -inf where the
// structure hides them (causal offset, key interval, segment ids, dense mask, keys past the
// tile) and adds a float mask.
static void mask_row(const Attention& a, long b, long h, long row, const Tile& t, float* s) {
  const float inf = __builtin_inff();
  if (a.mask_kind != MASK_NONE) {
    const char* m = a.mask + (b * a.mask_stride[0] + h * a.mask_stride[1] +
                              row * a.mask_stride[2] + t.col0 * a.mask_stride[3]) * a.mask_itemsize;
    long step = a.mask_stride[3] * a.mask_itemsize;
    if (a.mask_kind == MASK_BOOL) {
      for (long c = 0; c < t.cols; ++c)
        if (!m[c * step]) s[c] = -inf;
    } else {
      for (long c = 0; c < t.cols; ++c) s[c] += *reinterpret_cast<const float*>(m + c * step);
    }
  }
  const Interval iv = row_interval(a, b, row);
  const long first = iv.first - t.col0, end = std::min(iv.end - t.col0, t.cols);
  for (long c = 0; c < t.ldt; ++c) s[c] = c >= first && c < end ? s[c] : -inf;
  if (a.segments && first < end) {
    const int32_t id = a.q_ids[b * a.q_ids_stride + row];
    const int32_t* kv = a.kv_ids + b * a.kv_ids_stride + t.col0;
    for (long c = first < 0 ? 0 : first; c < end; ++c) s[c] = kv[c] == id ? s[c] : -inf;
  }
}

// Dropout keep bits of one tile row, the same counter hash as tile_math.dropout_keep in Python:
// writes 1.0 (kept) or 0.0 per column.
static void keep_row(const Attention& a, long b, long h, long row, long col0, long ldt,
                     float* keep) {
  const unsigned batch_head = unsigned(b) * a.bh_stride + unsigned(h) + a.bh_offset;
  unsigned row_key = fmix32(a.seed[0] ^ fmix32(batch_head * 0x9E3779B9u + unsigned(row)));
  vu lane;
  for (int i = 0; i < VW; ++i) lane[i] = unsigned(i);
  for (long c = 0; c < ldt; c += VW) {
    vu cols = lane + unsigned(col0 + c);
    vu bits = fmix32(row_key ^ (cols * 0x27D4EB2Fu + a.seed[1]));
    vi kept = bits >= a.dropout_threshold;
    store(keep + c, kept ? splat(1.f) : splat(0.f));
  }
}

enum TileClass { EMPTY, PARTIAL, FULL };

// Whether the mask hides all of a tile of query block `qb` (its rows row0 .. row0 + rows) and keys
// col0 .. col0 + cols of key block `j` (EMPTY: skipped), some of it (PARTIAL: masked per element)
// or none (FULL: no masking work). Conservative: PARTIAL may hide all or nothing.
static TileClass classify(const Attention& a, const QueryBlock& qb, long b, long j, const Tile& t) {
  const long end = t.col0 + t.cols;
  if (end <= qb.lo_min || t.col0 >= qb.hi_max) return EMPTY;
  bool full = qb.lo_max <= t.col0 && end <= qb.hi_min;
  if (a.segments) {
    const KeyBlock& kb = a.key_blocks[b * a.n_key_blocks() + j];
    if (qb.id_max < kb.id_min || kb.id_max < qb.id_min) return EMPTY;
    full = full && qb.id_min == qb.id_max && kb.id_min == kb.id_max && qb.id_min == kb.id_min;
  }
  return full && a.mask_kind == MASK_NONE && t.ldt == t.cols ? FULL : PARTIAL;
}

struct Scratch {
  float *q, *s, *p, *o, *kt, *vt, *kr, *dk, *dv, *keep;
};

// Floats one worker needs.
static long scratch_floats(const Attention& a) {
  long ep = round_up(a.head_dim), evp = round_up(a.v_head_dim), bq = a.block_q, bk = round_up(a.block_k);
  return bq * ep + 3 * bq * bk + bq * evp + ep * bk + bk * evp + evp * bk + bk * ep + bk * ep +
         bk * evp + bk + 16 * 16;
}

static Scratch carve(const Attention& a, float* base) {
  long ep = round_up(a.head_dim), evp = round_up(a.v_head_dim), bq = a.block_q, bk = round_up(a.block_k);
  Scratch s;
  float* p = base;
  auto take = [&](long n) { float* r = p; p += (n + 15) / 16 * 16; return r; };  // 64-byte aligned
  s.q = take(bq * ep); s.s = take(bq * bk); s.p = take(bq * bk); s.keep = take(bq * bk);
  s.o = take(bq * evp); s.kt = take(ep * bk); s.vt = take(evp * bk); s.kr = take(bk * ep);
  s.dk = take(bk * ep); s.dv = take(bk * evp);
  return s;
}

// Whether the forward reads V in place (its rows are whole vectors) rather than packed.
static bool v_in_place(const Attention& a) { return a.v_head_dim % VW == 0; }

// The forward's key/value tiles are packed once per call: tile j of head (b, hk) holds K^T
// (ep x ldk, in panels) and, unless V is read in place, V (ldk x evp), zero-padded.
static long packed_tile_floats(const Attention& a) {
  const long ldk = round_up(a.block_k);
  return ldk * round_up(a.head_dim) + (v_in_place(a) ? 0 : ldk * round_up(a.v_head_dim));
}

static void pack_tile(const Attention& a, long tile, float* packed) {
  const long nk = a.n_key_blocks(), head = tile / nk, j = tile % nk;
  const long E = a.head_dim, Ev = a.v_head_dim, col0 = j * a.block_k, ldk = round_up(a.block_k);
  const long cols = a.kv_len - col0 < a.block_k ? a.kv_len - col0 : a.block_k;
  float* kt = packed + tile * packed_tile_floats(a);
  pack_transposed_panels(a.k + (head * a.kv_len + col0) * E, E, cols, E, round_up(E), ldk, kt);
  if (!v_in_place(a))
    pack_rows(a.v + (head * a.kv_len + col0) * Ev, Ev, cols, Ev, 1.f, kt + round_up(E) * ldk,
              round_up(Ev));
}

// Forward of one (batch, query head, query block): only the keys its rows can see, from the
// packed tiles (a tile is entered at a vector-aligned column).
static void forward_item(const Attention& a, const float* packed, long item, float* scratch) {
  const long nq = a.n_query_blocks(), nk = a.n_key_blocks(), ldk = round_up(a.block_k);
  const long b = item / (a.q_heads * nq), h = item / nq % a.q_heads, i = item % nq;
  const long hk = h / a.groups(), E = a.head_dim, Ev = a.v_head_dim;
  const long ep = round_up(E), evp = round_up(Ev);
  const float inf = __builtin_inff();
  const QueryBlock& qb = a.query_blocks[b * nq + i];
  Scratch sc = carve(a, scratch);
  Tile t;
  t.row0 = i * a.block_q;
  t.rows = a.q_len - t.row0 < a.block_q ? a.q_len - t.row0 : a.block_q;
  pack_rows(a.q + ((b * a.q_heads + h) * a.q_len + t.row0) * E, E, t.rows, E, a.scale, sc.q, ep);
  float shift[512], total[512];
  for (long r = 0; r < t.rows; ++r) { shift[r] = -inf; total[r] = 0.f; }
  for (long x = 0; x < t.rows * evp; ++x) sc.o[x] = 0.f;
  for (long j = qb.lo_min / a.block_k; j * a.block_k < qb.hi_max; ++j) {
    const long skip = std::max(0L, qb.lo_min - j * a.block_k) / VW * VW;  // keys no row sees
    t.col0 = j * a.block_k + skip;
    t.cols = std::min((j + 1) * a.block_k, qb.hi_max) - t.col0;
    t.ldt = round_up(t.cols);
    const TileClass cls = classify(a, qb, b, j, t);
    if (cls == EMPTY) continue;
    const float* kt = packed + ((b * a.kv_heads + hk) * nk + j) * packed_tile_floats(a);
    gemm_packed(t.rows, skip, skip + t.ldt, ep, sc.q, ep, 1, kt, ep, ldk, 0, sc.s, t.ldt, false);
    for (long r = 0; r < t.rows; ++r) {
      float* s = sc.s + r * t.ldt;
      if (cls == PARTIAL) mask_row(a, b, h, t.row0 + r, t, s);
      // Scores are shifted in log2 units by `shift` (the row's running maximum times log2 e,
      // rounded), the same shift for the running sum, the output and the LSE.
      const float tile_shift = max_of(s, t.ldt) * kLog2e;
      const float new_shift = tile_shift > shift[r] ? tile_shift : shift[r];
      const float safe = new_shift == -inf ? 0.f : new_shift;
      const vf log2e = splat(kLog2e), offset = splat(safe);
      vf sum = splat(0.f);
      for (long c = 0; c < t.ldt; c += VW) {
        const vf e = exp2_neg(load(s + c) * log2e - offset);
        sum += e;
        store(s + c, e);
      }
      const float correction = shift[r] == -inf ? 0.f : __builtin_exp2f(shift[r] - safe);
      total[r] = total[r] * correction + hsum(sum);
      shift[r] = new_shift;
      if (a.dropout) {
        keep_row(a, b, h, t.row0 + r, t.col0, t.ldt, sc.keep);
        for (long c = 0; c < t.ldt; c += VW) store(s + c, load(s + c) * load(sc.keep + c));
      }
      if (correction != 1.f) {
        const vf corr = splat(correction);
        for (long c = 0; c < evp; c += VW) store(sc.o + r * evp + c, load(sc.o + r * evp + c) * corr);
      }
    }
    const long ldv = v_in_place(a) ? Ev : evp;
    const float* vt = (v_in_place(a) ? a.v + ((b * a.kv_heads + hk) * a.kv_len + j * a.block_k) * Ev
                                     : kt + ep * ldk) + skip * ldv;
    gemm(t.rows, evp, t.cols, sc.s, t.ldt, 1, vt, ldv, sc.o, evp, true);
  }
  float* out = a.out + ((b * a.q_heads + h) * a.q_len + t.row0) * Ev;
  float* lse = a.lse + (b * a.q_heads + h) * a.q_len + t.row0;
  for (long r = 0; r < t.rows; ++r) {
    const bool seen = total[r] > 0.f;
    const float inv = seen ? a.inv_keep / total[r] : 0.f;
    for (long c = 0; c < Ev; ++c) out[r * Ev + c] = sc.o[r * evp + c] * inv;
    lse[r] = seen ? float(double(shift[r]) * 0.69314718055994531 + __builtin_log(total[r])) : -inf;
  }
}

// Backward of one (batch, key/value head, key chunk): key blocks chunk, chunk + chunks, ...,
// against every query block of every query head in its group that sees them; dQ's partial sums
// go to `dq`, (G, L, ep) floats.
static void backward_item(const Attention& a, long item, long chunks, float* dq, float* scratch) {
  const long b = item / chunks / a.kv_heads, hk = item / chunks % a.kv_heads, G = a.groups();
  const long E = a.head_dim, Ev = a.v_head_dim, ep = round_up(E), evp = round_up(Ev);
  Scratch sc = carve(a, scratch);
  const float* k = a.k + (b * a.kv_heads + hk) * a.kv_len * E;
  const float* v = a.v + (b * a.kv_heads + hk) * a.kv_len * Ev;
  for (long x = 0; x < G * a.q_len * ep; ++x) dq[x] = 0.f;
  const long nq = a.n_query_blocks();
  Tile t;
  for (long j = item % chunks; j < a.n_key_blocks(); j += chunks) {
    t.col0 = j * a.block_k;
    t.cols = a.kv_len - t.col0 < a.block_k ? a.kv_len - t.col0 : a.block_k;
    t.ldt = round_up(t.cols);
    pack_transposed_panels(k + t.col0 * E, E, t.cols, E, ep, t.ldt, sc.kt);
    pack_transposed_panels(v + t.col0 * Ev, Ev, t.cols, Ev, evp, t.ldt, sc.vt);
    pack_rows(k + t.col0 * E, E, t.cols, E, 1.f, sc.kr, ep);
    for (long x = 0; x < t.ldt * ep; ++x) sc.dk[x] = 0.f;
    for (long x = 0; x < t.ldt * evp; ++x) sc.dv[x] = 0.f;
    for (long g = 0; g < G; ++g) {
      const long h = hk * G + g;
      const long head = (b * a.q_heads + h) * a.q_len;
      for (t.row0 = 0; t.row0 < a.q_len; t.row0 += a.block_q) {
        t.rows = a.q_len - t.row0 < a.block_q ? a.q_len - t.row0 : a.block_q;
        const TileClass cls = classify(a, a.query_blocks[b * nq + t.row0 / a.block_q], b, j, t);
        if (cls == EMPTY) continue;
        pack_rows(a.q + (head + t.row0) * E, E, t.rows, E, a.scale, sc.q, ep);
        pack_rows(a.dout + (head + t.row0) * Ev, Ev, t.rows, Ev, 1.f, sc.o, evp);
        gemm_packed(t.rows, 0, t.ldt, ep, sc.q, ep, 1, sc.kt, ep, t.ldt, 0, sc.s, t.ldt,
                    false);  // scores
        gemm_packed(t.rows, 0, t.ldt, evp, sc.o, evp, 1, sc.vt, evp, t.ldt, 0, sc.p, t.ldt,
                    false);  // dP
        for (long r = 0; r < t.rows; ++r) {
          float* s = sc.s + r * t.ldt;
          float* dp = sc.p + r * t.ldt;
          if (cls == PARTIAL) mask_row(a, b, h, t.row0 + r, t, s);
          const vf lse = splat(a.lse[head + t.row0 + r] * kLog2e), log2e = splat(kLog2e);
          const vf delta = splat(a.delta[head + t.row0 + r]);
          if (a.dropout) keep_row(a, b, h, t.row0 + r, t.col0, t.ldt, sc.keep + r * t.ldt);
          for (long c = 0; c < t.ldt; c += VW) {
            vf p = exp2_neg(load(s + c) * log2e - lse);
            vf d = load(dp + c);
            if (a.dropout) {
              vf keep = load(sc.keep + r * t.ldt + c) * splat(a.inv_keep);
              d = d * keep;
              store(sc.keep + r * t.ldt + c, p * keep);  // the dropped probabilities, for dV
            }
            store(s + c, p);
            store(dp + c, p * (d - delta));  // dS
          }
        }
        const float* dropped = a.dropout ? sc.keep : sc.s;
        gemm(t.ldt, evp, t.rows, dropped, 1, t.ldt, sc.o, evp, sc.dv, evp, true);  // dV += P^T dO
        gemm(t.ldt, ep, t.rows, sc.p, 1, t.ldt, sc.q, ep, sc.dk, ep, true);       // dK += dS^T Q
        gemm(t.rows, ep, t.cols, sc.p, t.ldt, 1, sc.kr, ep,
             dq + (g * a.q_len + t.row0) * ep, ep, true);                          // dQ += dS K
      }
    }
    float* dk = a.dk + ((b * a.kv_heads + hk) * a.kv_len + t.col0) * E;
    float* dv = a.dv + ((b * a.kv_heads + hk) * a.kv_len + t.col0) * Ev;
    for (long c = 0; c < t.cols; ++c) {
      for (long d = 0; d < E; ++d) dk[c * E + d] = sc.dk[c * ep + d];
      for (long d = 0; d < Ev; ++d) dv[c * Ev + d] = sc.dv[c * evp + d];
    }
  }
}

// Packs every key/value tile, then runs the forward items in `order`.
static void run_forward(ffi::ThreadPool& pool, const Attention& a, long threads,
                        const std::vector<long>& order) {
  const long tiles = a.batch * a.kv_heads * a.n_key_blocks();
  Floats own;
  float* base = thread_buffer(1, tiles * packed_tile_floats(a), own);
  parallel_for(pool, tiles, threads, [&] { return [&](long t) { pack_tile(a, t, base); }; });
  auto item = [&](long i, float* s) { forward_item(a, base, order[i], s); };
  parallel_for(pool, long(order.size()), threads, with_scratch(scratch_floats(a), item));
}

// Runs the backward items, `chunks` per (batch, key/value head), then sums each query row's dQ
// partials.
static void run_backward(ffi::ThreadPool& pool, const Attention& a, long threads, long chunks) {
  const long ep = round_up(a.head_dim), slab = a.groups() * a.q_len * ep;
  const long items = a.batch * a.kv_heads * chunks;
  Floats own;
  float* base = thread_buffer(1, items * slab, own);
  auto item = [&](long i, float* s) { backward_item(a, i, chunks, base + i * slab, s); };
  parallel_for(pool, items, threads, with_scratch(scratch_floats(a), item));
  const long E = a.head_dim, rows = a.batch * a.q_heads, nq = a.n_query_blocks();
  auto sum_dq = [&](long x) {
    const long row = x / nq, r0 = x % nq * a.block_q, r1 = std::min(r0 + a.block_q, a.q_len);
    const float* in = base + (row / a.groups() * chunks * a.groups() + row % a.groups()) *
                                 a.q_len * ep;  // chunk 0 of this query head
    float* out = a.dq + row * a.q_len * E;
    for (long r = r0; r < r1; ++r)
      for (long d = 0; d < E; ++d) {
        float sum = 0.f;
        for (long c = 0; c < chunks; ++c) sum += in[c * slab + r * ep + d];
        out[r * E + d] = sum * a.scale;
      }
  };
  parallel_for(pool, rows * nq, threads, [&] { return sum_dq; });
}
