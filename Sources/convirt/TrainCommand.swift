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
    static let configuration = CommandConfiguration(commandName: "train", abstract: "ConVIRT pretraining (data-parallel under mpirun).",
                                                    discussion: presetTable)

    /// Each preset's defaults, for --help (every one of them is in `--print-config`): a table of the
    /// settings that differ between presets, columns as wide as their widest cell so that no value is
    /// cut, and one line for the settings every preset shares. It fits 80 columns, which --help wraps at.
    static var presetTable: String {
        let configs = Preset.allCases.map { ($0, TrainConfig.preset($0)) }
        let columns: [(String, (TrainConfig) -> String)] = [
            ("batch", { "\($0.globalBatch)" }),
            ("steps", { $0.steps.map(String.init) ?? "until \($0.maxChecks) val checks" }),
            ("lr", { String(format: "%g", $0.learningRate) }),
            ("schedule", { $0.schedule.rawValue }),
            ("threads", { "\($0.threads)" }),
            ("checkpoints", { $0.checkpointEvery.map { "every \($0)" } ?? "at the end" }),
            ("image px", { "\($0.model.image.imageSize)" }),
            ("BERT layers", { "\($0.model.text.numHiddenLayers)" }),
        ]
        var varying: [(String, [String])] = [("preset", configs.map { $0.0.rawValue })]
        var shared: [String] = []
        for (name, value) in columns {
            let cells = configs.map { value($0.1) }
            if Set(cells).count == 1 { shared.append("\(name) \(cells[0])") } else { varying.append((name, cells)) }
        }
        let widths = varying.map { column in max(column.0.count, column.1.map(\.count).max() ?? 0) }
        func row(_ cells: [String]) -> String {
            "  " + zip(cells, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
                .trimmingCharacters(in: .whitespaces) + "\n"
        }
        var out = "PRESET DEFAULTS (flags override them; `convirt train --preset P --print-config` prints all):\n"
        out += row(varying.map(\.0))
        for i in configs.indices { out += row(varying.map { $0.1[i] }) }
        if !shared.isEmpty { out += "  Every preset: " + shared.joined(separator: ", ") + ".\n" }
        return out
    }

    @Option(help: "A prepared dataset (convirt prepare mimic).") var data: String?
    @Option(help: "Run directory (config.json, metrics.jsonl, results).") var runDir: String?
    @Option(help: "tiny, demo or paper.") var preset = Preset.demo
    // Numbers parse unconditionally, so that `--steps -5` is refused as a negative number rather than
    // taken for a flag.
    @Option(parsing: .unconditional, help: "Pairs per step over all ranks (must divide by the number of ranks).") var globalBatch: Int?
    @Option(parsing: .unconditional, help: "Total steps of the run.") var steps: Int?
    @Option(parsing: .unconditional, help: "Epochs (when --steps is not given).") var epochs: Int?
    @Option(parsing: .unconditional, help: "Seed of every random draw.") var seed: UInt64?
    @Option(parsing: .unconditional, help: "Learning rate.") var lr: Double?
    @Option(parsing: .unconditional, help: "Adam weight decay (L2, as torch.optim.Adam).") var weightDecay: Double?
    @Option(help: "paper, cosine or constant.") var schedule: ScheduleKind?
    @Option(parsing: .unconditional, help: "Warmup steps (cosine schedule).") var warmupSteps: Int?
    @Option(parsing: .unconditional, help: "Validation loss every K steps.") var valEvery: Int?
    @Option(parsing: .unconditional, help: "Validation pairs.") var valSamples: Int?
    @Option(parsing: .unconditional, help: "Checks without improvement before the LR is halved (paper schedule).") var patience: Int?
    @Option(parsing: .unconditional, help: "Stop after this many validation checks (paper schedule).") var maxChecks: Int?
    @Flag(help: "BatchNorm with per-rank statistics instead of SyncBN.") var noSyncBn = false
    @Option(parsing: .unconditional, help: "Clip the global gradient norm.") var clipGradNorm: Double?
    @Option(parsing: .unconditional, help: "Maximum WordPiece tokens per sentence.") var maxTokens: Int?
    @Flag(inversion: .prefixedNo, help: "Lowercase and strip accents (uncased vocabulary; default: the preset's).") var lowercase: Bool?
    @Option(parsing: .unconditional, help: "Threads per rank (products and loops).") var threads: Int?
    @Option(help: ArgumentHelp("Precision of the convolutions and matrix products: fp32, bf16 (mixed precision as PyTorch's CPU autocast: "
                               + "bf16 products with fp32 accumulation, fp32 weights, gradients, Adam, norms, softmax and loss) or auto "
                               + "(bf16 where the CPU has AMX-BF16 or AVX512-BF16, else fp32; with --resume: the checkpoint's)."))
    var precision = PrecisionChoice.auto
    @Option(parsing: .unconditional, help: "Loader threads per rank.") var loaderWorkers: Int?
    @Flag(help: "Do not swap left/right in the sentence when the image is flipped (the paper's exact recipe).") var noLateralitySwap = false
    @Option(help: "torchvision ResNet weights (.safetensors; tools/convert_weights.py).") var imageWeights: String?
    @Option(help: "A Hugging Face BERT directory (config.json, vocab.txt, model.safetensors).") var textWeights: String?
    @Option(help: "vocab.txt (default: the text weights', else the dataset's).") var vocab: String?
    @Option(parsing: .unconditional, help: "Held-out studies for the image-to-text retrieval check at the end (0 = skip).") var retrievalEval = 200
    @Option(parsing: .unconditional, help: "Save a sharded checkpoint every K steps (always at the end).") var checkpointEvery: Int?
    @Option(parsing: .unconditional, help: "Checkpoints to keep.") var keepCheckpoints: Int?
    @Flag(help: "Continue from the newest complete checkpoint of the run directory (if there is one).") var resume = false
    @Flag(help: "With --resume: when the newest checkpoint is damaged, report it and resume from the previous complete one.")
    var resumeFallback = false
    @Flag(help: "With --resume: continue although settings that decide the trajectory (batch, seed, rate, schedule, ...) differ from the checkpoint's.")
    var allowConfigChange = false
    @Flag(help: "Remove the run that --run-dir holds (checkpoints, metrics, results) and start a new one.") var overwrite = false
    @Option(help: "parallel (every rank writes its shard; needs a shared filesystem) or gather (rank 0 receives and writes all shards).")
    var checkpointIo: CheckpointIO?
    @Flag(help: "Write checkpoints before training goes on (default: from a snapshot, in the background).") var syncCheckpoint = false
    @Flag(help: "ZeRO-1: shard the Adam state over the ranks (reduce-scatter gradients, update the own shard, all-gather parameters).")
    var zero1 = false
    @Flag(help: "All-reduce the gradients only after backward (no overlap; to measure what the overlap hides).") var noOverlap = false
    @Option(help: ArgumentHelp("How gradients are summed over ranks: auto (shared memory among the ranks of each machine, and MPI's all-reduce "
                               + "between machines where there are several, each with the same number of ranks; MPI's collectives otherwise), "
                               + "collectives, or shared-memory (an error where auto would take the collectives).",
                               valueName: "auto|collectives|shared-memory"))
    var gradientExchange: GradientExchange?
    @Option(parsing: .unconditional, help: ArgumentHelp("Exact accumulation (GradCache): each rank runs its rows of the global batch as K micro-batches; "
                                                        + "the loss still sees all --global-batch pairs as negatives.")) var accumSteps: Int?
    @Flag(help: "Write no TensorBoard event files (default: RUN/tensorboard/events.out.tfevents.*, rank 0).") var noTensorboard = false
    @Option(parsing: .unconditional, help: ArgumentHelp("bf16: samples per gradient piece, a divisor of each rank's micro-batch (default: 4, 2 or 1, the largest that "
                               + "every world size up to 8 cuts whole). Runs agree across world sizes at equal pieces."))
    var gradientPiece: Int?
    @Option(parsing: .unconditional, help: ArgumentHelp("Outlier guard: do not apply a step whose loss is more than Z standard deviations above the mean "
                                                        + "of the last --outlier-window applied steps (off by default, as the paper).")) var skipLossZ: Double?
    @Option(parsing: .unconditional, help: "Outlier guard: the same for the gradient norm.") var skipGradZ: Double?
    @Option(parsing: .unconditional, help: "Outlier guard: applied steps the mean and deviation are taken over (default 128; none is skipped before).")
    var outlierWindow: Int?
    @Option(parsing: .unconditional, help: "Outlier guard: skipped steps in a row that stop the run (default 5).") var maxConsecutiveSkips: Int?
    @Option(parsing: .unconditional, help: ArgumentHelp("A rank's peak TFLOP/s (its cores' share of the CPU's data-sheet peak, or a measured product rate): "
                                                        + "metrics.jsonl's peak_share is the achieved TFLOP/s over it.")) var peakTflops: Double?
    @Flag(help: ArgumentHelp("False negatives: leave out of each pair's negatives the pairs of the global batch whose sentence has the same "
                             + "token ids (a report shared by a study's images, or a common normal report); off by default, as the paper."))
    var excludeIdenticalTexts = false
    @Flag(help: "Print the resolved configuration (the preset's defaults and the flags given) as JSON and exit.") var printConfig = false
    @OptionGroup var collective: CollectiveOptions

    func validate() throws {
        if steps != nil && epochs != nil { throw ValidationError("give --steps or --epochs, not both") }
        if (outlierWindow != nil || maxConsecutiveSkips != nil) && skipLossZ == nil && skipGradZ == nil {
            throw ValidationError("--outlier-window and --max-consecutive-skips set the outlier guard, which --skip-loss-z or --skip-grad-z turns on")
        }
        if !printConfig {
            if data == nil { throw ValidationError("Missing expected argument '--data <data>'") }
            if runDir == nil { throw ValidationError("Missing expected argument '--run-dir <run-dir>'") }
        }
    }

    /// `precision`: what --precision resolved to (rank 0's choice under MPI); nil = resolve it here.
    func resolved(precision chosen: Precision? = nil) throws -> TrainConfig {
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
        if let gradientExchange { c.gradientExchange = gradientExchange == .auto ? nil : gradientExchange }
        if noTensorboard { c.tensorboard = false }
        if let accumSteps { c.accumSteps = accumSteps == 1 ? nil : accumSteps }
        c.precision = chosen ?? precision.resolved()
        if let gradientPiece { c.gradientPiece = gradientPiece }
        if let peakTflops { c.peakTFLOPs = peakTflops }
        if excludeIdenticalTexts { c.excludeIdenticalTexts = true }
        if skipLossZ != nil || skipGradZ != nil {
            c.outlierGuard = OutlierGuardConfig(lossZ: skipLossZ, gradZ: skipGradZ, window: outlierWindow ?? OutlierGuardConfig.defaultWindow,
                                                maxConsecutive: maxConsecutiveSkips ?? OutlierGuardConfig.defaultMaxConsecutive)
        }
        // The pieces a bf16 run uses, recorded in config.json.
        if c.productPrecision == .bf16 && c.gradientPiece == nil { c.gradientPiece = c.gradientPieceSamples }
        return c
    }

    func run() throws {
        if printConfig {
            print(String(decoding: try prettyJSON(resolved()), as: UTF8.self))
            return
        }
        try withCommunicator("train", collective, train)
    }

    /// The files a run leaves in its directory (what --overwrite removes).
    static let runFiles = ["checkpoints", "metrics.jsonl", "config.json", "vocab.txt", "heldout_retrieval.json", "heldout_retrieval.manifest.json",
                           "report.html", "eval", "tensorboard"]

    /// The files of `runDir` that a run left: `runFiles`, and the collective-timeout reports (one per rank).
    static func heldFiles(_ runDir: String) -> [String] {
        runFiles.filter { FileManager.default.fileExists(atPath: "\(runDir)/\($0)") } + CollectiveWatchdog.reportFiles(in: runDir)
    }

    /// Refuses a run directory that is a file, or that already holds a run unless --resume (continue it)
    /// or --overwrite (remove it first). Changes nothing.
    func checkRunDirectory(_ runDir: String) throws {
        let fm = FileManager.default
        var isDirectory: ObjCBool = false
        if fm.fileExists(atPath: runDir, isDirectory: &isDirectory), !isDirectory.boolValue {
            throw ConvirtError("--run-dir \(runDir) is a file, not a directory")
        }
        let held = Self.heldFiles(runDir)
        if !held.isEmpty && !resume && !overwrite {
            throw ConvirtError("\(runDir) already holds a run (\(held.joined(separator: ", "))): give --resume to continue it, "
                               + "--overwrite to replace it, or a new --run-dir")
        }
    }

    /// Creates the run directory (after every check passed), removing the old run first with --overwrite.
    func createRunDirectory(_ runDir: String) throws {
        let fm = FileManager.default
        let held = Self.heldFiles(runDir)
        if !held.isEmpty && overwrite {
            for name in held { try? fm.removeItem(atPath: "\(runDir)/\(name)") }
            print("--overwrite: removed the run in \(runDir) (\(held.joined(separator: ", ")))")
        }
        do { try fm.createDirectory(atPath: runDir, withIntermediateDirectories: true) } catch {
            throw ConvirtError("cannot create --run-dir \(runDir): \((error as NSError).localizedFailureReason ?? error.localizedDescription)")
        }
    }

    func train(_ communicator: Communicator) throws {
        // From here on SIGUSR1 asks the run to stop at its next step (before its first, while it starts).
        StopRequest.install()
        let data = data!, runDir = runDir!
        let root = communicator.isRoot
        // `auto` follows rank 0's CPU, so that ranks on different CPUs cannot train in different precisions.
        var chosen: UInt8 = precision.resolved() == .bf16 ? 1 : 0
        if communicator.size > 1 { try withUnsafeMutableBytes(of: &chosen) { try communicator.broadcast($0, root: 0) } }
        // Everything that can be checked is checked on every rank before anything is created: the
        // flags, the dataset, the vocabulary, the weights, the run directory. A failure is printed once.
        let trainer = try agreeOnStart("train", communicator) { () throws -> Trainer in
            let config = try resolved(precision: chosen == 1 ? .bf16 : .fp32)
            try config.validate(worldSize: communicator.size)
            if !FileManager.default.fileExists(atPath: data) { throw ConvirtError("--data \(data): no such directory") }
            if root { try checkRunDirectory(runDir) }
            Parallel.setThreads(config.threads)
            return try Trainer(config: config, dataPath: data, runDirectory: runDir, vocabularyPath: vocab, communicator: communicator) { line in
                if root { print(line) }
            }
        }
        try agreeOnStart("train", communicator) { if root { try createRunDirectory(runDir) } }
        communicator.watchdog.reportDirectory = runDir
        // A progress line on a terminal; plain log lines otherwise and under mpirun (which forwards output).
        let tty = isatty(STDOUT_FILENO) != 0 && !MPICommunicator.launchedByMPI
        if resume {
            if let from = try trainer.resume(fallback: resumeFallback, allowConfigChange: allowConfigChange, adoptPrecision: precision == .auto) {
                if root { print("resuming from \(from) at step \(trainer.startStep)") }
            } else if root {
                print("no checkpoint in \(runDir): starting a new run")
            }
            if trainer.startStep >= trainer.totalSteps {
                if root { print("\(runDir) is already at step \(trainer.startStep) of \(trainer.totalSteps): nothing to do (give a larger --steps to go on)") }
                return
            }
        }
        let config = trainer.config
        trainer.model.precision = config.productPrecision
        if root {
            try Files.writeAtomically(configRecord(trainer.config), to: "\(runDir)/config.json")
            // The run's vocabulary beside its checkpoints: evaluation and `convirt embed` tokenize with it.
            let vocabulary = try Files.read(trainer.vocabularyPath)
            if (try? Files.read("\(runDir)/vocab.txt")) != vocabulary { try Files.writeAtomically(vocabulary, to: "\(runDir)/vocab.txt") }
            print("convirt train: preset \(config.preset), \(communicator.size) rank(s), global batch \(config.globalBatch), \(trainer.totalSteps) steps, "
                  + "\(trainer.model.layout.trainableCount) trainable parameters, run directory \(runDir)")
            if communicator.size > 1 { print("gradients summed over ranks by \(trainer.sync.exchangeDescription)") }
            print("kernels: OpenBLAS core \(BLASCore.current) (\(BLASCore.origin)), oneDNN \(DNNL.version) ISA \(DNNL.isa) "
                  + "(OpenMP wait policy \(BLASCore.openMPWaitPolicy)), \(config.threads) thread(s) per rank")
            if let warning = Parallel.affinityWarning { FileHandle.standardError.write(Data("convirt train: \(warning)\n".utf8)) }
            let precisionLine = precision == .auto && resume && config.productPrecision != precision.resolved()
                ? "precision \(config.productPrecision.rawValue) (auto: the checkpoint's)" : precision.describe()
            print(precisionLine + (config.productPrecision == .bf16 ? ", gradient pieces of \(config.gradientPieceSamples) sample(s)" : ""))
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
        if trainer.stoppedOnRequest {
            if root {
                let last = rows.last?.step ?? trainer.startStep
                print("stopped on \(StopRequest.name) " + (last > 0 ? "after step \(last) of \(trainer.totalSteps), its checkpoint written" : "before its first step")
                      + ": the same command with --resume goes on (launch.sh adds it); exit status \(StopRequest.exitStatus)")
            }
            throw StoppedOnRequest()
        }
        if root {
            let seconds = Date().timeIntervalSince(start)
            let last = rows.last
            print(String(format: "done: %d steps in %.1f s, final loss %.4f%@, metrics in %@/metrics.jsonl", rows.count, seconds, last?.loss ?? .nan,
                         (rows.last { $0.valLoss != nil }?.valLoss).map { String(format: ", validation loss %.4f", $0) } ?? "", runDir))
            if retrievalEval > 0 {
                let result = try HeldOutRetrieval.evaluate(model: trainer.model, dataset: trainer.dataset, tokenizer: trainer.tokenizer,
                                                           maxStudies: retrievalEval, maxTokens: config.maxTokens)
                try Files.writeAtomically(prettyJSON(result), to: "\(runDir)/heldout_retrieval.json")
                // What `eval heldout --manifest` reruns: the studies, the run's last checkpoint.
                try EvaluationManifest(command: "eval heldout", settings: ["split": "test", "studies": "\(retrievalEval)"],
                                       splits: heldOutSplits(trainer.dataset, split: "test", studies: retrievalEval),
                                       checkpoint: try checkpointPin(Checkpoints.resolve(runDir)), program: "convirt \(convirtVersion)",
                                       precision: config.productPrecision.rawValue)
                    .write(to: EvaluationManifest.path(forResults: "\(runDir)/heldout_retrieval.json"))
                try trainer.tensorboard?.scalars(result.tensorBoardScalars, step: trainer.totalSteps)
                print(result.summary)
            }
        }
    }
}

/// config.json: the resolved configuration, and the kernel routes that computed the run (`Backend`).
func configRecord(_ config: TrainConfig) throws -> Data {
    struct Record: Encodable {
        enum Key: String, CodingKey { case backend }
        let config: TrainConfig
        func encode(to encoder: Encoder) throws {
            try config.encode(to: encoder)
            var c = encoder.container(keyedBy: Key.self)
            try c.encode(Backend.current.record, forKey: .backend)
        }
    }
    return try prettyJSON(Record(config: config))
}
