// Sharded checkpoints coordinated by rank 0 (DESIGN.md, Files). Each rank copies its range of the flat
// arena (parameters, Adam m, Adam v) into a snapshot and training goes on while a background thread
// byte-shuffles the floats into planes, compresses them with zstd (content checksum on) and writes the
// shard into a temporary directory. At the commit point (the end of the next step, or at once when
// saving synchronously) every rank reports size and checksum; only when all succeeded does rank 0 write
// the manifest, fsync, rename the directory into place and point `latest` at it. With `gather` I/O,
// rank 0 receives the compressed shards over MPI and writes them all (no shared filesystem needed).

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
        /// The schedule's state: the plateau schedule's current rate (halved on plateaus); the base rate
        /// of the cosine and constant schedules, whose rate is a function of the step.
        public var learningRate: Double
        public var bestValidation: Double?
        public var checksWithoutImprovement: Int
        public var checks: Int
        /// The rate the last step before the checkpoint used (absent in checkpoints of older versions).
        public var lastStepLearningRate: Double?
        /// The outlier guard's window and counts (absent when the guard is off, and in older checkpoints).
        public var outlierGuard: OutlierGuard?

        public init(step: Int, epoch: Int, samplesSeen: Int, learningRate: Double, bestValidation: Double?, checksWithoutImprovement: Int, checks: Int,
                    lastStepLearningRate: Double? = nil, outlierGuard: OutlierGuard? = nil) {
            self.step = step; self.epoch = epoch; self.samplesSeen = samplesSeen; self.learningRate = learningRate
            self.bestValidation = bestValidation; self.checksWithoutImprovement = checksWithoutImprovement; self.checks = checks
            self.lastStepLearningRate = lastStepLearningRate
            self.outlierGuard = outlierGuard
        }
    }
    /// 2: the manifest carries a checksum of itself. Version 1 (no checksum) is still read.
    public static let currentFormat = 2
    public var format = CheckpointManifest.currentFormat
    public var worldSize: Int
    public var arenaCount: Int
    public var state: State
    public var config: TrainConfig
    public var entries: [Entry]
    public var shards: [Shard]
    /// CRC-32 (hex) of the manifest's compact sorted-key JSON without this field: any edit is caught.
    public var checksum: String? = nil

    enum CodingKeys: String, CodingKey {
        case format, worldSize = "world_size", arenaCount = "arena_count", state, config, entries, shards, checksum
    }

    /// The checksum of everything but the checksum field.
    public func computedChecksum() throws -> String {
        var copy = self
        copy.checksum = nil
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
        let bytes = try encoder.encode(copy)
        return String(format: "%08x", bytes.withUnsafeBytes { crc32Checksum($0) })
    }

    /// Rejects a manifest that cannot describe a checkpoint this build wrote, before anything is
    /// allocated from its numbers: unknown format, file names outside the directory, shard ranges that
    /// do not tile the arena, sizes that disagree, tensors outside the arena.
    public func validate(source: String) throws {
        func fail(_ problem: String) -> ConvirtError { ConvirtError("\(source): \(problem)") }
        guard format == 1 || format == CheckpointManifest.currentFormat else {
            throw fail("unknown checkpoint format version \(format) (this build reads versions 1 and \(CheckpointManifest.currentFormat))")
        }
        guard worldSize >= 1, worldSize <= 1 << 20, shards.count == worldSize else {
            throw fail("\(shards.count) shard(s) for a world size of \(worldSize)")
        }
        guard arenaCount >= 0, arenaCount <= 1 << 36 else { throw fail("absurd arena size \(arenaCount)") }
        var next = 0
        for shard in shards {
            let name = shard.file
            guard !name.isEmpty, !name.contains("/"), name != ".", name != "..", !name.hasPrefix(".") else {
                throw fail("shard file \"\(name)\" is outside the checkpoint directory")
            }
            guard shard.range.count == 2, shard.range[0] == next, shard.range[1] >= shard.range[0], shard.range[1] <= arenaCount else {
                throw fail("\(name): arena range \(shard.range) does not continue the shards before it within [0, \(arenaCount))")
            }
            next = shard.range[1]
            guard shard.rawBytes == (shard.range[1] - shard.range[0]) * 12 else {
                throw fail("\(name): \(shard.rawBytes) raw bytes for \(shard.range[1] - shard.range[0]) floats x 3")
            }
            guard shard.bytes > 0, shard.bytes <= Zstd.bound(shard.rawBytes) else { throw fail("\(name): absurd compressed size \(shard.bytes)") }
        }
        guard next == arenaCount else { throw fail("the shards cover [0, \(next)) of an arena of \(arenaCount)") }
        for e in entries {
            guard e.shape.allSatisfy({ $0 >= 0 && $0 <= arenaCount }), e.offset >= 0 else { throw fail("tensor \(e.name): absurd shape \(e.shape)") }
            let (count, overflow) = e.shape.reduce((1, false)) { acc, d in
                let (p, o) = acc.0.multipliedReportingOverflow(by: d)
                return (p, acc.1 || o)
            }
            guard !overflow, e.offset <= arenaCount, count <= arenaCount - e.offset else {
                throw fail("tensor \(e.name) \(describe(shape: e.shape)) at \(e.offset) lies outside the arena of \(arenaCount)")
            }
        }
        // The arena must be the one of the model the manifest's config describes.
        let modelCount: Int
        do { modelCount = try ConVIRTModel.layout(config.model).totalCount } catch { throw fail("its model config is invalid: \(error)") }
        guard modelCount == arenaCount else {
            throw fail("an arena of \(arenaCount) floats, but the model of its config has \(modelCount)")
        }
        if format >= 2 {
            guard let checksum else { throw fail("the manifest has no checksum (damaged)") }
            let computed = try computedChecksum()
            guard computed == checksum else {
                throw fail("the manifest was changed after it was written (checksum \(computed), recorded \(checksum)): damaged or edited")
            }
        }
    }
}

