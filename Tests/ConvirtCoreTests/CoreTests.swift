// The counter-based generator, the arena, the optimizer reference, and clear errors for bad shapes.

#if canImport(Glibc)
import Glibc
#endif
import CKernels
import ConvirtCore
import ConvirtTestSupport
import Testing

@Suite("Counter-based random numbers")
struct RandomTests {
    @Test("Philox4x32-10 known-answer vectors (Random123)")
    func knownAnswers() {
        let zero = philox4x32(counter: (0, 0, 0, 0), key: (0, 0))
        #expect(zero == (0x6627_E8D5, 0xE169_C58D, 0xBC57_AC4C, 0x9B00_DBD8))
        let ones = philox4x32(counter: (.max, .max, .max, .max), key: (.max, .max))
        #expect(ones == (0x408F_276D, 0x41C8_3B0E, 0xA20B_C7C6, 0x6D54_51FD))
        let pi = philox4x32(counter: (0x243F_6A88, 0x85A3_08D3, 0x1319_8A2E, 0x0370_7344), key: (0xA409_3822, 0x299F_31D0))
        #expect(pi == (0xD16C_FE09, 0x94FD_CCEB, 0x5001_E420, 0x2412_6EA1))
    }

    @Test("a draw depends only on (seed, keys, index)")
    func pureFunction() {
        let a = RandomStream(seed: 42, 3, 1_000_001, 7)
        let b = RandomStream(seed: 42, keys: [3, 1_000_001, 7])
        #expect((0..<100).allSatisfy { a.uint32(at: $0) == b.uint32(at: $0) })
        #expect(a.child(9).uint32(at: 5) == RandomStream(seed: 42, 3, 1_000_001, 7, 9).uint32(at: 5))
        #expect(RandomStream(seed: 43, 3, 1_000_001, 7).uint32(at: 0) != a.uint32(at: 0))
        #expect(RandomStream(seed: 42, 3, 1_000_002, 7).uint32(at: 0) != a.uint32(at: 0))
        #expect(RandomStream(seed: 42, 7, 1_000_001, 3).uint32(at: 0) != a.uint32(at: 0), "key order matters")
    }

    @Test("uniform and normal draws have the right moments; permutations are permutations")
    func distributions() {
        let s = RandomStream(seed: 1, 2)
        let n = 20000
        let u = (0..<n).map { Double(s.uniform(at: UInt64($0))) }
        #expect(u.allSatisfy { $0 >= 0 && $0 < 1 })
        #expect(abs(u.reduce(0, +) / Double(n) - 0.5) < 0.01)
        let z = (0..<n).map { Double(s.normal(at: UInt64($0))) }
        let mean = z.reduce(0, +) / Double(n), variance = z.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(n)
        #expect(abs(mean) < 0.03 && abs(variance - 1) < 0.05, "mean \(mean), variance \(variance)")
        let p = s.permutation(1000)
        #expect(p.sorted() == Array(0..<1000) && p != Array(0..<1000))
        let counts = (0..<6000).reduce(into: [Int](repeating: 0, count: 6)) { $0[s.integer(below: 6, at: UInt64($1))] += 1 }
        #expect(counts.allSatisfy { abs($0 - 1000) < 120 }, "\(counts)")
    }
}

@Suite("Parameter arena")
struct ArenaTests {
    @Test("one flat buffer per role, aligned views, trainable ranges skip frozen entries")
    func layout() throws {
        var layout = ParameterLayout()
        try layout.add("a.weight", shape: [3, 5])
        try layout.add("a.bias", shape: [3])
        try layout.add("bn.running_mean", shape: [7], kind: .buffer)
        try layout.add("b.weight", shape: [2, 2])
        try layout.add("c.weight", shape: [4], kind: .frozen)
        try layout.add("d.weight", shape: [1])
        #expect(layout.entries.allSatisfy { $0.offset % 16 == 0 })
        #expect(layout["a.bias"]?.offset == 16)
        #expect(layout.trainableCount == 15 + 3 + 4 + 1)
        let arena = ParameterArena(layout: layout)
        #expect(arena.trainableRanges == [0..<19, 48..<52, 80..<81])
        try arena.set("b.weight", Tensor(shape: [2, 2], [1, 2, 3, 4]))
        #expect(try arena.tensor("b.weight").scalars == [1, 2, 3, 4])
        #expect(arena.params[48 + 3] == 4)
        #expect(throws: ConvirtError.self) { try arena.set("b.weight", Tensor<Float>(shape: [4])) }
        #expect(throws: ConvirtError.self) { try arena.view("nope") }
        #expect(throws: ConvirtError.self) { try layout.add("a.weight", shape: [1]) }
    }

