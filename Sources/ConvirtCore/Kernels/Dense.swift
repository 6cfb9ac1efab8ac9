// Linear, layer norm and embedding lookup: the row-wise layers of BERT and of the projection heads.

import CKernels
import RealModule

public enum Linear {
    /// bf16 copies a layer keeps from its forward for its backward (oneDNN's bf16 products only): the
    /// input (which layers reading the same input may share: `reuseInput`), the weights, and a room for the
    /// output gradient (any number of layers may share it: it is converted once per backward).
    public struct Copies {
        public let input, weight, gradOutput: BF16Operand
        /// Whether the forward takes `input`'s copy as it is (another layer converted the same input first).
        public let reuseInput: Bool
        /// Whether the backward takes `gradOutput`'s copy as it is (the layer after wrote it).
        public let reuseGradOutput: Bool
        /// The weights' version where they are frozen (`ParameterArena.frozenVersion`): the forward takes
        /// the weights' copy as it is where it was made at this version. nil: converted at every forward.
        public let weightVersion: UInt64?
        public init(input: BF16Operand, weight: BF16Operand, gradOutput: BF16Operand, reuseInput: Bool = false, reuseGradOutput: Bool = false,
                    weightVersion: UInt64? = nil) {
            self.input = input; self.weight = weight; self.gradOutput = gradOutput; self.reuseInput = reuseInput
            self.reuseGradOutput = reuseGradOutput; self.weightVersion = weightVersion
        }
        /// These copies, the input's taken as it is where `reuse` (the layer before wrote it: `BF16Operand.room`).
        public func reusingInput(_ reuse: Bool) -> Copies {
            Copies(input: input, weight: weight, gradOutput: gradOutput, reuseInput: reuseInput || reuse, reuseGradOutput: reuseGradOutput,
                   weightVersion: weightVersion)
        }
        /// These copies, the output gradient's taken as it is where `reuse` (the layer after wrote it:
        /// `BF16Operand.room`, e.g. `GELU.backwardBF16`).
        public func reusingGradOutput(_ reuse: Bool) -> Copies {
            Copies(input: input, weight: weight, gradOutput: gradOutput, reuseInput: reuseInput, reuseGradOutput: reuseGradOutput || reuse,
                   weightVersion: weightVersion)
        }
        /// These copies, the weights' kept while their version is `version` (frozen weights), or
        /// converted at every forward (nil).
        public func keepingWeights(at version: UInt64?) -> Copies {
            Copies(input: input, weight: weight, gradOutput: gradOutput, reuseInput: reuseInput, reuseGradOutput: reuseGradOutput,
                   weightVersion: version)
        }
    }

    /// output[r, o] = sum_i input[r, i] * weight[o, i] + bias[o]  (torch.nn.Linear's weight layout)
    /// - output: [rows, out]; input: [rows, in]; weight: [out, in]; bias: [out] or nil
    /// - precision: bf16 rounds input and weight to bf16 and accumulates in fp32 (the bias adds in fp32).
    /// - copies: where the bf16 input and weights are kept for `backward` (which must then follow before
    ///   either changes).
    public static func forward(output: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                               weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               rows: Int, inFeatures: Int, outFeatures: Int, precision: Precision = .fp32, copies: Copies? = nil) {
        gemm(precision, Product(m: rows, n: outFeatures, k: inFeatures, transposeB: true),
            a: Matrix(input, ld: inFeatures), b: Matrix(weight, ld: inFeatures), c: MutableMatrix(output, ld: outFeatures), bias: bias,
             copies: (copies.map { .init($0.input, reuse: $0.reuseInput) }, copies.map { .init($0.weight, reuse: false, version: $0.weightVersion) }))
    }

    /// outputBF16 = GELU(input weight^T + bias) in bf16 on oneDNN's bf16 kernels, the GELU a post-op of
    /// the product (`productBF16`): a frozen layer's activations, which only the next product reads.
    /// False where the products are not on oneDNN's bf16 kernels, or it has none for the shape; nothing is
    /// written then, and `forward` with `GELU.forwardBF16` computes them.
    public static func forwardGELU(outputBF16: UnsafeMutablePointer<UInt16>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                                   bias: UnsafePointer<Float>?, rows: Int, inFeatures: Int, outFeatures: Int, copies: Copies) -> Bool {
        bf16Output(outputBF16, input: input, weight: weight, bias: bias, rows: rows, inFeatures: inFeatures, outFeatures: outFeatures,
                   gelu: true, copies: copies)
    }

