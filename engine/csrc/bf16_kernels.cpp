// bfloat16 CPU kernels for the engine's decode step (AVX512-BF16), built by engine/cpu_linear.py.
//
// Why hand-written: at batch 1-8 a decode step is ~210 small GEMVs and ~1,300 small torch ops. From
// Python a 1536x576 bf16 GEMV through torch (oneDNN/MKL) runs at ~15 GB/s here, against the ~46 GB/s
// the weights stream at, and each of the small ops (norm, RoPE, KV append, SiLU) costs its dispatch.
// These kernels read weights packed for `vdpbf16ps` (16 outputs x 2 inputs per 64-byte load, fp32
// accumulation), fuse the elementwise work of a layer into three calls, and run decode attention
// straight on the DecodeMirror's contiguous K/V rows. Threads: at::parallel_for (torch's own OpenMP
// pool, so torch.set_num_threads applies). The numerics follow transformers' bf16 forward op for op
// (each torch op's rounding to bf16 is reproduced), except the reductions' summation order.
//
// Compiled with -mavx512f -mavx512bf16 -mavx512bw -mavx512vl: Python loads it only on a CPU that
// reports avx512_bf16 (engine/cpu_kernels.py), and falls back to the torch path everywhere else.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;

// Elementwise kernels stay on one thread below this many rows: a parallel region costs more than the
// work there, and on a loaded machine a region can wait for a descheduled thread.
constexpr int64_t kSerialRows = 64;


// ---------------------------------------------------------------------------------------------
// GEMM  y[M, N] = x[M, K] @ W[N, K]^T, W packed as [N/16][K/2][16][2] (see pack_weight in Python).

template <int MR, int NB>
inline void gemm_micro(const uint32_t* const* xrows, const uint32_t* w, int64_t kp, int64_t bstride,
                       bf16* const* yrows, int64_t n0, int64_t n_valid) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * bstride + p * 16);
    for (int i = 0; i < MR; ++i) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xrows[i][p]));
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xb);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NB; ++j) {
      int64_t col = n0 + j * 16;
      int64_t left = n_valid - j * 16;
      if (left <= 0) break;
      __m256i packed = (__m256i)_mm512_cvtneps_pbh(acc[i][j]);
      __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
      _mm256_mask_storeu_epi16(yrows[i] + col, mask, packed);
    }
  }
}

template <int MR>
void gemm_rows(const uint32_t* const* xrows, const uint32_t* w, int64_t kp, int64_t bstride,
               bf16* const* yrows, int64_t block0, int64_t nblocks, int64_t n_total, int nb_tile) {
  int64_t b = block0;
  const int64_t end = block0 + nblocks;
  auto valid = [&](int64_t blk, int count) { return std::min<int64_t>(count * 16, n_total - blk * 16); };
  if (nb_tile == 8) {
    for (; b + 8 <= end; b += 8)
      gemm_micro<MR, 8>(xrows, w + b * bstride, kp, bstride, yrows, b * 16, valid(b, 8));
  }
  for (; b + 4 <= end; b += 4)
    gemm_micro<MR, 4>(xrows, w + b * bstride, kp, bstride, yrows, b * 16, valid(b, 4));
  for (; b < end; ++b) gemm_micro<MR, 1>(xrows, w + b * bstride, kp, bstride, yrows, b * 16, valid(b, 1));
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: [M, K] bf16 rows");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.is_contiguous(), "packed [N/16, K/2, 32]");
  const int64_t m = x.size(0), k = x.size(1), kp = packed.size(1);
  TORCH_CHECK(k == 2 * kp && x.stride(0) % 2 == 0, "K must be even and match the packed weight");
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t nblocks = packed.size(0), bstride = kp * 16;  // in uint32 (pairs)
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<bf16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<bf16>());
  bf16* yp = y.data_ptr<bf16>();
  const int64_t ldx = x.stride(0) / 2;
  const int nb_tile = m == 1 ? 8 : 4;
  const int64_t tiles = (nblocks + nb_tile - 1) / nb_tile;
  // Each tile of weight blocks is read once from memory; the row groups then reuse it from cache.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t b0 = tile * nb_tile, b1 = std::min(nblocks, b0 + nb_tile);
      for (int64_t r = 0; r < m; r += 4) {
        const uint32_t* xr[4];
        bf16* yr[4];
        const int rows = static_cast<int>(std::min<int64_t>(4, m - r));
        for (int i = 0; i < rows; ++i) {
          xr[i] = xp + (r + i) * ldx;
          yr[i] = yp + (r + i) * n;
        }
        switch (rows) {
          case 4: gemm_rows<4>(xr, wp, kp, bstride, yr, b0, b1 - b0, n, nb_tile); break;
          case 3: gemm_rows<3>(xr, wp, kp, bstride, yr, b0, b1 - b0, n, nb_tile); break;
          case 2: gemm_rows<2>(xr, wp, kp, bstride, yr, b0, b1 - b0, n, nb_tile); break;
          default: gemm_rows<1>(xr, wp, kp, bstride, yr, b0, b1 - b0, n, nb_tile); break;
        }
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Elementwise: residual add + RMSNorm, SiLU(gate) * up, RoPE + KV store.

inline __m512 load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }
inline void store_bf16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

