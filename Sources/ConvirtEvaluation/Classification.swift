// The paper's classification evaluations (App. B) on RSNA, CheXpert, COVIDx and MURA.
//
// Linear: the image encoder frozen; its features h_v are computed once (split over the ranks, gathered)
// and cached; a linear classifier with dropout 0.2 before it is trained on them with Adam (lr 1e-4,
// 1e-3 for COVIDx; L2 weight decay 1e-6), batch 64; the learning rate is halved after 3 epochs without a
// lower validation loss, training stops after 10, and the epoch with the lowest validation loss is tested.
// Fine-tune: the classifier alone first for 200 steps at lr 1e-3 (on the frozen encoder's features), then
// the whole encoder with the same schedule, data-parallel over the ranks (each rank its share of the
// global batch of 64, SyncBN, gradients summed). Each of `runs` runs draws its label fraction and its
// initialisation from its own seed; the result is the mean and standard deviation over runs.

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import ConvirtTraining
import Foundation

/// Where the evaluated image encoder comes from.
public enum EncoderSource: Sendable {
    /// The `image.` tensors of a ConVIRT checkpoint.
    case checkpoint(String)
    /// torchvision initialisation of an architecture, from the run's seed.
    case random(ResNetConfig)
    /// ImageNet weights: a torchvision ResNet state dict in safetensors (tools/convert_weights.py).
    case imagenet(ResNetConfig, weights: String)

    public var name: String {
        switch self {
        case .checkpoint: return "convirt"
        case .random: return "random"
        case .imagenet: return "imagenet"
        }
    }

    /// The ConVIRT checkpoint directory (nil for random and ImageNet initialisation).
    public var checkpointDirectory: String? {
        if case .checkpoint(let directory) = self { return directory }
        return nil
    }
}

/// The paper's two classification protocols (App. B).
public enum EvaluationProtocol: String, Codable, Sendable, CaseIterable {
    /// A linear classifier on the frozen encoder's features.
    case linear
    /// The whole encoder and the classifier trained, data-parallel.
    case finetune
}

public struct ClassificationOptions: Sendable {
    public var evaluationProtocol = EvaluationProtocol.linear
    public var fraction = 1.0
    public var runs = 5
    public var seed: UInt64 = 0
    /// Input size: images are zero-padded to square and resized to it (the paper: 224).
    public var imageSize = 224
    public var batch = 64
    /// nil: 1e-4, or 1e-3 for COVIDx (the paper's choice).
    public var learningRate: Double? = nil
    public var weightDecay = 1e-6
    public var dropout: Float = 0.2
    /// Epochs without a lower validation loss before the learning rate is halved.
    public var patience = 3
    /// Epochs without a lower validation loss before training stops.
    public var stopAfter = 10
    public var maxEpochs = 100
    /// Linear evaluation: the fewest classifier steps in an epoch (the unit of the validation checks, the
    /// patience and `maxEpochs`); a training set smaller than that many batches is passed over again,
    /// each pass in a new order. 1 (the paper's): an epoch is one pass, however small the set. A 1% split
    /// of a small dataset is a batch or less, and one step per check stops runs before they have learned.
    public var minEpochSteps = 1
    /// Linear evaluation: which epoch's classifier is kept. `.loss` (the paper's): the lowest validation
    /// loss. `.metric`: the best validation AUC or accuracy; the schedule (halving, stopping) still follows
    /// the loss. On a tiny training split the loss can be lowest before the classifier has learned to
    /// rank (its bias has fitted the label prior), which `.metric` does not keep.
    public var keepBest = KeepBest.loss
    /// The precision of the encoder's and the classifier's products (bf16: mixed precision, see `BF16`).
    public var precision = Precision.fp32
    /// Bootstrap resamples of the test set for the 95% intervals (0: none).
    public var bootstrapResamples = Bootstrap.defaultResamples
    public enum KeepBest: String, Sendable, CaseIterable { case loss, metric }
    /// Fine-tuning: steps of the classifier alone first, and their learning rate.
    public var headSteps = 200
    public var headLearningRate = 1e-3
    /// Images per forward pass when computing features.
    public var featureBatch = 16
    /// Where encoder features are cached between invocations (nil: only within this one).
    public var cacheDirectory: String? = nil
    /// Fine-tuning: the bytes of decoded images each rank keeps in memory for later epochs
    /// (`DecodedImageCache`; 0: every read decodes), 1024 MB as `--image-cache-mb`'s default.
    public var imageCacheBytes = 1024 * 1_000_000
    /// Fine-tuning: Adam state sharded over the ranks (ZeRO-1) instead of replicated.
    public var zero1 = false
    /// How fine-tuning sums gradients over ranks (`GradientExchange`).
    public var gradientExchange: GradientExchange = .auto
    /// Log the validation loss of every tenth epoch (and the last) of each run.
    public var verbose = false
    public init() {}
}

