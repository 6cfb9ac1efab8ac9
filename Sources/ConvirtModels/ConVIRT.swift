// ConVIRT (Zhang et al., "Contrastive Learning of Medical Visual Representations from Paired Images and
// Text", arXiv 2010.00747): image encoder -> g_v, text encoder -> max-pool over valid tokens -> g_u,
// both heads Linear-ReLU-Linear then L2 normalisation, and the bidirectional InfoNCE loss
// L = (1/N) sum_i [lambda l_i(v->u) + (1 - lambda) l_i(u->v)], l_i(v->u) = -log softmax_k(<v_i,u_k>/tau)_i.

import ConvirtCore
import Foundation

public struct ConVIRTConfig: Codable, Sendable, Equatable {
    public var image: ResNetConfig
    public var text: BertConfig
    public var projHidden: Int
    public var projDim: Int
    public var tau: Double
    public var lambda: Double
    /// BERT layers frozen from the bottom; the embeddings are frozen whenever this is positive.
    public var frozenLayers: Int

    enum CodingKeys: String, CodingKey {
        case image, text, projHidden = "proj_hidden", projDim = "proj_dim", tau, lambda, frozenLayers = "frozen_layers"
    }

    public init(image: ResNetConfig, text: BertConfig, projHidden: Int, projDim: Int, tau: Double = 0.1, lambda: Double = 0.75, frozenLayers: Int = 0) {
        self.image = image; self.text = text; self.projHidden = projHidden; self.projDim = projDim
        self.tau = tau; self.lambda = lambda; self.frozenLayers = frozenLayers
    }

    public func validate() throws {
        try image.validate()
        try text.validate()
        try require(projHidden > 0 && projDim > 0 && projHidden <= 1 << 16 && projDim <= 1 << 16, "convirt config",
                    "projection sizes must be in 1...65536, got \(projHidden) and \(projDim)")
        try require(tau > 0, "convirt config", "tau must be positive, got \(tau)")
        try require(lambda >= 0 && lambda <= 1, "convirt config", "lambda must be in [0, 1], got \(lambda)")
        try require(frozenLayers >= 0 && frozenLayers <= text.numHiddenLayers, "convirt config",
                    "frozen_layers \(frozenLayers) exceeds the \(text.numHiddenLayers) BERT layers")
    }

    /// The named configurations: `tiny` (tests), `demo` (learns on synthetic data in minutes on 2
    /// cores), `paper` (the paper's: ResNet-50 at 224, BERT-base with ClinicalBERT's cased vocabulary,
    /// 512-d heads, tau 0.1, lambda 0.75, embeddings and 6 layers frozen).
    public static func preset(_ preset: Preset) -> ConVIRTConfig {
        switch preset {
        case .tiny:
            return ConVIRTConfig(
                image: ResNetConfig(layers: [1, 1, 1, 1], width: 4, block: .bottleneck, imageSize: 64),
                text: BertConfig(vocabSize: 1000, hiddenSize: 16, numHiddenLayers: 2, numAttentionHeads: 2, intermediateSize: 32,
                                 maxPositionEmbeddings: 64),
                projHidden: 16, projDim: 8, frozenLayers: 1)
        case .demo:
            return ConVIRTConfig(
                image: ResNetConfig(layers: [1, 1, 1, 1], width: 16, block: .basic, imageSize: 96),
                text: BertConfig(vocabSize: 2048, hiddenSize: 128, numHiddenLayers: 2, numAttentionHeads: 4, intermediateSize: 256,
                                 maxPositionEmbeddings: 64),
                projHidden: 128, projDim: 64, frozenLayers: 0)
        case .paper:
            return ConVIRTConfig(image: .resnet50, text: .clinicalBase, projHidden: 512, projDim: 512, tau: 0.1, lambda: 0.75, frozenLayers: 6)
        }
    }
}

/// The named configurations of the model and its training recipe.
public enum Preset: String, Codable, Sendable, CaseIterable {
    /// Tests: a few thousand parameters.
    case tiny
    /// Learns on synthetic data in minutes on 2 cores.
    case demo
    /// The paper's.
    case paper
}

