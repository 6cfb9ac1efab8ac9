// oneDNN's own rate for the primitives convirt runs, from C: the reference for "the Swift side adds
// little" (compare with `convirt bench kernels`). Each primitive runs in the layouts it chooses
// (format_tag_any), inputs already in them (no reorders timed), on the threads OMP_NUM_THREADS gives.
//
//     cc -O2 -I.deps/onednn/include tools/bench_dnnl.c .deps/onednn/lib/libdnnl.so.3 -Wl,-rpath,$PWD/.deps/onednn/lib -o /tmp/bench_dnnl
//     OMP_NUM_THREADS=2 /tmp/bench_dnnl
//
// (oneDNN 3, the v3 API: the library scripts/install-onednn.sh puts in .deps/onednn.)
//
// Prints GFLOP/s of: conv forward, backward data and backward weights at ResNet-50 shapes (batch 8),
// and matmul at 1024^3 and BERT-base shapes (1024 rows = batch 8 x 128 tokens), in fp32 and bf16 (bf16
// inputs, fp32 output, as convirt's mixed precision); "unimplemented" where oneDNN has no kernel on
// this CPU (oneDNN runs no bf16 below AVX-512 but AVX2-VNNI-2). BENCH_LAYOUT=nhwc fixes the activations
// (source, destination and their gradients) to NHWC, the layout convirt's bf16 ResNet keeps.
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call) do { dnnl_status_t s_ = (call); if (s_ != dnnl_success) return s_; } while (0)

static dnnl_engine_t engine;
static dnnl_stream_t stream;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static dnnl_memory_t make_memory(const_dnnl_memory_desc_t md) {
    dnnl_memory_t m;
    if (dnnl_memory_create(&m, md, engine, DNNL_MEMORY_ALLOCATE) != dnnl_success) return NULL;
    void *p;
    dnnl_memory_get_data_handle(m, &p);
    memset(p, 0, dnnl_memory_desc_get_size(md));
    return m;
}

// Times a primitive with its arguments (median of `repeats` after one warm-up run).
static double time_primitive(dnnl_primitive_t p, int n, dnnl_exec_arg_t *args, int repeats) {
    double best[16];
    dnnl_primitive_execute(p, stream, n, args);
    dnnl_stream_wait(stream);
    for (int r = 0; r < repeats; r++) {
        double t = now();
        dnnl_primitive_execute(p, stream, n, args);
        dnnl_stream_wait(stream);
        best[r] = now() - t;
    }
    for (int i = 0; i < repeats; i++)
        for (int j = i + 1; j < repeats; j++)
            if (best[j] < best[i]) { double x = best[i]; best[i] = best[j]; best[j] = x; }
    return best[repeats / 2];
}

static const char *impl(dnnl_primitive_desc_t pd) {
    const char *name = "?";
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name);
    return name;
}

// One primitive from its descriptor (created by the caller, destroyed here): creates it, allocates its
// arguments in its layouts, times it.
static dnnl_status_t run(dnnl_status_t created, dnnl_primitive_desc_t pd, const dnnl_query_t *queries, const int *arg_ids, int n, double flops,
                         int repeats, double *rate, char *name, size_t name_size) {
    CHECK(created);
    dnnl_primitive_t p;
    CHECK(dnnl_primitive_create(&p, pd));
    dnnl_exec_arg_t args[4];
    dnnl_memory_t mems[4];
    for (int i = 0; i < n; i++) {
        mems[i] = make_memory(dnnl_primitive_desc_query_md(pd, queries[i], 0));
        args[i].arg = arg_ids[i];
        args[i].memory = mems[i];
    }
    *rate = flops / time_primitive(p, n, args, repeats) / 1e9;
    snprintf(name, name_size, "%s", impl(pd));
    for (int i = 0; i < n; i++) dnnl_memory_destroy(mems[i]);
    dnnl_primitive_destroy(p);
    dnnl_primitive_desc_destroy(pd);
    return dnnl_success;
}

