// `convirt eval linear|finetune|retrieval` and `convirt embed`: the paper's evaluations of a pretrained
// encoder (under mpirun, features and fine-tuning are split over the ranks; rank 0 prints and writes).

import ArgumentParser
import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import ConvirtText
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "eval", abstract: "Evaluations: linear, fine-tuned, zero-shot, CheXpert 8x200 and held-out retrieval.",
                                                    subcommands: [EvalLinear.self, EvalFinetune.self, EvalZeroShot.self, EvalRetrieval.self, EvalHeldOut.self])
}

/// An evaluation's results as TensorBoard scalars at the checkpoint's step, in a new event file of the
/// checkpoint's run (when the run keeps a tensorboard/ directory).
/// A classification result as scalars: TAG (the mean) and TAG/LABEL per label.
func classificationScalars(_ tag: String, _ result: ClassificationResult) -> [(tag: String, value: Double)] {
    [(tag, result.mean)] + result.perLabel.sorted { $0.key < $1.key }.map { ("\(tag)/\($0.key)", $0.value) }
}

/// The readers' options of `eval linear|finetune|zeroshot`: the split seed and CheXpert's U-Ones labels
/// (comma-separated).
func downstreamOptions(seed: UInt64, uOnes: String?) -> DownstreamOptions {
    var options = DownstreamOptions()
    options.seed = seed
    options.uOnes = Set((uOnes ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })
    return options
}

func logToTensorBoard(checkpoint: String, _ scalars: [(tag: String, value: Double)], step: Int) throws {
    guard let run = Checkpoints.runDirectory(ofCheckpoint: checkpoint), FileManager.default.fileExists(atPath: "\(run)/tensorboard") else { return }
    try TensorBoardWriter(directory: "\(run)/tensorboard").scalars(scalars, step: step)
}

/// `value` as JSON with sorted keys, indented: how results files are written.
func prettyJSON<T: Encodable>(_ value: T) throws -> Data {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    return try encoder.encode(value)
}

func writeJSON(_ data: Data, to path: String) throws {
    try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent.isEmpty ? "." : (path as NSString).deletingLastPathComponent,
                                            withIntermediateDirectories: true)
    try Files.writeAtomically(data, to: path)
}

/// Each named count at least 1, or a usage error naming the first that is not.
func requirePositive(_ values: KeyValuePairs<String, Int>) throws {
    for (name, value) in values where value < 1 { throw ValidationError("\(name) must be positive, got \(value)") }
}

/// An input size the ResNet takes (its total stride is 32), where one is given.
func requireImageSize(_ size: Int?) throws {
    if let size, size < 32 || size > 8192 { throw ValidationError("--image-size must be in 32...8192 (the network's total stride is 32), got \(size)") }
}

