#include "ckernels.h"
#include <string.h>

#if defined(__x86_64__) && defined(__ELF__)
#define CK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// The kernels that write bf16 bits have one more version, for CPUs with AVX512-BF16 (AMD Zen 4, Intel
// Cooper Lake and Sapphire Rapids on): it converts with the CPU's instruction (vcvtneps2bf16) instead of
// rounding the bits in integer arithmetic, and gives the same bits (ck_bf16_lanes).
#define CK_NATIVE_BF16 1
#define CK_NATIVE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define CK_CLONES
#define CK_NATIVE_BF16 0
#endif

static inline float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

// Swift's max(a, b) and min(a, b) for floats: the second operand where it compares so, else the first.
static inline float swift_max(float a, float b) { return b >= a ? b : a; }
static inline float swift_min(float a, float b) { return b < a ? b : a; }

// VectorMath.exp, operation for operation.
static inline float ck_exp(float input) {
    const float y = swift_min(swift_max(input, -87.0f), 88.0f);
    const float shifter = 12582912.0f;
    const float shifted = y * 1.4426950408889634f + shifter;
    const float n = shifted - shifter;
    const float r = y - n * 0.693359375f + n * 2.1219444005469058e-4f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float scale = bits_to_float((float_to_bits(shifted) - float_to_bits(shifter) + 127u) << 23);
    return input < -87.4f ? 0.0f : p * scale;
}

// VectorMath.normalCDFAndDensity.
static inline void ck_normal(float x, float *cdf, float *density) {
    const float gaussian = ck_exp(-0.5f * x * x);
    const float z = bits_to_float(float_to_bits(x) & 0x7fffffffu) * 0.7071067811865476f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    float q = 1.061405429f;
    q = q * t - 1.453152027f;
    q = q * t + 1.421413741f;
    q = q * t - 0.284496736f;
    q = q * t + 0.254829592f;
    const float half_tail = 0.5f * q * t * gaussian;
    *cdf = x < 0 ? half_tail : 1.0f - half_tail;
    *density = gaussian * 0.3989422804014327f;
}

CK_CLONES void ck_gelu_forward(float *y, const float *x, long count) {
    for (long i = 0; i < count; i++) {
        float cdf, density;
        ck_normal(x[i], &cdf, &density);
        y[i] = x[i] * cdf;
    }
}

CK_CLONES void ck_gelu_backward(float *dx, const float *dy, const float *x, long count, int accumulate) {
    if (accumulate) {
        for (long i = 0; i < count; i++) {
            float cdf, density;
            ck_normal(x[i], &cdf, &density);
            dx[i] += dy[i] * (cdf + x[i] * density);
        }
    } else {
        for (long i = 0; i < count; i++) {
            float cdf, density;
            ck_normal(x[i], &cdf, &density);
            dx[i] = dy[i] * (cdf + x[i] * density);
        }
    }
}

// BF16.round on the bits.
static inline uint32_t ck_round_bits(uint32_t b) {
    const uint32_t nan = (b | 0x00400000u) & 0xffff0000u;
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
    return (b & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}


enum { CK_LANES = 16, CK_BLOCK = CK_BLOCK_ROWS, CK_GROUP = 8 };

// 16 float lanes as one value (lowered to one AVX-512 register, two AVX2 or four SSE ones): the lanes'
// arithmetic is elementwise, so every clone computes the same sums.
typedef float ck_v16 __attribute__((vector_size(64), aligned(4)));
typedef int ck_i16 __attribute__((vector_size(64), aligned(4)));

// (Macros rather than functions: a function taking or returning ck_v16 would need one ABI per clone.)
#define ck_load(p) (*(const ck_v16 *)(p))
#define ck_v16_of(x) ((ck_v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})
#define ck_lane_total(lanes, total) do { float t_ = 0; for (int l_ = 0; l_ < CK_LANES; l_++) t_ += (lanes)[l_]; (total) = t_; } while (0)
// total = the sum of x[0..<count] in 16 lanes (element i of the whole vectors into lane i % 16, the tail into
// lanes 0, 1, ...), the lanes then added in order.
#define ck_row_total(x, count, total) do { \
    ck_v16 rl_ = {0}; long ri_ = 0; \
    for (; ri_ + CK_LANES <= (count); ri_ += CK_LANES) rl_ += ck_load((x) + ri_); \
    for (int l_ = 0; ri_ < (count); ri_++, l_++) rl_[l_] += (x)[ri_]; \
    ck_lane_total(rl_, total); \
} while (0)

// bf16 in 16 lanes: the bits of ck_round_bits (round to nearest even, a NaN stays a quiet NaN), and back.
typedef uint32_t ck_u16v __attribute__((vector_size(64), aligned(4)));
typedef uint16_t ck_h16 __attribute__((vector_size(32), aligned(2)));
// A float rounded to bf16 and back, in 16 lanes: ck_round_bits of each lane.
#define ck_round_v16(v) ({ \
    const ck_u16v b_ = (ck_u16v)(v); \
    const ck_u16v nan_ = (b_ | 0x00400000u) & 0xffff0000u, rounded_ = (b_ + 0x7fffu + ((b_ >> 16) & 1u)) & 0xffff0000u; \
    const ck_u16v is_nan_ = (ck_u16v)((b_ & 0x7fffffffu) > 0x7f800000u); \
    (ck_v16)((nan_ & is_nan_) | (rounded_ & ~is_nan_)); \
})
#if CK_NATIVE_BF16
typedef __bf16 ck_b16 __attribute__((vector_size(32), aligned(2)));
// The bf16 bits of 16 lanes, ck_round_bits of each. Where `ck_native` (a constant of the kernel's version)
// is set, by vcvtneps2bf16, which rounds to nearest even and quiets a NaN as ck_round_bits does, but reads
// a subnormal input as zero: a vector holding one takes the integer rounding instead.
#define ck_bf16_lanes(v) ({ \
    const ck_v16 s_ = (v); \
    ck_h16 h_; \
    if (ck_native && !__builtin_reduce_or((ck_u16v)(((ck_u16v)s_ & 0x7fffffffu) - 1u < 0x007fffffu))) \
        h_ = (ck_h16)__builtin_convertvector(s_, ck_b16); \
    else \
        h_ = __builtin_convertvector((ck_u16v)ck_round_v16(s_) >> 16, ck_h16); \
    h_; \
})
#else
#define ck_bf16_lanes(v) ((void)ck_native, __builtin_convertvector((ck_u16v)ck_round_v16(v) >> 16, ck_h16))
#endif
#define ck_store_bf16(p, v) (*(ck_h16 *)(p) = ck_bf16_lanes(v))
// A float rounded to bf16 and back, in 16 lanes, as ck_round_v16 (by ck_bf16_lanes).
#define ck_round_lanes(v) ((ck_v16)(__builtin_convertvector(ck_bf16_lanes(v), ck_u16v) << 16))
#define ck_load_bf16(p) ((ck_v16)(__builtin_convertvector(*(const ck_h16 *)(p), ck_u16v) << 16))
// 8 float lanes (one AVX2 register): the rows of oneDNN's nChw8c, one pixel's 8 channels of one group.
typedef float ck_v8 __attribute__((vector_size(32), aligned(4)));
typedef int ck_i8 __attribute__((vector_size(32), aligned(4)));
typedef uint32_t ck_u8v __attribute__((vector_size(32), aligned(4)));
typedef uint16_t ck_h8 __attribute__((vector_size(16), aligned(2)));
#define ck_load8(p) (*(const ck_v8 *)(p))
#define ck_load8_bf16(p) ((ck_v8)(__builtin_convertvector(*(const ck_h8 *)(p), ck_u8v) << 16))
// The 16-lane loads under their width, for the macros written for either (ck_v##W, ck_i##W, ck_load##W).
#define ck_load16(p) ck_load(p)
#define ck_load16_bf16(p) ck_load_bf16(p)
// 8 floats from p twice over (lanes l and l + 8 both p[l]): the per-channel values of two consecutive
// nChw8c rows, which 16 lanes then hold together.
#define ck_twice8(p) ({ const ck_v8 h_ = ck_load8(p); (ck_v16)__builtin_shufflevector(h_, h_, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7); })
static inline uint16_t ck_bf16_of(float f) { return (uint16_t)(ck_round_bits(float_to_bits(f)) >> 16); }
static inline float ck_float_of_bf16(uint16_t h) { return bits_to_float((uint32_t)h << 16); }
static inline float ck_rounded(float f) { return bits_to_float(ck_round_bits(float_to_bits(f))); }

// Whether the kernels that write bf16 bits run their native versions: where the CPU has AVX512-BF16
// (and the AVX-512 parts those versions use), unless ck_set_native_bf16(0) turned them off.
#if CK_NATIVE_BF16
int ck_native_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512dq");
}
#else
int ck_native_bf16_supported(void) { return 0; }
#endif
static int ck_native_state = -1;
static inline int ck_native_bf16(void) {
    int state = __atomic_load_n(&ck_native_state, __ATOMIC_RELAXED);
    if (state < 0) {
        state = ck_native_bf16_supported();
        __atomic_store_n(&ck_native_state, state, __ATOMIC_RELAXED);
    }
    return state;
}
int ck_set_native_bf16(int on) {
    const int state = on && ck_native_bf16_supported();
    __atomic_store_n(&ck_native_state, state, __ATOMIC_RELAXED);
    return state;
}
int ck_native_bf16_enabled(void) { return ck_native_bf16(); }

