// DICOM reading and writing: pydicom-written fixtures (tools/make_dicom_fixtures.py) in each supported
// encoding, checked pixel by pixel against the pattern the script wrote; our JPEG-baseline writer read
// back by our reader; and broken files, which must come back as errors naming the file and the problem,
// never a crash.

import ConvirtCore
import ConvirtIO
import Foundation
import Testing

/// Every fixture image is 64 columns by 48 rows.
private let columns = 64, rows = 48

private func fixturePath(_ name: String) throws -> String {
    guard let url = Bundle.module.url(forResource: "Fixtures/dicom/\(name)", withExtension: nil) else {
        throw ConvirtError("missing fixture dicom/\(name)")
    }
    return url.path
}

private func fixture(_ name: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: fixturePath(name))) }

private func errorText(_ body: () throws -> Void) -> String {
    do { try body(); return "" } catch { return "\(error)" }
}

/// The largest |image - expected(x, y)| over all pixels.
private func maxError(_ image: GrayImage, _ expected: (Int, Int) -> Float) -> Float {
    var worst: Float = 0
    for y in 0..<image.height { for x in 0..<image.width { worst = max(worst, abs(image.pixels[y * image.width + x] - expected(x, y))) } }
    return worst
}

private func meanError(_ image: GrayImage, _ expected: (Int, Int) -> Float) -> Float {
    var sum: Float = 0
    for y in 0..<image.height { for x in 0..<image.width { sum += abs(image.pixels[y * image.width + x] - expected(x, y)) } }
    return sum / Float(image.pixels.count)
}

/// The 8-bit pattern of most fixtures.
private func pattern8(_ x: Int, _ y: Int) -> Float { Float((x * 3 + y * 5) % 256) / 255 }

/// The 12-bit ramp of the 16-bit fixtures.
private func ramp12(_ x: Int, _ y: Int) -> Int { (x * 65 + y * 87) % 4096 }

private func gradient(width: Int, height: Int) -> GrayImage {
    GrayImage(width: width, height: height, pixels: (0..<(width * height)).map { i in
        Float((i % width) * 3 + (i / width) * 2) / Float(3 * width + 2 * height)
    })
}

/// `data` with the first occurrence of `old` replaced by `new` (same length).
private func patched(_ data: Data, _ old: [UInt8], _ new: [UInt8]) throws -> Data {
    precondition(old.count == new.count)
    guard let range = data.firstRange(of: Data(old)) else { throw ConvirtError("pattern \(old) not found") }
    var copy = data
    copy.replaceSubrange(range, with: new)
    return copy
}

@Suite("DICOM reader on pydicom-written files")
struct DICOMReaderTests {
    @Test("explicit VR little endian, 8-bit MONOCHROME2, exact pixels and header")
    func explicit8() throws {
        let path = try fixturePath("explicit_8bit_mono2.dcm")
        let info = try DICOM.info(fixture("explicit_8bit_mono2.dcm"))
        #expect(info.rows == rows && info.columns == columns && info.samplesPerPixel == 1)
        #expect(info.bitsAllocated == 8 && info.bitsStored == 8 && info.highBit == 7 && !info.isSigned)
        #expect(info.photometric == "MONOCHROME2" && info.transferSyntax == DICOM.TransferSyntax.explicitVRLittleEndian)
        #expect(info.patientID == "PAT-8" && info.numberOfFrames == 1)
        let image = try DICOM.decodeGray(path: path)
        #expect(image.width == columns && image.height == rows)
        #expect(maxError(image, pattern8) < 1e-6)
        #expect(image.bytes == (0..<(rows * columns)).map { UInt8((($0 % columns) * 3 + ($0 / columns) * 5) % 256) })
    }

