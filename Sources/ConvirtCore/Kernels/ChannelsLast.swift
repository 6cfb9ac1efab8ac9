// The ResNet's per-channel and spatial kernels over channels-last activations ([N, H, W, C], NHWC) and
// over oneDNN's blocked nChw16c ([N, C/16, H, W, 16]) and nChw8c ([N, C/8, H, W, 8]): the layouts the
// network keeps from layer to layer where its convolutions run on oneDNN and oneDNN picks them
// (`Convolution.layout`), so that no reorder transposes an activation between two layers (with NCHW,
// every convolution's input and output went through a reorder to and from oneDNN's blocked layout). NHWC
// holds any channel count and is the layout of oneDNN's brgemm convolutions (AMX); nChw16c is the one of
// its AVX-512 convolutions, nChw8c of its AVX2 ones, and they need channels in multiples of 16 and 8.
// All are rows of `lanes` channels of one pixel (`LaneLayout`), so one set of kernels serves them all.
// Images enter as NCHW; the stem's reorder lays them out.
//
// The arithmetic per channel is the NCHW kernels' (sums in float inside blocks of 256 rows, double
// across blocks); each thread owns a range of channels (sums) or of rows (pointwise passes), so the
// results do not depend on the thread count.

import CKernels

/// How a 4-d activation [N, C, H, W] lies in memory.
public enum ActivationLayout: String, Sendable, Hashable, CaseIterable {
    /// [N, C, H, W] (PyTorch's default).
    case nchw
    /// [N, H, W, C] (channels last).
    case nhwc
    /// [N, C/16, H, W, 16] (oneDNN's nChw16c, its layout for AVX-512 convolutions): C a multiple of 16.
    case blocked16 = "nchw16c"
    /// [N, C/8, H, W, 8] (oneDNN's nChw8c, its layout for AVX2 convolutions): C a multiple of 8.
    case blocked8 = "nchw8c"

    /// The layouts made of rows of channels (all but NCHW).
    public static let rowLayouts: [ActivationLayout] = [.nhwc, .blocked16, .blocked8]

    /// The channels of a blocked layout's block (16, 8); nil for NCHW and NHWC.
    public var blockChannels: Int? {
        switch self {
        case .blocked16: 16
        case .blocked8: 8
        case .nchw, .nhwc: nil
        }
    }

    /// Whether an activation of `channels` channels can lie so.
    public func holds(channels: Int) -> Bool { blockChannels.map { channels % $0 == 0 } ?? true }

    /// The rows of `lanes` channels (of one pixel) the layout is made of, for an activation [batch, C, H, W]
    /// other than NCHW: (batch, C) in NHWC, (batch * C / 16, 16) in nChw16c, (batch * C / 8, 8) in
    /// nChw8c. The pixel-wise kernels (max pool, global average pool) run on each as on NHWC images of
    /// `images` images and `lanes` channels: a blocked layout is NHWC over each block of channels.
    public func pixelRows(batch: Int, channels: Int) -> (images: Int, lanes: Int) {
        precondition(self != .nchw && holds(channels: channels), "\(self) holds no rows of \(channels) channels")
        guard let block = blockChannels else { return (batch, channels) }
        return (batch * channels / block, block)
    }
}

/// An activation in a layout other than NCHW as rows of `lanes` channels: the element (n, g, p, l) of
/// channel g * lanes + l at ((n * groups + g) * plane + p) * lanes + l. NHWC is (N, 1, H*W, C), nChw16c
/// (N, C/16, H*W, 16), nChw8c (N, C/8, H*W, 8): the outer index is the image in each, so that sums over
/// the batch are sums over images, one image after another (whatever the batch, an image's sums are the
/// same).
struct LaneLayout {
    let outer, groups, plane, lanes: Int

    init(_ layout: ActivationLayout, batch: Int, channels: Int, plane: Int) {
        precondition(layout != .nchw && layout.holds(channels: channels), "\(layout) does not hold \(channels) channels in rows")
        let block = layout.blockChannels ?? channels
        (outer, groups, self.plane, lanes) = (batch, channels / block, plane, block)
    }

    var channels: Int { groups * lanes }
    var rows: Int { outer * groups * plane }
    /// The channel of row r's first lane.
    @inline(__always) func firstChannel(ofRow r: Int) -> Int { (r / plane % groups) * lanes }

