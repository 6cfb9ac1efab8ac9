// The communicator every rank talks through: MPI when launched by mpirun, a single-process stand-in
// otherwise, behind one interface so that `convirt` runs the same code with and without mpirun.

import CMPI
import ConvirtCore
import Foundation

public protocol Communicator: AnyObject {
    var rank: Int { get }
    var size: Int { get }
    /// In-place sum over all ranks.
    func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws
    func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Double>) throws
    /// output [size * input.count] = the inputs of every rank, in rank order.
    func allGather(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws
    /// output [input.count / size] = this rank's block of the sum over ranks of input.
    func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws
    /// Sums `input` over ranks and leaves block r (of `counts[r]` floats, in rank order) on rank r in `output`.
    func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws
    /// In place: block r of `buffer` (of `counts[r]` floats, in rank order) comes from rank r, on every rank.
    func allGatherInPlace(_ buffer: UnsafeMutableBufferPointer<Float>, counts: [Int]) throws
    /// Every rank's `input` bytes (all the same length), concatenated in rank order, on rank `root`
    /// (an empty array elsewhere).
    func gather(_ input: [UInt8], root: Int) throws -> [UInt8]
    /// Rank `root`'s bytes, on every rank.
    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws
    func barrier() throws
    /// Point to point (blocking): `bytes` to rank `destination`, received by `receive` on that rank,
    /// in pieces of at most 1 GiB (MPI counts are 32-bit).
    func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws
    func receive(into bytes: UnsafeMutableRawBufferPointer, from source: Int) throws
    /// Ends every rank of the job (a fatal error on one rank must not leave the others waiting).
    func abort(code: Int32) -> Never
    /// Starts an in-place sum over ranks that completes later (`test` / `waitAll`); returns a handle.
    func startAllReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws -> Int
    /// Starts `reduceScatterSum(_:counts:into:)`, completing later (`test` / `waitAll`); `input` and
    /// `output` must stay untouched until then.
    func startReduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws -> Int
    /// Lets started operations progress; returns true when all of them have completed.
    func test() throws -> Bool
    /// Waits for every started operation.
    func waitAll() throws
    /// The deadline of this rank's collectives and what the rank is doing (see Watchdog.swift). Only
    /// MPI's collectives can hang, but every communicator carries one, so that callers set it alike.
    var watchdog: CollectiveWatchdog { get }
    /// Collective: a buffer of `floats` zero floats per rank that every rank of its machine maps
    /// (`SharedRegion`), with the memory of the ranges `committing` reserved up front; nil where no
    /// machine runs several ranks, or machines run different numbers of them. Throws, on every rank
    /// alike, where the memory cannot be had (naming what the buffer is `for`).
    func mapShared(floats: Int, committing: [Range<Int>], for purpose: SharedBuffer) throws -> SharedRegion?
}

/// What a shared buffer holds (for messages, and for the fault injection of the tests).
public enum SharedBuffer: String, Sendable {
    case gradients, parameters
}

extension Communicator {
    public var isRoot: Bool { rank == 0 }
    public func mapShared(floats: Int, committing: [Range<Int>], for purpose: SharedBuffer) throws -> SharedRegion? { nil }
}

/// One process: collectives are identities.
public final class SingleProcessCommunicator: Communicator {
    public init() {}
    public let watchdog = CollectiveWatchdog()
    public var rank: Int { 0 }
    public var size: Int { 1 }
    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws {}
    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Double>) throws {}
    public func allGather(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(output.count >= input.count, "all-gather output too small")
        if input.count > 0 { output.baseAddress!.update(from: input.baseAddress!, count: input.count) }
    }
    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(output.count >= input.count, "reduce-scatter output too small")
        if input.count > 0 { output.baseAddress!.update(from: input.baseAddress!, count: input.count) }
    }
    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws {
        if counts[0] > 0 { output.baseAddress!.update(from: input.baseAddress!, count: counts[0]) }
    }
    public func allGatherInPlace(_ buffer: UnsafeMutableBufferPointer<Float>, counts: [Int]) throws {}
    public func gather(_ input: [UInt8], root: Int) throws -> [UInt8] { input }
    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {}
    public func barrier() throws {}
    public func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws {
        throw ConvirtError("a single process has no rank \(destination) to send to")
    }
    public func receive(into bytes: UnsafeMutableRawBufferPointer, from source: Int) throws {
        throw ConvirtError("a single process has no rank \(source) to receive from")
    }
    public func abort(code: Int32) -> Never { exit(code) }
    public func startAllReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws -> Int { 0 }
    public func startReduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws -> Int {
        try reduceScatterSum(input, counts: counts, into: output)
        return 0
    }
    public func test() throws -> Bool { true }
    public func waitAll() throws {}
}

