// MBGMM: the prefill LoRA kernels. Prefill tokens come in segments, each segment one request's
// tokens and so one adapter; a block computes one tile of one segment on the tensor cores
// (bf16/fp16 operands, float32 accumulators: wgmma where built for sm_90a, else mma.sync
// m16n8k16). Adapter rows are gathered from the pool's pages into shared memory, so the page
// table costs nothing in the inner loop.
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

// ---- shared-memory tiles of 128-byte rows -------------------------------------------------
// Both kernels keep their tiles as rows of 64 elements (128 bytes) without padding, swizzled:
// 16-byte chunk c of row r is stored at chunk c ^ (r & 7), so the 8 rows that one ldmatrix
// matrix (or one quarter-warp's 4-byte stores) touches at one chunk fall in distinct banks.
__device__ __forceinline__ u32 gm_swz(int row, int chunk) {
    return (u32)(row * 128 + ((chunk ^ (row & 7)) << 4));
}
__device__ __forceinline__ void gm_st_shared_u32(u32 saddr, u32 w) {
    asm volatile("st.shared.u32 [%0], %1;" :: "r"(saddr), "r"(w) : "memory");
}
__device__ __forceinline__ vec_t gm_ld_shared_vec(u32 saddr) {
    vec_t v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "r"(saddr) : "memory");
    return v;
}
__device__ __forceinline__ void gm_ld_f32x2(const float* p, float& a, float& b) {
    asm("ld.global.nc.v2.f32 {%0,%1}, [%2];" : "=f"(a), "=f"(b) : "l"(p));
}
__device__ __forceinline__ void gm_st_f32x2(float* p, float a, float b) {
    asm volatile("st.global.v2.f32 [%0], {%1,%2};" :: "l"(p), "f"(a), "f"(b) : "memory");
}
// p[0] += a, p[1] += b as one vector reduction (sm_90); p 8-byte aligned.
__device__ __forceinline__ void gm_red_f32x2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1,%2};" :: "l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// ---- warpgroup MMA (wgmma, sm_90a) ----------------------------------------------------------
// Built with -arch=sm_90a (cuda_compile.device_arch on Hopper) both kernels feed the tensor
// cores with wgmma: a warpgroup (4 warps, 128 threads) computes 64 rows at once, reading its B
// operand (and the shrink's A) from shared memory through a matrix descriptor, so the tiles
// are not copied into registers by ldmatrix warp by warp. The accumulators keep mma.sync's
// layout (each warp 16 rows; per 8 columns the m16n8 fragment), so the epilogues are shared.
// Other builds (NVRTC, other GPUs) keep the mma.sync path.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GM_WGMMA 1
typedef unsigned long long u64;
#if defined(SLORA_BF16)
#define GM_WG_T "bf16"
#else
#define GM_WG_T "f16"
#endif
#define GM_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define GM_F8(d, i) GM_F4(d, i), GM_F4(d, i + 4)
#define GM_F16(d, i) GM_F8(d, i), GM_F8(d, i + 8)
#define GM_F32(d, i) GM_F16(d, i), GM_F16(d, i + 16)
#define GM_F64(d, i) GM_F32(d, i), GM_F32(d, i + 32)
template <int N> struct gm_int { static constexpr int value = N; };

