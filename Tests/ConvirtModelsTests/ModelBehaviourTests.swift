// Behaviour of the models beyond parity: the distributed loss, freezing, dropout streams, weight
// round trips, and gradients of whole models against finite differences.

import CKernels
import ConvirtCore
import ConvirtIO
import ConvirtModels
import Foundation
import Testing

private func randomUnitRows(_ rows: Int, _ d: Int, seed: UInt64) -> [Float] {
    let s = RandomStream(seed: seed)
    var x = (0..<(rows * d)).map { s.normal(at: UInt64($0)) }
    for r in 0..<rows {
        let norm = (0..<d).reduce(Float(0)) { $0 + x[r * d + $1] * x[r * d + $1] }.squareRoot()
        for j in 0..<d { x[r * d + j] /= norm }
    }
    return x
}

@Suite("ConVIRT loss")
struct LossTests {
    /// The loss in plain Double: L = (1/N) sum_i [lambda l_i(v->u) + (1-lambda) l_i(u->v)].
    /// `excluded`: pairs (i, j) left out of row i's negatives (false negatives), in both directions.
    static func referenceLoss(_ v: [Double], _ u: [Double], n: Int, d: Int, tau: Double, lambda: Double, excluded: Set<[Int]> = []) -> Double {
        func dotp(_ a: [Double], _ i: Int, _ b: [Double], _ k: Int) -> Double { (0..<d).reduce(0) { $0 + a[i * d + $1] * b[k * d + $1] } / tau }
        var total = 0.0
        for i in 0..<n {
            let kept = (0..<n).map { excluded.contains([i, $0]) ? -Double.infinity : 0 }
            let rowV = (0..<n).map { dotp(v, i, u, $0) + kept[$0] }, rowU = (0..<n).map { dotp(u, i, v, $0) + kept[$0] }
            func nll(_ r: [Double]) -> Double { let m = r.max()!; return Double.log(r.reduce(0) { $0 + Double.exp($1 - m) }) + m - r[i] }
            total += lambda * nll(rowV) + (1 - lambda) * nll(rowU)
        }
        return total / Double(n)
    }