// A kernel that writes bf16 bits: CK_BF16_KERNEL(name, (parameters), (arguments)) { body }, the body
// seeing `ck_native` (1 in the version built for AVX512-BF16, 0 in the clones), and name() running the
// native version where ck_native_bf16() says so, else the clones; the same bits either way.
#define CK_EXPAND(...) __VA_ARGS__
#define CK_BF16_BODY(name, params) static inline __attribute__((always_inline)) void name##_body(const int ck_native, CK_EXPAND params)
#if CK_NATIVE_BF16
#define CK_BF16_KERNEL(name, params, args) \
    CK_BF16_BODY(name, params); \
    CK_CLONES static void name##_clones params { name##_body(0, CK_EXPAND args); } \
    CK_NATIVE static void name##_native params { name##_body(1, CK_EXPAND args); } \
    void name params { if (ck_native_bf16()) name##_native args; else name##_clones args; } \
    CK_BF16_BODY(name, params)
#else
#define CK_BF16_KERNEL(name, params, args) \
    CK_BF16_BODY(name, params); \
    void name params { name##_body(0, CK_EXPAND args); } \
    CK_BF16_BODY(name, params)
#endif

// Always inlined, so that each version of its callers vectorizes it for its own ISA.
static inline __attribute__((always_inline)) void ck_bits_run(const int ck_native, uint16_t *restrict dst, const float *restrict src, long count) {
    long i = 0;
    for (; i + CK_LANES <= count; i += CK_LANES) ck_store_bf16(dst + i, ck_load(src + i));
    for (; i < count; i++) dst[i] = ck_bf16_of(src[i]);
}

CK_BF16_KERNEL(ck_bf16_bits, (uint16_t *restrict dst, const float *restrict src, long count),
               (dst, src, count)) { ck_bits_run(ck_native, dst, src, count); }

CK_CLONES void ck_bf16_round(float *dst, const float *src, long count) {
    for (long i = 0; i < count; i++) dst[i] = ck_rounded(src[i]);
}

CK_CLONES void ck_blocked_sums(const float *restrict x, long count, double *sum, double *squares) {
    double total = 0, total_squares = 0;
    for (long start = 0; start < count; start += CK_BLOCK) {
        const long end = start + CK_BLOCK < count ? start + CK_BLOCK : count;
        ck_v16 s = {0}, q = {0};
        long i = start;
        for (; i + CK_LANES <= end; i += CK_LANES) { const ck_v16 v = ck_load(x + i); s += v; q += v * v; }
        for (int l = 0; i < end; i++, l++) { const float v = x[i]; s[l] += v; q[l] += v * v; }
        float block_sum, block_squares;
        ck_lane_total(s, block_sum);
        ck_lane_total(q, block_squares);
        total += (double)block_sum;
        total_squares += (double)block_squares;
    }
    *sum = total;
    *squares = total_squares;
}

// A batch norm's output before its ReLU, (x - mean) * scale + shift, from the centred value x - mean: one
// expression for the forward (ck_normalize_rows, ck_normalize_run) and for the ReLU's gate that the
// backward recomputes from the input (ck_blocked_gradient_sums, ck_channel_sums, ck_bn_gradient_rows),
// so both give the same bits (fp-contract is off, so neither fuses the multiply and the add).
#define CK_BN_SHIFTED(centered, scale, shift) ((centered) * (scale) + (shift))

CK_CLONES void ck_blocked_gradient_sums(const float *restrict dy, const float *restrict x, float mean, float inv_std, int relu,
                                        float scale, float shift, long count, double *sum, double *product) {
    double total = 0, total_product = 0;
    const ck_v16 zero = {0};
    for (long start = 0; start < count; start += CK_BLOCK) {
        const long end = start + CK_BLOCK < count ? start + CK_BLOCK : count;
        ck_v16 s = {0}, q = {0};
        long i = start;
        if (relu) {
            for (; i + CK_LANES <= end; i += CK_LANES) {
                // dy where the forward's output before its ReLU was positive, else +0 (the comparison gives
                // all-ones or zero lanes).
                const ck_v16 centered = ck_load(x + i) - mean;
                const ck_v16 g = (ck_v16)((ck_i16)ck_load(dy + i) & (CK_BN_SHIFTED(centered, scale, shift) > zero));
                s += g; q += g * centered;
            }
            for (int l = 0; i < end; i++, l++) {
                const float centered = x[i] - mean, g = CK_BN_SHIFTED(centered, scale, shift) > 0 ? dy[i] : 0.0f;
                s[l] += g; q[l] += g * centered;
            }
        } else {
            for (; i + CK_LANES <= end; i += CK_LANES) {
                const ck_v16 g = ck_load(dy + i);
                s += g; q += g * (ck_load(x + i) - mean);
            }
            for (int l = 0; i < end; i++, l++) { const float g = dy[i]; s[l] += g; q[l] += g * (x[i] - mean); }
        }
        float block_sum, block_product;
        ck_lane_total(s, block_sum);
        ck_lane_total(q, block_product);
        total += (double)block_sum;
        total_product += (double)block_product * (double)inv_std;
    }
    *sum = total;
    *product = total_product;
}

// One row of ck_softmax_rows. Always inlined, so that each clone of its callers vectorizes it.
static inline __attribute__((always_inline)) void ck_softmax_row(float *restrict row, const int32_t *restrict valid, long tokens) {
    // The maximum over valid keys (a NaN never replaces it), in 16 lanes and then across them: the same
    // value as one running maximum, whose chain of compares would not vectorize.
    const ck_v16 none = ck_v16_of(-__builtin_inff());
    ck_v16 lanes = none;
    long i = 0;
    for (; i + CK_LANES <= tokens; i += CK_LANES) {
        const ck_i16 keep = *(const ck_i16 *)(valid + i) != 0;
        const ck_i16 v = ((ck_i16)ck_load(row + i) & keep) | ((ck_i16)none & ~keep);
        const ck_i16 above = (ck_v16)v > lanes;
        lanes = (ck_v16)((v & above) | ((ck_i16)lanes & ~above));
    }
    float m = -__builtin_inff();
    for (int l = 0; l < CK_LANES; l++) m = lanes[l] > m ? lanes[l] : m;
    for (; i < tokens; i++) {
        const float v = valid[i] != 0 ? row[i] : -__builtin_inff();
        m = v > m ? v : m;
    }
    // e^(x - max) at valid keys, 0 at masked ones (a select: the loop vectorizes).
    for (long j = 0; j < tokens; j++) {
        const float e = ck_exp(row[j] - m);
        row[j] = valid[j] != 0 ? e : 0.0f;
    }
    float s;
    ck_row_total(row, tokens, s);
    const float inv = 1.0f / s;
    for (long k = 0; k < tokens; k++) row[k] *= inv;
}

CK_CLONES void ck_softmax_rows(float *restrict p, const int32_t *restrict valid, long rows, long tokens) {
    for (long i = 0; i < rows; i++) ck_softmax_row(p + i * tokens, valid, tokens);
}

// Philox4x32-10 on 32 blocks at a time: two independent sets of 16 lanes (lane l of set s is block 16 s + l).
enum { CK_PHILOX_BLOCKS = 32, CK_PHILOX_SETS = CK_PHILOX_BLOCKS / CK_LANES };
typedef uint64_t ck_q8 __attribute__((vector_size(64), aligned(8)));

// The 4 words of the Philox4x32-10 blocks first..first+31 of a stream, in element order:
// draws[4 * b + w] is word w of block first + b (philox4x32 in Random.swift). Each round's 32x32->64
// products are taken for the even lanes and the odd ones apart (one pmuludq each), and their low and
// high words put back into the lanes. Always inlined, so that each clone of its callers vectorizes it
// for its own ISA (a plain static function is compiled once, for the default one).
static inline __attribute__((always_inline)) void ck_philox_blocks(uint32_t *restrict draws, uint64_t first, uint64_t seed, uint64_t stream) {
    ck_u16v c0[CK_PHILOX_SETS], c1[CK_PHILOX_SETS], c2[CK_PHILOX_SETS], c3[CK_PHILOX_SETS];
    for (int s = 0; s < CK_PHILOX_SETS; s++) {
        for (int l = 0; l < CK_LANES; l++) {
            const uint64_t counter = first + (uint64_t)(CK_LANES * s + l);
            c0[s][l] = (uint32_t)counter; c1[s][l] = (uint32_t)(counter >> 32);
        }
        c2[s] = (ck_u16v){0} + (uint32_t)stream; c3[s] = (ck_u16v){0} + (uint32_t)(stream >> 32);
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const ck_q8 low = (ck_q8){0} + 0xFFFFFFFFull, high = (ck_q8){0} + 0xFFFFFFFF00000000ull;
    for (int round = 0; round < 10; round++) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        for (int s = 0; s < CK_PHILOX_SETS; s++) {
            const ck_q8 e0 = ((ck_q8)c0[s] & low) * 0xD2511F53ull, o0 = ((ck_q8)c0[s] >> 32) * 0xD2511F53ull;
            const ck_q8 e2 = ((ck_q8)c2[s] & low) * 0xCD9E8D57ull, o2 = ((ck_q8)c2[s] >> 32) * 0xCD9E8D57ull;
            const ck_u16v lo0 = (ck_u16v)((e0 & low) | (o0 << 32)), hi0 = (ck_u16v)((e0 >> 32) | (o0 & high));
            const ck_u16v lo2 = (ck_u16v)((e2 & low) | (o2 << 32)), hi2 = (ck_u16v)((e2 >> 32) | (o2 & high));
            const ck_u16v n0 = hi2 ^ c1[s] ^ k0, n2 = hi0 ^ c3[s] ^ k1;
            c1[s] = lo2; c3[s] = lo0; c0[s] = n0; c2[s] = n2;
        }
    }
    for (int s = 0; s < CK_PHILOX_SETS; s++) {
        for (int l = 0; l < CK_LANES; l++) {
            uint32_t *restrict d = draws + 4 * (CK_LANES * s + l);
            d[0] = c0[s][l]; d[1] = c1[s][l]; d[2] = c2[s][l]; d[3] = c3[s][l];
        }
    }
}

// The dropout pass over the stream's elements [start, end), out and in pointing at element start, both
// directions (`backward` a constant in each caller, so each clone compiles two loops without the
// branch): forward out = keep ? in * scale : 0; backward out += in * scale where kept.
static inline __attribute__((always_inline)) void ck_dropout(float *out, const float *in, long start, long end, uint64_t seed,
                                                              uint64_t stream, uint32_t limit, float scale, int backward) {
    uint32_t draws[4 * CK_PHILOX_BLOCKS];
    for (long block = start / 4; block * 4 < end; block += CK_PHILOX_BLOCKS) {
        ck_philox_blocks(draws, (uint64_t)block, seed, stream);
        const long base = block * 4, lo = base > start ? base : start;
        const long hi = base + 4 * CK_PHILOX_BLOCKS < end ? base + 4 * CK_PHILOX_BLOCKS : end;
        for (long i = lo; i < hi; i++) {
            const long o = i - start;
            const float kept = backward ? out[o] + in[o] * scale : in[o] * scale, dropped = backward ? out[o] : 0.0f;
            out[o] = draws[i - base] >= limit ? kept : dropped;
        }
    }
}

CK_CLONES void ck_dropout_forward(float *out, const float *in, long start, long end, uint64_t seed, uint64_t stream, uint32_t limit,
                                  float scale) {
    ck_dropout(out + start, in + start, start, end, seed, stream, limit, scale, 0);
}

CK_CLONES void ck_dropout_backward(float *dx, const float *dy, long start, long end, uint64_t seed, uint64_t stream, uint32_t limit,
                                   float scale) {
    ck_dropout(dx + start, dy + start, start, end, seed, stream, limit, scale, 1);
}

// BatchNorm over rows of channels (NHWC, nChw16c, nChw8c: `LaneLayout` in ChannelsLast.swift). The
// kernels take the lanes in chunks of 16. A row of one chunk (nChw16c) is walked down all its rows with the
// chunk's per-channel values in registers; rows of several chunks (NHWC) are taken in order, all of a
// row's chunks at once (the sums: a block's rows, up to CK_GROUP chunks at a time in registers), so that
// each row is read from memory once. Rows of 8 lanes (nChw8c) are walked down too: the sums in 8 lanes,
// the pointwise passes two rows at a time in 16. Every lane's arithmetic, and its order over the rows, is
// the same either way. The sums take 8 lanes past the last whole chunk as one more chunk; lanes past
// the chunks run one at a time with the same arithmetic.

// x16, dy16: x, dy as bf16 bits instead of floats (x, dy then NULL), the values the floats would hold; W
// lanes from element o (16 or 8).
#define CK_X(W, o) (x16 ? ck_load##W##_bf16(x16 + (o)) : ck_load##W(x + (o)))
#define CK_XS(o) (x16 ? ck_float_of_bf16(x16[o]) : x[o])
#define CK_DY(W, o) (dy16 ? ck_load##W##_bf16(dy16 + (o)) : ck_load##W(dy + (o)))
#define CK_DYS(o) (dy16 ? ck_float_of_bf16(dy16[o]) : dy[o])
// One chunk's terms at element o (W lanes) into its sums a and b, for each kind of ck_channel_sums:
// x and x^2; dy and dy (x - mean); the gated dy and dy (x - mean) (mu, sc, sh: the chunk's mean and gate).
#define CK_SUMS_X(W, a, b, o) do { const ck_v##W v_ = CK_X(W, o); a += v_; b += v_ * v_; } while (0)
#define CK_SUMS_DY(W, a, b, o, mu) do { const ck_v##W g_ = CK_DY(W, o); a += g_; b += g_ * (CK_X(W, o) - (mu)); } while (0)
#define CK_SUMS_GATED(W, a, b, o, mu, sc, sh) do { \
    const ck_v##W centered_ = CK_X(W, o) - (mu); \
    const ck_v##W g_ = (ck_v##W)((ck_i##W)CK_DY(W, o) & (CK_BN_SHIFTED(centered_, sc, sh) > (ck_v##W){0})); \
    a += g_; b += g_ * centered_; \
} while (0)
// The sums of Q chunks (W lanes each from channel c) over the rows [start, end) of one block, in registers,
// then added to first and second in double.
#define CK_SUMS_BLOCK(W, Q, c, start, end) do { \
    ck_v##W a_[Q] = {{0}}, b_[Q] = {{0}}, mu_[Q], sc_[Q], sh_[Q]; \
    for (int q_ = 0; q_ < (Q); q_++) { \
        mu_[q_] = gradient ? ck_load##W(mean + (c) + q_ * (W)) : (ck_v##W){0}; \
        sc_[q_] = gate_scale ? ck_load##W(gate_scale + (c) + q_ * (W)) : (ck_v##W){0}; \
        sh_[q_] = gate_scale ? ck_load##W(gate_shift + (c) + q_ * (W)) : (ck_v##W){0}; \
    } \
    if (!gradient) { \
        for (long r_ = (start); r_ < (end); r_++) \
            for (int q_ = 0; q_ < (Q); q_++) CK_SUMS_X(W, a_[q_], b_[q_], r_ * stride + (c) + q_ * (W)); \
    } else if (gate_scale) { \
        for (long r_ = (start); r_ < (end); r_++) \
            for (int q_ = 0; q_ < (Q); q_++) CK_SUMS_GATED(W, a_[q_], b_[q_], r_ * stride + (c) + q_ * (W), mu_[q_], sc_[q_], sh_[q_]); \
    } else { \
        for (long r_ = (start); r_ < (end); r_++) \
            for (int q_ = 0; q_ < (Q); q_++) CK_SUMS_DY(W, a_[q_], b_[q_], r_ * stride + (c) + q_ * (W), mu_[q_]); \
    } \
    for (int q_ = 0; q_ < (Q); q_++) \
        for (int l_ = 0; l_ < (W); l_++) { \
            first[(c) + q_ * (W) + l_] += (double)a_[q_][l_]; \
            second[(c) + q_ * (W) + l_] += (double)b_[q_][l_]; \
        } \
} while (0)
// Sums over `rows` rows (stride `stride` floats) of lanes 0..<width, as channelBlockedSums: float lanes
// inside blocks of 256 rows, double across blocks. Without dy: sum(x), sum(x^2). With dy: sum(g) and
// sum(g * (x - mean[l])), g = dy, or with gate_scale (a ReLU fused after the forward) dy where the
// forward's output before it, CK_BN_SHIFTED(x - mean[l], gate_scale[l], gate_shift[l]), was positive.
CK_CLONES void ck_channel_sums(const float *restrict x, const uint16_t *restrict x16, const float *restrict dy, const uint16_t *restrict dy16,
                               const float *restrict mean,
                               const float *restrict gate_scale, const float *restrict gate_shift, long rows, long stride, long width,
                               double *restrict first, double *restrict second) {
    const int gradient = dy || dy16;
    // Chunks of 16 lanes, then one of 8 where 8 or more lanes are left (nChw8c's rows are one such).
    const long whole = width / CK_LANES * CK_LANES, vectors = width - whole >= 8 ? whole + 8 : whole;
    for (long j = 0; j < vectors; j++) first[j] = second[j] = 0;
    if (whole > CK_LANES) {
        // Rows of several chunks (NHWC): block by block, CK_GROUP chunks at a time down the block's rows,
        // so that the block's rows are read from memory once (the next chunks find them in cache) rather
        // than once per chunk. Each lane adds its rows in the same order either way: the same sums.
        for (long start = 0; start < rows; start += CK_BLOCK) {
            const long end = start + CK_BLOCK < rows ? start + CK_BLOCK : rows;
            long c = 0;
            for (; c + CK_GROUP * CK_LANES <= whole; c += CK_GROUP * CK_LANES) CK_SUMS_BLOCK(16, CK_GROUP, c, start, end);
            if (c + 4 * CK_LANES <= whole) { CK_SUMS_BLOCK(16, 4, c, start, end); c += 4 * CK_LANES; }
            if (c + 2 * CK_LANES <= whole) { CK_SUMS_BLOCK(16, 2, c, start, end); c += 2 * CK_LANES; }
            for (; c < whole; c += CK_LANES) CK_SUMS_BLOCK(16, 1, c, start, end);
            if (vectors > whole) CK_SUMS_BLOCK(8, 1, whole, start, end);
        }
    } else {
        for (long c = 0; c < whole; c += CK_LANES)
            for (long start = 0; start < rows; start += CK_BLOCK) {
                const long end = start + CK_BLOCK < rows ? start + CK_BLOCK : rows;
                CK_SUMS_BLOCK(16, 1, c, start, end);
            }
        if (vectors > whole)
            for (long start = 0; start < rows; start += CK_BLOCK) {
                const long end = start + CK_BLOCK < rows ? start + CK_BLOCK : rows;
                CK_SUMS_BLOCK(8, 1, whole, start, end);
            }
    }
    for (long j = vectors; j < width; j++) {
        double f = 0, s = 0;
        for (long start = 0; start < rows; start += CK_BLOCK) {
            const long end = start + CK_BLOCK < rows ? start + CK_BLOCK : rows;
            float a = 0, b = 0;
            for (long r = start; r < end; r++) {
                const long o = r * stride + j;
                if (!gradient) { const float v = CK_XS(o); a += v; b += v * v; }
                else {
                    const float centered = CK_XS(o) - mean[j];
                    const float g = !gate_scale || CK_BN_SHIFTED(centered, gate_scale[j], gate_shift[j]) > 0 ? CK_DYS(o) : 0.0f;
                    a += g; b += g * centered;
                }
            }
            f += (double)a; s += (double)b;
        }
        first[j] = f; second[j] = s;
    }
}

