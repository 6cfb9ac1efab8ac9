// ResNet as the architecture reads (He et al. 2016, torchvision's layout), in fp32 and NCHW: the
// oracle the fast `ResNet` is held to. Every layer is one call of a plain kernel on views of one
// activation arena (`ActivationArena`), forward is the list of calls, backward the same list reversed,
// each gradient added into its input's view. Parameters carry torchvision's names in the order `ResNet`
// registers them, so the two share one parameter arena.

import ConvirtCore

public final class ReferenceResNet {
    /// conv (no bias) -> batch norm: one unit's parameters and sizes.
    struct ConvBN {
        let conv, gamma, beta, runningMean, runningVar: ParameterLayout.Entry
        let inChannels, outChannels, kernel, stride, padding: Int

        init(_ layout: inout ParameterLayout, conv: String, bn: String, _ inChannels: Int, _ outChannels: Int,
             kernel: Int, stride: Int = 1, padding: Int = 0) throws {
            self.conv = try layout.add("\(conv).weight", shape: [outChannels, inChannels, kernel, kernel])
            gamma = try layout.add("\(bn).weight", shape: [outChannels])
            beta = try layout.add("\(bn).bias", shape: [outChannels])
            runningMean = try layout.add("\(bn).running_mean", shape: [outChannels], kind: .buffer)
            runningVar = try layout.add("\(bn).running_var", shape: [outChannels], kind: .buffer)
            self.inChannels = inChannels; self.outChannels = outChannels
            self.kernel = kernel; self.stride = stride; self.padding = padding
        }

        /// Batch norm's parameters and running statistics in `arena`.
        func parameters(_ arena: ParameterArena) -> BatchNorm2d.Parameters {
            let p = arena.trainingParams
            return BatchNorm2d.Parameters(gamma: p + gamma.offset, beta: p + beta.offset, runningMean: p + runningMean.offset,
                                          runningVar: p + runningVar.offset)
        }
    }

    /// Units in order (the last without a ReLU: the block's sum comes first), and the 1x1 downsample of
    /// the identity where the block changes size.
    struct Block {
        let units: [ConvBN]
        let downsample: ConvBN?
    }

    public let config: ResNetConfig
    let stem: ConvBN
    let blocks: [Block]
    static let eps: Float = 1e-5, momentum: Float = 0.1

    public init(config: ResNetConfig, layout: inout ParameterLayout, prefix: String = "") throws {
        try config.validate()
        self.config = config
        stem = try ConvBN(&layout, conv: "\(prefix)conv1", bn: "\(prefix)bn1", 3, config.width, kernel: 7, stride: 2, padding: 3)
        var blocks: [Block] = []
        var inChannels = config.width
        for (stage, count) in config.layers.enumerated() {
            let planes = config.width << stage, out = planes * config.expansion
            for i in 0..<count {
                let name = "\(prefix)layer\(stage + 1).\(i)", stride = i == 0 && stage > 0 ? 2 : 1
                let units: [ConvBN] = switch config.block {
                case .basic: [
                    try ConvBN(&layout, conv: "\(name).conv1", bn: "\(name).bn1", inChannels, planes, kernel: 3, stride: stride, padding: 1),
                    try ConvBN(&layout, conv: "\(name).conv2", bn: "\(name).bn2", planes, planes, kernel: 3, padding: 1),
                ]
                case .bottleneck: [
                    try ConvBN(&layout, conv: "\(name).conv1", bn: "\(name).bn1", inChannels, planes, kernel: 1),
                    try ConvBN(&layout, conv: "\(name).conv2", bn: "\(name).bn2", planes, planes, kernel: 3, stride: stride, padding: 1),
                    try ConvBN(&layout, conv: "\(name).conv3", bn: "\(name).bn3", planes, out, kernel: 1),
                ]
                }
                let downsample = stride != 1 || inChannels != out
                    ? try ConvBN(&layout, conv: "\(name).downsample.0", bn: "\(name).downsample.1", inChannels, out, kernel: 1, stride: stride)
                    : nil
                blocks.append(Block(units: units, downsample: downsample))
                inChannels = out
            }
        }
        self.blocks = blocks
    }

    // MARK: - Activations

