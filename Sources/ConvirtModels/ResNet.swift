// ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) in torchvision's exact
// architecture and parameter names: 7x7/2 stem, 3x3/2 max pool, four stages of basic or bottleneck
// blocks (stride on the 3x3 convolution, downsample = 1x1 conv + BN), global average pool. The output
// is the pooled feature vector (torchvision's `fc` is not part of the encoder). The activations between
// layers are NCHW, or NHWC or nChw16c where oneDNN's convolutions prefer those (`Convolution.layout`);
// the images enter as NCHW and the features leave as [B, C] in every layout.

import ConvirtCore

public struct ResNetConfig: Codable, Sendable, Equatable {
    public enum Block: String, Codable, Sendable { case basic, bottleneck }

    /// Blocks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
    public var layers: [Int]
    /// Channels of the stem, and planes of the first stage (64 in torchvision).
    public var width: Int
    public var block: Block
    /// Side of the square input images.
    public var imageSize: Int

    enum CodingKeys: String, CodingKey { case layers, width, block, imageSize = "image_size" }

    public init(layers: [Int], width: Int = 64, block: Block, imageSize: Int = 224) {
        self.layers = layers; self.width = width; self.block = block; self.imageSize = imageSize
    }

    public static let resnet18 = ResNetConfig(layers: [2, 2, 2, 2], block: .basic)
    public static let resnet34 = ResNetConfig(layers: [3, 4, 6, 3], block: .basic)
    public static let resnet50 = ResNetConfig(layers: [3, 4, 6, 3], block: .bottleneck)
    public static let resnet101 = ResNetConfig(layers: [3, 4, 23, 3], block: .bottleneck)

    public var expansion: Int { block == .bottleneck ? 4 : 1 }
    /// Size of the pooled feature vector: 2048 for ResNet-50.
    public var featureCount: Int { width * 8 * expansion }

    public func validate() throws {
        try require(layers.count == 4 && layers.allSatisfy { $0 >= 1 }, "resnet config", "layers must be four positive block counts, got \(layers)")
        try require(layers.allSatisfy { $0 <= 256 }, "resnet config", "layers \(layers): more than 256 blocks in a stage")
        try require(width >= 1 && width <= 4096, "resnet config", "width must be in 1...4096, got \(width)")
        try require(imageSize >= 32, "resnet config", "image size \(imageSize) is below 32, the network's total stride")
        try require(imageSize <= 8192, "resnet config", "image size \(imageSize) is above 8192")
    }
}

/// Batch norm over [N, C, H, W] (or [N, H, W, C], the pass's layout) with its parameters and running
/// statistics in the arena.
final class BatchNormLayer {
    let weight, bias, runningMean, runningVar: ParameterLayout.Entry
    let channels: Int
    let eps: Float = 1e-5, momentum: Float = 0.1
    let mean: Scratch<Float>, invStd: Scratch<Float>, statistics: Scratch<Double>
    var globalCount = 0

    init(_ layout: inout ParameterLayout, _ name: String, channels: Int) throws {
        self.channels = channels
        weight = try layout.add("\(name).weight", shape: [channels])
        bias = try layout.add("\(name).bias", shape: [channels])
        runningMean = try layout.add("\(name).running_mean", shape: [channels], kind: .buffer)
        runningVar = try layout.add("\(name).running_var", shape: [channels], kind: .buffer)
        mean = Scratch(channels); invStd = Scratch(channels); statistics = Scratch(2 * channels + 1)
    }

    /// torchvision's initialisation: weight 1, bias 0, running mean 0, running variance 1.
    func initialize(_ arena: ParameterArena) {
        let p = arena.mutableParams
        (p + weight.offset).update(repeating: 1, count: channels)
        (p + bias.offset).update(repeating: 0, count: channels)
        (p + runningMean.offset).update(repeating: 0, count: channels)
        (p + runningVar.offset).update(repeating: 1, count: channels)
    }

    /// The layer's parameters and running statistics in `arena` (which training updates).
    func parameters(_ arena: ParameterArena) -> BatchNorm2d.Parameters {
        let p = arena.trainingParams
        return BatchNorm2d.Parameters(gamma: p + weight.offset, beta: p + bias.offset, runningMean: p + runningMean.offset,
                                      runningVar: p + runningVar.offset)
    }

    /// A pass over `batch` images of `plane` pixels in `layout`.
    func shape(batch: Int, plane: Int, layout: ActivationLayout) -> BatchNorm2d.Shape {
        BatchNorm2d.Shape(batch: batch, channels: channels, plane: plane, layout: layout, eps: eps, momentum: momentum)
    }

    /// With `relu`, the output is max(bn(input), 0) (the ReLU after it, fused). The output as floats, as
    /// bf16 bits (outside NCHW), or both.
    func forward(_ arena: ParameterArena, output: BatchNorm2d.Destination, input: RowValues, shape: BatchNorm2d.Shape, relu: Bool,
                 context: PassContext) throws {
        if context.training {
            var saved = BatchNorm2d.Saved(mean: mean.pointer, invStd: invStd.pointer,
                                          statistics: UnsafeMutableBufferPointer(start: statistics.pointer, count: 2 * channels + 1))
            try BatchNorm2d.forwardTraining(shape, output: output, input: input, parameters: parameters(arena), saved: &saved,
                                            reducer: context.reducer, relu: relu)
            globalCount = saved.globalCount
        } else {
            BatchNorm2d.forwardInference(shape, output: output, input: input, parameters: parameters(arena), relu: relu)
        }
    }

