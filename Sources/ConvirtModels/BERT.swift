// BERT (Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
// Understanding", NAACL 2019) in Hugging Face `BertModel`'s exact architecture and parameter names:
// word + position + token-type embeddings, LayerNorm, then post-LN encoder layers (self-attention with
// an additive mask, dense + residual + LayerNorm, erf-GELU feed-forward, dense + residual + LayerNorm).
// The output is the last hidden state. Freezing the embeddings and the first k layers removes their
// backward pass entirely: no compute, no gradient, not in the optimizer.

import ConvirtCore

/// Hugging Face's BertConfig fields (their JSON names), as in a model directory's config.json.
public struct BertConfig: Codable, Sendable, Equatable {
    public var vocabSize: Int
    public var hiddenSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var intermediateSize: Int
    public var maxPositionEmbeddings: Int
    public var typeVocabSize: Int
    public var layerNormEps: Double
    public var hiddenAct: String
    public var hiddenDropoutProb: Double
    public var attentionProbsDropoutProb: Double
    /// The word-embedding row that never receives a gradient (nn.Embedding's padding_idx).
    public var padTokenId: Int

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size", hiddenSize = "hidden_size", numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads", intermediateSize = "intermediate_size"
        case maxPositionEmbeddings = "max_position_embeddings", typeVocabSize = "type_vocab_size"
        case layerNormEps = "layer_norm_eps", hiddenAct = "hidden_act"
        case hiddenDropoutProb = "hidden_dropout_prob", attentionProbsDropoutProb = "attention_probs_dropout_prob"
        case padTokenId = "pad_token_id"
    }

    public init(vocabSize: Int, hiddenSize: Int, numHiddenLayers: Int, numAttentionHeads: Int, intermediateSize: Int,
                maxPositionEmbeddings: Int = 512, typeVocabSize: Int = 2, layerNormEps: Double = 1e-12, hiddenAct: String = "gelu",
                hiddenDropoutProb: Double = 0.1, attentionProbsDropoutProb: Double = 0.1, padTokenId: Int = 0) {
        self.vocabSize = vocabSize; self.hiddenSize = hiddenSize; self.numHiddenLayers = numHiddenLayers
        self.numAttentionHeads = numAttentionHeads; self.intermediateSize = intermediateSize
        self.maxPositionEmbeddings = maxPositionEmbeddings; self.typeVocabSize = typeVocabSize
        self.layerNormEps = layerNormEps; self.hiddenAct = hiddenAct
        self.hiddenDropoutProb = hiddenDropoutProb; self.attentionProbsDropoutProb = attentionProbsDropoutProb
        self.padTokenId = padTokenId
    }

    /// Missing optional fields take BertConfig's defaults, so real config.json files of any age load.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        numHiddenLayers = try c.decode(Int.self, forKey: .numHiddenLayers)
        numAttentionHeads = try c.decode(Int.self, forKey: .numAttentionHeads)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        maxPositionEmbeddings = try c.decodeIfPresent(Int.self, forKey: .maxPositionEmbeddings) ?? 512
        typeVocabSize = try c.decodeIfPresent(Int.self, forKey: .typeVocabSize) ?? 2
        layerNormEps = try c.decodeIfPresent(Double.self, forKey: .layerNormEps) ?? 1e-12
        hiddenAct = try c.decodeIfPresent(String.self, forKey: .hiddenAct) ?? "gelu"
        hiddenDropoutProb = try c.decodeIfPresent(Double.self, forKey: .hiddenDropoutProb) ?? 0.1
        attentionProbsDropoutProb = try c.decodeIfPresent(Double.self, forKey: .attentionProbsDropoutProb) ?? 0.1
        padTokenId = try c.decodeIfPresent(Int.self, forKey: .padTokenId) ?? 0
    }

    /// BERT-base with ClinicalBERT's cased vocabulary (bio_ClinicalBERT: 28996 word pieces).
    public static let clinicalBase = BertConfig(vocabSize: 28996, hiddenSize: 768, numHiddenLayers: 12, numAttentionHeads: 12, intermediateSize: 3072)

    public var headSize: Int { hiddenSize / numAttentionHeads }

    public func validate() throws {
        let c = "bert config"
        try require(vocabSize > 0 && hiddenSize > 0 && numHiddenLayers >= 0 && intermediateSize > 0 && maxPositionEmbeddings > 0 && typeVocabSize > 0,
                    c, "sizes must be positive")
        try require(vocabSize <= 1 << 22 && hiddenSize <= 1 << 16 && numHiddenLayers <= 1024 && intermediateSize <= 1 << 18
                    && maxPositionEmbeddings <= 1 << 16 && typeVocabSize <= 1 << 16, c,
                    "absurd sizes (vocab \(vocabSize), hidden \(hiddenSize), layers \(numHiddenLayers), intermediate \(intermediateSize), "
                    + "positions \(maxPositionEmbeddings), token types \(typeVocabSize))")
        try require(numAttentionHeads > 0 && hiddenSize % numAttentionHeads == 0, c,
                    "hidden_size \(hiddenSize) is not a multiple of num_attention_heads \(numAttentionHeads)")
        try require(["gelu", "gelu_python"].contains(hiddenAct), c, "hidden_act \(hiddenAct) is not supported (only the erf GELU, \"gelu\")")
        try require(hiddenDropoutProb >= 0 && hiddenDropoutProb < 1 && attentionProbsDropoutProb >= 0 && attentionProbsDropoutProb < 1,
                    c, "dropout probabilities must be in [0, 1)")
    }
}

/// y = x W^T + b with W [out, in] in the arena, the bias optional.
struct LinearLayer {
    let weight: ParameterLayout.Entry
    let bias: ParameterLayout.Entry?
    let inFeatures, outFeatures: Int

    init(_ layout: inout ParameterLayout, _ name: String, inFeatures: Int, outFeatures: Int, bias hasBias: Bool = true,
         kind: ParameterLayout.Kind = .trainable) throws {
        weight = try layout.add("\(name).weight", shape: [outFeatures, inFeatures], kind: kind)
        bias = hasBias ? try layout.add("\(name).bias", shape: [outFeatures], kind: kind) : nil
        self.inFeatures = inFeatures; self.outFeatures = outFeatures
    }

    var trainable: Bool { weight.kind == .trainable }

