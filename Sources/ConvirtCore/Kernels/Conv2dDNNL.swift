// The convolution on oneDNN: forward, backward data and backward weights for one geometry and
// precision. Same contract as `Conv2d.forward` / `Conv2d.backward` (OIHW weights; backward accumulates
// into gradInput, gradWeight and gradBias), with NCHW or NHWC activations: NCHW ones are reordered to
// and from the layouts oneDNN chooses, NHWC ones it reads and writes as they are (ChannelsLast.swift).
// In bf16 the inputs of each product are rounded to bf16 by the reorder at its edge and the products
// accumulate in fp32 (outputs and gradients stay fp32), as PyTorch's CPU autocast does.

import CDNNL

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
    let stream: DNNLStream
    // Forward.
    let forwardPrimitive: DNNLPrimitive
    let source, weights, destination: DNNLArgument
    let bias: DNNLMemory?
    // Backward, created on first use (an evaluation never differentiates).
    private var backwardData: (primitive: DNNLPrimitive, gradOutput: DNNLArgument, weights: DNNLArgument, gradInput: DNNLArgument)?
    /// The input gradient written, not accumulated: straight into the caller's buffer where the layouts agree.
    private var overwrittenGradInput: DNNLArgument?
    private var backwardWeights: (primitive: DNNLPrimitive, gradOutput: DNNLArgument, source: DNNLArgument, gradWeight: DNNLArgument,
                                  gradBias: DNNLArgument?)?

    public init(geometry g: Conv2dGeometry, precision: Precision = .fp32, bias: Bool = false, inputLayout: ActivationLayout = .nchw,
                outputLayout: ActivationLayout = .nchw) throws {
        geometry = g
        self.precision = precision
        self.inputLayout = inputLayout
        self.outputLayout = outputLayout
        stream = try DNNLStream()
        let t = precision.inputType
        let (srcTag, dstTag) = Self.innerTags(inputLayout, outputLayout)
        var src = try dnnlDescriptor(g.inputShape, t, srcTag)
        var wei = try dnnlDescriptor(g.weightShape, t, dnnl_format_tag_any)
        var dst = try dnnlDescriptor(g.outputShape, dnnl_f32, dstTag)
        var b = try dnnlDescriptor([g.outChannels], dnnl_f32, dnnl_x)
        let strides = dnnlDims([g.strideH, g.strideW]), padding = dnnlDims([g.padH, g.padW])
        var desc = dnnl_convolution_desc_t()
        let status = withUnsafePointer(to: &b) { biasDesc in
            dnnl_convolution_forward_desc_init(&desc, dnnl_forward_training, dnnl_convolution_direct, &src, &wei, bias ? biasDesc : nil, &dst,
                                               strides, padding, padding)
        }
        try dnnlCheck(status, "\(g) forward (\(precision))")
        forwardPrimitive = try withUnsafePointer(to: &desc) { try DNNLPrimitive(UnsafeRawPointer($0), "\(g) forward (\(precision))") }
        source = try DNNLArgument(user: try dnnlDescriptor(g.inputShape, dnnl_f32, Self.userTag(inputLayout)),
                                  primitive: forwardPrimitive.query(dnnl_query_src_md), role: .input, slot: 0)
        weights = try DNNLArgument(user: try dnnlDescriptor(g.weightShape, dnnl_f32, dnnl_oihw), primitive: forwardPrimitive.query(dnnl_query_weights_md),
                                   role: .input, slot: 1)
        destination = try DNNLArgument(user: try dnnlDescriptor(g.outputShape, dnnl_f32, Self.userTag(outputLayout)),
                                       primitive: forwardPrimitive.query(dnnl_query_dst_md), role: .output, slot: 2)
        self.bias = bias ? try DNNLMemory(b, owning: false) : nil
    }

    /// The caller's layout as a oneDNN tag.
    private static func userTag(_ layout: ActivationLayout) -> dnnl_format_tag_t {
        switch layout {
        case .nchw: dnnl_nchw
        case .nhwc: dnnl_nhwc
        case .blocked16: dnnl_nChw16c
        }
    }
    /// The primitive's layouts for its source and destination: NHWC on both sides where the caller holds
    /// either so (the stem takes NCHW images: left to oneDNN, NHWC next to an NHWC output picks its
    /// reference kernel); nChw16c where the caller holds that side so (then no reorder transposes it); else
    /// oneDNN's choice (its blocked layouts, which beat NCHW by far).
    private var innerTags: (source: dnnl_format_tag_t, destination: dnnl_format_tag_t) { Self.innerTags(inputLayout, outputLayout) }
    private static func innerTags(_ input: ActivationLayout, _ output: ActivationLayout) -> (source: dnnl_format_tag_t, destination: dnnl_format_tag_t) {
        if input == .nhwc || output == .nhwc { return (dnnl_nhwc, dnnl_nhwc) }
        return (input == .blocked16 ? dnnl_nChw16c : dnnl_format_tag_any, output == .blocked16 ? dnnl_nChw16c : dnnl_format_tag_any)
    }

    /// The layout oneDNN, left to choose, gives the source of a ResNet-50 3x3 convolution (64 -> 64 at
    /// 56x56, batch 8) in `precision` on this CPU: NHWC, nChw16c, or NCHW for any other (nChw8c on AVX2)
    /// and where it cannot make one.
    static func preferredLayout(precision: Precision) -> ActivationLayout {
        guard let g = try? Conv2dGeometry(batch: 8, inChannels: 64, height: 56, width: 56, outChannels: 64, kernel: 3, padding: 1),
              let probe = try? ConvolutionPrimitives(geometry: g, precision: precision) else { return .nchw }
        for layout in [ActivationLayout.nhwc, .blocked16] {
            if let desc = try? dnnlDescriptor(g.inputShape, precision.inputType, userTag(layout)), dnnlSame(probe.source.inner.desc, desc) {
                return layout
            }
        }
        return .nchw
    }

    /// The kernels oneDNN chose (forward; backward data and weights once they ran).
    public var implementations: String {
        var names = ["forward \(forwardPrimitive.implementation)"]
        if let backwardData { names.append("backward data \(backwardData.primitive.implementation)") }
        if let backwardWeights { names.append("backward weights \(backwardWeights.primitive.implementation)") }
        return names.joined(separator: ", ")
    }

    /// output [N, O, OH, OW] = conv(input [N, C, H, W], weight [O, C, KH, KW]) + bias [O].
    public func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                        bias biasValues: UnsafePointer<Float>? = nil) throws {
        try source.input(input, stream)
        try weights.input(weight, stream)
        try destination.output(output)
        var arguments = [(cdnnl_arg_src(), source.inner), (cdnnl_arg_weights(), weights.inner), (cdnnl_arg_dst(), destination.inner)]
        if let bias, let biasValues {
            try bias.bind(biasValues)
            arguments.append((cdnnl_arg_bias(), bias))
        }
        try forwardPrimitive.execute(stream, arguments, "\(geometry) forward")
        try destination.finish(stream)
    }

    /// Accumulates the gradients of the weights (and bias), and of the input unless gradInput is nil
    /// (overwrites it where `accumulateInput` is false).
    public func backward(gradInput: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>, gradBias: UnsafeMutablePointer<Float>?,
                         gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                         accumulateInput: Bool = true) throws {
        let bw = try makeBackwardWeights(bias: gradBias != nil)
        try bw.gradOutput.input(gradOutput, stream)
        try bw.source.input(input, stream)
        try bw.gradWeight.output(gradWeight)
        var arguments = [(cdnnl_arg_diff_dst(), bw.gradOutput.inner), (cdnnl_arg_src(), bw.source.inner), (cdnnl_arg_diff_weights(), bw.gradWeight.inner)]
        if let gradBias, let db = bw.gradBias {
            try db.output(gradBias)
            arguments.append((cdnnl_arg_diff_bias(), db.inner))
        }
        try bw.primitive.execute(stream, arguments, "\(geometry) backward weights")
        try bw.gradWeight.finish(stream)
        if gradBias != nil { try bw.gradBias?.finish(stream) }
        guard let gradInput else { return }
        let bd = try makeBackwardData()
        // The output gradient is reordered once when both backward primitives want the same layout.
        let gradOutputInner: DNNLMemory
        if dnnlSame(bd.gradOutput.inner.desc, bw.gradOutput.inner.desc) {
            gradOutputInner = bw.gradOutput.inner
        } else {
            try bd.gradOutput.input(gradOutput, stream)
            gradOutputInner = bd.gradOutput.inner
        }
        try bd.weights.input(weight, stream)
        let dx: DNNLArgument
        if accumulateInput {
            dx = bd.gradInput
        } else {
            if overwrittenGradInput == nil {
                overwrittenGradInput = try DNNLArgument(user: bd.gradInput.user.desc, primitive: bd.primitive.query(dnnl_query_diff_src_md),
                                                        role: .output, slot: 2)
            }
            dx = overwrittenGradInput!
        }
        try dx.output(gradInput)
        try bd.primitive.execute(stream, [(cdnnl_arg_diff_dst(), gradOutputInner), (cdnnl_arg_weights(), bd.weights.inner),
                                          (cdnnl_arg_diff_src(), dx.inner)], "\(geometry) backward data")
        try dx.finish(stream)
    }

    private func operationDescriptors() throws -> (src: dnnl_memory_desc_t, wei: dnnl_memory_desc_t, dst: dnnl_memory_desc_t) {
        let g = geometry, t = precision.inputType
        return (try dnnlDescriptor(g.inputShape, t, innerTags.source), try dnnlDescriptor(g.weightShape, t, dnnl_format_tag_any),
                try dnnlDescriptor(g.outputShape, t, innerTags.destination))
    }

    private func makeBackwardData() throws -> (primitive: DNNLPrimitive, gradOutput: DNNLArgument, weights: DNNLArgument, gradInput: DNNLArgument) {
        if let backwardData { return backwardData }
        let g = geometry
        var (_, wei, diffDst) = try operationDescriptors()
        var diffSrc = try dnnlDescriptor(g.inputShape, dnnl_f32, innerTags.source)
        let strides = dnnlDims([g.strideH, g.strideW]), padding = dnnlDims([g.padH, g.padW])
        var desc = dnnl_convolution_desc_t()
        try dnnlCheck(dnnl_convolution_backward_data_desc_init(&desc, dnnl_convolution_direct, &diffSrc, &wei, &diffDst, strides, padding, padding),
                      "\(g) backward data (\(precision))")
        let primitive = try withUnsafePointer(to: &desc) {
            try DNNLPrimitive(UnsafeRawPointer($0), hint: forwardPrimitive, "\(g) backward data (\(precision))")
        }
        let made = (primitive,
                    try DNNLArgument(user: try dnnlDescriptor(g.outputShape, dnnl_f32, Self.userTag(outputLayout)),
                                     primitive: primitive.query(dnnl_query_diff_dst_md), role: .input, slot: 0),
                    try DNNLArgument(user: try dnnlDescriptor(g.weightShape, dnnl_f32, dnnl_oihw), primitive: primitive.query(dnnl_query_weights_md), role: .input,
                                     slot: 1),
                    try DNNLArgument(user: try dnnlDescriptor(g.inputShape, dnnl_f32, Self.userTag(inputLayout)),
                                     primitive: primitive.query(dnnl_query_diff_src_md), role: .accumulatingOutput, slot: 2))
        backwardData = made
        return made
    }

    private func makeBackwardWeights(bias: Bool) throws
        -> (primitive: DNNLPrimitive, gradOutput: DNNLArgument, source: DNNLArgument, gradWeight: DNNLArgument, gradBias: DNNLArgument?) {
        if let backwardWeights { return backwardWeights }
        let g = geometry
        var (src, _, diffDst) = try operationDescriptors()
        var diffWei = try dnnlDescriptor(g.weightShape, dnnl_f32, dnnl_format_tag_any)
        var diffBias = try dnnlDescriptor([g.outChannels], dnnl_f32, dnnl_x)
        let strides = dnnlDims([g.strideH, g.strideW]), padding = dnnlDims([g.padH, g.padW])
        var desc = dnnl_convolution_desc_t()
        let status = withUnsafePointer(to: &diffBias) { biasDesc in
            dnnl_convolution_backward_weights_desc_init(&desc, dnnl_convolution_direct, &src, &diffWei, bias ? biasDesc : nil, &diffDst,
                                                        strides, padding, padding)
        }
        try dnnlCheck(status, "\(g) backward weights (\(precision))")
        let primitive = try withUnsafePointer(to: &desc) {
            try DNNLPrimitive(UnsafeRawPointer($0), hint: forwardPrimitive, "\(g) backward weights (\(precision))")
        }
        let made = (primitive,
                    try DNNLArgument(user: try dnnlDescriptor(g.outputShape, dnnl_f32, Self.userTag(outputLayout)),
                                     primitive: primitive.query(dnnl_query_diff_dst_md), role: .input, slot: 0),
                    try DNNLArgument(user: try dnnlDescriptor(g.inputShape, dnnl_f32, Self.userTag(inputLayout)),
                                     primitive: primitive.query(dnnl_query_src_md), role: .input, slot: 1),
                    try DNNLArgument(user: try dnnlDescriptor(g.weightShape, dnnl_f32, dnnl_oihw), primitive: primitive.query(dnnl_query_diff_weights_md),
                                     role: .accumulatingOutput, slot: 2),
                    bias ? try DNNLArgument(user: diffBias, primitive: primitive.query(dnnl_query_diff_weights_md, index: 1), role: .accumulatingOutput,
                                            slot: 3) : nil)
        backwardWeights = made
        return made
    }
}

