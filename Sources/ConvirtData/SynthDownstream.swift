// `convirt synth chexpert|rsna|covidx|mura`: synthetic copies of the paper's downstream datasets in their
// released layouts (file names, CSV headers, directories; JPEG for CheXpert, DICOM with JPEG baseline
// inside for RSNA, PNG for COVIDx and MURA), with images drawn by `ChestRenderer` so that the labels are
// visible: CheXpert's labels are the rendered findings (with uncertain and blank values in train.csv);
// RSNA's Target is a rendered consolidation, boxed at its side; COVIDx's COVID-19 is bilateral lower-zone
// consolidation with haziness, its pneumonia a unilateral consolidation, normal nothing; a MURA study is
// abnormal when its images show a fracture or another finding (the renderer draws chests, not bones).
// `synth chexpert` also writes the CheXpert 8x200 retrieval files. Deterministic for a seed.

import ConvirtCore
import ConvirtIO
import Foundation

extension CheXpertLabels {
    /// The 14 labels in the column order of CheXpert's train.csv and valid.csv.
    public static let chexpertFileOrder = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                                           "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                                           "Fracture", "Support Devices"]
    /// The header of CheXpert's train.csv and valid.csv.
    public static let chexpertHeader = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + chexpertFileOrder
}

public struct SynthDownstreamOptions: Sendable {
    /// chexpert: training images (valid.csv gets count/6, at least 8); rsna: patients (= images);
    /// covidx: training images (test.txt gets count/4, at least 6); mura: training studies (the valid
    /// set gets count/4, at least 4). nil: `defaultCount`. With `labelsCSV`: at most this many rows.
    public var count: Int? = nil
    public var seed: UInt64 = 0
    /// Width of the rendered images (heights vary around it as in each dataset; RSNA is square).
    public var imageSize = 256
    public var quality = 90
    /// chexpert: render one image per row of this CheXpert-format CSV (or 8x200 query CSV) at its Path.
    public var labelsCSV: String? = nil
    /// chexpert: where the 8x200 retrieval files go (default OUT/chexpert_8x200); `writeRetrieval` false: none.
    public var retrievalDirectory: String? = nil
    public var writeRetrieval = true
    /// chexpert: candidates and image/text queries per retrieval category (the released set has 200 candidates).
    public var retrievalCandidates = 25
    public var retrievalImageQueries = 5
    public var retrievalTextQueries = 5
    /// covidx: positive/negative labels (COVIDx 9 and later) instead of normal/pneumonia/COVID-19.
    public var covidxBinary = false
    public init() {}

    /// chexpert 600 (+100 valid), rsna 500, covidx 400 (+100 test), mura 400 studies (+100 valid).
    public static func defaultCount(_ dataset: DownstreamDataset) -> Int {
        switch dataset {
        case .chexpert: return 600
        case .rsna: return 500
        case .covidx: return 400
        case .mura: return 400
        }
    }
}

public struct SynthDownstreamSummary: Sendable {
    /// The directory to pass as `DownstreamReader.load(root:)`.
    public var root: String
    /// Images written, by split ("train", "valid", "test", "retrieval", "labels").
    public var images: [String: Int]
    /// The 8x200 retrieval directory, when written.
    public var retrieval: String?
}

public enum SynthDownstream {
    /// Writes `dataset` under `out`. `progress(done, total)` is called as images are written.
    @discardableResult
    public static func write(_ dataset: DownstreamDataset, to out: String, options o: SynthDownstreamOptions,
                             progress: (@Sendable (Int, Int) -> Void)? = nil) throws -> SynthDownstreamSummary {
        try require(o.imageSize >= 32, "synth \(dataset.rawValue)", "--image-size must be at least 32, not \(o.imageSize)")
        try require((o.count ?? 1) > 0, "synth \(dataset.rawValue)", "--count must be positive")
        let out = DownstreamReader.absolutePath(out)
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        switch dataset {
        case .chexpert:
            if let labels = o.labelsCSV { return try chexpertFromLabels(labels, out: out, options: o, progress: progress) }
            return try chexpert(out: out, options: o, progress: progress)
        case .rsna: return try rsna(out: out, options: o, progress: progress)
        case .covidx: return try covidx(out: out, options: o, progress: progress)
        case .mura: return try mura(out: out, options: o, progress: progress)
        }
    }

