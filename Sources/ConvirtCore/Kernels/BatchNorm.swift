// Batch normalisation over [N, C, H, W], [N, H, W, C] or nChw16c (ChannelsLast.swift) (Ioffe & Szegedy 2015), as torch.nn.BatchNorm2d: biased batch
// variance in the normalisation, unbiased variance in the running estimate, momentum 0.1 by default.
// Outside NCHW the input may come as bf16 bits (a bf16 convolution's output), read as the floats they
// stand for; the statistics and the arithmetic stay fp32.

import CKernels

/// Sums the per-channel statistics of every rank in place (SyncBN). `nil` means this rank alone; a
/// failure (of the collective) is thrown out of the pass.
/// The buffer holds doubles so that the sums of a large global batch keep their precision.
public typealias StatisticsReducer = (UnsafeMutableBufferPointer<Double>) throws -> Void

/// Sums of long float runs: float accumulation in 16 lanes inside blocks of 256 (`ck_blocked_sums`,
/// vectorized for this CPU), double across blocks, so the error does not grow with the length of the
/// run the way one naive float sum does.
@inline(__always)
func blockedSums(_ x: UnsafePointer<Float>, _ count: Int) -> (sum: Double, squares: Double) {
    var sum = 0.0, squares = 0.0
    ck_blocked_sums(x, count, &sum, &squares)
    return (sum, squares)
}

/// sum(dy) and sum(dy * (x - mean) * invStd) over a run, blocked as `blockedSums`. With `gate` (a ReLU
/// fused after the forward, whose scale and shift it gives), dy counts only where the forward's output
/// before the ReLU was positive, recomputed from x: the backward of that ReLU, fused.
@inline(__always)
func blockedGradientSums(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, mean: Float, invStd: Float, gate: (scale: Float, shift: Float)?,
                         _ count: Int) -> (Double, Double) {
    var sum = 0.0, product = 0.0
    ck_blocked_gradient_sums(dy, x, mean, invStd, gate == nil ? 0 : 1, gate?.scale ?? 0, gate?.shift ?? 0, count, &sum, &product)
    return (sum, product)
}

public enum BatchNorm2d {
    /// A pass's activation [batch, channels, plane] as it lies in `layout`, and the layer's constants.
    public struct Shape: Sendable, Equatable {
        public var batch, channels, plane: Int
        public var layout: ActivationLayout
        public var eps, momentum: Float
        public init(batch: Int, channels: Int, plane: Int, layout: ActivationLayout = .nchw, eps: Float = 1e-5, momentum: Float = 0.1) {
            self.batch = batch; self.channels = channels; self.plane = plane
            self.layout = layout; self.eps = eps; self.momentum = momentum
        }
        /// The activation as rows of channels (a layout other than NCHW).
        var rows: LaneLayout { LaneLayout(layout, batch: batch, channels: channels, plane: plane) }
    }

    /// The layer's per-channel tensors [C]: gamma and beta, and the running statistics that evaluation
    /// reads and training updates.
    public struct Parameters {
        public var gamma, beta: UnsafePointer<Float>
        public var runningMean, runningVar: UnsafeMutablePointer<Float>
        public init(gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>, runningMean: UnsafeMutablePointer<Float>,
                    runningVar: UnsafeMutablePointer<Float>) {
            self.gamma = gamma; self.beta = beta; self.runningMean = runningMean; self.runningVar = runningVar
        }
    }

    /// The gradients of gamma and beta [C], accumulated (+=).
    public struct ParameterGradients {
        public var gamma, beta: UnsafeMutablePointer<Float>
        public init(gamma: UnsafeMutablePointer<Float>, beta: UnsafeMutablePointer<Float>) { self.gamma = gamma; self.beta = beta }
    }