/// A convolution layer's kernels, chosen by a fixed rule (so every rank of a job computes with the same
/// ones) and cached by geometry (training, validation and evaluation batches differ).
///
/// fp32, `auto`: every convolution by im2col + sgemm, whose sums run in a fixed order per image.
/// oneDNN's fp32 kernels are faster at 3x3 and 7x7 (`convirt bench kernels --threads 2`, batch 2,
/// GFLOP/s with oneDNN's reorders from and to NCHW, against im2col + sgemm): on a 2-core Xeon with
/// AVX-512 (ISA avx512_core_bf16, OpenBLAS SkylakeX) 3x3 64->64 @56 forward 175 against 95, backward
/// 158 against 89, 1x1 mixed (256->64 @56 115 against 98, 64->256 124 against 139); on a 2-core AMD
/// EPYC (avx2) 3x3 forward 120 against 80, backward 90 against 65, 1x1 64->256 54 against 63. Their
/// forward sums do not depend on the batch either (checked bitwise at batch 1, 4 and 12 on the Xeon,
/// ISAs avx512_core and avx2, ResNet-50 and tiny shapes), and on the Xeon the tiny preset's -np 1, 2, 4
/// and accumulation runs agreed within 1e-4 with every convolution there. But their backward sums
/// round differently from im2col's, and where training is chaotic that shows: on the AMD EPYC the tiny
/// preset's -np 1 (4 accumulation steps) drifted from -np 4 by 8.6e-4 over 20 steps with the spatial
/// convolutions' forward there, and on the Xeon the in-process fine-tuning of a width-4 encoder on 1
/// and 2 ranks (Adam turns rounding-level gradients into whole steps) reached validation losses 4e-4
/// apart after one epoch (im2col: equal). So oneDNN is opt-in for fp32: `onednn` runs every
/// convolution there (forward and backward), `im2col` is the default's arithmetic by name.
///
/// bf16 runs on oneDNN's bf16 kernels where `BF16.native` (AMX; AMD's AVX512-BF16), and elsewhere as
/// the fp32 kernels above over bf16-rounded copies of the input, the weights and the output gradient
/// (the same products).
public final class Convolution {
    public enum Policy: String, Sendable, CaseIterable {
        /// fp32's default (see above): im2col + sgemm.
        case auto
        /// Every convolution on oneDNN, forward and backward.
        case onednn
        /// Every convolution by im2col + sgemm (`Conv2d`).
        case im2col
    }