    @Test("one rank: the ordinary loss, and gradients equal finite differences")
    func singleRank() throws {
        let (n, d) = (6, 5)
        let v = randomUnitRows(n, d, seed: 1), u = randomUnitRows(n, d, seed: 2)
        var gv = [Float](repeating: 0, count: n * d), gu = gv
        let value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: n, globalRows: n, features: d, offset: 0,
                                                tau: 0.1, lambda: 0.75, gradV: &gv, gradU: &gu, workspace: .init())
        let vd = v.map(Double.init), ud = u.map(Double.init)
        let expected = Self.referenceLoss(vd, ud, n: n, d: d, tau: 0.1, lambda: 0.75)
        #expect(abs(value.loss - expected) / expected < 1e-5)
        #expect(abs(value.loss - (0.75 * value.imageToText + 0.25 * value.textToImage)) < 1e-9)
        func numeric(_ x: [Double], _ f: ([Double]) -> Double) -> [Double] {
            (0..<x.count).map { i in
                var p = x, m = x
                p[i] += 1e-6; m[i] -= 1e-6
                return (f(p) - f(m)) / 2e-6
            }
        }
        let ngv = numeric(vd) { Self.referenceLoss($0, ud, n: n, d: d, tau: 0.1, lambda: 0.75) }
        let ngu = numeric(ud) { Self.referenceLoss(vd, $0, n: n, d: d, tau: 0.1, lambda: 0.75) }
        let scale = ngv.map(abs).max()!
        #expect(zip(gv, ngv).allSatisfy { abs(Double($0) - $1) < 1e-4 * scale })
        #expect(zip(gu, ngu).allSatisfy { abs(Double($0) - $1) < 1e-4 * scale })
    }

    /// --exclude-identical-texts: rows 0 and 3 share a sentence, as do 1, 4 and 5. Their pairs leave each
    /// other's softmax in both directions; the loss and its gradients are those of the reference without
    /// them, and the loss falls (fewer terms in each excluded row's denominator).
    @Test("excluded pairs (false negatives): the loss without them, gradients equal finite differences, on 1 rank and in shares")
    func excludedPairs() throws {
        let (n, d) = (6, 5)
        let v = randomUnitRows(n, d, seed: 7), u = randomUnitRows(n, d, seed: 8)
        let groups = [[0, 3], [1, 4, 5]]
        let pairs = Set(groups.flatMap { g in g.flatMap { i in g.filter { $0 != i }.map { [i, $0] } } })
        let workspace = ConVIRTLoss.Workspace()
        workspace.excluded = pairs.map { $0[0] * n + $0[1] }
        var gv = [Float](repeating: 0, count: n * d), gu = gv
        let value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: n, globalRows: n, features: d, offset: 0,
                                                tau: 0.1, lambda: 0.75, gradV: &gv, gradU: &gu, workspace: workspace)
        let vd = v.map(Double.init), ud = u.map(Double.init)
        let expected = Self.referenceLoss(vd, ud, n: n, d: d, tau: 0.1, lambda: 0.75, excluded: pairs)
        #expect(abs(value.loss - expected) / expected < 1e-5)
        #expect(expected < Self.referenceLoss(vd, ud, n: n, d: d, tau: 0.1, lambda: 0.75))
        func numeric(_ x: [Double], _ f: ([Double]) -> Double) -> [Double] {
            (0..<x.count).map { i in
                var p = x, m = x
                p[i] += 1e-6; m[i] -= 1e-6
                return (f(p) - f(m)) / 2e-6
            }
        }
        let ngv = numeric(vd) { Self.referenceLoss($0, ud, n: n, d: d, tau: 0.1, lambda: 0.75, excluded: pairs) }
        let ngu = numeric(ud) { Self.referenceLoss(vd, $0, n: n, d: d, tau: 0.1, lambda: 0.75, excluded: pairs) }
        let scale = ngv.map(abs).max()!
        #expect(zip(gv, ngv).allSatisfy { abs(Double($0) - $1) < 1e-4 * scale })
        #expect(zip(gu, ngu).allSatisfy { abs(Double($0) - $1) < 1e-4 * scale })
        // Two ranks of 3 rows each, each with its rows' exclusions: shares sum to the loss.
        var shares = 0.0
        for rank in 0..<2 {
            let part = ConVIRTLoss.Workspace()
            part.excluded = pairs.filter { $0[0] / 3 == rank }.map { ($0[0] - rank * 3) * n + $0[1] }
            var pv = [Float](repeating: 0, count: n * d), pu = pv
            shares += v.withUnsafeBufferPointer { vp in
                u.withUnsafeBufferPointer { up in
                    ConVIRTLoss.forwardBackward(v: vp.baseAddress! + rank * 3 * d, u: up.baseAddress! + rank * 3 * d, globalV: vp.baseAddress!,
                                                globalU: up.baseAddress!, localRows: 3, globalRows: n, features: d, offset: rank * 3,
                                                tau: 0.1, lambda: 0.75, gradV: &pv, gradU: &pu, workspace: part)
                }
            }.loss
        }
        #expect(abs(shares - value.loss) < 1e-6)
    }

    @Test("W ranks: shares sum to the loss, and summed (reduce-scattered) gradients equal one rank's", arguments: [2, 3, 4])
    func ranks(world: Int) throws {
        let b = 3, n = b * world, d = 7
        let v = randomUnitRows(n, d, seed: 3), u = randomUnitRows(n, d, seed: 4)
        var fullV = [Float](repeating: 0, count: n * d), fullU = fullV
        let single = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: n, globalRows: n, features: d, offset: 0,
                                                 tau: 0.1, lambda: 0.75, gradV: &fullV, gradU: &fullU, workspace: .init())
        var sumV = [Float](repeating: 0, count: n * d), sumU = sumV
        var loss = 0.0
        for rank in 0..<world {
            var gv = [Float](repeating: 0, count: n * d), gu = gv
            let part = v.withUnsafeBufferPointer { vp in
                u.withUnsafeBufferPointer { up in
                    ConVIRTLoss.forwardBackward(v: vp.baseAddress! + rank * b * d, u: up.baseAddress! + rank * b * d, globalV: vp.baseAddress!,
                                                globalU: up.baseAddress!, localRows: b, globalRows: n, features: d, offset: rank * b,
                                                tau: 0.1, lambda: 0.75, gradV: &gv, gradU: &gu, workspace: .init())
                }
            }
            loss += part.loss
            for i in 0..<(n * d) { sumV[i] += gv[i]; sumU[i] += gu[i] }
        }
        #expect(abs(loss - single.loss) < 1e-6)
        #expect(zip(sumV, fullV).allSatisfy { abs($0 - $1) < 1e-6 })
        #expect(zip(sumU, fullU).allSatisfy { abs($0 - $1) < 1e-6 })
    }
}

@Suite("Model behaviour")
struct ModelBehaviourTests {
    static func tinyModel(frozen: Int) throws -> ConVIRTModel {
        var config = ConVIRTConfig.preset(.tiny)
        config.frozenLayers = frozen
        config.text.hiddenDropoutProb = 0
        config.text.attentionProbsDropoutProb = 0
        let model = try ConVIRTModel(config: config)
        model.initialize(seed: 11)
        return model
    }

    /// One forward and backward of both encoders (6 tokens a report), each embedding's gradient a fixed
    /// pattern plus the embedding; the image then the text embeddings.
    static func forwardBackward(_ model: ConVIRTModel, images: [Float], ids: [Int32], mask: [Int32], batch b: Int, size: Int,
                                context: PassContext) throws -> [Float] {
        let d = model.config.projDim
        let v = Array(UnsafeBufferPointer(start: try model.encodeImages(images, batch: b, size: size, context: context), count: b * d))
        let u = Array(UnsafeBufferPointer(start: try model.encodeTexts(ids: ids, mask: mask, batch: b, tokens: 6, context: context), count: b * d))
        try model.backwardImages(gradEmbeddings: (0..<(b * d)).map { Float($0 % 7) - 3 + v[$0] }, context: context)
        try model.backwardTexts(gradEmbeddings: (0..<(b * d)).map { Float($0 % 5) - 2 + u[$0] }, context: context)
        return v + u
    }

    static func texts(batch: Int, tokens: Int) -> ([Int32], [Int32]) {
        let s = RandomStream(seed: 5)
        let ids = (0..<(batch * tokens)).map { Int32(1 + s.integer(below: 999, at: UInt64($0))) }
        let mask = (0..<(batch * tokens)).map { Int32($0 % tokens < tokens - ($0 / tokens) ? 1 : 0) }
        return (ids, mask)
    }

