// The ResNet's per-channel and spatial kernels over channels-last activations ([N, H, W, C], NHWC), the
// layout the network keeps from layer to layer where its convolutions run on oneDNN: there oneDNN's
// convolutions read and write NHWC themselves, so no reorder stands between two layers (with NCHW,
// every convolution's input and output went through a transposing reorder to and from oneDNN's
// blocked layout). NHWC rather than the blocked nChw16c: it holds any channel count, and it is the
// layout of oneDNN's brgemm convolutions (AMX). Images enter as NCHW; the stem's reorder transposes them.
//
// The arithmetic per channel is the NCHW kernels' (sums in float inside blocks of 256 rows, double
// across blocks); each thread owns a range of channels (sums) or of rows (pointwise passes), so the
// results do not depend on the thread count.

/// How a 4-d activation [N, C, H, W] lies in memory.
public enum ActivationLayout: String, Sendable, Hashable {
    /// [N, C, H, W] (PyTorch's default).
    case nchw
    /// [N, H, W, C] (channels last).
    case nhwc
}

/// Sums over the rows of [rows, channels] for the channels c0..<c0+width, into first[j] and second[j]
/// (j = c): float inside blocks of 256 rows, double across blocks (as `blockedSums`). Without
/// `gradient`: sum(x) and sum(x^2). With it (dy, and a following ReLU's output as `mask`): sum(g) and
/// sum(g * (x - mean)), g = dy where mask > 0 (or everywhere without a mask). Plain loops over
/// pointers, no closures, so that the per-channel inner loop vectorizes.
func channelBlockedSums(_ x: UnsafePointer<Float>, gradient: (dy: UnsafePointer<Float>, mask: UnsafePointer<Float>?, mean: UnsafePointer<Float>)?,
                        rows: Int, channels: Int, c0: Int, width: Int, first: UnsafeMutablePointer<Double>, second: UnsafeMutablePointer<Double>) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * width) { buffer in
        let a = buffer.baseAddress!, b = a + width
        first.update(repeating: 0, count: width)
        second.update(repeating: 0, count: width)
        var start = 0
        while start < rows {
            let end = min(start + 256, rows)
            a.update(repeating: 0, count: width)
            b.update(repeating: 0, count: width)
            for r in start..<end {
                let o = r * channels + c0, xr = x + o
                switch gradient {
                case nil:
                    for j in 0..<width { let v = xr[j]; a[j] += v; b[j] += v * v }
                case let (dy, mask?, mean)?:
                    let d = dy + o, m = mask + o, mu = mean + c0
                    // Both loads unconditional, a select picks (so the loop vectorizes).
                    for j in 0..<width { let dj = d[j], g = m[j] > 0 ? dj : 0; a[j] += g; b[j] += g * (xr[j] - mu[j]) }
                case let (dy, nil, mean)?:
                    let d = dy + o, mu = mean + c0
                    for j in 0..<width { let g = d[j]; a[j] += g; b[j] += g * (xr[j] - mu[j]) }
                }
            }
            for j in 0..<width { first[j] += Double(a[j]); second[j] += Double(b[j]) }
            start = end
        }
    }
}

extension BatchNorm2d {
    /// `forwardTraining` over [rows = N*H*W, C].
    static func forwardTrainingNHWC(
        output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
        runningMean: UnsafeMutablePointer<Float>, runningVar: UnsafeMutablePointer<Float>, saved: inout Saved, rows: Int, channels: Int,
        eps: Float, momentum: Float, statistics: UnsafeMutableBufferPointer<Double>, reducer: StatisticsReducer?, relu: Bool
    ) throws {
        let stats = statistics.baseAddress!
        Parallel.chunks(channels, cost: rows) { range in
            let c0 = range.lowerBound
            channelBlockedSums(input, gradient: nil, rows: rows, channels: channels, c0: c0, width: range.count, first: stats + c0,
                               second: stats + channels + c0)
        }
        stats[2 * channels] = Double(rows)
        try settleStatistics(stats, saved: &saved, runningMean: runningMean, runningVar: runningVar, channels: channels, eps: eps,
                             momentum: momentum, reducer: reducer, statistics: statistics)
        let means = saved.mean, invStds = saved.invStd
        Parallel.chunks(rows, cost: channels) { range in
            for r in range {
                let x = input + r * channels, y = output + r * channels
                // The scale as the NCHW kernel forms it (gamma * invStd, then one multiply): equal outputs.
                if relu {
                    for c in 0..<channels { y[c] = max((x[c] - means[c]) * (gamma[c] * invStds[c]) + beta[c], 0) }
                } else {
                    for c in 0..<channels { y[c] = (x[c] - means[c]) * (gamma[c] * invStds[c]) + beta[c] }
                }
            }
        }
    }

    /// `forwardInference` over [rows, C].
    static func forwardInferenceNHWC(
        output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
        runningMean: UnsafePointer<Float>, runningVar: UnsafePointer<Float>, rows: Int, channels: Int, eps: Float, relu: Bool
    ) {
        withUnsafeTemporaryAllocation(of: Float.self, capacity: channels) { buffer in
            let scales = buffer.baseAddress!
            for c in 0..<channels { scales[c] = gamma[c] / (runningVar[c] + eps).squareRoot() }
            Parallel.chunks(rows, cost: channels) { range in
                for r in range {
                    let x = input + r * channels, y = output + r * channels
                    if relu {
                        for c in 0..<channels { y[c] = max((x[c] - runningMean[c]) * scales[c] + beta[c], 0) }
                    } else {
                        for c in 0..<channels { y[c] = (x[c] - runningMean[c]) * scales[c] + beta[c] }
                    }
                }
            }
        }
    }

