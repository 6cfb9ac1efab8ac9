// Evaluation metrics against scikit-learn (tools/make_metric_fixtures.py), the results files, and the
// side-by-side tables against the paper's numbers.

import ConvirtCore
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation
import Testing

private struct MetricFixtures: Decodable {
    struct AUCCase: Decodable {
        let name: String
        let scores: [Double]
        let labels: [Bool]
        let auc: Double?
    }
    struct SpreadCase: Decodable {
        let values: [Double]
        let mean: Double
        let std: Double
    }
    let roc_auc: [AUCCase]
    let mean_std_ddof1: [SpreadCase]

    static func load() throws -> MetricFixtures {
        guard let url = Bundle.module.url(forResource: "Fixtures/metric_fixtures", withExtension: "json") else {
            throw ConvirtError("missing fixture metric_fixtures.json (python3 tools/make_metric_fixtures.py)")
        }
        return try JSONDecoder().decode(MetricFixtures.self, from: Data(contentsOf: url))
    }
}

@Suite("Evaluation metrics and paper tables")
struct MetricsTests {
    @Test("ROC AUC equals scikit-learn's roc_auc_score to 1e-12; one class present is an error")
    func rocAUC() throws {
        let fixtures = try MetricFixtures.load()
        #expect(fixtures.roc_auc.count >= 15)
        for c in fixtures.roc_auc {
            if let expected = c.auc {
                let auc = try Metrics.rocAUC(scores: c.scores, labels: c.labels)
                #expect(abs(auc - expected) <= 1e-12, "\(c.name): \(auc) vs sklearn \(expected)")
                #expect(Metrics.rocAUCIfDefined(scores: c.scores, labels: c.labels) == auc)
                // The order of the samples does not matter.
                let reversed = try Metrics.rocAUC(scores: c.scores.reversed(), labels: c.labels.reversed())
                #expect(abs(reversed - expected) <= 1e-12, "\(c.name) reversed")
            } else {
                #expect(Metrics.rocAUCIfDefined(scores: c.scores, labels: c.labels) == nil, "\(c.name)")
                let error = #expect(throws: ConvirtError.self) { try Metrics.rocAUC(scores: c.scores, labels: c.labels) }
                #expect(error?.message.contains("only one class") == true, "\(c.name): \(String(describing: error))")
            }
        }
    }

    @Test("ROC AUC refuses NaN and infinite scores and mismatched counts")
    func rocAUCBadInput() {
        let nan = #expect(throws: ConvirtError.self) { try Metrics.rocAUC(scores: [0.1, .nan, 0.3], labels: [true, false, true]) }
        #expect(nan?.message.contains("score 1 is nan") == true, "\(String(describing: nan))")
        #expect(throws: ConvirtError.self) { try Metrics.rocAUC(scores: [0.1, .infinity], labels: [true, false]) }
        #expect(throws: ConvirtError.self) { try Metrics.rocAUC(scores: [0.1, 0.2], labels: [true]) }
        #expect(Metrics.rocAUCIfDefined(scores: [.nan, 1], labels: [true, false]) == nil)
    }

    @Test("ROC AUC of counted samples (the bootstrap's resamples) is bitwise rocAUC of the samples repeated")
    func rocAUCCounted() throws {
        for trial in 0..<60 {
            let stream = RandomStream(seed: UInt64(trial), 7)
            let n = 1 + stream.integer(below: 120, at: 0)
            // Few distinct scores on some trials (many ties), near-continuous ones on others.
            let levels = trial % 3 == 0 ? 4 : 1_000_000
            var scores = (0..<n).map { Double(stream.integer(below: levels, at: 1000 + UInt64($0))) / Double(levels) }
            let labels = (0..<n).map { stream.uniform(at: 2000 + UInt64($0)) < (trial % 4 == 1 ? 0.1 : 0.4) }
            if trial % 10 == 9 { scores[stream.integer(below: n, at: 3)] = trial % 20 == 9 ? .nan : -.infinity }
            let ranked = Metrics.RankedScores(scores: scores, labels: labels)
            #expect(ranked.auc() == Metrics.rocAUCIfDefined(scores: scores, labels: labels), "trial \(trial)")
            for b in 0..<20 {
                var counts = [Int](repeating: 0, count: n), sample: [Int] = []
                for i in 0..<n {
                    let u = stream.integer(below: n, at: 10_000 + UInt64(b * n + i))
                    counts[u] += 1
                    sample.append(u)
                }
                let expected = Metrics.rocAUCIfDefined(scores: sample.map { scores[$0] }, labels: sample.map { labels[$0] })
                let counted = ranked.auc(counts: counts)
                #expect(counted?.bitPattern == expected?.bitPattern, "trial \(trial), resample \(b): \(String(describing: counted)) against \(String(describing: expected))")
            }
        }
    }

