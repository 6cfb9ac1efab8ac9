// Pointwise kernels compiled once per x86 vector ISA (AVX-512, AVX2, baseline) and chosen at load
// time by the CPU (target_clones: an ifunc resolved from cpuid). Swift compiles for the baseline
// ISA only, so its loops run 4 floats wide; these run 16 wide where the CPU allows. Every clone does
// the same IEEE operations in the same order (no contraction into FMA), so all give the bits of the
// Swift loops they replace, on any CPU.
#pragma once
#include <stdint.h>

// y[i] = x[i] * Phi(x[i]) (BERT's exact GELU, Phi as VectorMath.normalCDFAndDensity); y may be x, dx may be dy.
void ck_gelu_forward(float *y, const float *x, long count);
// dx[i] (+)= dy[i] * (Phi(x[i]) + x[i] * phi(x[i])); accumulate 0 overwrites dx.
void ck_gelu_backward(float *dx, const float *dy, const float *x, long count, int accumulate);
// The kernels that write bf16 bits convert with the CPU's instruction where it has AVX512-BF16, with
// the same bits as the integer rounding they use elsewhere: whether it has (supported), whether they do
// now (enabled), and a switch for tests (on where supported; returns the state set).
int ck_native_bf16_supported(void);
int ck_native_bf16_enabled(void);
int ck_set_native_bf16(int on);
// dst[i] = the bf16 bits of src[i] rounded to nearest even (NaN stays a quiet NaN).
void ck_bf16_bits(uint16_t *dst, const float *src, long count);
// dst[i] = src[i] rounded to bf16 (as a float); dst may be src.
void ck_bf16_round(float *dst, const float *src, long count);

// BatchNorm's sums over one run of a plane: float accumulation in 16 lanes inside blocks of 256
// elements (element i of a block into lane i % 16, the lanes then added in order), double across
// blocks. sum(x) and sum(x^2):
void ck_blocked_sums(const float *x, long count, double *sum, double *squares);
// sum(g) and sum(g * (x - mean)) * invStd with g = dy, or with relu (a ReLU fused after the forward) g = dy
// where the forward's output before it, (x - mean) * scale + shift, was positive (the forward's arithmetic,
// so the same gate as its output's sign):
void ck_blocked_gradient_sums(const float *dy, const float *x, float mean, float inv_std, int relu, float scale, float shift, long count,
                              double *sum, double *product);

// Each of the `rows` rows of `p` ([rows, tokens]) in place -> softmax over the keys j with valid[j] != 0
// (masked keys get 0): the row's maximum subtracted, e^x as VectorMath.exp, the sum in 16 lanes.
void ck_softmax_rows(float *p, const int32_t *valid, long rows, long tokens);

// Attention's weights of one (sample, head) block: p ([rows, tokens], the scores) in place -> softmax as
// ck_softmax_rows, w = dropout(p) where `dropout` (row i from stream mix64(head_stream ^ mix64(i)), element
// j its draw j: RandomStream(seed).child(h, i) as ck_dropout_forward draws it), w into dropped (may be
// NULL) and w's bf16 bits into w16.
void ck_attention_weights(float *p, uint16_t *w16, float *dropped, const int32_t *valid, long rows, long tokens, int dropout, uint64_t seed,
                          uint64_t head_stream, uint32_t limit, float scale);
// Attention's softmax backward of a block in fp32: d = dp (through the dropout where `dropped` is given:
// dp * scale where dropped != 0, else 0), dp = p * (d - rowsum(p * d)) (the sum in 16 lanes).
void ck_softmax_backward_rows(float *dp, const float *p, const float *dropped, long rows, long tokens, float scale);
// The softmax backward of that block in bf16: d = dp (through the dropout where `dropout`: dp * scale where
// w16 != 0, else 0; written into dp), ds = p * (d - rowsum(p * d)) (the sum in 16 lanes) as bf16 bits into
// ds16 (which may be w16).
void ck_attention_softmax_backward(uint16_t *ds16, float *dp, const float *p, const uint16_t *w16, long rows, long tokens, int dropout,
                                   float scale);

// Inverted dropout over the elements [start, end) of a stream's draws: element i takes word i % 4 of
// the Philox4x32-10 block i / 4 (counter: the block index, then the stream id; key: the seed), as
// RandomStream.uint32(at:). Forward: out[i] = draw >= limit ? in[i] * scale : 0 (out may be in).
void ck_dropout_forward(float *out, const float *in, long start, long end, uint64_t seed, uint64_t stream, uint32_t limit, float scale);
// Backward: dx[i] += dy[i] * scale where draw >= limit (dx unchanged elsewhere).
void ck_dropout_backward(float *dx, const float *dy, long start, long end, uint64_t seed, uint64_t stream, uint32_t limit, float scale);

