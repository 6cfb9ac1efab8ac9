// Every kernel against its Double reference: forward agreement and finite-difference gradients for
// every input and parameter, on random shapes that include odd sizes.

import ConvirtCore
import ConvirtTestSupport
import Testing

private func t(_ shape: [Int], _ values: [Float]) -> Tensor<Float> { try! Tensor(shape: shape, values) }

@Suite("Kernels against references and finite differences")
struct KernelGradientTests {
    static let convCases: [(n: Int, c: Int, h: Int, w: Int, o: Int, k: Int, s: Int, p: Int, bias: Bool)] = [
        (2, 3, 7, 6, 4, 3, 1, 1, true),   // 3x3, same padding
        (1, 2, 9, 7, 3, 3, 2, 1, false),  // strided, odd sizes
        (2, 3, 11, 10, 2, 7, 2, 3, true), // the stem's 7x7/2 pad 3
        (2, 5, 4, 3, 3, 1, 1, 0, false),  // pointwise: plain sgemm
        (1, 4, 7, 5, 3, 1, 2, 0, true),   // strided 1x1 (downsample)
        (1, 2, 5, 6, 2, 2, 1, 0, false),  // even kernel, no padding
    ]

    @Test("conv2d", arguments: 0..<6)
    func conv2d(index: Int) throws {
        let c = Self.convCases[index]
        let g = try Conv2dGeometry(batch: c.n, inChannels: c.c, height: c.h, width: c.w, outChannels: c.o, kernel: c.k, stride: c.s, padding: c.p)
        let seed = UInt64(100 + index)
        var inputs = [randomFloats(g.inputShape.reduce(1, *), seed: seed), randomFloats(g.weightShape.reduce(1, *), seed: seed + 1, scale: 0.5)]
        if c.bias { inputs.append(randomFloats(c.o, seed: seed + 2)) }
        try KernelCheck(
            name: g.description, inputs: inputs, differentiable: inputs.map { _ in true },
            reference: { Reference.conv2dForward($0[0], $0[1], c.bias ? $0[2] : nil, g) },
            fast: { try F.conv2d(t(g.inputShape, $0[0]), weight: t(g.weightShape, $0[1]), bias: c.bias ? t([c.o], $0[2]) : nil, stride: c.s, padding: c.p).scalars },
            fastBackward: { xs, w in
                let r = try F.conv2dBackward(t(g.outputShape, w), input: t(g.inputShape, xs[0]), weight: t(g.weightShape, xs[1]), stride: c.s, padding: c.p)
                return [r.input.scalars, r.weight.scalars] + (c.bias ? [r.bias.scalars] : [])
            }
        ).run()
        // The plain reference backward agrees with finite differences too.
        let x = inputs[0].map(Double.init), wt = inputs[1].map(Double.init)
        let dy = randomFloats(g.outputShape.reduce(1, *), seed: seed + 3).map(Double.init)
        let (dx, dw, _) = Reference.conv2dBackward(dy, x, wt, g)
        let ndx = numericalGradient(x) { dot(Reference.conv2dForward($0, wt, nil, g), dy) }
        let ndw = numericalGradient(wt) { dot(Reference.conv2dForward(x, $0, nil, g), dy) }
        #expect(relativeError(dx, ndx) < 1e-7)
        #expect(relativeError(dw, ndw) < 1e-7)
    }

