// Data-parallel ConVIRT pretraining (DESIGN.md, data flow of one step): local forward; all-gather of the
// image and text embeddings; the loss of this rank's rows against all N columns; reduce-scatter of the
// embedding gradients; backward; gradient sync (GradientSync: buckets overlapped with backward, or
// ZeRO-1); Adam. With SyncBN, BatchNorm statistics are summed over ranks in forward and backward, so N
// ranks train exactly as one.

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import ConvirtText
import Foundation

public struct StepMetrics: Codable, Sendable {
    public var step: Int
    public var epoch: Int
    public var loss: Double
    public var lossV2U: Double
    public var lossU2V: Double
    public var lr: Double
    public var gradNorm: Double
    public var pairsPerSecond: Double
    public var worldSize: Int
    public var timeData: Double
    public var timeForward: Double
    public var timeBackward: Double
    public var timeComm: Double
    public var timeOptimizer: Double
    /// Training time lost to checkpoints in this step (snapshot, and waiting at the commit).
    public var timeCheckpoint: Double = 0
    public var valLoss: Double?
    /// With the outlier guard on: whether this step was skipped (not applied), and the skipped steps so far.
    public var skipped: Bool? = nil
    public var skippedSteps: Int? = nil
    /// Achieved TFLOP/s of each rank: the model's FLOPs of the step (`ConVIRTModel.flopsPerPair`) over
    /// the ranks and the step's time; and its share of the peak given by --peak-tflops.
    public var tflopsPerRank: Double? = nil
    public var peakShare: Double? = nil
    /// With --exclude-identical-texts: the pairs of the global batch excluded as false negatives.
    public var excludedNegatives: Int? = nil

    enum CodingKeys: String, CodingKey {
        case step, epoch, loss, lossV2U = "loss_v2u", lossU2V = "loss_u2v", lr, gradNorm = "grad_norm", pairsPerSecond = "pairs_per_s"
        case worldSize = "world_size", timeData = "time_data_s", timeForward = "time_forward_s", timeBackward = "time_backward_s"
        case timeComm = "time_comm_s", timeOptimizer = "time_optimizer_s", timeCheckpoint = "time_checkpoint_s", valLoss = "val_loss"
        case skipped, skippedSteps = "skipped_steps", tflopsPerRank = "tflops_per_rank", peakShare = "peak_share"
        case excludedNegatives = "excluded_negatives"
    }
}

extension StepMetrics {
    /// The row as TensorBoard scalars (the names DESIGN.md's metrics.jsonl fields map to).
    public var tensorBoardScalars: [(tag: String, value: Double)] {
        var out: [(tag: String, value: Double)] = [("train/loss", loss), ("train/loss_v2u", lossV2U), ("train/loss_u2v", lossU2V), ("train/lr", lr),
                                                   ("train/grad_norm", gradNorm), ("train/pairs_per_s", pairsPerSecond), ("time/data", timeData),
                                                   ("time/forward", timeForward), ("time/backward", timeBackward), ("time/comm", timeComm),
                                                   ("time/optimizer", timeOptimizer), ("time/checkpoint", timeCheckpoint)]
        if let valLoss { out.append(("val/loss", valLoss)) }
        if let skipped { out.append(("train/skipped", skipped ? 1 : 0)) }
        if let skippedSteps { out.append(("train/skipped_steps", Double(skippedSteps))) }
        if let tflopsPerRank { out.append(("train/tflops_per_rank", tflopsPerRank)) }
        if let peakShare { out.append(("train/peak_share", peakShare)) }
        if let excludedNegatives { out.append(("train/excluded_negatives", Double(excludedNegatives))) }
        return out
    }
}

public final class Trainer {
    public private(set) var config: TrainConfig
    public let communicator: Communicator
    public let model: ConVIRTModel
    public let dataset: PreparedDataset
    public let tokenizer: WordPieceTokenizer
    public let runDirectory: String
    /// The vocabulary the text encoder reads (the run directory gets a copy, for evaluation and embedding).
    public let vocabularyPath: String
    let trainSamples: [Int]
    let sampler: GlobalBatchSampler
    public let sync: GradientSync
    let loss: DistributedLoss
    var schedule: LearningRateSchedule
    var log: (String) -> Void
    /// Pass 1's embeddings of all micro-batches [K b, d] (accumulation only).
    let accumulatedV = Scratch<Float>(), accumulatedU = Scratch<Float>()
    /// Rank 0's event file of this invocation (nil elsewhere, before `run`, or with --no-tensorboard).
    public private(set) var tensorboard: TensorBoardWriter?

    /// The step to start from (0, or a restored checkpoint's).
    public private(set) var startStep = 0
    /// Whether the last `run` stopped before its last step because a rank was asked to (`StopRequest`),
    /// its checkpoint written.
    public private(set) var stoppedOnRequest = false
    /// The outlier guard's window and counts (used when `config.outlierGuard` is set).
    public private(set) var outliers = OutlierGuard()
    /// The model's FLOPs per pair, by the batch's token count.
    private var flopsByTokens: [Int: Double] = [:]

