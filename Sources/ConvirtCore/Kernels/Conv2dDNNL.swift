// The convolution on oneDNN: forward, backward data and backward weights for one geometry and
// precision. Same contract as `Conv2d.forward` / `Conv2d.backward` (OIHW weights; backward accumulates
// into gradInput, gradWeight and gradBias), with NCHW or NHWC activations: NCHW ones are reordered to
// and from the layouts oneDNN chooses, NHWC ones it reads and writes as they are (ChannelsLast.swift).
// In bf16 the inputs of each product are rounded to bf16 by the reorder at its edge, or arrive as bf16
// copies the caller keeps in the primitive's own layout (`takesBF16Input`, `takesBF16GradOutput`: the
// ResNet's layers write them), and the products accumulate in fp32 (outputs and gradients stay fp32),
// as PyTorch's CPU autocast does.

import CDNNL
import CKernels

/// The arithmetic of convolutions and matrix products.
public enum Precision: String, Codable, Sendable, CaseIterable {
    case fp32
    /// bf16 inputs, fp32 accumulation and outputs.
    case bf16

    var inputType: dnnl_data_type_t { self == .bf16 ? dnnl_bf16 : dnnl_f32 }
}

public final class ConvolutionPrimitives {
    public let geometry: Conv2dGeometry
    public let precision: Precision
    /// The layouts of the caller's input (and input gradient) and output (and output gradient).
    public let inputLayout, outputLayout: ActivationLayout
    /// Whether the forward writes its output as bf16 bits in the caller's layout (bf16 outside NCHW),
    /// each the output's float rounded to nearest even, as autocast's convolutions return bf16.
    public let bf16Output: Bool
    let stream: DNNLStream
    // Forward.
    let forwardPrimitive: DNNLPrimitive
    let source, weights, destination: DNNLArgument
    let bias: DNNLMemory?
    // Backward, created on first use (an evaluation never differentiates).
    private var backwardData: (primitive: DNNLPrimitive, gradOutput: DNNLArgument, weights: DNNLArgument, gradInput: DNNLArgument)?
    /// The same writing the input gradient as bf16 bits (`takesBF16Input`'s layouts), made on first use.
    private var backwardDataBF16: (primitive: DNNLPrimitive, gradOutput: DNNLArgument, weights: DNNLArgument, gradInput: DNNLArgument)?
    /// The input gradient written, not accumulated: straight into the caller's buffer where the layouts agree.
    private var overwrittenGradInput: DNNLArgument?
    /// The weight gradient's primitives, by the images of a piece (`WeightPieces`).
    private var weightPieces: [Int: WeightPieces] = [:]

    public init(geometry g: Conv2dGeometry, precision: Precision = .fp32, bias: Bool = false, inputLayout: ActivationLayout = .nchw,
                outputLayout: ActivationLayout = .nchw, bf16Output: Bool = false) throws {
        precondition(!bf16Output || (precision == .bf16 && outputLayout != .nchw), "\(g): a bf16 output needs bf16 outside NCHW")
        geometry = g
        self.precision = precision
        self.inputLayout = inputLayout
        self.outputLayout = outputLayout
        self.bf16Output = bf16Output
        stream = try DNNLStream()
        let t = precision.inputType
        let (srcTag, dstTag) = Self.innerTags(inputLayout, outputLayout)
        let src = try DNNLDescriptor(g.inputShape, t, srcTag)
        let dst = try DNNLDescriptor(g.outputShape, bf16Output ? dnnl_bf16 : dnnl_f32, dstTag)
        let b = try Self.biasDescriptor(g)
        forwardPrimitive = try DNNLPrimitive("\(g) forward (\(precision))",
                                             try Self.forward(g, source: src, destination: dst, bias: bias ? b : nil, precision: precision))
        source = try DNNLArgument(user: try DNNLDescriptor(g.inputShape, dnnl_f32, Self.userTag(inputLayout)),
                                  primitive: try forwardPrimitive.query(dnnl_query_src_md), role: .input, slot: 0)
        weights = try DNNLArgument(user: try DNNLDescriptor(g.weightShape, dnnl_f32, dnnl_oihw),
                                   primitive: try forwardPrimitive.query(dnnl_query_weights_md), role: .input, slot: 1)
        destination = try DNNLArgument(user: try DNNLDescriptor(g.outputShape, dnnl_f32, Self.userTag(outputLayout)),
                                       primitive: try forwardPrimitive.query(dnnl_query_dst_md), role: .output, slot: 2)
        self.bias = bias ? try DNNLMemory(b, owning: false) : nil
    }

    /// The convolution's spatial parameters as oneDNN's dims: strides, dilations (none), padding.
    private static func spatial(_ g: Conv2dGeometry) -> (strides: [Int64], dilations: [Int64], padding: [Int64]) {
        (dnnlDims([g.strideH, g.strideW]), [0, 0], dnnlDims([g.padH, g.padW]))
    }

    /// The forward (training) operation of `g` from `source` to `destination`, the weights in the layout
    /// oneDNN picks for `precision`: the forward primitive, and the hint every backward primitive of the
    /// same shapes needs.
    private static func forward(_ g: Conv2dGeometry, source: DNNLDescriptor, destination: DNNLDescriptor, bias: DNNLDescriptor?,
                                precision: Precision) throws -> DNNLCreate {
        let wei = try DNNLDescriptor(g.weightShape, precision.inputType, dnnl_format_tag_any)
        let (strides, dilations, padding) = spatial(g)
        return { descriptor, engine, attributes in
            dnnl_convolution_forward_primitive_desc_create(descriptor, engine, dnnl_forward_training, dnnl_convolution_direct, source.md, wei.md,
                                                           bias?.md, destination.md, strides, dilations, padding, padding, attributes)
        }
    }