    @Test("batch norm, training", arguments: [(3, 4, 5), (4, 3, 1), (1, 5, 7)])
    func batchNormTraining(n: Int, c: Int, p: Int) throws {
        let shape = [n, c, p]
        let x = randomFloats(n * c * p, seed: 7, scale: 2).enumerated().map { $0.element + Float($0.offset % c) }
        try KernelCheck(
            name: "batch norm \(shape)", inputs: [x, randomFloats(c, seed: 8), randomFloats(c, seed: 9)], differentiable: [true, true, true],
            reference: { Reference.batchNormForward($0[0], $0[1], $0[2], n: n, c: c, p: p, eps: 1e-5).y },
            fast: {
                var rm = Tensor<Float>(shape: [c]), rv = Tensor<Float>(shape: [c], repeating: 1)
                return try F.batchNormTraining(t(shape, $0[0]), gamma: t([c], $0[1]), beta: t([c], $0[2]), runningMean: &rm, runningVar: &rv).output.scalars
            },
            fastBackward: { xs, w in
                var rm = Tensor<Float>(shape: [c]), rv = Tensor<Float>(shape: [c], repeating: 1)
                let forward = try F.batchNormTraining(t(shape, xs[0]), gamma: t([c], xs[1]), beta: t([c], xs[2]), runningMean: &rm, runningVar: &rv)
                let r = try F.batchNormTrainingBackward(t(shape, w), input: t(shape, xs[0]), gamma: t([c], xs[1]), state: forward.state)
                return [r.input.scalars, r.gamma.scalars, r.beta.scalars]
            },
            gradientTolerance: 2e-4
        ).run()
        let xd = x.map(Double.init), gd = randomFloats(c, seed: 8).map(Double.init)
        let dy = randomFloats(n * c * p, seed: 10).map(Double.init)
        let (dx, dgamma, _) = Reference.batchNormBackward(dy, xd, gd, n: n, c: c, p: p, eps: 1e-5)
        let beta = [Double](repeating: 0, count: c)
        #expect(relativeError(dx, numericalGradient(xd) { dot(Reference.batchNormForward($0, gd, beta, n: n, c: c, p: p, eps: 1e-5).y, dy) }) < 1e-6)
        #expect(relativeError(dgamma, numericalGradient(gd) { dot(Reference.batchNormForward(xd, $0, beta, n: n, c: c, p: p, eps: 1e-5).y, dy) }) < 1e-6)
    }

    @Test("batch norm, evaluation")
    func batchNormInference() throws {
        let (n, c, p) = (2, 3, 5)
        let mean = randomFloats(c, seed: 11), variance = randomFloats(c, seed: 12).map { $0 * $0 + 0.5 }
        let md = mean.map(Double.init), vd = variance.map(Double.init)
        try KernelCheck(
            name: "batch norm eval", inputs: [randomFloats(n * c * p, seed: 13), randomFloats(c, seed: 14), randomFloats(c, seed: 15)],
            differentiable: [true, true, true],
            reference: { Reference.batchNormInference($0[0], $0[1], $0[2], md, vd, n: n, c: c, p: p, eps: 1e-5) },
            fast: { try F.batchNormInference(t([n, c, p], $0[0]), gamma: t([c], $0[1]), beta: t([c], $0[2]), runningMean: t([c], mean), runningVar: t([c], variance)).scalars },
            fastBackward: { xs, w in
                let r = try F.batchNormInferenceBackward(t([n, c, p], w), input: t([n, c, p], xs[0]), gamma: t([c], xs[1]), runningMean: t([c], mean), runningVar: t([c], variance))
                return [r.input.scalars, r.gamma.scalars, r.beta.scalars]
            }
        ).run()
    }

    @Test("ReLU and GELU")
    func pointwise() throws {
        let x = randomFloats(37, seed: 20, scale: 4)
        try KernelCheck(name: "relu", inputs: [x], differentiable: [true], reference: { Reference.relu($0[0]) },
                        fast: { F.relu(t([37], $0[0])).scalars },
                        fastBackward: { xs, w in [try F.reluBackward(t([37], w), output: F.relu(t([37], xs[0]))).scalars] }).run()
        try KernelCheck(name: "gelu", inputs: [x], differentiable: [true], reference: { Reference.gelu($0[0]) },
                        fast: { F.gelu(t([37], $0[0])).scalars },
                        fastBackward: { xs, w in [try F.geluBackward(t([37], w), input: t([37], xs[0])).scalars] }).run()
        // The closed-form derivative of the reference agrees with finite differences.
        let xd = x.map(Double.init)
        let numeric = numericalGradient(xd) { Reference.gelu($0).reduce(0, +) }
        #expect(relativeError(Reference.geluDerivative(xd), numeric) < 1e-7)
    }

    @Test("residual add")
    func residual() throws {
        try KernelCheck(name: "add", inputs: [randomFloats(11, seed: 21), randomFloats(11, seed: 22)], differentiable: [true, true],
                        reference: { zip($0[0], $0[1]).map(+) },
                        fast: { try F.add(t([11], $0[0]), t([11], $0[1])).scalars },
                        fastBackward: { _, w in
                            var da = [Float](repeating: 0, count: 11), db = da
                            Residual.backward(gradA: &da, gradB: &db, gradOutput: w, count: 11)
                            return [da, db]
                        }).run()
    }

