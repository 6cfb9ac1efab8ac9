// Image-to-text retrieval on held-out studies: does the model pair images with their own reports?
// Every held-out study contributes one frontal image (no augmentation) and all of its sentences; for
// each image the ten nearest sentences by cosine are retrieved. Two measures:
// - by source study: a sentence is relevant when it comes from the image's own study. Many studies
//   share a sentence ("No pneumothorax."), and no model can tell their copies apart, so even an
//   encoder that knows every finding stays far below the count bound ("best possible").
// - over distinct sentences: the pool holds each text once, and a text is relevant when the image's own
//   report says it.
// Chance is the share of relevant sentences in the pool.

import ConvirtCore
import ConvirtData
import ConvirtModels
import ConvirtText
import ConvirtTraining
import Foundation

public struct HeldOutRetrievalResult: Codable, Sendable {
    public var studies: Int
    public var sentences: Int
    /// By source study.
    public var precisionAt10: Double
    public var chanceAt10: Double
    /// The best possible precision@10 by count (a study has fewer than ten sentences).
    public var maximumAt10: Double
    /// Over the distinct sentences (nil in results written before it existed).
    public var distinct: Distinct?

    public struct Distinct: Codable, Sendable {
        public var sentences: Int
        public var precisionAt10: Double
        public var chanceAt10: Double
        public var maximumAt10: Double

        enum CodingKeys: String, CodingKey {
            case sentences, precisionAt10 = "precision@10", chanceAt10 = "chance@10", maximumAt10 = "maximum@10"
        }
    }

    enum CodingKeys: String, CodingKey {
        case studies, sentences, precisionAt10 = "precision@10", chanceAt10 = "chance@10", maximumAt10 = "maximum@10", distinct
    }

    /// The TensorBoard scalars of both measures.
    public var tensorBoardScalars: [(tag: String, value: Double)] {
        var out: [(tag: String, value: Double)] = [("eval/heldout/image_to_text_precision@10", precisionAt10), ("eval/heldout/chance@10", chanceAt10)]
        if let d = distinct {
            out += [("eval/heldout/distinct/image_to_text_precision@10", d.precisionAt10), ("eval/heldout/distinct/chance@10", d.chanceAt10)]
        }
        return out
    }

    /// The console line: both measures.
    public var summary: String {
        var line = String(format: "held-out image-to-text retrieval (%d test studies, %d sentences): precision@10 %.3f by source study (chance %.3f, best possible %.3f)",
                          studies, sentences, precisionAt10, chanceAt10, maximumAt10)
        if let d = distinct {
            line += String(format: "; %.3f over the %d distinct sentences (chance %.3f, best possible %.3f)", d.precisionAt10, d.sentences, d.chanceAt10, d.maximumAt10)
        }
        return line
    }
}

public enum HeldOutRetrieval {
    /// Ranking order: higher similarity first, ties by position.
    static func before(_ x: Float, _ i: Int, _ y: Float, _ j: Int) -> Bool { x != y ? x > y : i < j }

    public static func evaluate(model: ConVIRTModel, dataset: PreparedDataset, tokenizer: WordPieceTokenizer, split: String = "test",
                                maxStudies: Int, maxTokens: Int) throws -> HeldOutRetrievalResult {
        let studies = Array(dataset.samples(split: split).prefix(maxStudies))
        try require(studies.count >= 2, "held-out retrieval", "the \(split) split has \(studies.count) usable studies")
        let size = model.config.image.imageSize, d = model.config.projDim
        let context = PassContext(training: false, precision: model.precision)
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
        // Each distinct text is embedded once; textOf[j] is the distinct text of sentence j.
        var distinctIndex: [String: Int] = [:]
        var distinct: [String] = []
        var textOf: [Int] = []
        for sentence in sentences {
            if let i = distinctIndex[sentence] { textOf.append(i); continue }
            distinctIndex[sentence] = distinct.count
            textOf.append(distinct.count)
            distinct.append(sentence)
        }
        for start in stride(from: 0, to: distinct.count, by: batch) {
            let chunk = Array(distinct[start..<min(distinct.count, start + batch)])
            let tokens = min(maxTokens, (chunk.map { tokenizer.encode($0, maxLength: maxTokens).count }.max() ?? 2))
            let (ids, mask) = try tokenizer.encodeBatch(chunk, maxLength: tokens)
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: chunk.count, tokens: tokens, context: context)
            textEmbeddings += Array(UnsafeBufferPointer(start: u, count: chunk.count * d))
        }
        // Counted in integers and divided once, so that 31 hits of 500 is 0.062 in the JSON, not a sum's
        // 0.061999999999999986.
        let n = studies.count, t = sentences.count, u = distinct.count
        var hits = 0, owned = 0, reachable = 0
        var distinctHits = 0, distinctOwned = 0, distinctReachable = 0
        var similarity = [Float](repeating: 0, count: u)
        for i in 0..<n {
            for j in 0..<u {
                var s: Float = 0
                for k in 0..<d { s += imageEmbeddings[i * d + k] * textEmbeddings[j * d + k] }
                similarity[j] = s
            }
            let ownSentences = (0..<t).filter { (j: Int) -> Bool in owner[j] == i }
            // By source study: every sentence; copies of one text tie, broken by position.
            let ranked = (0..<t).sorted { (a: Int, b: Int) -> Bool in before(similarity[textOf[a]], a, similarity[textOf[b]], b) }
            hits += ranked.prefix(10).filter { (j: Int) -> Bool in owner[j] == i }.count
            owned += ownSentences.count
            reachable += min(ownSentences.count, 10)
            // Over distinct sentences.
            let ownTexts = Set(ownSentences.map { (j: Int) -> Int in textOf[j] })
            let rankedTexts = (0..<u).sorted { (a: Int, b: Int) -> Bool in before(similarity[a], a, similarity[b], b) }
            distinctHits += rankedTexts.prefix(10).filter { (j: Int) -> Bool in ownTexts.contains(j) }.count
            distinctOwned += ownTexts.count
            distinctReachable += min(ownTexts.count, 10)
        }
        let distinctResult = HeldOutRetrievalResult.Distinct(
            sentences: u, precisionAt10: Double(distinctHits) / Double(10 * n), chanceAt10: Double(distinctOwned) / Double(u * n),
            maximumAt10: Double(distinctReachable) / Double(10 * n))
        return HeldOutRetrievalResult(studies: n, sentences: t, precisionAt10: Double(hits) / Double(10 * n), chanceAt10: Double(owned) / Double(t * n),
                                      maximumAt10: Double(reachable) / Double(10 * n), distinct: distinctResult)
    }
}