    /// body(rows, c0) for the runs of `range` whose rows share their channels (c0 the first).
    @inline(__always) func runs(_ range: Range<Int>, _ body: (Range<Int>, Int) -> Void) {
        var r = range.lowerBound
        while r < range.upperBound {
            let end = min(range.upperBound, (r / plane + 1) * plane)
            body(r..<end, firstChannel(ofRow: r))
            r = end
        }
    }
}

/// Values a kernel reads: floats, or bf16 bits (batch norm's input where the convolution before it wrote
/// bf16, its output gradient where a bf16 convolution's backward or the residual sum's wrote bf16).
public enum RowValues {
    case fp32(UnsafePointer<Float>)
    case bf16(UnsafePointer<UInt16>)

    /// `fp32` of `floats`, or `bf16` of `halves` where `floats` is nil; nil where both are.
    public init?(_ floats: UnsafePointer<Float>?, _ halves: UnsafePointer<UInt16>?) {
        if let floats { self = .fp32(floats) } else if let halves { self = .bf16(halves) } else { return nil }
    }

    @inline(__always) func advanced(by n: Int) -> RowValues {
        switch self {
        case .fp32(let p): .fp32(p + n)
        case .bf16(let p): .bf16(p + n)
        }
    }
    public var floats: UnsafePointer<Float>? { if case .fp32(let p) = self { p } else { nil } }
    public var halves: UnsafePointer<UInt16>? { if case .bf16(let p) = self { p } else { nil } }
}

/// Sums over the rows of [rows, channels] for the channels c0..<c0+width, into first[j] and second[j]
/// (j = c): float inside blocks of 256 rows, double across blocks (as `blockedSums`). Without
/// `gradient`: sum(x) and sum(x^2). With it: sum(g) and sum(g * (x - mean)), g = dy, or with a gate (the
/// forward's scale and shift, where a ReLU was fused after it) dy where the forward's output before the
/// ReLU was positive (`ck_channel_sums`).
func channelBlockedSums(_ x: RowValues, gradient: LaneGradient?, rows: Int, channels: Int, c0: Int, width: Int,
                        first: UnsafeMutablePointer<Double>, second: UnsafeMutablePointer<Double>) {
    let x = x.advanced(by: c0), g = gradient?.advanced(by: c0, channel: c0)
    ck_channel_sums(x.floats, x.halves, g?.dy.floats, g?.dy.halves, g?.mean, g?.gate?.scale, g?.gate?.shift, rows, channels, width,
                    first, second)
}

/// A fused ReLU's gate as batch norm's backward recomputes it: the forward's per-channel scale and shift.
typealias ReLUGate = (scale: UnsafePointer<Float>, shift: UnsafePointer<Float>)

/// The gradient a batch norm's backward sums: dy (floats or bf16 bits), the mean the input is centred on,
/// and the fused ReLU's gate where there is one (per-channel arrays).
struct LaneGradient {
    var dy: RowValues
    var mean: UnsafePointer<Float>
    var gate: ReLUGate?

    /// The same gradient from element `offset` of dy and channel `channel` of the per-channel arrays on.
    @inline(__always) func advanced(by offset: Int, channel: Int) -> LaneGradient {
        LaneGradient(dy: dy.advanced(by: offset), mean: mean + channel, gate: gate.map { ($0.scale + channel, $0.shift + channel) })
    }
}

