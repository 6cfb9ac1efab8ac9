// The fast ResNet's plan of a pass, made once per (batch, image size, precision, layout): every layer's
// decisions (geometry, layouts, which bf16 copies it reads and writes), which forward and backward
// follow, and its buffers as rooms of one activation arena (`BufferPlan`).

import ConvirtCore

/// What one conv -> batch norm unit does in a planned pass.
struct UnitStep {
    let geometry: Conv2dGeometry
    let layouts: Convolution.Layouts
    /// The copies of the unit's output it writes: the floats, the bf16 bits (where the next unit's
    /// convolution is the only reader and reads bf16, the bits alone).
    let outputs: (floats: Bool, halves: Bool)
    /// Whether the convolution writes its output as bf16 bits, which batch norm reads (oneDNN's bf16
    /// kernels outside NCHW); else its floats, rounded to bf16 in a bf16 pass.
    let convHalves: Bool
    /// Whether the convolution reads its input, and its output gradient, as bf16 bits.
    let inputHalves, gradHalves: Bool
    /// Whether the unit's output gradient is rounded to bf16 before batch norm's backward reads it (a
    /// bf16 pass, as autocast returns a bf16 layer's input gradient in bf16), and whether it is kept as
    /// those bf16 bits (written so by the next convolution's backward, or by the residual sum's),
    /// else as floats rounded in place.
    let roundsGradient, gradOutputHalves: Bool
}

/// What one residual block does in a planned pass.
struct BlockStep {
    let units: [UnitStep]
    let downsample: UnitStep?
    /// Whether the block's output is kept as bf16 bits (for the next block's convolutions and its
    /// residual sum), else as floats (rounded to bf16 in a bf16 pass).
    let outputHalves: Bool
    /// Whether its output gradient comes in two parts (`ResidualBlock.gradOutputPart`): every block's
    /// but the last's, whose output only the pooling reads.
    let gradOutputInParts: Bool
    /// Whether those parts are kept as bf16 bits (written so by the next block's residual backward and
    /// convolutions), else as floats.
    let gradOutputHalves: Bool
    /// Elements of the block's output.
    let count: Int
}

/// A planned pass of the fast ResNet.
struct ResNetPass {
    let key: ResNet.PlannedPass
    let stem: UnitStep
    /// The max pool's output side, and whether its output has a bf16 copy (for the first block).
    let poolSize: Int
    let pooledHalves: Bool
    let blocks: [BlockStep]
    /// The last block's output side.
    let finalSize: Int
}

extension ResNet {
    /// What decides a pass.
    struct PlannedPass: Equatable {
        let batch, size: Int
        let precision: Precision
        let layout: ActivationLayout
        let bf16Copies: Bool
    }

    /// The plan of a pass over `batch` images of `size` px in `precision`, with every buffer bound to a
    /// room of one arena (a larger arena where this pass needs more than the last plan holds).
    func preparePlan(batch: Int, size: Int, precision: Precision) throws -> ResNetPass {
        let key = PlannedPass(batch: batch, size: size, precision: precision, layout: passLayout(precision), bf16Copies: keepsBF16Activations)
        if let pass, pass.key == key { return pass }
        var needs = BufferNeeds()
        let pass = try planPass(key, needs: &needs)
        self.pass = pass
        if plan == nil || !needs.fit {
            needs.keep(plan)
            plan = BufferPlan(needs)
        }
        return pass
    }