    /// The caller's layout as a oneDNN tag.
    private static func userTag(_ layout: ActivationLayout) -> dnnl_format_tag_t {
        switch layout {
        case .nchw: dnnl_nchw
        case .nhwc: dnnl_nhwc
        case .blocked16: dnnl_nChw16c
        case .blocked8: dnnl_nChw8c
        }
    }
    /// The primitive's layouts for its source and destination: NHWC on both sides where the caller holds
    /// either so (the stem takes NCHW images: left to oneDNN, NHWC next to an NHWC output picks its
    /// reference kernel); nChw16c or nChw8c where the caller holds that side so (then no reorder transposes
    /// it); else oneDNN's choice (its blocked layouts, which beat NCHW by far).
    private var innerTags: (source: dnnl_format_tag_t, destination: dnnl_format_tag_t) { Self.innerTags(inputLayout, outputLayout) }
    private static func innerTags(_ input: ActivationLayout, _ output: ActivationLayout) -> (source: dnnl_format_tag_t, destination: dnnl_format_tag_t) {
        if input == .nhwc || output == .nhwc { return (dnnl_nhwc, dnnl_nhwc) }
        func inner(_ layout: ActivationLayout) -> dnnl_format_tag_t { layout.blockChannels == nil ? dnnl_format_tag_any : userTag(layout) }
        return (inner(input), inner(output))
    }

    /// The layout oneDNN, left to choose, gives the source of a ResNet-50 3x3 convolution (64 -> 64 at
    /// 56x56, batch 8) in `precision` on this CPU: NHWC, nChw16c, nChw8c, or NCHW for any other and where
    /// it cannot make one.
    static func preferredLayout(precision: Precision) -> ActivationLayout {
        guard let g = try? Conv2dGeometry(batch: 8, inChannels: 64, height: 56, width: 56, outChannels: 64, kernel: 3, padding: 1),
              let probe = try? ConvolutionPrimitives(geometry: g, precision: precision) else { return .nchw }
        for layout in ActivationLayout.rowLayouts {
            if let desc = try? DNNLDescriptor(g.inputShape, precision.inputType, userTag(layout)), probe.source.inner.desc.same(as: desc) {
                return layout
            }
        }
        return .nchw
    }

    /// The kernels oneDNN chose (forward; backward data and weights once they ran).
    public var implementations: String {
        var names = ["forward \(forwardPrimitive.implementation)"]
        if let backwardData { names.append("backward data \(backwardData.primitive.implementation)") }
        if let backwardDataBF16 { names.append("backward data to bf16 \(backwardDataBF16.primitive.implementation)") }
        for (images, each) in weightPieces.sorted(by: { $0.key < $1.key }) {
            names.append("backward weights \(each.primitive.implementation) in pieces of \(images) image\(images == 1 ? "" : "s")")
        }
        return names.joined(separator: ", ")
    }

    /// Whether the bf16 kernels read the input (forward, backward weights) as bf16 bits in the caller's
    /// layout, and the output gradient (both backward products) so: where that side's layout is not
    /// NCHW, the primitives' layouts are the caller's (`innerTags`), so a bf16 copy the caller keeps
    /// (written by the layer before, `BF16.bits`) binds as it is, with no reorder.
    public var takesBF16Input: Bool { precision == .bf16 && inputLayout != .nchw }
    public var takesBF16GradOutput: Bool { precision == .bf16 && outputLayout != .nchw }

    /// Binds `bits` (bf16, the caller's layout) as `argument`'s primitive-side buffer.
    private func bindBF16(_ argument: DNNLArgument, _ bits: UnsafePointer<UInt16>, shape: [Int], layout: ActivationLayout) throws {
        guard argument.inner.desc.same(as: try DNNLDescriptor(shape, dnnl_bf16, Self.userTag(layout))) else {
            throw ConvirtError("\(geometry) (\(precision)): oneDNN's kernel reads no bf16 \(layout) activation as it is")
        }
        try argument.inner.bind(bits)
    }

    /// output [N, O, OH, OW] = conv(input [N, C, H, W], weight [O, C, KH, KW]) + bias [O]. The input as
    /// floats or, where `takesBF16Input`, as its bf16 bits (`inputBF16`, used where given); the output
    /// as floats, or as bf16 bits (`outputBF16`) where `bf16Output`.
    public func forward(output: UnsafeMutablePointer<Float>?, outputBF16: UnsafeMutablePointer<UInt16>? = nil, input: UnsafePointer<Float>?,
                        inputBF16: UnsafePointer<UInt16>? = nil, weight: UnsafePointer<Float>, bias biasValues: UnsafePointer<Float>? = nil) throws {
        if let inputBF16 {
            try bindBF16(source, inputBF16, shape: geometry.inputShape, layout: inputLayout)
        } else {
            guard let input else { preconditionFailure("\(geometry) forward without an input") }
            try source.input(input, stream)
        }
        try weights.input(weight, stream)
        if bf16Output {
            guard let outputBF16 else { preconditionFailure("\(geometry) forward: a bf16 output without its buffer") }
            try bindBF16(destination, UnsafePointer(outputBF16), shape: geometry.outputShape, layout: outputLayout)
        } else {
            guard let output else { preconditionFailure("\(geometry) forward without an output") }
            try destination.output(output)
        }
        var arguments = [(cdnnl_arg_src(), source.inner), (cdnnl_arg_weights(), weights.inner), (cdnnl_arg_dst(), destination.inner)]
        if let bias, let biasValues {
            try bias.bind(biasValues)
            arguments.append((cdnnl_arg_bias(), bias))
        }
        try forwardPrimitive.execute(stream, arguments, "\(geometry) forward")
        if !bf16Output { try destination.finish(stream) }
    }

