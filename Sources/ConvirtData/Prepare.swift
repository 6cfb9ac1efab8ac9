// `convirt prepare mimic`: MIMIC-CXR-JPG as PhysioNet ships it (or `convirt synth mimic`'s copy) into a
// prepared dataset. Images are decoded with DCT-domain downscaling and resized to a longer side of 256;
// work is cut into shards of images processed in parallel, each written atomically with its own record,
// so that a rerun after an interruption finishes the work without redoing it. Bad items are skipped,
// counted by reason, and the first few named.

import ConvirtCore
import ConvirtIO
import ConvirtText
import Foundation

public struct PrepareOptions: Sendable {
    public var root: String
    public var reports: String?
    public var out: String
    public var imageSize = 256
    public var frontalOnly = true
    public var minimumWords = 3
    public var imagesPerShard = 512
    public var threads = 2

    public init(root: String, out: String) { self.root = root; self.out = out }
}

/// Skipped items by reason, with the first few named.
public final class DropLog: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var entries: [String: PreparedManifest.Dropped] = [:]
    let examples = 5

    public func add(_ reason: String, _ item: String, count: Int = 1) {
        lock.lock(); defer { lock.unlock() }
        var e = entries[reason] ?? .init(count: 0, examples: [])
        e.count += count
        if e.examples.count < examples { e.examples.append(item) }
        entries[reason] = e
    }

    public var summary: [String: PreparedManifest.Dropped] { lock.lock(); defer { lock.unlock() }; return entries }
}

public enum MIMICPrepare {
    static let frontalViews: Set<String> = ["PA", "AP"]
    /// MIMIC-CXR's splits, and the values of a CheXpert label (positive, negative, uncertain).
    static let splits: Set<String> = ["train", "validate", "test"]
    static let labelValues: Set<String> = ["1", "0", "-1", "1.0", "0.0", "-1.0"]
    /// The smallest stored image: the ResNet's total stride (32), whatever the crop later takes.
    public static let minimumImageSize = 32

    /// The CSV at `root/name` or `root/name.gz`.
    static func csv(_ root: String, _ name: String, required: [String]) throws -> CSVTable {
        for candidate in ["\(root)/\(name)", "\(root)/\(name).gz"] where FileManager.default.fileExists(atPath: candidate) {
            return try CSVTable(path: candidate, required: required)
        }
        throw ConvirtError("\(root): no \(name) or \(name).gz (is this the MIMIC-CXR-JPG root?)")
    }

    struct ShardRecord: Codable {
        struct Entry: Codable { var image: Int; var width: Int; var height: Int; var offset: Int }
        struct Failure: Codable { var image: Int; var reason: String; var file: String }
        var file: String
        var bytes: Int
        var crc32: UInt32
        var entries: [Entry]
        var failures: [Failure]
    }

    public struct Summary: Sendable {
        public var studies: Int
        public var images: Int
        public var splits: [String: Int]
        public var dropped: [String: PreparedManifest.Dropped]
        /// Studies kept with a remark (without CheXpert labels), by reason.
        public var kept: [String: PreparedManifest.Dropped]
        public var reusedShards: Int
    }

    /// The remark of a study kept without CheXpert labels.
    public static let unlabeled = "study(ies) without CheXpert labels (their labels unknown)"