/// g = Linear -> ReLU -> Linear, then L2 normalisation (names `<prefix>0.*`, `<prefix>2.*` as nn.Sequential).
public final class ProjectionHead {
    let first, second: LinearLayer
    let hidden = Scratch<Float>(), projected = Scratch<Float>(), normalized = Scratch<Float>(), norms = Scratch<Float>()
    let gradHidden = Scratch<Float>(), gradProjected = Scratch<Float>(), gradInput = Scratch<Float>()
    /// A copy of the last forward's input features, which backward reads (the caller's buffer may have
    /// changed by then).
    let input = Scratch<Float>()
    private var rows = 0
    private var hasInput = false
    private var precision = Precision.fp32

    /// The arena range of the head's parameters.
    let range: Range<Int>

    init(_ layout: inout ParameterLayout, _ prefix: String, inFeatures: Int, hiddenFeatures: Int, outFeatures: Int) throws {
        let start = layout.totalCount
        first = try LinearLayer(&layout, "\(prefix)0", inFeatures: inFeatures, outFeatures: hiddenFeatures)
        second = try LinearLayer(&layout, "\(prefix)2", inFeatures: hiddenFeatures, outFeatures: outFeatures)
        range = start..<layout.totalCount
    }

    func initialize(_ arena: ParameterArena, stream: RandomStream) {
        first.initializeUniform(arena, stream: stream.child(0))
        second.initializeUniform(arena, stream: stream.child(1))
    }

    /// Unit-norm embeddings [rows, out] of features [rows, in]. The features are borrowed for this call:
    /// forward copies them into the head's input, which backward reads.
    func forward(_ arena: ParameterArena, features: UnsafePointer<Float>, rows: Int, precision: Precision) -> UnsafePointer<Float> {
        self.rows = rows
        self.precision = precision
        input.ensure(rows * first.inFeatures).update(from: features, count: rows * first.inFeatures)
        hasInput = true
        let h = hidden.ensure(rows * first.outFeatures), z = projected.ensure(rows * second.outFeatures)
        first.forward(arena, output: h, input: features, rows: rows, precision: precision)
        ReLU.forward(output: h, input: h, count: rows * first.outFeatures)
        second.forward(arena, output: z, input: h, rows: rows, precision: precision)
        let y = normalized.ensure(rows * second.outFeatures)
        L2Normalize.forward(output: y, norms: norms.ensure(rows), input: z, rows: rows, features: second.outFeatures)
        return UnsafePointer(y)
    }

    /// Gradient of the features [rows, in] from the gradient of the embeddings; parameter gradients
    /// accumulate, made of gradient pieces of `pieceRows` rows (`PassContext.pieceRows`; nil: one).
    func backward(_ arena: ParameterArena, gradEmbeddings: UnsafePointer<Float>, pieceRows: Int?) -> UnsafePointer<Float> {
        precondition(hasInput, "backward before forward")
        let pieces = pieceRows.map { RowPieces(rows: rows, each: $0) }
        let dz = gradProjected.zeroed(rows * second.outFeatures)
        L2Normalize.backward(gradInput: dz, gradOutput: gradEmbeddings, output: normalized.pointer, norms: norms.pointer, rows: rows, features: second.outFeatures)
        let dh = gradHidden.zeroed(rows * first.outFeatures)
        second.backward(arena, gradInput: dh, gradOutput: dz, input: hidden.pointer, rows: rows, precision: precision, pieces: pieces)
        let h = hidden.pointer
        for i in 0..<(rows * first.outFeatures) where h[i] <= 0 { dh[i] = 0 }
        let dx = gradInput.zeroed(rows * first.inFeatures)
        first.backward(arena, gradInput: dx, gradOutput: dh, input: input.pointer, rows: rows, precision: precision, pieces: pieces)
        return UnsafePointer(dx)
    }
}

