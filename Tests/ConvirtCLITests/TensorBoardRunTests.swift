// A run's TensorBoard files, read back by the tensorboard package's EventAccumulator
// (tools/check_tensorboard.py; test.sh installs tensorboard) and checked against metrics.jsonl, across a
// resume that recomputes steps.

import Foundation
import Testing

@Suite("TensorBoard files of a run", .serialized)
struct TensorBoardRunTests {
    @Test("every metrics.jsonl scalar is in TensorBoard, each step once across a resume from an earlier checkpoint")
    func resumedRun() throws {
        let data = try SharedRuns.shared.data()
        let runDir = SharedRuns.shared.dir + "/tensorboard-run"
        let common = ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--retrieval-eval", "20", "--checkpoint-every", "3",
                      "--val-every", "2", "--schedule", "cosine", "--warmup-steps", "2"]
        let first = try run(convirtPath(), common + ["--steps", "6"], timeout: 300)
        #expect(first.status == 0, "\(first.output)")
        // As if the run had been killed after logging step 6 but before its checkpoint: resume from step 3.
        try FileManager.default.removeItem(atPath: "\(runDir)/checkpoints/step-00000006")
        let resumed = try run(convirtPath(), common + ["--steps", "8", "--resume"], timeout: 300)
        #expect(resumed.status == 0 && resumed.output.contains("resuming from") && resumed.output.contains("dropped 3 row(s) after step 3"),
                "\(resumed.output)")
        let files = try FileManager.default.contentsOfDirectory(atPath: "\(runDir)/tensorboard").filter { $0.hasPrefix("events.out.tfevents.") }
        #expect(files.count == 2, "one event file per invocation: \(files)")
        let steps = try String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n").count
        #expect(steps == 8, "metrics.jsonl holds each step once")
        let check = try run("/usr/bin/env", ["python3", "\(repository)/tools/check_tensorboard.py", runDir], timeout: 300)
        #expect(check.status == 0 && check.output.contains("2 event file(s)") && check.output.contains("all equal"),
                "tools/check_tensorboard.py (test.sh installs tensorboard): \(check.output)")

        let quiet = SharedRuns.shared.dir + "/tensorboard-none"
        let none = try run(convirtPath(), ["train", "--data", data, "--run-dir", quiet, "--preset", "tiny", "--steps", "2", "--retrieval-eval", "0",
                                           "--no-tensorboard"], timeout: 300)
        #expect(none.status == 0 && !FileManager.default.fileExists(atPath: "\(quiet)/tensorboard"), "\(none.output)")
    }
}
