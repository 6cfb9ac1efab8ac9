// Inline SVG line charts for the HTML report: no scripts, no external resources. Long series are
// downsampled into buckets (the mean as the line, the min-max range as a light band), so a run of a
// million steps gives a chart of a few hundred points.

import ConvirtEvaluation
import ConvirtTraining
import Foundation

struct SVGChart {
    struct Series {
        enum Style { case line, points, dashed }
        var name: String
        var color: String
        var points: [(x: Double, y: Double)]
        var style: Style = .line
        /// Noisy per-step values: drawn faint, with a moving average (or bucket means and a band) on top.
        var smooth = false
    }

    var title: String
    var xLabel: String
    var yLabel: String
    var series: [Series]
    var width = 540.0
    var height = 250.0
    var logY = false
    /// Series with more points are drawn as bucket means with a min-max band.
    static let maxPoints = 400

    /// The moving-average window for a smoothed series of `count` points.
    static func smoothingWindow(_ count: Int) -> Int { max(5, count / 25) | 1 }

    /// Centred moving average over `window` points (fewer at the ends).
    static func movingAverage(_ points: [(x: Double, y: Double)], window: Int) -> [(x: Double, y: Double)] {
        guard points.count > 2 else { return points }
        var prefix = [0.0]
        prefix.reserveCapacity(points.count + 1)
        for p in points { prefix.append(prefix[prefix.count - 1] + p.y) }
        let half = window / 2
        return points.indices.map { i in
            let lo = max(0, i - half), hi = min(points.count, i + half + 1)
            return (points[i].x, (prefix[hi] - prefix[lo]) / Double(hi - lo))
        }
    }

    /// Up to `buckets` points: per bucket of consecutive points, the mean (x, y) and the y range.
    static func downsample(_ points: [(x: Double, y: Double)], buckets: Int) -> (line: [(x: Double, y: Double)], band: [(x: Double, lo: Double, hi: Double)]) {
        guard points.count > buckets, buckets > 0 else { return (points, []) }
        var line: [(x: Double, y: Double)] = [], band: [(x: Double, lo: Double, hi: Double)] = []
        line.reserveCapacity(buckets)
        band.reserveCapacity(buckets)
        for b in 0..<buckets {
            let lo = b * points.count / buckets, hi = (b + 1) * points.count / buckets
            guard hi > lo else { continue }
            var sx = 0.0, sy = 0.0, minY = Double.infinity, maxY = -Double.infinity
            for p in points[lo..<hi] {
                sx += p.x
                sy += p.y
                minY = min(minY, p.y)
                maxY = max(maxY, p.y)
            }
            let n = Double(hi - lo)
            line.append((sx / n, sy / n))
            band.append((sx / n, minY, maxY))
        }
        return (line, band)
    }

    /// About `count` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi].
    static func ticks(_ lo: Double, _ hi: Double, count: Int = 5) -> [Double] {
        guard hi > lo, lo.isFinite, hi.isFinite else { return [lo] }
        let raw = (hi - lo) / Double(max(count, 1))
        let magnitude = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? 10 * magnitude
        var values: [Double] = []
        var v = (lo / step).rounded(.up) * step
        while v <= hi + step * 1e-9 {
            values.append(abs(v) < step * 1e-9 ? 0 : v)
            v += step
        }
        return values
    }

    /// Tick labels of one axis: "12k" for large round numbers, a shared power of ten for tiny or huge
    /// values ("2.5e-4"), else as many decimals as the tick spacing needs.
    static func labels(_ ticks: [Double], spacing: Double) -> [String] {
        let largest = ticks.map(abs).max() ?? 0
        if largest > 0 && (largest < 1e-3 || largest >= 1e7) {
            let exponent = floor(log10(largest))
            let scale = pow(10, exponent)
            let decimals = max(0, Int(-floor(log10(spacing / scale) + 1e-9)))
            return ticks.map { $0 == 0 ? "0" : String(format: "%.\(decimals)fe%d", $0 / scale, Int(exponent)) }
        }
        let decimals = max(0, Int(-floor(log10(spacing) + 1e-9)))
        return ticks.map { v in
            if v == 0 { return "0" }
            if abs(v) >= 1_000_000 && (v / 100_000).rounded() == v / 100_000 { return String(format: "%gM", v / 1_000_000) }
            if abs(v) >= 10_000 && (v / 1000).rounded() == v / 1000 { return "\(Int(v / 1000))k" }
            return String(format: "%.\(decimals)f", v)
        }
    }

