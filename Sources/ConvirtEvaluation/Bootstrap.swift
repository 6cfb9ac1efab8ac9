// 95% confidence intervals over the test set by the percentile bootstrap, as CheXzero's evaluation:
// B resamples of the test units (images, or MURA's studies; retrieval's queries) drawn with
// replacement, the statistic on each, and the 2.5th and 97.5th percentiles of its values (numpy's
// default linear interpolation). The resamples come from a seeded stream, so an interval is the same
// on every machine and rerun. A resample on which the statistic is undefined (a label with one class
// only) is left out of that statistic's interval and counted.

import ConvirtCore
import Foundation

/// A confidence interval: `[lower, upper]` at `level`, from `resamples` draws (`undefined` of them gave
/// no value).
public struct ConfidenceInterval: Codable, Sendable, Equatable {
    public var lower: Double
    public var upper: Double

    public init(lower: Double, upper: Double) { (self.lower, self.upper) = (lower, upper) }

    /// Both ends times `factor` (fractions to percent: 100).
    public func scaled(by factor: Double) -> ConfidenceInterval { ConfidenceInterval(lower: lower * factor, upper: upper * factor) }

    /// "[0.712, 0.781]".
    public func text(_ format: String = "%.3f") -> String { "[" + String(format: format, lower) + ", " + String(format: format, upper) + "]" }
}

public enum Bootstrap {
    /// CheXzero's 1000 resamples.
    public static let defaultResamples = 1000
    public static let defaultSeed: UInt64 = 0

    /// `resamples` draws of `count` indices in 0..<count, with replacement, row-major [resamples, count].
    public static func draws(count: Int, resamples: Int, seed: UInt64 = defaultSeed) -> [Int] {
        var out = [Int](repeating: 0, count: count * resamples)
        for b in 0..<resamples {
            let stream = RandomStream(seed: seed, StreamPurpose.bootstrap.rawValue, UInt64(b))
            for i in 0..<count { out[b * count + i] = stream.integer(below: count, at: UInt64(i)) }
        }
        return out
    }

    /// The interval of a mean of stratum means (retrieval's mean over categories): each resample draws
    /// every stratum's values anew from that stratum, with replacement (stratum s from the stream of seed
    /// `s`, or `draws[s]`, row-major [resamples, stratum size]).
    public static func stratifiedMean(_ strata: [[Double]], resamples: Int = defaultResamples, draws given: [[Int]]? = nil,
                                      level: Double = 0.95) -> ConfidenceInterval? {
        let strata = strata.filter { !$0.isEmpty }
        guard !strata.isEmpty, resamples > 0 else { return nil }
        let draws = given ?? strata.enumerated().map { Bootstrap.draws(count: $0.element.count, resamples: resamples, seed: UInt64($0.offset)) }
        var means: [Double] = []
        for b in 0..<resamples {
            var total = 0.0
            for (s, values) in strata.enumerated() {
                var sum = 0.0
                for i in 0..<values.count { sum += values[draws[s][b * values.count + i]] }
                total += sum / Double(values.count)
            }
            means.append(total / Double(strata.count))
        }
        let sorted = means.sorted(), tail = (1 - level) / 2 * 100
        return ConfidenceInterval(lower: percentile(sorted: sorted, tail), upper: percentile(sorted: sorted, 100 - tail))
    }

    /// numpy.percentile(values, q) with the default linear interpolation; `values` sorted ascending.
    public static func percentile(sorted values: [Double], _ q: Double) -> Double {
        precondition(!values.isEmpty, "percentile of no values")
        let h = Double(values.count - 1) * q / 100
        let lo = Int(h.rounded(.down)), hi = min(lo + 1, values.count - 1)
        return values[lo] + (h - Double(lo)) * (values[hi] - values[lo])
    }

