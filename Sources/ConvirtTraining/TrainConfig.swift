// The resolved configuration of a training run (written to the run directory as config.json).

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtModels
import Foundation

public struct TrainConfig: Codable, Sendable {
    public var preset: Preset
    public var model: ConVIRTConfig
    public var globalBatch: Int
    /// Total steps of the run (a resumed run continues up to it); nil = epochs decide.
    public var steps: Int?
    public var epochs: Int?
    public var seed: UInt64
    public var learningRate: Double
    public var weightDecay: Double
    /// paper (validation every valEvery steps, LR halved after `patience` checks without improvement,
    /// stop after `maxChecks` checks), cosine (linear warmup then cosine decay) or constant.
    public var schedule: ScheduleKind
    public var warmupSteps: Int
    public var valEvery: Int
    public var valSamples: Int
    public var patience: Int
    public var maxChecks: Int
    public var syncBatchNorm: Bool
    public var clipGradNorm: Double?
    public var maxTokens: Int
    public var lowercase: Bool
    public var threads: Int
    public var loaderWorkers: Int
    public var swapLateralityOnFlip: Bool
    public var imageWeights: String?
    public var textWeights: String?
    /// Save a checkpoint every K steps (and at the end); nil = only at the end.
    public var checkpointEvery: Int? = nil
    public var keepCheckpoints: Int = 3
    /// ZeRO-1: Adam state sharded over ranks by arena range (reduce-scatter the gradients, update the
    /// own shard, all-gather the parameters); the same training as replicated Adam.
    public var zero1: Bool = false
    /// Start the gradient all-reduce buckets during backward (true) or only after it (to measure the overlap).
    public var overlapCommunication: Bool = true
    /// How checkpoint shards reach the disk: parallel (every rank writes its own) or gather (rank 0 writes all).
    public var checkpointIO: CheckpointIO = .parallel
    /// Compress and write checkpoints from a snapshot while training goes on (committed at the end of the next step).
    public var asyncCheckpoint: Bool = true
    /// false: no RUN/tensorboard/events.out.tfevents.* (nil, the default: rank 0 writes them). Settings
    /// added from here on are optional and nil by default, so that a manifest written before them encodes
    /// to the same bytes and keeps its checksum.
    public var tensorboard: Bool? = nil
    public var writesTensorBoard: Bool { tensorboard ?? true }
    /// Exact contrastive accumulation (GradCache): each rank runs its share of the global batch as K
    /// micro-batches; nil = 1. Does not change the trajectory (not a resume-refusing setting).
    public var accumSteps: Int? = nil
    public var microBatches: Int { accumSteps ?? 1 }
    /// The precision of the convolutions and matrix products (`--precision`, auto resolved on the machine
    /// that started the run); nil, as in manifests written before it, = fp32.
    public var precision: Precision? = nil
    public var productPrecision: Precision { precision ?? .fp32 }
    /// Samples per gradient piece in bf16 (`--gradient-piece`, `GradientPieces`); nil, as in manifests
    /// written before it: `GradientPieces.standard` of the global micro-batch. Like the number of
    /// threads, it changes only how the sums are grouped (not a resume-refusing setting).
    public var gradientPiece: Int? = nil
    public var gradientPieceSamples: Int { gradientPiece ?? GradientPieces.standard(globalBatch: globalBatch / max(microBatches, 1)) }
    /// The outlier guard (`OutlierGuard`); nil = off, as the paper trains.
    public var outlierGuard: OutlierGuardConfig? = nil
    /// A rank's peak TFLOP/s (`--peak-tflops`, from the CPU's data sheet or a measured product rate), for
    /// metrics.jsonl's peak_share; nil: not known. Not a resume-refusing setting.
    public var peakTFLOPs: Double? = nil
    /// False negatives: each pair's negatives leave out the pairs whose sentence has the same token ids
    /// (`--exclude-identical-texts`); nil = no, as the paper.
    public var excludeIdenticalTexts: Bool? = nil
    /// How gradients are summed over ranks (`--gradient-exchange`); nil = auto (shared memory where every
    /// rank runs on one machine). It changes only how the sums are carried: not a resume-refusing setting.
    public var gradientExchange: GradientExchange? = nil

