// WordPiece tokenisation equal to Hugging Face's BertTokenizer (Devlin et al. 2019; Wu et al. 2016):
// text cleaning, CJK splitting, optional lowercasing with accent stripping, punctuation splitting, then
// greedy longest-match-first word pieces with the "##" continuation prefix.

import ConvirtCore
import Foundation

public struct Vocabulary: Sendable {
    public let tokens: [String]
    public let ids: [String: Int32]
    /// Where it was read from (for messages).
    public let source: String

    /// One token per line; the id is the line number (as Hugging Face's load_vocab: later duplicates
    /// win). Lines may end in CRLF, as Python's text mode reads them (a file saved on Windows).
    public init(path: String) throws {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConvirtError("cannot read vocabulary \(path): \(FileManager.default.fileExists(atPath: path) ? "not UTF-8 text" : "no such file")")
        }
        // Split on the scalar (a Swift Character holds "\r\n" whole), then drop a line's trailing "\r".
        var lines = text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).map { line in
            String(String.UnicodeScalarView(line.last == "\r" ? line.dropLast() : line[...]))
        }
        if lines.last == "" { lines.removeLast() }
        try self.init(tokens: lines, source: path)
    }

    public init(tokens: [String], source: String = "<memory>") throws {
        guard !tokens.isEmpty else { throw ConvirtError("vocabulary \(source) is empty") }
        self.source = source
        self.tokens = tokens
        var ids: [String: Int32] = [:]
        for (i, t) in tokens.enumerated() { ids[t] = Int32(i) }
        self.ids = ids
    }

    public var count: Int { tokens.count }
    public subscript(token: String) -> Int32? { ids[token] }
}