// transformers' LlamaRMSNorm in bf16 on one row: h = bf16(residual + delta) (when delta is given, written
// back to h); out = bf16(w * bf16(h * rsqrt(mean(h^2) + eps)))
inline void add_rmsnorm_row(bf16* h, const bf16* delta, const bf16* w, bf16* out, int64_t hidden, float eps) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += 16) {
    __m512 v = load_bf16(h + i);
    if (delta != nullptr) {
      v = round_bf16(_mm512_add_ps(v, load_bf16(delta + i)));
      store_bf16(h + i, v);
    }
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(hidden);
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(mean + eps));
  for (int64_t i = 0; i < hidden; i += 16) {
    const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(h + i), inv));
    store_bf16(out + i, _mm512_mul_ps(load_bf16(w + i), normed));
  }
}

at::Tensor add_rmsnorm(const at::Tensor& residual, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                       double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.scalar_type() == at::kBFloat16, "residual: contiguous bf16");
  const int64_t hidden = residual.size(-1), rows = residual.numel() / hidden;
  TORCH_CHECK(hidden % 16 == 0 && weight.is_contiguous(), "hidden size a multiple of 16");
  at::Tensor out = at::empty_like(residual);
  bf16* rp = residual.data_ptr<bf16>();
  const bf16* dp = nullptr;
  if (delta.has_value()) {
    TORCH_CHECK(delta->is_contiguous() && delta->sizes() == residual.sizes(), "delta like residual");
    dp = delta->data_ptr<bf16>();
  }
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, rows, kSerialRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      add_rmsnorm_row(rp + r * hidden, dp == nullptr ? nullptr : dp + r * hidden, wp, op + r * hidden, hidden,
                      static_cast<float>(eps));
  });
  return out;
}

inline __m512 exp512(__m512 x) {  // e^x, |rel err| < 2e-7 over the clamped range
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 values: out = bf16(bf16(silu(gate)) * up)
inline void silu_mul16(const bf16* g, const bf16* u, bf16* out) {
  const __m512 gate = load_bf16(g), up = load_bf16(u);
  const __m512 silu = round_bf16(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gate)))));
  store_bf16(out, _mm512_mul_ps(silu, up));
}

// gate_up [M, 2I] (gate | up) -> bf16(bf16(silu(gate)) * up)  [M, I]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.scalar_type() == at::kBFloat16, "gate_up: contiguous bf16");
  const int64_t inter = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * inter);
  TORCH_CHECK(inter % 16 == 0, "intermediate size must be a multiple of 16");
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  const bf16* gp = gate_up.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, rows * (inter / 16), 1024, [&](int64_t c0, int64_t c1) {  // serial below 16K values
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r = c / (inter / 16), i = (c % (inter / 16)) * 16;
      const bf16* g = gp + r * 2 * inter + i;
      silu_mul16(g, g + inter, op + r * inter + i);
    }
  });
  return out;
}

