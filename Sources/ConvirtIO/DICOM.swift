// DICOM (PS3.10 files, PS3.5 encoding) for grayscale radiographs: a reader for native 8/16-bit and
// JPEG-baseline pixel data, and a writer of minimal JPEG-baseline files.
//
// Layout of a Part 10 file: a 128-byte preamble, "DICM", the file meta information (group 0002, always
// explicit VR little endian) whose Transfer Syntax UID (0002,0010) says how the data set that follows
// is encoded. Files without preamble are accepted too: a data set starting directly at a group-0008 tag
// (implicit VR little endian, or explicit when a valid VR follows the first tag), or a file meta group
// without the preamble.
//
// Data elements: tag (group, element: two little-endian UInt16), then
//   implicit VR: a 4-byte length;
//   explicit VR: the 2-character VR, then for OB OD OF OL OV OW SQ SV UC UN UR UT UV two reserved bytes
//                and a 4-byte length, for every other VR a 2-byte length.
// A length of 0xFFFFFFFF is undefined: the value is a sequence of items (FFFE,E000), each of a defined
// length or closed by an item delimiter (FFFE,E00D), and the sequence is closed by (FFFE,E0DD). Item and
// delimiter tags never carry a VR. Undefined-length UN is, per PS3.5 6.2.2, implicit VR inside.
//
// Pixel data (7FE0,0010) is either native (rows x columns samples of BitsAllocated bits, little endian,
// the value in bits HighBit-BitsStored+1 ... HighBit, two's complement when PixelRepresentation is 1), or
// encapsulated (undefined length; a basic offset table item, then fragment items, then (FFFE,E0DD)).

import ConvirtCore
import Foundation

public enum DICOM {
    /// Transfer syntax UIDs this module reads (and, for JPEG baseline, writes).
    public enum TransferSyntax {
        public static let implicitVRLittleEndian = "1.2.840.10008.1.2"
        public static let explicitVRLittleEndian = "1.2.840.10008.1.2.1"
        /// JPEG baseline (process 1), 8-bit lossy; the RSNA Pneumonia Detection Challenge images.
        public static let jpegBaseline = "1.2.840.10008.1.2.4.50"
    }

    /// Secondary Capture Image Storage, the SOP class of the files `encodeJPEGBaseline` writes.
    public static let secondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7"

    /// What the header says about the image. Defaults: PhotometricInterpretation
    /// MONOCHROME2, BitsStored = BitsAllocated, HighBit = BitsStored - 1, PixelRepresentation 0,
    /// NumberOfFrames 1, RescaleSlope 1, RescaleIntercept 0.
    public struct Info: Sendable, Equatable {
        public let rows: Int
        public let columns: Int
        public let samplesPerPixel: Int
        public let bitsAllocated: Int
        public let bitsStored: Int
        public let highBit: Int
        /// 0: unsigned samples, 1: two's complement.
        public let pixelRepresentation: Int
        /// MONOCHROME1 (low values are white) or MONOCHROME2 (low values are black), or what the file says.
        public let photometric: String
        /// The transfer syntax UID; implicit VR little endian for a file without file meta information.
        public let transferSyntax: String
        public let numberOfFrames: Int
        public let rescaleSlope: Double
        public let rescaleIntercept: Double
        /// Patient ID (0010,0020), when present and not empty.
        public let patientID: String?

        public var isSigned: Bool { pixelRepresentation == 1 }
    }

    /// The header of a DICOM file, up to its pixel data. Any transfer syntax encoded in explicit VR
    /// little endian (which includes every JPEG, JPEG-LS, JPEG 2000 and RLE syntax) can be read here,
    /// even when `decodeGray` cannot decode its pixels.
    public static func info(_ data: Data, source: String = "<memory>") throws -> Info {
        try data.withUnsafeBytes { raw in try Parser(bytes: raw, source: source).parse().info }
    }

    /// Reads and decodes the file at `path`; see `decodeGray(_:source:)`.
    public static func decodeGray(path: String) throws -> GrayImage {
        try decodeGray(Files.read(path), source: path)
    }

