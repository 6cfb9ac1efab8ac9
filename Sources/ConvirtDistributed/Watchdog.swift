// No silent hang. Every collective of `MPICommunicator` waits under a deadline (`CollectiveWatchdog`):
// it is started non-blocking and tested until it completes. A rank whose collective outlives the
// deadline, or that hears another rank's timeout while it waits, sends what it is doing (step, phase,
// collective, bytes, seconds waited) to every other rank over a communicator of its own and listens
// for theirs for a grace period. A rank that does not answer is stalled, dead or busy outside any
// collective: every rank that answered names it. Each writes the report to the run directory and
// stderr; then the ranks that answered meet once more, so that no report is cut short, and the job
// ends non-zero (`launch.sh --max-restarts` resumes it from the last checkpoint).

import Foundation

/// What one rank was doing when the watchdog fired.
public struct RankActivity: Codable, Sendable, Equatable {
    public var rank: Int
    public var host: String
    public var pid: Int
    /// The training step (1-based, as metrics.jsonl counts), 0 before the first.
    public var step: Int
    /// What the program was doing: "forward", "gradient sync", "checkpoint", ...
    public var phase: String
    /// The MPI call waited in ("MPI_Allreduce", ...).
    public var collective: String
    /// The bytes this rank contributes to it.
    public var bytes: Int
    public var waitedSeconds: Double
    /// Collectives this rank completed before this one: ranks in the same collective show the same number.
    public var sequence: Int

    enum CodingKeys: String, CodingKey {
        case rank, host, pid, step, phase, collective, bytes, waitedSeconds = "waited_s", sequence
    }

    public init(rank: Int, host: String, pid: Int, step: Int, phase: String, collective: String, bytes: Int, waitedSeconds: Double, sequence: Int) {
        (self.rank, self.host, self.pid, self.step, self.phase) = (rank, host, pid, step, phase)
        (self.collective, self.bytes, self.waitedSeconds, self.sequence) = (collective, bytes, waitedSeconds, sequence)
    }

    /// "MPI_Allreduce #57 (gradient sync, step 6, 16 KiB)".
    public var waitDescription: String {
        "\(collective) #\(sequence + 1) (\(phase), step \(step), \(byteText(bytes)))"
    }

    /// Fixed-size records travel between ranks: JSON, zero-padded.
    static let recordBytes = 1024

    func record() -> [UInt8] {
        var shortened = self
        shortened.phase = String(phase.prefix(200))
        shortened.host = String(host.prefix(200))
        var bytes = Array((try? JSONEncoder().encode(shortened)) ?? Data())
        bytes = bytes.count < Self.recordBytes ? bytes : []
        return bytes + [UInt8](repeating: 0, count: Self.recordBytes - bytes.count)
    }

    init?(record: UnsafeRawBufferPointer) {
        let json = Data(record.prefix { $0 != 0 })
        guard let decoded = try? JSONDecoder().decode(RankActivity.self, from: json) else { return nil }
        self = decoded
    }
}

extension String {
    var capitalizedFirst: String { prefix(1).uppercased() + dropFirst() }
}

func byteText(_ bytes: Int) -> String {
    if bytes < 1024 { return "\(bytes) B" }
    if bytes < 1 << 20 { return String(format: "%.1f KiB", Double(bytes) / 1024) }
    if bytes < 1 << 30 { return String(format: "%.1f MiB", Double(bytes) / Double(1 << 20)) }
    return String(format: "%.2f GiB", Double(bytes) / Double(1 << 30))
}

/// The deadline of a rank's collectives and what the rank is doing, for the report. One per communicator;
/// the training loop sets `step` and `phase` as it goes.
public final class CollectiveWatchdog: @unchecked Sendable {
    /// torch.distributed's NCCL watchdog waits 10 minutes by default; so do we.
    public static let defaultTimeout = 600.0
    /// Seconds a collective may wait; nil: no deadline.
    public var timeout: Double? = CollectiveWatchdog.defaultTimeout
    public var step = 0
    public var phase = "start"
    /// Where each rank writes `collective-timeout.rank<R>.json` (nil: stderr only).
    public var reportDirectory: String?
    /// Collectives completed so far.
    public internal(set) var completed = 0

    public init() {}

    /// How long a rank that timed out listens for the other ranks: a quarter of the deadline, 2 to 30 s.
    /// Ranks waiting in a collective answer within 50 ms; a rank still computing answers when it reaches
    /// its next collective.
    public var grace: Double { min(max((timeout ?? 120) / 4, 2), 30) }