/// How shards reach the disk: each rank writes its own (`parallel`; the run directory must be on a
/// filesystem every rank sees) or rank 0 receives them over MPI and writes them all (`gather`).
public enum CheckpointIO: String, Codable, Sendable, CaseIterable { case parallel, gather }

public enum Checkpoints {
    /// Byte planes of `count` floats: all first bytes, then all second bytes, ... (compresses better).
    static func shuffle(_ floats: UnsafePointer<Float>, count n: Int, into planes: UnsafeMutablePointer<UInt8>) {
        let words = UnsafeRawPointer(floats).assumingMemoryBound(to: UInt32.self)
        for i in 0..<n {
            let w = words[i]
            planes[i] = UInt8(truncatingIfNeeded: w)
            planes[n + i] = UInt8(truncatingIfNeeded: w >> 8)
            planes[2 * n + i] = UInt8(truncatingIfNeeded: w >> 16)
            planes[3 * n + i] = UInt8(truncatingIfNeeded: w >> 24)
        }
    }

    /// Floats `elements` of the byte planes of `count` floats starting at `planes`.
    static func unshuffle(_ planes: UnsafePointer<UInt8>, count n: Int, elements: Range<Int>, into floats: UnsafeMutablePointer<Float>) {
        let words = UnsafeMutableRawPointer(floats).assumingMemoryBound(to: UInt32.self)
        for (k, i) in elements.enumerated() {
            words[k] = UInt32(planes[i]) | UInt32(planes[n + i]) << 8 | UInt32(planes[2 * n + i]) << 16 | UInt32(planes[3 * n + i]) << 24
        }
    }

    static func name(step: Int) -> String { String(format: "step-%08d", step) }
    static func shardFile(rank: Int, worldSize: Int) -> String { String(format: "shard-%05d-of-%05d.zst", rank, worldSize) }

    static func entries(of arena: ParameterArena) -> [CheckpointManifest.Entry] {
        arena.layout.entries.map { CheckpointManifest.Entry(name: $0.name, shape: $0.shape, offset: $0.offset, kind: $0.kind.rawValue) }
    }

    /// Keeps the newest `keep` complete checkpoints (and `best`, when named).
    static func prune(root: String, keep: Int, best: String?) {
        let complete = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
            .filter { $0.hasPrefix("step-") && FileManager.default.fileExists(atPath: "\(root)/\($0)/manifest.json") }.sorted()
        for old in complete.dropLast(max(1, keep)) where old != best { try? FileManager.default.removeItem(atPath: "\(root)/\(old)") }
    }

