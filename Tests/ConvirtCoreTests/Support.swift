import ConvirtCore
import ConvirtTestSupport
import ConvirtIO
import Foundation
import Testing

/// Random floats in [-scale, scale) from a named counter-based stream, so every test is reproducible.
func randomFloats(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
    let stream = RandomStream(seed: seed)
    return (0..<count).map { scale * (2 * stream.uniform(at: UInt64($0)) - 1) }
}

func tensor(_ shape: [Int], seed: UInt64, scale: Float = 1) -> Tensor<Float> {
    try! Tensor(shape: shape, randomFloats(shape.reduce(1, *), seed: seed, scale: scale))
}

/// Calls `body` with a BatchNorm's saved state for `channels`, with its statistics scratch (2C + 1 doubles).
func withBatchNormScratch(channels c: Int, _ body: (inout BatchNorm2d.Saved) throws -> Void) rethrows {
    var mean = [Float](repeating: 0, count: c), invStd = mean
    var statistics = [Double](repeating: 0, count: 2 * c + 1)
    try mean.withUnsafeMutableBufferPointer { mean in
        try invStd.withUnsafeMutableBufferPointer { invStd in
            try statistics.withUnsafeMutableBufferPointer { stats in
                var saved = BatchNorm2d.Saved(mean: mean.baseAddress!, invStd: invStd.baseAddress!, statistics: stats)
                try body(&saved)
            }
        }
    }
}

/// Calls `body` with batch norm's parameters over these arrays (the running statistics updated in place).
func withBatchNormParameters(gamma: [Float], beta: [Float], runningMean: inout [Float], runningVar: inout [Float],
                             _ body: (BatchNorm2d.Parameters) throws -> Void) rethrows {
    try gamma.withUnsafeBufferPointer { g in try beta.withUnsafeBufferPointer { b in
        try runningMean.withUnsafeMutableBufferPointer { m in try runningVar.withUnsafeMutableBufferPointer { v in
            try body(BatchNorm2d.Parameters(gamma: g.baseAddress!, beta: b.baseAddress!, runningMean: m.baseAddress!, runningVar: v.baseAddress!))
        } }
    } }
}

/// max |a - b| relative to the largest magnitude of the reference b (DESIGN.md's parity measure).
func relativeError<A: BinaryFloatingPoint, B: BinaryFloatingPoint>(_ a: [A], _ b: [B]) -> Double {
    precondition(a.count == b.count, "comparing \(a.count) values with \(b.count)")
    var diff = 0.0, scale = 1e-30
    for i in a.indices {
        diff = max(diff, abs(Double(a[i]) - Double(b[i])))
        scale = max(scale, abs(Double(b[i])))
    }
    return diff / scale
}

/// The gradient of `f` at `x` by central differences in Double.
func numericalGradient(_ x: [Double], step: Double = 1e-6, _ f: ([Double]) -> Double) -> [Double] {
    var x = x
    var gradient = [Double](repeating: 0, count: x.count)
    for i in x.indices {
        let saved = x[i]
        let h = step * max(1, abs(saved))
        x[i] = saved + h
        let plus = f(x)
        x[i] = saved - h
        let minus = f(x)
        x[i] = saved
        gradient[i] = (plus - minus) / (2 * h)
    }
    return gradient
}

func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }

/// The finite-difference and agreement check every kernel goes through:
/// 1. the fast Float forward agrees with the Double reference forward;
/// 2. for every differentiable input, the fast Float backward of the objective sum(y * w) agrees with
///    the central-difference gradient of the Double reference forward.
struct KernelCheck {
    let name: String
    /// Inputs in order; `differentiable[i]` says whether input i gets a gradient.
    var inputs: [[Float]]
    var differentiable: [Bool]
    var reference: ([[Double]]) -> [Double]
    var fast: ([[Float]]) throws -> [Float]
    /// Given the inputs and the output weights w, the gradient of sum(y * w) for every input (an empty
    /// array for a non-differentiable one).
    var fastBackward: ([[Float]], [Float]) throws -> [[Float]]
    var forwardTolerance = 1e-5
    var gradientTolerance = 1e-4

    func run(seed: UInt64 = 99) throws {
        let reference64 = inputs.map { $0.map(Double.init) }
        let yRef = reference(reference64)
        let yFast = try fast(inputs)
        #expect(yFast.count == yRef.count, "\(name): output has \(yFast.count) values, reference \(yRef.count)")
        let forwardError = relativeError(yFast, yRef)
        #expect(forwardError < forwardTolerance, "\(name): forward differs from the reference by \(forwardError)")
        let w = randomFloats(yRef.count, seed: seed)
        let w64 = w.map(Double.init)
        let grads = try fastBackward(inputs, w)
        for (k, isDifferentiable) in differentiable.enumerated() where isDifferentiable {
            let numeric = numericalGradient(reference64[k]) { xk in
                var xs = reference64
                xs[k] = xk
                return dot(reference(xs), w64)
            }
            let error = relativeError(grads[k], numeric)
            #expect(error < gradientTolerance, "\(name): gradient of input \(k) differs from finite differences by \(error)")
        }
    }
}

/// A parity fixture written by tools/make_layer_fixtures.py.
struct LayerFixture {
    let file: SafeTensorsFile
    let config: [String: Any]

    init(_ kind: String) throws {
        guard let url = Bundle.module.url(forResource: "Fixtures/layers/\(kind)", withExtension: "safetensors") else {
            throw ConvirtError("fixture \(kind) is missing: run tools/make_layer_fixtures.py")
        }
        file = try SafeTensorsFile(path: url.path)
        let json = file.metadata["config"] ?? "{}"
        config = (try JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any] ?? [:]
    }

    func f(_ name: String) throws -> Tensor<Float> { try file.floats(name) }
    func ids(_ name: String) throws -> Tensor<Int32> { try file.int32s(name) }
    func int(_ key: String) -> Int { (config[key] as? NSNumber)?.intValue ?? 0 }
    func float(_ key: String) -> Float { (config[key] as? NSNumber)?.floatValue ?? 0 }
    func double(_ key: String) -> Double { (config[key] as? NSNumber)?.doubleValue ?? 0 }

    /// The objective's weights as the output gradient.
    func outputWeights() throws -> Tensor<Float> { try f("input.output_weights") }

    func expectClose(_ actual: Tensor<Float>, _ name: String, tolerance: Double, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = try f(name)
        #expect(actual.shape == expected.shape, "\(name): shape \(actual.shape) vs \(expected.shape)", sourceLocation: sourceLocation)
        let error = relativeError(actual.scalars, expected.scalars)
        #expect(error <= tolerance, "\(name): max relative error \(error)", sourceLocation: sourceLocation)
    }
}
