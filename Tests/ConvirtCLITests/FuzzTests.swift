// Mutated files of every kind the program reads: each parse ends in a result or a ConvirtError naming
// the problem, never a signal (a trap ends this test process, failing the run), never a hang (the whole
// run is bounded in time). Seeded, so a failure reproduces; CONVIRT_FUZZ_CASES sets the cases per kind
// (CI: 40, so about 640 in all; run with 1000 for 16,000).

import ConvirtCore
import ConvirtData
import ConvirtIO
import ConvirtModels
import ConvirtText
import ConvirtTraining
import Foundation
import Testing

struct Mutator {
    let stream: RandomStream
    var draw: UInt64 = 0

    mutating func next(_ bound: Int) -> Int {
        draw += 1
        return stream.integer(below: max(1, bound), at: draw)
    }

    /// One of: flipped bytes, a truncation, inserted random bytes, a run of 0xFF (huge numbers), a
    /// duplicated slice, or for text a stray quote, comma, newline or invalid UTF-8.
    mutating func mutate(_ input: Data) -> Data {
        var d = [UInt8](input)
        guard !d.isEmpty else { return Data([0xFF]) }
        switch next(7) {
        case 0:
            for _ in 0...next(4) { d[next(d.count)] ^= UInt8(1 + next(255)) }
        case 1:
            d = Array(d.prefix(next(d.count)))
        case 2:
            let at = next(d.count + 1)
            d.insert(contentsOf: (0..<(1 + next(16))).map { _ in UInt8(next(256)) }, at: at)
        case 3:
            let at = next(d.count)
            for i in at..<min(d.count, at + 8) { d[i] = 0xFF }
        case 4:
            let a = next(d.count), n = min(d.count - a, 1 + next(64))
            d.insert(contentsOf: d[a..<(a + n)], at: next(d.count + 1))
        case 5:
            d.insert(contentsOf: [[UInt8(ascii: "\"")], [UInt8(ascii: ",")], [UInt8(ascii: "\n")], [0xC3, 0x28], [0xFF, 0xFE]][next(5)], at: next(d.count + 1))
        default:
            // A digit changed in a number (JSON headers, CSV values, manifests).
            let digits = d.indices.filter { d[$0] >= 48 && d[$0] <= 57 }
            if let i = digits.isEmpty ? nil : digits[next(digits.count)] { d[i] = UInt8(48 + next(10)) } else { d[next(d.count)] ^= 0x20 }
        }
        return Data(d)
    }
}

@Suite("Fuzz: mutated files", .serialized)
struct FuzzTests {
    static let cases = Int(ProcessInfo.processInfo.environment["CONVIRT_FUZZ_CASES"] ?? "") ?? 40

    struct Tally: CustomStringConvertible {
        var parsed = 0, refused = 0
        var other: [String] = []
        var description: String { "\(parsed) parsed, \(refused) refused with a ConvirtError, \(other.count) other errors \(other.prefix(3))" }
    }

    /// Runs `parse` on `cases` mutations of `seed`; a thrown error must be a ConvirtError.
    func fuzz(_ name: String, _ seed: Data, salt: UInt64, _ parse: (Data) throws -> Void) -> Tally {
        var mutator = Mutator(stream: RandomStream(seed: 0xF022 ^ salt))
        var tally = Tally()
        for _ in 0..<Self.cases {
            let input = mutator.mutate(seed)
            do { try parse(input); tally.parsed += 1 }
            catch is ConvirtError { tally.refused += 1 }
            catch { tally.other.append("\(name): \(type(of: error)): \(error)") }
        }
        return tally
    }

    static var fixtures: URL { URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent() }

