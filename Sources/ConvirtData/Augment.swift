// ConVIRT's image augmentation (DESIGN.md, the paper's App. A), each draw from the counter-based
// generator keyed by (seed, epoch, global sample index, purpose): random crop of area ratio [0.6, 1]
// (aspect ratio [3/4, 4/3], as RandomResizedCrop) resized to the output size, horizontal flip p = 0.5,
// affine (rotation +-20 deg, translation up to 0.1, scale 0.95-1.05, zero fill), brightness and contrast
// factors in [0.6, 1.4], Gaussian blur sigma in [0.1, 3.0]; then ImageNet normalisation, gray to 3 channels.
// Crop, flip, affine and resize are one inverse map sampled once with bilinear interpolation.

import CKernels
import ConvirtCore
import Foundation
import RealModule

public struct AugmentConfig: Codable, Sendable, Equatable {
    public var outputSize = 224
    public var cropScale: ClosedRange<Double> = 0.6...1.0
    public var flipProbability = 0.5
    public var rotationDegrees = 20.0
    public var translate = 0.1
    public var scale: ClosedRange<Double> = 0.95...1.05
    public var brightness: ClosedRange<Double> = 0.6...1.4
    public var contrast: ClosedRange<Double> = 0.6...1.4
    public var blurSigma: ClosedRange<Double> = 0.1...3.0
    /// Swap "left" and "right" in the sampled sentence when the image is flipped (off = the paper's exact recipe).
    public var swapLateralityOnFlip = true

    public init(outputSize: Int = 224) { self.outputSize = outputSize }

    /// No augmentation: the whole image resized to the output size (evaluation, embedding).
    public static func none(outputSize: Int) -> AugmentConfig {
        var c = AugmentConfig(outputSize: outputSize)
        c.cropScale = 1...1; c.flipProbability = 0; c.rotationDegrees = 0; c.translate = 0; c.scale = 1...1
        c.brightness = 1...1; c.contrast = 1...1; c.blurSigma = 0...0
        return c
    }
}


public struct AugmentParameters: Sendable, Equatable {
    public var crop: (x: Double, y: Double, width: Double, height: Double)
    public var flip: Bool
    public var angle: Double, translateX: Double, translateY: Double, scale: Double
    public var brightness: Double, contrast: Double, blurSigma: Double

    public static func == (a: Self, b: Self) -> Bool {
        a.crop == b.crop && a.flip == b.flip && a.angle == b.angle && a.translateX == b.translateX && a.translateY == b.translateY
            && a.scale == b.scale && a.brightness == b.brightness && a.contrast == b.contrast && a.blurSigma == b.blurSigma
    }

    /// Draws every parameter for one sample of a width x height image.
    public static func draw(_ config: AugmentConfig, width: Int, height: Int, stream: RandomStream) -> AugmentParameters {
        func uniform(_ purpose: DrawPurpose, _ i: UInt64, _ range: ClosedRange<Double>) -> Double {
            range.lowerBound + (range.upperBound - range.lowerBound) * stream.child(purpose.rawValue).uniformDouble(at: i)
        }
        // RandomResizedCrop: ten tries at an area and an aspect ratio, then the whole image.
        let area = Double(width * height)
        var crop = (x: 0.0, y: 0.0, width: Double(width), height: Double(height))
        if config.cropScale != 1...1 {
            for attempt in 0..<10 {
                let a = UInt64(attempt * 4)
                let target = area * uniform(.crop, a, config.cropScale)
                let ratio = Double.exp(uniform(.crop, a + 1, Double.log(3.0 / 4)...Double.log(4.0 / 3)))
                let w = (target * ratio).squareRoot().rounded(), h = (target / ratio).squareRoot().rounded()
                if w > 0 && h > 0 && w <= Double(width) && h <= Double(height) {
                    let cropStream = stream.child(DrawPurpose.crop.rawValue)
                    crop = (Double(cropStream.integer(below: width - Int(w) + 1, at: a + 2)),
                            Double(cropStream.integer(below: height - Int(h) + 1, at: a + 3)), w, h)
                    break
                }
            }
        }
        let out = Double(config.outputSize)
        return AugmentParameters(
            crop: crop,
            flip: uniform(.flip, 0, 0...1) < config.flipProbability,
            angle: uniform(.affine, 0, -config.rotationDegrees...config.rotationDegrees),
            translateX: (uniform(.affine, 1, -config.translate...config.translate) * out).rounded(),
            translateY: (uniform(.affine, 2, -config.translate...config.translate) * out).rounded(),
            scale: uniform(.affine, 3, config.scale),
            brightness: uniform(.jitter, 0, config.brightness),
            contrast: uniform(.jitter, 1, config.contrast),
            blurSigma: config.blurSigma.upperBound > 0 ? uniform(.blur, 0, config.blurSigma) : 0)
    }
}