    @Test("implicit VR little endian, 16 bits allocated, 12 stored: scaled by /4095")
    func implicit16() throws {
        let data = try fixture("implicit_16bit_12stored.dcm")
        let info = try DICOM.info(data)
        #expect(info.transferSyntax == DICOM.TransferSyntax.implicitVRLittleEndian)
        #expect(info.bitsAllocated == 16 && info.bitsStored == 12 && info.highBit == 11 && info.patientID == nil)
        let image = try DICOM.decodeGray(data, source: "implicit_16bit_12stored.dcm")
        #expect(maxError(image) { x, y in Float(ramp12(x, y)) / 4095 } < 1e-6)
        #expect(image.pixels.min() == 0 && image.pixels.max() == 1)
    }

    @Test("explicit 16-bit MONOCHROME1 (10 bits stored) is inverted: low values come out white")
    func monochrome1() throws {
        let data = try fixture("explicit_16bit_mono1.dcm")
        #expect(try DICOM.info(data).photometric == "MONOCHROME1")
        let image = try DICOM.decodeGray(data)
        #expect(maxError(image) { x, y in 1 - Float((x * 16 + y * 21) % 1024) / 1023 } < 1e-6)
        #expect(image.pixels[0] == 1)  // stored 0 is white in MONOCHROME1
    }

    @Test("signed 16-bit (12 stored) maps -2048...2047 to 0...1; rescale values are reported")
    func signed16() throws {
        let data = try fixture("explicit_16bit_signed.dcm")
        let info = try DICOM.info(data)
        #expect(info.isSigned && info.bitsStored == 12)
        #expect(info.rescaleSlope == 1 && info.rescaleIntercept == -1024)
        let image = try DICOM.decodeGray(data)
        #expect(maxError(image) { x, y in Float(ramp12(x, y)) / 4095 } < 1e-6)  // (v - (-2048)) / 4095 with v = ramp - 2048
    }

    @Test("JPEG baseline, offset table and a frame split over two fragments, within JPEG tolerance")
    func jpegBaseline() throws {
        let data = try fixture("jpeg_baseline_8bit.dcm")
        let info = try DICOM.info(data)
        #expect(info.transferSyntax == DICOM.TransferSyntax.jpegBaseline && info.patientID == "RSNA-LIKE")
        #expect(info.rows == rows && info.columns == columns && info.bitsAllocated == 8)
        let image = try DICOM.decodeGray(data)
        #expect(image.width == columns && image.height == rows)
        let expected = { (x: Int, y: Int) in Float(x * 2 + y * 2) / 255 }
        let mean = meanError(image, expected)
        #expect(mean < 3 / 255, "mean error \(mean * 255) gray levels")
        #expect(maxError(image, expected) < 12 / 255)
    }

    @Test("undefined-length sequences with nested undefined-length sequences are skipped",
          arguments: ["nested_sequence_explicit.dcm", "nested_sequence_implicit.dcm"])
    func nestedSequences(name: String) throws {
        let data = try fixture(name)
        let info = try DICOM.info(data)
        #expect(info.rows == rows && info.columns == columns)  // not the Rows = 999 inside the sequence items
        #expect(maxError(try DICOM.decodeGray(data, source: name), pattern8) < 1e-6)
    }

    @Test("a data set without preamble or file meta is read as implicit VR little endian")
    func noPreamble() throws {
        let data = try fixture("no_preamble_implicit.dcm")
        #expect(data.prefix(2) == Data([0x08, 0x00]))
        let info = try DICOM.info(data)
        #expect(info.transferSyntax == DICOM.TransferSyntax.implicitVRLittleEndian)
        #expect(maxError(try DICOM.decodeGray(data), pattern8) < 1e-6)
    }
}

