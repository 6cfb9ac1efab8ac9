// `convirt report RUN_DIR`: one self-contained HTML file (no scripts, no external resources) about a run:
// its configuration, training curves and time breakdown from metrics.jsonl, the evaluation results in
// RUN_DIR/eval/*.json beside the paper's Tables 1 and 2, and retrieval examples as thumbnails.
//
// Nothing in the run directory makes the report fail: a missing or damaged file becomes a note in the
// report (and in `Report.Written.notes`), a missing or unreadable image a grey placeholder that says why.

import ConvirtCore
import ConvirtDistributed
import ConvirtData
import ConvirtIO
import ConvirtEvaluation
import ConvirtTraining
import Foundation

public enum Report {
    public struct Written: Sendable {
        public let path: String
        public let bytes: Int
        /// What was skipped or could not be read, one sentence each.
        public let notes: [String]
    }

    /// Writes the report of `runDirectory` to `out` (default RUN_DIR/report.html). Throws only when the
    /// run directory does not exist or the file cannot be written.
    @discardableResult
    public static func write(runDirectory: String, out: String? = nil) throws -> Written {
        let (html, notes) = try build(runDirectory: runDirectory)
        let path = out ?? "\(runDirectory)/report.html"
        let data = Data(html.utf8)
        try Files.writeAtomically(data, to: path)
        return Written(path: path, bytes: data.count, notes: notes)
    }

    /// The report's HTML and its notes.
    public static func build(runDirectory: String) throws -> (html: String, notes: [String]) {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: runDirectory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ConvirtError("\(runDirectory): no such run directory")
        }
        var builder = Builder(runDirectory: runDirectory)
        return (builder.html(), builder.notes)
    }

    /// The classification and retrieval results of RUN_DIR/eval/*.json (sorted by file name), and a note
    /// for each file that is neither.
    public static func evaluationResults(runDirectory: String) -> (classification: [(file: String, result: ClassificationResult)],
                                                                    retrieval: [(file: String, result: RetrievalResult)], notes: [String]) {
        let dir = "\(runDirectory)/eval"
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return ([], [], []) }
        var classification: [(String, ClassificationResult)] = [], retrieval: [(String, RetrievalResult)] = [], notes: [String] = []
        for name in names.filter({ $0.hasSuffix(".json") && !EvaluationManifest.isManifest($0) }).sorted() {
            do {
                switch try ResultsFile.load("\(dir)/\(name)") {
                case .classification(let r): classification.append(("eval/\(name)", r))
                case .retrieval(let r): retrieval.append(("eval/\(name)", r))
                }
            } catch {
                notes.append("skipped eval/\(name): \(String(describing: error).replacingOccurrences(of: "\(dir)/\(name): ", with: ""))")
            }
        }
        return (classification, retrieval, notes)
    }

    /// A retrieval row label: "ours" for a single file, else "ours (<file name without .json>)".
    public static func retrievalLabel(_ file: String, count: Int) -> String {
        count == 1 ? "ours" : "ours (\(URL(fileURLWithPath: file).deletingPathExtension().lastPathComponent))"
    }
}

// MARK: - Building the page

private struct Builder {
    let runDirectory: String
    var notes: [String] = []
    var thumbnails = Thumbnails()

    init(runDirectory: String) { self.runDirectory = runDirectory }

    mutating func html() -> String {
        let config = readJSON("config.json")
        var log: MetricsLog? = nil
        let metricsPath = "\(runDirectory)/metrics.jsonl"
        if FileManager.default.fileExists(atPath: metricsPath) {
            do {
                let l = try MetricsLog.read(metricsPath)
                log = l
                if !l.badLines.isEmpty {
                    let shown = l.badLines.prefix(3).map { "line \($0.line): \($0.reason)" }.joined(separator: "; ")
                    notes.append("metrics.jsonl: \(l.badLines.count) line(s) skipped (\(shown)\(l.badLines.count > 3 ? "; ..." : ""))")
                }
                if l.replacedRows > 0 { notes.append("metrics.jsonl: \(l.replacedRows) row(s) of a step logged again after a resume; the later row is used") }
                for field in ["loss", "val_loss", "grad_norm"] where l.nonFiniteCount(field) > 0 {
                    notes.append("metrics.jsonl: \(field) is NaN or infinite in \(l.nonFiniteCount(field)) row(s) (not plotted)")
                }
            } catch {
                notes.append("metrics.jsonl: \(error)")
            }
        } else {
            notes.append("no metrics.jsonl in the run directory")
        }
        let evaluation = Report.evaluationResults(runDirectory: runDirectory)
        notes += evaluation.notes

        var body = header(config: config)
        body += collectiveTimeouts()
        body += overview(config: config, log: log)
        body += trainingSection(log: log)
        body += evaluationSection(evaluation)
        body += examplesSection(evaluation.retrieval)
        let failed = thumbnails.cache.compactMap { entry -> (String, String)? in
            if case .failed(let reason) = entry.value { return (entry.key, reason) } else { return nil }
        }.sorted { $0.0 < $1.0 }
        if let first = failed.first {
            notes.append("\(failed.count) image(s) of the retrieval examples could not be shown (\(first.0): \(first.1)\(failed.count > 1 ? "; ..." : ""))")
        }
        body += configSection(config)
        // Notes are collected while building; they go last but are known by now.
        body += notesSection()
        return page(title: "ConVIRT run report: \(URL(fileURLWithPath: runDirectory).lastPathComponent)", body: body)
    }