// BatchNorm over rows of channels. The input, and the output gradient, come as floats (x, dy) or as bf16
// bits (x16, dy16; the other then NULL); y16 / dx16 (where given) take the output's bf16 bits (as
// ck_bf16_bits), y / dx may then be NULL (dx16 overwrites: accumulate 0). A ReLU fused after the forward is recomputed in the backward from the input:
// gate_scale and gate_shift (NULL: no ReLU) are the forward's scale and shift, and the gradient flows
// where (x - mean) * scale + shift, the forward's output before the ReLU, was positive.
// ck_channel_sums adds each lane in float inside blocks of CK_BLOCK_ROWS rows, in double across them.
#define CK_BLOCK_ROWS 256
void ck_channel_sums(const float *x, const uint16_t *x16, const float *dy, const uint16_t *dy16, const float *mean, const float *gate_scale,
                     const float *gate_shift, long rows, long stride, long width, double *first, double *second);
void ck_normalize_rows(float *y, uint16_t *y16, const float *x, const uint16_t *x16, long rows, long lanes, const float *mean,
                       const float *scale, const float *shift, int relu);
// y = (x - mean) * scale + shift over one run of a plane (NCHW), max(that, 0) with relu.
void ck_normalize_run(float *y, const float *x, long count, float mean, float scale, float shift, int relu);
void ck_bn_gradient_rows(float *dx, uint16_t *dx16, const float *dy, const uint16_t *dy16, const float *x, const uint16_t *x16, long rows,
                         long lanes,
                         const float *k, const float *sum_dy, const float *sum_dyx, const float *mean, const float *inv_std,
                         const float *gate_scale, const float *gate_shift, float m, int accumulate);
// ck_bn_gradient_rows over one run of a plane (NCHW), with one channel's values: training (k * (m * g - sum_dy
// - (x - mean) * inv_std * sum_dyx)) or evaluation (g * k); with relu, g = dy where (x - mean) * scale + shift > 0.
void ck_bn_gradient_run(float *dx, const float *dy, const float *x, long count, float k, int training, float m, float sum_dy, float sum_dyx,
                        float mean, float inv_std, int relu, float scale, float shift, int accumulate);
// y = max(a + b, 0), a and b read from their bf16 bits a16 / b16 where given; with round, float inputs and the
// output rounded to bf16 (round to nearest even); the output into y and its bf16 bits into y16, each where
// given (may be NULL); y may alias a or b.
void ck_residual_relu(float *y, uint16_t *y16, const float *a, const uint16_t *a16, const float *b, const uint16_t *b16, int round,
                      long count);
// g = dy (+ dy2 where given, in that order) where y > 0 (else 0): branch = g, identity = g (or += g with
// accumulate); branch16 / identity16 (where given) take g's bf16 bits instead of branch / identity
// (identity16: accumulate 0). dy, dy2 and y are read from their bf16 bits dy16, dy2_16, y16 where given;
// with round, float parts are rounded to bf16 before the sum and the sum after.
void ck_residual_relu_backward(float *branch, uint16_t *branch16, float *identity, uint16_t *identity16, int accumulate, const float *dy,
                               const uint16_t *dy16, const float *dy2, const uint16_t *dy2_16, int round, const float *y,
                               const uint16_t *y16, long count);
void ck_maxpool_rows(float *y, int32_t *idx, const float *x, long height, long width, long lanes, long oh, long ow, long kernel,
                     long stride, long padding, long first_row, long last_row);
void ck_layernorm_rows(float *y, float *mean, float *inv_std, const float *x, const float *gamma, const float *beta, long rows,
                       long features, float eps);
// A post-LN transformer's residual end over `rows` rows of one sample: sum = dropout(dense) + residual
// (dropout, where `dropout`, as ck_dropout_forward over the sample stream's elements from `first`), y =
// LayerNorm(sum) as ck_layernorm_rows, and y's bf16 bits into y16 where given. sum, dense: distinct; sum
// may be NULL (the sums are not kept).
void ck_residual_layernorm_rows(float *sum, float *y, uint16_t *y16, float *mean, float *inv_std, const float *dense, const float *residual,
                                const float *gamma, const float *beta, long rows, long features, float eps, int dropout, long first,
                                uint64_t seed, uint64_t stream, uint32_t limit, float scale);