    /// The central `level` interval of the statistics' values over the draws (`draws` row-major
    /// [resamples, count]): `statistics(indices)` returns one value per statistic, nil where undefined
    /// on that resample. Returns one interval per statistic (nil where no resample gave a value).
    public static func intervals(draws: [Int], count: Int, statistics: Int, level: Double = 0.95,
                                 _ evaluate: (ArraySlice<Int>) -> [Double?]) -> [ConfidenceInterval?] {
        let resamples = count == 0 ? 0 : draws.count / count
        var values = [[Double]](repeating: [], count: statistics)
        for b in 0..<resamples {
            for (k, value) in evaluate(draws[(b * count)..<((b + 1) * count)]).enumerated() {
                if let value, value.isFinite { values[k].append(value) }
            }
        }
        let tail = (1 - level) / 2 * 100
        return values.map { v in
            guard !v.isEmpty else { return nil }
            let sorted = v.sorted()
            return ConfidenceInterval(lower: percentile(sorted: sorted, tail), upper: percentile(sorted: sorted, 100 - tail))
        }
    }
}

extension ClassificationConfidence {
    /// The intervals of a classification result: per resample of the units (`draws`, row-major
    /// [resamples, units]), each run's metric on them (mean ROC AUC over the labels defined on the
    /// resample, or accuracy) averaged over the runs, and each label's (class's) value likewise. `runs`:
    /// per run, each unit's scores [units][labels] and targets.
    public static func bootstrap(names: [String], multiClass: Bool, runs: [(scores: [[Double]], targets: [[Float]])], draws: [Int],
                                 unit: String) -> ClassificationConfidence? {
        guard let units = runs.first?.scores.count, units > 0 else { return nil }
        // Each run's label columns ranked once; a resample counts each unit as often as it was drawn.
        let ranked = multiClass ? [] : runs.map { run in
            names.indices.map { k in Metrics.RankedScores(scores: run.scores.map { $0[k] }, labels: run.targets.map { $0[k] >= 0.5 }) }
        }
        var counts = [Int](repeating: 0, count: units)
        let intervals = Bootstrap.intervals(draws: draws, count: units, statistics: 1 + names.count) { sample in
            var means: [Double] = [], labels = [[Double]](repeating: [], count: names.count)
            if !multiClass {
                for i in counts.indices { counts[i] = 0 }
                for u in sample { counts[u] += 1 }
            }
            for (r, run) in runs.enumerated() {
                if multiClass {
                    let (value, perClass) = accuracy(names: names, scores: run.scores, targets: run.targets, units: sample)
                    means.append(value)
                    for (k, name) in names.enumerated() { if let v = perClass[name] { labels[k].append(v) } }
                    continue
                }
                var defined: [Double] = []
                for k in names.indices {
                    if let auc = ranked[r][k].auc(counts: counts) {
                        defined.append(auc)
                        labels[k].append(auc)
                    }
                }
                if !defined.isEmpty { means.append(defined.reduce(0, +) / Double(defined.count)) }
            }
            // A value only where every run has one (a label undefined on the resample is left out).
            func mean(_ v: [Double]) -> Double? { v.count == runs.count ? v.reduce(0, +) / Double(v.count) : nil }
            return [mean(means)] + labels.map(mean)
        }
        var perLabel: [String: ConfidenceInterval] = [:]
        for (k, name) in names.enumerated() { if let ci = intervals[k + 1] { perLabel[name] = ci } }
        guard let overall = intervals[0] else { return nil }
        return ClassificationConfidence(mean: overall, perLabel: perLabel, resamples: draws.count / units, unit: unit)
    }

    /// Accuracy over `units` (indices into the unit arrays; a repeated index counts again), the class of
    /// the highest score against the class of the highest target, and the accuracy within each class.
    public static func accuracy(names: [String], scores: [[Double]], targets: [[Float]], units: some Collection<Int>)
        -> (value: Double, perLabel: [String: Double]) {
        var correct = 0, total = 0
        var classCorrect = [Int](repeating: 0, count: names.count), classTotal = classCorrect
        for u in units {
            let row = scores[u], truth = targets[u]
            let predicted = row.indices.max { row[$0] < row[$1] }!, actual = truth.indices.max { truth[$0] < truth[$1] }!
            total += 1
            classTotal[actual] += 1
            if predicted == actual { correct += 1; classCorrect[actual] += 1 }
        }
        var perClass: [String: Double] = [:]
        for (k, name) in names.enumerated() where classTotal[k] > 0 { perClass[name] = Double(classCorrect[k]) / Double(classTotal[k]) }
        return (total > 0 ? Double(correct) / Double(total) : .nan, perClass)
    }
}
