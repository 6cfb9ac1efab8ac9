import ArgumentParser
import ConvirtData
import Foundation

struct SynthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "synth", abstract: "Write synthetic datasets in their released layouts.",
                                                    subcommands: [SynthMIMICCommand.self, SynthCheXpertCommand.self, SynthRSNACommand.self,
                                                                  SynthCOVIDxCommand.self, SynthMURACommand.self])
}

struct SynthMIMICCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "mimic", abstract: "A synthetic MIMIC-CXR-JPG (images, reports, CSVs, vocab.txt).")

    @Option(help: "Output directory.") var out: String
    @Option(parsing: .unconditional, help: "Number of studies.") var studies = 2000
    @Option(parsing: .unconditional, help: "Width of the rendered images in pixels.") var imageSize = 512
    @Option(parsing: .unconditional, help: "Seed.") var seed: UInt64 = 0

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

/// Options shared by the downstream synth commands.
struct SynthDownstreamArguments: ParsableArguments {
    @Option(help: "Output directory.") var out: String
    @Option(parsing: .unconditional, help: "Number of items (chexpert: training images, default 4800, plus count/6 in valid.csv; rsna: patients, default 2000; covidx: training images, default 800, plus count/4 in test.txt; mura: training studies, default 800, plus count/4 valid studies).")
    var count: Int?
    @Option(parsing: .unconditional, help: "Seed.") var seed: UInt64 = 0
    @Option(parsing: .unconditional, help: "Width of the rendered images in pixels (RSNA's are square; the released RSNA images are 1024).") var imageSize = 256
    @Option(parsing: .unconditional, help: "How hard the images and labels are: 0 = every finding at full contrast, clean labels; 1 = calibrated (faint to obvious findings, normal variation that mimics disease, the datasets' label noise); above 1 harder.")
    var difficulty = 1.0

    func options() throws -> SynthDownstreamOptions {
        if let count, count <= 0 { throw ValidationError("--count must be positive") }
        guard imageSize >= 32 else { throw ValidationError("--image-size must be at least 32") }
        guard difficulty >= 0 && difficulty <= 3 else { throw ValidationError("--difficulty must be within 0...3, not \(difficulty)") }
        var o = SynthDownstreamOptions()
        o.difficulty = difficulty
        o.count = count
        o.seed = seed
        o.imageSize = imageSize
        return o
    }
}

func runSynth(_ dataset: DownstreamDataset, _ arguments: SynthDownstreamArguments, _ options: SynthDownstreamOptions) throws {
    let start = Date()
    let progress = Progress(total: 1, label: "synth \(dataset.rawValue)")
    let summary = try SynthDownstream.write(dataset, to: arguments.out, options: options) { done, total in progress.update(done, total: total) }
    progress.finish()
    let seconds = Date().timeIntervalSince(start)
    if let labels = options.labelsCSV {
        print(String(format: "rendered %d images for the rows of %@ at their paths under %@ in %.1f s", summary.images["labels"] ?? 0, labels,
                     arguments.out, seconds))
        return
    }
    let images = summary.images.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
    print(String(format: "wrote %@ (%@ images) to %@ in %.1f s", dataset.rawValue, images, summary.root, seconds))
    if let retrieval = summary.retrieval { print("wrote the 8x200 retrieval files to \(retrieval)") }
    print("read it with: --dataset \(dataset.rawValue) --root \(summary.root)")
}

struct SynthCheXpertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chexpert",
        abstract: "A synthetic CheXpert-v1.0-small (train.csv, valid.csv, JPEGs) and the CheXpert 8x200 retrieval files.",
        discussion: "Writes OUT/CheXpert-v1.0-small/ and OUT/chexpert_8x200/{image,text}-retrieval/{candidate,query}.csv. The retrieval images "
            + "are further training patients (in train.csv), as in the released set. With --labels CSV, renders one image per row of a "
            + "CheXpert-format CSV (or an 8x200 query.csv) at OUT/<Path> showing the row's labels, and nothing else.")

    @OptionGroup var common: SynthDownstreamArguments
    @Option(help: "A CheXpert-format CSV: render one image per row at its Path with its labels.") var labels: String?
    @Option(help: "Directory of the 8x200 retrieval files (default OUT/chexpert_8x200).") var retrieval: String?
    @Option(parsing: .unconditional, help: "Retrieval candidates per category (the released set has 200).") var retrievalCandidates = 25
    @Option(parsing: .unconditional, help: "Image queries per retrieval category.") var retrievalQueries = 5
    @Option(parsing: .unconditional, help: "Text queries per retrieval category.") var retrievalTextQueries = 5
    @Flag(help: "Do not write the retrieval files.") var noRetrieval = false

    func run() throws {
        var o = try common.options()
        guard retrievalCandidates > 0, retrievalQueries > 0, retrievalTextQueries > 0 else {
            throw ValidationError("--retrieval-candidates, --retrieval-queries and --retrieval-text-queries must be positive")
        }
        o.labelsCSV = labels
        o.retrievalDirectory = retrieval
        o.writeRetrieval = !noRetrieval
        o.retrievalCandidates = retrievalCandidates
        o.retrievalImageQueries = retrievalQueries
        o.retrievalTextQueries = retrievalTextQueries
        try runSynth(.chexpert, common, o)
    }
}

struct SynthRSNACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rsna", abstract: "A synthetic RSNA Pneumonia stage 2 set (stage_2_train_labels.csv, stage_2_train_images/*.dcm).")
    @OptionGroup var common: SynthDownstreamArguments
    func run() throws { try runSynth(.rsna, common, common.options()) }
}

struct SynthCOVIDxCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "covidx", abstract: "A synthetic COVIDx (train.txt, test.txt, train/ and test/ PNGs).")
    @OptionGroup var common: SynthDownstreamArguments
    @Flag(help: "positive/negative labels (COVIDx 9 and later) instead of normal/pneumonia/COVID-19.") var binary = false
    func run() throws {
        var o = try common.options()
        o.covidxBinary = binary
        try runSynth(.covidx, common, o)
    }
}

struct SynthMURACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mura", abstract: "A synthetic MURA-v1.1 (image path and labeled study CSVs, PNGs by study).")
    @OptionGroup var common: SynthDownstreamArguments
    func run() throws { try runSynth(.mura, common, common.options()) }
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
