// `convirt bench exchange`: under mpirun, the time a step spends summing a preset's gradients over the
// ranks, through shared memory and with MPI's collectives, replicated and ZeRO-1 (whose parameter
// all-gather is timed too). The gradients are the preset's trainable arena, filled on rank r with r + 1,
// so every sum is checked against W (W + 1) / 2.

import ArgumentParser
import ConvirtCore
import ConvirtDistributed
import ConvirtModels
import ConvirtTraining
import Foundation

struct BenchExchange: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exchange",
                                                    abstract: "Gradient sums and the update over ranks (mpirun): shared memory against MPI's collectives, ms per step.")

    @Option(help: "tiny, demo or paper.") var preset = Preset.paper
    @Option(parsing: .unconditional, help: "Timed steps per variant (after one untimed).") var steps = 8
    @Option(parsing: .unconditional, help: "Threads per rank.") var threads = 1
    @OptionGroup var collective: CollectiveOptions

    func run() throws {
        Parallel.setThreads(threads)
        try withCommunicator("bench exchange", collective) { communicator in
            let config = TrainConfig.preset(preset)
            let root = communicator.isRoot, ranks = communicator.size
            var lines: [String] = []
            for zero1 in [false, true] {
                for exchange in [GradientExchange.sharedMemory, .collectives] {
                    // A fresh arena for each variant: shared memory takes over its gradients (and ZeRO-1's parameters).
                    let arena = try ConVIRTModel(config: config.model).arena
                    let sync: GradientSync
                    do {
                        sync = try GradientSync(arena: arena, communicator: communicator, mode: zero1 ? .zero1(overlap: false) : .replicated(overlap: false),
                                                exchange: exchange)
                    } catch where exchange == .sharedMemory {
                        if root { lines.append("\(zero1 ? "ZeRO-1" : "replicated") through shared memory: \(error)") }
                        continue
                    }
                    let runs = arena.trainableRanges
                    let floats = runs.reduce(0) { $0 + $1.count }
                    var sums: [Double] = [], gathers: [Double] = [], updates: [Double] = []
                    for step in 0...steps {
                        sync.begin()
                        let value = Float(communicator.rank + 1)
                        for r in runs {
                            Parallel.chunks(r.count) { part in (arena.grads + r.lowerBound + part.lowerBound).update(repeating: value, count: part.count) }
                        }
                        try communicator.barrier()
                        var clock = Clock()
                        _ = try sync.finish()
                        let sum = clock.lap()
                        let expected = Float(ranks * (ranks + 1) / 2)
                        for r in arena.trainableRanges(within: sync.summedRange) where r.count > 0 {
                            for i in [r.lowerBound, (r.lowerBound + r.upperBound) / 2, r.upperBound - 1] where arena.grads[i] != expected {
                                throw ConvirtError("bench exchange: rank \(communicator.rank), \(exchange.rawValue): element \(i) sums to \(arena.grads[i]), not \(expected)")
                            }
                        }
                        // The update after the sums: Adam over what this rank steps, and the parameters' exchange.
                        try communicator.barrier()
                        clock = Clock()
                        let gather = try sync.step(adam: AdamConfig(learningRate: 0, weightDecay: 0, decoupled: false), step: step + 1).gatherSeconds
                        let update = clock.lap()
                        if step > 0 { sums.append(sum); gathers.append(gather); updates.append(update) }
                    }
                    // The slowest rank decides a step: each step's time is its maximum over ranks.
                    let worst = try maxOverRanks(sums + gathers + updates, communicator)
                    let s = median(Array(worst[..<steps])), g = median(Array(worst[steps..<2 * steps])), u = median(Array(worst[(2 * steps)...]))
                    if root {
                        let mb = Double(floats) * 4 / 1e6
                        lines.append(String(format: "%@ %@: sum %.1f ms (%.1f GB/s of gradients), update %.1f ms (Adam%@)",
                                            zero1 ? "ZeRO-1" : "replicated", sync.exchangeDescription, s * 1e3, mb / 1e3 / s, u * 1e3,
                                            sync.sharesParameters ? String(format: " into every rank's buffer, then the ranks' meeting %.1f ms", g * 1e3)
                                                : g > 0 ? String(format: ", then the parameter all-gather %.1f ms", g * 1e3) : ""))
                    }
                }
            }
            if root {
                print("convirt bench exchange: preset \(preset), \(ranks) rank(s) x \(threads) thread(s), median of \(steps) steps, "
                      + "each the slowest rank's; sums checked on every rank")
                for line in lines { print("  " + line) }
            }
        }
    }

    func maxOverRanks(_ values: [Double], _ communicator: Communicator) throws -> [Double] {
        // Every rank's values gathered on rank 0 (the communicator sums, it has no maximum); only rank 0 prints.
        let all = try communicator.gather(values.withUnsafeBytes { Array($0) }, root: 0)
        guard communicator.isRoot else { return values }
        return all.withUnsafeBytes { raw in
            let d = raw.bindMemory(to: Double.self)
            return values.indices.map { i in (0..<communicator.size).map { d[$0 * values.count + i] }.max()! }
        }
    }

    func median(_ x: [Double]) -> Double {
        let s = x.sorted()
        return s.isEmpty ? 0 : s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }
}