    /// Removes the temporary directories of saves that never committed (a kill, a full disk).
    @discardableResult
    public static func removeLeftovers(runDirectory: String) -> [String] {
        let root = "\(runDirectory)/checkpoints"
        let leftovers = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).filter { $0.hasPrefix(".tmp-") }
        for leftover in leftovers { try? FileManager.default.removeItem(atPath: "\(root)/\(leftover)") }
        return leftovers
    }

    /// The published checkpoints of a run directory, newest first (`latest` first when it names one).
    /// A checkpoint is published whole (its directory renamed into place after its manifest is on the
    /// disk), so one without its manifest is damaged, not absent: it is listed, and resuming from it fails
    /// as from any other damage (`--resume-fallback` goes on to the previous one).
    public static func candidates(runDirectory: String) -> [String] {
        let root = "\(runDirectory)/checkpoints"
        let fm = FileManager.default
        var complete = ((try? fm.contentsOfDirectory(atPath: root)) ?? [])
            .filter { $0.hasPrefix("step-") }.sorted().reversed().map { "\(root)/\($0)" }
        if let named = try? String(contentsOfFile: "\(root)/latest", encoding: .utf8), let i = complete.firstIndex(of: "\(root)/\(named)") {
            complete.insert(complete.remove(at: i), at: 0)
        }
        return complete
    }

    /// The newest complete checkpoint of a run directory (`latest` if it names a complete one), or nil.
    public static func latest(runDirectory: String) -> String? { candidates(runDirectory: runDirectory).first }

    /// The manifest of a checkpoint directory, validated.
    public static func manifest(_ directory: String) throws -> CheckpointManifest {
        let path = "\(directory)/manifest.json"
        let manifest: CheckpointManifest
        let bytes = try Files.read(path)
        do { manifest = try StrictJSON.decode(CheckpointManifest.self, from: bytes, source: path) } catch let e as ConvirtError {
            throw ConvirtError("\(e.message) (not a checkpoint manifest this build can read)", reason: e.reason)
        }
        try manifest.validate(source: path)
        return manifest
    }

    /// Reads, checks (size, CRC-32, zstd content checksum, decompressed size) and decompresses each shard
    /// in turn; `body` gets the shard and its byte planes (params, m, v; each `count` floats as 4 planes).
    static func forEachShard(_ directory: String, _ manifest: CheckpointManifest,
                             _ body: (CheckpointManifest.Shard, UnsafePointer<UInt8>) throws -> Void) throws {
        for shard in manifest.shards {
            let raw = try readShard(directory, shard)
            try raw.withUnsafeBytes { try body(shard, $0.bindMemory(to: UInt8.self).baseAddress ?? UnsafePointer(bitPattern: 1)!) }
        }
    }

    /// One shard's byte planes, after its size, CRC-32, zstd checksum and decompressed size are checked.
    static func readShard(_ directory: String, _ shard: CheckpointManifest.Shard) throws -> Data {
        let path = "\(directory)/\(shard.file)"
        guard let size = Files.size(path) else { throw ConvirtError("\(path): missing (the manifest lists it)") }
        guard size == shard.bytes else { throw ConvirtError("\(path): \(size) bytes, the manifest says \(shard.bytes) (truncated?)") }
        let data = try Files.read(path)
        let crc = data.withUnsafeBytes { crc32Checksum($0) }
        guard crc == shard.crc32 else {
            throw ConvirtError("\(path): checksum \(String(crc, radix: 16)) differs from the manifest's \(String(shard.crc32, radix: 16)) (corrupt)")
        }
        return try Zstd.decompress(data, expectedSize: shard.rawBytes, source: path)
    }

    /// Checks every shard of a checkpoint without keeping the arena; returns the manifest.
    @discardableResult
    public static func verify(_ directory: String) throws -> CheckpointManifest {
        let manifest = try manifest(directory)
        try forEachShard(directory, manifest) { _, _ in }
        return manifest
    }

    /// A checkpoint directory, or a run directory meaning its latest complete checkpoint.
    public static func resolve(_ path: String) throws -> String {
        if FileManager.default.fileExists(atPath: "\(path)/manifest.json") { return path }
        if let latest = latest(runDirectory: path) { return latest }
        throw ConvirtError("\(path) is neither a checkpoint directory nor a run directory with a complete checkpoint")
    }

    /// The run directory a checkpoint directory belongs to (RUN/checkpoints/step-N), if it has that shape.
    public static func runDirectory(ofCheckpoint directory: String) -> String? {
        let url = URL(fileURLWithPath: directory).standardizedFileURL
        let parent = url.deletingLastPathComponent()
        return parent.lastPathComponent == "checkpoints" ? parent.deletingLastPathComponent().path : nil
    }

    /// Reads and checks every shard; the parameters only (the Adam moments are checked, not kept).
    public static func readParameters(_ directory: String) throws -> (manifest: CheckpointManifest, params: [Float]) {
        let manifest = try manifest(directory)
        var params = [Float](repeating: 0, count: manifest.arenaCount)
        try forEachShard(directory, manifest) { shard, planes in
            let lo = shard.range[0], count = shard.range[1] - lo
            params.withUnsafeMutableBufferPointer { unshuffle(planes, count: count, elements: 0..<count, into: $0.baseAddress! + lo) }
        }
        return (manifest, params)
    }

    /// Copies the tensors under `prefix` of a checkpoint into `arena`, by name (the arena's entries under
    /// the prefix must all be in the checkpoint, with the same shapes). Returns the manifest.
    @discardableResult
    public static func load(_ directory: String, prefix: String, into arena: ParameterArena) throws -> CheckpointManifest {
        let (manifest, params) = try readParameters(directory)
        let theirs = Dictionary(manifest.entries.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var problems: [String] = []
        for entry in arena.layout.entries where entry.name.hasPrefix(prefix) {
            guard let t = theirs[entry.name] else { problems.append("\(entry.name) is not in the checkpoint"); continue }
            guard t.shape == entry.shape else {
                problems.append("\(entry.name): \(describe(shape: t.shape)) in the checkpoint, \(describe(shape: entry.shape)) here"); continue
            }
            params.withUnsafeBufferPointer { (arena.mutableParams + entry.offset).update(from: $0.baseAddress! + t.offset, count: entry.count) }
        }
        if !problems.isEmpty { throw ConvirtError("\(directory): \(problems.prefix(8).joined(separator: "; "))") }
        return manifest
    }

    /// Restores a checkpoint into `arena`: all parameters, and the Adam moments of the arena range this
    /// process holds (all of them, or its ZeRO-1 shard), whatever the world size at save. The layouts
    /// must be identical (a clear error lists the differences).
    public static func restore(_ directory: String, into arena: ParameterArena) throws -> CheckpointManifest {
        let manifest = try manifest(directory)
        try checkLayout(manifest, of: directory, against: arena)
        let own = arena.optimizerRange
        try forEachShard(directory, manifest) { shard, planes in
            let lo = shard.range[0], count = shard.range[1] - lo
            unshuffle(planes, count: count, elements: 0..<count, into: arena.mutableParams + lo)
            // The part of this shard's moments that falls in our optimizer range.
            let a = max(lo, own.lowerBound), b = min(lo + count, own.upperBound)
            if a < b {
                let (m, v) = arena.moments(at: a)
                unshuffle(planes + count * 4, count: count, elements: (a - lo)..<(b - lo), into: m)
                unshuffle(planes + count * 8, count: count, elements: (a - lo)..<(b - lo), into: v)
            }
        }
        return manifest
    }

    /// The checkpoint's name table must be the arena's (a clear error lists the differences).
    static func checkLayout(_ manifest: CheckpointManifest, of directory: String, against arena: ParameterArena) throws {
        let ours = entries(of: arena)
        guard ours != manifest.entries || manifest.arenaCount != arena.count else { return }
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
        if differences.isEmpty { differences.append("arena of \(manifest.arenaCount) floats in the checkpoint, \(arena.count) now") }
        throw ConvirtError("\(directory): the model differs from the checkpoint's: \(differences.prefix(10).joined(separator: "; "))",
                           reason: .modelMismatch)
    }

    /// Restores a checkpoint that only rank 0 can read (gather I/O: no shared filesystem). Collective:
    /// rank 0 reads and checks each shard and broadcasts its parameters and Adam moments; every rank
    /// keeps all parameters and the moments of its own optimizer range. `directory` matters on rank 0
    /// only; an error there is thrown on every rank with rank 0's message.
    public static func restoreFromRoot(_ directory: String, into arena: ParameterArena, communicator: Communicator) throws -> CheckpointManifest {
        let root = communicator.isRoot
        var manifestBytes = Data()
        var failure: ConvirtError? = nil
        func failed(_ error: Error) -> ConvirtError { error as? ConvirtError ?? ConvirtError("\(error)") }
        if root {
            do {
                let m = try manifest(directory)
                try checkLayout(m, of: directory, against: arena)
                manifestBytes = try JSONEncoder().encode(m)
            } catch { failure = failed(error) }
        }
        try broadcastFailure(&failure, communicator)
        manifestBytes = try broadcastBytes(manifestBytes, communicator)
        let manifest = try JSONDecoder().decode(CheckpointManifest.self, from: manifestBytes)
        let own = arena.optimizerRange
        let moments = Scratch<Float>()
        for shard in manifest.shards {
            let lo = shard.range[0], count = shard.range[1] - lo
            let m = moments.ensure(max(1, 2 * count))
            if root {
                do {
                    let raw = try readShard(directory, shard)
                    raw.withUnsafeBytes { bytes in
                        let planes = bytes.bindMemory(to: UInt8.self).baseAddress ?? UnsafePointer(bitPattern: 1)!
                        unshuffle(planes, count: count, elements: 0..<count, into: arena.mutableParams + lo)
                        unshuffle(planes + count * 4, count: count, elements: 0..<count, into: m)
                        unshuffle(planes + count * 8, count: count, elements: 0..<count, into: m + count)
                    }
                } catch { failure = failed(error) }
            }
            try broadcastFailure(&failure, communicator)
            try broadcastLarge(UnsafeMutableRawBufferPointer(start: arena.mutableParams + lo, count: count * 4), communicator)
            try broadcastLarge(UnsafeMutableRawBufferPointer(start: m, count: 2 * count * 4), communicator)
            let a = max(lo, own.lowerBound), b = min(lo + count, own.upperBound)
            if a < b {
                let (adamM, adamV) = arena.moments(at: a)
                adamM.update(from: m + (a - lo), count: b - a)
                adamV.update(from: m + count + (a - lo), count: b - a)
            }
        }
        return manifest
    }

    /// Rank 0's failure (if any) reaches every rank, which throws it with its reason.
    static func broadcastFailure(_ failure: inout ConvirtError?, _ communicator: Communicator) throws {
        var flag: [Int64] = [failure == nil ? 0 : failure!.reason == .modelMismatch ? 2 : 1]
        try flag.withUnsafeMutableBytes { try communicator.broadcast($0, root: 0) }
        guard flag[0] != 0 else { return }
        let message = try broadcastBytes(Data((failure?.message ?? "").utf8), communicator)
        if communicator.isRoot { throw failure! }
        throw ConvirtError("rank 0: \(String(decoding: message, as: UTF8.self))", reason: flag[0] == 2 ? .modelMismatch : .invalid)
    }

    /// Rank 0's bytes on every rank.
    static func broadcastBytes(_ data: Data, _ communicator: Communicator) throws -> Data {
        var length: [Int64] = [Int64(data.count)]
        try length.withUnsafeMutableBytes { try communicator.broadcast($0, root: 0) }
        var out = communicator.isRoot ? data : Data(count: Int(length[0]))
        try out.withUnsafeMutableBytes { try broadcastLarge($0, communicator) }
        return out
    }

    /// MPI_Bcast in pieces of at most 1 GiB (its counts are 32-bit).
    static func broadcastLarge(_ buffer: UnsafeMutableRawBufferPointer, _ communicator: Communicator) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        var offset = 0
        while offset < buffer.count {
            let n = min(1 << 30, buffer.count - offset)
            try communicator.broadcast(UnsafeMutableRawBufferPointer(start: base + offset, count: n), root: 0)
            offset += n
        }
    }
}