// One chunk of one row of ck_normalize_rows (mu, sc, sh: the chunk's per-channel values).
#define CK_NORMALIZE_CHUNK(o, mu, sc, sh) do { \
    const ck_v16 a_ = CK_BN_SHIFTED(CK_X(16, o) - (mu), sc, sh); \
    /* Swift's max(v, 0): 0 where 0 >= v, else v (NaN stays). */ \
    const ck_v16 v_ = relu ? (ck_v16)((ck_i16)a_ & ~(zero >= a_)) : a_; \
    if (y) *(ck_v16 *)(y + (o)) = v_; \
    if (y16) ck_store_bf16(y16 + (o), v_); \
} while (0)
// y = (x - mean[l]) * scale[l] + shift[l] over rows x lanes (contiguous), max(that, 0) with relu.
CK_BF16_KERNEL(ck_normalize_rows, (float *restrict y, uint16_t *restrict y16, const float *restrict x, const uint16_t *restrict x16,
                                   long rows, long lanes, const float *restrict mean, const float *restrict scale, const float *restrict shift,
                                   int relu),
               (y, y16, x, x16, rows, lanes, mean, scale, shift, relu)) {
    const ck_v16 zero = {0};
    const long whole = lanes / CK_LANES * CK_LANES;
    if (whole > CK_LANES) {
        // Rows of several chunks (NHWC): row after row, so that the rows are read and written in order.
        for (long r = 0; r < rows; r++)
            for (long j0 = 0; j0 < whole; j0 += CK_LANES)
                CK_NORMALIZE_CHUNK(r * lanes + j0, ck_load(mean + j0), ck_load(scale + j0), ck_load(shift + j0));
    } else if (lanes == 8) {
        // nChw8c: two rows in 16 lanes, the per-channel values twice over (an odd count's last row below).
        const ck_v16 mu = ck_twice8(mean), sc = ck_twice8(scale), sh = ck_twice8(shift);
        for (long r = 0; r + 2 <= rows; r += 2) CK_NORMALIZE_CHUNK(r * 8, mu, sc, sh);
    } else {
        for (long j0 = 0; j0 < whole; j0 += CK_LANES) {
            const ck_v16 mu = ck_load(mean + j0), sc = ck_load(scale + j0), sh = ck_load(shift + j0);
            for (long r = 0; r < rows; r++) CK_NORMALIZE_CHUNK(r * lanes + j0, mu, sc, sh);
        }
    }
    // What no chunk covered: the lanes past the whole chunks, or with 8 lanes an odd count's last row.
    const long j_rest = lanes == 8 ? 0 : whole, r_rest = lanes == 8 ? rows / 2 * 2 : 0;
    for (long j = j_rest; j < lanes; j++) {
        for (long r = r_rest; r < rows; r++) {
            const float a = CK_BN_SHIFTED(CK_XS(r * lanes + j) - mean[j], scale[j], shift[j]), v = relu ? swift_max(a, 0.0f) : a;
            if (y) y[r * lanes + j] = v;
            if (y16) y16[r * lanes + j] = ck_bf16_of(v);
        }
    }
}