    public init(config: TrainConfig, dataPath: String, runDirectory: String, vocabularyPath: String?, communicator: Communicator,
                log: @escaping (String) -> Void) throws {
        var config = config
        self.communicator = communicator
        self.runDirectory = runDirectory
        self.log = log
        dataset = try PreparedDataset(path: dataPath)
        // The vocabulary: given, or the text weights', or the one shipped with the data.
        let vocab = vocabularyPath ?? config.textWeights.map { "\($0)/vocab.txt" } ?? "\(dataPath)/vocab.txt"
        guard FileManager.default.fileExists(atPath: vocab) else {
            throw ConvirtError("no vocabulary: \(vocab) does not exist (give --vocab, or --text-weights with a vocab.txt)")
        }
        tokenizer = try WordPieceTokenizer(vocabularyPath: vocab, lowercase: config.lowercase)
        self.vocabularyPath = vocab
        if let dir = config.textWeights {
            config.model.text = try BertDirectory(path: dir).config
        } else {
            config.model.text.vocabSize = tokenizer.vocabulary.count
        }
        try tokenizer.requireFits(vocabSize: config.model.text.vocabSize,
                                  model: config.textWeights.map { "the text weights' \($0)/config.json" } ?? "the text encoder")
        try config.validate(worldSize: communicator.size)
        self.config = config
        model = try ConVIRTModel(config: config.model)
        model.initialize(seed: config.seed)
        if let path = config.imageWeights {
            try Weights.load(SafeTensorsFile(path: path), into: model.arena, prefix: "image.")
        }
        if let dir = config.textWeights { try BertDirectory(path: dir).load(into: model.arena, prefix: "text.") }
        sync = try GradientSync(arena: model.arena, communicator: communicator,
                                mode: config.zero1 ? .zero1(overlap: config.overlapCommunication) : .replicated(overlap: config.overlapCommunication),
                                exchange: config.gradientExchange ?? .auto)
        loss = DistributedLoss(communicator: communicator, features: config.model.projDim, tau: config.model.tau, lambda: config.model.lambda)
        trainSamples = dataset.samples(split: "train")
        sampler = try GlobalBatchSampler(sampleCount: trainSamples.count, globalBatch: config.globalBatch, worldSize: communicator.size,
                                         rank: communicator.rank, seed: config.seed, microBatches: config.microBatches)
        schedule = config.makeSchedule(totalSteps: config.steps ?? (config.epochs ?? 1) * sampler.batchesPerEpoch)
    }

    public var totalSteps: Int {
        if let steps = config.steps { return steps }
        return (config.epochs ?? 1) * sampler.batchesPerEpoch
    }

    // MARK: the training loop

    /// Trains to the end; returns the metrics rows.
    @discardableResult
    public func run(progress: ((StepMetrics, Int) -> Void)? = nil) throws -> [StepMetrics] {
        let loader = makeLoader()
        defer { loader.stop() }
        let metrics = try MetricsWriter(path: "\(runDirectory)/metrics.jsonl", enabled: communicator.isRoot, resumedAt: startStep, log: log)
        if communicator.isRoot && config.writesTensorBoard {
            tensorboard = try TensorBoardWriter(directory: "\(runDirectory)/tensorboard", restartStep: startStep > 0 ? startStep + 1 : nil)
        }
        if validationBatch == 0 && communicator.isRoot {
            log(config.valSamples == 0 ? "--val-samples 0: no validation loss will be computed"
                : "warning: the validate split has \(validationSamples.count) usable pair(s), fewer than the \(communicator.size) rank(s); "
                    + "no validation loss will be computed")
        }
        let checkpoints = try CheckpointWriter(communicator: communicator, runDirectory: runDirectory, mode: config.checkpointIO,
                                               asynchronous: config.asyncCheckpoint, keep: config.keepCheckpoints)
        if config.asyncCheckpoint { checkpoints.reserve(arena: model.arena) }
        StopRequest.install()
        // An error with a checkpoint in flight takes this rank's part of it away (see `abandon`).
        do { return try loop(loader, checkpoints, metrics, progress) } catch {
            checkpoints.abandon()
            throw error
        }
    }

    private func loop(_ loader: Loader, _ checkpoints: CheckpointWriter, _ metrics: MetricsWriter, _ progress: ((StepMetrics, Int) -> Void)?) throws -> [StepMetrics] {
        var rows: [StepMetrics] = []
        var savedStep = startStep
        var step = startStep
        while step < totalSteps {
            guard var row = try trainStep(step, loader: loader) else {
                stoppedOnRequest = true
                log("\(StopRequest.name): stopping after step \(step) of \(totalSteps)" + (step > savedStep ? ", with its checkpoint" : ""))
                break
            }
            step += 1
            if let fault = EnvironmentSwitches.process.stopSignal, fault.step == step, fault.rank == communicator.rank { raise(StopRequest.signal) }
            var stop = false
            if isValidationStep(step) {
                communicator.watchdog.phase = "validation"
                let decision = try validate(into: &row)
                if decision?.improved == true {
                    try saveBest(step: step, loss: row.valLoss!, checkpoints)
                    savedStep = step
                }
                stop = decision?.stop ?? false
            }
            communicator.watchdog.phase = "checkpoint"
            if try saveCheckpointIfDue(step: step, savedStep: savedStep, stopping: stop, checkpoints) { savedStep = step }
            row.timeCheckpoint = checkpoints.takeStall()
            // A step's row reaches the disk (fsync'd where a checkpoint is pending) before its checkpoint
            // is published, so a run killed in between resumes from the previous checkpoint and computes
            // the step again: never a checkpoint past the last row.
            try metrics.append(row)
            try tensorboard?.scalars(row.tensorBoardScalars, step: row.step)
            if checkpoints.pendingStep != nil {
                try metrics.synchronize()
                try tensorboard?.synchronize()
            }
            if !checkpoints.asynchronous { try checkpoints.commit() }
            rows.append(row)
            progress?(row, totalSteps)
            if stop { break }
        }
        communicator.watchdog.phase = "final checkpoint"
        try checkpoints.commit()
        if step > savedStep {
            try checkpoints.save(arena: model.arena, state: checkpointState(step: step), config: config)
            try checkpoints.commit()
        }
        return rows
    }

