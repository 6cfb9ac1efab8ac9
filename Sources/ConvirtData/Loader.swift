// Sampling and loading (DESIGN.md invariant 1): the sample order of epoch e is a permutation seeded by
// (seed, e); global batch k is rows [kN, (k+1)N) of it; rank r takes rows [r b, (r+1) b). Every random
// draw of a sample (view, sentence, crop, flip, affine, jitter, blur) is keyed by (seed, epoch, dataset
// index, purpose), so a sample is the same whichever rank loads it and whatever the world size.

import ConvirtCore
import ConvirtText
import Foundation

public struct GlobalBatchSampler: Sendable {
    public let sampleCount: Int
    public let globalBatch: Int
    public let worldSize: Int
    public let rank: Int
    public let seed: UInt64
    /// Micro-batches per rank and step (exact accumulation); 1 without.
    public let microBatches: Int

    public init(sampleCount: Int, globalBatch: Int, worldSize: Int, rank: Int, seed: UInt64, microBatches: Int = 1) throws {
        try require(worldSize >= 1 && rank >= 0 && rank < worldSize, "sampler", "rank \(rank) is outside a world of \(worldSize)")
        try require(microBatches >= 1 && globalBatch >= 1 && globalBatch % (worldSize * microBatches) == 0, "sampler",
                    "the global batch \(globalBatch) does not divide by the \(worldSize) ranks" + (microBatches > 1 ? " x \(microBatches) micro-batches" : ""))
        try require(sampleCount >= globalBatch, "sampler", "\(sampleCount) training samples are fewer than one global batch of \(globalBatch)")
        self.sampleCount = sampleCount; self.globalBatch = globalBatch; self.worldSize = worldSize; self.rank = rank; self.seed = seed
        self.microBatches = microBatches
    }

    public var localBatch: Int { globalBatch / worldSize }
    /// Full global batches per epoch; the last incomplete one is dropped.
    public var batchesPerEpoch: Int { sampleCount / globalBatch }

    public func permutation(epoch: Int) -> [Int] {
        RandomStream(seed: seed, .epochPermutation, UInt64(epoch)).permutation(sampleCount)
    }

    /// (row in the global batch, position in the sample list) of this rank's rows of global batch `batch`.
    /// Without micro-batches, rank r holds rows [r B/W, (r+1) B/W). With K, the global batch is K
    /// micro-batches of B/K consecutive rows and rank r holds its b = B/(W K) rows of each: micro-batch j
    /// is rows [j B/K, (j+1) B/K) on every world size (what SyncBN normalises over), and each rank's
    /// piece of it, rows [j B/K + r b, j B/K + (r+1) b), is the same b rows for every (W, K) with the
    /// same W K (what per-rank BatchNorm normalises over).
    public func localRows(batch: Int, permutation: [Int]) -> [(globalRow: Int, sample: Int)] {
        let micro = globalBatch / microBatches, b = localBatch / microBatches
        return (0..<localBatch).map { i in
            let row = (i / b) * micro + rank * b + i % b
            return (row, permutation[batch * globalBatch + row])
        }
    }
}

/// One rank's share of a global batch, ready for the model.
public struct TrainingBatch: Sendable {
    public var epoch: Int
    public var step: Int
    public var size: Int
    public var imageSize: Int
    /// [size, 3, S, S], ImageNet-normalised.
    public var images: [Float]
    /// [size, tokens] ids and attention mask.
    public var ids: [Int32]
    public var mask: [Int32]
    public var tokens: Int
    /// Dataset index of each row (the key of its random draws) and its row in the global batch.
    public var sampleIndices: [UInt64]
    public var globalRows: [Int]
    public var sentences: [String]

    /// The batch with every row padded to `count` tokens (at least `tokens`): the pad id, mask 0. A
    /// rank pads to the longest row of the global batch, so that a sample's rows are the same on every
    /// world size (`GradientPieces`: a piece of samples is then a product of one shape).
    public func padded(toTokens count: Int, padID: Int32) -> TrainingBatch {
        precondition(count >= tokens, "padding \(tokens) tokens to \(count)")
        guard count > tokens else { return self }
        var batch = self
        batch.ids = [Int32](repeating: padID, count: size * count)
        batch.mask = [Int32](repeating: 0, count: size * count)
        for i in 0..<size {
            for j in 0..<tokens {
                batch.ids[i * count + j] = ids[i * tokens + j]
                batch.mask[i * count + j] = mask[i * tokens + j]
            }
        }
        batch.tokens = count
        return batch
    }
}

public struct SampleRecipe: Sendable {
    public var augment: AugmentConfig
    public var maxTokens = 128
    public init(augment: AugmentConfig, maxTokens: Int = 128) { self.augment = augment; self.maxTokens = maxTokens }
}

public enum SampleBuilder {
    /// Builds sample `datasetIndex` (a study) of `epoch` into `image` ([3, S, S]); returns its sentence.
    public static func build(_ dataset: PreparedDataset, study studyIndex: Int, epoch: Int, seed: UInt64, recipe: SampleRecipe,
                             image: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Float>) -> String {
        let study = dataset.studies[studyIndex]
        let stream = RandomStream(seed: seed, .sampleDraws, UInt64(epoch), UInt64(studyIndex))
        let view = study.images[stream.child(DrawPurpose.view.rawValue).integer(below: study.images.count, at: 0)]
        var sentence = study.sentences[stream.child(DrawPurpose.sentence.rawValue).integer(below: study.sentences.count, at: 0)]
        let pixels = dataset.image(view)
        let p = AugmentParameters.draw(recipe.augment, width: pixels.width, height: pixels.height, stream: stream)
        Augment.apply(pixels, p, outputSize: recipe.augment.outputSize, output: image, scratch: scratch)
        if p.flip && recipe.augment.swapLateralityOnFlip { sentence = Augment.swapLaterality(sentence) }
        return sentence
    }
}

