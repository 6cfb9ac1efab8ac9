// The downstream dataset readers and synthetic writers: each dataset synthesised small in its released
// layout and read back (counts, splits disjoint by patient, label semantics), label fractions, the
// evaluation input, the 8x200 retrieval files, and real broken files.

import ConvirtCore
import ConvirtData
import ConvirtIO
import ConvirtText
import Foundation
import Testing

private func temporaryDirectory(_ name: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

private func synth(_ dataset: DownstreamDataset, _ dir: String, count: Int, size: Int = 64, seed: UInt64 = 1,
                   configure: (inout SynthDownstreamOptions) -> Void = { _ in }) throws -> SynthDownstreamSummary {
    var o = SynthDownstreamOptions()
    o.count = count; o.imageSize = size; o.seed = seed
    o.retrievalCandidates = 3; o.retrievalImageQueries = 2; o.retrievalTextQueries = 2
    configure(&o)
    return try SynthDownstream.write(dataset, to: dir, options: o)
}

private func text(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }
private func write(_ text: String, _ path: String) throws { try text.write(toFile: path, atomically: true, encoding: .utf8) }

private func errorText(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch { return "\(error)" }
}

private func patient(_ path: String) -> String { path.split(separator: "/").first { $0.hasPrefix("patient") }.map(String.init) ?? path }

@Suite("Downstream datasets", .serialized)
struct DownstreamTests {
    @Test("CheXpert: layout, counts, held-out patients, U-Zeros and U-Ones, paths from the parent or the directory")
    func chexpert() throws {
        let out = try temporaryDirectory("chexpert")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let summary = try synth(.chexpert, out, count: 40)
        #expect(summary.root == "\(out)/CheXpert-v1.0-small" && summary.images == ["train": 40, "valid": 8, "retrieval": 40])
        let data = try DownstreamReader.load(.chexpert, root: summary.root)
        #expect(data.task == .multiLabel && data.labelNames == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"])
        #expect(data.skipped.isEmpty, "\(data.skipped)")
        #expect(data.train.count + data.validation.count == 80 && data.test.count == 8)
        #expect(data.validation.count >= 1 && data.validation.count < 10)  // 5000/223414 of 80, whole patients
        let trainPatients = Set(data.train.map { patient($0.path) }), validationPatients = Set(data.validation.map { patient($0.path) })
        #expect(trainPatients.isDisjoint(with: validationPatients))
        #expect(data.test.allSatisfy { $0.path.contains("/valid/") && $0.path.hasPrefix("/") && FileManager.default.fileExists(atPath: $0.path) })
        #expect(data.train.allSatisfy { $0.targets.count == 5 && $0.group.hasPrefix("CheXpert-v1.0-small/train/") })
        // The parent directory works too (the CSV paths are relative to it).
        let fromParent = try DownstreamReader.load(.chexpert, root: out)
        #expect(fromParent.train == data.train && fromParent.test == data.test)
        // A renamed copy resolves the paths against the directory itself, without their first component.
        try FileManager.default.moveItem(atPath: summary.root, toPath: "\(out)/renamed")
        let renamed = try DownstreamReader.load(.chexpert, root: "\(out)/renamed")
        #expect(renamed.train.map(\.path) == data.train.map { $0.path.replacingOccurrences(of: "/CheXpert-v1.0-small/", with: "/renamed/") })
        try FileManager.default.moveItem(atPath: "\(out)/renamed", toPath: summary.root)
        // Another seed holds out other patients.
        var other = DownstreamOptions(); other.seed = 9
        #expect(try DownstreamReader.load(.chexpert, root: out, options: other).validation != data.validation)

        // U-Zeros by default, U-Ones per label: compare with the CSV's values.
        let table = try CSVTable(path: "\(summary.root)/train.csv", required: ["Path"])
        let all = data.train + data.validation
        let byGroup = Dictionary(uniqueKeysWithValues: all.map { ($0.group, $0) })
        var uOnes = DownstreamOptions(); uOnes.uOnes = ["Edema", "Pleural Effusion", "Atelectasis", "Cardiomegaly", "Consolidation"]
        let ones = try DownstreamReader.load(.chexpert, root: out, options: uOnes)
        let onesByGroup = Dictionary(uniqueKeysWithValues: (ones.train + ones.validation).map { ($0.group, $0) })
        var uncertain = 0, blank = 0
        for row in table.rows {
            let path = table.value(row, "Path")
            for (j, label) in data.labelNames.enumerated() {
                let v = table.value(row, label)
                let expected: Float = v == "1.0" ? 1 : 0
                #expect(byGroup[path]?.targets[j] == expected, "\(path) \(label) \(v)")
                #expect(onesByGroup[path]?.targets[j] == (v == "1.0" || v == "-1.0" ? 1 : 0), "\(path) \(label) \(v)")
                if v == "-1.0" { uncertain += 1 }
                if v.isEmpty { blank += 1 }
            }
        }
        #expect(uncertain > 0 && blank > 0)
        var wrong = DownstreamOptions(); wrong.uOnes = ["Pneumothorax"]
        #expect(errorText { _ = try DownstreamReader.load(.chexpert, root: out, options: wrong) }?.contains("Pneumothorax") == true)
        // Frontal only drops the laterals, counted.
        var frontal = DownstreamOptions(); frontal.frontalOnly = true
        let frontalData = try DownstreamReader.load(.chexpert, root: out, options: frontal)
        #expect((frontalData.train + frontalData.validation + frontalData.test).allSatisfy { $0.path.hasSuffix("_frontal.jpg") })
    }

    @Test("CheXpert 8x200 retrieval files: categories, exclusive candidates, queries")
    func retrieval() throws {
        let out = try temporaryDirectory("retrieval")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let summary = try synth(.chexpert, out, count: 10)
        let set = try Retrieval8x200.load(root: summary.root, queries: "\(out)/chexpert_8x200")
        #expect(set.categories == ["Fracture", "Edema", "Pneumonia", "Cardiomegaly", "Pneumothorax", "Atelectasis", "Pleural Effusion", "No Finding"])
        #expect(set.candidates.count == 24 && set.textCandidates == set.candidates && set.skipped.isEmpty)
        for c in set.candidates {
            #expect(set.categories.filter { set.relevant(c, $0) }.count == 1, "\(c.relativePath)")
            #expect(FileManager.default.fileExists(atPath: c.path))
        }
        #expect(set.imageQueries.count == 16 && set.textQueries.count == 16)
        #expect(Set(set.imageQueries.map(\.category)) == Set(set.categories) && Set(set.textQueries.map(\.category)) == Set(set.categories))
        #expect(set.imageQueries.allSatisfy { FileManager.default.fileExists(atPath: $0.path) })
        #expect(Set(set.imageQueries.map(\.path)).isDisjoint(with: set.candidates.map(\.path)))
        #expect(set.textQueries.contains { $0.category == "Pleural Effusion" && $0.text.contains("effusion") })
        // Candidates and queries are training images, as in the released set.
        let train = try text("\(summary.root)/train.csv")
        #expect(set.candidates.allSatisfy { train.contains($0.relativePath) })
        // A query category that no candidate column names (a misspelling) is an error at the query's line.
        let queryPath = "\(out)/chexpert_8x200/image-retrieval/query.csv"
        let queries = try text(queryPath)
        var lines = queries.components(separatedBy: "\n")
        lines[3] = "Pleural Efusion," + lines[3].split(separator: ",", maxSplits: 1)[1]
        try lines.joined(separator: "\n").write(toFile: queryPath, atomically: true, encoding: .utf8)
        let misspelt = errorText { _ = try Retrieval8x200.load(root: out, queries: "\(out)/chexpert_8x200") }
        #expect(misspelt?.contains("image-retrieval/query.csv line 4: query category \"Pleural Efusion\" is not a label column of") == true, "\(misspelt ?? "")")
        try queries.write(toFile: queryPath, atomically: true, encoding: .utf8)
        // A missing file is an error naming it.
        try FileManager.default.removeItem(atPath: "\(out)/chexpert_8x200/text-retrieval/query.csv")
        #expect(errorText { _ = try Retrieval8x200.load(root: out, queries: "\(out)/chexpert_8x200") }?.contains("text-retrieval/query.csv") == true)
    }

    @Test("RSNA: one label per patientId from the box rows, DICOM images, 25184/1500/3000 proportions, conflicts skipped")
    func rsna() throws {
        let out = try temporaryDirectory("rsna")
        defer { try? FileManager.default.removeItem(atPath: out) }
        _ = try synth(.rsna, out, count: 60)
        let data = try DownstreamReader.load(.rsna, root: out)
        #expect(data.task == .binary && data.labelNames == ["Pneumonia"] && data.skipped.isEmpty)
        #expect(data.validation.count == 3 && data.test.count == 6 && data.train.count == 51)  // 60 x 1500/29684, 60 x 3000/29684
        let all = data.train + data.validation + data.test
        #expect(Set(all.map(\.group)).count == 60)
        let table = try CSVTable(path: "\(out)/stage_2_train_labels.csv", required: ["patientId", "Target"])
        #expect(table.rows.count > 60)  // some patients have two boxes
        var boxes: [String: Int] = [:]
        for row in table.rows where table.value(row, "Target") == "1" {
            boxes[table.value(row, "patientId"), default: 0] += 1
            #expect(Double(table.value(row, "width"))! > 0)
        }
        let byID = Dictionary(uniqueKeysWithValues: all.map { ($0.group, $0) })
        #expect(boxes.values.contains(2))
        for id in Set(table.rows.map { table.value($0, "patientId") }) { #expect(byID[id]?.targets == [boxes[id] != nil ? 1 : 0]) }
        let image = try DownstreamReader.loadImage(path: all[0].path)
        #expect(image.width == 224 && image.height == 224)
        #expect(try DownstreamReader.load(.rsna, root: out).test == data.test)  // deterministic

        // Conflicting rows for one id, a malformed row and a missing image.
        let conflicted = data.train[0].group
        var csv = try text("\(out)/stage_2_train_labels.csv")
        csv += "\(conflicted),1.0,2.0,3.0,4.0,\(data.train[0].targets[0] == 1 ? 0 : 1)\n" + "broken,row\n"
        try write(csv, "\(out)/stage_2_train_labels.csv")
        try FileManager.default.removeItem(atPath: data.train[1].path)
        let broken = try DownstreamReader.load(.rsna, root: out)
        #expect(broken.skipped == ["conflicting Target for one patientId": 1, "malformed CSV row": 1, "missing image": 1], "\(broken.skipped)")
        #expect(broken.skippedExamples["missing image"]?.first?.contains(data.train[1].path) == true)
        #expect(!(broken.train + broken.validation + broken.test).contains { $0.group == conflicted })
        // A wrong header stops with the file.
        try write("id,Target\nx,1\n", "\(out)/stage_2_train_labels.csv")
        let message = errorText { _ = try DownstreamReader.load(.rsna, root: out) }
        #expect(message?.contains("\(out)/stage_2_train_labels.csv: missing required column(s) patientId") == true, "\(message ?? "")")
    }

    @Test("COVIDx: 3 classes or binary detected from the labels, validation held out by patient, bad lines counted")
    func covidx() throws {
        let out = try temporaryDirectory("covidx"), binaryOut = try temporaryDirectory("covidx-binary")
        defer { try? FileManager.default.removeItem(atPath: out); try? FileManager.default.removeItem(atPath: binaryOut) }
        let summary = try synth(.covidx, out, count: 30)
        let data = try DownstreamReader.load(.covidx, root: out)
        #expect(data.task == .multiClass && data.labelNames == ["normal", "pneumonia", "COVID-19"] && data.skipped.isEmpty)
        #expect(data.train.count + data.validation.count == summary.images["train"] && data.test.count == summary.images["test"])
        #expect(data.validation.count >= 1)
        for split in [data.train, data.test] {
            #expect((0..<3).allSatisfy { c in split.contains { $0.targets[c] == 1 } })
            #expect(split.allSatisfy { $0.targets.reduce(0, +) == 1 })
        }
        // Patients (the first field) are not split between train and validation.
        let patientOf = Dictionary(uniqueKeysWithValues: try text("\(out)/train.txt").split(separator: "\n").map {
            let f = $0.split(separator: " "); return ("train/\(f[1])", String(f[0]))
        })
        #expect(Set(data.train.map { patientOf[$0.group]! }).isDisjoint(with: data.validation.map { patientOf[$0.group]! }))
        // Labels agree with the list.
        let lines = try text("\(out)/test.txt").split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        for (item, line) in zip(data.test, lines) { #expect(item.targets[data.labelNames.firstIndex(of: line[2])!] == 1 && item.path.hasSuffix(line[1])) }

        _ = try synth(.covidx, binaryOut, count: 12) { $0.covidxBinary = true }
        let binary = try DownstreamReader.load(.covidx, root: binaryOut)
        #expect(binary.task == .binary && binary.labelNames == ["COVID-19"])
        #expect(binary.test.contains { $0.targets == [1] } && binary.test.contains { $0.targets == [0] })

        // An unknown label and a short line are counted; a mix of the two schemes is an error naming the line.
        var list = try text("\(out)/train.txt")
        let first = list.split(separator: "\n")[0].split(separator: " ")
        list += "\(first[0]) \(first[1]) bacterial cohen\njust-one-field\n"
        try write(list, "\(out)/train.txt")
        let counted = try DownstreamReader.load(.covidx, root: out)
        #expect(counted.skipped == ["unknown label": 1, "malformed line": 1], "\(counted.skipped)")
        #expect(counted.skippedExamples["unknown label"]?.first?.contains("train.txt line") == true)
        try write(list + "\(first[0]) \(first[1]) positive cohen\n", "\(out)/train.txt")
        let mixed = errorText { _ = try DownstreamReader.load(.covidx, root: out) }
        #expect(mixed?.contains("train.txt line") == true && mixed?.contains("mixes") == true, "\(mixed ?? "")")
    }

    @Test("MURA: study labels on every image, group = study, held-out patients, the official valid set as test")
    func mura() throws {
        let out = try temporaryDirectory("mura")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let summary = try synth(.mura, out, count: 24)
        #expect(summary.root == "\(out)/MURA-v1.1")
        let data = try DownstreamReader.load(.mura, root: out)
        #expect(data.task == .binary && data.labelNames == ["Abnormal"] && data.skipped.isEmpty)
        #expect(data.train.count + data.validation.count == summary.images["train"] && data.test.count == summary.images["valid"])
        let studies = try CSVTable(path: "\(summary.root)/train_labeled_studies.csv", hasHeader: false)
        let label = Dictionary(uniqueKeysWithValues: studies.rows.map { ($0[0], Float($0[1])!) })
        for item in data.train + data.validation {
            #expect(item.group.hasSuffix("/") && item.path.hasSuffix(".png") && item.path.contains(item.group))
            #expect(item.targets == [label[item.group]!])
            #expect(item.group.hasSuffix("_positive/") == (item.targets == [1]))
        }
        #expect(Set(data.train.map(\.group)).count + Set(data.validation.map(\.group)).count == 24)
        #expect(Set(data.train.map { patient($0.path) }).isDisjoint(with: data.validation.map { patient($0.path) }))
        #expect(!data.validation.isEmpty && data.test.allSatisfy { $0.group.hasPrefix("MURA-v1.1/valid/") })
        // A label fraction keeps studies whole.
        let part = DownstreamReader.fraction(data.train, 0.25, seed: 3)
        for group in Set(part.map(\.group)) { #expect(part.filter { $0.group == group }.count == data.train.filter { $0.group == group }.count) }

        // A missing image, an image of an unlabeled study and a malformed study row are counted.
        let paths = try text("\(summary.root)/train_image_paths.csv")
        try FileManager.default.removeItem(atPath: data.train[0].path)
        try write(paths + "MURA-v1.1/train/XR_HAND/patient99999/study1_negative/image1.png\n", "\(summary.root)/train_image_paths.csv")
        try write(try text("\(summary.root)/train_labeled_studies.csv") + "MURA-v1.1/train/XR_HAND/patient99998/study1_negative/,maybe\n",
                  "\(summary.root)/train_labeled_studies.csv")
        let broken = try DownstreamReader.load(.mura, root: summary.root)
        #expect(broken.skipped == ["missing image": 1, "image of a study without a label": 1, "malformed CSV row": 1], "\(broken.skipped)")
    }

    /// patientId -> Target of a synthetic RSNA directory.
    private func rsnaTargets(_ dir: String) throws -> [String: String] {
        let table = try CSVTable(path: "\(dir)/stage_2_train_labels.csv", required: ["patientId", "Target"])
        return Dictionary(table.rows.map { (table.value($0, "patientId"), table.value($0, "Target")) }, uniquingKeysWith: { a, _ in a })
    }

    /// The share of keys whose values differ between two labelings of the same items.
    private func flipped(_ a: [String: String], _ b: [String: String]) -> Double {
        Double(a.filter { b[$0.key] != $0.value }.count) / Double(a.count)
    }

    @Test("calibrated difficulty: RSNA 27% pneumonia, COVIDx 3% COVID-19, MURA 63% abnormal; label noise at the set rates; difficulty 0 is clean")
    func calibratedBalanceAndNoise() throws {
        let out = try temporaryDirectory("difficulty")
        defer { try? FileManager.default.removeItem(atPath: out) }
        // The truth is drawn the same way at every difficulty; difficulty 0 writes it, difficulty 1 adds
        // the label noise, so the share of labels that differ is the noise rate.
        for d in [0.0, 1.0] {
            _ = try synth(.rsna, "\(out)/rsna-\(d)", count: 1500, size: 32) { $0.difficulty = d }
            _ = try synth(.covidx, "\(out)/covidx-\(d)", count: 1500, size: 32) { $0.difficulty = d }
            _ = try synth(.mura, "\(out)/mura-\(d)", count: 1000, size: 32) { $0.difficulty = d }
            _ = try synth(.chexpert, "\(out)/chexpert-\(d)", count: 800, size: 32) { $0.difficulty = d; $0.writeRetrieval = false }
        }
        let noise = SynthDifficulty.labelNoise
        // RSNA: patients with Target 1.
        let rsnaClean = try rsnaTargets("\(out)/rsna-0.0"), rsnaNoisy = try rsnaTargets("\(out)/rsna-1.0")
        let pneumonia = Double(rsnaClean.values.filter { $0 == "1" }.count) / Double(rsnaClean.count)
        #expect(rsnaClean.count == 1500 && abs(pneumonia - 0.27) < 0.035, "RSNA pneumonia share \(pneumonia)")
        let rsnaFlips = flipped(rsnaClean, rsnaNoisy)
        #expect(abs(rsnaFlips - noise[.rsna]!) < 0.02, "RSNA label noise \(rsnaFlips)")
        // COVIDx: the class of each image in train.txt and test.txt.
        func covidxLabels(_ dir: String) throws -> [String: String] {
            var labels: [String: String] = [:]
            for split in ["train", "test"] {
                for line in try text("\(dir)/\(split).txt").split(separator: "\n") {
                    let f = line.split(separator: " ")
                    labels["\(split)/\(f[1])"] = String(f[2])
                }
            }
            return labels
        }
        let covidxClean = try covidxLabels("\(out)/covidx-0.0"), covidxNoisy = try covidxLabels("\(out)/covidx-1.0")
        #expect(Set(covidxClean.keys) == Set(covidxNoisy.keys))
        let covid = Double(covidxClean.values.filter { $0 == "COVID-19" }.count) / Double(covidxClean.count)
        let covidxPneumonia = Double(covidxClean.values.filter { $0 == "pneumonia" }.count) / Double(covidxClean.count)
        #expect(covid > 0.02 && covid < 0.045, "COVIDx COVID-19 share \(covid)")
        #expect(abs(covidxPneumonia - 0.4) < 0.04, "COVIDx pneumonia share \(covidxPneumonia)")
        let covidxFlips = flipped(covidxClean, covidxNoisy)
        #expect(abs(covidxFlips - noise[.covidx]!) < 0.012, "COVIDx label noise \(covidxFlips)")
        // MURA: the study's label (its directory name says it too).
        func muraLabels(_ dir: String) throws -> [String: String] {
            let table = try CSVTable(path: "\(dir)/MURA-v1.1/train_labeled_studies.csv", hasHeader: false)
            return Dictionary(uniqueKeysWithValues: table.rows.map { row in
                let study = row[0].replacingOccurrences(of: "_positive/", with: "/").replacingOccurrences(of: "_negative/", with: "/")
                #expect(row[0].hasSuffix(row[1] == "1" ? "_positive/" : "_negative/"), "\(row)")
                return (study, row[1])
            })
        }
        let muraClean = try muraLabels("\(out)/mura-0.0"), muraNoisy = try muraLabels("\(out)/mura-1.0")
        let abnormal = Double(muraClean.values.filter { $0 == "1" }.count) / Double(muraClean.count)
        #expect(muraClean.count == 1000 && abs(abnormal - 0.63) < 0.04, "MURA abnormal share \(abnormal)")
        let muraFlips = flipped(muraClean, muraNoisy)
        #expect(abs(muraFlips - noise[.mura]!) < 0.025, "MURA label noise \(muraFlips)")
        // CheXpert: definite (0/1) training labels read the wrong way by the labeler; valid.csv stays clean.
        func chexpertCells(_ dir: String, _ file: String) throws -> [String: String] {
            let table = try CSVTable(path: "\(dir)/CheXpert-v1.0-small/\(file)", required: CheXpertLabels.chexpertHeader)
            var cells: [String: String] = [:]
            for row in table.rows { for label in CheXpertLabels.chexpertFileOrder { cells["\(table.value(row, "Path"))|\(label)"] = table.value(row, label) } }
            return cells
        }
        let trainClean = try chexpertCells("\(out)/chexpert-0.0", "train.csv").filter { $0.value == "0.0" || $0.value == "1.0" }
        let trainNoisy = try chexpertCells("\(out)/chexpert-1.0", "train.csv")
        let chexpertFlips = flipped(trainClean.filter { !$0.key.hasSuffix("|No Finding") }, trainNoisy)
        #expect(abs(chexpertFlips - noise[.chexpert]!) < 0.015, "CheXpert labeler noise \(chexpertFlips)")
        #expect(try chexpertCells("\(out)/chexpert-0.0", "valid.csv") == chexpertCells("\(out)/chexpert-1.0", "valid.csv"))
        // The images of a finding differ (fainter at difficulty 1), the file lists do not.
        let image = try #require(covidxClean.filter { $0.key.hasPrefix("train/") && $0.value == "pneumonia" }.keys.sorted().first)
        let a = try Data(contentsOf: URL(fileURLWithPath: "\(out)/covidx-0.0/\(image)"))
        let b = try Data(contentsOf: URL(fileURLWithPath: "\(out)/covidx-1.0/\(image)"))
        #expect(!a.isEmpty && !b.isEmpty && a != b)
    }

    @Test("conspicuity: a faint finding changes fewer and smaller pixels than a full one; 1 is the default; soft tissue adds density")
    func conspicuity() throws {
        #expect(Findings().conspicuity == 1 && Findings().softTissue == 0)
        let stream = RandomStream(seed: 5)
        let normal = ChestRenderer.render(width: 96, height: 104, findings: Findings(), lateral: false, stream: stream)
        func difference(_ change: (inout Findings) -> Void) -> Double {
            var f = Findings()
            change(&f)
            let image = ChestRenderer.render(width: 96, height: 104, findings: f, lateral: false, stream: stream)
            return zip(image, normal).reduce(0.0) { $0 + Double(abs($1.0 - $1.1)) } / Double(normal.count)
        }
        for finding in ["consolidation", "effusion", "pneumothorax", "cardiomegaly", "fracture", "edema", "atelectasis"] {
            func set(_ f: inout Findings) {
                switch finding {
                case "consolidation": f.consolidation = (.left, false)
                case "effusion": f.effusion = (.right, .moderate)
                case "pneumothorax": f.pneumothorax = (.left, .moderate)
                case "cardiomegaly": f.cardiomegaly = true
                case "fracture": f.fracture = .right
                case "edema": f.edema = .moderate
                default: f.atelectasis = .left
                }
            }
            let full = difference { set(&$0) }, faint = difference { set(&$0); $0.conspicuity = 0.2 }
            #expect(full > 0 && faint > 0 && faint < 0.7 * full, "\(finding): faint \(faint), full \(full)")
        }
        #expect(difference { $0.softTissue = 0.07 } > 0)
        // Difficulty 0 draws every finding at full conspicuity without shadows.
        #expect(SynthDifficulty.conspicuity(0, difficulty: 0) == 1 && SynthDifficulty.conspicuity(0, difficulty: 1) == Float(SynthDifficulty.faintest))
    }

    @Test("8x200 text queries are phrased unlike the pretraining reports: no query is a report sentence")
    func radiologistQueries() throws {
        var reportSentences = Set<String>()
        for seed: UInt64 in [0, 1] {
            for i in 0..<3000 { reportSentences.formUnion(ReportSections.sentences(ReportWriter.study(seed: seed, index: i).report)) }
        }
        let stream = RandomStream(seed: 9)
        for category in Retrieval8x200.categories {
            var queries = Set<String>()
            for i in 0..<200 { queries.insert(SynthDownstream.radiologistQuery(about: category, stream, UInt64(i))) }
            #expect(queries.count >= 3, "\(category): \(queries)")
            #expect(queries.isDisjoint(with: reportSentences), "\(category): \(queries.intersection(reportSentences))")
        }
    }

    @Test("label fractions: deterministic, nested, at least one image and one positive per label")
    func fractions() {
        // 1000 images, 5 labels; label 4 has a single positive.
        let items = (0..<1000).map { i in
            LabeledImage(path: "/x/\(i).jpg", targets: (0..<5).map { j in j == 4 ? (i == 777 ? 1 : 0) : Float((i * (j + 3)) % 7 == 0 ? 1 : 0) },
                         group: "\(i)")
        }
        let a = DownstreamReader.fraction(items, 0.01, seed: 5), b = DownstreamReader.fraction(items, 0.01, seed: 5)
        #expect(a == b)
        #expect(a != DownstreamReader.fraction(items, 0.01, seed: 6))
        #expect(a.count >= 10 && a.count <= 15)
        #expect((0..<5).allSatisfy { j in a.contains { $0.targets[j] == 1 } && a.contains { $0.targets[j] == 0 } })
        let ten = DownstreamReader.fraction(items, 0.1, seed: 5)
        #expect(ten.count >= 100 && ten.count <= 105)
        #expect(Set(a.filter { $0.path != "/x/777.jpg" }.map(\.path)).isSubset(of: ten.map(\.path)))
        #expect(DownstreamReader.fraction(items, 1, seed: 5) == items)
        #expect(DownstreamReader.fraction(Array(items.prefix(3)), 0.01, seed: 1).count >= 1)
        // Input order is kept.
        let indices = ten.map { Int($0.group)! }
        #expect(indices == indices.sorted())
        // Multi-class: every class stays.
        let classes = (0..<300).map { i in LabeledImage(path: "/c/\(i)", targets: (0..<3).map { c in Float(c == (i < 295 ? i % 2 : 2) ? 1 : 0) }, group: "\(i)") }
        let small = DownstreamReader.fraction(classes, 0.01, seed: 2)
        #expect((0..<3).allSatisfy { c in small.contains { $0.targets[c] == 1 } })
    }

    @Test("loadImage: 224 x 224, zero-padded to square, from JPEG, PNG and DICOM content; damaged files name the file")
    func loadImage() throws {
        let dir = try temporaryDirectory("load")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A white 40 x 20 image: padded to 40 x 40 with 10 black rows above and below.
        let white = GrayImage(width: 40, height: 20, pixels: [Float](repeating: 1, count: 800))
        try PNG.encode(white).write(to: URL(fileURLWithPath: "\(dir)/wide.png"))
        try JPEG.encode(white, quality: 95).write(to: URL(fileURLWithPath: "\(dir)/wide.jpeg-without-extension"))
        try DICOM.writeJPEGBaseline(white, to: "\(dir)/wide.dcm", quality: 95)
        for name in ["wide.png", "wide.jpeg-without-extension", "wide.dcm"] {
            let image = try DownstreamReader.loadImage(path: "\(dir)/\(name)", size: 40)
            #expect(image.width == 40 && image.height == 40, "\(name)")
            #expect(image.pixels[0..<(8 * 40)].allSatisfy { $0 < 0.02 } && image.pixels[(32 * 40)...].allSatisfy { $0 < 0.02 }, "\(name)")
            #expect(image.pixels[(12 * 40)..<(28 * 40)].allSatisfy { $0 > 0.97 }, "\(name)")
            let full = try DownstreamReader.loadImage(path: "\(dir)/\(name)")
            #expect(full.width == 224 && full.height == 224 && full.pixels.allSatisfy { $0 >= 0 && $0 <= 1 })
        }
        // A tall synthetic CheXpert image: black columns at the sides.
        let out = try temporaryDirectory("load-chexpert")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let data = try DownstreamReader.load(.chexpert, root: try synth(.chexpert, out, count: 8) { $0.writeRetrieval = false }.root)
        let image = try DownstreamReader.loadImage(path: data.test[0].path)
        #expect(image.width == 224 && image.height == 224)
        #expect((0..<224).allSatisfy { image.pixels[$0 * 224] == 0 && image.pixels[$0 * 224 + 223] == 0 })
        #expect(image.pixels[112 * 224 + 112] > 0)

        // A truncated JPEG is still listed (it exists); loading it is an error naming it.
        let victim = data.test[1].path
        let bytes = try Data(contentsOf: URL(fileURLWithPath: victim))
        try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: victim))
        #expect(try DownstreamReader.load(.chexpert, root: out).test.contains { $0.path == victim })
        #expect(errorText { _ = try DownstreamReader.loadImage(path: victim) }?.contains(victim) == true)
        for (name, content) in [("empty.png", Data()), ("text.png", Data("not an image at all".utf8)), ("cut.png", try PNG.encode(white).prefix(40))] {
            try content.write(to: URL(fileURLWithPath: "\(dir)/\(name)"))
            let message = errorText { _ = try DownstreamReader.loadImage(path: "\(dir)/\(name)") }
            #expect(message?.contains("\(dir)/\(name)") == true, "\(message ?? "no error")")
        }
        #expect(errorText { _ = try DownstreamReader.loadImage(path: "\(dir)/absent.jpg") }?.contains("absent.jpg: no such file") == true)
    }

    @Test("decoded-image cache: kept images read bitwise as decoded ones, within the budget; unreadable ones never kept")
    func decodedImageCache() throws {
        let dir = try temporaryDirectory("image-cache")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var paths: [String] = []
        for k in 0..<3 {
            let width = 30 + 7 * k
            let image = GrayImage(width: width, height: 20, pixels: (0..<(width * 20)).map { Float(($0 * (k + 3)) % 17) / 16 })
            let path = "\(dir)/image\(k).\(k == 1 ? "png" : "jpg")"
            try (k == 1 ? PNG.encode(image) : JPEG.encode(image, quality: 90)).write(to: URL(fileURLWithPath: path))
            paths.append(path)
        }
        try Data("not an image".utf8).write(to: URL(fileURLWithPath: "\(dir)/broken.jpg"))
        paths.append("\(dir)/broken.jpg")
        let s = 32, plane = 3 * s * s
        func read(_ cache: DecodedImageCache?) -> ([Float], [Bool]) {
            var out = [Float](repeating: -7, count: paths.count * plane)
            let ok = out.withUnsafeMutableBufferPointer { EvaluationInput.normalizedImages(paths, size: s, into: $0.baseAddress!, cache: cache) }
            return (out, ok)
        }
        let (decoded, readable) = read(nil)
        #expect(readable == [true, true, true, false])
        // Room for two images: two of the three readable ones are kept, the third is decoded on every read.
        let cache = DecodedImageCache(size: s, budgetBytes: 2 * s * s * MemoryLayout<Float>.size + 5)
        for pass in 0..<3 {
            let (out, ok) = read(cache)
            #expect(ok == readable && out == decoded, "pass \(pass)")
        }
        let kept = cache.statistics
        #expect(kept.images == 2 && kept.bytes == 2 * s * s * MemoryLayout<Float>.size)
        #expect(kept.hits == 4 && kept.misses == 8, "\(kept)")
        // No budget: nothing kept, every read decodes.
        let none = DecodedImageCache(size: s, budgetBytes: 0)
        #expect(read(none).0 == decoded && read(none).0 == decoded && none.statistics.images == 0 && none.statistics.hits == 0)
    }

    @Test("CheXpert bad input: wrong header, unresolvable paths, missing images, bad values, malformed rows")
    func chexpertBadInput() throws {
        let out = try temporaryDirectory("chexpert-bad")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let root = try synth(.chexpert, out, count: 12) { $0.writeRetrieval = false }.root
        let original = try text("\(root)/train.csv")
        var lines = original.split(separator: "\n").map(String.init)

        // A wrong header is an error naming the file.
        try write(lines.dropFirst().joined(separator: "\n") + "\n", "\(root)/train.csv")
        var message = errorText { _ = try DownstreamReader.load(.chexpert, root: root) }
        #expect(message?.contains("\(root)/train.csv: missing required column(s)") == true, "\(message ?? "")")
        // Paths that resolve nowhere: an error naming the CSV, the line and the places looked at.
        try write(original.replacingOccurrences(of: "/train/", with: "/elsewhere/"), "\(root)/train.csv")
        message = errorText { _ = try DownstreamReader.load(.chexpert, root: root) }
        #expect(message?.contains("\(root)/train.csv line 2") == true && message?.contains("elsewhere") == true, "\(message ?? "")")
        // No train.csv at all.
        #expect(errorText { _ = try DownstreamReader.load(.chexpert, root: "\(root)/train") }?.contains("no train.csv") == true)

        // Single bad rows are counted: a missing image, an invalid value, a short row.
        let missing = lines[3].split(separator: ",")[0]
        try FileManager.default.removeItem(atPath: "\(out)/\(missing)")
        var fields = lines[4].split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        fields[CheXpertLabels.chexpertHeader.firstIndex(of: "Edema")!] = "2.0"
        lines[4] = fields.joined(separator: ",")
        lines.append("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Male,30")
        try write(lines.joined(separator: "\n") + "\n", "\(root)/train.csv")
        let data = try DownstreamReader.load(.chexpert, root: root)
        #expect(data.skipped == ["missing image": 1, "invalid label value": 1, "malformed CSV row": 1], "\(data.skipped)")
        #expect(data.skippedExamples["invalid label value"]?.first?.contains("train.csv line 5: Edema = \"2.0\"") == true,
                "\(data.skippedExamples)")
        #expect(data.skippedExamples["missing image"]?.first?.contains(String(missing)) == true)
        #expect(data.train.count + data.validation.count == 12 - 2)
    }

    @Test("synth is deterministic; synth chexpert --labels renders the rows of a CSV at their paths")
    func synthDeterminismAndLabels() throws {
        let a = try temporaryDirectory("det-a"), b = try temporaryDirectory("det-b"), c = try temporaryDirectory("labels")
        defer { for d in [a, b, c] { try? FileManager.default.removeItem(atPath: d) } }
        _ = try synth(.rsna, a, count: 6, seed: 4)
        _ = try synth(.rsna, b, count: 6, seed: 4)
        let files = (FileManager.default.enumerator(atPath: a)?.allObjects as? [String] ?? []).sorted()
        #expect(files.count == 6 + 3)  // stage_2_train_images/ with 6 files, two CSVs
        for f in files where f.contains(".") {
            #expect(FileManager.default.contents(atPath: "\(a)/\(f)") == FileManager.default.contents(atPath: "\(b)/\(f)"), "\(f)")
        }

        func row(_ path: String, _ view: String, _ positives: [String]) -> String {
            ([path, "Female", "60", view, view == "Frontal" ? "AP" : ""] + CheXpertLabels.chexpertFileOrder.map { positives.contains($0) ? "1.0" : "" })
                .joined(separator: ",")
        }
        let csv = "\(c)/rows.csv"
        try write([CheXpertLabels.chexpertHeader.joined(separator: ","),
                   row("CheXpert-v1.0/train/patient00005/study2/view1_frontal.jpg", "Frontal", ["Cardiomegaly", "Pleural Effusion"]),
                   row("CheXpert-v1.0/train/patient00005/study2/view2_lateral.jpg", "Lateral", ["Cardiomegaly", "Pleural Effusion"]),
                   row("CheXpert-v1.0/train/patient00009/study1/view1_frontal.jpg", "Frontal", ["No Finding"])].joined(separator: "\n") + "\n", csv)
        let summary = try synth(.chexpert, "\(c)/out", count: 100) { $0.labelsCSV = csv }
        #expect(summary.images == ["labels": 3] && summary.root == "\(c)/out/CheXpert-v1.0")
        #expect(FileManager.default.fileExists(atPath: "\(c)/out/CheXpert-v1.0/train/patient00005/study2/view2_lateral.jpg"))
        #expect(FileManager.default.fileExists(atPath: "\(c)/out/CheXpert-v1.0/rows.csv"))
        let image = try DownstreamReader.loadImage(path: "\(c)/out/CheXpert-v1.0/train/patient00009/study1/view1_frontal.jpg", size: 64)
        #expect(image.width == 64)
    }
}
