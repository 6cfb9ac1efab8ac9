// How a range of `count` items is cut over the ranks: ZeRO-1's optimizer shards and checkpoint shards
// are one cut of the parameter arena (`init(arena:worldSize:)`), so that a checkpoint shard of rank r
// is exactly the Adam state rank r holds; the slices of an evaluation's images are an even split.

import ConvirtCore

public struct ArenaShards: Sendable, Equatable {
    public let count: Int
    public let worldSize: Int
    /// Rank r's range: consecutive ranges covering 0..<count (an even cut: blocks of ceil(count / W) items,
    /// the last ones shorter or empty; the arena's: `init(arena:worldSize:)`).
    public let ranges: [Range<Int>]

    public init(count: Int, worldSize: Int) {
        precondition(count >= 0 && worldSize >= 1, "shards of \(count) items over \(worldSize) ranks")
        self.count = count
        self.worldSize = worldSize
        let size = (count + worldSize - 1) / worldSize
        ranges = (0..<worldSize).map { r in min(count, r * size)..<min(count, (r + 1) * size) }
    }

    public init(count: Int, _ communicator: Communicator) {
        self.init(count: count, worldSize: communicator.size)
    }

    /// The parameter arena cut for the optimizer and the checkpoints: each rank's range holds an equal
    /// share of the trainable elements (ceil(T / W), the last ones fewer), the only ones Adam steps,
    /// and the frozen entries and buffers fall in the range around them. (An even cut of the whole arena
    /// gave rank 1 of 2 44.5M of the paper preset's 68M trainable elements: BERT's frozen half lies in
    /// rank 0's.) Cut points are arena offsets where a trainable element starts; an arena with none is
    /// cut evenly.
    public init(arena: ParameterArena, worldSize: Int) {
        self.init(count: arena.count, trainableRuns: arena.trainableRanges, worldSize: worldSize)
    }

    /// `init(arena:worldSize:)` for an arena of `count` elements whose trainable runs (ascending,
    /// disjoint) are `trainableRuns`.
    public init(count: Int, trainableRuns: [Range<Int>], worldSize: Int) {
        precondition(count >= 0 && worldSize >= 1, "shards of \(count) items over \(worldSize) ranks")
        let total = trainableRuns.reduce(0) { $0 + $1.count }
        guard total > 0 else { self.init(count: count, worldSize: worldSize); return }
        let size = (total + worldSize - 1) / worldSize
        // The arena offset of trainable element k (counted along the runs); `count` past the last.
        func offset(ofTrainable k: Int) -> Int {
            var before = 0
            for run in trainableRuns {
                if k < before + run.count { return run.lowerBound + k - before }
                before += run.count
            }
            return count
        }
        let cuts = [0] + (1..<worldSize).map { offset(ofTrainable: $0 * size) } + [count]
        self.init(count: count, ranges: (0..<worldSize).map { cuts[$0]..<cuts[$0 + 1] })
    }

    private init(count: Int, ranges: [Range<Int>]) {
        self.count = count
        self.worldSize = ranges.count
        self.ranges = ranges
    }

    /// Items per rank, in rank order (what the variable-count collectives take).
    public var counts: [Int] { ranges.map(\.count) }

    public subscript(rank: Int) -> Range<Int> { ranges[rank] }

    /// Every rank's count and this rank's range of `count` items cut evenly (an evaluation's images, say).
    public static func split(_ count: Int, _ communicator: Communicator) -> (counts: [Int], mine: Range<Int>) {
        let shards = ArenaShards(count: count, communicator)
        return (shards.counts, shards[communicator.rank])
    }
}
