// ResNet, BERT and the whole ConVIRT model against PyTorch (fixtures from tools/make_parity_fixture.py),
// and our parameter names against torchvision's and Hugging Face's.

import ConvirtCore
import ConvirtIO
import ConvirtModels
import Foundation
import Testing

func fixturePath(_ name: String) throws -> String {
    guard let url = Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil) else { throw ConvirtError("missing fixture \(name)") }
    return url.path
}

@Suite("Models against PyTorch")
struct ModelParityTests {
    /// Fixtures are computed by PyTorch in float64 from float32 parameters and inputs, so they measure our
    /// float32 rounding alone. Outputs agree to 1e-5; gradients to DESIGN.md's 1e-3 (in fact about 1e-4:
    /// training-mode BatchNorm over few values per channel amplifies rounding on the way down).
    @Test("parity fixtures: outputs within 1e-5, gradients within 1e-3",
          arguments: ["resnet_tiny_train", "resnet_tiny_eval", "resnet_basic_train", "bert_tiny", "convirt_tiny_train", "convirt_frozen3_train"])
    func parity(name: String) throws {
        let report = try Parity.run(path: fixturePath("\(name).safetensors"))
        #expect(report.lines.count > 10)
        for line in report.lines {
            let tight = line.name.hasPrefix("output.") ? 1e-5 : 1e-3
            #expect(line.error <= tight, "\(name) \(line.name): \(line.error)")
        }
        #expect(report.passed)
    }

    /// The reference models (`ReferenceResNet`, `ReferenceBERT`, `ReferenceConVIRT`), which the fast models
    /// are tested against, held to PyTorch themselves on the same fixtures and limits.
    @Test("parity fixtures with the reference models: outputs within 1e-5, gradients within 1e-3",
          arguments: ["resnet_tiny_train", "resnet_tiny_eval", "resnet_basic_train", "bert_tiny", "convirt_tiny_train", "convirt_frozen3_train"])
    func referenceParity(name: String) throws {
        let report = try Parity.run(path: fixturePath("\(name).safetensors"), reference: true)
        #expect(report.model.hasPrefix("reference ") && report.lines.count > 10)
        for line in report.lines {
            let tight = line.name.hasPrefix("output.") ? 1e-5 : 1e-3
            #expect(line.error <= tight, "\(name) \(line.name): \(line.error)")
        }
        #expect(report.passed)
        #expect(throws: ConvirtError.self) { try Parity.run(path: fixturePath("\(name).safetensors"), precision: .bf16, reference: true) }
    }

