import Dispatch

/// Data parallelism for every kernel: products (split into blocks of rows or columns, see `sgemm`),
/// BatchNorm, im2col and the pointwise layers. Work is split by independent units (channels, rows,
/// element ranges, blocks of a product), and every unit is computed as in one thread.
public enum Parallel {
    nonisolated(unsafe) public static var threads = 1

    /// Runs body(range) over contiguous chunks of 0..<count, concurrently when there is enough work
    /// (`cost` is the work per unit in rough element-operations; small jobs stay on this thread).
    @inlinable
    public static func chunks(_ count: Int, cost: Int = 1, _ body: (Range<Int>) -> Void) {
        indexedChunks(count, cost: cost) { _, range in body(range) }
    }

    /// As `chunks`, also passing the chunk's index in 0..<threads (for per-thread scratch space).
    @inlinable
    public static func indexedChunks(_ count: Int, cost: Int = 1, _ body: (Int, Range<Int>) -> Void) {
        let t = threads
        if t <= 1 || count < 2 || count * cost < 32_768 {
            body(0, 0..<count)
            return
        }
        let parts = min(t, count)
        withoutActuallyEscaping(body) { body in
            let box = UncheckedBox(body)
            DispatchQueue.concurrentPerform(iterations: parts) { part in
                let lo = count * part / parts, hi = count * (part + 1) / parts
                if lo < hi { box.value(part, lo..<hi) }
            }
        }
    }

    /// Uses `count` threads for every kernel, products included; OpenBLAS itself stays single-threaded,
    /// and oneDNN's OpenMP team has `count` threads (its primitives never run beside our own loops).
    public static func setThreads(_ count: Int) {
        threads = max(1, count)
        BLASThreads.set(1)
        DNNL.setThreads(threads)
    }
}

/// Hands a non-Sendable value to concurrent work that the caller keeps race-free.
@usableFromInline
struct UncheckedBox<T>: @unchecked Sendable {
    @usableFromInline let value: T
    @usableFromInline init(_ value: T) { self.value = value }
}