CK_CLONES void ck_normalize_run(float *restrict y, const float *restrict x, long count, float mean, float scale, float shift, int relu) {
    if (relu) {
        for (long i = 0; i < count; i++) y[i] = swift_max(CK_BN_SHIFTED(x[i] - mean, scale, shift), 0.0f);
    } else {
        for (long i = 0; i < count; i++) y[i] = CK_BN_SHIFTED(x[i] - mean, scale, shift);
    }
}

// One chunk of one row of ck_bn_gradient_rows (the chunk's per-channel values: kv, sd, sx, mu, is, sc, sh).
#define CK_BN_GRADIENT_CHUNK(o, kv, sd, sx, mu, is, sc, sh) do { \
    const ck_v16 d_ = CK_DY(16, o), centered_ = sum_dy || gate_scale ? CK_X(16, o) - (mu) : zero; \
    const ck_v16 g_ = gate_scale ? (ck_v16)((ck_i16)d_ & (CK_BN_SHIFTED(centered_, sc, sh) > zero)) : d_; \
    const ck_v16 v_ = sum_dy ? (kv) * (m * g_ - (sd) - centered_ * (is) * (sx)) : g_ * (kv); \
    if (dx16) ck_store_bf16(dx16 + (o), v_); \
    else *(ck_v16 *)(dx + (o)) = accumulate ? ck_load(dx + (o)) + v_ : v_; \
} while (0)
// The chunk's per-channel values from channel j0 on (zero where the pass takes none).
#define CK_BN_GRADIENT_VALUES(j0) \
    const ck_v16 kv = ck_load(k + (j0)); \
    const ck_v16 sd = sum_dy ? ck_load(sum_dy + (j0)) : zero, sx = sum_dy ? ck_load(sum_dyx + (j0)) : zero; \
    const ck_v16 mu = sum_dy || gate_scale ? ck_load(mean + (j0)) : zero, is = sum_dy ? ck_load(inv_std + (j0)) : zero; \
    const ck_v16 sc = gate_scale ? ck_load(gate_scale + (j0)) : zero, sh = gate_scale ? ck_load(gate_shift + (j0)) : zero
// BatchNorm's input gradient over rows x lanes (contiguous), g = dy, or with gate_scale dy where the
// forward's output before its ReLU was positive (as ck_channel_sums, about mean[l]): training (sum_dy
// given) k[l] * (m * g - sum_dy[l] - (x - mean[l]) * inv_std[l] * sum_dyx[l]); evaluation (sum_dy NULL)
// g * k[l]. dx is overwritten, or added to with accumulate. dy16: dy as bf16 bits (dy then NULL).
CK_BF16_KERNEL(ck_bn_gradient_rows, (float *restrict dx, uint16_t *restrict dx16, const float *restrict dy, const uint16_t *restrict dy16,
                                     const float *restrict x,
                                     const uint16_t *restrict x16, long rows, long lanes, const float *restrict k, const float *restrict sum_dy,
                                     const float *restrict sum_dyx, const float *restrict mean, const float *restrict inv_std,
                                     const float *restrict gate_scale, const float *restrict gate_shift, float m, int accumulate),
               (dx, dx16, dy, dy16, x, x16, rows, lanes, k, sum_dy, sum_dyx, mean, inv_std, gate_scale, gate_shift, m, accumulate)) {
    const ck_v16 zero = {0};
    const long whole = lanes / CK_LANES * CK_LANES;
    if (whole > CK_LANES) {
        // Rows of several chunks (NHWC): row after row, so that the rows are read and written in order.
        for (long r = 0; r < rows; r++)
            for (long j0 = 0; j0 < whole; j0 += CK_LANES) {
                CK_BN_GRADIENT_VALUES(j0);
                CK_BN_GRADIENT_CHUNK(r * lanes + j0, kv, sd, sx, mu, is, sc, sh);
            }
    } else if (lanes == 8) {
        // nChw8c: two rows in 16 lanes, as ck_normalize_rows.
        const ck_v16 kv = ck_twice8(k);
        const ck_v16 sd = sum_dy ? ck_twice8(sum_dy) : zero, sx = sum_dy ? ck_twice8(sum_dyx) : zero;
        const ck_v16 mu = sum_dy || gate_scale ? ck_twice8(mean) : zero, is = sum_dy ? ck_twice8(inv_std) : zero;
        const ck_v16 sc = gate_scale ? ck_twice8(gate_scale) : zero, sh = gate_scale ? ck_twice8(gate_shift) : zero;
        for (long r = 0; r + 2 <= rows; r += 2) CK_BN_GRADIENT_CHUNK(r * 8, kv, sd, sx, mu, is, sc, sh);
    } else {
        for (long j0 = 0; j0 < whole; j0 += CK_LANES) {
            CK_BN_GRADIENT_VALUES(j0);
            for (long r = 0; r < rows; r++) CK_BN_GRADIENT_CHUNK(r * lanes + j0, kv, sd, sx, mu, is, sc, sh);
        }
    }
    const long j_rest = lanes == 8 ? 0 : whole, r_rest = lanes == 8 ? rows / 2 * 2 : 0;
    for (long j = j_rest; j < lanes; j++) {
        for (long r = r_rest; r < rows; r++) {
            const long o = r * lanes + j;
            const float centered = sum_dy || gate_scale ? CK_XS(o) - mean[j] : 0.0f;
            const float g = !gate_scale || CK_BN_SHIFTED(centered, gate_scale[j], gate_shift[j]) > 0 ? CK_DYS(o) : 0.0f;
            const float v = sum_dy ? k[j] * (m * g - sum_dy[j] - centered * inv_std[j] * sum_dyx[j]) : g * k[j];
            if (dx16) dx16[o] = ck_bf16_of(v);
            else dx[o] = accumulate ? dx[o] + v : v;
        }
    }
}

