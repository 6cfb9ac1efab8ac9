// The vectorized elementary functions against Double references, and the fused passes of the ResNet
// (BatchNorm with the ReLU after it, a residual block's sum and ReLU) against the separate kernels.

import CKernels
import ConvirtCore
import Foundation
import Testing

@Suite("Vectorized functions and fused kernels")
struct FusedKernelTests {
    func map(_ values: [Float], _ f: (Float) -> Float) -> [Float] { values.map(f) }

    @Test("exp is within 2.5e-7 relative of Double's over its whole range")
    func exp() {
        let xs = (0...200_000).map { Float(-87 + 175 * Double($0) / 200_000) } + [0, -0.0, 1, -1, 0.5]
        let ys = map(xs) { VectorMath.exp($0) }
        var worst = 0.0
        for (x, y) in zip(xs, ys) {
            let exact = Foundation.exp(Double(x))
            worst = max(worst, abs(Double(y) - exact) / exact)
        }
        #expect(worst < 2.5e-7, "worst relative error \(worst)")
    }

    @Test("the normal CDF is within 3e-7 of Double's (A&S 7.1.26: 7.5e-8, plus float rounding), its density as accurate as float's x^2 allows")
    func normalCDF() {
        let xs = (0...100_000).map { Float(-12 + 24 * Double($0) / 100_000) }
        let cdf = map(xs) { VectorMath.normalCDFAndDensity($0).cdf }
        let density = map(xs) { VectorMath.normalCDFAndDensity($0).density }
        var worstCDF = 0.0, worstDensity = 0.0
        for (k, x) in xs.enumerated() {
            let d = Double(x)
            let exactCDF = 0.5 * Foundation.erfc(-d / 2.0.squareRoot()), exactDensity = Foundation.exp(-d * d / 2) / (2 * Double.pi).squareRoot()
            worstCDF = max(worstCDF, abs(Double(cdf[k]) - exactCDF))
            // x^2 / 2 in float carries a relative error of 6e-8, which e^(-x^2/2) turns into 6e-8 * x^2 / 2.
            if exactDensity > 1e-30 {
                worstDensity = max(worstDensity, abs(Double(density[k]) - exactDensity) / exactDensity / max(1, d * d / 2))
            }
            #expect(cdf[k] >= 0 && cdf[k] <= 1)
        }
        #expect(worstCDF < 3e-7, "worst CDF error \(worstCDF)")
        #expect(worstDensity < 4e-7, "worst density relative error per unit of x^2/2: \(worstDensity)")
        // 0 and 1 at the far ends, 0.5 at zero; exp underflows to 0.
        #expect(map([-50, 50, 0]) { VectorMath.normalCDFAndDensity($0).cdf } == [0, 1, 0.5])
        #expect(map([-100, -87.5, 0]) { VectorMath.exp($0) } == [0, 0, 1])
    }

    @Test("the C kernels built per vector ISA (GELU forward and backward, bf16 rounding) give the Swift loops' bits")
    func clonedKernels() {
        // Every 4099th float bit pattern (NaNs, infinities, subnormals, both signs), then a dense grid
        // over GELU's working range, at a length that is no multiple of any vector width.
        var xs = stride(from: UInt64(0), through: 0xffff_ffff, by: 4099).map { Float(bitPattern: UInt32($0)) }
        xs += (0...200_001).map { Float(-20 + 40 * Double($0) / 200_001) }
        let n = xs.count
        let dy = (0..<n).map { Float(($0 % 97) - 48) / 16 }
        var fast = [Float](repeating: 0, count: n), slow = fast
        // The first input whose two results differ in any bit (nil: none); NaN matches any NaN (which
        // operand's payload a product passes on depends on the operand order the compiler picked).
        func firstDifference(_ a: [Float], _ b: [Float]) -> String? {
            guard let i = a.indices.first(where: { a[$0].bitPattern != b[$0].bitPattern && !(a[$0].isNaN && b[$0].isNaN) }) else { return nil }
            return "x \(xs[i]) (bits \(String(xs[i].bitPattern, radix: 16))): \(a[i]) against \(b[i])"
        }
        // The same for bf16 bits: the first input whose bits differ (nil: none), a NaN matching any NaN,
        // whatever its sign and payload, where `nanPayloads` is false.
        func firstBitsDifference(_ a: [UInt16], _ b: some Sequence<UInt16>, nanPayloads: Bool = true) -> String? {
            func isNaN(_ h: UInt16) -> Bool { h & 0x7fff > 0x7f80 }
            guard let (i, pair) = zip(a, b).enumerated().first(where: { $1.0 != $1.1 && (nanPayloads || !(isNaN($1.0) && isNaN($1.1))) })
            else { return nil }
            return "x \(xs[i]) (bits \(String(xs[i].bitPattern, radix: 16))): bf16 bits \(String(pair.0, radix: 16)) against \(String(pair.1, radix: 16))"
        }
        GELU.forward(output: &fast, input: xs, count: n)
        GELU.forwardReference(output: &slow, input: xs, count: n)
        let forward = firstDifference(fast, slow)
        #expect(forward == nil, "GELU forward: \(forward ?? "")")
        for accumulate in [false, true] {
            fast = dy.map { $0 * 0.5 }; slow = fast
            GELU.backward(gradInput: &fast, gradOutput: dy, input: xs, count: n, accumulate: accumulate)
            GELU.backwardReference(gradInput: &slow, gradOutput: dy, input: xs, count: n, accumulate: accumulate)
            let backward = firstDifference(fast, slow)
            #expect(backward == nil, "GELU backward, accumulate \(accumulate): \(backward ?? "")")
        }
        // The backward with its bf16 bits: the same floats (overwritten), and their bits.
        GELU.backward(gradInput: &slow, gradOutput: dy, input: xs, count: n, accumulate: false)
        var gradBits = [UInt16](repeating: 0, count: n)
        fast = dy
        GELU.backwardBF16(gradInput: &fast, gradInputBF16: &gradBits, gradOutput: dy, input: xs, count: n)
        let backwardBF16 = firstDifference(fast, slow)
        #expect(backwardBF16 == nil, "GELU backward with bf16 bits: \(backwardBF16 ?? "")")
        // (The floats' NaNs may differ in sign and payload, as above, and with them their bits: the AVX2
        // clone's product passes on the other operand's NaN.)
        let gradientBits = firstBitsDifference(gradBits, slow.lazy.map { BF16.bits($0) }, nanPayloads: false)
        #expect(gradientBits == nil, "GELU backward's bf16 bits: \(gradientBits ?? "")")
        BF16.round(&fast, xs, count: n)
        let rounding = firstDifference(fast, xs.map { BF16.round($0) })
        #expect(rounding == nil, "bf16 rounding: \(rounding ?? "")")
        var bits = [UInt16](repeating: 0, count: n)
        BF16.convertBlock(&bits, xs, rows: 1, columns: n, ld: n, parallel: false)
        let conversion = firstBitsDifference(bits, xs.lazy.map { BF16.bits($0) })
        #expect(conversion == nil, "bf16 bits: \(conversion ?? "")")
        // GELU's bf16 bits alone: those of its floats (NaN inputs included: a NaN's bits stay a quiet NaN).
        GELU.forward(output: &fast, input: xs, count: n)
        GELU.forwardBF16(output: &bits, input: xs, count: n)
        let geluBits = firstBitsDifference(bits, fast.lazy.map { BF16.bits($0) })
        #expect(geluBits == nil, "GELU's bf16 bits: \(geluBits ?? "")")
        // Inputs read from bf16 bits (a bf16 pass's intermediate product and output gradient): the bits of
        // the same kernels on those values as floats, with no float gradient written. The bits are read in
        // pieces of 1,009 (serial, at offsets no multiple of a vector), so that each value meets the other
        // side's vector body in its scalar tail and the other way round: an element's value does not depend
        // on where a chunk starts. A NaN matches any NaN here: an AVX2 clone's vector body and its scalar
        // tail pass on a NaN input's sign differently (which operand's NaN an operation passes on, and the
        // sign of |x|'s NaN, are not fixed by IEEE 754), and the chunks follow the thread count.
        let (x16, dy16) = (xs.map(BF16.bits), dy.map(BF16.bits))
        let (xRounded, dyRounded) = (x16.map(BF16.value), dy16.map(BF16.value))
        var fromBits = [UInt16](repeating: 0, count: n), fromFloats = fromBits
        let pieces = stride(from: 0, to: n, by: 1009).map { $0..<min($0 + 1009, n) }
        x16.withUnsafeBufferPointer { x in fromBits.withUnsafeMutableBufferPointer { out in
            for r in pieces { GELU.forwardBF16(output: out.baseAddress! + r.lowerBound, input: .bf16(x.baseAddress! + r.lowerBound), count: r.count) }
        } }
        GELU.forwardBF16(output: &fromFloats, input: xRounded, count: n)
        let forwardFromBits = firstBitsDifference(fromBits, fromFloats, nanPayloads: false)
        #expect(forwardFromBits == nil, "GELU forward from bf16 bits: \(forwardFromBits ?? "")")
        GELU.backwardBF16(gradInput: nil, gradInputBF16: &fromFloats, gradOutput: dyRounded, input: xRounded, count: n)
        x16.withUnsafeBufferPointer { x in dy16.withUnsafeBufferPointer { d in fromBits.withUnsafeMutableBufferPointer { out in
            for r in pieces {
                let o = r.lowerBound
                GELU.backwardBF16(gradInput: nil, gradInputBF16: out.baseAddress! + o, gradOutput: .bf16(d.baseAddress! + o),
                                  input: .bf16(x.baseAddress! + o), count: r.count)
            }
        } } }
        let backwardFromBits = firstBitsDifference(fromBits, fromFloats, nanPayloads: false)
        #expect(backwardFromBits == nil, "GELU backward from bf16 bits: \(backwardFromBits ?? "")")
    }

