// CSV files as the datasets ship them (RFC 4180: quoted fields, doubled quotes, CRLF), optionally
// gzip-compressed. A file without a required column is an error naming the file and the columns; a
// malformed row is skipped and counted.

import ConvirtCore
import ConvirtIO
import Foundation

public struct CSVTable: Sendable {
    public let path: String
    public let header: [String]
    public let rows: [[String]]
    /// The 1-based line on which each row starts (parallel to `rows`), for messages that name the line.
    public let rowLines: [Int]
    /// Rows skipped because their field count differs from the header's (line numbers, 1-based).
    public let malformedLines: [Int]
    private let columns: [String: Int]

    /// Parses `text`; `required` columns must be present.
    public init(text: String, path: String, required: [String] = [], hasHeader: Bool = true) throws {
        // A byte order mark (spreadsheet exports) is not part of the first column's name.
        var (records, unterminated) = CSVTable.parse(text.unicodeScalars.first == "\u{FEFF}" ? String(text.unicodeScalars.dropFirst()) : text)
        if let line = unterminated {
            // Everything after an unclosed quote would be read as one field: the file cannot be parsed.
            throw ConvirtError("\(path): line \(line): a quoted field is never closed (a stray \" swallows the rest of the file)")
        }
        while let last = records.last, last.fields == [""] || last.fields.isEmpty { records.removeLast() }
        var header: [String] = []
        if hasHeader {
            guard let first = records.first else { throw ConvirtError("\(path): empty CSV file (no header)") }
            header = first.fields.map { $0.trimmingCharacters(in: .whitespaces) }
            records.removeFirst()
        }
        let missing = required.filter { !header.contains($0) }
        if !missing.isEmpty {
            throw ConvirtError("\(path): missing required column(s) \(missing.joined(separator: ", ")) (header: \(header.joined(separator: ",")))")
        }
        var rows: [[String]] = []
        var lines: [Int] = []
        var malformed: [Int] = []
        let width = hasHeader ? header.count : (records.first?.fields.count ?? 0)
        for record in records {
            if record.fields == [""] { continue }  // blank line
            if record.fields.count != width { malformed.append(record.line); continue }
            rows.append(record.fields)
            lines.append(record.line)
        }
        self.path = path
        self.header = header
        self.rows = rows
        self.rowLines = lines
        self.malformedLines = malformed
        self.columns = Dictionary(header.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
    }

    /// Reads `path` (inflating .gz), requiring `required` columns.
    public init(path: String, required: [String] = [], hasHeader: Bool = true) throws {
        try self.init(text: Gzip.readText(path), path: path, required: required, hasHeader: hasHeader)
    }

    public func column(_ name: String) -> Int? { columns[name] }

    /// The field of `row` in column `name` ("" when the column is absent).
    public func value(_ row: [String], _ name: String) -> String {
        guard let i = columns[name], i < row.count else { return "" }
        return row[i]
    }

    struct Record { var fields: [String]; var line: Int }

    /// The records, and the line of a quoted field still open at the end of the text (if any).
    static func parse(_ text: String) -> ([Record], Int?) {
        var records: [Record] = []
        var fields: [String] = []
        var field = ""
        var inQuotes = false
        var line = 1, recordLine = 1
        var iterator = text.unicodeScalars.makeIterator()
        var pending: Unicode.Scalar? = nil
        func next() -> Unicode.Scalar? {
            if let p = pending { pending = nil; return p }
            return iterator.next()
        }
        while let c = next() {
            if inQuotes {
                if c == "\"" {
                    if let n = next() {
                        if n == "\"" { field.unicodeScalars.append("\"") } else { inQuotes = false; pending = n }
                    } else { inQuotes = false }
                } else {
                    if c == "\n" { line += 1 }
                    field.unicodeScalars.append(c)
                }
                continue
            }
            switch c {
            case "\"" where field.isEmpty: inQuotes = true
            case ",": fields.append(field); field = ""
            case "\r": continue
            case "\n":
                fields.append(field); field = ""
                records.append(Record(fields: fields, line: recordLine))
                fields = []
                line += 1
                recordLine = line
            default: field.unicodeScalars.append(c)
            }
        }
        if inQuotes { return (records, recordLine) }
        if !field.isEmpty || !fields.isEmpty {
            fields.append(field)
            records.append(Record(fields: fields, line: recordLine))
        }
        return (records, nil)
    }
}

/// Writes CSV text, quoting fields that need it.
public func csvLine(_ fields: [String]) -> String {
    fields.map { f in
        f.contains(",") || f.contains("\"") || f.contains("\n") ? "\"" + f.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : f
    }.joined(separator: ",") + "\n"
}
