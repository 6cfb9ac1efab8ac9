// ConVIRT as the paper writes it (Zhang et al. 2020, Sec. 2), in fp32 on one process: the oracle the
// fast `ConVIRTModel` and its distributed loss are held to.
//   v = normalize(g_v(ResNet(x_v)))          g = Linear -> ReLU -> Linear
//   u = normalize(g_u(max_t BERT(x_u)_t))    max over the valid tokens
//   L = lambda * mean_i CE(v_i . U^T / tau, i) + (1 - lambda) * mean_i CE(u_i . V^T / tau, i)
// Each step is one call of a plain kernel on views of one activation arena; backward runs the calls in
// reverse. The encoders are `ReferenceResNet` and `ReferenceBERT`, with the whole model's names.

import ConvirtCore

public final class ReferenceConVIRT {
    /// g = Linear -> ReLU -> Linear (`<prefix>0.*`, `<prefix>2.*`, as nn.Sequential names them).
    struct Head { let first, second: (weight: ParameterLayout.Entry, bias: ParameterLayout.Entry) }

    public let config: ConVIRTConfig
    public let layout: ParameterLayout
    public let image: ReferenceResNet
    public let text: ReferenceBERT
    let imageHead, textHead: Head

    public init(config: ConVIRTConfig) throws {
        try config.validate()
        self.config = config
        var layout = ParameterLayout()
        image = try ReferenceResNet(config: config.image, layout: &layout, prefix: "image.")
        text = try ReferenceBERT(config: config.text, layout: &layout, prefix: "text.", frozenLayers: config.frozenLayers)
        func head(_ prefix: String, _ inFeatures: Int) throws -> Head {
            func linear(_ name: String, _ i: Int, _ o: Int) throws -> (ParameterLayout.Entry, ParameterLayout.Entry) {
                (try layout.add("\(prefix)\(name).weight", shape: [o, i]), try layout.add("\(prefix)\(name).bias", shape: [o]))
            }
            return Head(first: try linear("0", inFeatures, config.projHidden), second: try linear("2", config.projHidden, config.projDim))
        }
        imageHead = try head("image_head.", config.image.featureCount)
        textHead = try head("text_head.", config.text.hiddenSize)
        self.layout = layout
    }

    // MARK: - Activations

    /// A head's views: the two linear layers' outputs, the ReLU between them, the L2 normalisation and
    /// its norms, and their gradients.
    struct HeadViews {
        let hidden, relu: ActivationTable.View                 // [B, P] each
        let projected, embeddings: ActivationTable.View        // [B, D] each
        let norms: ActivationTable.View                        // [B]
        let gradHidden, gradReLU: ActivationTable.View         // [B, P] each
        let gradProjected, gradEmbeddings: ActivationTable.View  // [B, D] each
    }

    /// The arena of one step over `batch` pairs: the encoders' arenas, and the heads' and the loss's views.
    public final class Activations {
        public let batch: Int
        public let image: ReferenceResNet.Activations
        public let text: ReferenceBERT.Activations
        public let arena: ActivationArena
        let features, gradFeatures: ActivationTable.View      // [B, F] the image features (a copy, read by the head)
        let pooled, gradPooled: ActivationTable.View          // [B, H] the text features
        let poolIndices: ActivationTable.View                 // [B, H] Int32: the token of each maximum
        let gradHiddenStates: ActivationTable.View            // [B, T, H] the last hidden state's gradient
        let imageHead, textHead: HeadViews
        let logits, probabilities: ActivationTable.View       // [2, B, B]: v.U^T / tau, then u.V^T / tau
        let gradLogits: ActivationTable.View                  // [2, B, B]
        let losses, gradLosses: ActivationTable.View          // [2, B]
        let targets: ActivationTable.View                     // [B] Int32: pair i's column is i
        let gradients: [ActivationTable.View]

