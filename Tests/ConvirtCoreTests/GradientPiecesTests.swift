// Gradient pieces at the kernel level (GradientPieces.swift): every bf16 reduction over samples is made
// of pieces of a fixed shape, so that a rank's share of the batch sums the same pieces whatever the world
// size, and the shares add up to the whole batch's gradient within fp32's rounding of the additions that
// join them. The bound follows from the arithmetic: any order of summing k products in fp32 is within
// k * 2^-24 * sum |a_i b_i| of the exact sum (of the bf16-rounded operands), so two orders are within
// twice that; bf16's rounding of a partial sum (2^-9 of it) is far past it.
//
// CONVIRT_BF16=blocked's kernels (`blocked: true`) sum a weight gradient in two blocks rounded to bf16, as
// a kernel that blocks by its length may: without pieces a rank's share then differs from the whole at
// bf16's rounding, which these tests show, so they would catch a reduction left to a kernel's blocking.

import ConvirtCore
import ConvirtTestSupport
import Foundation
import Testing

/// The bf16 backends of a weight gradient: (oneDNN's bf16 kernels, blocked emulation).
private let backends: [(native: Bool, blocked: Bool)] = [(false, false), (false, true)] + (BF16.oneDNNRunsBF16 ? [(true, false)] : [])

private let unitRoundoff = pow(2.0, -24.0)

/// Elementwise |a - b| <= bound, or the first element past it.
private func firstPast(_ a: [Float], _ b: [Float], bound: [Double]) -> String? {
    for i in a.indices where abs(Double(a[i]) - Double(b[i])) > bound[i] {
        return "element \(i): \(a[i]) against \(b[i]), bound \(bound[i])"
    }
    return nil
}

@Suite("Gradient pieces")
struct GradientPiecesTests {
    /// A linear layer's weight gradient C [m, n] = A^T B over `rows` rows (A [rows, m], B [rows, n]).
    struct Product {
        let m = 24, n = 40, rows = 48
        let a: [Float], b: [Float]
        init(seed: UInt64) {
            a = randomFloats(rows * m, seed: seed)
            b = randomFloats(rows * n, seed: seed + 1)
        }

        /// Rows `range` alone, in pieces of `pieceRows`, written over C.
        func gradient(_ range: Range<Int>, pieceRows: Int, native: Bool, blocked: Bool) -> [Float] {
            gradient(range, pieces: RowPieces(rows: range.count, each: pieceRows), native: native, blocked: blocked)
        }