    /// The first frame as gray in [0, 1], where 1 is white in the MONOCHROME2 sense (dense tissue is
    /// bright): MONOCHROME1 images are inverted, and so are images whose RescaleSlope is negative.
    ///
    /// Native pixel data (implicit or explicit VR little endian) is scaled by the range that BitsStored
    /// allows, not by the image's own extremes: unsigned 12-bit 0...4095 maps to 0...1, signed 12-bit
    /// -2048...2047 likewise, 8-bit by /255. The modality rescale is linear, so after this scaling only
    /// its sign matters. JPEG baseline pixel data: the fragments of the first frame are concatenated and
    /// decoded with libjpeg-turbo.
    ///
    /// Errors (`ConvirtError`) name `source` and the problem: not DICOM, truncated (with the bytes needed
    /// and present), missing Rows/Columns/pixel data, a pixel data size that does not match the header,
    /// an unsupported transfer syntax, photometric interpretation or bit depth.
    public static func decodeGray(_ data: Data, source: String = "<memory>") throws -> GrayImage {
        let decoded = try data.withUnsafeBytes { raw -> (image: GrayImage?, jpeg: Data?, info: Info, invert: Bool) in
            let parser = Parser(bytes: raw, source: source)
            let header = try parser.parse()
            let info = header.info
            switch info.transferSyntax {
            case TransferSyntax.implicitVRLittleEndian, TransferSyntax.explicitVRLittleEndian, TransferSyntax.jpegBaseline: break
            default: throw parser.fail(unsupportedTransferSyntax(info.transferSyntax))
            }
            guard info.samplesPerPixel == 1 else {
                throw parser.fail("SamplesPerPixel (0028,0002) is \(info.samplesPerPixel); only single-sample (grayscale) images are supported")
            }
            guard info.photometric == "MONOCHROME1" || info.photometric == "MONOCHROME2" else {
                throw parser.fail("PhotometricInterpretation (0028,0004) \(info.photometric) is not supported (MONOCHROME1 or MONOCHROME2 only)")
            }
            guard info.rescaleSlope != 0, info.rescaleSlope.isFinite, info.rescaleIntercept.isFinite else {
                throw parser.fail("RescaleSlope \(info.rescaleSlope) / RescaleIntercept \(info.rescaleIntercept) are not usable")
            }
            let invert = (info.photometric == "MONOCHROME1") != (info.rescaleSlope < 0)
            if info.transferSyntax == TransferSyntax.jpegBaseline {
                return (nil, try parser.firstFrame(header), info, invert)
            }
            return (try parser.nativeFrame(header, invert: invert), nil, info, invert)
        }
        if let image = decoded.image { return image }
        guard let jpeg = decoded.jpeg else { throw ConvirtError("cannot read \(source): no pixel data") }
        var image = try JPEG.decodeGray(jpeg, source: source)
        let info = decoded.info
        guard image.width == info.columns, image.height == info.rows else {
            throw ConvirtError("cannot read \(source): the JPEG frame is \(image.width) x \(image.height) but Columns x Rows say \(info.columns) x \(info.rows)")
        }
        if decoded.invert {
            for i in image.pixels.indices { image.pixels[i] = 1 - image.pixels[i] }
        }
        return image
    }

    /// A minimal Part 10 file holding `image` as JPEG baseline (1.2.840.10008.1.2.4.50): preamble, "DICM",
    /// file meta information (Secondary Capture Image Storage), then an explicit VR little endian data set
    /// with SOP class and instance UIDs, the optional PatientID, the image pixel module (1 sample,
    /// MONOCHROME2, 8 bits allocated and stored, high bit 7, unsigned), LossyImageCompression "01", and
    /// encapsulated pixel data: an empty basic offset table, one fragment with the baseline JPEG of
    /// `JPEG.encode(image, quality:)` (padded to an even length), the sequence delimiter. The SOP instance
    /// UID is a fresh UUID-derived 2.25 UID unless `sopInstanceUID` is given.
    public static func encodeJPEGBaseline(_ image: GrayImage, quality: Int = 90, patientID: String? = nil,
                                          sopInstanceUID: String? = nil) throws -> Data {
        let context = "DICOM encode"
        try require(image.width >= 1 && image.width <= 65535 && image.height >= 1 && image.height <= 65535, context,
                    "a \(image.width) x \(image.height) image does not fit DICOM's 16-bit Rows and Columns")
        try require((1...100).contains(quality), context, "JPEG quality must be 1...100, not \(quality)")
        if let patientID {
            try require(patientID.utf8.count <= 64 && patientID.unicodeScalars.allSatisfy { $0.value >= 0x20 && $0.value < 0x7F && $0 != "\\" },
                        context, "PatientID must be at most 64 printable ASCII characters without a backslash: \(patientID.debugDescription)")
        }
        let instanceUID = sopInstanceUID ?? uuidUID()
        try require(isValidUID(instanceUID), context, "\(instanceUID.debugDescription) is not a valid UID")

        var jpeg = try JPEG.encode(image, quality: quality)
        if jpeg.count % 2 == 1 { jpeg.append(0) }
        try require(jpeg.count < 0xFFFF_FFFE, context, "the JPEG stream is too large for one fragment")

        var meta = ElementWriter()
        meta.bytes(0x0002, 0x0001, "OB", [0x00, 0x01])
        meta.string(0x0002, 0x0002, "UI", secondaryCaptureImageStorage)
        meta.string(0x0002, 0x0003, "UI", instanceUID)
        meta.string(0x0002, 0x0010, "UI", TransferSyntax.jpegBaseline)
        meta.string(0x0002, 0x0012, "UI", implementationClassUID)
        meta.string(0x0002, 0x0013, "SH", implementationVersionName)

        var out = ElementWriter()
        out.data.append(Data(count: 128))
        out.data.append(contentsOf: Array("DICM".utf8))
        out.uint32(0x0002, 0x0000, UInt32(meta.data.count))
        out.data.append(meta.data)
        out.string(0x0008, 0x0016, "UI", secondaryCaptureImageStorage)
        out.string(0x0008, 0x0018, "UI", instanceUID)
        out.string(0x0008, 0x0060, "CS", "OT")
        if let patientID { out.string(0x0010, 0x0020, "LO", patientID) }
        out.uint16(0x0028, 0x0002, 1)
        out.string(0x0028, 0x0004, "CS", "MONOCHROME2")
        out.uint16(0x0028, 0x0010, UInt16(image.height))
        out.uint16(0x0028, 0x0011, UInt16(image.width))
        out.uint16(0x0028, 0x0100, 8)
        out.uint16(0x0028, 0x0101, 8)
        out.uint16(0x0028, 0x0102, 7)
        out.uint16(0x0028, 0x0103, 0)
        out.string(0x0028, 0x2110, "CS", "01")
        // Encapsulated pixel data: OB of undefined length, empty basic offset table, one fragment.
        out.header(0x7FE0, 0x0010, "OB", length: undefinedLength)
        out.header(0xFFFE, 0xE000, nil, length: 0)
        out.header(0xFFFE, 0xE000, nil, length: UInt32(jpeg.count))
        out.data.append(jpeg)
        out.header(0xFFFE, 0xE0DD, nil, length: 0)
        return out.data
    }

