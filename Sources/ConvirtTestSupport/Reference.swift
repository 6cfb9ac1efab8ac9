// Plain reference versions of every kernel: textbook loops over arrays, generic over the scalar type so
// that tests run them in Double for finite differences. They are the oracle the fast kernels are
// tested against, and are never used for training.

import ConvirtCore
import RealModule

public enum Reference {
    // MARK: convolution

    public static func conv2dForward<T: Real & BinaryFloatingPoint>(_ x: [T], _ w: [T], _ bias: [T]?, _ g: Conv2dGeometry) -> [T] {
        var y = [T](repeating: 0, count: g.batch * g.outChannels * g.outPlane)
        for n in 0..<g.batch { for o in 0..<g.outChannels { for oy in 0..<g.outHeight { for ox in 0..<g.outWidth {
            var s: T = bias?[o] ?? 0
            for c in 0..<g.inChannels { for i in 0..<g.kernelH { for j in 0..<g.kernelW {
                let iy = oy * g.strideH - g.padH + i, ix = ox * g.strideW - g.padW + j
                if iy < 0 || iy >= g.height || ix < 0 || ix >= g.width { continue }
                s += w[((o * g.inChannels + c) * g.kernelH + i) * g.kernelW + j] * x[((n * g.inChannels + c) * g.height + iy) * g.width + ix]
            } } }
            y[((n * g.outChannels + o) * g.outHeight + oy) * g.outWidth + ox] = s
        } } } }
        return y
    }

    /// Returns (dx, dw, db).
    public static func conv2dBackward<T: Real & BinaryFloatingPoint>(_ dy: [T], _ x: [T], _ w: [T], _ g: Conv2dGeometry) -> ([T], [T], [T]) {
        var dx = [T](repeating: 0, count: x.count), dw = [T](repeating: 0, count: w.count), db = [T](repeating: 0, count: g.outChannels)
        for n in 0..<g.batch { for o in 0..<g.outChannels { for oy in 0..<g.outHeight { for ox in 0..<g.outWidth {
            let d = dy[((n * g.outChannels + o) * g.outHeight + oy) * g.outWidth + ox]
            db[o] += d
            for c in 0..<g.inChannels { for i in 0..<g.kernelH { for j in 0..<g.kernelW {
                let iy = oy * g.strideH - g.padH + i, ix = ox * g.strideW - g.padW + j
                if iy < 0 || iy >= g.height || ix < 0 || ix >= g.width { continue }
                let wi = ((o * g.inChannels + c) * g.kernelH + i) * g.kernelW + j
                let xi = ((n * g.inChannels + c) * g.height + iy) * g.width + ix
                dw[wi] += d * x[xi]
                dx[xi] += d * w[wi]
            } } }
        } } } }
        return (dx, dw, db)
    }

    // MARK: batch norm

    /// Training-mode batch norm over [N, C, P]: returns y and the biased batch mean and variance.
    public static func batchNormForward<T: Real & BinaryFloatingPoint>(_ x: [T], _ gamma: [T], _ beta: [T], n: Int, c: Int, p: Int, eps: T) -> (y: [T], mean: [T], variance: [T]) {
        var mean = [T](repeating: 0, count: c), variance = [T](repeating: 0, count: c)
        let m = T(n * p)
        for ch in 0..<c {
            var s: T = 0
            for b in 0..<n { for i in 0..<p { s += x[(b * c + ch) * p + i] } }
            mean[ch] = s / m
            var v: T = 0
            for b in 0..<n { for i in 0..<p { let d = x[(b * c + ch) * p + i] - mean[ch]; v += d * d } }
            variance[ch] = v / m
        }
        var y = x
        for b in 0..<n { for ch in 0..<c { for i in 0..<p {
            let k = (b * c + ch) * p + i
            y[k] = (x[k] - mean[ch]) / (variance[ch] + eps).squareRoot() * gamma[ch] + beta[ch]
        } } }
        return (y, mean, variance)
    }