    // MARK: - Rendering

    /// One image to render and write.
    struct RenderJob: Sendable {
        enum Format: Sendable { case jpeg, png, dicom(patientID: String, instanceUID: String) }
        var path: String
        /// Rendered one by one with the same stream (same anatomy and noise) and merged by the pixel-wise
        /// maximum: how findings on both sides (which `Findings` holds one of) are drawn.
        var findings: [Findings]
        var lateral = false
        var width: Int
        var height: Int
        var stream: RandomStream
        var format: Format
    }

    static func render(_ jobs: [RenderJob], quality: Int, progress: (@Sendable (Int, Int) -> Void)?) throws {
        final class Shared: @unchecked Sendable {
            let lock = NSLock()
            var done = 0
            var errors: [String] = []
        }
        let shared = Shared()
        DispatchQueue.concurrentPerform(iterations: jobs.count) { k in
            let job = jobs[k]
            do {
                var pixels = ChestRenderer.render(width: job.width, height: job.height, findings: job.findings.first ?? Findings(),
                                                  lateral: job.lateral, stream: job.stream)
                for extra in job.findings.dropFirst() {
                    let more = ChestRenderer.render(width: job.width, height: job.height, findings: extra, lateral: job.lateral, stream: job.stream)
                    for i in pixels.indices { pixels[i] = max(pixels[i], more[i]) }
                }
                let image = GrayImage(width: job.width, height: job.height, pixels: pixels)
                let data: Data
                switch job.format {
                case .jpeg: data = try JPEG.encode(image, quality: quality)
                case .png: data = try PNG.encode(image)
                case .dicom(let patientID, let uid):
                    data = try DICOM.encodeJPEGBaseline(image, quality: quality, patientID: patientID, sopInstanceUID: uid)
                }
                try Files.writeAtomically(data, to: job.path)
                shared.lock.lock()
                shared.done += 1
                let done = shared.done
                shared.lock.unlock()
                progress?(done, jobs.count)
            } catch {
                shared.lock.lock(); shared.errors.append("\(error)"); shared.lock.unlock()
            }
        }
        if let first = shared.errors.first { throw ConvirtError("synth: \(first)\(shared.errors.count > 1 ? " (and \(shared.errors.count - 1) more)" : "")") }
    }

    static func writeText(_ text: String, to path: String) throws { try Files.writeAtomically(Data(text.utf8), to: path) }

    static func pick<T>(_ options: [T], _ s: RandomStream, _ i: UInt64) -> T { options[s.integer(below: options.count, at: i)] }

    static func side(_ s: RandomStream, _ i: UInt64) -> Side { s.uniformDouble(at: i) < 0.5 ? .left : .right }

    // MARK: - CheXpert

    /// A label value as CheXpert writes it: "1.0", "0.0", "-1.0" or blank.
    static func chexpertValue(_ v: Double?) -> String { v.map { String(format: "%.1f", $0) } ?? "" }

    /// The 14 labels (0/1, as valid.csv) of what an image shows.
    static func labels(of f: Findings) -> [String: Double] {
        var l = Dictionary(uniqueKeysWithValues: CheXpertLabels.names.map { ($0, 0.0) })
        if f.isNormal { l["No Finding"] = 1 }
        if f.cardiomegaly { l["Cardiomegaly"] = 1; l["Enlarged Cardiomediastinum"] = 1 }
        if f.effusion != nil { l["Pleural Effusion"] = 1 }
        if f.pneumothorax != nil { l["Pneumothorax"] = 1 }
        if f.consolidation != nil { l["Consolidation"] = 1; l["Pneumonia"] = 1 }
        if f.edema != nil { l["Edema"] = 1 }
        if f.atelectasis != nil { l["Atelectasis"] = 1 }
        if f.consolidation != nil || f.edema != nil || f.atelectasis != nil { l["Lung Opacity"] = 1 }
        if f.fracture != nil { l["Fracture"] = 1 }
        if f.devices { l["Support Devices"] = 1 }
        return l
    }

