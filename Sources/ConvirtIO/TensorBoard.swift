// TensorBoard event files: TFRecord framing (length, masked CRC-32C of the length, data, masked CRC-32C
// of the data) around `Event` protocol buffers, encoded by hand for the few fields scalars need (a small
// encoder reads simpler than generated swift-protobuf messages for five fields):
//
//   Event    { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//              SessionLog session_log = 7; }
//   Summary  { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
//   SessionLog { SessionStatus status = 1; }  (START = 1: a restart; TensorBoard drops what the earlier
//                                               file logged at this step and after)

import ConvirtCore
import Foundation

public enum TensorBoard {
    /// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
    public static func crc32c<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes { crc = crcTable[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }

    /// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
    public static func maskedCRC<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        let crc = crc32c(bytes)
        return ((crc >> 15) | (crc << 17)) &+ 0xA282_EAD8
    }

    static let crcTable: [UInt32] = (0..<256).map { n in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0x82F6_3B78 ^ (c >> 1) : c >> 1 }
        return c
    }

    /// One TFRecord: uint64 length, masked CRC of those 8 bytes, the data, masked CRC of the data (little-endian).
    public static func record(_ data: [UInt8]) -> [UInt8] {
        let length = littleEndian(UInt64(data.count))
        return length + littleEndian(maskedCRC(length)) + data + littleEndian(maskedCRC(data))
    }

    /// An `Event`: its wall time and step, and a file version, scalars or a restart marker.
    public static func event(wallTime: Double, step: Int, fileVersion: String? = nil, scalars: [(tag: String, value: Float)] = [],
                             restart: Bool = false) -> [UInt8] {
        var out: [UInt8] = [0x09] + littleEndian(wallTime.bitPattern)
        if step != 0 { out += [0x10] + varint(UInt64(bitPattern: Int64(step))) }
        if let fileVersion { out += lengthDelimited(3, Array(fileVersion.utf8)) }
        if !scalars.isEmpty {
            var summary: [UInt8] = []
            for (tag, value) in scalars {
                let entry = lengthDelimited(1, Array(tag.utf8)) + [0x15] + littleEndian(value.bitPattern)
                summary += lengthDelimited(1, entry)
            }
            out += lengthDelimited(5, summary)
        }
        if restart { out += lengthDelimited(7, [0x08, 0x01]) }
        return out
    }

    static func lengthDelimited(_ field: UInt64, _ bytes: [UInt8]) -> [UInt8] {
        varint(field << 3 | 2) + varint(UInt64(bytes.count)) + bytes
    }

    static func varint(_ value: UInt64) -> [UInt8] {
        var v = value, out: [UInt8] = []
        repeat {
            let byte = UInt8(v & 0x7F)
            v >>= 7
            out.append(v == 0 ? byte : byte | 0x80)
        } while v != 0
        return out
    }

    static func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }
}

/// An event file `DIR/events.out.tfevents.<unix time>.<host>` (a new one per writer: a resumed run adds
/// a file, and TensorBoard reads the directory's files as one run). Every event is written with write(2)
/// as it comes, so that TensorBoard shows a live run and a full disk is an error naming the file.
public final class TensorBoardWriter {
    public let path: String
    let descriptor: Int32

    /// Opens a new event file in `directory` (created if needed) and writes its version record; with
    /// `restartStep`, also a restart marker, so that TensorBoard drops what an earlier file logged at
    /// that step and after (the steps a resumed run computes again).
    public init(directory: String, restartStep: Int? = nil, now: Date = Date()) throws {
        do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw ConvirtError("cannot create \(directory): \((error as NSError).localizedFailureReason ?? error.localizedDescription)")
        }
        var name = [CChar](repeating: 0, count: 256)
        gethostname(&name, 255)
        let hostname = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let host = hostname.isEmpty ? "localhost" : hostname
        let base = "\(directory)/events.out.tfevents.\(Int(now.timeIntervalSince1970)).\(host)"
        var candidate = base, suffix = 0
        var fd: Int32 = -1
        // Two writers within a second (a quick resume) get distinct files.
        while true {
            fd = open(candidate, O_WRONLY | O_CREAT | O_EXCL, 0o644)
            if fd >= 0 || errno != EEXIST { break }
            suffix += 1
            candidate = "\(base).\(suffix)"
        }
        guard fd >= 0 else { throw ConvirtError("cannot create \(candidate): \(String(cString: strerror(errno)))") }
        descriptor = fd
        path = candidate
        let wall = now.timeIntervalSince1970
        try append(TensorBoard.event(wallTime: wall, step: 0, fileVersion: "brain.Event:2"))
        if let restartStep { try append(TensorBoard.event(wallTime: wall, step: restartStep, restart: true)) }
    }

    deinit { close(descriptor) }

    /// Scalars of one step, as one event.
    public func scalars(_ values: [(tag: String, value: Double)], step: Int, wallTime: Double = Date().timeIntervalSince1970) throws {
        guard !values.isEmpty else { return }
        try append(TensorBoard.event(wallTime: wallTime, step: step, scalars: values.map { ($0.tag, Float($0.value)) }))
    }

    /// The events written so far on the disk (fsync), before a checkpoint that covers them is published.
    public func synchronize() throws {
        guard fsync(descriptor) == 0 else { throw ConvirtError("cannot sync \(path): \(String(cString: strerror(errno)))") }
    }

    func append(_ event: [UInt8]) throws {
        try Files.writeAll(TensorBoard.record(event), descriptor: descriptor, path: path)
    }
}
