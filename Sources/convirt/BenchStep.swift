// `convirt bench step`: forward + backward of a whole ConVIRT model on random data, with a time breakdown.

import ArgumentParser
import ConvirtCore
import ConvirtModels
import ConvirtTraining
import Foundation

struct BenchStep: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "step", abstract: "Time forward+backward of a preset's model (tools/bench_step.py runs the same step in PyTorch).")

    @Option(help: "tiny, demo or paper.")
    var preset = Preset.paper

    @Option(parsing: .unconditional, help: "Pairs per step.")
    var batch = 8

    @Option(parsing: .unconditional, help: "Tokens per report (all valid).")
    var tokens = 128

    @Option(parsing: .unconditional, help: "Threads (products and loops).")
    var threads = 2

    @Option(parsing: .unconditional, help: "Timed steps after one warm-up step.")
    var steps = 3

    @Option(help: "fp32, bf16 (mixed, as PyTorch's CPU autocast) or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16).")
    var precision = PrecisionChoice.auto

    @Option(parsing: .unconditional, help: "Samples per gradient piece in bf16 (a divisor of --batch; default: what train uses with the preset's global batch, where it divides --batch).")
    var gradientPiece: Int?

    @Flag(help: "Also print each encoder's activation table: every room of its arena, its size and the layers that use it.")
    var activationTables = false

    func run() throws {
        Parallel.setThreads(threads)
        if let warning = Parallel.affinityWarning { FileHandle.standardError.write(Data("convirt bench step: \(warning)\n".utf8)) }
        let config = ConVIRTConfig.preset(preset)
        let model = try ConVIRTModel(config: config)
        model.initialize(seed: 1)
        let size = config.image.imageSize, d = config.projDim
        let stream = RandomStream(seed: 2)
        let images = (0..<(batch * 3 * size * size)).map { stream.normal(at: UInt64($0)) }
        let ids = (0..<(batch * tokens)).map { Int32(1 + stream.integer(below: config.text.vocabSize - 1, at: UInt64($0))) }
        let mask = [Int32](repeating: 1, count: batch * tokens)
        var gradV = [Float](repeating: 0, count: batch * d), gradU = gradV
        let workspace = ConVIRTLoss.Workspace()
        print("convirt bench step: preset \(preset), batch \(batch), image \(size)x\(size), \(tokens) tokens, \(Parallel.threads) thread(s)")
        print("parameters: \(model.layout.totalCount) (trainable \(model.layout.trainableCount)); \(precision.describe())")
        // A rank's share of the preset's global batch in train: its pieces (the paper's 32 -> 4).
        let piece = gradientPiece ?? GradientPieces.fitting(globalBatch: TrainConfig.preset(preset).globalBatch, localBatch: batch)
        guard piece >= 1 && batch % piece == 0 else { throw ValidationError("--gradient-piece \(piece) does not divide --batch \(batch)") }
        if precision.resolved() == .bf16 { print("gradient pieces of \(piece) sample(s)") }
        var times: [[Double]] = []
        for step in 0...steps {
            let context = PassContext(training: true, stream: RandomStream(seed: 3, UInt64(step)), sampleIndices: (0..<batch).map { UInt64($0) },
                                      precision: precision.resolved(), gradientPiece: piece)
            var t = [Double]()
            var clock = DispatchTime.now().uptimeNanoseconds
            func lap() { let now = DispatchTime.now().uptimeNanoseconds; t.append(Double(now - clock) * 1e-9); clock = now }
            let v = try model.encodeImages(images, batch: batch, size: size, context: context); lap()
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: batch, tokens: tokens, context: context); lap()
            _ = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: batch, globalRows: batch, features: d, offset: 0,
                                            tau: config.tau, lambda: config.lambda, gradV: &gradV, gradU: &gradU, workspace: workspace)
            model.arena.zeroGrads()
            try model.backwardImages(gradEmbeddings: gradV, context: context); lap()
            try model.backwardTexts(gradEmbeddings: gradU, context: context); lap()
            if step > 0 { times.append(t) }
        }
        let mean = (0..<4).map { i in times.map { $0[i] }.reduce(0, +) / Double(times.count) }
        let total = mean.reduce(0, +)
        print(String(format: "image forward %.3f s, text forward %.3f s, image backward %.3f s, text backward %.3f s", mean[0], mean[1], mean[2], mean[3]))
        print(String(format: "forward+backward %.3f s per step = %.2f pairs/s (activations: image %.0f MB, text %.0f MB planned)", total,
                     Double(batch) / total, Double(model.image.activationBytes) / 1e6, Double(model.text.activationBytes) / 1e6))
        if activationTables {
            for (name, table) in [("image", model.image.activationTable), ("text", model.text.activationTable)] {
                print("\(name) encoder activation arena, \(table.count) rooms:")
                for line in table { print("  " + line) }
            }
        }
    }
}
