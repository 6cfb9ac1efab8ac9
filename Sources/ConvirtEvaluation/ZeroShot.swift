// Zero-shot classification from text prompts, CheXzero's protocol (Tiu et al. 2022): for each label a
// positive and a negative prompt set (the embeddings u of a set averaged and renormalised), the score of
// an image the softmax over (positive, negative) of cos(v, u) / tau, i.e. sigmoid((cos+ - cos-) / tau);
// ROC AUC per label and their mean (MURA per study), on the test split `eval linear` tests on. COVIDx:
// one positive set per class, the class of the highest cosine, accuracy.

import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import ConvirtText
import Foundation

/// The prompts of one label (or, for COVIDx, one class).
public struct PromptSet: Codable, Sendable, Equatable {
    public var positive: [String]
    public var negative: [String]?
    public init(positive: [String], negative: [String]? = nil) {
        self.positive = positive
        self.negative = negative
    }
}

public enum ZeroShotPrompts {
    /// The prompts that ship with convirt, per dataset, phrased as radiologists write findings and their
    /// absence (not copied from the synthetic reports).
    public static func defaults(_ dataset: DownstreamDataset) -> [String: PromptSet] {
        switch dataset {
        case .chexpert:
            return [
                "Atelectasis": PromptSet(positive: ["Bibasilar atelectasis.", "Linear opacity at the left base, likely subsegmental atelectasis.",
                                                    "Mild atelectasis at the lung bases."],
                                         negative: ["No atelectasis.", "The lungs are clear.", "No focal opacity to suggest atelectasis."]),
                "Cardiomegaly": PromptSet(positive: ["The heart is enlarged.", "Moderate cardiomegaly.", "The cardiac silhouette is enlarged."],
                                          negative: ["Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.", "No cardiomegaly."]),
                "Consolidation": PromptSet(positive: ["Focal consolidation in the right lower lobe.", "Airspace consolidation concerning for pneumonia.",
                                                      "There is a dense focal consolidation."],
                                           negative: ["No focal consolidation.", "The lungs are clear without consolidation.", "No airspace opacity."]),
                "Edema": PromptSet(positive: ["Mild pulmonary edema.", "Interstitial edema with pulmonary vascular congestion.",
                                              "Moderate pulmonary edema with perihilar haziness."],
                                   negative: ["No pulmonary edema.", "No vascular congestion or edema.", "Pulmonary vascularity is normal."]),
                "Pleural Effusion": PromptSet(positive: ["Small left pleural effusion.", "Moderate right pleural effusion with blunting of the costophrenic angle.",
                                                         "Bilateral pleural effusions."],
                                              negative: ["No pleural effusion.", "The costophrenic angles are sharp.", "No pleural effusion or pneumothorax."]),
            ]
        case .rsna:
            return ["Pneumonia": PromptSet(positive: ["Focal consolidation concerning for pneumonia.",
                                                      "Right lower lobe airspace opacity consistent with pneumonia.", "Findings suggest pneumonia."],
                                           negative: ["No focal consolidation to suggest pneumonia.", "The lungs are clear.", "No acute cardiopulmonary process."])]
        case .covidx:
            return [
                "normal": PromptSet(positive: ["The lungs are clear.", "No acute cardiopulmonary process.", "No focal consolidation, effusion or pneumothorax."]),
                "pneumonia": PromptSet(positive: ["Focal consolidation in the right lower lobe consistent with pneumonia.",
                                                  "Unilateral airspace consolidation concerning for pneumonia."]),
                "COVID-19": PromptSet(positive: ["Bilateral lower lobe consolidation with haziness.",
                                                 "Bilateral peripheral airspace opacities, consistent with COVID-19 pneumonia.",
                                                 "Multifocal bilateral opacities concerning for viral pneumonia."]),
                // COVIDx read as binary (COVID-19 or not): the other classes' prompts are the negatives.
            ]
        case .mura:
            return ["Abnormal": PromptSet(positive: ["There is an acute displaced fracture.", "Displaced fracture.", "Abnormal study with a fracture."],
                                          negative: ["No acute fracture or dislocation.", "Normal radiograph.", "The osseous structures are unremarkable."])]
        }
    }

    /// A prompts file: `{"<label>": {"positive": [...], "negative": [...]}, ...}` (COVIDx classes: positive only).
    public static func load(_ path: String) throws -> [String: PromptSet] {
        let data = try Files.read(path)
        do { return try JSONDecoder().decode([String: PromptSet].self, from: data) } catch {
            throw ConvirtError("\(path): not a prompts file ({\"<label>\": {\"positive\": [...], \"negative\": [...]}}): \(error)")
        }
    }

    /// The prompts as JSON (printed with the results).
    public static func json(_ prompts: [String: PromptSet]) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return (try? String(decoding: encoder.encode(prompts), as: UTF8.self)) ?? "{}"
    }
}