CK_CLONES void ck_bn_gradient_run(float *restrict dx, const float *restrict dy, const float *restrict x, long count, float k, int training,
                                  float m, float sum_dy, float sum_dyx, float mean, float inv_std, int relu, float scale, float shift,
                                  int accumulate) {
    for (long i = 0; i < count; i++) {
        const float centered = x[i] - mean;
        const float g = !relu || CK_BN_SHIFTED(centered, scale, shift) > 0 ? dy[i] : 0.0f;
        const float v = training ? k * (m * g - sum_dy - centered * inv_std * sum_dyx) : g * k;
        dx[i] = accumulate ? dx[i] + v : v;
    }
}

// A residual block's end, y = max(a + b, 0) (Swift's max: NaN stays), a and b each read from its bf16
// bits where a16 or b16 is given, else from its floats. With round (a bf16 pass, whose residual stream
// holds bf16 values as autocast's does), float inputs are rounded to bf16 first and the output after,
// so the floats and the bits paths give the same values. The output into y (floats) and its bf16 bits
// into y16, each where given (y may alias a or b).
CK_BF16_KERNEL(ck_residual_relu, (float *y, uint16_t *restrict y16, const float *a, const uint16_t *restrict a16, const float *b,
                                  const uint16_t *restrict b16, int round, long count),
               (y, y16, a, a16, b, b16, round, count)) {
    const ck_v16 zero = {0};
    long i = 0;
    for (; i + CK_LANES <= count; i += CK_LANES) {
        ck_v16 va = a16 ? ck_load_bf16(a16 + i) : ck_load(a + i), vb = b16 ? ck_load_bf16(b16 + i) : ck_load(b + i);
        if (round && !a16) va = ck_round_lanes(va);
        if (round && !b16) vb = ck_round_lanes(vb);
        const ck_v16 s = va + vb;
        ck_v16 v = (ck_v16)((ck_i16)s & ~(zero >= s));
        if (round) v = ck_round_lanes(v);
        if (y) *(ck_v16 *)(y + i) = v;
        if (y16) ck_store_bf16(y16 + i, v);
    }
    for (; i < count; i++) {
        float va = a16 ? ck_float_of_bf16(a16[i]) : a[i], vb = b16 ? ck_float_of_bf16(b16[i]) : b[i];
        if (round && !a16) va = ck_rounded(va);
        if (round && !b16) vb = ck_rounded(vb);
        float v = swift_max(va + vb, 0.0f);
        if (round) v = ck_rounded(v);
        if (y) y[i] = v;
        if (y16) y16[i] = ck_bf16_of(v);
    }
}

// Its backward: g = dy (+ dy2, the output's gradient in two parts) where y > 0, else 0; branch = g;
// identity = g, or += g with accumulate. dy, dy2 and y are read from their bf16 bits where dy16, dy2_16
// and y16 are given. With round (a bf16 pass, whose residual stream's gradients are bf16 values as
// autocast's are), float parts are rounded to bf16 before the sum and the sum after, so the floats and
// the bits paths give the same values.
CK_BF16_KERNEL(ck_residual_relu_backward, (float *restrict branch, uint16_t *restrict branch16, float *restrict identity,
                                           uint16_t *restrict identity16, int accumulate, const float *restrict dy,
                                           const uint16_t *restrict dy16, const float *restrict dy2, const uint16_t *restrict dy2_16,
                                           int round, const float *restrict y, const uint16_t *restrict y16, long count),
               (branch, branch16, identity, identity16, accumulate, dy, dy16, dy2, dy2_16, round, y, y16, count)) {
    const ck_v16 zero = {0};
    const int parts = dy2 || dy2_16;
    long i = 0;
    for (; i + CK_LANES <= count; i += CK_LANES) {
        ck_v16 d = dy16 ? ck_load_bf16(dy16 + i) : ck_load(dy + i);
        if (round && !dy16) d = ck_round_lanes(d);
        if (parts) {
            ck_v16 d2 = dy2_16 ? ck_load_bf16(dy2_16 + i) : ck_load(dy2 + i);
            if (round && !dy2_16) d2 = ck_round_lanes(d2);
            d += d2;
            if (round) d = ck_round_lanes(d);
        }
        const ck_v16 out = y16 ? ck_load_bf16(y16 + i) : ck_load(y + i);
        const ck_v16 g = (ck_v16)((ck_i16)d & (out > zero));
        if (branch16) ck_store_bf16(branch16 + i, g);
        else *(ck_v16 *)(branch + i) = g;
        if (identity16) ck_store_bf16(identity16 + i, g);
        else *(ck_v16 *)(identity + i) = accumulate ? ck_load(identity + i) + g : g;
    }
    for (; i < count; i++) {
        float d = dy16 ? ck_float_of_bf16(dy16[i]) : dy[i];
        if (round && !dy16) d = ck_rounded(d);
        if (parts) {
            float d2 = dy2_16 ? ck_float_of_bf16(dy2_16[i]) : dy2[i];
            if (round && !dy2_16) d2 = ck_rounded(d2);
            d += d2;
            if (round) d = ck_rounded(d);
        }
        const float out = y16 ? ck_float_of_bf16(y16[i]) : y[i];
        const float g = out > 0 ? d : 0.0f;
        if (branch16) branch16[i] = ck_bf16_of(g);
        else branch[i] = g;
        if (identity16) identity16[i] = ck_bf16_of(g);
        else identity[i] = accumulate ? identity[i] + g : g;
    }
}

