import ArgumentParser
import ConvirtData
import Foundation

struct SynthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "synth", abstract: "Write synthetic datasets in their released layouts.",
                                                    subcommands: [SynthMIMICCommand.self])
}

struct SynthMIMICCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "mimic", abstract: "A synthetic MIMIC-CXR-JPG (images, reports, CSVs, vocab.txt).")

    @Option(help: "Output directory.") var out: String
    @Option(help: "Number of studies.") var studies = 2000
    @Option(help: "Width of the rendered images in pixels.") var imageSize = 512
    @Option(help: "Seed.") var seed: UInt64 = 0

    func run() throws {
        guard studies > 0, imageSize >= 64 else { throw ValidationError("--studies must be positive and --image-size at least 64") }
        var options = SynthMIMICOptions()
        options.studies = studies
        options.imageSize = imageSize
        options.seed = seed
        let start = Date()
        let progress = Progress(total: studies, label: "synth mimic")
        let images = try SynthMIMIC.write(to: out, options: options) { progress.update($0) }
        progress.finish()
        print(String(format: "wrote %d studies, %d images to %@ in %.1f s", studies, images, out, Date().timeIntervalSince(start)))
    }
}

/// A progress line on a terminal (stderr), nothing otherwise.
final class Progress: @unchecked Sendable {
    var total: Int
    let label: String
    let tty = isatty(STDERR_FILENO) != 0
    let start = Date()
    let lock = NSLock()
    var last = Date.distantPast

    init(total: Int, label: String) { self.total = total; self.label = label }

    func update(_ done: Int, total newTotal: Int? = nil) {
        guard tty else { return }
        lock.lock(); defer { lock.unlock() }
        if let newTotal { total = newTotal }
        let now = Date()
        if now.timeIntervalSince(last) < 0.2 && done < total { return }
        last = now
        let elapsed = now.timeIntervalSince(start)
        let rate = Double(done) / max(elapsed, 1e-9)
        let eta = rate > 0 ? Double(total - done) / rate : 0
        let width = 30, filled = total > 0 ? width * done / total : width
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        FileHandle.standardError.write(Data(String(format: "\r%@ [%@] %d/%d %.0f/s ETA %.0fs ", label, bar, done, total, rate, eta).utf8))
    }

    func finish() { if tty { FileHandle.standardError.write(Data("\n".utf8)) } }
}