// The descriptor of a tile of the rows gm_swz lays out (128-byte rows, 16-byte chunk c of row
// r at c ^ (r & 7)), which is wgmma's 128-byte swizzle when the tile starts on 1024 bytes.
// Its 8-row groups are 1024 bytes apart, and both offset fields say so: the K-major operands
// step between row groups by the stride offset; the MN-major B^T tile, one 64-column swizzle
// atom wide, steps between its groups of 8 K rows by the one offset that applies to it, which
// the PTX ISA's layout tables and its field descriptions name differently. Inside a row, K
// steps of 16 elements move the start by 32 bytes; the hardware swizzles the address it
// computes, as gm_swz does.
__device__ __forceinline__ u64 gm_desc(u32 saddr) {
    return (u64)((saddr & 0x3ffff) >> 4) | ((u64)(1024 >> 4) << 16) | ((u64)(1024 >> 4) << 32)
         | (1ull << 62);
}
__device__ __forceinline__ void gm_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void gm_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void gm_wgmma_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// cp.async wrote the tiles through the generic proxy; wgmma reads them through the async one.
__device__ __forceinline__ void gm_fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Keeps the compiler from moving accumulator reads or writes across a wgmma's issue and wait.
template <int N>
__device__ __forceinline__ void gm_fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
// d (64 x N, float32) += A (64 x 16, K-major tile in shared memory) * B (16 x N: N rows of
// K-major 16 elements), N = 16, 32, 64, 128 by the size of d.
__device__ __forceinline__ void gm_wgmma_ss(float (&d)[8], u64 a_desc, u64 b_desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32." GM_WG_T "." GM_WG_T " {"
                 "%0,%1,%2,%3,%4,%5,%6,%7"
                 "}, %8, %9, p, 1, 1, 0, 0;\n}"
                 : GM_F8(d, 0) : "l"(a_desc), "l"(b_desc), "r"(1));
}
__device__ __forceinline__ void gm_wgmma_ss(float (&d)[16], u64 a_desc, u64 b_desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." GM_WG_T "." GM_WG_T " {"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
                 "}, %16, %17, p, 1, 1, 0, 0;\n}"
                 : GM_F16(d, 0) : "l"(a_desc), "l"(b_desc), "r"(1));
}
__device__ __forceinline__ void gm_wgmma_ss(float (&d)[32], u64 a_desc, u64 b_desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." GM_WG_T "." GM_WG_T " {"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
                 "}, %32, %33, p, 1, 1, 0, 0;\n}"
                 : GM_F32(d, 0) : "l"(a_desc), "l"(b_desc), "r"(1));
}
__device__ __forceinline__ void gm_wgmma_ss(float (&d)[64], u64 a_desc, u64 b_desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." GM_WG_T "." GM_WG_T " {"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
                 "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
                 "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
                 "}, %64, %65, p, 1, 1, 0, 0;\n}"
                 : GM_F64(d, 0) : "l"(a_desc), "l"(b_desc), "r"(1));
}
// d (64 x 64) += A (64 x 16, registers in mma.sync's A-fragment layout, per warp its 16 rows) *
// B (16 x 64, MN-major: 16 rows of 64 columns in shared memory).
__device__ __forceinline__ void gm_wgmma_rs_n64(float (&d)[8][4], const u32 (&a)[4],
                                                u64 b_desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." GM_WG_T "." GM_WG_T " {"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
                 "}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}"
                 : GM_F4(d[0], 0), GM_F4(d[1], 0), GM_F4(d[2], 0), GM_F4(d[3], 0),
                   GM_F4(d[4], 0), GM_F4(d[5], 0), GM_F4(d[6], 0), GM_F4(d[7], 0)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(1));
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---- shrink ---------------------------------------------------------------------------------
#define GM_BN 128            // rank columns of a block
#define GM_BK 64             // d_in per stage: 128-byte rows
#define GM_MAX_STAGES 4

// The dynamic shared memory this launch was given (launchers._shrink_launch and _expand_launch
// pick it); the kernels fit as many stages as it holds.
__device__ __forceinline__ int gm_dynamic_smem_bytes() {
    u32 n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return (int)n;
}

// Wait until at most stages - 2 groups of cp.async are pending (the stage count is set at run
// time, by the rank: a stage holds only the A rows inside it).
__device__ __forceinline__ void gm_wait_stages(int stages) {
    if (stages >= 4) cp_async_wait<2>();
    else if (stages == 3) cp_async_wait<1>();
    else cp_async_wait<0>();
}

// v[t, n] += x[t, k_split] . A_s[n, k_split] for the tokens t of each segment (s its slot),
// n < rank[s]. v must hold zeros beforehand (the launcher clears it): split-K blocks add
// into it. grid (ceil(max_rank / GM_BN), tile rows (see the top), num_k_splits); block 2 BM
// threads over a tile of BM tokens (64 or 128) x 128 rank columns: with wgmma one warpgroup
// per 64 tokens, else warps side by side, each 64 tokens x 32 rank columns (warps wholly past
// the rank only load). A stage is BM rows of x and only as many A rows as the rank needs
// (rounded up to 16, or to wgmma's N), so small ranks get more stages in the same shared
// memory (48 KB for 64 tokens, 96 KB for 128: rank 128 gets 2 and 3). A block reads 128-byte
// pieces of each x row per stage, and a 128-token tile reads each A row once for twice the
// tokens.
template <int BM>
__device__ __forceinline__ bool
mbgmm_shrink_tile(const elem_t* __restrict__ x, i64 x_stride,
                  const elem_t* __restrict__ pool, int H,
                  const int* __restrict__ page_table, int num_slots, int max_rank,
                  int pages_per_row, const int* __restrict__ ranks,
                  const int* __restrict__ seg_starts, const int* __restrict__ seg_slots,
                  int num_segs, float* __restrict__ v, int d_in, int k_split_len, int v_stride,
                  int n_tile, int tile, u32 sbase, int smem_bytes)
{
    constexpr int THREADS = BM * 2, LROWS = THREADS / 8;
    int seg, m0, m_end;
    if (!find_tile(seg_starts, num_segs, tile, BM, seg, m0, m_end)) return false;
    const int slot = seg_slots[seg];
    const int rank = (slot >= 0 && slot < num_slots) ? min(ranks[slot], max_rank) : 0;
    const int n0 = n_tile * GM_BN;
    const int nr = min(GM_BN, rank - n0);  // rank columns of this block
    if (nr <= 0) return true;
    const int k_begin = blockIdx.z * k_split_len;
    const int k_end = min(d_in, k_begin + k_split_len);
    if (k_begin >= k_end) return true;
    const int num_k_tiles = (k_end - k_begin + GM_BK - 1) / GM_BK;
#if defined(GM_WGMMA)
    // The wgmma's N: a power of two from 16 (A rows past the rank are zero-filled).
    const int a_rows = nr <= 16 ? 16 : nr <= 32 ? 32 : nr <= 64 ? 64 : 128;
#else
    const int a_rows = (nr + 15) & ~15;
#endif
    const int stage_rows = BM + a_rows;
    const int stages = min(GM_MAX_STAGES, smem_bytes / (stage_rows * 128));

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Loader: thread copies chunk lchunk of rows lrow + LROWS q, of x and of A (A rows up to
    // a_rows: rows nr..a_rows-1 zero-filled, the last fragment reads them).
    const int lrow = tid >> 3, lchunk = tid & 7;
    const int* a_table = page_table + ((i64)slot * max_rank + n0) * pages_per_row;
    int a_page[GM_BN / LROWS];  // page of A row lrow + LROWS q at column page cur_j
    int cur_j = -1;
#pragma unroll
    for (int q = 0; q < GM_BN / LROWS; ++q) a_page[q] = 0;
    // The next stage to load, as counters advanced one stage at a time (no divisions in the
    // loop): its buffer ld_st, this thread's column ld_k of it, ld_in inside page column ld_j.
    int ld_st = 0, ld_k = k_begin + lchunk * VEC;
    int ld_j = ld_k / H, ld_in = ld_k - ld_j * H;

    auto load_stage = [&]() {
        const u32 s = sbase + (u32)(ld_st * stage_rows * 128);
        const bool kok = ld_k < k_end;
#pragma unroll
        for (int q = 0; q < BM / LROWS; ++q) {
            const int r = lrow + LROWS * q, m = m0 + r;
            const bool ok = kok && m < m_end;
            cp_async16_at(s + gm_swz(r, lchunk), ok ? x + (i64)m * x_stride + ld_k : x,
                          ok ? 16 : 0);
        }
        if (kok && ld_j != cur_j) {  // a new page column: one page-table read per row
            cur_j = ld_j;
#pragma unroll
            for (int q = 0; q < GM_BN / LROWS; ++q) {
                const int n = lrow + LROWS * q;
                if (n < nr) a_page[q] = a_table[(i64)n * pages_per_row + ld_j];
            }
        }
#pragma unroll
        for (int q = 0; q < GM_BN / LROWS; ++q) {
            if (q * LROWS >= a_rows) break;  // uniform over the block
            const int n = lrow + LROWS * q;
            const bool ok = kok && n < nr;
            if (n < a_rows)
                cp_async16_at(s + gm_swz(BM + n, lchunk),
                              ok ? pool + (i64)a_page[q] * 2 * H + ld_in : pool, ok ? 16 : 0);
        }
        if (++ld_st == stages) ld_st = 0;
        ld_k += GM_BK;
        for (ld_in += GM_BK; ld_in >= H; ld_in -= H) ++ld_j;
    };

    for (int s = 0; s < stages - 1; ++s) {
        if (s < num_k_tiles) load_stage();
        cp_async_commit();
    }
    const bool split = gridDim.z > 1;
    const bool pairs = (v_stride % 2 == 0) && ((reinterpret_cast<unsigned long long>(v) & 7) == 0);
    const int g = lane >> 2, tig = lane & 3;
    // v[row, n0 + c] and v[row, n0 + c + 1] (c even) from a float pair, inside the rank: added
    // where d_in is split over blocks, else stored.
    auto put = [&](int row, int c, float a, float b) {
        float* vr = v + (i64)row * v_stride + n0;
        if (pairs && c + 1 < nr) {
            if (split) gm_red_f32x2(vr + c, a, b);
            else gm_st_f32x2(vr + c, a, b);
        } else {
            if (c < nr) {
                if (split) atomicAdd(vr + c, a);
                else vr[c] = a;
            }
            if (c + 1 < nr) {
                if (split) atomicAdd(vr + c + 1, b);
                else vr[c + 1] = b;
            }
        }
    };
#if defined(GM_WGMMA)
    // Warpgroup wg: tokens 64 wg.. of the tile x a_rows rank columns, 4 wgmma per stage, both
    // operands read from the stage (x rows K-major; A rows, K-major, are B's N rows).
    if (sbase & 1023) __trap();  // the descriptors' swizzle needs 1024-byte tiles
    const u32 wg_rows = (u32)((warp >> 2) * 64 * 128);
    auto run = [&](auto n_tag) {
        constexpr int N = decltype(n_tag)::value;
        float acc[N / 2];
#pragma unroll
        for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
        for (int kt = 0, st = 0; kt < num_k_tiles; ++kt, st = st + 1 == stages ? 0 : st + 1) {
            gm_wait_stages(stages);
            gm_fence_async_smem();
            __syncthreads();
            if (kt + stages - 1 < num_k_tiles) load_stage();
            cp_async_commit();
            const u32 s = sbase + (u32)(st * stage_rows * 128);
            gm_fence_regs(acc);
            gm_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < GM_BK / 16; ++kk)
                gm_wgmma_ss(acc, gm_desc(s + wg_rows + kk * 32),
                            gm_desc(s + BM * 128 + kk * 32));
            gm_wgmma_commit();
            gm_wgmma_wait_all();
            gm_fence_regs(acc);
        }
        cp_async_wait<0>();
        // acc[4 i + 2 h + e]: row 16 warp + g + 8 h, column 8 i + 2 tig + e.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + warp * 16 + g + h * 8;
            if (row >= m_end) continue;
#pragma unroll
            for (int i = 0; i < N / 8; ++i) put(row, 8 * i + 2 * tig, acc[4 * i + 2 * h],
                                                 acc[4 * i + 2 * h + 1]);
        }
    };
    switch (a_rows) {
        case 16: run(gm_int<16>{}); break;
        case 32: run(gm_int<32>{}); break;
        case 64: run(gm_int<64>{}); break;
        default: run(gm_int<128>{}); break;
    }
#else
    const int wn = (warp & 3) * 32;                         // first rank column of this warp
    const int wm = (warp >> 2) * 64;                        // and its first token
    const int nfr = max(0, min(4, (nr - wn + 7) >> 3));    // its n8 fragments inside the rank
    float acc[4][4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

    for (int kt = 0, st = 0; kt < num_k_tiles; ++kt, st = st + 1 == stages ? 0 : st + 1) {
        gm_wait_stages(stages);
        __syncthreads();
        if (kt + stages - 1 < num_k_tiles) load_stage();
        cp_async_commit();
        if (nfr > 0) {
            const u32 s = sbase + (u32)(st * stage_rows * 128);
#pragma unroll
            for (int kk = 0; kk < GM_BK / 16; ++kk) {
                u32 af[4][4], bf[2][4];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
                    ldmatrix_x4_at(af[mi], s + gm_swz(wm + mi * 16 + (lane & 15),
                                                      kk * 2 + (lane >> 4)));
#pragma unroll
                for (int p = 0; p < 2; ++p)
                    if (2 * p < nfr)
                        ldmatrix_x4_at(bf[p], s + gm_swz(BM + wn + p * 16 + (lane & 7)
                                                             + ((lane >> 4) << 3),
                                                         kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni)
                        if (ni < nfr)
                            mma16816(acc[mi][ni], af[mi], bf[ni >> 1][(ni & 1) * 2],
                                     bf[ni >> 1][(ni & 1) * 2 + 1]);
            }
        }
    }
    cp_async_wait<0>();
    if (nfr == 0) return true;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm + mi * 16 + g + h * 8;
            if (row >= m_end) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
                if (ni < nfr)
                    put(row, wn + ni * 8 + tig * 2, acc[mi][ni][h * 2], acc[mi][ni][h * 2 + 1]);
        }
#endif
    return true;
}

#define SHRINK_ARGS                                                                         \
    const elem_t* __restrict__ x, i64 x_stride, const elem_t* __restrict__ pool, int H,      \
    const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,      \
    const int* __restrict__ ranks, const int* __restrict__ seg_starts,                       \
    const int* __restrict__ seg_slots, int num_segs, float* __restrict__ v, int d_in,        \
    int k_split_len, const int* __restrict__ group, int num_members, i64 table_stride,       \
    int v_stride
#define SHRINK_PASS x, x_stride, pool, H, page_table, num_slots, max_rank, pages_per_row,    \
    ranks, seg_starts, seg_slots, num_segs, v, d_in, k_split_len, group, num_members,         \
    table_stride, v_stride

// A group of modules that read the same x (q, k, v): `group` [num_members, 3] (module, first
// column of y, width) and the tables of every module (module m's page table at m *
// table_stride, its ranks and scales at m * num_slots); member i's v in columns
// [i * max_rank, (i + 1) * max_rank) of rows v_stride wide. grid.x holds the members' rank
// tiles, member-major. group null: one module, the tables as given (num_members 1).
template <int BM>
__device__ __forceinline__ void mbgmm_shrink_body(SHRINK_ARGS)
{
    extern __shared__ __align__(1024) unsigned char gm_smem[];
    // Launched plainly: what came before it is complete, so the expand launched behind it
    // (launchers.lora_shrink_expand_segments) may start; it waits for v at pdl_wait().
    pdl_launch_dependents();
    const int per_member = gridDim.x / num_members;
    const int member = blockIdx.x / per_member;
    const int module = group != nullptr ? group[member * 3] : 0;
    page_table += module * table_stride;
    ranks += (i64)module * num_slots;
    v += member * max_rank;
    const u32 sbase = smem_addr(gm_smem);
    const int smem_bytes = gm_dynamic_smem_bytes();
    for (int tile = blockIdx.y;
         mbgmm_shrink_tile<BM>(x, x_stride, pool, H, page_table, num_slots, max_rank,
                               pages_per_row, ranks, seg_starts, seg_slots, num_segs, v, d_in,
                               k_split_len, v_stride, blockIdx.x % per_member, tile, sbase,
                               smem_bytes);
         tile += gridDim.y)
        __syncthreads();  // the next tile reuses shared memory
}

// 64-token tiles (128 threads, 48 KB): for short segments.
extern "C" __global__ void __launch_bounds__(128, 4) mbgmm_shrink(SHRINK_ARGS)
{
    mbgmm_shrink_body<64>(SHRINK_PASS);
}

// 128-token tiles (256 threads, 96 KB): for segments mostly longer than 128 tokens.
extern "C" __global__ void __launch_bounds__(256, 2) mbgmm_shrink_128(SHRINK_ARGS)
{
    mbgmm_shrink_body<128>(SHRINK_PASS);
}

// ---- expand --------------------------------------------------------------------------------
#define GX_BN 64             // output columns per step
#define GX_KC 128            // rank rows per chunk
#define GX_MAX_STAGES 4

__device__ __forceinline__ u32 gm_ld_shared_u32(u32 saddr) {
    u32 w;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(w) : "r"(saddr) : "memory");
    return w;
}
// ldmatrix's inverse (sm_90): four 8 x 8 matrices of 16-bit pairs back to shared memory.
__device__ __forceinline__ void gm_stmatrix_x4_at(u32 saddr, const u32 (&r)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};"
                 :: "r"(saddr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
#endif
}
// a + b over two packed model-dtype pairs, each sum rounded once (bf16: a * 1 + b by fma).
__device__ __forceinline__ u32 gm_add_pair(u32 a, u32 b) {
    u32 d;
#if defined(SLORA_BF16)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3f803f80u), "r"(b));
#else
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
    return d;
}