/// Writes checkpoints of one run collectively (every rank calls `save` and `commit` at the same steps).
public final class CheckpointWriter: @unchecked Sendable {
    public let communicator: Communicator
    public let runDirectory: String
    public let mode: CheckpointIO
    public let asynchronous: Bool
    public let keep: Int
    var root: String { "\(runDirectory)/checkpoints" }

    struct Job {
        var state: CheckpointManifest.State
        var config: TrainConfig
        var best: Bool
        var entries: [CheckpointManifest.Entry]
        var arenaCount: Int
        /// The arena's cut (`ArenaShards(arena:worldSize:)`) and this rank's range of it.
        var shards: ArenaShards
        var range: Range<Int>
        var temporary: String
    }
    struct Outcome { var bytes = 0; var crc: UInt32 = 0; var error: String? = nil; var compressed: Data? = nil }

    private var job: Job?
    private var outcome = Outcome()
    private let finished = DispatchSemaphore(value: 0)
    /// True once this rank's writer has finished the current job (its signal consumed).
    private var written = false
    /// The snapshot (params, m, v of this rank's range) and its byte planes, reused from save to save.
    private var snapshot = Scratch<Float>()
    private var planes = Scratch<UInt8>()
    /// Seconds the training thread spent on checkpoints since the last `takeStall()`.
    private var stall = 0.0
    /// The step of the checkpoint being written, if one is.
    public var pendingStep: Int? { job?.state.step }