    /// bf16 fixtures (tools/make_parity_fixture.py --bf16): the reference under torch.autocast("cpu",
    /// torch.bfloat16), with PyTorch's fp32 results beside it. Each tensor is judged against fp32: ours no
    /// farther than 3x autocast's own distance (or the bf16 floor; gradients also within 3x autocast's
    /// farthest, its decision flips: Parity).
    @Test("bf16 parity: each tensor no farther from PyTorch's fp32 than 3x autocast's own distance",
          arguments: ["resnet_basic_eval_bf16", "bert_tiny_bf16", "convirt_tiny_eval_bf16"])
    func bf16Parity(name: String) throws {
        let report = try Parity.run(path: fixturePath("\(name).safetensors"))
        #expect(report.precision == .bf16 && report.lines.count > 30)
        #expect(report.passed, "\(name): \(report.lines.filter { !$0.ok }.map { "\($0.name) \($0.error)" })")
        for line in report.lines {
            let autocast = try #require(line.autocastDeviation, "\(name) \(line.name): judged against fp32")
            // Outputs: never widened by the fixture's flips.
            let floor = line.name.hasPrefix("output.") ? Parity.bf16OutputLimit : Parity.bf16GradientLimit
            if line.name.hasPrefix("output.") { #expect(line.error <= max(floor, Parity.autocastFactor * autocast), "\(name) \(line.name)") }
            #expect(line.error > 0, "\(name) \(line.name): bf16 moved it from fp32")
        }
        // The same fixture at fp32's limits fails: the reference really is bf16.
        let strict = try Parity.run(path: fixturePath("\(name).safetensors"), precision: .fp32)
        #expect(!strict.passed)
    }

    /// A copy of fixture `name` with tensor `replaced` replaced by `by(tensor)`, in a temporary file.
    func mutatedFixture(_ name: String, _ replaced: String, _ by: (Tensor<Float>) throws -> Tensor<Float>) throws -> String {
        let file = try SafeTensorsFile(path: fixturePath("\(name).safetensors"))
        var writer = SafeTensorsWriter(metadata: file.metadata)
        for tensor in file.names {
            if tensor.hasPrefix("input.input_ids") || tensor.hasPrefix("input.attention_mask") {
                try writer.add(tensor, try file.int32s(tensor))
            } else {
                let values = try file.floats(tensor)
                try writer.add(tensor, tensor == replaced ? try by(values) : values)
            }
        }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("parity-\(getpid())-\(name)-\(replaced).safetensors").path
        try writer.write(to: path)
        return path
    }

    @Test("a fixture config whose number does not fit names the key and the value", arguments: ["1e308", "-3", "2.5"])
    func configNumbers(width: String) throws {
        let file = try SafeTensorsFile(path: fixturePath("resnet_tiny_eval.safetensors"))
        var metadata = file.metadata
        metadata["config"] = metadata["config"]!.replacingOccurrences(of: #""width"\s*:\s*\d+"#, with: "\"width\": \(width)", options: .regularExpression)
        var writer = SafeTensorsWriter(metadata: metadata)
        for tensor in file.names { try writer.add(tensor, try file.floats(tensor)) }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("parity-\(getpid())-width-\(width).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try writer.write(to: path)
        #expect {
            _ = try Parity.run(path: path)
        } throws: { error in
            let message = "\(error)"
            return width == "-3" ? message.contains("width must be in 1...4096") : message.contains("width: ") && message.contains("is not")
        }
    }

    @Test("a bf16 fixture with a NaN reference, fp32 result or gradient fails (never an infinite limit that passes)",
          arguments: ["grad.encoder.layer.1.output.dense.weight", "fp32.grad.encoder.layer.1.output.dense.weight", "fp32.output.last_hidden_state"])
    func nonFiniteReference(tensor: String) throws {
        let path = try mutatedFixture("bert_tiny_bf16", tensor) { t in try Tensor(shape: t.shape, [Float](repeating: .nan, count: t.count)) }
        defer { try? FileManager.default.removeItem(atPath: path) }
        let report = try Parity.run(path: path)
        #expect(!report.passed)
        let name = tensor.hasPrefix("fp32.") ? String(tensor.dropFirst(5)) : tensor
        #expect(report.lines.contains { $0.name == name && !$0.ok }, "\(tensor)")
    }

    @Test("a reference of another shape is an error naming both shapes, in fp32 and bf16 fixtures",
          arguments: [("bert_tiny", "grad.encoder.layer.1.output.dense.weight"), ("bert_tiny_bf16", "fp32.grad.encoder.layer.0.intermediate.dense.bias"),
                      ("resnet_tiny_eval", "output.features"), ("resnet_tiny_eval", "input.output_weights")])
    func misshapenReference(fixture: String, tensor: String) throws {
        for shape in [[0], [4096]] {
            let path = try mutatedFixture(fixture, tensor) { _ in Tensor(shape: shape) }
            defer { try? FileManager.default.removeItem(atPath: path) }
            #expect {
                _ = try Parity.run(path: path)
            } throws: { error in
                let message = "\(error)"
                return message.contains(tensor) && message.contains("\(describe(shape: shape)) in the fixture")
            }
        }
    }

    @Test("fp32 fixtures run in bf16: outputs within bf16 rounding of the exact answer")
    func fp32FixturesInBF16() throws {
        for name in ["resnet_tiny_eval", "bert_tiny"] {
            let report = try Parity.run(path: fixturePath("\(name).safetensors"), precision: .bf16)
            for line in report.lines where line.name.hasPrefix("output.") {
                #expect(line.error <= Parity.bf16OutputLimit, "\(name) \(line.name): \(line.error)")
            }
        }
    }

    private func stateDict(_ file: String) throws -> [(String, [Int])] {
        try String(contentsOfFile: fixturePath(file), encoding: .utf8).split(separator: "\n").filter { !$0.hasPrefix("#") }.map { line in
            let parts = line.split(separator: " ")
            let shape = parts[1].dropFirst().dropLast().split(separator: ",").map { Int($0)! }
            return (String(parts[0]), shape)
        }
    }

    @Test("ResNet-50 has torchvision's parameter names and shapes, in its order")
    func resnet50Names() throws {
        var layout = ParameterLayout()
        let net = try ResNet(config: .resnet50, layout: &layout)
        #expect(net.featureCount == 2048)
        let expected = try stateDict("resnet50_state_dict.txt").filter { !$0.0.hasPrefix("fc.") && !$0.0.hasSuffix("num_batches_tracked") }
        #expect(layout.entries.map(\.name) == expected.map(\.0))
        #expect(layout.entries.map(\.shape) == expected.map(\.1))
        #expect(layout.entries.filter { $0.kind != .buffer }.reduce(0) { $0 + $1.count } == 25_557_032 - 2048 * 1000 - 1000)
    }

    @Test("BERT-base has Hugging Face's parameter names and shapes; freezing embeddings and 6 layers")
    func bertNames() throws {
        var layout = ParameterLayout()
        _ = try BERT(config: .clinicalBase, layout: &layout, prefix: "text.", frozenLayers: 6)
        let expected = try stateDict("bert_base_state_dict.txt").filter { !$0.0.hasPrefix("pooler.") }
        #expect(layout.entries.map(\.name) == expected.map { "text." + $0.0 })
        #expect(layout.entries.map(\.shape) == expected.map(\.1))
        let frozen = layout.entries.filter { $0.kind == .frozen }.map(\.name)
        #expect(frozen.contains("text.embeddings.word_embeddings.weight") && frozen.contains("text.encoder.layer.5.output.LayerNorm.bias"))
        #expect(!frozen.contains { $0.hasPrefix("text.encoder.layer.6.") })
    }
}

@Suite("Models on two threads")
struct ThreadedParityTests {
    @Test("the parity fixtures pass with the products and loops split over two threads")
    func twoThreads() throws {
        let previous = Parallel.threads
        Parallel.threads = 2
        defer { Parallel.threads = previous }
        for name in ["resnet_tiny_train", "bert_tiny", "convirt_tiny_train"] {
            let report = try Parity.run(path: fixturePath("\(name).safetensors"))
            #expect(report.passed, "\(name): \(report.lines.filter { !$0.ok }.map(\.name))")
        }
    }
}