    @Test("frozen layers get no gradient and change nothing in the trainable layers' gradients")
    func freezing() throws {
        let (ids, mask) = Self.texts(batch: 3, tokens: 6)
        var grads: [Int: ParameterArena] = [:]
        for frozen in [0, 1] {
            let model = try Self.tinyModel(frozen: frozen)
            let context = PassContext(training: true)
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: 3, tokens: 6, context: context)
            let g = (0..<(3 * model.config.projDim)).map { Float($0 % 5) - 2 + u[$0] }
            model.arena.zeroGrads()
            try model.backwardTexts(gradEmbeddings: g, context: context)
            grads[frozen] = model.arena
        }
        let frozenArena = grads[1]!, fullArena = grads[0]!
        for entry in frozenArena.layout.entries where entry.name.hasPrefix("text.") {
            let a = try frozenArena.gradient(entry.name).scalars, b = try fullArena.gradient(entry.name).scalars
            if entry.kind == .frozen {
                #expect(a.allSatisfy { $0 == 0 }, "\(entry.name) is frozen but has a gradient")
                #expect(b.contains { $0 != 0 } || entry.name.contains("token_type") || entry.name.contains("position"), "\(entry.name)")
            } else {
                #expect(relativeError(a, b) < 1e-6, "\(entry.name)")
            }
        }
        #expect(frozenArena.layout.trainableCount < fullArena.layout.trainableCount)
    }

    /// A frozen layer keeps its weights' bf16 copies from pass to pass (`ParameterArena.frozenVersion`):
    /// each of its six weights changed as a load changes it, the next pass must read the new values, as
    /// a model that never ran with the old ones does.
    @Test("a frozen layer's bf16 weights are kept from pass to pass, and made anew when the frozen parameters change",
          .enabled(if: BF16.native, "oneDNN runs no bf16 kernels on this CPU: no copies are kept"))
    func frozenWeightCopies() throws {
        let (ids, mask) = Self.texts(batch: 3, tokens: 6)
        let context = PassContext(training: true, sampleIndices: [0, 1, 2], precision: .bf16)
        func encode(_ model: ConVIRTModel) throws -> [Float] {
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: 3, tokens: 6, context: context)
            return Array(UnsafeBufferPointer(start: u, count: 3 * model.config.projDim))
        }
        let model = try Self.tinyModel(frozen: 1)
        var last = try encode(model)
        #expect(try encode(model) == last, "a second pass over the same parameters differs")
        let weights = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense",
                       "output.dense"].map { "text.encoder.layer.0.\($0).weight" }
        for name in weights {
            #expect(model.layout[name]?.kind == .frozen, "\(name)")
            let w = try model.arena.tensor(name)
            try model.arena.set(name, Tensor(shape: w.shape, w.scalars.enumerated().map { 1.5 * $1 + 0.1 * Float($0 % 7 - 3) }))
            let changed = try encode(model)
            let fresh = try Self.tinyModel(frozen: 1)
            fresh.arena.mutableParams.update(from: model.arena.params, count: model.arena.count)
            #expect(changed == (try encode(fresh)), "\(name): a pass after the change read the old weights")
            #expect(changed != last, "\(name): the change changed nothing")
            last = changed
        }
    }

    /// Backward announces finished gradients as arena ranges (`PassContext.gradientsReady`), which the
    /// gradient buckets start their all-reduce from: each range's gradients must be final when announced,
    /// the ranges disjoint, and every trainable entry inside exactly one of them.
    @Test("backward announces each trainable parameter once, as an arena range, when its gradient is final")
    func announcedRanges() throws {
        let model = try Self.tinyModel(frozen: 1)
        let b = 2, size = 64
        let images = (0..<(b * 3 * size * size)).map { RandomStream(seed: 8).normal(at: UInt64($0)) }
        let (ids, mask) = Self.texts(batch: b, tokens: 6)
        var context = PassContext(training: true, sampleIndices: [0, 1])
        let v = try model.encodeImages(images, batch: b, size: size, context: context)
        let u = try model.encodeTexts(ids: ids, mask: mask, batch: b, tokens: 6, context: context)
        let gv = (0..<(b * model.config.projDim)).map { Float($0 % 7) - 3 + v[$0] }
        let gu = (0..<(b * model.config.projDim)).map { Float($0 % 5) - 2 + u[$0] }
        model.arena.zeroGrads()
        var announced: [(range: Range<Int>, gradients: [Float])] = []
        let grads = model.arena.grads
        context.gradientsReady = { range in announced.append((range, Array(UnsafeBufferPointer(start: grads + range.lowerBound, count: range.count)))) }
        try model.backwardImages(gradEmbeddings: gv, context: context)
        try model.backwardTexts(gradEmbeddings: gu, context: context)
        for (range, atAnnouncement) in announced {
            #expect(Array(UnsafeBufferPointer(start: grads + range.lowerBound, count: range.count)) == atAnnouncement,
                    "the gradients of \(range) changed after they were announced")
        }
        let sorted = announced.map(\.range).sorted { $0.lowerBound < $1.lowerBound }
        #expect(zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound <= $1.lowerBound }, "announced ranges overlap")
        for entry in model.layout.entries where entry.kind == .trainable {
            let holders = sorted.filter { $0.contains(entry.offset) && entry.range.upperBound <= $0.upperBound }
            #expect(holders.count == 1, "\(entry.name) is in \(holders.count) announced ranges")
        }
        // The buckets find a range's entries by binary search: the same as a scan.
        for range in sorted {
            let scanned = model.layout.entries.indices.filter { i in
                let e = model.layout.entries[i]
                return e.offset >= range.lowerBound && e.range.upperBound <= range.upperBound
            }
            #expect(Array(model.layout.entryIndices(in: range)) == scanned, "\(range)")
        }
    }

    @Test("restoreBuffers puts back the running statistics a training forward changed")
    func savedBuffers() throws {
        let model = try Self.tinyModel(frozen: 1)
        let b = 2, size = 64
        let images = (0..<(b * 3 * size * size)).map { RandomStream(seed: 8).normal(at: UInt64($0)) }
        let before = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
        model.saveBuffers()
        _ = try model.encodeImages(images, batch: b, size: size, context: PassContext(training: true, sampleIndices: [0, 1]))
        let after = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
        let buffers = model.layout.entries.filter { $0.kind == .buffer }
        #expect(buffers.contains { e in before[e.range] != after[e.range] }, "the forward changed no running statistic")
        model.restoreBuffers()
        #expect(Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count)) == before)
    }

    /// `ParameterArena.claimZeroedGradient`: after `zeroGrads` the first kernel to write a weight's
    /// gradient overwrites it (a product without a sum, a reorder without accumulation); with every claim
    /// taken away first, every kernel adds to the zeros instead. Both give the same gradients, and a
    /// second backward adds to the first.
    @Test("gradients written over zeroGrads' zeros equal gradients added to them, and a second backward accumulates",
          arguments: [Precision.fp32, .bf16])
    func claimedGradients(precision: Precision) throws {
        let model = try Self.tinyModel(frozen: 1)
        let b = 2, size = 64
        let images = (0..<(b * 3 * size * size)).map { RandomStream(seed: 8).normal(at: UInt64($0)) }
        let (ids, mask) = Self.texts(batch: b, tokens: 6)
        let context = PassContext(training: true, sampleIndices: [0, 1], precision: precision)
        let saved = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
        func gradients(claimed: Bool, passes: Int = 1) throws -> [Float] {
            model.arena.mutableParams.update(from: saved, count: saved.count)
            model.arena.zeroGrads()
            if !claimed { for e in model.layout.entries { _ = model.arena.claimZeroedGradient(e) } }
            for _ in 0..<passes {
                _ = try Self.forwardBackward(model, images: images, ids: ids, mask: mask, batch: b, size: size, context: context)
            }
            return Array(UnsafeBufferPointer(start: model.arena.grads, count: model.arena.count))
        }
        let overwritten = try gradients(claimed: true)
        // Every trainable convolution and linear layer claimed its weight's zeros (so this compares two paths).
        let unclaimed = model.layout.entries.filter { $0.kind == .trainable && $0.shape.count >= 2 && model.arena.claimZeroedGradient($0) }
        #expect(unclaimed.isEmpty, "not overwritten: \(unclaimed.map(\.name))")
        let added = try gradients(claimed: false)
        #expect(overwritten.contains { $0 != 0 })
        let first = zip(overwritten, added).enumerated().first { $0.element.0 != $0.element.1 }
        #expect(first == nil, "element \(first?.offset ?? -1): \(first?.element.0 ?? 0) against \(first?.element.1 ?? 0)")
        // Two passes: the second adds to the first (BatchNorm's running statistics differ between the passes, the batch statistics do not).
        let twice = try gradients(claimed: true, passes: 2)
        #expect(relativeError(twice, overwritten.map { 2 * $0 }) < 1e-5)
    }

    @Test("a bf16 model computes the same bits whether its passes round to bf16 by the CPU's instruction or in integer arithmetic",
          .enabled(if: ck_native_bf16_supported() != 0, "this CPU has no AVX512-BF16: only the integer rounding runs"))
    func nativeRounding() throws {
        var config = ConVIRTConfig.preset(.tiny)
        config.frozenLayers = 1
        let model = try ConVIRTModel(config: config)
        model.initialize(seed: 11)
        let b = 2, size = 64
        let images = (0..<(b * 3 * size * size)).map { RandomStream(seed: 8).normal(at: UInt64($0)) }
        let (ids, mask) = Self.texts(batch: b, tokens: 6)
        let context = PassContext(training: true, sampleIndices: [0, 1], precision: .bf16)
        let saved = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
        let before = ck_native_bf16_enabled()
        defer { ck_set_native_bf16(before) }
        func pass(native: Bool) throws -> (embeddings: [Float], gradients: [Float]) {
            #expect(ck_set_native_bf16(native ? 1 : 0) == (native ? 1 : 0))
            model.arena.mutableParams.update(from: saved, count: saved.count)
            model.arena.zeroGrads()
            let embeddings = try Self.forwardBackward(model, images: images, ids: ids, mask: mask, batch: b, size: size, context: context)
            return (embeddings, Array(UnsafeBufferPointer(start: model.arena.grads, count: model.arena.count)))
        }
        let integer = try pass(native: false), native = try pass(native: true)
        #expect(native.gradients.contains { $0 != 0 })
        #expect(native.embeddings.map(\.bitPattern) == integer.embeddings.map(\.bitPattern), "embeddings")
        let first = zip(native.gradients, integer.gradients).enumerated().first { $0.element.0.bitPattern != $0.element.1.bitPattern }
        #expect(first == nil, "gradient element \(first?.offset ?? -1): \(first?.element.0 ?? 0) against \(first?.element.1 ?? 0)")
    }

    private func relativeError(_ a: [Float], _ b: [Float]) -> Double {
        let scale = max(b.map { Double(abs($0)) }.max() ?? 0, 1e-30)
        return zip(a, b).map { Double(abs($0 - $1)) }.max()! / scale
    }

    @Test("BERT dropout depends on (seed, step, global sample index), not on the batch a sample sits in")
    func dropoutStreams() throws {
        var config = ConVIRTConfig.preset(.tiny)
        config.text.hiddenDropoutProb = 0.3
        config.text.attentionProbsDropoutProb = 0.2
        let model = try ConVIRTModel(config: config)
        model.initialize(seed: 3)
        let (ids, mask) = Self.texts(batch: 4, tokens: 5)
        let stream = RandomStream(seed: 9, 1)
        let whole = try Array(UnsafeBufferPointer(start: model.encodeTexts(ids: ids, mask: mask, batch: 4, tokens: 5,
            context: PassContext(training: true, stream: stream, sampleIndices: [10, 11, 12, 13])), count: 4 * config.projDim))
        let second = try Array(UnsafeBufferPointer(start: model.encodeTexts(ids: Array(ids[10...]), mask: Array(mask[10...]), batch: 2, tokens: 5,
            context: PassContext(training: true, stream: stream, sampleIndices: [12, 13])), count: 2 * config.projDim))
        #expect(zip(whole[(2 * config.projDim)...], second).allSatisfy { abs($0 - $1) < 1e-6 }, "same samples, same masks")
        let eval = try Array(UnsafeBufferPointer(start: model.encodeTexts(ids: ids, mask: mask, batch: 4, tokens: 5,
            context: PassContext(training: false)), count: 4 * config.projDim))
        #expect(zip(whole, eval).contains { abs($0 - $1) > 1e-3 }, "dropout is active in training")
    }

    /// PyTorch parity covers every gradient with dropout off; this covers BERT's hidden and attention
    /// dropout, whose masks the backward pass regenerates from the streams. (The ResNet's piecewise-linear
    /// ReLU and max-pool kinks make float32 finite differences of the image encoder too noisy to be
    /// useful here; its gradients are proven by the parity fixtures.)
    @Test("gradients with dropout on match finite differences along random directions")
    func directionalDerivative() throws {
        var config = ConVIRTConfig.preset(.tiny)
        config.text.hiddenDropoutProb = 0.1
        config.text.attentionProbsDropoutProb = 0.1
        let model = try ConVIRTModel(config: config)
        model.initialize(seed: 21)
        let b = 4, size = 64
        let images = (0..<(b * 3 * size * size)).map { RandomStream(seed: 8).normal(at: UInt64($0)) }
        let (ids, mask) = Self.texts(batch: b, tokens: 6)
        let context = PassContext(training: true, stream: RandomStream(seed: 4), sampleIndices: [0, 1, 2, 3])
        // Training-mode BatchNorm updates running statistics in place: restore them around every forward.
        let saved = Array(UnsafeBufferPointer(start: model.arena.params, count: model.arena.count))
        func loss() throws -> Double {
            let v = try model.encodeImages(images, batch: b, size: size, context: context)
            let u = try model.encodeTexts(ids: ids, mask: mask, batch: b, tokens: 6, context: context)
            var gv = [Float](repeating: 0, count: b * config.projDim), gu = gv
            let value = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: b, globalRows: b, features: config.projDim,
                                                    offset: 0, tau: config.tau, lambda: config.lambda, gradV: &gv, gradU: &gu, workspace: .init())
            return value.loss
        }
        let v = try model.encodeImages(images, batch: b, size: size, context: context)
        let u = try model.encodeTexts(ids: ids, mask: mask, batch: b, tokens: 6, context: context)
        var gv = [Float](repeating: 0, count: b * config.projDim), gu = gv
        _ = ConVIRTLoss.forwardBackward(v: v, u: u, globalV: v, globalU: u, localRows: b, globalRows: b, features: config.projDim,
                                        offset: 0, tau: config.tau, lambda: config.lambda, gradV: &gv, gradU: &gu, workspace: .init())
        model.arena.zeroGrads()
        try model.backwardImages(gradEmbeddings: gv, context: context)
        try model.backwardTexts(gradEmbeddings: gu, context: context)
        let grads = Array(UnsafeBufferPointer(start: model.arena.grads, count: model.arena.count))
        for (k, prefix) in ["text.", "image_head.", "text_head."].enumerated() {
            // A random direction over the trainable entries of one part of the model.
            let s = RandomStream(seed: 77, UInt64(k))
            var direction = [Float](repeating: 0, count: model.arena.count)
            for e in model.layout.entries where e.kind == .trainable && e.name.hasPrefix(prefix) {
                for i in e.range { direction[i] = s.normal(at: UInt64(i)) }
            }
            let analytic = zip(grads, direction).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
            let h: Float = 1e-4
            func shifted(_ sign: Float) throws -> Double {
                let p = model.arena.mutableParams
                for i in 0..<model.arena.count { p[i] = saved[i] + sign * h * direction[i] }
                return try loss()
            }
            let numeric = (try shifted(1) - shifted(-1)) / (2 * Double(h))
            model.arena.mutableParams.update(from: saved, count: saved.count)
            #expect(abs(numeric - analytic) <= 2e-2 * max(abs(analytic), 1e-3), "\(prefix): analytic \(analytic), numeric \(numeric)")
        }
    }

    @Test("a torchvision state dict (with fc and num_batches_tracked) loads into the image encoder")
    func torchvisionStateDict() throws {
        let model = try Self.tinyModel(frozen: 1)
        var writer = SafeTensorsWriter()
        for e in model.layout.entries where e.name.hasPrefix("image.") {
            try writer.add(String(e.name.dropFirst(6)), Tensor<Float>(shape: e.shape, repeating: 0.5))
            if e.name.hasSuffix("running_var") {
                try writer.add(String(e.name.dropFirst(6)).replacingOccurrences(of: "running_var", with: "num_batches_tracked"), Tensor<Int64>(shape: [], [7]))
            }
        }
        try writer.add("fc.weight", Tensor<Float>(shape: [10, model.config.image.featureCount]))
        try writer.add("fc.bias", Tensor<Float>(shape: [10]))
        let file = try SafeTensorsFile(data: writer.serialized(), path: "resnet.safetensors")
        let loaded = try Weights.load(file, into: model.arena, prefix: "image.")
        #expect(loaded == model.layout.entries.filter { $0.name.hasPrefix("image.") }.count)
        #expect(try model.arena.tensor("image.layer2.0.conv2.weight").scalars.allSatisfy { $0 == 0.5 })
    }

    @Test("export writes torchvision / Hugging Face names that load back unchanged")
    func exportRoundTrip() throws {
        let model = try Self.tinyModel(frozen: 1)
        var writer = SafeTensorsWriter()
        try Weights.export(model.arena, prefix: "image.", to: &writer)
        let file = try SafeTensorsFile(data: writer.serialized(), path: "image.safetensors")
        #expect(file.names.contains("conv1.weight") && file.names.contains("layer4.0.downsample.1.running_var"))
        let other = try Self.tinyModel(frozen: 0)
        other.arena.mutableParams.update(repeating: 0, count: other.arena.count)
        try Weights.load(file, into: other.arena, prefix: "image.")
        for e in model.layout.entries where e.name.hasPrefix("image.") {
            #expect(try model.arena.tensor(e.name) == other.arena.tensor(e.name))
        }
    }
}