    @Test("mutated images, safetensors, CSV.gz, reports, vocabularies and manifests: results or clear errors, never a signal")
    func mutatedFiles() throws {
        let start = Date()
        let dir = SharedRuns.shared.dir + "/fuzz"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let gradient = GrayImage(width: 40, height: 30, pixels: (0..<1200).map { Float($0 % 40) / 39 })
        var tallies: [String: Tally] = [:]
        tallies["jpeg"] = fuzz("jpeg", try JPEG.encode(gradient), salt: 1) { _ = try JPEG.decodeGray($0) }
        tallies["png"] = fuzz("png", try Data(contentsOf: Self.fixtures.appendingPathComponent("ConvirtIOTests/Fixtures/palette2.png")), salt: 2) {
            _ = try PNG.decodeGray($0)
        }
        let dicomFixtures = ["jpeg_baseline_8bit.dcm", "explicit_16bit_signed.dcm", "nested_sequence_implicit.dcm"]
        for (k, name) in dicomFixtures.enumerated() {
            let seed = try Data(contentsOf: Self.fixtures.appendingPathComponent("ConvirtIOTests/Fixtures/dicom/\(name)"))
            tallies["dicom \(name)"] = fuzz("dicom", seed, salt: 3 + UInt64(k)) { _ = try DICOM.decodeGray($0) }
        }
        tallies["safetensors"] = fuzz("safetensors", try Data(contentsOf: Self.fixtures.appendingPathComponent("ConvirtModelsTests/Fixtures/bert_tiny.safetensors")),
                                      salt: 7) { data in
            let file = try SafeTensorsFile(data: data)
            for name in file.names { _ = try? file.floats(name) }
        }
        let csv = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema\nCheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg,Male,60,Frontal,AP,,1.0,-1.0\n"
            + "\"CheXpert-v1.0-small/train/patient2/study1/view1_frontal.jpg\",Female,41,Frontal,PA,1.0,,0.0\n"
        tallies["csv.gz"] = fuzz("csv.gz", try Gzip.compress(Data(csv.utf8)), salt: 8) { data in
            let text = String(decoding: try Gzip.decompress(data), as: UTF8.self)
            _ = try CSVTable(text: text, path: "train.csv", required: ["Path"])
        }
        tallies["csv"] = fuzz("csv", Data(csv.utf8), salt: 12) { data in
            guard let text = String(data: data, encoding: .utf8) else { throw ConvirtError("train.csv is not UTF-8") }
            let table = try CSVTable(text: text, path: "train.csv", required: ["Path"])
            for row in table.rows { _ = table.value(row, "Edema") }
        }
        let report = "FINAL REPORT\nFINDINGS: The heart is mildly enlarged. No pleural effusion or pneumothorax.\nIMPRESSION: Mild cardiomegaly, no acute process.\n"
        tallies["report"] = fuzz("report", Data(report.utf8), salt: 9) { data in
            guard let text = String(data: data, encoding: .utf8) else { throw ConvirtError("report is not valid UTF-8") }
            _ = ReportSections.sentences(text)
        }
        let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nheart\n##s\nis\nnormal\n.\n"
        tallies["vocab"] = fuzz("vocab", Data(vocab.utf8), salt: 10) { data in
            let path = "\(dir)/vocab.txt"
            try data.write(to: URL(fileURLWithPath: path))
            let tokenizer = try WordPieceTokenizer(vocabularyPath: path, lowercase: true)
            _ = tokenizer.encode("The hearts is normal.", maxLength: 16)
        }
        // A real manifest, mutated in place and read as resume and verify read it.
        let run = "\(dir)/run"
        if !FileManager.default.fileExists(atPath: "\(run)/checkpoints/latest") {
            let r = try ConvirtCLITests.run(convirtPath(), ["train", "--data", try SharedRuns.shared.data(), "--run-dir", run, "--preset", "tiny",
                                                            "--steps", "2", "--retrieval-eval", "0"])
            #expect(r.status == 0, "\(r.output)")
        }
        let checkpoint = "\(run)/checkpoints/step-00000002"
        let manifest = try Data(contentsOf: URL(fileURLWithPath: "\(checkpoint)/manifest.json"))
        let original = try Checkpoints.manifest(checkpoint).computedChecksum()
        var unchanged = true
        tallies["manifest"] = fuzz("manifest", manifest, salt: 11) { data in
            try data.write(to: URL(fileURLWithPath: "\(checkpoint)/manifest.json"))
            // One that still reads must say what the original says (a change of layout or spacing only).
            if try Checkpoints.manifest(checkpoint).computedChecksum() != original { unchanged = false }
        }
        #expect(unchanged, "a mutated manifest with other content was accepted")
        try manifest.write(to: URL(fileURLWithPath: "\(checkpoint)/manifest.json"))

        // Parity fixtures: bytes mutated, and tensors made NaN or given another shape (a report must then fail).
        for (k, name) in ["bert_tiny_bf16", "resnet_tiny_eval"].enumerated() {
            let path = Self.fixtures.appendingPathComponent("ConvirtModelsTests/Fixtures/\(name).safetensors").path
            tallies["parity \(name) bytes"] = fuzz("parity", try Data(contentsOf: URL(fileURLWithPath: path)), salt: 13 + UInt64(k)) { data in
                let copy = "\(dir)/fixture.safetensors"
                try data.write(to: URL(fileURLWithPath: copy))
                _ = try Parity.run(path: copy)
            }
            var passedWrongly: [String] = []
            tallies["parity \(name) tensors"] = try fuzzTensors(path, salt: 15 + UInt64(k), dir: dir) { copy, what in
                // A damaged reference (an output, a gradient, PyTorch's fp32 result) never passes; a NaN in an
                // input may legitimately reach nothing (an output weight of a channel no ReLU lets through).
                if try Parity.run(path: copy).passed && !what.contains(" in input.") { passedWrongly.append(what) }
            }
            #expect(passedWrongly.isEmpty, "\(name): a fixture with \(passedWrongly.prefix(3)) passed")
        }
        // Image weights with statistics out of range, NaN or infinite values: refused when loaded, naming the tensor.
        let export = "\(dir)/export"
        if !FileManager.default.fileExists(atPath: "\(export)/image_encoder.safetensors") {
            let e = try ConvirtCLITests.run(convirtPath(), ["checkpoint", "export", run, "--out", export])
            #expect(e.status == 0, "\(e.output)")
        }
        var acceptedBad: [String] = []
        tallies["image weights"] = try fuzzStatistics("\(export)/image_encoder.safetensors", salt: 17, dir: dir) { copy, bad in
            var layout = ParameterLayout()
            _ = try ResNet(config: ConVIRTConfig.preset(.tiny).image, layout: &layout)
            do {
                try Weights.load(SafeTensorsFile(path: copy), into: ParameterArena(layout: layout))
                acceptedBad.append(bad)
            } catch let error as ConvirtError {
                if !error.message.contains(bad.components(separatedBy: " ")[0]) { acceptedBad.append("\(bad) (the error names another tensor: \(error))") }
                throw error
            }
        }
        #expect(acceptedBad.isEmpty, "image weights accepted or misnamed: \(acceptedBad.prefix(3))")

        let seconds = Date().timeIntervalSince(start)
        for (name, tally) in tallies.sorted(by: { $0.key < $1.key }) {
            #expect(tally.other.isEmpty, "\(name): \(tally)")
            print("fuzz \(name): \(tally)")
        }
        #expect(seconds < 30 * Double(Self.cases) / 40 + 60, "the fuzz run took \(seconds) s: something is slow or hangs")
    }

