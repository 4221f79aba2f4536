// Paged attention over the unified pool, and the store of new tokens' K/V into their pages.
// A context position's K and V are the first kv_dim elements of the two halves of its page;
// head kh's slice is [kh * HD, (kh + 1) * HD). Scores are kept in the log2 domain: q is scaled
// by softmax_scale * log2(e) and exponentials are exp2.
//
// Sliding window (`window` W > 0, Hugging Face Mistral's): a query at position p sees the keys
// at p - W < j <= p; W = 0 sees all j <= p. Positions before a query's window are never read,
// not even their page ids, so the scheduler may reuse those pages.
#include "common.cuh"

#define NEG_BIG (-1e30f)  // "no score yet": finite, so exp2(NEG_BIG - NEG_BIG) is 1, not NaN

// pool[p_t, 0, :kv_dim] = k[t]; pool[p_t, 1, :kv_dim] = v[t]. grid (num_tokens); block 128.
extern "C" __global__ void __launch_bounds__(128)
store_kv(const elem_t* __restrict__ k, i64 k_stride, const elem_t* __restrict__ v, i64 v_stride,
         elem_t* __restrict__ pool, int H, const int* __restrict__ token_page_ids, int kv_dim)
{
    const int t = blockIdx.x;
    elem_t* page = pool + (i64)token_page_ids[t] * 2 * H;
    for (int c = threadIdx.x * VEC; c < kv_dim; c += 128 * VEC) {
        st_vec(page + c, ld_vec(k + (i64)t * k_stride + c));
        st_vec(page + H + c, ld_vec(v + (i64)t * v_stride + c));
    }
}

// ---- decode: one query per request, split over the context (flash-decoding) ----------------
//
// A block serves one request, one KV head and up to MAXG of the query heads that share it
// (grouped-query attention reads each K/V vector once for the whole group), over one split of
// the context. LPT lanes hold one token's head vector (16 bytes each); a warp takes 32 / LPT
// tokens at a time, DEC_UNROLL times over, with all their K/V loads issued before the math.
// Each token-group of lanes keeps its own running max / sum / output; the block merges them
// in shared memory at the end, and the splits are merged by paged_decode_reduce.
#define DEC_THREADS 128
#define DEC_UNROLL 4

template <int HD, int MAXG>
__device__ __forceinline__ void paged_decode_impl(
    const elem_t* __restrict__ q, const elem_t* __restrict__ pool, int H,
    const int* __restrict__ kv_page_table, int max_pages, const int* __restrict__ context_lens,
    int window, int num_heads, int num_kv_heads, float scale_log2, int split_len, int num_splits,
    elem_t* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml)
{
    constexpr int LPT = HD / VEC;        // lanes per token
    constexpr int TPW = 32 / LPT;        // tokens per warp per step
    constexpr int NGRP = DEC_THREADS / 32 * TPW;
    __shared__ float sm_m[NGRP][MAXG];
    __shared__ float sm_l[NGRP][MAXG];
    __shared__ float sm_acc[NGRP][MAXG][HD];

    const int b = blockIdx.x;
    const int G = num_heads / num_kv_heads;
    const int subs = (G + MAXG - 1) / MAXG;
    const int kh = blockIdx.y / subs, sub = blockIdx.y % subs;
    const int h0 = kh * G + sub * MAXG;
    const int ng = min(MAXG, G - sub * MAXG);
    const int ctx = context_lens[b];
    // The splits cover the query's window [lo, ctx), at most min(W, max context) positions.
    const int lo = window > 0 ? max(0, ctx - window) : 0;
    const int t_begin = lo + blockIdx.z * split_len;
    const int t_end = min(ctx, t_begin + split_len);
    if (t_begin >= t_end) {
        if (ctx <= 0 && num_splits == 1)  // empty context: zeros, not NaN
            for (int i = threadIdx.x; i < ng * HD; i += DEC_THREADS)
                out[((i64)b * num_heads + h0) * HD + i] = from_f32(0.f);
        return;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int grp = warp * TPW + lane / LPT, li = lane % LPT;

    float qf[MAXG][VEC];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        if (g < ng) {
            unpack(ld_vec(q + ((i64)b * num_heads + h0 + g) * HD + li * VEC), qf[g]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) qf[g][e] *= scale_log2;
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) qf[g][e] = 0.f;
        }
    }
    float m[MAXG], l[MAXG], acc[MAXG][VEC];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        m[g] = NEG_BIG;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] = 0.f;
    }

    const int* pt = kv_page_table + (i64)b * max_pages;
    const elem_t* kbase = pool + kh * HD + li * VEC;
    // The trip count is the same for the whole block: shuffles below need every lane.
    for (int base = t_begin; base < t_end; base += NGRP * DEC_UNROLL) {
        int page[DEC_UNROLL];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            const int t = base + u * NGRP + grp;
            page[u] = t < t_end ? pt[t] : -1;
        }
        vec_t kv[DEC_UNROLL], vv[DEC_UNROLL];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            if (page[u] >= 0) {
                const elem_t* p = kbase + (i64)page[u] * 2 * H;
                kv[u] = ld_stream(p);
                vv[u] = ld_stream(p + H);
            } else {
                kv[u] = vzero();
                vv[u] = vzero();
            }
        }
        float s[DEC_UNROLL][MAXG];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            float kf[VEC];
            unpack(kv[u], kf);