    /// Overwrites gradInput, or writes its bf16 bits (accumulates the parameters' gradients). `relu`: the
    /// forward ran with `relu` (the gradient then flows where its output was positive, a gate batch
    /// norm's backward recomputes from the input).
    func backward(_ arena: ParameterArena, gradInput: BatchNorm2d.Destination, gradOutput: RowValues, input: RowValues,
                  relu: Bool, shape: BatchNorm2d.Shape, context: PassContext) throws {
        let g = arena.grads, gradients = BatchNorm2d.ParameterGradients(gamma: g + weight.offset, beta: g + bias.offset)
        if context.training {
            var saved = BatchNorm2d.Saved(mean: mean.pointer, invStd: invStd.pointer,
                                          statistics: UnsafeMutableBufferPointer(start: statistics.pointer, count: 2 * channels + 1))
            saved.globalCount = globalCount
            try BatchNorm2d.backwardTraining(shape, gradInput: gradInput, gradients: gradients, gradOutput: gradOutput.floats,
                                             gradOutputBF16: gradOutput.halves, input: input,
                                             gamma: arena.params + weight.offset, beta: arena.params + bias.offset, saved: saved,
                                             reducer: context.reducer, relu: relu, accumulate: false)
        } else {
            BatchNorm2d.backwardInference(shape, gradInput: gradInput, gradients: gradients, gradOutput: gradOutput.floats,
                                          gradOutputBF16: gradOutput.halves, input: input, parameters: parameters(arena), relu: relu,
                                          accumulate: false)
        }
    }
}

/// An activation as the layers after it read it: its floats, and its bf16 bits where convolutions on
/// oneDNN's bf16 kernels read it (`Convolution.takesBF16`); either may be absent where no layer reads it.
struct Activation {
    var floats: UnsafePointer<Float>?
    var halves: UnsafePointer<UInt16>?
}

/// Buffers the layers of one network take turns with, each held once at its largest user's size.
/// - The convolution's output gradient lives only inside its unit's backward call, from batch norm's
///   backward to the convolution's (floats, or bf16 where the convolution reads bf16): one room.
/// - The output gradients of the units inside a residual block live from the backward of the layer
///   after a unit to the unit's own: the block's units take turns with two rooms (the last unit the
///   first, its predecessor the second, and so on; the downsample the second, consumed before the
///   units run), which every block reuses; two more take the same turns where a bf16 pass keeps those
///   gradients as bf16 bits.
/// - The blocks' output gradients: block k's in room k % 2, written by the backward of block k + 1 (its
///   first writer overwrites) and read by block k's, while block k + 1 reads the other room; two more
///   take the same turns where a bf16 pass keeps them as bf16 bits (with the part, below).
/// - The outputs of the blocks' last units and of their downsamples are read only by the block's
///   residual sum, in forward (neither has a ReLU whose mask backward reads): two rooms, and two more
///   where a bf16 pass keeps them as bf16 bits.
/// (Each layer consumes its output gradient before it writes its input's, so one room would hold the
/// values; two keep apart what one layer's backward reads and what it writes: the residual end's
/// branch and identity gradients, a unit's output and input gradients, a block's and its input's.)
final class SharedRooms {
    let convGradient = Scratch<Float>(), convGradientBF16 = Scratch<UInt16>()
    private let unitGradients = (Scratch<Float>(), Scratch<Float>())
    private let unitGradientsBF16 = (Scratch<UInt16>(), Scratch<UInt16>())
    private let blockGradients = (Scratch<Float>(), Scratch<Float>())
    private let blockGradientsBF16 = (Scratch<UInt16>(), Scratch<UInt16>())
    private let blockGradientParts = Scratch<Float>(), blockGradientPartsBF16 = Scratch<UInt16>()
    private let sumInputs = (branch: Scratch<Float>(), identity: Scratch<Float>())
    private let sumInputsBF16 = (branch: Scratch<UInt16>(), identity: Scratch<UInt16>())
    /// false: every unit and block gets a room of its own (the same values, more memory).
    let shares: Bool
    init(shares: Bool) { self.shares = shares }

    private func room<T>(_ shared: Scratch<T>) -> Scratch<T> { shares ? shared : Scratch<T>() }

    /// The output gradient's room of unit `k` of a block of `count` units (the downsample: `count`).
    func unitGradient(_ k: Int, of count: Int) -> Scratch<Float> {
        room(k == count || (count - 1 - k) % 2 == 1 ? unitGradients.1 : unitGradients.0)
    }

    /// The room of that gradient's bf16 bits, where a pass keeps it so (the same turns).
    func unitGradientBF16(_ k: Int, of count: Int) -> Scratch<UInt16> {
        room(k == count || (count - 1 - k) % 2 == 1 ? unitGradientsBF16.1 : unitGradientsBF16.0)
    }