    /// Accumulates the gradients of the weights (and bias, unless gradWeight is nil), and of the input
    /// unless gradInput is nil (overwrites it where `accumulateInput` is false, and the weights' where
    /// `overwriteWeight`). The output gradient and the input as floats or, where `takesBF16GradOutput` /
    /// `takesBF16Input`, as bf16 bits (used where given). The input gradient, where `takesBF16Input`, may
    /// be written as bf16 bits instead (`gradInputBF16`, overwritten): each float of the input gradient
    /// rounded to nearest even, as autocast's convolutions return their input's gradient in bf16.
    /// `pieceImages` (a divisor of the batch): the weight gradient, a sum over the batch's images, is
    /// made of pieces of that many images (`PieceWeights`); nil: pieces of one image in fp32, the whole
    /// batch in one piece in bf16.
    public func backward(gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>? = nil,
                         gradWeight: UnsafeMutablePointer<Float>?, gradBias: UnsafeMutablePointer<Float>?,
                         gradOutput: UnsafePointer<Float>?, gradOutputBF16: UnsafePointer<UInt16>? = nil, input: UnsafePointer<Float>?,
                         inputBF16: UnsafePointer<UInt16>? = nil, weight: UnsafePointer<Float>, accumulateInput: Bool = true,
                         overwriteWeight: Bool = false, pieceImages: Int? = nil) throws {
        let pieceImages = pieceImages ?? (precision == .fp32 ? 1 : geometry.batch)
        precondition(pieceImages >= 1 && geometry.batch % pieceImages == 0, "\(geometry): pieces of \(pieceImages) images")
        // The output gradient as the backward-weights primitive reads it (shared with backward data where
        // both want the same layout).
        var weightsGradOutput: DNNLMemory? = nil
        if let gradWeight {
            let each = try makeWeightPieces(images: pieceImages, bias: gradBias != nil)
            if let gradOutputBF16 {
                try bindBF16(each.gradOutput, gradOutputBF16, shape: geometry.outputShape, layout: outputLayout)
            } else {
                guard let gradOutput else { preconditionFailure("\(geometry) backward without an output gradient") }
                try each.gradOutput.input(gradOutput, stream)
            }
            weightsGradOutput = each.gradOutput.inner
            if let inputBF16 {
                try bindBF16(each.source, inputBF16, shape: geometry.inputShape, layout: inputLayout)
            } else {
                guard let input else { preconditionFailure("\(geometry) backward without an input") }
                try each.source.input(input, stream)
            }
            try backwardWeights(each, gradWeight: gradWeight, gradBias: gradBias, overwriteWeight: overwriteWeight)
        }
        guard gradInput != nil || gradInputBF16 != nil else { return }
        precondition(gradInputBF16 == nil || (gradInput == nil && !accumulateInput && takesBF16Input), "\(geometry): a bf16 input gradient is written whole")
        let bd = try makeBackwardData(bf16: gradInputBF16 != nil)
        // The output gradient is reordered once when both backward primitives want the same layout.
        let gradOutputInner: DNNLMemory
        if let weightsGradOutput, bd.gradOutput.inner.desc.same(as: weightsGradOutput.desc) {
            gradOutputInner = weightsGradOutput
        } else if let gradOutputBF16 {
            try bindBF16(bd.gradOutput, gradOutputBF16, shape: geometry.outputShape, layout: outputLayout)
            gradOutputInner = bd.gradOutput.inner
        } else {
            guard let gradOutput else { throw ConvirtError("\(geometry) backward data: oneDNN reads its bf16 output gradient in another layout") }
            try bd.gradOutput.input(gradOutput, stream)
            gradOutputInner = bd.gradOutput.inner
        }
        try bd.weights.input(weight, stream)
        if let gradInputBF16 {
            try bindBF16(bd.gradInput, UnsafePointer(gradInputBF16), shape: geometry.inputShape, layout: inputLayout)
            try bd.primitive.execute(stream, [(cdnnl_arg_diff_dst(), gradOutputInner), (cdnnl_arg_weights(), bd.weights.inner),
                                              (cdnnl_arg_diff_src(), bd.gradInput.inner)], "\(geometry) backward data")
            return
        }
        guard let gradInput else { return }
        let dx: DNNLArgument
        if accumulateInput {
            dx = bd.gradInput
        } else {
            if overwrittenGradInput == nil {
                overwrittenGradInput = try DNNLArgument(user: bd.gradInput.user.desc, primitive: try bd.primitive.query(dnnl_query_diff_src_md),
                                                        role: .output, slot: 2)
            }
            dx = overwrittenGradInput!
        }
        try dx.output(gradInput)
        try bd.primitive.execute(stream, [(cdnnl_arg_diff_dst(), gradOutputInner), (cdnnl_arg_weights(), bd.weights.inner),
                                          (cdnnl_arg_diff_src(), dx.inner)], "\(geometry) backward data")
        try dx.finish(stream)
    }

    /// The weight gradient made of pieces of a fixed number of images (`GradientPieces`): a primitive
    /// for one piece, made from the piece's own shape (its layouts are those oneDNN picks for that many
    /// images, whatever the batch), run on each of the batch's pieces in turn; each piece's gradient is
    /// written alone (however the kernel blocks and rounds its sum, it depends on the piece's images
    /// only), the pieces are added up in order (`sum += piece`, fp32) and their sum is added to the
    /// caller's. Ranks of any world size then compute the same pieces. fp32 uses pieces of one image, as
    /// im2col + sgemm sums: oneDNN's whole-batch primitive sums images and pixels together in an order
    /// that depends on the batch (see `Convolution`); on a 2-core AMD EPYC (AVX-512; `cc -O2
    /// tools/bench_dnnl.c` at batch 1 and 8, 2 threads) one image runs at 80-100% of the batch's rate
    /// (3x3 64->64 @56: 162-200 against 199-204 GFLOP/s; 3x3 512->512 @7: 125-200 against 192-210).
    /// bf16 uses the pass's pieces.
    private struct WeightPieces {
        let images: Int
        let primitive: DNNLPrimitive
        /// The batch's source and output gradient: the caller's layout, and the piece's layout extended
        /// to the batch (image-major, so that a piece is a view).
        let source, gradOutput: DNNLArgument
        /// One piece of each, bound into the batch's buffers.
        let pieceSource, pieceGradOutput: DNNLMemory
        let sourceBytes, gradOutputBytes: Int
        /// One piece's weight gradient and the pieces' sum so far (the primitive's layout, in the calling
        /// thread's slots), and the caller's gradient (OIHW) the sum is added to at the end.
        let piece, sum, user: DNNLMemory
        let weightBytes: Int
        /// Whether the primitive's weight layout is the caller's (a single piece then writes it directly).
        let direct: Bool
        /// sum += piece; caller's += sum; caller's = sum (where its zeros are claimed).
        let addPiece, addSum, setSum: DNNLReorder
        /// The bias gradient, added to the caller's piece by piece (a vector).
        let gradBias: DNNLArgument?
        /// Past the arguments' slots (0-3: the source, the output gradient, the bias's buffer) and the scratchpad's.
        static let pieceSlot = ThreadScratch.scratchpadSlot + 1, sumSlot = ThreadScratch.scratchpadSlot + 2
    }

