// The convirt executable end to end: subcommands, and the MPI bridge under a real mpirun.

import ConvirtCore
import ConvirtIO
import Foundation
import Testing

/// The directory holding the built products (convirt sits beside the test bundle).
private func productsDirectory() -> URL {
    Bundle.main.bundleURL.pathExtension == "xctest" ? Bundle.main.bundleURL.deletingLastPathComponent() : Bundle.main.bundleURL
}

/// The convirt executable beside the test bundle.
func convirtPath() -> String {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("convirt").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir.deleteLastPathComponent()
    }
    return productsDirectory().appendingPathComponent("convirt").path
}

/// Runs a program, returning its exit status and combined output; kills it after `timeout` seconds.
enum ConvirtCLITests {
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:], input: String? = nil,
                    timeout: Double = 120) throws -> (status: Int32, output: String) {
        try runProcess(executable, arguments, environment: environment, input: input, timeout: timeout)
    }
}

func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:], input: String? = nil,
         timeout: Double = 120) throws -> (status: Int32, output: String) {
    try runProcess(executable, arguments, environment: environment, input: input, timeout: timeout)
}

func runProcess(_ executable: String, _ arguments: [String], environment: [String: String] = [:], input: String? = nil,
         timeout: Double = 120) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    // `--precision auto` would train in bf16 on a CPU with AMX or AVX512-BF16: the tests that check fp32's
    // guarantees (parity, world-size invariance, bitwise resume) run fp32 on every CPU; bf16 tests say --precision bf16.
    env["CONVIRT_PRECISION"] = env["CONVIRT_PRECISION"] ?? "fp32"
    for (k, v) in environment { env[k] = v }
    process.environment = env
    let log = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-cli-\(UUID().uuidString).log")
    _ = FileManager.default.createFile(atPath: log.path, contents: nil)
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
        let grace = Date().addingTimeInterval(5)
        while process.isRunning && Date() < grace { Thread.sleep(forTimeInterval: 0.05) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
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
        // oneDNN 3 (the v3 API the code is written to), and where the library came from.
        #expect(output.contains("\noneDNN: 3.") && output.contains("\noneDNN library: /") && output.contains("libdnnl.so.3"), "\(output)")
        // The routes, each once; a switch that is set is named with what it does.
        #expect(output.components(separatedBy: "\nbf16: ").count == 2 && output.contains("\nkernels: ") && output.contains("\nprecision auto: "), "\(output)")
        let pinned = try run(convirtPath(), ["info"], environment: ["CONVIRT_MATMUL": "openblas"])
        #expect(pinned.status == 0 && pinned.output.contains("fp32 products on OpenBLAS") && pinned.output.contains("CONVIRT_MATMUL=openblas ("),
                "\(pinned.output)")
        let bad = try run(convirtPath(), ["info"], environment: ["CONVIRT_CONVOLUTION": "winograd"])
        #expect(bad.status == 1 && bad.output.contains("CONVIRT_CONVOLUTION=winograd: expected one of auto, onednn, im2col"), "\(bad.output)")
    }

    @Test("threads that outnumber the CPUs of the process's affinity mask are warned of, with mpirun's fix")
    func affinityWarning() throws {
        let args = ["bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "1", "--tokens", "16"]
        let squeezed = try run("/usr/bin/taskset", ["-c", "0", convirtPath()] + args + ["--threads", "2"])
        #expect(squeezed.status == 0 && squeezed.output.contains("2 threads per rank, but this process may run on 1 CPU")
                && squeezed.output.contains("--bind-to none"), "\(squeezed.output)")
        let fitting = try run("/usr/bin/taskset", ["-c", "0", convirtPath()] + args + ["--threads", "1"])
        #expect(fitting.status == 0 && !fitting.output.contains("warning"), "\(fitting.output)")
    }

    @Test("under mpirun -np 2 the MPI bridge initialises and an all-reduce sums the ranks")
    func infoUnderMPIRun() throws {
        let mpirun = try #require(which("mpirun"), "mpirun is not installed (openmpi-bin)")
        let (status, output) = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "info"],
                                       environment: ["OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                                                     "OPENBLAS_NUM_THREADS": "1", "OMPI_MCA_btl": "self,vader"])
        #expect(status == 0, "\(output)")
        #expect(output.contains("world size 2; all-reduce of ranks = 1 (expected 1)"), "\(output)")
        #expect(output.contains("ranks on hosts: 0@") && output.contains(", 1@"), "gather of the hosts: \(output)")
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

    @Test("convirt tokenize equals Hugging Face's BertTokenizer on every code point of the Latin, Greek, Cyrillic, CJK and Hangul blocks")
    func tokenizerSweep() throws {
        // Every code point to U+2FFFF, inside and beside a word, lowercased and cased (tools/tokenizer_sweep.py;
        // test.sh installs transformers); the few that differ elsewhere are newer than the tokenizers library's tables.
        let vocab = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("ConvirtTextTests/Fixtures/uncased_vocab.txt").path
        let sweep = try run("/usr/bin/env", ["python3", "\(repository)/tools/tokenizer_sweep.py", vocab, "--convirt", convirtPath(), "--check"],
                            timeout: 600)
        #expect(sweep.status == 0 && sweep.output.contains("check: passed"), "\(sweep.output)")
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

    @Test("the PyTorch parity fixtures pass with every convolution on oneDNN, the ResNet's activations in NCHW and in NHWC",
          arguments: ["nchw", "nhwc"])
    func parityOnOneDNN(layout: String) throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("ConvirtModelsTests/Fixtures")
        // fp32 at fp32's limits (training-mode BatchNorm included), on every CPU.
        for name in ["resnet_tiny_train", "resnet_tiny_eval", "resnet_basic_train", "convirt_tiny_train"] {
            let r = try run(convirtPath(), ["parity", fixtures.appendingPathComponent("\(name).safetensors").path],
                            environment: ["CONVIRT_CONVOLUTION": "onednn", "CONVIRT_ACTIVATIONS": layout])
            #expect(r.status == 0 && r.output.contains("PASS"), "\(name) \(layout): \(r.output)")
        }
        // bf16 against PyTorch autocast on oneDNN's bf16 kernels, where oneDNN has them.
        guard BF16.oneDNNRunsBF16 else { return }
        for name in ["resnet_basic_eval_bf16", "convirt_tiny_eval_bf16"] {
            let r = try run(convirtPath(), ["parity", fixtures.appendingPathComponent("\(name).safetensors").path],
                            environment: ["CONVIRT_BF16": "native", "CONVIRT_ACTIVATIONS": layout])
            #expect(r.status == 0 && r.output.contains("PASS"), "\(name) \(layout): \(r.output)")
        }
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

    @Test("bench step prints each encoder's activation table: its rooms, and the layers that share one")
    func activationTables() throws {
        let (status, output) = try run(convirtPath(), ["bench", "step", "--preset", "tiny", "--batch", "2", "--tokens", "8", "--steps", "1",
                                                       "--threads", "1", "--activation-tables"], timeout: 120)
        #expect(status == 0, "\(output)")
        #expect(output.contains("image encoder activation arena,") && output.contains("text encoder activation arena,"), "\(output)")
        #expect(output.contains("room shared by") && output.contains("image.layer1.0.conv1 output gradient"), "\(output)")
    }
}

/// The runs the distributed tests share: one prepared dataset, and the tiny preset's 20-step losses per
/// world size (made once per test process, removed at exit).
final class SharedRuns: @unchecked Sendable {
    static let shared = SharedRuns()
    static let root = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-train-\(getpid())").path
    private let lock = NSLock()
    private var prepared = false
    private var losses: [String: [DistributedTrainingTests.Row]] = [:]

    private init() { atexit { try? FileManager.default.removeItem(atPath: SharedRuns.root) } }

    var dir: String { Self.root }

    static var mpirun: String? { ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first { FileManager.default.isExecutableFile(atPath: $0) } }

    /// Synthetic MIMIC-CXR (120 studies at 64 px), prepared.
    func data() throws -> String {
        lock.lock(); defer { lock.unlock() }
        if !prepared {
            let synth = try run(convirtPath(), ["synth", "mimic", "--out", "\(dir)/mimic", "--studies", "120", "--image-size", "64", "--seed", "2"])
            #expect(synth.status == 0, "\(synth.output)")
            let prepare = try run(convirtPath(), ["prepare", "mimic", "--root", "\(dir)/mimic", "--out", "\(dir)/prepared"])
            #expect(prepare.status == 0, "\(prepare.output)")
            prepared = true
        }
        return "\(dir)/prepared"
    }

    /// The tiny preset's 20 steps on `np` ranks (`extra` flags), run once.
    func rows(np: Int, _ extra: [String] = [], environment: [String: String] = [:]) throws -> [DistributedTrainingTests.Row] {
        let data = try data()
        let settings = environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        let key = "\(np) \(extra.joined(separator: " ")) \(settings.joined(separator: " "))"
        lock.lock(); defer { lock.unlock() }
        if let cached = losses[key] { return cached }
        let mpirun = try #require(Self.mpirun, "mpirun is not installed (openmpi-bin)")
        let runDir = "\(dir)/run\(np)\(extra.joined())\(settings.joined())"
        let result = try run(mpirun, ["--oversubscribe", "-np", "\(np)", convirtPath(), "train", "--data", data, "--run-dir", runDir,
                                      "--preset", "tiny", "--steps", "20", "--retrieval-eval", "0"] + extra,
                             environment: DistributedTrainingTests.mpiEnvironment.merging(environment) { $1 }, timeout: 300)
        #expect(result.status == 0, "\(result.output)")
        let rows = try DistributedTrainingTests.rows(of: runDir)
        losses[key] = rows
        return rows
    }
}

@Suite("Distributed training", .serialized)
struct DistributedTrainingTests {
    static let mpiEnvironment = ["OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OPENBLAS_NUM_THREADS": "1",
                                 "OMPI_MCA_btl": "self,vader", "CONVIRT_PRECISION": "fp32"]

    struct Row: Decodable, Sendable { let step: Int; let loss: Double; let grad_norm: Double; let world_size: Int; let val_loss: Double? }

    /// Relative bound on step `step`'s loss between two layouts of one run (world sizes, accumulation,
    /// hosts) over the tiny preset's 20 steps: 1e-4 over the first 10, 2e-3 after. Their gradients differ
    /// by fp32 summation order alone, but from some step on rounding decides a ReLU or max-pool tie (in
    /// bf16 a weight's rounding) the other way and the runs part: on a 2-core Xeon with AVX-512 SyncBN
    /// with K = 2 on -np 1 and 2 came 4e-4 apart from step 14 (on an AMD EPYC all within 1e-4); bf16
    /// on oneDNN's kernels 9e-5 to 8e-4 over steps 17-19. A wrong reduction shows within the first steps.
    static func lossBound(step: Int) -> Double { step <= 10 ? 1e-4 : 2e-3 }

    static func rows(of runDir: String) throws -> [Row] {
        try String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode(Row.self, from: Data($0.utf8)) }
    }

    var shared: SharedRuns { SharedRuns.shared }
    var dir: String { shared.dir }

    /// Per-step losses of -np 1, 2 and 4 on the tiny preset agree to `lossBound` over 20 steps.
    @Test("N ranks train as one under mpirun: losses of -np 1, 2, 4 agree over 20 steps")
    func worldSizeInvariance() throws {
        let one = try shared.rows(np: 1)
        #expect(one.count == 20 && one.allSatisfy { $0.world_size == 1 })
        for np in [2, 4] {
            let rows = try shared.rows(np: np)
            #expect(rows.count == 20 && rows.allSatisfy { $0.world_size == np })
            for (a, b) in zip(one, rows) {
                #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "step \(a.step): \(a.loss) vs \(b.loss) with \(np) ranks")
            }
            #expect(rows.last?.val_loss != nil)
            // The first step's gradient (summed over ranks) is the single process's gradient over the same batch.
            #expect(abs(one[0].grad_norm - rows[0].grad_norm) <= 1e-5 * one[0].grad_norm)
        }
    }

    @Test("exact accumulation: -np 1 --accum-steps 4, -np 2 --accum-steps 2 and -np 4 train alike; with SyncBN any W at one K; resume with another K and W")
    func accumulation() throws {
        func agree(_ a: [Row], _ b: [Row], _ what: String) {
            #expect(a.count == 20 && b.count == 20, "\(what): \(a.count) and \(b.count) rows")
            for (x, y) in zip(a, b) {
                #expect(abs(x.loss - y.loss) <= Self.lossBound(step: x.step) * abs(x.loss), "\(what), step \(x.step): \(x.loss) vs \(y.loss)")
            }
        }
        // Per-rank BatchNorm: each micro-batch normalises the same b = 8 / 4 pairs in every layout.
        let reference = try shared.rows(np: 4, ["--no-sync-bn"])
        agree(reference, try shared.rows(np: 1, ["--no-sync-bn", "--accum-steps", "4"]), "-np 1 --accum-steps 4 against -np 4")
        agree(reference, try shared.rows(np: 2, ["--no-sync-bn", "--accum-steps", "2"]), "-np 2 --accum-steps 2 against -np 4")
        // SyncBN: a micro-batch normalises over its pairs on every rank (B/K of them), whatever the world size.
        agree(try shared.rows(np: 1, ["--accum-steps", "2"]), try shared.rows(np: 2, ["--accum-steps", "2"]), "SyncBN, K = 2: -np 2 against -np 1")

        // Checkpoints and resume: 10 steps on 1 rank with K = 4, then on 2 ranks with K = 2 to 20.
        let mpirun = try #require(SharedRuns.mpirun)
        let data = try shared.data()
        let runDir = "\(dir)/accumulated-resume"
        let common = ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--retrieval-eval", "0", "--no-sync-bn", "--checkpoint-every", "10"]
        let first = try run(mpirun, ["--oversubscribe", "-np", "1", convirtPath()] + common + ["--steps", "10", "--accum-steps", "4"],
                            environment: Self.mpiEnvironment, timeout: 300)
        #expect(first.status == 0, "\(first.output)")
        let second = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath()] + common + ["--steps", "20", "--accum-steps", "2", "--resume"],
                             environment: Self.mpiEnvironment, timeout: 300)
        #expect(second.status == 0 && second.output.contains("resuming from"), "\(second.output)")
        agree(reference, try Self.rows(of: runDir), "1 rank K = 4 resumed on 2 ranks K = 2, against -np 4")
        let bad = try run(convirtPath(), ["train", "--data", data, "--run-dir", "\(dir)/accum-bad", "--preset", "tiny", "--accum-steps", "3"])
        #expect(bad.status == 1 && bad.output.contains("does not divide into 1 rank(s) x 3 micro-batches"), "\(bad.output)")
    }

    /// BERT's per-token layers on the valid tokens alone (the default) or on every padded position
    /// (`CONVIRT_TEXT_ROWS=padded`) compute the same sentence embeddings: the same products of the same
    /// rows, the same dropout masks; only the order of the weight gradients' sums may differ, as between
    /// world sizes. On 2 ranks, so that packed pieces are cut from each rank's share.
    @Test("packed and padded text rows train alike: the losses of 20 steps on 2 ranks agree")
    func packedTextRows() throws {
        let packed = try shared.rows(np: 2), padded = try shared.rows(np: 2, environment: ["CONVIRT_TEXT_ROWS": "padded"])
        #expect(packed.count == 20 && padded.count == 20)
        for (a, b) in zip(padded, packed) {
            #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "step \(a.step): \(a.loss) padded, \(b.loss) packed")
        }
    }

    @Test("ZeRO-1 under mpirun (Adam state sharded over 2 and 4 ranks) trains as replicated Adam")
    func zero1() throws {
        let one = try shared.rows(np: 1)
        for np in [2, 4] {
            let rows = try shared.rows(np: np, ["--zero1"])
            #expect(rows.count == 20)
            for (a, b) in zip(one, rows) {
                #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "--zero1 on \(np) ranks, step \(a.step)")
            }
        }
    }

    /// Ranks on one machine sum their gradients through shared memory by default (each rank its slice,
    /// over every rank's buffer, in rank order); MPI's collectives sum the same numbers in their own order.
    /// A sum of two is the same either way round: bitwise on 2 ranks, replicated and ZeRO-1; within the
    /// world-size bound on 4.
    @Test("gradients summed through shared memory and by MPI's collectives: bitwise on 2 ranks, replicated and ZeRO-1 alike; alike on 4")
    func gradientExchange() throws {
        for extra in [[], ["--zero1"]] {
            let shm = try shared.rows(np: 2, extra), mpi = try shared.rows(np: 2, extra + ["--gradient-exchange", "collectives"])
            #expect(shm.count == 20 && shm.map(\.loss) == mpi.map(\.loss) && shm.map(\.grad_norm) == mpi.map(\.grad_norm)
                    && shm.map(\.val_loss) == mpi.map(\.val_loss), "2 ranks \(extra): shared memory and collectives differ")
        }
        // The gradient norm has one structure (each shard's squares, then the shards in rank order) whoever
        // holds the sums: replicated ranks and ZeRO-1's train alike, bit for bit.
        let replicated = try shared.rows(np: 2), zero1 = try shared.rows(np: 2, ["--zero1"])
        #expect(replicated.map(\.loss) == zero1.map(\.loss) && replicated.map(\.grad_norm) == zero1.map(\.grad_norm),
                "2 ranks: replicated and ZeRO-1 differ")
        let shm = try shared.rows(np: 4), mpi = try shared.rows(np: 4, ["--gradient-exchange", "collectives"])
        #expect(shm.count == 20 && mpi.count == 20)
        for (a, b) in zip(shm, mpi) { #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "4 ranks, step \(a.step)") }
        // What the run says it does, and the flag's check.
        let data = try shared.data(), mpirun = try #require(SharedRuns.mpirun)
        let said = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/exchange-said",
                                    "--preset", "tiny", "--steps", "2", "--retrieval-eval", "0", "--gradient-exchange", "shared-memory"],
                           environment: Self.mpiEnvironment, timeout: 300)
        #expect(said.status == 0 && said.output.contains("gradients summed over ranks by shared memory (/dev/shm)"), "\(said.output)")
        // A full /dev/shm on rank 1 (fault injection): every rank falls back to the collectives alike and says
        // why; the run is the collectives' own. Asked for shared memory, every rank stops with the reason.
        let full = try shared.rows(np: 2, ["--gradient-exchange", "auto"], environment: ["CONVIRT_FAULT_SHM_FULL": "1"])
        let collectives = try shared.rows(np: 2, ["--gradient-exchange", "collectives"])
        #expect(full.map(\.loss) == collectives.map(\.loss), "the fallback after a full /dev/shm is not the collectives' run")
        // Replicated ranks on one machine split Adam's update through their shared parameters; without that
        // memory each updates everything: the same run, bit for bit.
        let unsplit = try shared.rows(np: 2, [], environment: ["CONVIRT_FAULT_SHM_FULL": "1:parameters"]), split = try shared.rows(np: 2, [])
        #expect(unsplit.count == 20 && unsplit.map(\.loss) == split.map(\.loss) && unsplit.map(\.grad_norm) == split.map(\.grad_norm),
                "replicated ranks updating everything against their own shards")
        let fallback = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/exchange-full",
                                        "--preset", "tiny", "--steps", "1", "--retrieval-eval", "0", "--overwrite"],
                               environment: Self.mpiEnvironment.merging(["CONVIRT_FAULT_SHM_FULL": "1"]) { $1 }, timeout: 300)
        #expect(fallback.status == 0 && fallback.output.contains("gradients summed over ranks by MPI collectives (no shared memory: shared memory for the "
                                                                 + "gradients (creating this rank's buffer), rank 1: posix_fallocate")
                && fallback.output.contains("No space left on device"), "\(fallback.output)")
        let refused = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/exchange-refused",
                                       "--preset", "tiny", "--steps", "1", "--retrieval-eval", "0", "--gradient-exchange", "shared-memory", "--overwrite"],
                              environment: Self.mpiEnvironment.merging(["CONVIRT_FAULT_SHM_FULL": "1"]) { $1 }, timeout: 300)
        #expect(refused.status != 0 && refused.status != 124 && refused.output.contains("rank 1: posix_fallocate"), "\(refused.output)")
        // Replicated ranks without shared memory for their parameters still sum through it, each then updating everything.
        let noParameters = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/exchange-parameters",
                                            "--preset", "tiny", "--steps", "2", "--retrieval-eval", "0", "--overwrite"],
                                   environment: Self.mpiEnvironment.merging(["CONVIRT_FAULT_SHM_FULL": "1:parameters"]) { $1 }, timeout: 300)
        #expect(noParameters.status == 0 && noParameters.output.contains("gradients summed over ranks by shared memory (/dev/shm); each rank updates "
                                                                         + "every parameter (no shared memory for them: shared memory for the "
                                                                         + "parameters (creating this rank's buffer), rank 1: posix_fallocate"),
                "\(noParameters.output)")
        // The benchmark of the sums alone checks every sum it times (each rank's gradients are r + 1).
        let bench = try run(mpirun, ["--oversubscribe", "-np", "3", convirtPath(), "bench", "exchange", "--preset", "tiny", "--steps", "2"],
                            environment: Self.mpiEnvironment, timeout: 300)
        #expect(bench.status == 0 && bench.output.contains("sums checked on every rank")
                && ["replicated shared memory (/dev/shm): sum", "replicated MPI collectives: sum", "ZeRO-1 shared memory (/dev/shm): sum",
                    "ZeRO-1 MPI collectives: sum", "parameter all-gather"].allSatisfy { bench.output.contains($0) }, "\(bench.output)")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
        #expect(!left.contains { $0.hasPrefix("convirt-") }, "shared-memory objects left in /dev/shm: \(left)")
    }

    @Test("two hosts (network namespaces, TCP): 1 and 2 ranks on each train as one process")
    func twoHosts() throws {
        let one = try shared.rows(np: 1)
        let data = try shared.data()
        let cluster = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("cluster/netns-cluster.sh").path
        let up = try run(cluster, ["up", "2"])
        #expect(up.status == 0, "network namespaces (run as root): \(up.output)")
        defer { _ = try? run(cluster, ["down", "2"]) }
        // Bounded. The start-up stall seen earlier (an orted crashing in hwloc's shared-memory topology when
        // several share one machine) is fixed in netns-cluster.sh, but Open MPI's start over the namespaces'
        // TCP still stalled once in about 20 full suites (December 3: cut off at 90 s with no output at
        // all, convirt never started): a start that printed nothing gets one more try. A job that started
        // and then hung or failed is a failure.
        func attempt() throws -> (status: Int32, output: String) {
            try run(cluster, ["run", "2", "--", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/run-hosts",
                              "--preset", "tiny", "--steps", "20", "--retrieval-eval", "0", "--precision", "fp32"],
                    environment: ["CONVIRT_CLUSTER_TIMEOUT": "90"], timeout: 150)
        }
        var hosts = try attempt()
        if hosts.status != 0 && !hosts.output.contains("convirt train:") {
            print("two hosts: Open MPI's start stalled (status \(hosts.status), no output from convirt); starting once more")
            try? FileManager.default.removeItem(atPath: "\(dir)/run-hosts")
            hosts = try attempt()
        }
        #expect(hosts.status == 0, "\(hosts.output)")
        #expect(hosts.output.contains("gradients summed over ranks by MPI collectives (one rank to a machine"), "\(hosts.output)")
        let hostRows = try Self.rows(of: "\(dir)/run-hosts")
        #expect(hostRows.count == 20)
        for (a, b) in zip(one, hostRows) { #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "2 hosts, step \(a.step)") }
        // Two ranks on each host (0 and 2 on one, 1 and 3 on the other): gradients summed through shared
        // memory on each host and by MPI between them (each rank its half), replicated and ZeRO-1.
        for extra in [[], ["--zero1"]] {
            let runDir = "\(dir)/run-hosts-2x2\(extra.joined())"
            func pairAttempt() throws -> (status: Int32, output: String) {
                try run(cluster, ["run", "2", "--", convirtPath(), "train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--steps", "20",
                                  "--retrieval-eval", "0", "--precision", "fp32", "--overwrite"] + extra,
                        environment: ["CONVIRT_CLUSTER_TIMEOUT": "90", "CONVIRT_CLUSTER_SLOTS": "2"], timeout: 150)
            }
            var pairs = try pairAttempt()
            if pairs.status != 0 && !pairs.output.contains("convirt train:") {
                print("two hosts x 2 ranks: Open MPI's start stalled (status \(pairs.status), no output from convirt); starting once more")
                pairs = try pairAttempt()
            }
            #expect(pairs.status == 0 && pairs.output.contains("shared memory (/dev/shm) within each of 2 machines, MPI across them"), "\(pairs.output)")
            let rows = try Self.rows(of: runDir)
            #expect(rows.count == 20 && rows.allSatisfy { $0.world_size == 4 })
            for (a, b) in zip(one, rows) {
                #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "2 hosts x 2 ranks \(extra), step \(a.step)")
            }
            #expect(abs(one[0].grad_norm - rows[0].grad_norm) <= 1e-5 * one[0].grad_norm, "2 hosts x 2 ranks \(extra): the first gradient")
        }
        // The collective watchdog over TCP: the rank on the other host stops at step 6 and is named.
        func stalledAttempt() throws -> (status: Int32, output: String) {
            try run(cluster, ["run", "2", "--", "-x", "CONVIRT_FAULT_STALL", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/run-hosts-stalled",
                              "--preset", "tiny", "--steps", "20", "--retrieval-eval", "0", "--precision", "fp32", "--collective-timeout", "3", "--overwrite"],
                    environment: ["CONVIRT_CLUSTER_TIMEOUT": "90", "CONVIRT_FAULT_STALL": "6:1"], timeout: 150)
        }
        var stalled = try stalledAttempt()
        if !stalled.output.contains("convirt train:") {
            print("two hosts, stalled rank: Open MPI's start stalled (status \(stalled.status), no output from convirt); starting once more")
            stalled = try stalledAttempt()
        }
        #expect(stalled.status != 0 && stalled.status != 124, "\(stalled.output)")
        #expect(stalled.output.contains("collective timeout on rank 0 of 2") && stalled.output.contains("Rank 1 did not answer"), "\(stalled.output)")
    }

    @Test("resume: bitwise at the same world size, within rounding on 1 and 4 ranks; damaged checkpoints and fallback")
    func resume() throws {
        let mpirun = try #require(SharedRuns.mpirun)
        try checkpointsAndResume(mpirun: mpirun, dir: dir, uninterrupted: shared.rows(np: 2))
    }

    @Test("checkpoint I/O modes write identical shards; gathered checkpoints resume without a shared filesystem")
    func checkpointIO() throws {
        let mpirun = try #require(SharedRuns.mpirun)
        try checkpointModes(mpirun: mpirun, dir: dir, uninterrupted: shared.rows(np: 2))
    }

    @Test("faults: a kill after a shard is written, a full disk, tampered manifests")
    func checkpointFaultsTest() throws {
        let mpirun = try #require(SharedRuns.mpirun)
        try checkpointFaults(mpirun: mpirun, dir: dir, uninterrupted: shared.rows(np: 2))
    }

    /// The paper schedule: validation every K steps, the LR halved after `patience` checks without
    /// improvement, the best checkpoint kept by retention.
    @Test("the paper schedule validates every K steps and keeps the best checkpoint")
    func paperSchedule() throws {
        let data = try shared.data()
        let paper = try run(convirtPath(), ["train", "--data", data, "--run-dir", "\(dir)/paper", "--preset", "tiny", "--schedule", "paper",
                                            "--val-every", "5", "--steps", "30", "--patience", "2", "--keep-checkpoints", "1", "--retrieval-eval", "0"])
        #expect(paper.status == 0, "\(paper.output)")
        let best = try String(contentsOfFile: "\(dir)/paper/checkpoints/best", encoding: .utf8)
        #expect(FileManager.default.fileExists(atPath: "\(dir)/paper/checkpoints/\(best)/manifest.json"), "best checkpoint \(best) kept")
        let paperRows = try String(contentsOfFile: "\(dir)/paper/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(paperRows.filter { $0.contains("val_loss") }.count == 6)
    }

    /// A rank killed with SIGKILL mid-training ends the job on every rank within seconds; relaunched
    /// with --resume, the run ends with the parameters of a run that never stopped.
    @Test("a rank killed with SIGKILL ends the job; the relaunched run ends with the uninterrupted parameters and metrics, in both checkpoint modes",
          arguments: [[String](), ["--sync-checkpoint"]])
    func killedRank(mode: [String]) throws {
        let mpirun = try #require(SharedRuns.mpirun)
        let data = try shared.data()
        let killed = "\(dir)/killed\(mode.joined())"
        try killOneRank(mpirun: mpirun, data: data, runDir: killed, extra: mode)
        _ = try referenceRun(mpirun: mpirun, data: data)
        let relaunched = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", killed,
                                          "--preset", "demo", "--steps", "40", "--global-batch", "8", "--checkpoint-every", "5", "--resume",
                                          "--retrieval-eval", "0"] + mode, environment: Self.mpiEnvironment, timeout: 300)
        #expect(relaunched.status == 0 && relaunched.output.contains("resuming from"), "\(relaunched.output)")
        let final = "\(killed)-final", referenceFinal = "\(dir)/final-reference"
        for (path, out) in [("\(dir)/reference", referenceFinal), (killed, final)] where !FileManager.default.fileExists(atPath: "\(out)/image_head.safetensors") {
            let e = try run(convirtPath(), ["checkpoint", "export", path, "--out", out])
            #expect(e.status == 0 && e.output.contains("exported step 40"), "\(e.output)")
        }
        for file in ["image_encoder.safetensors", "text_encoder/model.safetensors", "image_head.safetensors", "text_head.safetensors"] {
            #expect(FileManager.default.contents(atPath: "\(referenceFinal)/\(file)") == FileManager.default.contents(atPath: "\(final)/\(file)"),
                    "\(file): the resumed run ends with other parameters than the uninterrupted one")
        }
        // Row by row: every step once, with the uninterrupted run's values.
        let rows = try Self.rows(of: killed), reference = try Self.rows(of: "\(dir)/reference")
        #expect(rows.map(\.step) == Array(1...40), "\(mode): \(rows.map(\.step))")
        for (a, b) in zip(rows, reference) { #expect(a.loss == b.loss && a.grad_norm == b.grad_norm, "\(mode) step \(a.step)") }
    }

    /// The demo preset's 40 steps on 2 ranks, never interrupted (run once).
    func referenceRun(mpirun: String, data: String) throws -> String {
        if !FileManager.default.fileExists(atPath: "\(dir)/reference/checkpoints/latest") {
            let reference = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/reference",
                                             "--preset", "demo", "--steps", "40", "--global-batch", "8", "--retrieval-eval", "0"],
                                    environment: Self.mpiEnvironment, timeout: 300)
            #expect(reference.status == 0, "\(reference.output)")
        }
        return "\(dir)/reference"
    }

    /// cluster/convirt.sbatch outside Slurm (mpirun then runs the ranks on this machine): the first
    /// submission starts the run, the same command submitted again continues it from its checkpoint, and
    /// the 20 steps are bitwise those of one uninterrupted run on 2 ranks.
    @Test("cluster/convirt.sbatch submitted again resumes its run")
    func slurmScriptResumes() throws {
        let uninterrupted = try shared.rows(np: 2)
        let data = try shared.data()
        let runDir = "\(dir)/run-sbatch"
        try? FileManager.default.removeItem(atPath: runDir)
        var environment = Self.mpiEnvironment
        environment["CONVIRT_BIN"] = convirtPath()
        environment["SLURM_SUBMIT_DIR"] = dir
        environment["SLURM_NTASKS_PER_NODE"] = "2"
        environment["SLURM_CPUS_PER_TASK"] = "1"
        environment["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
        let script = "\(repository)/cluster/convirt.sbatch"
        let arguments = ["--data", data, "--run-dir", runDir, "--preset", "tiny", "--retrieval-eval", "0", "--checkpoint-every", "5"]
        let first = try run(script, arguments + ["--steps", "10"], environment: environment, timeout: 180)
        #expect(first.status == 0 && first.output.contains("no checkpoint in"), "\(first.output)")
        let second = try run(script, arguments + ["--steps", "20"], environment: environment, timeout: 180)
        #expect(second.status == 0 && second.output.contains("at step 10"), "\(second.output)")
        let rows = try Self.rows(of: runDir)
        #expect(rows.map(\.step) == Array(1...20) && rows.allSatisfy { $0.world_size == 2 }, "\(rows.map(\.step))")
        for (a, b) in zip(uninterrupted, rows) { #expect(a.loss == b.loss && a.grad_norm == b.grad_norm, "step \(a.step): \(a.loss) against \(b.loss)") }
    }

    /// SIGUSR1 on one rank (CONVIRT_FAULT_STOP_SIGNAL: rank 1 sends it to itself during step 13): both ranks
    /// stop after step 13 with its checkpoint and exit 75; resumed, the run ends as the uninterrupted one.
    /// Then the signal as a user or Slurm sends it, to launch.sh, which passes it to mpirun and on to the ranks.
    @Test("SIGUSR1 stops every rank after the same step with its checkpoint (exit 75); the resumed run ends as an uninterrupted one")
    func stopOnRequest() throws {
        let mpirun = try #require(SharedRuns.mpirun)
        let data = try shared.data()
        let reference = try referenceRun(mpirun: mpirun, data: data)
        let stopped = "\(dir)/stopped"
        try? FileManager.default.removeItem(atPath: stopped)
        let train = ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", stopped, "--preset", "demo", "--steps", "40",
                     "--global-batch", "8", "--retrieval-eval", "0"]
        let first = try run(mpirun, train, environment: Self.mpiEnvironment.merging(["CONVIRT_FAULT_STOP_SIGNAL": "13:1"]) { $1 }, timeout: 300)
        #expect(first.status == 75 && first.output.contains("stopped on SIGUSR1 after step 13 of 40, its checkpoint written"), "\(first.output)")
        #expect(try Self.rows(of: stopped).map(\.step) == Array(1...13))
        #expect((try? String(contentsOfFile: "\(stopped)/checkpoints/latest", encoding: .utf8))?.contains("step-00000013") == true)
        let resumed = try run(mpirun, train + ["--resume"], environment: Self.mpiEnvironment, timeout: 300)
        #expect(resumed.status == 0 && resumed.output.contains("resuming from") && resumed.output.contains("at step 13"), "\(resumed.output)")
        let rows = try Self.rows(of: stopped), expected = try Self.rows(of: reference)
        #expect(rows.map(\.step) == Array(1...40))
        for (a, b) in zip(rows, expected) { #expect(a.loss == b.loss && a.grad_norm == b.grad_norm, "step \(a.step)") }

        // The signal from outside, to launch.sh: the job stops at once after a checkpoint and is not restarted.
        // launch.sh's build is a stand-in swift that links the tested binary (as in launchBuildsOnce).
        let build = "\(dir)/stop-build", tools = "\(dir)/stop-tools"
        try FileManager.default.createDirectory(atPath: "\(build)/release", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: tools, withIntermediateDirectories: true)
        try """
            #!/bin/sh
            case "$*" in
              *--show-bin-path*) echo \(build)/release ;;
              *) ln -sf \(convirtPath()) \(build)/release/convirt ;;
            esac
            """.write(toFile: "\(tools)/swift", atomically: true, encoding: .utf8)
        chmod("\(tools)/swift", 0o755)
        let long = "\(dir)/stopped-long"
        try? FileManager.default.removeItem(atPath: long)
        // Started as a shell starts it, with no signal blocked (this test process blocks most, and a child
        // inherits the mask: bash cannot unblock a signal to trap it).
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/perl")
        process.arguments = ["-e", "use POSIX; sigprocmask(SIG_SETMASK, POSIX::SigSet->new) or die; exec @ARGV or die", "--",
                             "\(repository)/launch.sh", "-np", "2", "--max-restarts", "3", "--", "train", "--data", data, "--run-dir", long,
                             "--preset", "tiny", "--steps", "1000000", "--retrieval-eval", "0"]
        var env = ProcessInfo.processInfo.environment
        for (k, v) in Self.mpiEnvironment { env[k] = v }
        env["CONVIRT_BUILD_PATH"] = build
        env["PATH"] = tools + ":" + (env["PATH"] ?? "/usr/bin:/bin")
        process.environment = env
        let log = "\(dir)/stopped-long.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline, process.isRunning, ((try? String(contentsOfFile: "\(long)/metrics.jsonl", encoding: .utf8))?.split(separator: "\n").count ?? 0) < 3 {
            Thread.sleep(forTimeInterval: 0.05)
        }
        kill(process.processIdentifier, SIGUSR1)
        let signalled = Date()
        while process.isRunning && Date().timeIntervalSince(signalled) < 60 { Thread.sleep(forTimeInterval: 0.05) }
        if process.isRunning {
            Issue.record("the job still ran 60 s after SIGUSR1")
            kill(process.processIdentifier, SIGKILL)
            _ = try run("/usr/bin/pkill", ["-KILL", "-f", "--run-dir \(long)"])
        }
        process.waitUntilExit()
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(process.terminationStatus == 75 && output.contains("launch.sh: the job stopped on request (SIGUSR1)") && !output.contains("restart 1"),
                "\(output)")
        let last = try #require(try Self.rows(of: long).last?.step)
        #expect((try? String(contentsOfFile: "\(long)/checkpoints/latest", encoding: .utf8))?.contains(String(format: "step-%08d", last)) == true,
                "the checkpoint of the last step, \(last)")
    }

    /// A rank that stops (CONVIRT_FAULT_STALL: it sleeps at the start of step 12) leaves the others waiting
    /// in a collective. Past --collective-timeout each of them reports what it waited in and names the
    /// stalled rank (stderr and its report file), and the job ends non-zero with no rank left running;
    /// relaunched with --resume, the run ends with the uninterrupted run's losses.
    @Test("a stalled rank is named by every other rank within the collective timeout; the relaunched run resumes", arguments: [2, 4])
    func stalledRank(np: Int) throws {
        let mpirun = try #require(SharedRuns.mpirun)
        let data = try shared.data()
        let runDir = "\(dir)/stalled\(np)", victim = np / 2, timeout = 3.0
        let arguments = ["--oversubscribe", "-np", "\(np)", convirtPath(), "train", "--data", data, "--run-dir", runDir, "--preset", "tiny",
                         "--steps", "20", "--checkpoint-every", "5", "--retrieval-eval", "0", "--collective-timeout", "\(Int(timeout))"]
        let started = Date()
        let stalled = try run(mpirun, arguments, environment: Self.mpiEnvironment.merging(["CONVIRT_FAULT_STALL": "12:\(victim)"]) { $1 }, timeout: 120)
        let seconds = Date().timeIntervalSince(started)
        #expect(stalled.status != 0, "\(stalled.output)")
        #expect(seconds < 60, "the stalled job took \(seconds) s to end")
        let left = try run("/usr/bin/pgrep", ["-f", "convirt train --data \(data) --run-dir \(runDir) "]).output
        #expect(left.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "ranks left running: \(left)")
        struct Report: Decodable {
            struct Activity: Decodable { let rank: Int; let step: Int; let phase: String; let collective: String; let waited_s: Double; let sequence: Int }
            let silent: [Int]; let answered: [Activity]; let this_rank: Activity; let expired_here: Bool; let timeout_s: Double; let verdict: String
        }
        for rank in 0..<np where rank != victim {
            #expect(stalled.output.contains("collective timeout on rank \(rank) of \(np)"), "rank \(rank) printed no report: \(stalled.output)")
            let path = "\(runDir)/collective-timeout.rank\(rank).json"
            let report = try JSONDecoder().decode(Report.self, from: try #require(FileManager.default.contents(atPath: path), "no \(path)"))
            #expect(report.silent == [victim] && report.timeout_s == timeout, "\(path): \(report.verdict)")
            #expect(report.answered.map(\.rank) == (0..<np).filter { $0 != victim }, "\(path): \(report.verdict)")
            #expect(report.verdict.hasPrefix("Rank \(victim) did not answer"), "\(path): \(report.verdict)")
            // Every other rank waits in step 12's first collective; the one that timed out first waited the
            // deadline (to within the 50 ms of its checks), the others at most that long.
            #expect(report.this_rank.step == 12 && report.this_rank.phase == "batch" && report.this_rank.collective == "MPI_Allreduce")
            #expect(Set(report.answered.map(\.sequence)).count == 1)
            #expect(report.this_rank.waited_s < timeout + 0.5, "rank \(rank) waited \(report.this_rank.waited_s) s")
            if report.expired_here { #expect(report.this_rank.waited_s >= timeout) }
        }
        #expect(!FileManager.default.fileExists(atPath: "\(runDir)/collective-timeout.rank\(victim).json"))
        let report = try run(convirtPath(), ["report", runDir])
        let html = try String(contentsOfFile: "\(runDir)/report.html", encoding: .utf8)
        #expect(report.status == 0 && html.contains("Collective timeout") && html.contains("Rank \(victim) did not answer"), "\(report.output)")
        let resumed = try run(mpirun, arguments + ["--resume"], environment: Self.mpiEnvironment, timeout: 300)
        // Step 5's checkpoint is committed by step 12 (step 10's may be too).
        #expect(resumed.status == 0 && (resumed.output.contains("at step 5\n") || resumed.output.contains("at step 10\n")), "\(resumed.output)")
        let rows = try Self.rows(of: runDir), reference = try shared.rows(np: np)
        #expect(rows.map(\.step) == Array(1...20))
        for (a, b) in zip(rows, reference) { #expect(a.loss == b.loss && a.grad_norm == b.grad_norm, "-np \(np) step \(a.step)") }
    }

    /// The outlier guard (llm.c's -sl / -sg) with a spike injected at step 16 (CONVIRT_FAULT_SPIKE: the
    /// loss and the gradients x1000 on every rank): skipped and counted alike on 1 and 2 ranks, the steps
    /// before it those of a run without guard; a run stopped at step 12 and resumed decides as the
    /// uninterrupted one (the window travels in the checkpoint); one skip too many stops the run.
    @Test("the outlier guard skips an injected spike alike on 1 and 2 ranks, resumes bitwise with its window, and stops after n in a row")
    func outlierGuard() throws {
        let mpirun = try #require(SharedRuns.mpirun)
        let data = try shared.data()
        struct GuardRow: Decodable { let step: Int; let loss: Double; let grad_norm: Double; let skipped: Bool?; let skipped_steps: Int? }
        let guardFlags = ["--skip-loss-z", "6", "--skip-grad-z", "6", "--outlier-window", "8"]
        func train(_ np: Int, _ runDir: String, _ extra: [String]) throws -> (status: Int32, output: String, rows: [GuardRow]) {
            let result = try run(mpirun, ["--oversubscribe", "-np", "\(np)", convirtPath(), "train", "--data", data, "--run-dir", runDir,
                                          "--preset", "tiny", "--retrieval-eval", "0"] + guardFlags + extra,
                                 environment: Self.mpiEnvironment.merging(["CONVIRT_FAULT_SPIKE": "16:1000"]) { $1 }, timeout: 300)
            let text = (try? String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8)) ?? ""
            let rows = try text.split(separator: "\n").map { try JSONDecoder().decode(GuardRow.self, from: Data($0.utf8)) }
            return (result.status, result.output, rows)
        }
        var runs: [[GuardRow]] = []
        for np in [1, 2] {
            let guarded = try train(np, "\(dir)/guard\(np)", ["--steps", "20", "--overwrite"])
            #expect(guarded.status == 0, "\(guarded.output)")
            #expect(guarded.rows.map(\.step) == Array(1...20))
            #expect(guarded.rows.map { $0.skipped == true } == (1...20).map { $0 == 16 }, "-np \(np): \(guarded.rows.map { $0.skipped ?? false })")
            #expect(guarded.rows.map { $0.skipped_steps ?? -1 } == (1...20).map { $0 < 16 ? 0 : 1 })
            #expect(guarded.output.contains("step 16 skipped as an outlier"), "\(guarded.output)")
            // Until the spike, the guard changes nothing; the spike's row shows the spiked loss.
            let plain = try shared.rows(np: np)
            for (a, b) in zip(guarded.rows.prefix(15), plain) { #expect(a.loss == b.loss && a.grad_norm == b.grad_norm, "-np \(np) step \(a.step)") }
            #expect(guarded.rows[15].loss == plain[15].loss * 1000)
            runs.append(guarded.rows)
        }
        for (a, b) in zip(runs[0], runs[1]) {
            #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "step \(a.step): \(a.loss) on 1 rank, \(b.loss) on 2")
        }
        // Stopped at step 12 (a checkpoint at the end), resumed to 20: the uninterrupted run's rows, bit for bit.
        let first = try train(2, "\(dir)/guard-resumed", ["--steps", "12", "--overwrite"])
        #expect(first.status == 0, "\(first.output)")
        let resumed = try train(2, "\(dir)/guard-resumed", ["--steps", "20", "--resume"])
        #expect(resumed.status == 0 && resumed.output.contains("at step 12"), "\(resumed.output)")
        #expect(resumed.rows.map(\.step) == Array(1...20))
        for (a, b) in zip(resumed.rows, runs[1]) {
            #expect(a.loss == b.loss && a.grad_norm == b.grad_norm && a.skipped == b.skipped && a.skipped_steps == b.skipped_steps, "resumed, step \(a.step)")
        }
        // One skip allowed in a row: the spike stops the run, on every rank, with no checkpoint past it.
        let stopped = try train(2, "\(dir)/guard-stopped", ["--steps", "20", "--overwrite", "--max-consecutive-skips", "1"])
        #expect(stopped.status != 0 && stopped.output.contains("step 16: 1 step skipped as an outlier (last: loss"), "\(stopped.output)")
        #expect(stopped.rows.count == 15)
    }

    /// --exclude-identical-texts: the synthetic reports repeat, so some global batches hold equal
    /// sentences; every world size finds the same pairs (all-gathered token ids) and trains alike. Steps
    /// before the first exclusion are those of the plain run; the first one's loss is lower (fewer negatives).
    @Test("false negatives: identical sentences are excluded alike on 1, 2 and 4 ranks, and counted")
    func identicalTexts() throws {
        struct FNRow: Decodable { let step: Int; let loss: Double; let excluded_negatives: Int?; let val_loss: Double? }
        var counts: [[Int]] = [], runs: [[FNRow]] = []
        for np in [1, 2, 4] {
            _ = try shared.rows(np: np, ["--exclude-identical-texts"])
            let runDir = "\(dir)/run\(np)--exclude-identical-texts"
            let rows = try String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
                .map { try JSONDecoder().decode(FNRow.self, from: Data($0.utf8)) }
            #expect(rows.count == 20)
            counts.append(rows.map { $0.excluded_negatives ?? -1 })
            runs.append(rows)
        }
        #expect(counts[0].allSatisfy { $0 >= 0 && $0 % 2 == 0 } && counts[0].reduce(0, +) > 0, "\(counts[0])")
        #expect(counts[1] == counts[0] && counts[2] == counts[0], "\(counts)")
        for rows in runs.dropFirst() {
            for (a, b) in zip(runs[0], rows) { #expect(abs(a.loss - b.loss) <= Self.lossBound(step: a.step) * abs(a.loss), "step \(a.step)") }
        }
        let plain = try shared.rows(np: 1), first = try #require(counts[0].firstIndex { $0 > 0 })
        for k in 0..<first { #expect(runs[0][k].loss == plain[k].loss, "step \(k + 1)") }
        #expect(runs[0][first].loss < plain[first].loss)
    }

    @Test("a global batch that does not divide by the ranks is refused on every rank, without a hang")
    func indivisibleBatch() throws {
        let mpirun = try #require(SharedRuns.mpirun)
        let bad = try run(mpirun, ["--oversubscribe", "-np", "3", convirtPath(), "train", "--data", shared.data(), "--run-dir", "\(dir)/bad",
                                   "--preset", "tiny", "--global-batch", "8", "--steps", "2"], environment: Self.mpiEnvironment, timeout: 120)
        #expect(bad.status != 0 && bad.output.contains("does not divide by the 3 ranks"), "\(bad.output)")
    }

    func killOneRank(mpirun: String, data: String, runDir: String, extra: [String] = []) throws {
        try? FileManager.default.removeItem(atPath: runDir)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: mpirun)
        process.arguments = ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", runDir, "--preset", "demo",
                             "--steps", "40", "--global-batch", "8", "--checkpoint-every", "5", "--retrieval-eval", "0"] + extra
        var env = ProcessInfo.processInfo.environment
        for (k, v) in Self.mpiEnvironment { env[k] = v }
        process.environment = env
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Wait until training runs past a committed checkpoint (asynchronous ones commit a few steps after
        // they start), then kill one rank (not mpirun).
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline, ((try? String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8))?.split(separator: "\n").count ?? 0) < 7
                || !FileManager.default.fileExists(atPath: "\(runDir)/checkpoints/latest") {
            Thread.sleep(forTimeInterval: 0.02)
        }
        let ranks = try run("/usr/bin/pgrep", ["-f", "convirt train --data \(data) --run-dir \(runDir)"]).output
            .split(separator: "\n").compactMap { Int32($0) }.filter { $0 != process.processIdentifier }
        let victim = try #require(ranks.last, "no rank process found")
        let killed = Date()
        kill(victim, SIGKILL)
        while process.isRunning && Date().timeIntervalSince(killed) < 30 { Thread.sleep(forTimeInterval: 0.05) }
        let seconds = Date().timeIntervalSince(killed)
        if process.isRunning { process.terminate(); Issue.record("the job still ran 30 s after a rank was killed") }
        process.waitUntilExit()
        #expect(process.terminationStatus != 0)
        #expect(seconds < 15, "the job took \(seconds) s to end")
        let left = try run("/usr/bin/pgrep", ["-f", "convirt train --data \(data) --run-dir \(runDir)"]).output
        #expect(left.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "ranks left running: \(left)")
    }

    /// Exact resume at the same world size, resume on 1 and 4 ranks, damaged checkpoints, leftovers.
    func checkpointsAndResume(mpirun: String, dir: String, uninterrupted: [Row]) throws {
        func train(_ np: Int, _ runDir: String, _ extra: [String]) throws -> [Row] {
            let r = try run(mpirun, ["--oversubscribe", "-np", "\(np)", convirtPath(), "train", "--data", "\(dir)/prepared", "--run-dir", runDir,
                                     "--preset", "tiny", "--retrieval-eval", "0"] + extra, environment: Self.mpiEnvironment, timeout: 300)
            #expect(r.status == 0, "\(r.output)")
            return try String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
                .map { try JSONDecoder().decode(Row.self, from: Data($0.utf8)) }
        }
        let resumedDir = "\(dir)/resumed"
        _ = try train(2, resumedDir, ["--steps", "10", "--checkpoint-every", "5"])
        let checkpoints = "\(resumedDir)/checkpoints"
        #expect(FileManager.default.fileExists(atPath: "\(checkpoints)/step-00000010/shard-00001-of-00002.zst"))
        // Copies that resume from step 10 on other world sizes, before the same-size resumedDir goes on.
        for np in [1, 4] {
            try FileManager.default.copyItem(atPath: resumedDir, toPath: "\(resumedDir)-\(np)")
        }
        let resumed = try train(2, resumedDir, ["--steps", "20", "--resume"])
        #expect(resumed.count == 20)
        #expect(zip(uninterrupted, resumed).allSatisfy { $0.loss == $1.loss }, "same world size: bitwise equal losses")
        for np in [1, 4] {
            let rows = try train(np, "\(resumedDir)-\(np)", ["--steps", "20", "--resume"])
            #expect(rows.count == 20)
            for (a, b) in zip(uninterrupted, rows) { #expect(abs(a.loss - b.loss) <= 1e-4 * a.loss, "resumed on \(np) rank(s), step \(a.step)") }
        }
        // A flipped byte: verify names the shard; resume reports it and falls back to the previous checkpoint.
        let shard = "\(checkpoints)/step-00000020/shard-00001-of-00002.zst"
        var bytes = try Data(contentsOf: URL(fileURLWithPath: shard))
        bytes[bytes.count / 2] ^= 0x5A
        try bytes.write(to: URL(fileURLWithPath: shard))
        let verify = try ConvirtCLITests.run(convirtPath(), ["checkpoint", "verify", resumedDir])
        #expect(verify.status != 0 && verify.output.contains("shard-00001-of-00002.zst") && verify.output.contains("corrupt"), "\(verify.output)")
        try FileManager.default.createDirectory(atPath: "\(checkpoints)/.tmp-step-00000099", withIntermediateDirectories: true)
        func resumeTo22(_ extra: [String]) throws -> (status: Int32, output: String) {
            try ConvirtCLITests.run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", "\(dir)/prepared", "--run-dir", resumedDir,
                                             "--preset", "tiny", "--steps", "22", "--resume", "--retrieval-eval", "0"] + extra,
                                    environment: Self.mpiEnvironment, timeout: 300)
        }
        // Without --resume-fallback a damaged newest checkpoint is an error naming the file ...
        let strict = try resumeTo22([])
        #expect(strict.status != 0 && strict.output.contains("shard-00001-of-00002.zst") && strict.output.contains("--resume-fallback"), "\(strict.output)")
        #expect(!FileManager.default.fileExists(atPath: "\(checkpoints)/.tmp-step-00000099"), "leftover temporary directory removed")
        // ... with it, the damage is reported and the previous complete checkpoint is used.
        let fallback = try resumeTo22(["--resume-fallback"])
        #expect(fallback.status == 0 && fallback.output.contains("cannot resume from") && fallback.output.contains("resuming from") &&
                fallback.output.contains("step-00000010"), "\(fallback.output)")
        let export = try ConvirtCLITests.run(convirtPath(), ["checkpoint", "export", resumedDir, "--out", "\(dir)/export"])
        #expect(export.status == 0, "\(export.output)")
        let image = try SafeTensorsFile(path: "\(dir)/export/image_encoder.safetensors")
        #expect(image.names.contains("conv1.weight") && image.names.contains("layer4.0.downsample.1.running_var"))
        let text = try SafeTensorsFile(path: "\(dir)/export/text_encoder/model.safetensors")
        #expect(text.names.contains("embeddings.word_embeddings.weight") && text.names.contains("encoder.layer.1.output.LayerNorm.bias"))
        #expect(try SafeTensorsFile(path: "\(dir)/export/image_head.safetensors").names.sorted() == ["0.bias", "0.weight", "2.bias", "2.weight"])
        #expect(FileManager.default.fileExists(atPath: "\(dir)/export/text_encoder/config.json"))
        let inspect = try ConvirtCLITests.run(convirtPath(), ["checkpoint", "inspect", resumedDir])
        #expect(inspect.output.contains("step 22") && inspect.output.contains("saved by 2 rank(s)"), "\(inspect.output)")
    }

    /// Checkpoint I/O modes and faults: synchronous saving and gather I/O write the same shards as the
    /// asynchronous parallel default; a kill while a checkpoint is written leaves the previous one as the
    /// one --resume picks; a full disk is a clear error with the previous checkpoint intact; damaged or
    /// tampered checkpoints are rejected naming the file and the problem.
    func checkpointModes(mpirun: String, dir: String, uninterrupted: [Row]) throws {
        let fm = FileManager.default
        func train(_ runDir: String, _ extra: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
            try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", "\(dir)/prepared", "--run-dir", runDir,
                             "--preset", "tiny", "--retrieval-eval", "0"] + extra,
                    environment: Self.mpiEnvironment.merging(environment) { $1 }, timeout: 300)
        }
        for (name, extra) in [("async", [String]()), ("sync", ["--sync-checkpoint"]), ("gather", ["--checkpoint-io", "gather"])] {
            let r = try train("\(dir)/io-\(name)", ["--steps", "10", "--checkpoint-every", "5"] + extra)
            #expect(r.status == 0, "\(name): \(r.output)")
        }
        for step in ["step-00000005", "step-00000010"] {
            for shard in ["shard-00000-of-00002.zst", "shard-00001-of-00002.zst"] {
                let reference = fm.contents(atPath: "\(dir)/io-async/checkpoints/\(step)/\(shard)")
                #expect(reference != nil && (reference?.count ?? 0) > 1000, "\(step)/\(shard) written")
                for mode in ["sync", "gather"] {
                    #expect(fm.contents(atPath: "\(dir)/io-\(mode)/checkpoints/\(step)/\(shard)") == reference, "\(mode): \(step)/\(shard) differs")
                }
            }
        }
        let rows = try String(contentsOfFile: "\(dir)/io-async/metrics.jsonl", encoding: .utf8)
        #expect(rows.contains("time_checkpoint_s"), "the training time lost to checkpoints is measured")

        // No shared filesystem: each rank runs in its own directory with a relative --run-dir (MPMD), so
        // rank 1 cannot see rank 0's files. Gather I/O writes every shard on rank 0 only, and resuming
        // reads them there and broadcasts them: the losses are bitwise those of a run that never stopped.
        func separate(_ steps: Int, _ extra: [String]) throws -> (status: Int32, output: String) {
            let app = [convirtPath(), "train", "--data", "\(dir)/prepared", "--run-dir", "run", "--preset", "tiny", "--retrieval-eval", "0",
                       "--steps", "\(steps)", "--checkpoint-every", "5", "--checkpoint-io", "gather"] + extra
            return try run(mpirun, ["--oversubscribe", "-np", "1", "-wdir", "\(dir)/node0"] + app + [":", "-np", "1", "-wdir", "\(dir)/node1"] + app,
                           environment: Self.mpiEnvironment, timeout: 300)
        }
        for node in ["node0", "node1"] { try fm.createDirectory(atPath: "\(dir)/\(node)", withIntermediateDirectories: true) }
        let first = try separate(10, [])
        #expect(first.status == 0, "\(first.output)")
        #expect(fm.fileExists(atPath: "\(dir)/node0/run/checkpoints/step-00000010/shard-00001-of-00002.zst"), "rank 0 wrote rank 1's shard")
        #expect(!fm.fileExists(atPath: "\(dir)/node1/run"), "rank 1 wrote nothing in its own directory")
        let second = try separate(20, ["--resume"])
        #expect(second.status == 0 && second.output.contains("resuming from run/checkpoints/step-00000010"), "\(second.output)")
        #expect(!fm.fileExists(atPath: "\(dir)/node1/run"))
        let separateRows = try String(contentsOfFile: "\(dir)/node0/run/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode(Row.self, from: Data($0.utf8)) }
        #expect(separateRows.map(\.step) == Array(1...20))
        #expect(zip(separateRows, uninterrupted).allSatisfy { $0.loss == $1.loss }, "gathered checkpoints resume bitwise")

    }

    /// Faults: a kill while a checkpoint is written leaves the previous one as the one --resume picks; a
    /// full disk is a clear error with the previous checkpoint intact; damaged or tampered checkpoints
    /// are rejected naming the file and the problem.
    func checkpointFaults(mpirun: String, dir: String, uninterrupted: [Row]) throws {
        let fm = FileManager.default
        func train(_ runDir: String, _ extra: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
            try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", "\(dir)/prepared", "--run-dir", runDir,
                             "--preset", "tiny", "--retrieval-eval", "0"] + extra,
                    environment: Self.mpiEnvironment.merging(environment) { $1 }, timeout: 300)
        }
        // The synchronous checkpoints of 10 steps that the full-disk and tampering cases start from.
        if !fm.fileExists(atPath: "\(dir)/faults-base/checkpoints/step-00000010/manifest.json") {
            let r = try train("\(dir)/faults-base", ["--steps", "10", "--checkpoint-every", "5", "--sync-checkpoint"])
            #expect(r.status == 0, "\(r.output)")
        }

        // A rank killed right after writing its shard of step 10, before the commit.
        let killedDir = "\(dir)/killed-in-checkpoint", checkpoints = "\(killedDir)/checkpoints"
        let killed = try train(killedDir, ["--steps", "20", "--checkpoint-every", "5"], environment: ["CONVIRT_FAULT_KILL_AFTER_SHARD": "10:1"])
        #expect(killed.status != 0, "\(killed.output)")
        #expect(fm.fileExists(atPath: "\(checkpoints)/.tmp-step-00000010/shard-00001-of-00002.zst"), "the interrupted write left its shard")
        #expect(!fm.fileExists(atPath: "\(checkpoints)/step-00000010"), "an uncommitted checkpoint is never published")
        #expect((try? String(contentsOfFile: "\(checkpoints)/latest", encoding: .utf8)) == "step-00000005")
        let resumed = try train(killedDir, ["--steps", "20", "--checkpoint-every", "5", "--resume"])
        #expect(resumed.status == 0 && resumed.output.contains("removed") && resumed.output.contains("resuming from \(checkpoints)/step-00000005"),
                "\(resumed.output)")
        #expect(!fm.fileExists(atPath: "\(checkpoints)/.tmp-step-00000010"), "leftover temporary directory removed")
        let after = try String(contentsOfFile: "\(killedDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode(Row.self, from: Data($0.utf8)) }.suffix(15)
        #expect(after.map(\.step) == Array(6...20))
        #expect(zip(after, uninterrupted.suffix(15)).allSatisfy { $0.loss == $1.loss }, "resumed after the kill: bitwise equal losses")

        // Rank 0 killed right after publishing the checkpoint of step 10, synchronous and asynchronous: the
        // step's metrics row is on the disk before its checkpoint is published, so the resumed run's rows
        // are steps 1-20 once each, equal to the uninterrupted run's.
        for mode in [["--sync-checkpoint"], []] {
            let runDir = "\(dir)/killed-after-commit\(mode.joined())"
            try? fm.removeItem(atPath: runDir)
            let common = ["--steps", "20", "--checkpoint-every", "5"] + mode
            let interrupted = try train(runDir, common, environment: ["CONVIRT_FAULT_KILL_AFTER_COMMIT": "10"])
            #expect(interrupted.status != 0, "\(interrupted.output)")
            #expect((try? String(contentsOfFile: "\(runDir)/checkpoints/latest", encoding: .utf8)) == "step-00000010")
            let before = try Self.rows(of: runDir).map(\.step)
            #expect(before.contains(10), "\(mode): the checkpoint of step 10 was published before its metrics row: \(before)")
            let again = try train(runDir, common + ["--resume"])
            #expect(again.status == 0 && again.output.contains("resuming from \(runDir)/checkpoints/step-00000010"), "\(again.output)")
            let rows = try Self.rows(of: runDir)
            #expect(rows.map(\.step) == Array(1...20), "\(mode): \(rows.map(\.step))")
            for (a, b) in zip(rows, uninterrupted) { #expect(a.loss == b.loss && a.grad_norm == b.grad_norm, "\(mode) step \(a.step)") }
        }

        // A full disk: the run directory on a tmpfs with room for one checkpoint and a half.
        let one = try fm.contentsOfDirectory(atPath: "\(dir)/faults-base/checkpoints/step-00000005")
            .reduce(0) { $0 + ((try? fm.attributesOfItem(atPath: "\(dir)/faults-base/checkpoints/step-00000005/\($1)")[.size] as? Int) ?? 0) }
        let full = "\(dir)/full"
        try fm.createDirectory(atPath: full, withIntermediateDirectories: true)
        let script = "mount -t tmpfs -o size=\(one * 3 / 2 + 65536) tmpfs \(full) || exit 97; "
            + "\(mpirun) --oversubscribe -np 2 \(convirtPath()) train --data \(dir)/prepared --run-dir \(full) --preset tiny --retrieval-eval 0 "
            + "--steps 20 --checkpoint-every 5; echo \"train status $?\"; \(convirtPath()) checkpoint verify \(full); "
            + "echo \"latest $(cat \(full)/checkpoints/latest)\"; ls -a \(full)/checkpoints"
        let disk = try run("/usr/bin/unshare", ["-m", "sh", "-c", script], environment: Self.mpiEnvironment, timeout: 300)
        #expect(disk.status != 97, "mounting a tmpfs (needs root): \(disk.output)")
        #expect(!disk.output.contains("train status 0") && disk.output.contains("No space left on device"), "\(disk.output)")
        #expect(disk.output.contains("OK (step 5") && disk.output.contains("latest step-00000005"), "\(disk.output)")
        let listing = (disk.output.components(separatedBy: "latest step-00000005").last ?? "").split(whereSeparator: \.isWhitespace).map(String.init)
        #expect(!listing.contains("step-00000010"), "the failed checkpoint is never published: \(listing)")
        // When the checkpoint's own commit failed, it left nothing behind. The disk can also fill first under
        // the metrics or TensorBoard append of rank 0 while the shards are written in the background; that
        // aborts the job, and a rank killed mid-write may leave its shard in the temporary directory, which
        // the next start removes (the killed-rank case above).
        if disk.output.contains("checkpoint at step 10 failed") {
            #expect(!listing.contains { $0.hasPrefix(".tmp-") }, "the failed checkpoint left nothing behind: \(listing)")
        }

        // Damaged and tampered checkpoints: verify names the file and the problem, before any large allocation.
        func tampered(_ name: String, _ change: (String) throws -> Void) throws -> String {
            let copy = "\(dir)/tampered-\(name)"
            try fm.copyItem(atPath: "\(dir)/faults-base/checkpoints/step-00000010", toPath: copy)
            try change(copy)
            let r = try run(convirtPath(), ["checkpoint", "verify", copy])
            #expect(r.status != 0, "\(name): \(r.output)")
            return r.output
        }
        func editManifest(_ copy: String, _ edit: (inout [String: Any]) -> Void) throws {
            let path = "\(copy)/manifest.json"
            var json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
            edit(&json)
            try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: path))
        }
        func editShard(_ json: inout [String: Any], _ key: String, _ value: Any) {
            var shards = json["shards"] as! [[String: Any]]
            shards[0][key] = value
            json["shards"] = shards
        }
        let truncated = try tampered("truncated") { copy in
            let path = "\(copy)/shard-00000-of-00002.zst"
            let data = try Data(contentsOf: URL(fileURLWithPath: path))
            try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: path))
        }
        #expect(truncated.contains("shard-00000-of-00002.zst") && truncated.contains("truncated"), "\(truncated)")
        let version = try tampered("version") { try editManifest($0) { $0["format"] = 99 } }
        #expect(version.contains("unknown checkpoint format version 99"), "\(version)")
        let outside = try tampered("outside") { try editManifest($0) { editShard(&$0, "file", "../../../etc/passwd") } }
        #expect(outside.contains("outside the checkpoint directory"), "\(outside)")
        let absurd = try tampered("absurd") { try editManifest($0) { $0["arena_count"] = 1 << 50 } }
        #expect(absurd.contains("absurd arena size"), "\(absurd)")
        let raw = try tampered("raw") { try editManifest($0) { editShard(&$0, "rawBytes", 1 << 40) } }
        #expect(raw.contains("raw bytes"), "\(raw)")
        let shape = try tampered("shape") { try editManifest($0) { json in
            var entries = json["entries"] as! [[String: Any]]
            entries[0]["shape"] = [1 << 31, 1 << 31]
            json["entries"] = entries
        } }
        #expect(shape.contains("absurd shape") || shape.contains("outside the arena"), "\(shape)")
    }
}

