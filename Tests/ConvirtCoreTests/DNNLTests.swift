// The convolution on oneDNN against the plain reference (in Double; the reference is itself checked by
// finite differences in KernelGradientTests), with the accumulate-into-gradients contract of
// `Conv2d.backward`; bf16 within bf16 rounding where oneDNN implements it on this CPU. fp32 matrix
// products (oneDNN's matmul on AVX-512 CPUs) against the Double product.

import ConvirtCore
import ConvirtTestSupport
import Testing

@Suite("oneDNN convolution")
struct DNNLConvolutionTests {
    /// (batch, in, height, width, out, kernel h, kernel w, stride, padding, bias)
    static let cases: [(Int, Int, Int, Int, Int, Int, Int, Int, Int, Bool)] = [
        (2, 3, 17, 17, 8, 7, 7, 2, 3, false),   // a stem: 7x7/2 on 3 channels
        (3, 8, 9, 9, 16, 3, 3, 1, 1, true),     // 3x3 with bias
        (2, 16, 8, 8, 8, 1, 1, 1, 0, false),    // pointwise
        (2, 8, 8, 8, 8, 3, 3, 2, 1, false),     // 3x3/2 on an even size (asymmetric right padding)
        (1, 4, 10, 7, 5, 3, 1, 2, 0, true),     // rectangular kernel and image, stride 2, no padding
        (2, 16, 8, 8, 32, 1, 1, 2, 0, false),   // a downsample: 1x1/2
    ]

