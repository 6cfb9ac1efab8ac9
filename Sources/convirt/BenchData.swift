// `convirt bench data`: JPEG decode (full size + resize vs DCT-domain scaling) and loader throughput.

import ArgumentParser
import ConvirtCore
import ConvirtData
import ConvirtIO
import ConvirtText
import Foundation

struct BenchData: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "data", abstract: "Decode and loader throughput (images/s, samples/s per core).")

    @Option(help: "A prepared dataset for the loader benchmark (default: synthesise a small one in a temporary directory).")
    var data: String?

    @Option(parsing: .unconditional, help: "Samples to time through the loader.") var samples = 256

    func run() throws {
        // A 2500 x 3000 radiograph-like JPEG, as MIMIC-CXR-JPG's originals.
        let (w, h) = (2500, 3000)
        var findings = Findings()
        findings.effusion = (.left, .moderate)
        let pixels = ChestRenderer.render(width: w, height: h, findings: findings, lateral: false, stream: RandomStream(seed: 1))
        let jpeg = try JPEG.encode(GrayImage(width: w, height: h, pixels: pixels), quality: 95)
        print(String(format: "JPEG %dx%d, %.1f MB", w, h, Double(jpeg.count) / 1e6))
        let full = measure(repeats: 3, minimumSeconds: 0.5) {
            _ = try? JPEG.decodeGray(jpeg).resized(longerSide: 256)
        }
        let scaled = measure(repeats: 3, minimumSeconds: 0.5) {
            _ = try? JPEG.decodeGray(jpeg, minWidth: 213, minHeight: 256).resized(longerSide: 256)
        }
        print(String(format: "full decode + resize to 256: %.1f images/s; DCT-scaled decode (1/8) + resize: %.1f images/s (%.1fx)",
                     1 / full, 1 / scaled, full / scaled))

        let fm = FileManager.default
        var path = data
        var temporary: String?
        if path == nil {
            let dir = fm.temporaryDirectory.appendingPathComponent("convirt-bench-data-\(getpid())").path
            temporary = dir
            var options = SynthMIMICOptions()
            options.studies = 300
            try SynthMIMIC.write(to: "\(dir)/mimic", options: options)
            _ = try MIMICPrepare.run(PrepareOptions(root: "\(dir)/mimic", out: "\(dir)/prepared"))
            path = "\(dir)/prepared"
        }
        defer { if let temporary { try? fm.removeItem(atPath: temporary) } }
        let dataset = try PreparedDataset(path: path!)
        let vocab = (temporary.map { "\($0)/mimic/vocab.txt" }) ?? "\(path!)/vocab.txt"
        let tokenizer = try WordPieceTokenizer(vocabularyPath: vocab, lowercase: true)
        let train = dataset.samples(split: "train")
        let sampler = try GlobalBatchSampler(sampleCount: train.count, globalBatch: 32, worldSize: 1, rank: 0, seed: 1)
        let recipe = SampleRecipe(augment: AugmentConfig(outputSize: 224))
        let start = DispatchTime.now().uptimeNanoseconds
        var built = 0, step = 0
        let permutation = sampler.permutation(epoch: 0)
        while built < samples {
            let batch = Loader.build(dataset: dataset, samples: train, sampler: sampler, tokenizer: tokenizer, recipe: recipe, epoch: 0,
                                     step: step % sampler.batchesPerEpoch, permutation: permutation, workers: 1)
            built += batch.size
            step += 1
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        print(String(format: "loader (view + sentence draw, crop/flip/affine/jitter/blur/normalise at 224, WordPiece): %.1f samples/s on one core",
                     Double(built) / seconds))
        print("for comparison, the paper model's training step in pairs/s: `convirt bench step`")
    }
}
