// oneDNN 3 (the library PyTorch itself uses on CPUs; scripts/install-onednn.sh), wrapped as NIO and swift-crypto
// wrap C: Swift types own every engine, stream, memory and primitive object; a failing status becomes a
// `ConvirtError` naming the operation. oneDNN chooses its own layouts (format_tag_any) for the
// primitives; arguments arrive in the model's plain layouts (NCHW, OIHW) and are reordered at the
// primitive's edge, the reorder doubling as the accumulation (a sum post-op) where the model's
// backward adds into gradients.

import CDNNL
#if canImport(Glibc)
import Glibc
#endif

/// A failing oneDNN status as an error naming the operation.
@inline(__always)
func dnnlCheck(_ status: dnnl_status_t, _ what: @autoclosure () -> String) throws {
    guard status != dnnl_success else { return }
    throw ConvirtError("oneDNN: \(what()) failed: \(String(cString: dnnl_status2str(status)))")
}

public enum DNNL {
    /// The CPU engine, shared by every primitive of the process (engines are thread-safe).
    nonisolated(unsafe) static let engine: dnnl_engine_t? = {
        var engine: dnnl_engine_t? = nil
        return dnnl_engine_create(&engine, dnnl_cpu, 0) == dnnl_success ? engine : nil
    }()

    static func cpuEngine() throws -> dnnl_engine_t {
        guard let engine else { throw ConvirtError(engineProblem ?? "oneDNN: no CPU engine could be created") }
        return engine
    }

    /// Why oneDNN has no CPU engine here (nil where it has one): the library, its threading runtime and
    /// what to install instead.
    public static var engineProblem: String? {
        guard engine == nil else { return nil }
        let sycl = cpuRuntime == "SYCL" ? ", which finds no SYCL CPU device here" : ""
        return "oneDNN \(version) (\(origin)) creates no CPU engine: its CPU kernels run on \(cpuRuntime)\(sycl). convirt needs "
            + "a oneDNN 3 built for GNU OpenMP: scripts/install-onednn.sh installs Intel's own where DNNL_ROOT is not set"
    }

    /// The threading runtime oneDNN's CPU kernels run on (`dnnl_version()`'s cpu_runtime). convirt's own
    /// loops run on GNU OpenMP's team, which a oneDNN built for OpenMP shares (`Parallel.region`).
    public static var cpuRuntime: String {
        guard let v = dnnl_version() else { return "an unknown runtime" }
        switch v.pointee.cpu_runtime {
        case DNNL_RUNTIME_OMP: return "OpenMP"
        case DNNL_RUNTIME_SEQ: return "no threads (sequential)"
        case DNNL_RUNTIME_TBB: return "TBB"
        case DNNL_RUNTIME_THREADPOOL: return "a threadpool"
        case DNNL_RUNTIME_SYCL: return "SYCL"
        case let other: return "runtime \(other)"
        }
    }

    /// The instruction set oneDNN's kernels use on this CPU (e.g. avx2, avx512_core_amx).
    public static var isa: String {
        switch dnnl_get_effective_cpu_isa() {
        case dnnl_cpu_isa_sse41: return "sse41"
        case dnnl_cpu_isa_avx: return "avx"
        case dnnl_cpu_isa_avx2: return "avx2"
        case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni"
        case dnnl_cpu_isa_avx2_vnni_2: return "avx2_vnni_2"
        case dnnl_cpu_isa_avx512_core: return "avx512_core"
        case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni"
        case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16"
        case dnnl_cpu_isa_avx512_core_fp16: return "avx512_core_fp16"
        case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx"
        case dnnl_cpu_isa_avx512_core_amx_fp16: return "avx512_core_amx_fp16"
        default: return "isa \(dnnl_get_effective_cpu_isa().rawValue)"
        }
    }