#pragma unroll
            for (int g = 0; g < MAXG; ++g) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; ++e) d = fmaf(qf[g][e], kf[e], d);
#pragma unroll
                for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = page[u] >= 0 ? d : NEG_INF;
            }
        }
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < DEC_UNROLL; ++u) mx = fmaxf(mx, s[u][g]);
            const float corr = exp2f(m[g] - mx);
            m[g] = mx;
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[g][e] *= corr;
#pragma unroll
            for (int u = 0; u < DEC_UNROLL; ++u) {
                const float p = exp2f(s[u][g] - mx);
                l[g] += p;
                float vf[VEC];
                unpack(vv[u], vf);
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
            }
        }
    }

    // Merge the token-groups of the block.
    if (li == 0) {
#pragma unroll
        for (int g = 0; g < MAXG; ++g) sm_m[grp][g] = m[g];
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        float M = NEG_BIG;
        for (int r = 0; r < NGRP; ++r) M = fmaxf(M, sm_m[r][g]);
        const float w = exp2f(m[g] - M);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sm_acc[grp][g][li * VEC + e] = acc[g][e] * w;
        if (li == 0) sm_l[grp][g] = l[g] * w;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ng * HD; i += DEC_THREADS) {
        const int g = i / HD, d = i % HD;
        float a = 0.f, lsum = 0.f, M = NEG_BIG;
        for (int r = 0; r < NGRP; ++r) {
            a += sm_acc[r][g][d];
            lsum += sm_l[r][g];
            M = fmaxf(M, sm_m[r][g]);
        }
        const i64 bh = (i64)b * num_heads + h0 + g;
        if (num_splits == 1) {
            out[bh * HD + d] = from_f32(a / lsum);
        } else {
            part_acc[(bh * num_splits + blockIdx.z) * HD + d] = a;
            if (d == 0) {
                part_ml[(bh * num_splits + blockIdx.z) * 2] = M;
                part_ml[(bh * num_splits + blockIdx.z) * 2 + 1] = lsum;
            }
        }
    }
}

#define DECODE_ARGS                                                                            \
    const elem_t* __restrict__ q, const elem_t* __restrict__ pool, int H,                      \
    const int* __restrict__ kv_page_table, int max_pages, const int* __restrict__ context_lens, \
    int window, int num_heads, int num_kv_heads, float scale_log2, int split_len,               \
    int num_splits, elem_t* __restrict__ out, float* __restrict__ part_acc,                    \
    float* __restrict__ part_ml
#define DECODE_PASS q, pool, H, kv_page_table, max_pages, context_lens, window, num_heads,      \
    num_kv_heads, scale_log2, split_len, num_splits, out, part_acc, part_ml
#define DECODE_INST(HD, G)                                                                     \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS)                                  \
    paged_decode_hd##HD##_g##G(DECODE_ARGS) { paged_decode_impl<HD, G>(DECODE_PASS); }
DECODE_INST(64, 1)
DECODE_INST(64, 2)
DECODE_INST(64, 4)
DECODE_INST(64, 8)
DECODE_INST(128, 1)
DECODE_INST(128, 2)
DECODE_INST(128, 4)
DECODE_INST(128, 8)

