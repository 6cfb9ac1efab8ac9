// Multi-head scaled dot-product self-attention with a key padding mask (Vaswani et al. 2017), in the
// layout of Hugging Face's BertSelfAttention: q, k, v are [B, T, H*D] with head h in columns h*D..<(h+1)*D.
// Masked keys get probability exactly 0, which is what BERT's additive dtype-minimum bias produces.
// In bf16 the four products of each (sample, head) take bf16-rounded inputs (probabilities and their
// gradients included) and accumulate in fp32; the softmax and its backward stay fp32.

import RealModule

public struct AttentionGeometry: Sendable, Equatable {
    public let batch, tokens, heads, headSize: Int
    public var width: Int { heads * headSize }
    public var scale: Float { 1 / Float(headSize).squareRoot() }
    /// Floats of the saved attention probabilities [B, H, T, T].
    public var probabilitiesCount: Int { batch * heads * tokens * tokens }
    /// Floats of scratch the backward pass needs: [T, T] per thread (`Parallel.threads`).
    public var workspaceCount: Int { tokens * tokens * Parallel.threads }

    public init(batch: Int, tokens: Int, heads: Int, headSize: Int) throws {
        try require(batch > 0 && tokens > 0 && heads > 0 && headSize > 0, "attention",
                    "sizes must be positive (batch \(batch), tokens \(tokens), heads \(heads), head size \(headSize))")
        self.batch = batch; self.tokens = tokens; self.heads = heads; self.headSize = headSize
    }

    /// FLOPs of the two batched products of the forward pass.
    public var forwardFLOPs: Double { 4 * Double(batch * heads) * Double(tokens * tokens) * Double(headSize) }
}

/// Dropout on the attention probabilities (BERT's attention_probs_dropout_prob): the mask of sample b,
/// head h is drawn from streams[b].child(h); `dropped` [B, H, T, T] keeps the dropped probabilities.
public struct AttentionDropout {
    public var probability: Float
    public var streams: [RandomStream]
    public var dropped: UnsafeMutablePointer<Float>

    public init(probability: Float, streams: [RandomStream], dropped: UnsafeMutablePointer<Float>) {
        self.probability = probability
        self.streams = streams
        self.dropped = dropped
    }
}

public enum Attention {
    /// Dropout of one (sample, head) block of attention weights, row by row: row i draws from
    /// streams[b].child(h, i), so the mask of a (query, key) pair does not depend on how many tokens the
    /// batch is padded to.
    static func dropRows(_ output: UnsafeMutablePointer<Float>, _ input: UnsafePointer<Float>, tokens t: Int, dropout: AttentionDropout,
                         batch b: Int, head h: Int) {
        let stream = dropout.streams[b]
        for i in 0..<t {
            Dropout.serialForward(output: output + i * t, input: input + i * t, count: t, probability: dropout.probability,
                                  stream: stream.child(UInt64(h), UInt64(i)))
        }
    }

