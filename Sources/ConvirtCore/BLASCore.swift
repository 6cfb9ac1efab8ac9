// OpenBLAS 0.3.21 (Debian's) picks its kernels by CPU model at load time and misses current CPUs: on a
// Sapphire Rapids Xeon it chose Cooperlake (3.4x slower sgemm than SkylakeX there) and once Prescott.
// OPENBLAS_CORETYPE overrides the choice but is read only when the library loads, so convirt decides
// by the CPU's flags and, when OpenBLAS chose worse, restarts itself (execv, before MPI or any thread
// starts) with OPENBLAS_CORETYPE set (and how OpenMP threads wait, see `waitPolicy`). A value the
// user or the machine already set is respected.

import CKernels
import COpenBLAS
#if canImport(Glibc)
import Glibc
#endif

public enum BLASCore {
    /// The kernel set OpenBLAS uses (e.g. Haswell, SkylakeX, Zen).
    public static var current: String { String(cString: openblas_get_corename()) }

    /// Why the current core is in use: set by the user or machine, chosen by convirt, or OpenBLAS's own.
    public static var origin: String {
        let env = EnvironmentSwitches.process.variables
        if env[chosenMarker] != nil { return "chosen by convirt from the CPU flags" }
        if env["OPENBLAS_CORETYPE"] != nil { return "OPENBLAS_CORETYPE set by the environment" }
        return "chosen by OpenBLAS"
    }

    static let chosenMarker = "CONVIRT_BLAS_CORE_CHOSEN"

    /// The core convirt wants instead of OpenBLAS's `picked`, or nil to keep it. Kernels by instruction
    /// set: AVX-512 (F, BW, DQ, VL) -> SkylakeX; AVX2 with FMA -> Haswell (Zen, on AMD: the same
    /// kernels); below that, OpenBLAS's own choice.
    public static func preferred(flags: Set<String>, vendor: String, picked: String) -> String? {
        let p = picked.lowercased()
        if ["avx512f", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(flags.contains) {
            return p == "skylakex" ? nil : "SkylakeX"
        }
        if flags.contains("avx2") && flags.contains("fma") {
            return ["haswell", "zen"].contains(p) ? nil : vendor.contains("AMD") ? "Zen" : "Haswell"
        }
        return nil
    }

    /// The CPU's flags and vendor from /proc/cpuinfo (first processor), read once; nil where unreadable.
    public static let cpu: (flags: Set<String>, vendor: String)? = cpuFlags()

    private static func cpuFlags() -> (flags: Set<String>, vendor: String)? {
        guard let file = fopen("/proc/cpuinfo", "r") else { return nil }
        defer { fclose(file) }
        var flags: Set<String> = [], vendor = ""
        var line: UnsafeMutablePointer<CChar>? = nil
        var capacity = 0
        defer { free(line) }
        while getline(&line, &capacity, file) > 0 {
            let text = String(cString: line!)
            let words = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).map(String.init)
            if text.hasPrefix("vendor_id"), let value = words.last { vendor = value }
            if text.hasPrefix("flags") {
                flags = Set(words.drop { $0 != ":" }.dropFirst())
                break
            }
        }
        return flags.isEmpty ? nil : (flags, vendor)
    }

    /// What convirt sets before the libraries load, where nobody set it: `OPENBLAS_CORETYPE` when OpenBLAS
    /// chose a worse core than the CPU supports, and how OpenMP threads wait (`waitPolicy`).
    public static func preferredEnvironment(_ env: [String: String], flags: Set<String>, vendor: String, picked: String,
                                            arguments: [String] = [], cpus: Int = 1) -> [String: String] {
        var changes: [String: String] = [:]
        if env["OPENBLAS_CORETYPE"] == nil, let core = preferred(flags: flags, vendor: vendor, picked: picked) {
            changes["OPENBLAS_CORETYPE"] = core
            changes[chosenMarker] = core
        }
        changes.merge(waitPolicy(env, arguments: arguments, cpus: cpus)) { $1 }
        return changes
    }

