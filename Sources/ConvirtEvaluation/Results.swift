// The results files of `convirt eval` (DESIGN.md, Command line) and their side-by-side comparison with
// the paper's Tables 1 (classification) and 2 (retrieval) (Zhang et al., arXiv 2010.00747).

import ConvirtCore
import ConvirtIO
import ConvirtTraining
import Foundation

/// `convirt eval linear|finetune` output:
/// `{"dataset", "protocol", "fraction", "metric", "runs", "mean", "std", "per_label"}` plus the optional
/// `"init"`, `"checkpoint"` and `"seeds"`. Metric values are fractions in [0, 1] (AUC or accuracy), `std`
/// is the sample standard deviation over the runs (`Metrics.meanAndStd`). Decoding ignores other keys;
/// a missing `mean`/`std` is computed from `runs`, a missing `per_label` is empty.
/// The 95% percentile-bootstrap intervals of a classification result over its test set
/// (`ClassificationEvaluation.confidence`): `{"mean": {"lower", "upper"}, "per_label": {...},
/// "resamples": 1000, "unit": "image"|"group"}` (a group: MURA's study).
public struct ClassificationConfidence: Codable, Sendable, Equatable {
    public var mean: ConfidenceInterval
    public var perLabel: [String: ConfidenceInterval]
    public var resamples: Int
    public var unit: String

    enum CodingKeys: String, CodingKey { case mean, perLabel = "per_label", resamples, unit }

    public init(mean: ConfidenceInterval, perLabel: [String: ConfidenceInterval], resamples: Int, unit: String) {
        (self.mean, self.perLabel, self.resamples, self.unit) = (mean, perLabel, resamples, unit)
    }
}

/// Why a downstream training run stopped.
public enum StopReason: String, Codable, Sendable {
    /// The validation loss stopped falling (no lower value for the schedule's patience).
    case plateau
    /// The epoch cap ended the run first.
    case maxEpochs = "max_epochs"
}

public struct ClassificationResult: Codable, Sendable, Equatable {
    /// "chexpert", "rsna", "covidx" or "mura".
    public var dataset: String
    /// "linear" or "finetune" (JSON key "protocol").
    public var evaluationProtocol: String
    /// Share of the training labels used: 0.01, 0.1 or 1.
    public var fraction: Double
    /// "auc" or "accuracy".
    public var metric: String
    /// The metric of each run.
    public var runs: [Double]
    public var mean: Double
    public var std: Double
    /// Per label (CheXpert's five, or a dataset's one), the mean over runs.
    public var perLabel: [String: Double]
    /// Which image encoder the protocol started from: "convirt", "random" or "imagenet" (JSON key "init").
    public var initialization: String?
    public var checkpoint: String?
    public var seeds: [UInt64]?
    /// Per run, the epochs trained (JSON "epochs_run") and why training stopped ("stop_reasons"):
    /// "plateau" (no lower validation loss for the patience) or "max_epochs" (the cap ended it first).
    public var epochsRun: [Int]?
    public var stopReasons: [String]?
    /// 95% bootstrap intervals over the test set of `mean` and of each label's value (JSON "ci95").
    public var ci95: ClassificationConfidence?

    enum CodingKeys: String, CodingKey {
        case dataset, evaluationProtocol = "protocol", fraction, metric, runs, mean, std, perLabel = "per_label"
        case initialization = "init", checkpoint, seeds, epochsRun = "epochs_run", stopReasons = "stop_reasons", ci95
    }

    /// A result from its runs; mean and std come from `Metrics.meanAndStd(runs)`.
    public init(dataset: String, protocol evaluationProtocol: String, fraction: Double, metric: String, runs: [Double],
                perLabel: [String: Double] = [:], initialization: String? = nil, checkpoint: String? = nil, seeds: [UInt64]? = nil,
                epochsRun: [Int]? = nil, stopReasons: [String]? = nil) {
        self.dataset = dataset
        self.evaluationProtocol = evaluationProtocol
        self.fraction = fraction
        self.metric = metric
        self.runs = runs
        (mean, std) = Metrics.meanAndStd(runs)
        self.perLabel = perLabel
        self.initialization = initialization
        self.checkpoint = checkpoint
        self.seeds = seeds
        self.epochsRun = epochsRun
        self.stopReasons = stopReasons
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        dataset = try c.decode(String.self, forKey: .dataset)
        evaluationProtocol = try c.decode(String.self, forKey: .evaluationProtocol)
        fraction = try c.decode(Double.self, forKey: .fraction)
        metric = try c.decode(String.self, forKey: .metric)
        runs = try c.decodeIfPresent([Double].self, forKey: .runs) ?? []
        let computed = Metrics.meanAndStd(runs)
        mean = try c.decodeIfPresent(Double.self, forKey: .mean) ?? computed.mean
        std = try c.decodeIfPresent(Double.self, forKey: .std) ?? computed.std
        perLabel = try c.decodeIfPresent([String: Double].self, forKey: .perLabel) ?? [:]
        initialization = try c.decodeIfPresent(String.self, forKey: .initialization)
        checkpoint = try c.decodeIfPresent(String.self, forKey: .checkpoint)
        seeds = try c.decodeIfPresent([UInt64].self, forKey: .seeds)
        epochsRun = try c.decodeIfPresent([Int].self, forKey: .epochsRun)
        stopReasons = try c.decodeIfPresent([String].self, forKey: .stopReasons)
        ci95 = try c.decodeIfPresent(ClassificationConfidence.self, forKey: .ci95)
    }

