// Readers of the four downstream datasets as released. Each checks the structure (the files, the CSV
// columns) and stops with an error naming the file when it is wrong; a single bad row (malformed, an
// unknown label, a missing image) is skipped and counted by reason. Images are not decoded here: a
// damaged image is an error of `DownstreamReader.loadImage`, which names the file.

import ConvirtCore
import ConvirtIO
import Foundation

extension DownstreamReader {
    /// The CheXpert competition labels, in the order of `DownstreamData.labelNames`.
    public static let chexpertCompetitionLabels = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    /// COVIDx's three classes, in the order of the one-hot targets.
    public static let covidxClasses = ["normal", "pneumonia", "COVID-19"]

    // MARK: - CheXpert

    /// The CheXpert directory: `root` when it holds train.csv, else `root/CheXpert-v1.0-small` or
    /// `root/CheXpert-v1.0`.
    public static func chexpertDirectory(_ root: String) throws -> String {
        let root = absolutePath(root)
        if exists("\(root)/train.csv") { return root }
        for name in ["CheXpert-v1.0-small", "CheXpert-v1.0"] where exists("\(root)/\(name)/train.csv") { return "\(root)/\(name)" }
        throw ConvirtError("\(root): no train.csv; expected the CheXpert-v1.0 (or CheXpert-v1.0-small) directory holding train.csv, "
            + "valid.csv, train/ and valid/, or its parent")
    }

    /// CheXpert v1.0 (or -small): `train.csv` and `valid.csv` with the columns `Path, ..., <14 labels>`;
    /// values 1.0, 0.0, -1.0 (uncertain) or blank (= 0). Targets: the 5 competition labels; uncertain is
    /// negative unless the label is in `options.uOnes`. Validation: 5000 training images (5000/223414 of
    /// a smaller copy, at least 1) held out by patient; test: valid.csv.
    static func loadCheXpert(root: String, options: DownstreamOptions) throws -> DownstreamData {
        let labels = chexpertCompetitionLabels
        let unknown = options.uOnes.subtracting(labels)
        guard unknown.isEmpty else {
            throw ConvirtError("U-Ones label(s) \(unknown.sorted().joined(separator: ", ")) are not CheXpert competition labels (\(labels.joined(separator: ", ")))")
        }
        let dir = try chexpertDirectory(root)
        var skips = SkipLog()
        struct Row { var item: LabeledImage; var patient: String }
        func read(_ name: String) throws -> [Row] {
            let file = "\(dir)/\(name)"
            guard exists(file) else { throw ConvirtError("\(dir): no \(name) (CheXpert ships train.csv and valid.csv)") }
            let table = try CSVTable(path: file, required: ["Path"] + labels)
            for line in table.malformedLines { skips.add("malformed CSV row", "\(file) line \(line): wrong number of fields") }
            let rows = zip(table.rows, table.rowLines).map { (row: $0, line: $1, path: table.value($0, "Path").trimmingCharacters(in: .whitespaces)) }
            let paths = try ReleasePaths.detect(root: dir, file: file, rows: rows.filter { !$0.path.isEmpty }.map { ($0.path, $0.line) })
            var out: [Row] = []
            for (row, line, relative) in rows {
                guard !relative.isEmpty else { skips.add("malformed CSV row", "\(file) line \(line): empty Path"); continue }
                if options.frontalOnly && table.value(row, "Frontal/Lateral").trimmingCharacters(in: .whitespaces) == "Lateral" {
                    skips.add("lateral view (frontal only)", "\(file) line \(line)")
                    continue
                }
                var targets: [Float] = []
                var invalid: String? = nil
                for label in labels {
                    let text = table.value(row, label).trimmingCharacters(in: .whitespaces)
                    guard let value = text.isEmpty ? 0 : Double(text), value == 1 || value == 0 || value == -1 else {
                        invalid = "\(label) = \(text.debugDescription)"
                        break
                    }
                    targets.append(value == 1 || (value == -1 && options.uOnes.contains(label)) ? 1 : 0)
                }
                if let invalid {
                    skips.add("invalid label value", "\(file) line \(line): \(invalid) (expected 1.0, 0.0, -1.0 or blank)")
                    continue
                }
                let path = paths.resolve(relative)
                guard exists(path) else { skips.add("missing image", "\(file) line \(line): \(path)"); continue }
                out.append(Row(item: LabeledImage(path: path, targets: targets, group: relative), patient: patientComponent(relative)))
            }
            guard !out.isEmpty else { throw ConvirtError("\(file): no usable row (\(describe(skips)))") }
            return out
        }
        let train = try read("train.csv"), test = try read("valid.csv")
        let split = holdOut(train, patient: \.patient, target: proportional(train.count, 5000, 223_414), seed: options.seed, purpose: 1)
        return DownstreamData(dataset: .chexpert, task: .multiLabel, labelNames: labels, train: split.kept.map(\.item),
                              validation: split.heldOut.map(\.item), test: test.map(\.item), skipped: skips.counts, skippedExamples: skips.examples)
    }

