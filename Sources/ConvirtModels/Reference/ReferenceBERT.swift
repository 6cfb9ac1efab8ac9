// BERT as the architecture reads (Devlin et al. 2019, Hugging Face's BertModel: post-LN encoder layers,
// erf GELU, the padding mask as probability 0 on padded keys), in fp32: the oracle the fast `BERT` is held
// to. Every layer is one call of a plain kernel on views of one activation arena (`ActivationArena`);
// forward is the list of calls, backward the same list reversed, each gradient added into its input's
// view. Dropout draws from the pass's streams keyed by (sample, site) as the fast model does, so the two
// compute the same masks. Parameters carry Hugging Face's names in the order `BERT` registers them.

import ConvirtCore

public final class ReferenceBERT {
    struct Linear { let weight, bias: ParameterLayout.Entry; let inFeatures, outFeatures: Int }
    struct Norm { let gamma, beta: ParameterLayout.Entry }
    struct Layer { let query, key, value, attentionOutput: Linear; let attentionNorm: Norm
                   let intermediate, output: Linear; let outputNorm: Norm }

    public let config: BertConfig
    public let frozenLayers: Int
    let word, position, tokenType: ParameterLayout.Entry
    let embeddingNorm: Norm
    let layers: [Layer]
    let freezeEmbeddings: Bool

    /// Registers the parameters under `prefix` as `BERT` does: the embeddings and the first
    /// `frozenLayers` layers frozen where `frozenLayers` > 0.
    public init(config: BertConfig, layout: inout ParameterLayout, prefix: String = "", frozenLayers: Int = 0) throws {
        try config.validate()
        self.config = config
        self.frozenLayers = frozenLayers
        freezeEmbeddings = frozenLayers > 0
        let h = config.hiddenSize
        func linear(_ name: String, _ i: Int, _ o: Int, _ kind: ParameterLayout.Kind) throws -> Linear {
            Linear(weight: try layout.add("\(name).weight", shape: [o, i], kind: kind), bias: try layout.add("\(name).bias", shape: [o], kind: kind),
                   inFeatures: i, outFeatures: o)
        }
        func norm(_ name: String, _ kind: ParameterLayout.Kind) throws -> Norm {
            Norm(gamma: try layout.add("\(name).weight", shape: [h], kind: kind), beta: try layout.add("\(name).bias", shape: [h], kind: kind))
        }
        let e: ParameterLayout.Kind = freezeEmbeddings ? .frozen : .trainable
        word = try layout.add("\(prefix)embeddings.word_embeddings.weight", shape: [config.vocabSize, h], kind: e)
        position = try layout.add("\(prefix)embeddings.position_embeddings.weight", shape: [config.maxPositionEmbeddings, h], kind: e)
        tokenType = try layout.add("\(prefix)embeddings.token_type_embeddings.weight", shape: [config.typeVocabSize, h], kind: e)
        embeddingNorm = try norm("\(prefix)embeddings.LayerNorm", e)
        layers = try (0..<config.numHiddenLayers).map { i in
            let n = "\(prefix)encoder.layer.\(i)", k: ParameterLayout.Kind = i < frozenLayers ? .frozen : .trainable
            return Layer(query: try linear("\(n).attention.self.query", h, h, k), key: try linear("\(n).attention.self.key", h, h, k),
                         value: try linear("\(n).attention.self.value", h, h, k),
                         attentionOutput: try linear("\(n).attention.output.dense", h, h, k),
                         attentionNorm: try norm("\(n).attention.output.LayerNorm", k),
                         intermediate: try linear("\(n).intermediate.dense", h, config.intermediateSize, k),
                         output: try linear("\(n).output.dense", config.intermediateSize, h, k),
                         outputNorm: try norm("\(n).output.LayerNorm", k))
        }
    }

    // MARK: - Activations

    /// A LayerNorm's output, the statistics it keeps for backward, and the output's gradient.
    struct NormViews {
        let output, gradOutput: ActivationTable.View  // [rows, H] each
        let mean, invStd: ActivationTable.View        // [rows] each
    }

    /// A residual end's views: dropout(dense) + residual, and its LayerNorm.
    struct ResidualViews {
        let dense, dropped, sum: ActivationTable.View              // [rows, H] each
        let norm: NormViews
        let gradDense, gradDropped, gradSum: ActivationTable.View  // [rows, H] each
        var output: ActivationTable.View { norm.output }
        var gradOutput: ActivationTable.View { norm.gradOutput }
    }

