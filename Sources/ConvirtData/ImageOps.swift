// Image geometry for the data pipeline: antialiased resizing (the pre-resize to a longer side of 256,
// the downstream resize to 224), zero-padding to square, and bilinear sampling.

import ConvirtCore
import ConvirtIO
import Foundation

extension GrayImage {
    /// Resampled to width x height with a triangle (bilinear) filter widened by the scale factor when
    /// shrinking, so that downscaling averages instead of aliasing (as PIL's and torchvision's antialias).
    public func resized(width newWidth: Int, height newHeight: Int) -> GrayImage {
        precondition(newWidth > 0 && newHeight > 0, "resize to an empty image")
        if newWidth == width && newHeight == height { return self }
        let horizontal = ResampleWeights(source: width, target: newWidth)
        let vertical = ResampleWeights(source: height, target: newHeight)
        var temp = [Float](repeating: 0, count: newWidth * height)
        pixels.withUnsafeBufferPointer { src in
            temp.withUnsafeMutableBufferPointer { dst in
                for y in 0..<height {
                    let row = src.baseAddress! + y * width, out = dst.baseAddress! + y * newWidth
                    for x in 0..<newWidth {
                        var s: Float = 0
                        let (start, count, w) = horizontal.taps(x)
                        for k in 0..<count { s += row[start + k] * w[k] }
                        out[x] = s
                    }
                }
            }
        }
        var result = [Float](repeating: 0, count: newWidth * newHeight)
        temp.withUnsafeBufferPointer { src in
            result.withUnsafeMutableBufferPointer { dst in
                for y in 0..<newHeight {
                    let (start, count, w) = vertical.taps(y)
                    let out = dst.baseAddress! + y * newWidth
                    for k in 0..<count {
                        let row = src.baseAddress! + (start + k) * newWidth, wk = w[k]
                        for x in 0..<newWidth { out[x] += row[x] * wk }
                    }
                }
            }
        }
        return GrayImage(width: newWidth, height: newHeight, pixels: result)
    }

    /// Resized so that the longer side is `side` (aspect ratio kept; never enlarged unless `enlarge`).
    public func resized(longerSide side: Int, enlarge: Bool = false) -> GrayImage {
        let longer = max(width, height)
        if longer <= side && !enlarge { return self }
        let scale = Double(side) / Double(longer)
        return resized(width: max(1, Int((Double(width) * scale).rounded())), height: max(1, Int((Double(height) * scale).rounded())))
    }

    /// Zero-padded to a centred square of side max(width, height) (the downstream protocol).
    public func paddedToSquare() -> GrayImage {
        let side = max(width, height)
        if width == height { return self }
        var out = [Float](repeating: 0, count: side * side)
        let x0 = (side - width) / 2, y0 = (side - height) / 2
        for y in 0..<height { for x in 0..<width { out[(y + y0) * side + x + x0] = pixels[y * width + x] } }
        return GrayImage(width: side, height: side, pixels: out)
    }
}

/// Per-output-pixel filter taps of a 1-D resampling.
struct ResampleWeights {
    var starts: [Int] = [], counts: [Int] = [], weights: [[Float]] = []

    init(source: Int, target: Int) {
        let scale = Double(source) / Double(target)
        let support = max(scale, 1.0)  // triangle filter radius in source pixels
        for i in 0..<target {
            let center = (Double(i) + 0.5) * scale
            let lo = max(0, Int((center - support).rounded(.down)))
            let hi = min(source, Int((center + support).rounded(.up)))
            var w: [Float] = []
            var total = 0.0
            for j in lo..<hi {
                let d = abs((Double(j) + 0.5 - center) / support)
                let v = max(0, 1 - d)
                w.append(Float(v)); total += v
            }
            if total <= 0 { w = [1]; starts.append(min(max(0, Int(center)), source - 1)); counts.append(1); weights.append(w); continue }
            starts.append(lo); counts.append(w.count); weights.append(w.map { $0 / Float(total) })
        }
    }

    func taps(_ i: Int) -> (Int, Int, [Float]) { (starts[i], counts[i], weights[i]) }
}

/// An 8-bit grayscale image viewed in place (from a prepared shard).
public struct GrayBytes {
    public let width: Int
    public let height: Int
    public let pixels: UnsafeBufferPointer<UInt8>

    public init(width: Int, height: Int, pixels: UnsafeBufferPointer<UInt8>) {
        self.width = width; self.height = height; self.pixels = pixels
    }

    /// Bilinear sample at (x, y) in pixel-centre coordinates, 0 outside the image, in [0, 1].
    @inline(__always)
    func sample(_ x: Float, _ y: Float) -> Float {
        let fx = x - 0.5, fy = y - 0.5
        let x0 = Int(fx.rounded(.down)), y0 = Int(fy.rounded(.down))
        let ax = fx - Float(x0), ay = fy - Float(y0)
        func at(_ xx: Int, _ yy: Int) -> Float {
            if xx < 0 || yy < 0 || xx >= width || yy >= height { return 0 }
            return Float(pixels[yy * width + xx])
        }
        // Edge replication inside the image, zero fill outside it (as an affine transform's fill).
        if x < 0 || y < 0 || x > Float(width) || y > Float(height) { return 0 }
        let cx0 = min(max(x0, 0), width - 1), cx1 = min(max(x0 + 1, 0), width - 1)
        let cy0 = min(max(y0, 0), height - 1), cy1 = min(max(y0 + 1, 0), height - 1)
        let top = at(cx0, cy0) * (1 - ax) + at(cx1, cy0) * ax
        let bottom = at(cx0, cy1) * (1 - ax) + at(cx1, cy1) * ax
        return (top * (1 - ay) + bottom * ay) * (1 / 255)
    }
}