// y[t, o] += scale[s] * v[t, :rank] @ B_s^T[:rank, o] for the tokens t of each segment, in
// place (segments with no adapter are left untouched). A block takes one tile of BM tokens
// (128 or 64) and a stripe of 64-column steps [c_begin, c_end), so it walks segment -> slot ->
// rank once and converts its v rows once: v * scale goes to bf16 / fp16 (as PEFT rounds
// lora_A's output to the model dtype) and stays in registers as mma fragments (32 registers
// for a 128-rank chunk). BM / 16 warps, each over 16 rows and the whole 64-column step.
// A stage holds the y tile of its column step (BM rows of 128 bytes) and the B^T rows of its
// rank chunk, copied by cp.async, so the y tiles of the next stages - 1 steps are in flight
// while a step computes (32 to 48 KB per 128-token block) and y streams without waiting in
// registers. The product is rounded to the model dtype and added to the y tile in shared
// memory in the fragments' layout; each warp then writes its own 16 rows, 16 bytes a thread,
// so a step ends with no barrier: the one at the top of the next step frees the buffer.
// Stages: as many as the launch's dynamic shared memory (smem_bytes) holds at this rank, at
// most 4 (128 tokens in 96 KB: 3 at rank 128; 64 tokens in 56 KB: 2). Ranks past GX_KC run
// in chunks (v fragments reloaded per chunk). v_vec4: rows of v are 16-byte aligned
// (max_rank % 4 == 0), so v is read 8 bytes at a time, else 4.
template <int BM>
__device__ __forceinline__ bool
mbgmm_expand_tile(elem_t* __restrict__ y, i64 y_stride, const float* __restrict__ v,
                   const elem_t* __restrict__ pool, int H,
                   const int* __restrict__ page_table, int num_slots, int max_rank,
                   int pages_per_row, const int* __restrict__ ranks,
                   const float* __restrict__ scales, const int* __restrict__ seg_starts,
                   const int* __restrict__ seg_slots, int num_segs, int d_out, int v_vec4,
                   int v_stride, int c_begin, int c_end, int tile, u32 sbase,
                   int smem_bytes)
{
    int seg, m0, m_end;
    constexpr int THREADS = BM * 2, LROWS = THREADS / 8;
    if (!find_tile(seg_starts, num_segs, tile, BM, seg, m0, m_end)) return false;
    const int slot = seg_slots[seg];
    if (slot < 0 || slot >= num_slots) return true;
    const int rank = min(ranks[slot], max_rank);
    if (rank <= 0) return true;
    const float scale = scales[slot];
    elem_t* y_tile = y + (i64)m0 * y_stride;
    const int tile_rows = min(BM, m_end - m0);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int wm = warp * 16;                     // this warp's rows of the tile
    const int lrow = tid >> 3, lchunk = tid & 7;  // loader: rows lrow + LROWS q, chunk lchunk
    const int num_chunks = (rank + GX_KC - 1) / GX_KC;
    const int num_steps = (c_end - c_begin) * num_chunks;
    const int stage_bytes = BM * 128 + min(GX_KC, (rank + 15) & ~15) * 128;
    const int stages = min(GX_MAX_STAGES, smem_bytes / stage_bytes);
    const int* b_table = page_table + (i64)slot * max_rank * pages_per_row;
    // The pages of this thread's B^T rows (i0 + lrow + LROWS q) in page column b_j of rank
    // chunk b_ch: read from the table when a step's chunk or page column differs from the last
    // step's, so a block of one chunk inside one page column (d_out <= H) reads them once per
    // tile and its steps issue their copies without waiting on a load.
    int b_page[GX_KC / LROWS];
    int b_ch = -1, b_j = -1;

    // The next step to load, as counters advanced one step at a time (no divisions in the
    // loop): its column step ld_c, rank chunk ld_ch and stage buffer ld_st; this thread's
    // column of it is ld_in inside page column ld_j.
    int ld_c = c_begin, ld_ch = 0, ld_st = 0;
    int ld_j = (c_begin * GX_BN + lchunk * VEC) / H;
    int ld_in = c_begin * GX_BN + lchunk * VEC - ld_j * H;
    const elem_t* y_lrow = y_tile + (i64)lrow * y_stride;  // this thread's first y row
    const i64 y_lrows = (i64)LROWS * y_stride;

    // The next step's copies: the B^T rows of its rank chunk (zeros up to a multiple of 16)
    // and, at the chunk that finishes a column step, that step's y tile.
    auto load_stage = [&]() {
        const int ch = ld_ch, j = ld_j;
        const int i0 = ch * GX_KC, kn = min(GX_KC, rank - i0), rows = (kn + 15) & ~15;
        const int o = ld_c * GX_BN + lchunk * VEC;
        const bool ook = o < d_out;
        const elem_t* b_col = pool + H + ld_in;  // V half of page 0, this thread's column
        const u32 s = sbase + (u32)(ld_st * stage_bytes);
        if (ook && (ch != b_ch || j != b_j)) {
            b_ch = ch;
            b_j = j;
#pragma unroll
            for (int q = 0; q < GX_KC / LROWS; ++q) {
                const int i = lrow + LROWS * q;
                b_page[q] = i < kn ? b_table[(i64)(i0 + i) * pages_per_row + j] : 0;
            }
        }
#pragma unroll
        for (int q = 0; q < GX_KC / LROWS; ++q) {
            const int i = lrow + LROWS * q;
            if (i < rows) {
                const bool ok = ook && i < kn;
                cp_async16_at(s + BM * 128 + gm_swz(i, lchunk),
                              ok ? b_col + (i64)b_page[q] * 2 * H : pool, ok ? 16 : 0);
            }
        }
        if (ch == num_chunks - 1 && ook) {
#pragma unroll
            for (int q = 0; q < BM / LROWS; ++q) {
                const int r = lrow + LROWS * q;
                if (r < tile_rows)
                    cp_async16_at(s + gm_swz(r, lchunk), y_lrow + q * y_lrows + o, 16);
            }
        }
        if (++ld_st == stages) ld_st = 0;
        if (++ld_ch == num_chunks) {
            ld_ch = 0;
            ++ld_c;
            for (ld_in += GX_BN; ld_in >= H; ld_in -= H) ++ld_j;
        }
    };

    // scale * v of this warp's rows, rank columns of chunk ch, as A fragments (0 past the rank).
    u32 va[GX_KC / 16][4];
    // All of a thread's v loads are issued before the first is used (predicated, no branch
    // per rank step): at rank 128 they are 32 loads from L2, which one after another would
    // cost a round trip each at the start of every tile.
    auto load_v = [&](int ch) {
        const int i0 = ch * GX_KC, kn = min(GX_KC, rank - i0);
        float raw[GX_KC / 16][4][2];  // [ks][h + 2 half]: the pair at row h, column half
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm + g + h * 8;
            const bool rok = row < m_end;
            const float* vr = v + (i64)(rok ? row : m0) * v_stride + i0;
#pragma unroll
            for (int ks = 0; ks < GX_KC / 16; ++ks)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int col = ks * 16 + half * 8 + tig * 2;
                    float& a = raw[ks][h + 2 * half][0];
                    float& b = raw[ks][h + 2 * half][1];
                    a = b = 0.f;
                    if (rok && col < kn) {
                        if (v_vec4) gm_ld_f32x2(vr + col, a, b);
                        else {
                            a = vr[col];
                            if (col + 1 < kn) b = vr[col + 1];
                        }
                    }
                }
        }
