// Procedural chest radiographs: body, lungs with vascular markings, ribs, clavicles, spine, heart and
// diaphragm, with visible findings at a side and a severity. Images are in [0, 1], bright = dense, and
// follow the radiographic convention: the patient's right is on the image's left.

import ConvirtCore
import Foundation
import RealModule

public enum Side: String, Sendable, CaseIterable { case left, right }
public enum Severity: String, Sendable, CaseIterable { case small, moderate, large }

/// What an image shows. Empty = normal.
public struct Findings: Sendable, Equatable {
    public var cardiomegaly = false
    public var effusion: (side: Side, severity: Severity)? = nil
    public var pneumothorax: (side: Side, severity: Severity)? = nil
    public var consolidation: (side: Side, upper: Bool)? = nil
    public var edema: Severity? = nil
    public var atelectasis: Side? = nil
    public var fracture: Side? = nil
    public var devices = false
    /// How visible the findings are, in (0, 1]: 1 draws them at full contrast and size (the pretraining
    /// images, whose reports name them), lower values fainter and smaller, down to what is hard to tell
    /// from normal variation (a faint consolidation, a thin effusion, a hairline fracture).
    public var conspicuity: Float = 1
    /// Normal variation that mimics disease: soft-tissue (breast) shadows over both lower zones, 0 (none)
    /// to about 0.1 (a faint bilateral density, like early consolidation). Not a finding.
    public var softTissue: Float = 0

    public init() {}

    public var isNormal: Bool {
        !cardiomegaly && effusion == nil && pneumothorax == nil && consolidation == nil && edema == nil && atelectasis == nil && fracture == nil && !devices
    }

    public static func == (a: Findings, b: Findings) -> Bool {
        a.cardiomegaly == b.cardiomegaly && a.effusion?.side == b.effusion?.side && a.effusion?.severity == b.effusion?.severity
            && a.pneumothorax?.side == b.pneumothorax?.side && a.pneumothorax?.severity == b.pneumothorax?.severity
            && a.consolidation?.side == b.consolidation?.side && a.consolidation?.upper == b.consolidation?.upper
            && a.edema == b.edema && a.atelectasis == b.atelectasis && a.fracture == b.fracture && a.devices == b.devices
            && a.conspicuity == b.conspicuity && a.softTissue == b.softTissue
    }
}