    /// The findings that show `category` of the 8x200 set alone.
    static func findings(showing category: String, _ s: RandomStream) -> Findings {
        var f = Findings()
        switch category {
        case "Fracture": f.fracture = side(s, 1)
        case "Edema": f.edema = pick(Severity.allCases, s, 2)
        case "Pneumonia": f.consolidation = (side(s, 1), s.uniformDouble(at: 3) < 0.4)
        case "Cardiomegaly": f.cardiomegaly = true
        case "Pneumothorax": f.pneumothorax = (side(s, 1), pick(Severity.allCases, s, 2))
        case "Atelectasis": f.atelectasis = side(s, 1)
        case "Pleural Effusion": f.effusion = (side(s, 1), pick(Severity.allCases, s, 2))
        default: break
        }
        return f
    }

    /// A report-like sentence about `category`, in the phrasings of `ReportWriter`.
    static func sentence(about category: String, _ s: RandomStream, _ i: UInt64) -> String {
        let k = 16 * i
        let sd = pick(["left", "right"], s, k + 1), sev = pick(["small", "moderate", "large"], s, k + 2)
        let edema = pick(["mild", "moderate", "severe"], s, k + 3), lobe = "\(sd) \(pick(["upper", "lower"], s, k + 4)) lobe"
        func cap(_ t: String) -> String { t.prefix(1).uppercased() + t.dropFirst() }
        let options: [String]
        switch category {
        case "Atelectasis":
            options = ["Plate-like atelectasis at the \(sd) lung base.", "There is \(sd) basilar atelectasis.",
                       "Linear opacity at the \(sd) base likely reflects atelectasis.", "\(cap(sd)) basilar atelectasis."]
        case "Cardiomegaly":
            options = ["The heart is enlarged.", "There is cardiomegaly.", "Moderate enlargement of the cardiac silhouette.",
                       "The cardiac silhouette is enlarged.", "Cardiomegaly.", "Enlarged heart."]
        case "Edema":
            options = ["There is \(edema) pulmonary edema.", "\(cap(edema)) interstitial edema is present.",
                       "Perihilar haziness consistent with \(edema) pulmonary edema.", "\(cap(edema)) pulmonary edema."]
        case "Fracture":
            options = ["There is a displaced \(sd) rib fracture.", "A fracture of a \(sd) lateral rib is seen.", "\(cap(sd)) rib fracture."]
        case "No Finding":
            options = ["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.", "Normal chest radiograph.", "The lungs are clear."]
        case "Pleural Effusion":
            options = ["There is a \(sev) \(sd) pleural effusion.", "\(cap(sev)) \(sd) pleural effusion is present.",
                       "A \(sev) \(sd)-sided pleural effusion is seen.", "\(cap(sd)) pleural effusion, \(sev)."]
        case "Pneumonia":
            options = ["Focal opacity in the \(lobe) concerning for pneumonia.", "\(cap(lobe)) pneumonia.",
                       "\(cap(lobe)) consolidation, likely pneumonia.", "There is consolidation in the \(lobe)."]
        case "Pneumothorax":
            options = ["There is a \(sev) \(sd) apical pneumothorax.", "A \(sev) \(sd) pneumothorax is present.",
                       "\(cap(sd)) pneumothorax, \(sev) in size, is noted."]
        default:
            options = ["\(cap(category.lowercased()))."]
        }
        return pick(options, s, k + 5)
    }

    /// A CheXpert row: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 labels in file order (blank
    /// when absent from `labels`).
    static func chexpertRow(path: String, sex: String, age: Int, lateral: Bool, ap: Bool, labels: [String: Double]) -> [String] {
        [path, sex, String(age), lateral ? "Lateral" : "Frontal", lateral ? "" : (ap ? "AP" : "PA")]
            + CheXpertLabels.chexpertFileOrder.map { chexpertValue(labels[$0]) }
    }

