// Gradient pieces: how a bf16 backward pass cuts every reduction over samples so that the result does
// not depend on how the global batch is split over ranks (DESIGN.md, invariant 1).
//
// A parameter gradient sums over the samples of the batch: a convolution's weights over images and
// pixels, a linear layer's weights and bias over samples and tokens, LayerNorm's gamma and beta over
// tokens. A rank computes its share of that sum, and the shares are added by the all-reduce. How a
// kernel orders, blocks and rounds a sum depends on its length: oneDNN's bf16 kernels on AMX block the
// sum over k by the product's size, so a rank of 4 samples and a rank of 8 parted at bf16's rounding
// (1e-4 of the gradient norm), not fp32's. Pieces remove the dependence by construction: the batch is cut
// into pieces of `samples` consecutive samples, aligned to the global sample index (a rank's share is a
// whole number of pieces), every piece is a call of its own whose shape depends on its samples alone (a
// fixed number of images; a sentence piece's rows, `TokenRows`), written alone (so its value depends on
// its samples only, however the kernel sums), and the pieces are added in order in fp32. Ranks of any
// world size then compute bitwise the same pieces, and only the fp32 additions that join them (a rank's,
// then the all-reduce's) differ, as in fp32.

/// The samples of a gradient piece (`PassContext.gradientPiece`, `--gradient-piece`, config.json's
/// `gradient_piece`).
public enum GradientPieces {
    /// The largest world size whose shares of the batch `standard` keeps whole.
    public static let standardRanks = 8

    /// The default for a global (micro-)batch of `globalBatch` samples: the largest of 4, 2 and 1 such
    /// that every world size up to `standardRanks` that divides the batch gives each rank a whole
    /// number of pieces (4 for the paper's batch of 32, 1 for the tiny preset's 8). Larger pieces cost
    /// less (fewer, larger calls; `convirt bench step --gradient-piece`); a larger world size needs
    /// smaller ones (`validate`).
    public static func standard(globalBatch: Int) -> Int {
        for samples in [4, 2] where globalBatch % (samples * standardRanks) == 0 { return samples }
        return 1
    }

    /// `standard(globalBatch:)` where it cuts a rank's `localBatch` samples into whole pieces, else the
    /// largest of its divisors that does (fine-tuning, whose batch follows the dataset's size: a world
    /// size past `standardRanks` then groups its sums otherwise than smaller ones, at fp32's rounding
    /// where the kernels' sums do not depend on their length).
    public static func fitting(globalBatch: Int, localBatch: Int) -> Int {
        let standard = standard(globalBatch: globalBatch)
        return [4, 2, 1].first { $0 <= standard && standard % $0 == 0 && localBatch % $0 == 0 && globalBatch % $0 == 0 } ?? 1
    }

    /// Why `samples` cannot cut a rank's `localBatch` samples of a global (micro-)batch of `globalBatch`
    /// into whole pieces aligned to the global index; nil where it can.
    public static func problem(samples: Int, localBatch: Int, globalBatch: Int) -> String? {
        guard samples >= 1 else { return "a gradient piece must hold at least one sample, got \(samples)" }
        if localBatch % samples == 0 && globalBatch % samples == 0 { return nil }
        let fits = [4, 2, 1].first { localBatch % $0 == 0 && globalBatch % $0 == 0 } ?? 1
        return "gradient pieces of \(samples) samples do not cut a rank's \(localBatch) samples into whole pieces; "
            + "--gradient-piece \(fits) does (runs agree across world sizes only at equal pieces)"
    }
}