@Suite("DICOM JPEG-baseline writer")
struct DICOMWriterTests {
    @Test("round trip through our reader, with and without PatientID, odd sizes included")
    func roundTrip() throws {
        for (width, height, patient) in [(64, 48, "P-0001" as String?), (33, 17, nil)] {
            let image = gradient(width: width, height: height)
            let data = try DICOM.encodeJPEGBaseline(image, quality: 95, patientID: patient)
            #expect(data.count % 2 == 0)
            #expect(data[128..<132] == Data("DICM".utf8))
            let info = try DICOM.info(data, source: "written.dcm")
            #expect(info.transferSyntax == DICOM.TransferSyntax.jpegBaseline)
            #expect(info.rows == height && info.columns == width && info.samplesPerPixel == 1)
            #expect(info.bitsAllocated == 8 && info.bitsStored == 8 && info.highBit == 7 && info.pixelRepresentation == 0)
            #expect(info.photometric == "MONOCHROME2" && info.patientID == patient)
            let back = try DICOM.decodeGray(data, source: "written.dcm")
            #expect(back.width == width && back.height == height)
            // The fragment is exactly JPEG.encode's stream: the DICOM decode equals the plain JPEG decode.
            #expect(back == (try JPEG.decodeGray(JPEG.encode(image, quality: 95))))
            let mean = zip(back.pixels, image.pixels).map { abs($0 - $1) }.reduce(0, +) / Float(image.pixels.count)
            #expect(mean < 3 / 255, "mean error \(mean * 255) gray levels")
        }
    }

    @Test("the writer's layout: file meta group length, empty offset table, one even fragment, delimiter")
    func layout() throws {
        let data = try DICOM.encodeJPEGBaseline(gradient(width: 31, height: 9), sopInstanceUID: "1.2.3.4")
        let bytes = [UInt8](data)
        func u32(_ i: Int) -> Int { Int(bytes[i]) | Int(bytes[i + 1]) << 8 | Int(bytes[i + 2]) << 16 | Int(bytes[i + 3]) << 24 }
        #expect(bytes[132..<140] == [0x02, 0x00, 0x00, 0x00, 0x55, 0x4C, 0x04, 0x00])  // (0002,0000) UL 4
        let groupLength = u32(140)
        #expect(bytes[144 + groupLength] == 0x08)  // the data set follows group 0002
        #expect(data.firstRange(of: Data("1.2.840.10008.1.2.4.50".utf8)) != nil)
        #expect(data.firstRange(of: Data("1.2.3.4\0".utf8)) != nil)
        guard let pixel = data.firstRange(of: Data([0xE0, 0x7F, 0x10, 0x00, 0x4F, 0x42, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])) else {
            Issue.record("no encapsulated pixel data element"); return
        }
        let bot = pixel.upperBound
        #expect(bytes[bot..<(bot + 8)] == [0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0])
        let fragmentLength = u32(bot + 12)
        #expect(fragmentLength % 2 == 0 && bytes[bot + 16] == 0xFF && bytes[bot + 17] == 0xD8)
        #expect(bot + 16 + fragmentLength + 8 == bytes.count)
        #expect(bytes[(bytes.count - 8)...] == [0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0])
    }

    @Test("fresh SOP instance UIDs are valid 2.25 UIDs")
    func instanceUIDs() throws {
        let a = try DICOM.encodeJPEGBaseline(gradient(width: 8, height: 8))
        let b = try DICOM.encodeJPEGBaseline(gradient(width: 8, height: 8))
        #expect(a != b)
        #expect(a.firstRange(of: Data("2.25.".utf8)) != nil)
    }

