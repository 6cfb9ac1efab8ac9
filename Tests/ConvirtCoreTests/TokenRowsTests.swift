// Packed token rows (TokenRows.swift): where each valid token lies, the groups rounded by rows of no
// sample, the runs that dropout keys by position, and the scatter to and gather from the padded layout.

import ConvirtCore
import Testing

@Suite("Packed token rows")
struct TokenRowsTests {
    /// A [B, T] mask with these valid positions per sample.
    func mask(_ valid: [[Int]], tokens: Int) -> [Int32] {
        var m = [Int32](repeating: 0, count: valid.count * tokens)
        for (b, positions) in valid.enumerated() { for t in positions { m[b * tokens + t] = 1 } }
        return m
    }

    @Test("valid tokens in sample order, each group of samples rounded up to a multiple of 8 rows of no sample")
    func layout() {
        let tokens = 11, valid = [[0, 1, 2], Array(0..<11), [0], [0, 1, 3, 4, 5]]
        let m = mask(valid, tokens: tokens)
        let rows = TokenRows(mask: m, batch: 4, tokens: tokens, pieceSamples: 2)
        #expect(rows.lengths == [3, 11, 1, 5])
        // Group 0: 3 + 11 = 14 rows, rounded to 16; group 1: 1 + 5 = 6, rounded to 8.
        #expect(rows.starts == [0, 3, 16, 17])
        #expect(rows.count == 24 && rows.pieces == RowPieces(bounds: [0, 16, 24]))
        #expect(!rows.isPadded)
        for (b, positions) in valid.enumerated() {
            #expect(positions.indices.map { Int(rows.paddedRows[rows.starts[b] + $0]) } == positions.map { b * tokens + $0 })
        }
        #expect([14, 15, 23].allSatisfy { rows.paddedRows[$0] == -1 })
        // No pieces: the batch is one group, rounded (20 rows to 24), and no pieces are cut.
        let whole = TokenRows(mask: m, batch: 4, tokens: tokens, pieceSamples: nil)
        #expect(whole.count == 24 && whole.pieces == nil && whole.starts == [0, 3, 14, 15])
        #expect(whole.count <= TokenRows.capacity(batch: 4, tokens: tokens, pieceSamples: nil))
    }

    @Test("runs split at samples, at holes in a mask (a run's positions are consecutive) and at rows of no sample, in any range")
    func runs() {
        let tokens = 11, valid = [[0, 1, 2], Array(0..<11), [0], [0, 1, 3, 4, 5]]
        let rows = TokenRows(mask: mask(valid, tokens: tokens), batch: 4, tokens: tokens, pieceSamples: 2)
        for range in [0..<rows.count, 2..<20, 15..<16, 18..<24] {
            var covered = [Int]()
            rows.runs(in: range) { first, end, sample, position in
                #expect(first < end)
                for r in first..<end {
                    covered.append(r)
                    if let sample {
                        #expect(Int(rows.paddedRows[r]) == sample * tokens + position + (r - first), "row \(r)")
                    } else {
                        #expect(rows.paddedRows[r] == -1, "row \(r)")
                    }
                }
            }
            #expect(covered == Array(range), "\(range)")
        }
    }

    @Test("scatter puts each row in its padded place with zero padding; gather takes them back, zero for rows of no sample")
    func scatterGather() {
        let tokens = 6, columns = 5, valid = [[0, 1], [0, 2, 3], Array(0..<6)]
        let rows = TokenRows(mask: mask(valid, tokens: tokens), batch: 3, tokens: tokens, pieceSamples: nil)
        let packed = (0..<(rows.count * columns)).map { Float($0 + 1) }
        var padded = [Float](repeating: .nan, count: 3 * tokens * columns)
        rows.scatter(packed, into: &padded, columns: columns)
        for p in 0..<(3 * tokens) {
            let r = rows.paddedRows.firstIndex(of: Int32(p))
            for j in 0..<columns { #expect(padded[p * columns + j] == (r.map { packed[$0 * columns + j] } ?? 0), "padded row \(p)") }
        }
        var back = [Float](repeating: .nan, count: rows.count * columns)
        rows.gather(padded, into: &back, columns: columns)
        for r in 0..<rows.count {
            for j in 0..<columns { #expect(back[r * columns + j] == (rows.paddedRows[r] >= 0 ? packed[r * columns + j] : 0), "row \(r)") }
        }
        // bf16 bits alike.
        let bits = packed.map { UInt16(Int($0) % 65536) }
        var paddedBits = [UInt16](repeating: 0xffff, count: padded.count), backBits = [UInt16](repeating: 0xffff, count: bits.count)
        rows.scatter(bits, into: &paddedBits, columns: columns)
        rows.gather(paddedBits, into: &backBits, columns: columns)
        #expect((0..<rows.count).allSatisfy { r in (0..<columns).allSatisfy { backBits[r * columns + $0] == (rows.paddedRows[r] >= 0 ? bits[r * columns + $0] : 0) } })
    }

    @Test("every token valid and no group rounded: the padded layout itself, pieces included")
    func fullBatchIsPadded() {
        let m = [Int32](repeating: 1, count: 4 * 8)
        let packed = TokenRows(mask: m, batch: 4, tokens: 8, pieceSamples: 2), padded = TokenRows(batch: 4, tokens: 8, pieceSamples: 2)
        #expect(packed.isPadded && packed == padded)
        // 4 x 7 tokens in pieces of 2 samples (14 rows): rounded to 16, so packed.
        let odd = TokenRows(mask: [Int32](repeating: 1, count: 4 * 7), batch: 4, tokens: 7, pieceSamples: 2)
        #expect(!odd.isPadded && odd.pieces == RowPieces(bounds: [0, 16, 32]))
    }

    @Test("a rank's share of the samples has the whole batch's pieces of those samples (the world-size invariance of packed pieces)")
    func sharesKeepPieces() {
        let tokens = 9, valid = [[0, 1], Array(0..<9), [0, 1, 2, 3], [0], [0, 1, 2], Array(0..<7), [0, 2], [0, 1, 2, 3, 4]]
        let m = mask(valid, tokens: tokens)
        let whole = TokenRows(mask: m, batch: 8, tokens: tokens, pieceSamples: 2)
        for ranks in [2, 4] {
            let share = 8 / ranks
            var sizes = [Int]()
            for r in 0..<ranks {
                let part = Array(m[(r * share * tokens)..<((r + 1) * share * tokens)])
                let rows = TokenRows(mask: part, batch: share, tokens: tokens, pieceSamples: 2)
                sizes += rows.pieces!.ranges.map(\.count)
                for b in 0..<share {
                    #expect(rows.lengths[b] == whole.lengths[r * share + b])
                    #expect(rows.starts[b] - rows.pieces!.bounds[b / 2] == whole.starts[r * share + b] - whole.pieces!.bounds[(r * share + b) / 2])
                }
            }
            #expect(sizes == whole.pieces!.ranges.map(\.count), "\(ranks) ranks")
        }
    }
}
