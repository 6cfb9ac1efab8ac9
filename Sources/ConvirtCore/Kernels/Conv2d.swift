// 2-D convolution, NCHW, groups = 1, dilation = 1, as torch.nn.Conv2d. Forward and backward by im2col
// and one sgemm per image; a 1x1 convolution with stride 1 and no padding is a plain sgemm on the input.

/// Sizes of one convolution, validated once. Weight layout [outChannels, inChannels, kernelH, kernelW].
public struct Conv2dGeometry: Sendable, Hashable, CustomStringConvertible {
    public let batch, inChannels, height, width: Int
    public let outChannels, kernelH, kernelW, strideH, strideW, padH, padW: Int
    public let outHeight, outWidth: Int

    public init(
        batch: Int, inChannels: Int, height: Int, width: Int, outChannels: Int,
        kernel: (Int, Int), stride: (Int, Int) = (1, 1), padding: (Int, Int) = (0, 0)
    ) throws {
        let context = "conv2d"
        try require(batch > 0 && inChannels > 0 && height > 0 && width > 0 && outChannels > 0, context,
                    "sizes must be positive (batch \(batch), in \(inChannels), \(height)x\(width), out \(outChannels))")
        try require(kernel.0 > 0 && kernel.1 > 0, context, "kernel \(kernel.0)x\(kernel.1) must be positive")
        try require(stride.0 > 0 && stride.1 > 0, context, "stride \(stride.0)x\(stride.1) must be positive")
        try require(padding.0 >= 0 && padding.1 >= 0, context, "padding \(padding.0)x\(padding.1) must not be negative")
        try require(height + 2 * padding.0 >= kernel.0 && width + 2 * padding.1 >= kernel.1, context,
                    "kernel \(kernel.0)x\(kernel.1) is larger than the padded input \(height + 2 * padding.0)x\(width + 2 * padding.1)")
        self.batch = batch; self.inChannels = inChannels; self.height = height; self.width = width
        self.outChannels = outChannels; self.kernelH = kernel.0; self.kernelW = kernel.1
        self.strideH = stride.0; self.strideW = stride.1; self.padH = padding.0; self.padW = padding.1
        self.outHeight = (height + 2 * padding.0 - kernel.0) / stride.0 + 1
        self.outWidth = (width + 2 * padding.1 - kernel.1) / stride.1 + 1
    }

    /// Square kernel, stride and padding.
    public init(batch: Int, inChannels: Int, height: Int, width: Int, outChannels: Int,
                kernel: Int, stride: Int = 1, padding: Int = 0) throws {
        try self.init(batch: batch, inChannels: inChannels, height: height, width: width, outChannels: outChannels,
                      kernel: (kernel, kernel), stride: (stride, stride), padding: (padding, padding))
    }

    public var isPointwise: Bool { kernelH == 1 && kernelW == 1 && strideH == 1 && strideW == 1 && padH == 0 && padW == 0 }
    /// Rows of the im2col matrix: inChannels * kernelH * kernelW.
    public var patchSize: Int { inChannels * kernelH * kernelW }
    public var outPlane: Int { outHeight * outWidth }
    public var inputShape: [Int] { [batch, inChannels, height, width] }
    public var weightShape: [Int] { [outChannels, inChannels, kernelH, kernelW] }
    public var outputShape: [Int] { [batch, outChannels, outHeight, outWidth] }
    public var inputCount: Int { batch * inChannels * height * width }
    public var weightCount: Int { outChannels * patchSize }
    public var outputCount: Int { batch * outChannels * outPlane }
    /// Floats of scratch space `forward` and `backward` need (0 for a pointwise convolution).
    public var workspaceCount: Int { isPointwise ? 0 : patchSize * outPlane }
    /// Multiply-adds of the forward pass times two.
    public var forwardFLOPs: Double { 2 * Double(batch) * Double(outChannels) * Double(patchSize) * Double(outPlane) }

    public var description: String {
        "conv2d \(inChannels)->\(outChannels) k\(kernelH)x\(kernelW) s\(strideH) p\(padH) on \(batch)x\(inChannels)x\(height)x\(width)"
    }
}