    private func makeWeightPieces(images: Int, bias: Bool) throws -> WeightPieces {
        if let made = weightPieces[images] { return made }
        let g = geometry, t = precision.inputType
        let what = "\(g) backward weights in pieces of \(images) image(s) (\(precision))"
        let pieceGeometry = try Conv2dGeometry(batch: images, inChannels: g.inChannels, height: g.height, width: g.width, outChannels: g.outChannels,
                                               kernel: (g.kernelH, g.kernelW), stride: (g.strideH, g.strideW), padding: (g.padH, g.padW))
        func primitive(_ source: dnnl_format_tag_t, _ destination: dnnl_format_tag_t) throws -> DNNLPrimitive {
            try backwardWeightsPrimitive(pieceGeometry, source: try DNNLDescriptor(pieceGeometry.inputShape, t, source),
                                         gradOutput: try DNNLDescriptor(pieceGeometry.outputShape, t, destination), bias: bias, what)
        }
        // The piece's layouts, which the batch's buffers take too: image-major ones, so that a piece is a view.
        func tags(_ made: DNNLPrimitive) throws -> (source: dnnl_format_tag_t, gradOutput: dnnl_format_tag_t)? {
            guard let source = dnnlImageMajorTag(try made.query(dnnl_query_src_md), shape: pieceGeometry.inputShape, t),
                  let gradOutput = dnnlImageMajorTag(try made.query(dnnl_query_diff_dst_md), shape: pieceGeometry.outputShape, t) else { return nil }
            return (source, gradOutput)
        }
        var made = try primitive(innerTags.source, innerTags.destination)
        var layouts = try tags(made)
        if layouts == nil {
            // A layout oneDNN picked that is not image-major: the caller's (NCHW, NHWC, nChw16c all are).
            made = try primitive(Self.userTag(inputLayout), Self.userTag(outputLayout))
            layouts = try tags(made)
        }
        guard let layouts else { throw ConvirtError("\(what): oneDNN's layouts are not image-major") }
        let oneSource = try DNNLDescriptor(pieceGeometry.inputShape, t, layouts.source)
        let oneGradOutput = try DNNLDescriptor(pieceGeometry.outputShape, t, layouts.gradOutput)
        let weightDesc = try made.query(dnnl_query_diff_weights_md)
        let piece = try DNNLMemory(weightDesc, owning: false), sum = try DNNLMemory(weightDesc, owning: false)
        let userWeights = try DNNLDescriptor(g.weightShape, dnnl_f32, dnnl_oihw)
        let user = try DNNLMemory(userWeights, owning: false)
        let each = WeightPieces(
            images: images, primitive: made,
            source: try DNNLArgument(user: try DNNLDescriptor(g.inputShape, dnnl_f32, Self.userTag(inputLayout)),
                                     primitive: try DNNLDescriptor(g.inputShape, t, layouts.source), role: .input, slot: 1),
            gradOutput: try DNNLArgument(user: try DNNLDescriptor(g.outputShape, dnnl_f32, Self.userTag(outputLayout)),
                                         primitive: try DNNLDescriptor(g.outputShape, t, layouts.gradOutput), role: .input, slot: 0),
            pieceSource: try DNNLMemory(oneSource, owning: false), pieceGradOutput: try DNNLMemory(oneGradOutput, owning: false),
            sourceBytes: oneSource.bytes, gradOutputBytes: oneGradOutput.bytes, piece: piece, sum: sum, user: user,
            weightBytes: weightDesc.bytes, direct: weightDesc.same(as: userWeights),
            addPiece: try DNNLReorder(from: piece, to: sum, accumulate: true), addSum: try DNNLReorder(from: sum, to: user, accumulate: true),
            setSum: try DNNLReorder(from: sum, to: user, accumulate: false),
            gradBias: bias ? try DNNLArgument(user: try Self.biasDescriptor(g), primitive: try made.query(dnnl_query_diff_weights_md, index: 1),
                                              role: .accumulatingOutput, slot: 3) : nil)
        weightPieces[images] = each
        return each
    }

    /// The weight (and bias) gradient of the batch whose source and output gradient `each`'s buffers
    /// hold, piece by piece.
    private func backwardWeights(_ each: WeightPieces, gradWeight: UnsafeMutablePointer<Float>, gradBias: UnsafeMutablePointer<Float>?,
                                 overwriteWeight: Bool) throws {
        if let gradBias { try each.gradBias?.output(gradBias) }
        guard let source = each.source.inner.handle, let dy = each.gradOutput.inner.handle else {
            throw ConvirtError("\(geometry) backward weights: oneDNN memory without a buffer")
        }
        let pieces = geometry.batch / each.images
        let scratch = ThreadScratch.current
        try each.user.bind(gradWeight)
        // A single piece whose layout is the caller's, on claimed zeros, is written into the caller's gradient.
        let straight = pieces == 1 && overwriteWeight && each.direct
        try each.sum.bind(straight ? UnsafeRawPointer(gradWeight) : UnsafeRawPointer(scratch.reorderSlot(WeightPieces.sumSlot, bytes: each.weightBytes)))
        try each.piece.bind(scratch.reorderSlot(WeightPieces.pieceSlot, bytes: each.weightBytes))
        // The first piece's gradient starts the sum; each later one is added to it.
        var first = [(cdnnl_arg_diff_dst(), each.pieceGradOutput), (cdnnl_arg_src(), each.pieceSource), (cdnnl_arg_diff_weights(), each.sum)]
        if gradBias != nil, let db = each.gradBias { first.append((cdnnl_arg_diff_bias(), db.inner)) }
        var later = first
        later[2].1 = each.piece
        for j in 0..<pieces {
            try each.pieceSource.bind(source + j * each.sourceBytes)
            try each.pieceGradOutput.bind(dy + j * each.gradOutputBytes)
            try each.primitive.execute(stream, j == 0 ? first : later, "\(geometry) backward weights, piece \(j)")
            if j > 0 { try each.addPiece.run(stream) }
            if gradBias != nil { try each.gradBias?.finish(stream) }
        }
        if !straight { try (overwriteWeight ? each.setSum : each.addSum).run(stream) }
    }

    private static func biasDescriptor(_ g: Conv2dGeometry) throws -> DNNLDescriptor { try DNNLDescriptor([g.outChannels], dnnl_f32, dnnl_x) }