    /// Decides every layer's step of the pass `key`, and lists the buffers each uses in `needs`, as
    /// `forward` and `backward` will use them.
    func planPass(_ key: PlannedPass, needs: inout BufferNeeds) throws -> ResNetPass {
        let (batch, precision, layout) = (key.batch, key.precision, key.layout)
        let bf16Copies = key.bf16Copies && stem.kernels.takesBF16(precision, layout)
        needs.need(inputImages, batch * 3 * key.size * key.size, "images")
        var workspaceCount = 1
        /// `inBlock`: a residual block's unit, whose output gradient is rounded to bf16 in a bf16 pass (the
        /// stem's comes from the max pool's backward, which keeps floats), and kept as bf16 bits where the
        /// pass keeps bf16 copies (its writer, a convolution's backward on oneDNN's bf16 kernels or the
        /// residual sum's, writes them as they are; batch norm reads them outside NCHW).
        func unit(_ u: ConvBNUnit, height: Int, layouts: Convolution.Layouts, outputs: (floats: Bool, halves: Bool),
                  inBlock: Bool = true) throws -> UnitStep {
            let g = try Conv2dGeometry(batch: batch, inChannels: u.inChannels, height: height, width: height, outChannels: u.outChannels,
                                       kernel: u.kernel, stride: u.stride, padding: u.padding)
            let step = UnitStep(geometry: g, layouts: layouts, outputs: outputs,
                                convHalves: u.keepsBF16ConvOutput && u.kernels.takesBF16(precision, layouts.output),
                                inputHalves: u.kernels.takesBF16(precision, layouts.input), gradHalves: u.kernels.takesBF16(precision, layouts.output),
                                roundsGradient: inBlock && precision == .bf16, gradOutputHalves: inBlock && bf16Copies)
            let count = g.outputCount
            if step.convHalves { needs.need(u.convOutBF16, count, "\(u.name) output (bf16)") } else { needs.need(u.convOut, count, "\(u.name) output") }
            workspaceCount = max(workspaceCount, Convolution.workspaceCount(g, precision: precision))
            if outputs.floats { needs.need(u.output, count, "\(u.name) unit output") }
            if outputs.halves { needs.need(u.outputBF16, count, "\(u.name) unit output (bf16)") }
            if step.gradOutputHalves {
                needs.need(u.gradOutputBF16, count, "\(u.name) unit output gradient (bf16)")
            } else {
                needs.need(u.gradOutput, count, "\(u.name) unit output gradient")
            }
            if step.gradHalves {
                needs.need(rooms.convGradientBF16, count, "\(u.name) output gradient (bf16)")
            } else {
                needs.need(rooms.convGradient, count, "\(u.name) output gradient")
            }
            return step
        }
        let stemStep = try unit(stem, height: key.size, layouts: Convolution.Layouts(input: .nchw, output: layout), outputs: (true, false),
                                inBlock: false)
        let s2 = MaxPool2d.outputSize(stemStep.geometry.outHeight, kernel: 3, stride: 2, padding: 1)
        let pooled = batch * config.width * s2 * s2
        needs.need(poolOutput, pooled, "max pool output")
        needs.need(poolIndices, pooled, "max pool indices")
        needs.need(poolGrad, pooled, "max pool output gradient")
        if bf16Copies { needs.need(poolOutputBF16, pooled, "max pool output (bf16)") }
        var blockSteps: [BlockStep] = [], height = s2
        for (k, block) in blocks.enumerated() {
            var h = height, unitSteps: [UnitStep] = []
            for (j, u) in block.units.enumerated() {
                // A unit whose only reader is the next unit's convolution writes just the bf16 bits where that
                // reads them; the last, read by the residual sum, just its bits where the pass keeps bf16 copies.
                let halves = j + 1 < block.units.count ? block.units[j + 1].kernels.takesBF16(precision, layout) : bf16Copies
                unitSteps.append(try unit(u, height: h, layouts: Convolution.Layouts(layout), outputs: (!halves, halves)))
                h = unitSteps[j].geometry.outHeight
            }
            let downsample = try block.downsample.map {
                try unit($0, height: height, layouts: Convolution.Layouts(layout), outputs: (!bf16Copies, bf16Copies))
            }
            let step = BlockStep(units: unitSteps, downsample: downsample, outputHalves: bf16Copies && k + 1 < blocks.count,
                                 gradOutputInParts: k + 1 < blocks.count, gradOutputHalves: bf16Copies && k + 1 < blocks.count,
                                 count: batch * block.outChannels * h * h)
            if step.outputHalves {
                needs.need(block.outputBF16, step.count, "\(block.name) output (bf16)")
            } else {
                needs.need(block.output, step.count, "\(block.name) output")
            }
            if step.gradOutputHalves {
                needs.need(block.gradOutputBF16, step.count, "\(block.name) output gradient (bf16)")
                needs.need(block.gradOutputPartBF16, step.count, "\(block.name) output gradient (bf16, the next block's first unit's part)")
            } else {
                needs.need(block.gradOutput, step.count, "\(block.name) output gradient")
                if step.gradOutputInParts {
                    needs.need(block.gradOutputPart, step.count, "\(block.name) output gradient (the next block's first unit's part)")
                }
            }
            blockSteps.append(step)
            height = h
        }
        needs.need(features, batch * featureCount, "features")
        needs.need(workspace, workspaceCount, "convolution workspace")
        return ResNetPass(key: key, stem: stemStep, poolSize: s2, pooledHalves: bf16Copies, blocks: blockSteps, finalSize: height)
    }

    /// How many times a buffer of this network outgrew its planned room (0 where the plan is right).
    public var outgrownRooms: Int { plan?.outgrown ?? 0 }

    /// The plan's table: each room with its size and users (`convirt bench step --activation-tables`, tests).
    public var activationTable: [String] { plan?.description ?? [] }
}
