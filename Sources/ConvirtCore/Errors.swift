/// The error every layer of convirt throws for bad input: a sentence that names the thing (a file, a
/// tensor, a kernel argument) and what is wrong with it, and where it helps, what to do.
public struct ConvirtError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String

    public init(_ message: String) { self.message = message }

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

/// Formats a shape as `[2, 3, 4]`.
public func describe(shape: [Int]) -> String { "[" + shape.map(String.init).joined(separator: ", ") + "]" }