    /// oneDNN's OpenMP threads (libgomp, loaded with libdnnl): set with the rest of the process's threads.
    static func setThreads(_ count: Int) {
        typealias SetThreads = @convention(c) (Int32) -> Void
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "omp_set_num_threads") else { return }
        unsafeBitCast(symbol, to: SetThreads.self)(Int32(count))
    }

    public static var version: String {
        guard let v = dnnl_version() else { return "unknown" }
        return "\(v.pointee.major).\(v.pointee.minor).\(v.pointee.patch)"
    }

    /// Where the oneDNN library this process runs came from: its file, and what the install step wrote
    /// beside it (`ORIGIN`: a site's install, or the vendor's build from PyPI).
    public static var origin: String {
        guard let name = cdnnl_library_path() else { return "unknown" }
        let loaded = String(cString: name)
        var path = loaded
        if let resolved = realpath(name, nil) {
            path = String(cString: resolved)
            free(resolved)
        }
        // ORIGIN lies beside the lib directory the loader found it through (.deps/onednn/lib, maybe a link).
        func parent(_ p: String) -> String { String(p[..<(p.lastIndex(of: "/") ?? p.endIndex)]) }
        guard let file = fopen(parent(parent(loaded)) + "/ORIGIN", "r") else { return path }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>? = nil
        var capacity = 0
        defer { free(line) }
        guard getline(&line, &capacity, file) > 0, let line else { return path }
        let note = String(cString: line).split(separator: "\n").first.map(String.init) ?? ""
        return note.isEmpty ? path : "\(path) (\(note))"
    }
}

/// Sizes as oneDNN's dims (passed as a pointer to the first of them).
func dnnlDims(_ values: [Int]) -> [Int64] { values.map(Int64.init) }

/// A memory descriptor: oneDNN 3's are objects, owned here and destroyed with this.
final class DNNLDescriptor {
    let md: dnnl_memory_desc_t

    private init(_ md: dnnl_memory_desc_t) { self.md = md }
    deinit { dnnl_memory_desc_destroy(md) }

    /// `shape` in `tag` (dnnl_format_tag_any lets a primitive choose).
    convenience init(_ shape: [Int], _ type: dnnl_data_type_t, _ tag: dnnl_format_tag_t) throws {
        var md: dnnl_memory_desc_t? = nil
        try dnnlCheck(dnnl_memory_desc_create_with_tag(&md, Int32(shape.count), dnnlDims(shape), type, tag), "memory descriptor \(shape)")
        self.init(md!)
    }

    /// `shape` with `strides` (in elements).
    convenience init(_ shape: [Int], _ type: dnnl_data_type_t, strides: [Int]) throws {
        var md: dnnl_memory_desc_t? = nil
        try dnnlCheck(dnnl_memory_desc_create_with_strides(&md, Int32(shape.count), dnnlDims(shape), type, dnnlDims(strides)),
                      "memory descriptor \(shape) with strides \(strides)")
        self.init(md!)
    }

    /// A copy of a descriptor another object owns (a primitive descriptor's answer to a query).
    convenience init(copying existing: const_dnnl_memory_desc_t?) throws {
        var md: dnnl_memory_desc_t? = nil
        try dnnlCheck(dnnl_memory_desc_clone(&md, existing), "copying a memory descriptor")
        self.init(md!)
    }

    var bytes: Int { dnnl_memory_desc_get_size(md) }
    var isFloat32: Bool {
        var type = dnnl_data_type_undef
        return dnnl_memory_desc_query(md, dnnl_query_data_type, &type) == dnnl_success && type == dnnl_f32
    }
    var dimensionCount: Int {
        var n: Int32 = 0
        _ = dnnl_memory_desc_query(md, dnnl_query_ndims_s32, &n)
        return Int(n)
    }
    func same(as other: DNNLDescriptor) -> Bool { dnnl_memory_desc_equal(md, other.md) != 0 }
}

/// The layouts a batch of images may take that are image-major and dense (image n starts n times one
/// image's bytes in), so that a piece of a batch is a view of it.
private let imageMajorTags = [dnnl_nchw, dnnl_nhwc, dnnl_nChw4c, dnnl_nChw8c, dnnl_nChw16c, dnnl_nChw32c]

/// Which of the image-major layouts `desc` (of images of `shape`, `type`) is; nil for any other.
func dnnlImageMajorTag(_ desc: DNNLDescriptor, shape: [Int], _ type: dnnl_data_type_t) -> dnnl_format_tag_t? {
    imageMajorTags.first { tag in (try? DNNLDescriptor(shape, type, tag)).map { $0.same(as: desc) } ?? false }
}

/// A memory object: either bound to the caller's buffer at each call, or owning one.
final class DNNLMemory {
    let memory: dnnl_memory_t
    let desc: DNNLDescriptor

    init(_ desc: DNNLDescriptor, owning: Bool) throws {
        var memory: dnnl_memory_t? = nil
        try dnnlCheck(dnnl_memory_create(&memory, desc.md, try DNNL.cpuEngine(), owning ? cdnnl_memory_allocate() : nil), "memory")
        self.memory = memory!
        self.desc = desc
    }