    /// outputBF16 = input weight^T + bias in bf16 on oneDNN's bf16 kernels, each fp32 sum (the bias added
    /// in fp32) rounded once: the bits `forward`'s floats round to, for a layer whose output only bf16
    /// readers take (`productBF16`). False, with nothing written, where `forward` must run instead.
    public static func forwardBF16(outputBF16: UnsafeMutablePointer<UInt16>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                                   bias: UnsafePointer<Float>?, rows: Int, inFeatures: Int, outFeatures: Int, copies: Copies) -> Bool {
        bf16Output(outputBF16, input: input, weight: weight, bias: bias, rows: rows, inFeatures: inFeatures, outFeatures: outFeatures,
                   gelu: false, copies: copies)
    }

    private static func bf16Output(_ outputBF16: UnsafeMutablePointer<UInt16>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                                   bias: UnsafePointer<Float>?, rows: Int, inFeatures: Int, outFeatures: Int, gelu: Bool, copies: Copies) -> Bool {
        productBF16(Product(m: rows, n: outFeatures, k: inFeatures, transposeB: true), a: Matrix(input, ld: inFeatures),
                    b: Matrix(weight, ld: inFeatures), c: outputBF16, bias: bias, gelu: gelu,
                    copies: (.init(copies.input, reuse: copies.reuseInput), .init(copies.weight, reuse: false, version: copies.weightVersion)))
    }

    /// gradInput += gradOutput * weight (= where `accumulateInput` is false); gradWeight += gradOutput^T * input
    /// (= where `overwriteWeight`: its zeros claimed, `ParameterArena.claimZeroedGradient`);
    /// gradBias += column sums. gradInput, gradWeight and gradBias may each be nil when not needed (frozen
    /// weights, first layer). In bf16 both products take bf16-rounded inputs (the output gradient too) and
    /// accumulate in fp32, and the bias gradient sums the output gradient's bf16 values too (as autocast's
    /// bf16 output gradient), in fp32: the bits of its copy where one holds them (a layer after that
    /// wrote only those bits, `Copies.reuseGradOutput`, leaves `gradOutput` unwritten), else the floats
    /// rounded.
    /// `pieces` (bf16): the gradient pieces of the rows (`GradientPieces`: each piece a run of whole
    /// samples' rows); the weight and bias gradients, sums over the rows, are then made of those pieces,
    /// each computed alone and added in order. nil: one piece.
    /// `gradInputBF16` (bf16, overwriting): the input gradient as bf16 bits instead of gradInput, written by
    /// the product on oneDNN's bf16 kernels (each fp32 sum rounded once; elsewhere the floats are computed
    /// in temporary memory and rounded).
    public static func backward(gradInput: UnsafeMutablePointer<Float>?, gradInputBF16: UnsafeMutablePointer<UInt16>? = nil,
                                gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, gradOutput: UnsafePointer<Float>,
                                input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                                rows: Int, inFeatures: Int, outFeatures: Int, precision: Precision = .fp32, accumulateInput: Bool = true,
                                overwriteWeight: Bool = false, copies: Copies? = nil, pieces: RowPieces? = nil) {
        // The output gradient converted by the first product (or by the layer after), reused by the second.
        var gradOutputConverted = copies?.reuseGradOutput ?? false
        func gradOutputCopy() -> BF16Operand.Use? {
            defer { gradOutputConverted = true }
            return copies.map { .init($0.gradOutput, reuse: gradOutputConverted) }
        }
        if let gradInputBF16 {
            precondition(precision == .bf16 && !accumulateInput && gradInput == nil, "linear backward: bf16 input gradient of an fp32 pass, or added to")
            let p = Product(m: rows, n: inFeatures, k: outFeatures)
            let operands = (copies.map { BF16Operand.Use($0.gradOutput, reuse: gradOutputConverted) }, copies.map { BF16Operand.Use($0.weight, reuse: true) })
            if !productBF16(p, a: Matrix(gradOutput, ld: outFeatures), b: Matrix(weight, ld: inFeatures), c: gradInputBF16, bias: nil, gelu: false,
                            copies: operands) {
                // No bf16 destination for this product: its floats in temporary memory, then their bits.
                let floats = UnsafeMutablePointer<Float>.allocate(capacity: rows * inFeatures)
                defer { floats.deallocate() }
                gemm(precision, p, a: Matrix(gradOutput, ld: outFeatures), b: Matrix(weight, ld: inFeatures), c: MutableMatrix(floats, ld: inFeatures),
                     copies: operands)
                BF16.bits(gradInputBF16, floats, count: rows * inFeatures)
            }
            gradOutputConverted = copies != nil
        } else if let gradInput {
            gemm(precision, Product(m: rows, n: inFeatures, k: outFeatures, beta: accumulateInput ? 1 : 0),
                a: Matrix(gradOutput, ld: outFeatures), b: Matrix(weight, ld: inFeatures), c: MutableMatrix(gradInput, ld: inFeatures),
                 copies: (gradOutputCopy(), copies.map { .init($0.weight, reuse: true) }))
        }
        // In bf16 the sums over the rows are made of pieces (one piece where `pieces` is nil).
        precondition(pieces == nil || pieces!.rows == rows, "linear backward: \(rows) rows in \(pieces!)")
        let pieces = precision == .bf16 ? pieces ?? RowPieces(bounds: rows > 0 ? [0, rows] : [0]) : nil
        if let gradWeight {
            if let pieces {
                piecewiseGradientProduct(m: outFeatures, n: inFeatures, pieces: pieces, a: Matrix(gradOutput, ld: outFeatures),
                                         b: Matrix(input, ld: inFeatures), c: MutableMatrix(gradWeight, ld: inFeatures), overwrite: overwriteWeight,
                                         copies: (gradOutputCopy(), copies.map { .init($0.input, reuse: true) }))
            } else {
                gemm(precision, Product(m: outFeatures, n: inFeatures, k: rows, transposeA: true, beta: overwriteWeight ? 0 : 1),
                    a: Matrix(gradOutput, ld: outFeatures), b: Matrix(input, ld: inFeatures), c: MutableMatrix(gradWeight, ld: inFeatures),
                     copies: (gradOutputCopy(), copies.map { .init($0.input, reuse: true) }))
            }
        }
        if let gradBias {
            let bits = precision == .bf16
                ? copies.flatMap { $0.gradOutput.heldBits(of: gradOutput, rows: rows, columns: outFeatures, ld: outFeatures) } : nil
            let values: RowValues = bits.map { .bf16($0) } ?? .fp32(gradOutput)
            let rounding = precision == .bf16
            if let pieces {
                columnSums(gradBias, values, rounding: rounding, columns: outFeatures, pieces: pieces)
            } else {
                // Each column summed in row order (`ck_column_sums`), the columns split over the threads.
                Parallel.chunks(outFeatures, cost: rows) { columns in
                    ck_column_sums(gradBias, values.floats, values.halves, rounding ? 1 : 0, rows, outFeatures, columns.lowerBound, columns.upperBound)
                }
            }
        }
    }