    /// Block k's output gradient.
    func blockGradient(_ k: Int) -> Scratch<Float> { room(k % 2 == 0 ? blockGradients.0 : blockGradients.1) }

    /// The room of its bf16 bits, where a pass keeps it so (the same turns).
    func blockGradientBF16(_ k: Int) -> Scratch<UInt16> { room(k % 2 == 0 ? blockGradientsBF16.0 : blockGradientsBF16.1) }

    /// The part of a block's output gradient that the next block's first unit writes (one room for all:
    /// each block reads its part before its own first unit writes the previous block's).
    func blockGradientPart() -> Scratch<Float> { room(blockGradientParts) }

    /// The room of that part's bf16 bits, where a pass keeps it so.
    func blockGradientPartBF16() -> Scratch<UInt16> { room(blockGradientPartsBF16) }

    /// The output room of a block's last unit (`identity` false) or of its downsample.
    func sumInput(identity: Bool) -> Scratch<Float> { room(identity ? sumInputs.identity : sumInputs.branch) }

    /// The room of that output's bf16 bits, where a bf16 pass keeps it so.
    func sumInputBF16(identity: Bool) -> Scratch<UInt16> { room(identity ? sumInputsBF16.identity : sumInputsBF16.branch) }
}

/// conv (no bias) -> batch norm -> optional ReLU, the unit ResNet is made of. It owns its activations
/// (the convolution's output, the unit's output) and its output's gradient.
final class ConvBNUnit {
    /// The convolution's name (`layer1.0.conv1`), for the plan's table of rooms.
    let name: String
    let conv: ParameterLayout.Entry
    let bn: BatchNormLayer
    let inChannels, outChannels, kernel, stride, padding: Int
    let relu: Bool
    /// The convolution's output, read by batch norm forward and backward: its floats, or its bf16 bits
    /// where the convolution runs on oneDNN's bf16 kernels outside NCHW (`keepsBF16ConvOutput`).
    let convOut = Scratch<Float>(), convOutBF16 = Scratch<UInt16>()
    /// Whether a bf16 convolution on oneDNN's kernels outside NCHW writes its output as bf16 bits
    /// (default true; false writes the floats and rounds them to bf16 in place: the same values).
    var keepsBF16ConvOutput = true
    /// The convolution's output as batch norm reads it in `step`: its floats, or its bf16 bits.
    func convOutput(_ step: UnitStep) -> RowValues {
        step.convHalves ? .bf16(convOutBF16.pointer) : .fp32(convOut.pointer)
    }
    /// Batch norm's pass in `step`: the convolution's output in its layout.
    func normShape(_ step: UnitStep) -> BatchNorm2d.Shape {
        bn.shape(batch: step.geometry.batch, plane: step.geometry.outPlane, layout: step.layouts.output)
    }
    /// The network's rooms (the convolution's output gradient is always in the shared one).
    let rooms: SharedRooms
    /// The output (floats, and bf16 bits): the unit's own, or, where only the residual sum of its block
    /// reads it, a room every block's unit in that place shares (`SharedRooms.sumInput`, `sumInputBF16`).
    let output: Scratch<Float>
    let outputBF16: Scratch<UInt16>
    /// The output's gradient: the unit's own, or a room it shares with units whose gradients live at
    /// other times (`SharedRooms.unitGradient`); and the room of its bf16 bits, where a pass keeps them
    /// instead (`UnitStep.gradOutputHalves`).
    let gradOutput: Scratch<Float>
    let gradOutputBF16: Scratch<UInt16>
    /// oneDNN's primitives or im2col + sgemm, per geometry (`Convolution.policy`).
    let kernels = Convolution()

    init(_ layout: inout ParameterLayout, conv convName: String, bn bnName: String, inChannels: Int, outChannels: Int,
         kernel: Int, stride: Int, padding: Int, relu: Bool, rooms: SharedRooms, gradOutput: Scratch<Float>? = nil,
         gradOutputBF16: Scratch<UInt16>? = nil, output: Scratch<Float>? = nil, outputBF16: Scratch<UInt16>? = nil) throws {
        // A shared output is gone by backward: only a unit without a ReLU (read by the residual sum alone, in forward) may have one.
        precondition(output == nil && outputBF16 == nil || !relu, "\(convName): a unit with a ReLU keeps its own output")
        self.rooms = rooms
        self.name = convName
        self.gradOutput = gradOutput ?? Scratch<Float>()
        self.gradOutputBF16 = gradOutputBF16 ?? Scratch<UInt16>()
        self.output = output ?? Scratch<Float>()
        self.outputBF16 = outputBF16 ?? Scratch<UInt16>()
        conv = try layout.add("\(convName).weight", shape: [outChannels, inChannels, kernel, kernel])
        bn = try BatchNormLayer(&layout, bnName, channels: outChannels)
        self.inChannels = inChannels; self.outChannels = outChannels
        self.kernel = kernel; self.stride = stride; self.padding = padding; self.relu = relu
    }

