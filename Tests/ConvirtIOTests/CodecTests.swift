// The C bridges on real files, good and broken: JPEG and PNG through libjpeg-turbo and libpng, zstd,
// gzip, and safetensors. Broken input must come back as an error that names the problem, never a crash.

import ConvirtCore
import ConvirtIO
import Foundation
import Testing

private func gradient(width: Int, height: Int) -> GrayImage {
    GrayImage(width: width, height: height, pixels: (0..<(width * height)).map { i in
        let x = i % width, y = i / width
        return Float((x * 3 + y * 2) % 256) / 255
    })
}

private func fixture(_ name: String) throws -> Data {
    guard let url = Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil) else { throw ConvirtError("missing fixture \(name)") }
    return try Data(contentsOf: url)
}

private func errorText(_ body: () throws -> Void) -> String {
    do { try body(); return "" } catch { return "\(error)" }
}

@Suite("JPEG through libjpeg-turbo")
struct JPEGTests {
    @Test("encode and decode round trip")
    func roundTrip() throws {
        let image = gradient(width: 64, height: 48)
        let data = try JPEG.encode(image, quality: 95)
        let info = try JPEG.info(data)
        #expect(info.width == 64 && info.height == 48 && info.components == 1)
        let decoded = try JPEG.decodeGray(data)
        #expect(decoded.width == 64 && decoded.height == 48)
        let maxError = zip(decoded.pixels, image.pixels).map { abs($0 - $1) }.max()!
        #expect(maxError < 6 / 255, "max error \(maxError * 255) gray levels")
    }

    @Test("DCT-domain downscaling picks the largest factor that still covers the target")
    func scaledDecode() throws {
        let data = try JPEG.encode(gradient(width: 1000, height: 801))
        #expect(try JPEG.decodeGray(data, minWidth: 120, minHeight: 100).width == 125)  // 1/8: 125 x 101
        let quarter = try JPEG.decodeGray(data, minWidth: 200, minHeight: 150)
        #expect(quarter.width == 250 && quarter.height == 201)                        // 1/4
        #expect(try JPEG.decodeGray(data, minWidth: 256, minHeight: 256).width == 500) // 1/2: 201 < 256 rules out 1/4
        #expect(try JPEG.decodeGray(data, minWidth: 600, minHeight: 10).width == 1000) // full size
    }

    @Test("a truncated JPEG is an error naming the file and libjpeg's reason")
    func truncated() throws {
        let data = try JPEG.encode(gradient(width: 128, height: 128))
        let cut = data.prefix(data.count / 2)
        let text = errorText { _ = try JPEG.decodeGray(Data(cut), source: "/data/p10/s1/x.jpg") }
        #expect(text.contains("/data/p10/s1/x.jpg") && text.contains("damaged JPEG") && text.contains("Premature end of JPEG file"), "\(text)")
        // Asked to, the decoder keeps libjpeg's gray fill for the missing part.
        #expect(try JPEG.decodeGray(Data(cut), allowCorrupt: true).height == 128)
    }

    @Test("not a JPEG, and an empty file, are errors")
    func notJPEG() throws {
        let png = try PNG.encode(gradient(width: 4, height: 4))
        #expect(errorText { _ = try JPEG.decodeGray(png, source: "a.jpg") }.contains("Not a JPEG file"))
        #expect(errorText { _ = try JPEG.decodeGray(Data(), source: "empty.jpg") }.contains("empty.jpg"))
        #expect(errorText { _ = try JPEG.info(Data([0xFF, 0xD8, 0xFF]), source: "stub.jpg") }.contains("stub.jpg"))
    }
}

@Suite("PNG through libpng")
struct PNGTests {
    @Test("8- and 16-bit gray round trips keep their precision")
    func roundTrip() throws {
        let image = gradient(width: 31, height: 17)
        let decoded = try PNG.decodeGray(PNG.encode(image))
        #expect(decoded.width == 31 && decoded.height == 17 && decoded.bytes == image.bytes)
        let fine = GrayImage(width: 3, height: 1, pixels: [0, 1000 / 65535, 1])
        let data16 = try PNG.encode(fine, bitDepth: 16)
        let info = try PNG.info(data16)
        #expect(info.width == 3 && info.height == 1 && info.bitDepth == 16 && info.channels == 1)
        let back = try PNG.decodeGray(data16)
        #expect(abs(back.pixels[1] * 65535 - 1000) < 0.01)
    }

