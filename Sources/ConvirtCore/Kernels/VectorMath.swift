// Elementary functions for the pointwise layers, written without libm calls or branches so that the
// loops calling them are vectorized by the compiler (GELU no longer calls libm's scalar erff and expf
// for each of BERT's 37.7M activations per step).
//
// - exp: Cody-Waite range reduction by ln 2 (split in two parts, exact in float), rounding to the
//   nearest integer by adding and subtracting 1.5 * 2^23, and the degree-6 Taylor polynomial of e^r
//   on |r| <= ln(2)/2 (truncation error below r^7/7! = 6.2e-8 relative); 2^n enters through the
//   exponent bits.
// - the normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2 by Abramowitz & Stegun 7.1.26 (|error of erf| <=
//   1.5e-7), the approximation PyTorch's own vectorized erf uses on CPUs: for z = |x| / sqrt 2,
//   erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-z^2) with t = 1 / (1 + p z). Phi is then
//   1 - erfc/2 for x >= 0 and erfc/2 below, so the left tail keeps its relative accuracy, and e^(-x^2/2)
//   is also the normal density that GELU's backward needs.

public enum VectorMath {
    /// e^y: 0 below -87.4 (where e^y leaves the normal floats), e^88 above 88.
    @inline(__always)
    public static func exp(_ input: Float) -> Float {
        let y = min(max(input, -87), 88)
        let shifter: Float = 12_582_912  // 1.5 * 2^23: adding it rounds to an integer (to nearest, even)
        let shifted = y * 1.442_695_040_888_963_4 + shifter
        let n = shifted - shifter
        // ln 2 = 0.693359375 - 2.12194440e-4 (the first part has 9 significant bits: n * it is exact).
        let r = y - n * 0.693_359_375 + n * 2.121_944_400_546_905_8e-4
        var p: Float = 1.0 / 720
        p = p * r + 1.0 / 120
        p = p * r + 1.0 / 24
        p = p * r + 1.0 / 6
        p = p * r + 0.5
        p = p * r + 1
        p = p * r + 1
        // The low bits of `shifted` hold n (two's complement); n + 127 shifted into the exponent is 2^n.
        let scale = Float(bitPattern: (shifted.bitPattern &- shifter.bitPattern &+ 127) &<< 23)
        return input < -87.4 ? 0 : p * scale
    }

    /// The standard normal CDF Phi(x) and density phi(x).
    @inline(__always)
    public static func normalCDFAndDensity(_ x: Float) -> (cdf: Float, density: Float) {
        let gaussian = exp(-0.5 * x * x)
        let z = Float(bitPattern: x.bitPattern & 0x7fff_ffff) * 0.707_106_781_186_547_6
        let t = 1 / (1 + 0.327_591_1 * z)
        var q: Float = 1.061_405_429
        q = q * t - 1.453_152_027
        q = q * t + 1.421_413_741
        q = q * t - 0.284_496_736
        q = q * t + 0.254_829_592
        let halfTail = 0.5 * q * t * gaussian  // erfc(z) / 2 = Phi(-|x|)
        return (x < 0 ? halfTail : 1 - halfTail, gaussian * 0.398_942_280_401_432_7)
    }
}