    /// From CONVIRT_CONVOLUTION (auto, onednn or im2col; default auto): fixed for the process.
    public static let policy: Policy = {
        processEnvironment()["CONVIRT_CONVOLUTION"].flatMap(Policy.init(rawValue:)) ?? .auto
    }()

    /// Whether fp32's convolution `g` (and bf16's, where not native) runs on oneDNN's fp32 kernels.
    public static func usesDNNL(_ g: Conv2dGeometry) -> Bool {
        switch policy {
        case .onednn: return true
        case .auto: return false
        case .im2col: return false
        }
    }

    /// The layout a network keeps its activations in for a pass in `precision`: NCHW for im2col +
    /// sgemm; on oneDNN, the layout oneDNN itself picks for a ResNet convolution (`preferredLayout`), so
    /// that no reorder transposes an activation between two layers: NHWC where its convolutions are
    /// brgemm kernels on NHWC (AMX), nChw16c where it picks that blocked layout (AVX-512 without AMX:
    /// there our pointwise kernels read nChw16c too, ChannelsLast.swift), NCHW for any other (nChw8c on
    /// AVX2), reordered at each convolution. On a 2-core AMD EPYC with AVX512-BF16 (bf16, the paper
    /// preset's `convirt bench step --steps 3 --threads 2`): image forward + backward 0.93 s in NCHW,
    /// 0.79 s in nChw16c; reorders in the step's oneDNN trace 250 ms -> 149 ms. (NHWC measured slower
    /// than NCHW there: convolutions 552 ms against 467, its brgemm/jit NHWC kernels being slower.)
    /// CONVIRT_ACTIVATIONS=nchw|nhwc|nchw16c overrides the choice (where oneDNN runs the convolutions).
    public static func layout(precision: Precision, nativeBF16: Bool = BF16.native) -> ActivationLayout {
        let onDNNL = precision == .bf16 ? nativeBF16 : policy == .onednn
        guard onDNNL else { return .nchw }
        if let forced = forcedLayout { return forced }
        return precision == .bf16 ? preferredInBF16 : preferredInFP32
    }

