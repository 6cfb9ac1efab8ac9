// `convirt synth mimic`: a synthetic MIMIC-CXR-JPG laid out exactly as PhysioNet ships it (files/pXX/
// pSUBJECT/sSTUDY/DICOM_ID.jpg, reports files/pXX/pSUBJECT/sSTUDY.txt, the metadata, split and CheXpert
// label CSVs, gzip-compressed), whose reports describe what the images show: findings with laterality
// and severity in several phrasings, negations, uncertain mentions and irrelevant sentences, so that only
// a model that both reads and looks can align them. Deterministic for a seed.

import ConvirtCore
import ConvirtIO
import ConvirtText
import Foundation

public enum CheXpertLabels {
    /// The 14 labels, in the column order of the CheXpert / MIMIC-CXR label files.
    public static let names = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                               "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                               "Pneumothorax", "Support Devices"]
}

/// One synthetic study: its findings, report and label values (1, 0, -1, or nil = not mentioned).
public struct SynthStudy: Sendable {
    public var findings: Findings
    public var report: String
    public var labels: [String: Double?]
}

public enum ReportWriter {
    static func pick<T>(_ options: [T], _ stream: RandomStream, _ i: UInt64) -> T { options[stream.integer(below: options.count, at: i)] }

    static func severityWord(_ s: Severity, edema: Bool = false) -> String {
        if edema { return s == .small ? "mild" : (s == .moderate ? "moderate" : "severe") }
        return s.rawValue
    }