    /// Per channel: sum(dy) and sum(dy * (x - mean)) * invStd over [rows, C] into first/second, dy masked
    /// by a following ReLU's output where `mask` is given.
    private static func gradientSumsNHWC(_ first: UnsafeMutablePointer<Double>, _ second: UnsafeMutablePointer<Double>,
                                         gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, mask: UnsafePointer<Float>?,
                                         mean: UnsafePointer<Float>, invStd: UnsafePointer<Float>, rows: Int, channels: Int) {
        Parallel.chunks(channels, cost: rows) { range in
            let c0 = range.lowerBound
            channelBlockedSums(input, gradient: (gradOutput, mask, mean), rows: rows, channels: channels, c0: c0, width: range.count,
                               first: first + c0, second: second + c0)
            for c in range { second[c] *= Double(invStd[c]) }
        }
    }

    /// `backwardTraining` over [rows, C].
    static func backwardTrainingNHWC(
        gradInput: UnsafeMutablePointer<Float>, gradGamma: UnsafeMutablePointer<Float>, gradBeta: UnsafeMutablePointer<Float>,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>, saved: Saved, rows: Int, channels: Int,
        statistics: UnsafeMutableBufferPointer<Double>, reducer: StatisticsReducer?, reluOutput: UnsafePointer<Float>?, accumulate: Bool
    ) throws {
        let stats = statistics.baseAddress!
        let means = saved.mean, invStds = saved.invStd
        gradientSumsNHWC(stats, stats + channels, gradOutput: gradOutput, input: input, mask: reluOutput, mean: means, invStd: invStds,
                         rows: rows, channels: channels)
        for c in 0..<channels {
            gradBeta[c] += Float(stats[c])
            gradGamma[c] += Float(stats[channels + c])
        }
        stats[2 * channels] = 0
        try reducer?(statistics)
        let m = Float(saved.globalCount)
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * channels) { buffer in
            let k = buffer.baseAddress!, sumDy = k + channels, sumDyX = sumDy + channels
            for c in 0..<channels {
                k[c] = gamma[c] * invStds[c] / m
                sumDy[c] = Float(stats[c])
                sumDyX[c] = Float(stats[channels + c])
            }
            Parallel.chunks(rows, cost: channels) { range in
                for r in range {
                    let o = r * channels, x = input + o
                    gradientRun(gradInput + o, gradOutput + o, mask: reluOutput.map { $0 + o }, accumulate: accumulate, channels) { dy, c in
                        k[c] * (m * dy - sumDy[c] - (x[c] - means[c]) * invStds[c] * sumDyX[c])
                    }
                }
            }
        }
    }

    /// `backwardInference` over [rows, C].
    static func backwardInferenceNHWC(
        gradInput: UnsafeMutablePointer<Float>?, gradGamma: UnsafeMutablePointer<Float>, gradBeta: UnsafeMutablePointer<Float>,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
        runningMean: UnsafePointer<Float>, runningVar: UnsafePointer<Float>, rows: Int, channels: Int, eps: Float,
        reluOutput: UnsafePointer<Float>?, accumulate: Bool
    ) {
        withUnsafeTemporaryAllocation(of: Double.self, capacity: 2 * channels) { sums in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * channels) { buffer in
                let invStd = buffer.baseAddress!, k = invStd + channels
                for c in 0..<channels {
                    invStd[c] = 1 / (runningVar[c] + eps).squareRoot()
                    k[c] = gamma[c] * invStd[c]
                }
                let sdy = sums.baseAddress!, sdyx = sdy + channels
                gradientSumsNHWC(sdy, sdyx, gradOutput: gradOutput, input: input, mask: reluOutput, mean: runningMean, invStd: invStd,
                                 rows: rows, channels: channels)
                for c in 0..<channels {
                    gradBeta[c] += Float(sdy[c])
                    gradGamma[c] += Float(sdyx[c])
                }
                guard let gradInput else { return }
                Parallel.chunks(rows, cost: channels) { range in
                    for r in range {
                        let o = r * channels
                        gradientRun(gradInput + o, gradOutput + o, mask: reluOutput.map { $0 + o }, accumulate: accumulate, channels) { dy, c in
                            dy * k[c]
                        }
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
            for item in range {
                let n = item / oh, oy = item % oh
                let y0 = max(oy * stride - padding, 0), y1 = min(oy * stride - padding + kernel, height)
                for ox in 0..<ow {
                    let x0 = max(ox * stride - padding, 0), x1 = min(ox * stride - padding + kernel, width)
                    let offset = ((n * oh + oy) * ow + ox) * channels
                    let y = output + offset, idx = indices + offset
                    y.update(repeating: -Float.infinity, count: channels)
                    idx.update(repeating: Int32(y0 * width + x0), count: channels)
                    for iy in y0..<y1 {
                        for ix in x0..<x1 {
                            let x = input + ((n * height + iy) * width + ix) * channels, position = Int32(iy * width + ix)
                            // As the NCHW kernel: a larger value or a NaN takes the place (selects, so it vectorizes).
                            for c in 0..<channels {
                                let v = x[c], best = y[c], take = v > best || v != v
                                y[c] = take ? v : best
                                idx[c] = take ? position : idx[c]
                            }
                        }
                    }
                }
            }
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
