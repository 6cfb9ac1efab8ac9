import CKernels
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One flat allocation for every parameter, and one each for gradients and the two Adam moments,
/// with a name table (llm.c's layout, DESIGN.md invariant 3). Zeroing gradients is one fill, the
/// optimizer is one loop over a range, all-reduce buckets, ZeRO-1 shards and checkpoint shards are
/// ranges, and export walks the name table.
public struct ParameterLayout: Sendable {
    /// What an entry is: a trained parameter, a frozen parameter (no gradient, not in the optimizer),
    /// or a buffer such as BatchNorm running statistics (saved and restored, never trained).
    public enum Kind: String, Sendable, Codable { case trainable, frozen, buffer }

    public struct Entry: Sendable, Equatable {
        public let name: String
        public let shape: [Int]
        public let offset: Int
        public let kind: Kind
        public var count: Int { shape.reduce(1, *) }
        public var range: Range<Int> { offset..<(offset + count) }
    }

    public private(set) var entries: [Entry] = []
    public private(set) var totalCount = 0
    /// The largest arena (in floats) a layout may describe.
    public static let maximumCount = 1 << 36
    private var index: [String: Int] = [:]
    /// Offsets are rounded up to this many floats (16 floats = 64 bytes) so that every view is aligned.
    public let alignment: Int

    public init(alignment: Int = 16) { self.alignment = max(1, alignment) }

    /// Appends an entry and returns it. Names are unique.
    @discardableResult
    public mutating func add(_ name: String, shape: [Int], kind: Kind = .trainable) throws -> Entry {
        try require(index[name] == nil, "parameter layout", "duplicate parameter name \(name)")
        try require(shape.allSatisfy { $0 > 0 }, "parameter layout", "\(name) has an invalid shape \(describe(shape: shape))")
        // No model this program trains comes near 2^36 floats (256 GiB); sizes from files are checked here
        // before anything is allocated from them.
        guard let count = checkedProduct(shape), count <= Self.maximumCount, totalCount <= Self.maximumCount - count - alignment else {
            throw ConvirtError("parameter layout: \(name) \(describe(shape: shape)) makes the model larger than \(Self.maximumCount) floats")
        }
        let offset = (totalCount + alignment - 1) / alignment * alignment
        let entry = Entry(name: name, shape: shape, offset: offset, kind: kind)
        index[name] = entries.count
        entries.append(entry)
        totalCount = offset + entry.count
        return entry
    }

    public subscript(name: String) -> Entry? { index[name].map { entries[$0] } }

    /// The arena range of the entries `register` adds (a block, a layer, a head: what backward announces
    /// as finished in one piece, `PassContext.gradientsReady`).
    public mutating func group<T>(_ register: (inout ParameterLayout) throws -> T) rethrows -> (T, Range<Int>) {
        let start = totalCount
        let value = try register(&self)
        return (value, start..<totalCount)
    }

    /// The indices of the entries that lie inside `range`, in offset order.
    public func entryIndices(in range: Range<Int>) -> Range<Int> {
        // Entries are in offset order: two binary searches.
        func firstIndex(_ isAfter: (Entry) -> Bool) -> Int {
            var lo = 0, hi = entries.count
            while lo < hi { let mid = (lo + hi) / 2; if isAfter(entries[mid]) { hi = mid } else { lo = mid + 1 } }
            return lo
        }
        let first = firstIndex { $0.offset >= range.lowerBound }
        let end = firstIndex { $0.offset >= range.lowerBound && $0.offset + $0.count > range.upperBound }
        return first..<max(first, end)
    }

    /// Marks an existing entry frozen or trainable (used to freeze BERT's embeddings and first layers).
    public mutating func setKind(_ kind: Kind, for name: String) throws {
        guard let i = index[name] else { throw ConvirtError("parameter layout: no parameter named \(name)") }
        let e = entries[i]
        entries[i] = Entry(name: e.name, shape: e.shape, offset: e.offset, kind: kind)
    }

