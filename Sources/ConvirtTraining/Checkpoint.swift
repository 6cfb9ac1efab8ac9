// Sharded checkpoints coordinated by rank 0 (DESIGN.md, Files): each rank compresses its range of the
// flat arena (parameters, Adam m, Adam v; floats byte-shuffled into planes, then zstd with a content
// checksum) into a temporary directory; every rank reports size and checksum; only when all succeeded
// does rank 0 write the manifest, fsync, rename the directory into place and point `latest` at it.

import ConvirtCore
import ConvirtDistributed
import ConvirtIO
import ConvirtModels
import Foundation

public struct CheckpointManifest: Codable, Sendable {
    public struct Entry: Codable, Sendable, Equatable { public var name: String; public var shape: [Int]; public var offset: Int; public var kind: String }
    public struct Shard: Codable, Sendable {
        public var file: String
        public var range: [Int]         // [lower, upper) of the arena
        public var bytes: Int           // compressed size
        public var crc32: UInt32        // of the compressed file
        public var rawBytes: Int
    }
    public struct State: Codable, Sendable {
        public var step: Int
        public var epoch: Int
        public var samplesSeen: Int
        public var learningRate: Double
        public var bestValidation: Double?
        public var checksWithoutImprovement: Int
        public var checks: Int
    }
    public var format = 1
    public var worldSize: Int
    public var arenaCount: Int
    public var state: State
    public var config: TrainConfig
    public var entries: [Entry]
    public var shards: [Shard]

    enum CodingKeys: String, CodingKey { case format, worldSize = "world_size", arenaCount = "arena_count", state, config, entries, shards }
}

public enum Checkpoints {
    /// Byte planes: all first bytes of the floats, then all second bytes, ... (compresses better).
    static func shuffle(_ floats: UnsafeBufferPointer<Float>, into out: inout Data) {
        let n = floats.count
        out = Data(count: n * 4)
        let bytes = UnsafeRawBufferPointer(floats)
        out.withUnsafeMutableBytes { (dst: UnsafeMutableRawBufferPointer) in
            for i in 0..<n { for k in 0..<4 { dst[k * n + i] = bytes[i * 4 + k] } }
        }
    }

    static func unshuffle(_ data: Data, into floats: UnsafeMutableBufferPointer<Float>) {
        let n = floats.count
        let dst = UnsafeMutableRawBufferPointer(floats)
        data.withUnsafeBytes { (src: UnsafeRawBufferPointer) in
            for i in 0..<n { for k in 0..<4 { dst[i * 4 + k] = src[k * n + i] } }
        }
    }

    /// The arena range rank r of W saves.
    static func shardRange(rank: Int, worldSize: Int, count: Int) -> Range<Int> {
        let size = (count + worldSize - 1) / worldSize
        return min(count, rank * size)..<min(count, (rank + 1) * size)
    }

    static func fsync(path: String) {
        let fd = open(path, O_RDONLY)
        if fd >= 0 { _ = Glibc.fsync(fd); close(fd) }
    }

    static func name(step: Int) -> String { String(format: "step-%08d", step) }

