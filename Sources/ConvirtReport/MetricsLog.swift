// Reading a run's metrics.jsonl back (written by Trainer, one flat JSON object per step; field names in
// DESIGN.md, Files) for the report: tolerant of rows without some fields, of a truncated or garbled line
// (the run was killed mid-write), of "NaN"/"Infinity" written as strings, and of the repeated steps that a
// resume from an earlier checkpoint appends (the later row wins). Fast enough for a million rows: a
// small scanner for flat objects instead of a JSON decoder per line.

import ConvirtCore
import ConvirtIO
import ConvirtEvaluation
import ConvirtTraining
import Foundation

public struct MetricsLog: Sendable {
    /// The fields read besides `step`.
    public static let fields = ["epoch", "loss", "loss_v2u", "loss_u2v", "lr", "grad_norm", "pairs_per_s", "world_size",
                                "time_data_s", "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s", "val_loss",
                                "skipped_steps", "tflops_per_rank", "peak_share", "excluded_negatives"]
    static let fieldIndex: [String: Int] = Dictionary(uniqueKeysWithValues: fields.enumerated().map { ($0.element, $0.offset) })

    /// One row: its step and, per field, the value or nil when the row does not have it.
    public struct Row: Sendable {
        public var step: Int
        public var values: [Double?]
        public subscript(_ field: String) -> Double? { MetricsLog.fieldIndex[field].flatMap { values[$0] } }
    }

    /// The step of each row, increasing, one row per step.
    public private(set) var steps: [Int] = []
    /// Row-major [rows, fields] values (columns in `fields` order); `present` says which are there.
    var table: [Double] = []
    var present: [UInt16] = []
    /// Lines that could not be read: (line number, why).
    public var badLines: [(line: Int, reason: String)] = []
    /// Rows replaced by a later row of the same step (a resumed run).
    public var replacedRows = 0

    public init() {}

    public var count: Int { steps.count }
    public var isEmpty: Bool { steps.isEmpty }

    /// `field` of row `index`, nil when the row does not have it.
    public func value(_ field: String, row index: Int) -> Double? {
        guard let j = Self.fieldIndex[field], present[index] & (1 << j) != 0 else { return nil }
        return table[index * Self.fields.count + j]
    }

    public func row(_ index: Int) -> Row {
        Row(step: steps[index], values: Self.fields.indices.map { j in present[index] & (1 << j) != 0 ? table[index * Self.fields.count + j] : nil })
    }

    /// Every row (built on demand; prefer `series`, `value` and `mean` for long logs).
    public var rows: [Row] { steps.indices.map(row) }

    mutating func append(step: Int, values: [Double], mask: UInt16) {
        steps.append(step)
        table += values
        present.append(mask)
    }

    /// Reads `path`; a missing file is an error, bad lines are counted in `badLines`.
    public static func read(_ path: String) throws -> MetricsLog {
        parse(try Files.read(path))
    }

    public static func parse(_ data: Data) -> MetricsLog {
        var log = MetricsLog()
        let width = fields.count
        var values = [Double](repeating: 0, count: width)
        data.withUnsafeBytes { raw in
            let buffer = raw.bindMemory(to: UInt8.self)
            let end = buffer.count
            var start = 0, lineNumber = 0
            while start < end {
                var stop = start
                while stop < end && buffer[stop] != UInt8(ascii: "\n") { stop += 1 }
                lineNumber += 1
                var scanner = FlatObjectScanner(buffer: buffer, position: start, end: stop)
                if scanner.isBlank {
                    // an empty line
                } else if let pairs = scanner.scan() {
                    var step: Int? = nil
                    var mask: UInt16 = 0
                    for (key, value) in pairs {
                        if key == "step" {
                            step = value.isFinite ? Int(exactly: value.rounded()) : nil
                        } else if let j = fieldIndex[key] {
                            values[j] = value
                            mask |= 1 << j
                        }
                    }
                    for j in 0..<width where mask & (1 << j) == 0 { values[j] = 0 }
                    if let step { log.append(step: step, values: values, mask: mask) } else { log.badLines.append((lineNumber, "no step")) }
                } else {
                    log.badLines.append((lineNumber, stop == end ? "truncated last line" : "not a flat JSON object"))
                }
                start = stop + 1
            }
        }
        // Steps out of order or repeated (a resume appends steps again): sort, the later row of a step wins.
        if zip(log.steps, log.steps.dropFirst()).contains(where: { $0 >= $1 }) {
            let order = log.steps.indices.sorted { log.steps[$0] != log.steps[$1] ? log.steps[$0] < log.steps[$1] : $0 < $1 }
            var kept = MetricsLog()
            kept.badLines = log.badLines
            for (k, i) in order.enumerated() {
                if k + 1 < order.count && log.steps[order[k + 1]] == log.steps[i] {
                    kept.replacedRows += 1
                    continue
                }
                kept.append(step: log.steps[i], values: Array(log.table[(i * width)..<((i + 1) * width)]), mask: log.present[i])
            }
            return kept
        }
        return log
    }

    /// (step, value) of every row with a finite `field`.
    public func series(_ field: String) -> [(x: Double, y: Double)] {
        guard let j = Self.fieldIndex[field] else { return [] }
        var out: [(x: Double, y: Double)] = []
        for i in steps.indices where present[i] & (1 << j) != 0 {
            let v = table[i * Self.fields.count + j]
            if v.isFinite { out.append((Double(steps[i]), v)) }
        }
        return out
    }

    /// Rows whose `field` is present but NaN or infinite.
    public func nonFiniteCount(_ field: String) -> Int {
        guard let j = Self.fieldIndex[field] else { return 0 }
        return steps.indices.reduce(0) { $0 + (present[$1] & (1 << j) != 0 && !table[$1 * Self.fields.count + j].isFinite ? 1 : 0) }
    }

