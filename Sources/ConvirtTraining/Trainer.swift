// Data-parallel ConVIRT pretraining (DESIGN.md, data flow of one step): local forward; all-gather of the
// image and text embeddings; the loss of this rank's rows against all N columns; reduce-scatter of the
// embedding gradients; backward; all-reduce of the gradients; Adam. With SyncBN, BatchNorm statistics
// are summed over ranks in forward and backward, so N ranks train exactly as one.

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

    enum CodingKeys: String, CodingKey {
        case step, epoch, loss, lossV2U = "loss_v2u", lossU2V = "loss_u2v", lr, gradNorm = "grad_norm", pairsPerSecond = "pairs_per_s"
        case worldSize = "world_size", timeData = "time_data_s", timeForward = "time_forward_s", timeBackward = "time_backward_s"
        case timeComm = "time_comm_s", timeOptimizer = "time_optimizer_s", timeCheckpoint = "time_checkpoint_s", valLoss = "val_loss"
    }
}

public final class Trainer {
    public let config: TrainConfig
    public let communicator: Communicator
    public let model: ConVIRTModel
    public let dataset: PreparedDataset
    public let tokenizer: WordPieceTokenizer
    public let runDirectory: String
    /// The vocabulary the text encoder reads (the run directory gets a copy, for evaluation and embedding).
    public let vocabularyPath: String
    let trainSamples: [Int]
    let sampler: GlobalBatchSampler
    let lossWorkspace = ConVIRTLoss.Workspace()
    var log: (String) -> Void

