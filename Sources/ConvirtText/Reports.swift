// Radiology report sections: the Findings and Impression sections of a free-text report, split into
// sentences, as ConVIRT samples one sentence per pair. Headers are lines' leading "NAME:" in any case
// ("FINDINGS:", "Findings:", "IMPRESSION:", "IMPRESSIONS:", ...); every other section is dropped.

import Foundation

public enum ReportSections {
    /// Section names kept, upper-cased, with their common variants.
    public static let kept: Set<String> = ["FINDINGS", "FINDING", "IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"]

    /// The text of the kept sections, in report order.
    public static func keptText(_ report: String) -> String {
        var kept: [String] = []
        var current: String? = nil
        var buffer = ""
        func flush() {
            if let c = current, Self.kept.contains(c) { kept.append(buffer) }
            buffer = ""
        }
        for rawLine in report.replacingOccurrences(of: "\r\n", with: "\n").split(separator: "\n", omittingEmptySubsequences: false) {
            var line = String(rawLine)
            if let (name, rest) = header(line) {
                flush()
                current = name
                line = rest
            }
            if current != nil { buffer += line + "\n" }
        }
        flush()
        return kept.joined(separator: "\n")
    }

    /// A header at the start of a line: up to four words of letters followed by ':'.
    static func header(_ line: String) -> (String, String)? {
        let trimmed = line.drop { $0 == " " || $0 == "\t" }
        guard let colon = trimmed.firstIndex(of: ":") else { return nil }
        let name = trimmed[..<colon].trimmingCharacters(in: .whitespaces)
        guard !name.isEmpty, name.count <= 40,
              name.allSatisfy({ $0.isLetter || $0 == " " || $0 == "/" || $0 == "&" }),
              name.split(separator: " ").count <= 4 else { return nil }
        return (name.uppercased(), String(trimmed[trimmed.index(after: colon)...]))
    }

    /// Sentences of the kept sections with at least `minimumWords` words. Sentences end at '.', '!' or
    /// '?' followed by whitespace (so "4.5 cm" stays whole), and at blank lines; list numbers ("1.")
    /// are removed.
    public static func sentences(_ report: String, minimumWords: Int = 3) -> [String] {
        let text = keptText(report)
        var sentences: [String] = []
        var current = ""
        let scalars = Array(text.unicodeScalars)
        var i = 0
        func finish() {
            let s = normalize(current)
            if s.split(separator: " ").count >= minimumWords { sentences.append(s) }
            current = ""
        }
        while i < scalars.count {
            let c = scalars[i]
            current.unicodeScalars.append(c)
            let next = i + 1 < scalars.count ? scalars[i + 1] : " "
            if (c == "." || c == "!" || c == "?") && (next == " " || next == "\n" || next == "\t") {
                if !isListNumber(current) { finish() }
            } else if c == "\n" && next == "\n" {
                finish()
            }
            i += 1
        }
        finish()
        return sentences
    }

    static func isListNumber(_ s: String) -> Bool {
        let t = s.trimmingCharacters(in: .whitespacesAndNewlines)
        return t.count <= 3 && t.dropLast().allSatisfy(\.isNumber) && t.hasSuffix(".")
    }

    /// Collapses whitespace and strips a leading list number ("2. ").
    static func normalize(_ s: String) -> String {
        var words = s.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).map(String.init)
        if let first = words.first, first.count <= 3, first.hasSuffix("."), first.dropLast().allSatisfy(\.isNumber) { words.removeFirst() }
        return words.joined(separator: " ")
    }
}