    static func chexpert(out: String, options o: SynthDownstreamOptions, progress: (@Sendable (Int, Int) -> Void)?) throws -> SynthDownstreamSummary {
        let name = "CheXpert-v1.0-small"
        let dir = "\(out)/\(name)"
        let trainCount = o.count ?? SynthDownstreamOptions.defaultCount(.chexpert)
        let validCount = max(8, trainCount / 6)
        let reportSeed = mix64(o.seed ^ 0xC4E7_0001)
        var jobs: [RenderJob] = []
        func height(_ s: RandomStream, _ i: UInt64) -> Int { Int(Double(o.imageSize) * (1.1 + 0.15 * s.uniformDouble(at: i))) }
        func job(_ relative: String, _ f: Findings, lateral: Bool, _ s: RandomStream) -> RenderJob {
            RenderJob(path: "\(out)/\(relative)", findings: [f], lateral: lateral, width: o.imageSize, height: height(s, 9), stream: s.child(1), format: .jpeg)
        }
        // Training patients: 1-3 studies, a frontal view each and sometimes a lateral one; labels as a
        // report labeler would give them (blank when not mentioned, -1 when hedged).
        var train = csvLine(CheXpertLabels.chexpertHeader)
        var images = 0, study = 0, patient = 0
        while images < trainCount {
            patient += 1
            let p = RandomStream(seed: o.seed, .synthCheXpert, 1, UInt64(patient))
            let sex = p.uniformDouble(at: 0) < 0.5 ? "Female" : "Male", age = 18 + p.integer(below: 72, at: 1)
            let studies = 1 + (p.uniformDouble(at: 2) < 0.35 ? 1 : 0) + (p.uniformDouble(at: 3) < 0.1 ? 1 : 0)
            for k in 1...studies where images < trainCount {
                let s = RandomStream(seed: o.seed, .synthCheXpert, 2, UInt64(study))
                let written = ReportWriter.study(seed: reportSeed, index: study)
                study += 1
                var labels = written.labels.compactMapValues { $0 }  // absent = not mentioned = blank
                for (j, label) in CheXpertLabels.names.enumerated() where label != "No Finding" {
                    let u = s.uniformDouble(at: 100 + UInt64(j))
                    if (labels[label] == 1 && u < 0.08) || (labels[label] == nil && u < 0.02) { labels[label] = -1 }
                }
                let ap = s.uniformDouble(at: 0) < 0.7
                let views = images + 1 < trainCount && s.uniformDouble(at: 1) < 0.15 ? [false, true] : [false]
                for (v, lateral) in views.enumerated() {
                    let relative = "\(name)/train/patient\(String(format: "%05d", patient))/study\(k)/view\(v + 1)_\(lateral ? "lateral" : "frontal").jpg"
                    jobs.append(job(relative, written.findings, lateral: lateral, s.child(UInt64(v))))
                    train += csvLine(chexpertRow(path: relative, sex: sex, age: age, lateral: lateral, ap: ap, labels: labels))
                    images += 1
                }
            }
        }
        // Validation (the official valid set): one study per patient, labels by consensus (0/1, no blanks).
        var valid = csvLine(CheXpertLabels.chexpertHeader)
        var validImages = 0, v = 0
        while validImages < validCount {
            let s = RandomStream(seed: o.seed, .synthCheXpert, 3, UInt64(v))
            let written = ReportWriter.study(seed: reportSeed ^ 0x7A11, index: v)
            let patientName = "patient\(String(format: "%05d", 64_541 + v))"
            v += 1
            let views = validImages + 1 < validCount && s.uniformDouble(at: 1) < 0.15 ? [false, true] : [false]
            let labels = self.labels(of: written.findings)
            for (k, lateral) in views.enumerated() {
                let relative = "\(name)/valid/\(patientName)/study1/view\(k + 1)_\(lateral ? "lateral" : "frontal").jpg"
                jobs.append(job(relative, written.findings, lateral: lateral, s.child(UInt64(k))))
                valid += csvLine(chexpertRow(path: relative, sex: s.uniformDouble(at: 2) < 0.5 ? "Female" : "Male", age: 18 + s.integer(below: 72, at: 3),
                                             lateral: lateral, ap: s.uniformDouble(at: 0) < 0.7, labels: labels))
                validImages += 1
            }
        }
        // The 8x200 retrieval set: further training patients, each a frontal image positive for one
        // category alone (as the authors drew them from the training set), split into queries and candidates.
        var retrievalImages = 0
        var retrieval: String? = nil
        if o.writeRetrieval {
            let perCategory = o.retrievalImageQueries + o.retrievalCandidates
            try require(o.retrievalCandidates > 0 && o.retrievalImageQueries > 0 && o.retrievalTextQueries > 0, "synth chexpert",
                        "retrieval candidates and queries per category must be positive")
            var candidates = csvLine(CheXpertLabels.chexpertHeader)
            var imageQueries = csvLine(["Variable", "Path"]), textQueries = csvLine(["Variable", "Text"])
            for (c, category) in Retrieval8x200.categories.enumerated() {
                for k in 0..<perCategory {
                    patient += 1
                    let s = RandomStream(seed: o.seed, .synthCheXpert, 4, UInt64(c), UInt64(k))
                    let f = findings(showing: category, s.child(7))
                    let relative = "\(name)/train/patient\(String(format: "%05d", patient))/study1/view1_frontal.jpg"
                    jobs.append(job(relative, f, lateral: false, s.child(0)))
                    // train.csv leaves most other labels blank; the released candidate.csv has them as 0.0.
                    var labels: [String: Double] = [:]
                    for (j, label) in CheXpertLabels.names.enumerated() {
                        if label == category { labels[label] = 1 } else if s.uniformDouble(at: 20 + UInt64(j)) < 0.3 { labels[label] = 0 }
                    }
                    let sex = s.uniformDouble(at: 2) < 0.5 ? "Female" : "Male", age = 18 + s.integer(below: 72, at: 3), ap = s.uniformDouble(at: 0) < 0.7
                    train += csvLine(chexpertRow(path: relative, sex: sex, age: age, lateral: false, ap: ap, labels: labels))
                    if k < o.retrievalImageQueries {
                        imageQueries += csvLine([category, relative])
                    } else {
                        for label in CheXpertLabels.names where labels[label] == nil { labels[label] = 0 }
                        candidates += csvLine(chexpertRow(path: relative, sex: sex, age: age, lateral: false, ap: ap, labels: labels))
                    }
                    retrievalImages += 1
                }
                var sentences: [String] = []
                let s = RandomStream(seed: o.seed, .synthCheXpert, 5, UInt64(c))
                for i in 0..<64 where sentences.count < o.retrievalTextQueries {
                    let text = sentence(about: category, s, UInt64(i))
                    if !sentences.contains(text) { sentences.append(text) }
                }
                for text in sentences { textQueries += csvLine([category, text]) }
            }
            let rdir = DownstreamReader.absolutePath(o.retrievalDirectory ?? "\(out)/chexpert_8x200")
            try writeText(candidates, to: "\(rdir)/image-retrieval/candidate.csv")
            try writeText(imageQueries, to: "\(rdir)/image-retrieval/query.csv")
            try writeText(candidates, to: "\(rdir)/text-retrieval/candidate.csv")
            try writeText(textQueries, to: "\(rdir)/text-retrieval/query.csv")
            retrieval = rdir
        }
        try render(jobs, quality: o.quality, progress: progress)
        try writeText(train, to: "\(dir)/train.csv")
        try writeText(valid, to: "\(dir)/valid.csv")
        return SynthDownstreamSummary(root: dir, images: ["train": images, "valid": validImages, "retrieval": retrievalImages], retrieval: retrieval)
    }