    /// A unit's views: the convolution's output, batch norm's output and the statistics it keeps for
    /// backward, the ReLU's output (where the unit has one), and the gradient of each.
    struct UnitViews {
        let geometry: Conv2dGeometry
        let conv, bn: ActivationTable.View           // [B, O, OH, OW] each
        let relu: ActivationTable.View?              // [B, O, OH, OW]
        let gradConv, gradBN: ActivationTable.View   // [B, O, OH, OW] each
        let gradReLU: ActivationTable.View?          // [B, O, OH, OW]
        let mean, invStd: ActivationTable.View       // [O] batch statistics
        let statistics: ActivationTable.View         // [2 O + 1] doubles: sums, then the element count
        var output: ActivationTable.View { relu ?? bn }
        var gradOutput: ActivationTable.View { gradReLU ?? gradBN }
    }

    /// A block's views: its units', its downsample's, the residual sum and the block's output (its ReLU).
    struct BlockViews {
        let units: [UnitViews]
        let downsample: UnitViews?
        let sum, output, gradSum, gradOutput: ActivationTable.View   // [B, C, H, W] each
    }

    /// The activation arena of one pass over `batch` images of `size` px, and its views.
    public final class Activations {
        public let batch, size: Int
        public let arena: ActivationArena
        let images, gradImages: ActivationTable.View      // [B, 3, S, S]
        let stem: UnitViews
        let pooled, gradPooled: ActivationTable.View      // [B, W, S/4, S/4]
        let poolIndices: ActivationTable.View             // [B, W, S/4, S/4] argmax in the stem's output plane
        let blocks: [BlockViews]
        let features, gradFeatures: ActivationTable.View  // [B, F]
        let workspace: ActivationTable.View               // im2col scratch of the largest convolution
        /// Every gradient view (zeroed before backward, which adds into them).
        let gradients: [ActivationTable.View]

        init(_ model: ReferenceResNet, batch: Int, size: Int) throws {
            self.batch = batch
            self.size = size
            var t = ActivationTable()
            var gradients: [ActivationTable.View] = []
            var workspaceCount = 0
            func unit(_ u: ConvBN, _ name: String, height: Int, relu: Bool) throws -> UnitViews {
                let g = try Conv2dGeometry(batch: batch, inChannels: u.inChannels, height: height, width: height,
                                           outChannels: u.outChannels, kernel: u.kernel, stride: u.stride, padding: u.padding)
                workspaceCount = max(workspaceCount, g.workspaceCount)
                let shape = g.outputShape
                let v = UnitViews(geometry: g, conv: t.add("\(name).conv", shape), bn: t.add("\(name).bn", shape),
                                  relu: relu ? t.add("\(name).relu", shape) : nil,
                                  gradConv: t.add("\(name).conv.grad", shape), gradBN: t.add("\(name).bn.grad", shape),
                                  gradReLU: relu ? t.add("\(name).relu.grad", shape) : nil,
                                  mean: t.add("\(name).mean", [u.outChannels]), invStd: t.add("\(name).inv_std", [u.outChannels]),
                                  statistics: t.add("\(name).statistics", [2 * u.outChannels + 1], .double))
                gradients += [v.gradConv, v.gradBN] + (v.gradReLU.map { [$0] } ?? [])
                return v
            }
            images = t.add("images", [batch, 3, size, size])
            gradImages = t.add("images.grad", [batch, 3, size, size])
            stem = try unit(model.stem, "stem", height: size, relu: true)
            let s1 = stem.geometry.outHeight, s2 = MaxPool2d.outputSize(s1, kernel: 3, stride: 2, padding: 1)
            let w = model.config.width
            pooled = t.add("pool", [batch, w, s2, s2])
            gradPooled = t.add("pool.grad", [batch, w, s2, s2])
            poolIndices = t.add("pool.indices", [batch, w, s2, s2], .int32)
            gradients += [gradPooled]
            var blocks: [BlockViews] = [], height = s2
            for (k, block) in model.blocks.enumerated() {
                let first = try unit(block.units[0], "block\(k).unit0", height: height, relu: true)
                var units = [first]
                for (j, u) in block.units.enumerated().dropFirst() {
                    units.append(try unit(u, "block\(k).unit\(j)", height: units[j - 1].geometry.outHeight, relu: j < block.units.count - 1))
                }
                let downsample = try block.downsample.map { try unit($0, "block\(k).downsample", height: height, relu: false) }
                let shape = units.last!.geometry.outputShape
                let b = BlockViews(units: units, downsample: downsample, sum: t.add("block\(k).sum", shape),
                                   output: t.add("block\(k).output", shape), gradSum: t.add("block\(k).sum.grad", shape),
                                   gradOutput: t.add("block\(k).output.grad", shape))
                gradients += [b.gradSum, b.gradOutput]
                blocks.append(b)
                height = units.last!.geometry.outHeight
            }
            self.blocks = blocks
            features = t.add("features", [batch, model.config.featureCount])
            gradFeatures = t.add("features.grad", [batch, model.config.featureCount])
            workspace = t.add("im2col workspace", [max(workspaceCount, 1)])
            self.gradients = gradients + [gradImages]
            arena = ActivationArena(t)
        }
    }

