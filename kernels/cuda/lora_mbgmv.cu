// MBGMV: the decode LoRA kernels. Each token of the batch has its own adapter slot (or
// NO_ADAPTER) and so its own rank; A rows and B^T rows are read through the page table straight
// from the unified pool's pages (see kernels/torch_ref.py for the layout).
//
// Both kernels are bound by the bytes of the adapter rows: each row is read exactly once per
// token, 16 bytes per thread, several loads in flight before the first use.
#include "common.cuh"

#define SHRINK_THREADS 128
#define SHRINK_UNROLL 8

// Member blockIdx.z of a group (group != nullptr; see mbgmv_shrink): points page_table and
// ranks at its module's and returns its row of group; nullptr for one module.
__device__ __forceinline__ const int* group_member(const int* __restrict__ group,
                                                   i64 table_stride, int num_slots,
                                                   const int* __restrict__& page_table,
                                                   const int* __restrict__& ranks)
{
    if (group == nullptr) return nullptr;
    const int* member = group + 3 * blockIdx.z;
    const int m = member[0];
    page_table += m * table_stride;
    ranks += (i64)m * num_slots;
    return member;
}

// v[t, i] = x[t] . A_s[i] for i < rank[s], 0 for the other i < max_rank (s = token_slots[t]).
// grid (num_tokens, row_groups); block SHRINK_THREADS. Block (t, g) computes the row pairs
// g, g + row_groups, ... of token t; two warps per row, each taking every other 32-vector
// stretch of it, so a lane keeps SHRINK_UNROLL vectors of x and of the row in flight and a
// 4096-wide row is one round trip to memory. Decode batches are small: the time is the chain
// of dependent loads (slot -> rank and first page -> row), so the first page id is read
// alongside the rank. The launcher picks row_groups so the grid fills the GPU without many
// blocks that only find rows past the rank. The `, 1` of the launch bounds lets ptxas keep
// every load of a step in flight (without it, it interleaves each load with its use to save
// registers: one round trip per load).
//
// It lets the expand that follows start early (programmatic dependent launch: mbgmv_expand).
//
// A group of modules that read the same x (q, k and v; gate and up) runs in one launch:
// grid.z = members, group [members, 3] as mbgmv_fused's (module, column, width; only the
// module is read here), each module's tables table_stride ints apart, member z's v at column
// z * max_rank of rows v_stride floats apart. group == nullptr: one module, grid.z = 1.
//
// overlap = 0: launched plainly, so everything it and the expand behind it read was complete
// when it began, and the expand may start at once. overlap = 1: launched itself behind the
// kernel before it (launchers.lora_decode(overlap_previous=True)), which writes neither the
// slots, ranks, page table nor pool: it reads those (and requests its first A vectors into L2)
// while that kernel finishes, then waits for it before reading x or writing v, and lets the
// expand start only after that wait, since the expand reads y before its own.
extern "C" __global__ void __launch_bounds__(SHRINK_THREADS, 1)
mbgmv_shrink(const elem_t* __restrict__ x, i64 x_stride,
             const elem_t* __restrict__ pool, int H,
             const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,
             const int* __restrict__ ranks, const int* __restrict__ token_slots,
             float* __restrict__ v, int d_in, int overlap,
             const int* __restrict__ group, i64 table_stride, int v_stride)
{
    __shared__ float partial[2][SHRINK_THREADS / 32];  // by iteration parity: no second barrier
    if (!overlap) pdl_launch_dependents();  // the expand may start: it waits for v at pdl_wait()
    const int t = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int half = warp & 1;
    group_member(group, table_stride, num_slots, page_table, ranks);
    float* vt = v + (i64)t * v_stride + blockIdx.z * max_rank;
    const int slot = token_slots[t];
    const bool valid_slot = slot >= 0 && slot < num_slots;
    const elem_t* xt = x + (i64)t * x_stride;
    const int* pt_slot = page_table + (i64)(valid_slot ? slot : 0) * max_rank * pages_per_row;
    int row0 = blockIdx.y * 2;
    // The first page id of this warp's first row, read before the rank is known.
    const int first_page = valid_slot && row0 < max_rank
        ? pt_slot[(i64)min(row0 + (warp >> 1), max_rank - 1) * pages_per_row] : 0;
    const int rank = valid_slot ? min(ranks[slot], max_rank) : 0;
    if (overlap && row0 + (warp >> 1) < rank) {  // the first stretch of the row, into L2
        const elem_t* a = pool + (i64)first_page * 2 * H;
#pragma unroll
        for (int u = 0; u < SHRINK_UNROLL; ++u) {
            const int kk = (u * 64 + half * 32 + lane) * VEC;
            if (kk < min(H, d_in)) prefetch_l2(a + kk);
        }
    }
    xt = pdl_wait_for(xt);  // a no-op when launched plainly
    if (overlap) pdl_launch_dependents();

    for (int it = 0; row0 < max_rank; row0 += 2 * gridDim.y, ++it) {
        if (row0 >= rank) {  // both rows past the rank (uniform over the block)
            if (threadIdx.x < 2 && row0 + threadIdx.x < max_rank) vt[row0 + threadIdx.x] = 0.f;
            continue;
        }
        const int row = row0 + (warp >> 1);
        float acc = 0.f;
        if (row < rank) {
            const int* pt = pt_slot + (i64)row * pages_per_row;
            for (int j = 0, base = 0; base < d_in; ++j, base += H) {
                const int len = min(H, d_in - base);
                const int page = (j == 0 && it == 0) ? first_page : pt[j];
                const elem_t* a = pool + (i64)page * 2 * H;  // K half
                const elem_t* xb = xt + base;
                for (int k0 = 0; k0 < len; k0 += 64 * VEC * SHRINK_UNROLL) {
                    vec_t xv[SHRINK_UNROLL], av[SHRINK_UNROLL];
#pragma unroll
                    for (int u = 0; u < SHRINK_UNROLL; ++u) {
                        const int kk = k0 + (u * 64 + half * 32 + lane) * VEC;
                        xv[u] = kk < len ? ld_vec(xb + kk) : vzero();
                        av[u] = kk < len ? ld_stream(a + kk) : vzero();
                    }
#pragma unroll
                    for (int u = 0; u < SHRINK_UNROLL; ++u) acc += dot_vec(xv[u], av[u]);
                }
            }
            acc = warp_sum(acc);
        }
        if (lane == 0) partial[it & 1][warp] = acc;
        __syncthreads();
        if (threadIdx.x < 2 && row0 + threadIdx.x < max_rank)
            vt[row0 + threadIdx.x] = partial[it & 1][2 * threadIdx.x] + partial[it & 1][2 * threadIdx.x + 1];
    }
}

