// The downstream datasets of the ConVIRT paper (Zhang et al., arXiv 2010.00747, Section 4 and App. A/B):
// CheXpert (multi-label, 5 competition labels), RSNA Pneumonia (binary), COVIDx (3 classes, or binary in
// later versions) and MURA (binary, per study), read from the files as released. This file holds the
// common types, the label fractions (1%, 10%, 100%) and the evaluation input (zero-pad to square, resize
// to 224); the per-dataset readers are in DownstreamReaders.swift.
//
// Splits follow the paper: CheXpert validation = 5000 training images held out by patient, test = the
// official validation set; RSNA 25184 / 1500 / 3000 patients; COVIDx validation = 300 training images
// held out by patient, test = test.txt; MURA validation = 10% of the training patients, test = the
// official validation set. Smaller copies (the synthetic ones) hold out the same proportions.

import ConvirtCore
import ConvirtIO
import Foundation

public enum DownstreamDataset: String, CaseIterable, Sendable { case chexpert, rsna, covidx, mura }

/// multiLabel: CheXpert (5 labels); binary: RSNA, MURA, COVIDx with positive/negative labels;
/// multiClass: COVIDx with normal/pneumonia/COVID-19.
public enum DownstreamTask: String, Sendable { case multiLabel, binary, multiClass }

/// One evaluation image and its targets.
public struct LabeledImage: Sendable, Equatable {
    /// Absolute path of the image file (JPEG, PNG or DICOM; `DownstreamReader.loadImage` detects which).
    public var path: String
    /// multiLabel/binary: one 0/1 value per label (binary: 1 value); multiClass: one-hot over the classes.
    public var targets: [Float]
    /// The unit metrics aggregate over: the MURA study directory (as in the CSVs,
    /// `MURA-v1.1/train/XR_ELBOW/patient00011/study1_negative/`); otherwise the image's own id (CheXpert:
    /// its CSV Path; RSNA: the patientId; COVIDx: the file name).
    public var group: String

    public init(path: String, targets: [Float], group: String) {
        self.path = path; self.targets = targets; self.group = group
    }
}

public struct DownstreamData: Sendable {
    public var dataset: DownstreamDataset
    public var task: DownstreamTask
    /// chexpert: the 5 competition labels; rsna: ["Pneumonia"]; mura: ["Abnormal"]; covidx: the class
    /// names ["normal", "pneumonia", "COVID-19"] (multiClass) or ["COVID-19"] (binary).
    public var labelNames: [String]
    public var train: [LabeledImage], validation: [LabeledImage], test: [LabeledImage]
    /// Rows that could not be used, by reason ("missing image", "malformed CSV row", ...): reported by the caller.
    public var skipped: [String: Int]
    /// The first few skipped rows of each reason, each naming the file and line or the image.
    public var skippedExamples: [String: [String]]

    public init(dataset: DownstreamDataset, task: DownstreamTask, labelNames: [String], train: [LabeledImage], validation: [LabeledImage],
                test: [LabeledImage], skipped: [String: Int] = [:], skippedExamples: [String: [String]] = [:]) {
        self.dataset = dataset; self.task = task; self.labelNames = labelNames
        self.train = train; self.validation = validation; self.test = test
        self.skipped = skipped; self.skippedExamples = skippedExamples
    }
}

public struct DownstreamOptions: Sendable {
    /// Seed of the held-out splits (validation; RSNA's test).
    public var seed: UInt64 = 0
    /// CheXpert labels whose uncertain (-1) values count as positive (U-Ones); the others count as
    /// negative (U-Zeros, the default). Names must be among the 5 competition labels.
    public var uOnes: Set<String> = []
    /// CheXpert: keep only frontal images (Frontal/Lateral = Frontal). Off by default: the paper uses all views.
    public var frontalOnly = false
    public init() {}
}