        /// Rows `range` alone, in `pieces` (of its rows), written over C.
        func gradient(_ range: Range<Int>, pieces: RowPieces, native: Bool, blocked: Bool) -> [Float] {
            var c = [Float](repeating: .nan, count: m * n)
            a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in c.withUnsafeMutableBufferPointer { c in
                piecewiseGradientProduct(m: m, n: n, pieces: pieces, a: Matrix(a.baseAddress! + range.lowerBound * m, ld: m),
                                         b: Matrix(b.baseAddress! + range.lowerBound * n, ld: n), c: MutableMatrix(c.baseAddress!, ld: n),
                                         overwrite: true, native: native, blocked: blocked)
            } } }
            return c
        }

        /// Ranks' shares of the rows (`ranks` equal ranges), each alone, added in rank order as the all-reduce adds them.
        func split(into ranks: Int, pieceRows: Int, native: Bool, blocked: Bool) -> [Float] {
            let share = rows / ranks
            var sum = [Float](repeating: 0, count: m * n)
            for r in 0..<ranks {
                let part = gradient((r * share)..<((r + 1) * share), pieceRows: pieceRows, native: native, blocked: blocked)
                for i in sum.indices { sum[i] += part[i] }
            }
            return sum
        }

        /// Twice fp32's bound on a sum of the rows' products in any order: 2 * rows * u * sum_r |a_ri b_rj|
        /// (the operands rounded to bf16, as the products see them).
        var bound: [Double] {
            var out = [Double](repeating: 0, count: m * n)
            for r in 0..<rows { for i in 0..<m { for j in 0..<n {
                out[i * n + j] += abs(Double(BF16.round(a[r * m + i])) * Double(BF16.round(b[r * n + j])))
            } } }
            return out.map { 2 * Double(rows) * unitRoundoff * $0 + 1e-30 }
        }
    }

    @Test("a linear layer's bf16 weight gradient in pieces is the whole batch's on 1, 2 and 4 ranks, within fp32's rounding, on every backend")
    func linearPieces() {
        let p = Product(seed: 11), bound = p.bound
        for backend in backends { for pieceRows in [6, 12] {
            let whole = p.gradient(0..<p.rows, pieceRows: pieceRows, native: backend.native, blocked: backend.blocked)
            for ranks in [2, 4] {
                let split = p.split(into: ranks, pieceRows: pieceRows, native: backend.native, blocked: backend.blocked)
                let past = firstPast(split, whole, bound: bound)
                #expect(past == nil, "\(backend), pieces of \(pieceRows) rows, \(ranks) ranks: \(past ?? "")")
            }
        } }
    }

    /// Pieces of different lengths (packed sentences: a piece's rows are its samples' valid tokens): two
    /// ranks holding whole pieces compute the whole batch's gradient within fp32's rounding.
    @Test("pieces of different lengths split over ranks at piece bounds give the whole batch's gradient, on every backend")
    func unevenPieces() {
        let p = Product(seed: 15), bound = p.bound
        let whole = RowPieces(bounds: [0, 5, 13, 24, 30, 40, 48])
        let shares = [(0..<24, RowPieces(bounds: [0, 5, 13, 24])), (24..<48, RowPieces(bounds: [0, 6, 16, 24]))]
        for backend in backends {
            let all = p.gradient(0..<p.rows, pieces: whole, native: backend.native, blocked: backend.blocked)
            var split = [Float](repeating: 0, count: p.m * p.n)
            for (rows, pieces) in shares {
                let part = p.gradient(rows, pieces: pieces, native: backend.native, blocked: backend.blocked)
                for i in split.indices { split[i] += part[i] }
            }
            let past = firstPast(split, all, bound: bound)
            #expect(past == nil, "\(backend): \(past ?? "")")
        }
    }

    @Test("without pieces the blocked backend's weight gradient depends on the rows a rank holds (the failure pieces prevent); fp32 kernels' does not")
    func blockedNeedsPieces() {
        let p = Product(seed: 12), bound = p.bound
        // One piece per rank: the kernel sums a rank's rows as it likes.
        let whole = p.gradient(0..<p.rows, pieceRows: p.rows, native: false, blocked: true)
        let split = p.split(into: 2, pieceRows: p.rows / 2, native: false, blocked: true)
        let worst = zip(zip(split, whole), bound).map { abs(Double($0.0.0) - Double($0.0.1)) / $0.1 }.max()!
        #expect(worst > 100, "the blocked kernel's whole-batch sum is past fp32's bound by \(worst)x only")
        let exact = p.gradient(0..<p.rows, pieceRows: p.rows, native: false, blocked: false)
        let exactSplit = p.split(into: 2, pieceRows: p.rows / 2, native: false, blocked: false)
        #expect(firstPast(exactSplit, exact, bound: bound) == nil)
    }

    @Test("pieces accumulate onto a gradient that holds values: C + pieces, within fp32's rounding")
    func accumulatingPieces() {
        let p = Product(seed: 13), bound = p.bound
        let start = randomFloats(p.m * p.n, seed: 14)
        for backend in backends {
            var c = start
            p.a.withUnsafeBufferPointer { a in p.b.withUnsafeBufferPointer { b in c.withUnsafeMutableBufferPointer { c in
                piecewiseGradientProduct(m: p.m, n: p.n, pieces: RowPieces(rows: p.rows, each: 8), a: Matrix(a.baseAddress!, ld: p.m), b: Matrix(b.baseAddress!, ld: p.n),
                                         c: MutableMatrix(c.baseAddress!, ld: p.n), overwrite: false, native: backend.native, blocked: backend.blocked)
            } } }
            let added = p.gradient(0..<p.rows, pieceRows: 8, native: backend.native, blocked: backend.blocked)
            let expected = zip(start, added).map { $0 + $1 }
            let widened = zip(bound, start).map { $0 + 2 * unitRoundoff * abs(Double($1)) }
            #expect(firstPast(c, expected, bound: widened) == nil, "\(backend)")
        }
    }

    @Test("bias and LayerNorm gradients in pieces: each piece summed alone from zero, the pieces added in order (bit for bit)")
    func ownSumsInPieces() {
        let (rows, features, pieceRows) = (24, 20, 6)
        let dy = randomFloats(rows * features, seed: 21), x = randomFloats(rows * features, seed: 22), w = randomFloats(features * features, seed: 23)
        let start = randomFloats(features, seed: 24)
        // The bias of a linear layer (bf16, pieces: the output gradient's bf16 values) against the plain loops.
        var bias = start, weights = [Float](repeating: 0, count: features * features)
        Linear.backward(gradInput: nil, gradWeight: &weights, gradBias: &bias, gradOutput: dy, input: x, weight: w, rows: rows, inFeatures: features,
                        outFeatures: features, precision: .bf16, overwriteWeight: true, pieces: RowPieces(rows: rows, each: pieceRows))
        var expected = start
        for first in stride(from: 0, to: rows, by: pieceRows) {
            for c in 0..<features {
                var s: Float = 0
                for r in first..<(first + pieceRows) { s += BF16.round(dy[r * features + c]) }
                expected[c] += s
            }
        }
        #expect(bias == expected)
        // LayerNorm's gamma and beta.
        let mean = randomFloats(rows, seed: 25), invStd = randomFloats(rows, seed: 26).map { 1 + abs($0) }
        var gamma = start, beta = start.reversed() as [Float], dx = [Float](repeating: 0, count: rows * features)
        LayerNorm.backward(gradInput: &dx, gradGamma: &gamma, gradBeta: &beta, gradOutput: dy, input: x, gamma: w, mean: mean, invStd: invStd,
                           rows: rows, features: features, pieces: RowPieces(rows: rows, each: pieceRows))
        var expectedGamma = start, expectedBeta = start.reversed() as [Float]
        for first in stride(from: 0, to: rows, by: pieceRows) {
            for i in 0..<features {
                var g: Float = 0, b: Float = 0
                for r in first..<(first + pieceRows) {
                    let d = dy[r * features + i]
                    g += d * (x[r * features + i] - mean[r]) * invStd[r]
                    b += d
                }
                expectedGamma[i] += g
                expectedBeta[i] += b
            }
        }
        #expect(gamma == expectedGamma && beta == expectedBeta)
    }
}