public struct WordPieceTokenizer: Sendable {
    public let vocabulary: Vocabulary
    public let lowercase: Bool
    public let stripAccents: Bool
    public let maxCharactersPerWord = 100
    public let unknownID, clsID, sepID, padID: Int32
    public static let specialTokens = ["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]

    /// `lowercase` as BertTokenizer's do_lower_case (accents are stripped when lowercasing, unless
    /// `stripAccents` says otherwise).
    public init(vocabulary: Vocabulary, lowercase: Bool, stripAccents: Bool? = nil) throws {
        self.vocabulary = vocabulary
        self.lowercase = lowercase
        self.stripAccents = stripAccents ?? lowercase
        func special(_ t: String) throws -> Int32 {
            guard let id = vocabulary[t] else { throw ConvirtError("vocabulary \(vocabulary.source) has no \(t) token (one token per line; BERT's vocab.txt)") }
            return id
        }
        unknownID = try special("[UNK]"); clsID = try special("[CLS]"); sepID = try special("[SEP]"); padID = try special("[PAD]")
    }

    public init(vocabularyPath: String, lowercase: Bool) throws {
        try self.init(vocabulary: Vocabulary(path: vocabularyPath), lowercase: lowercase)
    }

    // MARK: character classes (as BertTokenizer's helpers)

    static func isWhitespace(_ s: Unicode.Scalar) -> Bool {
        s == " " || s == "\t" || s == "\n" || s == "\r" || s.properties.generalCategory == .spaceSeparator
    }

    static func isControl(_ s: Unicode.Scalar) -> Bool {
        if s == "\t" || s == "\n" || s == "\r" { return false }
        switch s.properties.generalCategory {
        case .control, .format, .surrogate, .privateUse, .unassigned: return true
        default: return false
        }
    }

    static func isPunctuation(_ s: Unicode.Scalar) -> Bool {
        let v = s.value
        if (33...47).contains(v) || (58...64).contains(v) || (91...96).contains(v) || (123...126).contains(v) { return true }
        switch s.properties.generalCategory {
        case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation, .initialPunctuation,
             .finalPunctuation, .otherPunctuation: return true
        default: return false
        }
    }

    static func isCJK(_ s: Unicode.Scalar) -> Bool {
        switch s.value {
        case 0x4E00...0x9FFF, 0x3400...0x4DBF, 0x20000...0x2A6DF, 0x2A700...0x2B73F, 0x2B740...0x2B81F,
             0x2B820...0x2CEAF, 0xF900...0xFAFF, 0x2F800...0x2FA1F: return true
        default: return false
        }
    }

    /// Python's str.split(): runs of whitespace (including the ASCII separators 0x1C-0x1F) separate words.
    static func splitOnWhitespace(_ text: String) -> [String] {
        var words: [String] = []
        var current = String.UnicodeScalarView()
        for s in text.unicodeScalars {
            if isWhitespace(s) || (0x1C...0x1F).contains(s.value) || s.value == 0x0B || s.value == 0x0C || s.value == 0x85 {
                if !current.isEmpty { words.append(String(current)); current = String.UnicodeScalarView() }
            } else {
                current.append(s)
            }
        }
        if !current.isEmpty { words.append(String(current)) }
        return words
    }

    // MARK: basic tokenisation

    /// Whitespace and punctuation split words, lowercased and accent-stripped when asked.
    public func basicTokens(_ text: String) -> [String] {
        var cleaned = String.UnicodeScalarView()
        for s in text.unicodeScalars {
            if s.value == 0 || s.value == 0xFFFD || Self.isControl(s) { continue }
            if Self.isCJK(s) {
                cleaned.append(" "); cleaned.append(s); cleaned.append(" ")
            } else {
                cleaned.append(Self.isWhitespace(s) ? " " : s)
            }
        }
        let normalized = String(cleaned).precomposedStringWithCanonicalMapping
        var result: [String] = []
        for word in Self.splitOnWhitespace(normalized) {
            var token = word
            if lowercase { token = token.lowercased() }
            if stripAccents {
                token = String(String.UnicodeScalarView(token.decomposedStringWithCanonicalMapping.unicodeScalars.filter {
                    $0.properties.generalCategory != .nonspacingMark
                }))
            }
            var piece = String.UnicodeScalarView()
            for s in token.unicodeScalars {
                if Self.isPunctuation(s) {
                    if !piece.isEmpty { result.append(String(piece)); piece = String.UnicodeScalarView() }
                    result.append(String(s))
                } else {
                    piece.append(s)
                }
            }
            if !piece.isEmpty { result.append(String(piece)) }
        }
        return result
    }

    /// Greedy longest-match-first word pieces of one word; [UNK] when a piece cannot be matched or the
    /// word has more than 100 characters.
    public func wordPieces(_ word: String, into ids: inout [Int32]) {
        let chars = Array(word.unicodeScalars)
        if chars.count > maxCharactersPerWord { ids.append(unknownID); return }
        var pieces: [Int32] = []
        var start = 0
        while start < chars.count {
            var end = chars.count
            var found: Int32?
            while start < end {
                var sub = String(String.UnicodeScalarView(chars[start..<end]))
                if start > 0 { sub = "##" + sub }
                if let id = vocabulary[sub] { found = id; break }
                end -= 1
            }
            guard let id = found else { ids.append(unknownID); return }
            pieces.append(id)
            start = end
        }
        ids.append(contentsOf: pieces)
    }

    /// Token ids of `text` without [CLS]/[SEP]. Special tokens written in the text ("[MASK]") map to
    /// their ids, as in Hugging Face.
    public func tokenIDs(_ text: String) -> [Int32] {
        var ids: [Int32] = []
        for (segment, special) in splitOnSpecialTokens(text) {
            if let special { ids.append(special); continue }
            for token in basicTokens(segment) { wordPieces(token, into: &ids) }
        }
        return ids
    }

    private func splitOnSpecialTokens(_ text: String) -> [(String, Int32?)] {
        guard text.contains("[") else { return [(text, nil)] }
        var parts: [(String, Int32?)] = []
        var rest = Substring(text)
        outer: while !rest.isEmpty {
            var earliest: (Range<Substring.Index>, Int32)?
            for token in Self.specialTokens {
                guard let id = vocabulary[token], let r = rest.range(of: token) else { continue }
                if earliest == nil || r.lowerBound < earliest!.0.lowerBound { earliest = (r, id) }
            }
            guard let (r, id) = earliest else { parts.append((String(rest), nil)); break outer }
            if r.lowerBound > rest.startIndex { parts.append((String(rest[..<r.lowerBound]), nil)) }
            parts.append(("", id))
            rest = rest[r.upperBound...]
        }
        return parts
    }

    /// [CLS] ids [SEP], truncated to `maxLength` when given (the [SEP] is kept).
    public func encode(_ text: String, maxLength: Int? = nil) -> [Int32] {
        var ids = tokenIDs(text)
        if let maxLength { ids = Array(ids.prefix(max(0, maxLength - 2))) }
        return [clsID] + ids + [sepID]
    }

    /// A padded batch: ids and attention mask [texts.count, maxLength] row-major.
    public func encodeBatch(_ texts: [String], maxLength: Int) throws -> (ids: [Int32], mask: [Int32]) {
        try require(maxLength >= 2, "tokenizer", "max length \(maxLength) leaves no room for [CLS] and [SEP]")
        var ids = [Int32](repeating: padID, count: texts.count * maxLength), mask = [Int32](repeating: 0, count: texts.count * maxLength)
        for (row, text) in texts.enumerated() {
            let encoded = encode(text, maxLength: maxLength)
            for (j, id) in encoded.enumerated() {
                ids[row * maxLength + j] = id
                mask[row * maxLength + j] = 1
            }
        }
        return (ids, mask)
    }
}
