// MBGMM: the prefill LoRA kernels. Prefill tokens come in segments, each segment one request's
// tokens and so one adapter; a block computes one tile of one segment on the tensor cores
// (mma.sync m16n8k16, bf16/fp16 operands, float32 accumulators). Adapter rows are gathered
// from the pool's pages into shared memory, so the page table costs nothing in the inner loop.
//
// Tiles are numbered over the segments in order and found on the device (find_tile), so the
// launch needs no host copy of the segment offsets. There are at most ceil(num_tokens / BM) +
// num_segments of them; grid.y is about ceil(num_tokens / BM) (the launcher's choice) and a
// block takes tiles blockIdx.y, blockIdx.y + gridDim.y, ... until there are no more: a step
// padded with empty segments (a CUDA graph's) does not pay a block per padding segment.
#include "common.cuh"

#if defined(SLORA_HALF)

// The segment and first token of tile number `tile` (counting the tiles of every segment in
// order); false when there is no such tile. Each warp reads 32 segments' bounds at a time and
// finds the tile by a prefix sum over its lanes, so a block of a padded launch (a CUDA graph
// sizes the grid for its largest step) learns that it has no tile in a few hundred cycles.
// Call with every lane of the warp active; `tile` is the same across the warp.
__device__ __forceinline__ bool find_tile(const int* __restrict__ seg_starts, int num_segs,
                                          int tile, int bm, int& seg, int& m0, int& m_end) {
    const unsigned full = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    int before = 0;  // tiles of the segments ahead of this group of 32
    for (int s0 = 0; s0 < num_segs; s0 += 32) {
        const int s = s0 + lane;
        int a = 0, b = 0;
        if (s < num_segs) {
            a = seg_starts[s];
            b = seg_starts[s + 1];
        }
        const int nt = (b - a + bm - 1) / bm;
        int incl = nt;  // tiles of this group's segments up to this lane's
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int n = __shfl_up_sync(full, incl, o);
            if (lane >= o) incl += n;
        }
        const int total = __shfl_sync(full, incl, 31);
        if (tile < before + total) {
            const int l = __ffs(__ballot_sync(full, before + incl > tile)) - 1;
            const int first_tile = before + __shfl_sync(full, incl - nt, l);
            seg = s0 + l;
            m0 = __shfl_sync(full, a, l) + (tile - first_tile) * bm;
            m_end = __shfl_sync(full, b, l);
            return true;
        }
        before += total;
    }
    return false;
}

#define GM_BM 64
#define GM_BN 64
#define GM_BK 32
#define GM_STAGES 4
#define GM_LD (GM_BK + 8)  // 80-byte rows: the 8 rows an ldmatrix reads fall in distinct banks
#define GM_THREADS 128

// v[t, n] += x[t, k_split] . A_s[n, k_split] for the tokens t of each segment (s its slot),
// n < rank[s]. v must hold zeros beforehand (the launcher clears it): split-K blocks add
// into it. grid (ceil(max_rank / GM_BN), tile rows (see the top), num_k_splits);
// block GM_THREADS: 4 warps, 2 x 2 over the 64 x 64 tile, 32 x 32 each. The rank tile varies
// fastest, so blocks that share x rows run together and the second reads them from L2.
__device__ __forceinline__ bool
mbgmm_shrink_tile(const elem_t* __restrict__ x, i64 x_stride,
                  const elem_t* __restrict__ pool, int H,
                  const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,
                  const int* __restrict__ ranks, const int* __restrict__ seg_starts,
                  const int* __restrict__ seg_slots, int num_segs,
                  float* __restrict__ v, int d_in, int k_split_len, int v_stride,
                  int n_tile, int tile)
{
    __shared__ __align__(16) elem_t xs[GM_STAGES][GM_BM][GM_LD];
    __shared__ __align__(16) elem_t as[GM_STAGES][GM_BN][GM_LD];

    int seg, m0, m_end;
    if (!find_tile(seg_starts, num_segs, tile, GM_BM, seg, m0, m_end)) return false;
    const int slot = seg_slots[seg];
    const int rank = (slot >= 0 && slot < num_slots) ? min(ranks[slot], max_rank) : 0;
    const int n0 = n_tile * GM_BN;
    if (n0 >= rank) return true;
    const int k_begin = blockIdx.z * k_split_len;
    const int k_end = min(d_in, k_begin + k_split_len);
    if (k_begin >= k_end) return true;
    const int num_k_tiles = (k_end - k_begin + GM_BK - 1) / GM_BK;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Loader: each stage is 64 rows x 4 vectors of x and of A; a thread copies rows lrow and
    // lrow + 32, vector column lcol, of each.
    const int lrow = tid >> 2, lcol = (tid & 3) * VEC;
    const elem_t* xrow[2];
    const int* arow[2];
    bool xok[2], aok[2];
    int cur_j[2], cur_page[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int m = m0 + lrow + r * 32;
        xok[r] = m < m_end;
        xrow[r] = x + (i64)(xok[r] ? m : m0) * x_stride;
        const int n = n0 + lrow + r * 32;
        aok[r] = n < rank;
        arow[r] = page_table + ((i64)slot * max_rank + (aok[r] ? n : 0)) * pages_per_row;
        cur_j[r] = -1;
        cur_page[r] = 0;
    }

    auto load_stage = [&](int stage, int kt) {
        const int k = k_begin + kt * GM_BK + lcol;
        const bool kok = k < k_end;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            cp_async16(&xs[stage][lrow + r * 32][lcol], xrow[r] + (kok ? k : 0),
                       (xok[r] && kok) ? 16 : 0);
            const elem_t* src = pool;
            if (aok[r] && kok) {
                const int j = k / H;
                if (j != cur_j[r]) {  // a new page of this row: one page-table read per page
                    cur_j[r] = j;
                    cur_page[r] = arow[r][j];
                }
                src = pool + (i64)cur_page[r] * 2 * H + (k - j * H);
            }
            cp_async16(&as[stage][lrow + r * 32][lcol], src, (aok[r] && kok) ? 16 : 0);
        }
    };

    const int wm = warp >> 1, wn = warp & 1;
    const bool active = n0 + wn * 32 < rank;  // a warp wholly past the rank only loads
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

