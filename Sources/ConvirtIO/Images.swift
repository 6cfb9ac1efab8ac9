// JPEG (libjpeg-turbo) and PNG (libpng) decoding to grayscale, through the C shims in CCodecs, which
// keep the libraries' setjmp/longjmp error handling inside C.

import CCodecs
import ConvirtCore
import Foundation

/// A grayscale image with samples in [0, 1], row-major.
public struct GrayImage: Sendable, Equatable {
    public var width: Int
    public var height: Int
    public var pixels: [Float]

    public init(width: Int, height: Int, pixels: [Float]) {
        precondition(pixels.count == width * height, "pixel count does not match \(width)x\(height)")
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    /// 8-bit samples, rounded and clamped.
    public var bytes: [UInt8] { pixels.map { UInt8(max(0, min(255, ($0 * 255).rounded()))) } }
}

private func message(_ buffer: [CChar]) -> String {
    buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}

public enum JPEG {
    public struct Info: Sendable, Equatable { public let width, height, components: Int }

    public static func info(_ data: Data, source: String = "<memory>") throws -> Info {
        var w: Int32 = 0, h: Int32 = 0, c: Int32 = 0
        var text = [CChar](repeating: 0, count: 256)
        let status = data.withUnsafeBytes { raw in
            cc_jpeg_info(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, &w, &h, &c, &text, text.count)
        }
        guard status == Int32(CC_OK) else { throw ConvirtError("cannot read \(source): \(message(text))") }
        return Info(width: Int(w), height: Int(h), components: Int(c))
    }

    /// Decodes to gray. With `minWidth`/`minHeight`, libjpeg-turbo scales by 1/2, 1/4 or 1/8 in the DCT
    /// domain when the result still covers that size. A JPEG with damaged or truncated data is an error
    /// unless `allowCorrupt` (then libjpeg's gray fill stands in for the missing part).
    public static func decodeGray(_ data: Data, minWidth: Int = 0, minHeight: Int = 0, allowCorrupt: Bool = false,
                                  source: String = "<memory>") throws -> GrayImage {
        var pixels: UnsafeMutablePointer<UInt8>? = nil
        var w: Int32 = 0, h: Int32 = 0
        var text = [CChar](repeating: 0, count: 256)
        let status = data.withUnsafeBytes { raw in
            cc_jpeg_decode_gray(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, Int32(minWidth), Int32(minHeight),
                                &pixels, &w, &h, &text, text.count)
        }
        defer { cc_free(pixels) }
        if status == Int32(CC_CORRUPT) && !allowCorrupt {
            throw ConvirtError("cannot read \(source): damaged JPEG (\(message(text)))", reason: .corrupt)
        }
        guard status == Int32(CC_OK) || status == Int32(CC_CORRUPT), let pixels else {
            throw ConvirtError("cannot read \(source): \(message(text))")
        }
        let count = Int(w) * Int(h)
        let values = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            for i in 0..<count { buffer[i] = Float(pixels[i]) * (1 / 255) }
            initialized = count
        }
        return GrayImage(width: Int(w), height: Int(h), pixels: values)
    }

    /// Baseline JPEG of an 8-bit rendering of `image`.
    public static func encode(_ image: GrayImage, quality: Int = 90) throws -> Data {
        var output: UnsafeMutablePointer<UInt8>? = nil
        var length = 0
        var text = [CChar](repeating: 0, count: 256)
        let bytes = image.bytes
        let status = cc_jpeg_encode_gray(bytes, Int32(image.width), Int32(image.height), Int32(quality), &output, &length, &text, text.count)
        defer { cc_free(output) }
        guard status == Int32(CC_OK), let output else { throw ConvirtError("JPEG encoding failed: \(message(text))") }
        return Data(bytes: output, count: length)
    }
}

public enum PNG {
    public struct Info: Sendable, Equatable { public let width, height, bitDepth, channels: Int }

    public static func info(_ data: Data, source: String = "<memory>") throws -> Info {
        var w: Int32 = 0, h: Int32 = 0, d: Int32 = 0, c: Int32 = 0
        var text = [CChar](repeating: 0, count: 256)
        let status = data.withUnsafeBytes { raw in
            cc_png_info(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, &w, &h, &d, &c, &text, text.count)
        }
        guard status == Int32(CC_OK) else { throw ConvirtError("cannot read \(source): \(message(text))") }
        return Info(width: Int(w), height: Int(h), bitDepth: Int(d), channels: Int(c))
    }

    /// Decodes any PNG (gray or colour, 1 to 16 bits, palette, alpha) to gray in [0, 1]; 16-bit files
    /// keep their precision.
    public static func decodeGray(_ data: Data, source: String = "<memory>") throws -> GrayImage {
        var pixels: UnsafeMutableRawPointer? = nil
        var w: Int32 = 0, h: Int32 = 0, depth: Int32 = 0
        var text = [CChar](repeating: 0, count: 256)
        let status = data.withUnsafeBytes { raw in
            cc_png_decode_gray(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, &pixels, &w, &h, &depth, &text, text.count)
        }
        defer { cc_free(pixels) }
        guard status == Int32(CC_OK), let pixels else {
            let kind = status == Int32(CC_CORRUPT) ? "damaged PNG" : "invalid PNG"
            throw ConvirtError("cannot read \(source): \(kind) (\(message(text)))")
        }
        let count = Int(w) * Int(h)
        let values = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if depth == 16 {
                let p = pixels.assumingMemoryBound(to: UInt16.self)
                for i in 0..<count { buffer[i] = Float(p[i]) * (1 / 65535) }
            } else {
                let p = pixels.assumingMemoryBound(to: UInt8.self)
                for i in 0..<count { buffer[i] = Float(p[i]) * (1 / 255) }
            }
            initialized = count
        }
        return GrayImage(width: Int(w), height: Int(h), pixels: values)
    }

    /// An 8- or 16-bit grayscale PNG of `image`.
    public static func encode(_ image: GrayImage, bitDepth: Int = 8) throws -> Data {
        try require(bitDepth == 8 || bitDepth == 16, "PNG encode", "bit depth must be 8 or 16, not \(bitDepth)")
        var output: UnsafeMutablePointer<UInt8>? = nil
        var length = 0
        var text = [CChar](repeating: 0, count: 256)
        let status: Int32
        if bitDepth == 16 {
            let samples = image.pixels.map { UInt16(max(0, min(65535, ($0 * 65535).rounded()))) }
            status = cc_png_encode_gray(samples, Int32(image.width), Int32(image.height), 16, &output, &length, &text, text.count)
        } else {
            status = cc_png_encode_gray(image.bytes, Int32(image.width), Int32(image.height), 8, &output, &length, &text, text.count)
        }
        defer { cc_free(output) }
        guard status == Int32(CC_OK), let output else { throw ConvirtError("PNG encoding failed: \(message(text))") }
        return Data(bytes: output, count: length)
    }
}