/// Per channel of `shape`, the sums of `channelBlockedSums` over all its rows into first[c] and
/// second[c], in one order whatever the thread count: float inside blocks of 256 rows of an image,
/// double across an image's blocks in order, then across the outer index (images) in order. The threads
/// share out units of whole rows: in NHWC one block of one image (its rows hold every channel, read
/// once and in order), in a blocked layout one image's plane of one group of 16 or 8 channels. Each
/// unit's sums go to a partial of its own, and the partials are added in that order afterwards, so a
/// channel's sums do not depend on how many threads there are, or on how many channels a row holds
/// (`ck_channel_sums`).
/// `gradient`'s mean and gate are indexed by channel.
func laneSums(_ x: RowValues, gradient: LaneGradient?,
              shape: LaneLayout, first: UnsafeMutablePointer<Double>, second: UnsafeMutablePointer<Double>) {
    let lanes = shape.lanes, plane = shape.plane, groups = shape.groups
    // Units of one block where rows hold many channels, else the whole plane (the kernel adds its blocks).
    let unitRows = lanes > 16 ? Int(CK_BLOCK_ROWS) : plane
    let unitsPerPlane = (plane + unitRows - 1) / unitRows, units = shape.outer * groups * unitsPerPlane
    let partials = ThreadScratch.current.reorderSlot(ThreadScratch.laneSumsSlot, bytes: units * 2 * lanes * MemoryLayout<Double>.size)
        .assumingMemoryBound(to: Double.self)
    Parallel.chunks(units, cost: unitRows * lanes) { range in
        for u in range {
            let part = u % unitsPerPlane, g = u / unitsPerPlane % groups, n = u / (unitsPerPlane * groups)
            let r0 = part * unitRows, o = ((n * groups + g) * plane + r0) * lanes, p = partials + u * 2 * lanes
            channelBlockedSums(x.advanced(by: o), gradient: gradient?.advanced(by: o, channel: g * lanes), rows: min(unitRows, plane - r0),
                               channels: lanes, c0: 0, width: lanes, first: p, second: p + lanes)
        }
    }
    // first[c] = sum over images (sum over the image's units), each sum from 0 in order.
    Parallel.chunks(shape.channels, cost: 2 * units / groups) { range in
        withUnsafeTemporaryAllocation(of: Double.self, capacity: 2 * range.count) { buffer in
            let f = buffer.baseAddress!, s = f + range.count
            var c = range.lowerBound
            while c < range.upperBound {
                let g = c / lanes, l0 = c % lanes, width = min(lanes - l0, range.upperBound - c)
                let total = first + c, totalSecond = second + c
                total.update(repeating: 0, count: width)
                totalSecond.update(repeating: 0, count: width)
                for n in 0..<shape.outer {
                    f.update(repeating: 0, count: width)
                    s.update(repeating: 0, count: width)
                    for part in 0..<unitsPerPlane {
                        let p = partials + ((n * groups + g) * unitsPerPlane + part) * 2 * lanes + l0
                        for j in 0..<width { f[j] += p[j]; s[j] += p[lanes + j] }
                    }
                    for j in 0..<width { total[j] += f[j]; totalSecond[j] += s[j] }
                }
                c += width
            }
        }
    }
}

extension BatchNorm2d {
    /// `forwardTraining` over rows of channels (NHWC, nChw16c or nChw8c); the output as floats, as bf16
    /// bits, or both.
    static func forwardTrainingRows(_ layer: Shape, output: Destination, input: RowValues, parameters: Parameters, saved: inout Saved,
                                    reducer: StatisticsReducer?, relu: Bool) throws {
        let shape = layer.rows, stats = saved.statistics.baseAddress!, channels = shape.channels, lanes = shape.lanes
        laneSums(input, gradient: nil, shape: shape, first: stats, second: stats + channels)
        stats[2 * channels] = Double(shape.rows * lanes / channels)
        try settleStatistics(layer, saved: &saved, parameters: parameters, reducer: reducer)
        let means = saved.mean, invStds = saved.invStd, gamma = parameters.gamma
        withUnsafeTemporaryAllocation(of: Float.self, capacity: channels) { buffer in
            // The scale as the NCHW kernel forms it (gamma * invStd, then one multiply): equal outputs.
            let scales = buffer.baseAddress!
            for c in 0..<channels { scales[c] = trainingScale(gamma, invStds, c) }
            normalizeRows(output: output, input: input, mean: means, scale: scales, shift: parameters.beta, shape: shape, relu: relu)
        }
    }

    /// y = (x - mean) * scale + shift per channel over every row, max(that, 0) with `relu`.
    private static func normalizeRows(output: Destination, input: RowValues, mean: UnsafePointer<Float>, scale: UnsafePointer<Float>,
                                      shift: UnsafePointer<Float>, shape: LaneLayout, relu: Bool) {
        precondition(output.floats != nil || output.halves != nil, "batch norm without an output")
        let lanes = shape.lanes
        Parallel.chunks(shape.rows, cost: lanes) { range in
            shape.runs(range) { rows, c0 in
                let o = rows.lowerBound * lanes, x = input.advanced(by: o)
                ck_normalize_rows(output.floats.map { $0 + o }, output.halves.map { $0 + o }, x.floats, x.halves, rows.count, lanes, mean + c0, scale + c0,
                                  shift + c0, relu ? 1 : 0)
            }
        }
    }