extension GradientPiecesTests {
    /// A convolution's weight gradient over images `range` of a batch of 4 (NCHW), in pieces of `pieceImages`.
    func convolutionGradient(_ x: [Float], _ dy: [Float], _ w: [Float], _ g: Conv2dGeometry, _ range: Range<Int>, pieceImages: Int,
                             native: Bool, blocked: Bool, layouts: Convolution.Layouts = Convolution.Layouts()) throws -> [Float] {
        let sub = try Conv2dGeometry(batch: range.count, inChannels: g.inChannels, height: g.height, width: g.width, outChannels: g.outChannels,
                                     kernel: (g.kernelH, g.kernelW), stride: (g.strideH, g.strideW), padding: (g.padH, g.padW))
        let inImage = g.inputCount / g.batch, outImage = g.outputCount / g.batch
        let kernels = Convolution(nativeBF16: native, blockedReductions: blocked)
        var gradWeight = [Float](repeating: .nan, count: g.weightCount)
        var workspace = [Float](repeating: 0, count: Convolution.workspaceCount(sub, precision: .bf16, nativeBF16: native))
        try x.withUnsafeBufferPointer { x in try dy.withUnsafeBufferPointer { dy in
            try kernels.backward(gradInput: nil, gradWeight: &gradWeight, gradOutput: dy.baseAddress! + range.lowerBound * outImage,
                                 input: x.baseAddress! + range.lowerBound * inImage, weight: w, geometry: sub, workspace: &workspace,
                                 precision: .bf16, layouts: layouts, overwriteWeight: true, pieceImages: pieceImages)
        } }
        return gradWeight
    }

