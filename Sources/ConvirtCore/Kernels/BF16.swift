// bf16 for mixed precision as PyTorch's CPU autocast does it: the inputs of convolutions and matrix
// products are rounded to bfloat16 (round to nearest even, as oneDNN's and PyTorch's f32 -> bf16
// conversions), the products accumulate in fp32, and everything else (BatchNorm statistics, LayerNorm,
// softmax, the loss, the master weights, gradients and Adam) stays fp32.
//
// Where oneDNN's bf16 kernels are the fast path (AMX; AMD's AVX512-BF16) the products run there.
// Elsewhere (Intel's AVX512-BF16 without AMX, where they are slower than its fp32 ones, or no AVX-512,
// where oneDNN answers "unimplemented" for every bf16 primitive) the same arithmetic is computed
// exactly by rounding the inputs to bf16 values (kept in fp32 storage) and multiplying them with the
// fp32 kernels: a product of two bf16 numbers is exact in fp32, so only the order of the fp32
// accumulation differs from oneDNN's. That costs an extra pass over the inputs, and lets every CPU
// run, test and resume a bf16 run.

import CKernels
import CDNNL
#if canImport(Glibc)
import Glibc
#endif

/// `--precision`: fp32, bf16, or auto (bf16 where the CPU has AMX-BF16 or AVX512-BF16, fp32 elsewhere;
/// CONVIRT_PRECISION=fp32|bf16 in the environment decides for auto instead, e.g. to pin a test suite).
public enum PrecisionChoice: String, Codable, Sendable, CaseIterable {
    case auto, fp32, bf16

    /// The precision this choice runs in on this CPU.
    public func resolved() -> Precision {
        switch self {
        case .fp32: return .fp32
        case .bf16: return .bf16
        case .auto: return Backend.current.autoPrecision
        }
    }

    /// A line saying what was chosen and why (printed at the start of train, eval, embed and bench step).
    public func describe() -> String {
        let p = resolved()
        switch self {
        case .auto:
            return "precision \(p.rawValue) (auto: \(Backend.current.autoPrecisionReason))" + (p == .bf16 ? ", \(BF16.backend)" : "")
        case .fp32: return "precision fp32"
        case .bf16: return "precision bf16, \(BF16.backend)"
        }
    }
}

public enum BF16 {
    /// `x` rounded to the nearest bfloat16 (ties to even), as a Float. NaN stays NaN, infinities stay.
    @inline(__always)
    public static func round(_ x: Float) -> Float {
        let bits = x.bitPattern
        if bits & 0x7fff_ffff > 0x7f80_0000 { return Float(bitPattern: (bits | 0x0040_0000) & 0xffff_0000) }
        return Float(bitPattern: (bits &+ 0x7fff &+ ((bits >> 16) & 1)) & 0xffff_0000)
    }

    /// The value of bfloat16 bits, as a Float (exact).
    @inline(__always)
    public static func value(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

    /// The bfloat16 bits of `x` rounded to nearest even.
    @inline(__always)
    public static func bits(_ x: Float) -> UInt16 { UInt16(truncatingIfNeeded: round(x).bitPattern >> 16) }

    /// dst[i] = bits(src[i]) for i in 0..<count, split over the threads.
    public static func bits(_ dst: UnsafeMutablePointer<UInt16>, _ src: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count, cost: 1) { range in ck_bf16_bits(dst + range.lowerBound, src + range.lowerBound, range.count) }
    }

    /// dst[i] = round(src[i]) for i in 0..<count (dst may be src).
    public static func round(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, count: Int, parallel: Bool = true) {
        let body = { (range: Range<Int>) in ck_bf16_round(dst + range.lowerBound, src + range.lowerBound, range.count) }
        if parallel { Parallel.chunks(count, cost: 1, body) } else { body(0..<count) }
    }

    /// Rounds a rows x columns block stored with leading dimension `ld` into a compact one (ld = columns).
    public static func roundBlock(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int,
                                  parallel: Bool = true) {
        if ld == columns { round(dst, src, count: rows * columns, parallel: parallel); return }
        let body = { (range: Range<Int>) in
            for r in range {
                ck_bf16_round(dst + r * columns, src + r * ld, columns)
            }
        }
        if parallel { Parallel.chunks(rows, cost: columns, body) } else { body(0..<rows) }
    }

    /// Converts a rows x columns block stored with leading dimension `ld` into compact bf16 bits.
    public static func convertBlock(_ dst: UnsafeMutablePointer<UInt16>, _ src: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int,
                             parallel: Bool) {
        let body = { (range: Range<Int>) in
            for r in range {
                ck_bf16_bits(dst + r * columns, src + r * ld, columns)
            }
        }
        if parallel { Parallel.chunks(rows, cost: columns, body) } else { body(0..<rows) }
    }

    /// The bf16 instructions of this CPU that make bf16 fast ("AMX-BF16", "AVX512-BF16"), nil without.
    public static let hardwareSupport: String? = {
        guard let flags = BLASCore.cpu?.flags else { return nil }
        if flags.contains("amx_bf16") { return "AMX-BF16" }
        if flags.contains("avx512_bf16") { return "AVX512-BF16" }
        return nil
    }()