/// A prefetching loader: a background thread builds this rank's batches in order into a bounded queue;
/// `next()` returns them and measures how long the trainer waited.
public final class Loader: @unchecked Sendable {
    public let dataset: PreparedDataset
    public let sampler: GlobalBatchSampler
    public let samples: [Int]
    public let tokenizer: WordPieceTokenizer
    public let recipe: SampleRecipe
    public let workers: Int
    private let capacity: Int
    private var queue: [TrainingBatch] = []
    private let condition = NSCondition()
    private var stopped = false
    private var thread: Thread?
    /// Seconds `next()` spent waiting for data.
    public private(set) var waitSeconds = 0.0

    /// Starts producing from (epoch, step) on; `samples` are the dataset (study) indices of the split.
    public init(dataset: PreparedDataset, samples: [Int], sampler: GlobalBatchSampler, tokenizer: WordPieceTokenizer, recipe: SampleRecipe,
                startEpoch: Int = 0, startStep: Int = 0, prefetch: Int = 2, workers: Int = 1) {
        self.dataset = dataset; self.samples = samples; self.sampler = sampler; self.tokenizer = tokenizer; self.recipe = recipe
        self.capacity = max(1, prefetch); self.workers = max(1, workers)
        // The thread holds the loader until `stop()` ends it.
        let thread = Thread { self.produce(epoch: startEpoch, step: startStep) }
        thread.name = "convirt-loader"
        self.thread = thread
        thread.start()
    }

    deinit { stop() }

    public func stop() {
        condition.lock(); stopped = true; condition.broadcast(); condition.unlock()
    }

    /// The next batch, in (epoch, step) order.
    public func next() -> TrainingBatch {
        let start = DispatchTime.now().uptimeNanoseconds
        condition.lock()
        while queue.isEmpty { condition.wait() }
        let batch = queue.removeFirst()
        condition.broadcast()
        condition.unlock()
        waitSeconds += Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        return batch
    }

    private func produce(epoch startEpoch: Int, step startStep: Int) {
        var epoch = startEpoch, step = startStep
        var permutation = sampler.permutation(epoch: epoch)
        while true {
            condition.lock()
            while queue.count >= capacity && !stopped { condition.wait() }
            let done = stopped
            condition.unlock()
            if done { return }
            let batch = Self.build(dataset: dataset, samples: samples, sampler: sampler, tokenizer: tokenizer, recipe: recipe,
                                   epoch: epoch, step: step, permutation: permutation, workers: workers)
            condition.lock(); queue.append(batch); condition.broadcast(); condition.unlock()
            step += 1
            if step >= sampler.batchesPerEpoch {
                step = 0; epoch += 1
                permutation = sampler.permutation(epoch: epoch)
            }
        }
    }

    /// This rank's rows of global batch (epoch, step): images augmented, sentences tokenized.
    public static func build(dataset: PreparedDataset, samples: [Int], sampler: GlobalBatchSampler, tokenizer: WordPieceTokenizer,
                             recipe: SampleRecipe, epoch: Int, step: Int, permutation: [Int], workers: Int = 1) -> TrainingBatch {
        let rows = sampler.localRows(batch: step, permutation: permutation)
        let s = recipe.augment.outputSize, b = rows.count
        var images = [Float](repeating: 0, count: b * 3 * s * s)
        var sentences = [String](repeating: "", count: b)
        images.withUnsafeMutableBufferPointer { out in
            let base = UncheckedPointer(out.baseAddress!)
            let parts = min(workers, b)
            sentences.withUnsafeMutableBufferPointer { sent in
                let sentBase = UncheckedStrings(sent.baseAddress!)
                DispatchQueue.concurrentPerform(iterations: parts) { part in
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 2 * s * s)
                    defer { scratch.deallocate() }
                    for i in stride(from: part, to: b, by: parts) {
                        sentBase.pointer[i] = SampleBuilder.build(dataset, study: samples[rows[i].sample], epoch: epoch, seed: sampler.seed,
                                                                  recipe: recipe, image: base.pointer + i * 3 * s * s, scratch: scratch)
                    }
                }
            }
        }
        let encoded = sentences.map { tokenizer.encode($0, maxLength: recipe.maxTokens) }
        let tokens = encoded.map(\.count).max() ?? 2
        var ids = [Int32](repeating: tokenizer.padID, count: b * tokens), mask = [Int32](repeating: 0, count: b * tokens)
        for (i, e) in encoded.enumerated() {
            for (j, id) in e.enumerated() { ids[i * tokens + j] = id; mask[i * tokens + j] = 1 }
        }
        return TrainingBatch(epoch: epoch, step: step, size: b, imageSize: s, images: images, ids: ids, mask: mask, tokens: tokens,
                             sampleIndices: rows.map { UInt64(samples[$0.sample]) }, globalRows: rows.map(\.globalRow), sentences: sentences)
    }
}

struct UncheckedPointer: @unchecked Sendable { let pointer: UnsafeMutablePointer<Float>; init(_ p: UnsafeMutablePointer<Float>) { pointer = p } }
struct UncheckedStrings: @unchecked Sendable { let pointer: UnsafeMutablePointer<String>; init(_ p: UnsafeMutablePointer<String>) { pointer = p } }
