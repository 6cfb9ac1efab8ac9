import ArgumentParser
import ConvirtText
import Foundation

/// `convirt tokenize`: stdin lines -> one line of WordPiece ids each, with [CLS] and [SEP], no padding.
struct TokenizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tokenize", abstract: "WordPiece token ids of each stdin line, as Hugging Face's BertTokenizer.")

    @Option(help: "vocab.txt (one token per line).")
    var vocab: String

    @Flag(inversion: .prefixedNo, help: "Lowercase and strip accents (uncased vocabularies), as train's --lowercase.")
    var lowercase = false

    @Option(parsing: .unconditional, help: "Truncate to this many ids including [CLS] and [SEP].")
    var maxLength: Int?

    func run() throws {
        if let maxLength, maxLength < 2 { throw ValidationError("--max-length must be at least 2") }
        let tokenizer = try WordPieceTokenizer(vocabularyPath: vocab, lowercase: lowercase)
        var output = ""
        while let line = readLine(strippingNewline: true) {
            output += tokenizer.encode(line, maxLength: maxLength).map(String.init).joined(separator: " ")
            output += "\n"
            if output.utf8.count > 1 << 16 { FileHandle.standardOutput.write(Data(output.utf8)); output = "" }
        }
        FileHandle.standardOutput.write(Data(output.utf8))
    }
}