    /// Draws findings and writes the report and labels of study `index`.
    public static func study(seed: UInt64, index: Int) -> SynthStudy {
        let s = RandomStream(seed: seed, .synthStudy, UInt64(index))
        var f = Findings()
        func chance(_ p: Double, _ i: UInt64) -> Bool { s.uniformDouble(at: i) < p }
        func side(_ i: UInt64) -> Side { chance(0.5, i) ? .left : .right }
        func severity(_ i: UInt64) -> Severity { pick(Severity.allCases, s, i) }
        if chance(0.22, 1) { f.cardiomegaly = true }
        if chance(0.25, 2) { f.effusion = (side(3), severity(4)) }
        if chance(0.1, 5) { f.pneumothorax = (side(6), severity(7)) }
        if chance(0.16, 8) { f.consolidation = (side(9), chance(0.4, 10)) }
        if chance(0.14, 11) { f.edema = severity(12) }
        if chance(0.18, 13) { f.atelectasis = side(14) }
        if chance(0.05, 15) { f.fracture = side(16) }
        if chance(0.2, 17) { f.devices = true }
        let uncertain = chance(0.08, 18)
        var findings: [String] = [], impression: [String] = []
        var labels: [String: Double?] = Dictionary(uniqueKeysWithValues: CheXpertLabels.names.map { ($0, nil) })
        var k: UInt64 = 100
        func say(_ options: [String]) -> String { k += 1; return pick(options, s, k) }
        func cap(_ t: String) -> String { t.prefix(1).uppercased() + t.dropFirst() }
        if let e = f.effusion {
            let sev = severityWord(e.severity), sd = e.side.rawValue
            let hedge = uncertain && e.severity == .small
            findings.append(hedge ? say(["Possible \(sev) \(sd) pleural effusion.", "A \(sev) \(sd) pleural effusion cannot be excluded."])
                : say(["There is a \(sev) \(sd) pleural effusion.", "\(cap(sev)) \(sd) pleural effusion is present.",
                       "A \(sev) \(sd)-sided pleural effusion is seen.", "Blunting of the \(sd) costophrenic angle consistent with a \(sev) effusion."]))
            impression.append(say(["\(cap(sev)) \(sd) pleural effusion.", "\(cap(sd)) pleural effusion, \(sev)."]))
            labels["Pleural Effusion"] = hedge ? -1.0 : 1.0
        } else if chance(0.5, 20) {
            findings.append(say(["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen.", "The costophrenic angles are sharp."]))
            labels["Pleural Effusion"] = 0.0
        }
        if let p = f.pneumothorax {
            let sev = severityWord(p.severity), sd = p.side.rawValue
            findings.append(say(["There is a \(sev) \(sd) apical pneumothorax.", "A \(sev) \(sd) pneumothorax is present.",
                                 "\(cap(sd)) pneumothorax, \(sev) in size, is noted."]))
            impression.append(say(["\(cap(sev)) \(sd) pneumothorax.", "\(cap(sd)) pneumothorax."]))
            labels["Pneumothorax"] = 1.0
        } else if chance(0.6, 21) {
            findings.append(say(["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is identified."]))
            labels["Pneumothorax"] = 0.0
        }
        if f.cardiomegaly {
            findings.append(say(["The heart is enlarged.", "There is cardiomegaly.", "Moderate enlargement of the cardiac silhouette.",
                                 "The cardiac silhouette is enlarged."]))
            impression.append(say(["Cardiomegaly.", "Enlarged heart."]))
            labels["Cardiomegaly"] = 1.0
            labels["Enlarged Cardiomediastinum"] = 1.0
        } else if chance(0.6, 22) {
            findings.append(say(["The heart size is normal.", "Heart size is within normal limits.", "The cardiac silhouette is normal in size.",
                                 "Cardiomediastinal silhouette is normal."]))
            labels["Cardiomegaly"] = 0.0
        }
        if let c = f.consolidation {
            let lobe = "\(c.side.rawValue) \(c.upper ? "upper" : "lower") lobe"
            findings.append(say(["There is consolidation in the \(lobe).", "Focal opacity in the \(lobe) concerning for pneumonia.",
                                 "\(cap(lobe)) airspace consolidation is present."]))
            impression.append(say(["\(cap(lobe)) pneumonia.", "\(cap(lobe)) consolidation, likely pneumonia."]))
            labels["Consolidation"] = 1.0; labels["Pneumonia"] = 1.0; labels["Lung Opacity"] = 1.0
        } else if chance(0.5, 23) {
            findings.append(say(["No focal consolidation.", "There is no focal consolidation to suggest pneumonia.", "The lungs are clear."]))
            labels["Consolidation"] = 0.0; labels["Pneumonia"] = 0.0
        }
        if let e = f.edema {
            let sev = severityWord(e, edema: true)
            findings.append(say(["There is \(sev) pulmonary edema.", "\(cap(sev)) interstitial edema is present.",
                                 "Perihilar haziness consistent with \(sev) pulmonary edema."]))
            impression.append(say(["\(cap(sev)) pulmonary edema.", "\(cap(sev)) edema."]))
            labels["Edema"] = 1.0; labels["Lung Opacity"] = 1.0
        } else if chance(0.4, 24) {
            findings.append(say(["No pulmonary edema.", "There is no pulmonary vascular congestion."]))
            labels["Edema"] = 0.0
        }
        if let a = f.atelectasis {
            findings.append(say(["Plate-like atelectasis at the \(a.rawValue) lung base.", "There is \(a.rawValue) basilar atelectasis.",
                                 "Linear opacity at the \(a.rawValue) base likely reflects atelectasis."]))
            impression.append(say(["\(cap(a.rawValue)) basilar atelectasis."]))
            labels["Atelectasis"] = 1.0; labels["Lung Opacity"] = 1.0
        }
        if let fr = f.fracture {
            findings.append(say(["There is a displaced \(fr.rawValue) rib fracture.", "A fracture of a \(fr.rawValue) lateral rib is seen."]))
            impression.append(say(["\(cap(fr.rawValue)) rib fracture."]))
            labels["Fracture"] = 1.0
        } else if chance(0.3, 25) {
            findings.append(say(["No acute osseous abnormality.", "No displaced rib fracture is seen."]))
            labels["Fracture"] = 0.0
        }
        if f.devices {
            findings.append(say(["An endotracheal tube terminates above the carina.", "Endotracheal tube and nasogastric tube are in place."]))
            findings.append(say(["A left chest wall pacemaker is present with lead in the right ventricle.", "Pacemaker leads are in standard position."]))
            impression.append(say(["Support devices in standard position.", "Lines and tubes as described."]))
            labels["Support Devices"] = 1.0
        }
        // irrelevant sentences that carry no image information
        for j in 0..<s.integer(below: 3, at: 30) {
            findings.append(pick(["Comparison is made to the prior study.", "The patient is rotated slightly to the right.",
                                  "Degenerative changes of the thoracic spine are noted.", "The visualized upper abdomen is unremarkable.",
                                  "Surgical clips project over the upper abdomen.", "Technique is limited by patient body habitus."], s, 31 + UInt64(j)))
        }
        if f.isNormal {
            impression.append(say(["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.", "Normal chest radiograph."]))
            labels["No Finding"] = 1.0
        }
        // shuffle the finding sentences (deterministically)
        let order = s.child(40).permutation(findings.count)
        let body = order.map { findings[$0] }.joined(separator: " ")
        let indication = pick(["___-year-old with cough and fever.", "Shortness of breath.", "Evaluate for interval change.",
                               "History of heart failure, now with dyspnea.", "Status post line placement."], s, 50)
        let findingsHeader = pick(["FINDINGS:", "Findings:", "FINDINGS:"], s, 51)
        let impressionHeader = pick(["IMPRESSION:", "Impression:", "IMPRESSIONS:"], s, 52)
        let report = """
                                         FINAL REPORT
         EXAMINATION:  CHEST (PA AND LAT)

         INDICATION:  \(indication)

         TECHNIQUE:  Chest PA and lateral.

         COMPARISON:  \(pick(["None.", "Chest radiograph from ___."], s, 53))

         \(findingsHeader)

         \(body)

         \(impressionHeader)

         \(impression.joined(separator: " "))

        """
        return SynthStudy(findings: f, report: report, labels: labels)
    }
}