// transformers' rotate_half RoPE on one head in place, each product and the sum rounded to bf16
inline void rope_head(bf16* x, const bf16* c, const bf16* s, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {  // head_dim % 32 == 0 (checked in Python)
    const __m512 x1 = load_bf16(x + i), x2 = load_bf16(x + half + i);
    const __m512 neg_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
    const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, load_bf16(c + i))),
                                    round_bf16(_mm512_mul_ps(neg_x2, load_bf16(s + i))));
    const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, load_bf16(c + half + i))),
                                    round_bf16(_mm512_mul_ps(x1, load_bf16(s + half + i))));
    store_bf16(x + i, lo);
    store_bf16(x + half + i, hi);
  }
}

// In place on qkv [T, (heads + 2 kv_heads) * D]: RoPE on the q and k heads (transformers' rotate_half,
// each product and the sum rounded to bf16), then K and V of every token written to its pool slot
// (layer_cache [blocks, 2, block_size, kv_heads, D], any strides with D contiguous) and, for the first
// `mirror_rows` tokens, to mirror [2, rows, kv_heads, capacity, D] at position positions[t].
void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                int64_t heads, int64_t kv_heads, const at::Tensor& layer_cache, const at::Tensor& slot_blocks,
                const at::Tensor& slot_offsets, const at::Tensor& mirror, int64_t mirror_rows) {
  const int64_t tokens = qkv.size(0), dim = cos.size(-1), half = dim / 2;
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv [T, (H + 2 KV) * D]");
  TORCH_CHECK(dim % 32 == 0, "head_dim a multiple of 32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kBFloat16, "cos/sin tables");
  TORCH_CHECK(layer_cache.stride(-1) == 1 && (mirror_rows == 0 || mirror.stride(-1) == 1), "D contiguous");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* blocks = slot_blocks.data_ptr<int64_t>();
  const int64_t* offsets = slot_offsets.data_ptr<int64_t>();
  bf16* base = qkv.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  bf16* cache = layer_cache.data_ptr<bf16>();
  const int64_t cs0 = layer_cache.stride(0), cs1 = layer_cache.stride(1), cs2 = layer_cache.stride(2),
                cs3 = layer_cache.stride(3);
  bf16* mp = mirror_rows > 0 ? mirror.data_ptr<bf16>() : nullptr;
  const int64_t ms0 = mirror_rows > 0 ? mirror.stride(0) : 0, ms1 = mirror_rows > 0 ? mirror.stride(1) : 0,
                ms2 = mirror_rows > 0 ? mirror.stride(2) : 0, ms3 = mirror_rows > 0 ? mirror.stride(3) : 0;
  const int64_t width = qkv.size(1);
  at::parallel_for(0, tokens, kSerialRows, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      bf16* row = base + t * width;
      const bf16* c = cp + pos[t] * dim;
      const bf16* s = sp + pos[t] * dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        rope_head(row + h * dim, c, s, half);
      }
      const bf16* key = row + heads * dim;
      const bf16* value = key + kv_heads * dim;
      for (int64_t g = 0; g < kv_heads; ++g) {
        bf16* slot = cache + blocks[t] * cs0 + offsets[t] * cs2 + g * cs3;
        std::memcpy(slot, key + g * dim, dim * sizeof(bf16));
        std::memcpy(slot + cs1, value + g * dim, dim * sizeof(bf16));
        if (t < mirror_rows) {
          bf16* m = mp + t * ms1 + g * ms2 + pos[t] * ms3;
          std::memcpy(m, key + g * dim, dim * sizeof(bf16));
          std::memcpy(m + ms0, value + g * dim, dim * sizeof(bf16));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decode attention over the mirror: query rows t < B of qkv (heads * D at the row's start), keys and
// values mirror[0/1, t, g, :positions[t] + 1, :]; a KV head's `group` query heads share its rows.
// Scores and softmax in float32, output rounded to bf16 once: [B, heads * D].

inline float dot64(const bf16* a, const __m512bh* q, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), q[d / 32]);
  return _mm512_reduce_add_ps(acc);
}

// One KV head's `group` query heads (query: their group * D values) over keys/values [len, D] (float32
// scores and softmax, the output rounded to bf16 once) -> out (group * D values).
inline void attend_group(const bf16* query, const bf16* keys, const bf16* values, int64_t len, int64_t group,
                         int64_t dim, float fscale, bf16* out, std::vector<float>& scores) {
  scores.resize(group * len);
  for (int64_t qi = 0; qi < group; ++qi) {
    __m512bh q[8];
    const bf16* qrow = query + qi * dim;
    for (int64_t d = 0; d < dim; d += 32) q[d / 32] = (__m512bh)_mm512_loadu_si512(qrow + d);
    float* srow = scores.data() + qi * len;
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) {
      srow[t] = dot64(keys + t * dim, q, dim) * fscale;
      mx = std::max(mx, srow[t]);
    }
    __m512 sum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(srow + t), _mm512_set1_ps(mx)));
      _mm512_storeu_ps(srow + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (; t < len; ++t) {
      srow[t] = std::exp(srow[t] - mx);
      total += srow[t];
    }
    const float inv = 1.f / total;
    for (t = 0; t < len; ++t) srow[t] *= inv;
  }
  for (int64_t qi = 0; qi < group; ++qi) {
    __m512 acc[16];
    const int64_t chunks = dim / 16;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    const float* srow = scores.data() + qi * len;
    for (int64_t t = 0; t < len; ++t) {
      const __m512 p = _mm512_set1_ps(srow[t]);
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, load_bf16(values + t * dim + c * 16), acc[c]);
    }
    bf16* orow = out + qi * dim;
    for (int64_t c = 0; c < chunks; ++c) store_bf16(orow + c * 16, acc[c]);
  }
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& mirror, const at::Tensor& positions,
                            int64_t heads, int64_t kv_heads, double scale) {
  const int64_t batch = positions.size(0), dim = mirror.size(-1), group = heads / kv_heads;
  TORCH_CHECK(dim % 32 == 0 && dim <= 256 && group <= 16, "head_dim a multiple of 32 (<= 256), group <= 16");
  TORCH_CHECK(mirror.stride(-1) == 1 && mirror.stride(-2) == dim, "mirror rows [capacity, D] contiguous");
  at::Tensor out = at::empty({batch, heads * dim}, qkv.options());
  const bf16* qp = qkv.data_ptr<bf16>();
  const bf16* mp = mirror.data_ptr<bf16>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t width = qkv.stride(0), ms0 = mirror.stride(0), ms1 = mirror.stride(1), ms2 = mirror.stride(2);
  bf16* op = out.data_ptr<bf16>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, batch * kv_heads, 4, [&](int64_t u0, int64_t u1) {  // batch 1: serial
    std::vector<float> scores;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / kv_heads, g = u % kv_heads;
      const bf16* keys = mp + b * ms1 + g * ms2;
      attend_group(qp + b * width + g * group * dim, keys, keys + ms0, pos[b] + 1, group, dim, fscale,
                   op + b * heads * dim + g * group * dim, scores);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The whole decoder stack of a decode step of up to 4 tokens, all on the mirror, in one call and one
// parallel region. Why: at batch 1 the weights stream in ~10 ms on two cores, while ~270 separate
// calls from Python (9 per layer) cost their dispatch and a fork/join each, and the serial ones leave
// the second core idle. Each GEMV's output blocks are split across the threads; the threads meet at a
// barrier where a product is complete (4 per layer); the norms and residual adds (576 values per
// row) run on every thread, each on its own copy, so they need no barrier. The arithmetic is the
// separate kernels' op for op (the same helpers), so tokens and logits are those of the per-op path.

struct Block {  // one packed weight: [blocks][K/2][32]
  const uint32_t* w;
  int64_t kp, nblocks, n;
};

Block block_of(const at::Tensor& packed, int64_t n) {  // checked before the parallel region (no throw in it)
  return {reinterpret_cast<const uint32_t*>(packed.data_ptr<bf16>()), packed.size(1), packed.size(0), n};
}

// y[m, :] for output blocks [b0, b1) of W (x: m rows of K bf16, y: m rows of ldy bf16).
void gemv_range(const bf16* x, int64_t ldx, int m, const Block& w, bf16* y, int64_t ldy, int64_t b0, int64_t b1) {
  if (b1 <= b0) return;
  const uint32_t* xr[4];
  bf16* yr[4];
  for (int i = 0; i < m; ++i) {
    xr[i] = reinterpret_cast<const uint32_t*>(x + i * ldx);
    yr[i] = y + i * ldy;
  }
  const int64_t bstride = w.kp * 16;
  const int nb_tile = m == 1 ? 8 : 4;
  for (int64_t t0 = b0; t0 < b1; t0 += nb_tile) {  // the gemm's tiles: same outputs, same rounding
    const int64_t t1 = std::min(b1, t0 + nb_tile);
    switch (m) {
      case 4: gemm_rows<4>(xr, w.w, w.kp, bstride, yr, t0, t1 - t0, w.n, nb_tile); break;
      case 3: gemm_rows<3>(xr, w.w, w.kp, bstride, yr, t0, t1 - t0, w.n, nb_tile); break;
      case 2: gemm_rows<2>(xr, w.w, w.kp, bstride, yr, t0, t1 - t0, w.n, nb_tile); break;
      default: gemm_rows<1>(xr, w.w, w.kp, bstride, yr, t0, t1 - t0, w.n, nb_tile); break;
    }
  }
}

inline void split(int64_t n, int tid, int nth, int64_t& a, int64_t& b) {
  a = n * tid / nth;
  b = n * (tid + 1) / nth;
}

struct StepShape {
  int64_t m, hidden, inter, heads, kv_heads, dim, layers, qkv_n;
  float eps, scale;
};

struct StepBuffers {  // shared between the threads
  bf16 *qkv, *attn, *delta, *gate_up, *act;
};

struct StepCache {
  const bf16 *cos, *sin;
  const int64_t *pos, *blocks, *offsets;
  bf16* pool;  // [num_blocks, layers, 2, block_size, kv_heads, D]
  int64_t ps0, ps1, ps2, ps3, ps4;
  bf16* mirror;  // [layers, 2, rows, kv_heads, capacity, D]
  int64_t ms0, ms1, ms2, ms3, ms4;
};

// RoPE + K/V store + attention for (row b, KV head g) on layer l; reads and rotates qkv in place.
void attention_unit(const StepShape& sh, const StepCache& c, const StepBuffers& buf, int64_t l, int64_t b,
                    int64_t g, std::vector<float>& scores) {
  const int64_t dim = sh.dim, group = sh.heads / sh.kv_heads, pos = c.pos[b];
  bf16* row = buf.qkv + b * sh.qkv_n;
  const bf16* cs = c.cos + pos * dim;
  const bf16* sn = c.sin + pos * dim;
  for (int64_t h = g * group; h < (g + 1) * group; ++h) rope_head(row + h * dim, cs, sn, dim / 2);
  bf16* key = row + (sh.heads + g) * dim;
  rope_head(key, cs, sn, dim / 2);
  const bf16* value = row + (sh.heads + sh.kv_heads + g) * dim;
  bf16* slot = c.pool + c.blocks[b] * c.ps0 + l * c.ps1 + c.offsets[b] * c.ps3 + g * c.ps4;
  std::memcpy(slot, key, dim * sizeof(bf16));
  std::memcpy(slot + c.ps2, value, dim * sizeof(bf16));
  bf16* keys = c.mirror + l * c.ms0 + b * c.ms2 + g * c.ms3;
  std::memcpy(keys + pos * c.ms4, key, dim * sizeof(bf16));
  std::memcpy(keys + c.ms1 + pos * c.ms4, value, dim * sizeof(bf16));
  attend_group(row + g * group * dim, keys, keys + c.ms1, pos + 1, group, dim, sh.scale,
               buf.attn + b * sh.heads * dim + g * group * dim, scores);
}

// One thread's part of the step (inside the parallel region). res, x: this thread's residual rows and
// normed rows (m * hidden each).
void step_thread(const StepShape& sh, const std::vector<at::Tensor>& weights, const StepCache& c,
                 const StepBuffers& buf, bf16* res, bf16* x, int tid, int nth) {
  const int64_t m = sh.m, hid = sh.hidden, inter = sh.inter;
  const int mi = static_cast<int>(m);
  std::vector<float> scores;
  int64_t a, b;
  auto norm_rows = [&](const bf16* delta, const at::Tensor& w) {
    for (int64_t r = 0; r < m; ++r)
      add_rmsnorm_row(res + r * hid, delta == nullptr ? nullptr : delta + r * hid, w.data_ptr<bf16>(), x + r * hid,
                      hid, sh.eps);
  };
  norm_rows(nullptr, weights[0]);
  for (int64_t l = 0; l < sh.layers; ++l) {
    const at::Tensor* lw = weights.data() + l * 6;  // in_norm, qkv, o, post_norm, gate_up, down
    const Block qkv = block_of(lw[1], sh.qkv_n), o = block_of(lw[2], hid);
    const Block gate_up = block_of(lw[4], 2 * inter), down = block_of(lw[5], hid);
    split(qkv.nblocks, tid, nth, a, b);
    gemv_range(x, hid, mi, qkv, buf.qkv, sh.qkv_n, a, b);
#pragma omp barrier
    split(m * sh.kv_heads, tid, nth, a, b);
    for (int64_t u = a; u < b; ++u) attention_unit(sh, c, buf, l, u / sh.kv_heads, u % sh.kv_heads, scores);
#pragma omp barrier
    split(o.nblocks, tid, nth, a, b);
    gemv_range(buf.attn, sh.heads * sh.dim, mi, o, buf.delta, hid, a, b);
#pragma omp barrier
    norm_rows(buf.delta, lw[3]);
    split(gate_up.nblocks / 2, tid, nth, a, b);  // the gate blocks [a, b) and the up blocks beside them
    gemv_range(x, hid, mi, gate_up, buf.gate_up, 2 * inter, a, b);
    const int64_t up0 = gate_up.nblocks / 2;
    gemv_range(x, hid, mi, gate_up, buf.gate_up, 2 * inter, up0 + a, up0 + b);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = a * 16; i < b * 16; i += 16)
        silu_mul16(buf.gate_up + r * 2 * inter + i, buf.gate_up + r * 2 * inter + inter + i, buf.act + r * inter + i);
#pragma omp barrier
    split(down.nblocks, tid, nth, a, b);
    gemv_range(buf.act, inter, mi, down, buf.delta, hid, a, b);
#pragma omp barrier
    norm_rows(buf.delta, weights[(l + 1) * 6]);  // the next layer's input norm; after the last, the final norm
    // no barrier: delta is next written by the next layer's o GEMV, two barriers later
  }
}

// residual [M, H] (the embeddings; updated in place to the last residual), weights: per layer
// (input norm, qkv packed, o packed, post-attention norm, gate|up packed, down packed), then the final
// norm. Returns the final normed hidden [M, H]. K/V of every token go to the pool and the mirror.
at::Tensor decode_layers(const at::Tensor& residual, const std::vector<at::Tensor>& weights, int64_t qkv_n,
                         int64_t inter, int64_t heads, int64_t kv_heads, double eps, double scale,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                         const at::Tensor& kv_cache, const at::Tensor& slot_blocks, const at::Tensor& slot_offsets,
                         const at::Tensor& mirror) {
  const int64_t m = residual.size(0), hidden = residual.size(1), dim = cos.size(-1);
  const int64_t layers = (static_cast<int64_t>(weights.size()) - 1) / 6;
  TORCH_CHECK(m >= 1 && m <= 4 && residual.is_contiguous() && residual.scalar_type() == at::kBFloat16, "1-4 rows");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * 6 + 1 && hidden % 16 == 0 && inter % 16 == 0,
              "weights: 6 per layer + the final norm");
  TORCH_CHECK(dim % 32 == 0 && dim <= 256 && heads % kv_heads == 0 && heads / kv_heads <= 16, "head shape");
  TORCH_CHECK(qkv_n == (heads + 2 * kv_heads) * dim && cos.is_contiguous() && sin.is_contiguous(), "qkv width");
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.stride(5) == 1 && mirror.dim() == 6 && mirror.stride(5) == 1 &&
                  mirror.stride(4) == dim && mirror.size(2) >= m,
              "pool [blocks, layers, 2, block, kv, D], mirror [layers, 2, rows, kv, capacity, D]");
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t widths[4][2] = {{qkv_n, hidden}, {hidden, heads * dim}, {2 * inter, hidden}, {hidden, inter}};
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& packed = weights[l * 6 + (j < 2 ? 1 + j : 2 + j)];
      TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.is_contiguous() &&
                      packed.scalar_type() == at::kBFloat16 && packed.size(0) * 16 >= widths[j][0] &&
                      packed.size(1) * 2 == widths[j][1],
                  "packed weights [N/16, K/2, 32] of the layer's shapes");
    }
    for (int j : {0, 3}) TORCH_CHECK(weights[l * 6 + j].numel() == hidden, "norm weights [hidden]");
  }
  at::Tensor shared = at::empty({m * (qkv_n + heads * dim + hidden + 3 * inter)}, residual.options());
  at::Tensor out = at::empty_like(residual);
  bf16* sp = shared.data_ptr<bf16>();
  StepBuffers buf{sp, sp + m * qkv_n, sp + m * (qkv_n + heads * dim), nullptr, nullptr};
  buf.gate_up = buf.delta + m * hidden;
  buf.act = buf.gate_up + m * 2 * inter;
  const StepShape sh{m, hidden, inter, heads, kv_heads, dim, layers, qkv_n, static_cast<float>(eps),
                     static_cast<float>(scale)};
  StepCache c{cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), positions.data_ptr<int64_t>(),
              slot_blocks.data_ptr<int64_t>(), slot_offsets.data_ptr<int64_t>(), kv_cache.data_ptr<bf16>(),
              kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
              mirror.data_ptr<bf16>(), mirror.stride(0), mirror.stride(1), mirror.stride(2), mirror.stride(3),
              mirror.stride(4)};
  const int nth = static_cast<int>(std::max<int64_t>(1, at::get_num_threads()));
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    std::vector<bf16> own(2 * m * hidden);
    std::memcpy(own.data(), residual.data_ptr<bf16>(), m * hidden * sizeof(bf16));
    step_thread(sh, weights, c, buf, own.data(), own.data() + m * hidden, tid, team);
    if (tid == 0) {
      std::memcpy(residual.data_ptr<bf16>(), own.data(), m * hidden * sizeof(bf16));
      std::memcpy(out.data_ptr<bf16>(), own.data() + m * hidden, m * hidden * sizeof(bf16));
    }
  }
  return out;
}

}  // namespace

