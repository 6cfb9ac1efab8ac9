// WordPiece tokenisation equal to Hugging Face's BertTokenizer (Devlin et al. 2019; Wu et al. 2016):
// text cleaning, CJK splitting, optional lowercasing with accent stripping, punctuation splitting, then
// greedy longest-match-first word pieces with the "##" continuation prefix.

import ConvirtCore
import Foundation

public struct Vocabulary: Sendable {
    public let tokens: [String]
    /// Ids by each token's UTF-8 bytes, so that lookups are exact, code point by code point, as Hugging
    /// Face's (a Swift String key would take canonically equivalent spellings, "é" and "e\u{301}", as one).
    let ids: [[UInt8]: Int32]
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
        var ids: [[UInt8]: Int32] = [:]
        for (i, t) in tokens.enumerated() { ids[Array(t.utf8)] = Int32(i) }
        self.ids = ids
    }

    public var count: Int { tokens.count }
    public subscript(token: String) -> Int32? { ids[Array(token.utf8)] }
    subscript(utf8 token: [UInt8]) -> Int32? { ids[token] }
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

    /// Refuses a vocabulary with more tokens than the text encoder has embedding rows (`vocabSize`, its
    /// config's vocab_size): a word whose id lies past them would stop a run only when a sentence first
    /// holds it. `model` names where the encoder's size comes from.
    public func requireFits(vocabSize: Int, model: String) throws {
        guard vocabulary.count <= vocabSize else {
            throw ConvirtError("vocabulary \(vocabulary.source) has \(vocabulary.count) tokens, but \(model) has \(vocabSize) "
                               + "(vocab_size): its last \(vocabulary.count - vocabSize) have no embedding (a vocab.txt from another model?)")
        }
    }

    // MARK: character classes (as BertTokenizer's helpers)

    /// Space separators (Zs), the line and paragraph separators U+2028 and U+2029, tab and line ends:
    /// Unicode's White_Space characters that the cleaning leaves (the others are controls).
    static func isWhitespace(_ s: Unicode.Scalar) -> Bool {
        s == " " || s == "\t" || s == "\n" || s == "\r" || s.value == 0x2028 || s.value == 0x2029
            || s.properties.generalCategory == .spaceSeparator
    }

    /// Characters the cleaning removes: controls, formats, surrogates and private use (Cc, Cf, Cs, Co), as
    /// the tokenizers library's BertNormalizer, which BertTokenizer runs (transformers 5; BertTokenizerFast
    /// before). Unassigned code points (Cn) stay and become [UNK], as there; only the Python tokenizer of
    /// transformers 4 (now `BertTokenizerLegacy`) removed them too.
    static func isControl(_ s: Unicode.Scalar) -> Bool {
        if s == "\t" || s == "\n" || s == "\r" { return false }
        switch s.properties.generalCategory {
        case .control, .format, .surrogate, .privateUse: return true
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

    /// The CJK ideograph blocks of Hugging Face's BertNormalizer, whose fifth range starts at U+2B920
    /// (the Python tokenizer's at U+2B820).
    static func isCJK(_ s: Unicode.Scalar) -> Bool {
        switch s.value {
        case 0x4E00...0x9FFF, 0x3400...0x4DBF, 0x20000...0x2A6DF, 0x2A700...0x2B73F, 0x2B740...0x2B81F,
             0x2B920...0x2CEAF, 0xF900...0xFAFF, 0x2F800...0x2FA1F: return true
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
        // No Unicode normalisation apart from the accent stripping's NFD, as Hugging Face's BertNormalizer
        // (the Python tokenizer of transformers 4 composed the text to NFC first).
        var result: [String] = []
        for word in Self.splitOnWhitespace(String(cleaned)) {
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
        let bytes = Array(word.utf8)
        // The UTF-8 offset of each character (code point) and of the end.
        var offsets = [0]
        for s in word.unicodeScalars { offsets.append(offsets.last! + UTF8.width(s)) }
        let count = offsets.count - 1
        if count > maxCharactersPerWord { ids.append(unknownID); return }
        var pieces: [Int32] = []
        var key: [UInt8] = []
        var start = 0
        while start < count {
            var end = count
            var found: Int32?
            while start < end {
                key.removeAll(keepingCapacity: true)
                if start > 0 { key.append(contentsOf: "##".utf8) }
                key.append(contentsOf: bytes[offsets[start]..<offsets[end]])
                if let id = vocabulary[utf8: key] { found = id; break }
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

    /// The text's pieces around the special tokens written in it ("[MASK]"), leftmost first, found code
    /// point by code point: a Swift Character would hide "[UNK]" before a combining mark.
    private func splitOnSpecialTokens(_ text: String) -> [(String, Int32?)] {
        let scalars = Array(text.unicodeScalars)
        guard scalars.contains("[") else { return [(text, nil)] }
        let specials = Self.specialTokens.compactMap { t in vocabulary[t].map { (Array(t.unicodeScalars), $0) } }
        func segment(_ range: Range<Int>) -> (String, Int32?) { (String(String.UnicodeScalarView(scalars[range])), nil) }
        var parts: [(String, Int32?)] = []
        var start = 0, i = 0
        while i < scalars.count {
            if scalars[i] == "[", let (token, id) = specials.first(where: { scalars[i...].starts(with: $0.0) }) {
                if start < i { parts.append(segment(start..<i)) }
                parts.append(("", id))
                i += token.count
                start = i
            } else {
                i += 1
            }
        }
        if start < scalars.count { parts.append(segment(start..<scalars.count)) }
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
