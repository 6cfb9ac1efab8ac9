// Our evaluation results beside the paper's: Table 1 (linear classification and fine-tuning on RSNA,
// CheXpert, COVIDx and MURA with 1%, 10% and all training labels) and Table 2 (CheXpert 8x200
// image-to-image and text-to-image retrieval) of Zhang et al., arXiv 2010.00747.
//
// A table is built once as a `PaperTable.Grid` (rows of methods, columns grouped by dataset or mode),
// then rendered as plain text here or as HTML by the report.

import ConvirtCore
import ConvirtEvaluation
import ConvirtTraining
import Foundation

public enum PaperTable {
    /// The paper's numbers, in percent.
    public struct PaperResults: Sendable {
        public let source: String
        public let units: String
        /// protocol ("linear", "finetune") -> method -> dataset ("RSNA", ...) -> column ("1%", "10%", "all").
        public let classification: [String: [String: [String: [String: Double]]]]
        /// method -> mode ("image_to_image", ...) -> "precision@k".
        public let retrieval: [String: [String: [String: Double]]]
    }

    /// The parsed `paperResultsJSON`.
    public static let paper: PaperResults = {
        // The embedded JSON is fixed and tested; failing to parse it is a build defect.
        guard let root = try? JSONSerialization.jsonObject(with: Data(paperResultsJSON.utf8)) as? [String: Any] else {
            fatalError("PaperTable.paperResultsJSON is not a JSON object")
        }
        func nested(_ key: String) -> [String: [String: [String: Double]]] {
            (root[key] as? [String: [String: [String: Double]]]) ?? [:]
        }
        return PaperResults(source: root["source"] as? String ?? "", units: root["units"] as? String ?? "",
                            classification: ["linear": nested("linear"), "finetune": nested("finetune")],
                            retrieval: nested("retrieval_chexpert_8x200"))
    }()

    /// Rows of Table 1, top to bottom.
    public static let classificationMethods = ["Random Init", "ImageNet Init", "Caption-Transformer", "Caption-LSTM", "Contrastive-Binary", "ConVIRT"]
    /// Rows of Table 2, top to bottom.
    public static let retrievalMethods = ["Random", "ImageNet", "Caption-Transformer", "Caption-LSTM", "Contrastive-Binary", "ConVIRT",
                                          "ConVIRT + CheXpert supervised"]
    /// Our dataset names and the paper's column headers, in the paper's order.
    public static let datasets: [(key: String, title: String)] = [("rsna", "RSNA"), ("chexpert", "CheXpert"), ("covidx", "COVIDx"), ("mura", "MURA")]
    /// The metric the paper reports per dataset.
    public static func paperMetric(dataset: String) -> String { dataset.lowercased() == "covidx" ? "accuracy" : "auc" }

    /// One cell: a percentage, with the spread over runs for ours.
    public struct Cell: Sendable, Equatable {
        public var value: Double
        public var std: Double?
        public var runs: Int?
        /// Ours: the 95% bootstrap interval over the test set, in percent.
        public var ci: ConfidenceInterval?
        public init(value: Double, std: Double? = nil, runs: Int? = nil, ci: ConfidenceInterval? = nil) {
            self.value = value
            self.std = std
            self.runs = runs
            self.ci = ci
        }

        /// "87.3", "86.9 ± 0.4" for ours over several runs, then its interval: "86.9 ± 0.4 [84.0, 89.5]".
        public var text: String {
            var v = value.isFinite ? String(format: "%.1f", value) : "n/a"
            if let std, let runs, runs > 1 { v += " ± " + (std.isFinite ? String(format: "%.1f", std) : "n/a") }
            if let ci { v += " " + ci.text("%.1f") }
            return v
        }
    }

    public struct Row: Sendable {
        public var label: String
        public var cells: [Cell?]
        public var isOurs: Bool
    }

    /// A table: column groups (a dataset, or a retrieval mode) of columns, rows of methods, footer notes.
    public struct Grid: Sendable {
        public var title: String
        public var groups: [(title: String, columns: [String])]
        public var rows: [Row]
        public var notes: [String]
        public var columnCount: Int { groups.reduce(0) { $0 + $1.columns.count } }

        /// The cell of row `label` under group `group`, column `column`.
        public func cell(_ label: String, _ group: String, _ column: String) -> Cell? {
            var index = 0
            for g in groups {
                if g.title == group, let c = g.columns.firstIndex(of: column) {
                    return rows.first { $0.label == label }?.cells[index + c] ?? nil
                }
                index += g.columns.count
            }
            return nil
        }
    }

    /// The column header of a label fraction: "1%", "10%", "all".
    public static func fractionColumn(_ fraction: Double) -> String {
        if abs(fraction - 1) < 1e-9 { return "all" }
        return String(format: "%g%%", (fraction * 100 * 1e6).rounded() / 1e6)
    }

    static func fractionOrder(_ column: String) -> Double {
        column == "all" ? 100 : Double(column.dropLast()) ?? 1000
    }

    /// The row label of our results: "ours (<init>)", init "convirt" when the file does not say.
    public static func oursLabel(_ r: ClassificationResult) -> String { "ours (\(r.initialization ?? "convirt"))" }