    /// Kaiming normal (fan_out, ReLU gain), as torchvision initialises its convolutions.
    func initialize(_ arena: ParameterArena, stream: RandomStream) {
        let std = (2 / Float(outChannels * kernel * kernel)).squareRoot()
        let w = arena.mutableParams + conv.offset
        stream.fillNormal(w, count: conv.count, scale: std)
        bn.initialize(arena)
    }


    /// The unit's output in `step`, in the copies it writes.
    func output(_ step: UnitStep) -> Activation {
        Activation(floats: step.outputs.floats ? UnsafePointer(output.pointer) : nil,
                   halves: step.outputs.halves ? UnsafePointer(outputBF16.pointer) : nil)
    }

    /// conv -> batch norm (-> ReLU) as the plan's `step` says: its geometry and layouts, the copies of the
    /// output to write, whether the convolution writes bf16 bits and reads the input's. In bf16 batch
    /// norm reads the convolution's output rounded to bf16, as autocast's convolutions return it: written
    /// so by oneDNN's bf16 kernels (each float rounded to nearest even), or rounded here.
    /// `zeroGradient`: whether `gradOutput` is set to zero for the layers after this unit to accumulate
    /// into (false where its owner overwrites it before `backward`).
    @discardableResult
    func forward(_ arena: ParameterArena, input: Activation, step: UnitStep, workspace: Scratch<Float>, zeroGradient: Bool = true,
                 context: PassContext) throws -> Activation {
        let g = step.geometry, count = g.outputCount
        let c = step.convHalves ? nil : convOut.ensure(count), c16 = step.convHalves ? convOutBF16.ensure(count) : nil
        try kernels.forward(output: c, outputBF16: c16, input: input.floats, inputBF16: step.inputHalves ? input.halves : nil,
                            weight: arena.params + conv.offset, geometry: g,
                            workspace: workspace.ensure(Convolution.workspaceCount(g, precision: context.precision)), precision: context.precision,
                            layouts: step.layouts)
        if context.precision == .bf16, let c { BF16.round(c, c, count: count) }
        let y = step.outputs.floats ? output.ensure(count) : nil, y16 = step.outputs.halves ? outputBF16.ensure(count) : nil
        let x = convOutput(step)
        try bn.forward(arena, output: BatchNorm2d.Destination(floats: y, halves: y16), input: x, shape: normShape(step), relu: relu,
                       context: context)
        if step.gradOutputHalves {
            precondition(!zeroGradient, "\(name): a gradient kept in bf16 is written whole")
            gradOutputBF16.ensure(count)
        } else if zeroGradient {
            gradOutput.zeroed(count)
        } else {
            gradOutput.ensure(count)
        }
        return output(step)
    }

    /// Where the layers after this unit write its output gradient in `step`: the floats, or the bf16 bits.
    func gradientDestination(_ step: UnitStep) -> BatchNorm2d.Destination {
        step.gradOutputHalves ? BatchNorm2d.Destination(halves: gradOutputBF16.pointer) : .floats(gradOutput.pointer)
    }

    /// Consumes `gradOutput` (filled by the layers after this unit; its floats rounded to bf16 here where
    /// `step.roundsGradient`, or its bf16 bits) and accumulates into gradInput, or overwrites it where
    /// `accumulate` is false (the gradient of an input no other layer reads); gradInput's bf16 bits are
    /// written instead where the unit before keeps its gradient so. Where the convolution reads its
    /// output gradient in bf16 (`step.gradHalves`), batch norm's backward writes only those bits.
    func backward(_ arena: ParameterArena, gradInput: BatchNorm2d.Destination, input: Activation, step: UnitStep,
                  workspace: Scratch<Float>, accumulate: Bool = true, context: PassContext) throws {
        let g = step.geometry, count = g.outputCount
        let x = convOutput(step)
        let dc = step.gradHalves ? nil : rooms.convGradient.ensure(count), dc16 = step.gradHalves ? rooms.convGradientBF16.ensure(count) : nil
        if step.roundsGradient && !step.gradOutputHalves { BF16.round(gradOutput.pointer, gradOutput.pointer, count: count) }
        try bn.backward(arena, gradInput: BatchNorm2d.Destination(floats: dc, halves: dc16),
                        gradOutput: step.gradOutputHalves ? .bf16(gradOutputBF16.pointer) : .fp32(gradOutput.pointer), input: x,
                        relu: relu, shape: normShape(step), context: context)
        precondition(gradInput.halves == nil || !accumulate, "\(name): a bf16 input gradient is written whole")
        try kernels.backward(gradInput: gradInput.floats, gradInputBF16: gradInput.halves, gradWeight: arena.grads + conv.offset,
                             gradOutput: dc.map { UnsafePointer($0) }, gradOutputBF16: dc16.map { UnsafePointer($0) }, input: input.floats,
                             inputBF16: step.inputHalves ? input.halves : nil,
                             weight: arena.params + conv.offset, geometry: g,
                             workspace: workspace.ensure(Convolution.workspaceCount(g, precision: context.precision)), precision: context.precision,
                             layouts: step.layouts, accumulateInput: accumulate, overwriteWeight: arena.claimZeroedGradient(conv),
                             pieceImages: context.pieceRows(perSample: 1))
    }
}

