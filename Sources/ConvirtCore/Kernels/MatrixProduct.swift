// Matrix products in either precision: fp32 on oneDNN's fp32 matmul where its kernels are AVX-512 ones
// and on OpenBLAS (`sgemm`) elsewhere (`FP32Matmul`), bf16 on oneDNN's bf16 matmul where that is the
// fast path (`BF16.native`), else bf16 computed exactly as fp32 products of inputs rounded to bf16
// values.

import CDNNL
import CKernels
#if canImport(Glibc)
import Glibc
#endif

/// The product `p` (row-major C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C) in `precision`
/// (bf16: both inputs rounded to bfloat16, the products accumulated in fp32, C in fp32).
/// `parallel: false` (a call from inside a parallel loop) stays on this thread: there bf16 is computed
/// by the emulation, since oneDNN would start an OpenMP team from every one of the loop's threads.
/// `native`: bf16 on oneDNN's bf16 kernels (default `BF16.native`; true needs `BF16.oneDNNRunsBF16`).
/// `bias` [n] (with beta 0): C = alpha op(A) op(B) + bias on every row, added in fp32 (on oneDNN inside
/// the product, on sgemm copied into C first: `fp32Product`). `copies`: A's and B's bf16 copies on
/// oneDNN, converted once for several products (`BF16Operand`).
public func gemm(_ precision: Precision, _ p: Product, a: Matrix, b: Matrix, c: MutableMatrix, bias: UnsafePointer<Float>? = nil,
                 parallel: Bool = true, native: Bool = BF16.native, copies: (a: BF16Operand.Use?, b: BF16Operand.Use?) = (nil, nil)) {
    precondition(bias == nil || p.beta == 0, "gemm: a bias with beta \(p.beta)")
    let (m, n, k) = (p.m, p.n, p.k)
    guard precision == .bf16, m > 0, n > 0, k > 0 else {
        fp32Product(p, a: a, b: b, c: c, bias: bias, parallel: parallel)
        return
    }
    let onDNNL = native && parallel
    // The stored blocks of op(A) and op(B): rows x columns with their leading dimensions.
    let (aRows, aColumns) = p.aStored, (bRows, bColumns) = p.bStored
    let scratch = ThreadScratch.current
    if onDNNL {
        let key = MatmulPrimitive.Key(m: m, n: n, k: k, transposeA: p.transposeA, transposeB: p.transposeB, ldc: c.ld, alpha: p.alpha,
                                      beta: p.beta, bias: bias != nil)
        do {
            guard let primitive = try MatmulPrimitive.cached(key) else { throw ConvirtError("oneDNN refused a bf16 matmul of \(m)x\(k)x\(n)") }
            let (a16, b16) = bf16Operands(p, a: a, b: b, copies: copies, scratch: scratch, parallel: parallel)
            try primitive.execute(a: a16, b: b16, c: c.base, bias: bias, stream: scratch.stream)
            return
        } catch {
            // A shape oneDNN refuses (none is known): the exact emulation below computes the same.
        }
    }
    let base = scratch.ensure(bytes: 4 * (m * k + k * n) + 128).bindMemory(to: Float.self, capacity: m * k + k * n + 32)
    let aRounded = base, bRounded = base + (m * k + 15) / 16 * 16
    roundedOperand(aRounded, a.base, onDNNL ? copies.a : nil, rows: aRows, columns: aColumns, ld: a.ld, parallel: parallel)
    roundedOperand(bRounded, b.base, onDNNL ? copies.b : nil, rows: bRows, columns: bColumns, ld: b.ld, parallel: parallel)
    emulatedProduct(p, a: Matrix(aRounded, ld: aColumns), b: Matrix(bRounded, ld: bColumns), c: c, bias: bias, parallel: parallel)
}

