/// Element types a `Tensor` can hold: plain numbers that are copied bit for bit.
public protocol TensorElement: BitwiseCopyable, Numeric, Sendable {
    /// Name in the safetensors dtype vocabulary (`F32`, `F64`, `I32`, `I64`, `U8`).
    static var dtypeName: String { get }
}
extension Float: TensorElement { public static var dtypeName: String { "F32" } }
extension Double: TensorElement { public static var dtypeName: String { "F64" } }
extension Int32: TensorElement { public static var dtypeName: String { "I32" } }
extension Int64: TensorElement { public static var dtypeName: String { "I64" } }
extension UInt8: TensorElement { public static var dtypeName: String { "U8" } }

/// Owns one aligned, contiguous allocation. Tensors share it until one of them writes.
public final class TensorStorage<Element: TensorElement>: @unchecked Sendable {
    public let pointer: UnsafeMutablePointer<Element>
    public let count: Int

    public init(count: Int) {
        precondition(count >= 0, "negative tensor size")
        self.count = count
        let bytes = max(count, 1) * MemoryLayout<Element>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        self.pointer = raw.bindMemory(to: Element.self, capacity: max(count, 1))
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }

    @usableFromInline func copy() -> TensorStorage {
        let result = TensorStorage(count: count)
        result.pointer.update(from: pointer, count: count)
        return result
    }
}

/// A dense row-major (C order) tensor with copy-on-write value semantics.
///
/// Hot code reaches the numbers through `withUnsafeBufferPointer` / `withUnsafeMutableBufferPointer`,
/// which check uniqueness once per call, never per element.
public struct Tensor<Element: TensorElement>: @unchecked Sendable {
    public private(set) var shape: [Int]
    @usableFromInline var storage: TensorStorage<Element>

    /// A tensor of `shape` filled with `value`.
    public init(shape: [Int], repeating value: Element = .zero) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(describe(shape: shape))")
        self.shape = shape
        self.storage = TensorStorage(count: shape.reduce(1, *))
        storage.pointer.initialize(repeating: value, count: storage.count)
    }

    /// A tensor of `shape` holding `values` in row-major order.
    public init(shape: [Int], _ values: [Element]) throws {
        try require(shape.allSatisfy { $0 >= 0 }, "tensor", "negative dimension in \(describe(shape: shape))")
        let count = shape.reduce(1, *)
        try require(values.count == count, "tensor", "\(values.count) values do not fill shape \(describe(shape: shape)) (\(count) elements)")
        self.shape = shape
        self.storage = TensorStorage(count: count)
        values.withUnsafeBufferPointer { storage.pointer.initialize(from: $0.baseAddress!, count: count) }
    }

    /// A tensor of `shape` whose elements are `body(i)` for i in row-major order.
    public init(shape: [Int], generator body: (Int) -> Element) {
        self.init(shape: shape)
        let pointer = storage.pointer
        for i in 0..<storage.count { pointer[i] = body(i) }
    }

    public var count: Int { storage.count }
    public var rank: Int { shape.count }
    public var scalars: [Element] { Array(UnsafeBufferPointer(start: storage.pointer, count: storage.count)) }

    public subscript(flat index: Int) -> Element {
        get { precondition(index >= 0 && index < count, "index \(index) out of range for \(count) elements"); return storage.pointer[index] }
        set {
            precondition(index >= 0 && index < count, "index \(index) out of range for \(count) elements")
            makeUnique()
            storage.pointer[index] = newValue
        }
    }

    @inlinable
    public func withUnsafeBufferPointer<R>(_ body: (UnsafeBufferPointer<Element>) throws -> R) rethrows -> R {
        try body(UnsafeBufferPointer(start: storage.pointer, count: storage.count))
    }

    @inlinable
    public mutating func withUnsafeMutableBufferPointer<R>(_ body: (UnsafeMutableBufferPointer<Element>) throws -> R) rethrows -> R {
        makeUnique()
        return try body(UnsafeMutableBufferPointer(start: storage.pointer, count: storage.count))
    }

    @inlinable
    public mutating func makeUnique() {
        if !isKnownUniquelyReferenced(&storage) { storage = storage.copy() }
    }

    /// The same elements under another shape with the same element count.
    public func reshaped(_ newShape: [Int]) throws -> Tensor {
        try require(newShape.reduce(1, *) == count, "reshape", "cannot view \(describe(shape: shape)) as \(describe(shape: newShape))")
        var result = self
        result.shape = newShape
        return result
    }

    /// Throws unless the shape is exactly `expected`, naming the tensor.
    public func expectShape(_ expected: [Int], _ name: String) throws {
        try require(shape == expected, name, "expected shape \(describe(shape: expected)), got \(describe(shape: shape))")
    }

    /// Throws unless the rank is `rank`, naming the tensor and the meaning of its axes.
    public func expectRank(_ rank: Int, _ name: String, axes: String) throws {
        try require(shape.count == rank, name, "expected a rank-\(rank) tensor \(axes), got shape \(describe(shape: shape))")
    }
}

extension Tensor: Equatable where Element: Equatable {
    public static func == (a: Tensor, b: Tensor) -> Bool { a.shape == b.shape && a.scalars == b.scalars }
}

extension Tensor where Element == Float {
    /// Uniform values in [low, high) drawn from a counter-based stream.
    public static func uniform(shape: [Int], low: Float = -1, high: Float = 1, stream: RandomStream) -> Tensor {
        Tensor(shape: shape) { i in low + (high - low) * stream.uniform(at: UInt64(i)) }
    }

    /// Standard normal values times `scale` drawn from a counter-based stream.
    public static func normal(shape: [Int], scale: Float = 1, stream: RandomStream) -> Tensor {
        Tensor(shape: shape) { i in scale * stream.normal(at: UInt64(i)) }
    }
}