    @Test("Mean ROC AUC over labels leaves out the undefined ones")
    func meanAUC() throws {
        let r = try Metrics.meanROCAUC(scores: [[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.3, 0.3, 0.3]],
                                       labels: [[true, false, true], [true, false, false], [false, false, false]],
                                       names: ["Atelectasis", "Edema", "Pleural Effusion"])
        #expect(r.perLabel == ["Atelectasis": 1.0, "Edema": 0.0])
        #expect(r.undefined == ["Pleural Effusion"])
        #expect(r.mean == 0.5)
    }

    @Test("Accuracy, precision@k, and mean with the sample std (ddof = 1) as numpy")
    func simpleMetrics() throws {
        #expect(Metrics.accuracy(predicted: [0, 1, 2, 2], truth: [0, 1, 1, 2]) == 0.75)
        #expect(Metrics.accuracy(predicted: [], truth: []).isNaN)
        let ranked = [7, 3, 9, 1, 4, 8]
        #expect(Metrics.precisionAtK(ranked: ranked, relevant: { $0 > 5 }, k: 1) == 1)
        #expect(Metrics.precisionAtK(ranked: ranked, relevant: { $0 > 5 }, k: 5) == 0.4)
        #expect(Metrics.precisionAtK(ranked: ranked, relevant: Set([3, 1, 8]), k: 6) == 0.5)
        #expect(Metrics.precisionAtK(ranked: [1, 2], relevant: Set([1, 2]), k: 4) == 0.5, "missing items count as not relevant")
        for c in try MetricFixtures.load().mean_std_ddof1 {
            let (mean, std) = Metrics.meanAndStd(c.values)
            #expect(abs(mean - c.mean) <= 1e-12 && abs(std - c.std) <= 1e-12, "\(c.values): \(mean) \(std) vs \(c.mean) \(c.std)")
        }
        #expect(Metrics.meanAndStd([0.7]) == (0.7, 0))
        #expect(Metrics.meanAndStd([]).mean.isNaN)
    }

    @Test("The embedded paper results are byte-identical to tools/paper_results.json and parse")
    func paperResults() throws {
        let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/paper_results.json")
        #expect(try Data(contentsOf: file) == Data(PaperTable.paperResultsJSON.utf8))
        #expect(PaperTable.paper.classification["linear"]?["ConVIRT"]?["CheXpert"]?["1%"] == 85.9)
        #expect(PaperTable.paper.classification["finetune"]?["Random Init"]?["MURA"]?["all"] == 79.1)
        #expect(PaperTable.paper.retrieval["ConVIRT"]?["text_to_image"]?["precision@50"] == 48.8)
        #expect(PaperTable.paper.classification["linear"]?.keys.sorted() == PaperTable.classificationMethods.sorted())
        #expect(PaperTable.paper.retrieval.keys.sorted() == PaperTable.retrievalMethods.sorted())
    }