    @Test("bad writer arguments are errors")
    func badArguments() {
        let image = gradient(width: 8, height: 8)
        #expect(errorText { _ = try DICOM.encodeJPEGBaseline(image, patientID: "A\\B") }.contains("PatientID"))
        #expect(errorText { _ = try DICOM.encodeJPEGBaseline(image, quality: 0) }.contains("quality"))
        #expect(errorText { _ = try DICOM.encodeJPEGBaseline(image, sopInstanceUID: "1.02.x") }.contains("not a valid UID"))
        #expect(errorText { _ = try DICOM.encodeJPEGBaseline(GrayImage(width: 70000, height: 1, pixels: [Float](repeating: 0, count: 70000))) }
            .contains("16-bit Rows and Columns"))
    }

    @Test("writeJPEGBaseline and decodeGray(path:) through the file system")
    func files() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-dicom-\(UUID().uuidString).dcm").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let image = gradient(width: 40, height: 30)
        try DICOM.writeJPEGBaseline(image, to: path, patientID: "X")
        #expect(try DICOM.decodeGray(path: path).width == 40)
        let missing = errorText { _ = try DICOM.decodeGray(path: path + ".missing") }
        #expect(missing.contains(path + ".missing") && missing.contains("no such file"), "\(missing)")
    }
}

@Suite("DICOM broken files")
struct DICOMBrokenTests {
    @Test("truncated in the middle of the pixel data")
    func truncatedPixelData() throws {
        let path = try fixturePath("truncated_pixel_data.dcm")
        let text = errorText { _ = try DICOM.decodeGray(path: path) }
        #expect(text.contains(path) && text.contains("truncated DICOM (pixel data needs 3072 bytes, 1536 present)"), "\(text)")
    }

    @Test("truncated inside the header")
    func truncatedHeader() throws {
        let path = try fixturePath("truncated_header.dcm")
        let text = errorText { _ = try DICOM.decodeGray(path: path) }
        #expect(text.contains(path) && text.contains("truncated DICOM") && text.contains("(0010,0010)") && text.contains("needs 12 bytes, 4 present"), "\(text)")
        #expect(errorText { _ = try DICOM.info(fixture("truncated_header.dcm"), source: "h.dcm") }.contains("h.dcm: truncated DICOM"))
    }

    @Test("not a DICOM file, and an empty file")
    func notDICOM() throws {
        let path = try fixturePath("not_dicom.dcm")
        let text = errorText { _ = try DICOM.decodeGray(path: path) }
        #expect(text.contains(path) && text.contains("not a DICOM file"), "\(text)")
        #expect(errorText { _ = try DICOM.decodeGray(Data(), source: "empty.dcm") } .contains("empty.dcm: not a DICOM file (an empty file"))
        let png = try PNG.encode(gradient(width: 4, height: 4))
        #expect(errorText { _ = try DICOM.decodeGray(png, source: "x.png") }.contains("not a DICOM file"))
    }

    @Test("an unsupported transfer syntax is named; its header can still be read")
    func jpeg2000() throws {
        let path = try fixturePath("jpeg2000_unsupported.dcm")
        let text = errorText { _ = try DICOM.decodeGray(path: path) }
        #expect(text.contains(path) && text.contains("JPEG 2000") && text.contains("(1.2.840.10008.1.2.4.90) is not supported"), "\(text)")
        let info = try DICOM.info(fixture("jpeg2000_unsupported.dcm"))
        #expect(info.transferSyntax == "1.2.840.10008.1.2.4.90" && info.rows == rows)
    }