    /// One encoder layer's views.
    struct LayerViews {
        let q, k, v, context: ActivationTable.View                  // [rows, H] each
        let probabilities, dropped: ActivationTable.View            // [B, heads, T, T] each
        let attention: ResidualViews                                // attention.output: dense, dropout, + input, LayerNorm
        let inner, activated: ActivationTable.View                  // [rows, I] each: intermediate.dense, its GELU
        let output: ResidualViews                                   // output: dense, dropout, + attention's output, LayerNorm
        let gradQ, gradK, gradV, gradContext: ActivationTable.View  // [rows, H] each
        let gradInner, gradActivated: ActivationTable.View          // [rows, I] each
    }

    /// The activation arena of one pass over `batch` sequences of `tokens` tokens, and its views.
    public final class Activations {
        public let geometry: AttentionGeometry
        public let arena: ActivationArena
        let ids, mask: ActivationTable.View                          // [B, T] Int32 each
        let embedded, gradEmbedded: ActivationTable.View             // [rows, H]: word + position + token type
        let embeddingNorm: NormViews                                 // its LayerNorm
        let embeddings, gradEmbeddings: ActivationTable.View         // [rows, H]: the LayerNorm's output after dropout
        let layers: [LayerViews]
        let workspace: ActivationTable.View                          // attention's backward scratch
        let gradients: [ActivationTable.View]
        var lastHidden: ActivationTable.View { layers.last?.output.output ?? embeddings }
        var gradLastHidden: ActivationTable.View { layers.last?.output.gradOutput ?? gradEmbeddings }

        init(_ model: ReferenceBERT, batch: Int, tokens: Int) throws {
            let c = model.config
            geometry = try AttentionGeometry(batch: batch, tokens: tokens, heads: c.numAttentionHeads, headSize: c.headSize)
            let rows = batch * tokens, h = c.hiddenSize, i = c.intermediateSize
            var t = ActivationTable(), gradients: [ActivationTable.View] = []
            func norm(_ name: String) -> NormViews {
                let n = NormViews(output: t.add("\(name).norm", [rows, h]), gradOutput: t.add("\(name).norm.grad", [rows, h]),
                                  mean: t.add("\(name).mean", [rows]), invStd: t.add("\(name).inv_std", [rows]))
                gradients.append(n.gradOutput)
                return n
            }
            func residual(_ name: String) -> ResidualViews {
                let r = ResidualViews(dense: t.add("\(name).dense", [rows, h]), dropped: t.add("\(name).dropped", [rows, h]),
                                      sum: t.add("\(name).sum", [rows, h]), norm: norm(name),
                                      gradDense: t.add("\(name).dense.grad", [rows, h]), gradDropped: t.add("\(name).dropped.grad", [rows, h]),
                                      gradSum: t.add("\(name).sum.grad", [rows, h]))
                gradients += [r.gradDense, r.gradDropped, r.gradSum]
                return r
            }
            ids = t.add("ids", [batch, tokens], .int32)
            mask = t.add("mask", [batch, tokens], .int32)
            embedded = t.add("embeddings.sum", [rows, h])
            gradEmbedded = t.add("embeddings.sum.grad", [rows, h])
            embeddingNorm = norm("embeddings")
            embeddings = t.add("embeddings", [rows, h])
            gradEmbeddings = t.add("embeddings.grad", [rows, h])
            gradients += [gradEmbedded, gradEmbeddings]
            let p = [batch, c.numAttentionHeads, tokens, tokens]
            layers = (0..<c.numHiddenLayers).map { k in
                let n = "layer\(k)"
                let q = t.add("\(n).q", [rows, h]), kv = t.add("\(n).k", [rows, h]), v = t.add("\(n).v", [rows, h])
                let probabilities = t.add("\(n).probabilities", p), dropped = t.add("\(n).probabilities.dropped", p)
                let context = t.add("\(n).context", [rows, h])
                let attention = residual("\(n).attention")
                let inner = t.add("\(n).intermediate", [rows, i]), activated = t.add("\(n).gelu", [rows, i])
                let output = residual("\(n).output")
                let l = LayerViews(q: q, k: kv, v: v, context: context, probabilities: probabilities, dropped: dropped, attention: attention,
                                   inner: inner, activated: activated, output: output,
                                   gradQ: t.add("\(n).q.grad", [rows, h]), gradK: t.add("\(n).k.grad", [rows, h]),
                                   gradV: t.add("\(n).v.grad", [rows, h]), gradContext: t.add("\(n).context.grad", [rows, h]),
                                   gradInner: t.add("\(n).intermediate.grad", [rows, i]), gradActivated: t.add("\(n).gelu.grad", [rows, i]))
                gradients += [l.gradQ, l.gradK, l.gradV, l.gradContext, l.gradInner, l.gradActivated]
                return l
            }
            workspace = t.add("attention workspace", [geometry.workspaceCount])
            self.gradients = gradients
            arena = ActivationArena(t)
        }
    }

