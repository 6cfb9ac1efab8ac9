// OpenBLAS 0.3.21 (Debian's) picks its kernels by CPU model at load time and misses current CPUs: on a
// Sapphire Rapids Xeon it chose Cooperlake (3.4x slower sgemm than SkylakeX there) and once Prescott.
// OPENBLAS_CORETYPE overrides the choice but is read only when the library loads, so convirt decides
// by the CPU's flags and, when OpenBLAS chose worse, restarts itself (execv, before MPI or any thread
// starts) with OPENBLAS_CORETYPE set. A value the user or the machine already set is respected.

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

    /// The CPU's flags and vendor from /proc/cpuinfo (first processor).
    static func cpuFlags() -> (flags: Set<String>, vendor: String)? {
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

    /// Restarts this process with OPENBLAS_CORETYPE set when OpenBLAS chose a worse core than the CPU
    /// supports and nobody set one. Call first thing in main; returns when no restart is needed (or
    /// the restart failed, in which case OpenBLAS's own choice stays).
    public static func restartWithPreferredCoreIfNeeded() {
        let env = processEnvironment()
        // CONVIRT_TEST_BLAS_PICKED pretends OpenBLAS chose that core (to test the restart on any CPU).
        guard env["OPENBLAS_CORETYPE"] == nil, env[chosenMarker] == nil, let cpu = cpuFlags(),
              let core = preferred(flags: cpu.flags, vendor: cpu.vendor, picked: env["CONVIRT_TEST_BLAS_PICKED"] ?? current) else { return }
        setenv("OPENBLAS_CORETYPE", core, 1)
        setenv(chosenMarker, core, 1)
        var argv: [UnsafeMutablePointer<CChar>?] = CommandLine.arguments.map { strdup($0) } + [nil]
        execv("/proc/self/exe", &argv)
        // Only reached if execv failed: keep going with OpenBLAS's choice.
        unsetenv("OPENBLAS_CORETYPE")
        unsetenv(chosenMarker)
    }
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
