// The step engine without mpirun: W ranks as threads of this process (InProcessCommunicator). The
// mpirun tests in ConvirtCLITests stay as integration tests of the MPI path.

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtEvaluation
import ConvirtModels
import ConvirtTraining
import Foundation
import Testing

/// Relative agreement of two runs' numbers.
func agree(_ a: [Double], _ b: [Double], within tolerance: Double) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= tolerance * max(abs($0), 1e-12) }
}

@Suite("In-process communicator")
struct CollectiveTests {
    @Test("every collective of 3 in-process ranks computes its definition")
    func collectives() throws {
        let results = try InProcessGroup.run(size: 3) { comm -> [String] in
            let r = comm.rank
            var failures: [String] = []
            var sum: [Float] = [Float(r), 1, Float(10 * r)]
            try sum.withUnsafeMutableBufferPointer { try comm.allReduceSum($0) }
            if sum != [3, 3, 30] { failures.append("allReduce float \(sum)") }
            var doubles: [Double] = [Double(r) + 0.5]
            try doubles.withUnsafeMutableBufferPointer { try comm.allReduceSum($0) }
            if doubles != [4.5] { failures.append("allReduce double \(doubles)") }
            let mine: [Float] = [Float(r), Float(r) + 0.25]
            var gathered = [Float](repeating: -1, count: 6)
            try mine.withUnsafeBufferPointer { m in try gathered.withUnsafeMutableBufferPointer { try comm.allGather(m, into: $0) } }
            if gathered != [0, 0.25, 1, 1.25, 2, 2.25] { failures.append("allGather \(gathered)") }
            let full: [Float] = (0..<6).map { Float($0 + r) }
            var block = [Float](repeating: 0, count: 2)
            try full.withUnsafeBufferPointer { f in try block.withUnsafeMutableBufferPointer { try comm.reduceScatterSum(f, into: $0) } }
            let expected: [Float] = [Float(3 * (2 * r) + 3), Float(3 * (2 * r + 1) + 3)]
            if block != expected { failures.append("reduceScatter \(block) != \(expected)") }
            let counts = [1, 3, 2]
            var part = [Float](repeating: 0, count: counts[r])
            try full.withUnsafeBufferPointer { f in try part.withUnsafeMutableBufferPointer { try comm.reduceScatterSum(f, counts: counts, into: $0) } }
            let start = counts[..<r].reduce(0, +)
            if part != (start..<(start + counts[r])).map({ Float(3 * $0 + 3) }) { failures.append("reduceScatter counts \(part)") }
            var inPlace = [Float](repeating: Float(-1), count: 6)
            for i in start..<(start + counts[r]) { inPlace[i] = Float(100 * r + i) }
            try inPlace.withUnsafeMutableBufferPointer { try comm.allGatherInPlace($0, counts: counts) }
            if inPlace != [0, 101, 102, 103, 204, 205] { failures.append("allGatherInPlace \(inPlace)") }
            var bytes: [UInt8] = r == 1 ? [7, 8, 9] : [0, 0, 0]
            try bytes.withUnsafeMutableBytes { try comm.broadcast($0, root: 1) }
            if bytes != [7, 8, 9] { failures.append("broadcast \(bytes)") }
            let all = try comm.gather([UInt8(r), UInt8(r)], root: 0)
            if r == 0 && all != [0, 0, 1, 1, 2, 2] { failures.append("gather \(all)") }
            if r != 0 && !all.isEmpty { failures.append("gather off root \(all)") }
            if r == 0 {
                try [UInt8](arrayLiteral: 1, 2, 3, 4).withUnsafeBytes { try comm.send($0, to: 2) }
            } else if r == 2 {
                var received = [UInt8](repeating: 0, count: 4)
                try received.withUnsafeMutableBytes { try comm.receive(into: $0, from: 0) }
                if received != [1, 2, 3, 4] { failures.append("send/receive \(received)") }
            }
            try comm.barrier()
            return failures
        }
        let failures = results.flatMap { $0 }
        #expect(failures.isEmpty, "\(failures)")
    }

