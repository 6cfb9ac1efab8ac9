// No wasted run: the outlier guard (llm.c's -sl / -sg). A step whose loss or gradient norm lies more than
// z standard deviations above the mean of the last `window` applied steps is not applied: no optimizer
// step, and its values stay out of the window. It is counted in metrics.jsonl ("skipped",
// "skipped_steps") and TensorBoard, and `maxConsecutive` skips in a row stop the run. The loss and the
// gradient norm are sums over ranks, the same on every rank, so every rank decides alike without
// communicating; the window travels in the checkpoint, so a resumed run decides as the uninterrupted one.

import ConvirtCore
import Foundation

/// `--skip-loss-z`, `--skip-grad-z`, `--outlier-window`, `--max-consecutive-skips`.
public struct OutlierGuardConfig: Codable, Sendable, Equatable, CustomStringConvertible {
    /// Skip a step whose loss's z-score over the window exceeds this (nil: the loss is not watched).
    public var lossZ: Double?
    /// Skip a step whose gradient norm's z-score exceeds this (nil: the norm is not watched).
    public var gradZ: Double?
    /// Applied steps the mean and standard deviation are taken over; no step is skipped before it is full.
    public var window: Int
    /// Skipped steps in a row that stop the run.
    public var maxConsecutive: Int

    public static let defaultWindow = 128, defaultMaxConsecutive = 5

    public init(lossZ: Double? = nil, gradZ: Double? = nil, window: Int = OutlierGuardConfig.defaultWindow,
                maxConsecutive: Int = OutlierGuardConfig.defaultMaxConsecutive) {
        (self.lossZ, self.gradZ, self.window, self.maxConsecutive) = (lossZ, gradZ, window, maxConsecutive)
    }

    enum CodingKeys: String, CodingKey { case lossZ = "loss_z", gradZ = "grad_z", window, maxConsecutive = "max_consecutive" }

    public var description: String {
        "loss z \(lossZ.map { "\($0)" } ?? "off"), gradient norm z \(gradZ.map { "\($0)" } ?? "off"), window \(window), stop after \(maxConsecutive) in a row"
    }

    func validate() throws {
        for (name, z) in [("--skip-loss-z", lossZ), ("--skip-grad-z", gradZ)] {
            if let z { guard z > 0 && z.isFinite else { throw ConvirtError("train: \(name) must be a positive number, got \(z)") } }
        }
        guard window >= 2 else { throw ConvirtError("train: --outlier-window must be at least 2, got \(window)") }
        guard maxConsecutive >= 1 else { throw ConvirtError("train: --max-consecutive-skips must be positive, got \(maxConsecutive)") }
    }
}

/// The guard's state: the window and the counts (a checkpoint's `State.outlierGuard`).
public struct OutlierGuard: Codable, Sendable, Equatable {
    /// Losses and gradient norms of the last applied steps, oldest first (at most `window`).
    public var losses: [Double] = []
    public var norms: [Double] = []
    /// Skipped steps in a row up to now, and in all.
    public var consecutive = 0
    public var skipped = 0

    enum CodingKeys: String, CodingKey { case losses, norms, consecutive, skipped }

    public init() {}

    public struct Decision: Sendable {
        public var skip: Bool
        /// The z-scores (nil before the window is full, or for a quantity not watched).
        public var lossZ: Double?
        public var gradZ: Double?
    }

    /// (x - mean) / standard deviation over `values` (population), in a fixed order; +inf above a constant window.
    static func zScore(_ x: Double, over values: [Double]) -> Double {
        let n = Double(values.count)
        var sum = 0.0
        for v in values { sum += v }
        let mean = sum / n
        var squares = 0.0
        for v in values { squares += (v - mean) * (v - mean) }
        let deviation = (squares / n).squareRoot()
        if deviation > 0 { return (x - mean) / deviation }
        return x > mean ? .infinity : 0
    }

    /// Decides a step and updates the window and counts.
    public mutating func decide(loss: Double, norm: Double, _ config: OutlierGuardConfig) -> Decision {
        var decision = Decision(skip: false)
        if losses.count >= config.window {
            if let limit = config.lossZ {
                decision.lossZ = Self.zScore(loss, over: losses)
                decision.skip = decision.skip || decision.lossZ! > limit
            }
            if let limit = config.gradZ {
                decision.gradZ = Self.zScore(norm, over: norms)
                decision.skip = decision.skip || decision.gradZ! > limit
            }
        }
        if decision.skip {
            consecutive += 1
            skipped += 1
        } else {
            consecutive = 0
            losses.append(loss)
            norms.append(norm)
            if losses.count > config.window {
                losses.removeFirst(losses.count - config.window)
                norms.removeFirst(norms.count - config.window)
            }
        }
        return decision
    }
}
