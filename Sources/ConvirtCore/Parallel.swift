import CDNNL
import CKernels

/// Data parallelism for every kernel: products (split into blocks of rows or columns, see `sgemm`),
/// BatchNorm, im2col and the pointwise layers. Work is split by independent units (channels, rows,
/// element ranges, blocks of a product), and every unit is computed as in one thread. The chunks run on
/// libgomp's team, the OpenMP threads oneDNN's primitives run on: one set of N threads for a rank's
/// whole step (before, Dispatch's pool ran our loops beside oneDNN's idle, spinning or sleeping, team).
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
        region(count, parts: min(t, count), body)
    }

    /// body(part, range) for the `parts` equal chunks of 0..<count, on oneDNN's OpenMP team: the same
    /// threads run our loops and oneDNN's primitives, so neither waits for the other's threads to yield
    /// a core. A smaller team (a region inside a region) takes several parts per thread.
    @usableFromInline
    static func region(_ count: Int, parts: Int, _ body: (Int, Range<Int>) -> Void) {
        withoutActuallyEscaping(body) { body in
            var work = Region(count: count, parts: parts, body: body)
            withUnsafeMutablePointer(to: &work) { pointer in
                GOMP_parallel({ raw in
                    let work = raw!.assumingMemoryBound(to: Region.self).pointee
                    let team = max(Int(omp_get_num_threads()), 1)
                    var part = Int(omp_get_thread_num())
                    while part < work.parts {
                        let lo = work.count * part / work.parts, hi = work.count * (part + 1) / work.parts
                        if lo < hi { work.body(part, lo..<hi) }
                        part += team
                    }
                }, pointer, UInt32(parts), 0)
            }
        }
    }

    /// Uses `count` threads for every kernel, products included; OpenBLAS itself stays single-threaded,
    /// and oneDNN's OpenMP team, which also runs our loops, has `count` threads.
    public static func setThreads(_ count: Int) {
        threads = max(1, count)
        BLASThreads.set(1)
        DNNL.setThreads(threads)
    }

    /// A warning where the threads outnumber the CPUs this process may run on (its affinity mask): they
    /// then take turns on them, and a step runs at a fraction of its speed (`mpirun -np 1 convirt train
    /// --threads 2`, bound to one core by Open MPI's default, ran the paper preset at 3.4 pairs/s
    /// against 9.6 with `--bind-to none` on a 2-core AMD EPYC). nil where every thread has a CPU.
    public static var affinityWarning: String? {
        let cpus = ck_available_cpus()
        guard threads > cpus else { return nil }
        return "warning: \(threads) threads per rank, but this process may run on \(cpus) CPU\(cpus == 1 ? "" : "s") (its affinity mask), "
            + "so its threads take turns and every step is slower. mpirun binds each rank to one core by default with 2 ranks or "
            + "fewer: start it with --bind-to none (or --map-by slot:PE=\(threads))."
    }
}

/// One parallel region's work, handed to the OpenMP team by pointer.
private struct Region {
    let count: Int, parts: Int
    let body: (Int, Range<Int>) -> Void
}