    private static let forcedLayout = processEnvironment()["CONVIRT_ACTIVATIONS"].flatMap(ActivationLayout.init(rawValue:))
    private static let preferredInBF16 = ConvolutionPrimitives.preferredLayout(precision: .bf16)
    private static let preferredInFP32 = ConvolutionPrimitives.preferredLayout(precision: .fp32)

    private struct Key: Hashable {
        let geometry: Conv2dGeometry
        let precision: Precision
        let inputLayout, outputLayout: ActivationLayout
    }
    private var primitives: [Key: ConvolutionPrimitives] = [:]
    /// Whether this layer's bf16 products run on oneDNN's bf16 kernels.
    public let nativeBF16: Bool

    /// `nativeBF16`: default `BF16.native`; true needs `BF16.oneDNNRunsBF16`.
    public init(nativeBF16: Bool = BF16.native) {
        self.nativeBF16 = nativeBF16
    }

    /// oneDNN's primitives for `g` in `precision` and the layouts, made once.
    private func dnnl(_ g: Conv2dGeometry, _ precision: Precision, _ layouts: Layouts) throws -> ConvolutionPrimitives {
        let key = Key(geometry: g, precision: precision, inputLayout: layouts.input, outputLayout: layouts.output)
        if let p = primitives[key] { return p }
        let p = try ConvolutionPrimitives(geometry: g, precision: precision, inputLayout: layouts.input, outputLayout: layouts.output)
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

    /// As `Conv2d.forward`; workspace: `workspaceCount(g, precision:)` floats.
    /// `layouts` other than NCHW need oneDNN's kernels (`layout(precision:)`).
    public func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                        geometry g: Conv2dGeometry, workspace: UnsafeMutablePointer<Float>?, precision: Precision = .fp32,
                        layouts: Layouts = Layouts()) throws {
        var (input, weight, workspace) = (input, weight, workspace)
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
    /// false); in bf16 the output gradient is rounded to bf16 too.
    public func backward(gradInput: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                         input: UnsafePointer<Float>, weight: UnsafePointer<Float>, geometry g: Conv2dGeometry,
                         workspace: UnsafeMutablePointer<Float>?, precision: Precision = .fp32, layouts: Layouts = Layouts(),
                         accumulateInput: Bool = true) throws {
        var (gradOutput, input, weight, workspace) = (gradOutput, input, weight, workspace)
        if precision == .bf16 {
            if nativeBF16 {
                return try dnnl(g, .bf16, layouts).backward(gradInput: gradInput, gradWeight: gradWeight, gradBias: nil, gradOutput: gradOutput,
                                                              input: input, weight: weight, accumulateInput: accumulateInput)
            }
            precondition(layouts == Layouts(), "\(g): the bf16 emulation runs on NCHW activations only")
            let (columns, x, w, dy) = Self.emulationScratch(g, workspace, input: input, weight: weight)
            BF16.round(dy, gradOutput, count: g.outputCount)
            (gradOutput, input, weight, workspace) = (UnsafePointer(dy), UnsafePointer(x), UnsafePointer(w), columns)
        }
        if let p = try fp32(g, layouts) {
            try p.backward(gradInput: gradInput, gradWeight: gradWeight, gradBias: nil, gradOutput: gradOutput, input: input, weight: weight,
                           accumulateInput: accumulateInput)
        } else {
            if !accumulateInput { gradInput?.update(repeating: 0, count: g.inputCount) }
            Conv2d.backward(gradInput: gradInput, gradWeight: gradWeight, gradBias: nil, gradOutput: gradOutput, input: input, weight: weight,
                            geometry: g, workspace: workspace)
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