    /// `copies`: the bf16 operands kept from forward for backward (`Linear.Copies`).
    func forward(_ arena: ParameterArena, output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, rows: Int, precision: Precision,
                 copies: Linear.Copies? = nil) {
        Linear.forward(output: output, input: input, weight: arena.params + weight.offset, bias: bias.map { arena.params + $0.offset },
                       rows: rows, inFeatures: inFeatures, outFeatures: outFeatures, precision: precision, copies: copies)
    }

    /// outputBF16 = forward's output in bf16 on oneDNN's bf16 kernels (`Linear.forwardBF16`); false where
    /// it cannot, with nothing written.
    func forwardBF16(_ arena: ParameterArena, outputBF16: UnsafeMutablePointer<UInt16>, input: UnsafePointer<Float>, rows: Int,
                     copies: Linear.Copies) -> Bool {
        Linear.forwardBF16(outputBF16: outputBF16, input: input, weight: arena.params + weight.offset, bias: bias.map { arena.params + $0.offset },
                           rows: rows, inFeatures: inFeatures, outFeatures: outFeatures, copies: copies)
    }

    /// outputBF16 = GELU(forward) in bf16 on oneDNN's bf16 kernels (`Linear.forwardGELU`); false where it
    /// cannot, with nothing written.
    func forwardGELU(_ arena: ParameterArena, outputBF16: UnsafeMutablePointer<UInt16>, input: UnsafePointer<Float>, rows: Int,
                     copies: Linear.Copies) -> Bool {
        Linear.forwardGELU(outputBF16: outputBF16, input: input, weight: arena.params + weight.offset, bias: bias.map { arena.params + $0.offset },
                           rows: rows, inFeatures: inFeatures, outFeatures: outFeatures, copies: copies)
    }

    /// `accumulateInput` false: gradInput is overwritten (a gradient no other layer adds to).
    /// `pieces`: the gradient pieces of the rows (`TokenRows.pieces`), nil for one piece.
    func backward(_ arena: ParameterArena, gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>? = nil,
                  gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, rows: Int, precision: Precision, accumulateInput: Bool = true,
                  copies: Linear.Copies? = nil, pieces: RowPieces? = nil) {
        Linear.backward(gradInput: gradInput, gradInputBF16: gradInputBF16, gradWeight: trainable ? arena.grads + weight.offset : nil,
                        gradBias: trainable ? bias.map { arena.grads + $0.offset } : nil, gradOutput: gradOutput, input: input,
                        weight: arena.params + weight.offset, rows: rows, inFeatures: inFeatures, outFeatures: outFeatures,
                        precision: precision, accumulateInput: accumulateInput, overwriteWeight: trainable && arena.claimZeroedGradient(weight),
                        copies: copies, pieces: pieces)
    }

    /// N(0, std) weights and zero bias (BERT's initializer_range 0.02; heads use PyTorch's default instead).
    func initializeNormal(_ arena: ParameterArena, std: Float, stream: RandomStream) {
        let w = arena.mutableParams + weight.offset
        stream.fillNormal(w, count: weight.count, scale: std)
        if let bias { (arena.mutableParams + bias.offset).update(repeating: 0, count: bias.count) }
    }

    /// torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    func initializeUniform(_ arena: ParameterArena, stream: RandomStream) {
        let bound = 1 / Float(inFeatures).squareRoot()
        let w = arena.mutableParams + weight.offset
        for i in 0..<weight.count { w[i] = bound * (2 * stream.uniform(at: UInt64(i)) - 1) }
        if let bias {
            let b = arena.mutableParams + bias.offset
            for i in 0..<bias.count { b[i] = bound * (2 * stream.uniform(at: UInt64(weight.count + i)) - 1) }
        }
    }
}

struct LayerNormLayer {
    let weight, bias: ParameterLayout.Entry
    let features: Int
    let eps: Float

    init(_ layout: inout ParameterLayout, _ name: String, features: Int, eps: Float, kind: ParameterLayout.Kind) throws {
        weight = try layout.add("\(name).weight", shape: [features], kind: kind)
        bias = try layout.add("\(name).bias", shape: [features], kind: kind)
        self.features = features; self.eps = eps
    }

    func forward(_ arena: ParameterArena, output: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>, invStd: UnsafeMutablePointer<Float>,
                 input: UnsafePointer<Float>, rows: Int) {
        LayerNorm.forward(output: output, mean: mean, invStd: invStd, input: input, gamma: arena.params + weight.offset,
                          beta: arena.params + bias.offset, rows: rows, features: features, eps: eps)
    }

    /// output = LN(dropout(dense) + residual), the sum kept in `sum` where given (`LayerNorm.forwardResidual`).
    func forwardResidual(_ arena: ParameterArena, sum: UnsafeMutablePointer<Float>?, output: UnsafeMutablePointer<Float>,
                         outputBF16: UnsafeMutablePointer<UInt16>?, mean: UnsafeMutablePointer<Float>, invStd: UnsafeMutablePointer<Float>,
                         dense: UnsafePointer<Float>, residual: UnsafePointer<Float>, rows: Int,
                         dropout: (probability: Float, streams: [RandomStream], rows: TokenRows)?) {
        LayerNorm.forwardResidual(sum: sum, output: output, outputBF16: outputBF16, mean: mean, invStd: invStd, dense: dense, residual: residual,
                                  gamma: arena.params + weight.offset, beta: arena.params + bias.offset, rows: rows, features: features, eps: eps,
                                  dropout: dropout)
    }

    /// The backward of `forwardResidual` (`LayerNorm.backwardResidual`); the dense gradient as floats, or
    /// as bf16 bits alone.
    func backwardResidual(_ arena: ParameterArena, gradResidual: UnsafeMutablePointer<Float>?, accumulateResidual: Bool,
                          gradDense: UnsafeMutablePointer<Float>?, gradDenseBF16: UnsafeMutablePointer<UInt16>?, gradOutput: UnsafePointer<Float>,
                          input: UnsafePointer<Float>,
                          mean: UnsafePointer<Float>, invStd: UnsafePointer<Float>, rows: Int, pieces: RowPieces?,
                          dropout: (probability: Float, streams: [RandomStream], rows: TokenRows)?) {
        let trainable = weight.kind == .trainable
        LayerNorm.backwardResidual(gradResidual: gradResidual, accumulateResidual: accumulateResidual, gradDense: gradDense,
                                   gradDenseBF16: gradDenseBF16, gradGamma: trainable ? arena.grads + weight.offset : nil, gradBeta: trainable ? arena.grads + bias.offset : nil,
                                   gradOutput: gradOutput, input: input, gamma: arena.params + weight.offset, mean: mean, invStd: invStd, rows: rows,
                                   features: features, pieces: pieces, dropout: dropout)
    }