    deinit { dnnl_memory_destroy(memory) }

    /// The buffer bound now.
    var handle: UnsafeMutableRawPointer? {
        var pointer: UnsafeMutableRawPointer? = nil
        _ = dnnl_memory_get_data_handle(memory, &pointer)
        return pointer
    }

    func bind(_ pointer: UnsafeRawPointer) throws {
        try dnnlCheck(dnnl_memory_set_data_handle(memory, UnsafeMutableRawPointer(mutating: pointer)), "binding a buffer")
    }
}

/// A primitive and its descriptor. Its scratchpad (oneDNN's temporary buffer, e.g. the partial sums
/// of a reduction split over threads) is the caller's: created with `dnnl_scratchpad_mode_user` and
/// bound at each call to the calling thread's scratchpad slot. oneDNN's own (library) scratchpad is
/// shared by every primitive the library runs and lets a primitive run only on the thread that
/// created it; in-process ranks, a process-wide cache of matmuls and evaluation threads break that.
final class DNNLPrimitive {
    let descriptor: dnnl_primitive_desc_t
    let primitive: dnnl_primitive_t
    /// Bytes of scratchpad one execution needs (0: none).
    let scratchpadBytes: Int
    private let scratchpadDesc: DNNLDescriptor?

    /// Takes ownership of `descriptor` (created with `dnnlUserScratchpad` attributes).
    init(_ descriptor: dnnl_primitive_desc_t, _ what: String) throws {
        self.descriptor = descriptor
        var primitive: dnnl_primitive_t? = nil
        let status = dnnl_primitive_create(&primitive, descriptor)
        if status != dnnl_success { dnnl_primitive_desc_destroy(descriptor) }
        try dnnlCheck(status, what)
        self.primitive = primitive!
        let scratchpad = try DNNLDescriptor(copying: dnnl_primitive_desc_query_md(descriptor, dnnl_query_scratchpad_md, 0))
        scratchpadBytes = scratchpad.dimensionCount > 0 ? scratchpad.bytes : 0
        scratchpadDesc = scratchpadBytes > 0 ? scratchpad : nil
    }

    /// The forward primitive's descriptor a backward primitive was made from, kept as long as it.
    private var hint: DNNLPrimitiveDescriptor?

    /// Creates the primitive descriptor with `create` (`dnnlCreateDescriptor`) and the primitive;
    /// `hint`, the descriptor `create` names as its forward hint, is kept with it. Implementations whose
    /// name `declines` (oneDNN's kernels known to be wrong for these shapes) are passed over for the next
    /// one oneDNN offers.
    convenience init(attributes: dnnl_primitive_attr_t? = nil, hint: DNNLPrimitiveDescriptor? = nil, declines: ((String) -> Bool)? = nil,
                     _ what: String, _ create: DNNLCreate) throws {
        let descriptor = try dnnlCreateDescriptor(attributes: attributes, what, create)
        if let declines {
            while declines(dnnlImplementation(descriptor)) {
                guard dnnl_primitive_desc_next_impl(descriptor) == dnnl_success else {
                    dnnl_primitive_desc_destroy(descriptor)
                    throw ConvirtError("oneDNN: \(what): no implementation but \(dnnlImplementation(descriptor)), which gives wrong results here")
                }
            }
        }
        try self.init(descriptor, what)
        self.hint = hint
    }

    deinit {
        dnnl_primitive_destroy(primitive)
        dnnl_primitive_desc_destroy(descriptor)
    }

    /// The memory descriptor the primitive has for `what` (its own copy).
    func query(_ what: dnnl_query_t, index: Int32 = 0) throws -> DNNLDescriptor {
        try DNNLDescriptor(copying: dnnl_primitive_desc_query_md(descriptor, what, index))
    }

    /// oneDNN's name for the kernel it chose (e.g. jit:avx2, brg:avx512_core_amx).
    var implementation: String { dnnlImplementation(descriptor) }

    func execute(_ stream: DNNLStream, _ arguments: [(Int32, DNNLMemory)], _ what: @autoclosure () -> String) throws {
        try execute(stream.stream, arguments.map { dnnl_exec_arg_t(arg: $0.0, memory: $0.1.memory) }, what())
    }