    @Test("softmax rows give the bits of the plain loop: one running maximum over the valid keys, VectorMath's exp, the sum in 16 lanes")
    func softmaxRows() {
        // Scores with NaNs, infinities and zeros of both signs among ordinary values, masked keys, and
        // row lengths below, at and between multiples of the 16 lanes.
        let stream = RandomStream(seed: 11)
        var drawn: UInt64 = 0
        func next() -> UInt32 { drawn += 1; return stream.uint32(at: drawn) }
        for tokens in [1, 7, 16, 17, 31, 32, 33, 128, 130] {
            let rows = 5
            let valid = (0..<tokens).map { _ in Int32(next() % 5 == 0 ? 0 : 1) }
            var scores = (0..<rows * tokens).map { _ -> Float in
                switch next() % 40 {
                case 0: return .nan
                case 1: return .infinity
                case 2: return -.infinity
                case 3: return 0
                case 4: return -0.0
                default: return Float(Int(next() % 20_001) - 10_000) / 400
                }
            }
            // A row of zeros of both signs only, and a row of NaNs only.
            for j in 0..<tokens { scores[j] = j % 2 == 0 ? 0 : -0.0; scores[tokens + j] = .nan }
            var expected = scores
            for r in 0..<rows {
                let row = r * tokens
                var m = -Float.infinity
                for j in 0..<tokens {
                    let v = valid[j] != 0 ? scores[row + j] : -.infinity
                    m = v > m ? v : m
                }
                var lanes = [Float](repeating: 0, count: 16)
                for j in 0..<tokens {
                    let e = VectorMath.exp(scores[row + j] - m)
                    expected[row + j] = valid[j] != 0 ? e : 0
                }
                for j in 0..<tokens { lanes[j < tokens / 16 * 16 ? j % 16 : j - tokens / 16 * 16] += expected[row + j] }
                let inverse = 1 / lanes.reduce(0, +)
                for j in 0..<tokens { expected[row + j] *= inverse }
            }
            var computed = scores
            ck_softmax_rows(&computed, valid, rows, tokens)
            let differences = zip(computed, expected).filter { $0.bitPattern != $1.bitPattern && !($0.isNaN && $1.isNaN) }.count
            #expect(differences == 0, "\(tokens) tokens: \(differences) of \(rows * tokens) values differ")
        }
    }

