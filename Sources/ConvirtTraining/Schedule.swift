// Learning-rate schedules, one type for pretraining and the evaluations: the paper's reduce-on-plateau
// (validation loss checked every K steps in pretraining, every epoch downstream; the rate halved after
// `patience` checks without improvement), linear warmup then cosine decay, and constant.

import Foundation

public enum ScheduleKind: String, Codable, Sendable, CaseIterable {
    /// Reduce on plateau of the validation loss (pretraining: halve after 5 checks, stop after 200).
    case paper
    /// Linear warmup, then cosine decay to zero at the last step.
    case cosine
    case constant
}

/// Reduce-on-plateau bookkeeping: the best value so far, checks since it, checks since the last halving.
public struct Plateau: Sendable, Equatable {
    /// Checks without improvement before the rate is halved (the count restarts after a halving).
    public let patience: Int
    /// Stop after this many checks without improvement (the evaluations: 10).
    public let stopAfterStale: Int?
    /// Stop after this many checks in all (pretraining: 200).
    public let maxChecks: Int?
    public var best = Double.infinity
    public var sinceBest = 0
    public var sinceHalving = 0
    public var checks = 0

    public struct Decision: Sendable, Equatable {
        public var improved = false
        public var halve = false
        public var stop = false
    }

    public init(patience: Int, stopAfterStale: Int? = nil, maxChecks: Int? = nil) {
        self.patience = patience
        self.stopAfterStale = stopAfterStale
        self.maxChecks = maxChecks
    }

    public mutating func update(_ value: Double) -> Decision {
        checks += 1
        var decision = Decision()
        if value < best {
            best = value
            sinceBest = 0
            sinceHalving = 0
            decision.improved = true
        } else {
            sinceBest += 1
            sinceHalving += 1
            if sinceHalving >= patience { decision.halve = true; sinceHalving = 0 }
        }
        decision.stop = (stopAfterStale.map { sinceBest >= $0 } ?? false) || (maxChecks.map { checks >= $0 } ?? false)
        return decision
    }
}

public struct LearningRateSchedule: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case plateau(Plateau)
        case cosine(warmupSteps: Int, totalSteps: Int)
        case constant
    }

    public let baseRate: Double
    public private(set) var kind: Kind
    /// The plateau schedule's rate (its state); the base rate otherwise.
    public private(set) var currentRate: Double

    public init(_ kind: Kind, baseRate: Double, currentRate: Double? = nil) {
        self.kind = kind
        self.baseRate = baseRate
        self.currentRate = currentRate ?? baseRate
    }

    /// The rate of step `step` (counting from 0).
    public func rate(step: Int) -> Double {
        switch kind {
        case .plateau:
            return currentRate
        case .constant:
            return baseRate
        case .cosine(let warmup, let total):
            if step < warmup { return baseRate * Double(step + 1) / Double(warmup) }
            let progress = Double(step - warmup) / Double(max(1, total - warmup))
            return baseRate * 0.5 * (1 + cos(Double.pi * min(1, progress)))
        }
    }

    /// The plateau state (nil for the schedules that do not look at validation).
    public var plateau: Plateau? {
        if case .plateau(let p) = kind { return p }
        return nil
    }

    /// Records a validation loss: the plateau schedule may halve its rate and say stop; the others
    /// ignore it (and return nil).
    @discardableResult
    public mutating func validated(_ loss: Double) -> Plateau.Decision? {
        guard case .plateau(var p) = kind else { return nil }
        let decision = p.update(loss)
        if decision.halve { currentRate /= 2 }
        kind = .plateau(p)
        return decision
    }
}