    @Test("Results files: exact keys, extra keys ignored, unknown files named")
    func resultsFiles() throws {
        let r = ClassificationResult(dataset: "chexpert", protocol: "linear", fraction: 0.01, metric: "auc", runs: [0.8, 0.9],
                                     perLabel: ["Edema": 0.85], initialization: "random", seeds: [1, 2])
        #expect(abs(r.mean - 0.85) < 1e-15 && abs(r.std - 0.0707106781186548) < 1e-12)
        let json = try #require(JSONSerialization.jsonObject(with: r.encoded()) as? [String: Any])
        #expect(Set(json.keys) == ["dataset", "protocol", "fraction", "metric", "runs", "mean", "std", "per_label", "init", "seeds"])
        let other = #"{"dataset": "rsna", "protocol": "finetune", "fraction": 1, "metric": "auc", "runs": [0.9], "mean": 0.9, "std": 0, "per_label": {"Pneumonia": 0.9}, "tool": "x", "elapsed_s": 3}"#
        guard case .classification(let c) = try ResultsFile.decode(Data(other.utf8)) else { Issue.record("not classification"); return }
        #expect(c.dataset == "rsna" && c.fraction == 1 && c.initialization == nil && c.perLabel == ["Pneumonia": 0.9])
        let bad = ClassificationResult(dataset: "mura", protocol: "linear", fraction: 1, metric: "auc", runs: [.nan])
        #expect(throws: ConvirtError.self) { try bad.encoded() }

        let retrieval = #"{"image_to_image": {"precision@5": {"mean": 0.4, "Edema": 0.5}}, "text_to_image": {"precision@10": {"mean": 0.3}}, "examples": [{"mode": "text_to_image", "category": "Edema", "query": {"text": "edema"}, "top": [{"path": "/a.jpg", "relevant": true, "rank": 1}]}], "extra": 1}"#
        guard case .retrieval(let rr) = try ResultsFile.decode(Data(retrieval.utf8)) else { Issue.record("not retrieval"); return }
        #expect(rr.precision("image_to_image", k: 5) == 0.4 && rr.precision("image_to_image", k: 5, category: "Edema") == 0.5)
        #expect(rr.precision("text_to_image", k: 10) == 0.3 && rr.precision("text_to_image", k: 50) == nil)
        #expect(rr.categories("image_to_image") == ["Edema"])
        #expect(rr.examples?.first?.top.first == RetrievalExample.Candidate(path: "/a.jpg", relevant: true))
        let roundTrip = try JSONDecoder().decode(RetrievalResult.self, from: rr.encoded())
        #expect(roundTrip == rr)

        let unknown = #expect(throws: ConvirtError.self) { try ResultsFile.decode(Data(#"{"loss": 1}"#.utf8), source: "eval/x.json") }
        #expect(unknown?.message.contains("eval/x.json: neither") == true, "\(String(describing: unknown))")
        #expect(throws: ConvirtError.self) { try ResultsFile.decode(Data("[1, 2]".utf8)) }
        #expect(throws: ConvirtError.self) { try ResultsFile.decode(Data(#"{"dataset": "rsna", "protocol": "linear"}"#.utf8)) }
    }