// The activations' layout: oneDNN's choice, or NHWC (channels last) with BENCH_LAYOUT=nhwc.
static dnnl_format_tag_t activation_tag = dnnl_format_tag_any;

static void conv(const char *label, int n, int c, int h, int o, int k, int s, int pad, dnnl_data_type_t t, int repeats) {
    int oh = (h + 2 * pad - k) / s + 1;
    dnnl_dims_t src = {n, c, h, h}, wei = {o, c, k, k}, dst = {n, o, oh, oh}, strides = {s, s}, padding = {pad, pad};
    dnnl_memory_desc_t sd, wd, dd, dsd, dwd, ddt;  // ddt: the output gradient, in the input type
    dnnl_format_tag_t act = activation_tag;
    dnnl_memory_desc_create_with_tag(&sd, 4, src, t, act);
    dnnl_memory_desc_create_with_tag(&wd, 4, wei, t, dnnl_format_tag_any);
    dnnl_memory_desc_create_with_tag(&dd, 4, dst, dnnl_f32, act);
    dnnl_memory_desc_create_with_tag(&dsd, 4, src, dnnl_f32, act);
    dnnl_memory_desc_create_with_tag(&dwd, 4, wei, dnnl_f32, dnnl_format_tag_any);
    dnnl_memory_desc_create_with_tag(&ddt, 4, dst, t, act);
    double flops = 2.0 * n * o * oh * oh * c * k * k;
    double f = 0, bd = 0, bw = 0;
    char fn[64] = "unimplemented", dn[64] = "", wn[64] = "";
    dnnl_dims_t dilates = {0, 0};
    dnnl_query_t fq[] = {dnnl_query_src_md, dnnl_query_weights_md, dnnl_query_dst_md};
    int fa[] = {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST};
    dnnl_query_t dq[] = {dnnl_query_diff_dst_md, dnnl_query_weights_md, dnnl_query_diff_src_md};
    int da[] = {DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC};
    dnnl_query_t wq[] = {dnnl_query_diff_dst_md, dnnl_query_src_md, dnnl_query_diff_weights_md};
    int wa[] = {DNNL_ARG_DIFF_DST, DNNL_ARG_SRC, DNNL_ARG_DIFF_WEIGHTS};
    // The forward primitive is also the backward ones' hint (oneDNN 3 requires one).
    dnnl_primitive_desc_t fwd = NULL, bwd_d = NULL, bwd_w = NULL, hint = NULL;
    dnnl_status_t made = dnnl_convolution_forward_primitive_desc_create(&fwd, engine, dnnl_forward_training, dnnl_convolution_direct, sd, wd,
                                                                        NULL, dd, strides, dilates, padding, padding, NULL);
    dnnl_convolution_forward_primitive_desc_create(&hint, engine, dnnl_forward_training, dnnl_convolution_direct, sd, wd, NULL, ddt, strides,
                                                   dilates, padding, padding, NULL);
    if (run(made, fwd, fq, fa, 3, flops, repeats, &f, fn, sizeof fn) != dnnl_success) {
        printf("%-26s %-5s unimplemented\n", label, t == dnnl_bf16 ? "bf16" : "fp32");
    } else {
        dnnl_status_t data = dnnl_convolution_backward_data_primitive_desc_create(&bwd_d, engine, dnnl_convolution_direct, dsd, wd, ddt, strides,
                                                                                  dilates, padding, padding, hint, NULL);
        run(data, bwd_d, dq, da, 3, flops, repeats, &bd, dn, sizeof dn);
        dnnl_status_t weights = dnnl_convolution_backward_weights_primitive_desc_create(&bwd_w, engine, dnnl_convolution_direct, sd, dwd, NULL, ddt,
                                                                                        strides, dilates, padding, padding, hint, NULL);
        run(weights, bwd_w, wq, wa, 3, flops, repeats, &bw, wn, sizeof wn);
    }
    if (hint) dnnl_primitive_desc_destroy(hint);
    dnnl_memory_desc_t mds[] = {sd, wd, dd, dsd, dwd, ddt};
    for (int i = 0; i < 6; i++) dnnl_memory_desc_destroy(mds[i]);
    if (made != dnnl_success) return;
    printf("%-26s %-5s fwd %7.1f  bwd data %7.1f  bwd weights %7.1f GFLOP/s  [%s, %s, %s]\n", label, t == dnnl_bf16 ? "bf16" : "fp32",
           f, bd, bw, fn, dn, wn);
}