        init(_ model: ReferenceConVIRT, batch: Int, size: Int, tokens: Int) throws {
            self.batch = batch
            image = try model.image.activations(batch: batch, size: size)
            text = try model.text.activations(batch: batch, tokens: tokens)
            let c = model.config, f = c.image.featureCount, h = c.text.hiddenSize, p = c.projHidden, d = c.projDim
            var t = ActivationTable(), gradients: [ActivationTable.View] = []
            func head(_ name: String) -> HeadViews {
                let v = HeadViews(hidden: t.add("\(name).0", [batch, p]), relu: t.add("\(name).relu", [batch, p]),
                                  projected: t.add("\(name).2", [batch, d]), embeddings: t.add("\(name).normalized", [batch, d]),
                                  norms: t.add("\(name).norms", [batch]),
                                  gradHidden: t.add("\(name).0.grad", [batch, p]), gradReLU: t.add("\(name).relu.grad", [batch, p]),
                                  gradProjected: t.add("\(name).2.grad", [batch, d]), gradEmbeddings: t.add("\(name).normalized.grad", [batch, d]))
                gradients += [v.gradHidden, v.gradReLU, v.gradProjected, v.gradEmbeddings]
                return v
            }
            features = t.add("image.features", [batch, f])
            gradFeatures = t.add("image.features.grad", [batch, f])
            pooled = t.add("text.pooled", [batch, h])
            gradPooled = t.add("text.pooled.grad", [batch, h])
            poolIndices = t.add("text.pool.indices", [batch, h], .int32)
            gradHiddenStates = t.add("text.last_hidden.grad", [batch, tokens, h])
            imageHead = head("image_head")
            textHead = head("text_head")
            logits = t.add("logits", [2, batch, batch])
            probabilities = t.add("probabilities", [2, batch, batch])
            gradLogits = t.add("logits.grad", [2, batch, batch])
            losses = t.add("losses", [2, batch])
            gradLosses = t.add("losses.grad", [2, batch])
            targets = t.add("targets", [batch], .int32)
            self.gradients = gradients + [gradFeatures, gradPooled, gradHiddenStates, gradLogits]
            arena = ActivationArena(t)
        }
    }

    public func activations(batch: Int, size: Int, tokens: Int) throws -> Activations {
        try Activations(self, batch: batch, size: size, tokens: tokens)
    }

    // MARK: - Forward and backward

    /// The loss of `batch` pairs (images [B, 3, S, S], ids and mask [B, T]) and its two directions.
    public func forward(_ params: ParameterArena, images: UnsafePointer<Float>, ids: UnsafePointer<Int32>, mask: UnsafePointer<Int32>,
                        _ a: Activations, context: PassContext) throws -> ConVIRTLoss.Value {
        let x = a.arena, b = a.batch, g = a.text.geometry
        let features = try image.forward(params, images: images, a.image, context: context)
        x[a.features].update(from: features, count: a.features.count)
        head(params, imageHead, a.imageHead, input: a.features, a)
        let hidden = try text.forward(params, ids: ids, mask: mask, a.text, context: context)
        MaskedMaxPool.forward(output: x[a.pooled], indices: x.int32s(a.poolIndices), input: hidden, mask: mask, batch: b,
                              tokens: g.tokens, channels: config.text.hiddenSize)
        head(params, textHead, a.textHead, input: a.pooled, a)
        return loss(a)
    }

    /// The image and text embeddings v and u [batch, projDim] of the last `forward`.
    public func embeddings(_ a: Activations) -> (v: UnsafePointer<Float>, u: UnsafePointer<Float>) {
        (UnsafePointer(a.arena[a.imageHead.embeddings]), UnsafePointer(a.arena[a.textHead.embeddings]))
    }

    /// Adds every trainable parameter's gradient of the loss of the last `forward` into params.grads.
    public func backward(_ params: ParameterArena, _ a: Activations, context: PassContext) throws {
        let x = a.arena, b = a.batch, g = a.text.geometry
        x.zero(a.gradients)
        lossBackward(a)
        headBackward(params, imageHead, a.imageHead, input: a.features, gradInput: a.gradFeatures, a)
        try image.backward(params, gradFeatures: x[a.gradFeatures], a.image, context: context)
        headBackward(params, textHead, a.textHead, input: a.pooled, gradInput: a.gradPooled, a)
        MaskedMaxPool.backward(gradInput: x[a.gradHiddenStates], gradOutput: x[a.gradPooled], indices: x.int32s(a.poolIndices), batch: b,
                               tokens: g.tokens, channels: config.text.hiddenSize)
        try text.backward(params, gradLastHidden: x[a.gradHiddenStates], a.text, context: context)
    }