    @Test("The classification table holds the paper's numbers and ours in the right cells")
    func classificationTable() throws {
        let ours = [
            ClassificationResult(dataset: "chexpert", protocol: "linear", fraction: 0.01, metric: "auc", runs: [0.801, 0.805, 0.809]),
            ClassificationResult(dataset: "covidx", protocol: "linear", fraction: 1, metric: "accuracy", runs: [0.912]),
            ClassificationResult(dataset: "rsna", protocol: "linear", fraction: 0.1, metric: "auc", runs: [0.7, 0.72], initialization: "random"),
            ClassificationResult(dataset: "mura", protocol: "finetune", fraction: 1, metric: "auc", runs: [0.5, 0.6]),
        ]
        let grid = PaperTable.classificationGrid(protocol: "linear", ours: ours)
        #expect(grid.groups.map(\.title) == ["RSNA", "CheXpert", "COVIDx", "MURA"])
        #expect(grid.groups[2].columns == ["10%", "all"] && grid.groups[0].columns == ["1%", "10%", "all"])
        #expect(grid.rows.map(\.label) == PaperTable.classificationMethods + ["ours (random)", "ours (convirt)"])
        #expect(grid.cell("ConVIRT", "CheXpert", "1%")?.text == "85.9")
        #expect(grid.cell("Random Init", "MURA", "all")?.text == "62.0")
        #expect(grid.cell("ImageNet Init", "COVIDx", "10%")?.text == "83.7")
        #expect(grid.cell("ours (convirt)", "CheXpert", "1%")?.text == "80.5 ± 0.4")
        #expect(grid.cell("ours (convirt)", "COVIDx", "all")?.text == "91.2")
        #expect(grid.cell("ours (random)", "RSNA", "10%")?.text == "71.0 ± 1.4")
        #expect(grid.cell("ours (convirt)", "MURA", "all") == nil, "a fine-tuning result is not in the linear table")

        let text = PaperTable.classificationTable(protocol: "linear", ours: ours)
        let lines = text.split(separator: "\n").map(String.init)
        let convirt = try #require(lines.first { $0.hasPrefix("ConVIRT ") })
        #expect(convirt.split(separator: " ").filter { $0.contains(".") } == ["90.7", "91.7", "92.1", "85.9", "86.8", "87.3", "85.9", "91.7", "81.2", "85.1", "87.6"])
        let mine = try #require(lines.first { $0.hasPrefix("ours (convirt)") })
        // The CheXpert 1% cell sits under the CheXpert 1% header.
        let header = try #require(lines.first { $0.hasPrefix("Method") })
        let chexpertColumn = header.ranges(of: "1%").map { header.distance(from: header.startIndex, to: $0.upperBound) }[1]
        let cell = mine.range(of: "80.5 ± 0.4").map { mine.distance(from: mine.startIndex, to: $0.upperBound) }
        #expect(cell == chexpertColumn, "\n\(text)")
        #expect(text.contains("Linear classification") && text.contains("ddof = 1"))

        let finetune = PaperTable.classificationGrid(protocol: "finetune", ours: ours)
        #expect(finetune.cell("ours (convirt)", "MURA", "all")?.text == "55.0 ± 7.1")
        #expect(finetune.cell("ConVIRT", "MURA", "all")?.text == "89.0")

        // A metric other than the paper's and an extra fraction are shown, with a note for the metric.
        let odd = PaperTable.classificationGrid(protocol: "linear", ours: [
            ClassificationResult(dataset: "covidx", protocol: "linear", fraction: 0.01, metric: "auc", runs: [0.6]),
            ClassificationResult(dataset: "mura", protocol: "linear", fraction: 0.05, metric: "auc", runs: [0.6]),
        ])
        #expect(odd.groups[2].columns == ["1%", "10%", "all"] && odd.groups[3].columns == ["1%", "5%", "10%", "all"])
        #expect(odd.notes.contains { $0.contains("COVIDx 1%: metric auc, the paper reports accuracy") })
    }

    @Test("The retrieval table holds the paper's numbers and ours in the right cells")
    func retrievalTable() throws {
        let ours = RetrievalResult(imageToImage: ["precision@5": ["mean": 0.3125], "precision@10": ["mean": 0.25], "precision@50": ["mean": 0.2]],
                                   textToImage: ["precision@5": ["mean": 0.5], "precision@10": ["mean": 0.45], "precision@50": ["mean": 0.401]])
        let grid = PaperTable.retrievalGrid(ours: [("ours (demo)", ours)])
        #expect(grid.rows.map(\.label) == PaperTable.retrievalMethods + ["ours (demo)"])
        #expect(grid.cell("ConVIRT", "Image → image", "P@10")?.text == "42.9")
        #expect(grid.cell("ConVIRT", "Text → image", "P@5")?.text == "60.0")
        #expect(grid.cell("ImageNet", "Text → image", "P@5") == nil)
        #expect(grid.cell("ours (demo)", "Image → image", "P@5")?.text == "31.2" || grid.cell("ours (demo)", "Image → image", "P@5")?.text == "31.3")
        #expect(grid.cell("ours (demo)", "Text → image", "P@50")?.text == "40.1")
        let text = PaperTable.retrievalTable(ours: [("ours (demo)", ours)])
        let row = try #require(text.split(separator: "\n").first { $0.hasPrefix("ours (demo)") })
        #expect(row.split(separator: " ").dropFirst(2).map(String.init) == ["31.2", "25.0", "20.0", "50.0", "45.0", "40.1"], "\(text)")
        let imagenet = try #require(text.split(separator: "\n").first { $0.hasPrefix("ImageNet ") })
        #expect(imagenet.split(separator: " ").dropFirst().map(String.init) == ["14.8", "14.4", "15.0", "-", "-", "-"], "\(text)")
    }
}
