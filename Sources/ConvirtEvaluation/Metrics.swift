// Evaluation metrics of the paper's downstream protocols (Zhang et al., arXiv 2010.00747, Sec. 4):
// ROC AUC (RSNA, CheXpert, MURA), accuracy (COVIDx), precision@k (CheXpert 8x200 retrieval), and the
// mean and spread over the repeated runs of a protocol.

import ConvirtCore
import ConvirtTraining
import Foundation

public enum Metrics {
    /// ROC AUC of binary `labels` (true = positive) ranked by `scores` (higher = more positive), computed
    /// as `sklearn.metrics.roc_auc_score`: the ROC curve has one point per distinct score (tied scores
    /// move together, so a tie between a positive and a negative counts one half), collinear points are
    /// dropped as `roc_curve(drop_intermediate=True)` does, and the area is the trapezoid rule.
    ///
    /// Throws when the counts differ, a score is NaN or infinite, or only one class is present (the
    /// AUC is undefined there; scikit-learn returns NaN with a warning).
    public static func rocAUC(scores: [Double], labels: [Bool]) throws -> Double {
        try require(scores.count == labels.count, "ROC AUC", "\(scores.count) scores for \(labels.count) labels")
        if let bad = scores.firstIndex(where: { !$0.isFinite }) {
            throw ConvirtError("ROC AUC: score \(bad) is \(scores[bad]); every score must be a finite number")
        }
        let positives = labels.reduce(0) { $0 + ($1 ? 1 : 0) }
        if positives == 0 || positives == labels.count {
            throw ConvirtError("ROC AUC: only one class is present (\(labels.count) \(positives == 0 ? "negative" : "positive") "
                + "label(s)); the AUC is not defined. Evaluate on a sample holding both classes")
        }
        return RankedScores(scores: scores, labels: labels).auc()!
    }

    /// `rocAUC` that does not throw: nil when the AUC is undefined (one class present) or the input is
    /// invalid (count mismatch, a non-finite score). Callers should warn, naming the label; `rocAUC`
    /// gives the reason.
    public static func rocAUCIfDefined(scores: [Double], labels: [Bool]) -> Double? {
        try? rocAUC(scores: scores, labels: labels)
    }

    /// Per-label ROC AUC and their mean over the labels where it is defined (a multi-label task such as
    /// CheXpert's five competition labels). `scores[j]` and `labels[j]` are label j's column over the
    /// samples; `undefined` lists the labels left out of the mean (only one class present).
    public static func meanROCAUC(scores: [[Double]], labels: [[Bool]], names: [String]) throws
        -> (mean: Double, perLabel: [String: Double], undefined: [String]) {
        try require(scores.count == names.count && labels.count == names.count, "mean ROC AUC",
                    "\(scores.count) score columns and \(labels.count) label columns for \(names.count) names")
        var perLabel: [String: Double] = [:], undefined: [String] = []
        for (j, name) in names.enumerated() {
            try require(scores[j].count == labels[j].count, "ROC AUC of \(name)", "\(scores[j].count) scores for \(labels[j].count) labels")
            if let bad = scores[j].firstIndex(where: { !$0.isFinite }) {
                throw ConvirtError("ROC AUC of \(name): score \(bad) is \(scores[j][bad]); every score must be a finite number")
            }
            if let auc = rocAUCIfDefined(scores: scores[j], labels: labels[j]) { perLabel[name] = auc } else { undefined.append(name) }
        }
        let values = names.compactMap { perLabel[$0] }
        return (values.isEmpty ? .nan : values.reduce(0, +) / Double(values.count), perLabel, undefined)
    }

    /// The fraction of predictions equal to the truth (NaN for no samples).
    public static func accuracy(predicted: [Int], truth: [Int]) -> Double {
        precondition(predicted.count == truth.count, "accuracy: \(predicted.count) predictions for \(truth.count) labels")
        if truth.isEmpty { return .nan }
        return Double(zip(predicted, truth).reduce(0) { $0 + ($1.0 == $1.1 ? 1 : 0) }) / Double(truth.count)
    }

    /// Precision@k of a ranking (best first): the fraction of the first k items that are relevant. When
    /// the ranking holds fewer than k items the missing ones count as not relevant (the denominator is k).
    public static func precisionAtK(ranked: [Int], relevant: (Int) -> Bool, k: Int) -> Double {
        precondition(k > 0, "precision@k needs k >= 1, not \(k)")
        return Double(ranked.prefix(k).reduce(0) { $0 + (relevant($1) ? 1 : 0) }) / Double(k)
    }