/// A residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4), plus the
/// downsample branch when the shape changes; out = relu(branch + identity).
final class ResidualBlock {
    let name: String
    let units: [ConvBNUnit]
    let downsample: ConvBNUnit?
    let outChannels: Int
    let output = Scratch<Float>(), outputBF16 = Scratch<UInt16>()
    /// The output's gradient, in the room this block shares with every other block but its neighbours, and
    /// the room of its bf16 bits, where a pass keeps it so (`BlockStep.gradOutputHalves`).
    let gradOutput: Scratch<Float>
    let gradOutputBF16: Scratch<UInt16>
    /// Where the next block takes its input in two parts (`BlockStep.gradOutputInParts`), the part its
    /// first unit writes (floats or bits, as `gradOutput`); `gradOutput` holds the identity's (or the
    /// downsample's). Its residual backward adds the two as it reads them, the bits of adding one into the
    /// other first, a pass fewer.
    let gradOutputPart: Scratch<Float>
    let gradOutputPartBF16: Scratch<UInt16>

    init(_ layout: inout ParameterLayout, _ name: String, block: ResNetConfig.Block, inChannels: Int, planes: Int, stride: Int,
         rooms: SharedRooms, gradOutput: Scratch<Float>, gradOutputBF16: Scratch<UInt16>) throws {
        self.name = name
        self.gradOutput = gradOutput
        self.gradOutputBF16 = gradOutputBF16
        gradOutputPart = rooms.blockGradientPart()
        gradOutputPartBF16 = rooms.blockGradientPartBF16()
        let n = block == .basic ? 2 : 3
        func room(_ k: Int) -> Scratch<Float> { rooms.unitGradient(k, of: n) }
        func roomBF16(_ k: Int) -> Scratch<UInt16> { rooms.unitGradientBF16(k, of: n) }
        switch block {
        case .basic:
            units = [
                try ConvBNUnit(&layout, conv: "\(name).conv1", bn: "\(name).bn1", inChannels: inChannels, outChannels: planes, kernel: 3, stride: stride, padding: 1, relu: true, rooms: rooms, gradOutput: room(0), gradOutputBF16: roomBF16(0)),
                try ConvBNUnit(&layout, conv: "\(name).conv2", bn: "\(name).bn2", inChannels: planes, outChannels: planes, kernel: 3, stride: 1, padding: 1, relu: false, rooms: rooms, gradOutput: room(1), gradOutputBF16: roomBF16(1),
                               output: rooms.sumInput(identity: false), outputBF16: rooms.sumInputBF16(identity: false)),
            ]
            outChannels = planes
        case .bottleneck:
            units = [
                try ConvBNUnit(&layout, conv: "\(name).conv1", bn: "\(name).bn1", inChannels: inChannels, outChannels: planes, kernel: 1, stride: 1, padding: 0, relu: true, rooms: rooms, gradOutput: room(0), gradOutputBF16: roomBF16(0)),
                try ConvBNUnit(&layout, conv: "\(name).conv2", bn: "\(name).bn2", inChannels: planes, outChannels: planes, kernel: 3, stride: stride, padding: 1, relu: true, rooms: rooms, gradOutput: room(1), gradOutputBF16: roomBF16(1)),
                try ConvBNUnit(&layout, conv: "\(name).conv3", bn: "\(name).bn3", inChannels: planes, outChannels: planes * 4, kernel: 1, stride: 1, padding: 0, relu: false, rooms: rooms, gradOutput: room(2), gradOutputBF16: roomBF16(2),
                               output: rooms.sumInput(identity: false), outputBF16: rooms.sumInputBF16(identity: false)),
            ]
            outChannels = planes * 4
        }
        if stride != 1 || inChannels != outChannels {
            downsample = try ConvBNUnit(&layout, conv: "\(name).downsample.0", bn: "\(name).downsample.1", inChannels: inChannels,
                                        outChannels: outChannels, kernel: 1, stride: stride, padding: 0, relu: false, rooms: rooms,
                                        gradOutput: room(n), gradOutputBF16: roomBF16(n), output: rooms.sumInput(identity: true),
                                        outputBF16: rooms.sumInputBF16(identity: true))
        } else {
            downsample = nil
        }
    }

    var allUnits: [ConvBNUnit] { units + (downsample.map { [$0] } ?? []) }

    /// The block's output in `step`: its bf16 bits where the next block's convolutions read them, else its floats.
    func output(_ step: BlockStep) -> Activation {
        step.outputHalves ? Activation(halves: UnsafePointer(outputBF16.pointer)) : Activation(floats: UnsafePointer(output.pointer))
    }

    /// The block's output as its residual backward reads it (the ReLU's gate).
    private func outputValues(_ step: BlockStep) -> RowValues {
        step.outputHalves ? .bf16(outputBF16.pointer) : .fp32(output.pointer)
    }