    /// Table 1 for `protocol` ("linear" or "finetune") with our results of that protocol as extra rows.
    public static func classificationGrid(protocol evaluationProtocol: String, ours: [ClassificationResult]) -> Grid {
        let proto = evaluationProtocol.lowercased()
        // Zero-shot (no labels; the paper has none) is shown beside the linear results: the paper's linear
        // rows, then ours of both protocols, each row named by its protocol.
        let zeroShot = proto == "zeroshot"
        let paperRows = paper.classification[zeroShot ? "linear" : proto] ?? [:]
        let mine = ours.filter { $0.evaluationProtocol.lowercased() == proto || (zeroShot && $0.evaluationProtocol.lowercased() == "linear") }
        let oursLabel: (ClassificationResult) -> String = { r in
            zeroShot ? "ours \(r.evaluationProtocol.lowercased()) (\(r.initialization ?? "convirt"))" : Self.oursLabel(r)
        }
        var notes: [String] = []

        // Columns: the paper's datasets in its order, then any other dataset of ours; per dataset the
        // fractions of the paper and of ours.
        var titles = datasets.map(\.title)
        for r in mine where !datasets.contains(where: { $0.key == r.dataset.lowercased() }) && !titles.contains(r.dataset) {
            titles.append(r.dataset)
        }
        func title(_ dataset: String) -> String { datasets.first { $0.key == dataset.lowercased() }?.title ?? dataset }
        let groups: [(title: String, columns: [String])] = titles.map { t in
            var columns = Set(paperRows.values.flatMap { ($0[t] ?? [:]).keys })
            for r in mine where title(r.dataset) == t { columns.insert(fractionColumn(r.fraction)) }
            return (t, columns.sorted { fractionOrder($0) < fractionOrder($1) })
        }
        func index(_ group: String, _ column: String) -> Int? {
            var offset = 0
            for g in groups {
                if g.title == group { return g.columns.firstIndex(of: column).map { offset + $0 } }
                offset += g.columns.count
            }
            return nil
        }
        let width = groups.reduce(0) { $0 + $1.columns.count }

        var rows: [Row] = []
        let methods = classificationMethods.filter { paperRows[$0] != nil } + paperRows.keys.filter { !classificationMethods.contains($0) }.sorted()
        for method in methods {
            var cells = [Cell?](repeating: nil, count: width)
            for (dataset, columns) in paperRows[method] ?? [:] {
                for (column, value) in columns { if let i = index(dataset, column) { cells[i] = Cell(value: value) } }
            }
            rows.append(Row(label: method, cells: cells, isOurs: false))
        }

        let initOrder = ["random", "imagenet", "convirt"]
        let labels = Array(Set(mine.map(oursLabel))).sorted { a, b in
            let ia = initOrder.firstIndex { a.hasSuffix("(\($0))") } ?? initOrder.count, ib = initOrder.firstIndex { b.hasSuffix("(\($0))") } ?? initOrder.count
            return ia != ib ? ia < ib : a < b
        }
        for label in labels {
            var cells = [Cell?](repeating: nil, count: width)
            for r in mine where oursLabel(r) == label {
                let column = fractionColumn(r.fraction)
                guard let i = index(title(r.dataset), column) else { continue }
                if cells[i] != nil { notes.append("\(label), \(title(r.dataset)) \(column): several results; the last one is shown") }
                cells[i] = Cell(value: r.mean * 100, std: r.std * 100, runs: r.runs.count,
                                ci: r.ci95?.mean.scaled(by: 100))
                if r.metric.lowercased() != paperMetric(dataset: r.dataset) {
                    notes.append("\(label), \(title(r.dataset)) \(column): metric \(r.metric), the paper reports \(paperMetric(dataset: r.dataset))")
                }
                if !(0...1).contains(r.mean) {
                    notes.append("\(label), \(title(r.dataset)) \(column): mean \(r.mean) is outside [0, 1]; results files hold fractions")
                }
            }
            rows.append(Row(label: label, cells: cells, isOurs: true))
        }
        if zeroShot {
            notes.append("Zero-shot: no training labels (CheXzero's protocol: the softmax over a positive and a negative prompt set per label), "
                + "on the test split of the linear evaluation, shown in its \"all\" column beside the linear results.")
        }
        let name = proto == "linear" ? "Linear classification" : proto == "finetune" ? "Fine-tuning"
            : zeroShot ? "Linear classification, and zero-shot beside it" : evaluationProtocol
        notes.append("Percent; AUC for RSNA, CheXpert (mean over its labels) and MURA, accuracy for COVIDx; columns: share of the training labels. "
            + "Paper rows: Zhang et al., arXiv 2010.00747, Table 1 (mean of 5 runs); ours: mean ± \(Metrics.stdDescription) "
            + "(no ± for a single run) [95% bootstrap interval over the test set, 1000 resamples]; - not reported.")
        return Grid(title: "\(name) (Table 1 of the paper)", groups: groups, rows: rows, notes: notes)
    }

