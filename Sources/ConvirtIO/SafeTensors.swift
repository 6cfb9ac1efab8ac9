// The safetensors format (Hugging Face): an 8-byte little-endian header length, a JSON header naming
// each tensor's dtype, shape and byte range in the data section, then the data. We validate the header
// fully (ranges in bounds, sizes consistent with shapes, no overlaps) before touching any tensor.

import ConvirtCore
import Foundation

public enum SafeTensorsDType: String, Sendable, CaseIterable {
    case f64 = "F64", f32 = "F32", f16 = "F16", bf16 = "BF16", i64 = "I64", i32 = "I32", i16 = "I16", i8 = "I8", u8 = "U8", bool = "BOOL"

    public var size: Int {
        switch self {
        case .f64, .i64: 8
        case .f32, .i32: 4
        case .f16, .bf16, .i16: 2
        case .i8, .u8, .bool: 1
        }
    }
}

/// A parsed, validated safetensors file. Tensors are converted on request.
public struct SafeTensorsFile: Sendable {
    public struct Info: Sendable, Equatable {
        public let name: String
        public let dtype: SafeTensorsDType
        public let shape: [Int]
        /// Byte range inside the data section.
        public let byteRange: Range<Int>
    }

    public let path: String
    public let metadata: [String: String]
    /// Tensors in data-offset order.
    public let tensors: [Info]
    private let byName: [String: Int]
    private let data: Data
    private let dataStart: Int

    public init(path: String) throws {
        try self.init(data: Files.read(path), path: path)
    }

    public init(data: Data, path: String = "<memory>") throws {
        func fail(_ problem: String) -> ConvirtError { ConvirtError("\(path): invalid safetensors file: \(problem)") }
        guard data.count >= 8 else { throw fail("\(data.count) bytes is shorter than the 8-byte header length") }
        let headerLength = data.withUnsafeBytes { raw in UInt64(littleEndian: raw.loadUnaligned(as: UInt64.self)) }
        guard headerLength <= UInt64(data.count - 8) else {
            throw fail("header length \(headerLength) exceeds the file (\(data.count) bytes; truncated?)")
        }
        let headerBytes = data.subdata(in: 8..<(8 + Int(headerLength)))
        guard let object = try? JSONSerialization.jsonObject(with: headerBytes), let header = object as? [String: Any] else {
            throw fail("the header is not a JSON object")
        }
        var metadata: [String: String] = [:]
        var infos: [Info] = []
        let dataSize = data.count - 8 - Int(headerLength)
        for (name, value) in header {
            if name == "__metadata__" {
                guard let dict = value as? [String: Any] else { throw fail("__metadata__ is not an object") }
                for (k, v) in dict {
                    guard let s = v as? String else { throw fail("__metadata__.\(k) is not a string") }
                    metadata[k] = s
                }
                continue
            }
            guard let entry = value as? [String: Any] else { throw fail("entry \(name) is not an object") }
            guard let dtypeName = entry["dtype"] as? String else { throw fail("\(name) has no dtype") }
            guard let dtype = SafeTensorsDType(rawValue: dtypeName) else { throw fail("\(name) has unsupported dtype \(dtypeName)") }
            guard let shapeValues = entry["shape"] as? [Any] else { throw fail("\(name) has no shape") }
            let shape = shapeValues.compactMap(exactInteger)
            guard shape.count == shapeValues.count, shape.allSatisfy({ $0 >= 0 }) else { throw fail("\(name) has an invalid shape") }
            guard let offsets = entry["data_offsets"] as? [Any], offsets.count == 2,
                  let begin = exactInteger(offsets[0]), let end = exactInteger(offsets[1]) else {
                throw fail("\(name) has no valid data_offsets")
            }
            guard begin >= 0, begin <= end, end <= dataSize else {
                throw fail("\(name) data_offsets [\(begin), \(end)] fall outside the \(dataSize)-byte data section (truncated?)")
            }
            guard let elements = checkedProduct(shape), let expected = checkedProduct([elements, dtype.size]) else {
                throw fail("\(name) has an absurd shape \(describe(shape: shape)) (its size overflows)")
            }
            guard end - begin == expected else {
                throw fail("\(name) holds \(end - begin) bytes but \(dtypeName) \(describe(shape: shape)) needs \(expected)")
            }
            infos.append(Info(name: name, dtype: dtype, shape: shape, byteRange: begin..<end))
        }
        infos.sort { ($0.byteRange.lowerBound, $0.byteRange.upperBound) < ($1.byteRange.lowerBound, $1.byteRange.upperBound) }
        for (a, b) in zip(infos, infos.dropFirst()) where b.byteRange.lowerBound < a.byteRange.upperBound && !b.byteRange.isEmpty {
            throw fail("tensors \(a.name) and \(b.name) overlap")
        }
        self.path = path
        self.metadata = metadata
        self.tensors = infos
        self.byName = Dictionary(uniqueKeysWithValues: infos.enumerated().map { ($1.name, $0) })
        self.data = data
        self.dataStart = 8 + Int(headerLength)
    }

