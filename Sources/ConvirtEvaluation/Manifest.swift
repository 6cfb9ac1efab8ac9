// Results others can reproduce: every evaluation writes NAME.manifest.json beside its NAME.json. It pins
// what decides the result: the settings, a SHA-256 of each split's sample ids with their labels (ids
// relative to --root, so the same data elsewhere gives the same hash), of the prompts, the seeds, the
// checkpoint (step and its manifest's checksum), the program's version and the precision, and a
// checksum of itself. `convirt eval ... --manifest M` reruns exactly that evaluation: it takes the
// settings from M and refuses a checkpoint or data whose hashes differ.

import ConvirtCore
import ConvirtIO
import Foundation

public struct EvaluationManifest: Codable, Sendable, Equatable {
    /// A split's ids: how many, and the SHA-256 of their lines (`SplitHash.hash`).
    public struct Split: Codable, Sendable, Equatable {
        public var count: Int
        public var sha256: String
        public init(count: Int, sha256: String) { (self.count, self.sha256) = (count, sha256) }
    }

    /// The checkpoint evaluated: its path when evaluated, its step and its manifest's checksum.
    public struct Checkpoint: Codable, Sendable, Equatable {
        public var path: String
        public var step: Int
        public var manifestChecksum: String?
        enum CodingKeys: String, CodingKey { case path, step, manifestChecksum = "manifest_checksum" }
        public init(path: String, step: Int, manifestChecksum: String?) { (self.path, self.step, self.manifestChecksum) = (path, step, manifestChecksum) }
    }

    public static let currentFormat = 1
    public var format = EvaluationManifest.currentFormat
    /// "eval linear", "eval finetune", "eval zeroshot", "eval retrieval".
    public var command: String
    /// The settings that decide the result, as their flags' values (sorted keys in the file).
    public var settings: [String: String]
    /// Per split ("train", "validation", "test"; retrieval: "candidates", "image_queries", ...).
    public var splits: [String: Split]
    public var promptsSHA256: String?
    public var seeds: [UInt64]?
    public var checkpoint: Checkpoint?
    /// "convirt 0.1.0".
    public var program: String
    /// The precision the products ran in ("fp32", "bf16").
    public var precision: String
    /// SHA-256 of the compact sorted-key JSON of everything else.
    public var checksum: String?

    enum CodingKeys: String, CodingKey {
        case format, command, settings, splits, promptsSHA256 = "prompts_sha256", seeds, checkpoint, program, precision, checksum
    }

    public init(command: String, settings: [String: String], splits: [String: Split], promptsSHA256: String? = nil, seeds: [UInt64]? = nil,
                checkpoint: Checkpoint?, program: String, precision: String) {
        (self.command, self.settings, self.splits, self.promptsSHA256) = (command, settings, splits, promptsSHA256)
        (self.seeds, self.checkpoint, self.program, self.precision) = (seeds, checkpoint, program, precision)
    }

    public func computedChecksum() throws -> String {
        var copy = self
        copy.checksum = nil
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return SHA256.hex(try encoder.encode(copy))
    }

    /// With its checksum.
    public func sealed() throws -> EvaluationManifest {
        var copy = self
        copy.checksum = try computedChecksum()
        return copy
    }

    /// Where the manifest of results file `out` goes: NAME.json -> NAME.manifest.json.
    public static func path(forResults out: String) -> String {
        (out.hasSuffix(".json") ? String(out.dropLast(5)) : out) + ".manifest.json"
    }

    public static func isManifest(_ name: String) -> Bool { name.hasSuffix(".manifest.json") }

    public func write(to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try Files.writeAtomically(encoder.encode(try sealed()) + Data("\n".utf8), to: path)
    }

    /// Reads and checks a manifest: an error names the file and the problem (not JSON, a field, a format,
    /// a checksum that does not match: the file was edited).
    public static func load(_ path: String) throws -> EvaluationManifest {
        let data = try Files.read(path)
        let manifest: EvaluationManifest
        do { manifest = try JSONDecoder().decode(EvaluationManifest.self, from: data) } catch {
            throw ConvirtError("\(path): not an evaluation manifest (\(describeDecoding(error)))")
        }
        guard manifest.format == currentFormat else {
            throw ConvirtError("\(path): manifest format \(manifest.format); this program reads format \(currentFormat)")
        }
        guard let checksum = manifest.checksum else { throw ConvirtError("\(path): the manifest has no checksum") }
        guard try checksum == manifest.computedChecksum() else {
            throw ConvirtError("\(path): the manifest's checksum does not match its content (the file was edited)")
        }
        return manifest
    }