    enum CodingKeys: String, CodingKey {
        case preset, model, globalBatch = "global_batch", steps, epochs, seed, learningRate = "learning_rate", weightDecay = "weight_decay"
        case schedule, warmupSteps = "warmup_steps", valEvery = "val_every", valSamples = "val_samples", patience, maxChecks = "max_checks"
        case syncBatchNorm = "sync_batch_norm", clipGradNorm = "clip_grad_norm", maxTokens = "max_tokens", lowercase, threads
        case loaderWorkers = "loader_workers", swapLateralityOnFlip = "swap_laterality_on_flip", imageWeights = "image_weights"
        case textWeights = "text_weights", checkpointEvery = "checkpoint_every", keepCheckpoints = "keep_checkpoints"
        case zero1, overlapCommunication = "overlap_communication", checkpointIO = "checkpoint_io", asyncCheckpoint = "async_checkpoint"
        case tensorboard, accumSteps = "accum_steps", precision, gradientPiece = "gradient_piece", outlierGuard = "outlier_guard"
        case peakTFLOPs = "peak_tflops", excludeIdenticalTexts = "exclude_identical_texts", gradientExchange = "gradient_exchange"
    }

    /// The preset's defaults: the paper's recipe for `paper`, a quicker one for `demo` and `tiny`.
    public static func preset(_ preset: Preset) -> TrainConfig {
        let model = ConVIRTConfig.preset(preset)
        switch preset {
        case .paper:
            return TrainConfig(preset: preset, model: model, globalBatch: 32, steps: nil, epochs: nil, seed: 0, learningRate: 1e-4,
                               weightDecay: 1e-6, schedule: .paper, warmupSteps: 0, valEvery: 5000, valSamples: 5000, patience: 5,
                               maxChecks: 200, syncBatchNorm: true, clipGradNorm: nil, maxTokens: 128, lowercase: false, threads: 1,
                               loaderWorkers: 1, swapLateralityOnFlip: false, imageWeights: nil, textWeights: nil)
        case .demo:
            return TrainConfig(preset: preset, model: model, globalBatch: 32, steps: 4000, epochs: nil, seed: 0, learningRate: 5e-4,
                               weightDecay: 1e-6, schedule: .cosine, warmupSteps: 50, valEvery: 250, valSamples: 96, patience: 5,
                               maxChecks: 200, syncBatchNorm: true, clipGradNorm: 5, maxTokens: 48, lowercase: true, threads: 1,
                               loaderWorkers: 1, swapLateralityOnFlip: true, imageWeights: nil, textWeights: nil)
        case .tiny:
            // A modest rate: at 1e-3 the tiny model's updates are so large that float rounding decides
            // ReLU kinks within a few steps, and runs on different rank counts drift apart.
            return TrainConfig(preset: preset, model: model, globalBatch: 8, steps: 20, epochs: nil, seed: 0, learningRate: 1e-4,
                               weightDecay: 1e-6, schedule: .constant, warmupSteps: 0, valEvery: 10, valSamples: 8, patience: 5,
                               maxChecks: 200, syncBatchNorm: true, clipGradNorm: nil, maxTokens: 24, lowercase: true, threads: 1,
                               loaderWorkers: 1, swapLateralityOnFlip: true, imageWeights: nil, textWeights: nil)
        }
    }

