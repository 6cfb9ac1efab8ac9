// convirt: contrastive pretraining of medical image encoders from paired images and reports
// (ConVIRT, Zhang et al., arXiv 2010.00747) as MPI-launched data-parallel Swift worker processes.

import ArgumentParser
import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtModels
import ConvirtEvaluation
import ConvirtReport
import ConvirtTraining
import Foundation

// The enums the command line takes by name.
extension Preset: ExpressibleByArgument {}
extension PrecisionChoice: ExpressibleByArgument {}
extension Precision: ExpressibleByArgument {}
extension ScheduleKind: ExpressibleByArgument {}
extension CheckpointIO: ExpressibleByArgument {}
extension GradientExchange: ExpressibleByArgument {}
extension DownstreamDataset: ExpressibleByArgument {}

@main
struct Convirt: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convirt",
        abstract: "ConVIRT: contrastive pretraining of medical image encoders from images and reports, on MPI.",
        subcommands: [TrainCommand.self, EvalCommand.self, EmbedCommand.self, ReportCommand.self, CheckpointCommand.self, SynthCommand.self,
                      PrepareCommand.self, TokenizeCommand.self, ParityCommand.self, Info.self, Bench.self]
    )

    /// OpenBLAS's kernels are chosen when the library loads: restart with better ones first if needed.
    /// Exit status: 0 success; 64 (with the usage text) for a bad flag or flag value; 1 for every other
    /// problem (a missing or damaged file, a run that failed), with one line that names it.
    static func main() {
        BLASCore.restartWithPreferredSettingsIfNeeded()
        // Under mpirun every rank parses the same flags: only rank 0 prints a usage error (once, not N times).
        let silent = EnvironmentSwitches.process.launcherRank != 0
        func fail(_ error: Error) -> Never {
            if silent { Foundation.exit(exitCode(for: error).rawValue) }
            exit(withError: error)
        }
        // A switch with a value that means nothing is refused before anything runs on it.
        if let problem = EnvironmentSwitches.process.problems.first {
            if !silent { FileHandle.standardError.write(Data("Error: \(problem)\n".utf8)) }
            Foundation.exit(1)
        }
        var command: ParsableCommand
        do { command = try parseAsRoot(nil) } catch { fail(error) }
        do {
            try command.run()
        } catch {
            // The parser's own errors (help, usage, ValidationError, ExitCode) keep their meaning.
            if String(reflecting: type(of: error)).hasPrefix("ArgumentParser.") { fail(error) }
            if !silent { FileHandle.standardError.write(Data("Error: \(describe(error))\n".utf8)) }
            Foundation.exit(1)
        }
    }
}

/// An error as one sentence for people (Foundation's errors by their reason, not their domain and code).
func describe(_ error: Error) -> String {
    if let error = error as? ConvirtError { return error.message }
    let ns = error as NSError
    if ns.domain == NSCocoaErrorDomain || ns.domain == NSPOSIXErrorDomain {
        let path = (ns.userInfo[NSFilePathErrorKey] as? String).map { "\($0): " } ?? ""
        return path + (ns.localizedFailureReason ?? ns.localizedDescription)
    }
    return "\(error)"
}

/// What this build runs on: the libraries, the BLAS threads, and (under mpirun) the MPI job, checked
/// with one all-reduce.
struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the build's libraries and, under mpirun, check the MPI job with an all-reduce.")

    func run() throws {
        let communicator = try makeCommunicator()
        var ranks = [Double(communicator.rank)]
        try ranks.withUnsafeMutableBufferPointer { try communicator.allReduceSum($0) }
        let expected = Double(communicator.size * (communicator.size - 1) / 2)
        // Each rank's host, gathered on rank 0 (fixed 64-byte records).
        var host = [UInt8](repeating: 0, count: 64)
        var name = [CChar](repeating: 0, count: 64)
        gethostname(&name, 63)
        for (k, c) in name.prefix(63).enumerated() { host[k] = UInt8(bitPattern: c) }
        let hosts = try communicator.gather(host, root: 0)
        if communicator.isRoot {
            print("convirt \(convirtVersion)")
            print("BLAS: \(BLASThreads.configuration), \(BLASThreads.current) thread(s); core \(BLASCore.current) (\(BLASCore.origin))")
            print("oneDNN: \(DNNL.version), ISA \(DNNL.isa), CPU runtime \(DNNL.cpuRuntime); OpenMP wait policy \(BLASCore.openMPWaitPolicy)")
            print("oneDNN library: \(DNNL.origin)")
            if let problem = DNNL.engineProblem { print("error: \(problem)") }
            for line in Backend.current.lines { print(line) }
            print("MPI: \(MPICommunicator.libraryVersion.split(separator: "\n").first ?? "")")
            if communicator is MPICommunicator {
                print("MPI job: world size \(communicator.size); all-reduce of ranks = \(Int(ranks[0])) (expected \(Int(expected)))")
                let names = (0..<communicator.size).map { r in
                    String(decoding: hosts[(r * 64)..<(r * 64 + 64)].prefix { $0 != 0 }, as: UTF8.self)
                }
                print("ranks on hosts: " + names.enumerated().map { "\($0.offset)@\($0.element)" }.joined(separator: ", "))
            } else {
                print("MPI job: none (not launched by mpirun; running as a single process)")
            }
        }
        (communicator as? MPICommunicator)?.finalize()
        if ranks[0] != expected { throw ValidationError("all-reduce returned \(ranks[0]), expected \(expected)") }
        if DNNL.engineProblem != nil { throw ExitCode(1) }
    }
}