    /// Precision@k with the relevant items as a set.
    public static func precisionAtK(ranked: [Int], relevant: Set<Int>, k: Int) -> Double {
        precisionAtK(ranked: ranked, relevant: { relevant.contains($0) }, k: k)
    }

    /// Mean and sample standard deviation (ddof = 1, as pandas' `std()` and `np.std(ddof=1)`) of the
    /// runs of a protocol. One value: std 0. No values: both NaN.
    public static func meanAndStd(_ values: [Double]) -> (mean: Double, std: Double) {
        if values.isEmpty { return (.nan, .nan) }
        let mean = values.reduce(0, +) / Double(values.count)
        if values.count == 1 { return (mean, 0) }
        let squares = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) }
        return (mean, (squares / Double(values.count - 1)).squareRoot())
    }

    /// How `meanAndStd` spreads, for table footers.
    public static let stdDescription = "sample standard deviation (ddof = 1) over the runs"
}

extension Metrics {
    /// Scores ranked once, for the ROC AUC of many weightings of the same samples: the bootstrap's
    /// resamples count each sample as often as it was drawn, and `auc(counts:)` walks the one ranking
    /// instead of sorting every resample anew. The result is bitwise `rocAUC` of the resampled scores and
    /// labels: the curve's points are the same integer counts at the same distinct scores, and the area
    /// is summed over them in the same order.
    public struct RankedScores: Sendable {
        /// Sample indices by decreasing score (finite scores only).
        private let order: [Int]
        /// Per rank: the sample is positive; it ends a run of equal scores.
        private let positive: [Bool], endsRun: [Bool]
        /// Samples whose score is NaN or infinite: a weighting that counts one has no AUC.
        private let nonFinite: [Int]
        public let count: Int

        public init(scores: [Double], labels: [Bool]) {
            precondition(scores.count == labels.count, "ROC AUC: \(scores.count) scores for \(labels.count) labels")
            count = scores.count
            nonFinite = scores.indices.filter { !scores[$0].isFinite }
            let order = scores.indices.filter { scores[$0].isFinite }.sorted { scores[$0] > scores[$1] }
            positive = order.map { labels[$0] }
            endsRun = order.indices.map { r in r == order.count - 1 || scores[order[r + 1]] != scores[order[r]] }
            self.order = order
        }

        /// The ROC AUC with sample i counted `counts[i]` times (every sample once where nil); nil where the
        /// counted samples hold one class only or a non-finite score.
        public func auc(counts: [Int]? = nil) -> Double? {
            if let counts {
                precondition(counts.count == count, "ROC AUC: \(counts.count) counts for \(count) samples")
                if nonFinite.contains(where: { counts[$0] > 0 }) { return nil }
            } else if !nonFinite.isEmpty {
                return nil
            }
            var positives = 0, negatives = 0
            for r in order.indices {
                let w = counts?[order[r]] ?? 1
                if positive[r] { positives += w } else { negatives += w }
            }
            if positives == 0 || negatives == 0 { return nil }
            let totalTP = Double(positives), totalFP = Double(negatives)
            // The curve's points are the ends of runs of equal counted scores; drop_intermediate keeps the
            // first and last and every point where the curve bends, and each kept point adds its
            // trapezoid. Points stream through with a lag of one, to see a point's successor.
            var tp = 0.0, fp = 0.0, inRun = 0
            var keptTP = 0.0, keptFP = 0.0                       // the last kept point, from (0, 0)
            var area = 0.0
            func keep(_ pointTP: Double, _ pointFP: Double) {
                let dx = pointFP / totalFP - keptFP / totalFP
                area += dx * (pointTP / totalTP + keptTP / totalTP) / 2
                (keptTP, keptFP) = (pointTP, pointFP)
            }
            var points = 0
            var previous = (tp: 0.0, fp: 0.0), pending = (tp: 0.0, fp: 0.0)
            for r in order.indices {
                let w = counts?[order[r]] ?? 1
                if positive[r] { tp += Double(w) } else { fp += Double(w) }
                inRun += w
                guard endsRun[r], inRun > 0 else { continue }
                inRun = 0
                if points == 1 {
                    keep(pending.tp, pending.fp)
                } else if points > 1, previous.fp - 2 * pending.fp + fp != 0 || previous.tp - 2 * pending.tp + tp != 0 {
                    keep(pending.tp, pending.fp)
                }
                (previous, pending) = (pending, (tp, fp))
                points += 1
            }
            keep(pending.tp, pending.fp)
            return area
        }
    }
}

