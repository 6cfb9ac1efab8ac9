import ArgumentParser
import ConvirtCore
import ConvirtIO
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation

struct CheckpointCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "checkpoint", abstract: "Verify, inspect and export sharded checkpoints.",
                                                    subcommands: [Verify.self, Inspect.self, Export.self])

    /// A checkpoint directory, or a run directory (its latest checkpoint).
    static func resolve(_ path: String) throws -> String {
        try Checkpoints.resolve(path)
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Decompress every shard and check sizes and checksums; exit 1 on any problem.")
        @Argument(help: "Checkpoint or run directory.") var directory: String

        func run() throws {
            let dir = try CheckpointCommand.resolve(directory)
            do {
                let manifest = try Checkpoints.verify(dir)
                print("\(dir): OK (step \(manifest.state.step), \(manifest.shards.count) shard(s), world size \(manifest.worldSize))")
            } catch {
                print("\(dir): FAILED: \(error)")
                throw ExitCode(1)
            }
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Step, world size, config, tensor table, sizes and compression ratio.")
        @Argument(help: "Checkpoint or run directory.") var directory: String
        @Flag(help: "List every tensor.") var tensors = false

        func run() throws {
            let dir = try CheckpointCommand.resolve(directory)
            let m = try Checkpoints.manifest(dir)
            let compressed = m.shards.reduce(0) { $0 + $1.bytes }, raw = m.shards.reduce(0) { $0 + $1.rawBytes }
            print("\(dir)")
            let rate: String
            switch m.config.schedule {
            case .paper: rate = String(format: "learning rate %.3g (paper schedule: base %.3g, halved on plateaus)", m.state.learningRate, m.config.learningRate)
            case .cosine, .constant:
                rate = m.state.lastStepLearningRate.map { String(format: "learning rate of step %d %.3g (%@ schedule, base %.3g)", m.state.step, $0,
                                                                 m.config.schedule.rawValue, m.config.learningRate) }
                    ?? String(format: "base learning rate %.3g (%@ schedule)", m.config.learningRate, m.config.schedule.rawValue)
            }
            print("step \(m.state.step), epoch \(m.state.epoch), samples seen \(m.state.samplesSeen), \(rate)")
            print("saved by \(m.worldSize) rank(s); preset \(m.config.preset); arena \(m.arenaCount) floats x 3 (parameters, Adam m, Adam v)")
            print(String(format: "%d shard(s): %.1f MB compressed from %.1f MB (ratio %.2f)", m.shards.count, Double(compressed) / 1e6, Double(raw) / 1e6,
                         Double(raw) / Double(max(compressed, 1))))
            // Each shard as the manifest records it and as it is on the disk (inspect reads no shard: `verify` checks the contents).
            var problems: [String] = []
            for s in m.shards {
                let size = (try? FileManager.default.attributesOfItem(atPath: "\(dir)/\(s.file)")[.size] as? Int) ?? nil
                let disk = size.map { $0 == s.bytes ? "" : ", \($0) bytes on the disk" } ?? ", missing on the disk"
                if !disk.isEmpty { problems.append("\(dir)/\(s.file): the manifest records \(s.bytes) bytes\(disk)") }
                print("  \(s.file): arena [\(s.range[0]), \(s.range[1])), \(s.bytes) bytes\(disk), crc32 \(String(s.crc32, radix: 16))")
            }
            print("\(m.entries.count) tensors (\(m.entries.filter { $0.kind == "trainable" }.count) trainable)")
            if tensors { for e in m.entries { print("  \(e.name) \(describe(shape: e.shape)) @\(e.offset) \(e.kind)") } }
            if !problems.isEmpty {
                throw ConvirtError("damaged checkpoint: \(problems.joined(separator: "; ")) (convirt checkpoint verify checks every byte)")
            }
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Safetensors of the image encoder (torchvision names), the text encoder (a Hugging Face BERT directory) and the heads.")
        @Argument(help: "Checkpoint or run directory.") var directory: String
        @Option(help: "Output directory.") var out: String

        func run() throws {
            let dir = try CheckpointCommand.resolve(directory)
            let (manifest, params) = try Checkpoints.readParameters(dir)
            func write(_ prefix: String, _ path: String) throws -> Int {
                var writer = SafeTensorsWriter(metadata: ["format": "pt", "source": "convirt checkpoint step \(manifest.state.step)"])
                var n = 0
                for e in manifest.entries where e.name.hasPrefix(prefix) {
                    let count = e.shape.reduce(1, *)
                    try writer.add(String(e.name.dropFirst(prefix.count)), Tensor(shape: e.shape, Array(params[e.offset..<(e.offset + count)])))
                    n += 1
                }
                try writer.write(to: path)
                return n
            }
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: out, isDirectory: &isDirectory), !isDirectory.boolValue {
                throw ConvirtError("--out \(out) is a file, not a directory: give a directory for the exported files")
            }
            do { try FileManager.default.createDirectory(atPath: "\(out)/text_encoder", withIntermediateDirectories: true) } catch {
                throw ConvirtError("cannot create \(out)/text_encoder: \((error as NSError).localizedFailureReason ?? error.localizedDescription)")
            }
            let image = try write("image.", "\(out)/image_encoder.safetensors")
            let text = try write("text.", "\(out)/text_encoder/model.safetensors")
            let heads = try write("image_head.", "\(out)/image_head.safetensors") + write("text_head.", "\(out)/text_head.safetensors")
            var bert = try JSONSerialization.jsonObject(with: JSONEncoder().encode(manifest.config.model.text)) as? [String: Any] ?? [:]
            bert["model_type"] = "bert"
            bert["architectures"] = ["BertModel"]
            try JSONSerialization.data(withJSONObject: bert, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: "\(out)/text_encoder/config.json"))
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(manifest.config.model).write(to: URL(fileURLWithPath: "\(out)/convirt_config.json"))
            // The tokenizer of the run, so that BertTokenizer.from_pretrained(out/text_encoder) gives the ids
            // training gave: its vocabulary, casing and truncation length.
            let vocabularies = [Checkpoints.runDirectory(ofCheckpoint: dir).map { "\($0)/vocab.txt" },
                                manifest.config.textWeights.map { "\($0)/vocab.txt" }].compactMap { $0 }
            let tokenizer: String
            if let vocab = vocabularies.first(where: { FileManager.default.fileExists(atPath: $0) }) {
                try Files.writeAtomically(Files.read(vocab), to: "\(out)/text_encoder/vocab.txt")
                let special = ["unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"]
                var config: [String: Any] = special
                config["tokenizer_class"] = "BertTokenizer"
                config["do_lower_case"] = manifest.config.lowercase
                config["strip_accents"] = NSNull()  // follows do_lower_case, as convirt's tokenizer
                config["tokenize_chinese_chars"] = true
                config["model_max_length"] = manifest.config.maxTokens
                try Files.writeAtomically(JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys]),
                                          to: "\(out)/text_encoder/tokenizer_config.json")
                try Files.writeAtomically(JSONSerialization.data(withJSONObject: special, options: [.prettyPrinted, .sortedKeys]),
                                          to: "\(out)/text_encoder/special_tokens_map.json")
                tokenizer = "with its tokenizer (\(vocab), \(manifest.config.lowercase ? "lowercased" : "cased"), "
                    + "\(manifest.config.maxTokens) tokens)"
            } else {
                tokenizer = "without a tokenizer: no vocab.txt in \(vocabularies.joined(separator: " or ")); copy the training vocabulary into text_encoder/"
            }
            print("exported step \(manifest.state.step) of \(dir) to \(out): image encoder \(image) tensors (torchvision names), "
                  + "text encoder \(text) (Hugging Face names) \(tokenizer), heads \(heads)")
        }
    }
}
