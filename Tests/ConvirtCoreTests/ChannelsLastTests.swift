// The channels-last and blocked kernels (BatchNorm, max pool, global average pool, oneDNN's convolution
// on NHWC, nChw16c and nChw8c) against their NCHW versions on the same tensors laid out so: the NCHW kernels are
// proven against PyTorch and finite differences elsewhere, so equality here carries those proofs over.

import ConvirtCore
import Testing

/// [N, C, H, W] -> [N, H, W, C].
func toNHWC(_ x: [Float], n: Int, c: Int, plane: Int) -> [Float] {
    var y = [Float](repeating: 0, count: x.count)
    for i in 0..<n { for k in 0..<c { for p in 0..<plane { y[(i * plane + p) * c + k] = x[(i * c + k) * plane + p] } } }
    return y
}

/// [N, C, H, W] -> [N, C/b, H, W, b] (oneDNN's nChw16c for b = 16, nChw8c for b = 8).
func toBlocked(_ x: [Float], block b: Int, n: Int, c: Int, plane: Int) -> [Float] {
    precondition(c % b == 0)
    var y = [Float](repeating: 0, count: x.count)
    for i in 0..<n { for k in 0..<c { for p in 0..<plane { y[((i * c + k / b * b) * plane + p * b) + k % b] = x[(i * c + k) * plane + p] } } }
    return y
}

/// x [N, C, H, W] laid out in `layout`.
func toLayout(_ x: [Float], _ layout: ActivationLayout, n: Int, c: Int, plane: Int) -> [Float] {
    switch layout {
    case .nchw: x
    case .nhwc: toNHWC(x, n: n, c: c, plane: plane)
    case .blocked16, .blocked8: toBlocked(x, block: layout.blockChannels!, n: n, c: c, plane: plane)
    }
}