    /// Writes a checkpoint of `arena` collectively (every rank calls it). Returns the directory.
    @discardableResult
    public static func save(arena: ParameterArena, state: CheckpointManifest.State, config: TrainConfig, runDirectory: String,
                            communicator: Communicator, keep: Int, best: Bool = false) throws -> String {
        let root = "\(runDirectory)/checkpoints"
        let final = "\(root)/\(name(step: state.step))", temporary = "\(root)/.tmp-\(name(step: state.step))"
        let w = communicator.size, r = communicator.rank
        if communicator.isRoot {
            try? FileManager.default.removeItem(atPath: temporary)
            try FileManager.default.createDirectory(atPath: temporary, withIntermediateDirectories: true)
        }
        try communicator.barrier()
        let range = shardRange(rank: r, worldSize: w, count: arena.count)
        let file = String(format: "shard-%05d-of-%05d.zst", r, w)
        var report = [Double](repeating: 0, count: 3 * w)  // per rank: ok, bytes, crc
        do {
            var raw = Data()
            for buffer in [arena.params, arena.adamM, arena.adamV] {
                var planes = Data()
                shuffle(UnsafeBufferPointer(start: buffer + range.lowerBound, count: range.count), into: &planes)
                raw.append(planes)
            }
            let compressed = try Zstd.compress(raw, level: 3)
            let path = "\(temporary)/\(file)"
            try compressed.write(to: URL(fileURLWithPath: path))
            fsync(path: path)
            report[3 * r] = 1
            report[3 * r + 1] = Double(compressed.count)
            report[3 * r + 2] = Double(compressed.withUnsafeBytes { crc32Checksum($0) })
        } catch {
            FileHandle.standardError.write(Data("rank \(r): cannot write checkpoint shard: \(error)\n".utf8))
        }
        try report.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        let allOK = (0..<w).allSatisfy { report[3 * $0] == 1 }
        if communicator.isRoot {
            if allOK {
                let entries = arena.layout.entries.map { CheckpointManifest.Entry(name: $0.name, shape: $0.shape, offset: $0.offset, kind: $0.kind.rawValue) }
                let shards = (0..<w).map { k -> CheckpointManifest.Shard in
                    let rr = shardRange(rank: k, worldSize: w, count: arena.count)
                    return .init(file: String(format: "shard-%05d-of-%05d.zst", k, w), range: [rr.lowerBound, rr.upperBound],
                                 bytes: Int(report[3 * k + 1]), crc32: UInt32(report[3 * k + 2]), rawBytes: rr.count * 12)
                }
                let manifest = CheckpointManifest(worldSize: w, arenaCount: arena.count, state: state, config: config, entries: entries, shards: shards)
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
                try encoder.encode(manifest).write(to: URL(fileURLWithPath: "\(temporary)/manifest.json"))
                fsync(path: "\(temporary)/manifest.json")
                try? FileManager.default.removeItem(atPath: final)
                try FileManager.default.moveItem(atPath: temporary, toPath: final)
                fsync(path: root)
                try Files.writeAtomically(Data(name(step: state.step).utf8), to: "\(root)/latest")
                if best { try Files.writeAtomically(Data(name(step: state.step).utf8), to: "\(root)/best") }
                prune(root: root, keep: keep, best: try? String(contentsOfFile: "\(root)/best", encoding: .utf8))
            } else {
                try? FileManager.default.removeItem(atPath: temporary)
            }
        }
        try communicator.barrier()
        if !allOK { throw ConvirtError("checkpoint at step \(state.step) failed on at least one rank; the previous checkpoint stays the latest") }
        return final
    }

    /// Keeps the newest `keep` complete checkpoints (and `best`, when named).
    static func prune(root: String, keep: Int, best: String?) {
        let complete = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
            .filter { $0.hasPrefix("step-") && FileManager.default.fileExists(atPath: "\(root)/\($0)/manifest.json") }.sorted()
        for old in complete.dropLast(max(1, keep)) where old != best { try? FileManager.default.removeItem(atPath: "\(root)/\(old)") }
    }

    /// Complete checkpoints of a run directory, newest first (`latest` first when it names one).
    public static func candidates(runDirectory: String) -> [String] {
        let root = "\(runDirectory)/checkpoints"
        let fm = FileManager.default
        var complete = ((try? fm.contentsOfDirectory(atPath: root)) ?? [])
            .filter { $0.hasPrefix("step-") && fm.fileExists(atPath: "\(root)/\($0)/manifest.json") }.sorted().reversed().map { "\(root)/\($0)" }
        if let named = try? String(contentsOfFile: "\(root)/latest", encoding: .utf8), let i = complete.firstIndex(of: "\(root)/\(named)") {
            complete.insert(complete.remove(at: i), at: 0)
        }
        return complete
    }

    /// The newest complete checkpoint of a run directory (`latest` if it names a complete one), or nil.
    /// Leftover temporary directories of interrupted saves are removed.
    public static func latest(runDirectory: String) -> String? {
        let root = "\(runDirectory)/checkpoints"
        let fm = FileManager.default
        for leftover in ((try? fm.contentsOfDirectory(atPath: root)) ?? []) where leftover.hasPrefix(".tmp-") {
            try? fm.removeItem(atPath: "\(root)/\(leftover)")
        }
        if let named = try? String(contentsOfFile: "\(root)/latest", encoding: .utf8),
           fm.fileExists(atPath: "\(root)/\(named)/manifest.json") { return "\(root)/\(named)" }
        let complete = ((try? fm.contentsOfDirectory(atPath: root)) ?? []).filter { fm.fileExists(atPath: "\(root)/\($0)/manifest.json") }.sorted()
        return complete.last.map { "\(root)/\($0)" }
    }