    // Paper schedule state.
    var currentRate: Double
    var bestValidation = Double.infinity
    var checksWithoutImprovement = 0
    var checks = 0

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
            let bert = try BertDirectory(path: dir)
            config.model.text = bert.config
        } else {
            config.model.text.vocabSize = tokenizer.vocabulary.count
        }
        try config.validate(worldSize: communicator.size)
        self.config = config
        model = try ConVIRTModel(config: config.model)
        model.initialize(seed: config.seed)
        if let path = config.imageWeights {
            try Weights.load(SafeTensorsFile(path: path), into: model.arena, prefix: "image.")
        }
        if let dir = config.textWeights { try BertDirectory(path: dir).load(into: model.arena, prefix: "text.") }
        if config.zero1 {
            model.arena.shardOptimizerState(Checkpoints.slices(model.arena.count, communicator).mine)
        }
        trainSamples = dataset.samples(split: "train")
        sampler = try GlobalBatchSampler(sampleCount: trainSamples.count, globalBatch: config.globalBatch, worldSize: communicator.size,
                                         rank: communicator.rank, seed: config.seed)
        currentRate = config.learningRate
    }

    public var totalSteps: Int {
        if let steps = config.steps { return steps }
        return (config.epochs ?? 1) * sampler.batchesPerEpoch
    }

    lazy var buckets = GradientBuckets(arena: model.arena, communicator: communicator)
    /// Per-step communication buffers, allocated once: all-gathered V and U, their gradients [N, d],
    /// and this rank's ZeRO-1 shard of the summed gradients.
    let gathered = (0..<4).map { _ in Scratch<Float>() }
    let shardGradients = Scratch<Float>()
    /// Floats of each rank's arena shard (ZeRO-1 and checkpoints cut the arena the same way).
    lazy var shardCounts = Checkpoints.slices(model.arena.count, communicator).counts

    func context(step: Int, batch: TrainingBatch, training: Bool) -> PassContext {
        let comm = communicator
        let reducer: StatisticsReducer? = config.syncBatchNorm && comm.size > 1 ? { buffer in
            do { try comm.allReduceSum(buffer) } catch { comm.abort(code: 3) }
        } : nil
        return PassContext(training: training, reducer: reducer, stream: RandomStream(seed: config.seed, 0x7A1D, UInt64(step)),
                           sampleIndices: batch.sampleIndices)
    }

    /// This rank's image and text embeddings [b, d] of a batch (valid until the next forward).
    func encode(_ batch: TrainingBatch, context: PassContext) throws -> (UnsafePointer<Float>, UnsafePointer<Float>) {
        let v = try batch.images.withUnsafeBufferPointer {
            try model.encodeImages($0.baseAddress!, batch: batch.size, size: batch.imageSize, context: context)
        }
        let u = try batch.ids.withUnsafeBufferPointer { ids in
            try batch.mask.withUnsafeBufferPointer { mask in
                try model.encodeTexts(ids: ids.baseAddress!, mask: mask.baseAddress!, batch: batch.size, tokens: batch.tokens, context: context)
            }
        }
        return (v, u)
    }

    /// Runs the loss of this rank's rows over the global batch; returns the loss value (summed over
    /// ranks) and leaves this rank's embedding gradients in gradV, gradU [b, d].
    func globalLoss(v: UnsafePointer<Float>, u: UnsafePointer<Float>, b: Int, gradV: inout [Float], gradU: inout [Float],
                    commTime: inout Double) throws -> ConVIRTLoss.Value {
        let w = communicator.size, n = b * w, d = config.model.projDim
        // [N, d] buffers reused from step to step: gathered embeddings, then their gradients.
        let allV = gathered[0].ensure(n * d), allU = gathered[1].ensure(n * d)
        let fullV = gathered[2].ensure(n * d), fullU = gathered[3].ensure(n * d)
        var t = Clock()
        try communicator.allGather(UnsafeBufferPointer(start: v, count: b * d), into: UnsafeMutableBufferPointer(start: allV, count: n * d))
        try communicator.allGather(UnsafeBufferPointer(start: u, count: b * d), into: UnsafeMutableBufferPointer(start: allU, count: n * d))
        commTime += t.lap()
        var value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: allV, globalU: allU, localRows: b, globalRows: n, features: d,
                                                offset: communicator.rank * b, tau: config.model.tau, lambda: config.model.lambda,
                                                gradV: fullV, gradU: fullU, workspace: lossWorkspace)
        t = Clock()
        try gradV.withUnsafeMutableBufferPointer { try communicator.reduceScatterSum(UnsafeBufferPointer(start: fullV, count: n * d), into: $0) }
        try gradU.withUnsafeMutableBufferPointer { try communicator.reduceScatterSum(UnsafeBufferPointer(start: fullU, count: n * d), into: $0) }
        var sums = [value.loss, value.imageToText, value.textToImage]
        try sums.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        commTime += t.lap()
        value = ConVIRTLoss.Value(loss: sums[0], imageToText: sums[1], textToImage: sums[2])
        return value
    }

    /// The step to start from (0, or a restored checkpoint's).
    public private(set) var startStep = 0

    /// Restores the newest complete checkpoint of the run directory (leftovers of interrupted saves are
    /// removed first). A damaged one is an error naming the file and the problem, unless `fallback`: then
    /// it is reported and the previous complete checkpoint is tried. Returns the restored directory.
    public func resume(fallback: Bool = false) throws -> String? {
        if communicator.isRoot {
            for leftover in Checkpoints.removeLeftovers(runDirectory: runDirectory) {
                log("removed \(runDirectory)/checkpoints/\(leftover), the leftover of a checkpoint that was never committed")
            }
        }
        try communicator.barrier()
        var restored: (String, CheckpointManifest)? = nil
        // With gather I/O only rank 0 sees the checkpoints (no shared filesystem): it picks, reads and
        // broadcasts; otherwise every rank reads the files itself.
        let fromRoot = config.checkpointIO == CheckpointIO.gather.rawValue && communicator.size > 1
        var candidates = fromRoot && !communicator.isRoot ? [] : Checkpoints.candidates(runDirectory: runDirectory)
        if fromRoot {
            let names = try Checkpoints.broadcastBytes(Data(candidates.joined(separator: "\n").utf8), communicator)
            candidates = String(decoding: names, as: UTF8.self).split(separator: "\n").map(String.init)
        }
        for directory in candidates {
            do {
                let manifest = fromRoot ? try Checkpoints.restoreFromRoot(directory, into: model.arena, communicator: communicator)
                    : try Checkpoints.restore(directory, into: model.arena)
                restored = (directory, manifest)
                break
            } catch let error as ConvirtError where !error.message.contains("the model differs") {
                guard fallback else {
                    throw ConvirtError("cannot resume from \(directory): \(error.message) (--resume-fallback resumes from the previous complete checkpoint)")
                }
                if communicator.isRoot { log("cannot resume from \(directory): \(error); trying the previous checkpoint") }
            }
        }
        guard let (directory, manifest) = restored else { return nil }
        startStep = manifest.state.step
        currentRate = manifest.state.learningRate
        bestValidation = manifest.state.bestValidation ?? .infinity
        checksWithoutImprovement = manifest.state.checksWithoutImprovement
        checks = manifest.state.checks
        return directory
    }

    func checkpointState(step: Int) -> CheckpointManifest.State {
        CheckpointManifest.State(step: step, epoch: step / sampler.batchesPerEpoch, samplesSeen: step * config.globalBatch,
                                 learningRate: currentRate, bestValidation: bestValidation.isFinite ? bestValidation : nil,
                                 checksWithoutImprovement: checksWithoutImprovement, checks: checks)
    }

    /// Trains to the end; returns the metrics rows.
    @discardableResult
    public func run(progress: ((StepMetrics, Int) -> Void)? = nil) throws -> [StepMetrics] {
        let b = sampler.localBatch, d = config.model.projDim, size = config.model.image.imageSize
        var augment = AugmentConfig(outputSize: size)
        augment.swapLateralityOnFlip = config.swapLateralityOnFlip
        let loader = Loader(dataset: dataset, samples: trainSamples, sampler: sampler, tokenizer: tokenizer,
                            recipe: SampleRecipe(augment: augment, maxTokens: config.maxTokens),
                            startEpoch: startStep / sampler.batchesPerEpoch, startStep: startStep % sampler.batchesPerEpoch,
                            workers: config.loaderWorkers)
        defer { loader.stop() }
        var gradV = [Float](repeating: 0, count: b * d), gradU = gradV
        var rows: [StepMetrics] = []
        let metricsPath = "\(runDirectory)/metrics.jsonl"
        if communicator.isRoot && (startStep == 0 || !FileManager.default.fileExists(atPath: metricsPath)) {
            _ = FileManager.default.createFile(atPath: metricsPath, contents: nil)
        }
        let metricsFile = communicator.isRoot ? FileHandle(forWritingAtPath: metricsPath) : nil
        _ = try? metricsFile?.seekToEnd()
        defer { try? metricsFile?.close() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
        if validationBatch == 0 && communicator.isRoot {
            log("warning: the validate split has fewer usable pairs than ranks; no validation loss will be computed")
        }
        let checkpoints = try CheckpointWriter(communicator: communicator, runDirectory: runDirectory,
                                               mode: CheckpointIO(rawValue: config.checkpointIO) ?? .parallel,
                                               asynchronous: config.asyncCheckpoint, keep: config.keepCheckpoints)
        if config.asyncCheckpoint { checkpoints.reserve(arena: model.arena) }
        var savedStep = startStep
        var step = startStep
        while step < totalSteps {
            var clock = Clock()
            let batch = loader.next()
            let timeData = clock.lap()
            let context = self.context(step: step, batch: batch, training: true)
            let (v, u) = try encode(batch, context: context)
            var timeComm = 0.0
            let forwardStart = clock.lap()
            let value = try globalLoss(v: v, u: u, b: b, gradV: &gradV, gradU: &gradU, commTime: &timeComm)
            let timeForward = forwardStart + (clock.lap() - timeComm)
            model.arena.zeroGrads()
            // Backward; each bucket of finished gradients starts its all-reduce at once (over ranks).
            var backwardContext = context
            var bucketError: Error? = nil
            if communicator.size > 1 && !config.zero1 { buckets.reset() }
            if communicator.size > 1 && !config.zero1 && config.overlapCommunication {
                let buckets = self.buckets
                backwardContext.gradientsReady = { prefix in
                    do { try buckets.markReady(prefix) } catch { bucketError = error }
                }
            }
            model.backwardImages(gradEmbeddings: gradV, context: backwardContext)
            model.backwardTexts(gradEmbeddings: gradU, context: backwardContext)
            if let bucketError { throw bucketError }
            let timeBackward = clock.lap()
            // What is left of the communication after backward (exposed, not hidden).
            if communicator.size > 1 && !config.zero1 { timeComm += try buckets.finish() }
            let own = model.arena.optimizerRange
            if config.zero1 && communicator.size > 1 {
                // ZeRO-1: each rank receives the summed gradients of its own shard only.
                let shard = shardGradients.ensure(own.count)
                try communicator.reduceScatterSum(UnsafeBufferPointer(start: model.arena.grads, count: model.arena.count), counts: shardCounts,
                                                  into: UnsafeMutableBufferPointer(start: shard, count: own.count))
                (model.arena.grads + own.lowerBound).update(from: shard, count: own.count)
            }
            _ = clock.lap()
            // Global gradient norm (over the own shard, summed over ranks, with ZeRO-1), optional clipping, Adam.
            var squares = [0.0]
            for range in model.arena.trainableRanges(within: own) {
                for i in range { let g = Double(model.arena.grads[i]); squares[0] += g * g }
            }
            if config.zero1 && communicator.size > 1 { try squares.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) } }
            let norm = squares[0].squareRoot()
            if let clip = config.clipGradNorm, norm > clip {
                let scale = Float(clip / (norm + 1e-6))
                for range in model.arena.trainableRanges(within: own) { for i in range { model.arena.grads[i] *= scale } }
            }
            let rate = config.schedule == "paper" ? currentRate : config.scheduledRate(step: step, totalSteps: totalSteps)
            Adam.step(model.arena, step: step + 1,
                      config: AdamConfig(learningRate: rate, weightDecay: config.weightDecay, decoupled: false))
            let timeOptimizer = clock.lap()
            if config.zero1 && communicator.size > 1 {
                try communicator.allGatherInPlace(UnsafeMutableBufferPointer(start: model.arena.params, count: model.arena.count), counts: shardCounts)
                timeComm += clock.lap()
            }
            let total = timeData + timeForward + timeBackward + timeComm + timeOptimizer
            var row = StepMetrics(step: step + 1, epoch: batch.epoch, loss: value.loss, lossV2U: value.imageToText, lossU2V: value.textToImage,
                                  lr: rate, gradNorm: norm, pairsPerSecond: Double(config.globalBatch) / total, worldSize: communicator.size,
                                  timeData: timeData, timeForward: timeForward, timeBackward: timeBackward, timeComm: timeComm,
                                  timeOptimizer: timeOptimizer, valLoss: nil)
            step += 1
            var stop = false
            if validationBatch > 0 && (step % config.valEvery == 0 || step == totalSteps) {
                let val = try validationLoss()
                row.valLoss = val
                if config.schedule == "paper" {
                    checks += 1
                    if val < bestValidation {
                        bestValidation = val
                        checksWithoutImprovement = 0
                        // The checkpoint with the lowest validation loss is kept (checkpoints/best names it).
                        try checkpoints.save(arena: model.arena, state: checkpointState(step: step), config: config, best: true)
                        savedStep = step
                        if communicator.isRoot { log("new best validation loss \(val) at step \(step): checkpoint \(Checkpoints.name(step: step))") }
                    } else {
                        checksWithoutImprovement += 1
                        if checksWithoutImprovement >= config.patience { currentRate /= 2; checksWithoutImprovement = 0 }
                    }
                    stop = checks >= config.maxChecks
                }
            }
            // A checkpoint started in an earlier step is committed once every rank has written its shard
            // (at the latest before the next one starts, or at the end).
            if checkpoints.pendingStep != nil { try checkpoints.commitIfReady() }
            if let every = config.checkpointEvery, step % every == 0, step < totalSteps, !stop, savedStep != step {
                try checkpoints.save(arena: model.arena, state: checkpointState(step: step), config: config)
                savedStep = step
            }
            row.timeCheckpoint = checkpoints.takeStall()
            rows.append(row)
            if let metricsFile { metricsFile.write(try encoder.encode(row) + Data("\n".utf8)) }
            progress?(row, totalSteps)
            if stop { break }
        }
        try checkpoints.commit()
        if step > savedStep {
            try checkpoints.save(arena: model.arena, state: checkpointState(step: step), config: config)
            try checkpoints.commit()
        }
        return rows
    }

    /// The validation pairs: the first `valSamples` of the validate split.
    var validationSamples: [Int] { Array(dataset.samples(split: "validate").prefix(config.valSamples)) }

    /// Pairs per validation batch: the global batch, or as many pairs as there are (a multiple of the
    /// world size) when the split is smaller; 0 = no validation possible.
    var validationBatch: Int {
        let count = validationSamples.count
        return count >= config.globalBatch ? config.globalBatch : count / communicator.size * communicator.size
    }

    /// Mean loss over the validation pairs (no augmentation, evaluation mode), in global batches split
    /// over the ranks as in training.
    public func validationLoss() throws -> Double {
        let samples = validationSamples
        let n = validationBatch
        guard n > 0 else { return .nan }
        let sampler = try GlobalBatchSampler(sampleCount: samples.count, globalBatch: n, worldSize: communicator.size,
                                             rank: communicator.rank, seed: config.seed)
        let recipe = SampleRecipe(augment: .none(outputSize: config.model.image.imageSize), maxTokens: config.maxTokens)
        let b = sampler.localBatch, d = config.model.projDim
        var gradV = [Float](repeating: 0, count: b * d), gradU = gradV
        var total = 0.0, comm = 0.0
        for k in 0..<sampler.batchesPerEpoch {
            let batch = Loader.build(dataset: dataset, samples: samples, sampler: sampler, tokenizer: tokenizer, recipe: recipe, epoch: 0,
                                     step: k, permutation: Array(0..<samples.count))
            let (v, u) = try encode(batch, context: self.context(step: 0, batch: batch, training: false))
            total += try globalLoss(v: v, u: u, b: b, gradV: &gradV, gradU: &gradU, commTime: &comm).loss
        }
        return total / Double(sampler.batchesPerEpoch)
    }
}

/// Seconds since the last lap.
struct Clock {
    var last = DispatchTime.now().uptimeNanoseconds
    mutating func lap() -> Double {
        let now = DispatchTime.now().uptimeNanoseconds
        defer { last = now }
        return Double(now - last) * 1e-9
    }
}
