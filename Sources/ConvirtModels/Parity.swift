// `convirt parity FIXTURE`: runs our model on a PyTorch parity fixture (DESIGN.md, Files) and reports
// the max relative error of every output and gradient.

import ConvirtCore
import ConvirtIO
import Foundation

public struct ParityReport {
    public struct Line {
        public let name: String
        public let error: Double
        public let limit: Double
        /// In a bf16 fixture with PyTorch's fp32 results beside it: how far autocast itself moved the tensor.
        public var ownDeviation: Double? = nil
        public var ok: Bool { error <= limit }
    }
    public var model: String
    /// The fixture's precision (its `precision` metadata; fp32 when absent).
    public var precision = Precision.fp32
    public var lines: [Line] = []
    public var passed: Bool { !lines.isEmpty && lines.allSatisfy(\.ok) }
}

public enum Parity {
    public static let outputLimit = 1e-4
    public static let gradientLimit = 1e-3
    /// bf16 fixtures (the reference under torch.autocast("cpu", torch.bfloat16)): both sides round the
    /// inputs of every product to bf16 (8 significant bits, a relative step of 2^-8 = 3.9e-3), and PyTorch
    /// also rounds every activation between layers to bf16, so they differ by a few such steps per layer
    /// on the way up, and more on the way down. Measured on the committed bf16 fixtures (an eval-mode
    /// basic ResNet at 64 px, tiny BERT, tiny ConVIRT): outputs at most 8.0e-3 apart (PyTorch's own bf16
    /// is 3.3e-3 to 6.5e-3 from its fp32 on them), BERT's gradients at most 4.0e-3. Random tiny ResNets' gradients are
    /// another matter: decided by a few ReLU and max-pool positions that bf16 flips, PyTorch's autocast
    /// moves some of them by 20-90% of their largest value from its own fp32 (train-mode BatchNorm over
    /// three images: by 100% and more), and ours are as far; those tensors get the widened limit below.
    public static let bf16OutputLimit = 2e-2
    public static let bf16GradientLimit = 5e-2

    /// A bf16 fixture from tools/make_parity_fixture.py --bf16 also holds PyTorch's fp32 results
    /// (`fp32.<name>`). Where autocast itself moves a tensor by more than the limit (a small random network
    /// whose gradients hinge on ReLU and max-pool decisions that bf16 rounding flips, or a BatchNorm over
    /// a handful of values), that tensor is determined by bf16 only to within PyTorch's own deviation, and
    /// is compared at `ownDeviationFactor` times it: our rounding and PyTorch's are independent, so their
    /// difference is about sqrt(2) times either one's distance from fp32.
    public static let ownDeviationFactor = 3.0

    static func limits(_ precision: Precision) -> (output: Double, gradient: Double) {
        precision == .bf16 ? (bf16OutputLimit, bf16GradientLimit) : (outputLimit, gradientLimit)
    }

    /// The comparison of our `values` with the fixture's `name`, against `base` (widened in bf16 as above).
    static func line(_ name: String, _ values: UnsafePointer<Float>, _ file: SafeTensorsFile, precision: Precision, base: Double,
                     floor: Double = 1e-30) throws -> ParityReport.Line {
        let reference = try file.floats(name)
        let error = relativeError(values, reference, floor: floor)
        guard precision == .bf16, file.info("fp32.\(name)") != nil else { return .init(name: name, error: error, limit: base) }
        let own = try file.floats("fp32.\(name)").withUnsafeBufferPointer { relativeError($0.baseAddress!, reference, floor: floor) }
        return .init(name: name, error: error, limit: max(base, ownDeviationFactor * own), ownDeviation: own)
    }

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
    /// `precision` overrides the fixture's (an fp32 fixture run in bf16 shows how far bf16 is from exact).
    public static func run(path: String, dumpPath: String? = nil, precision override: Precision? = nil) throws -> ParityReport {
        dump = dumpPath
        defer { dump = nil }
        let file = try SafeTensorsFile(path: path)
        guard let model = file.metadata["model"] else { throw ConvirtError("\(path): no model in the fixture's metadata") }
        let training = file.metadata["train"] == "true"
        let fixturePrecision = try file.metadata["precision"].map { value -> Precision in
            guard let p = Precision(rawValue: value) else { throw ConvirtError("\(path): unknown precision \(value) (fp32 or bf16)") }
            return p
        } ?? .fp32
        let precision = override ?? fixturePrecision
        var report: ParityReport
        switch model {
        case "resnet": report = try resnet(file, training: training, precision: precision)
        case "bert": report = try bert(file, training: training, precision: precision)
        case "convirt": report = try convirt(file, training: training, precision: precision)
        default: throw ConvirtError("\(path): unknown model \(model) (resnet, bert or convirt)")
        }
        report.precision = precision
        return report
    }

    static func noDropout(_ c: BertConfig) -> BertConfig {
        var c = c
        c.hiddenDropoutProb = 0
        c.attentionProbsDropoutProb = 0
        return c
    }

    /// Compares arena gradients with every `grad.<name>` and checks that exactly the trainable entries have one.
    nonisolated(unsafe) static var dump: String?

