// W ranks as threads of one process, for tests: world-size invariance, SyncBN, gradient buckets, ZeRO-1
// and the distributed loss run without mpirun. Every collective is a rendezvous: each rank publishes a
// pointer to its input, all meet at a barrier, each computes its own result from every rank's input
// (sums in rank order, so the results are deterministic and the same on every rank), and all meet
// again before any input may change. A non-blocking all-reduce completes when it is started, which
// MPI allows; the point-to-point calls go through mailboxes.

import ConvirtCore
import Foundation

/// The shared state of one in-process world.
public final class InProcessGroup: @unchecked Sendable {
    public let size: Int
    private let condition = NSCondition()
    private var arrived = 0
    private var generation = 0
    private var failed: String? = nil
    private var slots: [UnsafeRawPointer?]
    private var slotCounts: [Int]
    private var mailboxes: [Int: [[UInt8]]] = [:]
    /// The ranks' shared buffers (`mapShared`), freed with the group: a rank may still read another's
    /// after that one has returned (ZeRO-1's parameter copy meets no rank after it).
    private var sharedBuffers: [(UnsafeMutableRawPointer, Int)] = []

    public init(size: Int) {
        precondition(size >= 1, "an in-process world needs at least one rank")
        self.size = size
        slots = Array(repeating: nil, count: size)
        slotCounts = Array(repeating: 0, count: size)
    }

    /// Runs `body` on `size` threads, one communicator each, and returns their results in rank order.
    /// When a rank throws, the others are released from whatever collective they wait in (they throw
    /// too) and the first rank's error is rethrown.
    public static func run<T: Sendable>(size: Int, stackBytes: Int = 64 << 20,
                                        _ body: @escaping @Sendable (InProcessCommunicator) throws -> T) throws -> [T] {
        let group = InProcessGroup(size: size)
        let results = ResultSlots<T>(size)
        let done = DispatchGroup()
        for rank in 0..<size {
            done.enter()
            let thread = Thread {
                defer { done.leave() }
                do {
                    results.set(rank, .success(try body(InProcessCommunicator(group: group, rank: rank))))
                } catch {
                    results.set(rank, .failure(error))
                    group.fail("rank \(rank) failed: \(error)")
                }
            }
            thread.stackSize = stackBytes
            thread.start()
        }
        done.wait()
        let all = results.values()
        // The first rank that failed on its own account (the others fail because it did).
        if let own = all.first(where: { if case .failure(let e) = $0, !(e is InProcessGroup.PeerFailure) { return true }; return false }),
           case .failure(let error) = own { throw error }
        return try all.map { try $0.get() }
    }

    /// The error of ranks released from a collective because another rank failed.
    public struct PeerFailure: Error, CustomStringConvertible {
        public let description: String
    }

    deinit { for (p, bytes) in sharedBuffers { munmap(p, bytes) } }

    /// `bytes` zero bytes in anonymous pages (untouched pages take no memory), kept until the group ends.
    func sharedBuffer(bytes: Int) -> UnsafeMutableRawPointer? {
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else { return nil }
        condition.lock()
        sharedBuffers.append((p, bytes))
        condition.unlock()
        return p
    }

    func fail(_ reason: String) {
        condition.lock()
        if failed == nil { failed = reason }
        condition.broadcast()
        condition.unlock()
    }

    func barrier() throws {
        condition.lock()
        defer { condition.unlock() }
        let mine = generation
        arrived += 1
        if arrived == size {
            arrived = 0
            generation += 1
            condition.broadcast()
        } else {
            while generation == mine && failed == nil { condition.wait() }
        }
        if let failed, generation == mine { throw PeerFailure(description: failed) }
    }

    /// Publishes this rank's input, waits for every rank, runs `body` over all inputs (in rank order),
    /// and waits again so that no input changes while another rank still reads it.
    func exchange<R>(rank: Int, _ input: UnsafeRawPointer?, count: Int, _ body: ([UnsafeRawPointer?], [Int]) -> R) throws -> R {
        condition.lock()
        slots[rank] = input
        slotCounts[rank] = count
        condition.unlock()
        try barrier()
        condition.lock()
        let pointers = slots, counts = slotCounts
        condition.unlock()
        let result = body(pointers, counts)
        try barrier()
        return result
    }

