// WordPiece against Hugging Face's BertTokenizer on hard sentences (tools/make_tokenizer_reference.py),
// lowercasing and cased, with truncation, padding and the attention mask.

import ConvirtCore
import ConvirtText
import Foundation
import Testing

private func fixture(_ name: String) throws -> String {
    guard let url = Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil) else { throw ConvirtError("missing fixture \(name)") }
    return url.path
}

private struct Reference: Decodable {
    struct Case: Decodable {
        let text: String
        let lowercase: Bool
        let ids: [Int32]
        let max_length_8: [Int32]
    }
    let cases: [Case]
}

@Suite("WordPiece tokenizer")
struct TokenizerTests {
    @Test("equals Hugging Face's BertTokenizer on every reference sentence, cased and uncased")
    func matchesHuggingFace() throws {
        let vocabulary = try Vocabulary(path: fixture("uncased_vocab.txt"))
        let reference = try JSONDecoder().decode(Reference.self, from: Data(contentsOf: URL(fileURLWithPath: fixture("tokenizer_reference.json"))))
        #expect(reference.cases.count >= 30)
        let tokenizers = [true: try WordPieceTokenizer(vocabulary: vocabulary, lowercase: true),
                          false: try WordPieceTokenizer(vocabulary: vocabulary, lowercase: false)]
        for c in reference.cases {
            let tokenizer = tokenizers[c.lowercase]!
            #expect(tokenizer.encode(c.text) == c.ids, "lowercase \(c.lowercase): \(c.text.debugDescription)")
            #expect(tokenizer.encode(c.text, maxLength: 8) == c.max_length_8, "max length 8: \(c.text.debugDescription)")
        }
    }

    @Test("padding and the attention mask of a batch")
    func batch() throws {
        let tokenizer = try WordPieceTokenizer(vocabularyPath: fixture("uncased_vocab.txt"), lowercase: true)
        let (ids, mask) = try tokenizer.encodeBatch(["the heart", "a much longer sentence about the heart size"], maxLength: 6)
        #expect(ids[0] == tokenizer.clsID && ids[3] == tokenizer.sepID && ids[4] == tokenizer.padID && ids[5] == tokenizer.padID)
        #expect(mask == [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1])
        #expect(ids[11] == tokenizer.sepID)
        #expect(throws: ConvirtError.self) { try tokenizer.encodeBatch(["x"], maxLength: 1) }
    }

    @Test("a vocab.txt with CRLF line endings is the same vocabulary (as Python's text mode reads it)")
    func crlfVocabulary() throws {
        let lf = try fixture("uncased_vocab.txt")
        let crlf = FileManager.default.temporaryDirectory.appendingPathComponent("vocab-crlf-\(getpid()).txt").path
        defer { try? FileManager.default.removeItem(atPath: crlf) }
        try String(contentsOfFile: lf, encoding: .utf8).replacingOccurrences(of: "\n", with: "\r\n").write(toFile: crlf, atomically: true, encoding: .utf8)
        let a = try WordPieceTokenizer(vocabularyPath: lf, lowercase: true), b = try WordPieceTokenizer(vocabularyPath: crlf, lowercase: true)
        #expect(a.vocabulary.tokens == b.vocabulary.tokens && a.unknownID == b.unknownID)
        #expect(a.encode("The heart is not enlarged.", maxLength: 16) == b.encode("The heart is not enlarged.", maxLength: 16))
    }

    @Test("a vocabulary without the special tokens, or a missing file, is a clear error")
    func badVocabulary() throws {
        #expect(throws: ConvirtError("vocabulary <memory> has no [UNK] token (one token per line; BERT's vocab.txt)")) { try WordPieceTokenizer(vocabulary: Vocabulary(tokens: ["a", "b"]), lowercase: true) }
        #expect(throws: ConvirtError("cannot read vocabulary /nonexistent/vocab.txt: no such file")) { try Vocabulary(path: "/nonexistent/vocab.txt") }
    }
}