    /// Writes `encodeJPEGBaseline(image, quality:patientID:)` to `path` atomically.
    public static func writeJPEGBaseline(_ image: GrayImage, to path: String, quality: Int = 90, patientID: String? = nil) throws {
        try Files.writeAtomically(encodeJPEGBaseline(image, quality: quality, patientID: patientID), to: path)
    }

    // MARK: - Transfer syntaxes

    static let undefinedLength: UInt32 = 0xFFFF_FFFF
    /// A fixed 2.25 (UUID-derived) UID naming this implementation in the file meta information.
    static let implementationClassUID = "2.25.223769884317420782144693390473193209206"
    static let implementationVersionName = "CONVIRT_SWIFT_1"

    static let transferSyntaxNames: [String: String] = [
        "1.2.840.10008.1.2": "implicit VR little endian",
        "1.2.840.10008.1.2.1": "explicit VR little endian",
        "1.2.840.10008.1.2.1.98": "encapsulated uncompressed explicit VR little endian",
        "1.2.840.10008.1.2.1.99": "deflated explicit VR little endian",
        "1.2.840.10008.1.2.2": "explicit VR big endian",
        "1.2.840.10008.1.2.4.50": "JPEG baseline (process 1)",
        "1.2.840.10008.1.2.4.51": "JPEG extended (process 2 and 4)",
        "1.2.840.10008.1.2.4.57": "JPEG lossless (process 14)",
        "1.2.840.10008.1.2.4.70": "JPEG lossless (process 14, selection value 1)",
        "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
        "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
        "1.2.840.10008.1.2.4.90": "JPEG 2000 (lossless only)",
        "1.2.840.10008.1.2.4.91": "JPEG 2000",
        "1.2.840.10008.1.2.4.92": "JPEG 2000 multi-component (lossless only)",
        "1.2.840.10008.1.2.4.93": "JPEG 2000 multi-component",
        "1.2.840.10008.1.2.4.94": "JPIP referenced",
        "1.2.840.10008.1.2.4.95": "JPIP referenced deflate",
        "1.2.840.10008.1.2.4.201": "HTJ2K (lossless only)",
        "1.2.840.10008.1.2.4.202": "HTJ2K RPCL (lossless only)",
        "1.2.840.10008.1.2.4.203": "HTJ2K",
        "1.2.840.10008.1.2.5": "RLE lossless",
    ]

    static func unsupportedTransferSyntax(_ uid: String) -> String {
        let name = transferSyntaxNames[uid] ?? "unknown transfer syntax"
        return "\(name) (\(uid)) is not supported (only implicit VR little endian, explicit VR little endian and JPEG baseline 1.2.840.10008.1.2.4.50)"
    }

    /// Syntaxes whose data set is explicit VR little endian (the header can be read, whatever the pixels).
    static func isExplicitLittleEndian(_ uid: String) -> Bool {
        uid == TransferSyntax.explicitVRLittleEndian || uid == "1.2.840.10008.1.2.1.98"
            || uid.hasPrefix("1.2.840.10008.1.2.4.") || uid == "1.2.840.10008.1.2.5"
    }