/// The loss written for the distributed case. This rank holds rows [offset, offset + b) of the global
/// batch of N pairs; V and U are the all-gathered embeddings [N, d] in rank order.
public enum ConVIRTLoss {
    public struct Value: Sendable, Equatable {
        /// This rank's share of L (sum over ranks = L); and of its two directions.
        public var loss: Double
        public var imageToText: Double
        public var textToImage: Double
        public init(loss: Double, imageToText: Double, textToImage: Double) {
            self.loss = loss; self.imageToText = imageToText; self.textToImage = textToImage
        }
    }

    public final class Workspace {
        let logits = Scratch<Float>(), probabilities = Scratch<Float>(), losses = Scratch<Float>(), weights = Scratch<Float>()
        let targets = Scratch<Int32>()
        /// Pairs that are not negatives of each other (false negatives, `--exclude-identical-texts`): flat
        /// indices r * N + c of this rank's rows against the global columns, the same in both directions.
        /// Their logits are set to -inf, so they weigh nothing in the softmax and get no gradient.
        public var excluded: [Int] = []
        public init() {}
    }

    /// Returns this rank's share of the loss and writes gradV, gradU [N, d] (overwritten): the gradient
    /// of this rank's share with respect to every global embedding, including its own rows' terms. A
    /// reduce-scatter (sum) of gradV and gradU then gives every rank the full gradient of its rows.
    public static func forwardBackward(
        v: UnsafePointer<Float>, u: UnsafePointer<Float>, globalV: UnsafePointer<Float>, globalU: UnsafePointer<Float>,
        localRows b: Int, globalRows n: Int, features d: Int, offset: Int, tau: Double, lambda: Double,
        gradV: UnsafeMutablePointer<Float>, gradU: UnsafeMutablePointer<Float>, workspace ws: Workspace
    ) -> Value {
        evaluate(v: v, u: u, globalV: globalV, globalU: globalU, localRows: b, globalRows: n, features: d, offset: offset, tau: tau,
                 lambda: lambda, gradients: (gradV, gradU), workspace: ws)
    }

    /// This rank's share of the loss only (validation: no gradient is formed).
    public static func forward(
        v: UnsafePointer<Float>, u: UnsafePointer<Float>, globalV: UnsafePointer<Float>, globalU: UnsafePointer<Float>,
        localRows b: Int, globalRows n: Int, features d: Int, offset: Int, tau: Double, lambda: Double, workspace ws: Workspace
    ) -> Value {
        evaluate(v: v, u: u, globalV: globalV, globalU: globalU, localRows: b, globalRows: n, features: d, offset: offset, tau: tau,
                 lambda: lambda, gradients: nil, workspace: ws)
    }

    static func evaluate(
        v: UnsafePointer<Float>, u: UnsafePointer<Float>, globalV: UnsafePointer<Float>, globalU: UnsafePointer<Float>,
        localRows b: Int, globalRows n: Int, features d: Int, offset: Int, tau: Double, lambda: Double,
        gradients: (v: UnsafeMutablePointer<Float>, u: UnsafeMutablePointer<Float>)?, workspace ws: Workspace
    ) -> Value {
        precondition(offset >= 0 && offset + b <= n, "local rows outside the global batch")
        let scale = Float(1 / tau)
        let logits = ws.logits.ensure(b * n), probabilities = ws.probabilities.ensure(b * n)
        let losses = ws.losses.ensure(b), weights = ws.weights.ensure(b), targets = ws.targets.ensure(b)
        for i in 0..<b { targets[i] = Int32(offset + i) }
        if let (gradV, gradU) = gradients {
            gradV.update(repeating: 0, count: n * d)
            gradU.update(repeating: 0, count: n * d)
        }
        var value = Value(loss: 0, imageToText: 0, textToImage: 0)
        // direction 0: image -> text (rows v_i against all u_k); direction 1: text -> image.
        for direction in 0..<2 {
            let (rowsP, columnsP) = direction == 0 ? (v, globalU) : (u, globalV)
            let weight = direction == 0 ? lambda : 1 - lambda
            sgemm(Product(m: b, n: n, k: d, transposeB: true, alpha: scale),
                a: Matrix(rowsP, ld: d), b: Matrix(columnsP, ld: d), c: MutableMatrix(logits, ld: n))
            for k in ws.excluded { logits[k] = -.infinity }
            CrossEntropy.forward(losses: losses, probabilities: probabilities, logits: logits, targets: targets, rows: b, classes: n)
            var sum = 0.0
            for i in 0..<b { sum += Double(losses[i]) }
            let share = sum / Double(n)
            if direction == 0 { value.imageToText = share } else { value.textToImage = share }
            value.loss += weight * share
            guard let (gradV, gradU) = gradients else { continue }
            let (gradRows, gradColumns) = direction == 0 ? (gradV, gradU) : (gradU, gradV)
            // dL/dlogits = weight / N * (softmax - onehot)
            logits.update(repeating: 0, count: b * n)
            for i in 0..<b { weights[i] = Float(weight / Double(n)) }
            CrossEntropy.backward(gradLogits: logits, gradLosses: weights, probabilities: probabilities, targets: targets, rows: b, classes: n)
            // d rows [b, d] += G [b, N] . columns [N, d] / tau, into the rank's own rows of the global gradient
            sgemm(Product(m: b, n: d, k: n, alpha: scale, beta: 1),
                a: Matrix(logits, ld: n), b: Matrix(columnsP, ld: d), c: MutableMatrix(gradRows + offset * d, ld: d))
            // d columns [N, d] += G^T [N, b] . rows [b, d] / tau
            sgemm(Product(m: n, n: d, k: b, transposeA: true, alpha: scale, beta: 1),
                a: Matrix(logits, ld: n), b: Matrix(rowsP, ld: d), c: MutableMatrix(gradColumns, ld: d))
        }
        return value
    }
}