/// A bf16 product of rounded inputs on the fp32 kernels (`fp32Product`): exact products, accumulated in
/// fp32. `blocked` (a weight gradient under CONVIRT_BF16=blocked, `BF16.blockedReductions`): the sum
/// over k runs in two blocks, the first ceil(k/2) terms and the rest, each block's sum rounded to bf16
/// before the two are added in fp32 (then alpha, beta and the bias): a kernel whose sums depend on the
/// product's length.
func emulatedProduct(_ p: Product, a: Matrix, b: Matrix, c: MutableMatrix, bias: UnsafePointer<Float>? = nil, parallel: Bool,
                     blocked: Bool = false) {
    let (m, n, k) = (p.m, p.n, p.k)
    guard blocked, k > 1 else {
        fp32Product(p, a: a, b: b, c: c, bias: bias, parallel: parallel)
        return
    }
    // op(A)'s columns k0..<k1 start at column k0 (not transposed) or at row k0 (transposed); op(B)'s rows likewise.
    let split = (k + 1) / 2
    let blocks = ThreadScratch.current.reorderSlot(ThreadScratch.blockedProductSlot, bytes: 8 * m * n).bindMemory(to: Float.self, capacity: 2 * m * n)
    for (j, range) in [0..<split, split..<k].enumerated() {
        let part = blocks + j * m * n, first = range.lowerBound
        fp32Product(Product(m: m, n: n, k: range.count, transposeA: p.transposeA, transposeB: p.transposeB),
                    a: Matrix(a.base + (p.transposeA ? first * a.ld : first), ld: a.ld),
                    b: Matrix(b.base + (p.transposeB ? first : first * b.ld), ld: b.ld), c: MutableMatrix(part, ld: n), parallel: parallel)
        BF16.round(part, part, count: m * n, parallel: parallel)
    }
    for i in 0..<m {
        let row = c.base + i * c.ld, first = blocks + i * n, second = first + m * n
        for j in 0..<n {
            let value = p.alpha * (first[j] + second[j]) + (bias?[j] ?? 0)
            row[j] = p.beta == 0 ? value : value + p.beta * row[j]
        }
    }
}

/// The gradient of a product's right operand over the rows of a batch in bf16: C [m, n] = A^T B (+ C),
/// A [rows, m] and B [rows, n] stored by rows, the rows being a rank's samples or their
/// tokens (a linear layer's weight gradient: A the output gradient, B the input). The sum over the rows
/// runs in `pieces` (`GradientPieces`): each piece is a product of its own, whose shape depends on the
/// piece's samples alone, so that however the kernel blocks, orders or rounds its sum over the piece's
/// rows, a piece's sum is the same on every world size; each is added to C as the product's output
/// (beta 1: C's old values added in fp32, after the sum, as oneDNN's sum post-op and the emulation add
/// them). Ranks of any world size then differ only by the fp32 additions that join the pieces (here,
/// and in the all-reduce), as fp32 does. `overwrite`: C's old values are dropped (the first piece is
/// written with beta 0). `copies`: A's and B's bf16 copies, as `gemm`'s.
/// `blocked`: the emulation's sums as `emulatedProduct`'s under CONVIRT_BF16=blocked.
public func piecewiseGradientProduct(m: Int, n: Int, pieces: RowPieces, a: Matrix, b: Matrix, c: MutableMatrix, overwrite: Bool,
                                     native: Bool = BF16.native, blocked: Bool = BF16.blockedReductions,
                                     copies: (a: BF16Operand.Use?, b: BF16Operand.Use?) = (nil, nil)) {
    let rows = pieces.rows
    guard m > 0, n > 0 else { return }
    if rows == 0 {
        if overwrite { for i in 0..<m { (c.base + i * c.ld).update(repeating: 0, count: n) } }
        return
    }
    /// beta of the piece that starts at row `first`.
    func beta(_ first: Int) -> Float { overwrite && first == 0 ? 0 : 1 }
    let scratch = ThreadScratch.current
    if native {
        do {
            // Every piece's primitive (beta 0 for the first where it overwrites, else 1) before any runs, so
            // that a shape oneDNN refuses leaves C as it was for the emulation.
            let primitives = try pieces.ranges.map { piece in
                let key = MatmulPrimitive.Key(m: m, n: n, k: piece.count, transposeA: true, transposeB: false, ldc: c.ld, alpha: 1,
                                              beta: beta(piece.lowerBound))
                guard let primitive = try MatmulPrimitive.cached(key) else { throw ConvirtError("oneDNN refused a bf16 matmul of \(m)x\(piece.count)x\(n)") }
                return primitive
            }
            let base = scratch.ensure(bytes: 2 * rows * (m + n) + 64).bindMemory(to: UInt16.self, capacity: rows * (m + n) + 32)
            let a16 = bf16Operand(copies.a, a.base, rows: rows, columns: m, ld: a.ld, room: base, parallel: true)
            let b16 = bf16Operand(copies.b, b.base, rows: rows, columns: n, ld: b.ld, room: base + (rows * m + 31) / 32 * 32, parallel: true)
            for (piece, primitive) in zip(pieces.ranges, primitives) {
                let row = piece.lowerBound
                try primitive.execute(a: a16 + row * m, b: b16 + row * n, c: c.base, stream: scratch.stream)
            }
            return
        } catch {
            // A shape oneDNN refuses (none is known): the exact emulation below computes the same.
        }
    }
    let base = scratch.ensure(bytes: 4 * rows * (m + n) + 128).bindMemory(to: Float.self, capacity: rows * (m + n) + 32)
    let aRounded = base, bRounded = base + (rows * m + 15) / 16 * 16
    roundedOperand(aRounded, a.base, native ? copies.a : nil, rows: rows, columns: m, ld: a.ld, parallel: true)
    roundedOperand(bRounded, b.base, native ? copies.b : nil, rows: rows, columns: n, ld: b.ld, parallel: true)
    for piece in pieces.ranges {
        let first = piece.lowerBound
        emulatedProduct(Product(m: m, n: n, k: piece.count, transposeA: true, beta: beta(first)),
                        a: Matrix(aRounded + first * m, ld: m), b: Matrix(bRounded + first * n, ld: n), c: c, parallel: true, blocked: blocked)
    }
}