public enum Conv2d {
    /// output[n, o, y, x] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * input[n, c, y*s - p + i, x*s - p + j]
    /// - output: [N, O, OH, OW]; input: [N, C, H, W]; weight: [O, C, KH, KW]; bias: [O] or nil;
    ///   workspace: `geometry.workspaceCount` floats.
    public static func forward(
        output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        bias: UnsafePointer<Float>?, geometry g: Conv2dGeometry, workspace: UnsafeMutablePointer<Float>?
    ) {
        let inImage = g.inChannels * g.height * g.width, outImage = g.outChannels * g.outPlane
        for n in 0..<g.batch {
            let x = input + n * inImage, y = output + n * outImage
            let columns: UnsafePointer<Float>
            if g.isPointwise {
                columns = x
            } else {
                im2col(workspace!, x, g)
                columns = UnsafePointer(workspace!)
            }
            sgemm(Product(m: g.outChannels, n: g.outPlane, k: g.patchSize),
                a: Matrix(weight, ld: g.patchSize), b: Matrix(columns, ld: g.outPlane), c: MutableMatrix(y, ld: g.outPlane))
            if let bias {
                for o in 0..<g.outChannels {
                    let row = y + o * g.outPlane, b = bias[o]
                    for p in 0..<g.outPlane { row[p] += b }
                }
            }
        }
    }

    /// Accumulates (+=) the gradients of a convolution given gradOutput [N, O, OH, OW].
    /// gradInput may be nil (e.g. the stem, whose input needs no gradient).
    public static func backward(
        gradInput: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>, gradBias: UnsafeMutablePointer<Float>?,
        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        geometry g: Conv2dGeometry, workspace: UnsafeMutablePointer<Float>?
    ) {
        let inImage = g.inChannels * g.height * g.width, outImage = g.outChannels * g.outPlane
        for n in 0..<g.batch {
            let x = input + n * inImage, dy = gradOutput + n * outImage
            if let gradBias {
                for o in 0..<g.outChannels {
                    let row = dy + o * g.outPlane
                    var s: Float = 0
                    for p in 0..<g.outPlane { s += row[p] }
                    gradBias[o] += s
                }
            }
            // dW[O, K] += dY[O, P] * col[K, P]^T
            let columns: UnsafePointer<Float>
            if g.isPointwise {
                columns = x
            } else {
                im2col(workspace!, x, g)
                columns = UnsafePointer(workspace!)
            }
            sgemm(Product(m: g.outChannels, n: g.patchSize, k: g.outPlane, transposeB: true, beta: 1),
                a: Matrix(dy, ld: g.outPlane), b: Matrix(columns, ld: g.outPlane), c: MutableMatrix(gradWeight, ld: g.patchSize))
            guard let gradInput else { continue }
            let dx = gradInput + n * inImage
            // dcol[K, P] = W[O, K]^T * dY[O, P]; then scatter-add the columns back into dX.
            if g.isPointwise {
                sgemm(Product(m: g.patchSize, n: g.outPlane, k: g.outChannels, transposeA: true, beta: 1),
                    a: Matrix(weight, ld: g.patchSize), b: Matrix(dy, ld: g.outPlane), c: MutableMatrix(dx, ld: g.outPlane))
            } else {
                sgemm(Product(m: g.patchSize, n: g.outPlane, k: g.outChannels, transposeA: true),
                    a: Matrix(weight, ld: g.patchSize), b: Matrix(dy, ld: g.outPlane), c: MutableMatrix(workspace!, ld: g.outPlane))
                col2im(dx, UnsafePointer(workspace!), g)
            }
        }
    }

    /// The output columns [lo, hi) whose input coordinate x*stride - pad + offset lies in [0, size).
    @inline(__always)
    static func validRange(offset: Int, stride: Int, pad: Int, size: Int, count: Int) -> (Int, Int) {
        // x*stride >= pad - offset  and  x*stride <= size - 1 + pad - offset
        let low = pad - offset
        var lo = low <= 0 ? 0 : (low + stride - 1) / stride
        let high = size - 1 + pad - offset
        var hi = high < 0 ? 0 : high / stride + 1
        lo = min(lo, count); hi = min(max(hi, lo), count)
        return (lo, hi)
    }

