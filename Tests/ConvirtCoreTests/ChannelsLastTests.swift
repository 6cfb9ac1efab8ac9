// The channels-last kernels (BatchNorm, max pool, global average pool, oneDNN's convolution on NHWC)
// against their NCHW versions on the same tensors transposed: the NCHW kernels are proven against
// PyTorch and finite differences elsewhere, so equality here carries those proofs over.

import ConvirtCore
import Testing

/// [N, C, H, W] -> [N, H, W, C].
func toNHWC(_ x: [Float], n: Int, c: Int, plane: Int) -> [Float] {
    var y = [Float](repeating: 0, count: x.count)
    for i in 0..<n { for k in 0..<c { for p in 0..<plane { y[(i * plane + p) * c + k] = x[(i * c + k) * plane + p] } } }
    return y
}

/// The largest |a - b| (NaN where either is NaN at a place the other is not).
func maxAbsDiff(_ a: [Float], _ b: [Float]) -> Float {
    precondition(a.count == b.count)
    var worst: Float = 0
    for (x, y) in zip(a, b) where !(x.isNaN && y.isNaN) { worst = max(worst, abs(x - y).isNaN ? .infinity : abs(x - y)) }
    return worst
}

@Suite("Channels-last kernels")
struct ChannelsLastTests {
    struct BNResult {
        var y: [Float], dx: [Float], dGamma: [Float], dBeta: [Float], runningMean: [Float], runningVar: [Float]
    }

    /// BatchNorm forward and backward (training or evaluation, ReLU fused or not) in `layout`; x and dy
    /// are given in that layout, dx starts at 3 (accumulated onto, or overwritten with `accumulate` false).
    func batchNorm(_ x: [Float], _ dy: [Float], gamma: [Float], beta: [Float], n: Int, c: Int, plane: Int, training: Bool, relu: Bool,
                   accumulate: Bool, layout: ActivationLayout) throws -> BNResult {
        var r = BNResult(y: [Float](repeating: .nan, count: x.count), dx: [Float](repeating: 3, count: x.count),
                         dGamma: [Float](repeating: 0.5, count: c), dBeta: [Float](repeating: -0.5, count: c),
                         runningMean: (0..<c).map { Float($0) * 0.01 }, runningVar: (0..<c).map { 1 + Float($0) * 0.02 })
        try withBatchNormScratch(channels: c) { saved, stats in
            if training {
                try BatchNorm2d.forwardTraining(output: &r.y, input: x, gamma: gamma, beta: beta, runningMean: &r.runningMean,
                                                runningVar: &r.runningVar, saved: &saved, batch: n, channels: c, plane: plane,
                                                statistics: stats, relu: relu, layout: layout)
                try BatchNorm2d.backwardTraining(gradInput: &r.dx, gradGamma: &r.dGamma, gradBeta: &r.dBeta, gradOutput: dy, input: x,
                                                 gamma: gamma, saved: saved, batch: n, channels: c, plane: plane, statistics: stats,
                                                 reluOutput: relu ? r.y : nil, accumulate: accumulate, layout: layout)
            } else {
                BatchNorm2d.forwardInference(output: &r.y, input: x, gamma: gamma, beta: beta, runningMean: r.runningMean,
                                             runningVar: r.runningVar, batch: n, channels: c, plane: plane, relu: relu, layout: layout)
                BatchNorm2d.backwardInference(gradInput: &r.dx, gradGamma: &r.dGamma, gradBeta: &r.dBeta, gradOutput: dy, input: x,
                                              gamma: gamma, runningMean: r.runningMean, runningVar: r.runningVar, batch: n, channels: c,
                                              plane: plane, reluOutput: relu ? r.y : nil, accumulate: accumulate, layout: layout)
            }
        }
        return r
    }