    /// One image per row of a CheXpert-format CSV (or an 8x200 query CSV, `Variable,Path`) at `out/<Path>`,
    /// showing the row's positive labels (an uncertain label is drawn half of the time). A CheXpert-format
    /// CSV is copied into the images' dataset directory (`out/CheXpert-v1.0/train.csv`) when none is there.
    static func chexpertFromLabels(_ csv: String, out: String, options o: SynthDownstreamOptions,
                                   progress: (@Sendable (Int, Int) -> Void)?) throws -> SynthDownstreamSummary {
        let table = try CSVTable(path: csv, required: ["Path"])
        let hasLabels = CheXpertLabels.names.contains { table.column($0) != nil }
        guard hasLabels || table.column("Variable") != nil else {
            throw ConvirtError("\(csv): neither CheXpert label columns (\(CheXpertLabels.chexpertFileOrder.joined(separator: ", "))) nor a Variable column")
        }
        var jobs: [RenderJob] = []
        var seen = Set<String>()
        var firstComponent: String? = nil
        for (row, line) in zip(table.rows, table.rowLines) {
            if let count = o.count, jobs.count >= count { break }
            let relative = table.value(row, "Path").trimmingCharacters(in: .whitespaces)
            guard !relative.isEmpty, !relative.hasPrefix("/"), !relative.split(separator: "/").contains("..") else {
                throw ConvirtError("\(csv) line \(line): Path \(relative.debugDescription) is not a relative path inside the output directory")
            }
            if !seen.insert(relative).inserted { continue }
            if firstComponent == nil { firstComponent = relative.split(separator: "/").count > 1 ? String(relative.split(separator: "/")[0]) : "" }
            let s = RandomStream(seed: o.seed, .synthCheXpert, 6, relative.hashValueStable)
            var f = Findings()
            if hasLabels {
                func present(_ label: String, _ i: UInt64) -> Bool {
                    guard let v = Double(table.value(row, label).trimmingCharacters(in: .whitespaces)) else { return false }
                    return v == 1 || (v == -1 && s.uniformDouble(at: 200 + i) < 0.5)
                }
                if present("Cardiomegaly", 0) { f.cardiomegaly = true }
                if present("Pleural Effusion", 1) { f.effusion = (side(s, 10), pick(Severity.allCases, s, 11)) }
                if present("Pneumothorax", 2) { f.pneumothorax = (side(s, 12), pick(Severity.allCases, s, 13)) }
                if present("Consolidation", 3) || present("Pneumonia", 4) { f.consolidation = (side(s, 14), s.uniformDouble(at: 15) < 0.4) }
                if present("Edema", 5) { f.edema = pick(Severity.allCases, s, 16) }
                if present("Atelectasis", 6) { f.atelectasis = side(s, 17) }
                if present("Fracture", 7) { f.fracture = side(s, 18) }
                if present("Support Devices", 8) { f.devices = true }
                if f.consolidation == nil && f.edema == nil && f.atelectasis == nil && present("Lung Opacity", 9) {
                    f.consolidation = (side(s, 14), s.uniformDouble(at: 15) < 0.4)
                }
            } else {
                f = findings(showing: table.value(row, "Variable").trimmingCharacters(in: .whitespaces), s.child(7))
            }
            let lateral = table.value(row, "Frontal/Lateral") == "Lateral" || relative.lowercased().contains("lateral")
            jobs.append(RenderJob(path: "\(out)/\(relative)", findings: [f], lateral: lateral, width: o.imageSize,
                                  height: Int(Double(o.imageSize) * (1.1 + 0.15 * s.uniformDouble(at: 9))), stream: s.child(1), format: .jpeg))
        }
        try render(jobs, quality: o.quality, progress: progress)
        var root = out
        if let first = firstComponent, !first.isEmpty {
            root = "\(out)/\(first)"
        }
        if hasLabels, root != out {
            let copy = "\(root)/\((csv as NSString).lastPathComponent)"
            if !DownstreamReader.exists(copy) { try Files.writeAtomically(Files.read(csv), to: copy) }
        }
        return SynthDownstreamSummary(root: root, images: ["labels": jobs.count], retrieval: nil)
    }

