// The convirt executable end to end: subcommands, and the MPI bridge under a real mpirun.

import Foundation
import Testing

/// The directory holding the built products (convirt sits beside the test bundle).
private func productsDirectory() -> URL {
    Bundle.main.bundleURL.pathExtension == "xctest" ? Bundle.main.bundleURL.deletingLastPathComponent() : Bundle.main.bundleURL
}

private func convirtPath() -> String {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("convirt").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir.deleteLastPathComponent()
    }
    return productsDirectory().appendingPathComponent("convirt").path
}

/// Runs a program, returning its exit status and combined output; kills it after `timeout` seconds.
func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:], timeout: Double = 120) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    process.environment = env
    let log = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-cli-\(UUID().uuidString).log")
    FileManager.default.createFile(atPath: log.path, contents: nil)
    defer { try? FileManager.default.removeItem(at: log) }
    let handle = try FileHandle(forWritingTo: log)
    process.standardOutput = handle
    process.standardError = handle
    try process.run()
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
    if process.isRunning {
        process.terminate()
        Issue.record("\(executable) \(arguments.joined(separator: " ")) did not finish within \(timeout) s")
    }
    process.waitUntilExit()
    try handle.close()
    let output = try Data(contentsOf: log)
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}

private func which(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
        let path = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}

@Suite("convirt executable")
struct CLITests {
    @Test("convirt info runs as a single process")
    func infoSingle() throws {
        let (status, output) = try run(convirtPath(), ["info"])
        #expect(status == 0, "\(output)")
        #expect(output.contains("BLAS:") && output.contains("Open MPI") && output.contains("not launched by mpirun"), "\(output)")
    }

    @Test("under mpirun -np 2 the MPI bridge initialises and an all-reduce sums the ranks")
    func infoUnderMPIRun() throws {
        let mpirun = try #require(which("mpirun"), "mpirun is not installed (openmpi-bin)")
        let (status, output) = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "info"],
                                       environment: ["OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                                                     "OPENBLAS_NUM_THREADS": "1", "OMPI_MCA_btl": "self,vader"])
        #expect(status == 0, "\(output)")
        #expect(output.contains("world size 2; all-reduce of ranks = 1 (expected 1)"), "\(output)")
    }

    @Test("unknown subcommands are refused with usage")
    func unknown() throws {
        let (status, output) = try run(convirtPath(), ["frobnicate"])
        #expect(status != 0)
        #expect(output.contains("Usage") || output.contains("USAGE"), "\(output)")
    }

    @Test("the kernel benchmark runs and prints figures")
    func benchSmoke() throws {
        // A smoke run of the code path only; the figures come from a release build (see README).
        let (status, output) = try run(convirtPath(), ["bench", "kernels", "--quick", "--batch", "1"], environment: ["OPENBLAS_NUM_THREADS": "1"], timeout: 600)
        #expect(status == 0, "\(output)")
        #expect(output.contains("GFLOP/s") && output.contains("3x3 64->64 @56") && output.contains("attention"), "\(output)")
    }
}