#pragma unroll
    for (int s = 0; s < GM_STAGES - 1; ++s) {
        if (s < num_k_tiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < num_k_tiles; ++kt) {
        cp_async_wait<GM_STAGES - 2>();
        __syncthreads();
        const int nk = kt + GM_STAGES - 1;
        if (nk < num_k_tiles) load_stage(nk % GM_STAGES, nk);
        cp_async_commit();
        const int st = kt % GM_STAGES;
        if (active) {
#pragma unroll
            for (int kk = 0; kk < GM_BK / 16; ++kk) {
                u32 af[2][4], bf[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
                    ldmatrix_x4(af[mi], &xs[st][wm * 32 + mi * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);
#pragma unroll
                for (int p = 0; p < 2; ++p)
                    ldmatrix_x4(bf[p], &as[st][wn * 32 + p * 16 + (lane & 7) + ((lane >> 4) << 3)]
                                          [kk * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni)
                        mma16816(acc[mi][ni], af[mi], bf[ni >> 1][(ni & 1) * 2],
                                 bf[ni >> 1][(ni & 1) * 2 + 1]);
            }
        }
    }
    cp_async_wait<0>();
    if (!active) return true;
    const bool split = gridDim.z > 1;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm * 32 + mi * 16 + (lane >> 2) + h * 8;
            if (row >= m_end) continue;
            float* vr = v + (i64)row * v_stride;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2 + c;
                    if (col < rank) {
                        if (split) atomicAdd(vr + col, acc[mi][ni][h * 2 + c]);
                        else vr[col] = acc[mi][ni][h * 2 + c];
                    }
                }
        }
    return true;
}

// A group of modules that read the same x (q, k, v): `group` [num_members, 3] (module, first
// column of y, width) and the tables of every module (module m's page table at m *
// table_stride, its ranks and scales at m * num_slots); member i's v in columns
// [i * max_rank, (i + 1) * max_rank) of rows v_stride wide. grid.x holds the members' rank
// tiles, member-major. group null: one module, the tables as given (num_members 1).
extern "C" __global__ void __launch_bounds__(GM_THREADS)
mbgmm_shrink(const elem_t* __restrict__ x, i64 x_stride,
             const elem_t* __restrict__ pool, int H,
             const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,
             const int* __restrict__ ranks, const int* __restrict__ seg_starts,
             const int* __restrict__ seg_slots, int num_segs,
             float* __restrict__ v, int d_in, int k_split_len,
             const int* __restrict__ group, int num_members, i64 table_stride, int v_stride)
{
    const int per_member = gridDim.x / num_members;
    const int member = blockIdx.x / per_member;
    const int module = group != nullptr ? group[member * 3] : 0;
    page_table += module * table_stride;
    ranks += (i64)module * num_slots;
    v += member * max_rank;
    for (int tile = blockIdx.y;
         mbgmm_shrink_tile(x, x_stride, pool, H, page_table, num_slots, max_rank, pages_per_row,
                           ranks, seg_starts, seg_slots, num_segs, v, d_in, k_split_len,
                           v_stride, blockIdx.x % per_member, tile);
         tile += gridDim.y)
        __syncthreads();  // the next tile reuses shared memory
}

#define GE_BM 64
#define GE_BN 64
#define GE_KC 64            // rank rows staged in shared memory at a time
#define GE_LDB (GE_BN + 8)  // 144-byte rows: conflict-free ldmatrix
#define GE_LDV (GE_KC + 4)  // float rows of v (and of the staged result)
#define GE_THREADS 128

// y[t, o] += scale[s] * v[t, :rank] @ B_s^T[:rank, o] for the tokens t of each segment, in
// place (segments with no adapter are left untouched). grid (ceil(d_out / GE_BN), tile rows
// (see the top)); block GE_THREADS: each warp 16 tokens x 64 outputs.
// The y tile, the v tile and the B^T tile are all requested at once (cp.async), so a block
// waits for memory about once; the product is staged in shared memory and added to the y tile
// there, and y is written back 16 bytes per thread. v is float32: each element goes to the
// tensor cores as a bf16/fp16 pair hi + lo, so the product keeps ~16 bits of v's mantissa.
// v_vec4: rows of v are 16-byte aligned (max_rank % 4 == 0), else v is copied 4 bytes at a time.
__device__ __forceinline__ bool
mbgmm_expand_tile(elem_t* __restrict__ y, i64 y_stride, const float* __restrict__ v,
                  const elem_t* __restrict__ pool, int H,
                  const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,
                  const int* __restrict__ ranks, const float* __restrict__ scales,
                  const int* __restrict__ seg_starts, const int* __restrict__ seg_slots, int num_segs,
                  int d_out, int v_vec4, int v_stride, int tile)
{
    __shared__ __align__(16) elem_t ys[GE_BM][GE_LDB];
    __shared__ __align__(16) elem_t bs[GE_KC][GE_LDB];
    __shared__ __align__(16) float vs[GE_BM][GE_LDV];  // the v tile, then the result

    int seg, m0, m_end;
    if (!find_tile(seg_starts, num_segs, tile, GE_BM, seg, m0, m_end)) return false;
    const int slot = seg_slots[seg];
    if (slot < 0 || slot >= num_slots) return true;
    const int rank = min(ranks[slot], max_rank);
    if (rank <= 0) return true;
    const float scale = scales[slot];
    const int o0 = blockIdx.x * GE_BN;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;

    // The y tile: 64 rows x 8 vectors.
    for (int idx = tid; idx < GE_BM * (GE_BN / VEC); idx += GE_THREADS) {
        const int r = idx / (GE_BN / VEC), c = (idx % (GE_BN / VEC)) * VEC;
        const bool ok = m0 + r < m_end && o0 + c < d_out;
        cp_async16(&ys[r][c], ok ? y + (i64)(m0 + r) * y_stride + o0 + c : y, ok ? 16 : 0);
    }

    float acc[8][4];
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][c] = 0.f;

    for (int kc = 0; kc < rank; kc += GE_KC) {
        if (kc > 0) __syncthreads();  // the previous chunk's fragments are read
        // B^T rows kc..kc+63, columns o0..o0+63.
        for (int idx = tid; idx < GE_KC * (GE_BN / VEC); idx += GE_THREADS) {
            const int r = idx / (GE_BN / VEC), c = (idx % (GE_BN / VEC)) * VEC;
            const int i = kc + r, o = o0 + c;
            const bool ok = i < rank && o < d_out;
            const elem_t* src = pool;
            if (ok) {
                const int j = o / H;
                src = pool + (i64)page_table[((i64)slot * max_rank + i) * pages_per_row + j] * 2 * H
                      + H + (o - j * H);
            }
            cp_async16(&bs[r][c], src, ok ? 16 : 0);
        }
        // v rows m0..m0+63, columns kc..kc+63 (past the rank: masked when read).
        if (v_vec4) {
            for (int idx = tid; idx < GE_BM * (GE_KC / 4); idx += GE_THREADS) {
                const int r = idx / (GE_KC / 4), c = (idx % (GE_KC / 4)) * 4;
                const bool ok = m0 + r < m_end && kc + c < rank;  // rank <= max_rank
                cp_async16(&vs[r][c], ok ? v + (i64)(m0 + r) * v_stride + kc + c : v, ok ? 16 : 0);
            }
        } else {
            for (int idx = tid; idx < GE_BM * GE_KC; idx += GE_THREADS) {
                const int r = idx / GE_KC, c = idx % GE_KC;
                const bool ok = m0 + r < m_end && kc + c < rank;
                cp_async4(&vs[r][c], ok ? v + (i64)(m0 + r) * v_stride + kc + c : v, ok ? 4 : 0);
            }
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        const int kn = min(GE_KC, rank - kc);
        for (int ks = 0; ks < (kn + 15) / 16; ++ks) {
            const int k0 = ks * 16 + tig * 2;  // column in the chunk
            float a[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                // q: 0,1 row g cols k0,k0+1; 2,3 row g+8; 4..7 the same 8 columns later.
                const int row = warp * 16 + g + ((q >> 1) & 1) * 8;
                const int col = k0 + (q >> 2) * 8 + (q & 1);
                a[q] = kc + col < rank ? vs[row][col] : 0.f;
            }
            u32 ahi[4], alo[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                ahi[q] = pack2(a[2 * q], a[2 * q + 1]);
                alo[q] = pack2(a[2 * q] - lo_f32(ahi[q]), a[2 * q + 1] - hi_f32(ahi[q]));
            }
#pragma unroll
            for (int np = 0; np < GE_BN / 16; ++np) {
                u32 bf[4];
                ldmatrix_x4_trans(bf, &bs[ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8]
                                         [np * 16 + (lane >> 4) * 8]);
                mma16816(acc[2 * np], ahi, bf[0], bf[1]);
                mma16816(acc[2 * np], alo, bf[0], bf[1]);
                mma16816(acc[2 * np + 1], ahi, bf[2], bf[3]);
                mma16816(acc[2 * np + 1], alo, bf[2], bf[3]);
            }
        }
    }

    __syncthreads();  // every warp is done reading vs: it now holds the result
#pragma unroll
    for (int ni = 0; ni < 8; ++ni) {
        const int col = ni * 8 + tig * 2;
        vs[warp * 16 + g][col] = acc[ni][0];
        vs[warp * 16 + g][col + 1] = acc[ni][1];
        vs[warp * 16 + g + 8][col] = acc[ni][2];
        vs[warp * 16 + g + 8][col + 1] = acc[ni][3];
    }
    __syncthreads();
    for (int idx = tid; idx < GE_BM * (GE_BN / VEC); idx += GE_THREADS) {
        const int r = idx / (GE_BN / VEC), c = (idx % (GE_BN / VEC)) * VEC;
        const int m = m0 + r, o = o0 + c;
        if (m >= m_end || o >= d_out) continue;
        float yf[VEC];
        unpack(*reinterpret_cast<const vec_t*>(&ys[r][c]), yf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) yf[e] = fmaf(scale, vs[r][c + e], yf[e]);
        st_vec(y + (i64)m * y_stride + o, pack(yf));
    }
    return true;
}

extern "C" __global__ void __launch_bounds__(GE_THREADS)
mbgmm_expand(elem_t* __restrict__ y, i64 y_stride, const float* __restrict__ v,
             const elem_t* __restrict__ pool, int H,
             const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,
             const int* __restrict__ ranks, const float* __restrict__ scales,
             const int* __restrict__ seg_starts, const int* __restrict__ seg_slots, int num_segs,
             int d_out, int v_vec4,
             const int* __restrict__ group, i64 table_stride, int v_stride)
{
    // A group (see mbgmm_shrink): member blockIdx.z writes its width of y from its column;
    // d_out is the widest member's.
    const int member = blockIdx.z;
    int module = 0;
    if (group != nullptr) {
        module = group[member * 3];
        y += group[member * 3 + 1];
        d_out = group[member * 3 + 2];
    }
    if ((int)blockIdx.x * GE_BN >= d_out) return;
    page_table += module * table_stride;
    ranks += (i64)module * num_slots;
    scales += (i64)module * num_slots;
    v += member * max_rank;
    for (int tile = blockIdx.y;
         mbgmm_expand_tile(y, y_stride, v, pool, H, page_table, num_slots, max_rank,
                           pages_per_row, ranks, scales, seg_starts, seg_slots, num_segs, d_out,
                           v_vec4, v_stride, tile);
         tile += gridDim.y)
        __syncthreads();  // the next tile reuses shared memory
}

#endif  // SLORA_HALF