    public var names: [String] { tensors.map(\.name) }

    public func info(_ name: String) -> Info? { byName[name].map { tensors[$0] } }

    private func require(_ name: String) throws -> Info {
        guard let info = info(name) else { throw ConvirtError("\(path): no tensor named \(name)") }
        return info
    }

    private func withBytes<R>(_ info: Info, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try data.withUnsafeBytes { raw in
            try body(UnsafeRawBufferPointer(rebasing: raw[(dataStart + info.byteRange.lowerBound)..<(dataStart + info.byteRange.upperBound)]))
        }
    }

    /// A floating-point tensor (F32, F16, BF16 or F64) as Float32.
    public func floats(_ name: String) throws -> Tensor<Float> {
        let info = try require(name)
        var result = Tensor<Float>(shape: info.shape)
        let n = result.count
        try result.withUnsafeMutableBufferPointer { out in
            try withBytes(info) { raw in
                switch info.dtype {
                case .f32: for i in 0..<n { out[i] = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
                case .f64: for i in 0..<n { out[i] = Float(Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)))) }
                case .f16: for i in 0..<n { out[i] = HalfFloat.float(fromHalf: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) }
                case .bf16: for i in 0..<n { out[i] = Float(bitPattern: UInt32(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) << 16) }
                default: throw ConvirtError("\(path): tensor \(name) is \(info.dtype.rawValue), not a floating-point tensor")
                }
            }
        }
        return result
    }

    /// An integer tensor (I64, I32, I16, I8, U8 or BOOL) as Int64.
    public func integers(_ name: String) throws -> Tensor<Int64> {
        let info = try require(name)
        var result = Tensor<Int64>(shape: info.shape)
        let n = result.count
        try result.withUnsafeMutableBufferPointer { out in
            try withBytes(info) { raw in
                switch info.dtype {
                case .i64: for i in 0..<n { out[i] = Int64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
                case .i32: for i in 0..<n { out[i] = Int64(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))) }
                case .i16: for i in 0..<n { out[i] = Int64(Int16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))) }
                case .i8: for i in 0..<n { out[i] = Int64(raw.load(fromByteOffset: i, as: Int8.self)) }
                case .u8, .bool: for i in 0..<n { out[i] = Int64(raw[i]) }
                default: throw ConvirtError("\(path): tensor \(name) is \(info.dtype.rawValue), not an integer tensor")
                }
            }
        }
        return result
    }

    /// An integer tensor as Int32 (token ids, targets, masks), with a range check.
    public func int32s(_ name: String) throws -> Tensor<Int32> {
        let wide = try integers(name)
        var result = Tensor<Int32>(shape: wide.shape)
        try result.withUnsafeMutableBufferPointer { out in
            try wide.withUnsafeBufferPointer { src in
                for i in 0..<src.count {
                    guard let v = Int32(exactly: src[i]) else { throw ConvirtError("\(path): tensor \(name) value \(src[i]) does not fit in Int32") }
                    out[i] = v
                }
            }
        }
        return result
    }
}

/// Collects tensors and writes a safetensors file.
public struct SafeTensorsWriter {
    private var entries: [(name: String, dtype: SafeTensorsDType, shape: [Int], bytes: Data)] = []
    public var metadata: [String: String] = [:]

    public init(metadata: [String: String] = [:]) { self.metadata = metadata }