    @Test("a rank that throws releases the others from their collective and its error is rethrown")
    func failingRank() {
        #expect(throws: ConvirtError.self) {
            _ = try InProcessGroup.run(size: 2) { comm -> Int in
                if comm.rank == 1 { throw ConvirtError("rank 1 gives up") }
                var x: [Float] = [1]
                try x.withUnsafeMutableBufferPointer { try comm.allReduceSum($0) }
                return 0
            }
        }
    }
}

@Suite("SyncBN")
struct SyncBatchNormTests {
    /// BatchNorm over a batch of 6 split over W ranks (SyncBN) equals BatchNorm of the whole batch in one
    /// process: outputs, running statistics, input gradients, and the summed gamma/beta gradients.
    @Test("SyncBN statistics over W ranks equal one-process BatchNorm", arguments: [2, 3])
    func syncBatchNorm(worldSize: Int) throws {
        let batch = 6, channels = 3, plane = 5
        let stream = RandomStream(seed: 11)
        let input = (0..<(batch * channels * plane)).map { stream.normal(at: UInt64($0)) * 2 + 0.5 }
        let gradOutput = (0..<(batch * channels * plane)).map { stream.normal(at: UInt64(1000 + $0)) }
        let gamma: [Float] = [1.5, 0.5, -1], beta: [Float] = [0.1, -0.2, 0.3]

        /// One BatchNorm forward+backward over `rows` samples of the batch, with a reducer or alone.
        @Sendable func pass(_ rows: Range<Int>, _ reducer: StatisticsReducer?) throws -> (y: [Float], dx: [Float], dg: [Float], db: [Float], running: [Float]) {
            let n = rows.count, per = channels * plane
            let x = Array(input[(rows.lowerBound * per)..<(rows.upperBound * per)]), dy = Array(gradOutput[(rows.lowerBound * per)..<(rows.upperBound * per)])
            var y = [Float](repeating: 0, count: n * per), dx = y
            var dg = [Float](repeating: 0, count: channels), db = dg
            var mean = [Float](repeating: 0, count: channels), invStd = mean, runningMean = mean, runningVar = [Float](repeating: 1, count: channels)
            var stats = [Double](repeating: 0, count: 2 * channels + 1)
            try x.withUnsafeBufferPointer { x in try dy.withUnsafeBufferPointer { dy in try y.withUnsafeMutableBufferPointer { y in
                try dx.withUnsafeMutableBufferPointer { dx in try dg.withUnsafeMutableBufferPointer { dg in try db.withUnsafeMutableBufferPointer { db in
                    try mean.withUnsafeMutableBufferPointer { m in try invStd.withUnsafeMutableBufferPointer { s in
                        try runningMean.withUnsafeMutableBufferPointer { rm in try runningVar.withUnsafeMutableBufferPointer { rv in
                            try stats.withUnsafeMutableBufferPointer { st in
                                var saved = BatchNorm2d.Saved(mean: m.baseAddress!, invStd: s.baseAddress!, statistics: st)
                                let shape = BatchNorm2d.Shape(batch: n, channels: channels, plane: plane)
                                try gamma.withUnsafeBufferPointer { g in try beta.withUnsafeBufferPointer { b in
                                    let parameters = BatchNorm2d.Parameters(gamma: g.baseAddress!, beta: b.baseAddress!, runningMean: rm.baseAddress!,
                                                                            runningVar: rv.baseAddress!)
                                    try BatchNorm2d.forwardTraining(shape, output: .floats(y.baseAddress!), input: .fp32(x.baseAddress!),
                                                                    parameters: parameters, saved: &saved, reducer: reducer)
                                    try BatchNorm2d.backwardTraining(shape, gradInput: .floats(dx.baseAddress!),
                                                                     gradients: BatchNorm2d.ParameterGradients(gamma: dg.baseAddress!, beta: db.baseAddress!),
                                                                     gradOutput: dy.baseAddress!, input: .fp32(x.baseAddress!), gamma: g.baseAddress!,
                                                                     saved: saved, reducer: reducer)
                                } }
                            }
                        } }
                    } }
                } } }
            } } }
            return (y, dx, dg, db, runningMean + runningVar)
        }

        let whole = try pass(0..<batch, nil)
        let per = batch / worldSize
        let parts = try InProcessGroup.run(size: worldSize) { comm in try pass((comm.rank * per)..<((comm.rank + 1) * per), syncBatchNormReducer(comm)) }
        func close(_ a: [Float], _ b: [Float]) -> Bool { a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= 1e-5 * max(1, abs($0)) } }
        #expect(close(parts.flatMap(\.y), whole.y), "outputs")
        #expect(close(parts.flatMap(\.dx), whole.dx), "input gradients")
        #expect(parts.allSatisfy { close($0.running, whole.running) }, "running statistics on every rank")
        let dg = (0..<channels).map { c in parts.reduce(Float(0)) { $0 + $1.dg[c] } }, db = (0..<channels).map { c in parts.reduce(Float(0)) { $0 + $1.db[c] } }
        #expect(close(dg, whole.dg) && close(db, whole.db), "gamma and beta gradients summed over ranks")
    }
}