    @Test("max pool 3x3/2 pad 1", arguments: [(2, 3, 9, 8), (1, 2, 4, 5), (1, 1, 33, 31)])
    func maxPool(n: Int, c: Int, h: Int, w: Int) throws {
        let shape = [n, c, h, w]
        try KernelCheck(name: "max pool \(shape)", inputs: [randomFloats(n * c * h * w, seed: 30)], differentiable: [true],
                        reference: { Reference.maxPool2d($0[0], planes: n * c, h: h, w: w, kernel: 3, stride: 2, padding: 1) },
                        fast: { try F.maxPool2d(t(shape, $0[0])).output.scalars },
                        fastBackward: { xs, g in
                            let f = try F.maxPool2d(t(shape, xs[0]))
                            return [try F.maxPool2dBackward(t(f.output.shape, g), indices: f.indices, inputShape: shape).scalars]
                        }).run()
    }

    @Test("global average pool")
    func averagePool() throws {
        let shape = [2, 3, 5, 7]
        try KernelCheck(name: "avg pool", inputs: [randomFloats(210, seed: 31)], differentiable: [true],
                        reference: { Reference.globalAvgPool($0[0], rows: 6, plane: 35) },
                        fast: { try F.globalAvgPool(t(shape, $0[0])).scalars },
                        fastBackward: { _, g in [try F.globalAvgPoolBackward(t([2, 3], g), inputShape: shape).scalars] }).run()
    }

    @Test("masked max pool over tokens")
    func maskedMax() throws {
        let (b, tk, c) = (3, 5, 7)
        let mask: [Int32] = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
        let maskTensor = try Tensor<Int32>(shape: [b, tk], mask)
        try KernelCheck(name: "masked max", inputs: [randomFloats(b * tk * c, seed: 32)], differentiable: [true],
                        reference: { Reference.maskedMaxPool($0[0], mask: mask, batch: b, tokens: tk, channels: c) },
                        fast: { try F.maskedMaxPool(t([b, tk, c], $0[0]), mask: maskTensor).output.scalars },
                        fastBackward: { xs, g in
                            let f = try F.maskedMaxPool(t([b, tk, c], xs[0]), mask: maskTensor)
                            return [try F.maskedMaxPoolBackward(t([b, c], g), indices: f.indices, tokens: tk).scalars]
                        }).run()
    }

    @Test("linear", arguments: [(4, 6, 5), (1, 3, 1), (7, 13, 9)])
    func linear(rows: Int, inF: Int, outF: Int) throws {
        try KernelCheck(name: "linear \(rows)x\(inF)->\(outF)",
                        inputs: [randomFloats(rows * inF, seed: 40), randomFloats(outF * inF, seed: 41), randomFloats(outF, seed: 42)],
                        differentiable: [true, true, true],
                        reference: { Reference.linear($0[0], $0[1], $0[2], rows: rows, inFeatures: inF, outFeatures: outF) },
                        fast: { try F.linear(t([rows, inF], $0[0]), weight: t([outF, inF], $0[1]), bias: t([outF], $0[2])).scalars },
                        fastBackward: { xs, g in
                            let r = try F.linearBackward(t([rows, outF], g), input: t([rows, inF], xs[0]), weight: t([outF, inF], xs[1]))
                            return [r.input.scalars, r.weight.scalars, r.bias.scalars]
                        }).run()
    }

    @Test("layer norm", arguments: [(3, 7), (1, 1), (5, 33)])
    func layerNorm(rows: Int, features: Int) throws {
        let eps: Float = features == 1 ? 1e-5 : 1e-12
        try KernelCheck(name: "layer norm \(rows)x\(features)",
                        inputs: [randomFloats(rows * features, seed: 50, scale: 3), randomFloats(features, seed: 51), randomFloats(features, seed: 52)],
                        differentiable: [true, true, true],
                        reference: { Reference.layerNorm($0[0], $0[1], $0[2], rows: rows, features: features, eps: Double(eps)) },
                        fast: { try F.layerNorm(t([rows, features], $0[0]), gamma: t([features], $0[1]), beta: t([features], $0[2]), eps: eps).output.scalars },
                        fastBackward: { xs, g in
                            let f = try F.layerNorm(t([rows, features], xs[0]), gamma: t([features], xs[1]), beta: t([features], xs[2]), eps: eps)
                            let r = try F.layerNormBackward(t([rows, features], g), input: t([rows, features], xs[0]), gamma: t([features], xs[1]), state: f.state)
                            return [r.input.scalars, r.gamma.scalars, r.beta.scalars]
                        }, gradientTolerance: 2e-4).run()
    }

