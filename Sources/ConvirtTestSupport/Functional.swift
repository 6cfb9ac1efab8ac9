// The kernels on `Tensor`s, with every shape checked at the boundary (a clear `ConvirtError`, never a
// trap inside a loop). Outputs and gradients are freshly allocated: this is the convenient API for
// tools, tests and one-off computations; models call the pointer kernels on preallocated buffers.

import ConvirtCore

/// Checked tensor-level forms of the kernels, named after torch.nn.functional.
public enum F {
    // MARK: convolution

    public static func conv2dGeometry(_ input: Tensor<Float>, _ weight: Tensor<Float>, stride: Int, padding: Int) throws -> Conv2dGeometry {
        try input.expectRank(4, "conv2d input", axes: "[N, C, H, W]")
        try weight.expectRank(4, "conv2d weight", axes: "[O, C, KH, KW]")
        try require(weight.shape[1] == input.shape[1], "conv2d",
                    "input has \(input.shape[1]) channels but the weight \(describe(shape: weight.shape)) expects \(weight.shape[1])")
        return try Conv2dGeometry(batch: input.shape[0], inChannels: input.shape[1], height: input.shape[2], width: input.shape[3],
                                  outChannels: weight.shape[0], kernel: (weight.shape[2], weight.shape[3]),
                                  stride: (stride, stride), padding: (padding, padding))
    }

    public static func conv2d(_ input: Tensor<Float>, weight: Tensor<Float>, bias: Tensor<Float>? = nil,
                              stride: Int = 1, padding: Int = 0) throws -> Tensor<Float> {
        let g = try conv2dGeometry(input, weight, stride: stride, padding: padding)
        if let bias { try bias.expectShape([g.outChannels], "conv2d bias") }
        var output = Tensor<Float>(shape: g.outputShape)
        var workspace = [Float](repeating: 0, count: g.workspaceCount)
        input.withUnsafeBufferPointer { x in weight.withUnsafeBufferPointer { w in output.withUnsafeMutableBufferPointer { y in
            workspace.withUnsafeMutableBufferPointer { ws in
                if let bias {
                    bias.withUnsafeBufferPointer { b in
                        Conv2d.forward(output: y.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!, bias: b.baseAddress!, geometry: g, workspace: ws.baseAddress)
                    }
                } else {
                    Conv2d.forward(output: y.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!, bias: nil, geometry: g, workspace: ws.baseAddress)
                }
            }
        } } }
        return output
    }

    public static func conv2dBackward(_ gradOutput: Tensor<Float>, input: Tensor<Float>, weight: Tensor<Float>,
                                      stride: Int = 1, padding: Int = 0) throws -> (input: Tensor<Float>, weight: Tensor<Float>, bias: Tensor<Float>) {
        let g = try conv2dGeometry(input, weight, stride: stride, padding: padding)
        try gradOutput.expectShape(g.outputShape, "conv2d output gradient")
        var dx = Tensor<Float>(shape: input.shape), dw = Tensor<Float>(shape: weight.shape), db = Tensor<Float>(shape: [g.outChannels])
        var workspace = [Float](repeating: 0, count: g.workspaceCount)
        gradOutput.withUnsafeBufferPointer { dy in input.withUnsafeBufferPointer { x in weight.withUnsafeBufferPointer { w in
            dx.withUnsafeMutableBufferPointer { dx in dw.withUnsafeMutableBufferPointer { dw in db.withUnsafeMutableBufferPointer { db in
                workspace.withUnsafeMutableBufferPointer { ws in
                    Conv2d.backward(gradInput: dx.baseAddress!, gradWeight: dw.baseAddress!, gradBias: db.baseAddress!,
                                    gradOutput: dy.baseAddress!, input: x.baseAddress!, weight: w.baseAddress!, geometry: g, workspace: ws.baseAddress)
                }
            } } }
        } } }
        return (dx, dw, db)
    }

    // MARK: batch norm

    /// Saved batch statistics of a training-mode batch norm.
    public struct BatchNormState {
        public var mean: Tensor<Float>
        public var invStd: Tensor<Float>
        public var count: Int
    }

    private static func batchNormSizes(_ input: Tensor<Float>, _ gamma: Tensor<Float>, _ beta: Tensor<Float>) throws -> (Int, Int, Int) {
        try require(input.rank >= 2, "batch norm input", "expected [N, C, ...], got \(describe(shape: input.shape))")
        let c = input.shape[1]
        try gamma.expectShape([c], "batch norm weight")
        try beta.expectShape([c], "batch norm bias")
        return (input.shape[0], c, input.shape.dropFirst(2).reduce(1, *))
    }