// The bf16 bits of ck_gelu_forward's outputs.
void ck_gelu_forward_bf16(uint16_t *y16, const float *x, const uint16_t *x16, long count);
// ck_gelu_backward's gradient as bf16 bits into dx16, and overwriting dx too where given (may be NULL).
void ck_gelu_backward_bf16(float *dx, uint16_t *dx16, const float *dy, const uint16_t *dy16, const float *x, const uint16_t *x16, long count);

// The CPUs this process may run on (its affinity mask; 1 where unreadable).
long ck_available_cpus(void);

// A handler for signal_number that records its arrival and nothing else (SA_RESTART), the signal unblocked
// in the calling thread: 0 on success.
int ck_stop_signal_install(int signal_number);
// The signal number recorded by that handler, 0 while none has come.
int ck_stop_signal_received(void);

// One Adam(W) update over count elements (Adam.step's arithmetic, bit for bit); decoupled: p *= shrink first.
// Each new p[i] is also written to mirrors[k][mirror_offset + i] for k < mirror_count (other copies of
// the parameters). Returns how many of the new p are NaN or infinite.
long ck_adam(float *p, const float *g, float *m, float *v, long count, float step_size, float bias2_sqrt, float b2, float eps,
             float one_minus_b1, float one_minus_b2, float shrink, float l2, int decoupled, float *const *mirrors, long mirror_count,
             long mirror_offset);
// sum of x[i]^2 in double, in 8 lanes (element i into lane i % 8), the lanes then added in order.
double ck_sum_squares(const float *x, long count);
// How many of x[0..<count] are NaN or infinite.
long ck_count_nonfinite(const float *x, long count);
// LayerNorm's input gradient added to dx over rows x features (each row's sums in 16 lanes, added in order).
void ck_layernorm_backward_rows(float *dx, const float *dy, const float *x, const float *gamma, const float *mean, const float *inv_std,
                                long rows, long features);
// The backward of a post-LN transformer's residual end over `rows` rows of one sample (sum = dropout(dense)
// + residual; y = LayerNorm(sum)), from dy: LayerNorm's input gradient g (as ck_layernorm_backward_rows
// adds it to zeros) into residual (or added to it with accumulate; residual may be NULL), and dropout(g)
// (where `dropout`, as ck_dropout_forward over the sample stream's elements from `first`; else g) into
// dense: the dense layer's output gradient; its bf16 bits into dense16 where given (dense may then be NULL).
void ck_layernorm_backward_residual_rows(float *residual, int accumulate, float *dense, uint16_t *dense16, const float *dy, const float *x,
                                         const float *gamma, const float *mean, const float *inv_std, long rows, long features, int dropout, long first,
                                         uint64_t seed, uint64_t stream, uint32_t limit, float scale);
// sum[c] += x[r * ld + c] over rows in order, for columns [first, last) (a bias gradient).
void ck_column_sums(float *sum, const float *x, const uint16_t *x16, int round, long rows, long ld, long first, long last);
// LayerNorm's gamma and beta gradients for features [first, last), summed over rows in order.
void ck_layernorm_param_grads(float *grad_gamma, float *grad_beta, const float *dy, const float *x, const float *mean, const float *inv_std,
                              long rows, long features, long first, long last);
// dst[i] += src[i] for i in [0, count).
void ck_add(float *dst, const float *src, long count);

// Sums over ranks in place, elements [offset, offset + length) of `count` buffers (one per rank, in rank
// order): ranks[0][i] + ranks[1][i] + ... (added in rank order) goes to every buffer where `everywhere`
// is nonzero, else to ranks[own] alone.
void ck_sum_ranks(float *const *ranks, long count, long offset, long length, int everywhere, long own);

// A full memory fence: stores before it are visible to other processes before any access after it.
void ck_memory_fence(void);

// The augmentation's affine warp (Augment.affineWarpReference, operation for operation): out [s, s] from
// the 8-bit image `pixels` [height, width]. Output pixel (u, v) maps by the inverse rotation and scale
// (cos_t, sin_t, already divided by the scale) about the centre and the translation (tx, ty) to a point
// of the s x s view, mirrored where flip; that point scaled by (sx, sy) and offset by the crop's corner
// is sampled bilinearly (edges replicated, 0 outside), divided by 255. 0 where the point leaves the view.
void ck_affine_warp(float *out, long s, const uint8_t *pixels, long width, long height, float cos_t, float sin_t,
                    float tx, float ty, float sx, float sy, float crop_x, float crop_y, int flip);