public enum DownstreamReader {
    /// Reads `dataset` from `root` as released (see the dataset's reader for the files it expects). `root`
    /// is the dataset's directory (the one holding train.csv, stage_2_train_labels.csv, train.txt or
    /// train_image_paths.csv); for CheXpert and MURA its parent also works (`DIR` holding
    /// `CheXpert-v1.0-small/` or `MURA-v1.1/`). Structural problems (a missing file, a CSV without its
    /// columns, no usable row) are errors naming the file; single bad rows are skipped and counted.
    public static func load(_ dataset: DownstreamDataset, root: String, options: DownstreamOptions = .init()) throws -> DownstreamData {
        let root = absolutePath(root)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: root, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ConvirtError("\(root): no such directory (the \(dataset.rawValue) dataset root)")
        }
        switch dataset {
        case .chexpert: return try loadCheXpert(root: root, options: options)
        case .rsna: return try loadRSNA(root: root, options: options)
        case .covidx: return try loadCOVIDx(root: root, options: options)
        case .mura: return try loadMURA(root: root, options: options)
        }
    }

    /// A label fraction (0.01, 0.1, 1) of a training set, drawn with a seed. Whole groups are drawn (MURA
    /// studies stay together; elsewhere a group is one image): round(fraction x groups), at least one.
    /// The groups are a prefix of one seeded permutation, so for a seed the 1% set lies inside the 10%
    /// set. Then, for every label that has a positive (or a negative) in the full set but none in the
    /// draw, the first group in permutation order that has one is added (for multiClass one-hot targets
    /// this keeps every class). The result keeps the input order; fraction >= 1 returns `items`.
    public static func fraction(_ items: [LabeledImage], _ fraction: Double, seed: UInt64) -> [LabeledImage] {
        if items.isEmpty || fraction >= 1 { return items }
        var groupOf: [String: Int] = [:]
        var members: [[Int]] = []
        for (i, item) in items.enumerated() {
            if let g = groupOf[item.group] { members[g].append(i) } else { groupOf[item.group] = members.count; members.append([i]) }
        }
        let groups = members.count
        let take = max(1, min(groups, Int((max(0, fraction) * Double(groups)).rounded())))
        let order = RandomStream(seed: seed, .labelFraction).permutation(groups)
        var chosen = Set(order.prefix(take))
        let labels = items.map(\.targets.count).max() ?? 0
        for j in 0..<labels {
            for positive in [true, false] {
                func has(_ g: Int) -> Bool {
                    members[g].contains { i in j < items[i].targets.count && (items[i].targets[j] >= 0.5) == positive }
                }
                if chosen.contains(where: has) { continue }
                if let g = order.first(where: has) { chosen.insert(g) }
            }
        }
        return chosen.flatMap { members[$0] }.sorted().map { items[$0] }
    }

    /// The evaluation input (paper App. B): decoded (JPEG, PNG or DICOM, detected from the content),
    /// zero-padded to a centred square, resized to size x size with an antialiasing filter; gray in
    /// [0, 1]. JPEGs are decoded with DCT-domain downscaling when the result still covers `size`.
    /// Errors name the file: missing, empty, unknown format, truncated or damaged.
    public static func loadImage(path: String, size: Int = 224) throws -> GrayImage {
        try require(size > 0, "loadImage \(path)", "size must be positive, not \(size)")
        let image = try decodeImage(Files.read(path), source: path, cover: size)
        return image.paddedToSquare().resized(width: size, height: size)
    }

    /// Decodes a JPEG, PNG or DICOM file to gray. With `cover`, a JPEG is decoded at the smallest DCT
    /// scale whose longer side is still at least `cover`.
    public static func decodeImage(_ data: Data, source: String, cover: Int = 0) throws -> GrayImage {
        guard !data.isEmpty else { throw ConvirtError("cannot read \(source): empty file") }
        let head = [UInt8](data.prefix(132))
        if head.count >= 3 && head[0] == 0xFF && head[1] == 0xD8 && head[2] == 0xFF {
            let info = try JPEG.info(data, source: source)
            var minWidth = 0, minHeight = 0
            let longer = max(info.width, info.height)
            if cover > 0 && longer > cover {
                let scale = Double(cover) / Double(longer)
                minWidth = min(info.width, Int((Double(info.width) * scale).rounded(.up)))
                minHeight = min(info.height, Int((Double(info.height) * scale).rounded(.up)))
            }
            return try JPEG.decodeGray(data, minWidth: minWidth, minHeight: minHeight, source: source)
        }
        if head.count >= 8 && head[0..<8].elementsEqual([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) {
            return try PNG.decodeGray(data, source: source)
        }
        if head.count >= 132 && head[128..<132].elementsEqual(Array("DICM".utf8)) {
            return try DICOM.decodeGray(data, source: source)
        }
        // Perhaps a DICOM data set without the Part 10 preamble.
        do {
            return try DICOM.decodeGray(data, source: source)
        } catch {
            throw ConvirtError("cannot read \(source): not a JPEG, PNG or DICOM file (\(error))")
        }
    }

    // MARK: - Shared helpers of the readers

    static func absolutePath(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.path
    }

    static func parent(_ path: String) -> String {
        URL(fileURLWithPath: path).deletingLastPathComponent().standardizedFileURL.path
    }

    static func exists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

    /// The first `dir/name` that exists among `names`, or nil.
    static func firstExisting(_ dir: String, _ names: [String]) -> String? {
        names.map { "\(dir)/\($0)" }.first(where: exists)
    }

    /// Splits `items` into (kept, held out), each in input order: whole patients, in a seeded order of the
    /// sorted patient ids, are held out until at least `target` items (or patients, with `countPatients`)
    /// are, never every patient. `patient` gives an item's patient.
    static func holdOut<T>(_ items: [T], patient: (T) -> String, target: Int, seed: UInt64, purpose: UInt64,
                           countPatients: Bool = false) -> (kept: [T], heldOut: [T]) {
        let patients = Array(Set(items.map(patient))).sorted()
        guard patients.count > 1, target > 0 else { return (items, []) }
        let order = RandomStream(seed: seed, .heldOutSplit, purpose).permutation(patients.count)
        var count: [String: Int] = [:]
        for item in items { count[patient(item), default: 0] += 1 }
        var held = Set<String>(), total = 0
        for k in order where total < target && held.count < patients.count - 1 {
            held.insert(patients[k]); total += countPatients ? 1 : count[patients[k]]!
        }
        return (items.filter { !held.contains(patient($0)) }, items.filter { held.contains(patient($0)) })
    }

    /// The paper's `numerator` of `denominator` items scaled to `count`: rounded, at least 1, at most `numerator`.
    static func proportional(_ count: Int, _ numerator: Int, _ denominator: Int) -> Int {
        min(numerator, max(1, Int((Double(count) * Double(numerator) / Double(denominator)).rounded())))
    }

    /// The `patientNNNNN` component of a CheXpert or MURA path (the path itself when there is none).
    static func patientComponent(_ path: String) -> String {
        path.split(separator: "/").first { $0.hasPrefix("patient") }.map(String.init) ?? path
    }
}

