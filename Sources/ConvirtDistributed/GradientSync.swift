// The data-parallel step engine: what happens to the gradients between a rank's backward pass and the
// optimizer step, for pretraining and fine-tuning alike.
//
//   begin()              zero the gradients, reset the buckets
//   backward, with PassContext.gradientsReady = sync.readyHandler
//                        replicated + overlap: each bucket's all-reduce starts once its gradients are final
//   finish()             start what is left and wait; ZeRO-1: keep the own shard
//                        shared memory (ranks on one machine): each rank sums its slice over every
//                        rank's gradient buffer (SharedGradients.swift) instead of the buckets
//   gradientNorm(), clip(to:)
//   step(adam:step:)     Adam over the ranges this rank holds state for; ZeRO-1: all-gather the parameters;
//                        shared memory on one machine (either mode): each rank steps its own shard,
//                        writing the new parameters into every rank's parameter buffer
//
// Gradients are summed over ranks (the loss is normalised by the global batch), so W ranks train as one.

import CKernels
import ConvirtCore
import Foundation

public final class GradientSync {
    public enum Mode: Sendable, Equatable {
        /// Every rank holds all Adam state; gradients are all-reduced in buckets, started during backward
        /// (`overlap`) or after it.
        case replicated(overlap: Bool)
        /// ZeRO-1: Adam state sharded by arena range; gradients reduce-scattered in buckets (started during
        /// backward with `overlap`, as replicated buckets are), the own shard updated, parameters all-gathered.
        case zero1(overlap: Bool)

        public var shardsOptimizerState: Bool { if case .zero1 = self { return true }; return false }
        var overlaps: Bool {
            switch self {
            case .replicated(let overlap), .zero1(let overlap): return overlap
            }
        }
    }

    public let mode: Mode
    public let arena: ParameterArena
    public let communicator: Communicator
    /// The arena cut over the ranks, as ZeRO-1 and checkpoints cut it.
    public let shards: ArenaShards
    private let buckets: GradientBuckets?
    private let shardGradients: UnsafeMutablePointer<Float>?
    /// The arena range whose sums over ranks this rank holds after `finish` (and updates): its shard
    /// (ZeRO-1, or ranks splitting the update through shared parameters) or all of it.
    public let summedRange: Range<Int>
    /// Whether that is this rank's shard alone, of several.
    private let holdsOwnSums: Bool
    /// The sums through shared memory, where the ranks share a machine (and `exchange` allows it).
    private let shared: SharedGradientSum?
    /// Ranks on one machine sharing memory: every rank's parameters, into which each writes its own
    /// shard's update.
    private let sharedParameters: SharedRegion?
    /// The other ranks' buffers of `sharedParameters` (none without it).
    private let peerParameters: [UnsafeMutablePointer<Float>]
    /// Whether this rank's machine shares the parameters: each rank updates its shard into every buffer.
    public var sharesParameters: Bool { !peerParameters.isEmpty }
    /// How the gradients are summed over ranks, in words (for the run's log): "one rank", "shared
    /// memory (/dev/shm)" or "MPI collectives", with the reason where auto fell back to them.
    public let exchangeDescription: String

