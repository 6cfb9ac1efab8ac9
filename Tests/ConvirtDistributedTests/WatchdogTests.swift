// The collective watchdog's report: which ranks it names and how it groups the others. The exchange
// itself runs under mpirun (ConvirtCLITests, "a stalled rank is named ...").

import ConvirtDistributed
import Foundation
import Testing

@Suite("Collective watchdog report")
struct WatchdogReportTests {
    func activity(_ rank: Int, _ sequence: Int, _ collective: String = "MPI_Allreduce", phase: String = "gradient sync") -> RankActivity {
        RankActivity(rank: rank, host: "node\(rank / 2)", pid: 100 + rank, step: 7, phase: phase, collective: collective, bytes: 4 << 20,
                     waitedSeconds: 30, sequence: sequence)
    }

    @Test("a silent rank is named first; the ranks that answered are grouped by the collective they wait in")
    func silentRank() {
        let report = CollectiveTimeout(timeoutSeconds: 30, graceSeconds: 7.5, worldSize: 4, this: activity(0, 41),
                                       answered: [activity(3, 41), activity(0, 41), activity(1, 41)], silent: [2], expiredHere: true)
        #expect(report.answered.map(\.rank) == [0, 1, 3])
        #expect(report.verdict == "Rank 2 did not answer within 7.5 s: stalled, dead, or working outside any collective (it never reached "
                + "collective #42); ranks 0, 1, 3 waited in MPI_Allreduce #42 (gradient sync, step 7, 4.0 MiB)")
        #expect(report.summary.hasPrefix("collective timeout on rank 0 of 4 (node0, pid 100): waited 30.0 s (the deadline is 30 s) in MPI_Allreduce #42"))
    }

    @Test("ranks in different collectives are told apart, the furthest first; all in one collective blames MPI")
    func mismatch() throws {
        let split = CollectiveTimeout(timeoutSeconds: 30, graceSeconds: 7.5, worldSize: 3, this: activity(1, 41),
                                      answered: [activity(0, 40, "MPI_Bcast", phase: "checkpoint"), activity(1, 41), activity(2, 41)],
                                      silent: [], expiredHere: false)
        #expect(split.verdict == "ranks 1, 2 waited in MPI_Allreduce #42 (gradient sync, step 7, 4.0 MiB); rank 0 waited in MPI_Bcast #41 "
                + "(checkpoint, step 7, 4.0 MiB); the ranks are in different collectives: they called them in different orders")
        #expect(split.summary.contains("another rank timed out after 30 s while this one waited 30.0 s"))
        let stuck = CollectiveTimeout(timeoutSeconds: 30, graceSeconds: 7.5, worldSize: 2, this: activity(0, 9), answered: [activity(0, 9), activity(1, 9)],
                                      silent: [], expiredHere: true)
        #expect(stuck.verdict.hasSuffix("every rank is in this collective, so MPI or the network itself is stuck"))
        // The report file reads back to the same report, with its verdict.
        let data = try JSONEncoder().encode(split)
        let back = try JSONDecoder().decode(CollectiveTimeout.self, from: data)
        #expect(back.verdict == split.verdict && back.answered == split.answered)
        let json = try #require(JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(json["verdict"] as? String == split.verdict && json["grace_s"] as? Double == 7.5)
    }
}