/// The whole ConVIRT model on one flat arena: `image.` (ResNet), `text.` (BERT), `image_head.`, `text_head.`.
public final class ConVIRTModel {
    public let config: ConVIRTConfig
    public let layout: ParameterLayout
    public let arena: ParameterArena
    public let image: ResNet
    public let text: BERT
    public let imageHead: ProjectionHead
    public let textHead: ProjectionHead
    let pooled = Scratch<Float>(), poolIndices = Scratch<Int32>(), gradHidden = Scratch<Float>()
    let savedBuffers = Scratch<Float>()
    /// The precision evaluations and embeddings of this model run in (training takes its run's, through
    /// the pass context).
    public var precision = Precision.fp32
    private var textShape = (batch: 0, tokens: 0)

    /// The name table of a configuration's model, without allocating its arena (to check a file's sizes
    /// against the model before anything is read from it).
    public static func layout(_ config: ConVIRTConfig) throws -> ParameterLayout {
        try config.validate()
        var layout = ParameterLayout()
        _ = try ResNet(config: config.image, layout: &layout, prefix: "image.")
        _ = try BERT(config: config.text, layout: &layout, prefix: "text.", frozenLayers: config.frozenLayers)
        _ = try ProjectionHead(&layout, "image_head.", inFeatures: config.image.featureCount, hiddenFeatures: config.projHidden, outFeatures: config.projDim)
        _ = try ProjectionHead(&layout, "text_head.", inFeatures: config.text.hiddenSize, hiddenFeatures: config.projHidden, outFeatures: config.projDim)
        return layout
    }

    public init(config: ConVIRTConfig) throws {
        try config.validate()
        self.config = config
        var layout = ParameterLayout()
        image = try ResNet(config: config.image, layout: &layout, prefix: "image.")
        text = try BERT(config: config.text, layout: &layout, prefix: "text.", frozenLayers: config.frozenLayers)
        // The sentence embedding pools the valid tokens alone: the padding need not be computed
        // (CONVIRT_TEXT_ROWS=padded computes it, for comparison).
        text.packsTokens = EnvironmentSwitches.process.textRows != .padded
        imageHead = try ProjectionHead(&layout, "image_head.", inFeatures: config.image.featureCount, hiddenFeatures: config.projHidden, outFeatures: config.projDim)
        textHead = try ProjectionHead(&layout, "text_head.", inFeatures: config.text.hiddenSize, hiddenFeatures: config.projHidden, outFeatures: config.projDim)
        self.layout = layout
        arena = ParameterArena(layout: layout)
    }