    /// sum[c] += the column sums of x [rows, columns] made of `pieces` of its rows: each piece's
    /// columns summed in row order from zero (`ck_column_sums`), the pieces then added in order. x is
    /// read from its floats (rounded to bf16 first where `rounding`) or its bf16 bits.
    static func columnSums(_ sum: UnsafeMutablePointer<Float>, _ x: RowValues, rounding: Bool = false, columns: Int, pieces: RowPieces) {
        Parallel.chunks(columns, cost: pieces.rows) { range in
            // The chunk's columns from its first: piece[j] is column range.lowerBound + j's.
            withUnsafeTemporaryAllocation(of: Float.self, capacity: range.count) { buffer in
                let piece = buffer.baseAddress!
                for rows in pieces.ranges {
                    buffer.update(repeating: 0)
                    let block = x.advanced(by: rows.lowerBound * columns + range.lowerBound)
                    ck_column_sums(piece, block.floats, block.halves, rounding ? 1 : 0, rows.count, columns, 0, range.count)
                    ck_add(sum + range.lowerBound, piece, range.count)
                }
            }
        }
    }
}

public enum LayerNorm {
    /// output[r] = (x[r] - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance).
    /// mean and invStd ([rows]) are kept for the backward pass.
    public static func forward(output: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>,
                               invStd: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                               gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>,
                               rows: Int, features: Int, eps: Float = 1e-12) {
        // Each row's sums in 16 float lanes (`ck_layernorm_rows`), so they run at the vector units' rate.
        Parallel.chunks(rows, cost: 4 * features) { range in
            let r = range.lowerBound
            ck_layernorm_rows(output + r * features, mean + r, invStd + r, input + r * features, gamma, beta, range.count, features, eps)
        }
    }