    /// The version that keeps copies of the frozen entries (a frozen layer's bf16 weights): it changes
    /// with every write that may reach them, never with training's own writes, and no two arenas share one.
    @Test("the frozen entries' version changes with each write that may reach them, and only then")
    func frozenVersion() throws {
        var layout = ParameterLayout()
        try layout.add("w", shape: [4])
        try layout.add("f", shape: [4], kind: .frozen)
        let arena = ParameterArena(layout: layout), other = ParameterArena(layout: layout)
        #expect(arena.frozenVersion != other.frozenVersion)
        var version = arena.frozenVersion
        for i in 0..<4 { arena.trainingParams[i] = 1; arena.grads[i] = 0.5 }
        Adam.step(arena, step: 1, config: AdamConfig(learningRate: 0.1, weightDecay: 0.01, decoupled: true))
        #expect(arena.params[0] != 1, "Adam changed nothing")
        #expect(arena.frozenVersion == version, "training's writes changed the frozen entries' version")
        _ = arena.params
        #expect(arena.frozenVersion == version)
        try arena.set("f", Tensor(shape: [4], [1, 2, 3, 4]))
        #expect(arena.frozenVersion != version)
        version = arena.frozenVersion
        arena.mutableParams[20] = 5
        #expect(arena.frozenVersion != version && arena.frozenVersion != other.frozenVersion)
    }

    /// The gradients and moments of frozen entries are anonymous pages nothing writes: zero, and not
    /// resident (mincore), after zeroGrads and Adam over the trainable entries.
    @Test("a frozen entry's gradient and Adam moments read zero and take no memory")
    func frozenPagesStayUnwritten() throws {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var layout = ParameterLayout()
        try layout.add("w", shape: [1000])
        let frozen = try layout.add("frozen", shape: [64 * page])  // 256 pages
        try layout.setKind(.frozen, for: "frozen")
        let arena = ParameterArena(layout: layout)
        arena.zeroGrads()
        for i in 0..<1000 { arena.grads[i] = 1 }
        Adam.step(arena, step: 1, config: AdamConfig(learningRate: 1e-2))
        func residentPages(_ base: UnsafeMutablePointer<Float>) -> Int {
            // Whole pages inside the entry's range.
            let start = (Int(bitPattern: base + frozen.offset) + page - 1) / page * page
            let end = Int(bitPattern: base + frozen.offset + frozen.count) / page * page
            var flags = [UInt8](repeating: 0, count: (end - start) / page)
            #expect(mincore(UnsafeMutableRawPointer(bitPattern: start), end - start, &flags) == 0)
            return flags.filter { $0 & 1 == 1 }.count
        }
        let (m, v) = arena.moments(at: 0)
        #expect(residentPages(arena.grads) == 0 && residentPages(m) == 0 && residentPages(v) == 0)
        #expect(try arena.gradient("frozen").scalars.allSatisfy { $0 == 0 })
        #expect(arena.grads[0] == 1 && m[0] != 0)
    }

    @Test("Adam over the arena equals the Double reference, and leaves frozen entries alone")
    func adamMatchesReference() throws {
        var layout = ParameterLayout()
        try layout.add("w", shape: [37])
        try layout.add("frozen", shape: [5], kind: .frozen)
        let arena = ParameterArena(layout: layout)
        var p = randomFloats(37, seed: 1).map(Double.init), m = [Double](repeating: 0, count: 37), v = m
        try arena.set("w", Tensor(shape: [37], p.map(Float.init)))
        try arena.set("frozen", Tensor(shape: [5], [1, 2, 3, 4, 5]))
        for decoupled in [false, true] {
            let config = AdamConfig(learningRate: 1e-2, weightDecay: 0.1, decoupled: decoupled)
            for step in 1...5 {
                let g = randomFloats(37, seed: UInt64(10 + step))
                g.withUnsafeBufferPointer { arena.grads.update(from: $0.baseAddress!, count: 37) }
                for i in 0..<5 { arena.grads[48 + i] = 1 }
                Adam.step(arena, step: step, config: config)
                Reference.adamStep(params: &p, grads: g.map(Double.init), m: &m, v: &v, step: step, lr: 1e-2, beta1: 0.9, beta2: 0.999,
                                   eps: 1e-8, weightDecay: 0.1, decoupled: decoupled)
            }
            #expect(relativeError(try arena.tensor("w").scalars, p) < 1e-5)
            #expect(try arena.tensor("frozen").scalars == [1, 2, 3, 4, 5])
            arena.zeroMoments()
            m = [Double](repeating: 0, count: 37); v = m
        }
    }
}