@Suite("OpenBLAS core choice")
struct BLASCoreChoiceTests {
    @Test("convirt restarts itself with a better OpenBLAS core, and respects OPENBLAS_CORETYPE")
    func restart() throws {
        // Pretend OpenBLAS chose Prescott on this CPU: convirt restarts with the core its flags call for
        // (unless this machine sets OPENBLAS_CORETYPE itself, which is then respected).
        let flags = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let restarted = try run(convirtPath(), ["info"], environment: ["CONVIRT_TEST_BLAS_PICKED": "Prescott"])
        #expect(restarted.status == 0, "\(restarted.output)")
        if flags.contains(" avx2") && flags.contains(" fma") && ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] == nil {
            #expect(restarted.output.contains("(chosen by convirt from the CPU flags)"), "\(restarted.output)")
            #expect(!restarted.output.contains("core Prescott"), "\(restarted.output)")
        }
        let kept = try run(convirtPath(), ["info"], environment: ["OPENBLAS_CORETYPE": "Prescott", "CONVIRT_TEST_BLAS_PICKED": "Prescott"])
        #expect(kept.output.contains("core Prescott (OPENBLAS_CORETYPE set by the environment)"), "\(kept.output)")
    }

    @Test("OpenMP threads spin where a rank's threads have their CPUs, wait passively where ranks share them, and keep what the user set")
    func waitPolicy() throws {
        let environment = ProcessInfo.processInfo.environment
        if environment["OMP_WAIT_POLICY"] == nil && environment["GOMP_SPINCOUNT"] == nil {
            let alone = try run(convirtPath(), ["info"], environment: ["OMPI_COMM_WORLD_LOCAL_SIZE": "1"])
            #expect(alone.status == 0 && alone.output.contains("OpenMP wait policy spinning 300000 times, then passive (set by convirt"), "\(alone.output)")
            let shared = try run(convirtPath(), ["info"], environment: ["OMPI_COMM_WORLD_LOCAL_SIZE": "64"])
            #expect(shared.status == 0 && shared.output.contains("OpenMP wait policy passive (set by convirt"), "\(shared.output)")
        }
        let kept = try run(convirtPath(), ["info"], environment: ["OMP_WAIT_POLICY": "active"])
        #expect(kept.output.contains("OpenMP wait policy active (OMP_WAIT_POLICY set by the environment)"), "\(kept.output)")
        // The choice itself: only variables nobody set, and the OpenBLAS core only where OpenBLAS chose worse.
        let flags: Set<String> = ["avx2", "fma"]
        func chosen(_ env: [String: String] = [:], picked: String = "Haswell", _ arguments: [String] = [], cpus: Int = 2) -> [String: String] {
            BLASCore.preferredEnvironment(env, flags: flags, vendor: "GenuineIntel", picked: picked, arguments: arguments, cpus: cpus)
        }
        #expect(chosen()["GOMP_SPINCOUNT"] == "300000" && chosen()["OMP_WAIT_POLICY"] == nil, "one rank alone spins")
        #expect(chosen(["OMPI_COMM_WORLD_LOCAL_SIZE": "2"])["OMP_WAIT_POLICY"] == "passive", "ranks sharing a node, threads unknown")
        #expect(chosen(["OMPI_COMM_WORLD_LOCAL_SIZE": "2"], ["convirt", "train", "--threads", "2"], cpus: 2)["OMP_WAIT_POLICY"] == "passive")
        #expect(chosen(["OMPI_COMM_WORLD_LOCAL_SIZE": "2"], ["convirt", "train", "--threads=4"], cpus: 8)["GOMP_SPINCOUNT"] == "300000")
        #expect(chosen(["MPI_LOCALNRANKS": "4"], ["convirt", "train", "--threads", "1"], cpus: 4)["GOMP_SPINCOUNT"] == "300000")
        #expect(chosen(["GOMP_SPINCOUNT": "10"])["OMP_WAIT_POLICY"] == nil && chosen(["GOMP_SPINCOUNT": "10"])["GOMP_SPINCOUNT"] == nil)
        #expect(chosen()["OPENBLAS_CORETYPE"] == nil)
        #expect(chosen(picked: "Prescott")["OPENBLAS_CORETYPE"] == "Haswell")
        #expect(chosen(["OMP_WAIT_POLICY": "active", "OPENBLAS_CORETYPE": "Prescott"], picked: "Prescott").isEmpty)
    }
}