/// C (bf16 bits, m x n, leading dimension n) = op(A) op(B) + bias on oneDNN's bf16 kernels, each fp32
/// sum rounded once to bf16: a product whose only readers take bf16 (`Linear.forwardBF16`). With
/// `gelu`, GELU (erf) of it, a post-op of the product in fp32, rounded once: what a layer whose
/// activations nothing differentiates needs for its next product (`Linear.forwardGELU`). False where
/// the product is not on oneDNN's bf16 kernels, or oneDNN has none for the shape; nothing is written then.
func productBF16(_ p: Product, a: Matrix, b: Matrix, c: UnsafeMutablePointer<UInt16>, bias: UnsafePointer<Float>?, gelu: Bool,
                 copies: (a: BF16Operand.Use?, b: BF16Operand.Use?), native: Bool = BF16.native) -> Bool {
    precondition(p.alpha == 1 && p.beta == 0, "a bf16 output of a scaled product or a sum")
    let (m, n, k) = (p.m, p.n, p.k)
    guard native, m > 0, n > 0, k > 0 else { return false }
    let key = MatmulPrimitive.Key(m: m, n: n, k: k, transposeA: p.transposeA, transposeB: p.transposeB, ldc: n, alpha: 1, beta: 0,
                                  bias: bias != nil, output: gelu ? .geluBF16 : .bf16)
    guard let primitive = try? MatmulPrimitive.cached(key) else { return false }
    let scratch = ThreadScratch.current
    let (a16, b16) = bf16Operands(p, a: a, b: b, copies: copies, scratch: scratch, parallel: true)
    return (try? primitive.execute(a: a16, b: b16, bits: c, bias: bias, stream: scratch.stream)) != nil
}