    /// A post-LN transformer's residual end in one pass over each row: sum = dropout(dense) + residual,
    /// output = LayerNorm(sum) (mean and invStd kept as `forward` keeps them), and output's bf16 bits
    /// into `outputBF16` where given (for the linear layer that reads it on oneDNN's bf16 kernels). The
    /// same bits as `Dropout.forward` on dense (in place), `Residual.forward` and `forward` in turn, with
    /// two fewer passes over memory. `dropout`: the probability and each sample's stream (and which rows
    /// are the sample's), nil for none. sum, dense: [rows, features], distinct; sum nil: not kept (a
    /// pass without backward).
    public static func forwardResidual(sum: UnsafeMutablePointer<Float>?, output: UnsafeMutablePointer<Float>, outputBF16: UnsafeMutablePointer<UInt16>?,
                                       mean: UnsafeMutablePointer<Float>, invStd: UnsafeMutablePointer<Float>, dense: UnsafePointer<Float>,
                                       residual: UnsafePointer<Float>, gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>, rows: Int,
                                       features: Int, eps: Float = 1e-12,
                                       dropout: (probability: Float, streams: [RandomStream], rows: TokenRows)? = nil) {
        sampleRuns(rows: rows, features: features, dropout: dropout) { r, n, d in
            let o = r * features
            ck_residual_layernorm_rows(sum.map { $0 + o }, output + o, outputBF16.map { $0 + o }, mean + r, invStd + r, dense + o, residual + o, gamma, beta,
                                       n, features, eps, d.on, d.first, d.seed, d.stream, d.limit, d.scale)
        }
    }

    /// One run of a sample's rows and its dropout (`on` 0: none), as the C kernels take it.
    struct DropoutRun { let on: Int32, first: Int, seed: UInt64, stream: UInt64, limit: UInt32, scale: Float }

    /// Calls `body(row, count, dropout)` for runs of rows split over the threads, each of one sample's
    /// consecutive positions (`TokenRows.runs`: one stream per sample) or of rows of no sample (no
    /// dropout), `first` the run's first element in the sample's stream (its position times the features).
    private static func sampleRuns(rows: Int, features: Int, dropout: (probability: Float, streams: [RandomStream], rows: TokenRows)?,
                                   _ body: (Int, Int, DropoutRun) -> Void) {
        let p = dropout?.probability ?? 0
        precondition(p >= 0 && p < 1, "dropout probability must be in [0, 1)")
        let scale = p > 0 ? 1 / (1 - p) : 1, limit = Dropout.threshold(p)
        Parallel.chunks(rows, cost: 8 * features) { range in
            guard let dropout, p > 0 else {
                body(range.lowerBound, range.count, DropoutRun(on: 0, first: 0, seed: 0, stream: 0, limit: limit, scale: scale))
                return
            }
            dropout.rows.runs(in: range) { r, end, sample, position in
                guard let sample else {
                    body(r, end - r, DropoutRun(on: 0, first: 0, seed: 0, stream: 0, limit: limit, scale: scale))
                    return
                }
                let stream = dropout.streams[sample]
                body(r, end - r, DropoutRun(on: 1, first: position * features, seed: stream.seed, stream: stream.streamID, limit: limit, scale: scale))
            }
        }
    }

    /// The backward of `forwardResidual` in one pass over each row: LayerNorm's input gradient g (the
    /// bits `backward` adds to zeros) into `gradResidual` (added to it where `accumulateResidual`; nil:
    /// the residual needs none), and dropout(g) into `gradDense` (the same mask as the forward's, from the
    /// same streams: the bits of `Dropout.forward` on g); the parameter gradients as `backward`'s.
    /// `gradDenseBF16`: that gradient's bf16 bits (for the dense layer's bf16 products and bias), in which
    /// case `gradDense` may be nil (no floats written).
    public static func backwardResidual(gradResidual: UnsafeMutablePointer<Float>?, accumulateResidual: Bool, gradDense: UnsafeMutablePointer<Float>?,
                                        gradDenseBF16: UnsafeMutablePointer<UInt16>? = nil,
                                        gradGamma: UnsafeMutablePointer<Float>?, gradBeta: UnsafeMutablePointer<Float>?,
                                        gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
                                        mean: UnsafePointer<Float>, invStd: UnsafePointer<Float>, rows: Int, features: Int, pieces: RowPieces? = nil,
                                        dropout: (probability: Float, streams: [RandomStream], rows: TokenRows)? = nil) {
        precondition(gradDense != nil || gradDenseBF16 != nil, "layer norm backward: no dense gradient")
        sampleRuns(rows: rows, features: features, dropout: dropout) { r, n, d in
            let o = r * features
            ck_layernorm_backward_residual_rows(gradResidual.map { $0 + o }, accumulateResidual ? 1 : 0, gradDense.map { $0 + o },
                                                gradDenseBF16.map { $0 + o }, gradOutput + o, input + o,
                                                gamma, mean + r, invStd + r, n, features, d.on, d.first, d.seed, d.stream, d.limit, d.scale)
        }
        parameterGradients(gradGamma: gradGamma, gradBeta: gradBeta, gradOutput: gradOutput, input: input, mean: mean, invStd: invStd, rows: rows,
                           features: features, pieces: pieces)
    }

