// Pretraining and fine-tuning on 1 to 4 in-process ranks: world-size invariance, ZeRO-1 against
// replicated Adam, fine-tuning on 1 and 2 ranks.

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtEvaluation
import ConvirtModels
import ConvirtTraining
import Foundation
import Testing

/// A small synthetic MIMIC-CXR, prepared once per test process (120 studies at 64 px).
final class TinyDataset: @unchecked Sendable {
    static let shared = TinyDataset()
    private let lock = NSLock()
    private var made: String?
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-inprocess-\(getpid())").path

    func prepared() throws -> String {
        lock.lock(); defer { lock.unlock() }
        if let made { return made }
        var synth = SynthMIMICOptions()
        synth.studies = 120
        synth.imageSize = 64
        synth.seed = 2
        _ = try SynthMIMIC.write(to: "\(root)/mimic", options: synth)
        _ = try MIMICPrepare.run(PrepareOptions(root: "\(root)/mimic", out: "\(root)/prepared"))
        made = "\(root)/prepared"
        return made!
    }

    func runDirectory(_ name: String) -> String {
        let dir = "\(root)/runs/\(name)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }
}

/// What a training run gives back: per-step losses and gradient norms, and the final parameters.
struct RunOutcome: Sendable {
    var losses: [Double]
    var gradNorms: [Double]
    var validation: [Double]
    var parameters: [Float]
}

/// Trains the tiny preset on `worldSize` in-process ranks; rank 0's outcome.
func train(worldSize: Int, globalBatch: Int, steps: Int, zero1: Bool = false, overlap: Bool = true) throws -> RunOutcome {
    let data = try TinyDataset.shared.prepared()
    let runDir = TinyDataset.shared.runDirectory("w\(worldSize)")
    defer { try? FileManager.default.removeItem(atPath: runDir) }
    var config = TrainConfig.preset(.tiny)
    config.globalBatch = globalBatch
    config.steps = steps
    config.valEvery = steps
    config.zero1 = zero1
    config.overlapCommunication = overlap
    config.asyncCheckpoint = false
    let config_ = config
    let outcomes = try InProcessGroup.run(size: worldSize) { comm -> RunOutcome in
        let trainer = try Trainer(config: config_, dataPath: data, runDirectory: runDir, vocabularyPath: nil, communicator: comm) { _ in }
        let rows = try trainer.run()
        return RunOutcome(losses: rows.map(\.loss), gradNorms: rows.map(\.gradNorm), validation: rows.compactMap(\.valLoss),
                          parameters: Array(UnsafeBufferPointer(start: trainer.model.arena.params, count: trainer.model.arena.count)))
    }
    return outcomes[0]
}

@Suite("Training on in-process ranks", .serialized)
struct InProcessTrainingTests {
    // Six steps: from about the seventh on, the tiny model's float rounding starts to decide ReLU and
    // max-pool ties differently on different world sizes (mpirun shows the same: -np 3 at global batch
    // 12 drifts to 1e-4 by step 8), so longer runs test chaos rather than the engine.
    static let steps = 6, globalBatch = 12

    @Test("W ranks train as one: per-step losses of W = 2, 3, 4 equal W = 1's within 1e-4", arguments: [2, 3, 4])
    func worldSizeInvariance(worldSize: Int) throws {
        let one = try train(worldSize: 1, globalBatch: Self.globalBatch, steps: Self.steps)
        let many = try train(worldSize: worldSize, globalBatch: Self.globalBatch, steps: Self.steps)
        #expect(one.losses.count == Self.steps && many.losses.count == Self.steps)
        #expect(agree(one.losses, many.losses, within: 1e-4), "W=1 \(one.losses)\nW=\(worldSize) \(many.losses)")
        // The gradients summed over ranks are the single process's (before rounding has compounded). One
        // ReLU or max-pool tie decided the other way shows as a jump of about 2e-3 in one step's gradient
        // norm while the losses stay within 1e-4: measured over seeds 1-6 at W = 2, such a jump came at
        // step 6 of seed 1 with libm's erf in GELU and at none with VectorMath's (all within 1.6e-6), and
        // at step 3 of this preset's seed with VectorMath's. So the first two steps are held to 1e-5.
        #expect(agree(Array(one.gradNorms.prefix(2)), Array(many.gradNorms.prefix(2)), within: 1e-5),
                "gradient norms: \(one.gradNorms) vs \(many.gradNorms)")
        // The validate split holds 6 pairs; validation uses the largest multiple of W of them, so it is
        // the same loss where W divides 6.
        if 6 % worldSize == 0 {
            #expect(one.validation.count == 1 && agree(one.validation, many.validation, within: 1e-4), "validation: \(one.validation) vs \(many.validation)")
        }
    }

    @Test("ZeRO-1 on 2 and 3 ranks trains as replicated Adam", arguments: [2, 3])
    func zero1EqualsReplicated(worldSize: Int) throws {
        let replicated = try train(worldSize: worldSize, globalBatch: Self.globalBatch, steps: Self.steps)
        let sharded = try train(worldSize: worldSize, globalBatch: Self.globalBatch, steps: Self.steps, zero1: true)
        #expect(replicated.losses == sharded.losses, "\(replicated.losses) vs \(sharded.losses)")
        #expect(replicated.parameters == sharded.parameters, "final parameters differ")
    }

