// The model FLOPs behind metrics.jsonl's tflops_per_rank, against published counts and the accounting's
// invariants (backward twice forward where everything trains, nothing where nothing does).

import ConvirtCore
import ConvirtModels
import Testing

@Suite("Model FLOPs")
struct ModelFLOPsTests {
    @Test("ResNet-50 at 224 px: fvcore's 4.089 G multiply-adds (less the 2.05 M of the classifier ConVIRT drops)")
    func resnet50() throws {
        var layout = ParameterLayout()
        let resnet = try ResNet(config: .resnet50, layout: &layout)
        let flops = try resnet.flops(size: 224)
        let expected = 2 * (4.089184256e9 - 2048 * 1000)
        #expect(abs(flops.forward - expected) <= 1e-3 * expected, "\(flops.forward)")
        // The stem (7x7, 3 -> 64, 112x112 outputs) computes no input gradient.
        let stem: Double = 2 * 64 * 3 * 49 * 112 * 112
        #expect(flops.backward == 2 * flops.forward - stem)
    }

    @Test("BERT: projections, attention, feed-forward per layer; backward only above the frozen layers")
    func bert() throws {
        var config = ConVIRTConfig.preset(.paper)
        let t = 128.0, h = 768.0, i = 3072.0
        let weights: Double = 2 * t * (4 * h * h + 2 * h * i), attention: Double = 4 * t * t * h
        let perLayer = weights + attention
        let qkv: Double = 2 * t * 3 * h * h
        // Everything trains; nothing does; layers 6-11 train (layer 6's Q/K/V projections need no input gradient).
        let cases: [(Int, Double)] = [(0, 2 * 12 * perLayer), (12, 0), (6, 2 * 6 * perLayer - qkv)]
        for (frozen, backward) in cases {
            config.frozenLayers = frozen
            var layout = ParameterLayout()
            let bert = try BERT(config: config.text, layout: &layout, frozenLayers: frozen)
            let flops = bert.flops(tokens: 128)
            #expect(flops.forward == 12 * perLayer)
            #expect(abs(flops.backward - backward) <= 1e-9 * flops.forward, "\(frozen) frozen: \(flops.backward) against \(backward)")
        }
    }
}