    /// The weight (and bias) gradient primitive of `pg` (a piece's geometry) from `source` and
    /// `gradOutput`, both gradients fp32, the weights' in the layout oneDNN picks; its hint is the
    /// forward primitive of the same shapes.
    private func backwardWeightsPrimitive(_ pg: Conv2dGeometry, source: DNNLDescriptor, gradOutput: DNNLDescriptor, bias: Bool,
                                          _ what: String) throws -> DNNLPrimitive {
        let diffBias = try Self.biasDescriptor(pg)
        let hint = try DNNLPrimitiveDescriptor(what, try Self.forward(pg, source: source, destination: gradOutput, bias: bias ? diffBias : nil,
                                                                     precision: precision))
        let diffWei = try DNNLDescriptor(pg.weightShape, dnnl_f32, dnnl_format_tag_any)
        let (strides, dilations, padding) = Self.spatial(pg)
        // oneDNN's 1x1 kernels (jit_1x1, 3.2 and 3.8 alike) get the weight gradient of a strided 1x1
        // convolution with fewer input channels than their block wrong: on AVX2 with 4 channels in NHWC
        // they write past the end of their scratchpad (a fault where nothing follows it) and return other
        // values. Such layers are the small test models' alone; the next kernel oneDNN offers is right.
        let strided1x1Tail = pg.kernelH == 1 && pg.kernelW == 1 && (pg.strideH > 1 || pg.strideW > 1) && pg.inChannels < 16
        return try DNNLPrimitive(hint: hint, declines: strided1x1Tail ? { $0.hasPrefix("jit_1x1") } : nil, what) { descriptor, engine, attributes in
            dnnl_convolution_backward_weights_primitive_desc_create(descriptor, engine, dnnl_convolution_direct, source.md, diffWei.md,
                                                                    bias ? diffBias.md : nil, gradOutput.md, strides, dilations, padding, padding,
                                                                    hint.descriptor, attributes)
        }
    }

    /// The backward-data primitive and its arguments, writing the input gradient as floats or (`bf16`) as
    /// bf16 bits in the primitive's layout, which is the caller's where `takesBF16Input`.
    private func makeBackwardData(bf16: Bool = false) throws -> (primitive: DNNLPrimitive, gradOutput: DNNLArgument, weights: DNNLArgument,
                                                                   gradInput: DNNLArgument) {
        if let made = bf16 ? backwardDataBF16 : backwardData { return made }
        let g = geometry, t = precision.inputType
        let wei = try DNNLDescriptor(g.weightShape, t, dnnl_format_tag_any)
        let diffDst = try DNNLDescriptor(g.outputShape, t, innerTags.destination)
        let diffSrc = try DNNLDescriptor(g.inputShape, bf16 ? dnnl_bf16 : dnnl_f32, innerTags.source)
        let (strides, dilations, padding) = Self.spatial(g)
        let hint = forwardPrimitive.descriptor
        let primitive = try DNNLPrimitive("\(g) backward data (\(precision)\(bf16 ? ", bf16 input gradient" : ""))") { descriptor, engine, attributes in
            dnnl_convolution_backward_data_primitive_desc_create(descriptor, engine, dnnl_convolution_direct, diffSrc.md, wei.md, diffDst.md,
                                                                 strides, dilations, padding, padding, hint, attributes)
        }
        let made = (primitive,
                    try DNNLArgument(user: try DNNLDescriptor(g.outputShape, dnnl_f32, Self.userTag(outputLayout)),
                                     primitive: try primitive.query(dnnl_query_diff_dst_md), role: .input, slot: 0),
                    try DNNLArgument(user: try DNNLDescriptor(g.weightShape, dnnl_f32, dnnl_oihw), primitive: try primitive.query(dnnl_query_weights_md),
                                     role: .input, slot: 1),
                    // bf16 bits are bound as they are (`bindBF16`): no reorder of them is made.
                    try DNNLArgument(user: try DNNLDescriptor(g.inputShape, bf16 ? dnnl_bf16 : dnnl_f32, Self.userTag(inputLayout)),
                                     primitive: try primitive.query(dnnl_query_diff_src_md), role: bf16 ? .output : .accumulatingOutput, slot: 2))
        if bf16 { backwardDataBF16 = made } else { backwardData = made }
        return made
    }

}

/// A convolution layer's kernels, chosen by a fixed rule (so every rank of a job computes with the same
/// ones) and cached by geometry (training, validation and evaluation batches differ).
///
/// fp32, `auto`: every convolution on oneDNN's fp32 kernels, the weight gradient image by image
/// (`ConvolutionPrimitives.WeightPieces`, pieces of one image). oneDNN's forward and backward-data sums do not depend on the
/// batch (each image's output and input gradient are bitwise those of the image alone; DNNLTests
/// `batchAsImages`), but its whole-batch weight gradient sums images and pixels together in an order
/// that does, and where training is chaotic that showed: on a 2-core AMD EPYC the in-process
/// fine-tuning of a width-4 encoder on 1 and 2 ranks reached validation losses 5.1e-3 apart (relative)
/// after two epochs, against 2e-3 for im2col + sgemm, whose weight gradient adds the images' one by one.
/// Summed image by image on oneDNN too, a rank adds the same per-image terms whatever the world size:
/// the tiny preset's 20 steps on -np 1, 2, 4 then part as with im2col (AMD EPYC, AVX-512: -np 2 within
/// 2.3e-7 of -np 1 over all 20 steps, im2col 2.0e-7; -np 4 9.5e-5 by step 20, im2col 3.9e-6). The paper
/// preset's fp32 step (`convirt bench step --steps 3 --threads 2`, same CPU): image forward 0.39-0.43 s
/// against 0.57-0.69 with im2col + sgemm, image backward 0.88-0.94 against 1.11-1.34 (0.85-0.94 with
/// the whole batch's weight gradient: the per-image sums cost little). On a CPU with AVX2 alone (oneDNN's
/// ISA avx2; 2-core AMD EPYC Zen 3, the same command, 5 alternated pairs) the paper preset's image pass
/// ties with im2col + sgemm (forward 0.58-0.64 s against 0.58-0.78, backward 1.15-1.35 against 1.10-1.38),
/// and the demo preset's narrow layers at 96 px run twice as fast (`--preset demo --batch 32 --tokens 32`:
/// image forward 0.019-0.021 s against 0.039-0.050, backward 0.025-0.031 against 0.054-0.069). There the
/// tiny preset's runs on -np 1 and 2 (seeds 2-5, 20-30 steps) part as im2col's do: by rounding, until a
/// run's chaos amplifies it, on either route (oneDNN on two seeds, from steps 15 and 7; im2col on two, from
/// 7 and 19). `im2col` keeps every convolution on im2col + sgemm (`Conv2d`, the arithmetic of earlier
/// releases); `onednn` puts every one on oneDNN (the default's arithmetic by name).
///
/// bf16 runs on oneDNN's bf16 kernels where `BF16.native` (AMX; AMD's AVX512-BF16), and elsewhere as
/// the fp32 kernels above over bf16-rounded copies of the input, the weights and the output gradient
/// (the same products). Its weight gradient is made of the pass's gradient pieces (`GradientPieces`):
/// on oneDNN's bf16 kernels a primitive for a piece's images, run piece by piece (AMX's whole-batch
/// primitive summed in an order that depended on a rank's share, at bf16's rounding: 1e-4 of the
/// step-1 gradient norm between -np 1, 2 and 4); the emulation sums image by image, pieces of one.
public final class Convolution {
    public enum Policy: String, Sendable, CaseIterable {
        /// The default (see above): every convolution on oneDNN.
        case auto
        /// Every convolution on oneDNN, forward and backward (the default's arithmetic by name).
        case onednn
        /// Every convolution by im2col + sgemm (`Conv2d`).
        case im2col
    }

