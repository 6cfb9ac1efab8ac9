// The reference models (plain fp32 kernels, one call per layer, one activation arena) against the fast
// models that train: each fast path is held to the architecture as it reads.

import ConvirtCore
import ConvirtModels
import Testing

@Suite("Reference models")
struct ReferenceModelTests {
    /// The largest difference relative to the largest magnitude of `b`.
    func distance(_ a: [Float], _ b: [Float]) -> Float {
        let scale = b.map(abs).max() ?? 0
        return zip(a, b).map { abs($0 - $1) }.max()! / max(scale, .leastNormalMagnitude)
    }

    /// Every trainable entry's gradient within 1e-4 of its largest value (the fp32 parity bound; measured
    /// on a 2-core AMD EPYC: at most 1.1e-5), and not all zero; frozen entries' exactly zero in both. A key
    /// bias adds the same q . b to every score of a query, which softmax cancels: its exact gradient is
    /// zero and both computations return rounding noise, held to 1e-5 of the model's largest gradient.
    func expectGradients(_ fast: [Float], _ plain: [Float], _ layout: ParameterLayout) {
        let largest = plain.map(abs).max()!
        for e in layout.entries {
            let a = Array(fast[e.range]), b = Array(plain[e.range])
            switch e.kind {
            case .frozen:
                #expect(a.allSatisfy { $0 == 0 } && b.allSatisfy { $0 == 0 }, "\(e.name) is frozen")
            case .trainable where e.name.hasSuffix("attention.self.key.bias"):
                let noise = (a + b).map(abs).max()!
                #expect(noise <= 1e-5 * largest, "\(e.name): \(noise) against the largest gradient \(largest)")
            case .trainable:
                #expect(distance(a, b) <= 1e-4, "\(e.name): \(distance(a, b))")
                #expect(b.contains { $0 != 0 }, "\(e.name) has no gradient")
            case .buffer:
                break
            }
        }
    }

    @Test("the activation table lays out aligned views that do not overlap")
    func table() {
        var t = ActivationTable()
        let a = t.add("a", [3, 5]), b = t.add("b", [7], .int32), c = t.add("c", [2, 2], .double)
        #expect(a.offset == 0 && b.offset % 64 == 0 && c.offset % 64 == 0)
        #expect(a.offset + a.bytes <= b.offset && b.offset + b.bytes <= c.offset && t.bytes == c.offset + 32)
        let arena = ActivationArena(t)
        arena[a][14] = 1
        arena.int32s(b)[6] = 7
        arena.doubles(c)[3] = 2
        arena.zero([a])
        #expect(arena[a][14] == 0 && arena.int32s(b)[6] == 7 && arena.doubles(c)[3] == 2)
    }

    /// BERT in training mode with both dropouts on, every layer trained and the first frozen: the fast
    /// model and the reference draw the same masks (streams keyed by sample and site), so they differ
    /// only by fp32 sums in other orders (`expectGradients`).
    @Test("BERT computes the reference BERT's hidden states and gradients in fp32, dropout on", arguments: [0, 1])
    func bert(frozen: Int) throws {
        var config = ConVIRTConfig.preset(.tiny).text
        config.hiddenDropoutProb = 0.1
        config.attentionProbsDropoutProb = 0.1
        var fastLayout = ParameterLayout(), plainLayout = ParameterLayout()
        let fast = try BERT(config: config, layout: &fastLayout, frozenLayers: frozen)
        let plain = try ReferenceBERT(config: config, layout: &plainLayout, frozenLayers: frozen)
        try #require(fastLayout.entries == plainLayout.entries, "the reference registers BERT's parameters")
        let arena = ParameterArena(layout: fastLayout)
        fast.initialize(arena, stream: RandomStream(seed: 3))
        let (batch, tokens) = (3, 7)
        let s = RandomStream(seed: 4)
        let ids = (0..<(batch * tokens)).map { Int32(1 + s.integer(below: config.vocabSize - 1, at: UInt64($0))) }
        let mask = (0..<(batch * tokens)).map { Int32($0 % tokens < tokens - ($0 / tokens) ? 1 : 0) }
        let context = PassContext(training: true, stream: RandomStream(seed: 9), sampleIndices: [4, 0, 2])
        let gradOut = (0..<(batch * tokens * config.hiddenSize)).map { s.normal(at: UInt64(10_000 + $0)) }

        arena.zeroGrads()
        let h = try fast.forward(arena, ids: ids, mask: mask, batch: batch, tokens: tokens, context: context)
        let fastHidden = Array(UnsafeBufferPointer(start: h, count: gradOut.count))
        try fast.backward(arena, gradLastHidden: gradOut, context: context)
        let fastGrads = Array(UnsafeBufferPointer(start: arena.grads, count: arena.count))

        arena.zeroGrads()
        let activations = try plain.activations(batch: batch, tokens: tokens)
        let r = try plain.forward(arena, ids: ids, mask: mask, activations, context: context)
        let plainHidden = Array(UnsafeBufferPointer(start: r, count: gradOut.count))
        try plain.backward(arena, gradLastHidden: gradOut, activations, context: context)
        let plainGrads = Array(UnsafeBufferPointer(start: arena.grads, count: arena.count))

        #expect(distance(fastHidden, plainHidden) <= 1e-4, "hidden states: \(distance(fastHidden, plainHidden))")
        #expect(fast.outgrownRooms == 0, "buffers outgrew their planned rooms")
        expectGradients(fastGrads, plainGrads, fastLayout)
    }

