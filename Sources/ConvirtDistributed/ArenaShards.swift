// How a range of `count` items is cut over the ranks: ZeRO-1's optimizer shards, checkpoint shards
// and the slices of an evaluation's images are all this one split, so that a checkpoint shard of
// rank r is exactly the Adam state rank r holds.

public struct ArenaShards: Sendable, Equatable {
    public let count: Int
    public let worldSize: Int
    /// Rank r's range: consecutive blocks of ceil(count / W) items, the last ones shorter or empty.
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

    /// Items per rank, in rank order (what the variable-count collectives take).
    public var counts: [Int] { ranges.map(\.count) }

    public subscript(rank: Int) -> Range<Int> { ranges[rank] }

    /// Every rank's count and this rank's range of `count` items (an evaluation's images, say).
    public static func split(_ count: Int, _ communicator: Communicator) -> (counts: [Int], mine: Range<Int>) {
        let shards = ArenaShards(count: count, communicator)
        return (shards.counts, shards[communicator.rank])
    }
}