    // Attention's weights on oneDNN's bf16 kernels: one pass for softmax, dropout and the bf16 copy the
    // product with V reads; the backward's softmax through the dropout, in fp32 and straight to bf16.
    @Test("attention's fused weights (softmax, dropout, bf16 bits) equal softmax, dropout and the bf16 copy in turn, bit for bit; its backward",
          arguments: [(16, 16), (5, 20), (3, 130), (1, 1)])
    func attentionWeights(rows: Int, tokens: Int) throws {
        let count = rows * tokens
        let scores = randomFloats(count, seed: 70, scale: 4), dp = randomFloats(count, seed: 71)
        var valid = [Int32](repeating: 1, count: tokens)
        for j in stride(from: 2, to: tokens, by: 3) { valid[j] = 0 }
        let stream = RandomStream(seed: 72, 3), head: UInt64 = 5
        for p in [Float(0), 0.1, 0.5] {
            // In turn: softmax, each row's dropout from stream.child(head, row), the bf16 copy.
            var probabilities = scores, dropped = [Float](repeating: 0, count: count)
            ck_softmax_rows(&probabilities, valid, rows, tokens)
            if p > 0 {
                probabilities.withUnsafeBufferPointer { pr in dropped.withUnsafeMutableBufferPointer { d in
                    for i in 0..<rows {
                        Dropout.serialForward(output: d.baseAddress! + i * tokens, input: pr.baseAddress! + i * tokens, count: tokens, probability: p,
                                              stream: stream.child(head, UInt64(i)))
                    }
                } }
            } else {
                dropped = probabilities
            }
            var fused = scores, fusedDropped = [Float](repeating: .nan, count: count), bits = [UInt16](repeating: 1, count: count)
            let child = stream.child(head), scale = p > 0 ? 1 / (1 - p) : 1
            let limit = p > 0 ? UInt32(Double(p) * 4_294_967_296.0) : 0
            ck_attention_weights(&fused, &bits, &fusedDropped, valid, rows, tokens, p > 0 ? 1 : 0, child.seed, child.streamID, limit, scale)
            #expect(fused == probabilities, "probabilities, p \(p)")
            #expect(fusedDropped == dropped, "dropped weights, p \(p)")
            #expect(bits == dropped.map(BF16.bits), "bf16 weights, p \(p)")
            if p > 0 { #expect(dropped.filter { $0 == 0 }.count > probabilities.filter { $0 == 0 }.count || count < 4, "some weights dropped") }
            var noCopy = scores, bitsAlone = [UInt16](repeating: 1, count: count)
            ck_attention_weights(&noCopy, &bitsAlone, nil, valid, rows, tokens, p > 0 ? 1 : 0, child.seed, child.streamID, limit, scale)
            #expect(noCopy == probabilities && bitsAlone == bits, "without the float copy, p \(p)")

            // Backward: d = dp through the mask, ds = P (d - sum P d), against Double.
            var ds = dp
            ck_softmax_backward_rows(&ds, probabilities, p > 0 ? dropped : nil, rows, tokens, scale)
            var worst = 0.0, largest = 0.0
            for i in 0..<rows {
                let o = i * tokens
                let d = (0..<tokens).map { p > 0 ? (dropped[o + $0] != 0 ? Double(dp[o + $0]) * Double(scale) : 0) : Double(dp[o + $0]) }
                let dot = (0..<tokens).reduce(0.0) { $0 + Double(probabilities[o + $1]) * d[$1] }
                for j in 0..<tokens {
                    let exact = Double(probabilities[o + j]) * (d[j] - dot)
                    worst = max(worst, abs(Double(ds[o + j]) - exact)); largest = max(largest, abs(exact))
                    if valid[j] == 0 { #expect(ds[o + j] == 0, "a masked key's gradient") }
                }
            }
            #expect(worst <= 1e-6 * max(largest, 1e-30), "softmax backward: \(worst) of \(largest), p \(p)")
            // In bf16, the mask from the weights' bf16 bits: the bits of the fp32 result, written over the weights.
            var dpCopy = dp, ds16 = bits
            ds16.withUnsafeMutableBufferPointer { w in
                ck_attention_softmax_backward(w.baseAddress!, &dpCopy, probabilities, w.baseAddress!, rows, tokens, p > 0 ? 1 : 0, scale)
            }
            #expect(ds16 == ds.map(BF16.bits), "bf16 softmax backward, p \(p)")
        }
    }

    @Test("a linear layer's bias gradient and LayerNorm's parameter gradients in C equal the plain row-order loops, bit for bit",
          arguments: [(7, 768), (33, 37), (3, 1), (1, 3072)])
    func columnSums(rows: Int, features: Int) {
        let count = rows * features
        let dy = randomFloats(count, seed: 80, scale: 3), x = randomFloats(count, seed: 81, scale: 2)
        let mean = randomFloats(rows, seed: 82), invStd = randomFloats(rows, seed: 83).map { abs($0) + 0.5 }
        let start = randomFloats(features, seed: 84)
        var bias = start, expectedBias = start
        Linear.backward(gradInput: nil, gradWeight: nil, gradBias: &bias, gradOutput: dy, input: x, weight: x, rows: rows, inFeatures: features,
                        outFeatures: features)
        for r in 0..<rows { for o in 0..<features { expectedBias[o] += dy[r * features + o] } }
        #expect(bias.map(\.bitPattern) == expectedBias.map(\.bitPattern), "bias gradient")
        // In bf16 the bias gradient sums the output gradient's bf16 values in one piece from zero, then adds
        // it: from the floats rounded, or from the bits a layer after wrote alone (the floats never read).
        var piece = [Float](repeating: 0, count: features)
        for r in 0..<rows { for o in 0..<features { piece[o] += BF16.round(dy[r * features + o]) } }
        let expectedBF16 = zip(start, piece).map { $0 + $1 }
        var bias16 = start
        Linear.backward(gradInput: nil, gradWeight: nil, gradBias: &bias16, gradOutput: dy, input: x, weight: x, rows: rows, inFeatures: features,
                        outFeatures: features, precision: .bf16)
        #expect(bias16.map(\.bitPattern) == expectedBF16.map(\.bitPattern), "bf16 bias gradient from the floats")
        let unwritten = [Float](repeating: .nan, count: count)
        let copies = Linear.Copies(input: BF16Operand(), weight: BF16Operand(), gradOutput: BF16Operand(), reuseGradOutput: true)
        unwritten.withUnsafeBufferPointer { key in
            let room = copies.gradOutput.room(holding: key.baseAddress!, rows: rows, columns: features)
            for i in 0..<count { room[i] = BF16.bits(dy[i]) }
            bias16 = start
            Linear.backward(gradInput: nil, gradWeight: nil, gradBias: &bias16, gradOutput: key.baseAddress!, input: x, weight: x, rows: rows,
                            inFeatures: features, outFeatures: features, precision: .bf16, copies: copies)
        }
        #expect(bias16.map(\.bitPattern) == expectedBF16.map(\.bitPattern), "bf16 bias gradient from the bits")
        var gamma = start, beta = start.map { -$0 }, expectedGamma = gamma, expectedBeta = beta, dx = [Float](repeating: 0, count: count)
        LayerNorm.backward(gradInput: &dx, gradGamma: &gamma, gradBeta: &beta, gradOutput: dy, input: x, gamma: start, mean: mean, invStd: invStd,
                           rows: rows, features: features)
        for r in 0..<rows {
            for i in 0..<features {
                let d = dy[r * features + i]
                expectedGamma[i] += d * (x[r * features + i] - mean[r]) * invStd[r]
                expectedBeta[i] += d
            }
        }
        #expect(gamma.map(\.bitPattern) == expectedGamma.map(\.bitPattern), "LayerNorm gamma gradient")
        #expect(beta.map(\.bitPattern) == expectedBeta.map(\.bitPattern), "LayerNorm beta gradient")
    }

    // BERT's residual ends: dropout(dense) + residual, LayerNorm, and the bf16 copy the next product reads.
    @Test("a transformer's fused dropout, residual sum, LayerNorm and bf16 copy equal the three layers in turn, bit for bit",
          arguments: [(3, 5, 768), (2, 7, 37), (1, 1, 16)])
    func residualLayerNorm(batch: Int, tokens: Int, features: Int) {
        let rows = batch * tokens, count = rows * features
        let dense = randomFloats(count, seed: 60, scale: 3), residual = randomFloats(count, seed: 61)
        let gamma = randomFloats(features, seed: 62), beta = randomFloats(features, seed: 63)
        let streams = (0..<batch).map { RandomStream(seed: 64, UInt64($0), 9) }
        for p in [Float(0), 0.1, 0.5] {
            var dropped = dense
            if p > 0 {
                for b in 0..<batch {
                    dropped.withUnsafeMutableBufferPointer {
                        let x = $0.baseAddress! + b * tokens * features
                        Dropout.forward(output: x, input: x, count: tokens * features, probability: p, stream: streams[b])
                    }
                }
            }
            var sum = [Float](repeating: 0, count: count), y = sum, mean = [Float](repeating: 0, count: rows), invStd = mean
            Residual.forward(output: &sum, dropped, residual, count: count)
            LayerNorm.forward(output: &y, mean: &mean, invStd: &invStd, input: sum, gamma: gamma, beta: beta, rows: rows, features: features)
            var fusedSum = [Float](repeating: .nan, count: count), fusedY = fusedSum, bits = [UInt16](repeating: 1, count: count)
            var fusedMean = [Float](repeating: .nan, count: rows), fusedInvStd = fusedMean
            LayerNorm.forwardResidual(sum: &fusedSum, output: &fusedY, outputBF16: &bits, mean: &fusedMean, invStd: &fusedInvStd, dense: dense,
                                      residual: residual, gamma: gamma, beta: beta, rows: rows, features: features,
                                      dropout: p > 0 ? (p, streams, TokenRows(batch: batch, tokens: tokens, pieceSamples: nil)) : nil)
            #expect(fusedSum == sum && fusedY == y && fusedMean == mean && fusedInvStd == invStd, "p \(p)")
            #expect(bits == y.map(BF16.bits), "bf16 copy, p \(p)")
            // Without the sums kept (a pass without backward): the same output.
            var unkeptY = [Float](repeating: .nan, count: count)
            LayerNorm.forwardResidual(sum: nil, output: &unkeptY, outputBF16: nil, mean: &fusedMean, invStd: &fusedInvStd, dense: dense,
                                      residual: residual, gamma: gamma, beta: beta, rows: rows, features: features,
                                      dropout: p > 0 ? (p, streams, TokenRows(batch: batch, tokens: tokens, pieceSamples: nil)) : nil)
            #expect(unkeptY == y && fusedMean == mean && fusedInvStd == invStd, "without the sums, p \(p)")
        }
    }

    @Test("its backward (LayerNorm's gradient into the residual and, through the dropout, the dense layer's) equals the layers in turn, bit for bit",
          arguments: [(3, 5, 768), (2, 7, 37), (1, 1, 16)])
    func residualLayerNormBackward(batch: Int, tokens: Int, features: Int) {
        let rows = batch * tokens, count = rows * features
        let sum = randomFloats(count, seed: 70, scale: 3), dy = randomFloats(count, seed: 71), prior = randomFloats(count, seed: 72)
        let gamma = randomFloats(features, seed: 73), beta = randomFloats(features, seed: 74)
        let streams = (0..<batch).map { RandomStream(seed: 75, UInt64($0), 9) }
        var y = [Float](repeating: 0, count: count), mean = [Float](repeating: 0, count: rows), invStd = mean
        LayerNorm.forward(output: &y, mean: &mean, invStd: &invStd, input: sum, gamma: gamma, beta: beta, rows: rows, features: features)
        for p in [Float(0), 0.1, 0.5] { for accumulate in [false, true] { for pieces in [nil, tokens] as [Int?] {
            // The layers in turn: LayerNorm's gradient into zeros, copied (or added) into the residual's, dropout in place.
            var dx = [Float](repeating: 0, count: count), residual = accumulate ? prior : [Float](repeating: 0, count: count)
            var dGamma = randomFloats(features, seed: 76), dBeta = randomFloats(features, seed: 77)
            let (dGamma0, dBeta0) = (dGamma, dBeta)
            LayerNorm.backward(gradInput: &dx, gradGamma: &dGamma, gradBeta: &dBeta, gradOutput: dy, input: sum, gamma: gamma, mean: mean,
                               invStd: invStd, rows: rows, features: features, pieces: pieces.map { RowPieces(rows: rows, each: $0) })
            if accumulate { Residual.accumulate(&residual, dx, count: count) } else { residual = dx }
            if p > 0 {
                for b in 0..<batch {
                    dx.withUnsafeMutableBufferPointer {
                        let x = $0.baseAddress! + b * tokens * features
                        Dropout.forward(output: x, input: x, count: tokens * features, probability: p, stream: streams[b])
                    }
                }
            }
            var fusedResidual = accumulate ? prior : [Float](repeating: .nan, count: count), fusedDense = [Float](repeating: .nan, count: count)
            var fusedGamma = dGamma0, fusedBeta = dBeta0
            LayerNorm.backwardResidual(gradResidual: &fusedResidual, accumulateResidual: accumulate, gradDense: &fusedDense, gradGamma: &fusedGamma,
                                       gradBeta: &fusedBeta, gradOutput: dy, input: sum, gamma: gamma, mean: mean, invStd: invStd, rows: rows,
                                       features: features, pieces: pieces.map { RowPieces(rows: rows, each: $0) }, dropout: p > 0 ? (p, streams, TokenRows(batch: batch, tokens: tokens, pieceSamples: nil)) : nil)
            let same = { (a: [Float], b: [Float]) in a.map(\.bitPattern) == b.map(\.bitPattern) }
            #expect(same(fusedResidual, residual) && same(fusedDense, dx), "p \(p), accumulate \(accumulate), pieces \(String(describing: pieces))")
            #expect(same(fusedGamma, dGamma) && same(fusedBeta, dBeta), "parameter gradients, p \(p)")
            if !accumulate {
                var onlyDense = [Float](repeating: .nan, count: count)
                LayerNorm.backwardResidual(gradResidual: nil, accumulateResidual: false, gradDense: &onlyDense, gradGamma: nil, gradBeta: nil,
                                           gradOutput: dy, input: sum, gamma: gamma, mean: mean, invStd: invStd, rows: rows, features: features,
                                           dropout: p > 0 ? (p, streams, TokenRows(batch: batch, tokens: tokens, pieceSamples: nil)) : nil)
                #expect(same(onlyDense, dx), "without a residual gradient, p \(p)")
            }
            // The dense gradient as bf16 bits alone (what a bf16 dense layer reads): the floats' bits.
            var bitsResidual = accumulate ? prior : [Float](repeating: .nan, count: count), bits = [UInt16](repeating: 0xffff, count: count)
            var bitsGamma = dGamma0, bitsBeta = dBeta0
            LayerNorm.backwardResidual(gradResidual: &bitsResidual, accumulateResidual: accumulate, gradDense: nil, gradDenseBF16: &bits,
                                       gradGamma: &bitsGamma, gradBeta: &bitsBeta, gradOutput: dy, input: sum, gamma: gamma, mean: mean,
                                       invStd: invStd, rows: rows, features: features, pieces: pieces.map { RowPieces(rows: rows, each: $0) }, dropout: p > 0 ? (p, streams, TokenRows(batch: batch, tokens: tokens, pieceSamples: nil)) : nil)
            #expect(bits == dx.map(BF16.bits) && same(bitsResidual, residual) && same(bitsGamma, dGamma) && same(bitsBeta, dBeta),
                    "bf16 dense gradient, p \(p), accumulate \(accumulate)")
        } } }
    }

    // The backward never reads the forward's output: it recomputes the ReLU's gate from the input with the
    // forward's arithmetic (CK_BN_SHIFTED, the same scale), so the gate is that output's sign, bit for bit.
    // Channels 0 and 1 are constant at the mean (training: the batch mean is exact; evaluation: the running
    // mean), so their output before the ReLU is their beta: +0 (closed) and a subnormal 1e-40 (open);
    // channel 2's beta is -0.
    @Test("BatchNorm with a fused ReLU equals BatchNorm then ReLU bit for bit, forward and backward (every layout, training and evaluation, bf16 input)",
          arguments: [(2, 3, 17), (3, 2, 64), (1, 5, 1), (2, 16, 300), (3, 32, 49)])
    func batchNormReLU(n: Int, c: Int, plane: Int) throws {
        let count = n * c * plane
        var x = randomFloats(count, seed: 40, scale: 2)
        for i in 0..<count where (i / plane) % c < 2 { x[i] = 0.5 }
        let dy = randomFloats(count, seed: 41)
        var gamma = randomFloats(c, seed: 42), beta = randomFloats(c, seed: 43)
        beta[0] = 0
        beta[1] = 1e-40
        if c > 2 { beta[2] = -0.0 }
        gamma[1] = -abs(gamma[1])
        for layout in ActivationLayout.allCases where layout.holds(channels: c) {
        for training in [true, false] { for halves in [false, true] where layout != .nchw || !halves {
            let xl = toLayout(x, layout, n: n, c: c, plane: plane), dyl = toLayout(dy, layout, n: n, c: c, plane: plane)
            let x16 = xl.map(BF16.bits)
            func run(fused: Bool) throws -> (y: [Float], dx: [Float], dGamma: [Float], dBeta: [Float]) {
                var y = [Float](repeating: 0, count: count), dx = [Float](repeating: 7, count: count)
                var dGamma = [Float](repeating: 0, count: c), dBeta = [Float](repeating: 0, count: c)
                var runningMean = [Float](repeating: 0.5, count: c), runningVar = [Float](repeating: 0.9, count: c)
                let shape = BatchNorm2d.Shape(batch: n, channels: c, plane: plane, layout: layout)
                try withBatchNormScratch(channels: c) { saved in
                    try withBatchNormParameters(gamma: gamma, beta: beta, runningMean: &runningMean, runningVar: &runningVar) { parameters in
                    try xl.withUnsafeBufferPointer { xb in try x16.withUnsafeBufferPointer { x16b in
                        let input: RowValues = halves ? .bf16(x16b.baseAddress!) : .fp32(xb.baseAddress!)
                        try y.withUnsafeMutableBufferPointer { yb in
                            if training {
                                try BatchNorm2d.forwardTraining(shape, output: .floats(yb.baseAddress!), input: input, parameters: parameters,
                                                                saved: &saved, relu: fused)
                            } else {
                                BatchNorm2d.forwardInference(shape, output: .floats(yb.baseAddress!), input: input, parameters: parameters, relu: fused)
                            }
                        }
                        if !fused { ReLU.forward(output: &y, input: y, count: count) }
                        var g = dyl
                        if !fused { ReLU.maskGradient(&g, output: y, count: count) }
                        try dx.withUnsafeMutableBufferPointer { dxb in
                        try dGamma.withUnsafeMutableBufferPointer { dg in try dBeta.withUnsafeMutableBufferPointer { db in
                            let gradients = BatchNorm2d.ParameterGradients(gamma: dg.baseAddress!, beta: db.baseAddress!)
                            if training {
                                try BatchNorm2d.backwardTraining(shape, gradInput: .floats(dxb.baseAddress!), gradients: gradients, gradOutput: g,
                                                                 input: input, gamma: gamma, beta: beta, saved: saved, relu: fused, accumulate: false)
                            } else {
                                BatchNorm2d.backwardInference(shape, gradInput: .floats(dxb.baseAddress!), gradients: gradients, gradOutput: g,
                                                              input: input, parameters: parameters, relu: fused, accumulate: false)
                            }
                        } } }
                    } }
                    }
                }
                return (y, dx, dGamma, dBeta)
            }
            let separate = try run(fused: false), fused = try run(fused: true)
            let what = "\(layout) n \(n) c \(c) plane \(plane) training \(training) bf16 input \(halves)"
            #expect(fused.y.map(\.bitPattern) == separate.y.map(\.bitPattern), "output, \(what)")
            #expect(fused.dx.map(\.bitPattern) == separate.dx.map(\.bitPattern), "input gradient, \(what)")
            #expect(fused.dGamma == separate.dGamma && fused.dBeta == separate.dBeta, "parameter gradients, \(what)")
            // The edge channels: +0 closes the gate, the subnormal opens it.
            let first = toLayout((0..<count).map { Float(($0 / plane) % c) }, layout, n: n, c: c, plane: plane)
            #expect(zip(first, fused.y).allSatisfy { $0 != 0 || $1 == 0 } && zip(first, fused.y).allSatisfy { $0 != 1 || $1 == 1e-40 }, "\(what)")
        } }
        }
    }

    @Test("a residual block's fused sum and ReLU (and its bf16 copy), and its one-pass backward")
    func residualReLU() {
        // Past several 16-lane vectors, with a tail; a NaN, infinities and values bf16 rounds up or to even.
        let count = 101
        var a = randomFloats(count, seed: 50), b = randomFloats(count, seed: 51)
        let dy = randomFloats(count, seed: 52)
        (a[3], a[20], a[40], b[41]) = (.nan, .infinity, -.infinity, Float(bitPattern: 0x3F80_8000))
        (a[41], a[42], b[42]) = (0, 0, Float(bitPattern: 0x3F81_8000))
        var y = [Float](repeating: 0, count: count), halves = [UInt16](repeating: 0, count: count)
        Residual.forwardReLU(output: &y, outputBF16: &halves, a, b, count: count)
        let expected = zip(a, b).map { max($0 + $1, 0) }
        #expect(zip(y, expected).allSatisfy { $0.bitPattern == $1.bitPattern }, "forward (NaN included)")
        #expect(halves == y.map(BF16.bits), "bf16 copy")
        Residual.forwardReLU(output: &y, a, b, count: count)
        #expect(zip(y, expected).allSatisfy { $0.bitPattern == $1.bitPattern })
        let masked = zip(y, dy).map { $0 > 0 ? $1 : 0 }
        var branch = [Float](repeating: 9, count: count), identity = [Float](repeating: 2, count: count)
        var branch16 = [UInt16](repeating: 9, count: count), identity16 = branch16
        branch.withUnsafeMutableBufferPointer { branch in identity.withUnsafeMutableBufferPointer { identity in
        branch16.withUnsafeMutableBufferPointer { branch16 in identity16.withUnsafeMutableBufferPointer { identity16 in
        y.withUnsafeBufferPointer { yb in dy.withUnsafeBufferPointer { dyb in
            let (b, i) = (branch.baseAddress!, identity.baseAddress!), (b16, i16) = (branch16.baseAddress!, identity16.baseAddress!)
            let (yv, dy) = (RowValues.fp32(yb.baseAddress!), RowValues.fp32(dyb.baseAddress!))
            Residual.backwardReLU(gradBranch: .floats(b), gradIdentity: .floats(i), accumulateIdentity: true, gradOutput: dy, output: yv, count: count)
            #expect(Array(branch) == masked && Array(identity) == masked.map { $0 + 2 })
            Residual.backwardReLU(gradBranch: .floats(b), gradIdentity: .floats(i), accumulateIdentity: false, gradOutput: dy, output: yv, count: count)
            #expect(Array(branch) == masked && Array(identity) == masked)
            // Either gradient as bf16 bits (the units' gradients of a bf16 pass).
            Residual.backwardReLU(gradBranch: BatchNorm2d.Destination(halves: b16), gradIdentity: .floats(i), accumulateIdentity: true,
                                  gradOutput: dy, output: yv, count: count)
            #expect(Array(branch16) == masked.map(BF16.bits) && Array(identity) == masked.map { 2 * $0 })
            Residual.backwardReLU(gradBranch: .floats(b), gradIdentity: BatchNorm2d.Destination(halves: i16), accumulateIdentity: false,
                                  gradOutput: dy, output: yv, count: count)
            #expect(Array(branch) == masked && Array(identity16) == masked.map(BF16.bits))
            // The output's gradient in two parts (the next block's identity and first unit): added as read,
            // the bits of adding the second into the first beforehand.
            let part = randomFloats(count, seed: 53)
            let summed = zip(dyb, part).map { $0 + $1 }, maskedSum = zip(y, summed).map { $0 > 0 ? $1 : 0 }
            part.withUnsafeBufferPointer { part in
                Residual.backwardReLU(gradBranch: .floats(b), gradIdentity: BatchNorm2d.Destination(halves: i16), accumulateIdentity: false,
                                      gradOutput: dy, gradOutputPart: .fp32(part.baseAddress!), output: yv, count: count)
            }
            #expect(Array(branch) == maskedSum && Array(identity16) == maskedSum.map(BF16.bits))
        } } } } } }
    }

    @Test("residual sum of a bf16 stream: float inputs rounded, bits read, the output rounded, alike on every path")
    func residualReLURounded() {
        let count = 101
        var a = randomFloats(count, seed: 60), b = randomFloats(count, seed: 61)
        let dy = randomFloats(count, seed: 62)
        // A NaN, infinities, a sum that rounds to even, a tiny input that rounds away, and a sum above zero
        // that the inputs' rounding makes zero (so the ReLU's gate closes).
        (a[3], a[20], a[40], b[41]) = (.nan, .infinity, -.infinity, Float(bitPattern: 0x3F80_8000))
        (a[41], a[42], b[42]) = (0, Float(bitPattern: 0x3F80_4000), Float(bitPattern: 0x3C00_0001))
        (a[43], b[43]) = (Float(bitPattern: 0x3F80_6000), -1)
        let rounded = { (x: Float) in BF16.round(x) }
        let expected = zip(a, b).map { rounded(max(rounded($0) + rounded($1), 0)) }
        let (a16, b16) = (a.map(BF16.bits), b.map(BF16.bits))
        #expect(a[43] + b[43] > 0 && expected[43] == 0)
        var y = [Float](repeating: 7, count: count), y16 = [UInt16](repeating: 7, count: count)
        a.withUnsafeBufferPointer { ap in b.withUnsafeBufferPointer { bp in a16.withUnsafeBufferPointer { ah in b16.withUnsafeBufferPointer { bh in
        y.withUnsafeMutableBufferPointer { yp in y16.withUnsafeMutableBufferPointer { yh in
            let sources: [(RowValues, RowValues)] = [(.fp32(ap.baseAddress!), .fp32(bp.baseAddress!)), (.bf16(ah.baseAddress!), .fp32(bp.baseAddress!)),
                                                     (.fp32(ap.baseAddress!), .bf16(bh.baseAddress!)), (.bf16(ah.baseAddress!), .bf16(bh.baseAddress!))]
            for (x, z) in sources {
                yp.update(repeating: 7); yh.update(repeating: 7)
                Residual.forwardReLU(output: BatchNorm2d.Destination(floats: yp.baseAddress!, halves: yh.baseAddress!), x, z, rounding: true, count: count)
                #expect(zip(yp, expected).allSatisfy { $0.bitPattern == $1.bitPattern }, "floats")
                #expect(Array(yh) == expected.map(BF16.bits), "bits")
                yh.update(repeating: 7)
                Residual.forwardReLU(output: BatchNorm2d.Destination(halves: yh.baseAddress!), x, z, rounding: true, count: count)
                #expect(Array(yh) == expected.map(BF16.bits), "bits alone")
            }
            // The backward's gate from the bits is the gate from the rounded floats; the gradient's parts, read
            // from their floats (rounded) or their bits, are summed and the sum rounded, alike.
            let part = randomFloats(count, seed: 63)
            let g = zip(expected, zip(dy, part)).map { $0 > 0 ? rounded(rounded($1.0) + rounded($1.1)) : 0 }
            let (dy16, part16) = (dy.map(BF16.bits), part.map(BF16.bits))
            dy.withUnsafeBufferPointer { d in part.withUnsafeBufferPointer { p in dy16.withUnsafeBufferPointer { d16 in
            part16.withUnsafeBufferPointer { p16 in
                let parts: [(RowValues, RowValues)] = [(.fp32(d.baseAddress!), .fp32(p.baseAddress!)), (.bf16(d16.baseAddress!), .fp32(p.baseAddress!)),
                                                       (.fp32(d.baseAddress!), .bf16(p16.baseAddress!)), (.bf16(d16.baseAddress!), .bf16(p16.baseAddress!))]
                for (first, second) in parts { for out in [RowValues.fp32(yp.baseAddress!), .bf16(yh.baseAddress!)] {
                    var branch = [Float](repeating: 1, count: count), identity16 = [UInt16](repeating: 1, count: count)
                    Residual.backwardReLU(gradBranch: .floats(&branch), gradIdentity: BatchNorm2d.Destination(halves: &identity16),
                                          accumulateIdentity: false, gradOutput: first, gradOutputPart: second, rounding: true, output: out,
                                          count: count)
                    #expect(zip(branch, g).allSatisfy { $0.bitPattern == $1.bitPattern } && identity16 == g.map(BF16.bits))
                } }
                // One part (the last block's, from the pooling): rounded alone.
                var branch = [Float](repeating: 1, count: count), identity = branch
                Residual.backwardReLU(gradBranch: .floats(&branch), gradIdentity: .floats(&identity), accumulateIdentity: false,
                                      gradOutput: .fp32(d.baseAddress!), rounding: true, output: .bf16(yh.baseAddress!), count: count)
                #expect(branch == zip(expected, dy).map { $0 > 0 ? rounded($1) : 0 } && identity == branch)
            } } } }
        } } } } } }
    }
}

@Suite("Philox on vector lanes")
struct PhiloxLanesTests {
    @Test("blocks8 gives block's draws, across the 2^32 boundary of the block counter too")
    func lanes() {
        for (seed, key, first) in [(UInt64(0), UInt64(1), UInt64(0)), (7, 99, 12_345), (0xFFFF_FFFF_FFFF, 3, (1 << 32) - 3), (42, 5, 1 << 40)] {
            let stream = RandomStream(seed: seed, key)
            let (w0, w1, w2, w3) = stream.blocks8(first)
            for k in 0..<8 {
                let b = stream.block(first + UInt64(k))
                #expect(w0[k] == b.0 && w1[k] == b.1 && w2[k] == b.2 && w3[k] == b.3, "seed \(seed), block \(first + UInt64(k))")
            }
        }
    }