public struct SynthMIMICOptions: Sendable {
    public var studies = 2000
    public var imageSize = 512
    public var seed: UInt64 = 0
    public var quality = 90
    public init() {}
}

public enum SynthMIMIC {
    static func subjectID(_ index: Int) -> Int { 10_000_000 + index / 2 * 7 + 3 }  // about two studies per subject
    static func studyID(_ index: Int) -> Int { 50_000_000 + index * 13 + 1 }
    static func dicomID(_ seed: UInt64, _ index: Int, _ view: Int) -> String {
        let s = RandomStream(seed: seed, .synthDicomID, UInt64(index), UInt64(view))
        return (0..<5).map { String(format: "%08x", s.uint32(at: UInt64($0))) }.joined(separator: "-")
    }

    /// Writes the dataset under `out`; returns the number of images. `progress` is called per study.
    @discardableResult
    public static func write(to out: String, options o: SynthMIMICOptions, progress: (@Sendable (Int) -> Void)? = nil) throws -> Int {
        let fm = FileManager.default
        try fm.createDirectory(atPath: out, withIntermediateDirectories: true)
        struct Row: Sendable { var metadata: [String]; var split: [String] }
        final class Results: @unchecked Sendable {
            var rows: [[Row]]; var labels: [[String]]; var sentences: [[String]]; var errors: [String] = []; var done = 0
            let lock = NSLock()
            init(_ n: Int) { rows = Array(repeating: [], count: n); labels = Array(repeating: [], count: n); sentences = Array(repeating: [], count: n) }
        }
        let results = Results(o.studies)
        let counter = Results(0)
        DispatchQueue.concurrentPerform(iterations: o.studies) { i in
            do {
                let study = ReportWriter.study(seed: o.seed, index: i)
                let subject = subjectID(i), studyNumber = studyID(i)
                let prefix = "p\(String(subject).prefix(2))"
                let studyDir = "\(out)/files/\(prefix)/p\(subject)/s\(studyNumber)"
                try fm.createDirectory(atPath: studyDir, withIntermediateDirectories: true)
                try Data(study.report.utf8).write(to: URL(fileURLWithPath: "\(out)/files/\(prefix)/p\(subject)/s\(studyNumber).txt"))
                let s = RandomStream(seed: o.seed, .synthViews, UInt64(i))
                var views = ["PA"]
                if s.uniformDouble(at: 0) < 0.5 { views.append("LATERAL") }
                if s.uniformDouble(at: 1) < 0.1 { views.append("AP") }
                let split = subject % 20 == 0 ? "test" : (subject % 20 == 1 ? "validate" : "train")
                var rows: [Row] = []
                for (v, view) in views.enumerated() {
                    let dicom = dicomID(o.seed, i, v)
                    let width = o.imageSize, height = Int(Double(o.imageSize) * (1.1 + 0.15 * s.uniformDouble(at: 2 + UInt64(v))))
                    let pixels = ChestRenderer.render(width: width, height: height, findings: study.findings, lateral: view == "LATERAL",
                                                      stream: RandomStream(seed: o.seed, .synthRender, UInt64(i), UInt64(v)))
                    let jpeg = try JPEG.encode(GrayImage(width: width, height: height, pixels: pixels), quality: o.quality)
                    try jpeg.write(to: URL(fileURLWithPath: "\(studyDir)/\(dicom).jpg"))
                    let description = view == "LATERAL" ? "lateral" : (view == "AP" ? "antero-posterior" : "postero-anterior")
                    rows.append(Row(
                        metadata: [dicom, String(subject), String(studyNumber), "CHEST (PA AND LAT)", view, String(height), String(width),
                                   String(21_000_101 + i % 300), String(format: "%06d.000", (i * 7919) % 235_959), "CHEST (PA AND LAT)",
                                   description, view == "LATERAL" ? "Recumbent" : "Erect"],
                        split: [dicom, String(studyNumber), String(subject), split]))
                }
                let labels = [String(subject), String(studyNumber)] + CheXpertLabels.names.map { name -> String in
                    guard let value = study.labels[name] ?? nil else { return "" }
                    return String(format: "%.1f", value)
                }
                let sentences = ReportSections.sentences(study.report)
                results.lock.lock()
                results.rows[i] = rows; results.labels[i] = labels; results.sentences[i] = sentences
                results.done += 1
                let d = results.done
                results.lock.unlock()
                progress?(d)
            } catch {
                counter.lock.lock(); counter.errors.append("\(error)"); counter.lock.unlock()
            }
        }
        if let first = counter.errors.first { throw ConvirtError("synth mimic: \(first)") }
        var metadata = csvLine(["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
                                "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                                "PatientOrientationCodeSequence_CodeMeaning"])
        var split = csvLine(["dicom_id", "study_id", "subject_id", "split"])
        var chexpert = csvLine(["subject_id", "study_id"] + CheXpertLabels.names)
        var images = 0
        for i in 0..<o.studies {
            for r in results.rows[i] { metadata += csvLine(r.metadata); split += csvLine(r.split); images += 1 }
            chexpert += csvLine(results.labels[i])
        }
        try Gzip.compress(Data(metadata.utf8)).write(to: URL(fileURLWithPath: "\(out)/mimic-cxr-2.0.0-metadata.csv.gz"))
        try Gzip.compress(Data(split.utf8)).write(to: URL(fileURLWithPath: "\(out)/mimic-cxr-2.0.0-split.csv.gz"))
        try Gzip.compress(Data(chexpert.utf8)).write(to: URL(fileURLWithPath: "\(out)/mimic-cxr-2.0.0-chexpert.csv.gz"))
        try writeVocabulary(sentences: results.sentences.flatMap { $0 }, to: "\(out)/vocab.txt")
        return images
    }

    /// An uncased WordPiece vocabulary for the `demo` preset: the special tokens, every character and
    /// its "##" continuation, and every word of the reports.
    public static func writeVocabulary(sentences: [String], to path: String) throws {
        // BERT's order: [PAD] is id 0 (the embedding row that gets no gradient), then [UNK], [CLS], [SEP], [MASK].
        let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        let tokenizer = try WordPieceTokenizer(vocabulary: Vocabulary(tokens: specials), lowercase: true)
        var words = Set<String>(), characters = Set<String>()
        for sentence in sentences {
            for token in tokenizer.basicTokens(sentence) {
                words.insert(token)
                for c in token { characters.insert(String(c)) }
            }
        }
        for c in "abcdefghijklmnopqrstuvwxyz0123456789" { characters.insert(String(c)) }
        let chars = characters.sorted()
        let tokens = specials + chars + chars.map { "##" + $0 } + words.subtracting(characters).sorted()
        try Files.writeAtomically(Data(tokens.joined(separator: "\n").appending("\n").utf8), to: path)
    }
}