    /// Residual sums and ReLUs are pointwise: the same in either layout. Inside the block, a unit whose
    /// only reader is the next unit's convolution writes only its bf16 bits where that reads them. In a
    /// bf16 pass the residual stream holds bf16 values, as autocast's does: the sum's inputs (the last
    /// unit's and the downsample's batch norm outputs, or the block's input) and its output are rounded
    /// to bf16, kept as bits where the convolutions read bits (`step`), else as rounded floats.
    func forward(_ arena: ParameterArena, input: Activation, step: BlockStep, workspace: Scratch<Float>, context: PassContext) throws -> Activation {
        var x = input
        // Every unit's output gradient is written whole by `backward`: the last unit's and the
        // downsample's by the residual's ReLU, the others' by the next unit's convolution (overwriting).
        for (unit, unitStep) in zip(units, step.units) {
            x = try unit.forward(arena, input: x, step: unitStep, workspace: workspace, zeroGradient: false, context: context)
        }
        let identity = try downsample.map { d in
            try d.forward(arena, input: input, step: step.downsample!, workspace: workspace, zeroGradient: false, context: context)
        } ?? input
        let count = step.count
        func values(_ a: Activation) -> RowValues { a.halves.map { .bf16($0) } ?? .fp32(a.floats!) }
        Residual.forwardReLU(output: step.outputHalves ? BatchNorm2d.Destination(halves: outputBF16.ensure(count)) : .floats(output.ensure(count)),
                             values(x), values(identity), rounding: context.precision == .bf16, count: count)
        if step.gradOutputHalves { gradOutputBF16.ensure(count) } else { gradOutput.ensure(count) }
        return output(step)
    }

    /// Where the next block's backward writes this block's output gradient in `step` (the identity's or the
    /// downsample's part): its floats, or its bf16 bits.
    func gradientDestination(_ step: BlockStep) -> BatchNorm2d.Destination {
        step.gradOutputHalves ? BatchNorm2d.Destination(halves: gradOutputBF16.pointer) : .floats(gradOutput.pointer)
    }

    /// Where the next block's first unit writes the other part.
    func gradientPartDestination(_ step: BlockStep) -> BatchNorm2d.Destination {
        step.gradOutputHalves ? BatchNorm2d.Destination(halves: gradOutputPartBF16.pointer) : .floats(gradOutputPart.pointer)
    }

    /// Consumes gradOutput (and its part, `step.gradOutputInParts`) and writes gradInput (the previous
    /// layer's gradOutput, whose only reader is this block): the identity's gradient or the downsample's
    /// overwrites it; the first unit's overwrites `gradInputPart` where given, else adds to gradInput (its
    /// floats). In a bf16 pass the gradients of the residual stream are bf16 values, as autocast's: the
    /// parts are rounded to bf16, then their sum (kept as bits where `step` says, else as rounded floats).
    func backward(_ arena: ParameterArena, gradInput: BatchNorm2d.Destination, gradInputPart: BatchNorm2d.Destination?, input: Activation,
                  step: BlockStep, workspace: Scratch<Float>, context: PassContext) throws {
        let count = step.count
        // d(branch) = d(identity) = dy masked by the final ReLU, in one pass.
        let n = units.count, last = units[n - 1]
        let dy: RowValues = step.gradOutputHalves ? .bf16(gradOutputBF16.pointer) : .fp32(gradOutput.pointer)
        let part: RowValues? = !step.gradOutputInParts ? nil
            : step.gradOutputHalves ? .bf16(gradOutputPartBF16.pointer) : .fp32(gradOutputPart.pointer)
        let rounding = context.precision == .bf16
        if let downsample {
            Residual.backwardReLU(gradBranch: last.gradientDestination(step.units[n - 1]),
                                  gradIdentity: downsample.gradientDestination(step.downsample!), accumulateIdentity: false,
                                  gradOutput: dy, gradOutputPart: part, rounding: rounding, output: outputValues(step), count: count)
            try downsample.backward(arena, gradInput: gradInput, input: input, step: step.downsample!, workspace: workspace,
                                    accumulate: false, context: context)
        } else {
            Residual.backwardReLU(gradBranch: last.gradientDestination(step.units[n - 1]), gradIdentity: gradInput, accumulateIdentity: false,
                                  gradOutput: dy, gradOutputPart: part, rounding: rounding, output: outputValues(step), count: count)
        }
        for k in stride(from: n - 1, through: 0, by: -1) {
            let unitInput = k == 0 ? input : units[k - 1].output(step.units[k - 1])
            let unitGradInput = k == 0 ? gradInputPart ?? gradInput : units[k - 1].gradientDestination(step.units[k - 1])
            try units[k].backward(arena, gradInput: unitGradInput, input: unitInput, step: step.units[k], workspace: workspace,
                                  accumulate: k == 0 && gradInputPart == nil, context: context)
        }
    }
}

