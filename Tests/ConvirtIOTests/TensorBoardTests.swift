// TensorBoard's event-file framing and Event encoding, against bytes written by the tensorboard package's
// RecordWriter and event_pb2 (tensorboard 2.21: Event(wall_time=1.5, step=0, file_version="brain.Event:2"),
// then Event(wall_time=1.5, step=7, summary=[train/loss 2.25, val/loss -0.5]); a SessionLog START at 31).

import ConvirtIO
import Foundation
import Testing

@Suite("TensorBoard event files")
struct TensorBoardTests {
    static func bytes(_ hex: String) -> [UInt8] {
        var out: [UInt8] = [], chars = Array(hex)
        while chars.count >= 2 { out.append(UInt8(String(chars[0..<2]), radix: 16)!); chars.removeFirst(2) }
        return out
    }

    @Test("CRC-32C and TFRecord framing equal the tensorboard package's bytes")
    func framing() {
        #expect(TensorBoard.crc32c(Array("123456789".utf8)) == 0xE306_9283)
        let written = TensorBoard.record(TensorBoard.event(wallTime: 1.5, step: 0, fileVersion: "brain.Event:2"))
            + TensorBoard.record(TensorBoard.event(wallTime: 1.5, step: 7, scalars: [("train/loss", 2.25), ("val/loss", -0.5)]))
        let python = Self.bytes("1800000000000000a37f4b2209000000000000f83f1a0d627261696e2e4576656e743a322a28646c31000000000000009d8383e9"
                                + "09000000000000f83f10072a240a110a0a747261696e2f6c6f737315000010400a0f0a0876616c2f6c6f737315000000bf1c68f251")
        #expect(written == python)
        #expect(TensorBoard.event(wallTime: 2, step: 31, restart: true) == Self.bytes("090000000000000040101f3a020801"))
    }

    @Test("a writer makes a new file per invocation, never overwriting one")
    func files() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("convirt-tb-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let now = Date(timeIntervalSince1970: 1_700_000_000)
        let a = try TensorBoardWriter(directory: dir, now: now), b = try TensorBoardWriter(directory: dir, restartStep: 5, now: now)
        try a.scalars([("train/loss", 1)], step: 1)
        #expect(a.path != b.path && a.path.contains("events.out.tfevents.1700000000.") && b.path.hasSuffix(".1"))
        let data = try Data(contentsOf: URL(fileURLWithPath: a.path))
        let header = TensorBoard.record(TensorBoard.event(wallTime: 1.7e9, step: 0, fileVersion: "brain.Event:2"))
        #expect(Array(data.prefix(header.count)) == header && data.count > header.count, "the version record first, then the scalars")
    }
}