    static func isEncapsulated(_ uid: String) -> Bool {
        uid.hasPrefix("1.2.840.10008.1.2.4.") || uid == "1.2.840.10008.1.2.5" || uid == "1.2.840.10008.1.2.1.98"
    }

    static func isValidUID(_ uid: String) -> Bool {
        guard !uid.isEmpty, uid.utf8.count <= 64 else { return false }
        let components = uid.split(separator: ".", omittingEmptySubsequences: false)
        return components.allSatisfy { c in
            !c.isEmpty && c.allSatisfy { $0.isASCII && $0.isNumber } && (c == "0" || !c.hasPrefix("0"))
        }
    }

    /// "2.25." followed by the decimal value of a random UUID (PS3.5 B.2).
    static func uuidUID() -> String {
        let u = UUID().uuid
        let bytes = [u.0, u.1, u.2, u.3, u.4, u.5, u.6, u.7, u.8, u.9, u.10, u.11, u.12, u.13, u.14, u.15]
        // 128-bit big-endian number as four 32-bit limbs; repeated division by 10.
        var limbs = (0..<4).map { i in bytes[(4 * i)..<(4 * i + 4)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) } }
        var digits: [Character] = []
        repeat {
            var remainder: UInt64 = 0
            for i in limbs.indices {
                let value = remainder << 32 | UInt64(limbs[i])
                limbs[i] = UInt32(value / 10)
                remainder = value % 10
            }
            digits.append(Character(String(remainder)))
        } while limbs.contains { $0 != 0 }
        return "2.25." + String(digits.reversed())
    }
}

// MARK: - Reading

/// One data element header, located in the file.
private struct Element {
    let group: UInt16
    let element: UInt16
    /// Two ASCII characters for explicit VR; nil for implicit VR and for item and delimiter tags.
    let vr: String?
    let length: UInt32
    /// Byte offset of the element's tag.
    let offset: Int
    /// Byte offset of the element's value.
    let valueOffset: Int

    var tag: UInt32 { UInt32(group) << 16 | UInt32(element) }
    var isUndefinedLength: Bool { length == DICOM.undefinedLength }
}

private func hex4(_ v: UInt16) -> String {
    let digits = String(v, radix: 16, uppercase: true)
    return String(repeating: "0", count: 4 - digits.count) + digits
}

private func tagText(_ group: UInt16, _ element: UInt16) -> String { "(\(hex4(group)),\(hex4(element)))" }

private enum Tag {
    static let transferSyntax: UInt32 = 0x0002_0010
    static let patientID: UInt32 = 0x0010_0020
    static let samplesPerPixel: UInt32 = 0x0028_0002
    static let photometric: UInt32 = 0x0028_0004
    static let numberOfFrames: UInt32 = 0x0028_0008
    static let rows: UInt32 = 0x0028_0010
    static let columns: UInt32 = 0x0028_0011
    static let bitsAllocated: UInt32 = 0x0028_0100
    static let bitsStored: UInt32 = 0x0028_0101
    static let highBit: UInt32 = 0x0028_0102
    static let pixelRepresentation: UInt32 = 0x0028_0103
    static let rescaleIntercept: UInt32 = 0x0028_1052
    static let rescaleSlope: UInt32 = 0x0028_1053
    static let pixelData: UInt32 = 0x7FE0_0010

    static let wanted: Set<UInt32> = [
        patientID, samplesPerPixel, photometric, numberOfFrames, rows, columns, bitsAllocated, bitsStored, highBit,
        pixelRepresentation, rescaleIntercept, rescaleSlope,
    ]
}

