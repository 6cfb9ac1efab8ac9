// Every switch the environment can set, declared in one block and read once, and the kernel routes
// resolved from them and from the CPU: `Backend.current`. No other file reads the environment (a test
// holds the sources to that); `convirt info` prints the routes and a training run records them in its
// config.json, so that a run says which kernels computed it.

import CKernels
#if canImport(Glibc)
import Glibc
#endif

/// Where bf16 products run (`CONVIRT_BF16`; by default a fixed rule of the CPU, `BF16.prefersNative`).
public enum BF16Route: String, Sendable, Codable, CaseIterable {
    /// oneDNN's bf16 kernels (AMX; AMD's AVX512-BF16).
    case native
    /// fp32 kernels over bf16-rounded inputs: the same products, on every CPU.
    case emulate
    /// The emulation with each weight gradient summed in two length-dependent blocks rounded to bf16
    /// (`BF16.blockedReductions`): a test backend that makes the world-size guarantee's structure testable
    /// on every CPU.
    case blocked
}

/// How the passes between the products round to bf16 (`CONVIRT_BF16_ROUNDING`; by default the CPU's
/// instruction where it has one): the same bits either way (`ck_native_bf16`).
public enum BF16Rounding: String, Sendable, Codable, CaseIterable {
    /// vcvtneps2bf16 (AVX512-BF16), a vector holding a subnormal rounded as `integer` rounds it.
    case native
    /// Round to nearest even in integer arithmetic on the bits, on every CPU.
    case integer
}

/// The environment variables convirt reads, parsed once.
public struct EnvironmentSwitches: @unchecked Sendable {
    /// Every variable read, with what it does (printed by `convirt info` where set).
    public static let declared: [(name: String, meaning: String)] = [
        // Kernel routes: the defaults choose by CPU; these pin a test suite or a measurement.
        ("CONVIRT_PRECISION", "fp32|bf16: what --precision auto runs in"),
        ("CONVIRT_BF16", "native|emulate|blocked: where bf16 products run"),
        ("CONVIRT_MATMUL", "auto|onednn|openblas: fp32 matrix products"),
        ("CONVIRT_CONVOLUTION", "auto|onednn|im2col: convolutions"),
        ("CONVIRT_ACTIVATIONS", "nchw|nhwc|nchw16c|nchw8c: the ResNet's activation layout where oneDNN runs its convolutions"),
        ("CONVIRT_BF16_ROUNDING", "native|integer: how the passes between products round to bf16 (the same bits either way)"),
        ("CONVIRT_TEXT_ROWS", "packed|padded: whether ConVIRT's BERT runs its per-token layers on the valid tokens alone or on every padded position"),
        // Fault injection, for the tests of interrupted checkpoints and of the collective watchdog.
        ("CONVIRT_FAULT_STALL", "STEP:RANK: that rank stops (sleeps forever) at the start of training step STEP"),
        ("CONVIRT_FAULT_SPIKE", "STEP:FACTOR: training step STEP's loss and gradients are multiplied by FACTOR on every rank"),
        ("CONVIRT_FAULT_KILL_AFTER_SHARD", "STEP:RANK: that rank kills itself after writing its shard of STEP's checkpoint"),
        ("CONVIRT_FAULT_KILL_AFTER_COMMIT", "STEP: rank 0 kills itself after publishing STEP's checkpoint"),
        ("CONVIRT_FAULT_STOP_SIGNAL", "STEP:RANK: that rank sends itself SIGUSR1 (the request to checkpoint and stop) during training step STEP"),
        ("CONVIRT_FAULT_SHM_FULL", "RANK: that rank finds /dev/shm full when it reserves its shared gradient buffer (RANK:parameters: its parameter buffer)"),
        ("CONVIRT_TEST_BLAS_PICKED", "a core name: pretend OpenBLAS chose it (tests the restart on any CPU)"),
        // The launcher's (mpirun, PMI).
        ("OMPI_COMM_WORLD_SIZE", "set by Open MPI's mpirun: launched as an MPI job"),
        ("OMPI_COMM_WORLD_RANK", "set by Open MPI's mpirun: this process's rank"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "set by Open MPI's mpirun: ranks on this node"),
        ("PMI_SIZE", "set by a PMI launcher: launched as an MPI job"),
        ("PMIX_RANK", "set by a PMIx launcher: this process's rank"),
        ("MPI_LOCALNRANKS", "set by MPICH's launcher: ranks on this node"),
        // The libraries' own, read when they load; convirt sets them before (`BLASCore`) where unset.
        ("OPENBLAS_CORETYPE", "OpenBLAS's kernel set"),
        ("OMP_WAIT_POLICY", "how OpenMP threads wait between parallel regions"),
        ("GOMP_SPINCOUNT", "how long libgomp's threads spin before they sleep"),
        // convirt's markers of its own restart (`BLASCore.restartWithPreferredSettingsIfNeeded`).
        ("CONVIRT_RESTARTED", "set by convirt: this process is its restart"),
        ("CONVIRT_BLAS_CORE_CHOSEN", "set by convirt: it chose OPENBLAS_CORETYPE"),
        ("CONVIRT_OMP_WAIT_POLICY_CHOSEN", "set by convirt: it chose the OpenMP wait policy"),
    ]

