// The fast BERT's buffers planned as rooms of one activation arena (`BufferPlan`), for (batch, tokens).
// Frozen layers take turns with two sets of activations and every trainable layer's backward with one
// set of temporaries: those rooms list each layer that uses them. The bf16 copies of the products'
// operands (`BF16Operand`) keep their own memory.

import ConvirtCore

extension BERT {
    /// What decides a pass's buffers: its geometry, the threads (attention's backward scratch is per
    /// thread) and whether attention dropout keeps its dropped weights.
    struct PlannedPass: Equatable {
        let batch, tokens, threads: Int
        let attentionDropout: Bool
    }

    /// Binds every buffer of a pass of geometry `g` to a room of one arena, planning a larger one where
    /// this pass needs more than the last plan holds.
    func preparePlan(_ g: AttentionGeometry, training: Bool) throws {
        let pass = PlannedPass(batch: g.batch, tokens: g.tokens, threads: Parallel.threads,
                               attentionDropout: training && config.attentionProbsDropoutProb > 0)
        if pass == plannedPass { return }
        var needs = passNeeds(g, attentionDropout: pass.attentionDropout)
        plannedPass = pass
        if plan != nil && needs.fit { return }
        needs.keep(plan)
        plan = BufferPlan(needs)
    }

    /// The buffers of a pass, walked as `forward` and `backward` use them.
    func passNeeds(_ g: AttentionGeometry, attentionDropout: Bool) -> BufferNeeds {
        var needs = BufferNeeds()
        let rows = g.batch * g.tokens, h = config.hiddenSize, inter = config.intermediateSize
        needs.need(ids, rows, "token ids")
        needs.need(mask, rows, "attention mask")
        needs.need(embedded, rows * h, "embeddings sum")
        needs.need(embeddingOutput, rows * h, "embeddings LayerNorm output")
        needs.need(embeddingMean, rows, "embeddings LayerNorm mean")
        needs.need(embeddingInvStd, rows, "embeddings LayerNorm 1/std")
        if needsEmbeddingGradient {
            needs.need(gradEmbeddingOutput, rows * h, "embeddings output gradient")
            needs.need(gradEmbedded, rows * h, "embeddings dropout gradient")
            needs.need(gradEmbeddingSum, rows * h, "embeddings sum gradient")
        }
        for (k, layer) in layers.enumerated() {
            let a = layer.activations, n = "layer \(k)"
            for (buffer, what) in [(a.q, "query"), (a.k, "key"), (a.v, "value"), (a.context, "attention context"),
                                   (a.attentionDense, "attention output dense"), (a.sum1, "attention residual sum"),
                                   (a.hidden1, "attention LayerNorm output"), (a.outputDense, "output dense"), (a.sum2, "output residual sum"),
                                   (a.hidden2, "output LayerNorm output")] {
                needs.need(buffer, rows * h, "\(n) \(what)")
            }
            needs.need(a.probabilities, g.probabilitiesCount, "\(n) attention probabilities")
            if attentionDropout { needs.need(a.dropped, g.probabilitiesCount, "\(n) dropped attention probabilities") }
            for (buffer, what) in [(a.mean1, "attention LayerNorm mean"), (a.invStd1, "attention LayerNorm 1/std"),
                                   (a.mean2, "output LayerNorm mean"), (a.invStd2, "output LayerNorm 1/std")] {
                needs.need(buffer, rows, "\(n) \(what)")
            }
            needs.need(a.inner, rows * inter, "\(n) intermediate dense")
            needs.need(a.activated, rows * inter, "\(n) GELU")
            if !layer.frozen || k == layers.count - 1 { needs.need(layer.gradOutput, rows * h, "\(n) output gradient") }
            guard !layer.frozen else { continue }
            let s = layer.scratch
            for (buffer, what) in [(s.gradDense, "residual sum gradient"), (s.gradHidden1, "attention LayerNorm output gradient"),
                                   (s.gradQ, "query gradient"), (s.gradK, "key gradient"), (s.gradV, "value gradient")] {
                needs.need(buffer, rows * h, "\(n) \(what)")
            }
            needs.need(s.gradInner, rows * inter, "\(n) GELU gradient")
            needs.need(s.gradContext, rows * max(inter, h), "\(n) intermediate and context gradients")
            needs.need(s.attentionWorkspace, g.workspaceCount, "\(n) attention backward workspace")
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
