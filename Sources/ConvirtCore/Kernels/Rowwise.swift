// Row-wise softmax, L2 normalisation and cross-entropy: the pieces of attention and of the ConVIRT loss.

import RealModule

public enum Softmax {
    /// output[r] = softmax(input[r]) over the last axis, shifted by the row max. output may alias input.
    public static func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, rows: Int, columns: Int) {
        for r in 0..<rows { _ = row(output + r * columns, input + r * columns, columns) }
    }

    /// Softmax of one row; returns log(sum(exp(x))) (the row's log-partition) for the caller's loss.
    @inline(__always)
    static func row(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ columns: Int) -> Float {
        var m = -Float.infinity
        for i in 0..<columns { m = max(m, x[i]) }
        var s: Float = 0
        for i in 0..<columns { let e = Float.exp(x[i] - m); y[i] = e; s += e }
        let inv = 1 / s
        for i in 0..<columns { y[i] *= inv }
        return Float.log(s) + m
    }

    /// gradInput += y * (dy - sum(dy * y)), from the forward output y.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                output: UnsafePointer<Float>, rows: Int, columns: Int) {
        for r in 0..<rows {
            let y = output + r * columns, dy = gradOutput + r * columns, dx = gradInput + r * columns
            var dot: Float = 0
            for i in 0..<columns { dot += dy[i] * y[i] }
            for i in 0..<columns { dx[i] += y[i] * (dy[i] - dot) }
        }
    }
}

public enum L2Normalize {
    /// output[r] = x[r] / max(||x[r]||, eps), as torch.nn.functional.normalize; norms: [rows].
    public static func forward(output: UnsafeMutablePointer<Float>, norms: UnsafeMutablePointer<Float>,
                               input: UnsafePointer<Float>, rows: Int, features: Int, eps: Float = 1e-12) {
        for r in 0..<rows {
            let x = input + r * features, y = output + r * features
            var s: Float = 0
            for i in 0..<features { s += x[i] * x[i] }
            let norm = s.squareRoot()
            norms[r] = norm
            let inv = 1 / max(norm, eps)
            for i in 0..<features { y[i] = x[i] * inv }
        }
    }

    /// gradInput += (dy - y * (y . dy)) / norm when norm > eps, else dy / eps.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                output: UnsafePointer<Float>, norms: UnsafePointer<Float>, rows: Int, features: Int,
                                eps: Float = 1e-12) {
        for r in 0..<rows {
            let y = output + r * features, dy = gradOutput + r * features, dx = gradInput + r * features
            let norm = norms[r]
            if norm > eps {
                var dot: Float = 0
                for i in 0..<features { dot += y[i] * dy[i] }
                let inv = 1 / norm
                for i in 0..<features { dx[i] += (dy[i] - y[i] * dot) * inv }
            } else {
                let inv = 1 / eps
                for i in 0..<features { dx[i] += dy[i] * inv }
            }
        }
    }
}

public enum CrossEntropy {
    /// losses[r] = logsumexp(logits[r]) - logits[r, targets[r]]; probabilities[r] = softmax(logits[r]).
    /// - logits, probabilities: [rows, classes]; targets: [rows] in 0..<classes; losses: [rows]
    public static func forward(losses: UnsafeMutablePointer<Float>, probabilities: UnsafeMutablePointer<Float>,
                               logits: UnsafePointer<Float>, targets: UnsafePointer<Int32>, rows: Int, classes: Int) {
        for r in 0..<rows {
            let x = logits + r * classes
            losses[r] = Softmax.row(probabilities + r * classes, x, classes) - x[Int(targets[r])]
        }
    }

    /// gradLogits[r] += gradLosses[r] * (probabilities[r] - onehot(targets[r])).
    public static func backward(gradLogits: UnsafeMutablePointer<Float>, gradLosses: UnsafePointer<Float>,
                                probabilities: UnsafePointer<Float>, targets: UnsafePointer<Int32>, rows: Int, classes: Int) {
        for r in 0..<rows {
            let p = probabilities + r * classes, dx = gradLogits + r * classes, g = gradLosses[r]
            for i in 0..<classes { dx[i] += g * p[i] }
            dx[Int(targets[r])] -= g
        }
    }
}

/// Binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss, reduction none), for sigmoid heads:
/// loss = max(x, 0) - x y + log(1 + exp(-|x|)), stable for any x.
public enum BinaryCrossEntropy {
    /// losses[i] and probabilities[i] = sigmoid(logits[i]) for `count` logits with targets in [0, 1].
    public static func forward(losses: UnsafeMutablePointer<Float>, probabilities: UnsafeMutablePointer<Float>,
                               logits: UnsafePointer<Float>, targets: UnsafePointer<Float>, count: Int) {
        for i in 0..<count {
            let x = logits[i], y = targets[i]
            let e = Float.exp(-abs(x))
            losses[i] = max(x, 0) - x * y + Float.log(onePlus: e)
            probabilities[i] = x >= 0 ? 1 / (1 + e) : e / (1 + e)
        }
    }

    /// gradLogits[i] += gradLosses[i] * (sigmoid(logits[i]) - targets[i]).
    public static func backward(gradLogits: UnsafeMutablePointer<Float>, gradLosses: UnsafePointer<Float>,
                                probabilities: UnsafePointer<Float>, targets: UnsafePointer<Float>, count: Int) {
        for i in 0..<count { gradLogits[i] += gradLosses[i] * (probabilities[i] - targets[i]) }
    }
}
