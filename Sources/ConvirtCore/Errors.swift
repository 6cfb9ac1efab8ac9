/// The error every layer of convirt throws for bad input: a sentence that names the thing (a file, a
/// tensor, a kernel argument) and what is wrong with it, and where it helps, what to do.
public struct ConvirtError: Error, CustomStringConvertible, Equatable, Sendable {
    /// What callers may decide on (the message is for people).
    public enum Reason: Sendable, Equatable {
        /// Bad input: a file, a value or a state that cannot be used.
        case invalid
        /// A checkpoint or weights file holds another model than the one configured.
        case modelMismatch
        /// A file whose bytes are damaged (a corrupt or truncated image, say).
        case corrupt
    }

    public let message: String
    public let reason: Reason

    public init(_ message: String, reason: Reason = .invalid) {
        self.message = message
        self.reason = reason
    }

    public var description: String { message }

    /// A shape or size that a kernel or model cannot accept.
    public static func shape(_ context: String, _ problem: String) -> ConvirtError {
        ConvirtError("\(context): \(problem)")
    }
}

/// Throws `ConvirtError.shape(context, problem())` unless `condition` holds.
@inlinable
public func require(_ condition: Bool, _ context: @autoclosure () -> String, _ problem: @autoclosure () -> String) throws {
    if !condition { throw ConvirtError.shape(context(), problem()) }
}

/// The product of sizes read from a file, or nil when one is negative or the product overflows: what is
/// allocated from a file's numbers is computed with this first.
public func checkedProduct(_ values: [Int]) -> Int? {
    var product = 1
    for v in values {
        guard v >= 0 else { return nil }
        let (p, overflow) = product.multipliedReportingOverflow(by: v)
        if overflow { return nil }
        product = p
    }
    return product
}

/// Formats a shape as `[2, 3, 4]`.
public func describe(shape: [Int]) -> String { "[" + shape.map(String.init).joined(separator: ", ") + "]" }