    // MARK: - RSNA Pneumonia

    /// RSNA Pneumonia Detection Challenge: `stage_2_train_labels.csv` (`patientId,x,y,width,height,Target`,
    /// one row per box, Target 0 rows without a box) and `stage_2_train_images/<patientId>.dcm` (stage 1
    /// names are accepted too). One binary label per patientId; an id whose rows disagree is skipped.
    /// The paper's split holds out 1500 validation and 3000 test patients (its 25184 training patients are
    /// the rest of a larger pool; the stage 2 release has 26684 ids, which leaves 22184 for training).
    /// Sets of at least 9000 patients get exactly 1500 / 3000, smaller ones the paper's proportions
    /// (1500 / 29684 and 3000 / 29684, at least 1 each); a seeded permutation of the patients.
    static func loadRSNA(root: String, options: DownstreamOptions) throws -> DownstreamData {
        guard let file = firstExisting(root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"]) else {
            throw ConvirtError("\(root): no stage_2_train_labels.csv (RSNA Pneumonia: the labels CSV and stage_2_train_images/)")
        }
        let imageDir = "\(root)/\(file.hasSuffix("stage_1_train_labels.csv") ? "stage_1_train_images" : "stage_2_train_images")"
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: imageDir, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ConvirtError("\(root): no image directory \(imageDir) beside \(file)")
        }
        let table = try CSVTable(path: file, required: ["patientId", "Target"])
        var skips = SkipLog()
        for line in table.malformedLines { skips.add("malformed CSV row", "\(file) line \(line): wrong number of fields") }
        var order: [String] = []
        var target: [String: Float] = [:], firstLine: [String: Int] = [:]
        var conflicting: [String] = []
        for (row, line) in zip(table.rows, table.rowLines) {
            let id = table.value(row, "patientId").trimmingCharacters(in: .whitespaces)
            let text = table.value(row, "Target").trimmingCharacters(in: .whitespaces)
            guard !id.isEmpty, let value = Double(text), value == 0 || value == 1 else {
                skips.add("malformed CSV row", "\(file) line \(line): patientId \(id.debugDescription), Target \(text.debugDescription)")
                continue
            }
            if let previous = target[id] {
                if previous != Float(value) && !conflicting.contains(id) { conflicting.append(id) }
            } else {
                order.append(id); target[id] = Float(value); firstLine[id] = line
            }
        }
        for id in conflicting {
            skips.add("conflicting Target for one patientId", "\(file) line \(firstLine[id]!): patientId \(id) has rows with Target 0 and 1")
        }
        let excluded = Set(conflicting)
        var items: [LabeledImage] = []
        for id in order where !excluded.contains(id) {
            let path = "\(imageDir)/\(id).dcm"
            guard exists(path) else { skips.add("missing image", "\(file) line \(firstLine[id]!): \(path)"); continue }
            items.append(LabeledImage(path: path, targets: [target[id]!], group: id))
        }
        guard items.count >= 3 else {
            throw ConvirtError("\(file): \(items.count) usable patient(s); at least 3 are needed for train, validation and test (\(describe(skips)))")
        }
        let n = items.count
        let (validationCount, testCount) = n >= 2 * 4_500 ? (1500, 3000) : (proportional(n, 1500, 29_684), proportional(n, 3000, 29_684))
        // A permutation of the ids in sorted order, so that the split does not depend on the CSV's row order.
        let sorted = items.indices.sorted { items[$0].group < items[$1].group }
        let permutation = RandomStream(seed: options.seed, .heldOutSplit, 2).permutation(n)
        var split = [Int](repeating: 0, count: n)  // 0 train, 1 validation, 2 test
        for (rank, k) in permutation.enumerated() where rank < validationCount + testCount {
            split[sorted[k]] = rank < validationCount ? 1 : 2
        }
        return DownstreamData(dataset: .rsna, task: .binary, labelNames: ["Pneumonia"],
                              train: items.indices.filter { split[$0] == 0 }.map { items[$0] },
                              validation: items.indices.filter { split[$0] == 1 }.map { items[$0] },
                              test: items.indices.filter { split[$0] == 2 }.map { items[$0] },
                              skipped: skips.counts, skippedExamples: skips.examples)
    }

    // MARK: - COVIDx

    /// The split list of COVIDx: `<split>.txt`, or the one `<split>*.txt` (`train_COVIDx9A.txt`,
    /// `test_split.txt`, ...) in `root`.
    static func covidxList(_ root: String, _ split: String) throws -> String? {
        if exists("\(root)/\(split).txt") { return "\(root)/\(split).txt" }
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
            .filter { $0.lowercased().hasPrefix(split) && $0.hasSuffix(".txt") }.sorted()
        if names.count > 1 {
            throw ConvirtError("\(root): several \(split) lists (\(names.joined(separator: ", "))); keep one or name it \(split).txt")
        }
        return names.first.map { "\(root)/\($0)" }
    }

    /// COVIDx: `train.txt` and `test.txt` (or one `train*.txt` / `test*.txt`), lines `patient_id filename
    /// label [source]` separated by spaces, images under `train/` and `test/`. Labels normal / pneumonia /
    /// COVID-19 make a 3-class task (one-hot in that order); positive / negative (COVIDx 9 and later) a
    /// binary one (label "COVID-19"); a mix is an error. Validation: `val.txt` with `val/` when the release
    /// has one (COVIDx CXR-4), else 300 training images (300/16790 of a smaller copy, at least 1) held
    /// out by patient. Test: test.txt.
    static func loadCOVIDx(root: String, options: DownstreamOptions) throws -> DownstreamData {
        guard let trainFile = try covidxList(root, "train") else {
            throw ConvirtError("\(root): no train.txt (COVIDx: train.txt and test.txt with lines `patient_id filename label [source]`, images under train/ and test/)")
        }
        guard let testFile = try covidxList(root, "test") else { throw ConvirtError("\(root): no test.txt beside \(trainFile)") }
        let validationFile = try covidxList(root, "val")
        var skips = SkipLog()
        struct Line { var patient: String; var file: String; var label: String; var line: Int }
        let threeClass: [String: Int] = ["normal": 0, "pneumonia": 1, "covid-19": 2, "covid": 2]
        let binary: [String: Float] = ["positive": 1, "negative": 0]
        func parse(_ path: String) throws -> [Line] {
            let text = try Files.read(path)
            guard let string = String(data: text, encoding: .utf8) else { throw ConvirtError("\(path): not valid UTF-8 text") }
            var out: [Line] = []
            for (k, raw) in string.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
                let tokens = raw.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
                if tokens.isEmpty { continue }
                guard tokens.count >= 3 else {
                    skips.add("malformed line", "\(path) line \(k + 1): \(raw.prefix(120)) (expected `patient_id filename label [source]`)")
                    continue
                }
                // The label is the last known label word after the file name (file names may hold spaces).
                guard let at = (2..<tokens.count).reversed().first(where: { threeClass[tokens[$0].lowercased()] != nil || binary[tokens[$0].lowercased()] != nil }) else {
                    let label = tokens.count == 3 ? tokens[2] : tokens[tokens.count - 2]
                    skips.add("unknown label", "\(path) line \(k + 1): \(label.debugDescription) (expected normal, pneumonia, COVID-19, positive or negative)")
                    continue
                }
                out.append(Line(patient: tokens[0], file: tokens[1..<at].joined(separator: " "), label: tokens[at].lowercased(), line: k + 1))
            }
            guard !out.isEmpty else {
                throw ConvirtError("\(path): no line of the form `patient_id filename label [source]` with a known label (\(describe(skips)))")
            }
            return out
        }
        let lists = [(trainFile, "train"), (testFile, "test")] + (validationFile.map { [($0, "val")] } ?? [])
        let parsed = try lists.map { (file: $0.0, dir: $0.1, lines: try parse($0.0)) }
        // The label scheme, from all lists together.
        var scheme: DownstreamTask? = nil, schemeFile = ""
        for list in parsed {
            for line in list.lines {
                let task: DownstreamTask = threeClass[line.label] != nil ? .multiClass : .binary
                if let scheme, scheme != task {
                    throw ConvirtError("\(list.file) line \(line.line): label \(line.label.debugDescription) mixes COVIDx's binary (positive/negative) "
                        + "and 3-class (normal/pneumonia/COVID-19) labels (\(schemeFile) uses the other scheme)")
                }
                scheme = task; schemeFile = list.file
            }
        }
        let task = scheme ?? .multiClass
        struct Row { var item: LabeledImage; var patient: String }
        func items(_ list: (file: String, dir: String, lines: [Line])) -> [Row] {
            var rows: [Row] = []
            for line in list.lines {
                let path = "\(root)/\(list.dir)/\(line.file)"
                guard exists(path) else { skips.add("missing image", "\(list.file) line \(line.line): \(path)"); continue }
                var targets: [Float]
                if task == .multiClass {
                    targets = [0, 0, 0]
                    targets[threeClass[line.label]!] = 1
                } else {
                    targets = [binary[line.label]!]
                }
                rows.append(Row(item: LabeledImage(path: path, targets: targets, group: "\(list.dir)/\(line.file)"), patient: line.patient))
            }
            return rows
        }
        let train = items(parsed[0]), test = items(parsed[1])
        guard !train.isEmpty else { throw ConvirtError("\(trainFile): no usable image (\(describe(skips)))") }
        guard !test.isEmpty else { throw ConvirtError("\(testFile): no usable image (\(describe(skips)))") }
        var kept = train, validation: [Row] = []
        if parsed.count == 3 {
            validation = items(parsed[2])
        } else {
            (kept, validation) = holdOut(train, patient: \.patient, target: proportional(train.count, 300, 16_790), seed: options.seed, purpose: 3)
        }
        return DownstreamData(dataset: .covidx, task: task, labelNames: task == .multiClass ? covidxClasses : ["COVID-19"],
                              train: kept.map(\.item), validation: validation.map(\.item), test: test.map(\.item),
                              skipped: skips.counts, skippedExamples: skips.examples)
    }

    // MARK: - MURA

    /// The MURA directory: `root` when it holds train_image_paths.csv, else `root/MURA-v1.1`.
    public static func muraDirectory(_ root: String) throws -> String {
        let root = absolutePath(root)
        if exists("\(root)/train_image_paths.csv") { return root }
        if exists("\(root)/MURA-v1.1/train_image_paths.csv") { return "\(root)/MURA-v1.1" }
        throw ConvirtError("\(root): no train_image_paths.csv; expected the MURA-v1.1 directory (train_image_paths.csv, "
            + "train_labeled_studies.csv, valid_image_paths.csv, valid_labeled_studies.csv, train/, valid/) or its parent")
    }

    /// MURA v1.1: `{train,valid}_image_paths.csv` (no header; one path per line, relative to the parent of
    /// MURA-v1.1) and `{train,valid}_labeled_studies.csv` (no header; `study_dir/,label`, 1 = abnormal).
    /// Each image takes its study's label; `group` is the study directory. Validation: 10% of the
    /// training patients (at least 1), seeded; test: the official valid set.
    static func loadMURA(root: String, options: DownstreamOptions) throws -> DownstreamData {
        let dir = try muraDirectory(root)
        var skips = SkipLog()
        func records(_ name: String) throws -> (file: String, records: [CSVTable.Record]) {
            let file = "\(dir)/\(name)"
            guard exists(file) else { throw ConvirtError("\(dir): no \(name)") }
            var text = try Gzip.readText(file)
            if text.unicodeScalars.first == "\u{FEFF}" { text = String(text.unicodeScalars.dropFirst()) }
            let (parsed, unterminated) = CSVTable.parse(text)
            if let line = unterminated { throw ConvirtError("\(file): line \(line): a quoted field is never closed (a stray \" swallows the rest of the file)") }
            return (file, parsed.filter { $0.fields != [""] && !$0.fields.isEmpty })
        }
        func studyKey(_ path: String) -> String {
            var p = Substring(path.trimmingCharacters(in: .whitespaces))
            while p.hasSuffix("/") { p = p.dropLast() }
            return String(p)
        }
        func studyLabels(_ name: String) throws -> [String: Float] {
            let (file, rows) = try records(name)
            var labels: [String: Float] = [:]
            for r in rows {
                let label = r.fields.count == 2 ? r.fields[1].trimmingCharacters(in: .whitespaces) : ""
                guard r.fields.count == 2, label == "0" || label == "1", !studyKey(r.fields[0]).isEmpty else {
                    skips.add("malformed CSV row", "\(file) line \(r.line): \(r.fields.joined(separator: ",").prefix(160)) (expected `study_dir/,0|1`)")
                    continue
                }
                labels[studyKey(r.fields[0])] = label == "1" ? 1 : 0
            }
            guard !labels.isEmpty else { throw ConvirtError("\(file): no row of the form `study_dir/,0|1` (\(describe(skips)))") }
            return labels
        }
        struct Row { var item: LabeledImage; var patient: String }
        func images(_ name: String, _ labels: [String: Float]) throws -> [Row] {
            let (file, rows) = try records(name)
            var candidates: [(path: String, line: Int)] = []
            for r in rows {
                let path = r.fields.count == 1 ? r.fields[0].trimmingCharacters(in: .whitespaces) : ""
                guard !path.isEmpty else {
                    skips.add("malformed CSV row", "\(file) line \(r.line): \(r.fields.joined(separator: ",").prefix(160)) (expected one image path)")
                    continue
                }
                candidates.append((path, r.line))
            }
            let paths = try ReleasePaths.detect(root: dir, file: file, rows: candidates.filter { !$0.path.split(separator: "/").last!.hasPrefix("._") })
            var out: [Row] = []
            for (relative, line) in candidates {
                if relative.split(separator: "/").last!.hasPrefix("._") {
                    skips.add("macOS resource-fork entry (._*)", "\(file) line \(line): \(relative)")
                    continue
                }
                let study = studyKey((relative as NSString).deletingLastPathComponent)
                guard let label = labels[study] else {
                    skips.add("image of a study without a label", "\(file) line \(line): \(relative)")
                    continue
                }
                let path = paths.resolve(relative)
                guard exists(path) else { skips.add("missing image", "\(file) line \(line): \(path)"); continue }
                out.append(Row(item: LabeledImage(path: path, targets: [label], group: study + "/"), patient: patientComponent(relative)))
            }
            guard !out.isEmpty else { throw ConvirtError("\(file): no usable image (\(describe(skips)))") }
            return out
        }
        let train = try images("train_image_paths.csv", studyLabels("train_labeled_studies.csv"))
        let test = try images("valid_image_paths.csv", studyLabels("valid_labeled_studies.csv"))
        let patients = Set(train.map(\.patient)).count
        let split = holdOut(train, patient: \.patient, target: max(1, Int((Double(patients) * 0.1).rounded())), seed: options.seed,
                            purpose: 4, countPatients: true)
        return DownstreamData(dataset: .mura, task: .binary, labelNames: ["Abnormal"], train: split.kept.map(\.item),
                              validation: split.heldOut.map(\.item), test: test.map(\.item), skipped: skips.counts, skippedExamples: skips.examples)
    }

    /// "3 missing image, 1 malformed CSV row" (or "nothing skipped").
    static func describe(_ skips: SkipLog) -> String {
        if skips.counts.isEmpty { return "nothing skipped" }
        return skips.counts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key), e.g. \(skips.examples[$0.key]?.first ?? "")" }
            .joined(separator: "; ")
    }
}
