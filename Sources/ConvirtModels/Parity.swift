// `convirt parity FIXTURE`: runs our model on a PyTorch parity fixture (DESIGN.md, Files) and reports
// the max relative error of every output and gradient.

import ConvirtCore
import ConvirtIO
import Foundation

public struct ParityReport {
    public struct Line {
        public let name: String
        /// Our distance: from the reference (fp32 fixtures, and bf16 fixtures without PyTorch's fp32
        /// results), or from PyTorch's fp32 result (bf16 fixtures that hold it).
        public let error: Double
        public let limit: Double
        /// In a bf16 fixture with PyTorch's fp32 results beside it: autocast's own distance from them.
        public var autocastDeviation: Double? = nil
        /// A non-finite distance or limit (a NaN or infinity on either side) is a failure, never a pass.
        public var ok: Bool { error.isFinite && limit.isFinite && error <= limit }
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
    /// bf16 fixtures without PyTorch's fp32 results (compared with autocast's result itself): both sides
    /// round the inputs of every product to bf16 (8 significant bits, a relative step of 2^-8 = 3.9e-3),
    /// so they differ by a few such steps per layer on the way up, and more on the way down. Also the
    /// floor of the limits below (a distance this small passes whatever autocast's is).
    public static let bf16OutputLimit = 2e-2
    public static let bf16GradientLimit = 5e-2

    /// A bf16 fixture from tools/make_parity_fixture.py --bf16 also holds PyTorch's fp32 results
    /// (`fp32.<name>`), and each tensor is judged against them: our distance from fp32 against
    /// autocast's own, both relative to the fp32 tensor's largest magnitude. Where the two only round
    /// (both round the inputs of every product to bf16, autocast also every activation and gradient
    /// between layers, see `BF16`), their errors are noise of the same kind and size, ours from a subset
    /// of autocast's roundings; the largest of n such errors is 3 times another draw's largest with a
    /// probability below 5e-4 for n >= 16 elements (6e-3 for 8; smaller tensors have the floor). So ours
    /// may be `autocastFactor` times autocast's distance.
    public static let autocastFactor = 3.0

    /// But bf16 also flips decisions: a ReLU whose input lies within bf16's noise of zero, a max-pool
    /// window whose largest values round to a tie. A flipped decision moves a gradient by one of its
    /// terms, and every gradient below it; in a small random network (few images, few pixels in its last
    /// stages, BatchNorm over a handful of values) one flip moves gradients by tens of percent, and which
    /// decisions flip is chance, for autocast as for us (our rounding scheme run in PyTorch flips where
    /// ours does). Autocast's own largest distance over the fixture's gradients shows how far bf16's
    /// flips move this network's gradients; a gradient of ours is compared within `autocastFactor` times
    /// that as well. Outputs (forward, where a flip changes one value by bf16's noise) are not widened.
    static func limits(_ precision: Precision) -> (output: Double, gradient: Double) {
        precision == .bf16 ? (bf16OutputLimit, bf16GradientLimit) : (outputLimit, gradientLimit)
    }

    /// The comparison of our `values` (of `shape`) with the fixture's `name`, against `base` (in bf16 with
    /// PyTorch's fp32 result: against fp32, as above; `flips` is autocast's largest distance over the
    /// fixture's gradients, nil for outputs).
    static func line(_ name: String, _ values: UnsafePointer<Float>, shape: [Int], _ file: SafeTensorsFile, precision: Precision, base: Double,
                     floor: Double = 1e-30, flips: Double? = nil) throws -> ParityReport.Line {
        let reference = try tensor(file, name, shape: shape)
        guard precision == .bf16, file.info("fp32.\(name)") != nil else {
            return .init(name: name, error: relativeError(values, reference, floor: floor), limit: base)
        }
        let fp32 = try tensor(file, "fp32.\(name)", shape: shape)
        let autocast = reference.withUnsafeBufferPointer { relativeError($0.baseAddress!, fp32, floor: floor) }
        let limit = max(base, autocastFactor * autocast, autocastFactor * (flips ?? 0))
        return .init(name: name, error: relativeError(values, fp32, floor: floor), limit: limit, autocastDeviation: autocast)
    }