/// VRs with two reserved bytes and a 4-byte length in explicit VR (PS3.5 7.1.2).
private let longVRs: Set<String> = ["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]

/// Sequences nested deeper than this are rejected rather than followed (malformed or hostile input).
private let maximumNesting = 64

/// The parsed header and the pixel data element.
private struct Header {
    let info: DICOM.Info
    let pixelData: Element
}

/// Every read is bounds-checked against `bytes`; problems become `ConvirtError`s naming `source`.
private struct Parser {
    let bytes: UnsafeRawBufferPointer
    let source: String

    var count: Int { bytes.count }

    func fail(_ problem: String) -> ConvirtError { ConvirtError("cannot read \(source): \(problem)") }

    func truncated(_ what: String, needs: Int, at offset: Int) -> ConvirtError {
        fail("truncated DICOM (\(what) needs \(needs) bytes, \(max(0, count - offset)) present)")
    }

    /// Callers have checked that `offset + 2 <= count`.
    func u16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }

    /// Callers have checked that `offset + 4 <= count`.
    func u32(_ offset: Int) -> UInt32 { UInt32(u16(offset)) | UInt32(u16(offset + 2)) << 16 }

    func ascii(_ range: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self)
    }

    func isUpper(_ b: UInt8) -> Bool { b >= 0x41 && b <= 0x5A }

    /// The element header at `offset`.
    func element(at offset: Int, explicit: Bool) throws -> Element {
        guard count - offset >= 8 else { throw truncated("the element header at byte \(offset)", needs: 8, at: offset) }
        let group = u16(offset), number = u16(offset + 2)
        if group == 0xFFFE || !explicit {
            return Element(group: group, element: number, vr: nil, length: u32(offset + 4), offset: offset, valueOffset: offset + 8)
        }
        let a = bytes[offset + 4], b = bytes[offset + 5]
        guard isUpper(a), isUpper(b) else {
            throw fail("invalid DICOM: element \(tagText(group, number)) at byte \(offset) has no valid VR (bytes \(a), \(b)); wrong transfer syntax or corrupt file")
        }
        let vr = String(decoding: [a, b], as: UTF8.self)
        if longVRs.contains(vr) {
            guard count - offset >= 12 else {
                throw truncated("the header of element \(tagText(group, number)) at byte \(offset)", needs: 12, at: offset)
            }
            return Element(group: group, element: number, vr: vr, length: u32(offset + 8), offset: offset, valueOffset: offset + 12)
        }
        return Element(group: group, element: number, vr: vr, length: UInt32(u16(offset + 6)), offset: offset, valueOffset: offset + 8)
    }

    /// The offset just past `e`'s value; undefined-length values are walked item by item.
    func end(of e: Element, explicit: Bool, depth: Int) throws -> Int {
        if e.isUndefinedLength {
            // A sequence: SQ, or UN (implicit VR inside), or any element in implicit VR.
            return try endOfItems(from: e.valueOffset, explicit: explicit && e.vr != "UN", depth: depth + 1, owner: e)
        }
        let length = Int(e.length)
        guard length <= count - e.valueOffset else {
            throw truncated("element \(tagText(e.group, e.element)) at byte \(e.offset)", needs: length, at: e.valueOffset)
        }
        return e.valueOffset + length
    }

    /// Items of an undefined-length sequence starting at `start`; returns the offset after (FFFE,E0DD).
    func endOfItems(from start: Int, explicit: Bool, depth: Int, owner: Element) throws -> Int {
        guard depth <= maximumNesting else { throw fail("invalid DICOM: sequences nested more than \(maximumNesting) deep at byte \(start)") }
        let name = "sequence \(tagText(owner.group, owner.element)) at byte \(owner.offset)"
        var offset = start
        while true {
            guard count - offset >= 8 else {
                throw fail("truncated DICOM (\(name) ends at byte \(count) without a sequence delimiter)")
            }
            let item = try element(at: offset, explicit: explicit)
            guard item.group == 0xFFFE else {
                throw fail("invalid DICOM: expected an item in \(name), found \(tagText(item.group, item.element)) at byte \(offset)")
            }
            switch item.element {
            case 0xE0DD:
                return item.valueOffset
            case 0xE000 where item.isUndefinedLength:
                offset = try endOfItem(from: item.valueOffset, explicit: explicit, depth: depth, owner: owner)
            case 0xE000:
                offset = try end(of: item, explicit: explicit, depth: depth)
            default:
                throw fail("invalid DICOM: unexpected \(tagText(item.group, item.element)) in \(name) at byte \(offset)")
            }
        }
    }

    /// Elements of an undefined-length item; returns the offset after its (FFFE,E00D).
    func endOfItem(from start: Int, explicit: Bool, depth: Int, owner: Element) throws -> Int {
        var offset = start
        while true {
            guard count - offset >= 8 else {
                throw fail("truncated DICOM (an item of sequence \(tagText(owner.group, owner.element)) at byte \(owner.offset) ends at byte \(count) without an item delimiter)")
            }
            let e = try element(at: offset, explicit: explicit)
            if e.group == 0xFFFE {
                guard e.element == 0xE00D else {
                    throw fail("invalid DICOM: unexpected \(tagText(e.group, e.element)) inside an item at byte \(offset)")
                }
                return e.valueOffset
            }
            offset = try end(of: e, explicit: explicit, depth: depth)
        }
    }

    /// Where the data set starts, how it is encoded, and its transfer syntax UID.
    func locateDataSet() throws -> (start: Int, explicit: Bool, transferSyntax: String) {
        if count >= 132, bytes[128] == 0x44, bytes[129] == 0x49, bytes[130] == 0x43, bytes[131] == 0x4D {  // "DICM"
            return try readFileMeta(from: 132)
        }
        if count >= 8, u16(0) == 0x0002 {
            return try readFileMeta(from: 0)
        }
        if count >= 8, u16(0) == 0x0008 {
            // No file meta: implicit VR little endian, unless a valid explicit VR follows the first tag.
            let explicit = isUpper(bytes[4]) && isUpper(bytes[5]) && DICOM.knownVRs.contains(ascii(4..<6))
            return (0, explicit, explicit ? DICOM.TransferSyntax.explicitVRLittleEndian : DICOM.TransferSyntax.implicitVRLittleEndian)
        }
        let size = count == 0 ? "an empty file" : "\(count) bytes"
        throw fail("not a DICOM file (\(size); no \"DICM\" marker at byte 128 and no group 0002 or 0008 tag at the start)")
    }

    /// File meta information group 0002, always explicit VR little endian.
    func readFileMeta(from start: Int) throws -> (start: Int, explicit: Bool, transferSyntax: String) {
        var offset = start
        var transferSyntax: String?
        while count - offset >= 2, u16(offset) == 0x0002 {
            let e = try element(at: offset, explicit: true)
            let next = try end(of: e, explicit: true, depth: 0)
            if e.tag == Tag.transferSyntax, !e.isUndefinedLength {
                transferSyntax = trimmed(ascii(e.valueOffset..<next))
            }
            offset = next
        }
        guard let transferSyntax, !transferSyntax.isEmpty else {
            if offset >= count { throw fail("truncated DICOM (the file ends at byte \(count), inside the file meta information)") }
            throw fail("invalid DICOM: the file meta information has no Transfer Syntax UID (0002,0010)")
        }
        let explicit: Bool
        if transferSyntax == DICOM.TransferSyntax.implicitVRLittleEndian {
            explicit = false
        } else if DICOM.isExplicitLittleEndian(transferSyntax) {
            explicit = true
        } else {
            throw fail(DICOM.unsupportedTransferSyntax(transferSyntax))
        }
        return (offset, explicit, transferSyntax)
    }

    /// Reads the header up to the pixel data (7FE0,0010) of the top-level data set.
    func parse() throws -> Header {
        let (start, explicit, transferSyntax) = try locateDataSet()
        var fields: [UInt32: Element] = [:]
        var offset = start
        var pixelData: Element?
        while offset < count {
            let e = try element(at: offset, explicit: explicit)
            if e.group == 0xFFFE {
                throw fail("invalid DICOM: item tag \(tagText(e.group, e.element)) outside a sequence at byte \(offset)")
            }
            if e.tag == Tag.pixelData { pixelData = e; break }
            let next = try end(of: e, explicit: explicit, depth: 0)
            if Tag.wanted.contains(e.tag), !e.isUndefinedLength { fields[e.tag] = e }
            offset = next
        }

        func string(_ tag: UInt32) -> String? {
            guard let e = fields[tag] else { return nil }
            return trimmed(ascii(e.valueOffset..<(e.valueOffset + Int(e.length))))
        }
        func us(_ tag: UInt32, _ name: String) throws -> Int? {
            guard let e = fields[tag] else { return nil }
            guard e.length >= 2 else { throw fail("\(name) \(tagText(e.group, e.element)) holds \(e.length) bytes, not a 16-bit value") }
            return Int(u16(e.valueOffset))
        }
        func number(_ tag: UInt32, _ name: String) throws -> Double? {
            guard let text = string(tag), let first = text.split(separator: "\\").first else { return nil }
            guard let value = Double(trimmed(String(first))) else { throw fail("\(name) \(text.debugDescription) is not a number") }
            return value
        }

        guard let rows = try us(Tag.rows, "Rows") else { throw fail("invalid DICOM: no Rows (0028,0010)") }
        guard let columns = try us(Tag.columns, "Columns") else { throw fail("invalid DICOM: no Columns (0028,0011)") }
        guard let pixelData else {
            throw fail("no Pixel Data (7FE0,0010): the data set ends at byte \(count) (truncated?)")
        }
        guard rows > 0, columns > 0 else { throw fail("invalid DICOM: the image is \(columns) x \(rows) (Columns x Rows)") }
        let encapsulated = DICOM.isEncapsulated(transferSyntax)
        let bitsAllocated: Int
        if let value = try us(Tag.bitsAllocated, "BitsAllocated") {
            bitsAllocated = value
        } else if encapsulated {
            bitsAllocated = 8
        } else {
            throw fail("invalid DICOM: no BitsAllocated (0028,0100)")
        }
        // Every image a radiograph reader takes holds samples of 8 or 16 bits (0 or 65288 is a damaged header).
        guard bitsAllocated == 8 || bitsAllocated == 16 else {
            throw fail("BitsAllocated (0028,0100) \(bitsAllocated) is not supported (8 or 16)")
        }
        // A required (type 1) attribute of every image, as pydicom's pixel_array requires it.
        guard let samplesPerPixel = try us(Tag.samplesPerPixel, "SamplesPerPixel") else {
            throw fail("invalid DICOM: no SamplesPerPixel (0028,0002), a required attribute of the image")
        }
        let bitsStored = try us(Tag.bitsStored, "BitsStored") ?? bitsAllocated
        let highBit = try us(Tag.highBit, "HighBit") ?? (bitsStored - 1)
        var frames = 1
        if let text = string(Tag.numberOfFrames), !text.isEmpty {
            guard let value = Int(text), value >= 1 else { throw fail("NumberOfFrames (0028,0008) \(text.debugDescription) is not a positive integer") }
            frames = value
        }
        let patientID = string(Tag.patientID)
        let info = DICOM.Info(
            rows: rows, columns: columns,
            samplesPerPixel: samplesPerPixel,
            bitsAllocated: bitsAllocated, bitsStored: bitsStored, highBit: highBit,
            pixelRepresentation: try us(Tag.pixelRepresentation, "PixelRepresentation") ?? 0,
            photometric: string(Tag.photometric).flatMap { $0.isEmpty ? nil : $0 } ?? "MONOCHROME2",
            transferSyntax: transferSyntax, numberOfFrames: frames,
            rescaleSlope: try number(Tag.rescaleSlope, "RescaleSlope (0028,1053)") ?? 1,
            rescaleIntercept: try number(Tag.rescaleIntercept, "RescaleIntercept (0028,1052)") ?? 0,
            patientID: patientID?.isEmpty == false ? patientID : nil)
        return Header(info: info, pixelData: pixelData)
    }

    /// The first frame of native pixel data, scaled to [0, 1] by the BitsStored range.
    func nativeFrame(_ header: Header, invert: Bool) throws -> GrayImage {
        let info = header.info, pixel = header.pixelData
        guard info.bitsAllocated == 8 || info.bitsAllocated == 16 else {
            throw fail("BitsAllocated (0028,0100) \(info.bitsAllocated) is not supported (8 or 16)")
        }
        guard info.bitsStored >= 1, info.bitsStored <= info.bitsAllocated, info.highBit < info.bitsAllocated,
              info.highBit + 1 >= info.bitsStored else {
            throw fail("invalid DICOM: BitsStored \(info.bitsStored) and HighBit \(info.highBit) do not fit BitsAllocated \(info.bitsAllocated)")
        }
        guard info.pixelRepresentation == 0 || info.pixelRepresentation == 1 else {
            throw fail("invalid DICOM: PixelRepresentation (0028,0103) is \(info.pixelRepresentation), not 0 or 1")
        }
        guard !pixel.isUndefinedLength else {
            throw fail("invalid DICOM: native pixel data of undefined length (encapsulated data under \(info.transferSyntax)?)")
        }
        let length = Int(pixel.length)
        guard length <= count - pixel.valueOffset else { throw truncated("pixel data", needs: length, at: pixel.valueOffset) }
        let bytesPerSample = info.bitsAllocated / 8
        let samples = info.rows * info.columns
        let frameBytes = samples * bytesPerSample
        let (total, overflow) = frameBytes.multipliedReportingOverflow(by: info.numberOfFrames)
        guard !overflow, length == total || (total % 2 == 1 && length == total + 1) else {
            let frames = info.numberOfFrames == 1 ? "1 frame" : "\(info.numberOfFrames) frames"
            throw fail("pixel data holds \(length) bytes, but \(frames) of \(info.columns) x \(info.rows) at \(info.bitsAllocated) bits need \(overflow ? "more than 2^63" : String(total))")
        }

        let bitsStored = info.bitsStored
        let shift = info.highBit + 1 - bitsStored
        let mask = (1 << bitsStored) - 1
        let signBit = 1 << (bitsStored - 1)
        let low = info.isSigned ? -signBit : 0
        let high = info.isSigned ? signBit - 1 : mask
        let scale = 1 / Float(high - low)
        let base = pixel.valueOffset
        let signed = info.isSigned
        let values = [Float](unsafeUninitializedCapacity: samples) { buffer, initialized in
            for i in 0..<samples {
                let raw = bytesPerSample == 1 ? Int(bytes[base + i]) : Int(u16(base + 2 * i))
                var v = (raw >> shift) & mask
                if signed && v & signBit != 0 { v -= 1 << bitsStored }
                let p = Float(v - low) * scale
                buffer[i] = invert ? 1 - p : p
            }
            initialized = samples
        }
        return GrayImage(width: info.columns, height: info.rows, pixels: values)
    }

    /// The concatenated fragments of the first frame of encapsulated pixel data.
    func firstFrame(_ header: Header) throws -> Data {
        let pixel = header.pixelData
        guard pixel.isUndefinedLength else {
            throw fail("invalid DICOM: encapsulated pixel data must have undefined length, not \(pixel.length) bytes")
        }
        var fragments: [(offset: Int, range: Range<Int>)] = []
        var offsetTable: [Int] = []
        var firstFragment = 0
        var offset = pixel.valueOffset
        var index = 0  // 0: the basic offset table, then fragments 1, 2, ...
        while true {
            guard count - offset >= 8 else {
                throw fail("truncated DICOM (encapsulated pixel data ends at byte \(count) without a sequence delimiter)")
            }
            let item = try element(at: offset, explicit: true)
            guard item.group == 0xFFFE, item.element == 0xE000 || item.element == 0xE0DD else {
                throw fail("invalid DICOM: expected an item in the encapsulated pixel data, found \(tagText(item.group, item.element)) at byte \(offset)")
            }
            if item.element == 0xE0DD { break }
            guard !item.isUndefinedLength else {
                throw fail("invalid DICOM: an item of undefined length in the encapsulated pixel data at byte \(offset)")
            }
            let length = Int(item.length)
            guard length <= count - item.valueOffset else {
                let what = index == 0 ? "the basic offset table" : "pixel data fragment \(index)"
                throw truncated(what, needs: length, at: item.valueOffset)
            }
            let range = item.valueOffset..<(item.valueOffset + length)
            if index == 0 {
                offsetTable = stride(from: range.lowerBound, to: range.upperBound - 3, by: 4).map { Int(u32($0)) }
                firstFragment = range.upperBound
            } else {
                fragments.append((offset - firstFragment, range))
            }
            offset = range.upperBound
            index += 1
        }
        guard !fragments.isEmpty else { throw fail("invalid DICOM: the encapsulated pixel data holds no fragments") }

        var selected: [Range<Int>]
        if offsetTable.count >= 2 {
            selected = fragments.filter { $0.offset < offsetTable[1] }.map(\.range)
        } else if header.info.numberOfFrames == 1 {
            selected = fragments.map(\.range)
        } else {
            // Several frames and no offset table: the first frame ends with the fragment holding its EOI.
            selected = []
            for fragment in fragments {
                selected.append(fragment.range)
                if endsWithEOI(fragment.range) { break }
            }
        }
        if selected.isEmpty { selected = [fragments[0].range] }
        var frame = Data(capacity: selected.reduce(0) { $0 + $1.count })
        for range in selected { frame.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[range])) }
        return frame
    }

    /// Whether a fragment ends with the JPEG end-of-image marker FF D9 (possibly followed by one pad byte).
    func endsWithEOI(_ range: Range<Int>) -> Bool {
        var end = range.upperBound
        if end > range.lowerBound, bytes[end - 1] == 0 { end -= 1 }
        return end - range.lowerBound >= 2 && bytes[end - 2] == 0xFF && bytes[end - 1] == 0xD9
    }
}