/// Skipped rows by reason, with the first few named.
struct SkipLog {
    var counts: [String: Int] = [:]
    var examples: [String: [String]] = [:]

    mutating func add(_ reason: String, _ example: String, count: Int = 1) {
        counts[reason, default: 0] += count
        if examples[reason, default: []].count < 5 { examples[reason, default: []].append(example) }
    }
}

/// Where the relative image paths of a CheXpert or MURA CSV point. They are relative to the parent of
/// the dataset directory (`CheXpert-v1.0-small/train/patient00001/...`); a copy whose directory was
/// renamed still resolves them relative to the dataset directory without their first component.
struct ReleasePaths {
    enum Mode { case parent, dropFirst }
    let root: String
    let mode: Mode

    func resolve(_ relative: String) -> String {
        if relative.hasPrefix("/") { return relative }
        switch mode {
        case .parent: return "\(DownstreamReader.parent(root))/\(relative)"
        case .dropFirst:
            let parts = relative.split(separator: "/", maxSplits: 1)
            return parts.count == 2 ? "\(root)/\(parts[1])" : "\(root)/\(relative)"
        }
    }

    /// Decides from the first rows that resolve either way; when none of the first 100 does, an error
    /// naming the CSV, the line and both places looked at.
    static func detect(root: String, file: String, rows: [(path: String, line: Int)]) throws -> ReleasePaths {
        let parent = ReleasePaths(root: root, mode: .parent), dropFirst = ReleasePaths(root: root, mode: .dropFirst)
        for row in rows.prefix(100) {
            if DownstreamReader.exists(parent.resolve(row.path)) { return parent }
            if DownstreamReader.exists(dropFirst.resolve(row.path)) { return dropFirst }
        }
        if let first = rows.first {
            throw ConvirtError("\(file) line \(first.line): image \(first.path) is neither at \(parent.resolve(first.path)) nor at "
                + "\(dropFirst.resolve(first.path)) (nor are the images of the next rows); the paths are relative to the parent of the dataset directory")
        }
        return parent
    }
}