    /// `forwardInference` over rows of channels.
    static func forwardInferenceRows(_ layer: Shape, output: Destination, input: RowValues, parameters p: Parameters, relu: Bool) {
        let channels = layer.channels
        withUnsafeTemporaryAllocation(of: Float.self, capacity: channels) { buffer in
            let scales = buffer.baseAddress!
            for c in 0..<channels { scales[c] = inferenceScale(p, c, eps: layer.eps) }
            normalizeRows(output: output, input: input, mean: p.runningMean, scale: scales, shift: p.beta, shape: layer.rows, relu: relu)
        }
    }

    /// Per channel: sum(g) and sum(g * (x - mean)) * invStd over the rows into first/second, g = dy, or
    /// dy gated by a fused ReLU (`gate`: the forward's scale and shift).
    private static func gradientSumsRows(_ first: UnsafeMutablePointer<Double>, _ second: UnsafeMutablePointer<Double>,
                                         gradOutput: RowValues, input: RowValues, mean: UnsafePointer<Float>,
                                         invStd: UnsafePointer<Float>, gate: ReLUGate?,
                                         shape: LaneLayout) {
        laneSums(input, gradient: LaneGradient(dy: gradOutput, mean: mean, gate: gate), shape: shape, first: first, second: second)
        for c in 0..<shape.channels { second[c] *= Double(invStd[c]) }
    }

    /// `backwardTraining` over rows of channels; the input gradient as floats or as bf16 bits.
    static func backwardTrainingRows(_ layer: Shape, gradInput: Destination, gradients: ParameterGradients, gradOutput: RowValues,
                                     input: RowValues, gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>?, saved: Saved,
                                     reducer: StatisticsReducer?, relu: Bool, accumulate: Bool) throws {
        let gradInputBF16 = gradInput.halves, statistics = saved.statistics
        precondition((gradInput.floats == nil) != (gradInputBF16 == nil) && !(gradInputBF16 != nil && accumulate), "batch norm backward: one input gradient")
        let shape = layer.rows, stats = statistics.baseAddress!, channels = shape.channels, lanes = shape.lanes
        let means = saved.mean, invStds = saved.invStd
        try withUnsafeTemporaryAllocation(of: Float.self, capacity: 4 * channels) { buffer in
            let k = buffer.baseAddress!, sumDy = k + channels, sumDyX = sumDy + channels, scales = sumDyX + channels
            for c in 0..<channels { scales[c] = trainingScale(gamma, invStds, c) }
            let gate: ReLUGate? = relu ? (UnsafePointer(scales), beta!) : nil
            gradientSumsRows(stats, stats + channels, gradOutput: gradOutput, input: input, mean: means, invStd: invStds, gate: gate, shape: shape)
            for c in 0..<channels {
                gradients.beta[c] += Float(stats[c])
                gradients.gamma[c] += Float(stats[channels + c])
            }
            stats[2 * channels] = 0
            try reducer?(statistics)
            let m = Float(saved.globalCount)
            for c in 0..<channels {
                k[c] = gamma[c] * invStds[c] / m
                sumDy[c] = Float(stats[c])
                sumDyX[c] = Float(stats[channels + c])
            }
            Parallel.chunks(shape.rows, cost: lanes) { range in
                shape.runs(range) { rows, c0 in
                    let o = rows.lowerBound * lanes, x = input.advanced(by: o), dy = gradOutput.advanced(by: o)
                    ck_bn_gradient_rows(gradInput.floats.map { $0 + o }, gradInputBF16.map { $0 + o }, dy.floats, dy.halves, x.floats, x.halves,
                                        rows.count, lanes, k + c0, sumDy + c0, sumDyX + c0, means + c0, invStds + c0,
                                        gate.map { $0.scale + c0 }, gate.map { $0.shift + c0 }, m, accumulate ? 1 : 0)
                }
            }
        }
    }