/// --collective-timeout, for every command that runs under mpirun.
struct CollectiveOptions: ParsableArguments {
    @Option(parsing: .unconditional,
            help: ArgumentHelp("Seconds a collective may wait for the other ranks (0: forever). Past it, every rank that can still answer reports what "
                               + "it waits in and names the ranks that do not (stderr, and collective-timeout.rank<R>.json in the run directory), "
                               + "and the job ends non-zero (launch.sh --max-restarts resumes it)."))
    var collectiveTimeout = CollectiveWatchdog.defaultTimeout

    func validate() throws {
        guard collectiveTimeout >= 0 && collectiveTimeout.isFinite else {
            throw ValidationError("--collective-timeout must be a number of seconds (0: no deadline), got \(collectiveTimeout)")
        }
    }

    var seconds: Double? { collectiveTimeout > 0 ? collectiveTimeout : nil }
}

/// Runs `body` with the job's communicator, its collectives under `collective`'s deadline. A failure at
/// the start (see `agreeOnStart`) is printed once by rank 0 and every rank exits 1 cleanly; a failure
/// later, on any rank, ends every rank (no hang); a collective timeout, already reported by every rank
/// that could answer, ends the job too.
func withCommunicator(_ name: String, _ collective: CollectiveOptions, _ body: (Communicator) throws -> Void) throws {
    let communicator = try makeCommunicator()
    communicator.watchdog.timeout = collective.seconds
    do {
        try body(communicator)
        (communicator as? MPICommunicator)?.finalize()
    } catch let failure as StartFailure {
        (communicator as? MPICommunicator)?.finalize()
        throw ExitCode(failure.code)
    } catch is StoppedOnRequest {
        (communicator as? MPICommunicator)?.finalize()
        throw ExitCode(StopRequest.exitStatus)
    } catch is CollectiveTimeout {
        communicator.abort(code: 1)
    } catch {
        let message = error is ValidationError ? "\(error)" : describe(error)
        let rank = communicator.size > 1 ? " (rank \(communicator.rank) of \(communicator.size))" : ""
        FileHandle.standardError.write(Data("convirt \(name)\(rank): \(message)\n".utf8))
        if communicator.size > 1 { communicator.abort(code: 1) }
        throw ExitCode(1)
    }
}

/// A run that every rank stopped, checkpointed, at a rank's request (`StopRequest`): exit 75 once finalized.
struct StoppedOnRequest: Error {}

/// A start that failed on some rank, already reported by rank 0: exit 64 for a bad flag, 1 otherwise.
struct StartFailure: Error { let code: Int32 }

/// The start of a job (flags, paths, the dataset's header): `body` runs on every rank, then the ranks
/// compare. When one failed, rank 0 prints the first failure once (naming the rank when it is not 0)
/// and every rank throws `StartFailure`, which `withCommunicator` turns into a clean exit 1: no N copies
/// of one message, no MPI_ABORT. `body` must not communicate.
func agreeOnStart<T>(_ name: String, _ communicator: Communicator, _ body: () throws -> T) throws -> T {
    var result: Result<T, Error>
    do { result = .success(try body()) } catch { result = .failure(error) }
    // A single process keeps the parser's handling of a bad flag (exit 64 with the usage text).
    if communicator.size == 1, case .failure(let error as ValidationError) = result { throw error }
    let record = 2048
    var mine = [UInt8](repeating: 0, count: record)
    if case .failure(let error) = result {
        var message = describe(error)
        // "train: ..." from a shared check reads "convirt train: ...", not "convirt train: train: ...".
        if let command = name.split(separator: " ").first, message.hasPrefix("\(command): ") { message.removeFirst(command.count + 2) }
        mine[0] = error is ValidationError ? 64 : 1
        for (k, b) in Array(message.utf8.prefix(record - 2)).enumerated() { mine[k + 1] = b }
    }
    let all = try communicator.gather(mine, root: 0)
    var failed: UInt8 = 0
    if communicator.isRoot, let first = (0..<communicator.size).first(where: { all[$0 * record] != 0 }) {
        failed = all[first * record]
        let message = String(decoding: all[(first * record + 1)..<((first + 1) * record)].prefix { $0 != 0 }, as: UTF8.self)
        FileHandle.standardError.write(Data("convirt \(name)\(first == 0 ? "" : " (rank \(first))"): \(message)\n".utf8))
    }
    try withUnsafeMutableBytes(of: &failed) { try communicator.broadcast($0, root: 0) }
    if failed != 0 { throw StartFailure(code: Int32(failed)) }
    return try result.get()
}

let convirtVersion = "0.1.0"