    /// Collective: rank 0 creates the checkpoint directory and removes leftovers of saves that never committed.
    public init(communicator: Communicator, runDirectory: String, mode: CheckpointIO = .parallel, asynchronous: Bool = true, keep: Int = 3) throws {
        self.communicator = communicator
        self.runDirectory = runDirectory
        self.mode = mode
        self.asynchronous = asynchronous
        self.keep = keep
        if communicator.isRoot {
            try FileManager.default.createDirectory(atPath: "\(runDirectory)/checkpoints", withIntermediateDirectories: true)
            Checkpoints.removeLeftovers(runDirectory: runDirectory)
        }
        try communicator.barrier()
    }

    /// Allocates and touches the snapshot buffer before training, so that the first save does not pay
    /// for page faults on the training thread.
    public func reserve(arena: ParameterArena) {
        let n = ArenaShards(arena: arena, worldSize: communicator.size)[communicator.rank].count
        snapshot.ensure(max(1, 3 * n)).initialize(repeating: 0, count: max(1, 3 * n))
    }

    /// The training time lost to checkpoints since the last call.
    public func takeStall() -> Double { defer { stall = 0 }; return stall }

    /// Starts a checkpoint of `arena` at `state.step` (collective). The arena may change as soon as this
    /// returns: this rank's range is copied first. Synchronous writers have written their shard when
    /// it returns, asynchronous ones write it in the background; both publish it at `commit()` (the
    /// trainer commits after the step's metrics row is on the disk).
    public func save(arena: ParameterArena, state: CheckpointManifest.State, config: TrainConfig, best: Bool = false) throws {
        if job != nil { try commit() }
        var clock = Clock()
        let w = communicator.size, r = communicator.rank
        let shards = ArenaShards(arena: arena, worldSize: w), range = shards[r]
        let n = range.count
        let copy = snapshot.ensure(max(1, 3 * n))
        copy.update(from: arena.params + range.lowerBound, count: n)
        let (m, v) = arena.moments(at: range.lowerBound)
        (copy + n).update(from: m, count: n)
        (copy + 2 * n).update(from: v, count: n)
        // Never a checkpoint with NaN or infinite values: counted on every rank's range, summed, so that
        // all ranks refuse together.
        var bad = [0.0]
        for i in 0..<(3 * n) where !copy[i].isFinite { bad[0] += 1 }
        try bad.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        guard bad[0] == 0 else {
            throw ConvirtError("step \(state.step): \(Int(bad[0])) parameter or optimizer value(s) are NaN or infinite, so training stopped and "
                               + "no checkpoint was written (the run diverged: try a lower --lr or --clip-grad-norm, and --resume from the last checkpoint)")
        }
        written = false
        let job = Job(state: state, config: config, best: best, entries: communicator.isRoot ? Checkpoints.entries(of: arena) : [],
                      arenaCount: arena.count, shards: shards, range: range, temporary: "\(root)/.tmp-\(Checkpoints.name(step: state.step))")
        self.job = job
        if asynchronous {
            Thread.detachNewThread { [self] in
                // Yield to training where cores are short (the nice value is per thread on Linux);
                // with a core to spare this changes nothing, and a forced commit frees the core anyway.
                _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
                outcome = writeShard(job)
                finished.signal()
            }
            stall += clock.lap()
        } else {
            outcome = writeShard(job)
            finished.signal()
            stall += clock.lap()
        }
    }

