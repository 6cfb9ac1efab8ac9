// bf16 mixed precision at the kernel level: the rounding, and every product (gemm, convolution, linear,
// attention) against the Double reference computed on bf16-rounded inputs. A product of two bf16 numbers
// is exact in fp32, so a correct bf16 product equals that reference up to fp32 accumulation (1e-5), on
// oneDNN's bf16 kernels (where it runs them: AVX-512 CPUs) and as fp32 products of rounded inputs (every
// CPU), both wherever the CPU runs both; and it must differ from the fp32 product by bf16 rounding,
// which shows the rounding happened at all.

import ConvirtCore
import ConvirtTestSupport
import Foundation
import Testing

private func rounded(_ v: [Float]) -> [Double] { v.map { Double(BF16.round($0)) } }

/// The bf16 backends this CPU runs: fp32 products of rounded inputs everywhere, oneDNN's bf16 kernels
/// where it has them (AVX-512), whichever of the two is the default.
private let bf16Backends = BF16.oneDNNRunsBF16 ? [false, true] : [false]

@Suite("bf16 mixed precision kernels")
struct BF16KernelTests {
    @Test("rounding to bf16 is round-to-nearest-even, keeps NaN, infinities and signed zeros, overflows to infinity")
    func rounding() {
        let ulp = Float(1) / 128  // bf16 spacing at 1
        #expect(BF16.round(1) == 1)
        #expect(BF16.round(1 + ulp / 2) == 1, "a tie goes to the even neighbour (1)")
        #expect(BF16.round(1 + 3 * ulp / 2) == 1 + 2 * ulp, "a tie goes to the even neighbour (1 + 2 ulp)")
        #expect(BF16.round(1 + ulp / 2 + ulp / 4096) == 1 + ulp, "just above a tie rounds up")
        #expect(BF16.round(-(1 + ulp / 2 + ulp / 4096)) == -(1 + ulp))
        #expect(BF16.round(Float.pi) == 3.140625)
        #expect(BF16.round(.infinity) == .infinity && BF16.round(-.infinity) == -.infinity)
        #expect(BF16.round(.nan).isNaN && BF16.round(-Float.nan).isNaN)
        #expect(BF16.round(Float(bitPattern: 0x7f80_0001)).isNaN, "a NaN whose payload sits in the dropped bits stays NaN")
        #expect(BF16.round(-0.0).sign == .minus && BF16.round(-0.0) == 0)
        #expect(BF16.round(.greatestFiniteMagnitude) == .infinity)
        #expect(BF16.bits(1) == 0x3f80 && BF16.bits(-2) == 0xc000)
        // Every bf16 value is its own rounding.
        for bits in stride(from: UInt32(0), to: 0x7f80_0000, by: 0x0001_0000 * 97) {
            let x = Float(bitPattern: bits)
            #expect(BF16.round(x) == x)
        }
    }

    @Test("gemm in bf16 equals the Double product of the rounded inputs, for every transposition, alpha, beta and leading dimension",
          arguments: [(false, false), (true, false), (false, true), (true, true)])
    func gemmProduct(transposes: (Bool, Bool)) {
        let (ta, tb) = transposes
        let (m, n, k) = (37, 29, 45)
        let (aRows, aColumns) = ta ? (k, m) : (m, k), (bRows, bColumns) = tb ? (n, k) : (k, n)
        let lda = aColumns + 3, ldb = bColumns + 5, ldc = n + 2
        let a = randomFloats(aRows * lda, seed: 1), b = randomFloats(bRows * ldb, seed: 2), c0 = randomFloats(m * ldc, seed: 3)
        for parallel in [true, false] { for native in bf16Backends {
            var c = c0, c32 = c0
            let (alpha, beta): (Float, Float) = (0.5, 1)
            let product = Product(m: m, n: n, k: k, transposeA: ta, transposeB: tb, alpha: alpha, beta: beta)
            a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in
                c.withUnsafeMutableBufferPointer { c in c32.withUnsafeMutableBufferPointer { c32 in
                    gemm(.bf16, product, a: Matrix(a.baseAddress!, ld: lda), b: Matrix(b.baseAddress!, ld: ldb),
                         c: MutableMatrix(c.baseAddress!, ld: ldc), parallel: parallel, native: native)
                    gemm(.fp32, product, a: Matrix(a.baseAddress!, ld: lda), b: Matrix(b.baseAddress!, ld: ldb),
                         c: MutableMatrix(c32.baseAddress!, ld: ldc), parallel: parallel)
                } }
            } }
            let ra = rounded(a), rb = rounded(b)
            var expected = c0.map(Double.init), exact = expected
            for i in 0..<m { for j in 0..<n {
                var s = 0.0, s32 = 0.0
                for p in 0..<k {
                    let ai = ta ? p * lda + i : i * lda + p, bi = tb ? j * ldb + p : p * ldb + j
                    s += ra[ai] * rb[bi]
                    s32 += Double(a[ai]) * Double(b[bi])
                }
                expected[i * ldc + j] = Double(alpha) * s + Double(beta) * Double(c0[i * ldc + j])
                exact[i * ldc + j] = Double(alpha) * s32 + Double(beta) * Double(c0[i * ldc + j])
            } }
            #expect(relativeError(c, expected) < 1e-5, "bf16 gemm \(ta) \(tb) parallel \(parallel) native \(native)")
            let fromFP32 = relativeError(c, exact)
            #expect(fromFP32 > 1e-4 && fromFP32 < 2e-2, "bf16 is bf16 rounding away from fp32: \(fromFP32)")
            #expect(relativeError(c32, exact) < 1e-5)
            // Padding between rows (beyond n) is never written.
            for i in 0..<m { for j in n..<ldc { #expect(c[i * ldc + j] == c0[i * ldc + j]) } }
        } }
    }