    /// Where a pass writes an activation or its gradient: the floats, the bf16 bits (`BF16.bits`, in a
    /// layout other than NCHW), or both.
    public struct Destination {
        public var floats: UnsafeMutablePointer<Float>?
        public var halves: UnsafeMutablePointer<UInt16>?
        public init(floats: UnsafeMutablePointer<Float>? = nil, halves: UnsafeMutablePointer<UInt16>? = nil) {
            self.floats = floats; self.halves = halves
        }
        public static func floats(_ p: UnsafeMutablePointer<Float>) -> Destination { Destination(floats: p) }
    }

    /// What `forwardTraining` leaves for `backwardTraining`: the batch mean and 1/sqrt(var + eps) [C], the
    /// element count over all ranks, and the scratch of 2C + 1 doubles where the per-channel sums are
    /// reduced over ranks.
    public struct Saved {
        public var mean: UnsafeMutablePointer<Float>
        public var invStd: UnsafeMutablePointer<Float>
        public var statistics: UnsafeMutableBufferPointer<Double>
        public var globalCount: Int = 0
        public init(mean: UnsafeMutablePointer<Float>, invStd: UnsafeMutablePointer<Float>, statistics: UnsafeMutableBufferPointer<Double>) {
            self.mean = mean
            self.invStd = invStd
            self.statistics = statistics
        }
    }