    /// Shuffle, compress and (parallel I/O, or rank 0) write this rank's shard. Runs off the training thread.
    private func writeShard(_ job: Job) -> Outcome {
        var result = Outcome()
        do {
            let n = job.range.count
            let bytes = planes.ensure(max(1, 12 * n))
            let copy = snapshot.pointer
            for k in 0..<3 { Checkpoints.shuffle(copy + k * n, count: n, into: bytes + k * 4 * n) }
            let compressed = try Zstd.compress(UnsafeRawBufferPointer(start: bytes, count: 12 * n), level: 3)
            result.bytes = compressed.count
            result.crc = compressed.withUnsafeBytes { crc32Checksum($0) }
            if mode == .parallel || communicator.isRoot {
                do { try FileManager.default.createDirectory(atPath: job.temporary, withIntermediateDirectories: true) } catch {
                    throw ConvirtError("cannot create \(job.temporary): \(error.localizedDescription)")
                }
                try Files.writeDurably(compressed, to: "\(job.temporary)/\(Checkpoints.shardFile(rank: communicator.rank, worldSize: communicator.size))")
            } else {
                result.compressed = compressed
            }
            CheckpointFaults.afterShardWritten(step: job.state.step, rank: communicator.rank)
        } catch {
            result.error = "\(error)"
        }
        return result
    }

