// The input of the downstream evaluations (paper App. B): an image decoded whatever its format, zero-
// padded to square, resized, normalised with ImageNet's mean and std and replicated to 3 channels.

import ConvirtCore
import Foundation

public enum EvaluationInput {
    /// The evaluation input of each path: decoded, zero-padded to square, resized, normalised as ImageNet
    /// and replicated to 3 channels; an unreadable image is zeros and false.
    public static func normalizedImages(_ paths: [String], size s: Int, into output: UnsafeMutablePointer<Float>) -> [Bool] {
        let plane = s * s
        var ok = [Bool](repeating: true, count: paths.count)
        let mean = Augment.imagenetMean, std = Augment.imagenetStd
        ok.withUnsafeMutableBufferPointer { ok in
            let flags = ok.baseAddress!
            Parallel.chunks(paths.count, cost: 1 << 22) { range in
                for i in range {
                    let out = output + i * 3 * plane
                    guard let image = try? DownstreamReader.loadImage(path: paths[i], size: s), image.pixels.count == plane else {
                        flags[i] = false
                        out.update(repeating: 0, count: 3 * plane)
                        continue
                    }
                    image.pixels.withUnsafeBufferPointer { px in
                        for c in 0..<3 {
                            let o = out + c * plane, m = mean[c], inv = 1 / std[c]
                            for k in 0..<plane { o[k] = (px[k] - m) * inv }
                        }
                    }
                }
            }
        }
        return ok
    }

}