    @Test("normals in runs of sixteen are normal(at:)'s, bit for bit, from any first index and count")
    func normals() {
        let stream = RandomStream(seed: 11, 4)
        for first: UInt64 in [0, 1, 2, 15, 16, 17, (1 << 33) - 5] {
            for count in [0, 1, 2, 15, 16, 17, 31, 32, 33, 100, 1001] {
                var out = [Float](repeating: .nan, count: count)
                out.withUnsafeMutableBufferPointer { stream.normals(from: first, into: $0) }
                let bad = (0..<count).first { out[$0].bitPattern != stream.normal(at: first + UInt64($0)).bitPattern }
                #expect(bad == nil, "first \(first), count \(count): index \(bad ?? 0)")
            }
        }
    }

    @Test("dropout's masks are the stream's draws at every length (vector blocks, single blocks, a partial block)")
    func dropoutMask() {
        let stream = RandomStream(seed: 3, 17)
        for count in [1, 3, 4, 31, 32, 33, 100, 127, 128, 129, 1000, 4099] {
            let x = [Float](repeating: 1, count: count)
            var serial = [Float](repeating: 0, count: count), parallel = serial
            Dropout.serialForward(output: &serial, input: x, count: count, probability: 0.25, stream: stream)
            Dropout.forward(output: &parallel, input: x, count: count, probability: 0.25, stream: stream)
            let limit = UInt32(0.25 * 4_294_967_296.0)
            let expected = (0..<count).map { stream.uint32(at: UInt64($0)) >= limit ? Float(1 / 0.75) : 0 }
            #expect(serial == expected && parallel == expected, "count \(count)")
        }
    }
}

@Suite("Adam over threads")
struct AdamThreadsTests {
    @Test("Adam split over two threads gives the single thread's parameters and moments bit for bit")
    func twoThreads() {
        let count = 100_003
        let grads = randomFloats(count, seed: 60)
        func run(threads: Int) -> [Float] {
            let previous = Parallel.threads
            Parallel.threads = threads
            defer { Parallel.threads = previous }
            var p = randomFloats(count, seed: 61), m = randomFloats(count, seed: 62, scale: 0.1)
            var v = randomFloats(count, seed: 63, scale: 0.1).map { $0 * $0 }
            for step in 1...3 {
                Adam.step(params: &p, grads: grads, m: &m, v: &v, count: count, step: step,
                          config: AdamConfig(learningRate: 1e-3, weightDecay: 0.01, decoupled: step == 2))
            }
            return p + m + v
        }
        #expect(run(threads: 1) == run(threads: 2))
    }
}

@Suite("The optimizer's vector passes")
struct OptimizerKernelTests {
    /// `Adam.step`'s arithmetic for one element in Swift (the oracle of `ck_adam`): the same operations in
    /// the same order.
    static func reference(param: inout Float, grad: Float, m: inout Float, v: inout Float, step: Int, config c: AdamConfig) {
        let bias1 = 1 - pow(c.beta1, Double(step)), bias2 = 1 - pow(c.beta2, Double(step))
        let stepSize = Float(c.learningRate / bias1), bias2Sqrt = Float(bias2.squareRoot())
        var p = param
        if c.decoupled && c.weightDecay != 0 { p *= Float(1 - c.learningRate * c.weightDecay) }
        let g = grad + (c.decoupled ? 0 : Float(c.weightDecay)) * p
        m = m + Float(1 - c.beta1) * (g - m)
        v = v * Float(c.beta2) + Float(1 - c.beta2) * g * g
        let denom = v.squareRoot() / bias2Sqrt + Float(c.eps)
        param = p - stepSize * (m / denom)
    }