public enum Augment {
    public static let imagenetMean: [Float] = [0.485, 0.456, 0.406]
    public static let imagenetStd: [Float] = [0.229, 0.224, 0.225]

    /// Writes the augmented, normalised image [3, S, S] into `output`. `scratch` holds 2 S^2 floats.
    public static func apply(_ image: GrayBytes, _ p: AugmentParameters, outputSize s: Int,
                             output: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Float>) {
        let gray = scratch, temp = scratch + s * s
        affineWarp(image, p, outputSize: s, gray: gray)
        // Brightness, then contrast around the mean gray level; clamped to [0, 1].
        let count = s * s
        let b = Float(p.brightness)
        var mean: Float = 0
        for i in 0..<count { gray[i] = min(max(gray[i] * b, 0), 1); mean += gray[i] }
        mean /= Float(count)
        let k = Float(p.contrast)
        for i in 0..<count { gray[i] = min(max((gray[i] - mean) * k + mean, 0), 1) }
        if p.blurSigma > 0 { gaussianBlur(gray, temp: temp, size: s, sigma: Float(p.blurSigma)) }
        for ch in 0..<3 {
            let m = imagenetMean[ch], inv = 1 / imagenetStd[ch], o = output + ch * count
            for i in 0..<count { o[i] = (gray[i] - m) * inv }
        }
    }

    /// The warp's inverse affine about the output centre: output (u, v) -> a point of the cropped and
    /// resized view (rotation and scale, then translation), scaled to the source image by the crop.
    struct Warp {
        let cosT: Float, sinT: Float, tx: Float, ty: Float, sx: Float, sy: Float, cropX: Float, cropY: Float

        init(_ p: AugmentParameters, outputSize s: Int) {
            let theta = p.angle * Double.pi / 180
            cosT = Float(Double.cos(theta) / p.scale); sinT = Float(Double.sin(theta) / p.scale)
            tx = Float(p.translateX); ty = Float(p.translateY)
            sx = Float(p.crop.width) / Float(s); sy = Float(p.crop.height) / Float(s)
            cropX = Float(p.crop.x); cropY = Float(p.crop.y)
        }
    }

    /// The crop, flip, affine and resize of `apply` as one inverse map, sampled once with bilinear
    /// interpolation into `gray` [S, S], values in [0, 1] (0 where the map leaves the image).
    public static func affineWarp(_ image: GrayBytes, _ p: AugmentParameters, outputSize s: Int, gray: UnsafeMutablePointer<Float>) {
        guard let pixels = image.pixels.baseAddress, image.width > 0, image.height > 0 else {
            gray.update(repeating: 0, count: s * s)
            return
        }
        let w = Warp(p, outputSize: s)
        ck_affine_warp(gray, s, pixels, image.width, image.height, w.cosT, w.sinT, w.tx, w.ty, w.sx, w.sy, w.cropX, w.cropY, p.flip ? 1 : 0)
    }

    /// The affine warp of `apply` one pixel at a time into `gray` [S, S], values in [0, 1]: the oracle of
    /// `ck_affine_warp`, which gives the same bits.
    public static func affineWarpReference(_ image: GrayBytes, _ p: AugmentParameters, outputSize s: Int, gray: UnsafeMutablePointer<Float>) {
        let w = Warp(p, outputSize: s)
        let c = Float(s) * 0.5
        for v in 0..<s {
            for u in 0..<s {
                let dx = Float(u) + 0.5 - c - w.tx, dy = Float(v) + 0.5 - c - w.ty
                var qx = w.cosT * dx + w.sinT * dy + c, qy = -w.sinT * dx + w.cosT * dy + c
                if qx < 0 || qy < 0 || qx > Float(s) || qy > Float(s) { gray[v * s + u] = 0; continue }
                if p.flip { qx = Float(s) - qx }
                qy = max(qy, 0)
                gray[v * s + u] = image.sample(w.cropX + qx * w.sx, w.cropY + qy * w.sy)
            }
        }
    }

    /// The blur's normalised kernel: radius ceil(3 sigma) (at most s - 1); empty where that is 0.
    static func blurKernel(size s: Int, sigma: Float) -> [Float] {
        let radius = min(Int((3 * sigma).rounded(.up)), s - 1)
        if radius < 1 { return [] }
        var kernel = [Float](repeating: 0, count: 2 * radius + 1)
        var total: Float = 0
        for i in -radius...radius { let v = Float.exp(-Float(i * i) / (2 * sigma * sigma)); kernel[i + radius] = v; total += v }
        for i in kernel.indices { kernel[i] /= total }
        return kernel
    }