    public func validate(worldSize: Int) throws {
        try model.validate()
        try require(globalBatch >= 1, "train", "--global-batch must be positive, got \(globalBatch)")
        try require(globalBatch % worldSize == 0, "train", "--global-batch \(globalBatch) does not divide by the \(worldSize) ranks")
        try require(microBatches >= 1, "train", "--accum-steps must be positive, got \(microBatches)")
        try require(globalBatch % (worldSize * microBatches) == 0, "train",
                    "--global-batch \(globalBatch) does not divide into \(worldSize) rank(s) x \(microBatches) micro-batches (--accum-steps)")
        try require(learningRate > 0 && learningRate.isFinite, "train", "--lr must be a positive number, got \(learningRate)")
        try require(weightDecay >= 0 && weightDecay.isFinite, "train", "--weight-decay must not be negative, got \(weightDecay)")
        try require(steps == nil || steps! >= 1, "train", "--steps must be positive, got \(steps ?? 0)")
        try require(epochs == nil || epochs! >= 1, "train", "--epochs must be positive, got \(epochs ?? 0)")
        try require(clipGradNorm.map { $0 > 0 } ?? true, "train", "--clip-grad-norm must be positive, got \(clipGradNorm ?? 0)")
        for (name, value) in [("--threads", threads), ("--loader-workers", loaderWorkers), ("--val-every", valEvery), ("--patience", patience),
                              ("--max-checks", maxChecks), ("--checkpoint-every", checkpointEvery ?? 1), ("--keep-checkpoints", keepCheckpoints)] {
            try require(value >= 1, "train", "\(name) must be positive, got \(value)")
        }
        try require(valSamples >= 0, "train", "--val-samples must not be negative, got \(valSamples)")
        try require(warmupSteps >= 0, "train", "--warmup-steps must not be negative, got \(warmupSteps)")
        try require(maxTokens >= 2 && maxTokens <= model.text.maxPositionEmbeddings, "train",
                    "--max-tokens must be within 2...\(model.text.maxPositionEmbeddings), got \(maxTokens)")
        try outlierGuard?.validate()
        try require(peakTFLOPs.map { $0 > 0 && $0.isFinite } ?? true, "train", "--peak-tflops must be a positive number, got \(peakTFLOPs ?? 0)")
        try validatePieces(worldSize: worldSize)
    }

    /// bf16's gradient pieces cut each rank's micro-batch into whole pieces (fp32 does not use them).
    public func validatePieces(worldSize: Int) throws {
        guard productPrecision == .bf16 else { return }
        let global = globalBatch / microBatches
        if let problem = GradientPieces.problem(samples: gradientPieceSamples, localBatch: global / worldSize, globalBatch: global) {
            throw ConvirtError("train: --global-batch \(globalBatch) over \(worldSize) rank(s)\(microBatches > 1 ? " x \(microBatches) micro-batches" : ""): \(problem)")
        }
    }

    /// The learning-rate schedule of a run of `totalSteps` steps, from its start.
    public func makeSchedule(totalSteps: Int) -> LearningRateSchedule {
        switch schedule {
        case .paper: return LearningRateSchedule(.plateau(Plateau(patience: patience, maxChecks: maxChecks)), baseRate: learningRate)
        case .cosine: return LearningRateSchedule(.cosine(warmupSteps: warmupSteps, totalSteps: totalSteps), baseRate: learningRate)
        case .constant: return LearningRateSchedule(.constant, baseRate: learningRate)
        }
    }
}

extension TrainConfig {
    /// The settings that decide a run's trajectory and differ between `self` (a checkpoint's) and
    /// `other` (the resumed run's), as "name: old -> new". The number of steps, threads, I/O and
    /// checkpoint settings do not count (a resumed run may go on longer, or on other ranks).
    public func trajectoryDifferences(to other: TrainConfig) -> [String] {
        var out: [String] = []
        func compare<T: Equatable>(_ name: String, _ a: T, _ b: T) { if a != b { out.append("\(name): \(a) -> \(b)") } }
        compare("--global-batch", globalBatch, other.globalBatch)
        compare("--seed", seed, other.seed)
        compare("--max-tokens", maxTokens, other.maxTokens)
        compare("--lr", learningRate, other.learningRate)
        compare("--weight-decay", weightDecay, other.weightDecay)
        compare("--schedule", schedule.rawValue, other.schedule.rawValue)
        compare("--warmup-steps", warmupSteps, other.warmupSteps)
        compare("--val-every", valEvery, other.valEvery)
        compare("--val-samples", valSamples, other.valSamples)
        compare("--patience", patience, other.patience)
        compare("--max-checks", maxChecks, other.maxChecks)
        compare("sync BatchNorm", syncBatchNorm, other.syncBatchNorm)
        compare("--clip-grad-norm", clipGradNorm.map { "\($0)" } ?? "none", other.clipGradNorm.map { "\($0)" } ?? "none")
        compare("--lowercase", lowercase, other.lowercase)
        compare("laterality swap on flip", swapLateralityOnFlip, other.swapLateralityOnFlip)
        compare("--precision", productPrecision.rawValue, other.productPrecision.rawValue)
        compare("--exclude-identical-texts", excludeIdenticalTexts ?? false, other.excludeIdenticalTexts ?? false)
        compare("outlier guard", outlierGuard.map(\.description) ?? "off", other.outlierGuard.map(\.description) ?? "off")
        return out
    }
}