    /// Whether oneDNN runs bf16 products on this CPU at all (probed once: oneDNN 3.2 needs AVX-512, or AVX2-VNNI-2).
    public static let oneDNNRunsBF16: Bool = {
        (try? MatmulPrimitive(MatmulPrimitive.Key(m: 16, n: 16, k: 16, transposeA: false, transposeB: false, ldc: 16, alpha: 1, beta: 0))) != nil
    }()

    /// Whether bf16 products run on oneDNN's bf16 kernels (else on fp32 kernels over bf16-rounded inputs,
    /// which computes the same products). A fixed rule of the CPU (`prefersNative`), so that every rank
    /// of a job computes alike; CONVIRT_BF16=native|emulate|blocked overrides it (`Backend`).
    public static var native: Bool { Backend.current.bf16 == .native }

    /// CONVIRT_BF16=blocked: the emulation, its reductions over samples made to depend on their length
    /// as a blocked kernel's may (oneDNN's AMX kernels block a product's sum over k by its size, and a
    /// kernel may keep a block's partial sum in bf16): the weight gradient of a linear layer sums its
    /// rows, and a convolution's its images, in two blocks, the first ceil(n/2) and the rest, each
    /// block's sum rounded to bf16 before the two are added in fp32. Such a sum over a rank's share of
    /// the batch depends on the world size at bf16's rounding (2^-8), far past fp32's; made of
    /// `GradientPieces`, it does not. The other products are the emulation's. For tests on every CPU.
    public static var blockedReductions: Bool { Backend.current.bf16 == .blocked }

    /// The rule, measured with `convirt bench kernels` and `bench step --precision bf16` (2 threads):
    /// - AMX (ISA avx512_core_amx): oneDNN's bf16 convolutions ran at 3692 GFLOP/s against 339 in fp32
    ///   on a 2-core Xeon.
    /// - AMD with AVX512-BF16 (Zen 4; ISA avx512_core_bf16): oneDNN's bf16 kernels pay. 2-core AMD EPYC:
    ///   matmul 1024^3 259 GFLOP/s against 178 by the rounded-fp32 path, conv 3x3 64->64 @56 199/181
    ///   against 85/98 (im2col); the paper step at batch 8 2.74 s against 5.08 s.
    /// - Intel with AVX512-BF16 but no AMX (ISA avx512_core_bf16): oneDNN 2.6's bf16 kernels are slower
    ///   than the fp32 ones. 2-core Xeon: matmul 127 against sgemm's 160 GFLOP/s, conv 3x3 64->64 @56 116
    ///   against 175; the paper step 6.1-6.4 s against 4.6 s by the rounded-fp32 path.
    public static func prefersNative(isa: String, vendor: String) -> Bool {
        if isa.hasPrefix("avx512_core_amx") { return true }
        return isa.hasPrefix("avx512_core_bf16") && vendor.contains("AMD")
    }

    /// Where bf16 products run: oneDNN's bf16 kernels, or fp32 kernels over rounded inputs (and why).
    public static var backend: String { Backend.current.bf16Description }
}

/// Scratch memory owned by the calling thread, grown on demand and kept for the thread's lifetime (so
/// that products called from any thread, inside parallel loops included, allocate only the first time).
final class ThreadScratch {
    private var pointer: UnsafeMutableRawPointer? = nil
    private var bytes = 0
    /// This thread's oneDNN stream (streams are not to be shared between threads).
    private(set) lazy var stream: DNNLStream? = try? DNNLStream()

    /// Buffers for oneDNN's layouts of a primitive's arguments during one call (`DNNLArgument`).
    private var slots: [(pointer: UnsafeMutableRawPointer, bytes: Int)] = []

    deinit {
        pointer?.deallocate()
        for slot in slots { slot.pointer.deallocate() }
    }

    /// The slot of oneDNN's scratchpads (past the reorder slots of a primitive's arguments).
    static let scratchpadSlot = 4
    /// Past a convolution's weight-gradient pieces (5 and 6, `ConvolutionPrimitives`): the blocked
    /// emulation's two block sums of a product (`emulatedProduct`), and of a convolution's weight
    /// gradient (`Convolution`).
    static let blockedProductSlot = 7, blockedConvolutionSlot = 8
    /// Batch norm's partial sums of its units of rows (`laneSums`).
    static let laneSumsSlot = 9

    /// Reorder slot `index`, with room for at least `count` bytes (its contents are lost when it grows).
    func reorderSlot(_ index: Int, bytes count: Int) -> UnsafeMutableRawPointer {
        while slots.count <= index { slots.append((UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64), 64)) }
        if count > slots[index].bytes {
            slots[index].pointer.deallocate()
            slots[index] = (UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 64), count)
        }
        return slots[index].pointer
    }

    func ensure(bytes count: Int) -> UnsafeMutableRawPointer {
        if count > bytes || pointer == nil {
            pointer?.deallocate()
            bytes = max(count, 64)
            pointer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        }
        return pointer!
    }

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { value in
            if let value { Unmanaged<ThreadScratch>.fromOpaque(value).release() }
        }
        return key
    }()

    /// The calling thread's scratch.
    static var current: ThreadScratch {
        if let value = pthread_getspecific(key) { return Unmanaged<ThreadScratch>.fromOpaque(value).takeUnretainedValue() }
        let scratch = ThreadScratch()
        pthread_setspecific(key, Unmanaged.passRetained(scratch).toOpaque())
        return scratch
    }
}