    /// Index i of a row or column of s pixels, reflected at its borders (i within -s..<2s).
    @inline(__always) static func reflect(_ i: Int, _ s: Int) -> Int { i < 0 ? -i - 1 : (i >= s ? 2 * s - i - 1 : i) }

    /// Separable Gaussian blur of the s x s image `x` with radius ceil(3 sigma), reflecting at the
    /// borders; `temp` holds s^2 floats. Eight pixels at a time where a row's taps stay inside it (the
    /// horizontal pass) and across each row (the vertical pass): each pixel's sum runs over its taps in
    /// the same order as `gaussianBlurReference`'s, one multiply and one add each, so the two agree
    /// bitwise.
    public static func gaussianBlur(_ x: UnsafeMutablePointer<Float>, temp: UnsafeMutablePointer<Float>, size s: Int, sigma: Float) {
        let kernel = blurKernel(size: s, sigma: sigma)
        if kernel.isEmpty { return }
        let radius = kernel.count / 2
        @inline(__always) func reflect(_ i: Int) -> Int { Self.reflect(i, s) }
        @inline(__always) func load(_ p: UnsafePointer<Float>) -> SIMD8<Float> { UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self) }
        @inline(__always) func store(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD8<Float>.self) }
        kernel.withUnsafeBufferPointer { k in
            // Columns whose taps all lie inside the row: [radius, s - radius), eight at a time.
            let inside = max(0, s - 2 * radius), blocks = inside / 8
            for y in 0..<s {
                let row = UnsafePointer(x + y * s), out = temp + y * s
                for b in 0..<blocks {
                    let xx = radius + 8 * b
                    var acc = SIMD8<Float>(repeating: 0)
                    for t in 0..<k.count { acc += load(row + xx - radius + t) * SIMD8(repeating: k[t]) }
                    store(acc, out + xx)
                }
                for xx in 0..<s where xx < radius || xx >= radius + 8 * blocks {
                    var acc: Float = 0
                    for t in -radius...radius { acc += row[reflect(xx + t)] * k[t + radius] }
                    out[xx] = acc
                }
            }
            let columns = s / 8 * 8
            for y in 0..<s {
                let out = x + y * s
                for xx in stride(from: 0, to: columns, by: 8) {
                    var acc = SIMD8<Float>(repeating: 0)
                    for t in -radius...radius { acc += load(temp + reflect(y + t) * s + xx) * SIMD8(repeating: k[t + radius]) }
                    store(acc, out + xx)
                }
                for xx in columns..<s {
                    var acc: Float = 0
                    for t in -radius...radius { acc += temp[reflect(y + t) * s + xx] * k[t + radius] }
                    out[xx] = acc
                }
            }
        }
    }

    /// `gaussianBlur` one pixel and one tap at a time: the reference it is tested against.
    public static func gaussianBlurReference(_ x: UnsafeMutablePointer<Float>, temp: UnsafeMutablePointer<Float>, size s: Int, sigma: Float) {
        let kernel = blurKernel(size: s, sigma: sigma)
        if kernel.isEmpty { return }
        let radius = kernel.count / 2
        @inline(__always) func reflect(_ i: Int) -> Int { Self.reflect(i, s) }
        kernel.withUnsafeBufferPointer { k in
            for y in 0..<s {
                for xx in 0..<s {
                    var acc: Float = 0
                    for t in -radius...radius { acc += x[y * s + reflect(xx + t)] * k[t + radius] }
                    temp[y * s + xx] = acc
                }
            }
            for y in 0..<s {
                for xx in 0..<s {
                    var acc: Float = 0
                    for t in -radius...radius { acc += temp[reflect(y + t) * s + xx] * k[t + radius] }
                    x[y * s + xx] = acc
                }
            }
        }
    }

    /// "left" <-> "right" (any case pattern: Left/LEFT/left), whole words only.
    public static func swapLaterality(_ sentence: String) -> String {
        var result = ""
        var word = ""
        func flushWord() {
            let lower = word.lowercased()
            if lower == "left" || lower == "right" {
                let replacement = lower == "left" ? "right" : "left"
                if word == word.uppercased() { result += replacement.uppercased() }
                else if word.first?.isUppercase == true { result += replacement.prefix(1).uppercased() + replacement.dropFirst() }
                else { result += replacement }
            } else {
                result += word
            }
            word = ""
        }
        for ch in sentence {
            if ch.isLetter { word.append(ch) } else { flushWord(); result.append(ch) }
        }
        flushWord()
        return result
    }
}
