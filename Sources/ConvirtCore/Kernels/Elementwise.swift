// Pointwise layers: ReLU, GELU (erf form, as BERT), residual add, dropout.

import CKernels

public enum ReLU {
    /// output = max(input, 0); output may alias input. [count]
    public static func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count) { r in for i in r { output[i] = max(input[i], 0) } }
    }

    /// gradInput += gradOutput where output > 0. Takes the forward output, so the input need not be kept.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                output: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count) { r in for i in r { let g = gradOutput[i]; gradInput[i] += output[i] > 0 ? g : 0 } }
    }

    /// In place: gradient = 0 where output <= 0 (the backward of an in-place ReLU).
    public static func maskGradient(_ gradient: UnsafeMutablePointer<Float>, output: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count) { r in for i in r { let g = gradient[i]; gradient[i] = output[i] > 0 ? g : 0 } }
    }
}

public enum GELU {
    /// output = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt 2)), BERT's exact GELU (Phi to 3e-7, see
    /// `VectorMath`). [count]
    public static func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
        // ck_gelu_forward: the loop below, vectorized for this CPU's ISA (equal bits).
        Parallel.chunks(count, cost: 20) { r in ck_gelu_forward(output + r.lowerBound, input + r.lowerBound, r.count) }
    }

    /// The bf16 bits of `forward`'s outputs only (for the linear layer after it on oneDNN's bf16
    /// kernels, where nothing else reads the floats: GELU's backward reads its input).
    public static func forwardBF16(output: UnsafeMutablePointer<UInt16>, input: UnsafePointer<Float>, count: Int) {
        forwardBF16(output: output, input: .fp32(input), count: count)
    }

    /// `forwardBF16` of an input read from its floats or its bf16 bits.
    public static func forwardBF16(output: UnsafeMutablePointer<UInt16>, input: RowValues, count: Int) {
        Parallel.chunks(count, cost: 20) { r in
            let x = input.advanced(by: r.lowerBound)
            ck_gelu_forward_bf16(output + r.lowerBound, x.floats, x.halves, r.count)
        }
    }

    /// `forward` as a plain Swift loop (the oracle of the C kernel's bits).
    public static func forwardReference(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
        for i in 0..<count {
            let x = input[i]
            output[i] = x * VectorMath.normalCDFAndDensity(x).cdf
        }
    }

    /// gradInput += gradOutput * (Phi(x) + x * phi(x)) (= where `accumulate` is false).
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                input: UnsafePointer<Float>, count: Int, accumulate: Bool = true) {
        Parallel.chunks(count, cost: 30) { r in
            ck_gelu_backward(gradInput + r.lowerBound, gradOutput + r.lowerBound, input + r.lowerBound, r.count, accumulate ? 1 : 0)
        }
    }

    /// `backward`'s gradient as bf16 bits into `gradInputBF16` (for the linear layer before it, whose
    /// products on oneDNN's bf16 kernels and bias gradient read them), and overwriting gradInput too where
    /// given, in the same pass.
    public static func backwardBF16(gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>,
                                    gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, count: Int) {
        backwardBF16(gradInput: gradInput, gradInputBF16: gradInputBF16, gradOutput: .fp32(gradOutput), input: .fp32(input), count: count)
    }

    /// `backwardBF16` with the output gradient and the input each read from its floats or its bf16 bits.
    public static func backwardBF16(gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>,
                                    gradOutput: RowValues, input: RowValues, count: Int) {
        Parallel.chunks(count, cost: 30) { r in
            let o = r.lowerBound, dy = gradOutput.advanced(by: o), x = input.advanced(by: o)
            ck_gelu_backward_bf16(gradInput.map { $0 + o }, gradInputBF16 + o, dy.floats, dy.halves, x.floats, x.halves, r.count)
        }
    }

    /// `backward` as a plain Swift loop (the oracle of the C kernel's bits).
    public static func backwardReference(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                         input: UnsafePointer<Float>, count: Int, accumulate: Bool = true) {
        for i in 0..<count {
            let x = input[i]
            let (cdf, density) = VectorMath.normalCDFAndDensity(x)
            let g = gradOutput[i] * (cdf + x * density)
            gradInput[i] = accumulate ? gradInput[i] + g : g
        }
    }
}