    /// The arena for a pass over `batch` images of `size` px.
    public func activations(batch: Int, size: Int) throws -> Activations { try Activations(self, batch: batch, size: size) }

    // MARK: - Forward and backward

    /// Features [batch, featureCount] of images [batch, 3, size, size] (copied into the arena).
    public func forward(_ params: ParameterArena, images: UnsafePointer<Float>, _ a: Activations, context: PassContext) throws -> UnsafePointer<Float> {
        let x = a.arena
        x[a.images].update(from: images, count: a.images.count)
        try unit(params, stem, a.stem, input: a.images, a, context)
        let s = a.stem.geometry
        MaxPool2d.forward(output: x[a.pooled], indices: x.int32s(a.poolIndices), input: x[a.stem.output],
                          planes: a.batch * s.outChannels, height: s.outHeight, width: s.outWidth)
        var input = a.pooled
        for (block, views) in zip(blocks, a.blocks) {
            try self.block(params, block, views, input: input, a, context)
            input = views.output
        }
        let last = a.blocks.last!.units.last!.geometry
        GlobalAvgPool.forward(output: x[a.features], input: x[input], rows: a.batch * last.outChannels, plane: last.outPlane)
        return UnsafePointer(x[a.features])
    }

    /// Adds the parameters' gradients into params.grads, from gradFeatures [batch, featureCount].
    public func backward(_ params: ParameterArena, gradFeatures: UnsafePointer<Float>, _ a: Activations, context: PassContext) throws {
        let x = a.arena
        x.zero(a.gradients)
        x[a.gradFeatures].update(from: gradFeatures, count: a.gradFeatures.count)
        let last = a.blocks.last!
        let g = last.units.last!.geometry
        GlobalAvgPool.backward(gradInput: x[last.gradOutput], gradOutput: x[a.gradFeatures], rows: a.batch * g.outChannels, plane: g.outPlane)
        for k in blocks.indices.reversed() {
            let gradInput = k == 0 ? a.gradPooled : a.blocks[k - 1].gradOutput
            let input = k == 0 ? a.pooled : a.blocks[k - 1].output
            try blockBackward(params, blocks[k], a.blocks[k], input: input, gradInput: gradInput, a, context)
        }
        let s = a.stem.geometry
        MaxPool2d.backward(gradInput: x[a.stem.gradOutput], gradOutput: x[a.gradPooled], indices: x.int32s(a.poolIndices),
                           planes: a.batch * s.outChannels, inPlane: s.outPlane,
                           outPlane: a.gradPooled.count / (a.batch * s.outChannels))
        try unitBackward(params, stem, a.stem, input: a.images, gradInput: nil, a, context)
    }

    /// A residual block: its units, the downsampled identity, the sum and its ReLU.
    private func block(_ params: ParameterArena, _ b: Block, _ v: BlockViews, input: ActivationTable.View, _ a: Activations,
                       _ context: PassContext) throws {
        var x = input
        for (u, views) in zip(b.units, v.units) {
            try unit(params, u, views, input: x, a, context)
            x = views.output
        }
        var identity = input
        if let d = b.downsample, let dv = v.downsample {
            try unit(params, d, dv, input: input, a, context)
            identity = dv.output
        }
        Residual.forward(output: a.arena[v.sum], a.arena[x], a.arena[identity], count: v.sum.count)
        ReLU.forward(output: a.arena[v.output], input: a.arena[v.sum], count: v.output.count)
    }