    /// The collective-timeout reports in the run directory (a job the watchdog ended; a resumed run may
    /// have gone on since): the step and the verdict of each, from the lowest rank that wrote one.
    mutating func collectiveTimeouts() -> String {
        let names = CollectiveWatchdog.reportFiles(in: runDirectory)
        guard !names.isEmpty else { return "" }
        var reports: [CollectiveTimeout] = []
        for name in names {
            do { reports.append(try JSONDecoder().decode(CollectiveTimeout.self, from: Files.read("\(runDirectory)/\(name)"))) } catch {
                notes.append("\(name) could not be read: \(describeDecoding(error))")
            }
        }
        guard let first = reports.min(by: { $0.this.rank < $1.this.rank }) else { return "" }
        return "<section class=\"card\"><h2>Collective timeout</h2><p>A job of this run was ended by the collective watchdog at step "
            + "\(first.this.step) (\(HTML.escape(first.this.phase))), after \(String(format: "%g", first.timeoutSeconds)) s: "
            + "\(HTML.escape(first.verdict)).</p><p class=\"muted\">\(reports.count) rank(s) reported: "
            + names.map { "<code>\(HTML.escape($0))</code>" }.joined(separator: ", ") + ".</p></section>\n"
    }

    mutating func readJSON(_ name: String) -> JSONValue? {
        let path = "\(runDirectory)/\(name)"
        guard FileManager.default.fileExists(atPath: path) else {
            if name == "config.json" { notes.append("no config.json in the run directory") }
            return nil
        }
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Files.read(path))
        } catch {
            notes.append("\(name) could not be read: \(describeDecoding(error))")
            return nil
        }
    }

    // MARK: Header and overview

    func header(config: JSONValue?) -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyy-MM-dd HH:mm"
        formatter.locale = Locale(identifier: "en_US_POSIX")
        let preset = config?["preset"]?.text
        let path = URL(fileURLWithPath: runDirectory).standardizedFileURL.path
        return """
        <header><div class="wrap"><div class="kicker">ConVIRT run report</div>
        <h1>\(HTML.escape(URL(fileURLWithPath: runDirectory).standardizedFileURL.lastPathComponent))</h1>
        <div class="sub"><code>\(HTML.escape(path))</code>\(preset.map { " &middot; preset <b>\(HTML.escape($0))</b>" } ?? "") &middot; generated \(formatter.string(from: Date()))</div>
        </div></header>
        <main class="wrap">

        """
    }

    func overview(config: JSONValue?, log: MetricsLog?) -> String {
        var kpis: [(String, String, String?)] = []
        if let log, !log.isEmpty {
            let last = log.row(log.count - 1)
            let detail = [config?["steps"]?.number.map { "of \(Int($0))" }, last["epoch"].map { "epoch \(Int($0))" }].compactMap { $0 }
            kpis.append(("Steps", "\(last.step)", detail.isEmpty ? nil : detail.joined(separator: " · ")))
            let tail = log.series("loss").suffix(max(1, min(50, log.count / 20)))
            if !tail.isEmpty {
                let mean = tail.reduce(0) { $0 + $1.y } / Double(tail.count)
                kpis.append(("Loss, last step", String(format: "%.4f", last["loss"] ?? .nan), "step \(last.step)"))
                kpis.append(("Loss, recent mean", String(format: "%.4f", mean), "mean of the last \(tail.count) step(s)"))
            }
            let val = log.series("val_loss")
            if let best = val.min(by: { $0.y < $1.y }) {
                kpis.append(("Best val loss", String(format: "%.4f", best.y), "step \(Int(best.x)) of \(val.count) check(s)"))
            }
            if let batch = config?["global_batch"]?.number {
                kpis.append(("Chance loss", String(format: "%.3f", Foundation.log(batch)), "log N for N = \(Int(batch))"))
            }
            if let rate = log.mean("pairs_per_s", dropFirst: log.count > 1 ? 1 : 0) {
                kpis.append(("Throughput", String(format: "%.0f", rate), "pairs/s, mean per step"))
            }
            if let tflops = log.mean("tflops_per_rank", dropFirst: log.count > 1 ? 1 : 0) {
                let share = log.mean("peak_share", dropFirst: log.count > 1 ? 1 : 0).map { String(format: ", %.0f%% of the given peak", 100 * $0) } ?? ""
                kpis.append(("Achieved TFLOP/s", String(format: tflops < 1 ? "%.3f" : "%.2f", tflops), "per rank, model FLOPs over step time\(share)"))
            }
            if let w = last["world_size"] { kpis.append(("World size", "\(Int(w))", "rank(s)")) }
            if let excluded = log.mean("excluded_negatives", dropFirst: 0), let batch = config?["global_batch"]?.number {
                kpis.append(("Excluded negatives", String(format: "%.1f", excluded),
                             String(format: "false negatives (identical sentences) per step, of %.0f pairs", batch * (batch - 1))))
            }
            if let skipped = last["skipped_steps"] { kpis.append(("Skipped steps", "\(Int(skipped))", "not applied: loss or gradient norm outliers")) }
            let seconds = ["time_data_s", "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s"].reduce(0.0) { $0 + log.sum($1) }
            if seconds > 0 {
                kpis.append(("Time per step", Self.duration(seconds / Double(log.count)), "mean of \(log.count) logged step(s)"))
                kpis.append(("Time in steps", Self.duration(seconds), "total over the logged steps"))
            }
        } else if let config {
            kpis.append(("Steps", config["steps"]?.text ?? "-", "no metrics yet"))
        }
        guard !kpis.isEmpty else { return "" }
        var out = "<section class=\"card\"><div class=\"kpis\">"
        for (label, value, detail) in kpis {
            out += "<div class=\"kpi\"><div class=\"l\">\(HTML.escape(label))</div><div class=\"v\">\(HTML.escape(value))</div>"
            if let detail { out += "<div class=\"d\">\(HTML.escape(detail))</div>" }
            out += "</div>"
        }
        return out + "</div></section>\n"
    }

    static func duration(_ s: Double) -> String {
        if s < 1 { return String(format: "%.0f ms", s * 1000) }
        if s < 120 { return String(format: "%.1f s", s) }
        if s < 7200 { return String(format: "%.1f min", s / 60) }
        return String(format: "%.1f h", s / 3600)
    }

    // MARK: Training

    mutating func trainingSection(log: MetricsLog?) -> String {
        var out = "<section class=\"card\"><h2>Training</h2>"
        guard let log, !log.isEmpty else {
            return out + "<p class=\"muted\">No training metrics (metrics.jsonl is missing or empty).</p></section>\n"
        }
        let blue = "#2f6fb0", orange = "#e07b24", green = "#2e9d5b", purple = "#7b5ea7", grey = "#8a949e"
        var charts: [SVGChart] = []
        var loss = SVGChart(title: "Contrastive loss", xLabel: "step", yLabel: "loss",
                            series: [.init(name: "train", color: blue, points: log.series("loss"), smooth: true)])
        let val = log.series("val_loss")
        if !val.isEmpty { loss.series.append(.init(name: "validation", color: orange, points: val, style: .points)) }
        charts.append(loss)
        let v2u = log.series("loss_v2u"), u2v = log.series("loss_u2v")
        if !v2u.isEmpty || !u2v.isEmpty {
            charts.append(SVGChart(title: "Loss by direction", xLabel: "step", yLabel: "loss",
                                   series: [.init(name: "image → text", color: blue, points: v2u, smooth: true), .init(name: "text → image", color: orange, points: u2v, smooth: true)]))
        }
        charts.append(SVGChart(title: "Learning rate", xLabel: "step", yLabel: "learning rate",
                               series: [.init(name: "lr", color: green, points: log.series("lr"))]))
        var throughput = SVGChart(title: "Throughput", xLabel: "step", yLabel: "pairs / s",
                                  series: [.init(name: "pairs/s", color: purple, points: log.series("pairs_per_s"), smooth: true)])
        if let mean = log.mean("pairs_per_s", dropFirst: log.count > 1 ? 1 : 0), let first = log.steps.first, let last = log.steps.last {
            throughput.series.append(.init(name: String(format: "mean %.0f", mean), color: grey,
                                           points: [(Double(first), mean), (Double(last), mean)], style: .dashed))
        }
        charts.append(throughput)
        let norm = log.series("grad_norm")
        if !norm.isEmpty { charts.append(SVGChart(title: "Gradient norm", xLabel: "step", yLabel: "norm", series: [.init(name: "grad norm", color: grey, points: norm, smooth: true)])) }

        var boxes = charts.map { "<div class=\"chartbox\">\($0.svg)</div>" }
        let times = timeBreakdown(log)
        if !times.isEmpty { boxes.append("<div class=\"chartbox timebox\">\(times)</div>") }
        out += "<div class=\"charts\">" + boxes.joined() + "</div>"
        out += "<p class=\"note\">" + (log.count > SVGChart.maxPoints
            ? "\(log.count) steps in \(SVGChart.maxPoints) buckets of consecutive steps: bands show each bucket's range, "
                + "bold lines a moving average of the bucket means."
            : "Faint lines: every step; bold lines: a moving average over \(SVGChart.smoothingWindow(log.count)) steps.") + "</p>"
        out += heldOutRetrieval()
        return out + "</section>\n"
    }

    func timeBreakdown(_ log: MetricsLog) -> String {
        let phases: [(String, String, String)] = [("time_data_s", "data", "#8a949e"), ("time_forward_s", "forward", "#2f6fb0"),
                                                  ("time_backward_s", "backward", "#7b5ea7"), ("time_comm_s", "communication", "#e07b24"),
                                                  ("time_optimizer_s", "optimizer", "#2e9d5b")]
        let skip = log.count > 1 ? 1 : 0
        let means = phases.compactMap { p in log.mean(p.0, dropFirst: skip).map { (p.1, p.2, $0) } }
        let total = means.reduce(0) { $0 + $1.2 }
        guard total > 0 else { return "" }
        var out = "<div class=\"boxtitle\">Time per step</div><div class=\"stack\">"
        for (name, color, value) in means where value / total >= 0.002 {
            let share = value / total * 100
            out += "<div style=\"width:\(String(format: "%.2f", share))%;background:\(color)\" title=\"\(name) \(String(format: "%.1f", share))%\">"
                + (share >= Double(name.count) * 1.6 + 2 ? HTML.escape(name) : "") + "</div>"
        }
        out += "</div><table class=\"plain times\"><thead><tr><th class=\"label\">phase</th><th>mean per step</th><th>share</th></tr></thead><tbody>"
        for (name, color, value) in means {
            out += "<tr><td class=\"label\"><span class=\"sw\" style=\"background:\(color)\"></span>\(HTML.escape(name))</td>"
                + "<td>\(Self.milliseconds(value))</td><td>\(String(format: "%.1f", value / total * 100))%</td></tr>"
        }
        out += "<tr class=\"total\"><td class=\"label\">total</td><td>\(Self.milliseconds(total))</td><td>100%</td></tr></tbody></table>"
        out += "<p class=\"note\">Means over \(log.count - skip) step(s)\(skip == 1 ? " (the first, which includes warm-up, left out)" : ""). "
            + "Communication: the embedding all-gather and the part of the gradient all-reduce not hidden behind backward.</p>"
        return out
    }

    static func milliseconds(_ s: Double) -> String { s >= 1 ? String(format: "%.2f s", s) : String(format: "%.1f ms", s * 1000) }

    mutating func heldOutRetrieval() -> String {
        guard case .object(let fields)? = readJSON("heldout_retrieval.json") else { return "" }
        let values = Dictionary(fields, uniquingKeysWith: { a, _ in a })
        guard let p = values["precision@10"]?.number else { return "" }
        let chance = values["chance@10"]?.number, best = values["maximum@10"]?.number
        var out = "<h3>Held-out image-to-text retrieval</h3><p>Precision@10 <b>\(String(format: "%.3f", p))</b>"
        if let chance { out += " against chance \(String(format: "%.3f", chance))" }
        if let best { out += " (best possible \(String(format: "%.3f", best)))" }
        if let s = values["studies"]?.number, let t = values["sentences"]?.number { out += " over \(Int(s)) studies and \(Int(t)) sentences" }
        out += ", a sentence relevant when it comes from the image's own study (copies of one text shared by studies cannot be told apart)."
        if case .object(let distinctFields)? = values["distinct"] {
            let d = Dictionary(distinctFields, uniquingKeysWith: { a, _ in a })
            if let dp = d["precision@10"]?.number {
                out += " Over the distinct sentences (each text once, relevant when the image's own report says it): <b>\(String(format: "%.3f", dp))</b>"
                if let c = d["chance@10"]?.number { out += " against chance \(String(format: "%.3f", c))" }
                if let b = d["maximum@10"]?.number { out += " (best possible \(String(format: "%.3f", b)))" }
                if let u = d["sentences"]?.number { out += ", \(Int(u)) distinct sentences" }
                out += "."
            }
        }
        return out + "</p>"
    }

    // MARK: Evaluation

    /// The manifest beside results file `file` (relative to the run directory), as one line; why not, where absent or damaged.
    func manifestSummary(_ file: String) -> String {
        let path = EvaluationManifest.path(forResults: "\(runDirectory)/\(file)")
        guard FileManager.default.fileExists(atPath: path) else { return "none beside it" }
        do { return try EvaluationManifest.load(path).summary } catch { return "unreadable: \(error)" }
    }

    func evaluationSection(_ evaluation: (classification: [(file: String, result: ClassificationResult)],
                                          retrieval: [(file: String, result: RetrievalResult)], notes: [String])) -> String {
        var out = "<section class=\"card\"><h2>Evaluation against the paper</h2>"
        if evaluation.classification.isEmpty && evaluation.retrieval.isEmpty {
            out += "<p class=\"muted\">No evaluation results in <code>eval/</code> (write them with <code>convirt eval ... --out RUN_DIR/eval/NAME.json</code>).</p>"
        }
        let results = evaluation.classification.map(\.result)
        for p in PaperTable.tableProtocols(results) {
            out += Self.gridHTML(PaperTable.classificationGrid(protocol: p, ours: results))
        }
        if !evaluation.classification.isEmpty {
            out += "<h3>Classification results</h3><table class=\"plain details\"><thead><tr><th class=\"label\">file</th><th class=\"label\">dataset</th>"
                + "<th class=\"label\">protocol</th><th>labels</th><th class=\"label\">init</th><th class=\"label\">metric</th><th>runs</th><th>mean ± std</th>"
                + "<th class=\"label\">epochs (stop)</th><th class=\"label\">per label (mean over runs)</th><th class=\"label\">95% interval</th>"
                + "<th class=\"label\">manifest</th></tr></thead><tbody>"
            for (file, r) in evaluation.classification {
                let perLabel = r.perLabel.sorted { $0.key < $1.key }.map { "\(HTML.escape($0.key)) \(String(format: "%.1f", $0.value * 100))" }
                out += "<tr><td class=\"label\"><code>\(HTML.escape(file))</code></td><td class=\"label\">\(HTML.escape(r.dataset))</td>"
                    + "<td class=\"label\">\(HTML.escape(r.evaluationProtocol))</td><td>\(HTML.escape(PaperTable.fractionColumn(r.fraction)))</td>"
                    + "<td class=\"label\">\(HTML.escape(r.initialization ?? "convirt"))</td><td class=\"label\">\(HTML.escape(r.metric))</td>"
                    + "<td>\(r.runs.isEmpty ? "-" : "\(r.runs.count)")</td>"
                    + "<td>\(r.runs.count > 1 ? String(format: "%.1f ± %.1f", r.mean * 100, r.std * 100) : String(format: "%.1f", r.mean * 100))</td>"
                    + "<td class=\"label small\">\(Self.stopSummary(r))</td><td class=\"label small\">\(perLabel.joined(separator: " &middot; "))</td>"
                    + "<td class=\"label small\">\(r.ci95.map { $0.mean.scaled(by: 100).text("%.1f") } ?? "-")</td>"
                    + "<td class=\"label small\">\(HTML.escape(manifestSummary(file)))</td></tr>"
            }
            out += "</tbody></table>"
        }
        if !evaluation.retrieval.isEmpty {
            let n = evaluation.retrieval.count
            let ours = evaluation.retrieval.map { (label: Report.retrievalLabel($0.file, count: n), $0.result) }
            out += Self.gridHTML(PaperTable.retrievalGrid(ours: ours))
            for (file, r) in evaluation.retrieval {
                out += Self.categoryTable(label: Report.retrievalLabel(file, count: n), file: file, r)
                out += "<p class=\"note\">\(HTML.escape(file)) manifest: \(HTML.escape(manifestSummary(file)))</p>"
            }
        }
        return out + "</section>\n"
    }

    /// Epochs per run and why they stopped, e.g. "12-40, plateau" or "100 (5 of 5 at the cap: not converged)".
    static func stopSummary(_ r: ClassificationResult) -> String {
        guard let epochs = r.epochsRun, let lo = epochs.min(), let hi = epochs.max() else { return "-" }
        let range = lo == hi ? "\(lo)" : "\(lo)-\(hi)"
        let capped = r.runsAtEpochCap ?? 0
        if capped == 0 { return "\(range), plateau" }
        return "\(range) <span class=\"warn\">(\(capped) of \(epochs.count) at the epoch cap: not converged)</span>"
    }

    /// A comparison grid as an HTML table: group headers, paper rows, then ours (highlighted).
    static func gridHTML(_ grid: PaperTable.Grid) -> String {
        // Equal columns when they fit; a table with many columns sizes them by content and scrolls.
        let fixed = grid.columnCount <= 12
        var out = "<h3>\(HTML.escape(grid.title))</h3><div class=\"scroll\"><table class=\"cmp\(fixed ? " fixed" : "")\">"
            + "<colgroup><col class=\"lc\"><col span=\"\(max(1, grid.columnCount))\"></colgroup>"
            + "<thead><tr><th rowspan=\"2\" class=\"label\">Method</th>"
        for g in grid.groups { out += "<th colspan=\"\(g.columns.count)\" class=\"gs grp\">\(HTML.escape(g.title))</th>" }
        out += "</tr><tr>"
        for g in grid.groups {
            for (i, c) in g.columns.enumerated() { out += "<th\(i == 0 ? " class=\"gs\"" : "")>\(HTML.escape(c))</th>" }
        }
        out += "</tr></thead><tbody>"
        var firstOurs = true
        for row in grid.rows {
            var classes: [String] = []
            if row.isOurs { classes.append("ours"); if firstOurs { classes.append("first"); firstOurs = false } }
            if row.label == "ConVIRT" { classes.append("ref") }
            out += "<tr\(classes.isEmpty ? "" : " class=\"\(classes.joined(separator: " "))\"")><td class=\"label\">\(HTML.escape(row.label))</td>"
            var index = 0
            for g in grid.groups {
                for i in 0..<g.columns.count {
                    let cls = i == 0 ? " class=\"gs\"" : ""
                    if let cell = row.cells[index + i] {
                        var text = cell.value.isFinite ? String(format: "%.1f", cell.value) : "n/a"
                        if let std = cell.std, let runs = cell.runs, runs > 1 {
                            text += "<span class=\"pm\"> ± \(std.isFinite ? String(format: "%.1f", std) : "n/a")</span>"
                        }
                        out += "<td\(cls)>\(text)</td>"
                    } else {
                        out += "<td\(cls)><span class=\"na\">–</span></td>"
                    }
                }
                index += g.columns.count
            }
            out += "</tr>"
        }
        out += "</tbody></table></div>"
        for note in grid.notes { out += "<p class=\"note\">\(HTML.escape(note))</p>" }
        return out
    }

    static func categoryTable(label: String, file: String, _ r: RetrievalResult) -> String {
        let categories = Set(r.categories("image_to_image") + r.categories("text_to_image")).sorted()
        guard !categories.isEmpty else { return "" }
        let modes = [("image_to_image", "Image → image"), ("text_to_image", "Text → image")]
        var out = "<h3>\(HTML.escape(label)) by category <span class=\"muted small\"><code>\(HTML.escape(file))</code></span></h3>"
            + "<div class=\"scroll\"><table class=\"cmp fixed\"><colgroup><col class=\"lc\"><col span=\"6\"></colgroup>"
            + "<thead><tr><th rowspan=\"2\" class=\"label\">Category</th>"
        for m in modes { out += "<th colspan=\"3\" class=\"gs grp\">\(m.1)</th>" }
        out += "</tr><tr>"
        for _ in modes { for (i, k) in RetrievalResult.ks.enumerated() { out += "<th\(i == 0 ? " class=\"gs\"" : "")>P@\(k)</th>" } }
        out += "</tr></thead><tbody>"
        for category in categories + ["mean"] {
            out += "<tr\(category == "mean" ? " class=\"total\"" : "")><td class=\"label\">\(HTML.escape(category == "mean" ? "all queries" : category))</td>"
            for m in modes {
                for (i, k) in RetrievalResult.ks.enumerated() {
                    let text = r.precision(m.0, k: k, category: category).map { String(format: "%.1f", $0 * 100) } ?? "<span class=\"na\">–</span>"
                    out += "<td\(i == 0 ? " class=\"gs\"" : "")>\(text)</td>"
                }
            }
            out += "</tr>"
        }
        return out + "</tbody></table></div><p class=\"note\">Precision@k in percent.</p>"
    }

    // MARK: Retrieval examples

    static let maxExamples = 40
    static let maxCandidates = 10

    mutating func examplesSection(_ retrieval: [(file: String, result: RetrievalResult)]) -> String {
        let withExamples = retrieval.filter { !($0.result.examples ?? []).isEmpty }
        guard !withExamples.isEmpty else { return "" }
        var out = "<section class=\"card\"><h2>Retrieval examples</h2>"
            + "<p class=\"muted\">Each query and its top candidates, best first; a green frame marks a relevant candidate, a red frame one that is not.</p>"
        for (file, r) in withExamples {
            let examples = r.examples ?? []
            if withExamples.count > 1 { out += "<h3><code>\(HTML.escape(file))</code></h3>" }
            for example in examples.prefix(Self.maxExamples) { out += exampleHTML(example, root: r.root) }
            if examples.count > Self.maxExamples {
                out += "<p class=\"note\">\(examples.count - Self.maxExamples) more example(s) in \(HTML.escape(file)) not shown.</p>"
            }
        }
        return out + "</section>\n"
    }

    mutating func exampleHTML(_ e: RetrievalExample, root: String?) -> String {
        let mode = e.mode == "text_to_image" ? "Text → image" : e.mode == "image_to_image" ? "Image → image" : e.mode
        let relevant = e.top.filter(\.relevant).count
        var out = "<div class=\"example\"><div class=\"exhead\"><span class=\"badge\">\(HTML.escape(mode))</span> "
            + "<b>\(HTML.escape(e.category))</b><span class=\"muted\"> &middot; \(relevant) of \(e.top.count) relevant</span></div><div class=\"exrow\">"
        if let path = e.query.path {
            out += "<figure class=\"query\">\(thumbnail(path, root: root, frame: "q"))<figcaption>query</figcaption></figure>"
        } else {
            out += "<figure class=\"query\"><div class=\"qtext\">“\(HTML.escape(e.query.text ?? ""))”</div><figcaption>query</figcaption></figure>"
        }
        out += "<div class=\"arrow\">→</div>"
        for (rank, c) in e.top.prefix(Self.maxCandidates).enumerated() {
            let score = c.score.map { String(format: " &middot; %.3f", $0) } ?? ""
            out += "<figure>\(thumbnail(c.path, root: root, frame: c.relevant ? "rel" : "irr"))"
                + "<figcaption><span class=\"\(c.relevant ? "ok" : "no")\">\(rank + 1) \(c.relevant ? "✓" : "✗")</span>\(score)</figcaption></figure>"
        }
        if e.top.count > Self.maxCandidates { out += "<div class=\"more\">+\(e.top.count - Self.maxCandidates)</div>" }
        return out + "</div></div>"
    }

    /// An <img> with the thumbnail as a data URI, or a grey placeholder that says why there is none.
    mutating func thumbnail(_ path: String, root: String?, frame: String) -> String {
        let resolved = resolve(path, root: root)
        switch thumbnails.make(resolved) {
        case .image(let uri):
            return "<img class=\"thumb \(frame)\" src=\"\(uri)\" alt=\"\(HTML.escape(path))\" title=\"\(HTML.escape(path))\">"
        case .failed(let reason):
            return "<div class=\"thumb ph \(frame)\" title=\"\(HTML.escape(path)): \(HTML.escape(reason))\"><span>\(HTML.escape(reason))</span></div>"
        }
    }

    /// A relative example path is looked up under the result's `root`, the working directory, the run
    /// directory and its eval/ directory, in that order.
    func resolve(_ path: String, root: String?) -> String {
        if path.hasPrefix("/") { return path }
        let candidates = [root.map { "\($0)/\(path)" }, path, "\(runDirectory)/\(path)", "\(runDirectory)/eval/\(path)"].compactMap { $0 }
        return candidates.first { FileManager.default.fileExists(atPath: $0) } ?? candidates[0]
    }

    // MARK: Configuration and notes

    func configSection(_ config: JSONValue?) -> String {
        guard let config else { return "" }
        let rows = config.flattened()
        guard !rows.isEmpty else { return "" }
        var out = "<section class=\"card\"><h2>Configuration</h2><p class=\"muted\">The resolved configuration of the run (<code>config.json</code>).</p><div class=\"config\">"
        for (key, value) in rows {
            out += "<div class=\"kv\"><span class=\"k\">\(HTML.escape(key))</span><span class=\"v\">\(HTML.escape(value))</span></div>"
        }
        return out + "</div></section>\n"
    }

    func notesSection() -> String {
        guard !notes.isEmpty else { return "</main>" }
        return "<section class=\"card notes\"><h2>Notes</h2><ul>" + notes.map { "<li>\(HTML.escape($0))</li>" }.joined() + "</ul></section></main>"
    }

    func page(title: String, body: String) -> String {
        """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
        <title>\(HTML.escape(title))</title>
        <style>\(Self.css)</style></head>
        <body>
        \(body)
        <footer class="wrap">Written by <code>convirt report</code> &middot; paper numbers: \(HTML.escape(PaperTable.paper.source))</footer>
        </body></html>

        """
    }

    static let css = """
    *{box-sizing:border-box}
    body{margin:0;background:#f3f5f8;color:#1f2933;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue","Liberation Sans","DejaVu Sans",Arial,sans-serif}
    .wrap{max-width:1180px;margin:0 auto;padding:0 24px}
    header{background:linear-gradient(135deg,#17324f,#245a8c);color:#fff;padding:26px 0 22px;margin-bottom:22px}
    header h1{margin:2px 0 6px;font-size:26px;font-weight:600;letter-spacing:-.01em}
    header .kicker{text-transform:uppercase;letter-spacing:.12em;font-size:11px;opacity:.75}
    header .sub{font-size:13px;opacity:.9} header code{background:rgba(255,255,255,.12);color:#fff}
    code{font:12px/1.3 "SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace;background:#eef1f4;padding:1px 5px;border-radius:4px}
    .card{background:#fff;border:1px solid #e3e7ec;border-radius:10px;box-shadow:0 1px 2px rgba(16,24,40,.04);padding:20px 24px;margin-bottom:20px}
    h2{font-size:18px;margin:0 0 14px;font-weight:600}
    h3{font-size:14px;margin:22px 0 8px;font-weight:600;color:#323f4b}
    .muted{color:#616e7c}.warn{color:#b45309;font-weight:600}.small{font-size:12px}
    .note{color:#616e7c;font-size:12px;margin:6px 0 0}
    .kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:12px}
    .kpi{border:1px solid #e3e7ec;border-radius:8px;padding:10px 14px;background:#fafbfc}
    .kpi .l{font-size:11px;color:#616e7c;text-transform:uppercase;letter-spacing:.06em}
    .kpi .v{font-size:22px;font-weight:600;margin-top:2px;font-variant-numeric:tabular-nums}
    .kpi .d{font-size:11px;color:#7b8794}
    .charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
    .chartbox{border:1px solid #eceff3;border-radius:8px;padding:6px 8px 2px}
    svg.chart{width:100%;height:auto;display:block;font-family:inherit}
    svg .ct{font-size:13px;font-weight:600;fill:#323f4b} svg .tick{font-size:10.5px;fill:#616e7c} svg .al{font-size:11px;fill:#52606d}
    svg .lg{font-size:11px;fill:#3e4c59} svg .grid{stroke:#edf0f3;stroke-width:1} svg .axis{stroke:#9aa5b1;stroke-width:1} svg .empty{fill:#9aa5b1;font-size:13px}
    .timebox{padding:10px 16px 12px}
    .boxtitle{font-size:13px;font-weight:600;color:#323f4b;margin:2px 0 8px}
    .timebox table{width:100%}
    .stack{display:flex;height:24px;border-radius:6px;overflow:hidden;margin:6px 0 10px}
    .stack div{color:#fff;font-size:11px;line-height:26px;text-align:center;white-space:nowrap;overflow:hidden}
    .sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:7px;vertical-align:-1px}
    table{border-collapse:collapse;font-variant-numeric:tabular-nums}
    table.cmp{width:100%;font-size:13px}
    table.cmp.fixed{table-layout:fixed} table.cmp.fixed col.lc{width:230px}
    table.cmp th,table.cmp td,table.plain th,table.plain td{padding:5px 9px;text-align:right;border-bottom:1px solid #edf0f3;white-space:nowrap}
    table th{font-weight:600;color:#52606d;font-size:12px;background:#f7f9fb}
    table.cmp .label,table.plain .label{text-align:left}
    table.cmp th.grp{text-align:center}
    table.cmp .gs{border-left:1px solid #dde2e8}
    table.cmp tr.ref td{font-weight:600}
    table.cmp tr.ours td{background:#eaf3fc;color:#123c69;font-weight:600}
    table.cmp tr.ours.first td{border-top:2px solid #9cc3e8}
    .pm{font-weight:400;color:#4a6a8a;font-size:12px}
    .na{color:#b8c0c8}
    table tr.total td{font-weight:600;border-top:1px solid #cbd2d9}
    table.details td.small{white-space:normal;max-width:360px;color:#52606d}
    .scroll{overflow-x:auto}
    .example{border-top:1px solid #edf0f3;padding:12px 0 6px}
    .exhead{margin-bottom:8px}
    .badge{display:inline-block;background:#eef1f4;color:#3e4c59;border-radius:10px;padding:1px 9px;font-size:11px;margin-right:6px}
    .exrow{display:flex;flex-wrap:nowrap;overflow-x:auto;align-items:flex-start;gap:6px;padding-bottom:2px}
    figure{margin:0;text-align:center;flex:none}
    figcaption{font-size:11px;color:#616e7c;margin-top:2px;font-variant-numeric:tabular-nums}
    .thumb{width:84px;height:84px;flex:none;object-fit:contain;background:#111;border:3px solid #cbd2d9;border-radius:6px;display:block}
    .thumb.q{border-color:#245a8c}.thumb.rel{border-color:#2e9d5b}.thumb.irr{border-color:#d64545}
    .thumb.ph{background:#d5dae0;display:flex;align-items:center;justify-content:center;padding:4px;overflow:hidden}
    .thumb.ph span{font-size:9.5px;line-height:1.2;color:#3e4c59;word-break:break-word}
    .qtext{width:140px;min-height:84px;border:3px solid #245a8c;border-radius:6px;padding:6px 8px;font-size:12px;line-height:1.3;text-align:left;background:#f5f9fd;display:flex;align-items:center}
    .arrow{font-size:22px;color:#9aa5b1;align-self:center;padding:0 2px 16px}
    .more{align-self:center;color:#616e7c;font-size:12px}
    .ok{color:#2e9d5b;font-weight:600}.no{color:#d64545;font-weight:600}
    .config{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:0 24px}
    .kv{display:flex;justify-content:space-between;gap:12px;border-bottom:1px solid #f0f2f5;padding:4px 0;font-size:12.5px}
    .kv .k{color:#616e7c}.kv .v{font-family:"SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:12px;text-align:right;word-break:break-all}
    .notes{border-color:#f0d9a8;background:#fffaf0} .notes li{margin:3px 0}
    footer{color:#7b8794;font-size:11.5px;padding:4px 24px 30px}
    """
}

