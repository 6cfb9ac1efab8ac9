// CheXpert 8x200 retrieval (the paper's Section 4.3 and Table 2): image-to-image retrieval ranks the
// candidates by the cosine of the image encoder's features h_v with the query image's; text-to-image
// ranks them by the cosine of the projected embeddings v and u. A candidate is relevant when its label
// for the query's category is 1. Precision@5, @10 and @50 per category (mean over its queries) and over
// categories.

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtModels
import ConvirtText
import ConvirtTraining
import Foundation

public enum RetrievalEvaluation {
    /// Image features h_v (L2-normalised) [n, F] and embeddings v [n, d] of images, in evaluation mode,
    /// computed in slices over the ranks and gathered on every rank; `ok[i]` is false for an unreadable image.
    public static func embedImages(_ paths: [String], model: ConVIRTModel, size: Int, communicator: Communicator,
                                   batch: Int = 16) throws -> (features: [Float], embeddings: [Float], ok: [Bool]) {
        let f = model.config.image.featureCount, d = model.config.projDim, n = paths.count
        let (counts, mine) = ArenaShards.split(n, communicator)
        var features = [Float](repeating: 0, count: n * f), embeddings = [Float](repeating: 0, count: n * d), flags = [Float](repeating: 0, count: n)
        let context = PassContext(training: false, precision: model.precision)
        try ImagePrefetcher.batches(paths, mine, batch: batch, size: size) { slice, images, ok in
            let start = slice.lowerBound, rows = slice.count
            let h = try model.imageFeatures(images, batch: rows, size: size, context: context)
            features.withUnsafeMutableBufferPointer { out in
                let o = out.baseAddress! + start * f
                o.update(from: h, count: rows * f)
                var norms = [Float](repeating: 0, count: rows)
                L2Normalize.forward(output: o, norms: &norms, input: o, rows: rows, features: f)
            }
            let v = model.projectImageFeatures(h, rows: rows)
            embeddings.withUnsafeMutableBufferPointer { ($0.baseAddress! + start * d).update(from: v, count: rows * d) }
            for (k, good) in ok.enumerated() { flags[start + k] = good ? 1 : 0 }
        }
        try features.withUnsafeMutableBufferPointer { try communicator.allGatherInPlace($0, counts: counts.map { $0 * f }) }
        try embeddings.withUnsafeMutableBufferPointer { try communicator.allGatherInPlace($0, counts: counts.map { $0 * d }) }
        try flags.withUnsafeMutableBufferPointer { try communicator.allGatherInPlace($0, counts: counts) }
        return (features, embeddings, flags.map { $0 != 0 })
    }