    public func activations(batch: Int, tokens: Int) throws -> Activations { try Activations(self, batch: batch, tokens: tokens) }

    // MARK: - Forward and backward

    /// The last hidden state [batch, tokens, hidden] of ids and mask [batch, tokens] (copied into the arena).
    public func forward(_ params: ParameterArena, ids: UnsafePointer<Int32>, mask: UnsafePointer<Int32>, _ a: Activations,
                        context: PassContext) throws -> UnsafePointer<Float> {
        let x = a.arena, p = params.params, g = a.geometry, h = config.hiddenSize, rows = g.batch * g.tokens
        for r in 0..<rows {
            try require(ids[r] >= 0 && Int(ids[r]) < config.vocabSize, "bert", "token id \(ids[r]) at position \(r) is outside the vocabulary")
        }
        x.int32s(a.ids).update(from: ids, count: rows)
        x.int32s(a.mask).update(from: mask, count: rows)
        // Embeddings: word[id] + position[t] + token_type[0], LayerNorm, dropout.
        let e = x[a.embedded]
        Embedding.forward(output: e, table: p + word.offset, ids: ids, rows: rows, features: h)
        for r in 0..<rows {
            let position = p + position.offset + (r % g.tokens) * h, type0 = p + tokenType.offset
            for j in 0..<h { e[r * h + j] += position[j] + type0[j] }
        }
        layerNorm(params, embeddingNorm, input: a.embedded, a.embeddingNorm, a)
        dropout(input: a.embeddingNorm.output, output: a.embeddings, site: 1, a, context)
        var input = a.embeddings
        for (k, (layer, v)) in zip(layers, a.layers).enumerated() {
            encoderLayer(params, layer, v, index: k, input: input, a, context)
            input = v.output.output
        }
        return UnsafePointer(x[input])
    }

    /// One post-LN encoder layer: h1 = LN(dropout(dense(attention(x))) + x); out = LN(dropout(dense(gelu(dense(h1)))) + h1).
    private func encoderLayer(_ params: ParameterArena, _ l: Layer, _ v: LayerViews, index: Int, input: ActivationTable.View,
                              _ a: Activations, _ context: PassContext) {
        let x = a.arena, site = UInt64(index + 1) << 8
        linear(params, l.query, input: input, output: v.q, a)
        linear(params, l.key, input: input, output: v.k, a)
        linear(params, l.value, input: input, output: v.v, a)
        Attention.forward(output: x[v.context], probabilities: x[v.probabilities], q: x[v.q], k: x[v.k], v: x[v.v], mask: x.int32s(a.mask),
                          geometry: a.geometry, dropout: attentionDropout(v, site: site | 1, a, context))
        residualEnd(params, l.attentionOutput, l.attentionNorm, v.attention, input: v.context, residual: input, site: site | 2, a, context)
        linear(params, l.intermediate, input: v.attention.output, output: v.inner, a)
        GELU.forward(output: x[v.activated], input: x[v.inner], count: v.inner.count)
        residualEnd(params, l.output, l.outputNorm, v.output, input: v.activated, residual: v.attention.output, site: site | 3, a, context)
    }