    public mutating func add(_ name: String, _ tensor: Tensor<Float>, as dtype: SafeTensorsDType = .f32) throws {
        try ConvirtCore.require(!entries.contains { $0.name == name }, "safetensors writer", "duplicate tensor \(name)")
        var bytes = Data(count: tensor.count * dtype.size)
        try bytes.withUnsafeMutableBytes { raw in
            try tensor.withUnsafeBufferPointer { src in
                for i in 0..<src.count {
                    switch dtype {
                    case .f32: raw.storeBytes(of: src[i].bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self)
                    case .f64: raw.storeBytes(of: Double(src[i]).bitPattern.littleEndian, toByteOffset: 8 * i, as: UInt64.self)
                    case .f16: raw.storeBytes(of: HalfFloat.half(fromFloat: src[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self)
                    case .bf16: raw.storeBytes(of: HalfFloat.bfloat16(fromFloat: src[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self)
                    default: throw ConvirtError("safetensors writer: cannot store Float tensor \(name) as \(dtype.rawValue)")
                    }
                }
            }
        }
        entries.append((name, dtype, tensor.shape, bytes))
    }

    /// An integer tensor, stored as I64 or I32 after its element type.
    public mutating func add<T: TensorElement & FixedWidthInteger>(_ name: String, _ tensor: Tensor<T>) throws {
        let dtype: SafeTensorsDType
        switch T.self {
        case is Int64.Type: dtype = .i64
        case is Int32.Type: dtype = .i32
        case is UInt8.Type: dtype = .u8
        default: throw ConvirtError("safetensors writer: unsupported integer type \(T.self) for \(name)")
        }
        try ConvirtCore.require(!entries.contains { $0.name == name }, "safetensors writer", "duplicate tensor \(name)")
        var bytes = Data(count: tensor.count * MemoryLayout<T>.size)
        bytes.withUnsafeMutableBytes { raw in
            tensor.withUnsafeBufferPointer { src in
                for i in 0..<src.count { raw.storeBytes(of: src[i].littleEndian, toByteOffset: MemoryLayout<T>.size * i, as: T.self) }
            }
        }
        entries.append((name, dtype, tensor.shape, bytes))
    }

    /// The file's bytes. The header is padded with spaces to a multiple of 8, as the reference writer does.
    public func serialized() throws -> Data {
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var offset = 0
        for e in entries {
            header[e.name] = ["dtype": e.dtype.rawValue, "shape": e.shape, "data_offsets": [offset, offset + e.bytes.count]] as [String: Any]
            offset += e.bytes.count
        }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(0x20) }
        var out = Data(capacity: 8 + json.count + offset)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(json)
        for e in entries { out.append(e.bytes) }
        return out
    }

    public func write(to path: String) throws {
        try Files.writeAtomically(serialized(), to: path)
    }
}

/// IEEE 754 binary16 and bfloat16 conversions (round to nearest, ties to even).
public enum HalfFloat {
    public static func float(fromHalf h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exponent = Int((h >> 10) & 0x1F)
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0 {
            if mantissa == 0 { return Float(bitPattern: sign) }
            let value = Float(mantissa) * Float(sign: .plus, exponent: -24, significand: 1)  // subnormal
            return sign != 0 ? -value : value
        }
        if exponent == 31 { return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13)) }
        return Float(bitPattern: sign | (UInt32(exponent + 112) << 23) | (mantissa << 13))
    }

    public static func half(fromFloat f: Float) -> UInt16 {
        let bits = f.bitPattern
        let sign = UInt16((bits >> 16) & 0x8000)
        if f.isNaN { return sign | 0x7E00 }
        let magnitude = abs(f)
        if magnitude >= 65520 { return sign | 0x7C00 }  // rounds to infinity
        if magnitude < Float(sign: .plus, exponent: -14, significand: 1) {
            // subnormal half: value / 2^-24, rounded to nearest even
            let scaled = magnitude * Float(sign: .plus, exponent: 24, significand: 1)
            return sign | UInt16(scaled.rounded(.toNearestOrEven))
        }
        let exponent = Int((bits >> 23) & 0xFF) - 127 + 15
        var mantissa = bits & 0x7F_FFFF
        var e = UInt32(exponent)
        // round 23-bit mantissa to 10 bits, ties to even
        let dropped = mantissa & 0x1FFF
        mantissa >>= 13
        if dropped > 0x1000 || (dropped == 0x1000 && (mantissa & 1) == 1) {
            mantissa += 1
            if mantissa == 0x400 { mantissa = 0; e += 1 }
        }
        return sign | UInt16(e << 10) | UInt16(mantissa)
    }

    public static func bfloat16(fromFloat f: Float) -> UInt16 {
        if f.isNaN { return UInt16(f.bitPattern >> 16) | 0x40 }
        let bits = f.bitPattern
        let rounding = 0x7FFF + ((bits >> 16) & 1)
        return UInt16((bits &+ rounding) >> 16)
    }
}

/// An integer from a JSON number, or nil unless it is one exactly and below 2^53 (not 1e30, not 2.5).
func exactInteger(_ value: Any) -> Int? {
    guard let number = value as? NSNumber else { return nil }
    let d = number.doubleValue
    guard d.isFinite, d == d.rounded(), abs(d) < 9.007_199_254_740_992e15 else { return nil }
    return Int(d)
}