    /// The fixture's tensor `name`, which must have our `shape` (a reference of another shape is an
    /// error naming both, never a comparison of some of the values or a read past them).
    static func tensor(_ file: SafeTensorsFile, _ name: String, shape: [Int]) throws -> Tensor<Float> {
        let t = try file.floats(name)
        guard t.shape.reduce(1, *) == shape.reduce(1, *) && (t.shape == shape || t.shape.filter { $0 != 1 } == shape.filter { $0 != 1 }) else {
            throw ConvirtError("\(file.path): \(name) has shape \(describe(shape: t.shape)) in the fixture, \(describe(shape: shape)) here")
        }
        return t
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
        return try StrictJSON.decode(T.self, from: Data(json.utf8), source: "\(file.path): the \(T.self) in its metadata's config")
    }

    /// Runs the fixture; with `dumpPath`, also writes our gradients as `grad.<name>` there (to inspect
    /// differences element by element).
    /// `precision` overrides the fixture's (an fp32 fixture run in bf16 shows how far bf16 is from exact).
    /// `reference`: run the reference models (`ReferenceResNet`, `ReferenceBERT`, `ReferenceConVIRT`: the
    /// oracle the fast models are tested against, itself held to PyTorch here), fp32 only.
    public static func run(path: String, dumpPath: String? = nil, precision override: Precision? = nil,
                           reference: Bool = false) throws -> ParityReport {
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
        if reference && precision != .fp32 { throw ConvirtError("\(path): the reference models run in fp32 only, not \(precision.rawValue)") }
        var report: ParityReport
        switch model {
        case "resnet": report = try resnet(file, training: training, precision: precision, reference: reference)
        case "bert": report = try bert(file, training: training, precision: precision, reference: reference)
        case "convirt": report = try convirt(file, training: training, precision: precision, reference: reference)
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
        var compared: [(name: String, entry: ParameterLayout.Entry)] = []
        for entry in arena.layout.entries where entry.kind != .buffer {
            let name = "grad.\(entry.name)"
            guard file.info(name) != nil else {
                if entry.kind == .trainable { throw ConvirtError("\(file.path): no \(name), but \(entry.name) is trainable here (frozen layers differ?)") }
                continue
            }
            if entry.kind == .frozen { throw ConvirtError("\(file.path): has \(name), but \(entry.name) is frozen here") }
            compared.append((name, entry))
        }
        // bf16 with PyTorch's fp32 results: how far autocast's own flips move this network's gradients.
        var flips: Double? = nil
        if precision == .bf16 {
            for (name, entry) in compared where file.info("fp32.\(name)") != nil {
                let fp32 = try tensor(file, "fp32.\(name)", shape: entry.shape), autocast = try tensor(file, name, shape: entry.shape)
                let distance = autocast.withUnsafeBufferPointer { relativeError($0.baseAddress!, fp32, floor: floor) }
                flips = max(flips ?? 0, distance.isFinite ? distance : .infinity)
            }
        }
        for (name, entry) in compared {
            report.lines.append(try line(name, arena.grads + entry.offset, shape: entry.shape, file, precision: precision,
                                         base: limits(precision).gradient, floor: floor, flips: flips))
        }
    }

    static func images(_ file: SafeTensorsFile) throws -> Tensor<Float> {
        let images = try file.floats("input.images")
        try images.expectRank(4, "\(file.path): input.images", axes: "[B, 3, H, W]")
        try require(images.shape[1] == 3 && images.shape[2] == images.shape[3], file.path, "input.images must be [B, 3, S, S]")
        return images
    }

    /// The fixture's parameters (`param.<name>`) loaded into `arena`.
    static func loadParameters(_ file: SafeTensorsFile, into arena: ParameterArena) throws {
        try Weights.load(file, into: arena, sourcePrefixes: ["param."], ignoring: ["input.", "output.", "grad.", "fp32."])
    }

    /// The fixture's parameters in an arena of `layout`.
    static func parameters(_ file: SafeTensorsFile, _ layout: ParameterLayout) throws -> ParameterArena {
        let arena = ParameterArena(layout: layout)
        try loadParameters(file, into: arena)
        return arena
    }

    /// The fast ResNet, or with `reference` the plain `ReferenceResNet`, on the fixture.
    static func resnet(_ file: SafeTensorsFile, training: Bool, precision: Precision, reference: Bool) throws -> ParityReport {
        let config = try config(file, ResNetConfig.self)
        try config.validate()  // a config's sizes are refused before the inputs are read or anything is allocated
        let x = try images(file)
        let (batch, size) = (x.shape[0], x.shape[2])
        var layout = ParameterLayout()
        let forward: (ParameterArena, UnsafePointer<Float>, PassContext) throws -> UnsafePointer<Float>
        let backward: (ParameterArena, UnsafePointer<Float>, PassContext) throws -> Void
        if reference {
            let net = try ReferenceResNet(config: config, layout: &layout), activations = try net.activations(batch: batch, size: size)
            forward = { try net.forward($0, images: $1, activations, context: $2) }
            backward = { try net.backward($0, gradFeatures: $1, activations, context: $2) }
        } else {
            let net = try ResNet(config: config, layout: &layout)
            forward = { try net.forward($0, images: $1, batch: batch, size: size, context: $2) }
            backward = { try net.backward($0, gradFeatures: $1, context: $2) }
        }
        let arena = try parameters(file, layout)
        let context = PassContext(training: training, precision: precision)
        let features = try x.withUnsafeBufferPointer { try forward(arena, $0.baseAddress!, context) }
        var report = ParityReport(model: reference ? "reference resnet" : "resnet")
        report.lines.append(try line("output.features", features, shape: [batch, config.featureCount], file, precision: precision,
                                     base: limits(precision).output))
        arena.zeroGrads()
        try tensor(file, "input.output_weights", shape: [batch, config.featureCount]).withUnsafeBufferPointer {
            try backward(arena, $0.baseAddress!, context)
        }
        try compareGradients(file, arena, precision: precision, report: &report)
        return report
    }

    static func tokens(_ file: SafeTensorsFile) throws -> (Tensor<Int32>, Tensor<Int32>) {
        let ids = try file.int32s("input.input_ids"), mask = try file.int32s("input.attention_mask")
        try ids.expectRank(2, "\(file.path): input.input_ids", axes: "[B, T]")
        try mask.expectShape(ids.shape, "\(file.path): input.attention_mask")
        return (ids, mask)
    }

    /// The fast BERT, or with `reference` the plain `ReferenceBERT`, on the fixture.
    static func bert(_ file: SafeTensorsFile, training: Bool, precision: Precision, reference: Bool) throws -> ParityReport {
        let config = noDropout(try config(file, BertConfig.self))
        try config.validate()
        let (ids, mask) = try tokens(file)
        let (batch, length) = (ids.shape[0], ids.shape[1])
        var layout = ParameterLayout()
        let forward: (ParameterArena, UnsafePointer<Int32>, UnsafePointer<Int32>, PassContext) throws -> UnsafePointer<Float>
        let backward: (ParameterArena, UnsafePointer<Float>, PassContext) throws -> Void
        if reference {
            let net = try ReferenceBERT(config: config, layout: &layout), activations = try net.activations(batch: batch, tokens: length)
            forward = { try net.forward($0, ids: $1, mask: $2, activations, context: $3) }
            backward = { try net.backward($0, gradLastHidden: $1, activations, context: $2) }
        } else {
            let net = try BERT(config: config, layout: &layout)
            forward = { try net.forward($0, ids: $1, mask: $2, batch: batch, tokens: length, context: $3) }
            backward = { try net.backward($0, gradLastHidden: $1, context: $2) }
        }
        let arena = try parameters(file, layout)
        let context = PassContext(training: training, precision: precision)
        let hidden = try ids.withUnsafeBufferPointer { i in
            try mask.withUnsafeBufferPointer { m in try forward(arena, i.baseAddress!, m.baseAddress!, context) }
        }
        var report = ParityReport(model: reference ? "reference bert" : "bert")
        let shape = [batch, length, config.hiddenSize]
        report.lines.append(try line("output.last_hidden_state", hidden, shape: shape, file, precision: precision, base: limits(precision).output))
        arena.zeroGrads()
        try tensor(file, "input.output_weights", shape: shape).withUnsafeBufferPointer { try backward(arena, $0.baseAddress!, context) }
        try compareGradients(file, arena, precision: precision, report: &report)
        return report
    }

    /// The fast ConVIRT model with the distributed loss in its one-rank form, or with `reference` the plain
    /// `ReferenceConVIRT`, on the fixture.
    static func convirt(_ file: SafeTensorsFile, training: Bool, precision: Precision, reference: Bool) throws -> ParityReport {
        var config = try config(file, ConVIRTConfig.self)
        config.text = noDropout(config.text)
        try config.validate()
        let x = try images(file)
        let (ids, mask) = try tokens(file)
        let b = x.shape[0], d = config.projDim
        try require(ids.shape[0] == b, file.path, "images and texts have different batch sizes")
        let context = PassContext(training: training, precision: precision)
        // Each runs forward and the loss (the embeddings and the loss), then backward into its arena's gradients.
        let arena: ParameterArena
        let forward: () throws -> (v: UnsafePointer<Float>, u: UnsafePointer<Float>, loss: Double)
        let backward: () throws -> Void
        if reference {
            let model = try ReferenceConVIRT(config: config)
            let activations = try model.activations(batch: b, size: x.shape[2], tokens: ids.shape[1])
            arena = try parameters(file, model.layout)
            forward = {
                let value = try x.withUnsafeBufferPointer { image in
                    try ids.withUnsafeBufferPointer { i in
                        try mask.withUnsafeBufferPointer { m in
                            try model.forward(arena, images: image.baseAddress!, ids: i.baseAddress!, mask: m.baseAddress!, activations, context: context)
                        }
                    }
                }
                let (v, u) = model.embeddings(activations)
                return (v, u, value.loss)
            }
            backward = { try model.backward(arena, activations, context: context) }
        } else {
            let model = try ConVIRTModel(config: config)
            arena = model.arena
            try loadParameters(file, into: arena)
            var gradV = [Float](repeating: 0, count: b * d), gradU = gradV
            forward = {
                let v = try x.withUnsafeBufferPointer { try model.encodeImages($0.baseAddress!, batch: b, size: x.shape[2], context: context) }
                let u = try ids.withUnsafeBufferPointer { i in
                    try mask.withUnsafeBufferPointer { m in
                        try model.encodeTexts(ids: i.baseAddress!, mask: m.baseAddress!, batch: b, tokens: ids.shape[1], context: context)
                    }
                }
                let value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: b, globalRows: b, features: d, offset: 0,
                                                        tau: config.tau, lambda: config.lambda, gradV: &gradV, gradU: &gradU, workspace: .init())
                return (v, u, value.loss)
            }
            backward = {
                try model.backwardImages(gradEmbeddings: gradV, context: context)
                try model.backwardTexts(gradEmbeddings: gradU, context: context)
            }
        }
        let (v, u, value) = try forward()
        var report = ParityReport(model: reference ? "reference convirt" : "convirt")
        report.lines.append(try line("output.image_embeddings", v, shape: [b, d], file, precision: precision, base: limits(precision).output))
        report.lines.append(try line("output.text_embeddings", u, shape: [b, d], file, precision: precision, base: limits(precision).output))
        var loss = [Float(value)]
        report.lines.append(try line("output.loss", &loss, shape: [], file, precision: precision, base: limits(precision).output))
        arena.zeroGrads()
        try backward()
        try compareGradients(file, arena, precision: precision, report: &report)
        return report
    }
}