struct ClassificationArguments: ParsableArguments {
    @OptionGroup var collective: CollectiveOptions
    @Option(help: "chexpert, rsna, covidx or mura.") var dataset: DownstreamDataset
    @Option(help: "The dataset's directory, as released.") var root: String
    @Option(help: "A ConVIRT checkpoint directory, or a run directory (its latest checkpoint).") var checkpoint: String?
    @Option(name: .customLong("init"), help: "convirt (the checkpoint's image encoder), random or imagenet (with --image-weights).")
    var initialization = Initialization.convirt
    @Option(help: "torchvision ResNet weights (.safetensors) for --init imagenet.") var imageWeights: String?
    @Option(help: "Architecture for random/imagenet init without a checkpoint: tiny, demo or paper.") var preset = Preset.paper
    @Option(parsing: .unconditional, help: "Share of the training labels: 0.01, 0.1 or 1.") var fraction = 1.0
    @Option(parsing: .unconditional, help: "Runs (seeds); the result is their mean and standard deviation.") var runs = 5
    @Option(parsing: .unconditional, help: "Seed of the first run.") var seed: UInt64 = 0
    @Option(parsing: .unconditional, help: "Input size (default: the encoder's, 224 for the paper).") var imageSize: Int?
    @Option(parsing: .unconditional, help: "Learning rate (default 1e-4, 1e-3 for COVIDx).") var lr: Double?
    @Option(parsing: .unconditional, help: "Batch (over all ranks).") var batch = 64
    @Option(parsing: .unconditional, help: "Maximum epochs.") var maxEpochs = 100
    @Option(parsing: .unconditional, help: "Linear: the fewest classifier steps in an epoch (a smaller training set is passed over again within it); 1: one pass, the paper's.")
    var minEpochSteps = 1
    @Option(help: "Linear: keep the epoch with the lowest validation loss (loss, the paper's) or the best validation AUC/accuracy (metric); the schedule follows the loss either way.")
    var keepBest: ClassificationOptions.KeepBest = .loss
    @Option(parsing: .unconditional, help: "Fine-tuning: steps of the classifier alone first.") var headSteps = 200
    @Option(help: "CheXpert labels whose uncertain values count as positive (comma-separated; default: none, U-Zeros).") var uOnes: String?
    @Option(help: "Directory for cached features (default: feature-cache beside --out).") var cache: String?
    @Option(parsing: .unconditional, help: "Threads per rank.") var threads = 1
    @Option(help: "Precision of the convolutions and matrix products: fp32, bf16 (mixed, as PyTorch's CPU autocast) or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16).")
    var precision = PrecisionChoice.auto
    @Option(parsing: .unconditional, help: "Fine-tuning: MB of decoded training and validation images each rank keeps in memory for later epochs (0: decode them every epoch).")
    var imageCacheMb = 1024
    @Flag(help: "Fine-tuning: shard the Adam state over the ranks (ZeRO-1).") var zero1 = false
    @Option(help: ArgumentHelp("Fine-tuning: how gradients are summed over ranks (auto: shared memory among each machine's ranks, see "
                               + "`convirt train --help`).", valueName: "auto|collectives|shared-memory"))
    var gradientExchange = GradientExchange.auto
    @Option(help: "Results file (JSON).") var out: String?
    @Flag(help: "Print only the result line (and warnings).") var quiet = false
    @Flag(help: "Print the validation loss of every tenth epoch of each run.") var verbose = false
    @Option(help: ArgumentHelp("An evaluation manifest (NAME.manifest.json, written beside every --out): rerun exactly that evaluation, "
                               + "its settings taken from it; a checkpoint or data whose hashes differ from the pinned ones is refused."))
    var manifest: String?

    /// Where the evaluated encoder comes from.
    enum Initialization: String, ExpressibleByArgument, CaseIterable { case convirt, random, imagenet }

    func validate() throws {
        try requirePositive(["--max-epochs": maxEpochs, "--min-epoch-steps": minEpochSteps, "--runs": runs, "--batch": batch, "--threads": threads])
        guard headSteps >= 0 else { throw ValidationError("--head-steps must not be negative, got \(headSteps)") }
        guard imageCacheMb >= 0 && imageCacheMb <= 1 << 30 else { throw ValidationError("--image-cache-mb must be within 0...\(1 << 30), got \(imageCacheMb)") }
        guard fraction > 0 && fraction <= 1 else { throw ValidationError("--fraction must be in (0, 1] (0.01, 0.1 or 1 in the paper), got \(fraction)") }
        if let lr { guard lr > 0 && lr.isFinite else { throw ValidationError("--lr must be a positive number, got \(lr)") } }
        try requireImageSize(imageSize)
    }

    func source() throws -> EncoderSource {
        switch initialization {
        case .convirt:
            guard let checkpoint else { throw ValidationError("--init convirt needs --checkpoint") }
            return .checkpoint(try Checkpoints.resolve(checkpoint))
        case .random, .imagenet:
            let architecture = try checkpoint.map { try Checkpoints.manifest(Checkpoints.resolve($0)).config.model.image }
                ?? ConVIRTConfig.preset(preset).image
            if initialization == .random { return .random(architecture) }
            guard let imageWeights else { throw ValidationError("--init imagenet needs --image-weights F.safetensors") }
            return .imagenet(architecture, weights: imageWeights)
        }
    }