@Suite("ResNet activation layouts")
struct ResNetLayoutTests {
    /// Features and every gradient of a width-16 ResNet (training-mode BatchNorm by default) with its
    /// activations in `layout` (nil: NCHW by the default kernels), after `passes` forward and backward
    /// passes (the gradients summed), and the bytes its activations hold.
    /// With `reference`, the pass runs on `ReferenceResNet` (plain fp32 NCHW kernels) over the same
    /// parameters instead.
    func pass(_ layout: ActivationLayout?, precision: Precision, block: ResNetConfig.Block, bf16Copies: Bool = true, training: Bool = true,
              layers: [Int] = [1, 1, 1, 1], sharesGradientRooms: Bool = true, passes: Int = 1, batch: Int = 3, size: Int = 40,
              reference: Bool = false, imageSeed: UInt64 = 6) throws -> (features: [Float], grads: [Float], bytes: Int, margin: Float) {
        var parameters = ParameterLayout()
        let config = ResNetConfig(layers: layers, width: 16, block: block, imageSize: 32)
        let net = try ResNet(config: config, layout: &parameters, sharesGradientRooms: sharesGradientRooms)
        let arena = ParameterArena(layout: parameters)
        net.initialize(arena, stream: RandomStream(seed: 5))
        net.activationLayout = layout
        net.keepsBF16Activations = bf16Copies
        var referenceParameters = ParameterLayout()
        let plain = try ReferenceResNet(config: config, layout: &referenceParameters)
        try #require(referenceParameters.entries == parameters.entries, "the reference registers ResNet's parameters")
        let activations = try plain.activations(batch: batch, size: size)
        let images = (0..<(batch * 3 * size * size)).map { RandomStream(seed: imageSeed).normal(at: UInt64($0)) }
        let context = PassContext(training: training, precision: precision)
        var features: [Float] = []
        arena.zeroGrads()
        for _ in 0..<passes {
            let f = reference ? try plain.forward(arena, images: images, activations, context: context)
                : try net.forward(arena, images: images, batch: batch, size: size, context: context)
            features = Array(UnsafeBufferPointer(start: f, count: batch * net.featureCount))
            let g = (0..<features.count).map { RandomStream(seed: 7).normal(at: UInt64($0)) }
            if reference {
                try plain.backward(arena, gradFeatures: g, activations, context: context)
            } else {
                try net.backward(arena, gradFeatures: g, context: context)
            }
        }
        // The reference's ReLU inputs (batch norm's outputs and the residual sums): the smallest distance
        // from the kink, relative to each view's largest value.
        var margin = Float.infinity
        if reference {
            for v in activations.arena.table.views where v.name.hasSuffix(".bn") || v.name.hasSuffix(".sum") {
                let x = UnsafeBufferPointer(start: activations.arena[v], count: v.count)
                margin = min(margin, x.map(abs).min()! / max(x.map(abs).max()!, .leastNormalMagnitude))
            }
        }
        // Every buffer of the pass lay in the room its plan gave it (`BufferPlan`).
        #expect(net.outgrownRooms == 0, "buffers outgrew their planned rooms: \(net.outgrownRooms)")
        return (features, Array(UnsafeBufferPointer(start: arena.grads, count: arena.count)),
                reference ? activations.arena.table.bytes : net.activationBytes, margin)
    }