    /// One training step, in DESIGN.md's order: batch, forward, loss over the global batch, backward,
    /// gradient sync, optimizer step. Nil, with nothing computed, where a rank was asked to stop
    /// (`StopRequest`): the ranks learn it with the batch's lengths, so all stop before the same step.
    func trainStep(_ step: Int, loader: Loader) throws -> StepMetrics? {
        let watchdog = communicator.watchdog
        watchdog.step = step + 1
        if let stall = EnvironmentSwitches.process.stall, stall.step == step + 1, stall.rank == communicator.rank {
            while true { sleep(3600) }  // a stalled rank (fault injection): the others' watchdog must name it
        }
        var clock = Clock()
        watchdog.phase = "batch"
        let (batch, stopRequested) = try globallyPadded(loader.next())
        if stopRequested { return nil }
        let excluded = try excludeIdenticalTexts(batch)
        let timeData = clock.lap()
        watchdog.phase = "forward"
        sync.begin()
        var value: ConVIRTLoss.Value, timeForward: Double, timeBackward: Double
        if config.microBatches == 1 {
            var context = passContext(step: step, batch: batch, training: true)
            let (v, u) = try encode(batch, context: context)
            watchdog.phase = "loss"
            value = try loss.forwardBackward(v: v, u: u, rows: batch.size)
            timeForward = clock.lap() - loss.communicationTime
            watchdog.phase = "backward"
            context.gradientsReady = sync.readyHandler
            try model.backwardImages(gradEmbeddings: loss.gradV, context: context)
            try model.backwardTexts(gradEmbeddings: loss.gradU, context: context)
            timeBackward = clock.lap()
        } else {
            (value, timeForward, timeBackward) = try accumulatedStep(step, batch: batch, clock: &clock)
        }
        watchdog.phase = "gradient sync"
        var timeComm = loss.communicationTime + (try sync.finish())
        _ = clock.lap()
        if let spike = EnvironmentSwitches.process.spike, spike.step == step + 1 {
            // A loss spike (fault injection, for the tests of the outlier guard).
            sync.scale(by: Float(spike.factor))
            value.loss *= spike.factor
        }
        watchdog.phase = "gradient norm"
        let norm = try sync.gradientNorm()
        // The same on every rank (both are sums over ranks): all stop together, before the update.
        guard value.loss.isFinite && norm.isFinite else {
            throw ConvirtError("step \(step + 1): the loss is \(value.loss) and the gradient norm \(norm); training stopped before the "
                               + "optimizer step (no checkpoint is written from here; try a lower --lr or --clip-grad-norm, and --resume from the last checkpoint)")
        }
        let rate = schedule.rate(step: step)
        let skip = try guardStep(step + 1, loss: value.loss, norm: norm)
        var gather = 0.0
        if !skip {
            if let clip = config.clipGradNorm { sync.clip(norm: norm, to: clip) }
            watchdog.phase = "optimizer"
            let update = try sync.step(adam: AdamConfig(learningRate: rate, weightDecay: config.weightDecay, decoupled: false), step: step + 1)
            gather = update.gatherSeconds
            // The count is the same on every rank, so all decide alike.
            let diverged = update.nonFinite
            guard diverged == 0 else {
                throw ConvirtError("step \(step + 1): at learning rate \(rate), \(diverged) parameter(s) or running statistics became NaN or infinite; training stopped "
                                   + "(no checkpoint is written from here; try a lower --lr or --clip-grad-norm, and --resume from the last checkpoint)")
            }
        }
        let timeOptimizer = clock.lap() - gather
        timeComm += gather
        let total = timeData + timeForward + timeBackward + timeComm + timeOptimizer
        let tflops = try stepFLOPs(batch) / Double(communicator.size) / total / 1e12
        return StepMetrics(step: step + 1, epoch: batch.epoch, loss: value.loss, lossV2U: value.imageToText, lossU2V: value.textToImage,
                           lr: rate, gradNorm: norm, pairsPerSecond: Double(config.globalBatch) / total, worldSize: communicator.size,
                           timeData: timeData, timeForward: timeForward, timeBackward: timeBackward, timeComm: timeComm,
                           timeOptimizer: timeOptimizer, valLoss: nil, skipped: config.outlierGuard == nil ? nil : skip,
                           skippedSteps: config.outlierGuard == nil ? nil : outliers.skipped, tflopsPerRank: tflops,
                           peakShare: config.peakTFLOPs.map { tflops / $0 }, excludedNegatives: excluded)
    }