    // MARK: - RSNA Pneumonia

    /// A patientId in the RSNA form (a UUID).
    static func uuid(_ s: RandomStream) -> String {
        let hex = (0..<4).map { String(format: "%08x", s.uint32(at: UInt64($0))) }.joined()
        let c = Array(hex)
        return "\(String(c[0..<8]))-\(String(c[8..<12]))-4\(String(c[13..<16]))-\(String(c[16..<20]))-\(String(c[20..<32]))"
    }

    /// The box (x, y, width, height) around a rendered consolidation in a size x size image.
    static func consolidationBox(side: Side, upper: Bool, size: Int, _ s: RandomStream, _ i: UInt64) -> [String] {
        let S = Double(size)
        let cx = side == .right ? 0.2525 * S : 0.7475 * S  // the patient's right is on the image's left
        let cy = upper ? 0.356 * S : 0.601 * S
        let jitter = { (k: UInt64) in (s.uniformDouble(at: i + k) - 0.5) * 0.02 * S }
        let x = cx - 0.16 * S + jitter(0), y = cy - 0.1 * S + jitter(1), w = 0.32 * S + jitter(2), h = 0.2 * S + jitter(3)
        return [x, y, w, h].map { String(format: "%.1f", $0.rounded()) }
    }

    static func rsna(out: String, options o: SynthDownstreamOptions, progress: (@Sendable (Int, Int) -> Void)?) throws -> SynthDownstreamSummary {
        let count = o.count ?? SynthDownstreamOptions.defaultCount(.rsna)
        var labels = csvLine(["patientId", "x", "y", "width", "height", "Target"])
        var classes = csvLine(["patientId", "class"])
        var jobs: [RenderJob] = []
        for i in 0..<count {
            let s = RandomStream(seed: o.seed, .synthRSNA, UInt64(i))
            let id = uuid(s.child(1))
            var findings = [Findings()]
            var boxes: [[String]] = []
            var className = "Normal"
            if s.uniformDouble(at: 0) < 0.3 {
                // Pneumonia: a consolidation, on both sides in a third of the cases; one box per side.
                let first = side(s, 1), upper = s.uniformDouble(at: 2) < 0.4
                findings[0].consolidation = (first, upper)
                boxes.append(consolidationBox(side: first, upper: upper, size: o.imageSize, s, 10))
                if s.uniformDouble(at: 3) < 0.35 {
                    var other = Findings()
                    let second: Side = first == .left ? .right : .left, secondUpper = s.uniformDouble(at: 4) < 0.4
                    other.consolidation = (second, secondUpper)
                    findings.append(other)
                    boxes.append(consolidationBox(side: second, upper: secondUpper, size: o.imageSize, s, 20))
                }
                className = "Lung Opacity"
            } else if s.uniformDouble(at: 5) < 0.45 {
                // Not normal, but no lung opacity.
                switch s.integer(below: 4, at: 6) {
                case 0: findings[0].effusion = (side(s, 7), .small)
                case 1: findings[0].cardiomegaly = true
                case 2: findings[0].devices = true
                default: findings[0].fracture = side(s, 7)
                }
                className = "No Lung Opacity / Not Normal"
            }
            if boxes.isEmpty {
                labels += csvLine([id, "", "", "", "", "0"]); classes += csvLine([id, className])
            }
            for box in boxes { labels += csvLine([id] + box + ["1"]); classes += csvLine([id, className]) }
            jobs.append(RenderJob(path: "\(out)/stage_2_train_images/\(id).dcm", findings: findings, width: o.imageSize, height: o.imageSize,
                                  stream: s.child(2), format: .dicom(patientID: id, instanceUID: "2.25.\(mix64(o.seed ^ 0x4550_0000 ^ UInt64(i)))")))
        }
        try render(jobs, quality: o.quality, progress: progress)
        try writeText(labels, to: "\(out)/stage_2_train_labels.csv")
        try writeText(classes, to: "\(out)/stage_2_detailed_class_info.csv")
        return SynthDownstreamSummary(root: out, images: ["train": count], retrieval: nil)
    }

