// Gradient sums through shared memory, for ranks that run on one machine. Each rank's gradient buffer
// is a shared mapping that every other rank maps too; after backward each rank sums its slice of the
// arena over all ranks' buffers (reading each once, in rank order) and writes the sum where it is
// needed: into every rank's buffer (replicated) or into its own (ZeRO-1, its shard). No message is
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
    /// Shared memory where every rank of the job runs on this machine and can map it, MPI's collectives
    /// otherwise.
    case auto
    /// MPI's collectives (all-reduce, or reduce-scatter for ZeRO-1), in buckets started during backward.
    case collectives
    /// Shared memory, or an error where the ranks cannot share it.
    case sharedMemory = "shared-memory"
}

/// One float buffer per rank, mapped by every rank of a job (`Communicator.mapShared`).
public final class SharedRegion {
    /// Every rank's buffer, in rank order, as this process maps it.
    public let buffers: [UnsafeMutablePointer<Float>]
    /// This rank's buffer.
    public let own: UnsafeMutablePointer<Float>
    public let count: Int
    /// Where the buffers live, for messages ("/dev/shm", "this process").
    public let location: String
    private let release: () -> Void

    public init(buffers: [UnsafeMutablePointer<Float>], rank: Int, count: Int, location: String, release: @escaping () -> Void) {
        self.buffers = buffers
        self.own = buffers[rank]
        self.count = count
        self.location = location
        self.release = release
    }

    deinit { release() }
}

/// The sums over ranks of a gradient arena whose buffers are a `SharedRegion`.
struct SharedGradientSum {
    let region: SharedRegion
    let communicator: Communicator
    /// The arena ranges (trainable parameters only) whose sums this rank computes.
    let slices: [Range<Int>]

    /// `shard`: the arena range whose sums this rank needs alone (ZeRO-1), nil where every rank needs
    /// all of them (replicated: the trainable elements are then cut evenly over the ranks, each rank
    /// summing its part for all).
    init(region: SharedRegion, communicator: Communicator, trainableRuns: [Range<Int>], shard: Range<Int>?) {
        self.region = region
        self.communicator = communicator
        if let shard {
            slices = trainableRuns.map { $0.clamped(to: shard) }.filter { !$0.isEmpty }
        } else {
            // Trainable element k (counted along the runs) goes to rank k / ceil(total / ranks).
            let total = trainableRuns.reduce(0) { $0 + $1.count }
            let mine = ArenaShards(count: total, communicator)[communicator.rank]
            var slices: [Range<Int>] = [], start = 0
            for run in trainableRuns {
                let lo = max(mine.lowerBound, start), hi = min(mine.upperBound, start + run.count)
                if lo < hi { slices.append((run.lowerBound + lo - start)..<(run.lowerBound + hi - start)) }
                start += run.count
            }
            self.slices = slices
        }
    }

    /// Once every rank's gradients are final: this rank's slices summed over ranks, into every rank's
    /// buffer (`everywhere`) or into its own. Meets every rank before (all gradients written) and after
    /// (no rank reads or writes another's buffer any more, so each may zero its own for the next step).
    func sum(everywhere: Bool) throws {
        ck_memory_fence()
        try communicator.barrier()
        ck_memory_fence()
        let ranks = region.buffers.count, own = communicator.rank
        region.buffers.map { Optional($0) }.withUnsafeBufferPointer { pointers in
            let base = pointers.baseAddress!
            for slice in slices {
                Parallel.chunks(slice.count, cost: ranks) { part in
                    ck_sum_ranks(base, ranks, slice.lowerBound + part.lowerBound, part.count, everywhere ? 1 : 0, own)
                }
            }
        }
        ck_memory_fence()
        try communicator.barrier()
        ck_memory_fence()
    }
}