    /// Whether fp32's convolution `g` (and bf16's, where not native) runs on oneDNN's fp32 kernels: on every
    /// CPU, unless CONVIRT_CONVOLUTION=im2col (`Backend`).
    public static func usesDNNL(_ g: Conv2dGeometry) -> Bool { Backend.current.convolution == .onednn }

    /// The layout a network keeps its activations in for a pass in `precision`: NCHW for im2col +
    /// sgemm; on oneDNN, the layout oneDNN itself picks for a ResNet convolution (`preferredLayout`), so
    /// that no reorder transposes an activation between two layers: NHWC where its convolutions are
    /// brgemm kernels on NHWC (AMX), nChw16c or nChw8c where it picks that blocked layout (AVX-512
    /// without AMX; AVX2: our pointwise kernels read both, ChannelsLast.swift), NCHW for any other,
    /// reordered at each convolution. On a 2-core AMD EPYC with AVX512-BF16 (bf16, the paper preset's
    /// `convirt bench step --steps 3 --threads 2`): image forward + backward 0.93 s in NCHW, 0.79 s in
    /// nChw16c; reorders in the step's oneDNN trace 250 ms -> 149 ms. (NHWC measured slower than NCHW
    /// there: convolutions 552 ms against 467, its brgemm/jit NHWC kernels being slower.) On a 2-core AMD
    /// EPYC with AVX2 alone (fp32, the same command, 6 alternated pairs): the paper preset's image forward
    /// + backward 1.74-2.10 s in nChw8c against 1.83-2.49 s in NCHW (0.86 of it, the median pair's),
    /// reorders 197 ms -> 30 ms; the demo preset's (`--preset demo --batch 32 --tokens 32`, 4 pairs)
    /// 0.032-0.040 s against 0.050-0.064 s.
    /// CONVIRT_ACTIVATIONS=nchw|nhwc|nchw16c|nchw8c overrides the choice (where oneDNN runs the
    /// convolutions).
    public static func layout(precision: Precision, nativeBF16: Bool = BF16.native) -> ActivationLayout {
        let backend = Backend.current
        if precision == .bf16 && nativeBF16 != (backend.bf16 == .native) {
            return layout(precision: .bf16, onDNNL: nativeBF16, forced: backend.switches.activations)
        }
        return precision == .bf16 ? backend.bf16Layout : backend.fp32Layout
    }

    /// The rule `Backend` resolves once: NCHW where the convolutions are not on oneDNN, else the forced
    /// layout or oneDNN's preferred one.
    static func layout(precision: Precision, onDNNL: Bool, forced: ActivationLayout?) -> ActivationLayout {
        guard onDNNL else { return .nchw }
        if let forced { return forced }
        return precision == .bf16 ? preferredInBF16 : preferredInFP32
    }
    private static let preferredInBF16 = ConvolutionPrimitives.preferredLayout(precision: .bf16)
    private static let preferredInFP32 = ConvolutionPrimitives.preferredLayout(precision: .fp32)

    private struct Key: Hashable {
        let geometry: Conv2dGeometry
        let precision: Precision
        let inputLayout, outputLayout: ActivationLayout
        let bf16Output: Bool
    }
    private var primitives: [Key: ConvolutionPrimitives] = [:]
    /// Whether this layer's bf16 products run on oneDNN's bf16 kernels.
    public let nativeBF16: Bool
    /// Whether the bf16 emulation sums the weight gradient as CONVIRT_BF16=blocked does (`blockedWeightGradient`).
    public let blockedReductions: Bool

    /// `nativeBF16`: default `BF16.native`; true needs `BF16.oneDNNRunsBF16`. `blockedReductions`
    /// (emulation only): default `BF16.blockedReductions`.
    public init(nativeBF16: Bool = BF16.native, blockedReductions: Bool = BF16.blockedReductions) {
        self.nativeBF16 = nativeBF16
        self.blockedReductions = blockedReductions && !nativeBF16
    }

    /// oneDNN's primitives for `g` in `precision` and the layouts, made once.
    private func dnnl(_ g: Conv2dGeometry, _ precision: Precision, _ layouts: Layouts, bf16Output: Bool = false) throws -> ConvolutionPrimitives {
        let key = Key(geometry: g, precision: precision, inputLayout: layouts.input, outputLayout: layouts.output, bf16Output: bf16Output)
        if let p = primitives[key] { return p }
        let p = try ConvolutionPrimitives(geometry: g, precision: precision, inputLayout: layouts.input, outputLayout: layouts.output,
                                          bf16Output: bf16Output)
        primitives[key] = p
        return p
    }

    /// The fp32 kernels of `g`: oneDNN's (always for activations other than NCHW), or nil for im2col + sgemm.
    private func fp32(_ g: Conv2dGeometry, _ layouts: Layouts) throws -> ConvolutionPrimitives? {
        if Self.usesDNNL(g) || layouts != Layouts() { return try dnnl(g, .fp32, layouts) }
        return nil
    }