/// op(A)'s and op(B)'s stored blocks of `p` in compact bf16: their kept copies where the caller keeps
/// them, else converted into this thread's scratch.
private func bf16Operands(_ p: Product, a: Matrix, b: Matrix, copies: (a: BF16Operand.Use?, b: BF16Operand.Use?), scratch: ThreadScratch,
                          parallel: Bool) -> (UnsafePointer<UInt16>, UnsafePointer<UInt16>) {
    let (aRows, aColumns) = p.aStored, (bRows, bColumns) = p.bStored
    let (m, n, k) = (p.m, p.n, p.k)
    let base = scratch.ensure(bytes: 2 * (m * k + k * n) + 64).bindMemory(to: UInt16.self, capacity: m * k + k * n + 32)
    return (bf16Operand(copies.a, a.base, rows: aRows, columns: aColumns, ld: a.ld, room: base, parallel: parallel),
            bf16Operand(copies.b, b.base, rows: bRows, columns: bColumns, ld: b.ld, room: base + (m * k + 31) / 32 * 32, parallel: parallel))
}

/// An operand's block (rows x columns, leading dimension ld) in compact bf16: its kept copy where the
/// caller keeps one (`copies`), else converted into `room`.
private func bf16Operand(_ use: BF16Operand.Use?, _ x: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int, room: UnsafeMutablePointer<UInt16>,
                         parallel: Bool) -> UnsafePointer<UInt16> {
    if let use { return use.operand.bits(of: x, rows: rows, columns: columns, ld: ld, reuse: use.reuse, version: use.version) }
    BF16.convertBlock(room, x, rows: rows, columns: columns, ld: ld, parallel: parallel)
    return UnsafePointer(room)
}

/// An operand's block rounded to bf16 values into the compact `dst` (the emulation's operands); an
/// operand whose layer wrote only its bf16 bits (`BF16Operand.room`) is rounded from those.
private func roundedOperand(_ dst: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ use: BF16Operand.Use?, rows: Int, columns: Int,
                            ld: Int, parallel: Bool) {
    if let use, use.reuse, let bits = use.operand.heldBits(of: x, rows: rows, columns: columns, ld: ld) {
        for i in 0..<rows * columns { dst[i] = BF16.value(bits[i]) }
    } else {
        BF16.roundBlock(dst, x, rows: rows, columns: columns, ld: ld, parallel: parallel)
    }
}

/// Where fp32 matrix products run (`gemm` in fp32, and bf16's rounded-input emulation): oneDNN's fp32
/// matmul, or OpenBLAS's sgemm split over the threads by rows or columns of C (`sgemm`).
public enum FP32Matmul {
    public enum Policy: String, Sendable, CaseIterable {
        /// oneDNN where its kernels are AVX-512 ones (brgemm), OpenBLAS elsewhere.
        case auto
        /// Every product (of a caller not inside a parallel loop) on oneDNN, on any CPU.
        case onednn
        /// Every product on OpenBLAS (the arithmetic of earlier releases).
        case openblas
    }


    /// Whether the products run on oneDNN. On a 2-core AMD EPYC (Zen 4, oneDNN 2.6.3
    /// brg:avx512_core against OpenBLAS 0.3.21's SkylakeX sgemm, 2 threads, the BERT-base shapes of
    /// batch 8 x 128 tokens, forward, input gradient and weight gradient): oneDNN 175-212 GFLOP/s
    /// against 130-183, and 1.1-1.4x on every shape but one (768x1024x3072 with A transposed: equal).
    /// Below AVX-512, oneDNN 2.6's fp32 matmul was its own gemm rather than brgemm, and 3.2's gains
    /// nothing over OpenBLAS on AVX2 (2-core AMD EPYC Zen 3, the paper step's text forward and backward,
    /// `convirt bench step --threads 2`, 4 alternated pairs: 1.30-1.56 s against 1.10-1.43): OpenBLAS stays.
    /// (oneDNN 3.2's brgemm rates on that CPU equal 2.6.3's: `tools/bench_dnnl.c`, 214-230 GFLOP/s.)
    /// CONVIRT_MATMUL (auto, onednn or openblas) overrides it; resolved once for the process (`Backend`),
    /// so that every rank of a job computes alike.
    public static var onDNNL: Bool { Backend.current.fp32Matmul == .onednn }
}