    @Test("embedding lookup and scatter-add")
    func embedding() throws {
        let ids: [Int32] = [3, 0, 3, 9, 1, 3]
        let idTensor = try Tensor<Int32>(shape: [2, 3], ids)
        try KernelCheck(name: "embedding", inputs: [randomFloats(10 * 4, seed: 60)], differentiable: [true],
                        reference: { Reference.embedding($0[0], ids: ids, features: 4) },
                        fast: { try F.embedding(idTensor, table: t([10, 4], $0[0])).scalars },
                        fastBackward: { _, g in [try F.embeddingBackward(t([2, 3, 4], g), ids: idTensor, tableShape: [10, 4]).scalars] }).run()
    }

    @Test("softmax, L2 normalisation, cross-entropy")
    func rowwise() throws {
        let (r, c) = (5, 9)
        let x = randomFloats(r * c, seed: 70, scale: 3)
        try KernelCheck(name: "softmax", inputs: [x], differentiable: [true],
                        reference: { Reference.softmax($0[0], rows: r, columns: c) },
                        fast: { try F.softmax(t([r, c], $0[0])).scalars },
                        fastBackward: { xs, g in [try F.softmaxBackward(t([r, c], g), output: F.softmax(t([r, c], xs[0]))).scalars] }).run()
        try KernelCheck(name: "l2 normalize", inputs: [x], differentiable: [true],
                        reference: { Reference.l2Normalize($0[0], rows: r, features: c) },
                        fast: { try F.l2Normalize(t([r, c], $0[0])).output.scalars },
                        fastBackward: { xs, g in
                            let f = try F.l2Normalize(t([r, c], xs[0]))
                            return [try F.l2NormalizeBackward(t([r, c], g), output: f.output, norms: f.norms).scalars]
                        }).run()
        let targets: [Int32] = [0, 8, 3, 3, 5]
        let targetTensor = try Tensor<Int32>(shape: [r], targets)
        try KernelCheck(name: "cross-entropy", inputs: [x], differentiable: [true],
                        reference: { Reference.crossEntropy($0[0], targets: targets, rows: r, classes: c) },
                        fast: { try F.crossEntropy(t([r, c], $0[0]), targets: targetTensor).losses.scalars },
                        fastBackward: { xs, g in
                            let f = try F.crossEntropy(t([r, c], xs[0]), targets: targetTensor)
                            return [try F.crossEntropyBackward(t([r], g), probabilities: f.probabilities, targets: targetTensor).scalars]
                        }).run()
        // Sigmoid heads: soft and hard targets, logits far into both tails included.
        let soft = randomFloats(r * c, seed: 71, scale: 0.5).map { $0 + 0.5 }
        let labels = (0..<(r * c)).map { Float($0 % 3 == 0 ? 1 : 0) }
        for (name, y) in [("soft", soft), ("hard", labels)] {
            let yTensor = t([r, c], y)
            try KernelCheck(name: "binary cross-entropy (\(name) targets)", inputs: [x], differentiable: [true],
                            reference: { Reference.binaryCrossEntropy($0[0], targets: y.map { Double($0) }) },
                            fast: { try F.binaryCrossEntropy(t([r, c], $0[0]), targets: yTensor).losses.scalars },
                            fastBackward: { xs, g in
                                let f = try F.binaryCrossEntropy(t([r, c], xs[0]), targets: yTensor)
                                return [try F.binaryCrossEntropyBackward(t([r, c], g), probabilities: f.probabilities, targets: yTensor).scalars]
                            }).run()
        }
        let extreme = try F.binaryCrossEntropy(Tensor(shape: [4], [-120, -30, 30, 120]), targets: Tensor(shape: [4], [1, 0, 1, 0]))
        #expect(extreme.losses.scalars.map { ($0 * 1000).rounded() / 1000 } == [120, 0, 0, 120], "stable in the tails")
    }

