// Gradient sums through shared memory, for ranks that share a machine. Each rank's gradient buffer is a
// shared mapping that every other rank of its machine maps too; after backward each rank sums its slice
// of the arena over the machine's buffers (reading each once, in rank order) and writes the sum where it
// is needed: into its own buffer where each rank updates its own shard alone (ZeRO-1, and replicated
// ranks that share their parameters), into every buffer where each updates everything. On several machines
// (each with the same number of ranks) a rank then sums its slice with the ranks of its place on the
// other machines (MPI's all-reduce, 1/L of the gradients each for L ranks a machine: Horovod's
// hierarchical all-reduce), and copies the result into its machine's other buffers. No message is
// sent and nothing is copied through a transport: on 2 ranks of a 2-core AMD EPYC, MPI's all-reduce of
// the paper preset's 272 MB of gradients took 120-150 ms a step, all of it on the cores backward runs on.
//
// The sums are the ones the in-process communicator computes (rank order), and on 2 ranks bitwise
// those of any MPI all-reduce (a sum of two is the same either way round).

import CKernels
import ConvirtCore
import Foundation

/// How gradients are summed over ranks (`--gradient-exchange`).
public enum GradientExchange: String, Codable, Sendable, CaseIterable {
    /// Shared memory among the ranks of each machine (and MPI's all-reduce between machines, where there
    /// are several with the same number of ranks each, more than one); MPI's collectives otherwise, and
    /// where the memory cannot be had.
    case auto
    /// MPI's collectives (all-reduce, or reduce-scatter for ZeRO-1), in buckets started during backward.
    case collectives
    /// Shared memory, or an error where the ranks cannot share it.
    case sharedMemory = "shared-memory"
}

/// One float buffer per rank of a machine, mapped by every rank of that machine (`Communicator.mapShared`).
/// Where the job spans several machines (each with the same number of ranks), `crossMachineSum` sums a
/// rank's buffers with those of the ranks of the same place on the other machines.
public final class SharedRegion {
    /// The buffers of this machine's ranks, in the order of their ranks, as this process maps them.
    public let buffers: [UnsafeMutablePointer<Float>]
    /// This rank's place among them, and its buffer.
    public let localRank: Int
    public let own: UnsafeMutablePointer<Float>
    /// Machines of the job (1: every rank shares this one).
    public let machines: Int
    /// Where the buffers live, for messages ("/dev/shm", "this process").
    public let location: String
    /// Machines > 1: sums each buffer in place over the ranks of this `localRank` on every machine (all
    /// of them call it alike: the same ranges, in the same order).
    public let crossMachineSum: (([UnsafeMutableBufferPointer<Float>]) throws -> Void)?
    private let release: () -> Void

    public init(buffers: [UnsafeMutablePointer<Float>], localRank: Int, machines: Int = 1, location: String,
                crossMachineSum: (([UnsafeMutableBufferPointer<Float>]) throws -> Void)? = nil, release: @escaping () -> Void) {
        precondition((machines == 1) == (crossMachineSum == nil), "a cross-machine sum goes with several machines")
        self.buffers = buffers
        self.localRank = localRank
        self.own = buffers[localRank]
        self.machines = machines
        self.location = location
        self.crossMachineSum = crossMachineSum
        self.release = release
    }

    deinit { release() }
}

extension Communicator {
    /// A barrier between fences: what every rank wrote to shared memory before it is visible to every
    /// rank after it.
    func meetSharingMemory() throws {
        ck_memory_fence()
        try barrier()
        ck_memory_fence()
    }
}

/// target[i] = source[i] for i in 0..<count, split over the threads.
func parallelCopy(_ target: UnsafeMutablePointer<Float>, _ source: UnsafePointer<Float>, count: Int) {
    Parallel.chunks(count) { part in (target + part.lowerBound).update(from: source + part.lowerBound, count: part.count) }
}

/// The sums over ranks of a gradient arena whose buffers are a `SharedRegion`.
struct SharedGradientSum {
    let region: SharedRegion
    let communicator: Communicator
    /// The arena ranges (trainable parameters only) whose sums this rank computes.
    let slices: [Range<Int>]
    /// Whether every buffer gets the sums (else each rank's own shard alone).
    var everywhere: Bool { shard == nil }
    private let shard: Range<Int>?
    /// The machine's buffers as `ck_sum_ranks` takes them.
    private let pointers: [UnsafeMutablePointer<Float>?]

    /// `shard`: the arena range whose sums this rank needs alone (it updates that shard alone, on one
    /// machine), nil where every rank needs all of them (the trainable elements are then cut evenly over
    /// the machine's ranks, each summing its part for all of them).
    init(region: SharedRegion, communicator: Communicator, trainableRuns: [Range<Int>], shard: Range<Int>?) {
        self.region = region
        self.communicator = communicator
        self.shard = shard
        pointers = region.buffers.map { Optional($0) }
        if let shard {
            slices = trainableRuns.map { $0.clamped(to: shard) }.filter { !$0.isEmpty }
        } else {
            // Trainable element k (counted along the runs) goes to local rank k / ceil(total / local ranks).
            let total = trainableRuns.reduce(0) { $0 + $1.count }
            let mine = ArenaShards(count: total, worldSize: region.buffers.count)[region.localRank]
            var slices: [Range<Int>] = [], start = 0
            for run in trainableRuns {
                let lo = max(mine.lowerBound, start), hi = min(mine.upperBound, start + run.count)
                if lo < hi { slices.append((run.lowerBound + lo - start)..<(run.lowerBound + hi - start)) }
                start += run.count
            }
            self.slices = slices
        }
    }

    /// Once every rank's gradients are final: this rank's slices summed over the machine's buffers (in
    /// their rank order), then over the machines (MPI, the ranks of this place on each), into every
    /// buffer of the machine or into this rank's own. Meets every rank before (all gradients written)
    /// and after (no rank reads or writes another's buffer any more, so each may zero its own).
    func sum() throws {
        try communicator.meetSharingMemory()
        let ranks = region.buffers.count, local = region.localRank
        let machineWide = everywhere && region.crossMachineSum == nil
        pointers.withUnsafeBufferPointer { pointers in
            let base = pointers.baseAddress!
            for slice in slices {
                Parallel.chunks(slice.count, cost: ranks) { part in
                    ck_sum_ranks(base, ranks, slice.lowerBound + part.lowerBound, part.count, machineWide ? 1 : 0, local)
                }
            }
        }
        if let across = region.crossMachineSum {
            // The machine's sums of this rank's slices, summed over the machines, then copied to the other buffers.
            try across(slices.map { UnsafeMutableBufferPointer(start: region.own + $0.lowerBound, count: $0.count) })
            for (other, buffer) in region.buffers.enumerated() where other != local {
                for slice in slices { parallelCopy(buffer + slice.lowerBound, region.own + slice.lowerBound, count: slice.count) }
            }
        }
        try communicator.meetSharingMemory()
    }
}