    /// Keeps a copy of the model's buffers (BatchNorm's running statistics), which `restoreBuffers`
    /// puts back: a forward pass that must leave them as they were (accumulation's first pass).
    public func saveBuffers() {
        let entries = layout.entries.lazy.filter { $0.kind == .buffer }
        let saved = savedBuffers.ensure(entries.reduce(0) { $0 + $1.count })
        var at = 0
        for e in entries { (saved + at).update(from: arena.params + e.offset, count: e.count); at += e.count }
    }

    /// Puts back the buffers `saveBuffers` copied.
    public func restoreBuffers() {
        var at = 0
        for e in layout.entries where e.kind == .buffer {
            (arena.trainingParams + e.offset).update(from: savedBuffers.pointer + at, count: e.count); at += e.count
        }
    }

    /// Random initialisation as torchvision, Hugging Face and torch.nn.Linear do it, from a seed.
    public func initialize(seed: UInt64) {
        let stream = RandomStream(seed: seed, .convirtInit)
        image.initialize(arena, stream: stream.child(1))
        text.initialize(arena, stream: stream.child(2))
        imageHead.initialize(arena, stream: stream.child(3))
        textHead.initialize(arena, stream: stream.child(4))
    }

    /// v = normalize(g_v(ResNet(images))) [batch, projDim].
    public func encodeImages(_ images: UnsafePointer<Float>, batch: Int, size: Int, context: PassContext) throws -> UnsafePointer<Float> {
        let features = try image.forward(arena, images: images, batch: batch, size: size, context: context)
        return imageHead.forward(arena, features: features, rows: batch, precision: context.precision)
    }

    /// u = normalize(g_u(max over valid tokens of BERT(ids, mask))) [batch, projDim].
    public func encodeTexts(ids: UnsafePointer<Int32>, mask: UnsafePointer<Int32>, batch: Int, tokens: Int, context: PassContext) throws -> UnsafePointer<Float> {
        let hidden = try text.forward(arena, ids: ids, mask: mask, batch: batch, tokens: tokens, context: context)
        let h = config.text.hiddenSize
        let p = pooled.ensure(batch * h)
        MaskedMaxPool.forward(output: p, indices: poolIndices.ensure(batch * h), input: hidden, mask: mask, batch: batch, tokens: tokens, channels: h)
        textShape = (batch, tokens)
        return textHead.forward(arena, features: p, rows: batch, precision: context.precision)
    }

    /// The image features before the head, h_v [batch, featureCount] (for linear evaluation).
    public func imageFeatures(_ images: UnsafePointer<Float>, batch: Int, size: Int, context: PassContext) throws -> UnsafePointer<Float> {
        try image.forward(arena, images: images, batch: batch, size: size, context: context)
    }

    /// v = normalize(g_v(features)) [rows, projDim] of image features h_v [rows, featureCount].
    public func projectImageFeatures(_ features: UnsafePointer<Float>, rows: Int) -> UnsafePointer<Float> {
        imageHead.forward(arena, features: features, rows: rows, precision: precision)
    }

    public func backwardImages(gradEmbeddings: UnsafePointer<Float>, context: PassContext) throws {
        let gradFeatures = imageHead.backward(arena, gradEmbeddings: gradEmbeddings, pieceRows: context.pieceRows(perSample: 1))
        try context.gradientsReady?(imageHead.range)
        try image.backward(arena, gradFeatures: gradFeatures, context: context)
    }

    public func backwardTexts(gradEmbeddings: UnsafePointer<Float>, context: PassContext) throws {
        let gradPooled = textHead.backward(arena, gradEmbeddings: gradEmbeddings, pieceRows: context.pieceRows(perSample: 1))
        try context.gradientsReady?(textHead.range)
        let (b, t) = textShape, h = config.text.hiddenSize
        let dh = gradHidden.zeroed(b * t * h)
        MaskedMaxPool.backward(gradInput: dh, gradOutput: gradPooled, indices: poolIndices.pointer, batch: b, tokens: t, channels: h)
        try text.backward(arena, gradLastHidden: dh, context: context)
    }
}
