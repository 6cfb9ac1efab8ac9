// A new user's first hour: exit codes that say what failed, no run directory left by a failed start,
// one error line on N ranks, preset defaults that can be read, a launcher that builds once, and
// numbers labelled as what they are.

import Foundation
import Testing

/// The repository (this file is Tests/ConvirtCLITests/NewUserTests.swift).
let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

@Suite("A new user's first hour", .serialized)
struct NewUserTests {
    var dir: String { SharedRuns.shared.dir + "/new-user" }

    @Test("exit status: 64 with the usage text only for a bad flag; 1 with one line for a bad path or file")
    func exitCodes() throws {
        try FileManager.default.createDirectory(atPath: "\(dir)/not-a-checkpoint", withIntermediateDirectories: true)
        for arguments in [["checkpoint", "verify", "\(dir)/not-a-checkpoint"], ["checkpoint", "verify", "/nonexistent/run"],
                          ["checkpoint", "inspect", "/nonexistent/run"], ["report", "/nonexistent/run"],
                          ["eval", "linear", "--dataset", "rsna", "--root", "/nonexistent/rsna", "--init", "random", "--preset", "tiny"],
                          ["tokenize", "--vocab", "/nonexistent/vocab.txt"]] {
            let r = try run(convirtPath(), arguments, input: "x\n")
            #expect(r.status == 1, "\(arguments.joined(separator: " ")): status \(r.status): \(r.output)")
            #expect(!r.output.contains("Usage:") && !r.output.isEmpty && r.output.split(separator: "\n").count <= 2,
                    "\(arguments.joined(separator: " ")): \(r.output)")
        }
        for arguments in [["train", "--data", "x", "--run-dir", "y", "--steps", "abc"], ["eval", "linear", "--dataset", "mimic", "--root", "x"],
                          ["train", "--data", "x", "--run-dir", "y", "--steps", "5", "--epochs", "1"], ["checkpoint", "verify"],
                          ["eval", "linear", "--dataset", "rsna", "--root", "x", "--init", "random", "--min-epoch-steps", "0"],
                          ["synth", "rsna", "--out", "x", "--difficulty", "-1"],
                          ["eval", "linear", "--dataset", "rsna", "--root", "x", "--init", "random", "--keep-best", "auc"],
                          ["train", "--data", "x", "--run-dir", "y", "--precision", "fp16"], ["bench", "step", "--precision", "half"],
                          ["embed", "--checkpoint", "x", "--texts", "y", "--out", "z", "--precision", "int8"]] {
            let r = try run(convirtPath(), arguments)
            #expect(r.status == 64 && r.output.contains("Usage:"), "\(arguments.joined(separator: " ")): status \(r.status): \(r.output)")
        }
        let both = try run(convirtPath(), ["train", "--data", "x", "--run-dir", "y", "--steps", "5", "--epochs", "1"])
        #expect(both.output.contains("give --steps or --epochs, not both"), "\(both.output)")
    }

    @Test("a failed start creates nothing, and on 2 ranks prints its error once with no MPI_ABORT")
    func failedStart() throws {
        let missing = "\(dir)/runs/missing-data"
        let r = try run(convirtPath(), ["train", "--data", "/nonexistent/prepared", "--run-dir", missing, "--preset", "tiny"])
        #expect(r.status == 1 && r.output.contains("/nonexistent/prepared"), "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: missing), "a failed start leaves no run directory")

        let mpirun = try #require(SharedRuns.mpirun, "mpirun is not installed (openmpi-bin)")
        let data = try SharedRuns.shared.data()
        for (name, flags) in [("batch7", ["--global-batch", "7"]), ("weights", ["--image-weights", "/nonexistent/resnet.safetensors"])] {
            let runDir = "\(dir)/runs/\(name)"
            let m = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", runDir, "--preset", "tiny"] + flags,
                            environment: DistributedTrainingTests.mpiEnvironment, timeout: 120)
            let errors = m.output.split(separator: "\n").filter { $0.hasPrefix("convirt train") }
            #expect(m.status == 1, "\(name): status \(m.status): \(m.output)")
            #expect(errors.count == 1 && !m.output.contains("MPI_ABORT") && !m.output.contains("rank 1 of 2"), "\(name): \(m.output)")
            #expect(!FileManager.default.fileExists(atPath: runDir), "\(name): a failed start leaves no run directory")
        }
        let batch = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "train", "--data", data, "--run-dir", "\(dir)/runs/b",
                                     "--preset", "tiny", "--global-batch", "7"], environment: DistributedTrainingTests.mpiEnvironment, timeout: 120)
        #expect(batch.output.contains("--global-batch 7 does not divide by the 2 ranks"), "\(batch.output)")
    }

    @Test("train --help shows every preset's defaults; --print-config the whole resolved configuration; --lowercase is a flag")
    func presetDefaults() throws {
        let help = try run(convirtPath(), ["train", "--help"])
        #expect(help.status == 0 && help.output.contains("PRESET DEFAULTS"), "\(help.output)")
        let lines = help.output.split(separator: "\n").map(String.init)
        for preset in ["tiny", "demo", "paper"] {
            let r = try run(convirtPath(), ["train", "--preset", preset, "--print-config"])
            let config = try #require(try JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [String: Any], "\(r.output)")
            #expect(r.status == 0 && config["preset"] as? String == preset && config["global_batch"] as? Int != nil && config["learning_rate"] != nil)
            // The preset's row holds its batch, steps and image size whole, on one line of the wrapped help.
            let cells = try #require(lines.first { $0.hasPrefix("  \(preset) ") }, "\(preset)'s row in \(help.output)")
                .split(separator: " ").map(String.init)
            let steps = (config["steps"] as? Int).map { "\($0)" } ?? "until \(config["max_checks"] ?? "?") val checks"
            #expect(cells.count >= 4 && cells[1] == "\(config["global_batch"] ?? "?")"
                        && cells.joined(separator: " ").contains(" \(steps) "), "\(preset): \(cells) against \(config)")
        }
        #expect(lines.allSatisfy { $0.count <= 80 }, "\(help.output)")
        let flags = try run(convirtPath(), ["train", "--preset", "demo", "--print-config", "--global-batch", "64", "--no-lowercase", "--steps", "7"])
        let config = try #require(try JSONSerialization.jsonObject(with: Data(flags.output.utf8)) as? [String: Any], "\(flags.output)")
        #expect(config["global_batch"] as? Int == 64 && config["lowercase"] as? Bool == false && config["steps"] as? Int == 7, "\(config)")
        let old = try run(convirtPath(), ["train", "--data", "x", "--run-dir", "y", "--lowercase", "true"])
        #expect(old.status == 64, "--lowercase takes no value (as in tokenize): \(old.output)")
        let vocab = "\(dir)/vocab.txt"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nheart\n".write(toFile: vocab, atomically: true, encoding: .utf8)
        let cased = try run(convirtPath(), ["tokenize", "--vocab", vocab, "--no-lowercase"], input: "Heart heart\n")
        #expect(cased.status == 0 && cased.output == "2 1 5 3\n", "\(cased.output)")
    }

    @Test("every flag of every command is in docs/USAGE.md")
    func flagsDocumented() throws {
        let usage = try String(contentsOfFile: "\(repository)/docs/USAGE.md", encoding: .utf8)
        var commands: [[String]] = [[]], missing: [String] = [], visited = 0
        while let command = commands.popLast() {
            visited += 1
            let help = try run(convirtPath(), command + ["--help"])
            #expect(help.status == 0, "\(command): \(help.output)")
            var section = ""
            for line in help.output.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
                if !line.hasPrefix(" ") && line.hasSuffix(":") { section = line; continue }
                if line.isEmpty { section = ""; continue }
                guard line.hasPrefix("  "), !line.hasPrefix("   ") else { continue }
                let first = String(line.dropFirst(2).prefix { $0 != " " })
                if section == "SUBCOMMANDS:" {
                    // A subcommand's name ("(default)" may follow it); the walk is at most three deep.
                    let subcommand = first.allSatisfy { $0.isLowercase || $0.isNumber || $0 == "-" } && command.count < 3
                    #expect(subcommand, "\(command) lists \(line)")
                    if subcommand { commands.append(command + [first]) }
                } else if section == "OPTIONS:" {
                    // "--name <value>", "-h, --help", "--lowercase/--no-lowercase": each long name.
                    let names = line.dropFirst(2).split(separator: " ").prefix { $0.hasPrefix("-") }
                        .flatMap { $0.split(separator: "/") }.map { $0.trimmingCharacters(in: CharacterSet(charactersIn: ",")) }
                    for name in names where name.hasPrefix("--") && name != "--help" {
                        if usage.range(of: "\(name)(?![a-z0-9-])", options: .regularExpression) == nil {
                            missing.append("convirt \(command.joined(separator: " ")) \(name)")
                        }
                    }
                }
            }
        }
        #expect(visited > 20, "walked \(visited) commands")
        #expect(missing.isEmpty, "flags docs/USAGE.md does not mention: \(missing)")
    }

    @Test("checkpoint inspect gives the rate of the last step; held-out precision is a plain fraction in JSON")
    func labelledNumbers() throws {
        let runDir = "\(dir)/runs/cosine"
        let r = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "4",
                                        "--schedule", "cosine", "--warmup-steps", "0", "--lr", "1e-3", "--retrieval-eval", "20"], timeout: 300)
        #expect(r.status == 0, "\(r.output)")
        let inspect = try run(convirtPath(), ["checkpoint", "inspect", runDir])
        // Step 3 (from 0) of 4 on the cosine schedule: 1e-3 * (1 + cos(3 pi / 4)) / 2.
        let expected = String(format: "%.3g", 1e-3 * (1 + cos(3 * Double.pi / 4)) / 2)
        #expect(inspect.output.contains("learning rate of step 4 \(expected) (cosine schedule, base 0.001)"), "\(inspect.output)")
        let json = try String(contentsOfFile: "\(runDir)/heldout_retrieval.json", encoding: .utf8)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let studies = try #require(object["studies"] as? Int), precision = try #require(object["precision@10"] as? Double)
        let hits = (precision * Double(10 * studies)).rounded()
        #expect(Double(hits) / Double(10 * studies) == precision, "precision@10 is hits / (10 x studies) exactly: \(json)")
        let line = try #require(json.split(separator: "\n").first { $0.contains("precision@10") })
        #expect(line.split(separator: ":").last!.trimmingCharacters(in: .whitespaces.union(.init(charactersIn: ","))).count <= 8,
                "hits / (10 x studies), not a sum's rounding residue: \(line)")
        // Both measures; `eval heldout` on the final checkpoint gives the same numbers.
        let distinct = try #require(object["distinct"] as? [String: Any], "\(json)")
        let distinctCount = try #require(distinct["sentences"] as? Int), sentences = try #require(object["sentences"] as? Int)
        #expect(distinctCount >= 2 && distinctCount <= sentences && (distinct["precision@10"] as? Double).map { $0 >= 0 && $0 <= 1 } == true)
        let again = try run(convirtPath(), ["eval", "heldout", "--checkpoint", runDir, "--data", try SharedRuns.shared.data(), "--studies", "20",
                                            "--out", "\(dir)/heldout-again.json"])
        #expect(again.status == 0 && again.output.contains("over the \(distinctCount) distinct sentences"), "\(again.output)")
        let reread = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/heldout-again.json"))) as? NSDictionary
        #expect(reread == (object as NSDictionary), "\(String(describing: reread)) vs \(object)")
        let report = try run(convirtPath(), ["report", runDir, "--quiet"])
        let html = try String(contentsOfFile: "\(runDir)/report.html", encoding: .utf8)
        #expect(html.contains("Over the distinct sentences"))
        #expect(report.status == 0 && html.contains("Loss, last step") && html.contains("Loss, recent mean") && html.contains("Time per step")
                && html.contains("Time in steps") && !html.contains(">Final loss<") && !html.contains(">Step time<"), "\(report.output)")
    }

    @Test("launch.sh checks its arguments first, and builds once: a second call reuses the build without calling swift or apt")
    func launchBuildsOnce() throws {
        let mpirun = try #require(SharedRuns.mpirun, "mpirun is not installed (openmpi-bin)")
        _ = mpirun
        // Stand-ins for swift and apt-get that log their calls; swift "builds" by linking the real binary.
        let tools = "\(dir)/launch-tools", build = "\(dir)/launch-build", log = "\(dir)/launch-calls.log"
        try? FileManager.default.removeItem(atPath: build)
        try? FileManager.default.removeItem(atPath: log)
        try FileManager.default.createDirectory(atPath: tools, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: "\(build)/release", withIntermediateDirectories: true)
        let fakeSwift = """
            #!/bin/sh
            echo "swift $*" >> \(log)
            case "$*" in
              *--show-bin-path*) echo \(build)/release ;;
              *) ln -sf \(convirtPath()) \(build)/release/convirt; echo "Build complete! (0.01s)" ;;
            esac
            """
        let fakeApt = "#!/bin/sh\necho \"apt $*\" >> \(log)\nexit 1\n"
        for (name, text) in [("swift", fakeSwift), ("apt-get", fakeApt), ("sudo", fakeApt)] {
            try text.write(toFile: "\(tools)/\(name)", atomically: true, encoding: .utf8)
            chmod("\(tools)/\(name)", 0o755)
        }
        var environment = DistributedTrainingTests.mpiEnvironment
        environment["PATH"] = tools + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")
        environment["CONVIRT_BUILD_PATH"] = build
        // Help and usage errors come before anything is installed or built.
        let help = try run("\(repository)/launch.sh", ["--help"], environment: environment, timeout: 60)
        #expect(help.status == 0 && help.output.contains("usage: ./launch.sh [--full]") && help.output.contains("-- SUBCOMMAND"), "\(help.output)")
        for (arguments, message) in [(["-np", "2", "info"], "usage: ./launch.sh"), (["--bogus"], "usage: ./launch.sh"),
                                     (["-np", "1", "--max-restarts", "x", "--", "info"], "--max-restarts takes a number of restarts, got 'x'")] {
            let bad = try run("\(repository)/launch.sh", arguments, environment: environment, timeout: 60)
            #expect(bad.status == 64 && bad.output.contains(message), "\(arguments): \(bad.status) \(bad.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: log), "no swift or apt call before the arguments are checked")
        let first = try run("\(repository)/launch.sh", ["-np", "1", "--", "info"], environment: environment, timeout: 120)
        #expect(first.status == 0 && first.output.contains("building convirt") && first.output.contains("convirt 0."), "\(first.output)")
        let second = try run("\(repository)/launch.sh", ["-np", "1", "--", "info"], environment: environment, timeout: 120)
        #expect(second.status == 0 && !second.output.contains("building") && second.output.contains("convirt 0."), "\(second.output)")
        let calls = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(calls.split(separator: "\n").filter { $0.hasPrefix("swift build -c release --build-path") && !$0.contains("show-bin-path") }.count == 1,
                "one build over two calls: \(calls)")
        #expect(!calls.contains("apt"), "packages present: no apt-get: \(calls)")
    }
}