    public static func run(_ o: PrepareOptions, progress: (@Sendable (Int, Int) -> Void)? = nil) throws -> Summary {
        let fm = FileManager.default
        guard o.imageSize >= minimumImageSize && o.imageSize <= 8192 else {
            throw ConvirtError("--image-size \(o.imageSize) is outside \(minimumImageSize)...8192 (the longer side of the stored images; 256 for the paper)")
        }
        let drops = DropLog()
        let metadata = try csv(o.root, "mimic-cxr-2.0.0-metadata.csv", required: ["dicom_id", "subject_id", "study_id", "ViewPosition"])
        let split = try csv(o.root, "mimic-cxr-2.0.0-split.csv", required: ["dicom_id", "study_id", "subject_id", "split"])
        // Every label column is required: a renamed or missing one would leave that label unknown for every study.
        let chexpert = try csv(o.root, "mimic-cxr-2.0.0-chexpert.csv", required: ["subject_id", "study_id"] + CheXpertLabels.names)
        for (table, name) in [(metadata, "metadata"), (split, "split"), (chexpert, "chexpert")] where !table.malformedLines.isEmpty {
            drops.add("malformed CSV row", "\(table.path) line \(table.malformedLines[0])", count: table.malformedLines.count)
            _ = name
        }
        // (The labels may be absent altogether, but a file whose every row is malformed is damaged: its
        // header and rows disagree.)
        for table in [metadata, split, chexpert] where table.rows.isEmpty && (table.path != chexpert.path || !table.malformedLines.isEmpty) {
            throw ConvirtError("\(table.path): no usable row (\(table.malformedLines.count) malformed: do the header's columns match the rows'?)")
        }
        // Values outside their domain are counted skips: a split other than MIMIC-CXR's three, a
        // CheXpert label other than 1, 0, -1 or blank.
        // A row repeated (the same image, or the same study's labels, again) is counted and dropped: the
        // first one stands.
        func duplicate(_ seen: inout Set<String>, _ key: String, _ table: CSVTable, line: Int, _ column: String) -> Bool {
            if seen.insert(key).inserted { return false }
            drops.add("duplicate CSV row", "\(table.path) line \(line): \(column) \(key) again")
            return true
        }
        var splitOf: [String: String] = [:]
        var seenSplit = Set<String>(), seenLabels = Set<String>(), seenImages = Set<String>()
        for (row, line) in zip(split.rows, split.rowLines) {
            if duplicate(&seenSplit, split.value(row, "dicom_id"), split, line: line, "dicom_id") { continue }
            let value = split.value(row, "split")
            guard Self.splits.contains(value) else { drops.add("unknown split value", "\(split.path) line \(line): \"\(value)\""); continue }
            splitOf[split.value(row, "dicom_id")] = value
        }
        var labelsOf: [String: [Double?]] = [:]
        for (row, line) in zip(chexpert.rows, chexpert.rowLines) {
            if duplicate(&seenLabels, chexpert.value(row, "study_id"), chexpert, line: line, "study_id") { continue }
            let values = CheXpertLabels.names.map { chexpert.value(row, $0).trimmingCharacters(in: .whitespaces) }
            guard values.allSatisfy({ $0.isEmpty || Self.labelValues.contains($0) }) else {
                drops.add("CheXpert label out of domain", "\(chexpert.path) line \(line): \(values.filter { !$0.isEmpty && !Self.labelValues.contains($0) }.first ?? "")")
                continue
            }
            labelsOf[chexpert.value(row, "study_id")] = values.map { Double($0) }
        }
        // Group images by study.
        struct StudyImages { var subject: String; var study: String; var dicoms: [String] = [] }
        var studies: [String: StudyImages] = [:]
        for (row, line) in zip(metadata.rows, metadata.rowLines) {
            let dicom = metadata.value(row, "dicom_id"), subject = metadata.value(row, "subject_id"), study = metadata.value(row, "study_id")
            guard !dicom.isEmpty, Int(subject) != nil, Int(study) != nil else { drops.add("malformed CSV row", "\(metadata.path): \(row.joined(separator: ","))"); continue }
            if duplicate(&seenImages, dicom, metadata, line: line, "dicom_id") { continue }
            if o.frontalOnly && !frontalViews.contains(metadata.value(row, "ViewPosition")) { drops.add("non-frontal view (image)", dicom); continue }
            studies[study, default: StudyImages(subject: subject, study: study)].dicoms.append(dicom)
        }
        let reportsRoot = o.reports ?? o.root
        var prepared: [PreparedStudy] = []
        var imagePaths: [(path: String, study: Int)] = []
        for key in studies.keys.sorted(by: { (Int($0) ?? 0) < (Int($1) ?? 0) }) {
            let s = studies[key]!
            let prefix = "p\(s.subject.prefix(2))"
            let reportPath = "\(reportsRoot)/files/\(prefix)/p\(s.subject)/s\(s.study).txt"
            guard let splitName = s.dicoms.lazy.compactMap({ splitOf[$0] }).first else { drops.add("no split", "s\(s.study)"); continue }
            guard let data = fm.contents(atPath: reportPath) else { drops.add("missing report", reportPath); continue }
            // MIMIC-CXR's reports are UTF-8 (ASCII in practice): invalid UTF-8 is damage, not text to learn from.
            guard let text = String(data: data, encoding: .utf8) else { drops.add("report is not valid UTF-8", reportPath); continue }
            let sentences = ReportSections.sentences(text, minimumWords: o.minimumWords)
            if sentences.isEmpty {
                drops.add(text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty ? "empty report" : "no findings/impression sentences", reportPath)
                continue
            }
            let index = prepared.count
            prepared.append(PreparedStudy(studyID: s.study, subjectID: s.subject, split: splitName, sentences: sentences, images: [],
                                          labels: labelsOf[s.study] ?? Array(repeating: nil, count: CheXpertLabels.names.count)))
            for dicom in s.dicoms.sorted() {
                imagePaths.append(("\(o.root)/files/\(prefix)/p\(s.subject)/s\(s.study)/\(dicom).jpg", index))
            }
        }
        // Shards of images, in parallel; a shard whose record exists and matches is reused.
        try fm.createDirectory(atPath: o.out, withIntermediateDirectories: true)
        for leftover in (try? fm.contentsOfDirectory(atPath: o.out)) ?? [] where leftover.hasSuffix(".partial") {
            try? fm.removeItem(atPath: "\(o.out)/\(leftover)")
        }
        let shardCount = (imagePaths.count + o.imagesPerShard - 1) / o.imagesPerShard
        final class Shared: @unchecked Sendable {
            var records: [ShardRecord?]; var errors: [String] = []; var done = 0; var reused = 0
            let lock = NSLock()
            init(_ n: Int) { records = Array(repeating: nil, count: n) }
        }
        let shared = Shared(shardCount)
        let queue = DispatchQueue(label: "prepare", attributes: .concurrent)
        let group = DispatchGroup()
        let semaphore = DispatchSemaphore(value: max(1, o.threads))
        let paths = imagePaths, options = o
        for k in 0..<shardCount {
            semaphore.wait()
            queue.async(group: group) {
                defer { semaphore.signal() }
                do {
                    let range = (k * options.imagesPerShard)..<min(paths.count, (k + 1) * options.imagesPerShard)
                    let (record, reused) = try prepareShard(k, range: range, paths: paths, options: options)
                    shared.lock.lock()
                    shared.records[k] = record
                    shared.done += range.count
                    if reused { shared.reused += 1 }
                    let done = shared.done
                    shared.lock.unlock()
                    progress?(done, paths.count)
                } catch {
                    shared.lock.lock(); shared.errors.append("\(error)"); shared.lock.unlock()
                }
            }
        }
        group.wait()
        if let first = shared.errors.first { throw ConvirtError("prepare: \(first)") }
        // The index: images in order, failures counted, studies without images dropped.
        var images: [PreparedImage] = []
        var shards: [PreparedManifest.Shard] = []
        for (k, record) in shared.records.enumerated() {
            guard let record else { continue }
            shards.append(.init(file: record.file, bytes: record.bytes, crc32: record.crc32, images: record.entries.count))
            for failure in record.failures { drops.add(failure.reason, failure.file) }
            for e in record.entries {
                let study = paths[e.image].study
                prepared[study].images.append(images.count)
                images.append(PreparedImage(shard: k, offset: e.offset, width: e.width, height: e.height, study: study))
            }
        }
        // Drop studies whose images all failed, renumbering the image records' study indices.
        var keep: [Int] = []
        for (i, s) in prepared.enumerated() {
            if s.images.isEmpty { drops.add("no readable frontal image", "s\(s.studyID)") } else { keep.append(i) }
        }
        var newIndex = [Int](repeating: -1, count: prepared.count)
        for (n, i) in keep.enumerated() { newIndex[i] = n }
        let finalStudies = keep.map { prepared[$0] }
        // Studies kept without labels (no CheXpert row, or one out of domain): counted and reported.
        let remarks = DropLog()
        for study in finalStudies where labelsOf[study.studyID] == nil {
            remarks.add(Self.unlabeled, "s\(study.studyID)")
        }
        for i in images.indices { images[i].study = newIndex[images[i].study] }
        var index = Data(capacity: images.count * PreparedImage.recordSize)
        for image in images { image.write(to: &index) }
        try Files.writeAtomically(index, to: "\(o.out)/images.idx")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try Files.writeAtomically(encoder.encode(finalStudies), to: "\(o.out)/studies.json")
        var splits: [String: Int] = [:]
        for s in finalStudies { splits[s.split, default: 0] += 1 }
        var manifest = PreparedManifest(source: o.root, imageSize: o.imageSize, frontalOnly: o.frontalOnly, studies: finalStudies.count,
                                        images: images.count, splits: splits, dropped: drops.summary, shards: shards,
                                        labelNames: CheXpertLabels.names)
        manifest.kept = remarks.summary.isEmpty ? nil : remarks.summary
        // A vocabulary shipped with the data (convirt synth mimic writes one) travels with it.
        if fm.fileExists(atPath: "\(o.root)/vocab.txt") { try Files.writeAtomically(Files.read("\(o.root)/vocab.txt"), to: "\(o.out)/vocab.txt") }
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        try Files.writeAtomically(encoder.encode(manifest), to: "\(o.out)/manifest.json")
        return Summary(studies: finalStudies.count, images: images.count, splits: splits, dropped: drops.summary, kept: remarks.summary,
                       reusedShards: shared.reused)
    }