    func run(protocol evaluationProtocol: EvaluationProtocol) throws {
        let command = "eval \(evaluationProtocol.rawValue)"
        try withPinned(command, collective, manifest: manifest, self, pin: pinned) { arguments, communicator, pinned in
            try arguments.evaluate(evaluationProtocol, communicator, pinned: pinned, pinnedPath: manifest)
        }
    }

    func evaluate(_ evaluationProtocol: EvaluationProtocol, _ communicator: Communicator, pinned: EvaluationManifest?, pinnedPath: String?) throws {
        let name = evaluationProtocol.rawValue
        do {
            Parallel.setThreads(threads)
            let root = communicator.isRoot
            let (source, data) = try agreeOnStart("eval \(name)", communicator) { () throws -> (EncoderSource, DownstreamData) in
                if quiet && verbose { throw ValidationError("give --quiet or --verbose, not both") }
                let encoder = try self.source()
                let data = try DownstreamReader.load(dataset, root: self.root, options: downstreamOptions(seed: seed, uOnes: uOnes))
                try refuseDifferences(pinned, EvaluationManifest(command: "eval \(name)", settings: [:], splits: downstreamSplits(data, root: self.root),
                                                                 checkpoint: try encoder.checkpointDirectory.map(checkpointPin), program: "", precision: ""),
                                      path: pinnedPath)
                return (encoder, data)
            }
            if root && !quiet {
                print("convirt eval \(name): \(dataset.rawValue) (\(data.task.rawValue), labels \(data.labelNames.joined(separator: ", "))): "
                      + "\(data.train.count) train, \(data.validation.count) validation, \(data.test.count) test images; "
                      + "encoder \(source.name); \(communicator.size) rank(s); \(precision.describe())")
                for (reason, count) in data.skipped.sorted(by: { $0.key < $1.key }) { print("skipped \(count) row(s): \(reason)") }
            }
            var options = ClassificationOptions()
            options.evaluationProtocol = evaluationProtocol
            options.zero1 = zero1
            options.gradientExchange = gradientExchange
            options.fraction = fraction
            options.runs = runs
            options.seed = seed
            options.learningRate = lr
            options.batch = batch
            options.maxEpochs = maxEpochs
            options.minEpochSteps = minEpochSteps
            options.keepBest = keepBest
            options.precision = precision.resolved()
            options.headSteps = headSteps
            options.imageCacheBytes = imageCacheMb * 1_000_000
            switch source {
            case .checkpoint(let dir): options.imageSize = try imageSize ?? Checkpoints.manifest(dir).config.model.image.imageSize
            case .random(let c), .imagenet(let c, _): options.imageSize = imageSize ?? c.imageSize
            }
            options.cacheDirectory = cache ?? out.map { (($0 as NSString).deletingLastPathComponent.isEmpty ? "." : ($0 as NSString).deletingLastPathComponent) + "/feature-cache" }
            let start = Date()
            options.verbose = verbose
            let evaluation = try ClassificationEvaluation(data: data, source: source, options: options, communicator: communicator) { line in
                if root && (!quiet || line.hasPrefix("warning")) { print(line) }
            }
            let result = try evaluation.run()
            guard root else { return }
            let epochs = result.epochsRun.map { e in
                let capped = (result.stopReasons ?? []).filter { $0 == StopReason.maxEpochs.rawValue }.count
                return ", \(e.min() ?? 0)-\(e.max() ?? 0) epochs" + (capped > 0 ? " (\(capped) at the cap)" : "")
            } ?? ""
            print(String(format: "%@ %@ on %@ at %g%% of the labels: %@ %.4f ± %.4f over %d run(s)%@ (%.0f s)", source.name, name, dataset.rawValue,
                         fraction * 100, result.metric, result.mean, result.std, result.runs.count, epochs, Date().timeIntervalSince(start)))
            // The epoch cap rather than the plateau ended a run: it had not converged, and the comparison with
            // runs that did (often the random-init ones) is not like for like.
            if let capped = result.runsAtEpochCap, capped > 0 {
                print("warning: \(capped) of \(result.runs.count) run(s) of \(dataset.rawValue) (\(source.name)) ended at the \(maxEpochs)-epoch cap "
                      + "before the validation loss stopped falling: not converged (give a larger --max-epochs)")
            }
            if let out {
                try writeJSON(result.encoded(), to: out)
                try EvaluationManifest(command: "eval \(name)", settings: pinnedSettings(options), splits: downstreamSplits(data, root: self.root),
                                       seeds: result.seeds, checkpoint: try source.checkpointDirectory.map(checkpointPin),
                                       program: "convirt \(convirtVersion)", precision: options.precision.rawValue)
                    .write(to: EvaluationManifest.path(forResults: out))
            }
            // Under the run's TensorBoard as eval/PROTOCOL/DATASET/INIT/LABELS (and per label), at the checkpoint's step.
            if let checkpoint, let dir = try? Checkpoints.resolve(checkpoint), let step = try? Checkpoints.manifest(dir).state.step {
                try logToTensorBoard(checkpoint: dir, classificationScalars("eval/\(name)/\(dataset.rawValue)/\(source.name)/\(PaperTable.fractionColumn(fraction))",
                                                                            result), step: step)
            }
            if quiet { return }
            for (label, value) in result.perLabel.sorted(by: { $0.key < $1.key }) { print(String(format: "  %@: %.4f", label, value)) }
            if let out { print("results: \(out)") }
            print(PaperTable.classificationTable(protocol: name, ours: [result]))
        }
    }
}

