// The prepared dataset: images resized to a longer side of 256 as raw 8-bit gray in shard files
// (`images-00000.bin`, memory-mapped for random access), `images.idx` (one 24-byte record per image),
// `studies.json` (split, sentences, image indices, labels per study) and `manifest.json` (counts,
// split, dropped items with reasons, shard sizes and CRC-32 checksums).

import ConvirtCore
import ConvirtIO
import Foundation

public struct PreparedStudy: Codable, Sendable, Equatable {
    public var studyID: String
    public var subjectID: String
    public var split: String
    public var sentences: [String]
    /// Indices into the image index (frontal views that decoded).
    public var images: [Int]
    /// CheXpert labels in `CheXpertLabels.names` order: 1, 0, -1 or nil (not mentioned).
    public var labels: [Double?]

    enum CodingKeys: String, CodingKey { case studyID = "study_id", subjectID = "subject_id", split, sentences, images, labels }
}

public struct PreparedImage: Sendable, Equatable {
    public var shard: Int
    public var offset: Int
    public var width: Int
    public var height: Int
    public var study: Int
    static let recordSize = 24

    func write(to data: inout Data) {
        for v in [UInt32(shard), UInt32(width), UInt32(height), UInt32(study)] { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
        withUnsafeBytes(of: UInt64(offset).littleEndian) { data.append(contentsOf: $0) }
    }

    /// Record i of an index; nil where its offset does not fit an Int (a damaged index).
    static func read(_ raw: UnsafeRawBufferPointer, at i: Int) -> PreparedImage? {
        let base = i * recordSize
        func u32(_ k: Int) -> Int { Int(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: base + 4 * k, as: UInt32.self))) }
        guard let offset = Int(exactly: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: base + 16, as: UInt64.self))) else { return nil }
        return PreparedImage(shard: u32(0), offset: offset, width: u32(1), height: u32(2), study: u32(3))
    }

    /// The longest side a prepared image may have (`prepare` writes 256 by default).
    static let maxSide = 1 << 15
}

public struct PreparedManifest: Codable, Sendable {
    public struct Shard: Codable, Sendable { public var file: String; public var bytes: Int; public var crc32: UInt32; public var images: Int }
    public struct Dropped: Codable, Sendable { public var count: Int; public var examples: [String] }
    public var format = 1
    public var source: String
    public var imageSize: Int
    public var frontalOnly: Bool
    public var studies: Int
    public var images: Int
    public var splits: [String: Int]
    public var dropped: [String: Dropped]
    public var shards: [Shard]
    public var labelNames: [String]
    /// Studies kept with a remark (without CheXpert labels), by reason; absent where none were.
    public var kept: [String: Dropped]? = nil

    enum CodingKeys: String, CodingKey {
        case format, source, imageSize = "image_size", frontalOnly = "frontal_only", studies, images, splits, dropped, shards
        case labelNames = "label_names", kept
    }
}

/// A prepared dataset opened for training: studies, the image index and memory-mapped shards.
public final class PreparedDataset: @unchecked Sendable {
    public let path: String
    public let manifest: PreparedManifest
    public let studies: [PreparedStudy]
    public let images: [PreparedImage]
    let shards: [MappedFile]

