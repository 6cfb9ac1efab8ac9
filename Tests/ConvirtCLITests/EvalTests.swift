// The downstream evaluations end to end: a tiny encoder pretrained on synthetic MIMIC-CXR, evaluated
// by `convirt eval linear|finetune|retrieval` and `convirt embed` on synthetic CheXpert, RSNA, COVIDx
// and MURA in their released layouts; one rank and two ranks agree.

import ConvirtIO
import Foundation
import Testing

@Suite("Downstream evaluations", .serialized)
struct EvalTests {
    static let environment = DistributedTrainingTests.mpiEnvironment

    struct Classification: Decodable {
        let dataset: String, `protocol`: String, fraction: Double, metric: String, runs: [Double], mean: Double, std: Double
        let per_label: [String: Double]
    }
    /// Zero-shot results: DESIGN.md's classification JSON without "runs" (there is nothing to repeat).
    struct ZeroShot: Decodable {
        let dataset: String, `protocol`: String, fraction: Double, metric: String, mean: Double, per_label: [String: Double]
        let runs: [Double]?
    }

    @Test("linear, fine-tuned and retrieval evaluations of a pretrained tiny encoder, on 1 and 2 ranks")
    func evaluations() throws {
        let mpirun = try #require(["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first { FileManager.default.isExecutableFile(atPath: $0) })
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-eval-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func ok(_ arguments: [String], ranks: Int = 1, timeout: Double = 300) throws -> String {
            let r = ranks == 1 ? try run(convirtPath(), arguments, environment: Self.environment, timeout: timeout)
                : try run(mpirun, ["--oversubscribe", "-np", "\(ranks)", convirtPath()] + arguments, environment: Self.environment, timeout: timeout)
            #expect(r.status == 0, "convirt \(arguments.joined(separator: " ")): \(r.output)")
            return r.output
        }
        func classification(_ path: String) throws -> Classification {
            try JSONDecoder().decode(Classification.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        }
        // A tiny encoder pretrained briefly on synthetic MIMIC-CXR.
        _ = try ok(["synth", "mimic", "--out", "\(dir)/mimic", "--studies", "120", "--image-size", "64", "--seed", "2"])
        _ = try ok(["prepare", "mimic", "--root", "\(dir)/mimic", "--out", "\(dir)/prepared"])
        _ = try ok(["train", "--data", "\(dir)/prepared", "--run-dir", "\(dir)/run", "--preset", "tiny", "--steps", "20", "--retrieval-eval", "0"])
        #expect(FileManager.default.fileExists(atPath: "\(dir)/run/vocab.txt"), "the run keeps its vocabulary")
        for dataset in ["chexpert", "rsna", "covidx", "mura"] {
            _ = try ok(["synth", dataset, "--out", "\(dir)/\(dataset)", "--count", dataset == "chexpert" ? "150" : "80", "--image-size", "96", "--seed", "5"])
        }

        // A truncated training image: skipped, counted and reported, never fatal.
        let csv = try String(contentsOfFile: "\(dir)/chexpert/CheXpert-v1.0-small/train.csv", encoding: .utf8)
        let firstPath = try #require(csv.split(separator: "\n").dropFirst().first?.split(separator: ",").first).dropFirst("CheXpert-v1.0-small/".count)
        let broken = "\(dir)/chexpert/CheXpert-v1.0-small/\(firstPath)"
        let jpeg = try Data(contentsOf: URL(fileURLWithPath: broken))
        try jpeg.prefix(jpeg.count / 3).write(to: URL(fileURLWithPath: broken))

        // Linear evaluation: the same result on one rank and on two (features split over the ranks).
        let common = ["--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run", "--runs", "2", "--max-epochs", "8"]
        let one = try ok(["eval", "linear"] + common + ["--out", "\(dir)/eval/linear1.json", "--cache", "\(dir)/cache1"])
        #expect(one.contains("ConVIRT") && one.contains("ours (convirt)"), "side-by-side table with the paper: \(one)")
        #expect(one.contains("train: 1 image(s) could not be read and are skipped, e.g. \(broken)"), "\(one)")
        _ = try ok(["eval", "linear"] + common + ["--out", "\(dir)/eval/linear2.json", "--cache", "\(dir)/cache2"], ranks: 2)
        let (a, b) = (try classification("\(dir)/eval/linear1.json"), try classification("\(dir)/eval/linear2.json"))
        #expect(a.dataset == "chexpert" && a.protocol == "linear" && a.metric == "auc" && a.runs.count == 2 && a.fraction == 1)
        #expect(Set(a.per_label.keys) == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"])
        #expect(a.runs.allSatisfy { $0 >= 0 && $0 <= 1 })
        for (x, y) in zip(a.runs, b.runs) { #expect(abs(x - y) <= 1e-3, "1 rank \(x), 2 ranks \(y)") }
        // Features are cached: a second invocation reads them.
        let cached = try ok(["eval", "linear"] + common + ["--cache", "\(dir)/cache1", "--fraction", "0.1", "--out", "\(dir)/eval/steps-default.json"])
        #expect(cached.contains("cached features"), "\(cached)")
        // --min-epoch-steps: a split smaller than that many batches is passed over again within an epoch
        // (other results); 1 is the default's single pass, exactly.
        for (steps, file) in [("1", "steps-1"), ("12", "steps-12")] {
            _ = try ok(["eval", "linear"] + common + ["--cache", "\(dir)/cache1", "--fraction", "0.1", "--min-epoch-steps", steps,
                                                      "--out", "\(dir)/eval/\(file).json"])
        }
        let (plain, onePass, repeated) = (try classification("\(dir)/eval/steps-default.json"), try classification("\(dir)/eval/steps-1.json"),
                                         try classification("\(dir)/eval/steps-12.json"))
        #expect(plain.runs == onePass.runs && plain.runs != repeated.runs, "\(plain.runs) \(onePass.runs) \(repeated.runs)")
        // --keep-best: loss is the default; metric keeps the epoch of the best validation AUC (valid results).
        for (keep, file) in [("loss", "keep-loss"), ("metric", "keep-metric")] {
            _ = try ok(["eval", "linear"] + common + ["--cache", "\(dir)/cache1", "--fraction", "0.1", "--keep-best", keep, "--out", "\(dir)/eval/\(file).json"])
        }
        let (byLoss, byMetric) = (try classification("\(dir)/eval/keep-loss.json"), try classification("\(dir)/eval/keep-metric.json"))
        #expect(byLoss.runs == plain.runs && byMetric.runs.count == 2 && byMetric.runs.allSatisfy { $0 >= 0 && $0 <= 1 }, "\(byLoss.runs) \(byMetric.runs)")
        // A cache file damaged on the disk (a flipped bit among its features) fails its checksum and is computed again.
        let testCache = try #require(try FileManager.default.contentsOfDirectory(atPath: "\(dir)/cache1").first { $0.hasPrefix("chexpert-test-") })
        var cacheBytes = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/cache1/\(testCache)"))
        cacheBytes[cacheBytes.count - 4 * 40] ^= 0x10
        try cacheBytes.write(to: URL(fileURLWithPath: "\(dir)/cache1/\(testCache)"))
        let rechecked = try ok(["eval", "linear"] + common + ["--cache", "\(dir)/cache1", "--fraction", "0.1", "--out", "\(dir)/eval/damaged-cache.json"])
        #expect(rechecked.contains("fail their checksum; computing them again"), "\(rechecked)")
        #expect(try classification("\(dir)/eval/damaged-cache.json").runs == plain.runs, "the recomputed features give the same results")
        // A changed image under the same path is not served stale features: the cache is keyed by content.
        let csvLines = csv.split(separator: "\n")
        let secondPath = try #require(csvLines.dropFirst(2).first?.split(separator: ",").first).dropFirst("CheXpert-v1.0-small/".count)
        let changed = "\(dir)/chexpert/CheXpert-v1.0-small/\(secondPath)"
        let original = try Data(contentsOf: URL(fileURLWithPath: changed))
        try (original + Data([0])).write(to: URL(fileURLWithPath: changed))
        let recomputed = try ok(["eval", "linear"] + common + ["--cache", "\(dir)/cache1", "--fraction", "0.1"])
        #expect(recomputed.split(separator: "\n").filter { $0.hasPrefix("train:") && $0.contains("cached features") }.isEmpty,
                "the changed training image's split was recomputed: \(recomputed)")
        #expect(recomputed.contains("validation: ") && recomputed.contains("cached features"), "the unchanged splits still come from the cache: \(recomputed)")

        // Fine-tuning, data-parallel: one rank and two agree to float rounding over a short schedule.
        let tune = ["--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run", "--runs", "1", "--max-epochs", "2",
                    "--head-steps", "5", "--batch", "16"]
        let tuned = try ok(["eval", "finetune"] + tune + ["--out", "\(dir)/eval/tune1.json"])
        _ = try ok(["eval", "finetune"] + tune + ["--out", "\(dir)/eval/tune2.json"], ranks: 2)
        let (c, d) = (try classification("\(dir)/eval/tune1.json"), try classification("\(dir)/eval/tune2.json"))
        #expect(c.protocol == "finetune" && c.runs.count == 1)
        #expect(abs(c.mean - d.mean) <= 0.02, "fine-tuning on 1 rank \(c.mean), on 2 ranks \(d.mean)")
        // Later epochs read the decoded images kept in memory: the same run as decoding them every epoch,
        // bit for bit (the truncated training image is never kept, and skipped alike).
        #expect(tuned.contains("decoded images kept in memory (rank 0): ") && !tuned.contains("reads from memory 0,"), "\(tuned)")
        _ = try ok(["eval", "finetune"] + tune + ["--image-cache-mb", "0", "--out", "\(dir)/eval/tune0.json"])
        let uncached = try classification("\(dir)/eval/tune0.json")
        #expect(uncached.runs == c.runs && uncached.mean == c.mean, "without the cache \(uncached.runs), with it \(c.runs)")

        // The other datasets (DICOM, multi-class accuracy, study-level AUC) and the random-init baseline.
        for (dataset, metric) in [("rsna", "auc"), ("covidx", "accuracy"), ("mura", "auc")] {
            _ = try ok(["eval", "linear", "--dataset", dataset, "--root", "\(dir)/\(dataset)", "--checkpoint", "\(dir)/run", "--runs", "1",
                        "--max-epochs", "5", "--out", "\(dir)/eval/\(dataset).json"])
            let r = try classification("\(dir)/eval/\(dataset).json")
            #expect(r.metric == metric && r.mean >= 0 && r.mean <= 1, "\(dataset): \(r)")
        }
        _ = try ok(["eval", "linear", "--init", "random", "--preset", "tiny", "--dataset", "rsna", "--root", "\(dir)/rsna", "--runs", "1",
                    "--max-epochs", "5", "--out", "\(dir)/eval/rsna-random.json"])
        #expect(try String(contentsOfFile: "\(dir)/eval/rsna-random.json", encoding: .utf8).contains("\"init\" : \"random\""))
        // Each run's epochs and why it stopped, in the JSON and on the console: 5 epochs cannot reach the
        // plateau's 10 stale epochs, so the cap ends the run, with a warning.
        let capped = try ok(["eval", "linear", "--init", "random", "--preset", "tiny", "--dataset", "rsna", "--root", "\(dir)/rsna", "--runs", "2",
                             "--max-epochs", "3", "--out", "\(dir)/eval/rsna-capped.json"])
        let stops = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/eval/rsna-capped.json"))) as? [String: Any])
        #expect(stops["epochs_run"] as? [Int] == [3, 3] && stops["stop_reasons"] as? [String] == ["max_epochs", "max_epochs"], "\(stops)")
        #expect(capped.contains("warning: 2 of 2 run(s) of rsna (random) ended at the 3-epoch cap") && capped.contains("3-3 epochs (2 at the cap)"), "\(capped)")
        let quiet = try ok(["eval", "linear", "--init", "random", "--preset", "tiny", "--dataset", "rsna", "--root", "\(dir)/rsna", "--runs", "1",
                            "--max-epochs", "3", "--quiet"])
        #expect(quiet.split(separator: "\n").count == 2 && quiet.hasPrefix("random linear on rsna") && quiet.contains("warning: 1 of 1"),
                "--quiet: the result line, then the warning: \(quiet)")

        // Given weights (here the checkpoint's image encoder exported with torchvision names, as ImageNet
        // weights would come) go through the same command and give the checkpoint's result exactly.
        let exported = try ok(["checkpoint", "export", "\(dir)/run", "--out", "\(dir)/export"])
        #expect(exported.contains("with its tokenizer") && FileManager.default.fileExists(atPath: "\(dir)/export/text_encoder/vocab.txt"), "\(exported)")
        // Hugging Face's BertTokenizer loads the exported directory and gives the ids convirt gives
        // (the run was lowercased, 24 tokens at most).
        let sentences = "There is a LARGE left pleural effusion.\nNo acute cardiopulmonary process; heart size is normal.\n"
            + "Élevated right hemidiaphragm, unchanged since 2019-03-04 (see prior).\n"
            + String(repeating: "Bibasilar atelectasis and a small effusion. ", count: 6) + "\n"
            + "Line\u{2028}separator, [UNK]\u{301} after a token, cafe\u{301}\n"
        try sentences.write(toFile: "\(dir)/sentences.txt", atomically: true, encoding: .utf8)
        let ids = try run(convirtPath(), ["tokenize", "--vocab", "\(dir)/run/vocab.txt", "--lowercase", "--max-length", "24"], input: sentences)
        #expect(ids.status == 0, "\(ids.output)")
        try ids.output.write(toFile: "\(dir)/sentences.ids", atomically: true, encoding: .utf8)
        let hf = try run("/usr/bin/env", ["python3", "\(repository)/tools/load_export.py", "\(dir)/export", "--check-tokenizer",
                                         "\(dir)/sentences.txt", "\(dir)/sentences.ids"], timeout: 300)
        #expect(hf.status == 0 && hf.output.contains("5 of 5 lines with equal ids") && hf.output.contains("do_lower_case=True"),
                "BertTokenizer.from_pretrained(export/text_encoder) (test.sh installs transformers): \(hf.output)")
        _ = try ok(["eval", "linear", "--init", "imagenet", "--image-weights", "\(dir)/export/image_encoder.safetensors", "--checkpoint", "\(dir)/run",
                    "--dataset", "rsna", "--root", "\(dir)/rsna", "--runs", "1", "--max-epochs", "5", "--out", "\(dir)/eval/rsna-weights.json"])
        #expect(try classification("\(dir)/eval/rsna-weights.json").runs == classification("\(dir)/eval/rsna.json").runs)