    /// With --exclude-identical-texts: the batch's pairs of equal sentences leave the next loss's
    /// negatives (`DistributedLoss.excludeIdenticalTexts`); returns how many (nil when the option is off).
    /// `batch` is padded to the global batch's length (`globallyPadded`), so equal sentences have equal rows.
    func excludeIdenticalTexts(_ batch: TrainingBatch) throws -> Int? {
        guard config.excludeIdenticalTexts == true else { return nil }
        return try batch.ids.withUnsafeBufferPointer { try loss.excludeIdenticalTexts(ids: $0.baseAddress!, rows: batch.size, tokens: batch.tokens) }
    }

    /// The model's FLOPs of one step over all ranks (forward and backward of every pair of the global
    /// batch), its sentences' products counted on the rows they run on: where BERT packs its rows, this
    /// rank's valid tokens per sentence (the ranks' batches are alike in the mean).
    func stepFLOPs(_ batch: TrainingBatch) throws -> Double {
        let tokens = batch.tokens
        if flopsByTokens[tokens] == nil {
            flopsByTokens[tokens] = try model.flopsPerPair(tokens: tokens, globalBatch: config.globalBatch).total
        }
        var perPair = flopsByTokens[tokens]!
        if model.text.packsTokens {
            let valid = Double(batch.mask.reduce(0) { $0 + ($1 != 0 ? 1 : 0) }) / Double(max(batch.size, 1))
            perPair += model.text.flops(tokens: tokens, rows: valid).total - model.text.flops(tokens: tokens).total
        }
        return perPair * Double(config.globalBatch)
    }

    /// The outlier guard's decision on step `step` (1-based): true = do not apply it. The loss and the norm
    /// are the same on every rank, so all decide alike. Throws after `maxConsecutive` skips in a row.
    func guardStep(_ step: Int, loss: Double, norm: Double) throws -> Bool {
        guard let guardConfig = config.outlierGuard else { return false }
        let decision = outliers.decide(loss: loss, norm: norm, guardConfig)
        guard decision.skip else { return false }
        let why = [decision.lossZ.map { String(format: "loss %.4g (z %.1f)", loss, $0) }, decision.gradZ.map { String(format: "gradient norm %.4g (z %.1f)", norm, $0) }]
            .compactMap { $0 }.joined(separator: ", ")
        if outliers.consecutive >= guardConfig.maxConsecutive {
            let count = outliers.consecutive == 1 ? "1 step skipped as an outlier" : "\(outliers.consecutive) steps in a row skipped as outliers"
            throw ConvirtError("step \(step): \(count) (last: \(why), over the last \(guardConfig.window) applied steps; --max-consecutive-skips \(guardConfig.maxConsecutive)); "
                               + "training stopped (no checkpoint is written from here; try a lower --lr or --clip-grad-norm, and --resume from the last checkpoint)")
        }
        if communicator.isRoot { log("step \(step) skipped as an outlier: \(why); \(outliers.skipped) skipped in all") }
        return true
    }

    /// Exact contrastive accumulation (GradCache, open_clip's --accum-freq): this rank's rows as K
    /// micro-batches of b. Pass 1 embeds each micro-batch without keeping its activations (the model's
    /// buffers are reused by the next), keeping only the embeddings [K b, d]; one all-gather and the loss
    /// over all N pairs, the embedding gradients reduce-scattered as without accumulation; pass 2 runs
    /// each micro-batch forward again, now backward from its slice of the embedding gradients, the
    /// parameter gradients accumulating; the buckets' all-reduce starts during the last micro-batch's
    /// backward. Dropout is keyed by (seed, step, sample) and the images were augmented once, so pass 2
    /// computes what pass 1 did. BatchNorm: statistics per micro-batch, which the sampler lays out so
    /// that they do not depend on the world size (see `GlobalBatchSampler.localRows`): with SyncBN over
    /// micro-batch j on every rank (B/K rows), per rank over b rows; pass 1 leaves the running statistics
    /// as they were, so each micro-batch updates them once. Returns the loss and the forward and backward seconds.
    func accumulatedStep(_ step: Int, batch: TrainingBatch, clock: inout Clock) throws -> (ConVIRTLoss.Value, Double, Double) {
        let k = config.microBatches, b = batch.size / k, d = config.model.projDim
        let allV = accumulatedV.ensure(batch.size * d), allU = accumulatedU.ensure(batch.size * d)
        /// Micro-batch j's context: the step's, with dropout keyed by its samples; gradients of the last
        /// one mark the buckets ready.
        func context(_ j: Int, gradients: Bool) -> PassContext {
            var context = passContext(step: step, batch: batch, training: true)
            context.sampleIndices = Array(batch.sampleIndices[(j * b)..<((j + 1) * b)])
            if gradients && j == k - 1 { context.gradientsReady = sync.readyHandler }
            return context
        }
        // Pass 1: embeddings only; the running statistics restored after it.
        model.saveBuffers()
        for j in 0..<k {
            let (v, u) = try encode(batch, rows: (j * b)..<((j + 1) * b), context: context(j, gradients: false))
            (allV + j * b * d).update(from: v, count: b * d)
            (allU + j * b * d).update(from: u, count: b * d)
        }
        model.restoreBuffers()
        let value = try loss.forwardBackward(v: allV, u: allU, rows: batch.size)
        var forward = clock.lap() - loss.communicationTime, backward = 0.0
        // Pass 2: each micro-batch again, with its activations, then backward from its gradient slice.
        for j in 0..<k {
            let micro = context(j, gradients: true)
            _ = try encode(batch, rows: (j * b)..<((j + 1) * b), context: micro)
            forward += clock.lap()
            try model.backwardImages(gradEmbeddings: loss.gradV + j * b * d, context: micro)
            try model.backwardTexts(gradEmbeddings: loss.gradU + j * b * d, context: micro)
            backward += clock.lap()
        }
        return (value, forward, backward)
    }

