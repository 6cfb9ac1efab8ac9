// `convirt synth chexpert|rsna|covidx|mura`: synthetic copies of the paper's downstream datasets in their
// released layouts (file names, CSV headers, directories; JPEG for CheXpert, DICOM with JPEG baseline
// inside for RSNA, PNG for COVIDx and MURA), with images drawn by `ChestRenderer` so that the labels are
// visible: CheXpert's labels are the rendered findings (with uncertain and blank values in train.csv);
// RSNA's Target is a rendered consolidation, boxed at its side; COVIDx's COVID-19 is bilateral lower-zone
// consolidation with haziness, its pneumonia a unilateral consolidation, normal nothing; a MURA study is
// abnormal when its images show a fracture or another finding (the renderer draws chests, not bones).
// `synth chexpert` also writes the CheXpert 8x200 retrieval files, with text queries phrased as
// radiologists write them rather than as the pretraining reports do. At the calibrated difficulty (the
// default; `SynthDifficulty`) findings range from faint to obvious, normal variation mimics disease,
// the class balance is the real datasets' and a share of the labels is wrong. Deterministic for a seed.

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
    /// How hard the images and labels are: 0 draws every finding at full contrast with clean labels
    /// (the first milestone's datasets, where any encoder that learned anything reaches the ceiling);
    /// 1 (the default) is the calibrated setting: findings from faint to obvious, normal variation that
    /// mimics disease, and label noise at `SynthDifficulty`'s rates; above 1 fainter and noisier still.
    public var difficulty = 1.0
    public init() {}

    /// chexpert 4800 (+800 valid), rsna 2000 (about 200 in the test split), covidx 800 (+200 test), mura 800
    /// studies (+200 valid): test sets large enough that a result does not hang on a few images, and a 1%
    /// CheXpert split of 48 images rather than a dozen.
    public static func defaultCount(_ dataset: DownstreamDataset) -> Int {
        switch dataset {
        case .chexpert: return 4800
        case .rsna: return 2000
        case .covidx: return 800
        case .mura: return 800
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

/// The calibrated difficulty of the synthetic downstream datasets (see `SynthDownstreamOptions.difficulty`
/// and the calibration in tools/calibrate_synth.sh): how findings fade, how often normal variation mimics
/// disease, and how often a label is wrong.
public enum SynthDifficulty {
    /// The faintest finding at difficulty 1 (conspicuity is uniform over [faintest, 1]).
    public static let faintest = 0.15
    /// The share of normal and abnormal images with soft-tissue shadows, and their largest density.
    public static let softTissueShare = 0.5, softTissueDensity = 0.07
    /// Label noise at difficulty 1: the share of labels flipped (or, for COVIDx, swapped to another class).
    /// RSNA's boxes came from one reader per image with moderate agreement between readers; COVIDx's
    /// COVID-19 labels are PCR-confirmed and its other classes come from curated sets; MURA's labels are
    /// the reporting radiologist's; CheXpert's training labels come from a report labeler, its valid.csv
    /// from the consensus of three radiologists (clean).
    public static let labelNoise: [DownstreamDataset: Double] = [.rsna: 0.06, .covidx: 0.02, .mura: 0.08, .chexpert: 0.04]
    /// Class balance: RSNA's share of pneumonia (Target 1) patients and of "not normal" among the rest,
    /// COVIDx's shares of COVID-19 and pneumonia, MURA's share of abnormal studies.
    public static let rsnaPneumonia = 0.27, rsnaNotNormal = 0.6
    public static let covidxCOVID = 0.03, covidxPneumonia = 0.4
    public static let muraAbnormal = 0.63

    /// A finding's conspicuity for draw `u` in [0, 1) at `difficulty`: 1 at difficulty 0, uniform over
    /// [faintest, 1] at 1, and at least 0.05.
    public static func conspicuity(_ u: Double, difficulty: Double, faintest: Double = faintest) -> Float {
        let real = faintest + (1 - faintest) * u
        return Float(max(0.05, min(1, 1 - difficulty * (1 - real))))
    }
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

    /// Draws `f`'s conspicuity and soft-tissue shadows at the options' difficulty from draws i and i + 1, i + 2
    /// (the same draws for every finding of an image, so that they fade together).
    static func vary(_ f: Findings, _ s: RandomStream, _ i: UInt64, _ o: SynthDownstreamOptions,
                     faintest: Double = SynthDifficulty.faintest) -> Findings {
        var f = f
        f.conspicuity = SynthDifficulty.conspicuity(s.uniformDouble(at: i), difficulty: o.difficulty, faintest: faintest)
        if s.uniformDouble(at: i + 1) < SynthDifficulty.softTissueShare {
            f.softTissue = Float(min(0.15, o.difficulty * SynthDifficulty.softTissueDensity * (0.3 + 0.7 * s.uniformDouble(at: i + 2))))
        }
        return f
    }

    /// Whether draw i flips a label of `dataset` at the options' difficulty.
    static func mislabeled(_ dataset: DownstreamDataset, _ s: RandomStream, _ i: UInt64, _ o: SynthDownstreamOptions) -> Bool {
        s.uniformDouble(at: i) < min(0.5, o.difficulty * (SynthDifficulty.labelNoise[dataset] ?? 0))
    }

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

    /// A text query about `category` as a radiologist would write it: phrasings, word orders and hedges
    /// that `ReportWriter` never uses (so the queries are not copies of the pretraining sentences), with the
    /// side, severity and lobe drawn from `s`.
    public static func radiologistQuery(about category: String, _ s: RandomStream, _ i: UInt64) -> String {
        let k = 16 * i
        let sd = pick(["left", "right"], s, k + 1), sev = pick(["small", "moderate", "large"], s, k + 2)
        let edema = pick(["mild", "moderate", "severe"], s, k + 3), zone = pick(["upper", "lower"], s, k + 4)
        func cap(_ t: String) -> String { t.prefix(1).uppercased() + t.dropFirst() }
        let options: [String]
        switch category {
        case "Atelectasis":
            options = ["Subsegmental atelectasis at the \(sd) base.", "Streaky \(sd) basilar opacity, most likely atelectasis.",
                       "Minimal \(sd) lower lobe atelectasis.", "Atelectasis is noted at the \(sd) lung base."]
        case "Cardiomegaly":
            options = ["Mild cardiomegaly.", "The heart size is enlarged.", "Stable cardiomegaly.",
                       "Enlarged cardiac silhouette.", "Enlargement of the heart is noted."]
        case "Edema":
            options = ["\(cap(edema)) pulmonary vascular congestion with interstitial edema.", "Findings are consistent with \(edema) pulmonary edema.",
                       "Pulmonary edema, \(edema).", "Interstitial edema is noted, \(edema)."]
        case "Fracture":
            options = ["Acute fracture of a \(sd) rib.", "\(cap(sd)) lateral rib fracture is noted.", "Displaced fracture of the \(sd) rib."]
        case "No Finding":
            options = ["No acute cardiopulmonary abnormality.", "The lungs are clear without effusion or pneumothorax.",
                       "Heart size is normal and the lungs are clear.", "No acute process in the chest."]
        case "Pleural Effusion":
            options = ["\(cap(sd))-sided pleural effusion, \(sev).", "Pleural effusion on the \(sd), \(sev) in size.",
                       "\(cap(sev)) effusion at the \(sd) base.", "Blunting of the \(sd) costophrenic angle from a \(sev) pleural effusion."]
        case "Pneumonia":
            options = ["\(cap(sd)) \(zone) lobe opacity, concerning for pneumonia.", "Consolidation at the \(sd) \(zone) lobe, compatible with pneumonia.",
                       "Airspace opacity in the \(sd) \(zone) lobe, likely pneumonia.", "Pneumonia in the \(sd) \(zone) lobe."]
        case "Pneumothorax":
            options = ["\(cap(sev)) \(sd) apical pneumothorax is noted.", "Pneumothorax on the \(sd), \(sev).",
                       "\(cap(sd))-sided pneumothorax, \(sev) in size.", "There is a \(sev) pneumothorax on the \(sd)."]
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
                    // the labeler's errors: a definite label read the wrong way
                    if let v = labels[label], v != -1, mislabeled(.chexpert, s, 120 + UInt64(j), o) { labels[label] = 1 - v }
                }
                let shown = vary(written.findings, s, 200, o)
                let ap = s.uniformDouble(at: 0) < 0.7
                let views = images + 1 < trainCount && s.uniformDouble(at: 1) < 0.15 ? [false, true] : [false]
                for (v, lateral) in views.enumerated() {
                    let relative = "\(name)/train/patient\(String(format: "%05d", patient))/study\(k)/view\(v + 1)_\(lateral ? "lateral" : "frontal").jpg"
                    jobs.append(job(relative, shown, lateral: lateral, s.child(UInt64(v))))
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
            let shown = vary(written.findings, s, 200, o)
            for (k, lateral) in views.enumerated() {
                let relative = "\(name)/valid/\(patientName)/study1/view\(k + 1)_\(lateral ? "lateral" : "frontal").jpg"
                jobs.append(job(relative, shown, lateral: lateral, s.child(UInt64(k))))
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
                    // clear examples (the authors chose images positive for one category alone): never the faintest
                    let f = vary(findings(showing: category, s.child(7)), s, 200, o, faintest: 0.5)
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
                    let text = radiologistQuery(about: category, s, UInt64(i))
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
            f = vary(f, s, 300, o)
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
            var upper: [Side: Bool] = [:]
            var className = "Normal"
            let pneumonia = s.uniformDouble(at: 0) < SynthDifficulty.rsnaPneumonia
            if pneumonia {
                // Pneumonia: a consolidation, on both sides in a third of the cases.
                let first = side(s, 1)
                upper[first] = s.uniformDouble(at: 2) < 0.4
                findings[0].consolidation = (first, upper[first]!)
                if s.uniformDouble(at: 3) < 0.35 {
                    var other = Findings()
                    let second: Side = first == .left ? .right : .left
                    upper[second] = s.uniformDouble(at: 4) < 0.4
                    other.consolidation = (second, upper[second]!)
                    findings.append(other)
                }
                className = "Lung Opacity"
            } else if s.uniformDouble(at: 5) < SynthDifficulty.rsnaNotNormal {
                // Not normal, but no lung opacity.
                switch s.integer(below: 5, at: 6) {
                case 0: findings[0].effusion = (side(s, 7), .small)
                case 1: findings[0].cardiomegaly = true
                case 2: findings[0].devices = true
                case 3: findings[0].atelectasis = side(s, 7)
                default: findings[0].fracture = side(s, 7)
                }
                className = "No Lung Opacity / Not Normal"
            }
            findings = findings.map { vary($0, s, 40, o) }
            // The reader's label: wrong for a share of the patients (a missed faint opacity boxed as
            // normal, or a soft-tissue shadow or atelectasis boxed as pneumonia, on a random side).
            var target = pneumonia
            if mislabeled(.rsna, s, 8, o) {
                target.toggle()
                if target {
                    let boxed = side(s, 9)
                    upper = [boxed: s.uniformDouble(at: 11) < 0.4]
                    className = "Lung Opacity"
                } else {
                    upper = [:]
                    className = s.uniformDouble(at: 12) < 0.5 ? "Normal" : "No Lung Opacity / Not Normal"
                }
            }
            let boxes = Side.allCases.compactMap { sd in
                upper[sd].map { consolidationBox(side: sd, upper: $0, size: o.imageSize, s, sd == .left ? 10 : 20) }
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
            var list = "", images = 0, inSplit = 0
            while images < total {
                let s = RandomStream(seed: o.seed, .synthCOVIDx, UInt64(patient))
                let pid = String(format: "%08x", s.uint32(at: 0))
                // The class balance of COVIDx (a few percent COVID-19: every 33rd patient), after one
                // patient of each class first, so that every split holds all three.
                let cls: Int
                if inSplit < 3 { cls = inSplit }
                else if inSplit % 33 == 16 { cls = 2 }
                else { cls = s.uniformDouble(at: 1) < SynthDifficulty.covidxPneumonia / (1 - SynthDifficulty.covidxCOVID) ? 1 : 0 }
                patient += 1
                inSplit += 1
                // The label: another class for a share of the patients.
                let labelled = mislabeled(.covidx, s, 6, o) ? (cls + 1 + s.integer(below: 2, at: 7)) % 3 : cls
                let label = o.covidxBinary ? (labelled == 2 ? "positive" : "negative") : DownstreamReader.covidxClasses[labelled]
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
                    findings = findings.map { vary($0, s, 20 + 4 * UInt64(k), o) }
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
                    let abnormal = s.uniformDouble(at: 0) < SynthDifficulty.muraAbnormal
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
                    f = vary(f, s, 30, o)
                    // The label (and the study's directory name): the reporting radiologist's, wrong for a share.
                    let labelled = abnormal != mislabeled(.mura, s, 33, o)
                    let study = "\(name)/\(split)/\(part)/patient\(String(format: "%05d", patient))/study\(k)_\(labelled ? "positive" : "negative")/"
                    studies += csvLine([study, labelled ? "1" : "0"])
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