    /// normalize(Linear(ReLU(Linear(input)))).
    private func head(_ params: ParameterArena, _ h: Head, _ v: HeadViews, input: ActivationTable.View, _ a: Activations) {
        let x = a.arena, p = params.params, b = a.batch
        Linear.forward(output: x[v.hidden], input: x[input], weight: p + h.first.weight.offset, bias: p + h.first.bias.offset,
                       rows: b, inFeatures: input.count / b, outFeatures: config.projHidden)
        ReLU.forward(output: x[v.relu], input: x[v.hidden], count: v.relu.count)
        Linear.forward(output: x[v.projected], input: x[v.relu], weight: p + h.second.weight.offset, bias: p + h.second.bias.offset,
                       rows: b, inFeatures: config.projHidden, outFeatures: config.projDim)
        L2Normalize.forward(output: x[v.embeddings], norms: x[v.norms], input: x[v.projected], rows: b, features: config.projDim)
    }

    private func headBackward(_ params: ParameterArena, _ h: Head, _ v: HeadViews, input: ActivationTable.View, gradInput: ActivationTable.View,
                              _ a: Activations) {
        let x = a.arena, p = params.params, d = params.grads, b = a.batch
        L2Normalize.backward(gradInput: x[v.gradProjected], gradOutput: x[v.gradEmbeddings], output: x[v.embeddings], norms: x[v.norms],
                             rows: b, features: config.projDim)
        Linear.backward(gradInput: x[v.gradReLU], gradWeight: d + h.second.weight.offset, gradBias: d + h.second.bias.offset,
                        gradOutput: x[v.gradProjected], input: x[v.relu], weight: p + h.second.weight.offset, rows: b,
                        inFeatures: config.projHidden, outFeatures: config.projDim)
        ReLU.backward(gradInput: x[v.gradHidden], gradOutput: x[v.gradReLU], output: x[v.relu], count: v.relu.count)
        Linear.backward(gradInput: x[gradInput], gradWeight: d + h.first.weight.offset, gradBias: d + h.first.bias.offset,
                        gradOutput: x[v.gradHidden], input: x[input], weight: p + h.first.weight.offset, rows: b,
                        inFeatures: input.count / b, outFeatures: config.projHidden)
    }

    /// The two directions' cross-entropies over the cosine similarities / tau, weighted lambda and 1 - lambda.
    private func loss(_ a: Activations) -> ConVIRTLoss.Value {
        let x = a.arena, b = a.batch, d = config.projDim, scale = Float(1 / config.tau)
        for i in 0..<b { x.int32s(a.targets)[i] = Int32(i) }
        var shares = [0.0, 0.0]
        for (direction, (rows, columns)) in [(a.imageHead, a.textHead), (a.textHead, a.imageHead)].enumerated() {
            let logits = x[a.logits] + direction * b * b
            Linear.forward(output: logits, input: x[rows.embeddings], weight: x[columns.embeddings], bias: nil, rows: b, inFeatures: d, outFeatures: b)
            for i in 0..<(b * b) { logits[i] *= scale }
            CrossEntropy.forward(losses: x[a.losses] + direction * b, probabilities: x[a.probabilities] + direction * b * b, logits: logits,
                                 targets: x.int32s(a.targets), rows: b, classes: b)
            shares[direction] = (0..<b).reduce(0.0) { $0 + Double(x[a.losses][direction * b + $1]) } / Double(b)
        }
        return ConVIRTLoss.Value(loss: config.lambda * shares[0] + (1 - config.lambda) * shares[1], imageToText: shares[0], textToImage: shares[1])
    }

    private func lossBackward(_ a: Activations) {
        let x = a.arena, b = a.batch, d = config.projDim, scale = Float(1 / config.tau)
        for (direction, (rows, columns)) in [(a.imageHead, a.textHead), (a.textHead, a.imageHead)].enumerated() {
            let weight = direction == 0 ? config.lambda : 1 - config.lambda
            let gradLosses = x[a.gradLosses] + direction * b, gradLogits = x[a.gradLogits] + direction * b * b
            for i in 0..<b { gradLosses[i] = Float(weight / Double(b)) }
            CrossEntropy.backward(gradLogits: gradLogits, gradLosses: gradLosses, probabilities: x[a.probabilities] + direction * b * b,
                                  targets: x.int32s(a.targets), rows: b, classes: b)
            for i in 0..<(b * b) { gradLogits[i] *= scale }
            // logits = rows . columns^T: the rows' gradient is gradLogits . columns, the columns' gradLogits^T . rows.
            Linear.backward(gradInput: x[rows.gradEmbeddings], gradWeight: x[columns.gradEmbeddings], gradBias: nil, gradOutput: gradLogits,
                            input: x[rows.embeddings], weight: x[columns.embeddings], rows: b, inFeatures: d, outFeatures: b)
        }
    }
}