    /// The declared variables that are set, by name.
    public let variables: [String: String]

    /// The convirt switches a user or a test sets (not the launcher's, the libraries' or convirt's markers).
    public var convirtSwitches: [(name: String, value: String, meaning: String)] {
        Self.declared.compactMap { d in
            guard d.name.hasPrefix("CONVIRT_"), !Self.markers.contains(d.name), let value = variables[d.name] else { return nil }
            return (d.name, value, d.meaning)
        }
    }
    static let markers: Set = ["CONVIRT_RESTARTED", "CONVIRT_BLAS_CORE_CHOSEN", "CONVIRT_OMP_WAIT_POLICY_CHOSEN"]

    public var precision: Precision? { variables["CONVIRT_PRECISION"].flatMap(Precision.init(rawValue:)) }
    public var bf16: BF16Route? { variables["CONVIRT_BF16"].flatMap(BF16Route.init(rawValue:)) }
    public var matmul: FP32Matmul.Policy { variables["CONVIRT_MATMUL"].flatMap(FP32Matmul.Policy.init(rawValue:)) ?? .auto }
    public var convolution: Convolution.Policy { variables["CONVIRT_CONVOLUTION"].flatMap(Convolution.Policy.init(rawValue:)) ?? .auto }
    public var activations: ActivationLayout? { variables["CONVIRT_ACTIVATIONS"].flatMap(ActivationLayout.init(rawValue:)) }
    public var bf16Rounding: BF16Rounding? { variables["CONVIRT_BF16_ROUNDING"].flatMap(BF16Rounding.init(rawValue:)) }
    public var textRows: TextRows? { variables["CONVIRT_TEXT_ROWS"].flatMap(TextRows.init(rawValue:)) }
    public var killAfterShard: (step: Int, rank: Int)? { stepAndRank("CONVIRT_FAULT_KILL_AFTER_SHARD") }
    private func stepAndRank(_ name: String) -> (step: Int, rank: Int)? {
        guard let parts = variables[name]?.split(separator: ":").compactMap({ Int($0) }), parts.count == 2 else { return nil }
        return (parts[0], parts[1])
    }
    public var stall: (step: Int, rank: Int)? { stepAndRank("CONVIRT_FAULT_STALL") }
    public var stopSignal: (step: Int, rank: Int)? { stepAndRank("CONVIRT_FAULT_STOP_SIGNAL") }
    public var spike: (step: Int, factor: Double)? {
        guard let parts = variables["CONVIRT_FAULT_SPIKE"]?.split(separator: ":"), parts.count == 2, let step = Int(parts[0]),
              let factor = Double(parts[1]), factor.isFinite else { return nil }
        return (step, factor)
    }
    public var killAfterCommit: Int? { variables["CONVIRT_FAULT_KILL_AFTER_COMMIT"].flatMap { Int($0) } }
    /// CONVIRT_FAULT_SHM_FULL: the rank that finds /dev/shm full, and whether for its parameter buffer
    /// (else its gradient buffer).
    public var sharedMemoryFull: (rank: Int, parameters: Bool)? {
        guard let value = variables["CONVIRT_FAULT_SHM_FULL"] else { return nil }
        let parts = value.split(separator: ":", omittingEmptySubsequences: false)
        guard let rank = Int(parts[0]), parts.count == 1 || (parts.count == 2 && parts[1] == "parameters") else { return nil }
        return (rank, parts.count == 2)
    }
    /// Whether mpirun or a PMI launcher started this process (so MPI_Init finds its job).
    public var launchedByMPI: Bool { ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].contains { variables[$0] != nil } }
    /// This process's rank as its launcher set it (before MPI starts), 0 when not launched so.
    public var launcherRank: Int { (variables["OMPI_COMM_WORLD_RANK"] ?? variables["PMIX_RANK"]).flatMap { Int($0) } ?? 0 }
    /// The ranks on this node as the launcher set it, nil where not launched so.
    public var localRanks: Int? { (variables["OMPI_COMM_WORLD_LOCAL_SIZE"] ?? variables["MPI_LOCALNRANKS"]).flatMap { Int($0) } }

    /// A value of a convirt switch that means nothing: "CONVIRT_MATMUL=fast: expected auto, onednn or openblas".
    public var problems: [String] {
        func check<T: RawRepresentable & CaseIterable>(_ name: String, _: T.Type) -> String? where T.RawValue == String {
            guard let value = variables[name], T(rawValue: value) == nil else { return nil }
            return "\(name)=\(value): expected one of \(T.allCases.map(\.rawValue).joined(separator: ", "))"
        }
        var out = [check("CONVIRT_PRECISION", Precision.self), check("CONVIRT_BF16", BF16Route.self),
                   check("CONVIRT_MATMUL", FP32Matmul.Policy.self), check("CONVIRT_CONVOLUTION", Convolution.Policy.self),
                   check("CONVIRT_ACTIVATIONS", ActivationLayout.self), check("CONVIRT_BF16_ROUNDING", BF16Rounding.self),
                   check("CONVIRT_TEXT_ROWS", TextRows.self)].compactMap { $0 }
        if let v = variables["CONVIRT_FAULT_KILL_AFTER_SHARD"], killAfterShard == nil { out.append("CONVIRT_FAULT_KILL_AFTER_SHARD=\(v): expected STEP:RANK") }
        if let v = variables["CONVIRT_FAULT_SPIKE"], spike == nil { out.append("CONVIRT_FAULT_SPIKE=\(v): expected STEP:FACTOR") }
        if let v = variables["CONVIRT_FAULT_STALL"], stall == nil { out.append("CONVIRT_FAULT_STALL=\(v): expected STEP:RANK") }
        if let v = variables["CONVIRT_FAULT_STOP_SIGNAL"], stopSignal == nil { out.append("CONVIRT_FAULT_STOP_SIGNAL=\(v): expected STEP:RANK") }
        if let v = variables["CONVIRT_FAULT_KILL_AFTER_COMMIT"], killAfterCommit == nil { out.append("CONVIRT_FAULT_KILL_AFTER_COMMIT=\(v): expected a step") }
        if let v = variables["CONVIRT_FAULT_SHM_FULL"], sharedMemoryFull == nil { out.append("CONVIRT_FAULT_SHM_FULL=\(v): expected RANK or RANK:parameters") }
        return out
    }

    public init(_ environment: [String: String]) {
        let names = Set(Self.declared.map(\.name))
        variables = environment.filter { names.contains($0.key) }
    }

    /// This process's, read once.
    public static let process = EnvironmentSwitches(readEnvironment())

    /// The environment as a dictionary, without Foundation.
    private static func readEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { result[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return result
    }
}