    @Test("a bf16 convolution (forward, accumulating backward) equals the Double reference on rounded inputs", arguments: 0..<6)
    func convolution(index: Int) throws {
        let (n, c, h, w, o, kh, kw, s, p, _) = DNNLConvolutionTests.cases[index]
        let g = try Conv2dGeometry(batch: n, inChannels: c, height: h, width: w, outChannels: o, kernel: (kh, kw), stride: (s, s), padding: (p, p))
        let x = randomFloats(g.inputCount, seed: 1), wt = randomFloats(g.weightCount, seed: 2), dy = randomFloats(g.outputCount, seed: 4)
        for native in bf16Backends {
        let conv = Convolution(nativeBF16: native)
        var workspace = [Float](repeating: 0, count: max(1, Convolution.workspaceCount(g, precision: .bf16, nativeBF16: native)))
        var y = [Float](repeating: .nan, count: g.outputCount)
        try conv.forward(output: &y, input: x, weight: wt, geometry: g, workspace: &workspace, precision: .bf16)
        #expect(relativeError(y, Reference.conv2dForward(rounded(x), rounded(wt), nil, g)) < 1e-5, "forward \(g)")
        let toFP32 = relativeError(y, Reference.conv2dForward(x.map(Double.init), wt.map(Double.init), nil, g))
        #expect(toFP32 > 1e-4 && toFP32 < 2e-2, "forward \(g): \(toFP32) from fp32")

        let dx0 = randomFloats(x.count, seed: 5), dw0 = randomFloats(wt.count, seed: 6)
        var dx = dx0, dw = dw0
        try conv.backward(gradInput: &dx, gradWeight: &dw, gradOutput: dy, input: x, weight: wt, geometry: g, workspace: &workspace, precision: .bf16)
        let (rdx, rdw, _) = Reference.conv2dBackward(rounded(dy), rounded(x), rounded(wt), g)
        #expect(relativeError(zip(dx, dx0).map { Double($0) - Double($1) }, rdx) < 1e-5, "input gradient \(g)")
        #expect(relativeError(zip(dw, dw0).map { Double($0) - Double($1) }, rdw) < 1e-5, "weight gradient \(g)")
        }
    }

