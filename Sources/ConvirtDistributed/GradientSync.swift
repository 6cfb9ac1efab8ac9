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
//                        shared memory on one machine (either mode): each rank steps its own shard and
//                        copies the others' from their parameter buffers
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
    /// The sums through shared memory, where the ranks share a machine (and `exchange` allows it).
    private let shared: SharedGradientSum?
    /// Ranks on one machine sharing memory: every rank's parameters, from which each copies the others'
    /// shards after updating its own.
    private let sharedParameters: SharedRegion?
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
                    shared = SharedGradientSum(region: region, communicator: communicator, trainableRuns: arena.trainableRanges,
                                               shard: mode.shardsOptimizerState && oneMachine ? own : nil)
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
        self.sharedParameters = sharedParameters
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

    /// The L2 norm of every trainable gradient (with ZeRO-1: each rank's shard, summed over ranks).
    public func gradientNorm() throws -> Double {
        // Blocks of 16384 elements summed in parallel (each in 8 double lanes, `ck_sum_squares`), then the
        // block sums in order: the same value for any thread count.
        let block = 16_384
        var squares = [0.0]
        let grads = arena.grads
        for range in arena.trainableRanges(within: arena.optimizerRange) {
            let blocks = (range.count + block - 1) / block
            var partial = [Double](repeating: 0, count: blocks)
            partial.withUnsafeMutableBufferPointer { partial in
                let sums = partial.baseAddress!
                Parallel.chunks(blocks, cost: block) { part in
                    for b in part {
                        let lo = range.lowerBound + b * block, hi = min(lo + block, range.upperBound)
                        sums[b] = ck_sum_squares(grads + lo, hi - lo)
                    }
                }
            }
            for s in partial { squares[0] += s }
        }
        if mode.shardsOptimizerState && communicator.size > 1 { try squares.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) } }
        return squares[0].squareRoot()
    }

    /// Scales the gradients so that their norm (`norm`, from gradientNorm) is at most `maxNorm`.
    public func clip(norm: Double, to maxNorm: Double) {
        guard norm > maxNorm else { return }
        scale(by: Float(maxNorm / (norm + 1e-6)))
    }

    /// Multiplies the trainable gradients this rank holds (all, or its ZeRO-1 shard) by `scale`.
    public func scale(by scale: Float) {
        let grads = arena.grads
        for range in arena.trainableRanges(within: arena.optimizerRange) {
            Parallel.chunks(range.count) { part in for i in part { grads[range.lowerBound + i] *= scale } }
        }
    }

    /// Adam over what this rank holds state for; with ZeRO-1 the updated shards are then all-gathered
    /// (through shared memory where the gradients are summed there). Replicated ranks sharing one
    /// machine's memory split the update the same way: each steps its own shard (the checkpoint shard it
    /// writes) and copies the others' from their buffers, instead of every rank repeating the whole
    /// update (the same parameters bit for bit: Adam is elementwise). Their moments outside their own
    /// shard are then left as they were: nothing reads them (a checkpoint takes each rank's shard of the
    /// moments from that rank, `Checkpoints.save`). Returns the seconds of the all-gather.
    @discardableResult
    public func step(adam config: AdamConfig, step: Int) throws -> Double {
        if sharedParameters != nil && !mode.shardsOptimizerState {
            for range in arena.trainableRanges(within: shards[communicator.rank]) {
                Adam.step(arena, range: range, step: step, config: config)
            }
        } else {
            Adam.step(arena, step: step, config: config)
        }
        var clock = Clock()
        if let sharedParameters {
            // Once every rank has updated its shard: each copies the others' shards of the trainable runs
            // from their buffers, and meets them again, so that no rank changes its parameters (the next
            // update, or a restore of the best ones in fine-tuning) while another still reads them.
            try communicator.meetSharingMemory()
            for (_, pieces) in shardedRuns {
                for (peer, piece) in pieces.enumerated() where peer != communicator.rank && !piece.isEmpty {
                    parallelCopy(arena.trainingParams + piece.lowerBound, sharedParameters.buffers[peer] + piece.lowerBound, count: piece.count)
                }
            }
            try communicator.meetSharingMemory()
        } else if mode.shardsOptimizerState && communicator.size > 1 {
            // Only the trainable runs change (each cut where the shards cut it); frozen parameters and the
            // running statistics (SyncBN's, the same on every rank) stay as every rank holds them.
            for (run, pieces) in shardedRuns {
                try communicator.allGatherInPlace(UnsafeMutableBufferPointer(start: arena.trainingParams + run.lowerBound, count: run.count),
                                                  counts: pieces.map(\.count))
            }
        }
        return clock.lap()
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