    /// `pieces`: the gradient pieces of the rows (`TokenRows.pieces`), nil for one piece.
    func backward(_ arena: ParameterArena, gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>,
                  mean: UnsafePointer<Float>, invStd: UnsafePointer<Float>, rows: Int, pieces: RowPieces? = nil) {
        let trainable = weight.kind == .trainable
        LayerNorm.backward(gradInput: gradInput, gradGamma: trainable ? arena.grads + weight.offset : nil,
                           gradBeta: trainable ? arena.grads + bias.offset : nil, gradOutput: gradOutput, input: input,
                           gamma: arena.params + weight.offset, mean: mean, invStd: invStd, rows: rows, features: features, pieces: pieces)
    }

    func initialize(_ arena: ParameterArena) {
        (arena.mutableParams + weight.offset).update(repeating: 1, count: features)
        (arena.mutableParams + bias.offset).update(repeating: 0, count: features)
    }
}

/// The activations of an encoder layer ([rows, H] unless noted: the pass's `TokenRows`, B*T padded;
/// q, k and v, the attention's inputs, are padded [B*T, H] always). A trainable layer keeps its own until
/// backward; frozen layers (never differentiated) take turns with two shared sets, since each only reads
/// the previous one's output.
final class LayerActivations {
    let q = Scratch<Float>(), k = Scratch<Float>(), v = Scratch<Float>()
    let probabilities = Scratch<Float>(), dropped = Scratch<Float>()  // [B, heads, T, T]
    let context = Scratch<Float>(), sum1 = Scratch<Float>()
    let hidden1 = Scratch<Float>(), mean1 = Scratch<Float>(), invStd1 = Scratch<Float>()
    let inner = Scratch<Float>(), activated = Scratch<Float>()                            // [rows, I]
    /// The intermediate product's output as bf16 bits, where a trained layer writes copies: GELU's input,
    /// forward and backward (autocast's bf16 linear output).
    let innerBF16 = Scratch<UInt16>()
    let sum2 = Scratch<Float>()
    let hidden2 = Scratch<Float>(), mean2 = Scratch<Float>(), invStd2 = Scratch<Float>()
    /// The attention's bf16 operands on oneDNN's bf16 kernels (q, k, v and the dropped weights), from
    /// forward for backward; with them `dropped` is not written.
    let attentionCopies = AttentionCopies()
}

/// The temporaries of one layer's backward (and of its forward: `qkvBF16`, `dense`): layers run one at
/// a time, so all share one set.
final class LayerGradientScratch {
    /// The bf16 outputs of the query, key and value products, which only the attention reads (packing
    /// them per head), where the products write bf16 ([3, B*T, H], the attention's padded layout).
    let qkvBF16 = Scratch<UInt16>()
    /// The attention output's and the output layer's products before their residual LayerNorm, which
    /// alone reads them, in the same forward (backward reads the sums).
    let dense = Scratch<Float>()
    let gradHidden1 = Scratch<Float>(), gradInner = Scratch<Float>(), gradDense = Scratch<Float>(), gradContext = Scratch<Float>()
    let gradQ = Scratch<Float>(), gradK = Scratch<Float>(), gradV = Scratch<Float>(), attentionWorkspace = Scratch<Float>()
    /// The output gradient of a linear layer in bf16, converted once for its two products (and its bias
    /// gradient); the key's and the value's apart, written with the query's by the attention's backward.
    let gradOutputBF16 = BF16Operand(), gradKeyBF16 = BF16Operand(), gradValueBF16 = BF16Operand()
    /// The output layer's input gradient (GELU's output gradient) as bf16 bits, where the layer writes copies.
    let gradInnerBF16 = Scratch<UInt16>()
    /// Frozen layers' bf16 inputs of the attention output, intermediate and output layers (written by
    /// the layer before, read by the one product).
    let frozenContextBF16 = BF16Operand(), frozenHiddenBF16 = BF16Operand(), frozenActivatedBF16 = BF16Operand()
    /// Where the rows are packed (`TokenRows`), the attention's ends in its padded layout. In forward, the
    /// query, key and value products' outputs in the rows ([3, rows, H]: floats, or bf16 bits where the
    /// products write bf16) before they are scattered, and the attention's output padded ([B*T, H]:
    /// floats or bits) before it is gathered. In backward, the attention's output gradient scattered
    /// (`paddedContext`), and its query, key and value gradients padded before they are gathered: floats
    /// in `packedQKV`, bits in `qkvBF16` (which the attention's backward does not read: it keeps its own
    /// copies of q, k and v).
    let packedQKV = Scratch<Float>(), packedQKVBF16 = Scratch<UInt16>()
    let paddedContext = Scratch<Float>(), paddedContextBF16 = Scratch<UInt16>()
}

/// The bf16 copies of an encoder layer's six linear layers (`Linear.Copies`): query, key and value share
/// one copy of their common input. A frozen layer (never differentiated) keeps its weights' copies from
/// pass to pass while the arena's frozen entries are unchanged (`ParameterArena.frozenVersion`), and
/// shares with the other frozen layers the rooms of its products' inputs, each read once.
struct EncoderCopies {
    let query, key, value, attentionOutput, intermediate, output: Linear.Copies
    let frozen: Bool

    init(frozen: Bool, scratch: LayerGradientScratch) {
        let dy = scratch.gradOutputBF16, x = BF16Operand()
        self.frozen = frozen
        query = Linear.Copies(input: x, weight: BF16Operand(), gradOutput: dy)
        key = Linear.Copies(input: x, weight: BF16Operand(), gradOutput: scratch.gradKeyBF16, reuseInput: true)
        value = Linear.Copies(input: x, weight: BF16Operand(), gradOutput: scratch.gradValueBF16, reuseInput: true)
        func input(_ shared: BF16Operand) -> BF16Operand { frozen ? shared : BF16Operand() }
        attentionOutput = Linear.Copies(input: input(scratch.frozenContextBF16), weight: BF16Operand(), gradOutput: dy)
        intermediate = Linear.Copies(input: input(scratch.frozenHiddenBF16), weight: BF16Operand(), gradOutput: dy)
        output = Linear.Copies(input: input(scratch.frozenActivatedBF16), weight: BF16Operand(), gradOutput: dy)
    }