    public init(path: String) throws {
        self.path = path
        let manifestPath = "\(path)/manifest.json"
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue {
            throw ConvirtError("\(path) is a file; give the prepared dataset's directory (the one that holds manifest.json)")
        }
        guard FileManager.default.fileExists(atPath: manifestPath) else {
            throw ConvirtError("\(path) is not a prepared dataset (no manifest.json; run convirt prepare mimic first)")
        }
        manifest = try StrictJSON.decode(PreparedManifest.self, from: Files.read(manifestPath), source: manifestPath)
        studies = try StrictJSON.decode([PreparedStudy].self, from: Files.read("\(path)/studies.json"), source: "\(path)/studies.json")
        guard studies.count == manifest.studies else {
            throw ConvirtError("\(path)/studies.json: \(studies.count) studies, the manifest says \(manifest.studies) (replaced or damaged)")
        }
        let index = try MappedFile(path: "\(path)/images.idx")
        guard index.bytes.count == manifest.images * PreparedImage.recordSize else {
            throw ConvirtError("\(path)/images.idx: \(index.bytes.count) bytes, expected \(manifest.images * PreparedImage.recordSize) (truncated?)")
        }
        let indexPath = "\(path)/images.idx"
        images = try (0..<manifest.images).map { i in
            guard let image = PreparedImage.read(index.bytes, at: i) else { throw ConvirtError("\(indexPath): record \(i) has an offset past any file") }
            return image
        }
        shards = try manifest.shards.map { shard in
            let file = try MappedFile(path: "\(path)/\(shard.file)")
            guard file.bytes.count == shard.bytes else {
                throw ConvirtError("\(path)/\(shard.file): \(file.bytes.count) bytes, the manifest says \(shard.bytes) (truncated or replaced)")
            }
            return file
        }
        for (i, image) in images.enumerated() {
            guard (1...PreparedImage.maxSide).contains(image.width), (1...PreparedImage.maxSide).contains(image.height) else {
                throw ConvirtError("\(indexPath): record \(i) has a \(image.width)x\(image.height) image (sides from 1 to \(PreparedImage.maxSide))")
            }
            guard image.shard < shards.count, image.offset <= shards[image.shard].bytes.count - image.width * image.height else {
                throw ConvirtError("\(indexPath): record \(i) points outside its shard")
            }
            guard image.study < studies.count else {
                throw ConvirtError("\(indexPath): record \(i) names study \(image.study); studies.json holds \(studies.count)")
            }
        }
        let studiesPath = "\(path)/studies.json"
        for (k, study) in studies.enumerated() {
            let name = "study \(k) (\(study.studyID))"
            guard MIMICPrepare.splits.contains(study.split) else {
                throw ConvirtError("\(studiesPath): \(name) has split \"\(study.split)\" (not one of \(MIMICPrepare.splits.sorted().joined(separator: ", ")))")
            }
            if let bad = study.images.first(where: { !images.indices.contains($0) }) {
                throw ConvirtError("\(studiesPath): \(name) names image \(bad); images.idx holds \(images.count)")
            }
            if let bad = study.images.first(where: { images[$0].study != k }) {
                throw ConvirtError("\(studiesPath): \(name) names image \(bad), whose record in images.idx belongs to study \(images[bad].study)")
            }
            guard study.labels.count == manifest.labelNames.count else {
                throw ConvirtError("\(studiesPath): \(name) has \(study.labels.count) labels; the manifest names \(manifest.labelNames.count)")
            }
        }
    }

    /// The pixels of image i, valid while the dataset lives.
    public func image(_ i: Int) -> GrayBytes {
        let r = images[i]
        let raw = shards[r.shard].bytes
        return GrayBytes(width: r.width, height: r.height,
                         pixels: UnsafeBufferPointer(start: raw.baseAddress!.advanced(by: r.offset).assumingMemoryBound(to: UInt8.self),
                                                     count: r.width * r.height))
    }

    /// Studies of a split that have at least one image and one sentence, in study order.
    public func samples(split: String) -> [Int] {
        studies.indices.filter { studies[$0].split == split && !studies[$0].images.isEmpty && !studies[$0].sentences.isEmpty }
    }

    /// Re-reads every shard and compares its CRC-32 with the manifest; returns the problems found.
    public func verify() -> [String] {
        zip(manifest.shards, shards).compactMap { shard, file in
            let crc = crc32Checksum(file.bytes)
            return crc == shard.crc32 ? nil : "\(path)/\(shard.file): checksum \(String(crc, radix: 16)) differs from the manifest's \(String(shard.crc32, radix: 16))"
        }
    }
}
