// The fast BERT's plan of a pass, made once per (batch, tokens, threads, precision, training): every
// layer's decisions (its dropouts, whether it writes its products' bf16 inputs where they are computed,
// whether its backward runs), which forward and backward follow, and its buffers as rooms of one
// activation arena (`BufferPlan`). Frozen layers take turns with two sets of activations and every
// trainable layer's backward with one set of temporaries: those rooms list each layer that uses them.
// The bf16 copies of the products' operands (`BF16Operand`) keep their own memory.

import ConvirtCore

/// What one encoder layer does in a planned pass.
struct EncoderStep {
    /// The layer's dropout probabilities in this pass (0 in evaluation): of the attention weights and
    /// of the two hidden states before their residual sums.
    let attentionDropout, hiddenDropout: Float
    /// Whether the layer writes the bf16 inputs of its products where they are computed (bf16 on
    /// oneDNN's kernels, the attention's batched products included): LayerNorm writes the intermediate
    /// product's, GELU writes only the bits the output product reads (no floats), the query, key and value
    /// products and the attention their outputs' bits alone, and in backward LayerNorm, GELU and the
    /// attention the bits alone of the linear layers' output gradients. Elsewhere bf16 rounds the floats
    /// inside the products.
    let writesCopies: Bool
    /// Whether the layer before wrote this layer's input as bf16 bits into its query copy.
    let inputCopied: Bool
    /// Where this layer writes its output's bf16 bits for the next layer's query (nil where it does not).
    let nextInput: BF16Operand?
    /// Whether this layer's backward runs (not frozen), and whether it has an output gradient (a
    /// trainable layer, or the last layer, which receives the encoder's).
    let runsBackward, hasGradOutput: Bool
}

/// A planned pass of the fast BERT.
struct BERTPass {
    let key: BERT.PlannedPass
    let geometry: AttentionGeometry
    /// The embeddings' dropout probability in this pass.
    let embeddingDropout: Float
    let layers: [EncoderStep]
    /// The most rows of the per-token layers: the padded layout's, or the most that packed rows take
    /// (`TokenRows.capacity`), so that any batch of this geometry fits the plan's rooms.
    let rows: Int
}

extension BERT {
    /// What decides a pass: its geometry, the threads (attention's backward scratch is per thread), the
    /// precision, whether its dropouts drop, whether its rows are packed (`packsTokens`) and the samples
    /// of its gradient pieces (the context's, where they divide the batch: a training batch is checked
    /// against them before it runs, an evaluation pass sums nothing over its samples).
    struct PlannedPass: Equatable {
        let batch, tokens, threads: Int
        let precision: Precision
        let training: Bool
        let nativeBF16: Bool
        let packed: Bool
        let pieceSamples: Int?
    }

    /// The plan of a pass of geometry `g`, with every buffer bound to a room of one arena (a larger
    /// arena where this pass needs more than the last plan holds).
    func preparePlan(_ g: AttentionGeometry, context: PassContext) -> BERTPass {
        let key = PlannedPass(batch: g.batch, tokens: g.tokens, threads: Parallel.threads, precision: context.precision,
                              training: context.training, nativeBF16: BF16.native, packed: packsTokens,
                              pieceSamples: context.pieceRows(perSample: 1).flatMap { g.batch % $0 == 0 ? $0 : nil })
        if let pass, pass.key == key { return pass }
        let pass = planPass(key, geometry: g)
        var needs = passNeeds(pass)
        self.pass = pass
        if plan == nil || !needs.fit {
            needs.keep(plan)
            plan = BufferPlan(needs)
        }
        return pass
    }

    /// Decides every layer's step of the pass `key`.
    func planPass(_ key: PlannedPass, geometry g: AttentionGeometry) -> BERTPass {
        let c = config
        func dropout(_ p: Double) -> Float { key.training ? Float(p) : 0 }
        // Copies where every product runs on oneDNN's bf16 kernels, the attention's batched ones included: the
        // layers then keep no floats of what only those read (the attention's own fallback, per head, would).
        let writesCopies = key.precision == .bf16 && key.nativeBF16 && Attention.runsOnDNNL(g, bf16Outputs: true)
        let steps = layers.indices.map { k in
            EncoderStep(attentionDropout: dropout(c.attentionProbsDropoutProb), hiddenDropout: dropout(c.hiddenDropoutProb),
                        writesCopies: writesCopies, inputCopied: writesCopies && k > 0,
                        nextInput: writesCopies && k + 1 < layers.count ? layers[k + 1].copies.query.input : nil,
                        runsBackward: !layers[k].frozen, hasGradOutput: !layers[k].frozen || k == layers.count - 1)
        }
        let rows = key.packed ? TokenRows.capacity(batch: g.batch, tokens: g.tokens, pieceSamples: key.pieceSamples) : g.batch * g.tokens
        return BERTPass(key: key, geometry: g, embeddingDropout: dropout(c.hiddenDropoutProb), layers: steps, rows: rows)
    }