    /// dx = invStd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = dy * gamma;
    /// gradGamma += sum_r dy * xhat; gradBeta += sum_r dy. gradGamma/gradBeta may be nil (frozen).
    /// `pieces`: the parameter gradients, sums over the rows, made of those pieces of the rows
    /// (`GradientPieces`), each summed from zero and added in order; nil: the rows added to the gradients
    /// one by one.
    public static func backward(gradInput: UnsafeMutablePointer<Float>, gradGamma: UnsafeMutablePointer<Float>?,
                                gradBeta: UnsafeMutablePointer<Float>?, gradOutput: UnsafePointer<Float>,
                                input: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
                                mean: UnsafePointer<Float>, invStd: UnsafePointer<Float>, rows: Int, features: Int, pieces: RowPieces? = nil) {
        // Each row's two sums in 16 float lanes (`ck_layernorm_backward_rows`), as the forward's.
        Parallel.chunks(rows, cost: 6 * features) { range in
            let r = range.lowerBound, o = r * features
            ck_layernorm_backward_rows(gradInput + o, gradOutput + o, input + o, gamma, mean + r, invStd + r, range.count, features)
        }
        parameterGradients(gradGamma: gradGamma, gradBeta: gradBeta, gradOutput: gradOutput, input: input, mean: mean, invStd: invStd, rows: rows,
                           features: features, pieces: pieces)
    }

    /// gamma's and beta's gradients (nil: frozen) from `backward`'s rows.
    private static func parameterGradients(gradGamma: UnsafeMutablePointer<Float>?, gradBeta: UnsafeMutablePointer<Float>?,
                                           gradOutput: UnsafePointer<Float>, input: UnsafePointer<Float>, mean: UnsafePointer<Float>,
                                           invStd: UnsafePointer<Float>, rows: Int, features: Int, pieces: RowPieces?) {
        // Parameter gradients sum over rows: split by features so each column is summed in row order.
        // (`ck_layernorm_param_grads`: gamma += dy * (x - mean) * invStd and beta += dy, row by row.)
        guard let gradGamma, let gradBeta else { return }
        guard let pieces else {
            Parallel.chunks(features, cost: 3 * rows) { columns in
                ck_layernorm_param_grads(gradGamma, gradBeta, gradOutput, input, mean, invStd, rows, features, columns.lowerBound, columns.upperBound)
            }
            return
        }
        precondition(pieces.rows == rows, "layer norm backward: \(rows) rows in \(pieces)")
        Parallel.chunks(features, cost: 3 * rows) { columns in
            // The chunk's features from its first: pieceGamma[j] is feature columns.lowerBound + j's.
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * columns.count) { buffer in
                let pieceGamma = buffer.baseAddress!, pieceBeta = pieceGamma + columns.count
                for piece in pieces.ranges {
                    buffer.update(repeating: 0)
                    let first = piece.lowerBound, o = first * features + columns.lowerBound
                    ck_layernorm_param_grads(pieceGamma, pieceBeta, gradOutput + o, input + o, mean + first, invStd + first, piece.count, features,
                                             0, columns.count)
                    ck_add(gradGamma + columns.lowerBound, pieceGamma, columns.count)
                    ck_add(gradBeta + columns.lowerBound, pieceBeta, columns.count)
                }
            }
        }
    }
}

public enum Embedding {
    /// output[r] = table[ids[r]]. output: [rows, features]; table: [vocabulary, features]; ids: [rows],
    /// each in 0..<vocabulary (checked by the caller at the boundary).
    public static func forward(output: UnsafeMutablePointer<Float>, table: UnsafePointer<Float>,
                               ids: UnsafePointer<Int32>, rows: Int, features: Int) {
        for r in 0..<rows { (output + r * features).update(from: table + Int(ids[r]) * features, count: features) }
    }

    /// Scatter-add: gradTable[ids[r]] += gradOutput[r]; repeated ids accumulate. Rows whose id is
    /// `paddingIndex` contribute nothing (nn.Embedding's padding_idx).
    public static func backward(gradTable: UnsafeMutablePointer<Float>, gradOutput: UnsafePointer<Float>,
                                ids: UnsafePointer<Int32>, rows: Int, features: Int, paddingIndex: Int32? = nil) {
        for r in 0..<rows where ids[r] != paddingIndex {
            let dst = gradTable + Int(ids[r]) * features, src = gradOutput + r * features
            for i in 0..<features { dst[i] += src[i] }
        }
    }
}