    /// Mean of the finite values of `field`, leaving out the first `dropFirst` rows; nil if none.
    public func mean(_ field: String, dropFirst: Int = 0) -> Double? {
        guard let j = Self.fieldIndex[field] else { return nil }
        var sum = 0.0, n = 0
        for i in steps.indices.dropFirst(dropFirst) where present[i] & (1 << j) != 0 {
            let v = table[i * Self.fields.count + j]
            if v.isFinite { sum += v; n += 1 }
        }
        return n == 0 ? nil : sum / Double(n)
    }

    /// Sum of the finite values of `field` over all rows.
    public func sum(_ field: String) -> Double {
        guard let j = Self.fieldIndex[field] else { return 0 }
        var total = 0.0
        for i in steps.indices where present[i] & (1 << j) != 0 {
            let v = table[i * Self.fields.count + j]
            if v.isFinite { total += v }
        }
        return total
    }
}

/// Scans one line holding a flat JSON object (`{"key": value, ...}`): numbers are returned, as are the
/// strings "NaN", "Infinity" and "-Infinity" (how Trainer writes non-finite values); other values
/// (strings, booleans, null, nested objects and arrays) are skipped. Returns nil for anything that is not
/// one complete object.
struct FlatObjectScanner {
    let buffer: UnsafeBufferPointer<UInt8>
    var position: Int
    let end: Int

    init(buffer: UnsafeBufferPointer<UInt8>, position: Int, end: Int) {
        self.buffer = buffer
        self.position = position
        self.end = end
    }

    var isBlank: Bool {
        var p = position
        while p < end && Self.isSpace(buffer[p]) { p += 1 }
        return p == end
    }

    static func isNumberCharacter(_ c: UInt8) -> Bool {
        isDigit(c) || c == UInt8(ascii: "-") || c == UInt8(ascii: "+") || c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
    }

    static func isDigit(_ c: UInt8) -> Bool { c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") }

    static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0D || c == 0x0A }

    mutating func skipSpace() { while position < end && Self.isSpace(buffer[position]) { position += 1 } }

    mutating func expect(_ c: UInt8) -> Bool {
        skipSpace()
        guard position < end && buffer[position] == c else { return false }
        position += 1
        return true
    }

    /// A string's contents (after the opening quote); escapes are kept as written except \" and \\.
    mutating func string() -> String? {
        var bytes: [UInt8] = []
        while position < end {
            let c = buffer[position]
            position += 1
            if c == UInt8(ascii: "\"") { return String(decoding: bytes, as: UTF8.self) }
            if c == UInt8(ascii: "\\") {
                guard position < end else { return nil }
                bytes.append(buffer[position])
                position += 1
            } else {
                bytes.append(c)
            }
        }
        return nil
    }

    /// Skips a nested object or array (strings inside may hold brackets).
    mutating func skipNested() -> Bool {
        var depth = 0
        while position < end {
            let c = buffer[position]
            position += 1
            switch c {
            case UInt8(ascii: "\""): if string() == nil { return false }
            case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 { return true }
            default: break
            }
        }
        return false
    }

    mutating func scan() -> [(String, Double)]? {
        guard expect(UInt8(ascii: "{")) else { return nil }
        var pairs: [(String, Double)] = []
        skipSpace()
        if position < end && buffer[position] == UInt8(ascii: "}") {
            position += 1
            skipSpace()
            return position == end ? pairs : nil
        }
        while true {
            guard expect(UInt8(ascii: "\"")), let key = string(), expect(UInt8(ascii: ":")) else { return nil }
            skipSpace()
            guard position < end else { return nil }
            let c = buffer[position]
            if Self.isDigit(c) || (c == UInt8(ascii: "-") && position + 1 < end && Self.isDigit(buffer[position + 1])) {
                // The number's characters, copied with a terminator for strtod (the line is not terminated).
                var length = 0
                while position + length < end && Self.isNumberCharacter(buffer[position + length]) { length += 1 }
                guard length <= 64 else { return nil }
                let value: Double? = withUnsafeTemporaryAllocation(of: CChar.self, capacity: length + 1) { text in
                    for k in 0..<length { text[k] = CChar(bitPattern: buffer[position + k]) }
                    text[length] = 0
                    var stop: UnsafeMutablePointer<CChar>? = nil
                    let v = strtod(text.baseAddress!, &stop)
                    return stop == text.baseAddress! + length ? v : nil
                }
                guard let value else { return nil }
                position += length
                pairs.append((key, value))
            } else if c == UInt8(ascii: "\"") {
                position += 1
                guard let text = string() else { return nil }
                switch text {
                case "NaN": pairs.append((key, .nan))
                case "Infinity": pairs.append((key, .infinity))
                case "-Infinity": pairs.append((key, -.infinity))
                default: break
                }
            } else if c == UInt8(ascii: "{") || c == UInt8(ascii: "[") {
                guard skipNested() else { return nil }
            } else {
                var matched = false
                for word in ["true", "false", "null"] where end - position >= word.utf8.count {
                    if word.utf8.elementsEqual(buffer[position..<(position + word.utf8.count)]) {
                        position += word.utf8.count
                        matched = true
                        break
                    }
                }
                if !matched { return nil }
            }
            skipSpace()
            guard position < end else { return nil }
            if buffer[position] == UInt8(ascii: ",") { position += 1; continue }
            if buffer[position] == UInt8(ascii: "}") {
                position += 1
                skipSpace()
                return position == end ? pairs : nil
            }
            return nil
        }
    }
}
