// The convirt executable end to end: subcommands, and the MPI bridge under a real mpirun.

import ConvirtIO
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
func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:], input: String? = nil,
         timeout: Double = 120) throws -> (status: Int32, output: String) {
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
    let stdin = Pipe()
    process.standardInput = stdin
    try process.run()
    if let input { stdin.fileHandleForWriting.write(Data(input.utf8)) }
    try stdin.fileHandleForWriting.close()
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

    @Test("convirt tokenize prints one line of ids per stdin line")
    func tokenize() throws {
        let vocab = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-vocab-\(getpid()).txt")
        try "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nheart\n##s\nis\nnormal\n.\nHeart\n".write(to: vocab, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: vocab) }
        let lower = try run(convirtPath(), ["tokenize", "--vocab", vocab.path, "--lowercase"], input: "The hearts is normal.\n\nHeart Ä\n")
        #expect(lower.status == 0, "\(lower.output)")
        #expect(lower.output == "2 5 6 7 8 9 10 3\n2 3\n2 6 1 3\n")
        let cased = try run(convirtPath(), ["tokenize", "--vocab", vocab.path, "--max-length", "4"], input: "Heart is normal\n")
        #expect(cased.output == "2 11 8 3\n", "\(cased.output)")
        let missing = try run(convirtPath(), ["tokenize", "--vocab", "/nonexistent/vocab.txt"], input: "x\n")
        #expect(missing.status != 0 && missing.output.contains("/nonexistent/vocab.txt: no such file"))
    }

    @Test("convirt parity passes on a committed fixture and fails on a corrupted one")
    func parity() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("ConvirtModelsTests/Fixtures")
        let good = try run(convirtPath(), ["parity", fixtures.appendingPathComponent("convirt_tiny_train.safetensors").path])
        #expect(good.status == 0 && good.output.contains("PASS"), "\(good.output)")
        // A copy whose reference output is off by 1%: parity must fail and say so.
        let source = try SafeTensorsFile(path: fixtures.appendingPathComponent("bert_tiny.safetensors").path)
        var writer = SafeTensorsWriter(metadata: source.metadata)
        for info in source.tensors {
            if info.dtype == .i64 {
                try writer.add(info.name, source.integers(info.name))
            } else {
                var t = try source.floats(info.name)
                if info.name == "output.last_hidden_state" { t[flat: 5] *= 1.01 }
                try writer.add(info.name, t)
            }
        }
        let bad = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-bad-\(getpid()).safetensors")
        try writer.write(to: bad.path)
        defer { try? FileManager.default.removeItem(at: bad) }
        let failed = try run(convirtPath(), ["parity", bad.path])
        #expect(failed.status != 0 && failed.output.contains("FAIL"), "\(failed.output)")
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