// MARK: - Thumbnails

/// Thumbnails of the images at given paths, decoded once per path.
struct Thumbnails {
    enum Outcome { case image(String), failed(String) }
    static let side = 96
    static let maxFileBytes = 256 << 20
    var cache: [String: Outcome] = [:]

    mutating func make(_ path: String) -> Outcome {
        if let done = cache[path] { return done }
        let outcome = Self.render(path)
        cache[path] = outcome
        return outcome
    }

    /// Decodes JPEG, PNG or DICOM (by content, not by name), shrinks the longer side to 96 px and
    /// encodes an 8-bit PNG as a data URI.
    static func render(_ path: String) -> Outcome {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return .failed("file not found") }
        if isDirectory.boolValue { return .failed("a directory, not an image") }
        if let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int, size > maxFileBytes {
            return .failed("file too large (\(size >> 20) MB)")
        }
        do {
            let data = try Files.read(path)
            if data.isEmpty { return .failed("empty file") }
            let bytes = [UInt8](data.prefix(132))
            var image: GrayImage
            if bytes.starts(with: [0xFF, 0xD8, 0xFF]) {
                image = try JPEG.decodeGray(data, minWidth: side, minHeight: side, source: path)
            } else if bytes.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) {
                image = try PNG.decodeGray(data, source: path)
            } else {
                let isDICOM = bytes.count >= 132 && Array(bytes[128..<132]) == Array("DICM".utf8)
                do {
                    image = try DICOM.decodeGray(data, source: path)
                } catch {
                    if isDICOM { throw error }
                    return .failed("not a JPEG, PNG or DICOM image")
                }
                image = stretched(image)
            }
            guard image.width > 0 && image.height > 0 else { return .failed("empty image") }
            let small = image.resized(longerSide: side)
            let png = try PNG.encode(small)
            return .image("data:image/png;base64," + png.base64EncodedString())
        } catch {
            var reason = String(describing: error)
            if let range = reason.range(of: "\(path): ") { reason = String(reason[range.upperBound...]) }
            return .failed(reason)
        }
    }

    /// Contrast stretched to the image's own range (DICOM samples rarely fill their bit depth).
    static func stretched(_ image: GrayImage) -> GrayImage {
        guard let lo = image.pixels.min(), let hi = image.pixels.max(), hi > lo else { return image }
        let scale = 1 / (hi - lo)
        return GrayImage(width: image.width, height: image.height, pixels: image.pixels.map { ($0 - lo) * scale })
    }
}

