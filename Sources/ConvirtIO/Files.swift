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
}
