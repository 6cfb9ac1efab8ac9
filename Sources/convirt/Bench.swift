// `convirt bench kernels`: GFLOP/s of the convolution, linear and attention kernels at ResNet-50 and
// BERT-base shapes, next to plain sgemm on the same product in the same run.

import ArgumentParser
import ConvirtCore
import Foundation

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Benchmarks that print figures.", subcommands: [Kernels.self, BenchStep.self, BenchData.self, BenchCheckpoint.self, BenchExchange.self])
}

/// Seconds per call: the median of `repeats` timed runs after one warm-up, each run long enough to time.
func measure(repeats: Int = 5, minimumSeconds: Double = 0.05, _ body: () -> Void) -> Double {
    body()
    var samples: [Double] = []
    for _ in 0..<repeats {
        var calls = 0
        let start = DispatchTime.now().uptimeNanoseconds
        var elapsed = 0.0
        repeat {
            body()
            calls += 1
            elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        } while elapsed < minimumSeconds
        samples.append(elapsed / Double(calls))
    }
    return samples.sorted()[samples.count / 2]
}

/// An uninitialised-then-filled Float buffer that lives for the benchmark.
final class Buffer {
    let pointer: UnsafeMutablePointer<Float>
    let count: Int
    init(_ count: Int, seed: UInt64 = 1) {
        self.count = max(count, 1)
        pointer = .allocate(capacity: self.count)
        let stream = RandomStream(seed: seed)
        for i in 0..<self.count { pointer[i] = stream.uniform(at: UInt64(i)) - 0.5 }
    }
    deinit { pointer.deallocate() }
}

