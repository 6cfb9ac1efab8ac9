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

/// sum(dy) and sum(dy * (x - mean) * invStd) over a run, blocked as `blockedSums`. With `mask` (the
/// output of a ReLU that followed), dy counts only where mask > 0: the backward of that ReLU, fused.
@inline(__always)
func blockedGradientSums(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, mask: UnsafePointer<Float>?, mean: Float, invStd: Float,
                         _ count: Int) -> (Double, Double) {
    var sum = 0.0, product = 0.0
    ck_blocked_gradient_sums(dy, x, mask, mean, invStd, count, &sum, &product)
    return (sum, product)
}

/// y = (x - mean) * scale + shift over a run, or max(that, 0) with `relu` (the ReLU after it, fused).
@inline(__always)
func normalizeRun(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, mean: Float, scale: Float, shift: Float, relu: Bool,
                  _ count: Int) {
    if relu {
        for p in 0..<count { y[p] = max((x[p] - mean) * scale + shift, 0) }
    } else {
        for p in 0..<count { y[p] = (x[p] - mean) * scale + shift }
    }
}

/// dx = value(dy) or dx += value(dy) over a run, dy masked by a following ReLU's output when `mask` is given.
/// (Every load is unconditional, a select picks: so the loops vectorize.)
@inline(__always)
func gradientRun(_ dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, mask: UnsafePointer<Float>?, accumulate: Bool, _ count: Int,
                 _ value: (Float, Int) -> Float) {
    switch (mask, accumulate) {
    case (let mask?, true): for p in 0..<count { let d = dy[p]; dx[p] += value(mask[p] > 0 ? d : 0, p) }
    case (let mask?, false): for p in 0..<count { let d = dy[p]; dx[p] = value(mask[p] > 0 ? d : 0, p) }
    case (nil, true): for p in 0..<count { dx[p] += value(dy[p], p) }
    case (nil, false): for p in 0..<count { dx[p] = value(dy[p], p) }
    }
}

public enum BatchNorm2d {
    /// The input as the row kernels read it: its bf16 bits where given, else its floats.
    static func rows(_ input: UnsafePointer<Float>?, _ inputBF16: UnsafePointer<UInt16>?) -> RowValues {
        if let inputBF16 { return .bf16(inputBF16) }
        guard let input else { preconditionFailure("batch norm without an input") }
        return .fp32(input)
    }

    /// Per-channel state that `forwardTraining` leaves for `backward`: the batch mean, 1/sqrt(var + eps)
    /// and the element count over all ranks. Each is [C].
    public struct Saved {
        public var mean: UnsafeMutablePointer<Float>
        public var invStd: UnsafeMutablePointer<Float>
        public var globalCount: Int = 0
        public init(mean: UnsafeMutablePointer<Float>, invStd: UnsafeMutablePointer<Float>) {
            self.mean = mean
            self.invStd = invStd
        }
    }