    @Test("Adam's vector loop equals the per-element Swift arithmetic bit for bit (Adam with L2, AdamW, no decay; every tail length)",
          arguments: [1, 15, 16, 17, 40, 1001])
    func adamAsReference(count: Int) {
        let grads = randomFloats(count, seed: 70, scale: 3)
        let configs = [AdamConfig(learningRate: 1e-3, weightDecay: 0.01), AdamConfig(learningRate: 3e-4, weightDecay: 0.1, decoupled: true),
                       AdamConfig(learningRate: 1e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6)]
        for config in configs {
            var p = randomFloats(count, seed: 71), m = randomFloats(count, seed: 72, scale: 0.1)
            var v = randomFloats(count, seed: 73, scale: 0.1).map { $0 * $0 }
            var (rp, rm, rv) = (p, m, v)
            for step in 1...3 {
                Adam.step(params: &p, grads: grads, m: &m, v: &v, count: count, step: step, config: config)
                for i in 0..<count { Self.reference(param: &rp[i], grad: grads[i], m: &rm[i], v: &rv[i], step: step, config: config) }
            }
            #expect(p == rp && m == rm && v == rv, "count \(count), \(config)")
            #expect(p != randomFloats(count, seed: 71), "the parameters moved")
        }
    }

    /// Each new parameter also goes to the mirrors (non-temporal stores where a mirror has the
    /// parameters' alignment, ordinary ones elsewhere), and the count is that of the new NaN and infinite
    /// parameters: whatever the range's start (the scalar head before the 64-byte boundary), its length
    /// and the threads.
    @Test("Adam writes its mirrors and counts the non-finite parameters it made", arguments: [1, 2])
    func adamMirrorsAndCounts(threads: Int) {
        let previous = Parallel.threads
        Parallel.threads = threads
        defer { Parallel.threads = previous }
        let total = 70_000
        func buffer(_ seed: UInt64, scale: Float = 1) -> UnsafeMutablePointer<Float> {
            let b = UnsafeMutableRawPointer.allocate(byteCount: (total + 32) * 4, alignment: 64).bindMemory(to: Float.self, capacity: total + 32)
            b.initialize(from: randomFloats(total + 32, seed: seed, scale: scale), count: total + 32)
            return b
        }
        let config = AdamConfig(learningRate: 1e-3, weightDecay: 0.01)
        for (start, count, shift) in [(0, 65_536, 0), (3, 40_001, 0), (17, 33, 5), (5, 7, 0), (1, 69_000, 3)] {
            let p = buffer(80), g = buffer(81, scale: 3), m = buffer(82, scale: 0.1), v = buffer(83, scale: 0.1)
            for i in 0..<(total + 32) { v[i] *= v[i] }
            // A NaN and an infinite gradient, and an infinite parameter.
            g[start] = .nan
            if count > 100 { g[start + count - 1] = .infinity; p[start + 50] = -.infinity }
            let (rp, rg, rm, rv) = (Array(UnsafeBufferPointer(start: p, count: total)), Array(UnsafeBufferPointer(start: g, count: total)),
                                    Array(UnsafeBufferPointer(start: m, count: total)), Array(UnsafeBufferPointer(start: v, count: total)))
            let aligned = buffer(84), shifted = buffer(85)
            let before = Array(UnsafeBufferPointer(start: aligned, count: total))
            // `shifted` is read from `shift` floats on: its stores are not at the parameters' alignment.
            let bad = Adam.step(params: p + start, grads: g + start, m: m + start, v: v + start, count: count, step: 2, config: config,
                                mirrors: [aligned, shifted + shift], mirrorOffset: start)
            var expected = 0
            for i in start..<(start + count) {
                var (ep, em, ev) = (rp[i], rm[i], rv[i])
                Self.reference(param: &ep, grad: rg[i], m: &em, v: &ev, step: 2, config: config)
                #expect(p[i].bitPattern == ep.bitPattern && aligned[i].bitPattern == ep.bitPattern && shifted[shift + i].bitPattern == ep.bitPattern,
                        "start \(start), count \(count), element \(i)")
                if !ep.isFinite { expected += 1 }
            }
            #expect(bad == expected && expected == (count > 100 ? 3 : 1), "start \(start), count \(count): \(bad) non-finite, expected \(expected)")
            #expect(aligned[start + count] == before[start + count] && (start == 0 || aligned[start - 1] == before[start - 1]),
                    "a mirror was written outside the range")
            for b in [p, g, m, v, aligned, shifted] { b.deallocate() }
        }
    }

    @Test("the sum of squares in double lanes is within double rounding of the plain sum; non-finite values are counted")
    func sumsAndCounts() {
        for count in [0, 1, 7, 8, 9, 16_384, 16_391] {
            let x = randomFloats(count, seed: 74, scale: 5)
            let plain = x.reduce(0.0) { $0 + Double($1) * Double($1) }
            let lanes = ck_sum_squares(x, count)
            #expect(abs(lanes - plain) <= 1e-12 * max(plain, 1), "count \(count): \(lanes) against \(plain)")
            var y = x
            if count > 8 { y[3] = .nan; y[count - 1] = .infinity; y[count / 2] = -.infinity; y[5] = .greatestFiniteMagnitude }
            #expect(ck_count_nonfinite(y, count) == (count > 8 ? 3 : 0), "count \(count)")
        }
    }
}