    /// Backward of training-mode batch norm: (dx, dgamma, dbeta).
    public static func batchNormBackward<T: Real & BinaryFloatingPoint>(_ dy: [T], _ x: [T], _ gamma: [T], n: Int, c: Int, p: Int, eps: T) -> ([T], [T], [T]) {
        let (_, mean, variance) = batchNormForward(x, gamma, [T](repeating: 0, count: c), n: n, c: c, p: p, eps: eps)
        var dx = x, dgamma = [T](repeating: 0, count: c), dbeta = [T](repeating: 0, count: c)
        let m = T(n * p)
        for ch in 0..<c {
            let rstd = 1 / (variance[ch] + eps).squareRoot()
            var sdy: T = 0, sdyx: T = 0
            for b in 0..<n { for i in 0..<p {
                let k = (b * c + ch) * p + i
                sdy += dy[k]; sdyx += dy[k] * (x[k] - mean[ch]) * rstd
            } }
            dgamma[ch] = sdyx
            dbeta[ch] = sdy
            for b in 0..<n { for i in 0..<p {
                let k = (b * c + ch) * p + i
                let xhat = (x[k] - mean[ch]) * rstd
                dx[k] = gamma[ch] * rstd / m * (m * dy[k] - sdy - xhat * sdyx)
            } }
        }
        return (dx, dgamma, dbeta)
    }

    public static func batchNormInference<T: Real & BinaryFloatingPoint>(_ x: [T], _ gamma: [T], _ beta: [T], _ mean: [T], _ variance: [T], n: Int, c: Int, p: Int, eps: T) -> [T] {
        var y = x
        for b in 0..<n { for ch in 0..<c { for i in 0..<p {
            let k = (b * c + ch) * p + i
            y[k] = (x[k] - mean[ch]) / (variance[ch] + eps).squareRoot() * gamma[ch] + beta[ch]
        } } }
        return y
    }

    // MARK: pointwise

    public static func relu<T: Real & BinaryFloatingPoint>(_ x: [T]) -> [T] { x.map { max($0, 0) } }

    public static func gelu<T: Real & BinaryFloatingPoint>(_ x: [T]) -> [T] {
        x.map { v in v * (1 + T.erf(v / T.sqrt(2))) / 2 }
    }

    public static func geluDerivative<T: Real & BinaryFloatingPoint>(_ x: [T]) -> [T] {
        x.map { v in (1 + T.erf(v / T.sqrt(2))) / 2 + v * T.exp(-v * v / 2) / T.sqrt(2 * T.pi) }
    }

    // MARK: pooling

    public static func maxPool2d<T: Real & BinaryFloatingPoint>(_ x: [T], planes: Int, h: Int, w: Int, kernel: Int, stride: Int, padding: Int) -> [T] {
        let oh = MaxPool2d.outputSize(h, kernel: kernel, stride: stride, padding: padding)
        let ow = MaxPool2d.outputSize(w, kernel: kernel, stride: stride, padding: padding)
        var y = [T](repeating: -T.infinity, count: planes * oh * ow)
        for pl in 0..<planes { for oy in 0..<oh { for ox in 0..<ow {
            for i in 0..<kernel { for j in 0..<kernel {
                let iy = oy * stride - padding + i, ix = ox * stride - padding + j
                if iy < 0 || iy >= h || ix < 0 || ix >= w { continue }
                y[(pl * oh + oy) * ow + ox] = max(y[(pl * oh + oy) * ow + ox], x[(pl * h + iy) * w + ix])
            } }
        } } }
        return y
    }

    public static func globalAvgPool<T: Real & BinaryFloatingPoint>(_ x: [T], rows: Int, plane: Int) -> [T] {
        (0..<rows).map { r in x[(r * plane)..<((r + 1) * plane)].reduce(0, +) / T(plane) }
    }

    public static func maskedMaxPool<T: Real & BinaryFloatingPoint>(_ x: [T], mask: [Int32], batch: Int, tokens: Int, channels: Int) -> [T] {
        var y = [T](repeating: -T.infinity, count: batch * channels)
        for b in 0..<batch { for t in 0..<tokens where mask[b * tokens + t] != 0 { for c in 0..<channels {
            y[b * channels + c] = max(y[b * channels + c], x[(b * tokens + t) * channels + c])
        } } }
        return y
    }

    // MARK: dense

    public static func linear<T: Real & BinaryFloatingPoint>(_ x: [T], _ w: [T], _ b: [T]?, rows: Int, inFeatures: Int, outFeatures: Int) -> [T] {
        var y = [T](repeating: 0, count: rows * outFeatures)
        for r in 0..<rows { for o in 0..<outFeatures {
            var s: T = b?[o] ?? 0
            for i in 0..<inFeatures { s += x[r * inFeatures + i] * w[o * inFeatures + i] }
            y[r * outFeatures + o] = s
        } }
        return y
    }