@Suite("Distributed loss")
struct DistributedLossTests {
    /// The loss of W ranks, each holding its rows of the global batch, is the single-process loss, and
    /// each rank's embedding gradients are its rows of the single-process gradients.
    @Test("the ConVIRT loss over W ranks equals the single-process loss and gradients", arguments: [2, 4])
    func distributedLoss(worldSize: Int) throws {
        let n = 8, d = 5
        let stream = RandomStream(seed: 3)
        func normalized(_ offset: UInt64) -> [Float] {
            var x = (0..<(n * d)).map { stream.normal(at: offset + UInt64($0)) }
            for i in 0..<n {
                let norm = (0..<d).reduce(Float(0)) { $0 + x[i * d + $1] * x[i * d + $1] }.squareRoot()
                for j in 0..<d { x[i * d + j] /= norm }
            }
            return x
        }
        let v = normalized(0), u = normalized(10_000)
        @Sendable func run(_ comm: Communicator) throws -> (loss: Double, gv: [Float], gu: [Float]) {
            let b = n / comm.size, lo = comm.rank * b * d
            let loss = DistributedLoss(communicator: comm, features: d, tau: 0.1, lambda: 0.75)
            let localV = Array(v[lo..<(lo + b * d)]), localU = Array(u[lo..<(lo + b * d)])
            let value = try localV.withUnsafeBufferPointer { lv in try localU.withUnsafeBufferPointer { lu in
                try loss.forwardBackward(v: lv.baseAddress!, u: lu.baseAddress!, rows: b)
            } }
            let forward = try localV.withUnsafeBufferPointer { lv in try localU.withUnsafeBufferPointer { lu in
                try loss.forward(v: lv.baseAddress!, u: lu.baseAddress!, rows: b)
            } }
            precondition(forward == value, "forward-only loss differs from forwardBackward's")
            return (value.loss, Array(UnsafeBufferPointer(start: loss.gradV, count: b * d)), Array(UnsafeBufferPointer(start: loss.gradU, count: b * d)))
        }
        let single = try run(SingleProcessCommunicator())
        let ranks = try InProcessGroup.run(size: worldSize) { try run($0) }
        #expect(ranks.allSatisfy { abs($0.loss - single.loss) <= 1e-6 * single.loss })
        let gv = ranks.flatMap(\.gv), gu = ranks.flatMap(\.gu)
        #expect(zip(gv, single.gv).allSatisfy { abs($0 - $1) <= 1e-5 } && zip(gu, single.gu).allSatisfy { abs($0 - $1) <= 1e-5 })
    }
}

