// 95% bootstrap intervals against numpy on the same resamples (tools/make_bootstrap_fixture.py): the
// classification intervals of a multi-label AUC result over 2 runs (a rare label undefined on some
// resamples), of an accuracy result, and retrieval's stratified mean.

import ConvirtCore
import ConvirtEvaluation
import ConvirtIO
import Foundation
import Testing

private struct BootstrapFixture: Decodable {
    struct Interval: Decodable { let lower: Double; let upper: Double }
    struct Classification: Decodable {
        let names: [String]
        let targets: [[Float]]
        let runs: [[[Double]]]
        let draws: [[Int]]
        let mean: Interval
        let per_label: [String: Interval]
        let defined: [String: Int]
    }
    struct Accuracy: Decodable {
        let names: [String]
        let targets: [[Float]]
        let scores: [[Double]]
        let draws: [[Int]]
        let mean: Interval
        let per_label: [String: Interval]
    }
    struct Stratified: Decodable {
        let strata: [[Double]]
        let draws: [[[Int]]]
        let interval: Interval
    }
    let resamples: Int
    let classification: Classification
    let accuracy: Accuracy
    let stratified: Stratified

    static func load() throws -> BootstrapFixture {
        guard let url = Bundle.module.url(forResource: "Fixtures/bootstrap_fixture", withExtension: "json") else {
            throw ConvirtError("missing fixture bootstrap_fixture.json (python3 tools/make_bootstrap_fixture.py)")
        }
        return try JSONDecoder().decode(BootstrapFixture.self, from: Data(contentsOf: url))
    }
}

@Suite("Bootstrap intervals")
struct BootstrapTests {
    fileprivate func close(_ a: ConfidenceInterval?, _ b: BootstrapFixture.Interval, _ what: String) {
        #expect(a != nil, "\(what): no interval")
        guard let a else { return }
        #expect(abs(a.lower - b.lower) <= 1e-12 && abs(a.upper - b.upper) <= 1e-12, "\(what): \(a) against numpy's \(b)")
    }

    @Test("multi-label AUC over 2 runs: the mean's and each label's interval equal numpy's on the same resamples")
    func classification() throws {
        let f = try BootstrapFixture.load().classification
        let runs = f.runs.map { (scores: $0, targets: f.targets) }
        let ci = try #require(ClassificationConfidence.bootstrap(names: f.names, multiClass: false, runs: runs, draws: f.draws.flatMap { $0 }, unit: "image"))
        #expect(ci.resamples == f.draws.count && ci.unit == "image")
        close(ci.mean, f.mean, "mean AUC")
        for name in f.names { close(ci.perLabel[name], f.per_label[name]!, name) }
        // The rare label has no positive on some resamples: fewer values, still numpy's interval.
        #expect(f.defined["Rare"]! < f.draws.count)
    }

    @Test("accuracy: the interval and each class's equal numpy's")
    func accuracy() throws {
        let f = try BootstrapFixture.load().accuracy
        let ci = try #require(ClassificationConfidence.bootstrap(names: f.names, multiClass: true, runs: [(scores: f.scores, targets: f.targets)],
                                                                 draws: f.draws.flatMap { $0 }, unit: "image"))
        close(ci.mean, f.mean, "accuracy")
        for name in f.names { close(ci.perLabel[name], f.per_label[name]!, name) }
    }

    @Test("retrieval's mean over categories, queries resampled within each: numpy's interval")
    func stratified() throws {
        let f = try BootstrapFixture.load()
        let ci = Bootstrap.stratifiedMean(f.stratified.strata, resamples: f.resamples, draws: f.stratified.draws.map { $0.flatMap { $0 } })
        close(ci, f.stratified.interval, "stratified mean")
    }

    @Test("percentiles as numpy's linear interpolation; the seeded draws are reproducible and cover the range")
    func percentilesAndDraws() {
        let values = [1.0, 2, 4, 8, 16]
        #expect(Bootstrap.percentile(sorted: values, 0) == 1 && Bootstrap.percentile(sorted: values, 100) == 16)
        #expect(Bootstrap.percentile(sorted: values, 2.5) == 1.1)        // h = 0.1
        #expect(Bootstrap.percentile(sorted: values, 62.5) == 6)         // h = 2.5: halfway from 4 to 8
        let a = Bootstrap.draws(count: 50, resamples: 40), b = Bootstrap.draws(count: 50, resamples: 40)
        #expect(a == b && a.allSatisfy { (0..<50).contains($0) } && Set(a).count == 50)
        #expect(Bootstrap.draws(count: 50, resamples: 40, seed: 1) != a)
    }
}

@Suite("Evaluation manifests")
struct EvaluationManifestTests {
    @Test("SHA-256 of the FIPS 180-4 examples and of a multi-block input (Python's hashlib)")
    func sha256() {
        #expect(SHA256.hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256.hex([UInt8]()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256.hex(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        // hashlib.sha256(bytes(range(256)) * 3).hexdigest()
        #expect(SHA256.hex((0..<768).map { UInt8($0 % 256) }) == "f3a25aa93aa2fbba28d79260535bbd6a5eb0fc1c24a8b0f04e12b484c1dfe363")
    }

    @Test("one id changed changes its split's hash; ids are relative to the root however it is written; differences name the split and the checkpoint")
    func differences() throws {
        let ids = ["a/1.jpg", "a/2.jpg", "b/3.jpg"], labels: [[Float]] = [[1, 0], [0, 1], [0, 0]]
        let split = SplitHash.split(ids: ids, labels: labels)
        #expect(split.count == 3 && split != SplitHash.split(ids: ["a/1.jpg", "a/2.jpg", "b/4.jpg"], labels: labels))
        #expect(split != SplitHash.split(ids: ids, labels: [[1, 0], [0, 1], [1, 0]]))
        #expect(SplitHash.relative("/data/x/a/1.jpg", to: "/data/x/") == "a/1.jpg" && SplitHash.relative("/data/x/a/1.jpg", to: "/data/./x") == "a/1.jpg")
        let checkpoint = EvaluationManifest.Checkpoint(path: "run/checkpoints/step-00000020", step: 20, manifestChecksum: "3ca277cf")
        let pinned = EvaluationManifest(command: "eval linear", settings: ["runs": "5"], splits: ["train": split, "test": split], seeds: [0],
                                        checkpoint: checkpoint, program: "convirt", precision: "fp32")
        var other = pinned
        other.splits["test"] = SplitHash.split(ids: Array(ids.dropLast()), labels: Array(labels.dropLast()))
        other.checkpoint?.step = 10
        let found = pinned.differences(other)
        #expect(found.count == 2 && found[0].hasPrefix("test: 3 ids, sha256 ") && found[0].contains("; 2 ids, sha256 ")
                && found[1].hasPrefix("checkpoint: step 20"), "\(found)")
        #expect(pinned.differences(pinned).isEmpty)
        // The checksum covers every field; the file name follows the results file's.
        let sealed = try pinned.sealed()
        var edited = sealed
        edited.settings["runs"] = "1"
        #expect(try sealed.computedChecksum() == sealed.checksum && edited.computedChecksum() != sealed.checksum)
        #expect(EvaluationManifest.path(forResults: "run/eval/linear-chexpert.json") == "run/eval/linear-chexpert.manifest.json")
    }
}
