// Gradient all-reduce in buckets that start as soon as their gradients are final, overlapped with the
// rest of backward (as PyTorch DDP and Horovod do). Buckets are contiguous arena ranges of trainable
// parameters of at most `capacity` floats; the models report groups of finished parameters as arena
// ranges (a ResNet block, a BERT layer, a head) through PassContext.gradientsReady.

import ConvirtCore
import Foundation

/// The buckets of data parallelism (used by `GradientSync`): all-reduced (replicated), or reduce-scattered
/// into each rank's shard (ZeRO-1).
final class GradientBuckets {
    struct Bucket { var range: Range<Int>; var entries: Int; var pending: Int; var started: Bool }

    /// What a bucket's collective does.
    enum Collective {
        /// Sums the bucket's gradients over ranks in place.
        case allReduce
        /// Leaves this rank's piece of the sum (the bucket cut where `shards` cut the arena) in
        /// `output[i - own.lowerBound]` for arena index i of `own`, this rank's shard.
        case reduceScatter(shards: ArenaShards, output: UnsafeMutablePointer<Float>, own: Range<Int>)
    }

    let arena: ParameterArena
    let communicator: Communicator
    let collective: Collective
    private(set) var buckets: [Bucket] = []
    /// Reduce-scatter: per bucket, each rank's count (the bucket's pieces in the shards, which tile it in
    /// rank order) and where this rank's piece goes in the output.
    private var scatter: [(counts: [Int], output: UnsafeMutablePointer<Float>, count: Int)] = []
    private var bucketOfEntry: [Int: Int] = [:]
    private var ready = Set<Int>()
    /// Buckets started from `markReady` in this step, i.e. overlapped with backward.
    private(set) var startedEarly = 0

    init(arena: ParameterArena, communicator: Communicator, capacity: Int = 1 << 22, collective: Collective = .allReduce) {
        self.arena = arena
        self.communicator = communicator
        self.collective = collective
        let entries = arena.layout.entries
        var current: (range: Range<Int>, members: [Int])? = nil
        func close() {
            guard let c = current else { return }
            for m in c.members { bucketOfEntry[m] = buckets.count }
            buckets.append(Bucket(range: c.range, entries: c.members.count, pending: c.members.count, started: false))
            current = nil
        }
        var previousTrainable = false
        for (i, e) in entries.enumerated() {
            guard e.kind == .trainable else { previousTrainable = false; continue }
            if let c = current, previousTrainable, e.range.upperBound - c.range.lowerBound <= capacity {
                current = (c.range.lowerBound..<e.range.upperBound, c.members + [i])
            } else {
                close()
                current = (e.range, [i])
            }
            previousTrainable = true
        }
        close()
        if case .reduceScatter(let shards, let output, let own) = collective {
            scatter = buckets.map { bucket in
                let pieces = shards.ranges.map { $0.clamped(to: bucket.range) }, mine = pieces[communicator.rank]
                return (pieces.map(\.count), mine.isEmpty ? output : output + (mine.lowerBound - own.lowerBound), mine.count)
            }
        }
    }

    /// Clears the state for a new step.
    func reset() {
        ready.removeAll(keepingCapacity: true)
        startedEarly = 0
        for i in buckets.indices { buckets[i].pending = buckets[i].entries; buckets[i].started = false }
    }

    /// The gradients of every parameter in the arena range `range` are final: start the buckets they complete.
    func markReady(_ range: Range<Int>) throws {
        for entry in arena.layout.entryIndices(in: range) where arena.layout.entries[entry].kind == .trainable && !ready.contains(entry) {
            ready.insert(entry)
            guard let b = bucketOfEntry[entry] else { continue }
            buckets[b].pending -= 1
            if buckets[b].pending == 0 { try start(b); startedEarly += 1 }
        }
        _ = try communicator.test()  // progress for the operations in flight
    }

    private func start(_ b: Int) throws {
        buckets[b].started = true
        let r = buckets[b].range
        switch collective {
        case .allReduce:
            _ = try communicator.startAllReduceSum(UnsafeMutableBufferPointer(start: arena.grads + r.lowerBound, count: r.count))
        case .reduceScatter:
            _ = try communicator.startReduceScatterSum(UnsafeBufferPointer(start: arena.grads + r.lowerBound, count: r.count),
                                                       counts: scatter[b].counts,
                                                       into: UnsafeMutableBufferPointer(start: scatter[b].output, count: scatter[b].count))
        }
    }

    /// Starts whatever was not reported and waits for all buckets.
    func finish() throws {
        for b in buckets.indices where !buckets[b].started { try start(b) }
        try communicator.waitAll()
    }
}
