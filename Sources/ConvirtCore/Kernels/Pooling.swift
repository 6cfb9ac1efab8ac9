// Spatial max pooling (ResNet's 3x3/2 pad 1 stem pool), global average pooling, and the masked max
// over tokens that turns BERT's last hidden state into ConVIRT's text feature h_u.

public enum MaxPool2d {
    /// Output size of a max pool along one axis (floor mode, as PyTorch's default).
    public static func outputSize(_ size: Int, kernel: Int, stride: Int, padding: Int) -> Int {
        (size + 2 * padding - kernel) / stride + 1
    }

    /// output[n, c, y, x] = max over the window (padding is -infinity); indices keeps the argmax as a flat
    /// index into the input plane for the backward pass.
    /// - output, indices: [N*C, OH, OW]; input: [N*C, H, W]
    public static func forward(output: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                               input: UnsafePointer<Float>, planes: Int, height: Int, width: Int,
                               kernel: Int = 3, stride: Int = 2, padding: Int = 1) {
        let oh = outputSize(height, kernel: kernel, stride: stride, padding: padding)
        let ow = outputSize(width, kernel: kernel, stride: stride, padding: padding)
        Parallel.chunks(planes, cost: oh * ow * kernel * kernel) { range in
        for plane in range {
            let x = input + plane * height * width
            let y = output + plane * oh * ow, idx = indices + plane * oh * ow
            for oy in 0..<oh {
                let y0 = max(oy * stride - padding, 0), y1 = min(oy * stride - padding + kernel, height)
                for ox in 0..<ow {
                    let x0 = max(ox * stride - padding, 0), x1 = min(ox * stride - padding + kernel, width)
                    var best = -Float.infinity, bestIndex = y0 * width + x0
                    for iy in y0..<y1 {
                        for ix in x0..<x1 {
                            let v = x[iy * width + ix]
                            if v > best || v.isNaN { best = v; bestIndex = iy * width + ix }
                        }
                    }
                    y[oy * ow + ox] = best
                    idx[oy * ow + ox] = Int32(bestIndex)
                }
            }
        }
        }
    }

    /// gradInput[argmax] += gradOutput.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                indices: UnsafePointer<Int32>, planes: Int, inPlane: Int, outPlane: Int) {
        Parallel.chunks(planes, cost: outPlane) { range in
            for plane in range {
                let dx = gradInput + plane * inPlane, dy = gradOutput + plane * outPlane, idx = indices + plane * outPlane
                for p in 0..<outPlane { dx[Int(idx[p])] += dy[p] }
            }
        }
    }
}

public enum GlobalAvgPool {
    /// output[r] = mean of input[r, 0..<plane]. output: [rows]; input: [rows, plane] (rows = N*C).
    public static func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, rows: Int, plane: Int) {
        let scale = 1 / Float(plane)
        for r in 0..<rows {
            let x = input + r * plane
            var s: Float = 0
            for p in 0..<plane { s += x[p] }
            output[r] = s * scale
        }
    }

    /// gradInput[r, p] += gradOutput[r] / plane.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>, rows: Int, plane: Int) {
        let scale = 1 / Float(plane)
        for r in 0..<rows {
            let dx = gradInput + r * plane, g = gradOutput[r] * scale
            for p in 0..<plane { dx[p] += g }
        }
    }
}

public enum MaskedMaxPool {
    /// output[b, c] = max over tokens t with mask[b, t] != 0 of input[b, t, c]; indices holds the token.
    /// - output, indices: [B, C]; input: [B, T, C]; mask: [B, T]. Every row needs at least one valid token.
    public static func forward(output: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                               input: UnsafePointer<Float>, mask: UnsafePointer<Int32>, batch: Int, tokens: Int, channels: Int) {
        for b in 0..<batch {
            let y = output + b * channels, idx = indices + b * channels
            for c in 0..<channels { y[c] = -Float.infinity; idx[c] = -1 }
            for t in 0..<tokens where mask[b * tokens + t] != 0 {
                let x = input + (b * tokens + t) * channels
                for c in 0..<channels where x[c] > y[c] || idx[c] < 0 {
                    y[c] = x[c]
                    idx[c] = Int32(t)
                }
            }
        }
    }

    /// gradInput[b, argmax, c] += gradOutput[b, c].
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                indices: UnsafePointer<Int32>, batch: Int, tokens: Int, channels: Int) {
        for b in 0..<batch {
            for c in 0..<channels {
                let t = Int(indices[b * channels + c])
                if t >= 0 { gradInput[(b * tokens + t) * channels + c] += gradOutput[b * channels + c] }
            }
        }
    }
}
