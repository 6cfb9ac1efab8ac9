// Radiology report sections: the Findings and Impression sections of a free-text report, split into
// sentences, as ConVIRT samples one sentence per pair. Sections are found and named as MIMIC-CXR's own
// section parser (`section_parser.py` in the MIMIC-CXR code) does: a header is a line's leading
// "NAME:" in capitals ("FINDINGS:", "CHEST, PA AND LATERAL:"), and its name is normalised ("FINDINGS AND
// IMPRESSION" and "CONCLUSION" are the impression, "CHEST, TWO VIEWS" the findings, misspellings as
// MIMIC-CXR has them). A name in other case is a header only where it names a known section
// ("Findings:", "Clinical history:"), so that a labelled line inside a section ("Lungs: clear.") stays
// its text. Every other section is dropped.

import Foundation

public enum ReportSections {
    /// The sections kept, by normalised name.
    public static let kept: Set<String> = ["findings", "impression"]

    /// Normalised names of MIMIC-CXR's section names, their variants and misspellings (lowercased; a name
    /// holding one of the `sectionWords` needs no entry).
    static let aliases: [String: String] = [
        "impressions": "impression", "conclusion": "impression", "conclusions": "impression",
        "findings and impression": "impression", "findings/impression": "impression", "findings/ impression": "impression",
        "impresson": "impression", "imprression": "impression", "imoression": "impression", "impressoin": "impression",
        "imprssion": "impression", "impresion": "impression", "imperssion": "impression", "mpression": "impression",
        "impession": "impression",
        "finding": "findings", "chest, two views": "findings", "reference findings": "findings",
        "findins": "findings", "findindgs": "findings", "findgings": "findings", "findngs": "findings",
        "findnings": "findings", "finidngs": "findings",
        "preamble": "preamble", "comparisons": "comparison", "reference exam": "comparison",
        "comparison exam": "comparison", "comparison film": "comparison", "comparision": "comparison",
        "comparsion": "comparison", "comparrison": "comparison", "comparisions": "comparison",
        "indication": "indication", "idication": "indication", "reason for examination": "indication",
        "reason for exam": "indication", "clinical indication": "indication",
        "examination": "examination", "exam": "examination", "type of examination": "examination",
        "technique": "technique", "clinical history": "history", "clinical information": "history",
        "patient history": "history", "pfi": "history", "notification": "notification",
        "recommendation(s)": "recommendations", "recommendations": "recommendations", "recommendation": "recommendations",
        "date": "date", "comment": "comment", "wet read": "wet read", "wetread": "wet read",
    ]
    /// Words that name a section wherever they stand in a name ("IMPRESSION AND RECOMMENDATION"), in order.
    static let sectionWords = ["impression", "findings", "history", "comparison", "addendum"]
    /// Phrases of capitalised names that describe the views, and head the findings ("PA AND LATERAL VIEWS").
    static let viewPhrases = ["chest", "portable", "pa and lateral", "lateral and pa", "ap and lateral", "lateral and ap",
                              "frontal and", "two views", "frontal view", "pa view", "ap view", "one view", "lateral view",
                              "bone window", "frontal upright", "frontal semi-upright", "ribs", "pa and lat"]

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

    /// The normalised section a known name stands for (nil: none); `capitals` also reads view
    /// descriptions as the findings.
    static func section(named name: String, capitals: Bool) -> String? {
        let n = name.lowercased()
        if let s = aliases[n] { return s }
        if let word = sectionWords.first(where: { n.contains($0) }) { return word }
        if capitals && viewPhrases.contains(where: { n.contains($0) }) { return "findings" }
        return nil
    }

    /// A header at the start of a line, its normalised name and the rest of the line: a name in capitals
    /// (letters, spaces and "()/,-&"), or a known section's name in any case of letters, spaces and "/&",
    /// then ':' and a space or the line's end.
    public static func header(_ line: String) -> (String, String)? {
        let trimmed = line.drop { $0 == " " || $0 == "\t" }
        guard let colon = trimmed.firstIndex(of: ":") else { return nil }
        let rest = trimmed[trimmed.index(after: colon)...]
        guard rest.first.map({ $0 == " " || $0 == "\t" }) ?? true else { return nil }
        let name = trimmed[..<colon].trimmingCharacters(in: .whitespaces)
        guard name.contains(where: \.isLetter) else { return nil }
        if name.allSatisfy({ ("A"..."Z").contains($0) || " ()/,-&".contains($0) }) {
            return (section(named: name, capitals: true) ?? name.lowercased(), String(rest))
        }
        guard name.allSatisfy({ $0.isLetter || " /&".contains($0) }), let known = section(named: name, capitals: false) else { return nil }
        return (known, String(rest))
    }

    /// Abbreviations whose period ends no sentence ("Dr. ___", "10:30 a.m. on ___"), lowercased.
    static let abbreviations: Set<String> = ["dr", "drs", "mr", "mrs", "ms", "vs", "approx", "e.g", "i.e", "a.m", "p.m"]

    /// Sentences of the kept sections with at least `minimumWords` words. Sentences end at '.', '!' or
    /// '?' followed by whitespace (so "4.5 cm" stays whole; not after the `abbreviations`), and at blank
    /// lines (spaces alone count as blank, as MIMIC-CXR writes them); list numbers ("1.") are removed.
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
        func blankLineFollows(_ i: Int) -> Bool {
            var j = i + 1
            while j < scalars.count && (scalars[j] == " " || scalars[j] == "\t") { j += 1 }
            return j < scalars.count && scalars[j] == "\n"
        }
        while i < scalars.count {
            let c = scalars[i]
            current.unicodeScalars.append(c)
            let next = i + 1 < scalars.count ? scalars[i + 1] : " "
            if (c == "." || c == "!" || c == "?") && (next == " " || next == "\n" || next == "\t") {
                if !isListNumber(current) && !(c == "." && endsWithAbbreviation(current)) { finish() }
            } else if c == "\n" && blankLineFollows(i) {
                finish()
            }
            i += 1
        }
        finish()
        return sentences
    }

    /// Whether `text`, ending in '.', ends with one of the `abbreviations` (a whole word).
    static func endsWithAbbreviation(_ text: String) -> Bool {
        let word = text.dropLast().reversed().prefix { !$0.isWhitespace && $0 != "(" }
        return abbreviations.contains(String(word.reversed()).lowercased())
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
