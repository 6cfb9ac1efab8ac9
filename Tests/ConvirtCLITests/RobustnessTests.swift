// Bad input as a new user or a damaged disk produces it: every case is a clear error naming the file or
// the value (never a signal, never silent garbage), and no run is lost.

import ConvirtCore
import ConvirtIO
import Foundation
import Testing

/// Exit statuses of a clean failure (ArgumentParser's 1 and 64, convirt's 2); a Swift trap or a fatal
/// signal ends the process otherwise.
func failedCleanly(_ status: Int32) -> Bool { [1, 2, 64].contains(status) }

@Suite("Bad input", .serialized)
struct RobustnessTests {
    var dir: String { SharedRuns.shared.dir + "/robustness" }

    /// A tiny run of `steps` steps with checkpoints every 2 (once per process).
    func tinyRun(_ name: String, steps: Int = 4, _ extra: [String] = []) throws -> String {
        let runDir = "\(dir)/\(name)"
        if FileManager.default.fileExists(atPath: "\(runDir)/checkpoints/latest") { return runDir }
        let r = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "\(steps)",
                                        "--checkpoint-every", "2", "--retrieval-eval", "0"] + extra)
        #expect(r.status == 0, "\(r.output)")
        return runDir
    }

    func editManifest(_ checkpoint: String, _ edit: (inout [String: Any]) -> Void) throws {
        let path = "\(checkpoint)/manifest.json"
        var json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        edit(&json)
        try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: path))
    }

    func copyCheckpoint(_ name: String) throws -> String {
        let source = try tinyRun("source")
        let copy = "\(dir)/\(name)-\(UUID().uuidString)"
        try FileManager.default.copyItem(atPath: "\(source)/checkpoints/step-00000004", toPath: copy)
        return copy
    }

    /// A safetensors file whose header is `header` (a JSON object) and whose data section has `bytes` bytes.
    func safetensors(_ header: String, bytes: Int = 16) throws -> String {
        let path = "\(dir)/file-\(UUID().uuidString).safetensors"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var data = Data()
        var length = UInt64(header.utf8.count).littleEndian
        data.append(Data(bytes: &length, count: 8))
        data.append(Data(header.utf8))
        data.append(Data(count: bytes))
        try data.write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test("a safetensors shape whose size overflows is an error, not a trap (parity and --image-weights)")
    func safetensorsOverflow() throws {
        let path = try safetensors(#"{"x": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]}}"#)
        let parity = try run(convirtPath(), ["parity", path])
        #expect(failedCleanly(parity.status) && parity.output.contains("absurd shape"), "\(parity.status): \(parity.output)")
        let train = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", "\(dir)/overflow", "--preset", "tiny",
                                            "--steps", "1", "--image-weights", path])
        #expect(failedCleanly(train.status) && train.output.contains("absurd shape"), "\(train.status): \(train.output)")
        let huge = try safetensors(#"{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e300]}}"#)
        let offsets = try run(convirtPath(), ["parity", huge])
        #expect(failedCleanly(offsets.status) && offsets.output.contains("data_offsets"), "\(offsets.output)")
    }

    @Test("absurd sizes in a parity fixture's config are refused before anything is allocated")
    func absurdFixtureConfig() throws {
        let config = #"{\"layers\":[1,1,1,1],\"width\":1099511627776,\"block\":\"bottleneck\",\"image_size\":64}"#
        let path = try safetensors(#"{"__metadata__": {"model": "resnet", "train": "true", "config": "\#(config)"}}"#, bytes: 0)
        let r = try run(convirtPath(), ["parity", path])
        #expect(failedCleanly(r.status) && r.output.contains("width must be in 1...4096"), "\(r.status): \(r.output)")
    }

    @Test("a manifest tensor offset at Int.max is an error in verify, and resume falls back past it")
    func manifestOffsetOverflow() throws {
        let copy = try copyCheckpoint("offset")
        try editManifest(copy) { json in
            var entries = json["entries"] as! [[String: Any]]
            entries[0]["offset"] = Int.max
            json["entries"] = entries
        }
        let r = try run(convirtPath(), ["checkpoint", "verify", copy])
        #expect(failedCleanly(r.status) && r.output.contains("outside the arena"), "\(r.status): \(r.output)")
        // The newest checkpoint of a run damaged that way: --resume-fallback goes back to the one before.
        let runDir = try tinyRun("fallback-offset", steps: 4)
        try editManifest("\(runDir)/checkpoints/step-00000004") { json in
            var entries = json["entries"] as! [[String: Any]]
            entries[0]["offset"] = Int.max
            json["entries"] = entries
        }
        let resumed = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "6",
                                              "--resume", "--resume-fallback", "--retrieval-eval", "0"])
        #expect(resumed.status == 0 && resumed.output.contains("resuming from \(runDir)/checkpoints/step-00000002"), "\(resumed.output)")
    }

    @Test("a huge but self-consistent arena is refused by verify, inspect and export before it is allocated")
    func hugeArena() throws {
        let copy = try copyCheckpoint("arena")
        let half = 1 << 34
        try editManifest(copy) { json in
            json["arena_count"] = 2 * half
            var shards = json["shards"] as! [[String: Any]]
            shards = [shards[0]]
            shards[0]["range"] = [0, 2 * half]
            shards[0]["rawBytes"] = 2 * half * 12
            json["shards"] = shards
            json["world_size"] = 1
        }
        for command in [["checkpoint", "verify", copy], ["checkpoint", "inspect", copy], ["checkpoint", "export", copy, "--out", "\(copy)-out"]] {
            let r = try run(convirtPath(), command)
            #expect(failedCleanly(r.status) && r.output.contains("but the model of its config has"), "\(command[1]): \(r.status) \(r.output)")
        }
    }

    @Test("any one-byte change of a manifest's content is caught by its checksum")
    func manifestChecksum() throws {
        let copy = try copyCheckpoint("checksum")
        let path = "\(copy)/manifest.json"
        var text = try String(contentsOfFile: path, encoding: .utf8)
        // A tensor name, a kind, a config string and the learning rate: edits that still parse.
        for (from, to) in [("image.conv1.weight", "image.conv1.weigh7"), ("\"trainable\"", "\"trainablf\""), ("\"tiny\"", "\"demo\""), ("\"step\" : 4", "\"step\" : 9")] {
            let original = text
            guard text.contains(from) else { Issue.record("\(from) not in the manifest"); continue }
            text = text.replacingOccurrences(of: from, with: to)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let r = try run(convirtPath(), ["checkpoint", "verify", copy])
            #expect(failedCleanly(r.status) && (r.output.contains("changed after it was written") || r.output.contains("model")), "\(from): \(r.output)")
            text = original
            try text.write(toFile: path, atomically: true, encoding: .utf8)
        }
        let intact = try run(convirtPath(), ["checkpoint", "verify", copy])
        #expect(intact.status == 0, "\(intact.output)")
    }

    /// The run's exported image encoder with `edit` applied to tensor `name`, as a new safetensors file.
    func editedImageWeights(_ file: String, _ name: String, _ edit: (inout Tensor<Float>) -> Void) throws -> String {
        let source = try tinyRun("source")
        let export = "\(dir)/export-\(file)"
        try? FileManager.default.removeItem(atPath: export)
        let e = try run(convirtPath(), ["checkpoint", "export", source, "--out", export])
        #expect(e.status == 0, "\(e.output)")
        let weights = try SafeTensorsFile(path: "\(export)/image_encoder.safetensors")
        var writer = SafeTensorsWriter(metadata: weights.metadata)
        for tensor in weights.names {
            var t = try weights.floats(tensor)
            if tensor == name { edit(&t) }
            try writer.add(tensor, t)
        }
        let path = "\(export)/\(file).safetensors"
        try writer.write(to: path)
        return path
    }

    @Test("a newest checkpoint without its manifest stops --resume as other damage does; --resume-fallback says which checkpoint it used")
    func resumeWithoutManifest() throws {
        let source = try tinyRun("source")
        let runDir = "\(dir)/no-manifest"
        try? FileManager.default.removeItem(atPath: runDir)
        try FileManager.default.copyItem(atPath: source, toPath: runDir)
        try FileManager.default.removeItem(atPath: "\(runDir)/checkpoints/step-00000004/manifest.json")
        let common = ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "6", "--checkpoint-every", "2",
                      "--retrieval-eval", "0", "--resume"]
        let strict = try run(convirtPath(), common)
        #expect(failedCleanly(strict.status) && strict.output.contains("step-00000004/manifest.json") && strict.output.contains("--resume-fallback"),
                "\(strict.output)")
        let fallback = try run(convirtPath(), common + ["--resume-fallback"])
        #expect(fallback.status == 0 && fallback.output.contains("cannot resume from \(runDir)/checkpoints/step-00000004")
                && fallback.output.contains("resuming from \(runDir)/checkpoints/step-00000002 at step 2"), "\(fallback.output)")
    }

    /// One way of damaging a prepared dataset: the file it edits, the edit, and what the error must say.
    struct PreparedDamage: Sendable, CustomTestStringConvertible {
        let name, file, expected: String
        let edit: @Sendable (inout Data) -> Void
        var testDescription: String { name }

        /// Record `record`'s 32-bit field `field` (shard, width, height, study) or, with field 4, its 64-bit offset, set to `value`.
        static func index(_ name: String, record: Int, field: Int, _ value: UInt64, expected: String) -> PreparedDamage {
            PreparedDamage(name: name, file: "images.idx", expected: expected) { data in
                let at = record * 24 + 4 * field
                if field == 4 { withUnsafeBytes(of: value.littleEndian) { data.replaceSubrange(at..<(at + 8), with: $0) } }
                else { withUnsafeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian) { data.replaceSubrange(at..<(at + 4), with: $0) } }
            }
        }

        /// studies.json with `edit` applied to the decoded list of studies.
        static func studies(_ name: String, expected: String, _ edit: @escaping @Sendable (inout [[String: Any]]) -> Void) -> PreparedDamage {
            PreparedDamage(name: name, file: "studies.json", expected: expected) { data in
                var studies = try! JSONSerialization.jsonObject(with: data) as! [[String: Any]]
                edit(&studies)
                data = try! JSONSerialization.data(withJSONObject: studies)
            }
        }
    }

    static let preparedDamage: [PreparedDamage] = [
        .index("an offset past Int.max", record: 0, field: 4, .max, expected: "images.idx: record 0 has an offset past any file"),
        .index("an offset past the shard", record: 1, field: 4, 1 << 40, expected: "images.idx: record 1 points outside its shard"),
        .index("a 0-pixel-wide image", record: 0, field: 1, 0, expected: "images.idx: record 0 has a 0x"),
        .index("sides whose product overflows", record: 2, field: 1, 0xFFFF_FFFF, expected: "images.idx: record 2 has a 4294967295x"),
        .index("a shard that does not exist", record: 0, field: 0, 7, expected: "images.idx: record 0 points outside its shard"),
        .index("a study past the list", record: 0, field: 3, 100_000, expected: "images.idx: record 0 names study 100000"),
        .studies("an image index past the index", expected: "names image 99999; images.idx holds") { $0[0]["images"] = [99999] },
        .studies("a negative image index", expected: "names image -1") { $0[0]["images"] = [-1] },
        .studies("another study's image", expected: "whose record in images.idx belongs to study 1") { $0[0]["images"] = $0[1]["images"] },
        .studies("a split that MIMIC-CXR does not have", expected: "has split \"bogus\"") { $0[0]["split"] = "bogus" },
        .studies("labels short of the manifest's names", expected: "has 1 labels; the manifest names 14") { $0[0]["labels"] = [1] },
        .studies("a study removed", expected: "studies, the manifest says") { $0.removeLast() },
        PreparedDamage(name: "a flipped byte in a shard", file: "images-00000.bin", expected: "images-00000.bin: checksum") { $0[100] ^= 0xFF },
    ]

    @Test("a damaged prepared dataset: prepare verify and train name the file and the problem, never a signal", arguments: preparedDamage)
    func damagedPreparedDataset(_ damage: PreparedDamage) throws {
        let copy = "\(dir)/prepared-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: try SharedRuns.shared.data(), toPath: copy)
        defer { try? FileManager.default.removeItem(atPath: copy) }
        let intact = try run(convirtPath(), ["prepare", "verify", copy])
        #expect(intact.status == 0 && intact.output.contains(": OK ("), "\(intact.output)")
        let path = "\(copy)/\(damage.file)"
        var data = try Data(contentsOf: URL(fileURLWithPath: path))
        damage.edit(&data)
        try data.write(to: URL(fileURLWithPath: path))
        let verify = try run(convirtPath(), ["prepare", "verify", copy])
        #expect(verify.status == 1 && verify.output.contains("FAILED") && verify.output.contains(damage.expected), "\(verify.output)")
        // train opens the dataset the same way; a shard's checksum is prepare verify's to check (train would read every byte).
        guard damage.file != "images-00000.bin" else { return }
        let train = try run(convirtPath(), ["train", "--data", copy, "--run-dir", "\(copy)-run", "--preset", "tiny", "--steps", "1", "--retrieval-eval", "0"])
        defer { try? FileManager.default.removeItem(atPath: "\(copy)-run") }
        #expect(failedCleanly(train.status) && train.output.contains(damage.expected) && train.output.contains(copy), "\(train.output)")
    }

    @Test("a vocabulary with more tokens than the text encoder's embeddings is refused before any sentence runs")
    func vocabularyPastTheEmbeddings() throws {
        let runDir = try tinyRun("source")
        let vocab = try String(contentsOfFile: "\(runDir)/vocab.txt", encoding: .utf8)
        let bigger = "\(dir)/bigger-vocab-\(UUID().uuidString).txt", texts = "\(dir)/texts-\(UUID().uuidString).txt"
        try (vocab + "zzextra1\nzzextra2\n").write(toFile: bigger, atomically: true, encoding: .utf8)
        try "no effusion\n".write(toFile: texts, atomically: true, encoding: .utf8)
        let embed = try run(convirtPath(), ["embed", "--checkpoint", runDir, "--texts", texts, "--vocab", bigger, "--out", "\(dir)/never.safetensors"])
        #expect(failedCleanly(embed.status) && embed.output.contains("vocabulary \(bigger) has") && embed.output.contains("its last 2 have no embedding"),
                "\(embed.output)")
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/never.safetensors"))
    }

    @Test("--global-batch 0 or below is refused as not positive, not as indivisible", arguments: ["0", "-8"])
    func nonPositiveBatch(value: String) throws {
        let r = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", "\(dir)/batch\(value)", "--global-batch", value])
        #expect(failedCleanly(r.status) && r.output.contains("--global-batch must be positive, got \(value)") && !r.output.contains("divide"), "\(r.output)")
    }

    @Test("--val-samples 0 says no validation is computed, not that the split is too small")
    func noValidationSamples() throws {
        let r = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", "\(dir)/val0", "--preset", "tiny", "--steps", "1",
                                        "--val-samples", "0", "--retrieval-eval", "0"])
        #expect(r.status == 0 && r.output.contains("--val-samples 0: no validation loss will be computed") && !r.output.contains("fewer"), "\(r.output)")
    }

    @Test("a negative number is read as the option's value and refused by its check, never 'Missing value'",
          arguments: [["train", "--checkpoint-every", "-1"], ["train", "--keep-checkpoints", "-2"], ["synth", "mimic", "--studies", "-1"],
                      ["prepare", "mimic", "--image-size", "-5"], ["eval", "linear", "--runs", "-1"], ["synth", "chexpert", "--count", "-3"]])
    func negativeNumbers(arguments: [String]) throws {
        let option = arguments[arguments.count - 2]
        var full = arguments
        switch arguments[0] {
        case "train": full += ["--data", try SharedRuns.shared.data(), "--run-dir", "\(dir)/negative"]
        case "synth": full += ["--out", "\(dir)/negative-synth"]
        case "prepare": full += ["--root", "\(dir)/nowhere", "--out", "\(dir)/negative-prepare"]
        default: full += ["--dataset", "rsna", "--root", "\(dir)/nowhere", "--checkpoint", "\(dir)/nowhere"]
        }
        let r = try run(convirtPath(), full)
        #expect(failedCleanly(r.status) && !r.output.contains("Missing value") && r.output.contains(option), "\(r.output)")
    }

    @Test("--data naming the manifest file asks for the dataset's directory")
    func dataIsAFile() throws {
        let r = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data() + "/manifest.json", "--run-dir", "\(dir)/data-file"])
        #expect(failedCleanly(r.status) && r.output.contains("is a file; give the prepared dataset's directory"), "\(r.output)")
    }

    @Test("a manifest number that does not fit its type names the key and the value", arguments: ["-1", "4294967296", "1.5"])
    func manifestNumbers(value: String) throws {
        let copy = try copyCheckpoint("crc-\(value)")
        let path = "\(copy)/manifest.json"
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let edited = text.replacingOccurrences(of: #""crc32"\s*:\s*\d+"#, with: "\"crc32\": \(value)", options: .regularExpression)
        #expect(edited != text)
        try edited.write(toFile: path, atomically: true, encoding: .utf8)
        let r = try run(convirtPath(), ["checkpoint", "verify", copy])
        #expect(r.status != 0 && r.output.contains("shards[0].crc32: \(value) is not") && !r.output.contains("not valid JSON"), "\(r.output)")
    }

    @Test("checkpoint inspect reports a shard whose size on the disk is not the manifest's, and fails")
    func inspectEmptyShard() throws {
        let copy = try copyCheckpoint("empty-shard")
        try Data().write(to: URL(fileURLWithPath: "\(copy)/shard-00000-of-00001.zst"))
        let r = try run(convirtPath(), ["checkpoint", "inspect", copy])
        #expect(r.status == 1 && r.output.contains("0 bytes on the disk") && r.output.contains("checkpoint verify"), "\(r.output)")
    }

    @Test("image weights with a negative BatchNorm running variance are refused when loaded, naming the tensor")
    func negativeVariance() throws {
        let path = try editedImageWeights("negative-variance", "layer4.0.bn3.running_var") { $0[flat: 0] = -1 }
        let train = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", "\(dir)/negative-variance", "--preset", "tiny",
                                            "--steps", "2", "--image-weights", path, "--retrieval-eval", "0"])
        #expect(failedCleanly(train.status) && train.output.contains("layer4.0.bn3.running_var") && train.output.contains("negative variance"),
                "\(train.output)")
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/negative-variance/checkpoints"), "nothing was trained")
    }

    @Test("a non-finite validation loss stops the run like a non-finite training loss, before any checkpoint of that step")
    func nonFiniteValidation() throws {
        // A running mean of -3e38 (finite, so it loads): training normalises with the batch's statistics and
        // trains, evaluation mode overflows to infinity and the validation loss is NaN.
        let path = try editedImageWeights("huge-mean", "layer4.0.bn3.running_mean") { $0[flat: 0] = -3e38 }
        let runDir = "\(dir)/nan-validation"
        let train = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "4",
                                            "--val-every", "2", "--checkpoint-every", "2", "--image-weights", path, "--retrieval-eval", "0"])
        #expect(failedCleanly(train.status) && train.output.contains("step 2: the validation loss is NaN"), "\(train.output)")
        #expect(!train.output.contains("done:"), "\(train.output)")
        let checkpoints = (try? FileManager.default.contentsOfDirectory(atPath: "\(runDir)/checkpoints")) ?? []
        #expect(!checkpoints.contains("step-00000002"), "no checkpoint of the step whose validation failed: \(checkpoints)")
    }

    @Test("NaN image weights are refused naming the tensor; a diverging run stops without writing a NaN checkpoint")
    func nonFinite() throws {
        let source = try tinyRun("source")
        let export = try run(convirtPath(), ["checkpoint", "export", source, "--out", "\(dir)/export-nan"])
        #expect(export.status == 0, "\(export.output)")
        let file = try SafeTensorsFile(path: "\(dir)/export-nan/image_encoder.safetensors")
        var writer = SafeTensorsWriter(metadata: file.metadata)
        for name in file.names {
            var t = try file.floats(name)
            if name == "conv1.weight" { t[flat: 3] = .nan }
            try writer.add(name, t)
        }
        let poisoned = "\(dir)/export-nan/poisoned.safetensors"
        try writer.write(to: poisoned)
        let train = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", "\(dir)/nan-weights", "--preset", "tiny",
                                            "--steps", "1", "--image-weights", poisoned])
        #expect(failedCleanly(train.status) && train.output.contains("conv1.weight") && train.output.contains("non-finite"), "\(train.output)")
        // A learning rate that makes the weights blow up: stopped with a clear error; what checkpoints
        // there are all verify.
        let runDir = "\(dir)/diverging"
        let diverge = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "40",
                                              "--lr", "1e10", "--checkpoint-every", "1", "--retrieval-eval", "0"])
        // Whichever comes first: a non-finite loss or gradient norm, or non-finite weights at a checkpoint.
        #expect(failedCleanly(diverge.status) && diverge.output.contains("became NaN or infinite; training stopped"), "\(diverge.output)")
        #expect(!diverge.output.contains("step 3/40"), "stopped at the step that diverged: \(diverge.output)")
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "\(runDir)/checkpoints")) ?? [] where name.hasPrefix("step-") {
            let v = try run(convirtPath(), ["checkpoint", "verify", "\(runDir)/checkpoints/\(name)"])
            #expect(v.status == 0, "\(name): \(v.output)")
        }
    }

    @Test("parity fails when the PyTorch reference holds NaN")
    func parityNaNReference() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("ConvirtModelsTests/Fixtures")
        let source = try SafeTensorsFile(path: fixtures.appendingPathComponent("bert_tiny.safetensors").path)
        for poisonedName in ["output.last_hidden_state", source.names.first { $0.hasPrefix("grad.") }!] {
            var writer = SafeTensorsWriter(metadata: source.metadata)
            for info in source.tensors {
                if info.dtype == .i64 { try writer.add(info.name, source.integers(info.name)); continue }
                var t = try source.floats(info.name)
                if info.name == poisonedName { t[flat: 0] = .nan }
                try writer.add(info.name, t)
            }
            let path = "\(dir)/nan-\(UUID().uuidString).safetensors"
            try writer.write(to: path)
            let r = try run(convirtPath(), ["parity", path])
            #expect(r.status != 0 && r.output.contains("FAIL"), "NaN in \(poisonedName): \(r.output)")
        }
    }

    @Test("train refuses a run directory that holds a run unless --resume or --overwrite; nothing is changed")
    func existingRun() throws {
        let runDir = try tinyRun("existing", steps: 2)
        let before = try Data(contentsOf: URL(fileURLWithPath: "\(runDir)/metrics.jsonl"))
        let again = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "4"])
        #expect(failedCleanly(again.status) && again.output.contains("already holds a run") && again.output.contains("--resume"), "\(again.output)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: "\(runDir)/metrics.jsonl")) == before, "metrics.jsonl unchanged")
        let overwritten = try run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", runDir, "--preset", "tiny", "--steps", "3",
                                                  "--overwrite", "--retrieval-eval", "0"])
        #expect(overwritten.status == 0 && overwritten.output.contains("--overwrite: removed the run"), "\(overwritten.output)")
        let rows = try String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(rows.count == 3, "a new run of 3 steps: \(rows.count) rows")
        #expect((try? String(contentsOfFile: "\(runDir)/checkpoints/latest", encoding: .utf8)) == "step-00000003")
    }

    @Test("resuming with another seed, batch or token limit is refused listing the differences; a reached target says so")
    func resumeConfigChange() throws {
        let runDir = try tinyRun("changed", steps: 2)
        let data = try SharedRuns.shared.data()
        for (flags, shown) in [(["--seed", "7"], "--seed: 0 -> 7"), (["--global-batch", "4"], "--global-batch: 8 -> 4"), (["--max-tokens", "16"], "--max-tokens: 24 -> 16")] {
            let r = try run(convirtPath(), ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--steps", "4", "--resume"] + flags)
            #expect(failedCleanly(r.status) && r.output.contains(shown) && r.output.contains("--allow-config-change"), "\(flags): \(r.output)")
        }
        let done = try run(convirtPath(), ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--steps", "2", "--resume"])
        #expect(done.status == 0 && done.output.contains("is already at step 2 of 2: nothing to do") && !done.output.contains("nan"), "\(done.output)")
        let allowed = try run(convirtPath(), ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--steps", "3", "--resume", "--seed", "7",
                                              "--allow-config-change", "--retrieval-eval", "0"])
        #expect(allowed.status == 0 && allowed.output.contains("warning: resuming with changed settings"), "\(allowed.output)")
    }

    @Test("negative numbers and a --run-dir that is a file get messages naming the value; nothing is created")
    func messages() throws {
        let data = try SharedRuns.shared.data()
        let target = "\(dir)/never-created-\(UUID().uuidString)"
        for (flags, shown) in [(["--steps", "-5"], "--steps must be positive, got -5"), (["--lr", "-1"], "--lr must be a positive number, got -1.0")] {
            let r = try run(convirtPath(), ["train", "--data", data, "--run-dir", target, "--preset", "tiny"] + flags)
            #expect(failedCleanly(r.status) && r.output.contains(shown), "\(flags): \(r.output)")
            #expect(!FileManager.default.fileExists(atPath: target), "a refused start creates no run directory")
        }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let file = "\(dir)/a-file"
        try "x".write(toFile: file, atomically: true, encoding: .utf8)
        let r = try run(convirtPath(), ["train", "--data", data, "--run-dir", file, "--preset", "tiny", "--steps", "1"])
        #expect(failedCleanly(r.status) && r.output.contains("--run-dir \(file) is a file, not a directory") && !r.output.contains("NSCocoaErrorDomain"), "\(r.output)")
        let export = try run(convirtPath(), ["checkpoint", "export", try tinyRun("source"), "--out", file])
        #expect(failedCleanly(export.status) && export.output.contains("--out \(file) is a file") && !export.output.contains("NSCocoaErrorDomain"),
                "\(export.output)")
    }
}

