// bfloat16 CPU kernels for the engine's decode step (AVX512-BF16), built by engine/cpu_kernels.py.
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

// transformers' LlamaRMSNorm in bf16: h = bf16(residual + delta); out = bf16(w * bf16(h * rsqrt(mean(h^2) + eps)))
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
    for (int64_t r = r0; r < r1; ++r) {
      bf16* h = rp + r * hidden;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < hidden; i += 16) {
        __m512 v = load_bf16(h + i);
        if (dp != nullptr) {
          v = round_bf16(_mm512_add_ps(v, load_bf16(dp + r * hidden + i)));
          store_bf16(h + i, v);
        }
        sum = _mm512_fmadd_ps(v, v, sum);
      }
      const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(hidden);
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(mean + static_cast<float>(eps)));
      for (int64_t i = 0; i < hidden; i += 16) {
        const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(h + i), inv));
        store_bf16(op + r * hidden + i, _mm512_mul_ps(load_bf16(wp + i), normed));
      }
    }
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
      const __m512 gate = load_bf16(g), up = load_bf16(g + inter);
      const __m512 silu = round_bf16(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gate)))));
      store_bf16(op + r * inter + i, _mm512_mul_ps(silu, up));
    }
  });
  return out;
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
        bf16* x = row + h * dim;
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
      const int64_t b = u / kv_heads, g = u % kv_heads, len = pos[b] + 1;
      const bf16* keys = mp + b * ms1 + g * ms2;
      const bf16* values = keys + ms0;
      scores.resize(group * len);
      for (int64_t qi = 0; qi < group; ++qi) {
        __m512bh q[8];
        const bf16* qrow = qp + b * width + (g * group + qi) * dim;
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
        bf16* orow = op + b * heads * dim + (g * group + qi) * dim;
        for (int64_t c = 0; c < chunks; ++c) store_bf16(orow + c * 16, acc[c]);
      }
    }
  });
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
}