    // MARK: - COVIDx

    static func covidx(out: String, options o: SynthDownstreamOptions, progress: (@Sendable (Int, Int) -> Void)?) throws -> SynthDownstreamSummary {
        let trainCount = o.count ?? SynthDownstreamOptions.defaultCount(.covidx)
        let testCount = max(6, trainCount / 4)
        var jobs: [RenderJob] = []
        var counts: [String: Int] = [:]
        let sources = ["cohen", "fig1", "actmed", "sirm", "rsna", "ricord"]
        var patient = 0
        for (split, total) in [("train", trainCount), ("test", testCount)] {
            var list = "", images = 0
            while images < total {
                let s = RandomStream(seed: o.seed, .synthCOVIDx, UInt64(patient))
                let pid = String(format: "%08x", s.uint32(at: 0))
                // Classes in turn, so that every split holds all three.
                let cls = patient % 3
                patient += 1
                let label = o.covidxBinary ? (cls == 2 ? "positive" : "negative") : DownstreamReader.covidxClasses[cls]
                for k in 0..<(images + 1 < total && s.uniformDouble(at: 2) < 0.3 ? 2 : 1) {
                    var findings = [Findings()]
                    switch cls {
                    case 1:
                        findings[0].consolidation = (side(s, 3), s.uniformDouble(at: 4) < 0.4)
                    case 2:
                        // COVID-19: bilateral lower-zone consolidation with ground-glass haziness.
                        var left = Findings(), right = Findings()
                        left.consolidation = (.left, false); right.consolidation = (.right, false)
                        left.edema = .small; right.edema = .small
                        findings = [left, right]
                    default: break
                    }
                    let file = "\(pid)-\(k + 1).png"
                    let height = Int(Double(o.imageSize) * (0.95 + 0.3 * s.uniformDouble(at: 10 + UInt64(k))))
                    jobs.append(RenderJob(path: "\(out)/\(split)/\(file)", findings: findings, width: o.imageSize, height: height,
                                          stream: s.child(UInt64(k)), format: .png))
                    list += "\(pid) \(file) \(label) \(pick(sources, s, 5))\n"
                    images += 1
                }
            }
            counts[split] = images
            try writeText(list, to: "\(out)/\(split).txt")
        }
        try render(jobs, quality: o.quality, progress: progress)
        return SynthDownstreamSummary(root: out, images: counts, retrieval: nil)
    }