extension TrainConfig {
    /// Decodes config.json and checkpoint manifests of any version: settings added later take their
    /// defaults when absent.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        preset = try c.decode(Preset.self, forKey: .preset)
        model = try c.decode(ConVIRTConfig.self, forKey: .model)
        globalBatch = try c.decode(Int.self, forKey: .globalBatch)
        steps = try c.decodeIfPresent(Int.self, forKey: .steps)
        epochs = try c.decodeIfPresent(Int.self, forKey: .epochs)
        seed = try c.decode(UInt64.self, forKey: .seed)
        learningRate = try c.decode(Double.self, forKey: .learningRate)
        weightDecay = try c.decode(Double.self, forKey: .weightDecay)
        schedule = try c.decode(ScheduleKind.self, forKey: .schedule)
        warmupSteps = try c.decode(Int.self, forKey: .warmupSteps)
        valEvery = try c.decode(Int.self, forKey: .valEvery)
        valSamples = try c.decode(Int.self, forKey: .valSamples)
        patience = try c.decode(Int.self, forKey: .patience)
        maxChecks = try c.decode(Int.self, forKey: .maxChecks)
        syncBatchNorm = try c.decode(Bool.self, forKey: .syncBatchNorm)
        clipGradNorm = try c.decodeIfPresent(Double.self, forKey: .clipGradNorm)
        maxTokens = try c.decode(Int.self, forKey: .maxTokens)
        lowercase = try c.decode(Bool.self, forKey: .lowercase)
        threads = try c.decodeIfPresent(Int.self, forKey: .threads) ?? 1
        loaderWorkers = try c.decodeIfPresent(Int.self, forKey: .loaderWorkers) ?? 1
        swapLateralityOnFlip = try c.decodeIfPresent(Bool.self, forKey: .swapLateralityOnFlip) ?? true
        imageWeights = try c.decodeIfPresent(String.self, forKey: .imageWeights)
        textWeights = try c.decodeIfPresent(String.self, forKey: .textWeights)
        checkpointEvery = try c.decodeIfPresent(Int.self, forKey: .checkpointEvery)
        keepCheckpoints = try c.decodeIfPresent(Int.self, forKey: .keepCheckpoints) ?? 3
        zero1 = try c.decodeIfPresent(Bool.self, forKey: .zero1) ?? false
        overlapCommunication = try c.decodeIfPresent(Bool.self, forKey: .overlapCommunication) ?? true
        checkpointIO = try c.decodeIfPresent(CheckpointIO.self, forKey: .checkpointIO) ?? .parallel
        asyncCheckpoint = try c.decodeIfPresent(Bool.self, forKey: .asyncCheckpoint) ?? true
        tensorboard = try c.decodeIfPresent(Bool.self, forKey: .tensorboard)
        accumSteps = try c.decodeIfPresent(Int.self, forKey: .accumSteps)
        precision = try c.decodeIfPresent(Precision.self, forKey: .precision)
        gradientPiece = try c.decodeIfPresent(Int.self, forKey: .gradientPiece)
        outlierGuard = try c.decodeIfPresent(OutlierGuardConfig.self, forKey: .outlierGuard)
        peakTFLOPs = try c.decodeIfPresent(Double.self, forKey: .peakTFLOPs)
        excludeIdenticalTexts = try c.decodeIfPresent(Bool.self, forKey: .excludeIdenticalTexts)
        gradientExchange = try c.decodeIfPresent(GradientExchange.self, forKey: .gradientExchange)
    }
}