/// fp32 C[m, n] = alpha op(A) op(B) + beta C (+ bias [n] on every row, with beta 0): on oneDNN's fp32
/// matmul where `FP32Matmul.onDNNL` and `parallel` (each row of C is then computed as it would be in a
/// product of fewer rows: oneDNN's sum over k does not depend on m), else on `sgemm`. The route never
/// depends on the size: a rank's products have fewer rows the more ranks share the batch, and a rule by
/// size sent the demo preset's text products to oneDNN on one rank and to sgemm on two, whose losses
/// then parted by 2e-5 within 12 steps (1e-8 where both ranks' products ran on the same library).
func fp32Product(_ p: Product, a: Matrix, b: Matrix, c: MutableMatrix, bias: UnsafePointer<Float>? = nil, parallel: Bool) {
    if FP32Matmul.onDNNL && parallel && p.m > 0 && p.n > 0 && p.k > 0 {
        let key = MatmulPrimitive.Key(m: p.m, n: p.n, k: p.k, transposeA: p.transposeA, transposeB: p.transposeB, lda: a.ld, ldb: b.ld,
                                      ldc: c.ld, alpha: p.alpha, beta: p.beta, bias: bias != nil, operands: .fp32)
        if let primitive = try? MatmulPrimitive.cached(key),
           (try? primitive.execute(a: a.base, b: b.base, c: c.base, bias: bias, stream: ThreadScratch.current.stream)) != nil {
            return
        }
        // A shape oneDNN refuses (none is known; nothing was written): sgemm computes the same.
    }
    var p = p
    if let bias {
        precondition(p.beta == 0, "fp32Product: a bias with beta \(p.beta)")
        for r in 0..<p.m { (c.base + r * c.ld).update(from: bias, count: p.n) }
        p.beta = 1
    }
    sgemm(p, a: a, b: b, c: c, parallel: parallel)
}

/// A bf16 copy of one operand of products on oneDNN, kept for the next product that reads the same
/// operand: a layer's backward reads the weights and the input its forward converted (and its two
/// products the same output gradient), so each is converted once. The caller vouches that a block it
/// reuses did not change since it was converted; a different block (pointer, shape) is converted anew.
/// A frozen layer's weights are kept from pass to pass, by version: the copy is current while the
/// version it was made at is the caller's (`ParameterArena.frozenVersion`).
public final class BF16Operand {
    private var storage = UnsafeMutablePointer<UInt16>.allocate(capacity: 1)
    private var capacity = 1
    private var held: (source: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int)?
    /// The version of the source `held` was converted at, nil where none was given.
    private var heldVersion: UInt64?

    public init() {}
    deinit { storage.deallocate() }

    /// The copy used in one product: `reuse` false converts the block (its contents are new), true
    /// takes the copy as it is where it holds the same block. `version`: the source's version; a copy
    /// of the same block made at that version is taken as it is too.
    public struct Use {
        public let operand: BF16Operand
        public let reuse: Bool
        public let version: UInt64?
        public init(_ operand: BF16Operand, reuse: Bool, version: UInt64? = nil) {
            self.operand = operand; self.reuse = reuse; self.version = version
        }
    }

    /// The block rows x columns of `source` (leading dimension ld) in compact bf16.
    func bits(of source: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int, reuse: Bool, version: UInt64? = nil) -> UnsafePointer<UInt16> {
        if let held, held == (source, rows, columns, ld), reuse || (version != nil && version == heldVersion) { return UnsafePointer(storage) }
        reserve(rows * columns)
        BF16.convertBlock(storage, source, rows: rows, columns: columns, ld: ld, parallel: true)
        held = (source, rows, columns, ld)
        heldVersion = version
        return UnsafePointer(storage)
    }

    /// The bits held for that block, nil where this copy holds another.
    func heldBits(of source: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int) -> UnsafePointer<UInt16>? {
        guard let held, held == (source, rows, columns, ld) else { return nil }
        return UnsafePointer(storage)
    }