    /// The differences of `other` (this evaluation's) from this pinned manifest in what decides the
    /// result: the command, the splits, the prompts and the checkpoint ("test: 234 ids, sha256 1a2b3c4d...
    /// pinned; 233 ids, sha256 9f8e7d6c... here").
    public func differences(_ other: EvaluationManifest) -> [String] {
        var out: [String] = []
        if command != other.command { out.append("command: \(command) pinned, \(other.command) here") }
        for name in Set(splits.keys).union(other.splits.keys).sorted() where splits[name] != other.splits[name] {
            func text(_ s: Split?) -> String { s.map { "\($0.count) ids, sha256 \($0.sha256.prefix(12))..." } ?? "absent" }
            out.append("\(name): \(text(splits[name])) pinned; \(text(other.splits[name])) here")
        }
        if promptsSHA256 != other.promptsSHA256 {
            out.append("prompts: sha256 \(promptsSHA256?.prefix(12) ?? "none") pinned, \(other.promptsSHA256?.prefix(12) ?? "none") here")
        }
        if let pinned = checkpoint, let here = other.checkpoint, pinned.step != here.step || pinned.manifestChecksum != here.manifestChecksum {
            out.append("checkpoint: step \(pinned.step) (manifest checksum \(pinned.manifestChecksum ?? "none")) pinned; "
                       + "step \(here.step) (\(here.manifestChecksum ?? "none")) here, \(here.path)")
        } else if (checkpoint == nil) != (other.checkpoint == nil) {
            out.append("checkpoint: \(checkpoint == nil ? "none" : "one") pinned, \(other.checkpoint == nil ? "none" : "one") here")
        }
        return out
    }

    /// One line for tables: "step 4000 · test 234 ids 1a2b3c4d · seeds 0-4 · bf16 · convirt 0.1.0 · manifest 9f8e7d6c".
    public var summary: String {
        var parts: [String] = []
        if let checkpoint { parts.append("step \(checkpoint.step)") }
        for (name, split) in splits.sorted(by: { $0.key < $1.key }) where name == "test" || splits["test"] == nil {
            parts.append("\(name) \(split.count) ids \(split.sha256.prefix(8))")
        }
        if let promptsSHA256 { parts.append("prompts \(promptsSHA256.prefix(8))") }
        if let seeds, let first = seeds.first { parts.append(seeds.count == 1 ? "seed \(first)" : "seeds \(first)-\(seeds.last!)") }
        parts.append(precision)
        parts.append(program)
        if let checksum { parts.append("manifest \(checksum.prefix(8))") }
        return parts.joined(separator: " · ")
    }
}

/// The hash of a split: one line per sample, its id (the path relative to the dataset's root, or the
/// sentence) and its labels, in the order the evaluation reads them.
public enum SplitHash {
    public static func split(ids: [String], labels: [[Float]]? = nil) -> EvaluationManifest.Split {
        var hash = SHA256()
        for (i, id) in ids.enumerated() {
            var line = id
            if let labels { line += "\t" + labels[i].map { String(format: "%g", $0) }.joined(separator: ",") }
            hash.update(Array((line + "\n").utf8))
        }
        return EvaluationManifest.Split(count: ids.count, sha256: hash.hexDigest())
    }

    /// `path` relative to `root`, both taken as absolute, standardized paths (so `data/x` and
    /// `/work/data/x/` give the same ids; symbolic links are not followed); unchanged when not under it.
    public static func relative(_ path: String, to root: String) -> String {
        func standard(_ p: String) -> String { URL(fileURLWithPath: p).standardizedFileURL.path }
        let full = standard(path), base = standard(root).hasSuffix("/") ? standard(root) : standard(root) + "/"
        return full.hasPrefix(base) ? String(full.dropFirst(base.count)) : full
    }
}