// Called as torch.ops.pdserve_cpu.* (a TORCH_LIBRARY, not pybind: the few ATen headers it needs
// compile in ~12 s of CPU, torch/extension.h in ~45 s).
TORCH_LIBRARY(pdserve_cpu, m) {
  m.def("gemm(Tensor x, Tensor packed, int n) -> Tensor", &gemm);
  m.def("add_rmsnorm(Tensor(a!) residual, Tensor? delta, Tensor weight, float eps) -> Tensor", &add_rmsnorm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def(
      "rope_store(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor positions, int heads, int kv_heads, "
      "Tensor(b!) layer_cache, Tensor slot_blocks, Tensor slot_offsets, Tensor(c!) mirror, int mirror_rows) -> ()",
      &rope_store);
  m.def("decode_attention(Tensor qkv, Tensor mirror, Tensor positions, int heads, int kv_heads, float scale) -> Tensor",
        &decode_attention);
  m.def(
      "decode_layers(Tensor(a!) residual, Tensor[] weights, int qkv_n, int inter, int heads, int kv_heads, "
      "float eps, float scale, Tensor cos, Tensor sin, Tensor positions, Tensor(b!) kv_cache, Tensor slot_blocks, "
      "Tensor slot_offsets, Tensor(c!) mirror) -> Tensor",
      &decode_layers);
}