    @Test("RGB, RGBA 16-bit, palette and 1-bit files decode to gray")
    func colourTypes() throws {
        let rgb = try PNG.decodeGray(fixture("rgb8.png"))
        for y in 0..<3 {
            for x in 0..<5 {
                let expected = (0.2126 * Float(x * 50) + 0.7152 * Float(y * 100)) / 255
                #expect(abs(rgb.pixels[y * 5 + x] - expected) < 1.5 / 255, "(\(x), \(y))")
            }
        }
        let rgba = try PNG.decodeGray(fixture("rgba16.png"))
        #expect(abs(rgba.pixels[4] - 40000 / 65535) < 2 / 65535)
        let palette = try PNG.decodeGray(fixture("palette2.png"))
        #expect(palette.pixels.prefix(5).map { Int(($0 * 255).rounded()) } == [0, 255, 128, 64, 0])
        let bits = try PNG.decodeGray(fixture("gray1.png"))
        #expect(bits.pixels.prefix(8).map { Int($0) } == [1, 0, 1, 0, 1, 0, 1, 0])
    }

    @Test("truncated, corrupted and non-PNG data are errors")
    func broken() throws {
        let data = try PNG.encode(gradient(width: 64, height: 64))
        let truncated = errorText { _ = try PNG.decodeGray(Data(data.prefix(data.count - 30)), source: "cut.png") }
        #expect(truncated.contains("cut.png") && truncated.contains("truncated PNG"), "\(truncated)")
        var flipped = data
        flipped[60] ^= 0xFF  // inside IDAT: the CRC no longer matches
        let corrupt = errorText { _ = try PNG.decodeGray(flipped, source: "flip.png") }
        #expect(corrupt.contains("flip.png") && (corrupt.contains("CRC") || corrupt.contains("invalid")), "\(corrupt)")
        #expect(errorText { _ = try PNG.decodeGray(Data("hello world".utf8), source: "x.png") }.contains("not a PNG file (bad signature)"))
    }
}

@Suite("zstd and gzip")
struct CompressionTests {
    @Test("zstd round trip with a content checksum")
    func zstdRoundTrip() throws {
        let input = Data((0..<100_000).map { UInt8(($0 * 7 / 13) & 0xFF) })
        let compressed = try Zstd.compress(input, level: 3)
        #expect(compressed.count < input.count / 10)
        #expect(try Zstd.decompress(compressed, expectedSize: input.count) == input)
    }

    @Test("a flipped byte or a truncated zstd file is reported with the file name")
    func zstdBroken() throws {
        let input = Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) })
        let compressed = try Zstd.compress(input)
        var flipped = compressed
        flipped[compressed.count / 2] ^= 0x40
        let flipText = errorText { _ = try Zstd.decompress(flipped, source: "shard-00000-of-00002.zst") }
        #expect(flipText.contains("shard-00000-of-00002.zst") && flipText.contains("corrupt zstd data"), "\(flipText)")
        let cutText = errorText { _ = try Zstd.decompress(compressed.prefix(compressed.count - 10), source: "s.zst") }
        #expect(cutText.contains("s.zst") && (cutText.contains("truncated") || cutText.contains("corrupt")), "\(cutText)")
        #expect(errorText { _ = try Zstd.decompress(Data("not zstd".utf8), source: "n.zst") }.contains("not a zstd frame"))
        #expect(errorText { _ = try Zstd.decompress(compressed, expectedSize: 7, source: "e.zst") }.contains("expected 7"))
    }

    @Test("gzip round trip, concatenated members, truncation")
    func gzip() throws {
        let text = Data(String(repeating: "dicom_id,subject_id,study_id\n", count: 500).utf8)
        let gz = try Gzip.compress(text)
        #expect(gz.prefix(2) == Data([0x1F, 0x8B]))
        #expect(try Gzip.decompress(gz) == text)
        #expect(try Gzip.decompress(gz + gz) == text + text)
        let cut = errorText { _ = try Gzip.decompress(gz.prefix(gz.count / 2), source: "mimic-cxr-2.0.0-split.csv.gz") }
        #expect(cut.contains("mimic-cxr-2.0.0-split.csv.gz") && cut.contains("truncated gzip"), "\(cut)")
        var bad = gz
        bad[3] = 0xFF  // reserved flag bits
        #expect(errorText { _ = try Gzip.decompress(bad, source: "b.gz") }.contains("b.gz"))
    }

    @Test("readText inflates .gz files and names missing files")
    func readText() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-io-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("a.csv.gz").path
        try Gzip.compress(Data("a,b\n1,2\n".utf8)).write(to: URL(fileURLWithPath: path))
        #expect(try Gzip.readText(path) == "a,b\n1,2\n")
        #expect(errorText { _ = try Gzip.readText(dir.appendingPathComponent("missing.csv").path) }.contains("missing.csv: no such file"))
    }
}