    /// With `.zero1` the arena keeps only this rank's shard of the Adam moments from here on. With
    /// several ranks this is collective (every rank constructs its GradientSync at the same point), and
    /// with shared memory the arena's gradients move into it (`ParameterArena.adoptGradients`).
    public init(arena: ParameterArena, communicator: Communicator, mode: Mode, bucketCapacity: Int = 1 << 22,
                exchange: GradientExchange = .auto) throws {
        self.mode = mode
        self.arena = arena
        self.communicator = communicator
        shards = ArenaShards(arena: arena, worldSize: communicator.size)
        let distributed = communicator.size > 1
        let own = shards[communicator.rank]
        var shared: SharedGradientSum? = nil, sharedParameters: SharedRegion? = nil
        var description = distributed ? "MPI collectives" : "one rank"
        if distributed && exchange != .collectives {
            do {
                if let region = try communicator.mapShared(floats: arena.count, committing: arena.trainableRanges, for: .gradients) {
                    // On one machine each rank updates its own shard (ZeRO-1: the only one whose sums it takes;
                    // replicated: every rank holds all the sums), and copies the others' updated shards from
                    // their parameter buffers. On several machines every rank gets all the sums (its machine's
                    // share of the all-reduce) and the parameters are all-gathered by MPI (ZeRO-1), or each
                    // rank updates all of them (replicated).
                    let oneMachine = region.machines == 1
                    var note = ""
                    if oneMachine {
                        do {
                            if let parameters = try communicator.mapShared(floats: arena.count, committing: [0..<arena.count], for: .parameters) {
                                arena.adoptParameters(parameters.own, owner: parameters)
                                sharedParameters = parameters
                            }
                        } catch where !mode.shardsOptimizerState {
                            // Replicated: the sums still go through shared memory, and each rank updates everything.
                            note = "; each rank updates every parameter (no shared memory for them: \(error))"
                        }
                    }
                    arena.adoptGradients(region.own, owner: region)
                    // Where each rank updates its own shard alone, the sums of its shard are all it needs.
                    shared = SharedGradientSum(region: region, communicator: communicator, trainableRuns: arena.trainableRanges,
                                               shard: mode.shardsOptimizerState && oneMachine || sharedParameters != nil ? own : nil)
                    description = (oneMachine ? "shared memory (\(region.location))"
                        : "shared memory (\(region.location)) within each of \(region.machines) machines, MPI across them") + note
                } else if exchange == .sharedMemory {
                    throw ConvirtError("--gradient-exchange shared-memory: the \(communicator.size) ranks run one to a machine, or their machines "
                                       + "run different numbers of them (--gradient-exchange auto or collectives sums them with MPI)")
                } else {
                    description += " (one rank to a machine, or machines with different numbers of ranks)"
                }
            } catch let error where exchange == .auto {
                description += " (no shared memory: \(error))"
            }
        }
        self.shared = shared
        holdsOwnSums = distributed && (shared?.everywhere == false || mode.shardsOptimizerState)
        summedRange = holdsOwnSums ? own : 0..<arena.count
        self.sharedParameters = sharedParameters
        peerParameters = sharedParameters.map { region in region.buffers.enumerated().filter { $0.offset != region.localRank }.map(\.element) } ?? []
        exchangeDescription = description
        if mode.shardsOptimizerState {
            arena.shardOptimizerState(own)
            // Zeroed once: the alignment padding between entries is in no bucket, so it is never written and
            // stays zero (as the padding of every arena buffer does).
            shardGradients = distributed && shared == nil ? UnsafeMutablePointer<Float>.allocate(capacity: max(1, own.count)) : nil
            shardGradients?.initialize(repeating: 0, count: max(1, own.count))
        } else {
            shardGradients = nil
        }
        if !distributed || shared != nil {
            buckets = nil
        } else if let shard = shardGradients {
            buckets = GradientBuckets(arena: arena, communicator: communicator, capacity: bucketCapacity,
                                      collective: .reduceScatter(shards: shards, output: shard, own: own))
        } else {
            buckets = GradientBuckets(arena: arena, communicator: communicator, capacity: bucketCapacity)
        }
    }

    deinit { shardGradients?.deallocate() }

    /// Starts a step: gradients zeroed, no bucket started.
    public func begin() {
        arena.zeroGrads()
        buckets?.reset()
    }

    /// What the models call during backward when a group of parameters has its final gradients
    /// (PassContext.gradientsReady); nil when nothing starts before `finish`.
    public var readyHandler: ((Range<Int>) throws -> Void)? {
        guard let buckets, mode.overlaps else { return nil }
        return { range in try buckets.markReady(range) }
    }

    /// Gradient buckets, and how many of them the last step started during backward (the rest start in
    /// `finish`); (0, 0) on one rank.
    public var bucketsOverlapped: (started: Int, of: Int) { (buckets?.startedEarly ?? 0, buckets?.buckets.count ?? 0) }

    /// ZeRO-1's collectives: each run of trainable parameters, and its pieces in each rank's shard (in
    /// rank order, they tile the run).
    private var shardedRuns: [(run: Range<Int>, pieces: [Range<Int>])] {
        arena.trainableRanges.map { run in (run, shards.ranges.map { $0.clamped(to: run) }) }
    }

    /// After backward: the gradients summed over ranks (all of them, or this rank's ZeRO-1 shard).
    /// Returns the seconds spent communicating that backward did not hide.
    public func finish() throws -> Double {
        var clock = Clock()
        if let shared {
            try shared.sum()
            return clock.lap()
        }
        if let buckets { try buckets.finish() }
        if let shard = shardGradients {
            // ZeRO-1: each bucket (trainable parameters only: the frozen ones' gradients, zero on every
            // rank, half the paper preset's arena, are not sent) was reduce-scattered where the shards cut
            // it; this rank's pieces of the sums go back into its own range of the gradients.
            let own = arena.optimizerRange
            for range in arena.trainableRanges(within: own) {
                (arena.grads + range.lowerBound).update(from: shard + (range.lowerBound - own.lowerBound), count: range.count)
            }
        }
        return clock.lap()
    }

    /// The L2 norm of every trainable gradient, summed over ranks. Its sum of squares has one structure
    /// whoever holds the gradients, so that every way of summing them over W ranks gives the same bits:
    /// each rank's shard (`shards`) in blocks of 16384 elements along its trainable runs (each block in
    /// 8 double lanes, `ck_sum_squares`), the blocks added in order, and then the shards in rank order.
    /// A rank that holds only its own shard's sums computes that shard's part and gets the others' by an
    /// all-reduce in which each has a slot of its own (exact: every other term is zero). With one rank
    /// this is the sum over the whole arena, for any thread count.
    public func gradientNorm() throws -> Double {
        let size = communicator.size
        var parts = [Double](repeating: 0, count: size)
        if holdsOwnSums {
            parts[communicator.rank] = squares(within: shards[communicator.rank])
            try parts.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        } else {
            for r in 0..<size { parts[r] = squares(within: shards[r]) }
        }
        return parts.reduce(0, +).squareRoot()
    }