    /// The buffers of a pass, walked as `forward` and `backward` use them.
    func passNeeds(_ pass: BERTPass) -> BufferNeeds {
        var needs = BufferNeeds()
        let g = pass.geometry, rows = pass.rows, h = config.hiddenSize, inter = config.intermediateSize
        let padded = g.batch * g.tokens
        needs.need(ids, rows, "token ids")
        needs.need(mask, padded, "attention mask")
        needs.need(embedded, rows * h, "embeddings sum")
        needs.need(embeddingOutput, rows * h, "embeddings LayerNorm output")
        needs.need(embeddingMean, rows, "embeddings LayerNorm mean")
        needs.need(embeddingInvStd, rows, "embeddings LayerNorm 1/std")
        if needsEmbeddingGradient {
            needs.need(gradEmbeddingOutput, rows * h, "embeddings output gradient")
            needs.need(gradEmbedded, rows * h, "embeddings dropout gradient")
            needs.need(gradEmbeddingSum, rows * h, "embeddings sum gradient")
        }
        if pass.key.packed {
            // The last hidden state in the padded layout (or, without layers, its gradient in the rows).
            needs.need(lastHidden, max(padded, rows) * h, "last hidden state (padded)")
        }
        for (k, (layer, step)) in zip(layers, pass.layers).enumerated() {
            let a = layer.activations, n = "layer \(k)"
            // Where the layer writes its products' bf16 inputs, query, key and value, the attention's output and
            // GELU's are those bits alone, and a frozen layer's GELU is its product's post-op: their floats are
            // never written.
            // q, k and v in the attention's padded layout; where the rows are packed, the products' packed
            // outputs before they are scattered, and the attention's output before it is gathered.
            if step.writesCopies {
                needs.need(layer.scratch.qkvBF16, 3 * padded * h, "\(n) query, key and value (bf16)")
            } else {
                for (buffer, what) in [(a.q, "query"), (a.k, "key"), (a.v, "value")] {
                    needs.need(buffer, padded * h, "\(n) \(what)")
                }
                needs.need(a.context, rows * h, "\(n) attention context")
            }
            if pass.key.packed {
                let s = layer.scratch
                if step.writesCopies {
                    needs.need(s.packedQKVBF16, 3 * rows * h, "\(n) query, key and value rows (bf16)")
                    needs.need(s.paddedContextBF16, padded * h, "\(n) attention output, padded (bf16)")
                } else {
                    needs.need(s.packedQKV, 3 * rows * h, "\(n) query, key and value rows")
                }
                // The attention output's floats, or in backward its gradient, padded.
                needs.need(s.paddedContext, padded * h, "\(n) attention output or its gradient, padded")
            }
            needs.need(layer.scratch.dense, rows * h, "\(n) attention output and output dense")
            for (buffer, what) in [(a.hidden1, "attention LayerNorm output"), (a.hidden2, "output LayerNorm output")] {
                needs.need(buffer, rows * h, "\(n) \(what)")
            }
            if step.runsBackward {
                needs.need(a.sum1, rows * h, "\(n) attention residual sum")
                needs.need(a.sum2, rows * h, "\(n) output residual sum")
            }
            needs.need(a.probabilities, g.probabilitiesCount, "\(n) attention probabilities")
            if step.attentionDropout > 0 { needs.need(a.dropped, g.probabilitiesCount, "\(n) dropped attention probabilities") }
            for (buffer, what) in [(a.mean1, "attention LayerNorm mean"), (a.invStd1, "attention LayerNorm 1/std"),
                                   (a.mean2, "output LayerNorm mean"), (a.invStd2, "output LayerNorm 1/std")] {
                needs.need(buffer, rows, "\(n) \(what)")
            }
            // Where the layer writes copies, a trained layer's intermediate product writes bf16 bits (GELU's input)
            // and a frozen one's has GELU as its post-op.
            if step.writesCopies {
                if !layer.frozen { needs.need(a.innerBF16, rows * inter, "\(n) intermediate dense (bf16)") }
            } else {
                needs.need(a.inner, rows * inter, "\(n) intermediate dense")
            }
            if !step.writesCopies { needs.need(a.activated, rows * inter, "\(n) GELU") }
            if step.hasGradOutput { needs.need(layer.gradOutput, rows * h, "\(n) output gradient") }
            guard step.runsBackward else { continue }
            let s = layer.scratch
            // The dense layers' output gradients are LayerNorm's bf16 bits alone where the layer writes copies, and
            // the query's, key's and value's the attention's.
            if !step.writesCopies {
                for (buffer, what) in [(s.gradDense, "residual sum gradient"), (s.gradQ, "query gradient"), (s.gradK, "key gradient"),
                                       (s.gradV, "value gradient")] {
                    needs.need(buffer, rows * h, "\(n) \(what)")
                }
            }
            needs.need(s.gradHidden1, rows * h, "\(n) attention LayerNorm output gradient")
            if step.writesCopies {
                needs.need(s.gradInnerBF16, rows * inter, "\(n) GELU gradient (bf16)")
            } else {
                needs.need(s.gradInner, rows * inter, "\(n) GELU gradient")
            }
            // The intermediate product's output gradient is GELU's bf16 bits alone where the layer writes copies.
            needs.need(s.gradContext, rows * (step.writesCopies ? h : max(inter, h)), "\(n) intermediate and context gradients")
            needs.need(s.attentionWorkspace, g.workspaceCount, "\(n) attention backward workspace")
            if pass.key.packed {
                // The attention's input gradients padded: bits in the forward's room of q, k and v, floats in
                // that of their rows.
                if step.writesCopies {
                    needs.need(s.qkvBF16, 3 * padded * h, "\(n) query, key and value (bf16), their gradients")
                } else {
                    needs.need(s.packedQKV, 3 * padded * h, "\(n) query, key and value rows, their padded gradients")
                }
            }
        }
        return needs
    }

    /// How many times a buffer of this network outgrew its planned room (0 where the plan is right).
    public var outgrownRooms: Int { plan?.outgrown ?? 0 }

    /// The plan's table: each room with its size and users.
    public var activationTable: [String] { plan?.description ?? [] }

    /// Bytes of the activation arena.
    public var activationBytes: Int { plan?.table.bytes ?? 0 }
}