    /// Training mode: normalise with the batch statistics (global over ranks when `reducer` sums them)
    /// and update the running statistics: running = (1 - momentum) * running + momentum * batch.
    /// - output, input: [N, C, HW] ([N, HW, C] with `layout` .nhwc); gamma, beta, runningMean,
    ///   runningVar: [C]; statistics: scratch of 2C + 1 doubles.
    /// - outputBF16: the output's bf16 bits (`BF16.bits`), as well as or instead of the floats (output
    ///   nil), in a layout other than NCHW.
    /// - inputBF16: the input as bf16 bits instead of floats (input nil), in a layout other than NCHW.
    public static func forwardTraining(
        output: UnsafeMutablePointer<Float>?, outputBF16: UnsafeMutablePointer<UInt16>? = nil, input: UnsafePointer<Float>?,
        inputBF16: UnsafePointer<UInt16>? = nil,
        gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
        runningMean: UnsafeMutablePointer<Float>, runningVar: UnsafeMutablePointer<Float>,
        saved: inout Saved, batch: Int, channels: Int, plane: Int, eps: Float = 1e-5, momentum: Float = 0.1,
        statistics: UnsafeMutableBufferPointer<Double>, reducer: StatisticsReducer? = nil, relu: Bool = false,
        layout: ActivationLayout = .nchw
    ) throws {
        precondition(statistics.count >= 2 * channels + 1, "batch norm statistics scratch too small")
        if layout != .nchw {
            return try forwardTrainingRows(output: output, outputBF16: outputBF16, input: rows(input, inputBF16), gamma: gamma, beta: beta,
                                           runningMean: runningMean,
                                           runningVar: runningVar, saved: &saved,
                                           shape: LaneLayout(layout, batch: batch, channels: channels, plane: plane), eps: eps,
                                           momentum: momentum, statistics: statistics, reducer: reducer, relu: relu)
        }
        guard let output, outputBF16 == nil, let input, inputBF16 == nil else { preconditionFailure("batch norm over NCHW: floats only") }
        let stats = statistics.baseAddress!
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                var s = 0.0, ss = 0.0
                for n in 0..<batch {
                    let (a, b) = blockedSums(input + (n * channels + c) * plane, plane)
                    s += a; ss += b
                }
                stats[c] = s
                stats[channels + c] = ss
            }
        }
        stats[2 * channels] = Double(batch * plane)
        try settleStatistics(stats, saved: &saved, runningMean: runningMean, runningVar: runningVar, channels: channels, eps: eps,
                             momentum: momentum, reducer: reducer, statistics: statistics)
        let means = saved.mean, invStds = saved.invStd
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                let mean = means[c], scale = gamma[c] * invStds[c], shift = beta[c]
                for n in 0..<batch {
                    let x = input + (n * channels + c) * plane, y = output + (n * channels + c) * plane
                    normalizeRun(y, x, mean: mean, scale: scale, shift: shift, relu: relu, plane)
                }
            }
        }
    }

    /// The local sums in stats (sum, sum of squares, count) made global by `reducer`, then the batch
    /// mean and 1/sqrt(var + eps) into `saved`, and the running statistics updated.
    static func settleStatistics(_ stats: UnsafeMutablePointer<Double>, saved: inout Saved, runningMean: UnsafeMutablePointer<Float>,
                                 runningVar: UnsafeMutablePointer<Float>, channels: Int, eps: Float, momentum: Float,
                                 reducer: StatisticsReducer?, statistics: UnsafeMutableBufferPointer<Double>) throws {
        try reducer?(statistics)
        let count = stats[2 * channels]
        saved.globalCount = Int(count)
        for c in 0..<channels {
            let mean = stats[c] / count
            let variance = max(stats[channels + c] / count - mean * mean, 0)
            saved.mean[c] = Float(mean)
            saved.invStd[c] = Float(1 / (variance + Double(eps)).squareRoot())
            let unbiased = count > 1 ? variance * count / (count - 1) : variance
            runningMean[c] = (1 - momentum) * runningMean[c] + momentum * Float(mean)
            runningVar[c] = (1 - momentum) * runningVar[c] + momentum * Float(unbiased)
        }
    }

    /// Evaluation mode: normalise with the running statistics.
    public static func forwardInference(
        output: UnsafeMutablePointer<Float>?, outputBF16: UnsafeMutablePointer<UInt16>? = nil, input: UnsafePointer<Float>?,
        inputBF16: UnsafePointer<UInt16>? = nil, gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
        runningMean: UnsafePointer<Float>, runningVar: UnsafePointer<Float>,
        batch: Int, channels: Int, plane: Int, eps: Float = 1e-5, relu: Bool = false, layout: ActivationLayout = .nchw
    ) {
        if layout != .nchw {
            return forwardInferenceRows(output: output, outputBF16: outputBF16, input: rows(input, inputBF16), gamma: gamma, beta: beta,
                                        runningMean: runningMean,
                                        runningVar: runningVar, shape: LaneLayout(layout, batch: batch, channels: channels, plane: plane), eps: eps,
                                        relu: relu)
        }
        guard let output, outputBF16 == nil, let input, inputBF16 == nil else { preconditionFailure("batch norm over NCHW: floats only") }
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                // (x - mean) first: exact when x is close to the mean, where x * scale + shift would cancel.
                let scale = gamma[c] / (runningVar[c] + eps).squareRoot(), mean = runningMean[c], shift = beta[c]
                for n in 0..<batch {
                    let x = input + (n * channels + c) * plane, y = output + (n * channels + c) * plane
                    normalizeRun(y, x, mean: mean, scale: scale, shift: shift, relu: relu, plane)
                }
            }
        }
    }

    /// Backward of training mode. With x^ = (x - mean) * invStd and M the global element count:
    /// dx = gamma * invStd / M * (M * dy - sum(dy) - x^ * sum(dy * x^)), the sums being global (reduced
    /// by `reducer`) while dgamma += sum(dy * x^) and dbeta += sum(dy) take this rank's share only, since
    /// parameter gradients are summed over ranks afterwards. All gradients accumulate (+=), gradInput
    /// unless `accumulate` is false (then it is overwritten). `reluOutput`: the output of the forward
    /// pass that ran with `relu: true`; dy then flows only where it is positive (ReLU's backward, fused).
    /// Outside NCHW, `reluOutputBF16` (that output's bf16 copy) may stand for it, and `gradInputBF16`
    /// take the input gradient's bf16 bits instead of gradInput (overwritten).
    public static func backwardTraining(
        gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>? = nil, gradGamma: UnsafeMutablePointer<Float>, gradBeta: UnsafeMutablePointer<Float>,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>?, inputBF16: UnsafePointer<UInt16>? = nil, gamma: UnsafePointer<Float>,
        saved: Saved, batch: Int, channels: Int, plane: Int,
        statistics: UnsafeMutableBufferPointer<Double>, reducer: StatisticsReducer? = nil,
        reluOutput: UnsafePointer<Float>? = nil, reluOutputBF16: UnsafePointer<UInt16>? = nil, accumulate: Bool = true,
        layout: ActivationLayout = .nchw
    ) throws {
        precondition(statistics.count >= 2 * channels + 1, "batch norm statistics scratch too small")
        if layout != .nchw {
            return try backwardTrainingRows(gradInput: gradInput, gradInputBF16: gradInputBF16, gradGamma: gradGamma, gradBeta: gradBeta,
                                            gradOutput: gradOutput, input: rows(input, inputBF16), gamma: gamma, saved: saved,
                                            shape: LaneLayout(layout, batch: batch, channels: channels, plane: plane), statistics: statistics,
                                            reducer: reducer, reluOutput: ReLUMask(reluOutput, reluOutputBF16), accumulate: accumulate)
        }
        guard let gradInput, gradInputBF16 == nil, reluOutputBF16 == nil, let input, inputBF16 == nil else {
            preconditionFailure("batch norm backward over NCHW: floats only")
        }
        let stats = statistics.baseAddress!
        let means = saved.mean, invStds = saved.invStd
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                var sdy = 0.0, sdyx = 0.0
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane
                    let (a, b) = blockedGradientSums(gradOutput + offset, input + offset, mask: reluOutput.map { $0 + offset },
                                                     mean: means[c], invStd: invStds[c], plane)
                    sdy += a; sdyx += b
                }
                stats[c] = sdy
                stats[channels + c] = sdyx
                gradBeta[c] += Float(sdy)
                gradGamma[c] += Float(sdyx)
            }
        }
        stats[2 * channels] = 0
        try reducer?(statistics)
        let m = Float(saved.globalCount)
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                let mean = means[c], invStd = invStds[c]
                let k = gamma[c] * invStd / m
                let sumDy = Float(stats[c]), sumDyX = Float(stats[channels + c])
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane, x = input + offset
                    gradientRun(gradInput + offset, gradOutput + offset, mask: reluOutput.map { $0 + offset }, accumulate: accumulate, plane) { dy, p in
                        k * (m * dy - sumDy - (x[p] - mean) * invStd * sumDyX)
                    }
                }
            }
        }
    }

    /// Backward of evaluation mode (frozen statistics): dx = dy * gamma / sqrt(runningVar + eps);
    /// `reluOutput` and `accumulate` as in `backwardTraining`.
    public static func backwardInference(
        gradInput: UnsafeMutablePointer<Float>?, gradGamma: UnsafeMutablePointer<Float>, gradBeta: UnsafeMutablePointer<Float>,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>?, inputBF16: UnsafePointer<UInt16>? = nil, gamma: UnsafePointer<Float>,
        runningMean: UnsafePointer<Float>, runningVar: UnsafePointer<Float>,
        batch: Int, channels: Int, plane: Int, eps: Float = 1e-5, reluOutput: UnsafePointer<Float>? = nil,
        reluOutputBF16: UnsafePointer<UInt16>? = nil, gradInputBF16: UnsafeMutablePointer<UInt16>? = nil, accumulate: Bool = true,
        layout: ActivationLayout = .nchw
    ) {
        if layout != .nchw {
            return backwardInferenceRows(gradInput: gradInput, gradInputBF16: gradInputBF16, gradGamma: gradGamma, gradBeta: gradBeta,
                                         gradOutput: gradOutput, input: rows(input, inputBF16), gamma: gamma, runningMean: runningMean,
                                         runningVar: runningVar,
                                         shape: LaneLayout(layout, batch: batch, channels: channels, plane: plane),
                                         eps: eps, reluOutput: ReLUMask(reluOutput, reluOutputBF16), accumulate: accumulate)
        }
        guard gradInputBF16 == nil, reluOutputBF16 == nil, let input, inputBF16 == nil else {
            preconditionFailure("batch norm backward over NCHW: floats only")
        }
        Parallel.chunks(channels, cost: batch * plane) { range in
            for c in range {
                let invStd = 1 / (runningVar[c] + eps).squareRoot(), mean = runningMean[c]
                var sdy = 0.0, sdyx = 0.0
                for n in 0..<batch {
                    let offset = (n * channels + c) * plane, mask = reluOutput.map { $0 + offset }
                    let (a, b) = blockedGradientSums(gradOutput + offset, input + offset, mask: mask, mean: mean, invStd: invStd, plane)
                    sdy += a; sdyx += b
                    if let gradInput {
                        let k = gamma[c] * invStd
                        gradientRun(gradInput + offset, gradOutput + offset, mask: mask, accumulate: accumulate, plane) { dy, _ in dy * k }
                    }
                }
                gradBeta[c] += Float(sdy)
                gradGamma[c] += Float(sdyx)
            }
        }
    }
}
