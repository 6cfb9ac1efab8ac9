// `convirt report`: the HTML report of a run directory, and the metrics.jsonl reader behind it.

import ConvirtCore
import ConvirtIO
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation
import Testing

/// A run directory with config.json, metrics.jsonl (`rows` steps, a resume that repeats steps, a NaN
/// loss, a truncated last line), classification and retrieval results (examples with a PNG, a JPEG, a
/// DICOM, a missing and a broken image, a text query full of HTML), an unknown JSON file.
private func makeRunDirectory(rows: Int = 1200) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-report-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: "\(dir)/eval/images", withIntermediateDirectories: true)
    try #"{"preset": "demo", "global_batch": 32, "steps": 2000, "learning_rate": 0.0005, "model": {"image": {"layers": [1, 1, 1, 1], "width": 16}, "tau": 0.1}}"#
        .write(toFile: "\(dir)/config.json", atomically: true, encoding: .utf8)
    var lines: [String] = []
    func row(_ step: Int, loss: String) -> String {
        let s = Double(step)
        let val = step % 250 == 0 ? #", "val_loss": \#(3.4 - s / 2000)"# : ""
        return #"{"epoch": \#(step / 100), "grad_norm": 1.5, "loss": \#(loss), "loss_u2v": 3.3, "loss_v2u": 3.2, "lr": \#(0.0005 * (1 - s / 2000)), "pairs_per_s": 540.5, "step": \#(step), "time_backward_s": 0.03, "time_comm_s": 0.004, "time_data_s": 0.002, "time_forward_s": 0.02, "time_optimizer_s": 0.001, "world_size": 2\#(val)}"#
    }
    for step in 1...rows { lines.append(row(step, loss: step == 7 ? #""NaN""# : "\(3.47 - Double(step) / 1000)")) }
    lines.append(row(rows - 2, loss: "1.0"))  // a resume from an earlier checkpoint logs steps again
    lines.append(#"{"step": \#(rows + 1), "note": "a row without the usual fields", "nested": {"a": [1, "]"]}, "flag": true, "x": null}"#)
    lines.append("")
    lines.append(#"{"epoch": 12, "grad_norm": 1.5, "loss": 2.2, "ste"#)  // killed mid-write
    try lines.joined(separator: "\n").write(toFile: "\(dir)/metrics.jsonl", atomically: true, encoding: .utf8)

    // Images for the retrieval examples.
    let gradient = GrayImage(width: 300, height: 200, pixels: (0..<60_000).map { Float($0 % 300) / 299 })
    try PNG.encode(gradient).write(to: URL(fileURLWithPath: "\(dir)/eval/images/a.png"))
    let jpeg = try JPEG.encode(gradient)
    try jpeg.write(to: URL(fileURLWithPath: "\(dir)/eval/images/b.jpg"))
    try jpeg.prefix(200).write(to: URL(fileURLWithPath: "\(dir)/eval/images/broken.jpg"))
    try DICOM.encodeJPEGBaseline(gradient).write(to: URL(fileURLWithPath: "\(dir)/eval/images/c.dcm"))

    for (name, r) in [("linear_chexpert_1", ClassificationResult(dataset: "chexpert", protocol: "linear", fraction: 0.01, metric: "auc",
                                                                  runs: [0.801, 0.805, 0.809], perLabel: ["Edema <b>": 0.9])),
                      ("finetune_rsna_all", ClassificationResult(dataset: "rsna", protocol: "finetune", fraction: 1, metric: "auc",
                                                                 runs: [0.93], initialization: "imagenet"))] {
        try r.write(to: "\(dir)/eval/\(name).json")
    }
    let examples = [
        RetrievalExample(mode: "image_to_image", category: "Edema", query: .init(path: "images/a.png"), top: [
            .init(path: "images/b.jpg", relevant: true, score: 0.9), .init(path: "images/missing.jpg", relevant: false),
            .init(path: "\(dir)/eval/images/broken.jpg", relevant: true), .init(path: "images/c.dcm", relevant: false),
        ]),
        RetrievalExample(mode: "text_to_image", category: "Pleural <Effusion>", query: .init(text: #"<script>alert("x")</script> & 'quotes'"#),
                         top: [.init(path: "images/a.png", relevant: true)]),
    ]
    let retrieval = RetrievalResult(imageToImage: ["precision@5": ["mean": 0.3125, "Edema": 0.5], "precision@10": ["mean": 0.25], "precision@50": ["mean": 0.2]],
                                    textToImage: ["precision@5": ["mean": 0.55]], examples: examples, root: "\(dir)/eval")
    try retrieval.write(to: "\(dir)/eval/retrieval.json")
    try #"{"something": "else"}"#.write(toFile: "\(dir)/eval/zz_unknown.json", atomically: true, encoding: .utf8)
    try "not json at all {".write(toFile: "\(dir)/eval/zz_garbage.json", atomically: true, encoding: .utf8)
    return dir
}

@Suite("HTML report")
struct HTMLReportTests {
    @Test("metrics.jsonl: truncated last line, repeated steps, NaN, rows without fields, nested values")
    func metricsLog() throws {
        let text = """
        {"step": 1, "loss": 3.5, "lr": 0.001, "world_size": 2}
        {"step": 2, "loss": "NaN", "lr": 1e-3, "extra": {"nested": [1, 2, {"x": "}"}]}, "ok": false, "none": null}

          {"step": 3, "loss": -Infinity}
        {"step": 2, "loss": 3.25, "val_loss": 3.1}
        {"loss": 2}
        not json
        {"step": 4, "loss": 3.0} trailing
        {"step": 5, "loss": 3.
        """
        let log = MetricsLog.parse(Data(text.utf8))
        #expect(log.rows.map(\.step) == [1, 2])
        #expect(log.rows[1]["loss"] == 3.25 && log.rows[1]["val_loss"] == 3.1 && log.rows[1]["lr"] == nil, "the later row of step 2 wins")
        #expect(log.rows[0]["lr"] == 0.001 && log.rows[0]["world_size"] == 2 && log.rows[0]["val_loss"] == nil)
        #expect(log.replacedRows == 1)
        #expect(log.badLines.map(\.line) == [4, 6, 7, 8, 9], "\(log.badLines)")
        #expect(log.badLines.last?.reason == "truncated last line")
        #expect(log.series("loss").map(\.y) == [3.5, 3.25])
        let nan = MetricsLog.parse(Data(#"{"step": 1, "loss": "NaN"}"#.utf8))
        #expect(nan.nonFiniteCount("loss") == 1 && nan.series("loss").isEmpty)
        #expect(MetricsLog.parse(Data()).rows.isEmpty)
    }

    @Test("the report holds the tables, inline charts and thumbnails, escapes text, and survives bad files")
    func report() throws {
        let dir = try makeRunDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let written = try Report.write(runDirectory: dir)
        #expect(written.path == "\(dir)/report.html")
        let html = try String(contentsOfFile: written.path, encoding: .utf8)

        // Self-contained: no scripts, no external resources.
        #expect(html.hasPrefix("<!DOCTYPE html>") && html.hasSuffix("</html>\n"))
        #expect(!html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=") && !html.contains("url("))
        // Charts: inline SVG, the 1200 steps drawn as at most 400 bucket means.
        #expect(html.components(separatedBy: "<svg").count - 1 >= 4)
        #expect(html.contains("Contrastive loss") && html.contains("Learning rate") && html.contains("Throughput"))
        let polylines = html.components(separatedBy: "<polyline points=\"").dropFirst().map { $0.prefix { $0 != "\"" }.split(separator: " ").count }
        #expect(!polylines.isEmpty && polylines.allSatisfy { $0 <= 400 }, "\(polylines)")
        // Time breakdown.
        #expect(html.contains("Time per step") && html.contains("backward") && html.contains("30.0 ms"))
        // Tables: the paper's numbers and ours.
        #expect(html.contains("Linear classification (Table 1 of the paper)") && html.contains("Fine-tuning (Table 1 of the paper)"))
        #expect(html.contains("<td class=\"label\">ConVIRT</td>") && html.contains(">85.9<") && html.contains(">92.7<"))
        #expect(html.contains("80.5<span class=\"pm\"> ± 0.4</span>") && html.contains("ours (imagenet)") && html.contains(">93.0<"))
        #expect(html.contains("Retrieval on CheXpert 8x200") && html.contains(">60.0<") && html.contains(">31.2<") && html.contains(">55.0<"))
        // Thumbnails: PNG, JPEG and DICOM decoded; missing and broken files become placeholders.
        #expect(html.components(separatedBy: "src=\"data:image/png;base64,").count - 1 == 4, "a.png (twice, decoded once), b.jpg, c.dcm")
        #expect(html.contains("<span>file not found</span>"))
        #expect(html.contains("class=\"thumb ph rel\"") && html.contains("class=\"thumb rel\"") && html.contains("class=\"thumb irr\""))
        // Escaping of every text that comes from files.
        #expect(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;quotes&#39;"))
        #expect(html.contains("Pleural &lt;Effusion&gt;") && html.contains("Edema &lt;b&gt;") && !html.contains("Edema <b>"))
        // Configuration and notes.
        #expect(html.contains("model.image.width") && html.contains("[1, 1, 1, 1]"))
        let notes = written.notes.joined(separator: "\n")
        #expect(notes.contains("truncated last line") && notes.contains("1 row(s) of a step logged again"), "\(notes)")
        #expect(notes.contains("loss is NaN or infinite in 1 row(s)"))
        #expect(notes.contains("skipped eval/zz_unknown.json: neither") && notes.contains("skipped eval/zz_garbage.json: not a JSON object"), "\(notes)")
        #expect(notes.contains("2 image(s) of the retrieval examples could not be shown"), "\(notes)")
        #expect(html.contains("skipped eval/zz_unknown.json"))
    }

    /// The rows of the report table titled `title` (its <h3>): label -> cell texts, tags stripped.
    func tableRows(_ html: String, _ title: String) -> [String: [String]] {
        guard let start = html.range(of: "<h3>\(title)") else { return [:] }
        let table = html[start.upperBound...].prefix { _ in true }
        let body = String(table[..<(table.range(of: "</table>")?.lowerBound ?? table.endIndex)])
        func text(_ cell: Substring) -> String {
            cell.replacingOccurrences(of: "<[^>]+>", with: "", options: .regularExpression).trimmingCharacters(in: .whitespaces)
        }
        var rows: [String: [String]] = [:]
        for row in body.components(separatedBy: "<tr").dropFirst() where row.contains("<td") {
            let cells = row.components(separatedBy: "<td").dropFirst().map { cell -> String in
                let content = cell.drop { $0 != ">" }.dropFirst()
                return text(content[..<(content.range(of: "</td>")?.lowerBound ?? content.endIndex)])
            }
            rows[cells[0]] = Array(cells.dropFirst())
        }
        return rows
    }

    @Test("the report's fine-tuning table holds our fine-tuning results and the paper's fine-tuning rows in their cells, apart from linear's")
    func fineTuningTable() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-report-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: "\(dir)/eval", withIntermediateDirectories: true)
        try #"{"preset": "demo"}"#.write(toFile: "\(dir)/config.json", atomically: true, encoding: .utf8)
        let results = [
            ("linear-rsna-convirt-0.01", ClassificationResult(dataset: "rsna", protocol: "linear", fraction: 0.01, metric: "auc", runs: [0.80, 0.82])),
            ("finetune-rsna-convirt-0.01", ClassificationResult(dataset: "rsna", protocol: "finetune", fraction: 0.01, metric: "auc", runs: [0.91, 0.93],
                                                                 initialization: "convirt", epochsRun: [12, 15], stopReasons: ["plateau", "max_epochs"])),
            ("finetune-covidx-random-1", ClassificationResult(dataset: "covidx", protocol: "finetune", fraction: 1, metric: "accuracy", runs: [0.85, 0.87],
                                                               initialization: "random", epochsRun: [9, 9], stopReasons: ["plateau", "plateau"])),
        ]
        for (name, r) in results { try r.write(to: "\(dir)/eval/\(name).json") }
        let html = try String(contentsOfFile: try Report.write(runDirectory: dir).path, encoding: .utf8)
        let fine = tableRows(html, "Fine-tuning"), linear = tableRows(html, "Linear classification")
        // Columns: RSNA 1%, 10%, all; CheXpert 1%, 10%, all; COVIDx 10%, all; MURA 1%, 10%, all.
        #expect(fine["ConVIRT"]?.first == "88.8" && fine["ConVIRT"]?[7] == "92.4", "the paper's fine-tuning row: \(fine["ConVIRT"] ?? [])")
        #expect(fine["Random Init"]?[7] == "87.7", "\(fine["Random Init"] ?? [])")
        #expect(fine["ours (convirt)"]?.first == "92.0 ± 1.4" && fine["ours (convirt)"]?[1] == "–", "\(fine["ours (convirt)"] ?? [])")
        #expect(fine["ours (random)"]?[7] == "86.0 ± 1.4", "\(fine["ours (random)"] ?? [])")
        #expect(linear["ConVIRT"]?.first == "90.7" && linear["ours (convirt)"]?.first == "81.0 ± 1.4" && linear["ours (random)"] == nil,
                "linear keeps its own rows: \(linear)")
        // The epochs and stop reasons of the fine-tuning runs, as of the linear ones.
        #expect(html.contains("12-15") && html.contains("1 of 2 at the epoch cap"), "the epochs column covers fine-tuning")
    }

    @Test("a run directory with nothing but a config, and one with only metrics, still get a report")
    func sparse() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-report-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let empty = try Report.build(runDirectory: dir)
        #expect(empty.html.contains("No training metrics") && empty.html.contains("No evaluation results"))
        #expect(empty.notes.contains("no metrics.jsonl in the run directory") && empty.notes.contains("no config.json in the run directory"))
        try #"{"step": 1, "loss": 3.4}"#.write(toFile: "\(dir)/metrics.jsonl", atomically: true, encoding: .utf8)
        try "{broken".write(toFile: "\(dir)/config.json", atomically: true, encoding: .utf8)
        let one = try Report.build(runDirectory: dir)
        #expect(one.html.contains("<svg") && one.notes.contains { $0.hasPrefix("config.json could not be read") }, "\(one.notes)")
        #expect(throws: ConvirtError.self) { try Report.build(runDirectory: "\(dir)/nonexistent") }
    }

    @Test("HTML escaping")
    func escaping() {
        #expect(HTML.escape(#"<a href="x">Tom & 'Jerry'</a>"#) == "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;")
        #expect(HTML.escape("plain ± 0.4 → ✓") == "plain ± 0.4 → ✓")
    }
}