    private func blockBackward(_ params: ParameterArena, _ b: Block, _ v: BlockViews, input: ActivationTable.View,
                               gradInput: ActivationTable.View, _ a: Activations, _ context: PassContext) throws {
        let x = a.arena
        ReLU.backward(gradInput: x[v.gradSum], gradOutput: x[v.gradOutput], output: x[v.output], count: v.output.count)
        let gradIdentity = v.downsample?.gradOutput ?? gradInput
        Residual.backward(gradA: x[v.units.last!.gradOutput], gradB: x[gradIdentity], gradOutput: x[v.gradSum], count: v.sum.count)
        if let d = b.downsample, let dv = v.downsample {
            try unitBackward(params, d, dv, input: input, gradInput: gradInput, a, context)
        }
        for k in b.units.indices.reversed() {
            try unitBackward(params, b.units[k], v.units[k], input: k == 0 ? input : v.units[k - 1].output,
                             gradInput: k == 0 ? gradInput : v.units[k - 1].gradOutput, a, context)
        }
    }

    /// conv -> batch norm -> ReLU (where the unit has one).
    private func unit(_ params: ParameterArena, _ u: ConvBN, _ v: UnitViews, input: ActivationTable.View, _ a: Activations,
                      _ context: PassContext) throws {
        let x = a.arena, p = params.params, g = v.geometry
        Conv2d.forward(output: x[v.conv], input: x[input], weight: p + u.conv.offset, bias: nil, geometry: g, workspace: x[a.workspace])
        let shape = BatchNorm2d.Shape(batch: a.batch, channels: u.outChannels, plane: g.outPlane, eps: Self.eps, momentum: Self.momentum)
        if context.training {
            var saved = BatchNorm2d.Saved(mean: x[v.mean], invStd: x[v.invStd], statistics: x.doubles(v.statistics))
            try BatchNorm2d.forwardTraining(shape, output: .floats(x[v.bn]), input: .fp32(x[v.conv]), parameters: u.parameters(params),
                                            saved: &saved, reducer: context.reducer)
        } else {
            BatchNorm2d.forwardInference(shape, output: .floats(x[v.bn]), input: .fp32(x[v.conv]), parameters: u.parameters(params))
        }
        if let relu = v.relu { ReLU.forward(output: x[relu], input: x[v.bn], count: relu.count) }
    }

    private func unitBackward(_ params: ParameterArena, _ u: ConvBN, _ v: UnitViews, input: ActivationTable.View,
                              gradInput: ActivationTable.View?, _ a: Activations, _ context: PassContext) throws {
        let x = a.arena, p = params.params, d = params.grads, g = v.geometry
        if let relu = v.relu, let gradReLU = v.gradReLU {
            ReLU.backward(gradInput: x[v.gradBN], gradOutput: x[gradReLU], output: x[relu], count: relu.count)
        }
        let shape = BatchNorm2d.Shape(batch: a.batch, channels: u.outChannels, plane: g.outPlane, eps: Self.eps, momentum: Self.momentum)
        let gradients = BatchNorm2d.ParameterGradients(gamma: d + u.gamma.offset, beta: d + u.beta.offset)
        if context.training {
            var saved = BatchNorm2d.Saved(mean: x[v.mean], invStd: x[v.invStd], statistics: x.doubles(v.statistics))
            saved.globalCount = Int(saved.statistics[2 * u.outChannels])  // forward's count, summed over ranks
            try BatchNorm2d.backwardTraining(shape, gradInput: .floats(x[v.gradConv]), gradients: gradients, gradOutput: x[v.gradBN],
                                             input: .fp32(x[v.conv]), gamma: p + u.gamma.offset, saved: saved, reducer: context.reducer)
        } else {
            BatchNorm2d.backwardInference(shape, gradInput: .floats(x[v.gradConv]), gradients: gradients, gradOutput: x[v.gradBN],
                                          input: .fp32(x[v.conv]), parameters: u.parameters(params))
        }
        Conv2d.backward(gradInput: gradInput.map { x[$0] }, gradWeight: d + u.conv.offset, gradBias: nil, gradOutput: x[v.gradConv],
                        input: x[input], weight: p + u.conv.offset, geometry: g, workspace: x[a.workspace])
    }
}
