// A request to stop a run cleanly: SIGUSR1, which mpirun forwards to every rank and Slurm sends ahead
// of a job's time limit (`#SBATCH --signal=B:USR1@SECONDS`). The handler records it and nothing else;
// the ranks learn of it as they start the next step (with the global batch's lengths), all stop before
// it, and the run checkpoints and stops.
// SIGTERM and SIGINT keep their default action (a job being killed ends at once).

import CKernels
import Glibc

public enum StopRequest {
    /// The signal that asks a run to checkpoint and stop.
    public static let signal = SIGUSR1
    /// The exit status of a run stopped on request (sysexits' EX_TEMPFAIL: resume it later).
    public static let exitStatus: Int32 = 75

    /// Installs the handler (once per process is enough; again is harmless).
    public static func install() {
        _ = ck_stop_signal_install(signal)
    }

    /// Whether the signal has come to this process since `install`.
    public static var received: Bool { ck_stop_signal_received() != 0 }

    /// The signal's name, for messages.
    public static let name = "SIGUSR1"
}