@Suite("Arena shards")
struct ArenaShardTests {
    /// The optimizer's and the checkpoints' cut: contiguous ranges covering the arena, each rank's
    /// holding ceil(T / W) trainable elements (the last ones fewer), each cut where a trainable element
    /// starts; the paper preset's (BERT's frozen half in the middle) as evenly as a toy layout's.
    @Test("the arena is cut into equal shares of its trainable elements", arguments: [1, 2, 3, 4, 7])
    func balanced(world: Int) throws {
        var layout = ParameterLayout()
        try layout.add("a", shape: [100])
        try layout.add("frozen", shape: [1000], kind: .frozen)
        try layout.add("b", shape: [37])
        try layout.add("running", shape: [5], kind: .buffer)
        try layout.add("c", shape: [3])
        let paper = try ConVIRTModel.layout(ConVIRTConfig.preset(.paper))
        for (name, arena) in [("toy", ParameterArena(layout: layout)), ("paper", ParameterArena(layout: paper))] {
            let shards = ArenaShards(arena: arena, worldSize: world)
            #expect(shards.ranges.count == world && shards.ranges.first?.lowerBound == 0 && shards.ranges.last?.upperBound == arena.count)
            #expect(zip(shards.ranges, shards.ranges.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound }, "\(name): not contiguous")
            let total = arena.layout.trainableCount, size = (total + world - 1) / world
            let shares = shards.ranges.map { r in arena.trainableRanges(within: r).reduce(0) { $0 + $1.count } }
            #expect(shares == (0..<world).map { max(0, min(size, total - $0 * size)) }, "\(name), \(world) ranks: \(shares) of \(total)")
            for r in shards.ranges.dropFirst() where r.lowerBound < arena.count {
                #expect(arena.trainableRanges.contains { $0.contains(r.lowerBound) }, "\(name): a cut at \(r.lowerBound), inside no trainable run")
            }
        }
    }
}

@Suite("Gradient buckets")
struct GradientBucketTests {
    /// One training step's backward of the tiny ConVIRT on this rank's 2 samples, gradients summed by `sync`.
    static func backward(_ model: ConVIRTModel, _ sync: GradientSync, _ comm: InProcessCommunicator) throws -> (started: Int, of: Int) {
        let config = model.config
        let b = 2, size = config.image.imageSize, tokens = 6
        let stream = RandomStream(seed: 5, UInt64(comm.rank))
        let images = (0..<(b * 3 * size * size)).map { stream.normal(at: UInt64($0)) }
        let ids = (0..<(b * tokens)).map { Int32(5 + stream.integer(below: config.text.vocabSize - 5, at: UInt64(1_000_000 + $0))) }
        let mask = [Int32](repeating: 1, count: b * tokens)
        sync.begin()
        var context = PassContext(training: true, reducer: syncBatchNormReducer(comm), stream: RandomStream(seed: 1),
                                  sampleIndices: (0..<b).map { UInt64(comm.rank * b + $0) })
        let v = try images.withUnsafeBufferPointer { try model.encodeImages($0.baseAddress!, batch: b, size: size, context: context) }
        let u = try ids.withUnsafeBufferPointer { i in try mask.withUnsafeBufferPointer { m in
            try model.encodeTexts(ids: i.baseAddress!, mask: m.baseAddress!, batch: b, tokens: tokens, context: context)
        } }
        let loss = DistributedLoss(communicator: comm, features: config.projDim, tau: config.tau, lambda: config.lambda)
        _ = try loss.forwardBackward(v: v, u: u, rows: b)
        context.gradientsReady = sync.readyHandler
        try model.backwardImages(gradEmbeddings: loss.gradV, context: context)
        try model.backwardTexts(gradEmbeddings: loss.gradU, context: context)
        let overlapped = sync.bucketsOverlapped
        _ = try sync.finish()
        return overlapped
    }

    /// Every trainable parameter group is reported during backward, so that with overlap no bucket is
    /// left for `finish` (a group the models forgot would still be reduced there, but not overlapped).
    @Test("with overlap, every gradient bucket of ConVIRT starts during backward")
    func everyBucketOverlaps() throws {
        let counts = try InProcessGroup.run(size: 2) { comm -> [Int] in
            let model = try ConVIRTModel(config: ConVIRTConfig.preset(.tiny))
            model.initialize(seed: 1)
            let sync = try GradientSync(arena: model.arena, communicator: comm, mode: .replicated(overlap: true), bucketCapacity: 512,
                                        exchange: .collectives)
            let overlapped = try Self.backward(model, sync, comm)
            return [overlapped.started, overlapped.of]
        }
        #expect(counts.allSatisfy { $0[1] > 4 && $0[0] == $0[1] }, "buckets started during backward / all: \(counts)")
    }