#pragma unroll
        for (int ks = 0; ks < GX_KC / 16; ++ks)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = ks * 16 + (e >> 1) * 8 + tig * 2;  // b past the rank: 0
                va[ks][e] = pack2(scale * raw[ks][e][0],
                                  col + 1 < kn ? scale * raw[ks][e][1] : 0.f);
            }
    };

#pragma unroll 1
    for (int st = 0; st < stages - 1; ++st) {
        if (st < num_steps) load_stage();
        cp_async_commit();
    }
    // Launched behind its shrink (programmatic dependent launch), the block has read only
    // what was complete before the shrink began (the tables, y) and requested its first
    // stages; v is complete from here on. Launched plainly this is a no-op.
    pdl_wait();
    if (num_chunks == 1) load_v(0);

    float acc[8][4];
    // This step's column step (from c_begin), rank chunk and stage buffer.
    int cs = 0, ch = 0, st = 0;
    // This thread's 16 bytes of the copy-out: row wm + (lane >> 3) + 4 k, chunk lane & 7.
    elem_t* y_out = y_tile + (i64)(wm + (lane >> 3)) * y_stride + (lane & 7) * VEC;
#if defined(GM_WGMMA)
    if (sbase & 1023) __trap();  // the descriptors' swizzle needs 1024-byte tiles