extension FusedKernelTests {
    // NHWC rows hold many chunks of 16 channels, which the kernels walk row by row (groups of chunks, all
    // of a row at once); nChw16c rows hold one, walked down the rows; nChw8c rows (the last 8 of width 24,
    // 141) are summed in 8 lanes and normalized two rows at a time (an odd count's last row alone). Each
    // lane's arithmetic must not depend on the order: every width's sums and outputs equal those of its
    // chunks taken one at a time.
    @Test("batch norm's kernels on rows of many channels give the bits of their chunks of 16 channels taken one at a time",
          arguments: [16, 24, 32, 48, 64, 80, 112, 133, 141, 256])
    func batchNormRowsByChunks(width: Int) {
        let rows = 301, rowStride = width + 16  // past one 256-row block, odd; a thread's share of longer rows
        let x = randomFloats(rows * rowStride, seed: 110, scale: 2).map { $0 + 0.5 }, dy = randomFloats(rows * rowStride, seed: 111)
        let x16 = x.map(BF16.bits), dy16 = dy.map(BF16.bits)
        let mean = randomFloats(width, seed: 112, scale: 0.5), scale = randomFloats(width, seed: 113), shift = randomFloats(width, seed: 114)
        let k = randomFloats(width, seed: 115), sumDy = randomFloats(width, seed: 116), sumDyX = randomFloats(width, seed: 117)
        let invStd = randomFloats(width, seed: 118).map { abs($0) + 0.5 }
        // The chunks: 16 channels from c0, and the last width % 16 alone.
        let chunks = stride(from: 0, to: width, by: 16).map { ($0, min(16, width - $0)) }
        for halves in [false, true] {
            for kind in 0..<3 {  // sum(x), sum(x^2); sum(dy), sum(dy (x - mean)); the same with dy gated
                let what = "width \(width), \(halves ? "bf16" : "fp32"), sums of kind \(kind)"
                func sums(_ c0: Int, _ w: Int) -> [Double] {
                    var first = [Double](repeating: .nan, count: w), second = first
                    x.withUnsafeBufferPointer { xp in x16.withUnsafeBufferPointer { xh in dy.withUnsafeBufferPointer { dp in
                        dy16.withUnsafeBufferPointer { dh in mean.withUnsafeBufferPointer { mp in scale.withUnsafeBufferPointer { sp in
                            shift.withUnsafeBufferPointer { hp in
                                let gradient = kind > 0, gated = kind == 2
                                ck_channel_sums(halves ? nil : xp.baseAddress! + c0, halves ? xh.baseAddress! + c0 : nil,
                                                gradient && !halves ? dp.baseAddress! + c0 : nil, gradient && halves ? dh.baseAddress! + c0 : nil,
                                                gradient ? mp.baseAddress! + c0 : nil, gated ? sp.baseAddress! + c0 : nil,
                                                gated ? hp.baseAddress! + c0 : nil, rows, rowStride, w, &first, &second)
                            }
                        } } }
                    } } }
                    return first + second
                }
                let whole = sums(0, width)
                var byChunks = [Double](repeating: 0, count: 2 * width)
                for (c0, w) in chunks {
                    let part = sums(c0, w)
                    for j in 0..<w { byChunks[c0 + j] = part[j]; byChunks[width + c0 + j] = part[w + j] }
                }
                let differing = zip(whole, byChunks).filter { $0.bitPattern != $1.bitPattern }.count
                #expect(differing == 0, "\(what): \(differing) of \(2 * width) sums differ")
            }
            // The pointwise passes over contiguous rows of `width` lanes against each chunk's lanes gathered
            // into rows of their own.
            let packedX = (0..<rows * width).map { x[$0 / width * rowStride + $0 % width] }, packedDy = (0..<rows * width).map { dy[$0 / width * rowStride + $0 % width] }
            func gather(_ values: [Float], _ c0: Int, _ w: Int) -> [Float] { (0..<rows * w).map { values[$0 / w * width + c0 + $0 % w] } }
            for relu in [false, true] {
                for training in [false, true] {
                    func passes(_ xs: [Float], _ dys: [Float], _ c0: Int, _ lanes: Int) -> (y: [UInt16], dx: [UInt16], dxFloats: [Float]) {
                        var y = [UInt16](repeating: 1, count: xs.count), dx = y, dxFloats = [Float](repeating: 3, count: xs.count)
                        let xh = xs.map(BF16.bits), dh = dys.map(BF16.bits)
                        let gate = relu ? Array(scale[c0..<c0 + lanes]) : nil, gateShift = relu ? Array(shift[c0..<c0 + lanes]) : nil
                        let m = Array(mean[c0..<c0 + lanes]), s = Array(scale[c0..<c0 + lanes]), h = Array(shift[c0..<c0 + lanes])
                        let kk = Array(k[c0..<c0 + lanes]), sd = Array(sumDy[c0..<c0 + lanes]), sx = Array(sumDyX[c0..<c0 + lanes])
                        let inv = Array(invStd[c0..<c0 + lanes])
                        ck_normalize_rows(nil, &y, halves ? nil : xs, halves ? xh : nil, rows, lanes, m, s, h, relu ? 1 : 0)
                        gate.withOptionalPointer { g in gateShift.withOptionalPointer { gs in
                            ck_bn_gradient_rows(nil, &dx, halves ? nil : dys, halves ? dh : nil, halves ? nil : xs, halves ? xh : nil, rows, lanes, kk,
                                                training ? sd : nil, training ? sx : nil, m, training ? inv : nil, g, gs, 300, 0)
                            ck_bn_gradient_rows(&dxFloats, nil, halves ? nil : dys, halves ? dh : nil, halves ? nil : xs, halves ? xh : nil, rows, lanes,
                                                kk, training ? sd : nil, training ? sx : nil, m, training ? inv : nil, g, gs, 300, 1)
                        } }
                        return (y, dx, dxFloats)
                    }
                    let whole = passes(packedX, packedDy, 0, width)
                    var y = whole.y.map { _ in UInt16(0) }, dx = y, dxFloats = whole.dxFloats.map { _ in Float.nan }
                    for (c0, w) in chunks {
                        let part = passes(gather(packedX, c0, w), gather(packedDy, c0, w), c0, w)
                        for i in 0..<rows * w {
                            let o = i / w * width + c0 + i % w
                            y[o] = part.y[i]; dx[o] = part.dx[i]; dxFloats[o] = part.dxFloats[i]
                        }
                    }
                    let what = "width \(width), \(halves ? "bf16" : "fp32"), relu \(relu), training \(training)"
                    let outputs = zip(whole.y, y).filter { $0 != $1 }.count, gradients = zip(whole.dx, dx).filter { $0 != $1 }.count
                    let floatGradients = zip(whole.dxFloats, dxFloats).filter { $0.bitPattern != $1.bitPattern }.count
                    #expect(outputs == 0 && gradients == 0 && floatGradients == 0,
                            "\(what): \(outputs) outputs, \(gradients) bf16 and \(floatGradients) float input gradients of \(rows * width) differ")
                }
            }
        }
    }
}