/// A labelled split turned into arrays: targets [n, outputs] (multi-class: one-hot) and groups.
struct LabeledArrays {
    var paths: [String]
    var targets: [Float]
    var groups: [String]
    var outputs: Int
    var count: Int { paths.count }

    init(_ items: [LabeledImage], outputs: Int) {
        paths = items.map(\.path)
        groups = items.map(\.group)
        self.outputs = outputs
        targets = items.flatMap { $0.targets }
    }

    func subset(_ keep: [Int]) -> LabeledArrays {
        var s = self
        s.paths = keep.map { paths[$0] }
        s.groups = keep.map { groups[$0] }
        s.targets = keep.flatMap { Array(targets[($0 * outputs)..<(($0 + 1) * outputs)]) }
        return s
    }
}

public final class ClassificationEvaluation {
    public let data: DownstreamData
    public let source: EncoderSource
    public let options: ClassificationOptions
    public let communicator: Communicator
    let log: (String) -> Void
    let model: ImageClassifier
    /// The encoder as loaded (restored before every run of fine-tuning).
    var initialParameters: [Float] = []
    var outputs: Int { data.labelNames.count }
    var learningRate: Double { options.learningRate ?? (data.dataset == .covidx ? 1e-3 : 1e-4) }
    /// Images that could not be decoded, per split (counted and reported, never fatal).
    public private(set) var unreadable: [String: Int] = [:]
    /// Fine-tuning's decoded training and validation images, read again every epoch (nil: none kept).
    let imageCache: DecodedImageCache?

    public init(data: DownstreamData, source: EncoderSource, options: ClassificationOptions, communicator: Communicator,
                log: @escaping (String) -> Void) throws {
        try require(options.fraction > 0 && options.fraction <= 1, "eval", "--fraction must be in (0, 1]")
        try require(options.runs >= 1 && options.batch >= communicator.size && options.batch % communicator.size == 0, "eval",
                    "--runs must be positive and the batch (\(options.batch)) must divide by the \(communicator.size) ranks")
        try require(!data.train.isEmpty && !data.validation.isEmpty && !data.test.isEmpty, "eval",
                    "\(data.dataset.rawValue): the train, validation and test splits must all hold images")
        self.data = data
        self.source = source
        self.options = options
        self.communicator = communicator
        self.log = log
        imageCache = options.evaluationProtocol == .finetune && options.imageCacheBytes > 0
            ? DecodedImageCache(size: options.imageSize, budgetBytes: options.imageCacheBytes) : nil
        let config: ResNetConfig
        switch source {
        case .checkpoint(let dir): config = try Checkpoints.manifest(dir).config.model.image
        case .random(let c), .imagenet(let c, _): config = c
        }
        let outputs = data.labelNames.count
        model = try ImageClassifier(config: config, classes: outputs, dropout: options.dropout)
        model.precision = options.precision
        model.initialize(seed: options.seed)
        switch source {
        case .checkpoint(let dir): try Checkpoints.load(dir, prefix: "image.", into: model.arena)
        case .imagenet(_, let weights): try Weights.load(SafeTensorsFile(path: weights), into: model.arena, prefix: "image.")
        case .random: break
        }
        initialParameters = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
    }

    // MARK: images and features