/// MPI_COMM_WORLD. Errors are returned (MPI_ERRORS_RETURN) and become `ConvirtError`s with MPI's text.
/// Every collective and point-to-point call is started non-blocking and waited for under the watchdog
/// (`wait`): past its deadline the ranks exchange what they were doing and `CollectiveTimeout` is thrown.
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int
    /// The thread support level MPI granted.
    public let threadLevel: Int32
    public let watchdog = CollectiveWatchdog()
    private var finalized = false
    /// The watchdog's own communicator (a duplicate of the world), so that its messages never match a
    /// collective's or a checkpoint's.
    private var watchdogComm = cmpi_comm_null()
    /// The request of the collective being waited for (one, reused: no allocation per collective).
    private var current: [MPI_Request?] = [cmpi_request_null()]
    private var host = ""

    /// True when this process was started by mpirun / a PMI launcher (so MPI_Init will find its job).
    public static var launchedByMPI: Bool { EnvironmentSwitches.process.launchedByMPI }

    public static var libraryVersion: String {
        var buffer = [CChar](repeating: 0, count: 512)
        return String(cString: cmpi_library_version(&buffer, Int32(buffer.count)))
    }

    /// Open MPI's non-blocking all-reduce (libnbc, which every all-reduce here runs on) takes a binomial
    /// tree for in-place buffers unless told otherwise: on 2 ranks one rank sends the whole buffer and
    /// gets it back. Reduce-scatter then all-gather (Rabenseifner; a ring where the buffer has fewer
    /// elements than ranks) moves half: 34 MB in 14 ms against 35 ms on a 2-core AMD EPYC, as fast as
    /// the blocking MPI_Allreduce (15 ms). Read at MPI_Init from the environment; a value set there is kept.
    static let allReduceAlgorithm = (name: "OMPI_MCA_coll_libnbc_iallreduce_algorithm", value: "3")

    public init() throws {
        var provided: Int32 = 0
        setenv(Self.allReduceAlgorithm.name, Self.allReduceAlgorithm.value, 0)
        let code = MPI_Init_thread(nil, nil, cmpi_thread_funneled(), &provided)
        guard code == cmpi_success() else { throw MPICommunicator.error(code, "MPI_Init_thread") }
        threadLevel = provided
        MPI_Comm_set_errhandler(cmpi_comm_world(), cmpi_errors_return())
        var r: Int32 = 0, s: Int32 = 0
        MPI_Comm_rank(cmpi_comm_world(), &r)
        MPI_Comm_size(cmpi_comm_world(), &s)
        rank = Int(r)
        size = Int(s)
        try check(MPI_Comm_dup(cmpi_comm_world(), &watchdogComm), "MPI_Comm_dup")
        MPI_Comm_set_errhandler(watchdogComm, cmpi_errors_return())
        var name = [CChar](repeating: 0, count: 256)
        gethostname(&name, 255)
        host = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    deinit { finalize() }

    public func finalize() {
        if finalized { return }
        finalized = true
        MPI_Finalize()
    }

    /// Ends every rank of the job (used when one rank hits a fatal error, so that no rank hangs).
    public func abort(code: Int32) -> Never {
        MPI_Abort(cmpi_comm_world(), code)
        exit(code)
    }

    static func error(_ code: Int32, _ call: String) -> ConvirtError {
        var buffer = [CChar](repeating: 0, count: 512)
        return ConvirtError("MPI error in \(call): \(String(cString: cmpi_error_string(code, &buffer, Int32(buffer.count))))")
    }

    private func check(_ code: Int32, _ call: String) throws {
        if code != cmpi_success() { throw MPICommunicator.error(code, call) }
    }

    // MARK: waiting under the watchdog

    /// Starts one non-blocking call (`start` receives the request to fill) and waits for it.
    private func run(_ call: String, bytes: Int, collective: Bool = true, _ start: (UnsafeMutablePointer<MPI_Request?>) -> Int32) throws {
        current[0] = cmpi_request_null()
        try check(current.withUnsafeMutableBufferPointer { start($0.baseAddress!) }, call)
        try wait(call, bytes: bytes, requests: &current, collective: collective)
    }

    /// Tests `requests` until all complete. Every 50 ms it checks the deadline and whether another rank
    /// reported a timeout; either ends the wait with `CollectiveTimeout`, after the exchange (`expire`).
    /// Past `spinSeconds` it yields its core between tests: where ranks share cores with each other and
    /// with their loaders (several ranks on one machine), the work being waited for runs instead of the
    /// wait; on a core of its own the yield returns at once.
    private func wait(_ call: String, bytes: Int, requests: inout [MPI_Request?], collective: Bool) throws {
        var done: Int32 = 0
        try test(&requests, &done, call)
        if done == 0 {
            let start = Self.now()
            var nextCheck = start + 0.05
            while done == 0 {
                try test(&requests, &done, call)
                if done != 0 { break }
                let now = Self.now()
                if now - start > Self.spinSeconds { sched_yield() }
                guard now >= nextCheck else { continue }
                nextCheck = now + 0.05
                let late = watchdog.timeout.map { now - start > $0 } ?? false
                if late || noticeArrived() {
                    throw expire(call, bytes: bytes, waited: now - start, expiredHere: late)
                }
            }
        }
        if collective { watchdog.completed += 1 }
    }

    /// MPI_Test for one request (its error is the call's own), MPI_Testall for several.
    private func test(_ requests: inout [MPI_Request?], _ done: inout Int32, _ call: String) throws {
        if requests.count == 1 {
            try check(MPI_Test(&requests[0], &done, cmpi_status_ignore()), call)
        } else {
            try check(MPI_Testall(Int32(requests.count), &requests, &done, cmpi_statuses_ignore()), call)
        }
    }

    /// How long a wait tests without yielding: long enough for a collective among running ranks.
    static let spinSeconds = 50e-6

    static func now() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
    }

    private static let activityTag: Int32 = 1, doneTag: Int32 = 2

    private func noticeArrived() -> Bool {
        var flag: Int32 = 0
        MPI_Iprobe(cmpi_any_source(), Self.activityTag, watchdogComm, &flag, cmpi_status_ignore())
        return flag != 0
    }

    /// The exchange after a timeout: this rank's activity to every other rank, theirs back for the grace
    /// period, the report written (run directory and stderr), then one more meeting of the ranks that
    /// answered so that none ends the job before the others have written theirs.
    private func expire(_ call: String, bytes: Int, waited: Double, expiredHere: Bool) -> CollectiveTimeout {
        let mine = RankActivity(rank: rank, host: host, pid: Int(getpid()), step: watchdog.step, phase: watchdog.phase, collective: call,
                                bytes: bytes, waitedSeconds: waited, sequence: watchdog.completed)
        let record = RankActivity.recordBytes
        // Buffers of non-blocking calls must outlive the calls: allocated, and freed only if they completed.
        let outbox = UnsafeMutableRawPointer.allocate(byteCount: record, alignment: 16)
        let inbox = UnsafeMutableRawPointer.allocate(byteCount: record * size, alignment: 16)
        mine.record().withUnsafeBytes { outbox.copyMemory(from: $0.baseAddress!, byteCount: record) }
        inbox.initializeMemory(as: UInt8.self, repeating: 0, count: record * size)
        var receives = [MPI_Request?](repeating: cmpi_request_null(), count: size)
        var sends = [MPI_Request?](repeating: cmpi_request_null(), count: size)
        for peer in 0..<size where peer != rank {
            MPI_Irecv(inbox + peer * record, Int32(record), cmpi_byte(), Int32(peer), Self.activityTag, watchdogComm, &receives[peer])
            MPI_Isend(outbox, Int32(record), cmpi_byte(), Int32(peer), Self.activityTag, watchdogComm, &sends[peer])
        }
        var answered = Set([rank])
        let deadline = Self.now() + watchdog.grace
        while answered.count < size && Self.now() < deadline {
            for peer in 0..<size where !answered.contains(peer) {
                var flag: Int32 = 0
                MPI_Test(&receives[peer], &flag, cmpi_status_ignore())
                if flag != 0 { answered.insert(peer) }
            }
            usleep(1000)
        }
        var activities = [mine]
        for peer in answered.sorted() where peer != rank {
            if let activity = RankActivity(record: UnsafeRawBufferPointer(start: inbox + peer * record, count: record)) { activities.append(activity) }
        }
        let timeout = CollectiveTimeout(timeoutSeconds: watchdog.timeout ?? 0, graceSeconds: watchdog.grace, worldSize: size, this: mine, answered: activities,
                                        silent: (0..<size).filter { !answered.contains($0) }, expiredHere: expiredHere)
        var where_ = ""
        if let directory = watchdog.reportDirectory {
            let path = "\(directory)/\(CollectiveWatchdog.reportFile(rank: rank))"
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            if let data = try? encoder.encode(timeout), FileManager.default.createFile(atPath: path, contents: data + Data("\n".utf8)) {
                where_ = " Report: \(path)"
            }
        }
        FileHandle.standardError.write(Data("convirt: \(timeout.summary)\(where_)\n".utf8))
        // The meeting: a word to every rank that answered, and theirs, for at most another grace period.
        var doneSends = [MPI_Request?](repeating: cmpi_request_null(), count: size)
        var doneReceives = [MPI_Request?](repeating: cmpi_request_null(), count: size)
        for peer in answered where peer != rank {
            MPI_Irecv(nil, 0, cmpi_byte(), Int32(peer), Self.doneTag, watchdogComm, &doneReceives[peer])
            MPI_Isend(nil, 0, cmpi_byte(), Int32(peer), Self.doneTag, watchdogComm, &doneSends[peer])
        }
        let meeting = Self.now() + watchdog.grace
        var met: Int32 = 0
        while met == 0 && Self.now() < meeting {
            MPI_Testall(Int32(size), &doneReceives, &met, cmpi_statuses_ignore())
            if met == 0 { usleep(1000) }
        }
        // The job ends next (MPI_Abort); sends to a silent rank may never complete, so nothing is freed.
        return timeout
    }

    // MARK: collectives

    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws {
        try run("MPI_Allreduce", bytes: buffer.count * 4) {
            MPI_Iallreduce(cmpi_in_place(), buffer.baseAddress, Int32(buffer.count), cmpi_float(), cmpi_op_sum(), cmpi_comm_world(), $0)
        }
    }

    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Double>) throws {
        try run("MPI_Allreduce", bytes: buffer.count * 8) {
            MPI_Iallreduce(cmpi_in_place(), buffer.baseAddress, Int32(buffer.count), cmpi_double(), cmpi_op_sum(), cmpi_comm_world(), $0)
        }
    }

    public func allGather(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(output.count >= input.count * size, "all-gather output too small")
        try run("MPI_Allgather", bytes: input.count * 4) {
            MPI_Iallgather(input.baseAddress, Int32(input.count), cmpi_float(), output.baseAddress, Int32(input.count), cmpi_float(),
                           cmpi_comm_world(), $0)
        }
    }

    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        let block = input.count / size
        precondition(block * size == input.count && output.count >= block, "reduce-scatter sizes do not divide by the world size")
        try run("MPI_Reduce_scatter_block", bytes: input.count * 4) {
            MPI_Ireduce_scatter_block(input.baseAddress, output.baseAddress, Int32(block), cmpi_float(), cmpi_op_sum(), cmpi_comm_world(), $0)
        }
    }

    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(counts.count == size && output.count >= counts[rank], "reduce-scatter counts")
        // The counts stay valid until the call completes (inside this closure).
        try counts.map { Int32($0) }.withUnsafeBufferPointer { c in
            try run("MPI_Reduce_scatter", bytes: input.count * 4) {
                MPI_Ireduce_scatter(input.baseAddress, output.baseAddress, c.baseAddress, cmpi_float(), cmpi_op_sum(), cmpi_comm_world(), $0)
            }
        }
    }

    public func allGatherInPlace(_ buffer: UnsafeMutableBufferPointer<Float>, counts: [Int]) throws {
        precondition(counts.count == size && counts.reduce(0, +) <= buffer.count, "all-gather counts")
        var displacements = [Int32](repeating: 0, count: size)
        for r in 1..<max(size, 1) where r < size { displacements[r] = displacements[r - 1] + Int32(counts[r - 1]) }
        try counts.map { Int32($0) }.withUnsafeBufferPointer { c in
            try displacements.withUnsafeBufferPointer { d in
                try run("MPI_Allgatherv", bytes: counts[rank] * 4) {
                    MPI_Iallgatherv(cmpi_in_place(), 0, cmpi_float(), buffer.baseAddress, c.baseAddress, d.baseAddress, cmpi_float(),
                                    cmpi_comm_world(), $0)
                }
            }
        }
    }

    public func gather(_ input: [UInt8], root: Int) throws -> [UInt8] {
        var output = [UInt8](repeating: 0, count: rank == root ? input.count * size : 0)
        try input.withUnsafeBufferPointer { src in
            try output.withUnsafeMutableBufferPointer { dst in
                try run("MPI_Gather", bytes: src.count) {
                    MPI_Igather(src.baseAddress, Int32(src.count), cmpi_byte(), dst.baseAddress, Int32(src.count), cmpi_byte(), Int32(root),
                                cmpi_comm_world(), $0)
                }
            }
        }
        return output
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        try run("MPI_Bcast", bytes: buffer.count) {
            MPI_Ibcast(buffer.baseAddress, Int32(buffer.count), cmpi_byte(), Int32(root), cmpi_comm_world(), $0)
        }
    }

    /// How the job's ranks sit on its machines (MPI's shared-memory split of the world): this rank's
    /// place among the ranks of its machine, their world ranks in that order, and the number of machines
    /// where every machine runs the same number of ranks (nil otherwise).
    public func machineLayout() throws -> (localRank: Int, peers: [Int], machines: Int?) {
        var node = cmpi_comm_null()
        try check(MPI_Comm_split_type(cmpi_comm_world(), cmpi_comm_type_shared(), Int32(rank), cmpi_info_null(), &node), "MPI_Comm_split_type")
        defer { MPI_Comm_free(&node) }
        var local: Int32 = 0, localSize: Int32 = 0
        MPI_Comm_rank(node, &local)
        MPI_Comm_size(node, &localSize)
        var mine = Int32(rank), peers = [Int32](repeating: 0, count: Int(localSize))
        try check(MPI_Allgather(&mine, 1, cmpi_int32(), &peers, 1, cmpi_int32(), node), "MPI_Allgather")
        var sizes = [Double](repeating: 0, count: size)
        sizes[rank] = Double(localSize)
        try sizes.withUnsafeMutableBufferPointer { try allReduceSum($0) }
        let uniform = sizes.allSatisfy { $0 == Double(localSize) }
        return (Int(local), peers.map(Int.init), uniform ? size / Int(localSize) : nil)
    }

    /// The ranks of each place on their machines, one communicator per place (for `SharedRegion.crossMachineSum`).
    private var crossMachine = cmpi_comm_null()

    /// One POSIX shared-memory object per rank in /dev/shm, named after a token rank 0 draws: each rank
    /// creates its own (reserving `committing` with posix_fallocate, so that a full /dev/shm is an error
    /// here and never a SIGBUS later), maps those of its machine's other ranks once all exist, and
    /// unlinks its own once they have mapped it: nothing is left in /dev/shm, and the memory goes when
    /// the last rank unmaps it. nil on one rank, with one rank a machine, and where machines run
    /// different numbers of ranks.
    public func mapShared(floats count: Int, committing: [Range<Int>], for purpose: SharedBuffer) throws -> SharedRegion? {
        guard size > 1 else { return nil }
        let layout = try machineLayout()
        guard let machines = layout.machines, layout.peers.count > 1 else { return nil }
        if machines > 1 && crossMachine == cmpi_comm_null() {
            try check(MPI_Comm_split(cmpi_comm_world(), Int32(layout.localRank), Int32(rank), &crossMachine), "MPI_Comm_split")
            MPI_Comm_set_errhandler(crossMachine, cmpi_errors_return())
        }
        var token = [UInt8](repeating: 0, count: 64)
        if rank == 0 {
            let text = Array(String(format: "/convirt-%d-%016llx", getpid(), UInt64.random(in: 0...UInt64.max)).utf8)
            token.replaceSubrange(0..<text.count, with: text)
        }
        try token.withUnsafeMutableBytes { try broadcast($0, root: 0) }
        let prefix = String(decoding: token.prefix { $0 != 0 }, as: UTF8.self)
        func name(_ r: Int) -> String { "\(prefix)-\(r)" }
        let bytes = max(1, count) * 4
        var mapped: [Int: UnsafeMutableRawPointer] = [:]
        var created = false
        func unmapAll() { for (_, p) in mapped { munmap(p, bytes) }; mapped = [:] }
        func system(_ call: String) -> String { "\(call): \(String(cString: strerror(errno)))" }
        /// Every rank learns whether any failed, and the first failed rank's reason.
        func agree(_ failure: String?, _ what: String) throws {
            var flags = [Double](repeating: 0, count: size)
            flags[rank] = failure == nil ? 0 : 1
            try flags.withUnsafeMutableBufferPointer { try allReduceSum($0) }
            guard let first = flags.firstIndex(where: { $0 != 0 }) else { return }
            var reason = [UInt8](repeating: 0, count: 512)
            if rank == first { reason.replaceSubrange(0..<min(511, failure!.utf8.count), with: failure!.utf8.prefix(511)) }
            try reason.withUnsafeMutableBytes { try broadcast($0, root: first) }
            unmapAll()
            if created { shm_unlink(name(rank)) }
            throw ConvirtError("shared memory for the \(purpose.rawValue) (\(what)), rank \(first): " + String(decoding: reason.prefix { $0 != 0 }, as: UTF8.self))
        }
        var failure: String? = nil
        let fd = shm_open(name(rank), O_CREAT | O_EXCL | O_RDWR, 0o600)
        if fd < 0 {
            failure = system("shm_open \(name(rank))")
        } else {
            created = true
            if ftruncate(fd, off_t(bytes)) != 0 { failure = system("ftruncate \(name(rank)) to \(bytes) bytes") }
            for range in committing where failure == nil && !range.isEmpty {
                let fault = EnvironmentSwitches.process.sharedMemoryFull  // fault injection, for the tests
                let code = fault?.rank == rank && (fault?.parameters ?? false) == (purpose == .parameters) ? ENOSPC
                    : posix_fallocate(fd, off_t(range.lowerBound * 4), off_t(range.count * 4))
                if code != 0 {
                    failure = "posix_fallocate of \(range.count * 4) bytes in \(name(rank)): \(String(cString: strerror(code)))"
                        + (code == ENOSPC ? " (/dev/shm is full or too small: --gradient-exchange collectives does without it)" : "")
                }
            }
            if failure == nil {
                let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                if let p, p != MAP_FAILED { mapped[rank] = p } else { failure = system("mmap \(name(rank))") }
            }
            close(fd)
        }
        try agree(failure, "creating this rank's buffer")
        for r in layout.peers where r != rank && failure == nil {
            let peer = shm_open(name(r), O_RDWR, 0)
            if peer < 0 { failure = system("shm_open \(name(r))"); break }
            let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, peer, 0)
            close(peer)
            if let p, p != MAP_FAILED { mapped[r] = p } else { failure = system("mmap \(name(r))") }
        }
        try agree(failure, "mapping the other ranks' buffers")
        shm_unlink(name(rank))
        let buffers = layout.peers.map { mapped[$0]!.bindMemory(to: Float.self, capacity: max(1, count)) }
        let all = mapped, cross = crossMachine
        let across: (([UnsafeMutableBufferPointer<Float>]) throws -> Void)? = machines == 1 ? nil : { [unowned self] pieces in
            for piece in pieces {
                // MPI counts are 32-bit: pieces of at most 2^30 floats, as point-to-point's of bytes.
                for start in stride(from: 0, to: piece.count, by: Self.pointToPointPiece) {
                    let n = min(Self.pointToPointPiece, piece.count - start), p = piece.baseAddress! + start
                    try run("MPI_Allreduce", bytes: n * 4) { MPI_Iallreduce(cmpi_in_place(), p, Int32(n), cmpi_float(), cmpi_op_sum(), cross, $0) }
                }
            }
        }
        return SharedRegion(buffers: buffers, localRank: layout.localRank, machines: machines, location: "/dev/shm",
                            crossMachineSum: across) {
            for (_, p) in all { munmap(p, bytes) }
        }
    }

    public func barrier() throws {
        try run("MPI_Barrier", bytes: 0) { MPI_Ibarrier(cmpi_comm_world(), $0) }
    }

    static let pointToPointPiece = 1 << 30

    public func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws {
        var offset = 0
        repeat {
            let n = min(MPICommunicator.pointToPointPiece, bytes.count - offset)
            try run("MPI_Send to rank \(destination)", bytes: n, collective: false) {
                MPI_Isend(bytes.baseAddress.map { $0 + offset }, Int32(n), cmpi_byte(), Int32(destination), 7, cmpi_comm_world(), $0)
            }
            offset += n
        } while offset < bytes.count
    }

    public func receive(into bytes: UnsafeMutableRawBufferPointer, from source: Int) throws {
        var offset = 0
        repeat {
            let n = min(MPICommunicator.pointToPointPiece, bytes.count - offset)
            try run("MPI_Recv from rank \(source)", bytes: n, collective: false) {
                MPI_Irecv(bytes.baseAddress.map { $0 + offset }, Int32(n), cmpi_byte(), Int32(source), 7, cmpi_comm_world(), $0)
            }
            offset += n
        } while offset < bytes.count
    }

    private var requests: [MPI_Request?] = []
    private var requestBytes = 0
    /// The counts arrays of started reduce-scatters, which must live until they complete.
    private var requestCounts: [UnsafeMutablePointer<Int32>] = []

    public func startAllReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws -> Int {
        var request: MPI_Request? = cmpi_request_null()
        try check(MPI_Iallreduce(cmpi_in_place(), buffer.baseAddress, Int32(buffer.count), cmpi_float(), cmpi_op_sum(), cmpi_comm_world(),
                                 &request), "MPI_Iallreduce")
        requests.append(request)
        requestBytes += buffer.count * 4
        return requests.count - 1
    }

    public func startReduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws -> Int {
        precondition(counts.count == size && output.count >= counts[rank], "reduce-scatter counts")
        let c = UnsafeMutablePointer<Int32>.allocate(capacity: size)
        for r in 0..<size { c[r] = Int32(counts[r]) }
        requestCounts.append(c)
        var request: MPI_Request? = cmpi_request_null()
        try check(MPI_Ireduce_scatter(input.baseAddress, output.baseAddress, c, cmpi_float(), cmpi_op_sum(), cmpi_comm_world(), &request),
                  "MPI_Ireduce_scatter")
        requests.append(request)
        requestBytes += input.count * 4
        return requests.count - 1
    }

    public func test() throws -> Bool {
        if requests.isEmpty { return true }
        var done: Int32 = 0
        try check(MPI_Testall(Int32(requests.count), &requests, &done, cmpi_statuses_ignore()), "MPI_Testall")
        return done != 0
    }

    /// Waits for every started all-reduce (one collective for the watchdog's count: the gradient buckets).
    public func waitAll() throws {
        if requests.isEmpty { return }
        try wait("gradient buckets x\(requests.count)", bytes: requestBytes, requests: &requests, collective: true)
        requests.removeAll(keepingCapacity: true)
        requestBytes = 0
        for c in requestCounts { c.deallocate() }
        requestCounts.removeAll(keepingCapacity: true)
    }
}

/// The communicator for this process: MPI under mpirun, a single process otherwise.
public func makeCommunicator() throws -> Communicator {
    MPICommunicator.launchedByMPI ? try MPICommunicator() : SingleProcessCommunicator()
}
