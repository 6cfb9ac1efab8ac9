// The CheXpert 8x200 retrieval sets of the ConVIRT paper (Section 4.3, App. C): 8 categories (Atelectasis,
// Cardiomegaly, Edema, Fracture, No Finding, Pleural Effusion, Pneumonia, Pneumothorax), 200 frontal
// CheXpert training images per category that are positive for that category alone, and queries: images
// (image-to-image) and report-like sentences (text-to-image). Released by the authors as
//   image-retrieval/candidate.csv   CheXpert columns (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 labels)
//   image-retrieval/query.csv       Variable,Path
//   text-retrieval/candidate.csv    CheXpert columns
//   text-retrieval/query.csv        Variable,Text
// with Paths in the CheXpert convention (relative to the parent of the CheXpert directory).

import ConvirtCore
import ConvirtIO
import Foundation

/// A candidate image of a retrieval set.
public struct RetrievalCandidate: Sendable, Equatable {
    /// Absolute path of the image.
    public var path: String
    /// The Path as written in candidate.csv.
    public var relativePath: String
    /// The candidate's label for each category (1, 0 or -1; blank = 0); "No Finding" is its No Finding label.
    public var labels: [String: Float]
}

/// An image query: an image positive for `category`.
public struct RetrievalImageQuery: Sendable, Equatable {
    public var category: String
    /// Absolute path of the image.
    public var path: String
}

/// A text query: a sentence describing `category`.
public struct RetrievalTextQuery: Sendable, Equatable {
    public var category: String
    public var text: String
}

public struct RetrievalSet: Sendable {
    /// The categories, in order of first appearance in image-retrieval/query.csv (then text-retrieval/query.csv).
    public var categories: [String]
    /// The candidates of image-to-image retrieval (image-retrieval/candidate.csv), in file order.
    public var candidates: [RetrievalCandidate]
    /// The candidates of text-to-image retrieval (text-retrieval/candidate.csv), in file order; equal to
    /// `candidates` when both files list the same images (as `convirt synth chexpert` writes them).
    public var textCandidates: [RetrievalCandidate]
    public var imageQueries: [RetrievalImageQuery]
    public var textQueries: [RetrievalTextQuery]
    /// Rows that could not be used (a missing image, a malformed row), by reason.
    public var skipped: [String: Int]
    public var skippedExamples: [String: [String]]

    /// Whether `candidate` is relevant to a query of `category`: its label for the category is 1.
    public func relevant(_ candidate: RetrievalCandidate, _ category: String) -> Bool { Retrieval8x200.relevant(candidate, category) }
}

public enum Retrieval8x200 {
    /// Whether `candidate` is relevant to a query of `category`: its label for the category is 1 (for
    /// "No Finding", its No Finding label).
    public static func relevant(_ candidate: RetrievalCandidate, _ category: String) -> Bool { candidate.labels[category] == 1 }

    /// The paper's 8 categories, in the order of the authors' scripts.
    public static let categories = ["Fracture", "Edema", "Pneumonia", "Cardiomegaly", "Pneumothorax", "Atelectasis", "Pleural Effusion", "No Finding"]

