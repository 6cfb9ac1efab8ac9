import ConvirtCore
import Foundation

/// Reading and writing whole files with errors that name the file.
public enum Files {
    public static func read(_ path: String) throws -> Data {
        do {
            return try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe)
        } catch {
            let reason = FileManager.default.fileExists(atPath: path) ? "it cannot be read (\(error.localizedDescription))" : "no such file"
            throw ConvirtError("cannot read \(path): \(reason)")
        }
    }

    /// Writes through a temporary file in the same directory and renames it into place, so that a
    /// reader never sees a half-written file.
    public static func writeAtomically(_ data: Data, to path: String) throws {
        let url = URL(fileURLWithPath: path)
        do {
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try data.write(to: url, options: .atomic)
        } catch {
            throw ConvirtError("cannot write \(path): \(error.localizedDescription)")
        }
    }

    /// Writes `data` to a new file at `path` and fsyncs it; errors name the file and the system's
    /// reason (a full disk is "No space left on device").
    public static func writeDurably(_ data: Data, to path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw ConvirtError("cannot write \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        try writeAll(data, descriptor: fd, path: path)
        if fsync(fd) != 0 { throw ConvirtError("cannot write \(path): fsync failed (\(String(cString: strerror(errno))))") }
    }

    /// Writes all of `bytes` to an open descriptor with write(2) (retrying short writes and EINTR); an
    /// error names `path` and the system's reason ("No space left on device").
    public static func writeAll<D: ContiguousBytes>(_ bytes: D, descriptor fd: Int32, path: String) throws {
        try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            var offset = 0
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw ConvirtError("cannot write \(path): \(String(cString: strerror(errno))) after \(offset) of \(raw.count) bytes")
                }
                offset += n
            }
        }
    }

    /// fsync of a directory (so that renames and new entries in it are durable); best effort.
    public static func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY)
        if fd >= 0 { _ = fsync(fd); close(fd) }
    }

    /// The size of a file, or nil when it does not exist.
    public static func size(_ path: String) -> Int? {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_size) : nil
    }
}
