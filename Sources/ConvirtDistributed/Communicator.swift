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
    /// Lets started operations progress; returns true when all of them have completed.
    func test() throws -> Bool
    /// Waits for every started operation.
    func waitAll() throws
}

extension Communicator {
    public var isRoot: Bool { rank == 0 }
}

/// One process: collectives are identities.
public final class SingleProcessCommunicator: Communicator {
    public init() {}
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
    public func test() throws -> Bool { true }
    public func waitAll() throws {}
}

/// MPI_COMM_WORLD. Errors are returned (MPI_ERRORS_RETURN) and become `ConvirtError`s with MPI's text.
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int
    /// The thread support level MPI granted.
    public let threadLevel: Int32
    private var finalized = false

    /// True when this process was started by mpirun / a PMI launcher (so MPI_Init will find its job).
    public static var launchedByMPI: Bool { EnvironmentSwitches.process.launchedByMPI }

    public static var libraryVersion: String {
        var buffer = [CChar](repeating: 0, count: 512)
        return String(cString: cmpi_library_version(&buffer, Int32(buffer.count)))
    }

    public init() throws {
        var provided: Int32 = 0
        let code = MPI_Init_thread(nil, nil, cmpi_thread_funneled(), &provided)
        guard code == cmpi_success() else { throw MPICommunicator.error(code, "MPI_Init_thread") }
        threadLevel = provided
        MPI_Comm_set_errhandler(cmpi_comm_world(), cmpi_errors_return())
        var r: Int32 = 0, s: Int32 = 0
        MPI_Comm_rank(cmpi_comm_world(), &r)
        MPI_Comm_size(cmpi_comm_world(), &s)
        rank = Int(r)
        size = Int(s)
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

    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws {
        try check(MPI_Allreduce(cmpi_in_place(), buffer.baseAddress, Int32(buffer.count), cmpi_float(), cmpi_op_sum(), cmpi_comm_world()), "MPI_Allreduce")
    }

    public func allReduceSum(_ buffer: UnsafeMutableBufferPointer<Double>) throws {
        try check(MPI_Allreduce(cmpi_in_place(), buffer.baseAddress, Int32(buffer.count), cmpi_double(), cmpi_op_sum(), cmpi_comm_world()), "MPI_Allreduce")
    }

    public func allGather(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(output.count >= input.count * size, "all-gather output too small")
        try check(MPI_Allgather(input.baseAddress, Int32(input.count), cmpi_float(), output.baseAddress, Int32(input.count), cmpi_float(),
                                cmpi_comm_world()), "MPI_Allgather")
    }

    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, into output: UnsafeMutableBufferPointer<Float>) throws {
        let block = input.count / size
        precondition(block * size == input.count && output.count >= block, "reduce-scatter sizes do not divide by the world size")
        try check(MPI_Reduce_scatter_block(input.baseAddress, output.baseAddress, Int32(block), cmpi_float(), cmpi_op_sum(), cmpi_comm_world()),
                  "MPI_Reduce_scatter_block")
    }

    public func reduceScatterSum(_ input: UnsafeBufferPointer<Float>, counts: [Int], into output: UnsafeMutableBufferPointer<Float>) throws {
        precondition(counts.count == size && output.count >= counts[rank], "reduce-scatter counts")
        var c = counts.map { Int32($0) }
        try check(MPI_Reduce_scatter(input.baseAddress, output.baseAddress, &c, cmpi_float(), cmpi_op_sum(), cmpi_comm_world()), "MPI_Reduce_scatter")
    }

    public func allGatherInPlace(_ buffer: UnsafeMutableBufferPointer<Float>, counts: [Int]) throws {
        precondition(counts.count == size && counts.reduce(0, +) <= buffer.count, "all-gather counts")
        var c = counts.map { Int32($0) }
        var displacements = [Int32](repeating: 0, count: size)
        for r in 1..<max(size, 1) where r < size { displacements[r] = displacements[r - 1] + c[r - 1] }
        try check(MPI_Allgatherv(cmpi_in_place(), 0, cmpi_float(), buffer.baseAddress, &c, &displacements, cmpi_float(), cmpi_comm_world()),
                  "MPI_Allgatherv")
    }

    public func gather(_ input: [UInt8], root: Int) throws -> [UInt8] {
        var output = [UInt8](repeating: 0, count: rank == root ? input.count * size : 0)
        try input.withUnsafeBufferPointer { src in
            try output.withUnsafeMutableBufferPointer { dst in
                try check(MPI_Gather(src.baseAddress, Int32(src.count), cmpi_byte(), dst.baseAddress, Int32(src.count), cmpi_byte(), Int32(root),
                                     cmpi_comm_world()), "MPI_Gather")
            }
        }
        return output
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        try check(MPI_Bcast(buffer.baseAddress, Int32(buffer.count), cmpi_byte(), Int32(root), cmpi_comm_world()), "MPI_Bcast")
    }

    public func barrier() throws {
        try check(MPI_Barrier(cmpi_comm_world()), "MPI_Barrier")
    }

    static let pointToPointPiece = 1 << 30

    public func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws {
        var offset = 0
        repeat {
            let n = min(MPICommunicator.pointToPointPiece, bytes.count - offset)
            try check(MPI_Send(bytes.baseAddress.map { $0 + offset }, Int32(n), cmpi_byte(), Int32(destination), 7, cmpi_comm_world()), "MPI_Send")
            offset += n
        } while offset < bytes.count
    }

    public func receive(into bytes: UnsafeMutableRawBufferPointer, from source: Int) throws {
        var offset = 0
        repeat {
            let n = min(MPICommunicator.pointToPointPiece, bytes.count - offset)
            try check(MPI_Recv(bytes.baseAddress.map { $0 + offset }, Int32(n), cmpi_byte(), Int32(source), 7, cmpi_comm_world(), cmpi_status_ignore()),
                      "MPI_Recv")
            offset += n
        } while offset < bytes.count
    }

    private var requests: [MPI_Request?] = []

    public func startAllReduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws -> Int {
        var request: MPI_Request? = cmpi_request_null()
        try check(MPI_Iallreduce(cmpi_in_place(), buffer.baseAddress, Int32(buffer.count), cmpi_float(), cmpi_op_sum(), cmpi_comm_world(),
                                 &request), "MPI_Iallreduce")
        requests.append(request)
        return requests.count - 1
    }

    public func test() throws -> Bool {
        if requests.isEmpty { return true }
        var done: Int32 = 0
        try check(MPI_Testall(Int32(requests.count), &requests, &done, cmpi_statuses_ignore()), "MPI_Testall")
        return done != 0
    }

    public func waitAll() throws {
        if requests.isEmpty { return }
        try check(MPI_Waitall(Int32(requests.count), &requests, cmpi_statuses_ignore()), "MPI_Waitall")
        requests.removeAll()
    }
}

/// The communicator for this process: MPI under mpirun, a single process otherwise.
public func makeCommunicator() throws -> Communicator {
    MPICommunicator.launchedByMPI ? try MPICommunicator() : SingleProcessCommunicator()
}
