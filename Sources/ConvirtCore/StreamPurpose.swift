// Every purpose a random stream is drawn for, in one place. A stream is keyed by (seed, purpose, keys...),
// so two purposes never share draws; the raw values are part of every run's trajectory (changing one
// changes the numbers a seed gives) and must stay unique.

public enum StreamPurpose: UInt64, Sendable, CaseIterable {
    // Pretraining
    /// The sample order of an epoch (keys: epoch).
    case epochPermutation = 0xE90C
    /// One sample's view, sentence and augmentations (keys: epoch, study; children: `DrawPurpose`).
    case sampleDraws = 0x5A3B
    /// Dropout masks of a training step (keys: step; children: global sample index, site).
    case trainingStep = 0x7A1D
    /// ConVIRT's initialisation (children: 1 image, 2 text, 3 image head, 4 text head).
    case convirtInit = 0x1417

    // Evaluation
    /// The downstream classifier's initialisation (children: 1 encoder, 2 head).
    case classifierInit = 0xC1A5
    /// Dropout masks of a linear-evaluation step (keys: epoch, step).
    case linearStep = 0xD40F
    /// The example order of an evaluation epoch (keys: epoch).
    case evaluationPermutation = 0x5EED
    /// Xor-ed into the seed of the `.evaluationPermutation` stream of fine-tuning's head-only phase.
    case headPhasePermutation = 0x4EAD
    /// Dropout masks of a fine-tuning step (keys: step).
    case fineTuneStep = 0xF17E
    /// Which groups a label fraction keeps.
    case labelFraction = 0xF4AC_7102
    /// Which patients a held-out split takes (keys: the split's purpose).
    case heldOutSplit = 0x5B17

    // Synthetic data
    /// A synthetic MIMIC-CXR study's findings and report (keys: study).
    case synthStudy = 0x5717
    /// A synthetic study's DICOM ids (keys: study, view).
    case synthDicomID = 0xD1C0
    /// A synthetic study's views and image sizes (keys: study).
    case synthViews = 0x7135
    /// The rendering of one synthetic view (keys: study, view).
    case synthRender = 0x1A6E
    /// Synthetic CheXpert (keys: 1 patient, 2 study, 3 validation image, 4 retrieval image, 5 retrieval text, 6 labelled row).
    case synthCheXpert = 0xC4E7
    /// Synthetic RSNA patients (keys: patient).
    case synthRSNA = 0x4550
    /// Synthetic COVIDx patients (keys: patient).
    case synthCOVIDx = 0xC0F1
    /// Synthetic MURA patients (keys: split, patient).
    case synthMURA = 0x3A5A
    /// Bootstrap resamples of a test set (keys: resample).
    case bootstrap = 0xB0B5
}

/// Purposes of the per-sample draws (children of a `.sampleDraws` stream), so that each augmentation has
/// its own stream.
public enum DrawPurpose: UInt64, Sendable { case crop = 1, flip, affine, jitter, blur, sentence, view }

/// Dropout sites that are children of a step's stream, beside the BERT layers' own.
public enum DropoutSite: UInt64, Sendable {
    /// The dropout before the downstream classifier's linear layer.
    case classifier = 0xD0
}

extension RandomStream {
    /// The stream of `purpose` under `seed`, further keyed by `keys`.
    public init(seed: UInt64, _ purpose: StreamPurpose, _ keys: UInt64...) {
        self.init(seed: seed, keys: [purpose.rawValue] + keys)
    }
}