/// The kernel routes of this process, resolved once from the switches and the CPU: the same on every
/// rank of a job on one kind of CPU (no route depends on a size, which would differ between ranks).
public struct Backend: @unchecked Sendable {
    public enum MatmulRoute: String, Sendable { case onednn, openblas }
    public enum ConvolutionRoute: String, Sendable { case onednn, im2col }

    public let switches: EnvironmentSwitches
    /// What `--precision auto` runs in, and why.
    public let autoPrecision: Precision
    public let autoPrecisionReason: String
    /// Where bf16 products run, and why.
    public let bf16: BF16Route
    public let bf16Reason: String
    /// fp32 matrix products: oneDNN's matmul or OpenBLAS's sgemm (`FP32Matmul`).
    public let fp32Matmul: MatmulRoute
    /// fp32 convolutions (and emulated bf16 ones): oneDNN's or im2col + sgemm (`Convolution`).
    public let convolution: ConvolutionRoute
    /// The ResNet's activation layout in each precision (`Convolution.layout`).
    public let fp32Layout, bf16Layout: ActivationLayout
    /// How the passes between the products round to bf16, and why.
    public let bf16Rounding: BF16Rounding
    public let bf16RoundingReason: String

    public init(switches: EnvironmentSwitches) {
        self.switches = switches
        let support = BF16.hardwareSupport
        if let p = switches.precision {
            (autoPrecision, autoPrecisionReason) = (p, "CONVIRT_PRECISION=\(p.rawValue)")
        } else if let support {
            (autoPrecision, autoPrecisionReason) = (.bf16, "the CPU has \(support)")
        } else {
            (autoPrecision, autoPrecisionReason) = (.fp32, "the CPU has neither AMX-BF16 nor AVX512-BF16")
        }
        let runs = BF16.oneDNNRunsBF16, isa = DNNL.isa
        let prefers = BF16.prefersNative(isa: isa, vendor: BLASCore.cpu?.vendor ?? "")
        switch switches.bf16 {
        case .native? where runs: (bf16, bf16Reason) = (.native, "CONVIRT_BF16=native")
        case .native?: (bf16, bf16Reason) = (.emulate, "CONVIRT_BF16=native, but oneDNN \(DNNL.version) runs no bf16 on ISA \(isa)")
        case .emulate?: (bf16, bf16Reason) = (.emulate, "CONVIRT_BF16=emulate")
        case .blocked?: (bf16, bf16Reason) = (.blocked, "CONVIRT_BF16=blocked, a test backend")
        case nil where runs && prefers: (bf16, bf16Reason) = (.native, "ISA \(isa)")
        case nil where runs: (bf16, bf16Reason) = (.emulate, "faster than oneDNN \(DNNL.version)'s bf16 kernels on ISA \(isa) on this CPU")
        case nil: (bf16, bf16Reason) = (.emulate, "oneDNN \(DNNL.version) runs no bf16 on ISA \(isa)")
        }
        let avx512 = isa.hasPrefix("avx512")
        switch switches.matmul {
        case .onednn: fp32Matmul = .onednn
        case .openblas: fp32Matmul = .openblas
        case .auto: fp32Matmul = avx512 ? .onednn : .openblas
        }
        switch switches.convolution {
        case .onednn: convolution = .onednn
        case .im2col: convolution = .im2col
        case .auto: convolution = .onednn
        }
        fp32Layout = Convolution.layout(precision: .fp32, onDNNL: convolution == .onednn, forced: switches.activations)
        bf16Layout = Convolution.layout(precision: .bf16, onDNNL: bf16 == .native, forced: switches.activations)
        let converts = ck_native_bf16_supported() != 0
        switch switches.bf16Rounding {
        case .integer?: (bf16Rounding, bf16RoundingReason) = (.integer, "CONVIRT_BF16_ROUNDING=integer")
        case .native? where converts: (bf16Rounding, bf16RoundingReason) = (.native, "CONVIRT_BF16_ROUNDING=native")
        case .native?: (bf16Rounding, bf16RoundingReason) = (.integer, "CONVIRT_BF16_ROUNDING=native, but the CPU has no AVX512-BF16")
        case nil where converts: (bf16Rounding, bf16RoundingReason) = (.native, "the CPU has AVX512-BF16")
        case nil: (bf16Rounding, bf16RoundingReason) = (.integer, "the CPU has no AVX512-BF16")
        }
    }