    /// Training mode; updates runningMean and runningVar in place. `reducer` sums statistics over ranks.
    public static func batchNormTraining(_ input: Tensor<Float>, gamma: Tensor<Float>, beta: Tensor<Float>,
                                         runningMean: inout Tensor<Float>, runningVar: inout Tensor<Float>,
                                         eps: Float = 1e-5, momentum: Float = 0.1,
                                         reducer: StatisticsReducer? = nil) throws -> (output: Tensor<Float>, state: BatchNormState) {
        let (n, c, p) = try batchNormSizes(input, gamma, beta)
        try runningMean.expectShape([c], "batch norm running_mean")
        try runningVar.expectShape([c], "batch norm running_var")
        try require(n * p > 1 || reducer != nil, "batch norm", "training mode needs more than one value per channel, got input \(describe(shape: input.shape))")
        var output = Tensor<Float>(shape: input.shape)
        var mean = Tensor<Float>(shape: [c]), invStd = Tensor<Float>(shape: [c])
        var stats = [Double](repeating: 0, count: 2 * c + 1)
        var count = 0
        try input.withUnsafeBufferPointer { x in try gamma.withUnsafeBufferPointer { g in try beta.withUnsafeBufferPointer { b in
            try output.withUnsafeMutableBufferPointer { y in try runningMean.withUnsafeMutableBufferPointer { rm in try runningVar.withUnsafeMutableBufferPointer { rv in
                try mean.withUnsafeMutableBufferPointer { m in try invStd.withUnsafeMutableBufferPointer { s in try stats.withUnsafeMutableBufferPointer { st in
                    var saved = BatchNorm2d.Saved(mean: m.baseAddress!, invStd: s.baseAddress!, statistics: st)
                    try BatchNorm2d.forwardTraining(BatchNorm2d.Shape(batch: n, channels: c, plane: p, eps: eps, momentum: momentum),
                                                    output: .floats(y.baseAddress!), input: .fp32(x.baseAddress!),
                                                    parameters: BatchNorm2d.Parameters(gamma: g.baseAddress!, beta: b.baseAddress!,
                                                                                       runningMean: rm.baseAddress!, runningVar: rv.baseAddress!),
                                                    saved: &saved, reducer: reducer)
                    count = saved.globalCount
                } } }
            } } }
        } } }
        return (output, BatchNormState(mean: mean, invStd: invStd, count: count))
    }

    public static func batchNormTrainingBackward(_ gradOutput: Tensor<Float>, input: Tensor<Float>, gamma: Tensor<Float>,
                                                 state: BatchNormState, reducer: StatisticsReducer? = nil) throws
        -> (input: Tensor<Float>, gamma: Tensor<Float>, beta: Tensor<Float>) {
        let (n, c, p) = try batchNormSizes(input, gamma, gamma)
        try gradOutput.expectShape(input.shape, "batch norm output gradient")
        var dx = Tensor<Float>(shape: input.shape), dg = Tensor<Float>(shape: [c]), dbeta = Tensor<Float>(shape: [c])
        var stats = [Double](repeating: 0, count: 2 * c + 1)
        var mean = state.mean, invStd = state.invStd
        try gradOutput.withUnsafeBufferPointer { dy in try input.withUnsafeBufferPointer { x in try gamma.withUnsafeBufferPointer { g in
            try dx.withUnsafeMutableBufferPointer { dx in try dg.withUnsafeMutableBufferPointer { dg in try dbeta.withUnsafeMutableBufferPointer { db in
                try mean.withUnsafeMutableBufferPointer { m in try invStd.withUnsafeMutableBufferPointer { s in try stats.withUnsafeMutableBufferPointer { st in
                    var saved = BatchNorm2d.Saved(mean: m.baseAddress!, invStd: s.baseAddress!, statistics: st)
                    saved.globalCount = state.count
                    try BatchNorm2d.backwardTraining(BatchNorm2d.Shape(batch: n, channels: c, plane: p), gradInput: .floats(dx.baseAddress!),
                                                     gradients: BatchNorm2d.ParameterGradients(gamma: dg.baseAddress!, beta: db.baseAddress!),
                                                     gradOutput: dy.baseAddress!, input: .fp32(x.baseAddress!), gamma: g.baseAddress!, saved: saved,
                                                     reducer: reducer)
                } } }
            } } }
        } } }
        return (dx, dg, dbeta)
    }

    public static func batchNormInference(_ input: Tensor<Float>, gamma: Tensor<Float>, beta: Tensor<Float>,
                                          runningMean: Tensor<Float>, runningVar: Tensor<Float>, eps: Float = 1e-5) throws -> Tensor<Float> {
        let (n, c, p) = try batchNormSizes(input, gamma, beta)
        try runningMean.expectShape([c], "batch norm running_mean")
        try runningVar.expectShape([c], "batch norm running_var")
        var output = Tensor<Float>(shape: input.shape), runningMean = runningMean, runningVar = runningVar
        input.withUnsafeBufferPointer { x in gamma.withUnsafeBufferPointer { g in beta.withUnsafeBufferPointer { b in
            runningMean.withUnsafeMutableBufferPointer { rm in runningVar.withUnsafeMutableBufferPointer { rv in output.withUnsafeMutableBufferPointer { y in
                BatchNorm2d.forwardInference(BatchNorm2d.Shape(batch: n, channels: c, plane: p, eps: eps), output: .floats(y.baseAddress!),
                                             input: .fp32(x.baseAddress!),
                                             parameters: BatchNorm2d.Parameters(gamma: g.baseAddress!, beta: b.baseAddress!,
                                                                                runningMean: rm.baseAddress!, runningVar: rv.baseAddress!))
            } } }
        } } }
        return output
    }