    /// Table 2 with each of `ours` as an extra row.
    public static func retrievalGrid(ours: [(label: String, RetrievalResult)]) -> Grid {
        let modes = [("image_to_image", "Image → image"), ("text_to_image", "Text → image")]
        let groups = modes.map { (title: $0.1, columns: RetrievalResult.ks.map { "P@\($0)" }) }
        var rows: [Row] = []
        for method in retrievalMethods + paper.retrieval.keys.filter({ !retrievalMethods.contains($0) }).sorted() {
            guard let entry = paper.retrieval[method] else { continue }
            let cells = modes.flatMap { mode in RetrievalResult.ks.map { k in entry[mode.0]?["precision@\(k)"].map { Cell(value: $0) } } }
            rows.append(Row(label: method, cells: cells, isOurs: false))
        }
        for (label, result) in ours {
            let cells = modes.flatMap { mode in
                RetrievalResult.ks.map { k in
                    result.precision(mode.0, k: k).map {
                        Cell(value: $0 * 100, ci: result.ci95?[mode.0]?["precision@\(k)"]?.scaled(by: 100))
                    }
                }
            }
            rows.append(Row(label: label, cells: cells, isOurs: true))
        }
        let notes = ["Precision@k in percent over the 8 x 200 CheXpert queries (mean over queries; ours with its 95% bootstrap interval, queries "
            + "resampled within their categories); Random is chance (12.5). "
            + "Paper rows: Zhang et al., arXiv 2010.00747, Table 2; - not reported."]
        return Grid(title: "Retrieval on CheXpert 8x200 (Table 2 of the paper)", groups: groups, rows: rows, notes: notes)
    }

    /// The protocols whose tables show `results`, in the order of Table 1: linear (or, where zero-shot
    /// results are there too, the linear table with the zero-shot rows beside it, not a second copy of
    /// it), fine-tuning, then any other.
    public static func tableProtocols(_ results: [ClassificationResult]) -> [String] {
        let present = Set(results.map { $0.evaluationProtocol.lowercased() })
        var protocols = ["linear", "finetune"].filter(present.contains)
        protocols += present.subtracting(protocols).sorted()
        if present.contains("zeroshot"), let i = protocols.firstIndex(of: "linear") {
            protocols.removeAll { $0 == "zeroshot" }
            protocols[i] = "zeroshot"
        }
        return protocols
    }

    /// Table 1 for `protocol` as plain text, the paper's rows then ours.
    public static func classificationTable(protocol evaluationProtocol: String, ours: [ClassificationResult]) -> String {
        render(classificationGrid(protocol: evaluationProtocol, ours: ours))
    }

    /// Table 2 as plain text, the paper's rows then ours.
    public static func retrievalTable(ours: [(label: String, RetrievalResult)]) -> String {
        render(retrievalGrid(ours: ours))
    }

    /// A grid as aligned plain text: the title, two header lines (groups, columns), the rows (a rule
    /// before ours), then the notes.
    public static func render(_ grid: Grid) -> String {
        let labelWidth = max(6, grid.rows.map(\.label.count).max() ?? 0)
        var columnWidths: [Int] = []
        var offset = 0
        for g in grid.groups {
            var widths = g.columns.enumerated().map { c, name in
                max(name.count, grid.rows.map { ($0.cells[offset + c]?.text ?? "-").count }.max() ?? 1)
            }
            // A group title wider than its columns widens the last column.
            let spanned = widths.reduce(0, +) + 2 * (widths.count - 1)
            if g.title.count > spanned, !widths.isEmpty { widths[widths.count - 1] += g.title.count - spanned }
            columnWidths += widths
            offset += g.columns.count
        }
        func pad(_ s: String, _ width: Int, right: Bool) -> String {
            let fill = String(repeating: " ", count: max(0, width - s.count))
            return right ? fill + s : s + fill
        }
        let gap = "   "
        var groupLine = pad("", labelWidth, right: false), columnLine = pad("Method", labelWidth, right: false)
        offset = 0
        for g in grid.groups {
            let widths = columnWidths[offset..<(offset + g.columns.count)]
            let span = widths.reduce(0, +) + 2 * (widths.count - 1)
            groupLine += gap + pad(g.title, span, right: false)
            columnLine += gap + zip(g.columns, widths).map { pad($0, $1, right: true) }.joined(separator: "  ")
            offset += g.columns.count
        }
        var lines = [grid.title, groupLine, columnLine, String(repeating: "-", count: columnLine.count)]
        var ruled = false
        for row in grid.rows {
            if row.isOurs && !ruled {
                lines.append(String(repeating: "-", count: columnLine.count))
                ruled = true
            }
            var line = pad(row.label, labelWidth, right: false)
            offset = 0
            for g in grid.groups {
                let texts = (0..<g.columns.count).map { row.cells[offset + $0]?.text ?? "-" }
                line += gap + zip(texts, columnWidths[offset..<(offset + g.columns.count)]).map { pad($0, $1, right: true) }.joined(separator: "  ")
                offset += g.columns.count
            }
            lines.append(line)
        }
        lines += grid.notes
        return lines.map { String($0.reversed().drop { $0 == " " }.reversed()) }.joined(separator: "\n") + "\n"
    }
}