    static func compareGradients(_ file: SafeTensorsFile, _ arena: ParameterArena, precision: Precision, report: inout ParityReport) throws {
        if let dump {
            var writer = SafeTensorsWriter()
            for entry in arena.layout.entries where entry.kind == .trainable { try writer.add("grad.\(entry.name)", arena.gradient(entry.name)) }
            try writer.write(to: dump)
        }
        var largest = 0.0
        for name in file.names where name.hasPrefix("grad.") {
            largest = max(largest, try file.floats(name).scalars.reduce(0) { max($0, Double(abs($1))) })
        }
        // bf16: rounding noise is 2^-8 of the magnitudes summed, so a tensor that is zero in exact
        // arithmetic carries noise near 1e-3 of the largest gradient instead of 1e-5.
        let floor = max(largest * (precision == .bf16 ? 2e-3 : 1e-5), 1e-30)
        for entry in arena.layout.entries where entry.kind != .buffer {
            let name = "grad.\(entry.name)"
            guard file.info(name) != nil else {
                if entry.kind == .trainable { throw ConvirtError("\(file.path): no \(name), but \(entry.name) is trainable here (frozen layers differ?)") }
                continue
            }
            if entry.kind == .frozen { throw ConvirtError("\(file.path): has \(name), but \(entry.name) is frozen here") }
            report.lines.append(try line(name, arena.grads + entry.offset, file, precision: precision, base: limits(precision).gradient, floor: floor))
        }
    }

    static func images(_ file: SafeTensorsFile) throws -> Tensor<Float> {
        let images = try file.floats("input.images")
        try images.expectRank(4, "\(file.path): input.images", axes: "[B, 3, H, W]")
        try require(images.shape[1] == 3 && images.shape[2] == images.shape[3], file.path, "input.images must be [B, 3, S, S]")
        return images
    }

    static func resnet(_ file: SafeTensorsFile, training: Bool, precision: Precision) throws -> ParityReport {
        let config = try config(file, ResNetConfig.self)
        var layout = ParameterLayout()
        let net = try ResNet(config: config, layout: &layout)
        let arena = ParameterArena(layout: layout)
        try Weights.load(file, into: arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad.", "fp32."])
        let x = try images(file)
        let context = PassContext(training: training, precision: precision)
        let features = try x.withUnsafeBufferPointer { try net.forward(arena, images: $0.baseAddress!, batch: x.shape[0], size: x.shape[2], context: context) }
        var report = ParityReport(model: "resnet")
        report.lines.append(try line("output.features", features, file, precision: precision, base: limits(precision).output))
        arena.zeroGrads()
        try file.floats("input.output_weights").withUnsafeBufferPointer { try net.backward(arena, gradFeatures: $0.baseAddress!, context: context) }
        try compareGradients(file, arena, precision: precision, report: &report)
        return report
    }

    static func tokens(_ file: SafeTensorsFile) throws -> (Tensor<Int32>, Tensor<Int32>) {
        let ids = try file.int32s("input.input_ids"), mask = try file.int32s("input.attention_mask")
        try ids.expectRank(2, "\(file.path): input.input_ids", axes: "[B, T]")
        try mask.expectShape(ids.shape, "\(file.path): input.attention_mask")
        return (ids, mask)
    }

    static func bert(_ file: SafeTensorsFile, training: Bool, precision: Precision) throws -> ParityReport {
        let config = noDropout(try config(file, BertConfig.self))
        var layout = ParameterLayout()
        let net = try BERT(config: config, layout: &layout)
        let arena = ParameterArena(layout: layout)
        try Weights.load(file, into: arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad.", "fp32."])
        let (ids, mask) = try tokens(file)
        let context = PassContext(training: training, precision: precision)
        let hidden = try ids.withUnsafeBufferPointer { i in
            try mask.withUnsafeBufferPointer { m in try net.forward(arena, ids: i.baseAddress!, mask: m.baseAddress!, batch: ids.shape[0], tokens: ids.shape[1], context: context) }
        }
        var report = ParityReport(model: "bert")
        report.lines.append(try line("output.last_hidden_state", hidden, file, precision: precision, base: limits(precision).output))
        arena.zeroGrads()
        try file.floats("input.output_weights").withUnsafeBufferPointer { try net.backward(arena, gradLastHidden: $0.baseAddress!, context: context) }
        try compareGradients(file, arena, precision: precision, report: &report)
        return report
    }

    static func convirt(_ file: SafeTensorsFile, training: Bool, precision: Precision) throws -> ParityReport {
        var config = try config(file, ConVIRTConfig.self)
        config.text = noDropout(config.text)
        let model = try ConVIRTModel(config: config)
        try Weights.load(file, into: model.arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad.", "fp32."])
        let x = try images(file)
        let (ids, mask) = try tokens(file)
        let b = x.shape[0], d = config.projDim
        try require(ids.shape[0] == b, file.path, "images and texts have different batch sizes")
        let context = PassContext(training: training, precision: precision)
        let v = try x.withUnsafeBufferPointer { try model.encodeImages($0.baseAddress!, batch: b, size: x.shape[2], context: context) }
        let u = try ids.withUnsafeBufferPointer { i in
            try mask.withUnsafeBufferPointer { m in try model.encodeTexts(ids: i.baseAddress!, mask: m.baseAddress!, batch: b, tokens: ids.shape[1], context: context) }
        }
        var report = ParityReport(model: "convirt")
        report.lines.append(try line("output.image_embeddings", v, file, precision: precision, base: limits(precision).output))
        report.lines.append(try line("output.text_embeddings", u, file, precision: precision, base: limits(precision).output))
        var gradV = [Float](repeating: 0, count: b * d), gradU = gradV
        let value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: b, globalRows: b, features: d, offset: 0,
                                                tau: config.tau, lambda: config.lambda, gradV: &gradV, gradU: &gradU, workspace: .init())
        var loss = [Float(value.loss)]
        report.lines.append(try line("output.loss", &loss, file, precision: precision, base: limits(precision).output))
        model.arena.zeroGrads()
        try model.backwardImages(gradEmbeddings: gradV, context: context)
        try model.backwardTexts(gradEmbeddings: gradU, context: context)
        try compareGradients(file, model.arena, precision: precision, report: &report)
        return report
    }
}
