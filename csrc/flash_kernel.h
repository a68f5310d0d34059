// Flash attention on the CPU for one instruction set. This file is included once per ISA by
// flash_attention.cc, inside a namespace that defines `VW` (floats per vector), `MR` (rows) and
// `NR` (vectors of columns) of the GEMM micro-kernel under a matching `#pragma GCC target`; it includes nothing itself.
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
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
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

// exp(x) for f32 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, a degree-6 Taylor
// polynomial (max relative error ~2e-7). Exactly 0 below -87.3 (so exp(-inf) = 0), NaN in, NaN out.
static inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.3f);
  vi underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * splat(1.44269504089f) + magic) - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.f / 720.f);
  p = p * r + splat(1.f / 120.f);
  p = p * r + splat(1.f / 24.f);
  p = p * r + splat(1.f / 6.f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf result = p * (vf)bits;
  return underflow ? splat(0.f) : result;
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

template <int NV>
static void gemm_panels(long M, long n0, long n1, long K, const float* A, long a_rs, long a_cs,
                        const float* B, long ldb, float* C, long ldc, bool accumulate) {
  for (; n0 + NV * VW <= n1; n0 += NV * VW)
    for (long m0 = 0; m0 < M; m0 += MR)
      micro_rows<NV>(M - m0 < MR ? M - m0 : MR, K, A + m0 * a_rs, a_rs, a_cs, B + n0, ldb,
                     C + m0 * ldc + n0, ldc, accumulate);
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

// Copies rows x cols of src (row stride lds) into dst (row stride ldd), scaled, zero-padded to
// ldd columns.
static void pack_rows(const float* src, long lds, long rows, long cols, float scale, float* dst,
                      long ldd) {
  for (long r = 0; r < rows; ++r) {
    for (long c = 0; c < cols; ++c) dst[r * ldd + c] = src[r * lds + c] * scale;
    for (long c = cols; c < ldd; ++c) dst[r * ldd + c] = 0.f;
  }
}

// dst[d][c] = src[c][d] for c < cols, d < depth; zero-padded to ldd columns and `depth_p` rows.
static void pack_transposed(const float* src, long lds, long cols, long depth, long depth_p,
                            float* dst, long ldd) {
  for (long d = 0; d < depth_p; ++d)
    for (long c = 0; c < ldd; ++c) dst[d * ldd + c] = 0.f;
  for (long c = 0; c < cols; ++c)
    for (long d = 0; d < depth; ++d) dst[d * ldd + c] = src[c * lds + d];
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
         bk * evp + bk + 16 * VW;
}

static Scratch carve(const Attention& a, float* base) {
  long ep = round_up(a.head_dim), evp = round_up(a.v_head_dim), bq = a.block_q, bk = round_up(a.block_k);
  Scratch s;
  float* p = base;
  auto take = [&](long n) { float* r = p; p += (n + VW - 1) / VW * VW; return r; };
  s.q = take(bq * ep); s.s = take(bq * bk); s.p = take(bq * bk); s.keep = take(bq * bk);
  s.o = take(bq * evp); s.kt = take(ep * bk); s.vt = take(evp * bk); s.kr = take(bk * ep);
  s.dk = take(bk * ep); s.dv = take(bk * evp);
  return s;
}

// The forward's key/value tiles are packed once per call: tile j of head (b, hk) holds K^T
// (ep x ldk) then V (block_k x evp), zero-padded.
static long packed_tile_floats(const Attention& a) {
  return round_up(a.head_dim) * round_up(a.block_k) + round_up(a.block_k) * round_up(a.v_head_dim);
}

static void pack_tile(const Attention& a, long tile, float* packed) {
  const long nk = a.n_key_blocks(), head = tile / nk, j = tile % nk;
  const long E = a.head_dim, Ev = a.v_head_dim, col0 = j * a.block_k;
  const long cols = a.kv_len - col0 < a.block_k ? a.kv_len - col0 : a.block_k;
  float* kt = packed + tile * packed_tile_floats(a);
  pack_transposed(a.k + (head * a.kv_len + col0) * E, E, cols, E, round_up(E), kt,
                  round_up(a.block_k));
  pack_rows(a.v + (head * a.kv_len + col0) * Ev, Ev, cols, Ev, 1.f,
            kt + round_up(E) * round_up(a.block_k), round_up(Ev));
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
  float row_max[512], total[512];
  for (long r = 0; r < t.rows; ++r) { row_max[r] = -inf; total[r] = 0.f; }
  for (long x = 0; x < t.rows * evp; ++x) sc.o[x] = 0.f;
  for (long j = qb.lo_min / a.block_k; j * a.block_k < qb.hi_max; ++j) {
    const long skip = std::max(0L, qb.lo_min - j * a.block_k) / VW * VW;  // keys no row sees
    t.col0 = j * a.block_k + skip;
    t.cols = std::min((j + 1) * a.block_k, qb.hi_max) - t.col0;
    t.ldt = round_up(t.cols);
    const TileClass cls = classify(a, qb, b, j, t);
    if (cls == EMPTY) continue;
    const float* kt = packed + ((b * a.kv_heads + hk) * nk + j) * packed_tile_floats(a);
    const float* vt = kt + ep * ldk + skip * evp;
    gemm(t.rows, t.ldt, ep, sc.q, ep, 1, kt + skip, ldk, sc.s, t.ldt, false);
    for (long r = 0; r < t.rows; ++r) {
      float* s = sc.s + r * t.ldt;
      if (cls == PARTIAL) mask_row(a, b, h, t.row0 + r, t, s);
      vf m = splat(-inf);
      for (long c = 0; c < t.ldt; c += VW) m = vmax(m, load(s + c));
      float new_max = hmax(m);
      new_max = new_max > row_max[r] ? new_max : row_max[r];
      const float safe = new_max == -inf ? 0.f : new_max;
      const vf shift = splat(safe);
      vf sum = splat(0.f);
      for (long c = 0; c < t.ldt; c += VW) {
        vf e = vexp(load(s + c) - shift);
        sum += e;
        store(s + c, e);
      }
      const float correction = row_max[r] == -inf ? 0.f : __builtin_expf(row_max[r] - safe);
      total[r] = total[r] * correction + hsum(sum);
      row_max[r] = new_max;
      if (a.dropout) {
        keep_row(a, b, h, t.row0 + r, t.col0, t.ldt, sc.keep);
        for (long c = 0; c < t.ldt; c += VW) store(s + c, load(s + c) * load(sc.keep + c));
      }
      if (correction != 1.f) {
        const vf corr = splat(correction);
        for (long c = 0; c < evp; c += VW) store(sc.o + r * evp + c, load(sc.o + r * evp + c) * corr);
      }
    }
    gemm(t.rows, evp, t.cols, sc.s, t.ldt, 1, vt, evp, sc.o, evp, true);
  }
  float* out = a.out + ((b * a.q_heads + h) * a.q_len + t.row0) * Ev;
  float* lse = a.lse + (b * a.q_heads + h) * a.q_len + t.row0;
  for (long r = 0; r < t.rows; ++r) {
    const bool seen = total[r] > 0.f;
    const float inv = seen ? a.inv_keep / total[r] : 0.f;
    for (long c = 0; c < Ev; ++c) out[r * Ev + c] = sc.o[r * evp + c] * inv;
    lse[r] = seen ? (row_max[r] == -inf ? 0.f : row_max[r]) + __builtin_logf(total[r]) : -inf;
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
    pack_transposed(k + t.col0 * E, E, t.cols, E, ep, sc.kt, t.ldt);
    pack_transposed(v + t.col0 * Ev, Ev, t.cols, Ev, evp, sc.vt, t.ldt);
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
        gemm(t.rows, t.ldt, ep, sc.q, ep, 1, sc.kt, t.ldt, sc.s, t.ldt, false);   // scores
        gemm(t.rows, t.ldt, evp, sc.o, evp, 1, sc.vt, t.ldt, sc.p, t.ldt, false);  // dP
        for (long r = 0; r < t.rows; ++r) {
          float* s = sc.s + r * t.ldt;
          float* dp = sc.p + r * t.ldt;
          if (cls == PARTIAL) mask_row(a, b, h, t.row0 + r, t, s);
          const vf lse = splat(a.lse[head + t.row0 + r]), delta = splat(a.delta[head + t.row0 + r]);
          if (a.dropout) keep_row(a, b, h, t.row0 + r, t.col0, t.ldt, sc.keep + r * t.ldt);
          for (long c = 0; c < t.ldt; c += VW) {
            vf p = vexp(load(s + c) - lse);
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
  std::unique_ptr<float[]> packed(new float[tiles * packed_tile_floats(a)]);
  float* base = packed.get();
  parallel_for(pool, tiles, threads, 0, [&](long t, float*) { pack_tile(a, t, base); });
  parallel_for(pool, long(order.size()), threads, scratch_floats(a),
               [&](long i, float* s) { forward_item(a, base, order[i], s); });
}

// Runs the backward items, `chunks` per (batch, key/value head), then sums each query row's dQ
// partials.
static void run_backward(ffi::ThreadPool& pool, const Attention& a, long threads, long chunks) {
  const long ep = round_up(a.head_dim), slab = a.groups() * a.q_len * ep;
  const long items = a.batch * a.kv_heads * chunks;
  std::unique_ptr<float[]> partial(new float[items * slab]);
  float* base = partial.get();
  parallel_for(pool, items, threads, scratch_floats(a),
               [&](long i, float* s) { backward_item(a, i, chunks, base + i * slab, s); });
  const long E = a.head_dim, rows = a.batch * a.q_heads, nq = a.n_query_blocks();
  parallel_for(pool, rows * nq, threads, 0, [&](long x, float*) {
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
  });
}
