// zstd (checkpoint shards) and gzip/zlib (MIMIC-CXR ships its CSVs as .csv.gz) through the C libraries.

import CZlib
import CZstd
import ConvirtCore
import Foundation

public enum Zstd {
    /// One zstd frame with the content size and a content checksum (XXH64) in the frame.
    public static func compress(_ input: UnsafeRawBufferPointer, level: Int32 = 3, threads: Int32 = 0) throws -> Data {
        guard let context = ZSTD_createCCtx() else { throw ConvirtError("zstd: cannot create a compression context") }
        defer { ZSTD_freeCCtx(context) }
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level), "setting the level")
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1), "enabling checksums")
        if threads > 0 { _ = ZSTD_CCtx_setParameter(context, ZSTD_c_nbWorkers, threads) }
        let bound = ZSTD_compressBound(input.count)
        var output = Data(count: bound)
        let written = try output.withUnsafeMutableBytes { out in
            try check(ZSTD_compress2(context, out.baseAddress, bound, input.baseAddress, input.count), "compressing")
        }
        output.count = written
        return output
    }

    /// The largest compressed size of `count` bytes.
    public static func bound(_ count: Int) -> Int { ZSTD_compressBound(count) }

    public static func compress(_ input: Data, level: Int32 = 3) throws -> Data {
        try input.withUnsafeBytes { try compress($0, level: level) }
    }

    /// Decompresses one or more frames, verifying their checksums. `expectedSize`, when given, must match.
    /// `source` names the file in errors.
    public static func decompress(_ input: Data, expectedSize: Int? = nil, source: String = "<memory>") throws -> Data {
        try input.withUnsafeBytes { raw -> Data in
            let declared = ZSTD_getFrameContentSize(raw.baseAddress, raw.count)
            if declared == ZSTD_CONTENTSIZE_ERROR {
                throw ConvirtError("\(source): not a zstd frame (bad magic number or corrupt header)")
            }
            guard let stream = ZSTD_createDStream() else { throw ConvirtError("zstd: cannot create a decompression context") }
            defer { ZSTD_freeDStream(stream) }
            var output = Data()
            if let expectedSize { output.reserveCapacity(expectedSize) }
            let chunk = ZSTD_DStreamOutSize()
            var buffer = [UInt8](repeating: 0, count: chunk)
            var inBuffer = ZSTD_inBuffer(src: raw.baseAddress, size: raw.count, pos: 0)
            var last: Int = 0
            while true {
                let (code, produced) = buffer.withUnsafeMutableBytes { out -> (Int, Int) in
                    var outBuffer = ZSTD_outBuffer(dst: out.baseAddress, size: out.count, pos: 0)
                    let code = ZSTD_decompressStream(stream, &outBuffer, &inBuffer)
                    return (code, outBuffer.pos)
                }
                if ZSTD_isError(code) != 0 {
                    throw ConvirtError("\(source): corrupt zstd data (\(String(cString: ZSTD_getErrorName(code))))")
                }
                output.append(contentsOf: buffer[0..<produced])
                last = code
                if inBuffer.pos == inBuffer.size && produced < chunk { break }
            }
            if last != 0 { throw ConvirtError("\(source): truncated zstd data (the frame does not end)") }
            if let expectedSize, output.count != expectedSize {
                throw ConvirtError("\(source): decompressed to \(output.count) bytes, expected \(expectedSize)")
            }
            return output
        }
    }

    @discardableResult
    static func check(_ code: Int, _ what: String) throws -> Int {
        if ZSTD_isError(code) != 0 { throw ConvirtError("zstd: failed \(what): \(String(cString: ZSTD_getErrorName(code)))") }
        return code
    }
}

public enum Gzip {
    /// Inflates gzip (or zlib) data, including concatenated gzip members. `source` names the file in errors.
    public static func decompress(_ input: Data, source: String = "<memory>") throws -> Data {
        var output = Data()
        try input.withUnsafeBytes { raw in
            guard raw.count > 0 else { return }
            var stream = z_stream()
            var status = inflateInit2_(&stream, 15 + 32, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
            guard status == Z_OK else { throw ConvirtError("\(source): zlib cannot start (\(status))") }
            defer { inflateEnd(&stream) }
            stream.next_in = UnsafeMutablePointer(mutating: raw.bindMemory(to: Bytef.self).baseAddress)
            stream.avail_in = uInt(raw.count)
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let produced = buffer.withUnsafeMutableBufferPointer { out -> Int in
                    stream.next_out = out.baseAddress
                    stream.avail_out = uInt(out.count)
                    status = inflate(&stream, Z_NO_FLUSH)
                    return out.count - Int(stream.avail_out)
                }
                output.append(contentsOf: buffer[0..<produced])
                if status == Z_STREAM_END {
                    if stream.avail_in == 0 { break }
                    inflateReset(&stream)  // another gzip member follows
                    continue
                }
                if status == Z_BUF_ERROR && stream.avail_in == 0 {
                    throw ConvirtError("\(source): truncated gzip data (unexpected end of stream)")
                }
                if status != Z_OK {
                    let message = stream.msg.map { String(cString: $0) } ?? "error \(status)"
                    throw ConvirtError("\(source): corrupt gzip data (\(message))")
                }
            }
        }
        return output
    }

    /// Compresses to the gzip format at the given level (1-9).
    public static func compress(_ input: Data, level: Int32 = 6) throws -> Data {
        var output = Data()
        try input.withUnsafeBytes { raw in
            var stream = z_stream()
            guard deflateInit2_(&stream, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY, ZLIB_VERSION,
                                Int32(MemoryLayout<z_stream>.size)) == Z_OK else { throw ConvirtError("gzip: cannot start zlib") }
            defer { deflateEnd(&stream) }
            stream.next_in = UnsafeMutablePointer(mutating: raw.bindMemory(to: Bytef.self).baseAddress)
            stream.avail_in = uInt(raw.count)
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            var status: Int32 = Z_OK
            repeat {
                let produced = buffer.withUnsafeMutableBufferPointer { out -> Int in
                    stream.next_out = out.baseAddress
                    stream.avail_out = uInt(out.count)
                    status = deflate(&stream, Z_FINISH)
                    return out.count - Int(stream.avail_out)
                }
                output.append(contentsOf: buffer[0..<produced])
            } while status == Z_OK
            guard status == Z_STREAM_END else { throw ConvirtError("gzip: compression failed (\(status))") }
        }
        return output
    }

    /// The text of a file, inflated first when its name ends in .gz.
    public static func readText(_ path: String) throws -> String {
        var data = try Files.read(path)
        if path.hasSuffix(".gz") { data = try decompress(data, source: path) }
        guard let text = String(data: data, encoding: .utf8) else { throw ConvirtError("\(path): not valid UTF-8 text") }
        return text
    }
}

/// Continues a CRC-32 over more bytes (start from 0).
public func crc32Update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
    var c = UInt(crc)
    var offset = 0
    while offset < bytes.count {
        let n = min(bytes.count - offset, 1 << 30)
        c = CZlib.crc32(c, bytes.baseAddress!.advanced(by: offset).assumingMemoryBound(to: Bytef.self), uInt(n))
        offset += n
    }
    return UInt32(truncatingIfNeeded: c)
}