    @Test("a bf16 linear layer equals the Double reference on rounded inputs; its bias adds in fp32, its gradient sums the rounded gradient")
    func linear() {
        let (rows, inF, outF) = (9, 33, 17)
        let x = randomFloats(rows * inF, seed: 1), w = randomFloats(outF * inF, seed: 2), b = randomFloats(outF, seed: 3)
        var y = [Float](repeating: .nan, count: rows * outF)
        Linear.forward(output: &y, input: x, weight: w, bias: b, rows: rows, inFeatures: inF, outFeatures: outF, precision: .bf16)
        #expect(relativeError(y, Reference.linear(rounded(x), rounded(w), b.map(Double.init), rows: rows, inFeatures: inF, outFeatures: outF)) < 1e-5)
        let dy = randomFloats(rows * outF, seed: 4)
        var dx = [Float](repeating: 0, count: x.count), dw = [Float](repeating: 0, count: w.count), db = [Float](repeating: 0, count: outF)
        Linear.backward(gradInput: &dx, gradWeight: &dw, gradBias: &db, gradOutput: dy, input: x, weight: w, rows: rows, inFeatures: inF,
                        outFeatures: outF, precision: .bf16)
        let rdy = rounded(dy), rx = rounded(x), rw = rounded(w)
        var edx = [Double](repeating: 0, count: x.count), edw = [Double](repeating: 0, count: w.count), edb = [Double](repeating: 0, count: outF)
        for r in 0..<rows { for o in 0..<outF {
            edb[o] += rdy[r * outF + o]
            for i in 0..<inF {
                edx[r * inF + i] += rdy[r * outF + o] * rw[o * inF + i]
                edw[o * inF + i] += rdy[r * outF + o] * rx[r * inF + i]
            }
        } }
        #expect(relativeError(dx, edx) < 1e-5 && relativeError(dw, edw) < 1e-5 && relativeError(db, edb) < 1e-6)
    }

    @Test("bf16 attention stays within bf16 rounding of the exact result, masked keys still get nothing")
    func attention() throws {
        let g = try AttentionGeometry(batch: 2, tokens: 6, heads: 2, headSize: 8)
        let count = g.batch * g.tokens * g.width
        let q = randomFloats(count, seed: 1, scale: 2), k = randomFloats(count, seed: 2, scale: 2), v = randomFloats(count, seed: 3)
        let mask: [Int32] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
        var out = [Float](repeating: .nan, count: count), probabilities = [Float](repeating: 0, count: g.probabilitiesCount)
        Attention.forward(output: &out, probabilities: &probabilities, q: q, k: k, v: v, mask: mask, geometry: g, precision: .bf16)
        let exact = Reference.attention(q.map(Double.init), k.map(Double.init), v.map(Double.init), mask: mask, g)
        let error = relativeError(out, exact)
        #expect(error > 1e-4 && error < 2e-2, "bf16 attention \(error) from exact")
        for b in 0..<2 { for h in 0..<2 { for i in 0..<6 { for j in 0..<6 where mask[b * 6 + j] == 0 {
            #expect(probabilities[((b * 2 + h) * 6 + i) * 6 + j] == 0)
        } } } }
        // Backward: against fp32 within bf16 rounding.
        let dOut = randomFloats(count, seed: 4)
        var workspace = [Float](repeating: 0, count: g.workspaceCount)
        func grads(_ precision: Precision) -> [Float] {
            var p = [Float](repeating: 0, count: g.probabilitiesCount), o = [Float](repeating: 0, count: count)
            Attention.forward(output: &o, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, precision: precision)
            var dq = [Float](repeating: 0, count: count), dk = dq, dv = dq
            Attention.backward(gradQ: &dq, gradK: &dk, gradV: &dv, gradOutput: dOut, probabilities: p, q: q, k: k, v: v, geometry: g,
                               workspace: &workspace, precision: precision)
            return dq + dk + dv
        }
        let g16 = grads(.bf16), g32 = grads(.fp32)
        let backward = relativeError(g16, g32)
        #expect(backward > 1e-4 && backward < 3e-2, "bf16 attention gradients \(backward) from fp32")
    }