    public static func layerNorm<T: Real & BinaryFloatingPoint>(_ x: [T], _ gamma: [T], _ beta: [T], rows: Int, features: Int, eps: T) -> [T] {
        var y = x
        for r in 0..<rows {
            let row = x[(r * features)..<((r + 1) * features)]
            let mean = row.reduce(0, +) / T(features)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / T(features)
            for i in 0..<features { y[r * features + i] = (x[r * features + i] - mean) / (variance + eps).squareRoot() * gamma[i] + beta[i] }
        }
        return y
    }

    public static func embedding<T: Real & BinaryFloatingPoint>(_ table: [T], ids: [Int32], features: Int) -> [T] {
        ids.flatMap { id in table[(Int(id) * features)..<((Int(id) + 1) * features)] }
    }

    // MARK: row-wise

    public static func softmax<T: Real & BinaryFloatingPoint>(_ x: [T], rows: Int, columns: Int) -> [T] {
        var y = x
        for r in 0..<rows {
            let row = x[(r * columns)..<((r + 1) * columns)]
            let m = row.max()!
            let s = row.reduce(0) { $0 + T.exp($1 - m) }
            for i in 0..<columns { y[r * columns + i] = T.exp(x[r * columns + i] - m) / s }
        }
        return y
    }

    public static func l2Normalize<T: Real & BinaryFloatingPoint>(_ x: [T], rows: Int, features: Int, eps: T = 1e-12) -> [T] {
        var y = x
        for r in 0..<rows {
            let norm = x[(r * features)..<((r + 1) * features)].reduce(0) { $0 + $1 * $1 }.squareRoot()
            for i in 0..<features { y[r * features + i] = x[r * features + i] / max(norm, eps) }
        }
        return y
    }

    /// Per-row losses -log softmax(x)[target].
    public static func crossEntropy<T: Real & BinaryFloatingPoint>(_ x: [T], targets: [Int32], rows: Int, classes: Int) -> [T] {
        (0..<rows).map { r in
            let row = x[(r * classes)..<((r + 1) * classes)]
            let m = row.max()!
            let lse = T.log(row.reduce(0) { $0 + T.exp($1 - m) }) + m
            return lse - x[r * classes + Int(targets[r])]
        }
    }

    /// -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), written the textbook way.
    public static func binaryCrossEntropy<T: Real & BinaryFloatingPoint>(_ x: [T], targets: [T]) -> [T] {
        zip(x, targets).map { x, y in
            let p = 1 / (1 + T.exp(-x))
            return -(y * T.log(p) + (1 - y) * T.log(1 - p))
        }
    }

    // MARK: attention

    /// softmax(q k^T / sqrt(d) with masked keys excluded) v, per head, in the [B, T, H*D] layout.
    public static func attention<T: Real & BinaryFloatingPoint>(_ q: [T], _ k: [T], _ v: [T], mask: [Int32], _ g: AttentionGeometry) -> [T] {
        let t = g.tokens, d = g.headSize, w = g.width
        var out = [T](repeating: 0, count: q.count)
        let scale = 1 / T(d).squareRoot()
        for b in 0..<g.batch { for h in 0..<g.heads { for i in 0..<t {
            var scores = [T](repeating: -T.infinity, count: t)
            for j in 0..<t where mask[b * t + j] != 0 {
                var s: T = 0
                for e in 0..<d { s += q[(b * t + i) * w + h * d + e] * k[(b * t + j) * w + h * d + e] }
                scores[j] = s * scale
            }
            let m = scores.max()!
            let weights = scores.map { $0 == -T.infinity ? 0 : T.exp($0 - m) }
            let total = weights.reduce(0, +)
            for j in 0..<t where weights[j] != 0 {
                for e in 0..<d { out[(b * t + i) * w + h * d + e] += weights[j] / total * v[(b * t + j) * w + h * d + e] }
            }
        } } }
        return out
    }

    // MARK: optimizer

    /// torch.optim.Adam / AdamW on arrays, in the order torch applies the operations.
    public static func adamStep<T: Real & BinaryFloatingPoint>(params: inout [T], grads: [T], m: inout [T], v: inout [T], step: Int,
                                                             lr: T, beta1: T, beta2: T, eps: T, weightDecay: T, decoupled: Bool) {
        let bias1 = 1 - T.pow(beta1, T(step)), bias2 = 1 - T.pow(beta2, T(step))
        for i in params.indices {
            if decoupled { params[i] *= 1 - lr * weightDecay }
            let g = grads[i] + (decoupled ? 0 : weightDecay * params[i])
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            params[i] -= lr / bias1 * m[i] / (v[i].squareRoot() / bias2.squareRoot() + eps)
        }
    }
}