    /// A forward's copies of one linear layer: a frozen layer's weights kept while `arena`'s frozen
    /// entries are those they were converted from.
    func forward(_ copies: Linear.Copies, _ arena: ParameterArena) -> Linear.Copies {
        frozen ? copies.keepingWeights(at: arena.frozenVersion) : copies
    }
}

/// One post-LN transformer encoder layer with its activations.
final class EncoderLayer {
    let query, key, value, attentionOutput, intermediate, output: LinearLayer
    let attentionNorm, outputNorm: LayerNormLayer
    let index: Int
    let frozen: Bool
    let activations: LayerActivations
    let scratch: LayerGradientScratch
    /// bf16 copies of the linear layers' operands, from forward for backward.
    let copies: EncoderCopies
    /// The gradient of this layer's output, written by the next layer's backward (or the encoder's,
    /// for the last layer) and read by this layer's: layers of one parity share a room, since only two
    /// adjacent layers' are live at once.
    let gradOutput: Scratch<Float>

    init(_ layout: inout ParameterLayout, _ name: String, config c: BertConfig, index: Int, frozen: Bool,
         activations: LayerActivations, scratch: LayerGradientScratch, gradOutput: Scratch<Float>) throws {
        self.activations = activations
        self.gradOutput = gradOutput
        self.scratch = scratch
        let kind: ParameterLayout.Kind = frozen ? .frozen : .trainable
        let h = c.hiddenSize, eps = Float(c.layerNormEps)
        query = try LinearLayer(&layout, "\(name).attention.self.query", inFeatures: h, outFeatures: h, kind: kind)
        key = try LinearLayer(&layout, "\(name).attention.self.key", inFeatures: h, outFeatures: h, kind: kind)
        value = try LinearLayer(&layout, "\(name).attention.self.value", inFeatures: h, outFeatures: h, kind: kind)
        attentionOutput = try LinearLayer(&layout, "\(name).attention.output.dense", inFeatures: h, outFeatures: h, kind: kind)
        attentionNorm = try LayerNormLayer(&layout, "\(name).attention.output.LayerNorm", features: h, eps: eps, kind: kind)
        intermediate = try LinearLayer(&layout, "\(name).intermediate.dense", inFeatures: h, outFeatures: c.intermediateSize, kind: kind)
        output = try LinearLayer(&layout, "\(name).output.dense", inFeatures: c.intermediateSize, outFeatures: h, kind: kind)
        outputNorm = try LayerNormLayer(&layout, "\(name).output.LayerNorm", features: h, eps: eps, kind: kind)
        self.index = index
        self.frozen = frozen
        copies = EncoderCopies(frozen: frozen, scratch: scratch)
    }

    func initialize(_ arena: ParameterArena, stream: RandomStream) {
        for (i, linear) in [query, key, value, attentionOutput, intermediate, output].enumerated() {
            linear.initializeNormal(arena, std: 0.02, stream: stream.child(UInt64(i)))
        }
        attentionNorm.initialize(arena)
        outputNorm.initialize(arena)
    }

    /// Hidden dropout in place on `rows` of `features` floats, per sample, with streams keyed by (sample,
    /// layer, site) and each token's mask by its position; rows of no sample are left alone. Forward and
    /// backward are the same operation: multiply by the regenerated mask / (1 - p).
    static func dropout(_ x: UnsafeMutablePointer<Float>, rows: TokenRows, features: Int, probability: Float, site: UInt64, context: PassContext) {
        guard probability > 0 else { return }
        let streams = (0..<rows.batch).map { context.stream(sample: $0, site: site) }
        rows.runs(in: 0..<rows.count) { first, end, sample, position in
            guard let sample else { return }
            let p = x + first * features
            Dropout.forward(output: p, input: p, count: (end - first) * features, probability: probability, stream: streams[sample],
                            first: position * features)
        }
    }

