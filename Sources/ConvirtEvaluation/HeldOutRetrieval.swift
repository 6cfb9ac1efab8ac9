// Image-to-text retrieval on held-out studies: does the model pair images with their own reports?
// Every held-out study contributes one frontal image (no augmentation) and all of its sentences; for
// each image the ten nearest sentences by cosine are retrieved, and a sentence is relevant when it
// comes from the image's own study. Chance is the share of the image's own sentences among all.

import ConvirtCore
import ConvirtData
import ConvirtModels
import ConvirtText
import ConvirtTraining
import Foundation

public struct HeldOutRetrievalResult: Codable, Sendable {
    public var studies: Int
    public var sentences: Int
    public var precisionAt10: Double
    public var chanceAt10: Double
    /// The best possible precision@10 (a study has fewer than ten sentences).
    public var maximumAt10: Double

    enum CodingKeys: String, CodingKey {
        case studies, sentences, precisionAt10 = "precision@10", chanceAt10 = "chance@10", maximumAt10 = "maximum@10"
    }
}

public enum HeldOutRetrieval {
    public static func evaluate(model: ConVIRTModel, dataset: PreparedDataset, tokenizer: WordPieceTokenizer, split: String = "test",
                                maxStudies: Int, maxTokens: Int) throws -> HeldOutRetrievalResult {
        let studies = Array(dataset.samples(split: split).prefix(maxStudies))
        try require(studies.count >= 2, "held-out retrieval", "the \(split) split has \(studies.count) usable studies")
        let size = model.config.image.imageSize, d = model.config.projDim
        let context = PassContext(training: false)
        var imageEmbeddings: [Float] = [], textEmbeddings: [Float] = []
        var owner: [Int] = []
        let batch = 16
        var scratch = [Float](repeating: 0, count: 2 * size * size)
        for start in stride(from: 0, to: studies.count, by: batch) {
            let chunk = Array(studies[start..<min(studies.count, start + batch)])
            var images = [Float](repeating: 0, count: chunk.count * 3 * size * size)
            for (i, s) in chunk.enumerated() {
                let pixels = dataset.image(dataset.studies[s].images[0])
                let p = AugmentParameters.draw(.none(outputSize: size), width: pixels.width, height: pixels.height, stream: RandomStream(seed: 0))
                images.withUnsafeMutableBufferPointer { out in
                    scratch.withUnsafeMutableBufferPointer { Augment.apply(pixels, p, outputSize: size, output: out.baseAddress! + i * 3 * size * size, scratch: $0.baseAddress!) }
                }
            }
            let v = try images.withUnsafeBufferPointer { try model.encodeImages($0.baseAddress!, batch: chunk.count, size: size, context: context) }
            imageEmbeddings += Array(UnsafeBufferPointer(start: v, count: chunk.count * d))
        }
        var sentences: [String] = []
        for (k, s) in studies.enumerated() {
            for sentence in dataset.studies[s].sentences { sentences.append(sentence); owner.append(k) }
        }
        for start in stride(from: 0, to: sentences.count, by: batch) {
            let chunk = Array(sentences[start..<min(sentences.count, start + batch)])
            let tokens = min(maxTokens, (chunk.map { tokenizer.encode($0, maxLength: maxTokens).count }.max() ?? 2))
            let (ids, mask) = try tokenizer.encodeBatch(chunk, maxLength: tokens)
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: chunk.count, tokens: tokens, context: context)
            textEmbeddings += Array(UnsafeBufferPointer(start: u, count: chunk.count * d))
        }
        // Counted in integers and divided once, so that 31 hits of 500 is 0.062 in the JSON, not a sum's
        // 0.061999999999999986.
        var hits = 0, owned = 0, reachable = 0
        let t = sentences.count
        for i in 0..<studies.count {
            var scores = [(Float, Int)]()
            scores.reserveCapacity(t)
            for j in 0..<t {
                var s: Float = 0
                for k in 0..<d { s += imageEmbeddings[i * d + k] * textEmbeddings[j * d + k] }
                scores.append((s, j))
            }
            scores.sort { $0.0 > $1.0 }
            let own = owner.filter { $0 == i }.count
            hits += scores.prefix(10).filter { owner[$0.1] == i }.count
            owned += own
            reachable += min(own, 10)
        }
        let n = studies.count
        return HeldOutRetrievalResult(studies: n, sentences: t, precisionAt10: Double(hits) / Double(10 * n),
                                      chanceAt10: Double(owned) / Double(t * n), maximumAt10: Double(reachable) / Double(10 * n))
    }
}