    /// The tiny ConVIRT after one backward on this rank, its gradients summed by a new step engine.
    static func summed(_ comm: InProcessCommunicator, zero1: Bool, exchange: GradientExchange) throws -> (ConVIRTModel, GradientSync) {
        let model = try ConVIRTModel(config: ConVIRTConfig.preset(.tiny))
        model.initialize(seed: 1)
        let sync = try GradientSync(arena: model.arena, communicator: comm, mode: zero1 ? .zero1(overlap: true) : .replicated(overlap: true),
                                    exchange: exchange)
        _ = try backward(model, sync, comm)
        return (model, sync)
    }

    /// Shared memory sums the gradients in rank order, as the collectives do here: the same sums of each
    /// rank's shard (the one it updates: shared memory sums nothing else into its buffer) and, after
    /// Adam, the same parameters, on 2 and 3 ranks.
    @Test("shared-memory gradient sums equal the collectives'", arguments: [2, 3], [false, true])
    func sharedMemoryEqualsCollectives(ranks: Int, zero1: Bool) throws {
        func run(_ exchange: GradientExchange) throws -> [(grads: [Float], params: [Float], description: String)] {
            try InProcessGroup.run(size: ranks) { comm in
                let (model, sync) = try Self.summed(comm, zero1: zero1, exchange: exchange)
                let arena = model.arena
                var grads: [Float] = []
                for r in arena.trainableRanges(within: sync.shards[comm.rank]) {
                    grads += Array(UnsafeBufferPointer(start: arena.grads + r.lowerBound, count: r.count))
                }
                try sync.step(adam: AdamConfig(learningRate: 1e-3, weightDecay: 1e-6, decoupled: false), step: 1)
                return (grads, Array(UnsafeBufferPointer(start: arena.params, count: arena.count)), sync.exchangeDescription)
            }
        }
        let shared = try run(.sharedMemory), collectives = try run(.collectives)
        #expect(shared.allSatisfy { $0.description.hasPrefix("shared memory") } && collectives.allSatisfy { $0.description == "MPI collectives" },
                "\(shared.map(\.description)) \(collectives.map(\.description))")
        for r in 0..<ranks {
            #expect(shared[r].grads.count > 1000 && shared[r].grads == collectives[r].grads, "rank \(r): gradients differ")
            #expect(shared[r].grads.contains { $0 != 0 }, "rank \(r): no gradient")
            #expect(shared[r].params == collectives[r].params, "rank \(r): parameters after Adam differ")
        }
    }

    /// The update's count of non-finite parameters is what a scan of every rank's arena finds, however the
    /// update is split: each rank counts what it wrote, summed over the ranks that split it.
    @Test("the update counts the NaN and infinite parameters of every rank's shard", arguments: [2, 3], [false, true])
    func nonFiniteCount(ranks: Int, zero1: Bool) throws {
        for exchange in [GradientExchange.sharedMemory, .collectives] {
            let counts = try InProcessGroup.run(size: ranks) { comm -> [Int] in
                let (model, sync) = try Self.summed(comm, zero1: zero1, exchange: exchange)
                // Every rank poisons the same gradients, in each rank's shard: what it holds of them is what it steps.
                let arena = model.arena
                var poisoned = 0
                for shard in sync.shards.ranges {
                    for r in arena.trainableRanges(within: shard).prefix(2) {
                        arena.grads[r.lowerBound] = .nan
                        arena.grads[r.upperBound - 1] = .infinity
                        poisoned += r.count > 1 ? 2 : 1
                    }
                }
                let update = try sync.step(adam: AdamConfig(learningRate: 1e-3), step: 1)
                return [update.nonFinite, arena.nonFiniteParameterCount(), poisoned]
            }
            for (r, c) in counts.enumerated() {
                #expect(c[0] == c[1] && c[0] == c[2] && c[2] >= 2 * ranks, "\(exchange), rank \(r): counted \(c[0]), scan \(c[1]), poisoned \(c[2])")
            }
        }
    }
}
