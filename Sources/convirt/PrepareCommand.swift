import ArgumentParser
import ConvirtCore
import ConvirtData
import Foundation

struct PrepareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "prepare", abstract: "Prepare a dataset for training.",
                                                    subcommands: [PrepareMIMICCommand.self, PrepareVerifyCommand.self])
}

struct PrepareMIMICCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mimic",
        abstract: "MIMIC-CXR-JPG (files/, the metadata, split and CheXpert CSVs, reports) into shards with an index and a manifest.")

    @Option(help: "The MIMIC-CXR-JPG root (files/pXX/..., mimic-cxr-2.0.0-*.csv[.gz]).") var root: String
    @Option(help: "Root of the reports archive (files/pXX/pSUBJECT/sSTUDY.txt) when not under --root.") var reports: String?
    @Option(help: "Output directory.") var out: String
    @Option(parsing: .unconditional, help: "Longer side of the stored images.") var imageSize = 256
    @Flag(help: "Keep lateral and other non-frontal views too.") var allViews = false
    @Option(parsing: .unconditional, help: "Parallel workers.") var threads = 2

    func run() throws {
        var options = PrepareOptions(root: root, out: out)
        options.reports = reports
        options.imageSize = imageSize
        options.frontalOnly = !allViews
        options.threads = threads
        let start = Date()
        let progress = Progress(total: 0, label: "prepare mimic")
        let summary = try MIMICPrepare.run(options) { done, total in progress.update(done, total: total) }
        progress.finish()
        print(String(format: "prepared %d studies, %d images into %@ in %.1f s (%d shard(s) reused)", summary.studies, summary.images, out,
                     Date().timeIntervalSince(start), summary.reusedShards))
        print("split: " + summary.splits.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        for (reason, d) in summary.dropped.sorted(by: { $0.key < $1.key }) {
            print("skipped \(d.count) (\(reason)), e.g. \(d.examples.prefix(3).joined(separator: "; "))")
        }
        for (reason, d) in summary.kept.sorted(by: { $0.key < $1.key }) {
            print("kept \(d.count) \(reason), e.g. \(d.examples.prefix(3).joined(separator: "; "))")
        }
    }
}

struct PrepareVerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check a prepared dataset: its manifest, index and studies, and every shard's size and CRC-32; exit 1 on any problem.")

    @Argument(help: "The prepared dataset's directory (the one that holds manifest.json).") var directory: String

    func run() throws {
        let problems: [String]
        let dataset: PreparedDataset
        do {
            dataset = try PreparedDataset(path: directory)
            problems = dataset.verify()
        } catch {
            print("\(directory): FAILED: \(error)")
            throw ExitCode(1)
        }
        guard problems.isEmpty else {
            print("\(directory): FAILED: \(problems.joined(separator: "; "))")
            throw ExitCode(1)
        }
        let bytes = dataset.manifest.shards.reduce(0) { $0 + $1.bytes }
        print(String(format: "%@: OK (%d studies, %d images, %d shard(s), %.1f MB checked)", directory as NSString, dataset.studies.count,
                     dataset.images.count, dataset.manifest.shards.count, Double(bytes) / 1e6))
    }
}
