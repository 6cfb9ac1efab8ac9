// swift-tools-version:6.1
// ConvirtSwift: contrastive pretraining of medical image encoders from paired images and reports
// (ConVIRT, Zhang et al., arXiv 2010.00747) as MPI-launched data-parallel Swift worker processes.
import PackageDescription

let package = Package(
    name: "convirt-swift",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "convirt", targets: ["convirt"]),
        .library(name: "ConvirtCore", targets: ["ConvirtCore"]),
        .library(name: "ConvirtIO", targets: ["ConvirtIO"]),
        .library(name: "ConvirtDistributed", targets: ["ConvirtDistributed"]),
        .library(name: "ConvirtModels", targets: ["ConvirtModels"]),
        .library(name: "ConvirtText", targets: ["ConvirtText"]),
        .library(name: "ConvirtData", targets: ["ConvirtData"]),
        .library(name: "ConvirtTraining", targets: ["ConvirtTraining"]),
        .library(name: "ConvirtEvaluation", targets: ["ConvirtEvaluation"]),
        .library(name: "ConvirtReport", targets: ["ConvirtReport"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-numerics", from: "1.1.1"),
    ],
    targets: [
        // System libraries, found through pkg-config and installed from Debian packages.
        .systemLibrary(name: "COpenMPI", pkgConfig: "ompi-c", providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]),
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CLibJPEG", pkgConfig: "libjpeg", providers: [.apt(["libjpeg-dev"])]),
        .systemLibrary(name: "CLibPNG", pkgConfig: "libpng", providers: [.apt(["libpng-dev"])]),
        // oneDNN 3 (the v3 API), in .deps/onednn (scripts/install-onednn.sh: a site's install, or Intel's
        // CPU build from PyPI); the header path and the rpath are set for every target below. It links
        // libgomp too (its OpenMP runtime, which our parallel loops share): libgomp.so is GCC's.
        .systemLibrary(name: "CDNNL"),

        // C shims for what Swift cannot import: MPI's handle macros, and libjpeg/libpng's
        // setjmp/longjmp error handling, which must stay inside C.
        .target(name: "CMPI", dependencies: ["COpenMPI"]),
        .target(name: "CCodecs", dependencies: ["CLibJPEG", "CLibPNG"]),
        // Pointwise kernels built for each x86 vector ISA and chosen at load time (see ckernels.h);
        // no contraction into FMA, so every clone computes the same bits.
        .target(name: "CKernels", cSettings: [.unsafeFlags(["-O3", "-ffp-contract=off"])]),

        .target(
            name: "ConvirtCore",
            dependencies: ["COpenBLAS", "CDNNL", "CKernels", .product(name: "RealModule", package: "swift-numerics")]
        ),
        .target(name: "ConvirtIO", dependencies: ["ConvirtCore", "CZstd", "CZlib", "CCodecs"]),
        .target(name: "ConvirtDistributed", dependencies: ["ConvirtCore", "CKernels", "CMPI"]),
        .target(name: "ConvirtModels", dependencies: ["ConvirtCore", "ConvirtIO"]),
        .target(name: "ConvirtText", dependencies: ["ConvirtCore"]),
        .target(
            name: "ConvirtData",
            dependencies: ["ConvirtCore", "ConvirtIO", "ConvirtText", "CKernels", .product(name: "RealModule", package: "swift-numerics")]
        ),
        // Pretraining: the loop, schedules, checkpoints, the run directory.
        .target(name: "ConvirtTraining", dependencies: ["ConvirtCore", "ConvirtIO", "ConvirtModels", "ConvirtText", "ConvirtData", "ConvirtDistributed"]),
        // The paper's evaluations (classification on the step engine, retrieval), metrics and results files.
        .target(name: "ConvirtEvaluation", dependencies: ["ConvirtCore", "ConvirtIO", "ConvirtModels", "ConvirtText", "ConvirtData", "ConvirtDistributed", "ConvirtTraining"]),
        // The HTML report, its charts, the paper's tables and the metrics log reader.
        .target(name: "ConvirtReport", dependencies: ["ConvirtCore", "ConvirtIO", "ConvirtData", "ConvirtDistributed", "ConvirtTraining", "ConvirtEvaluation"]),
        // Test-only oracles: checked tensor-level kernels (F) and plain reference loops (Reference).
        .target(name: "ConvirtTestSupport", dependencies: ["ConvirtCore", .product(name: "RealModule", package: "swift-numerics")]),
        .executableTarget(
            name: "convirt",
            dependencies: [
                "ConvirtCore", "ConvirtIO", "ConvirtDistributed", "ConvirtModels", "ConvirtText", "ConvirtData", "ConvirtTraining",
                "ConvirtEvaluation", "ConvirtReport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "ConvirtCoreTests",
            dependencies: ["ConvirtCore", "CKernels", "ConvirtIO", "ConvirtTestSupport"],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(
            name: "ConvirtDistributedTests",
            dependencies: ["ConvirtDistributed", "ConvirtCore", "ConvirtModels", "ConvirtData", "ConvirtText", "ConvirtTraining", "ConvirtEvaluation", "ConvirtTestSupport"]
        ),
        .testTarget(name: "ConvirtEvaluationTests", dependencies: ["ConvirtEvaluation", "ConvirtReport", "ConvirtCore", "ConvirtIO"], resources: [.copy("Fixtures")]),
        .testTarget(name: "ConvirtReportTests", dependencies: ["ConvirtReport", "ConvirtEvaluation", "ConvirtTraining", "ConvirtCore", "ConvirtIO"]),
        .testTarget(name: "ConvirtIOTests", dependencies: ["ConvirtIO", "ConvirtCore"], resources: [.copy("Fixtures")]),
        .testTarget(name: "ConvirtModelsTests", dependencies: ["ConvirtModels", "ConvirtCore", "ConvirtIO", "ConvirtText"], resources: [.copy("Fixtures")]),
        .testTarget(name: "ConvirtTextTests", dependencies: ["ConvirtText", "ConvirtCore"], resources: [.copy("Fixtures")]),
        .testTarget(name: "ConvirtDataTests", dependencies: ["ConvirtData", "ConvirtCore", "ConvirtIO", "ConvirtText"]),
        .testTarget(name: "ConvirtCLITests", dependencies: ["convirt", "ConvirtIO", "ConvirtCore", "ConvirtTraining", "ConvirtData", "ConvirtText", "ConvirtModels"],
                    exclude: ["Fixtures"]),
    ]
)

// oneDNN 3's headers for every module that imports CDNNL, directly or through ConvirtCore (ahead of any
// older oneDNN on the system's include path); its library by its file (the system's library directory,
// which other pkg-config files put first on the search path, may hold an older libdnnl.so), found at
// run time through an rpath.
let onednn = Context.packageDirectory + "/.deps/onednn"
for target in package.targets where target.type != .system {
    target.cSettings = (target.cSettings ?? []) + [.unsafeFlags(["-I" + onednn + "/include"])]
    target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-Xcc", "-I" + onednn + "/include"])]
    if target.name == "ConvirtCore" {
        target.linkerSettings = [.unsafeFlags(["-Xlinker", onednn + "/lib/libdnnl.so.3", "-Xlinker", "-rpath", "-Xlinker", onednn + "/lib"])]
    }
}