struct EvalLinear: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "linear", abstract: "Linear evaluation: a classifier on the frozen encoder's features.")
    @OptionGroup var arguments: ClassificationArguments
    func run() throws { try arguments.run(protocol: .linear) }
}

struct EvalFinetune: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "finetune", abstract: "Fine-tuning: the whole encoder and a classifier, data-parallel.")
    @OptionGroup var arguments: ClassificationArguments
    func run() throws { try arguments.run(protocol: .finetune) }
}

struct EvalZeroShot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "zeroshot",
        abstract: "Zero-shot classification from text prompts (CheXzero's protocol): no labels, the test split of eval linear.")
    @Option(help: "chexpert, rsna, covidx or mura.") var dataset: DownstreamDataset
    @Option(help: "The dataset's directory, as released.") var root: String
    @Option(help: "A ConVIRT checkpoint directory, or a run directory (its latest checkpoint).") var checkpoint: String
    @Option(help: ArgumentHelp("Prompts JSON: {\"<label>\": {\"positive\": [...], \"negative\": [...]}} (COVIDx classes: positive only); "
                               + "default: the ones convirt ships for the dataset.")) var prompts: String?
    @Option(help: "vocab.txt (default: the run's).") var vocab: String?
    @Option(parsing: .unconditional, help: "Input size (default: the encoder's).") var imageSize: Int?
    @Option(parsing: .unconditional, help: "Seed of the dataset's split (as eval linear's --seed).") var seed: UInt64 = 0
    @Option(help: "CheXpert labels whose uncertain values count as positive (as eval linear).") var uOnes: String?
    @Option(parsing: .unconditional, help: "Threads per rank.") var threads = 1
    @Option(help: "Precision of the convolutions and matrix products: fp32, bf16 (mixed, as PyTorch's CPU autocast) or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16).")
    var precision = PrecisionChoice.auto
    @Option(help: "Results file (JSON).") var out: String?
    @Flag(help: "Print only the result line.") var quiet = false
    @Option(help: ArgumentHelp("An evaluation manifest (NAME.manifest.json, written beside every --out): rerun exactly that evaluation, "
                               + "its settings taken from it; a checkpoint or data whose hashes differ from the pinned ones is refused."))
    var manifest: String?
    @OptionGroup var collective: CollectiveOptions

    func validate() throws {
        try requirePositive(["--threads": threads])
        try requireImageSize(imageSize)
    }

    func run() throws {
        try withPinned("eval zeroshot", collective, manifest: manifest, self, pin: pinned) { arguments, communicator, pinned in
            try arguments.evaluate(communicator, pinned: pinned, pinnedPath: manifest)
        }
    }

    func evaluate(_ communicator: Communicator, pinned: EvaluationManifest?, pinnedPath: String?) throws {
        do {
            Parallel.setThreads(threads)
            let root = communicator.isRoot
            let (loaded, data, promptSets) = try agreeOnStart("eval zeroshot", communicator) { () throws -> (LoadedModel, DownstreamData, [String: PromptSet]) in
                let loaded = try LoadedModel(checkpoint: checkpoint, vocab: vocab, precision: precision)
                let data = try DownstreamReader.load(dataset, root: self.root, options: downstreamOptions(seed: seed, uOnes: uOnes))
                let promptSets = try prompts.map(ZeroShotPrompts.load) ?? ZeroShotPrompts.defaults(dataset)
                try refuseDifferences(pinned, EvaluationManifest(command: "eval zeroshot", settings: [:], splits: downstreamSplits(data, root: self.root),
                                                                 promptsSHA256: promptsHash(promptSets),
                                                                 checkpoint: try checkpointPin(loaded.directory), program: "", precision: ""),
                                      path: pinnedPath)
                return (loaded, data, promptSets)
            }
            if root && !quiet {
                print("convirt eval zeroshot: \(dataset.rawValue) (\(data.task.rawValue), labels \(data.labelNames.joined(separator: ", "))): "
                      + "\(data.test.count) test images; checkpoint \(loaded.directory); \(communicator.size) rank(s); \(precision.describe())")
                print("prompts (\(prompts ?? "the defaults for \(dataset.rawValue)")):\n\(ZeroShotPrompts.json(promptSets))")
            }
            let start = Date()
            var result = try ZeroShotEvaluation.run(data: data, prompts: promptSets, model: loaded.model, tokenizer: loaded.tokenizer,
                                                    maxTokens: loaded.manifest.config.maxTokens,
                                                    imageSize: imageSize ?? loaded.manifest.config.model.image.imageSize,
                                                    communicator: communicator, checkpoint: loaded.directory) { line in if root { print(line) } }
            result.seeds = [seed]
            guard root else { return }
            print(String(format: "convirt zeroshot on %@: %@ %.4f (%.0f s)", dataset.rawValue, result.metric, result.mean, Date().timeIntervalSince(start)))
            if let out {
                try writeJSON(result.encoded(), to: out)
                try EvaluationManifest(command: "eval zeroshot", settings: pinnedSettings(imageSize: imageSize ?? loaded.manifest.config.model.image.imageSize),
                                       splits: downstreamSplits(data, root: self.root), promptsSHA256: promptsHash(promptSets),
                                       seeds: [seed], checkpoint: try checkpointPin(loaded.directory), program: "convirt \(convirtVersion)",
                                       precision: precision.resolved().rawValue)
                    .write(to: EvaluationManifest.path(forResults: out))
            }
            try logToTensorBoard(checkpoint: loaded.directory, classificationScalars("eval/zeroshot/\(dataset.rawValue)/convirt/all", result),
                                 step: loaded.manifest.state.step)
            if quiet { return }
            for (label, value) in result.perLabel.sorted(by: { $0.key < $1.key }) { print(String(format: "  %@: %.4f", label, value)) }
            if let out { print("results: \(out)") }
            // Beside the linear results of the same run, when they are there.
            var beside = [result]
            if let run = Checkpoints.runDirectory(ofCheckpoint: loaded.directory) {
                for (_, r) in Report.evaluationResults(runDirectory: run).classification.map({ ($0.file, $0.result) })
                where r.evaluationProtocol == "linear" && r.dataset == dataset.rawValue { beside.append(r) }
            }
            print(PaperTable.classificationTable(protocol: "zeroshot", ours: beside))
        }
    }
}