    /// Room for the bf16 bits of the compact block rows x columns of `source`, which the caller writes
    /// (the layer that computes `source` writing its bits too, e.g. `LayerNorm.forwardResidual`, or
    /// only its bits where nothing reads the floats): the next product that reuses this copy of that
    /// block takes them as they are.
    public func room(holding source: UnsafePointer<Float>, rows: Int, columns: Int) -> UnsafeMutablePointer<UInt16> {
        reserve(rows * columns)
        held = (source, rows, columns, columns)
        heldVersion = nil
        return storage
    }

    /// Room for `count` bits (the contents are not kept when it grows).
    private func reserve(_ count: Int) {
        guard count > capacity else { return }
        storage.deallocate()
        capacity = count
        storage = .allocate(capacity: capacity)
    }

    /// Bytes held.
    public var bytes: Int { 2 * capacity }
}

/// oneDNN's bf16 matmul for one shape: bf16 inputs, fp32 output, each a plain (strided) layout; alpha
/// as an output scale, beta as a sum post-op. Two-dimensional (op(A) and op(B) compact in their stored
/// layouts, C with leading dimension ldc), or batched over leading dimensions with any strides (the
/// attention products of all samples and heads in one call, reading q, k and v where they lie).
final class MatmulPrimitive: @unchecked Sendable {
    struct Key: Hashable {
        let m, n, k: Int
        /// Leading (batch) dimensions, shared by A, B and C.
        let batch: [Int]
        /// Strides of A [batch..., m, k], B [batch..., k, n] and C [batch..., m, n], in elements.
        let aStrides, bStrides, cStrides: [Int]
        let alpha, beta: Float
        /// An fp32 bias [n] added to every row of C (two-dimensional products only).
        let bias: Bool
        /// The type of A and B: bf16 (mixed precision), or fp32 (`fp32Product`).
        let operands: Precision
        /// C's values: the product (fp32), the product rounded to bf16 (an activation only the next
        /// product reads), or GELU (erf) of the product plus bias, rounded to bf16 (a frozen layer's
        /// activations for the next product, `Linear.forwardGELU`).
        let output: Output
        enum Output: Hashable { case fp32, bf16, geluBF16 }

        init(m: Int, n: Int, k: Int, batch: [Int] = [], aStrides: [Int], bStrides: [Int], cStrides: [Int], alpha: Float = 1, beta: Float = 0,
             bias: Bool = false, operands: Precision = .bf16, output: Output = .fp32) {
            self.m = m; self.n = n; self.k = k; self.batch = batch
            self.aStrides = aStrides; self.bStrides = bStrides; self.cStrides = cStrides
            self.alpha = alpha; self.beta = beta; self.bias = bias; self.operands = operands; self.output = output
        }

        /// C (m x n, leading dimension ldc) = alpha op(A) op(B) + beta C (+ bias) over op(A) and op(B)
        /// stored with leading dimensions lda and ldb (default: compact).
        init(m: Int, n: Int, k: Int, transposeA: Bool, transposeB: Bool, lda: Int? = nil, ldb: Int? = nil, ldc: Int, alpha: Float,
             beta: Float, bias: Bool = false, operands: Precision = .bf16, output: Output = .fp32) {
            let lda = lda ?? (transposeA ? m : k), ldb = ldb ?? (transposeB ? k : n)
            self.init(m: m, n: n, k: k, aStrides: transposeA ? [1, lda] : [lda, 1], bStrides: transposeB ? [1, ldb] : [ldb, 1],
                      cStrides: [ldc, 1], alpha: alpha, beta: beta, bias: bias, operands: operands, output: output)
        }
    }

    let key: Key
    let primitive: DNNLPrimitive
    let aDesc, bDesc, cDesc: DNNLDescriptor
    let biasDesc: DNNLDescriptor?
    /// alpha, where it is not 1: applied to the products' sum before the sum post-op (oneDNN's scale of
    /// the weights, a runtime argument).
    let alpha: DNNLMemory?

