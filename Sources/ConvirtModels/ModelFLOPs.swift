// The model's floating-point operations per training pair, counted from its shapes: two per
// multiply-add of every convolution and matrix product (the convolutions' geometries from the ResNet's
// own plan, BERT's projections and attention, the heads, the loss's similarities); the passes between
// them (normalization, activations, sums) are not counted, as in MFU accounting. Backward counts each
// product's weight gradient where its weights train and its input gradient where anything below it
// trains: the stem's input (the images) and the frozen BERT layers and embeddings cost no backward.
// metrics.jsonl's achieved TFLOP/s is this count over the step time.

import ConvirtCore
import Foundation

/// Forward and backward FLOPs of a pass.
public struct PassFLOPs: Sendable, Equatable {
    public var forward: Double
    public var backward: Double
    public var total: Double { forward + backward }

    public init(forward: Double, backward: Double) { (self.forward, self.backward) = (forward, backward) }

    public static func + (a: PassFLOPs, b: PassFLOPs) -> PassFLOPs { PassFLOPs(forward: a.forward + b.forward, backward: a.backward + b.backward) }
}

extension ResNet {
    /// One image of side `size`: its convolutions as the pass plans them.
    public func flops(size: Int) throws -> PassFLOPs {
        var needs = BufferNeeds()
        let pass = try planPass(PlannedPass(batch: 1, size: size, precision: .fp32, layout: passLayout(.fp32), bf16Copies: false), needs: &needs)
        let convolutions = [pass.stem] + pass.blocks.flatMap { $0.units + ($0.downsample.map { [$0] } ?? []) }
        let forward = convolutions.reduce(0) { $0 + $1.geometry.forwardFLOPs }
        // Every weight trains; every input gradient is needed but the stem's.
        return PassFLOPs(forward: forward, backward: 2 * forward - pass.stem.geometry.forwardFLOPs)
    }
}

extension BERT {
    /// One sentence padded to `tokens` tokens whose products run on `rows` of them: all `tokens` (the
    /// padding included), or where the rows are packed (`packsTokens`) its valid tokens alone. The
    /// attention runs on the padded layout, all `tokens`.
    public func flops(tokens: Int, rows: Double? = nil) -> PassFLOPs {
        let t = rows ?? Double(tokens), padded = Double(tokens), h = Double(config.hiddenSize), i = Double(config.intermediateSize)
        let projections = 2 * t * h * 3 * h, output = 2 * t * h * h, feedForward = 2 * 2 * t * h * i
        let attention = 2 * 2 * padded * padded * h  // scores Q K^T and context P V, over all heads
        var flops = PassFLOPs(forward: 0, backward: 0)
        for layer in 0..<config.numHiddenLayers {
            let weights = projections + output + feedForward
            flops.forward += weights + attention
            guard layer >= frozenLayers else { continue }
            // Weight gradients; input gradients of everything above this layer's Q/K/V projections (and of
            // those too where a trainable layer or the embeddings lie below).
            let below = layer > frozenLayers || !freezeEmbeddings
            flops.backward += weights + 2 * attention + output + feedForward + (below ? projections : 0)
        }
        return flops
    }
}

extension ConVIRTModel {
    /// One training pair: image, sentence (`BERT.flops`: padded to `tokens`, its products on `rows` of
    /// them), both heads, and its share of the loss over `globalBatch` pairs (its row of similarities
    /// against all columns, in both directions).
    public func flopsPerPair(tokens: Int, rows: Double? = nil, globalBatch: Int) throws -> PassFLOPs {
        let c = config
        func head(_ inFeatures: Int) -> PassFLOPs {
            let forward = 2 * Double(inFeatures * c.projHidden + c.projHidden * c.projDim)
            return PassFLOPs(forward: forward, backward: 2 * forward)
        }
        let loss = 2 * 2 * Double(globalBatch * c.projDim)
        return try image.flops(size: c.image.imageSize) + text.flops(tokens: tokens, rows: rows) + head(c.image.featureCount) + head(c.text.hiddenSize)
            + PassFLOPs(forward: loss, backward: 2 * loss)
    }
}