    /// Element count of the trainable entries.
    public var trainableCount: Int { entries.lazy.filter { $0.kind == .trainable }.reduce(0) { $0 + $1.count } }
}

/// A view of one named tensor inside the arena: an offset and a shape, valid for params, grads, m and v.
public struct ParameterView: Sendable {
    public let entry: ParameterLayout.Entry
    public var offset: Int { entry.offset }
    public var count: Int { entry.count }
    public var shape: [Int] { entry.shape }
}

/// The storage behind a `ParameterLayout`: four 64-byte-aligned Float buffers of the same size.
public final class ParameterArena: @unchecked Sendable {
    public let layout: ParameterLayout
    public let count: Int
    /// The parameters (and buffers): the arena's own pages, or memory another owner keeps (`adoptParameters`).
    private var parameterStorage: UnsafeMutablePointer<Float>
    private var parameterOwner: AnyObject? = nil
    /// The gradients: the arena's own pages, or memory another owner keeps (`adoptGradients`).
    public private(set) var grads: UnsafeMutablePointer<Float>
    /// The owner of `grads` where the arena does not own them.
    private var gradientOwner: AnyObject? = nil

    /// The arena range whose Adam moments this process holds: everything, or one ZeRO-1 shard.
    public private(set) var optimizerRange: Range<Int>
    /// Adam's first and second moments of `optimizerRange`, from its first element on.
    private var momentBases: (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>)

    /// The parameters and buffers, to read.
    public var params: UnsafePointer<Float> { UnsafePointer(parameterStorage) }

    /// The parameters to write where any entry may change, the frozen ones included: initialization, a
    /// load, a restore, a broadcast, a test's perturbation. Taking it is a change of the frozen entries
    /// (`frozenVersion`).
    public var mutableParams: UnsafeMutablePointer<Float> {
        frozenVersion = Self.newVersion()
        return parameterStorage
    }

    /// The parameters to write where training changes them and leaves every frozen entry as it is: the
    /// optimizer's update of the trainable entries, their copies between ranks, BatchNorm's running
    /// statistics (buffers).
    public var trainingParams: UnsafeMutablePointer<Float> { parameterStorage }

    /// Changes whenever the frozen entries may have (`mutableParams` was taken), so that a copy made of
    /// them (a frozen layer's bf16 weights) is known to be current while it is the same: the frozen
    /// entries are otherwise written by nothing. Drawn from one counter for the process, so that no two
    /// arenas (one freed, one made at its address) ever share a version.
    public private(set) var frozenVersion: UInt64 = ParameterArena.newVersion()

    private static let versions = Atomic<UInt64>(0)
    private static func newVersion() -> UInt64 { versions.add(1, ordering: .relaxed).newValue }

    public init(layout: ParameterLayout) {
        self.layout = layout
        self.count = layout.totalCount
        parameterStorage = Self.make(layout.totalCount)
        grads = Self.make(layout.totalCount)
        optimizerRange = 0..<layout.totalCount
        momentBases = (Self.make(layout.totalCount), Self.make(layout.totalCount))
    }

    /// `count` zero floats in anonymous pages of their own (page-aligned, so 64-byte-aligned), which
    /// take memory only once written: a frozen entry's gradient and Adam moments, which nothing writes,
    /// cost none (in the paper preset 65M of 133M floats, 0.8 GB per rank across grads and moments).
    static func make(_ count: Int) -> UnsafeMutablePointer<Float> {
        let bytes = max(1, count) * 4
        guard let raw = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != UnsafeMutableRawPointer(bitPattern: -1) else {
            fatalError("parameter arena: no memory for \(bytes) bytes (errno \(errno))")
        }
        return raw.bindMemory(to: Float.self, capacity: max(1, count))
    }

    /// Gives back a buffer of `make(count)`.
    static func free(_ p: UnsafeMutablePointer<Float>, _ count: Int) {
        munmap(UnsafeMutableRawPointer(p), max(1, count) * 4)
    }

