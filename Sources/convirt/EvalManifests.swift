// The evaluations' manifests (EvaluationManifest): what each eval command pins, how `--manifest M` takes
// a pinned evaluation's settings back, and the check that refuses a checkpoint or data that differ.

import ArgumentParser
import ConvirtCore
import ConvirtData
import ConvirtDistributed
import ConvirtEvaluation
import ConvirtIO
import ConvirtModels
import ConvirtTraining
import Foundation

/// The checkpoint an evaluation read: its step and its manifest's checksum.
func checkpointPin(_ directory: String) throws -> EvaluationManifest.Checkpoint {
    let manifest = try Checkpoints.manifest(directory)
    return EvaluationManifest.Checkpoint(path: directory, step: manifest.state.step, manifestChecksum: manifest.checksum)
}

/// The train, validation and test splits of a downstream dataset: ids relative to `root`, with labels.
func downstreamSplits(_ data: DownstreamData, root: String) -> [String: EvaluationManifest.Split] {
    var out: [String: EvaluationManifest.Split] = [:]
    for (name, images) in [("train", data.train), ("validation", data.validation), ("test", data.test)] {
        out[name] = SplitHash.split(ids: images.map { SplitHash.relative($0.path, to: root) }, labels: images.map(\.targets))
    }
    return out
}

/// `--manifest M`: the pinned manifest, checked (an error names the file and the problem), for `command`.
func pinnedManifest(_ path: String?, command: String) throws -> EvaluationManifest? {
    guard let path else { return nil }
    let manifest = try EvaluationManifest.load(path)
    guard manifest.command == command else {
        throw ConvirtError("--manifest \(path) pins \(manifest.command), not \(command) (run \(manifest.command) with it)")
    }
    return manifest
}

/// The rerun's own manifest against the pinned one: an error listing every difference in the checkpoint
/// and the data (nothing is evaluated then).
func refuseDifferences(_ pinned: EvaluationManifest?, _ mine: EvaluationManifest, path: String?) throws {
    guard let pinned, let path else { return }
    let differences = pinned.differences(mine)
    if !differences.isEmpty {
        throw ConvirtError("--manifest \(path): this is not the pinned evaluation: \(differences.joined(separator: "; ")); nothing was evaluated")
    }
}

/// Runs `body` with the job's communicator and the arguments: with `--manifest`, the pinned evaluation's
/// settings replace the flags' (`pin`); the manifest is read and checked on every rank before anything
/// runs, a failure printed once.
func withPinned<Arguments>(_ command: String, _ collective: CollectiveOptions, manifest: String?, _ arguments: Arguments,
                           pin: (EvaluationManifest) throws -> Arguments,
                           _ body: (Arguments, Communicator, EvaluationManifest?) throws -> Void) throws {
    try withCommunicator(command, collective) { communicator in
        let (pinned, chosen) = try agreeOnStart(command, communicator) { () throws -> (EvaluationManifest?, Arguments) in
            let pinned = try pinnedManifest(manifest, command: command)
            return (pinned, try pinned.map(pin) ?? arguments)
        }
        try body(chosen, communicator, pinned)
    }
}

/// The dataset a manifest pins must be the one given.
func requirePinnedDataset(_ manifest: EvaluationManifest, _ dataset: DownstreamDataset) throws {
    if let pinned = manifest.settings["dataset"], pinned != dataset.rawValue {
        throw ConvirtError("--manifest pins --dataset \(pinned), not \(dataset.rawValue)")
    }
}

/// A pinned setting, parsed: an error names the manifest's key and value.
func pinnedValue<T>(_ manifest: EvaluationManifest, _ key: String, _ parse: (String) -> T?) throws -> T? {
    guard let text = manifest.settings[key] else { return nil }
    guard let value = parse(text) else { throw ConvirtError("evaluation manifest: setting \(key) = \"\(text)\" cannot be read") }
    return value
}

func describeOptional<T>(_ value: T?) -> String { value.map { "\($0)" } ?? "default" }
func parseOptional<T>(_ text: String, _ parse: (String) -> T?) -> T?? { text == "default" ? .some(nil) : parse(text).map { .some($0) } }

extension ClassificationArguments {
    /// The settings that decide a classification result (`options` as resolved).
    func pinnedSettings(_ options: ClassificationOptions) -> [String: String] {
        ["dataset": dataset.rawValue, "init": initialization.rawValue, "preset": preset.rawValue, "fraction": "\(fraction)", "runs": "\(runs)",
         "seed": "\(seed)", "lr": describeOptional(lr), "batch": "\(batch)", "max_epochs": "\(maxEpochs)", "min_epoch_steps": "\(minEpochSteps)",
         "keep_best": keepBest.rawValue, "head_steps": "\(headSteps)", "image_size": "\(options.imageSize)",
         "u_ones": downstreamOptions(seed: seed, uOnes: uOnes).uOnes.sorted().joined(separator: ","),
         "bootstrap_resamples": "\(options.bootstrapResamples)"]
    }

