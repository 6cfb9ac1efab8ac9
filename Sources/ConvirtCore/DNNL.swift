// oneDNN (Debian's libdnnl-dev, the library PyTorch itself uses on CPUs), wrapped as NIO and swift-crypto
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
        guard let engine else { throw ConvirtError("oneDNN: no CPU engine could be created") }
        return engine
    }

    /// The instruction set oneDNN's kernels use on this CPU (e.g. avx2, avx512_core_amx).
    public static var isa: String {
        switch dnnl_get_effective_cpu_isa() {
        case dnnl_cpu_isa_sse41: return "sse41"
        case dnnl_cpu_isa_avx: return "avx"
        case dnnl_cpu_isa_avx2: return "avx2"
        case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni"
        case dnnl_cpu_isa_avx512_core: return "avx512_core"
        case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni"
        case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16"
        case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx"
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
}

/// Sizes as oneDNN's dims (passed as a pointer to the first of them).
func dnnlDims(_ values: [Int]) -> [Int64] { values.map(Int64.init) }

/// A memory descriptor of `shape` in `tag` (dnnl_format_tag_any lets a primitive choose).
func dnnlDescriptor(_ shape: [Int], _ type: dnnl_data_type_t, _ tag: dnnl_format_tag_t) throws -> dnnl_memory_desc_t {
    var desc = dnnl_memory_desc_t()
    try dnnlCheck(dnnl_memory_desc_init_by_tag(&desc, Int32(shape.count), dnnlDims(shape), type, tag), "memory descriptor \(shape)")
    return desc
}

/// The descriptor of `count` images in the layout of `desc`, a batch of images (fewer: its first ones;
/// more: the layout extended), and those images' bytes, where the batch is image-major and dense (image
/// n starts n times one image's bytes in: NCHW, NHWC, nChw16c, ...); nil for any other layout (a
/// blocked batch dimension, padding or an offset along it).
func dnnlImages(_ desc: dnnl_memory_desc_t, count: Int) -> (desc: dnnl_memory_desc_t, bytes: Int)? {
    var whole = desc
    guard desc.format_kind == dnnl_blocked, desc.ndims >= 1, desc.offset0 == 0, desc.padded_offsets.0 == 0,
          desc.padded_dims.0 == desc.dims.0, desc.dims.0 > 0, count >= 1 else { return nil }
    let blocking = desc.format_desc.blocking
    let blocked = withUnsafeBytes(of: blocking.inner_idxs) { Array($0.bindMemory(to: dnnl_dim_t.self).prefix(Int(blocking.inner_nblks))) }
    guard !blocked.contains(0) else { return nil }
    var image = desc
    image.dims.0 = 1
    image.padded_dims.0 = 1
    let bytes = dnnl_memory_desc_get_size(&image)
    guard dnnl_memory_desc_get_size(&whole) == bytes * Int(desc.dims.0),
          Int(blocking.strides.0) * Int(dnnl_data_type_size(desc.data_type)) == bytes else { return nil }
    var images = desc
    images.dims.0 = Int64(count)
    images.padded_dims.0 = Int64(count)
    return (images, bytes * count)
}

func dnnlSame(_ a: dnnl_memory_desc_t, _ b: dnnl_memory_desc_t) -> Bool {
    var a = a, b = b
    return dnnl_memory_desc_equal(&a, &b) != 0
}

/// A memory object: either bound to the caller's buffer at each call, or owning one.
final class DNNLMemory {
    let memory: dnnl_memory_t
    let desc: dnnl_memory_desc_t

    init(_ desc: dnnl_memory_desc_t, owning: Bool) throws {
        var desc = desc
        var memory: dnnl_memory_t? = nil
        try dnnlCheck(dnnl_memory_create(&memory, &desc, try DNNL.cpuEngine(), owning ? cdnnl_memory_allocate() : nil), "memory")
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
/// shared by every primitive Debian's build runs and lets a primitive run only on the thread that
/// created it; in-process ranks, a process-wide cache of matmuls and evaluation threads break that.
final class DNNLPrimitive {
    let descriptor: dnnl_primitive_desc_t
    let primitive: dnnl_primitive_t
    /// Bytes of scratchpad one execution needs (0: none).
    let scratchpadBytes: Int
    private let scratchpadDesc: dnnl_memory_desc_t

    /// Takes ownership of `descriptor` (created with `dnnlUserScratchpad` attributes).
    init(_ descriptor: dnnl_primitive_desc_t, _ what: String) throws {
        self.descriptor = descriptor
        var primitive: dnnl_primitive_t? = nil
        let status = dnnl_primitive_create(&primitive, descriptor)
        if status != dnnl_success { dnnl_primitive_desc_destroy(descriptor) }
        try dnnlCheck(status, what)
        self.primitive = primitive!
        var desc = dnnl_primitive_desc_query_md(descriptor, dnnl_query_scratchpad_md, 0)?.pointee ?? dnnl_memory_desc_t()
        scratchpadDesc = desc
        scratchpadBytes = desc.ndims > 0 ? dnnl_memory_desc_get_size(&desc) : 0
    }

    /// Creates the descriptor of `operation` (a *_desc_t initialised by the caller) and the primitive;
    /// `attributes` (the caller's, or fresh ones) get the user scratchpad mode.
    convenience init(_ operation: UnsafeRawPointer, attributes: dnnl_primitive_attr_t? = nil, hint: DNNLPrimitive? = nil, _ what: String) throws {
        var descriptor: dnnl_primitive_desc_t? = nil
        try dnnlWithUserScratchpad(attributes, what) { attributes in
            try dnnlCheck(dnnl_primitive_desc_create(&descriptor, operation, attributes, try DNNL.cpuEngine(), hint?.descriptor), what)
        }
        try self.init(descriptor!, what)
    }

    deinit {
        dnnl_primitive_destroy(primitive)
        dnnl_primitive_desc_destroy(descriptor)
    }

    func query(_ what: dnnl_query_t, index: Int32 = 0) -> dnnl_memory_desc_t { dnnl_primitive_desc_query_md(descriptor, what, index).pointee }

    /// oneDNN's name for the kernel it chose (e.g. jit:avx2, brg:avx512_core_amx).
    var implementation: String {
        var name: UnsafePointer<CChar>? = nil
        _ = dnnl_primitive_desc_query(descriptor, dnnl_query_impl_info_str, 0, &name)
        return name.map { String(cString: $0) } ?? "?"
    }

    func execute(_ stream: DNNLStream, _ arguments: [(Int32, DNNLMemory)], _ what: @autoclosure () -> String) throws {
        try execute(stream.stream, arguments.map { dnnl_exec_arg_t(arg: $0.0, memory: $0.1.memory) }, what())
    }

    /// Runs with `args` and the scratchpad (this thread's slot, a memory object of this call's own).
    func execute(_ stream: dnnl_stream_t, _ args: [dnnl_exec_arg_t], _ what: @autoclosure () -> String) throws {
        var args = args
        var scratchpad: dnnl_memory_t? = nil
        defer { if let scratchpad { dnnl_memory_destroy(scratchpad) } }
        if scratchpadBytes > 0 {
            var desc = scratchpadDesc
            let buffer = ThreadScratch.current.reorderSlot(ThreadScratch.scratchpadSlot, bytes: scratchpadBytes)
            try dnnlCheck(dnnl_memory_create(&scratchpad, &desc, try DNNL.cpuEngine(), buffer), what())
            args.append(dnnl_exec_arg_t(arg: cdnnl_arg_scratchpad(), memory: scratchpad))
        }
        try dnnlCheck(dnnl_primitive_execute(primitive, stream, Int32(args.count), &args), what())
        try dnnlCheck(dnnl_stream_wait(stream), what())
    }
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
/// (a sum post-op) instead of overwritten.
final class DNNLReorder {
    let primitive: DNNLPrimitive
    let source: DNNLMemory, destination: DNNLMemory

    init(from: DNNLMemory, to: DNNLMemory, accumulate: Bool) throws {
        source = from
        destination = to
        var attributes: dnnl_primitive_attr_t? = nil
        var postOps: dnnl_post_ops_t? = nil
        if accumulate {
            try dnnlCheck(dnnl_primitive_attr_create(&attributes), "reorder attributes")
            try dnnlCheck(dnnl_post_ops_create(&postOps), "reorder post-ops")
            try dnnlCheck(dnnl_post_ops_append_sum(postOps, 1), "reorder sum post-op")
            try dnnlCheck(dnnl_primitive_attr_set_post_ops(attributes, postOps), "reorder post-ops")
        }
        defer {
            if let postOps { dnnl_post_ops_destroy(postOps) }
            if let attributes { dnnl_primitive_attr_destroy(attributes) }
        }
        var descriptor: dnnl_primitive_desc_t? = nil
        var a = from.desc, b = to.desc
        let engine = try DNNL.cpuEngine()
        try dnnlWithUserScratchpad(attributes, "reorder") { attributes in
            try dnnlCheck(dnnl_reorder_primitive_desc_create(&descriptor, &a, engine, &b, engine, attributes), "reorder")
        }
        primitive = try DNNLPrimitive(descriptor!, "reorder")
    }

    func run(_ stream: DNNLStream) throws {
        try primitive.execute(stream, [(cdnnl_arg_from(), source), (cdnnl_arg_to(), destination)], "reorder")
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
    init(user desc: dnnl_memory_desc_t, primitive: dnnl_memory_desc_t, role: Role, slot: Int) throws {
        let user = try DNNLMemory(desc, owning: false)
        // An accumulating output always goes through a buffer of its own: the primitive overwrites.
        let direct = role != .accumulatingOutput && dnnlSame(desc, primitive)
        let inner = direct ? user : try DNNLMemory(primitive, owning: false)
        let reorder: DNNLReorder?
        if direct {
            reorder = nil
        } else if role == .input {
            reorder = try DNNLReorder(from: user, to: inner, accumulate: false)
        } else {
            reorder = try DNNLReorder(from: inner, to: user, accumulate: role == .accumulatingOutput)
        }
        var primitiveDesc = primitive
        self.user = user
        self.inner = inner
        self.reorder = reorder
        self.slot = slot
        innerBytes = direct ? 0 : dnnl_memory_desc_get_size(&primitiveDesc)
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