// mbgmv_shrink with x staged in shared memory: the block loads each H-wide chunk of x[t] once
// (once for all its row pairs when d_in <= H) and a lane keeps only the row's SHRINK_UNROLL
// vectors in registers, so ptxas fits it in 64 registers (8 blocks per SM) and x is read from
// L2 once per block rather than once per row. It pays one more barrier and is slower on
// small batches (H100, rank 16, batch 1: 4.8 against 4.4 us with the expand), faster from
// 64 tokens where x's reads and the rows shared between tokens weigh (batch 64, one
// adapter: 6.4 against 7.0 us; batch 256: 14.7 against 16.4); the launcher picks.
// Dynamic shared memory: H * sizeof(elem_t).
__device__ __forceinline__ void
mbgmv_shrink_staged_body(const elem_t* __restrict__ x, i64 x_stride,
                const elem_t* __restrict__ pool, int H,
                const int* __restrict__ page_table, int num_slots, int max_rank,
                int pages_per_row, const int* __restrict__ ranks,
                const int* __restrict__ token_slots, float* __restrict__ v, int d_in,
                int overlap, const int* __restrict__ group, i64 table_stride, int v_stride)
{
    extern __shared__ vec_t xs[];                      // [H / VEC]: one chunk of x[t]
    __shared__ float partial[2][SHRINK_THREADS / 32];  // by iteration parity
    if (!overlap) pdl_launch_dependents();  // as in mbgmv_shrink
    const int t = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int half = warp & 1;
    group_member(group, table_stride, num_slots, page_table, ranks);
    float* vt = v + (i64)t * v_stride + blockIdx.z * max_rank;
    const int slot = token_slots[t];
    const bool valid_slot = slot >= 0 && slot < num_slots;
    const elem_t* xt = x + (i64)t * x_stride;
    const int* pt_slot = page_table + (i64)(valid_slot ? slot : 0) * max_rank * pages_per_row;
    int row0 = blockIdx.y * 2;
    const int first_page = valid_slot && row0 < max_rank
        ? pt_slot[(i64)min(row0 + (warp >> 1), max_rank - 1) * pages_per_row] : 0;
    const int rank = valid_slot ? min(ranks[slot], max_rank) : 0;
    const bool one_chunk = d_in <= H;  // x staged once for all row pairs

    // Every thread waits (a no-op when launched plainly) in its first iteration, before it
    // writes v or stages x: in the branch below or at the first staging. The first A vectors
    // of a row are requested before that, so with overlap they load while the kernel before
    // this one finishes.
    for (int it = 0; row0 < max_rank; row0 += 2 * gridDim.y, ++it) {
        if (row0 >= rank) {  // both rows past the rank (uniform over the block)
            if (it == 0) {
                pdl_wait();
                if (overlap) pdl_launch_dependents();
            }
            if (threadIdx.x < 2 && row0 + threadIdx.x < max_rank) vt[row0 + threadIdx.x] = 0.f;
            continue;
        }
        const int row = row0 + (warp >> 1);
        const bool valid = row < rank;  // the block's syncs are reached by every thread
        const int* pt = pt_slot + (i64)min(row, max_rank - 1) * pages_per_row;
        float acc = 0.f;
        for (int j = 0, base = 0; base < d_in; ++j, base += H) {
            const int len = min(H, d_in - base);
            const int page = (j == 0 && it == 0) ? first_page : (valid ? pt[j] : 0);
            const elem_t* a = pool + (i64)page * 2 * H;  // K half
            for (int k0 = 0; k0 < len; k0 += 64 * VEC * SHRINK_UNROLL) {
                vec_t av[SHRINK_UNROLL];
#pragma unroll
                for (int u = 0; u < SHRINK_UNROLL; ++u) {
                    const int kk = k0 + (u * 64 + half * 32 + lane) * VEC;
                    av[u] = valid && kk < len ? ld_stream(a + kk) : vzero();
                }
                if (k0 == 0 && (it == 0 || !one_chunk)) {  // uniform over the block
                    if (it == 0 && j == 0) {
                        xt = pdl_wait_for(xt);
                        if (overlap) pdl_launch_dependents();
                    }
                    __syncthreads();  // the last chunk's readers are done
#pragma unroll 4
                    for (int k = threadIdx.x * VEC; k < len; k += SHRINK_THREADS * VEC)
                        xs[k / VEC] = ld_vec(xt + base + k);
                    __syncthreads();
                }
#pragma unroll
                for (int u = 0; u < SHRINK_UNROLL; ++u) {
                    const int kk = k0 + (u * 64 + half * 32 + lane) * VEC;
                    if (kk < len) acc += dot_vec(xs[kk / VEC], av[u]);
                }
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) partial[it & 1][warp] = acc;
        __syncthreads();
        if (threadIdx.x < 2 && row0 + threadIdx.x < max_rank)
            vt[row0 + threadIdx.x] = partial[it & 1][2 * threadIdx.x] + partial[it & 1][2 * threadIdx.x + 1];
    }
}

#define SHRINK_STAGED_ARGS const elem_t* __restrict__ x, i64 x_stride,                      \
    const elem_t* __restrict__ pool, int H, const int* __restrict__ page_table,            \
    int num_slots, int max_rank, int pages_per_row, const int* __restrict__ ranks,         \
    const int* __restrict__ token_slots, float* __restrict__ v, int d_in, int overlap,         \
    const int* __restrict__ group, i64 table_stride, int v_stride
#define SHRINK_STAGED_PASS x, x_stride, pool, H, page_table, num_slots, max_rank, pages_per_row, \
    ranks, token_slots, v, d_in, overlap, group, table_stride, v_stride
extern "C" __global__ void __launch_bounds__(SHRINK_THREADS, 8)
mbgmv_shrink_staged(SHRINK_STAGED_ARGS)
{
    mbgmv_shrink_staged_body(SHRINK_STAGED_PASS);
}

#define EXPAND_THREADS 128
#define EXPAND_UNROLL 16
// At most 102 registers (96 used), so that two expand blocks fit on an SM beside the staged
// shrink's blocks (64 registers each, ~4.4 per SM at batch 64) and the expand launched behind
// the shrink loads its B^T rows while the shrink runs. With the bounds at 1 it took 114
// registers and only one fitted (H100, rank 16, batch 64, 64 adapters: 10.8 against 11.2 us).
#define EXPAND_MIN_BLOCKS 5

// The vectors at `col` of rows i .. i + EXPAND_UNROLL - 1 (zeros past the rank): `col` points
// into page 0's V half at the thread's offset; page_ids[i] is row i's page for this column.
__device__ __forceinline__ void load_b_rows(vec_t (&b)[EXPAND_UNROLL],
                                            const elem_t* __restrict__ col, const int* page_ids,
                                            int i, int rank, int H)
{
#pragma unroll
    for (int u = 0; u < EXPAND_UNROLL; ++u)
        b[u] = i + u < rank ? ld_stream(col + (i64)page_ids[i + u] * 2 * H) : vzero();
}

// y_old + sum_{i < rank} v_scaled[i] * (the vector at `col` of row i's page): one thread's 16
// bytes of an expand, EXPAND_UNROLL rows in flight. `b` holds rows 0 .. EXPAND_UNROLL - 1
// already (load_b_rows(b, col, page_ids, 0, ...)); the rest are loaded here.
__device__ __forceinline__ vec_t add_expand(const vec_t& y_old, vec_t (&b)[EXPAND_UNROLL],
                                            const elem_t* __restrict__ col,
                                            const int* page_ids, const float* v_scaled,
                                            int rank, int H)
{
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int i = 0; i < rank; i += EXPAND_UNROLL) {
        if (i > 0) load_b_rows(b, col, page_ids, i, rank, H);
#pragma unroll
        for (int u = 0; u < EXPAND_UNROLL; ++u) {
            float f[VEC];
            unpack(b[u], f);
            const float w = i + u < rank ? v_scaled[i + u] : 0.f;
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] = fmaf(w, f[e], acc[e]);
        }
    }
    float yf[VEC];
    unpack(y_old, yf);
