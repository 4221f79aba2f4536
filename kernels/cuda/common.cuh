// Shared by every slora kernel: the element type of one build, 16-byte vectors, conversions
// and the few PTX instructions we use. No CUDA headers: the sources build the same with nvcc
// and NVRTC, and on any toolkit layout.
//
// One build per element type: -DSLORA_BF16, -DSLORA_FP16 or -DSLORA_FP32. `elem_t` holds the
// raw bits; arithmetic is always float32.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#if defined(SLORA_BF16)
typedef u16 elem_t;
#define SLORA_HALF 1
__device__ __forceinline__ float to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 from_f32(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
// Two floats as one packed pair: `lo` in bits 0..15 (the lower address), `hi` above.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float lo_f32(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_f32(u32 w) { return __uint_as_float(w & 0xffff0000u); }
#elif defined(SLORA_FP16)
typedef u16 elem_t;
#define SLORA_HALF 1
__device__ __forceinline__ float to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 from_f32(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float lo_f32(u32 w) { return to_f32((u16)(w & 0xffffu)); }
__device__ __forceinline__ float hi_f32(u32 w) { return to_f32((u16)(w >> 16)); }
#elif defined(SLORA_FP32)
typedef float elem_t;
__device__ __forceinline__ float to_f32(float h) { return h; }
__device__ __forceinline__ float from_f32(float f) { return f; }
#else
#error "build with one of -DSLORA_BF16, -DSLORA_FP16, -DSLORA_FP32"
#endif

#define NEG_INF __int_as_float(0xff800000)

// Elements in one 16-byte vector: every kernel moves data 16 bytes per thread at a time.
#define VEC (16 / (int)sizeof(elem_t))

struct __align__(16) vec_t { u32 w[4]; };

__device__ __forceinline__ vec_t vzero() {
    vec_t v;
    v.w[0] = v.w[1] = v.w[2] = v.w[3] = 0u;
    return v;
}

// Plain 16-byte load (activations: may be re-read by other blocks, keep them cached).
__device__ __forceinline__ vec_t ld_vec(const void* p) {
    vec_t v;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}

// Streaming 16-byte load (pool rows read once by this block: don't keep them in L1).
__device__ __forceinline__ vec_t ld_stream(const void* p) {
    vec_t v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}

// Load/store of data this kernel also writes (y of the LoRA expand): coherent, no .nc.
__device__ __forceinline__ vec_t ld_rw(const void* p) {
    vec_t v;
    asm("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}

// Asks for the 128-byte line at p to be brought into L2; nothing comes back to the thread.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

// A float written by the kernel this one waited on (pdl_wait): read at L2, past L1.
__device__ __forceinline__ float ld_coherent_f32(const float* p) {
    float f;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(f) : "l"(p) : "memory");
    return f;
}

__device__ __forceinline__ void st_vec(void* p, const vec_t& v) {
    asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
}

// A vector's VEC elements as floats.
__device__ __forceinline__ void unpack(const vec_t& v, float (&f)[VEC]) {
#if defined(SLORA_FP32)
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(v.w[i]);
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = lo_f32(v.w[i]);
        f[2 * i + 1] = hi_f32(v.w[i]);
    }
#endif
}

__device__ __forceinline__ vec_t pack(const float (&f)[VEC]) {
    vec_t v;
#if defined(SLORA_FP32)
#pragma unroll
    for (int i = 0; i < 4; ++i) v.w[i] = __float_as_uint(f[i]);
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) v.w[i] = pack2(f[2 * i], f[2 * i + 1]);
#endif
    return v;
}

// sum_i a[i] * b[i] over one vector pair.
__device__ __forceinline__ float dot_vec(const vec_t& a, const vec_t& b) {
    float fa[VEC], fb[VEC];
    unpack(a, fa);
    unpack(b, fb);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) s = fmaf(fa[i], fb[i], s);
    return s;
}

// ---- programmatic dependent launch (Hopper; no-ops before sm_90) -------------------------
// A kernel launched with programmatic stream serialization (kernels/cuda_compile.py,
// launch(..., pdl=True)) may start while the kernel before it still runs: it reads only what was
// complete before that kernel began, then waits for it at pdl_wait(). The kernel before it lets
// it start with pdl_launch_dependents(). Without that launch attribute both are no-ops.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// pdl_wait() that also hands back p as the asm's output, so loads through the result cannot be
// hoisted above the wait: ld_vec and ld_rw are plain (non-volatile) asm without a memory
// clobber, which the compiler may otherwise move across it.
template <typename T>
__device__ __forceinline__ T* pdl_wait_for(T* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" : "+l"(p) :: "memory");
#endif
    return p;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---- tensor-core helpers (16-bit element types only) ----------------------------------------
#if defined(SLORA_HALF)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

// 16-byte asynchronous copy global -> shared; copies `src_bytes` (16 or 0) and zero-fills the
// rest, so masked rows land as zeros without a branch around the copy. The `_at` forms take
// a shared-memory address (smem_addr), for tiles laid out by address arithmetic (swizzled).
__device__ __forceinline__ void cp_async16_at(u32 saddr, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(saddr), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    cp_async16_at(smem_addr(smem), gmem, src_bytes);
}
// 4-byte variant (cp.async.ca: the only form below 16 bytes), for rows not 16-byte aligned.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_at(u32 (&r)[4], u32 saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr));
}
__device__ __forceinline__ void ldmatrix_x4_trans_at(u32 (&r)[4], u32 saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr));
}
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
    ldmatrix_x4_at(r, smem_addr(smem));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem) {
    ldmatrix_x4_trans_at(r, smem_addr(smem));
}

// d += a (16x16, row-major) * b (16x8, column-major), float32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if defined(SLORA_BF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

#endif  // SLORA_HALF