    /// fp32, and bf16 where oneDNN runs bf16 kernels.
    static var precisions: [Precision] { BF16.native ? [.fp32, .bf16] : [.fp32] }

    // The kernels of each layout equal NCHW's on their own (ChannelsLastTests); here the whole network's
    // plumbing: the stem's NCHW input, max pool, residual sums, downsampling, average pool and backward,
    // against the plain network (`ReferenceResNet`: the architecture in plain fp32 NCHW kernels, one
    // call per layer), in training and evaluation mode.
    @Test("a ResNet in its default layout, NCHW, NHWC, nChw16c and nChw8c computes the plain network's features and gradients in fp32",
          arguments: [ResNetConfig.Block.basic, .bottleneck])
    func layouts(block: ResNetConfig.Block) throws {
        for training in [true, false] {
            // Two fp32 computations that sum in other orders differ in a value's last bits (2^-24 of it per
            // rounding, amplified by training-mode batch norm over a few pixels), so where a ReLU input lies
            // that near its kink they may decide it differently, and a gradient then moves by a whole term:
            // a flip, not an error. The images are drawn from the first seed whose ReLU inputs all lie at
            // least 1e-6 (16 units of fp32's rounding) of their view's largest value from zero. Seed 6 leaves
            // a residual sum of the bottleneck network at 8.6e-8, which flips: its conv3 weight gradient
            // parts by 0.5% of the largest gradient, in every layout alike.
            var seed: UInt64 = 6
            var reference = try pass(nil, precision: .fp32, block: block, training: training, layers: [2, 1, 1, 1], reference: true)
            while reference.margin < 1e-6 {
                seed += 1
                try #require(seed < 40, "no seed in 6..<40 keeps the ReLU inputs clear of the kink")
                reference = try pass(nil, precision: .fp32, block: block, training: training, layers: [2, 1, 1, 1], reference: true, imageSeed: seed)
            }
            let fScale = reference.features.map(abs).max()!, gScale = reference.grads.map(abs).max()!
            for layout in [nil, ActivationLayout.nchw] + ActivationLayout.rowLayouts {
                let r = try pass(layout, precision: .fp32, block: block, training: training, layers: [2, 1, 1, 1], imageSeed: seed)
                // Relative to the largest value, the fp32 parity bound (sums in other orders: oneDNN's
                // against im2col + sgemm image by image; measured on a 2-core AMD EPYC: 1e-7 to 7e-6).
                let f = maxAbsDiff(r.features, reference.features) / fScale, g = maxAbsDiff(r.grads, reference.grads) / gScale
                #expect(f <= 1e-4, "features, \(layout.map(\.rawValue) ?? "default") \(block) training \(training): \(f)")
                #expect(g <= 1e-4, "gradients, \(layout.map(\.rawValue) ?? "default") \(block) training \(training): \(g)")
            }
        }
    }

