import COpenBLAS

/// The shape and scalars of a row-major matrix product, as BLAS's:
/// C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C, op transposing where asked.
public struct Product: Hashable, Sendable {
    public var m, n, k: Int
    public var transposeA, transposeB: Bool
    public var alpha, beta: Float

    @inlinable
    public init(m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false, alpha: Float = 1, beta: Float = 0) {
        self.m = m; self.n = n; self.k = k
        self.transposeA = transposeA; self.transposeB = transposeB
        self.alpha = alpha; self.beta = beta
    }

    /// op(A) as stored: rows x columns.
    @inlinable public var aStored: (rows: Int, columns: Int) { transposeA ? (k, m) : (m, k) }
    /// op(B) as stored: rows x columns.
    @inlinable public var bStored: (rows: Int, columns: Int) { transposeB ? (n, k) : (k, n) }
}

/// A matrix operand stored by rows: its first element and its leading dimension (the elements from
/// one stored row to the next).
public struct Matrix {
    public var base: UnsafePointer<Float>
    public var ld: Int
    @inlinable public init(_ base: UnsafePointer<Float>, ld: Int) { self.base = base; self.ld = ld }
}

/// A product's output, stored by rows as `Matrix`.
public struct MutableMatrix {
    public var base: UnsafeMutablePointer<Float>
    public var ld: Int
    @inlinable public init(_ base: UnsafeMutablePointer<Float>, ld: Int) { self.base = base; self.ld = ld }
}

/// The product `p` in fp32 through OpenBLAS, leading dimensions in elements.
///
/// OpenBLAS itself runs single-threaded: with `Parallel.threads` > 1 a large product is split into
/// row (or column) blocks of C, one single-threaded sgemm each, on the same threads as every other
/// parallel loop. (OpenBLAS's own worker threads spin for a long while after each call and fight the
/// BatchNorm and im2col loops for the cores.) `parallel: false` keeps a call on this thread, for calls
/// made from inside a parallel loop.
@inlinable
public func sgemm(_ p: Product, a: Matrix, b: Matrix, c: MutableMatrix, parallel: Bool = true) {
    let threads = Parallel.threads
    if parallel && threads > 1 && p.m * p.n * max(p.k, 1) >= 1 << 21 {
        if p.m >= 8 * threads || p.m >= p.n {
            // Row blocks of C: rows of op(A).
            Parallel.chunks(p.m, cost: 1 << 20) { rows in
                var block = p
                block.m = rows.count
                let aBlock = p.transposeA ? a.base + rows.lowerBound : a.base + rows.lowerBound * a.ld
                serialSgemm(block, a: Matrix(aBlock, ld: a.ld), b: b, c: MutableMatrix(c.base + rows.lowerBound * c.ld, ld: c.ld))
            }
        } else {
            // Column blocks of C: columns of op(B).
            Parallel.chunks(p.n, cost: 1 << 20) { columns in
                var block = p
                block.n = columns.count
                let bBlock = p.transposeB ? b.base + columns.lowerBound * b.ld : b.base + columns.lowerBound
                serialSgemm(block, a: a, b: Matrix(bBlock, ld: b.ld), c: MutableMatrix(c.base + columns.lowerBound, ld: c.ld))
            }
        }
        return
    }
    serialSgemm(p, a: a, b: b, c: c)
}

/// `sgemm` on this thread.
@inlinable
public func serialSgemm(_ p: Product, a: Matrix, b: Matrix, c: MutableMatrix) {
    if p.m == 0 || p.n == 0 { return }
    if p.k == 0 {
        // BLAS leaves C untouched when k == 0 only if beta == 1; make the product of nothing explicit.
        if p.beta == 0 {
            for i in 0..<p.m { (c.base + i * c.ld).update(repeating: 0, count: p.n) }
        } else if p.beta != 1 {
            for i in 0..<p.m { for j in 0..<p.n { c.base[i * c.ld + j] *= p.beta } }
        }
        return
    }
    cblas_sgemm(
        CblasRowMajor, p.transposeA ? CblasTrans : CblasNoTrans, p.transposeB ? CblasTrans : CblasNoTrans,
        Int32(p.m), Int32(p.n), Int32(p.k), p.alpha, a.base, Int32(a.ld), b.base, Int32(b.ld), p.beta, c.base, Int32(c.ld))
}

/// Number of threads OpenBLAS uses for one product. convirt keeps it at 1 and parallelises products
/// itself (see `sgemm` and `Parallel.setThreads`).
public enum BLASThreads {
    public static func set(_ count: Int) { openblas_set_num_threads(Int32(max(1, count))) }
    public static var current: Int { Int(openblas_get_num_threads()) }
    public static var configuration: String { String(cString: openblas_get_config()) }
}