    // Channel counts off the vector width, planes past one 256-row block, one image and several.
    @Test("BatchNorm on NHWC equals BatchNorm on NCHW, training and evaluation, with and without the fused ReLU",
          arguments: [(2, 3, 17), (1, 64, 300), (3, 20, 49), (2, 33, 9)])
    func batchNorm(n: Int, c: Int, plane: Int) throws {
        let count = n * c * plane
        // An offset mean, so that the variance is a difference of large sums (as after a convolution).
        let x = randomFloats(count, seed: 70, scale: 2).map { $0 + 1.5 }, dy = randomFloats(count, seed: 71)
        let gamma = randomFloats(c, seed: 72), beta = randomFloats(c, seed: 73)
        for training in [true, false] { for relu in [false, true] { for accumulate in [false, true] {
            let a = try batchNorm(x, dy, gamma: gamma, beta: beta, n: n, c: c, plane: plane, training: training, relu: relu,
                                  accumulate: accumulate, layout: .nchw)
            let b = try batchNorm(toNHWC(x, n: n, c: c, plane: plane), toNHWC(dy, n: n, c: c, plane: plane), gamma: gamma, beta: beta,
                                  n: n, c: c, plane: plane, training: training, relu: relu, accumulate: accumulate, layout: .nhwc)
            let what = "n \(n) c \(c) plane \(plane) training \(training) relu \(relu) accumulate \(accumulate)"
            // The statistics sum in another order (float blocks of 256 rows against 256 elements of a plane).
            #expect(maxAbsDiff(b.y, toNHWC(a.y, n: n, c: c, plane: plane)) <= 2e-5, "output, \(what)")
            #expect(maxAbsDiff(b.dx, toNHWC(a.dx, n: n, c: c, plane: plane)) <= 2e-5 * max(1, a.dx.map(abs).max()!), "input gradient, \(what)")
            #expect(maxAbsDiff(b.dGamma, a.dGamma) <= 1e-4 && maxAbsDiff(b.dBeta, a.dBeta) <= 1e-4, "parameter gradients, \(what)")
            #expect(maxAbsDiff(b.runningMean, a.runningMean) <= 1e-6 && maxAbsDiff(b.runningVar, a.runningVar) <= 1e-5, "running statistics, \(what)")
        } } }
    }

    @Test("max pool on NHWC equals max pool on NCHW: values, argmax and the backward scatter (ties and NaN included)",
          arguments: [(2, 3, 9, 9), (1, 16, 12, 7), (2, 5, 112, 112)])
    func maxPool(n: Int, c: Int, h: Int, w: Int) {
        let oh = MaxPool2d.outputSize(h, kernel: 3, stride: 2, padding: 1), ow = MaxPool2d.outputSize(w, kernel: 3, stride: 2, padding: 1)
        // Coarse values make ties; one NaN propagates as in PyTorch.
        var x = randomFloats(n * c * h * w, seed: 80, scale: 3).map { ($0 * 2).rounded() }
        x[min(17, x.count - 1)] = .nan
        let dy = randomFloats(n * c * oh * ow, seed: 81)
        var y = [Float](repeating: 0, count: dy.count), yl = y
        var idx = [Int32](repeating: 0, count: dy.count), idxl = idx
        MaxPool2d.forward(output: &y, indices: &idx, input: x, planes: n * c, height: h, width: w)
        MaxPool2d.forwardNHWC(output: &yl, indices: &idxl, input: toNHWC(x, n: n, c: c, plane: h * w), batch: n, channels: c, height: h, width: w)
        let expected = toNHWC(y, n: n, c: c, plane: oh * ow)
        #expect(zip(yl, expected).allSatisfy { $0 == $1 || ($0.isNaN && $1.isNaN) })
        #expect(idxl == toNHWC(idx.map(Float.init), n: n, c: c, plane: oh * ow).map { Int32($0) })
        var dx = [Float](repeating: 1, count: x.count), dxl = dx
        MaxPool2d.backward(gradInput: &dx, gradOutput: dy, indices: idx, planes: n * c, inPlane: h * w, outPlane: oh * ow)
        MaxPool2d.backwardNHWC(gradInput: &dxl, gradOutput: toNHWC(dy, n: n, c: c, plane: oh * ow), indices: idxl, batch: n, channels: c,
                               inPlane: h * w, outPlane: oh * ow)
        #expect(dxl == toNHWC(dx, n: n, c: c, plane: h * w))
    }