// Merge the splits of each (request, head): grid (num_reqs, num_heads); block head_dim.
extern "C" __global__ void
paged_decode_reduce(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                    const int* __restrict__ context_lens, int window, int num_heads,
                    int head_dim, int split_len, int num_splits, elem_t* __restrict__ out)
{
    const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const int ctx = context_lens[b];
    const int span = window > 0 ? min(ctx, window) : ctx;  // positions the query sees
    const i64 bh = (i64)b * num_heads + h;
    const int nz = min(num_splits, (span + split_len - 1) / split_len);
    if (nz <= 0) {
        out[bh * head_dim + d] = from_f32(0.f);
        return;
    }
    const float* ml = part_ml + bh * num_splits * 2;
    float M = NEG_BIG;
    for (int z = 0; z < nz; ++z) M = fmaxf(M, ml[2 * z]);
    float a = 0.f, lsum = 0.f;
    for (int z = 0; z < nz; ++z) {
        const float w = exp2f(ml[2 * z] - M);
        lsum += ml[2 * z + 1] * w;
        a += part_acc[(bh * num_splits + z) * head_dim + d] * w;
    }
    out[bh * head_dim + d] = from_f32(a / lsum);
}

// ---- prefill: causal, tensor cores (16-bit element types only) --------------------------------
//
// FlashAttention-2 layout: a block takes 64 new tokens of one request (one query head), each
// warp 16 of them, and walks the request's context 64 positions at a time: K and V tiles are
// gathered page by page into shared memory, S = Q K^T and O += P V run as mma.sync m16n8k16
// with float32 accumulators, the softmax stays in registers. The new tokens are the last
// q_len positions of the context of context_lens[b], so row i at position
// p = context_len - q_len + i attends to positions <= p (and > p - W with a window W: the
// block starts at the tile holding its first row's first key). Blocks are numbered over all requests' tiles (grid.x is an upper
// bound, ceil(num_tokens / 64) + num_reqs; grid.y the query heads).
#if defined(SLORA_HALF)

#define PF_THREADS 128