    public static func manifest(_ directory: String) throws -> CheckpointManifest {
        let path = "\(directory)/manifest.json"
        do { return try JSONDecoder().decode(CheckpointManifest.self, from: Files.read(path)) } catch let e as ConvirtError { throw e } catch {
            throw ConvirtError("\(path): not a checkpoint manifest (\(error))")
        }
    }

    /// Reads and checks every shard; the whole arena (params, m, v) of the checkpoint.
    public static func read(_ directory: String) throws -> (manifest: CheckpointManifest, params: [Float], m: [Float], v: [Float]) {
        let manifest = try manifest(directory)
        let n = manifest.arenaCount
        var params = [Float](repeating: 0, count: n), m = params, v = params
        for shard in manifest.shards {
            let path = "\(directory)/\(shard.file)"
            let data = try Files.read(path)
            guard data.count == shard.bytes else { throw ConvirtError("\(path): \(data.count) bytes, the manifest says \(shard.bytes) (truncated?)") }
            let crc = data.withUnsafeBytes { crc32Checksum($0) }
            guard crc == shard.crc32 else { throw ConvirtError("\(path): checksum \(String(crc, radix: 16)) differs from the manifest's \(String(shard.crc32, radix: 16)) (corrupt)") }
            let raw = try Zstd.decompress(data, expectedSize: shard.rawBytes, source: path)
            let lo = shard.range[0], count = shard.range[1] - shard.range[0]
            guard lo >= 0, count >= 0, lo + count <= n else { throw ConvirtError("\(path): arena range \(shard.range) outside \(n)") }
            for (k, target) in [0, 1, 2].map({ ($0, $0) }) {
                let part = raw.subdata(in: (k * count * 4)..<((k + 1) * count * 4))
                func fill(_ array: inout [Float]) { array.withUnsafeMutableBufferPointer { unshuffle(part, into: UnsafeMutableBufferPointer(rebasing: $0[lo..<(lo + count)])) } }
                switch target { case 0: fill(&params); case 1: fill(&m); default: fill(&v) }
            }
        }
        return (manifest, params, m, v)
    }

    /// Restores a checkpoint into `arena`; the layouts must be identical (a clear error lists differences).
    public static func restore(_ directory: String, into arena: ParameterArena) throws -> CheckpointManifest {
        let (manifest, params, m, v) = try read(directory)
        let ours = arena.layout.entries.map { CheckpointManifest.Entry(name: $0.name, shape: $0.shape, offset: $0.offset, kind: $0.kind.rawValue) }
        if ours != manifest.entries || manifest.arenaCount != arena.count {
            let theirs = Dictionary(manifest.entries.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
            var differences: [String] = []
            for e in ours {
                if let t = theirs[e.name] {
                    if t.shape != e.shape { differences.append("\(e.name): \(describe(shape: t.shape)) in the checkpoint, \(describe(shape: e.shape)) now") }
                    else if t.kind != e.kind { differences.append("\(e.name): \(t.kind) in the checkpoint, \(e.kind) now") }
                } else { differences.append("\(e.name): not in the checkpoint") }
            }
            let names = Set(ours.map(\.name))
            for t in manifest.entries where !names.contains(t.name) { differences.append("\(t.name): only in the checkpoint") }
            throw ConvirtError("\(directory): the model differs from the checkpoint's: \(differences.prefix(10).joined(separator: "; "))")
        }
        params.withUnsafeBufferPointer { arena.params.update(from: $0.baseAddress!, count: arena.count) }
        // The Adam moments this process holds: all of them, or its ZeRO-1 shard.
        let r = arena.optimizerRange
        m.withUnsafeBufferPointer { (arena.adamM + r.lowerBound).update(from: $0.baseAddress! + r.lowerBound, count: r.count) }
        v.withUnsafeBufferPointer { (arena.adamV + r.lowerBound).update(from: $0.baseAddress! + r.lowerBound, count: r.count) }
        return manifest
    }
}
