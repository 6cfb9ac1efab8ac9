import ArgumentParser
import ConvirtCore
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation

/// `convirt train`: data-parallel ConVIRT pretraining; under mpirun every rank runs it.
struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "train", abstract: "ConVIRT pretraining (data-parallel under mpirun).")

    @Option(help: "A prepared dataset (convirt prepare mimic).") var data: String
    @Option(help: "Run directory (config.json, metrics.jsonl, results).") var runDir: String
    @Option(help: "tiny, demo or paper.") var preset = Preset.demo
    @Option(help: "Pairs per step over all ranks (must divide by the number of ranks).") var globalBatch: Int?
    @Option(help: "Total steps of the run.") var steps: Int?
    @Option(help: "Epochs (when --steps is not given).") var epochs: Int?
    @Option(help: "Seed of every random draw.") var seed: UInt64?
    @Option(help: "Learning rate.") var lr: Double?
    @Option(help: "Adam weight decay (L2, as torch.optim.Adam).") var weightDecay: Double?
    @Option(help: "paper, cosine or constant.") var schedule: ScheduleKind?
    @Option(help: "Warmup steps (cosine schedule).") var warmupSteps: Int?
    @Option(help: "Validation loss every K steps.") var valEvery: Int?
    @Option(help: "Validation pairs.") var valSamples: Int?
    @Option(help: "Checks without improvement before the LR is halved (paper schedule).") var patience: Int?
    @Option(help: "Stop after this many validation checks (paper schedule).") var maxChecks: Int?
    @Flag(help: "BatchNorm with per-rank statistics instead of SyncBN.") var noSyncBn = false
    @Option(help: "Clip the global gradient norm.") var clipGradNorm: Double?
    @Option(help: "Maximum WordPiece tokens per sentence.") var maxTokens: Int?
    @Option(help: "Lowercase text (uncased vocabulary): true or false.") var lowercase: Bool?
    @Option(help: "Threads per rank (products and loops).") var threads: Int?
    @Option(help: "Loader threads per rank.") var loaderWorkers: Int?
    @Flag(help: "Do not swap left/right in the sentence when the image is flipped (the paper's exact recipe).") var noLateralitySwap = false
    @Option(help: "torchvision ResNet weights (.safetensors; tools/convert_weights.py).") var imageWeights: String?
    @Option(help: "A Hugging Face BERT directory (config.json, vocab.txt, model.safetensors).") var textWeights: String?
    @Option(help: "vocab.txt (default: the text weights', else the dataset's).") var vocab: String?
    @Option(help: "Held-out studies for the image-to-text retrieval check at the end (0 = skip).") var retrievalEval = 200
    @Option(help: "Save a sharded checkpoint every K steps (always at the end).") var checkpointEvery: Int?
    @Option(help: "Checkpoints to keep.") var keepCheckpoints: Int?
    @Flag(help: "Continue from the newest complete checkpoint of the run directory (if there is one).") var resume = false
    @Flag(help: "With --resume: when the newest checkpoint is damaged, report it and resume from the previous complete one.")
    var resumeFallback = false
    @Option(help: "parallel (every rank writes its shard; needs a shared filesystem) or gather (rank 0 receives and writes all shards).")
    var checkpointIo: CheckpointIO?
    @Flag(help: "Write checkpoints before training goes on (default: from a snapshot, in the background).") var syncCheckpoint = false
    @Flag(help: "ZeRO-1: shard the Adam state over the ranks (reduce-scatter gradients, update the own shard, all-gather parameters).")
    var zero1 = false
    @Flag(help: "All-reduce the gradients only after backward (no overlap; to measure what the overlap hides).") var noOverlap = false

    func resolved() throws -> TrainConfig {
        var c = TrainConfig.preset(preset)
        if let globalBatch { c.globalBatch = globalBatch }
        if let steps { c.steps = steps; c.epochs = nil }
        if let epochs { c.epochs = epochs; if steps == nil { c.steps = nil } }
        if let seed { c.seed = seed }
        if let lr { c.learningRate = lr }
        if let weightDecay { c.weightDecay = weightDecay }
        if let schedule { c.schedule = schedule }
        if let warmupSteps { c.warmupSteps = warmupSteps }
        if let valEvery { c.valEvery = valEvery }
        if let valSamples { c.valSamples = valSamples }
        if let patience { c.patience = patience }
        if let maxChecks { c.maxChecks = maxChecks }
        if noSyncBn { c.syncBatchNorm = false }
        if let clipGradNorm { c.clipGradNorm = clipGradNorm }
        if let maxTokens { c.maxTokens = maxTokens }
        if let lowercase { c.lowercase = lowercase }
        if let threads { c.threads = threads }
        if let loaderWorkers { c.loaderWorkers = loaderWorkers }
        if noLateralitySwap { c.swapLateralityOnFlip = false }
        if let imageWeights { c.imageWeights = imageWeights }
        if let textWeights { c.textWeights = textWeights }
        if let checkpointEvery { c.checkpointEvery = checkpointEvery }
        if let keepCheckpoints { c.keepCheckpoints = keepCheckpoints }
        if zero1 { c.zero1 = true }
        if let checkpointIo { c.checkpointIO = checkpointIo }
        if syncCheckpoint { c.asyncCheckpoint = false }
        if noOverlap { c.overlapCommunication = false }
        return c
    }

    func run() throws { try withCommunicator("train", train) }

    func train(_ communicator: Communicator) throws {
        let config = try resolved()
        Parallel.setThreads(config.threads)
        let root = communicator.isRoot
        if root { try FileManager.default.createDirectory(atPath: runDir, withIntermediateDirectories: true) }
        try communicator.barrier()
        // A progress line on a terminal; plain log lines otherwise and under mpirun (which forwards output).
        let tty = isatty(STDOUT_FILENO) != 0 && !MPICommunicator.launchedByMPI
        let trainer = try Trainer(config: config, dataPath: data, runDirectory: runDir, vocabularyPath: vocab, communicator: communicator) { line in
            if root { print(line) }
        }
        if resume, let from = try trainer.resume(fallback: resumeFallback) {
            if root { print("resuming from \(from) at step \(trainer.startStep)") }
        }
        if root {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try Files.writeAtomically(encoder.encode(trainer.config), to: "\(runDir)/config.json")
            // The run's vocabulary beside its checkpoints: evaluation and `convirt embed` tokenize with it.
            let vocabulary = try Files.read(trainer.vocabularyPath)
            if (try? Files.read("\(runDir)/vocab.txt")) != vocabulary { try Files.writeAtomically(vocabulary, to: "\(runDir)/vocab.txt") }
            print("convirt train: preset \(config.preset), \(communicator.size) rank(s), global batch \(config.globalBatch), \(trainer.totalSteps) steps, "
                  + "\(trainer.model.layout.trainableCount) trainable parameters, run directory \(runDir)")
            print("kernels: OpenBLAS core \(BLASCore.current) (\(BLASCore.origin)), \(config.threads) thread(s) per rank")
        }
        let start = Date()
        let every = max(1, trainer.totalSteps / 20)
        let rows = try trainer.run { row, total in
            guard root else { return }
            let elapsed = Date().timeIntervalSince(start)
            let eta = elapsed / Double(max(1, row.step - trainer.startStep)) * Double(total - row.step)
            let line = String(format: "step %d/%d  loss %.4f  (v->u %.4f, u->v %.4f)  lr %.2e  %.1f pairs/s  ETA %.0fs%@", row.step, total, row.loss,
                              row.lossV2U, row.lossU2V, row.lr, row.pairsPerSecond, eta, row.valLoss.map { String(format: "  val %.4f", $0) } ?? "")
            if tty { FileHandle.standardOutput.write(Data(("\r" + line + (row.step == total ? "\n" : "")).utf8)) }
            else if row.step % every == 0 || row.step == total || row.valLoss != nil { print(line) }
        }
        if root {
            let seconds = Date().timeIntervalSince(start)
            let last = rows.last
            print(String(format: "done: %d steps in %.1f s, final loss %.4f%@, metrics in %@/metrics.jsonl", rows.count, seconds, last?.loss ?? .nan,
                         (rows.last { $0.valLoss != nil }?.valLoss).map { String(format: ", validation loss %.4f", $0) } ?? "", runDir))
            if retrievalEval > 0 {
                let result = try HeldOutRetrieval.evaluate(model: trainer.model, dataset: trainer.dataset, tokenizer: trainer.tokenizer,
                                                           maxStudies: retrievalEval, maxTokens: config.maxTokens)
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                try Files.writeAtomically(encoder.encode(result), to: "\(runDir)/heldout_retrieval.json")
                print(String(format: "held-out image-to-text retrieval (%d test studies, %d sentences): precision@10 %.3f (chance %.3f, best possible %.3f)",
                             result.studies, result.sentences, result.precisionAt10, result.chanceAt10, result.maximumAt10))
            }
        }
    }
}
