// The kernels against reference data written by PyTorch (tools/make_layer_fixtures.py). Outputs must
// agree to 1e-4 and gradients to 1e-3 of the tensor's largest magnitude (DESIGN.md's parity bounds);
// in practice they agree far more closely, so the bounds here are tighter.

import ConvirtCore
import ConvirtTestSupport
import Testing

private let outputTolerance = 1e-5
private let gradientTolerance = 1e-5

@Suite("PyTorch parity of the kernels")
struct PyTorchParityTests {
    @Test("conv2d", arguments: ["conv2d_3x3_s2_p1", "conv2d_7x7_s2_p3", "conv2d_1x1", "conv2d_1x1_s2"])
    func conv2d(kind: String) throws {
        let fx = try LayerFixture(kind)
        let x = try fx.f("input.x"), w = try fx.f("param.weight")
        let hasBias = fx.file.info("param.bias") != nil
        let bias = hasBias ? try fx.f("param.bias") : nil
        let (s, p) = (fx.int("stride"), fx.int("padding"))
        try fx.expectClose(F.conv2d(x, weight: w, bias: bias, stride: s, padding: p), "output.output", tolerance: outputTolerance)
        let grads = try F.conv2dBackward(fx.outputWeights(), input: x, weight: w, stride: s, padding: p)
        try fx.expectClose(grads.input, "grad.x", tolerance: gradientTolerance)
        try fx.expectClose(grads.weight, "grad.weight", tolerance: gradientTolerance)
        if hasBias { try fx.expectClose(grads.bias, "grad.bias", tolerance: gradientTolerance) }
    }

    @Test("batch norm in training mode: batch statistics, running-statistic update, gradients")
    func batchNormTraining() throws {
        let fx = try LayerFixture("batchnorm_train")
        let x = try fx.f("input.x"), gamma = try fx.f("param.weight"), beta = try fx.f("param.bias")
        var runningMean = try fx.f("param.running_mean"), runningVar = try fx.f("param.running_var")
        let (y, state) = try F.batchNormTraining(x, gamma: gamma, beta: beta, runningMean: &runningMean, runningVar: &runningVar,
                                                 eps: fx.float("eps"), momentum: fx.float("momentum"))
        try fx.expectClose(y, "output.output", tolerance: outputTolerance)
        try fx.expectClose(runningMean, "output.running_mean", tolerance: outputTolerance)
        try fx.expectClose(runningVar, "output.running_var", tolerance: outputTolerance)
        let grads = try F.batchNormTrainingBackward(fx.outputWeights(), input: x, gamma: gamma, state: state)
        try fx.expectClose(grads.input, "grad.x", tolerance: 1e-4)
        try fx.expectClose(grads.gamma, "grad.weight", tolerance: gradientTolerance)
        try fx.expectClose(grads.beta, "grad.bias", tolerance: gradientTolerance)
    }

    @Test("batch norm in evaluation mode")
    func batchNormInference() throws {
        let fx = try LayerFixture("batchnorm_eval")
        let x = try fx.f("input.x"), gamma = try fx.f("param.weight")
        let rm = try fx.f("param.running_mean"), rv = try fx.f("param.running_var")
        try fx.expectClose(F.batchNormInference(x, gamma: gamma, beta: fx.f("param.bias"), runningMean: rm, runningVar: rv), "output.output", tolerance: outputTolerance)
        try fx.expectClose(rm, "output.running_mean", tolerance: 0)
        let grads = try F.batchNormInferenceBackward(fx.outputWeights(), input: x, gamma: gamma, runningMean: rm, runningVar: rv)
        try fx.expectClose(grads.input, "grad.x", tolerance: gradientTolerance)
        try fx.expectClose(grads.gamma, "grad.weight", tolerance: gradientTolerance)
        try fx.expectClose(grads.beta, "grad.bias", tolerance: gradientTolerance)
    }

    @Test("layer norm")
    func layerNorm() throws {
        let fx = try LayerFixture("layernorm")
        let x = try fx.f("input.x"), gamma = try fx.f("param.weight")
        let (y, state) = try F.layerNorm(x, gamma: gamma, beta: fx.f("param.bias"), eps: 1e-12)
        try fx.expectClose(y, "output.output", tolerance: outputTolerance)
        let grads = try F.layerNormBackward(fx.outputWeights(), input: x, gamma: gamma, state: state)
        try fx.expectClose(grads.input, "grad.x", tolerance: 1e-4)
        try fx.expectClose(grads.gamma, "grad.weight", tolerance: gradientTolerance)
        try fx.expectClose(grads.beta, "grad.bias", tolerance: gradientTolerance)
    }

    @Test("GELU (erf form)")
    func gelu() throws {
        let fx = try LayerFixture("gelu")
        let x = try fx.f("input.x")
        try fx.expectClose(F.gelu(x), "output.output", tolerance: outputTolerance)
        try fx.expectClose(F.geluBackward(fx.outputWeights(), input: x), "grad.x", tolerance: gradientTolerance)
    }

    @Test("attention with a padding mask, as Hugging Face's BertSelfAttention")
    func attention() throws {
        let fx = try LayerFixture("attention")
        let q = try fx.f("input.q"), k = try fx.f("input.k"), v = try fx.f("input.v")
        let heads = fx.int("heads")
        let (y, probabilities) = try F.attention(q: q, k: k, v: v, mask: fx.ids("input.mask"), heads: heads)
        try fx.expectClose(y, "output.output", tolerance: outputTolerance)
        let grads = try F.attentionBackward(fx.outputWeights(), probabilities: probabilities, q: q, k: k, v: v, heads: heads)
        try fx.expectClose(grads.q, "grad.q", tolerance: gradientTolerance)
        try fx.expectClose(grads.k, "grad.k", tolerance: gradientTolerance)
        try fx.expectClose(grads.v, "grad.v", tolerance: gradientTolerance)
    }