    /// ZeRO-1: keep the Adam moments of `range` only (freeing the rest); `moments(at:)` then serves
    /// offsets in `range` alone.
    public func shardOptimizerState(_ range: Range<Int>) {
        precondition(range.lowerBound >= optimizerRange.lowerBound && range.upperBound <= optimizerRange.upperBound,
                     "optimizer shard outside the arena")
        let m = Self.make(range.count), v = Self.make(range.count)
        let (oldM, oldV) = moments(at: range.lowerBound)
        m.update(from: oldM, count: range.count)
        v.update(from: oldV, count: range.count)
        Self.free(momentBases.0, optimizerRange.count)
        Self.free(momentBases.1, optimizerRange.count)
        momentBases = (m, v)
        optimizerRange = range
    }

    /// Adam's first and second moments of arena element `offset` and the ones after it, up to the end of
    /// `optimizerRange` (the offset must lie in it, or be its end).
    public func moments(at offset: Int) -> (m: UnsafeMutablePointer<Float>, v: UnsafeMutablePointer<Float>) {
        precondition(offset >= optimizerRange.lowerBound && offset <= optimizerRange.upperBound,
                     "Adam moments of arena offset \(offset) are not held here (\(optimizerRange))")
        let k = offset - optimizerRange.lowerBound
        return (momentBases.0 + k, momentBases.1 + k)
    }

    /// Sets the Adam moments of `range` (all held ones by default) to zero.
    public func zeroMoments(_ range: Range<Int>? = nil) {
        let r = range ?? optimizerRange
        let (m, v) = moments(at: r.lowerBound)
        m.update(repeating: 0, count: r.count)
        v.update(repeating: 0, count: r.count)
    }

    /// Moves the gradients to `storage` (`count` floats, zero, which `owner` keeps mapped while the arena
    /// holds it): a shared-memory buffer every rank of a machine reads. The trainable entries' values
    /// move with them; the others' are zero in both (no kernel writes them), so their pages stay
    /// untouched. Every kernel reads `grads` when it runs, so this may happen between any two steps.
    public func adoptGradients(_ storage: UnsafeMutablePointer<Float>, owner: AnyObject) {
        for r in trainableRanges { (storage + r.lowerBound).update(from: grads + r.lowerBound, count: r.count) }
        if gradientOwner == nil { Self.free(grads, count) }
        grads = storage
        gradientOwner = owner
    }

    /// Moves the parameters, values and all, to `storage` (`count` floats, which `owner` keeps mapped
    /// while the arena holds it): a shared-memory buffer every rank of a machine reads (ZeRO-1's
    /// all-gather through shared memory). As `adoptGradients`, between any two steps.
    public func adoptParameters(_ storage: UnsafeMutablePointer<Float>, owner: AnyObject) {
        storage.update(from: parameterStorage, count: count)
        if parameterOwner == nil { Self.free(parameterStorage, count) }
        parameterStorage = storage
        parameterOwner = owner
    }

    deinit {
        if parameterOwner == nil { Self.free(parameterStorage, count) }
        if gradientOwner == nil { Self.free(grads, count) }
        for p in [momentBases.0, momentBases.1] { Self.free(p, optimizerRange.count) }
    }

    public func view(_ name: String) throws -> ParameterView {
        guard let entry = layout[name] else { throw ConvirtError("parameter arena: no parameter named \(name)") }
        return ParameterView(entry: entry)
    }

    /// Sets the gradients of the trainable entries to zero, split over the threads. Frozen parameters
    /// and buffers get no gradient (no kernel writes theirs), so theirs stay as allocated: zero. In the
    /// paper preset that is 68M of 133M floats (BERT's embeddings and first 6 layers are frozen).
    public func zeroGrads() {
        for r in trainableRanges {
            Parallel.chunks(r.count) { part in (grads + r.lowerBound + part.lowerBound).update(repeating: 0, count: part.count) }
        }
        zeroedGradients = trainableOffsets
    }

