// bf16 for mixed precision as PyTorch's CPU autocast does it: the inputs of convolutions and matrix
// products are rounded to bfloat16 (round to nearest even, as oneDNN's and PyTorch's f32 -> bf16
// conversions), the products accumulate in fp32, and everything else (BatchNorm statistics, LayerNorm,
// softmax, the loss, the master weights, gradients and Adam) stays fp32.
//
// Where oneDNN runs bf16 on this CPU (Debian's 2.6 needs AVX-512; AMX or AVX512-BF16 make it fast)
// the products run there. Elsewhere oneDNN answers "unimplemented" for every bf16 primitive, and the
// same arithmetic is computed exactly by rounding the inputs to bf16 values (kept in fp32 storage) and
// multiplying them in fp32: a product of two bf16 numbers is exact in fp32, so only the order of the
// fp32 accumulation differs from oneDNN's. That path is slower (an extra pass over both inputs), but
// it lets every CPU run, test and resume a bf16 run.

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
        case .auto: return Self.environment ?? (BF16.hardwareSupport != nil ? .bf16 : .fp32)
        }
    }

    static let environment: Precision? = processEnvironment()["CONVIRT_PRECISION"].flatMap(Precision.init(rawValue:))

    /// A line saying what was chosen and why (printed at the start of train, eval, embed and bench step).
    public func describe() -> String {
        let p = resolved()
        switch self {
        case .auto:
            let why = Self.environment != nil ? "CONVIRT_PRECISION=\(p.rawValue)"
                : BF16.hardwareSupport.map { "the CPU has \($0)" } ?? "the CPU has neither AMX-BF16 nor AVX512-BF16"
            return "precision \(p.rawValue) (auto: \(why))" + (p == .bf16 ? ", \(BF16.backend)" : "")
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

    /// The bfloat16 bits of `x` rounded to nearest even.
    @inline(__always)
    public static func bits(_ x: Float) -> UInt16 { UInt16(truncatingIfNeeded: round(x).bitPattern >> 16) }

    /// dst[i] = round(src[i]) for i in 0..<count (dst may be src).
    public static func round(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, count: Int, parallel: Bool = true) {
        let body = { (range: Range<Int>) in
            for i in range { dst[i] = round(src[i]) }
        }
        if parallel { Parallel.chunks(count, cost: 1, body) } else { body(0..<count) }
    }

    /// Rounds a rows x columns block stored with leading dimension `ld` into a compact one (ld = columns).
    public static func roundBlock(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int,
                                  parallel: Bool = true) {
        if ld == columns { round(dst, src, count: rows * columns, parallel: parallel); return }
        let body = { (range: Range<Int>) in
            for r in range {
                let s = src + r * ld, d = dst + r * columns
                for c in 0..<columns { d[c] = round(s[c]) }
            }
        }
        if parallel { Parallel.chunks(rows, cost: columns, body) } else { body(0..<rows) }
    }

    /// Converts a rows x columns block stored with leading dimension `ld` into compact bf16 bits.
    static func convertBlock(_ dst: UnsafeMutablePointer<UInt16>, _ src: UnsafePointer<Float>, rows: Int, columns: Int, ld: Int,
                             parallel: Bool) {
        let body = { (range: Range<Int>) in
            for r in range {
                let s = src + r * ld, d = dst + r * columns
                for c in 0..<columns { d[c] = bits(s[c]) }
            }
        }
        if parallel { Parallel.chunks(rows, cost: columns, body) } else { body(0..<rows) }
    }

    /// The bf16 instructions of this CPU that make bf16 fast ("AMX-BF16", "AVX512-BF16"), nil without.
    public static let hardwareSupport: String? = {
        guard let flags = BLASCore.cpuFlags()?.flags else { return nil }
        if flags.contains("amx_bf16") { return "AMX-BF16" }
        if flags.contains("avx512_bf16") { return "AVX512-BF16" }
        return nil
    }()

    /// Whether oneDNN runs bf16 products on this CPU (probed once: Debian's oneDNN 2.6 needs AVX-512).
    /// CONVIRT_BF16=emulate forces the rounded-fp32 path (to compare the two on a CPU that has both).
    public static let native: Bool = {
        if processEnvironment()["CONVIRT_BF16"] == "emulate" { return false }
        return (try? MatmulPrimitive(MatmulPrimitive.Key(m: 16, n: 16, k: 16, transposeA: false, transposeB: false, ldc: 16, alpha: 1, beta: 0))) != nil
    }()

    /// Where bf16 products run: "oneDNN bf16 (ISA ...)" or the rounded-fp32 emulation.
    public static var backend: String {
        native ? "bf16 products on oneDNN (ISA \(DNNL.isa))"
            : "bf16 products emulated exactly in fp32 (oneDNN \(DNNL.version) runs no bf16 on ISA \(DNNL.isa); slow)"
    }
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