    init(_ key: Key) throws {
        self.key = key
        let (m, n, k) = (key.m, key.n, key.k)
        let what = "\(key.operands.rawValue) matmul \(key.batch.map(String.init).joined(separator: "x"))\(key.batch.isEmpty ? "" : " of ")\(m)x\(k) by \(k)x\(n)"
        func strided(_ rows: Int, _ columns: Int, _ strides: [Int], _ type: dnnl_data_type_t) throws -> DNNLDescriptor {
            let dims = key.batch + [rows, columns]
            try require(strides.count == dims.count, what, "\(strides.count) strides for \(dims.count) dimensions")
            return try DNNLDescriptor(dims, type, strides: strides)
        }
        let a = try strided(m, k, key.aStrides, key.operands.inputType)
        let b = try strided(k, n, key.bStrides, key.operands.inputType)
        let c = try strided(m, n, key.cStrides, key.output == .fp32 ? dnnl_f32 : dnnl_bf16)
        try require(!key.bias || key.batch.isEmpty, what, "a bias on a batched product")
        try require(key.output == .fp32 || (key.beta == 0 && key.operands == .bf16), what, "GELU on a sum or on fp32 operands")
        let biasDesc = key.bias ? try strided(1, n, [n, 1], dnnl_f32) : nil
        var attributes: dnnl_primitive_attr_t? = nil
        var postOps: dnnl_post_ops_t? = nil
        try dnnlCheck(dnnl_primitive_attr_create(&attributes), what)
        defer {
            if let postOps { dnnl_post_ops_destroy(postOps) }
            dnnl_primitive_attr_destroy(attributes)
        }
        if key.alpha != 1 {
            try dnnlCheck(dnnl_primitive_attr_set_scales_mask(attributes, cdnnl_arg_weights(), 0), what)
            let scale = try DNNLMemory(try DNNLDescriptor([1], dnnl_f32, dnnl_x), owning: true)
            guard let handle = scale.handle else { throw ConvirtError("oneDNN: \(what): no buffer for its scale") }
            handle.storeBytes(of: key.alpha, as: Float.self)
            alpha = scale
        } else {
            alpha = nil
        }
        if key.beta != 0 {
            try dnnlCheck(dnnl_post_ops_create(&postOps), what)
            try dnnlCheck(dnnl_post_ops_append_sum(postOps, key.beta, 0, dnnl_data_type_undef), what)
            try dnnlCheck(dnnl_primitive_attr_set_post_ops(attributes, postOps), what)
        } else if key.output == .geluBF16 {
            try dnnlCheck(dnnl_post_ops_create(&postOps), what)
            try dnnlCheck(dnnl_post_ops_append_eltwise(postOps, dnnl_eltwise_gelu_erf, 0, 0), what)
            try dnnlCheck(dnnl_primitive_attr_set_post_ops(attributes, postOps), what)
        }
        primitive = try DNNLPrimitive(attributes: attributes, what) { descriptor, engine, attributes in
            dnnl_matmul_primitive_desc_create(descriptor, engine, a.md, b.md, biasDesc?.md, c.md, attributes)
        }
        aDesc = a; bDesc = b; cDesc = c
        self.biasDesc = biasDesc
    }

    /// `bias`: [n], where the key has one.
    func execute(a: UnsafePointer<UInt16>, b: UnsafePointer<UInt16>, c: UnsafeMutablePointer<Float>, bias: UnsafePointer<Float>? = nil,
                 stream: DNNLStream?) throws {
        precondition(key.operands == .bf16 && key.output == .fp32, "a bf16 matmul's operands for an fp32 one")
        try execute(raw: a, b, c: c, bias: bias, stream: stream)
    }

    /// A product whose output is bf16 bits (`Output.bf16`, `.geluBF16`).
    func execute(a: UnsafePointer<UInt16>, b: UnsafePointer<UInt16>, bits c: UnsafeMutablePointer<UInt16>, bias: UnsafePointer<Float>? = nil,
                 stream: DNNLStream?) throws {
        precondition(key.operands == .bf16 && key.output != .fp32, "a bf16 output for a product with an fp32 one")
        try execute(raw: a, b, c: c, bias: bias, stream: stream)
    }