#pragma unroll
    for (int e = 0; e < VEC; ++e) yf[e] += acc[e];
    return pack(yf);
}

// y[t, o] += scale[s] * sum_{i < rank[s]} v[t, i] * B_s^T[i, o], in place; tokens with no
// adapter are left untouched. grid (num_tokens, ceil(d_out / H) * chunks_per_page) with
// chunks_per_page = ceil(H / (EXPAND_THREADS * VEC)): a block covers one chunk of one page
// column j of the rows, so it stages the page ids of its token's rows (and v * scale) in shared
// memory once; dynamic shared memory 8 * max_rank bytes. One thread per 16-byte vector of y:
// it reads that vector of each of the token's B^T rows, EXPAND_UNROLL rows in flight.
//
// A group (see mbgmv_shrink): grid.z = members, member z writes its width of y from its column
// (grid.y covers the widest member), from its module's tables and v's column z * max_rank.
//
// Launched right behind its shrink with programmatic dependent launch (launchers.lora_decode)
// it starts while the shrink runs: it reads y, the slot, rank, scale, page ids and its first
// EXPAND_UNROLL rows of B^T (all written before the shrink began) and waits at pdl_wait()
// before reading v. Launched plainly, the wait is a no-op.
extern "C" __global__ void __launch_bounds__(EXPAND_THREADS, EXPAND_MIN_BLOCKS)
mbgmv_expand(elem_t* __restrict__ y, i64 y_stride, const float* __restrict__ v,
             const elem_t* __restrict__ pool, int H,
             const int* __restrict__ page_table, int num_slots, int max_rank, int pages_per_row,
             const int* __restrict__ ranks, const float* __restrict__ scales,
             const int* __restrict__ token_slots, int d_out, int chunks_per_page,
             const int* __restrict__ group, i64 table_stride, int v_stride)
{
    extern __shared__ float smem[];
    float* v_scaled = smem;                        // [max_rank]: v[t, :] * scale
    int* page_ids = (int*)(smem + max_rank);       // [max_rank]: page of each row at column j
    const int t = blockIdx.x;
    if (const int* member = group_member(group, table_stride, num_slots, page_table, ranks)) {
        scales += (i64)member[0] * num_slots;  // and its columns and width of y
        y += member[1];
        d_out = member[2];
    }
    v += blockIdx.z * max_rank;
    const int slot = token_slots[t];
    if (slot < 0 || slot >= num_slots) return;
    // Every load below depends on the slot alone, so they are all in flight together: y, the
    // rank, the scale, v and the page ids (up to max_rank: rows past the rank are staged but
    // never used).
    const int j = blockIdx.y / chunks_per_page;
    const int in_page = (blockIdx.y % chunks_per_page) * EXPAND_THREADS * VEC + threadIdx.x * VEC;
    const int o = j * H + in_page;
    const bool active = in_page < H && o < d_out;
    elem_t* yp = y + (i64)t * y_stride + o;
    const vec_t y_old = active ? ld_rw(yp) : vzero();
    const int rank = min(ranks[slot], max_rank);
    const float scale = scales[slot];
    const int* pt = page_table + (i64)slot * max_rank * pages_per_row + j;
    for (int i = threadIdx.x; i < max_rank; i += EXPAND_THREADS)
        page_ids[i] = pt[(i64)i * pages_per_row];
    __syncthreads();
    const elem_t* col = pool + H + in_page;
    vec_t b[EXPAND_UNROLL];
    load_b_rows(b, col, page_ids, 0, active ? rank : 0, H);
    pdl_wait();  // launched early behind its shrink: v is complete from here on
    for (int i = threadIdx.x; i < max_rank; i += EXPAND_THREADS)
        v_scaled[i] = ld_coherent_f32(v + (i64)t * v_stride + i) * scale;
    __syncthreads();
    if (rank <= 0 || !active) return;
    st_vec(yp, add_expand(y_old, b, col, page_ids, v_scaled, rank, H));
}