    /// Embeddings u [n, d] of sentences (the same on every rank; texts are cheap next to images).
    public static func embedTexts(_ texts: [String], model: ConVIRTModel, tokenizer: WordPieceTokenizer, maxTokens: Int,
                                  batch: Int = 16) throws -> [Float] {
        let d = model.config.projDim
        var out: [Float] = []
        out.reserveCapacity(texts.count * d)
        let context = PassContext(training: false, precision: model.precision)
        for start in stride(from: 0, to: texts.count, by: batch) {
            let chunk = Array(texts[start..<min(texts.count, start + batch)])
            let tokens = min(maxTokens, chunk.map { tokenizer.encode($0, maxLength: maxTokens).count }.max() ?? 2)
            let (ids, mask) = try tokenizer.encodeBatch(chunk, maxLength: tokens)
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: chunk.count, tokens: tokens, context: context)
            out += UnsafeBufferPointer(start: u, count: chunk.count * d)
        }
        return out
    }

    /// Candidates ranked by the dot product of unit vectors (cosine), highest first.
    static func ranking(query: ArraySlice<Float>, candidates: [Float], width: Int, count: Int) -> [Int] {
        var scores = [Float](repeating: 0, count: count)
        query.withContiguousStorageIfAvailable { q in
            candidates.withUnsafeBufferPointer { c in scores.withUnsafeMutableBufferPointer { s in
                sgemm(Product(m: 1, n: count, k: width, transposeB: true),
                      a: Matrix(q.baseAddress!, ld: width), b: Matrix(c.baseAddress!, ld: width), c: MutableMatrix(s.baseAddress!, ld: count))
            } }
        }
        return scores.indices.sorted { scores[$0] > scores[$1] || (scores[$0] == scores[$1] && $0 < $1) }
    }

    /// Both retrievals of a set; `examples` queries per category and mode keep their top 8 for the report.
    public static func evaluate(set: RetrievalSet, model: ConVIRTModel, tokenizer: WordPieceTokenizer, maxTokens: Int, imageSize: Int,
                                communicator: Communicator, examples: Int = 1, log: (String) -> Void = { _ in }) throws -> RetrievalResult {
        let f = model.config.image.featureCount, d = model.config.projDim
        var result = RetrievalResult()
        var kept: [RetrievalExample] = []
        var intervals: [String: [String: ConfidenceInterval]] = [:]
        func precisions(_ mode: String, queries: [(category: String, ranked: [Int], query: RetrievalExample.Query)], candidates: [RetrievalCandidate]) -> [String: [String: Double]] {
            var table: [String: [String: Double]] = [:]
            for k in RetrievalResult.ks {
                var row: [String: Double] = [:], strata: [[Double]] = []
                for category in set.categories {
                    let mine = queries.filter { $0.category == category }
                    guard !mine.isEmpty else { continue }
                    let values = mine.map { q in
                        Metrics.precisionAtK(ranked: q.ranked, relevant: { set.relevant(candidates[$0], category) }, k: k)
                    }
                    row[category] = values.reduce(0, +) / Double(mine.count)
                    strata.append(values)
                }
                // The mean over categories in file order (a dictionary's order varies from run to run).
                let present = set.categories.compactMap { row[$0] }
                row["mean"] = present.reduce(0, +) / Double(max(1, present.count))
                table["precision@\(k)"] = row
                // Its 95% interval: the queries resampled within each category.
                intervals[mode, default: [:]]["precision@\(k)"] = Bootstrap.stratifiedMean(strata)
            }
            var shown: [String: Int] = [:]
            for q in queries where shown[q.category, default: 0] < examples {
                shown[q.category, default: 0] += 1
                kept.append(RetrievalExample(mode: mode, category: q.category, query: q.query,
                                             top: q.ranked.prefix(8).map { .init(path: candidates[$0].path, relevant: set.relevant(candidates[$0], q.category)) }))
            }
            return table
        }
        // Image to image: h_v of queries against h_v of candidates (embedded once when both files list
        // the same candidates, as the released ones do).
        var candidateEmbeddings: (features: [Float], embeddings: [Float], ok: [Bool])? = nil
        if !set.imageQueries.isEmpty && !set.candidates.isEmpty {
            let candidates = try embedImages(set.candidates.map(\.path), model: model, size: imageSize, communicator: communicator)
            candidateEmbeddings = candidates
            let queries = try embedImages(set.imageQueries.map(\.path), model: model, size: imageSize, communicator: communicator)
            let bad = candidates.ok.filter { !$0 }.count + queries.ok.filter { !$0 }.count
            if bad > 0 { log("image-to-image: \(bad) unreadable image(s) (they score as zero vectors)") }
            let ranked = set.imageQueries.indices.map { i in
                (category: set.imageQueries[i].category,
                 ranked: ranking(query: queries.features[(i * f)..<((i + 1) * f)], candidates: candidates.features, width: f, count: set.candidates.count),
                 query: RetrievalExample.Query(path: set.imageQueries[i].path))
            }
            result.imageToImage = precisions("image_to_image", queries: ranked, candidates: set.candidates)
        }
        // Text to image: u of the sentences against v of the candidates.
        if !set.textQueries.isEmpty && !set.textCandidates.isEmpty {
            let candidates = try candidateEmbeddings.flatMap { set.textCandidates == set.candidates ? $0 : nil }
                ?? embedImages(set.textCandidates.map(\.path), model: model, size: imageSize, communicator: communicator)
            let u = try embedTexts(set.textQueries.map(\.text), model: model, tokenizer: tokenizer, maxTokens: maxTokens)
            let ranked = set.textQueries.indices.map { i in
                (category: set.textQueries[i].category,
                 ranked: ranking(query: u[(i * d)..<((i + 1) * d)], candidates: candidates.embeddings, width: d, count: set.textCandidates.count),
                 query: RetrievalExample.Query(text: set.textQueries[i].text))
            }
            result.textToImage = precisions("text_to_image", queries: ranked, candidates: set.textCandidates)
        }
        result.examples = kept
        result.ci95 = intervals.isEmpty ? nil : intervals
        return result
    }
}