@Suite("Bad shapes and sizes are clear errors")
struct ShapeErrorTests {
    @Test("each checked kernel names the tensor and the problem")
    func messages() throws {
        let x = Tensor<Float>(shape: [1, 3, 8, 8])
        func message(_ body: () throws -> Void) -> String {
            do { try body(); return "" } catch { return "\(error)" }
        }
        #expect(message { _ = try F.conv2d(x, weight: Tensor(shape: [4, 2, 3, 3])) }.contains("input has 3 channels but the weight [4, 2, 3, 3] expects 2"))
        #expect(message { _ = try F.conv2d(x, weight: Tensor(shape: [4, 3, 3, 3]), stride: 0) }.contains("stride 0x0 must be positive"))
        #expect(message { _ = try F.conv2d(x, weight: Tensor(shape: [4, 3, 11, 11])) }.contains("larger than the padded input"))
        #expect(message { _ = try F.conv2d(Tensor(shape: [3, 8, 8]), weight: Tensor(shape: [4, 3, 3, 3])) }.contains("conv2d input: expected a rank-4 tensor"))
        #expect(message { _ = try F.conv2d(x, weight: Tensor(shape: [4, 3, 3, 3]), bias: Tensor(shape: [5])) }.contains("conv2d bias: expected shape [4], got [5]"))
        #expect(message { _ = try F.linear(Tensor(shape: [2, 5]), weight: Tensor(shape: [3, 4]), bias: nil) }.contains("does not end in 4 features"))
        #expect(message { _ = try F.embedding(Tensor<Int32>(shape: [2], repeating: 10), table: Tensor(shape: [10, 3])) }.contains("id 10 at position 0 is outside the vocabulary of 10"))
        #expect(message { _ = try F.crossEntropy(Tensor(shape: [2, 3]), targets: Tensor<Int32>(shape: [2], repeating: 3)) }.contains("target 3 of row 0 is outside 0..<3"))
        let q = Tensor<Float>(shape: [2, 4, 6])
        #expect(message { _ = try F.attention(q: q, k: q, v: q, mask: Tensor(shape: [2, 4], repeating: 1), heads: 4) }.contains("width 6 is not divisible by 4 heads"))
        #expect(message { _ = try F.attention(q: q, k: q, v: q, mask: Tensor(shape: [2, 4]), heads: 2) }.contains("sequence 0 has no valid token"))
        #expect(message { _ = try F.layerNorm(Tensor(shape: [2, 5]), gamma: Tensor(shape: [4]), beta: Tensor(shape: [5])) }.contains("layer norm weight: expected shape [5], got [4]"))
        var rm = Tensor<Float>(shape: [3]), rv = Tensor<Float>(shape: [3])
        #expect(message { _ = try F.batchNormTraining(Tensor(shape: [1, 3, 1, 1]), gamma: Tensor(shape: [3]), beta: Tensor(shape: [3]), runningMean: &rm, runningVar: &rv) }
            .contains("more than one value per channel"))
        #expect(message { _ = try F.dropout(x, probability: 1, stream: RandomStream(seed: 1)) }.contains("probability 1.0 is not in [0, 1)"))
        #expect(message { _ = try Tensor<Float>(shape: [2, 2], [1, 2, 3]) }.contains("3 values do not fill shape [2, 2]"))
        #expect(message { _ = try AttentionGeometry(batch: 0, tokens: 1, heads: 1, headSize: 1) }.contains("sizes must be positive"))
    }
}