    /// This process's; resolving it sets the C kernels' bf16 rounding (every bf16 pass reads a route first).
    public static let current: Backend = {
        let backend = Backend(switches: .process)
        ck_set_native_bf16(backend.bf16Rounding == .native ? 1 : 0)
        return backend
    }()

    /// The bf16 route in words.
    public var bf16Description: String {
        switch bf16 {
        case .native:
            let layout = switch bf16Layout {
            case .nhwc: "ResNet activations NHWC from layer to layer"
            case .blocked16: "ResNet activations nChw16c from layer to layer (NCHW where the width is no multiple of 16)"
            case .blocked8: "ResNet activations nChw8c from layer to layer (NCHW where the width is no multiple of 8)"
            case .nchw: "ResNet activations NCHW, reordered to oneDNN's blocked layout at each convolution"
            }
            return "bf16 products on oneDNN (ISA \(DNNL.isa); \(layout))"
        case .emulate: return "bf16 products as fp32 products of bf16-rounded inputs (\(bf16Reason))"
        case .blocked: return "bf16 products as fp32 products of bf16-rounded inputs, weight gradients summed in two blocks rounded to bf16 (\(bf16Reason))"
        }
    }

    /// The routes as a run's config.json records them.
    public var record: [String: String] {
        var out = ["auto_precision": autoPrecision.rawValue, "bf16_products": bf16.rawValue, "fp32_matmul": fp32Matmul.rawValue,
                   "convolution": convolution.rawValue, "activations_fp32": fp32Layout.rawValue, "activations_bf16": bf16Layout.rawValue,
                   "bf16_rounding": bf16Rounding.rawValue, "onednn": "\(DNNL.version) \(DNNL.isa)", "openblas_core": BLASCore.current]
        for s in switches.convirtSwitches { out["env " + s.name] = s.value }
        return out
    }

    /// What `convirt info` prints.
    public var lines: [String] {
        var out = ["kernels: fp32 products on \(fp32Matmul == .onednn ? "oneDNN" : "OpenBLAS"), convolutions on "
                   + "\(convolution == .onednn ? "oneDNN" : "im2col + OpenBLAS"); ResNet activations \(fp32Layout.rawValue) in fp32",
                   "bf16: \(bf16Description); the passes between products round to bf16 "
                   + (bf16Rounding == .native ? "by the CPU's vcvtneps2bf16" : "in integer arithmetic") + " (\(bf16RoundingReason))",
                   "precision auto: \(autoPrecision.rawValue) (\(autoPrecisionReason))"]
        for s in switches.convirtSwitches { out.append("  \(s.name)=\(s.value) (\(s.meaning))") }
        return out
    }
}