private extension Optional where Wrapped == [Float] {
    /// body(a pointer to the array's floats, or nil).
    func withOptionalPointer<R>(_ body: (UnsafePointer<Float>?) -> R) -> R {
        switch self {
        case .some(let values): values.withUnsafeBufferPointer { body($0.baseAddress) }
        case .none: body(nil)
        }
    }
}

@Suite("bf16 conversions by the CPU's instruction")
struct NativeBF16Tests {
    /// `body`'s result with the kernels' integer rounding, then with their native versions.
    func bothWays<T>(_ body: () -> T) -> (integer: T, native: T) {
        let before = ck_native_bf16_enabled()
        defer { ck_set_native_bf16(before) }
        ck_set_native_bf16(0)
        let integer = body()
        ck_set_native_bf16(1)
        return (integer, body())
    }

    /// Floats of every kind the conversion treats apart (vcvtneps2bf16 reads a subnormal as zero): normal
    /// values, halfway between two bf16 (ties), subnormals of both signs, NaN, infinities and zeros; each
    /// mixed among the others, then runs of 40 subnormals and of 40 normal values, so that vectors holding
    /// subnormals, vectors holding none and vectors made only of them all run.
    static func mixed(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
        let stream = RandomStream(seed: seed)
        func draw(_ i: Int, _ kind: UInt64) -> Float {
            let bits = stream.uint32(at: UInt64(i))
            switch kind {
            case 0: return Float(bitPattern: (bits & 0x8000_0000) | max(bits & 0x007f_ffff, 1))
            case 1: return Float(bitPattern: (Float(2 * stream.uniform(at: UInt64(i)) - 1) * scale).bitPattern & 0xffff_0000 | 0x8000)
            case 2: return [Float.nan, .infinity, -.infinity, 0, -0.0][Int(bits % 5)]
            default: return scale * Float(2 * stream.uniform(at: UInt64(i)) - 1)
            }
        }
        return (0..<count).map { i in
            let run = (i / 40) % 5
            if run == 1 { return draw(i, 0) }
            if run == 3 { return draw(i, 3) }
            return draw(i, [0, 1, 2, 3, 3, 3, 3][Int(stream.uint32(at: UInt64(i) &+ 1 << 40) % 7)])
        }
    }