    /// `backwardInference` over rows of channels.
    static func backwardInferenceRows(_ layer: Shape, gradInput: Destination, gradients: ParameterGradients, gradOutput: RowValues,
                                      input: RowValues, parameters p: Parameters, relu: Bool, accumulate: Bool) {
        let (gradInputFloats, gradInputBF16) = (gradInput.floats, gradInput.halves)
        precondition(!(gradInputFloats != nil && gradInputBF16 != nil) && !(gradInputBF16 != nil && accumulate), "batch norm backward: one input gradient")
        let shape = layer.rows, channels = shape.channels, lanes = shape.lanes
        withUnsafeTemporaryAllocation(of: Double.self, capacity: 2 * channels) { sums in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * channels) { buffer in
                let invStd = buffer.baseAddress!, k = invStd + channels, scales = k + channels
                for c in 0..<channels {
                    invStd[c] = 1 / (p.runningVar[c] + layer.eps).squareRoot()
                    k[c] = p.gamma[c] * invStd[c]
                    scales[c] = inferenceScale(p, c, eps: layer.eps)
                }
                let gate: ReLUGate? = relu ? (UnsafePointer(scales), p.beta) : nil
                let sdy = sums.baseAddress!, sdyx = sdy + channels
                gradientSumsRows(sdy, sdyx, gradOutput: gradOutput, input: input, mean: p.runningMean, invStd: invStd, gate: gate, shape: shape)
                for c in 0..<channels {
                    gradients.beta[c] += Float(sdy[c])
                    gradients.gamma[c] += Float(sdyx[c])
                }
                guard gradInputFloats != nil || gradInputBF16 != nil else { return }
                Parallel.chunks(shape.rows, cost: lanes) { range in
                    shape.runs(range) { rows, c0 in
                        let o = rows.lowerBound * lanes, x = input.advanced(by: o), dy = gradOutput.advanced(by: o)
                        ck_bn_gradient_rows(gradInputFloats.map { $0 + o }, gradInputBF16.map { $0 + o }, dy.floats, dy.halves, x.floats, x.halves,
                                            rows.count, lanes, k + c0, nil, nil, p.runningMean + c0, nil,
                                            gate.map { $0.scale + c0 }, gate.map { $0.shift + c0 }, 0, accumulate ? 1 : 0)
                    }
                }
            }
        }
    }
}

extension MaxPool2d {
    /// `forward` over [N, H, W, C] -> [N, OH, OW, C]; indices (same shape as the output) keep the argmax
    /// as a flat index into the image's plane (y * W + x), as the NCHW kernel's.
    public static func forwardNHWC(output: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>, input: UnsafePointer<Float>,
                                   batch: Int, channels: Int, height: Int, width: Int, kernel: Int = 3, stride: Int = 2, padding: Int = 1) {
        let oh = outputSize(height, kernel: kernel, stride: stride, padding: padding)
        let ow = outputSize(width, kernel: kernel, stride: stride, padding: padding)
        Parallel.chunks(batch * oh, cost: ow * kernel * kernel * channels) { range in
            ck_maxpool_rows(output, indices, input, height, width, channels, oh, ow, kernel, stride, padding, range.lowerBound, range.upperBound)
        }
    }

    /// gradInput[n, argmax, c] += gradOutput[n, p, c] over [N, OH*OW, C] -> [N, H*W, C].
    public static func backwardNHWC(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>, indices: UnsafePointer<Int32>,
                                    batch: Int, channels: Int, inPlane: Int, outPlane: Int) {
        Parallel.chunks(batch, cost: outPlane * channels) { range in
            for n in range {
                let dx = gradInput + n * inPlane * channels
                for p in 0..<outPlane {
                    let o = (n * outPlane + p) * channels
                    for c in 0..<channels { dx[Int(indices[o + c]) * channels + c] += gradOutput[o + c] }
                }
            }
        }
    }
}

extension GlobalAvgPool {
    /// output[n, c] = mean over p of input[n, p, c]: [N, plane, C] -> [N, C], each sum in the NCHW
    /// kernel's order (p ascending), so the two layouts give equal features.
    public static func forwardNHWC(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, batch: Int, channels: Int, plane: Int) {
        let scale = 1 / Float(plane)
        for n in 0..<batch {
            let y = output + n * channels
            y.update(repeating: 0, count: channels)
            for p in 0..<plane {
                let x = input + (n * plane + p) * channels
                for c in 0..<channels { y[c] += x[c] }
            }
            for c in 0..<channels { y[c] *= scale }
        }
    }

    /// gradInput[n, p, c] += gradOutput[n, c] / plane.
    public static func backwardNHWC(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>, batch: Int, channels: Int,
                                    plane: Int) {
        let scale = 1 / Float(plane)
        for n in 0..<batch {
            let g = gradOutput + n * channels
            for p in 0..<plane {
                let dx = gradInput + (n * plane + p) * channels
                for c in 0..<channels { dx[c] += g[c] * scale }
            }
        }
    }
}