    /// LN(dropout(dense(input)) + residual).
    private func residualEnd(_ params: ParameterArena, _ dense: Linear, _ norm: Norm, _ v: ResidualViews, input: ActivationTable.View,
                             residual: ActivationTable.View, site: UInt64, _ a: Activations, _ context: PassContext) {
        linear(params, dense, input: input, output: v.dense, a)
        dropout(input: v.dense, output: v.dropped, site: site, a, context)
        Residual.forward(output: a.arena[v.sum], a.arena[v.dropped], a.arena[residual], count: v.sum.count)
        layerNorm(params, norm, input: v.sum, v.norm, a)
    }

    /// Adds the trainable parameters' gradients into params.grads, from gradLastHidden [batch, tokens,
    /// hidden]. Frozen layers and embeddings get none (their backward does not run).
    public func backward(_ params: ParameterArena, gradLastHidden: UnsafePointer<Float>, _ a: Activations, context: PassContext) throws {
        let x = a.arena
        x.zero(a.gradients)
        x[a.gradLastHidden].update(from: gradLastHidden, count: a.gradLastHidden.count)
        for k in stride(from: layers.count - 1, through: frozenLayers, by: -1) {
            let input = k == 0 ? a.embeddings : a.layers[k - 1].output.output
            let gradInput = k == 0 ? a.gradEmbeddings : a.layers[k - 1].output.gradOutput
            encoderLayerBackward(params, layers[k], a.layers[k], index: k, input: input, gradInput: gradInput, a, context)
        }
        guard !freezeEmbeddings else { return }
        let g = a.geometry, h = config.hiddenSize, d = params.grads
        dropoutBackward(gradOutput: a.gradEmbeddings, gradInput: a.embeddingNorm.gradOutput, site: 1, a, context)
        layerNormBackward(params, embeddingNorm, input: a.embedded, gradInput: a.gradEmbedded, a.embeddingNorm, a)
        let dE = x[a.gradEmbedded]
        Embedding.backward(gradTable: d + word.offset, gradOutput: dE, ids: x.int32s(a.ids), rows: g.batch * g.tokens, features: h,
                           paddingIndex: Int32(config.padTokenId))
        for r in 0..<(g.batch * g.tokens) {
            let position = d + position.offset + (r % g.tokens) * h, type0 = d + tokenType.offset
            for j in 0..<h { position[j] += dE[r * h + j]; type0[j] += dE[r * h + j] }
        }
    }

    private func encoderLayerBackward(_ params: ParameterArena, _ l: Layer, _ v: LayerViews, index: Int, input: ActivationTable.View,
                                      gradInput: ActivationTable.View, _ a: Activations, _ context: PassContext) {
        let x = a.arena, site = UInt64(index + 1) << 8
        residualEndBackward(params, l.output, l.outputNorm, v.output, input: v.activated, gradInput: v.gradActivated,
                            gradResidual: v.attention.gradOutput, site: site | 3, a, context)
        GELU.backward(gradInput: x[v.gradInner], gradOutput: x[v.gradActivated], input: x[v.inner], count: v.inner.count, accumulate: true)
        linearBackward(params, l.intermediate, input: v.attention.output, gradOutput: v.gradInner, gradInput: v.attention.gradOutput, a)
        residualEndBackward(params, l.attentionOutput, l.attentionNorm, v.attention, input: v.context, gradInput: v.gradContext,
                            gradResidual: gradInput, site: site | 2, a, context)
        Attention.backward(gradQ: x[v.gradQ], gradK: x[v.gradK], gradV: x[v.gradV], gradOutput: x[v.gradContext],
                           probabilities: x[v.probabilities], q: x[v.q], k: x[v.k], v: x[v.v], geometry: a.geometry, workspace: x[a.workspace],
                           dropout: attentionDropout(v, site: site | 1, a, context))
        linearBackward(params, l.query, input: input, gradOutput: v.gradQ, gradInput: gradInput, a)
        linearBackward(params, l.key, input: input, gradOutput: v.gradK, gradInput: gradInput, a)
        linearBackward(params, l.value, input: input, gradOutput: v.gradV, gradInput: gradInput, a)
    }