    /// The layouts of a convolution's input and output (activations and their gradients).
    public struct Layouts: Hashable, Sendable {
        public var input, output: ActivationLayout
        public init(input: ActivationLayout = .nchw, output: ActivationLayout = .nchw) { self.input = input; self.output = output }
        /// Both in `layout`.
        public init(_ layout: ActivationLayout) { self.init(input: layout, output: layout) }
    }

    /// Floats of im2col columns the fp32 kernels of `g` need (0 on oneDNN).
    private static func columnsCount(_ g: Conv2dGeometry) -> Int { usesDNNL(g) ? 0 : g.workspaceCount }

    /// Floats of scratch space `g` needs in `precision`: im2col's columns where it runs on im2col, and in
    /// bf16 off oneDNN's bf16 kernels also the rounded copies of the input, weights and output gradient.
    public static func workspaceCount(_ g: Conv2dGeometry, precision: Precision = .fp32, nativeBF16: Bool = BF16.native) -> Int {
        let columns = columnsCount(g)
        if precision == .bf16 { return nativeBF16 ? 0 : columns + g.inputCount + g.weightCount + g.outputCount }
        return columns
    }

    /// Whether a pass in `precision` with activations in `layout` reads a convolution's input (and, for
    /// an output in `layout`, its output gradient) as bf16 bits (`ConvolutionPrimitives.takesBF16Input`):
    /// oneDNN's bf16 kernels outside NCHW. The layers that write those activations then write their bf16
    /// copy (`BF16.bits`, as oneDNN's reorder rounds), and the float copy only where another layer reads it.
    public func takesBF16(_ precision: Precision, _ layout: ActivationLayout) -> Bool {
        precision == .bf16 && nativeBF16 && layout != .nchw
    }

    /// As `Conv2d.forward`; workspace: `workspaceCount(g, precision:)` floats.
    /// `layouts` other than NCHW need oneDNN's kernels (`layout(precision:)`). `inputBF16`: the input's
    /// bf16 bits instead of `input`, where `takesBF16(precision, layouts.input)`. `outputBF16`: the
    /// output as bf16 bits (each the float output rounded to nearest even) instead of `output`, where
    /// `takesBF16(precision, layouts.output)`.
    public func forward(output: UnsafeMutablePointer<Float>?, outputBF16: UnsafeMutablePointer<UInt16>? = nil, input: UnsafePointer<Float>?,
                        inputBF16: UnsafePointer<UInt16>? = nil, weight: UnsafePointer<Float>, geometry g: Conv2dGeometry,
                        workspace: UnsafeMutablePointer<Float>?, precision: Precision = .fp32, layouts: Layouts = Layouts()) throws {
        if inputBF16 != nil || outputBF16 != nil {
            precondition((inputBF16 == nil || takesBF16(precision, layouts.input)) && (outputBF16 == nil || takesBF16(precision, layouts.output)),
                         "\(g): bf16 activations without oneDNN's bf16 kernels on them")
            return try dnnl(g, .bf16, layouts, bf16Output: outputBF16 != nil).forward(output: output, outputBF16: outputBF16, input: input,
                                                                                     inputBF16: inputBF16, weight: weight)
        }
        guard let output else { preconditionFailure("\(g) forward without an output") }
        guard var input else { preconditionFailure("\(g) forward without an input") }
        var (weight, workspace) = (weight, workspace)
        if precision == .bf16 {
            if nativeBF16 { return try dnnl(g, .bf16, layouts).forward(output: output, input: input, weight: weight) }
            precondition(layouts == Layouts(), "\(g): the bf16 emulation runs on NCHW activations only")
            let (columns, x, w, _) = Self.emulationScratch(g, workspace, input: input, weight: weight)
            (input, weight, workspace) = (UnsafePointer(x), UnsafePointer(w), columns)
        }
        if let p = try fp32(g, layouts) {
            try p.forward(output: output, input: input, weight: weight)
        } else {
            Conv2d.forward(output: output, input: input, weight: weight, bias: nil, geometry: g, workspace: workspace)
        }
    }

    /// As `Conv2d.backward` (accumulating; the input gradient overwritten where `accumulateInput` is
    /// false, the weight gradient on oneDNN where `overwriteWeight`, im2col adding to its zeros); in bf16
    /// the output gradient is rounded to bf16 too. `gradOutputBF16` / `inputBF16`: bf16 bits instead of
    /// the floats, where `takesBF16` for that side's layout; `gradInputBF16` likewise takes the input
    /// gradient's bf16 bits (each float rounded to nearest even) instead of `gradInput`, overwritten.
    /// `pieceImages` (bf16; a divisor of the batch): the weight gradient made of pieces of that many
    /// images (`GradientPieces`), nil: one piece. On oneDNN's bf16 kernels a piece is one call of a
    /// primitive for that many images; the emulation's fp32 kernels sum image by image whatever the
    /// pieces (pieces of one image), but for CONVIRT_BF16=blocked (`blockedWeightGradient`).
    public func backward(gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>? = nil,
                         gradWeight: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>?,
                         gradOutputBF16: UnsafePointer<UInt16>? = nil, input: UnsafePointer<Float>?, inputBF16: UnsafePointer<UInt16>? = nil,
                         weight: UnsafePointer<Float>, geometry g: Conv2dGeometry,
                         workspace: UnsafeMutablePointer<Float>?, precision: Precision = .fp32, layouts: Layouts = Layouts(),
                         accumulateInput: Bool = true, overwriteWeight: Bool = false, pieceImages: Int? = nil) throws {
        if gradOutputBF16 != nil || inputBF16 != nil || gradInputBF16 != nil {
            precondition((gradOutputBF16 == nil || takesBF16(precision, layouts.output))
                         && (inputBF16 == nil && gradInputBF16 == nil || takesBF16(precision, layouts.input)),
                         "\(g): bf16 activations without oneDNN's bf16 kernels on them")
            return try dnnl(g, .bf16, layouts).backward(gradInput: gradInput, gradInputBF16: gradInputBF16, gradWeight: gradWeight, gradBias: nil,
                                                          gradOutput: gradOutput,
                                                          gradOutputBF16: gradOutputBF16, input: input, inputBF16: inputBF16, weight: weight,
                                                          accumulateInput: accumulateInput, overwriteWeight: overwriteWeight,
                                                          pieceImages: pieceImages ?? g.batch)
        }
        guard var gradOutput, var input else { preconditionFailure("\(g) backward without its float operands") }
        var (weight, workspace) = (weight, workspace)
        if precision == .bf16 {
            if nativeBF16 {
                return try dnnl(g, .bf16, layouts).backward(gradInput: gradInput, gradWeight: gradWeight, gradBias: nil, gradOutput: gradOutput,
                                                              input: input, weight: weight, accumulateInput: accumulateInput,
                                                              overwriteWeight: overwriteWeight, pieceImages: pieceImages ?? g.batch)
            }
            precondition(layouts == Layouts(), "\(g): the bf16 emulation runs on NCHW activations only")
            let (columns, x, w, dy) = Self.emulationScratch(g, workspace, input: input, weight: weight)
            BF16.round(dy, gradOutput, count: g.outputCount)
            (gradOutput, input, weight, workspace) = (UnsafePointer(dy), UnsafePointer(x), UnsafePointer(w), columns)
            if blockedReductions {
                if let gradInput { try fp32Backward(gradInput: gradInput, gradWeight: nil, gradOutput: gradOutput, input: input, weight: weight, g,
                                                    workspace: workspace, accumulateInput: accumulateInput, overwriteWeight: false) }
                return try blockedWeightGradient(gradWeight, gradOutput: gradOutput, input: input, weight: weight, g, workspace: workspace,
                                                 pieceImages: pieceImages ?? g.batch, overwrite: overwriteWeight)
            }
        }
        try fp32Backward(gradInput: gradInput, gradWeight: gradWeight, gradOutput: gradOutput, input: input, weight: weight, g, workspace: workspace,
                         layouts: layouts, accumulateInput: accumulateInput, overwriteWeight: overwriteWeight)
    }