struct Kernels: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "GFLOP/s of conv2d, linear and attention vs plain sgemm on the same shapes.")

    @Option(parsing: .unconditional, help: "OpenBLAS threads (the target is single-threaded).")
    var threads = 1

    @Option(parsing: .unconditional, help: "Images per convolution call.")
    var batch = 2

    @Flag(help: "Fewer, shorter repetitions (for a smoke run).")
    var quick = false

    @Flag(help: "Name the oneDNN kernels used.")
    var verbose = false

    func run() throws {
        Parallel.setThreads(threads)
        let repeats = quick ? 1 : 5
        print("convirt bench kernels: \(Parallel.threads) thread(s), \(BLASThreads.configuration), core \(BLASCore.current) (\(BLASCore.origin))")
        let peakN = 1024
        let a = Buffer(peakN * peakN), b = Buffer(peakN * peakN, seed: 2), c = Buffer(peakN * peakN, seed: 3)
        let peak = measure(repeats: repeats) {
            sgemm(Product(m: peakN, n: peakN, k: peakN),
                a: Matrix(a.pointer, ld: peakN), b: Matrix(b.pointer, ld: peakN), c: MutableMatrix(c.pointer, ld: peakN))
        }
        let peakRate = 2 * pow(Double(peakN), 3) / peak / 1e9
        print(String(format: "sgemm 1024x1024x1024: %.1f GFLOP/s", peakRate))
        let bf16 = measure(repeats: repeats) {
            gemm(.bf16, Product(m: peakN, n: peakN, k: peakN),
                a: Matrix(a.pointer, ld: peakN), b: Matrix(b.pointer, ld: peakN), c: MutableMatrix(c.pointer, ld: peakN))
        }
        print(String(format: "bf16 gemm 1024x1024x1024: %.1f GFLOP/s (%@)\n", 2 * pow(Double(peakN), 3) / bf16 / 1e9, BF16.backend as NSString))

        print("oneDNN \(DNNL.version), ISA \(DNNL.isa), OpenMP wait policy \(BLASCore.openMPWaitPolicy)")
        print("conv2d (NCHW, batch \(batch))".padding(toLength: 30, withPad: " ", startingAt: 0)
              + "   fwd GFLOP/s (sgemm) ratio |    bwd GFLOP/s (sgemm) ratio | oneDNN fp32 fwd, bwd GFLOP/s | bf16 fwd, bwd")
        let shapes: [(String, Int, Int, Int, Int, Int, Int)] = [
            ("stem 7x7/2 3->64 @224", 3, 224, 64, 7, 2, 3),
            ("3x3 64->64 @56", 64, 56, 64, 3, 1, 1),
            ("1x1 256->64 @56", 256, 56, 64, 1, 1, 0),
            ("1x1 64->256 @56", 64, 56, 256, 1, 1, 0),
            ("3x3/2 128->128 @56", 128, 56, 128, 3, 2, 1),
            ("1x1 1024->256 @14", 1024, 14, 256, 1, 1, 0),
            ("3x3 512->512 @7", 512, 7, 512, 3, 1, 1),
        ]
        for (name, cin, size, cout, k, s, p) in shapes {
            let g = try Conv2dGeometry(batch: batch, inChannels: cin, height: size, width: size, outChannels: cout, kernel: k, stride: s, padding: p)
            try benchConv(name, g, repeats: repeats)
        }

        print("\n" + "linear (BERT-base)".padding(toLength: 30, withPad: " ", startingAt: 0) + "   fwd GFLOP/s (sgemm) ratio |    bwd GFLOP/s (sgemm) ratio")
        for (name, rows, inF, outF) in [("128x768 . 768x3072", 128, 768, 3072), ("128x3072 . 3072x768", 128, 3072, 768), ("128x768 . 768x768", 128, 768, 768)] {
            benchLinear(name, rows: rows, inF: inF, outF: outF, repeats: repeats)
        }

        print("\nattention (BERT-base, 128 tokens, 28 of them padding)")
        let ag = try AttentionGeometry(batch: batch, tokens: 128, heads: 12, headSize: 64)
        let n = batch * 128 * 768
        let q = Buffer(n), k = Buffer(n, seed: 4), v = Buffer(n, seed: 5), out = Buffer(n, seed: 6)
        let probs = Buffer(ag.probabilitiesCount), ws = Buffer(ag.workspaceCount)
        let dq = Buffer(n), dk = Buffer(n), dv = Buffer(n)
        var mask = [Int32](repeating: 1, count: batch * 128)
        for b in 0..<batch { for i in 100..<128 { mask[b * 128 + i] = 0 } }
        for precision in [Precision.fp32, .bf16] {
            let fwd = measure(repeats: repeats) {
                Attention.forward(output: out.pointer, probabilities: probs.pointer, q: q.pointer, k: k.pointer, v: v.pointer, mask: mask, geometry: ag,
                                  precision: precision)
            }
            let bwd = measure(repeats: repeats) {
                Attention.backward(gradQ: dq.pointer, gradK: dk.pointer, gradV: dv.pointer, gradOutput: out.pointer, probabilities: probs.pointer,
                                   q: q.pointer, k: k.pointer, v: v.pointer, geometry: ag, workspace: ws.pointer, precision: precision)
            }
            print(String(format: "%@ batch %d x 12 heads x 128 tokens x 64: fwd %.2f ms (%.1f GFLOP/s), bwd %.2f ms (%.1f GFLOP/s)",
                         precision.rawValue, batch, fwd * 1e3, ag.forwardFLOPs / fwd / 1e9, bwd * 1e3, 2 * ag.forwardFLOPs / bwd / 1e9))
        }
    }

    func benchConv(_ name: String, _ g: Conv2dGeometry, repeats: Int) throws {
        let x = Buffer(g.inputShape.reduce(1, *)), w = Buffer(g.weightShape.reduce(1, *), seed: 2)
        let y = Buffer(g.outputShape.reduce(1, *), seed: 3), ws = Buffer(g.workspaceCount, seed: 4)
        let dx = Buffer(g.inputShape.reduce(1, *), seed: 5), dw = Buffer(g.weightShape.reduce(1, *), seed: 6)
        let forward = measure(repeats: repeats) {
            Conv2d.forward(output: y.pointer, input: x.pointer, weight: w.pointer, bias: nil, geometry: g, workspace: ws.pointer)
        }
        let backward = measure(repeats: repeats) {
            Conv2d.backward(gradInput: dx.pointer, gradWeight: dw.pointer, gradBias: nil, gradOutput: y.pointer, input: x.pointer,
                            weight: w.pointer, geometry: g, workspace: ws.pointer)
        }
        // The same products as plain sgemm on ready-made matrices: forward W[O,K] . col[K,P] per image;
        // backward dY[O,P] . col^T and W^T . dY per image.
        let (m, n, k) = (g.outChannels, g.outPlane, g.patchSize)
        let colA = Buffer(k * n, seed: 7), outA = Buffer(m * n, seed: 8), wGrad = Buffer(m * k, seed: 9), colGrad = Buffer(k * n, seed: 10)
        let gemmForward = measure(repeats: repeats) {
            for _ in 0..<g.batch {
                sgemm(Product(m: m, n: n, k: k),
                    a: Matrix(w.pointer, ld: k), b: Matrix(colA.pointer, ld: n), c: MutableMatrix(outA.pointer, ld: n))
            }
        }
        let gemmBackward = measure(repeats: repeats) {
            for _ in 0..<g.batch {
                sgemm(Product(m: m, n: k, k: n, transposeB: true, beta: 1),
                    a: Matrix(outA.pointer, ld: n), b: Matrix(colA.pointer, ld: n), c: MutableMatrix(wGrad.pointer, ld: k))
                sgemm(Product(m: k, n: n, k: m, transposeA: true),
                    a: Matrix(w.pointer, ld: k), b: Matrix(outA.pointer, ld: n), c: MutableMatrix(colGrad.pointer, ld: n))
            }
        }
        let flops = g.forwardFLOPs
        // The same convolution on oneDNN (its layouts chosen by oneDNN, reorders from and to NCHW included).
        func dnnl(_ precision: Precision) -> String {
            let primitives: ConvolutionPrimitives
            do { primitives = try ConvolutionPrimitives(geometry: g, precision: precision) } catch {
                return verbose ? "\(error)" : "unsupported"
            }
            let f = measure(repeats: repeats) { try! primitives.forward(output: y.pointer, input: x.pointer, weight: w.pointer) }
            let b = measure(repeats: repeats) {
                try! primitives.backward(gradInput: dx.pointer, gradWeight: dw.pointer, gradBias: nil, gradOutput: y.pointer, input: x.pointer, weight: w.pointer)
            }
            return String(format: "%6.1f %6.1f", flops / f / 1e9, 2 * flops / b / 1e9) + (verbose ? " [\(primitives.implementations)]" : "")
        }
        print(String(format: "%@  %8.1f ms %6.1f  (%6.1f)  %4.0f%% | %8.1f ms %6.1f  (%6.1f)  %4.0f%% | %@ | %@",
                     name.padding(toLength: 28, withPad: " ", startingAt: 0) as NSString, forward * 1e3, flops / forward / 1e9, flops / gemmForward / 1e9, 100 * gemmForward / forward,
                     backward * 1e3, 2 * flops / backward / 1e9, 2 * flops / gemmBackward / 1e9, 100 * gemmBackward / backward,
                     dnnl(.fp32) as NSString, dnnl(.bf16) as NSString))
    }

    func benchLinear(_ name: String, rows: Int, inF: Int, outF: Int, repeats: Int) {
        let x = Buffer(rows * inF), w = Buffer(outF * inF, seed: 2), b = Buffer(outF, seed: 3), y = Buffer(rows * outF, seed: 4)
        let dx = Buffer(rows * inF, seed: 5), dw = Buffer(outF * inF, seed: 6), db = Buffer(outF, seed: 7)
        let flops = 2 * Double(rows * inF * outF)
        let forward = measure(repeats: repeats) {
            Linear.forward(output: y.pointer, input: x.pointer, weight: w.pointer, bias: b.pointer, rows: rows, inFeatures: inF, outFeatures: outF)
        }
        let backward = measure(repeats: repeats) {
            Linear.backward(gradInput: dx.pointer, gradWeight: dw.pointer, gradBias: db.pointer, gradOutput: y.pointer, input: x.pointer,
                            weight: w.pointer, rows: rows, inFeatures: inF, outFeatures: outF)
        }
        let gemm = measure(repeats: repeats) {
            sgemm(Product(m: rows, n: outF, k: inF, transposeB: true),
                a: Matrix(x.pointer, ld: inF), b: Matrix(w.pointer, ld: inF), c: MutableMatrix(y.pointer, ld: outF))
        }
        print(String(format: "%@  %8.2f ms %6.1f  (%6.1f)  %4.0f%% | %8.2f ms %6.1f  (%6.1f)  %4.0f%%",
                     name.padding(toLength: 28, withPad: " ", startingAt: 0) as NSString, forward * 1e3, flops / forward / 1e9, flops / gemm / 1e9, 100 * gemm / forward,
                     backward * 1e3, 2 * flops / backward / 1e9, flops / gemm / 1e9, 100 * 2 * gemm / backward))
    }
}