    /// How the OpenMP threads wait between parallel regions, where the user set neither OMP_WAIT_POLICY
    /// nor GOMP_SPINCOUNT. oneDNN (its GNU OpenMP build) runs on libgomp, and so do our own loops (`Parallel`): one team
    /// of N threads per rank, and a step starts some 2,000 parallel regions. A passive thread sleeps at
    /// once and is woken by a futex for the next region: on a 2-core AMD EPYC VM that costs ~85 us a
    /// region (a C loop of regions: 107 us passive, 21 us spinning 50,000 times first), and the paper
    /// step in bf16 ran 6% faster spinning (`GOMP_SPINCOUNT=300000`, libgomp's own default: 1.73-2.28 s
    /// against 1.98-2.37 s, alternated). But spinning threads keep their cores busy between regions:
    /// with two such processes on those 2 cores, a step took 6.0-6.2 s spinning (20,000 or 300,000
    /// times) against 4.7 s passive. So a rank spins (300,000 times, then sleeps) where its threads have
    /// CPUs of their own: it is the only rank on its node (OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS),
    /// or `--threads` times the node's ranks is at most the CPUs it may run on; elsewhere (several ranks,
    /// threads unknown or too many) its threads wait passively. Two unrelated processes on the same cores
    /// are not seen: there OMP_WAIT_POLICY=passive is the user's to set.
    static func waitPolicy(_ env: [String: String], arguments: [String], cpus: Int) -> [String: String] {
        guard env["OMP_WAIT_POLICY"] == nil, env["GOMP_SPINCOUNT"] == nil else { return [:] }
        let ranks = (env["OMPI_COMM_WORLD_LOCAL_SIZE"] ?? env["MPI_LOCALNRANKS"]).flatMap { Int($0) } ?? 1
        let threads = requestedThreads(arguments)
        if ranks <= 1 || threads.map({ ranks * $0 <= cpus }) == true {
            return ["GOMP_SPINCOUNT": "\(spinCount)", waitPolicyMarker: "spin"]
        }
        return ["OMP_WAIT_POLICY": "passive", waitPolicyMarker: "passive"]
    }

    /// libgomp's own spin count with no policy set, before a waiting thread sleeps.
    static let spinCount = 300_000

    /// The value of `--threads N` (or `--threads=N`) on the command line, nil where absent.
    static func requestedThreads(_ arguments: [String]) -> Int? {
        for (i, a) in arguments.enumerated() {
            if a == "--threads", i + 1 < arguments.count { return Int(arguments[i + 1]) }
            if a.hasPrefix("--threads=") { return Int(a.dropFirst("--threads=".count)) }
        }
        return nil
    }

    static let waitPolicyMarker = "CONVIRT_OMP_WAIT_POLICY_CHOSEN"

    /// How oneDNN's OpenMP threads wait between primitives, and who decided.
    public static var openMPWaitPolicy: String {
        let env = EnvironmentSwitches.process.variables
        switch env[waitPolicyMarker] {
        case "spin": return "spinning \(env["GOMP_SPINCOUNT"] ?? "?") times, then passive (set by convirt: this rank's threads have their CPUs)"
        case "passive": return "passive (set by convirt: ranks share this node's CPUs)"
        default: break
        }
        if let policy = env["OMP_WAIT_POLICY"] { return "\(policy) (OMP_WAIT_POLICY set by the environment)" }
        if let spins = env["GOMP_SPINCOUNT"] { return "spinning \(spins) times (GOMP_SPINCOUNT set by the environment)" }
        return "libgomp's default (spinning)"
    }

    /// The CPUs this process may run on (its affinity mask), at least 1.
    static var availableCPUs: Int { ck_available_cpus() }

    /// Restarts this process with `preferredEnvironment`'s variables set when it has any (they are read
    /// only when OpenBLAS and libgomp load). Call first thing in main, before MPI or any thread starts;
    /// returns when no restart is needed (or the restart failed, in which case the libraries keep their
    /// own choices). A restarted process never restarts again.
    public static func restartWithPreferredSettingsIfNeeded() {
        let env = EnvironmentSwitches.process.variables
        // CONVIRT_TEST_BLAS_PICKED pretends OpenBLAS chose that core (to test the restart on any CPU).
        guard env[restartMarker] == nil, let cpu else { return }
        let changes = preferredEnvironment(env, flags: cpu.flags, vendor: cpu.vendor, picked: env["CONVIRT_TEST_BLAS_PICKED"] ?? current,
                                           arguments: CommandLine.arguments, cpus: availableCPUs)
        guard !changes.isEmpty else { return }
        for (name, value) in changes { setenv(name, value, 1) }
        setenv(restartMarker, "1", 1)
        var argv: [UnsafeMutablePointer<CChar>?] = CommandLine.arguments.map { strdup($0) } + [nil]
        execv("/proc/self/exe", &argv)
        // Only reached if execv failed: keep going with the libraries' own choices.
        for name in changes.keys { unsetenv(name) }
        unsetenv(restartMarker)
    }

    static let restartMarker = "CONVIRT_RESTARTED"
}