#endif
    for (int step = 0; step < num_steps; ++step) {
        gm_wait_stages(stages);
#if defined(GM_WGMMA)
        gm_fence_async_smem();  // the B^T rows copied in, to wgmma's reads
#endif
        __syncthreads();  // this step's stage is in; every warp is done with the last step's
        if (step + stages - 1 < num_steps) load_stage();  // into that buffer
        cp_async_commit();
        if (ch == 0) {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
        }
        if (num_chunks > 1) load_v(ch);
        const u32 s = sbase + (u32)(st * stage_bytes);
        const u32 sb = s + BM * 128;
        const int ksteps = (min(GX_KC, rank - ch * GX_KC) + 15) >> 4;
#if defined(GM_WGMMA)
        // Each warpgroup its 64 rows: one wgmma per 16 rank rows, B^T read in place.
#pragma unroll
        for (int n = 0; n < 8; ++n) gm_fence_regs(acc[n]);
        gm_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < GX_KC / 16; ++ks) {
            if (ks >= ksteps) break;
            gm_wgmma_rs_n64(acc, va[ks], gm_desc(sb + ks * 16 * 128));
        }
        gm_wgmma_commit();
        gm_wgmma_wait_all();
#pragma unroll
        for (int n = 0; n < 8; ++n) gm_fence_regs(acc[n]);