    /// output[b, i, h] = sum_j softmax_j(q[b,i,h] . k[b,j,h] * scale, over valid j) * v[b, j, h]
    /// - output, q, k, v: [B, T, H*D]; mask: [B, T] (non-zero = valid; each row needs one valid token);
    ///   probabilities: [B, H, T, T], kept for backward.
    public static func forward(output: UnsafeMutablePointer<Float>, probabilities: UnsafeMutablePointer<Float>,
                               q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                               mask: UnsafePointer<Int32>, geometry g: AttentionGeometry, dropout: AttentionDropout? = nil,
                               precision: Precision = .fp32) {
        let t = g.tokens, d = g.headSize, w = g.width
        Parallel.chunks(g.batch * g.heads, cost: 4 * t * t * d) { pairs in
        for pair in pairs {
            let b = pair / g.heads, h = pair % g.heads
            let valid = mask + b * t
            do {
                let base = b * t * w + h * d
                let p = probabilities + (b * g.heads + h) * t * t
                gemm(precision, transposeA: false, transposeB: true, m: t, n: t, k: d, alpha: g.scale,
                      a: q + base, lda: w, b: k + base, ldb: w, c: p, ldc: t, parallel: false)
                for i in 0..<t {
                    let row = p + i * t
                    var m = -Float.infinity
                    for j in 0..<t where valid[j] != 0 { m = max(m, row[j]) }
                    var s: Float = 0
                    for j in 0..<t {
                        if valid[j] != 0 {
                            let e = Float.exp(row[j] - m)
                            row[j] = e
                            s += e
                        } else {
                            row[j] = 0
                        }
                    }
                    let inv = 1 / s
                    for j in 0..<t { row[j] *= inv }
                }
                var weights = UnsafePointer(p)
                if let dropout {
                    let dp = dropout.dropped + (b * g.heads + h) * t * t
                    dropRows(dp, p, tokens: t, dropout: dropout, batch: b, head: h)
                    weights = UnsafePointer(dp)
                }
                gemm(precision, transposeA: false, transposeB: false, m: t, n: d, k: t,
                      a: weights, lda: t, b: v + base, ldb: w, c: output + base, ldc: w, parallel: false)
            }
        }
        }
    }

    /// Accumulates gradQ, gradK, gradV ([B, T, H*D]) from gradOutput, using the saved probabilities.
    /// workspace: `geometry.workspaceCount` floats.
    public static func backward(gradQ: UnsafeMutablePointer<Float>, gradK: UnsafeMutablePointer<Float>,
                                gradV: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                probabilities: UnsafePointer<Float>, q: UnsafePointer<Float>, k: UnsafePointer<Float>,
                                v: UnsafePointer<Float>, geometry g: AttentionGeometry, workspace: UnsafeMutablePointer<Float>,
                                dropout: AttentionDropout? = nil, precision: Precision = .fp32) {
        let t = g.tokens, d = g.headSize, w = g.width
        // Pairs run in parallel, each with its own t x t scratch inside `workspace`.
        Parallel.indexedChunks(g.batch * g.heads, cost: 8 * t * t * d) { part, pairs in
        let scratch = workspace + part * t * t
        for pair in pairs {
            let b = pair / g.heads, h = pair % g.heads
            do {
                let base = b * t * w + h * d
                let p = probabilities + (b * g.heads + h) * t * t
                let dO = gradOutput + base
                // dV += P'^T dO, with P' the (dropped) weights that multiplied V
                let weights = dropout.map { UnsafePointer($0.dropped + (b * g.heads + h) * t * t) } ?? p
                gemm(precision, transposeA: true, transposeB: false, m: t, n: d, k: t,
                      a: weights, lda: t, b: dO, ldb: w, beta: 1, c: gradV + base, ldc: w, parallel: false)
                // dP = dO V^T (through the dropout mask), then dS = P * (dP - rowsum(dP * P))
                gemm(precision, transposeA: false, transposeB: true, m: t, n: t, k: d,
                      a: dO, lda: w, b: v + base, ldb: w, c: scratch, ldc: t, parallel: false)
                if let dropout { dropRows(scratch, scratch, tokens: t, dropout: dropout, batch: b, head: h) }
                for i in 0..<t {
                    let pr = p + i * t, dr = scratch + i * t
                    var dot: Float = 0
                    for j in 0..<t { dot += pr[j] * dr[j] }
                    for j in 0..<t { dr[j] = pr[j] * (dr[j] - dot) }
                }
                // dQ += scale * dS K;  dK += scale * dS^T Q
                gemm(precision, transposeA: false, transposeB: false, m: t, n: d, k: t, alpha: g.scale,
                      a: scratch, lda: t, b: k + base, ldb: w, beta: 1, c: gradQ + base, ldc: w, parallel: false)
                gemm(precision, transposeA: true, transposeB: false, m: t, n: d, k: t, alpha: g.scale,
                      a: scratch, lda: t, b: q + base, ldb: w, beta: 1, c: gradK + base, ldc: w, parallel: false)
            }
        }
    }
}
}