@Suite("Batch norm statistics hook (SyncBN)")
struct BatchNormReducerTests {
    /// Two "ranks" each hold half of a batch. A reducer that adds the other half's sums makes each
    /// half's forward and backward equal to the whole batch's: global statistics, forward and backward.
    @Test("halves with summed statistics equal the whole batch")
    func halvesEqualWhole() throws {
        let (n, c, h, w) = (4, 3, 5, 2)
        let x = tensor([n, c, h, w], seed: 1, scale: 2), gamma = tensor([c], seed: 2), beta = tensor([c], seed: 3)
        let dy = tensor([n, c, h, w], seed: 4)
        let half = n / 2 * c * h * w
        func slice(_ t: Tensor<Float>, _ part: Int) -> Tensor<Float> {
            try! Tensor(shape: [n / 2, c, h, w], Array(t.scalars[(part * half)..<((part + 1) * half)]))
        }
        var rm = Tensor<Float>(shape: [c]), rv = Tensor<Float>(shape: [c], repeating: 1)
        let whole = try F.batchNormTraining(x, gamma: gamma, beta: beta, runningMean: &rm, runningVar: &rv)
        let wholeGrad = try F.batchNormTrainingBackward(dy, input: x, gamma: gamma, state: whole.state)

        // An all-reduce seen from one half: its own sums plus the other half's, recorded beforehand.
        final class Recorder: @unchecked Sendable { var sums: [[Double]] = [[], []] }
        let forwardSums = Recorder(), backwardSums = Recorder()
        for part in 0..<2 {
            var m = Tensor<Float>(shape: [c]), v = Tensor<Float>(shape: [c], repeating: 1)
            _ = try F.batchNormTraining(slice(x, part), gamma: gamma, beta: beta, runningMean: &m, runningVar: &v) { forwardSums.sums[part] = Array($0) }
        }
        var states: [F.BatchNormState] = []
        var outputs: [Float] = []
        for part in 0..<2 {
            var m = Tensor<Float>(shape: [c]), v = Tensor<Float>(shape: [c], repeating: 1)
            let r = try F.batchNormTraining(slice(x, part), gamma: gamma, beta: beta, runningMean: &m, runningVar: &v) { buffer in
                for i in buffer.indices { buffer[i] += forwardSums.sums[1 - part][i] }
            }
            #expect(r.state.count == n * h * w)
            #expect(relativeError(m.scalars, rm.scalars) < 1e-6, "running mean from global statistics")
            #expect(relativeError(v.scalars, rv.scalars) < 1e-6, "running variance from global statistics")
            states.append(r.state)
            outputs += r.output.scalars
        }
        for part in 0..<2 {
            _ = try F.batchNormTrainingBackward(slice(dy, part), input: slice(x, part), gamma: gamma, state: states[part]) { backwardSums.sums[part] = Array($0) }
        }
        var inputGrads: [Float] = []
        var gammaGrad = [Float](repeating: 0, count: c)
        for part in 0..<2 {
            let g = try F.batchNormTrainingBackward(slice(dy, part), input: slice(x, part), gamma: gamma, state: states[part]) { buffer in
                for i in buffer.indices { buffer[i] += backwardSums.sums[1 - part][i] }
            }
            inputGrads += g.input.scalars
            for i in 0..<c { gammaGrad[i] += g.gamma.scalars[i] }  // parameter gradients are summed over ranks later
        }
        #expect(relativeError(outputs, whole.output.scalars) < 1e-5)
        #expect(relativeError(inputGrads, wholeGrad.input.scalars) < 1e-5)
        #expect(relativeError(gammaGrad, wholeGrad.gamma.scalars) < 1e-5)
    }
}

@Suite("Backend: the switches read in one place, the routes resolved once")
struct BackendTests {
    /// The package's sources, found from this file's path (Tests/ConvirtCoreTests/CoreTests.swift).
    static var sourcesDirectory: String {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/") + "/Sources"
    }

