// Where a batch of token sequences lies in the rows of a transformer's per-token layers, and the gradient
// pieces of their sums over rows.
//
// A batch of B sentences padded to T tokens holds B*T rows, of which short report sentences fill a
// fraction (a sentence of ten word pieces in a batch padded to forty is a quarter valid). Every layer of
// BERT but the attention works on each row alone: the products, LayerNorm, GELU and dropout. Packed
// (`TokenRows(mask:...)`), those layers run on the valid tokens alone: sample b's valid tokens, in order,
// are the rows starts[b] ..< starts[b] + lengths[b]. The attention, the one layer that mixes tokens, still
// runs on the padded [B, T] layout: `scatter` puts the packed rows into it (the padding zero) and `gather`
// takes them back. A padded position's output is then not computed at all; a valid position's is what
// the padded model computes, since the attention gives the padding no weight (and dropout keys its
// masks by the token's position, `runs`).
//
// The rows come in groups of whole samples, each rounded up to a multiple of `rowMultiple` rows by rows of
// no sample (a padding token at position 0, whose gradient is zero): the groups are the gradient pieces
// in a pass that cuts its sums into pieces (`GradientPieces`), else the whole batch. So the products come
// in few shapes (oneDNN makes a primitive per shape), and a piece's rows depend on its samples alone:
// ranks of any world size compute the same pieces.

/// Where a text encoder that pools its valid tokens runs its per-token layers (`CONVIRT_TEXT_ROWS`).
public enum TextRows: String, Sendable, CaseIterable {
    /// On the valid tokens alone (`TokenRows(mask:...)`): the default.
    case packed
    /// On every position of the padded batch, the padding too.
    case padded
}

/// The gradient pieces of a sum over rows: consecutive runs of rows, each summed alone from zero, the
/// pieces then added in order (`GradientPieces`).
public struct RowPieces: Sendable, Equatable, CustomStringConvertible {
    /// Piece i is rows bounds[i] ..< bounds[i + 1]; the first bound is 0, the last the rows.
    public let bounds: [Int]

    /// Pieces of `each` rows (a divisor of `rows`).
    public init(rows: Int, each: Int) {
        precondition(each > 0 && rows >= 0 && rows % each == 0, "\(rows) rows in pieces of \(each)")
        bounds = Array(stride(from: 0, through: rows, by: each))
    }

    /// Pieces with these bounds (0 first, increasing).
    public init(bounds: [Int]) {
        precondition(bounds.first == 0 && zip(bounds, bounds.dropFirst()).allSatisfy { $0 < $1 }, "piece bounds \(bounds)")
        self.bounds = bounds
    }

    public var rows: Int { bounds[bounds.count - 1] }
    public var count: Int { bounds.count - 1 }
    public subscript(_ i: Int) -> Range<Int> { bounds[i]..<bounds[i + 1] }
    public var ranges: [Range<Int>] { (0..<count).map { self[$0] } }
    public var description: String { "pieces \(ranges)" }
}

/// The rows of a batch of B token sequences padded to T tokens: the padded layout itself (row b*T + t),
/// or packed, the valid tokens alone.
public struct TokenRows: Sendable, Equatable {
    public let batch, tokens: Int
    /// Sample b's rows: starts[b] ..< starts[b] + lengths[b].
    public let starts: [Int]
    public let lengths: [Int]
    /// Every row's position in the padded layout (b*T + t), -1 for a row of no sample.
    public let paddedRows: [Int32]
    /// Rows in all, rows of no sample included.
    public let count: Int
    /// The gradient pieces (nil: the batch in one piece).
    public let pieces: RowPieces?
    /// Whether the rows are the padded layout's, one for one (packed rows too, where every token is
    /// valid and no group needs rounding: the products then see the same rows, and nothing is scattered).
    public let isPadded: Bool

    /// Packed groups are rounded up to a multiple of this many rows.
    public static let rowMultiple = 8

    /// The padded layout: sample b's rows are b*T ..< (b+1)*T, valid or not; pieces of `pieceSamples`
    /// samples (nil: one piece).
    public init(batch: Int, tokens: Int, pieceSamples: Int?) {
        precondition(batch > 0 && tokens > 0, "token rows of \(batch) x \(tokens)")
        self.batch = batch
        self.tokens = tokens
        starts = (0..<batch).map { $0 * tokens }
        lengths = Array(repeating: tokens, count: batch)
        paddedRows = (0..<Int32(batch * tokens)).map { $0 }
        count = batch * tokens
        pieces = pieceSamples.map { RowPieces(rows: batch * tokens, each: $0 * tokens) }
        isPadded = true
    }