/// x laid out in `layout` back to [N, C, H, W].
func fromLayout(_ x: [Float], _ layout: ActivationLayout, n: Int, c: Int, plane: Int) -> [Float] {
    precondition(x.count < 1 << 24, "element indices as floats must be exact")
    // Where each NCHW element lies in `layout`: the indices themselves laid out.
    let sources = toLayout((0..<x.count).map(Float.init), layout, n: n, c: c, plane: plane)
    var y = [Float](repeating: 0, count: x.count)
    for (place, source) in sources.enumerated() { y[Int(source)] = x[place] }
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
    /// `halves`: x is read as its bf16 bits (`inputBF16`, input nil).
    func batchNorm(_ x: [Float], _ dy: [Float], gamma: [Float], beta: [Float], n: Int, c: Int, plane: Int, training: Bool, relu: Bool,
                   accumulate: Bool, layout: ActivationLayout, halves: Bool = false) throws -> BNResult {
        let x16: [UInt16]? = halves ? x.map(BF16.bits) : nil
        var r = BNResult(y: [Float](repeating: .nan, count: x.count), dx: [Float](repeating: 3, count: x.count),
                         dGamma: [Float](repeating: 0.5, count: c), dBeta: [Float](repeating: -0.5, count: c),
                         runningMean: (0..<c).map { Float($0) * 0.01 }, runningVar: (0..<c).map { 1 + Float($0) * 0.02 })
        let shape = BatchNorm2d.Shape(batch: n, channels: c, plane: plane, layout: layout)
        try withBatchNormScratch(channels: c) { saved in
            try x.withUnsafeBufferPointer { floats in try (x16 ?? []).withUnsafeBufferPointer { bits in
            let input: RowValues = halves ? .bf16(bits.baseAddress!) : .fp32(floats.baseAddress!)
            try withBatchNormParameters(gamma: gamma, beta: beta, runningMean: &r.runningMean, runningVar: &r.runningVar) { parameters in
            try r.y.withUnsafeMutableBufferPointer { y in try r.dx.withUnsafeMutableBufferPointer { dx in
            try r.dGamma.withUnsafeMutableBufferPointer { dGamma in try r.dBeta.withUnsafeMutableBufferPointer { dBeta in
            let gradients = BatchNorm2d.ParameterGradients(gamma: dGamma.baseAddress!, beta: dBeta.baseAddress!)
            if training {
                try BatchNorm2d.forwardTraining(shape, output: .floats(y.baseAddress!), input: input, parameters: parameters, saved: &saved,
                                                relu: relu)
                try BatchNorm2d.backwardTraining(shape, gradInput: .floats(dx.baseAddress!), gradients: gradients, gradOutput: dy, input: input,
                                                 gamma: gamma, beta: beta, saved: saved, relu: relu, accumulate: accumulate)
            } else {
                BatchNorm2d.forwardInference(shape, output: .floats(y.baseAddress!), input: input, parameters: parameters, relu: relu)
                BatchNorm2d.backwardInference(shape, gradInput: .floats(dx.baseAddress!), gradients: gradients, gradOutput: dy, input: input,
                                              parameters: parameters, relu: relu, accumulate: accumulate)
            }
            } } } }
            }
            } }
        }
        return r
    }

    // What a bf16 convolution on oneDNN writes for the batch norm after it (ConvBNUnit).
    @Test("BatchNorm reads a bf16 input as the floats it stands for: the same outputs, gradients and statistics, bit for bit",
          arguments: [(2, 16, 300), (3, 32, 49), (2, 20, 17), (1, 64, 300), (3, 24, 49)])
    func batchNormBF16Input(n: Int, c: Int, plane: Int) throws {
        let count = n * c * plane
        let gamma = randomFloats(c, seed: 92), beta = randomFloats(c, seed: 93)
        for layout in ActivationLayout.rowLayouts where layout.holds(channels: c) {
        for training in [true, false] { for relu in [false, true] { for accumulate in [false, true] {
            let x = toLayout(randomFloats(count, seed: 90, scale: 2).map { $0 + 1.5 }, layout, n: n, c: c, plane: plane)
            let dy = toLayout(randomFloats(count, seed: 91), layout, n: n, c: c, plane: plane)
            let what = "\(layout) n \(n) c \(c) plane \(plane) training \(training) relu \(relu) accumulate \(accumulate)"
            let floats = try batchNorm(x.map(BF16.round), dy, gamma: gamma, beta: beta, n: n, c: c, plane: plane, training: training,
                                       relu: relu, accumulate: accumulate, layout: layout)
            let bits = try batchNorm(x, dy, gamma: gamma, beta: beta, n: n, c: c, plane: plane, training: training, relu: relu,
                                     accumulate: accumulate, layout: layout, halves: true)
            #expect(bits.y == floats.y && bits.dx == floats.dx, "output and input gradient, \(what)")
            #expect(bits.dGamma == floats.dGamma && bits.dBeta == floats.dBeta, "parameter gradients, \(what)")
            #expect(bits.runningMean == floats.runningMean && bits.runningVar == floats.runningVar, "running statistics, \(what)")
            // And the rounding happened: the unrounded input normalizes to other values.
            let unrounded = try batchNorm(x, dy, gamma: gamma, beta: beta, n: n, c: c, plane: plane, training: training, relu: relu,
                                          accumulate: accumulate, layout: layout)
            #expect(unrounded.y != bits.y, "bf16 input read as floats, \(what)")
        } } }
        }
    }

    // Channel counts off the vector width, planes past one 256-row block, one image and several.
    @Test("BatchNorm on NHWC, nChw16c and nChw8c equals BatchNorm on NCHW, training and evaluation, with and without the fused ReLU",
          arguments: [(2, 3, 17), (1, 64, 300), (3, 20, 49), (2, 33, 9), (3, 32, 49), (2, 16, 300), (3, 8, 301), (2, 24, 49)])
    func batchNorm(n: Int, c: Int, plane: Int) throws {
        let count = n * c * plane
        // An offset mean, so that the variance is a difference of large sums (as after a convolution).
        let x = randomFloats(count, seed: 70, scale: 2).map { $0 + 1.5 }, dy = randomFloats(count, seed: 71)
        let gamma = randomFloats(c, seed: 72), beta = randomFloats(c, seed: 73)
        for layout in ActivationLayout.rowLayouts where layout.holds(channels: c) {
        for training in [true, false] { for relu in [false, true] { for accumulate in [false, true] {
            let a = try batchNorm(x, dy, gamma: gamma, beta: beta, n: n, c: c, plane: plane, training: training, relu: relu,
                                  accumulate: accumulate, layout: .nchw)
            let b = try batchNorm(toLayout(x, layout, n: n, c: c, plane: plane), toLayout(dy, layout, n: n, c: c, plane: plane), gamma: gamma,
                                  beta: beta, n: n, c: c, plane: plane, training: training, relu: relu, accumulate: accumulate, layout: layout)
            let what = "\(layout) n \(n) c \(c) plane \(plane) training \(training) relu \(relu) accumulate \(accumulate)"
            // The statistics sum in another order (float blocks of 256 rows against 256 elements of a plane).
            #expect(maxAbsDiff(b.y, toLayout(a.y, layout, n: n, c: c, plane: plane)) <= 2e-5, "output, \(what)")
            #expect(maxAbsDiff(b.dx, toLayout(a.dx, layout, n: n, c: c, plane: plane)) <= 2e-5 * max(1, a.dx.map(abs).max()!),
                    "input gradient, \(what)")
            #expect(maxAbsDiff(b.dGamma, a.dGamma) <= 1e-4 && maxAbsDiff(b.dBeta, a.dBeta) <= 1e-4, "parameter gradients, \(what)")
            #expect(maxAbsDiff(b.runningMean, a.runningMean) <= 1e-6 && maxAbsDiff(b.runningVar, a.runningVar) <= 1e-5, "running statistics, \(what)")
        } } }
        }
    }

    // The copies ResNet keeps for oneDNN's bf16 convolutions (ResNet.keepsBF16Activations).
    @Test("BatchNorm's bf16 outputs are its float outputs' bf16 bits, and its bf16 input gradient the float one's",
          arguments: [(2, 16, 300), (3, 32, 49), (2, 20, 17), (3, 24, 49)])
    func batchNormBF16(n: Int, c: Int, plane: Int) throws {
        let count = n * c * plane
        let gamma = randomFloats(c, seed: 82), beta = randomFloats(c, seed: 83)
        for layout in ActivationLayout.rowLayouts where layout.holds(channels: c) {
        for training in [true, false] { for relu in [false, true] {
            let x = toLayout(randomFloats(count, seed: 80, scale: 2).map { $0 + 0.5 }, layout, n: n, c: c, plane: plane)
            let dy = toLayout(randomFloats(count, seed: 81), layout, n: n, c: c, plane: plane)
            let what = "\(layout) n \(n) c \(c) plane \(plane) training \(training) relu \(relu)"
            let reference = try batchNorm(x, dy, gamma: gamma, beta: beta, n: n, c: c, plane: plane, training: training, relu: relu,
                                          accumulate: false, layout: layout)
            var y = [Float](repeating: .nan, count: count), y16 = [UInt16](repeating: 1, count: count), only16 = y16
            var dx16 = [UInt16](repeating: 1, count: count), dGamma = [Float](repeating: 0.5, count: c), dBeta = [Float](repeating: -0.5, count: c)
            var runningMean = (0..<c).map { Float($0) * 0.01 }, runningVar = (0..<c).map { 1 + Float($0) * 0.02 }
            let shape = BatchNorm2d.Shape(batch: n, channels: c, plane: plane, layout: layout)
            var (m2, v2) = (runningMean, runningVar)
            try withBatchNormScratch(channels: c) { saved in
                try withBatchNormParameters(gamma: gamma, beta: beta, runningMean: &runningMean, runningVar: &runningVar) { parameters in
                try withBatchNormParameters(gamma: gamma, beta: beta, runningMean: &m2, runningVar: &v2) { parameters2 in
                try y.withUnsafeMutableBufferPointer { y in try y16.withUnsafeMutableBufferPointer { y16 in
                try only16.withUnsafeMutableBufferPointer { only16 in try dx16.withUnsafeMutableBufferPointer { dx16 in
                try dGamma.withUnsafeMutableBufferPointer { dGamma in try dBeta.withUnsafeMutableBufferPointer { dBeta in
                try x.withUnsafeBufferPointer { xb in
                    let input = RowValues.fp32(xb.baseAddress!)
                    let gradients = BatchNorm2d.ParameterGradients(gamma: dGamma.baseAddress!, beta: dBeta.baseAddress!)
                    let both = BatchNorm2d.Destination(floats: y.baseAddress!, halves: y16.baseAddress!)
                    let halvesOnly = BatchNorm2d.Destination(halves: only16.baseAddress!)
                    if training {
                        try BatchNorm2d.forwardTraining(shape, output: both, input: input, parameters: parameters, saved: &saved, relu: relu)
                        try BatchNorm2d.forwardTraining(shape, output: halvesOnly, input: input, parameters: parameters2, saved: &saved,
                                                        relu: relu)
                        try BatchNorm2d.backwardTraining(shape, gradInput: BatchNorm2d.Destination(halves: dx16.baseAddress!), gradients: gradients,
                                                         gradOutput: dy, input: input, gamma: gamma, beta: beta, saved: saved,
                                                         relu: relu, accumulate: false)
                    } else {
                        BatchNorm2d.forwardInference(shape, output: both, input: input, parameters: parameters, relu: relu)
                        BatchNorm2d.forwardInference(shape, output: halvesOnly, input: input, parameters: parameters, relu: relu)
                        BatchNorm2d.backwardInference(shape, gradInput: BatchNorm2d.Destination(halves: dx16.baseAddress!), gradients: gradients,
                                                      gradOutput: dy, input: input, parameters: parameters, relu: relu, accumulate: false)
                    }
                } } } } } } }
                }
                }
            }
            #expect(y == reference.y, "float output, \(what)")
            #expect(y16 == reference.y.map(BF16.bits) && only16 == y16, "bf16 output, \(what)")
            #expect(dx16 == reference.dx.map(BF16.bits), "bf16 input gradient, \(what)")
            #expect(dGamma == reference.dGamma && dBeta == reference.dBeta, "parameter gradients, \(what)")
            if training { #expect(runningMean == reference.runningMean && runningVar == reference.runningVar, "running statistics, \(what)") }
        } }
        }
    }

    // The threads share out units of whole rows and add the units' partial sums in one order afterwards
    // (`laneSums`), so neither the thread count nor the layout's row length changes a bit. Thread counts
    // past the channels per row and past the units included.
    @Test("BatchNorm gives the same bits for any thread count, on NHWC, nChw16c and nChw8c alike")
    func batchNormThreads() throws {
        let (n, c, plane) = (3, 48, 300)
        let x = randomFloats(n * c * plane, seed: 74, scale: 2).map { $0 + 1.5 }, dy = randomFloats(n * c * plane, seed: 75)
        let gamma = randomFloats(c, seed: 76), beta = randomFloats(c, seed: 77)
        let previous = Parallel.threads
        defer { Parallel.threads = previous }
        for relu in [false, true] {
            var results: [(what: String, result: BNResult)] = []
            for layout in ActivationLayout.rowLayouts {
                for threads in [1, 2, 3, 7, 64] {
                    Parallel.threads = threads
                    let r = try batchNorm(toLayout(x, layout, n: n, c: c, plane: plane), toLayout(dy, layout, n: n, c: c, plane: plane), gamma: gamma,
                                          beta: beta, n: n, c: c, plane: plane, training: true, relu: relu, accumulate: false, layout: layout)
                    // The outputs in one layout (NHWC), to compare across layouts.
                    let y = toNHWC(fromLayout(r.y, layout, n: n, c: c, plane: plane), n: n, c: c, plane: plane)
                    let dx = toNHWC(fromLayout(r.dx, layout, n: n, c: c, plane: plane), n: n, c: c, plane: plane)
                    results.append(("\(layout), \(threads) thread(s), relu \(relu)", BNResult(y: y, dx: dx, dGamma: r.dGamma, dBeta: r.dBeta,
                                                                                              runningMean: r.runningMean, runningVar: r.runningVar)))
                }
            }
            let first = results[0].result
            for (what, r) in results.dropFirst() {
                #expect(r.y.map(\.bitPattern) == first.y.map(\.bitPattern) && r.dx.map(\.bitPattern) == first.dx.map(\.bitPattern), "outputs, \(what)")
                #expect(r.dGamma == first.dGamma && r.dBeta == first.dBeta && r.runningMean == first.runningMean && r.runningVar == first.runningVar,
                        "statistics and parameter gradients, \(what)")
            }
        }
    }

    @Test("max pool on NHWC, nChw16c and nChw8c equals max pool on NCHW: values, argmax and the backward scatter (ties and NaN included)",
          arguments: [(2, 3, 9, 9), (1, 16, 12, 7), (2, 5, 112, 112), (2, 32, 9, 9), (2, 24, 9, 9), (1, 8, 12, 7)])
    func maxPool(n: Int, c: Int, h: Int, w: Int) {
        let oh = MaxPool2d.outputSize(h, kernel: 3, stride: 2, padding: 1), ow = MaxPool2d.outputSize(w, kernel: 3, stride: 2, padding: 1)
        // Coarse values make ties; one NaN propagates as in PyTorch.
        var x = randomFloats(n * c * h * w, seed: 80, scale: 3).map { ($0 * 2).rounded() }
        x[min(17, x.count - 1)] = .nan
        let dy = randomFloats(n * c * oh * ow, seed: 81)
        var y = [Float](repeating: 0, count: dy.count)
        var idx = [Int32](repeating: 0, count: dy.count)
        MaxPool2d.forward(output: &y, indices: &idx, input: x, planes: n * c, height: h, width: w)
        var dx = [Float](repeating: 1, count: x.count)
        MaxPool2d.backward(gradInput: &dx, gradOutput: dy, indices: idx, planes: n * c, inPlane: h * w, outPlane: oh * ow)
        for layout in ActivationLayout.rowLayouts where layout.holds(channels: c) {
            let (images, lanes) = layout.pixelRows(batch: n, channels: c)
            var yl = [Float](repeating: 0, count: dy.count), idxl = [Int32](repeating: 0, count: dy.count)
            MaxPool2d.forwardNHWC(output: &yl, indices: &idxl, input: toLayout(x, layout, n: n, c: c, plane: h * w), batch: images,
                                  channels: lanes, height: h, width: w)
            let expected = toLayout(y, layout, n: n, c: c, plane: oh * ow)
            #expect(zip(yl, expected).allSatisfy { $0 == $1 || ($0.isNaN && $1.isNaN) }, "\(layout)")
            #expect(idxl == toLayout(idx.map(Float.init), layout, n: n, c: c, plane: oh * ow).map { Int32($0) }, "\(layout)")
            var dxl = [Float](repeating: 1, count: x.count)
            MaxPool2d.backwardNHWC(gradInput: &dxl, gradOutput: toLayout(dy, layout, n: n, c: c, plane: oh * ow), indices: idxl, batch: images,
                                   channels: lanes, inPlane: h * w, outPlane: oh * ow)
            #expect(dxl == toLayout(dx, layout, n: n, c: c, plane: h * w), "\(layout)")
        }
    }

    @Test("global average pool on NHWC, nChw16c and nChw8c gives the NCHW features exactly, and the same gradient")
    func globalAveragePool() {
        let (n, c, plane) = (3, 48, 49)
        let x = randomFloats(n * c * plane, seed: 90), g = randomFloats(n * c, seed: 91)
        var f = [Float](repeating: 0, count: n * c)
        GlobalAvgPool.forward(output: &f, input: x, rows: n * c, plane: plane)
        var dx = [Float](repeating: 2, count: x.count)
        GlobalAvgPool.backward(gradInput: &dx, gradOutput: g, rows: n * c, plane: plane)
        for layout in ActivationLayout.rowLayouts {
            let (images, lanes) = layout.pixelRows(batch: n, channels: c)
            var fl = [Float](repeating: 0, count: n * c)
            GlobalAvgPool.forwardNHWC(output: &fl, input: toLayout(x, layout, n: n, c: c, plane: plane), batch: images, channels: lanes,
                                      plane: plane)
            #expect(fl == f, "\(layout)")
            var dxl = [Float](repeating: 2, count: x.count)
            GlobalAvgPool.backwardNHWC(gradInput: &dxl, gradOutput: g, batch: images, channels: lanes, plane: plane)
            #expect(dxl == toLayout(dx, layout, n: n, c: c, plane: plane), "\(layout)")
        }
    }

    /// Geometries whose channels nChw16c and nChw8c hold (the stem's input excepted): 3x3, a 1x1/2 downsample, a stem.
    static let blockedCases: [(Int, Int, Int, Int, Int, Int, Int, Int)] = [
        (2, 16, 9, 9, 32, 3, 1, 1), (2, 32, 8, 8, 16, 1, 2, 0), (2, 3, 17, 17, 16, 7, 2, 3), (2, 8, 9, 9, 24, 3, 1, 1), (2, 24, 8, 8, 8, 1, 2, 0),
        // A strided 1x1 convolution with fewer input channels than a block (the small ResNets' downsampling):
        // oneDNN's jit_1x1 weight gradient is wrong there, and convirt declines it.
        (1, 4, 10, 10, 8, 1, 2, 0), (2, 4, 10, 10, 8, 1, 2, 0),
    ]

    @Test("oneDNN's convolution on NHWC, nChw16c and nChw8c activations equals it on NCHW ones (forward, accumulating and overwriting backward), fp32 and bf16",
          arguments: 0..<(DNNLConvolutionTests.cases.count + blockedCases.count))
    func convolution(index: Int) throws {
        let g: Conv2dGeometry
        if index < DNNLConvolutionTests.cases.count {
            let (n, c, h, w, o, kh, kw, s, p, _) = DNNLConvolutionTests.cases[index]
            g = try Conv2dGeometry(batch: n, inChannels: c, height: h, width: w, outChannels: o, kernel: (kh, kw), stride: (s, s), padding: (p, p))
        } else {
            let (n, c, h, w, o, k, s, p) = Self.blockedCases[index - DNNLConvolutionTests.cases.count]
            g = try Conv2dGeometry(batch: n, inChannels: c, height: h, width: w, outChannels: o, kernel: k, stride: s, padding: p)
        }
        let (n, c, o) = (g.batch, g.inChannels, g.outChannels)
        let x = randomFloats(g.inputCount, seed: 1), wt = randomFloats(g.weightCount, seed: 2), dy = randomFloats(g.outputCount, seed: 4)
        let dx0 = randomFloats(x.count, seed: 5), dw0 = randomFloats(wt.count, seed: 6)
        let (inPlane, outPlane) = (g.height * g.width, g.outPlane)
        for precision in BF16.oneDNNRunsBF16 ? [Precision.fp32, .bf16] : [.fp32] {
            let plain = try ConvolutionPrimitives(geometry: g, precision: precision)
            var y = [Float](repeating: .nan, count: g.outputCount)
            try plain.forward(output: &y, input: x, weight: wt)
            var dx = dx0, dw = dw0
            try plain.backward(gradInput: &dx, gradWeight: &dw, gradBias: nil, gradOutput: dy, input: x, weight: wt)
            let scale = Double(y.map(abs).max()!), dxScale = Double(dx.map(abs).max()!), dwScale = Double(dw.map(abs).max()!)
            var dxOnly = [Float](repeating: 0, count: x.count), dwOnly = dw0
            try plain.backward(gradInput: &dxOnly, gradWeight: &dwOnly, gradBias: nil, gradOutput: dy, input: x, weight: wt)
            // Between a layer (both sides in the layout) and a stem (NCHW images in).
            for output in ActivationLayout.rowLayouts where output.holds(channels: o) {
                for input in [output, .nchw] where input.holds(channels: c) {
                    let what = "\(g) \(precision) \(input) -> \(output)"
                    let conv = try ConvolutionPrimitives(geometry: g, precision: precision, inputLayout: input, outputLayout: output)
                    var yl = [Float](repeating: .nan, count: g.outputCount)
                    let xl = toLayout(x, input, n: n, c: c, plane: inPlane), dyl = toLayout(dy, output, n: n, c: o, plane: outPlane)
                    try conv.forward(output: &yl, input: xl, weight: wt)
                    // fp32: the kernels for two layouts may sum in other orders; bf16: the same bf16 products.
                    #expect(Double(maxAbsDiff(yl, toLayout(y, output, n: n, c: o, plane: outPlane))) <= 1e-5 * scale, "forward \(what)")
                    var dxl = toLayout(dx0, input, n: n, c: c, plane: inPlane), dwl = dw0
                    try conv.backward(gradInput: &dxl, gradWeight: &dwl, gradBias: nil, gradOutput: dyl, input: xl, weight: wt)
                    #expect(Double(maxAbsDiff(dxl, toLayout(dx, input, n: n, c: c, plane: inPlane))) <= 1e-5 * dxScale, "input gradient \(what)")
                    #expect(Double(maxAbsDiff(dwl, dw)) <= 1e-5 * dwScale, "weight gradient \(what)")
                    var dxOver = [Float](repeating: .nan, count: x.count)
                    try conv.backward(gradInput: &dxOver, gradWeight: &dwl, gradBias: nil, gradOutput: dyl, input: xl, weight: wt,
                                      accumulateInput: false)
                    #expect(Double(maxAbsDiff(dxOver, toLayout(dxOnly, input, n: n, c: c, plane: inPlane))) <= 1e-5 * dxScale,
                            "overwritten input gradient \(what)")
                }
            }
        }
    }
}