    /// Runs the layer on `x` ([rows, H], the rows of `tokenRows`) as its step of the pass decides; the
    /// output is `activations.hidden2`. The attention runs on the padded layout of geometry `g`.
    func forward(_ arena: ParameterArena, input x: UnsafePointer<Float>, mask: UnsafePointer<Int32>, step: EncoderStep,
                 geometry g: AttentionGeometry, rows tokenRows: TokenRows, config c: BertConfig, context ctx: PassContext) {
        let rows = tokenRows.count, h = c.hiddenSize, inter = c.intermediateSize
        let site = UInt64(index + 1) << 8, a = activations, copying = step.writesCopies
        let c = copies, n = rows * h, padded = tokenRows.isPadded, np = g.batch * g.tokens * h
        let queryCopies = c.forward(c.query, arena).reusingInput(step.inputCopied), keyCopies = c.forward(c.key, arena)
        let valueCopies = c.forward(c.value, arena)
        // Where the products write bf16, the attention reads only the bits of q, k and v (their floats have
        // no room then: the pointers are not read); else their floats. Packed rows are scattered to the
        // attention's padded layout.
        var qkvBF16: (q: UnsafePointer<UInt16>, k: UnsafePointer<UInt16>, v: UnsafePointer<UInt16>)?
        if copying {
            let bits = padded ? scratch.qkvBF16.ensure(3 * n) : scratch.packedQKVBF16.ensure(3 * n)
            if query.forwardBF16(arena, outputBF16: bits, input: x, rows: rows, copies: queryCopies),
               key.forwardBF16(arena, outputBF16: bits + n, input: x, rows: rows, copies: keyCopies),
               value.forwardBF16(arena, outputBF16: bits + 2 * n, input: x, rows: rows, copies: valueCopies) {
                let all = padded ? bits : scratch.qkvBF16.ensure(3 * np)
                if !padded { for j in 0..<3 { tokenRows.scatter(bits + j * n, into: all + j * np, columns: h) } }
                qkvBF16 = (UnsafePointer(all), UnsafePointer(all + np), UnsafePointer(all + 2 * np))
            }
        }
        let (qp, kp, vp) = qkvBF16 != nil ? (a.q.pointer, a.k.pointer, a.v.pointer) : (a.q.ensure(np), a.k.ensure(np), a.v.ensure(np))
        if qkvBF16 == nil {
            let out = padded ? (qp, kp, vp) : { let p = scratch.packedQKV.ensure(3 * n); return (p, p + n, p + 2 * n) }()
            query.forward(arena, output: out.0, input: x, rows: rows, precision: ctx.precision, copies: queryCopies)
            key.forward(arena, output: out.1, input: x, rows: rows, precision: ctx.precision, copies: keyCopies)
            value.forward(arena, output: out.2, input: x, rows: rows, precision: ctx.precision, copies: valueCopies)
            if !padded {
                for (packed, all) in [(out.0, qp), (out.1, kp), (out.2, vp)] { tokenRows.scatter(packed, into: all, columns: h) }
            }
        }
        // The attention's output in bf16 only, where the next product reads it so (nothing reads its floats,
        // which then have no room: the pointer only names the copy); gathered from the padded layout.
        let context = copying ? a.context.pointer : a.context.ensure(rows * h)
        let context16 = copying ? c.attentionOutput.input.room(holding: context, rows: rows, columns: h) : nil
        Attention.forward(output: copying ? nil : padded ? context : scratch.paddedContext.ensure(np),
                          outputBF16: copying ? padded ? context16 : scratch.paddedContextBF16.ensure(np) : nil,
                          probabilities: a.probabilities.ensure(g.probabilitiesCount),
                          q: qp, k: kp, v: vp, qkvBF16: qkvBF16, mask: mask, geometry: g,
                          dropout: attentionDropout(step, geometry: g, context: ctx),
                          precision: ctx.precision, copies: activations.attentionCopies)
        if !padded {
            if let context16 {
                tokenRows.gather(scratch.paddedContextBF16.pointer, into: context16, columns: h)
            } else {
                tokenRows.gather(scratch.paddedContext.pointer, into: context, columns: h)
            }
        }
        let dense = scratch.dense.ensure(rows * h)
        attentionOutput.forward(arena, output: dense, input: context, rows: rows, precision: ctx.precision,
                                copies: c.forward(c.attentionOutput, arena).reusingInput(copying))
        let h1 = a.hidden1.ensure(rows * h)
        // The residual sums only where backward reads them.
        attentionNorm.forwardResidual(arena, sum: step.runsBackward ? a.sum1.ensure(rows * h) : nil, output: h1,
                                      outputBF16: copying ? copies.intermediate.input.room(holding: h1, rows: rows, columns: h) : nil,
                                      mean: a.mean1.ensure(rows), invStd: a.invStd1.ensure(rows), dense: dense, residual: x, rows: rows,
                                      dropout: Self.dropout(step.hiddenDropout, site: site | 2, rows: tokenRows, context: ctx))
        // Where GELU writes only the bf16 bits the output product reads, its floats have no room (the
        // pointer only names the copy).
        let a1 = copying ? a.activated.pointer : a.activated.ensure(rows * inter)
        let intermediateCopies = c.forward(c.intermediate, arena).reusingInput(copying)
        let activated16 = copying ? copies.output.input.room(holding: a1, rows: rows, columns: inter) : nil
        // A frozen layer's GELU is the product's post-op on oneDNN (nothing differentiates it): its bf16
        // output is all the next product reads, and the product's floats have no room (planned so).
        var fused = false
        if frozen, let activated16 {
            fused = intermediate.forwardGELU(arena, outputBF16: activated16, input: h1, rows: rows, copies: intermediateCopies)
        }
        if !fused {
            // A trained layer's GELU reads the product's output in bf16 (autocast's bf16 linear output): its bits
            // alone where the layer writes copies, else its floats rounded.
            if !frozen, copying {
                let i16 = a.innerBF16.ensure(rows * inter)
                if !intermediate.forwardBF16(arena, outputBF16: i16, input: h1, rows: rows, copies: intermediateCopies) {
                    let i1 = a.inner.ensure(rows * inter)
                    intermediate.forward(arena, output: i1, input: h1, rows: rows, precision: ctx.precision, copies: intermediateCopies)
                    BF16.bits(i16, i1, count: rows * inter)
                }
                GELU.forwardBF16(output: activated16!, input: .bf16(i16), count: rows * inter)
            } else {
                let i1 = a.inner.ensure(rows * inter)
                intermediate.forward(arena, output: i1, input: h1, rows: rows, precision: ctx.precision, copies: intermediateCopies)
                if !frozen && ctx.precision == .bf16 { BF16.round(i1, i1, count: rows * inter) }
                if let activated16 {
                    GELU.forwardBF16(output: activated16, input: i1, count: rows * inter)
                } else {
                    GELU.forward(output: a1, input: i1, count: rows * inter)
                }
            }
        }
        let o = scratch.dense.ensure(rows * h)
        output.forward(arena, output: o, input: a1, rows: rows, precision: ctx.precision, copies: c.forward(c.output, arena).reusingInput(copying))
        let h2 = a.hidden2.ensure(rows * h)
        outputNorm.forwardResidual(arena, sum: step.runsBackward ? a.sum2.ensure(rows * h) : nil, output: h2,
                                   outputBF16: step.nextInput?.room(holding: h2, rows: rows, columns: h),
                                   mean: a.mean2.ensure(rows), invStd: a.invStd2.ensure(rows), dense: o, residual: h1, rows: rows,
                                   dropout: Self.dropout(step.hiddenDropout, site: site | 3, rows: tokenRows, context: ctx))
    }

    /// The attention's dropout in this pass (its per-sample streams and where the dropped weights go), nil where it drops nothing.
    func attentionDropout(_ step: EncoderStep, geometry g: AttentionGeometry, context: PassContext) -> AttentionDropout? {
        guard step.attentionDropout > 0 else { return nil }
        let site = UInt64(index + 1) << 8 | 1
        return AttentionDropout(probability: step.attentionDropout, streams: (0..<g.batch).map { context.stream(sample: $0, site: site) },
                                dropped: activations.dropped.ensure(g.probabilitiesCount))
    }

    /// Hidden dropout's probability and per-sample streams for `LayerNorm.forwardResidual`, nil where it drops nothing.
    static func dropout(_ probability: Float, site: UInt64, rows: TokenRows, context: PassContext)
        -> (probability: Float, streams: [RandomStream], rows: TokenRows)? {
        guard probability > 0 else { return nil }
        return (probability, (0..<rows.batch).map { context.stream(sample: $0, site: site) }, rows)
    }

