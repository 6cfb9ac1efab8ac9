// Multi-head scaled dot-product self-attention with a key padding mask (Vaswani et al. 2017), in the
// layout of Hugging Face's BertSelfAttention: q, k, v are [B, T, H*D] with head h in columns h*D..<(h+1)*D.
// Masked keys get probability exactly 0, which is what BERT's additive dtype-minimum bias produces.
// In bf16 the four products of each (sample, head) take bf16-rounded inputs (probabilities and their
// gradients included) and accumulate in fp32; the softmax and its backward stay fp32. Where bf16 runs
// on oneDNN (`BF16.native`) each product is one batched matmul over every sample and head, reading q,
// k, v and writing the output and gradients where they lie ([B, T, H*D] as [B, H, T, D] by strides).

import CKernels
import RealModule

public struct AttentionGeometry: Sendable, Equatable {
    public let batch, tokens, heads, headSize: Int
    public var width: Int { heads * headSize }
    public var scale: Float { 1 / Float(headSize).squareRoot() }
    /// Floats of the saved attention probabilities [B, H, T, T].
    public var probabilitiesCount: Int { batch * heads * tokens * tokens }
    /// Floats of scratch the backward pass needs: [T, T] per thread (`Parallel.threads`), and all of
    /// [B, H, T, T] for oneDNN's batched bf16 products.
    public var workspaceCount: Int { max(tokens * tokens * Parallel.threads, probabilitiesCount) }

    /// The strides of q, k, v (and their gradients, and the output) [B, T, H*D] seen as [B, H, T, D].
    var headStrides: [Int] { [tokens * width, headSize, width, 1] }
    /// The strides of a compact [B, H, T, D] (the bf16 copies, one head's rows together), and of its
    /// transpose [B, H, D, T].
    var packedStrides: [Int] { [heads * tokens * headSize, tokens * headSize, headSize, 1] }
    var transposedPackedStrides: [Int] { [heads * tokens * headSize, tokens * headSize, 1, headSize] }
    /// The strides of [B, H, T, T], and of its transpose.
    var pairStrides: [Int] { [heads * tokens * tokens, tokens * tokens, tokens, 1] }
    var transposedPairStrides: [Int] { [heads * tokens * tokens, tokens * tokens, 1, tokens] }

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

/// The bf16 operands a layer's attention keeps from its forward for its backward on oneDNN's bf16
/// kernels: q, k and v packed as [B, H, T, D], and the weights that multiplied v (the probabilities
/// after dropout) as [B, H, T, T]. With them the forward writes no fp32 copy of the dropped weights
/// (`AttentionDropout.dropped` is left alone) and the backward converts only the output gradient: the
/// dropout's mask is where those weights are not 0.
public final class AttentionCopies {
    private var storage = UnsafeMutablePointer<UInt16>.allocate(capacity: 1)
    private var capacity = 1
    /// The geometry of the forward whose operands are held.
    private(set) var held: AttentionGeometry?

    public init() {}
    deinit { storage.deallocate() }