#else
#pragma unroll
        for (int ks = 0; ks < GX_KC / 16; ++ks) {
            if (ks >= ksteps) break;
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 bf[4];
                ldmatrix_x4_trans_at(bf, sb + gm_swz(ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                 np * 2 + (lane >> 4)));
                mma16816(acc[2 * np], va[ks], bf[0], bf[1]);
                mma16816(acc[2 * np + 1], va[ks], bf[2], bf[3]);
            }
        }
#endif
        if (ch == num_chunks - 1) {
            // y += the product in the model dtype, in place in the stage's y tile (this warp's
            // rows: acc[n] is column chunk n), then this warp's rows out, 16 bytes a thread.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            // ldmatrix hands each thread the y pairs at its accumulators' places (matrix k of
            // an x4: rows 8 (k & 1) on, chunk 2 np + (k >> 1); lane l gives row l & 7 of
            // matrix l >> 3), so the sum is one paired add per accumulator pair, and stmatrix
            // puts the pairs back where they came from.
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                const u32 addr = s + gm_swz(wm + (lane & 7) + ((lane >> 3) & 1) * 8,
                                            2 * np + (lane >> 4));
                u32 yr[4];
                ldmatrix_x4_at(yr, addr);
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    yr[k] = gm_add_pair(yr[k], pack2(acc[2 * np + (k >> 1)][(k & 1) * 2],
                                                     acc[2 * np + (k >> 1)][(k & 1) * 2 + 1]));
                gm_stmatrix_x4_at(addr, yr);
            }