    /// Training mode: normalise with the batch statistics (global over ranks when `reducer` sums them)
    /// and update the running statistics: running = (1 - momentum) * running + momentum * batch. `input`
    /// as floats, or outside NCHW as bf16 bits; `output` as floats, bf16 bits outside NCHW, or both.
    /// With `relu`, the output is max(bn(input), 0) (the ReLU after it, fused).
    public static func forwardTraining(_ shape: Shape, output: Destination, input: RowValues, parameters: Parameters, saved: inout Saved,
                                       reducer: StatisticsReducer? = nil, relu: Bool = false) throws {
        let channels = shape.channels, batch = shape.batch, plane = shape.plane
        precondition(saved.statistics.count >= 2 * channels + 1, "batch norm statistics scratch too small")
        if shape.layout != .nchw {
            return try forwardTrainingRows(shape, output: output, input: input, parameters: parameters, saved: &saved, reducer: reducer, relu: relu)
        }
        guard let y = output.floats, output.halves == nil, let x = input.floats else { preconditionFailure("batch norm over NCHW: floats only") }
        let stats = saved.statistics.baseAddress!
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                var s = 0.0, ss = 0.0
                for n in 0..<batch {
                    let (a, b) = blockedSums(x + (n * channels + c) * plane, plane)
                    s += a; ss += b
                }
                stats[c] = s
                stats[channels + c] = ss
            }
        }
        stats[2 * channels] = Double(batch * plane)
        try settleStatistics(shape, saved: &saved, parameters: parameters, reducer: reducer)
        let means = saved.mean, invStds = saved.invStd, gamma = parameters.gamma, beta = parameters.beta
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                let mean = means[c], scale = trainingScale(gamma, invStds, c), shift = beta[c]
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane
                    ck_normalize_run(y + offset, x + offset, plane, mean, scale, shift, relu ? 1 : 0)
                }
            }
        }
    }

    /// The local sums in `saved.statistics` (sum, sum of squares, count) made global by `reducer`, then
    /// the batch mean and 1/sqrt(var + eps) into `saved`, and the running statistics updated.
    static func settleStatistics(_ shape: Shape, saved: inout Saved, parameters: Parameters, reducer: StatisticsReducer?) throws {
        try reducer?(saved.statistics)
        let stats = saved.statistics.baseAddress!, channels = shape.channels, momentum = shape.momentum
        let count = stats[2 * channels]
        saved.globalCount = Int(count)
        for c in 0..<channels {
            let mean = stats[c] / count
            let variance = max(stats[channels + c] / count - mean * mean, 0)
            saved.mean[c] = Float(mean)
            saved.invStd[c] = Float(1 / (variance + Double(shape.eps)).squareRoot())
            let unbiased = count > 1 ? variance * count / (count - 1) : variance
            parameters.runningMean[c] = (1 - momentum) * parameters.runningMean[c] + momentum * Float(mean)
            parameters.runningVar[c] = (1 - momentum) * parameters.runningVar[c] + momentum * Float(unbiased)
        }
    }

    /// Evaluation mode: normalise with the running statistics; `output`, `input` and `relu` as in
    /// `forwardTraining`.
    public static func forwardInference(_ shape: Shape, output: Destination, input: RowValues, parameters: Parameters, relu: Bool = false) {
        if shape.layout != .nchw {
            return forwardInferenceRows(shape, output: output, input: input, parameters: parameters, relu: relu)
        }
        guard let y = output.floats, output.halves == nil, let x = input.floats else { preconditionFailure("batch norm over NCHW: floats only") }
        let channels = shape.channels, batch = shape.batch, plane = shape.plane, p = parameters
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                // (x - mean) first: exact when x is close to the mean, where x * scale + shift would cancel.
                let scale = inferenceScale(p, c, eps: shape.eps), mean = p.runningMean[c], shift = p.beta[c]
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane
                    ck_normalize_run(y + offset, x + offset, plane, mean, scale, shift, relu ? 1 : 0)
                }
            }
        }
    }

    /// Backward of training mode. With x^ = (x - mean) * invStd and M the global element count:
    /// dx = gamma * invStd / M * (M * dy - sum(dy) - x^ * sum(dy * x^)), the sums being global (reduced
    /// by `reducer`) while dgamma += sum(dy * x^) and dbeta += sum(dy) take this rank's share only, since
    /// parameter gradients are summed over ranks afterwards. gradInput accumulates (+=) unless
    /// `accumulate` is false (then it is overwritten); outside NCHW it may be written as bf16 bits instead
    /// of floats (overwritten). dy comes as floats, or outside NCHW as bf16 bits (`gradOutputBF16`, used
    /// where given: a gradient a bf16 layer wrote). `relu`: the forward ran with `relu: true` (with this
    /// `beta`); dy then flows only where the forward's output before the ReLU was positive (ReLU's
    /// backward, fused), recomputed from the input with the forward's arithmetic (`ck_bn_gradient_rows`),
    /// so the gate is the forward output's sign without reading that output.
    public static func backwardTraining(_ shape: Shape, gradInput: Destination, gradients: ParameterGradients, gradOutput: UnsafePointer<Float>?,
                                        gradOutputBF16: UnsafePointer<UInt16>? = nil, input: RowValues, gamma: UnsafePointer<Float>,
                                        beta: UnsafePointer<Float>? = nil, saved: Saved, reducer: StatisticsReducer? = nil, relu: Bool = false,
                                        accumulate: Bool = true) throws {
        let channels = shape.channels, batch = shape.batch, plane = shape.plane
        precondition(saved.statistics.count >= 2 * channels + 1, "batch norm statistics scratch too small")
        precondition(!relu || beta != nil, "batch norm backward: a fused ReLU's gate needs the forward's beta")
        guard let dy = RowValues(gradOutputBF16 == nil ? gradOutput : nil, gradOutputBF16) else { preconditionFailure("batch norm backward without dy") }
        if shape.layout != .nchw {
            return try backwardTrainingRows(shape, gradInput: gradInput, gradients: gradients, gradOutput: dy, input: input,
                                            gamma: gamma, beta: beta, saved: saved, reducer: reducer, relu: relu, accumulate: accumulate)
        }
        guard let dx = gradInput.floats, gradInput.halves == nil, let x = input.floats, let gradOutput = dy.floats else {
            preconditionFailure("batch norm backward over NCHW: floats only")
        }
        let stats = saved.statistics.baseAddress!
        let means = saved.mean, invStds = saved.invStd
        func gate(_ c: Int) -> (scale: Float, shift: Float)? { relu ? (trainingScale(gamma, invStds, c), beta![c]) : nil }
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                var sdy = 0.0, sdyx = 0.0
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane
                    let (a, b) = blockedGradientSums(gradOutput + offset, x + offset, mean: means[c], invStd: invStds[c], gate: gate(c), plane)
                    sdy += a; sdyx += b
                }
                stats[c] = sdy
                stats[channels + c] = sdyx
                gradients.beta[c] += Float(sdy)
                gradients.gamma[c] += Float(sdyx)
            }
        }
        stats[2 * channels] = 0
        try reducer?(saved.statistics)
        let m = Float(saved.globalCount)
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                let k = gamma[c] * invStds[c] / m, gate = gate(c)
                let sumDy = Float(stats[c]), sumDyX = Float(stats[channels + c])
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane
                    ck_bn_gradient_run(dx + offset, gradOutput + offset, x + offset, plane, k, 1, m, sumDy, sumDyX, means[c], invStds[c],
                                       gate == nil ? 0 : 1, gate?.scale ?? 0, gate?.shift ?? 0, accumulate ? 1 : 0)
                }
            }
        }
    }

    /// Backward of evaluation mode (frozen statistics): dx = dy * gamma / sqrt(runningVar + eps);
    /// `gradInput` (none at all where no layer needs it), `relu` and `accumulate` as in `backwardTraining`.
    public static func backwardInference(_ shape: Shape, gradInput: Destination, gradients: ParameterGradients, gradOutput: UnsafePointer<Float>?,
                                         gradOutputBF16: UnsafePointer<UInt16>? = nil, input: RowValues, parameters: Parameters,
                                         relu: Bool = false, accumulate: Bool = true) {
        guard let dy = RowValues(gradOutputBF16 == nil ? gradOutput : nil, gradOutputBF16) else { preconditionFailure("batch norm backward without dy") }
        if shape.layout != .nchw {
            return backwardInferenceRows(shape, gradInput: gradInput, gradients: gradients, gradOutput: dy, input: input,
                                         parameters: parameters, relu: relu, accumulate: accumulate)
        }
        guard gradInput.halves == nil, let x = input.floats, let gradOutput = dy.floats else {
            preconditionFailure("batch norm backward over NCHW: floats only")
        }
        let channels = shape.channels, batch = shape.batch, plane = shape.plane, p = parameters, dx = gradInput.floats
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                let invStd = 1 / (p.runningVar[c] + shape.eps).squareRoot(), mean = p.runningMean[c], k = p.gamma[c] * invStd
                let gate = relu ? (scale: inferenceScale(p, c, eps: shape.eps), shift: p.beta[c]) : nil
                var sdy = 0.0, sdyx = 0.0
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane
                    let (a, b) = blockedGradientSums(gradOutput + offset, x + offset, mean: mean, invStd: invStd, gate: gate, plane)
                    sdy += a; sdyx += b
                    if let dx {
                        ck_bn_gradient_run(dx + offset, gradOutput + offset, x + offset, plane, k, 0, 0, 0, 0, mean, invStd,
                                           gate == nil ? 0 : 1, gate?.scale ?? 0, gate?.shift ?? 0, accumulate ? 1 : 0)
                    }
                }
                gradients.beta[c] += Float(sdy)
                gradients.gamma[c] += Float(sdyx)
            }
        }
    }

    /// The scale of the forward's normalisation of channel c, y = (x - mean) * scale + shift, in training:
    /// gamma * invStd of the batch statistics. The forward and its backward's recomputed ReLU gate take it
    /// from here (and shift = beta), so the gate is the sign the forward's output had.
    @inline(__always)
    static func trainingScale(_ gamma: UnsafePointer<Float>, _ invStd: UnsafePointer<Float>, _ c: Int) -> Float { gamma[c] * invStd[c] }

    /// That scale in evaluation mode: gamma / sqrt(runningVar + eps).
    @inline(__always)
    static func inferenceScale(_ p: Parameters, _ c: Int, eps: Float) -> Float { p.gamma[c] / (p.runningVar[c] + eps).squareRoot() }
}