    /// Commits the checkpoint being written if every rank has finished writing its shard (collective:
    /// one small all-reduce while a checkpoint is pending); training never waits here. Returns whether
    /// it committed.
    @discardableResult
    public func commitIfReady() throws -> Bool {
        guard job != nil else { return false }
        if !written && finished.wait(timeout: .now()) == .success { written = true }
        var pending = [written ? 0.0 : 1.0]
        try pending.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        guard pending[0] == 0 else { return false }
        try commit()
        return true
    }

    /// After an error that ends training while a checkpoint is being written (a full disk that stopped the
    /// metrics before the commit, say): waits for this rank's write, removes its shard, and removes the
    /// temporary directory once it is empty (the last rank out does). Not collective, for error paths; a
    /// rank aborted mid-write leaves its shard, which the next start removes (`removeLeftovers`).
    public func abandon() {
        guard let job else { return }
        if !written { finished.wait() }
        written = false
        self.job = nil
        outcome = Outcome()
        try? FileManager.default.removeItem(atPath: "\(job.temporary)/\(Checkpoints.shardFile(rank: communicator.rank, worldSize: communicator.size))")
        _ = rmdir(job.temporary)
    }

    /// Commits the checkpoint being written (collective; no-op when none): waits for this rank's shard,
    /// gathers every rank's size and checksum, and rank 0 publishes the checkpoint only when all succeeded.
    public func commit() throws {
        guard let job else { return }
        var clock = Clock()
        if !written { finished.wait() }
        written = false
        let mine = outcome
        self.job = nil
        outcome = Outcome()
        let w = communicator.size, r = communicator.rank
        if let error = mine.error { FileHandle.standardError.write(Data("rank \(r): cannot write checkpoint shard: \(error)\n".utf8)) }
        var report = [Double](repeating: 0, count: 3 * w)  // per rank: ok, bytes, crc
        if mine.error == nil { report[3 * r] = 1; report[3 * r + 1] = Double(mine.bytes); report[3 * r + 2] = Double(mine.crc) }
        try report.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        let allOK = (0..<w).allSatisfy { report[3 * $0] == 1 }
        var rootError: String? = allOK ? nil : "at least one rank could not write its shard (see its message)"
        if mode == .gather && allOK && w > 1 {
            if communicator.isRoot {
                for k in 1..<w {
                    var data = Data(count: Int(report[3 * k + 1]))
                    try data.withUnsafeMutableBytes { try communicator.receive(into: $0, from: k) }
                    guard rootError == nil else { continue }  // keep receiving so that no rank waits forever
                    do {
                        let crc = data.withUnsafeBytes { crc32Checksum($0) }
                        guard crc == UInt32(report[3 * k + 2]) else { throw ConvirtError("the shard of rank \(k) arrived with another checksum") }
                        try Files.writeDurably(data, to: "\(job.temporary)/\(Checkpoints.shardFile(rank: k, worldSize: w))")
                    } catch { rootError = "\(error)" }
                }
            } else if let compressed = mine.compressed {
                try compressed.withUnsafeBytes { try communicator.send($0, to: 0) }
            }
        }
        var status = [0.0]
        if communicator.isRoot {
            if rootError == nil {
                do { try publish(job, report: report) } catch { rootError = "\(error)" }
                if rootError == nil { CheckpointFaults.afterPublished(step: job.state.step) }
            }
            if rootError == nil { status[0] = 1 } else { try? FileManager.default.removeItem(atPath: job.temporary) }
        }
        try status.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        stall += clock.lap()
        if status[0] != 1 {
            throw ConvirtError("checkpoint at step \(job.state.step) failed\(rootError.map { ": \($0)" } ?? " on rank 0"); the previous checkpoint stays the latest")
        }
    }