    /// The whole model and its loss on one process: ConVIRTModel's encoders and heads with the
    /// distributed loss's one-rank form (offset 0, all rows global) against `ReferenceConVIRT`, in
    /// training mode with dropout. As for the ResNet alone, the images are drawn from the first seed
    /// that keeps every ReLU input of the image encoder 1e-6 of its view's largest value from its kink.
    @Test("ConVIRT's loss and every gradient equal the reference ConVIRT's in fp32")
    func convirt() throws {
        var config = ConVIRTConfig.preset(.tiny)
        config.frozenLayers = 1
        let model = try ConVIRTModel(config: config)
        model.initialize(seed: 12)
        let plain = try ReferenceConVIRT(config: config)
        try #require(plain.layout.entries == model.layout.entries, "the reference registers ConVIRT's parameters")
        let (b, tokens, size) = (4, 9, config.image.imageSize)
        let s = RandomStream(seed: 4)
        let ids = (0..<(b * tokens)).map { Int32(1 + s.integer(below: config.text.vocabSize - 1, at: UInt64($0))) }
        let mask = (0..<(b * tokens)).map { Int32($0 % tokens < tokens - ($0 / tokens) ? 1 : 0) }
        let context = PassContext(training: true, stream: RandomStream(seed: 9), sampleIndices: [3, 1, 0, 2])
        let activations = try plain.activations(batch: b, size: size, tokens: tokens)
        let saved = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
        func images(_ seed: UInt64) -> [Float] { (0..<(b * 3 * size * size)).map { RandomStream(seed: seed).normal(at: UInt64($0)) } }
        var seed: UInt64 = 20, x = images(seed)
        func margin() throws -> Float {
            model.arena.mutableParams.update(from: saved, count: saved.count)
            _ = try plain.forward(model.arena, images: x, ids: ids, mask: mask, activations, context: context)
            var m = Float.infinity
            for v in activations.image.arena.table.views where v.name.hasSuffix(".bn") || v.name.hasSuffix(".sum") {
                let y = UnsafeBufferPointer(start: activations.image.arena[v], count: v.count)
                m = min(m, y.map(abs).min()! / max(y.map(abs).max()!, .leastNormalMagnitude))
            }
            return m
        }
        while try margin() < 1e-6 {
            seed += 1
            try #require(seed < 60, "no seed in 20..<60 keeps the ReLU inputs clear of the kink")
            x = images(seed)
        }

        model.arena.mutableParams.update(from: saved, count: saved.count)
        model.arena.zeroGrads()
        let value = try plain.forward(model.arena, images: x, ids: ids, mask: mask, activations, context: context)
        try plain.backward(model.arena, activations, context: context)
        let plainGrads = Array(UnsafeBufferPointer(start: model.arena.grads, count: model.arena.count))

        model.arena.mutableParams.update(from: saved, count: saved.count)
        model.arena.zeroGrads()
        let d = config.projDim
        let v = Array(UnsafeBufferPointer(start: try model.encodeImages(x, batch: b, size: size, context: context), count: b * d))
        let u = Array(UnsafeBufferPointer(start: try model.encodeTexts(ids: ids, mask: mask, batch: b, tokens: tokens, context: context),
                                          count: b * d))
        var gradV = [Float](repeating: 0, count: b * d), gradU = gradV
        let fast = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: b, globalRows: b, features: d, offset: 0,
                                               tau: config.tau, lambda: config.lambda, gradV: &gradV, gradU: &gradU,
                                               workspace: ConVIRTLoss.Workspace())
        try model.backwardImages(gradEmbeddings: gradV, context: context)
        try model.backwardTexts(gradEmbeddings: gradU, context: context)
        let fastGrads = Array(UnsafeBufferPointer(start: model.arena.grads, count: model.arena.count))

