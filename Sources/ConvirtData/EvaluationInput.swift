// The input of the downstream evaluations (paper App. B): an image decoded whatever its format, zero-
// padded to square, resized, normalised with ImageNet's mean and std and replicated to 3 channels.

import ConvirtCore
import Foundation

public enum EvaluationInput {
    /// The evaluation input of each path: decoded, zero-padded to square, resized, normalised as ImageNet
    /// and replicated to 3 channels; an unreadable image is zeros and false.
    /// With `cache`, an image it holds is not decoded again, and one decoded is offered to it.
    public static func normalizedImages(_ paths: [String], size s: Int, into output: UnsafeMutablePointer<Float>,
                                        cache: DecodedImageCache? = nil) -> [Bool] {
        precondition(cache.map { $0.size == s } ?? true, "a cache of \(cache?.size ?? 0)-pixel images read at \(s)")
        let plane = s * s
        var ok = [Bool](repeating: true, count: paths.count)
        let mean = Augment.imagenetMean, std = Augment.imagenetStd
        ok.withUnsafeMutableBufferPointer { ok in
            let flags = ok.baseAddress!
            Parallel.chunks(paths.count, cost: 1 << 22) { range in
                for i in range {
                    let out = output + i * 3 * plane
                    guard let pixels = cache?.pixels(paths[i]) ?? decoded(paths[i], size: s, keepingIn: cache) else {
                        flags[i] = false
                        out.update(repeating: 0, count: 3 * plane)
                        continue
                    }
                    pixels.withUnsafeBufferPointer { px in
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

    /// The gray pixels of `path` at `size` x `size` (nil where it cannot be read), offered to `cache`.
    private static func decoded(_ path: String, size: Int, keepingIn cache: DecodedImageCache?) -> [Float]? {
        guard let image = try? DownstreamReader.loadImage(path: path, size: size), image.pixels.count == size * size else { return nil }
        cache?.keep(path, image.pixels)
        return image.pixels
    }
}

/// Decoded evaluation images kept in memory for the passes that read them again (fine-tuning reads its
/// training images and the validation split every epoch). An image is kept as
/// `DownstreamReader.loadImage` returns it (gray, padded to square and resized to `size`), so a kept
/// image is bitwise the image decoded again. Images are kept in the order they are first decoded while
/// their bytes fit `budgetBytes`; past it, the rest are decoded on every read. An unreadable image is
/// never kept (its reads fail, and are counted, each time). Safe to use from several threads.
public final class DecodedImageCache: @unchecked Sendable {
    public let size: Int
    public let budgetBytes: Int
    private let lock = NSLock()
    private var images: [String: [Float]] = [:]
    private var usedBytes = 0
    private var hits = 0, misses = 0

    public init(size: Int, budgetBytes: Int) {
        precondition(size > 0 && budgetBytes >= 0, "an image cache of \(size) pixels and \(budgetBytes) bytes")
        self.size = size
        self.budgetBytes = budgetBytes
    }

    /// The kept pixels of `path`, or nil (counted as a miss) where it is not kept.
    public func pixels(_ path: String) -> [Float]? {
        lock.lock()
        defer { lock.unlock() }
        let kept = images[path]
        if kept == nil { misses += 1 } else { hits += 1 }
        return kept
    }

    /// Keeps `pixels` (size x size) as `path`'s where the budget has room for them.
    public func keep(_ path: String, _ pixels: [Float]) {
        precondition(pixels.count == size * size, "\(path): \(pixels.count) pixels for a \(size) x \(size) cache")
        let bytes = pixels.count * MemoryLayout<Float>.size
        lock.lock()
        defer { lock.unlock() }
        guard images[path] == nil, usedBytes + bytes <= budgetBytes else { return }
        images[path] = pixels
        usedBytes += bytes
    }

    /// Images kept, their bytes, and the reads served from memory and decoded so far.
    public var statistics: (images: Int, bytes: Int, hits: Int, misses: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (images.count, usedBytes, hits, misses)
    }
}

/// Decodes the next batch's images (`EvaluationInput.normalizedImages`) on a background thread while
/// the current one is used; two buffers in turn, so a batch's buffer is refilled only after the batch
/// that used it is done.
public final class ImagePrefetcher: @unchecked Sendable {
    public let size: Int
    /// Where decoded images are looked up first and offered (`DecodedImageCache`), if anywhere.
    public let cache: DecodedImageCache?
    private var buffers: [UnsafeMutablePointer<Float>?] = [nil, nil]
    private var capacities = [0, 0]
    private var flags: [[Bool]] = [[], []]
    private var next = 0
    private var pending: (buffer: Int, done: DispatchSemaphore)?

    public init(size: Int, cache: DecodedImageCache? = nil) {
        self.size = size
        self.cache = cache
    }

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
        let index = next, size = self.size, cache = self.cache
        nonisolated(unsafe) let output = buffer(index, count: paths.count * 3 * size * size)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread { [self] in
            flags[index] = EvaluationInput.normalizedImages(paths, size: size, into: output, cache: cache)
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
    /// one batch ahead (through `cache`, where given).
    public static func batches(_ paths: [String], _ range: Range<Int>, batch: Int, size: Int, cache: DecodedImageCache? = nil,
                               _ body: (Range<Int>, UnsafeMutablePointer<Float>, [Bool]) throws -> Void) rethrows {
        let starts = Array(stride(from: range.lowerBound, to: range.upperBound, by: max(1, batch)))
        guard !starts.isEmpty else { return }
        let prefetcher = ImagePrefetcher(size: size, cache: cache)
        func slice(_ k: Int) -> Range<Int> { starts[k]..<min(starts[k] + batch, range.upperBound) }
        prefetcher.start(Array(paths[slice(0)]))
        for k in starts.indices {
            let (images, ok) = prefetcher.take()
            if k + 1 < starts.count { prefetcher.start(Array(paths[slice(k + 1)])) }
            try body(slice(k), images, ok)
        }
    }
}