@Suite("A full disk while metrics are written")
struct MetricsDiskTests {
    @Test("a full disk while appending metrics.jsonl is a clear error; a resume drops the cut line")
    func fullDiskMetrics() throws {
        let data = try SharedRuns.shared.data()
        let dir = SharedRuns.shared.dir + "/metrics-disk"
        try FileManager.default.createDirectory(atPath: "\(dir)/small", withIntermediateDirectories: true)
        // A 16 KiB tmpfs: the config and vocabulary fit, a few dozen metrics rows do not.
        let script = "mount -t tmpfs -o size=16k tmpfs \(dir)/small || exit 97; "
            + "\(convirtPath()) train --data \(data) --run-dir \(dir)/small/run --preset tiny --steps 200 --retrieval-eval 0; echo \"train status $?\""
        let disk = try run("/usr/bin/unshare", ["-m", "sh", "-c", script], timeout: 300)
        #expect(disk.status != 97, "mounting a tmpfs (needs root): \(disk.output)")
        #expect(disk.output.contains("train status 1") && disk.output.contains("metrics.jsonl") && disk.output.contains("No space left on device"),
                "\(disk.output)")

        // Room for one checkpoint of the tiny model (about 0.45 MB) and not two: whichever write meets the full
        // disk first (the background shard, or metrics.jsonl behind it), one rank leaves no temporary directory.
        try FileManager.default.createDirectory(atPath: "\(dir)/one", withIntermediateDirectories: true)
        let checkpointScript = "mount -t tmpfs -o size=700k tmpfs \(dir)/one || exit 97; "
            + "\(convirtPath()) train --data \(data) --run-dir \(dir)/one/run --preset tiny --steps 20 --checkpoint-every 5 --retrieval-eval 0; "
            + "echo \"train status $?\"; echo listing; ls -a \(dir)/one/run/checkpoints"
        let checkpointDisk = try run("/usr/bin/unshare", ["-m", "sh", "-c", checkpointScript], timeout: 300)
        #expect(checkpointDisk.output.contains("train status 1") && checkpointDisk.output.contains("No space left on device"), "\(checkpointDisk.output)")
        let listing = (checkpointDisk.output.components(separatedBy: "listing").last ?? "").split(whereSeparator: \.isWhitespace)
        #expect(listing.contains("step-00000005") && !listing.contains { $0.hasPrefix(".tmp-") }, "\(checkpointDisk.output)")

        // A line cut short (as a full disk or a kill leaves it): resuming appends after the last whole line.
        let runDir = "\(dir)/cut"
        let first = try run(convirtPath(), ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2",
                                            "--retrieval-eval", "0"])
        #expect(first.status == 0, "\(first.output)")
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(runDir)/metrics.jsonl"))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(#"{"epoch":0,"grad_norm":1.2,"lo"#.utf8))
        try handle.close()
        let resumed = try run(convirtPath(), ["train", "--data", data, "--run-dir", runDir, "--preset", "tiny", "--steps", "6", "--resume", "--retrieval-eval", "0"])
        #expect(resumed.status == 0, "\(resumed.output)")
        let lines = try String(contentsOfFile: "\(runDir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 6, "4 rows, then steps 5 and 6: \(lines.count)")
        #expect(lines.allSatisfy { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) != nil }, "every line is whole JSON: \(lines)")
    }
}