    /// Consumes gradOutput ([rows, H]); writes gradInput, whose only writer it is (the attention's
    /// LayerNorm overwrites it, the query, key and value products add to it), and accumulates the
    /// layer's parameter gradients, as its step of the pass decided.
    func backward(_ arena: ParameterArena, gradInput: UnsafeMutablePointer<Float>?, input x: UnsafePointer<Float>, step: EncoderStep,
                  geometry g: AttentionGeometry, rows tokenRows: TokenRows, config c: BertConfig, context ctx: PassContext) {
        let rows = tokenRows.count, h = c.hiddenSize, inter = c.intermediateSize
        let site = UInt64(index + 1) << 8, a = activations, s = scratch
        let pieces = tokenRows.pieces, padded = tokenRows.isPadded, np = g.batch * g.tokens * h
        // out = LN2(dropout(dense(gelu(dense(h1)))) + h1)
        // LayerNorm's input gradient into the residual branch (dH1) and, through the dropout, the dense layer's
        // (dSum2): where the layer writes copies, its bf16 bits alone, all that the dense layer's products and
        // bias gradient read (its floats have no room then: the pointer only names the copy).
        let copying = step.writesCopies
        let dSum2 = copying ? s.gradDense.pointer : s.gradDense.ensure(rows * h), dH1 = s.gradHidden1.ensure(rows * h)
        outputNorm.backwardResidual(arena, gradResidual: dH1, accumulateResidual: false, gradDense: copying ? nil : dSum2,
                                    gradDenseBF16: copying ? copies.output.gradOutput.room(holding: dSum2, rows: rows, columns: h) : nil,
                                    gradOutput: gradOutput.pointer,
                                    input: a.sum2.pointer, mean: a.mean2.pointer, invStd: a.invStd2.pointer, rows: rows, pieces: pieces,
                                    dropout: Self.dropout(step.hiddenDropout, site: site | 3, rows: tokenRows, context: ctx))
        // dA, dI and dCtx have one writer each: overwritten, not zeroed and accumulated. In bf16, dA is a bf16
        // value (autocast's bf16 input gradient of the output layer): its bits alone where the layer writes
        // copies, else its floats rounded.
        let dA = copying ? s.gradInner.pointer : s.gradInner.ensure(rows * inter), dA16 = copying ? s.gradInnerBF16.ensure(rows * inter) : nil
        output.backward(arena, gradInput: copying ? nil : dA, gradInputBF16: dA16, gradOutput: dSum2, input: a.activated.pointer, rows: rows,
                        precision: ctx.precision, accumulateInput: false, copies: copies.output.reusingGradOutput(copying), pieces: pieces)
        // dInner = dA * gelu'(inner)
        let dI = copying ? s.gradContext.pointer : s.gradContext.ensure(rows * inter)
        if let dA16 {
            // The bits alone: the intermediate layer's products and bias gradient read nothing else.
            GELU.backwardBF16(gradInput: nil, gradInputBF16: copies.intermediate.gradOutput.room(holding: dI, rows: rows, columns: inter),
                              gradOutput: .bf16(dA16), input: .bf16(a.innerBF16.pointer), count: rows * inter)
        } else {
            if ctx.precision == .bf16 { BF16.round(dA, dA, count: rows * inter) }
            GELU.backward(gradInput: dI, gradOutput: dA, input: a.inner.pointer, count: rows * inter, accumulate: false)
        }
        intermediate.backward(arena, gradInput: dH1, gradOutput: dI, input: a.hidden1.pointer, rows: rows, precision: ctx.precision,
                              copies: copies.intermediate.reusingGradOutput(copying), pieces: pieces)
        // h1 = LN1(dropout(dense(attention(x))) + x)
        // The same at the attention's end: the residual branch is this layer's input (nil below a frozen layer).
        let dSum1 = copying ? s.gradDense.pointer : s.gradDense.ensure(rows * h)
        attentionNorm.backwardResidual(arena, gradResidual: gradInput, accumulateResidual: false, gradDense: copying ? nil : dSum1,
                                       gradDenseBF16: copying ? copies.attentionOutput.gradOutput.room(holding: dSum1, rows: rows, columns: h) : nil,
                                       gradOutput: dH1,
                                       input: a.sum1.pointer, mean: a.mean1.pointer, invStd: a.invStd1.pointer, rows: rows, pieces: pieces,
                                       dropout: Self.dropout(step.hiddenDropout, site: site | 2, rows: tokenRows, context: ctx))
        let dCtx = s.gradContext.ensure(rows * h)
        attentionOutput.backward(arena, gradInput: dCtx, gradOutput: dSum1, input: a.context.pointer, rows: rows, precision: ctx.precision,
                                 accumulateInput: false, copies: copies.attentionOutput.reusingGradOutput(copying), pieces: pieces)
        // dq, dk and dv have one writer each, the attention's backward: overwritten, not zeroed and accumulated;
        // where the layer writes copies, as the bf16 bits alone that the three layers' products and bias
        // gradients read (their floats have no room then: the pointers only name the copies).
        let (dq, dk, dv) = copying ? (s.gradQ.pointer, s.gradK.pointer, s.gradV.pointer)
            : (s.gradQ.ensure(rows * h), s.gradK.ensure(rows * h), s.gradV.ensure(rows * h))
        let gradBF16 = copying ? (copies.query.gradOutput.room(holding: dq, rows: rows, columns: h),
                                  copies.key.gradOutput.room(holding: dk, rows: rows, columns: h),
                                  copies.value.gradOutput.room(holding: dv, rows: rows, columns: h)) : nil
        // Packed rows: the attention's output gradient scattered to its padded layout (the padded context's
        // room is free by now: its forward's gather is done), its input gradients gathered from it.
        var gradOutput = UnsafePointer(dCtx), grads = (dq, dk, dv), bits = gradBF16
        if !padded {
            let scattered = s.paddedContext.ensure(np)
            tokenRows.scatter(dCtx, into: scattered, columns: h)
            gradOutput = UnsafePointer(scattered)
            let all = copying ? s.packedQKV.pointer : s.packedQKV.ensure(3 * np)
            grads = (all, all + np, all + 2 * np)
            bits = copying ? { let b = s.qkvBF16.ensure(3 * np); return (b, b + np, b + 2 * np) }() : nil
        }
        Attention.backward(gradQ: grads.0, gradK: grads.1, gradV: grads.2, gradBF16: bits, gradOutput: gradOutput,
                           probabilities: a.probabilities.pointer, q: a.q.pointer, k: a.k.pointer, v: a.v.pointer, geometry: g,
                           workspace: s.attentionWorkspace.ensure(g.workspaceCount), dropout: attentionDropout(step, geometry: g, context: ctx),
                           precision: ctx.precision, copies: activations.attentionCopies, accumulate: false)
        if !padded {
            if let bits, let gradBF16 {
                for (padded, room) in [(bits.0, gradBF16.0), (bits.1, gradBF16.1), (bits.2, gradBF16.2)] {
                    tokenRows.gather(padded, into: room, columns: h)
                }
            } else {
                for (padded, packed) in [(grads.0, dq), (grads.1, dk), (grads.2, dv)] { tokenRows.gather(padded, into: packed, columns: h) }
            }
        }
        query.backward(arena, gradInput: gradInput, gradOutput: dq, input: x, rows: rows, precision: ctx.precision,
                       copies: copies.query.reusingGradOutput(copying), pieces: pieces)
        key.backward(arena, gradInput: gradInput, gradOutput: dk, input: x, rows: rows, precision: ctx.precision,
                     copies: copies.key.reusingGradOutput(copying), pieces: pieces)
        value.backward(arena, gradInput: gradInput, gradOutput: dv, input: x, rows: rows, precision: ctx.precision,
                       copies: copies.value.reusingGradOutput(copying), pieces: pieces)
    }
}