    @Test("gradient buckets overlapped with backward give the parameters of an all-reduce after backward")
    func overlapChangesNothing() throws {
        let overlapped = try train(worldSize: 2, globalBatch: 8, steps: 4)
        let after = try train(worldSize: 2, globalBatch: 8, steps: 4, overlap: false)
        #expect(overlapped.losses == after.losses)
        #expect(overlapped.parameters == after.parameters)
    }
}

@Suite("Fine-tuning on in-process ranks", .serialized)
struct InProcessFineTuneTests {
    /// Synthetic CheXpert, small, written once.
    static func chexpert() throws -> String {
        let dir = "\(TinyDataset.shared.root)/chexpert"
        if FileManager.default.fileExists(atPath: "\(dir)/.complete") { return dir }
        var o = SynthDownstreamOptions()
        o.count = 96
        o.imageSize = 64
        _ = try SynthDownstream.write(.chexpert, to: dir, options: o)
        _ = FileManager.default.createFile(atPath: "\(dir)/.complete", contents: nil)
        return dir
    }

    /// The test AUC of each run and the validation loss after each epoch (rank 0's log, 4 decimals).
    static func fineTune(worldSize: Int, zero1: Bool = false) throws -> (auc: [Double], validation: [Double]) {
        let root = try chexpert()
        let data = try DownstreamReader.load(.chexpert, root: root, options: DownstreamOptions())
        var options = ClassificationOptions()
        options.evaluationProtocol = .finetune
        options.runs = 1
        options.imageSize = 64
        options.batch = 8
        options.maxEpochs = 2
        options.headSteps = 5
        options.verbose = true
        options.featureBatch = 8
        options.zero1 = zero1
        let architecture = ResNetConfig(layers: [1, 1, 1, 1], width: 4, block: .bottleneck, imageSize: 64)
        let options_ = options
        let results = try InProcessGroup.run(size: worldSize) { comm -> (auc: [Double], validation: [Double]) in
            let lines = Lines()
            let auc = try ClassificationEvaluation(data: data, source: .random(architecture), options: options_, communicator: comm) {
                lines.append($0)
            }.run().runs
            let validation = lines.all.compactMap { line -> Double? in
                guard let r = line.range(of: "validation loss ") else { return nil }
                return Double(line[r.upperBound...].prefix { !$0.isWhitespace })
            }
            return (auc, validation)
        }
        #expect(results.allSatisfy { $0.auc == results[0].auc }, "every rank returns the same result")
        return results[0]
    }

    /// The fine-tuned encoder's validation losses on 1 and 2 ranks agree, and ZeRO-1 gives replicated
    /// Adam's AUC exactly. Adam turns rounding-level differences of tiny gradients into whole steps, so
    /// 1 and 2 ranks part slowly, by how much depending on the rounding of the kernels: measured on a
    /// 2-core Xeon (AVX-512) with the head's products on OpenBLAS, equal after the first epoch (to the
    /// log's 4 decimals) and 9e-4 apart (2e-3 relative) after the second; on a 2-core AMD EPYC with them
    /// on oneDNN's fp32 matmul (every product's rows bitwise as in fewer rows, its weight gradients'
    /// sums as close to exact as sgemm's: FP32MatmulTests), 4e-4 and 2.9e-3 (7e-3 relative); with the
    /// convolutions forced to oneDNN's AVX2 kernels, 4e-4 after the first. Held to 1e-3 and 1.5e-2
    /// relative (the pretraining world-size tests hold the step engine to 1e-4 without this chaos).
    /// The AUCs are not compared: this random-init encoder of width 4 scores the test images within
    /// rounding of one another (AUC about 0.44), so summation order alone reorders them (the two AUCs
    /// came 1.1e-2 apart there).
    @Test("fine-tuning on 1 and 2 ranks gives the same validation losses, and 2 with ZeRO-1 the same AUC as 2 without")
    func fineTuneWorldSize() throws {
        let one = try Self.fineTune(worldSize: 1)
        let two = try Self.fineTune(worldSize: 2)
        let zero = try Self.fineTune(worldSize: 2, zero1: true)
        #expect(one.validation.count == 2 && two.validation.count == 2, "\(one.validation) \(two.validation)")
        if one.validation.count == 2 && two.validation.count == 2 {
            #expect(abs(one.validation[0] - two.validation[0]) <= 1e-3, "epoch 1: \(one.validation) vs \(two.validation)")
            #expect(abs(one.validation[1] - two.validation[1]) <= 1.5e-2 * one.validation[1], "epoch 2: \(one.validation) vs \(two.validation)")
        }
        #expect(two.auc == zero.auc, "\(two.auc) vs ZeRO-1 \(zero.auc)")
    }
}

/// Log lines collected from a callback (rank 0 logs from its own thread).
final class Lines: @unchecked Sendable {
    private var lines: [String] = []
    private let lock = NSLock()
    func append(_ line: String) { lock.lock(); lines.append(line); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}