    /// Decodes and resizes one shard's images into `images-KKKKK.bin`, or reuses a finished shard.
    static func prepareShard(_ k: Int, range: Range<Int>, paths: [(path: String, study: Int)], options o: PrepareOptions) throws -> (ShardRecord, Bool) {
        let name = String(format: "images-%05d.bin", k)
        let recordPath = "\(o.out)/\(String(format: "shard-%05d.json", k))"
        if let data = FileManager.default.contents(atPath: recordPath),
           let record = try? JSONDecoder().decode(ShardRecord.self, from: data),
           record.entries.count + record.failures.count == range.count,
           record.entries.allSatisfy({ range.contains($0.image) }),
           (try? FileManager.default.attributesOfItem(atPath: "\(o.out)/\(name)")[.size] as? Int) == record.bytes {
            return (record, true)
        }
        var blob = Data()
        var entries: [ShardRecord.Entry] = [], failures: [ShardRecord.Failure] = []
        for i in range {
            let path = paths[i].path
            do {
                guard FileManager.default.fileExists(atPath: path) else { throw PrepareFailure.missing }
                let data = try Files.read(path)
                let info = try JPEG.info(data, source: path)
                let scale = Double(o.imageSize) / Double(max(info.width, info.height))
                let target = (width: max(1, Int((Double(info.width) * scale).rounded())), height: max(1, Int((Double(info.height) * scale).rounded())))
                let decoded = try JPEG.decodeGray(data, minWidth: min(target.width, info.width), minHeight: min(target.height, info.height), source: path)
                let image = scale < 1 ? decoded.resized(width: target.width, height: target.height) : decoded
                entries.append(.init(image: i, width: image.width, height: image.height, offset: blob.count))
                blob.append(contentsOf: image.bytes)
            } catch PrepareFailure.missing {
                failures.append(.init(image: i, reason: "missing image", file: path))
            } catch let error as ConvirtError where error.reason == .corrupt {
                failures.append(.init(image: i, reason: "corrupt or truncated image", file: error.message))
            } catch {
                failures.append(.init(image: i, reason: "unreadable image", file: "\(error)"))
            }
        }
        let crc = blob.withUnsafeBytes { crc32Checksum($0) }
        try Files.writeAtomically(blob, to: "\(o.out)/\(name)")
        let record = ShardRecord(file: name, bytes: blob.count, crc32: crc, entries: entries, failures: failures)
        try Files.writeAtomically(JSONEncoder().encode(record), to: recordPath)
        return (record, false)
    }

    enum PrepareFailure: Error { case missing }
}