    func makeLoader() -> Loader {
        var augment = AugmentConfig(outputSize: config.model.image.imageSize)
        augment.swapLateralityOnFlip = config.swapLateralityOnFlip
        return Loader(dataset: dataset, samples: trainSamples, sampler: sampler, tokenizer: tokenizer,
                      recipe: SampleRecipe(augment: augment, maxTokens: config.maxTokens),
                      startEpoch: startStep / sampler.batchesPerEpoch, startStep: startStep % sampler.batchesPerEpoch,
                      workers: config.loaderWorkers)
    }

    /// This rank's share of a global batch with its rows padded to the longest of the global batch
    /// (each rank's longest, summed over ranks as a vector of one entry per rank), so that every
    /// sample's rows, and a gradient piece's shape, are the same on every world size; and whether any
    /// rank has received the request to stop (`StopRequest`), a last entry of the same all-reduce.
    func globallyPadded(_ batch: TrainingBatch) throws -> (batch: TrainingBatch, stopRequested: Bool) {
        let size = communicator.size
        guard size > 1 else { return (batch, StopRequest.received) }
        var lengths = [Double](repeating: 0, count: size + 1)
        lengths[communicator.rank] = Double(batch.tokens)
        lengths[size] = StopRequest.received ? 1 : 0
        try lengths.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        return (batch.padded(toTokens: Int(lengths[..<size].max()!), padID: tokenizer.padID), lengths[size] > 0)
    }

    /// The pass context of a step: SyncBN when asked, and dropout keyed by (seed, step, global sample).
    func passContext(step: Int, batch: TrainingBatch, training: Bool) -> PassContext {
        PassContext(training: training, reducer: config.syncBatchNorm ? syncBatchNormReducer(communicator) : nil,
                    stream: RandomStream(seed: config.seed, .trainingStep, UInt64(step)), sampleIndices: batch.sampleIndices,
                    precision: config.productPrecision, gradientPiece: config.productPrecision == .bf16 ? config.gradientPieceSamples : nil)
    }

    /// This rank's image and text embeddings [n, d] of rows `rows` of a batch (default: all of them),
    /// valid until the next forward.
    func encode(_ batch: TrainingBatch, rows: Range<Int>? = nil, context: PassContext) throws -> (UnsafePointer<Float>, UnsafePointer<Float>) {
        let rows = rows ?? 0..<batch.size, n = rows.count
        let pixels = 3 * batch.imageSize * batch.imageSize, tokens = batch.tokens
        let v = try batch.images.withUnsafeBufferPointer {
            try model.encodeImages($0.baseAddress! + rows.lowerBound * pixels, batch: n, size: batch.imageSize, context: context)
        }
        let u = try batch.ids.withUnsafeBufferPointer { ids in
            try batch.mask.withUnsafeBufferPointer { mask in
                try model.encodeTexts(ids: ids.baseAddress! + rows.lowerBound * tokens, mask: mask.baseAddress! + rows.lowerBound * tokens,
                                      batch: n, tokens: tokens, context: context)
            }
        }
        return (v, u)
    }

    /// This rank's embeddings of a whole batch [size, d], computed `rows` at a time (evaluation mode),
    /// in the accumulation buffers.
    func encodeInPieces(_ batch: TrainingBatch, rows: Int, context: PassContext) throws -> (UnsafePointer<Float>, UnsafePointer<Float>) {
        let d = config.model.projDim
        let allV = accumulatedV.ensure(batch.size * d), allU = accumulatedU.ensure(batch.size * d)
        for start in stride(from: 0, to: batch.size, by: rows) {
            let piece = start..<min(batch.size, start + rows)
            let (v, u) = try encode(batch, rows: piece, context: context)
            (allV + start * d).update(from: v, count: piece.count * d)
            (allU + start * d).update(from: u, count: piece.count * d)
        }
        return (UnsafePointer(allV), UnsafePointer(allU))
    }

    // MARK: validation and the schedule

    func isValidationStep(_ step: Int) -> Bool {
        validationBatch > 0 && (step % config.valEvery == 0 || step == totalSteps)
    }

    /// The validation loss into the step's row; the plateau schedule's decision (nil for the others).
    func validate(into row: inout StepMetrics) throws -> Plateau.Decision? {
        let value = try validationLoss()
        // The same on every rank (a sum over ranks): all stop together, before any checkpoint of this step.
        guard value.isFinite || validationBatch == 0 else {
            throw ConvirtError("step \(row.step): the validation loss is \(value.isNaN ? "NaN" : "\(value)"); training stopped (no checkpoint is written from here: the model "
                               + "computes non-finite values on held-out pairs, e.g. from damaged --image-weights or a diverging run; try a lower --lr "
                               + "or --clip-grad-norm, and --resume from the last checkpoint)")
        }
        row.valLoss = value
        return schedule.validated(value)
    }

