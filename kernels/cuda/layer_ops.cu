// The small per-layer steps between a Llama layer's GEMMs, each one pass over its rows:
// residual add + RMSNorm, rotary embedding + K/V store, SiLU(gate) * up. Launched one by one
// from torch they are 13 kernels a layer, most of them a few microseconds on a decode batch;
// here they are three. Each rounds to the element type where torch's ops would (after the
// residual add, the norm, the norm's weight, each rotary product, the SiLU), so a 16-bit
// build matches the torch reference (kernels/torch_ref.py) to float32 rounding of the sums.
#include "common.cuh"

// Rounded to the element type and back: where a torch op on 16-bit tensors stores its result.
__device__ __forceinline__ float rnd(float x) { return to_f32(from_f32(x)); }

#define NORM_THREADS 256
#define NORM_MAXV 8  // vectors a thread holds: hidden <= NORM_THREADS * NORM_MAXV * VEC

// h[t] += delta[t] (when has_delta), out[t] = weight * rnd(rnd(h[t]) * rsqrt(mean(h[t]^2) + eps)).
// grid (num_tokens); block NORM_THREADS. Rows contiguous, hidden a multiple of VEC.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
add_rms_norm(elem_t* __restrict__ h, const elem_t* __restrict__ delta, int has_delta,
             const elem_t* __restrict__ weight, elem_t* __restrict__ out, int hidden, float eps)
{
    __shared__ float partial[NORM_THREADS / 32];
    const i64 row = (i64)blockIdx.x * hidden;
    const int nvec = hidden / VEC;
    float x[NORM_MAXV][VEC];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_MAXV; ++k) {
        const int v = threadIdx.x + k * NORM_THREADS;
        if (v < nvec) {
            unpack(ld_rw(h + row + v * VEC), x[k]);
            if (has_delta) {
                float d[VEC];
                unpack(ld_vec(delta + row + v * VEC), d);
#pragma unroll
                for (int e = 0; e < VEC; ++e) x[k][e] = rnd(x[k][e] + d[e]);
                st_vec(h + row + v * VEC, pack(x[k]));
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss = fmaf(x[k][e], x[k][e], ss);
        }
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    ss = 0.f;
#pragma unroll
    for (int w = 0; w < NORM_THREADS / 32; ++w) ss += partial[w];
    const float rstd = rsqrtf(ss / (float)hidden + eps);
#pragma unroll
    for (int k = 0; k < NORM_MAXV; ++k) {
        const int v = threadIdx.x + k * NORM_THREADS;
        if (v < nvec) {
            float w[VEC];
            unpack(ld_vec(weight + v * VEC), w);
#pragma unroll
            for (int e = 0; e < VEC; ++e) x[k][e] = rnd(x[k][e] * rstd) * w[e];
            st_vec(out + row + v * VEC, pack(x[k]));
        }
    }
}

// Rotary embedding of token t's q and k heads (x * cos + rotate_half(x) * sin, the tables
// [max_pos, head_dim] float32 with the sine's first half negated, rounded to the element type
// first), q written to q_out [num_tokens, num_heads, head_dim], the rotated k and v to the
// token's page (pool[p_t, 0, :kv_dim], pool[p_t, 1, :kv_dim], as store_kv). With q_norm and
// k_norm (Qwen3; null: none) each q and k head is RMS-normed first, as torch_ref.head_rms_norm:
// rnd(w * rnd(x * rsqrt(mean(x^2) + eps))).
// grid (num_tokens); block 128. A work item is a vector of the first half of a head and the
// vector of the second half that it pairs with: a head's hv = head_dim / 2 / VEC items sit
// on hv consecutive lanes of one warp (the launcher passes q_norm only where hv is a power of
// two <= 32), which sum the head's squares by shuffles. Every lane of a warp runs the same
// iterations, so the shuffles see all 32.
extern "C" __global__ void __launch_bounds__(128)
rope_store_kv(const elem_t* __restrict__ qkv, i64 qkv_stride, const int* __restrict__ positions,
              const float* __restrict__ cos_table, const float* __restrict__ sin_table,
              elem_t* __restrict__ q_out, elem_t* __restrict__ pool, int H,
              const int* __restrict__ token_page_ids, int num_heads, int num_kv_heads,
              int head_dim, const elem_t* __restrict__ q_norm, const elem_t* __restrict__ k_norm,
              float norm_eps)
{
    const int t = blockIdx.x;
    const elem_t* x = qkv + (i64)t * qkv_stride;
    elem_t* page = pool + (i64)token_page_ids[t] * 2 * H;
    const int half = head_dim / 2, hv = half / VEC;  // vectors per half head
    const float* cs = cos_table + (i64)positions[t] * head_dim;
    const float* sn = sin_table + (i64)positions[t] * head_dim;
    const int num_rot = (num_heads + num_kv_heads) * hv;
    for (int base = 0; base < num_rot; base += 128) {
        const int item = base + threadIdx.x;
        const bool ok = item < num_rot;
        const int head = ok ? item / hv : 0, i = (item % hv) * VEC;
        const elem_t* src = x + head * head_dim;
        float a[VEC], b[VEC], ra[VEC], rb[VEC];
        unpack(ok ? ld_vec(src + i) : vzero(), a);
        unpack(ok ? ld_vec(src + half + i) : vzero(), b);
        if (q_norm != nullptr) {  // uniform over the block
            float ss = 0.f;
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss = fmaf(b[e], b[e], fmaf(a[e], a[e], ss));
            for (int o = hv / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            const float rstd = rsqrtf(ss / (float)head_dim + norm_eps);
            const elem_t* w = head < num_heads ? q_norm : k_norm;
            float wa[VEC], wb[VEC];
            unpack(ld_vec(w + i), wa);
            unpack(ld_vec(w + half + i), wb);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                a[e] = rnd(wa[e] * rnd(a[e] * rstd));
                b[e] = rnd(wb[e] * rnd(b[e] * rstd));
            }
        }
        if (!ok) continue;  // the last iteration: no shuffle after this
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const float c0 = rnd(cs[i + e]), c1 = rnd(cs[half + i + e]);
            const float s0 = rnd(sn[i + e]), s1 = rnd(sn[half + i + e]);
            ra[e] = rnd(fmaf(b[e], s0, rnd(a[e] * c0)));  // rotate_half: -x2 in the first half
            rb[e] = rnd(fmaf(a[e], s1, rnd(b[e] * c1)));
        }
        elem_t* dst = head < num_heads ? q_out + ((i64)t * num_heads + head) * head_dim
                                       : page + (head - num_heads) * head_dim;
        st_vec(dst + i, pack(ra));
        st_vec(dst + half + i, pack(rb));
    }
    const int kv_dim = num_kv_heads * head_dim;
    const elem_t* v = x + (num_heads + num_kv_heads) * head_dim;
    for (int c = threadIdx.x * VEC; c < kv_dim; c += 128 * VEC)
        st_vec(page + H + c, ld_vec(v + c));
}