    @Test("no source file but Backend.swift reads the environment")
    func oneReader() throws {
        let readers = ["getenv(", "ProcessInfo.processInfo.environment", "environ"]
        var offenders: [String] = []
        let root = Self.sourcesDirectory
        guard let walk = opendir(root) else { Issue.record("cannot open \(root)"); return }
        closedir(walk)
        func visit(_ dir: String) {
            guard let d = opendir(dir) else { return }
            defer { closedir(d) }
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name.hasPrefix(".") { continue }
                let path = dir + "/" + name
                if e.pointee.d_type == UInt8(DT_DIR) { visit(path); continue }
                guard name.hasSuffix(".swift") || name.hasSuffix(".c") || name.hasSuffix(".h"), name != "Backend.swift",
                      !path.contains("/ConvirtTestSupport/"), let f = fopen(path, "r") else { continue }
                defer { fclose(f) }
                var line: UnsafeMutablePointer<CChar>? = nil, capacity = 0, number = 0
                defer { free(line) }
                while getline(&line, &capacity, f) > 0 {
                    number += 1
                    let text = String(cString: line!)
                    if text.trimmingPrefix(" ").hasPrefix("//") { continue }
                    // `environ` as a word (C's variable), not inside "environment".
                    let words = text.split { !($0.isLetter || $0.isNumber || $0 == "_" || $0 == ".") }.map(String.init)
                    for r in readers where r == "environ" ? words.contains(r) : text.contains(r) {
                        offenders.append("\(path.dropFirst(root.count + 1)):\(number): \(r)")
                    }
                }
            }
        }
        visit(root)
        #expect(offenders.isEmpty, "reads the environment outside Backend.swift: \(offenders)")
    }

    @Test("switches parse to the routes, unknown values are named, other variables are not read")
    func switches() {
        let s = EnvironmentSwitches(["CONVIRT_BF16": "blocked", "CONVIRT_MATMUL": "openblas", "CONVIRT_CONVOLUTION": "im2col",
                                     "CONVIRT_FAULT_KILL_AFTER_SHARD": "4:1", "HOME": "/root", "OMPI_COMM_WORLD_RANK": "3"])
        #expect(s.bf16 == .blocked && s.matmul == .openblas && s.convolution == .im2col)
        #expect(s.killAfterShard?.step == 4 && s.killAfterShard?.rank == 1 && s.launcherRank == 3 && s.launchedByMPI == false)
        #expect(s.variables["HOME"] == nil && s.problems.isEmpty)
        let b = Backend(switches: s)
        #expect(b.bf16 == .blocked && b.fp32Matmul == .openblas && b.convolution == .im2col && b.fp32Layout == .nchw && b.bf16Layout == .nchw)
        #expect(b.record["env CONVIRT_BF16"] == "blocked" && b.record["bf16_products"] == "blocked")
        let bad = EnvironmentSwitches(["CONVIRT_MATMUL": "fast", "CONVIRT_ACTIVATIONS": "nhcw", "CONVIRT_FAULT_KILL_AFTER_COMMIT": "x"])
        #expect(bad.problems.count == 3)
        #expect(bad.problems.first { $0.hasPrefix("CONVIRT_MATMUL=fast") }?.contains("auto, onednn, openblas") == true)
        #expect(Backend(switches: EnvironmentSwitches(["CONVIRT_PRECISION": "fp32"])).autoPrecision == .fp32)
        // bf16 rounding: integer where asked, native only where the CPU converts.
        let integer = Backend(switches: EnvironmentSwitches(["CONVIRT_BF16_ROUNDING": "integer"]))
        #expect(integer.bf16Rounding == .integer && integer.record["bf16_rounding"] == "integer")
        let native = Backend(switches: EnvironmentSwitches(["CONVIRT_BF16_ROUNDING": "native"]))
        #expect(native.bf16Rounding == (ck_native_bf16_supported() != 0 ? .native : .integer))
        #expect(EnvironmentSwitches(["CONVIRT_BF16_ROUNDING": "fast"]).problems == ["CONVIRT_BF16_ROUNDING=fast: expected one of native, integer"])
    }
}

@Suite("A bounded cache of the most recently used values")
struct RecentlyUsedTests {
    @Test("past its capacity the least recently used value goes; a lookup or a new value counts as a use")
    func evictsLeastRecentlyUsed() {
        var cache = RecentlyUsed<Int, String?>(capacity: 3)
        cache.insert("one", for: 1)
        cache.insert(nil, for: 2)  // a held nil (oneDNN refused the shape) is a value like any other
        cache.insert("three", for: 3)
        #expect(cache.count == 3 && cache.value(for: 1) == .some("one") && cache.value(for: 2) == .some(nil))
        cache.insert("four", for: 4)  // 3 is now the least recently used: 1 and 2 were looked up after it
        #expect(cache.count == 3 && !cache.contains(3) && cache.contains(1) && cache.contains(2) && cache.contains(4))
        #expect(cache.value(for: 3) == nil)
        cache.insert("one again", for: 1)  // replacing a held key drops nothing
        #expect(cache.count == 3 && cache.value(for: 1) == .some("one again") && cache.contains(2))
        cache.insert("five", for: 5)  // 2 was used before 4 and 1
        #expect(!cache.contains(2) && cache.contains(4) && cache.contains(1) && cache.contains(5))
        // A long run of new keys keeps the count at the capacity and the newest keys in.
        for key in 100..<1000 { cache.insert("\(key)", for: key) }
        #expect(cache.count == 3 && (997..<1000).allSatisfy(cache.contains) && cache.value(for: 999) == .some("999"))
    }
}