    /// `cases` copies of the safetensors file at `path`, each with one tensor replaced: all NaN, one NaN,
    /// shrunk to [0], or grown by some elements; `check` gets the copy and what was done to it.
    func fuzzTensors(_ path: String, salt: UInt64, dir: String, _ check: (String, String) throws -> Void) throws -> Tally {
        let file = try SafeTensorsFile(path: path)
        let floats = file.names.filter { !$0.hasPrefix("param.") && file.info($0)?.dtype != .i64 && file.info($0)?.dtype != .i32 }
        var mutator = Mutator(stream: RandomStream(seed: 0xF022 ^ salt))
        var tally = Tally()
        for _ in 0..<Self.cases {
            let target = floats[mutator.next(floats.count)], kind = mutator.next(4)
            var writer = SafeTensorsWriter(metadata: file.metadata)
            for name in file.names {
                if file.info(name)?.dtype == .i64 || file.info(name)?.dtype == .i32 { try writer.add(name, try file.int32s(name)); continue }
                var t = try file.floats(name)
                if name == target {
                    switch kind {
                    case 0: t = try Tensor(shape: t.shape, [Float](repeating: .nan, count: t.count))
                    case 1: t[flat: mutator.next(t.count)] = .nan
                    case 2: t = Tensor(shape: [0])
                    default: t = Tensor(shape: [t.count + 1 + mutator.next(64)])
                    }
                }
                try writer.add(name, t)
            }
            let copy = "\(dir)/tensors.safetensors"
            try writer.write(to: copy)
            let what = ["all NaN", "one NaN", "shape [0]", "more elements"][kind] + " in \(target)"
            do { try check(copy, what); tally.parsed += 1 } catch is ConvirtError { tally.refused += 1 } catch { tally.other.append("\(what): \(error)") }
        }
        return tally
    }

    /// `cases` copies of an image encoder's weights with one statistic or weight out of range: a running
    /// variance negative, NaN or infinite, a running mean or a weight NaN or infinite; `check` gets the
    /// copy and "<tensor> <what>" (it must refuse it).
    func fuzzStatistics(_ path: String, salt: UInt64, dir: String, _ check: (String, String) throws -> Void) throws -> Tally {
        let file = try SafeTensorsFile(path: path)
        var mutator = Mutator(stream: RandomStream(seed: 0xF022 ^ salt))
        var tally = Tally()
        let variances = file.names.filter { $0.hasSuffix("running_var") }, others = file.names.filter { !$0.hasSuffix("running_var") && !$0.hasSuffix("num_batches_tracked") }
        for _ in 0..<Self.cases {
            let statistic = mutator.next(2) == 0
            let target = statistic ? variances[mutator.next(variances.count)] : others[mutator.next(others.count)]
            let values: [Float] = statistic ? [-1, -1e-12, .nan, .infinity, -.infinity] : [.nan, .infinity, -.infinity]
            let value = values[mutator.next(values.count)]
            var writer = SafeTensorsWriter(metadata: file.metadata)
            for name in file.names {
                var t = try file.floats(name)
                if name == target { t[flat: mutator.next(t.count)] = value }
                try writer.add(name, t)
            }
            let copy = "\(dir)/weights.safetensors"
            try writer.write(to: copy)
            let what = "\(target) set to \(value)"
            do { try check(copy, what); tally.parsed += 1 } catch is ConvirtError { tally.refused += 1 } catch { tally.other.append("\(what): \(error)") }
        }
        return tally
    }
}
