// Counter-based random numbers: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011). A draw is a pure function of (seed, key..., index), so any rank can
// reproduce any sample's draws without sharing generator state, and resuming needs no RNG state.

import RealModule

/// One Philox4x32-10 block: 128-bit counter and 64-bit key in, 128 random bits out.
@inlinable
public func philox4x32(counter: (UInt32, UInt32, UInt32, UInt32), key: (UInt32, UInt32)) -> (UInt32, UInt32, UInt32, UInt32) {
    var (c0, c1, c2, c3) = counter
    var (k0, k1) = key
    for round in 0..<10 {
        if round > 0 {
            k0 &+= 0x9E37_79B9
            k1 &+= 0xBB67_AE85
        }
        let p0 = UInt64(0xD251_1F53) &* UInt64(c0)
        let p1 = UInt64(0xCD9E_8D57) &* UInt64(c2)
        let hi0 = UInt32(truncatingIfNeeded: p0 >> 32), lo0 = UInt32(truncatingIfNeeded: p0)
        let hi1 = UInt32(truncatingIfNeeded: p1 >> 32), lo1 = UInt32(truncatingIfNeeded: p1)
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    }
    return (c0, c1, c2, c3)
}

/// SplitMix64's finaliser: a bijective 64-bit mix used to fold keys into one stream id.
@inlinable
public func mix64(_ value: UInt64) -> UInt64 {
    var z = value &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// An infinite, random-access sequence of random numbers identified by a seed and a key path such as
/// (epoch, global sample index, purpose). `uint32(at: i)` is the i-th 32-bit draw of the stream.
///
/// The Philox key is the 64-bit seed; the upper 64 bits of the counter are a mix of the keys; the lower
/// 64 bits index the 128-bit blocks of the stream.
public struct RandomStream: Sendable, Hashable {
    public let seed: UInt64
    public let streamID: UInt64

    public init(seed: UInt64, keys: [UInt64] = []) {
        self.seed = seed
        var id: UInt64 = 0x5EED_C0DE_1234_5678
        for key in keys { id = mix64(id ^ mix64(key)) }
        self.streamID = id
    }

    public init(seed: UInt64, _ keys: UInt64...) { self.init(seed: seed, keys: keys) }

    /// A stream derived from this one by appending more keys.
    public func child(_ keys: UInt64...) -> RandomStream {
        var id = streamID
        for key in keys { id = mix64(id ^ mix64(key)) }
        return RandomStream(seed: seed, streamID: id)
    }

    init(seed: UInt64, streamID: UInt64) {
        self.seed = seed
        self.streamID = streamID
    }

    /// The block of four draws holding draw indices 4*block ..< 4*block+4.
    @inlinable
    public func block(_ block: UInt64) -> (UInt32, UInt32, UInt32, UInt32) {
        philox4x32(
            counter: (UInt32(truncatingIfNeeded: block), UInt32(truncatingIfNeeded: block >> 32),
                      UInt32(truncatingIfNeeded: streamID), UInt32(truncatingIfNeeded: streamID >> 32)),
            key: (UInt32(truncatingIfNeeded: seed), UInt32(truncatingIfNeeded: seed >> 32)))
    }

    /// Blocks first ..< first + 8 at once, the same draws as `block`: word w of block first + k is lane k
    /// of the w-th vector. (Philox on vector lanes: the 32x32->64-bit products of eight counters in one
    /// instruction, for dropout's tens of millions of draws a step.)
    @inlinable
    public func blocks8(_ first: UInt64) -> (SIMD8<UInt32>, SIMD8<UInt32>, SIMD8<UInt32>, SIMD8<UInt32>) {
        let counters = SIMD8<UInt64>(repeating: first) &+ SIMD8<UInt64>(0, 1, 2, 3, 4, 5, 6, 7)
        var c0 = SIMD8<UInt32>(truncatingIfNeeded: counters), c1 = SIMD8<UInt32>(truncatingIfNeeded: counters &>> 32)
        var c2 = SIMD8<UInt32>(repeating: UInt32(truncatingIfNeeded: streamID)), c3 = SIMD8<UInt32>(repeating: UInt32(truncatingIfNeeded: streamID >> 32))
        var k0 = UInt32(truncatingIfNeeded: seed), k1 = UInt32(truncatingIfNeeded: seed >> 32)
        for round in 0..<10 {
            if round > 0 {
                k0 &+= 0x9E37_79B9
                k1 &+= 0xBB67_AE85
            }
            let p0 = SIMD8<UInt64>(truncatingIfNeeded: c0) &* 0xD251_1F53
            let p1 = SIMD8<UInt64>(truncatingIfNeeded: c2) &* 0xCD9E_8D57
            let hi0 = SIMD8<UInt32>(truncatingIfNeeded: p0 &>> 32), lo0 = SIMD8<UInt32>(truncatingIfNeeded: p0)
            let hi1 = SIMD8<UInt32>(truncatingIfNeeded: p1 &>> 32), lo1 = SIMD8<UInt32>(truncatingIfNeeded: p1)
            (c0, c1, c2, c3) = (hi1 ^ c1 ^ SIMD8(repeating: k0), lo1, hi0 ^ c3 ^ SIMD8(repeating: k1), lo0)
        }
        return (c0, c1, c2, c3)
    }

    @inlinable
    public func uint32(at index: UInt64) -> UInt32 {
        let b = block(index >> 2)
        switch index & 3 {
        case 0: return b.0
        case 1: return b.1
        case 2: return b.2
        default: return b.3
        }
    }

    /// Uniform in [0, 1) with 24 random bits.
    @inlinable
    public func uniform(at index: UInt64) -> Float {
        Float(uint32(at: index) >> 8) * (1.0 / 16_777_216.0)
    }

    /// Uniform in [0, 1) with 53 random bits, from draws 2*index and 2*index+1.
    @inlinable
    public func uniformDouble(at index: UInt64) -> Double {
        let hi = UInt64(uint32(at: 2 &* index)), lo = UInt64(uint32(at: 2 &* index &+ 1))
        return Double(((hi << 32) | lo) >> 11) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// p[i] = scale * normal(at: i) for i in 0..<count, over the threads (each value depends on its index
    /// alone, so the result is the same for any thread count): the initialisation of large weights.
    public func fillNormal(_ p: UnsafeMutablePointer<Float>, count: Int, scale: Float) {
        Parallel.chunks(count, cost: 64) { range in
            for i in range { p[i] = scale * normal(at: UInt64(i)) }
        }
    }

    /// Standard normal (Box-Muller on the two 32-bit halves of draw pair `index`).
    @inlinable
    public func normal(at index: UInt64) -> Float {
        // Draws 2 index and 2 index + 1: one half of block index / 2.
        let b = block(index >> 1)
        return index & 1 == 0 ? Self.boxMuller(b.0, b.1) : Self.boxMuller(b.2, b.3)
    }

    /// Box-Muller's normal from draws a and b.
    @inlinable
    static func boxMuller(_ a: UInt32, _ b: UInt32) -> Float {
        let u1 = (Double(a) + 1) * (1.0 / 4_294_967_297.0)  // (0, 1]
        let u2 = Double(b) * (1.0 / 4_294_967_296.0)
        return Float((-2 * Double.log(u1)).squareRoot() * Double.cos(2 * Double.pi * u2))
    }

    /// p[k] = normal(at: first + k) for every k of p, bitwise, with Philox on vector lanes: sixteen
    /// normals from one `blocks8`.
    public func normals(from first: UInt64, into p: UnsafeMutableBufferPointer<Float>) {
        let count = p.count
        var k = 0
        if first & 1 == 1, count > 0 { p[0] = normal(at: first); k = 1 }
        while k + 16 <= count {
            let (w0, w1, w2, w3) = blocks8((first + UInt64(k)) >> 1)
            for lane in 0..<8 {
                p[k + 2 * lane] = Self.boxMuller(w0[lane], w1[lane])
                p[k + 2 * lane + 1] = Self.boxMuller(w2[lane], w3[lane])
            }
            k += 16
        }
        while k < count { p[k] = normal(at: first + UInt64(k)); k += 1 }
    }

    /// Uniform integer in 0 ..< bound (bound > 0) from the 64-bit draw pair `index`, without modulo
    /// bias (Lemire's method; a rejected draw retries on a derived stream, which is rare and deterministic).
    public func integer(below bound: Int, at index: UInt64) -> Int {
        precondition(bound > 0, "integer(below:) needs a positive bound")
        let range = UInt64(bound)
        var stream = self
        var attempt: UInt64 = 0
        while true {
            let x = UInt64(stream.uint32(at: 2 &* index)) | (UInt64(stream.uint32(at: 2 &* index &+ 1)) << 32)
            let (high, low) = x.multipliedFullWidth(by: range)
            if low >= (0 &- range) % range { return Int(high) }
            attempt += 1
            stream = child(0xFFFF_0000 &+ attempt)
        }
    }

    /// A uniformly random permutation of 0..<count (Fisher-Yates driven by this stream).
    public func permutation(_ count: Int) -> [Int] {
        var result = Array(0..<count)
        if count < 2 { return result }
        for i in stride(from: count - 1, to: 0, by: -1) {
            let j = integer(below: i + 1, at: UInt64(i))
            result.swapAt(i, j)
        }
        return result
    }
}

