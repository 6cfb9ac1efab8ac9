import ConvirtCore

/// A growable, 64-byte-aligned scratch buffer for activations and their gradients. It reallocates only
/// when a larger batch than ever before arrives, so a training loop allocates nothing after its first step.
/// A model's plan may instead bind it to a room of one activation arena (`bind(to:capacity:)`), sized in
/// advance for the pass; it then owns no memory, and a request beyond its room (a plan that undercounted)
/// falls back to memory of its own and is counted in `outgrown`.
public final class Scratch<Element: BitwiseCopyable> {
    public private(set) var pointer: UnsafeMutablePointer<Element>
    public private(set) var capacity: Int
    /// Whether `pointer` is this buffer's own allocation (false: a room of an activation arena).
    private var owned = true
    /// How many times a bound buffer was asked for more than its room.
    public private(set) var outgrown = 0

    public init(_ count: Int = 0) {
        capacity = max(count, 1)
        pointer = UnsafeMutableRawPointer.allocate(byteCount: capacity * MemoryLayout<Element>.stride, alignment: 64)
            .bindMemory(to: Element.self, capacity: capacity)
    }

    deinit { if owned { UnsafeMutableRawPointer(pointer).deallocate() } }

    /// Makes room for `count` elements (contents are not kept when it grows) and returns the pointer.
    @discardableResult
    public func ensure(_ count: Int) -> UnsafeMutablePointer<Element> {
        if count > capacity {
            if owned { UnsafeMutableRawPointer(pointer).deallocate() } else { outgrown += 1 }
            owned = true
            capacity = count
            pointer = UnsafeMutableRawPointer.allocate(byteCount: capacity * MemoryLayout<Element>.stride, alignment: 64)
                .bindMemory(to: Element.self, capacity: capacity)
        }
        return pointer
    }

    /// Uses `capacity` elements at `memory` (a room of an activation arena, which must outlive this
    /// buffer's use of it) instead of memory of its own.
    public func bind(to memory: UnsafeMutableRawPointer, capacity: Int) {
        if owned { UnsafeMutableRawPointer(pointer).deallocate() }
        owned = false
        self.capacity = max(capacity, 1)
        pointer = memory.bindMemory(to: Element.self, capacity: self.capacity)
    }

    public var bytes: Int { capacity * MemoryLayout<Element>.stride }
}

extension Scratch where Element == Float {
    /// Makes room for `count` floats and sets them to zero.
    @discardableResult
    public func zeroed(_ count: Int) -> UnsafeMutablePointer<Float> {
        let p = ensure(count)
        Parallel.chunks(count) { r in (p + r.lowerBound).update(repeating: 0, count: r.count) }
        return p
    }
}

/// What a forward/backward pass needs besides its inputs: the mode, the SyncBN reducer, and the random
/// stream keys that make dropout depend only on (seed, step, global sample index), never on the rank.
public struct PassContext {
    /// Training mode: batch-statistics BatchNorm (with running-stat updates) and active dropout.
    public var training: Bool
    /// Sums BatchNorm statistics over ranks (SyncBN); nil = this rank's batch alone.
    public var reducer: StatisticsReducer?
    /// The stream of this step; dropout draws from child(globalSampleIndex, site...).
    public var stream: RandomStream
    /// The global index of each local sample, in batch order.
    public var sampleIndices: [UInt64]
    /// Called during backward with an arena range once the gradients of every parameter in it are final
    /// (a ResNet block, a BERT layer, a head: each registers its parameters consecutively, so each is
    /// one range), so that their all-reduce can start while the rest of backward runs.
    public var gradientsReady: ((Range<Int>) throws -> Void)?
    /// The arithmetic of the convolutions and matrix products (bf16: mixed precision as PyTorch's CPU
    /// autocast, see `BF16`); everything else is fp32 in either.
    public var precision: Precision
    /// The samples of one gradient piece (`GradientPieces`): in bf16, every parameter gradient that sums
    /// over this rank's samples (convolution and linear weights, biases, LayerNorm) is made of pieces of
    /// that many consecutive samples, each computed alone and added in order, so that its value does not
    /// depend on how the global batch is split over ranks. A divisor of the batch, its pieces aligned
    /// to the global sample index (the caller's guarantee); nil: the batch in one piece.
    public var gradientPiece: Int?

    public init(training: Bool, reducer: StatisticsReducer? = nil, stream: RandomStream = RandomStream(seed: 0),
                sampleIndices: [UInt64] = [], precision: Precision = .fp32, gradientPiece: Int? = nil) {
        self.training = training
        self.precision = precision
        self.reducer = reducer
        self.stream = stream
        self.sampleIndices = sampleIndices
        self.gradientPiece = gradientPiece
    }

    /// The rows of one gradient piece where each sample has `rowsPerSample` rows (tokens, or 1), in bf16;
    /// nil in fp32 (its kernels' own sums) and where the batch is one piece.
    public func pieceRows(perSample rowsPerSample: Int) -> Int? {
        guard precision == .bf16, let gradientPiece else { return nil }
        return gradientPiece * rowsPerSample
    }

    /// The gradient pieces of `samples` samples of `rowsPerSample` rows each (`pieceRows`); nil where
    /// the batch is one piece.
    public func pieces(samples: Int, rowsPerSample: Int = 1) -> RowPieces? {
        pieceRows(perSample: rowsPerSample).map { RowPieces(rows: samples * rowsPerSample, each: $0) }
    }

    /// The dropout stream of local sample `b` at dropout site `site`.
    public func stream(sample b: Int, site: UInt64) -> RandomStream {
        stream.child(b < sampleIndices.count ? sampleIndices[b] : UInt64(b), site)
    }
}