    /// The fast ResNet plans its buffers as rooms of one activation arena before a pass (`BufferPlan`).
    /// A net that runs passes of other batch sizes, image sizes and precisions in turn computes the bits
    /// of a fresh net for each (its plan grows to hold the largest, and no buffer is left in a freed
    /// arena), no buffer ever outgrows its room, and the shared rooms list their users.
    @Test("a ResNet's plan holds every pass's buffers, across batch sizes, image sizes and precisions")
    func plans() throws {
        let config = ResNetConfig(layers: [2, 1, 1, 1], width: 16, block: .bottleneck, imageSize: 32)
        func run(_ net: ResNet, _ arena: ParameterArena, batch: Int, size: Int, precision: Precision) throws -> [Float] {
            let images = (0..<(batch * 3 * size * size)).map { RandomStream(seed: 6).normal(at: UInt64($0)) }
            let context = PassContext(training: true, precision: precision)
            arena.zeroGrads()
            let f = try net.forward(arena, images: images, batch: batch, size: size, context: context)
            let features = Array(UnsafeBufferPointer(start: f, count: batch * net.featureCount))
            try net.backward(arena, gradFeatures: features.map { $0 * 0.5 - 0.1 }, context: context)
            return features + Array(UnsafeBufferPointer(start: arena.grads, count: arena.count))
        }
        func fresh() throws -> (ResNet, ParameterArena) {
            var layout = ParameterLayout()
            let net = try ResNet(config: config, layout: &layout)
            let arena = ParameterArena(layout: layout)
            net.initialize(arena, stream: RandomStream(seed: 5))
            return (net, arena)
        }
        let (net, arena) = try fresh()
        let saved = Array(UnsafeBufferPointer(start: arena.params, count: arena.count))
        let precisions: [Precision] = BF16.native ? [.bf16, .fp32] : [.fp32]
        var largest = 0
        for (batch, size) in [(2, 40), (4, 48), (1, 32), (3, 40)] {
            for precision in precisions + precisions.reversed() {
                arena.mutableParams.update(from: saved, count: saved.count)
                let reused = try run(net, arena, batch: batch, size: size, precision: precision)
                let (other, otherArena) = try fresh()
                let alone = try run(other, otherArena, batch: batch, size: size, precision: precision)
                #expect(reused == alone, "batch \(batch), \(size) px, \(precision): a reused net computes other bits")
                #expect(net.outgrownRooms == 0 && other.outgrownRooms == 0)
                #expect(net.activationBytes >= largest, "the arena shrank")
                largest = net.activationBytes
            }
        }
        // Rooms that layers take turns with name each of their users.
        let shared = net.activationTable.filter { $0.components(separatedBy: ", ").count > 2 }
        #expect(shared.contains { $0.contains("output gradient") }, "\(net.activationTable)")
    }