    private func residualEndBackward(_ params: ParameterArena, _ dense: Linear, _ norm: Norm, _ v: ResidualViews, input: ActivationTable.View,
                                     gradInput: ActivationTable.View, gradResidual: ActivationTable.View, site: UInt64, _ a: Activations,
                                     _ context: PassContext) {
        let x = a.arena
        layerNormBackward(params, norm, input: v.sum, gradInput: v.gradSum, v.norm, a)
        Residual.backward(gradA: x[v.gradDropped], gradB: x[gradResidual], gradOutput: x[v.gradSum], count: v.sum.count)
        dropoutBackward(gradOutput: v.gradDropped, gradInput: v.gradDense, site: site, a, context)
        linearBackward(params, dense, input: input, gradOutput: v.gradDense, gradInput: gradInput, a)
    }

    // MARK: - The layers

    private func linear(_ params: ParameterArena, _ l: Linear, input: ActivationTable.View, output: ActivationTable.View, _ a: Activations) {
        let p = params.params
        ConvirtCore.Linear.forward(output: a.arena[output], input: a.arena[input], weight: p + l.weight.offset, bias: p + l.bias.offset,
                                   rows: input.count / l.inFeatures, inFeatures: l.inFeatures, outFeatures: l.outFeatures)
    }

    private func linearBackward(_ params: ParameterArena, _ l: Linear, input: ActivationTable.View, gradOutput: ActivationTable.View,
                                gradInput: ActivationTable.View, _ a: Activations) {
        ConvirtCore.Linear.backward(gradInput: a.arena[gradInput], gradWeight: params.grads + l.weight.offset, gradBias: params.grads + l.bias.offset,
                                    gradOutput: a.arena[gradOutput], input: a.arena[input], weight: params.params + l.weight.offset,
                                    rows: input.count / l.inFeatures, inFeatures: l.inFeatures, outFeatures: l.outFeatures)
    }

    private func layerNorm(_ params: ParameterArena, _ n: Norm, input: ActivationTable.View, _ v: NormViews, _ a: Activations) {
        let x = a.arena, h = config.hiddenSize
        LayerNorm.forward(output: x[v.output], mean: x[v.mean], invStd: x[v.invStd], input: x[input], gamma: params.params + n.gamma.offset,
                          beta: params.params + n.beta.offset, rows: input.count / h, features: h, eps: Float(config.layerNormEps))
    }

    private func layerNormBackward(_ params: ParameterArena, _ n: Norm, input: ActivationTable.View, gradInput: ActivationTable.View,
                                   _ v: NormViews, _ a: Activations) {
        let x = a.arena, h = config.hiddenSize
        LayerNorm.backward(gradInput: x[gradInput], gradGamma: params.grads + n.gamma.offset, gradBeta: params.grads + n.beta.offset,
                           gradOutput: x[v.gradOutput], input: x[input], gamma: params.params + n.gamma.offset, mean: x[v.mean],
                           invStd: x[v.invStd], rows: input.count / h, features: h)
    }

    /// Hidden dropout, each sample's mask from the pass's stream of (sample, site); the identity outside training.
    private func dropout(input: ActivationTable.View, output: ActivationTable.View, site: UInt64, _ a: Activations, _ context: PassContext) {
        let x = a.arena, perSample = input.count / a.geometry.batch
        let p = context.training ? Float(config.hiddenDropoutProb) : 0
        for b in 0..<a.geometry.batch {
            Dropout.forward(output: x[output] + b * perSample, input: x[input] + b * perSample, count: perSample, probability: p,
                            stream: context.stream(sample: b, site: site))
        }
    }

    private func dropoutBackward(gradOutput: ActivationTable.View, gradInput: ActivationTable.View, site: UInt64, _ a: Activations,
                                 _ context: PassContext) {
        let x = a.arena, perSample = gradOutput.count / a.geometry.batch
        let p = context.training ? Float(config.hiddenDropoutProb) : 0
        for b in 0..<a.geometry.batch {
            Dropout.backward(gradInput: x[gradInput] + b * perSample, gradOutput: x[gradOutput] + b * perSample, count: perSample,
                             probability: p, stream: context.stream(sample: b, site: site))
        }
    }

    private func attentionDropout(_ v: LayerViews, site: UInt64, _ a: Activations, _ context: PassContext) -> AttentionDropout? {
        let p = context.training ? Float(config.attentionProbsDropoutProb) : 0
        guard p > 0 else { return nil }
        return AttentionDropout(probability: p, streams: (0..<a.geometry.batch).map { context.stream(sample: $0, site: site) },
                                dropped: a.arena[v.dropped])
    }
}