public enum ZeroShotEvaluation {
    /// Scores and the test metric of `data`'s test split under `prompts`. Images that cannot be read are
    /// counted and left out (as in linear evaluation).
    public static func run(data: DownstreamData, prompts: [String: PromptSet], model: ConVIRTModel, tokenizer: WordPieceTokenizer,
                           maxTokens: Int, imageSize: Int, communicator: Communicator, checkpoint: String?,
                           log: @escaping (String) -> Void) throws -> ClassificationResult {
        let name = data.dataset.rawValue
        // Every label has its prompts and every prompt set is known; each prompt has a known word.
        let unknown = Set(prompts.keys).subtracting(data.labelNames)
        if !unknown.isEmpty {
            throw ConvirtError("zero-shot prompts for \(name): \(unknown.sorted().joined(separator: ", ")) is not a label (labels: \(data.labelNames.joined(separator: ", ")))")
        }
        for label in data.labelNames {
            guard let set = prompts[label] else { throw ConvirtError("zero-shot prompts for \(name): no prompts for \(label)") }
            guard !set.positive.isEmpty else { throw ConvirtError("zero-shot prompts for \(name): \(label) has no positive prompt") }
            if data.task != .multiClass && (set.negative ?? []).isEmpty && data.dataset != .covidx {
                throw ConvirtError("zero-shot prompts for \(name): \(label) needs negative prompts (a positive and a negative set per label)")
            }
            for prompt in set.positive + (set.negative ?? []) {
                let ids = tokenizer.encode(prompt, maxLength: maxTokens).dropFirst().dropLast()
                if ids.allSatisfy({ $0 == tokenizer.unknownID }) {
                    throw ConvirtError("zero-shot prompt \"\(prompt)\" (\(label)) has no word the vocabulary knows: every token is [UNK]")
                }
            }
        }
        let d = model.config.projDim, tau = Float(model.config.tau)
        /// The mean of the normalised embeddings of `texts`, renormalised.
        func centroid(_ texts: [String]) throws -> [Float] {
            let u = try RetrievalEvaluation.embedTexts(texts, model: model, tokenizer: tokenizer, maxTokens: maxTokens)
            var c = [Float](repeating: 0, count: d)
            for t in 0..<texts.count { for k in 0..<d { c[k] += u[t * d + k] } }
            let norm = max(1e-12, c.reduce(0) { $0 + $1 * $1 }.squareRoot())
            return c.map { $0 / norm }
        }
        var test = LabeledArrays(data.test, outputs: data.labelNames.count)
        let images = try RetrievalEvaluation.embedImages(test.paths, model: model, size: imageSize, communicator: communicator)
        let keep = images.ok.indices.filter { images.ok[$0] }
        if keep.count < test.count && communicator.isRoot {
            let bad = images.ok.indices.filter { !images.ok[$0] }.prefix(3).map { test.paths[$0] }
            log("test: \(test.count - keep.count) image(s) could not be read and are skipped, e.g. \(bad.joined(separator: ", "))")
        }
        let v = keep.flatMap { Array(images.embeddings[($0 * d)..<(($0 + 1) * d)]) }
        test = test.subset(keep)
        let o = data.labelNames.count, n = test.count
        func cosine(_ i: Int, _ c: [Float]) -> Float { (0..<d).reduce(0) { $0 + v[i * d + $1] * c[$1] } }
        var scores = [Float](repeating: 0, count: n * o)
        if data.task == .multiClass {
            let classes = try data.labelNames.map { try centroid(prompts[$0]!.positive) }
            for i in 0..<n {
                let logits = classes.map { cosine(i, $0) / tau }
                let top = logits.max()!
                let e = logits.map { Float.exp($0 - top) }
                let sum = e.reduce(0, +)
                for k in 0..<o { scores[i * o + k] = e[k] / sum }
            }
        } else {
            for (k, label) in data.labelNames.enumerated() {
                let set = prompts[label]!
                // COVIDx as binary: without negatives, the other classes' default prompts are the negatives.
                let negatives = set.negative ?? ZeroShotPrompts.defaults(.covidx).filter { $0.key != label }.flatMap(\.value.positive)
                let positive = try centroid(set.positive), negative = try centroid(negatives)
                for i in 0..<n { scores[i * o + k] = 1 / (1 + Float.exp(-(cosine(i, positive) - cosine(i, negative)) / tau)) }
            }
        }
        let (value, perLabel) = try ClassificationEvaluation.metric(data: data, scores: scores, split: test) { if communicator.isRoot { log($0) } }
        // One deterministic score, no runs (DESIGN.md: zero-shot results have no "runs").
        var result = ClassificationResult(dataset: name, protocol: "zeroshot", fraction: 1, metric: data.task == .multiClass ? "accuracy" : "auc",
                                          runs: [value], perLabel: perLabel, initialization: "convirt", checkpoint: checkpoint)
        result.runs = []
        result.ci95 = ClassificationEvaluation.confidence(data: data, runs: [scores], split: test, resamples: Bootstrap.defaultResamples)
        return result
    }
}