    func post(_ bytes: [UInt8], from source: Int, to destination: Int) {
        condition.lock()
        mailboxes[source * size + destination, default: []].append(bytes)
        condition.broadcast()
        condition.unlock()
    }

    func take(from source: Int, to destination: Int) throws -> [UInt8] {
        condition.lock()
        defer { condition.unlock() }
        let key = source * size + destination
        while (mailboxes[key] ?? []).isEmpty {
            if let failed { throw PeerFailure(description: failed) }
            condition.wait()
        }
        return mailboxes[key]!.removeFirst()
    }
}

/// Results of the rank threads, written once each under a lock.
private final class ResultSlots<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Result<T, Error>?]
    init(_ size: Int) { slots = Array(repeating: nil, count: size) }
    func set(_ rank: Int, _ value: Result<T, Error>) { lock.lock(); slots[rank] = value; lock.unlock() }
    func values() -> [Result<T, Error>] {
        lock.lock(); defer { lock.unlock() }
        return slots.map { $0 ?? .failure(ConvirtError("rank thread ended without a result")) }
    }
}

/// One rank of an `InProcessGroup`.
public final class InProcessCommunicator: Communicator {
    public let group: InProcessGroup
    public let rank: Int
    public var size: Int { group.size }
    public let watchdog = CollectiveWatchdog()

    init(group: InProcessGroup, rank: Int) {
        self.group = group
        self.rank = rank
    }

