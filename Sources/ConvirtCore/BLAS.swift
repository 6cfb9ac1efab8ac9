import COpenBLAS

/// Row-major single-precision matrix product through OpenBLAS:
/// C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C, with leading dimensions in elements.
///
/// OpenBLAS itself runs single-threaded: with `Parallel.threads` > 1 a large product is split into
/// row (or column) blocks of C, one single-threaded sgemm each, on the same threads as every other
/// parallel loop. (OpenBLAS's own worker threads spin for a long while after each call and fight the
/// BatchNorm and im2col loops for the cores.) `parallel: false` keeps a call on this thread, for calls
/// made from inside a parallel loop.
@inlinable
public func sgemm(
    transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int,
    alpha: Float = 1, a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
    beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int, parallel: Bool = true
) {
    let threads = Parallel.threads
    if parallel && threads > 1 && m * n * max(k, 1) >= 1 << 21 {
        if m >= 8 * threads || m >= n {
            // Row blocks of C: rows of op(A).
            Parallel.chunks(m, cost: 1 << 20) { rows in
                let aBlock = transposeA ? a + rows.lowerBound : a + rows.lowerBound * lda
                serialSgemm(transposeA: transposeA, transposeB: transposeB, m: rows.count, n: n, k: k, alpha: alpha,
                            a: aBlock, lda: lda, b: b, ldb: ldb, beta: beta, c: c + rows.lowerBound * ldc, ldc: ldc)
            }
        } else {
            // Column blocks of C: columns of op(B).
            Parallel.chunks(n, cost: 1 << 20) { columns in
                let bBlock = transposeB ? b + columns.lowerBound * ldb : b + columns.lowerBound
                serialSgemm(transposeA: transposeA, transposeB: transposeB, m: m, n: columns.count, k: k, alpha: alpha,
                            a: a, lda: lda, b: bBlock, ldb: ldb, beta: beta, c: c + columns.lowerBound, ldc: ldc)
            }
        }
        return
    }
    serialSgemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, alpha: alpha,
                a: a, lda: lda, b: b, ldb: ldb, beta: beta, c: c, ldc: ldc)
}

@inlinable
public func serialSgemm(
    transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int,
    alpha: Float, a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
    beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
) {
    if m == 0 || n == 0 { return }
    if k == 0 {
        // BLAS leaves C untouched when k == 0 only if beta == 1; make the product of nothing explicit.
        if beta == 0 {
            for i in 0..<m { (c + i * ldc).update(repeating: 0, count: n) }
        } else if beta != 1 {
            for i in 0..<m { for j in 0..<n { c[i * ldc + j] *= beta } }
        }
        return
    }
    cblas_sgemm(
        CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
        Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

/// Number of threads OpenBLAS uses for one product. convirt keeps it at 1 and parallelises products
/// itself (see `sgemm` and `Parallel.setThreads`).
public enum BLASThreads {
    public static func set(_ count: Int) { openblas_set_num_threads(Int32(max(1, count))) }
    public static var current: Int { Int(openblas_get_num_threads()) }
    public static var configuration: String { String(cString: openblas_get_config()) }
}