static void matmul(const char *label, int m, int k, int n, dnnl_data_type_t t, int repeats) {
    dnnl_dims_t a = {m, k}, b = {k, n}, c = {m, n};
    dnnl_memory_desc_t ad, bd, cd;
    dnnl_memory_desc_create_with_tag(&ad, 2, a, t, dnnl_ab);
    dnnl_memory_desc_create_with_tag(&bd, 2, b, t, dnnl_ab);
    dnnl_memory_desc_create_with_tag(&cd, 2, c, dnnl_f32, dnnl_ab);
    dnnl_primitive_desc_t pd = NULL;
    dnnl_status_t made = dnnl_matmul_primitive_desc_create(&pd, engine, ad, bd, NULL, cd, NULL);
    dnnl_query_t q[] = {dnnl_query_src_md, dnnl_query_weights_md, dnnl_query_dst_md};
    int ids[] = {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST};
    double rate = 0;
    char name[64];
    dnnl_status_t ran = run(made, pd, q, ids, 3, 2.0 * m * n * k, repeats, &rate, name, sizeof name);
    dnnl_memory_desc_destroy(ad);
    dnnl_memory_desc_destroy(bd);
    dnnl_memory_desc_destroy(cd);
    if (ran != dnnl_success) {
        printf("%-26s %-5s unimplemented\n", label, t == dnnl_bf16 ? "bf16" : "fp32");
        return;
    }
    printf("%-26s %-5s %7.1f GFLOP/s  [%s]\n", label, t == dnnl_bf16 ? "bf16" : "fp32", rate, name);
}

int main(void) {
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success || dnnl_stream_create(&stream, engine, dnnl_stream_default_flags) != dnnl_success) {
        fprintf(stderr, "no oneDNN CPU engine\n");
        return 1;
    }
    const char *layout = getenv("BENCH_LAYOUT");
    if (layout && strcmp(layout, "nhwc") == 0) activation_tag = dnnl_nhwc;
    if (layout && strcmp(layout, "nchw") == 0) activation_tag = dnnl_nchw;
    const dnnl_version_t *v = dnnl_version();
    printf("oneDNN %d.%d.%d, ISA %d (dnnl_cpu_isa_t), OMP_NUM_THREADS=%s\n", v->major, v->minor, v->patch, (int)dnnl_get_effective_cpu_isa(),
           getenv("OMP_NUM_THREADS") ? getenv("OMP_NUM_THREADS") : "(unset)");
    dnnl_data_type_t types[] = {dnnl_f32, dnnl_bf16};
    for (int i = 0; i < 2; i++) {
        dnnl_data_type_t t = types[i];
        conv("stem 7x7/2 3->64 @224", 8, 3, 224, 64, 7, 2, 3, t, 5);
        conv("3x3 64->64 @56", 8, 64, 56, 64, 3, 1, 1, t, 5);
        conv("1x1 256->64 @56", 8, 256, 56, 64, 1, 1, 0, t, 5);
        conv("3x3 512->512 @7", 8, 512, 7, 512, 3, 1, 1, t, 5);
        matmul("matmul 1024x1024x1024", 1024, 1024, 1024, t, 5);
        matmul("BERT qkv 1024x768x768", 1024, 768, 768, t, 5);
        matmul("BERT ffn 1024x768x3072", 1024, 768, 3072, t, 5);
        matmul("BERT ffn 1024x3072x768", 1024, 3072, 768, t, 5);
    }
    dnnl_stream_destroy(stream);
    dnnl_engine_destroy(engine);
    return 0;
}