// One output pixel's W lanes from channel j0 on (16 or 8: nChw8c's rows) of ck_maxpool_rows.
#define CK_MAXPOOL_CHUNK(W, j0) do { \
    ck_v##W best_ = {0}; \
    ck_i##W at_ = {0}; \
    best_ -= __builtin_inff(); \
    at_ += (int)(y0 * width + x0); \
    for (long iy = y0; iy < y1; iy++) { \
        for (long ix = x0; ix < x1; ix++) { \
            const ck_v##W v_ = ck_load##W(x + ((n * height + iy) * width + ix) * lanes + (j0)); \
            const ck_i##W take_ = (v_ > best_) | (v_ != v_); \
            best_ = (ck_v##W)(((ck_i##W)v_ & take_) | ((ck_i##W)best_ & ~take_)); \
            at_ = ((int)(iy * width + ix) & take_) | (at_ & ~take_); \
        } \
    } \
    *(ck_v##W *)(out + (j0)) = best_; \
    *(ck_i##W *)(where + (j0)) = at_; \
} while (0)
// Max pool over rows of `lanes` channels (NHWC; nChw16c and nChw8c as NHWC images of 16 or 8 channels):
// the output rows first_row..<last_row (row = image * oh + oy) of y [images, oh, ow, lanes] and idx (the
// argmax as y * W + x in the image's plane), as MaxPool2d.forwardNHWC: a larger value or a NaN takes the
// place, taps in row-major order, ties to the first.
CK_CLONES void ck_maxpool_rows(float *restrict y, int32_t *restrict idx, const float *restrict x, long height, long width, long lanes,
                               long oh, long ow, long kernel, long stride, long padding, long first_row, long last_row) {
    for (long item = first_row; item < last_row; item++) {
        const long n = item / oh, oy = item % oh;
        const long y0 = oy * stride - padding > 0 ? oy * stride - padding : 0;
        const long y1 = oy * stride - padding + kernel < height ? oy * stride - padding + kernel : height;
        for (long ox = 0; ox < ow; ox++) {
            const long x0 = ox * stride - padding > 0 ? ox * stride - padding : 0;
            const long x1 = ox * stride - padding + kernel < width ? ox * stride - padding + kernel : width;
            float *restrict out = y + ((n * oh + oy) * ow + ox) * lanes;
            int32_t *restrict where = idx + ((n * oh + oy) * ow + ox) * lanes;
            long j0 = 0;
            for (; j0 + CK_LANES <= lanes; j0 += CK_LANES) CK_MAXPOOL_CHUNK(16, j0);
            if (j0 + 8 <= lanes) { CK_MAXPOOL_CHUNK(8, j0); j0 += 8; }
            for (long j = j0; j < lanes; j++) {
                float best = -__builtin_inff();
                int32_t at = (int32_t)(y0 * width + x0);
                for (long iy = y0; iy < y1; iy++) {
                    for (long ix = x0; ix < x1; ix++) {
                        const float v = x[((n * height + iy) * width + ix) * lanes + j];
                        if (v > best || v != v) { best = v; at = (int32_t)(iy * width + ix); }
                    }
                }
                out[j] = best;
                where[j] = at;
            }
        }
    }
}

// LayerNorm forward over rows x features: mean and variance (biased) of each row summed in 16 float
// lanes, y = (x - mean) * inv_std * gamma + beta; mean and inv_std kept per row.
// One row of LayerNorm: the mean and the biased variance each summed in 16 lanes.
static inline __attribute__((always_inline)) void ck_layernorm_row(float *restrict yr, float *restrict mean, float *restrict inv_std,
                                                                    const float *restrict xr, const float *restrict gamma,
                                                                    const float *restrict beta, long features, float eps) {
    const float n = (float)features;
    float s;
    ck_row_total(xr, features, s);
    const float m = s / n;
    ck_v16 squares = {0};
    long i = 0;
    for (; i + CK_LANES <= features; i += CK_LANES) { const ck_v16 d = ck_load(xr + i) - m; squares += d * d; }
    for (int l = 0; i < features; i++, l++) { const float d = xr[i] - m; squares[l] += d * d; }
    float v;
    ck_lane_total(squares, v);
    const float rstd = 1.0f / __builtin_sqrtf(v / n + eps);
    *mean = m;
    *inv_std = rstd;
    for (long k = 0; k < features; k++) yr[k] = (xr[k] - m) * rstd * gamma[k] + beta[k];
}

CK_CLONES void ck_layernorm_rows(float *restrict y, float *restrict mean, float *restrict inv_std, const float *restrict x,
                                 const float *restrict gamma, const float *restrict beta, long rows, long features, float eps) {
    for (long r = 0; r < rows; r++) {
        ck_layernorm_row(y + r * features, mean + r, inv_std + r, x + r * features, gamma, beta, features, eps);
    }
}

CK_BF16_KERNEL(ck_residual_layernorm_rows, (float *restrict sum, float *restrict y, uint16_t *restrict y16, float *restrict mean,
                                            float *restrict inv_std, const float *restrict dense, const float *restrict residual,
                                            const float *restrict gamma, const float *restrict beta, long rows, long features, float eps,
                                            int dropout, long first, uint64_t seed, uint64_t stream, uint32_t limit, float scale),
               (sum, y, y16, mean, inv_std, dense, residual, gamma, beta, rows, features, eps, dropout, first, seed, stream, limit, scale)) {
    // Without sum, each row's sum in a row of its own (on the stack).
    float row[sum ? 1 : features];
    for (long r = 0; r < rows; r++) {
        float *restrict s = sum ? sum + r * features : row;
        const float *restrict d = dense + r * features, *restrict x = residual + r * features;
        if (dropout) {
            const long start = first + r * features;
            ck_dropout(s, d, start, start + features, seed, stream, limit, scale, 0);
            for (long i = 0; i < features; i++) s[i] = s[i] + x[i];
        } else {
            for (long i = 0; i < features; i++) s[i] = d[i] + x[i];
        }
        float *restrict yr = y + r * features;
        ck_layernorm_row(yr, mean + r, inv_std + r, s, gamma, beta, features, eps);
        if (y16) ck_bits_run(ck_native, y16 + r * features, yr, features);
    }
}

CK_BF16_KERNEL(ck_gelu_forward_bf16, (uint16_t *restrict y16, const float *restrict x, const uint16_t *restrict x16, long count),
               (y16, x, x16, count)) {
    long i = 0;
    for (; i + CK_LANES <= count; i += CK_LANES) {
        float y[CK_LANES], in[CK_LANES];
        if (x16) *(ck_v16 *)in = ck_load_bf16(x16 + i);
        else *(ck_v16 *)in = ck_load(x + i);
        for (int l = 0; l < CK_LANES; l++) {
            float cdf, density;
            ck_normal(in[l], &cdf, &density);
            y[l] = in[l] * cdf;
        }
        ck_store_bf16(y16 + i, ck_load(y));
    }
    for (; i < count; i++) {
        const float v = x16 ? ck_float_of_bf16(x16[i]) : x[i];
        float cdf, density;
        ck_normal(v, &cdf, &density);
        y16[i] = ck_bf16_of(v * cdf);
    }
}

// The optimizer's passes over the arena (Optimizers.swift, GradientSync.swift, Arena.swift).

// One element of Adam's update (the vector loop's arithmetic, lane by lane); returns the new p.
static inline float ck_adam_one(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, float step_size,
                                float bias2_sqrt, float b2, float eps, float one_minus_b1, float one_minus_b2, float shrink, float l2,
                                int decoupled) {
    float pi = *p;
    if (decoupled) pi *= shrink;
    const float gi = *g + l2 * pi;
    const float mi = *m + one_minus_b1 * (gi - *m);
    const float vi = *v * b2 + one_minus_b2 * gi * gi;
    *m = mi;
    *v = vi;
    const float denom = __builtin_sqrtf(vi) / bias2_sqrt + eps;
    return *p = pi - step_size * (mi / denom);
}

typedef float ck_v16a __attribute__((vector_size(64), aligned(64)));

// One Adam(W) update of p, m, v over count elements, torch.optim's single-tensor arithmetic in fp32 as
// `Adam.step` writes it (the Swift loop this replaces, bit for bit: the same operations in the same
// order; vector square roots and divisions round as the scalar ones): with decoupled, p *= shrink
// first; g' = g + l2 * p; m = m + (1 - b1) * (g' - m); v = v * b2 + (1 - b2) * g' * g';
// p -= step_size * (m / (sqrt(v) / bias2_sqrt + eps)).
// Each new p[i] also goes to mirrors[k][mirror_offset + i] (other copies of the parameters); returns
// how many new p are NaN or infinite. The elements are taken one at a time until p + i is 64-byte
// aligned, then 16 at a time: the same arithmetic either way, so the result does not depend on where a
// range starts.
// Mirrors at p's alignment get the vector stores as non-temporal ones (nothing reads them before the
// next step), others ordinary stores; an sfence ends the mirrors' stores.
CK_CLONES long ck_adam(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, long count, float step_size,
                       float bias2_sqrt, float b2, float eps, float one_minus_b1, float one_minus_b2, float shrink, float l2,
                       int decoupled, float *const *mirrors, long mirror_count, long mirror_offset) {
    long i = 0, bad = 0;
#define CK_ADAM_SCALAR(i_) do { \
        const float pn_ = ck_adam_one(p + (i_), g + (i_), m + (i_), v + (i_), step_size, bias2_sqrt, b2, eps, one_minus_b1, one_minus_b2, \
                                      shrink, l2, decoupled); \
        for (long k_ = 0; k_ < mirror_count; k_++) mirrors[k_][mirror_offset + (i_)] = pn_; \
        bad += (float_to_bits(pn_) & 0x7f800000u) == 0x7f800000u; \
    } while (0)
    for (; i < count && ((uintptr_t)(p + i) & 63) != 0; i++) CK_ADAM_SCALAR(i);
    int streaming = 1;
    for (long k = 0; k < mirror_count; k++) streaming &= ((uintptr_t)(mirrors[k] + mirror_offset + i) & 63) == 0;
    ck_i16 nonfinite = {0};
    for (; i + CK_LANES <= count; i += CK_LANES) {
        ck_v16 pv = ck_load(p + i);
        if (decoupled) pv = pv * shrink;
        const ck_v16 gv = ck_load(g + i) + l2 * pv, m0 = ck_load(m + i);
        const ck_v16 mi = m0 + one_minus_b1 * (gv - m0);
        const ck_v16 vi = ck_load(v + i) * b2 + one_minus_b2 * gv * gv;
        *(ck_v16 *)(m + i) = mi;
        *(ck_v16 *)(v + i) = vi;
        const ck_v16 denom = __builtin_elementwise_sqrt(vi) / bias2_sqrt + eps;
        const ck_v16 pn = pv - step_size * (mi / denom);
        *(ck_v16 *)(p + i) = pn;
        if (streaming) {
            for (long k = 0; k < mirror_count; k++) __builtin_nontemporal_store((ck_v16a)pn, (ck_v16a *)(mirrors[k] + mirror_offset + i));
        } else {
            for (long k = 0; k < mirror_count; k++) *(ck_v16 *)(mirrors[k] + mirror_offset + i) = pn;
        }
        nonfinite += (((ck_u16v)pn & 0x7f800000u) == 0x7f800000u);  // -1 where NaN or infinite
    }
    for (; i < count; i++) CK_ADAM_SCALAR(i);
#undef CK_ADAM_SCALAR
#if defined(__x86_64__)
    if (mirror_count > 0) __builtin_ia32_sfence();
#endif
    return bad - __builtin_reduce_add(nonfinite);
}

typedef float ck_v8 __attribute__((vector_size(32), aligned(4)));
typedef double ck_d8 __attribute__((vector_size(64), aligned(8)));

// sum of x[i]^2 in double: element i into lane i % 8 (the tail into lanes 0, 1, ...), the lanes then
// added in order. The same on every clone.
CK_CLONES double ck_sum_squares(const float *x, long count) {
    ck_d8 lanes = {0};
    long i = 0;
    for (; i + 8 <= count; i += 8) {
        const ck_d8 d = __builtin_convertvector(*(const ck_v8 *)(x + i), ck_d8);
        lanes += d * d;
    }
    for (int l = 0; i < count; i++, l++) { const double d = (double)x[i]; lanes[l] += d * d; }
    double total = 0;
    for (int l = 0; l < 8; l++) total += lanes[l];
    return total;
}

// How many of x[0..<count] are NaN or infinite (all exponent bits set).
CK_CLONES long ck_count_nonfinite(const float *x, long count) {
    long n = 0;
    for (long i = 0; i < count; i++) n += (float_to_bits(x[i]) & 0x7f800000u) == 0x7f800000u;
    return n;
}

// LayerNorm's input gradient over rows x features, added to dx: with g = dy * gamma and
// xhat = (x - mean[r]) * inv_std[r], dx += inv_std[r] * (g - mean(g) - xhat * mean(g * xhat)); each row's
// two sums in 16 lanes (element i into lane i % 16, the tail into lanes 0, 1, ...), the lanes then
// added in order. (Always inlined into its callers' clones; with accumulate 0, dx is written 0 + v, the
// bits of adding to zeros, without reading dx.)
static inline __attribute__((always_inline)) void ck_layernorm_backward_run(float *restrict dx, int accumulate, const float *restrict dy,
                                                                             const float *restrict x, const float *restrict gamma,
                                                                             const float *restrict mean, const float *restrict inv_std,
                                                                             long rows, long features) {
    const float n = (float)features;
    for (long r = 0; r < rows; r++) {
        const float *restrict xr = x + r * features, *restrict dyr = dy + r * features;
        float *restrict dxr = dx + r * features;
        const float m = mean[r], rs = inv_std[r];
        ck_v16 sg = {0}, sgx = {0};
        long i = 0;
        for (; i + CK_LANES <= features; i += CK_LANES) {
            const ck_v16 xhat = (ck_load(xr + i) - m) * rs, g = ck_load(dyr + i) * ck_load(gamma + i);
            sg += g;
            sgx += g * xhat;
        }
        for (int l = 0; i < features; i++, l++) {
            const float xhat = (xr[i] - m) * rs, g = dyr[i] * gamma[i];
            sg[l] += g;
            sgx[l] += g * xhat;
        }
        float sum_g, sum_gx;
        ck_lane_total(sg, sum_g);
        ck_lane_total(sgx, sum_gx);
        const float mean_g = sum_g / n, mean_gx = sum_gx / n;
        i = 0;
        for (; i + CK_LANES <= features; i += CK_LANES) {
            const ck_v16 xhat = (ck_load(xr + i) - m) * rs;
            const ck_v16 base = accumulate ? ck_load(dxr + i) : ck_v16_of(0.0f);
            *(ck_v16 *)(dxr + i) = base + rs * (ck_load(dyr + i) * ck_load(gamma + i) - mean_g - xhat * mean_gx);
        }
        for (; i < features; i++) {
            const float xhat = (xr[i] - m) * rs;
            dxr[i] = (accumulate ? dxr[i] : 0.0f) + rs * (dyr[i] * gamma[i] - mean_g - xhat * mean_gx);
        }
    }
}

CK_CLONES void ck_layernorm_backward_rows(float *restrict dx, const float *restrict dy, const float *restrict x, const float *restrict gamma,
                                         const float *restrict mean, const float *restrict inv_std, long rows, long features) {
    ck_layernorm_backward_run(dx, 1, dy, x, gamma, mean, inv_std, rows, features);
}

CK_BF16_KERNEL(ck_layernorm_backward_residual_rows, (float *restrict residual, int accumulate, float *restrict dense, uint16_t *restrict dense16,
                                                     const float *restrict dy, const float *restrict x, const float *restrict gamma,
                                                     const float *restrict mean, const float *restrict inv_std, long rows, long features,
                                                     int dropout, long first, uint64_t seed, uint64_t stream, uint32_t limit, float scale),
               (residual, accumulate, dense, dense16, dy, x, gamma, mean, inv_std, rows, features, dropout, first, seed, stream, limit, scale)) {
    // Without dense, each row's g in a row of its own (on the stack), its bits into dense16.
    float row[dense ? 1 : features];
    for (long r = 0; r < rows; r++) {
        float *restrict g = dense ? dense + r * features : row;
        // LayerNorm's gradient into the dense layer's room (0 + v, as the plain kernel adds it to zeros).
        ck_layernorm_backward_run(g, 0, dy + r * features, x + r * features, gamma, mean + r, inv_std + r, 1, features);
        if (residual) {
            float *restrict s = residual + r * features;
            if (accumulate) {
                for (long i = 0; i < features; i++) s[i] = s[i] + g[i];
            } else {
                for (long i = 0; i < features; i++) s[i] = g[i];
            }
        }
        if (dropout) {
            const long start = first + r * features;
            ck_dropout(g, g, start, start + features, seed, stream, limit, scale, 0);
        }
        if (dense16) ck_bits_run(ck_native, dense16 + r * features, g, features);
    }
}

// SplitMix64's finalizer, as Swift's mix64 (Random.swift).
static inline uint64_t ck_mix64(uint64_t value) {
    uint64_t z = value + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Attention's weights of one (sample, head) block, in one pass over each row: p (the scores, [rows,
// tokens]) in place -> softmax (as ck_softmax_rows), then w = dropout(p) (where `dropout`: row i draws
// from the stream head_stream.child(i), element j from its draw j, as ck_dropout_forward), w into
// `dropped` (where given) and its bf16 bits into w16.
CK_BF16_KERNEL(ck_attention_weights, (float *restrict p, uint16_t *restrict w16, float *restrict dropped, const int32_t *restrict valid,
                                      long rows, long tokens, int dropout, uint64_t seed, uint64_t head_stream, uint32_t limit, float scale),
               (p, w16, dropped, valid, rows, tokens, dropout, seed, head_stream, limit, scale)) {
    uint32_t draws[4 * CK_PHILOX_BLOCKS];
    for (long i = 0; i < rows; i++) {
        float *restrict row = p + i * tokens;
        uint16_t *restrict out16 = w16 + i * tokens;
        float *restrict out = dropped ? dropped + i * tokens : 0;
        ck_softmax_row(row, valid, tokens);
        if (!dropout) {
            ck_bits_run(ck_native, out16, row, tokens);
            if (out) memcpy(out, row, (size_t)tokens * sizeof(float));
            continue;
        }
        const uint64_t stream = ck_mix64(head_stream ^ ck_mix64((uint64_t)i));
        for (long base = 0; base < tokens; base += 4 * CK_PHILOX_BLOCKS) {
            ck_philox_blocks(draws, (uint64_t)(base / 4), seed, stream);
            const long count = tokens - base < 4 * CK_PHILOX_BLOCKS ? tokens - base : 4 * CK_PHILOX_BLOCKS;
            float w[4 * CK_PHILOX_BLOCKS];
            for (long j = 0; j < count; j++) w[j] = draws[j] >= limit ? row[base + j] * scale : 0.0f;
            ck_bits_run(ck_native, out16 + base, w, count);
            if (out) memcpy(out + base, w, (size_t)count * sizeof(float));
        }
    }
}

// sum_j p_j d_j over a row in 16 lanes (element j of the whole vectors into lane j % 16, the tail into
// lanes 0, 1, ...), the lanes then added in order.
static inline __attribute__((always_inline)) float ck_row_dot(const float *restrict p, const float *restrict d, long tokens) {
    ck_v16 lanes = {0};
    long j = 0;
    for (; j + CK_LANES <= tokens; j += CK_LANES) lanes += ck_load(p + j) * ck_load(d + j);
    for (int l = 0; j < tokens; j++, l++) lanes[l] += p[j] * d[j];
    float dot;
    ck_lane_total(lanes, dot);
    return dot;
}

// Attention's softmax backward on one (sample, head) block in fp32: d = dp through the dropout (where
// `dropped` is given: dp * scale where the dropped weight is not 0, else 0), dp = p * (d - sum_j p_j d_j).
CK_CLONES void ck_softmax_backward_rows(float *restrict dp, const float *restrict p, const float *restrict dropped, long rows, long tokens,
                                        float scale) {
    for (long i = 0; i < rows; i++) {
        float *restrict d = dp + i * tokens;
        const float *restrict pr = p + i * tokens;
        if (dropped) {
            const float *restrict wr = dropped + i * tokens;
            for (long j = 0; j < tokens; j++) d[j] = wr[j] != 0 ? d[j] * scale : 0.0f;
        }
        const float dot = ck_row_dot(pr, d, tokens);
        for (long j = 0; j < tokens; j++) d[j] = pr[j] * (d[j] - dot);
    }
}

// The same in bf16 for the products that read it, the dropout's mask from the weights' bf16 bits w16:
// d (written into dp) as above, ds = p * (d - sum_j p_j d_j) as bf16 bits into ds16. ds16 may be w16
// (each row's w16 is read before its ds16 is written).
CK_BF16_KERNEL(ck_attention_softmax_backward, (uint16_t *ds16, float *restrict dp, const float *restrict p, const uint16_t *w16, long rows,
                                               long tokens, int dropout, float scale),
               (ds16, dp, p, w16, rows, tokens, dropout, scale)) {
    for (long i = 0; i < rows; i++) {
        float *restrict d = dp + i * tokens;
        const float *restrict pr = p + i * tokens;
        if (dropout) {
            const uint16_t *wr = w16 + i * tokens;
            for (long j = 0; j < tokens; j++) d[j] = wr[j] != 0 ? d[j] * scale : 0.0f;
        }
        const float dot = ck_row_dot(pr, d, tokens);
        uint16_t *out = ds16 + i * tokens;
        long j = 0;
        for (; j + CK_LANES <= tokens; j += CK_LANES) ck_store_bf16(out + j, ck_load(pr + j) * (ck_load(d + j) - dot));
        for (; j < tokens; j++) out[j] = ck_bf16_of(pr[j] * (d[j] - dot));
    }
}

// GELU's backward with the gradient's bf16 bits: dx = dy * gelu'(x) (as ck_gelu_backward, overwriting)
// and its bits into dx16.
CK_BF16_KERNEL(ck_gelu_backward_bf16, (float *restrict dx, uint16_t *restrict dx16, const float *restrict dy, const uint16_t *restrict dy16,
                                       const float *restrict x, const uint16_t *restrict x16, long count),
               (dx, dx16, dy, dy16, x, x16, count)) {
    long i = 0;
    for (; i + CK_LANES <= count; i += CK_LANES) {
        float g[CK_LANES], in[CK_LANES], d[CK_LANES];
        if (x16) *(ck_v16 *)in = ck_load_bf16(x16 + i);
        else *(ck_v16 *)in = ck_load(x + i);
        if (dy16) *(ck_v16 *)d = ck_load_bf16(dy16 + i);
        else *(ck_v16 *)d = ck_load(dy + i);
        for (int l = 0; l < CK_LANES; l++) {
            float cdf, density;
            ck_normal(in[l], &cdf, &density);
            g[l] = d[l] * (cdf + in[l] * density);
        }
        if (dx) *(ck_v16 *)(dx + i) = ck_load(g);
        ck_store_bf16(dx16 + i, ck_load(g));
    }
    for (; i < count; i++) {
        const float v = x16 ? ck_float_of_bf16(x16[i]) : x[i], e = dy16 ? ck_float_of_bf16(dy16[i]) : dy[i];
        float cdf, density;
        ck_normal(v, &cdf, &density);
        const float g = e * (cdf + v * density);
        if (dx) dx[i] = g;
        dx16[i] = ck_bf16_of(g);
    }
}

// sum[c] += x[r * ld + c] over rows r in order, for columns [first, last) (a linear layer's bias
// gradient): each column's additions in row order, as the plain loop, 16 columns at a time. x is read
// from its bf16 bits x16 where given, else from its floats, rounded to bf16 first with round.
CK_CLONES void ck_column_sums(float *restrict sum, const float *restrict x, const uint16_t *restrict x16, int round, long rows, long ld,
                              long first, long last) {
    long c = first;
    for (; c + CK_LANES <= last; c += CK_LANES) {
        ck_v16 s = ck_load(sum + c);
        if (x16) {
            for (long r = 0; r < rows; r++) s += ck_load_bf16(x16 + r * ld + c);
        } else if (round) {
            for (long r = 0; r < rows; r++) s += ck_round_v16(ck_load(x + r * ld + c));
        } else {
            for (long r = 0; r < rows; r++) s += ck_load(x + r * ld + c);
        }
        *(ck_v16 *)(sum + c) = s;
    }
    for (; c < last; c++) {
        float s = sum[c];
        for (long r = 0; r < rows; r++) s += x16 ? ck_float_of_bf16(x16[r * ld + c]) : round ? ck_rounded(x[r * ld + c]) : x[r * ld + c];
        sum[c] = s;
    }
}

// LayerNorm's parameter gradients for features [first, last): gamma[i] += dy * (x - mean) * inv_std,
// beta[i] += dy over rows in order (the plain loop's operations and order, 16 features at a time).
CK_CLONES void ck_layernorm_param_grads(float *restrict grad_gamma, float *restrict grad_beta, const float *restrict dy, const float *restrict x,
                                        const float *restrict mean, const float *restrict inv_std, long rows, long features, long first,
                                        long last) {
    long i = first;
    for (; i + CK_LANES <= last; i += CK_LANES) {
        ck_v16 gg = ck_load(grad_gamma + i), gb = ck_load(grad_beta + i);
        for (long r = 0; r < rows; r++) {
            const ck_v16 d = ck_load(dy + r * features + i);
            gg += d * (ck_load(x + r * features + i) - mean[r]) * inv_std[r];
            gb += d;
        }
        *(ck_v16 *)(grad_gamma + i) = gg;
        *(ck_v16 *)(grad_beta + i) = gb;
    }
    for (; i < last; i++) {
        float gg = grad_gamma[i], gb = grad_beta[i];
        for (long r = 0; r < rows; r++) {
            const float d = dy[r * features + i];
            gg += d * (x[r * features + i] - mean[r]) * inv_std[r];
            gb += d;
        }
        grad_gamma[i] = gg;
        grad_beta[i] = gb;
    }
}

// dst[i] += src[i] (a gradient piece added to the gradient: one fp32 addition per element, in any clone).
CK_CLONES void ck_add(float *restrict dst, const float *restrict src, long count) {
    for (long i = 0; i < count; i++) dst[i] += src[i];
}

CK_CLONES void ck_sum_ranks(float *const *ranks, long count, long offset, long length, int everywhere, long own) {
    // Blocks of 2048 floats (8 KB): the sum is built in the first destination and copied from there
    // while it is still in L1, so each source is read once and each destination written once.
    const long block = 2048;
    for (long start = offset; start < offset + length; start += block) {
        long n = start + block <= offset + length ? block : offset + length - start;
        float *restrict out = ranks[everywhere ? 0 : own] + start;
        if (everywhere || own == 0) {
            // out is ranks[0]: add the others to it in rank order.
            for (long r = 1; r < count; r++) {
                const float *restrict src = ranks[r] + start;
                for (long i = 0; i < n; i++) out[i] += src[i];
            }
        } else {
            // out is the own rank's block: ranks[0] + ranks[1] + ..., the own one read before it is written.
            float sum[2048];
            const float *restrict first = ranks[0] + start;
            for (long i = 0; i < n; i++) sum[i] = first[i];
            for (long r = 1; r < count; r++) {
                const float *restrict src = ranks[r] + start;
                for (long i = 0; i < n; i++) sum[i] += src[i];
            }
            for (long i = 0; i < n; i++) out[i] = sum[i];
        }
        if (everywhere) {
            for (long r = 1; r < count; r++) {
                float *restrict dst = ranks[r] + start;
                for (long i = 0; i < n; i++) dst[i] = out[i];
            }
        }
    }
}

void ck_memory_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// A row of the warp in chunks: the coordinates and weights of a chunk's pixels (vectorised), their four
// source pixels (scalar loads), then the interpolation (vectorised).
#define CK_WARP_CHUNK 64
CK_CLONES void ck_affine_warp(float *restrict out, long s, const uint8_t *restrict pixels, long width, long height, float cos_t,
                              float sin_t, float tx, float ty, float sx, float sy, float crop_x, float crop_y, int flip) {
    const float c = (float)s * 0.5f, size = (float)s, w = (float)width, h = (float)height;
    for (long v = 0; v < s; v++) {
        const float dy = (float)v + 0.5f - c - ty;
        for (long u0 = 0; u0 < s; u0 += CK_WARP_CHUNK) {
            const int n = (int)(s - u0 < CK_WARP_CHUNK ? s - u0 : CK_WARP_CHUNK);
            int32_t base[CK_WARP_CHUNK], right[CK_WARP_CHUNK], down[CK_WARP_CHUNK], inside[CK_WARP_CHUNK];
            float ax[CK_WARP_CHUNK], ay[CK_WARP_CHUNK];
            for (int j = 0; j < n; j++) {
                const float dx = (float)(u0 + j) + 0.5f - c - tx;
                float qx = cos_t * dx + sin_t * dy + c, qy = -sin_t * dx + cos_t * dy + c;
                const int in_view = qx >= 0 && qy >= 0 && qx <= size && qy <= size;
                if (flip) qx = size - qx;
                qy = swift_max(qy, 0);
                const float x = crop_x + qx * sx, y = crop_y + qy * sy;
                const int in_image = x >= 0 && y >= 0 && x <= w && y <= h;
                const float fx = x - 0.5f, fy = y - 0.5f, x0 = __builtin_floorf(fx), y0 = __builtin_floorf(fy);
                ax[j] = fx - x0; ay[j] = fy - y0;
                // Clamped in float, then converted: the same integers as clamping the converted floor
                // (x0 is a whole number; far outside the image the pixel is 0 anyway).
                const float cx0 = swift_min(swift_max(x0, 0), w - 1), cx1 = swift_min(swift_max(x0 + 1, 0), w - 1);
                const float cy0 = swift_min(swift_max(y0, 0), h - 1), cy1 = swift_min(swift_max(y0 + 1, 0), h - 1);
                const int32_t ix0 = (int32_t)cx0, iy0 = (int32_t)cy0;
                inside[j] = in_view & in_image;
                base[j] = inside[j] ? iy0 * (int32_t)width + ix0 : 0;
                right[j] = inside[j] ? (int32_t)cx1 - ix0 : 0;
                down[j] = inside[j] ? ((int32_t)cy1 - iy0) * (int32_t)width : 0;
            }
            float p00[CK_WARP_CHUNK], p10[CK_WARP_CHUNK], p01[CK_WARP_CHUNK], p11[CK_WARP_CHUNK];
            for (int j = 0; j < n; j++) {
                const uint8_t *p = pixels + base[j];
                p00[j] = p[0]; p10[j] = p[right[j]]; p01[j] = p[down[j]]; p11[j] = p[down[j] + right[j]];
            }
            float *o = out + v * s + u0;
            for (int j = 0; j < n; j++) {
                const float top = p00[j] * (1 - ax[j]) + p10[j] * ax[j], bottom = p01[j] * (1 - ax[j]) + p11[j] * ax[j];
                const float value = (top * (1 - ay[j]) + bottom * ay[j]) * (1.0f / 255);
                o[j] = inside[j] ? value : 0;
            }
        }
    }
}