    /// Bits alike, any NaN matching any NaN (the payload an operation passes on is the compiler's choice).
    func same(_ a: [UInt16], _ b: [UInt16]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { $0 == $1 || (BF16.value($0).isNaN && BF16.value($1).isNaN) }
    }
    func same(_ a: [Float], _ b: [Float]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { $0.bitPattern == $1.bitPattern || ($0.isNaN && $1.isNaN) }
    }

    @Test("every kernel that writes bf16 bits gives the same bits by the CPU's conversion as by integer rounding",
          .enabled(if: ck_native_bf16_supported() != 0, "this CPU has no AVX512-BF16: only the integer rounding runs"))
    func nativeEqualsInteger() {
        let n = 1003, dropLimit = UInt32(0.1 * 4_294_967_296.0)
        let xs = Self.mixed(n, seed: 1), dy = Self.mixed(n, seed: 2), other = Self.mixed(n, seed: 3)
        // Conversions of every 4099th float bit pattern too.
        let patterns = stride(from: UInt64(0), through: 0xffff_ffff, by: 4099).map { Float(bitPattern: UInt32($0)) }
        let bits = bothWays { () -> [UInt16] in
            var out = [UInt16](repeating: 0, count: patterns.count)
            ck_bf16_bits(&out, patterns, patterns.count)
            return out
        }
        #expect(same(bits.integer, bits.native), "ck_bf16_bits")
        #expect(bits.native == patterns.map(BF16.bits), "ck_bf16_bits against BF16.bits")
        let gelu = bothWays { () -> [UInt16] in
            var y = [UInt16](repeating: 0, count: n), dx16 = y, dx = [Float](repeating: 0, count: n)
            ck_gelu_forward_bf16(&y, xs, nil, n)
            ck_gelu_backward_bf16(&dx, &dx16, dy, nil, xs, nil, n)
            return y + dx16
        }
        #expect(same(gelu.integer, gelu.native), "GELU forward and backward")
        // BatchNorm over rows of 16 and of 48 lanes (nChw16c and NHWC rows), with scales that make some of
        // the outputs subnormal.
        for lanes in [16, 48] {
            let rows = n / lanes
            let channel = { (seed: UInt64, scale: Float) in randomFloats(lanes, seed: seed, scale: scale) }
            let mean = channel(4, 0.1), scale = (0..<lanes).map { $0 % 3 == 0 ? Float(1e-38) : 1 + Float($0) / 16 }, shift = channel(5, 0.5)
            let (k, sumDy, sumDyx, invStd) = (channel(6, 1), channel(7, 1), channel(8, 1), channel(9, 2).map { 1 + abs($0) })
            let batchNorm = bothWays { () -> [UInt16] in
                var y = [UInt16](repeating: 0, count: rows * lanes), gated = y, dx = y
                ck_normalize_rows(nil, &y, xs, nil, rows, lanes, mean, scale, shift, 0)
                ck_normalize_rows(nil, &gated, xs, nil, rows, lanes, mean, scale, shift, 1)
                ck_bn_gradient_rows(nil, &dx, dy, nil, xs, nil, rows, lanes, scale, sumDy, sumDyx, mean, invStd, k, shift, 1.0 / 64, 0)
                return y + gated + dx
            }
            #expect(same(batchNorm.integer, batchNorm.native), "batch norm, \(lanes) lanes")
        }
        // A residual block's end and its backward, rounding its float inputs.
        let residual = bothWays { () -> ([Float], [UInt16]) in
            var y = [Float](repeating: 0, count: n), y16 = [UInt16](repeating: 0, count: n)
            ck_residual_relu(&y, &y16, xs, nil, other, nil, 1, n)
            var branch = [Float](repeating: 0, count: n), identity16 = [UInt16](repeating: 0, count: n)
            ck_residual_relu_backward(&branch, nil, nil, &identity16, 0, dy, nil, other, nil, 1, y, nil, n)
            return (y + branch, y16 + identity16)
        }
        #expect(same(residual.integer.0, residual.native.0) && same(residual.integer.1, residual.native.1), "residual sum and ReLU")
        // A transformer's residual LayerNorm (rows of 48 features) and its backward.
        let features = 48, rows = n / features
        // (Some outputs subnormal: where gamma is and beta is 0, and from a gradient near the smallest normal.)
        let gamma = (0..<features).map { $0 % 5 == 0 ? Float(1e-39) : 1 + Float($0) / 64 }
        let beta = randomFloats(features, seed: 10, scale: 0.1).enumerated().map { $0.offset % 5 == 0 ? 0 : $0.element }
        let tinyDy = dy.map { $0 * 1e-38 }
        let layerNorm = bothWays { () -> [UInt16] in
            var sum = [Float](repeating: 0, count: rows * features), y = sum, y16 = [UInt16](repeating: 0, count: rows * features)
            var mean = [Float](repeating: 0, count: rows), invStd = mean
            ck_residual_layernorm_rows(&sum, &y, &y16, &mean, &invStd, xs, other, gamma, beta, rows, features, 1e-12, 1, 0, 11, 12,
                                       dropLimit, 1 / 0.9)
            var gradResidual = [Float](repeating: 0, count: rows * features), dense16 = y16
            ck_layernorm_backward_residual_rows(&gradResidual, 0, nil, &dense16, tinyDy, sum, gamma, mean, invStd, rows, features, 1, 0, 11, 12,
                                                dropLimit, 1 / 0.9)
            return y16 + dense16
        }
        #expect(same(layerNorm.integer, layerNorm.native), "residual LayerNorm, forward and backward")
        // Attention's weights (scores spread so that some weights are subnormal) and their backward, 13 rows of
        // 77 keys, the last 5 of them masked.
        let tokens = 77, pairs = 13
        let valid = (0..<tokens).map { Int32($0 < tokens - 5 ? 1 : 0) }
        let scores = randomFloats(pairs * tokens, seed: 13, scale: 60)
        let attention = bothWays { () -> [UInt16] in
            var p = scores, w16 = [UInt16](repeating: 0, count: pairs * tokens)
            ck_attention_weights(&p, &w16, nil, valid, pairs, tokens, 1, 14, 15, dropLimit, 1 / 0.9)
            var dp = Array(dy.prefix(pairs * tokens)), ds16 = w16
            ck_attention_softmax_backward(&ds16, &dp, p, w16, pairs, tokens, 1, 1 / 0.9)
            return w16 + ds16
        }
        #expect(same(attention.integer, attention.native), "attention's weights and their backward")
    }
}