    /// The fp32 kernels' backward: oneDNN's (the weight gradient image by image), or im2col + sgemm.
    /// gradWeight nil: the input gradient only.
    private func fp32Backward(gradInput: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?, gradOutput: UnsafePointer<Float>,
                              input: UnsafePointer<Float>, weight: UnsafePointer<Float>, _ g: Conv2dGeometry, workspace: UnsafeMutablePointer<Float>?,
                              layouts: Layouts = Layouts(), accumulateInput: Bool, overwriteWeight: Bool, pieceImages: Int? = nil) throws {
        if let p = try fp32(g, layouts) {
            try p.backward(gradInput: gradInput, gradWeight: gradWeight, gradBias: nil, gradOutput: gradOutput, input: input, weight: weight,
                           accumulateInput: accumulateInput, overwriteWeight: overwriteWeight, pieceImages: pieceImages)
            return
        }
        if !accumulateInput { gradInput?.update(repeating: 0, count: g.inputCount) }
        if overwriteWeight { gradWeight?.update(repeating: 0, count: g.weightCount) }
        // im2col + sgemm always computes the weight gradient: without the caller's, into the scratch of
        // the blocked emulation (`blockedWeightGradient`), which computes its own after.
        let weights = gradWeight ?? ThreadScratch.current.reorderSlot(ThreadScratch.blockedConvolutionSlot, bytes: 4 * g.weightCount)
            .bindMemory(to: Float.self, capacity: g.weightCount)
        Conv2d.backward(gradInput: gradInput, gradWeight: weights, gradBias: nil, gradOutput: gradOutput, input: input, weight: weight,
                        geometry: g, workspace: workspace)
    }

    /// `blockedReductions` (CONVIRT_BF16=blocked): the weight gradient as a kernel whose sum over a
    /// call's images depends on how many it gets: each piece of `pieceImages` images (one call) in two
    /// blocks, the first ceil(n/2) images and the rest, each block's gradient (the fp32 kernels' over its
    /// images) rounded to bf16 before the two are added; the pieces added to the gradient in order.
    /// Inputs rounded already; NCHW.
    private func blockedWeightGradient(_ gradWeight: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>,
                                       weight: UnsafePointer<Float>, _ g: Conv2dGeometry, workspace: UnsafeMutablePointer<Float>?,
                                       pieceImages: Int, overwrite: Bool) throws {
        precondition(pieceImages >= 1 && g.batch % pieceImages == 0, "\(g): pieces of \(pieceImages) images")
        let count = g.weightCount
        let inImage = g.inputCount / g.batch, outImage = g.outputCount / g.batch
        let room = ThreadScratch.current.reorderSlot(ThreadScratch.blockedConvolutionSlot, bytes: 8 * count).bindMemory(to: Float.self, capacity: 2 * count)
        let block = room, piece = room + count
        for first in stride(from: 0, to: g.batch, by: pieceImages) {
            let split = (pieceImages + 1) / 2
            for (j, images) in [0..<split, split..<pieceImages].enumerated() where !images.isEmpty {
                let gb = try Conv2dGeometry(batch: images.count, inChannels: g.inChannels, height: g.height, width: g.width, outChannels: g.outChannels,
                                            kernel: (g.kernelH, g.kernelW), stride: (g.strideH, g.strideW), padding: (g.padH, g.padW))
                let n = first + images.lowerBound
                try fp32Backward(gradInput: nil, gradWeight: block, gradOutput: gradOutput + n * outImage, input: input + n * inImage,
                                 weight: weight, gb, workspace: workspace, accumulateInput: false, overwriteWeight: true, pieceImages: gb.batch)
                BF16.round(block, block, count: count)
                if j == 0 { piece.update(from: block, count: count) } else { ck_add(piece, block, count) }
            }
            if overwrite && first == 0 { gradWeight.update(from: piece, count: count) } else { ck_add(gradWeight, piece, count) }
        }
    }

    /// The emulation's parts of the workspace: im2col's columns (nil where oneDNN runs the fp32 products),
    /// the input and weights rounded to bf16 (filled here), and room for the rounded output gradient.
    private static func emulationScratch(_ g: Conv2dGeometry, _ workspace: UnsafeMutablePointer<Float>?, input: UnsafePointer<Float>,
                                         weight: UnsafePointer<Float>)
        -> (UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>) {
        guard let workspace else { preconditionFailure("the bf16 emulation of \(g) needs its workspace") }
        let columns = columnsCount(g)
        let x = workspace + columns, w = x + g.inputCount
        BF16.round(x, input, count: g.inputCount)
        BF16.round(w, weight, count: g.weightCount)
        return (columns > 0 ? workspace : nil, x, w, w + g.weightCount)
    }
}