extension DICOM {
    /// Every VR of PS3.5 6.2, for telling explicit from implicit VR in a file without file meta.
    static let knownVRs: Set<String> = [
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN",
        "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
    ]
}

/// Strips the space and NUL padding of DICOM string values.
private func trimmed(_ s: String) -> String {
    s.trimmingCharacters(in: CharacterSet(charactersIn: " \0"))
}

// MARK: - Writing

/// Explicit VR little endian elements appended to `data`.
private struct ElementWriter {
    var data = Data()

    mutating func append16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
    mutating func append32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }

    /// Tag, VR (omitted for item and delimiter tags) and length in the short or long form the VR needs.
    mutating func header(_ group: UInt16, _ element: UInt16, _ vr: String?, length: UInt32) {
        append16(group)
        append16(element)
        guard let vr else { append32(length); return }
        data.append(contentsOf: Array(vr.utf8))
        if longVRs.contains(vr) {
            append16(0)
            append32(length)
        } else {
            append16(UInt16(length))
        }
    }

    mutating func bytes(_ group: UInt16, _ element: UInt16, _ vr: String, _ value: [UInt8]) {
        var value = value
        if value.count % 2 == 1 { value.append(vr == "UI" || vr == "OB" ? 0 : 0x20) }
        header(group, element, vr, length: UInt32(value.count))
        data.append(contentsOf: value)
    }

    mutating func string(_ group: UInt16, _ element: UInt16, _ vr: String, _ value: String) {
        bytes(group, element, vr, Array(value.utf8))
    }

    mutating func uint16(_ group: UInt16, _ element: UInt16, _ value: UInt16) {
        header(group, element, "US", length: 2)
        append16(value)
    }

    mutating func uint32(_ group: UInt16, _ element: UInt16, _ value: UInt32) {
        header(group, element, "UL", length: 4)
        append32(value)
    }
}