/// A ConVIRT model restored from a checkpoint, with the tokenizer of its run.
struct LoadedModel {
    let directory: String
    let manifest: CheckpointManifest
    let model: ConVIRTModel
    let tokenizer: WordPieceTokenizer

    init(checkpoint: String, vocab: String?, precision: PrecisionChoice) throws {
        directory = try Checkpoints.resolve(checkpoint)
        manifest = try Checkpoints.manifest(directory)
        model = try ConVIRTModel(config: manifest.config.model)
        model.precision = precision.resolved()
        try Checkpoints.load(directory, prefix: "", into: model.arena)
        let candidates = [vocab, Checkpoints.runDirectory(ofCheckpoint: directory).map { "\($0)/vocab.txt" },
                          manifest.config.textWeights.map { "\($0)/vocab.txt" }].compactMap { $0 }
        guard let found = candidates.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            throw ConvirtError("no vocabulary for \(directory): tried \(candidates.joined(separator: ", ")) (give --vocab)")
        }
        tokenizer = try WordPieceTokenizer(vocabularyPath: found, lowercase: manifest.config.lowercase)
        try tokenizer.requireFits(vocabSize: manifest.config.model.text.vocabSize, model: "the text encoder of \(directory)")
    }
}

struct EvalHeldOut: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "heldout",
        abstract: "Image-to-text retrieval on a prepared dataset's held-out studies (what train writes to heldout_retrieval.json).")
    @Option(help: "A ConVIRT checkpoint directory, or a run directory (its latest checkpoint).") var checkpoint: String
    @Option(help: "A prepared dataset (convirt prepare mimic).") var data: String
    @Option(help: "The split whose studies are retrieved.") var split = "test"
    @Option(parsing: .unconditional, help: "Studies (the first N of the split).") var studies = 100
    @Option(help: "Precision of the convolutions and matrix products: fp32, bf16 (mixed, as PyTorch's CPU autocast) or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16).")
    var precision = PrecisionChoice.auto
    @Option(help: "vocab.txt (default: the run's).") var vocab: String?
    @Option(help: "Results file (JSON).") var out: String?
    @Option(help: ArgumentHelp("An evaluation manifest (NAME.manifest.json, written beside every --out): rerun exactly that evaluation, "
                               + "its settings taken from it; a checkpoint or studies whose hashes differ from the pinned ones are refused."))
    var manifest: String?

    func run() throws {
        guard studies >= 2 else { throw ValidationError("--studies must be at least 2") }
        var arguments = self
        let pinned = try pinnedManifest(manifest, command: "eval heldout")
        if let pinned {
            if let v = try pinnedValue(pinned, "split", { $0 }) { arguments.split = v }
            if let v = try pinnedValue(pinned, "studies", Int.init) { arguments.studies = v }
            if let v = PrecisionChoice(rawValue: pinned.precision) { arguments.precision = v }
        }
        try arguments.evaluate(pinned: pinned, pinnedPath: manifest)
    }

    func evaluate(pinned: EvaluationManifest?, pinnedPath: String?) throws {
        let loaded = try LoadedModel(checkpoint: checkpoint, vocab: vocab, precision: precision)
        let dataset = try PreparedDataset(path: data)
        let splits = heldOutSplits(dataset, split: split, studies: studies)
        try refuseDifferences(pinned, EvaluationManifest(command: "eval heldout", settings: [:], splits: splits,
                                                         checkpoint: try checkpointPin(loaded.directory), program: "", precision: ""),
                              path: pinnedPath)
        let result = try HeldOutRetrieval.evaluate(model: loaded.model, dataset: dataset, tokenizer: loaded.tokenizer, split: split,
                                                   maxStudies: studies, maxTokens: loaded.manifest.config.maxTokens)
        if let out {
            try writeJSON(prettyJSON(result), to: out)
            try EvaluationManifest(command: "eval heldout", settings: ["split": split, "studies": "\(studies)"], splits: splits,
                                   checkpoint: try checkpointPin(loaded.directory), program: "convirt \(convirtVersion)",
                                   precision: precision.resolved().rawValue)
                .write(to: EvaluationManifest.path(forResults: out))
        }
        print(result.summary)
    }
}

