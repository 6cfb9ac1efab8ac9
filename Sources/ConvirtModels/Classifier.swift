// The downstream model of the paper's classification evaluations (App. B): the image encoder (a ResNet,
// `image.` as in the ConVIRT arena, so that pretrained weights load by name) and a linear classifier with
// dropout before it (`classifier.`), on one arena of their own.

import ConvirtCore

public final class ImageClassifier {
    public let config: ResNetConfig
    public let classes: Int
    public let dropout: Float
    public let layout: ParameterLayout
    public let arena: ParameterArena
    public let encoder: ResNet
    let head: LinearLayer
    let dropped = Scratch<Float>(), logits = Scratch<Float>(), gradFeatures = Scratch<Float>(), gradDropped = Scratch<Float>()
    private var rows = 0
    private var headContext: PassContext?
    /// The precision of the evaluation's passes (contexts are made with it).
    public var precision = Precision.fp32

    public init(config: ResNetConfig, classes: Int, dropout: Float = 0.2) throws {
        try config.validate()
        try require(classes >= 1, "classifier", "needs at least one output")
        try require(dropout >= 0 && dropout < 1, "classifier", "dropout must be in [0, 1)")
        self.config = config
        self.classes = classes
        self.dropout = dropout
        var layout = ParameterLayout()
        encoder = try ResNet(config: config, layout: &layout, prefix: "image.")
        head = try LinearLayer(&layout, "classifier", inFeatures: config.featureCount, outFeatures: classes)
        self.layout = layout
        arena = ParameterArena(layout: layout)
    }

    public var featureCount: Int { config.featureCount }

    /// The arena range of the classifier's weight and bias (the only trained range of linear evaluation).
    public var headRange: Range<Int> { head.weight.offset..<(head.bias.map { $0.offset + $0.count } ?? head.weight.offset + head.weight.count) }

    /// torchvision's initialisation of the encoder and torch.nn.Linear's of the classifier, from a seed.
    public func initialize(seed: UInt64) {
        let stream = RandomStream(seed: seed, .classifierInit)
        encoder.initialize(arena, stream: stream.child(1))
        head.initializeUniform(arena, stream: stream.child(2))
    }

    /// A fresh classifier (initialised from `seed`) keeping the encoder's parameters.
    public func resetHead(seed: UInt64) {
        head.initializeUniform(arena, stream: RandomStream(seed: seed, .classifierInit).child(2))
    }

    /// Encoder features h_v [batch, featureCount] of normalised images [batch, 3, S, S].
    public func features(_ images: UnsafePointer<Float>, batch: Int, size: Int, context: PassContext) throws -> UnsafePointer<Float> {
        try encoder.forward(arena, images: images, batch: batch, size: size, context: context)
    }

    /// Logits [rows, classes] of features [rows, featureCount]; in training, dropout with each row's mask
    /// drawn from the stream keyed by its global sample index.
    public func classify(_ features: UnsafePointer<Float>, rows: Int, context: PassContext) -> UnsafePointer<Float> {
        let f = featureCount
        self.rows = rows
        headContext = context
        var input = features
        if context.training && dropout > 0 {
            let x = dropped.ensure(rows * f)
            for r in 0..<rows {
                Dropout.serialForward(output: x + r * f, input: features + r * f, count: f, probability: dropout, stream: stream(context, row: r))
            }
            input = UnsafePointer(x)
        }
        let y = logits.ensure(rows * classes)
        head.forward(arena, output: y, input: input, rows: rows, precision: context.precision)
        return UnsafePointer(y)
    }

    /// Accumulates the classifier's gradients from gradLogits [rows, classes] (of the last `classify`)
    /// and returns the gradient of its input features [rows, featureCount].
    public func backwardClassifier(gradLogits: UnsafePointer<Float>, features: UnsafePointer<Float>) -> UnsafePointer<Float> {
        guard let context = headContext else { preconditionFailure("backward before classify") }
        let f = featureCount
        let masked = context.training && dropout > 0
        let input = masked ? UnsafePointer(dropped.pointer) : features
        let g = gradFeatures.zeroed(rows * f)
        if masked {
            let gx = gradDropped.zeroed(rows * f)
            head.backward(arena, gradInput: gx, gradOutput: gradLogits, input: input, rows: rows, precision: context.precision,
                          pieces: context.pieces(samples: rows))
            for r in 0..<rows {
                Dropout.backward(gradInput: g + r * f, gradOutput: gx + r * f, count: f, probability: dropout, stream: stream(context, row: r))
            }
        } else {
            head.backward(arena, gradInput: g, gradOutput: gradLogits, input: input, rows: rows, precision: context.precision,
                          pieces: context.pieces(samples: rows))
        }
        return UnsafePointer(g)
    }

    /// Accumulates the encoder's gradients from the gradient of its features (fine-tuning).
    public func backwardEncoder(gradFeatures: UnsafePointer<Float>, context: PassContext) throws {
        try encoder.backward(arena, gradFeatures: gradFeatures, context: context)
    }

    private func stream(_ context: PassContext, row r: Int) -> RandomStream {
        context.stream.child(r < context.sampleIndices.count ? context.sampleIndices[r] : UInt64(r), DropoutSite.classifier.rawValue)
    }
}