    /// The report file of `rank`.
    public static func reportFile(rank: Int) -> String { "collective-timeout.rank\(rank).json" }

    /// The report files in `directory` (one per rank that answered), sorted.
    public static func reportFiles(in directory: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            .filter { $0.hasPrefix("collective-timeout.rank") && $0.hasSuffix(".json") }.sorted()
    }
}

/// A collective that outlived the deadline (or another rank's), after the ranks that could still speak
/// exchanged what they were doing. Already reported on stderr and in the run directory when thrown.
public struct CollectiveTimeout: Error, CustomStringConvertible, Codable, Sendable {
    public let timeoutSeconds: Double
    /// How long this rank listened for the others.
    public let graceSeconds: Double
    public let worldSize: Int
    /// This rank's wait.
    public let this: RankActivity
    /// Every rank that answered, this one included, in rank order.
    public let answered: [RankActivity]
    /// The ranks that did not answer within the grace period.
    public let silent: [Int]
    /// Whether this rank timed out itself (false: another rank's timeout reached it first).
    public let expiredHere: Bool

    enum CodingKeys: String, CodingKey {
        case timeoutSeconds = "timeout_s", graceSeconds = "grace_s", worldSize = "world_size", this = "this_rank", answered, silent, expiredHere = "expired_here", verdict
    }

    public init(timeoutSeconds: Double, graceSeconds: Double, worldSize: Int, this: RankActivity, answered: [RankActivity], silent: [Int],
                expiredHere: Bool) {
        (self.timeoutSeconds, self.graceSeconds, self.worldSize, self.this) = (timeoutSeconds, graceSeconds, worldSize, this)
        (self.answered, self.silent, self.expiredHere) = (answered.sorted { $0.rank < $1.rank }, silent.sorted(), expiredHere)
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(timeoutSeconds: try c.decode(Double.self, forKey: .timeoutSeconds), graceSeconds: try c.decode(Double.self, forKey: .graceSeconds),
                  worldSize: try c.decode(Int.self, forKey: .worldSize),
                  this: try c.decode(RankActivity.self, forKey: .this), answered: try c.decode([RankActivity].self, forKey: .answered),
                  silent: try c.decode([Int].self, forKey: .silent), expiredHere: try c.decode(Bool.self, forKey: .expiredHere))
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(timeoutSeconds, forKey: .timeoutSeconds)
        try c.encode(graceSeconds, forKey: .graceSeconds)
        try c.encode(worldSize, forKey: .worldSize)
        try c.encode(this, forKey: .this)
        try c.encode(answered, forKey: .answered)
        try c.encode(silent, forKey: .silent)
        try c.encode(expiredHere, forKey: .expiredHere)
        try c.encode(verdict, forKey: .verdict)
    }

    /// The stuck ranks, and where the others wait: the ranks that did not answer first, then the ranks
    /// grouped by the collective they wait in, the furthest first.
    public var verdict: String {
        var parts: [String] = []
        let furthest = answered.map(\.sequence).max() ?? this.sequence
        if !silent.isEmpty {
            let word = silent.count == 1 ? "it" : "they"
            parts.append(String(format: "%@ did not answer within %g s: stalled, dead, or working outside any collective (%@ never reached collective #%d)",
                                ranks(silent).capitalizedFirst, graceSeconds, word, furthest + 1))
        }
        let groups = Dictionary(grouping: answered) { $0.sequence }.sorted { $0.key > $1.key }
        for (_, group) in groups {
            parts.append("\(ranks(group.map(\.rank))) waited in \(group[0].waitDescription)")
        }
        if silent.isEmpty && groups.count == 1 {
            parts.append("every rank is in this collective, so MPI or the network itself is stuck")
        } else if groups.count > 1 {
            parts.append("the ranks are in different collectives: they called them in different orders")
        }
        return parts.joined(separator: "; ")
    }

    private func ranks(_ list: [Int]) -> String {
        list.count == 1 ? "rank \(list[0])" : "ranks " + list.map(String.init).joined(separator: ", ")
    }

    /// The line every rank that answered prints on stderr.
    public var summary: String {
        let cause = expiredHere ? String(format: "waited %.1f s (the deadline is %g s)", this.waitedSeconds, timeoutSeconds)
                                : String(format: "another rank timed out after %g s while this one waited %.1f s", timeoutSeconds, this.waitedSeconds)
        return "collective timeout on rank \(this.rank) of \(worldSize) (\(this.host), pid \(this.pid)): \(cause) in \(this.waitDescription). \(verdict)."
    }

    public var description: String { summary }
}
