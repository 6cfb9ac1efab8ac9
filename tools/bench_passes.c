// The passes between convirt's products, ours (Sources/CKernels, the kernels the step runs) against
// oneDNN's own primitives for the same work, at the paper step's shapes (batch 8: 1024 tokens of
// BERT-base, 8 x 12 heads x 128 x 128 attention weights, ResNet-50 activations). One thread each:
// the per-core rate, which the passes' split over threads keeps. The decision it informs: move a pass
// into oneDNN where oneDNN's primitive is faster.
//
//     clang -O3 -ffp-contract=off -I.deps/onednn/include -ISources/CKernels/include tools/bench_passes.c Sources/CKernels/kernels.c \
//        .deps/onednn/lib/libdnnl.so.3 -Wl,-rpath,$PWD/.deps/onednn/lib -lm -o /tmp/bench_passes
//     OMP_NUM_THREADS=1 /tmp/bench_passes [--cold] [--integer-bf16]
//
// --integer-bf16 runs our kernels' integer bf16 rounding where the CPU would convert natively
// (ck_set_native_bf16(0); the same bits, for timing the two).
// Each line: the pass, milliseconds (median of 15 after a warm-up) ours / oneDNN's, oneDNN's time over
// ours (above 1: ours is faster), the bytes the pass must move at least over our time, and the largest
// difference between the two outputs relative to the output's largest magnitude (oneDNN computes the
// same function, not the same bits; a bf16 output differs by its rounding, 3.9e-3).
// Where our kernel fuses more than oneDNN's primitive can (a residual sum, a mask, dropout, a bf16
// copy), the line says so and oneDNN's side runs what a primitive can do of it.
// The data stay in cache between repetitions (3 to 26 MB): these are the passes' compute rates. With
// --cold every run starts from memory instead, as inside the step, where a pass reads what the product
// before it wrote and the memory's rate bounds it too.
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ckernels.h"

static dnnl_engine_t engine;
static dnnl_stream_t stream;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void die(const char *what, dnnl_status_t s) {
    fprintf(stderr, "bench_passes: %s: %s\n", what, dnnl_status2str(s));
    exit(1);
}
#define CHECK(call, what) do { dnnl_status_t s_ = (call); if (s_ != dnnl_success) die(what, s_); } while (0)

#define REPEATS 15
static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef void (*body_t)(void *);
// With --cold, each run starts after 256 MB were written elsewhere: the pass's data come from memory,
// as inside the step, where a pass reads what the product before it wrote.
static int cold = 0;
enum { EVICT_BYTES = 256 << 20 };
static char *evict;
static void evict_caches(int round) {
    if (cold) memset(evict, round, EVICT_BYTES);
}

static double time_ms(body_t body, void *context) {
    double t[REPEATS];
    evict_caches(0);
    body(context);
    for (int r = 0; r < REPEATS; r++) {
        evict_caches(r + 1);
        double start = now();
        body(context);
        t[r] = now() - start;
    }
    qsort(t, REPEATS, sizeof t[0], by_value);
    return 1e3 * t[REPEATS / 2];
}

static dnnl_memory_desc_t md(int n, const dnnl_dims_t dims, dnnl_data_type_t type, dnnl_format_tag_t tag) {
    dnnl_memory_desc_t m;
    CHECK(dnnl_memory_desc_create_with_tag(&m, n, dims, type, tag), "memory descriptor");
    return m;
}

static dnnl_memory_t mem(const_dnnl_memory_desc_t m, void *data) {
    dnnl_memory_t x;
    CHECK(dnnl_memory_create(&x, m, engine, data), "memory");
    return x;
}

typedef struct {
    dnnl_primitive_t primitive;
    int count;
    dnnl_exec_arg_t args[12];
} dnnl_call;

static void run_dnnl(void *context) {
    dnnl_call *c = context;
    CHECK(dnnl_primitive_execute(c->primitive, stream, c->count, c->args), "execute");
    dnnl_stream_wait(stream);
}

static dnnl_call make_call(dnnl_primitive_desc_t pd) {
    dnnl_call c = {0};
    CHECK(dnnl_primitive_create(&c.primitive, pd), "primitive");
    return c;
}