    @Test("multi-head attention with a padding mask", arguments: [(2, 5, 2, 4), (1, 7, 3, 5), (3, 4, 1, 3)])
    func attention(b: Int, tokens: Int, heads: Int, head: Int) throws {
        let width = heads * head, shape = [b, tokens, width]
        let mask: [Int32] = (0..<(b * tokens)).map { i in (i % tokens) < tokens - (i / tokens) ? 1 : 0 }  // row k pads k tokens
        let maskTensor = try Tensor<Int32>(shape: [b, tokens], mask)
        let g = try AttentionGeometry(batch: b, tokens: tokens, heads: heads, headSize: head)
        let n = b * tokens * width
        try KernelCheck(name: "attention \(shape) h\(heads)",
                        inputs: [randomFloats(n, seed: 80), randomFloats(n, seed: 81), randomFloats(n, seed: 82)], differentiable: [true, true, true],
                        reference: { Reference.attention($0[0], $0[1], $0[2], mask: mask, g) },
                        fast: { try F.attention(q: t(shape, $0[0]), k: t(shape, $0[1]), v: t(shape, $0[2]), mask: maskTensor, heads: heads).output.scalars },
                        fastBackward: { xs, w in
                            let (q, k, v) = (t(shape, xs[0]), t(shape, xs[1]), t(shape, xs[2]))
                            let f = try F.attention(q: q, k: k, v: v, mask: maskTensor, heads: heads)
                            let r = try F.attentionBackward(t(shape, w), probabilities: f.probabilities, q: q, k: k, v: v, heads: heads)
                            return [r.q.scalars, r.k.scalars, r.v.scalars]
                        }).run()
    }

    @Test("dropout: mask from the counter-based stream, scaled by 1/(1-p)")
    func dropout() throws {
        let count = 4099, p: Float = 0.3
        let x = Tensor<Float>(shape: [count], repeating: 1)
        let stream = RandomStream(seed: 5, 1, 2, 3)
        let y = try F.dropout(x, probability: p, stream: stream)
        let kept = y.scalars.filter { $0 != 0 }
        #expect(kept.allSatisfy { abs($0 - 1 / (1 - p)) < 1e-6 })
        let keptFraction = Double(kept.count) / Double(count)
        #expect(abs(keptFraction - 0.7) < 0.03, "kept \(keptFraction)")
        #expect(try F.dropout(x, probability: p, stream: stream) == y, "same stream, same mask")
        #expect(try F.dropout(x, probability: p, stream: RandomStream(seed: 5, 1, 2, 4)) != y, "another key, another mask")
        // Backward regenerates the same mask: d/dx sum(y * g) = g * mask / (1 - p) = g * y for x = 1.
        let g = tensor([count], seed: 90)
        let dx = try F.dropoutBackward(g, probability: p, stream: stream)
        #expect(relativeError(dx.scalars, zip(g.scalars, y.scalars).map { Double($0 * $1) }) < 1e-6)
        #expect(try F.dropout(x, probability: 0, stream: stream) == x)
    }
}

@Suite("Kernels at ResNet-50 shapes against the Double reference")
struct LargeShapeTests {
    @Test("conv2d forward and backward", arguments: [
        (1, 1024, 14, 2048, 1, 2, 0),  // layer4.0.downsample
        (2, 1024, 14, 256, 1, 1, 0),   // layer3 conv1 (pointwise)
        (1, 512, 14, 512, 3, 2, 1),    // layer4.0.conv2
        (1, 64, 56, 64, 3, 1, 1),      // layer1 3x3
        (2, 3, 67, 8, 7, 2, 3),        // the stem, odd size: vectorised stride-2 im2col and its edges
    ])
    func conv(n: Int, c: Int, size: Int, o: Int, k: Int, s: Int, p: Int) throws {
        let g = try Conv2dGeometry(batch: n, inChannels: c, height: size, width: size, outChannels: o, kernel: k, stride: s, padding: p)
        let x = tensor(g.inputShape, seed: 1), w = tensor(g.weightShape, seed: 2, scale: 0.05), dy = tensor(g.outputShape, seed: 3)
        let y = try F.conv2d(x, weight: w, stride: s, padding: p)
        let grads = try F.conv2dBackward(dy, input: x, weight: w, stride: s, padding: p)
        let xd = x.scalars.map(Double.init), wd = w.scalars.map(Double.init), dyd = dy.scalars.map(Double.init)
        #expect(relativeError(y.scalars, Reference.conv2dForward(xd, wd, nil, g)) < 1e-5)
        let (dx, dw, _) = Reference.conv2dBackward(dyd, xd, wd, g)
        #expect(relativeError(grads.input.scalars, dx) < 1e-5, "dx")
        #expect(relativeError(grads.weight.scalars, dw) < 1e-5, "dw")
    }
}