/// The image encoder: images [B, 3, S, S] -> features [B, featureCount].
public final class ResNet {
    public let config: ResNetConfig
    public let prefix: String
    let stem: ConvBNUnit
    let blocks: [ResidualBlock]
    /// The arena ranges of the stem's and of each block's parameters (announced as final in backward).
    let stemRange: Range<Int>
    let blockRanges: [Range<Int>]
    let poolOutput = Scratch<Float>(), poolOutputBF16 = Scratch<UInt16>(), poolIndices = Scratch<Int32>(), poolGrad = Scratch<Float>()
    let features = Scratch<Float>()
    let workspace = Scratch<Float>()
    let rooms: SharedRooms
    /// The layout to keep the activations in; nil (the default): `Convolution.layout`'s choice for the
    /// pass's precision. NHWC and nChw16c run every convolution on oneDNN (in fp32 too); nChw16c falls
    /// back to NCHW where the width is no multiple of 16.
    public var activationLayout: ActivationLayout?
    /// Whether the activations that convolutions on oneDNN's bf16 kernels read are kept as bf16 bits,
    /// written by the layer before (its batch norm, residual sum or max pool) instead of reordered from
    /// the floats at each convolution, and the output gradients they read written as bf16 by batch
    /// norm's backward (default true; false reorders as oneDNN's fp32 -> bf16 reorder rounds: the same
    /// bits, which ResNetTests check).
    public var keepsBF16Activations = true {
        didSet { for unit in [stem] + blocks.flatMap(\.allUnits) { unit.keepsBF16ConvOutput = keepsBF16Activations } }
    }
    /// A copy of the images of the last forward pass, which the stem's backward reads (the caller's
    /// buffer may be gone by then).
    let inputImages = Scratch<Float>()
    /// The rooms of the largest pass so far, in one activation arena (`BufferPlan`), and the last pass
    /// planned: every layer's decisions (`ResNetPass`), which backward follows as forward did.
    var plan: BufferPlan?
    var pass: ResNetPass?

    /// Registers every parameter and buffer under `prefix` (e.g. "image.") with torchvision's names.
    /// `sharesGradientRooms` (default true): the units' and blocks' output gradients, and the outputs
    /// that only a residual sum reads, take turns with the network's shared rooms (`SharedRooms`);
    /// false gives each its own (the same values, more memory: the check that the turns never overlap).
    public init(config: ResNetConfig, layout: inout ParameterLayout, prefix: String = "", sharesGradientRooms: Bool = true) throws {
        try config.validate()
        self.config = config
        self.prefix = prefix
        let rooms = SharedRooms(shares: sharesGradientRooms)
        self.rooms = rooms
        (stem, stemRange) = try layout.group {
            try ConvBNUnit(&$0, conv: "\(prefix)conv1", bn: "\(prefix)bn1", inChannels: 3, outChannels: config.width,
                           kernel: 7, stride: 2, padding: 3, relu: true, rooms: rooms)
        }
        var blocks: [ResidualBlock] = []
        var ranges: [Range<Int>] = []
        var inChannels = config.width
        for (stage, count) in config.layers.enumerated() {
            let planes = config.width << stage
            for i in 0..<count {
                let (block, range) = try layout.group {
                    try ResidualBlock(&$0, "\(prefix)layer\(stage + 1).\(i)", block: config.block, inChannels: inChannels,
                                      planes: planes, stride: i == 0 && stage > 0 ? 2 : 1, rooms: rooms,
                                      gradOutput: rooms.blockGradient(blocks.count), gradOutputBF16: rooms.blockGradientBF16(blocks.count))
                }
                inChannels = block.outChannels
                blocks.append(block)
                ranges.append(range)
            }
        }
        self.blocks = blocks
        self.blockRanges = ranges
    }

    public var featureCount: Int { config.featureCount }

    /// torchvision's initialisation (Kaiming normal convolutions, BN weight 1 and bias 0), from `stream`.
    public func initialize(_ arena: ParameterArena, stream: RandomStream) {
        stem.initialize(arena, stream: stream.child(0))
        for (b, block) in blocks.enumerated() {
            for (u, unit) in block.allUnits.enumerated() { unit.initialize(arena, stream: stream.child(UInt64(b + 1), UInt64(u))) }
        }
    }

    /// The layout of a pass's activations in `precision`: `activationLayout`, else `Convolution.layout`'s
    /// choice; NCHW where the bf16 emulation runs (it reads NCHW) or the width is no multiple of 16 in nChw16c.
    func passLayout(_ precision: Precision) -> ActivationLayout {
        let layout = activationLayout ?? Convolution.layout(precision: precision, nativeBF16: stem.kernels.nativeBF16)
        if layout != .nchw && precision == .bf16 && !stem.kernels.nativeBF16 { return .nchw }
        // Every activation after the stem has a multiple of the width's channels.
        return layout.holds(channels: config.width) ? layout : .nchw
    }