#else
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 addr = s + gm_swz(wm + g + 8 * h, n) + tig * 4;
                    const u32 yw = gm_ld_shared_u32(addr);
                    const u32 dw = pack2(acc[n][2 * h], acc[n][2 * h + 1]);
                    gm_st_shared_u32(addr, pack2(lo_f32(yw) + lo_f32(dw), hi_f32(yw) + hi_f32(dw)));
                }
#endif
            __syncwarp();
            const int o0 = (c_begin + cs) * GX_BN;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int row = wm + (lane >> 3) + 4 * k, chunk = lane & 7;
                if (row < tile_rows && o0 + chunk * VEC < d_out)
                    st_vec(y_out + 4 * k * y_stride + o0, gm_ld_shared_vec(s + gm_swz(row, chunk)));
            }
        }
        if (++st == stages) st = 0;
        if (++ch == num_chunks) {
            ch = 0;
            ++cs;
        }
    }
    cp_async_wait<0>();
    return true;
}

#define EXPAND_ARGS                                                                         \
    elem_t* __restrict__ y, i64 y_stride, const float* __restrict__ v,                       \
    const elem_t* __restrict__ pool, int H, const int* __restrict__ page_table,              \
    int num_slots, int max_rank, int pages_per_row, const int* __restrict__ ranks,           \
    const float* __restrict__ scales, const int* __restrict__ seg_starts,                    \
    const int* __restrict__ seg_slots, int num_segs, int d_out, int v_vec4,                  \
    const int* __restrict__ group, i64 table_stride, int v_stride