    @Test("attention's backward overwriting its gradients gives the bits of adding them to zeros, in every precision and route")
    func attentionOverwrite() throws {
        let g = try AttentionGeometry(batch: 2, tokens: 9, heads: 2, headSize: 8)
        let count = g.batch * g.tokens * g.width
        let q = randomFloats(count, seed: 21), k = randomFloats(count, seed: 22), v = randomFloats(count, seed: 23)
        let dOut = randomFloats(count, seed: 24), mask = [Int32](repeating: 1, count: g.batch * g.tokens)
        let routes: [(Precision, Bool)] = [(.fp32, false), (.bf16, false)] + (BF16.oneDNNRunsBF16 ? [(.bf16, true)] : [])
        for (precision, native) in routes {
            var out = [Float](repeating: 0, count: count), p = [Float](repeating: 0, count: g.probabilitiesCount)
            var workspace = [Float](repeating: 0, count: g.workspaceCount)
            Attention.forward(output: &out, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, precision: precision, native: native)
            func gradients(accumulate: Bool) -> [Float] {
                var dq = [Float](repeating: accumulate ? 0 : .nan, count: count), dk = dq, dv = dq
                Attention.backward(gradQ: &dq, gradK: &dk, gradV: &dv, gradOutput: dOut, probabilities: p, q: q, k: k, v: v, geometry: g,
                                   workspace: &workspace, precision: precision, native: native, accumulate: accumulate)
                return dq + dk + dv
            }
            #expect(gradients(accumulate: false).map(\.bitPattern) == gradients(accumulate: true).map(\.bitPattern), "\(precision), native \(native)")
            guard precision == .bf16 else { continue }
            // The gradients as bf16 bits alone (what BERT's query, key and value layers read): the bits of the
            // float gradients, the floats not written. (The products round their fp32 sums once, as the
            // conversion of the floats does; oneDNN's bf16 destination flushes subnormals, which these are not.)
            var bits = [UInt16](repeating: 0xffff, count: 3 * count)
            var unwritten = [Float](repeating: .nan, count: 3 * count)
            bits.withUnsafeMutableBufferPointer { b in unwritten.withUnsafeMutableBufferPointer { u in
                let (floats, halves) = (u.baseAddress!, b.baseAddress!)
                Attention.backward(gradQ: floats, gradK: floats + count, gradV: floats + 2 * count,
                                   gradBF16: (halves, halves + count, halves + 2 * count), gradOutput: dOut, probabilities: p, q: q, k: k,
                                   v: v, geometry: g, workspace: &workspace, precision: precision, native: native, accumulate: false)
            } }
            #expect(bits == gradients(accumulate: false).map(BF16.bits), "bf16 gradients, native \(native)")
            #expect(unwritten.allSatisfy { $0.isNaN }, "the float gradients are written too, native \(native)")
        }
    }