// MARK: - JSON of unknown shape (config.json)

enum JSONValue: Decodable {
    case null, bool(Bool), number(Double), string(String), array([JSONValue]), object([(String, JSONValue)])

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: Decoder) throws {
        if let keyed = try? decoder.container(keyedBy: Key.self) {
            self = .object(try keyed.allKeys.map { ($0.stringValue, try keyed.decode(JSONValue.self, forKey: $0)) }.sorted { $0.0 < $1.0 })
            return
        }
        if var list = try? decoder.unkeyedContainer() {
            var items: [JSONValue] = []
            while !list.isAtEnd { items.append(try list.decode(JSONValue.self)) }
            self = .array(items)
            return
        }
        let single = try decoder.singleValueContainer()
        if single.decodeNil() { self = .null } else if let b = try? single.decode(Bool.self) { self = .bool(b) } else if let d = try? single.decode(Double.self) {
            self = .number(d)
        } else {
            self = .string(try single.decode(String.self))
        }
    }

    subscript(_ key: String) -> JSONValue? {
        if case .object(let fields) = self { return fields.first { $0.0 == key }?.1 }
        return nil
    }

    var number: Double? { if case .number(let d) = self { return d } else { return nil } }

    /// Compact text: numbers without a trailing ".0", arrays inline.
    var text: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .number(let d): return d == d.rounded() && abs(d) < 1e15 ? String(Int(d)) : String(format: "%g", d)
        case .string(let s): return s
        case .array(let items): return "[" + items.map(\.text).joined(separator: ", ") + "]"
        case .object(let fields): return "{" + fields.map { "\($0.0): \($0.1.text)" }.joined(separator: ", ") + "}"
        }
    }

    /// Leaves with dotted keys ("model.image.width"), objects expanded, arrays inline.
    func flattened(prefix: String = "") -> [(String, String)] {
        if case .object(let fields) = self {
            return fields.flatMap { $0.1.flattened(prefix: prefix.isEmpty ? $0.0 : "\(prefix).\($0.0)") }
        }
        return [(prefix, text)]
    }
}
