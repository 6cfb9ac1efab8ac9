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
extension ScheduleKind: ExpressibleByArgument {}
extension CheckpointIO: ExpressibleByArgument {}
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
    static func main() {
        BLASCore.restartWithPreferredCoreIfNeeded()
        main(nil)
    }
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
            print("oneDNN: \(DNNL.version), ISA \(DNNL.isa)")
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
    }
}

/// Runs `body` with the job's communicator; an error on any rank ends every rank (no hang).
func withCommunicator(_ name: String, _ body: (Communicator) throws -> Void) throws {
    let communicator = try makeCommunicator()
    do {
        try body(communicator)
        (communicator as? MPICommunicator)?.finalize()
    } catch {
        FileHandle.standardError.write(Data("convirt \(name) (rank \(communicator.rank) of \(communicator.size)): \(error)\n".utf8))
        if communicator.size > 1 { communicator.abort(code: 2) }
        throw ExitCode(2)
    }
}

let convirtVersion = "0.1.0"