    @Test("a convolution's bf16 weight gradient in pieces is the whole batch's on 1, 2 and 4 ranks, within fp32's rounding, on every backend",
          arguments: [(3, 1, 16), (1, 2, 32)])
    func convolutionPieces(kernel: Int, stride: Int, channels: Int) throws {
        let g = try Conv2dGeometry(batch: 4, inChannels: channels, height: 12, width: 12, outChannels: 16, kernel: kernel, stride: stride,
                                   padding: kernel / 2)
        let x = randomFloats(g.inputCount, seed: 31), dy = randomFloats(g.outputCount, seed: 32), w = randomFloats(g.weightCount, seed: 33)
        // sum |dy| |x| over the images and pixels of each weight: the terms' magnitudes, for the bound.
        let magnitudes = Reference.conv2dBackward(dy.map { abs(Double(BF16.round($0))) }, x.map { abs(Double(BF16.round($0))) },
                                                  w.map(Double.init), g).1
        let terms = Double(g.batch * g.outPlane)
        let bound = magnitudes.map { 2 * terms * unitRoundoff * $0 + 1e-30 }
        var cases = backends.map { ($0.native, $0.blocked, Convolution.Layouts()) }
        if BF16.oneDNNRunsBF16 { cases += [(true, false, Convolution.Layouts(.blocked16)), (true, false, Convolution.Layouts(.blocked8))] }
        for (native, blocked, layouts) in cases { for pieceImages in [1, 2] {
            // A blocked layout on oneDNN: the caller's buffers in that layout hold the same numbers, reordered.
            let input = toLayout(x, layouts.input, n: g.batch, c: g.inChannels, plane: g.height * g.width)
            let gradOutput = toLayout(dy, layouts.output, n: g.batch, c: g.outChannels, plane: g.outPlane)
            func share(_ range: Range<Int>) throws -> [Float] {
                try convolutionGradient(input, gradOutput, w, g, range, pieceImages: pieceImages, native: native, blocked: blocked, layouts: layouts)
            }
            let whole = try share(0..<4)
            for ranks in [2, 4] where (4 / ranks) % pieceImages == 0 {
                var split = [Float](repeating: 0, count: g.weightCount)
                for r in 0..<ranks {
                    let part = try share((r * 4 / ranks)..<((r + 1) * 4 / ranks))
                    for i in split.indices { split[i] += part[i] }
                }
                let past = firstPast(split, whole, bound: bound)
                #expect(past == nil, "native \(native), blocked \(blocked), pieces of \(pieceImages), \(ranks) ranks: \(past ?? "")")
            }
        } }
        // The blocked backend without pieces (a rank's images in one call): past fp32's bound.
        let whole = try convolutionGradient(x, dy, w, g, 0..<4, pieceImages: 4, native: false, blocked: true)
        var split = [Float](repeating: 0, count: g.weightCount)
        for r in 0..<2 {
            let part = try convolutionGradient(x, dy, w, g, (2 * r)..<(2 * r + 2), pieceImages: 2, native: false, blocked: true)
            for i in split.indices { split[i] += part[i] }
        }
        // (The bound is fp32's worst case over 4 x 144 or 4 x 36 terms, so bf16's rounding of a partial sum
        // passes it by less than in the linear layer's 48: 9x and 51x here.)
        let worst = zip(zip(split, whole), bound).map { abs(Double($0.0.0) - Double($0.0.1)) / $0.1 }.max()!
        #expect(worst > 4, "the blocked convolution's whole-batch sum is past fp32's bound by \(worst)x only")
    }
}