    /// The checkpoint with the lowest validation loss is kept (checkpoints/best names it).
    func saveBest(step: Int, loss: Double, _ checkpoints: CheckpointWriter) throws {
        try checkpoints.save(arena: model.arena, state: checkpointState(step: step), config: config, best: true)
        if communicator.isRoot { log("new best validation loss \(loss) at step \(step): checkpoint \(Checkpoints.name(step: step))") }
    }

    /// Commits a checkpoint started in an earlier step once every rank has written its shard, and starts
    /// the periodic one when it is due; returns whether it started one.
    func saveCheckpointIfDue(step: Int, savedStep: Int, stopping: Bool, _ checkpoints: CheckpointWriter) throws -> Bool {
        // (Not this step's best checkpoint: it is published after this step's metrics row.)
        if let pending = checkpoints.pendingStep, pending < step { try checkpoints.commitIfReady() }
        guard let every = config.checkpointEvery, step % every == 0, step < totalSteps, !stopping, savedStep != step else { return false }
        try checkpoints.save(arena: model.arena, state: checkpointState(step: step), config: config)
        return true
    }

    /// The validation pairs: the first `valSamples` of the validate split.
    var validationSamples: [Int] { Array(dataset.samples(split: "validate").prefix(config.valSamples)) }

    /// Pairs per validation batch: the global batch, or as many pairs as there are (a multiple of the
    /// world size) when the split is smaller; 0 = no validation possible.
    var validationBatch: Int {
        let count = validationSamples.count
        return count >= config.globalBatch ? config.globalBatch : count / communicator.size * communicator.size
    }

    /// Mean loss over the validation pairs (no augmentation, evaluation mode, forward only), in global
    /// batches split over the ranks as in training.
    public func validationLoss() throws -> Double {
        let samples = validationSamples
        let n = validationBatch
        guard n > 0 else { return .nan }
        let sampler = try GlobalBatchSampler(sampleCount: samples.count, globalBatch: n, worldSize: communicator.size,
                                             rank: communicator.rank, seed: config.seed)
        let recipe = SampleRecipe(augment: .none(outputSize: config.model.image.imageSize), maxTokens: config.maxTokens)
        var total = 0.0
        for k in 0..<sampler.batchesPerEpoch {
            let batch = Loader.build(dataset: dataset, samples: samples, sampler: sampler, tokenizer: tokenizer, recipe: recipe, epoch: 0,
                                     step: k, permutation: Array(0..<samples.count))
            let context = passContext(step: 0, batch: batch, training: false)
            // Validation batches are not padded to the global length; for the exclusion only, they are.
            if config.excludeIdenticalTexts == true { _ = try excludeIdenticalTexts(globallyPadded(batch).batch) }
            // With accumulation, in pieces of a micro-batch, so that validation needs no more memory than a step.
            let (v, u) = config.microBatches == 1 ? try encode(batch, context: context)
                : try encodeInPieces(batch, rows: max(1, config.globalBatch / (communicator.size * config.microBatches)), context: context)
            total += try loss.forward(v: v, u: u, rows: batch.size).loss
        }
        return total / Double(sampler.batchesPerEpoch)
    }

    // MARK: checkpoints

    func checkpointState(step: Int) -> CheckpointManifest.State {
        let plateau = schedule.plateau
        return CheckpointManifest.State(step: step, epoch: step / sampler.batchesPerEpoch, samplesSeen: step * config.globalBatch,
                                        learningRate: schedule.currentRate, bestValidation: plateau.flatMap { $0.best.isFinite ? $0.best : nil },
                                        checksWithoutImprovement: plateau?.sinceHalving ?? 0, checks: plateau?.checks ?? 0,
                                        lastStepLearningRate: step > 0 ? schedule.rate(step: step - 1) : nil,
                                        outlierGuard: config.outlierGuard == nil ? nil : outliers)
    }

    /// Restores the newest complete checkpoint of the run directory (leftovers of interrupted saves are
    /// removed first). A damaged one is an error naming the file and the problem, unless `fallback`: then
    /// it is reported and the previous complete checkpoint is tried. A checkpoint of another model is
    /// always an error. Returns the restored directory.
    /// `adoptPrecision` (--precision auto): continue in the checkpoint's precision, whatever this CPU would choose.
    public func resume(fallback: Bool = false, allowConfigChange: Bool = false, adoptPrecision: Bool = false) throws -> String? {
        communicator.watchdog.phase = "resume"
        if communicator.isRoot {
            for leftover in Checkpoints.removeLeftovers(runDirectory: runDirectory) {
                log("removed \(runDirectory)/checkpoints/\(leftover), the leftover of a checkpoint that was never committed")
            }
        }
        try communicator.barrier()
        // With gather I/O only rank 0 sees the checkpoints (no shared filesystem): it picks, reads and
        // broadcasts; otherwise every rank reads the files itself.
        let fromRoot = config.checkpointIO == .gather && communicator.size > 1
        var candidates = fromRoot && !communicator.isRoot ? [] : Checkpoints.candidates(runDirectory: runDirectory)
        if fromRoot {
            let names = try Checkpoints.broadcastBytes(Data(candidates.joined(separator: "\n").utf8), communicator)
            candidates = String(decoding: names, as: UTF8.self).split(separator: "\n").map(String.init)
        }
        for directory in candidates {
            let manifest: CheckpointManifest
            do {
                manifest = fromRoot ? try Checkpoints.restoreFromRoot(directory, into: model.arena, communicator: communicator)
                    : try Checkpoints.restore(directory, into: model.arena)
            } catch let error as ConvirtError where error.reason != .modelMismatch {
                guard fallback else {
                    throw ConvirtError("cannot resume from \(directory): \(error.message) (--resume-fallback resumes from the previous complete checkpoint)")
                }
                if communicator.isRoot { log("cannot resume from \(directory): \(error); trying the previous checkpoint") }
                continue
            }
            if adoptPrecision {
                config.precision = manifest.config.precision
                if config.gradientPiece == nil { config.gradientPiece = manifest.config.gradientPiece }
                try config.validatePieces(worldSize: communicator.size)
            }
            let differences = manifest.config.trajectoryDifferences(to: config)
            if !differences.isEmpty && !allowConfigChange {
                throw ConvirtError("cannot resume from \(directory) with other settings than the run's: \(differences.joined(separator: "; ")) "
                                   + "(resume with the run's settings, use a new --run-dir, or --allow-config-change to continue anyway)")
            }
            if !differences.isEmpty && communicator.isRoot {
                log("warning: resuming with changed settings (--allow-config-change): \(differences.joined(separator: "; "))")
            }
            restore(manifest.state)
            return directory
        }
        return nil
    }