@Suite("Checkpoints of earlier versions")
struct EarlierCheckpointTests {
    /// A manifest written before the TensorBoard setting existed (format 2, demo preset, step 2000, by
    /// ./launch.sh): its checksum still holds, since settings added later are optional and encode to
    /// nothing by default.
    @Test("a manifest written by an earlier version still reads, checksum included")
    func earlierManifest() throws {
        let dir = SharedRuns.shared.dir + "/earlier/checkpoints/step-00002000"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let fixture = "\(repository)/Tests/ConvirtCLITests/Fixtures/manifest-demo-step2000-v0.1.json"
        try? FileManager.default.removeItem(atPath: "\(dir)/manifest.json")
        try FileManager.default.copyItem(atPath: fixture, toPath: "\(dir)/manifest.json")
        // Shards of the sizes the manifest records (inspect compares sizes; verify would read them).
        for (file, bytes) in [("shard-00000-of-00002.zst", 3_340_199), ("shard-00001-of-00002.zst", 3_374_362)] {
            FileManager.default.createFile(atPath: "\(dir)/\(file)", contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(dir)/\(file)"))
            try handle.truncate(atOffset: UInt64(bytes))
            try handle.close()
        }
        let r = try run(convirtPath(), ["checkpoint", "inspect", dir])
        #expect(r.status == 0 && r.output.contains("step 2000") && r.output.contains("preset demo"), "\(r.output)")
        // The demo's cosine schedule at its last step: the rate the step used, not the base rate.
        #expect(r.output.contains("learning rate of step 2000 3.24e-10 (cosine schedule, base 0.0005)"), "\(r.output)")
    }
}

@Suite("oneDNN from a site's install")
struct SiteOneDNNTests {
    /// scripts/install-onednn.sh with DNNL_ROOT: a oneDNN built for GNU OpenMP is linked into .deps/onednn;
    /// one built for another threading runtime (oneAPI's default SYCL build here) is refused with the
    /// reason and what to install instead, and nothing is linked. The "libraries" are stubs that carry
    /// only the dependency the script reads; the script runs in a copy of the repository's layout.
    @Test("install-onednn.sh links a site's oneDNN for GNU OpenMP and refuses one for SYCL")
    func siteRuntime() throws {
        let root = SharedRuns.shared.dir + "/site-onednn"
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: "\(root)/repo/scripts", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "\(repository)/scripts/install-onednn.sh", toPath: "\(root)/repo/scripts/install-onednn.sh")
        try "int stub;\n".write(toFile: "\(root)/stub.c", atomically: true, encoding: .utf8)
        for site in ["gomp", "sycl"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(site)/include/oneapi/dnnl", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: "\(root)/\(site)/lib", withIntermediateDirectories: true)
            FileManager.default.createFile(atPath: "\(root)/\(site)/include/oneapi/dnnl/dnnl.h", contents: Data())
        }
        // A C compiler: the Swift toolchain's clang, or the system's.
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":").map(String.init)
        let cc = try #require(["clang", "cc", "gcc"].lazy.flatMap { name in path.map { "\($0)/\(name)" } }
                                .first { FileManager.default.isExecutableFile(atPath: $0) }, "no C compiler on the PATH")
        let gomp = try #require(["/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/usr/lib/aarch64-linux-gnu/libgomp.so.1", "/usr/lib64/libgomp.so.1"]
                                    .first { FileManager.default.fileExists(atPath: $0) }, "no libgomp.so.1")
        let sycl = try run(cc, ["-shared", "-fPIC", "-Wl,-soname,libsycl.so.8", "-o", "\(root)/sycl/lib/libsycl.so.8", "\(root)/stub.c"])
        #expect(sycl.status == 0, "\(sycl.output)")
        for (site, library) in [("gomp", gomp), ("sycl", "\(root)/sycl/lib/libsycl.so.8")] {
            let built = try run(cc, ["-shared", "-fPIC", "-Wl,--no-as-needed", "-Wl,-soname,libdnnl.so.3", "-o", "\(root)/\(site)/lib/libdnnl.so.3",
                                     "\(root)/stub.c", library])
            #expect(built.status == 0, "\(built.output)")
        }
        let script = "\(root)/repo/scripts/install-onednn.sh"
        let refused = try run(script, [], environment: ["DNNL_ROOT": "\(root)/sycl"])
        #expect(refused.status == 1 && refused.output.contains("libdnnl.so.3 runs its CPU kernels on SYCL")
                    && refused.output.contains("cpu_gomp") && refused.output.contains("unset it"), "\(refused.output)")
        #expect(!FileManager.default.fileExists(atPath: "\(root)/repo/.deps/onednn"), "nothing linked for a refused oneDNN")
        let linked = try run(script, [], environment: ["DNNL_ROOT": "\(root)/gomp"])
        #expect(linked.status == 0, "\(linked.output)")
        let origin = try String(contentsOfFile: "\(root)/repo/.deps/onednn/ORIGIN", encoding: .utf8)
        #expect(origin == "oneDNN at \(root)/gomp (DNNL_ROOT)\n", "\(origin)")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(root)/repo/.deps/onednn/lib") == "\(root)/gomp/lib")
    }
}