    @Test("embedding")
    func embedding() throws {
        let fx = try LayerFixture("embedding")
        let ids = try fx.ids("input.ids"), table = try fx.f("param.weight")
        try fx.expectClose(F.embedding(ids, table: table), "output.output", tolerance: 0)
        try fx.expectClose(F.embeddingBackward(fx.outputWeights(), ids: ids, tableShape: table.shape), "grad.weight", tolerance: gradientTolerance)
    }

    @Test("cross-entropy per row")
    func crossEntropy() throws {
        let fx = try LayerFixture("cross_entropy")
        let logits = try fx.f("input.logits"), targets = try fx.ids("input.targets")
        let (losses, probabilities) = try F.crossEntropy(logits, targets: targets)
        try fx.expectClose(losses, "output.output", tolerance: outputTolerance)
        try fx.expectClose(F.crossEntropyBackward(fx.outputWeights(), probabilities: probabilities, targets: targets), "grad.logits", tolerance: gradientTolerance)
    }

    @Test("max pool 3x3/2 pad 1")
    func maxPool() throws {
        let fx = try LayerFixture("maxpool")
        let x = try fx.f("input.x")
        let (y, indices) = try F.maxPool2d(x, kernel: fx.int("kernel"), stride: fx.int("stride"), padding: fx.int("padding"))
        try fx.expectClose(y, "output.output", tolerance: 0)
        try fx.expectClose(F.maxPool2dBackward(fx.outputWeights(), indices: indices, inputShape: x.shape), "grad.x", tolerance: gradientTolerance)
    }

    @Test("linear")
    func linear() throws {
        let fx = try LayerFixture("linear")
        let x = try fx.f("input.x"), w = try fx.f("param.weight")
        try fx.expectClose(F.linear(x, weight: w, bias: fx.f("param.bias")), "output.output", tolerance: outputTolerance)
        let grads = try F.linearBackward(fx.outputWeights(), input: x, weight: w)
        try fx.expectClose(grads.input, "grad.x", tolerance: gradientTolerance)
        try fx.expectClose(grads.weight, "grad.weight", tolerance: gradientTolerance)
        try fx.expectClose(grads.bias, "grad.bias", tolerance: gradientTolerance)
    }

    @Test("softmax, L2 normalisation, masked max pool, ReLU, global average pool")
    func smallOps() throws {
        var fx = try LayerFixture("softmax")
        var x = try fx.f("input.x")
        let s = try F.softmax(x)
        try fx.expectClose(s, "output.output", tolerance: outputTolerance)
        try fx.expectClose(F.softmaxBackward(fx.outputWeights(), output: s), "grad.x", tolerance: gradientTolerance)

        fx = try LayerFixture("l2_normalize")
        x = try fx.f("input.x")
        let (n, norms) = try F.l2Normalize(x)
        try fx.expectClose(n, "output.output", tolerance: outputTolerance)
        try fx.expectClose(F.l2NormalizeBackward(fx.outputWeights(), output: n, norms: norms), "grad.x", tolerance: gradientTolerance)

        fx = try LayerFixture("masked_max_pool")
        x = try fx.f("input.x")
        let (m, indices) = try F.maskedMaxPool(x, mask: fx.ids("input.mask"))
        try fx.expectClose(m, "output.output", tolerance: 0)
        try fx.expectClose(F.maskedMaxPoolBackward(fx.outputWeights(), indices: indices, tokens: x.shape[1]), "grad.x", tolerance: gradientTolerance)

        fx = try LayerFixture("relu")
        x = try fx.f("input.x")
        let r = F.relu(x)
        try fx.expectClose(r, "output.output", tolerance: 0)
        try fx.expectClose(F.reluBackward(fx.outputWeights(), output: r), "grad.x", tolerance: 0)

        fx = try LayerFixture("global_avg_pool")
        x = try fx.f("input.x")
        try fx.expectClose(F.globalAvgPool(x), "output.output", tolerance: outputTolerance)
        try fx.expectClose(F.globalAvgPoolBackward(fx.outputWeights(), inputShape: x.shape), "grad.x", tolerance: gradientTolerance)
    }

    @Test("Adam and AdamW for 3 steps, as torch.optim", arguments: ["adam", "adamw"])
    func adam(kind: String) throws {
        let fx = try LayerFixture(kind)
        let config = AdamConfig(learningRate: fx.double("lr"), beta1: fx.double("beta1"), beta2: fx.double("beta2"), eps: fx.double("eps"),
                                weightDecay: fx.double("weight_decay"), decoupled: kind == "adamw")
        var layout = ParameterLayout()
        try layout.add("p", shape: [13])
        let arena = ParameterArena(layout: layout)
        try arena.set("p", fx.f("param.initial"))
        for step in 0..<3 {
            try fx.f("input.grad\(step)").withUnsafeBufferPointer { arena.grads.update(from: $0.baseAddress!, count: 13) }
            Adam.step(arena, step: step + 1, config: config)
            try fx.expectClose(arena.tensor("p"), "output.param\(step)", tolerance: 1e-6)
        }
        let m = try Tensor<Float>(shape: [13], Array(UnsafeBufferPointer(start: arena.moments(at: 0).m, count: 13)))
        let v = try Tensor<Float>(shape: [13], Array(UnsafeBufferPointer(start: arena.moments(at: 0).v, count: 13)))
        try fx.expectClose(m, "output.exp_avg", tolerance: 1e-6)
        try fx.expectClose(v, "output.exp_avg_sq", tolerance: 1e-6)
    }
}
