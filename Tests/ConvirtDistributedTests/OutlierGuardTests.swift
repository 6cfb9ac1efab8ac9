// The outlier guard's decisions (llm.c's -sl / -sg): the window, the z-scores, the counts. The guard in
// training runs under mpirun (ConvirtCLITests, "the outlier guard ...").

import ConvirtTraining
import Testing

@Suite("Outlier guard")
struct OutlierGuardTests {
    @Test("no decision before the window is full; a spike is skipped and kept out of the window; counts in a row and in all")
    func decisions() {
        let config = OutlierGuardConfig(lossZ: 3, gradZ: nil, window: 4, maxConsecutive: 2)
        var guard_ = OutlierGuard()
        // Warm-up: nothing is judged until 4 steps were applied, however large.
        for (loss, norm) in [(2.0, 1.0), (100.0, 1.0), (2.2, 1.0), (1.8, 1.0)] {
            #expect(!guard_.decide(loss: loss, norm: norm, config).skip)
        }
        #expect(guard_.losses == [2.0, 100.0, 2.2, 1.8])
        // Window {100, 2.2, 1.8, 2.0} after one more: mean 26.5, deviation 42.4.
        #expect(!guard_.decide(loss: 2.0, norm: 1.0, config).skip)
        for loss in [2.1, 1.9, 2.0, 2.05] { #expect(!guard_.decide(loss: loss, norm: 1.0, config).skip) }
        // Window {2.1, 1.9, 2.0, 2.05}: mean 2.0125, deviation 0.0740; 2.3 is z 3.9.
        let spike = guard_.decide(loss: 2.3, norm: 50, config)
        #expect(spike.skip && spike.gradZ == nil && abs(spike.lossZ! - (2.3 - 2.0125) / 0.07395099728874521) < 1e-9)
        #expect(guard_.losses == [2.1, 1.9, 2.0, 2.05] && guard_.consecutive == 1 && guard_.skipped == 1)
        #expect(!guard_.decide(loss: 2.0, norm: 1.0, config).skip)
        #expect(guard_.consecutive == 0 && guard_.skipped == 1 && guard_.losses == [1.9, 2.0, 2.05, 2.0])
        #expect(guard_.decide(loss: 9, norm: 1, config).skip && guard_.decide(loss: 9, norm: 1, config).skip)
        #expect(guard_.consecutive == 2 && guard_.skipped == 3)
    }

    @Test("the gradient norm is judged on its own window; a constant window skips anything above it")
    func gradientNorm() {
        let config = OutlierGuardConfig(lossZ: nil, gradZ: 5, window: 3)
        var guard_ = OutlierGuard()
        for _ in 0..<3 { #expect(!guard_.decide(loss: 1e6, norm: 4, config).skip) }
        let equal = guard_.decide(loss: 1e9, norm: 4, config)
        #expect(!equal.skip && equal.gradZ == 0 && equal.lossZ == nil)
        let above = guard_.decide(loss: 1, norm: 4.001, config)
        #expect(above.skip && above.gradZ == .infinity)
    }
}