        // Retrieval on the CheXpert 8x200 files.
        let retrieval = try ok(["eval", "retrieval", "--checkpoint", "\(dir)/run", "--root", "\(dir)/chexpert", "--queries", "\(dir)/chexpert/chexpert_8x200",
                                "--out", "\(dir)/eval/retrieval.json"], ranks: 2)
        #expect(retrieval.contains("image_to_image") || retrieval.contains("image->image") || retrieval.contains("Image"), "\(retrieval)")
        _ = try ok(["eval", "retrieval", "--checkpoint", "\(dir)/run", "--root", "\(dir)/chexpert", "--queries", "\(dir)/chexpert/chexpert_8x200",
                    "--out", "\(dir)/retrieval-1.json"])
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/eval/retrieval.json"))) as! [String: Any]
        let single = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/retrieval-1.json"))) as! [String: Any]
        for mode in ["image_to_image", "text_to_image"] {
            #expect(NSDictionary(dictionary: json[mode] as? [String: Any] ?? [:]).isEqual(to: single[mode] as? [String: Any] ?? ["missing": 1]),
                    "\(mode): 1 rank and 2 ranks give the same precisions")
        }
        for mode in ["image_to_image", "text_to_image"] {
            let table = try #require(json[mode] as? [String: [String: Double]], "\(mode) in \(json.keys)")
            for k in [5, 10, 50] {
                let row = try #require(table["precision@\(k)"])
                #expect(row.count == 9 && row.values.allSatisfy { $0 >= 0 && $0 <= 1 }, "\(mode) precision@\(k): \(row)")
            }
        }

        // Zero-shot from the default prompts: the same on 1 and 2 ranks, the JSON of eval linear with
        // "protocol": "zeroshot", a table beside the run's linear results, and the report shows it.
        let zero = try ok(["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run",
                           "--out", "\(dir)/run/eval/zeroshot-chexpert.json"])
        #expect(zero.contains("prompts (the defaults for chexpert)") && zero.contains("Bibasilar atelectasis.")
                && zero.contains("Linear classification, and zero-shot beside it") && zero.contains("ours zeroshot (convirt)"), "\(zero)")
        _ = try ok(["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run",
                    "--out", "\(dir)/zeroshot-2.json"], ranks: 2)
        func zeroShot(_ path: String) throws -> ZeroShot { try JSONDecoder().decode(ZeroShot.self, from: Data(contentsOf: URL(fileURLWithPath: path))) }
        let (z1, z2) = (try zeroShot("\(dir)/run/eval/zeroshot-chexpert.json"), try zeroShot("\(dir)/zeroshot-2.json"))
        #expect(z1.protocol == "zeroshot" && z1.metric == "auc" && z1.runs == nil && (0...1).contains(z1.mean))
        #expect(Set(z1.per_label.keys) == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"], "\(z1.per_label)")
        #expect(abs(z1.mean - z2.mean) <= 1e-6, "zero-shot on 1 rank \(z1.mean), on 2 ranks \(z2.mean)")
        let covid = try ok(["eval", "zeroshot", "--dataset", "covidx", "--root", "\(dir)/covidx", "--checkpoint", "\(dir)/run", "--out", "\(dir)/zs-covidx.json"])
        #expect(try zeroShot("\(dir)/zs-covidx.json").metric == "accuracy", "\(covid)")
        for dataset in ["rsna", "mura"] {
            _ = try ok(["eval", "zeroshot", "--dataset", dataset, "--root", "\(dir)/\(dataset)", "--checkpoint", "\(dir)/run", "--quiet"])
        }
        // Prompts from a file; a prompt the vocabulary knows nothing of, and a label without prompts, are errors that name them.
        let custom = #"{"Atelectasis": {"positive": ["atelectasis"], "negative": ["no atelectasis"]}, "Cardiomegaly": {"positive": ["enlarged heart"], "negative": ["normal heart"]}, "Consolidation": {"positive": ["consolidation"], "negative": ["clear lungs"]}, "Edema": {"positive": ["edema"], "negative": ["no edema"]}, "Pleural Effusion": {"positive": ["pleural effusion"], "negative": ["no effusion"]}}"#
        try custom.write(toFile: "\(dir)/prompts.json", atomically: true, encoding: .utf8)
        let own = try ok(["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run", "--prompts", "\(dir)/prompts.json"])
        #expect(own.contains("prompts (\(dir)/prompts.json)") && own.contains("enlarged heart"), "\(own)")
        try custom.replacingOccurrences(of: "[\"edema\"]", with: "[\"ζζζ ξξ\"]").write(toFile: "\(dir)/unknown.json", atomically: true, encoding: .utf8)
        let unknown = try run(convirtPath(), ["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run",
                                              "--prompts", "\(dir)/unknown.json"])
        #expect(unknown.status == 1 && unknown.output.contains("\"ζζζ ξξ\" (Edema) has no word the vocabulary knows"), "\(unknown.output)")
        try custom.replacingOccurrences(of: #""Edema": {"positive": ["edema"], "negative": ["no edema"]}, "#, with: "")
            .write(toFile: "\(dir)/missing.json", atomically: true, encoding: .utf8)
        let missing = try run(convirtPath(), ["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run",
                                              "--prompts", "\(dir)/missing.json"])
        #expect(missing.status == 1 && missing.output.contains("no prompts for Edema"), "\(missing.output)")
        // Manifests beside every --out. A rerun from one (its settings from the manifest, not the flags)
        // reproduces the result and the manifest byte for byte; data with one training row left out, another
        // prompt set and an edited manifest are refused, naming what differs; the report shows the manifest.
        let pinnedArguments = common + ["--cache", "\(dir)/cache1", "--fraction", "0.1", "--seed", "3"]
        _ = try ok(["eval", "linear"] + pinnedArguments + ["--out", "\(dir)/run/eval/pinned.json"])
        let manifestPath = "\(dir)/run/eval/pinned.manifest.json"
        _ = try ok(["eval", "linear", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--manifest", manifestPath, "--runs", "1",
                    "--cache", "\(dir)/cache1", "--out", "\(dir)/rerun.json"])
        for (pinned, rerun) in [("\(dir)/run/eval/pinned.json", "\(dir)/rerun.json"), (manifestPath, "\(dir)/rerun.manifest.json")] {
            #expect(FileManager.default.contents(atPath: pinned) == FileManager.default.contents(atPath: rerun), "\(rerun) differs from \(pinned)")
        }
        let manifestJSON = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: manifestPath))) as? [String: Any])
        let settings = try #require(manifestJSON["settings"] as? [String: String]), splits = try #require(manifestJSON["splits"] as? [String: [String: Any]])
        #expect(settings["runs"] == "2" && settings["seed"] == "3" && settings["fraction"] == "0.1" && (manifestJSON["seeds"] as? [Int]) == [3, 4])
        #expect(Set(splits.keys) == ["train", "validation", "test"] && (manifestJSON["checkpoint"] as? [String: Any])?["step"] as? Int == 20)
        let edited = "\(dir)/chexpert-edited/CheXpert-v1.0-small", released = "\(dir)/chexpert/CheXpert-v1.0-small"
        try FileManager.default.createDirectory(atPath: edited, withIntermediateDirectories: true)
        for name in ["train", "valid", "valid.csv"] { try FileManager.default.createSymbolicLink(atPath: "\(edited)/\(name)", withDestinationPath: "\(released)/\(name)") }
        try (csvLines.enumerated().filter { $0.offset != 7 }.map(\.element).joined(separator: "\n") + "\n").write(toFile: "\(edited)/train.csv", atomically: true, encoding: .utf8)
        let refused = try run(convirtPath(), ["eval", "linear", "--dataset", "chexpert", "--root", "\(dir)/chexpert-edited", "--manifest", manifestPath,
                                              "--cache", "\(dir)/cache1"], environment: Self.environment)
        let trainCount = try #require(splits["train"]?["count"] as? Int)
        #expect(refused.status == 1 && refused.output.contains("this is not the pinned evaluation: train: \(trainCount) ids")
                && refused.output.contains("\(trainCount - 1) ids") && refused.output.contains("nothing was evaluated")
                && !refused.output.contains("validation:") && !refused.output.contains("test:"), "\(refused.output)")
        var tampered = try String(contentsOfFile: manifestPath, encoding: .utf8)
        tampered = tampered.replacingOccurrences(of: "\"runs\" : \"2\"", with: "\"runs\" : \"1\"")
        try tampered.write(toFile: "\(dir)/tampered.manifest.json", atomically: true, encoding: .utf8)
        let edits = try run(convirtPath(), ["eval", "linear", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--manifest", "\(dir)/tampered.manifest.json"],
                            environment: Self.environment)
        #expect(edits.status == 1 && edits.output.contains("checksum does not match its content"), "\(edits.output)")
        // Held-out retrieval: its manifest pins the studies; a rerun from it ignores --studies and gives the same file.
        _ = try ok(["eval", "heldout", "--checkpoint", "\(dir)/run", "--data", "\(dir)/prepared", "--studies", "10", "--out", "\(dir)/heldout.json"])
        _ = try ok(["eval", "heldout", "--checkpoint", "\(dir)/run", "--data", "\(dir)/prepared", "--studies", "12",
                    "--manifest", "\(dir)/heldout.manifest.json", "--out", "\(dir)/heldout-rerun.json"])
        #expect(FileManager.default.contents(atPath: "\(dir)/heldout.json") == FileManager.default.contents(atPath: "\(dir)/heldout-rerun.json"))
        #expect(FileManager.default.contents(atPath: "\(dir)/heldout.manifest.json") == FileManager.default.contents(atPath: "\(dir)/heldout-rerun.manifest.json"))
        let zeroManifest = "\(dir)/run/eval/zeroshot-chexpert.manifest.json"
        let otherPrompts = try run(convirtPath(), ["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run",
                                                   "--prompts", "\(dir)/prompts.json", "--manifest", zeroManifest], environment: Self.environment)
        #expect(otherPrompts.status == 1 && otherPrompts.output.contains("prompts: sha256"), "\(otherPrompts.output)")
        #expect(FileManager.default.fileExists(atPath: "\(dir)/eval/retrieval.manifest.json"))
        let zeroRerun = try ok(["eval", "zeroshot", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run",
                                "--manifest", zeroManifest, "--out", "\(dir)/zeroshot-rerun.json", "--quiet"])
        #expect(FileManager.default.contents(atPath: "\(dir)/zeroshot-rerun.json") == FileManager.default.contents(atPath: "\(dir)/run/eval/zeroshot-chexpert.json"),
                "\(zeroRerun)")
        let report = try ok(["report", "\(dir)/run"])
        #expect(report.contains("Linear classification, and zero-shot beside it"), "\(report)")
        let reportHTML = try String(contentsOfFile: "\(dir)/run/report.html", encoding: .utf8)
        #expect(reportHTML.contains("step 20 · test ") && reportHTML.contains("seeds 3-4") && !reportHTML.contains("skipped eval/pinned.manifest.json"))
        // The evaluations' results are in the run's TensorBoard files, with its training scalars.
        let board = try run("/usr/bin/env", ["python3", "\(repository)/tools/check_tensorboard.py", "\(dir)/run", "--expect-tag", "eval/linear/chexpert/convirt",
                                            "--expect-tag", "eval/zeroshot/chexpert/convirt/all", "--expect-tag", "eval/retrieval/text_to_image/precision@10"],
                            timeout: 300)
        #expect(board.status == 0 && board.output.contains("all equal"), "\(board.output)")

        // Embeddings of images and sentences.
        let images = try FileManager.default.subpathsOfDirectory(atPath: "\(dir)/chexpert").filter { $0.hasSuffix(".jpg") }.prefix(5)
            .map { "\(dir)/chexpert/\($0)" }
        try images.joined(separator: "\n").write(toFile: "\(dir)/images.txt", atomically: true, encoding: .utf8)
        try "There is a large left pleural effusion.\nNo acute cardiopulmonary process.\n".write(toFile: "\(dir)/texts.txt", atomically: true, encoding: .utf8)
        _ = try ok(["embed", "--checkpoint", "\(dir)/run", "--images", "\(dir)/images.txt", "--out", "\(dir)/images.safetensors"])
        _ = try ok(["embed", "--checkpoint", "\(dir)/run", "--texts", "\(dir)/texts.txt", "--out", "\(dir)/texts.safetensors"])
        let imageFile = try SafeTensorsFile(path: "\(dir)/images.safetensors")
        #expect(imageFile.info("embeddings")?.shape == [5, 64] || imageFile.info("embeddings")?.shape.first == 5)
        #expect(try SafeTensorsFile(path: "\(dir)/texts.safetensors").info("embeddings")?.shape.first == 2)
        // The same embeddings in bf16: within bf16 rounding of fp32's (unit vectors, so absolute), recorded as such.
        for kind in ["images", "texts"] {
            _ = try ok(["embed", "--checkpoint", "\(dir)/run", "--\(kind)", "\(dir)/\(kind).txt", "--out", "\(dir)/\(kind)-bf16.safetensors",
                        "--precision", "bf16"])
            let half = try SafeTensorsFile(path: "\(dir)/\(kind)-bf16.safetensors"), full = try SafeTensorsFile(path: "\(dir)/\(kind).safetensors")
            #expect(half.metadata["precision"] == "bf16" && full.metadata["precision"] == "fp32")
            let a = try half.floats("embeddings").scalars, b = try full.floats("embeddings").scalars
            let difference = zip(a, b).map { abs($0 - $1) }.max() ?? 1
            #expect(difference > 1e-5 && difference < 5e-2, "\(kind): bf16 embeddings \(difference) from fp32")
        }
        let linear16 = try ok(["eval", "linear", "--dataset", "chexpert", "--root", "\(dir)/chexpert", "--checkpoint", "\(dir)/run", "--runs", "1",
                               "--max-epochs", "3", "--precision", "bf16", "--cache", "\(dir)/cache-bf16"])
        #expect(linear16.contains("precision bf16"), "\(linear16)")

        // Bad input: a CheXpert directory without its CSVs is a clear error naming the file, on every rank.
        try FileManager.default.createDirectory(atPath: "\(dir)/empty", withIntermediateDirectories: true)
        let bad = try run(mpirun, ["--oversubscribe", "-np", "2", convirtPath(), "eval", "linear", "--dataset", "chexpert", "--root", "\(dir)/empty",
                                   "--checkpoint", "\(dir)/run"], environment: Self.environment, timeout: 60)
        #expect(bad.status != 0 && bad.output.contains("train.csv"), "\(bad.output)")
    }
}
