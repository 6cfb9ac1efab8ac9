// `convirt report` as a command: the file, the tables on the console, a missing run directory.

import Foundation
import Testing

@Suite("convirt report")
struct ReportCommandTests {
    @Test("convirt report writes the file, prints the tables, and refuses a missing run directory")
    func command() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-report-cli-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: "\(dir)/eval", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try #"{"preset": "demo", "global_batch": 32, "steps": 50}"#.write(toFile: "\(dir)/config.json", atomically: true, encoding: .utf8)
        let rows = (1...50).map { #"{"step": \#($0), "loss": \#(3.5 - Double($0) / 100), "lr": 0.0005, "pairs_per_s": 500}"# }
        try rows.joined(separator: "\n").write(toFile: "\(dir)/metrics.jsonl", atomically: true, encoding: .utf8)
        try #"{"dataset": "chexpert", "protocol": "linear", "fraction": 0.01, "metric": "auc", "runs": [0.801, 0.805, 0.809], "mean": 0.805, "std": 0.004, "per_label": {}}"#
            .write(toFile: "\(dir)/eval/linear_chexpert_1.json", atomically: true, encoding: .utf8)
        try #"{"image_to_image": {"precision@5": {"mean": 0.3125}, "precision@10": {"mean": 0.25}, "precision@50": {"mean": 0.2}}, "text_to_image": {"precision@5": {"mean": 0.55}}}"#
            .write(toFile: "\(dir)/eval/retrieval.json", atomically: true, encoding: .utf8)
        try #"{"something": "else"}"#.write(toFile: "\(dir)/eval/zz_unknown.json", atomically: true, encoding: .utf8)
        let out = "\(dir)/elsewhere/r.html"
        let (status, output) = try run(convirtPath(), ["report", dir, "--out", out])
        #expect(status == 0, "\(output)")
        #expect(FileManager.default.fileExists(atPath: out) && !FileManager.default.fileExists(atPath: "\(dir)/report.html"))
        #expect(output.contains("wrote \(out)") && output.contains("note: skipped eval/zz_unknown.json"), "\(output)")
        #expect(output.contains("Linear classification") && output.contains("80.5 ± 0.4") && output.contains("ConVIRT + CheXpert supervised"), "\(output)")
        let missing = try run(convirtPath(), ["report", "\(dir)/nope"])
        #expect(missing.status != 0 && missing.output.contains("no such run directory"), "\(missing.output)")
    }
}
