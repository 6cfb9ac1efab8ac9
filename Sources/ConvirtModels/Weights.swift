// Moving weights between the arena and safetensors files under torchvision / Hugging Face names.

import ConvirtCore
import ConvirtIO
import Foundation

public enum Weights {
    /// Tensors that real checkpoints carry and the encoders do not use: torchvision's classifier and
    /// BatchNorm counters, BERT's pooler and pre-training heads, and non-persistent id buffers.
    public static let ignoredByDefault = ["fc.", "pooler.", "cls.", "num_batches_tracked", "position_ids", "token_type_ids"]

    /// Loads every arena entry whose name starts with `prefix` from `file`, where the file names the
    /// tensor `<source prefix><name without prefix>` for one of `sourcePrefixes` (e.g. "" and "bert.").
    /// Missing, unexpected (outside `ignoring`) and wrongly shaped tensors are one error naming them all.
    /// Returns the number of tensors loaded.
    @discardableResult
    public static func load(_ file: SafeTensorsFile, into arena: ParameterArena, prefix: String = "",
                            sourcePrefixes: [String] = [""], ignoring: [String] = ignoredByDefault,
                            includeBuffers: Bool = true) throws -> Int {
        var used = Set<String>()
        var missing: [String] = [], wrongShape: [String] = []
        var loaded = 0
        for entry in arena.layout.entries where entry.name.hasPrefix(prefix) {
            if entry.kind == .buffer && !includeBuffers { continue }
            let local = String(entry.name.dropFirst(prefix.count))
            guard let source = sourcePrefixes.lazy.map({ $0 + local }).first(where: { file.info($0) != nil }) else {
                missing.append(sourcePrefixes[0] + local)
                continue
            }
            used.insert(source)
            let info = file.info(source)!
            guard info.shape == entry.shape else {
                wrongShape.append("\(source) has shape \(describe(shape: info.shape)), the model needs \(describe(shape: entry.shape))")
                continue
            }
            let tensor = try file.floats(source)
            let bad = tensor.withUnsafeBufferPointer { $0.lazy.filter { !$0.isFinite }.count }
            guard bad == 0 else { throw ConvirtError("\(file.path): tensor \(source) holds \(bad) non-finite value(s) (NaN or infinity)") }
            // A variance below zero normalises by the square root of a negative number (NaN everywhere after).
            if local.hasSuffix("running_var") {
                let negative = tensor.withUnsafeBufferPointer { $0.enumerated().filter { $0.element < 0 } }
                if let first = negative.first {
                    throw ConvirtError("\(file.path): tensor \(source) holds \(negative.count) negative variance(s) (\(first.element) at index \(first.offset)); "
                                       + "a BatchNorm running variance is never below zero")
                }
            }
            tensor.withUnsafeBufferPointer { (arena.mutableParams + entry.offset).update(from: $0.baseAddress!, count: entry.count) }
            loaded += 1
        }
        let unexpected = file.names.filter { name in
            !used.contains(name) && sourcePrefixes.contains { name.hasPrefix($0) } && !ignoring.contains { name.contains($0) }
        }
        if !missing.isEmpty || !unexpected.isEmpty || !wrongShape.isEmpty {
            var parts: [String] = []
            if !missing.isEmpty { parts.append("missing \(missing.count) tensor(s): \(missing.prefix(12).joined(separator: ", "))\(missing.count > 12 ? ", ..." : "")") }
            if !unexpected.isEmpty { parts.append("unexpected \(unexpected.count) tensor(s): \(unexpected.prefix(12).joined(separator: ", "))\(unexpected.count > 12 ? ", ..." : "")") }
            if !wrongShape.isEmpty { parts.append("wrong shape: \(wrongShape.prefix(12).joined(separator: "; "))") }
            throw ConvirtError("\(file.path): cannot load weights: \(parts.joined(separator: "; "))")
        }
        return loaded
    }

    /// Adds every arena entry under `prefix` to `writer`, named `<targetPrefix><name without prefix>`.
    public static func export(_ arena: ParameterArena, prefix: String = "", targetPrefix: String = "", to writer: inout SafeTensorsWriter) throws {
        for entry in arena.layout.entries where entry.name.hasPrefix(prefix) {
            try writer.add(targetPrefix + String(entry.name.dropFirst(prefix.count)), arena.tensor(entry.name))
        }
    }
}

/// A Hugging Face BERT model directory: config.json, vocab.txt, model.safetensors.
public struct BertDirectory {
    public let path: String
    public let config: BertConfig
    public let weights: SafeTensorsFile
    public var vocabularyPath: String { (path as NSString).appendingPathComponent("vocab.txt") }

    public init(path: String) throws {
        self.path = path
        let configPath = (path as NSString).appendingPathComponent("config.json")
        let data = try Files.read(configPath)
        do {
            config = try JSONDecoder().decode(BertConfig.self, from: data)
        } catch {
            throw ConvirtError("\(configPath): not a BERT config (\(error))")
        }
        try config.validate()
        let weightsPath = (path as NSString).appendingPathComponent("model.safetensors")
        guard FileManager.default.fileExists(atPath: weightsPath) else {
            throw ConvirtError("\(path): no model.safetensors (convert a pytorch_model.bin with tools/convert_weights.py)")
        }
        weights = try SafeTensorsFile(path: weightsPath)
    }

    /// Loads the weights into a BERT registered under `prefix`; names may carry the `bert.` prefix or not.
    public func load(into arena: ParameterArena, prefix: String) throws {
        try Weights.load(weights, into: arena, prefix: prefix, sourcePrefixes: ["", "bert."])
    }
}
