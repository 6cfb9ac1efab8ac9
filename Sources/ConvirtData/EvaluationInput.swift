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

/// Decodes the next batch's images (`EvaluationInput.normalizedImages`) on a background thread while
/// the current one is used; two buffers in turn, so a batch's buffer is refilled only after the batch
/// that used it is done.
public final class ImagePrefetcher: @unchecked Sendable {
    public let size: Int
    private var buffers: [UnsafeMutablePointer<Float>?] = [nil, nil]
    private var capacities = [0, 0]
    private var flags: [[Bool]] = [[], []]
    private var next = 0
    private var pending: (buffer: Int, done: DispatchSemaphore)?

    public init(size: Int) { self.size = size }

    deinit {
        if let (_, done) = pending { done.wait() }
        for buffer in buffers { buffer?.deallocate() }
    }

    private func buffer(_ index: Int, count: Int) -> UnsafeMutablePointer<Float> {
        if capacities[index] < count || buffers[index] == nil {
            buffers[index]?.deallocate()
            buffers[index] = .allocate(capacity: max(1, count))
            capacities[index] = max(1, count)
        }
        return buffers[index]!
    }

    /// Starts decoding `paths` into the buffer not handed out last.
    public func start(_ paths: [String]) {
        precondition(pending == nil, "the previous batch was not taken")
        let index = next, size = self.size
        nonisolated(unsafe) let output = buffer(index, count: paths.count * 3 * size * size)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread { [self] in
            flags[index] = EvaluationInput.normalizedImages(paths, size: size, into: output)
            done.signal()
        }
        pending = (index, done)
        next = 1 - index
    }

    /// The started batch once decoded, and whether each image could be read (valid until the `start`
    /// after the next one).
    public func take() -> (images: UnsafeMutablePointer<Float>, ok: [Bool]) {
        guard let (index, done) = pending else { preconditionFailure("no batch started") }
        done.wait()
        pending = nil
        return (buffers[index]!, flags[index])
    }

    /// Calls `body` on consecutive batches of `paths[range]` (at most `batch` images each), decoding
    /// one batch ahead.
    public static func batches(_ paths: [String], _ range: Range<Int>, batch: Int, size: Int,
                               _ body: (Range<Int>, UnsafeMutablePointer<Float>, [Bool]) throws -> Void) rethrows {
        let starts = Array(stride(from: range.lowerBound, to: range.upperBound, by: max(1, batch)))
        guard !starts.isEmpty else { return }
        let prefetcher = ImagePrefetcher(size: size)
        func slice(_ k: Int) -> Range<Int> { starts[k]..<min(starts[k] + batch, range.upperBound) }
        prefetcher.start(Array(paths[slice(0)]))
        for k in starts.indices {
            let (images, ok) = prefetcher.take()
            if k + 1 < starts.count { prefetcher.start(Array(paths[slice(k + 1)])) }
            try body(slice(k), images, ok)
        }
    }
}