    public static func batchNormInferenceBackward(_ gradOutput: Tensor<Float>, input: Tensor<Float>, gamma: Tensor<Float>,
                                                  runningMean: Tensor<Float>, runningVar: Tensor<Float>, eps: Float = 1e-5) throws
        -> (input: Tensor<Float>, gamma: Tensor<Float>, beta: Tensor<Float>) {
        let (n, c, p) = try batchNormSizes(input, gamma, gamma)
        try gradOutput.expectShape(input.shape, "batch norm output gradient")
        var dx = Tensor<Float>(shape: input.shape), dg = Tensor<Float>(shape: [c]), db = Tensor<Float>(shape: [c])
        var runningMean = runningMean, runningVar = runningVar
        let beta = Tensor<Float>(shape: [c])  // read by no backward
        gradOutput.withUnsafeBufferPointer { dy in input.withUnsafeBufferPointer { x in gamma.withUnsafeBufferPointer { g in
            runningMean.withUnsafeMutableBufferPointer { rm in runningVar.withUnsafeMutableBufferPointer { rv in beta.withUnsafeBufferPointer { b in
                dx.withUnsafeMutableBufferPointer { dx in dg.withUnsafeMutableBufferPointer { dg in db.withUnsafeMutableBufferPointer { db in
                    BatchNorm2d.backwardInference(BatchNorm2d.Shape(batch: n, channels: c, plane: p, eps: eps), gradInput: .floats(dx.baseAddress!),
                                                  gradients: BatchNorm2d.ParameterGradients(gamma: dg.baseAddress!, beta: db.baseAddress!),
                                                  gradOutput: dy.baseAddress!, input: .fp32(x.baseAddress!),
                                                  parameters: BatchNorm2d.Parameters(gamma: g.baseAddress!, beta: b.baseAddress!,
                                                                                     runningMean: rm.baseAddress!, runningVar: rv.baseAddress!))
                } } }
            } } }
        } } }
        return (dx, dg, db)
    }

    // MARK: pointwise

    public static func relu(_ x: Tensor<Float>) -> Tensor<Float> {
        unary(x) { ReLU.forward(output: $1, input: $0, count: $2) }
    }

    public static func reluBackward(_ gradOutput: Tensor<Float>, output: Tensor<Float>) throws -> Tensor<Float> {
        try gradOutput.expectShape(output.shape, "relu output gradient")
        return binaryGrad(gradOutput, output) { ReLU.backward(gradInput: $2, gradOutput: $0, output: $1, count: $3) }
    }

    public static func gelu(_ x: Tensor<Float>) -> Tensor<Float> {
        unary(x) { GELU.forward(output: $1, input: $0, count: $2) }
    }

    public static func geluBackward(_ gradOutput: Tensor<Float>, input: Tensor<Float>) throws -> Tensor<Float> {
        try gradOutput.expectShape(input.shape, "gelu output gradient")
        return binaryGrad(gradOutput, input) { GELU.backward(gradInput: $2, gradOutput: $0, input: $1, count: $3) }
    }