public enum ChestRenderer {
    /// Renders a frontal (PA/AP) or lateral view of size width x height showing `findings`. The same
    /// (stream, findings) always gives the same image.
    public static func render(width w: Int, height h: Int, findings f: Findings, lateral: Bool, stream: RandomStream) -> [Float] {
        var img = [Float](repeating: 0, count: w * h)
        let W = Float(w), H = Float(h)
        func u(_ i: UInt64) -> Float { stream.uniform(at: i) }
        // Conspicuity c scales each finding's size and contrast; at c = 1 every value is exactly the
        // full-contrast one (`fade(x, k)` is x at c = 1, x * (1 - k) at c = 0; `toward(v, t)` is t at c = 1).
        let c = min(1, max(0, f.conspicuity))
        func fade(_ x: Float, _ k: Float) -> Float { c >= 1 ? x : x * (1 - k * (1 - c)) }
        func toward(_ v: Float, _ t: Float) -> Float { c >= 1 ? t : v + (t - v) * c }
        // Anatomy varies per patient/image.
        let cx = W * (0.5 + 0.03 * (u(0) - 0.5))
        let lungTop = H * (0.16 + 0.04 * u(1)), lungBottom = H * (0.74 + 0.05 * u(2))
        let lungHalfWidth = W * (0.17 + 0.02 * u(3)), lungGap = W * (0.06 + 0.015 * u(4))
        // An enlarged heart is 0.12-0.14 of the width wider than a normal one at full conspicuity, and only
        // a little wider than the widest normal hearts when faint.
        let heartWidth = W * (f.cardiomegaly ? (c >= 1 ? 0.34 + 0.05 * u(5) : 0.22 + 0.03 * u(5) + (0.03 + 0.09 * c) * (1 + u(5) / 6)) : 0.22 + 0.03 * u(5))
        let heartCenterX = cx + W * 0.04, heartCenterY = lungBottom - H * 0.1
        let exposure = 0.9 + 0.2 * u(6)
        let ribPhase = u(7) * 6.28, ribSpacing = H * (0.055 + 0.008 * u(8))
        let noise = stream.child(99)

        // Lung field membership for a point: 0 outside, 1 well inside (soft edge).
        func lung(_ x: Float, _ y: Float) -> (Float, Side?) {
            if lateral {
                let ex = (x - W * 0.48) / (W * 0.3), ey = (y - (lungTop + lungBottom) / 2) / ((lungBottom - lungTop) / 2)
                let r = ex * ex + ey * ey
                return (max(0, min(1, (1 - r) * 4)), nil)
            }
            for side in Side.allCases {
                // Patient's right lung on the image's left.
                let center = side == .right ? cx - lungGap - lungHalfWidth : cx + lungGap + lungHalfWidth
                let ex = (x - center) / lungHalfWidth
                let t = (y - lungTop) / (lungBottom - lungTop)
                if t < 0 || t > 1.05 { continue }
                // Narrow apex, wide base; the medial edge is cut by the heart on the left.
                // A rounded apex (an ellipse over the top fifth), widening towards the base.
                let apex = min(t, 0.22) / 0.22
                let halfWidthAtY = Float.sqrt(max(0, 1 - (1 - apex) * (1 - apex))) * (0.62 + 0.38 * t)
                var inside = 1 - abs(ex) / halfWidthAtY
                // costophrenic angle / diaphragm dome
                let dome = lungBottom - H * 0.04 * (1 - ex * ex) - (side == .right ? H * 0.015 : 0)
                inside = min(inside, (dome - y) / (H * 0.02))
                if inside > 0 { return (min(1, inside * 6), side) }
            }
            return (0, nil)
        }

        for y in 0..<h {
            let fy = Float(y) + 0.5
            for x in 0..<w {
                let fx = Float(x) + 0.5
                // body: a wide rounded torso
                let bx = (fx - cx) / (W * 0.46), by = (fy - H * 0.55) / (H * 0.6)
                let body = max(0, min(1, (1 - (bx * bx + by * by * 0.6)) * 5))
                var v: Float = 0.04 + 0.34 * body
                let (inLung, side) = lung(fx, fy)
                if inLung > 0 {
                    // air is dark; vascular markings thicken towards the hila
                    let markings = 0.05 * (Float.sin(fx * 0.21 + fy * 0.13 + ribPhase) * Float.sin(fy * 0.17 - fx * 0.07)) *
                        (1 - abs(fx - cx) / (W * 0.5))
                    var air: Float = 0.12 + markings
                    if let side, let ptx = f.pneumothorax, ptx.side == side, !lateral {
                        // no markings and darker at the lateral apex, a thin pleural line at the edge
                        let lateralEdge: Float = side == .right ? cx - lungGap - 2 * lungHalfWidth : cx + lungGap + 2 * lungHalfWidth
                        let extent: Float = fade(ptx.severity == .large ? 0.55 : (ptx.severity == .moderate ? 0.38 : 0.22), 0.6)
                        let d = abs(fx - lateralEdge) / (2 * lungHalfWidth), t = (fy - lungTop) / (lungBottom - lungTop)
                        let boundary = extent * (1 - 0.5 * t)
                        if d < boundary { air = toward(air, 0.03) } else if d < boundary + 0.015 { air = toward(air, 0.3) }
                    }
                    v = v * (1 - inLung) + air * inLung
                }
                // mediastinum and spine
                let spine = max(0, 1 - abs(fx - cx) / (W * 0.045))
                v += 0.3 * spine * body
                let med = max(0, 1 - abs(fx - cx) / (W * 0.07)) * (fy > lungTop ? 1 : 0)
                v = max(v, 0.55 * med * body)
                // heart: an ellipse at the base, larger with cardiomegaly
                if !lateral {
                    let hx = (fx - heartCenterX) / (heartWidth / 2), hy = (fy - heartCenterY) / (H * 0.11)
                    let heart = max(0, min(1, (1 - (hx * hx + hy * hy)) * 4))
                    v = max(v, 0.62 * heart)
                } else {
                    let hx = (fx - W * 0.35) / (W * (f.cardiomegaly ? 0.2 : 0.14)), hy = (fy - heartCenterY) / (H * 0.13)
                    v = max(v, 0.6 * max(0, min(1, (1 - (hx * hx + hy * hy)) * 4)))
                }
                // ribs: bright arcs across the chest
                if body > 0.2 && fy > lungTop * 0.8 && fy < lungBottom + H * 0.02 {
                    let arc = fy + H * 0.05 * ((fx - cx) / (W * 0.5)) * ((fx - cx) / (W * 0.5)) * 3
                    let phase = (arc / ribSpacing + ribPhase).truncatingRemainder(dividingBy: 1)
                    var rib: Float = phase < 0.22 ? 0.16 * Float.sin(phase / 0.22 * Float.pi) : 0
                    if let fside = f.fracture, !lateral {
                        let fractureX = fside == .right ? cx - lungGap - lungHalfWidth * 1.6 : cx + lungGap + lungHalfWidth * 1.6
                        let fractureY = lungTop + (lungBottom - lungTop) * 0.45
                        if abs(fx - fractureX) < fade(W * 0.012, 0.6) && abs(fy - fractureY) < ribSpacing * 0.6 { rib = toward(rib, -0.08) }
                    }
                    v += rib
                }
                // clavicles
                if !lateral {
                    let clav = abs(fy - (lungTop + H * 0.02 - abs(fx - cx) * 0.12))
                    if clav < H * 0.012 && abs(fx - cx) < W * 0.3 { v += 0.2 }
                }
                // abdomen below the diaphragm
                if fy > lungBottom + H * 0.03 { v = max(v, 0.5 * body) }
                // findings that add density
                if let side, inLung > 0, !lateral {
                    let t = (fy - lungTop) / (lungBottom - lungTop)
                    let sideCenter = side == .right ? cx - lungGap - lungHalfWidth : cx + lungGap + lungHalfWidth
                    if let eff = f.effusion, eff.side == side {
                        let level: Float = fade(eff.severity == .large ? 0.5 : (eff.severity == .moderate ? 0.3 : 0.14), 0.65)
                        // meniscus: higher laterally
                        let lateralness = abs(fx - sideCenter) / lungHalfWidth
                        if t > 1 - level - 0.08 * lateralness { v = max(v, toward(v, 0.58)) }
                    }
                    if let c = f.consolidation, c.side == side {
                        let cyz: Float = c.upper ? 0.3 : 0.72
                        let radius = fade(1, 0.45)
                        let dx = (fx - sideCenter) / (lungHalfWidth * radius), dz = (t - cyz) / (0.16 * radius)
                        let blob = 1 - (dx * dx + dz * dz) + 0.25 * Float.sin(fx * 0.3) * Float.cos(fy * 0.27)
                        if blob > 0 { v = max(v, toward(v, 0.25 + 0.35 * min(1, blob * 2))) }
                    }
                    if let a = f.atelectasis, a == side {
                        let band = abs(t - 0.82 - 0.03 * (fx - sideCenter) / lungHalfWidth)
                        if band < fade(0.025, 0.5) && abs(fx - sideCenter) < lungHalfWidth * 0.8 { v = max(v, toward(v, 0.5)) }
                    }
                    if let e = f.edema {
                        let strength: Float = fade(e == .large ? 0.35 : (e == .moderate ? 0.24 : 0.14), 1)
                        let hilum = abs(fx - cx) / (W * 0.3)
                        v += strength * max(0, 1 - hilum) * (0.6 + 0.4 * Float.sin(fy * 0.5))
                        if t > 0.8 && Int(fy) % max(3, h / 60) == 0 && abs(fx - sideCenter) > lungHalfWidth * 0.6 { v += strength * 0.6 }
                    }
                    if f.softTissue > 0 {
                        // breast shadows: a soft density over the lower lateral zones, fading upwards
                        let lateralness = min(1, abs(fx - sideCenter) / lungHalfWidth + 0.3)
                        let zone = max(0, min(1, (t - 0.5) / 0.3))
                        v += f.softTissue * zone * lateralness
                    }
                }
                img[y * w + x] = v
            }
        }
        if f.devices && !lateral {
            // endotracheal tube down the trachea, a nasogastric tube to the stomach, a pacemaker with a lead
            let tubeX = Int(cx)
            for y in 0..<Int(lungTop + (lungBottom - lungTop) * 0.2) { for dx in -1...1 where tubeX + dx >= 0 && tubeX + dx < w { img[y * w + tubeX + dx] = 0.95 } }
            let ngX = Int(cx - W * 0.015)
            for y in 0..<Int(H * 0.9) {
                let x = ngX + Int(Float(max(0, y - Int(lungBottom))) * 0.4)
                if x >= 0 && x < w { img[y * w + x] = 0.9 }
            }
            let px = Int(cx + W * 0.25), py = Int(lungTop + H * 0.04)
            for y in max(0, py - h / 40)..<min(h, py + h / 40) { for x in max(0, px - w / 25)..<min(w, px + w / 25) { img[y * w + x] = 1 } }
            for k in 0..<Int(H * 0.3) {
                let y = py + k, x = px - Int(Float(k) * 0.8)
                if y < h && x >= 0 && x < w { img[y * w + x] = 0.95 }
            }
        }
        // exposure, quantum noise and a slight blur of the detector
        var normals = [Float](repeating: 0, count: w * h)
        normals.withUnsafeMutableBufferPointer { noise.normals(from: 0, into: $0) }
        for i in 0..<(w * h) {
            img[i] = min(1, max(0, img[i] * exposure + 0.025 * normals[i]))
        }
        return img
    }
}