    /// DESIGN.md's keys; "runs" is left out when there are none (zero-shot has nothing to repeat).
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(dataset, forKey: .dataset)
        try c.encode(evaluationProtocol, forKey: .evaluationProtocol)
        try c.encode(fraction, forKey: .fraction)
        try c.encode(metric, forKey: .metric)
        if !runs.isEmpty { try c.encode(runs, forKey: .runs) }
        try c.encode(mean, forKey: .mean)
        try c.encode(std, forKey: .std)
        try c.encode(perLabel, forKey: .perLabel)
        try c.encodeIfPresent(initialization, forKey: .initialization)
        try c.encodeIfPresent(checkpoint, forKey: .checkpoint)
        try c.encodeIfPresent(seeds, forKey: .seeds)
        try c.encodeIfPresent(epochsRun, forKey: .epochsRun)
        try c.encodeIfPresent(stopReasons, forKey: .stopReasons)
        try c.encodeIfPresent(ci95, forKey: .ci95)
    }

    /// How many runs the epoch cap ended (nil when the result does not say).
    public var runsAtEpochCap: Int? { stopReasons.map { $0.filter { $0 == StopReason.maxEpochs.rawValue }.count } }

    /// Per label, the mean over runs of each run's per-label values (`runs[r][label]`); a label missing
    /// from a run (undefined there) is averaged over the runs that have it.
    public static func perLabelMeans(_ runs: [[String: Double]]) -> [String: Double] {
        var sums: [String: (Double, Int)] = [:]
        for run in runs { for (label, value) in run { sums[label, default: (0, 0)].0 += value; sums[label, default: (0, 0)].1 += 1 } }
        return sums.mapValues { $0.0 / Double($0.1) }
    }

    /// Pretty-printed JSON with sorted keys. Throws, naming the field, if a value is not finite (JSON has
    /// no NaN): leave an undefined label out of `perLabel` instead.
    public func encoded() throws -> Data {
        let fields = [("mean", mean), ("std", std)] + runs.enumerated().map { ("runs[\($0.offset)]", $0.element) }
            + perLabel.sorted { $0.key < $1.key }.map { ("per_label.\($0.key)", $0.value) }
        if let bad = fields.first(where: { !$0.1.isFinite }) {
            throw ConvirtError("\(dataset) \(evaluationProtocol) result: \(bad.0) is \(bad.1); JSON has no NaN or infinity")
        }
        return try resultsEncoder().encode(self)
    }

    /// Writes `encoded()` atomically to `path`.
    public func write(to path: String) throws { try Files.writeAtomically(encoded() + Data("\n".utf8), to: path) }
}

/// `convirt eval retrieval` output: per mode ("image_to_image", "text_to_image") and k
/// ("precision@5", "precision@10", "precision@50"), the precision as a fraction in [0, 1], over all
/// queries ("mean") and per query category. Optional: `examples` (queries with their top candidates, for
/// the report), `checkpoint`, and `root`, the directory that relative example paths are relative to.
public struct RetrievalResult: Codable, Sendable, Equatable {
    public static let modes = ["image_to_image", "text_to_image"]
    public static let ks = [5, 10, 50]

    /// "precision@k" -> ["mean": p, "<category>": p, ...]
    public var imageToImage: [String: [String: Double]]
    public var textToImage: [String: [String: Double]]
    public var examples: [RetrievalExample]?
    public var checkpoint: String?
    public var root: String?
    /// 95% bootstrap intervals of each mode's mean precision@k, queries resampled within their
    /// categories: mode -> "precision@k" -> interval (JSON "ci95").
    public var ci95: [String: [String: ConfidenceInterval]]?

    enum CodingKeys: String, CodingKey {
        case imageToImage = "image_to_image", textToImage = "text_to_image", examples, checkpoint, root, ci95
    }

    public init(imageToImage: [String: [String: Double]] = [:], textToImage: [String: [String: Double]] = [:],
                examples: [RetrievalExample]? = nil, checkpoint: String? = nil, root: String? = nil) {
        self.imageToImage = imageToImage
        self.textToImage = textToImage
        self.examples = examples
        self.checkpoint = checkpoint
        self.root = root
    }