    @Test("missing Rows, wrong pixel data size, lengths past the end, unsupported photometric and bit depth")
    func damagedHeaders() throws {
        let good = try fixture("explicit_8bit_mono2.dcm")
        func text(_ data: Data) -> String { errorText { _ = try DICOM.decodeGray(data, source: "/data/x.dcm") } }

        let noRows = try patched(good, [0x28, 0x00, 0x10, 0x00, 0x55, 0x53], [0x28, 0x00, 0x12, 0x00, 0x55, 0x53])
        #expect(text(noRows).contains("/data/x.dcm: invalid DICOM: no Rows (0028,0010)"), "\(text(noRows))")

        let noColumns = try patched(good, [0x28, 0x00, 0x11, 0x00, 0x55, 0x53], [0x28, 0x00, 0x12, 0x00, 0x55, 0x53])
        #expect(text(noColumns).contains("no Columns (0028,0011)"))

        let noPixels = try patched(good, [0xE0, 0x7F, 0x10, 0x00], [0xE0, 0x7F, 0x20, 0x00])
        #expect(text(noPixels).contains("no Pixel Data (7FE0,0010)"), "\(text(noPixels))")

        // BitsAllocated 16 with 3072 bytes of pixel data for 64 x 48.
        let wrongSize = try patched(good, [0x28, 0x00, 0x00, 0x01, 0x55, 0x53, 0x02, 0x00, 0x08], [0x28, 0x00, 0x00, 0x01, 0x55, 0x53, 0x02, 0x00, 0x10])
        #expect(text(wrongSize).contains("pixel data holds 3072 bytes, but 1 frame of 64 x 48 at 16 bits need 6144"), "\(text(wrongSize))")

        let bits32 = try patched(good, [0x28, 0x00, 0x00, 0x01, 0x55, 0x53, 0x02, 0x00, 0x08], [0x28, 0x00, 0x00, 0x01, 0x55, 0x53, 0x02, 0x00, 0x20])
        #expect(text(bits32).contains("BitsAllocated (0028,0100) 32 is not supported"))
        // BitsAllocated 0 and 65288 (0xFF08), and no SamplesPerPixel (its tag renamed to an unknown one):
        // refused in the native and the JPEG (encapsulated) data alike, naming the attribute.
        let jpeg = try fixture("jpeg_baseline_8bit.dcm")
        for (name, image) in [("native", good), ("JPEG", jpeg)] {
            for (value, bytes) in [(0, [UInt8(0x00), 0x00]), (65288, [0x08, 0xFF])] {
                let bits = try patched(image, [0x28, 0x00, 0x00, 0x01, 0x55, 0x53, 0x02, 0x00, 0x08, 0x00],
                                       [0x28, 0x00, 0x00, 0x01, 0x55, 0x53, 0x02, 0x00] + bytes)
                #expect(text(bits).contains("BitsAllocated (0028,0100) \(value) is not supported"), "\(name): \(text(bits))")
            }
            let noSamples = try patched(image, [0x28, 0x00, 0x02, 0x00, 0x55, 0x53], [0x28, 0x00, 0x03, 0x00, 0x55, 0x53])
            #expect(text(noSamples).contains("/data/x.dcm: invalid DICOM: no SamplesPerPixel (0028,0002)"), "\(name): \(text(noSamples))")
        }

        // Patient's Name claims 65520 bytes.
        let longName = try patched(good, [0x10, 0x00, 0x10, 0x00, 0x50, 0x4E, 0x0C, 0x00], [0x10, 0x00, 0x10, 0x00, 0x50, 0x4E, 0xF0, 0xFF])
        #expect(text(longName).contains("truncated DICOM (element (0010,0010)") && text(longName).contains("needs 65520 bytes"), "\(text(longName))")

        // Pixel data claims more than the file holds.
        let longPixels = try patched(good, [0xE0, 0x7F, 0x10, 0x00, 0x4F, 0x42, 0, 0, 0x00, 0x0C, 0x00, 0x00],
                                     [0xE0, 0x7F, 0x10, 0x00, 0x4F, 0x42, 0, 0, 0x00, 0x0D, 0x00, 0x00])
        #expect(text(longPixels).contains("truncated DICOM (pixel data needs 3328 bytes, 3072 present)"), "\(text(longPixels))")

        let rgb = try patched(good, Array("MONOCHROME2".utf8), Array("RGB        ".utf8))
        #expect(text(rgb).contains("PhotometricInterpretation (0028,0004) RGB is not supported"))

        let badVR = try patched(good, [0x10, 0x00, 0x10, 0x00, 0x50, 0x4E], [0x10, 0x00, 0x10, 0x00, 0x70, 0x6E])
        #expect(text(badVR).contains("no valid VR"), "\(text(badVR))")

        let noTransferSyntax = try patched(good, [0x02, 0x00, 0x10, 0x00, 0x55, 0x49], [0x02, 0x00, 0x11, 0x00, 0x55, 0x49])
        #expect(text(noTransferSyntax).contains("no Transfer Syntax UID (0002,0010)"))

        let bigEndian = try patched(good, Array("1.2.840.10008.1.2.1\0".utf8), Array("1.2.840.10008.1.2.2\0".utf8))
        #expect(text(bigEndian).contains("explicit VR big endian (1.2.840.10008.1.2.2) is not supported"), "\(text(bigEndian))")
    }