template <int HD>
__device__ __forceinline__ void paged_prefill_impl(
    const elem_t* __restrict__ q, const elem_t* __restrict__ pool, int H,
    const int* __restrict__ kv_page_table, int max_pages, const int* __restrict__ context_lens,
    const int* __restrict__ query_start_loc, int window, int num_reqs, int num_heads,
    int num_kv_heads, float scale_log2, elem_t* __restrict__ out)
{
    constexpr int LD = HD + 8;   // padded rows: conflict-free ldmatrix
    constexpr int VPR = HD / VEC;
    __shared__ __align__(16) elem_t ks[64][LD];
    __shared__ __align__(16) elem_t vs[64][LD];

    int tile = blockIdx.x, b = -1;
    for (int r = 0; r < num_reqs; ++r) {
        const int nt = (query_start_loc[r + 1] - query_start_loc[r] + 63) / 64;
        if (tile < nt) { b = r; break; }
        tile -= nt;
    }
    if (b < 0) return;
    const int h = blockIdx.y, kh = h / (num_heads / num_kv_heads);
    const int q_begin = query_start_loc[b], q_len = query_start_loc[b + 1] - q_begin;
    const int ctx = context_lens[b];
    const int m0 = tile * 64;
    const int pos0 = ctx - q_len;  // context position of new token 0
    const i64 q_stride = (i64)num_heads * HD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;

    // Q tile -> shared (through ks) -> registers, as mma A fragments.
    for (int idx = tid; idx < 64 * VPR; idx += PF_THREADS) {
        const int r = idx / VPR, c = (idx % VPR) * VEC;
        const bool ok = m0 + r < q_len;
        cp_async16(&ks[r][c], q + (i64)(q_begin + (ok ? m0 + r : 0)) * q_stride + h * HD + c,
                   ok ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
        ldmatrix_x4(qf[kk], &ks[warp * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);

    float o[HD / 8][4];
#pragma unroll
    for (int a = 0; a < HD / 8; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[a][c] = 0.f;
    float mrow[2] = {NEG_BIG, NEG_BIG}, lrow[2] = {0.f, 0.f};
    const int qpos[2] = {pos0 + m0 + warp * 16 + g, pos0 + m0 + warp * 16 + g + 8};
    const int last_pos = pos0 + min(m0 + 63, q_len - 1);
    const int num_kv_tiles = last_pos / 64 + 1;
    const int kv_lo = window > 0 ? max(0, pos0 + m0 - window + 1) : 0;  // first key read
    const int* pt = kv_page_table + (i64)b * max_pages;
    const elem_t* kvbase = pool + kh * HD;

    for (int j = kv_lo / 64; j < num_kv_tiles; ++j) {
        const int n0 = j * 64;
        __syncthreads();  // every warp is done with the previous tile (and with Q in ks)
        for (int idx = tid; idx < 64 * VPR; idx += PF_THREADS) {
            const int r = idx / VPR, c = (idx % VPR) * VEC;
            const int t = n0 + r;
            const bool ok = t >= kv_lo && t < ctx;
            const elem_t* src = ok ? kvbase + (i64)pt[t] * 2 * H + c : pool;
            cp_async16(&ks[r][c], src, ok ? 16 : 0);
            cp_async16(&vs[r][c], ok ? src + H : pool, ok ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int a = 0; a < 8; ++a)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[a][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                u32 kf[4];
                ldmatrix_x4(kf, &ks[p * 16 + (lane & 7) + ((lane >> 4) << 3)]
                                   [kk * 16 + ((lane >> 3) & 1) * 8]);
                mma16816(s[2 * p], qf[kk], kf[0], kf[1]);
                mma16816(s[2 * p + 1], qf[kk], kf[2], kf[3]);
            }
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int key = n0 + ni * 8 + tig * 2 + (c & 1);
                const int qp = qpos[c >> 1];
                const bool seen = key <= qp && (window <= 0 || key > qp - window);
                s[ni][c] = seen ? s[ni][c] * scale_log2 : NEG_INF;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = NEG_BIG;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) mx = fmaxf(mx, fmaxf(s[ni][2 * r], s[ni][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(mrow[r], mx);
            const float corr = exp2f(mrow[r] - mnew);
            mrow[r] = mnew;
            float rs = 0.f;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                s[ni][2 * r] = exp2f(s[ni][2 * r] - mnew);
                s[ni][2 * r + 1] = exp2f(s[ni][2 * r + 1] - mnew);
                rs += s[ni][2 * r] + s[ni][2 * r + 1];
            }
            lrow[r] = lrow[r] * corr + rs;
#pragma unroll
            for (int ni = 0; ni < HD / 8; ++ni) {
                o[ni][2 * r] *= corr;
                o[ni][2 * r + 1] *= corr;
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[4];
            pa[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int np = 0; np < HD / 16; ++np) {
                u32 vf[4];
                ldmatrix_x4_trans(vf, &vs[kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8]
                                         [np * 16 + (lane >> 4) * 8]);
                mma16816(o[2 * np], pa, vf[0], vf[1]);
                mma16816(o[2 * np + 1], pa, vf[2], vf[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lsum = lrow[r];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        const float inv = 1.f / lsum;
        const int row = m0 + warp * 16 + g + r * 8;
        if (row >= q_len) continue;
        u32* op = reinterpret_cast<u32*>(out + (i64)(q_begin + row) * q_stride + h * HD);
#pragma unroll
        for (int ni = 0; ni < HD / 8; ++ni)
            op[(ni * 8 + tig * 2) / 2] = pack2(o[ni][2 * r] * inv, o[ni][2 * r + 1] * inv);
    }
}

#define PREFILL_INST(HD)                                                                       \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) paged_prefill_hd##HD(             \
        const elem_t* __restrict__ q, const elem_t* __restrict__ pool, int H,                  \
        const int* __restrict__ kv_page_table, int max_pages,                                  \
        const int* __restrict__ context_lens, const int* __restrict__ query_start_loc,         \
        int window, int num_reqs, int num_heads, int num_kv_heads, float scale_log2,           \
        elem_t* __restrict__ out) {                                                             \
        paged_prefill_impl<HD>(q, pool, H, kv_page_table, max_pages, context_lens,             \
                               query_start_loc, window, num_reqs, num_heads, num_kv_heads,     \
                               scale_log2, out);                                               \
    }
PREFILL_INST(64)
PREFILL_INST(128)

#endif  // SLORA_HALF