    /// Needs at least one of "image_to_image" and "text_to_image".
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        guard c.contains(.imageToImage) || c.contains(.textToImage) else {
            throw DecodingError.keyNotFound(CodingKeys.imageToImage, .init(codingPath: [], debugDescription: "neither image_to_image nor text_to_image"))
        }
        imageToImage = try c.decodeIfPresent([String: [String: Double]].self, forKey: .imageToImage) ?? [:]
        textToImage = try c.decodeIfPresent([String: [String: Double]].self, forKey: .textToImage) ?? [:]
        examples = try c.decodeIfPresent([RetrievalExample].self, forKey: .examples)
        checkpoint = try c.decodeIfPresent(String.self, forKey: .checkpoint)
        root = try c.decodeIfPresent(String.self, forKey: .root)
        ci95 = try c.decodeIfPresent([String: [String: ConfidenceInterval]].self, forKey: .ci95)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        if !imageToImage.isEmpty || textToImage.isEmpty { try c.encode(imageToImage, forKey: .imageToImage) }
        if !textToImage.isEmpty { try c.encode(textToImage, forKey: .textToImage) }
        try c.encodeIfPresent(examples, forKey: .examples)
        try c.encodeIfPresent(checkpoint, forKey: .checkpoint)
        try c.encodeIfPresent(root, forKey: .root)
        try c.encodeIfPresent(ci95, forKey: .ci95)
    }

    /// The table of one mode ("image_to_image" or "text_to_image").
    public func precisions(_ mode: String) -> [String: [String: Double]] {
        mode == "text_to_image" ? textToImage : imageToImage
    }

    /// Precision@k of `mode` over all queries ("mean") or of one category; nil when absent.
    public func precision(_ mode: String, k: Int, category: String = "mean") -> Double? {
        precisions(mode)["precision@\(k)"]?[category]
    }

    /// The categories of `mode` (every key but "mean"), sorted.
    public func categories(_ mode: String) -> [String] {
        Set(precisions(mode).values.flatMap(\.keys)).subtracting(["mean"]).sorted()
    }

    public func encoded() throws -> Data {
        for mode in Self.modes {
            for (k, table) in precisions(mode) {
                if let bad = table.first(where: { !$0.value.isFinite }) {
                    throw ConvirtError("retrieval result: \(mode).\(k).\(bad.key) is \(bad.value); JSON has no NaN or infinity")
                }
            }
        }
        return try resultsEncoder().encode(self)
    }

    public func write(to path: String) throws { try Files.writeAtomically(encoded() + Data("\n".utf8), to: path) }
}

/// One retrieval query and what came back, best first.
public struct RetrievalExample: Codable, Sendable, Equatable {
    /// "image_to_image" or "text_to_image".
    public var mode: String
    public var category: String
    public var query: Query
    public var top: [Candidate]

    /// An image query (`path`) or a text query (`text`).
    public struct Query: Codable, Sendable, Equatable {
        public var path: String?
        public var text: String?
        public init(path: String? = nil, text: String? = nil) {
            self.path = path
            self.text = text
        }
    }

    public struct Candidate: Codable, Sendable, Equatable {
        public var path: String
        public var relevant: Bool
        /// The similarity, when the tool wrote it.
        public var score: Double?
        public init(path: String, relevant: Bool, score: Double? = nil) {
            self.path = path
            self.relevant = relevant
            self.score = score
        }
    }

    public init(mode: String, category: String, query: Query, top: [Candidate]) {
        self.mode = mode
        self.category = category
        self.query = query
        self.top = top
    }
}

/// A results JSON file of either kind.
public enum ResultsFile: Sendable {
    case classification(ClassificationResult)
    case retrieval(RetrievalResult)

    /// Reads a results file; an error names the file and says why it is neither kind.
    public static func load(_ path: String) throws -> ResultsFile {
        try decode(Files.read(path), source: path)
    }

    public static func decode(_ data: Data, source: String = "<memory>") throws -> ResultsFile {
        guard let object = try? JSONSerialization.jsonObject(with: data), let keys = (object as? [String: Any]).map({ Array($0.keys) }) else {
            throw ConvirtError("\(source): not a JSON object")
        }
        let decoder = JSONDecoder()
        if keys.contains("image_to_image") || keys.contains("text_to_image") {
            do { return .retrieval(try decoder.decode(RetrievalResult.self, from: data)) } catch {
                throw ConvirtError("\(source): not a valid retrieval result (\(describeDecoding(error)))")
            }
        }
        if keys.contains("dataset") && keys.contains("protocol") {
            do { return .classification(try decoder.decode(ClassificationResult.self, from: data)) } catch {
                throw ConvirtError("\(source): not a valid classification result (\(describeDecoding(error)))")
            }
        }
        throw ConvirtError("\(source): neither a classification result (dataset, protocol, ...) nor a retrieval result "
            + "(image_to_image, text_to_image); its keys are \(keys.sorted().joined(separator: ", "))")
    }
}

func resultsEncoder() -> JSONEncoder {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    return encoder
}

/// A decoding error as one line: what is wrong and where.
public func describeDecoding(_ error: Error) -> String {
    func path(_ context: DecodingError.Context) -> String {
        let p = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
        return p.isEmpty ? "" : " at \(p)"
    }
    switch error {
    case DecodingError.keyNotFound(let key, let context): return "missing \"\(key.stringValue)\"\(path(context))"
    case DecodingError.typeMismatch(let type, let context): return "expected \(type)\(path(context))"
    case DecodingError.valueNotFound(let type, let context): return "null where \(type) is needed\(path(context))"
    case DecodingError.dataCorrupted(let context): return context.debugDescription + path(context)
    default: return "\(error)"
    }
}
