// The data pipeline end to end on synthetic MIMIC-CXR: determinism, prepare (with resume and broken
// input), sampling invariance across world sizes, augmentation and resizing.

import ConvirtCore
import ConvirtData
import ConvirtIO
import ConvirtText
import Foundation
import Testing

private func temporaryDirectory(_ name: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

private func synth(_ dir: String, studies: Int = 24, size: Int = 128, seed: UInt64 = 3) throws {
    var o = SynthMIMICOptions()
    o.studies = studies; o.imageSize = size; o.seed = seed
    try SynthMIMIC.write(to: dir, options: o)
}

private func allFiles(_ dir: String) -> [String] {
    (FileManager.default.enumerator(atPath: dir)?.allObjects as? [String] ?? []).filter { !$0.hasSuffix("/") }.sorted()
}

@Suite("Synthetic MIMIC-CXR and prepare", .serialized)
struct PrepareTests {
    @Test("synth mimic is deterministic for a seed and writes the released layout")
    func synthDeterministic() throws {
        let a = try temporaryDirectory("synth-a"), b = try temporaryDirectory("synth-b")
        defer { try? FileManager.default.removeItem(atPath: a); try? FileManager.default.removeItem(atPath: b) }
        try synth(a); try synth(b)
        let files = allFiles(a)
        #expect(files == allFiles(b))
        #expect(files.contains("mimic-cxr-2.0.0-metadata.csv.gz") && files.contains("mimic-cxr-2.0.0-split.csv.gz")
                && files.contains("mimic-cxr-2.0.0-chexpert.csv.gz") && files.contains("vocab.txt"))
        #expect(files.contains { $0.hasPrefix("files/p10/p1000000") && $0.hasSuffix(".jpg") })
        #expect(files.contains { $0.range(of: #"^files/p10/p\d{8}/s\d{8}\.txt$"#, options: .regularExpression) != nil })
        for f in files { #expect(FileManager.default.contents(atPath: "\(a)/\(f)") == FileManager.default.contents(atPath: "\(b)/\(f)"), "\(f)") }
        let chexpert = try CSVTable(path: "\(a)/mimic-cxr-2.0.0-chexpert.csv.gz", required: ["subject_id", "study_id"] + CheXpertLabels.names)
        #expect(chexpert.rows.count == 24)
        let vocab = try Vocabulary(path: "\(a)/vocab.txt")
        #expect(vocab["effusion"] != nil && vocab["pneumothorax"] != nil && vocab["[CLS]"] != nil)
    }

    @Test("reports match the findings: laterality, severity, negation")
    func reportsDescribeImages() {
        var sawLeftEffusion = false, sawNegation = false
        for i in 0..<200 {
            let study = ReportWriter.study(seed: 1, index: i)
            let text = study.report.lowercased()
            if let e = study.findings.effusion {
                #expect(text.contains("\(e.side.rawValue)") && (text.contains("effusion")), "\(study.report)")
                #expect(study.labels["Pleural Effusion"] == 1.0 || study.labels["Pleural Effusion"] == -1.0)
                if e.side == .left { sawLeftEffusion = true }
            } else if study.labels["Pleural Effusion"] == 0.0 {
                #expect(text.contains("no pleural effusion") || text.contains("no effusion") || text.contains("angles are sharp"))
                sawNegation = true
            }
            if study.findings.isNormal { #expect(study.labels["No Finding"] == 1.0) }
            #expect(!ReportSections.sentences(study.report).isEmpty)
        }
        #expect(sawLeftEffusion && sawNegation)
    }

    @Test("prepare: shards, index, manifest; a rerun reuses finished shards; broken input is skipped and counted")
    func prepareWithBrokenInput() throws {
        let root = try temporaryDirectory("mimic"), out = try temporaryDirectory("prepared")
        defer { try? FileManager.default.removeItem(atPath: root); try? FileManager.default.removeItem(atPath: out) }
        try synth(root, studies: 30)
        let jpegs = allFiles(root).filter { $0.hasSuffix(".jpg") }
        let reports = allFiles(root).filter { $0.hasSuffix(".txt") && $0.hasPrefix("files/") }
        // Frontal images to break: find them through the metadata.
        let metadata = try CSVTable(path: "\(root)/mimic-cxr-2.0.0-metadata.csv.gz", required: ["dicom_id", "ViewPosition"])
        let frontal = Set(metadata.rows.filter { metadata.value($0, "ViewPosition") == "PA" }.map { metadata.value($0, "dicom_id") })
        let frontalFiles = jpegs.filter { frontal.contains(String($0.split(separator: "/").last!.dropLast(4))) }
        let truncated = "\(root)/\(frontalFiles[0])"
        let data = try Data(contentsOf: URL(fileURLWithPath: truncated))
        try data.prefix(data.count / 3).write(to: URL(fileURLWithPath: truncated))
        try FileManager.default.removeItem(atPath: "\(root)/\(frontalFiles[1])")
        try Data().write(to: URL(fileURLWithPath: "\(root)/\(reports[5])"))
        try Data("CLINICAL HISTORY: cough.\nTECHNIQUE: PA view.\n".utf8).write(to: URL(fileURLWithPath: "\(root)/\(reports[6])"))
        // A malformed row in the gzipped metadata CSV.
        var text = try Gzip.readText("\(root)/mimic-cxr-2.0.0-metadata.csv.gz")
        text += "only,three,fields\n"
        try Gzip.compress(Data(text.utf8)).write(to: URL(fileURLWithPath: "\(root)/mimic-cxr-2.0.0-metadata.csv.gz"))

        var options = PrepareOptions(root: root, out: out)
        options.imagesPerShard = 8
        let first = try MIMICPrepare.run(options)
        #expect(first.dropped["corrupt or truncated image"]?.count == 1)
        #expect(first.dropped["corrupt or truncated image"]?.examples.first?.contains(truncated) == true)
        #expect(first.dropped["missing image"]?.count == 1)
        #expect(first.dropped["empty report"]?.count == 1)
        #expect(first.dropped["no findings/impression sentences"]?.count == 1)
        #expect(first.dropped["malformed CSV row"]?.count == 1)
        #expect(first.dropped["non-frontal view (image)"] != nil)
        #expect(first.reusedShards == 0)

        let dataset = try PreparedDataset(path: out)
        #expect(dataset.studies.count == first.studies && dataset.images.count == first.images)
        #expect(dataset.verify().isEmpty)
        #expect(dataset.images.allSatisfy { max($0.width, $0.height) == 256 || max($0.width, $0.height) <= 256 })
        #expect(dataset.studies.allSatisfy { !$0.sentences.isEmpty && !$0.images.isEmpty })
        let img = dataset.image(0)
        #expect(img.width == 128 && img.height > 128)  // the synthetic images are smaller than 256: kept, never enlarged

        // Interrupted run: one shard and the index gone; the rerun rebuilds only that shard.
        try FileManager.default.removeItem(atPath: "\(out)/images-00001.bin")
        try FileManager.default.removeItem(atPath: "\(out)/manifest.json")
        let studiesBefore = try Data(contentsOf: URL(fileURLWithPath: "\(out)/studies.json"))
        let second = try MIMICPrepare.run(options)
        let shardCount = dataset.manifest.shards.count
        #expect(second.reusedShards == shardCount - 1)
        #expect(try Data(contentsOf: URL(fileURLWithPath: "\(out)/studies.json")) == studiesBefore)
        #expect(try PreparedDataset(path: out).verify().isEmpty)

        // A flipped byte in a shard is found by verify.
        let shardPath = "\(out)/images-00000.bin"
        var shard = try Data(contentsOf: URL(fileURLWithPath: shardPath))
        shard[10] ^= 0xFF
        try shard.write(to: URL(fileURLWithPath: shardPath))
        #expect(try PreparedDataset(path: out).verify().first?.contains("images-00000.bin: checksum") == true)
    }

    @Test("prepare: an unclosed quote is an error naming the file and line; bogus splits, labels and non-UTF-8 reports are counted skips")
    func prepareOutOfDomain() throws {
        let root = try temporaryDirectory("mimic-domain"), out = try temporaryDirectory("prepared-domain")
        defer { try? FileManager.default.removeItem(atPath: root); try? FileManager.default.removeItem(atPath: out) }
        try synth(root, studies: 12, size: 64)
        let splitPath = "\(root)/mimic-cxr-2.0.0-split.csv.gz", labelsPath = "\(root)/mimic-cxr-2.0.0-chexpert.csv.gz"
        let splitText = try Gzip.readText(splitPath), labelsText = try Gzip.readText(labelsPath)
        // One " at the start of line 2: the rest of the file would be one field.
        var lines = splitText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines[1] = "\"" + lines[1]
        try Gzip.compress(Data(lines.joined(separator: "\n").utf8)).write(to: URL(fileURLWithPath: splitPath))
        do {
            _ = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
            Issue.record("prepare accepted a split CSV with an unclosed quote")
        } catch {
            #expect("\(error)".contains("mimic-cxr-2.0.0-split.csv.gz: line 2: a quoted field is never closed"), "\(error)")
        }
        // A bogus split value, a label 7.5 and a report in Latin-1: skipped and counted by reason.
        lines = splitText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines[1] = lines[1].replacingOccurrences(of: ",train", with: ",bogus").replacingOccurrences(of: ",validate", with: ",bogus")
            .replacingOccurrences(of: ",test", with: ",bogus")
        try Gzip.compress(Data(lines.joined(separator: "\n").utf8)).write(to: URL(fileURLWithPath: splitPath))
        var labelLines = labelsText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var fields = labelLines[1].split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        fields[fields.count - 1] = "7.5"
        labelLines[1] = fields.joined(separator: ",")
        try Gzip.compress(Data(labelLines.joined(separator: "\n").utf8)).write(to: URL(fileURLWithPath: labelsPath))
        let report = allFiles(root).last { $0.hasSuffix(".txt") && $0.hasPrefix("files/") }!  // not the study whose split was made bogus
        try (Data("FINDINGS: The heart is normal in size. Caf".utf8) + Data([0xE9]) + Data(" in the lungs.\n".utf8))
            .write(to: URL(fileURLWithPath: "\(root)/\(report)"))
        let summary = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
        #expect(summary.dropped["unknown split value"]?.count == 1 && summary.dropped["unknown split value"]?.examples.first?.contains("line 2") == true,
                "\(summary.dropped)")
        #expect(summary.dropped["CheXpert label out of domain"]?.count == 1, "\(summary.dropped)")
        #expect(summary.dropped["report is not valid UTF-8"]?.count == 1, "\(summary.dropped)")
        let studies = try String(contentsOf: URL(fileURLWithPath: "\(out)/studies.json"), encoding: .utf8)
        #expect(!studies.contains("7.5") && !studies.contains("bogus"))
        // A size below the network's stride is refused.
        var tiny = PrepareOptions(root: root, out: out)
        tiny.imageSize = 0
        #expect(throws: ConvirtError.self) { _ = try MIMICPrepare.run(tiny) }
    }

    @Test("prepare: a repeated row is dropped and counted; a renamed or removed CheXpert column is an error naming it; studies without labels are counted")
    func prepareDuplicatesAndLabels() throws {
        let root = try temporaryDirectory("mimic-dup"), out = try temporaryDirectory("prepared-dup")
        defer { try? FileManager.default.removeItem(atPath: root); try? FileManager.default.removeItem(atPath: out) }
        try synth(root, studies: 12, size: 64)
        let clean = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
        #expect(clean.dropped["duplicate CSV row"] == nil && clean.kept.isEmpty, "\(clean.dropped) \(clean.kept)")
        func edit(_ name: String, _ change: (inout [String]) -> Void) throws -> String {
            let path = "\(root)/mimic-cxr-2.0.0-\(name).csv.gz", original = try Gzip.readText(path)
            var lines = original.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            change(&lines)
            try Gzip.compress(Data(lines.joined(separator: "\n").utf8)).write(to: URL(fileURLWithPath: path))
            return original
        }
        func restore(_ name: String, _ text: String) throws {
            try Gzip.compress(Data(text.utf8)).write(to: URL(fileURLWithPath: "\(root)/mimic-cxr-2.0.0-\(name).csv.gz"))
        }
        // A metadata row twice: the image once, the repeat counted.
        let metadata = try edit("metadata") { $0.insert($0[3], at: 3) }
        let repeated = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
        #expect(repeated.images == clean.images && repeated.dropped["duplicate CSV row"]?.count == 1, "\(repeated.dropped)")
        #expect(repeated.dropped["duplicate CSV row"]?.examples.first?.contains("metadata.csv.gz line 5: dicom_id") == true, "\(String(describing: repeated.dropped["duplicate CSV row"]))")
        try restore("metadata", metadata)
        // A CheXpert label column renamed, or removed from the header: an error naming the column.
        let labels = try edit("chexpert") { $0[0] = $0[0].replacingOccurrences(of: "Pneumonia", with: "Pneumonitis") }
        #expect { _ = try MIMICPrepare.run(PrepareOptions(root: root, out: out)) } throws: { "\($0)".contains("missing required column(s) Pneumonia") }
        try restore("chexpert", labels)
        _ = try edit("chexpert") { $0[0] = $0[0].split(separator: ",").filter { $0 != "Edema" }.joined(separator: ",") }
        #expect { _ = try MIMICPrepare.run(PrepareOptions(root: root, out: out)) } throws: { "\($0)".contains("missing required column(s) Edema") }
        try restore("chexpert", labels)
        // A header with a column more than its rows: every row malformed, an error (not every study unlabeled).
        _ = try edit("chexpert") { $0[0] += ",Extra" }
        #expect { _ = try MIMICPrepare.run(PrepareOptions(root: root, out: out)) } throws: { "\($0)".contains("chexpert.csv.gz: no usable row") }
        try restore("chexpert", labels)
        // A study without a CheXpert row, and a repeated one: kept with unknown labels and counted; the repeat dropped.
        _ = try edit("chexpert") { lines in lines.append(lines[2]); lines.remove(at: 1) }
        let unlabeled = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
        #expect(unlabeled.studies == clean.studies && unlabeled.kept[MIMICPrepare.unlabeled]?.count == 1, "\(unlabeled.kept)")
        #expect(unlabeled.dropped["duplicate CSV row"]?.count == 1, "\(unlabeled.dropped)")
        #expect(try PreparedDataset(path: out).manifest.kept?[MIMICPrepare.unlabeled]?.count == 1)
    }

    @Test("a CSV without its required columns stops prepare with the file and the columns")
    func missingColumns() throws {
        let root = try temporaryDirectory("mimic-bad"), out = try temporaryDirectory("prepared-bad")
        defer { try? FileManager.default.removeItem(atPath: root); try? FileManager.default.removeItem(atPath: out) }
        try synth(root, studies: 4)
        try Gzip.compress(Data("dicom_id,study_id,subject_id\na,1,2\n".utf8)).write(to: URL(fileURLWithPath: "\(root)/mimic-cxr-2.0.0-split.csv.gz"))
        do {
            _ = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
            Issue.record("prepare accepted a split CSV without its split column")
        } catch {
            #expect("\(error)".contains("mimic-cxr-2.0.0-split.csv.gz: missing required column(s) split"), "\(error)")
        }
        do {
            _ = try PreparedDataset(path: out)
            Issue.record("opened a dataset that was never prepared")
        } catch {
            #expect("\(error)".contains("no manifest.json"))
        }
    }
}

@Suite("Sampling, augmentation and resizing", .serialized)
struct SamplingTests {
    @Test("global batches are identical for every world size; ranks take consecutive rows")
    func worldSizeInvariance() throws {
        let root = try temporaryDirectory("mimic-s"), out = try temporaryDirectory("prepared-s")
        defer { try? FileManager.default.removeItem(atPath: root); try? FileManager.default.removeItem(atPath: out) }
        try synth(root, studies: 40)
        _ = try MIMICPrepare.run(PrepareOptions(root: root, out: out))
        let dataset = try PreparedDataset(path: out)
        let samples = dataset.samples(split: "train")
        let tokenizer = try WordPieceTokenizer(vocabularyPath: "\(root)/vocab.txt", lowercase: true)
        let recipe = SampleRecipe(augment: AugmentConfig(outputSize: 64))
        var reference: TrainingBatch?
        for world in [1, 2, 4] {
            var images: [Float] = [], sentences: [String] = [], indices: [UInt64] = []
            for rank in 0..<world {
                let sampler = try GlobalBatchSampler(sampleCount: samples.count, globalBatch: 8, worldSize: world, rank: rank, seed: 5)
                let batch = Loader.build(dataset: dataset, samples: samples, sampler: sampler, tokenizer: tokenizer, recipe: recipe,
                                         epoch: 1, step: 2, permutation: sampler.permutation(epoch: 1))
                #expect(batch.globalRows == Array((rank * 8 / world)..<((rank + 1) * 8 / world)))
                images += batch.images; sentences += batch.sentences; indices += batch.sampleIndices
            }
            if let reference {
                #expect(images == reference.images && sentences == reference.sentences && indices == reference.sampleIndices, "world \(world)")
            } else {
                let sampler = try GlobalBatchSampler(sampleCount: samples.count, globalBatch: 8, worldSize: 1, rank: 0, seed: 5)
                reference = Loader.build(dataset: dataset, samples: samples, sampler: sampler, tokenizer: tokenizer, recipe: recipe,
                                         epoch: 1, step: 2, permutation: sampler.permutation(epoch: 1))
                #expect(reference!.images == images)
            }
        }
        // Another epoch: another order, other augmentations.
        let sampler = try GlobalBatchSampler(sampleCount: samples.count, globalBatch: 8, worldSize: 1, rank: 0, seed: 5)
        #expect(sampler.permutation(epoch: 0) != sampler.permutation(epoch: 1))
        #expect(sampler.batchesPerEpoch == samples.count / 8)
        #expect(throws: ConvirtError.self) { try GlobalBatchSampler(sampleCount: 40, globalBatch: 6, worldSize: 4, rank: 0, seed: 1) }
        // The prefetching loader yields the same batches in order.
        let loader = Loader(dataset: dataset, samples: samples, sampler: sampler, tokenizer: tokenizer, recipe: recipe, startEpoch: 1, startStep: 2)
        let first = loader.next(), second = loader.next()
        loader.stop()
        #expect(first.images == reference!.images && first.step == 2 && second.step == 3)
        #expect(first.ids.count == first.size * first.tokens && first.mask.count == first.ids.count)
        #expect(first.ids[0] == tokenizer.clsID)
    }

    @Test("augmentation draws are keyed and within the configured ranges; no augmentation is a plain resize")
    func augmentation() {
        let config = AugmentConfig(outputSize: 224)
        var flips = 0
        for i in 0..<400 {
            let p = AugmentParameters.draw(config, width: 256, height: 300, stream: RandomStream(seed: 1, UInt64(i)))
            #expect(p == AugmentParameters.draw(config, width: 256, height: 300, stream: RandomStream(seed: 1, UInt64(i))))
            let area = p.crop.width * p.crop.height / (256 * 300)
            #expect(area >= 0.59 && area <= 1.0 && p.crop.x + p.crop.width <= 256 && p.crop.y + p.crop.height <= 300)
            #expect(abs(p.angle) <= 20 && abs(p.translateX) <= 22.4 && p.scale >= 0.95 && p.scale <= 1.05)
            #expect(p.brightness >= 0.6 && p.brightness <= 1.4 && p.contrast >= 0.6 && p.contrast <= 1.4)
            #expect(p.blurSigma >= 0.1 && p.blurSigma <= 3.0)
            if p.flip { flips += 1 }
        }
        #expect(flips > 160 && flips < 240)
        // No augmentation: a constant image stays constant after normalisation.
        let pixels = [UInt8](repeating: 128, count: 50 * 40)
        var out = [Float](repeating: 0, count: 3 * 32 * 32), scratch = [Float](repeating: 0, count: 2 * 32 * 32)
        pixels.withUnsafeBufferPointer { px in
            let p = AugmentParameters.draw(.none(outputSize: 32), width: 50, height: 40, stream: RandomStream(seed: 1))
            Augment.apply(GrayBytes(width: 50, height: 40, pixels: px), p, outputSize: 32, output: &out, scratch: &scratch)
        }
        let expected = (Float(128) / 255 - Augment.imagenetMean[1]) / Augment.imagenetStd[1]
        #expect(out[(32 * 32) + 16 * 32 + 16].distance(to: expected).magnitude < 1e-4)
    }

    @Test("Affine warp: the vectorised kernel gives the bits of the pixel-at-a-time reference, for any crop, flip, rotation and scale")
    func affineWarp() {
        var config = AugmentConfig.none(outputSize: 32)
        config.cropScale = 0.6...1; config.flipProbability = 0.5; config.rotationDegrees = 20; config.translate = 0.1; config.scale = 0.95...1.05
        var wild = config
        wild.rotationDegrees = 180; wild.translate = 0.6; wild.scale = 0.3...3; wild.cropScale = 0.05...1
        var checked = 0, zeros = 0, total = 0
        for (width, height) in [(1, 1), (2, 3), (7, 5), (50, 40), (96, 96), (300, 257)] {
            let image = (0..<(width * height)).map { UInt8(truncatingIfNeeded: ($0 &* 2654435761) >> 7) }
            for s in [1, 5, 32, 65, 96, 224] {
                for (k, c) in [config, wild].enumerated() {
                    var c = c
                    c.outputSize = s
                    for trial in 0..<4 {
                        let p = AugmentParameters.draw(c, width: width, height: height, stream: RandomStream(seed: UInt64(trial), UInt64(k), UInt64(s)))
                        var fast = [Float](repeating: .nan, count: s * s), reference = fast
                        image.withUnsafeBufferPointer { px in
                            let view = GrayBytes(width: width, height: height, pixels: px)
                            Augment.affineWarp(view, p, outputSize: s, gray: &fast)
                            Augment.affineWarpReference(view, p, outputSize: s, gray: &reference)
                        }
                        let first = fast.indices.first { fast[$0].bitPattern != reference[$0].bitPattern }
                        #expect(first == nil, "\(width)x\(height) -> \(s), \(p): pixel \(first ?? 0) is \(fast[first ?? 0]), the reference \(reference[first ?? 0])")
                        checked += 1
                        zeros += fast.filter { $0 == 0 }.count
                        total += fast.count
                    }
                }
            }
        }
        // The wild parameters take many output pixels outside the image.
        #expect(checked == 288 && zeros > total / 20 && zeros < total * 9 / 10, "\(zeros) of \(total) pixels are 0")
    }

    @Test("Gaussian blur: eight pixels at a time, bitwise the one-tap-at-a-time reference; a constant image stays constant")
    func gaussianBlur() {
        var generator = SystemRandomNumberGenerator()
        for s in [1, 2, 5, 8, 13, 17, 24, 31, 96, 97] {
            for sigma: Float in [0.1, 0.34, 0.5, 1, 1.7, 2.2, 3, 12] {
                let image = (0..<(s * s)).map { _ in Float.random(in: 0...1, using: &generator) }
                var fast = image, reference = image, temp = [Float](repeating: .nan, count: s * s)
                Augment.gaussianBlur(&fast, temp: &temp, size: s, sigma: sigma)
                Augment.gaussianBlurReference(&reference, temp: &temp, size: s, sigma: sigma)
                let first = fast.indices.first { fast[$0].bitPattern != reference[$0].bitPattern }
                #expect(first == nil, "size \(s), sigma \(sigma): pixel \(first ?? 0) is \(fast[first ?? 0]), the reference \(reference[first ?? 0])")
            }
        }
        // The kernel sums to 1 within rounding: a constant image stays constant, borders included.
        var flat = [Float](repeating: 0.25, count: 40 * 40), temp = flat
        Augment.gaussianBlur(&flat, temp: &temp, size: 40, sigma: 2.5)
        #expect(flat.allSatisfy { abs($0 - 0.25) < 1e-6 })
    }

    @Test("antialiased resize: constants stay constant, stripes average out, longer side as asked")
    func resize() {
        let constant = GrayImage(width: 300, height: 200, pixels: Array(repeating: 0.25, count: 60_000))
        let small = constant.resized(longerSide: 64)
        #expect(small.width == 64 && small.height == 43)
        #expect(small.pixels.allSatisfy { abs($0 - 0.25) < 1e-5 })
        let stripes = GrayImage(width: 256, height: 4, pixels: (0..<1024).map { Float(($0 % 256) % 2) })
        let halved = stripes.resized(width: 64, height: 4)
        #expect(halved.pixels.allSatisfy { abs($0 - 0.5) < 0.05 }, "aliasing: \(halved.pixels.prefix(8))")
        #expect(GrayImage(width: 3, height: 2, pixels: [1, 1, 1, 1, 1, 1]).paddedToSquare().pixels == [1, 1, 1, 1, 1, 1, 0, 0, 0])
        #expect(GrayImage(width: 1, height: 3, pixels: [1, 1, 1]).paddedToSquare().pixels == [0, 1, 0, 0, 1, 0, 0, 1, 0])
    }
}