    /// Rooms for q, k, v and the weights of a forward of geometry `g` (its contents are lost when it grows).
    func rooms(for g: AttentionGeometry) -> (q: UnsafeMutablePointer<UInt16>, k: UnsafeMutablePointer<UInt16>, v: UnsafeMutablePointer<UInt16>,
                                              weights: UnsafeMutablePointer<UInt16>) {
        let n = g.batch * g.tokens * g.width, count = 3 * n + g.probabilitiesCount
        if count > capacity {
            storage.deallocate()
            capacity = count
            storage = .allocate(capacity: count)
        }
        held = g
        return (storage, storage + n, storage + 2 * n, storage + 3 * n)
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
    /// - copies: on oneDNN's bf16 kernels, where the bf16 operands are kept for `backward` (which then
    ///   takes the same copies, and leaves `dropout.dropped` alone); ignored elsewhere.
    /// - outputBF16: where given, the output's bf16 bits ([B, T, H*D]) for the product that reads it; on
    ///   oneDNN's bf16 kernels the last product writes them, rounding its fp32 sums once, and `output`
    ///   is not written. `output` may then be nil (the floats go to temporary memory where the batched
    ///   products are unavailable).
    /// - qkvBF16: where given (bf16 only), the bf16 bits of q, k and v ([B, T, H*D]), which the products
    ///   that computed them wrote instead of their floats: q, k and v are then not read (they are only
    ///   expanded from the bits where the batched products are unavailable).
    public static func forward(output: UnsafeMutablePointer<Float>?, outputBF16: UnsafeMutablePointer<UInt16>? = nil,
                               probabilities: UnsafeMutablePointer<Float>,
                               q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                               qkvBF16: (q: UnsafePointer<UInt16>, k: UnsafePointer<UInt16>, v: UnsafePointer<UInt16>)? = nil,
                               mask: UnsafePointer<Int32>, geometry g: AttentionGeometry, dropout: AttentionDropout? = nil,
                               precision: Precision = .fp32, native: Bool = BF16.native, copies: AttentionCopies? = nil) {
        precondition(qkvBF16 == nil || precision == .bf16, "attention: bf16 inputs of an fp32 pass")
        if precision == .bf16 && native,
           (try? forwardOnDNNL(output: output, outputBF16: outputBF16, probabilities: probabilities, q: q, k: k, v: v, qkvBF16: qkvBF16,
                               mask: mask, geometry: g, dropout: dropout, copies: copies)) != nil {
            return
        }
        precondition(output != nil || outputBF16 != nil, "attention: no output")
        let t = g.tokens, d = g.headSize, w = g.width, n = g.batch * t * w, temporary = output == nil
        let output = output ?? UnsafeMutablePointer<Float>.allocate(capacity: n)
        // Inputs given as bits alone: their values as floats, in temporary memory.
        let expanded = qkvBF16.map { bits in
            let floats = UnsafeMutablePointer<Float>.allocate(capacity: 3 * n)
            for (j, x) in [bits.q, bits.k, bits.v].enumerated() {
                Parallel.chunks(n) { r in for i in r { floats[j * n + i] = BF16.value(x[i]) } }
            }
            return floats
        }
        let (q, k, v) = expanded.map { (UnsafePointer($0), UnsafePointer($0 + n), UnsafePointer($0 + 2 * n)) } ?? (q, k, v)
        defer {
            if let outputBF16 { BF16.bits(outputBF16, output, count: n) }
            if temporary { output.deallocate() }
            expanded?.deallocate()
        }
        Parallel.chunks(g.batch * g.heads, cost: 4 * t * t * d) { pairs in
        for pair in pairs {
            let b = pair / g.heads, h = pair % g.heads
            do {
                let base = b * t * w + h * d
                let p = probabilities + (b * g.heads + h) * t * t
                gemm(precision, Product(m: t, n: t, k: d, transposeB: true, alpha: g.scale),
                    a: Matrix(q + base, ld: w), b: Matrix(k + base, ld: w), c: MutableMatrix(p, ld: t), parallel: false, native: native)
                softmaxRows(p, valid: mask + b * t, tokens: t)
                var weights = UnsafePointer(p)
                if let dropout {
                    let dp = dropout.dropped + (b * g.heads + h) * t * t
                    dropRows(dp, p, tokens: t, dropout: dropout, batch: b, head: h)
                    weights = UnsafePointer(dp)
                }
                gemm(precision, Product(m: t, n: d, k: t),
                    a: Matrix(weights, ld: t), b: Matrix(v + base, ld: w), c: MutableMatrix(output + base, ld: w), parallel: false, native: native)
            }
        }
        }
    }

    /// Whether bf16 attention of geometry `g` runs on oneDNN's batched products (oneDNN makes all six;
    /// else the per-head products of rounded inputs run). `bf16Outputs`: with the output and the
    /// overwritten gradients as bf16 bits (`forward`'s outputBF16, `backward`'s gradBF16).
    public static func runsOnDNNL(_ g: AttentionGeometry, bf16Outputs: Bool = false) -> Bool {
        BF16.oneDNNRunsBF16 && (try? Products(g, Products.forward(g, bf16Output: bf16Outputs)
                                                  + Products.backward(g, accumulate: !bf16Outputs, bf16Output: bf16Outputs))) != nil
    }

    /// Each of the t rows of scores [t, t] in place -> softmax over the valid keys (masked keys get 0),
    /// in C vectorized for this CPU (`ck_softmax_rows`: VectorMath's exp, the sum in 16 lanes).
    @inline(__always)
    static func softmaxRows(_ p: UnsafeMutablePointer<Float>, valid: UnsafePointer<Int32>, tokens t: Int) {
        ck_softmax_rows(p, valid, t, t)
    }

    /// dP (the gradient of the weights, [t, t]) -> dS = P * (dP' - rowsum(dP' * P)) in place, with dP' =
    /// dP through the dropout where given (0 where the weight was dropped, dP / (1 - p) elsewhere: the
    /// mask `dropRows` would draw again, from the forward's dropped weights instead of the stream; only
    /// where the weight itself is 0, a masked key, can the two differ, and there dS is 0 either way), in
    /// C vectorized for this CPU (`ck_softmax_backward_rows`: the row sums in 16 lanes).
    @inline(__always)
    static func softmaxBackwardRows(_ dp: UnsafeMutablePointer<Float>, probabilities p: UnsafePointer<Float>, tokens t: Int,
                                    dropout: (dropped: UnsafePointer<Float>, probability: Float)?) {
        ck_softmax_backward_rows(dp, p, dropout?.dropped, t, t, dropout.map { 1 / (1 - $0.probability) } ?? 1)
    }

    /// The products of a pass on oneDNN: each a batched bf16 matmul over every (sample, head),
    /// c = alpha a b + beta c with every operand [B, H, rows, columns] by its strides.
    private struct Products {
        typealias Shape = (m: Int, n: Int, k: Int, a: [Int], b: [Int], c: [Int], alpha: Float, beta: Float, output: MatmulPrimitive.Key.Output)
        let g: AttentionGeometry
        var primitives: [MatmulPrimitive] = []

        /// Scores = scale Q K^T; output = P' V (in bf16 where `bf16Output`).
        static func forward(_ g: AttentionGeometry, bf16Output: Bool = false) -> [Shape] {
            let (t, d) = (g.tokens, g.headSize)
            return [(t, t, d, g.packedStrides, g.transposedPackedStrides, g.pairStrides, g.scale, 0, .fp32),
                    (t, d, t, g.pairStrides, g.packedStrides, g.headStrides, 1, 0, bf16Output ? .bf16 : .fp32)]
        }

        /// dV += P'^T dO; dP = dO V^T; dQ += scale dS K; dK += scale dS^T Q (= where `accumulate` is false;
        /// dV, dQ and dK in bf16 where `bf16Output`, which overwrites).
        static func backward(_ g: AttentionGeometry, accumulate: Bool = true, bf16Output: Bool = false) -> [Shape] {
            let (t, d) = (g.tokens, g.headSize), beta: Float = accumulate ? 1 : 0
            let output: MatmulPrimitive.Key.Output = bf16Output ? .bf16 : .fp32
            return [(t, d, t, g.transposedPairStrides, g.packedStrides, g.headStrides, 1, beta, output),
                    (t, t, d, g.packedStrides, g.transposedPackedStrides, g.pairStrides, 1, 0, .fp32),
                    (t, d, t, g.pairStrides, g.packedStrides, g.headStrides, g.scale, beta, output),
                    (t, d, t, g.transposedPairStrides, g.packedStrides, g.headStrides, g.scale, beta, output)]
        }

        /// Makes the primitives of `shapes` (m, n, k, strides of a, b and c, alpha, beta) first, so that a
        /// shape oneDNN refuses is known before anything is accumulated.
        init(_ g: AttentionGeometry, _ shapes: [Shape]) throws {
            self.g = g
            for (m, n, k, a, b, c, alpha, beta, output) in shapes {
                let key = MatmulPrimitive.Key(m: m, n: n, k: k, batch: [g.batch, g.heads], aStrides: a, bStrides: b, cStrides: c, alpha: alpha,
                                              beta: beta, output: output)
                guard let primitive = try MatmulPrimitive.cached(key) else { throw ConvirtError("oneDNN refused the batched bf16 matmul \(key)") }
                primitives.append(primitive)
            }
        }

        /// Runs product `index`. An error here (none is known once the primitive exists) stops the
        /// process: the pass may have accumulated part of its gradients already.
        func run(_ index: Int, a: UnsafePointer<UInt16>, b: UnsafePointer<UInt16>, c: UnsafeMutablePointer<Float>) {
            do {
                try primitives[index].execute(a: a, b: b, c: c, stream: ThreadScratch.current.stream)
            } catch {
                preconditionFailure("attention: \(error)")
            }
        }

        /// Runs product `index`, made with a bf16 output.
        func run(_ index: Int, a: UnsafePointer<UInt16>, b: UnsafePointer<UInt16>, bf16 c: UnsafeMutablePointer<UInt16>) {
            do {
                try primitives[index].execute(a: a, b: b, bits: c, stream: ThreadScratch.current.stream)
            } catch {
                preconditionFailure("attention: \(error)")
            }
        }
    }

    /// bf16 copies of tensors [B, T, H*D], each packed as [B, H, T, D] (compact operands run faster in
    /// oneDNN's small products than strided ones), into `rooms`: floats converted, bf16 bits copied as they are.
    private static func pack(_ g: AttentionGeometry, _ tensors: [RowValues], into rooms: [UnsafeMutablePointer<UInt16>]) {
        let (t, d, w) = (g.tokens, g.headSize, g.width)
        for (x, copy) in zip(tensors, rooms) {
            // Row (b, h, t) of the copy is x[b, t, h*D..<(h+1)*D].
            Parallel.chunks(g.batch * g.heads, cost: t * d) { pairs in
                for pair in pairs {
                    let b = pair / g.heads, h = pair % g.heads, block = copy + pair * t * d, first = b * t * w + h * d
                    switch x {
                    case .fp32(let floats):
                        BF16.convertBlock(block, floats + first, rows: t, columns: d, ld: w, parallel: false)
                    case .bf16(let bits):
                        for row in 0..<t { (block + row * d).update(from: bits + first + row * w, count: d) }
                    }
                }
            }
        }
    }

    /// Rooms in this thread's scratch for `count` tensors [B, T, H*D] and one [B, H, T, T] after them.
    private static func scratchRooms(_ g: AttentionGeometry, _ count: Int) -> [UnsafeMutablePointer<UInt16>] {
        let n = g.batch * g.tokens * g.width
        let base = ThreadScratch.current.ensure(bytes: 2 * (count * n + g.probabilitiesCount) + 64)
            .bindMemory(to: UInt16.self, capacity: count * n + g.probabilitiesCount)
        return (0...count).map { base + $0 * n }
    }

    /// The weights of every (sample, head) from the scores in `probabilities` (in place -> the
    /// probabilities), their dropout and the bf16 bits of the weights that multiply V into `weights16`,
    /// in one pass (`ck_attention_weights`); the dropped weights as floats into `dropout.dropped` too
    /// where `keepDropped`.
    private static func weights(_ probabilities: UnsafeMutablePointer<Float>, _ weights16: UnsafeMutablePointer<UInt16>, mask: UnsafePointer<Int32>,
                                geometry g: AttentionGeometry, dropout: AttentionDropout?, keepDropped: Bool) {
        let t = g.tokens
        let p = dropout?.probability ?? 0, scale = p > 0 ? 1 / (1 - p) : 1, limit = Dropout.threshold(p)
        Parallel.chunks(g.batch * g.heads, cost: 6 * t * t) { pairs in
            for pair in pairs {
                let b = pair / g.heads, h = pair % g.heads, o = pair * t * t
                // Row i of this block draws from streams[b].child(h, i), as `dropRows`.
                let stream = dropout.map { $0.streams[b].child(UInt64(h)) } ?? RandomStream(seed: 0)
                ck_attention_weights(probabilities + o, weights16 + o, keepDropped ? dropout.map { $0.dropped + o } : nil, mask + b * t, t, t,
                                     dropout != nil ? 1 : 0, stream.seed, stream.streamID, limit, scale)
            }
        }
    }

    /// `forward` in bf16 with oneDNN's batched products; the bf16 operands into `copies` where given, the
    /// output into `outputBF16` instead of `output` where given.
    static func forwardOnDNNL(output: UnsafeMutablePointer<Float>?, outputBF16: UnsafeMutablePointer<UInt16>?, probabilities: UnsafeMutablePointer<Float>,
                              q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
                              qkvBF16: (q: UnsafePointer<UInt16>, k: UnsafePointer<UInt16>, v: UnsafePointer<UInt16>)?, mask: UnsafePointer<Int32>,
                              geometry g: AttentionGeometry, dropout: AttentionDropout?, copies: AttentionCopies?) throws {
        let products = try Products(g, Products.forward(g, bf16Output: outputBF16 != nil))
        let rooms: [UnsafeMutablePointer<UInt16>]
        if let copies {
            let kept = copies.rooms(for: g)
            rooms = [kept.q, kept.k, kept.v, kept.weights]
        } else {
            rooms = scratchRooms(g, 3)
        }
        if let qkvBF16 {
            pack(g, [.bf16(qkvBF16.q), .bf16(qkvBF16.k), .bf16(qkvBF16.v)], into: rooms)
        } else {
            pack(g, [.fp32(q), .fp32(k), .fp32(v)], into: rooms)
        }
        // Scores = scale * Q K^T, straight into the probabilities' buffer; then the weights, in bf16.
        products.run(0, a: rooms[0], b: rooms[1], c: probabilities)
        weights(probabilities, rooms[3], mask: mask, geometry: g, dropout: dropout, keepDropped: copies == nil)
        if let outputBF16 {
            products.run(1, a: rooms[3], b: rooms[2], bf16: outputBF16)
        } else {
            products.run(1, a: rooms[3], b: rooms[2], c: output!)
        }
    }

    /// `backward` in bf16 with oneDNN's batched products; workspace: [B, H, T, T] floats. `copies`: those
    /// of the forward (else q, k, v and the dropped weights are converted again). `gradBF16`: the
    /// gradients' bf16 bits, written by the products instead of their floats.
    static func backwardOnDNNL(gradQ: UnsafeMutablePointer<Float>, gradK: UnsafeMutablePointer<Float>, gradV: UnsafeMutablePointer<Float>,
                               gradBF16: Gradients?, gradOutput: UnsafePointer<Float>, probabilities: UnsafePointer<Float>, q: UnsafePointer<Float>,
                               k: UnsafePointer<Float>, v: UnsafePointer<Float>, geometry g: AttentionGeometry,
                               workspace: UnsafeMutablePointer<Float>, dropout: AttentionDropout?, copies: AttentionCopies?,
                               accumulate: Bool) throws {
        let t = g.tokens
        let products = try Products(g, Products.backward(g, accumulate: accumulate, bf16Output: gradBF16 != nil))
        let q16, k16, v16, weights16, dO16, dS16: UnsafeMutablePointer<UInt16>
        if let copies {
            precondition(copies.held == g, "attention: backward of \(g) with the copies of another forward")
            let kept = copies.rooms(for: g), rooms = scratchRooms(g, 1)
            (q16, k16, v16, weights16, dO16, dS16) = (kept.q, kept.k, kept.v, kept.weights, rooms[0], rooms[1])
            pack(g, [.fp32(gradOutput)], into: [dO16])
        } else {
            let rooms = scratchRooms(g, 4)
            (q16, k16, v16, dO16, weights16) = (rooms[0], rooms[1], rooms[2], rooms[3], rooms[4])
            dS16 = weights16
            pack(g, [.fp32(q), .fp32(k), .fp32(v), .fp32(gradOutput)], into: rooms)
            BF16.convertBlock(weights16, dropout.map { UnsafePointer($0.dropped) } ?? probabilities, rows: g.batch * g.heads * t, columns: t,
                              ld: t, parallel: true)
        }
        // dV += P'^T dO, with P' the (dropped) weights that multiplied V.
        if let gradBF16 { products.run(0, a: weights16, b: dO16, bf16: gradBF16.v) } else { products.run(0, a: weights16, b: dO16, c: gradV) }
        // dP = dO V^T (through the dropout mask: where P' is 0), then dS = P * (dP - rowsum(dP * P)), in bf16.
        products.run(1, a: dO16, b: v16, c: workspace)
        let scale = dropout.map { 1 / (1 - $0.probability) } ?? 1
        Parallel.chunks(g.batch * g.heads, cost: 4 * t * t) { pairs in
            for pair in pairs {
                let o = pair * t * t
                ck_attention_softmax_backward(dS16 + o, workspace + o, probabilities + o, weights16 + o, t, t, dropout != nil ? 1 : 0, scale)
            }
        }
        // dQ += scale * dS K;  dK += scale * dS^T Q.
        if let gradBF16 {
            products.run(2, a: dS16, b: k16, bf16: gradBF16.q)
            products.run(3, a: dS16, b: q16, bf16: gradBF16.k)
        } else {
            products.run(2, a: dS16, b: k16, c: gradQ)
            products.run(3, a: dS16, b: q16, c: gradK)
        }
    }

    /// The bf16 bits of q's, k's and v's gradients ([B, T, H*D] each).
    public typealias Gradients = (q: UnsafeMutablePointer<UInt16>, k: UnsafeMutablePointer<UInt16>, v: UnsafeMutablePointer<UInt16>)

    /// Accumulates gradQ, gradK, gradV ([B, T, H*D]) from gradOutput, using the saved probabilities, or
    /// overwrites them where `accumulate` is false (gradients no other layer adds to: no zeros to write first).
    /// workspace: `geometry.workspaceCount` floats. `copies`: those given to the forward (`AttentionCopies`).
    /// `gradBF16` (bf16, overwriting): the gradients as bf16 bits instead (for the linear layers whose
    /// products and bias gradients read them so), written by oneDNN's batched products, rounding their fp32
    /// sums once; gradQ, gradK and gradV are then not written (elsewhere the floats are computed in
    /// temporary memory and rounded).
    public static func backward(gradQ: UnsafeMutablePointer<Float>, gradK: UnsafeMutablePointer<Float>,
                                gradV: UnsafeMutablePointer<Float>, gradBF16: Gradients? = nil, gradOutput: UnsafePointer<Float>,
                                probabilities: UnsafePointer<Float>, q: UnsafePointer<Float>, k: UnsafePointer<Float>,
                                v: UnsafePointer<Float>, geometry g: AttentionGeometry, workspace: UnsafeMutablePointer<Float>,
                                dropout: AttentionDropout? = nil, precision: Precision = .fp32, native: Bool = BF16.native,
                                copies: AttentionCopies? = nil, accumulate: Bool = true) {
        precondition(gradBF16 == nil || (precision == .bf16 && !accumulate), "attention: bf16 gradients of an fp32 pass, or added to")
        if precision == .bf16 && native,
           (try? backwardOnDNNL(gradQ: gradQ, gradK: gradK, gradV: gradV, gradBF16: gradBF16, gradOutput: gradOutput, probabilities: probabilities,
                                q: q, k: k, v: v, geometry: g, workspace: workspace, dropout: dropout, copies: copies,
                                accumulate: accumulate)) != nil {
            return
        }
        let beta: Float = accumulate ? 1 : 0
        let t = g.tokens, d = g.headSize, w = g.width, n = g.batch * t * w
        // Gradients wanted as bits alone: their floats in temporary memory, rounded at the end.
        let temporary = gradBF16.map { _ in UnsafeMutablePointer<Float>.allocate(capacity: 3 * n) }
        let (gradQ, gradK, gradV) = temporary.map { ($0, $0 + n, $0 + 2 * n) } ?? (gradQ, gradK, gradV)
        defer {
            if let gradBF16, let temporary {
                for (bits, floats) in [(gradBF16.q, gradQ), (gradBF16.k, gradK), (gradBF16.v, gradV)] { BF16.bits(bits, floats, count: n) }
                temporary.deallocate()
            }
        }
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
                gemm(precision, Product(m: t, n: d, k: t, transposeA: true, beta: beta),
                    a: Matrix(weights, ld: t), b: Matrix(dO, ld: w), c: MutableMatrix(gradV + base, ld: w), parallel: false, native: native)
                // dP = dO V^T (through the dropout mask), then dS = P * (dP - rowsum(dP * P))
                gemm(precision, Product(m: t, n: t, k: d, transposeB: true),
                    a: Matrix(dO, ld: w), b: Matrix(v + base, ld: w), c: MutableMatrix(scratch, ld: t), parallel: false, native: native)
                softmaxBackwardRows(scratch, probabilities: p, tokens: t, dropout: dropout.map { (UnsafePointer($0.dropped + pair * t * t), $0.probability) })
                // dQ += scale * dS K;  dK += scale * dS^T Q
                gemm(precision, Product(m: t, n: d, k: t, alpha: g.scale, beta: beta),
                    a: Matrix(scratch, ld: t), b: Matrix(k + base, ld: w), c: MutableMatrix(gradQ + base, ld: w), parallel: false, native: native)
                gemm(precision, Product(m: t, n: d, k: t, transposeA: true, alpha: g.scale, beta: beta),
                    a: Matrix(scratch, ld: t), b: Matrix(q + base, ld: w), c: MutableMatrix(gradK + base, ld: w), parallel: false, native: native)
            }
        }
    }
}
}