    private func sum<T: FloatingPoint>(_ buffer: UnsafeMutableBufferPointer<T>) throws {
        let n = buffer.count
        let total: [T] = try group.exchange(rank: rank, buffer.baseAddress.map { UnsafeRawPointer($0) }, count: n) { pointers, counts in
            var out = [T](repeating: 0, count: n)
            for r in 0..<pointers.count {
                precondition(counts[r] == n, "all-reduce of \(n) items on rank \(rank), \(counts[r]) on rank \(r)")
                guard n > 0 else { continue }
                let p = pointers[r]!.assumingMemoryBound(to: T.self)
                for i in 0..<n { out[i] += p[i] }
            }
            return out
        }
        if n > 0 { buffer.baseAddress!.update(from: total, count: n) }
    }

    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws { try sum(buffer) }
    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Double>) throws { try sum(buffer) }

    public func allGather(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        let n = input.count
        precondition(output.count >= n * size, "all-gather output too small")
        let all: [Float] = try group.exchange(rank: rank, input.baseAddress.map { UnsafeRawPointer($0) }, count: n) { pointers, counts in
            var out = [Float](repeating: 0, count: n * pointers.count)
            for r in 0..<pointers.count where n > 0 {
                precondition(counts[r] == n, "all-gather sizes differ over ranks")
                out.withUnsafeMutableBufferPointer { ($0.baseAddress! + r * n).update(from: pointers[r]!.assumingMemoryBound(to: Float.self), count: n) }
            }
            return out
        }
        if !all.isEmpty { output.baseAddress!.update(from: all, count: all.count) }
    }

    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        let block = input.count / size
        precondition(block * size == input.count && output.count >= block, "reduce-scatter sizes do not divide by the world size")
        try reduceScatterSum(input, counts: Array(repeating: block, count: size), into: output)
    }

    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(counts.count == size && output.count >= counts[rank], "reduce-scatter counts")
        let start = counts[..<rank].reduce(0, +), n = counts[rank]
        let mine: [Float] = try group.exchange(rank: rank, input.baseAddress.map { UnsafeRawPointer($0) }, count: input.count) { pointers, _ in
            var out = [Float](repeating: 0, count: n)
            for r in 0..<pointers.count where n > 0 {
                let p = pointers[r]!.assumingMemoryBound(to: Float.self) + start
                for i in 0..<n { out[i] += p[i] }
            }
            return out
        }
        if n > 0 { output.baseAddress!.update(from: mine, count: n) }
    }

    public func allGatherInPlace(_ buffer: UnsafeMutableBufferPointer<Float>, counts: [Int]) throws {
        precondition(counts.count == size && counts.reduce(0, +) <= buffer.count, "all-gather counts")
        let all: [Float] = try group.exchange(rank: rank, buffer.baseAddress.map { UnsafeRawPointer($0) }, count: buffer.count) { pointers, _ in
            var out = [Float](repeating: 0, count: counts.reduce(0, +))
            var start = 0
            for r in 0..<pointers.count {
                if counts[r] > 0 {
                    let p = pointers[r]!.assumingMemoryBound(to: Float.self) + start
                    out.withUnsafeMutableBufferPointer { ($0.baseAddress! + start).update(from: p, count: counts[r]) }
                }
                start += counts[r]
            }
            return out
        }
        if !all.isEmpty { buffer.baseAddress!.update(from: all, count: all.count) }
    }

    public func gather(_ input: [UInt8], root: Int) throws -> [UInt8] {
        let me = rank
        return try input.withUnsafeBytes { bytes in
            try group.exchange(rank: rank, bytes.baseAddress, count: bytes.count) { pointers, counts in
                guard me == root else { return [] }
                var out: [UInt8] = []
                for r in 0..<pointers.count {
                    precondition(counts[r] == input.count, "gather sizes differ over ranks")
                    if counts[r] > 0 { out.append(contentsOf: UnsafeRawBufferPointer(start: pointers[r], count: counts[r])) }
                }
                return out
            }
        }
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        let n = buffer.count
        let bytes: [UInt8] = try group.exchange(rank: rank, buffer.baseAddress.map { UnsafeRawPointer($0) }, count: n) { pointers, counts in
            precondition(counts[root] == n, "broadcast sizes differ over ranks")
            return n > 0 ? Array(UnsafeRawBufferPointer(start: pointers[root], count: n)) : []
        }
        if n > 0 && rank != root { buffer.copyBytes(from: bytes) }
    }

    public func barrier() throws { try group.barrier() }

    /// The ranks are threads of one process: each allocates its buffer (the group's, freed with it) and
    /// all learn each other's addresses.
    public func mapShared(floats count: Int, committing: [Range<Int>], for purpose: SharedBuffer) throws -> SharedRegion? {
        guard size > 1 else { return nil }
        let bytes = max(1, count) * 4
        guard let mine = group.sharedBuffer(bytes: bytes) else { throw ConvirtError("shared \(purpose.rawValue) buffer: no memory for \(bytes) bytes") }
        let buffers: [UnsafeMutablePointer<Float>] = try group.exchange(rank: rank, UnsafeRawPointer(mine), count: count) { pointers, counts in
            precondition(counts.allSatisfy { $0 == count }, "shared buffers of different sizes over ranks")
            return pointers.map { UnsafeMutableRawPointer(mutating: $0!).bindMemory(to: Float.self, capacity: max(1, count)) }
        }
        return SharedRegion(buffers: buffers, localRank: rank, location: "this process") {}
    }

    public func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws {
        precondition(destination >= 0 && destination < size && destination != rank, "send to rank \(destination)")
        group.post(Array(bytes), from: rank, to: destination)
    }

    public func receive(into bytes: UnsafeMutableRawBufferPointer, from source: Int) throws {
        let message = try group.take(from: source, to: rank)
        guard message.count == bytes.count else {
            throw ConvirtError("rank \(rank) expected \(bytes.count) bytes from rank \(source), got \(message.count)")
        }
        bytes.copyBytes(from: message)
    }

    public func abort(code: Int32) -> Never {
        group.fail("rank \(rank) aborted with code \(code)")
        fatalError("in-process rank \(rank) aborted with code \(code)")
    }

    /// Completes at once (every rank starts the same operations in the same order).
    public func startAllReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws -> Int {
        try allReduceSum(buffer)
        return 0
    }

    public func startReduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws -> Int {
        try reduceScatterSum(input, counts: counts, into: output)
        return 0
    }

    public func test() throws -> Bool { true }
    public func waitAll() throws {}
}
