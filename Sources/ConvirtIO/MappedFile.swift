import ConvirtCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A read-only memory map of a whole file, unmapped when released. Random access without reading.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let bytes: UnsafeRawBufferPointer

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw ConvirtError("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw ConvirtError("cannot stat \(path): \(String(cString: strerror(errno)))") }
        let size = Int(info.st_size)
        if size == 0 {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), base != MAP_FAILED else {
            throw ConvirtError("cannot map \(path): \(String(cString: strerror(errno)))")
        }
        bytes = UnsafeRawBufferPointer(start: base, count: size)
    }

    deinit {
        if let base = bytes.baseAddress { munmap(UnsafeMutableRawPointer(mutating: base), bytes.count) }
    }
}

/// CRC-32 (zlib's) of a byte range, for manifests.
public func crc32Checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
    crc32Update(0, bytes)
}
