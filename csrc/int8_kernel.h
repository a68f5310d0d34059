// The int8 matmul's tiles for one instruction set. int8_matmul.cc includes this file once per
// ISA, inside a struct that defines `VW` (32-bit lanes per vector), `MR` (rows per tile), the
// vectors `vf` (float) and `vi` (int32), `sext(p)` (VW int8 at p sign-extended to int32),
// `to_float(v)` (int32 to float lanes) and, for the
// integer tile, the byte vector `Bytes` with `load_bytes(p)`,
// `unpack8(a, b, hi)` and `unpack16(a, b, hi)` (the ISA's per-128-bit-lane unpacks), `dot(acc,
// x4, q)` (acc plus the 4 products of each column with the activation bytes x4) and `Colsum`
// (what `dot` leaves to subtract at the end of a pass), under a matching `#pragma GCC target`;
// it includes nothing.
//
// A tile is MR rows of one panel (4 vectors of columns) over the weight rows [k0, k1): partial
// sums are read from y unless k0 = 0 and written back, finished (f32: scaled; s8: in column
// order) when k1 = K; int4 tiles scale each pass by its group's scales before adding it.

typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi_u __attribute__((vector_size(VW * 4), aligned(4)));

static constexpr long PANEL = 4 * VW;

template <int R>
static void f32_tile(const Gemv& g, long r, long c, long k0, long k1) {
  float* y = static_cast<float*>(g.y) + r * g.n + c;
  vf acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v)
      acc[i][v] = k0 == 0 ? vf{} : *reinterpret_cast<const vf_u*>(y + i * g.n + VW * v);
  const float* x = static_cast<const float*>(g.x) + r * g.k;
  const int8_t* wp = g.w + k0 * g.n + c;
  for (long k = k0; k < k1; ++k, wp += g.n) {
    __builtin_prefetch(wp + PREFETCH_BYTES);
    vf wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = to_float(sext(wp + VW * v));
    for (int i = 0; i < R; ++i) {
      const vf xb = x[i * g.k + k] - vf{};  // a splat
      for (int v = 0; v < 4; ++v) acc[i][v] += xb * wv[v];  // contracted to FMA
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) {
      vf out = acc[i][v];
      if (k1 == g.k) out *= *reinterpret_cast<const vf_u*>(g.scale + c + VW * v);
      *reinterpret_cast<vf_u*>(y + i * g.n + VW * v) = out;
    }
}

// Weight rows k0..k0+3 of the panel at column c (rows past K read as 0) as q[v]: 4-byte groups,
// one byte per row, of the columns column_of(v, lane).
static void interleave(const Gemv& g, long k0, long c, vi q[4]) {
  Bytes rows[4];
  for (int j = 0; j < 4; ++j)
    rows[j] = k0 + j < g.k ? load_bytes(g.w + (k0 + j) * g.n + c) : Bytes{};
  const Bytes lo01 = unpack8(rows[0], rows[1], false), hi01 = unpack8(rows[0], rows[1], true);
  const Bytes lo23 = unpack8(rows[2], rows[3], false), hi23 = unpack8(rows[2], rows[3], true);
  q[0] = unpack16(lo01, lo23, false);
  q[1] = unpack16(lo01, lo23, true);
  q[2] = unpack16(hi01, hi23, false);
  q[3] = unpack16(hi01, hi23, true);
}

template <int R>
static void s8_tile(const Gemv& g, long r, long c, long k0, long k1) {
  int32_t* y = static_cast<int32_t*>(g.y) + r * g.n + c;
  vi acc[R][4];
  for (int i = 0; i < R; ++i)  // between passes y holds the sums in interleaved order
    for (int v = 0; v < 4; ++v)
      acc[i][v] = k0 == 0 ? vi{} : *reinterpret_cast<const vi_u*>(y + i * g.n + VW * v);
  Colsum colsum;
  for (long k = k0; k < k1; k += 4) {
    for (int j = 0; j < 4; ++j) __builtin_prefetch(g.w + (k + j) * g.n + c + PREFETCH_BYTES);
    vi q[4];
    interleave(g, k, c, q);
    colsum.add(q);
    for (int i = 0; i < R; ++i) {
      const int32_t x4 = x_quad(g, r + i, k);
      for (int v = 0; v < 4; ++v) acc[i][v] = dot(acc[i][v], x4, q[v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) {
      const vi sum = colsum.finish(acc[i][v], v);
      if (k1 < g.k) {
        *reinterpret_cast<vi_u*>(y + i * g.n + VW * v) = sum;
        continue;
      }
      for (int e = 0; e < VW; ++e) y[i * g.n + column_of(v, e)] = sum[e];
    }
}

// Packed int4 weight rows [k0, k1) (one scale group, `scale` its row of N scales): byte row j of
// g.w holds weight row 2j in its low nibble and 2j + 1 in its high one; each byte is
// sign-extended to int32 and its nibbles sign-extended by shifts, in registers. An odd k0 or k1
// (a group boundary inside a byte) takes one nibble of the first or last byte.
template <int R>
static void int4_tile(const Gemv& g, long r, long c, long k0, long k1, const float* scale) {
  float* y = static_cast<float*>(g.y) + r * g.n + c;
  const float* x = static_cast<const float*>(g.x) + r * g.k;
  vf acc[R][4] = {};
  auto rows = [&](long k, bool lo, bool hi) {  // weight rows 2 * (k / 2) and + 1 as asked
    const int8_t* wp = g.w + (k >> 1) * g.n + c;
    __builtin_prefetch(wp + PREFETCH_BYTES);
    vi b[4];
    for (int v = 0; v < 4; ++v) b[v] = sext(wp + VW * v);
    for (int i = 0; i < R; ++i) {
      const float* xi = x + i * g.k + (k & ~1L);
      for (int v = 0; v < 4; ++v) {
        if (lo) acc[i][v] += (xi[0] - vf{}) * to_float((b[v] << 28) >> 28);
        if (hi) acc[i][v] += (xi[1] - vf{}) * to_float(b[v] >> 4);
      }
    }
  };
  long k = k0;
  if (k & 1) rows(k++, false, true);
  for (; k + 1 < k1; k += 2) rows(k, true, true);
  if (k < k1) rows(k, true, false);
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) {
      vf out = acc[i][v] * *reinterpret_cast<const vf_u*>(scale + c + VW * v);
      if (k0 > 0) out += *reinterpret_cast<const vf_u*>(y + i * g.n + VW * v);
      *reinterpret_cast<vf_u*>(y + i * g.n + VW * v) = out;
    }
}
