import ArgumentParser
import ConvirtCore
import ConvirtModels
import Foundation

/// `convirt parity FIXTURE`: compares our model with PyTorch's reference data (tools/make_parity_fixture.py).
struct ParityCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "parity",
        abstract: "Check the model against a PyTorch parity fixture; exit non-zero past 1e-4 (outputs) or 1e-3 (gradients); a bf16 fixture's tensors against PyTorch's fp32 results, within 3x autocast's own distance from them (Parity).")

    @Argument(help: "A parity fixture (.safetensors) written by tools/make_parity_fixture.py.")
    var fixture: String

    @Option(parsing: .unconditional, help: "Threads (products and loops).")
    var threads = 1

    @Option(help: "Also write our gradients (grad.<name>) to this safetensors file.")
    var dump: String?

    @Option(help: "Run in this precision instead of the fixture's (fp32 or bf16; the limits follow it).")
    var precision: Precision?

    @Flag(help: "Run the plain reference models (the oracle the fast models are tested against) instead, in fp32.")
    var reference = false

    func run() throws {
        Parallel.setThreads(threads)
        let start = Date()
        let report = try Parity.run(path: fixture, dumpPath: dump, precision: precision, reference: reference)
        for line in report.lines {
            let own = line.autocastDeviation.map { String(format: "  (ours vs PyTorch's fp32; autocast vs its fp32 %.3e, limit %.3e)", $0, line.limit) } ?? ""
            print(String(format: "%@ %.3e %@%@", line.name.padding(toLength: max(72, line.name.count), withPad: " ", startingAt: 0) as NSString, line.error,
                         line.ok ? "ok" : "FAIL (limit \(line.limit))", own))
        }
        let worst = report.lines.max { $0.error / $0.limit < $1.error / $1.limit }
        print(String(format: "%@ (%@): %d tensors compared, worst %@ %.3e, %.1f s: %@", report.model, report.precision.rawValue, report.lines.count,
                     worst?.name ?? "-", worst?.error ?? 0, Date().timeIntervalSince(start), report.passed ? "PASS" : "FAIL"))
        if !report.passed { throw ExitCode(1) }
    }
}
