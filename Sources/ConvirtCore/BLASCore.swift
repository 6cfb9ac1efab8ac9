// OpenBLAS 0.3.21 (Debian's) picks its kernels by CPU model at load time and misses current CPUs: on a
// Sapphire Rapids Xeon it chose Cooperlake (3.4x slower sgemm than SkylakeX there) and once Prescott.
// OPENBLAS_CORETYPE overrides the choice but is read only when the library loads, so convirt decides
// by the CPU's flags and, when OpenBLAS chose worse, restarts itself (execv, before MPI or any thread
// starts) with OPENBLAS_CORETYPE set (and OMP_WAIT_POLICY, see `preferredEnvironment`). A value the
// user or the machine already set is respected.

import COpenBLAS
#if canImport(Glibc)
import Glibc
#endif

public enum BLASCore {
    /// The kernel set OpenBLAS uses (e.g. Haswell, SkylakeX, Zen).
    public static var current: String { String(cString: openblas_get_corename()) }

    /// Why the current core is in use: set by the user or machine, chosen by convirt, or OpenBLAS's own.
    public static var origin: String {
        let env = processEnvironment()
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
    /// chose a worse core than the CPU supports, and `OMP_WAIT_POLICY=passive`. Debian's oneDNN runs on
    /// libgomp, and so do our own loops (`Parallel`): one team of N threads per rank. Spinning threads
    /// (`active`) start the next region sooner, and a rank alone on its cores ran the paper step 3-7%
    /// faster with them (2-core AMD EPYC, bf16 2.03-2.21 s against 2.29-2.40 s); but they keep their
    /// cores busy between regions, and with two processes on those 2 cores a step took 12-15 s with
    /// spinning threads against 4.4-7.2 s with passive ones. So passive, the policy that cannot collapse,
    /// unless the user sets OMP_WAIT_POLICY (a rank that owns its cores gains with `active`).
    public static func preferredEnvironment(_ env: [String: String], flags: Set<String>, vendor: String, picked: String) -> [String: String] {
        var changes: [String: String] = [:]
        if env["OPENBLAS_CORETYPE"] == nil, let core = preferred(flags: flags, vendor: vendor, picked: picked) {
            changes["OPENBLAS_CORETYPE"] = core
            changes[chosenMarker] = core
        }
        if env["OMP_WAIT_POLICY"] == nil {
            changes["OMP_WAIT_POLICY"] = "passive"
            changes[waitPolicyMarker] = "passive"
        }
        return changes
    }

    static let waitPolicyMarker = "CONVIRT_OMP_WAIT_POLICY_CHOSEN"

    /// How oneDNN's OpenMP threads wait between primitives, and who decided.
    public static var openMPWaitPolicy: String {
        let env = processEnvironment()
        guard let policy = env["OMP_WAIT_POLICY"] else { return "libgomp's default (spinning)" }
        return env[waitPolicyMarker] != nil ? "\(policy) (set by convirt)" : "\(policy) (OMP_WAIT_POLICY set by the environment)"
    }

    /// Restarts this process with `preferredEnvironment`'s variables set when it has any (they are read
    /// only when OpenBLAS and libgomp load). Call first thing in main, before MPI or any thread starts;
    /// returns when no restart is needed (or the restart failed, in which case the libraries keep their
    /// own choices). A restarted process never restarts again.
    public static func restartWithPreferredSettingsIfNeeded() {
        let env = processEnvironment()
        // CONVIRT_TEST_BLAS_PICKED pretends OpenBLAS chose that core (to test the restart on any CPU).
        guard env[restartMarker] == nil, let cpu else { return }
        let changes = preferredEnvironment(env, flags: cpu.flags, vendor: cpu.vendor, picked: env["CONVIRT_TEST_BLAS_PICKED"] ?? current)
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

/// The environment as a dictionary, without Foundation.
func processEnvironment() -> [String: String] {
    var result: [String: String] = [:]
    var p = environ
    while let entry = p.pointee {
        let s = String(cString: entry)
        if let eq = s.firstIndex(of: "=") { result[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
        p += 1
    }
    return result
}