#define EXPAND_PASS y, y_stride, v, pool, H, page_table, num_slots, max_rank, pages_per_row,   \
    ranks, scales, seg_starts, seg_slots, num_segs, d_out, v_vec4, group, table_stride, v_stride

// grid as mbgmm_expand's, with tile rows of BM tokens; its stages in the dynamic shared memory
// the launch gives.
template <int BM>
__device__ __forceinline__ void mbgmm_expand_body(EXPAND_ARGS)
{
    extern __shared__ __align__(1024) unsigned char gx_smem[];
    const int num_col_steps = (d_out + GX_BN - 1) / GX_BN;
    const int per_block = (num_col_steps + gridDim.x - 1) / gridDim.x;
    const int member = blockIdx.z;
    int module = 0;
    if (group != nullptr) {
        module = group[member * 3];
        y += group[member * 3 + 1];
        d_out = group[member * 3 + 2];
    }
    const int c_begin = blockIdx.x * per_block;
    const int c_end = min(c_begin + per_block, (d_out + GX_BN - 1) / GX_BN);
    if (c_begin >= c_end) return;
    page_table += module * table_stride;
    ranks += (i64)module * num_slots;
    scales += (i64)module * num_slots;
    v += member * max_rank;
    const u32 sbase = smem_addr(gx_smem);
    const int smem_bytes = gm_dynamic_smem_bytes();
    for (int tile = blockIdx.y;
         mbgmm_expand_tile<BM>(y, y_stride, v, pool, H, page_table, num_slots, max_rank,
                               pages_per_row, ranks, scales, seg_starts, seg_slots, num_segs,
                               d_out, v_vec4, v_stride, c_begin, c_end, tile, sbase,
                               smem_bytes);
         tile += gridDim.y)
        __syncthreads();  // the next tile reuses shared memory
}

// 128-token tiles (256 threads): for segments mostly longer than 128 tokens.
extern "C" __global__ void __launch_bounds__(256, 2) mbgmm_expand(EXPAND_ARGS)
{
    mbgmm_expand_body<128>(EXPAND_PASS);
}

// 64-token tiles (128 threads): for short segments, whose 128-token tiles would be mostly empty.
extern "C" __global__ void __launch_bounds__(128, 4) mbgmm_expand_64(EXPAND_ARGS)
{
    mbgmm_expand_body<64>(EXPAND_PASS);
}

#endif  // SLORA_HALF