// Shrink and expand in one launch, for a group of modules that read the same x (q, k, v of
// a fused projection, or gate and up): for each member z of the group, (m, col, d_out) =
// group[z], y[t, col : col + d_out] += scale_m[s] * (x[t] . A_{m,s}^T) @ B_{m,s}^T with
// s = token_slots[t]; v stays in shared memory.
//
// grid (num_tokens, num_chunks, group_size); block THREADS. Block (t, c, z) first computes
// the whole v = x[t] . A^T: each thread holds XU 16-byte vectors of a stretch of x in
// registers and loads those of RG rows of A at once (RG * XU loads in flight), the warps'
// sums added per row into shared memory. Then the expand units c, c + num_chunks, ... of
// the module's output (a unit: THREADS * VEC outputs inside one page column, one vector per
// thread, its rows' page ids staged in shared memory). With several chunks per token each
// computes the shrink (its A rows then mostly come from L2); the launcher takes as few
// chunks as fill the GPU.
//
// Against the two launches for one module (launchers.lora_decode: shrink, then the expand
// behind it) it is slower at small batches (H100, rank 16: 10.7 us at batch 1 against 4.2;
// 14.7 against 11.3 at batch 64 with 64 adapters): one block runs a token's whole shrink,
// where the shrink kernels spread its rows over many blocks. It wins where it saves launches:
// a group of several modules (one launch for q, k and v), and batches of 256 and more. A 512-thread shape (16 rows of A in
// flight) measured no better at batch 64 and worse above.
// page_table [M, num_slots, max_rank, pages_per_row], ranks and scales [M, num_slots]: every
// module's tables, m picks one. Dynamic shared memory: 3 * max_rank * 4 bytes.
template <int THREADS, int XU, int RG>
__device__ __forceinline__ void
mbgmv_fused_body(elem_t* __restrict__ y, i64 y_stride, const elem_t* __restrict__ x,
                 i64 x_stride, const elem_t* __restrict__ pool, int H,
                 const int* __restrict__ page_table, int num_slots, int max_rank,
                 int pages_per_row, const int* __restrict__ ranks,
                 const float* __restrict__ scales, const int* __restrict__ token_slots,
                 const int* __restrict__ group, int d_in)
{
    constexpr int UNIT = THREADS * VEC;  // output elements of one expand unit
    extern __shared__ float fused_smem[];
    float* v_sum = fused_smem;                         // [max_rank]
    float* v_scaled = fused_smem + max_rank;           // [max_rank]
    int* page_ids = (int*)(v_scaled + max_rank);       // [max_rank]
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int slot = token_slots[t];
    if (slot < 0 || slot >= num_slots) return;
    const int* member = group_member(group, (i64)num_slots * max_rank * pages_per_row,
                                     num_slots, page_table, ranks);
    const int col = member[1], d_out = member[2];
    const int rank = min(ranks[slot], max_rank);
    if (rank <= 0) return;
    const float scale = scales[(i64)member[0] * num_slots + slot];
    const int* pt = page_table + (i64)slot * max_rank * pages_per_row;
    const elem_t* xt = x + (i64)t * x_stride;
    for (int i = threadIdx.x; i < rank; i += THREADS) v_sum[i] = 0.f;
    // Launched behind the kernel before it (lora_shrink_expand(overlap_previous=True)), the
    // block has read only the slot, group and tables so far; it waits for that kernel before
    // it reads x or y (a no-op when launched plainly).
    xt = pdl_wait_for(xt);
    y = pdl_wait_for(y);
    __syncthreads();

    // ---- shrink: v[i] = x[t] . A[i], i < rank
    for (int j = 0, base = 0; base < d_in; ++j, base += H) {
        const int len = min(H, d_in - base);
        for (int k0 = 0; k0 < len; k0 += THREADS * VEC * XU) {
            vec_t xv[XU];
#pragma unroll
            for (int u = 0; u < XU; ++u) {
                const int k = k0 + (u * THREADS + threadIdx.x) * VEC;
                xv[u] = k < len ? ld_vec(xt + base + k) : vzero();
            }
            for (int i0 = 0; i0 < rank; i0 += RG) {
                vec_t av[RG][XU];
#pragma unroll
                for (int r = 0; r < RG; ++r) {
                    const bool row_ok = i0 + r < rank;
                    const elem_t* a = pool + (i64)(row_ok ? pt[(i64)(i0 + r) * pages_per_row + j] : 0) * 2 * H;
#pragma unroll
                    for (int u = 0; u < XU; ++u) {
                        const int k = k0 + (u * THREADS + threadIdx.x) * VEC;
                        av[r][u] = row_ok && k < len ? ld_stream(a + k) : vzero();
                    }
                }
#pragma unroll
                for (int r = 0; r < RG; ++r) {
                    float acc = 0.f;
#pragma unroll
                    for (int u = 0; u < XU; ++u) acc += dot_vec(xv[u], av[r][u]);
                    acc = warp_sum(acc);
                    if (lane == 0 && i0 + r < rank) atomicAdd(&v_sum[i0 + r], acc);
                }
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rank; i += THREADS) v_scaled[i] = v_sum[i] * scale;

    // ---- expand: y[t, col + o] += v_scaled . B^T[:, o] over this block's units
    const int units_per_col = (H + UNIT - 1) / UNIT;
    const int num_units = (d_out + H - 1) / H * units_per_col;
    elem_t* yt = y + (i64)t * y_stride + col;
    for (int unit = blockIdx.y; unit < num_units; unit += gridDim.y) {
        const int jc = unit / units_per_col;
        const int in_page = (unit % units_per_col) * UNIT + threadIdx.x * VEC;
        const int o = jc * H + in_page;
        const bool active = in_page < H && o < d_out;
        __syncthreads();  // v_scaled written; the last unit's page ids read
        for (int i = threadIdx.x; i < rank; i += THREADS)
            page_ids[i] = pt[(i64)i * pages_per_row + jc];
        __syncthreads();
        if (!active) continue;
        const vec_t y_old = ld_rw(yt + o);
        const elem_t* col_ptr = pool + H + in_page;
        vec_t b[EXPAND_UNROLL];
        load_b_rows(b, col_ptr, page_ids, 0, rank, H);
        st_vec(yt + o, add_expand(y_old, b, col_ptr, page_ids, v_scaled, rank, H));
    }
}

#define FUSED_ARGS                                                                           \
    elem_t* __restrict__ y, i64 y_stride, const elem_t* __restrict__ x, i64 x_stride,        \
    const elem_t* __restrict__ pool, int H, const int* __restrict__ page_table,              \
    int num_slots, int max_rank, int pages_per_row, const int* __restrict__ ranks,           \
    const float* __restrict__ scales, const int* __restrict__ token_slots,                   \
    const int* __restrict__ group, int d_in
#define FUSED_PASS y, y_stride, x, x_stride, pool, H, page_table, num_slots, max_rank,        \
    pages_per_row, ranks, scales, token_slots, group, d_in

extern "C" __global__ void __launch_bounds__(128) mbgmv_fused(FUSED_ARGS)
{
    mbgmv_fused_body<128, 4, 4>(FUSED_PASS);
}

// ---- one pass: shrink and expand in one launch, no block waiting for another -------------
// y[t] += scale * sum_{i < rank} (x[t] . A_s[i]) * B_s^T[i] (s = token_slots[t]) as a sum of
// `parts` pieces (gridDim.y), each added into y by vector reductions (red.global.add: 16 bytes
// of y per instruction, done at L2). Block (t, p) takes the groups of ONEPASS_RG rows p,
// p + parts, ... of token t. Phase 1: the dot products of its rows with x, the first group's
// A rows loaded together with its B^T rows of the first output chunk (the same pages' V
// halves), into shared memory. Phase 2: for each chunk of output columns, the sum over its
// rows of w_i * B^T_i (w_i = scale * v_i) in fp32, added into y by one reduction. No block
// waits for another's v (the two-launch pair waits for the whole shrink grid, the fused kernel
// recomputes the shrink per block), so at small batches the time is about one round of loads.
// y is rounded once per piece, in whatever order they land: at most `parts` roundings (the
// launcher caps parts at 8; adding each group of 4 rows on its own put bf16 results for rank
// 128 past tolerance), and not bit-reproducible from run to run. The cap costs where a block
// then takes several groups one after another (H200, rank 64, batch 1: 5.1 us in 8 parts,
// 3.1 in 16). Requesting the next group's rows into L2 ahead (prefetch.global.L2) measured
// slower everywhere (rank 64: 5.3 us at batch 1, 23.7 against 18.2 at 64 tokens).
//
// Dynamic shared memory: groups * ONEPASS_RG * (WARPS + 1) floats, groups = the most row
// groups a block takes (ceil(ceil(max_rank / ONEPASS_RG) / parts)).
// A group of modules that read the same x (see mbgmv_shrink): grid.z = members, member z adds
// into its width of y from its column, from its module's tables (table_stride ints apart) and
// scales; group == nullptr: one module, grid.z = 1.
// Launched behind the kernel before it (programmatic dependent launch; that kernel writes
// neither the slots, tables nor pool), the first group's pool loads are issued before waiting
// for it, and x is read and y added to after. Launched plainly the wait is a no-op.
#define ONEPASS_RG 4

__device__ __forceinline__ void red_add_vec(elem_t* p, const float (&c)[VEC])
{
#if defined(SLORA_FP32)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]) : "memory");
#else
#pragma unroll
    for (int e = 0; e < VEC; ++e) atomicAdd(p + e, c[e]);
#endif
#else
    const vec_t v = pack(c);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#if defined(SLORA_BF16)
    asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
#else
    asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
#endif
#else  // before Hopper: one packed pair at a time
    u32* w = (u32*)p;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#if defined(SLORA_FP16)
        asm volatile("red.global.add.noftz.f16x2 [%0], %1;" :: "l"(w + i), "r"(v.w[i]) : "memory");
#else  // bf16x2 reductions need sm_90: compare and swap
        u32 old = w[i], seen;
        do {
            seen = old;
            old = atomicCAS(w + i, seen,
                            pack2(lo_f32(seen) + c[2 * i], hi_f32(seen) + c[2 * i + 1]));
        } while (old != seen);
#endif
    }
#endif
#endif
}

// Vectors U of rows r0 .. r0 + RG - 1 (those below rank; zeros past it) of one half of the
// adapter's pages (half 0: A, 1: B^T) from column c0 of a `width`-wide module side.
template <int THREADS, int U, int RG>
__device__ __forceinline__ void load_rows(vec_t (&v)[RG][U], const elem_t* __restrict__ pool,
                                          int H, const int* __restrict__ pt, int pages_per_row,
                                          int r0, int rank, int half, int c0, int width)
{
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = c0 + (u * THREADS + threadIdx.x) * VEC;
        const int j = c < width ? c / H : 0;
#pragma unroll
        for (int r = 0; r < RG; ++r)
            v[r][u] = r0 + r < rank && c < width
                ? ld_stream(pool + (i64)pt[(i64)(r0 + r) * pages_per_row + j] * 2 * H
                            + half * H + (c - j * H))
                : vzero();
    }
}

