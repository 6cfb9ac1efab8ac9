import ArgumentParser
import ConvirtCore
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation

/// `convirt report RUN_DIR`: the run's HTML report (configuration, training curves, time breakdown,
/// evaluation results beside the paper's tables, retrieval examples), and the tables as text.
struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Write RUN_DIR/report.html: training curves, time breakdown, and RUN_DIR/eval/*.json beside the paper's tables.")

    @Argument(help: "Run directory (config.json, metrics.jsonl, eval/*.json).") var runDir: String
    @Option(help: "Output file (default: RUN_DIR/report.html).") var out: String?
    @Flag(help: "Do not print the comparison tables as text.") var quiet = false

    func run() throws {
        let written: Report.Written
        written = try Report.write(runDirectory: runDir, out: out)
        if !quiet {
            let evaluation = Report.evaluationResults(runDirectory: runDir)
            let results = evaluation.classification.map(\.result)
            for p in PaperTable.tableProtocols(results) {
                print(PaperTable.classificationTable(protocol: p, ours: results))
            }
            if !evaluation.retrieval.isEmpty {
                let n = evaluation.retrieval.count
                print(PaperTable.retrievalTable(ours: evaluation.retrieval.map { (label: Report.retrievalLabel($0.file, count: n), $0.result) }))
            }
        }
        for note in written.notes { print("note: \(note)") }
        print("wrote \(written.path) (\(written.bytes / 1024) KB)")
    }
}
