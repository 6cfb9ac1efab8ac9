// Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019) with torch.optim's exact semantics,
// stepping ranges of the flat arena (all trainable parameters, or one ZeRO-1 shard).

import CKernels
import RealModule

public struct AdamConfig: Sendable, Equatable, Codable {
    // Hyperparameters are Doubles, like torch's Python floats: 1 - beta2 must be 1 - 0.999, not
    // 1 - Float(0.999), whose 1.3e-5 relative difference shows in the second moment.
    public var learningRate: Double
    public var beta1: Double
    public var beta2: Double
    public var eps: Double
    public var weightDecay: Double
    /// false: torch.optim.Adam (weight decay is L2 added to the gradient); true: torch.optim.AdamW
    /// (decoupled: parameters shrink by lr * weightDecay before the Adam update).
    public var decoupled: Bool

    public init(learningRate: Double = 1e-4, beta1: Double = 0.9, beta2: Double = 0.999, eps: Double = 1e-8,
                weightDecay: Double = 0, decoupled: Bool = false) {
        self.learningRate = learningRate; self.beta1 = beta1; self.beta2 = beta2
        self.eps = eps; self.weightDecay = weightDecay; self.decoupled = decoupled
    }
}

public enum Adam {
    /// One update of params[i], m[i], v[i] for i in 0..<count, given grads; `step` counts from 1.
    ///
    /// torch.optim.Adam (single-tensor path): g = grad + wd * p; m = lerp(m, g, 1 - b1);
    /// v = b2 * v + (1 - b2) * g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    /// AdamW first does p *= 1 - lr * wd and adds nothing to the gradient.
    /// The gradient buffer is left as it is. Each new params[i] is also written to mirror[mirrorOffset + i]
    /// for every mirror (other copies of the parameters). Returns how many new parameters are NaN or infinite.
    @discardableResult
    public static func step(params: UnsafeMutablePointer<Float>, grads: UnsafePointer<Float>,
                            m: UnsafeMutablePointer<Float>, v: UnsafeMutablePointer<Float>,
                            count: Int, step: Int, config c: AdamConfig, mirrors: [UnsafeMutablePointer<Float>] = [], mirrorOffset: Int = 0) -> Int {
        precondition(step >= 1, "Adam steps count from 1")
        // Scalars are formed in Double and rounded once to Float, as torch does with Python floats.
        let bias1 = 1 - Double.pow(c.beta1, Double(step))
        let bias2 = 1 - Double.pow(c.beta2, Double(step))
        let stepSize = Float(c.learningRate / bias1)
        let bias2Sqrt = Float(bias2.squareRoot())
        let b2 = Float(c.beta2), eps = Float(c.eps)
        let oneMinusB1 = Float(1 - c.beta1), oneMinusB2 = Float(1 - c.beta2)
        let shrink = Float(1 - c.learningRate * c.weightDecay)
        let l2: Float = c.decoupled ? 0 : Float(c.weightDecay)
        let wd = c.weightDecay
        let decoupled = c.decoupled && wd != 0
        // Every element on its own: split over the threads, the result is the same bit for bit. The loop
        // is `ck_adam` (16 lanes where the CPU has AVX-512), the arithmetic per element as written above.
        let parts = max(1, Parallel.threads)
        return withUnsafeTemporaryAllocation(of: Int.self, capacity: parts) { counts in
            counts.initialize(repeating: 0)
            mirrors.withUnsafeBufferPointer { mirrors in
                mirrors.withMemoryRebound(to: UnsafeMutablePointer<Float>?.self) { table in
                    Parallel.indexedChunks(count, cost: 8) { part, range in
                        let o = range.lowerBound
                        counts[part] += ck_adam(params + o, grads + o, m + o, v + o, range.count, stepSize, bias2Sqrt, b2, eps, oneMinusB1,
                                                oneMinusB2, shrink, l2, decoupled ? 1 : 0, table.baseAddress, table.count, mirrorOffset + o)
                    }
                }
            }
            return counts.reduce(0, +)
        }
    }

    /// Steps the arena elements of `range` (which must lie in the arena's optimizer range), writing the
    /// new parameters also to `mirrors` (other buffers laid out as the arena); returns how many are NaN
    /// or infinite.
    @discardableResult
    public static func step(_ arena: ParameterArena, range: Range<Int>, step: Int, config: AdamConfig,
                            mirrors: [UnsafeMutablePointer<Float>] = []) -> Int {
        let (m, v) = arena.moments(at: range.lowerBound)
        return Adam.step(params: arena.trainingParams + range.lowerBound, grads: arena.grads + range.lowerBound, m: m, v: v,
                         count: range.count, step: step, config: config, mirrors: mirrors, mirrorOffset: range.lowerBound)
    }

    /// Steps every trainable range of an arena that this process holds optimizer state for (all of it,
    /// or its ZeRO-1 shard); returns how many new parameters are NaN or infinite.
    @discardableResult
    public static func step(_ arena: ParameterArena, step: Int, config: AdamConfig) -> Int {
        arena.trainableRanges(within: arena.optimizerRange).reduce(0) { $0 + Adam.step(arena, range: $1, step: step, config: config) }
    }
}