    /// Runs with `args` and the scratchpad (this thread's slot, a memory object of this call's own).
    func execute(_ stream: dnnl_stream_t, _ args: [dnnl_exec_arg_t], _ what: @autoclosure () -> String) throws {
        var args = args
        var scratchpad: dnnl_memory_t? = nil
        defer { if let scratchpad { dnnl_memory_destroy(scratchpad) } }
        if let scratchpadDesc {
            let buffer = ThreadScratch.current.reorderSlot(ThreadScratch.scratchpadSlot, bytes: scratchpadBytes)
            try dnnlCheck(dnnl_memory_create(&scratchpad, scratchpadDesc.md, try DNNL.cpuEngine(), buffer), what())
            args.append(dnnl_exec_arg_t(arg: cdnnl_arg_scratchpad(), memory: scratchpad))
        }
        try dnnlCheck(dnnl_primitive_execute(primitive, stream, Int32(args.count), &args), what())
        try dnnlCheck(dnnl_stream_wait(stream), what())
    }
}

/// oneDNN's name for the kernel a primitive descriptor stands for (e.g. jit:avx2, brg:avx512_core_amx).
func dnnlImplementation(_ descriptor: dnnl_primitive_desc_t) -> String {
    var name: UnsafePointer<CChar>? = nil
    _ = dnnl_primitive_desc_query(descriptor, dnnl_query_impl_info_str, 0, &name)
    return name.map { String(cString: $0) } ?? "?"
}

/// One of oneDNN's *_primitive_desc_create, given the descriptor to fill, the engine and the attributes.
typealias DNNLCreate = (UnsafeMutablePointer<dnnl_primitive_desc_t?>, dnnl_engine_t, dnnl_primitive_attr_t?) -> dnnl_status_t

/// A primitive descriptor from `create`, with `attributes` (the caller's, or fresh ones) set to the user
/// scratchpad mode; the caller owns it.
func dnnlCreateDescriptor(attributes: dnnl_primitive_attr_t?, _ what: String, _ create: DNNLCreate) throws -> dnnl_primitive_desc_t {
    var descriptor: dnnl_primitive_desc_t? = nil
    let engine = try DNNL.cpuEngine()
    try dnnlWithUserScratchpad(attributes, what) { attributes in
        try dnnlCheck(create(&descriptor, engine, attributes), what)
    }
    return descriptor!
}

/// A primitive descriptor alone, no kernel compiled for it: the forward hint of backward primitives.
final class DNNLPrimitiveDescriptor {
    let descriptor: dnnl_primitive_desc_t
    init(_ what: String, _ create: DNNLCreate) throws { descriptor = try dnnlCreateDescriptor(attributes: nil, what, create) }
    deinit { dnnl_primitive_desc_destroy(descriptor) }
}

/// Calls `body` with `attributes` (or fresh ones, destroyed after) set to the user scratchpad mode.
func dnnlWithUserScratchpad(_ attributes: dnnl_primitive_attr_t?, _ what: String, _ body: (dnnl_primitive_attr_t?) throws -> Void) throws {
    var owned: dnnl_primitive_attr_t? = nil
    if attributes == nil { try dnnlCheck(dnnl_primitive_attr_create(&owned), what) }
    defer { if let owned { dnnl_primitive_attr_destroy(owned) } }
    let used = attributes ?? owned
    try dnnlCheck(dnnl_primitive_attr_set_scratchpad_mode(used, dnnl_scratchpad_mode_user), what)
    try body(used)
}

/// A stream: one per owner (streams are not to be shared between threads).
final class DNNLStream {
    let stream: dnnl_stream_t
    init() throws {
        var stream: dnnl_stream_t? = nil
        try dnnlCheck(dnnl_stream_create(&stream, try DNNL.cpuEngine(), dnnl_stream_default_flags.rawValue), "stream")
        self.stream = stream!
    }
    deinit { dnnl_stream_destroy(stream) }
}

/// A reorder between two layouts of one tensor; with `accumulate`, the destination is added to
/// (a sum post-op) instead of overwritten. An accumulation between two fp32 tensors of one layout is
/// an elementwise sum, computed here (the same fp32 additions: oneDNN 3.2's reorder with a sum post-op
/// runs its slow reference kernel for it, 3.5 times the time of 2.6's).
final class DNNLReorder {
    let primitive: DNNLPrimitive?
    let source: DNNLMemory, destination: DNNLMemory
    /// The floats an accumulation of one layout adds (nil: a oneDNN reorder).
    private let sameLayoutFloats: Int?