    func restore(_ state: CheckpointManifest.State) {
        startStep = state.step
        outliers = state.outlierGuard ?? OutlierGuard()
        var plateau = schedule.plateau
        plateau?.best = state.bestValidation ?? .infinity
        plateau?.sinceHalving = state.checksWithoutImprovement
        // Pretraining's plateau stops on the total count of checks, never on checks since the best, which
        // the manifest does not keep.
        plateau?.sinceBest = state.checksWithoutImprovement
        plateau?.checks = state.checks
        let kind: LearningRateSchedule.Kind = plateau.map { .plateau($0) } ?? schedule.kind
        schedule = LearningRateSchedule(kind, baseRate: config.learningRate, currentRate: state.learningRate)
    }
}

/// The ConVIRT loss over the global batch, for this rank's rows: all-gather the embeddings, the loss of
/// the local rows against all N columns, reduce-scatter of the embedding gradients (training only).
public final class DistributedLoss {
    let communicator: Communicator
    let features: Int, tau: Double, lambda: Double
    let workspace = ConVIRTLoss.Workspace()
    /// [N, d] buffers reused from step to step: gathered embeddings, then their gradients.
    let globalV = Scratch<Float>(), globalU = Scratch<Float>(), fullGradV = Scratch<Float>(), fullGradU = Scratch<Float>()
    /// This rank's embedding gradients [b, d] after `forwardBackward`.
    let localGradV = Scratch<Float>(), localGradU = Scratch<Float>()
    /// Token ids as floats (exact below 2^24), this rank's [b, T] and the global batch's [N, T].
    let localIDs = Scratch<Float>(), globalIDs = Scratch<Float>()
    /// Seconds spent in collectives by the last call.
    public private(set) var communicationTime = 0.0

    public init(communicator: Communicator, features: Int, tau: Double, lambda: Double) {
        self.communicator = communicator
        self.features = features
        self.tau = tau
        self.lambda = lambda
    }

    public var gradV: UnsafePointer<Float> { UnsafePointer(localGradV.pointer) }
    public var gradU: UnsafePointer<Float> { UnsafePointer(localGradU.pointer) }

    /// The loss (summed over ranks) and this rank's embedding gradients in gradV, gradU [b, d].
    public func forwardBackward(v: UnsafePointer<Float>, u: UnsafePointer<Float>, rows b: Int) throws -> ConVIRTLoss.Value {
        try run(v: v, u: u, rows: b, gradients: true)
    }

    /// The loss only (summed over ranks).
    public func forward(v: UnsafePointer<Float>, u: UnsafePointer<Float>, rows b: Int) throws -> ConVIRTLoss.Value {
        try run(v: v, u: u, rows: b, gradients: false)
    }

    /// False negatives: excludes from the next loss (`forwardBackward` or `forward`) the pairs whose
    /// sentences have the same token ids, over the whole global batch. `ids` [b, tokens] are this rank's
    /// rows, padded to the global batch's length (so equal sentences have equal rows); they are
    /// all-gathered, so every rank sees the same groups. Returns the pairs (i, j), i != j, excluded in the
    /// global batch (each unordered pair counts twice, once per direction of a row).
    public func excludeIdenticalTexts(ids: UnsafePointer<Int32>, rows b: Int, tokens t: Int) throws -> Int {
        let n = b * communicator.size
        let mine = localIDs.ensure(b * t), all = globalIDs.ensure(n * t)
        for k in 0..<(b * t) { mine[k] = Float(ids[k]) }
        try communicator.allGather(UnsafeBufferPointer(start: mine, count: b * t), into: UnsafeMutableBufferPointer(start: all, count: n * t))
        // Rows grouped by content: by a hash of their ids, then compared exactly.
        var groups: [UInt64: [[Int]]] = [:]
        for row in 0..<n {
            let ids = UnsafeBufferPointer(start: all + row * t, count: t)
            var hash: UInt64 = 0xcbf2_9ce4_8422_2325
            for x in ids { hash = (hash ^ UInt64(x.bitPattern)) &* 0x100_0000_01b3 }
            var buckets = groups[hash, default: []]
            if let k = buckets.firstIndex(where: { memcmp(all + $0[0] * t, all + row * t, t * 4) == 0 }) { buckets[k].append(row) } else { buckets.append([row]) }
            groups[hash] = buckets
        }
        let offset = communicator.rank * b
        workspace.excluded.removeAll(keepingCapacity: true)
        var total = 0
        for group in groups.values.joined() where group.count > 1 {
            total += group.count * (group.count - 1)
            for i in group where i >= offset && i < offset + b {
                for j in group where j != i { workspace.excluded.append((i - offset) * n + j) }
            }
        }
        return total
    }