@Suite("safetensors")
struct SafeTensorsTests {
    @Test("write and read F32, F16, BF16, I64 and I32 with metadata")
    func roundTrip() throws {
        var writer = SafeTensorsWriter(metadata: ["model": "resnet"])
        let values: [Float] = [0, 1, -2.5, 65504, 1e-7, 3.14159]
        try writer.add("a", Tensor(shape: [2, 3], values))
        try writer.add("h", Tensor(shape: [6], values), as: .f16)
        try writer.add("b", Tensor(shape: [3, 2], values), as: .bf16)
        try writer.add("ids", Tensor<Int64>(shape: [2], [7, -1]))
        try writer.add("mask", Tensor<Int32>(shape: [3], [1, 0, 1]))
        let file = try SafeTensorsFile(data: writer.serialized())
        #expect(file.metadata["model"] == "resnet")
        #expect(try file.floats("a").scalars == values)
        let half = try file.floats("h").scalars
        #expect(half[2] == -2.5 && half[3] == 65504 && abs(half[5] - 3.14159) < 2e-3 && abs(half[4] - 1e-7) < 6e-8)
        #expect(try file.floats("b").shape == [3, 2])
        #expect(abs(try file.floats("b").scalars[5] - 3.14159) < 2e-2)
        #expect(try file.integers("ids").scalars == [7, -1])
        #expect(try file.int32s("mask").scalars == [1, 0, 1])
        #expect(errorText { _ = try file.floats("ids") }.contains("not a floating-point tensor"))
        #expect(errorText { _ = try file.floats("zzz") }.contains("no tensor named zzz"))
    }

    @Test("F16 conversion is exact on every representable half")
    func halfExhaustive() {
        for bits in UInt16(0)...UInt16.max where (bits & 0x7C00) != 0x7C00 {
            #expect(HalfFloat.half(fromFloat: HalfFloat.float(fromHalf: bits)) == bits)
        }
    }

    private func file(header: String, dataBytes: Int) -> Data {
        var d = Data()
        withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { d.append(contentsOf: $0) }
        d.append(Data(header.utf8))
        d.append(Data(count: dataBytes))
        return d
    }

    @Test("invalid headers are errors that name the file and the tensor")
    func invalid() throws {
        func check(_ header: String, _ bytes: Int, _ expected: String) {
            let text = errorText { _ = try SafeTensorsFile(data: file(header: header, dataBytes: bytes), path: "w.safetensors") }
            #expect(text.contains("w.safetensors") && text.contains(expected), "\(text)")
        }
        check(#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4, "fall outside the 4-byte data section")
        check(#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "a holds 8 bytes but F32 [3] needs 12")
        check(#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12, "overlap")
        check(#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, 8, "unsupported dtype Q4")
        check(#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}"#, 0, "invalid shape")
        check("[1, 2]", 0, "not a JSON object")
        var huge = Data()
        withUnsafeBytes(of: UInt64(1 << 40).littleEndian) { huge.append(contentsOf: $0) }
        #expect(errorText { _ = try SafeTensorsFile(data: huge, path: "h.safetensors") }.contains("exceeds the file"))
        #expect(errorText { _ = try SafeTensorsFile(data: Data([1, 2]), path: "s.safetensors") }.contains("shorter than the 8-byte header length"))
        #expect(errorText { _ = try SafeTensorsFile(path: "/nonexistent/x.safetensors") }.contains("/nonexistent/x.safetensors: no such file"))
    }
}