    /// col[(c*KH + i)*KW + j, y*OW + x] = image[c, y*s - p + i, x*s - p + j] (zero outside the image).
    @usableFromInline
    static func im2col(_ col: UnsafeMutablePointer<Float>, _ image: UnsafePointer<Float>, _ g: Conv2dGeometry) {
        let ow = g.outWidth, oh = g.outHeight, plane = g.height * g.width
        Parallel.chunks(g.inChannels, cost: g.kernelH * g.kernelW * g.outPlane) { channels in
        for c in channels {
            let channel = image + c * plane
            for i in 0..<g.kernelH {
                let (yLo, yHi) = validRange(offset: i, stride: g.strideH, pad: g.padH, size: g.height, count: oh)
                for j in 0..<g.kernelW {
                    let row = col + ((c * g.kernelH + i) * g.kernelW + j) * g.outPlane
                    let (xLo, xHi) = validRange(offset: j, stride: g.strideW, pad: g.padW, size: g.width, count: ow)
                    if yLo > 0 { row.update(repeating: 0, count: yLo * ow) }
                    if yHi < oh { (row + yHi * ow).update(repeating: 0, count: (oh - yHi) * ow) }
                    for y in yLo..<yHi {
                        let dst = row + y * ow
                        let src = channel + (y * g.strideH - g.padH + i) * g.width + (j - g.padW)
                        if xLo > 0 { dst.update(repeating: 0, count: xLo) }
                        if xHi < ow { (dst + xHi).update(repeating: 0, count: ow - xHi) }
                        if g.strideW == 1 {
                            (dst + xLo).update(from: src + xLo, count: xHi - xLo)
                        } else if g.strideW == 2 {
                            // Even lanes of 16-wide loads, while the load stays inside this channel.
                            let available = (channel + plane) - src
                            var x = xLo
                            while x + 8 <= xHi && 2 * x + 16 <= available {
                                let wide = UnsafeRawPointer(src + 2 * x).loadUnaligned(as: SIMD16<Float>.self)
                                UnsafeMutableRawPointer(dst + x).storeBytes(of: wide.evenHalf, as: SIMD8<Float>.self)
                                x += 8
                            }
                            while x < xHi { dst[x] = src[2 * x]; x += 1 }
                        } else {
                            let s = g.strideW
                            for x in xLo..<xHi { dst[x] = src[x * s] }
                        }
                    }
                }
            }
        }
        }
    }

    /// The adjoint of im2col: image[c, y*s - p + i, x*s - p + j] += col[(c*KH + i)*KW + j, y*OW + x].
    @usableFromInline
    static func col2im(_ image: UnsafeMutablePointer<Float>, _ col: UnsafePointer<Float>, _ g: Conv2dGeometry) {
        let ow = g.outWidth, oh = g.outHeight, plane = g.height * g.width
        Parallel.chunks(g.inChannels, cost: g.kernelH * g.kernelW * g.outPlane) { channels in
        for c in channels {
            let channel = image + c * plane
            for i in 0..<g.kernelH {
                let (yLo, yHi) = validRange(offset: i, stride: g.strideH, pad: g.padH, size: g.height, count: oh)
                for j in 0..<g.kernelW {
                    let row = col + ((c * g.kernelH + i) * g.kernelW + j) * g.outPlane
                    let (xLo, xHi) = validRange(offset: j, stride: g.strideW, pad: g.padW, size: g.width, count: ow)
                    for y in yLo..<yHi {
                        let src = row + y * ow
                        let dst = channel + (y * g.strideH - g.padH + i) * g.width + (j - g.padW)
                        let s = g.strideW
                        for x in xLo..<xHi { dst[x * s] += src[x] }
                    }
                }
            }
        }
        }
    }
}