    init(from: DNNLMemory, to: DNNLMemory, accumulate: Bool) throws {
        source = from
        destination = to
        if accumulate && from.desc.same(as: to.desc) && from.desc.isFloat32 {
            sameLayoutFloats = from.desc.bytes / MemoryLayout<Float>.size
            primitive = nil
            return
        }
        sameLayoutFloats = nil
        var attributes: dnnl_primitive_attr_t? = nil
        var postOps: dnnl_post_ops_t? = nil
        if accumulate {
            try dnnlCheck(dnnl_primitive_attr_create(&attributes), "reorder attributes")
            try dnnlCheck(dnnl_post_ops_create(&postOps), "reorder post-ops")
            try dnnlCheck(dnnl_post_ops_append_sum(postOps, 1, 0, dnnl_data_type_undef), "reorder sum post-op")
            try dnnlCheck(dnnl_primitive_attr_set_post_ops(attributes, postOps), "reorder post-ops")
        }
        defer {
            if let postOps { dnnl_post_ops_destroy(postOps) }
            if let attributes { dnnl_primitive_attr_destroy(attributes) }
        }
        let (a, b) = (from.desc.md, to.desc.md)
        primitive = try DNNLPrimitive(attributes: attributes, "reorder") { descriptor, engine, attributes in
            dnnl_reorder_primitive_desc_create(descriptor, a, engine, b, engine, attributes)
        }
    }

    func run(_ stream: DNNLStream) throws {
        if let count = sameLayoutFloats {
            guard let from = source.handle, let to = destination.handle else { throw ConvirtError("oneDNN: a sum of unbound buffers") }
            Residual.accumulate(to.assumingMemoryBound(to: Float.self), from.assumingMemoryBound(to: Float.self), count: count)
            return
        }
        try primitive?.execute(stream, [(cdnnl_arg_from(), source), (cdnnl_arg_to(), destination)], "reorder")
    }
}

/// One argument of a primitive as the model holds it (a plain layout, the caller's buffer) and as the
/// primitive wants it (oneDNN's layout, in a buffer of its own when that differs). That buffer lives
/// only during one call, so it is not owned here: it is the calling thread's reorder slot `slot`
/// (`ThreadScratch`), shared by every primitive that thread runs, so a network's convolutions need
/// the memory of their largest argument once, not a copy of every activation.
final class DNNLArgument {
    let user: DNNLMemory
    let inner: DNNLMemory
    /// user -> inner for inputs; inner -> user (accumulating or not) for outputs; nil when no reorder is needed.
    let reorder: DNNLReorder?
    let slot: Int
    private let innerBytes: Int

    enum Role { case input, output, accumulatingOutput }

    /// `slot`: distinct for the arguments that one call holds at the same time.
    init(user desc: DNNLDescriptor, primitive: DNNLDescriptor, role: Role, slot: Int) throws {
        let user = try DNNLMemory(desc, owning: false)
        // An accumulating output always goes through a buffer of its own: the primitive overwrites.
        let direct = role != .accumulatingOutput && desc.same(as: primitive)
        let inner = direct ? user : try DNNLMemory(primitive, owning: false)
        let reorder: DNNLReorder?
        if direct {
            reorder = nil
        } else if role == .input {
            reorder = try DNNLReorder(from: user, to: inner, accumulate: false)
        } else {
            reorder = try DNNLReorder(from: inner, to: user, accumulate: role == .accumulatingOutput)
        }
        self.user = user
        self.inner = inner
        self.reorder = reorder
        self.slot = slot
        innerBytes = direct ? 0 : primitive.bytes
    }

    /// Points the primitive's buffer at this thread's slot (grown when needed).
    private func bindInner() throws {
        guard reorder != nil else { return }
        try inner.bind(ThreadScratch.current.reorderSlot(slot, bytes: innerBytes))
    }

    /// Binds the caller's buffer; an input is then reordered into the primitive's layout.
    func input(_ pointer: UnsafeRawPointer, _ stream: DNNLStream) throws {
        try user.bind(pointer)
        try bindInner()
        try reorder?.run(stream)
    }

    /// Binds the caller's buffer for an output (written back by `finish`).
    func output(_ pointer: UnsafeRawPointer) throws {
        try user.bind(pointer)
        try bindInner()
    }

    /// After the primitive: an output in another layout (or accumulated) is reordered into the caller's buffer.
    func finish(_ stream: DNNLStream) throws { try reorder?.run(stream) }
}