    /// Encoder features [n, F] of `paths` in evaluation mode, computed in slices over the ranks and
    /// gathered on every rank, with a readable flag per image; cached on disk when asked. The images
    /// through `cache`, where given.
    func features(_ split: String, _ paths: [String], cache: DecodedImageCache? = nil) throws -> (features: [Float], ok: [Bool]) {
        let f = model.featureCount, n = paths.count
        let cachePath = try cacheFile(split, paths)
        if let cachePath, let cached = try? SafeTensorsFile(path: cachePath),
           let values = try? cached.floats("features"), let flags = try? cached.floats("readable"), values.shape == [n, f], flags.shape == [n] {
            // A cache written with its checksum and still matching it; any other is computed and written again.
            if cached.metadata["crc32"] == Self.checksum(values.scalars, flags.scalars) {
                if communicator.isRoot { log("\(split): \(n) cached features from \(cachePath)") }
                return (values.scalars, flags.scalars.map { $0 != 0 })
            }
            if communicator.isRoot { log("\(split): the cached features in \(cachePath) fail their checksum; computing them again") }
        }
        let (counts, mine) = ArenaShards.split(n, communicator)
        var all = [Float](repeating: 0, count: n * f)
        var flags = [Float](repeating: 0, count: n)
        try ImagePrefetcher.batches(paths, mine, batch: options.featureBatch, size: options.imageSize, cache: cache) { slice, images, ok in
            let h = try model.features(images, batch: slice.count, size: options.imageSize, context: PassContext(training: false, precision: model.precision))
            all.withUnsafeMutableBufferPointer { ($0.baseAddress! + slice.lowerBound * f).update(from: h, count: slice.count * f) }
            for (k, good) in ok.enumerated() { flags[slice.lowerBound + k] = good ? 1 : 0 }
        }
        try all.withUnsafeMutableBufferPointer { try communicator.allGatherInPlace($0, counts: counts.map { $0 * f }) }
        try flags.withUnsafeMutableBufferPointer { try communicator.allGatherInPlace($0, counts: counts) }
        if communicator.isRoot, let cachePath {
            var writer = SafeTensorsWriter(metadata: ["split": split, "images": "\(n)", "crc32": Self.checksum(all, flags)])
            try writer.add("features", Tensor(shape: [n, f], all))
            try writer.add("readable", Tensor(shape: [n], flags))
            try? FileManager.default.createDirectory(atPath: (cachePath as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try writer.write(to: cachePath)
        }
        return (all, flags.map { $0 != 0 })
    }

    /// The CRC-32 of a cache's features and flags, as its metadata holds it.
    static func checksum(_ features: [Float], _ flags: [Float]) -> String {
        var crc: UInt32 = 0
        for part in [features, flags] { crc = part.withUnsafeBytes { crc32Update(crc, $0) } }
        return String(crc, radix: 16)
    }

    /// The cache file of a split's features: keyed by the encoder, the image size and the images (path,
    /// size and modification time of each).
    func cacheFile(_ split: String, _ paths: [String]) throws -> String? {
        guard let dir = options.cacheDirectory else { return nil }
        var key = "\(options.imageSize)|\(model.config)|" + (options.precision == .fp32 ? "" : "\(options.precision.rawValue)|")
        switch source {
        case .checkpoint(let d):
            let m = try Checkpoints.manifest(d)
            key += "checkpoint|\(URL(fileURLWithPath: d).standardizedFileURL.path)|\(m.state.step)|\(m.shards.map { String($0.crc32) }.joined(separator: ","))"
        case .random: key += "random|\(options.seed)"
        case .imagenet(_, let weights): key += "imagenet|\(weights)|\(Files.size(weights) ?? 0)"
        }
        // Each image by its path, size and modification time, so that a changed file with the same path
        // is not served stale features.
        let images = paths.map { path -> String in
            var info = stat()
            guard stat(path, &info) == 0 else { return "\(path)|missing" }
            return "\(path)|\(info.st_size)|\(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)"
        }
        var crc: UInt32 = 0
        for part in [key] + images { crc = Data((part + "\n").utf8).withUnsafeBytes { crc32Update(crc, $0) } }
        var crc2: UInt32 = 0x9E3779B9
        for part in images.reversed() + [key] { crc2 = Data((part + "\n").utf8).withUnsafeBytes { crc32Update(crc2, $0) } }
        return "\(dir)/\(data.dataset.rawValue)-\(split)-\(paths.count)-\(String(format: "%08x%08x", crc, crc2)).safetensors"
    }

    // MARK: losses and metrics

    /// Mean loss over rows and its gradient (already divided by `normalizer`) for logits [rows, outputs].
    func loss(logits: UnsafePointer<Float>, targets: UnsafePointer<Float>, rows: Int, normalizer: Int,
              gradient: UnsafeMutablePointer<Float>?) -> Double {
        let o = outputs, n = rows * o
        var losses = [Float](repeating: 0, count: data.task == .multiClass ? rows : n)
        var probabilities = [Float](repeating: 0, count: n)
        if data.task == .multiClass {
            let classes = (0..<rows).map { r in Int32((0..<o).max { targets[r * o + $0] < targets[r * o + $1] }!) }
            CrossEntropy.forward(losses: &losses, probabilities: &probabilities, logits: logits, targets: classes, rows: rows, classes: o)
            if let gradient {
                let g = [Float](repeating: 1 / Float(normalizer), count: rows)
                gradient.update(repeating: 0, count: n)
                CrossEntropy.backward(gradLogits: gradient, gradLosses: g, probabilities: probabilities, targets: classes, rows: rows, classes: o)
            }
        } else {
            BinaryCrossEntropy.forward(losses: &losses, probabilities: &probabilities, logits: logits, targets: targets, count: n)
            if let gradient {
                // Mean over rows and outputs, as BCEWithLogitsLoss(reduction="mean").
                let g = [Float](repeating: 1 / Float(normalizer * o), count: n)
                gradient.update(repeating: 0, count: n)
                BinaryCrossEntropy.backward(gradLogits: gradient, gradLosses: g, probabilities: probabilities, targets: targets, count: n)
            }
            return losses.reduce(0.0) { $0 + Double($1) } / Double(o)
        }
        return losses.reduce(0.0) { $0 + Double($1) }
    }

    /// Scores [n, outputs]: sigmoid probabilities, or softmax over classes.
    func scores(_ logits: [Float], rows: Int) -> [Float] {
        let o = outputs
        var out = [Float](repeating: 0, count: rows * o)
        if data.task == .multiClass {
            logits.withUnsafeBufferPointer { x in out.withUnsafeMutableBufferPointer { Softmax.forward(output: $0.baseAddress!, input: x.baseAddress!, rows: rows, columns: o) } }
        } else {
            for i in 0..<(rows * o) { out[i] = 1 / (1 + Float.exp(-logits[i])) }
        }
        return out
    }

    /// The test metric of scores [n, outputs]: mean ROC AUC over labels (per group, averaging the
    /// scores of a group's images, for MURA's studies), or accuracy for multi-class.
    func metric(scores: [Float], split: LabeledArrays) throws -> (value: Double, perLabel: [String: Double]) {
        try Self.metric(data: data, scores: scores, split: split) { if communicator.isRoot { log($0) } }
    }

    /// `metric(scores:split:)` for any evaluation of `data` (linear, fine-tuned, zero-shot); `warn` gets
    /// the warning about labels whose AUC is undefined.
    static func metric(data: DownstreamData, scores: [Float], split: LabeledArrays,
                       warn: (String) -> Void) throws -> (value: Double, perLabel: [String: Double]) {
        let (averaged, labels) = groupScores(data: data, scores: scores, split: split)
        if data.task == .multiClass {
            let (accuracy, perClass) = ClassificationConfidence.accuracy(names: data.labelNames, scores: averaged, targets: labels, units: averaged.indices)
            return (accuracy, perClass)
        }
        let columns = data.labelNames.indices.map { k in averaged.map { $0[k] } }
        let truthColumns = data.labelNames.indices.map { k in labels.map { $0[k] >= 0.5 } }
        let (mean, perLabel, undefined) = try Metrics.meanROCAUC(scores: columns, labels: truthColumns, names: data.labelNames)
        if !undefined.isEmpty {
            warn("warning: \(data.dataset.rawValue) test split: the AUC of \(undefined.joined(separator: ", ")) is undefined (one class only); "
                + "the mean is over the other labels")
        }
        guard mean.isFinite else {
            throw ConvirtError("\(data.dataset.rawValue) test split: no label has both classes, so no AUC is defined")
        }
        return (mean, perLabel)
    }

    /// The units the metric is computed over: each image, or each group of images (MURA's studies), with
    /// the mean of its images' scores [units][outputs] and its targets, in first-seen order.
    static func groupScores(data: DownstreamData, scores: [Float], split: LabeledArrays) -> (scores: [[Double]], targets: [[Float]]) {
        let o = data.labelNames.count
        var order: [String] = [], sums: [String: [Double]] = [:], counts: [String: Int] = [:], truth: [String: [Float]] = [:]
        for i in 0..<split.count {
            let g = split.groups[i]
            if sums[g] == nil { order.append(g); sums[g] = [Double](repeating: 0, count: o); truth[g] = Array(split.targets[(i * o)..<((i + 1) * o)]) }
            for k in 0..<o { sums[g]![k] += Double(scores[i * o + k]) }
            counts[g, default: 0] += 1
        }
        return (order.map { g in sums[g]!.map { $0 / Double(counts[g]!) } }, order.map { truth[$0]! })
    }

    /// The 95% bootstrap intervals of a result over its test units (`ClassificationConfidence.bootstrap`),
    /// from each run's test scores.
    static func confidence(data: DownstreamData, runs: [[Float]], split: LabeledArrays, resamples: Int) -> ClassificationConfidence? {
        guard resamples > 0, !runs.isEmpty else { return nil }
        let grouped = runs.map { groupScores(data: data, scores: $0, split: split) }
        let units = grouped[0].scores.count
        guard units > 0 else { return nil }
        return ClassificationConfidence.bootstrap(names: data.labelNames, multiClass: data.task == .multiClass, runs: grouped,
                                                  draws: Bootstrap.draws(count: units, resamples: resamples),
                                                  unit: split.groups.count == Set(split.groups).count ? "image" : "group")
    }

    // MARK: the classifier on fixed features

    /// Logits of the classifier on features [n, F] (evaluation mode).
    func classifierLogits(_ features: [Float], rows: Int) -> [Float] {
        let f = model.featureCount, o = outputs
        var out = [Float](repeating: 0, count: rows * o)
        let chunk = 256
        features.withUnsafeBufferPointer { x in
            var start = 0
            while start < rows {
                let end = min(rows, start + chunk)
                let y = model.classify(x.baseAddress! + start * f, rows: end - start, context: PassContext(training: false, precision: model.precision))
                out.withUnsafeMutableBufferPointer { ($0.baseAddress! + start * o).update(from: y, count: (end - start) * o) }
                start = end
            }
        }
        return out
    }

    /// The classifier's own Adam moments (linear evaluation, and fine-tuning's head-only phase), zero at
    /// the start; with the batch buffers of its steps.
    final class HeadTraining {
        let m: Scratch<Float>, v: Scratch<Float>
        let batchFeatures = Scratch<Float>(), batchTargets = Scratch<Float>(), gradLogits = Scratch<Float>()
        init(count: Int) {
            m = Scratch(count); v = Scratch(count)
            m.zeroed(count); v.zeroed(count)
        }
    }

    /// One Adam step of the classifier on a batch of feature rows (every rank does the same arithmetic).
    func classifierStep(_ features: [Float], _ split: LabeledArrays, rows: [Int], step: Int, epoch: Int, rate: Double, seed: UInt64,
                        state: HeadTraining) {
        let batchFeatures = state.batchFeatures, batchTargets = state.batchTargets, gradLogits = state.gradLogits
        let f = model.featureCount, o = outputs, n = rows.count
        let x = batchFeatures.ensure(n * f), y = batchTargets.ensure(n * o)
        features.withUnsafeBufferPointer { src in
            for (k, i) in rows.enumerated() { (x + k * f).update(from: src.baseAddress! + i * f, count: f) }
        }
        split.targets.withUnsafeBufferPointer { t in for (k, i) in rows.enumerated() { (y + k * o).update(from: t.baseAddress! + i * o, count: o) } }
        let context = PassContext(training: true, stream: RandomStream(seed: seed, .linearStep, UInt64(epoch), UInt64(step)), sampleIndices: rows.map { UInt64($0) },
                                  precision: model.precision)
        let logits = model.classify(x, rows: n, context: context)
        let g = gradLogits.ensure(n * o)
        _ = loss(logits: logits, targets: y, rows: n, normalizer: n, gradient: g)
        let head = model.headRange
        (model.arena.grads + head.lowerBound).update(repeating: 0, count: head.count)
        _ = model.backwardClassifier(gradLogits: g, features: x)
        Adam.step(params: model.arena.trainingParams + head.lowerBound, grads: model.arena.grads + head.lowerBound, m: state.m.pointer, v: state.v.pointer,
                  count: head.count, step: step, config: AdamConfig(learningRate: rate, weightDecay: options.weightDecay, decoupled: false))
    }

    /// The validation loss of the classifier on fixed features.
    func validationLoss(_ features: [Float], _ split: LabeledArrays) -> Double {
        let logits = classifierLogits(features, rows: split.count)
        return logits.withUnsafeBufferPointer { l in split.targets.withUnsafeBufferPointer { t in
            loss(logits: l.baseAddress!, targets: t.baseAddress!, rows: split.count, normalizer: split.count, gradient: nil)
        } } / Double(max(1, split.count))
    }

    // MARK: the protocols

    /// Runs the protocol `options.runs` times; every rank returns the same result.
    public func run() throws -> ClassificationResult {
        let o = outputs
        var train = LabeledArrays(data.train, outputs: o), validation = LabeledArrays(data.validation, outputs: o)
        var test = LabeledArrays(data.test, outputs: o)
        // Features of the frozen encoder, once for all runs (linear; and the fine-tuning's head-only phase).
        var trainFeatures = try features("train", train.paths)
        // Fine-tuning reads the validation split again every epoch, each rank the same share as here.
        var validationFeatures = try features("validation", validation.paths, cache: imageCache)
        var testFeatures = try features("test", test.paths)
        func dropUnreadable(_ name: String, _ split: inout LabeledArrays, _ f: inout (features: [Float], ok: [Bool])) {
            let keep = f.ok.indices.filter { f.ok[$0] }
            guard keep.count < split.count else { return }
            unreadable[name] = split.count - keep.count
            if communicator.isRoot {
                let bad = f.ok.indices.filter { !f.ok[$0] }.prefix(3).map { split.paths[$0] }
                log("\(name): \(split.count - keep.count) image(s) could not be read and are skipped, e.g. \(bad.joined(separator: ", "))")
            }
            let width = model.featureCount
            split = split.subset(keep)
            f.features = keep.flatMap { Array(f.features[($0 * width)..<(($0 + 1) * width)]) }
            f.ok = keep.map { _ in true }
        }
        dropUnreadable("train", &train, &trainFeatures)
        dropUnreadable("validation", &validation, &validationFeatures)
        dropUnreadable("test", &test, &testFeatures)
        var values: [Double] = [], perLabelRuns: [[String: Double]] = [], seeds: [UInt64] = [], testScores: [[Float]] = []
        var epochsRun: [Int] = [], stopReasons: [String] = []
        for run in 0..<options.runs {
            let seed = options.seed &+ UInt64(run)
            seeds.append(seed)
            // This run's labelled subset of the training split.
            let chosen = Set(DownstreamReader.fraction(train.paths.indices.map { i in
                LabeledImage(path: train.paths[i], targets: Array(train.targets[(i * o)..<((i + 1) * o)]), group: train.groups[i])
            }, options.fraction, seed: seed).map(\.path))
            let rows = train.paths.indices.filter { chosen.contains(train.paths[$0]) }
            let subset = train.subset(rows)
            let subsetFeatures = rows.flatMap { Array(trainFeatures.features[($0 * model.featureCount)..<(($0 + 1) * model.featureCount)]) }
            if communicator.isRoot {
                log("run \(run + 1)/\(options.runs) (seed \(seed)): \(options.evaluationProtocol) on \(subset.count) training images "
                    + "(\(Int(options.fraction * 100))% of \(train.count)), \(validation.count) validation, \(test.count) test")
            }
            let scores: [Float], stop: RunStop
            if options.evaluationProtocol == .linear {
                model.arena.mutableParams.update(from: initialParameters, count: model.arena.count)
                model.resetHead(seed: seed)
                stop = try trainClassifier(subsetFeatures, subset, validationFeatures.features, validation, seed: seed)
                scores = self.scores(classifierLogits(testFeatures.features, rows: test.count), rows: test.count)
            } else {
                (scores, stop) = try fineTune(subset, subsetFeatures, validation, test, seed: seed)
            }
            epochsRun.append(stop.epochs)
            stopReasons.append(stop.reason.rawValue)
            let (value, perLabel) = try metric(scores: scores, split: test)
            if communicator.isRoot {
                log(String(format: "run %d: test %@ %.4f after %d epoch(s), stopped by %@ (best validation loss at epoch %d)", run + 1,
                           data.task == .multiClass ? "accuracy" : "AUC", value, stop.epochs,
                           stop.reason == .plateau ? "the plateau" : "the epoch cap", stop.bestEpoch))
            }
            values.append(value)
            perLabelRuns.append(perLabel)
            testScores.append(scores)
        }
        if let imageCache, communicator.isRoot {
            let kept = imageCache.statistics, megabytes = { (bytes: Int) in String(format: "%.0f MB", Double(bytes) / 1e6) }
            log("decoded images kept in memory (rank 0): \(kept.images), \(megabytes(kept.bytes)) of \(megabytes(imageCache.budgetBytes)); "
                + "reads from memory \(kept.hits), decoded \(kept.misses)")
        }
        var checkpoint: String? = nil
        if case .checkpoint(let d) = source { checkpoint = d }
        if case .imagenet(_, let w) = source { checkpoint = w }
        var result = ClassificationResult(dataset: data.dataset.rawValue, protocol: options.evaluationProtocol.rawValue, fraction: options.fraction,
                                          metric: data.task == .multiClass ? "accuracy" : "auc", runs: values,
                                          perLabel: ClassificationResult.perLabelMeans(perLabelRuns), initialization: source.name,
                                          checkpoint: checkpoint, seeds: seeds, epochsRun: epochsRun, stopReasons: stopReasons)
        result.ci95 = Self.confidence(data: data, runs: testScores, split: test, resamples: options.bootstrapResamples)
        return result
    }

    /// How a downstream training run ended: epochs trained, the epoch of the lowest validation loss, why.
    struct RunStop {
        var epochs = 0
        var bestEpoch = 0
        var reason = StopReason.maxEpochs
    }

    /// Linear evaluation: the classifier trained on fixed features with the plateau schedule; the
    /// parameters of the epoch with the lowest validation loss are kept.
    func trainClassifier(_ features: [Float], _ split: LabeledArrays, _ validationFeatures: [Float], _ validation: LabeledArrays,
                         seed: UInt64) throws -> RunStop {
        var schedule = plateauSchedule()
        var stop = RunStop()
        let head = model.headRange
        var best = Array(UnsafeBufferPointer(start: model.arena.params + head.lowerBound, count: head.count))
        let state = HeadTraining(count: head.count)
        var step = 0
        var bestMetric = -Double.infinity
        for epoch in 0..<options.maxEpochs {
            var epochSteps = 0
            for pass in 0... {
                let order = permutation(split.count, seed: seed, epoch: epoch, pass: pass)
                var start = 0
                while start < order.count {
                    let rows = Array(order[start..<min(order.count, start + options.batch)])
                    step += 1
                    epochSteps += 1
                    classifierStep(features, split, rows: rows, step: step, epoch: epoch, rate: schedule.rate(step: step), seed: seed, state: state)
                    start += options.batch
                }
                if epochSteps >= options.minEpochSteps { break }
            }
            let val = validationLoss(validationFeatures, validation)
            let decision = schedule.validated(val)!
            stop.epochs = epoch + 1
            var keep = decision.improved
            if options.keepBest == .metric {
                let rows = validation.count
                let value = try Self.metric(data: data, scores: scores(classifierLogits(validationFeatures, rows: rows), rows: rows),
                                            split: validation, warn: { _ in }).value
                keep = value.isFinite && value > bestMetric
                if keep { bestMetric = value }
            }
            if keep {
                best = Array(UnsafeBufferPointer(start: model.arena.params + head.lowerBound, count: head.count))
                stop.bestEpoch = epoch + 1
            }
            logEpoch(epoch, val, schedule, last: decision.stop || epoch + 1 == options.maxEpochs)
            if decision.stop { stop.reason = .plateau; break }
        }
        best.withUnsafeBufferPointer { (model.arena.mutableParams + head.lowerBound).update(from: $0.baseAddress!, count: head.count) }
        return stop
    }

    /// With `verbose`, every tenth epoch's validation loss and the last one's.
    func logEpoch(_ epoch: Int, _ val: Double, _ schedule: LearningRateSchedule, last: Bool) {
        guard options.verbose && communicator.isRoot && (epoch % 10 == 0 || last) else { return }
        log(String(format: "  epoch %d: validation loss %.4f (best %.4f), lr %.2e", epoch + 1, val, schedule.plateau!.best, schedule.currentRate))
    }

    /// A permutation of 0..<n for an epoch of a run (the same on every rank); `pass` > 0: a further pass
    /// over a small training set within the epoch (`minEpochSteps`).
    func permutation(_ n: Int, seed: UInt64, epoch: Int, pass: Int = 0) -> [Int] {
        let stream = pass == 0 ? RandomStream(seed: seed, .evaluationPermutation, UInt64(epoch))
            : RandomStream(seed: seed, .evaluationPermutation, UInt64(epoch), UInt64(pass))
        return stream.permutation(n)
    }

    /// The paper's downstream schedule: the rate halved after `patience` epochs without a lower
    /// validation loss, training stopped after `stopAfter`.
    func plateauSchedule() -> LearningRateSchedule {
        LearningRateSchedule(.plateau(Plateau(patience: options.patience, stopAfterStale: options.stopAfter)), baseRate: learningRate)
    }

    /// The step engine of fine-tuning (created once: with ZeRO-1 it shards the arena's Adam state).
    private var syncEngine: GradientSync?
    func makeSync() throws -> GradientSync {
        if let syncEngine { return syncEngine }
        let made = try GradientSync(arena: model.arena, communicator: communicator, mode: options.zero1 ? .zero1(overlap: true) : .replicated(overlap: true),
                                    exchange: options.gradientExchange)
        syncEngine = made
        return made
    }

    /// Fine-tuning: the classifier alone for `headSteps` steps on the frozen features, then the whole
    /// encoder with the plateau schedule, data-parallel on the step engine (SyncBN, gradient buckets
    /// overlapped with backward, or ZeRO-1). Returns the test scores of the best epoch.
    func fineTune(_ split: LabeledArrays, _ features: [Float], _ validation: LabeledArrays, _ test: LabeledArrays,
                  seed: UInt64) throws -> ([Float], RunStop) {
        var stop = RunStop()
        let arena = model.arena
        arena.mutableParams.update(from: initialParameters, count: arena.count)
        model.resetHead(seed: seed)
        trainHeadAlone(features, split, seed: seed)
        // 2. Everything, data-parallel: rank r takes rows [r b, (r+1) b) of each global batch.
        let sync = try makeSync()
        arena.zeroMoments()
        let w = communicator.size, r = communicator.rank, global = options.batch
        let s = options.imageSize, o = outputs
        let prefetcher = ImagePrefetcher(size: s, cache: imageCache), targets = Scratch<Float>(global * o), gradLogits = Scratch<Float>(global * o)
        var schedule = plateauSchedule()
        var best = Array(UnsafeBufferPointer(start: arena.params, count: arena.count))
        var step = 0
        // Whole global batches only (the last partial one is dropped, as DataLoader(drop_last=True)),
        // but at least one batch: with fewer images than the batch, the batch shrinks to them.
        let perStep = min(global, split.count / w * w)
        guard perStep >= w else { throw ConvirtError("fine-tuning needs at least \(w) training images (one per rank)") }
        let local = perStep / w, steps = split.count / perStep
        for epoch in 0..<options.maxEpochs {
            let order = permutation(split.count, seed: seed, epoch: epoch)
            func rowsOf(_ k: Int) -> [Int] { Array(order[(k * perStep + r * local)..<(k * perStep + (r + 1) * local)]) }
            prefetcher.start(rowsOf(0).map { split.paths[$0] })
            for k in 0..<steps {
                step += 1
                let rows = rowsOf(k)
                // This step's images were decoded while the previous step computed; the next ones start now.
                let images = prefetcher.take().images
                if k + 1 < steps { prefetcher.start(rowsOf(k + 1).map { split.paths[$0] }) }
                split.targets.withUnsafeBufferPointer { t in
                    for (j, i) in rows.enumerated() { (targets.pointer + j * o).update(from: t.baseAddress! + i * o, count: o) }
                }
                sync.begin()
                var context = PassContext(training: true, reducer: syncBatchNormReducer(communicator),
                                          stream: RandomStream(seed: seed, .fineTuneStep, UInt64(step)), sampleIndices: rows.map { UInt64($0) },
                                          precision: model.precision, gradientPiece: GradientPieces.fitting(globalBatch: perStep, localBatch: local))
                let h = try model.features(images, batch: local, size: s, context: context)
                let logits = model.classify(h, rows: local, context: context)
                _ = loss(logits: logits, targets: targets.pointer, rows: local, normalizer: perStep, gradient: gradLogits.pointer)
                context.gradientsReady = sync.readyHandler
                let gradFeatures = model.backwardClassifier(gradLogits: gradLogits.pointer, features: h)
                try context.gradientsReady?(model.headRange)
                try model.backwardEncoder(gradFeatures: gradFeatures, context: context)
                _ = try sync.finish()
                try sync.step(adam: AdamConfig(learningRate: schedule.rate(step: step), weightDecay: options.weightDecay, decoupled: false), step: step)
            }
            let val = try evaluateLoss(validation, cache: imageCache)
            let decision = schedule.validated(val)!
            stop.epochs = epoch + 1
            if decision.improved {
                best = Array(UnsafeBufferPointer(start: arena.params, count: arena.count))
                stop.bestEpoch = epoch + 1
            }
            logEpoch(epoch, val, schedule, last: decision.stop || epoch + 1 == options.maxEpochs)
            if decision.stop { stop.reason = .plateau; break }
        }
        arena.mutableParams.update(from: best, count: arena.count)
        return (scores(try evaluate(test), rows: test.count), stop)
    }

    /// Fine-tuning's first phase: the classifier alone for `headSteps` steps at `headLearningRate`, on
    /// the frozen encoder's features (every rank does the same arithmetic).
    func trainHeadAlone(_ features: [Float], _ split: LabeledArrays, seed: UInt64) {
        let state = HeadTraining(count: model.headRange.count)
        var headStep = 0, epoch = 0
        while headStep < options.headSteps {
            let order = RandomStream(seed: seed ^ StreamPurpose.headPhasePermutation.rawValue, .evaluationPermutation, UInt64(epoch)).permutation(split.count)
            var start = 0
            while start < order.count && headStep < options.headSteps {
                headStep += 1
                classifierStep(features, split, rows: Array(order[start..<min(order.count, start + options.batch)]), step: headStep, epoch: epoch,
                               rate: options.headLearningRate, seed: seed, state: state)
                start += options.batch
            }
            epoch += 1
        }
    }

    /// Logits [n, outputs] of a split through the current encoder and classifier (evaluation mode),
    /// computed in slices over the ranks and gathered; the images through `cache`, where given.
    func evaluate(_ split: LabeledArrays, cache: DecodedImageCache? = nil) throws -> [Float] {
        let o = outputs, n = split.count
        let (counts, mine) = ArenaShards.split(n, communicator)
        var logits = [Float](repeating: 0, count: n * o)
        try ImagePrefetcher.batches(split.paths, mine, batch: options.featureBatch, size: options.imageSize, cache: cache) { slice, images, _ in
            let context = PassContext(training: false, precision: model.precision)
            let h = try model.features(images, batch: slice.count, size: options.imageSize, context: context)
            let y = model.classify(h, rows: slice.count, context: context)
            logits.withUnsafeMutableBufferPointer { ($0.baseAddress! + slice.lowerBound * o).update(from: y, count: slice.count * o) }
        }
        try logits.withUnsafeMutableBufferPointer { try communicator.allGatherInPlace($0, counts: counts.map { $0 * o }) }
        return logits
    }

    func evaluateLoss(_ split: LabeledArrays, cache: DecodedImageCache? = nil) throws -> Double {
        let logits = try evaluate(split, cache: cache)
        return logits.withUnsafeBufferPointer { l in split.targets.withUnsafeBufferPointer { t in
            loss(logits: l.baseAddress!, targets: t.baseAddress!, rows: split.count, normalizer: split.count, gradient: nil)
        } } / Double(max(1, split.count))
    }
}