    /// An fp32 product's operands.
    func execute(a: UnsafePointer<Float>, b: UnsafePointer<Float>, c: UnsafeMutablePointer<Float>, bias: UnsafePointer<Float>? = nil,
                 stream: DNNLStream?) throws {
        precondition(key.operands == .fp32, "fp32 operands for a bf16 matmul")
        try execute(raw: a, b, c: c, bias: bias, stream: stream)
    }

    private func execute(raw a: UnsafeRawPointer, _ b: UnsafeRawPointer, c: UnsafeMutableRawPointer, bias: UnsafePointer<Float>?,
                         stream: DNNLStream?) throws {
        let what = "\(key.operands.rawValue) matmul"
        guard let stream else { throw ConvirtError("oneDNN: no stream could be created for a \(what)") }
        var descs: [DNNLDescriptor] = [aDesc, bDesc, cDesc]
        var pointers = [UnsafeMutableRawPointer(mutating: a), UnsafeMutableRawPointer(mutating: b), UnsafeMutableRawPointer(c)]
        var ids = [cdnnl_arg_src(), cdnnl_arg_weights(), cdnnl_arg_dst()]
        if let biasDesc {
            guard let bias else { throw ConvirtError("\(what): no bias for a product made with one") }
            descs.append(biasDesc)
            pointers.append(UnsafeMutableRawPointer(mutating: bias))
            ids.append(cdnnl_arg_bias())
        }
        var memories = [dnnl_memory_t?](repeating: nil, count: descs.count)
        defer { for memory in memories { if let memory { dnnl_memory_destroy(memory) } } }
        let engine = try DNNL.cpuEngine()
        for i in 0..<descs.count { try dnnlCheck(dnnl_memory_create(&memories[i], descs[i].md, engine, pointers[i]), "\(what) memory") }
        var args = (0..<descs.count).map { dnnl_exec_arg_t(arg: ids[$0], memory: memories[$0]) }
        if let alpha { args.append(dnnl_exec_arg_t(arg: cdnnl_arg_attr_scales() | cdnnl_arg_weights(), memory: alpha.memory)) }
        try primitive.execute(stream.stream, args, "\(what) \(key.batch) \(key.m)x\(key.k)x\(key.n)")
    }

    /// oneDNN's name for the kernel it chose.
    var implementation: String { primitive.implementation }

    /// nil: oneDNN refused the shape (kept, so that it is not asked again at every call). At most
    /// `cacheCapacity` shapes, the least recently used dropped past it: a packed text batch's rows vary
    /// from batch to batch (in multiples of `TokenRows.rowMultiple`), so a long run keeps meeting new
    /// shapes. A dropped primitive lives on while a product still runs it, and is made again when its
    /// shape comes back (oneDNN's own primitive cache, 1024 by default, often still holds its kernels).
    private nonisolated(unsafe) static var cache = RecentlyUsed<Key, MatmulPrimitive?>(capacity: cacheCapacity)
    private nonisolated(unsafe) static var lock = pthread_mutex_t()
    private static let lockReady: Bool = { pthread_mutex_init(&lock, nil); return true }()
    /// The most primitives held: far past what training meets (with CONVIRT_MATMUL=onednn on 1 rank, the
    /// paper preset 75 shapes in its first 20 steps, the demo preset 100 in 600), so that only a run
    /// that keeps meeting new shapes drops any.
    static let cacheCapacity = 2048

    /// The primitive of `key`, created once per process while it stays in the cache (products run from
    /// any thread); nil where oneDNN has no kernel for the shape in the key's precision.
    static func cached(_ key: Key) throws -> MatmulPrimitive? {
        _ = lockReady
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        if let p = cache.value(for: key) { return p }
        let p = try? MatmulPrimitive(key)
        cache.insert(p, for: key)
        return p
    }
}
