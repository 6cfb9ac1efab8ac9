// Batch normalisation over [N, C, H, W] (Ioffe & Szegedy 2015), as torch.nn.BatchNorm2d: biased batch
// variance in the normalisation, unbiased variance in the running estimate, momentum 0.1 by default.

/// Sums the per-channel statistics of every rank in place (SyncBN). `nil` means this rank alone.
/// The buffer holds doubles so that the sums of a large global batch keep their precision.
public typealias StatisticsReducer = (UnsafeMutableBufferPointer<Double>) -> Void

public enum BatchNorm2d {
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
    /// - output, input: [N, C, HW]; gamma, beta, runningMean, runningVar: [C];
    ///   statistics: scratch of 2C + 1 doubles.
    public static func forwardTraining(
        output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
        gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
        runningMean: UnsafeMutablePointer<Float>, runningVar: UnsafeMutablePointer<Float>,
        saved: inout Saved, batch: Int, channels: Int, plane: Int, eps: Float = 1e-5, momentum: Float = 0.1,
        statistics: UnsafeMutableBufferPointer<Double>, reducer: StatisticsReducer? = nil
    ) {
        precondition(statistics.count >= 2 * channels + 1, "batch norm statistics scratch too small")
        let stats = statistics.baseAddress!
        stats.update(repeating: 0, count: 2 * channels + 1)
        for n in 0..<batch {
            for c in 0..<channels {
                let x = input + (n * channels + c) * plane
                var s: Float = 0, ss: Float = 0
                for p in 0..<plane { let v = x[p]; s += v; ss += v * v }
                stats[c] += Double(s)
                stats[channels + c] += Double(ss)
            }
        }
        stats[2 * channels] = Double(batch * plane)
        reducer?(statistics)
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
        for n in 0..<batch {
            for c in 0..<channels {
                let x = input + (n * channels + c) * plane, y = output + (n * channels + c) * plane
                let scale = gamma[c] * saved.invStd[c], shift = beta[c] - saved.mean[c] * scale
                for p in 0..<plane { y[p] = x[p] * scale + shift }
            }
        }
    }

    /// Evaluation mode: normalise with the running statistics.
    public static func forwardInference(
        output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
        gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
        runningMean: UnsafePointer<Float>, runningVar: UnsafePointer<Float>,
        batch: Int, channels: Int, plane: Int, eps: Float = 1e-5
    ) {
        for n in 0..<batch {
            for c in 0..<channels {
                let x = input + (n * channels + c) * plane, y = output + (n * channels + c) * plane
                // (x - mean) first: exact when x is close to the mean, where x * scale + shift would cancel.
                let scale = gamma[c] / (runningVar[c] + eps).squareRoot(), mean = runningMean[c], shift = beta[c]
                for p in 0..<plane { y[p] = (x[p] - mean) * scale + shift }
            }
        }
    }

    /// Backward of training mode. With x^ = (x - mean) * invStd and M the global element count:
    /// dx = gamma * invStd / M * (M * dy - sum(dy) - x^ * sum(dy * x^)), the sums being global (reduced
    /// by `reducer`) while dgamma += sum(dy * x^) and dbeta += sum(dy) take this rank's share only, since
    /// parameter gradients are summed over ranks afterwards. All gradients accumulate (+=).
    public static func backwardTraining(
        gradInput: UnsafeMutablePointer<Float>, gradGamma: UnsafeMutablePointer<Float>, gradBeta: UnsafeMutablePointer<Float>,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
        saved: Saved, batch: Int, channels: Int, plane: Int,
        statistics: UnsafeMutableBufferPointer<Double>, reducer: StatisticsReducer? = nil
    ) {
        precondition(statistics.count >= 2 * channels + 1, "batch norm statistics scratch too small")
        let stats = statistics.baseAddress!
        stats.update(repeating: 0, count: 2 * channels + 1)
        for n in 0..<batch {
            for c in 0..<channels {
                let x = input + (n * channels + c) * plane, dy = gradOutput + (n * channels + c) * plane
                let mean = saved.mean[c], invStd = saved.invStd[c]
                var sdy: Float = 0, sdyx: Float = 0
                for p in 0..<plane { sdy += dy[p]; sdyx += dy[p] * (x[p] - mean) * invStd }
                stats[c] += Double(sdy)
                stats[channels + c] += Double(sdyx)
            }
        }
        for c in 0..<channels {
            gradBeta[c] += Float(stats[c])
            gradGamma[c] += Float(stats[channels + c])
        }
        reducer?(statistics)
        let m = Float(saved.globalCount)
        for n in 0..<batch {
            for c in 0..<channels {
                let x = input + (n * channels + c) * plane, dy = gradOutput + (n * channels + c) * plane
                let dx = gradInput + (n * channels + c) * plane
                let mean = saved.mean[c], invStd = saved.invStd[c]
                let k = gamma[c] * invStd / m
                let sumDy = Float(stats[c]), sumDyX = Float(stats[channels + c])
                for p in 0..<plane {
                    let xhat = (x[p] - mean) * invStd
                    dx[p] += k * (m * dy[p] - sumDy - xhat * sumDyX)
                }
            }
        }
    }

    /// Backward of evaluation mode (frozen statistics): dx = dy * gamma / sqrt(runningVar + eps).
    public static func backwardInference(
        gradInput: UnsafeMutablePointer<Float>?, gradGamma: UnsafeMutablePointer<Float>, gradBeta: UnsafeMutablePointer<Float>,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
        runningMean: UnsafePointer<Float>, runningVar: UnsafePointer<Float>,
        batch: Int, channels: Int, plane: Int, eps: Float = 1e-5
    ) {
        for n in 0..<batch {
            for c in 0..<channels {
                let x = input + (n * channels + c) * plane, dy = gradOutput + (n * channels + c) * plane
                let invStd = 1 / (runningVar[c] + eps).squareRoot(), mean = runningMean[c]
                var sdy: Float = 0, sdyx: Float = 0
                for p in 0..<plane { sdy += dy[p]; sdyx += dy[p] * (x[p] - mean) * invStd }
                gradBeta[c] += sdy
                gradGamma[c] += sdyx
                if let gradInput {
                    let dx = gradInput + (n * channels + c) * plane, k = gamma[c] * invStd
                    for p in 0..<plane { dx[p] += dy[p] * k }
                }
            }
        }
    }
}