    /// Reads the four CSVs under `queries` (`image-retrieval/` and `text-retrieval/`), resolving image
    /// Paths against the CheXpert directory `root` (or its parent) as the CheXpert reader does. A missing
    /// file, a CSV without its columns, a query category that is not a candidate column, or no usable
    /// candidate or query is an error naming the file; a row whose image is missing is skipped and counted.
    public static func load(root: String, queries: String) throws -> RetrievalSet {
        let dir = try DownstreamReader.chexpertDirectory(root)
        let queries = DownstreamReader.absolutePath(queries)
        var skips = SkipLog()
        func table(_ name: String, _ required: [String]) throws -> CSVTable {
            let file = "\(queries)/\(name)"
            guard DownstreamReader.exists(file) else {
                throw ConvirtError("\(queries): no \(name) (the 8x200 retrieval files: image-retrieval/ and text-retrieval/, each with candidate.csv and query.csv)")
            }
            let t = try CSVTable(path: file, required: required)
            for line in t.malformedLines { skips.add("malformed CSV row", "\(file) line \(line): wrong number of fields") }
            return t
        }
        let imageQueryTable = try table("image-retrieval/query.csv", ["Variable", "Path"])
        let textQueryTable = try table("text-retrieval/query.csv", ["Variable", "Text"])
        var categories: [String] = []
        var firstSeen: [String: String] = [:]  // where each category first appears: "file line N"
        for t in [imageQueryTable, textQueryTable] {
            for (row, line) in zip(t.rows, t.rowLines) {
                let c = t.value(row, "Variable").trimmingCharacters(in: .whitespaces)
                if !c.isEmpty && !categories.contains(c) { categories.append(c); firstSeen[c] = "\(t.path) line \(line)" }
            }
        }
        guard !categories.isEmpty else { throw ConvirtError("\(queries)/image-retrieval/query.csv: no query (no Variable values)") }

        func paths(_ t: CSVTable, _ column: String) throws -> ReleasePaths {
            let rows = zip(t.rows, t.rowLines).map { (t.value($0, column).trimmingCharacters(in: .whitespaces), $1) }.filter { !$0.0.isEmpty }
            return try ReleasePaths.detect(root: dir, file: t.path, rows: rows)
        }
        func candidates(_ name: String) throws -> [RetrievalCandidate] {
            let t = try table(name, ["Path"])
            if let unknown = categories.first(where: { t.column($0) == nil }) {
                throw ConvirtError("\(firstSeen[unknown] ?? queries): query category \(unknown.debugDescription) is not a label column of \(t.path) "
                                   + "(the 8x200 categories: \(Retrieval8x200.categories.joined(separator: ", ")))")
            }
            let resolver = try paths(t, "Path")
            var out: [RetrievalCandidate] = []
            for (row, line) in zip(t.rows, t.rowLines) {
                let relative = t.value(row, "Path").trimmingCharacters(in: .whitespaces)
                var labels: [String: Float] = [:]
                var invalid: String? = nil
                for c in categories {
                    let text = t.value(row, c).trimmingCharacters(in: .whitespaces)
                    guard let v = text.isEmpty ? 0 : Double(text), v == 1 || v == 0 || v == -1 else { invalid = "\(c) = \(text.debugDescription)"; break }
                    labels[c] = Float(v)
                }
                guard !relative.isEmpty, invalid == nil else {
                    skips.add("malformed CSV row", "\(t.path) line \(line): \(invalid ?? "empty Path")")
                    continue
                }
                let path = resolver.resolve(relative)
                guard DownstreamReader.exists(path) else { skips.add("missing image", "\(t.path) line \(line): \(path)"); continue }
                out.append(RetrievalCandidate(path: path, relativePath: relative, labels: labels))
            }
            guard !out.isEmpty else { throw ConvirtError("\(t.path): no usable candidate (\(DownstreamReader.describe(skips)))") }
            return out
        }
        let imageCandidates = try candidates("image-retrieval/candidate.csv")
        let textCandidates = try candidates("text-retrieval/candidate.csv")

        let resolver = try paths(imageQueryTable, "Path")
        var imageQueries: [RetrievalImageQuery] = []
        for (row, line) in zip(imageQueryTable.rows, imageQueryTable.rowLines) {
            let c = imageQueryTable.value(row, "Variable").trimmingCharacters(in: .whitespaces)
            let relative = imageQueryTable.value(row, "Path").trimmingCharacters(in: .whitespaces)
            guard !c.isEmpty, !relative.isEmpty else { skips.add("malformed CSV row", "\(imageQueryTable.path) line \(line): empty Variable or Path"); continue }
            let path = resolver.resolve(relative)
            guard DownstreamReader.exists(path) else { skips.add("missing image", "\(imageQueryTable.path) line \(line): \(path)"); continue }
            imageQueries.append(RetrievalImageQuery(category: c, path: path))
        }
        var textQueries: [RetrievalTextQuery] = []
        for (row, line) in zip(textQueryTable.rows, textQueryTable.rowLines) {
            let c = textQueryTable.value(row, "Variable").trimmingCharacters(in: .whitespaces)
            let text = textQueryTable.value(row, "Text").trimmingCharacters(in: .whitespacesAndNewlines)
            guard !c.isEmpty, !text.isEmpty else { skips.add("malformed CSV row", "\(textQueryTable.path) line \(line): empty Variable or Text"); continue }
            textQueries.append(RetrievalTextQuery(category: c, text: text))
        }
        guard !imageQueries.isEmpty else { throw ConvirtError("\(imageQueryTable.path): no usable query (\(DownstreamReader.describe(skips)))") }
        guard !textQueries.isEmpty else { throw ConvirtError("\(textQueryTable.path): no usable query (\(DownstreamReader.describe(skips)))") }
        return RetrievalSet(categories: categories, candidates: imageCandidates, textCandidates: textCandidates, imageQueries: imageQueries,
                            textQueries: textQueries, skipped: skips.counts, skippedExamples: skips.examples)
    }
}
