// `convirt bench checkpoint`: save and load throughput of a preset's arena (parameters and Adam moments
// after real steps), compressed size with and without byte shuffling, and the time the training thread
// is held by an asynchronous save (the snapshot) against a synchronous one.

import ArgumentParser
import ConvirtCore
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation

struct BenchCheckpoint: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "checkpoint", abstract: "Checkpoint save/load MB/s, compression ratios and the training stall.")

    @Option(help: "tiny, demo or paper.") var preset = Preset.paper
    @Option(help: "Directory for the checkpoints (removed afterwards); default: a temporary one.") var dir: String?
    @Option(parsing: .unconditional, help: "Threads for the forward/backward that produces real gradients.") var threads = 2

    func run() throws {
        Parallel.setThreads(threads)
        var config = TrainConfig.preset(preset)
        config.steps = 2
        let model = try ConVIRTModel(config: config.model)
        model.initialize(seed: 1)
        let arena = model.arena
        // Real gradients of one step (batch 2), then two Adam steps: the moments look like a run's.
        let batch = 2, size = config.model.image.imageSize, tokens = 32, d = config.model.projDim
        let stream = RandomStream(seed: 2)
        let images = (0..<(batch * 3 * size * size)).map { stream.normal(at: UInt64($0)) }
        let ids = (0..<(batch * tokens)).map { Int32(1 + stream.integer(below: config.model.text.vocabSize - 1, at: UInt64($0 + 1 << 40))) }
        let mask = [Int32](repeating: 1, count: batch * tokens)
        var gradV = [Float](repeating: 0, count: batch * d), gradU = gradV
        let context = PassContext(training: true, stream: RandomStream(seed: 3), sampleIndices: (0..<batch).map { UInt64($0) })
        let v = try model.encodeImages(images, batch: batch, size: size, context: context)
        let u = try model.encodeTexts(ids: ids, mask: mask, batch: batch, tokens: tokens, context: context)
        _ = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: batch, globalRows: batch, features: d, offset: 0,
                                        tau: config.model.tau, lambda: config.model.lambda, gradV: &gradV, gradU: &gradU, workspace: .init())
        arena.zeroGrads()
        try model.backwardImages(gradEmbeddings: gradV, context: context)
        try model.backwardTexts(gradEmbeddings: gradU, context: context)
        withExtendedLifetime(images) {}  // backward reads the input images (conv1's weight gradient)
        for step in 1...2 { Adam.step(arena, step: step, config: AdamConfig(learningRate: 1e-4, weightDecay: 1e-6, decoupled: false)) }

        let root = dir ?? FileManager.default.temporaryDirectory.appendingPathComponent("convirt-bench-checkpoint-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let communicator = SingleProcessCommunicator()
        let raw = Double(arena.count * 12)
        print("convirt bench checkpoint: preset \(preset), arena \(arena.count) floats x 3 (parameters, Adam m, Adam v) = \(String(format: "%.1f", raw / 1e6)) MB")

        // Compressed size with and without byte shuffling (zstd level 3), over the whole arena.
        var plain = 0
        let moments = arena.moments(at: 0)
        for buffer in [arena.params, UnsafePointer(moments.m), UnsafePointer(moments.v)] {
            plain += try Zstd.compress(UnsafeRawBufferPointer(start: buffer, count: arena.count * 4), level: 3).count
        }

        func state(_ step: Int) -> CheckpointManifest.State {
            .init(step: step, epoch: 0, samplesSeen: 0, learningRate: 1e-4, bestValidation: nil, checksWithoutImprovement: 0, checks: 0)
        }
        // Synchronous save: the training thread waits for shuffle, compression, write and fsync.
        let sync = try CheckpointWriter(communicator: communicator, runDirectory: "\(root)/sync", asynchronous: false, keep: 1)
        var clock = DispatchTime.now().uptimeNanoseconds
        func lap() -> Double { let now = DispatchTime.now().uptimeNanoseconds; defer { clock = now }; return Double(now - clock) * 1e-9 }
        _ = lap()
        try sync.save(arena: arena, state: state(1), config: config)
        try sync.commit()
        let syncSeconds = lap()
        let directory = Checkpoints.latest(runDirectory: "\(root)/sync")!
        let compressed = try Checkpoints.manifest(directory).shards.reduce(0) { $0 + $1.bytes }
        // Asynchronous save: the training thread is held for the snapshot; the rest runs beside it.
        let async = try CheckpointWriter(communicator: communicator, runDirectory: "\(root)/async", asynchronous: true, keep: 1)
        async.reserve(arena: arena)  // as the trainer does before its first step
        _ = lap()
        try async.save(arena: arena, state: state(1), config: config)
        let snapshotSeconds = lap()
        try async.commit()
        let backgroundSeconds = lap()
        // The second save also reuses the byte-plane buffer of the background thread.
        try async.save(arena: arena, state: state(2), config: config)
        let snapshotAgain = lap()
        try async.commit()
        let backgroundAgain = lap()
        // Load: read, check and decompress every shard into the arena.
        _ = try Checkpoints.restore(directory, into: arena)
        let loadSeconds = lap()

        print(String(format: "compressed: %.1f MB = %.3f of raw with byte shuffling; %.1f MB = %.3f without (shuffling saves %.1f%%)",
                     Double(compressed) / 1e6, Double(compressed) / raw, Double(plain) / 1e6, Double(plain) / raw,
                     100 * (1 - Double(compressed) / Double(plain))))
        print(String(format: "save (shuffle + zstd + write + fsync, one thread): %.2f s = %.0f MB/s of arena", syncSeconds, raw / 1e6 / syncSeconds))
        print(String(format: "load (read + checksums + decompress + unshuffle): %.2f s = %.0f MB/s of arena", loadSeconds, raw / 1e6 / loadSeconds))
        print(String(format: "training stall per checkpoint: %.3f s asynchronous (the snapshot copy; %.3f s for the first save) "
                     + "vs %.2f s synchronous; the background write took %.2f s (first: %.2f s)",
                     snapshotAgain, snapshotSeconds, syncSeconds, backgroundAgain, backgroundSeconds))
    }
}