    /// The sum of squares of the trainable gradients in `window`: blocks of 16384 elements along each
    /// run, summed in parallel, then added one by one in order (the same value for any thread count).
    private func squares(within window: Range<Int>) -> Double {
        let block = 16_384
        var total = 0.0
        let grads = arena.grads
        for range in arena.trainableRanges(within: window) {
            let blocks = (range.count + block - 1) / block
            withUnsafeTemporaryAllocation(of: Double.self, capacity: blocks) { partial in
                let sums = partial.baseAddress!
                Parallel.chunks(blocks, cost: block) { part in
                    for b in part {
                        let lo = range.lowerBound + b * block, hi = min(lo + block, range.upperBound)
                        sums[b] = ck_sum_squares(grads + lo, hi - lo)
                    }
                }
                for b in 0..<blocks { total += sums[b] }
            }
        }
        return total
    }

    /// Scales the gradients so that their norm (`norm`, from gradientNorm) is at most `maxNorm`.
    public func clip(norm: Double, to maxNorm: Double) {
        guard norm > maxNorm else { return }
        scale(by: Float(maxNorm / (norm + 1e-6)))
    }

    /// Multiplies the trainable gradients this rank holds sums of (`summedRange`) by `scale`.
    public func scale(by scale: Float) {
        let grads = arena.grads
        for range in arena.trainableRanges(within: summedRange) {
            Parallel.chunks(range.count) { part in for i in part { grads[range.lowerBound + i] *= scale } }
        }
    }

    /// What `step` did: the seconds it spent bringing the ranks' updated parameters together, and how
    /// many parameters and running statistics are NaN or infinite after it (the same on every rank).
    public struct Update: Sendable {
        public let gatherSeconds: Double
        public let nonFinite: Int
    }

    /// Adam over what this rank holds state for; with ZeRO-1 the updated shards are then all-gathered.
    /// Ranks sharing one machine's memory for their parameters (replicated or ZeRO-1) split the update:
    /// each steps its own shard (the checkpoint shard it writes) and writes the new parameters into every
    /// rank's buffer as it goes, instead of every rank repeating the whole update (the same parameters
    /// bit for bit: Adam is elementwise). Replicated ranks' moments outside their own shard are then left
    /// as they were: nothing reads them (a checkpoint takes each rank's shard of the moments from that
    /// rank, `Checkpoints.save`). The non-finite count comes from Adam (each rank counts what it wrote,
    /// summed over the ranks that split the update) and from this rank's running statistics; the frozen
    /// parameters do not change.
    @discardableResult
    public func step(adam config: AdamConfig, step: Int) throws -> Update {
        let rank = communicator.rank
        var nonFinite = 0, gather = 0.0
        if !peerParameters.isEmpty {
            // The other ranks read their own buffers only from the next step on (their forward), and none
            // reads or writes this shard of them now: each is in its own shard's update (the gradient sums
            // met every rank after backward). The sum of the counts meets every rank again, after every
            // new parameter is written.
            for range in arena.trainableRanges(within: shards[rank]) {
                nonFinite += Adam.step(arena, range: range, step: step, config: config, mirrors: peerParameters)
            }
            var clock = Clock()
            ck_memory_fence()
            nonFinite = try summedOverRanks(nonFinite)
            ck_memory_fence()
            gather = clock.lap()
        } else if mode.shardsOptimizerState && communicator.size > 1 {
            nonFinite = Adam.step(arena, step: step, config: config)
            var clock = Clock()
            // Only the trainable runs change (each cut where the shards cut it); frozen parameters and the
            // running statistics (SyncBN's, the same on every rank) stay as every rank holds them.
            for (run, pieces) in shardedRuns {
                try communicator.allGatherInPlace(UnsafeMutableBufferPointer(start: arena.trainingParams + run.lowerBound, count: run.count),
                                                  counts: pieces.map(\.count))
            }
            nonFinite = try summedOverRanks(nonFinite)
            gather = clock.lap()
        } else {
            nonFinite = Adam.step(arena, step: step, config: config)
        }
        return Update(gatherSeconds: gather, nonFinite: nonFinite + arena.nonFiniteBufferCount())
    }

    /// A count summed over the ranks (exact: doubles hold every count a job can make).
    private func summedOverRanks(_ count: Int) throws -> Int {
        var total = [Double(count)]
        try total.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        return Int(total[0])
    }
}

/// The SyncBN reducer: BatchNorm statistics summed over every rank (nil on one rank, where the batch's
/// own statistics are already global). An MPI failure is thrown out of the forward or backward pass.
public func syncBatchNormReducer(_ communicator: Communicator) -> StatisticsReducer? {
    guard communicator.size > 1 else { return nil }
    return { statistics in try communicator.allReduceSum(statistics) }
}

/// Seconds since the last lap.
public struct Clock {
    var last = DispatchTime.now().uptimeNanoseconds
    public init() {}
    public mutating func lap() -> Double {
        let now = DispatchTime.now().uptimeNanoseconds
        defer { last = now }
        return Double(now - last) * 1e-9
    }
}