// out[t, j] = rnd(rnd(silu(gate_up[t, j])) * gate_up[t, inter + j]).
// grid (ceil(num_tokens * inter / VEC / 256)); block 256. inter a multiple of VEC.
extern "C" __global__ void __launch_bounds__(256)
silu_mul(const elem_t* __restrict__ gate_up, elem_t* __restrict__ out, i64 num_tokens, int inter)
{
    const int per_row = inter / VEC;
    const i64 item = (i64)blockIdx.x * 256 + threadIdx.x;
    if (item >= num_tokens * per_row) return;
    const i64 t = item / per_row;
    const int j = (int)(item % per_row) * VEC;
    float g[VEC], u[VEC];
    unpack(ld_vec(gate_up + t * 2 * inter + j), g);
    unpack(ld_vec(gate_up + t * 2 * inter + inter + j), u);
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] = rnd(rnd(g[e] / (1.f + expf(-g[e]))) * u[e]);
    st_vec(out + t * inter + j, pack(g));
}

// One module's rows of a loaded adapter into their pages, at every layer (torch_ref
// write_adapter_rows): pages[l, page_ids[i * n + c], half, h] = rows[l, i, c * H + h], zero
// past `width`. rows is read through its strides (A as stored, or B's [d_out, r] read
// transposed); the pool is addressed with 64-bit offsets, as it may hold more than 2^31
// elements. grid (r * n, num_layers); block 256.
extern "C" __global__ void __launch_bounds__(256)
write_adapter_rows(elem_t* __restrict__ pages, i64 layer_stride, int H,
                   const elem_t* __restrict__ rows, i64 row_layer_stride, i64 row_stride,
                   i64 elem_stride, int width, const i64* __restrict__ page_ids, int n, int half)
{
    const int i = blockIdx.x / n, c = blockIdx.x % n, l = blockIdx.y;
    const elem_t* src = rows + (i64)l * row_layer_stride + (i64)i * row_stride;
    elem_t* dst = pages + (i64)l * layer_stride + (page_ids[blockIdx.x] * 2 + half) * (i64)H;
    for (int h = threadIdx.x * VEC; h < H; h += 256 * VEC) {
        const int k = c * H + h;
        vec_t out;
        elem_t* o = reinterpret_cast<elem_t*>(&out);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
            o[e] = k + e < width ? src[(i64)(k + e) * elem_stride] : elem_t(0);
        st_vec(dst + h, out);
    }
}