    /// Rank 0: manifest, fsync, rename into place, `latest` (and `best`), retention.
    private func publish(_ job: Job, report: [Double]) throws {
        let w = communicator.size
        let shards = (0..<w).map { k -> CheckpointManifest.Shard in
            let range = job.shards[k]
            return .init(file: Checkpoints.shardFile(rank: k, worldSize: w), range: [range.lowerBound, range.upperBound],
                         bytes: Int(report[3 * k + 1]), crc32: UInt32(report[3 * k + 2]), rawBytes: range.count * 12)
        }
        var manifest = CheckpointManifest(worldSize: w, arenaCount: job.arenaCount, state: job.state, config: job.config, entries: job.entries, shards: shards)
        manifest.checksum = try manifest.computedChecksum()
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
        // In case no shard was written here (gather I/O on one rank never happens; an empty arena does).
        try FileManager.default.createDirectory(atPath: job.temporary, withIntermediateDirectories: true)
        try Files.writeDurably(encoder.encode(manifest), to: "\(job.temporary)/manifest.json")
        Files.syncDirectory(job.temporary)
        let name = Checkpoints.name(step: job.state.step), final = "\(root)/\(name)"
        try? FileManager.default.removeItem(atPath: final)
        do { try FileManager.default.moveItem(atPath: job.temporary, toPath: final) } catch {
            throw ConvirtError("cannot rename \(job.temporary) to \(final): \(error.localizedDescription)")
        }
        Files.syncDirectory(root)
        try Files.writeAtomically(Data(name.utf8), to: "\(root)/latest")
        if job.best { try Files.writeAtomically(Data(name.utf8), to: "\(root)/best") }
        Checkpoints.prune(root: root, keep: keep, best: try? String(contentsOfFile: "\(root)/best", encoding: .utf8))
    }
}

/// Fault injection for the tests of interrupted checkpoints: `CONVIRT_FAULT_KILL_AFTER_SHARD=STEP:RANK`
/// makes that rank kill itself (SIGKILL) right after writing its shard of the checkpoint of STEP, before
/// the commit, as a node failure would; `CONVIRT_FAULT_KILL_AFTER_COMMIT=STEP` makes rank 0 kill itself
/// right after publishing the checkpoint of STEP (`latest` names it).
enum CheckpointFaults {
    static let killAfterShard = EnvironmentSwitches.process.killAfterShard
    static let killAfterCommit = EnvironmentSwitches.process.killAfterCommit

    static func afterShardWritten(step: Int, rank: Int) {
        if let fault = killAfterShard, fault.step == step, fault.rank == rank { kill(getpid(), SIGKILL) }
    }

    static func afterPublished(step: Int) {
        if killAfterCommit == step { kill(getpid(), SIGKILL) }
    }
}