    private func run(v: UnsafePointer<Float>, u: UnsafePointer<Float>, rows b: Int, gradients: Bool) throws -> ConVIRTLoss.Value {
        defer { workspace.excluded.removeAll(keepingCapacity: true) }  // each exclusion holds for one loss
        let n = b * communicator.size, d = features
        let allV = globalV.ensure(n * d), allU = globalU.ensure(n * d)
        var clock = Clock()
        try communicator.allGather(UnsafeBufferPointer(start: v, count: b * d), into: UnsafeMutableBufferPointer(start: allV, count: n * d))
        try communicator.allGather(UnsafeBufferPointer(start: u, count: b * d), into: UnsafeMutableBufferPointer(start: allU, count: n * d))
        communicationTime = clock.lap()
        var value: ConVIRTLoss.Value
        if gradients {
            let fullV = fullGradV.ensure(n * d), fullU = fullGradU.ensure(n * d)
            value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: allV, globalU: allU, localRows: b, globalRows: n, features: d,
                                                offset: communicator.rank * b, tau: tau, lambda: lambda, gradV: fullV, gradU: fullU,
                                                workspace: workspace)
            _ = clock.lap()
            try communicator.reduceScatterSum(UnsafeBufferPointer(start: fullV, count: n * d),
                                              into: UnsafeMutableBufferPointer(start: localGradV.ensure(b * d), count: b * d))
            try communicator.reduceScatterSum(UnsafeBufferPointer(start: fullU, count: n * d),
                                              into: UnsafeMutableBufferPointer(start: localGradU.ensure(b * d), count: b * d))
        } else {
            value = ConVIRTLoss.forward(v: v, u: u, globalV: allV, globalU: allU, localRows: b, globalRows: n, features: d,
                                        offset: communicator.rank * b, tau: tau, lambda: lambda, workspace: workspace)
            _ = clock.lap()
        }
        var sums = [value.loss, value.imageToText, value.textToImage]
        try sums.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        communicationTime += clock.lap()
        return ConVIRTLoss.Value(loss: sums[0], imageToText: sums[1], textToImage: sums[2])
    }
}

/// metrics.jsonl (rank 0): one sorted-key JSON object per step, appended on resume. Written with
/// write(2), so that a full disk is reported as the system says it ("No space left on device").
final class MetricsWriter {
    let descriptor: Int32
    let path: String
    let encoder = JSONEncoder()

    /// A new file, or (resumed at step `resumedAt` > 0) the old one cut after the rows the checkpoint
    /// covers: rows of later steps (the run computes them again) and a line cut short (the disk filled,
    /// or the run was killed mid-write) are dropped, so that every step appears once.
    init(path: String, enabled: Bool, resumedAt: Int, log: (String) -> Void) throws {
        self.path = path
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
        guard enabled else { descriptor = -1; return }
        let fresh = resumedAt == 0 || !FileManager.default.fileExists(atPath: path)
        let fd = open(path, O_WRONLY | O_CREAT | (fresh ? O_TRUNC : 0), 0o644)
        guard fd >= 0 else { throw ConvirtError("cannot open \(path) for writing: \(String(cString: strerror(errno)))") }
        descriptor = fd
        if !fresh, let data = FileManager.default.contents(atPath: path) {
            struct Step: Decodable { let step: Int }
            var keep = 0, dropped = 0
            var start = data.startIndex
            while start < data.endIndex, let end = data[start...].firstIndex(of: UInt8(ascii: "\n")) {
                if let row = try? JSONDecoder().decode(Step.self, from: data[start..<end]), row.step > resumedAt { dropped += 1 } else if dropped == 0 {
                    keep = end + 1 - data.startIndex
                }
                start = end + 1
            }
            if keep < data.count { _ = ftruncate(fd, off_t(keep)) }
            if dropped > 0 { log("metrics.jsonl: dropped \(dropped) row(s) after step \(resumedAt), the checkpoint's (the resumed run computes them again)") }
        }
        _ = lseek(fd, 0, SEEK_END)
    }

    deinit { if descriptor >= 0 { close(descriptor) } }

    func append(_ row: StepMetrics) throws {
        guard descriptor >= 0 else { return }
        try Files.writeAll(encoder.encode(row) + Data("\n".utf8), descriptor: descriptor, path: path)
    }

    /// The rows written so far on the disk (fsync), before a checkpoint that covers them is published.
    func synchronize() throws {
        guard descriptor >= 0 else { return }
        guard fsync(descriptor) == 0 else { throw ConvirtError("cannot sync \(path): \(String(cString: strerror(errno)))") }
    }
}