static void arg(dnnl_call *c, int which, const_dnnl_memory_desc_t m, void *data) {
    c->args[c->count++] = (dnnl_exec_arg_t){which, mem(m, data)};
}

static const char *impl(dnnl_primitive_desc_t pd) {
    const char *name = "?";
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name);
    return name;
}

static float *floats(long n, unsigned seed, float scale) {
    float *x = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    unsigned s = seed;
    for (long i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = scale * ((float)(s >> 8) / 16777216.0f - 0.5f) * 2;
    }
    return x;
}

static uint16_t *halves(long n) { return aligned_alloc(64, (n * 2 + 63) / 64 * 64); }
static float from_bf16(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static double difference(const float *a, const float *b, long n) {
    double top = 0, worst = 0;
    for (long i = 0; i < n; i++) {
        top = fmax(top, fabs(a[i]));
        worst = fmax(worst, fabs((double)a[i] - b[i]));
    }
    return top > 0 ? worst / top : worst;
}

static double difference16(const uint16_t *a, const uint16_t *b, long n) {
    double top = 0, worst = 0;
    for (long i = 0; i < n; i++) {
        top = fmax(top, fabs(from_bf16(a[i])));
        worst = fmax(worst, fabs((double)from_bf16(a[i]) - from_bf16(b[i])));
    }
    return top > 0 ? worst / top : worst;
}

static void report(const char *name, double ours, double theirs, double bytes, double diff, const char *implementation, const char *note) {
    printf("%-44s %7.3f / %7.3f ms  %5.2fx  %5.1f GB/s  diff %.1e  %s%s%s\n", name, ours, theirs, theirs / ours, bytes / ours / 1e6, diff,
           implementation, note[0] ? "; " : "", note);
}

// ---- LayerNorm over 1024 x 768 ----
typedef struct { float *y, *mean, *inv_std, *x, *gamma, *beta, *dx, *dy, *gg, *gb; long rows, features; } ln_t;
static void ln_forward(void *c) {
    ln_t *l = c;
    ck_layernorm_rows(l->y, l->mean, l->inv_std, l->x, l->gamma, l->beta, l->rows, l->features, 1e-12f);
}
static void ln_backward(void *c) {
    ln_t *l = c;
    memset(l->dx, 0, l->rows * l->features * sizeof(float));
    ck_layernorm_backward_rows(l->dx, l->dy, l->x, l->gamma, l->mean, l->inv_std, l->rows, l->features);
    ck_layernorm_param_grads(l->gg, l->gb, l->dy, l->x, l->mean, l->inv_std, l->rows, l->features, 0, l->features);
}

static void layernorm(void) {
    const long rows = 1024, features = 768, n = rows * features;
    ln_t l = {floats(n, 1, 1), floats(rows, 2, 1), floats(rows, 3, 1), floats(n, 4, 3), floats(features, 5, 1), floats(features, 6, 1),
              floats(n, 7, 1), floats(n, 8, 1), floats(features, 9, 0), floats(features, 10, 0), rows, features};
    for (long i = 0; i < features; i++) l.gamma[i] += 1.5f;
    dnnl_dims_t dims = {rows, features}, sdims = {rows};
    dnnl_memory_desc_t data = md(2, dims, dnnl_f32, dnnl_ab), stat = md(1, sdims, dnnl_f32, dnnl_a), channel = md(1, (dnnl_dims_t){features}, dnnl_f32, dnnl_a);
    unsigned flags = dnnl_use_scale | dnnl_use_shift;
    dnnl_primitive_desc_t fpd, bpd;
    CHECK(dnnl_layer_normalization_forward_primitive_desc_create(&fpd, engine, dnnl_forward_training, data, data, stat, 1e-12f, flags, NULL), "lnorm fwd");
    float *y2 = floats(n, 11, 0), *mean2 = floats(rows, 12, 0), *var2 = floats(rows, 13, 0);
    dnnl_call f = make_call(fpd);
    arg(&f, DNNL_ARG_SRC, data, l.x); arg(&f, DNNL_ARG_DST, data, y2); arg(&f, DNNL_ARG_MEAN, stat, mean2); arg(&f, DNNL_ARG_VARIANCE, stat, var2);
    arg(&f, DNNL_ARG_SCALE, channel, l.gamma); arg(&f, DNNL_ARG_SHIFT, channel, l.beta);
    double ours = time_ms(ln_forward, &l), theirs = time_ms(run_dnnl, &f);
    report("layernorm forward 1024x768 fp32", ours, theirs, 8.0 * n, difference(l.y, y2, n), impl(fpd), "");

    CHECK(dnnl_layer_normalization_backward_primitive_desc_create(&bpd, engine, dnnl_backward, data, data, data, stat, 1e-12f, flags, fpd, NULL), "lnorm bwd");
    float *dx2 = floats(n, 14, 0), *gg2 = floats(features, 15, 0), *gb2 = floats(features, 16, 0);
    dnnl_call b = make_call(bpd);
    arg(&b, DNNL_ARG_SRC, data, l.x); arg(&b, DNNL_ARG_DIFF_DST, data, l.dy); arg(&b, DNNL_ARG_MEAN, stat, mean2); arg(&b, DNNL_ARG_VARIANCE, stat, var2);
    arg(&b, DNNL_ARG_SCALE, channel, l.gamma); arg(&b, DNNL_ARG_SHIFT, channel, l.beta); arg(&b, DNNL_ARG_DIFF_SRC, data, dx2);
    arg(&b, DNNL_ARG_DIFF_SCALE, channel, gg2); arg(&b, DNNL_ARG_DIFF_SHIFT, channel, gb2);
    ours = time_ms(ln_backward, &l);
    theirs = time_ms(run_dnnl, &b);
    ln_backward(&l);
    report("layernorm backward (+ gamma, beta grads)", ours, theirs, 12.0 * n, difference(l.dx, dx2, n), impl(bpd), "");
}

// A post-LN transformer's residual end: sum = dense + residual, y = LayerNorm(sum) and its bf16 bits,
// one pass of ours (ck_residual_layernorm_rows) against oneDNN's binary sum then its layer normalization
// (which writes no bf16 copy).
typedef struct { float *sum, *y, *mean, *inv_std, *dense, *residual, *gamma, *beta; uint16_t *y16; long rows, features; } residual_ln_t;
static void residual_ln(void *c) {
    residual_ln_t *l = c;
    ck_residual_layernorm_rows(l->sum, l->y, l->y16, l->mean, l->inv_std, l->dense, l->residual, l->gamma, l->beta, l->rows, l->features,
                               1e-12f, 0, 0, 0, 0, 0, 1);
}
typedef struct { dnnl_call add, norm; } two_calls;
static void run_two(void *c) {
    two_calls *t = c;
    run_dnnl(&t->add);
    run_dnnl(&t->norm);
}

static void residual_layernorm(void) {
    const long rows = 1024, features = 768, n = rows * features;
    residual_ln_t l = {floats(n, 1, 0), floats(n, 2, 0), floats(rows, 3, 0), floats(rows, 4, 0), floats(n, 5, 2), floats(n, 6, 2),
                       floats(features, 7, 1), floats(features, 8, 1), halves(n), rows, features};
    dnnl_dims_t dims = {rows, features}, sdims = {rows};
    dnnl_memory_desc_t data = md(2, dims, dnnl_f32, dnnl_ab), stat = md(1, sdims, dnnl_f32, dnnl_a), channel = md(1, (dnnl_dims_t){features}, dnnl_f32, dnnl_a);
    dnnl_primitive_desc_t apd, npd;
    CHECK(dnnl_binary_primitive_desc_create(&apd, engine, dnnl_binary_add, data, data, data, NULL), "binary add");
    CHECK(dnnl_layer_normalization_forward_primitive_desc_create(&npd, engine, dnnl_forward_training, data, data, stat, 1e-12f,
                                                                 dnnl_use_scale | dnnl_use_shift, NULL), "lnorm fwd");
    float *sum2 = floats(n, 9, 0), *y2 = floats(n, 10, 0), *mean2 = floats(rows, 11, 0), *var2 = floats(rows, 12, 0);
    two_calls t = {make_call(apd), make_call(npd)};
    arg(&t.add, DNNL_ARG_SRC_0, data, l.dense); arg(&t.add, DNNL_ARG_SRC_1, data, l.residual); arg(&t.add, DNNL_ARG_DST, data, sum2);
    arg(&t.norm, DNNL_ARG_SRC, data, sum2); arg(&t.norm, DNNL_ARG_DST, data, y2); arg(&t.norm, DNNL_ARG_MEAN, stat, mean2);
    arg(&t.norm, DNNL_ARG_VARIANCE, stat, var2); arg(&t.norm, DNNL_ARG_SCALE, channel, l.gamma); arg(&t.norm, DNNL_ARG_SHIFT, channel, l.beta);
    double ours = time_ms(residual_ln, &l), theirs = time_ms(run_two, &t);
    report("residual sum + layernorm (+ bf16 copy: ours)", ours, theirs, 18.0 * n, difference(l.y, y2, n), impl(npd),
           "oneDNN: binary add, then layer normalization");
}

// ---- GELU over 1024 x 3072 ----
typedef struct { float *y, *x, *dx, *dy; uint16_t *y16, *dx16; long n; } gelu_t;
static void gelu_forward(void *c) { gelu_t *g = c; ck_gelu_forward(g->y, g->x, g->n); }
static void gelu_forward16(void *c) { gelu_t *g = c; ck_gelu_forward_bf16(g->y16, g->x, NULL, g->n); }
static void gelu_backward(void *c) { gelu_t *g = c; ck_gelu_backward(g->dx, g->dy, g->x, g->n, 0); }
static void gelu_backward16(void *c) { gelu_t *g = c; ck_gelu_backward_bf16(g->dx, g->dx16, g->dy, NULL, g->x, NULL, g->n); }

static void gelu(void) {
    const long n = 1024 * 3072;
    gelu_t g = {floats(n, 1, 0), floats(n, 2, 4), floats(n, 3, 0), floats(n, 4, 1), halves(n), halves(n), n};
    dnnl_dims_t dims = {1024, 3072};
    dnnl_memory_desc_t data = md(2, dims, dnnl_f32, dnnl_ab), data16 = md(2, dims, dnnl_bf16, dnnl_ab);
    dnnl_primitive_desc_t fpd, bpd;
    CHECK(dnnl_eltwise_forward_primitive_desc_create(&fpd, engine, dnnl_forward_training, dnnl_eltwise_gelu_erf, data, data, 0, 0, NULL), "gelu fwd");
    float *y2 = floats(n, 5, 0), *dx2 = floats(n, 6, 0);
    dnnl_call f = make_call(fpd);
    arg(&f, DNNL_ARG_SRC, data, g.x); arg(&f, DNNL_ARG_DST, data, y2);
    double ours = time_ms(gelu_forward, &g), theirs = time_ms(run_dnnl, &f);
    report("gelu forward 1024x3072 fp32", ours, theirs, 8.0 * n, difference(g.y, y2, n), impl(fpd), "");

    // fp32 in, bf16 out (what the next product reads): oneDNN's eltwise where it takes mixed types.
    dnnl_primitive_desc_t f16pd;
    dnnl_status_t s = dnnl_eltwise_forward_primitive_desc_create(&f16pd, engine, dnnl_forward_training, dnnl_eltwise_gelu_erf, data, data16, 0, 0, NULL);
    ours = time_ms(gelu_forward16, &g);
    if (s == dnnl_success) {
        uint16_t *y16 = halves(n);
        dnnl_call f16 = make_call(f16pd);
        arg(&f16, DNNL_ARG_SRC, data, g.x); arg(&f16, DNNL_ARG_DST, data16, y16);
        theirs = time_ms(run_dnnl, &f16);
        report("gelu forward fp32 -> bf16", ours, theirs, 6.0 * n, difference16(g.y16, y16, n), impl(f16pd), "");
    } else {
        printf("%-44s %7.3f ms ours; oneDNN: %s\n", "gelu forward fp32 -> bf16", ours, dnnl_status2str(s));
    }

    CHECK(dnnl_eltwise_backward_primitive_desc_create(&bpd, engine, dnnl_eltwise_gelu_erf, data, data, data, 0, 0, fpd, NULL), "gelu bwd");
    dnnl_call b = make_call(bpd);
    arg(&b, DNNL_ARG_SRC, data, g.x); arg(&b, DNNL_ARG_DIFF_DST, data, g.dy); arg(&b, DNNL_ARG_DIFF_SRC, data, dx2);
    ours = time_ms(gelu_backward, &g);
    theirs = time_ms(run_dnnl, &b);
    report("gelu backward fp32", ours, theirs, 12.0 * n, difference(g.dx, dx2, n), impl(bpd), "");
    ours = time_ms(gelu_backward16, &g);
    report("gelu backward fp32 (+ bf16 copy: ours only)", ours, theirs, 14.0 * n, difference(g.dx, dx2, n), impl(bpd), "oneDNN's without the copy");
}

// ---- softmax over 8 x 12 x 128 rows of 128 ----
typedef struct { float *p, *scores, *dp, *d; int32_t *valid; long rows, tokens; } softmax_t;
static void softmax_forward(void *c) {
    softmax_t *s = c;
    memcpy(s->p, s->scores, s->rows * s->tokens * sizeof(float));
    ck_softmax_rows(s->p, s->valid, s->rows, s->tokens);
}
static void softmax_backward(void *c) {
    softmax_t *s = c;
    memcpy(s->dp, s->d, s->rows * s->tokens * sizeof(float));
    ck_softmax_backward_rows(s->dp, s->p, NULL, s->rows, s->tokens, 1);
}
static void copy_only(void *c) {
    softmax_t *s = c;
    memcpy(s->p, s->scores, s->rows * s->tokens * sizeof(float));
}

static void softmax(void) {
    const long rows = 8 * 12 * 128, tokens = 128, n = rows * tokens;
    softmax_t s = {floats(n, 1, 0), floats(n, 2, 6), floats(n, 3, 0), floats(n, 4, 1), malloc(sizeof(int32_t)), rows, tokens};
    s.valid[0] = (int32_t)tokens;
    // ck_softmax_rows reads `valid` per sample block; a whole block of valid tokens.
    int32_t *valid = malloc(rows * sizeof(int32_t));
    for (long i = 0; i < rows; i++) valid[i] = (int32_t)tokens;
    s.valid = valid;
    dnnl_dims_t dims = {rows, tokens};
    dnnl_memory_desc_t data = md(2, dims, dnnl_f32, dnnl_ab);
    dnnl_primitive_desc_t fpd, bpd;
    CHECK(dnnl_softmax_forward_primitive_desc_create(&fpd, engine, dnnl_forward_training, dnnl_softmax_accurate, data, data, 1, NULL), "softmax fwd");
    float *p2 = floats(n, 5, 0), *dp2 = floats(n, 6, 0);
    dnnl_call f = make_call(fpd);
    arg(&f, DNNL_ARG_SRC, data, s.scores); arg(&f, DNNL_ARG_DST, data, p2);
    double copy = time_ms(copy_only, &s);
    double ours = time_ms(softmax_forward, &s) - copy, theirs = time_ms(run_dnnl, &f);
    softmax_forward(&s);
    report("softmax forward 12288x128 fp32", ours, theirs, 8.0 * n, difference(s.p, p2, n), impl(fpd),
           "ours in place (its copy not timed); ck_attention_weights fuses scale, mask, dropout, bf16 copy");
    CHECK(dnnl_softmax_backward_primitive_desc_create(&bpd, engine, dnnl_softmax_accurate, data, data, data, 1, fpd, NULL), "softmax bwd");
    dnnl_call b = make_call(bpd);
    arg(&b, DNNL_ARG_DST, data, s.p); arg(&b, DNNL_ARG_DIFF_DST, data, s.d); arg(&b, DNNL_ARG_DIFF_SRC, data, dp2);
    ours = time_ms(softmax_backward, &s) - copy;
    theirs = time_ms(run_dnnl, &b);
    softmax_backward(&s);
    report("softmax backward fp32", ours, theirs, 12.0 * n, difference(s.dp, dp2, n), impl(bpd), "ours in place (its copy not timed)");
}

// ---- batch norm over ResNet-50 activations, bf16, in the step's two row layouts ----
// nChw16c (AVX-512 without AMX): for each image and block of 16 channels, plane rows of 16 lanes. NHWC
// (AMX's brgemm convolutions): for each image, plane rows of all the channels. Each call is the one the
// step makes on one thread (`normalizeRows`, `laneSums`, `backwardTrainingRows` in ChannelsLast.swift).
typedef struct {
    uint16_t *x16, *y16, *dx16, *dy16; float *dy, *mean, *scale, *shift, *k, *sum_dy, *sum_dyx, *inv_std, *gate; double *first, *second;
    long images, channels, plane; int nhwc;
} bn_t;

// The calls' rows: (group count, lanes per row); group j of image i starts at (i * groups + j) * plane * lanes.
static long bn_lanes(const bn_t *b) { return b->nhwc ? b->channels : 16; }
static long bn_groups(const bn_t *b) { return b->channels / bn_lanes(b); }

// The normalisation alone, with the statistics given (after the sums over ranks).
static void bn_normalize(void *c) {
    bn_t *b = c;
    const long lanes = bn_lanes(b), groups = bn_groups(b), run = b->plane * lanes;
    float scale[2048];
    for (long ch = 0; ch < b->channels; ch++) scale[ch] = b->scale[ch] * b->inv_std[ch];
    for (long i = 0; i < b->images; i++)
        for (long j = 0; j < groups; j++) {
            const long o = (i * groups + j) * run;
            ck_normalize_rows(NULL, b->y16 + o, NULL, b->x16 + o, b->plane, lanes, b->mean + j * lanes, scale + j * lanes, b->shift + j * lanes, 1);
        }
}

// Per channel, the sums of x (dy NULL) or of the gated dy, image after image.
static void bn_sums(bn_t *b, const uint16_t *dy16) {
    const long lanes = bn_lanes(b), groups = bn_groups(b), run = b->plane * lanes;
    double f[2048], s[2048];
    for (long ch = 0; ch < b->channels; ch++) b->first[ch] = b->second[ch] = 0;
    for (long j = 0; j < groups; j++)
        for (long i = 0; i < b->images; i++) {
            const long o = (i * groups + j) * run, c0 = j * lanes;
            ck_channel_sums(NULL, b->x16 + o, NULL, dy16 ? dy16 + o : NULL, dy16 ? b->mean + c0 : NULL, dy16 ? b->gate + c0 : NULL,
                            dy16 ? b->shift + c0 : NULL, b->plane, lanes, lanes, f, s);
            for (long l = 0; l < lanes; l++) { b->first[c0 + l] += f[l]; b->second[c0 + l] += s[l]; }
        }
}

// The statistics, then the normalisation.
static void bn_forward(void *c) {
    bn_t *b = c;
    bn_sums(b, NULL);
    const double count = (double)(b->images * b->plane);
    for (long ch = 0; ch < b->channels; ch++) {
        double mean = b->first[ch] / count, var = fmax(b->second[ch] / count - mean * mean, 0);
        b->mean[ch] = (float)mean;
        b->inv_std[ch] = (float)(1 / sqrt(var + 1e-5));
    }
    bn_normalize(b);
}

// dy in bf16 (a bf16 convolution's input gradient, or the residual sum's gradient, as the step keeps it), the
// ReLU's gate recomputed from x with the forward's scale (gamma * inv_std) and shift, as the step does.
static void bn_backward(void *c) {
    bn_t *b = c;
    const long lanes = bn_lanes(b), groups = bn_groups(b), run = b->plane * lanes;
    for (long ch = 0; ch < b->channels; ch++) b->gate[ch] = b->scale[ch] * b->inv_std[ch];
    bn_sums(b, b->dy16);
    const float m = (float)(b->images * b->plane);
    for (long ch = 0; ch < b->channels; ch++) {
        b->sum_dy[ch] = (float)b->first[ch];
        b->sum_dyx[ch] = (float)(b->second[ch] * b->inv_std[ch]);
        b->k[ch] = b->scale[ch] * b->inv_std[ch] / m;
    }
    for (long i = 0; i < b->images; i++)
        for (long j = 0; j < groups; j++) {
            const long o = (i * groups + j) * run, c0 = j * lanes;
            ck_bn_gradient_rows(NULL, b->dx16 + o, NULL, b->dy16 + o, NULL, b->x16 + o, b->plane, lanes, b->k + c0, b->sum_dy + c0,
                                b->sum_dyx + c0, b->mean + c0, b->inv_std + c0, b->gate + c0, b->shift + c0, m, 0);
        }
}

static void batchnorm(long images, long channels, long side, int nhwc) {
    const long plane = side * side, n = images * channels * plane;
    bn_t b = {halves(n), halves(n), halves(n), NULL, floats(n, 1, 1), floats(channels, 2, 0), floats(channels, 3, 1), floats(channels, 4, 1),
              floats(channels, 5, 0), floats(channels, 6, 0), floats(channels, 7, 0), floats(channels, 8, 0), floats(channels, 10, 0),
              calloc(channels, sizeof(double)), calloc(channels, sizeof(double)), images, channels, plane, nhwc};
    float *xf = floats(n, 9, 2);
    for (long i = 0; i < n; i++) { xf[i] += 0.5f; ck_bf16_bits(b.x16 + i, xf + i, 1); }
    for (long ch = 0; ch < channels; ch++) b.scale[ch] += 1.5f;
    dnnl_dims_t dims = {images, channels, side, side};
    dnnl_memory_desc_t data16 = md(4, dims, dnnl_bf16, nhwc ? dnnl_nhwc : dnnl_nChw16c), channel = md(1, (dnnl_dims_t){channels}, dnnl_f32, dnnl_a);
    unsigned flags = dnnl_use_scale | dnnl_use_shift | dnnl_fuse_norm_relu;
    dnnl_primitive_desc_t fpd, bpd;
    char name[96];
    const char *layout = nhwc ? "nhwc" : "nChw16c";
    snprintf(name, sizeof name, "batchnorm+relu forward %ldx%ldx%ldx%ld %s", images, channels, side, side, layout);
    const dnnl_status_t made = dnnl_batch_normalization_forward_primitive_desc_create(&fpd, engine, dnnl_forward_training, data16, data16, 1e-5f,
                                                                                      flags, NULL);
    if (made != dnnl_success) {  // oneDNN runs no bf16 batch norm below AVX-512
        printf("%-44s %7.3f ms ours; oneDNN: %s\n", name, time_ms(bn_forward, &b), dnnl_status2str(made));
        return;
    }
    uint16_t *y2 = halves(n), *dx2 = halves(n), *dy16 = halves(n);
    ck_bf16_bits(dy16, b.dy, n);
    b.dy16 = dy16;
    float *mean2 = floats(channels, 10, 0), *var2 = floats(channels, 11, 0), *gs = floats(channels, 12, 0), *gb = floats(channels, 13, 0);
    const_dnnl_memory_desc_t ws = dnnl_primitive_desc_query_md(fpd, dnnl_query_workspace_md, 0);
    void *workspace = aligned_alloc(64, (dnnl_memory_desc_get_size(ws) + 63) / 64 * 64);
    dnnl_call f = make_call(fpd);
    arg(&f, DNNL_ARG_SRC, data16, b.x16); arg(&f, DNNL_ARG_DST, data16, y2); arg(&f, DNNL_ARG_MEAN, channel, mean2);
    arg(&f, DNNL_ARG_VARIANCE, channel, var2); arg(&f, DNNL_ARG_SCALE, channel, b.scale); arg(&f, DNNL_ARG_SHIFT, channel, b.shift);
    arg(&f, DNNL_ARG_WORKSPACE, ws, workspace);
    double ours = time_ms(bn_forward, &b), theirs = time_ms(run_dnnl, &f);
    report(name, ours, theirs, 6.0 * n, difference16(b.y16, y2, n), impl(fpd), "statistics and normalisation");

    // The normalisation with given statistics: oneDNN's inference kind (no workspace), ReLU fused.
    dnnl_primitive_desc_t npd;
    CHECK(dnnl_batch_normalization_forward_primitive_desc_create(&npd, engine, dnnl_forward_inference, data16, data16, 1e-5f,
                                                                 flags | dnnl_use_global_stats, NULL), "bnorm fwd global stats");
    dnnl_call g = make_call(npd);
    arg(&g, DNNL_ARG_SRC, data16, b.x16); arg(&g, DNNL_ARG_DST, data16, y2); arg(&g, DNNL_ARG_MEAN, channel, mean2);
    arg(&g, DNNL_ARG_VARIANCE, channel, var2); arg(&g, DNNL_ARG_SCALE, channel, b.scale); arg(&g, DNNL_ARG_SHIFT, channel, b.shift);
    for (long ch = 0; ch < channels; ch++) { mean2[ch] = b.mean[ch]; var2[ch] = 1 / (b.inv_std[ch] * b.inv_std[ch]) - 1e-5f; }
    ours = time_ms(bn_normalize, &b);
    theirs = time_ms(run_dnnl, &g);
    snprintf(name, sizeof name, "  its normalisation alone (given statistics)");
    report(name, ours, theirs, 4.0 * n, difference16(b.y16, y2, n), impl(npd), "");
    bn_forward(&b);

    CHECK(dnnl_batch_normalization_backward_primitive_desc_create(&bpd, engine, dnnl_backward, data16, data16, data16, 1e-5f, flags, fpd, NULL),
          "bnorm bwd");
    dnnl_call k = make_call(bpd);
    arg(&k, DNNL_ARG_SRC, data16, b.x16); arg(&k, DNNL_ARG_DIFF_DST, data16, dy16); arg(&k, DNNL_ARG_MEAN, channel, mean2);
    arg(&k, DNNL_ARG_VARIANCE, channel, var2); arg(&k, DNNL_ARG_SCALE, channel, b.scale); arg(&k, DNNL_ARG_WORKSPACE, ws, workspace);
    arg(&k, DNNL_ARG_DIFF_SRC, data16, dx2); arg(&k, DNNL_ARG_DIFF_SCALE, channel, gs); arg(&k, DNNL_ARG_DIFF_SHIFT, channel, gb);
    ours = time_ms(bn_backward, &b);
    theirs = time_ms(run_dnnl, &k);
    snprintf(name, sizeof name, "batchnorm+relu backward %ldx%ldx%ldx%ld %s", images, channels, side, side, layout);
    report(name, ours, theirs, 12.0 * n, difference16(b.dx16, dx2, n), impl(bpd),
           "ours recomputes the ReLU's gate from x (oneDNN reads its workspace), its sums global over ranks");
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--cold") == 0) cold = 1;
        else if (strcmp(argv[i], "--integer-bf16") == 0) ck_set_native_bf16(0);
        else { fprintf(stderr, "usage: %s [--cold] [--integer-bf16]\n", argv[0]); return 2; }
    }
    if (cold && !(evict = malloc(EVICT_BYTES))) return 1;
    CHECK(dnnl_engine_create(&engine, dnnl_cpu, 0), "engine");
    if (cold) printf("each run after 256 MB written elsewhere: the data from memory\n");
    if (!ck_native_bf16_enabled() && ck_native_bf16_supported()) printf("our kernels' bf16 rounding in integer arithmetic (--integer-bf16)\n");
    CHECK(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags), "stream");
    printf("pass                                         ours / oneDNN (ms)  oneDNN/ours  ours (GB/s)  difference  oneDNN's kernel\n");
    layernorm();
    residual_layernorm();
    gelu();
    softmax();
    for (int nhwc = 0; nhwc <= 1; nhwc++) {
        batchnorm(8, 64, 56, nhwc);
        batchnorm(8, 256, 56, nhwc);
        batchnorm(8, 512, 28, nhwc);
        batchnorm(8, 2048, 7, nhwc);
    }
    return 0;
}