    var svg: String {
        let left = 64.0, right = 14.0, top = 34.0, bottom = 40.0
        let plotW = width - left - right, plotH = height - top - bottom
        var out = "<svg class=\"chart\" viewBox=\"0 0 \(Int(width)) \(Int(height))\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" "
            + "aria-label=\"\(HTML.escape(title))\">"
        out += "<text x=\"\(left)\" y=\"18\" class=\"ct\">\(HTML.escape(title))</text>"
        // Per series: the main line, a band (bucket ranges) and a faint line (every point).
        typealias Drawn = (series: Series, line: [(x: Double, y: Double)], band: [(x: Double, lo: Double, hi: Double)], faint: [(x: Double, y: Double)])
        let drawn = series.map { s -> Drawn in
            let pts = logY ? s.points.filter { $0.y > 0 } : s.points
            if s.style == .points { return (s, pts, [], []) }
            if s.smooth && pts.count <= Self.maxPoints && pts.count > 5 {
                return (s, Self.movingAverage(pts, window: Self.smoothingWindow(pts.count)), [], pts)
            }
            let (means, band) = Self.downsample(pts, buckets: Self.maxPoints)
            return (s, s.smooth ? Self.movingAverage(means, window: Self.smoothingWindow(means.count)) : means, band, [])
        }
        let xs = drawn.flatMap { $0.series.points.map(\.x) }
        let ys = drawn.flatMap { $0.line.map(\.y) + $0.faint.map(\.y) + $0.band.flatMap { [$0.lo, $0.hi] } }
        guard let minX = xs.min(), let maxX = xs.max(), var minY = ys.min(), var maxY = ys.max() else {
            out += "<text x=\"\(width / 2)\" y=\"\(height / 2)\" class=\"empty\" text-anchor=\"middle\">no data</text></svg>"
            return out
        }
        func ty(_ v: Double) -> Double { logY ? log10(v) : v }
        minY = ty(minY)
        maxY = ty(maxY)
        if maxY - minY < 1e-12 * max(1, abs(maxY)) {
            let pad = logY ? 0.5 : max(abs(maxY) * 0.05, 1e-9)
            minY -= pad
            maxY += pad
        } else {
            let pad = (maxY - minY) * 0.05
            minY -= pad
            maxY += pad
        }
        if !logY && minY < 0 && ys.allSatisfy({ $0 >= 0 }) { minY = 0 }
        let x0 = minX, x1 = maxX > minX ? maxX : minX + 1
        func px(_ x: Double) -> Double { left + (x - x0) / (x1 - x0) * plotW }
        func py(_ y: Double) -> Double { top + plotH - (ty(y) - minY) / (maxY - minY) * plotH }
        func f(_ v: Double) -> String { String(format: "%.1f", v) }

        // Grid and axes.
        let yTicks: [Double]
        if logY {
            yTicks = Array(Int(ceil(minY))...max(Int(ceil(minY)), Int(floor(maxY)))).map { pow(10, Double($0)) }.filter { ty($0) <= maxY }
        } else {
            yTicks = Self.ticks(minY, maxY)
        }
        let ySpacing = yTicks.count > 1 ? yTicks[1] - yTicks[0] : max(abs(maxY - minY), 1e-9)
        let yLabels = logY ? yTicks.map { String(format: "%g", $0) } : Self.labels(yTicks, spacing: ySpacing)
        for (t, text) in zip(yTicks, yLabels) {
            let y = py(t)
            out += "<line x1=\"\(f(left))\" y1=\"\(f(y))\" x2=\"\(f(left + plotW))\" y2=\"\(f(y))\" class=\"grid\"/>"
            out += "<text x=\"\(f(left - 6))\" y=\"\(f(y + 3.5))\" class=\"tick\" text-anchor=\"end\">\(text)</text>"
        }
        let xTicks = Self.ticks(x0, x1)
        let xSpacing = xTicks.count > 1 ? xTicks[1] - xTicks[0] : 1
        for (t, text) in zip(xTicks, Self.labels(xTicks, spacing: xSpacing)) {
            let x = px(t)
            out += "<line x1=\"\(f(x))\" y1=\"\(f(top + plotH))\" x2=\"\(f(x))\" y2=\"\(f(top + plotH + 4))\" class=\"axis\"/>"
            out += "<text x=\"\(f(x))\" y=\"\(f(top + plotH + 16))\" class=\"tick\" text-anchor=\"middle\">\(text)</text>"
        }
        out += "<line x1=\"\(f(left))\" y1=\"\(f(top + plotH))\" x2=\"\(f(left + plotW))\" y2=\"\(f(top + plotH))\" class=\"axis\"/>"
        out += "<line x1=\"\(f(left))\" y1=\"\(f(top))\" x2=\"\(f(left))\" y2=\"\(f(top + plotH))\" class=\"axis\"/>"
        out += "<text x=\"\(f(left + plotW / 2))\" y=\"\(f(height - 4))\" class=\"al\" text-anchor=\"middle\">\(HTML.escape(xLabel))</text>"
        out += "<text transform=\"translate(13 \(f(top + plotH / 2))) rotate(-90)\" class=\"al\" text-anchor=\"middle\">\(HTML.escape(yLabel))</text>"

        // Data.
        out += "<g>"
        func polyline(_ points: [(x: Double, y: Double)]) -> String {
            points.map { "\(f(px($0.x))),\(f(py($0.y)))" }.joined(separator: " ")
        }
        for (s, line, band, faint) in drawn {
            if !faint.isEmpty {
                out += "<polyline points=\"\(polyline(faint))\" fill=\"none\" stroke=\"\(s.color)\" stroke-width=\"1\" stroke-opacity=\"0.28\"/>"
            }
            if !band.isEmpty {
                let upper = band.map { "\(f(px($0.x))),\(f(py($0.hi)))" }
                let lower = band.reversed().map { "\(f(px($0.x))),\(f(py($0.lo)))" }
                out += "<polygon points=\"\((upper + lower).joined(separator: " "))\" fill=\"\(s.color)\" fill-opacity=\"0.15\" stroke=\"none\"/>"
            }
            switch s.style {
            case .points:
                for p in line { out += "<circle cx=\"\(f(px(p.x)))\" cy=\"\(f(py(p.y)))\" r=\"3\" fill=\"\(s.color)\" stroke=\"white\" stroke-width=\"1\"/>" }
                if line.count > 1 && line.count <= 400 {
                    out += "<polyline points=\"\(polyline(line))\" fill=\"none\" "
                        + "stroke=\"\(s.color)\" stroke-width=\"1\" stroke-opacity=\"0.6\"/>"
                }
            case .line, .dashed:
                if line.count == 1 {
                    out += "<circle cx=\"\(f(px(line[0].x)))\" cy=\"\(f(py(line[0].y)))\" r=\"2.5\" fill=\"\(s.color)\"/>"
                } else {
                    let dash = s.style == .dashed ? " stroke-dasharray=\"5 4\"" : ""
                    out += "<polyline points=\"\(polyline(line))\" fill=\"none\" "
                        + "stroke=\"\(s.color)\" stroke-width=\"1.6\" stroke-linejoin=\"round\"\(dash)/>"
                }
            }
        }
        out += "</g>"

        // Legend, right-aligned above the plot.
        if series.count > 1 {
            var x = left + plotW
            for s in series.reversed() {
                let w = Double(s.name.count) * 6.2 + 22
                x -= w
                let mark = s.style == .points
                    ? "<circle cx=\"\(f(x + 6))\" cy=\"14\" r=\"3\" fill=\"\(s.color)\"/>"
                    : "<line x1=\"\(f(x))\" y1=\"14\" x2=\"\(f(x + 12))\" y2=\"14\" stroke=\"\(s.color)\" stroke-width=\"2\"\(s.style == .dashed ? " stroke-dasharray=\"3 2\"" : "")/>"
                out += mark + "<text x=\"\(f(x + 16))\" y=\"18\" class=\"lg\">\(HTML.escape(s.name))</text>"
            }
        }
        out += "</svg>"
        return out
    }
}

/// HTML text escaping.
public enum HTML {
    /// `&`, `<`, `>`, `"` and `'` as entities: safe in element content and in quoted attributes.
    public static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for c in text.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }
}