    /// These arguments with the pinned settings (the dataset must be the pinned one; the checkpoint is
    /// the pinned path unless --checkpoint names one, which must then hold the pinned checkpoint).
    func pinned(by manifest: EvaluationManifest) throws -> ClassificationArguments {
        var a = self
        try requirePinnedDataset(manifest, dataset)
        if let v = try pinnedValue(manifest, "init", Initialization.init(rawValue:)) { a.initialization = v }
        if let v = try pinnedValue(manifest, "preset", Preset.init(rawValue:)) { a.preset = v }
        if let v = try pinnedValue(manifest, "fraction", Double.init) { a.fraction = v }
        if let v = try pinnedValue(manifest, "runs", Int.init) { a.runs = v }
        if let v = try pinnedValue(manifest, "seed", UInt64.init) { a.seed = v }
        if let v = try pinnedValue(manifest, "lr", { parseOptional($0, Double.init) }) { a.lr = v }
        if let v = try pinnedValue(manifest, "batch", Int.init) { a.batch = v }
        if let v = try pinnedValue(manifest, "max_epochs", Int.init) { a.maxEpochs = v }
        if let v = try pinnedValue(manifest, "min_epoch_steps", Int.init) { a.minEpochSteps = v }
        if let v = try pinnedValue(manifest, "keep_best", ClassificationOptions.KeepBest.init(rawValue:)) { a.keepBest = v }
        if let v = try pinnedValue(manifest, "head_steps", Int.init) { a.headSteps = v }
        if let v = try pinnedValue(manifest, "image_size", Int.init) { a.imageSize = v }
        if let v = manifest.settings["u_ones"] { a.uOnes = v }
        if let v = PrecisionChoice(rawValue: manifest.precision) { a.precision = v }
        if a.checkpoint == nil { a.checkpoint = manifest.checkpoint?.path }
        a.manifest = nil
        return a
    }
}

extension EvalZeroShot {
    func pinnedSettings(imageSize: Int) -> [String: String] {
        ["dataset": dataset.rawValue, "seed": "\(seed)", "image_size": "\(imageSize)",
         "u_ones": downstreamOptions(seed: seed, uOnes: uOnes).uOnes.sorted().joined(separator: ","),
         "bootstrap_resamples": "\(Bootstrap.defaultResamples)"]
    }

    func pinned(by manifest: EvaluationManifest) throws -> EvalZeroShot {
        var a = self
        try requirePinnedDataset(manifest, dataset)
        if let v = try pinnedValue(manifest, "seed", UInt64.init) { a.seed = v }
        if let v = try pinnedValue(manifest, "image_size", Int.init) { a.imageSize = v }
        if let v = manifest.settings["u_ones"] { a.uOnes = v }
        if let v = PrecisionChoice(rawValue: manifest.precision) { a.precision = v }
        a.manifest = nil
        return a
    }
}

extension EvalRetrieval {
    func pinned(by manifest: EvaluationManifest) throws -> EvalRetrieval {
        var a = self
        if let v = try pinnedValue(manifest, "image_size", Int.init) { a.imageSize = v }
        if let v = PrecisionChoice(rawValue: manifest.precision) { a.precision = v }
        a.manifest = nil
        return a
    }
}

/// The SHA-256 of a prompt set, as `ZeroShotPrompts.json` writes it (sorted keys).
func promptsHash(_ prompts: [String: PromptSet]) -> String { SHA256.hex(Array(ZeroShotPrompts.json(prompts).utf8)) }

/// The held-out studies of a prepared dataset (the first `studies` of `split`, as `HeldOutRetrieval`
/// takes them): each study's id with its sentences.
func heldOutSplits(_ dataset: PreparedDataset, split: String, studies: Int) -> [String: EvaluationManifest.Split] {
    let chosen = dataset.samples(split: split).prefix(studies).map { dataset.studies[$0] }
    return ["studies": SplitHash.split(ids: chosen.map { "\($0.studyID)\t\($0.sentences.joined(separator: " | "))" })]
}

/// The candidate and query lists of CheXpert 8x200: paths relative to `root` (sentences as they are),
/// each with its category.
func retrievalSplits(_ set: RetrievalSet, root: String) -> [String: EvaluationManifest.Split] {
    func ids(_ items: [(String, String)]) -> EvaluationManifest.Split { SplitHash.split(ids: items.map { "\($0.0)\t\($0.1)" }) }
    func labels(_ c: RetrievalCandidate) -> String { c.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\(String(format: "%g", $0.value))" }.joined(separator: ",") }
    return ["candidates": ids(set.candidates.map { ($0.relativePath, labels($0)) }),
            "text_candidates": ids(set.textCandidates.map { ($0.relativePath, labels($0)) }),
            "image_queries": ids(set.imageQueries.map { (SplitHash.relative($0.path, to: root), $0.category) }),
            "text_queries": ids(set.textQueries.map { ($0.text, $0.category) })]
}