public enum Residual {
    /// output = a + b; output may alias either input. [count]
    public static func forward(output: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count) { r in for i in r { output[i] = a[i] + b[i] } }
    }

    /// output = max(a + b, 0), a residual block's sum and final ReLU in one pass; output may alias either
    /// input. `outputBF16` (where given) takes the output's bf16 bits too (`BF16.bits`), for the
    /// convolutions that read it in bf16. (`ck_residual_relu`, 16 lanes.)
    public static func forwardReLU(output: UnsafeMutablePointer<Float>, outputBF16: UnsafeMutablePointer<UInt16>? = nil, _ a: UnsafePointer<Float>,
                                   _ b: UnsafePointer<Float>, count: Int) {
        forwardReLU(output: BatchNorm2d.Destination(floats: output, halves: outputBF16), .fp32(a), .fp32(b), rounding: false, count: count)
    }

    /// `forwardReLU` over inputs read from their floats or their bf16 bits, into the output's floats, its
    /// bf16 bits, or both. `rounding` (a bf16 pass's residual stream, bf16 values as autocast keeps it):
    /// float inputs are rounded to bf16 before the sum and the output after, so that a stream kept in
    /// floats holds the values of one kept in bits.
    public static func forwardReLU(output: BatchNorm2d.Destination, _ a: RowValues, _ b: RowValues, rounding: Bool, count: Int) {
        precondition(output.floats != nil || output.halves != nil, "residual sum: no output")
        Parallel.chunks(count) { r in
            let i = r.lowerBound
            ck_residual_relu(output.floats.map { $0 + i }, output.halves.map { $0 + i }, a.floats.map { $0 + i }, a.halves.map { $0 + i },
                             b.floats.map { $0 + i }, b.halves.map { $0 + i }, rounding ? 1 : 0, r.count)
        }
    }

    /// The backward of `forwardReLU` in one pass: g = gradOutput where output > 0 (else 0); gradBranch = g;
    /// gradIdentity = g, or += g with `accumulateIdentity`. Either may be written as g's bf16 bits instead
    /// (`Destination.halves`, where a bf16 layer's backward reads it; the identity's then overwritten).
    /// `gradOutputPart`: the output's gradient comes in two parts, gradOutput + gradOutputPart (added in
    /// that order, the bits of adding the second into the first beforehand). The output and the gradient's
    /// parts are read from their floats or their bf16 bits. `rounding` (a bf16 pass's residual stream):
    /// float parts are rounded to bf16 before the sum and the sum after, so that gradients kept in floats
    /// hold the values of those kept in bits.
    public static func backwardReLU(gradBranch: BatchNorm2d.Destination, gradIdentity: BatchNorm2d.Destination, accumulateIdentity: Bool,
                                    gradOutput: RowValues, gradOutputPart: RowValues? = nil, rounding: Bool = false, output: RowValues,
                                    count: Int) {
        precondition((gradBranch.floats == nil) != (gradBranch.halves == nil) && (gradIdentity.floats == nil) != (gradIdentity.halves == nil)
                     && !(accumulateIdentity && gradIdentity.halves != nil), "residual backward: one copy of each gradient")
        Parallel.chunks(count) { r in
            let i = r.lowerBound
            ck_residual_relu_backward(gradBranch.floats.map { $0 + i }, gradBranch.halves.map { $0 + i }, gradIdentity.floats.map { $0 + i },
                                      gradIdentity.halves.map { $0 + i }, accumulateIdentity ? 1 : 0, gradOutput.floats.map { $0 + i },
                                      gradOutput.halves.map { $0 + i }, gradOutputPart?.floats.map { $0 + i }, gradOutputPart?.halves.map { $0 + i },
                                      rounding ? 1 : 0, output.floats.map { $0 + i }, output.halves.map { $0 + i }, r.count)
        }
    }

    /// target += source (the two apart), 16 lanes wide in C (`ck_add`): the sums of a convolution's
    /// weight-gradient pieces.
    public static func accumulate(_ target: UnsafeMutablePointer<Float>, _ source: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count) { r in ck_add(target + r.lowerBound, source + r.lowerBound, r.count) }
    }

    /// gradA += gradOutput; gradB += gradOutput.
    public static func backward(gradA: UnsafeMutablePointer<Float>, gradB: UnsafeMutablePointer<Float>,
                                gradOutput: UnsafePointer<Float>, count: Int) {
        Parallel.chunks(count) { r in
            for i in r {
                let g = gradOutput[i]
                gradA[i] += g
                gradB[i] += g
            }
        }
    }
}

/// Inverted dropout whose mask is a pure function of a counter-based stream: element i is kept when
/// the stream's i-th uniform draw is >= p, and kept values are scaled by 1/(1-p). The backward pass
/// regenerates the mask from the same stream, so nothing is stored and any rank can reproduce it.
public enum Dropout {
    @inline(__always)
    static func threshold(_ p: Float) -> UInt32 {
        // keep when draw >= p * 2^32
        p >= 1 ? UInt32.max : UInt32(min(Double(p) * 4_294_967_296.0, 4_294_967_295.0))
    }

    /// `first`: the stream's draw of element 0 (element i takes draw first + i).
    public static func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int,
                               probability p: Float, stream: RandomStream, first: Int = 0) {
        precondition(p >= 0 && p < 1, "dropout probability must be in [0, 1)")
        if p == 0 {
            if UnsafePointer(output) != input { output.update(from: input, count: count) }
            return
        }
        let scale = 1 / (1 - p), limit = threshold(p)
        inBlocks(count) { start, end in
            ck_dropout_forward(output - first, input - first, first + start, first + end, stream.seed, stream.streamID, limit, scale)
        }
    }

    /// `forward` on this thread (for use inside a parallel loop).
    public static func serialForward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int,
                                     probability p: Float, stream: RandomStream) {
        let scale = 1 / (1 - p), limit = threshold(p)
        ck_dropout_forward(output, input, 0, count, stream.seed, stream.streamID, limit, scale)
    }

    /// gradInput += gradOutput * mask / (1 - p), with the mask drawn again from `stream`.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>, count: Int,
                                probability p: Float, stream: RandomStream) {
        if p == 0 {
            for i in 0..<count { gradInput[i] += gradOutput[i] }
            return
        }
        let scale = 1 / (1 - p), limit = threshold(p)
        inBlocks(count) { start, end in
            ck_dropout_backward(gradInput, gradOutput, start, end, stream.seed, stream.streamID, limit, scale)
        }
    }

    /// body(start, end) over parallel chunks of 0..<count that start at whole Philox blocks (four
    /// elements each); the draws depend on the index only, so chunking changes nothing. The draws
    /// themselves are `ck_dropout_forward/backward`'s: Philox4x32-10 on 16 lanes in C, vectorized for
    /// this CPU, the blocks of `RandomStream.block`.
    @inline(__always)
    static func inBlocks(_ count: Int, _ body: (Int, Int) -> Void) {
        Parallel.chunks((count + 3) / 4, cost: 16) { range in body(range.lowerBound * 4, min(range.upperBound * 4, count)) }
    }
}
