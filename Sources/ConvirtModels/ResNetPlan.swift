// The fast ResNet's buffers planned as rooms of one activation arena (`BufferPlan`), for (batch, image
// size, precision, layout).

import ConvirtCore

extension ResNet {
    /// What decides a pass's buffers.
    struct PlannedPass: Equatable {
        let batch, size: Int
        let precision: Precision
        let layout: ActivationLayout
        let bf16Copies: Bool
    }

    /// Binds every buffer of a pass over `batch` images of `size` px in `precision` to a room of one
    /// arena, planning a larger one where this pass needs more than the last plan holds.
    func preparePlan(batch: Int, size: Int, precision: Precision) throws {
        let pass = PlannedPass(batch: batch, size: size, precision: precision, layout: passLayout(precision), bf16Copies: keepsBF16Activations)
        if pass == plannedPass { return }
        var needs = try passNeeds(batch: batch, size: size, precision: precision)
        plannedPass = pass
        if plan != nil && needs.fit { return }
        needs.keep(plan)
        plan = BufferPlan(needs)
    }

    /// The buffers of a pass, walked as `forward` and `backward` use them.
    func passNeeds(batch: Int, size: Int, precision: Precision) throws -> BufferNeeds {
        var needs = BufferNeeds()
        let layout = passLayout(precision)
        let bf16Copies = keepsBF16Activations && stem.kernels.takesBF16(precision, layout)
        needs.need(inputImages, batch * 3 * size * size, "images")
        var workspaceCount = 1
        func unit(_ u: ConvBNUnit, height: Int, layouts: Convolution.Layouts, outputs: (floats: Bool, halves: Bool)) throws -> Int {
            let g = try Conv2dGeometry(batch: batch, inChannels: u.inChannels, height: height, width: height, outChannels: u.outChannels,
                                       kernel: u.kernel, stride: u.stride, padding: u.padding)
            let count = g.outputCount
            if u.keepsBF16ConvOutput && u.kernels.takesBF16(precision, layouts.output) {
                needs.need(u.convOutBF16, count, "\(u.name) output (bf16)")
            } else {
                needs.need(u.convOut, count, "\(u.name) output")
            }
            workspaceCount = max(workspaceCount, Convolution.workspaceCount(g, precision: precision))
            if outputs.floats { needs.need(u.output, count, "\(u.name) unit output") }
            if outputs.halves { needs.need(u.outputBF16, count, "\(u.name) unit output (bf16)") }
            needs.need(u.gradOutput, count, "\(u.name) unit output gradient")
            if u.kernels.takesBF16(precision, layouts.output) {
                needs.need(rooms.convGradientBF16, count, "\(u.name) output gradient (bf16)")
            } else {
                needs.need(rooms.convGradient, count, "\(u.name) output gradient")
            }
            return g.outHeight
        }
        let s1 = try unit(stem, height: size, layouts: Convolution.Layouts(input: .nchw, output: layout), outputs: (true, false))
        let s2 = MaxPool2d.outputSize(s1, kernel: 3, stride: 2, padding: 1)
        let pooled = batch * config.width * s2 * s2
        needs.need(poolOutput, pooled, "max pool output")
        needs.need(poolIndices, pooled, "max pool indices")
        needs.need(poolGrad, pooled, "max pool output gradient")
        if bf16Copies { needs.need(poolOutputBF16, pooled, "max pool output (bf16)") }
        var height = s2
        for (k, block) in blocks.enumerated() {
            var h = height
            for (j, u) in block.units.enumerated() {
                let halves = j + 1 < block.units.count && block.units[j + 1].kernels.takesBF16(precision, layout)
                h = try unit(u, height: h, layouts: Convolution.Layouts(layout), outputs: (!halves, halves))
            }
            if let d = block.downsample { _ = try unit(d, height: height, layouts: Convolution.Layouts(layout), outputs: (true, false)) }
            let count = batch * block.outChannels * h * h
            needs.need(block.output, count, "\(block.name) output")
            if bf16Copies && k + 1 < blocks.count { needs.need(block.outputBF16, count, "\(block.name) output (bf16)") }
            needs.need(block.gradOutput, count, "\(block.name) output gradient")
            height = h
        }
        needs.need(features, batch * featureCount, "features")
        needs.need(workspace, workspaceCount, "convolution workspace")
        return needs
    }

    /// How many times a buffer of this network outgrew its planned room (0 where the plan is right).
    public var outgrownRooms: Int {
        var count = poolOutput.outgrown + poolGrad.outgrown + features.outgrown + workspace.outgrown + inputImages.outgrown
            + rooms.convGradient.outgrown + poolOutputBF16.outgrown + rooms.convGradientBF16.outgrown + poolIndices.outgrown
        for u in [stem] + blocks.flatMap(\.allUnits) {
            count += u.convOut.outgrown + u.output.outgrown + u.gradOutput.outgrown + u.outputBF16.outgrown + u.convOutBF16.outgrown
        }
        for b in blocks { count += b.output.outgrown + b.gradOutput.outgrown + b.outputBF16.outgrown }
        return count
    }

    /// The plan's table: each room with its size and users (`convirt bench step --verbose`, tests).
    public var activationTable: [String] { plan?.description ?? [] }
}