    @Test("global average pool on NHWC gives the NCHW features exactly, and the same gradient")
    func globalAveragePool() {
        let (n, c, plane) = (3, 40, 49)
        let x = randomFloats(n * c * plane, seed: 90), g = randomFloats(n * c, seed: 91)
        var f = [Float](repeating: 0, count: n * c), fl = f
        GlobalAvgPool.forward(output: &f, input: x, rows: n * c, plane: plane)
        GlobalAvgPool.forwardNHWC(output: &fl, input: toNHWC(x, n: n, c: c, plane: plane), batch: n, channels: c, plane: plane)
        #expect(fl == f)
        var dx = [Float](repeating: 2, count: x.count), dxl = dx
        GlobalAvgPool.backward(gradInput: &dx, gradOutput: g, rows: n * c, plane: plane)
        GlobalAvgPool.backwardNHWC(gradInput: &dxl, gradOutput: g, batch: n, channels: c, plane: plane)
        #expect(dxl == toNHWC(dx, n: n, c: c, plane: plane))
    }

    @Test("oneDNN's convolution on NHWC activations equals it on NCHW ones (forward, accumulating backward), fp32 and bf16",
          arguments: 0..<6)
    func convolution(index: Int) throws {
        let (n, c, h, w, o, kh, kw, s, p, _) = DNNLConvolutionTests.cases[index]
        let g = try Conv2dGeometry(batch: n, inChannels: c, height: h, width: w, outChannels: o, kernel: (kh, kw), stride: (s, s), padding: (p, p))
        let x = randomFloats(g.inputCount, seed: 1), wt = randomFloats(g.weightCount, seed: 2), dy = randomFloats(g.outputCount, seed: 4)
        let dx0 = randomFloats(x.count, seed: 5), dw0 = randomFloats(wt.count, seed: 6)
        let (inPlane, outPlane) = (h * w, g.outPlane)
        for precision in BF16.oneDNNRunsBF16 ? [Precision.fp32, .bf16] : [.fp32] {
            let plain = try ConvolutionPrimitives(geometry: g, precision: precision)
            let last = try ConvolutionPrimitives(geometry: g, precision: precision, inputLayout: .nhwc, outputLayout: .nhwc)
            let stem = try ConvolutionPrimitives(geometry: g, precision: precision, inputLayout: .nchw, outputLayout: .nhwc)
            var y = [Float](repeating: .nan, count: g.outputCount), yl = y, ys = y
            try plain.forward(output: &y, input: x, weight: wt)
            try last.forward(output: &yl, input: toNHWC(x, n: n, c: c, plane: inPlane), weight: wt)
            try stem.forward(output: &ys, input: x, weight: wt)
            let expected = toNHWC(y, n: n, c: o, plane: outPlane)
            let scale = Double(y.map(abs).max()!)
            // fp32: the kernels for the two layouts may sum in other orders; bf16: the same bf16 products.
            #expect(Double(maxAbsDiff(yl, expected)) <= 1e-5 * scale && Double(maxAbsDiff(ys, expected)) <= 1e-5 * scale, "forward \(g) \(precision)")
            var dx = dx0, dw = dw0, dxl = toNHWC(dx0, n: n, c: c, plane: inPlane), dwl = dw0
            try plain.backward(gradInput: &dx, gradWeight: &dw, gradBias: nil, gradOutput: dy, input: x, weight: wt)
            try last.backward(gradInput: &dxl, gradWeight: &dwl, gradBias: nil, gradOutput: toNHWC(dy, n: n, c: o, plane: outPlane),
                              input: toNHWC(x, n: n, c: c, plane: inPlane), weight: wt)
            let dxScale = Double(dx.map(abs).max()!), dwScale = Double(dw.map(abs).max()!)
            #expect(Double(maxAbsDiff(dxl, toNHWC(dx, n: n, c: c, plane: inPlane))) <= 1e-5 * dxScale, "input gradient \(g) \(precision)")
            #expect(Double(maxAbsDiff(dwl, dw)) <= 1e-5 * dwScale, "weight gradient \(g) \(precision)")
        }
    }
}