/// The text encoder: token ids and attention mask [B, T] -> last hidden state [B, T, hidden].
public final class BERT {
    public let config: BertConfig
    public let prefix: String
    public let frozenLayers: Int
    public let freezeEmbeddings: Bool
    let wordEmbeddings, positionEmbeddings, tokenTypeEmbeddings: ParameterLayout.Entry
    let embeddingNorm: LayerNormLayer
    let layers: [EncoderLayer]
    /// The arena ranges of the embeddings' and of each layer's parameters (announced as final in backward).
    let embeddingRange: Range<Int>
    let layerRanges: [Range<Int>]
    let embedded = Scratch<Float>(), embeddingOutput = Scratch<Float>(), embeddingMean = Scratch<Float>(), embeddingInvStd = Scratch<Float>()
    let gradEmbeddingOutput = Scratch<Float>(), gradEmbedded = Scratch<Float>(), gradEmbeddingSum = Scratch<Float>()
    let ids = Scratch<Int32>(), mask = Scratch<Int32>()
    /// Where the rows are packed, the last hidden state in the padded layout (its padding zero), and its
    /// gradient gathered into the rows.
    let lastHidden = Scratch<Float>()
    /// Whether `forward` runs the per-token layers on the valid tokens alone (`TokenRows`): the padded
    /// positions' outputs are then zero, not what Hugging Face's model computes for them (which nothing
    /// reads where the output is pooled over the valid tokens, as ConVIRT's is).
    public var packsTokens = false
    /// The last pass's plan (its layers' steps), which its backward follows, and its rows.
    var pass: BERTPass?
    var tokenRows: TokenRows?
    /// The rooms of the largest pass so far, in one activation arena (`BufferPlan`).
    var plan: BufferPlan?

    /// Registers parameters under `prefix` (e.g. "text.") with Hugging Face's names. With
    /// `freezeEmbeddings`, the embeddings are frozen; the first `frozenLayers` encoder layers are frozen.
    public init(config: BertConfig, layout: inout ParameterLayout, prefix: String = "", frozenLayers: Int = 0,
                freezeEmbeddings: Bool? = nil) throws {
        try config.validate()
        try require(frozenLayers >= 0 && frozenLayers <= config.numHiddenLayers, "bert",
                    "cannot freeze \(frozenLayers) of \(config.numHiddenLayers) layers")
        self.config = config
        self.prefix = prefix
        self.frozenLayers = frozenLayers
        let freeze = freezeEmbeddings ?? (frozenLayers > 0)
        self.freezeEmbeddings = freeze
        let kind: ParameterLayout.Kind = freeze ? .frozen : .trainable
        let h = config.hiddenSize
        let start = layout.totalCount
        wordEmbeddings = try layout.add("\(prefix)embeddings.word_embeddings.weight", shape: [config.vocabSize, h], kind: kind)
        positionEmbeddings = try layout.add("\(prefix)embeddings.position_embeddings.weight", shape: [config.maxPositionEmbeddings, h], kind: kind)
        tokenTypeEmbeddings = try layout.add("\(prefix)embeddings.token_type_embeddings.weight", shape: [config.typeVocabSize, h], kind: kind)
        embeddingNorm = try LayerNormLayer(&layout, "\(prefix)embeddings.LayerNorm", features: h, eps: Float(config.layerNormEps), kind: kind)
        embeddingRange = start..<layout.totalCount
        let shared = [LayerActivations(), LayerActivations()], scratch = LayerGradientScratch(), gradOutputs = [Scratch<Float>(), Scratch<Float>()]
        var layers: [EncoderLayer] = [], ranges: [Range<Int>] = []
        for i in 0..<config.numHiddenLayers {
            let (layer, range) = try layout.group {
                try EncoderLayer(&$0, "\(prefix)encoder.layer.\(i)", config: config, index: i, frozen: i < frozenLayers,
                                 activations: i < frozenLayers ? shared[i % 2] : LayerActivations(), scratch: scratch,
                                 gradOutput: gradOutputs[i % 2])
            }
            layers.append(layer)
            ranges.append(range)
        }
        self.layers = layers
        layerRanges = ranges
    }

    /// Hugging Face's initialisation: N(0, 0.02) weights and embeddings, zero biases, LayerNorm 1 and 0.
    public func initialize(_ arena: ParameterArena, stream: RandomStream) {
        for (i, e) in [wordEmbeddings, positionEmbeddings, tokenTypeEmbeddings].enumerated() {
            let p = arena.mutableParams + e.offset, s = stream.child(100, UInt64(i))
            s.fillNormal(p, count: e.count, scale: 0.02)
        }
        embeddingNorm.initialize(arena)
        for (i, layer) in layers.enumerated() { layer.initialize(arena, stream: stream.child(UInt64(i))) }
    }

    /// The first layer whose backward runs (everything before it is frozen).
    var firstTrainableLayer: Int { frozenLayers }
    var needsEmbeddingGradient: Bool { !freezeEmbeddings }

