// The C benchmarks under tools/, which tools/device_bf16_check.sh builds on a machine lent for minutes:
// they must build against the kernels' header and oneDNN's as they are now, or that machine's time is lost.

import Foundation
import Testing

@Suite("The C benchmarks under tools/")
struct ToolsTests {
    @Test("tools/bench_passes.c and tools/bench_dnnl.c compile against the kernels' header and oneDNN's")
    func benchmarksCompile() throws {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"
        let compilers = path.split(separator: ":").map { "\($0)/clang" } + ["/usr/bin/cc"]
        let compiler = try #require(compilers.first { FileManager.default.isExecutableFile(atPath: $0) }, "no clang on the PATH, no cc")
        for file in ["tools/bench_passes.c", "tools/bench_dnnl.c"] {
            let r = try run(compiler, ["-fsyntax-only", "-Werror=implicit-function-declaration", "-I", "\(repository)/.deps/onednn/include",
                                       "-I", "\(repository)/Sources/CKernels/include", "\(repository)/\(file)"])
            #expect(r.status == 0, "\(file) does not compile: \(r.output)")
        }
    }
}