    @Test("broken encapsulated pixel data and sequences")
    func damagedEncapsulation() throws {
        let jpeg = try fixture("jpeg_baseline_8bit.dcm")
        func text(_ data: Data) -> String { errorText { _ = try DICOM.decodeGray(data, source: "/data/rsna.dcm") } }

        let cut = text(jpeg.prefix(jpeg.count - 200))
        #expect(cut.contains("/data/rsna.dcm: truncated DICOM (pixel data fragment 2 needs") || cut.contains("/data/rsna.dcm: truncated DICOM (pixel data fragment 1 needs"), "\(cut)")

        let noDelimiter = text(jpeg.prefix(jpeg.count - 8))
        #expect(noDelimiter.contains("truncated DICOM (encapsulated pixel data ends at byte \(jpeg.count - 8) without a sequence delimiter)"), "\(noDelimiter)")

        // A damaged JPEG stream inside a complete DICOM structure: libjpeg's complaint, with the file name.
        var garbled = jpeg
        let fragmentStart = jpeg.count - 8 - 200
        for i in fragmentStart..<(fragmentStart + 100) { garbled[i] = 0x00 }
        _ = text(garbled)  // may decode with damage or fail; it must not crash

        let nested = try fixture("nested_sequence_explicit.dcm")
        let inSequence = text(nested.prefix(700))
        #expect(inSequence.contains("/data/rsna.dcm: truncated DICOM"), "\(inSequence)")
    }

    @Test("every prefix and random byte damage of the fixtures is an error or an image, never a trap",
          arguments: ["explicit_8bit_mono2.dcm", "implicit_16bit_12stored.dcm", "nested_sequence_explicit.dcm",
                      "nested_sequence_implicit.dcm", "no_preamble_implicit.dcm", "jpeg_baseline_8bit.dcm"])
    func neverTraps(name: String) throws {
        let data = try fixture(name)
        let source = "/fuzz/\(name)"
        for length in 0..<data.count {
            do {
                _ = try DICOM.decodeGray(data.prefix(length), source: source)
                Issue.record("a \(length)-byte prefix of \(name) decoded")
            } catch let error as ConvirtError {
                #expect(error.message.hasPrefix("cannot read \(source): "), "\(error.message)")
            }
        }
        // Random damage to the header and the first bytes of the pixel data (not deep inside a JPEG
        // stream, where a forged frame size could ask libjpeg for gigabytes).
        let pixelTag = data.firstRange(of: Data([0xE0, 0x7F, 0x10, 0x00]))?.lowerBound ?? data.count
        let limit = min(data.count, pixelTag + 24)
        var generator = SplitMix64(seed: 0xD1C0)
        for _ in 0..<3000 {
            var damaged = data
            for _ in 0..<(1 + Int(generator.next() % 3)) {
                damaged[Int(generator.next() % UInt64(limit))] = UInt8(truncatingIfNeeded: generator.next())
            }
            do {
                let image = try DICOM.decodeGray(damaged, source: source)
                #expect(image.pixels.count == image.width * image.height)
            } catch let error as ConvirtError {
                #expect(error.message.hasPrefix("cannot read \(source): "), "\(error.message)")
            }
        }
    }
}

/// A small deterministic generator for the damage test.
private struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D4_9CE5_D1B4_9133
        return z ^ (z >> 31)
    }
}
