// `convirt parity FIXTURE`: runs our model on a PyTorch parity fixture (DESIGN.md, Files) and reports
// the max relative error of every output and gradient.

import ConvirtCore
import ConvirtIO
import Foundation

public struct ParityReport {
    public struct Line { public let name: String; public let error: Double; public let limit: Double; public var ok: Bool { error <= limit } }
    public var model: String
    public var lines: [Line] = []
    public var passed: Bool { !lines.isEmpty && lines.allSatisfy(\.ok) }
}

public enum Parity {
    public static let outputLimit = 1e-4
    public static let gradientLimit = 1e-3

    /// max |a - b| / max(max |b|, floor). The floor (1e-5 of the largest gradient in the fixture)
    /// only matters for tensors that are zero in exact arithmetic, such as the gradient of attention's
    /// key bias (softmax ignores a constant added to every score), where both sides are rounding noise.
    static func relativeError(_ a: UnsafePointer<Float>, _ b: Tensor<Float>, floor: Double = 1e-30) -> Double {
        // A non-finite value on either side is a failure (infinite error), never a pass.
        b.withUnsafeBufferPointer { ref in
            var diff = 0.0, scale = floor
            for i in 0..<ref.count {
                guard a[i].isFinite && ref[i].isFinite else { return .infinity }
                diff = max(diff, abs(Double(a[i]) - Double(ref[i])))
                scale = max(scale, abs(Double(ref[i])))
            }
            return diff / scale
        }
    }

    static func config<T: Decodable>(_ file: SafeTensorsFile, _ type: T.Type) throws -> T {
        guard let json = file.metadata["config"] else { throw ConvirtError("\(file.path): no config in the fixture's metadata") }
        do { return try JSONDecoder().decode(T.self, from: Data(json.utf8)) } catch {
            throw ConvirtError("\(file.path): invalid \(T.self) config: \(error)")
        }
    }

    /// Runs the fixture; with `dumpPath`, also writes our gradients as `grad.<name>` there (to inspect
    /// differences element by element).
    public static func run(path: String, dumpPath: String? = nil) throws -> ParityReport {
        dump = dumpPath
        defer { dump = nil }
        let file = try SafeTensorsFile(path: path)
        guard let model = file.metadata["model"] else { throw ConvirtError("\(path): no model in the fixture's metadata") }
        let training = file.metadata["train"] == "true"
        switch model {
        case "resnet": return try resnet(file, training: training)
        case "bert": return try bert(file, training: training)
        case "convirt": return try convirt(file, training: training)
        default: throw ConvirtError("\(path): unknown model \(model) (resnet, bert or convirt)")
        }
    }

    static func noDropout(_ c: BertConfig) -> BertConfig {
        var c = c
        c.hiddenDropoutProb = 0
        c.attentionProbsDropoutProb = 0
        return c
    }

    /// Compares arena gradients with every `grad.<name>` and checks that exactly the trainable entries have one.
    nonisolated(unsafe) static var dump: String?

    static func compareGradients(_ file: SafeTensorsFile, _ arena: ParameterArena, report: inout ParityReport) throws {
        if let dump {
            var writer = SafeTensorsWriter()
            for entry in arena.layout.entries where entry.kind == .trainable { try writer.add("grad.\(entry.name)", arena.gradient(entry.name)) }
            try writer.write(to: dump)
        }
        var largest = 0.0
        for name in file.names where name.hasPrefix("grad.") {
            largest = max(largest, try file.floats(name).scalars.reduce(0) { max($0, Double(abs($1))) })
        }
        let floor = max(largest * 1e-5, 1e-30)
        for entry in arena.layout.entries where entry.kind != .buffer {
            let name = "grad.\(entry.name)"
            guard file.info(name) != nil else {
                if entry.kind == .trainable { throw ConvirtError("\(file.path): no \(name), but \(entry.name) is trainable here (frozen layers differ?)") }
                continue
            }
            if entry.kind == .frozen { throw ConvirtError("\(file.path): has \(name), but \(entry.name) is frozen here") }
            report.lines.append(.init(name: name, error: relativeError(arena.grads + entry.offset, try file.floats(name), floor: floor), limit: gradientLimit))
        }
    }

    static func images(_ file: SafeTensorsFile) throws -> Tensor<Float> {
        let images = try file.floats("input.images")
        try images.expectRank(4, "\(file.path): input.images", axes: "[B, 3, H, W]")
        try require(images.shape[1] == 3 && images.shape[2] == images.shape[3], file.path, "input.images must be [B, 3, S, S]")
        return images
    }