struct EvalRetrieval: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "retrieval", abstract: "CheXpert 8x200 image-to-image and text-to-image retrieval.")
    @Option(help: "A ConVIRT checkpoint directory, or a run directory (its latest checkpoint).") var checkpoint: String
    @Option(help: "The CheXpert directory the candidate and query paths refer to.") var root: String
    @Option(help: "Directory with image-retrieval/ and text-retrieval/ (candidate.csv, query.csv).") var queries: String
    @Option(help: "vocab.txt (default: the run's).") var vocab: String?
    @Option(parsing: .unconditional, help: "Input size (default: the encoder's).") var imageSize: Int?
    @Option(parsing: .unconditional, help: "Queries per category and mode kept with their top candidates (for the report).") var examples = 1
    @Option(parsing: .unconditional, help: "Threads per rank.") var threads = 1
    @Option(help: "Precision of the convolutions and matrix products: fp32, bf16 (mixed, as PyTorch's CPU autocast) or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16).")
    var precision = PrecisionChoice.auto
    @Option(help: "Results file (JSON).") var out: String?
    @Flag(help: "Print only the precision@10 line.") var quiet = false
    @Option(help: ArgumentHelp("An evaluation manifest (NAME.manifest.json, written beside every --out): rerun exactly that evaluation, "
                               + "its settings taken from it; a checkpoint or data whose hashes differ from the pinned ones is refused."))
    var manifest: String?
    @OptionGroup var collective: CollectiveOptions

    func validate() throws {
        try requirePositive(["--threads": threads])
        guard examples >= 0 else { throw ValidationError("--examples must not be negative, got \(examples)") }
        try requireImageSize(imageSize)
    }

    func run() throws {
        try withPinned("eval retrieval", collective, manifest: manifest, self, pin: pinned) { arguments, communicator, pinned in
            try arguments.evaluate(communicator, pinned: pinned, pinnedPath: manifest)
        }
    }

    func evaluate(_ communicator: Communicator, pinned: EvaluationManifest?, pinnedPath: String?) throws {
        do {
            Parallel.setThreads(threads)
            let (loaded, set) = try agreeOnStart("eval retrieval", communicator) { () throws -> (LoadedModel, RetrievalSet) in
                let loaded = try LoadedModel(checkpoint: checkpoint, vocab: vocab, precision: precision), set = try Retrieval8x200.load(root: root, queries: queries)
                try refuseDifferences(pinned, EvaluationManifest(command: "eval retrieval", settings: [:], splits: retrievalSplits(set, root: root),
                                                                 checkpoint: try checkpointPin(loaded.directory), program: "", precision: ""),
                                      path: pinnedPath)
                return (loaded, set)
            }
            let isRoot = communicator.isRoot
            if isRoot && !quiet {
                print("convirt eval retrieval: \(set.categories.count) categories, \(set.candidates.count) image candidates, "
                      + "\(set.imageQueries.count) image queries, \(set.textQueries.count) text queries; checkpoint \(loaded.directory); "
                      + precision.describe())
                for (reason, count) in set.skipped.sorted(by: { $0.key < $1.key }) { print("skipped \(count) row(s): \(reason)") }
            }
            var result = try RetrievalEvaluation.evaluate(set: set, model: loaded.model, tokenizer: loaded.tokenizer, maxTokens: loaded.manifest.config.maxTokens,
                                                          imageSize: imageSize ?? loaded.manifest.config.model.image.imageSize, communicator: communicator,
                                                          examples: examples) { if isRoot && !quiet { print($0) } }
            result.checkpoint = loaded.directory
            guard isRoot else { return }
            if let out {
                try writeJSON(result.encoded(), to: out)
                try EvaluationManifest(command: "eval retrieval",
                                       settings: ["image_size": "\(imageSize ?? loaded.manifest.config.model.image.imageSize)",
                                                  "bootstrap_resamples": "\(Bootstrap.defaultResamples)"],
                                       splits: retrievalSplits(set, root: root), checkpoint: try checkpointPin(loaded.directory),
                                       program: "convirt \(convirtVersion)", precision: precision.resolved().rawValue)
                    .write(to: EvaluationManifest.path(forResults: out))
            }
            var scalars: [(tag: String, value: Double)] = []
            for (mode, table) in [("image_to_image", result.imageToImage), ("text_to_image", result.textToImage)] {
                for k in RetrievalResult.ks { if let p = table["precision@\(k)"]?["mean"] { scalars.append(("eval/retrieval/\(mode)/precision@\(k)", p)) } }
            }
            try logToTensorBoard(checkpoint: loaded.directory, scalars, step: loaded.manifest.state.step)
            if quiet {
                let p10 = { (mode: [String: [String: Double]]) in (mode["precision@10"]?["mean"] ?? .nan) * 100 }
                print(String(format: "CheXpert 8x200 precision@10: image-to-image %.1f%%, text-to-image %.1f%% (chance %.1f%%)",
                             p10(result.imageToImage), p10(result.textToImage), 100 / Double(max(1, set.categories.count))))
                return
            }
            if let out { print("results: \(out)") }
            print(PaperTable.retrievalTable(ours: [(label: "ours (convirt)", result)]))
        }
    }
}