    /// The valid tokens of `mask` ([B, T], non-zero: valid) packed, each sample's in order. Samples are
    /// grouped by `pieceSamples` (the gradient pieces; nil: the batch in one group, and one piece), and
    /// each group's rows are rounded up to a multiple of `rowMultiple` by rows of no sample.
    public init(mask: UnsafePointer<Int32>, batch: Int, tokens: Int, pieceSamples: Int?) {
        precondition(batch > 0 && tokens > 0, "token rows of \(batch) x \(tokens)")
        let group = pieceSamples ?? batch
        precondition(group > 0 && batch % group == 0, "\(batch) samples in pieces of \(group)")
        self.batch = batch
        self.tokens = tokens
        var starts = [Int](), lengths = [Int](), paddedRows = [Int32](), bounds = [0]
        paddedRows.reserveCapacity(batch * tokens + batch / group * Self.rowMultiple)
        for b in 0..<batch {
            starts.append(paddedRows.count)
            for t in 0..<tokens where mask[b * tokens + t] != 0 { paddedRows.append(Int32(b * tokens + t)) }
            lengths.append(paddedRows.count - starts[b])
            if (b + 1) % group == 0 {
                let rounded = (paddedRows.count + Self.rowMultiple - 1) / Self.rowMultiple * Self.rowMultiple
                paddedRows.append(contentsOf: repeatElement(-1, count: rounded - paddedRows.count))
                if paddedRows.count > bounds[bounds.count - 1] { bounds.append(paddedRows.count) }
            }
        }
        self.starts = starts
        self.lengths = lengths
        self.paddedRows = paddedRows
        count = paddedRows.count
        pieces = pieceSamples == nil ? nil : RowPieces(bounds: bounds)
        // Every token valid and no group rounded: the padded layout itself (its pieces too).
        isPadded = count == batch * tokens && lengths.allSatisfy { $0 == tokens }
    }

    /// The most rows a packed batch of `batch` x `tokens` takes (every token valid, every group rounded up).
    public static func capacity(batch: Int, tokens: Int, pieceSamples: Int?) -> Int {
        let groups = batch / (pieceSamples ?? batch)
        return batch * tokens + groups * (rowMultiple - 1)
    }

    /// The rows of `range` in runs `body(first, end, sample, position)`: rows first ..< end of one sample
    /// at consecutive positions from `position` (its token index), or of no sample (nil, position 0).
    public func runs(in range: Range<Int>, _ body: (Int, Int, Int?, Int) -> Void) {
        var r = range.lowerBound
        // The last sample that starts at or before r.
        var b = max(0, upperBound(starts, r) - 1)
        while r < range.upperBound {
            while b + 1 < batch && starts[b + 1] <= r { b += 1 }
            let sampleEnd = starts[b] + lengths[b]
            if r >= starts[b] && r < sampleEnd {
                var end = r + 1
                while end < min(range.upperBound, sampleEnd) && paddedRows[end] == paddedRows[end - 1] + 1 { end += 1 }
                body(r, end, b, Int(paddedRows[r]) - b * tokens)
                r = end
            } else {
                let end = min(range.upperBound, b + 1 < batch ? starts[b + 1] : count)
                body(r, end, nil, 0)
                r = end
            }
        }
    }

    /// The number of elements of `sorted` at or below `value`.
    private func upperBound(_ sorted: [Int], _ value: Int) -> Int {
        var lo = 0, hi = sorted.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if sorted[mid] <= value { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// padded ([B*T, columns]) = the rows ([count, columns]) in their padded places, zero elsewhere.
    public func scatter<Element: BitwiseCopyable>(_ rows: UnsafePointer<Element>, into padded: UnsafeMutablePointer<Element>, columns: Int) {
        let bytes = columns * MemoryLayout<Element>.stride
        Parallel.chunks(batch, cost: tokens * columns) { samples in
            for b in samples {
                let first = b * tokens
                UnsafeMutableRawPointer(padded + first * columns).initializeMemory(as: UInt8.self, repeating: 0, count: tokens * bytes)
                for r in starts[b]..<(starts[b] + lengths[b]) {
                    (padded + Int(paddedRows[r]) * columns).update(from: rows + r * columns, count: columns)
                }
            }
        }
    }

    /// rows ([count, columns]) = their padded places' ([B*T, columns]), zero for rows of no sample.
    public func gather<Element: BitwiseCopyable>(_ padded: UnsafePointer<Element>, into rows: UnsafeMutablePointer<Element>, columns: Int) {
        let bytes = columns * MemoryLayout<Element>.stride
        Parallel.chunks(count, cost: columns) { range in
            for r in range {
                let p = Int(paddedRows[r])
                if p >= 0 {
                    (rows + r * columns).update(from: padded + p * columns, count: columns)
                } else {
                    UnsafeMutableRawPointer(rows + r * columns).initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
                }
            }
        }
    }
}