    /// Features [batch, featureCount] of images [batch, 3, S, S] (S = config.imageSize or any size >= 32).
    /// The images are borrowed for this call: forward copies them into the arena's `images` room, where
    /// backward reads them. The features are a view of the arena, valid until the next forward.
    public func forward(_ arena: ParameterArena, images: UnsafePointer<Float>, batch: Int, size: Int,
                        context: PassContext) throws -> UnsafePointer<Float> {
        try require(batch >= 1, "resnet", "batch must be positive")
        try require(size >= 32, "resnet", "image size \(size) is below 32")
        let pass = try preparePlan(batch: batch, size: size, precision: context.precision)
        let layout = pass.key.layout, planes = batch * config.width
        // Backward may follow in either mode (parity fixtures differentiate evaluation mode too).
        inputImages.ensure(batch * 3 * size * size).update(from: images, count: batch * 3 * size * size)
        // The images are NCHW; the stem's convolution writes the network's layout.
        let x0 = try stem.forward(arena, input: Activation(floats: images), step: pass.stem, workspace: workspace, context: context).floats!
        let (s1, s2) = (pass.stem.geometry.outHeight, pass.poolSize)
        let pooled = poolOutput.ensure(planes * s2 * s2), indices = poolIndices.ensure(planes * s2 * s2)
        if layout != .nchw {
            let (images, lanes) = layout.pixelRows(batch: batch, channels: config.width)
            MaxPool2d.forwardNHWC(output: pooled, indices: indices, input: x0, batch: images, channels: lanes, height: s1, width: s1)
        } else {
            MaxPool2d.forward(output: pooled, indices: indices, input: x0, planes: planes, height: s1, width: s1)
        }
        poolGrad.ensure(planes * s2 * s2)  // written whole by the first block's backward
        // The blocks' inputs in bf16 too where their convolutions read bf16.
        if pass.pooledHalves { BF16.bits(poolOutputBF16.ensure(planes * s2 * s2), pooled, count: planes * s2 * s2) }
        var x = pooledOutput(pass)
        for (block, step) in zip(blocks, pass.blocks) {
            x = try block.forward(arena, input: x, step: step, workspace: workspace, context: context)
        }
        let f = features.ensure(batch * featureCount), plane = pass.finalSize * pass.finalSize
        if layout != .nchw {
            // [N, C] in either (nChw16c's rows of 16 channels per image follow one another).
            let (images, lanes) = layout.pixelRows(batch: batch, channels: featureCount)
            GlobalAvgPool.forwardNHWC(output: f, input: x.floats!, batch: images, channels: lanes, plane: plane)
        } else {
            GlobalAvgPool.forward(output: f, input: x.floats!, rows: batch * featureCount, plane: plane)
        }
        return UnsafePointer(f)
    }

    /// The max pool's output as the first block reads it in `pass`.
    private func pooledOutput(_ pass: ResNetPass) -> Activation {
        Activation(floats: UnsafePointer(poolOutput.pointer), halves: pass.pooledHalves ? UnsafePointer(poolOutputBF16.pointer) : nil)
    }

    /// Accumulates parameter gradients into arena.grads from gradFeatures [batch, featureCount], following
    /// the last forward pass's plan.
    public func backward(_ arena: ParameterArena, gradFeatures: UnsafePointer<Float>, context: PassContext) throws {
        guard let pass else { preconditionFailure("backward before forward") }
        let layout = pass.key.layout, batch = pass.key.batch, plane = pass.finalSize * pass.finalSize
        let last = blocks[blocks.count - 1]
        last.gradOutput.pointer.update(repeating: 0, count: batch * featureCount * plane)  // pooling's backward adds
        if layout != .nchw {
            let (images, lanes) = layout.pixelRows(batch: batch, channels: featureCount)
            GlobalAvgPool.backwardNHWC(gradInput: last.gradOutput.pointer, gradOutput: gradFeatures, batch: images, channels: lanes, plane: plane)
        } else {
            GlobalAvgPool.backward(gradInput: last.gradOutput.pointer, gradOutput: gradFeatures, rows: batch * featureCount, plane: plane)
        }
        for k in stride(from: blocks.count - 1, through: 0, by: -1) {
            let input = k == 0 ? pooledOutput(pass) : blocks[k - 1].output(pass.blocks[k - 1])
            let gradInput = k == 0 ? .floats(poolGrad.pointer) : blocks[k - 1].gradientDestination(pass.blocks[k - 1])
            let gradInputPart = k == 0 ? nil : blocks[k - 1].gradientPartDestination(pass.blocks[k - 1])
            try blocks[k].backward(arena, gradInput: gradInput, gradInputPart: gradInputPart, input: input, step: pass.blocks[k],
                                   workspace: workspace, context: context)
            try context.gradientsReady?(blockRanges[k])
        }
        let planes = batch * config.width
        let (inPlane, outPlane) = (pass.stem.geometry.outPlane, pass.poolSize * pass.poolSize)
        if layout != .nchw {
            let (images, lanes) = layout.pixelRows(batch: batch, channels: config.width)
            MaxPool2d.backwardNHWC(gradInput: stem.gradOutput.pointer, gradOutput: poolGrad.pointer, indices: poolIndices.pointer,
                                   batch: images, channels: lanes, inPlane: inPlane, outPlane: outPlane)
        } else {
            MaxPool2d.backward(gradInput: stem.gradOutput.pointer, gradOutput: poolGrad.pointer, indices: poolIndices.pointer,
                               planes: planes, inPlane: inPlane, outPlane: outPlane)
        }
        try stem.backward(arena, gradInput: BatchNorm2d.Destination(), input: Activation(floats: inputImages.pointer), step: pass.stem,
                          workspace: workspace, context: context)
        try context.gradientsReady?(stemRange)
    }

    /// Bytes of the activation arena: activations and their gradients at the largest pass planned, each
    /// room once (layers share rooms, `SharedRooms`; `BufferPlan`).
    public var activationBytes: Int { plan?.table.bytes ?? 0 }
}