    @Test("bf16 attention on oneDNN's batched products equals the per-head products of bf16-rounded inputs, dropout and masks included")
    func attentionOnDNNL() throws {
        guard BF16.oneDNNRunsBF16 else { return }
        let g = try AttentionGeometry(batch: 3, tokens: 20, heads: 4, headSize: 16)
        let count = g.batch * g.tokens * g.width
        let q = randomFloats(count, seed: 11, scale: 2), k = randomFloats(count, seed: 12, scale: 2), v = randomFloats(count, seed: 13)
        let dOut = randomFloats(count, seed: 14)
        #expect(Attention.runsOnDNNL(g) && Attention.runsOnDNNL(g, bf16Outputs: true), "oneDNN makes the batched products (else both sides below are the per-head path)")
        var mask = [Int32](repeating: 1, count: g.batch * g.tokens)
        for j in 13..<20 { mask[g.tokens + j] = 0 }
        for j in 1..<20 { mask[2 * g.tokens + j] = 0 }
        func run(native: Bool, copies: AttentionCopies? = nil) -> (out: [Float], p: [Float], grads: [Float], dropped: [Float]) {
            var out = [Float](repeating: .nan, count: count), p = [Float](repeating: .nan, count: g.probabilitiesCount)
            var dropped = p, workspace = [Float](repeating: 0, count: g.workspaceCount)
            let streams = (0..<g.batch).map { RandomStream(seed: 5, UInt64($0)) }
            var dq = randomFloats(count, seed: 15), dk = dq, dv = dq
            dropped.withUnsafeMutableBufferPointer { dropped in
                let dropout = AttentionDropout(probability: 0.1, streams: streams, dropped: dropped.baseAddress!)
                Attention.forward(output: &out, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, dropout: dropout, precision: .bf16,
                                  native: native, copies: copies)
                Attention.backward(gradQ: &dq, gradK: &dk, gradV: &dv, gradOutput: dOut, probabilities: p, q: q, k: k, v: v, geometry: g,
                                   workspace: &workspace, dropout: dropout, precision: .bf16, native: native, copies: copies)
            }
            return (out, p, dq + dk + dv, dropped)
        }
        let batched = run(native: true), perHead = run(native: false)
        // The same bf16 roundings on both sides; only the fp32 sums' order differs.
        #expect(relativeError(batched.out, perHead.out) < 1e-5)
        #expect(relativeError(batched.p, perHead.p) < 1e-5)
        #expect(relativeError(batched.grads, perHead.grads) < 1e-5)
        // With the forward's bf16 operands kept for the backward: the same bits, and no float copy of
        // the dropped weights written (the mask comes from their bf16 bits).
        let kept = run(native: true, copies: AttentionCopies())
        #expect(kept.out == batched.out && kept.p == batched.p && kept.grads == batched.grads, "kept copies change nothing")
        #expect(kept.dropped.allSatisfy { $0.isNaN }, "the float copy of the dropped weights is left alone")
        #expect(batched.dropped.filter { $0 == 0 }.count > batched.p.filter { $0 == 0 }.count, "some weights are dropped")
        for b in 0..<g.batch { for h in 0..<g.heads { for i in 0..<g.tokens { for j in 0..<g.tokens where mask[b * g.tokens + j] == 0 {
            #expect(batched.p[((b * g.heads + h) * g.tokens + i) * g.tokens + j] == 0)
        } } } }
        // The output in bf16 only (what BERT's next product reads): the last product rounds its fp32 sums
        // once, to the nearest bf16 (2^-8 of the value at most), sums that may differ from those of the
        // fp32 output by their order only (1e-5); the per-head path rounds its fp32 output. The floats
        // are not written on oneDNN.
        for native in [true, false] {
            var out = [Float](repeating: .nan, count: count), p = [Float](repeating: .nan, count: g.probabilitiesCount)
            var bits = [UInt16](repeating: 0xffff, count: count)
            Attention.forward(output: &out, outputBF16: &bits, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, precision: .bf16,
                              native: native)
            var reference = [Float](repeating: .nan, count: count)
            Attention.forward(output: &reference, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, precision: .bf16, native: native)
            let values = bits.map { Float(bitPattern: UInt32($0) << 16) }
            let largest = reference.map(abs).max()!
            let worst = zip(values, reference).map { abs($0 - $1) / (Float(0x1p-8) * abs($1) + 1e-5 * largest) }.max()!
            #expect(worst <= 1, "native \(native): bf16 output \(worst) of its bound")
            if native { #expect(out.allSatisfy { $0.isNaN }, "the float output is written too") } else { #expect(bits == reference.map(BF16.bits)) }
        }
        // q, k and v given as their bf16 bits alone (what BERT's products write): the bits of the pass on
        // their floats (which are rounded to those bits first), on either route, the floats never read;
        // and without a float output at all.
        let (q16, k16, v16) = (q.map(BF16.bits), k.map(BF16.bits), v.map(BF16.bits))
        let garbage = [Float](repeating: .nan, count: count)
        for native in [true, false] {
            var fromFloats = [Float](repeating: 0, count: count), fromBits = fromFloats
            var p = [Float](repeating: .nan, count: g.probabilitiesCount), pBits = p
            Attention.forward(output: &fromFloats, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, precision: .bf16, native: native)
            q16.withUnsafeBufferPointer { qb in k16.withUnsafeBufferPointer { kb in v16.withUnsafeBufferPointer { vb in
                Attention.forward(output: &fromBits, probabilities: &pBits, q: garbage, k: garbage, v: garbage,
                                  qkvBF16: (qb.baseAddress!, kb.baseAddress!, vb.baseAddress!), mask: mask, geometry: g, precision: .bf16,
                                  native: native)
                #expect(fromBits == fromFloats && pBits == p, "native \(native): bits against floats")
                var bits = [UInt16](repeating: 0xffff, count: count), reference = bits
                Attention.forward(output: nil, outputBF16: &bits, probabilities: &pBits, q: garbage, k: garbage, v: garbage,
                                  qkvBF16: (qb.baseAddress!, kb.baseAddress!, vb.baseAddress!), mask: mask, geometry: g, precision: .bf16,
                                  native: native)
                Attention.forward(output: &fromFloats, outputBF16: &reference, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g,
                                  precision: .bf16, native: native)
                #expect(bits == reference, "native \(native): bf16 output without floats")
            } } }
        }
    }

    @Test("attention's backward with dropout is the derivative of its forward (central differences in fp32, padding masked)")
    func attentionDropoutGradient() throws {
        let g = try AttentionGeometry(batch: 2, tokens: 5, heads: 2, headSize: 4)
        let count = g.batch * g.tokens * g.width
        let q = randomFloats(count, seed: 21), k = randomFloats(count, seed: 22), v = randomFloats(count, seed: 23)
        let dOut = randomFloats(count, seed: 24)
        let mask: [Int32] = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
        let streams = (0..<g.batch).map { RandomStream(seed: 9, UInt64($0)) }
        var dropped = [Float](repeating: 0, count: g.probabilitiesCount)
        func loss(_ q: [Float], _ k: [Float], _ v: [Float]) -> Double {
            var out = [Float](repeating: 0, count: count), p = [Float](repeating: 0, count: g.probabilitiesCount)
            dropped.withUnsafeMutableBufferPointer { d in
                let dropout = AttentionDropout(probability: 0.3, streams: streams, dropped: d.baseAddress!)
                Attention.forward(output: &out, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, dropout: dropout)
            }
            return zip(out, dOut).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        var out = [Float](repeating: 0, count: count), p = [Float](repeating: 0, count: g.probabilitiesCount)
        var dq = [Float](repeating: 0, count: count), dk = dq, dv = dq
        var workspace = [Float](repeating: 0, count: g.workspaceCount)
        dropped.withUnsafeMutableBufferPointer { d in
            let dropout = AttentionDropout(probability: 0.3, streams: streams, dropped: d.baseAddress!)
            Attention.forward(output: &out, probabilities: &p, q: q, k: k, v: v, mask: mask, geometry: g, dropout: dropout)
            Attention.backward(gradQ: &dq, gradK: &dk, gradV: &dv, gradOutput: dOut, probabilities: p, q: q, k: k, v: v, geometry: g,
                               workspace: &workspace, dropout: dropout)
        }
        #expect(dropped.filter { $0 == 0 }.count > p.filter { $0 == 0 }.count, "some weights are dropped")
        let h: Float = 1e-2
        for (which, grad) in [(0, dq), (1, dk), (2, dv)] {
            var worst = 0.0
            let scale = Double(grad.map(abs).max()!)
            for i in 0..<count {
                var inputs = [q, k, v]
                inputs[which][i] += h
                let up = loss(inputs[0], inputs[1], inputs[2])
                inputs[which][i] -= 2 * h
                let down = loss(inputs[0], inputs[1], inputs[2])
                worst = max(worst, abs((up - down) / Double(2 * h) - Double(grad[i])) / scale)
            }
            #expect(worst < 5e-3, "tensor \(which): worst error \(worst) of the largest gradient \(scale)")
        }
    }

    @Test("auto chooses bf16 exactly where the CPU has AMX-BF16 or AVX512-BF16, and says so")
    func autoChoice() {
        #expect(PrecisionChoice.fp32.resolved() == .fp32 && PrecisionChoice.bf16.resolved() == .bf16)
        guard ProcessInfo.processInfo.environment["CONVIRT_PRECISION"] == nil else { return }
        #expect(PrecisionChoice.auto.resolved() == (BF16.hardwareSupport != nil ? .bf16 : .fp32))
        #expect(PrecisionChoice.auto.describe().hasPrefix("precision \(PrecisionChoice.auto.resolved().rawValue) (auto: the CPU has"))
        // Where oneDNN runs bf16 the CPU has AVX-512 (Debian's oneDNN 2.6 has no bf16 below it); its bf16
        // kernels are the default where it has AMX, and on AMD's AVX512-BF16 (Zen 4).
        if BF16.oneDNNRunsBF16 { #expect(DNNL.isa.hasPrefix("avx512")) }
        if ProcessInfo.processInfo.environment["CONVIRT_BF16"] == nil {
            let vendor = BLASCore.cpu?.vendor ?? ""
            #expect(BF16.native == (BF16.oneDNNRunsBF16 && BF16.prefersNative(isa: DNNL.isa, vendor: vendor)))
        }
        #expect(BF16.prefersNative(isa: "avx512_core_amx", vendor: "GenuineIntel"))
        #expect(BF16.prefersNative(isa: "avx512_core_bf16", vendor: "AuthenticAMD"))
        #expect(!BF16.prefersNative(isa: "avx512_core_bf16", vendor: "GenuineIntel"))
        #expect(!BF16.prefersNative(isa: "avx2", vendor: "AuthenticAMD"))
    }
}

@Suite("bf16 operand copies")
struct BF16OperandTests {
    /// One linear layer's forward and backward in bf16, with or without kept copies; `sharedInput`: the
    /// input's copy was made by another layer reading the same input (query, key, value).
    func run(x: [Float], w: [Float], dy: [Float], rows: Int, inF: Int, outF: Int, copies: Linear.Copies?) -> [Float] {
        var y = [Float](repeating: 0, count: rows * outF), dx = [Float](repeating: 0.5, count: rows * inF)
        var dw = [Float](repeating: 0.25, count: w.count)
        Linear.forward(output: &y, input: x, weight: w, bias: nil, rows: rows, inFeatures: inF, outFeatures: outF, precision: .bf16,
                       copies: copies)
        Linear.backward(gradInput: &dx, gradWeight: &dw, gradBias: nil, gradOutput: dy, input: x, weight: w, rows: rows, inFeatures: inF,
                        outFeatures: outF, precision: .bf16, copies: copies)
        return y + dx + dw
    }

    /// A frozen layer's product with GELU as its post-op (`Linear.forwardGELU`) against the product's
    /// fp32 output put through our GELU and rounded: each rounds its own fp32 GELU to the nearest bf16,
    /// so the two may land one bf16 step apart (at most 2^-7 of the value), and the two fp32 GELUs x Phi(x) differ by their Phi's error times |x|: ours is
    /// within 3e-7 (`GELU.forward`), oneDNN's (erf to 1.5e-7, Abramowitz and Stegun 7.1.26) within 7.5e-8. Each row is computed as in a
    /// product of fewer rows (a rank's share), and weights kept by version are converted anew at another.
    @Test("a product with GELU as its post-op: within bf16 rounding and erf's error of GELU of the product, each row as alone",
          .enabled(if: BF16.native, "oneDNN runs no bf16 kernels on this CPU: frozen layers run the product and GELU in turn"))
    func geluPostOp() throws {
        let (rows, inF, outF) = (37, 48, 40)
        let x = randomFloats(rows * inF, seed: 11), bias = randomFloats(outF, seed: 13)
        var w = randomFloats(outF * inF, seed: 12)
        let copies = Linear.Copies(input: BF16Operand(), weight: BF16Operand(), gradOutput: BF16Operand())
        func fused(_ range: Range<Int>, version: UInt64? = nil) -> [UInt16]? {
            var y = [UInt16](repeating: 0xffff, count: range.count * outF)
            let input = Array(x[range.lowerBound * inF..<range.upperBound * inF])
            let done = Linear.forwardGELU(outputBF16: &y, input: input, weight: w, bias: bias, rows: range.count, inFeatures: inF, outFeatures: outF,
                                          copies: copies.keepingWeights(at: version))
            return done ? y : nil
        }
        let y = try #require(fused(0..<rows), "oneDNN refused the product")
        var product = [Float](repeating: 0, count: rows * outF), reference = [UInt16](repeating: 0, count: rows * outF)
        Linear.forward(output: &product, input: x, weight: w, bias: bias, rows: rows, inFeatures: inF, outFeatures: outF, precision: .bf16)
        GELU.forwardBF16(output: &reference, input: product, count: rows * outF)
        func float(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }
        let worst = (0..<y.count).map { i -> Float in
            let bound = Float(0x1p-7) * abs(float(reference[i])) + 3.75e-7 * abs(product[i]) + Float.leastNormalMagnitude
            return abs(float(y[i]) - float(reference[i])) / bound
        }.max()!
        #expect(worst <= 1, "GELU post-op: \(worst) of the bound")
        #expect(y == fused(0..<20)! + fused(20..<rows)!, "rows of the whole product differ from those of its halves")
        // Weights kept at a version: taken as they are at that version, converted anew at another.
        let kept = fused(0..<rows, version: 1)
        for i in w.indices { w[i] = w[i] * 0.5 + 0.01 }  // in place: the same block
        #expect(fused(0..<rows, version: 1) == kept, "kept weights were converted anew")
        #expect(fused(0..<rows, version: 2) == fused(0..<rows), "weights at a new version were not converted anew")
    }

    /// A linear layer whose only readers take bf16 (BERT's query, key and value) writes its output as bf16
    /// bits (`Linear.forwardBF16`): each fp32 sum plus the bias, rounded once to the nearest even bf16, the
    /// bits of `forward`'s floats rounded (the same sums, in one product), each row as in a product of fewer rows.
    @Test("a product with a bf16 output gives the bits of the fp32 output rounded, each row as alone",
          .enabled(if: BF16.native, "oneDNN runs no bf16 kernels on this CPU: the products write floats"))
    func bf16OutputProduct() throws {
        let (rows, inF, outF) = (37, 48, 40)
        let x = randomFloats(rows * inF, seed: 21), w = randomFloats(outF * inF, seed: 22), bias = randomFloats(outF, seed: 23)
        func bits(_ range: Range<Int>) -> [UInt16]? {
            var y = [UInt16](repeating: 0xffff, count: range.count * outF)
            let input = Array(x[range.lowerBound * inF..<range.upperBound * inF])
            let copies = Linear.Copies(input: BF16Operand(), weight: BF16Operand(), gradOutput: BF16Operand())
            let done = Linear.forwardBF16(outputBF16: &y, input: input, weight: w, bias: bias, rows: range.count, inFeatures: inF,
                                          outFeatures: outF, copies: copies)
            return done ? y : nil
        }
        let y = try #require(bits(0..<rows), "oneDNN refused the product")
        var floats = [Float](repeating: 0, count: rows * outF)
        Linear.forward(output: &floats, input: x, weight: w, bias: bias, rows: rows, inFeatures: inF, outFeatures: outF, precision: .bf16)
        #expect(y == floats.map(BF16.bits))
        #expect(y == bits(0..<20)! + bits(20..<rows)!, "rows of the whole product differ from those of its halves")
        // A backward whose input gradient is wanted in bf16 alone (BERT's output layer): the bits of the float
        // input gradient, with and without the forward's copies; the weight gradient unchanged.
        let dy = randomFloats(rows * outF, seed: 24)
        for kept in [true, false] {
            let copies = kept ? Linear.Copies(input: BF16Operand(), weight: BF16Operand(), gradOutput: BF16Operand()) : nil
            func run(_ halves: Bool) -> (dx: [Float], dx16: [UInt16], dw: [Float]) {
                var dx = [Float](repeating: 0, count: rows * inF), dx16 = [UInt16](repeating: 0xffff, count: rows * inF)
                var dw = [Float](repeating: 0, count: outF * inF), scratch = [Float](repeating: 0, count: rows * outF)
                Linear.forward(output: &scratch, input: x, weight: w, bias: nil, rows: rows, inFeatures: inF, outFeatures: outF, precision: .bf16,
                               copies: copies)
                dx.withUnsafeMutableBufferPointer { dx in dx16.withUnsafeMutableBufferPointer { dx16 in
                    Linear.backward(gradInput: halves ? nil : dx.baseAddress!, gradInputBF16: halves ? dx16.baseAddress! : nil, gradWeight: &dw,
                                    gradBias: nil, gradOutput: dy, input: x, weight: w, rows: rows, inFeatures: inF, outFeatures: outF,
                                    precision: .bf16, accumulateInput: false, copies: copies)
                } }
                return (dx, dx16, dw)
            }
            let (floats, halves) = (run(false), run(true))
            #expect(halves.dx16 == floats.dx.map(BF16.bits) && halves.dw == floats.dw, "copies kept \(kept)")
        }
    }

    // (Where bf16 runs as the rounded-fp32 emulation, no copies are kept and the two agree trivially.)
    @Test("a linear layer's kept bf16 copies give the products of fresh conversions bit for bit, new weights and inputs converted anew")
    func copiesMatchFreshConversions() {
        let (rows, inF, outF) = (37, 48, 24)
        let x = randomFloats(rows * inF, seed: 1), dy = randomFloats(rows * outF, seed: 3)
        var w = randomFloats(outF * inF, seed: 2)
        let shared = BF16Operand(), dyCopy = BF16Operand()
        let first = Linear.Copies(input: shared, weight: BF16Operand(), gradOutput: dyCopy)
        let second = Linear.Copies(input: shared, weight: BF16Operand(), gradOutput: dyCopy, reuseInput: true)
        // (Bools, not the arrays: a failure would print thousands of floats.)
        func same(_ x: [Float], _ w: [Float], _ dy: [Float], _ copies: Linear.Copies) -> Bool {
            run(x: x, w: w, dy: dy, rows: rows, inF: inF, outF: outF, copies: copies) == run(x: x, w: w, dy: dy, rows: rows, inF: inF, outF: outF, copies: nil)
        }
        #expect(same(x, w, dy, first), "one layer")
        // The same input read by a second layer through the shared copy; another output gradient.
        #expect(same(x, w, randomFloats(rows * outF, seed: 4), second), "a second layer on the shared input")
        // The next step: the same buffers with new weights and a new input (a forward converts them again).
        w = w.map { $0 * 0.5 + 0.01 }
        let x2 = randomFloats(rows * inF, seed: 5), x3 = randomFloats(rows * inF, seed: 6)
        withExtendedLifetime((x2, x3)) {
            #expect(same(x2, w, dy, first), "new weights and input")
            // A layer whose input is another block than the shared copy holds (both alive: other addresses).
            #expect(same(x3, w, dy, second), "another input")
        }
    }
}