    /// Last hidden state [batch, tokens, hidden]. ids are checked against the vocabulary; every sequence
    /// needs at least one valid token; tokens <= max_position_embeddings. The ids and mask are borrowed
    /// for this call: forward copies them into the arena as it checks them, and backward reads those.
    /// The hidden state is a view of the arena, valid until the next forward. With `packsTokens`, the
    /// per-token layers run on the valid tokens alone and the padded positions' hidden states are zero.
    public func forward(_ arena: ParameterArena, ids inputIds: UnsafePointer<Int32>, mask inputMask: UnsafePointer<Int32>,
                        batch: Int, tokens: Int, context: PassContext) throws -> UnsafePointer<Float> {
        try require(tokens <= config.maxPositionEmbeddings, "bert", "\(tokens) tokens exceed max_position_embeddings \(config.maxPositionEmbeddings)")
        let g = try AttentionGeometry(batch: batch, tokens: tokens, heads: config.numAttentionHeads, headSize: config.headSize)
        let h = config.hiddenSize
        let pass = preparePlan(g, context: context)
        let mp = mask.ensure(batch * tokens)
        for i in 0..<(batch * tokens) {
            let id = inputIds[i]
            try require(id >= 0 && Int(id) < config.vocabSize, "bert", "token id \(id) at position \(i) is outside the vocabulary of \(config.vocabSize)")
            mp[i] = inputMask[i]
        }
        for b in 0..<batch {
            try require((0..<tokens).contains { mp[b * tokens + $0] != 0 }, "bert", "sequence \(b) has no valid token in its attention mask")
        }
        let tokenRows = pass.key.packed ? TokenRows(mask: mp, batch: batch, tokens: tokens, pieceSamples: pass.key.pieceSamples)
            : TokenRows(batch: batch, tokens: tokens, pieceSamples: pass.key.pieceSamples)
        self.tokenRows = tokenRows
        let rows = tokenRows.count
        // Each row's token (a row of no sample: padding at position 0).
        let idp = ids.ensure(rows), pad = Int32(config.padTokenId)
        for r in 0..<rows {
            let p = Int(tokenRows.paddedRows[r])
            idp[r] = p >= 0 ? inputIds[p] : pad
        }
        // embeddings: word[id] + position[t] + token_type[0], LayerNorm, dropout
        let e = embedded.ensure(rows * h), p = arena.params
        Embedding.forward(output: e, table: p + wordEmbeddings.offset, ids: idp, rows: rows, features: h)
        let pos = p + positionEmbeddings.offset, type0 = p + tokenTypeEmbeddings.offset
        for r in 0..<rows {
            let row = e + r * h, pr = pos + max(0, Int(tokenRows.paddedRows[r])) % tokens * h
            for j in 0..<h { row[j] += pr[j] + type0[j] }
        }
        let out = embeddingOutput.ensure(rows * h)
        embeddingNorm.forward(arena, output: out, mean: embeddingMean.ensure(rows), invStd: embeddingInvStd.ensure(rows), input: e, rows: rows)
        EncoderLayer.dropout(out, rows: tokenRows, features: h, probability: pass.embeddingDropout, site: 1, context: context)
        var x = UnsafePointer(out)
        for (layer, step) in zip(layers, pass.layers) {
            layer.forward(arena, input: x, mask: mp, step: step, geometry: g, rows: tokenRows, config: config, context: context)
            x = UnsafePointer(layer.activations.hidden2.pointer)
        }
        guard !tokenRows.isPadded else { return x }
        let padded = lastHidden.ensure(batch * tokens * h)
        tokenRows.scatter(x, into: padded, columns: h)
        return UnsafePointer(padded)
    }

    /// Accumulates gradients of the trainable layers from gradLastHidden [batch, tokens, hidden]. Frozen
    /// layers and frozen embeddings are skipped entirely.
    public func backward(_ arena: ParameterArena, gradLastHidden: UnsafePointer<Float>, context: PassContext) throws {
        guard let pass, let tokenRows else { preconditionFailure("backward before forward") }
        let rows = tokenRows.count, h = config.hiddenSize
        // The gradient of the rows' hidden states.
        func gradRows(into destination: UnsafeMutablePointer<Float>) {
            if tokenRows.isPadded {
                destination.update(from: gradLastHidden, count: rows * h)
            } else {
                tokenRows.gather(gradLastHidden, into: destination, columns: h)
            }
        }
        if layers.isEmpty {
            if needsEmbeddingGradient {
                let top = lastHidden.ensure(rows * h)
                gradRows(into: top)
                embeddingBackward(arena, gradOutput: top, pass: pass, context: context)
                try context.gradientsReady?(embeddingRange)
            }
            return
        }
        gradRows(into: layers[layers.count - 1].gradOutput.ensure(rows * h))
        for k in stride(from: layers.count - 1, through: firstTrainableLayer, by: -1) {
            let input = k == 0 ? UnsafePointer(embeddingOutput.pointer) : UnsafePointer(layers[k - 1].activations.hidden2.pointer)
            let needInputGradient = k > firstTrainableLayer || (k == 0 && needsEmbeddingGradient)
            let gradInput: UnsafeMutablePointer<Float>? = needInputGradient ? (k == 0 ? gradEmbeddingOutput.pointer : layers[k - 1].gradOutput.pointer) : nil
            layers[k].backward(arena, gradInput: gradInput, input: input, step: pass.layers[k], geometry: pass.geometry, rows: tokenRows, config: config,
                               context: context)
            try context.gradientsReady?(layerRanges[k])
        }
        if firstTrainableLayer == 0 && needsEmbeddingGradient {
            embeddingBackward(arena, gradOutput: gradEmbeddingOutput.pointer, pass: pass, context: context)
            try context.gradientsReady?(embeddingRange)
        }
    }

    private func embeddingBackward(_ arena: ParameterArena, gradOutput: UnsafePointer<Float>, pass: BERTPass, context: PassContext) {
        guard let tokenRows else { return }
        let rows = tokenRows.count, h = config.hiddenSize, tokens = pass.geometry.tokens
        let dOut = gradEmbedded.ensure(rows * h)
        dOut.update(from: gradOutput, count: rows * h)
        EncoderLayer.dropout(dOut, rows: tokenRows, features: h, probability: pass.embeddingDropout, site: 1, context: context)
        let dE = gradEmbeddingSum.zeroed(rows * h)
        embeddingNorm.backward(arena, gradInput: dE, gradOutput: dOut, input: embedded.pointer, mean: embeddingMean.pointer,
                               invStd: embeddingInvStd.pointer, rows: rows, pieces: tokenRows.pieces)
        let gr = arena.grads
        Embedding.backward(gradTable: gr + wordEmbeddings.offset, gradOutput: dE, ids: ids.pointer, rows: rows, features: h,
                           paddingIndex: Int32(config.padTokenId))
        let dPos = gr + positionEmbeddings.offset, dType = gr + tokenTypeEmbeddings.offset
        for r in 0..<rows {
            let row = dE + r * h, pr = dPos + max(0, Int(tokenRows.paddedRows[r])) % tokens * h
            for j in 0..<h { pr[j] += row[j]; dType[j] += row[j] }
        }
    }
}