template <int THREADS, int XU, int OU>
__device__ __forceinline__ void
mbgmv_onepass_body(elem_t* __restrict__ y, i64 y_stride, const elem_t* __restrict__ x,
                   i64 x_stride, const elem_t* __restrict__ pool, int H,
                   const int* __restrict__ page_table, int num_slots, int max_rank,
                   int pages_per_row, const int* __restrict__ ranks,
                   const float* __restrict__ scales, const int* __restrict__ token_slots,
                   int d_in, int d_out, const int* __restrict__ group, i64 table_stride)
{
    constexpr int RG = ONEPASS_RG, WARPS = THREADS / 32;
    constexpr int IN_STEP = THREADS * VEC * XU, OUT_STEP = THREADS * VEC * OU;
    extern __shared__ float onepass_smem[];
    const int t = blockIdx.x, parts = gridDim.y;
    if (const int* member = group_member(group, table_stride, num_slots, page_table, ranks)) {
        scales += (i64)member[0] * num_slots;  // and its columns and width of y
        y += member[1];
        d_out = member[2];
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slot = token_slots[t];
    if (slot < 0 || slot >= num_slots) return;
    const int rank = min(ranks[slot], max_rank);
    if (blockIdx.y * RG >= rank) return;
    const int groups = (rank - blockIdx.y * RG + parts * RG - 1) / (parts * RG);
    const int max_groups = ((max_rank + RG - 1) / RG + parts - 1) / parts;
    float* partial = onepass_smem;                 // [max_groups * RG][WARPS]
    float* w = onepass_smem + max_groups * RG * WARPS;  // [max_groups * RG]
    const float scale = scales[slot];
    const int* pt = page_table + (i64)slot * max_rank * pages_per_row;
    const elem_t* xt = x + (i64)t * x_stride;
    elem_t* yt = y + (i64)t * y_stride;

    vec_t b0[RG][OU];  // the first group's B^T rows of the first output chunk
    for (int g = 0; g < groups; ++g) {
        const int r0 = (blockIdx.y + g * parts) * RG;
        float acc[RG];
#pragma unroll
        for (int r = 0; r < RG; ++r) acc[r] = 0.f;
        for (int k0 = 0; k0 < d_in; k0 += IN_STEP) {
            vec_t av[RG][XU], xv[XU];
            load_rows<THREADS, XU, RG>(av, pool, H, pt, pages_per_row, r0, rank, 0, k0, d_in);
            if (g == 0 && k0 == 0) {  // in flight with the first A rows; then the wait
                load_rows<THREADS, OU, RG>(b0, pool, H, pt, pages_per_row, r0, rank, 1, 0,
                                           d_out);
                xt = pdl_wait_for(xt);  // no-ops when launched plainly
                yt = pdl_wait_for(yt);
                pdl_launch_dependents();
            }
#pragma unroll
            for (int u = 0; u < XU; ++u) {
                const int k = k0 + (u * THREADS + threadIdx.x) * VEC;
                xv[u] = k < d_in ? ld_vec(xt + k) : vzero();
            }
#pragma unroll
            for (int r = 0; r < RG; ++r)
#pragma unroll
                for (int u = 0; u < XU; ++u) acc[r] += dot_vec(xv[u], av[r][u]);
        }
#pragma unroll
        for (int r = 0; r < RG; ++r) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) partial[(g * RG + r) * WARPS + warp] = s;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < groups * RG; i += THREADS) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < WARPS; ++k) s += partial[i * WARPS + k];
        w[i] = (blockIdx.y + i / RG * parts) * RG + i % RG < rank ? s * scale : 0.f;
    }
    __syncthreads();

    for (int o0 = 0; o0 < d_out; o0 += OUT_STEP) {
        float c[OU][VEC];
#pragma unroll
        for (int u = 0; u < OU; ++u)
#pragma unroll
            for (int e = 0; e < VEC; ++e) c[u][e] = 0.f;
        for (int g = 0; g < groups; ++g) {
            vec_t b[RG][OU];
            if (o0 == 0 && g == 0) {
#pragma unroll
                for (int r = 0; r < RG; ++r)
#pragma unroll
                    for (int u = 0; u < OU; ++u) b[r][u] = b0[r][u];
            } else {
                load_rows<THREADS, OU, RG>(b, pool, H, pt, pages_per_row,
                                           (blockIdx.y + g * parts) * RG, rank, 1, o0, d_out);
            }
#pragma unroll
            for (int r = 0; r < RG; ++r) {
                const float wr = w[g * RG + r];
#pragma unroll
                for (int u = 0; u < OU; ++u) {
                    float f[VEC];
                    unpack(b[r][u], f);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) c[u][e] = fmaf(wr, f[e], c[u][e]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < OU; ++u) {
            const int o = o0 + (u * THREADS + threadIdx.x) * VEC;
            if (o < d_out) red_add_vec(yt + o, c[u]);
        }
    }
}

#define ONEPASS_ARGS                                                                         \
    elem_t* __restrict__ y, i64 y_stride, const elem_t* __restrict__ x, i64 x_stride,        \
    const elem_t* __restrict__ pool, int H, const int* __restrict__ page_table,              \
    int num_slots, int max_rank, int pages_per_row, const int* __restrict__ ranks,           \
    const float* __restrict__ scales, const int* __restrict__ token_slots, int d_in,         \
    int d_out, const int* __restrict__ group, i64 table_stride

extern "C" __global__ void __launch_bounds__(256, 2) mbgmv_onepass(ONEPASS_ARGS)
{
    mbgmv_onepass_body<256, 2, 2>(y, y_stride, x, x_stride, pool, H, page_table, num_slots,
                                  max_rank, pages_per_row, ranks, scales, token_slots, d_in,
                                  d_out, group, table_stride);
}