    @Test("forward and accumulating backward equal the reference", arguments: 0..<6)
    func againstReference(index: Int) throws {
        let (n, c, h, w, o, kh, kw, s, p, bias) = Self.cases[index]
        let g = try Conv2dGeometry(batch: n, inChannels: c, height: h, width: w, outChannels: o, kernel: (kh, kw), stride: (s, s), padding: (p, p))
        let x = randomFloats(g.inputShape.reduce(1, *), seed: 1), wt = randomFloats(g.weightShape.reduce(1, *), seed: 2)
        let b = randomFloats(o, seed: 3), dy = randomFloats(g.outputShape.reduce(1, *), seed: 4)
        let conv = try ConvolutionPrimitives(geometry: g, bias: bias)
        var y = [Float](repeating: .nan, count: g.outputShape.reduce(1, *))
        try x.withUnsafeBufferPointer { x in try wt.withUnsafeBufferPointer { w in try b.withUnsafeBufferPointer { b in
            try y.withUnsafeMutableBufferPointer { try conv.forward(output: $0.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!, bias: bias ? b.baseAddress! : nil) }
        } } }
        let d = { (v: [Float]) in v.map(Double.init) }
        #expect(relativeError(y, Reference.conv2dForward(d(x), d(wt), bias ? d(b) : nil, g)) < 1e-5, "forward \(g)")

        // Backward adds to what the gradients held.
        let dx0 = randomFloats(x.count, seed: 5), dw0 = randomFloats(wt.count, seed: 6), db0 = randomFloats(o, seed: 7)
        var dx = dx0, dw = dw0, db = db0
        try dy.withUnsafeBufferPointer { dy in try x.withUnsafeBufferPointer { x in try wt.withUnsafeBufferPointer { w in
            try dx.withUnsafeMutableBufferPointer { dx in try dw.withUnsafeMutableBufferPointer { dw in try db.withUnsafeMutableBufferPointer { db in
                try conv.backward(gradInput: dx.baseAddress!, gradWeight: dw.baseAddress!, gradBias: bias ? db.baseAddress! : nil,
                                  gradOutput: dy.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!)
            } } }
        } } }
        let (rdx, rdw, rdb) = Reference.conv2dBackward(d(dy), d(x), d(wt), g)
        #expect(relativeError(zip(dx, dx0).map { Double($0) - Double($1) }, rdx) < 1e-5, "input gradient \(g)")
        #expect(relativeError(zip(dw, dw0).map { Double($0) - Double($1) }, rdw) < 1e-5, "weight gradient \(g)")
        if bias { #expect(relativeError(zip(db, db0).map { Double($0) - Double($1) }, rdb) < 1e-5, "bias gradient \(g)") }
        else { #expect(db == db0, "no bias gradient asked, none written") }
        #expect(conv.implementations.contains("forward") && conv.implementations.contains("backward data"), "\(conv.implementations)")
    }

    @Test("without an input gradient (the stem) only the weight gradient is written")
    func noInputGradient() throws {
        let g = try Conv2dGeometry(batch: 1, inChannels: 3, height: 9, width: 9, outChannels: 4, kernel: 3, stride: 2, padding: 1)
        let conv = try ConvolutionPrimitives(geometry: g)
        let x = randomFloats(g.inputShape.reduce(1, *), seed: 1), wt = randomFloats(g.weightShape.reduce(1, *), seed: 2)
        let dy = randomFloats(g.outputShape.reduce(1, *), seed: 4)
        var dw = [Float](repeating: 0, count: wt.count)
        try dy.withUnsafeBufferPointer { dy in try x.withUnsafeBufferPointer { x in try wt.withUnsafeBufferPointer { w in
            try dw.withUnsafeMutableBufferPointer {
                try conv.backward(gradInput: nil, gradWeight: $0.baseAddress!, gradBias: nil, gradOutput: dy.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!)
            }
        } } }
        #expect(relativeError(dw, Reference.conv2dBackward(dy.map(Double.init), x.map(Double.init), wt.map(Double.init), g).1) < 1e-5)
        #expect(!conv.implementations.contains("backward data"))
    }

    /// World-size invariance rests on this: a rank's batch computes as its images would alone, whatever
    /// the batch. Each image's output and input gradient bitwise as at batch 1, and the weight (and bias)
    /// gradient the images' own gradients added in image order, bitwise: so ranks of any world size add
    /// the same per-image terms, and only the order of the all-reduce's sums differs.
    @Test("fp32: a batch computes as its images alone (output, input gradient), its weight gradient the images' summed in order",
          arguments: [(3, 20, 16, 7, 2, 3, false, ActivationLayout.nchw, ActivationLayout.blocked16), (16, 10, 16, 3, 1, 1, false, .blocked16, .blocked16),
                      (32, 8, 16, 1, 1, 0, false, .blocked16, .blocked16), (16, 8, 32, 1, 2, 0, false, .blocked16, .blocked16),
                      (8, 9, 8, 3, 2, 1, false, .nchw, .nchw), (8, 7, 16, 3, 1, 1, true, .nchw, .nchw), (4, 12, 16, 1, 1, 0, false, .nchw, .nchw),
                      (3, 20, 8, 7, 2, 3, false, .nchw, .blocked8), (16, 10, 16, 3, 1, 1, false, .blocked8, .blocked8),
                      (24, 8, 16, 1, 2, 0, false, .blocked8, .blocked8)])
    func batchAsImages(_ c: (Int, Int, Int, Int, Int, Int, Bool, ActivationLayout, ActivationLayout)) throws {
        let (channels, size, outChannels, kernel, stride, padding, bias, inputLayout, outputLayout) = c
        let batch = 5
        let g = try Conv2dGeometry(batch: batch, inChannels: channels, height: size, width: size, outChannels: outChannels, kernel: kernel,
                                   stride: stride, padding: padding)
        let one = try Conv2dGeometry(batch: 1, inChannels: channels, height: size, width: size, outChannels: outChannels, kernel: kernel,
                                     stride: stride, padding: padding)
        let inCount = one.inputShape.reduce(1, *), outCount = one.outputShape.reduce(1, *), weightCount = g.weightShape.reduce(1, *)
        let x = randomFloats(batch * inCount, seed: 11), wt = randomFloats(weightCount, seed: 12)
        let b = randomFloats(outChannels, seed: 13), dy = randomFloats(batch * outCount, seed: 14)
        /// Output, input gradient, weight and bias gradients (from zero) of images `range` as one batch.
        func run(_ geometry: Conv2dGeometry, _ range: Range<Int>) throws -> (y: [Float], dx: [Float], dw: [Float], db: [Float]) {
            let conv = try ConvolutionPrimitives(geometry: geometry, bias: bias, inputLayout: inputLayout, outputLayout: outputLayout)
            let xs = Array(x[range.lowerBound * inCount..<range.upperBound * inCount])
            let dys = Array(dy[range.lowerBound * outCount..<range.upperBound * outCount])
            var y = [Float](repeating: .nan, count: dys.count), dx = [Float](repeating: 0, count: xs.count)
            var dw = [Float](repeating: 0, count: weightCount), db = [Float](repeating: 0, count: outChannels)
            try xs.withUnsafeBufferPointer { x in try wt.withUnsafeBufferPointer { w in try b.withUnsafeBufferPointer { b in try dys.withUnsafeBufferPointer { dy in
                try y.withUnsafeMutableBufferPointer { try conv.forward(output: $0.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!, bias: bias ? b.baseAddress! : nil) }
                try dx.withUnsafeMutableBufferPointer { dx in try dw.withUnsafeMutableBufferPointer { dw in try db.withUnsafeMutableBufferPointer { db in
                    try conv.backward(gradInput: dx.baseAddress!, gradWeight: dw.baseAddress!, gradBias: bias ? db.baseAddress! : nil,
                                      gradOutput: dy.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!)
                } } }
            } } } }
            if geometry.batch > 1 { #expect(conv.implementations.contains("in pieces of 1 image"), "\(conv.implementations)") }
            return (y, dx, dw, db)
        }
        let whole = try run(g, 0..<batch)
        var dw = [Float](repeating: 0, count: weightCount), db = [Float](repeating: 0, count: outChannels)
        for n in 0..<batch {
            let alone = try run(one, n..<n + 1)
            #expect(Array(whole.y[n * outCount..<(n + 1) * outCount]) == alone.y, "\(g) image \(n): output")
            #expect(Array(whole.dx[n * inCount..<(n + 1) * inCount]) == alone.dx, "\(g) image \(n): input gradient")
            for i in 0..<weightCount { dw[i] += alone.dw[i] }
            for i in 0..<outChannels { db[i] += alone.db[i] }
        }
        #expect(whole.dw == dw, "\(g): weight gradient")
        #expect(whole.db == db, "\(g): bias gradient")
    }

    /// bf16 inputs with fp32 accumulation: within bf16 rounding (2^-8 relative per input) of fp32.
    /// oneDNN 2.6 implements bf16 convolutions from AVX-512 on; elsewhere creating one is a clear error.
    @Test("bf16: within bf16 rounding of fp32 where oneDNN implements it, a clear error where not")
    func bf16() throws {
        let g = try Conv2dGeometry(batch: 2, inChannels: 16, height: 8, width: 8, outChannels: 16, kernel: 3, stride: 1, padding: 1)
        let conv: ConvolutionPrimitives
        do {
            conv = try ConvolutionPrimitives(geometry: g, precision: .bf16)
        } catch let error as ConvirtError {
            #expect(!DNNL.isa.hasPrefix("avx512") && error.message.contains("bf16") && error.message.contains("unimplemented"), "\(error) on \(DNNL.isa)")
            return
        }
        let x = randomFloats(g.inputShape.reduce(1, *), seed: 1), wt = randomFloats(g.weightShape.reduce(1, *), seed: 2)
        var y = [Float](repeating: 0, count: g.outputShape.reduce(1, *))
        try x.withUnsafeBufferPointer { x in try wt.withUnsafeBufferPointer { w in
            try y.withUnsafeMutableBufferPointer { try conv.forward(output: $0.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!) }
        } }
        let error = relativeError(y, Reference.conv2dForward(x.map(Double.init), wt.map(Double.init), nil, g))
        #expect(error < 2e-2 && error > 1e-6, "bf16 forward error \(error)")
    }

    /// The output a ResNet's batch norm reads in bf16 (ConvBNUnit): each the float output's bf16 bits.
    @Test("bf16 with a bf16 output (NHWC, nChw16c, nChw8c): the float output's bf16 bits, rounded to nearest even", arguments: 0..<6)
    func bf16Output(index: Int) throws {
        guard BF16.oneDNNRunsBF16 else { return }  // no bf16 kernels at all: `bf16` above checks the error
        let (n, c, h, w, o, kh, kw, s, p, _) = Self.cases[index]
        let g = try Conv2dGeometry(batch: n, inChannels: c, height: h, width: w, outChannels: o, kernel: (kh, kw), stride: (s, s), padding: (p, p))
        let x = randomFloats(g.inputCount, seed: 21), wt = randomFloats(g.weightCount, seed: 22)
        for layout in ActivationLayout.rowLayouts where layout.holds(channels: c) && layout.holds(channels: o) {
            let floats = try ConvolutionPrimitives(geometry: g, precision: .bf16, inputLayout: layout, outputLayout: layout)
            let bits = try ConvolutionPrimitives(geometry: g, precision: .bf16, inputLayout: layout, outputLayout: layout, bf16Output: true)
            let input = toLayout(x, layout, n: n, c: c, plane: h * w)
            var y = [Float](repeating: .nan, count: g.outputCount), y16 = [UInt16](repeating: 1, count: g.outputCount)
            try floats.forward(output: &y, input: input, weight: wt)
            try bits.forward(output: nil, outputBF16: &y16, input: input, weight: wt)
            #expect(y16 == y.map(BF16.bits), "\(g) \(layout)")
            #expect(y.contains { BF16.round($0) != $0 }, "the floats are not bf16 values already")
        }
    }
}

@Suite("fp32 matrix products (oneDNN's matmul where FP32Matmul.onDNNL, else sgemm)")
struct FP32MatmulTests {
    /// Odd sizes (no multiple of oneDNN's blocks), many rows.
    static let (m, n, k) = (67, 160, 200)

    @Test("gemm in fp32 equals the Double product for every transposition, alpha, beta, leading dimension and a bias",
          arguments: [(false, false), (true, false), (false, true), (true, true)])
    func product(transposes: (Bool, Bool)) {
        let (ta, tb) = transposes
        let (m, n, k) = (Self.m, Self.n, Self.k)
        let (aRows, aColumns) = ta ? (k, m) : (m, k), (bRows, bColumns) = tb ? (n, k) : (k, n)
        let lda = aColumns + 3, ldb = bColumns + 5, ldc = n + 2
        let a = randomFloats(aRows * lda, seed: 1), b = randomFloats(bRows * ldb, seed: 2), c0 = randomFloats(m * ldc, seed: 3)
        let bias = randomFloats(n, seed: 4)
        for (alpha, beta, withBias) in [(Float(0.5), Float(1), false), (1, 0, true), (2, 0, false)] {
            var c = c0
            bias.withUnsafeBufferPointer { bias in a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in
                c.withUnsafeMutableBufferPointer { c in
                    gemm(.fp32, Product(m: m, n: n, k: k, transposeA: ta, transposeB: tb, alpha: alpha, beta: beta),
                         a: Matrix(a.baseAddress!, ld: lda), b: Matrix(b.baseAddress!, ld: ldb), c: MutableMatrix(c.baseAddress!, ld: ldc),
                         bias: withBias ? bias.baseAddress! : nil)
                }
            } } }
            var expected = c0.map(Double.init)
            for i in 0..<m { for j in 0..<n {
                var s = 0.0
                for p in 0..<k { s += Double(a[ta ? p * lda + i : i * lda + p]) * Double(b[tb ? j * ldb + p : p * ldb + j]) }
                expected[i * ldc + j] = Double(alpha) * s + Double(beta) * Double(c0[i * ldc + j]) + (withBias ? Double(bias[j]) : 0)
            } }
            #expect(relativeError(c, expected) < 1e-5, "fp32 gemm \(ta) \(tb) alpha \(alpha) beta \(beta) bias \(withBias)")
            for i in 0..<m { for j in n..<ldc { #expect(c[i * ldc + j] == c0[i * ldc + j], "padding written") } }
        }
    }

    @Test("each row of a product is computed as in a product of fewer rows (a rank's share of the batch)")
    func rowsAsAlone() {
        let (m, n, k) = (Self.m, Self.n, Self.k)
        let rows = 2 * m
        let a = randomFloats(rows * k, seed: 5), w = randomFloats(n * k, seed: 6), bias = randomFloats(n, seed: 7)
        func product(_ range: Range<Int>) -> [Float] {
            var c = [Float](repeating: .nan, count: range.count * n)
            Array(a[range.lowerBound * k..<range.upperBound * k]).withUnsafeBufferPointer { x in
                w.withUnsafeBufferPointer { w in c.withUnsafeMutableBufferPointer { c in bias.withUnsafeBufferPointer { bias in
                    gemm(.fp32, Product(m: range.count, n: n, k: k, transposeB: true),
                         a: Matrix(x.baseAddress!, ld: k), b: Matrix(w.baseAddress!, ld: k), c: MutableMatrix(c.baseAddress!, ld: n),
                         bias: bias.baseAddress!)
                } } }
            }
            return c
        }
        let whole = product(0..<rows), halves = product(0..<m) + product(m..<rows)
        if FP32Matmul.onDNNL {
            #expect(whole == halves, "oneDNN: rows of the whole product differ from those of its halves")
        } else {
            #expect(relativeError(whole, halves.map(Double.init)) < 1e-6)
        }
    }
}

@Suite("OpenBLAS core")
struct BLASCoreTests {
    static let avx512: Set<String> = ["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "amx_bf16"]

    @Test("the core is chosen from the CPU flags when OpenBLAS chose worse, and kept when it chose well")
    func preferredCore() {
        // Sapphire Rapids: OpenBLAS 0.3.21 chose Cooperlake (or Prescott); SkylakeX is 3.4x faster there.
        #expect(BLASCore.preferred(flags: Self.avx512, vendor: "GenuineIntel", picked: "Cooperlake") == "SkylakeX")
        #expect(BLASCore.preferred(flags: Self.avx512, vendor: "GenuineIntel", picked: "Prescott") == "SkylakeX")
        #expect(BLASCore.preferred(flags: Self.avx512, vendor: "GenuineIntel", picked: "SkylakeX") == nil)
        // AVX2 machines: Haswell kernels (Zen on AMD), unless OpenBLAS already uses them.
        #expect(BLASCore.preferred(flags: ["avx2", "fma"], vendor: "AuthenticAMD", picked: "Zen") == nil)
        #expect(BLASCore.preferred(flags: ["avx2", "fma"], vendor: "GenuineIntel", picked: "Prescott") == "Haswell")
        #expect(BLASCore.preferred(flags: ["avx2", "fma"], vendor: "AuthenticAMD", picked: "Barcelona") == "Zen")
        // Older CPUs keep OpenBLAS's choice.
        #expect(BLASCore.preferred(flags: ["sse4_2"], vendor: "GenuineIntel", picked: "Nehalem") == nil)
    }

    @Test("this process runs on a core at least as good as the CPU flags call for")
    func currentCore() {
        #expect(!BLASCore.current.isEmpty)
    }
}
