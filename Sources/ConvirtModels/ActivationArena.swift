// One allocation for a model's activations, their gradients and the state a layer keeps from forward
// to backward, cut into named views by a table built once per (config, batch): llm.c's `act_sizes`.
// The reference models (`ReferenceResNet`, `ReferenceBERT`, `ReferenceConVIRT`) hold every buffer there,
// each view written by one layer and read by the layers after it, so that who owns a buffer is the
// table's line; the fast models' plans (`BufferPlan`) bind their buffers to rooms of one.

import ConvirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The views of an activation arena, in order: names, element types, shapes and byte offsets.
public struct ActivationTable: Sendable {
    public enum Element: Sendable { case float, int32, double, bf16
        var size: Int { switch self { case .double: 8; case .bf16: 2; default: 4 } }
    }

    public struct View: Sendable, Equatable {
        public let name: String
        public let shape: [Int]
        public let element: Element
        /// Byte offset in the arena (64-byte aligned).
        public let offset: Int
        public var count: Int { shape.reduce(1, *) }
        public var bytes: Int { count * element.size }
    }

    public private(set) var views: [View] = []
    /// Bytes of the whole arena.
    public private(set) var bytes = 0

    public init() {}

    /// Appends a view of `shape` (64-byte aligned) and returns it.
    public mutating func add(_ name: String, _ shape: [Int], _ element: Element = .float) -> View {
        precondition(shape.allSatisfy { $0 >= 0 }, "activation view \(name): negative size in \(shape)")
        let view = View(name: name, shape: shape, element: element, offset: (bytes + 63) / 64 * 64)
        views.append(view)
        bytes = view.offset + view.bytes
        return view
    }
}

/// The storage of an `ActivationTable`: one allocation of anonymous pages, which read as zero and take
/// memory only once written (a view no pass writes, such as a copy another route replaces, costs none).
public final class ActivationArena {
    public let table: ActivationTable
    private let base: UnsafeMutableRawPointer
    private let length: Int

    public init(_ table: ActivationTable) {
        self.table = table
        length = max(table.bytes, 64)
        guard let memory = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              memory != UnsafeMutableRawPointer(bitPattern: -1) else {
            fatalError("activation arena: no memory for \(length) bytes (errno \(errno))")
        }
        base = memory
        // Each view is bound to its element type once; views never overlap (fresh pages are zero).
        for v in table.views {
            switch v.element {
            case .float: (base + v.offset).bindMemory(to: Float.self, capacity: v.count)
            case .int32: (base + v.offset).bindMemory(to: Int32.self, capacity: v.count)
            case .double: (base + v.offset).bindMemory(to: Double.self, capacity: v.count)
            case .bf16: (base + v.offset).bindMemory(to: UInt16.self, capacity: v.count)
            }
        }
    }

    deinit { munmap(base, length) }

    /// The view's memory, for a buffer bound to it (`Scratch.bind`), which must read it as its element type.
    func memory(_ view: ActivationTable.View) -> UnsafeMutableRawPointer { base + view.offset }

    public subscript(_ view: ActivationTable.View) -> UnsafeMutablePointer<Float> {
        precondition(view.element == .float, "\(view.name) holds no floats")
        return (base + view.offset).assumingMemoryBound(to: Float.self)
    }

    public func int32s(_ view: ActivationTable.View) -> UnsafeMutablePointer<Int32> {
        precondition(view.element == .int32, "\(view.name) holds no Int32s")
        return (base + view.offset).assumingMemoryBound(to: Int32.self)
    }

    public func doubles(_ view: ActivationTable.View) -> UnsafeMutableBufferPointer<Double> {
        precondition(view.element == .double, "\(view.name) holds no doubles")
        return UnsafeMutableBufferPointer(start: (base + view.offset).assumingMemoryBound(to: Double.self), count: view.count)
    }

    /// Sets the views to zero (the gradients before a backward pass, which every layer adds to).
    public func zero(_ views: [ActivationTable.View]) {
        for v in views {
            switch v.element {
            case .float: self[v].update(repeating: 0, count: v.count)
            case .int32: int32s(v).update(repeating: 0, count: v.count)
            case .double: doubles(v).update(repeating: 0)
            case .bf16: (base + v.offset).assumingMemoryBound(to: UInt16.self).update(repeating: 0, count: v.count)
            }
        }
    }
}