    /// bf16 in each layout against exact arithmetic (the plain fp32 network, `ReferenceResNet`, whose own
    /// distance from it, about 1e-6 of the largest value, is far below bf16's). Two bf16 layouts may legitimately
    /// differ: their kernels sum in other orders, a last-bit change flips the bf16 rounding of the next
    /// layer's input, and a rounding can flip a ReLU or decide a max-pool tie the other way. So each is
    /// held to the arithmetic, not to the other. The bound: each of the D = 5 (basic: 9) layers on the path
    /// to a feature rounds at most four values to bf16, each a relative 2^-9 at most (a convolution's two
    /// operands and its output; at a block's end, where the input is the stream's bf16 value already,
    /// the weight, the output, batch norm's output and the residual sum), and these add up along the
    /// path: features within 4 D 2^-9 of their largest value; gradients, whose path runs up and down
    /// again (the stream's gradients rounded too), within twice that. A flipped ReLU or
    /// max-pool position moves a weight gradient by one of its terms, so the sums must hold many terms
    /// for the bound to mean anything: evaluation mode (a batch norm over the statistics of a few
    /// images, in training mode, amplifies any change past any bound arithmetic gives: on an AMX Xeon two
    /// bf16 layouts of the 40-pixel network above were 3x the largest gradient apart), 2 images of 256
    /// pixels (the last stage's sums over 128 terms). Measured on a 2-core AMD EPYC (AVX512-BF16): features
    /// 0.32-0.36%, gradients 3.4-3.9% of the largest, in NCHW, NHWC and nChw16c (bounds: 3.9% and 7.8%;
    /// basic 7.0% and 14%).
    @Test("a bf16 ResNet in NCHW, NHWC, nChw16c and nChw8c is each within bf16's bound of exact arithmetic",
          .enabled(if: BF16.native, "oneDNN runs no bf16 kernels on this CPU: bf16 runs NCHW only"),
          arguments: [ResNetConfig.Block.basic, .bottleneck])
    func bf16Layouts(block: ResNetConfig.Block) throws {
        let (batch, size) = (2, 256)
        let reference = try pass(nil, precision: .fp32, block: block, training: false, batch: batch, size: size, reference: true)
        let depth = Double(block == .basic ? 9 : 5)
        let featureBound = 4 * depth * pow(2, -9), gradientBound = 2 * featureBound
        let fScale = reference.features.map(abs).max()!, gScale = reference.grads.map(abs).max()!
        for layout in [ActivationLayout.nchw] + ActivationLayout.rowLayouts {
            let r = try pass(layout, precision: .bf16, block: block, training: false, batch: batch, size: size)
            let f = Double(maxAbsDiff(r.features, reference.features) / fScale), g = Double(maxAbsDiff(r.grads, reference.grads) / gScale)
            #expect(f <= featureBound, "features, \(layout) \(block): \(f) of the largest")
            #expect(g <= gradientBound, "gradients, \(layout) \(block): \(g) of the largest")
            #expect(f > 1e-4, "\(layout) \(block) ran in bf16: \(f)")
        }
    }
}