    // MARK: - MURA

    static let muraStudyTypes = ["XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST"]

    static func mura(out: String, options o: SynthDownstreamOptions, progress: (@Sendable (Int, Int) -> Void)?) throws -> SynthDownstreamSummary {
        let name = "MURA-v1.1"
        let dir = "\(out)/\(name)"
        let trainStudies = o.count ?? SynthDownstreamOptions.defaultCount(.mura)
        let validStudies = max(4, trainStudies / 4)
        var jobs: [RenderJob] = []
        var counts: [String: Int] = [:]
        for (split, total, firstPatient) in [("train", trainStudies, 1), ("valid", validStudies, 11_185)] {
            var paths = "", studies = "", written = 0, images = 0, p = 0
            while written < total {
                let patient = firstPatient + p
                p += 1
                let ps = RandomStream(seed: o.seed, .synthMURA, split == "train" ? 0 : 1, UInt64(patient))
                let part = pick(muraStudyTypes, ps, 0)
                for k in 1...(ps.uniformDouble(at: 1) < 0.3 ? 2 : 1) where written < total {
                    let s = ps.child(UInt64(k))
                    let abnormal = s.uniformDouble(at: 0) < 0.4
                    var f = Findings()
                    if abnormal {
                        // A fracture, alone or with another finding, or another finding alone.
                        switch s.integer(below: 5, at: 1) {
                        case 0: f.fracture = side(s, 2)
                        case 1: f.fracture = side(s, 2); f.effusion = (side(s, 3), .moderate)
                        case 2: f.consolidation = (side(s, 3), s.uniformDouble(at: 4) < 0.5)
                        case 3: f.pneumothorax = (side(s, 3), .large)
                        default: f.fracture = side(s, 2); f.cardiomegaly = true
                        }
                    }
                    let study = "\(name)/\(split)/\(part)/patient\(String(format: "%05d", patient))/study\(k)_\(abnormal ? "positive" : "negative")/"
                    studies += csvLine([study, abnormal ? "1" : "0"])
                    for image in 1...(1 + s.integer(below: 3, at: 5)) {
                        let relative = "\(study)image\(image).png"
                        let width = Int(Double(o.imageSize) * (0.75 + 0.25 * s.uniformDouble(at: 10 + UInt64(image))))
                        jobs.append(RenderJob(path: "\(out)/\(relative)", findings: [f], width: width, height: o.imageSize,
                                              stream: s.child(UInt64(image)), format: .png))
                        paths += csvLine([relative])
                        images += 1
                    }
                    written += 1
                }
            }
            counts[split] = images
            try writeText(paths, to: "\(dir)/\(split)_image_paths.csv")
            try writeText(studies, to: "\(dir)/\(split)_labeled_studies.csv")
        }
        try render(jobs, quality: o.quality, progress: progress)
        return SynthDownstreamSummary(root: dir, images: counts, retrieval: nil)
    }
}

extension String {
    /// A hash that is the same in every process (Swift's `hashValue` is seeded per process): FNV-1a.
    var hashValueStable: UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        return h
    }
}