    public static func add(_ a: Tensor<Float>, _ b: Tensor<Float>) throws -> Tensor<Float> {
        try b.expectShape(a.shape, "residual add")
        var y = Tensor<Float>(shape: a.shape)
        a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in y.withUnsafeMutableBufferPointer { y in
            Residual.forward(output: y.baseAddress!, a.baseAddress!, b.baseAddress!, count: y.count)
        } } }
        return y
    }

    public static func dropout(_ x: Tensor<Float>, probability: Float, stream: RandomStream) throws -> Tensor<Float> {
        try require(probability >= 0 && probability < 1, "dropout", "probability \(probability) is not in [0, 1)")
        return unary(x) { Dropout.forward(output: $1, input: $0, count: $2, probability: probability, stream: stream) }
    }

    public static func dropoutBackward(_ gradOutput: Tensor<Float>, probability: Float, stream: RandomStream) throws -> Tensor<Float> {
        try require(probability >= 0 && probability < 1, "dropout", "probability \(probability) is not in [0, 1)")
        var dx = Tensor<Float>(shape: gradOutput.shape)
        gradOutput.withUnsafeBufferPointer { dy in dx.withUnsafeMutableBufferPointer { dx in
            Dropout.backward(gradInput: dx.baseAddress!, gradOutput: dy.baseAddress!, count: dx.count, probability: probability, stream: stream)
        } }
        return dx
    }

    // MARK: pooling

    public static func maxPool2d(_ x: Tensor<Float>, kernel: Int = 3, stride: Int = 2, padding: Int = 1) throws -> (output: Tensor<Float>, indices: Tensor<Int32>) {
        try x.expectRank(4, "max pool input", axes: "[N, C, H, W]")
        try require(kernel > 0 && stride > 0 && padding >= 0 && padding * 2 <= kernel, "max pool",
                    "kernel \(kernel), stride \(stride), padding \(padding) are invalid (padding must be at most half the kernel)")
        let (h, w) = (x.shape[2], x.shape[3])
        try require(h + 2 * padding >= kernel && w + 2 * padding >= kernel, "max pool", "input \(h)x\(w) is smaller than the kernel \(kernel)")
        let oh = MaxPool2d.outputSize(h, kernel: kernel, stride: stride, padding: padding)
        let ow = MaxPool2d.outputSize(w, kernel: kernel, stride: stride, padding: padding)
        var y = Tensor<Float>(shape: [x.shape[0], x.shape[1], oh, ow]), idx = Tensor<Int32>(shape: y.shape)
        x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer { yp in idx.withUnsafeMutableBufferPointer { ip in
            MaxPool2d.forward(output: yp.baseAddress!, indices: ip.baseAddress!, input: xp.baseAddress!, planes: x.shape[0] * x.shape[1],
                              height: h, width: w, kernel: kernel, stride: stride, padding: padding)
        } } }
        return (y, idx)
    }

    public static func maxPool2dBackward(_ gradOutput: Tensor<Float>, indices: Tensor<Int32>, inputShape: [Int]) throws -> Tensor<Float> {
        try gradOutput.expectShape(indices.shape, "max pool output gradient")
        try require(inputShape.count == 4 && inputShape[0] == indices.shape[0] && inputShape[1] == indices.shape[1], "max pool backward",
                    "input shape \(describe(shape: inputShape)) does not match indices \(describe(shape: indices.shape))")
        var dx = Tensor<Float>(shape: inputShape)
        gradOutput.withUnsafeBufferPointer { dy in indices.withUnsafeBufferPointer { ip in dx.withUnsafeMutableBufferPointer { dx in
            MaxPool2d.backward(gradInput: dx.baseAddress!, gradOutput: dy.baseAddress!, indices: ip.baseAddress!,
                               planes: inputShape[0] * inputShape[1], inPlane: inputShape[2] * inputShape[3], outPlane: indices.shape[2] * indices.shape[3])
        } } }
        return dx
    }

    public static func globalAvgPool(_ x: Tensor<Float>) throws -> Tensor<Float> {
        try x.expectRank(4, "global average pool input", axes: "[N, C, H, W]")
        var y = Tensor<Float>(shape: [x.shape[0], x.shape[1]])
        x.withUnsafeBufferPointer { x in y.withUnsafeMutableBufferPointer { yp in
            GlobalAvgPool.forward(output: yp.baseAddress!, input: x.baseAddress!, rows: yp.count, plane: x.count / max(yp.count, 1))
        } }
        return y
    }

    public static func globalAvgPoolBackward(_ gradOutput: Tensor<Float>, inputShape: [Int]) throws -> Tensor<Float> {
        try require(inputShape.count == 4, "global average pool backward", "input shape must be [N, C, H, W]")
        try gradOutput.expectShape(Array(inputShape.prefix(2)), "global average pool output gradient")
        var dx = Tensor<Float>(shape: inputShape)
        gradOutput.withUnsafeBufferPointer { dy in dx.withUnsafeMutableBufferPointer { dxp in
            GlobalAvgPool.backward(gradInput: dxp.baseAddress!, gradOutput: dy.baseAddress!, rows: dy.count, plane: inputShape[2] * inputShape[3])
        } }
        return dx
    }

    private static func checkMask(_ mask: Tensor<Int32>, batch: Int, tokens: Int, _ context: String) throws {
        try mask.expectShape([batch, tokens], "\(context) mask")
        try mask.withUnsafeBufferPointer { m in
            for b in 0..<batch {
                try require((0..<tokens).contains { m[b * tokens + $0] != 0 }, context, "sequence \(b) has no valid token in its mask")
            }
        }
    }

    public static func maskedMaxPool(_ x: Tensor<Float>, mask: Tensor<Int32>) throws -> (output: Tensor<Float>, indices: Tensor<Int32>) {
        try x.expectRank(3, "masked max pool input", axes: "[B, T, C]")
        let (b, t, c) = (x.shape[0], x.shape[1], x.shape[2])
        try checkMask(mask, batch: b, tokens: t, "masked max pool")
        var y = Tensor<Float>(shape: [b, c]), idx = Tensor<Int32>(shape: [b, c])
        x.withUnsafeBufferPointer { xp in mask.withUnsafeBufferPointer { mp in y.withUnsafeMutableBufferPointer { yp in idx.withUnsafeMutableBufferPointer { ip in
            MaskedMaxPool.forward(output: yp.baseAddress!, indices: ip.baseAddress!, input: xp.baseAddress!, mask: mp.baseAddress!, batch: b, tokens: t, channels: c)
        } } } }
        return (y, idx)
    }

    public static func maskedMaxPoolBackward(_ gradOutput: Tensor<Float>, indices: Tensor<Int32>, tokens: Int) throws -> Tensor<Float> {
        try gradOutput.expectShape(indices.shape, "masked max pool output gradient")
        let (b, c) = (indices.shape[0], indices.shape[1])
        var dx = Tensor<Float>(shape: [b, tokens, c])
        gradOutput.withUnsafeBufferPointer { dy in indices.withUnsafeBufferPointer { ip in dx.withUnsafeMutableBufferPointer { dxp in
            MaskedMaxPool.backward(gradInput: dxp.baseAddress!, gradOutput: dy.baseAddress!, indices: ip.baseAddress!, batch: b, tokens: tokens, channels: c)
        } } }
        return dx
    }

    // MARK: dense

    public static func linear(_ x: Tensor<Float>, weight: Tensor<Float>, bias: Tensor<Float>?) throws -> Tensor<Float> {
        try weight.expectRank(2, "linear weight", axes: "[out, in]")
        let (out, inF) = (weight.shape[0], weight.shape[1])
        try require(x.rank >= 1 && x.shape.last == inF, "linear", "input \(describe(shape: x.shape)) does not end in \(inF) features of weight \(describe(shape: weight.shape))")
        if let bias { try bias.expectShape([out], "linear bias") }
        let rows = x.count / inF
        var y = Tensor<Float>(shape: Array(x.shape.dropLast()) + [out])
        x.withUnsafeBufferPointer { xp in weight.withUnsafeBufferPointer { w in y.withUnsafeMutableBufferPointer { yp in
            if let bias {
                bias.withUnsafeBufferPointer { b in Linear.forward(output: yp.baseAddress!, input: xp.baseAddress!, weight: w.baseAddress!, bias: b.baseAddress!, rows: rows, inFeatures: inF, outFeatures: out) }
            } else {
                Linear.forward(output: yp.baseAddress!, input: xp.baseAddress!, weight: w.baseAddress!, bias: nil, rows: rows, inFeatures: inF, outFeatures: out)
            }
        } } }
        return y
    }

    public static func linearBackward(_ gradOutput: Tensor<Float>, input: Tensor<Float>, weight: Tensor<Float>) throws
        -> (input: Tensor<Float>, weight: Tensor<Float>, bias: Tensor<Float>) {
        try weight.expectRank(2, "linear weight", axes: "[out, in]")
        let (out, inF) = (weight.shape[0], weight.shape[1])
        try require(input.shape.last == inF, "linear backward", "input \(describe(shape: input.shape)) does not end in \(inF)")
        try gradOutput.expectShape(Array(input.shape.dropLast()) + [out], "linear output gradient")
        let rows = input.count / inF
        var dx = Tensor<Float>(shape: input.shape), dw = Tensor<Float>(shape: weight.shape), db = Tensor<Float>(shape: [out])
        gradOutput.withUnsafeBufferPointer { dy in input.withUnsafeBufferPointer { x in weight.withUnsafeBufferPointer { w in
            dx.withUnsafeMutableBufferPointer { dx in dw.withUnsafeMutableBufferPointer { dw in db.withUnsafeMutableBufferPointer { db in
                Linear.backward(gradInput: dx.baseAddress!, gradWeight: dw.baseAddress!, gradBias: db.baseAddress!, gradOutput: dy.baseAddress!,
                                input: x.baseAddress!, weight: w.baseAddress!, rows: rows, inFeatures: inF, outFeatures: out)
            } } }
        } } }
        return (dx, dw, db)
    }

    public struct LayerNormState { public var mean: Tensor<Float>; public var invStd: Tensor<Float> }

    public static func layerNorm(_ x: Tensor<Float>, gamma: Tensor<Float>, beta: Tensor<Float>, eps: Float = 1e-12) throws -> (output: Tensor<Float>, state: LayerNormState) {
        try require(x.rank >= 1, "layer norm", "input must have at least one axis")
        let features = x.shape.last!
        try gamma.expectShape([features], "layer norm weight")
        try beta.expectShape([features], "layer norm bias")
        let rows = x.count / max(features, 1)
        var y = Tensor<Float>(shape: x.shape), mean = Tensor<Float>(shape: [rows]), invStd = Tensor<Float>(shape: [rows])
        x.withUnsafeBufferPointer { xp in gamma.withUnsafeBufferPointer { g in beta.withUnsafeBufferPointer { b in
            y.withUnsafeMutableBufferPointer { yp in mean.withUnsafeMutableBufferPointer { m in invStd.withUnsafeMutableBufferPointer { s in
                LayerNorm.forward(output: yp.baseAddress!, mean: m.baseAddress!, invStd: s.baseAddress!, input: xp.baseAddress!,
                                  gamma: g.baseAddress!, beta: b.baseAddress!, rows: rows, features: features, eps: eps)
            } } }
        } } }
        return (y, LayerNormState(mean: mean, invStd: invStd))
    }

    public static func layerNormBackward(_ gradOutput: Tensor<Float>, input: Tensor<Float>, gamma: Tensor<Float>, state: LayerNormState) throws
        -> (input: Tensor<Float>, gamma: Tensor<Float>, beta: Tensor<Float>) {
        try gradOutput.expectShape(input.shape, "layer norm output gradient")
        let features = input.shape.last!
        try gamma.expectShape([features], "layer norm weight")
        let rows = input.count / max(features, 1)
        try state.mean.expectShape([rows], "layer norm saved mean")
        var dx = Tensor<Float>(shape: input.shape), dg = Tensor<Float>(shape: [features]), db = Tensor<Float>(shape: [features])
        gradOutput.withUnsafeBufferPointer { dy in input.withUnsafeBufferPointer { x in gamma.withUnsafeBufferPointer { g in
            state.mean.withUnsafeBufferPointer { m in state.invStd.withUnsafeBufferPointer { s in
                dx.withUnsafeMutableBufferPointer { dx in dg.withUnsafeMutableBufferPointer { dg in db.withUnsafeMutableBufferPointer { db in
                    LayerNorm.backward(gradInput: dx.baseAddress!, gradGamma: dg.baseAddress!, gradBeta: db.baseAddress!, gradOutput: dy.baseAddress!,
                                       input: x.baseAddress!, gamma: g.baseAddress!, mean: m.baseAddress!, invStd: s.baseAddress!, rows: rows, features: features)
                } } }
            } }
        } } }
        return (dx, dg, db)
    }

    public static func embedding(_ ids: Tensor<Int32>, table: Tensor<Float>) throws -> Tensor<Float> {
        try table.expectRank(2, "embedding table", axes: "[vocabulary, features]")
        let (vocabulary, features) = (table.shape[0], table.shape[1])
        try ids.withUnsafeBufferPointer { p in
            for (i, id) in p.enumerated() where id < 0 || Int(id) >= vocabulary {
                throw ConvirtError("embedding: id \(id) at position \(i) is outside the vocabulary of \(vocabulary)")
            }
        }
        var y = Tensor<Float>(shape: ids.shape + [features])
        ids.withUnsafeBufferPointer { ip in table.withUnsafeBufferPointer { t in y.withUnsafeMutableBufferPointer { yp in
            Embedding.forward(output: yp.baseAddress!, table: t.baseAddress!, ids: ip.baseAddress!, rows: ip.count, features: features)
        } } }
        return y
    }

    public static func embeddingBackward(_ gradOutput: Tensor<Float>, ids: Tensor<Int32>, tableShape: [Int]) throws -> Tensor<Float> {
        try require(tableShape.count == 2, "embedding backward", "table shape must be [vocabulary, features]")
        try gradOutput.expectShape(ids.shape + [tableShape[1]], "embedding output gradient")
        var dt = Tensor<Float>(shape: tableShape)
        try ids.withUnsafeBufferPointer { p in
            for id in p where id < 0 || Int(id) >= tableShape[0] { throw ConvirtError("embedding backward: id \(id) is outside the vocabulary of \(tableShape[0])") }
        }
        gradOutput.withUnsafeBufferPointer { dy in ids.withUnsafeBufferPointer { ip in dt.withUnsafeMutableBufferPointer { dt in
            Embedding.backward(gradTable: dt.baseAddress!, gradOutput: dy.baseAddress!, ids: ip.baseAddress!, rows: ip.count, features: tableShape[1])
        } } }
        return dt
    }

    // MARK: row-wise

    private static func rows(_ x: Tensor<Float>, _ context: String) throws -> (Int, Int) {
        try require(x.rank >= 1 && x.shape.last! > 0, context, "input \(describe(shape: x.shape)) needs a non-empty last axis")
        return (x.count / x.shape.last!, x.shape.last!)
    }

    public static func softmax(_ x: Tensor<Float>) throws -> Tensor<Float> {
        let (r, c) = try rows(x, "softmax")
        return unary(x) { Softmax.forward(output: $1, input: $0, rows: r, columns: c) ; _ = $2 }
    }

    public static func softmaxBackward(_ gradOutput: Tensor<Float>, output: Tensor<Float>) throws -> Tensor<Float> {
        try gradOutput.expectShape(output.shape, "softmax output gradient")
        let (r, c) = try rows(output, "softmax backward")
        return binaryGrad(gradOutput, output) { Softmax.backward(gradInput: $2, gradOutput: $0, output: $1, rows: r, columns: c); _ = $3 }
    }

    public static func l2Normalize(_ x: Tensor<Float>) throws -> (output: Tensor<Float>, norms: Tensor<Float>) {
        let (r, c) = try rows(x, "L2 normalise")
        var y = Tensor<Float>(shape: x.shape), norms = Tensor<Float>(shape: [r])
        x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer { yp in norms.withUnsafeMutableBufferPointer { n in
            L2Normalize.forward(output: yp.baseAddress!, norms: n.baseAddress!, input: xp.baseAddress!, rows: r, features: c)
        } } }
        return (y, norms)
    }

    public static func l2NormalizeBackward(_ gradOutput: Tensor<Float>, output: Tensor<Float>, norms: Tensor<Float>) throws -> Tensor<Float> {
        try gradOutput.expectShape(output.shape, "L2 normalise output gradient")
        let (r, c) = try rows(output, "L2 normalise backward")
        try norms.expectShape([r], "L2 normalise norms")
        var dx = Tensor<Float>(shape: output.shape)
        gradOutput.withUnsafeBufferPointer { dy in output.withUnsafeBufferPointer { y in norms.withUnsafeBufferPointer { n in dx.withUnsafeMutableBufferPointer { dx in
            L2Normalize.backward(gradInput: dx.baseAddress!, gradOutput: dy.baseAddress!, output: y.baseAddress!, norms: n.baseAddress!, rows: r, features: c)
        } } } }
        return dx
    }

    /// Per-row cross-entropy losses and the softmax probabilities the backward pass needs.
    public static func crossEntropy(_ logits: Tensor<Float>, targets: Tensor<Int32>) throws -> (losses: Tensor<Float>, probabilities: Tensor<Float>) {
        try logits.expectRank(2, "cross-entropy logits", axes: "[rows, classes]")
        let (r, c) = (logits.shape[0], logits.shape[1])
        try targets.expectShape([r], "cross-entropy targets")
        try targets.withUnsafeBufferPointer { t in
            for (i, v) in t.enumerated() where v < 0 || Int(v) >= c { throw ConvirtError("cross-entropy: target \(v) of row \(i) is outside 0..<\(c)") }
        }
        var losses = Tensor<Float>(shape: [r]), probabilities = Tensor<Float>(shape: [r, c])
        logits.withUnsafeBufferPointer { x in targets.withUnsafeBufferPointer { t in
            losses.withUnsafeMutableBufferPointer { l in probabilities.withUnsafeMutableBufferPointer { p in
                CrossEntropy.forward(losses: l.baseAddress!, probabilities: p.baseAddress!, logits: x.baseAddress!, targets: t.baseAddress!, rows: r, classes: c)
            } }
        } }
        return (losses, probabilities)
    }

    public static func crossEntropyBackward(_ gradLosses: Tensor<Float>, probabilities: Tensor<Float>, targets: Tensor<Int32>) throws -> Tensor<Float> {
        try probabilities.expectRank(2, "cross-entropy probabilities", axes: "[rows, classes]")
        let (r, c) = (probabilities.shape[0], probabilities.shape[1])
        try gradLosses.expectShape([r], "cross-entropy loss gradient")
        try targets.expectShape([r], "cross-entropy targets")
        var dx = Tensor<Float>(shape: [r, c])
        gradLosses.withUnsafeBufferPointer { g in probabilities.withUnsafeBufferPointer { p in targets.withUnsafeBufferPointer { t in
            dx.withUnsafeMutableBufferPointer { dx in
                CrossEntropy.backward(gradLogits: dx.baseAddress!, gradLosses: g.baseAddress!, probabilities: p.baseAddress!, targets: t.baseAddress!, rows: r, classes: c)
            }
        } } }
        return dx
    }

    /// Binary cross-entropy on logits, elementwise: (losses, sigmoid probabilities), both shaped as `logits`.
    public static func binaryCrossEntropy(_ logits: Tensor<Float>, targets: Tensor<Float>) throws -> (losses: Tensor<Float>, probabilities: Tensor<Float>) {
        try targets.expectShape(logits.shape, "binary cross-entropy targets")
        var losses = Tensor<Float>(shape: logits.shape), probabilities = Tensor<Float>(shape: logits.shape)
        logits.withUnsafeBufferPointer { x in targets.withUnsafeBufferPointer { t in
            losses.withUnsafeMutableBufferPointer { l in probabilities.withUnsafeMutableBufferPointer { p in
                BinaryCrossEntropy.forward(losses: l.baseAddress!, probabilities: p.baseAddress!, logits: x.baseAddress!, targets: t.baseAddress!, count: x.count)
            } }
        } }
        return (losses, probabilities)
    }

    public static func binaryCrossEntropyBackward(_ gradLosses: Tensor<Float>, probabilities: Tensor<Float>, targets: Tensor<Float>) throws -> Tensor<Float> {
        try gradLosses.expectShape(probabilities.shape, "binary cross-entropy loss gradient")
        try targets.expectShape(probabilities.shape, "binary cross-entropy targets")
        var dx = Tensor<Float>(shape: probabilities.shape)
        gradLosses.withUnsafeBufferPointer { g in probabilities.withUnsafeBufferPointer { p in targets.withUnsafeBufferPointer { t in
            dx.withUnsafeMutableBufferPointer { dx in
                BinaryCrossEntropy.backward(gradLogits: dx.baseAddress!, gradLosses: g.baseAddress!, probabilities: p.baseAddress!, targets: t.baseAddress!, count: p.count)
            }
        } } }
        return dx
    }

    // MARK: attention

    public static func attentionGeometry(_ q: Tensor<Float>, heads: Int) throws -> AttentionGeometry {
        try q.expectRank(3, "attention query", axes: "[B, T, H*D]")
        try require(heads > 0 && q.shape[2] % heads == 0, "attention", "width \(q.shape[2]) is not divisible by \(heads) heads")
        return try AttentionGeometry(batch: q.shape[0], tokens: q.shape[1], heads: heads, headSize: q.shape[2] / heads)
    }

    public static func attention(q: Tensor<Float>, k: Tensor<Float>, v: Tensor<Float>, mask: Tensor<Int32>, heads: Int) throws
        -> (output: Tensor<Float>, probabilities: Tensor<Float>) {
        let g = try attentionGeometry(q, heads: heads)
        try k.expectShape(q.shape, "attention key")
        try v.expectShape(q.shape, "attention value")
        try checkMask(mask, batch: g.batch, tokens: g.tokens, "attention")
        var y = Tensor<Float>(shape: q.shape), p = Tensor<Float>(shape: [g.batch, g.heads, g.tokens, g.tokens])
        q.withUnsafeBufferPointer { qp in k.withUnsafeBufferPointer { kp in v.withUnsafeBufferPointer { vp in mask.withUnsafeBufferPointer { m in
            y.withUnsafeMutableBufferPointer { yp in p.withUnsafeMutableBufferPointer { pp in
                Attention.forward(output: yp.baseAddress!, probabilities: pp.baseAddress!, q: qp.baseAddress!, k: kp.baseAddress!, v: vp.baseAddress!,
                                  mask: m.baseAddress!, geometry: g)
            } }
        } } } }
        return (y, p)
    }

    public static func attentionBackward(_ gradOutput: Tensor<Float>, probabilities: Tensor<Float>, q: Tensor<Float>, k: Tensor<Float>, v: Tensor<Float>,
                                         heads: Int) throws -> (q: Tensor<Float>, k: Tensor<Float>, v: Tensor<Float>) {
        let g = try attentionGeometry(q, heads: heads)
        try gradOutput.expectShape(q.shape, "attention output gradient")
        try k.expectShape(q.shape, "attention key")
        try v.expectShape(q.shape, "attention value")
        try probabilities.expectShape([g.batch, g.heads, g.tokens, g.tokens], "attention probabilities")
        var dq = Tensor<Float>(shape: q.shape), dk = Tensor<Float>(shape: q.shape), dv = Tensor<Float>(shape: q.shape)
        var workspace = [Float](repeating: 0, count: g.workspaceCount)
        gradOutput.withUnsafeBufferPointer { dy in probabilities.withUnsafeBufferPointer { p in
            q.withUnsafeBufferPointer { qp in k.withUnsafeBufferPointer { kp in v.withUnsafeBufferPointer { vp in
                dq.withUnsafeMutableBufferPointer { dq in dk.withUnsafeMutableBufferPointer { dk in dv.withUnsafeMutableBufferPointer { dv in
                    workspace.withUnsafeMutableBufferPointer { ws in
                        Attention.backward(gradQ: dq.baseAddress!, gradK: dk.baseAddress!, gradV: dv.baseAddress!, gradOutput: dy.baseAddress!,
                                           probabilities: p.baseAddress!, q: qp.baseAddress!, k: kp.baseAddress!, v: vp.baseAddress!,
                                           geometry: g, workspace: ws.baseAddress!)
                    }
                } } }
            } } }
        } }
        return (dq, dk, dv)
    }

    // MARK: helpers

    private static func unary(_ x: Tensor<Float>, _ body: (UnsafePointer<Float>, UnsafeMutablePointer<Float>, Int) -> Void) -> Tensor<Float> {
        var y = Tensor<Float>(shape: x.shape)
        x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer { yp in body(xp.baseAddress!, yp.baseAddress!, yp.count) } }
        return y
    }

    private static func binaryGrad(_ dy: Tensor<Float>, _ other: Tensor<Float>,
                                   _ body: (UnsafePointer<Float>, UnsafePointer<Float>, UnsafeMutablePointer<Float>, Int) -> Void) -> Tensor<Float> {
        var dx = Tensor<Float>(shape: dy.shape)
        dy.withUnsafeBufferPointer { d in other.withUnsafeBufferPointer { o in dx.withUnsafeMutableBufferPointer { dxp in
            body(d.baseAddress!, o.baseAddress!, dxp.baseAddress!, dxp.count)
        } } }
        return dx
    }
}