    /// The trainable entries (their offsets) whose gradient is still the zero `zeroGrads` wrote: no
    /// kernel has claimed it since.
    private var zeroedGradients = Set<Int>()
    private lazy var trainableOffsets = Set(layout.entries.lazy.filter { $0.kind == .trainable }.map(\.offset))

    /// Whether `entry`'s gradient is still the zero `zeroGrads` wrote; true once, for the first kernel
    /// that writes it, which may then overwrite it instead of adding to it (the same values, with no
    /// read of the zeros: a product without a sum post-op, a reorder without accumulation). A kernel
    /// that claims an entry writes all of it. Called from the thread that runs backward.
    public func claimZeroedGradient(_ entry: ParameterLayout.Entry) -> Bool {
        zeroedGradients.remove(entry.offset) != nil
    }

    /// A copy of one parameter as a tensor.
    public func tensor(_ name: String) throws -> Tensor<Float> {
        let v = try view(name)
        var t = Tensor<Float>(shape: v.shape)
        t.withUnsafeMutableBufferPointer { $0.baseAddress!.update(from: params + v.offset, count: v.count) }
        return t
    }

    /// Copies `values` into one parameter; the shape must match.
    public func set(_ name: String, _ values: Tensor<Float>) throws {
        let v = try view(name)
        try values.expectShape(v.shape, name)
        values.withUnsafeBufferPointer { (mutableParams + v.offset).update(from: $0.baseAddress!, count: v.count) }
    }

    /// A copy of one parameter's gradient as a tensor.
    public func gradient(_ name: String) throws -> Tensor<Float> {
        let v = try view(name)
        var t = Tensor<Float>(shape: v.shape)
        t.withUnsafeMutableBufferPointer { $0.baseAddress!.update(from: grads + v.offset, count: v.count) }
        return t
    }

    /// How many parameters and buffers (BatchNorm's running statistics) are NaN or infinite: a diverged run.
    public func nonFiniteParameterCount() -> Int { nonFiniteCount(in: [0..<count]) }

    /// How many buffers (BatchNorm's running statistics: what changes in a step besides the trainable
    /// parameters, whose count Adam returns) are NaN or infinite.
    public func nonFiniteBufferCount() -> Int { nonFiniteCount(in: bufferRanges) }
    private lazy var bufferRanges = layout.entries.filter { $0.kind == .buffer }.map(\.range)

    private func nonFiniteCount(in ranges: [Range<Int>]) -> Int {
        let p = params
        let parts = max(1, Parallel.threads)
        return withUnsafeTemporaryAllocation(of: Int.self, capacity: parts) { counts in
            counts.initialize(repeating: 0)
            for range in ranges {
                Parallel.indexedChunks(range.count) { part, chunk in counts[part] += ck_count_nonfinite(p + range.lowerBound + chunk.lowerBound, chunk.count) }
            }
            return counts.reduce(0, +)
        }
    }

    /// The trainable ranges clipped to `window` (a ZeRO-1 shard).
    public func trainableRanges(within window: Range<Int>) -> [Range<Int>] {
        trainableRanges.compactMap { r in
            let lo = max(r.lowerBound, window.lowerBound), hi = min(r.upperBound, window.upperBound)
            return lo < hi ? lo..<hi : nil
        }
    }

    /// Maximal runs of consecutive trainable entries, as arena ranges (what the optimizer walks). The
    /// alignment padding inside a run is zero in every buffer and stays zero under the optimizer.
    public var trainableRanges: [Range<Int>] {
        var result: [Range<Int>] = []
        var previousTrainable = false
        for e in layout.entries {  // entries are in offset order
            if e.kind == .trainable {
                if previousTrainable, let last = result.popLast() {
                    result.append(last.lowerBound..<e.range.upperBound)
                } else {
                    result.append(e.range)
                }
            }
            previousTrainable = e.kind == .trainable
        }
        return result
    }
}