        #expect(abs(fast.loss - value.loss) <= 1e-5 * abs(value.loss), "loss \(fast.loss) against \(value.loss)")
        #expect(abs(fast.imageToText - value.imageToText) <= 1e-5 * abs(value.imageToText))
        #expect(abs(fast.textToImage - value.textToImage) <= 1e-5 * abs(value.textToImage))
        expectGradients(fastGrads, plainGrads, model.layout)
    }

    /// The fast BERT plans its buffers as rooms of one activation arena (`BufferPlan`): a model that runs
    /// passes of other batch sizes, lengths and modes in turn computes a fresh model's bits for each, no
    /// buffer outgrows its room, and rooms that layers share list each of their users.
    /// Packed rows (`BERT.packsTokens`, `TokenRows`) compute the padded BERT on the valid tokens: the same
    /// products of the same rows, the same dropout masks (keyed by position), the attention on the same
    /// padded layout, which gives the padding no weight. The padded BERT's padding rows receive no gradient
    /// (the pooling reads the valid tokens alone), so their products add exact zeros to the weight
    /// gradients; only the order and grouping of the sums' terms may differ. So fp32 is held to the fp32
    /// parity bound (1e-4 of the largest value; measured on a 2-core AMD EPYC: at most 3.5e-8), and bf16, whose
    /// kernels may round partial sums to bf16 by the sum's length (`GradientPieces`), to bf16's: 2^-8 of
    /// each tensor's largest value. Sentences of 1 to 11 tokens, one with a hole in its mask; pieces of 2
    /// samples in bf16, so that the pieces' rows are rounded up by rows of no sample.
    @Test("BERT on packed rows computes the padded BERT's valid hidden states and its gradients", arguments: [Precision.fp32, .bf16], [0, 1])
    func packedRows(precision: Precision, frozen: Int) throws {
        var config = ConVIRTConfig.preset(.tiny).text
        config.hiddenDropoutProb = 0.1
        config.attentionProbsDropoutProb = 0.1
        var layout = ParameterLayout()
        let net = try BERT(config: config, layout: &layout, frozenLayers: frozen)
        let arena = ParameterArena(layout: layout)
        net.initialize(arena, stream: RandomStream(seed: 3))
        let (batch, tokens, h) = (4, 11, config.hiddenSize)
        let lengths = [3, 11, 1, 6]
        var mask = (0..<(batch * tokens)).map { Int32($0 % tokens < lengths[$0 / tokens] ? 1 : 0) }
        mask[3 * tokens + 2] = 0
        let s = RandomStream(seed: 4)
        let ids = (0..<(batch * tokens)).map { Int32(1 + s.integer(below: config.vocabSize - 1, at: UInt64($0))) }
        // The gradient the pooling gives: on valid tokens alone.
        let gradOut = (0..<(batch * tokens * h)).map { mask[$0 / h] != 0 ? s.normal(at: UInt64(10_000 + $0)) : 0 }
        let context = PassContext(training: true, stream: RandomStream(seed: 9), sampleIndices: [5, 1, 7, 2], precision: precision,
                                  gradientPiece: precision == .bf16 ? 2 : nil)
        func run(packed: Bool) throws -> (hidden: [Float], grads: [Float]) {
            net.packsTokens = packed
            arena.zeroGrads()
            let out = try net.forward(arena, ids: ids, mask: mask, batch: batch, tokens: tokens, context: context)
            let hidden = Array(UnsafeBufferPointer(start: out, count: gradOut.count))
            try net.backward(arena, gradLastHidden: gradOut, context: context)
            return (hidden, Array(UnsafeBufferPointer(start: arena.grads, count: arena.count)))
        }
        let padded = try run(packed: false), packed = try run(packed: true)
        let bound: Float = precision == .fp32 ? 1e-4 : 1.0 / 256
        let valid = (0..<gradOut.count).filter { mask[$0 / h] != 0 }
        let d = distance(valid.map { packed.hidden[$0] }, valid.map { padded.hidden[$0] })
        #expect(d <= bound, "valid hidden states: \(d)")
        #expect((0..<gradOut.count).allSatisfy { mask[$0 / h] != 0 || packed.hidden[$0] == 0 }, "a padded position's hidden state is not zero")
        #expect(net.outgrownRooms == 0, "buffers outgrew their planned rooms")
        let largest = padded.grads.map(abs).max()!
        for e in layout.entries where e.kind == .trainable {
            let a = Array(packed.grads[e.range]), b = Array(padded.grads[e.range])
            if e.name.hasSuffix("attention.self.key.bias") {
                // Softmax cancels it: rounding noise in both (see `expectGradients`).
                #expect((a + b).map(abs).max()! <= 1e-5 * largest, "\(e.name)")
            } else {
                #expect(distance(a, b) <= bound, "\(e.name): \(distance(a, b))")
                #expect(b.contains { $0 != 0 }, "\(e.name) has no gradient")
            }
        }
    }

    @Test("BERT's plan holds every pass's buffers, across batch sizes, lengths and modes", arguments: [0, 1], [false, true])
    func bertPlans(frozen: Int, packed: Bool) throws {
        var config = ConVIRTConfig.preset(.tiny).text
        config.hiddenDropoutProb = 0.1
        config.attentionProbsDropoutProb = 0.1
        func fresh() throws -> (BERT, ParameterArena) {
            var layout = ParameterLayout()
            let net = try BERT(config: config, layout: &layout, frozenLayers: frozen)
            net.packsTokens = packed
            let arena = ParameterArena(layout: layout)
            net.initialize(arena, stream: RandomStream(seed: 3))
            return (net, arena)
        }
        func run(_ net: BERT, _ arena: ParameterArena, batch: Int, tokens: Int, training: Bool) throws -> [Float] {
            let s = RandomStream(seed: 4)
            let ids = (0..<(batch * tokens)).map { Int32(1 + s.integer(below: config.vocabSize - 1, at: UInt64($0))) }
            let mask = (0..<(batch * tokens)).map { Int32($0 % tokens <= $0 / tokens ? 1 : 0) }
            let context = PassContext(training: training, stream: RandomStream(seed: 9), sampleIndices: (0..<batch).map { UInt64($0) })
            arena.zeroGrads()
            let h = try net.forward(arena, ids: ids, mask: mask, batch: batch, tokens: tokens, context: context)
            let hidden = Array(UnsafeBufferPointer(start: h, count: batch * tokens * config.hiddenSize))
            try net.backward(arena, gradLastHidden: hidden.map { $0 * 0.3 - 0.05 }, context: context)
            return hidden + Array(UnsafeBufferPointer(start: arena.grads, count: arena.count))
        }
        let (net, arena) = try fresh()
        var largest = 0
        for (batch, tokens) in [(2, 5), (3, 9), (1, 4), (3, 7)] {
            for training in [true, false, true] {
                let reused = try run(net, arena, batch: batch, tokens: tokens, training: training)
                let (other, otherArena) = try fresh()
                let alone = try run(other, otherArena, batch: batch, tokens: tokens, training: training)
                #expect(reused == alone, "batch \(batch), \(tokens) tokens, training \(training): a reused model computes other bits")
                #expect(net.outgrownRooms == 0 && other.outgrownRooms == 0)
                #expect(net.activationBytes >= largest, "the arena shrank")
                largest = net.activationBytes
            }
        }
        // Trained layers run backward one at a time, sharing its temporaries: one room, both layers its users.
        if frozen == 0 {
            #expect(net.activationTable.contains { $0.contains("layer 0 ") && $0.contains("layer 1 ") }, "\(net.activationTable)")
        }
    }
}