struct EmbedCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "embed", abstract: "Embeddings of images or sentences with a checkpoint's encoders.")
    @Option(help: "A ConVIRT checkpoint directory, or a run directory (its latest checkpoint).") var checkpoint: String
    @Option(help: "A file with one image path per line.") var images: String?
    @Option(help: "A file with one sentence per line.") var texts: String?
    @Option(help: "vocab.txt (default: the run's).") var vocab: String?
    @Option(parsing: .unconditional, help: "Input size (default: the encoder's).") var imageSize: Int?
    @Option(parsing: .unconditional, help: "Threads per rank.") var threads = 1
    @Option(help: "Precision of the convolutions and matrix products: fp32, bf16 (mixed, as PyTorch's CPU autocast) or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16).")
    var precision = PrecisionChoice.auto
    @Option(help: "Output .safetensors: embeddings [N, d] (and features [N, F] for images).") var out: String
    @OptionGroup var collective: CollectiveOptions

    func validate() throws {
        guard (images == nil) != (texts == nil) else { throw ValidationError("give exactly one of --images and --texts") }
        try requirePositive(["--threads": threads])
        try requireImageSize(imageSize)
    }

    func run() throws {
        try withCommunicator("embed", collective) { communicator in
            Parallel.setThreads(threads)
            let loaded = try LoadedModel(checkpoint: checkpoint, vocab: vocab, precision: precision)
            let config = loaded.manifest.config
            var writer = SafeTensorsWriter(metadata: ["checkpoint": loaded.directory, "step": "\(loaded.manifest.state.step)",
                                                      "precision": loaded.model.precision.rawValue])
            let d = config.model.projDim
            var summary = ""
            if let images {
                let paths = try Gzip.readText(images).split(whereSeparator: \.isNewline).map(String.init).filter { !$0.isEmpty }
                guard !paths.isEmpty else { throw ConvirtError("\(images): no image paths") }
                let r = try RetrievalEvaluation.embedImages(paths, model: loaded.model, size: imageSize ?? config.model.image.imageSize,
                                                             communicator: communicator)
                let bad = r.ok.indices.filter { !r.ok[$0] }
                if !bad.isEmpty {
                    throw ConvirtError("\(images): \(bad.count) image(s) could not be read, e.g. \(bad.prefix(3).map { paths[$0] }.joined(separator: ", "))")
                }
                try writer.add("embeddings", Tensor(shape: [paths.count, d], r.embeddings))
                try writer.add("features", Tensor(shape: [paths.count, config.model.image.featureCount], r.features))
                summary = "\(paths.count) images: embeddings [\(paths.count), \(d)], features [\(paths.count), \(config.model.image.featureCount)]"
            } else if let texts {
                let lines = try Gzip.readText(texts).split(whereSeparator: \.isNewline).map(String.init).filter { !$0.isEmpty }
                guard !lines.isEmpty else { throw ConvirtError("\(texts): no sentences") }
                let u = try RetrievalEvaluation.embedTexts(lines, model: loaded.model, tokenizer: loaded.tokenizer, maxTokens: config.maxTokens)
                try writer.add("embeddings", Tensor(shape: [lines.count, d], u))
                summary = "\(lines.count) sentences: embeddings [\(lines.count), \(d)]"
            }
            if communicator.isRoot {
                try writer.write(to: out)
                print("\(summary) -> \(out)")
            }
        }
    }
}

extension ClassificationOptions.KeepBest: ExpressibleByArgument {}