    static func resnet(_ file: SafeTensorsFile, training: Bool) throws -> ParityReport {
        let config = try config(file, ResNetConfig.self)
        var layout = ParameterLayout()
        let net = try ResNet(config: config, layout: &layout)
        let arena = ParameterArena(layout: layout)
        try Weights.load(file, into: arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad."])
        let x = try images(file)
        let context = PassContext(training: training)
        let features = try x.withUnsafeBufferPointer { try net.forward(arena, images: $0.baseAddress!, batch: x.shape[0], size: x.shape[2], context: context) }
        var report = ParityReport(model: "resnet")
        report.lines.append(.init(name: "output.features", error: relativeError(features, try file.floats("output.features")), limit: outputLimit))
        arena.zeroGrads()
        try file.floats("input.output_weights").withUnsafeBufferPointer { try net.backward(arena, gradFeatures: $0.baseAddress!, context: context) }
        try compareGradients(file, arena, report: &report)
        return report
    }

    static func tokens(_ file: SafeTensorsFile) throws -> (Tensor<Int32>, Tensor<Int32>) {
        let ids = try file.int32s("input.input_ids"), mask = try file.int32s("input.attention_mask")
        try ids.expectRank(2, "\(file.path): input.input_ids", axes: "[B, T]")
        try mask.expectShape(ids.shape, "\(file.path): input.attention_mask")
        return (ids, mask)
    }

    static func bert(_ file: SafeTensorsFile, training: Bool) throws -> ParityReport {
        let config = noDropout(try config(file, BertConfig.self))
        var layout = ParameterLayout()
        let net = try BERT(config: config, layout: &layout)
        let arena = ParameterArena(layout: layout)
        try Weights.load(file, into: arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad."])
        let (ids, mask) = try tokens(file)
        let context = PassContext(training: training)
        let hidden = try ids.withUnsafeBufferPointer { i in
            try mask.withUnsafeBufferPointer { m in try net.forward(arena, ids: i.baseAddress!, mask: m.baseAddress!, batch: ids.shape[0], tokens: ids.shape[1], context: context) }
        }
        var report = ParityReport(model: "bert")
        report.lines.append(.init(name: "output.last_hidden_state", error: relativeError(hidden, try file.floats("output.last_hidden_state")), limit: outputLimit))
        arena.zeroGrads()
        try file.floats("input.output_weights").withUnsafeBufferPointer { try net.backward(arena, gradLastHidden: $0.baseAddress!, context: context) }
        try compareGradients(file, arena, report: &report)
        return report
    }

    static func convirt(_ file: SafeTensorsFile, training: Bool) throws -> ParityReport {
        var config = try config(file, ConVIRTConfig.self)
        config.text = noDropout(config.text)
        let model = try ConVIRTModel(config: config)
        try Weights.load(file, into: model.arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad."])
        let x = try images(file)
        let (ids, mask) = try tokens(file)
        let b = x.shape[0], d = config.projDim
        try require(ids.shape[0] == b, file.path, "images and texts have different batch sizes")
        let context = PassContext(training: training)
        let v = try x.withUnsafeBufferPointer { try model.encodeImages($0.baseAddress!, batch: b, size: x.shape[2], context: context) }
        let u = try ids.withUnsafeBufferPointer { i in
            try mask.withUnsafeBufferPointer { m in try model.encodeTexts(ids: i.baseAddress!, mask: m.baseAddress!, batch: b, tokens: ids.shape[1], context: context) }
        }
        var report = ParityReport(model: "convirt")
        report.lines.append(.init(name: "output.image_embeddings", error: relativeError(v, try file.floats("output.image_embeddings")), limit: outputLimit))
        report.lines.append(.init(name: "output.text_embeddings", error: relativeError(u, try file.floats("output.text_embeddings")), limit: outputLimit))
        var gradV = [Float](repeating: 0, count: b * d), gradU = gradV
        let value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: b, globalRows: b, features: d, offset: 0,
                                                tau: config.tau, lambda: config.lambda, gradV: &gradV, gradU: &gradU, workspace: .init())
        let expectedLoss = try file.floats("output.loss").scalars[0]
        report.lines.append(.init(name: "output.loss", error: abs(value.loss - Double(expectedLoss)) / max(abs(Double(expectedLoss)), 1e-30), limit: outputLimit))
        model.arena.zeroGrads()
        try model.backwardImages(gradEmbeddings: gradV, context: context)
        try model.backwardTexts(gradEmbeddings: gradU, context: context)
        try compareGradients(file, model.arena, report: &report)
        return report
    }
}