extension ResNetLayoutTests {
    // Where oneDNN's bf16 kernels run the convolutions, the layers before them write the bf16 copies they
    // read (and batch norm's backward the bf16 output gradients), rounded as oneDNN's reorder of the
    // floats rounds them (to nearest even), so the network computes the same bits either way.
    @Test("a bf16 ResNet computes the same bits with the bf16 copies its layers write as with oneDNN's reorders",
          .enabled(if: BF16.native, "oneDNN runs no bf16 kernels on this CPU: the copies are never made"),
          arguments: [ResNetConfig.Block.basic, .bottleneck])
    func bf16Copies(block: ResNetConfig.Block) throws {
        for layout in ActivationLayout.rowLayouts { for training in [true, false] {
            let reordered = try pass(layout, precision: .bf16, block: block, bf16Copies: false, training: training)
            let copied = try pass(layout, precision: .bf16, block: block, bf16Copies: true, training: training)
            #expect(copied.features == reordered.features, "features, \(layout) \(block) training \(training)")
            #expect(copied.grads == reordered.grads, "gradients, \(layout) \(block) training \(training)")
        } }
    }
}

extension ResNetLayoutTests {
    // The units' and blocks' output gradients take turns with two rooms each (`SharedRooms`);
    // with a room of their own every one, the network computes the same bits. Two blocks a stage, so
    // that identity blocks and downsampling ones follow one another in both rooms.
    @Test("a ResNet whose layers share their gradients' rooms computes the bits of one that gives each its own",
          arguments: [ResNetConfig.Block.basic, .bottleneck])
    func sharedGradientRooms(block: ResNetConfig.Block) throws {
        for precision in Self.precisions {
            // Twice: the rooms hold the first pass's gradients when the second starts.
            func pass(shared: Bool) throws -> (features: [Float], grads: [Float], bytes: Int, margin: Float) {
                try self.pass(nil, precision: precision, block: block, layers: [2, 2, 1, 1], sharesGradientRooms: shared, passes: 2)
            }
            let own = try pass(shared: false), shared = try pass(shared: true)
            func firstDifference(_ a: [Float], _ b: [Float]) -> String? {
                zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }.map { "element \($0.offset): \($0.element.0) against \($0.element.1)" }
            }
            let features = firstDifference(shared.features, own.features), grads = firstDifference(shared.grads, own.grads)
            #expect(features == nil, "features, \(precision) \(block): \(features ?? "")")
            #expect(grads == nil, "gradients, \(precision) \(block): \(grads ?? "")")
            #expect(shared.grads.contains { $0 != 0 })
            #expect(shared.bytes < own.bytes, "\(shared.bytes) bytes shared against \(own.bytes)")
        }
    }
}

private func maxAbsDiff(_ a: [Float], _ b: [Float]) -> Float {
    zip(a, b).reduce(0) { max($0, abs($1.0 - $1.1)) }
}
